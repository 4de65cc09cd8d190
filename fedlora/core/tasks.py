"""The embedded procedural task suite.

Every task maps a short string of letters or digits to another string. Tasks come in
families with one integer parameter (caesar shift k, repeat n, ...), so a model must learn
the family *and* the parameter, and held-out parameters of seen families test
generalisation. Examples are generated deterministically from a seed; nothing is downloaded.

Two prompt formats exist on purpose:

- pretraining carries a short task tag (``c3:abc=``) so the base model learns every seen task;
- fine-tuning carries no tag (``:abc=``), so a LoRA adapter itself must carry the task.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedlora.core.records import Example, Record, by_name

LETTERS = string.ascii_lowercase
DIGITS = string.digits

# Held out of pretraining: unseen parameters of seen families, and one unseen family
# (``swap``) as a negative control for zero-shot generation.
HELD_OUT_TASKS: tuple[str, ...] = ("caesar-7", "caesar-19", "adddigit-4", "rotate-2", "swap")

_MIN_LEN, _MAX_LEN = 4, 8


@dataclass(frozen=True)
class Task:
    """One task of the suite: a family, its parameter and how to generate examples."""

    name: str  # e.g. "caesar-7"
    family: str  # e.g. "caesar"
    param: int | None
    tag: str  # short prompt tag used in pretraining, e.g. "c7"
    alphabet: str  # characters inputs are drawn from
    descriptions: tuple[str, ...]  # natural-language descriptions of the task
    fn: Callable[[str], str] = field(repr=False, compare=False)

    @property
    def held_out(self) -> bool:
        return self.name in HELD_OUT_TASKS

    def apply(self, text: str) -> str:
        return self.fn(text)

    def example(self, rng: random.Random, tagged: bool = False) -> Example:
        n = rng.randint(_MIN_LEN, _MAX_LEN)
        text = "".join(rng.choice(self.alphabet) for _ in range(n))
        prefix = self.tag if tagged else ""
        return Example(prompt=f"{prefix}:{text}=", completion=self.apply(text))

    def examples(self, n: int, seed: int, split: str = "train", tagged: bool = False) -> list[Example]:
        """``n`` examples, deterministic in (task, seed, split).

        Train and test draw from independent streams, and test inputs that also occur in the
        train stream of the same seed are skipped, so a test set never overlaps training.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        rng = random.Random(f"{self.name}|{seed}|{split}")
        if split == "train":
            return [self.example(rng, tagged) for _ in range(n)]
        seen = {e.prompt for e in self.examples(4 * n, seed, "train", tagged)}
        out: list[Example] = []
        for _ in range(100 * n):
            if len(out) == n:
                break
            ex = self.example(rng, tagged)
            if ex.prompt not in seen:
                out.append(ex)
        return out


def _caesar(k: int) -> Callable[[str], str]:
    return lambda s: "".join(LETTERS[(LETTERS.index(c) + k) % 26] for c in s)


def _repeat(n: int) -> Callable[[str], str]:
    return lambda s: "".join(c * n for c in s)


def _add_digit(n: int) -> Callable[[str], str]:
    return lambda s: "".join(str((int(c) + n) % 10) for c in s)


def _rotate(k: int) -> Callable[[str], str]:
    return lambda s: s[k % len(s) :] + s[: k % len(s)]


def _swap_pairs(s: str) -> str:
    chars = list(s)
    for i in range(0, len(chars) - 1, 2):
        chars[i], chars[i + 1] = chars[i + 1], chars[i]
    return "".join(chars)


def _ordinal(n: int) -> str:
    return {1: "first", 2: "second", 3: "third"}.get(n, f"{n}th")


def _build() -> dict[str, Task]:
    tasks: list[Task] = []
    for k in range(1, 26):
        tasks.append(
            Task(
                f"caesar-{k}",
                "caesar",
                k,
                f"c{k}",
                LETTERS,
                (
                    f"apply a caesar cipher with shift {k}",
                    f"shift every letter {k} places forward in the alphabet",
                    f"encrypt the letters with a rotation of {k}",
                ),
                _caesar(k),
            )
        )
    for n in range(2, 5):
        tasks.append(
            Task(
                f"repeat-{n}",
                "repeat",
                n,
                f"r{n}",
                LETTERS,
                (
                    f"repeat each character {n} times",
                    f"write every letter {n} times in a row",
                ),
                _repeat(n),
            )
        )
    tasks.append(
        Task(
            "reverse",
            "reverse",
            None,
            "rv",
            LETTERS,
            ("reverse the string", "write the characters in reverse order"),
            lambda s: s[::-1],
        )
    )
    tasks.append(
        Task(
            "sort-asc",
            "sort",
            0,
            "sa",
            DIGITS,
            ("sort the digits in ascending order", "order the digits from smallest to largest"),
            lambda s: "".join(sorted(s)),
        )
    )
    tasks.append(
        Task(
            "sort-desc",
            "sort",
            1,
            "sd",
            DIGITS,
            ("sort the digits in descending order", "order the digits from largest to smallest"),
            lambda s: "".join(sorted(s, reverse=True)),
        )
    )
    for n in range(1, 10):
        tasks.append(
            Task(
                f"adddigit-{n}",
                "adddigit",
                n,
                f"a{n}",
                DIGITS,
                (
                    f"add {n} to each digit modulo 10",
                    f"increase every digit by {n}, wrapping around after 9",
                    f"shift each digit up by {n} mod 10",
                ),
                _add_digit(n),
            )
        )
    for k in range(1, 4):
        tasks.append(
            Task(
                f"rotate-{k}",
                "rotate",
                k,
                f"o{k}",
                LETTERS,
                (
                    f"rotate the string left by {k}",
                    f"move the first {k} characters to the end",
                    f"cyclically shift the text {k} positions to the left",
                ),
                _rotate(k),
            )
        )
    tasks.append(
        Task(
            "upper",
            "upper",
            None,
            "u",
            LETTERS,
            ("convert the letters to upper case", "capitalise every letter"),
            str.upper,
        )
    )
    tasks.append(
        Task(
            "copy",
            "copy",
            None,
            "cp",
            LETTERS + DIGITS,
            ("copy the input unchanged", "repeat the input exactly as it is"),
            lambda s: s,
        )
    )
    tasks.append(
        Task(
            "swap",
            "swap",
            None,
            "sw",
            LETTERS,
            (
                "swap each pair of adjacent characters",
                "exchange the first and second character, the third and fourth, and so on",
            ),
            _swap_pairs,
        )
    )
    return by_name(tasks)


TASKS: dict[str, Task] = _build()


def get_task(name: str) -> Task:
    """The task called ``name``; raises with the known names when it does not exist."""
    try:
        return TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


class EmbeddedTask(Protocol):
    """What every embedded task suite's tasks offer (causal tasks here, the text-classification
    family, the digit-image domains): the partitioners and the clients' data need only this."""

    @property
    def name(self) -> str: ...

    @property
    def family(self) -> str: ...

    def examples(self, n: int, seed: int, split: str = "train", tagged: bool = False) -> Sequence[Record]: ...


def _suites() -> tuple[Mapping[str, EmbeddedTask], ...]:
    # lazy: the classification suites (their modules sit beside this one) are read only when asked
    from fedlora.core.image_tasks import IMAGE_TASKS
    from fedlora.core.text_tasks import TEXT_TASKS

    return TASKS, TEXT_TASKS, IMAGE_TASKS


def known_tasks() -> list[str]:
    """Every embedded task's name, of every model kind."""
    return [name for suite in _suites() for name in suite]


def any_task(name: str) -> EmbeddedTask:
    """The embedded task called ``name``, of any model kind; raises with the known names."""
    for suite in _suites():
        if name in suite:
            return suite[name]
    raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(known_tasks())}")


def families() -> list[str]:
    return sorted({t.family for t in TASKS.values()})


def seen_tasks() -> list[Task]:
    """Tasks the base model is pretrained on (everything not held out)."""
    return [t for t in TASKS.values() if not t.held_out]


def held_out_tasks() -> list[Task]:
    return [TASKS[n] for n in HELD_OUT_TASKS]


def pretraining_stream(seed: int, tasks: Sequence[Task] | None = None) -> Iterator[Example]:
    """Endless tagged examples of the seen tasks: a family first, then one of its tasks.

    Sampling the family first keeps big families (caesar has 23 seen tasks) from swamping
    the small ones.
    """
    pool = list(tasks) if tasks is not None else seen_tasks()
    if any(t.held_out for t in pool):
        raise ValueError("held-out tasks must never appear in pretraining data")
    by_family: dict[str, list[Task]] = {}
    for t in pool:
        by_family.setdefault(t.family, []).append(t)
    fams = sorted(by_family)
    rng = random.Random(f"pretrain|{seed}")
    while True:
        task = rng.choice(by_family[rng.choice(fams)])
        yield task.example(rng, tagged=True)


def exact_match(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    """Fraction of predictions equal to the expected completion."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    if not examples:
        return 0.0
    return sum(p == e.completion for p, e in zip(predictions, examples, strict=True)) / len(examples)
