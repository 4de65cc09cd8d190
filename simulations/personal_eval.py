"""Every personal adapter of a finished simulation, and the global adapter beside them, on the
test split of every virtual client that personalised, in one batched pass
(:func:`fedlora.core.multi_adapter.evaluate_many`).

The diagonal is what personalising gave each client (the same figure each client reported
itself); the off-diagonal says how personal the adapters are: a personal adapter that does as
well on other clients' data has learned nothing of its own. Written to ``report/personal.json``
and ``report/personal.md``; ``fl-sim personal-eval RUN_DIR`` rewrites them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from fedlora.atomic import write_atomic, write_json_atomic
from fedlora.core.adapter_format import CONFIG_FILE, read_adapter_dir
from fedlora.core.cli import summary_line
from fedlora.core.client_data import client_examples
from fedlora.core.config import DEFAULT_RUN_CONFIG, FederationConfig
from fedlora.core.data import Encoded
from fedlora.core.kinds import DEFAULT_KIND, get_kind
from fedlora.core.model import load_base_model, max_positions
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.multi_adapter import LoadedAdapter, evaluate_many
from fedlora.core.run_dir import RunDir


def evaluate_personal(run_dir: Path, batch_size: int = 64) -> dict[str, Any]:
    """Evaluate, write the report files, return the report. Raises if the run has no personal adapters."""
    run = RunDir(run_dir)
    personal = run.personal_adapters()
    if not personal:
        raise FileNotFoundError(
            f"{run_dir} has no personal adapters (in {run.personal_dir.name}/): run with personalize.steps"
        )
    stored = run.config()
    cfg = FederationConfig.from_run_config({k: v for k, v in stored.items() if k in DEFAULT_RUN_CONFIG})
    started = time.perf_counter()
    model_dir = cfg.model_dir or None
    tokenizer, model = load_tokenizer(model_dir), load_base_model(model_dir)
    max_len = max_positions(model)
    clients = list(personal)
    # personalisation runs on causal LMs only (FederationConfig refuses it otherwise)
    causal = get_kind(DEFAULT_KIND)
    encoded = [causal.encode(tokenizer, client_examples(cfg, p)[1], (), max_len, truncate=False) for p in clients]
    tests = [[e for e in enc.items if isinstance(e, Encoded)] for enc in encoded]  # all are: a causal LM's
    names, adapters = [], []
    global_dir = run.global_adapter_dir
    if (global_dir / CONFIG_FILE).is_file():
        names.append("global")
        adapters.append(LoadedAdapter.from_files("global", read_adapter_dir(global_dir)))
    for p, path in personal.items():
        names.append(f"partition-{p}")
        adapters.append(LoadedAdapter.from_files(path.name, read_adapter_dir(path)))
    jobs = [(k, data) for k in range(len(adapters)) for data in tests]
    results = evaluate_many(model, adapters, jobs, int(tokenizer.pad_token_id), batch_size)
    width = len(tests)
    em = [[results[k * width + j].exact_match for j in range(width)] for k in range(len(adapters))]
    loss = [[results[k * width + j].loss for j in range(width)] for k in range(len(adapters))]
    rows = {name: k for k, name in enumerate(names)}
    own = [em[rows[f"partition-{p}"]][j] for j, p in enumerate(clients)]
    others = [em[rows[f"partition-{p}"]][j] for p in clients for j in range(width) if clients[j] != p]
    report: dict[str, Any] = {
        "adapters": names,
        "clients": clients,
        "test_examples": [len(t) for t in tests],
        "exact_match": em,
        "loss": loss,
        "personal_own_mean": sum(own) / len(own),
        "personal_others_mean": sum(others) / len(others) if others else None,
        "global_mean": sum(em[rows["global"]]) / width if "global" in rows else None,
        "sequences": sum(len(d) for _, d in jobs),
        "seconds": time.perf_counter() - started,
    }
    write_json_atomic(run.personal_eval_json, report)
    write_atomic(run.personal_eval_md, markdown(report).encode())
    return report


def markdown(report: dict[str, Any]) -> str:
    clients = report["clients"]
    lines = [
        "# Personal adapters on every personalised client's test split",
        "",
        "Exact match of each adapter (row) on each virtual client's test split (column), all evaluated in one "
        f"batched pass ({report['sequences']} sequences, {report['seconds']:.1f} s). The diagonal is each client's "
        "own personal adapter.",
        "",
        "| adapter | " + " | ".join(f"client {p}" for p in clients) + " |",
        "|---|" + "---|" * len(clients),
    ]
    for name, row in zip(report["adapters"], report["exact_match"], strict=True):
        cells = [f"**{v:.3f}**" if name == f"partition-{p}" else f"{v:.3f}" for p, v in zip(clients, row, strict=True)]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", summary_line(report), ""]
    return "\n".join(lines)
