"""Memory that scales with real models, checked against the paths it replaces: a causal LM's
logits only at the positions a target needs (the same loss, exact match and per-example
gradients as the full logits, through PEFT, Opacus' hooks and the fused taps), and one logical
batch trained in physical batches (the same update as the whole batch at once, without DP and
under DP-SGD with both engines, at noise 0 with clipping active and with noise from one seed)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedlora.client.private_train import train_private
from fedlora.core.config import FederationConfig, ModelSection
from fedlora.core.data import (
    IGNORE_INDEX,
    EncodedImage,
    Item,
    collate,
    encode,
    exact_matches,
    forward,
    per_sequence_loss,
    physical_batches,
    takes_logits_to_keep,
    target_positions,
)
from fedlora.core.lora_settings import LoraSettings
from fedlora.core.model import get_adapter_state, load_base_model, set_adapter_state, wrap_lora
from fedlora.core.tasks import get_task
from fedlora.core.train import TrainSettings, train, train_in
from fedlora.privacy.dp import DPSGDConfig, dp_sgd
from fedlora.privacy.engines import ENGINES

PAD = 0


@pytest.fixture(scope="module")
def lm() -> PeftModel:
    """The embedded byte Llama in float64 with LoRA r = 2 and non-zero factors (A and B both get
    gradients), so fp64 rounding stays far below the tolerances."""
    model = wrap_lora(load_base_model(dtype=torch.float64), LoraSettings(rank=2))
    g = torch.Generator().manual_seed(0)
    state = get_adapter_state(model)
    set_adapter_state(model, {k: torch.randn(v.shape, generator=g, dtype=v.dtype) * 0.05 for k, v in state.items()})
    return model


@pytest.fixture(scope="module")
def data(tokenizer: PreTrainedTokenizerBase) -> list[Item]:
    """Prompts and completions of different lengths, so the sequences' target positions differ."""
    examples = [*get_task("rotate-2").examples(6, seed=1), *get_task("repeat-3").examples(6, seed=1)]
    return list(encode(tokenizer, examples, 64))


def _full(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


# --- logits only where a target needs them ---------------------------------------------------------


def test_target_positions_hand_computed() -> None:
    x = IGNORE_INDEX
    labels = torch.tensor([[x, x, 5, 6, x], [x, 7, x, x, x], [x, x, x, x, x]])
    # position t predicts token t + 1: row 1 needs t = 0, row 0 needs t = 1, 2
    assert target_positions(labels).tolist() == [0, 1, 2]
    assert target_positions(torch.full((2, 4), x)).numel() == 0


def test_forward_computes_the_head_only_at_target_positions_with_the_same_outputs(
    lm: PeftModel, data: list[Item]
) -> None:
    batch = collate(data, PAD)
    n, width = batch["input_ids"].shape
    positions = target_positions(batch["labels"])
    assert 0 < positions.numel() < width - 1, "the batch must have positions no target needs"
    shapes: list[tuple[int, ...]] = []
    head = lm.get_output_embeddings()
    assert isinstance(head, torch.nn.Linear)
    handle = head.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    try:
        out = forward(lm, batch)
    finally:
        handle.remove()
    assert shapes == [(n, positions.numel(), head.out_features)]
    logits = _full(lm, batch)
    torch.testing.assert_close(out.loss, per_sequence_loss(logits, batch["labels"]), rtol=1e-6, atol=1e-7)
    assert torch.equal(out.correct, exact_matches(logits, batch["labels"]))


def test_forward_gradients_equal_the_full_logits_gradients(lm: PeftModel, data: list[Item]) -> None:
    batch = collate(data, PAD)
    params = [p for p in lm.parameters() if p.requires_grad]
    lm.zero_grad()
    forward(lm, batch).loss.mean().backward()
    kept = [p.grad.clone() for p in params if p.grad is not None]
    lm.zero_grad()
    per_sequence_loss(_full(lm, batch), batch["labels"]).mean().backward()
    full = [p.grad.clone() for p in params if p.grad is not None]
    lm.zero_grad()
    assert len(kept) == len(full) == len(params)
    for a, b in zip(kept, full, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


class _NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward takes no ``logits_to_keep`` (the keyword would raise)."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> Any:
        return self.inner(input_ids=input_ids, attention_mask=attention_mask)


def test_a_model_without_logits_to_keep_gets_every_position(lm: PeftModel, data: list[Item]) -> None:
    plain = _NoLogitsToKeep(lm)
    assert takes_logits_to_keep(lm) and not takes_logits_to_keep(plain)
    batch = collate(data, PAD)
    out = forward(plain, batch)
    logits = _full(lm, batch)
    assert torch.equal(out.loss, per_sequence_loss(logits, batch["labels"]))
    assert torch.equal(out.correct, exact_matches(logits, batch["labels"]))
    nothing = {**batch, "labels": torch.full_like(batch["labels"], IGNORE_INDEX)}  # no target: no positions
    assert torch.equal(forward(lm, nothing).loss, torch.zeros(len(data), dtype=torch.float32))


def test_opacus_per_sample_gradients_equal_the_full_logits_ones(lm: PeftModel, data: list[Item]) -> None:
    model = copy.deepcopy(lm)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=True)
    assert takes_logits_to_keep(gsm)
    batch = collate(data, PAD)
    params = [p for p in gsm.parameters() if p.requires_grad]
    try:
        samples = []
        for loss in (
            lambda: forward(gsm, batch).loss.mean(),
            lambda: per_sequence_loss(_full(gsm, batch), batch["labels"]).mean(),
        ):
            loss().backward()
            samples.append([p.grad_sample.clone() for p in params])
            for p in params:
                p.grad_sample = None
                p.grad = None
    finally:
        gsm._close()
    for a, b in zip(*samples, strict=True):
        assert a.shape[0] == len(data)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
def test_private_step_through_forward_equals_the_full_logits_step(lm: PeftModel, data: list[Item], engine: str) -> None:
    """One DP-SGD step (noise 0, clipping active) through ``forward`` and through full logits:
    Opacus' hooks and the fused taps see the same per-example gradients either way."""

    def step(loss_of: Any) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(lm)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        before = {n: p.detach().clone() for n, p in params.items()}
        opt = torch.optim.SGD(list(params.values()), lr=1.0)
        config = DPSGDConfig(noise_multiplier=0.0, max_grad_norm=0.05, engine=engine)
        with dp_sgd(model, opt, data, lambda b: collate(b, PAD), len(data), config, seed=0) as pt:
            batch = next(pt.batches)
            pt.optimizer.zero_grad()
            loss_of(pt.model, batch).backward()
            pt.optimizer.step()
        return {n: before[n] - p.detach() for n, p in params.items()}

    kept = step(lambda m, b: forward(m, b).loss.mean())
    full = step(lambda m, b: per_sequence_loss(_full(m, b), b["labels"]).mean())
    assert kept.keys() == full.keys() and kept
    for name in kept:
        torch.testing.assert_close(kept[name], full[name], rtol=1e-5, atol=1e-10)


# --- physical batches ------------------------------------------------------------------------------


def test_physical_batches_split_in_order_and_cut_their_own_padding(data: list[Item]) -> None:
    batch = collate(data, PAD)
    for whole in (0, len(data), len(data) + 1):
        (same,) = physical_batches(batch, whole)
        assert same is batch
    parts = physical_batches(batch, 5)
    assert [len(p["input_ids"]) for p in parts] == [5, 5, 2]
    padding = {"input_ids": PAD, "attention_mask": 0, "labels": IGNORE_INDEX}
    start = 0
    for part in parts:
        n, width = part["input_ids"].shape
        assert width == int(batch["attention_mask"][start : start + n].sum(dim=1).max())  # its longest
        assert part.keys() == batch.keys()
        for key, value in part.items():
            rows = batch[key][start : start + n]
            assert torch.equal(value, rows[:, :width])
            assert bool((rows[:, width:] == padding[key]).all()), "only padding is cut"
        start += n
    labelled = {"pixel_values": torch.randn(5, 1, 4, 4), "label": torch.arange(5)}
    assert [p["label"].tolist() for p in physical_batches(labelled, 2)] == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="physical batch size must be >= 0"):
        physical_batches(batch, -1)


def test_train_settings_refuse_a_negative_physical_batch() -> None:
    with pytest.raises(ValueError, match="physical_batch_size must be an integer >= 0"):
        TrainSettings(physical_batch_size=-1)


class _BatchSizes:
    """Records the number of examples of every training forward (the physical batches)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.sizes: list[int] = []
        self.handle = model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        first = kwargs.get("input_ids", kwargs.get("pixel_values", args[0] if args else None))
        if torch.is_grad_enabled() and first is not None:
            self.sizes.append(int(first.shape[0]))


def _trained(model: PeftModel, run: Any) -> tuple[dict[str, torch.Tensor], list[int], Any]:
    """``run`` on a copy of ``model``: (adapter state after it, sizes of the training forwards,
    what ``run`` returned)."""
    model = copy.deepcopy(model)
    seen = _BatchSizes(model)
    out = run(model)
    seen.handle.remove()
    return {k: v.clone() for k, v in get_adapter_state(model).items()}, seen.sizes, out


def test_plain_training_in_physical_batches_equals_the_whole_batch(lm: PeftModel, data: list[Item]) -> None:
    runs = {}
    for physical in (0, 5):
        settings = TrainSettings(steps=3, lr=1e-2, batch_size=12, physical_batch_size=physical, max_grad_norm=0.1)
        runs[physical] = _trained(lm, lambda m, s=settings: train(m, data, s, PAD))
    assert runs[0][1] == [12] * 3 and runs[5][1] == [5, 5, 2] * 3
    start = get_adapter_state(lm)
    for key, value in runs[0][0].items():
        assert not torch.equal(value, start[key]), "the adapter must have trained"
        torch.testing.assert_close(runs[5][0][key], value, rtol=1e-9, atol=1e-12)
    assert runs[5][2].losses == pytest.approx(runs[0][2].losses, rel=1e-6)


def _private_sgd(
    model: torch.nn.Module, data: list[Any], settings: TrainSettings, pad: int, dp: DPSGDConfig, seed: int
) -> None:
    """``train_private`` with SGD instead of AdamW: each update is the released gradient times
    the learning rate, so the comparison sees the privatised gradients themselves."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=settings.lr)
    with dp_sgd(model, opt, data, lambda b: collate(b, pad), settings.batch_size, dp, seed) as pt:
        train_in(pt, data, settings, pad)


def _assert_same_states(chunked: dict[str, torch.Tensor], whole: dict[str, torch.Tensor], start: Any) -> None:
    assert chunked.keys() == whole.keys() and whole
    for key, value in whole.items():
        assert not torch.equal(value, start[key]), "the adapter must have trained"
        torch.testing.assert_close(chunked[key] - start[key], value - start[key], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_dp_sgd_in_physical_batches_equals_the_whole_poisson_batch(
    lm: PeftModel, data: list[Item], engine: str, noise: float
) -> None:
    """Same seed: the same Poisson batches and the same noise draws; clipping is active (C small),
    so each physical batch's examples must be clipped before they are summed. The per-example
    losses are float32 (see ``forward``), hence float32-level agreement."""
    dp = DPSGDConfig(noise_multiplier=noise, max_grad_norm=0.05, engine=engine)
    runs = {}
    for physical in (0, 2):
        settings = TrainSettings(steps=3, lr=0.5, batch_size=6, physical_batch_size=physical, max_grad_norm=None)
        runs[physical] = _trained(lm, lambda m, s=settings: _private_sgd(m, data, s, PAD, dp, seed=11))
    whole, split = runs[0][1], runs[2][1]
    assert len(whole) == 3 and max(split) <= 2 and sum(split) == sum(whole) and len(split) > 3
    _assert_same_states(runs[2][0], runs[0][0], get_adapter_state(lm))


def test_train_private_passes_physical_batches_to_dp_sgd(lm: PeftModel, data: list[Item]) -> None:
    """The client's entry point (AdamW): the same adapter in physical batches of 2 as whole."""
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=0.05)
    states = {}
    for physical in (0, 2):
        settings = TrainSettings(steps=2, lr=1e-3, batch_size=6, physical_batch_size=physical, max_grad_norm=None)
        states[physical] = _trained(lm, lambda m, s=settings: train_private(m, data, s, PAD, dp, seed=3))[0]
    start = get_adapter_state(lm)
    for key, value in states[0].items():  # Adam divides by sqrt(v): compare against the step size
        torch.testing.assert_close(states[2][key] - start[key], value - start[key], rtol=0, atol=1e-3 * 1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["seq-cls", "image-cls"])
def test_classifiers_in_physical_batches_equal_the_whole_batch_under_dp(kind: str) -> None:
    """The classifier kinds (a head trained in full: Opacus' engine) split the same way; MiniLM's
    texts are cut to each physical batch's own longest one (dropout off: its masks depend on the
    batch's shape, so a split batch draws others, as any two runs do)."""
    from fedlora.core.client_data import client_examples
    from fedlora.core.run_model import load_run_model

    cfg = FederationConfig(model=ModelSection(kind=kind), num_clients=4, num_train=16, num_test=1)
    run_model = load_run_model(cfg, LoraSettings(rank=2))
    items = run_model.encode(client_examples(cfg, 0)[0]).items
    items = [EncodedImage(e.pixel_values.double(), e.label) if isinstance(e, EncodedImage) else e for e in items]
    model = run_model.model.double()
    for module in model.modules():  # MiniLM's dropout draws different masks for other batch shapes
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    dp = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=0.05)
    states = {}
    for physical in (0, 3):
        settings = TrainSettings(steps=2, lr=0.5, batch_size=8, physical_batch_size=physical, max_grad_norm=None)
        states[physical] = _trained(model, lambda m, s=settings: _private_sgd(m, items, s, run_model.pad_id, dp, 5))[0]
    _assert_same_states(states[3], states[0], get_adapter_state(model))
