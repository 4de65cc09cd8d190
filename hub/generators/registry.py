"""The zero-shot generators by method name: a generator is one module plus one line here.

A plain dict with ``register``/``generator_class`` (unknown and duplicate names are refused with
the known ones), and the loader that rebuilds a stored generator through it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from safetensors.torch import load as load_safetensors

from fedlora.hub.generators.base import Generator
from fedlora.hub.generators.cvae import ConvCVAE, CVAESettings
from fedlora.hub.generators.embedding import embedder_from_state
from fedlora.hub.generators.icm_lora import ICMLoRA
from fedlora.hub.generators.library import Layout
from fedlora.hub.generators.sg_lora import SGLoRA
from fedlora.hub.sdk.manifest import GENERATOR_CONFIG_FILE, GENERATOR_FORMAT_VERSION, GENERATOR_WEIGHTS_FILE, BaseModel
from fedlora.hub.sdk.request import check_method

GENERATORS: dict[str, type[Generator]] = {}


def register(cls: type[Generator]) -> type[Generator]:
    """Add a generator under its ``method`` name (one of the methods the hub serves), once."""
    check_method(cls.method)
    if cls.method in GENERATORS:
        raise ValueError(f"generator {cls.method!r} is registered twice")
    GENERATORS[cls.method] = cls
    return cls


def generator_class(method: str) -> type[Generator]:
    check_method(method)
    try:
        return GENERATORS[method]
    except KeyError:
        raise ValueError(f"no generator registered for {method!r} (registered: {', '.join(GENERATORS)})") from None


def load_generator(files: Mapping[str, bytes]) -> Generator:
    """Rebuild a generator from its two files (as stored in a hub or written by train-generator)."""
    for required in (GENERATOR_CONFIG_FILE, GENERATOR_WEIGHTS_FILE):
        if required not in files:
            raise ValueError(f"a generator needs {required}")
    config = json.loads(files[GENERATOR_CONFIG_FILE])
    if config.get("format") != "fedlora-generator" or config.get("format_version") != GENERATOR_FORMAT_VERSION:
        raise ValueError(f"not a fedlora generator of format version {GENERATOR_FORMAT_VERSION}")
    cls = generator_class(str(config.get("method")))
    tensors = load_safetensors(files[GENERATOR_WEIGHTS_FILE])
    settings = CVAESettings(**config["settings"])
    shape = config["cvae"]
    cvae = ConvCVAE(int(shape["length"]), int(shape["seq_channels"]), int(shape["vec_dim"]), settings)
    cvae.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("cvae.")})
    cvae.eval()
    common = {
        "layout": Layout.from_dict(config["layout"]),
        "base_model": BaseModel(**config["base_model"]),
        "experts": config["experts"],
        "embedder": embedder_from_state(config["embedder"]),
        "settings": settings,
        "training": config.get("training", {}),
    }
    arrays = {k[7:]: v for k, v in tensors.items() if k.startswith("arrays.")}
    return cls.restore(common, cvae, arrays, config.get("options", {}))


register(SGLoRA)
register(ICMLoRA)
