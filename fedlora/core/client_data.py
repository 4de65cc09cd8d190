"""Each virtual client's examples, from the run config: the one place both apps and ``fl-sim`` ask.

Three sources, chosen by ``data-path``:

- empty: the embedded suite, split by :mod:`fedlora.core.partitioners` (IID, Dirichlet over
  tasks, k tasks per client, optional size skew); a client's test examples follow its own
  mix of tasks, so its evaluation measures what it cares about;
- a data file (JSONL, JSON, CSV, Parquet, or a ``datasets.save_to_disk`` directory, read by
  :mod:`fedlora.core.data_files` with the run's ``columns.*``): its records split the same way, by
  their ``task`` column, else by a classifier's class label, then each client's share split
  into train and test (``num-test`` records, at most 10% of the share);
- a directory of JSONL files: client p takes the p-th file by name (its own data, as in
  deployment).

A classifier's label space (:func:`run_labels`) is ``model.labels``, else the tasks' labels, else
every label of the data, so every party builds the same head.

Everything is a pure function of the config and cached per process, so the server, every
simulation worker and ``fl-sim`` compute the same split without exchanging it; the server
writes it to the run directory for the record.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from fedlora.core.config import ColumnsSection, FederationConfig, is_client_dir
from fedlora.core.data import split_train_test
from fedlora.core.data_files import Columns, label_names, read_records
from fedlora.core.kinds import KINDS, get_kind
from fedlora.core.partitioners import (
    Partition,
    PartitionSpec,
    embedded_pool,
    largest_remainder,
    partition_examples,
    partition_tasks,
)
from fedlora.core.records import Record, label_of
from fedlora.core.tasks import any_task

#: seed offset of the server's per-task evaluation sets (disjoint from every client's test seed)
SERVER_EVAL_SEED = 7_777_777


@functools.lru_cache(maxsize=4)
def _embedded_partition(spec: PartitionSpec) -> Partition:
    return partition_tasks(spec)


def _columns(section: ColumnsSection) -> Columns:
    return Columns(**{k: v or None for k, v in vars(section).items()})


def _mtime(path: str) -> int:
    """A data source's modification time: an edited file (or a rewritten dataset folder) is read again."""
    p = Path(path)
    return (
        max([p.stat().st_mtime_ns, *(f.stat().st_mtime_ns for f in p.iterdir())])
        if p.is_dir()
        else p.stat().st_mtime_ns
    )


@functools.lru_cache(maxsize=4)
def _records(path: str, mtime_ns: int, kind: str, columns: ColumnsSection) -> tuple[tuple[Record, str | None], ...]:
    del mtime_ns  # part of the cache key only
    return tuple(read_records(path, kind, _columns(columns)))


def file_records(cfg: FederationConfig, path: str) -> tuple[tuple[Record, str | None], ...]:
    """A data file's records with their task labels, read once per process."""
    return _records(path, _mtime(path), cfg.model.kind, cfg.columns)


@functools.lru_cache(maxsize=2)
def _file_partition(
    path: str, mtime_ns: int, kind: str, columns: ColumnsSection, spec: PartitionSpec
) -> tuple[tuple[Record, ...], Partition]:
    records = _records(path, mtime_ns, kind, columns)
    labels = [task or label_of(r) or "data" for r, task in records]
    if spec.scheme != "iid" and len(set(labels)) == 1:
        raise ValueError(
            f"partition.scheme = {spec.scheme!r} splits {path} by its records' task (or class) labels, but every "
            "record has the same label (or none): add a 'task' key or column to the records (columns.task names "
            "another) or use partition.scheme = 'iid'"
        )
    return tuple(r for r, _ in records), partition_examples(labels, spec)


def _split_file(cfg: FederationConfig) -> tuple[tuple[Record, ...], Partition]:
    assert cfg.data_path
    return _file_partition(cfg.data_path, _mtime(cfg.data_path), cfg.model.kind, cfg.columns, cfg.partition_spec())


@functools.lru_cache(maxsize=64)
def _pool_prompts(task: str, spec: PartitionSpec, tagged: bool) -> frozenset[str]:
    return frozenset(e.key for e in embedded_pool(task, spec, tagged))


def fresh_tests(task: str, n: int, seed: int, cfg: FederationConfig) -> list[Record]:
    """``n`` test examples of an embedded task whose inputs no client trains on (the task's test
    stream only avoids its own seed's training stream, not the pool's)."""
    seen = _pool_prompts(task, cfg.partition_spec(), cfg.tagged) if task in cfg.task_list else frozenset()
    drawn = any_task(task).examples(2 * n + 16, seed, "test", cfg.tagged)
    return [e for e in drawn if e.key not in seen][:n]


def build_partition(cfg: FederationConfig) -> Partition | None:
    """The run's split of the pool among clients; None when each client brings its own file."""
    if cfg.data_path and is_client_dir(cfg.data_path):
        return None
    spec = cfg.partition_spec()
    if not cfg.data_path:
        return _embedded_partition(spec)
    return _split_file(cfg)[1]


def client_examples(cfg: FederationConfig, partition: int) -> tuple[list[Record], list[Record]]:
    """(train, test) examples of virtual client ``partition``."""
    if not 0 <= partition < cfg.num_clients:
        raise ValueError(f"partition-id {partition} out of range: the run has num-clients = {cfg.num_clients}")
    client_seed = cfg.seed * 100_003 + partition
    if cfg.data_path and is_client_dir(cfg.data_path):
        own = [r for r, _ in file_records(cfg, str(cfg.client_files()[partition]))]
        return split_train_test(own, cfg.num_test, client_seed)
    split = build_partition(cfg)
    assert split is not None
    if cfg.data_path:
        records = _split_file(cfg)[0]
        return split_train_test(split.client_examples(partition, records), cfg.num_test, client_seed)
    train = split.client_examples(partition, tagged=cfg.tagged)
    shares = split.clients[partition]
    counts = largest_remainder(cfg.num_test, np.array([s.count for s in shares], dtype=np.float64))
    test: list[Record] = []
    for share, n in zip(shares, counts, strict=True):
        test.extend(fresh_tests(share.task, int(n), client_seed, cfg))
    return train, test


def server_eval_sets(cfg: FederationConfig) -> dict[str, list[Record]]:
    """Per task of the embedded pool, ``num-test`` fresh test examples for the server's own
    evaluation of the global adapter (before training and after every round); none for user data."""
    if cfg.data_path or not cfg.server_eval:
        return {}
    seed = cfg.seed * 100_003 + SERVER_EVAL_SEED
    return {t: fresh_tests(t, cfg.num_test, seed, cfg) for t in cfg.task_list}


def client_train_sizes(cfg: FederationConfig) -> list[int]:
    """Every client's number of training examples, without building their datasets."""
    if cfg.data_path and is_client_dir(cfg.data_path):
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
        any_task(task)
    return tasks


def check_node_data(spec: str) -> None:
    """Refuse a node's ``--data`` that cannot work, before its SuperNode starts: ``embedded:TASK[,TASK...]``
    (examples generated on the node), or a data file (JSONL, JSON, CSV, Parquet, a saved dataset) whose
    records some model kind reads with the usual column names. Which kind the run trains is the
    server's to say; a file none can read is refused with the causal-LM reader's reason."""
    if spec.startswith(EMBEDDED_PREFIX):
        _embedded_tasks(spec)
        return
    first: ValueError | None = None
    for kind in KINDS:
        try:
            records = read_records(spec, kind)  # raises naming the file and line
        except ValueError as err:
            first = first or err
            continue
        if len(records) < 2:
            raise ValueError(f"data file {spec} holds {len(records)} record(s); a client needs at least 2")
        return
    assert first is not None
    raise first


def node_examples(cfg: FederationConfig, spec: str, seed: int) -> tuple[list[Record], list[Record]]:
    """(train, test) examples of a deployed node: its own JSONL file split by :func:`split_train_test`,
    or for ``embedded:TASKS`` ``num-train`` examples spread over the tasks and ``num-test`` test
    examples drawn from the tasks' test streams, seeded by the node so nodes differ."""
    if not spec.startswith(EMBEDDED_PREFIX):
        return split_train_test([r for r, _ in file_records(cfg, spec)], cfg.num_test, seed)
    tasks = _embedded_tasks(spec)
    even = np.ones(len(tasks), dtype=np.float64)
    train: list[Record] = []
    test: list[Record] = []
    for task, n_train, n_test in zip(
        tasks, largest_remainder(cfg.num_train, even), largest_remainder(cfg.num_test, even), strict=True
    ):
        train.extend(any_task(task).examples(int(n_train), seed, "train", cfg.tagged))
        test.extend(any_task(task).examples(int(n_test), seed, "test", cfg.tagged))
    return train, test


def run_labels(cfg: FederationConfig) -> tuple[str, ...]:
    """A classifier's label space, the same for every party: ``model.labels``, else the ordered
    union of the embedded tasks' labels, else every label of the data file(s); () for causal LMs."""
    if not get_kind(cfg.model.kind).classifier:
        return ()
    if cfg.model.labels:
        return tuple(t.strip() for t in cfg.model.labels.split(",") if t.strip())
    if not cfg.data_path:
        out: list[str] = []
        for task in cfg.task_list:
            out.extend(label for label in getattr(any_task(task), "labels", ()) if label not in out)
        return tuple(out)
    if is_client_dir(cfg.data_path):
        return label_names([rec for f in cfg.client_files() for rec in file_records(cfg, str(f))])
    return label_names(file_records(cfg, cfg.data_path))
