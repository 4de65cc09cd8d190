"""Epsilon as Opacus itself computes it, step by step: the golden reference of the privacy tests."""

from __future__ import annotations

from collections.abc import Sequence

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant


def opacus_reference(steps: Sequence[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Epsilon as an Opacus training loop would report it: one ``step()`` per DP-SGD step."""
    acc: IAccountant = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for sigma, q, n in steps:
        for _ in range(n):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return float(acc.get_epsilon(delta))
