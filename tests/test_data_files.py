"""Data files in every format the readers take, mapped onto records; chat records tokenised with the
loss on exactly the assistant tokens."""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value
from datasets import Image as ImageFeature
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from fedlora.core.data import IGNORE_INDEX, read_jsonl
from fedlora.core.data_files import Columns, encode_chat, label_names, read_records
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.records import ChatExample, Example, ImageExample, Message, TextExample

FORMATS = ("jsonl", "json", "csv", "parquet", "disk", "dict")


def write(tmp_path: Path, rows: list[dict[str, Any]], fmt: str, features: Features | None = None) -> Path:
    """``rows`` as one data file (or ``save_to_disk`` directory) of format ``fmt`` in ``tmp_path``."""
    if fmt == "jsonl":
        path = tmp_path / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path = tmp_path / "data.json"
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif fmt == "csv":
        path = tmp_path / "data.csv"
        with path.open("w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            for r in rows:
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
    else:
        ds = Dataset.from_list(rows, features=features)
        if fmt == "parquet":
            path = tmp_path / "data.parquet"
            ds.to_parquet(str(path))
        elif fmt == "disk":
            path = tmp_path / "disk"
            ds.save_to_disk(str(path))
        else:  # a DatasetDict: the train split is read, not the test one
            path = tmp_path / "dict"
            DatasetDict({"test": ds.select([0]), "train": ds}).save_to_disk(str(path))
    return path


# -- causal LM -------------------------------------------------------------------------------------

PAIRS = [
    {"prompt": "2+2=", "completion": "4", "task": "add"},
    {"prompt": "", "completion": "x", "task": "copy"},
    {"prompt": "reverse abc", "completion": "cba", "task": "reverse"},
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_prompt_completion_is_read_alike_from_every_format(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, PAIRS, fmt)
    assert read_records(path, "causal-lm") == [
        (Example("2+2=", "4"), "add"),
        (Example("", "x"), "copy"),
        (Example("reverse abc", "cba"), "reverse"),
    ]


def test_jsonl_fast_path_equals_read_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(PAIRS[0]), "", json.dumps({"prompt": "p", "completion": "c"}), json.dumps(PAIRS[2])]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = read_records(path, "causal-lm")
    assert got == read_jsonl(path)
    assert got[1] == (Example("p", "c"), None)


CHATS = [
    {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
        ],
        "task": "greet",
    },
    {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], "task": "math"},
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_messages_are_read_alike_from_every_format(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, CHATS, fmt)
    assert read_records(path, "causal-lm") == [
        (ChatExample((Message("system", "be brief"), Message("user", "hi"), Message("assistant", "hello"))), "greet"),
        (ChatExample((Message("user", "2+2?"), Message("assistant", "4"))), "math"),
    ]


ALPACA = [
    {"instruction": "Add the numbers", "input": "2 2", "output": "4"},
    {"instruction": "Say hi", "input": "", "output": "hi"},
]


@pytest.mark.parametrize("fmt", FORMATS)
def test_alpaca_columns_become_prompt_and_completion(tmp_path: Path, fmt: str) -> None:
    path = write(tmp_path, ALPACA, fmt)
    assert read_records(path, "causal-lm") == [
        (Example("Add the numbers\n\n2 2", "4"), None),
        (Example("Say hi", "hi"), None),
    ]
    # named columns win over the Alpaca mapping
    named = read_records(path, "causal-lm", Columns(prompt="input", completion="output"))
    assert named == [(Example("2 2", "4"), None), (Example("", "hi"), None)]


def test_causal_column_options(tmp_path: Path) -> None:
    rows = [{"q": "a?", "a": "b", "domain": "qa", "prompt": "ignored"}]
    path = write(tmp_path, rows, "json")
    assert read_records(path, "causal-lm", Columns(prompt="q", completion="a", task="domain")) == [
        (Example("a?", "b"), "qa")
    ]
    chat = write(tmp_path, [{"conv": CHATS[1]["messages"], "task": "t"}], "parquet")
    assert read_records(chat, "causal-lm", Columns(messages="conv")) == [
        (ChatExample((Message("user", "2+2?"), Message("assistant", "4"))), "t")
    ]


# -- text classification ---------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_text_classification_is_read_alike_from_every_format(tmp_path: Path, fmt: str) -> None:
    rows = [
        {"text": "great film", "label": 1, "task": "imdb"},
        {"text": "dull", "label": 0, "task": "imdb"},
        {"text": "007", "label": 10, "task": "sst"},
    ]
    path = write(tmp_path, rows, fmt)
    assert read_records(path, "seq-cls") == [
        (TextExample("great film", "1"), "imdb"),
        (TextExample("dull", "0"), "imdb"),
        (TextExample("007", "10"), "sst"),
    ]


@pytest.mark.parametrize("fmt", ["parquet", "disk"])
def test_class_label_integers_name_their_class(tmp_path: Path, fmt: str) -> None:
    features = Features({"sentence": Value("string"), "label": ClassLabel(names=["neg", "pos"])})
    path = write(tmp_path, [{"sentence": "good", "label": 1}, {"sentence": "bad", "label": 0}], fmt, features)
    records = read_records(path, "seq-cls")
    assert records == [(TextExample("good", "pos"), None), (TextExample("bad", "neg"), None)]
    assert label_names(records) == ("neg", "pos")


def test_text_classification_column_options(tmp_path: Path) -> None:
    path = write(tmp_path, [{"review": "fine", "stars": "4", "site": "a", "text": "not this"}], "csv")
    got = read_records(path, "seq-cls", Columns(text="review", label="stars", task="site"))
    assert got == [(TextExample("fine", "4"), "a")]


def test_label_names_are_sorted_naturally() -> None:
    def recs(labels: Sequence[str]) -> list[tuple[TextExample, None]]:
        return [(TextExample("t", label), None) for label in labels]

    assert label_names(recs(["10", "9", "1", "9"])) == ("1", "9", "10")
    assert label_names(recs(["-1", "2.5", "2"])) == ("-1", "2", "2.5")
    assert label_names(recs(["b", "A", "a", "10", "9"])) == ("10", "9", "A", "a", "b")
    with pytest.raises(ValueError, match="record 2 is a Example, which has no class label"):
        label_names([*recs(["a"]), (Example("p", "c"), None)])


# -- image classification --------------------------------------------------------------------------

RGB = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 7
GREY = np.array([[0, 128], [255, 1], [2, 3]], dtype=np.uint8)


def write_pngs(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    Image.fromarray(RGB, "RGB").save(tmp_path / "imgs" / "rgb.png")
    Image.fromarray(GREY, "L").save(tmp_path / "imgs" / "grey.png")


def assert_images(records: list[tuple[Any, str | None]], path: Path, tasks: Sequence[str | None]) -> None:
    assert [r.label for r, _ in records] == ["cat", "7"]
    assert [t for _, t in records] == list(tasks)
    assert [r.key for r, _ in records] == [f"{path.name}:1", f"{path.name}:2"]
    first, second = records[0][0], records[1][0]
    assert isinstance(first, ImageExample) and isinstance(second, ImageExample)
    assert first.image.dtype == np.uint8 and first.image.shape == (2, 3, 3)
    np.testing.assert_array_equal(first.image, RGB)
    assert second.image.dtype == np.uint8 and second.image.shape == (3, 2)  # grey stays 2-D
    np.testing.assert_array_equal(second.image, GREY)


@pytest.mark.parametrize("fmt", FORMATS)
def test_image_paths_are_read_alike_from_every_format(tmp_path: Path, fmt: str) -> None:
    write_pngs(tmp_path)
    rows = [{"image": "imgs/rgb.png", "label": "cat", "task": "a"}, {"image": "imgs/grey.png", "label": 7, "task": "b"}]
    if fmt not in ("jsonl", "json"):  # a column of an arrow table has one type
        rows[1]["label"] = "7"
    path = write(tmp_path, rows, fmt)
    assert_images(read_records(path, "image-cls"), path, ["a", "b"])


@pytest.mark.parametrize("fmt", ["parquet", "disk", "dict"])
def test_image_feature_is_decoded(tmp_path: Path, fmt: str) -> None:
    features = Features({"img": ImageFeature(), "label": ClassLabel(names=["7", "cat"])})
    rows = [{"img": Image.fromarray(RGB, "RGB"), "label": 1}, {"img": Image.fromarray(GREY, "L"), "label": 0}]
    path = write(tmp_path, rows, fmt, features)  # the images' bytes travel inside the data set
    assert_images(read_records(path, "image-cls"), path, [None, None])


@pytest.mark.parametrize("fmt", ["json", "parquet", "disk"])
def test_nested_lists_are_images(tmp_path: Path, fmt: str) -> None:
    rows = [{"pixels": RGB.tolist(), "label": "cat"}, {"pixels": GREY[:, :, None].tolist(), "label": "7"}]
    path = write(tmp_path, rows, fmt)
    assert_images(read_records(path, "image-cls", Columns(image="pixels")), path, [None, None])


def test_rgba_loses_alpha_and_binary_images_are_grey(tmp_path: Path) -> None:
    rgba = np.dstack([RGB, np.full((2, 3), 9, dtype=np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    Image.fromarray(GREY > 100).save(tmp_path / "b.png")  # mode "1"
    path = write(
        tmp_path,
        [{"image": "a.png", "label": "x"}, {"image": "b.png", "label": "y"}, {"image": rgba.tolist(), "label": "z"}],
        "json",
    )
    got = [r.image for r, _ in read_records(path, "image-cls") if isinstance(r, ImageExample)]
    np.testing.assert_array_equal(got[0], RGB)
    np.testing.assert_array_equal(got[1], (GREY > 100).astype(np.uint8) * 255)
    np.testing.assert_array_equal(got[2], RGB)


# -- errors ----------------------------------------------------------------------------------------


def test_a_missing_column_is_refused_with_the_columns_there_are(tmp_path: Path) -> None:
    path = write(tmp_path, [{"text": "a", "label": "x"}], "csv")
    with pytest.raises(
        ValueError, match=f"^{re.escape(str(path))} has no column 'txt'; its columns: text, label; pass --text-column$"
    ):
        read_records(path, "seq-cls", Columns(text="txt"))
    other = write(tmp_path, [{"review": "a", "label": "x"}], "parquet")
    with pytest.raises(ValueError, match="has no column 'text' or 'sentence'; its columns: review, label; pass --text"):
        read_records(other, "seq-cls")
    with pytest.raises(ValueError, match="has no column 'image' or 'img'; its columns: review, label"):
        read_records(other, "image-cls")
    with pytest.raises(ValueError, match="has no causal-LM columns; its columns: review, label"):
        read_records(other, "causal-lm")
    pairs = write(tmp_path, [{"prompt": "a", "answer": "b"}], "jsonl")
    with pytest.raises(
        ValueError, match="no column 'completion'; its columns: prompt, answer; pass --completion-column"
    ):
        read_records(pairs, "causal-lm")
    with pytest.raises(ValueError, match="no column 'group'; its columns: prompt, answer; pass --task-column"):
        read_records(pairs, "causal-lm", Columns(completion="answer", task="group"))


@pytest.mark.parametrize(
    ("fmt", "kind", "rows", "problem"),
    [
        (
            "jsonl",
            "causal-lm",
            [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": ""}],
            ":2: 'completion' is empty",
        ),
        (
            "jsonl",
            "causal-lm",
            [{"prompt": "a", "completion": "b"}, {"prompt": 5, "completion": "c"}],
            ":2: 'prompt' must be a string, got int 5",
        ),
        ("json", "causal-lm", [{"prompt": "a", "completion": "b"}, {"prompt": "c"}], "row 2: missing 'completion'"),
        ("csv", "seq-cls", [{"text": "a", "label": "x"}, {"text": "b", "label": ""}], "row 2: 'label' is empty"),
        (
            "json",
            "seq-cls",
            [{"text": "a", "label": 1}, {"text": 7, "label": 2}],
            "row 2: 'text' must be a string, got int 7",
        ),
        ("parquet", "seq-cls", [{"text": "a", "label": 1}, {"text": "b", "label": None}], "row 2: missing 'label'"),
        (
            "json",
            "seq-cls",
            [{"text": "a", "label": 1.5}],
            "row 1: 'label' must be a string or an integer, got float 1.5",
        ),
        (
            "jsonl",
            "causal-lm",
            [{"messages": [{"role": "bot", "content": "x"}]}],
            ":1: message 1 has unknown role 'bot'; roles: system, user, assistant",
        ),
        (
            "parquet",
            "causal-lm",
            [{"messages": [{"role": "user", "content": "x"}]}],
            "row 1: 'messages' has no assistant message",
        ),
        (
            "jsonl",
            "causal-lm",
            [{"prompt": "a", "completion": "b", "task": ""}],
            ":1: 'task' .* must be a non-empty string",
        ),
        (
            "json",
            "image-cls",
            [{"image": "nowhere.png", "label": "a"}],
            "row 1: image file .*nowhere.png does not exist",
        ),
        (
            "json",
            "image-cls",
            [{"image": [[0, 300]], "label": "a"}],
            "row 1: 'image' pixel values must be integers 0..255",
        ),
        ("json", "image-cls", [{"image": [1, 2], "label": "a"}], r"row 1: 'image' must be an image, .* shape \(2,\)"),
    ],
)
def test_a_bad_record_is_refused_with_file_and_row(
    tmp_path: Path, fmt: str, kind: str, rows: list[dict[str, Any]], problem: str
) -> None:
    path = write(tmp_path, rows, fmt)
    sep = "" if problem.startswith(":") else ", "  # JSONL lines read like compiler messages: file:line
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}{sep}{problem}"):
        read_records(path, kind)


def test_empty_and_unreadable_sources_are_refused(tmp_path: Path) -> None:
    for name in ("e.jsonl", "e.json", "e.csv", "e.parquet"):
        (tmp_path / name).write_text("\n \n", encoding="utf-8")
        with pytest.raises(ValueError, match="the file is empty"):
            read_records(tmp_path / name, "seq-cls")
    (tmp_path / "h.csv").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"h\.csv: (no records|cannot be read)"):
        read_records(tmp_path / "h.csv", "seq-cls")
    (tmp_path / "d.txt").write_text("x", encoding="utf-8")
    with pytest.raises(ValueError, match=r"unsupported file type '\.txt'; use \.jsonl, \.json, \.csv, \.parquet"):
        read_records(tmp_path / "d.txt", "seq-cls")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_records(tmp_path / "missing.jsonl", "causal-lm")
    with pytest.raises(ValueError, match="not one written by save_to_disk"):
        read_records(tmp_path, "seq-cls")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "completion": "b"}\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        read_records(tmp_path / "bad.jsonl", "causal-lm")
    with pytest.raises(ValueError, match="kind must be one of causal-lm, seq-cls, image-cls"):
        read_records(tmp_path / "bad.jsonl", "seq2seq")


def test_a_dataset_dict_without_train_names_its_splits(tmp_path: Path) -> None:
    ds = Dataset.from_list([{"text": "a", "label": "x"}])
    DatasetDict({"dev": ds, "eval": ds}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(ValueError, match="holds the splits dev, eval and none is named 'train'"):
        read_records(tmp_path / "two", "seq-cls")
    DatasetDict({"dev": ds}).save_to_disk(str(tmp_path / "one"))  # the only split is the one
    assert read_records(tmp_path / "one", "seq-cls") == [(TextExample("a", "x"), None)]


def test_columns_are_validated_once() -> None:
    with pytest.raises(ValueError, match="the label column must be a non-empty name or None"):
        Columns(label=" ")


# -- chat encoding ---------------------------------------------------------------------------------

CONVERSATION = ChatExample(
    (
        Message("system", "be brief"),
        Message("user", "hi"),
        Message("assistant", "hello there"),
        Message("user", "bye"),
        Message("assistant", "see you"),
    )
)
MARKERS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# role markers glued to the content and newlines after each turn: turn boundaries fall inside no word
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def word_tokenizer(template: str | None) -> PreTrainedTokenizerBase:
    """A fast word-level tokenizer built here (nothing is downloaded), the markers as special tokens."""
    words = ["[UNK]", *MARKERS, "be", "brief", "hi", "hello", "there", "bye", "see", "you", "long", "short"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tok.add_tokens(MARKERS, special_tokens=True)
    tok.chat_template = template
    return tok


def check_labels(ids: list[int], labels: list[int], tokens: list[tuple[int, bool]]) -> None:
    """Token by token: the expected id, and its own id as label where marked, else -100."""
    assert ids == [t for t, _ in tokens]
    assert labels == [t if keep else IGNORE_INDEX for t, keep in tokens]


def test_encode_chat_labels_exactly_the_assistant_tokens_fast_tokenizer() -> None:
    tok = word_tokenizer(TEMPLATE)
    assert tok.is_fast
    ids, labels, truncated = encode_chat(tok, CONVERSATION, None)
    v = tok.get_vocab()
    expected = [
        ("<|system|>", False), ("be", False), ("brief", False), ("<|end|>", False),
        ("<|user|>", False), ("hi", False), ("<|end|>", False),
        ("<|assistant|>", False), ("hello", True), ("there", True), ("<|end|>", True),
        ("<|user|>", False), ("bye", False), ("<|end|>", False),
        ("<|assistant|>", False), ("see", True), ("you", True), ("<|end|>", True),
    ]  # fmt: skip
    check_labels(ids, labels, [(v[w], keep) for w, keep in expected])
    assert not truncated


def test_encode_chat_byte_tokenizer_tokenises_piece_by_piece() -> None:
    tok = load_tokenizer()  # ByT5-style: slow, one id per byte (byte + 3), "</s>" is id 1
    assert not tok.is_fast
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )

    def text(s: str, keep: bool) -> list[tuple[int, bool]]:
        return [(b + 3, keep) for b in s.encode()]

    eos_off, eos_on = [(1, False)], [(1, True)]
    expected = [
        *text("<system>be brief", False), *eos_off, *text("<user>hi", False), *eos_off,
        *text("<assistant>", False), *text("hello there", True), *eos_on,
        *text("<user>bye", False), *eos_off, *text("<assistant>", False), *text("see you", True), *eos_on,
    ]  # fmt: skip
    ids, labels, truncated = encode_chat(tok, CONVERSATION, None)
    check_labels(ids, labels, expected)
    assert not truncated
    cut_ids, cut_labels, cut = encode_chat(tok, CONVERSATION, 40)
    assert cut and len(cut_ids) == 40
    assert (cut_ids, cut_labels) == (ids[:40], labels[:40])
    assert encode_chat(tok, CONVERSATION, len(ids)) == (ids, labels, False)


def test_encode_chat_finds_turns_a_template_renders_differently_later() -> None:
    # the first word depends on the conversation's length, so shorter prefixes do not nest in the
    # full text: turn 1 is found by its content (its end marker unlabelled), turn 2 by its prefixes
    tok = word_tokenizer("{% if messages|length > 3 %}long {% else %}short {% endif %}" + TEMPLATE)
    ids, labels, _ = encode_chat(tok, CONVERSATION, None)
    v = tok.get_vocab()
    expected = [
        ("long", False), ("<|system|>", False), ("be", False), ("brief", False), ("<|end|>", False),
        ("<|user|>", False), ("hi", False), ("<|end|>", False),
        ("<|assistant|>", False), ("hello", True), ("there", True), ("<|end|>", False),
        ("<|user|>", False), ("bye", False), ("<|end|>", False),
        ("<|assistant|>", False), ("see", True), ("you", True), ("<|end|>", True),
    ]  # fmt: skip
    check_labels(ids, labels, [(v[w], keep) for w, keep in expected])


def test_encode_chat_truncates_and_refuses_without_a_template() -> None:
    tok = word_tokenizer(TEMPLATE)
    full_ids, full_labels, _ = encode_chat(tok, CONVERSATION, None)
    ids, labels, truncated = encode_chat(tok, CONVERSATION, 9)
    assert truncated and ids == full_ids[:9] and labels == full_labels[:9]
    assert labels[-1] == tok.get_vocab()["hello"]
    with pytest.raises(ValueError, match=r"no chat template.*tokenizer\.chat_template.*prompt/completion columns"):
        encode_chat(word_tokenizer(None), CONVERSATION, None)
    with pytest.raises(ValueError, match="no assistant turn"):
        encode_chat(tok, ChatExample((Message("user", "hi"),)), None)


def test_an_image_that_cannot_be_decoded_is_refused_with_its_row(tmp_path: Path) -> None:
    write_pngs(tmp_path)
    features = Features({"image": ImageFeature(), "label": Value("string")})
    rows = [{"image": str(tmp_path / "imgs" / "grey.png"), "label": "a"}]
    path = write(tmp_path, rows, "parquet", features)  # parquet keeps the path, not the bytes
    (tmp_path / "imgs" / "grey.png").unlink()
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))}, row 1: cannot be decoded"):
        read_records(path, "image-cls")
