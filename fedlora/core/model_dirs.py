"""Local Hugging Face model directories: the check that one is there, and its tokenizer. Kept
apart from :mod:`fedlora.core.model` so that validating a run (which reads the tokenizer) never
imports PEFT or the model classes, seconds of start-up for every command."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from fedlora.core.embedded import default_model_dir


def check_model_dir(path: Path) -> None:
    """Refuse a path that is not a local Hugging Face model directory, naming what is missing."""
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"model directory {path} has no config.json (not a Hugging Face model)")


def load_tokenizer(model_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    path = Path(model_dir) if model_dir is not None else default_model_dir()
    check_model_dir(path)
    tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok
