"""Each virtual client's data from the run config: partitions of the embedded suite, of one JSONL
file, and one file per client; the server's evaluation sets; the centralised baseline."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedlora.core.client_data import build_partition, client_examples, client_train_sizes, server_eval_sets
from fedlora.core.config import FederationConfig, PartitionSection
from fedlora.core.tasks import get_task

TASKS = "adddigit-4,rotate-2,repeat-3,sort-desc"


def _task_of(prompt: str) -> str:
    return prompt.split(":", 1)[0]


def test_embedded_split_is_disjoint_covering_and_reproducible() -> None:
    cfg = FederationConfig(
        num_clients=6, num_train=50, num_test=20, tasks=TASKS, partition=PartitionSection(scheme="dirichlet")
    )
    split = build_partition(cfg)
    assert split is not None
    # every index of every task pool exactly once
    for task in cfg.task_list:
        idx = [i for shares in split.clients for s in shares if s.task == task for i in s.indices]
        assert sorted(idx) == list(range(split.spec.examples_per_task))
    # mean client size is num-train
    assert sum(client_train_sizes(cfg)) == 6 * 50
    train, test = client_examples(cfg, 2)
    assert len(train) == split.client_size(2) and len(test) == 20
    # a client's tests follow its own task mix (tags name the task when tagged)
    mix = {s.task: s.count for s in split.clients[2]}
    test_tasks = Counter(get_task_by_tag(_task_of(e.prompt)) for e in test)
    assert set(test_tasks) <= set(mix)
    # reproducible in a fresh computation, different for another seed
    build_partition.__globals__["_embedded_partition"].cache_clear()
    assert client_examples(cfg, 2) == (train, test)
    other = FederationConfig(**{**cfg.__dict__, "seed": 1})
    assert client_examples(other, 2)[0] != train


def get_task_by_tag(tag: str) -> str:
    names = [t for t in TASKS.split(",") if get_task(t).tag == tag]
    assert len(names) == 1, tag
    return names[0]


def test_one_task_per_client_gives_each_client_one_task() -> None:
    cfg = FederationConfig(num_clients=4, num_train=30, num_test=10, tasks=TASKS)
    for p in range(4):
        train, test = client_examples(cfg, p)
        assert len({_task_of(e.prompt) for e in train}) == 1
        assert {_task_of(e.prompt) for e in test} == {_task_of(e.prompt) for e in train}


def test_a_split_that_leaves_a_client_without_a_task_is_refused() -> None:
    with pytest.raises(ValueError, match="cover only 2 of 4 tasks"):
        FederationConfig(num_clients=2, tasks=TASKS)
    with pytest.raises(ValueError, match="unknown partition scheme 'zipf'"):
        FederationConfig(partition=PartitionSection(scheme="zipf"))


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_one_jsonl_file_is_split_by_task_labels(tmp_path: Path) -> None:
    records = [{"prompt": f"{t}{i}:", "completion": str(i), "task": t} for t in "abc" for i in range(40)]
    path = _write_jsonl(tmp_path / "all.jsonl", records)
    cfg = FederationConfig(
        num_clients=3, data_path=str(path), partition=PartitionSection(scheme="tasks-per-client"), num_test=4
    )
    seen: list[str] = []
    for p in range(3):
        train, test = client_examples(cfg, p)
        assert len(train) == 36 and len(test) == 4  # 10% held out, at most num-test
        assert len({e.prompt[0] for e in train + test}) == 1  # one label per client
        seen += [e.prompt for e in train + test]
    assert sorted(seen) == sorted(r["prompt"] for r in records)
    assert client_train_sizes(cfg) == [36, 36, 36]
    assert server_eval_sets(cfg) == {}
    # without labels only IID makes sense: refused with the reason
    plain = _write_jsonl(tmp_path / "plain.jsonl", [{"prompt": f"{i}:", "completion": "x"} for i in range(30)])
    with pytest.raises(ValueError, match="'task' key"):
        build_partition(
            FederationConfig(num_clients=3, data_path=str(plain), partition=PartitionSection(scheme="dirichlet"))
        )


def test_a_directory_gives_one_file_per_client(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    d.mkdir()
    for p in range(2):
        _write_jsonl(d / f"client-{p}.jsonl", [{"prompt": f"{p}-{i}:", "completion": "y"} for i in range(20)])
    cfg = FederationConfig(num_clients=2, data_path=str(d), num_test=100)
    train, test = client_examples(cfg, 1)
    assert {e.prompt.split("-")[0] for e in train + test} == {"1"} and len(test) == 2
    with pytest.raises(ValueError, match=r"holds 2 \.jsonl file"):
        FederationConfig(num_clients=3, data_path=str(d))
    (d / "client-1.jsonl").write_text('{"prompt": "a:", "completion": "b"}\nnot json\n')
    with pytest.raises(ValueError, match=r"client-1.jsonl:2: not valid JSON"):
        client_examples(cfg, 1)


def test_server_eval_sets_are_fresh_per_task() -> None:
    cfg = FederationConfig(num_clients=4, num_train=30, num_test=25, tasks=TASKS)
    sets = server_eval_sets(cfg)
    assert list(sets) == cfg.task_list and all(len(v) == 25 for v in sets.values())
    train = {e.prompt for p in range(4) for e in client_examples(cfg, p)[0]}
    assert not train & {e.prompt for v in sets.values() for e in v}
    assert server_eval_sets(FederationConfig(server_eval=False)) == {}


def test_no_test_or_server_eval_prompt_is_in_the_training_pool() -> None:
    # small input spaces (4-8 digits) make collisions likely without the filter: 5 of 800 were found
    cfg = FederationConfig(
        num_clients=8, num_train=1000, num_test=100, tasks=TASKS, partition=PartitionSection(tasks_per_client=2)
    )
    split = build_partition(cfg)
    assert split is not None
    pool = {e.prompt for p in range(8) for e in client_examples(cfg, p)[0]}
    tests = [e.prompt for p in range(8) for e in client_examples(cfg, p)[1]]
    assert len(tests) == 800 and not pool & set(tests)
    assert not pool & {e.prompt for v in server_eval_sets(cfg).values() for e in v}
