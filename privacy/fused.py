"""The fused DP-SGD engine for LoRA (``dp.engine = fused``).

Opacus' grad-sample hooks compute every trainable layer's per-sample gradients in generic
code. Here every PEFT LoRA layer is tapped once instead: the input ``x`` of ``lora_A`` (after
dropout) and the bottleneck ``u`` (the input of ``lora_B``) in the forward pass, the gradients
``g`` of ``lora_B``'s output and ``v`` of ``lora_A``'s in the backward pass (all tensors autograd
computes anyway).
The ops of :mod:`fedlora.privacy.kernels` turn them into each example's gradient norm (summed over all
layers) and each factor's clipped sum. Noise, the division by the expected batch size and the
optimizer step are Opacus' own (:class:`FusedDPOptimizer` is a ``DPOptimizer``): with the same
noise generator both engines release the same adapter up to float rounding, and the ledger
charges the same (sigma, q, steps).

On CPU the per-sample gradients are materialised once (``fedlora::per_sample_linear_grads``;
for LoRA, T >> r makes that cheaper than recomputing them for the sum); on CUDA the norms and
the clipped sum are two Triton kernels that never form a per-sample tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from opacus.optimizers import DPOptimizer
from torch import Tensor, nn

from fedlora.privacy.engines import Attached
from fedlora.privacy.kernels import lora_clipped_noised_sum, lora_per_sample_sq_norms, per_sample_linear_grads
from fedlora.privacy.opacus_engine import BatchSize, check_per_example


@dataclass
class _Tap:
    name: str
    lora_a: nn.Linear
    lora_b: nn.Linear
    x: Tensor | None = None  # input of lora_A (N, T, d_in)
    u: Tensor | None = None  # input of lora_B = output of lora_A (N, T, r)
    g: Tensor | None = None  # gradient of lora_B's output (N, T, d_out), the LoRA scaling included
    v: Tensor | None = None  # gradient of u (N, T, r): g B, taken from autograd (only when A trains)
    handles: list[Any] = field(default_factory=list)

    def clear(self) -> None:
        self.x = self.u = self.g = self.v = None


def _sequences(t: Tensor) -> Tensor:
    """(N, T, features): a layer applied to (N, features) is a sequence of length 1."""
    return t.unsqueeze(1) if t.ndim == 2 else t


class LoraTaps:
    """Forward and gradient taps on every active LoRA factor pair of a PEFT model.

    Refuses a model whose trainable parameters are not all LoRA factors of ``nn.Linear``
    layers (embeddings, DoRA magnitudes, ``modules_to_save``): those need Opacus' engine.
    Removed by :meth:`close`.
    """

    def __init__(self, model: nn.Module) -> None:
        from peft.tuners.lora import Linear as LoraLinear
        from peft.tuners.lora import LoraLayer

        self.taps: list[_Tap] = []
        self.model = model
        self.batch = BatchSize()  # how many examples the model was called on: what a tap's rows must be
        self._batch_hook = model.register_forward_pre_hook(self.batch.record, with_kwargs=True)
        covered: set[int] = set()
        for name, module in model.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            for adapter in module.active_adapters:
                if adapter not in module.lora_A:
                    continue
                variant = getattr(module, "lora_variant", {}).get(adapter)
                if not isinstance(module, LoraLinear) or variant is not None:
                    what = f" with the LoRA variant {type(variant).__name__}" if variant is not None else ""
                    raise ValueError(
                        f"dp.engine = fused handles plain LoRA on linear layers only; {name} is "
                        f"{type(module).__name__}{what} (use dp.engine = opacus)"
                    )
                lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
                assert isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)
                if lora_a.bias is not None or lora_b.bias is not None:
                    raise ValueError(f"dp.engine = fused: {name} has LoRA biases (use dp.engine = opacus)")
                tap = _Tap(name, lora_a, lora_b)
                tap.handles.append(lora_a.register_forward_hook(self._save_input(tap)))
                tap.handles.append(lora_b.register_forward_hook(self._save_bottleneck(tap)))
                self.taps.append(tap)
                covered.update((id(lora_a.weight), id(lora_b.weight)))
        if not self.taps:
            self.close()
            raise ValueError("dp.engine = fused: the model has no LoRA layers")
        others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if others:
            self.close()
            raise ValueError(
                f"dp.engine = fused trains LoRA factors only; these trainable parameters are not: "
                f"{', '.join(others[:5])}{' ...' if len(others) > 5 else ''} (use dp.engine = opacus)"
            )

    @staticmethod
    def _save_input(tap: _Tap) -> Any:
        """lora_A's input, and when A trains, a hook on its output for the gradient v = dL/du."""

        def save_bottleneck_grad(grad: Tensor) -> None:
            tap.v = _sequences(grad.detach())

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if torch.is_grad_enabled():  # not an evaluation pass
                tap.x = _sequences(inputs[0].detach())  # the last forward is the one backpropagated
                if tap.lora_a.weight.requires_grad and output.requires_grad:
                    output.register_hook(save_bottleneck_grad)

        return hook

    @staticmethod
    def _save_bottleneck(tap: _Tap) -> Any:
        """lora_B's input, and a hook on its output tensor for the gradient (lighter than a
        module backward hook, which wraps the call in extra autograd nodes)."""

        def save_grad(grad: Tensor) -> None:
            if tap.g is not None:
                raise RuntimeError(
                    f"dp.engine = fused: {tap.name} got two gradients before one optimizer step (gradient "
                    "accumulation or a layer called twice); per-example gradients need one forward and one "
                    "backward per step (use dp.engine = opacus)"
                )
            tap.g = _sequences(grad.detach())

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if torch.is_grad_enabled():
                if tap.g is not None:
                    raise RuntimeError(
                        f"dp.engine = fused: {tap.name} ran forward again after a backward, before the optimizer "
                        "step (gradient accumulation); per-example gradients need one forward and one backward "
                        "per step (use dp.engine = opacus)"
                    )
                tap.u = _sequences(inputs[0].detach())
                if output.requires_grad:
                    output.register_hook(save_grad)

        return hook

    def clear(self) -> None:
        for tap in self.taps:
            tap.clear()

    def clear_gradients(self) -> None:
        for tap in self.taps:
            tap.g = tap.v = None

    def close(self) -> None:
        self._batch_hook.remove()
        for tap in self.taps:
            for h in tap.handles:
                h.remove()
            tap.handles.clear()
            tap.clear()


def clipped_sums(taps: LoraTaps, max_grad_norm: float) -> dict[Tensor, Tensor]:
    """sum_n c[n] G[n] for every trainable LoRA factor, c[n] = min(1, C / (||G[n]|| + 1e-6)) with
    ||G[n]|| example n's gradient norm over all of them (Opacus' clipping, exactly).

    The loss was the batch mean, so per-example gradients of per-example losses are the tapped
    ones times the batch size N; N is applied to the norms and the sums, never to the large
    tapped tensors."""
    if taps.batch.n is not None:  # a model that folds examples together (OPT's fc1/fc2) would clip per token
        leading = {f"{tap.name}.lora_A.weight": tap.x.shape[0] for tap in taps.taps if tap.x is not None}
        check_per_example(leading, taps.batch.n, taps.model)
    sizes = {tap.x.shape[0] for tap in taps.taps if tap.x is not None}
    if len(sizes) > 1:
        raise RuntimeError(
            f"dp.engine = fused: LoRA layers saw different leading sizes {sorted(sizes)} in one step; the first "
            "dimension of every LoRA layer's input must be the example, or no per-example clipping is possible"
        )
    loss_scale = float(sizes.pop()) if sizes else 0.0
    grads: dict[Tensor, Tensor] = {}  # CPU: each trainable factor's per-sample gradients
    on_gpu: list[_Tap] = []  # CUDA: norms and sums by the Triton kernels, nothing per-sample stored
    norms: Tensor | None = None
    for tap in taps.taps:
        a, b = tap.lora_a.weight, tap.lora_b.weight
        if not (a.requires_grad or b.requires_grad):
            continue
        x, u, g = tap.x, tap.u, tap.g
        if x is None or u is None or g is None:
            raise RuntimeError(f"dp.engine = fused: no forward and backward pass through {tap.name} before the step")
        squares: list[Tensor] = []
        if x.is_cuda:
            sq_a, sq_b = lora_per_sample_sq_norms(x, g, a.detach(), b.detach(), 1.0)
            squares = [sq for p, sq in ((a, sq_a), (b, sq_b)) if p.requires_grad]
            on_gpu.append(tap)
        else:
            if a.requires_grad:
                if tap.v is None:
                    raise RuntimeError(f"dp.engine = fused: no gradient reached {tap.name}'s lora_A")
                grads[a] = per_sample_linear_grads(tap.v, x)
                squares.append(grads[a].pow(2).sum((1, 2)))
            if b.requires_grad:
                grads[b] = per_sample_linear_grads(g, u)
                squares.append(grads[b].pow(2).sum((1, 2)))
        for sq in squares:
            norms = sq if norms is None else norms + sq
    if norms is None:
        raise ValueError("dp.engine = fused: no LoRA factor requires gradients")
    clip = (max_grad_norm / (loss_scale * norms.sqrt() + 1e-6)).clamp(max=1.0)
    weights = clip * loss_scale
    sums = {p: torch.einsum("n,nij->ij", weights.to(gr.dtype), gr).to(p.dtype) for p, gr in grads.items()}
    for tap in on_gpu:
        a, b = tap.lora_a.weight, tap.lora_b.weight
        assert tap.x is not None and tap.g is not None
        sum_a, sum_b = lora_clipped_noised_sum(tap.x, tap.g, a.detach(), b.detach(), 1.0, weights, 0.0, 0)
        for p, total in ((a, sum_a), (b, sum_b)):
            if p.requires_grad:
                sums[p] = total.to(p.dtype)
    return sums


class FusedDPOptimizer(DPOptimizer):
    """Opacus' DPOptimizer with its per-sample gradients replaced by the LoRA taps' clipped sums.

    One forward and one backward of the batch-mean loss (``loss_reduction = "mean"``, as in the
    Opacus engine) per step, or per physical batch with a skipped step between them
    (Opacus' ``signal_skip_step``, see ``fedlora.privacy.dp.ClippedAccumulation``): each skipped
    step clips its examples into ``p.summed_grad``, the real step adds the last ones, the noise
    and the division by the expected batch size."""

    def __init__(self, optimizer: torch.optim.Optimizer, taps: LoraTaps, **kwargs: Any) -> None:
        super().__init__(optimizer, loss_reduction="mean", **kwargs)
        self.taps = taps
        tapped = {id(t.lora_a.weight) for t in taps.taps} | {id(t.lora_b.weight) for t in taps.taps}
        untapped = [p for p in self.params if id(p) not in tapped or not p.requires_grad]
        if untapped:
            raise ValueError(
                f"dp.engine = fused: {len(untapped)} optimizer parameter(s) are not trainable LoRA factors"
            )

    def clip_and_accumulate(self) -> None:
        """Add the tapped examples' clipped gradients to ``p.summed_grad``; the taps are emptied."""
        sums = clipped_sums(self.taps, self.max_grad_norm)
        for p in self.params:
            p.summed_grad = sums[p] if p.summed_grad is None else p.summed_grad + sums[p]
        self.taps.clear()

    def pre_step(self, closure: Any = None) -> bool:
        self.clip_and_accumulate()
        if self._check_skip_next_step():  # a physical batch of a larger logical one: no noise yet
            self._is_last_step_skipped = True
            return False
        self.add_noise()  # Opacus' own: the same generator draws the same noise in the same order
        for p in self.params:
            assert p.grad is not None
            p.grad /= self.expected_batch_size
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if not self._is_last_step_skipped:  # after a skipped step the clipped sum carries on
                p.summed_grad = None
        self.taps.clear_gradients()  # a forward may come before zero_grad; its inputs stay
        self.original_optimizer.zero_grad(set_to_none)


def attach(model: nn.Module) -> Attached:
    """The fused engine on ``model``: taps on its LoRA layers, the model itself is called."""
    taps = LoraTaps(model)

    def make_optimizer(optimizer: torch.optim.Optimizer, settings: dict[str, Any]) -> DPOptimizer:
        return FusedDPOptimizer(optimizer, taps, **settings)

    return Attached(model, make_optimizer, taps.close)
