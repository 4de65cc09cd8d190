"""Partitioners: how a pool of examples is split among virtual clients.

A partition is the experimental variable of a federated comparison ("one task per client",
"Dirichlet(0.1) over tasks"), so it must be exactly reproducible from its spec and its seed,
and it is written to the run directory next to the results it produced.

Two pools exist:

- the embedded suite: ``examples_per_task`` training examples of each task in ``spec.tasks``,
  each task's pool drawn *once* (``Task.examples(examples_per_task, seed)``) and sliced into
  disjoint index ranges per client (:func:`partition_tasks`);
- an arbitrary list of examples with one label each, e.g. a user's JSONL file split by us,
  labelled by task or all with the same label (:func:`partition_examples`).

Both go through the same index partitioner (:func:`partition_indices`): a scheme maps the
labels of the pool to one list of pool indices per client. Schemes live in the plain-dict
registry :data:`SCHEMES`:

- ``iid``: shuffle the whole pool and deal it out;
- ``dirichlet``: for each label, client proportions ~ Dir(alpha), the classic label-skew split
  (small alpha: each client sees few tasks; large alpha: close to IID);
- ``tasks-per-client``: each client holds exactly ``tasks_per_client`` distinct labels, and each
  label's pool is split among the clients holding it.

Unequal client sizes are orthogonal to the scheme: ``size_skew > 0`` draws one lognormal(0,
size_skew) weight per client and every scheme allocates in proportion to it.

Everything here is pure and seeded from ``spec.seed`` (``numpy.random.Generator``; no global
RNG) except :func:`write_partition_manifest` / :func:`read_partition_manifest`.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlora.atomic import write_atomic
from fedlora.core.records import Record
from fedlora.core.tasks import any_task, known_tasks

# A Dirichlet draw that leaves a client empty is redrawn up to this many times before giving up.
MAX_RESAMPLES = 100
MANIFEST_FORMAT = 1

SchemeFn = Callable[[Sequence[str], "PartitionSpec", np.random.Generator], list[list[int]]]
"""A scheme: (label of each pool example, spec, rng) -> pool indices per client."""


# --------------------------------------------------------------------------------------------
# Spec


@dataclass(frozen=True)
class PartitionSpec:
    """What to split and how; validated once here so a bad split fails before any training.

    Parameters
    ----------
    scheme
        A name registered in :data:`SCHEMES` (``iid``, ``dirichlet``, ``tasks-per-client``).
    num_clients
        Number of virtual clients; every one gets at least one example.
    alpha
        Dirichlet concentration (``dirichlet`` only); smaller means more skew.
    tasks_per_client
        Distinct tasks per client (``tasks-per-client`` only).
    size_skew
        Sigma of the lognormal client-size weights; 0 gives equal sizes (up to rounding).
    seed
        Seeds both the embedded pool and the split.
    tasks
        Embedded task names making up the pool; empty when splitting a user's examples.
    examples_per_task
        Size of each embedded task's training pool.
    """

    scheme: str = "iid"
    num_clients: int = 4
    alpha: float = 0.5
    tasks_per_client: int = 1
    size_skew: float = 0.0
    seed: int = 0
    tasks: tuple[str, ...] = ()
    examples_per_task: int = 64

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown partition scheme {self.scheme!r}; known schemes: {', '.join(SCHEMES)}")
        if isinstance(self.num_clients, bool) or not isinstance(self.num_clients, int) or self.num_clients < 1:
            raise ValueError(f"num_clients must be an integer >= 1, got {self.num_clients!r}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got {self.alpha!r}")
        if not isinstance(self.tasks_per_client, int) or self.tasks_per_client < 1:
            raise ValueError(f"tasks_per_client must be an integer >= 1, got {self.tasks_per_client!r}")
        if not (isinstance(self.size_skew, int | float) and math.isfinite(self.size_skew) and self.size_skew >= 0):
            raise ValueError(f"size_skew must be a finite number >= 0 (0 = equal sizes), got {self.size_skew!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.examples_per_task, int) or self.examples_per_task < 1:
            raise ValueError(f"examples_per_task must be an integer >= 1, got {self.examples_per_task!r}")
        # Accept a list from a run config, keep a tuple so the spec stays hashable.
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if len(set(self.tasks)) != len(self.tasks):
            dupes = sorted({t for t in self.tasks if self.tasks.count(t) > 1})
            raise ValueError(f"tasks must be distinct; repeated: {', '.join(dupes)}")
        unknown = [t for t in self.tasks if t not in known_tasks()]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; known tasks: {', '.join(known_tasks())}")
        if self.tasks:
            check_feasible(self, [self.examples_per_task] * len(self.tasks))


def check_feasible(spec: PartitionSpec, group_sizes: Sequence[int]) -> None:
    """Refuse, with a message, a spec that cannot give every client at least one example.

    ``group_sizes`` are the pool sizes per label (task), in label order.
    """
    total = sum(group_sizes)
    c, k, n_labels = spec.num_clients, spec.tasks_per_client, len(group_sizes)
    if c > total:
        raise ValueError(
            f"{c} clients but only {total} examples in the pool: a client would be empty; "
            "use fewer clients or more examples"
        )
    if spec.scheme != "tasks-per-client":
        return
    if k > n_labels:
        raise ValueError(f"tasks_per_client={k} but the pool has only {n_labels} task(s)")
    if c * k < n_labels:
        raise ValueError(
            f"tasks-per-client: {c} clients x {k} task(s) each cover only {c * k} of {n_labels} tasks, "
            "so part of the pool would be unassigned; use fewer tasks, more clients or a larger tasks_per_client"
        )
    holders = _holders_per_slot(c, k, n_labels)
    smallest = min(group_sizes)
    if max(holders) > smallest:
        raise ValueError(
            f"tasks-per-client: up to {max(holders)} clients share one task but a task has only {smallest} "
            "example(s), so a client would get none of it; use more examples per task or fewer clients"
        )


# --------------------------------------------------------------------------------------------
# Allocation helpers (pure)


def largest_remainder(total: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing exactly to ``total``, proportional to ``weights``.

    Hamilton's method: floor the quotas, then hand the leftover units to the largest
    fractional parts (ties to the lower index), so rounding never loses or invents examples.
    """
    w = np.asarray(weights, dtype=np.float64)
    if total < 0 or w.ndim != 1 or len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"cannot allocate {total} over weights {w!r}")
    quotas = total * w / w.sum()
    counts = np.floor(quotas).astype(np.int64)
    left = total - int(counts.sum())
    order = np.argsort(-(quotas - counts), kind="stable")
    counts[order[:left]] += 1
    return counts


def client_weights(spec: PartitionSpec, rng: np.random.Generator) -> np.ndarray:
    """Relative client sizes: all ones, or lognormal(0, size_skew) when sizes should differ."""
    if spec.size_skew == 0:
        return np.ones(spec.num_clients)
    return rng.lognormal(mean=0.0, sigma=spec.size_skew, size=spec.num_clients)


def _groups(labels: Sequence[str]) -> dict[str, list[int]]:
    """Pool indices per label, labels in order of first appearance (deterministic)."""
    out: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        out.setdefault(label, []).append(i)
    return out


def _holders_per_slot(num_clients: int, k: int, n_labels: int) -> list[int]:
    """How many clients hold the label at each position of the round-robin deal."""
    holders = [0] * n_labels
    for c in range(num_clients):
        for j in range(k):
            holders[(c * k + j) % n_labels] += 1
    return holders


def _deal(indices: Sequence[int], counts: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle ``indices`` and cut them into consecutive runs of ``counts``: disjoint by construction."""
    shuffled = rng.permutation(np.asarray(indices, dtype=np.int64))
    bounds = np.cumsum(counts)[:-1]
    return [part.tolist() for part in np.split(shuffled, bounds)]


# --------------------------------------------------------------------------------------------
# Schemes


def iid(labels: Sequence[str], spec: PartitionSpec, rng: np.random.Generator) -> list[list[int]]:
    """Shuffle the whole pool and deal it out; every client gets >= 1 example."""
    n, c = len(labels), spec.num_clients
    weights = client_weights(spec, rng)
    sizes = 1 + largest_remainder(n - c, weights)  # the "1 +" is the non-empty guarantee
    return _deal(range(n), sizes, rng)


def dirichlet(labels: Sequence[str], spec: PartitionSpec, rng: np.random.Generator) -> list[list[int]]:
    """Per task, client proportions ~ Dir(alpha) (times the client size weights).

    A draw that leaves some client with no example at all is redrawn, up to MAX_RESAMPLES times;
    then a ValueError names alpha, the number of clients and the pool size.
    """
    weights = client_weights(spec, rng)
    groups = list(_groups(labels).values())
    for _ in range(MAX_RESAMPLES):
        per_client = _dirichlet_draw(groups, spec.num_clients, spec.alpha, weights, rng)
        if per_client is not None and all(per_client):
            return per_client
    raise ValueError(
        f"dirichlet(alpha={spec.alpha}) left at least one of {spec.num_clients} clients empty in "
        f"{MAX_RESAMPLES} draws over {len(labels)} examples in {len(groups)} task(s); "
        "raise alpha, use fewer clients or more examples per task"
    )


def _dirichlet_draw(
    groups: Sequence[Sequence[int]], num_clients: int, alpha: float, weights: np.ndarray, rng: np.random.Generator
) -> list[list[int]] | None:
    """One draw of the classic label-skew split; None when a proportion vector degenerates."""
    per_client: list[list[int]] = [[] for _ in range(num_clients)]
    for idx in groups:
        p = rng.dirichlet(np.full(num_clients, alpha)) * weights  # (num_clients,)
        if not np.all(np.isfinite(p)) or p.sum() <= 0:  # tiny alpha can underflow every component
            return None
        for client, part in enumerate(_deal(idx, largest_remainder(len(idx), p), rng)):
            per_client[client].extend(part)
    return per_client


def tasks_per_client(labels: Sequence[str], spec: PartitionSpec, rng: np.random.Generator) -> list[list[int]]:
    """Each client holds exactly k distinct tasks; each task's pool is split among its holders.

    Tasks are shuffled once (seeded) and dealt round-robin, k consecutive ones per client, so
    every task is held by ceil or floor of C*k/T clients and all tasks are covered.
    """
    c, k = spec.num_clients, spec.tasks_per_client
    groups = list(_groups(labels).values())
    check_feasible(spec, [len(g) for g in groups])
    weights = client_weights(spec, rng)
    order = rng.permutation(len(groups))
    holders: list[list[int]] = [[] for _ in groups]
    for client in range(c):
        for j in range(k):
            holders[int(order[(client * k + j) % len(groups)])].append(client)
    per_client: list[list[int]] = [[] for _ in range(c)]
    for idx, held_by in zip(groups, holders, strict=True):
        counts = 1 + largest_remainder(len(idx) - len(held_by), weights[held_by])
        for client, part in zip(held_by, _deal(idx, counts, rng), strict=True):
            per_client[client].extend(part)
    return per_client


SCHEMES: dict[str, SchemeFn] = {}


def register(name: str, fn: SchemeFn) -> None:
    """Add a scheme; a duplicate name is refused rather than silently replacing one."""
    if name in SCHEMES:
        raise ValueError(f"partition scheme {name!r} is already registered; known schemes: {', '.join(SCHEMES)}")
    SCHEMES[name] = fn


def create(name: str) -> SchemeFn:
    """The scheme called ``name``; raises with the known names when it does not exist."""
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"unknown partition scheme {name!r}; known schemes: {', '.join(SCHEMES)}") from None


register("iid", iid)
register("dirichlet", dirichlet)
register("tasks-per-client", tasks_per_client)


# --------------------------------------------------------------------------------------------
# Partitions


@dataclass(frozen=True)
class Share:
    """A client's slice of one task's pool: sorted indices into that pool."""

    task: str
    indices: tuple[int, ...]

    @property
    def count(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Partition:
    """Who holds what: per client, a tuple of :class:`Share` (one per task it holds).

    ``source`` says what the indices point into: ``"embedded"`` (each task's own pool of
    ``spec.examples_per_task`` examples) or ``"examples"`` (positions in the caller's list).
    """

    spec: PartitionSpec
    source: str
    clients: tuple[tuple[Share, ...], ...] = field(repr=False)

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def client_size(self, client: int) -> int:
        return sum(s.count for s in self.clients[client])

    def client_examples(
        self, client: int, examples: Sequence[Record] | None = None, tagged: bool = False
    ) -> list[Record]:
        """Materialise a client's training examples.

        ``examples`` is the list that was partitioned (required for ``source="examples"``,
        refused for ``"embedded"``, whose pools are redrawn from the tasks and the seed).
        """
        if not 0 <= client < self.num_clients:
            raise IndexError(f"client {client} out of range; the partition has {self.num_clients} clients")
        shares = self.clients[client]
        if self.source == "examples":
            if examples is None:
                raise ValueError("this partition indexes a caller's example list: pass it as `examples`")
            return [examples[i] for s in shares for i in s.indices]
        if examples is not None:
            raise ValueError("an embedded partition draws its own examples; do not pass `examples`")
        out: list[Record] = []
        for s in shares:
            pool = embedded_pool(s.task, self.spec, tagged=tagged)
            out.extend(pool[i] for i in s.indices)
        return out

    def summary(self) -> dict[str, Any]:
        """Per-client counts per task, for the manifest and for a human reading the run directory."""
        counts = [{s.task: s.count for s in shares} for shares in self.clients]
        sizes = [sum(c.values()) for c in counts]
        return {
            "scheme": self.spec.scheme,
            "source": self.source,
            "num_clients": self.num_clients,
            "total_examples": sum(sizes),
            "client_sizes": sizes,
            "client_task_counts": counts,
        }


@functools.lru_cache(maxsize=64)
def embedded_pool(task: str, spec: PartitionSpec, tagged: bool = False) -> list[Record]:
    """The one training pool of an embedded task that every client's share indexes into.

    Cached: a simulation worker serves many clients of one split. Callers must not mutate it."""
    return list(any_task(task).examples(spec.examples_per_task, seed=spec.seed, split="train", tagged=tagged))


def partition_indices(labels: Sequence[str], spec: PartitionSpec) -> list[list[int]]:
    """Split a pool given by its labels: sorted pool indices per client, disjoint and covering.

    The invariants (every index exactly once, no empty client) are checked here for every scheme,
    so a new scheme cannot silently break them.
    """
    groups = _groups(labels)
    check_feasible(spec, [len(g) for g in groups.values()])
    rng = np.random.default_rng(spec.seed)
    per_client = [sorted(part) for part in create(spec.scheme)(labels, spec, rng)]
    if len(per_client) != spec.num_clients:
        raise AssertionError(f"scheme {spec.scheme} returned {len(per_client)} clients, expected {spec.num_clients}")
    flat = [i for part in per_client for i in part]
    if len(flat) != len(labels) or set(flat) != set(range(len(labels))):
        raise AssertionError(f"scheme {spec.scheme} did not assign every pool index exactly once")
    empty = [c for c, part in enumerate(per_client) if not part]
    if empty:
        raise ValueError(f"partition {spec.scheme} leaves client(s) {empty} empty; use fewer clients or more examples")
    return per_client


def _to_partition(labels: Sequence[str], per_client: list[list[int]], spec: PartitionSpec, source: str) -> Partition:
    """Group each client's pool indices into per-task shares (tasks in order of first appearance)."""
    order = {label: i for i, label in enumerate(_groups(labels))}
    clients = []
    for part in per_client:
        by_task: dict[str, list[int]] = {}
        for i in part:
            by_task.setdefault(labels[i], []).append(i)
        clients.append(tuple(Share(t, tuple(ix)) for t, ix in sorted(by_task.items(), key=lambda kv: order[kv[0]])))
    return Partition(spec=spec, source=source, clients=tuple(clients))


def partition_tasks(spec: PartitionSpec) -> Partition:
    """Split the embedded suite: ``spec.examples_per_task`` examples of each of ``spec.tasks``.

    Share indices are positions in each task's pool (:func:`embedded_pool`), so client c's
    examples of task t are ``embedded_pool(t, spec)[i]`` for i in its share: disjoint by index.
    """
    if not spec.tasks:
        raise ValueError("partition_tasks needs spec.tasks (the embedded tasks making up the pool)")
    n = spec.examples_per_task
    labels = [t for t in spec.tasks for _ in range(n)]
    partition = _to_partition(labels, partition_indices(labels, spec), spec, source="embedded")
    # Global index g of the concatenated pool is example g % n of its task's own pool.
    clients = tuple(
        tuple(Share(s.task, tuple(g % n for g in s.indices)) for s in shares) for shares in partition.clients
    )
    return Partition(spec=spec, source="embedded", clients=clients)


def partition_examples(labels: Sequence[str], spec: PartitionSpec) -> Partition:
    """Split a caller's example list (e.g. one JSONL file) by index.

    ``labels[i]`` is the group of example i (its task, or one constant label for plain IID);
    ``dirichlet`` and ``tasks-per-client`` skew over these labels. Share indices are positions
    in the caller's list; ``spec.tasks`` must be empty since the labels define the pool.
    """
    if spec.tasks:
        raise ValueError("partition_examples splits the given labels; spec.tasks must be empty")
    if not labels:
        raise ValueError("no examples to partition")
    return _to_partition(list(labels), partition_indices(labels, spec), spec, source="examples")


# --------------------------------------------------------------------------------------------
# Manifest (the only I/O)


def write_partition_manifest(path: str | Path, partition: Partition) -> Path:
    """Write spec, summary and every client's indices as JSON, atomically and durably."""
    p = Path(path)
    doc = {
        "format": MANIFEST_FORMAT,
        "spec": {**asdict(partition.spec), "tasks": list(partition.spec.tasks)},
        "source": partition.source,
        "summary": partition.summary(),
        "clients": [[{"task": s.task, "indices": list(s.indices)} for s in shares] for shares in partition.clients],
    }
    write_atomic(p, (json.dumps(doc, indent=1) + "\n").encode(), mode=0o600)
    return p


def read_partition_manifest(path: str | Path) -> Partition:
    """Load a manifest written by :func:`write_partition_manifest` (e.g. to resume a run)."""
    p = Path(path)
    doc: Mapping[str, Any] = json.loads(p.read_text(encoding="utf-8"))
    if doc.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{p}: unsupported partition manifest format {doc.get('format')!r}")
    spec_fields = dict(doc["spec"])
    spec_fields["tasks"] = tuple(spec_fields.get("tasks", ()))
    spec = PartitionSpec(**spec_fields)
    clients = tuple(
        tuple(Share(str(s["task"]), tuple(int(i) for i in s["indices"])) for s in shares) for shares in doc["clients"]
    )
    return Partition(spec=spec, source=str(doc["source"]), clients=clients)
