"""The expert library generators learn from: per task, its descriptions, a few examples and
several late checkpoints of its LoRA adapter, flattened into one vector per checkpoint.

On disk (what ``fl-hub build-experts`` writes, and what a user's own adapters can follow)::

    EXPERTS/<task>/task.json               {"descriptions": [...], "examples": [{"prompt", "completion"}], ...}
    EXPERTS/<task>/checkpoint-<step>/      a PEFT directory per checkpoint
                                           (or the PEFT files directly in EXPERTS/<task>/: one checkpoint)

In the hub: every version of ``tasks/<task>`` from the same build (``provenance.run``) is a
checkpoint; the descriptions and examples travel in ``provenance.extra["task"]``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedlora.core.adapter_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter_dir
from fedlora.core.tasks import Example
from fedlora.hub.sdk.manifest import BaseModel
from fedlora.hub.sdk.request import check_description, check_examples

TASK_FILE = "task.json"
BUILD_FILE = "experts.json"  # what fl-hub build-experts trained: settings, base model, results
#: the adapter-config fields that must agree for adapters to share one parameter space
LAYOUT_CONFIG_KEYS = (
    "r",
    "lora_alpha",
    "target_modules",
    "use_rslora",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
)


@dataclass(frozen=True)
class Layout:
    """The parameter space of an adapter family: tensor names and shapes in a fixed order, and
    the PEFT config they belong to. A flat vector is the tensors concatenated in that order."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    adapter_config: dict[str, Any] = field(compare=False)

    @property
    def size(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    @property
    def slices(self) -> list[slice]:
        out, start = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(slice(start, start + n))
            start += n
        return out

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor], adapter_config: Mapping[str, Any]) -> Layout:
        names = tuple(sorted(state))
        return cls(names, tuple(tuple(state[n].shape) for n in names), dict(adapter_config))

    def check(self, state: Mapping[str, torch.Tensor], config: Mapping[str, Any], where: str) -> None:
        """Refuse an adapter of another shape or configuration, naming the difference."""
        names = tuple(sorted(state))
        if names != self.names:
            missing, extra = sorted(set(self.names) - set(names)), sorted(set(names) - set(self.names))
            raise ValueError(
                f"{where}: its tensors differ from the library's (missing {missing[:3]}, extra {extra[:3]}); "
                "every expert must adapt the same modules with the same rank"
            )
        for n, shape in zip(self.names, self.shapes, strict=True):
            if tuple(state[n].shape) != shape:
                raise ValueError(f"{where}: tensor {n} has shape {tuple(state[n].shape)}, the library's is {shape}")
        for key in LAYOUT_CONFIG_KEYS:
            mine, theirs = _normal(self.adapter_config.get(key)), _normal(config.get(key))
            if mine != theirs:
                raise ValueError(f"{where}: adapter_config {key} is {theirs!r}, the library's is {mine!r}")

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[n].detach().to(torch.float32).reshape(-1) for n in self.names])

    def unflatten(self, vector: torch.Tensor) -> dict[str, torch.Tensor]:
        if vector.shape != (self.size,):
            raise ValueError(f"a flat adapter of this layout has {self.size} values, got shape {tuple(vector.shape)}")
        return {
            n: vector[sl].reshape(shape).contiguous().clone()
            for n, shape, sl in zip(self.names, self.shapes, self.slices, strict=True)
        }

    def adapter_files(self, vector: torch.Tensor, base_model_id: str) -> dict[str, bytes]:
        """A PEFT directory's files (config + safetensors) holding ``vector``."""
        config = {**self.adapter_config, "base_model_name_or_path": base_model_id, "inference_mode": True}
        weights = save_safetensors(self.unflatten(vector.to(torch.float32)), metadata={"format": "pt"})
        return {CONFIG_FILE: (json.dumps(config, indent=2, sort_keys=True) + "\n").encode(), WEIGHTS_FILE: weights}

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "shapes": [list(s) for s in self.shapes],
            "adapter_config": self.adapter_config,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Layout:
        return cls(tuple(d["names"]), tuple(tuple(int(x) for x in s) for s in d["shapes"]), dict(d["adapter_config"]))


def _normal(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return sorted(value) if all(isinstance(v, str) for v in value) else list(value)
    return value or None if isinstance(value, dict) else value


def read_adapter(files: Mapping[str, bytes], where: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and config of a PEFT adapter's files."""
    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise ValueError(f"{where} is not a PEFT adapter (needs {CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads(files[CONFIG_FILE])
    state = load_safetensors(files[WEIGHTS_FILE])
    return state, config


@dataclass(frozen=True)
class Expert:
    """One task of the library: how it is described, a few examples, its checkpoints (J, D)."""

    name: str
    descriptions: tuple[str, ...]
    examples: tuple[Example, ...]
    checkpoints: torch.Tensor
    source: str = ""

    def __post_init__(self) -> None:
        if not self.descriptions:
            raise ValueError(f"expert {self.name}: it has no description (a generator maps descriptions to adapters)")
        for d in self.descriptions:
            check_description(d, f"expert {self.name}: description")
        if self.checkpoints.ndim != 2 or self.checkpoints.shape[0] < 1:
            raise ValueError(f"expert {self.name}: needs at least one checkpoint")

    @property
    def mean(self) -> torch.Tensor:
        return self.checkpoints.mean(0)

    @property
    def variance(self) -> torch.Tensor:
        """Variance over the late checkpoints (zero with one checkpoint)."""
        if self.checkpoints.shape[0] < 2:
            return torch.zeros(self.checkpoints.shape[1])
        return self.checkpoints.var(0, unbiased=False)


@dataclass(frozen=True)
class ExpertLibrary:
    layout: Layout
    base_model: BaseModel
    experts: tuple[Expert, ...]

    def __post_init__(self) -> None:
        if not self.experts:
            raise ValueError("the expert library is empty: build experts first (fl-hub build-experts)")
        names = [e.name for e in self.experts]
        if len(set(names)) != len(names):
            raise ValueError(f"the expert library names a task twice: {sorted(n for n in names if names.count(n) > 1)}")
        for e in self.experts:
            if e.checkpoints.shape[1] != self.layout.size:
                raise ValueError(f"expert {e.name}: {e.checkpoints.shape[1]} parameters, layout has {self.layout.size}")

    def names(self) -> list[str]:
        return [e.name for e in self.experts]

    def without(self, *names: str) -> ExpertLibrary:
        """The library minus some tasks (held-out evaluation, leave-one-out conditioning)."""
        return ExpertLibrary(self.layout, self.base_model, tuple(e for e in self.experts if e.name not in names))

    def get(self, name: str) -> Expert:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(f"no expert {name!r} in the library (it has {', '.join(self.names())})")

    # --- building ------------------------------------------------------------------------
    @classmethod
    def from_adapters(
        cls,
        base_model: BaseModel,
        tasks: Sequence[tuple[str, Mapping[str, Any], Sequence[Mapping[str, bytes]], str]],
    ) -> ExpertLibrary:
        """From ``(name, task info, [adapter files per checkpoint], source)``; the first adapter
        fixes the layout and every other must match it."""
        layout: Layout | None = None
        experts = []
        for name, info, checkpoints, source in tasks:
            vectors = []
            for i, files in enumerate(checkpoints):
                where = f"expert {name} checkpoint {i + 1} ({source})"
                state, config = read_adapter(files, where)
                state = adapter_tensors(state, config)
                if layout is None:
                    layout = Layout.of(state, _layout_config(config))
                layout.check(state, config, where)
                vectors.append(layout.flatten(state))
            descriptions = info.get("descriptions") or ([info["description"]] if info.get("description") else [])
            experts.append(
                Expert(
                    name,
                    tuple(str(d) for d in descriptions),
                    check_examples(info.get("examples", []), f"expert {name}: examples"),
                    torch.stack(vectors),
                    source,
                )
            )
        if layout is None:
            raise ValueError("the expert library is empty: build experts first (fl-hub build-experts)")
        return cls(layout, base_model, tuple(experts))

    @classmethod
    def from_dir(cls, root: str | Path, base_model: BaseModel) -> ExpertLibrary:
        """The experts under ``root``; their base model is the one ``experts.json`` records (what
        ``fl-hub build-experts`` trained on), else ``base_model`` (a user's own adapters)."""
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"expert directory {root} does not exist")
        build = root / BUILD_FILE
        if build.is_file():
            recorded = json.loads(build.read_text())["config"]["base_model"]
            base_model = BaseModel(str(recorded["id"]), str(recorded["sha256"]))
        tasks = []
        for task_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            info_file = task_dir / TASK_FILE
            if not info_file.is_file():
                continue
            info = json.loads(info_file.read_text())
            listed = info.get("checkpoints")
            if listed:  # what the build wrote, never a stale checkpoint of an earlier build
                dirs = [task_dir / f"checkpoint-{c}" for c in listed]
            else:
                dirs = sorted((p for p in task_dir.glob("checkpoint-*") if p.is_dir()), key=_step_of) or [task_dir]
            files = [read_adapter_dir(d) for d in dirs]
            tasks.append((str(info.get("name", task_dir.name)), info, files, str(task_dir)))
        if not tasks:
            raise ValueError(f"{root} holds no experts (directories with a {TASK_FILE} and PEFT checkpoints)")
        return cls.from_adapters(base_model, tasks)

    @classmethod
    def from_hub(cls, hub: Any, prefix: str = "tasks") -> ExpertLibrary:
        """Every ``tasks/<task>`` with a description; its checkpoints are the versions published by
        the same build as the latest one. Each is verified like a pull (signature, hashes)."""
        rows = hub.list(prefix)
        tasks = []
        base: BaseModel | None = None
        for row in rows:
            name = str(row["name"])
            prov = row["provenance"]
            info = dict((prov.get("extra") or {}).get("task") or {})
            if not info.get("descriptions") and prov.get("description"):
                info["descriptions"] = [prov["description"]]
            if not info.get("descriptions"):
                continue  # an adapter without a description cannot teach a description -> adapter map
            row_base = BaseModel(**prov["base_model"])
            if base is None:
                base = row_base
            elif row_base != base:
                raise ValueError(f"{name} was trained on base model {row_base.id}, other experts on {base.id}")
            versions = [int(v) for v in hub.versions(name)] if prov.get("run") else [int(row["version"])]
            files = []
            for v in sorted(versions):
                record = hub.record(name, v)
                if json.loads(record["manifest"])["provenance"].get("run") != prov.get("run"):
                    continue  # another build: its files are not downloaded (what is kept, fetch verifies)
                files.append(hub.fetch(name, v, record=record)[1])
            tasks.append((name.split("/", 1)[1], info, files, f"{name} ({len(files)} version(s))"))
        if base is None:
            raise ValueError(f"the hub has no adapters with descriptions under {prefix}/: run fl-hub build-experts")
        return cls.from_adapters(base, tasks)


def adapter_tensors(state: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """What a generator models: the LoRA factors and the modules trained in full with them (a
    classifier's head: a generated classifier is useless without its own head)."""
    heads = tuple(str(h) for h in config.get("modules_to_save") or ())
    return {k: v for k, v in state.items() if "lora_A" in k or "lora_B" in k or any(f".{h}." in k for h in heads)}


def _layout_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter config without what differs between copies of one layout."""
    return {k: v for k, v in config.items() if k not in ("base_model_name_or_path", "revision", "inference_mode")}


def _step_of(path: Path) -> int:
    tail = path.name.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else 0
