"""A classifier's heads (PEFT's ``modules_to_save``) in the global state: validated in replies,
averaged by examples under every strategy, stored in PEFT format, accepted by the hub's checks,
and loaded back with plain PEFT and the kind's Auto class."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import PeftModel
from safetensors.torch import load, save
from transformers import AutoModelForImageClassification

from fedlora.core.adapter_format import read_adapter_dir
from fedlora.core.client_data import client_examples
from fedlora.core.config import FederationConfig, ModelSection
from fedlora.core.data import Encoded, collate, forward
from fedlora.core.embedded import default_vision_model_dir
from fedlora.core.model import get_adapter_state, save_adapter, set_adapter_state
from fedlora.core.run_model import load_run_model
from fedlora.core.train import macro_f1
from fedlora.hub.sdk.manifest import check_adapter_files
from fedlora.strategies import registry
from fedlora.strategies.algorithms import adapter_part, factor_part, head_part
from fedlora.strategies.flower import LoraStrategy

FACTORS = [f"base_model.model.m{i}.lora_{f}.weight" for i in range(2) for f in "AB"]
HEADS = ["base_model.model.classifier.weight", "base_model.model.classifier.bias"]


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.randn((2, 3) if ".lora_A." in k else (4, 2), generator=g) for k in FACTORS}
    out[HEADS[0]] = torch.randn(5, 4, generator=g)
    out[HEADS[1]] = torch.randn(5, generator=g)
    return out


def _reply(node: int, tensors: dict[str, torch.Tensor], n: int) -> Message:
    request = Message(RecordDict(), dst_node_id=node, message_type="train")
    metrics = MetricRecord({"num-examples": n, "lora-scaling": 2.0, "lora-rank": 2})  # FlexLoRA reads both
    content = RecordDict({"metrics": metrics, "arrays": ArrayRecord(tensors)})
    return Message(content, reply_to=request)


def test_state_parts_split_factors_heads_and_deltas() -> None:
    state = _state(0) | {"base_model.model.m0.base_delta": torch.zeros(4, 3)}
    assert sorted(factor_part(state)) == sorted(FACTORS)
    assert sorted(head_part(state)) == sorted(HEADS)
    assert sorted(adapter_part(state)) == sorted(FACTORS + HEADS)


@pytest.mark.parametrize(
    "strategy", ["fedavg-lora", "ffa-lora", "lora-fair", "fedex-lora", "fedsvd", "rolora", "flexlora"]
)
def test_every_strategy_averages_heads_by_examples(strategy: str) -> None:
    algo = registry.create(strategy, scaling=2.0)
    s = LoraStrategy(algo)
    state = algo.initial_state(factor_part(_state(0))) | head_part(_state(0))
    download = algo.download(1, state) | head_part(state)
    assert set(head_part(download)) == set(HEADS)  # clients always get the heads
    spec = algo.reply_spec(1, state)
    replies, sent = [], []
    for node, n in ((1, 10), (2, 30)):
        trained = _state(node)
        tensors = {k: trained[k] for k in spec} | head_part(trained)
        sent.append((tensors, n))
        replies.append(_reply(node, tensors, n))
    new, summary = s.aggregate_train_from(1, replies, state)
    assert new is not None and summary["accepted"] == 2
    for key in HEADS:
        want = (sent[0][0][key].double() * 10 + sent[1][0][key].double() * 30) / 40
        assert torch.allclose(new[key].double(), want, atol=1e-6), key
    # the factors are the method's own business: the same as without heads
    plain = LoraStrategy(registry.create(strategy, scaling=2.0))
    plain_state = factor_part(state) | {k: v for k, v in state.items() if k.endswith(".base_delta")}
    bare = [_reply(m.metadata.dst_node_id, factor_part(t), n) for m, (t, n) in zip(replies, sent, strict=True)]
    new_plain, _ = plain.aggregate_train_from(1, bare, plain_state)
    assert new_plain is not None
    for key in factor_part(new_plain):
        assert torch.equal(new[key], new_plain[key]), key


def test_a_reply_without_its_head_or_with_a_wrong_one_is_rejected() -> None:
    algo = registry.create("fedavg-lora", scaling=2.0)
    s = LoraStrategy(algo)
    state = _state(0)
    good = _state(1)
    missing = {k: v for k, v in good.items() if k != HEADS[0]}
    wrong = good | {HEADS[0]: torch.zeros(6, 4)}
    nan = good | {HEADS[1]: torch.full((5,), float("nan"))}
    _, summary = s.aggregate_train_from(1, [_reply(1, missing, 5), _reply(2, wrong, 5), _reply(3, nan, 5)], state)
    reasons = s.rounds[1].reasons
    assert summary["rejected"] == 3 and summary["accepted"] == 0
    assert "missing tensor(s): base_model.model.classifier.weight" in reasons[1]
    assert "has shape (6, 4), expected (5, 4)" in reasons[2]
    assert "non-finite" in reasons[3]


def test_macro_f1_is_the_mean_of_per_class_f1() -> None:
    predicted = torch.tensor([0, 0, 1, 1, 2, 2])
    target = torch.tensor([0, 1, 1, 1, 2, 0])
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 0 fn 1 -> 0.8; class 2: tp 1 fp 1 fn 0 -> 2/3
    assert macro_f1(predicted, target) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[FederationConfig, Path]:
    cfg = FederationConfig(model=ModelSection(kind="image-cls"), num_clients=4, num_train=40, num_test=10)
    run = load_run_model(cfg, cfg.lora_settings(4, 8.0))
    state = get_adapter_state(run.model)
    g = torch.Generator().manual_seed(5)
    set_adapter_state(run.model, {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items()})
    out = save_adapter(run.model, tmp_path_factory.mktemp("adapter"), default_vision_model_dir())
    return cfg, out


def test_a_classifier_adapter_is_a_plain_peft_directory(vision_run: tuple[FederationConfig, Path]) -> None:
    cfg, out = vision_run
    run = load_run_model(cfg, cfg.lora_settings(4, 8.0))  # a fresh head from the same seed
    ours = get_adapter_state(run.model)
    saved = get_adapter_state(load_run_model(cfg, cfg.lora_settings(4, 8.0)).model)
    assert all(torch.equal(ours[k], saved[k]) for k in ours)  # every party builds the same head
    base = AutoModelForImageClassification.from_pretrained(
        str(default_vision_model_dir()), num_labels=10, local_files_only=True
    )
    loaded = PeftModel.from_pretrained(base, str(out))
    theirs = get_adapter_state(loaded)
    assert sorted(theirs) == sorted(ours) and set(head_part(theirs)) == set(HEADS)
    assert not torch.equal(theirs[HEADS[0]], ours[HEADS[0]])  # the trained head, not a fresh one
    images = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        logits = loaded(pixel_values=images).logits
    assert logits.shape == (3, 10)


def test_the_hub_accepts_heads_named_in_modules_to_save_only(vision_run: tuple[FederationConfig, Path]) -> None:
    _, out = vision_run
    files = read_adapter_dir(out)
    info = check_adapter_files(files)
    assert info.num_parameters > 10 * 64  # factors and the 64 -> 10 head
    weights = load(files["adapter_model.safetensors"])
    sneaky = dict(weights) | {"base_model.model.vit.embeddings.patch_embeddings.projection.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match=r"neither a LoRA factor .* nor part of a module .*modules_to_save"):
        check_adapter_files(files | {"adapter_model.safetensors": save(sneaky)})
    config = json.loads(files["adapter_config.json"])
    config["modules_to_save"] = None
    with pytest.raises(ValueError, match=r"'base_model.model.classifier.*' is neither a LoRA factor"):
        check_adapter_files(files | {"adapter_config.json": json.dumps(config).encode()})


def test_one_forward_serves_every_kind(vision_run: tuple[FederationConfig, Path]) -> None:
    cfg, _ = vision_run
    run = load_run_model(cfg, cfg.lora_settings(4, 8.0))
    items = run.encode(client_examples(cfg, 0)[0][:6]).items
    out = forward(run.model, collate(items, run.pad_id))
    assert out.loss.shape == (6,) and out.predicted is not None and out.target is not None
    assert torch.equal(out.correct, out.predicted == out.target)
    with pytest.raises(ValueError, match="mixes model kinds"):
        collate([items[0], Encoded([1, 2], [1, 2])], 0)


@pytest.mark.parametrize("engine", [None, "opacus"])
def test_a_bfloat16_base_trains_float32_factors_and_heads(engine: str | None) -> None:
    from fedlora.client.private_train import train_private
    from fedlora.core.train import TrainSettings, evaluate, train
    from fedlora.privacy.dp import DPSGDConfig

    cfg = FederationConfig(model=ModelSection(kind="image-cls", dtype="bfloat16"), num_train=64, num_test=16)
    run = load_run_model(cfg, cfg.lora_settings(4, 8.0))
    trained = {p.dtype for p in run.model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in run.model.parameters() if not p.requires_grad}
    assert trained == {torch.float32} and torch.bfloat16 in frozen
    train_ex, test_ex = client_examples(cfg, 0)
    data, test = run.encode(train_ex).items, run.encode(test_ex).items
    before = evaluate(run.model, test, run.pad_id).loss
    settings = TrainSettings(steps=8, lr=3e-3, batch_size=16)
    if engine is None:
        train(run.model, data, settings, run.pad_id)
    else:
        train_private(run.model, data, settings, run.pad_id, DPSGDConfig(0.5, 1.0, engine), seed=0)
    assert evaluate(run.model, test, run.pad_id).loss < before
    assert {v.dtype for v in get_adapter_state(run.model).values()} == {torch.float32}


def test_images_get_the_channels_the_model_takes() -> None:
    from fedlora.core.kinds.image_cls import with_channels

    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert with_channels(grey, 1, "g").shape == (3, 4, 1)
    rgb = with_channels(grey, 3, "g")
    assert rgb.shape == (3, 4, 3) and all(np.array_equal(rgb[:, :, c], grey) for c in range(3))
    assert np.array_equal(with_channels(rgb, 1, "rgb")[:, :, 0], grey)  # equal channels: luminance is the grey
    rgba = np.concatenate([rgb, np.full((3, 4, 1), 255, np.uint8)], axis=2)
    assert with_channels(rgba, 3, "rgba").shape == (3, 4, 3)
    with pytest.raises(ValueError, match="image two has 2 channels; the model takes 3"):
        with_channels(np.zeros((3, 4, 2), np.uint8), 3, "two")


def test_a_causal_lm_reports_token_accuracy_and_perplexity() -> None:
    from fedlora.core.train import evaluate

    cfg = FederationConfig(num_train=8, num_test=8)
    run = load_run_model(cfg, cfg.lora_settings(4, 8.0))
    items = run.encode(client_examples(cfg, 0)[1]).items
    result = evaluate(run.model, items, run.pad_id, batch_size=3)
    out = forward(run.model, collate(items, run.pad_id))
    assert out.tokens is not None and out.token_hits is not None
    tokens = float(out.tokens.sum())
    assert result.metrics["token-accuracy"] == pytest.approx(float(out.token_hits.sum()) / tokens)
    per_token = float((out.loss.detach().double() * out.tokens).sum()) / tokens
    assert result.metrics["perplexity"] == pytest.approx(math.exp(per_token), rel=1e-5)
    assert result.exact_match <= result.metrics["token-accuracy"]  # a whole completion right: each token right
