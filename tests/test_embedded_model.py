"""The embedded base model: loads offline as a standard Hugging Face directory and knows the
seen tasks, but not the held-out ones."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from fedlora.core.data import encode
from fedlora.core.embedded import default_model_dir
from fedlora.core.model import load_base_model
from fedlora.core.tasks import TASKS, seen_tasks
from fedlora.core.train import evaluate

# Documented floors (README): the pretraining report reaches ~1.0 on these families.
SEEN_FLOOR = {"adddigit": 0.9, "copy": 0.9, "repeat": 0.9, "reverse": 0.9, "rotate": 0.9, "upper": 0.9, "sort": 0.8}


@pytest.mark.slow
def test_loads_offline_with_plain_auto_classes() -> None:
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
        "p = sys.argv[1];"
        "m = AutoModelForCausalLM.from_pretrained(p); t = AutoTokenizer.from_pretrained(p);"
        "print(type(m).__name__, sum(x.numel() for x in m.parameters()), len(t), t.eos_token_id)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(default_model_dir())],
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert out[0] == "LlamaForCausalLM"
    assert 700_000 < int(out[1]) < 900_000
    assert out[2:] == ["259", "1"]


def test_shipped_files() -> None:
    d = default_model_dir()
    for f in ("config.json", "model.safetensors", "tokenizer_config.json", "pretrain_report.json"):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 128 and cfg["num_hidden_layers"] == 4


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return load_base_model()


def test_seen_families_above_floor(base: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    per_family: dict[str, list[float]] = {}
    for task in seen_tasks():
        if task.family not in SEEN_FLOOR:
            continue
        data = encode(tokenizer, task.examples(40, seed=123, split="test", tagged=True), 64)
        per_family.setdefault(task.family, []).append(evaluate(base, data, 0).exact_match)
    means = {f: sum(v) / len(v) for f, v in per_family.items()}
    assert set(means) == set(SEEN_FLOOR)
    for fam, floor in SEEN_FLOOR.items():
        assert means[fam] >= floor, f"{fam}: {means[fam]:.2f} < {floor}"


@pytest.mark.parametrize("name", ["caesar-7", "adddigit-4", "rotate-2", "swap"])
def test_held_out_tasks_unknown_to_base(name: str, base: torch.nn.Module, tokenizer: PreTrainedTokenizerBase) -> None:
    data = encode(tokenizer, TASKS[name].examples(100, seed=5, split="test"), 64)
    assert evaluate(base, data, 0).exact_match < 0.1
