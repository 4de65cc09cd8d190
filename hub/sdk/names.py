"""Adapter names, namespaces and who may read or write them: pure functions, no I/O.

A name is ``<namespace>/<segment>[/<segment>]``:

- ``global/<run>/<round>``      a federation's global adapter after a round (operator writes)
- ``clients/<client>/<name>``   a client's personal adapters (that client reads and writes)
- ``tasks/<task>``              task adapters, e.g. the experts of the zero-shot generators
- ``generated/<id>``            adapters generated zero-shot for a described task
- ``generators/<method>``       the zero-shot generators themselves (operator only)

Every segment is ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``: no ``/``, no ``..``, nothing a file
system or a URL could misread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: namespace -> number of segments a full name has (the namespace included)
NAMESPACES: dict[str, int] = {"global": 3, "clients": 3, "tasks": 2, "generated": 2, "generators": 2}
#: what any client token may read besides its own namespace
PUBLIC_NAMESPACES = ("global", "tasks", "generated")

Role = Literal["operator", "client"]


def check_segment(value: str, what: str) -> str:
    if not isinstance(value, str) or not SEGMENT.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{what} {value!r} is not a valid name: 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
        )
    return value


def check_name(name: str) -> str:
    """``name`` itself if it is a full adapter name; otherwise ValueError saying what is wrong."""
    if not isinstance(name, str) or not name:
        raise ValueError("an adapter name is required (e.g. global/<run>/<round>, clients/<client>/<name>)")
    parts = name.split("/")
    ns = parts[0]
    if ns not in NAMESPACES:
        raise ValueError(f"adapter name {name!r}: unknown namespace {ns!r} (known: {', '.join(NAMESPACES)})")
    if len(parts) != NAMESPACES[ns]:
        shape = {"global": "global/<run>/<round>", "clients": "clients/<client>/<name>"}.get(ns, f"{ns}/<name>")
        raise ValueError(f"adapter name {name!r}: a {ns} name has the form {shape}")
    for part in parts[1:]:
        check_segment(part, f"adapter name {name!r}: segment")
    if ns == "global" and not parts[2].isdigit():
        raise ValueError(f"adapter name {name!r}: the last segment of a global name is the round number")
    return name


def check_prefix(prefix: str) -> str:
    """A listing prefix: empty, a namespace, or whole segments of a name (``clients/alice``)."""
    if prefix == "":
        return prefix
    parts = prefix.rstrip("/").split("/")
    if parts[0] not in NAMESPACES:
        raise ValueError(f"prefix {prefix!r}: unknown namespace {parts[0]!r} (known: {', '.join(NAMESPACES)})")
    if len(parts) > NAMESPACES[parts[0]]:
        raise ValueError(f"prefix {prefix!r} is longer than a {parts[0]} name")
    for part in parts[1:]:
        check_segment(part, f"prefix {prefix!r}: segment")
    return prefix


def namespace(name: str) -> str:
    return name.split("/", 1)[0]


def owner(name: str) -> str | None:
    """The client a ``clients/`` name belongs to; None for the other namespaces."""
    parts = name.split("/")
    return parts[1] if parts[0] == "clients" and len(parts) > 1 else None


@dataclass(frozen=True)
class Principal:
    """Who a token speaks for: the operator (everything) or one client."""

    role: Role
    client: str | None = None
    label: str = ""

    def __post_init__(self) -> None:
        if self.role not in ("operator", "client"):
            raise ValueError(f"role must be operator or client, got {self.role!r}")
        if self.role == "client":
            check_segment(self.client or "", "client name")
        elif self.client is not None:
            raise ValueError("an operator token belongs to no client")

    @property
    def describe(self) -> str:
        return (
            "operator" + (f" ({self.label})" if self.label else "")
            if self.role == "operator"
            else f"client {self.client}"
        )

    def can_read(self, name: str) -> bool:
        return self.role == "operator" or namespace(name) in PUBLIC_NAMESPACES or owner(name) == self.client

    def can_write(self, name: str) -> bool:
        return self.role == "operator" or owner(name) == self.client

    def read_denied(self, name: str) -> str:
        return (
            f"{self.describe} may not read {name}: "
            f"clients read global/, tasks/, generated/ and their own clients/{self.client}/"
        )

    def write_denied(self, name: str) -> str:
        if namespace(name) in ("global", "tasks", "generated"):
            return f"{self.describe} may not publish to {namespace(name)}/: that needs an operator token"
        return f"{self.describe} may not publish {name}: a client writes only clients/{self.client}/"
