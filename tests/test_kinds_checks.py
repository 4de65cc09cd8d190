"""What ``fl-sim`` refuses before any process starts when a run brings its own data or kind:
over-long records (and what ``--max-length`` truncates instead), a DP batch too small for a
client, a column the file does not have, a label outside ``--labels``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from transformers import PreTrainedTokenizerBase

from fedlora.core.image_tasks import IMAGE_TASKS, LABELS
from fedlora.core.text_tasks import TEXT_TASKS
from fedlora.simulations.cli import main
from fedlora.simulations.simulate import check_records, start_notes, validate

MAX_POSITIONS = 64  # the embedded causal model's max_position_embeddings


def write_long_records(path: Path, tokenizer: PreTrainedTokenizerBase) -> int:
    """20 prompt/completion records, every fourth longer than the embedded model's positions (but
    with completion tokens left within them); returns how many are too long."""
    records = []
    for i in range(20):
        prompt = f"r{i}:" + ("abcdefghij" * 5 if i % 4 == 0 else "abc")
        completion = "klmnopqrst" * 3 if i % 4 == 0 else "xyz"
        records.append({"prompt": prompt, "completion": completion})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    lengths = [
        len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"])
        + len(tokenizer(r["completion"], add_special_tokens=False)["input_ids"])
        + 1  # the end-of-sequence token
        for r in records
    ]
    return sum(n > MAX_POSITIONS for n in lengths)


def write_reviews_csv(path: Path) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["domain", "review", "sentiment"])
        for task in ("text-sentiment-product", "text-sentiment-movie"):
            writer.writerows((task, e.text, e.label) for e in TEXT_TASKS[task].examples(20, seed=3))
    return path


def refused(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """fl-sim's stderr for ``argv``, which must be refused (exit 2) with nothing started."""
    run_dir = tmp_path / "run"
    assert main([*argv, "--out", str(run_dir), "--quiet"]) == 2
    assert not run_dir.exists()
    return " ".join(capsys.readouterr().err.split())  # the console wraps long lines


def test_overlong_records_are_refused_and_max_length_truncates_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer: PreTrainedTokenizerBase
) -> None:
    data = tmp_path / "long.jsonl"
    too_long = write_long_records(data, tokenizer)
    assert too_long == 5
    common = ["--data", str(data), "--partition", "iid", "--clients", "2", "--num-test", "2", "--no-dp"]
    err = refused(common, tmp_path, capsys)
    assert f"{too_long} of 20 records are longer than the model's {MAX_POSITIONS} positions" in err
    assert f"pass --max-length {MAX_POSITIONS}" in err

    config = {
        "data-path": str(data),
        "partition.scheme": "iid",
        "num-clients": 2,
        "num-test": 2,
        "dp.enabled": False,
        "model.max-length": MAX_POSITIONS,
        "run-dir": str(tmp_path / "run"),
    }
    cfg = validate(config)  # accepted: the long records are cut, not refused
    assert check_records(cfg) == too_long
    assert start_notes(cfg) == [f"{too_long} record(s) truncated to --max-length {MAX_POSITIONS} tokens"]
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match=f"--max-length 65 is longer than the model's {MAX_POSITIONS} positions"):
        validate(config | {"model.max-length": MAX_POSITIONS + 1})


def test_a_dp_batch_too_small_is_refused_with_the_smallest_safe_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--tasks", "adddigit-4,rotate-2", "--clients", "2", "--num-train", "32", "--num-test", "4"]
    argv += ["--local-steps", "2", "--batch-size", "8", "--dp"]
    err = refused(argv, tmp_path, capsys)
    assert "batch size 8 is too small for DP-SGD's Poisson batches over 32 examples" in err
    assert "the smallest safe batch size is 9" in err


def test_a_missing_column_is_refused_with_the_files_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_reviews_csv(tmp_path / "reviews.csv")
    argv = ["--kind", "seq-cls", "--data", str(data), "--partition", "iid", "--clients", "2", "--no-dp"]
    err = refused([*argv, "--text-column", "body", "--label-column", "sentiment"], tmp_path, capsys)
    assert "has no column 'body'; its columns: domain, review, sentiment; pass --text-column" in err
    err = refused(argv, tmp_path, capsys)  # the defaults (text or sentence) are not there either
    assert "has no column 'text' or 'sentence'; its columns: domain, review, sentiment" in err


def test_a_label_outside_the_labels_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_reviews_csv(tmp_path / "reviews.csv")
    argv = ["--kind", "seq-cls", "--data", str(data), "--partition", "iid", "--clients", "2", "--no-dp"]
    argv += ["--text-column", "review", "--label-column", "sentiment", "--labels", "positive,neutral"]
    err = refused(argv, tmp_path, capsys)
    assert "label 'negative' of" in err and "is not in the run's labels ['positive', 'neutral']" in err


@pytest.mark.parametrize("fmt", ["saved", "parquet"])
def test_grey_images_from_a_file_are_accepted_for_the_shipped_vit(fmt: str, tmp_path: Path) -> None:
    """Grey images come out of a data file H x W; the image kind gives them the channel axis the
    model's processor expects (before, every grey dataset was refused)."""
    import datasets  # lazy: pyarrow and pandas, for this test only

    examples = [e for d in ("digits-rotate", "digits-noise") for e in IMAGE_TASKS[d].examples(30, seed=5)]
    if fmt == "saved":  # an Image feature of grey ("L") pictures
        from PIL import Image

        columns: dict[str, list[Any]] = {"picture": [Image.fromarray(e.image[:, :, 0]) for e in examples]}
        features = datasets.Features({"picture": datasets.Image(), "digit": datasets.Value("string")})
    else:  # pixel arrays, H x W x 1 as the digit tasks make them
        columns = {"picture": [e.image.tolist() for e in examples]}
        features = None
    columns["digit"] = [e.label for e in examples]
    ds = datasets.Dataset.from_dict(columns, features=features)
    path = tmp_path / ("digits" if fmt == "saved" else "digits.parquet")
    if fmt == "saved":
        ds.save_to_disk(str(path))
    else:
        ds.to_parquet(str(path))
    config = {
        "model.kind": "image-cls",
        "model.labels": ",".join(LABELS),
        "data-path": str(path),
        "columns.image": "picture",
        "columns.label": "digit",
        "partition.scheme": "iid",
        "num-clients": 2,
        "num-test": 2,
        "dp.enabled": False,
    }
    cfg = validate(config)
    assert check_records(cfg) == 0
    assert np.asarray(examples[0].image).ndim == 3


def test_validating_a_run_imports_neither_peft_nor_opacus_nor_the_model_classes() -> None:
    """fl-sim checks a run (config, split, every record through the tokenizer) before anything
    starts; PEFT, Opacus and transformers' model classes once added ~4 s to every command."""
    import subprocess
    import sys

    code = "import sys; from fedlora.simulations.simulate import validate; import fedlora.core.cli; "
    code += "validate({'num-clients': 4, 'num-train': 16, 'num-test': 4, 'dp.enabled': True}); "
    code += "print(sorted({'peft', 'opacus', 'transformers.modeling_utils'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_ray_cpus_come_from_the_option_then_the_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rich.console import Console

    from fedlora.simulations.simulate import RAY_CPUS_ENV, local_ray_cpus, simulate

    monkeypatch.delenv(RAY_CPUS_ENV, raising=False)
    assert local_ray_cpus(None, None) is None  # every core, Ray's own default
    monkeypatch.setenv(RAY_CPUS_ENV, "3")
    assert local_ray_cpus(None, None) == 3
    assert local_ray_cpus(2, None) == 2  # the option wins
    assert local_ray_cpus(None, "auto") is None  # a cluster has its own CPUs
    with pytest.raises(ValueError, match=r"a Ray cluster \(--ray-address\) has its own CPUs"):
        local_ray_cpus(2, "auto")
    with pytest.raises(ValueError, match="--ray-cpus must be an integer >= 1, got 0"):
        local_ray_cpus(0, None)
    monkeypatch.setenv(RAY_CPUS_ENV, "1")  # refused before anything starts: no run directory
    with pytest.raises(ValueError, match=r"--cpus-per-client 2 is more than the 1 CPU\(s\) Ray may use"):
        simulate({"run-dir": str(tmp_path / "run")}, console=Console(quiet=True), cpus_per_client=2)
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv(RAY_CPUS_ENV, "two")
    with pytest.raises(ValueError, match=r"\$FEDLORA_RAY_CPUS must be an integer >= 1, got 'two'"):
        local_ray_cpus(None, None)
