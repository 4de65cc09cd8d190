"""The Flower ServerApp: builds the strategy named in the run config and lets Flower run it.

The same app serves simulation and deployment. Each round's diagnostics and evaluation go to
``metrics.jsonl`` and the global adapter to ``checkpoints/round-N`` in the run directory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import asdict
from logging import INFO, WARNING
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from fedlora.core.client_data import build_partition, client_train_sizes, server_eval_sets
from fedlora.core.config import FederationConfig, stored_run_config
from fedlora.core.model import get_adapter_state
from fedlora.core.reports import write_plots, write_privacy_report
from fedlora.core.run_dir import RESUME_MAY_CHANGE, ResumeError, RunDir, config_changes
from fedlora.core.run_model import load_run_model
from fedlora.hub.sdk.publish import run_name
from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.planning import default_delta, delta_warning, plan_noise
from fedlora.privacy.report import headline
from fedlora.privacy.sampling import sample_rate
from fedlora.server.evaluation import ServerEvaluator
from fedlora.strategies import registry
from fedlora.strategies.flower import LoraStrategy
from fedlora.strategies.server_opt import OptimizerState

app = ServerApp()


class PromptGrid:
    """Flower's Grid, collecting replies every ``poll`` seconds instead of every 3 s, with messages
    that expire when their round does.

    Flower 1.41's deployment grid sleeps 3 s between pulls in ``send_and_receive`` (0-3 s lost
    per round after the last reply lands); this re-implements that one method with the Grid's
    own public ``push_messages`` / ``pull_messages`` and delegates everything else. Flower's
    messages live 12 hours by default, so a node that came back after its round timed out would
    still get the round's message, train it and spend privacy budget on a reply nobody reads:
    here each message's time to live is the round's timeout.
    """

    def __init__(self, grid: Grid, poll: float = 0.2) -> None:
        self._grid = grid
        self._poll = poll

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if timeout is not None:
            for msg in messages:  # a round's messages expire with it: a late node never trains a closed round
                msg.metadata.ttl = float(timeout)
        waiting = set(self._grid.push_messages(messages))
        end = time.time() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while timeout is None or time.time() < end:
            got = list(self._grid.pull_messages(waiting))
            replies.extend(got)
            waiting.difference_update(m.metadata.reply_to_message_id for m in got)
            if not waiting:
                break
            time.sleep(self._poll)
        return replies


def algorithm_kwargs(cfg: FederationConfig, scaling: float, fan_in_fan_out: bool) -> dict[str, Any]:
    """Constructor arguments of the run's algorithm (any registered one), from the run config."""
    return {
        "scaling": scaling,
        "seed": cfg.seed,
        "settings": cfg.method,
        "lora_rank": cfg.lora.rank,
        "fan_in_fan_out": fan_in_fan_out,
        "use_rslora": cfg.lora.rslora,
    }


#: the weight cap in deployment when ``robust.max-examples`` is 0 (the server cannot see the data)
DEPLOYED_MAX_EXAMPLES = 100_000


def weight_cap(cfg: FederationConfig) -> int:
    """The most examples (weight) one reply may claim: ``robust.max-examples``, else in simulation
    the largest client's training set (the server builds the same partition), else
    :data:`DEPLOYED_MAX_EXAMPLES`."""
    if cfg.robust.max_examples:
        return cfg.robust.max_examples
    return DEPLOYED_MAX_EXAMPLES if cfg.deployed else max(client_train_sizes(cfg))


class RoundWriter:
    """Flower's ``evaluate_fn`` hook: after each round, append metrics, then checkpoint.

    The metrics row goes first: a checkpoint on disk implies its row is there too, so a
    resume from the newest checkpoint drops only rows of rounds it will run again.
    """

    def __init__(
        self,
        run_dir: RunDir,
        strategy: LoraStrategy,
        cfg: FederationConfig,
        evaluator: ServerEvaluator | None = None,
        elapsed_before: float = 0.0,
    ) -> None:
        self.run_dir = run_dir
        self.strategy = strategy
        self.cfg = cfg
        self.evaluator = evaluator
        self.started = time.perf_counter() - elapsed_before

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        server_round += self.strategy.round_offset
        if self.cfg.resume and server_round == self.strategy.round_offset:
            return None  # the checkpoint this resumed run started from
        state = arrays.to_torch_state_dict()
        row: dict[str, Any] = {"round": server_round, "elapsed": round(time.perf_counter() - self.started, 3)}
        if self.cfg.dp.client_level != "off" and server_round:
            done = self.strategy.round_offset
            done += sum(1 for r in self.strategy.rounds.values() if r.failed is None and r.accepted)
            delta = self.cfg.dp.delta or default_delta(self.cfg.num_clients)
            row["client-level-dp"] = {
                "epsilon": compute_epsilon(
                    [(self.cfg.dp.client_noise_multiplier, 1.0, done)], delta, self.cfg.dp.accountant
                ),
                "delta": delta,
                "privacy-unit": "client",
            }
        rec = self.strategy.rounds.get(server_round)
        if rec is not None:
            row |= {
                "train": rec.train,
                "evaluate": rec.evaluate,
                "per-client": {str(k): v for k, v in rec.per_client.items()},
                "per-client-train": {str(k): v for k, v in rec.clients_train.items()},
                "dropped": {str(k): v for k, v in rec.reasons.items()},
                "failed": rec.failed,
            }
        if self.evaluator:
            row["server-eval"] = self.evaluator(state)
        self.run_dir.append_row(row)
        extra = {"server-round": server_round, "strategy": self.cfg.strategy}
        opt = self.strategy.server_opt_state.to_tensors() if self.strategy.server_opt is not None else None
        self.run_dir.checkpoint(server_round, state, extra, opt)
        return None


def plan_privacy(cfg: FederationConfig, run_dir: RunDir) -> tuple[float, float, float]:
    """The noise multiplier for the whole run, calibrated once before training starts.

    From the target epsilon over the planned rounds, the expected participation rate and
    every client's local steps at q = batch / local examples; an explicit
    ``dp.noise-multiplier`` wins. The plan is logged and written to the run directory; a
    resumed run reads it back instead of calibrating again. Returns (sigma, delta, q): one delta
    for every client of the run, so their epsilons are comparable, and the plan's sampling rate,
    which no client may exceed. In deployment the server cannot see the clients' data:
    ``dp.plan-examples`` states the smallest client the plan covers (smaller ones decline).
    """
    stored = run_dir.plan(missing_ok=True) if cfg.resume else None
    if stored is not None:
        log(INFO, "fedlora: resumed run keeps its privacy plan: noise multiplier %s", stored["noise_multiplier_used"])
        return float(stored["noise_multiplier_used"]), float(stored["delta"]), float(stored["sample_rate"])
    # the largest sampling rate bounds every client's epsilon
    smallest = cfg.dp.plan_examples or min(client_train_sizes(cfg))
    q = sample_rate(cfg.batch_size, smallest)
    delta = cfg.dp.delta or default_delta(smallest)
    warning = delta_warning(delta, smallest)
    if warning:
        log(WARNING, "fedlora: %s", warning)
    plan = plan_noise(
        cfg.dp.target_epsilon, delta, cfg.num_rounds, cfg.fraction_train, cfg.local_steps, q, cfg.dp.accountant
    )
    sigma = cfg.dp.noise_multiplier or plan.noise_multiplier
    log(
        INFO,
        "fedlora: privacy plan for the smallest client (%s examples)\n%s\nnoise multiplier used: %s",
        smallest,
        plan.describe(),
        sigma,
    )
    run_dir.write_plan(
        {
            **asdict(plan),
            "noise_multiplier_used": sigma,
            "max_grad_norm": cfg.dp.max_grad_norm,
            "smallest_client_examples": smallest,
        },
    )
    return sigma, delta, q


def with_client_level_dp(strategy: LoraStrategy, cfg: FederationConfig, run_dir: RunDir) -> Strategy:
    """Flower's own fixed-clipping DP wrapper around our strategy, when asked for.

    Its privacy unit is a whole client's dataset (client-level DP): each round is a Gaussian
    mechanism on the average of m clipped updates (noise sigma * C / m), composed over the
    rounds without subsampling amplification, as Flower's accountant does. We account it
    ourselves (Flower's accountant refuses aggregations other than FedAvg's) and never mix it
    with the sample-level epsilon of DP-SGD.
    """
    if cfg.dp.client_level == "off":
        return strategy
    m = max(1, int(cfg.num_clients * cfg.fraction_train))
    wrapper = (
        DifferentialPrivacyServerSideFixedClipping
        if cfg.dp.client_level == "server-side"
        else DifferentialPrivacyClientSideFixedClipping
    )
    delta = cfg.dp.delta or default_delta(cfg.num_clients)
    run_dir.write_client_level_dp(
        {
            "privacy-unit": "one client's whole dataset (client-level DP)",
            "clipping": cfg.dp.client_level,
            "noise-multiplier": cfg.dp.client_noise_multiplier,
            "clipping-norm": cfg.dp.client_clipping_norm,
            "sampled-clients": m,
            "delta": delta,
            "epsilon-after-planned-rounds": compute_epsilon(
                [(cfg.dp.client_noise_multiplier, 1.0, cfg.num_rounds)], delta, cfg.dp.accountant
            ),
            "accountant": cfg.dp.accountant,
        },
    )
    return wrapper(strategy, cfg.dp.client_noise_multiplier, cfg.dp.client_clipping_norm, m)


def prepare_run_dir(run_dir: RunDir, cfg: FederationConfig, resolved: dict[str, Any]) -> None:
    """Refuse to mix two runs in one directory; on resume, refuse a different configuration."""
    if not cfg.resume:
        if run_dir.holds_run():
            raise ValueError(
                f"run directory {run_dir.root} already holds a run: resume it (resume = true, fl-sim --resume) "
                "or choose another run-dir"
            )
        return
    if not run_dir.config_path.is_file():
        raise ResumeError(f"cannot resume {run_dir.root}: it has no {run_dir.config_path.name}")
    changed = config_changes(stored_run_config(run_dir), resolved, RESUME_MAY_CHANGE)
    if changed:
        raise ResumeError(f"cannot resume {run_dir.root} with a different configuration ({', '.join(changed)})")


def write_partition(run_dir: RunDir, cfg: FederationConfig) -> None:
    """Write (or, on resume, check) who holds which examples; deployed nodes bring their own."""
    split = None if cfg.deployed else build_partition(cfg)
    if split is None:
        return
    stored = run_dir.partition() if cfg.resume else None
    if stored is not None:
        if stored != split:
            path = run_dir.partition_path
            raise ResumeError(f"{path} differs from the split this code computes from the config; cannot resume")
        return
    run_dir.write_partition(split)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured federated LoRA training and write the run directory."""
    cfg = FederationConfig.from_run_config(context.run_config)
    torch.set_num_threads(cfg.threads)
    algo_cls = cfg.algorithm_class
    lr = cfg.lr_for(algo_cls.defaults.lr)
    alpha = cfg.alpha_for(algo_cls.defaults.alpha)
    rank = cfg.max_rank()
    lora = cfg.lora_settings(rank, algo_cls.global_alpha(rank, alpha))  # FlexLoRA's state is at scaling 1
    base_dir = cfg.base_model_dir()
    run_model = load_run_model(cfg, lora)
    model = run_model.model
    fan_in_fan_out = bool(getattr(model.peft_config["default"], "fan_in_fan_out", False))
    scaling = cfg.lora_settings(rank, alpha).scaling
    run_dir = RunDir(cfg.run_dir, model, base_dir)
    run_dir.make()
    resolved = cfg.to_run_config() | {"lr": lr, "lora-alpha": alpha, "scaling": scaling, "run-id": context.run_id}
    prepare_run_dir(run_dir, cfg, resolved)
    if cfg.resume:  # the run keeps its first id (the clients' ledgers key rounds by it)
        stored = run_dir.config()
        resolved["run-id"] = stored["run-id"]
        resolved["resumed-as"] = [*stored.get("resumed-as", []), context.run_id]
    write_partition(run_dir, cfg)
    done, elapsed_before = 0, 0.0
    if cfg.resume:
        done, initial, _ = run_dir.latest_checkpoint()
        dropped = run_dir.truncate_rows(done)
        rows = run_dir.rows()
        elapsed_before = float(rows[-1].get("elapsed", 0.0)) if rows else 0.0
        log(INFO, "fedlora: resuming %s after round %s (%s later metrics rows dropped)", run_dir.root, done, dropped)
    run_dir.write_config(resolved)
    strategy = LoraStrategy(
        registry.create(cfg.strategy, **algorithm_kwargs(cfg, scaling, fan_in_fan_out)),
        fraction_train=cfg.fraction_train,
        fraction_evaluate=cfg.fraction_evaluate,
        min_train_nodes=cfg.clients_per_round,
        min_evaluate_nodes=max(1, round(cfg.num_clients * cfg.fraction_evaluate)),
        min_available_nodes=cfg.num_clients,
        min_replies=cfg.min_replies,
        max_reply_bytes=int(cfg.max_reply_mb * 2**20),
        max_examples=weight_cap(cfg),
        norm_factor=cfg.robust.norm_factor,
        aggregate=cfg.robust.aggregate,
        pin_examples=cfg.deployed,
        trim=cfg.robust.trim,
        max_update_norm=cfg.robust.max_update_norm,
        on_accepted_reply=run_dir.audit_reply if cfg.audit.save_updates else None,
        lr=lr,
        lr_decay=cfg.lr_decay,
        round_offset=done,
        server_opt=cfg.server_opt,
        server_opt_state=OptimizerState.from_tensors(run_dir.server_opt_state(done)) if done else None,
    )
    if not cfg.resume:
        initial = strategy.algorithm.initial_state(get_adapter_state(model))
    train_config = ConfigRecord({"local-steps": cfg.local_steps, "ledger-run": str(resolved["run-id"])})
    if cfg.dp.enabled:
        sigma, delta, q = plan_privacy(cfg, run_dir)
        train_config["dp-noise-multiplier"], train_config["dp-delta"], train_config["dp-sample-rate"] = sigma, delta, q
    log(INFO, "fedlora: %s, lr %s, alpha %s, run directory %s", cfg.strategy, lr, alpha, run_dir.root)
    evaluator = ServerEvaluator(run_model, server_eval_sets(cfg), cfg.model.eval_batch_size)
    writer = RoundWriter(run_dir, strategy, cfg, evaluator, elapsed_before)
    final = ArrayRecord(initial)
    if cfg.num_rounds > done:
        result = with_client_level_dp(strategy, cfg, run_dir).start(
            grid=cast(Grid, PromptGrid(grid)),
            initial_arrays=ArrayRecord(initial),
            num_rounds=cfg.num_rounds - done,
            timeout=cfg.round_timeout,
            train_config=train_config,
            evaluate_config=ConfigRecord({}),
            evaluate_fn=writer,
        )
        final = result.arrays if len(result.arrays) else final
    out = run_dir.save_global(final.to_torch_state_dict())
    log(INFO, "fedlora: final global adapter written to %s", out)
    paths = write_privacy_report(run_dir)
    log(INFO, "fedlora: %s; privacy report %s", headline(json.loads(paths.json.read_text())), paths.markdown)
    try:  # derived from files already written: a plotting problem must not fail a finished run
        for path in write_plots(run_dir):
            log(INFO, "fedlora: wrote %s", path)
    except Exception as err:
        why = f"{type(err).__name__}: {err}"
        log(WARNING, "fedlora: training plots not written (%s); `fl-sim report %s` retries", why, run_dir.root)
    if cfg.personalize.steps > 0:
        personalize_clients(cast(Grid, PromptGrid(grid)), cfg, run_dir, final, cfg.num_rounds)


def personalize_clients(
    grid: Grid, cfg: FederationConfig, run_dir: RunDir, final: ArrayRecord, final_round: int
) -> None:
    """After the run (``personalize.steps`` > 0): every connected client fine-tunes the final
    adapter on its own split and keeps it (and publishes it, if it has a hub); the outcome per
    client goes to ``personalize.json``. It comes after the privacy report, which covers the
    federated training; what personalisation spends is in each client's ledger and reply."""
    config = ConfigRecord({"run-name": run_name(run_dir.root), "server-round": final_round})
    record = RecordDict({"arrays": final, "config": config})
    nodes = sorted(grid.get_node_ids())
    messages = [Message(content=record, message_type="query.personalize", dst_node_id=n) for n in nodes]
    log(
        INFO,
        "fedlora: personalising the final adapter on %d clients (%d steps each)",
        len(nodes),
        cfg.personalize.steps,
    )
    replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
    clients: list[dict[str, Any]] = []
    for reply in replies:
        row: dict[str, Any] = {"node-id": str(reply.metadata.src_node_id)}
        if reply.has_error():
            row["error"] = reply.error.reason
        else:
            content = reply.content
            row |= dict(content.metric_records["metrics"]) if "metrics" in content.metric_records else {}
            if "client" in content.config_records:
                row["client"] = str(content.config_records["client"]["name"])
            if "status" in content.config_records:
                row["status"] = str(content.config_records["status"]["reason"])
        clients.append(row)
    done = [c for c in clients if "personalize-seconds" in c and not c.get("declined")]
    scored = [c for c in done if "personal-exact-match" in c]  # a node's policy may keep its scores (DP runs)
    summary: dict[str, Any] = {
        "round": final_round,
        "steps": cfg.personalize.steps,
        "epsilon-target": cfg.personalize.epsilon if cfg.dp.enabled else None,
        "asked": len(nodes),
        "personalised": len(done),
        "clients": clients,
    }
    log(INFO, "fedlora: personalised on %d of %d clients", len(done), len(nodes))
    if scored:
        summary["global-exact-match-mean"] = sum(c["global-exact-match"] for c in scored) / len(scored)
        summary["personal-exact-match-mean"] = sum(c["personal-exact-match"] for c in scored) / len(scored)
        log(
            INFO,
            "fedlora: exact match on the own test splits of the %d clients that report it: %.3f -> %.3f",
            len(scored),
            summary["global-exact-match-mean"],
            summary["personal-exact-match-mean"],
        )
    for c in clients:
        if "error" in c or "status" in c:
            log(
                WARNING,
                "fedlora: personalisation on %s: %s",
                c.get("client", c["node-id"]),
                c.get("error") or c["status"],
            )
    run_dir.write_personalize(summary)
