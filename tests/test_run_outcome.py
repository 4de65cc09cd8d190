"""A finished run that accomplished nothing says so: no reply accepted in any round -> the reasons
counted, most common first, with a hint where one is known."""

from __future__ import annotations

from pathlib import Path

from fedlora.core.cli import never_accepted
from fedlora.core.run_dir import RunDir

TOO_LONG = "client error: ValueError: example 'a' -> 'b' is 93 tokens, longer than the model's 64 positions"


def _run(tmp_path: Path, accepted: list[int], dropped: list[dict[str, str]]) -> Path:
    run = RunDir(tmp_path / "run")
    run.root.mkdir(parents=True)
    run.write_config({"strategy": "fedavg-lora"})
    run.append_row({"round": 0, "elapsed": 0.0})
    for r, (n, reasons) in enumerate(zip(accepted, dropped, strict=True), start=1):
        run.append_row({"round": r, "elapsed": float(r), "train": {"accepted": n}, "dropped": reasons})
    return run.root


def test_no_accepted_reply_in_any_round_is_a_failure_with_reasons(tmp_path: Path) -> None:
    dropped = [{"1": TOO_LONG, "2": TOO_LONG}, {"1": TOO_LONG, "2": "declined: privacy budget"}]
    message = never_accepted(_run(tmp_path, [0, 0], dropped))
    assert message is not None
    lines = message.splitlines()
    assert lines[0] == "no client reply was accepted in any of 2 round(s); the global adapter never changed"
    assert lines[1] == f"  3 x {TOO_LONG}" and lines[2] == "  1 x declined: privacy budget"
    assert "hint: records too long for the model: pass --max-length" in message


def test_one_accepted_reply_is_enough(tmp_path: Path) -> None:
    assert never_accepted(_run(tmp_path, [0, 1], [{"1": TOO_LONG}, {}])) is None
    assert never_accepted(_run(tmp_path / "empty", [], [])) is None  # nothing ran: not this check's to say
