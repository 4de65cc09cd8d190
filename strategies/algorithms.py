"""What an aggregation method is, server and client side, independent of Flower.

An algorithm says, per round, which LoRA factors clients train and what they download, which
replies it accepts, folds replies into a streaming accumulator, and turns the accumulator into
the next global state. Its class also carries what the rest of the platform asks of a method
by name: its run-config section (:class:`MethodSettings`), tuned defaults, whether secure
aggregation or Flower's client-level DP wrappers can work with it, and how a client rebuilds
its adapter from the download. Each method lives in its own module and is registered in
:mod:`fedlora.strategies.registry`; the one Flower strategy (:mod:`fedlora.strategies.flower`)
owns the round loop and calls these.

The base class is the generic sum-based method: clients train both factors and download the
whole state, the server averages each factor (exact methods override only what differs).

The global state is a flat mapping of PEFT adapter keys (``<module>.lora_A.weight``,
``<module>.lora_B.weight``) plus, for FedEx-LoRA, ``<module>.base_delta`` (the accumulated
residual s R laid out like the base weight), plus a classifier's heads (PEFT's
``modules_to_save``). Methods see only the factors; every method's heads are averaged weighted by
examples by the one Flower strategy, outside the method's math.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

from torch import Tensor

from fedlora.strategies.adapter import LORA_A_SUFFIX, LORA_B_SUFFIX, LoraFactors, join_adapter, split_adapter
from fedlora.strategies.robust import RobustFactorAccumulator, check_rule
from fedlora.strategies.streaming import FactorSumAccumulator
from fedlora.strategies.validation import TensorSpec

Factors = Literal["both", "A", "B"]
BASE_DELTA_SUFFIX = ".base_delta"


class Accumulator(Protocol):
    """What the server folds each accepted reply into (see :mod:`fedlora.strategies.streaming`)."""

    def add(self, modules: Mapping[str, LoraFactors], weight: float) -> None:
        """Fold one reply in; raise ValueError (and change nothing) for a reply that does not fit."""


@dataclass(frozen=True)
class AlgorithmDefaults:
    """Per-method hyperparameters, chosen by the sweep in ``bench/bench_lr_sweep.py``
    (``bench/results/lr_sweep.md``: 4 non-IID clients, 6 rounds x 10 AdamW steps, 2 seeds).

    Frozen-factor methods (FFA-LoRA, FedSVD, RoLoRA) train one factor, so they need a larger
    learning rate than plain LoRA: best at 1e-2, while at LoRA's 3e-3 they lose 0.2-0.25
    exact match. FedEx-LoRA and FlexLoRA are best at 3e-3; FedAvg-LoRA and LoRA-FAIR tie
    between 3e-3 and 1e-2 within the seed spread and keep LoRA's 3e-3.
    """

    lr: float
    alpha: float


@dataclass(frozen=True)
class MethodSettings:
    """A method's own section of the run configuration; this base is the empty section of
    methods without settings.

    A subclass is a frozen dataclass whose fields are run-config keys: ``prefix`` plus the field
    name in kebab case, or the field's ``metadata["key"]`` (``lora-fair-lambda``). Its
    ``__post_init__`` validates the values with errors that name the key. The run configuration
    (``fedlora.core.config``) builds every registered method's section from its keys.
    """

    prefix: ClassVar[str] = ""

    def client_rank(self, partition: int, lora_rank: int) -> int:
        """The LoRA rank client ``partition`` trains at (the run's ``lora-rank`` unless the method says)."""
        return lora_rank

    def state_rank(self, lora_rank: int) -> int:
        """The rank of the global state the server keeps (the largest any client asks for)."""
        return lora_rank


@dataclass(frozen=True)
class Reply:
    """One accepted client reply: its trained tensors, weight (examples) and LoRA scaling."""

    tensors: Mapping[str, Tensor]
    num_examples: float
    scaling: float


def factor_keys(state: Mapping[str, Tensor], factors: Factors) -> list[str]:
    """The keys of ``state`` holding the given LoRA factors, in state order."""
    suffixes = {"both": (LORA_A_SUFFIX, LORA_B_SUFFIX), "A": (LORA_A_SUFFIX,), "B": (LORA_B_SUFFIX,)}[factors]
    return [k for k in state if k.endswith(suffixes)]


def factor_part(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The LoRA factors of a global state: what the methods' math works on."""
    return {k: v for k, v in state.items() if k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX))}


def head_part(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The heads of a global state (a classifier's ``modules_to_save``, trained in full): every
    entry that is neither a LoRA factor nor a base delta. Every method averages them weighted by
    examples (:class:`fedlora.strategies.streaming.HeadAccumulator`)."""
    return {k: v for k, v in state.items() if not k.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX, BASE_DELTA_SUFFIX))}


def adapter_part(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The PEFT adapter of a global state (LoRA factors and heads), without base deltas."""
    return {k: v for k, v in state.items() if not k.endswith(BASE_DELTA_SUFFIX)}


def base_deltas(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """FedEx-LoRA's base-weight residuals of a global state, by module name."""
    return {k[: -len(BASE_DELTA_SUFFIX)]: v for k, v in state.items() if k.endswith(BASE_DELTA_SUFFIX)}


def update_norm(old: Mapping[str, Tensor], new: Mapping[str, Tensor]) -> float:
    """Frobenius norm of the change of the global state (all tensors together)."""
    total = 0.0
    for k, v in new.items():
        prev = old.get(k)
        diff = v.double() - prev.double() if prev is not None and prev.shape == v.shape else v.double()
        total += float(diff.pow(2).sum())
    return math.sqrt(total)


def robust_refusal(strategy: str, rule: str) -> str:
    """Why robust aggregation is refused for a product-based method."""
    return (
        f"robust.aggregate = {rule!r} cannot work with {strategy!r}: it combines the clients' factors "
        "coordinate by coordinate, while this method's server combines each client's product B_k A_k "
        "(a median of factors is not a median of products); use fedavg-lora, ffa-lora, rolora or fedsvd, "
        "or keep 'mean' with robust.norm-factor / robust.max-update-norm"
    )


class LoraAlgorithm:
    """The generic sum-based method: clients train A and B; the server averages each separately.

    ``scaling`` is the LoRA scaling s shared by all clients; ``seed`` the run seed (FFA-LoRA's
    shared A); ``settings`` the method's run-config section (default: its defaults);
    ``lora_rank`` the run's ``lora-rank`` (and ``use_rslora`` its ``lora-rslora``: together they
    give the scaling of any other rank); ``fan_in_fan_out`` True for GPT-2 style ``Conv1D``
    layers (FedEx-LoRA's residual layout). ``exact_error`` asks methods with an aggregation-error
    diagnostic for the exact value instead of a constant-memory estimate.

    Class attributes are what the platform asks of a method by name, before any instance exists.
    """

    name: ClassVar[str] = "lora"
    defaults: ClassVar[AlgorithmDefaults] = AlgorithmDefaults(lr=3e-3, alpha=16.0)
    settings_cls: ClassVar[type[MethodSettings]] = MethodSettings
    #: whether the server needs each client's own product B_k A_k (or s_k B_k A_k) to aggregate,
    #: which secure aggregation hides by design
    product_based: ClassVar[bool] = False
    #: whether Flower's fixed-clipping DP wrappers can wrap it soundly: they clip each reply against
    #: the full global state and noise the plain average, so clients must send every tensor they
    #: download and the server must only average
    client_level_dp: ClassVar[bool] = False
    #: whether a server optimizer (``server-opt.*``) can step its global state: its factors keep their
    #: coordinates from round to round, so moments over them mean something (not so for methods that
    #: re-factorise, fold residuals into the base or alternate which factor exists)
    server_optimizer: ClassVar[bool] = True

    def __init__(
        self,
        scaling: float,
        seed: int = 0,
        exact_error: bool = False,
        *,
        settings: MethodSettings | None = None,
        lora_rank: int = 8,
        fan_in_fan_out: bool = False,
        use_rslora: bool = False,
    ) -> None:
        if not math.isfinite(scaling) or scaling <= 0:
            raise ValueError(f"scaling must be finite and > 0, got {scaling}")
        if settings is None:
            settings = self.settings_cls()
        if type(settings) is not self.settings_cls:
            raise TypeError(f"{self.name} takes {self.settings_cls.__name__} settings, got {type(settings).__name__}")
        if isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1:
            raise ValueError(f"lora_rank must be an integer >= 1, got {lora_rank!r}")
        self.scaling = scaling
        self.seed = seed
        self.exact_error = exact_error
        self.settings = settings
        self.lora_rank = lora_rank
        self.fan_in_fan_out = fan_in_fan_out
        self.use_rslora = use_rslora

    def scaling_at(self, rank: int) -> float:
        """The LoRA scaling of a client training at ``rank``: the run's alpha over r (over sqrt(r)
        with rsLoRA), derived from the run's own scaling at ``lora_rank``. The server computes it
        and never takes it from a client: a client claiming a larger one would weigh more."""
        ratio = self.lora_rank / rank
        return self.scaling * (math.sqrt(ratio) if self.use_rslora else ratio)

    # -- what clients get -------------------------------------------------------------
    def initial_state(self, adapter: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The round-0 global state from a freshly initialised adapter (B = 0)."""
        return {k: v.clone() for k, v in adapter.items()}

    def trained_factors(self, server_round: int) -> Factors:
        """Which factors clients train (and send back) in ``server_round``."""
        return "both"

    def download(self, server_round: int, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """What every sampled client receives this round."""
        return dict(state)

    @classmethod
    def client_adapter(
        cls, download: Mapping[str, Tensor], *, local_a: Mapping[str, Tensor], seed: int, rank: int, scaling: float
    ) -> dict[str, Tensor]:
        """The adapter a client loads from the LoRA factors it downloaded.

        ``local_a`` is the client's current lora_A tensors (their shapes and dtypes), ``seed`` the
        run seed, ``rank`` and ``scaling`` the client's own LoRA rank and scaling.
        """
        return dict(download)

    @classmethod
    def global_alpha(cls, rank: int, alpha: float) -> float:
        """The ``lora_alpha`` written into the global adapter's PEFT files (the run's alpha)."""
        return alpha

    # -- what the server accepts --------------------------------------------------------
    def reply_spec(self, server_round: int, state: Mapping[str, Tensor]) -> dict[str, TensorSpec]:
        """Name, shape and dtype of every tensor a reply must hold: the trained factors of ``state``."""
        return {
            k: TensorSpec(tuple(state[k].shape), state[k].dtype)
            for k in factor_keys(state, self.trained_factors(server_round))
        }

    def reply_scaling(self, tensors: Mapping[str, Tensor], metrics: Mapping[str, Any]) -> float:
        """The LoRA scaling a (well-formed) reply was trained at; ValueError says why a reply is refused."""
        return self.scaling

    # -- aggregation --------------------------------------------------------------------
    def new_accumulator(self, server_round: int) -> Accumulator:
        """An empty accumulator for ``server_round``'s replies."""
        return FactorSumAccumulator(self.trained_factors(server_round))

    def robust_accumulator(self, server_round: int, rule: str, trim: float) -> Accumulator:
        """An accumulator that combines the round's factors by ``rule`` (median, trimmed mean:
        :mod:`fedlora.strategies.robust`); ValueError for a method that combines products."""
        check_rule(rule, trim)
        if self.product_based:
            raise ValueError(robust_refusal(self.name, rule))
        return RobustFactorAccumulator(self.trained_factors(server_round), rule, trim)

    def state_modules(self, state: Mapping[str, Tensor]) -> dict[str, LoraFactors]:
        """The global state's per-module factors, at the scaling its s B A is taken with."""
        return split_adapter(factor_part(state), self.scaling)

    def reply_modules(self, state: Mapping[str, Tensor], reply: Reply) -> dict[str, LoraFactors]:
        """Per-module factors of a reply; factors the client did not train come from ``state``."""
        flat = factor_part(state)
        flat.update(factor_part(reply.tensors))
        return split_adapter(flat, reply.scaling)

    def finish(
        self, server_round: int, acc: Accumulator, state: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The next global state and this round's diagnostics."""
        assert isinstance(acc, FactorSumAccumulator)  # exact methods: nothing to diagnose
        return join_adapter(acc.result()), {}
