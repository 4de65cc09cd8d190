"""The lifetime privacy ledger: Opacus' epsilon for exactly the rounds charged, across runs and crashes.

Crash and concurrency tests fork real processes from this one (Opacus and torch are already
imported, so a child costs milliseconds); they synchronise through pipes and barriers, never sleeps.
"""

from __future__ import annotations

import json
import multiprocessing
import os
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from opacus_reference import opacus_reference

from fedlora.privacy.ledger import LEDGER_FILE, LedgerConflictError, LedgerError, PrivacyLedger

pytestmark = [
    pytest.mark.filterwarnings("ignore:Optimal order:UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
]

DELTA = 1e-5
SIGMA, Q, STEPS = 1.0, 0.016, 30
FORK = multiprocessing.get_context("fork")


def charge(
    ledger: PrivacyLedger, run_id: str, rnd: int, sigma: float = SIGMA, q: float = Q, steps: int = STEPS
) -> bool:
    return ledger.charge(run_id, rnd, sigma, q, steps, accountant="rdp", delta=DELTA)


# ------------------------------------------------------------------------------ golden values


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_client_sampled_in_no_round_reports_zero(tmp_path: Path, accountant: str) -> None:
    ledger = PrivacyLedger(tmp_path / "client-0")
    assert ledger.epsilon(DELTA, accountant) == 0.0
    summary = ledger.summary(DELTA, accountant)
    assert (summary["epsilon"], summary["total_steps"], summary["rounds_taken_part_in"], summary["history"]) == (
        0.0,
        0,
        0,
        [],
    )
    assert not (tmp_path / "client-0").exists()  # reading creates nothing


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_single_round_matches_opacus(tmp_path: Path, accountant: str) -> None:
    ledger = PrivacyLedger(tmp_path)
    charge(ledger, "run-a", 1, 1.0, 0.016, 300)
    assert ledger.epsilon(DELTA, accountant) == pytest.approx(
        opacus_reference([(1.0, 0.016, 300)], DELTA, accountant), rel=1e-9
    )
    golden = {"rdp": 2.0918225474786007, "prv": 1.7524640802678113}[accountant]
    assert ledger.epsilon(DELTA, accountant) == pytest.approx(golden, rel=1e-6)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_twenty_rounds_with_gaps_compose_exactly_the_rounds_taken(tmp_path: Path, accountant: str) -> None:
    taken = [1, 2, 5, 7, 8, 11, 13, 14, 17, 20]  # sampled in 10 of 20 rounds
    ledger = PrivacyLedger(tmp_path)
    for rnd in range(1, 21):
        if rnd in taken:
            charge(ledger, "run-a", rnd)
    assert [e.server_round for e in ledger.entries()] == taken
    expected = opacus_reference([(SIGMA, Q, STEPS)] * len(taken), DELTA, accountant)
    assert ledger.epsilon(DELTA, accountant) == pytest.approx(expected, rel=1e-9)
    # not the 20 rounds of the run, and not fewer than taken
    assert ledger.epsilon(DELTA, accountant) < opacus_reference([(SIGMA, Q, STEPS * 20)], DELTA, accountant)
    assert ledger.epsilon(DELTA, accountant) > opacus_reference([(SIGMA, Q, STEPS * 9)], DELTA, accountant)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_mixed_sigma_and_q_match_opacus(tmp_path: Path, accountant: str) -> None:
    rounds = [(1.0, 0.016, 20), (0.8, 0.032, 10), (0.8, 0.032, 10), (1.2, 0.01, 40), (1.0, 0.016, 20)]
    ledger = PrivacyLedger(tmp_path)
    for rnd, (sigma, q, steps) in enumerate(rounds, start=1):
        charge(ledger, "run-a", rnd, sigma, q, steps)
    assert ledger.history() == rounds
    assert ledger.epsilon(DELTA, accountant) == pytest.approx(opacus_reference(rounds, DELTA, accountant), rel=1e-9)


# ------------------------------------------------------------------------------ lifetime


def test_two_runs_compose_and_a_new_state_dir_starts_at_zero(tmp_path: Path) -> None:
    state = tmp_path / "client-3"
    first = PrivacyLedger(state)
    for rnd in (1, 3):
        charge(first, "run-1", rnd)
    after_first_run = first.epsilon(DELTA)

    second = PrivacyLedger(state)  # a new run, a new process: same state directory
    for rnd in (1, 2):  # round numbers restart with the run; the run id tells them apart
        charge(second, "run-2", rnd, 0.9, 0.02, 25)
    lifetime = second.epsilon(DELTA)
    assert lifetime > after_first_run
    reference = opacus_reference([(SIGMA, Q, STEPS)] * 2 + [(0.9, 0.02, 25)] * 2, DELTA, "rdp")
    assert lifetime == pytest.approx(reference, rel=1e-9)
    summary = second.summary(DELTA)
    assert summary["runs"] == ["run-1", "run-2"]
    assert summary["rounds_taken_part_in"] == 4
    assert summary["total_steps"] == 2 * STEPS + 2 * 25
    assert [(h["run_id"], h["server_round"]) for h in summary["history"]] == [
        ("run-1", 1),
        ("run-1", 3),
        ("run-2", 1),
        ("run-2", 2),
    ]
    json.dumps(summary, allow_nan=False)  # reportable as-is

    assert PrivacyLedger(tmp_path / "client-4").epsilon(DELTA) == 0.0


# ------------------------------------------------------------------------------ idempotence


def test_repeated_round_is_charged_once(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    assert charge(ledger, "run-a", 4) is True
    once = ledger.epsilon(DELTA)
    assert charge(ledger, "run-a", 4) is False  # a retried message
    assert ledger.epsilon(DELTA) == once
    assert len(ledger.entries()) == 1
    assert ledger.is_charged("run-a", 4) and not ledger.is_charged("run-a", 5)
    # Flower's integer run id and its string are one key
    assert ledger.charge(17, 1, SIGMA, Q, STEPS, accountant="rdp", delta=DELTA) is True
    assert ledger.charge("17", 1, SIGMA, Q, STEPS, accountant="rdp", delta=DELTA) is False


def test_same_round_with_other_parameters_is_refused(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    charge(ledger, "run-a", 4)
    with pytest.raises(LedgerConflictError, match=r"run 'run-a' round 4 is already charged"):
        charge(ledger, "run-a", 4, steps=STEPS - 1)
    assert ledger.history() == [(SIGMA, Q, STEPS)]


def test_charge_validates_and_names_the_value(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    with pytest.raises(ValueError, match=r"sample_rate must be in \(0, 1\], got 0.0"):
        charge(ledger, "run-a", 1, q=0.0)
    with pytest.raises(ValueError, match="unknown accountant 'gdp'"):
        ledger.charge("run-a", 1, SIGMA, Q, STEPS, accountant="gdp", delta=DELTA)
    with pytest.raises(ValueError, match=r"delta must be in \(0, 1\), got 2"):
        ledger.charge("run-a", 1, SIGMA, Q, STEPS, accountant="rdp", delta=2)
    assert ledger.entries() == []


# ------------------------------------------------------------------------------ crash safety


def _charge_then_die(state_dir: Path, reply: Connection) -> None:
    """A client: train (elided), charge the ledger, and die before its reply leaves."""
    PrivacyLedger(state_dir).charge("run-a", 2, SIGMA, Q, STEPS, accountant="rdp", delta=DELTA)
    os._exit(1)
    reply.send("update")  # never reached: the server would have seen this


def test_killed_after_charge_before_reply_stays_charged(tmp_path: Path) -> None:
    charge(PrivacyLedger(tmp_path), "run-a", 1)
    receive, send = FORK.Pipe(duplex=False)
    child = FORK.Process(target=_charge_then_die, args=(tmp_path, send))
    child.start()
    child.join()
    send.close()
    assert child.exitcode == 1
    with pytest.raises(EOFError):  # the pipe closed with no reply in it: nothing left the client ...
        receive.recv()
    ledger = PrivacyLedger(tmp_path)
    assert ledger.is_charged("run-a", 2)  # ... but the round is charged: over-report, never under
    assert ledger.epsilon(DELTA) == pytest.approx(opacus_reference([(SIGMA, Q, 2 * STEPS)], DELTA, "rdp"), rel=1e-9)


def test_torn_write_leaves_the_ledger_intact(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    charge(ledger, "run-a", 1)
    before = ledger.epsilon(DELTA)
    # a writer that died mid-write leaves half a temp file behind; the ledger itself was never touched
    torn = tmp_path / ".privacy_ledger.dead1234.tmp"
    torn.write_text('{"format": "fedlora-privacy-ledger", "version": 1, "entries": [{"run_id": "run-a", "serv')
    assert ledger.epsilon(DELTA) == before
    charge(ledger, "run-a", 2)  # the next writer, under the lock, clears the leftover
    assert not torn.exists()
    assert ledger.history() == [(SIGMA, Q, STEPS)] * 2


def test_failed_replace_keeps_the_old_ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = PrivacyLedger(tmp_path)
    charge(ledger, "run-a", 1)
    before = (tmp_path / LEDGER_FILE).read_bytes()

    def disk_full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fedlora.privacy.ledger.os.replace", disk_full)
    with pytest.raises(OSError, match="No space left"):
        charge(ledger, "run-a", 2)  # the caller must not reply: nothing was charged
    assert (tmp_path / LEDGER_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER_FILE, "privacy_ledger.lock"]


def _charge_rounds(state_dir: Path, run_id: str, rounds: range, start: Any) -> None:
    start.wait()
    ledger = PrivacyLedger(state_dir)
    for rnd in rounds:
        ledger.charge(run_id, rnd, SIGMA, Q, STEPS, accountant="rdp", delta=DELTA)


def test_two_processes_never_lose_a_charge(tmp_path: Path) -> None:
    start = FORK.Barrier(2)
    workers = [FORK.Process(target=_charge_rounds, args=(tmp_path, run, range(1, 21), start)) for run in ("x", "y")]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert [w.exitcode for w in workers] == [0, 0]
    keys = {(e.run_id, e.server_round) for e in PrivacyLedger(tmp_path).entries()}
    assert keys == {(run, rnd) for run in ("x", "y") for rnd in range(1, 21)}


# ------------------------------------------------------------------------------ corrupt files


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"\x00\x01 not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"entries": []}', "not a fedlora privacy ledger"),
        (b"[]", "not a fedlora privacy ledger"),
        (b'{"format": "fedlora-privacy-ledger", "version": 2, "entries": []}', "version 2"),
        (b'{"format": "fedlora-privacy-ledger", "version": 1, "entries": {}}', "a list of entries"),
        (b'{"format": "fedlora-privacy-ledger", "version": 1, "entries": [{"run_id": "a"}]}', "entry 0 is invalid"),
    ],
)
def test_corrupt_or_foreign_ledger_fails_loudly(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / LEDGER_FILE
    path.write_bytes(content)
    ledger = PrivacyLedger(tmp_path)
    for read in (lambda: ledger.epsilon(DELTA), lambda: charge(ledger, "run-a", 1)):
        with pytest.raises(LedgerError, match=match) as info:
            read()
        assert str(path) in str(info.value)
    assert path.read_bytes() == content  # never reset, never overwritten


def test_bad_entry_field_fails_loudly(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    charge(ledger, "run-a", 1)
    charge(ledger, "run-a", 2)
    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    data["entries"][1]["noise_multiplier"] = "1.0"
    (tmp_path / LEDGER_FILE).write_text(json.dumps(data))
    with pytest.raises(LedgerError, match=r"entry 1 is invalid: noise_multiplier must be a number"):
        ledger.epsilon(DELTA)
    data["entries"][1] = data["entries"][0]
    (tmp_path / LEDGER_FILE).write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="charges run 'run-a' round 1 twice"):
        ledger.epsilon(DELTA)


# ------------------------------------------------------------------------------ enforcement


def test_would_exceed_at_the_cap(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path)
    assert ledger.would_exceed(8.0, DELTA, "rdp", SIGMA, Q, STEPS) == (
        False,
        pytest.approx(opacus_reference([(SIGMA, Q, STEPS)], DELTA, "rdp"), rel=1e-9),
    )
    for rnd in range(1, 4):
        charge(ledger, "run-a", rnd)
    spent = ledger.epsilon(DELTA)
    # at its cap: any further round pushes past it, so the client declines
    exceed, projected = ledger.would_exceed(spent, DELTA, "rdp", SIGMA, Q, STEPS)
    assert exceed and projected > spent
    assert projected == pytest.approx(opacus_reference([(SIGMA, Q, 4 * STEPS)], DELTA, "rdp"), rel=1e-9)
    # reaching the cap exactly is allowed; going a hair past is not
    assert ledger.would_exceed(projected, DELTA, "rdp", SIGMA, Q, STEPS) == (False, projected)
    assert ledger.would_exceed(projected * (1 - 1e-9), DELTA, "rdp", SIGMA, Q, STEPS)[0]
    # a fresh dataset with a zero budget can take no round at all
    assert PrivacyLedger(tmp_path / "new").would_exceed(0.0, DELTA, "prv", SIGMA, Q, 1)[0]
    # projecting charges nothing
    assert ledger.epsilon(DELTA) == spent


def test_dp_seed_is_secret_per_state_dir_and_stable_per_round(tmp_path: Path) -> None:
    a, b = PrivacyLedger(tmp_path / "a"), PrivacyLedger(tmp_path / "b")
    seed = a.dp_seed("run-1", 3)
    assert seed == a.dp_seed("run-1", 3) == PrivacyLedger(tmp_path / "a").dp_seed("run-1", 3)
    assert len({seed, a.dp_seed("run-1", 4), a.dp_seed("run-2", 3), b.dp_seed("run-1", 3)}) == 4
    assert 0 <= seed < 2**63
    secret = tmp_path / "a" / "dp_secret"
    assert len(secret.read_bytes()) == 32 and secret.stat().st_mode & 0o777 == 0o600
    secret.write_bytes(b"short")
    with pytest.raises(LedgerError, match="DP secret has 5 bytes"):
        a.dp_seed("run-1", 3)
