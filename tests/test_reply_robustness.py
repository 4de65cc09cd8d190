"""No single client can crash or dominate a round: every field of a train reply is checked by
type and range, a reply's weight is capped, an update far longer than the round's others is
dropped, and FlexLoRA's scalings come from the server. Each bad reply is dropped with its reason
and the round goes on with the honest ones, whose aggregate it then equals exactly."""

from __future__ import annotations

import io
import logging
import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedlora.core.client_data import client_train_sizes
from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
from fedlora.server.app import DEPLOYED_MAX_EXAMPLES, algorithm_kwargs, weight_cap
from fedlora.strategies import registry
from fedlora.strategies.adapter import LoraFactors, product_distance, split_adapter
from fedlora.strategies.flexlora import FlexLoraSettings
from fedlora.strategies.flower import LoraStrategy
from fedlora.strategies.validation import MAX_HISTORY, check_metrics

KEYS = [f"base_model.model.m{i}.lora_{f}.weight" for i in range(2) for f in ("A", "B")]
HONEST = {"num-examples": 10, "train-loss": 0.5, "partition-id": 0, "lora-rank": 2, "lora-scaling": 2.0}


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    """Messages need a run identity outside a Flower process."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _adapter(seed: int, rank: int = 2, b_scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn((rank, 3) if ".lora_A." in k else (4, rank), generator=g) * (b_scale if ".lora_B." in k else 1)
        for k in KEYS
    }


def _reply(node: int, arrays: ArrayRecord | dict[str, torch.Tensor] | None, metrics: dict | None = None) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    content = RecordDict({"metrics": MetricRecord({**HONEST, "partition-id": node} if metrics is None else metrics)})
    if arrays is not None:
        content["arrays"] = arrays if isinstance(arrays, ArrayRecord) else ArrayRecord(arrays)
    return Message(content, reply_to=request)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _odd_arrays(good: dict[str, torch.Tensor]) -> list[tuple[ArrayRecord, str]]:
    """Array records whose bytes no tensor can be read from, each of another kind."""

    def record(array: Array) -> ArrayRecord:
        rec = ArrayRecord({k: v for k, v in good.items() if k != KEYS[0]})
        rec[KEYS[0]] = array
        return rec

    def npy(data: bytes) -> ArrayRecord:
        return record(Array(dtype="float32", shape=(2, 3), stype="numpy.ndarray", data=data))

    plain = _npy(np.zeros((2, 3), dtype=np.float32))
    # NumPy would allocate 400 GB for this header before finding the data missing (MemoryError)
    huge = plain.replace(b"(2, 3)", b"(99999999999, 1)")
    assert huge != plain
    return [
        (record(Array(dtype="float32", shape=(2, 3), stype="torch.Tensor", data=b"\x80\x04junk")), "serialised as"),
        (npy(b"\x93NUMPY"), "has no readable .npy header"),
        (npy(huge), "declares 399999999996 bytes of data but carries"),
        (npy(plain[:-4]), "declares 24 bytes of data but carries 20"),
        (npy(_npy(np.zeros(2, dtype=[("a", "<f4")]))), "not a plain number type"),
        (npy(_npy(np.array(["a", "b"]))), "cannot be read as tensors: TypeError"),
        (npy(_npy(np.zeros((2, 3), dtype=">f4"))), "cannot be read as tensors: ValueError"),
    ]


BAD_METRICS = [
    ({"train-loss": [0.5]}, "metric 'train-loss' is a list"),
    ({"partition-id": math.nan}, "metric 'partition-id' must be a finite number, got nan"),
    ({"partition-id": 1.5}, "metric 'partition-id' must be an integer >= 0, got 1.5"),
    ({"partition-id": -1}, "metric 'partition-id' must be an integer >= 0, got -1"),
    ({"epsilon": math.inf}, "metric 'epsilon' must be a finite number, got inf"),
    ({"sample-rate": 2.0}, "metric 'sample-rate' must be a number in (0, 1], got 2.0"),
    ({"some-new-metric": -math.inf}, "metric 'some-new-metric' must be a finite number"),
    ({"ledger-noise": [1.0], "ledger-rate": [0.1, 0.1], "ledger-steps": [3]}, "must come together, of equal length"),
    ({"ledger-noise": [1.0], "ledger-rate": [1.5], "ledger-steps": [3]}, "metric 'ledger-rate' must hold numbers in"),
    ({"ledger-noise": [1.0], "ledger-rate": [0.1], "ledger-steps": [2.5]}, "metric 'ledger-steps' must hold integers"),
    ({"ledger-noise": [1.0], "ledger-rate": [0.1]}, "must come together"),
    ({"pid": [1, 2]}, "metric 'pid' is a list"),
]


def test_metric_rules_accept_an_honest_reply_and_name_each_bad_field() -> None:
    ledger = {"ledger-noise": [1.1, 1.1], "ledger-rate": [0.1, 0.1], "ledger-steps": [3, 3]}
    assert check_metrics({**HONEST, **ledger, "epsilon": 1.2, "delta": 1e-5, "local-exact-match": 0.5}) is None
    for bad, reason in BAD_METRICS:
        got = check_metrics({**HONEST, **bad})
        assert got is not None and reason in got, (bad, got)
    too_long = {k: [1] * (MAX_HISTORY + 1) for k in ledger}
    assert f"more than {MAX_HISTORY}" in str(check_metrics({**HONEST, **too_long}))


def test_every_malformed_field_is_dropped_with_its_reason_and_the_round_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Wrong-typed and non-finite metrics and identifiers, unreadable arrays of several kinds and
    a huge example count each drop their reply only; the result is the honest replies' aggregate."""
    state = _adapter(0)
    honest = [_reply(i, _adapter(i)) for i in (1, 2)]
    bad: list[tuple[Message, str]] = []
    for node, (fields, reason) in enumerate(BAD_METRICS, start=10):
        bad.append((_reply(node, _adapter(node), {**HONEST, "partition-id": node, **fields}), reason))
    for node, (arrays, reason) in enumerate(_odd_arrays(_adapter(3)), start=40):
        bad.append((_reply(node, arrays), reason))
    huge = _reply(50, _adapter(50), {**HONEST, "partition-id": 50, "num-examples": 1e12})
    bad.append((huge, "num-examples 1e+12 is above the run's cap of 1000 (robust.max-examples)"))
    strategy = LoraStrategy(registry.create("fedavg-lora", scaling=2.0), max_examples=1000)
    with caplog.at_level(logging.WARNING):
        new, summary = strategy.aggregate_train_from(1, [*honest, *(m for m, _ in bad)], state)
    assert summary["accepted"] == 2 and summary["rejected"] == len(bad)
    reasons = strategy.rounds[1].reasons
    for msg, reason in bad:
        node = msg.metadata.src_node_id
        assert reason in reasons[node], (node, reasons[node])
        assert f"rejected reply of node {node}: " in caplog.text
    reference, _ = LoraStrategy(registry.create("fedavg-lora", scaling=2.0)).aggregate_train_from(1, honest, state)
    assert new is not None and reference is not None
    assert new.keys() == reference.keys() and all(torch.equal(new[k], reference[k]) for k in new)


def test_a_declined_reply_with_an_endless_reason_is_counted_and_cut() -> None:
    declined = _reply(4, None, {"declined": 1})
    declined.content["status"] = ConfigRecord({"reason": "x" * 10_000})
    strategy = LoraStrategy(registry.create("fedavg-lora", scaling=1.0))
    _, summary = strategy.aggregate_train_from(1, [_reply(1, _adapter(1)), declined], _adapter(0))
    assert summary["declined"] == 1 and len(strategy.rounds[1].reasons[4]) == 300


def test_a_huge_finite_update_is_dropped_and_the_global_adapter_stays_the_honest_one() -> None:
    """B scaled by 1e12 (finite, well-formed): more than 10 x the round's median update, dropped;
    the round's result equals the honest-only aggregate bit for bit."""
    state = _adapter(0)
    honest = [_reply(i, _adapter(i)) for i in (1, 2, 3)]
    attacker = _reply(9, _adapter(9, b_scale=1e12))
    strategy = LoraStrategy(registry.create("fedavg-lora", scaling=2.0), norm_factor=10.0)
    new, summary = strategy.aggregate_train_from(1, [*honest, attacker], state)
    assert summary["accepted"] == 3 and summary["rejected"] == 1
    assert "x the round's median update" in strategy.rounds[1].reasons[9]
    assert "robust.norm-factor 10" in strategy.rounds[1].reasons[9]
    reference, _ = LoraStrategy(registry.create("fedavg-lora", scaling=2.0)).aggregate_train_from(1, honest, state)
    assert new is not None and reference is not None and all(torch.equal(new[k], reference[k]) for k in new)
    norms = [strategy.rounds[1].clients_train[n]["update-norm"] for n in (1, 2, 3)]
    assert all(isinstance(v, float) and v > 0 for v in norms)  # the server's own figure, per client

    # without the bound the same reply moves the global adapter by orders of magnitude
    unbounded, _ = LoraStrategy(registry.create("fedavg-lora", scaling=2.0)).aggregate_train_from(
        1, [*honest, attacker], state
    )
    assert unbounded is not None
    assert max(float(unbounded[k].abs().max()) for k in unbounded) > 1e9

    absolute = LoraStrategy(registry.create("fedavg-lora", scaling=2.0), max_update_norm=1e-6)
    _, s2 = absolute.aggregate_train_from(1, honest, state)
    assert s2["accepted"] == 0 and "robust.max-update-norm" in absolute.rounds[1].reasons[1]


def test_flexlora_takes_each_scaling_from_the_run_not_from_the_client() -> None:
    """A rank-2 client of a rank-4 run claiming lora-scaling 1e6 weighs what an honest one does:
    s = alpha / r is the server's (alpha 16: 8 at rank 2; rsLoRA: alpha / sqrt(r))."""
    algo = registry.create("flexlora", scaling=4.0, lora_rank=4, settings=FlexLoraSettings(ranks="4,2"))
    assert algo.scaling_at(2) == 8.0 and algo.scaling_at(4) == 4.0
    rs = registry.create("flexlora", scaling=8.0, lora_rank=4, settings=FlexLoraSettings(ranks="4,2"), use_rslora=True)
    assert rs.scaling_at(1) == pytest.approx(16.0)
    state = _adapter(0, rank=4)
    replies = [_reply(1, _adapter(1, rank=4)), _reply(2, _adapter(2, rank=2))]
    liar = _reply(2, _adapter(2, rank=2), {**HONEST, "partition-id": 2, "lora-scaling": 1e6})
    honest_new, _ = LoraStrategy(algo).aggregate_train_from(1, replies, state)
    liar_new, summary = LoraStrategy(algo).aggregate_train_from(1, [replies[0], liar], state)
    assert summary["accepted"] == 2 and honest_new is not None and liar_new is not None
    assert all(torch.equal(honest_new[k], liar_new[k]) for k in honest_new)


def test_product_distance_equals_the_dense_norm() -> None:
    """Against ||s B A - s' B' A'||_F of the dense matrices: other ranks, scalings, missing modules."""
    g = torch.Generator().manual_seed(0)

    def factors(rank: int, scaling: float) -> LoraFactors:
        return LoraFactors(A=torch.randn(rank, 5, generator=g), B=torch.randn(6, rank, generator=g), scaling=scaling)

    ours = {"m0": factors(2, 3.0), "m1": factors(4, 0.5)}
    theirs = {"m0": factors(3, 1.0), "m2": factors(1, 2.0)}

    def dense(f: LoraFactors | None) -> torch.Tensor:
        return torch.zeros(6, 5, dtype=torch.float64) if f is None else f.scaling * (f.B.double() @ f.A.double())

    want = math.sqrt(sum(float((dense(ours.get(m)) - dense(theirs.get(m))).pow(2).sum()) for m in ("m0", "m1", "m2")))
    assert product_distance(ours, theirs) == pytest.approx(want, rel=1e-12)
    assert product_distance(ours, ours) == pytest.approx(0.0, abs=1e-6)
    state = _adapter(7)
    assert product_distance(split_adapter(state, 2.0), {}) > 0


def test_evaluation_rows_with_bad_numbers_are_left_out() -> None:
    strategy = LoraStrategy(registry.create("fedavg-lora", scaling=1.0), max_examples=100)

    def evaluated(node: int, metrics: dict) -> Message:
        request = Message(RecordDict(), dst_node_id=node, message_type="evaluate")
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=request)

    good = {"num-examples": 10, "eval-loss": 1.0, "exact-match": 0.5}
    rows = [
        evaluated(1, good),
        evaluated(2, {**good, "exact-match": math.nan}),
        evaluated(3, {**good, "num-examples": 1e9}),
        evaluated(4, {**good, "eval-loss": [1.0, 2.0]}),
    ]
    out = strategy.aggregate_evaluate(1, rows)
    assert out is not None and out["clients"] == 1 and out["exact-match"] == 0.5
    assert list(strategy.rounds[1].per_client) == [1]


def test_robust_settings_are_validated_and_the_weight_cap_follows_the_run() -> None:
    for key, value, message in [
        ("robust.norm-factor", 0.5, "robust.norm-factor must be 0 (off) or a finite number >= 1"),
        ("robust.max-update-norm", -1.0, "robust.max-update-norm must be a finite number >= 0"),
        ("robust.max-examples", -2, "robust.max-examples must be an integer >= 0"),
    ]:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            FederationConfig.from_run_config({**DEFAULT_RUN_CONFIG, key: value})
    assert DEFAULT_RUN_CONFIG["robust.norm-factor"] == 10.0 and DEFAULT_RUN_CONFIG["robust.max-examples"] == 0
    sim = FederationConfig.from_run_config({**DEFAULT_RUN_CONFIG, "num-clients": 4, "num-train": 90})
    assert weight_cap(sim) == max(client_train_sizes(sim)) > 0
    deployed = FederationConfig.from_run_config({**DEFAULT_RUN_CONFIG, "deployed": True})
    assert weight_cap(deployed) == DEPLOYED_MAX_EXAMPLES
    explicit = FederationConfig.from_run_config({**DEFAULT_RUN_CONFIG, "deployed": True, "robust.max-examples": 512})
    assert weight_cap(explicit) == 512
    assert algorithm_kwargs(sim, 2.0, fan_in_fan_out=False)["use_rslora"] is sim.lora.rslora


# ------------------------------------------------------------------------- robust aggregation


def test_median_and_trimmed_mean_match_numpy_and_scipy() -> None:
    from scipy.stats import trim_mean

    from fedlora.strategies.robust import coordinate_median, trimmed_count, trimmed_mean

    g = torch.Generator().manual_seed(3)
    for k in (1, 2, 5, 6, 11):
        stack = torch.randn((k, 4, 3), generator=g, dtype=torch.float64)
        assert np.array_equal(coordinate_median(stack).numpy(), np.median(stack.numpy(), axis=0))
        for trim in (0.0, 0.1, 0.25, 0.4):
            cut = trimmed_count(trim, k)  # SciPy's int(p * k), at least 1 from 3 values on
            assert cut == (max(int(trim * k), 1) if trim and k >= 3 else int(trim * k))
            np.testing.assert_allclose(
                trimmed_mean(stack, trim).numpy(),
                trim_mean(stack.numpy(), (cut + 0.5) / k, axis=0),
                rtol=1e-12,
                atol=1e-15,
            )


@pytest.mark.parametrize(("strategy", "rule"), [("fedavg-lora", "median"), ("ffa-lora", "trimmed-mean")])
def test_robust_aggregation_is_the_coordinatewise_rule_and_ignores_a_huge_reply(strategy: str, rule: str) -> None:
    """Five replies, one with B scaled by 1e12 and a claimed weight of 1e5 (within the cap):
    the weighted mean is carried away, the median or 20%-trimmed mean of each coordinate is not."""
    from scipy.stats import trim_mean

    state = _adapter(0)
    algo = registry.create(strategy, scaling=2.0)
    trained = algo.trained_factors(1)
    keys = [k for k in KEYS if trained == "both" or f".lora_{trained}." in k]

    def sent(seed: int, b_scale: float = 1.0) -> dict[str, torch.Tensor]:
        adapter = _adapter(seed, b_scale=b_scale)
        return {k: adapter[k] for k in keys}

    honest = [_reply(i, sent(i)) for i in (1, 2, 3, 4)]
    attacker = _reply(9, sent(9, b_scale=1e12), {**HONEST, "partition-id": 9, "num-examples": 100000})
    robust = LoraStrategy(algo, norm_factor=0.0, aggregate=rule, trim=0.2)
    new, summary = robust.aggregate_train_from(1, [*honest, attacker], state)
    assert new is not None and summary["accepted"] == 5
    replies = [sent(i) for i in (1, 2, 3, 4)] + [sent(9, b_scale=1e12)]
    for key in KEYS:
        if key not in keys:  # a frozen factor passes through
            assert torch.equal(new[key], state[key])
            continue
        stack = np.stack([r[key].double().numpy() for r in replies])
        want = np.median(stack, axis=0) if rule == "median" else trim_mean(stack, 0.2, axis=0)
        np.testing.assert_allclose(new[key].double().numpy(), want, rtol=1e-6, atol=1e-6)
    assert max(float(new[k].abs().max()) for k in keys) < 10  # within the honest clients' range
    mean, _ = LoraStrategy(registry.create(strategy, scaling=2.0), norm_factor=0.0).aggregate_train_from(
        1, [*honest, attacker], state
    )
    assert mean is not None and max(float(mean[k].abs().max()) for k in keys) > 1e9


@pytest.mark.parametrize("strategy", ["lora-fair", "fedex-lora", "flexlora"])
def test_robust_aggregation_is_refused_for_methods_that_combine_products(strategy: str) -> None:
    with pytest.raises(ValueError, match=f"cannot work with '{strategy}': it combines the clients' factors"):
        LoraStrategy(registry.create(strategy, scaling=2.0), aggregate="median")
    with pytest.raises(ValueError, match="a median of factors is not a median of products"):
        FederationConfig.from_run_config({**DEFAULT_RUN_CONFIG, "strategy": strategy, "robust.aggregate": "median"})
    for key, value, message in [
        ("robust.aggregate", "mode", "robust.aggregate must be one of"),
        ("robust.trim", 0.5, r"robust.trim must be a fraction in \[0, 0.5\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            FederationConfig.from_run_config({**DEFAULT_RUN_CONFIG, key: value})
    cfg = FederationConfig.from_run_config(
        {**DEFAULT_RUN_CONFIG, "robust.aggregate": "trimmed-mean", "robust.trim": 0.25}
    )
    assert (cfg.robust.aggregate, cfg.robust.trim) == ("trimmed-mean", 0.25)


def test_in_deployment_a_node_cannot_raise_its_weight_after_its_first_reply() -> None:
    """The server cannot see a deployed client's data: its first accepted reply fixes the most
    examples it may claim for the rest of the run (below the run's cap)."""
    state = _adapter(0)
    strategy = LoraStrategy(registry.create("fedavg-lora", scaling=2.0), max_examples=1000, pin_examples=True)
    first = [_reply(i, _adapter(i), {**HONEST, "partition-id": i, "num-examples": 10}) for i in (1, 2)]
    _, s1 = strategy.aggregate_train_from(1, first, state)
    assert s1["accepted"] == 2 and strategy.declared == {1: 10.0, 2: 10.0}
    later = [
        _reply(1, _adapter(3), {**HONEST, "partition-id": 1, "num-examples": 900}),  # within the cap, above its own
        _reply(2, _adapter(4), {**HONEST, "partition-id": 2, "num-examples": 8}),  # fewer: fine
    ]
    _, s2 = strategy.aggregate_train_from(2, later, state)
    assert (s2["accepted"], s2["rejected"]) == (1, 1)
    assert (
        strategy.rounds[2].reasons[1]
        == "num-examples 900 is above the 10 this node declared in its first reply of the run"
    )
    assert strategy.declared[2] == 10.0  # the first claim stays the bound
    free = LoraStrategy(registry.create("fedavg-lora", scaling=2.0), max_examples=1000)  # simulation: the cap alone
    free.aggregate_train_from(1, first, state)
    assert free.aggregate_train_from(2, later, state)[1]["accepted"] == 2


def test_under_a_robust_rule_the_heads_follow_the_same_rule_not_the_claimed_weights() -> None:
    """A classifier's head is trained in full and averaged by examples under the mean; under the
    median a client claiming 100x the examples with a huge head moves it no more than any other."""
    head = "base_model.model.classifier.modules_to_save.default.weight"
    state = _adapter(0) | {head: torch.zeros(2, 3)}

    def reply(node: int, value: float, n: int) -> Message:
        return _reply(
            node,
            _adapter(node) | {head: torch.full((2, 3), value)},
            {**HONEST, "partition-id": node, "num-examples": n},
        )

    replies = [reply(1, 1.0, 10), reply(2, 2.0, 10), reply(3, 3.0, 10), reply(9, 1e6, 1000)]
    median = LoraStrategy(registry.create("fedavg-lora", scaling=2.0), norm_factor=0.0, aggregate="median")
    new, _ = median.aggregate_train_from(1, replies, state)
    assert new is not None and torch.equal(new[head], torch.full((2, 3), 2.5))  # the median of 1, 2, 3, 1e6
    mean, _ = LoraStrategy(registry.create("fedavg-lora", scaling=2.0), norm_factor=0.0).aggregate_train_from(
        1, replies, state
    )
    assert mean is not None and float(mean[head][0, 0]) > 9e5  # weighted by the claimed examples
