"""``fl-hub build-experts``: one LoRA adapter per seen task of an embedded suite, several late
checkpoints each, written as an expert directory (see :mod:`fedlora.hub.generators.library`) and
optionally published to ``tasks/<task>`` (one version per checkpoint, one build id).

Two suites (``kind``): the procedural string tasks on the byte Llama (``causal-lm``) and the
text-classification family on the MiniLM encoder (``seq-cls``), whose experts carry the
classification head over every label of the family. Every expert starts from the same LoRA
initialisation (``lora.init_seed``), so the experts live in one parameter space where mixtures
and a generator's outputs mean something.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fedlora.atomic import atomic_directory
from fedlora.core.adapter_format import CONFIG_FILE, WEIGHTS_FILE, read_adapter_dir
from fedlora.core.data import collate, encode
from fedlora.core.embedded import default_model_dir
from fedlora.core.kinds import get_kind
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
from fedlora.core.records import TextExample
from fedlora.core.run_dir import RunDir
from fedlora.core.tasks import Task, get_task, seen_tasks
from fedlora.core.text_tasks import TEXT_TASKS, TextTask, get_text_task, label_space
from fedlora.core.train import TrainSettings, batches, evaluate, seeded_global_rng, train
from fedlora.hub.generators.library import BUILD_FILE, TASK_FILE
from fedlora.hub.sdk.manifest import describe_base_model
from fedlora.hub.sdk.request import examples_json

#: the expert adapters' default shape: small enough for a generator to model every parameter
EXPERT_LORA = LoraSettings(rank=4, alpha=8.0, init_seed=0)
#: the text experts adapt attention's query and value projections only
TEXT_EXPERT_LORA = LoraSettings(rank=4, alpha=8.0, target_modules=("query", "value"), init_seed=0)
#: what a text expert trains in full besides LoRA: the classifier only. The seq-cls kind trains
#: the encoder's pooler too (148k values, four times the rest): a generator's size grows with
#: the adapter's (ICM-LoRA's was 142 MB, over a hub's upload limit, and its training 10x slower),
#: and the LoRA on the attention already moves the [CLS] state the pooler reads
EXPERT_HEADS = ("classifier",)
WARM_STARTS = ("shared", "family-chain")
EXPERT_KINDS = ("causal-lm", "seq-cls")
AnyTask = Task | TextTask


@dataclass(frozen=True)
class ExpertConfig:
    tasks: tuple[str, ...] = ()  # empty: every seen task of the kind's embedded suite
    lora: LoraSettings | None = None  # None: EXPERT_LORA (causal-lm) or TEXT_EXPERT_LORA (seq-cls)
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
    #: which suite: "causal-lm" (the procedural tasks, byte Llama) or "seq-cls" (the text family, MiniLM)
    kind: str = "causal-lm"

    def __post_init__(self) -> None:
        if self.kind not in EXPERT_KINDS:
            raise ValueError(f"expert kind must be one of {', '.join(EXPERT_KINDS)}, got {self.kind!r}")
        if self.lora is None:
            object.__setattr__(self, "lora", TEXT_EXPERT_LORA if self.kind == "seq-cls" else EXPERT_LORA)
        for name in ("steps", "checkpoints", "checkpoint_every", "batch_size", "train_examples", "test_examples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if (self.checkpoints - 1) * self.checkpoint_every >= self.steps:
            raise ValueError(
                f"{self.checkpoints} checkpoints {self.checkpoint_every} steps apart do not fit in {self.steps} steps"
            )
        for name in self.tasks:
            self.get(name)  # unknown names raise with the known ones
        if self.warm_start not in WARM_STARTS:
            raise ValueError(f"warm_start must be one of {', '.join(WARM_STARTS)}, got {self.warm_start!r}")

    @property
    def adapter(self) -> LoraSettings:
        assert self.lora is not None  # set in __post_init__
        return self.lora

    def get(self, name: str) -> AnyTask:
        return get_text_task(name) if self.kind == "seq-cls" else get_task(name)

    def task_list(self) -> list[AnyTask]:
        if self.tasks:
            return [self.get(n) for n in self.tasks]
        if self.kind == "seq-cls":
            return [t for t in TEXT_TASKS.values() if not t.held_out]
        return list(seen_tasks())

    def checkpoint_steps(self) -> list[int]:
        return [self.steps - i * self.checkpoint_every for i in reversed(range(self.checkpoints))]


@dataclass(frozen=True)
class ExpertResult:
    task: str
    exact_match: float
    seconds: float
    checkpoints: list[int]


def base_adapter(initial: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The initial adapter with every LoRA B zero: the base model (and a classifier's initial head)."""
    return {k: torch.zeros_like(v) if "lora_B" in k else v for k, v in initial.items()}


class ExpertTrainer:
    """The base model wrapped once; every expert restarts from the same initial adapter."""

    def __init__(self, cfg: ExpertConfig, model_dir: str | Path | None = None) -> None:
        self.cfg = cfg
        self.model_dir = Path(model_dir) if model_dir else default_model_dir()
        self.tokenizer = load_tokenizer(self.model_dir)
        self.pad = int(self.tokenizer.pad_token_id)
        self.model = wrap_lora(load_base_model(self.model_dir), cfg.adapter)
        self.initial = get_adapter_state(self.model)
        self.max_len = max_positions(self.model)

    def encoded(self, task: AnyTask, split: str, n: int) -> list[Any]:
        if not isinstance(task, Task):
            raise TypeError(f"a causal-lm expert trains on the procedural tasks, not {task.name} (kind seq-cls)")
        return encode(self.tokenizer, task.examples(n, self.cfg.seed, split), self.max_len)

    def train(
        self, task: AnyTask, start: dict[str, torch.Tensor] | None = None
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
        set_adapter_state(self.model, base_adapter(self.initial) if state is None else state)

    def evaluate(self, state: dict[str, torch.Tensor] | None, task: AnyTask) -> float:
        """Exact match of an adapter (None: the base model) on a task's test split."""
        self.load(state)
        return evaluate(self.model, self.encoded(task, "test", self.cfg.test_examples), self.pad).exact_match


class ClassifierExpertTrainer:
    """Experts of the text-classification family on the MiniLM encoder.

    One head over every label of the family (:func:`label_space` of all its tasks, held out
    included), so every expert and every generated adapter has the same shape and a label means
    one row everywhere. An expert's loss runs over its own task's labels only and its accuracy
    is read among them: a device knows the labels it asks for (its description names them), and
    the rows of labels a task never saw keep their initial values instead of learning "never".
    """

    def __init__(self, cfg: ExpertConfig, model_dir: str | Path | None = None) -> None:
        kind = get_kind("seq-cls")
        self.cfg, self.kind = cfg, kind
        self.model_dir = Path(model_dir) if model_dir else kind.default_model_dir()
        self.labels = label_space(list(TEXT_TASKS.values()))
        self.tokenizer = kind.load_processor(self.model_dir)
        self.pad = kind.pad_id(self.tokenizer)
        base = kind.load_model(self.model_dir, torch.device("cpu"), torch.float32, self.labels, cfg.adapter.init_seed)
        self.model = wrap_lora(base, cfg.adapter, kind.peft_task_type, EXPERT_HEADS)
        self.initial = get_adapter_state(self.model)
        self.max_len = kind.max_positions(self.model)

    def encoded(self, task: AnyTask, split: str, n: int) -> list[Any]:
        records = task.examples(n, self.cfg.seed, split)
        return list(self.kind.encode(self.tokenizer, records, self.labels, self.max_len, truncate=True).items)

    def label_mask(self, task: AnyTask) -> torch.Tensor:
        """(labels,) True for the task's own labels."""
        if not isinstance(task, TextTask):
            raise TypeError(f"a text-classification expert trains on text tasks, not {task.name}")
        return torch.tensor([label in task.labels for label in self.labels])

    def logits(self, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return out.masked_fill(~mask, float("-inf"))

    def train(
        self, task: AnyTask, start: dict[str, torch.Tensor] | None = None
    ) -> tuple[list[tuple[int, dict[str, torch.Tensor]]], float]:
        """The adapter's late checkpoints ``[(step, state)]`` and its final accuracy."""
        cfg = self.cfg
        set_adapter_state(self.model, self.initial if start is None else start)
        mask = self.label_mask(task)
        params = [p for p in self.model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # no decay: unused rows stay as they were
        data = self.encoded(task, "train", cfg.train_examples)
        stream = (collate(b, self.pad) for b in batches(data, cfg.batch_size, cfg.seed))
        marks, out = set(cfg.checkpoint_steps()), []
        self.model.train()
        with seeded_global_rng(cfg.seed):  # dropout: the expert is a function of its seed
            for step in range(1, cfg.steps + 1):
                batch = next(stream)
                loss = torch.nn.functional.cross_entropy(self.logits(batch, mask), batch["label"])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if step in marks:
                    out.append((step, get_adapter_state(self.model)))
        self.model.eval()
        return out, self.accuracy(task)

    def load(self, state: dict[str, torch.Tensor] | None) -> None:
        """Put an adapter in the model (None: the base model, LoRA B = 0 and the initial head)."""
        set_adapter_state(self.model, base_adapter(self.initial) if state is None else state)

    @torch.no_grad()
    def accuracy(self, task: AnyTask) -> float:
        """Accuracy of the loaded adapter on the task's test split, among the task's labels."""
        self.model.eval()
        mask, data = self.label_mask(task), self.encoded(task, "test", self.cfg.test_examples)
        right = 0
        for i in range(0, len(data), 128):
            batch = collate(data[i : i + 128], self.pad)
            right += int((self.logits(batch, mask).argmax(-1) == batch["label"]).sum())
        return right / len(data)

    def evaluate(self, state: dict[str, torch.Tensor] | None, task: AnyTask) -> float:
        """Accuracy of an adapter (None: the base model) on a task's test split."""
        self.load(state)
        return self.accuracy(task)


def expert_trainer(cfg: ExpertConfig, model_dir: str | Path | None = None) -> ExpertTrainer | ClassifierExpertTrainer:
    return ClassifierExpertTrainer(cfg, model_dir) if cfg.kind == "seq-cls" else ExpertTrainer(cfg, model_dir)


def task_examples(task: AnyTask, n: int, seed: int) -> list[dict[str, str]]:
    """A few examples to keep with an expert: a labelled text is kept as prompt = text,
    completion = label (what ICM-LoRA's task vector reads)."""
    records = task.examples(n, seed, "train")
    return [
        {"prompt": r.text, "completion": r.label} if isinstance(r, TextExample) else examples_json([r])[0]
        for r in records
    ]


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
    if federated is not None and cfg.kind != "causal-lm":
        raise ValueError("federated experts are built for the causal-lm suite only; train text experts locally")
    trainer = expert_trainer(cfg, model_dir)
    base = describe_base_model(trainer.model_dir)
    results = []
    previous: dict[str, dict[str, torch.Tensor]] = {}  # family -> its last expert (family-chain)
    tasks = cfg.task_list()
    if cfg.warm_start == "family-chain":
        tasks = sorted(tasks, key=lambda t: (t.family, getattr(t, "param", None) or -1))
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
                "examples": task_examples(task, cfg.task_examples, cfg.seed + 1),
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
        "lora": lora_settings_dict(cfg.adapter),
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
    cfg: ExpertConfig, fed: FederatedExperts, task: AnyTask, work: Path, model_dir: Path | None
) -> list[tuple[int, Path]]:
    """Run the task's federation with ``fl-sim`` and return its last rounds' adapter directories."""
    import subprocess
    import sys

    if cfg.checkpoints > fed.rounds:
        raise ValueError(f"{cfg.checkpoints} checkpoints need at least as many rounds, got {fed.rounds}")
    run_dir = work / f"{task.name}-run"
    targets = ",".join(cfg.adapter.target_modules)
    cmd = [sys.executable, "-m", "fedlora.simulations.cli", "--out", str(run_dir), "--force", "--quiet", "--no-dp"]
    cmd += ["--strategy", fed.strategy, "--clients", str(fed.clients), "--rounds", str(fed.rounds)]
    cmd += ["--local-steps", str(fed.local_steps), "--lr", str(cfg.lr), "--batch-size", str(cfg.batch_size)]
    cmd += ["--rank", str(cfg.adapter.rank), "--lora-alpha", str(cfg.adapter.alpha), "--targets", targets]
    cmd += ["--tasks", task.name, "--partition", "iid", "--seed", str(cfg.adapter.init_seed)]
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
