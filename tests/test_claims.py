"""The verdict logic of ``fl-sim reproduce`` on hand-made tables: the tie rule, each claim's direction,
and claims about strategies or arms a run left out."""

from __future__ import annotations

import pytest

from fedlora.simulations.claims import (
    NOT_REPRODUCED,
    NOT_RUN,
    REPRODUCED,
    TIE_WITHIN_SPREAD,
    AtLeast,
    Extreme,
    GapGrows,
    Score,
    order,
)
from fedlora.simulations.compare_report import SummaryRow
from fedlora.simulations.reproduce import CELLS, Arm, Cell, CellResult, judge, render


def s(mean: float, sd: float = 0.0, n: int = 3) -> Score:
    return Score(mean, sd, n)


def test_order_calls_a_difference_within_the_larger_sd_a_tie() -> None:
    assert order(s(0.80, 0.02), s(0.70, 0.03)) == 1
    assert order(s(0.70, 0.03), s(0.80, 0.02)) == -1
    assert order(s(0.80, 0.05), s(0.76, 0.01)) == 0  # 0.04 <= the larger sd 0.05
    assert order(s(0.80, 0.04), s(0.76, 0.0)) == 0  # exactly the spread: still a tie
    assert order(s(0.80), s(0.79)) == 1  # one seed: no spread, every difference counts


def test_at_least_points_the_claims_way() -> None:
    claim = AtLeast("ffa >= fedavg", "eps-1", "ffa-lora", "fedavg-lora")
    assert claim.check({"eps-1": {"ffa-lora": s(0.6, 0.01), "fedavg-lora": s(0.5, 0.02)}}).verdict == REPRODUCED
    assert claim.check({"eps-1": {"ffa-lora": s(0.5, 0.01), "fedavg-lora": s(0.6, 0.02)}}).verdict == NOT_REPRODUCED
    outcome = claim.check({"eps-1": {"ffa-lora": s(0.55, 0.06), "fedavg-lora": s(0.6, 0.02)}})
    assert outcome.verdict == TIE_WITHIN_SPREAD
    assert outcome.evidence == "ffa-lora 0.550 ± 0.060 vs fedavg-lora 0.600 ± 0.020"


def test_extreme_needs_every_rival_beaten_beyond_the_spread() -> None:
    among = ("a", "b", "c")
    best = Extreme("a is best", "x", "a", among)
    worst = Extreme("a is worst", "x", "a", among, best=False)
    clear = {"x": {"a": s(0.9, 0.01), "b": s(0.8, 0.01), "c": s(0.7, 0.01)}}
    assert best.check(clear).verdict == REPRODUCED
    assert worst.check(clear).verdict == NOT_REPRODUCED
    close = {"x": {"a": s(0.9, 0.01), "b": s(0.895, 0.01), "c": s(0.7, 0.01)}}  # b within a's spread
    assert best.check(close).verdict == TIE_WITHIN_SPREAD
    assert worst.check(close).verdict == NOT_REPRODUCED  # a beats c beyond the spread
    lowest = {"x": {"a": s(0.5, 0.01), "b": s(0.8, 0.01), "c": s(0.7, 0.01)}}
    assert worst.check(lowest).verdict == REPRODUCED
    assert best.check(lowest).verdict == NOT_REPRODUCED
    assert best.check(lowest).evidence.startswith("b 0.800")  # ranked best first


def test_gap_grows_compares_the_first_and_last_arm_against_their_spread() -> None:
    claim = GapGrows("gap grows as epsilon shrinks", ("eps-6", "eps-3", "eps-1"), "ffa", "avg")

    def table(gaps: tuple[float, float, float], sd: float) -> dict[str, dict[str, Score]]:
        arms = ("eps-6", "eps-3", "eps-1")
        return {a: {"ffa": s(0.5 + g, sd), "avg": s(0.5, sd)} for a, g in zip(arms, gaps, strict=True)}

    assert claim.check(table((0.0, 0.05, 0.10), 0.02)).verdict == REPRODUCED
    assert claim.check(table((0.10, 0.05, 0.0), 0.02)).verdict == NOT_REPRODUCED
    assert claim.check(table((0.0, 0.05, 0.03), 0.04)).verdict == TIE_WITHIN_SPREAD
    assert "eps-1: +0.100" in claim.check(table((0.0, 0.05, 0.10), 0.02)).evidence


def test_a_claim_about_what_was_not_run_says_so() -> None:
    claim = AtLeast("ffa >= fedavg", "eps-1", "ffa-lora", "fedavg-lora")
    outcome = claim.check({"eps-1": {"ffa-lora": s(0.6)}})
    assert outcome.verdict == NOT_RUN and "fedavg-lora at eps-1" in outcome.evidence
    assert claim.check({}).verdict == NOT_RUN


def test_a_cell_refuses_claims_about_arms_or_strategies_it_does_not_run() -> None:
    arm = Arm("no-dp", "no DP", {})
    with pytest.raises(ValueError, match="names \\['eps-1'\\]"):
        Cell(
            name="c", version=1, title="t", paper="p", paper_setting="ps", ours="o", base={},
            strategies=("fedavg-lora",), arms=(arm,),
            claims=(AtLeast("x", "eps-1", "fedavg-lora", "fedavg-lora"),),
        )  # fmt: skip
    with pytest.raises(ValueError, match="ffa-lora"):
        Cell(
            name="c", version=1, title="t", paper="p", paper_setting="ps", ours="o", base={},
            strategies=("fedavg-lora",), arms=(arm,),
            claims=(AtLeast("x", "no-dp", "ffa-lora", "fedavg-lora"),),
        )  # fmt: skip


def _row(strategy: str, finals: tuple[float, ...], verdict: str, gap: float | None) -> SummaryRow:
    mean = sum(finals) / len(finals)
    sd = (sum((f - mean) ** 2 for f in finals) / (len(finals) - 1)) ** 0.5
    return SummaryRow(
        strategy=strategy, lr=0.003, lr_grid=(0.003,), seeds=tuple(range(len(finals))), finals=finals,
        final_em_mean=mean, final_em_sd=sd, final_em_min=min(finals), final_em_max=max(finals), verdict=verdict,
        gap_to_centralised=gap, rounds_to_target_mean=None, reached_target=0, bytes_mean=0.0, epsilon_max=None,
    )  # fmt: skip


def test_the_report_puts_the_papers_number_beside_ours_and_judges_each_claim() -> None:
    cell = CELLS["fair-domains"]
    rows = {
        "no-dp": [
            _row("lora-fair", (0.62, 0.63, 0.64), "best", -0.05),
            _row("fedavg-lora", (0.55, 0.56, 0.57), "worse", -0.12),
            _row("flexlora", (0.54, 0.55, 0.56), "worse", -0.13),
            _row("ffa-lora", (0.50, 0.51, 0.52), "worse", -0.17),
            _row("centralised", (0.66, 0.67, 0.68), "reference", None),
        ]
    }
    outcomes = judge(cell, rows)
    # the second arm (12 rounds of 5 steps) was not run: its claim says so
    assert [o.verdict for _, o in outcomes] == [REPRODUCED, REPRODUCED, REPRODUCED, NOT_RUN]
    md = render(CellResult(cell, rows, outcomes, 12.0, quick=False))
    assert "| lora-fair | LoRA-FAIR | 0.003 | 3 | 0.630 ± 0.010 | -0.050 | 77.07% |" in md
    assert "| ffa-lora | FFA-LoRA | 0.003 | 3 | 0.510 ± 0.010 | -0.170 | 72.82% |" in md
    assert "| LoRA-FAIR is the best of the methods the paper compares | reproduced |" in md
    assert "smoke run" not in md
    quick = render(CellResult(cell, rows, outcomes, 12.0, quick=True))
    assert "smoke run, not evidence" in quick
