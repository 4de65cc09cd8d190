"""Budget planning: one noise multiplier for the whole planned run, from a target (epsilon, delta).

Opacus' rule, which we keep: calibrate sigma once, over every step the run is expected to take,
never per round. Calibrating per round (each round "spending" the target) composes to many times
the target over the run; the ledger would then correctly report a lifetime epsilon far above what
the user asked for.

Calibration is Opacus' bisection, 10 to 18 evaluations of the accountant (0.1 to 2.5 s alone on a
2-core machine, several times that beside other work), and a run's setting repeats: each calibrated
sigma is kept in a small cache file (:func:`calibration_cache`) and taken again only after the
accountant confirms it meets the target within the tolerance, so a tampered or stale entry costs a
fresh calibration, never privacy.

The plan is for a client with the *expected* participation. A client sampled more often than
expected spends more; ``BudgetPlan.epsilon_if_every_round`` shows the worst case, and budget
enforcement (``PrivacyLedger.would_exceed``) is what actually caps a client.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

from fedlora.atomic import write_json_atomic
from fedlora.privacy.accounting import (
    PRV_EPS_ERROR,
    PRV_MAX_DOMAIN_SIZE,
    PrivacyAccountingError,
    check_accountant,
    check_count,
    check_delta,
    check_rate,
    compute_epsilon,
    prv_domain_size,
)


@dataclass(frozen=True)
class BudgetPlan:
    """The noise multiplier for a run and what it is expected to cost each client.

    Attributes
    ----------
    noise_multiplier
        sigma, calibrated once for ``expected_steps`` steps at ``sample_rate``.
    expected_rounds
        ``ceil(rounds * participation_rate)``: rounds a typical client takes part in, rounded *up*
        because a client trains whole rounds and a conservative plan must not assume a fraction.
    expected_steps
        ``expected_rounds * local_steps``: the DP-SGD steps sigma was calibrated for (so never less
        than ``ceil(rounds * participation_rate * local_steps)``).
    expected_epsilon
        Epsilon of ``expected_steps`` steps at sigma, by the same accountant; <= ``target_epsilon``
        and within ``epsilon_tolerance`` of it.
    epsilon_if_every_round
        Epsilon of a client that takes part in all ``rounds``; None if the accountant cannot
        compute it (PRV's numeric limits).
    """

    target_epsilon: float
    delta: float
    rounds: int
    participation_rate: float
    local_steps: int
    sample_rate: float
    accountant: str
    epsilon_tolerance: float
    noise_multiplier: float
    expected_rounds: int
    expected_steps: int
    expected_epsilon: float
    epsilon_if_every_round: float | None

    def describe(self) -> str:
        """A multi-line summary to print before training starts."""
        worst = (
            f"epsilon {self.epsilon_if_every_round:.4g} ({self.rounds * self.local_steps} steps)"
            if self.epsilon_if_every_round is not None
            else f"not computable with the {self.accountant} accountant"
        )
        return "\n".join(
            [
                f"DP-SGD budget plan ({self.accountant} accountant; sigma calibrated once for the whole run)",
                "  privacy unit:         one training example of a client's local data (sample-level DP)",
                f"  target:               epsilon {self.target_epsilon:g} at delta {self.delta:g}, per client",
                f"  planned rounds:       {self.rounds}, expected participation {self.participation_rate:g}"
                f" -> {self.expected_rounds} rounds per client (rounded up)",
                f"  local steps / round:  {self.local_steps} at sample rate q = {self.sample_rate:g}",
                f"  expected steps:       {self.expected_steps} per client",
                f"  noise multiplier:     sigma = {self.noise_multiplier:.6g}",
                f"  expected epsilon:     {self.expected_epsilon:.4g} per client at the end of the run",
                f"  if in every round:    {worst}",
            ]
        )


def expected_rounds(rounds: int, participation_rate: float) -> int:
    """``ceil(rounds * participation_rate)``, ignoring float noise below 1e-9.

    Without the rounding guard 100 * 0.07 = 7.000000000000001 would plan for an 8th round.
    """
    rounds = check_count("rounds", rounds, minimum=1)
    participation_rate = check_rate("participation_rate", participation_rate)
    return max(1, math.ceil(round(rounds * participation_rate, 9)))


def plan_noise(
    target_epsilon: float,
    delta: float,
    rounds: int,
    participation_rate: float,
    local_steps: int,
    sample_rate: float,
    accountant: str = "rdp",
    *,
    epsilon_tolerance: float = 0.01,
) -> BudgetPlan:
    """The smallest noise multiplier (to ``epsilon_tolerance``) whose planned run stays within target.

    Parameters
    ----------
    target_epsilon
        Epsilon each client may spend over the run, > 0.
    delta
        In (0, 1); well below 1 / (local examples), see :func:`default_delta`.
    rounds
        Planned server rounds, >= 1.
    participation_rate
        Expected fraction of rounds a client is sampled in, in (0, 1].
    local_steps
        DP-SGD optimizer steps a client takes per round it takes part in, >= 1.
    sample_rate
        Poisson sampling rate q = batch size / local examples, in (0, 1].
    accountant
        ``"rdp"`` or ``"prv"``: a name both in our ``ACCOUNTANTS`` and in Opacus' registry, since
        Opacus' ``get_noise_multiplier`` does the calibration.
    epsilon_tolerance
        Precision of Opacus' bisection: the plan's epsilon is in [target - tolerance, target].

    Raises
    ------
    ValueError
        On an invalid input (the message names it) or a target no sigma up to 1e6 reaches.
    PrivacyAccountingError
        When the PRV accountant's grid would be too large for the planned steps.
    """
    target = _positive_finite("target_epsilon", target_epsilon)
    delta = check_delta(delta)
    rounds = check_count("rounds", rounds, minimum=1)
    participation_rate = check_rate("participation_rate", participation_rate)
    local_steps = check_count("local_steps", local_steps, minimum=1)
    sample_rate = check_rate("sample_rate", sample_rate)
    accountant = check_accountant(accountant)
    tolerance = _positive_finite("epsilon_tolerance", epsilon_tolerance)
    if tolerance >= target:
        raise ValueError(f"epsilon_tolerance must be below target_epsilon={target!r}, got {epsilon_tolerance!r}")

    n_rounds = expected_rounds(rounds, participation_rate)
    steps = n_rounds * local_steps
    if accountant == "prv":
        _check_prv_can_plan(target, delta, sample_rate, steps, tolerance)
    sigma, expected = _calibrated(target, delta, sample_rate, steps, accountant, tolerance)
    try:
        every_round: float | None = compute_epsilon([(sigma, sample_rate, rounds * local_steps)], delta, accountant)
    except PrivacyAccountingError:
        every_round = None
    return BudgetPlan(
        target_epsilon=target,
        delta=delta,
        rounds=rounds,
        participation_rate=participation_rate,
        local_steps=local_steps,
        sample_rate=sample_rate,
        accountant=accountant,
        epsilon_tolerance=tolerance,
        noise_multiplier=sigma,
        expected_rounds=n_rounds,
        expected_steps=steps,
        expected_epsilon=expected,
        epsilon_if_every_round=every_round,
    )


CACHE_ENV = "FEDLORA_CACHE_DIR"
"""Directory of the calibration cache; empty turns the cache off. Default: ``$XDG_CACHE_HOME/fedlora``
(``~/.cache/fedlora``)."""

CACHE_FILE = "noise-multipliers.json"
CACHE_ENTRIES = 512
"""Most settings kept; the oldest go first."""


def calibration_cache() -> Path | None:
    """The file that keeps calibrated noise multipliers, or None when ``$FEDLORA_CACHE_DIR`` is empty."""
    configured = os.environ.get(CACHE_ENV)
    if configured is not None:
        return Path(configured) / CACHE_FILE if configured else None
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fedlora" / CACHE_FILE


def _calibrated(
    target: float, delta: float, q: float, steps: int, accountant: str, tolerance: float
) -> tuple[float, float]:
    """(sigma, epsilon of the planned steps at sigma): Opacus' calibration, or a cached one the
    accountant confirms lies in [target - tolerance, target], as the bisection's answer does."""
    key = json.dumps([accountant, target, delta, q, steps, tolerance, version("opacus")])
    path = calibration_cache()
    entries = _read_cache(path)
    cached = entries.get(key)
    if isinstance(cached, float) and math.isfinite(cached) and cached > 0.0:
        epsilon = compute_epsilon([(cached, q, steps)], delta, accountant)
        if target - tolerance <= epsilon <= target:
            return cached, epsilon
    sigma = _noise_multiplier(target, delta, q, steps, accountant, tolerance)
    epsilon = compute_epsilon([(sigma, q, steps)], delta, accountant)
    if path is not None:
        entries.pop(key, None)
        entries[key] = sigma
        _write_cache(path, dict(list(entries.items())[-CACHE_ENTRIES:]))
    return sigma, epsilon


def _read_cache(path: Path | None) -> dict[str, Any]:
    """The cache's entries; an absent, unreadable or malformed file is an empty cache."""
    if path is None:
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, entries: dict[str, Any]) -> None:
    """Replace the cache file (0600 in a 0700 directory); a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_json_atomic(path, entries, 0o600)
    except OSError:
        pass


def _noise_multiplier(target: float, delta: float, q: float, steps: int, accountant: str, tolerance: float) -> float:
    from opacus.accountants.utils import get_noise_multiplier  # heavy: Opacus imports all of itself (~1.3 s)

    try:
        return float(
            get_noise_multiplier(
                target_epsilon=target,
                target_delta=delta,
                sample_rate=q,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=tolerance,
            )
        )
    except ValueError as error:
        if "too low" not in str(error):
            raise
        raise ValueError(
            f"target_epsilon={target!r} at delta={delta!r} is out of reach for {steps} steps at q={q!r}: "
            "even sigma = 1e6 spends more; plan fewer steps or a larger target"
        ) from None


def _check_prv_can_plan(target: float, delta: float, q: float, steps: int, tolerance: float) -> None:
    """Refuse a PRV plan whose bisection would allocate an unmanageable grid.

    Opacus' bisection evaluates sigmas down to about half the answer, and the grid grows as sigma
    falls. We bound it with the RDP answer (RDP's sigma is >= PRV's for the same target) divided
    by 3, a margin over that factor of 2 for PRV being tighter.
    """
    sigma_rdp = _noise_multiplier(target, delta, q, steps, "rdp", tolerance)
    size = prv_domain_size([(sigma_rdp / 3, q, steps)], delta, eps_error=PRV_EPS_ERROR)
    if size > PRV_MAX_DOMAIN_SIZE:
        raise PrivacyAccountingError(
            f"planning {steps} steps with the PRV accountant needs grids of ~{size:,} points "
            f"(limit {PRV_MAX_DOMAIN_SIZE:,}); plan with the 'rdp' accountant"
        )


def default_delta(n_local: int) -> float:
    """The largest power of ten <= 1 / (10 * n_local): well below 1 / n_local, and a round number.

    With delta ~ 1 / n a mechanism that publishes one whole example at random is (0, delta)-DP, so
    delta must sit well below it; a factor of at least 10 and a power of ten keeps the reported
    (epsilon, delta) readable. Examples: 2,000 examples -> 1e-5, 1,000 -> 1e-4, 50,000 -> 1e-6.
    """
    n = check_count("n_local", n_local, minimum=1)
    exponent = len(str(10 * n - 1))  # smallest k with 10**k >= 10 * n, in exact integer arithmetic
    return float(10.0**-exponent)


def delta_warning(delta: float, n_local: int) -> str | None:
    """A message to show the user if ``delta`` is not below 1 / ``n_local``; None if it is."""
    delta = check_delta(delta)
    n = check_count("n_local", n_local, minimum=1)
    if delta * n < 1.0:
        return None
    return (
        f"delta={delta:g} is not below 1 / n_local = 1/{n}: at that delta a mechanism that leaks one whole "
        f"training example counts as private. Use delta well below 1/{n}, e.g. {default_delta(n):g}"
    )


def _positive_finite(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0.0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


__all__ = ["BudgetPlan", "default_delta", "delta_warning", "expected_rounds", "plan_noise"]
