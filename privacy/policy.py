"""A node's own privacy policy: what its operator allows, which a server's run can only tighten.

The run configuration comes from the server. A node that took its DP settings from there would
train without noise, or with almost none, whenever a server asked it to. So every deployed node
checks each round against the policy its operator wrote (``policy.toml`` in its state
directory, written by ``fl-client start``) and declines, before any training or charge, a round
that would break it. The reason goes back to the server, which records it in the round's row
and the privacy report.

The same checks run in simulation, against a policy derived from the run configuration
(:meth:`PrivacyPolicy.for_run`): there the server's operator owns every client.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import tomli_w  # a dependency of flwr itself

from fedlora.atomic import write_atomic
from fedlora.privacy.accounting import HistoryEntry, check_accountant, compute_epsilon

POLICY_FILE = "policy.toml"
#: a deployed node's lifetime epsilon cap when its operator sets none: spending stops here, not never
DEFAULT_MAX_EPSILON = 10.0
#: the smallest noise multiplier a deployed node accepts by default: below ~0.5 a round's epsilon grows
#: very fast with the number of steps, and no honest plan for a useful epsilon needs it
DEFAULT_MIN_NOISE = 0.5
#: slack for floating point when comparing a projected epsilon with a cap
_EPSILON_SLACK = 1e-9
_SHA256_HEX = frozenset("0123456789abcdef")


class PolicyError(ValueError):
    """A policy file or option that cannot be used; the message names the key."""


@dataclass(frozen=True)
class PrivacyPolicy:
    """What this node's operator allows (one node, all runs).

    ``max_delta`` 0 means the usual rule: delta below 1/n of this node's training examples (which
    holds whatever the policy says). ``share_metrics`` lets evaluation results, losses and dataset
    sizes beyond the training weight leave the node in DP rounds; without DP they always may.
    ``allowed_bundles`` are SHA-256 digests of Flower app bundles the operator accepts besides the
    configuration-only bundle of a fedlora server (their code is never run either way).
    """

    require_dp: bool = True
    min_noise_multiplier: float = DEFAULT_MIN_NOISE
    max_sample_rate: float = 1.0
    max_delta: float = 0.0
    accountant: str = "rdp"
    max_epsilon: float = DEFAULT_MAX_EPSILON
    share_metrics: bool = False
    allowed_bundles: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("require_dp", "share_metrics"):
            if not isinstance(getattr(self, name), bool):
                raise PolicyError(f"{_key(name)} must be true or false, got {getattr(self, name)!r}")
        for name in ("min_noise_multiplier", "max_sample_rate", "max_delta", "max_epsilon"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise PolicyError(f"{_key(name)} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0 < self.max_sample_rate <= 1:
            raise PolicyError(f"max-sample-rate must be in (0, 1], got {self.max_sample_rate}")
        if not self.max_delta < 1:
            raise PolicyError(f"max-delta must be below 1 (0: below 1/n of this node's data), got {self.max_delta}")
        if not self.max_epsilon > 0:
            raise PolicyError("max-epsilon must be > 0: a lifetime cap of 0 would decline every DP round")
        try:
            check_accountant(self.accountant)
        except ValueError as err:
            raise PolicyError(f"accountant: {err}") from None
        bundles = tuple(str(b).lower() for b in self.allowed_bundles)
        for digest in bundles:
            if len(digest) != 64 or not set(digest) <= _SHA256_HEX:
                raise PolicyError(f"allowed-bundles: {digest!r} is not a SHA-256 digest (64 hex digits)")
        object.__setattr__(self, "allowed_bundles", tuple(sorted(set(bundles))))

    # ------------------------------------------------------------------ derived and stored forms

    @classmethod
    def for_run(cls, dp_enabled: bool, target_epsilon: float, max_epsilon: float, accountant: str,
                personalize_epsilon: float = 0.0) -> PrivacyPolicy:  # fmt: skip
        """A simulated client's policy: the run's own settings, capped at the run's target (plus
        what personalisation may spend on top), or at ``dp.max-epsilon`` when the run sets one."""
        return cls(
            require_dp=dp_enabled,
            min_noise_multiplier=0.0,
            accountant=accountant,
            max_epsilon=max_epsilon or target_epsilon + personalize_epsilon,
            share_metrics=True,
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "policy") -> PrivacyPolicy:
        """From ``policy.toml``'s keys (dashes, as written by :meth:`to_toml`); unknown keys are errors."""
        names = {_key(f.name): f.name for f in fields(cls)}
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise PolicyError(f"{source}: unknown keys {unknown}; known: {sorted(names)}")
        values: dict[str, Any] = {names[k]: v for k, v in data.items()}
        if "allowed_bundles" in values:
            bundles = values["allowed_bundles"]
            if not isinstance(bundles, list):
                raise PolicyError(f"{source}: allowed-bundles must be a list of SHA-256 digests")
            values["allowed_bundles"] = tuple(bundles)
        try:
            return cls(**values)
        except PolicyError as err:
            raise PolicyError(f"{source}: {err}") from None

    @classmethod
    def load(cls, state_dir: Path) -> PrivacyPolicy:
        """The policy in ``state_dir`` (the defaults when there is none: the strict ones)."""
        path = Path(state_dir) / POLICY_FILE
        if not path.exists():
            return cls()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
            raise PolicyError(f"{path}: {err}") from None
        return cls.from_mapping(data, str(path))

    def to_toml(self) -> str:
        data = {_key(k): list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return tomli_w.dumps(data)

    def save(self, state_dir: Path) -> Path:
        """Write ``policy.toml`` (owner only: it says what this node accepts)."""
        path = Path(state_dir) / POLICY_FILE
        header = "# this node's privacy policy (fl-client start); a server's run can only tighten it\n"
        write_atomic(path, (header + self.to_toml()).encode(), mode=0o600)
        return path

    def with_options(self, **changes: Any) -> PrivacyPolicy:
        """This policy with the operator's command-line options (None: keep) applied."""
        given = {k: v for k, v in changes.items() if v is not None}
        if "allowed_bundles" in given:
            given["allowed_bundles"] = (*self.allowed_bundles, *given["allowed_bundles"])
        return replace(self, **given)

    def capped_at(self, max_epsilon: float) -> PrivacyPolicy:
        """This policy with a run's own lifetime cap (``dp.max-epsilon``, 0: none), which may only lower it."""
        if 0 < max_epsilon < self.max_epsilon:
            return replace(self, max_epsilon=float(max_epsilon))
        return self

    def describe(self) -> str:
        """One line for the operator's log."""
        dp = "DP required" if self.require_dp else "DP optional"
        parts = [dp, f"noise >= {self.min_noise_multiplier:g}", f"q <= {self.max_sample_rate:g}"]
        parts.append(f"delta <= {self.max_delta:g}" if self.max_delta else "delta < 1/n")
        parts += [f"accountant {self.accountant}", f"lifetime epsilon <= {self.max_epsilon:g}"]
        parts.append("metrics may leave under DP" if self.share_metrics else "no metrics leave under DP")
        if self.allowed_bundles:
            parts.append(f"{len(self.allowed_bundles)} pinned bundle(s)")
        return ", ".join(parts)

    def metrics_may_leave(self, dp_round: bool) -> bool:
        """Whether evaluation results, losses and extra sizes may go to the server."""
        return self.share_metrics or not dp_round


def _key(name: str) -> str:
    return name.replace("_", "-")


@dataclass(frozen=True)
class RoundRequest:
    """A DP round as the server asks for it, and what this node knows of itself."""

    dp_enabled: bool
    noise_multiplier: float
    sample_rate: float  # this node's own: batch size / its number of training examples
    delta: float
    accountant: str
    steps: int
    num_examples: int
    run_target: float  # the epsilon the run promised (dp.target-epsilon)


def check_round(
    policy: PrivacyPolicy,
    request: RoundRequest,
    lifetime: Sequence[HistoryEntry],
    this_run: Sequence[HistoryEntry],
) -> str | None:
    """Why this node must decline the round (None: it may train it).

    ``lifetime`` is every round charged to this node's ledger, ``this_run`` the rounds of this
    run. A round is declined when it would break the policy, or take the run's epsilon past the
    run's target or the lifetime epsilon past the cap: so no node ends a run above the target it
    was promised, however often it is sampled.
    """
    if not request.dp_enabled:
        return "policy: this node trains with DP only (the run has dp.enabled = false)" if policy.require_dp else None
    if request.noise_multiplier < policy.min_noise_multiplier:
        return (
            f"policy: noise multiplier {request.noise_multiplier:.4g} is below this node's floor "
            f"{policy.min_noise_multiplier:g}"
        )
    if request.sample_rate > policy.max_sample_rate * (1 + _EPSILON_SLACK):
        return f"policy: sample rate {request.sample_rate:.4g} is above this node's cap {policy.max_sample_rate:g}"
    if not 0 < request.delta < 1 / request.num_examples:
        return f"policy: delta {request.delta:g} is not below 1/n = 1/{request.num_examples} for this node's data"
    if policy.max_delta and request.delta > policy.max_delta:
        return f"policy: delta {request.delta:g} is above this node's cap {policy.max_delta:g}"
    if request.accountant != policy.accountant:
        return f"policy: the run accounts with {request.accountant!r}, this node with {policy.accountant!r}"
    step = (request.noise_multiplier, request.sample_rate, request.steps)
    run_eps = compute_epsilon([*this_run, step], request.delta, policy.accountant)
    if run_eps > request.run_target * (1 + _EPSILON_SLACK):
        return (
            f"privacy budget: this round would take the run's epsilon to {run_eps:.3f}, past its target "
            f"{request.run_target:g}"
        )
    life_eps = compute_epsilon([*lifetime, step], request.delta, policy.accountant)
    if life_eps > policy.max_epsilon * (1 + _EPSILON_SLACK):
        return (
            f"privacy budget: this round would take the lifetime epsilon to {life_eps:.3f}, past this node's cap "
            f"{policy.max_epsilon:g}"
        )
    return None
