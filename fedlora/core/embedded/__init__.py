"""The embedded default base model, shipped inside the package (rebuilt by
``python -m fedlora.simulations.pretrain``)."""

from pathlib import Path

MODEL_SUBDIR = "base-model"


def default_model_dir() -> Path:
    """Directory of the embedded base model (a standard Hugging Face model directory)."""
    return Path(__file__).resolve().parent / MODEL_SUBDIR
