"""The run directory: everything a user gets from a federated run, written atomically.

runs/<name>/
  config.json                 resolved run configuration
  metrics.jsonl               one line per round (train diagnostics, evaluation, rejections)
  partition.json              who holds which examples (simulation)
  checkpoints/round-N/        the global adapter after round N (PEFT directory) + the exact
                              strategy state (state.safetensors) a resumed run starts from
  audit/round-N/              with audit.save-updates: every accepted reply, tensors + weight
  adapters/global/            the final global adapter (PEFT directory)
  report/                     privacy report, training plots, per-client table
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import Tensor

from fedlora.atomic import atomic_directory, write_atomic, write_json_atomic
from fedlora.core.adapter_format import BASE_DELTA_FILE  # the one name of the FedEx-LoRA residual file
from fedlora.core.model import save_adapter, set_adapter_state
from fedlora.strategies.algorithms import BASE_DELTA_SUFFIX, Reply, adapter_part

STATE_FILE = "state.safetensors"
STRATEGY_STATE_FILE = "strategy_state.json"


#: run-config keys a resumed run may change (everything else must match the stored config.json)
RESUME_MAY_CHANGE = frozenset({"resume", "run-id", "resumed-as", "round-timeout"})


class ResumeError(RuntimeError):
    """A run directory cannot be resumed; the message says why."""


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSONL file; an unparsable *last* line is a torn append (a hard kill while
    writing) and is skipped; an unparsable line before it is an error naming the line."""
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, line in enumerate(lines, start=1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(lines):
                raise ValueError(f"{path}, line {i}: not valid JSON ({err})") from None
    return rows


def append_jsonl(path: Path, row: Mapping[str, Any]) -> None:
    """Append one line and fsync it; a hard kill mid-write can leave a torn last line, which
    :func:`read_rows` and a resume skip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any], ignore: frozenset[str]) -> list[str]:
    """``key: old -> new`` for every run-config key that differs between two resolved configs."""
    keys = sorted(k for k in set(stored) | set(current) if k not in ignore and stored.get(k) != current.get(k))
    return [f"{k}: {stored.get(k)!r} -> {current.get(k)!r}" for k in keys]


class RunDirectory:
    """Writes one run's directory. ``model`` is a PEFT model used only to save adapters."""

    def __init__(self, root: str | Path, model: PeftModel, base_model_dir: Path) -> None:
        self.root = Path(root)
        self.model = model
        self.base_model_dir = base_model_dir
        self.root.mkdir(parents=True, exist_ok=True)

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    def write_config(self, config: Mapping[str, Any]) -> None:
        write_json_atomic(self.root / "config.json", dict(config))

    def save_global(self, state: Mapping[str, Tensor], out: Path, extra: Mapping[str, Any] | None = None) -> Path:
        """A PEFT directory for ``state``, built in a temporary sibling and renamed into place."""
        set_adapter_state(self.model, adapter_part(state))
        with atomic_directory(out) as tmp:
            save_adapter(self.model, tmp, base_model_dir=self.base_model_dir)
            deltas = {k: v.contiguous() for k, v in state.items() if k.endswith(BASE_DELTA_SUFFIX)}
            if deltas:  # FedEx-LoRA: the residual folded into the base weights
                save_file(deltas, str(tmp / BASE_DELTA_FILE))
            if extra is not None:
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / STATE_FILE))
                write_json_atomic(tmp / STRATEGY_STATE_FILE, dict(extra))
        return out

    def checkpoint(self, server_round: int, state: Mapping[str, Tensor], extra: Mapping[str, Any]) -> Path:
        return self.save_global(state, self.root / "checkpoints" / f"round-{server_round}", extra)

    def latest_checkpoint(self) -> tuple[int, dict[str, Tensor], dict[str, Any]]:
        """(round, exact global state, strategy state) of the newest complete checkpoint."""
        done = []
        for d in (self.root / "checkpoints").glob("round-*"):
            suffix = d.name.removeprefix("round-")
            if suffix.isdigit() and (d / STATE_FILE).is_file() and (d / STRATEGY_STATE_FILE).is_file():
                done.append((int(suffix), d))
        if not done:
            raise ResumeError(f"{self.root} has no complete checkpoint (checkpoints/round-N/{STATE_FILE}) to resume")
        server_round, d = max(done)
        extra = json.loads((d / STRATEGY_STATE_FILE).read_text())
        return server_round, dict(load_file(str(d / STATE_FILE))), extra

    def truncate_metrics(self, last_round: int) -> int:
        """Drop metrics rows after ``last_round`` (written after the checkpoint a resume starts
        from) and rewrite the file atomically; returns how many rows were dropped."""
        if not self.metrics_path.exists():
            return 0
        lines = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
        keep = [json.dumps(r) for r in read_rows(self.metrics_path) if int(r.get("round", 0)) <= last_round]
        if keep != lines:
            write_atomic(self.metrics_path, "".join(ln + "\n" for ln in keep).encode())
        return len(lines) - len(keep)

    def audit_reply(self, server_round: int, node_id: int, reply: Reply) -> None:
        """One accepted reply as safetensors; its weight and LoRA scaling in the file's metadata."""
        d = self.root / "audit" / f"round-{server_round}"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"node-{node_id}.safetensors"
        tmp = d / f".{path.name}.tmp"
        metadata = {"num-examples": repr(reply.num_examples), "scaling": repr(reply.scaling)}
        save_file({k: v.contiguous() for k, v in reply.tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
