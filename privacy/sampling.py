"""Poisson sampling of DP-SGD batches: the rate q the ledger charges, and the check that refuses a
run whose batches could come out empty. Pure arithmetic, apart from :mod:`fedlora.privacy.dp`, so
that validating a run imports neither Opacus nor torch."""

from __future__ import annotations


def sample_rate(batch_size: int, num_examples: int) -> float:
    """Poisson sampling rate q = expected batch / local examples (at most 1)."""
    if num_examples < 1 or batch_size < 1:
        raise ValueError(f"need batch_size >= 1 and examples >= 1, got {batch_size}, {num_examples}")
    return min(1.0, batch_size / num_examples)


#: largest accepted chance that some Poisson batch of a local run is empty: Opacus then hands the
#: loop a batch of zero examples, which the model's forward cannot take (nothing is charged, but
#: the run is lost), so such a run is refused before it starts
MAX_EMPTY_BATCH_RISK = 1e-4


def empty_batch_risk(q: float, num_examples: int, steps: int) -> float:
    """Chance that at least one of ``steps`` Poisson batches (each example in with probability q) is empty."""
    return float(1 - (1 - (1 - q) ** num_examples) ** steps)


def check_poisson_batches(batch_size: int, num_examples: int, steps: int) -> None:
    """Refuse a DP-SGD run whose Poisson batches could come out empty (see MAX_EMPTY_BATCH_RISK)."""
    risk = empty_batch_risk(sample_rate(batch_size, num_examples), num_examples, steps)
    if risk > MAX_EMPTY_BATCH_RISK:
        safe = smallest_safe_batch(num_examples, steps)
        fix = f"the smallest safe batch size is {safe}" if safe else "no batch size is safe: give this client more data"
        raise ValueError(
            f"batch size {batch_size} is too small for DP-SGD's Poisson batches over {num_examples} examples: "
            f"some of the {steps} steps would draw an empty batch with probability {risk:.2g}, which the training "
            f"loop cannot take; {fix}"
        )


def smallest_safe_batch(num_examples: int, steps: int) -> int | None:
    """The smallest expected batch size whose Poisson batches stay non-empty over ``steps`` steps
    (risk at most MAX_EMPTY_BATCH_RISK); None when even the whole dataset is not."""
    for batch_size in range(1, num_examples + 1):
        if empty_batch_risk(sample_rate(batch_size, num_examples), num_examples, steps) <= MAX_EMPTY_BATCH_RISK:
            return batch_size
    return None
