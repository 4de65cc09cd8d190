"""``fl-hub build-experts``: one LoRA adapter per seen task of the embedded suite, several late
checkpoints each, written as an expert directory (see :mod:`fedlora.hub.generators.library`) and
optionally published to ``tasks/<task>`` (one version per checkpoint, one build id).

Every expert starts from the same LoRA initialisation (``lora.init_seed``), so the experts live
in one parameter space where mixtures and a generator's outputs mean something.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedlora.atomic import atomic_directory
from fedlora.core.adapter_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter_dir
from fedlora.core.data import collate, encode
from fedlora.core.embedded import default_model_dir
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import (
    get_adapter_state,
    load_base_model,
    lora_settings_dict,
    max_positions,
    save_adapter,
    set_adapter_state,
    wrap_lora,
)
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.run_dir import RunDir
from fedlora.core.tasks import Task, get_task, seen_tasks
from fedlora.core.train import TrainSettings, batches, evaluate, train
from fedlora.hub.generators.library import BUILD_FILE, TASK_FILE
from fedlora.hub.sdk.manifest import describe_base_model
from fedlora.hub.sdk.request import examples_json

#: the expert adapters' default shape: small enough for a generator to model every parameter
EXPERT_LORA = LoraSettings(rank=4, alpha=8.0, init_seed=0)
WARM_STARTS = ("shared", "family-chain")


@dataclass(frozen=True)
class ExpertConfig:
    tasks: tuple[str, ...] = ()  # empty: every seen task of the embedded suite
    lora: LoraSettings = field(default_factory=lambda: EXPERT_LORA)
    steps: int = 200
    checkpoints: int = 3
    checkpoint_every: int = 20
    lr: float = 3e-3
    batch_size: int = 32
    train_examples: int = 2000
    test_examples: int = 200
    task_examples: int = 16  # kept with each expert: ICM-LoRA's in-context task vectors
    seed: int = 0
    #: "shared": every expert starts from the same initial adapter; "family-chain": each starts
    #: from the previous expert of its family (in parameter order), so neighbours stay close
    warm_start: str = "family-chain"

    def __post_init__(self) -> None:
        for name in ("steps", "checkpoints", "checkpoint_every", "batch_size", "train_examples", "test_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if (self.checkpoints - 1) * self.checkpoint_every >= self.steps:
            raise ValueError(
                f"{self.checkpoints} checkpoints {self.checkpoint_every} steps apart do not fit in {self.steps} steps"
            )
        for name in self.tasks:
            get_task(name)  # unknown names raise with the known ones
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {', '.join(WARM_STARTS)}, got {self.warm_start!r}")

    def task_list(self) -> list[Task]:
        return [get_task(n) for n in self.tasks] if self.tasks else seen_tasks()

    def checkpoint_steps(self) -> list[int]:
        return [self.steps - i * self.checkpoint_every for i in reversed(range(self.checkpoints))]


@dataclass(frozen=True)
class ExpertResult:
    task: str
    exact_match: float
    seconds: float
    checkpoints: list[int]


class ExpertTrainer:
    """The base model wrapped once; every expert restarts from the same initial adapter."""

    def __init__(self, cfg: ExpertConfig, model_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.pad = int(self.tokenizer.pad_token_id)
        self.model = wrap_lora(load_base_model(self.model_dir), cfg.lora)
        self.initial = get_adapter_state(self.model)
        self.max_len = max_positions(self.model)

    def encoded(self, task: Task, split: str, n: int) -> list[Any]:
        return encode(self.tokenizer, task.examples(n, self.cfg.seed, split), self.max_len)

    def train(
        self, task: Task, start: dict[str, torch.Tensor] | None = None
    ) -> tuple[list[tuple[int, dict[str, torch.Tensor]]], float]:
        """The adapter's late checkpoints ``[(step, state)]`` and the final exact match, trained
        from ``start`` (default: the shared initial adapter)."""
        cfg = self.cfg
        set_adapter_state(self.model, self.initial if start is None else start)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        data = self.encoded(task, "train", cfg.train_examples)
        stream = (collate(b, self.pad) for b in batches(data, cfg.batch_size, cfg.seed))
        done, out = 0, []
        for step in cfg.checkpoint_steps():
            settings = TrainSettings(steps=step - done, lr=cfg.lr, batch_size=cfg.batch_size, seed=cfg.seed)
            train(self.model, data, settings, self.pad, optimizer=(opt, sched), batch_stream=stream)
            done = step
            out.append((step, get_adapter_state(self.model)))
        em = evaluate(self.model, self.encoded(task, "test", cfg.test_examples), self.pad).exact_match
        return out, em

    def load(self, state: dict[str, torch.Tensor] | None) -> None:
        """Put an adapter in the model (None: the base model, LoRA B = 0)."""
        if state is None:
            state = {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in self.initial.items()}
        set_adapter_state(self.model, state)

    def evaluate(self, state: dict[str, torch.Tensor] | None, task: Task) -> float:
        """Exact match of an adapter (None: the base model) on a task's test split."""
        self.load(state)
        return evaluate(self.model, self.encoded(task, "test", self.cfg.test_examples), self.pad).exact_match


def build_experts(
    cfg: ExpertConfig,
    out: str | Path,
    model_dir: str | Path | None = None,
    progress: Callable[[ExpertResult], None] | None = None,
    federated: FederatedExperts | None = None,
) -> list[ExpertResult]:
    """Train every expert (locally, or by a federation each) and write
    ``out/<task>/{task.json, checkpoint-<step or round>/}``."""
    import shutil
    import tempfile

    from safetensors.torch import load_file

    out = Path(out)
    trainer = ExpertTrainer(cfg, model_dir)
    base = describe_base_model(trainer.model_dir)
    results = []
    previous: dict[str, dict[str, torch.Tensor]] = {}  # family -> its last expert (family-chain)
    tasks = cfg.task_list()
    if cfg.warm_start == "family-chain":
        tasks = sorted(tasks, key=lambda t: (t.family, t.param if t.param is not None else -1))
    for task in tasks:
        t0 = time.perf_counter()
        with atomic_directory(out / task.name) as task_dir:  # replaces an earlier build's expert whole
            if federated is None:
                start = previous.get(task.family) if cfg.warm_start == "family-chain" else None
                checkpoints, em = trainer.train(task, start)
                previous[task.family] = checkpoints[-1][1]
                for step, state in checkpoints:
                    set_adapter_state(trainer.model, state)
                    save_adapter(trainer.model, task_dir / f"checkpoint-{step}", base_model_dir=trainer.model_dir)
                steps = [s for s, _ in checkpoints]
            else:
                with tempfile.TemporaryDirectory() as work:
                    runs = federated_checkpoints(
                        cfg, federated, task, Path(work), Path(model_dir) if model_dir else None
                    )
                    for r, src in runs:
                        (task_dir / f"checkpoint-{r}").mkdir(parents=True)
                        for f in (CONFIG_FILE, WEIGHTS_FILE):
                            shutil.copyfile(src / f, task_dir / f"checkpoint-{r}" / f)
                    em = trainer.evaluate(load_file(str(runs[-1][1] / WEIGHTS_FILE)), task)
                steps = [r for r, _ in runs]
            info = {
                "name": task.name,
                "family": task.family,
                "descriptions": list(task.descriptions),
                "examples": examples_json(task.examples(cfg.task_examples, cfg.seed + 1, "train")),
                "evaluation": {"exact_match": em, "test_examples": cfg.test_examples},
                "checkpoints": steps,
                "trained": "federated" if federated else "local",
            }
            (task_dir / TASK_FILE).write_text(json.dumps(info, indent=2) + "\n")
        result = ExpertResult(task.name, em, time.perf_counter() - t0, steps)
        results.append(result)
        if progress is not None:
            progress(result)
    config = {
        **asdict(cfg),
        "lora": lora_settings_dict(cfg.lora),
        "base_model": asdict(base),
        "federated": asdict(federated) if federated else None,
    }
    (out / BUILD_FILE).write_text(json.dumps({"config": config, "results": [asdict(r) for r in results]}, indent=2))
    return results


@dataclass(frozen=True)
class FederatedExperts:
    """Train each expert by a federation instead (``fl-hub build-experts --federated``): one
    ``fl-sim`` run per task, its clients holding that task's data (untagged), FedAvg-LoRA from
    the shared initialisation; the last rounds' global adapters are the checkpoints."""

    clients: int = 4
    rounds: int = 10
    local_steps: int = 20
    strategy: str = "fedavg-lora"
    timeout: float = 1800.0

    def __post_init__(self) -> None:
        for name in ("clients", "rounds", "local_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"federated {name} must be an integer >= 1, got {value!r}")


def federated_checkpoints(
    cfg: ExpertConfig, fed: FederatedExperts, task: Task, work: Path, model_dir: Path | None
) -> list[tuple[int, Path]]:
    """Run the task's federation with ``fl-sim`` and return its last rounds' adapter directories."""
    import subprocess
    import sys

    if cfg.checkpoints > fed.rounds:
        raise ValueError(f"{cfg.checkpoints} checkpoints need at least as many rounds, got {fed.rounds}")
    run_dir = work / f"{task.name}-run"
    targets = ",".join(cfg.lora.target_modules)
    cmd = [sys.executable, "-m", "fedlora.simulations.cli", "--out", str(run_dir), "--force", "--quiet", "--no-dp"]
    cmd += ["--strategy", fed.strategy, "--clients", str(fed.clients), "--rounds", str(fed.rounds)]
    cmd += ["--local-steps", str(fed.local_steps), "--lr", str(cfg.lr), "--batch-size", str(cfg.batch_size)]
    cmd += ["--rank", str(cfg.lora.rank), "--lora-alpha", str(cfg.lora.alpha), "--targets", targets]
    cmd += ["--tasks", task.name, "--partition", "iid", "--seed", str(cfg.lora.init_seed)]
    cmd += ["--num-train", str(max(1, cfg.train_examples // fed.clients)), "--num-test", str(cfg.test_examples)]
    cmd += ["--run-config", "tagged=false"]
    if model_dir is not None:
        cmd += ["--model", str(model_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=fed.timeout)
    if done.returncode != 0:
        raise RuntimeError(f"the federation for expert {task.name} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    rounds = list(range(fed.rounds - cfg.checkpoints + 1, fed.rounds + 1))
    return [(r, RunDir(run_dir).checkpoint_dir(r)) for r in rounds]


def publish_experts(hub: Any, root: str | Path, build: str, producer: str, names: Sequence[str] = ()) -> list[str]:
    """Publish every checkpoint of every expert under ``root`` as versions of ``tasks/<task>``
    (oldest checkpoint first, so the latest version is the final adapter)."""

    root = Path(root)
    base = json.loads((root / BUILD_FILE).read_text())["config"]["base_model"]
    published = []
    for task_dir in sorted(p for p in root.iterdir() if (p / TASK_FILE).is_file() and not p.name.startswith(".")):
        info = json.loads((task_dir / TASK_FILE).read_text())
        if names and info["name"] not in names:
            continue
        for step in info["checkpoints"]:
            provenance = {
                "base_model": base,
                "producer": producer,
                "run": build,
                "description": info["descriptions"][0],
                "evaluation": info.get("evaluation"),
                "extra": {
                    "task": {"descriptions": info["descriptions"], "examples": info["examples"]},
                    "checkpoint": {"step": step, "of": info["checkpoints"]},
                },
            }
            adapter = read_adapter_dir(task_dir / f"checkpoint-{step}")
            record = hub.publish(f"tasks/{info['name']}", adapter, provenance)
            published.append(f"{record['name']} v{record['version']}")
    return published
