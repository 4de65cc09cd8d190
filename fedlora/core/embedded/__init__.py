"""The embedded default models, shipped inside the package: the byte-level base model (rebuilt by
``python -m fedlora.simulations.pretrain``) and the digit-image ViT (rebuilt by
``python -m fedlora.simulations.pretrain_vision``)."""

from pathlib import Path

MODEL_SUBDIR = "base-model"
VISION_SUBDIR = "vit-digits"


def default_model_dir() -> Path:
    """Directory of the embedded base model (a standard Hugging Face model directory)."""
    return Path(__file__).resolve().parent / MODEL_SUBDIR


def default_vision_model_dir() -> Path:
    """Directory of the embedded vision model, a ViT image classifier with its image processor."""
    return Path(__file__).resolve().parent / VISION_SUBDIR
