"""A federation publishes to the hub: the final global adapter (and optionally every round's)
with the provenance a puller needs to trust it: base model and weights hash, strategy, run,
round, the run's privacy guarantee (epsilon, delta, unit, accountant) and its evaluation.

Everything is read from the run directory (:class:`fedlora.core.run_dir.RunDir`), so
``fl-hub publish-run`` can publish (or re-publish, after a hub outage) a finished run later with
the same result.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedlora.core.adapter_format import CONFIG_FILE, read_adapter_dir
from fedlora.core.kinds import run_model_dir
from fedlora.core.run_dir import RunDir
from fedlora.hub.sdk.client import HubClient, HubRequestError, read_token
from fedlora.hub.sdk.manifest import VerificationError, describe_base_model, load_public_key
from fedlora.hub.sdk.names import check_segment
from fedlora.privacy.units import PRIVACY_UNIT

log = logging.getLogger("fedlora.hub")

#: privacy-report fields copied into provenance (the per-client lists stay in the run directory)
_REPORT_SUMMARY = (
    "dp_enabled",
    "rounds_completed",
    "privacy_unit",
    "accountant",
    "delta",
    "epsilon_max",
    "epsilon_median",
    "parameters",
)


def fedlora_version() -> str:
    try:
        return version("fedlora")
    except PackageNotFoundError:
        return "unknown"


@dataclass(frozen=True)
class HubTarget:
    """Where and how a federation publishes (validated when the command line is read)."""

    url: str
    token: str
    public_key: Ed25519PublicKey | None = None
    every_round: bool = False
    ca: Path | None = None  # the hub's own CA (fl-hub init), for its HTTPS certificate

    def client(self) -> HubClient:
        return HubClient(self.url, self.token, self.public_key, ca=self.ca)


def run_name(run_dir: Path) -> str:
    """The run's segment in ``global/<run>/<round>``: the run directory's name, made safe."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", run_dir.resolve().name).strip(".-_")[:64] or "run"
    return check_segment(name, "run name")


def _rows(run_dir: Path) -> dict[int, dict[str, Any]]:
    """round -> its row (the last of a round written twice), {} before the first row."""
    return {r["round"]: r for r in RunDir(run_dir).rounds(missing_ok=True)}


def _evaluation(row: dict[str, Any]) -> dict[str, Any]:
    ev = row.get("evaluate") or {}
    out: dict[str, Any] = {k: ev[k] for k in ("exact-match", "eval-loss", "clients") if k in ev}
    server = {task: m.get("exact-match") for task, m in (row.get("server-eval") or {}).items()}
    if server:
        out["server-exact-match"] = server
    local = [m["local-exact-match"] for m in (row.get("per-client-train") or {}).values() if "local-exact-match" in m]
    if local:
        out["local-exact-match-mean"] = sum(local) / len(local)
    return out


def run_provenance(run_dir: Path, server_round: int, final: bool, producer: str) -> dict[str, Any]:
    """Provenance of the global adapter after ``server_round`` of the run in ``run_dir``."""
    run = RunDir(run_dir)
    config = run.config()
    base = describe_base_model(run_model_dir(config))
    row = _rows(run_dir).get(server_round, {})
    prov: dict[str, Any] = {
        "base_model": {"id": base.id, "sha256": base.sha256},
        "producer": producer,
        "strategy": str(config.get("strategy")),
        "run": run_name(run_dir),
        "round": server_round,
        "evaluation": _evaluation(row),
        "extra": {
            "final": final,
            "deployed": bool(config.get("deployed", False)),
            "config": {
                k: config[k]
                for k in ("num-rounds", "num-clients", "local-steps", "lr", "tasks", "lora-rank")
                if k in config
            },
        },
    }
    if not config.get("dp.enabled"):
        prov["privacy_unit"] = "none: trained without differential privacy"
    elif final and (report := run.privacy_report()) is not None:
        prov["privacy_report"] = {k: report[k] for k in _REPORT_SUMMARY if k in report}
        prov |= {
            "epsilon": report.get("epsilon_max"),
            "delta": report.get("delta"),
            "privacy_unit": report.get("privacy_unit"),
            "accountant": report.get("accountant"),
        }
    else:  # a round's adapter: the largest lifetime epsilon the clients reported so far
        plan = run.plan(missing_ok=True) or {}
        eps = (row.get("train") or {}).get("epsilon-max")
        prov |= {
            "epsilon": eps,
            "delta": plan.get("delta"),
            "accountant": plan.get("accountant", config.get("dp.accountant")),
            "privacy_unit": f"{PRIVACY_UNIT}; epsilon: the largest any client reported up to this round",
        }
    return prov


def adapter_files(adapter_dir: Path, base_model_id: str) -> dict[str, bytes]:
    """The PEFT files of ``adapter_dir``, with ``base_model_name_or_path`` set to the base
    model's id (a local path means nothing on another machine and would leak this one's layout)."""
    files = read_adapter_dir(adapter_dir)
    config = json.loads(files[CONFIG_FILE])
    config["base_model_name_or_path"] = base_model_id
    files[CONFIG_FILE] = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
    return files


def publish_global(
    target: HubTarget, run_dir: Path, server_round: int, adapter_dir: Path, final: bool, producer: str
) -> dict[str, Any]:
    prov = run_provenance(run_dir, server_round, final, producer)
    name = f"global/{prov['run']}/{server_round}"
    with target.client() as hub:
        return hub.publish(name, adapter_files(adapter_dir, prov["base_model"]["id"]), prov)


@dataclass
class RunPublisher:
    """Publishes a running federation's adapters: each finished round's checkpoint (if asked)
    as soon as it is on disk, then the final adapter. A hub that fails is reported, never fatal
    to the run: ``fl-hub publish-run`` publishes a finished run again."""

    target: HubTarget
    run_dir: Path
    producer: str
    start_round: int = 0
    published: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    failed: set[int] = field(default_factory=set)  # rounds whose publish failed: retried once, by finish()
    personal: list[str] = field(default_factory=list)  # clients' personal adapters published

    def poll(self, num_rounds: int) -> None:
        """Publish finished rounds' checkpoints (all but the last, which :meth:`finish` publishes)."""
        if not self.target.every_round:
            return
        for r in sorted(_rows(self.run_dir)):
            ckpt = RunDir(self.run_dir).checkpoint_dir(r)
            if self.start_round < r < num_rounds and r not in self.published and r not in self.failed and ckpt.is_dir():
                self._publish(r, ckpt, final=False)

    def finish(self, num_rounds: int) -> None:
        self.failed.clear()
        self.poll(num_rounds)
        rows = _rows(self.run_dir)
        last = max(rows) if rows else num_rounds
        self._publish(last, RunDir(self.run_dir).global_adapter_dir, final=True)
        self.publish_personal()

    def publish_personal(self) -> None:
        """The virtual clients' personal adapters of a simulation (``personalize.steps``), each
        as clients/<partition-p>/<run> with the provenance its client wrote beside it.
        (Deployed clients publish their own, with their own tokens.)"""
        run = RunDir(self.run_dir)
        personal = run.personal_adapters()
        if not personal:
            return
        base = describe_base_model(run_model_dir(run.config()))
        for d in personal.values():
            name = f"clients/{d.name}/{run_name(self.run_dir)}"
            sidecar = d / "personalize.json"
            prov = json.loads(sidecar.read_text()) if sidecar.is_file() else {"producer": self.producer}
            prov["base_model"] = {"id": base.id, "sha256": base.sha256}
            try:
                with self.target.client() as hub:
                    record = hub.publish(name, adapter_files(d, base.id), prov)
            except (HubRequestError, VerificationError, ValueError, OSError) as err:
                self.errors.append(f"{name}: {err}")
                continue
            self.personal.append(f"{record['name']} v{record['version']}")

    def _publish(self, server_round: int, adapter_dir: Path, final: bool) -> None:
        try:
            record = publish_global(self.target, self.run_dir, server_round, adapter_dir, final, self.producer)
        except (HubRequestError, VerificationError, ValueError, OSError) as err:
            self.failed.add(server_round)
            message = f"round {server_round}: {err}"
            if message not in self.errors:
                self.errors.append(message)
                log.warning("hub: publishing %s failed: %s", adapter_dir, err)
            return
        self.published[server_round] = f"{record['name']} v{record['version']}"


def add_hub_options(p: Any) -> None:
    """``--hub*`` options of ``fl-sim`` and ``fl-server start``."""
    g = p.add_argument_group("hub (publish the global adapter to an adapter hub)")
    g.add_argument("--hub", default=None, help="hub URL; the final global adapter is published as global/<run>/<round>")
    g.add_argument("--hub-token-file", type=Path, default=None, help="file holding an operator token of the hub")
    g.add_argument("--hub-key", type=Path, default=None, help="the hub's public key (hub.pub): check what it signed")
    g.add_argument("--hub-ca", type=Path, default=None, help="the hub's ca.pem (fl-hub init made it)")
    g.add_argument("--hub-every-round", action="store_true", default=None, help="also publish every round's adapter")


def hub_target(
    url: str | None, token_file: Path | None, key_file: Path | None, every_round: bool, ca: Path | None = None
) -> HubTarget | None:
    """A validated target, or None without a URL; a token file or key that is missing fails now,
    before a run starts, not after it finished."""

    if not url:
        if token_file or key_file or every_round or ca:
            raise ValueError("--hub-token-file, --hub-key, --hub-ca and --hub-every-round need --hub URL")
        return None
    if token_file is None:
        raise ValueError("--hub needs --hub-token-file (an operator token: fl-hub init writes one)")
    key = load_public_key(Path(key_file)) if key_file else None
    if ca is not None and not Path(ca).is_file():
        raise ValueError(f"--hub-ca {ca} does not exist")
    target = HubTarget(url, read_token(None, token_file), key, every_round, Path(ca).resolve() if ca else None)
    target.client().close()  # the URL and token are well-formed
    return target


class Following:
    """Runs :meth:`RunPublisher.poll` every second in a thread while a run goes."""

    def __init__(self, publisher: RunPublisher, num_rounds: int) -> None:
        import threading

        self.publisher = publisher
        self.num_rounds = num_rounds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.publisher.poll(self.num_rounds)

    def __enter__(self) -> Following:
        if self.publisher.target.every_round:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=120)
