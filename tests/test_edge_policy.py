"""The node's own privacy policy and bundle check, in process: every way a server's run could
weaken a node's DP is declined with its reason before any training or charge.

The real-process attacks (a hostile bundle, another local account) are in test_edge_security.py.
"""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fedlora.client.bundle import check_bundle, config_only_problem
from fedlora.client.compute import compute
from fedlora.client.messages import Request
from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
from fedlora.core.flower_runner import write_app_dir
from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.policy import (
    DEFAULT_MAX_EPSILON,
    POLICY_FILE,
    PolicyError,
    PrivacyPolicy,
    RoundRequest,
    check_round,
)

COMPONENTS = ("fedlora.server.app:app", "fedlora.client.app:app")


def _fab(files: dict[str, str]) -> bytes:
    """A bundle as ``flwr build`` makes it: the files plus its .info/CONTENT manifest."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(".info/CONTENT", "\n".join(f"{n},x,1" for n in files))
    return buf.getvalue()


def _honest_pyproject(tmp_path: Path) -> str:
    app = write_app_dir(tmp_path / "app", app_name="fedlora", components=COMPONENTS, default_config=DEFAULT_RUN_CONFIG)
    return (app / "pyproject.toml").read_text()


# ---------------------------------------------------------------------------------------- bundles


def test_the_servers_own_bundle_is_accepted_as_flwr_builds_it(tmp_path: Path) -> None:
    from flwr.cli.build import build_fab_from_disk

    app = write_app_dir(tmp_path / "app", app_name="fedlora", components=COMPONENTS, default_config=DEFAULT_RUN_CONFIG)
    verdict = check_bundle(build_fab_from_disk(app))
    assert verdict.accepted and verdict.reason == "configuration-only fedlora bundle"


@pytest.mark.parametrize(
    ("extra", "component", "problem"),
    [
        ({"fedlora/client/app.py": "import os"}, None, "ships files besides pyproject.toml"),
        ({"client/edge.py": "import os"}, None, "ships files besides pyproject.toml"),
        ({"README.md": "hello"}, None, "ships files besides pyproject.toml"),
        ({}, "evil_client:app", "components are"),
    ],
)
def test_bundles_with_code_files_or_other_components_are_refused_with_their_hash(
    tmp_path: Path, extra: dict[str, str], component: str | None, problem: str
) -> None:
    pyproject = _honest_pyproject(tmp_path)
    if component is not None:
        pyproject = pyproject.replace('"fedlora.client.app:app"', f'"{component}"')
    content = _fab({"pyproject.toml": pyproject, **extra})
    verdict = check_bundle(content)
    assert not verdict.accepted
    assert problem in verdict.reason and f"sha256:{verdict.sha256}" in verdict.reason
    assert check_bundle(content, [verdict.sha256.upper()]).accepted  # the operator pinned exactly this one
    assert not check_bundle(content, ["0" * 64]).accepted


def test_garbage_and_extra_tool_sections_are_refused(tmp_path: Path) -> None:
    assert "not a readable bundle" in str(config_only_problem(b"not a zip"))
    pyproject = _honest_pyproject(tmp_path) + '\n[tool.setuptools]\npackages = ["x"]\n'
    assert "tools besides Flower" in str(config_only_problem(_fab({"pyproject.toml": pyproject})))


# ---------------------------------------------------------------------------------------- the policy


def test_policy_file_round_trips_owner_only_and_names_bad_keys(tmp_path: Path) -> None:
    assert PrivacyPolicy.load(tmp_path) == PrivacyPolicy()  # no file: the strict defaults
    assert PrivacyPolicy().max_epsilon == DEFAULT_MAX_EPSILON and PrivacyPolicy().require_dp
    policy = PrivacyPolicy().with_options(min_noise_multiplier=0.8, allowed_bundles=("ab" * 32,), share_metrics=None)
    policy.save(tmp_path)
    assert stat.S_IMODE((tmp_path / POLICY_FILE).stat().st_mode) == 0o600
    assert PrivacyPolicy.load(tmp_path) == policy
    (tmp_path / POLICY_FILE).write_text("max-epsilon = 5\nmin-noize = 1\n")
    with pytest.raises(PolicyError, match="unknown keys \\['min-noize'\\]"):
        PrivacyPolicy.load(tmp_path)
    with pytest.raises(PolicyError, match="max-epsilon must be > 0"):
        PrivacyPolicy(max_epsilon=0)
    with pytest.raises(PolicyError, match="not a SHA-256"):
        PrivacyPolicy(allowed_bundles=("abc",))


def _request(**changes: object) -> RoundRequest:
    base = {
        "dp_enabled": True,
        "noise_multiplier": 1.0,
        "sample_rate": 0.05,
        "delta": 1e-4,
        "accountant": "rdp",
        "steps": 10,
        "num_examples": 1000,
        "run_target": 8.0,
    }
    return RoundRequest(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"dp_enabled": False}, "trains with DP only"),
        ({"noise_multiplier": 0.001}, "below this node's floor 0.5"),
        ({"sample_rate": 0.5}, "above this node's cap 0.1"),
        ({"delta": 2e-3}, "not below 1/n"),
        ({"delta": 5e-4}, "above this node's cap 0.0001"),
        ({"accountant": "prv"}, "accounts with 'prv'"),
    ],
)
def test_a_round_that_breaks_the_policy_is_declined_with_the_reason(changes: dict[str, object], reason: str) -> None:
    policy = PrivacyPolicy(max_sample_rate=0.1, max_delta=1e-4)
    assert check_round(policy, _request(), [], []) is None
    assert reason in str(check_round(policy, _request(**changes), [], []))


def test_no_node_passes_the_run_target_or_its_lifetime_cap_however_often_it_is_sampled() -> None:
    step = (1.0, 0.05, 10)
    policy = PrivacyPolicy(max_epsilon=20.0)
    this_run: list[tuple[float, float, int]] = []
    while check_round(policy, _request(), this_run, this_run) is None:
        this_run.append(step)  # sampled again and again (partial participation)
    reason = str(check_round(policy, _request(), this_run, this_run))
    assert "past its target 8" in reason
    assert compute_epsilon(this_run, 1e-4, "rdp") <= 8.0
    assert compute_epsilon([*this_run, step], 1e-4, "rdp") > 8.0  # one more would have passed it
    earlier_runs = [(0.6, 0.5, 50)]  # other runs' rounds count against the lifetime cap only
    assert compute_epsilon(earlier_runs, 1e-4, "rdp") > 20
    assert "past this node's cap 20" in str(check_round(policy, _request(), earlier_runs, []))


# ---------------------------------------------------------------------------------------- a deployed node


def _node_request(tmp_path: Path, kind: str = "train", **run: object) -> Request:
    from fedlora.core.model import get_adapter_state, load_base_model, wrap_lora

    run_config = {
        **DEFAULT_RUN_CONFIG,
        "num-train": 40,
        "num-test": 8,
        "tasks": "adddigit-4",
        "strategy": "ffa-lora",
        "batch-size": 16,
        "dp.enabled": True,
        **run,
    }
    cfg = FederationConfig.from_run_config(run_config)
    lora = cfg.lora_settings(cfg.lora.rank, 16.0)
    state = {k: v.numpy() for k, v in get_adapter_state(wrap_lora(load_base_model(), lora), "B").items()}
    node = {"data-path": "embedded:adddigit-4", "state-dir": str(tmp_path / "state"), "client-name": "alice"}
    config = {
        "server-round": 1,
        "train-factors": "B",
        "local-steps": 2,
        "lr": 0.01,
        "ledger-run": "run-1",
        "dp-noise-multiplier": 1.0,
        "dp-delta": 1e-3,
    }
    return Request(kind, run_config, node, 1, state, config)


@pytest.mark.parametrize(
    ("run", "config", "policy", "reason"),
    [
        ({"dp.enabled": False}, {}, {}, "trains with DP only"),
        ({}, {"dp-noise-multiplier": 0.001}, {}, "below this node's floor"),
        ({}, {}, {"max_sample_rate": 0.1}, "above this node's cap 0.1"),
        ({}, {}, {"max_epsilon": 0.5}, "past this node's cap 0.5"),
        ({"dp.target-epsilon": 0.5}, {}, {}, "past its target 0.5"),
    ],
)
def test_a_deployed_node_declines_before_training_and_its_ledger_stays_unchanged(
    tmp_path: Path, run: dict[str, object], config: dict[str, object], policy: dict[str, object], reason: str
) -> None:
    """The server sets run config and round config; the node's policy file decides."""
    PrivacyPolicy(**policy).save(tmp_path / "state")  # type: ignore[arg-type]
    request = _node_request(tmp_path, **run)
    request.config.update(config)
    reply = compute(request)
    assert reply.metrics["declined"] == 1 and reason in str(reply.status)
    assert reply.tensors is None and "train-loss" not in reply.metrics
    assert PrivacyLedger(tmp_path / "state").history() == []  # nothing charged


def test_under_dp_no_unnoised_metric_leaves_unless_the_policy_lets_it(tmp_path: Path) -> None:
    reply = compute(_node_request(tmp_path))  # default policy: DP required, metrics stay
    assert "declined" not in reply.metrics and reply.tensors
    assert not [k for k in reply.metrics if k.startswith("local-") or "loss" in k]
    assert len(PrivacyLedger(tmp_path / "state").history()) == 1
    evaluation = compute(_node_request(tmp_path, "evaluate"))
    assert evaluation.metrics["declined"] == 1 and "do not leave this node" in str(evaluation.status)
    assert "exact-match" not in evaluation.metrics
    PrivacyPolicy(share_metrics=True).save(tmp_path / "state")
    shared = compute(_node_request(tmp_path, "evaluate"))
    assert "exact-match" in shared.metrics and "declined" not in shared.metrics
    assert np.isfinite(shared.metrics["eval-loss"])


# ---------------------------------------------------------------------------------------- the executor


class _App:
    """Stands in for the ClientApp: records whether it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, message: object, context: object) -> object:
        self.calls += 1
        raise RuntimeError("the app ran")


def _message(created_ago: float, ttl: float) -> object:
    import time

    from flwr.app import Metadata, RecordDict
    from flwr.app.message import make_message

    meta = Metadata(
        run_id=1,
        message_id="m",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time() - created_ago,
        ttl=ttl,
        message_type="train",
    )
    return make_message(meta, RecordDict())


def test_the_executor_trains_no_expired_round_and_no_refused_bundle(tmp_path: Path) -> None:
    """A node back after its round closed spends nothing on it; a refused bundle never reaches the app."""
    from fedlora.client.executor import Executor

    app = _App()
    executor = Executor(tmp_path, b"secret", app, lambda line: None)  # type: ignore[arg-type]
    honest = _fab({"pyproject.toml": _honest_pyproject(tmp_path)})
    outcome, reply = executor._answer(_message(120, 60), None, honest)  # type: ignore[arg-type]
    assert not outcome.ran and "expired 60 s ago" in outcome.detail and app.calls == 0
    assert reply.has_error() and "its round is over" in reply.error.reason
    evil = _fab({"pyproject.toml": _honest_pyproject(tmp_path), "fedlora/client/app.py": "import os"})
    outcome, reply = executor._answer(_message(0, 60), None, evil)  # type: ignore[arg-type]
    assert not outcome.ran and "refused" in outcome.detail and app.calls == 0
    outcome, reply = executor._answer(_message(0, 60), None, honest)  # type: ignore[arg-type]
    assert app.calls == 1 and "the app ran" in reply.error.reason  # an app's failure goes back as an error


def test_fl_client_start_options_change_the_policy_file_and_bad_ones_are_named(tmp_path: Path) -> None:
    from fedlora.client.node import NodeError, NodeOptions, node_policy

    def options(**changes: object) -> NodeOptions:
        return NodeOptions(
            server="127.0.0.1:9092", ca=None, key=None, data="embedded:adddigit-4", state_dir=tmp_path,
            name="alice", insecure=True, policy_changes=dict(changes),
        )  # fmt: skip

    assert node_policy(options(min_noise_multiplier=0.8, require_dp=None)).min_noise_multiplier == 0.8
    kept = node_policy(options(allowed_bundles=("ab" * 32,)))  # the next start keeps what the file says
    assert kept.min_noise_multiplier == 0.8 and kept.allowed_bundles == ("ab" * 32,)
    with pytest.raises(NodeError, match="max-sample-rate must be in"):
        node_policy(options(max_sample_rate=2.0))
    assert PrivacyPolicy.load(tmp_path) == kept  # a refused change leaves the file as it was


def test_a_runs_own_lifetime_cap_can_lower_the_nodes_never_raise_it(tmp_path: Path) -> None:
    assert PrivacyPolicy(max_epsilon=10).capped_at(4.0).max_epsilon == 4.0
    assert PrivacyPolicy(max_epsilon=10).capped_at(50.0).max_epsilon == 10.0
    assert PrivacyPolicy(max_epsilon=10).capped_at(0.0).max_epsilon == 10.0  # 0: the run sets none
    PrivacyPolicy(max_epsilon=50).save(tmp_path / "state")
    reply = compute(_node_request(tmp_path, **{"dp.max-epsilon": 0.5}))  # the server's cap, tighter
    assert reply.metrics["declined"] == 1 and "past this node's cap 0.5" in str(reply.status)
