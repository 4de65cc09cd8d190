"""Epsilon for a history of DP-SGD steps, computed by Opacus' own accountants.

A history is what Opacus' accountants keep: ``[(noise_multiplier, sample_rate, num_steps), ...]``.
We never re-derive the math: we hand the history to a fresh ``PRVAccountant`` and ask it for
epsilon, or sum Opacus' own per-step RDP vectors exactly as ``RDPAccountant`` does (each computed
once per process: the same bits, without 0.05 to 0.3 s per call), so our numbers are Opacus' numbers.
What this module adds is what a lifetime ledger needs around that call: validation, the empty
history, a registry, and clear errors where the PRV accountant's numerics give out.

The unit of privacy throughout is one training example of one client's local data (sample-level
DP-SGD with Poisson sampling at rate ``sample_rate``).
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

# Opacus is imported inside the functions that compute: importing it imports torch (~3 s), which
# the commands that only read a policy, a ledger's entries or a key (fl-client keygen, fl-server
# enroll) never need.

HistoryEntry = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, num_steps)``, the layout of Opacus' ``accountant.history``."""

EpsilonFunction = Callable[[Sequence[HistoryEntry], float], float]
"""``(history, delta) -> epsilon``; the signature every registered accountant implements."""

PRV_EPS_ERROR = 0.01
"""Opacus' default ``eps_error`` for PRV: the epsilon we report is an upper bound that adds it."""

PRV_MAX_DOMAIN_SIZE = 10_000_000
"""Largest PRV discretisation we attempt: about 100 bytes per point at peak, so ~1 GB and tens of
seconds. The size grows with sqrt(total steps) and with epsilon; Opacus has no limit of its own and
simply runs out of memory (10^6 steps at q = 0.016, sigma 1 needs ~10^8 points)."""


class PrivacyAccountingError(ValueError):
    """An accountant cannot give a trustworthy epsilon for this history and delta."""


# --------------------------------------------------------------------------------------------
# Validation, shared by planning and the ledger: one message style, naming the bad value.
# --------------------------------------------------------------------------------------------


def check_delta(delta: float) -> float:
    """``delta`` as a float in (0, 1), or ValueError naming it."""
    value = _real("delta", delta)
    if not 0.0 < value < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return value


def check_rate(name: str, value: float, *, allow_zero: bool = False) -> float:
    """A probability in (0, 1] (or [0, 1] with ``allow_zero``), or ValueError naming it."""
    rate = _real(name, value)
    low_ok = rate >= 0.0 if allow_zero else rate > 0.0
    if not (low_ok and rate <= 1.0):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return rate


def check_noise_multiplier(noise_multiplier: float) -> float:
    """A finite noise multiplier >= 0 (0 means no noise: infinite epsilon), or ValueError."""
    sigma = _real("noise_multiplier", noise_multiplier)
    if not (math.isfinite(sigma) and sigma >= 0.0):
        raise ValueError(f"noise_multiplier must be finite and >= 0, got {noise_multiplier!r}")
    return sigma


def check_count(name: str, value: int, *, minimum: int = 0) -> int:
    """An integer (not a bool, not a float) >= ``minimum``, or ValueError naming it."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if count < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return count


def _real(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real
        raise ValueError(f"{name} must be a number, got {value!r}")
    result = float(value)
    if math.isnan(result):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return result


def validate_history(history: Iterable[Sequence[Any]]) -> list[HistoryEntry]:
    """The history as clean ``(float, float, int)`` tuples, or ValueError naming the bad entry."""
    clean: list[HistoryEntry] = []
    for i, entry in enumerate(history):
        if len(entry) != 3:
            raise ValueError(f"history[{i}] must be (noise_multiplier, sample_rate, num_steps), got {entry!r}")
        sigma, q, steps = entry
        try:
            clean.append(
                (
                    check_noise_multiplier(sigma),
                    check_rate("sample_rate", q, allow_zero=True),
                    check_count("num_steps", steps),
                )
            )
        except ValueError as error:
            raise ValueError(f"history[{i}]: {error}") from None
    return clean


def compact_history(history: Iterable[Sequence[Any]]) -> list[HistoryEntry]:
    """The history Opacus' ``accountant.step()`` would have built from the same steps, in order.

    Consecutive entries with the same (noise_multiplier, sample_rate) merge into one, exactly as
    ``step()`` merges them, so feeding a per-round ledger gives bit-for-bit the accountant a
    training loop would have kept. Entries with no steps or ``sample_rate == 0`` touch no example
    and are dropped. Non-adjacent repeats are not merged: composition is order-free in theory, but
    PRV's numerics depend (within ``eps_error``) on the grouping, and we want Opacus' exact number.
    """
    merged: list[HistoryEntry] = []
    for sigma, q, steps in validate_history(history):
        if steps == 0 or q == 0.0:
            continue
        if merged and merged[-1][0] == sigma and merged[-1][1] == q:
            merged[-1] = (sigma, q, merged[-1][2] + steps)
        else:
            merged.append((sigma, q, steps))
    return merged


# --------------------------------------------------------------------------------------------
# The accountants: each turns a history into epsilon through the Opacus class of the same name.
# --------------------------------------------------------------------------------------------


def rdp_epsilon(history: Sequence[HistoryEntry], delta: float) -> float:
    """Epsilon at ``delta`` from Opacus' ``RDPAccountant`` (default orders) fed ``history``.

    An empty history (a client sampled in no round) has spent nothing: 0.0. A step with
    ``noise_multiplier == 0`` released an un-noised gradient: ``inf``.
    """
    delta = check_delta(delta)
    steps = compact_history(history)
    if not steps:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in steps):
        return math.inf
    from opacus.accountants import RDPAccountant  # heavy: see the imports
    from opacus.accountants.analysis import rdp as rdp_analysis

    # RDPAccountant.get_privacy_spent, with each (q, sigma)'s per-step RDP computed once per
    # process: Opacus' compute_rdp is that vector times the step count, so the sum is bit for bit
    # the accountant's, and a ledger asked several times a round computes the same orders once
    rdp = sum([_rdp_per_step(q, sigma) * n for sigma, q, n in steps])
    eps, _ = rdp_analysis.get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(eps)


@functools.lru_cache(maxsize=256)
def _rdp_per_step(q: float, sigma: float) -> np.ndarray:
    """Opacus' RDP of one step of the sampled Gaussian mechanism at its default orders."""
    from opacus.accountants import RDPAccountant  # heavy: see the imports
    from opacus.accountants.analysis import rdp as rdp_analysis

    vector = rdp_analysis.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    vector.flags.writeable = False  # shared by every later call
    return vector


def prv_epsilon(
    history: Sequence[HistoryEntry],
    delta: float,
    *,
    eps_error: float = PRV_EPS_ERROR,
    max_domain_size: int = PRV_MAX_DOMAIN_SIZE,
) -> float:
    """Epsilon at ``delta`` from Opacus' ``PRVAccountant`` fed ``history``: its upper bound.

    PRV is tighter than RDP but numerical. Its limits, which Opacus reports obscurely or not at all:

    - The value returned is the estimate plus ``eps_error`` (Opacus returns the upper bound), so a
      tiny spend (one step at large sigma) reads about ``eps_error``, not ~0, and two PRV numbers
      for the same composition grouped differently agree only to within ``eps_error``.
    - The discretisation mesh shrinks as 1 / sqrt(total steps), so very long histories need huge
      grids (memory ~100 bytes per point); we refuse above ``max_domain_size`` points with a
      message instead of letting the process be killed.
    - A very small delta (below ~ grid size * 1e-19) is lost in floating-point error.
    - An empty history (where Opacus fails on an empty grid) is 0.0 here; ``sigma == 0`` is ``inf``.

    Raises
    ------
    PrivacyAccountingError
        When the PRV accountant cannot give a trustworthy number; the RDP accountant always can.
    """
    delta = check_delta(delta)
    if isinstance(eps_error, bool) or not isinstance(eps_error, numbers.Real) or not 0.0 < eps_error < math.inf:
        raise ValueError(f"eps_error must be a positive number, got {eps_error!r}")
    steps = compact_history(history)
    if not steps:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in steps):
        return math.inf
    size = prv_domain_size(steps, delta, eps_error=eps_error)
    total = sum(n for _, _, n in steps)
    if size > max_domain_size:
        raise PrivacyAccountingError(
            f"the PRV accountant would discretise {total} steps on {size:,} points "
            f"(limit {max_domain_size:,}, ~100 bytes each); use the 'rdp' accountant for this history "
            f"or a larger eps_error (now {eps_error})"
        )
    from opacus.accountants import PRVAccountant  # heavy: see the imports

    accountant = PRVAccountant()
    accountant.history = steps
    try:
        return float(accountant.get_epsilon(delta=delta, eps_error=eps_error))
    except (ValueError, RuntimeError, OverflowError, FloatingPointError) as error:
        raise PrivacyAccountingError(
            f"the PRV accountant cannot compute epsilon at delta={delta!r} for {total} steps "
            f"(Opacus: {error}); use a larger delta or the 'rdp' accountant"
        ) from error


def prv_domain_size(history: Sequence[HistoryEntry], delta: float, *, eps_error: float = PRV_EPS_ERROR) -> int:
    """Number of grid points Opacus' PRV accountant would allocate for ``history`` at ``delta``.

    Asks the accountant itself (``PRVAccountant._get_domain``, which costs only RDP evaluations) so
    the estimate cannot drift from what ``get_epsilon`` does; a test pins that the hook exists.
    """
    steps = compact_history(history)
    if not steps:
        return 0
    from opacus.accountants import PRVAccountant  # heavy: see the imports
    from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

    delta_error = check_delta(delta) / 1000  # Opacus' default in PRVAccountant.get_epsilon
    domain = PRVAccountant()._get_domain(
        prvs=[PoissonSubsampledGaussianPRV(q, sigma) for sigma, q, _ in steps],
        num_self_compositions=[n for _, _, n in steps],
        eps_error=eps_error,
        delta_error=delta_error,
    )
    return int(domain.size)


ACCOUNTANTS: dict[str, EpsilonFunction] = {}
"""Accountant name -> ``(history, delta) -> epsilon``. Names are Opacus' mechanism names, which is
what lets planning hand the same name to ``opacus.accountants.utils.get_noise_multiplier``."""


def register(name: str, epsilon: EpsilonFunction) -> None:
    """Add an accountant under ``name``; a name can be registered once."""
    if name in ACCOUNTANTS:
        raise ValueError(f"accountant {name!r} is already registered")
    ACCOUNTANTS[name] = epsilon


def check_accountant(name: str) -> str:
    """``name`` if it is a registered accountant, else ValueError listing the known ones."""
    if name not in ACCOUNTANTS:
        raise ValueError(f"unknown accountant {name!r}; known accountants: {', '.join(sorted(ACCOUNTANTS))}")
    return name


def create(name: str) -> EpsilonFunction:
    """The ``(history, delta) -> epsilon`` function registered as ``name``."""
    return ACCOUNTANTS[check_accountant(name)]


def compute_epsilon(history: Sequence[HistoryEntry], delta: float, accountant: str = "rdp") -> float:
    """Epsilon at ``delta`` of the composition of every step in ``history``, by ``accountant``.

    Parameters
    ----------
    history
        ``[(noise_multiplier, sample_rate, num_steps), ...]`` in the order the steps were taken.
    delta
        Target delta, in (0, 1); keep it well below 1 / (number of local examples).
    accountant
        ``"rdp"`` or ``"prv"`` (see ``ACCOUNTANTS``).

    Returns
    -------
    float
        Epsilon; 0.0 for an empty history, ``inf`` if any step had no noise.
    """
    return create(accountant)(history, delta)


register("rdp", rdp_epsilon)
register("prv", prv_epsilon)

__all__ = [
    "ACCOUNTANTS",
    "PRV_EPS_ERROR",
    "PRV_MAX_DOMAIN_SIZE",
    "EpsilonFunction",
    "HistoryEntry",
    "PrivacyAccountingError",
    "check_accountant",
    "check_count",
    "check_delta",
    "check_noise_multiplier",
    "check_rate",
    "compact_history",
    "compute_epsilon",
    "create",
    "prv_domain_size",
    "prv_epsilon",
    "rdp_epsilon",
    "register",
    "validate_history",
]
