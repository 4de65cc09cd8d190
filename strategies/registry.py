"""The one registry of aggregation methods: name -> algorithm class.

A method is one module in ``strategies/`` (its math, its :class:`LoraAlgorithm` subclass and its
run-config section) plus one ``register`` line below. The server, the clients, the run
configuration and ``fl-sim`` find a method here by name, so nothing else changes when one is
added. No Flower here: validating a run configuration does not load it.
"""

from __future__ import annotations

from typing import Any

from fedlora.strategies.algorithms import LoraAlgorithm
from fedlora.strategies.fedavg_lora import FedAvgLora
from fedlora.strategies.fedex_lora import FedExLora
from fedlora.strategies.fedsvd import FedSvd
from fedlora.strategies.ffa_lora import FfaLora
from fedlora.strategies.flexlora import FlexLora
from fedlora.strategies.lora_fair import LoraFair
from fedlora.strategies.rolora import RoLora

#: every registered method, in registration order
STRATEGIES: dict[str, type[LoraAlgorithm]] = {}


def register(algorithm: type[LoraAlgorithm]) -> type[LoraAlgorithm]:
    """Add a method under its ``name``; a name is registered once (returns the class, so it decorates)."""
    if not (isinstance(algorithm, type) and issubclass(algorithm, LoraAlgorithm)):
        raise TypeError(f"a strategy is a LoraAlgorithm subclass, got {algorithm!r}")
    if algorithm.name in STRATEGIES:
        raise ValueError(f"strategy {algorithm.name!r} is already registered; known strategies: {known()}")
    STRATEGIES[algorithm.name] = algorithm
    return algorithm


def known() -> str:
    """The registered names, comma-separated, for error messages."""
    return ", ".join(STRATEGIES)


def get(name: str) -> type[LoraAlgorithm]:
    """The algorithm class registered as ``name``; ValueError lists the known names."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; known strategies: {known()}") from None


def create(name: str, **kwargs: Any) -> LoraAlgorithm:
    """The method registered as ``name``, built with ``kwargs`` (see :class:`LoraAlgorithm`)."""
    return get(name)(**kwargs)


register(FedAvgLora)
register(FfaLora)
register(LoraFair)
register(FedExLora)
register(RoLora)
register(FedSvd)
register(FlexLora)
