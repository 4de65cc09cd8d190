from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedlora.core.partitioners import (
    MAX_RESAMPLES,
    SCHEMES,
    Partition,
    PartitionSpec,
    Share,
    create,
    largest_remainder,
    partition_examples,
    partition_indices,
    partition_tasks,
    read_partition_manifest,
    register,
    write_partition_manifest,
)
from fedlora.core.tasks import Example, get_task

TASKS6 = ("caesar-3", "repeat-2", "reverse", "sort-asc", "upper", "copy")
SCHEME_SPECS = [
    PartitionSpec("iid", num_clients=5, seed=1, tasks=TASKS6, examples_per_task=20),
    PartitionSpec("iid", num_clients=5, size_skew=1.0, seed=1, tasks=TASKS6, examples_per_task=20),
    PartitionSpec("dirichlet", num_clients=5, alpha=0.3, seed=1, tasks=TASKS6, examples_per_task=20),
    PartitionSpec("dirichlet", num_clients=5, alpha=0.3, size_skew=1.0, seed=1, tasks=TASKS6, examples_per_task=20),
    PartitionSpec("tasks-per-client", num_clients=5, tasks_per_client=2, seed=1, tasks=TASKS6, examples_per_task=20),
    PartitionSpec("tasks-per-client", num_clients=6, size_skew=2.0, seed=1, tasks=TASKS6, examples_per_task=20),
]


def _pairs(p: Partition) -> list[tuple[int, str, int]]:
    """(client, task, index in task pool) for every assigned example."""
    return [(c, s.task, i) for c, shares in enumerate(p.clients) for s in shares for i in s.indices]


def _task_shares(p: Partition) -> np.ndarray:
    """clients x tasks matrix of each client's fraction of its examples from each task."""
    tasks = p.spec.tasks
    m = np.zeros((p.num_clients, len(tasks)))
    for c, shares in enumerate(p.clients):
        for s in shares:
            m[c, tasks.index(s.task)] = s.count
    return m / m.sum(axis=1, keepdims=True)


# -- invariants for every scheme ---------------------------------------------------------------


@pytest.mark.parametrize("spec", SCHEME_SPECS, ids=lambda s: f"{s.scheme}-skew{s.size_skew}")
def test_disjoint_covering_nonempty(spec: PartitionSpec) -> None:
    p = partition_tasks(spec)
    assert p.num_clients == spec.num_clients
    pairs = [(t, i) for _, t, i in _pairs(p)]
    assert len(pairs) == len(set(pairs)), "an example is assigned to two clients"
    assert set(pairs) == {(t, i) for t in TASKS6 for i in range(20)}, "the pool is not fully assigned"
    assert all(p.client_size(c) >= 1 for c in range(p.num_clients))
    assert sum(p.summary()["client_sizes"]) == 6 * 20


@pytest.mark.parametrize("spec", SCHEME_SPECS, ids=lambda s: f"{s.scheme}-skew{s.size_skew}")
def test_reproducible_from_seed(spec: PartitionSpec) -> None:
    assert partition_tasks(spec) == partition_tasks(spec)
    other = PartitionSpec(**{**spec.__dict__, "seed": spec.seed + 1})
    assert partition_tasks(other).clients != partition_tasks(spec).clients


def test_materialised_examples_are_disjoint_slices_of_one_pool() -> None:
    spec = PartitionSpec("dirichlet", num_clients=4, alpha=1.0, seed=3, tasks=TASKS6[:3], examples_per_task=30)
    p = partition_tasks(spec)
    got = [p.client_examples(c) for c in range(4)]
    pools = {t: get_task(t).examples(30, seed=3) for t in TASKS6[:3]}
    for c, exs in enumerate(got):
        assert exs == [pools[s.task][i] for s in p.clients[c] for i in s.indices]
    # as a multiset the clients' examples are exactly the pools
    flat = sorted((e.prompt, e.completion) for exs in got for e in exs)
    assert flat == sorted((e.prompt, e.completion) for pool in pools.values() for e in pool)
    tagged = p.client_examples(0, tagged=True)
    assert len(tagged) == len(got[0]) and all(not e.prompt.startswith(":") for e in tagged)


# -- scheme-specific properties ----------------------------------------------------------------


def test_iid_equal_sizes_differ_by_at_most_one() -> None:
    p = partition_tasks(PartitionSpec("iid", num_clients=7, seed=0, tasks=TASKS6, examples_per_task=10))
    sizes = p.summary()["client_sizes"]
    assert sum(sizes) == 60 and max(sizes) - min(sizes) <= 1


def test_size_skew_makes_sizes_unequal_but_sums_to_pool() -> None:
    spreads = []
    for seed in range(5):
        spec = PartitionSpec("iid", num_clients=10, size_skew=1.5, seed=seed, tasks=TASKS6, examples_per_task=50)
        sizes = partition_tasks(spec).summary()["client_sizes"]
        assert sum(sizes) == 300 and min(sizes) >= 1
        spreads.append(max(sizes) / min(sizes))
    assert min(spreads) > 3


def test_size_skew_keeps_every_client_even_with_extreme_skew() -> None:
    spec = PartitionSpec("iid", num_clients=20, size_skew=10.0, seed=0, tasks=TASKS6[:1], examples_per_task=20)
    assert partition_tasks(spec).summary()["client_sizes"] == [1] * 20


@pytest.mark.parametrize(("num_clients", "k"), [(6, 1), (5, 2), (4, 3), (3, 6), (10, 4)])
def test_tasks_per_client_gives_exactly_k_distinct_tasks(num_clients: int, k: int) -> None:
    spec = PartitionSpec(
        "tasks-per-client", num_clients=num_clients, tasks_per_client=k, seed=2, tasks=TASKS6, examples_per_task=20
    )
    p = partition_tasks(spec)
    for shares in p.clients:
        assert len({s.task for s in shares}) == len(shares) == k
    assert {s.task for shares in p.clients for s in shares} == set(TASKS6)
    # holders of a task split its pool evenly (no size skew): counts differ by at most one
    per_task: dict[str, list[int]] = {}
    for shares in p.clients:
        for s in shares:
            per_task.setdefault(s.task, []).append(s.count)
    assert all(sum(v) == 20 and max(v) - min(v) <= 1 for v in per_task.values())


def test_one_task_per_client_is_the_identity_split() -> None:
    p = partition_tasks(PartitionSpec("tasks-per-client", num_clients=6, seed=0, tasks=TASKS6, examples_per_task=8))
    assert sorted(shares[0].task for shares in p.clients) == sorted(TASKS6)
    assert all(shares[0].indices == tuple(range(8)) for shares in p.clients)


def _mean_max_share(alpha: float) -> float:
    values = []
    for seed in range(8):
        spec = PartitionSpec("dirichlet", num_clients=10, alpha=alpha, seed=seed, tasks=TASKS6, examples_per_task=50)
        values.append(_task_shares(partition_tasks(spec)).max(axis=1).mean())
    return float(np.mean(values))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skew = {alpha: _mean_max_share(alpha) for alpha in (0.1, 1.0, 100.0)}
    assert skew[0.1] > skew[1.0] + 0.15 and skew[1.0] > skew[100.0] + 0.15
    assert skew[0.1] > 0.65  # mostly one task per client (about 0.76 with these seeds)
    assert skew[100.0] < 1 / 6 + 0.1  # close to the uniform 1/6


def test_dirichlet_too_small_alpha_for_the_pool_raises_a_clear_message() -> None:
    spec = PartitionSpec("dirichlet", num_clients=30, alpha=0.01, seed=0, tasks=TASKS6[:2], examples_per_task=30)
    with pytest.raises(ValueError, match=rf"dirichlet\(alpha=0.01\).*30 clients empty in {MAX_RESAMPLES} draws"):
        partition_tasks(spec)


# -- generic form over a caller's examples ------------------------------------------------------


def test_partition_examples_by_label() -> None:
    examples = [Example(f":{i}=", str(i)) for i in range(40)]
    labels = ["a"] * 25 + ["b"] * 10 + ["c"] * 5
    spec = PartitionSpec("tasks-per-client", num_clients=3, seed=4)
    p = partition_examples(labels, spec)
    assert p.source == "examples"
    seen: list[int] = []
    for c in range(3):
        (share,) = p.clients[c]
        assert all(labels[i] == share.task for i in share.indices)
        assert p.client_examples(c, examples) == [examples[i] for i in share.indices]
        seen.extend(share.indices)
    assert sorted(seen) == list(range(40))
    with pytest.raises(ValueError, match="pass it as `examples`"):
        p.client_examples(0)


def test_partition_indices_iid_over_one_label() -> None:
    spec = PartitionSpec("iid", num_clients=4, seed=9)
    parts = partition_indices(["all"] * 10, spec)
    assert [len(x) for x in parts] == [3, 3, 2, 2]
    assert sorted(i for x in parts for i in x) == list(range(10))
    assert parts == partition_indices(["all"] * 10, spec)


def test_generic_bad_pools() -> None:
    with pytest.raises(ValueError, match="5 clients but only 3 examples"):
        partition_indices(["x"] * 3, PartitionSpec("iid", num_clients=5))
    with pytest.raises(ValueError, match="tasks_per_client=3 but the pool has only 2"):
        partition_indices(["x", "y"] * 5, PartitionSpec("tasks-per-client", num_clients=2, tasks_per_client=3))
    with pytest.raises(ValueError, match=r"spec\.tasks must be empty"):
        partition_examples(["x"], PartitionSpec("iid", num_clients=1, tasks=("copy",)))
    with pytest.raises(ValueError, match="no examples"):
        partition_examples([], PartitionSpec("iid", num_clients=1))


# -- spec validation and registry ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "shards"}, r"unknown partition scheme 'shards'; known schemes: iid, dirichlet, tasks-per-client"),
        ({"num_clients": 0}, "num_clients must be an integer >= 1"),
        ({"alpha": 0.0}, "alpha must be a finite number > 0"),
        ({"alpha": float("inf")}, "alpha must be a finite number > 0"),
        ({"tasks_per_client": 0}, "tasks_per_client must be an integer >= 1"),
        ({"size_skew": -1.0}, "size_skew must be a finite number >= 0"),
        ({"examples_per_task": 0}, "examples_per_task must be an integer >= 1"),
        ({"tasks": ("copy", "nope")}, "unknown task.*nope; known tasks: "),
        ({"tasks": ("copy", "copy")}, "tasks must be distinct; repeated: copy"),
        ({"num_clients": 13, "tasks": ("copy", "upper"), "examples_per_task": 6}, "13 clients but only 12 examples"),
        (
            {"scheme": "tasks-per-client", "tasks_per_client": 3, "tasks": ("copy", "upper")},
            "tasks_per_client=3 but the pool has only 2",
        ),
        (
            {"scheme": "tasks-per-client", "num_clients": 2, "tasks": TASKS6},
            "2 clients x 1 task.* cover only 2 of 6 tasks",
        ),
        (
            {
                "scheme": "tasks-per-client",
                "num_clients": 4,
                "tasks_per_client": 2,
                "tasks": TASKS6[:3],
                "examples_per_task": 2,
            },
            "up to 3 clients share one task but a task has only 2",
        ),
    ],
)
def test_bad_specs_give_clear_messages(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PartitionSpec(**kwargs)  # type: ignore[arg-type]


def test_spec_accepts_a_list_of_tasks_from_a_run_config() -> None:
    spec = PartitionSpec(tasks=["copy", "upper"])  # type: ignore[arg-type]
    assert spec.tasks == ("copy", "upper") and hash(spec)


def test_registry() -> None:
    assert list(SCHEMES) == ["iid", "dirichlet", "tasks-per-client"]
    assert create("iid") is SCHEMES["iid"]
    with pytest.raises(ValueError, match="unknown partition scheme 'x'; known schemes: iid, dirichlet"):
        create("x")
    with pytest.raises(ValueError, match="'iid' is already registered"):
        register("iid", SCHEMES["iid"])


def test_largest_remainder_is_exact() -> None:
    assert largest_remainder(10, np.array([1.0, 1.0, 1.0])).tolist() == [4, 3, 3]
    assert largest_remainder(7, np.array([0.5, 0.25, 0.25])).tolist() == [3, 2, 2]  # 3.5, 1.75, 1.75
    assert largest_remainder(0, np.array([1.0, 2.0])).tolist() == [0, 0]


# -- manifest ----------------------------------------------------------------------------------


def test_manifest_round_trip(tmp_path: Path) -> None:
    spec = PartitionSpec("dirichlet", num_clients=4, alpha=0.5, size_skew=0.5, seed=7, tasks=TASKS6[:3])
    p = partition_tasks(spec)
    path = write_partition_manifest(tmp_path / "run" / "partition.json", p)
    assert read_partition_manifest(path) == p
    doc = json.loads(path.read_text())
    assert doc["spec"]["tasks"] == list(TASKS6[:3]) and doc["source"] == "embedded"
    assert doc["summary"]["client_task_counts"] == [{s.task: s.count for s in shares} for shares in p.clients]
    assert doc["summary"]["total_examples"] == 3 * 64
    assert [f.name for f in path.parent.iterdir()] == ["partition.json"]  # no temp file left behind


def test_manifest_overwrite_is_atomic_and_generic_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "partition.json"
    path.write_text("old")
    p = partition_examples(["a", "b"] * 6, PartitionSpec("dirichlet", num_clients=3, alpha=2.0, seed=1))
    write_partition_manifest(path, p)
    back = read_partition_manifest(path)
    assert back == p and back.clients[0][0] == Share(p.clients[0][0].task, p.clients[0][0].indices)
