"""``image-cls``: an image classifier (PEFT's generic model, the head in ``modules_to_save``);
``pixel_values`` through the model's own image processor; accuracy and macro-F1.

The default base model is the tiny ViT the project pretrains on scikit-learn's digits and ships
(``make pretrain-vision``); the default data the digit domains (one domain per client).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from fedlora.core.data import EncodedImage
from fedlora.core.embedded import default_vision_model_dir
from fedlora.core.image_tasks import DEFAULT_IMAGE_TASKS, IMAGE_TASKS
from fedlora.core.kinds.base import Encoding, ModelKind
from fedlora.core.model_dirs import check_model_dir
from fedlora.core.records import ImageExample, Record

_CHUNK = 256  # images per processor call: bounded memory for large datasets


class ImageClassification(ModelKind):
    name: ClassVar[str] = "image-cls"
    peft_task_type: ClassVar[str | None] = None
    default_tasks: ClassVar[str] = DEFAULT_IMAGE_TASKS

    def default_model_dir(self) -> Path:
        return default_vision_model_dir()

    def task_names(self) -> Sequence[str]:
        return list(IMAGE_TASKS)

    def auto_class(self) -> Any:
        return AutoModelForImageClassification

    def load_processor(self, path: Path) -> Any:
        check_model_dir(path)
        return AutoImageProcessor.from_pretrained(str(path), local_files_only=True)

    def encode(
        self, processor: Any, records: Sequence[Record], labels: Sequence[str], limit: int, truncate: bool
    ) -> Encoding:
        index = {name: i for i, name in enumerate(labels)}
        images: list[ImageExample] = []
        for r in records:
            if not isinstance(r, ImageExample):
                raise TypeError(f"an image classifier trains on image/label records, not {type(r).__name__}")
            if r.label not in index:
                raise ValueError(f"label {r.label!r} of image {r.key} is not in the run's labels {list(labels)}")
            images.append(r)
        channels = _channels(processor)
        items: list[EncodedImage] = []
        for start in range(0, len(images), _CHUNK):
            chunk = images[start : start + _CHUNK]
            arrays = [with_channels(r.image, channels, r.key) for r in chunk]
            pixels = processor(images=arrays, return_tensors="pt")["pixel_values"]
            for r, p in zip(chunk, pixels, strict=True):
                items.append(EncodedImage(p.to(torch.float32).contiguous(), index[r.label]))
        return Encoding(list(items), 0)


def _channels(processor: Any) -> int:
    """How many channels the model takes: as many as its processor normalises (3 when it says nothing)."""
    mean = getattr(processor, "image_mean", None)
    return len(mean) if isinstance(mean, list | tuple) else 3


def with_channels(image: np.ndarray, channels: int, key: str) -> np.ndarray:
    """An H x W x ``channels`` uint8 image: a grey image gets its channel axis (and is repeated for
    an RGB model), an RGB one is reduced to its luminance for a grey model (ITU-R BT.601 weights)."""
    arr = image[:, :, None] if image.ndim == 2 else image
    have = arr.shape[2]
    if have == 4:
        arr, have = arr[:, :, :3], 3  # no alpha
    if have == channels:
        return arr
    if have == 1 and channels == 3:
        return np.repeat(arr, 3, axis=2)
    if have == 3 and channels == 1:
        grey = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        return np.clip(np.rint(grey), 0, 255).astype(np.uint8)[:, :, None]
    raise ValueError(f"image {key} has {have} channels; the model takes {channels}")


KIND = ImageClassification()
