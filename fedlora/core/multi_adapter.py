"""Many LoRA adapters over one base model in one batch: each sequence runs through its own
adapter (personal adapters of a simulation, candidates pulled from the hub).

Every adapted ``nn.Linear`` of the base model is swapped for :class:`GatheredLinear`, which adds
``s_i (x A_i^T) B_i^T`` for sequence ``i``'s adapter with the custom op
``fedlora::lora_gathered`` (a PyTorch implementation; a Triton kernel on CUDA). Adapters may
differ in rank, alpha and target modules: ranks are zero-padded to the largest, each adapter's
scaling is folded into its B, and a module an adapter does not adapt gets zeros. The base
model is shared, so K adapters cost one forward per batch instead of K evaluation loops.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor, nn

from fedlora.core.adapter_format import BASE_DELTA_FILE, CONFIG_FILE, WEIGHTS_FILE
from fedlora.core.data import Encoded, collate, exact_matches, per_sequence_loss
from fedlora.core.train import EvalResult
from fedlora.privacy.kernels import load_triton
from fedlora.strategies.adapter import LORA_A_SUFFIX, lora_scaling, split_adapter
from fedlora.strategies.algorithms import BASE_DELTA_SUFFIX, base_deltas

#: what PEFT puts in front of the base model's module names in an adapter's tensor names
PEFT_PREFIX = "base_model.model."


def check_gathered(x: Tensor, bank_a: Tensor, bank_b: Tensor, index: Tensor) -> None:
    """The shapes ``fedlora::lora_gathered`` takes (every implementation checks them)."""
    if x.ndim != 3 or bank_a.ndim != 3 or bank_b.ndim != 3 or bank_a.shape[0] != bank_b.shape[0]:
        raise ValueError(
            f"need x (N, T, d_in), banks (K, r, d_in) and (K, d_out, r); got {tuple(x.shape)}, "
            f"{tuple(bank_a.shape)}, {tuple(bank_b.shape)}"
        )
    if bank_a.shape[2] != x.shape[2] or bank_b.shape[2] != bank_a.shape[1]:
        raise ValueError(f"banks {tuple(bank_a.shape)}, {tuple(bank_b.shape)} do not fit x {tuple(x.shape)}")
    if index.shape != (x.shape[0],):
        raise ValueError(f"index must give one adapter per sequence ({x.shape[0]},), got {tuple(index.shape)}")


@torch.library.custom_op("fedlora::lora_gathered", mutates_args=())
def lora_gathered(x: Tensor, bank_a: Tensor, bank_b: Tensor, index: Tensor, scaling: float) -> Tensor:
    """s (x[n] A[index[n]]^T) B[index[n]]^T for every sequence n: (N, T, d_out).

    x (N, T, d_in), bank_a (K, r, d_in), bank_b (K, d_out, r), index (N,) of adapters in [0, K)."""
    check_gathered(x, bank_a, bank_b, index)
    a = bank_a[index]  # (N, r, d_in)
    b = bank_b[index]  # (N, d_out, r)
    return scaling * torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))


@lora_gathered.register_fake
def _(x: Tensor, bank_a: Tensor, bank_b: Tensor, index: Tensor, scaling: float) -> Tensor:
    return x.new_empty(x.shape[0], x.shape[1], bank_b.shape[1])


class _Selection:
    """Which adapter each sequence of the current batch uses (shared by every layer)."""

    index: Tensor | None = None


class GatheredLinear(nn.Module):
    """``base(x) + s_i (x A_i^T) B_i^T`` with ``i`` the adapter of x's sequence."""

    def __init__(self, base: nn.Linear, bank_a: Tensor, bank_b: Tensor, selection: _Selection) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("bank_a", bank_a)
        self.register_buffer("bank_b", bank_b)
        self.selection = selection

    def forward(self, x: Tensor) -> Tensor:
        index = self.selection.index
        if index is None:
            raise RuntimeError("no adapter index set: call AdapterBank.logits")
        x3 = x.unsqueeze(1) if x.ndim == 2 else x
        delta = lora_gathered(x3, self.bank_a, self.bank_b, index, 1.0)
        return self.base(x) + delta.view(*x.shape[:-1], delta.shape[-1])


#: LoRA-variant fields of PEFT's LoraConfig, for PEFT versions before it tagged them itself (0.20)
KNOWN_VARIANT_FIELDS = (
    "use_dora", "alora_invocation_tokens", "kasa_config", "velora_config", "use_bdlora", "arrow_config",
    "monteclora_config",
)  # fmt: skip


def lora_variants(config: Mapping[str, Any]) -> list[str]:
    """The PEFT LoRA variants (DoRA, KaSA, aLoRA, ...) an adapter config asks for: the fields PEFT
    tags as variants (read from PEFT itself, so newer ones are caught too) and the known ones. A
    field counts as PEFT counts it: a sub-config, even empty, or a true value."""
    from peft import LoraConfig

    fields = set(KNOWN_VARIANT_FIELDS)
    mica = {"mica"}
    for f in dataclasses.fields(LoraConfig):
        if f.name == "init_lora_weights":
            mica |= set(f.metadata.get("lora_variants", ()))
        elif f.metadata.get("is_lora_variant"):
            fields.add(f.name)
    found = sorted(f for f in fields if isinstance(config.get(f), dict) or bool(config.get(f)))
    if config.get("init_lora_weights") in mica:
        found.append(f"init_lora_weights={config['init_lora_weights']}")
    return found


def _scalings(config: Mapping[str, Any], flat: Mapping[str, Tensor]) -> dict[str, float]:
    """Each module's LoRA scaling, as PEFT computes it: alpha (``alpha_pattern`` matched on the
    base model's module name) over the module's rank (its A's rows; sqrt with rsLoRA)."""
    alpha = float(config.get("lora_alpha", config["r"]))
    alphas = config.get("alpha_pattern") or {}
    rslora = bool(config.get("use_rslora", False))
    out = {}
    for key, tensor in flat.items():
        if key.endswith(LORA_A_SUFFIX):
            module = key[: -len(LORA_A_SUFFIX)]
            pattern = get_pattern_key(list(alphas), module.removeprefix(PEFT_PREFIX))
            out[module] = lora_scaling(float(alphas.get(pattern, alpha)), int(tensor.shape[0]), use_rslora=rslora)
    return out


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter: module name (in the base model) -> (A, B with its scaling folded in)."""

    name: str
    factors: dict[str, tuple[Tensor, Tensor]]
    base_delta: bytes | None

    @classmethod
    def from_files(cls, name: str, files: Mapping[str, bytes]) -> LoadedAdapter:
        """From a PEFT directory's files (``fedlora.core.adapter_format.read_adapter_dir``, or what the hub returns)."""
        if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
            raise ValueError(f"adapter {name}: a PEFT adapter needs {CONFIG_FILE} and {WEIGHTS_FILE}")
        try:
            config = json.loads(files[CONFIG_FILE])
            if not isinstance(config, dict) or config.get("peft_type", "LORA") != "LORA":
                raise ValueError(f"{CONFIG_FILE} does not describe a LoRA adapter")
            variants = lora_variants(config)
            if variants:
                raise ValueError(f"uses the PEFT LoRA variant(s) {', '.join(variants)}; only plain LoRA is batched")
            flat = load_safetensors(files[WEIGHTS_FILE])
            split = split_adapter(flat, _scalings(config, flat))
            residual = files.get(BASE_DELTA_FILE)
            if residual is not None:
                keys = list(load_safetensors(residual))
                strays = [k for k in keys if not k.endswith(BASE_DELTA_SUFFIX)]
                if not keys or strays:
                    raise ValueError(
                        f"{BASE_DELTA_FILE} must hold <module>{BASE_DELTA_SUFFIX} tensors, got {(strays or keys)[:3]}"
                    )
        except (ValueError, KeyError, SafetensorError) as err:
            raise ValueError(f"adapter {name}: {err}") from None
        factors = {m.removeprefix(PEFT_PREFIX): (f.A.float(), f.B.float() * f.scaling) for m, f in split.items()}
        return cls(name, factors, residual)


def _linear(modules: Mapping[str, nn.Module], name: str, adapter: str) -> nn.Linear:
    module = modules.get(name)
    if not isinstance(module, nn.Linear):
        raise ValueError(
            f"adapter {adapter}: the base model has no linear layer {name!r} (found "
            f"{type(module).__name__ if module is not None else 'nothing'}; another base model?)"
        )
    return module


def _residual(adapter: LoadedAdapter) -> dict[str, Tensor]:
    """The adapter's FedEx-LoRA residual by base-model module name (empty without one)."""
    if adapter.base_delta is None:
        return {}
    return {k.removeprefix(PEFT_PREFIX): v for k, v in base_deltas(load_safetensors(adapter.base_delta)).items()}


def check_fits(model: nn.Module, adapter: LoadedAdapter) -> None:
    """Refuse, naming the module, an adapter (or its residual) that does not fit ``model``."""
    modules = dict(model.named_modules())
    for name, (a, b) in sorted(adapter.factors.items()):
        linear = _linear(modules, name, adapter.name)
        if a.shape[1] != linear.in_features or b.shape[0] != linear.out_features:
            raise ValueError(
                f"adapter {adapter.name}: {name} is {linear.in_features} -> {linear.out_features} in the base "
                f"model, the adapter's factors are {tuple(a.shape)}, {tuple(b.shape)} (another base model?)"
            )
    for name, value in _residual(adapter).items():
        weight = _linear(modules, name, adapter.name).weight
        if value.shape != weight.shape:
            raise ValueError(
                f"adapter {adapter.name}: the residual of {name} is {tuple(value.shape)}, the base weight "
                f"{tuple(weight.shape)} (another base model?)"
            )


class AdapterBank:
    """Adapters installed side by side on a base model, as a context manager (restored on exit).

    They must share their FedEx-LoRA residual (the base weights); :func:`evaluate_many` groups
    adapters by it."""

    def __init__(self, model: nn.Module, adapters: Sequence[LoadedAdapter]) -> None:
        if not adapters:
            raise ValueError("no adapters to evaluate")
        if len({a.base_delta for a in adapters}) > 1:
            raise ValueError(
                "the adapters were trained on different base weights (different FedEx-LoRA residuals in "
                f"{BASE_DELTA_FILE}): evaluate_many groups them"
            )
        for adapter in adapters:
            check_fits(model, adapter)
        self.model = model
        self.adapters = list(adapters)
        self.selection = _Selection()
        self._swapped: list[tuple[nn.Module, str, nn.Linear]] = []
        self._pristine: dict[str, Tensor] = {}
        modules = dict(model.named_modules())
        for name, value in _residual(adapters[0]).items():  # fold the shared residual in until exit
            weight = _linear(modules, name, adapters[0].name).weight
            self._pristine[name] = weight.detach().clone()
            with torch.no_grad():
                weight.add_(value.to(weight.dtype))
        for name in sorted({m for a in adapters for m in a.factors}):
            linear = _linear(modules, name, adapters[0].name)
            rank = max(a.factors[name][0].shape[0] for a in adapters if name in a.factors)
            w = linear.weight
            bank_a = torch.zeros(len(adapters), rank, linear.in_features, device=w.device, dtype=w.dtype)
            bank_b = torch.zeros(len(adapters), linear.out_features, rank, device=w.device, dtype=w.dtype)
            for k, adapter in enumerate(adapters):
                if name in adapter.factors:
                    a, b = adapter.factors[name]
                    bank_a[k, : a.shape[0]] = a
                    bank_b[k, :, : b.shape[1]] = b
            parent_name, _, child = name.rpartition(".")
            parent = modules[parent_name] if parent_name else model
            setattr(parent, child, GatheredLinear(linear, bank_a, bank_b, self.selection))
            self._swapped.append((parent, child, linear))

    def __enter__(self) -> AdapterBank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def logits(self, input_ids: Tensor, attention_mask: Tensor, index: Tensor) -> Tensor:
        """The logits of each sequence under its own adapter (``index[n]``, in adapter order)."""
        if index.min() < 0 or index.max() >= len(self.adapters):
            raise ValueError(f"adapter index out of range [0, {len(self.adapters)})")
        self.selection.index = index.to(input_ids.device)
        try:
            out: Tensor = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            return out
        finally:
            self.selection.index = None

    def close(self) -> None:
        for parent, child, linear in reversed(self._swapped):
            setattr(parent, child, linear)
        self._swapped.clear()
        modules = dict(self.model.named_modules())
        for name, weight in self._pristine.items():
            with torch.no_grad():
                _linear(modules, name, "restore").weight.copy_(weight)
        self._pristine.clear()


@torch.no_grad()
def evaluate_many(
    model: nn.Module,
    adapters: Sequence[LoadedAdapter],
    jobs: Sequence[tuple[int, Sequence[Encoded]]],
    pad_id: int,
    batch_size: int = 64,
) -> list[EvalResult]:
    """Loss and exact match of adapter ``k`` on ``data`` for every job ``(k, data)``, all jobs'
    sequences mixed into shared batches (sorted by length, so little is padded); adapters over
    different FedEx-LoRA residuals are evaluated in one bank per residual.

    The same numbers as loading each adapter with PEFT and calling :func:`fedlora.core.train.evaluate`."""
    for j, (k, _) in enumerate(jobs):
        if not 0 <= k < len(adapters):
            raise ValueError(f"job {j} names adapter {k}; there are {len(adapters)}")
    groups: dict[bytes | None, list[int]] = {}  # one bank per FedEx-LoRA residual (base weights)
    for k, adapter in enumerate(adapters):
        groups.setdefault(adapter.base_delta, []).append(k)
    loss = torch.zeros(len(jobs), dtype=torch.float64)
    hits = torch.zeros(len(jobs), dtype=torch.long)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for members in groups.values():
            slot = {k: i for i, k in enumerate(members)}  # adapter -> its place in this bank
            pairs = [(j, slot[k], e) for j, (k, data) in enumerate(jobs) if k in slot for e in data]
            pairs.sort(key=lambda p: len(p[2].input_ids))
            with AdapterBank(model, [adapters[k] for k in members]) as bank:
                for i in range(0, len(pairs), batch_size):
                    chunk = pairs[i : i + batch_size]
                    batch = {k: v.to(device) for k, v in collate([p[2] for p in chunk], pad_id).items()}
                    index = torch.tensor([p[1] for p in chunk], device=device)
                    logits = bank.logits(batch["input_ids"], batch["attention_mask"], index)
                    job = torch.tensor([p[0] for p in chunk])
                    loss.index_add_(0, job, per_sequence_loss(logits, batch["labels"]).double().cpu())
                    hits.index_add_(0, job, exact_matches(logits, batch["labels"]).long().cpu())
    finally:
        model.train(was_training)
    out = []
    for j, (_, data) in enumerate(jobs):
        n = len(data)
        out.append(EvalResult(float(loss[j]) / n if n else math.nan, int(hits[j]) / n if n else 0.0, n))
    return out


load_triton("fedlora.core.multi_adapter_triton")
