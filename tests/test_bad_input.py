"""Bad input is refused before any work starts, with a message naming the bad value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.client.cli import main as client_main
from fedlora.client.finetune import FinetuneConfig
from fedlora.core.data import DataSpec, load_jsonl
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import load_base_model, wrap_lora


def test_missing_model_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model directory .*nowhere does not exist"):
        load_base_model(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        FinetuneConfig(data=DataSpec(task="copy"), model_dir=str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, "lora rank must be a positive integer, got 0"),
        ({"alpha": -1.0}, "lora alpha must be > 0, got -1.0"),
        ({"dropout": 1.5}, r"lora dropout must be in \[0, 1\), got 1.5"),
        ({"trainable": "C"}, "lora trainable must be 'both', 'A' or 'B', got 'C'"),
        ({"target_modules": ()}, "target_modules must be non-empty"),
    ],
)
def test_impossible_lora_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LoraSettings(**kwargs)


def test_unknown_target_module_lists_the_real_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown target module\(s\) \['qkv'\]; this model's linear layers: \["):
        wrap_lora(load_base_model(), LoraSettings(target_modules=("q_proj", "qkv")))


def test_config_with_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"lora: unknown key\(s\) \['ranks'\]; allowed: \["):
        FinetuneConfig.from_mapping({"data": {"task": "copy"}, "lora": {"ranks": 4}})
    with pytest.raises(ValueError, match=r"config: unknown key\(s\) \['epochs'\]"):
        FinetuneConfig.from_mapping({"data": {"task": "copy"}, "epochs": 3})
    with pytest.raises(ValueError, match=r"train lr must be a finite number > 0, got -0\.1"):
        FinetuneConfig.from_mapping({"data": {"task": "copy"}, "train": {"lr": -0.1}})
    with pytest.raises(KeyError, match="unknown task 'caesar-0'"):
        FinetuneConfig.from_mapping({"data": {"task": "caesar-0"}})


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", ', "not valid JSON"),
        ('["a", "b"]', "expected an object"),
        ('{"prompt": "a"}', r"missing key\(s\) \['completion'\]"),
        ('{"prompt": "a", "completion": "b", "label": 1}', r"unknown key\(s\) \['label'\]"),
        ('{"prompt": 1, "completion": "b"}', "'prompt' and 'completion' must be strings"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "data.jsonl"
    f.write_text('{"prompt": "x=", "completion": "y"}\n\n' + line + "\n")
    with pytest.raises(ValueError, match=rf"data.jsonl:3: {message}"):
        load_jsonl(f)


def test_good_jsonl_and_split(tmp_path: Path) -> None:
    f = tmp_path / "data.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i}=", "completion": str(i * 2)}) + "\n" for i in range(50)))
    train, test = DataSpec(path=str(f), num_test=10, seed=1).load()
    assert len(train) == 45 and len(test) == 5
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in test})
    assert DataSpec(path=str(f), num_test=10, seed=1).load() == (train, test)


def test_cli_refuses_before_work(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{oops}\n')
    assert client_main(["finetune", "--data", str(bad), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert client_main(["finetune", "--task", "copy", "--rank", "0", "--quiet"]) == 2
    assert "lora rank must be a positive integer, got 0" in capsys.readouterr().err
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"data": {"task": "copy"}, "lora": {"alpha": -2}}))
    assert client_main(["finetune", "--config", str(cfg), "--quiet"]) == 2
    assert "lora alpha must be > 0, got -2" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_finetune_end_to_end(tmp_path: Path) -> None:
    """The installed console script, as a user runs it."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [
            Path(sys.executable).with_name("fl-client"),
            "finetune",
            "--task",
            "adddigit-4",
            "--steps",
            "40",
            "--num-train",
            "500",
            "--device",
            "cpu",
            "--out",
            str(out),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "exact match before" in proc.stdout and "PEFT adapter written to" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["after"]["exact_match"] > metrics["before"]["exact_match"] + 0.5
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["data"]["task"] == "adddigit-4"
