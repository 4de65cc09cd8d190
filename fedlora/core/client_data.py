"""Each virtual client's examples, from the run config: the one place both apps and ``fl-sim`` ask.

Three sources, chosen by ``data-path``:

- empty: the embedded suite, split by :mod:`fedlora.core.partitioners` (IID, Dirichlet over
  tasks, k tasks per client, optional size skew); a client's test examples follow its own
  mix of tasks, so its evaluation measures what it cares about;
- a JSONL file: its records split the same way, by their optional ``task`` label, then each
  client's share split into train and test (``num-test`` records, at most 10% of the share);
- a directory of JSONL files: client p takes the p-th file by name (its own data, as in
  deployment).

Everything is a pure function of the config and cached per process, so the server, every
simulation worker and ``fl-sim`` compute the same split without exchanging it; the server
writes it to the run directory for the record.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from fedlora.core.config import FederationConfig
from fedlora.core.data import load_jsonl, read_jsonl, split_train_test
from fedlora.core.partitioners import (
    Partition,
    PartitionSpec,
    embedded_pool,
    largest_remainder,
    partition_examples,
    partition_tasks,
)
from fedlora.core.tasks import Example, get_task

#: seed offset of the server's per-task evaluation sets (disjoint from every client's test seed)
SERVER_EVAL_SEED = 7_777_777


@functools.lru_cache(maxsize=4)
def _embedded_partition(spec: PartitionSpec) -> Partition:
    return partition_tasks(spec)


@functools.lru_cache(maxsize=2)
def _file_partition(path: str, mtime_ns: int, spec: PartitionSpec) -> tuple[tuple[Example, ...], Partition]:
    del mtime_ns  # part of the cache key only: an edited file is read again
    records = read_jsonl(path)
    labels = [task or "data" for _, task in records]
    if spec.scheme != "iid" and len(set(labels)) == 1:
        raise ValueError(
            f"partition.scheme = {spec.scheme!r} splits {path} by its records' 'task' labels, but every record "
            "has the same label (or none): add a 'task' key to the records or use partition.scheme = 'iid'"
        )
    return tuple(ex for ex, _ in records), partition_examples(labels, spec)


@functools.lru_cache(maxsize=64)
def _pool_prompts(task: str, spec: PartitionSpec, tagged: bool) -> frozenset[str]:
    return frozenset(e.prompt for e in embedded_pool(task, spec, tagged))


def fresh_tests(task: str, n: int, seed: int, cfg: FederationConfig) -> list[Example]:
    """``n`` test examples of an embedded task whose prompts no client trains on (the task's test
    stream only avoids its own seed's training stream, not the pool's)."""
    seen = _pool_prompts(task, cfg.partition_spec(), cfg.tagged) if task in cfg.task_list else frozenset()
    drawn = get_task(task).examples(2 * n + 16, seed, "test", cfg.tagged)
    return [e for e in drawn if e.prompt not in seen][:n]


def build_partition(cfg: FederationConfig) -> Partition | None:
    """The run's split of the pool among clients; None when each client brings its own file."""
    if cfg.data_path and Path(cfg.data_path).is_dir():
        return None
    spec = cfg.partition_spec()
    if not cfg.data_path:
        return _embedded_partition(spec)
    return _file_partition(cfg.data_path, Path(cfg.data_path).stat().st_mtime_ns, spec)[1]


def client_examples(cfg: FederationConfig, partition: int) -> tuple[list[Example], list[Example]]:
    """(train, test) examples of virtual client ``partition``."""
    if not 0 <= partition < cfg.num_clients:
        raise ValueError(f"partition-id {partition} out of range: the run has num-clients = {cfg.num_clients}")
    client_seed = cfg.seed * 100_003 + partition
    if cfg.data_path and Path(cfg.data_path).is_dir():
        return split_train_test(load_jsonl(cfg.client_files()[partition]), cfg.num_test, client_seed)
    split = build_partition(cfg)
    assert split is not None
    if cfg.data_path:
        records = _file_partition(cfg.data_path, Path(cfg.data_path).stat().st_mtime_ns, cfg.partition_spec())[0]
        return split_train_test(split.client_examples(partition, records), cfg.num_test, client_seed)
    train = split.client_examples(partition, tagged=cfg.tagged)
    shares = split.clients[partition]
    counts = largest_remainder(cfg.num_test, np.array([s.count for s in shares], dtype=np.float64))
    test: list[Example] = []
    for share, n in zip(shares, counts, strict=True):
        test.extend(fresh_tests(share.task, int(n), client_seed, cfg))
    return train, test


def server_eval_sets(cfg: FederationConfig) -> dict[str, list[Example]]:
    """Per task of the embedded pool, ``num-test`` fresh test examples for the server's own
    evaluation of the global adapter (before training and after every round); none for user data."""
    if cfg.data_path or not cfg.server_eval:
        return {}
    seed = cfg.seed * 100_003 + SERVER_EVAL_SEED
    return {t: fresh_tests(t, cfg.num_test, seed, cfg) for t in cfg.task_list}


def client_train_sizes(cfg: FederationConfig) -> list[int]:
    """Every client's number of training examples, without building their datasets."""
    if cfg.data_path and Path(cfg.data_path).is_dir():
        return [len(client_examples(cfg, p)[0]) for p in range(cfg.num_clients)]
    split = build_partition(cfg)
    assert split is not None
    sizes = [split.client_size(p) for p in range(cfg.num_clients)]
    return sizes if not cfg.data_path else [n - min(cfg.num_test, n // 10) for n in sizes]


EMBEDDED_PREFIX = "embedded:"


def _embedded_tasks(spec: str) -> list[str]:
    """The tasks of ``embedded:TASK[,TASK...]``, each one known (unknown names raise, listing the known)."""
    tasks = [t.strip() for t in spec.removeprefix(EMBEDDED_PREFIX).split(",") if t.strip()]
    if not tasks:
        raise ValueError(f"--data {spec!r} names no task: use embedded:TASK[,TASK...]")
    for task in tasks:
        get_task(task)
    return tasks


def check_node_data(spec: str) -> None:
    """Refuse a node's ``--data`` that cannot work, before its SuperNode starts: a JSONL file of
    prompt/completion records, or ``embedded:TASK[,TASK...]`` (examples generated on the node)."""
    if spec.startswith(EMBEDDED_PREFIX):
        _embedded_tasks(spec)
        return
    records = load_jsonl(spec)  # raises naming the file and line
    if len(records) < 2:
        raise ValueError(f"data file {spec} holds {len(records)} record(s); a client needs at least 2")


def node_examples(cfg: FederationConfig, spec: str, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, test) examples of a deployed node: its own JSONL file split by :func:`split_train_test`,
    or for ``embedded:TASKS`` ``num-train`` examples spread over the tasks and ``num-test`` test
    examples drawn from the tasks' test streams, seeded by the node so nodes differ."""
    if not spec.startswith(EMBEDDED_PREFIX):
        return split_train_test(load_jsonl(spec), cfg.num_test, seed)
    tasks = _embedded_tasks(spec)
    even = np.ones(len(tasks), dtype=np.float64)
    train: list[Example] = []
    test: list[Example] = []
    for task, n_train, n_test in zip(
        tasks, largest_remainder(cfg.num_train, even), largest_remainder(cfg.num_test, even), strict=True
    ):
        train.extend(get_task(task).examples(int(n_train), seed, "train", cfg.tagged))
        test.extend(get_task(task).examples(int(n_test), seed, "test", cfg.tagged))
    return train, test
