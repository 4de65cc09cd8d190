"""The adapter file format: a PEFT directory (``adapter_config.json`` + ``adapter_model.safetensors``),
plus FedEx-LoRA's residual file. One definition for the run directory, batched evaluation, the hub
and its client SDK."""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
BASE_DELTA_FILE = "base_delta.safetensors"  # FedEx-LoRA's residual, folded into the base weights
#: the files an adapter may carry; the first two are PEFT's and required
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE, BASE_DELTA_FILE)


def read_adapter_dir(path: Path) -> dict[str, bytes]:
    """The files of a PEFT directory that an adapter consists of."""
    if not (path / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory (no {CONFIG_FILE})")
    return {name: (path / name).read_bytes() for name in ADAPTER_FILES if (path / name).is_file()}
