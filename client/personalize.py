"""Personalisation: a few DP-SGD steps of the global LoRA adapter on this client's own data.

``fl-client personalize`` calls :func:`personalize`. The global adapter (a PEFT directory written
by a federation or pulled from the hub) is loaded trainable onto the base model, evaluated on the
client's local test split, fine-tuned on its local training split and evaluated again; the result
is written as a PEFT directory with the global adapter's own config (rank, targets, alpha).

Privacy follows the deployed client's rules (:mod:`fedlora.client.compute`):

- the client's data and split are built exactly as ``fl-client start --data`` builds them, so the
  test split is the one the node held out of federated training;
- sigma is calibrated once for all the planned steps (:func:`fedlora.privacy.planning.plan_noise`), never
  per step; the budget cap is checked before any training and charges nothing when it refuses;
- the DP randomness (Poisson sampling, noise) comes from the ledger's secret seed;
- the lifetime ledger in the client's state directory (the one ``fl-client start --state-dir``
  keeps) is charged after training and before the adapter is written or any number is returned:
  a crash in between over-reports, never under-reports. Each call is charged under its own run id
  (``personalize-<UTC time>-<random>``), so a repeated personalisation is a new charge, not a replay.

Only training examples are protected; the test split's exact match and loss are computed on the
client and returned as they are (as the federated client's ``local-exact-match`` is).
"""

from __future__ import annotations

import json
import math
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file

from fedlora.atomic import atomic_directory
from fedlora.client.identity import default_name, node_partition
from fedlora.client.private_train import train_private
from fedlora.core.adapter_format import BASE_DELTA_FILE, CONFIG_FILE, WEIGHTS_FILE
from fedlora.core.client_data import EMBEDDED_PREFIX, check_node_data, node_examples
from fedlora.core.config import FederationConfig
from fedlora.core.data import Item
from fedlora.core.embedded import default_model_dir
from fedlora.core.kinds import DEFAULT_KIND, check_device, check_dtype, get_kind
from fedlora.core.kinds.base import DTYPES
from fedlora.core.model import (
    load_adapter,
    load_base_model,
    max_positions,
    save_adapter,
    set_base_deltas,
    set_trainable_factors,
)
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.records import ChatExample, Example, Record
from fedlora.core.train import TrainSettings, evaluate, train
from fedlora.privacy.accounting import check_accountant, compute_epsilon
from fedlora.privacy.dp import DPSGDConfig
from fedlora.privacy.engines import Engine, check_engine
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.planning import default_delta, plan_noise
from fedlora.privacy.policy import PrivacyPolicy, RoundRequest, check_round
from fedlora.privacy.sampling import check_poisson_batches, sample_rate
from fedlora.privacy.units import PRIVACY_UNIT
from fedlora.strategies.algorithms import base_deltas
from fedlora.strategies.fedavg_lora import FedAvgLora

RUN_PREFIX = "personalize-"
#: the ledger's round key of a personalisation: each one is a one-round run of its own
LEDGER_ROUND = 1
#: LoRA's tuned local learning rate (both factors train here, as in FedAvg-LoRA)
DEFAULT_LR = FedAvgLora.defaults.lr
DP_OFF = "none: differential privacy was off for this personalisation (dp = False): no privacy guarantee, no epsilon"


class PrivacyBudgetError(ValueError):
    """The ledger's lifetime epsilon would pass ``max_epsilon``: nothing was trained or charged."""


@dataclass(frozen=True)
class PersonalizeConfig:
    """One personalisation, validated before any model is loaded.

    ``data``, ``name``, ``seed``, ``num_train`` and ``num_test`` build the node's examples and split
    exactly as ``fl-client start --data DATA --name NAME`` does in a run with that seed and those
    sizes (the run config's defaults here), so the global adapter is evaluated on examples the node
    never trained on. ``name`` None is this host's name, the default of ``fl-client start``.
    """

    data: str
    state_dir: Path
    steps: int = 20
    lr: float = DEFAULT_LR
    batch_size: int = 32
    target_epsilon: float = 1.0  # of this personalisation alone: sigma is calibrated for all its steps
    noise_multiplier: float | None = None  # given: used as is instead of calibrating
    max_grad_norm: float = 1.0  # per-example clipping under DP; global-norm clipping without
    delta: float = 0.0  # 0: fedlora.privacy.planning.default_delta of the training split's size
    accountant: str = "rdp"
    max_epsilon: float | None = None  # cap on the ledger's lifetime epsilon after this charge
    dp_engine: Engine = "opacus"  # per-example clipping: Opacus' hooks or the fused LoRA kernels
    model_dir: str | None = None  # None: the embedded base model
    seed: int = 0  # the federation's run seed: it seeds the node's split, and training without DP
    num_train: int = FederationConfig.num_train  # examples of embedded:TASKS data (a JSONL file has its own)
    num_test: int = FederationConfig.num_test  # test examples (a JSONL file holds out at most 10%)
    name: str | None = None  # the node's name, as given to fl-client start --name
    threads: int = 1
    dp: bool = True
    physical_batch_size: int = 0  # 0: a batch at once; else chunks of this many (one step, one noise draw)
    device: str = "auto"  # where the model trains (auto: a GPU when this process sees one)
    dtype: str = "float32"  # the base weights' dtype; the LoRA factors train in float32
    policy: PrivacyPolicy | None = None  # the node's privacy policy: checked before anything is trained

    def __post_init__(self) -> None:
        check_device(self.device, "device")
        check_dtype(self.dtype, "dtype")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be a JSONL path or embedded:TASK[,TASK], got {self.data!r}")
        if not self.data.startswith(EMBEDDED_PREFIX) and not Path(self.data).is_file():
            raise FileNotFoundError(
                f"data {self.data!r} is neither an existing JSONL file nor embedded:TASK[,TASK] "
                "(e.g. embedded:sort-desc)"
            )
        try:
            check_node_data(self.data)
        except KeyError as error:  # an unknown embedded task: the message lists the known ones
            raise ValueError(f"data {self.data!r}: {error.args[0]}") from None
        if isinstance(self.state_dir, str):
            object.__setattr__(self, "state_dir", Path(self.state_dir))
        if not isinstance(self.state_dir, Path):
            raise ValueError(f"state_dir must be a path, got {self.state_dir!r}")
        if self.dp and self.state_dir.exists() and not self.state_dir.is_dir():
            raise NotADirectoryError(f"state_dir {self.state_dir} exists and is not a directory")
        for name in ("steps", "batch_size", "num_train", "num_test", "threads"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        for name in ("lr", "target_epsilon", "max_grad_norm"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.noise_multiplier is not None and (
            not _is_number(self.noise_multiplier) or not 0 < self.noise_multiplier < math.inf
        ):
            raise ValueError(
                f"noise_multiplier must be a finite number > 0 (0 would spend epsilon = inf; "
                f"use dp=False to train without noise), got {self.noise_multiplier!r}"
            )
        if not _is_number(self.delta) or not 0 <= self.delta < 1:
            raise ValueError(f"delta must be in [0, 1) (0: the default for the data size), got {self.delta!r}")
        check_accountant(self.accountant)
        check_engine(self.dp_engine)
        if self.max_epsilon is not None and (not _is_number(self.max_epsilon) or not 0 <= self.max_epsilon < math.inf):
            raise ValueError(f"max_epsilon must be a finite number >= 0 or None, got {self.max_epsilon!r}")
        if not isinstance(self.dp, bool):
            raise ValueError(f"dp must be True or False, got {self.dp!r}")
        if not self.dp and (self.noise_multiplier is not None or self.max_epsilon is not None):
            raise ValueError(
                "noise_multiplier and max_epsilon apply to DP-SGD only, but dp=False: "
                f"got noise_multiplier={self.noise_multiplier!r}, max_epsilon={self.max_epsilon!r}"
            )
        if self.name is not None and (not isinstance(self.name, str) or not self.name):
            raise ValueError(f"name must be a non-empty string or None (this host's name), got {self.name!r}")
        if self.model_dir is not None and not (Path(self.model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"model directory {self.model_dir} does not exist or has no config.json")

    @property
    def node_name(self) -> str:
        return self.name if self.name is not None else default_name()

    @property
    def split_seed(self) -> int:
        """The seed a deployed node splits its data with (fedlora.client.compute: run seed and node name)."""
        return self.seed * 100_003 + node_partition(self.node_name)


@dataclass(frozen=True)
class PersonalizeResult:
    """What a caller publishes as provenance. Under DP, no training loss: it is not private.

    ``lifetime_epsilon`` is the ledger's epsilon after this charge (every federated round and
    personalisation charged to the state directory); ``personalization_epsilon`` is what this
    personalisation alone spends. With ``dp`` False every privacy field is None.
    """

    global_adapter_dir: Path
    out_dir: Path
    data: str
    dp: bool
    num_train_examples: int
    num_test_examples: int
    steps: int
    lr: float
    batch_size: int
    before_exact_match: float
    before_loss: float
    after_exact_match: float
    after_loss: float
    noise_multiplier: float | None
    sample_rate: float | None
    max_grad_norm: float
    delta: float | None
    accountant: str | None
    lifetime_epsilon: float | None
    personalization_epsilon: float | None
    ledger_run_id: str | None
    privacy_unit: str
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready values (paths as strings)."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class _Privacy:
    """The DP-SGD parameters of one personalisation, fixed before training."""

    sigma: float
    q: float
    delta: float
    cost: float


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and not math.isnan(value)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_adapter_dir(path: Path) -> dict[str, Any]:
    """The adapter config of a global LoRA adapter directory, or an error naming what is missing."""
    if not path.exists():
        raise FileNotFoundError(f"global adapter directory {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"global adapter {path} is not a directory (a PEFT adapter directory)")
    missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: no {' and no '.join(missing)}")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path / CONFIG_FILE}: not valid JSON ({error})") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        found = config.get("peft_type") if isinstance(config, dict) else config
        raise ValueError(f"{path / CONFIG_FILE}: not a LoRA adapter (peft_type {found!r}, expected 'LORA')")
    return config


def _check_out_dir(out_dir: Path, global_dir: Path) -> None:
    """Refuse an output that would overwrite the input or anything but an earlier adapter."""
    if out_dir.resolve() == global_dir.resolve():
        raise ValueError(f"out_dir {out_dir} is the global adapter directory itself; write elsewhere")
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"out_dir {out_dir} exists and is not a directory")
        if any(out_dir.iterdir()) and not (out_dir / CONFIG_FILE).is_file():
            raise FileExistsError(f"out_dir {out_dir} exists, is not empty and is not an adapter directory")


def _plan_privacy(cfg: PersonalizeConfig, n_train: int) -> _Privacy:
    """sigma once for all ``cfg.steps`` (or the given one), q = batch / n, and delta < 1 / n."""
    q = sample_rate(cfg.batch_size, n_train)
    delta = cfg.delta or default_delta(n_train)
    if delta * n_train >= 1:
        raise ValueError(
            f"delta {delta:g} is not below 1/n = 1/{n_train} for this client's {n_train} training examples; "
            f"use delta well below it, e.g. {default_delta(n_train):g} (delta = 0 picks it)"
        )
    check_poisson_batches(cfg.batch_size, n_train, cfg.steps)
    if cfg.noise_multiplier is not None:
        sigma = float(cfg.noise_multiplier)
    else:
        tolerance = min(0.01, cfg.target_epsilon / 10)
        plan = plan_noise(cfg.target_epsilon, delta, 1, 1.0, cfg.steps, q, cfg.accountant, epsilon_tolerance=tolerance)
        sigma = plan.noise_multiplier
    cost = compute_epsilon([(sigma, q, cfg.steps)], delta, cfg.accountant)
    return _Privacy(sigma, q, delta, cost)


def _check_policy(
    cfg: PersonalizeConfig, policy: PrivacyPolicy, plan: _Privacy | None, ledger: PrivacyLedger | None, n: int
) -> None:
    """The node's policy, as for a federated round: raises :class:`PrivacyBudgetError` with the reason."""
    request = RoundRequest(
        dp_enabled=plan is not None,
        noise_multiplier=plan.sigma if plan is not None else 0.0,
        sample_rate=plan.q if plan is not None else 0.0,
        delta=plan.delta if plan is not None else 0.0,
        accountant=cfg.accountant,
        steps=cfg.steps,
        num_examples=n,
        run_target=cfg.target_epsilon if cfg.noise_multiplier is None else math.inf,
    )
    reason = check_round(policy, request, ledger.history() if ledger is not None else [], [])
    if reason is not None:
        raise PrivacyBudgetError(f"personalisation declined: {reason}; nothing was trained or charged")


def new_run_id() -> str:
    """A ledger run id no federated run (Flower's integer run ids) and no other call can have."""
    return f"{RUN_PREFIX}{datetime.now(UTC).strftime('%Y%m%dT%H%M%S.%fZ')}-{secrets.token_hex(4)}"


def _brief(error: BaseException) -> str:
    """The first two lines of an error (PyTorch lists every mismatched tensor, one per line)."""
    lines = [line.strip() for line in str(error.args[0] if error.args else error).splitlines() if line.strip()]
    more = f" (and {len(lines) - 2} more)" if len(lines) > 2 else ""
    return " ".join(lines[:2]) + more


def _load_model(global_dir: Path, model_dir: Path, device: str = "cpu", dtype: str = "float32") -> PeftModel:
    """The base model on ``device`` in ``dtype`` (before PEFT wraps it) with the global adapter, LoRA
    factors trainable (float32: PEFT's autocast of adapter weights).

    Everything else is frozen before Opacus sees the model, including LoRA on embeddings and
    ``modules_to_save`` copies, which keep their global values (Opacus cannot compute per-sample
    gradients through PEFT's embedding LoRA).
    """
    base = load_base_model(model_dir, device, DTYPES[dtype])
    try:
        model = load_adapter(base, global_dir, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as error:
        problem = _brief(error)
        raise ValueError(f"global adapter {global_dir} does not fit the base model {model_dir}: {problem}") from None
    if (global_dir / BASE_DELTA_FILE).is_file():  # FedEx-LoRA: the global model's base weights moved
        deltas = base_deltas(load_file(str(global_dir / BASE_DELTA_FILE)))
        try:
            set_base_deltas(model, deltas, {})
        except (KeyError, RuntimeError) as error:
            where = global_dir / BASE_DELTA_FILE
            raise ValueError(f"{where} does not fit the base model {model_dir}: {_brief(error)}") from None
    set_trainable_factors(model, "both")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"global adapter {global_dir} has no lora_A / lora_B factors to train")
    return model


def _write_adapter(model: PeftModel, global_dir: Path, out_dir: Path, model_dir: Path) -> None:
    """A PEFT directory built in a temporary sibling and renamed into place."""
    with atomic_directory(out_dir) as tmp:
        save_adapter(model, tmp, base_model_dir=model_dir)
        if (global_dir / BASE_DELTA_FILE).is_file():  # the base weights the adapter was trained on
            shutil.copyfile(global_dir / BASE_DELTA_FILE, tmp / BASE_DELTA_FILE)


def personalize(
    global_adapter_dir: Path,
    cfg: PersonalizeConfig,
    out_dir: Path,
    examples: tuple[Sequence[Record], Sequence[Record]] | None = None,
) -> PersonalizeResult:
    """Fine-tune ``global_adapter_dir`` on this client's data, charge the ledger, write ``out_dir``.

    Every input is checked, and the budget cap enforced, before the model is loaded. Raises
    :class:`PrivacyBudgetError` (a ValueError) when ``cfg.max_epsilon`` would be exceeded.
    ``examples`` (train, test): the client's split when the caller already has it (a virtual
    client of a simulation at the end of its run); ``cfg.data`` then only labels it.
    """
    started = time.perf_counter()
    global_dir, out_dir = Path(global_adapter_dir), Path(out_dir)
    check_adapter_dir(global_dir)
    _check_out_dir(out_dir, global_dir)
    fed = FederationConfig(num_train=cfg.num_train, num_test=cfg.num_test, seed=cfg.seed)
    if examples is None:
        examples = node_examples(fed, cfg.data, cfg.split_seed)
    train_ex, test_ex = examples
    if not all(isinstance(r, Example | ChatExample) for part in examples for r in part):
        raise ValueError(f"data {cfg.data!r}: personalisation trains causal LMs on prompt/completion or chat records")
    if len(train_ex) < cfg.batch_size:
        raise ValueError(
            f"data {cfg.data!r} gives {len(train_ex)} training examples, fewer than batch_size={cfg.batch_size}: "
            "the sample rate q = batch_size / n cannot exceed 1; use a smaller batch_size or more data"
        )
    if not test_ex:
        raise ValueError(
            f"data {cfg.data!r} gives no test examples (a JSONL file holds out at most 10% of its records, "
            f"at most num_test={cfg.num_test}): it needs at least 10 records"
        )
    ledger = PrivacyLedger(cfg.state_dir) if cfg.dp else None
    plan = _plan_privacy(cfg, len(train_ex)) if cfg.dp else None
    if cfg.policy is not None:
        _check_policy(cfg, cfg.policy, plan, ledger, len(train_ex))
    if ledger is not None and plan is not None and cfg.max_epsilon is not None:
        over, projected = ledger.would_exceed(
            cfg.max_epsilon, plan.delta, cfg.accountant, plan.sigma, plan.q, cfg.steps
        )
        if over:
            spent = ledger.epsilon(plan.delta, cfg.accountant)
            raise PrivacyBudgetError(
                f"privacy budget: personalising ({cfg.steps} steps, sigma {plan.sigma:.4g}, q {plan.q:.4g}, "
                f"epsilon {plan.cost:.3f} alone) would take the lifetime epsilon of {ledger.path} from {spent:.3f} "
                f"to {projected:.3f} at delta {plan.delta:g}, past max_epsilon = {cfg.max_epsilon}; nothing was charged"
            )

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        model_dir = Path(cfg.model_dir) if cfg.model_dir else default_model_dir()
        tokenizer = load_tokenizer(model_dir)
        model = _load_model(global_dir, model_dir, cfg.device, cfg.dtype)
        pad = int(tokenizer.pad_token_id)
        max_len = max_positions(model)
        causal = get_kind(DEFAULT_KIND)  # prompt/completion and chat records, as the run's clients encode them
        train_data: list[Item] = causal.encode(tokenizer, train_ex, (), max_len, truncate=False).items
        test_data: list[Item] = causal.encode(tokenizer, test_ex, (), max_len, truncate=False).items
        before = evaluate(model, test_data, pad)
        settings = TrainSettings(
            steps=cfg.steps,
            lr=cfg.lr,
            batch_size=cfg.batch_size,
            max_grad_norm=None if cfg.dp else cfg.max_grad_norm,  # under DP, Opacus clips per example
            seed=cfg.seed,
            physical_batch_size=cfg.physical_batch_size,
        )
        run_id: str | None = None
        lifetime: float | None = None
        if ledger is not None and plan is not None:
            run_id = new_run_id()
            dp_seed = ledger.dp_seed(run_id, LEDGER_ROUND)  # secret: the noise cannot be replayed
            with torch.random.fork_rng(devices=[]):  # dropout and anything else drawing from torch's global RNG
                torch.manual_seed(dp_seed + 2)
                dp = DPSGDConfig(plan.sigma, cfg.max_grad_norm, cfg.dp_engine)
                train_private(model, train_data, settings, pad, dp, dp_seed)
            added = ledger.charge(
                run_id, LEDGER_ROUND, plan.sigma, plan.q, cfg.steps, accountant=cfg.accountant, delta=plan.delta
            )
            if not added:  # a fresh run id cannot be charged already; never release an uncharged result
                raise RuntimeError(f"{ledger.path}: run {run_id} was already charged; refusing to release")
            lifetime = ledger.epsilon(plan.delta, cfg.accountant)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                train(model, train_data, settings, pad)
        after = evaluate(model, test_data, pad)
        _write_adapter(model, global_dir, out_dir, model_dir)
    finally:
        torch.set_num_threads(threads)
    return PersonalizeResult(
        global_adapter_dir=global_dir,
        out_dir=out_dir,
        data=cfg.data,
        dp=cfg.dp,
        num_train_examples=len(train_data),
        num_test_examples=len(test_data),
        steps=cfg.steps,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        before_exact_match=before.exact_match,
        before_loss=before.loss,
        after_exact_match=after.exact_match,
        after_loss=after.loss,
        noise_multiplier=plan.sigma if plan else None,
        sample_rate=plan.q if plan else None,
        max_grad_norm=cfg.max_grad_norm,
        delta=plan.delta if plan else None,
        accountant=cfg.accountant if plan else None,
        lifetime_epsilon=lifetime,
        personalization_epsilon=plan.cost if plan else None,
        ledger_run_id=run_id,
        privacy_unit=PRIVACY_UNIT if plan else DP_OFF,
        seconds=time.perf_counter() - started,
    )


__all__ = [
    "DEFAULT_LR",
    "PersonalizeConfig",
    "PersonalizeResult",
    "PrivacyBudgetError",
    "check_adapter_dir",
    "new_run_id",
    "personalize",
]
