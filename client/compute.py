"""What a client message computes: local LoRA training (DP-SGD under the node's ledger),
evaluation and personalisation on this node's data, within the node's privacy policy
(:mod:`fedlora.privacy.policy`). The ClientApp (:mod:`fedlora.client.app`) calls :func:`compute`
in a Ray worker (simulation) or in ``fl-client start``'s own process (deployment).

Both processes live for many messages, so the base model, the PEFT wrapper and the encoded
data are cached per process. The global adapter arrives in each message and is the only thing
that changes between messages.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import Tensor

from fedlora.client.hub_commands import PERSONALIZE_FILE, personal_provenance, push_adapter
from fedlora.client.identity import node_partition
from fedlora.client.messages import ReplyContent, Request
from fedlora.client.personalize import PersonalizeConfig, PrivacyBudgetError, personalize
from fedlora.client.private_train import train_private
from fedlora.core.adapter_format import BASE_DELTA_FILE
from fedlora.core.client_data import client_examples, node_examples
from fedlora.core.config import FederationConfig
from fedlora.core.data import Item
from fedlora.core.lora_settings import Factors
from fedlora.core.model import (
    get_adapter_state,
    save_adapter,
    set_adapter_state,
    set_base_deltas,
    set_trainable_factors,
)
from fedlora.core.run_dir import RunDir
from fedlora.core.run_model import RunModel, load_run_model, run_device
from fedlora.core.train import TrainSettings, evaluate, seeded_global_rng, train
from fedlora.hub.sdk.client import HubClient, HubRequestError, read_token
from fedlora.hub.sdk.manifest import load_public_key
from fedlora.hub.sdk.names import check_segment
from fedlora.privacy.dp import DPSGDConfig
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.planning import default_delta
from fedlora.privacy.policy import PrivacyPolicy, RoundRequest, check_round
from fedlora.privacy.sampling import check_poisson_batches, sample_rate
from fedlora.strategies.algorithms import BASE_DELTA_SUFFIX, base_deltas, factor_part, head_part


@dataclass(frozen=True)
class NodeContext:
    """What a reply depends on besides the message: Flower's run config, node config and run id."""

    run_config: Mapping[str, Any]
    node_config: Mapping[str, Any]
    run_id: int


@dataclass
class LocalSetup:
    """What a node keeps between messages when its process lives on (simulation)."""

    run: RunModel
    scaling: float
    pristine: dict[str, Tensor] = field(default_factory=dict)  # base weights before FedEx deltas
    data: OrderedDict[tuple[object, ...], tuple[list[Item], list[Item]]] = field(default_factory=OrderedDict)

    @property
    def model(self) -> PeftModel:
        return self.run.model

    @property
    def pad(self) -> int:
        return self.run.pad_id


_CACHE: dict[tuple[object, ...], LocalSetup] = {}
#: encoded datasets kept per process: a worker serving thousands of virtual clients keeps the
#: most recent ones only, so memory does not grow with the number of clients it has served
DATA_CACHE_SIZE = 64


@dataclass(frozen=True)
class Node:
    """Who this client is: a virtual client of a simulation (partition of the run's pool) or a
    deployed node bringing its own data (``data-path`` in its node config, from ``fl-client start``)."""

    partition: int
    data: str | None = None  # the node's own data: a JSONL file or embedded:TASKS
    state_dir: str | None = None
    name: str | None = None


def _setup(cfg: FederationConfig, node: Node) -> tuple[LocalSetup, list[Item], list[Item], float]:
    """The cached model and this node's encoded data, and how long loading the model took now
    (0 in a warm process)."""
    torch.set_num_threads(cfg.threads)
    defaults = cfg.algorithm_class.defaults
    partition = node.partition
    rank = cfg.client_rank(partition)
    lora = cfg.lora_settings(rank, cfg.alpha_for(defaults.alpha))
    device = run_device(cfg)
    key = (str(cfg.base_model_dir()), lora, cfg.model, str(device), cfg.data_key()[:3])
    setup = _CACHE.get(key)
    load_seconds = 0.0
    if setup is None:
        started = time.perf_counter()
        # safetensors, memory-mapped by transformers; one base model per worker process, whatever
        # the number of virtual clients it serves
        setup = LocalSetup(load_run_model(cfg, lora, device), lora.scaling)
        _CACHE[key] = setup
        load_seconds = time.perf_counter() - started
    data_key = (*cfg.data_key(), partition, node.data)
    if data_key in setup.data:
        setup.data.move_to_end(data_key)
    else:
        if node.data:
            train_ex, test_ex = node_examples(cfg, node.data, cfg.seed * 100_003 + partition)
        else:
            train_ex, test_ex = client_examples(cfg, partition)
        setup.data[data_key] = (setup.run.encode(train_ex).items, setup.run.encode(test_ex).items)
        while len(setup.data) > DATA_CACHE_SIZE:
            setup.data.popitem(last=False)
    train_data, test_data = setup.data[data_key]
    return setup, train_data, test_data, load_seconds


def load_global(setup: LocalSetup, cfg: FederationConfig, state: Mapping[str, Tensor], rank: int) -> None:
    """Put the downloaded global state into the local model, the way the strategy ships it
    (FFA-LoRA rebuilds A from the shared seed, FlexLoRA truncates to this client's rank, ...)."""
    adapter = cfg.algorithm_class.client_adapter(
        factor_part(state),
        local_a={k: v for k, v in get_adapter_state(setup.model, "A").items() if ".lora_A." in k},
        seed=cfg.seed,
        rank=rank,
        scaling=setup.scaling,
    )
    set_adapter_state(setup.model, adapter | head_part(state))
    set_base_deltas(setup.model, base_deltas(state), setup.pristine)


def _node(context: NodeContext) -> tuple[FederationConfig, Node]:
    cfg = FederationConfig.from_run_config(context.run_config)
    config = context.node_config
    # where the model runs is the node operator's choice (fl-client start --device/--dtype)
    device, dtype = str(config.get("device") or cfg.model.device), str(config.get("dtype") or cfg.model.dtype)
    if (device, dtype) != (cfg.model.device, cfg.model.dtype):
        cfg = replace(cfg, model=replace(cfg.model, device=device, dtype=dtype))
    state_dir = str(config["state-dir"]) if config.get("state-dir") else None
    if config.get("data-path"):  # a deployed node (fl-client start)
        name = str(config.get("client-name") or "")
        return cfg, Node(node_partition(name), str(config["data-path"]), state_dir, name)
    return cfg, Node(int(config.get("partition-id", 0)), None, state_dir)


def round_digest(state: Mapping[str, Tensor], round_config: Mapping[str, Any], num_examples: int) -> str:
    """What a round is trained from: the downloaded arrays, the round's config and the data size."""
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().contiguous().cpu().numpy().tobytes())
    h.update(json.dumps({k: str(v) for k, v in round_config.items()}, sort_keys=True).encode())
    h.update(str(num_examples).encode())
    return h.hexdigest()


def compute(request: Request) -> ReplyContent:
    """The reply to one message, in plain Python and numpy."""
    context = NodeContext(request.run_config, request.node_config, request.run_id)
    state = {k: torch.tensor(v) for k, v in request.state.items()}
    if request.kind == "train":
        return train_reply(context, state, request.config)
    if request.kind == "evaluate":
        return evaluate_reply(context, state)
    if request.kind == "personalize":
        return personalize_reply(context, state, request.config)
    raise ValueError(f"unknown message kind {request.kind!r}")


def node_policy(cfg: FederationConfig, context: NodeContext) -> PrivacyPolicy:
    """The privacy policy this reply obeys: a deployed node's own (its state directory's
    ``policy.toml``, set by its operator), or in simulation one derived from the run config."""
    config = context.node_config
    if config.get("data-path") and config.get("state-dir"):  # a deployed node: set by fl-client start
        return PrivacyPolicy.load(Path(str(config["state-dir"]))).capped_at(cfg.dp.max_epsilon)
    personal = cfg.personalize.epsilon if cfg.personalize.steps > 0 else 0.0
    return PrivacyPolicy.for_run(cfg.dp.enabled, cfg.dp.target_epsilon, cfg.dp.max_epsilon, cfg.dp.accountant, personal)


def _declined(privacy: Mapping[str, int | float], reason: str, node: Node) -> ReplyContent:
    return ReplyContent({"declined": 1, "num-examples": 0, **privacy}, status=reason, name=node.name)


def _numpy(tensors: Mapping[str, Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().contiguous().cpu().numpy() for k, v in tensors.items()}


def train_reply(context: NodeContext, state: Mapping[str, Tensor], round_config: Mapping[str, Any]) -> ReplyContent:
    """Train the factors the server asks for, starting from the global adapter.

    With DP on, the client's lifetime ledger decides first whether it may take part at all,
    and is charged before the reply leaves: a crash after the charge over-reports, never under.
    """
    started = time.perf_counter()
    cfg, node = _node(context)
    policy = node_policy(cfg, context)
    if not cfg.dp.enabled and policy.require_dp:
        return _declined({}, "policy: this node trains with DP only (the run has dp.enabled = false)", node)
    partition = node.partition
    setup, train_data, test_data, load_seconds = _setup(cfg, node)
    server_round = int(round_config["server-round"])
    factors: Factors = str(round_config["train-factors"])  # type: ignore[assignment]
    rank = cfg.client_rank(partition)
    settings = TrainSettings(
        steps=int(round_config["local-steps"]),
        lr=float(round_config["lr"]),
        batch_size=cfg.batch_size,
        max_grad_norm=None if cfg.dp.enabled else TrainSettings.max_grad_norm,
        seed=cfg.seed * 1_000_003 + server_round * 10_007 + partition,
        physical_batch_size=cfg.model.physical_batch_size,
    )
    privacy: dict[str, int | float] = {}
    ledger: PrivacyLedger | None = None
    if cfg.dp.enabled:
        # the ledger's key for this run: the first run id of a resumed run, so a round trained
        # again after an interruption is recognised as the same round
        ledger_run = str(round_config.get("ledger-run", context.run_id))
        ledger = PrivacyLedger(cfg.client_state_dir(partition, node.state_dir))
        sigma = float(round_config["dp-noise-multiplier"])
        q = sample_rate(cfg.batch_size, len(train_data))
        run_delta = round_config.get("dp-delta")  # the run's one delta, from the server's plan
        delta = float(run_delta) if isinstance(run_delta, float) else cfg.dp.delta or default_delta(len(train_data))
        spent = ledger.epsilon(delta, policy.accountant) if 0 < delta < 1 else 0.0
        privacy = {"epsilon": spent, "delta": delta, "noise-multiplier": sigma, "sample-rate": q}
        planned_q = round_config.get("dp-sample-rate")  # the plan's q: a smaller client would exceed its epsilon
        if isinstance(planned_q, float) and q > planned_q * (1 + 1e-9):
            reason = (
                f"this client's {len(train_data)} examples give sample rate {q:.4g} > the plan's {planned_q:.4g} "
                "(dp.plan-examples): its epsilon would exceed the target"
            )
            return _declined(privacy, reason, node)
        try:
            check_poisson_batches(settings.batch_size, len(train_data), settings.steps)
        except ValueError as err:
            return _declined(privacy, str(err), node)
        digest = round_digest(state, round_config, len(train_data))
        charged = ledger.charged_entry(ledger_run, server_round)
        if charged is not None and ledger.round_input(ledger_run, server_round) != digest:
            # only an exact replay (same input, same secret seed, same output) may be released again
            reason = f"round {server_round} of run {ledger_run} was already charged for another input"
            return _declined(privacy, reason, node)
        if charged is None:  # a replayed round releases nothing new
            entries = ledger.entries()
            request = RoundRequest(
                dp_enabled=True,
                noise_multiplier=sigma,
                sample_rate=q,
                delta=delta,
                accountant=cfg.dp.accountant,
                steps=settings.steps,
                num_examples=len(train_data),
                run_target=cfg.dp.target_epsilon,
            )
            this_run = [e.history_entry for e in entries if e.run_id == ledger_run]
            breach = check_round(policy, request, [e.history_entry for e in entries], this_run)
            if breach is not None:
                return _declined(privacy, breach, node)
    load_global(setup, cfg, state, rank)
    set_trainable_factors(setup.model, factors)
    if ledger is not None:
        # secret DP randomness by default; from the public config only when asked for (research replays)
        # The opt-out of secret randomness is honoured only on a node that says it is simulated
        # (the simulation runtime sets num-partitions): in deployment the server sets the run config.
        simulated = "num-partitions" in context.node_config
        public = simulated and not cfg.dp.secret_noise
        dp_seed = settings.seed if public else ledger.dp_seed(ledger_run, server_round)
        with seeded_global_rng(dp_seed + 2):
            t0 = time.perf_counter()
            dp = DPSGDConfig(
                noise_multiplier=float(privacy["noise-multiplier"]),
                max_grad_norm=cfg.dp.max_grad_norm,
                engine=cfg.dp.engine,
            )
            result = train_private(setup.model, train_data, settings, setup.pad, dp, dp_seed)
            train_seconds = time.perf_counter() - t0
        ledger.record_input(ledger_run, server_round, digest)  # before the charge: a replay needs both
        ledger.charge(  # idempotent: a replayed round (same seed, same output) is charged once
            ledger_run,
            server_round,
            privacy["noise-multiplier"],
            privacy["sample-rate"],
            settings.steps,
            accountant=policy.accountant,
            delta=privacy["delta"],
        )
        privacy["epsilon"] = ledger.epsilon(privacy["delta"], policy.accountant)
        history = ledger.history()
        privacy["dp-steps"] = sum(steps for _, _, steps in history)
        # the whole lifetime history (public parameters only): the server's report recomputes this
        # client's epsilon from it when the ledger itself stays on the client's machine
        ledger_lists: dict[str, list[int] | list[float]] = {
            "ledger-noise": [float(h[0]) for h in history],
            "ledger-rate": [float(h[1]) for h in history],
            "ledger-steps": [int(h[2]) for h in history],
        }
    else:
        t0 = time.perf_counter()
        with seeded_global_rng(settings.seed):
            result = train(setup.model, train_data, settings, setup.pad)
        train_seconds = time.perf_counter() - t0
        ledger_lists = {}
    local: dict[str, int | float] = {}
    if test_data and policy.metrics_may_leave(ledger is not None):
        # the locally trained adapter on this client's own test split: what personalising would give
        res = evaluate(setup.model, test_data, setup.pad, cfg.model.eval_batch_size)
        local = {"local-exact-match": res.exact_match, "local-eval-loss": res.loss}
        local |= {f"local-{k}": v for k, v in res.metrics.items()}
    # Under DP the training loss is a non-private function of the training examples: it stays here.
    losses = {} if ledger is not None else {"train-loss": result.mean_loss, "train-loss-final": result.final_loss}
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": len(train_data),
        **losses,
        "lora-scaling": setup.scaling,
        "lora-rank": rank,
        "partition-id": partition,
        "seconds": time.perf_counter() - started,
        "train-seconds": train_seconds,
        "load-seconds": load_seconds,
        "pid": os.getpid(),
        **local,
        **privacy,
        **ledger_lists,
    }
    return ReplyContent(metrics, _numpy(get_adapter_state(setup.model, factors)), name=node.name)


def evaluate_reply(context: NodeContext, state: Mapping[str, Tensor]) -> ReplyContent:
    """Exact match and loss of the global adapter on this node's test split (declined when the
    node's policy keeps evaluation results here)."""
    cfg, node = _node(context)
    if not node_policy(cfg, context).metrics_may_leave(cfg.dp.enabled):
        return _declined({}, "policy: evaluation results do not leave this node in DP runs", node)
    setup, _, test_data, _ = _setup(cfg, node)
    load_global(setup, cfg, state, cfg.client_rank(node.partition))
    res = evaluate(setup.model, test_data, setup.pad, cfg.model.eval_batch_size)
    metrics: dict[str, int | float | list[int] | list[float]] = {
        "num-examples": res.num_examples,
        "eval-loss": res.loss,
        "exact-match": res.exact_match,
        **res.metrics,
        "partition-id": node.partition,
    }
    return ReplyContent(metrics, name=node.name)


def _personal_data_label(cfg: FederationConfig, node: Node) -> str:
    """A data spec naming where a node's examples come from (it labels the personal adapter)."""
    if node.data:
        return node.data
    if cfg.data_path and Path(cfg.data_path).is_dir():
        return str(cfg.client_files()[node.partition])
    return cfg.data_path or "embedded:" + cfg.tasks


def personalize_reply(context: NodeContext, state: Mapping[str, Tensor], config: Mapping[str, Any]) -> ReplyContent:
    """The end of a run: fine-tune the final global adapter on this node's own split (DP-SGD
    charged to its ledger in a DP run, see :mod:`fedlora.client.personalize`), keep it, and publish it to
    the node's own hub namespace when ``fl-client start --hub`` configured one.

    The personal adapter goes to ``<state-dir>/personal/<run>`` on a deployed node and to
    ``<run-dir>/personal/partition-<p>`` in simulation (where ``fl-sim --hub`` publishes it)."""
    cfg, node = _node(context)
    policy = node_policy(cfg, context)
    dp = cfg.dp.enabled or policy.require_dp  # a server cannot turn DP off where the node requires it
    # the run's name comes from the server and becomes a directory here: one plain path segment
    run_name, final_round = check_segment(str(config["run-name"]), "run name"), int(config["server-round"])
    setup, _, _, _ = _setup(cfg, node)
    load_global(setup, cfg, state, cfg.client_rank(node.partition))
    if node.data:
        examples = node_examples(cfg, node.data, cfg.seed * 100_003 + node.partition)
        out = Path(str(node.state_dir)) / "personal" / run_name
    else:
        examples = client_examples(cfg, node.partition)
        out = RunDir(cfg.run_dir).personal_adapter_dir(node.partition)
    state_dir = cfg.client_state_dir(node.partition, node.state_dir)
    personal = PersonalizeConfig(
        data=_personal_data_label(cfg, node),
        state_dir=state_dir,
        steps=cfg.personalize.steps,
        batch_size=cfg.batch_size,
        target_epsilon=cfg.personalize.epsilon,
        max_grad_norm=cfg.dp.max_grad_norm,
        delta=cfg.dp.delta,
        accountant=cfg.dp.accountant,
        max_epsilon=(cfg.dp.max_epsilon or None) if dp else None,
        dp_engine=cfg.dp.engine,
        model_dir=cfg.model_dir or None,
        seed=cfg.seed,
        num_train=cfg.num_train,
        num_test=cfg.num_test,
        name=node.name or f"partition-{node.partition}",
        threads=cfg.threads,
        dp=dp,
        physical_batch_size=cfg.model.physical_batch_size,
        device=cfg.model.device,
        dtype=cfg.model.dtype,
        policy=policy,
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=state_dir, prefix=".global-") as tmp:
        save_adapter(setup.model, tmp)
        deltas = {k: v.contiguous() for k, v in state.items() if k.endswith(BASE_DELTA_SUFFIX)}
        if deltas:  # FedEx-LoRA: the residual the global adapter needs on top of the base weights
            save_file(deltas, str(Path(tmp) / BASE_DELTA_FILE))
        try:
            result = personalize(Path(tmp), personal, out, examples=examples)
        except PrivacyBudgetError as err:
            return ReplyContent({"declined": 1}, status=str(err), name=node.name)
    global_info = {
        "name": f"global/{run_name}/{final_round}",
        "provenance": {"strategy": cfg.strategy, "run": run_name, "round": final_round},
    }
    share = policy.metrics_may_leave(result.dp)
    provenance = personal_provenance(result, global_info, share_metrics=share)
    (out / PERSONALIZE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
    metrics: dict[str, int | float] = {"personalize-seconds": result.seconds, "pushed": 0}
    if share:  # not noised: only where the node's policy lets them leave
        metrics |= {
            "global-exact-match": result.before_exact_match,
            "personal-exact-match": result.after_exact_match,
            "num-test": result.num_test_examples,
        }
    if result.dp:
        metrics |= {
            "epsilon": float(result.lifetime_epsilon or 0.0),
            "personalize-epsilon": float(result.personalization_epsilon or 0.0),
        }
    status = None
    hub_url = str(context.node_config.get("hub-url") or "")
    if hub_url:  # the node publishes to its own namespace with its own token
        key = str(context.node_config.get("hub-key") or "")
        try:
            with HubClient(
                hub_url,
                read_token(None, str(context.node_config["hub-token-file"])),
                load_public_key(Path(key)) if key else None,
                ca=str(context.node_config.get("hub-ca") or "") or None,
            ) as hub:
                push_adapter(hub, run_name, out, Path(cfg.model_dir) if cfg.model_dir else None)
            metrics["pushed"] = 1
        except (HubRequestError, ValueError, OSError) as err:
            status = f"personal adapter kept in {out}, not published: {err}"
    return ReplyContent(dict(metrics), status=status, name=node.name)
