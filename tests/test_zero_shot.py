"""Zero-shot generation through a real ``fl-hub serve`` on 127.0.0.1: experts published to
``tasks/``, generators trained from the hub and stored in it, ``POST /v1/generate`` returning
signed adapters that ``fl-client pull --task "..." --method ...`` verifies and writes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch
from hub_server import HubServer
from peft import PeftModel
from tiny_experts import TINY
from tiny_experts import TINY_TASKS as TASKS

from fedlora.client.cli import main as fl_client
from fedlora.core.adapter_format import read_adapter_dir
from fedlora.core.model import load_base_model
from fedlora.core.model_dirs import load_tokenizer
from fedlora.core.tasks import get_task
from fedlora.hub.cli import main as fl_hub
from fedlora.hub.generators.experts import build_experts, publish_experts
from fedlora.hub.generators.library import ExpertLibrary
from fedlora.hub.generators.registry import load_generator
from fedlora.hub.hub_dir import HubDir, HubSettings
from fedlora.hub.sdk.client import HubClient, HubRequestError
from fedlora.hub.sdk.manifest import GENERATOR_FILES, describe_base_model, load_public_key
from fedlora.hub.sdk.request import GenerationRequest

# a real hub server (module fixture) with trained experts and generators, built once: the tests
# share one pytest-xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("zero-shot")]


class Hub:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir, _ = HubDir.init(root / "hub", HubSettings())
        registry = self.dir.registry()
        self.operator_file = self.dir.operator_token_path
        self.operator = self.operator_file.read_text().strip()
        self.alice = registry.create_token("client", "alice")
        (root / "alice.token").write_text(self.alice)
        self.key = load_public_key(self.dir.public_key_path)
        self.server = HubServer(self.dir.root, root / "hub.log").start()

    def client(self, token: str) -> HubClient:
        return HubClient(self.server.url, token, self.key)

    def connection(self, token_file: Path) -> list[str]:
        return ["--hub", self.server.url, "--token-file", str(token_file), "--hub-key", str(self.dir.public_key_path)]


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    """A hub whose tasks/ holds a tiny expert build and whose generators/ holds both methods,
    trained by ``fl-hub train-generator`` from the hub's own (verified) experts."""
    root = tmp_path_factory.mktemp("zero-shot")
    h = Hub(root)
    try:
        build_experts(TINY, root / "experts")
        with h.client(h.operator) as c:
            published = publish_experts(c, root / "experts", "experts-test", "tests")
        assert len(published) == 8  # 4 tasks x 2 checkpoints
        for method in ("sg-lora", "icm-lora"):
            args = ["train-generator", "--method", method, "--steps", "30", "--out", str(root / method)]
            assert fl_hub(args + h.connection(h.operator_file)) == 0
        yield h
    finally:
        h.server.stop()


def _logits(adapter_dir: Path) -> torch.Tensor:
    model = PeftModel.from_pretrained(load_base_model(), str(adapter_dir))
    with torch.no_grad():
        return model(input_ids=torch.tensor([[5, 17, 23, 9, 31, 4, 12, 8]])).logits


def test_experts_are_versions_of_tasks_with_descriptions_and_examples(hub: Hub) -> None:
    with hub.client(hub.alice) as c:
        rows = {r["name"]: r for r in c.list("tasks")}
        assert sorted(rows) == [f"tasks/{t}" for t in sorted(TASKS)]
        assert c.versions("tasks/rotate-1") == [1, 2]
        manifest, _ = c.fetch("tasks/rotate-1", 1)
    prov = manifest["provenance"]
    assert prov["run"] == "experts-test" and prov["extra"]["checkpoint"] == {"step": 3, "of": [3, 6]}
    assert prov["extra"]["task"]["descriptions"] == list(get_task("rotate-1").descriptions)
    assert len(prov["extra"]["task"]["examples"]) == 8


@pytest.mark.parametrize("method", ["sg-lora", "icm-lora"])
def test_fl_client_pull_generates_a_signed_adapter_that_peft_loads(hub: Hub, method: str, tmp_path: Path) -> None:
    examples = tmp_path / "examples.jsonl"
    examples.write_text(
        "".join(
            json.dumps({"prompt": e.prompt, "completion": e.completion}) + "\n"
            for e in get_task("adddigit-4").examples(6, 3)
        )
    )
    out = tmp_path / "adapter"
    args = ["pull", "--task", "add 4 to each digit modulo 10", "--method", method, "--out", str(out)]
    args += ["--examples", str(examples)] if method == "icm-lora" else []
    assert fl_client(args + hub.connection(hub.root / "alice.token")) == 0
    manifest = json.loads((out / "hub_manifest.json").read_text())
    assert manifest["name"].startswith(f"generated/{method}-1-")
    prov = manifest["provenance"]
    assert prov["description"] == "add 4 to each digit modulo 10"
    assert prov["extra"]["generator"] == {"name": f"generators/{method}", "version": 1, "method": method}
    assert prov["extra"]["experts"] == sorted(TASKS)
    assert prov["extra"]["examples"] == (6 if method == "icm-lora" else 0)
    assert manifest["published_by"] == "operator (generator)"
    logits = _logits(out)
    assert torch.isfinite(logits).all()
    # what the hub generated is exactly what the trained generator gives for that request
    gen = load_generator({f: (hub.root / method / f).read_bytes() for f in GENERATOR_FILES})
    if gen.needs_base_model:
        gen.task_model = (load_base_model().eval(), load_tokenizer())
    from fedlora.core.data import load_jsonl

    expected = gen.generate("add 4 to each digit modulo 10", load_jsonl(examples) if method == "icm-lora" else [])
    assert read_adapter_dir(out)["adapter_model.safetensors"] == expected["adapter_model.safetensors"]


def test_the_same_request_returns_the_stored_adapter(hub: Hub) -> None:
    with hub.client(hub.alice) as c:
        first = c.generate("rotate the string left by 2", "sg-lora")
        again = c.generate("rotate the string left by 2", "sg-lora")
        other = c.generate("rotate the string left by 3", "sg-lora")
    assert first == again and first["version"] == 1
    assert other["name"] != first["name"]
    response = httpx.post(
        f"{hub.server.url}/v1/generate",
        json={"description": "rotate the string left by 2", "method": "sg-lora"},
        headers={"authorization": f"Bearer {hub.alice}"},
    )
    assert response.status_code == 200  # stored already (a new one answers 201)


def test_concurrent_identical_requests_generate_once(hub: Hub) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def versions_after_8_identical(url: str, description: str, method: str) -> list[int]:
        def ask(_: int) -> dict[str, object]:
            with HubClient(url, hub.alice, hub.key) as c:
                return c.generate(description, method)

        with ThreadPoolExecutor(8) as pool:
            records = list(pool.map(ask, range(8)))
        assert len({(r["name"], r["version"]) for r in records}) == 1
        with hub.client(hub.operator) as c:
            return c.versions(str(records[0]["name"]))

    assert versions_after_8_identical(hub.server.url, "sort the digits in ascending order please", "icm-lora") == [1]
    # two worker processes on the same hub directory: still one generation per request
    with HubServer(hub.dir.root, hub.root / "workers.log", workers=2) as two:
        assert versions_after_8_identical(two.url, "sort the digits descending, as two workers", "sg-lora") == [1]


@pytest.mark.parametrize(
    ("body", "status", "reason"),
    [
        ({"description": ""}, 400, "description is empty"),
        ({"description": "d" * 2000}, 400, "the limit is 1000"),
        ({"description": "add 4", "method": "lora-magic"}, 400, "unknown generation method"),
        (
            {"description": "add 4", "examples": [{"input": "1", "output": "5"}]},
            400,
            "exactly 'prompt' and 'completion'",
        ),
        ({"description": "add 4", "examples": "1=5"}, 400, "must be a list"),
        ({"description": "add 4", "base_model_sha256": "f" * 64}, 409, "trained for base model fedlora/embedded-base"),
        ("not json", 400, "not JSON"),
        ("[" * 100_000, 400, "nested too deeply"),
    ],
)
def test_bad_generation_requests_get_reasons(hub: Hub, body: object, status: int, reason: str) -> None:
    content = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    r = httpx.post(f"{hub.server.url}/v1/generate", content=content, headers={"authorization": f"Bearer {hub.alice}"})
    assert r.status_code == status, r.text
    assert reason in r.json()["error"]


def test_generation_needs_a_token_and_generators_belong_to_the_operator(hub: Hub, tmp_path: Path) -> None:
    r = httpx.post(f"{hub.server.url}/v1/generate", json={"description": "add 4"})
    assert r.status_code == 401
    with hub.client(hub.alice) as c:
        with pytest.raises(HubRequestError, match="403"):
            c.record("generators/sg-lora")  # clients use generators, they do not read them
        files = read_adapter_dir(hub.root / "experts" / "rotate-1" / "checkpoint-6")
        with pytest.raises(HubRequestError, match="403"):
            c.publish("generators/sg-lora", files, {"base_model": describe_base_model().__dict__, "producer": "x"})
    with hub.client(hub.operator) as c:
        # an adapter is not a generator, and a generator must be for the base model it states
        with pytest.raises(HubRequestError, match=r"exactly generator\.json, generator\.safetensors"):
            c.publish("generators/sg-lora", files, {"base_model": describe_base_model().__dict__, "producer": "x"})
        prov = {"base_model": describe_base_model().__dict__, "producer": "x"}
        sg = {f: (hub.root / "sg-lora" / f).read_bytes() for f in GENERATOR_FILES}
        icm = {f: (hub.root / "icm-lora" / f).read_bytes() for f in GENERATOR_FILES}
        for name, files_, reason in [
            ("generators/other", sg, "stored as generators/<method>"),
            ("generators/sg-lora", icm, "'icm-lora' generator is stored as generators/<method>"),
        ]:
            with pytest.raises(HubRequestError, match=re.escape(reason)):
                c.publish(name, files_, prov)
        config = json.loads(sg["generator.json"])
        future = {**sg, "generator.json": json.dumps({**config, "format_version": 3}).encode()}
        with pytest.raises(HubRequestError, match="format version 3, this hub serves version 2"):
            c.publish("generators/sg-lora", future, prov)
        other_base = {**sg, "generator.json": json.dumps({**config, "base_model": {"id": "x", "sha256": "0" * 64}})}
        with pytest.raises(HubRequestError, match="trained for base model"):
            c.publish(
                "generators/sg-lora", {**other_base, "generator.json": other_base["generator.json"].encode()}, prov
            )
        assert c.versions("generators/sg-lora") == [1]  # nothing of it was stored


def test_a_method_without_a_generator_and_a_client_pull_without_the_key(hub: Hub, tmp_path: Path) -> None:
    fresh = HubDir.init(tmp_path / "empty", HubSettings())[0]
    with HubServer(fresh.root, tmp_path / "log") as server:
        token = fresh.operator_token_path.read_text().strip()
        with pytest.raises(HubRequestError, match=r"404.*no sg-lora generator yet"):
            with HubClient(server.url, token, load_public_key(fresh.public_key_path)) as c:
                c.generate("add 4 to each digit", "sg-lora")
        with pytest.raises(ValueError, match="needs the hub's public key"):
            HubClient(server.url, token).generate("add 4 to each digit", "sg-lora")
    out = tmp_path / "x"
    args = ["pull", "--task", "add 4", "--method", "sg-lora", "--out", str(out), "--hub", hub.server.url]
    with pytest.raises(SystemExit):  # no --hub-key: refused before asking
        fl_client([*args, *hub.connection(hub.root / "alice.token")[2:4]])
    connection = hub.connection(hub.root / "alice.token")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "1", "output": "5"}\n')
    assert fl_client([*args, "--examples", str(bad), *connection]) == 2  # names the line and the keys
    assert fl_client(["pull", "--task", "rotate-1", "--examples", str(bad), "--out", str(out), *connection]) == 2
    assert not out.exists()


@pytest.mark.flower
def test_build_experts_federated_mixes_with_local_experts(tmp_path: Path) -> None:
    """``--federated``: each expert is a real fl-sim federation of its task's clients; its last
    rounds' global adapters are the checkpoints, in the same parameter space as local experts."""
    out = tmp_path / "experts"
    args = ["build-experts", "--out", str(out), "--tasks", "rotate-1", "--federated", "--clients", "2"]
    args += ["--rounds", "2", "--local-steps", "3", "--checkpoints", "2", "--rank", "1", "--targets", "q_proj,v_proj"]
    assert fl_hub(args) == 0
    info = json.loads((out / "rotate-1" / "task.json").read_text())
    assert info["trained"] == "federated" and info["checkpoints"] == [1, 2]
    assert json.loads((out / "experts.json").read_text())["config"]["federated"]["clients"] == 2
    build_experts(TINY, tmp_path / "local")
    (tmp_path / "local" / "rotate-1").rename(tmp_path / "local-rotate-1")
    for task in ("adddigit-3", "rotate-3"):
        (tmp_path / "local" / task).rename(out / task)
    library = ExpertLibrary.from_dir(out, describe_base_model())
    assert library.names() == ["adddigit-3", "rotate-1", "rotate-3"]
    federated = library.get("rotate-1").checkpoints
    assert federated.shape == (2, 2048) and not torch.equal(federated[0], federated[1])


def test_train_generator_refuses_experts_of_another_base_model(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    from fedlora.core.embedded import default_model_dir

    other = tmp_path / "other-base"
    shutil.copytree(default_model_dir(), other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    experts = str(hub.root / "experts")
    args = ["train-generator", "--method", "sg-lora", "--experts", experts, "--steps", "2"]
    assert fl_hub([*args, "--base-model", str(other), "--out", str(tmp_path / "g")]) == 2
    assert "the experts were trained on base model fedlora/embedded-base" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    assert fl_hub(["train-generator", "--method", "sg-lora", "--experts", str(tmp_path / "none")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert fl_hub(["train-generator", "--method", "icm-lora", "--steps", "2"]) == 2
    assert "name the experts" in capsys.readouterr().err


def test_an_answer_generated_for_another_request_is_refused(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A man in the middle (or a confused hub) answering with another validly signed adapter is
    caught: by its name, and when the name fits, by the request the signed provenance names."""
    from fedlora.hub.sdk.manifest import VerificationError

    with hub.client(hub.alice) as c:
        other = c.generate("rotate the string left by 3", "sg-lora")
    wanted = GenerationRequest("add 4 to each digit modulo 10", "sg-lora")
    files = read_adapter_dir(hub.root / "experts" / "rotate-1" / "checkpoint-6")
    provenance = {
        "base_model": describe_base_model().__dict__,
        "producer": "someone",
        "extra": {
            "generator": {"name": "generators/sg-lora", "version": 1, "method": "sg-lora"},
            "request_sha256": "0" * 64,
        },
    }
    with hub.client(hub.operator) as c:  # a signed record whose name fits the request, generated for another
        fitting = c.publish(f"generated/sg-lora-1-{wanted.key()[:20]}", files, provenance)
    for answer, reason in [(other, "of this request"), (fitting, "generated for another request")]:
        with hub.client(hub.alice) as c:
            monkeypatch.setattr(c, "_request", lambda *a, answer=answer, **k: httpx.Response(200, json=answer))
            with pytest.raises(VerificationError, match=reason):
                c.generate(wanted.description, "sg-lora")
    forged = {**other, "name": f"generated/sg-lora-1-{GenerationRequest('reverse it').key()[:20]}"}
    with hub.client(hub.alice) as c:
        monkeypatch.setattr(c, "_request", lambda *a, **k: httpx.Response(200, json=forged))
        with pytest.raises(VerificationError):
            c.generate("reverse it", "sg-lora")  # the name fits, the signature does not
