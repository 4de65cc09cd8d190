"""The run directory: everything a user gets from a federated run, laid out, written and read here only.

runs/<name>/
  config.json                 resolved run configuration
  metrics.jsonl               one line per round (train diagnostics, evaluation, rejections)
  partition.json              who holds which examples (simulation)
  privacy_plan.json           the noise multiplier calibrated once for the run (DP)
  client_level_dp.json        Flower's client-level DP wrapper and its accounting (when on)
  personalize.json            what personalisation gave each client (personalize.steps)
  checkpoints/round-N/        the global adapter after round N (PEFT directory) + the exact
                              strategy state (state.safetensors) a resumed run starts from
  audit/round-N/              with audit.save-updates: every accepted reply, tensors + weight
  adapters/global/            the final global adapter (PEFT directory)
  personal/partition-<p>/     a virtual client's personal adapter (simulation, personalize.steps)
  client-state/partition-<p>/ a virtual client's lifetime privacy ledger (unless state-dir says elsewhere)
  report/                     privacy report, training plots, per-client table, personal x clients
  sim/, deploy/               the Flower runner's working files (logs, app, FLWR_HOME)

Every path is a property of :class:`RunDir`, so no other module joins these names. Its reader is
the only parser of ``metrics.jsonl``: an append is one ``write`` + ``fsync``, so a hard kill can
leave only the *last* line torn, and the reader skips exactly that; a bad line before it is
damage, reported with the file and line. Nothing heavier than numpy is imported at the top (the
hub and light CLI paths read run directories); the adapter writer imports torch and PEFT when it runs.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedlora.atomic import atomic_directory, write_atomic, write_json_atomic
from fedlora.core.adapter_format import BASE_DELTA_FILE, CONFIG_FILE
from fedlora.core.partitioners import Partition, read_partition_manifest, write_partition_manifest

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import Tensor

    from fedlora.strategies.algorithms import Reply

STATE_FILE = "state.safetensors"
STRATEGY_STATE_FILE = "strategy_state.json"
SERVER_OPT_FILE = "server_optimizer.safetensors"  # a checkpoint's server-optimizer moments (server-opt.*)
_PARTITION_DIR = re.compile(r"partition-(\d+)")

#: run-config keys a resumed run may change (everything else must match the stored config.json).
#: Not dp.engine: the engines agree only up to float rounding, and a round replayed after a resume
#: must release the identical bits (it is charged once)
RESUME_MAY_CHANGE = frozenset({"resume", "run-id", "resumed-as", "round-timeout"})


class ResumeError(RuntimeError):
    """A run directory cannot be resumed; the message says why."""


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any], ignore: frozenset[str]) -> list[str]:
    """``key: old -> new`` for every run-config key that differs between two resolved configs."""
    keys = sorted(k for k in set(stored) | set(current) if k not in ignore and stored.get(k) != current.get(k))
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in keys]


def _partition_dir(partition: int) -> str:
    return f"partition-{partition}"


class RunDir:
    """One run's directory: where each file is, the one writer and the one reader of its files.

    ``model`` (a PEFT model) and ``base_model_dir`` are needed only to write adapters (the
    server app's checkpoints and final adapter); reading needs the path alone.
    """

    def __init__(self, root: str | Path, model: PeftModel | None = None, base_model_dir: Path | None = None) -> None:
        self.root = Path(root)
        self.model = model
        self.base_model_dir = base_model_dir

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    # ------------------------------------------------------------------------------ layout

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def partition_path(self) -> Path:
        return self.root / "partition.json"

    @property
    def plan_path(self) -> Path:
        return self.root / "privacy_plan.json"

    @property
    def client_level_dp_path(self) -> Path:
        return self.root / "client_level_dp.json"

    @property
    def personalize_path(self) -> Path:
        return self.root / "personalize.json"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    def checkpoint_dir(self, server_round: int) -> Path:
        return self.checkpoints_dir / f"round-{server_round}"

    def audit_dir(self, server_round: int) -> Path:
        return self.root / "audit" / f"round-{server_round}"

    @property
    def global_adapter_dir(self) -> Path:
        return self.root / "adapters" / "global"

    @property
    def personal_dir(self) -> Path:
        return self.root / "personal"

    def personal_adapter_dir(self, partition: int) -> Path:
        return self.personal_dir / _partition_dir(partition)

    def client_state_root(self, state_dir: str | Path | None = None) -> Path:
        """Where the virtual clients' ledgers live: ``state_dir`` (the ``state-dir`` key) if set,
        else ``client-state`` here. Several runs pointed at one state-dir compose their epsilon."""
        return Path(state_dir) if state_dir else self.root / "client-state"

    def client_state_dir(self, partition: int, state_dir: str | Path | None = None) -> Path:
        return self.client_state_root(state_dir) / _partition_dir(partition)

    def client_state_dirs(self, state_dir: str | Path | None = None) -> dict[int, Path]:
        """partition -> its state directory, for every ``partition-<p>`` present."""
        root = self.client_state_root(state_dir)
        found = {}
        if root.is_dir():
            for path in root.iterdir():
                m = _PARTITION_DIR.fullmatch(path.name)
                if m and path.is_dir():
                    found[int(m.group(1))] = path
        return dict(sorted(found.items()))

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def privacy_json(self) -> Path:
        return self.report_dir / "privacy.json"

    @property
    def privacy_md(self) -> Path:
        return self.report_dir / "privacy.md"

    @property
    def privacy_html(self) -> Path:
        return self.report_dir / "privacy.html"

    @property
    def training_stem(self) -> Path:
        """``report/training``: the training plots are this with ``.png`` and ``.pdf``."""
        return self.report_dir / "training"

    @property
    def clients_csv(self) -> Path:
        return self.report_dir / "clients.csv"

    @property
    def clients_md(self) -> Path:
        return self.report_dir / "clients.md"

    @property
    def personal_eval_json(self) -> Path:
        """``fl-sim personal-eval``: every personal adapter on every personalised client's test split."""
        return self.report_dir / "personal.json"

    @property
    def personal_eval_md(self) -> Path:
        return self.report_dir / "personal.md"

    @property
    def sim_workdir(self) -> Path:
        """The Flower runner's files of a simulation (logs, app directory, FLWR_HOME)."""
        return self.root / "sim"

    @property
    def deploy_workdir(self) -> Path:
        """The Flower runner's files of a deployment (``fl-server start``)."""
        return self.root / "deploy"

    # ------------------------------------------------------------------------------ reading

    def holds_run(self) -> bool:
        """Whether a run has started here (its first metrics row is written before training)."""
        return self.metrics_path.exists()

    def rows(self, *, missing_ok: bool = False) -> list[dict[str, Any]]:
        """The rows of ``metrics.jsonl`` as written, in file order (a resumed run may repeat a round).

        A last line that is not valid JSON is a torn append (a hard kill while writing) and is
        skipped. Any other line must be a JSON object with a non-negative integer ``round``;
        otherwise ValueError names the file and line. A missing file is FileNotFoundError, or no
        rows with ``missing_ok``.
        """
        path = self.metrics_path
        if not path.is_file():
            if missing_ok:
                return []
            raise FileNotFoundError(f"{path}: missing; is {self.root} a fedlora run directory?")
        numbered = [
            (n, line) for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()
        ]
        rows: list[dict[str, Any]] = []
        for i, (lineno, line) in enumerate(numbered):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if i == len(numbered) - 1:
                    break  # torn by a hard kill mid-append; a resume drops it
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({err})") from None
            r = row.get("round") if isinstance(row, dict) else None
            if not isinstance(row, dict) or "round" not in row:
                raise ValueError(f"{path}, line {lineno}: expected an object with a 'round'")
            if isinstance(r, bool) or not isinstance(r, int | float) or not math.isfinite(r) or r != int(r) or r < 0:
                raise ValueError(f"{path}, line {lineno}: 'round' must be a non-negative integer, got {r!r}")
            row["round"] = int(r)
            rows.append(row)
        return rows

    def rounds(self, *, missing_ok: bool = False) -> list[dict[str, Any]]:
        """One row per round, sorted by round; of a round written twice (a resumed run) the last row wins."""
        by_round = {row["round"]: row for row in self.rows(missing_ok=missing_ok)}
        return [by_round[r] for r in sorted(by_round)]

    def last_round(self) -> int:
        """The last round ``metrics.jsonl`` records (0 if none)."""
        return max((row["round"] for row in self.rows(missing_ok=True)), default=0)

    def config(self, *, missing_ok: bool = False) -> dict[str, Any]:
        """``config.json``: the resolved run configuration ({} if missing and ``missing_ok``)."""
        return _read_object(self.config_path, missing_ok) or {}

    def plan(self, *, missing_ok: bool = False) -> dict[str, Any] | None:
        """``privacy_plan.json`` (DP runs), None if missing and ``missing_ok``."""
        return _read_object(self.plan_path, missing_ok)

    def client_level_dp(self) -> dict[str, Any] | None:
        """``client_level_dp.json``, None unless the run used client-level DP."""
        return _read_object(self.client_level_dp_path, missing_ok=True)

    def personalize(self) -> dict[str, Any] | None:
        """``personalize.json``, None unless the run personalised."""
        return _read_object(self.personalize_path, missing_ok=True)

    def privacy_report(self) -> dict[str, Any] | None:
        """``report/privacy.json`` as written at the end of the run, None before."""
        return _read_object(self.privacy_json, missing_ok=True)

    def personal_eval(self) -> dict[str, Any] | None:
        """``report/personal.json`` (``fl-sim personal-eval``), None before."""
        return _read_object(self.personal_eval_json, missing_ok=True)

    def partition(self) -> Partition | None:
        """The split ``partition.json`` records (None without one: deployed nodes bring their own data)."""
        return read_partition_manifest(self.partition_path) if self.partition_path.is_file() else None

    def partition_summary(self) -> dict[str, Any] | None:
        """The ``summary`` of ``partition.json`` (client sizes and task counts), None without one."""
        doc = _read_object(self.partition_path, missing_ok=True)  # the stored summary: any tasks, a user's too
        summary = doc.get("summary") if doc is not None else None
        return summary if isinstance(summary, dict) else None

    def personal_adapters(self) -> dict[int, Path]:
        """partition -> ``personal/partition-<p>``, for every one that holds a PEFT adapter."""
        found = {}
        if self.personal_dir.is_dir():
            for path in self.personal_dir.iterdir():
                m = _PARTITION_DIR.fullmatch(path.name)
                if m and (path / CONFIG_FILE).is_file():
                    found[int(m.group(1))] = path
        return dict(sorted(found.items()))

    def latest_checkpoint(self) -> tuple[int, dict[str, Tensor], dict[str, Any]]:
        """(round, exact global state, strategy state) of the newest complete checkpoint."""
        from safetensors.torch import load_file  # lazy: torch, only when a run resumes

        done = []
        for d in self.checkpoints_dir.glob("round-*"):
            suffix = d.name.removeprefix("round-")
            if suffix.isdigit() and (d / STATE_FILE).is_file() and (d / STRATEGY_STATE_FILE).is_file():
                done.append((int(suffix), d))
        if not done:
            raise ResumeError(f"{self.root} has no complete checkpoint (checkpoints/round-N/{STATE_FILE}) to resume")
        server_round, d = max(done)
        extra = _read_object(d / STRATEGY_STATE_FILE, missing_ok=False) or {}
        return server_round, dict(load_file(str(d / STATE_FILE))), extra

    # ------------------------------------------------------------------------------ writing

    def make(self) -> None:
        """Create the run directory for its operator alone (0700): it holds the virtual clients'
        ledgers and DP secrets, per-client metrics and the logs. Share a copy without
        ``client-state/`` (README, "What may be shared")."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)

    def append_row(self, row: Mapping[str, Any]) -> None:
        """Append one metrics row and fsync it; a hard kill mid-write can leave a torn last line,
        which :meth:`rows` and a resume skip."""
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def truncate_rows(self, last_round: int) -> int:
        """Drop metrics rows after ``last_round`` (written after the checkpoint a resume starts
        from) and a torn last line, rewriting the file atomically; returns how many lines went."""
        if not self.metrics_path.exists():
            return 0
        lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
        keep = [json.dumps(r) for r in self.rows() if r["round"] <= last_round]
        if keep != lines:
            write_atomic(self.metrics_path, "".join(ln + "\n" for ln in keep).encode())
        return len(lines) - len(keep)

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_json_atomic(self.config_path, dict(config))

    def write_plan(self, plan: Mapping[str, Any]) -> None:
        write_json_atomic(self.plan_path, dict(plan))

    def write_client_level_dp(self, doc: Mapping[str, Any]) -> None:
        write_json_atomic(self.client_level_dp_path, dict(doc))

    def write_personalize(self, summary: Mapping[str, Any]) -> None:
        write_json_atomic(self.personalize_path, dict(summary))

    def write_partition(self, partition: Partition) -> Path:
        return write_partition_manifest(self.partition_path, partition)

    def save_adapter(
        self,
        out: Path,
        state: Mapping[str, Tensor] | None = None,
        extra: Mapping[str, Any] | None = None,
        server_opt: Mapping[str, Tensor] | None = None,
    ) -> Path:
        """A PEFT directory of the model's adapter (after loading ``state`` into it, if given),
        built in a temporary sibling and renamed into place. FedEx-LoRA's residual in ``state``
        goes beside it; with ``extra`` (the strategy state) the exact ``state`` too, to resume from,
        and the server optimizer's moments when the run has one."""
        from safetensors.torch import save_file  # lazy: torch, only where adapters are written

        from fedlora.core.model import save_adapter, set_adapter_state  # lazy: torch, PEFT
        from fedlora.strategies.algorithms import BASE_DELTA_SUFFIX, adapter_part  # lazy: torch

        if self.model is None:
            raise ValueError(f"{self!r} was opened without a model: it cannot write adapters")
        if state is not None:
            set_adapter_state(self.model, adapter_part(state))
        with atomic_directory(out) as tmp:
            save_adapter(self.model, tmp, base_model_dir=self.base_model_dir)
            state = state or {}
            deltas = {k: v.contiguous() for k, v in state.items() if k.endswith(BASE_DELTA_SUFFIX)}
            if deltas:  # FedEx-LoRA: the residual folded into the base weights
                save_file(deltas, str(tmp / BASE_DELTA_FILE))
            if extra is not None:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / STATE_FILE))
                write_json_atomic(tmp / STRATEGY_STATE_FILE, dict(extra))
            if server_opt:
                save_file({k: v.contiguous() for k, v in server_opt.items()}, str(tmp / SERVER_OPT_FILE))
        return out

    def checkpoint(
        self,
        server_round: int,
        state: Mapping[str, Tensor],
        extra: Mapping[str, Any],
        server_opt: Mapping[str, Tensor] | None = None,
    ) -> Path:
        return self.save_adapter(self.checkpoint_dir(server_round), state, extra, server_opt)

    def server_opt_state(self, server_round: int) -> dict[str, Tensor]:
        """The server optimizer's moments saved with checkpoint ``server_round`` (empty: none saved)."""
        from safetensors.torch import load_file  # lazy: torch, only when a run resumes

        path = self.checkpoint_dir(server_round) / SERVER_OPT_FILE
        return dict(load_file(str(path))) if path.is_file() else {}

    def save_global(self, state: Mapping[str, Tensor] | None = None) -> Path:
        """The final global adapter, ``adapters/global``."""
        return self.save_adapter(self.global_adapter_dir, state)

    def audit_reply(self, server_round: int, node_id: int, reply: Reply) -> None:
        """One accepted reply as safetensors; its weight and LoRA scaling in the file's metadata."""
        from safetensors.torch import save_file  # lazy: torch, only with audit.save-updates

        d = self.audit_dir(server_round)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"node-{node_id}.safetensors"
        tmp = d / f".{path.name}.tmp"
        metadata = {"num-examples": repr(reply.num_examples), "scaling": repr(reply.scaling)}
        save_file({k: v.contiguous() for k, v in reply.tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)


def as_run_dir(run_dir: str | Path | RunDir) -> RunDir:
    """``run_dir`` itself if it is a :class:`RunDir`, else the run directory at that path."""
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def _read_object(path: Path, missing_ok: bool) -> dict[str, Any] | None:
    """A JSON file holding one object; errors name the file."""
    if not path.is_file():
        if missing_ok:
            return None
        raise FileNotFoundError(f"{path}: missing; is {path.parent} a fedlora run directory?")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data
