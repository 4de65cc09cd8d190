"""A client's lifetime privacy ledger: every DP-SGD round it took part in, on its own disk.

Epsilon belongs to a dataset, not to a run, so the ledger lives in the client's own state
directory (Flower's per-run context resets) and every new run appends to it. It is written
*before* the client replies, atomically and durably, so a crash after the write over-reports (the
round is charged though the server never saw the update) and never under-reports.

File format (``privacy_ledger.json``, JSON, one object)::

    {"format": "fedlora-privacy-ledger", "version": 1,
     "entries": [{"run_id": "...", "server_round": 3, "noise_multiplier": 1.0,
                  "sample_rate": 0.016, "steps": 30, "accountant": "rdp", "delta": 1e-05,
                  "timestamp": "2026-05-09T07:35:25+00:00", "status": "charged"}, ...]}

A missing file is an empty ledger (a new dataset). Anything else that is not exactly this format
raises :class:`LedgerError` with the path: a ledger never silently resets to zero.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedlora.atomic import fsync_dir, write_atomic
from fedlora.privacy.accounting import (
    HistoryEntry,
    check_accountant,
    check_count,
    check_delta,
    check_noise_multiplier,
    check_rate,
    compute_epsilon,
)

LEDGER_FILE = "privacy_ledger.json"
LOCK_FILE = "privacy_ledger.lock"
SECRET_FILE = "dp_secret"  # 32 random bytes that never leave the state directory
INPUTS_FILE = "round_inputs.json"  # (run, round) -> digest of what the round was trained from
SECRET_BYTES = 32
LEDGER_FORMAT = "fedlora-privacy-ledger"
LEDGER_VERSION = 1
CHARGED = "charged"
_TEMP_PREFIX = ".privacy_ledger."
_TEMP_SUFFIX = ".tmp"


class LedgerError(RuntimeError):
    """The ledger file cannot be trusted (corrupt, foreign, or newer format); the message has its path."""


class LedgerConflictError(LedgerError):
    """A (run_id, server_round) already charged with different parameters was charged again."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round a client trained in: what Opacus' accountant needs, plus who, when and how reported.

    ``accountant`` and ``delta`` record what the client was reporting under when it charged; the
    lifetime epsilon is recomputed from (noise_multiplier, sample_rate, steps) at any delta.
    """

    run_id: str
    server_round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant: str
    delta: float
    timestamp: str
    status: str = CHARGED

    def __post_init__(self) -> None:
        if not isinstance(self.run_id, str) or not self.run_id:
            raise ValueError(f"run_id must be a non-empty string, got {self.run_id!r}")
        check_count("server_round", self.server_round)
        check_noise_multiplier(self.noise_multiplier)
        check_rate("sample_rate", self.sample_rate)
        check_count("steps", self.steps)
        check_accountant(self.accountant)
        check_delta(self.delta)
        try:
            datetime.fromisoformat(self.timestamp)
        except (TypeError, ValueError):
            raise ValueError(f"timestamp must be an ISO 8601 string, got {self.timestamp!r}") from None
        if self.status != CHARGED:
            raise ValueError(f"status must be {CHARGED!r}, got {self.status!r}")

    @property
    def key(self) -> tuple[str, int]:
        """What makes a charge unique: one charge per round of a run."""
        return (self.run_id, self.server_round)

    @property
    def history_entry(self) -> HistoryEntry:
        """``(noise_multiplier, sample_rate, steps)``, Opacus' history layout."""
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def same_charge(self, other: LedgerEntry) -> bool:
        """Whether ``other`` charges exactly what this entry charged (timestamps aside)."""
        return self.history_entry == other.history_entry and self.key == other.key

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> LedgerEntry:
        if not isinstance(data, dict):
            raise ValueError(f"an entry must be a JSON object, got {data!r}")
        expected = {f.name for f in fields(cls)}
        if set(data) != expected:
            raise ValueError(f"entry keys must be {sorted(expected)}, got {sorted(data)}")
        return cls(**data)


class PrivacyLedger:
    """The lifetime privacy ledger of one client's dataset, in ``state_dir``.

    Thread- and process-safe for writers: ``charge`` holds an exclusive ``fcntl`` lock on a
    separate lock file across read-modify-write, so two processes on one node cannot lose a charge.
    Readers need no lock: the ledger file is only ever replaced whole (``os.replace``).

    Parameters
    ----------
    state_dir
        The client's own state directory (created on the first charge). One dataset, one ledger.
    """

    def __init__(self, state_dir: Path | str) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LEDGER_FILE

    def __repr__(self) -> str:
        return f"PrivacyLedger({str(self.state_dir)!r})"

    # ---------------------------------------------------------------------------------- reading

    def entries(self) -> list[LedgerEntry]:
        """Every charged round, oldest first; ``[]`` if the ledger file does not exist yet."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            data = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise LedgerError(f"{self.path}: privacy ledger is not valid JSON ({error}); refusing to reset") from None
        if not isinstance(data, dict) or data.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{self.path}: not a fedlora privacy ledger (format is not {LEDGER_FORMAT!r})")
        if data.get("version") != LEDGER_VERSION:
            raise LedgerError(
                f"{self.path}: privacy ledger version {data.get('version')!r}, this code reads version {LEDGER_VERSION}"
            )
        if set(data) != {"format", "version", "entries"} or not isinstance(data["entries"], list):
            raise LedgerError(f"{self.path}: privacy ledger must hold exactly format, version and a list of entries")
        result: list[LedgerEntry] = []
        seen: set[tuple[str, int]] = set()
        for i, item in enumerate(data["entries"]):
            try:
                entry = LedgerEntry.from_json(item)
            except (TypeError, ValueError) as error:
                raise LedgerError(f"{self.path}: privacy ledger entry {i} is invalid: {error}") from None
            if entry.key in seen:
                raise LedgerError(
                    f"{self.path}: privacy ledger charges run {entry.run_id!r} round {entry.server_round} twice"
                )
            seen.add(entry.key)
            result.append(entry)
        return result

    def history(self) -> list[HistoryEntry]:
        """``[(noise_multiplier, sample_rate, steps), ...]`` of every charged round, oldest first."""
        return [entry.history_entry for entry in self.entries()]

    def is_charged(self, run_id: str | int, server_round: int) -> bool:
        """Whether this round of this run is already in the ledger."""
        return any(entry.key == (str(run_id), server_round) for entry in self.entries())

    def charged_entry(self, run_id: str | int, server_round: int) -> LedgerEntry | None:
        """The charge of this round of this run, if there is one."""
        return next((e for e in self.entries() if e.key == (str(run_id), server_round)), None)

    def round_input(self, run_id: str | int, server_round: int) -> str | None:
        """The digest recorded by :meth:`record_input` for this round, if any."""
        path = self.state_dir / INPUTS_FILE
        if not path.exists():
            return None
        value = json.loads(path.read_text()).get(f"{run_id}|{server_round}")
        return str(value) if value is not None else None

    def record_input(self, run_id: str | int, server_round: int, digest: str) -> None:
        """Remember what a charged round was trained from (global state, lr, steps, data), so that
        training it again is allowed only as an exact replay; written atomically under the lock."""
        self._ensure_state_dir()
        path = self.state_dir / INPUTS_FILE
        with self._locked():
            inputs = json.loads(path.read_text()) if path.exists() else {}
            inputs[f"{run_id}|{server_round}"] = digest
            self._replace(path, json.dumps(inputs, indent=1).encode())

    def dp_seed(self, run_id: str | int, server_round: int) -> int:
        """A 63-bit seed for one round's DP randomness (Poisson sampling and noise), secret to this client.

        The server knows the run config, so randomness seeded from it alone could be replayed and
        the noise subtracted; this seed also mixes in a secret drawn once from ``os.urandom`` and
        kept in the state directory. The same (run, round) gives the same seed; together with the
        same input (see :meth:`record_input`) and deterministic training, a round trained again
        (a retried message, a resumed run) releases the identical result, which costs nothing more.
        """
        digest = hashlib.sha256(self._secret() + f"|{run_id}|{server_round}".encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1

    def _secret(self) -> bytes:
        path = self.state_dir / SECRET_FILE
        if not path.exists():
            self._ensure_state_dir()
            with self._locked():
                if not path.exists():
                    self._replace(path, os.urandom(SECRET_BYTES))
        secret = path.read_bytes()
        if len(secret) != SECRET_BYTES:
            raise LedgerError(f"{path}: DP secret has {len(secret)} bytes, expected {SECRET_BYTES}; refusing to guess")
        return secret

    def epsilon(self, delta: float, accountant: str = "rdp") -> float:
        """Lifetime epsilon at ``delta``: the composition of every round of every run charged here."""
        return compute_epsilon(self.history(), delta, accountant)

    def would_exceed(
        self, max_epsilon: float, delta: float, accountant: str, sigma: float, q: float, steps: int
    ) -> tuple[bool, float]:
        """Whether training one more round of ``steps`` at (sigma, q) would take epsilon past ``max_epsilon``.

        Call it before training; a client for which it is True declines the round. Reaching the
        cap exactly is allowed; exceeding it is not. Advisory: it takes no lock, so two processes
        training the same dataset at once must coordinate elsewhere.

        Returns
        -------
        (bool, float)
            ``(projected_epsilon > max_epsilon, projected_epsilon)``.
        """
        if isinstance(max_epsilon, bool) or not isinstance(max_epsilon, int | float) or not max_epsilon >= 0:
            raise ValueError(f"max_epsilon must be a number >= 0, got {max_epsilon!r}")
        step = (check_noise_multiplier(sigma), check_rate("sample_rate", q), check_count("steps", steps))
        projected = compute_epsilon([*self.history(), step], delta, accountant)
        return projected > max_epsilon, projected

    def summary(self, delta: float, accountant: str = "rdp") -> dict[str, Any]:
        """What the client reports and the privacy report reads: epsilon plus the full history."""
        entries = self.entries()
        return {
            "ledger": str(self.path),
            "privacy_unit": "one training example of this client's local data (sample-level DP-SGD)",
            "accountant": accountant,
            "delta": delta,
            "epsilon": compute_epsilon([e.history_entry for e in entries], delta, accountant),
            "total_steps": sum(e.steps for e in entries),
            "rounds_taken_part_in": len(entries),
            "runs": list(dict.fromkeys(e.run_id for e in entries)),
            "history": [e.to_json() for e in entries],
        }

    # ---------------------------------------------------------------------------------- writing

    def charge(
        self,
        run_id: str | int,
        server_round: int,
        sigma: float,
        q: float,
        steps: int,
        *,
        accountant: str,
        delta: float,
    ) -> bool:
        """Record one round's DP-SGD steps durably; call it after training and before replying.

        ``run_id`` may be Flower's integer run id; it is stored as a string.

        Idempotent per (run_id, server_round): charging the same round again with the same
        (sigma, q, steps) is a no-op, so a retried message or a replayed charge after a crash does
        not double-count. The caller must therefore not release a *second, independently noised*
        result for a round already charged (that would be a second mechanism); the same key with
        different parameters raises :class:`LedgerConflictError` rather than guess.

        Returns
        -------
        bool
            True if this call added the charge, False if the round was already charged.
        """
        entry = LedgerEntry(
            run_id=str(run_id),
            server_round=check_count("server_round", server_round),
            noise_multiplier=check_noise_multiplier(sigma),
            sample_rate=check_rate("sample_rate", q),
            steps=check_count("steps", steps),
            accountant=check_accountant(accountant),
            delta=check_delta(delta),
            timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        self._ensure_state_dir()
        with self._locked():
            entries = self.entries()
            for existing in entries:
                if existing.key != entry.key:
                    continue
                if existing.same_charge(entry):
                    return False
                raise LedgerConflictError(
                    f"{self.path}: run {run_id!r} round {server_round} is already charged with "
                    f"(sigma, q, steps) = {existing.history_entry}, now {entry.history_entry}"
                )
            self._write([*entries, entry])
        return True

    def _ensure_state_dir(self) -> None:
        """Create the state directory durably: a ledger in a directory lost at power-off would read as zero."""
        if self.state_dir.is_dir():
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o700)  # the ledger and the DP secret: the client's alone
        fsync_dir(self.state_dir.parent)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive lock on a sibling file (the ledger itself is replaced, so cannot carry it)."""
        fd = os.open(self.state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._remove_torn_writes()
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _remove_torn_writes(self) -> None:
        """Delete temp files left by a writer that died mid-write; only writers make them, under the lock."""
        for leftover in self.state_dir.glob(f"{_TEMP_PREFIX}*{_TEMP_SUFFIX}"):
            leftover.unlink(missing_ok=True)

    def _write(self, entries: list[LedgerEntry]) -> None:
        """Atomic, durable replace: temp file in the same directory, fsync, os.replace, fsync the directory."""
        payload = {
            "format": LEDGER_FORMAT,
            "version": LEDGER_VERSION,
            "entries": [entry.to_json() for entry in entries],
        }
        self._replace(self.path, (json.dumps(payload, indent=1, allow_nan=False) + "\n").encode())

    def _replace(self, path: Path, data: bytes) -> None:
        """Atomic, durable replace of a file in the state directory (mode 0600). Callers hold the lock."""
        write_atomic(path, data, 0o600, prefix=_TEMP_PREFIX)


__all__ = ["LEDGER_FILE", "LedgerConflictError", "LedgerEntry", "LedgerError", "PrivacyLedger"]
