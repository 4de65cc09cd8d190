"""The digit-image domains and the shipped ViT: deterministic, leak-free splits, transforms that
do what their names say, and a model that knows the clean domain but not the default ones."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.datasets import load_digits
from transformers import AutoImageProcessor, AutoModelForImageClassification

from fedlora.core.embedded import default_vision_model_dir
from fedlora.core.image_tasks import (
    DEFAULT_IMAGE_TASKS,
    IMAGE_SIZE,
    IMAGE_TASKS,
    LABELS,
    get_image_task,
    split_indices,
)
from fedlora.core.records import ImageExample

torch.set_num_threads(1)
N_TRAIN_SOURCES = 1438  # 1797 digits less the 20% (359) test sources


def source(ex: ImageExample) -> int:
    return int(ex.key.split(":")[1])


def param(ex: ImageExample) -> str:
    return ex.key.split(":")[2].split("=")[1]


def grey(ex: ImageExample) -> np.ndarray:
    """(S, S) int64 pixels of an example, to compute with."""
    return ex.image[:, :, 0].astype(np.int64)


@pytest.fixture(scope="module")
def clean_by_source() -> dict[int, np.ndarray]:
    """The clean image of every source (train and test), by source index."""
    out: dict[int, np.ndarray] = {}
    task = IMAGE_TASKS["digits-clean"]
    for split, n in (("train", N_TRAIN_SOURCES), ("test", 1797 - N_TRAIN_SOURCES)):
        out.update({source(ex): grey(ex) for ex in task.examples(n, 0, split)})
    assert len(out) == 1797
    return out


def test_suite_shape() -> None:
    assert IMAGE_SIZE == 16 and LABELS == tuple("0123456789")
    assert len(IMAGE_TASKS) >= 6
    for name, task in IMAGE_TASKS.items():
        assert name == task.name and name.startswith("digits-")
        assert task.kind == "image-cls" and task.labels == LABELS
        assert 2 <= len(task.descriptions) <= 3 and len(set(task.descriptions)) == len(task.descriptions)
        ex = task.examples(3, 0)[0]
        assert ex.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 1) and ex.image.dtype == np.uint8
        assert ex.key.startswith(f"{name}:")
    default = DEFAULT_IMAGE_TASKS.split(",")
    assert len(default) == 4 and all(IMAGE_TASKS[n].held_out for n in default)
    assert not IMAGE_TASKS["digits-clean"].held_out
    with pytest.raises(KeyError, match="digits-clean"):
        get_image_task("digits-sepia")


def test_deterministic_in_name_seed_split() -> None:
    task = IMAGE_TASKS["digits-rotate"]
    a, b = task.examples(40, 3), task.examples(40, 3, "train", tagged=True)
    assert [e.key for e in a] == [e.key for e in b]
    assert all(np.array_equal(x.image, y.image) and x.label == y.label for x, y in zip(a, b, strict=True))
    assert [e.key for e in task.examples(40, 4)] != [e.key for e in a]
    # the same seed and split in another domain draws its own sources
    assert [source(e) for e in IMAGE_TASKS["digits-noise"].examples(40, 3)] != [source(e) for e in a]
    assert task.examples(0, 3) == []
    with pytest.raises(ValueError, match="split"):
        task.examples(1, 0, "validation")


def test_train_and_test_sources_are_disjoint() -> None:
    train, test = set(split_indices("train")), set(split_indices("test"))
    assert len(train) == N_TRAIN_SOURCES and len(test) == 359
    assert not train & test and train | test == set(range(1797))
    for task in IMAGE_TASKS.values():
        train_src = {source(e) for e in task.examples(3000, 0, "train")}  # more examples than sources
        test_src = {source(e) for e in task.examples(800, 0, "test")}
        assert train_src == train and test_src == test  # every source used, none across the split


def test_n_beyond_the_sources_cycles_with_fresh_parameters() -> None:
    ex = IMAGE_TASKS["digits-rotate"].examples(2 * N_TRAIN_SOURCES, 1)
    first, second = ex[:N_TRAIN_SOURCES], ex[N_TRAIN_SOURCES:]
    assert sorted(map(source, first)) == sorted(map(source, second)) == list(split_indices("train"))
    assert [source(e) for e in first] != [source(e) for e in second]  # reshuffled per pass
    angles = [int(param(e)) for e in ex]
    assert all(25 <= abs(a) <= 55 for a in angles)
    assert len(set(angles)) > 40 and sum(a < 0 for a in angles) / len(angles) == pytest.approx(0.5, abs=0.05)


def test_labels_are_the_source_digits_and_balanced() -> None:
    target = load_digits().target
    for name in ("digits-clean", "digits-invert"):
        ex = IMAGE_TASKS[name].examples(1000, 2)
        assert all(e.label == str(target[source(e)]) for e in ex)
        counts = Counter(e.label for e in ex)
        assert set(counts) == set(LABELS)
        assert min(counts.values()) >= 80 and max(counts.values()) <= 120


def test_clean_is_the_upscaled_source(clean_by_source: dict[int, np.ndarray]) -> None:
    digits = load_digits().images  # (N, 8, 8), 0..16
    for idx in (0, 5, 1796):
        img = clean_by_source[idx]
        assert img.max() > 200 and img.min() == 0
        # each 2x2 block of the upscaled image averages near its source pixel (0..16 -> 0..255)
        blocks = img.reshape(8, 2, 8, 2).mean(axis=(1, 3))
        assert np.corrcoef(blocks.ravel(), digits[idx].ravel())[0, 1] > 0.95


def test_invert_is_exactly_255_minus_clean(clean_by_source: dict[int, np.ndarray]) -> None:
    for ex in IMAGE_TASKS["digits-invert"].examples(100, 0, "test"):
        assert np.array_equal(grey(ex), 255 - clean_by_source[source(ex)])


def test_shift_moves_the_clean_image(clean_by_source: dict[int, np.ndarray]) -> None:
    moved = 0
    for ex in IMAGE_TASKS["digits-shift"].examples(100, 0):
        dy, dx = (int(p.split("=")[1]) for p in ex.key.split(":")[2].split(","))
        assert max(abs(dy), abs(dx)) <= 3
        clean, want = clean_by_source[source(ex)], np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.int64)
        want[max(dy, 0) : IMAGE_SIZE + min(dy, 0), max(dx, 0) : IMAGE_SIZE + min(dx, 0)] = clean[
            max(-dy, 0) : IMAGE_SIZE + min(-dy, 0), max(-dx, 0) : IMAGE_SIZE + min(-dx, 0)
        ]
        assert np.array_equal(grey(ex), want)
        moved += (dy, dx) != (0, 0)
    assert moved >= 90


def test_thick_only_adds_ink(clean_by_source: dict[int, np.ndarray]) -> None:
    for ex in IMAGE_TASKS["digits-thick"].examples(100, 0):
        thick, clean = grey(ex), clean_by_source[source(ex)]
        assert param(ex) in ("2", "3")
        assert (thick >= clean).all()
        assert (thick > 128).sum() >= 1.2 * (clean > 128).sum()


def test_rotate_noise_blur_scale_change_the_image(clean_by_source: dict[int, np.ndarray]) -> None:
    def pairs(name: str) -> list[tuple[ImageExample, np.ndarray]]:
        return [(e, clean_by_source[source(e)]) for e in IMAGE_TASKS[name].examples(60, 0)]

    for ex, clean in pairs("digits-rotate"):
        assert ex.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 1)
        assert np.abs(grey(ex) - clean).mean() > 15
        # a rotation about the centre keeps most of the ink (corners may clip)
        assert 0.6 < grey(ex).sum() / clean.sum() < 1.1
        want = ndimage.rotate(clean.astype(np.float64), int(param(ex)), reshape=False, order=1, cval=0.0)
        assert np.array_equal(grey(ex), np.clip(np.round(want), 0, 255))
    for ex, clean in pairs("digits-noise"):
        sigma = int(param(ex))
        assert 50 <= sigma <= 100
        assert (grey(ex) != clean).mean() > 0.5
        assert np.abs(grey(ex) - clean).mean() > 20
    contrast = []
    for ex, clean in pairs("digits-blur"):
        sigma = float(param(ex))
        assert 1.2 <= sigma <= 2.0
        assert grey(ex).std() < clean.std() and grey(ex).max() < clean.max()
        contrast.append(grey(ex).std() / clean.std())
        # the key names the transform: the image is reproducible from the source and the key
        want = ndimage.gaussian_filter(clean.astype(np.float64), sigma, mode="constant", cval=0.0)
        assert np.array_equal(grey(ex), np.clip(np.round(want), 0, 255))
    assert np.mean(contrast) < 0.8
    for ex, clean in pairs("digits-scale"):
        rows, cols = np.nonzero(grey(ex) > 64)
        clean_rows, clean_cols = np.nonzero(clean > 64)
        assert np.ptp(rows) < np.ptp(clean_rows) and np.ptp(cols) <= np.ptp(clean_cols)
        assert grey(ex).sum() < 0.7 * clean.sum()


def test_shipped_model_directory() -> None:
    d = default_vision_model_dir()
    names = {p.name for p in d.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "pretrain_report.json"} <= names
    assert sum(p.stat().st_size for p in d.iterdir()) <= 5 * 1024 * 1024
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "vit" and cfg["image_size"] == IMAGE_SIZE and cfg["num_channels"] == 1
    assert [cfg["id2label"][str(i)] for i in range(10)] == list(LABELS)
    report = json.loads((d / "pretrain_report.json").read_text())
    assert not set(report["pretraining_domains"]) & set(DEFAULT_IMAGE_TASKS.split(","))


@pytest.fixture(scope="module")
def vit() -> tuple[torch.nn.Module, object]:
    d = default_vision_model_dir()
    model = AutoModelForImageClassification.from_pretrained(d, local_files_only=True)
    processor = AutoImageProcessor.from_pretrained(d, local_files_only=True)
    return model.eval(), processor


def _accuracy(vit: tuple[torch.nn.Module, object], examples: list[ImageExample]) -> float:
    model, processor = vit
    pixels = processor(images=[ex.image for ex in examples], return_tensors="pt")["pixel_values"]  # type: ignore[operator]
    with torch.no_grad():
        predicted = model(pixel_values=pixels).logits.argmax(-1).tolist()
    return float(np.mean([model.config.id2label[p] == ex.label for p, ex in zip(predicted, examples, strict=True)]))


def test_processor_maps_grey_levels_to_minus_one_one(vit: tuple[torch.nn.Module, object]) -> None:
    _, processor = vit
    batch = IMAGE_TASKS["digits-noise"].examples(8, 0, "test")
    pixels = processor(images=[ex.image for ex in batch], return_tensors="pt")["pixel_values"]  # type: ignore[operator]
    assert pixels.shape == (8, 1, IMAGE_SIZE, IMAGE_SIZE) and pixels.dtype == torch.float32
    want = torch.from_numpy(np.stack([ex.image for ex in batch])).permute(0, 3, 1, 2).double() / 255 * 2 - 1
    torch.testing.assert_close(pixels.double(), want, atol=1e-6, rtol=0)


def test_shipped_model_knows_clean_digits_but_not_the_default_domains(vit: tuple[torch.nn.Module, object]) -> None:
    clean = _accuracy(vit, IMAGE_TASKS["digits-clean"].examples(200, 0, "test"))
    assert clean >= 0.8
    for name in DEFAULT_IMAGE_TASKS.split(","):
        assert _accuracy(vit, IMAGE_TASKS[name].examples(200, 0, "test")) <= clean - 0.3, name
