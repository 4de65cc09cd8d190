"""The split a run directory records stays the split this code computes: golden digests of every
client's train and test examples, taken with the code before the model kinds existed (and its
data readers), for the embedded suite and a user's JSONL file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from fedlora.core.client_data import build_partition, client_examples
from fedlora.core.config import FederationConfig, PartitionSection
from fedlora.core.records import Example

GOLDEN = {
    "embedded-tasks-per-client": "d528c9bf0e6bc052cead8b72a1103677b85581670687e80cd7bacad00b5983ff",
    "embedded-dirichlet-skew": "15f65024706584a83fb97db146df61bcb116a89d356a7203123bf956595b1788",
    "file-dirichlet": "4bb65519d1290d1eaf1b1e6b4415ec1366ed2b40d9ebc293e628d231adf9a726",
}


def _digest(cfg: FederationConfig) -> str:
    split = build_partition(cfg)
    assert split is not None
    parts = [json.dumps(split.summary(), sort_keys=True)]
    for c in range(cfg.num_clients):
        train, test = client_examples(cfg, c)
        assert all(isinstance(e, Example) for e in train + test)
        parts.append(json.dumps([[e.prompt, e.completion] for e in train + test if isinstance(e, Example)]))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _configs(data: Path) -> dict[str, FederationConfig]:
    rows = [{"prompt": f"{i}:", "completion": "abcdef"[i % 6], "task": f"t{i % 3}"} for i in range(90)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "embedded-tasks-per-client": FederationConfig(
            num_clients=4, num_train=50, num_test=10, tasks="adddigit-4,rotate-2,repeat-3,sort-desc"
        ),
        "embedded-dirichlet-skew": FederationConfig(
            num_clients=5,
            num_train=40,
            num_test=8,
            seed=3,
            tasks="adddigit-4,rotate-2,repeat-3",
            partition=PartitionSection(scheme="dirichlet", alpha=0.3, size_skew=0.5),
        ),
        "file-dirichlet": FederationConfig(
            num_clients=3, num_test=5, data_path=str(data), partition=PartitionSection(scheme="dirichlet", alpha=1.0)
        ),
    }


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_existing_run_directories_keep_their_split(name: str, tmp_path: Path) -> None:
    assert _digest(_configs(tmp_path / "data.jsonl")[name]) == GOLDEN[name]
