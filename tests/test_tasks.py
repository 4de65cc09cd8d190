from __future__ import annotations

from itertools import islice

import pytest

from fedlora.core.tasks import (
    HELD_OUT_TASKS,
    TASKS,
    Example,
    exact_match,
    families,
    get_task,
    held_out_tasks,
    pretraining_stream,
    seen_tasks,
)


def test_suite_shape() -> None:
    assert len(TASKS) == 46  # 45 tasks of 8 families + the unseen "swap" family
    assert families() == ["adddigit", "caesar", "copy", "repeat", "reverse", "rotate", "sort", "swap", "upper"]
    assert [t.name for t in held_out_tasks()] == list(HELD_OUT_TASKS)
    assert len(seen_tasks()) == 41
    assert all(len(t.descriptions) >= 2 for t in TASKS.values())
    assert len({t.tag for t in TASKS.values()}) == len(TASKS)


@pytest.mark.parametrize(
    ("task", "text", "expected"),
    [
        ("caesar-3", "abcxyz", "defabc"),
        ("caesar-25", "abc", "zab"),
        ("repeat-3", "ab", "aaabbb"),
        ("reverse", "abcd", "dcba"),
        ("sort-asc", "3141", "1134"),
        ("sort-desc", "3141", "4311"),
        ("adddigit-4", "0679", "4013"),
        ("rotate-2", "abcde", "cdeab"),
        ("upper", "abc", "ABC"),
        ("copy", "a1b2", "a1b2"),
        ("swap", "abcde", "badce"),
    ],
)
def test_task_functions(task: str, text: str, expected: str) -> None:
    assert get_task(task).apply(text) == expected


def test_examples_are_deterministic_per_seed() -> None:
    t = get_task("rotate-1")
    assert t.examples(50, seed=3) == t.examples(50, seed=3)
    assert t.examples(50, seed=3) != t.examples(50, seed=4)
    ex = t.examples(20, seed=0, tagged=True)
    assert all(e.prompt.startswith("o1:") and e.prompt.endswith("=") for e in ex)
    assert all(e.completion == t.apply(e.prompt[3:-1]) for e in ex)
    assert all(4 <= len(e.completion) <= 8 for e in ex)


def test_test_split_never_overlaps_training() -> None:
    t = get_task("sort-asc")  # small input space, so collisions would happen without the guard
    train = {e.prompt for e in t.examples(500, seed=1, split="train")}
    test = t.examples(100, seed=1, split="test")
    assert len(test) == 100
    assert not train & {e.prompt for e in test}


def test_held_out_tasks_never_in_pretraining() -> None:
    held_tags = {get_task(n).tag for n in HELD_OUT_TASKS}
    stream = list(islice(pretraining_stream(seed=0), 20000))
    tags = {e.prompt.split(":", 1)[0] for e in stream}
    assert not tags & held_tags
    assert tags == {t.tag for t in seen_tasks()}  # every seen task does appear
    assert list(islice(pretraining_stream(seed=0), 100)) == stream[:100]
    with pytest.raises(ValueError, match="held-out"):
        next(pretraining_stream(0, [get_task("caesar-7")]))


def test_family_first_sampling_balances_families() -> None:
    stream = list(islice(pretraining_stream(seed=0), 8000))
    caesar = sum(e.prompt[0] == "c" and e.prompt[1].isdigit() for e in stream) / len(stream)
    assert 0.08 < caesar < 0.17  # one family of 8 (~0.125), not 23 tasks of 41 (~0.56)


def test_exact_match_and_unknown_task() -> None:
    ex = [Example(":ab=", "ba"), Example(":cd=", "dc")]
    assert exact_match(["ba", "cd"], ex) == 0.5
    with pytest.raises(KeyError, match="known tasks: caesar-1"):
        get_task("caesar-99")
