"""The Flower Message-API strategy for federated LoRA: one class for every method.

Flower owns the round loop (``Strategy.start``); :class:`LoraStrategy` overrides only what
differs from FedAvg: what clients download and train each round, and how replies are
validated and aggregated (streaming). Everything method-specific is asked of the
:class:`~fedlora.strategies.algorithms.LoraAlgorithm` it is given; methods are found by name in
:mod:`fedlora.strategies.registry`.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from torch import Tensor

from fedlora.strategies.adapter import LoraFactors, product_distance
from fedlora.strategies.algorithms import LoraAlgorithm, Reply, factor_part, head_part, update_norm
from fedlora.strategies.robust import RobustHeadAccumulator
from fedlora.strategies.server_opt import OptimizerState, ServerOptimizer, server_step
from fedlora.strategies.streaming import HeadAccumulator
from fedlora.strategies.validation import (
    TensorSpec,
    check_array_bytes,
    check_metrics,
    check_reply,
    payload_bytes,
)

#: called for every accepted reply: (round, node id, the reply as aggregated)
ReplyHook = Callable[[int, int, Reply], None]


@dataclass
class RoundRecord:
    """What the server learned in one round, for the run's metrics file."""

    server_round: int
    sampled: int = 0
    accepted: int = 0
    rejected: int = 0
    declined: int = 0
    reasons: dict[int, str] = field(default_factory=dict)  # node id -> why it was dropped
    bytes_sent: int = 0
    bytes_received: int = 0
    train: dict[str, float] = field(default_factory=dict)
    evaluate: dict[str, float] = field(default_factory=dict)
    per_client: dict[int, dict[str, float]] = field(default_factory=dict)  # node id -> eval metrics
    # node id -> train metrics (numbers; a client's ledger history arrives as lists of numbers;
    # a deployed client's name as "client-name")
    clients_train: dict[int, dict[str, float | list[float] | str]] = field(default_factory=dict)
    failed: str | None = None  # why the round kept the previous global adapter


class LoraStrategy(FedAvg):
    """FedAvg's sampling and loop, with LoRA-aware download, validation and aggregation.

    Parameters
    ----------
    algorithm
        The method's server-side math.
    lr, lr_decay
        Clients' learning rate in round t is ``lr * lr_decay**(t - 1)``; default lr: the
        method's tuned default.
    min_replies
        Fewest valid replies that make a round; with fewer, the previous global adapter is
        kept and the round is recorded as failed.
    max_reply_bytes
        Replies whose tensors exceed this many bytes are dropped (None: no limit).
    max_examples
        Replies claiming more examples (their weight) are dropped (None: no cap).
    norm_factor, max_update_norm
        A reply whose update (its s B A minus the global one) is longer than ``norm_factor``
        times the round's median update (with 3 replies or more), or than ``max_update_norm``,
        is dropped; 0 turns either bound off.
    pin_examples
        Deployment, where the server cannot see the data: a node's first accepted reply of the run
        fixes the most examples it may claim later (Flower gives each registered key one node id
        per run), so a client cannot raise its weight once the run is under way.
    aggregate, trim
        ``"mean"`` (the method's own weighted average), or ``"median"`` / ``"trimmed-mean"``
        (dropping ``trim`` of the values at each end) of each factor coordinate, unweighted:
        :mod:`fedlora.strategies.robust`; refused for methods that combine products.
    on_accepted_reply
        Hook for audit trails: sees every reply that passed validation.
    round_offset
        Rounds already done before this start (a resumed run): Flower counts its loop from 1,
        the strategy, the clients and the records see ``round_offset + i``.
    server_opt, server_opt_state
        A server optimizer over each round's aggregate (:mod:`fedlora.strategies.server_opt`;
        None: plain aggregation) and its state to continue from (a resumed run's checkpoint).
    """

    def __init__(
        self,
        algorithm: LoraAlgorithm,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        min_replies: int = 1,
        max_reply_bytes: int | None = None,
        max_examples: float | None = None,
        norm_factor: float = 0.0,
        max_update_norm: float = 0.0,
        aggregate: str = "mean",
        trim: float = 0.1,
        pin_examples: bool = False,
        on_accepted_reply: ReplyHook | None = None,
        lr: float | None = None,
        lr_decay: float = 1.0,
        round_offset: int = 0,
        server_opt: ServerOptimizer | None = None,
        server_opt_state: OptimizerState | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
        )
        if not isinstance(algorithm, LoraAlgorithm):
            raise TypeError(f"{type(self).__name__} needs a LoraAlgorithm, got {type(algorithm).__name__}")
        if min_replies < 1:
            raise ValueError(f"min_replies must be >= 1, got {min_replies}")
        self.algorithm = algorithm
        self.lr = lr if lr is not None else algorithm.defaults.lr
        if not self.lr > 0 or not 0 < lr_decay <= 1:
            raise ValueError(f"lr must be > 0 and lr_decay in (0, 1], got {self.lr}, {lr_decay}")
        self.lr_decay = lr_decay
        if server_opt is not None and not server_opt.plain and not algorithm.server_optimizer:
            raise ValueError(f"{algorithm.name} cannot take a server optimizer (see LoraAlgorithm.server_optimizer)")
        self.server_opt = server_opt if server_opt is not None and not server_opt.plain else None
        self.server_opt_state = server_opt_state or OptimizerState()
        if round_offset < 0:
            raise ValueError(f"round_offset must be >= 0, got {round_offset}")
        self.round_offset = round_offset
        if max_examples is not None and not max_examples > 0:
            raise ValueError(f"max_examples must be > 0 or None, got {max_examples}")
        if not (norm_factor == 0 or norm_factor >= 1) or not max_update_norm >= 0:
            raise ValueError(
                f"norm_factor must be 0 or >= 1 and max_update_norm >= 0, got {norm_factor}, {max_update_norm}"
            )
        self.min_replies = min_replies
        self.max_reply_bytes = max_reply_bytes
        self.max_examples = max_examples
        self.norm_factor = norm_factor
        self.max_update_norm = max_update_norm
        if aggregate != "mean":
            algorithm.robust_accumulator(1, aggregate, trim)  # refuses now, before any round, naming why
        self.aggregate = aggregate
        self.trim = trim
        self.pin_examples = pin_examples
        self.declared: dict[int, float] = {}  # node -> num-examples of its first accepted reply
        self.on_accepted_reply = on_accepted_reply
        self.rounds: dict[int, RoundRecord] = {}
        self.excluded: set[int] = set()  # nodes that declined (privacy budget): not sampled again
        self._state: dict[str, Tensor] | None = None
        self._wanted = (min_available_nodes, min_train_nodes)
        self._started = False

    def summary(self) -> None:
        log(INFO, "\t├── LoRA method: %s (scaling %s)", self.algorithm.name, self.algorithm.scaling)
        super().summary()

    def _record(self, server_round: int) -> RoundRecord:
        return self.rounds.setdefault(server_round, RoundRecord(server_round))

    # -- training -----------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        if self._started:
            self._tolerate_dropouts(grid)
        self._started = True
        state = dict(arrays.to_torch_state_dict())
        self._state = state  # what this round's replies are trained from
        download = self.algorithm.download(server_round, state) | head_part(state)
        config["train-factors"] = self.algorithm.trained_factors(server_round)
        config["lr"] = self.lr * self.lr_decay ** (server_round - 1)  # the schedule lives on the server
        messages = [
            m
            for m in super().configure_train(server_round, ArrayRecord(download), config, grid)
            if m.metadata.dst_node_id not in self.excluded
        ]
        rec = self._record(server_round)
        rec.sampled = len(messages)
        rec.bytes_sent = len(messages) * payload_bytes(download)
        return messages

    def _tolerate_dropouts(self, grid: Grid) -> None:
        """After the first round, sample whoever is connected (at least ``min_replies``) instead of
        waiting for every expected node: a node that dropped out must not stall the run, and it
        is sampled again once it reconnects. With every node connected nothing changes."""
        connected = len(list(grid.get_node_ids()))
        floor = max(self.min_replies, connected)
        self.min_available_nodes = min(self._wanted[0], floor)
        self.min_train_nodes = min(self._wanted[1], floor)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate each reply, fold the good ones into the method's accumulator, finish."""
        if self._state is None:
            raise RuntimeError("aggregate_train called before configure_train")
        server_round += self.round_offset
        new_state, summary = self.aggregate_train_from(server_round, replies, self._state)
        arrays = ArrayRecord(_contiguous(new_state)) if new_state is not None else None
        return arrays, MetricRecord(cast(dict[str, Any], {k: v for k, v in summary.items() if math.isfinite(v)}))

    def aggregate_train_from(
        self, server_round: int, replies: Iterable[Message], state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor] | None, dict[str, float]]:
        """Aggregate ``replies`` against the global ``state`` they were trained from.

        Replies are taken in the order of the clients' partition ids, not of their arrival, so
        the floating-point sums, and with them a resumed run, are reproducible bit for bit.
        """
        rec = self._record(server_round)
        algo = self.algorithm
        heads = head_part(state)
        expected = algo.reply_spec(server_round, state) | {
            k: TensorSpec(tuple(v.shape), v.dtype) for k, v in heads.items()
        }
        acc = (
            algo.new_accumulator(server_round)
            if self.aggregate == "mean"
            else algo.robust_accumulator(server_round, self.aggregate, self.trim)
        )
        head_acc = HeadAccumulator() if self.aggregate == "mean" else RobustHeadAccumulator(self.aggregate, self.trim)
        total_examples, loss_sum = 0.0, 0.0

        def reject(node: int, reason: str) -> None:
            rec.rejected += 1
            rec.reasons[node] = reason
            log(WARNING, "round %s: rejected reply of node %s: %s", server_round, node, reason)

        # (node, reply, its metrics and client name, its factors): all parsed before any is
        # folded in, since the bound on updates depends on the round's median
        parsed: list[tuple[int, Reply, dict[str, Any], dict[str, LoraFactors]]] = []
        for msg in sorted(replies, key=_arrival_free_order):
            node = msg.metadata.src_node_id
            reason, reply, metrics = self._parse(msg, expected)
            if reason == "declined":
                rec.declined += 1
                rec.reasons[node] = str(metrics.get("status", "declined"))
                self.excluded.add(node)  # it will decline again: stop sampling it in this run
                log(WARNING, "round %s: node %s declined: %s", server_round, node, rec.reasons[node])
                continue
            if reason is None:
                assert reply is not None
                try:
                    factors = Reply(factor_part(reply.tensors), reply.num_examples, reply.scaling)
                    modules = algo.reply_modules(state, factors)
                    parsed.append((node, reply, metrics | _client_name(msg), modules))
                    continue
                except ValueError as err:
                    reason = str(err)
            reject(node, reason)
        glob = algo.state_modules(state)
        norms = [product_distance(modules, glob) for _, _, _, modules in parsed]
        bound, why = self._update_bound(norms)
        for (node, reply, metrics, modules), norm in zip(parsed, norms, strict=True):
            if norm > bound:
                reject(node, f"update norm {norm:.4g} is above {bound:.4g} ({why})")
                continue
            try:
                acc.add(modules, reply.num_examples)
                head_acc.add(head_part(reply.tensors), reply.num_examples)
            except ValueError as err:
                reject(node, str(err))
                continue
            rec.accepted += 1
            self.declared.setdefault(node, reply.num_examples)
            rec.clients_train[node] = {**_numbers(metrics), **_strings(metrics), "update-norm": norm}
            rec.bytes_received += payload_bytes(reply.tensors)
            total_examples += reply.num_examples
            loss_sum += reply.num_examples * float(metrics.get("train-loss", math.nan))
            if self.on_accepted_reply is not None:
                self.on_accepted_reply(server_round, node, reply)
        summary: dict[str, float] = {
            "sampled": rec.sampled,
            "accepted": rec.accepted,
            "rejected": rec.rejected,
            "declined": rec.declined,
            "bytes-sent": rec.bytes_sent,
            "bytes-received": rec.bytes_received,
        }
        if rec.accepted < self.min_replies:
            rec.failed = (
                f"only {rec.accepted} valid replies (fewer than min-replies={self.min_replies}); "
                "keeping the previous global adapter"
            )
            log(WARNING, "round %s failed: %s", server_round, rec.failed)
            rec.train = summary
            return None, summary
        new_state, diagnostics = algo.finish(server_round, acc, state)
        new_state |= head_acc.result()
        if self.server_opt is not None:
            new_state, self.server_opt_state = server_step(self.server_opt, state, new_state, self.server_opt_state)
        epsilons = [float(e) for m in rec.clients_train.values() if isinstance(e := m.get("epsilon"), float)]
        if epsilons:  # a maximum, never Flower's weighted mean of epsilons
            summary["epsilon-max"] = max(epsilons)
        if math.isfinite(loss_sum):  # DP clients keep their training loss to themselves
            summary["train-loss"] = loss_sum / total_examples
        summary |= {
            "num-examples": total_examples,
            "update-norm": update_norm(state, new_state),
            **diagnostics,
        }
        rec.train = summary
        return new_state, summary

    def _update_bound(self, norms: list[float]) -> tuple[float, str]:
        """The longest update this round accepts, and which setting says so (inf: no bound)."""
        bound, why = math.inf, ""
        if self.max_update_norm > 0:
            bound, why = self.max_update_norm, "robust.max-update-norm"
        median = statistics.median(norms) if len(norms) >= 3 else 0.0
        if self.norm_factor > 0 and median > 0 and self.norm_factor * median < bound:
            bound, why = (
                self.norm_factor * median,
                f"robust.norm-factor {self.norm_factor:g} x the round's median update",
            )
        return bound, why

    def _parse(
        self, msg: Message, expected: Mapping[str, TensorSpec]
    ) -> tuple[str | None, Reply | None, dict[str, Any]]:
        """(reason to drop or None, the reply, its metrics). ``"declined"`` is not an error."""
        if msg.has_error():  # the last line of a client's traceback says what went wrong
            lines = [ln.strip() for ln in str(msg.error.reason).splitlines() if ln.strip()]
            return f"client error: {(lines[-1] if lines else '')[:300]}", None, {}
        content = msg.content
        metrics: dict[str, Any] = dict(content.metric_records.get("metrics", {}))
        if metrics.get("declined", 0):
            status = content.config_records.get("status")
            why = str(status["reason"]) if status is not None and "reason" in status else "declined"
            return "declined", None, {"status": why[:300]}
        if "arrays" not in content.array_records:
            return "reply has no 'arrays' record", None, {}
        n = metrics.get("num-examples")
        if not isinstance(n, int | float) or isinstance(n, bool) or not math.isfinite(n) or n <= 0:
            return f"num-examples must be a positive number, got {str(n)[:40]}", None, {}
        if self.max_examples is not None and n > self.max_examples:
            return f"num-examples {n:g} is above the run's cap of {self.max_examples:g} (robust.max-examples)", None, {}
        declared = self.declared.get(msg.metadata.src_node_id) if self.pin_examples else None
        if declared is not None and n > declared:
            why = f"num-examples {n:g} is above the {declared:g} this node declared in its first reply of the run"
            return why, None, {}
        reason = check_metrics(metrics)
        if reason is not None:
            return reason, None, {}
        reason = check_array_bytes(content.array_records["arrays"], self.max_reply_bytes)
        if reason is not None:
            return reason, None, {}
        try:
            tensors = dict(content.array_records["arrays"].to_torch_state_dict())
        except Exception as err:  # any malformed bytes a client sends end here, not the run
            return f"arrays cannot be read as tensors: {type(err).__name__}: {str(err)[:200]}", None, {}
        reason = check_reply(tensors, expected, self.max_reply_bytes)
        if reason is not None:
            return reason, None, metrics
        try:
            scaling = self.algorithm.reply_scaling(tensors, metrics)
        except ValueError as err:
            return str(err), None, metrics
        return None, Reply(tensors, float(n), scaling), metrics

    # -- evaluation ---------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        server_round += self.round_offset
        state = arrays.to_torch_state_dict()
        download = self.algorithm.download(server_round, state) | head_part(state)
        return super().configure_evaluate(server_round, ArrayRecord(download), config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Example-weighted means, plus the spread across clients and each client's numbers."""
        server_round += self.round_offset
        rec = self._record(server_round)
        rows: dict[int, dict[str, float]] = {}
        for msg in replies:
            if msg.has_error() or "metrics" not in msg.content.metric_records:
                continue
            raw = dict(msg.content.metric_records["metrics"])
            node = msg.metadata.src_node_id
            left_out = check_metrics(raw)
            n = raw.get("num-examples", 0)
            cap = self.max_examples
            if left_out is None and cap is not None and isinstance(n, int | float) and n > cap:
                left_out = f"num-examples {n:g} is above the run's cap of {cap:g} (robust.max-examples)"
            if left_out is not None:
                log(WARNING, "round %s: evaluation of node %s left out: %s", server_round, node, left_out)
                continue
            m = {k: float(v) for k, v in raw.items() if isinstance(v, int | float)}
            if m.get("num-examples", 0) > 0:
                rows[node] = m
        if not rows:
            return None
        total = sum(r["num-examples"] for r in rows.values())
        out: dict[str, float] = {"num-examples": total, "clients": len(rows)}
        for key in ("eval-loss", "exact-match", "macro-f1", "token-accuracy", "perplexity"):
            vals = [r[key] for r in rows.values() if key in r]
            if len(vals) == len(rows):
                out[key] = sum(r[key] * r["num-examples"] for r in rows.values()) / total
                out[f"{key}-min"] = min(vals)
                out[f"{key}-max"] = max(vals)
        rec.evaluate, rec.per_client = out, rows
        return MetricRecord(cast(dict[str, Any], out))


def _arrival_free_order(msg: Message) -> tuple[float, int]:
    """Sort key of a reply: its client's partition id (when it reports one), then its node id."""
    node = int(msg.metadata.src_node_id)
    if msg.has_error():
        return math.inf, node
    metrics = msg.content.metric_records.get("metrics")
    value = metrics.get("partition-id") if metrics is not None else None
    if isinstance(value, int | float) and math.isfinite(value):  # a bad one is rejected later
        return float(value), node
    return math.inf, node


def _client_name(msg: Message) -> dict[str, str]:
    """``{"client-name": ...}`` when a deployed client named itself (a short printable string)."""
    record = msg.content.config_records.get("client")
    name = record.get("name") if record is not None else None
    if isinstance(name, str) and 0 < len(name) <= 63 and name.isprintable():
        return {"client-name": name}
    return {}


def _numbers(metrics: Mapping[str, Any]) -> dict[str, float | list[float]]:
    """A reply's numeric metrics as JSON-able floats; lists of numbers stay lists."""
    out: dict[str, float | list[float]] = {}
    for key, value in metrics.items():
        if isinstance(value, int | float):
            out[key] = float(value)
        elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
            out[key] = [float(v) for v in value]
    return out


def _strings(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The string entries (a deployed client's name, added by :func:`_client_name`)."""
    return {k: v for k, v in metrics.items() if isinstance(v, str)}


def _contiguous(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().contiguous() for k, v in state.items()}


__all__ = ["LoraStrategy", "ReplyHook", "RoundRecord"]
