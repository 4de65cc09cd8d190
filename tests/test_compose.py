"""docker-compose.yml and the Dockerfile, checked without Docker.

Every service's command is parsed by the parser its console script really builds (``main`` is
called with ``parse_args`` intercepted, so no handler runs); then what the services must agree
on is checked: volumes declared, dependencies existing and ordered, one server directory, the
port, the certificate's names, one key and one state directory per SuperNode, each node keyed
and enrolled before the SuperLink starts, as many nodes as the run waits for; the adapter hub's
signing key in a volume only the hub's services mount, the SuperLink publishing to the hub's
address with the operator token and hub.pub init-hub hands it, no client near that token; every
volume mounted where the image gives its user a directory. Each checker returns the problems it
finds, and the negative tests break a copy of the file to prove it.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn
from unittest import mock

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
Compose = dict[str, Any]
Location = tuple[str, PurePosixPath]  # (volume name or bind source, path inside it)


@cache
def console_scripts() -> dict[str, str]:
    """``[project.scripts]`` of pyproject.toml: script name -> ``module:function``."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    return {str(name): str(target) for name, target in scripts.items()}


def load_compose() -> Compose:
    compose = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(compose, dict) and isinstance(compose.get("services"), dict), "no services in docker-compose.yml"
    return compose


# ----------------------------------------------------------------------------- commands


class _Parsed(BaseException):  # BaseException: no `except Exception` in a main() can swallow it
    def __init__(self, namespace: argparse.Namespace) -> None:
        self.namespace = namespace


class _Refused(BaseException):
    def __init__(self, message: str) -> None:
        self.message = message


@contextmanager
def _parse_only() -> Iterator[None]:
    """While active, an ArgumentParser returns nothing: it raises what it parsed or refused."""
    original = argparse.ArgumentParser.parse_args

    def parse_args(self: argparse.ArgumentParser, args: Any = None, namespace: Any = None) -> NoReturn:
        raise _Parsed(original(self, args, namespace))

    def error(self: argparse.ArgumentParser, message: str) -> NoReturn:
        raise _Refused(f"{self.prog}: error: {message}")

    def exit_(self: argparse.ArgumentParser, status: int = 0, message: str | None = None) -> NoReturn:
        raise _Refused(f"{self.prog}: exits while parsing (status {status}, --help?) {message or ''}".strip())

    with (
        mock.patch.object(argparse.ArgumentParser, "parse_args", parse_args),
        mock.patch.object(argparse.ArgumentParser, "error", error),
        mock.patch.object(argparse.ArgumentParser, "exit", exit_),
    ):
        yield


def parse_command(command: Any) -> tuple[str, argparse.Namespace]:
    """(script, namespace) of a compose ``command``; ValueError naming the problem otherwise."""
    if not isinstance(command, list) or not command:
        raise ValueError(f"command must be a non-empty list (exec form), got {command!r}")
    if not all(isinstance(arg, str) for arg in command):
        raise ValueError(f"every argument must be a string (quote numbers in YAML), got {command!r}")
    script, *args = command
    target = console_scripts().get(script)
    if target is None:
        raise ValueError(f"{script!r} is not a console script of pyproject.toml {sorted(console_scripts())}")
    module, _, function = target.partition(":")
    main: Callable[[list[str]], Any] = getattr(importlib.import_module(module), function)
    try:
        with _parse_only():
            main(args)
    except _Parsed as parsed:
        return script, parsed.namespace
    except _Refused as refused:
        raise ValueError(refused.message) from None
    raise ValueError(f"{target} returned without parsing its arguments")


def entrypoint_problem(entrypoint: Any) -> str | None:
    """An entrypoint may only guard the command: ``sh -c SCRIPT NAME`` where SCRIPT runs ``"$@"``."""
    if entrypoint is None:
        return None
    ok = (
        isinstance(entrypoint, list)
        and len(entrypoint) == 4
        and entrypoint[:2] == ["sh", "-c"]
        and '"$$@"' in str(entrypoint[2])  # compose turns $$ into $
    )
    return None if ok else f'entrypoint {entrypoint!r} is not `sh -c SCRIPT NAME` running the command ("$$@")'


def command_problems(compose: Compose) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        try:
            parse_command(service.get("command"))
        except ValueError as err:
            problems.append(f"service {name}: {err}")
        problem = entrypoint_problem(service.get("entrypoint"))
        if problem:
            problems.append(f"service {name}: {problem}")
    return problems


def commands(compose: Compose) -> dict[str, tuple[str, argparse.Namespace]]:
    """Every service whose command parses: name -> (script, namespace)."""
    parsed = {}
    for name, service in compose["services"].items():
        try:
            parsed[name] = parse_command(service.get("command"))
        except ValueError:
            continue  # command_problems reports it
    return parsed


# ----------------------------------------------------------------------------- volumes


@dataclass(frozen=True)
class Mount:
    source: str | None  # None: an anonymous volume
    target: PurePosixPath
    bind: bool
    read_only: bool


def mounts(service: Mapping[str, Any]) -> list[Mount]:
    result = []
    for entry in service.get("volumes", []) or []:
        if isinstance(entry, str):
            source, target, *options = entry.split(":") if ":" in entry else ["", entry]
            read_only = "ro" in (options[0].split(",") if options else [])
            bind = source.startswith((".", "/", "~"))
            result.append(Mount(source or None, PurePosixPath(target), bind, read_only))
        elif entry.get("type") != "tmpfs":  # a tmpfs holds nothing meant to last
            source = entry.get("source")
            result.append(
                Mount(source, PurePosixPath(entry["target"]), entry.get("type") == "bind", bool(entry.get("read_only")))
            )
    return result


def locate(service: Mapping[str, Any], path: Any) -> Location | None:
    """Where a container path lives: (volume or bind source, path inside it); None when it is in
    the container's own file system, which is lost with the container."""
    p = PurePosixPath(str(path))
    covering = [m for m in mounts(service) if m.target == p or m.target in p.parents]
    if not covering:
        return None
    mount = max(covering, key=lambda m: len(m.target.parts))
    return None if mount.source is None else (mount.source, p.relative_to(mount.target))


def overlap(a: Location, b: Location) -> bool:
    return a[0] == b[0] and (a[1] == b[1] or a[1] in b[1].parents or b[1] in a[1].parents)


def volume_problems(compose: Compose) -> list[str]:
    declared = set(compose.get("volumes") or {})
    used = set()
    problems = []
    for name, service in compose["services"].items():
        for m in mounts(service):
            if m.source is None:
                problems.append(f"service {name}: anonymous volume at {m.target} (its data is lost with the container)")
            elif m.bind:
                if not (REPO / m.source).resolve().is_relative_to(REPO):
                    problems.append(f"service {name}: bind mount {m.source} is outside the repository")
            elif m.source not in declared:
                problems.append(f"service {name}: volume {m.source!r} is not declared under top-level volumes")
            else:
                used.add(m.source)
    problems += [f"volume {v!r} is declared but no service mounts it" for v in sorted(declared - used)]
    return problems


def image_directories(dockerfile: str) -> tuple[str | None, dict[PurePosixPath, str]]:
    """The image's last USER and the directories its ``install -d -o OWNER ... DIR...`` create: dir -> owner."""
    lines = [line for line in dockerfile.splitlines() if not line.lstrip().startswith("#")]
    text = "\n".join(lines).replace("\\\n", " ")
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    created: dict[PurePosixPath, str] = {}
    for step in re.split(r"&&|;|\n", text):
        words = step.split()
        words = words[1:] if words[:1] == ["RUN"] else words
        if words[:2] != ["install", "-d"]:
            continue
        owner, paths, rest = "root", [], iter(words[2:])
        for word in rest:
            if word in ("-o", "-g", "-m"):
                value = next(rest, "")
                owner = value if word == "-o" else owner
            elif not word.startswith("-"):
                paths.append(PurePosixPath(word))
        created |= dict.fromkeys(paths, owner)
    return (users[-1] if users else None), created


def mount_point_problems(compose: Compose) -> list[str]:
    """An empty named volume takes the owner of the image directory it is first mounted on; one the
    image does not create is made root's, and the image's non-root user cannot write it."""
    user, created = image_directories(DOCKERFILE.read_text())
    problems = []
    for name, service in compose["services"].items():
        for m in mounts(service):
            if m.source is not None and not m.bind and created.get(m.target) != user:
                problems.append(
                    f"service {name}: volume {m.source!r} at {m.target}, which the Dockerfile does not create "
                    f"for user {user} (install -d -o {user}): the new volume would be root's, unwritable"
                )
    return problems


# ------------------------------------------------------------------------- dependencies

CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def depends_on(service: Mapping[str, Any]) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return dict.fromkeys(deps, "service_started")
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def dependency_problems(compose: Compose) -> list[str]:
    services = compose["services"]
    problems = []
    for name, service in services.items():
        for dep, condition in depends_on(service).items():
            if dep not in services:
                problems.append(f"service {name}: depends_on {dep!r}, which is not a service")
            elif condition not in CONDITIONS:
                problems.append(f"service {name}: depends_on {dep!r} with unknown condition {condition!r}")
            elif condition == "service_completed_successfully" and services[dep].get("restart", "no") != "no":
                problems.append(f"service {name}: waits for {dep} to complete, but {dep} restarts (restart: 'no')")
            elif condition == "service_healthy" and not (services[dep].get("healthcheck") or {}).get("test"):
                problems.append(f"service {name}: waits for {dep} to be healthy, but {dep} has no healthcheck")

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in path:
            cycle = path[path.index(name) :]
            start = cycle.index(min(cycle))  # one message per cycle, whichever service it was reached from
            problems.append(f"dependency cycle: {' -> '.join((*cycle[start:], *cycle[:start], min(cycle)))}")
            return
        for dep in depends_on(services.get(name, {})):
            if dep in services:
                visit(dep, (*path, name))

    for name in services:
        visit(name, ())
    return sorted(set(problems))


def build_problems(compose: Compose) -> list[str]:
    problems = []
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is None:
            problems.append(f"service {name}: no build (every service runs this repository's image)")
            continue
        context = REPO / (build if isinstance(build, str) else build.get("context", "."))
        dockerfile = context / ("Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile"))
        if not dockerfile.is_file():
            problems.append(f"service {name}: {dockerfile} does not exist")
    images = {service.get("image") for service in compose["services"].values()}
    if len(images) != 1:
        problems.append(f"services name several images {images}: one image, built once, runs every role")
    return problems


# --------------------------------------------------------------------------- deployment


def _container_ports(service: Mapping[str, Any]) -> set[int]:
    ports = set()
    for entry in service.get("ports", []) or []:
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].split(":")[-1]))
    return ports


def deployment_problems(compose: Compose) -> list[str]:
    """What the server and client services must agree on."""
    from fedlora.client.node import NodeError, split_address
    from fedlora.core.flower_runner import parse_run_config_pairs
    from fedlora.server.server_dir import DEFAULT_DEPLOY_RUN_CONFIG, DEFAULT_PORT

    services = compose["services"]
    parsed = commands(compose)

    def named(script: str, command: str) -> dict[str, argparse.Namespace]:
        return {n: ns for n, (s, ns) in parsed.items() if s == script and ns.command == command}

    inits, starts = named("fl-server", "init"), named("fl-server", "start")
    enrolls, keygens, nodes = named("fl-server", "enroll"), named("fl-client", "keygen"), named("fl-client", "start")
    if len(inits) != 1 or len(starts) != 1:
        return [
            f"expected one `fl-server init` and one `fl-server start` service, got {sorted(inits)}, {sorted(starts)}"
        ]
    (init_name, init), (link_name, start) = next(iter(inits.items())), next(iter(starts.items()))
    problems = []

    server = locate(services[init_name], init.server_dir)
    if server is None or server[0] not in (compose.get("volumes") or {}):
        return [f"service {init_name}: {init.server_dir} is not on a named volume: the CA would die with the container"]
    for name, ns in {**starts, **enrolls}.items():
        if locate(services[name], ns.server_dir) != server:
            problems.append(f"service {name}: {ns.server_dir} is not the server directory {init_name} creates {server}")

    if init.port != DEFAULT_PORT:
        problems.append(f"service {init_name}: --port {init.port}, not the documented default {DEFAULT_PORT}")
    if init.port not in _container_ports(services[link_name]):
        problems.append(f"service {link_name}: does not publish port {init.port} (server.toml's, from --port)")
    link_names = {link_name, services[link_name].get("hostname")}

    run_config = {**parse_run_config_pairs(init.run_config), **parse_run_config_pairs(start.run_config)}
    num_clients = {**DEFAULT_DEPLOY_RUN_CONFIG, **run_config}.get("num-clients")
    if num_clients != len(nodes):
        problems.append(f"the run waits for num-clients={num_clients} nodes but {len(nodes)} services start one")

    seen: dict[str, tuple[str, Location, Location]] = {}  # node name -> (service, key, state)
    for name, ns in nodes.items():
        service = services[name]
        try:
            host, port = split_address(ns.server)
        except NodeError as err:
            problems.append(f"service {name}: {err}")
            continue
        if port != init.port or host not in link_names:
            problems.append(f"service {name}: --server {ns.server}, but the SuperLink is {link_name}:{init.port}")
        if host not in init.host:
            problems.append(f"service {name}: dials {host!r}, which the server certificate does not name {init.host}")
        if any(m.source == server[0] for m in mounts(service)):
            problems.append(f"service {name}: mounts volume {server[0]!r}, which holds the CA and server keys")
        key, state = locate(service, ns.key), locate(service, ns.state_dir)
        if key is None or state is None:
            problems.append(f"service {name}: --key and --state-dir must be on volumes (the ledger must persist)")
            continue
        node_name = ns.name or name
        if node_name in seen:
            problems.append(f"service {name}: node name {node_name!r} is also {seen[node_name][0]}'s")
        for other_service, other_key, other_state in seen.values():
            if overlap(key, other_key):
                problems.append(f"services {other_service} and {name} share a node key {key}")
            if overlap(state, other_state):
                problems.append(f"services {other_service} and {name} share a state directory {state}")
        seen[node_name] = (name, key, state)

        deps = depends_on(service)
        keygen = [k for k, kns in keygens.items() if locate(services[k], kns.out) == (key[0], key[1].parent)]
        if not keygen:
            problems.append(f"service {name}: no `fl-client keygen` service writes its key {key}")
        elif keygen[0] not in deps:
            problems.append(f"service {name}: starts before {keygen[0]} has written its key")
        public = (key[0], key[1].with_name("client.pub"))
        enroll = [e for e, ens in enrolls.items() if ens.name == node_name]
        if not enroll:
            problems.append(f"service {name}: node {node_name!r} is never enrolled (no fl-server enroll --name)")
            continue
        if locate(services[enroll[0]], enrolls[enroll[0]].public_key) != public:
            problems.append(f"service {enroll[0]}: enrolls a public key other than {name}'s {public}")
        if depends_on(services[link_name]).get(enroll[0]) != "service_completed_successfully":
            problems.append(f"service {link_name}: starts before {enroll[0]} completes (keys register at start)")
        enroll_deps = depends_on(services[enroll[0]])
        for before in (init_name, *keygen[:1]):
            if enroll_deps.get(before) != "service_completed_successfully":
                problems.append(f"service {enroll[0]}: runs before {before} completes")
    return problems


def _environment(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def guard_problems(compose: Compose) -> list[str]:
    """The set-up steps refuse to run twice (exit 2), so each must skip itself once done: its
    guard's $DONE must be the file its command writes last, or it reruns (and fails) or never runs."""
    from fedlora.hub.hub_dir import HubDir
    from fedlora.server.server_dir import ServerDir

    problems = []
    for name, (script, ns) in commands(compose).items():
        if (script, ns.command) == ("fl-server", "init"):
            written_last = ServerDir(ns.server_dir).settings_path
        elif (script, ns.command) == ("fl-hub", "init"):
            written_last = HubDir(ns.dir).operator_token_path
        elif (script, ns.command) == ("fl-client", "keygen"):
            written_last = ns.out / "client.pub"
        elif (script, ns.command) == ("fl-server", "enroll"):
            written_last = ServerDir(ns.server_dir).nodes_dir / f"{ns.name}.pub"
        else:
            continue
        service = compose["services"][name]
        done = _environment(service).get("DONE")
        if service.get("entrypoint") is None or done is None:
            problems.append(f"service {name}: `{script} {ns.command}` refuses to run twice, but nothing skips it")
        elif PurePosixPath(done) != PurePosixPath(str(written_last)):
            problems.append(f"service {name}: DONE={done}, but `{script} {ns.command}` writes {written_last} last")
    return problems


# ---------------------------------------------------------------------------------- hub

WILDCARD_HOSTS = ("0.0.0.0", "::")


def copies(script: str) -> list[tuple[PurePosixPath, PurePosixPath]]:
    """``(source, destination)`` of every ``cp [-OPTIONS] SOURCE DEST`` in an entrypoint's script."""
    found = re.findall(r"(?:^|[\s;&|])cp(?:\s+-\w+)*\s+([^\s;&|]+)\s+([^\s;&|]+)", script)
    return [(PurePosixPath(src), PurePosixPath(dst)) for src, dst in found]


def hub_problems(compose: Compose) -> list[str]:
    """The hub and the SuperLink that publishes to it. The hub directory (its signing key) is on a
    named volume only the hub's services mount; the hub binds every interface of its container at
    the port it publishes; init-hub copies out operator.token and hub.pub alone; the SuperLink's
    --hub names the hub service and that port, and its token and key files are those copies, on
    volumes it mounts; no client mounts the hub directory or a copy of the operator token, and
    every SuperNode gets hub.pub (fl-client pull --hub-key)."""
    from urllib.parse import urlsplit

    from fedlora.hub.hub_dir import DEFAULT_PORT, HubDir

    services = compose["services"]
    parsed = commands(compose)

    def named(script: str, command: str) -> dict[str, argparse.Namespace]:
        return {n: ns for n, (s, ns) in parsed.items() if s == script and ns.command == command}

    inits, serves = named("fl-hub", "init"), named("fl-hub", "serve")
    if len(inits) != 1 or len(serves) != 1:
        return [f"expected one `fl-hub init` and one `fl-hub serve` service, got {sorted(inits)}, {sorted(serves)}"]
    (init_name, init), (hub_name, serve) = next(iter(inits.items())), next(iter(serves.items()))
    hub_dir = HubDir(init.dir)
    home = locate(services[init_name], init.dir)
    if home is None or home[0] not in (compose.get("volumes") or {}):
        return [f"service {init_name}: {init.dir} is not on a named volume: the hub's key would die with it"]
    problems = []
    if locate(services[hub_name], serve.dir) != home:
        problems.append(f"service {hub_name}: serves {serve.dir}, not the hub directory {init_name} creates {home}")
    if depends_on(services[hub_name]).get(init_name) != "service_completed_successfully":
        problems.append(f"service {hub_name}: starts before {init_name} completes")
    for name, service in services.items():
        if name not in (init_name, hub_name) and any(m.source == home[0] for m in mounts(service)):
            problems.append(f"service {name}: mounts volume {home[0]!r}, which holds the hub's signing key")

    host = serve.host or init.host
    if host not in WILDCARD_HOSTS:
        problems.append(f"service {hub_name}: binds {host}, which other containers cannot reach (bind 0.0.0.0)")
    port = serve.port or init.port or DEFAULT_PORT
    if port not in _container_ports(services[hub_name]):
        problems.append(f"service {hub_name}: does not publish port {port} (the port it serves)")
    probe = " ".join(str(t) for t in (services[hub_name].get("healthcheck") or {}).get("test") or [])
    if f"127.0.0.1:{port}/v1/health" not in probe:
        problems.append(f"service {hub_name}: its healthcheck does not ask http://127.0.0.1:{port}/v1/health")
    hub_names = {hub_name, services[hub_name].get("hostname")}

    # where init-hub copies each file of the hub directory: (volume, path) locations
    script = str((services[init_name].get("entrypoint") or ["", "", ""])[2])
    published: dict[PurePosixPath, set[Location]] = {}
    for source, destination in copies(script):
        where = locate(services[init_name], destination)
        origin = locate(services[init_name], source)
        if origin is not None and overlap(origin, home) and where is not None and where[0] != home[0]:
            if source not in (PurePosixPath(hub_dir.operator_token_path), PurePosixPath(hub_dir.public_key_path)):
                problems.append(
                    f"service {init_name}: copies {source} out of the hub directory (only "
                    f"{hub_dir.operator_token_path.name} and {hub_dir.public_key_path.name} leave it)"
                )
            published.setdefault(source, set()).add(where)
    token_copies = published.get(PurePosixPath(hub_dir.operator_token_path), set())
    key_copies = published.get(PurePosixPath(hub_dir.public_key_path), set())

    publishers = {n: ns for n, ns in named("fl-server", "start").items() if ns.hub}
    if not publishers:
        problems.append("no `fl-server start` service publishes to the hub (--hub)")
    for name, ns in publishers.items():
        service, url = services[name], urlsplit(ns.hub)
        try:
            url_port = url.port or {"http": 80, "https": 443}.get(url.scheme)
        except ValueError as err:
            problems.append(f"service {name}: --hub {ns.hub}: {err}")
            continue
        if url.scheme != "http" or url.hostname not in hub_names or url_port != port:
            problems.append(f"service {name}: --hub {ns.hub}, but the hub serves http://{hub_name}:{port}")
        deps = depends_on(service)
        if deps.get(init_name) != "service_completed_successfully":
            problems.append(f"service {name}: starts before {init_name} has written the token it reads")
        if deps.get(hub_name) not in ("service_started", "service_healthy"):
            problems.append(f"service {name}: does not start the hub it publishes to ({hub_name})")
        for option, path, copied in (
            ("--hub-token-file", ns.hub_token_file, token_copies),
            ("--hub-key", ns.hub_key, key_copies),
        ):
            where = None if path is None else locate(service, path)
            if where not in copied:
                problems.append(
                    f"service {name}: {option} {path} is not a copy {init_name} makes on a volume it mounts"
                )

    for name, (script_name, _) in parsed.items():
        if script_name != "fl-client":
            continue
        volumes = {m.source for m in mounts(services[name])}
        problems += [
            f"service {name}: mounts volume {v!r}, which holds the hub's operator token"
            for v in sorted({v for v, _ in token_copies} & volumes)
        ]
        if name in named("fl-client", "start") and not {v for v, _ in key_copies} & volumes:
            problems.append(f"service {name}: mounts no volume {init_name} copies hub.pub to (fl-client pull)")
    return problems


# ------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(load_compose()["services"]))
def test_every_service_runs_one_console_script_with_valid_options(name: str) -> None:
    service = load_compose()["services"][name]
    try:
        parse_command(service.get("command"))
    except ValueError as err:
        pytest.fail(f"service {name}: {err}")
    assert entrypoint_problem(service.get("entrypoint")) is None


def test_the_parser_is_the_scripts_own_and_runs_nothing() -> None:
    from fedlora.server import cli

    with mock.patch.object(cli, "_start", side_effect=AssertionError("a handler ran")):
        script, ns = parse_command(["fl-server", "start", "/srv/fedlora", "--quiet"])
    assert script == "fl-server" and ns.command == "start" and ns.quiet and ns.server_dir == Path("/srv/fedlora")
    script, ns = parse_command(["fl-client", "start", "--server", "h:1", "--data", "embedded:copy", "--state-dir", "s"])
    assert script == "fl-client" and ns.command == "start" and ns.state_dir == Path("s")
    from fedlora.hub import cli as hub_cli

    with mock.patch.object(hub_cli, "_serve", side_effect=AssertionError("a handler ran")):
        script, ns = parse_command(["fl-hub", "serve", "/srv/hub", "--port", "9481"])
    assert script == "fl-hub" and ns.command == "serve" and ns.dir == Path("/srv/hub") and ns.port == 9481
    with pytest.raises(ValueError, match=r"^fl-hub: error: unrecognized arguments: --hub"):
        parse_command(["fl-hub", "init", "/srv/hub", "--hub", "http://hub:9480"])  # fl-server's option, not fl-hub's


def test_volumes_are_declared_or_binds_inside_the_repository() -> None:
    assert volume_problems(load_compose()) == []


def test_dependencies_exist_and_one_shot_steps_complete_first() -> None:
    assert dependency_problems(load_compose()) == []


def test_every_service_runs_the_image_this_dockerfile_builds() -> None:
    assert build_problems(load_compose()) == []


def test_server_and_clients_agree() -> None:
    """One server directory, port and certificate name; per node its own key, state, keygen, enrolment."""
    assert deployment_problems(load_compose()) == []


def test_set_up_steps_skip_themselves_once_done() -> None:
    assert guard_problems(load_compose()) == []


def test_the_hub_keeps_its_key_and_the_superlink_publishes_to_it() -> None:
    """The key volume only the hub's; the SuperLink's --hub at the hub's address, with init-hub's
    copies of operator.token and hub.pub; no client near the operator token; hub.pub for every node."""
    assert hub_problems(load_compose()) == []


def test_every_volume_is_mounted_where_the_image_gives_its_user_a_directory() -> None:
    assert mount_point_problems(load_compose()) == []


def test_supernodes_use_data_they_can_load() -> None:
    from fedlora.core.client_data import check_node_data

    compose = load_compose()
    nodes = _client_services(compose)
    assert nodes
    for name in nodes:
        data = commands(compose)[name][1].data
        if data.startswith("embedded:"):  # a bind-mounted file is checked by fl-client start itself
            check_node_data(data)


def test_the_run_the_superlink_starts_is_a_valid_deployment() -> None:
    """server.toml as `fl-server init` writes it, with the start's overrides, as `fl-server start` checks it."""
    from fedlora.core.config import FederationConfig
    from fedlora.core.flower_runner import parse_run_config_pairs
    from fedlora.server.deploy import DEPLOYED_KEY
    from fedlora.server.server_dir import DEFAULT_DEPLOY_RUN_CONFIG

    parsed = commands(load_compose()).values()
    (init,) = [ns for s, ns in parsed if s == "fl-server" and ns.command == "init"]
    (start,) = [ns for s, ns in parsed if s == "fl-server" and ns.command == "start"]
    run = {**DEFAULT_DEPLOY_RUN_CONFIG, **parse_run_config_pairs(init.run_config)}
    run |= parse_run_config_pairs(start.run_config)
    FederationConfig.from_run_config({**run, "run-dir": "/srv/fedlora/runs/x", DEPLOYED_KEY: True})


def test_dockerfile_installs_the_makefiles_cpu_torch_then_the_project_as_non_root() -> None:
    text = DOCKERFILE.read_text()
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    makefile_torch = re.search(r"^TORCH \?= (\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert makefile_torch is not None
    assert lines[0] == "FROM python:3.11-slim"
    assert f"ARG TORCH_SPEC={makefile_torch.group(1)}" in lines
    assert makefile_torch.group(1) == "torch==2.13.0"
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines
    torch_install = next(i for i, line in enumerate(lines) if '"${TORCH_SPEC}"' in line)
    assert re.search(r'pip install .*--index-url "\$\{TORCH_INDEX\}"', lines[torch_install])
    copied = re.search(r"^COPY \. (\S+)$", text, re.M)
    assert copied is not None, "the project is copied into the image and installed from there"
    project_install = next(i for i, line in enumerate(lines) if f"pip install {copied.group(1)}" in line)
    assert torch_install < project_install, "torch first, or pip fetches PyPI's default build for the project"
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0", "0:0"), "the image must run as a non-root user"
    for variable in (
        "FLWR_DISABLE_UPDATE_CHECK=1",
        "FLWR_TELEMETRY_ENABLED=0",
        "HF_HUB_OFFLINE=1",
        "TRANSFORMERS_OFFLINE=1",
    ):
        assert re.search(rf"^\s*(ENV\s+)?{variable}\b", text, re.M), variable
    assert "ENTRYPOINT" not in text


def test_dockerignore_keeps_what_pip_install_needs_and_drops_local_state() -> None:
    ignored = {
        line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    }
    assert {".git", ".venv", "runs"} <= ignored
    needed = {"pyproject.toml", "README.md", "client", "server", "privacy", "simulations", "strategies"}
    assert not needed & ignored


def _running(compose: Compose, script: str, command: str) -> list[str]:
    """The services whose command is ``script command ...``."""
    return [n for n, (s, ns) in commands(compose).items() if (s, ns.command) == (script, command)]


def _client_services(compose: Compose) -> list[str]:
    return _running(compose, "fl-client", "start")


def _set_option(compose: Compose, service: str, option: str, value: str) -> None:
    """Give ``option`` of ``service``'s command ``value``."""
    command = compose["services"][service]["command"]
    command[command.index(option) + 1] = value


def _hub_script(compose: Compose) -> list[str]:
    """init-hub's entrypoint, whose script copies operator.token and hub.pub out of the hub directory."""
    return compose["services"][_running(compose, "fl-hub", "init")[0]]["entrypoint"]


def _break(edit: Callable[[Compose], None]) -> Compose:
    compose = copy.deepcopy(load_compose())
    edit(compose)
    return compose


def test_an_unknown_option_is_caught_with_the_service_and_the_parsers_message() -> None:
    victim = _client_services(load_compose())[-1]
    broken = _break(lambda c: c["services"][victim]["command"].append("--no-such-option"))
    problems = command_problems(broken)
    assert len(problems) == 1
    assert victim in problems[0] and "unrecognized arguments: --no-such-option" in problems[0]


BREAKAGES: dict[str, tuple[Callable[[Compose], None], Callable[[Compose], list[str]], str]] = {
    "not a console script": (
        lambda c: c["services"]["superlink"].update(command=["flower-superlink", "--insecure"]),
        command_problems,
        "is not a console script",
    ),
    "a missing required option": (
        lambda c: c["services"]["superlink"].update(command=["fl-server", "enroll", "/srv/fedlora", "k.pub"]),
        command_problems,
        "the following arguments are required: --name",
    ),
    "a number in the command": (
        lambda c: c["services"]["init-server"]["command"].__setitem__(-1, 9092),
        command_problems,
        "quote numbers",
    ),
    "a shell command": (
        lambda c: c["services"]["superlink"].update(command="fl-server start /srv/fedlora"),
        command_problems,
        "exec form",
    ),
    "an entrypoint that drops the command": (
        lambda c: c["services"]["superlink"].update(entrypoint=["sh", "-c", "sleep 1", "x"]),
        command_problems,
        "entrypoint",
    ),
    "an undeclared volume": (
        lambda c: c["volumes"].pop(next(iter(c["volumes"]))),
        volume_problems,
        "not declared",
    ),
    "a bind mount outside the repository": (
        lambda c: c["services"]["superlink"]["volumes"].append("../secrets:/secrets:ro"),
        volume_problems,
        "outside the repository",
    ),
    "a dependency on no service": (
        lambda c: c["services"]["superlink"]["depends_on"].update({"nobody": {"condition": "service_started"}}),
        dependency_problems,
        "not a service",
    ),
    "a dependency cycle": (
        lambda c: c["services"]["init-server"].update(
            depends_on={"superlink": {"condition": "service_completed_successfully"}}
        ),
        dependency_problems,
        "cycle",
    ),
    "a node sharing another's state": (
        lambda c: c["services"][_client_services(c)[1]]["volumes"].__setitem__(
            -1, c["services"][_client_services(c)[0]]["volumes"][-1]
        ),
        deployment_problems,
        "share a state directory",
    ),
    "a node that can read the CA key": (
        lambda c: c["services"][_client_services(c)[0]]["volumes"].append("server:/srv/fedlora:ro"),
        deployment_problems,
        "holds the CA and server keys",
    ),
    "a node never enrolled": (
        lambda c: c["services"].pop(_running(c, "fl-server", "enroll")[0]),
        deployment_problems,
        "is never enrolled",
    ),
    "a port the SuperLink does not publish": (
        lambda c: c["services"]["superlink"].update(ports=["9093:9093"]),
        deployment_problems,
        "does not publish port 9092",
    ),
    "a name the certificate lacks": (
        lambda c: c["services"]["init-server"]["command"].__setitem__(4, "localhost"),
        deployment_problems,
        "does not name",
    ),
    "a guard watching the wrong file": (
        lambda c: c["services"]["init-server"]["environment"].update(DONE="/srv/fedlora/ca.pem"),
        guard_problems,
        "writes /srv/fedlora/server.toml last",
    ),
    "a set-up step without a guard": (
        lambda c: c["services"][_running(c, "fl-client", "keygen")[0]].pop("entrypoint"),
        guard_problems,
        "refuses to run twice",
    ),
    "a hub guard watching the wrong file": (
        lambda c: c["services"]["init-hub"]["environment"].update(DONE="/srv/hub/hub.toml"),
        guard_problems,
        "writes /srv/hub/operator.token last",
    ),
    "a SuperLink publishing to a port the hub does not serve": (
        lambda c: _set_option(c, "superlink", "--hub", "http://hub:9481"),
        hub_problems,
        "but the hub serves http://hub:9480",
    ),
    "a SuperLink publishing to its own container": (
        lambda c: _set_option(c, "superlink", "--hub", "http://127.0.0.1:9480"),
        hub_problems,
        "but the hub serves http://hub:9480",
    ),
    "a hub health check on another port": (
        lambda c: c["services"]["hub"]["healthcheck"]["test"].__setitem__(
            -1, "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9481/v1/health')"
        ),
        hub_problems,
        "its healthcheck does not ask http://127.0.0.1:9480/v1/health",
    ),
    "waiting for a hub to be healthy that has no health check": (
        lambda c: c["services"]["hub"].pop("healthcheck"),
        dependency_problems,
        "waits for hub to be healthy, but hub has no healthcheck",
    ),
    "a hub serving another port than it publishes": (
        lambda c: c["services"]["hub"]["command"].extend(["--port", "9481"]),
        hub_problems,
        "does not publish port 9481",
    ),
    "a hub bound to its container's loopback": (
        lambda c: _set_option(c, "init-hub", "--host", "127.0.0.1"),
        hub_problems,
        "cannot reach",
    ),
    "a client mounting the hub's key volume": (
        lambda c: c["services"][_client_services(c)[0]]["volumes"].append("hub:/srv/hub:ro"),
        hub_problems,
        "holds the hub's signing key",
    ),
    "a SuperLink mounting the hub's key volume": (
        lambda c: c["services"]["superlink"]["volumes"].append("hub:/srv/hub:ro"),
        hub_problems,
        "service superlink: mounts volume 'hub'",
    ),
    "a client mounting the operator token": (
        lambda c: c["services"][_client_services(c)[-1]]["volumes"].append("hub-publish:/hub-publish:ro"),
        hub_problems,
        "holds the hub's operator token",
    ),
    "the operator token copied where the clients read": (
        lambda c: _hub_script(c).__setitem__(2, _hub_script(c)[2] + " && cp /srv/hub/operator.token /certs/"),
        hub_problems,
        "holds the hub's operator token",
    ),
    "the hub's private key copied out": (
        lambda c: _hub_script(c).__setitem__(2, _hub_script(c)[2] + "; cp -p /srv/hub/hub.key /hub-publish/hub.key"),
        hub_problems,
        "copies /srv/hub/hub.key out of the hub directory",
    ),
    "a token file the SuperLink does not mount": (
        lambda c: _set_option(c, "superlink", "--hub-token-file", "/srv/hub/operator.token"),
        hub_problems,
        "--hub-token-file /srv/hub/operator.token is not a copy init-hub makes",
    ),
    "a hub key init-hub never copies": (
        lambda c: _set_option(c, "superlink", "--hub-key", "/srv/fedlora/hub.pub"),
        hub_problems,
        "--hub-key /srv/fedlora/hub.pub is not a copy",
    ),
    "a SuperLink starting before the hub's token exists": (
        lambda c: c["services"]["superlink"]["depends_on"].pop("init-hub"),
        hub_problems,
        "starts before init-hub has written the token",
    ),
    "a client without hub.pub": (
        lambda c: c["services"][_client_services(c)[1]]["volumes"].pop(0),
        hub_problems,
        "mounts no volume init-hub copies hub.pub to",
    ),
    "a volume mounted where the image has no directory": (
        lambda c: c["services"]["hub"]["volumes"].__setitem__(0, "hub:/var/lib/hub"),
        mount_point_problems,
        "volume 'hub' at /var/lib/hub, which the Dockerfile does not create",
    ),
    "more nodes than the run waits for": (
        lambda c: _set_option(c, "superlink", "--run-config", "num-clients=2 dp.plan-examples=500"),
        deployment_problems,
        "num-clients=2",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_the_checkers_catch(breakage: str) -> None:
    edit, checker, expected = BREAKAGES[breakage]
    assert checker(load_compose()) == []
    problems = checker(_break(edit))
    assert any(expected in p for p in problems), problems
