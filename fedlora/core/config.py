"""The federated run's configuration: one frozen object built from Flower's run config.

Server app and client app read the same Flower run config (``[tool.flwr.app.config]`` plus
``--run-config`` overrides); both validate it here, once, into :class:`FederationConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

from fedlora.core.model import ALL_LINEAR, LoraSettings
from fedlora.core.partitioners import PartitionSpec
from fedlora.core.run_dir import RunDir
from fedlora.core.tasks import get_task
from fedlora.privacy.engines import Engine, check_engine

#: methods whose server needs each client's own product B_k A_k
PRODUCT_BASED_STRATEGIES = frozenset({"lora-fair", "fedex-lora", "flexlora"})


def secure_aggregation_refusal(strategy: str) -> str:
    """Why ``secure-aggregation = true`` is refused for ``strategy`` (it always is, today)."""
    if strategy in PRODUCT_BASED_STRATEGIES:
        return (
            f"secure-aggregation cannot work with {strategy!r}: its server needs each client's own product "
            "B_k A_k (or s_k B_k A_k), which secure aggregation hides by design; use a sum-only strategy "
            "(fedavg-lora, ffa-lora, rolora, fedsvd)"
        )
    return (
        f"secure-aggregation is not available for {strategy!r} with Flower's Message API: Flower 1.41 ships "
        "SecAgg+ only as a legacy workflow (flwr.server.workflow.SecAggPlusWorkflow with secaggplus_mod), which "
        "requires a LegacyContext and a legacy Strategy.aggregate_fit, not Message-API strategies such as "
        "fedlora's; fedlora refuses rather than aggregate in the clear"
    )


#: strategies Flower's fixed-clipping DP wrappers can wrap soundly (see dp.client-level)
CLIENT_LEVEL_DP_STRATEGIES = frozenset({"fedavg-lora"})


@dataclass(frozen=True)
class FederationConfig:
    """Validated run configuration (field names are the run-config keys in snake case)."""

    strategy: str = "fedavg-lora"
    num_rounds: int = 3
    num_clients: int = 4
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_replies: int = 1
    local_steps: int = 20
    lr: float = 0.0
    lr_decay: float = 1.0
    batch_size: int = 32
    lora_rank: int = 8
    lora_alpha: float = 0.0
    lora_dropout: float = 0.0
    lora_targets: str = ALL_LINEAR
    lora_rslora: bool = False
    flexlora_ranks: str = ""
    lora_fair_lambda: float = 0.01
    lora_fair_solver: str = "iterative"
    lora_fair_steps: int = 1000
    tasks: str = "adddigit-4,rotate-2,repeat-3,sort-desc"
    tagged: bool = True
    num_train: int = 2000
    num_test: int = 100
    data_path: str = ""
    partition_scheme: str = "tasks-per-client"
    partition_alpha: float = 0.5
    partition_tasks_per_client: int = 1
    partition_size_skew: float = 0.0
    server_eval: bool = True
    seed: int = 0
    model_dir: str = ""
    run_dir: str = "runs/sim"
    round_timeout: float = 600.0
    max_reply_mb: float = 256.0
    threads: int = 1
    audit_save_updates: bool = False
    state_dir: str = ""
    dp_enabled: bool = False
    dp_noise_multiplier: float = 0.0
    dp_target_epsilon: float = 8.0
    dp_delta: float = 0.0
    dp_max_grad_norm: float = 1.0
    dp_accountant: str = "rdp"
    dp_plan_examples: int = 0
    dp_max_epsilon: float = 0.0
    dp_secret_noise: bool = True
    dp_engine: Engine = "opacus"  # per-example clipping: Opacus' hooks, or the fused LoRA kernels
    dp_client_level: str = "off"
    dp_client_noise_multiplier: float = 1.0
    dp_client_clipping_norm: float = 1.0
    secure_aggregation: bool = False
    personalize_steps: int = 0  # > 0: at the end of the run every client personalises the final adapter
    personalize_epsilon: float = 1.0  # what that personalisation may spend (DP runs), on top of the run's
    resume: bool = False
    deployed: bool = False

    def __post_init__(self) -> None:
        for name in ("num_rounds", "num_clients", "min_replies", "local_steps", "batch_size", "lora_rank", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{_key(name)} must be an integer >= 1, got {v!r}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train!r}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:  # 0: no evaluation round trip (train replies carry it)
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate!r}")
        for name in ("lr", "lora_alpha", "lora_fair_lambda"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{_key(name)} must be a finite number >= 0, got {v!r}")
        if self.lora_fair_solver not in ("iterative", "closed-form"):
            raise ValueError(f"lora-fair-solver must be 'iterative' or 'closed-form', got {self.lora_fair_solver!r}")
        if self.lora_fair_steps < 0:
            raise ValueError(f"lora-fair-steps must be >= 0, got {self.lora_fair_steps!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr-decay must be in (0, 1], got {self.lr_decay!r}")
        if self.round_timeout <= 0 or self.max_reply_mb <= 0:
            raise ValueError("round-timeout and max-reply-mb must be > 0")
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"num-train and num-test must be >= 1, got {self.num_train}, {self.num_test}")
        for t in self.task_list:
            get_task(t)  # raises with the known names
        if self.data_path and not Path(self.data_path).exists():
            raise FileNotFoundError(f"data-path {self.data_path} does not exist (a JSONL file or a directory of them)")
        if self.data_path and Path(self.data_path).is_dir():
            files = self.client_files()
            if len(files) != self.num_clients:
                raise ValueError(
                    f"data-path {self.data_path} holds {len(files)} .jsonl file(s) but num-clients is "
                    f"{self.num_clients}: a directory gives one file per client"
                )
        if not self.data_path or Path(self.data_path).is_file():
            self.partition_spec()  # validates scheme, alpha, sizes and feasibility, naming the problem
        if self.model_dir and not (Path(self.model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"model-dir {self.model_dir} does not exist or has no config.json")
        # imported here: fedlora.strategies.flower imports flwr, which the CLI need not load to validate
        from fedlora.strategies.flower import strategy_class

        strategy_class(self.strategy)  # raises with the known names
        ranks = self.flexlora_rank_list
        if any(r < 1 for r in ranks):
            raise ValueError(f"flexlora-ranks must be positive integers, got {self.flexlora_ranks!r}")
        LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha or 1.0, dropout=self.lora_dropout)
        for name in ("dp_noise_multiplier", "dp_max_epsilon"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{_key(name)} must be a finite number >= 0, got {v!r}")
        if self.dp_plan_examples < 0:
            raise ValueError(f"dp.plan-examples must be >= 0, got {self.dp_plan_examples}")
        if self.deployed and self.dp_enabled and not self.dp_plan_examples:
            raise ValueError(
                "dp.plan-examples must be set in deployment: the server cannot see the clients' data, so the "
                "privacy plan states the smallest client it covers (clients with fewer examples decline)"
            )
        if not self.dp_target_epsilon > 0 or not self.dp_max_grad_norm > 0:
            raise ValueError("dp.target-epsilon and dp.max-grad-norm must be > 0")
        if not 0 <= self.dp_delta < 1:
            raise ValueError(f"dp.delta must be in [0, 1) (0: derived from num-train), got {self.dp_delta!r}")
        if self.dp_client_level not in ("off", "server-side", "client-side"):
            raise ValueError(
                f"dp.client-level must be 'off', 'server-side' or 'client-side', got {self.dp_client_level!r}"
            )
        if self.dp_client_level != "off":
            if self.strategy not in CLIENT_LEVEL_DP_STRATEGIES:
                raise ValueError(
                    f"dp.client-level works with {sorted(CLIENT_LEVEL_DP_STRATEGIES)} only, not {self.strategy!r}: "
                    "Flower's fixed-clipping wrappers clip each reply against the full global state and add noise "
                    "to the plain average, so they need clients that send every tensor they download and a server "
                    "that only averages (B-only replies, products and base-weight residuals break that)"
                )
            if not self.dp_client_noise_multiplier > 0 or not self.dp_client_clipping_norm > 0:
                raise ValueError("dp.client-noise-multiplier and dp.client-clipping-norm must be > 0")
        if self.secure_aggregation:
            raise ValueError(secure_aggregation_refusal(self.strategy))
        if not isinstance(self.personalize_steps, int) or self.personalize_steps < 0:
            raise ValueError(f"personalize.steps must be an integer >= 0 (0: off), got {self.personalize_steps!r}")
        if not math.isfinite(self.personalize_epsilon) or self.personalize_epsilon <= 0:
            raise ValueError(f"personalize.epsilon must be a finite number > 0, got {self.personalize_epsilon!r}")
        from fedlora.privacy.accounting import check_accountant

        check_accountant(self.dp_accountant)
        check_engine(self.dp_engine)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Build from Flower's run config; unknown keys are refused with the allowed ones."""
        known = {_key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(run_config) - set(known))
        if unknown:
            raise ValueError(f"run config: unknown key(s) {unknown}; allowed: {sorted(known)}")
        values: dict[str, Any] = {}
        for key, value in run_config.items():
            name = known[key]
            default = getattr(cls, name)
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"run config: {key} must be true or false, got {value!r}")
            elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif not isinstance(value, type(default)) or isinstance(value, bool):
                raise ValueError(f"run config: {key} must be a {type(default).__name__}, got {value!r}")
            values[name] = value
        return cls(**values)

    def to_run_config(self) -> dict[str, Any]:
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}

    @property
    def task_list(self) -> list[str]:
        tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if not tasks:
            raise ValueError("tasks must name at least one embedded task")
        return tasks

    @property
    def flexlora_rank_list(self) -> list[int]:
        try:
            return [int(r) for r in self.flexlora_ranks.split(",") if r.strip()]
        except ValueError:
            raise ValueError(f"flexlora-ranks must be comma-separated integers, got {self.flexlora_ranks!r}") from None

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round. Flower samples ``int(n * fraction)``, which float rounding can
        put one below the intended count (22 * (15/22) = 14.99...); the server passes this as the
        minimum, so ``fraction-train = p / n`` samples exactly p."""
        return max(1, round(self.num_clients * self.fraction_train))

    def lr_for(self, default: float) -> float:
        return self.lr or default

    def alpha_for(self, default: float) -> float:
        return self.lora_alpha or default

    def client_rank(self, partition: int) -> int:
        """A client's LoRA rank: FlexLoRA cycles through ``flexlora-ranks``, others share one."""
        ranks = self.flexlora_rank_list
        return ranks[partition % len(ranks)] if self.strategy == "flexlora" and ranks else self.lora_rank

    def max_rank(self) -> int:
        return max([self.lora_rank, *self.flexlora_rank_list]) if self.strategy == "flexlora" else self.lora_rank

    def lora_settings(self, rank: int, alpha: float) -> LoraSettings:
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        return LoraSettings(
            rank=rank,
            alpha=alpha,
            dropout=self.lora_dropout,
            target_modules=targets,
            use_rslora=self.lora_rslora,
            init_seed=self.seed,
        )

    def client_state_dir(self, partition: int, node_state_dir: str | None = None) -> Path:
        """Where a client keeps its lifetime privacy ledger: the node's own directory in
        deployment, ``<state-dir>/partition-<p>`` in simulation (default under the run dir).
        Point several runs at one state-dir and their epsilon composes."""
        if node_state_dir:
            return Path(node_state_dir)
        return RunDir(self.run_dir).client_state_dir(partition, self.state_dir)

    def client_files(self) -> list[Path]:
        """With ``data-path`` a directory: its ``*.jsonl`` files, sorted by name; client p gets file p."""
        return sorted(Path(self.data_path).glob("*.jsonl"))

    def partition_spec(self) -> PartitionSpec:
        """How the pool is split among the clients.

        On the embedded suite every task's pool holds ``num_clients * num_train / len(tasks)``
        examples, so ``num-train`` is the mean client size; a user's single JSONL file is split
        by its records' ``task`` labels.
        """
        embedded = not self.data_path
        tasks = tuple(self.task_list) if embedded else ()
        return PartitionSpec(
            scheme=self.partition_scheme,
            num_clients=self.num_clients,
            alpha=self.partition_alpha,
            tasks_per_client=self.partition_tasks_per_client,
            size_skew=self.partition_size_skew,
            seed=self.seed,
            tasks=tasks,
            examples_per_task=math.ceil(self.num_clients * self.num_train / len(tasks)) if embedded else 1,
        )

    def data_key(self) -> tuple[object, ...]:
        """Everything that decides the clients' data: a cache key for one process."""
        return (self.data_path, self.partition_spec(), self.num_test, self.tagged)


_SECTIONS = ("audit_", "dp_", "partition_", "personalize_")


def _key(field_name: str) -> str:
    """Run-config key of a field: kebab case, with a dotted section (``dp_max_grad_norm`` is
    ``dp.max-grad-norm``, ``audit_save_updates`` is ``audit.save-updates``)."""
    for section in _SECTIONS:
        if field_name.startswith(section):
            return section[:-1] + "." + field_name[len(section) :].replace("_", "-")
    return field_name.replace("_", "-")


#: Flower run-config defaults: every key a run may override. 0 for lr / lora-alpha means
#: "the strategy's own tuned default".
DEFAULT_RUN_CONFIG: dict[str, bool | int | float | str] = {
    _key(f.name): cast(bool | int | float | str, f.default) for f in fields(FederationConfig)
}
