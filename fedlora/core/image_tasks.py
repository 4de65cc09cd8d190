"""Digit-image domains: an offline miniature of DomainNet's one-domain-per-client setting.

Every domain shows the same ten classes (scikit-learn's bundled 8x8 digits, upscaled to
``IMAGE_SIZE`` x ``IMAGE_SIZE``) through a different transform: rotated, noisy, inverted,
blurred, thicker strokes, ... A model pretrained on the clean domain is clearly worse on the
others, so a LoRA adapter has a domain shift to learn and one domain per client is non-IID in
the input distribution while the label distribution stays the same.

Images are ``uint8`` arrays of shape ``IMAGE_SIZE x IMAGE_SIZE x 1`` (grey, channel last): the
Hugging Face image processors take a list of 3-D arrays but refuse 2-D ones. Examples are
deterministic in (domain, seed, split); train and test draw from disjoint sets of source images,
so no test image is a transform of a digit any client trained on.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fedlora.core.records import ImageExample

IMAGE_SIZE = 16
LABELS: tuple[str, ...] = tuple(str(d) for d in range(10))
TEST_FRACTION = 0.2
_SPLIT_SEED = 1797  # fixes which source images are test images, once for every domain and seed

# A transform maps a clean ``IMAGE_SIZE x IMAGE_SIZE`` float image (0..255, ink bright) and a
# generator to the transformed float image and the text naming its drawn parameters ("" if none).
Transform = Callable[[np.ndarray, np.random.Generator], tuple[np.ndarray, str]]


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1797 source digits upscaled to ``IMAGE_SIZE`` (float, 0..255, read-only) and their classes."""
    # lazy: scipy
    from scipy import ndimage

    # lazy: scikit-learn
    from sklearn.datasets import load_digits

    bunch = load_digits()
    small = np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0)  # (N, 8, 8), 0..16 -> 0..255
    zoom = IMAGE_SIZE / small.shape[1]
    # (N, S, S): bilinear with pixel-area alignment, so the upscaled digit stays centred
    big = ndimage.zoom(small, (1.0, zoom, zoom), order=1, mode="nearest", grid_mode=True)
    big = np.clip(np.round(big), 0.0, 255.0)
    labels = np.asarray(bunch.target, dtype=np.int64)
    big.flags.writeable = False
    labels.flags.writeable = False
    return big, labels


@functools.cache
def split_indices(split: str) -> tuple[int, ...]:
    """Source-image indices of a split: a fixed seeded 80/20 partition of the 1797 digits."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    n = len(_digits()[1])
    order = np.random.default_rng(_SPLIT_SEED).permutation(n)
    n_test = round(n * TEST_FRACTION)
    chosen = order[n_test:] if split == "train" else order[:n_test]
    return tuple(sorted(int(i) for i in chosen))


def _stream_seed(name: str, seed: int, split: str) -> int:
    """A process-independent seed for (domain, seed, split) (``hash`` of a str is salted per process)."""
    digest = hashlib.sha256(f"{name}|{seed}|{split}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


@dataclass(frozen=True)
class ImageTask:
    """One digit domain: a name, the transform it applies and how to draw examples."""

    name: str  # e.g. "digits-rotate"
    family: str  # e.g. "geometric"
    labels: tuple[str, ...]
    descriptions: tuple[str, ...]  # natural-language descriptions of the domain
    held_out: bool  # True when the shipped model never saw this domain in pretraining
    transform: Transform = field(repr=False, compare=False)
    kind: str = "image-cls"

    def examples(self, n: int, seed: int, split: str = "train", tagged: bool = False) -> list[ImageExample]:
        """``n`` examples, deterministic in (domain, seed, split).

        Source images cycle through the split's indices in a fresh shuffled order per pass (so
        classes stay as balanced as the split and ``n`` may exceed the number of sources); each
        example draws its own transform parameters. ``tagged`` exists for the text suite's
        signature and is ignored.
        """
        del tagged
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        images, classes = _digits()
        sources = np.asarray(split_indices(split))
        rng = np.random.default_rng(_stream_seed(self.name, seed, split))
        out: list[ImageExample] = []
        order: np.ndarray = np.empty(0, dtype=np.int64)
        for i in range(n):
            if i % len(sources) == 0:
                order = rng.permutation(sources)
            idx = int(order[i % len(sources)])
            image, params = self.transform(images[idx], rng)
            pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)[:, :, None]  # (S, S, 1)
            key = f"{self.name}:{idx}" + (f":{params}" if params else "")
            out.append(ImageExample(image=pixels, label=LABELS[int(classes[idx])], key=key))
        return out


# --- the transforms: pure functions of (clean image, generator) ---


def _clean(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    return image.copy(), ""


def _invert(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    return 255.0 - image, ""


def _rotate(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Rotation by 25-55 degrees either way: far enough that a clean-only model stumbles,
    short of 90 so a 6 never passes for a 9."""
    # lazy: scipy
    from scipy import ndimage

    angle = int(rng.integers(25, 56)) * int(rng.choice((-1, 1)))
    return ndimage.rotate(image, angle, reshape=False, order=1, mode="constant", cval=0.0), f"rot={angle}"


def _noise(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Additive Gaussian pixel noise with a standard deviation of 50-100 grey levels."""
    sigma = int(rng.integers(50, 101))
    return image + rng.normal(0.0, sigma, size=image.shape), f"sigma={sigma}"


def _blur(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Gaussian blur, 1.2-2.0 pixels: strokes smear into one another and lose contrast."""
    # lazy: scipy
    from scipy import ndimage

    sigma = round(float(rng.uniform(1.2, 2.0)), 2)
    return ndimage.gaussian_filter(image, sigma, mode="constant", cval=0.0), f"blur={sigma}"


def _thick(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Strokes widened by a grey dilation with a 2 or 3 pixel square."""
    # lazy: scipy
    from scipy import ndimage

    width = int(rng.integers(2, 4))
    return ndimage.grey_dilation(image, size=(width, width), mode="constant", cval=0.0), f"width={width}"


def _shift(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """Translation by up to 3 pixels along each axis, zero fill (the digit may touch the border)."""
    # lazy: scipy
    from scipy import ndimage

    dy, dx = (int(v) for v in rng.integers(-3, 4, size=2))
    return ndimage.shift(image, (dy, dx), order=0, mode="constant", cval=0.0), f"dy={dy},dx={dx}"


def _scale(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    """The digit shrunk to 45-70% of its size about the image centre."""
    # lazy: scipy
    from scipy import ndimage

    factor = round(float(rng.uniform(0.45, 0.7)), 2)
    centre = (np.asarray(image.shape, dtype=np.float64) - 1.0) / 2.0
    # output pixel o samples input pixel centre + (o - centre) / factor
    matrix = np.eye(2) / factor
    offset = centre - matrix @ centre
    out = ndimage.affine_transform(image, matrix, offset=offset, order=1, mode="constant", cval=0.0)
    return out, f"scale={factor}"


def _task(name: str, family: str, held_out: bool, transform: Transform, *descriptions: str) -> ImageTask:
    return ImageTask(
        name=name, family=family, labels=LABELS, descriptions=descriptions, held_out=held_out, transform=transform
    )


def _build() -> dict[str, ImageTask]:
    tasks = [
        _task(
            "digits-clean",
            "clean",
            False,
            _clean,
            "clean handwritten digits",
            "grey digit images without any distortion",
            "classify plain handwritten digits",
        ),
        _task(
            "digits-shift",
            "geometric",
            False,
            _shift,
            "handwritten digits shifted off centre",
            "digit images translated by a few pixels",
        ),
        _task(
            "digits-thick",
            "stroke",
            False,
            _thick,
            "handwritten digits drawn with thick strokes",
            "digits written with a broad pen",
            "bold digit images with wide strokes",
        ),
        _task(
            "digits-rotate",
            "geometric",
            True,
            _rotate,
            "handwritten digits rotated by 25 to 55 degrees",
            "tilted digit images",
            "digits turned sideways",
        ),
        _task(
            "digits-scale",
            "geometric",
            True,
            _scale,
            "small handwritten digits in the middle of the image",
            "digit images shrunk to half their size",
        ),
        _task(
            "digits-noise",
            "photometric",
            True,
            _noise,
            "handwritten digits under heavy pixel noise",
            "noisy grainy digit images",
            "digits seen through static",
        ),
        _task(
            "digits-blur",
            "photometric",
            True,
            _blur,
            "blurred handwritten digits",
            "out-of-focus digit images",
            "digits smeared by a gaussian blur",
        ),
        _task(
            "digits-invert",
            "photometric",
            True,
            _invert,
            "dark digits on a bright background",
            "digit images with inverted colours",
            "negative images of handwritten digits",
        ),
    ]
    return {t.name: t for t in tasks}


IMAGE_TASKS: dict[str, ImageTask] = _build()

# One domain per client in federated runs: held out of pretraining and far harder for the
# shipped model than the clean domain (test accuracy 0.09-0.44 against 0.98, see the
# pretraining report), two geometric and two photometric shifts that pull an adapter in
# different directions (inverted contrast most of all). LoRA learns each one alone (0.74-0.94
# after 200 steps), so a federated adapter has something to learn; digits-blur, also held out,
# is left as an unseen domain for evaluation.
DEFAULT_IMAGE_TASKS = "digits-rotate,digits-scale,digits-noise,digits-invert"


def get_image_task(name: str) -> ImageTask:
    """The domain called ``name``, or an error listing the known ones."""
    try:
        return IMAGE_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown image task {name!r}; known image tasks: {', '.join(IMAGE_TASKS)}") from None
