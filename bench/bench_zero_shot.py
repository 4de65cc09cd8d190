"""Zero-shot adapters on held-out tasks of the embedded suite: base model, nearest-expert
retrieval, the uniform average of all experts, SG-LoRA, ICM-LoRA and the oracle adapter
trained on the task, side by side in one run.

    python bench/bench_zero_shot.py [--suite both|procedural|text] [--experts DIR] [--steps 200]
                                    [--text-steps 80] [--generator-steps 600] [--quick]

``--quick`` is a smoke run (about a minute): every expert, oracle and generator trained for a
few steps on a few examples, scored on 8 test examples; same code path, meaningless figures.

Experts: one adapter per seen task (3 late checkpoints each, one shared initialisation), built
here unless ``--experts`` names a directory from ``fl-hub build-experts``. Held out: unseen
parameters of seen families (caesar-7, caesar-19, adddigit-4, rotate-2) and one unseen family
(swap) as a negative control. Each method is scored on every description of a task (the
description is all a device gives; ICM-LoRA also gets 8 examples) and the scores averaged.
A second table asks for *seen* tasks in words none of the library's descriptions use (the
last column is then the task's own expert): what a device that knows what it wants, but not
the hub's name for it, gets.

Goals (last lines): generated adapters recover >= 70% of the oracle's gain in exact match over
the base model on the seen-family tasks (``ratio <method>_gain_recovery``, goal >= 0.7) and
more than retrieval does (``ratio <method>_minus_retrieval_gain``, goal > 0), and generation
takes < 100 ms on the CPU (``ratio <method>_ms_over_goal``, goal <= 1).

The second suite (``--suite text``) is the text-classification family on the MiniLM encoder,
where related tasks share what a held-out task needs: overlapping topic label sets, one sentiment
in several domains, the same intents in another domain. Experts carry the head over every
label of the family; each method is scored by accuracy among the held-out task's labels (a
device knows the labels it asks for). ``ratio text_<method>_gain_recovery`` (goal >= 0.7) and
``ratio text_<method>_minus_retrieval_gain`` (goal > 0) close the output.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedlora.core.data import IGNORE_INDEX, collate, exact_matches
from fedlora.core.tasks import HELD_OUT_TASKS, Task, get_task
from fedlora.core.text_tasks import TEXT_TASKS, TextTask, get_text_task
from fedlora.hub.generators.base import Generator
from fedlora.hub.generators.cvae import CVAESettings
from fedlora.hub.generators.experts import ClassifierExpertTrainer, ExpertConfig, ExpertTrainer, build_experts
from fedlora.hub.generators.library import ExpertLibrary, Layout
from fedlora.hub.generators.registry import generator_class
from fedlora.hub.generators.sg_lora import SGLoRA
from fedlora.hub.sdk.manifest import describe_base_model
from fedlora.hub.sdk.request import check_examples

NEGATIVE_CONTROL = "swap"
#: seen tasks described in words none of the library's descriptions use: a device that knows
#: what it wants but not the hub's name for it
PARAPHRASES = {
    "adddigit-6": "add six to every digit, wrapping past nine",
    "caesar-11": "move each letter eleven places along the alphabet",
    "rotate-3": "take the first three letters and put them at the back",
    "repeat-3": "triple every character",
    "reverse": "print the text backwards",
    "sort-desc": "arrange the digits from biggest to smallest",
}
#: the text suite's seen tasks in new words
TEXT_PARAPHRASES = {
    "text-sentiment-movie": "was the viewer happy with the film or not",
    "text-topic-culture": "is this story about the arts, politicians or scientists",
    "text-intent-shop": "what does the shopper want: to ask, to complain, to ask for something done, or to thank",
}


@torch.no_grad()
def scores(trainer: ExpertTrainer, vector: torch.Tensor | None, task: Task, layout: Layout) -> tuple[float, float]:
    """(exact match, per-token accuracy of the completion) of a flat adapter (None: base)."""
    state = None if vector is None else layout.unflatten(vector)
    trainer.load(state)
    batch = collate(trainer.encoded(task, "test", trainer.cfg.test_examples), trainer.pad)
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    em = float(exact_matches(logits, batch["labels"]).float().mean())
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    return em, float(((logits[:, :-1].argmax(-1) == labels) & mask).sum() / mask.sum())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="both", choices=["both", "procedural", "text"])
    p.add_argument("--text-steps", type=int, default=80, help="training steps per text expert and oracle")
    p.add_argument(
        "--text-experts", type=Path, default=None, help="the text experts' directory: reused if built, else built there"
    )
    p.add_argument("--experts", type=Path, default=None, help="an expert directory (default: build one here)")
    p.add_argument("--steps", type=int, default=200, help="training steps per expert and oracle")
    p.add_argument("--generator-steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=None, help="SG-LoRA's softmax temperature")
    p.add_argument("--embedding", default="tfidf", choices=["tfidf", "minilm"], help="description embedding")
    p.add_argument("--quick", action="store_true", help="smoke run: a few steps and examples everywhere")
    args = p.parse_args()
    torch.set_num_threads(1)
    lines: list[str] = []
    if args.suite in ("both", "procedural"):
        lines += procedural_suite(args)
    if args.suite in ("both", "text"):
        lines += text_suite(args)
    for line in lines:  # every suite's goal lines last
        print(line)
    return 0


def procedural_suite(args: argparse.Namespace) -> list[str]:
    """The procedural string tasks on the byte Llama; returns the goal lines."""
    if args.quick:
        args.generator_steps = min(args.generator_steps, 10)
        cfg = ExpertConfig(
            steps=3, checkpoint_every=1, batch_size=8, train_examples=32, test_examples=8, seed=args.seed
        )
    else:
        cfg = ExpertConfig(steps=args.steps, seed=args.seed)
    tmp = tempfile.TemporaryDirectory()
    experts_dir = args.experts
    t0 = time.perf_counter()
    if experts_dir is None:
        experts_dir = Path(tmp.name) / "experts"
        print(f"building {len(cfg.task_list())} experts ({cfg.steps} steps, checkpoints {cfg.checkpoint_steps()})")
        results = build_experts(cfg, experts_dir)
        ems = [r.exact_match for r in results]
        print(
            f"experts built in {time.perf_counter() - t0:.0f} s; exact match mean {statistics.mean(ems):.3f}, "
            f"min {min(ems):.3f} ({min(results, key=lambda r: r.exact_match).task})"
        )
    trainer = ExpertTrainer(cfg)
    library = ExpertLibrary.from_dir(experts_dir, describe_base_model(None))
    held_out = [get_task(n) for n in HELD_OUT_TASKS]
    leaked = [t.name for t in held_out if t.name in library.names()]
    if leaked:
        raise SystemExit(f"the expert library contains held-out task(s) {leaked}")
    layout = library.layout
    oracle = {}
    for task in held_out:
        checkpoints, em = trainer.train(task)
        oracle[task.name] = layout.flatten(checkpoints[-1][1])
        print(f"oracle {task.name}: exact match {em:.3f}")
    settings = CVAESettings(steps=args.generator_steps, seed=args.seed)
    task_model = (trainer.model.get_base_model(), trainer.tokenizer)
    generators: dict[str, Generator] = {}
    for method in ("sg-lora", "icm-lora"):
        with trainer.model.disable_adapter():
            options = {"temperature": args.temperature} if args.temperature and method == "sg-lora" else {}
            gen = generator_class(method).fit(
                library, settings, task_model=task_model, embedding=args.embedding, **options
            )
        generators[method] = gen
        print(
            f"{method}: {gen.training['parameters']:,} parameters, trained in {gen.training['seconds']:.1f} s "
            f"(final MSE {gen.training['final_mse']:.3f})"
        )
    uniform = torch.stack([e.mean for e in library.experts]).mean(0)
    columns = ["base", "retrieval", "uniform", "sg-lora", "icm-lora", "oracle"]
    latency: dict[str, list[float]] = {m: [] for m in generators}

    def evaluate(task: Task, descriptions: list[str], oracle_vector: torch.Tensor) -> dict[str, tuple[float, float]]:
        examples = task.examples(8, args.seed + 7, "train")
        per: dict[str, list[tuple[float, float]]] = {c: [] for c in columns}
        for description in descriptions:
            nearest, vectors = candidates(
                description, library, uniform, oracle_vector, generators, examples, trainer.model, latency
            )
            for c in columns:
                per[c].append(scores(trainer, vectors[c], task, layout))
            print(f"  {task.name}: '{description}' -> nearest expert {nearest}", flush=True)
        return {c: (statistics.mean(v[0] for v in per[c]), statistics.mean(v[1] for v in per[c])) for c in columns}

    def show(table: dict[str, dict[str, tuple[float, float]]], oracle_name: str) -> None:
        print(f"| task | {' | '.join(columns[:-1])} | {oracle_name} |")
        print(f"|---|{'---|' * len(columns)}")
        for name, row in table.items():
            label = f"{name} (unseen family)" if name == NEGATIVE_CONTROL else name
            print(f"| {label} | " + " | ".join(f"{row[c][0]:.3f} ({row[c][1]:.2f})" for c in columns) + " |")

    table = {task.name: evaluate(task, list(task.descriptions), oracle[task.name]) for task in held_out}
    paraphrased = {
        name: evaluate(get_task(name), [text], library.get(name).checkpoints[-1]) for name, text in PARAPHRASES.items()
    }
    print()
    print("held-out tasks: exact match (token accuracy) on the test split, mean over the task's descriptions")
    show(table, "oracle")
    print()
    print("seen tasks described in new words (one paraphrase each; the last column is the task's own expert)")
    show(paraphrased, "expert")
    seen_family = [n for n in table if n != NEGATIVE_CONTROL]
    print()
    print("the best mixture of the two neighbouring experts, its weight picked on the task's own test split")
    print("(an upper bound for any generator that mixes experts, which no real request could reach):")
    for name in seen_family:
        task = get_task(name)
        same = sorted(
            (e for e in library.experts if get_task(e.name).family == task.family),
            key=lambda e: abs((get_task(e.name).param or 0) - (task.param or 0)),
        )[:2]
        a, b = same[0].checkpoints[-1], same[1].checkpoints[-1]
        best = max((scores(trainer, (1 - w) * a + w * b, task, layout), w) for w in (0.0, 0.25, 0.5, 0.75, 1.0))
        print(
            f"  {name}: {same[0].name} + {same[1].name}: exact match {best[0][0]:.3f} "
            f"(token accuracy {best[0][1]:.2f}) at weight {best[1]}"
        )
    print()
    recovery = {}
    for c in ["retrieval", "uniform", "sg-lora", "icm-lora"]:
        gains = [table[n][c][0] - table[n]["base"][0] for n in seen_family]
        oracle_gain = [table[n]["oracle"][0] - table[n]["base"][0] for n in seen_family]
        tok_gain = [table[n][c][1] - table[n]["base"][1] for n in seen_family]
        tok_oracle = [table[n]["oracle"][1] - table[n]["base"][1] for n in seen_family]
        para = [paraphrased[n][c][0] - paraphrased[n]["base"][0] for n in paraphrased]
        para_oracle = [paraphrased[n]["oracle"][0] - paraphrased[n]["base"][0] for n in paraphrased]
        recovery[c] = sum(gains) / max(sum(oracle_gain), 1e-9)
        print(
            f"{c:>9}: held-out tasks: {recovery[c]:.3f} of the oracle's exact-match gain, "
            f"{sum(tok_gain) / max(sum(tok_oracle), 1e-9):.3f} of its token-accuracy gain (seen families); "
            f"paraphrased seen tasks: {sum(para) / max(sum(para_oracle), 1e-9):.3f} of the expert's gain"
        )
    for method, ms in latency.items():
        print(
            f"{method} generation: median {statistics.median(ms):.1f} ms, max {max(ms):.1f} ms "
            f"over {len(ms)} requests (CPU, 1 thread)"
        )
    print(f"procedural suite: total {time.perf_counter() - t0:.0f} s")
    out = goal_lines("", recovery, generators)
    for method, ms in latency.items():
        out.append(f"ratio {method.replace('-', '_')}_ms_over_goal = {statistics.median(ms) / 100:.3f}")
    return out


def candidates(
    description: str,
    library: ExpertLibrary,
    uniform: torch.Tensor,
    oracle: torch.Tensor,
    generators: dict[str, Generator],
    examples: Sequence[Any],
    model: Any,
    latency: dict[str, list[float]] | None = None,
) -> tuple[str, dict[str, torch.Tensor | None]]:
    """The nearest expert's name and every column's flat adapter for one description (None: the
    base model); ICM-LoRA also reads the examples; generation times go to ``latency``."""
    sg = generators["sg-lora"]
    assert isinstance(sg, SGLoRA)
    nearest, _ = sg.retrieve(description)
    vectors: dict[str, torch.Tensor | None] = {
        "base": None,
        "retrieval": library.get(nearest).checkpoints[-1],
        "uniform": uniform,
        "oracle": oracle,
    }
    for method, gen in generators.items():
        with model.disable_adapter():  # the generators read the base model's hidden states
            start = time.perf_counter()
            vectors[method] = gen.generate_vector(description, examples if method == "icm-lora" else ())
            if latency is not None:
                latency[method].append(1000 * (time.perf_counter() - start))
    return nearest, vectors


def goal_lines(prefix: str, recovery: dict[str, float], methods: Sequence[str]) -> list[str]:
    out = []
    for method in methods:
        name = f"{prefix}{method.replace('-', '_')}"
        out.append(f"ratio {name}_gain_recovery = {recovery[method]:.3f}")
        # goal > 0: beats nearest-expert retrieval (a ratio is undefined when retrieval gains nothing)
        out.append(f"ratio {name}_minus_retrieval_gain = {recovery[method] - recovery['retrieval']:.3f}")
    return out


#: SG-LoRA temperatures the text suite chooses from, by leave-one-out on the seen tasks
TEMPERATURES = (0.02, 0.05, 0.1, 0.2)


def loo_temperature(trainer: ClassifierExpertTrainer, library: ExpertLibrary, embedding: str) -> float:
    """SG-LoRA's softmax temperature, chosen on the seen tasks only: each expert's task scored
    with the mixture mean of the *other* experts its descriptions pick (the prior SG-LoRA starts
    from); the held-out tasks play no part. A sharp temperature is nearest-expert retrieval, a
    flat one the uniform average."""
    gen = SGLoRA.fit(library, CVAESettings(steps=1), embedding=embedding)  # its keys and means; no training
    scores = {}
    for temperature in TEMPERATURES:
        gen.temperature = temperature
        accuracies = []
        for k, expert in enumerate(library.experts):
            task = get_text_task(expert.name)
            for description in expert.descriptions:
                mu, _ = gen.prior(gen.embedder.embed([description])[0], exclude=k)
                accuracies.append(trainer.evaluate(library.layout.unflatten(mu), task))
        scores[temperature] = statistics.mean(accuracies)
    best = max(TEMPERATURES, key=lambda t: (scores[t], -t))
    print(
        "SG-LoRA temperature by leave-one-out on the seen tasks (mixture-mean accuracy): "
        + ", ".join(f"{t}: {a:.3f}" for t, a in scores.items())
        + f" -> {best}"
    )
    return best


def text_suite(args: argparse.Namespace) -> list[str]:
    """The text-classification family on the MiniLM encoder; returns the goal lines."""
    t0 = time.perf_counter()
    if args.quick:
        cfg = ExpertConfig(
            kind="seq-cls", steps=3, checkpoint_every=1, batch_size=8, train_examples=32, test_examples=8,
            seed=args.seed, warm_start="shared",
        )  # fmt: skip
        generator_steps = min(args.generator_steps, 10)
    else:
        cfg = ExpertConfig(
            kind="seq-cls",
            steps=args.text_steps,
            checkpoint_every=10,
            train_examples=1000,
            seed=args.seed,
            warm_start="shared",  # independent experts: a chain hands every expert its elders' label rows
        )
        generator_steps = args.generator_steps
    held_out = [t for t in TEXT_TASKS.values() if t.held_out]
    with tempfile.TemporaryDirectory() as tmp:
        experts_dir = args.text_experts or Path(tmp) / "text-experts"
        if (experts_dir / "experts.json").is_file():
            print(f"\ntext suite: the experts in {experts_dir}")
        else:
            print(f"\ntext suite: building {len(cfg.task_list())} experts ({cfg.steps} steps, {cfg.warm_start})")
            results = build_experts(cfg, experts_dir)
            print(
                f"experts built in {time.perf_counter() - t0:.0f} s; accuracy "
                + ", ".join(f"{r.task} {r.exact_match:.3f}" for r in results)
            )
        trainer = ClassifierExpertTrainer(cfg)
        library = ExpertLibrary.from_dir(experts_dir, describe_base_model(trainer.model_dir))
    leaked = [t.name for t in held_out if t.name in library.names()]
    if leaked:
        raise SystemExit(f"the text expert library contains held-out task(s) {leaked}")
    layout = library.layout
    print(
        f"{len(library.experts)} experts of {layout.size:,} values "
        f"(LoRA and the head over {len(trainer.labels)} labels)"
    )
    oracle = {}
    for task in held_out:
        checkpoints, acc = trainer.train(task)
        oracle[task.name] = layout.flatten(checkpoints[-1][1])
        print(f"oracle {task.name}: accuracy {acc:.3f}")
    temperature = args.temperature or loo_temperature(trainer, library, args.embedding)
    settings = CVAESettings(steps=generator_steps, seed=args.seed)
    task_model = (trainer.model.get_base_model(), trainer.tokenizer)
    generators: dict[str, Generator] = {}
    for method in ("sg-lora", "icm-lora"):
        with trainer.model.disable_adapter():
            options = {"temperature": temperature} if method == "sg-lora" else {}
            generators[method] = generator_class(method).fit(
                library, settings, task_model=task_model, embedding=args.embedding, **options
            )
        gen = generators[method]
        print(f"{method}: {gen.training['parameters']:,} parameters, trained in {gen.training['seconds']:.1f} s")
    uniform = torch.stack([e.mean for e in library.experts]).mean(0)
    columns = ["base", "retrieval", "uniform", "sg-lora", "icm-lora", "oracle"]

    def accuracy(vector: torch.Tensor | None, task: TextTask) -> float:
        return trainer.evaluate(None if vector is None else layout.unflatten(vector), task)

    def evaluate(task: TextTask, descriptions: Sequence[str], oracle_vector: torch.Tensor) -> dict[str, float]:
        examples = check_examples(
            [{"prompt": e.text, "completion": e.label} for e in task.examples(8, args.seed + 7, "train")]
        )
        per: dict[str, list[float]] = {c: [] for c in columns}
        for description in descriptions:
            nearest, vectors = candidates(
                description, library, uniform, oracle_vector, generators, examples, trainer.model
            )
            for c in columns:
                per[c].append(accuracy(vectors[c], task))
            print(f"  {task.name}: '{description}' -> nearest expert {nearest}", flush=True)
        return {c: statistics.mean(v) for c, v in per.items()}

    def show(table: dict[str, dict[str, float]], last: str) -> None:
        print(f"| task | {' | '.join(columns[:-1])} | {last} |")
        print(f"|---|{'---|' * len(columns)}")
        for name, row in table.items():
            print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in columns) + " |")

    table = {t.name: evaluate(t, t.descriptions, oracle[t.name]) for t in held_out}
    paraphrased = {
        n: evaluate(get_text_task(n), [text], library.get(n).checkpoints[-1]) for n, text in TEXT_PARAPHRASES.items()
    }
    print()
    print("text suite, held-out tasks: accuracy among the task's labels, mean over its descriptions")
    show(table, "oracle")
    print()
    print("text suite, seen tasks in new words (the last column is the task's own expert)")
    show(paraphrased, "expert")
    recovery = {}
    print()
    for c in ["retrieval", "uniform", "sg-lora", "icm-lora"]:
        gain = sum(table[n][c] - table[n]["base"] for n in table)
        oracle_gain = sum(table[n]["oracle"] - table[n]["base"] for n in table)
        para = sum(paraphrased[n][c] - paraphrased[n]["base"] for n in paraphrased)
        para_oracle = sum(paraphrased[n]["oracle"] - paraphrased[n]["base"] for n in paraphrased)
        # 0 where the oracle gained nothing (the quick run's sizes): no share of nothing to report
        recovery[c] = gain / oracle_gain if oracle_gain > 1e-9 else 0.0
        print(
            f"{c:>9}: held-out tasks: {recovery[c]:.3f} of the oracle's accuracy gain; "
            f"paraphrased seen tasks: {para / max(para_oracle, 1e-9):.3f} of the expert's gain"
        )
    print(f"text suite: total {time.perf_counter() - t0:.0f} s")
    return goal_lines("text_", recovery, generators)


if __name__ == "__main__":
    sys.exit(main())
