"""Federated LoRA aggregation: one module per method, one registry, one Flower strategy.

Each method's module (``fedavg_lora``, ``ffa_lora``, ``lora_fair``, ``fedex_lora``, ``rolora``,
``fedsvd``, ``flexlora``) holds its pure math over named tensors, its algorithm object (a
:class:`~fedlora.strategies.algorithms.LoraAlgorithm`) and its run-config section; ``registry``
finds a method by name; ``flower`` is the one Flower strategy that runs any of them. Streaming
accumulators live in ``streaming``, the aggregation-error diagnostic in ``diagnostics``. Only
``flower`` imports Flower, and nothing here does I/O. The math is re-exported below.
"""

from fedlora.strategies.adapter import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    LoraFactors,
    client_proportions,
    delta_weight,
    join_adapter,
    lora_scaling,
    split_adapter,
)
from fedlora.strategies.diagnostics import AggregationError, ErrorSketch, aggregation_error_from_sums
from fedlora.strategies.fedavg_lora import aggregation_error, aggregation_residual, fedavg_lora_aggregate
from fedlora.strategies.fedex_lora import (
    FedExResult,
    apply_base_delta,
    fedex_lora_aggregate,
    fedex_lora_from_sums,
)
from fedlora.strategies.fedsvd import fedsvd_aggregate, fedsvd_from_sums, fedsvd_refactor
from fedlora.strategies.ffa_lora import ffa_lora_aggregate, init_lora_A, module_seed
from fedlora.strategies.flexlora import (
    LowRankDelta,
    flexlora_aggregate,
    flexlora_client_factors,
    flexlora_from_sums,
)
from fedlora.strategies.lora_fair import (
    LoraFairConfig,
    lora_fair_aggregate,
    lora_fair_correction,
    lora_fair_correction_closed_form,
    lora_fair_correction_iterative,
    lora_fair_from_sums,
    lora_fair_objective,
)
from fedlora.strategies.rolora import rolora_accumulator, rolora_aggregate, rolora_trained_factor
from fedlora.strategies.streaming import (
    DeltaSum,
    DeltaSumAccumulator,
    FactorSumAccumulator,
    ProductSumAccumulator,
    ProductSums,
)

__all__ = [
    "LORA_A_SUFFIX",
    "LORA_B_SUFFIX",
    "AggregationError",
    "DeltaSum",
    "DeltaSumAccumulator",
    "ErrorSketch",
    "FactorSumAccumulator",
    "FedExResult",
    "LoraFactors",
    "LoraFairConfig",
    "LowRankDelta",
    "ProductSumAccumulator",
    "ProductSums",
    "aggregation_error",
    "aggregation_error_from_sums",
    "aggregation_residual",
    "apply_base_delta",
    "client_proportions",
    "delta_weight",
    "fedavg_lora_aggregate",
    "fedex_lora_aggregate",
    "fedex_lora_from_sums",
    "fedsvd_aggregate",
    "fedsvd_from_sums",
    "fedsvd_refactor",
    "ffa_lora_aggregate",
    "flexlora_aggregate",
    "flexlora_client_factors",
    "flexlora_from_sums",
    "init_lora_A",
    "join_adapter",
    "lora_fair_aggregate",
    "lora_fair_correction",
    "lora_fair_correction_closed_form",
    "lora_fair_correction_iterative",
    "lora_fair_from_sums",
    "lora_fair_objective",
    "lora_scaling",
    "module_seed",
    "rolora_accumulator",
    "rolora_aggregate",
    "rolora_trained_factor",
    "split_adapter",
]
