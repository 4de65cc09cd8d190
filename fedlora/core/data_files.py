"""A user's data file, in the formats the Hugging Face ecosystem writes, mapped onto our records.

:func:`read_records` reads JSONL, JSON, CSV, Parquet or a ``save_to_disk`` directory through the
``datasets`` library, so a data set exported from the Hub trains as it is; the column names a
model kind needs come from :class:`Columns` or the usual defaults. Every record comes back with
its group label (the ``task`` column), which partitioners use to give clients non-IID data.
:func:`encode_chat` tokenises a chat record with the tokenizer's own chat template and puts the
loss on the assistant turns only.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedlora.core.kinds import check_kind
from fedlora.core.records import ChatExample, Example, ImageExample, Message, Record, TextExample, label_of

if TYPE_CHECKING:
    from datasets import Dataset
    from PIL.Image import Image as PILImage
    from transformers import PreTrainedTokenizerBase

ROLES: tuple[str, ...] = ("system", "user", "assistant")
"""The roles a chat record's messages may have."""

_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_NUMBER = re.compile(r"[+-]?\d+(\.\d+)?")


@dataclass(frozen=True)
class Columns:
    """Which column holds what; None means the usual name (``text`` or ``sentence``, ``label``,
    ``prompt``, ``completion``, ``messages``, ``image`` or ``img``, ``task``) where the file has it.

    ``task`` groups records for non-IID partitioning; a file without that column has no groups.
    """

    text: str | None = None
    label: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: str | None = None
    image: str | None = None
    task: str | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(
                    f"the {f.name} column must be a non-empty name or None (the default), got {value!r}; "
                    f"pass --{f.name}-column NAME or leave it out"
                )


def read_records(path: str | Path, kind: str, columns: Columns = Columns()) -> list[tuple[Record, str | None]]:
    """The records of a data file for one model kind, each with its group (``task``) label or None.

    ``path`` is a ``.jsonl``, ``.json`` (a list of objects or JSON lines), ``.csv`` or ``.parquet``
    file, or a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (the
    ``train`` split, or the only one). Per kind:

    * ``causal-lm``: prompt/completion columns -> :class:`Example`; else a messages column (a list
      of ``{"role", "content"}``, a JSON string of one in CSV) -> :class:`ChatExample`; else
      Alpaca's instruction/input/output (prompt = instruction, plus a blank line and the input
      when there is one).
    * ``seq-cls``: text and label -> :class:`TextExample`.
    * ``image-cls``: image (a ``datasets`` Image, a nested list of 0..255 numbers, or a path
      relative to the folder holding the data file or directory) and label -> :class:`ImageExample`
      keyed ``file:row`` (the file's name and the row number).

    A label is a string or an integer (a ``ClassLabel``'s integer names its class). CSV cells are
    read as strings, as CSV has no types. Columns the kind does not use are ignored. A bad record
    is refused with the file and where it is: ``line N`` for a causal-LM JSONL file (read line by
    line, without ``datasets``, as it is the format most files are in), else ``row N``, counting
    records from 1.
    """
    check_kind(kind)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file {p} does not exist")
    if p.is_file() and _is_blank(p):
        raise ValueError(f"{p}: the file is empty; it needs at least one record")
    if kind == "causal-lm" and p.is_file() and p.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(p)
        names = list(dict.fromkeys(k for _, row in rows for k in row))
        mapper = _Mapper.create(kind, columns, names, p, {})
        return [mapper.record(row, n, f"{p}:{n}") for n, row in rows]
    ds = _load(p)
    mapper = _Mapper.create(kind, columns, ds.column_names, p, _class_names(ds))
    ds = ds.select_columns(sorted(set(mapper.cols.values())))
    return [mapper.record(row, n, f"{p}, row {n}") for n, row in _decoded_rows(ds, p)]


def label_names(records: Sequence[tuple[Record, str | None]]) -> tuple[str, ...]:
    """The label space of classification records, sorted naturally: numeric labels by value
    (so "10" follows "9"), any other set lexicographically."""
    labels: set[str] = set()
    for n, (record, _) in enumerate(records, start=1):
        label = label_of(record)
        if label is None:
            raise ValueError(
                f"record {n} is a {type(record).__name__}, which has no class label; "
                "label names exist for seq-cls and image-cls records only"
            )
        labels.add(label)
    if all(_NUMBER.fullmatch(label) for label in labels):
        return tuple(sorted(labels, key=lambda label: (float(label), label)))
    return tuple(sorted(labels))


def encode_chat(
    tokenizer: PreTrainedTokenizerBase, example: ChatExample, max_length: int | None
) -> tuple[list[int], list[int], bool]:
    """Input ids, labels, and whether the conversation was longer than ``max_length`` tokens (only
    the first ``max_length`` are kept; None keeps all).

    The conversation is rendered with the tokenizer's chat template; labels are -100 except on
    the tokens of the assistant turns. An assistant turn is the text that rendering
    ``messages[:i + 1]`` adds to ``messages[:i]`` with the generation prompt (its content and the
    template's end-of-turn marker), or, where a template renders earlier turns differently once
    more follow, the turn's content found in the rendered text. A fast tokenizer tokenises the
    whole text once and a token is labelled when its characters overlap a turn; a slow one
    tokenises the text piece by piece at the turns' boundaries.
    """
    from fedlora.core.data import IGNORE_INDEX  # lazy: torch, which reading records does not need

    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be >= 1 or None, got {max_length}")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template, so a chat record cannot be rendered; set "
            "tokenizer.chat_template to a Jinja template, use a model whose tokenizer has one, "
            "or give the data as prompt/completion columns"
        )
    messages = [{"role": m.role, "content": m.content} for m in example.messages]
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = _assistant_spans(tokenizer, messages, full)
    if not spans:
        raise ValueError("the conversation has no assistant turn, so it has nothing to train on")
    if getattr(tokenizer, "is_fast", False):
        ids, in_turn = _tokens_by_offsets(tokenizer, full, spans)
    else:
        ids, in_turn = _tokens_by_pieces(tokenizer, full, spans)
    labels = [i if keep else IGNORE_INDEX for i, keep in zip(ids, in_turn, strict=True)]
    truncated = max_length is not None and len(ids) > max_length
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels, truncated


# -- reading -------------------------------------------------------------------------------------


def _is_blank(p: Path) -> bool:
    """Whether a file holds nothing but whitespace (read in chunks, so a large file costs one)."""
    with p.open("rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _jsonl_rows(p: Path) -> list[tuple[int, dict[str, Any]]]:
    """The objects of a JSONL file with their 1-based line numbers; blank lines are skipped."""
    rows: list[tuple[int, dict[str, Any]]] = []
    with p.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{p}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{p}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    return rows


def _load(p: Path) -> Dataset:
    """A file or ``save_to_disk`` directory as one in-memory ``datasets.Dataset``."""
    # lazy: datasets loads pyarrow and pandas
    import datasets

    if p.is_dir():
        try:
            loaded = datasets.load_from_disk(str(p), keep_in_memory=True)
        except FileNotFoundError as e:
            raise ValueError(f"{p} is a directory but not one written by save_to_disk ({e})") from None
        if isinstance(loaded, datasets.DatasetDict):
            splits = list(loaded)
            if "train" in loaded:
                loaded = loaded["train"]
            elif len(splits) == 1:
                loaded = loaded[splits[0]]
            else:
                raise ValueError(
                    f"{p} holds the splits {', '.join(splits) or '(none)'} and none is named 'train'; "
                    "name the split to train on 'train', or save it alone"
                )
        ds = loaded
    else:
        builder = _BUILDERS.get(p.suffix.lower())
        if builder is None:
            raise ValueError(
                f"{p}: unsupported file type {p.suffix!r}; use .jsonl, .json, .csv, .parquet "
                "or a directory written by save_to_disk"
            )
        options: dict[str, Any] = {}
        if builder == "csv":  # CSV has no types: every cell is text ("007", "NA" and "" stay as written)
            with p.open(encoding="utf-8", newline="") as f:
                header = next(csv.reader(f), [])
            options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
            options["na_filter"] = False
        # A private cache, gone once the table is in memory: reading a file leaves nothing behind.
        with tempfile.TemporaryDirectory(prefix="fedlora-data-") as cache:
            try:
                ds = datasets.load_dataset(
                    builder, data_files=str(p), split="train", cache_dir=cache, keep_in_memory=True, **options
                )
            except Exception as e:  # the builders raise many kinds (arrow, pandas, StopIteration)
                cause = e.__cause__ or e
                raise ValueError(f"{p}: cannot be read as {builder.upper()} ({type(cause).__name__}: {cause})") from e
    if len(ds) == 0:
        raise ValueError(f"{p}: no records")
    return ds


def _decoded_rows(ds: Dataset, p: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """The rows with their 1-based numbers; a cell ``datasets`` cannot decode (an Image feature
    whose file is gone) is refused with its row."""
    rows = iter(ds)
    for n in range(1, len(ds) + 1):
        try:
            row = next(rows)
        except Exception as e:  # the decoders raise what their libraries raise (OSError, PIL's)
            raise ValueError(f"{p}, row {n}: cannot be decoded ({type(e).__name__}: {e})") from e
        yield n, row


def _class_names(ds: Dataset) -> dict[str, tuple[str, ...]]:
    """The class names of each ``ClassLabel`` column, whose cells are integers."""
    # lazy: datasets loads pyarrow and pandas
    from datasets import ClassLabel

    return {name: tuple(f.names) for name, f in ds.features.items() if isinstance(f, ClassLabel)}


_FLAGS = {
    "text": "--text-column",
    "label": "--label-column",
    "prompt": "--prompt-column",
    "completion": "--completion-column",
    "messages": "--messages-column",
    "image": "--image-column",
    "task": "--task-column",
}


@dataclass(frozen=True)
class _Mapper:
    """How a file's rows become records: the column of each role (``prompt``, ``text``, ...),
    the class names of ``ClassLabel`` columns, and the file, for image paths and keys."""

    kind: str
    cols: dict[str, str]
    class_names: dict[str, tuple[str, ...]]
    source: Path

    @classmethod
    def create(
        cls, kind: str, columns: Columns, names: Sequence[str], source: Path, class_names: dict[str, tuple[str, ...]]
    ) -> _Mapper:
        have = set(names)
        listed = ", ".join(names) or "(none)"

        def need(role: str, given: str | None, *defaults: str) -> str:
            """The column of ``role``: the one given, else the first default the file has."""
            if given is not None:
                if given in have:
                    return given
                raise ValueError(f"{source} has no column {given!r}; its columns: {listed}; pass {_FLAGS[role]}")
            for name in defaults:
                if name in have:
                    return name
            wanted = " or ".join(repr(d) for d in defaults)
            raise ValueError(f"{source} has no column {wanted}; its columns: {listed}; pass {_FLAGS[role]}")

        cols: dict[str, str] = {}
        if kind == "causal-lm":
            if columns.messages is not None:
                cols["messages"] = need("messages", columns.messages)
            elif columns.prompt is not None or columns.completion is not None or "prompt" in have:
                cols["prompt"] = need("prompt", columns.prompt, "prompt")
                cols["completion"] = need("completion", columns.completion, "completion")
            elif "messages" in have:
                cols["messages"] = "messages"
            elif {"instruction", "output"} <= have:
                cols.update(instruction="instruction", output="output")
                if "input" in have:
                    cols["input"] = "input"
            else:
                raise ValueError(
                    f"{source} has no causal-LM columns; its columns: {listed}; a record needs 'prompt' and "
                    "'completion', 'messages', or 'instruction' and 'output'; pass --prompt-column and "
                    "--completion-column, or --messages-column"
                )
        elif kind == "seq-cls":
            cols["text"] = need("text", columns.text, "text", "sentence")
            cols["label"] = need("label", columns.label, "label")
        else:
            cols["image"] = need("image", columns.image, "image", "img")
            cols["label"] = need("label", columns.label, "label")
        if columns.task is not None or "task" in have:
            cols["task"] = need("task", columns.task, "task")
        return cls(kind, cols, class_names, source)

    def record(self, row: Mapping[str, Any], n: int, where: str) -> tuple[Record, str | None]:
        """Row ``n`` (1-based) as a record and its group label; ``where`` names it in errors."""
        c = self.cols
        record: Record
        if "prompt" in c:
            record = Example(_text(row, c["prompt"], where, empty=True), _text(row, c["completion"], where))
        elif "instruction" in c:
            prompt = _text(row, c["instruction"], where, empty=True)
            extra = row.get(c["input"]) if "input" in c else None
            if extra is not None:
                extra = _text(row, c["input"], where, empty=True)
                prompt = f"{prompt}\n\n{extra}" if extra else prompt
            record = Example(prompt, _text(row, c["output"], where))
        elif "messages" in c:
            record = _chat(row.get(c["messages"]), c["messages"], where)
        elif "text" in c:
            record = TextExample(_text(row, c["text"], where), self._label(row, c["label"], where))
        else:
            image = _image(row.get(c["image"]), c["image"], where, self.source.parent)
            record = ImageExample(image, self._label(row, c["label"], where), f"{self.source.name}:{n}")
        task = self._task(row.get(c["task"]), c["task"], where) if "task" in c else None
        return record, task

    def _label(self, row: Mapping[str, Any], col: str, where: str) -> str:
        value = row.get(col)
        names = self.class_names.get(col)
        if names is not None and isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(names):
                return names[value]
            if value == -1:  # the ClassLabel convention for "no label"
                raise ValueError(f"{where}: missing {col!r} (-1 in a ClassLabel column)")
            raise ValueError(f"{where}: {col!r} is {value}, not a class of the ClassLabel ({len(names)} names)")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            raise ValueError(f"{where}: missing {col!r}")
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # a JSON 3.0, or an integer column with gaps read as floats
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, str):
            if not value:
                raise ValueError(f"{where}: {col!r} is empty")
            return value
        raise ValueError(f"{where}: {col!r} must be a string or an integer, got {type(value).__name__} {value!r}")

    def _task(self, value: Any, col: str, where: str) -> str | None:
        if value is None:
            return None
        names = self.class_names.get(col)
        if names is not None and isinstance(value, int) and 0 <= value < len(names):
            return names[value]
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str) or not value:
            raise ValueError(f"{where}: {col!r} (the group of the record) must be a non-empty string or an integer")
        return value


def _text(row: Mapping[str, Any], col: str, where: str, empty: bool = False) -> str:
    value = row.get(col)
    if value is None:
        raise ValueError(f"{where}: missing {col!r}")
    if not isinstance(value, str):
        raise ValueError(f"{where}: {col!r} must be a string, got {type(value).__name__} {value!r}")
    if not value and not empty:
        raise ValueError(f"{where}: {col!r} is empty")
    return value


def _chat(value: Any, col: str, where: str) -> ChatExample:
    """A list of ``{"role", "content"}`` objects (or a JSON string of one) as a conversation."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: {col!r} is a string but not JSON ({e.msg})") from None
    if value is None:
        raise ValueError(f"{where}: missing {col!r}")
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"{where}: {col!r} must be a non-empty list of {{'role', 'content'}} objects")
    messages: list[Message] = []
    for i, m in enumerate(value, start=1):
        if not isinstance(m, Mapping):
            raise ValueError(f"{where}: message {i} of {col!r} must be an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"{where}: message {i} has unknown role {role!r}; roles: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{where}: message {i} ({role}) needs a string 'content', got {type(content).__name__}")
        if role == "assistant" and not content:
            raise ValueError(f"{where}: message {i} (assistant) is empty")
        messages.append(Message(role, content))
    if not any(m.role == "assistant" for m in messages):
        raise ValueError(f"{where}: {col!r} has no assistant message, so the record has nothing to train on")
    return ChatExample(tuple(messages))


def _image(value: Any, col: str, where: str, folder: Path) -> np.ndarray:
    """An image cell as ``uint8``: H x W for grey ("L") images, else H x W x 3 (RGB)."""
    # lazy: pillow, for image data only
    from PIL import Image, UnidentifiedImageError

    if value is None:
        raise ValueError(f"{where}: missing {col!r}")
    if isinstance(value, Image.Image):
        return _pixels(value)
    if isinstance(value, Mapping) and (value.get("bytes") or value.get("path")):  # an undecoded Image cell
        value = value["bytes"] or value["path"]
    if isinstance(value, bytes | str):
        source: Any = io.BytesIO(value) if isinstance(value, bytes) else folder / value
        if isinstance(source, Path) and not source.is_file():
            raise ValueError(f"{where}: image file {source} does not exist (paths are relative to {folder})")
        try:
            with Image.open(source) as im:
                return _pixels(im)
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{where}: {col!r} is not a readable image ({e})") from None
    try:
        arr = np.asarray(value)
    except ValueError:  # a ragged nested list
        arr = np.asarray([], dtype=object)
    if arr.dtype.kind not in "iuf" or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
        raise ValueError(
            f"{where}: {col!r} must be an image, an image path, or a rectangular H x W (x 1, 3 or 4) "
            f"nested list of numbers; got {type(value).__name__} of shape {arr.shape}"
        )
    if not (np.isfinite(arr).all() and (arr >= 0).all() and (arr <= 255).all() and (arr == np.round(arr)).all()):
        raise ValueError(f"{where}: {col!r} pixel values must be integers 0..255 (scale 0..1 floats by 255)")
    if arr.ndim == 3:  # one channel is grey; four drop alpha, as PIL's RGBA -> RGB does
        arr = arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3]
    return np.ascontiguousarray(arr, dtype=np.uint8)


def _pixels(im: PILImage) -> np.ndarray:
    if im.mode in ("L", "1"):
        return np.array(im.convert("L"), dtype=np.uint8)
    return np.array(im.convert("RGB"), dtype=np.uint8)


# -- chat encoding -------------------------------------------------------------------------------


def _render(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    if not isinstance(text, str):
        raise TypeError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not the text")
    return text


def _assistant_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], full: str
) -> list[tuple[int, int]]:
    """The character ranges ``[start, end)`` of the assistant turns in the rendered ``full``."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        span = _span_by_prefixes(tokenizer, messages, i, full)
        if span is None or span[0] < cursor:
            start = full.find(m["content"], cursor)
            if start < 0:
                raise ValueError(
                    f"assistant message {i + 1} does not appear in the conversation as the chat template renders "
                    "it, so its tokens cannot be found; use a template that renders message contents verbatim"
                )
            span = (start, start + len(m["content"]))
        spans.append(span)
        cursor = span[1]
    return spans


def _span_by_prefixes(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], i: int, full: str
) -> tuple[int, int] | None:
    """What rendering message ``i`` adds after the generation prompt, if the renderings nest."""
    try:
        before = _render(tokenizer, messages[:i], generation_prompt=True)
        after = _render(tokenizer, messages[: i + 1], generation_prompt=False)
    except Exception:  # a template may refuse a prefix (no messages, or not ending on a user turn)
        return None
    if len(after) > len(before) and after.startswith(before) and full.startswith(after):
        return len(before), len(after)
    return None


def _tokens_by_offsets(
    tokenizer: PreTrainedTokenizerBase, full: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(i) for i in enc["input_ids"]]
    in_turn = [any((s < b and e > a) or (s == e and a <= s < b) for a, b in spans) for s, e in enc["offset_mapping"]]
    return ids, in_turn


def _tokens_by_pieces(
    tokenizer: PreTrainedTokenizerBase, full: str, spans: list[tuple[int, int]]
) -> tuple[list[int], list[bool]]:
    pieces: list[tuple[str, bool]] = []
    pos = 0
    for a, b in spans:
        pieces += [(full[pos:a], False), (full[a:b], True)]
        pos = b
    pieces.append((full[pos:], False))
    ids: list[int] = []
    in_turn: list[bool] = []
    for text, labelled in pieces:
        if text:
            piece = [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]
            ids += piece
            in_turn += [labelled] * len(piece)
    return ids, in_turn
