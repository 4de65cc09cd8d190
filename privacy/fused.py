"""A fused DP-SGD step for LoRA (``dp.engine = fused``, work in progress for issue 9).

Instead of Opacus' per-layer grad-sample hooks, every PEFT LoRA layer is tapped once: the input
of ``lora_A`` (after dropout) and of ``lora_B`` in the forward pass, the gradient of ``lora_B``'s
output in the backward pass. From those the ops of :mod:`privacy.kernels` give each example's
squared gradient norm (summed over all layers), then each layer's clipped sum in one GEMM, plus
Gaussian noise: the same private gradient as Opacus' DPOptimizer (clip at C, noise sigma * C,
divide by the expected batch size), with the same accounting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from privacy.kernels import lora_per_sample_grads


@dataclass
class _Tap:
    lora_a: nn.Linear
    lora_b: nn.Linear
    x: Tensor | None = None  # input of lora_A (N, T, d_in)
    u: Tensor | None = None  # input of lora_B (N, T, r)
    g: Tensor | None = None  # gradient of lora_B's output (N, T, d_out), the LoRA scaling included
    handles: list[Any] = field(default_factory=list)


class LoraTaps:
    """Hooks on every LoRA layer of a PEFT model; removed by :meth:`close`."""

    def __init__(self, model: nn.Module) -> None:
        from peft.tuners.lora import Linear as LoraLinear

        self.taps: list[_Tap] = []
        for module in model.modules():
            if not isinstance(module, LoraLinear):
                continue
            for adapter in module.active_adapters:
                lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
                if not isinstance(lora_a, nn.Linear) or not isinstance(lora_b, nn.Linear):
                    raise ValueError(f"{type(module).__name__}: only nn.Linear LoRA factors can be tapped")
                tap = _Tap(lora_a, lora_b)
                tap.handles.append(tap.lora_a.register_forward_hook(self._save_input(tap)))
                tap.handles.append(tap.lora_b.register_forward_hook(self._save_bottleneck(tap)))
                self.taps.append(tap)
        if not self.taps:
            raise ValueError("the model has no LoRA layers to tap")

    @staticmethod
    def _save_input(tap: _Tap) -> Any:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            tap.x = inputs[0].detach()

        return hook

    @staticmethod
    def _save_bottleneck(tap: _Tap) -> Any:
        """lora_B's input, and a hook on its output tensor for the gradient (lighter than a
        module backward hook, which wraps the call in extra autograd nodes)."""

        def save_grad(grad: Tensor) -> None:
            tap.g = grad.detach()

        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            tap.u = inputs[0].detach()
            if output.requires_grad:
                output.register_hook(save_grad)

        return hook

    def close(self) -> None:
        for tap in self.taps:
            for h in tap.handles:
                h.remove()
            tap.handles.clear()


def private_gradients(
    taps: LoraTaps,
    max_grad_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    loss_scale: float,
    seed: int,
) -> None:
    """Replace each trainable LoRA factor's ``.grad`` by the DP-SGD gradient of the last backward.

    ``loss_scale``: what turns the captured gradients into per-example gradients of per-example
    losses (the batch size when the loss was a mean over the batch). Per-example gradients are
    materialised once per layer (small for LoRA), their norms summed over layers, then clipped,
    summed and noised."""
    grads: list[tuple[Tensor | None, Tensor | None]] = []
    norms: Tensor | None = None
    for tap in taps.taps:
        assert tap.x is not None and tap.u is not None and tap.g is not None, "no forward/backward pass was tapped"
        a, b = tap.lora_a.weight, tap.lora_b.weight
        grad_a, grad_b = lora_per_sample_grads(tap.x, tap.u, tap.g * loss_scale, b.detach())
        kept = (grad_a if a.requires_grad else None, grad_b if b.requires_grad else None)
        for gr in kept:
            if gr is not None:
                sq = gr.pow(2).sum((1, 2))
                norms = sq if norms is None else norms + sq
        grads.append(kept)
        tap.x = tap.u = tap.g = None
    assert norms is not None, "no trainable LoRA factor"
    clip = (max_grad_norm / (norms.sqrt() + 1e-6)).clamp(max=1.0)
    std = noise_multiplier * max_grad_norm
    gen = torch.Generator(device=clip.device).manual_seed(seed)
    for tap, kept in zip(taps.taps, grads, strict=True):
        for param, gr in zip((tap.lora_a.weight, tap.lora_b.weight), kept, strict=True):
            if gr is None:
                continue
            total = torch.einsum("n,nij->ij", clip.to(gr.dtype), gr)
            if std > 0:
                total = total + std * torch.randn(total.shape, generator=gen, device=total.device, dtype=total.dtype)
            param.grad = (total / expected_batch_size).to(param.dtype)
