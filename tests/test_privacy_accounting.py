"""Accounting and planning: our epsilons are Opacus' epsilons, pinned golden numbers, plans that hold.

References are computed here independently, the way a training loop would: a fresh Opacus
accountant, ``step()`` once per DP-SGD step, ``get_epsilon(delta)``.
"""

from __future__ import annotations

import json
import math
import stat
from pathlib import Path
from typing import Any

import opacus.accountants.utils
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus_reference import opacus_reference

from fedlora.privacy.accounting import (
    ACCOUNTANTS,
    PRV_EPS_ERROR,
    PrivacyAccountingError,
    compact_history,
    compute_epsilon,
    create,
    prv_domain_size,
    prv_epsilon,
    register,
    validate_history,
)
from fedlora.privacy.planning import (
    CACHE_ENV,
    BudgetPlan,
    calibration_cache,
    default_delta,
    delta_warning,
    expected_rounds,
    plan_noise,
)

DELTA = 1e-5
MIXED = [(1.0, 0.016, 100), (0.8, 0.032, 50), (1.2, 0.01, 200)]


# Opacus' own numerics warnings (extreme RDP order, log(0) inside PRV at q = 1) are expected here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order:UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]


# ------------------------------------------------------------------------------ golden numbers


@pytest.mark.parametrize(
    ("history", "accountant", "expected"),
    [
        # EMBEDDED.md quotes "2.08" for this setting; Opacus 1.6 gives 2.0918 (see the report).
        ([(1.0, 0.016, 300)], "rdp", 2.0918225474786007),
        ([(1.0, 0.016, 300)], "prv", 1.7524640802678113),
        (MIXED, "rdp", 3.979763136722249),
        (MIXED, "prv", 3.2732618861014537),
    ],
)
def test_golden_epsilon(history: list[tuple[float, float, int]], accountant: str, expected: float) -> None:
    assert compute_epsilon(history, DELTA, accountant) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize(
    "history",
    [
        [(1.0, 0.016, 30)],  # a single round
        [(1.0, 0.016, 30)] * 10,  # ten rounds at one setting (merges like step() does)
        MIXED,  # mixed sigma / q
        [(1.0, 0.016, 10), (0.8, 0.032, 5), (1.0, 0.016, 10)],  # a setting that comes back
    ],
)
def test_equals_opacus_step_loop(history: list[tuple[float, float, int]], accountant: str) -> None:
    # Same history as step() builds, so even PRV agrees to rounding, not only to eps_error.
    ours = compute_epsilon(history, DELTA, accountant)
    assert ours == pytest.approx(opacus_reference(history, DELTA, accountant), rel=1e-9)


@pytest.mark.slow
def test_rdp_is_bit_for_bit_the_accountants_over_repeated_settings() -> None:
    """The per-step RDP vectors are computed once per (q, sigma) and reused: the epsilon stays exactly
    what a fresh RDPAccountant gives for the same history, settings that come back included."""
    history = [(0.6, 0.016, 30), (2.5, 0.5, 20), (0.6, 0.016, 7), (2.5, 0.5, 3)]
    for length in (2, 4):
        accountant = RDPAccountant()
        accountant.history = compact_history(history[:length])
        assert compute_epsilon(history[:length], DELTA, "rdp") == accountant.get_epsilon(delta=DELTA)


def test_compact_history_is_what_step_builds() -> None:
    history = [(1.0, 0.016, 3), (1.0, 0.016, 2), (0.8, 0.032, 0), (0.8, 0.032, 1), (1.0, 0.016, 1)]
    acc = RDPAccountant()
    for sigma, q, n in history:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    assert compact_history(history) == acc.history == [(1.0, 0.016, 5), (0.8, 0.032, 1), (1.0, 0.016, 1)]


@pytest.mark.slow
def test_prv_grouping_only_moves_within_eps_error() -> None:
    """Unmerged per-round entries are another PRV grid and convolution order: eps_error apart at most."""
    rounds = [(1.0, 0.016, 30)] * 10
    acc = PRVAccountant()
    acc.history = list(rounds)  # deliberately not compacted
    assert float(acc.get_epsilon(DELTA)) == pytest.approx(compute_epsilon(rounds, DELTA, "prv"), abs=PRV_EPS_ERROR)


# ------------------------------------------------------------------------------ edge cases


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_empty_history_spends_nothing(accountant: str) -> None:
    assert compute_epsilon([], DELTA, accountant) == 0.0
    # steps that touched no example: zero steps, or a sample rate of zero
    assert compute_epsilon([(1.0, 0.016, 0), (1.0, 0.0, 50)], DELTA, accountant) == 0.0


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_no_noise_is_infinite(accountant: str) -> None:
    assert compute_epsilon([(1.0, 0.016, 10), (0.0, 0.016, 1)], DELTA, accountant) == math.inf


def test_unknown_accountant_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown accountant 'gdp'; known accountants: prv, rdp"):
        compute_epsilon([(1.0, 0.016, 1)], DELTA, "gdp")
    assert create("rdp") is ACCOUNTANTS["rdp"]
    with pytest.raises(ValueError, match="already registered"):
        register("rdp", ACCOUNTANTS["rdp"])


@pytest.mark.parametrize(
    ("history", "match"),
    [
        ([(1.0, 0.016)], r"history\[0\] must be"),
        ([(1.0, 0.016, 1), (-1.0, 0.016, 1)], r"history\[1\]: noise_multiplier must be finite and >= 0, got -1.0"),
        ([(math.inf, 0.016, 1)], "noise_multiplier must be finite and >= 0, got inf"),
        ([(1.0, 1.5, 1)], r"sample_rate must be in \[0, 1\], got 1.5"),
        ([(1.0, 0.016, 2.5)], "num_steps must be an integer >= 0, got 2.5"),
        ([(1.0, 0.016, -3)], "num_steps must be an integer >= 0, got -3"),
        ([(1.0, "0.1", 3)], "sample_rate must be a number, got '0.1'"),
    ],
)
def test_bad_history_names_the_entry(history: list[tuple[float, ...]], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_history(history)


@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, math.nan])
def test_bad_delta_named(delta: float) -> None:
    with pytest.raises(ValueError, match="delta must"):
        compute_epsilon([(1.0, 0.016, 1)], delta, "rdp")


def test_prv_refuses_a_grid_it_cannot_hold() -> None:
    # 10^6 steps: ~2e8 grid points, which Opacus would try to allocate (~20 GB) and get killed.
    assert prv_domain_size([(1.0, 0.016, 10**6)], DELTA) > 10**8
    with pytest.raises(PrivacyAccountingError, match=r"1000000 steps on .* points .*'rdp' accountant"):
        prv_epsilon([(1.0, 0.016, 10**6)], DELTA)
    assert compute_epsilon([(1.0, 0.016, 10**6)], DELTA, "rdp") > 0  # RDP has no such limit


def test_prv_tiny_delta_is_a_clear_error() -> None:
    with pytest.raises(PrivacyAccountingError, match=r"delta=1e-18 .*Floating point errors"):
        prv_epsilon([(1.0, 0.016, 300)], 1e-18)


def test_prv_small_spend_reads_as_eps_error() -> None:
    # PRV reports an upper bound (estimate + eps_error): one very noisy step is ~eps_error, not ~0.
    eps = prv_epsilon([(5.0, 0.001, 1)], DELTA)
    assert 0.0 < eps <= 1.5 * PRV_EPS_ERROR


# ------------------------------------------------------------------------------ planning


@pytest.fixture(scope="module")
def rdp_plan() -> BudgetPlan:
    return plan_noise(8.0, DELTA, rounds=100, participation_rate=0.1, local_steps=30, sample_rate=0.016)


def test_plan_rdp_golden_and_reaches_target(rdp_plan: BudgetPlan) -> None:
    plan = rdp_plan
    assert isinstance(plan, BudgetPlan)
    assert (plan.expected_rounds, plan.expected_steps) == (10, 300)
    assert plan.noise_multiplier == pytest.approx(0.608367919921875, rel=1e-6)
    # composed independently over the plan's steps, the planned sigma meets the target ...
    eps = opacus_reference([(plan.noise_multiplier, 0.016, plan.expected_steps)], DELTA, "rdp")
    assert 8.0 - plan.epsilon_tolerance <= eps <= 8.0
    assert plan.expected_epsilon == pytest.approx(eps, rel=1e-12)
    # ... and a smaller sigma does not
    assert opacus_reference([(0.97 * plan.noise_multiplier, 0.016, 300)], DELTA, "rdp") > 8.0
    assert plan.epsilon_if_every_round == pytest.approx(
        opacus_reference([(plan.noise_multiplier, 0.016, 3000)], DELTA, "rdp"), rel=1e-12
    )


@pytest.mark.slow
def test_plan_prv_reaches_target() -> None:
    plan = plan_noise(3.0, DELTA, rounds=10, participation_rate=0.5, local_steps=6, sample_rate=0.05, accountant="prv")
    assert plan.expected_steps == 30
    eps = opacus_reference([(plan.noise_multiplier, 0.05, 30)], DELTA, "prv")
    assert 3.0 - plan.epsilon_tolerance <= eps <= 3.0
    assert opacus_reference([(0.97 * plan.noise_multiplier, 0.05, 30)], DELTA, "prv") > 3.0


def test_calibrating_per_round_overspends() -> None:
    """Why sigma is calibrated once: a sigma that spends the whole target in one round composes far past it."""
    per_round = plan_noise(8.0, DELTA, rounds=1, participation_rate=1.0, local_steps=30, sample_rate=0.016)
    ten_rounds = compute_epsilon([(per_round.noise_multiplier, 0.016, 30)] * 10, DELTA, "rdp")
    assert ten_rounds > 1.5 * 8.0


def test_a_calibration_is_kept_and_taken_again_only_when_it_meets_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache saves Opacus' bisection on a repeated setting; a cached sigma that misses the target
    (tampered: too little noise, or far too much) is calibrated afresh, and so is a broken file."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    calls: list[int] = []
    answers: dict[str, float] = {}

    def counted(**kwargs: Any) -> float:  # Opacus' bisection, run once and then counted
        calls.append(1)
        key = repr(sorted(kwargs.items()))
        if key not in answers:
            answers[key] = float(get_noise_multiplier(**kwargs))
        return answers[key]

    monkeypatch.setattr(opacus.accountants.utils, "get_noise_multiplier", counted)  # planning imports it per call
    args = (3.0, DELTA, 4, 1.0, 5, 0.05)
    first = plan_noise(*args)
    path = calibration_cache()
    assert path is not None and len(calls) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert plan_noise(*args) == first and len(calls) == 1  # taken again: the same plan, no bisection
    (key,) = json.loads(path.read_text())
    for sigma in (0.9 * first.noise_multiplier, 3 * first.noise_multiplier, "0.5", -1.0):
        path.write_text(json.dumps({key: sigma}))
        assert plan_noise(*args) == first  # refused: recalibrated, and the right value written back
        assert json.loads(path.read_text()) == {key: first.noise_multiplier}
    path.write_text("{torn")
    assert plan_noise(*args) == first and len(calls) == 6
    monkeypatch.setenv(CACHE_ENV, "")
    assert calibration_cache() is None and plan_noise(*args) == first and len(calls) == 7


@pytest.mark.parametrize(
    ("rounds", "rate", "expected"),
    [(100, 0.07, 7), (10, 0.25, 3), (10, 1.0, 10), (3, 0.01, 1), (10, 0.1, 1)],
)
def test_expected_rounds_round_up(rounds: int, rate: float, expected: int) -> None:
    # 100 * 0.07 = 7.000000000000001 in floats: it must plan 7 rounds, not 8
    assert expected_rounds(rounds, rate) == expected


def test_describe_says_what_will_happen(rdp_plan: BudgetPlan) -> None:
    text = rdp_plan.describe()
    assert len(text.splitlines()) >= 8
    for fragment in ["rdp", "sigma = 0.608368", "epsilon 8 at delta 1e-05", "300 per client", "7.995", "once"]:
        assert fragment in text, fragment


_GOOD = {
    "target_epsilon": 8.0,
    "delta": DELTA,
    "rounds": 10,
    "participation_rate": 0.5,
    "local_steps": 3,
    "sample_rate": 0.01,
    "accountant": "rdp",
}


@pytest.mark.parametrize(
    ("name", "value", "match"),
    [
        ("target_epsilon", 0.0, "target_epsilon must be a positive finite number, got 0.0"),
        ("target_epsilon", math.inf, "target_epsilon must be a positive finite number, got inf"),
        ("delta", 1.0, r"delta must be in \(0, 1\), got 1.0"),
        ("delta", 0.0, r"delta must be in \(0, 1\), got 0.0"),
        ("rounds", 0, "rounds must be an integer >= 1, got 0"),
        ("rounds", 2.0, "rounds must be an integer >= 1, got 2.0"),
        ("participation_rate", 0.0, r"participation_rate must be in \(0, 1\], got 0.0"),
        ("participation_rate", 1.5, r"participation_rate must be in \(0, 1\], got 1.5"),
        ("local_steps", 0, "local_steps must be an integer >= 1, got 0"),
        ("local_steps", True, "local_steps must be an integer >= 1, got True"),
        ("sample_rate", -0.1, r"sample_rate must be in \(0, 1\], got -0.1"),
        ("accountant", "moments", "unknown accountant 'moments'; known accountants: prv, rdp"),
    ],
)
def test_plan_bad_inputs_named(name: str, value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        plan_noise(**{**_GOOD, name: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(("n", "delta"), [(1, 0.1), (9, 1e-2), (10, 1e-2), (1000, 1e-4), (2000, 1e-5), (50_000, 1e-6)])
def test_default_delta_is_a_power_of_ten_well_below_one_over_n(n: int, delta: float) -> None:
    assert default_delta(n) == delta
    assert default_delta(n) <= 1 / (10 * n)


def test_delta_warning() -> None:
    assert delta_warning(1e-5, 2000) is None
    message = delta_warning(1e-3, 2000)
    assert message is not None and "delta=0.001 is not below 1 / n_local = 1/2000" in message and "1e-05" in message
    assert delta_warning(1 / 2000, 2000) is not None  # equal is not below
