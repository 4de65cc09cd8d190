"""Shared fixtures: the embedded base model, loaded once, on the CPU, one thread, offline."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
if "FEDLORA_HUB_SEEN" not in os.environ:  # the hub versions a test's clients accept: never the user's own record
    os.environ["FEDLORA_HUB_SEEN"] = os.path.join(tempfile.mkdtemp(prefix="fedlora-tests-"), "hub-seen.json")
if "FEDLORA_CACHE_DIR" not in os.environ:  # calibrated noise multipliers: shared by the session's runs, not the user's
    os.environ["FEDLORA_CACHE_DIR"] = tempfile.mkdtemp(prefix="fedlora-cache-")
# one Ray worker per simulation: two pytest workers already keep both cores busy, and each Ray
# worker imports torch and loads the model (~6 s of CPU a run); results do not depend on it
os.environ.setdefault("FEDLORA_RAY_CPUS", "1")

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from fedlora.core.model_dirs import load_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerBase:
    return load_tokenizer()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests first, in file order, then the rest: with pytest-xdist the long real-process
    tests start while the other worker is still free and the many short tests fill the tail.
    The order is the same on every worker (xdist checks it)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
