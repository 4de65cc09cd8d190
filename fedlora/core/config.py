"""The federated run's configuration: one frozen object built from Flower's run config.

Server app and client app read the same Flower run config (``[tool.flwr.app.config]`` plus
``--run-config`` overrides); both validate it here, once, into :class:`FederationConfig`.

The run config is flat (``dp.max-grad-norm``, ``partition.scheme``, ``lora-rank``,
``lora-fair-lambda``); the object is nested in sections (``cfg.dp.max_grad_norm``,
``cfg.partition.scheme``, ``cfg.lora.rank``, ``cfg.method``), each a frozen dataclass that
validates its own values. A section field's key is the section's ``prefix`` plus the field name
in kebab case, or the field's ``metadata["key"]``. Every registered strategy contributes its own
section (``cfg.methods``, from its module in ``fedlora.strategies``); ``cfg.method`` is the run's.
Cross-section rules (a split that fits the clients, a strategy that client-level DP can wrap)
are checked by :class:`FederationConfig` itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar, NamedTuple, cast

from fedlora.core.kinds import DEFAULT_KIND, check_device, check_dtype, check_kind, get_kind, run_model_dir
from fedlora.core.lora_settings import ALL_LINEAR, LoraSettings
from fedlora.core.partitioners import PartitionSpec
from fedlora.core.run_dir import RunDir
from fedlora.privacy.accounting import check_accountant
from fedlora.privacy.engines import Engine, check_engine
from fedlora.strategies import registry
from fedlora.strategies.algorithms import LoraAlgorithm, MethodSettings, robust_refusal
from fedlora.strategies.robust import check_rule
from fedlora.strategies.server_opt import ServerOptimizer

Value = bool | int | float | str


def secure_aggregation_refusal(strategy: str) -> str:
    """Why ``secure-aggregation = true`` is refused for ``strategy`` (it always is, today)."""
    if registry.get(strategy).product_based:
        sum_only = ", ".join(name for name, algorithm in registry.STRATEGIES.items() if not algorithm.product_based)
        return (
            f"secure-aggregation cannot work with {strategy!r}: its server needs each client's own product "
            "B_k A_k (or s_k B_k A_k), which secure aggregation hides by design; use a sum-only strategy "
            f"({sum_only})"
        )
    return (
        f"secure-aggregation is not available for {strategy!r} with Flower's Message API: Flower 1.41 ships "
        "SecAgg+ only as a legacy workflow (flwr.server.workflow.SecAggPlusWorkflow with secaggplus_mod), which "
        "requires a LegacyContext and a legacy Strategy.aggregate_fit, not Message-API strategies such as "
        "fedlora's; fedlora refuses rather than aggregate in the clear"
    )


def client_level_dp_strategies() -> list[str]:
    """The strategies Flower's fixed-clipping DP wrappers can wrap soundly (see ``dp.client-level``)."""
    return sorted(name for name, algorithm in registry.STRATEGIES.items() if algorithm.client_level_dp)


@dataclass(frozen=True)
class LoraSection:
    """The run's LoRA adapter: ``lora-rank``, ``lora-alpha`` (0: the
    strategy's tuned alpha), ``lora-dropout``, ``lora-targets`` (comma-separated or all-linear),
    ``lora-rslora``."""

    prefix: ClassVar[str] = "lora-"

    rank: int = 8
    alpha: float = 0.0
    dropout: float = 0.0
    targets: str = ALL_LINEAR
    rslora: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"lora-rank must be an integer >= 1, got {self.rank!r}")
        if not math.isfinite(self.alpha) or self.alpha < 0:
            raise ValueError(f"lora-alpha must be a finite number >= 0, got {self.alpha!r}")
        LoraSettings(rank=self.rank, alpha=self.alpha or 1.0, dropout=self.dropout)


@dataclass(frozen=True)
class PartitionSection:
    """How the pool is split among the clients: ``partition.scheme``, ``partition.alpha``
    (Dirichlet), ``partition.tasks-per-client``, ``partition.size-skew``, ``partition.seed``
    (-1, the default: the run's seed; set it to keep one split while the run's seed varies the
    initialisation, the batches and the noise). Whether the split fits the run's clients and
    tasks is the run's check (:meth:`FederationConfig.partition_spec`)."""

    prefix: ClassVar[str] = "partition."

    scheme: str = "tasks-per-client"
    alpha: float = 0.5
    tasks_per_client: int = 1
    size_skew: float = 0.0
    seed: int = -1

    def __post_init__(self) -> None:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < -1:
            raise ValueError(f"partition.seed must be an integer >= 0 (or -1: the run's seed), got {self.seed!r}")
        PartitionSpec(
            scheme=self.scheme, alpha=self.alpha, tasks_per_client=self.tasks_per_client, size_skew=self.size_skew
        )


@dataclass(frozen=True)
class AuditSection:
    """``audit.save-updates``: keep every accepted reply in the run directory, so anyone can
    recompute an aggregation."""

    prefix: ClassVar[str] = "audit."

    save_updates: bool = False


@dataclass(frozen=True)
class RobustSection:
    """What one client can do to a round (``robust.*``): ``max-examples`` caps the weight a reply
    may claim (0: the largest client's training set in simulation, where the server knows the
    partition; 100,000 in deployment, where it cannot), ``norm-factor`` drops a reply whose
    update is more than that many times the round's median update (0: off; needs 3 replies),
    ``max-update-norm`` drops one whose update is longer than that (0: off). An update's norm is
    that of s B A minus the global s B A, summed over modules (the server computes it).
    ``aggregate`` = ``median`` or ``trimmed-mean`` (dropping ``trim`` at each end) combines the
    factors coordinate-wise, unweighted, instead of the method's mean (factor-space methods only)."""

    prefix: ClassVar[str] = "robust."

    max_examples: int = 0
    norm_factor: float = 10.0
    max_update_norm: float = 0.0
    aggregate: str = "mean"
    trim: float = 0.1

    def __post_init__(self) -> None:
        check_rule(self.aggregate, self.trim)
        if isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or self.max_examples < 0:
            raise ValueError(f"robust.max-examples must be an integer >= 0, got {self.max_examples!r}")
        if not math.isfinite(self.norm_factor) or not (self.norm_factor == 0 or self.norm_factor >= 1):
            raise ValueError(f"robust.norm-factor must be 0 (off) or a finite number >= 1, got {self.norm_factor!r}")
        if not math.isfinite(self.max_update_norm) or self.max_update_norm < 0:
            raise ValueError(f"robust.max-update-norm must be a finite number >= 0, got {self.max_update_norm!r}")


@dataclass(frozen=True)
class DpSection:
    """Differential privacy (``dp.*``): sample-level DP-SGD on the clients, planned by the server
    (``enabled``, ``noise-multiplier`` or ``target-epsilon``, ``delta``, ``max-grad-norm``, ...),
    and client-level DP by Flower's fixed-clipping wrappers (``client-level``, ...)."""

    prefix: ClassVar[str] = "dp."

    enabled: bool = False
    noise_multiplier: float = 0.0
    target_epsilon: float = 8.0
    delta: float = 0.0
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    plan_examples: int = 0
    max_epsilon: float = 0.0
    secret_noise: bool = True
    engine: Engine = "opacus"  # per-example clipping: Opacus' hooks, or the fused LoRA kernels
    client_level: str = "off"
    client_noise_multiplier: float = 1.0
    client_clipping_norm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "max_epsilon"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{_section_key(DpSection, name)} must be a finite number >= 0, got {v!r}")
        if self.plan_examples < 0:
            raise ValueError(f"dp.plan-examples must be >= 0, got {self.plan_examples}")
        if not self.target_epsilon > 0 or not self.max_grad_norm > 0:
            raise ValueError("dp.target-epsilon and dp.max-grad-norm must be > 0")
        if not 0 <= self.delta < 1:
            raise ValueError(f"dp.delta must be in [0, 1) (0: derived from num-train), got {self.delta!r}")
        if self.client_level not in ("off", "server-side", "client-side"):
            raise ValueError(
                f"dp.client-level must be 'off', 'server-side' or 'client-side', got {self.client_level!r}"
            )
        if self.client_level != "off" and (not self.client_noise_multiplier > 0 or not self.client_clipping_norm > 0):
            raise ValueError("dp.client-noise-multiplier and dp.client-clipping-norm must be > 0")
        check_accountant(self.accountant)
        check_engine(self.engine)


@dataclass(frozen=True)
class PersonalizeSection:
    """``personalize.steps`` (> 0: at the end of the run every client personalises the final
    adapter) and ``personalize.epsilon`` (what that may spend in a DP run, on top of the run's)."""

    prefix: ClassVar[str] = "personalize."

    steps: int = 0
    epsilon: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"personalize.steps must be an integer >= 0 (0: off), got {self.steps!r}")
        if not math.isfinite(self.epsilon) or self.epsilon <= 0:
            raise ValueError(f"personalize.epsilon must be a finite number > 0, got {self.epsilon!r}")


@dataclass(frozen=True)
class ModelSection:
    """The base model and where it runs: ``model.kind`` (causal-lm, seq-cls, image-cls),
    ``model.device`` (auto: CUDA when this process sees a GPU, else the CPU; cpu; cuda[:i]),
    ``model.dtype`` (float32, bfloat16, float16: the frozen base weights; LoRA factors, heads and
    optimizer state stay float32), ``model.max-length`` (0: the model's own limit, and longer
    records are refused; > 0: longer records are truncated and counted) and
    ``model.eval-batch-size``, ``model.physical-batch-size`` (0: a batch at once; else a logical batch,
    which DP-SGD samples, clips and charges as one step, runs in chunks of this many examples, so
    memory follows the chunk), ``model.labels`` (a classifier's label space, comma-separated;
    empty: the tasks' labels or the data's; deployed nodes need it, as no party sees all data)."""

    prefix: ClassVar[str] = "model."

    kind: str = DEFAULT_KIND
    device: str = "auto"
    dtype: str = "float32"
    max_length: int = 0
    eval_batch_size: int = 64
    physical_batch_size: int = 0  # 0: each batch at once; else chunks of this many (one step, one noise draw)
    labels: str = ""  # a classifier's label space, comma-separated; empty: from the tasks or the data

    def __post_init__(self) -> None:
        check_kind(self.kind)
        check_device(self.device)
        check_dtype(self.dtype)
        if not isinstance(self.max_length, int) or self.max_length < 0:
            raise ValueError(f"model.max-length must be an integer >= 0 (0: the model's own), got {self.max_length!r}")
        if not isinstance(self.physical_batch_size, int) or self.physical_batch_size < 0:
            raise ValueError(
                f"model.physical-batch-size must be an integer >= 0 (0: the whole batch), "
                f"got {self.physical_batch_size!r}"
            )
        if not isinstance(self.eval_batch_size, int) or self.eval_batch_size < 1:
            raise ValueError(f"model.eval-batch-size must be an integer >= 1, got {self.eval_batch_size!r}")


@dataclass(frozen=True)
class ColumnsSection:
    """Which columns of a user's data file hold what (``columns.text``, ``columns.label``,
    ``columns.prompt``, ``columns.completion``, ``columns.messages``, ``columns.image``,
    ``columns.task``); empty: the usual names."""

    prefix: ClassVar[str] = "columns."

    text: str = ""
    label: str = ""
    prompt: str = ""
    completion: str = ""
    messages: str = ""
    image: str = ""
    task: str = ""


#: files ``datasets.Dataset.save_to_disk`` and ``DatasetDict.save_to_disk`` write into their folder
SAVED_DATASET_FILES = ("dataset_dict.json", "state.json", "dataset_info.json")


def is_client_dir(path: str) -> bool:
    """Whether ``data-path`` is a directory of per-client JSONL files (not a saved dataset)."""
    p = Path(path)
    return p.is_dir() and not any((p / name).is_file() for name in SAVED_DATASET_FILES)


#: FederationConfig's section fields and their classes (the methods' sections come from the registry)
_SECTIONS: dict[str, type] = {
    "model": ModelSection,
    "columns": ColumnsSection,
    "lora": LoraSection,
    "partition": PartitionSection,
    "audit": AuditSection,
    "robust": RobustSection,
    "server_opt": ServerOptimizer,
    "dp": DpSection,
    "personalize": PersonalizeSection,
}
_METHODS = "methods"


def _method_sections() -> dict[str, MethodSettings]:
    """Every registered strategy's section at its defaults."""
    return {name: algorithm.settings_cls() for name, algorithm in registry.STRATEGIES.items()}


@dataclass(frozen=True)
class FederationConfig:
    """Validated run configuration: top-level run fields (their names are the run-config keys in
    snake case) and the nested sections ``model``, ``columns``, ``lora``, ``partition``, ``audit``, ``robust``, ``dp``,
    ``personalize`` and ``methods`` (every registered strategy's own section; ``method`` is the run's)."""

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
    model: ModelSection = field(default_factory=ModelSection)
    columns: ColumnsSection = field(default_factory=ColumnsSection)
    lora: LoraSection = field(default_factory=LoraSection)
    methods: Mapping[str, MethodSettings] = field(default_factory=_method_sections)
    tasks: str = ""  # empty: the kind's default tasks
    tagged: bool = True
    num_train: int = 2000
    num_test: int = 100
    data_path: str = ""
    partition: PartitionSection = field(default_factory=PartitionSection)
    server_eval: bool = True
    seed: int = 0
    model_dir: str = ""
    run_dir: str = "runs/sim"
    round_timeout: float = 600.0
    max_reply_mb: float = 256.0
    threads: int = 1
    audit: AuditSection = field(default_factory=AuditSection)
    robust: RobustSection = field(default_factory=RobustSection)
    server_opt: ServerOptimizer = field(default_factory=ServerOptimizer)
    state_dir: str = ""
    dp: DpSection = field(default_factory=DpSection)
    secure_aggregation: bool = False
    personalize: PersonalizeSection = field(default_factory=PersonalizeSection)
    resume: bool = False
    deployed: bool = False

    def __post_init__(self) -> None:
        for name in ("num_rounds", "num_clients", "min_replies", "local_steps", "batch_size", "threads"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{_key(name)} must be an integer >= 1, got {v!r}")
        for name, section_cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), section_cls):
                raise TypeError(f"{name} must be a {section_cls.__name__}, got {getattr(self, name)!r}")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ValueError(f"fraction-train must be in (0, 1], got {self.fraction_train!r}")
        if not 0.0 <= self.fraction_evaluate <= 1.0:  # 0: no evaluation round trip (train replies carry it)
            raise ValueError(f"fraction-evaluate must be in [0, 1], got {self.fraction_evaluate!r}")
        if not math.isfinite(self.lr) or self.lr < 0:
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr!r}")
        if not 0 < self.lr_decay <= 1:
            raise ValueError(f"lr-decay must be in (0, 1], got {self.lr_decay!r}")
        if self.round_timeout <= 0 or self.max_reply_mb <= 0:
            raise ValueError("round-timeout and max-reply-mb must be > 0")
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"num-train and num-test must be >= 1, got {self.num_train}, {self.num_test}")
        if not self.tasks:
            object.__setattr__(self, "tasks", get_kind(self.model.kind).default_tasks)
        known = get_kind(self.model.kind).task_names()
        for t in self.task_list:
            if t not in known:
                raise ValueError(
                    f"unknown task {t!r} for model.kind = {self.model.kind}; known tasks: {', '.join(known)}"
                )
        if self.data_path and not Path(self.data_path).exists():
            raise FileNotFoundError(
                f"data-path {self.data_path} does not exist (a JSONL, JSON, CSV or Parquet file, a saved "
                "dataset directory, or a directory of JSONL files, one per client)"
            )
        if self.data_path and is_client_dir(self.data_path):
            files = self.client_files()
            if len(files) != self.num_clients:
                raise ValueError(
                    f"data-path {self.data_path} holds {len(files)} .jsonl file(s) but num-clients is "
                    f"{self.num_clients}: a directory gives one file per client"
                )
        if not self.data_path or not is_client_dir(self.data_path):
            self.partition_spec()  # validates the split's feasibility for these clients and tasks, naming the problem
        if self.model_dir and not (Path(self.model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"model-dir {self.model_dir} does not exist or has no config.json")
        registry.get(self.strategy)  # raises with the known names
        object.__setattr__(self, "methods", MappingProxyType({**_method_sections(), **self.methods}))  # frozen too
        for name, section in self.methods.items():
            if type(section) is not registry.get(name).settings_cls:
                want = registry.get(name).settings_cls.__name__
                raise TypeError(f"methods[{name!r}] must be a {want}, got {section!r}")
        if self.deployed and self.dp.enabled and not self.dp.plan_examples:
            raise ValueError(
                "dp.plan-examples must be set in deployment: the server cannot see the clients' data, so the "
                "privacy plan states the smallest client it covers (clients with fewer examples decline)"
            )
        if self.dp.client_level != "off" and not self.algorithm_class.client_level_dp:
            raise ValueError(
                f"dp.client-level works with {client_level_dp_strategies()} only, not {self.strategy!r}: "
                "Flower's fixed-clipping wrappers clip each reply against the full global state and add noise "
                "to the plain average, so they need clients that send every tensor they download and a server "
                "that only averages (B-only replies, products and base-weight residuals break that)"
            )
        if self.secure_aggregation:
            raise ValueError(secure_aggregation_refusal(self.strategy))
        if not self.server_opt.plain and not self.algorithm_class.server_optimizer:
            allowed = ", ".join(n for n, a in registry.STRATEGIES.items() if a.server_optimizer)
            raise ValueError(
                f"server-opt works with {allowed} only, not {self.strategy!r}: a server optimizer keeps moments "
                "per coordinate of the global factors, and this method does not keep its factors' coordinates "
                "from one round to the next"
            )
        if self.robust.aggregate != "mean" and self.algorithm_class.product_based:
            raise ValueError(robust_refusal(self.strategy, self.robust.aggregate))
        if self.deployed and self.model.kind != DEFAULT_KIND and not self.model.labels:
            raise ValueError(
                f"model.labels must be set for a deployed {self.model.kind} run: no party sees every node's "
                "data, so the label space (and with it the head) is the run's to state"
            )
        if self.personalize.steps and self.model.kind != DEFAULT_KIND:
            raise ValueError(
                f"personalize.steps works with model.kind = {DEFAULT_KIND} only for now, not {self.model.kind!r}: "
                "a personal classifier would need the run's label space stored with the global adapter"
            )

    def __hash__(self) -> int:
        """Hashable like any frozen config, although ``methods`` is a mapping."""
        return hash(
            tuple(
                tuple(sorted(self.methods.items())) if f.name == _METHODS else getattr(self, f.name)
                for f in fields(self)
            )
        )

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> FederationConfig:
        """Build from Flower's run config; unknown keys are refused with the allowed ones."""
        layout = run_config_layout()
        unknown = sorted(set(run_config) - set(layout))
        if unknown:
            raise ValueError(f"run config: unknown key(s) {unknown}; allowed: {sorted(layout)}")
        values: dict[tuple[str, ...], dict[str, Any]] = {}
        for key, value in run_config.items():
            slot = layout[key]
            default = slot.default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise ValueError(f"run config: {key} must be true or false, got {value!r}")
            elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            elif not isinstance(value, type(default)) or isinstance(value, bool):
                raise ValueError(f"run config: {key} must be a {type(default).__name__}, got {value!r}")
            values.setdefault(slot.section, {})[slot.name] = value
        sections = {name: section_cls(**values.get((name,), {})) for name, section_cls in _SECTIONS.items()}
        methods = {
            name: algorithm.settings_cls(**values.get((_METHODS, name), {}))
            for name, algorithm in registry.STRATEGIES.items()
        }
        return cls(**values.get((), {}), **sections, methods=methods)

    def to_run_config(self) -> dict[str, Any]:
        """The flat run config this object was built from (every key, defaults included)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _SECTIONS:
                out |= _section_values(value)
            elif f.name == _METHODS:
                for section in value.values():
                    out |= _section_values(section)
            else:
                out[_key(f.name)] = value
        return out

    @property
    def algorithm_class(self) -> type[LoraAlgorithm]:
        """The run's strategy, as registered in :mod:`fedlora.strategies.registry`."""
        return registry.get(self.strategy)

    @property
    def method(self) -> MethodSettings:
        """The run's strategy's own section (empty for methods without settings)."""
        return self.methods[self.strategy]

    @property
    def task_list(self) -> list[str]:
        tasks = [t.strip() for t in self.tasks.split(",") if t.strip()]
        if not tasks:
            raise ValueError("tasks must name at least one embedded task")
        return tasks

    @property
    def clients_per_round(self) -> int:
        """Clients sampled per round. Flower samples ``int(n * fraction)``, which float rounding can
        put one below the intended count (22 * (15/22) = 14.99...); the server passes this as the
        minimum, so ``fraction-train = p / n`` samples exactly p."""
        return max(1, round(self.num_clients * self.fraction_train))

    def lr_for(self, default: float) -> float:
        return self.lr or default

    def alpha_for(self, default: float) -> float:
        return self.lora.alpha or default

    def client_rank(self, partition: int) -> int:
        """A client's LoRA rank, as its strategy says (FlexLoRA cycles through ``flexlora-ranks``)."""
        return self.method.client_rank(partition, self.lora.rank)

    def max_rank(self) -> int:
        """The rank of the server's global state: the largest any client trains at."""
        return self.method.state_rank(self.lora.rank)

    def lora_settings(self, rank: int, alpha: float) -> LoraSettings:
        targets = tuple(t.strip() for t in self.lora.targets.split(",") if t.strip())
        return LoraSettings(
            rank=rank,
            alpha=alpha,
            dropout=self.lora.dropout,
            target_modules=targets,
            use_rslora=self.lora.rslora,
            init_seed=self.seed,
        )

    def client_state_dir(self, partition: int, node_state_dir: str | None = None) -> Path:
        """Where a client keeps its lifetime privacy ledger: the node's own directory in
        deployment, ``<state-dir>/partition-<p>`` in simulation (default under the run dir).
        Point several runs at one state-dir and their epsilon composes."""
        if node_state_dir:
            return Path(node_state_dir)
        return RunDir(self.run_dir).client_state_dir(partition, self.state_dir)

    def base_model_dir(self) -> Path:
        """The run's base model directory: ``model-dir``, else the kind's shipped default."""
        return run_model_dir({"model-dir": self.model_dir, "model.kind": self.model.kind})

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
            scheme=self.partition.scheme,
            num_clients=self.num_clients,
            alpha=self.partition.alpha,
            tasks_per_client=self.partition.tasks_per_client,
            size_skew=self.partition.size_skew,
            seed=self.seed if self.partition.seed == -1 else self.partition.seed,
            tasks=tasks,
            examples_per_task=math.ceil(self.num_clients * self.num_train / len(tasks)) if embedded else 1,
        )

    def data_key(self) -> tuple[object, ...]:
        """Everything that decides the clients' data: a cache key for one process."""
        return (
            self.model.kind,
            self.model.labels,
            self.columns,
            self.data_path,
            self.partition_spec(),
            self.num_test,
            self.tagged,
        )


class _Slot(NamedTuple):
    """Where a run-config key lives: its section's path in :class:`FederationConfig`, field and default."""

    section: tuple[str, ...]  # () top level, ("dp",), ("methods", "lora-fair")
    name: str
    default: Value


def _key(field_name: str) -> str:
    """Run-config key of a top-level field: its name in kebab case."""
    return field_name.replace("_", "-")


def _field_key(section_cls: type, f: Field[Any]) -> str:
    """Run-config key of a section's field: ``metadata["key"]``, else the section's prefix + kebab name."""
    key = f.metadata.get("key")
    return str(key) if key is not None else str(getattr(section_cls, "prefix", "")) + _key(f.name)


def _section_key(section_cls: type, name: str) -> str:
    """Run-config key of the field ``name`` of a section class (for error messages)."""
    return next(_field_key(section_cls, f) for f in fields(section_cls) if f.name == name)


def _section_values(section: Any) -> dict[str, Value]:
    """A section's values under their run-config keys."""
    return {_field_key(type(section), f): getattr(section, f.name) for f in fields(section)}


def run_config_layout() -> dict[str, _Slot]:
    """Every run-config key (the registered strategies' included), in :class:`FederationConfig`'s
    field order, and where it lives. A key claimed twice (a strategy's setting named like another
    key) is refused here."""
    layout: dict[str, _Slot] = {}

    def claim(key: str, slot: _Slot) -> None:
        if slot.default is MISSING:
            raise TypeError(f"run config: key {key!r} has no plain default (a section field needs one)")
        if key in layout:
            raise ValueError(f"run config: key {key!r} of {slot.section or 'the top level'} is already taken")
        layout[key] = slot

    for f in fields(FederationConfig):
        if f.name in _SECTIONS:
            section_cls = _SECTIONS[f.name]
            for sf in fields(section_cls):
                claim(_field_key(section_cls, sf), _Slot((f.name,), sf.name, cast(Value, sf.default)))
        elif f.name == _METHODS:
            for name, algorithm in registry.STRATEGIES.items():
                for sf in fields(algorithm.settings_cls):
                    slot = _Slot((_METHODS, name), sf.name, cast(Value, sf.default))
                    claim(_field_key(algorithm.settings_cls, sf), slot)
        else:
            claim(_key(f.name), _Slot((), f.name, cast(Value, f.default)))
    return layout


#: Flower run-config defaults: every key a run may override. 0 for lr / lora-alpha means
#: "the strategy's own tuned default". A snapshot of the registry at import, when the built-in
#: methods register; validation (:func:`run_config_layout`) reads the live registry, so a method
#: registered later (a test's toy) is validated but has no defaults in Flower's app config.
DEFAULT_RUN_CONFIG: dict[str, bool | int | float | str] = {
    key: slot.default for key, slot in run_config_layout().items()
}


def stored_run_config(run_dir: RunDir) -> dict[str, Any]:
    """A run directory's stored configuration, a key newer than the run (e.g. ``dp.engine``) read
    as its default, which that run used: what a resume and a comparison compare against."""
    return {**DEFAULT_RUN_CONFIG, **run_dir.config()}
