"""Flower's own ``flower-superlink``, with one guard in front of its HTTP app.

Flower serves the Fleet (node), Control and Runtime APIs on one port, and open-source Flower
has no login on the Control API: whoever reaches it can list, submit and stop runs, and a
submitted app runs with the operator's authority (on the server host and on every client).
SuperNodes must reach the port from other machines, so binding to loopback is no answer, and
loopback alone is not the operator either: every local account, and any TCP forwarder one of
them runs, connects from 127.0.0.1. This launcher runs Flower's unchanged command-line entry
point, with an ASGI middleware added to the app Flower builds, that

- answers ``403`` to Control and Runtime requests unless the connection comes from loopback
  *and* its client socket belongs to the account the SuperLink runs as (the operator: the
  kernel's socket table names the owner of each end of a loopback connection), and
  ``--expose-control`` lifts both for operators who put their own gate in front; and
- logs the SHA-256 fingerprint of every SuperNode key Flower refuses, so an operator can
  match a refused node against ``fl-server enroll`` output.

Transport, TLS and node authentication stay Flower's. ``fl-server start`` and ``fl-sim`` both
run their SuperLink this way:
``python -m fedlora.core.superlink [--expose-control] -- <flower-superlink arguments>``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import os
import struct
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fedlora.core.pki import fingerprint_pem

Scope = MutableMapping[str, Any]
Address = tuple[str, int]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: path prefixes of the APIs only the server's own processes (and its operator) may call
PRIVATE_PREFIXES = ("/v1/control", "/v1/runtime")
#: the Fleet calls whose refusal means "this key is not registered"
NODE_ACTIVATION_PATHS = ("/v1/fleet/activate-node", "/v1/fleet/register-node")
PUBLIC_KEY_HEADER = b"flwr-public-key"  # Flower's FLEET_HTTP_PUBLIC_KEY_HEADER (base64 of a PEM key)
#: the kernel's tables of TCP sockets in this network namespace (every account's, with owners)
SOCKET_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
#: the one socket state a requesting client's end can be in: a client that closed its end
#: (FIN_WAIT2 and the like) is listed with uid 0 and inode 0, the owner gone
_ESTABLISHED = "01"
#: connections whose owner the guard remembers (see ControlGuard._owners)
_OWNER_CACHE = 1024
#: headers with which a peer names another address: uvicorn would rewrite the peer from them
PROXY_HEADERS = (b"x-forwarded-for", b"forwarded", b"x-real-ip")

logger = logging.getLogger("fedlora.superlink")


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; a missing or odd peer address is not."""
    if not host:
        return False
    try:
        return ipaddress.ip_address(_normal(host)).is_loopback
    except ValueError:
        return False


def _normal(host: str) -> str:
    """One spelling per address: IPv4-mapped IPv6 as IPv4, zone ids dropped."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address)


def _kernel_spellings(address: Address) -> frozenset[str]:
    """How the kernel's socket tables print ``address``: ``0100007F:1F90`` in ``/proc/net/tcp``
    (the address in 32-bit words of this machine's byte order, then the port), 32 hex digits in
    ``/proc/net/tcp6``, where an IPv4 peer of an IPv6 socket appears IPv4-mapped."""
    host, port = _normal(address[0]), int(address[1])
    ip = ipaddress.ip_address(host)
    forms = [ip.packed, ipaddress.IPv6Address(f"::ffff:{host}").packed] if ip.version == 4 else [ip.packed]
    spellings = set()
    for packed in forms:
        words = struct.unpack(f"={len(packed) // 4}I", packed)
        spellings.add("".join(f"{w:08X}" for w in words) + f":{port:04X}")
    return frozenset(spellings)


def socket_owner(local: Address, remote: Address, tables: Sequence[str]) -> int | None:
    """The uid owning the TCP socket whose own end is ``local`` and whose peer is ``remote``,
    read from the text of ``/proc/net/tcp``-style tables; None if no live socket matches.
    Lines are matched as text (the addresses spelled as the kernel does): a lookup runs on every
    control and runtime request, so it must stay cheap with thousands of sockets."""
    ours, theirs = _kernel_spellings(local), _kernel_spellings(remote)
    for table in tables:
        for line in table.splitlines()[1:]:
            fields = line.split()
            if len(fields) < 10 or fields[1] not in ours or fields[2] not in theirs:
                continue
            if fields[3] != _ESTABLISHED or fields[9] == "0":
                continue  # not a live connection with an owning socket (inode 0: orphaned)
            try:
                return int(fields[7])
            except ValueError:
                return None
    return None


def peer_owner(scope: Scope) -> int | None:
    """The uid owning the client end of this request's connection (None: not found, e.g. the
    peer is on another machine or the address was rewritten by proxy headers)."""
    client, server = scope.get("client"), scope.get("server")
    if not client or not server:
        return None
    tables = []
    for path in SOCKET_TABLES:
        try:
            with open(path, encoding="ascii") as f:
                tables.append(f.read())
        except OSError:
            continue
    try:
        return socket_owner((str(client[0]), int(client[1])), (str(server[0]), int(server[1])), tables)
    except ValueError:  # an address that is no IP address
        return None


def key_fingerprint(header_value: bytes) -> str:
    """SSH-style fingerprint of the PEM key a SuperNode sent (base64 in a header)."""

    try:
        return fingerprint_pem(base64.b64decode(header_value, validate=True))
    except ValueError:
        return "<unreadable key>"


class ControlGuard:
    """ASGI middleware: Control/Runtime for the operator's own local processes only; log
    refused node keys.

    Parameters
    ----------
    app
        Flower's SuperLink app.
    expose_control
        Let every peer reach the Control and Runtime APIs (Flower's behaviour).
    operator_uid
        The account allowed (default: the one this process runs as).
    owner_of
        Finds the uid owning a request's client socket (default: the kernel's socket tables).
    """

    def __init__(
        self,
        app: ASGIApp,
        expose_control: bool = False,
        operator_uid: int | None = None,
        owner_of: Callable[[Scope], int | None] = peer_owner,
    ) -> None:
        self.app = app
        self.expose_control = expose_control
        self.operator_uid = os.getuid() if operator_uid is None else operator_uid
        self.owner_of = owner_of
        # connection -> its client socket's owner. uvicorn hands every request of one connection
        # the same ``client`` tuple object, made when the connection opened; holding it here keeps
        # its id from being reused, so a later connection (a new tuple) never hits another's entry.
        # Reading the kernel's socket tables costs 10-30 ms here, and Flower polls the runtime API
        # several times a second over one keep-alive connection.
        self._owners: OrderedDict[int, tuple[object, int | None]] = OrderedDict()

    def _owner(self, scope: Scope) -> int | None:
        client = scope.get("client")
        cached = self._owners.get(id(client))
        if cached is not None and cached[0] is client:
            self._owners.move_to_end(id(client))
            return cached[1]
        owner = self.owner_of(scope)
        if client is not None:
            self._owners[id(client)] = (client, owner)
            while len(self._owners) > _OWNER_CACHE:
                self._owners.popitem(last=False)
        return owner

    def refusal(self, scope: Scope, peer: str | None) -> str | None:
        """Why this Control/Runtime request is refused (None: it comes from the operator)."""
        if not is_loopback(peer):
            return "the control and runtime APIs of this SuperLink answer loopback only"
        names = {name.lower() for name, _ in scope.get("headers") or []}
        if any(h in names for h in PROXY_HEADERS):  # the peer address would not be the socket's own
            return "the control and runtime APIs of this SuperLink take no proxy headers (X-Forwarded-For, Forwarded)"
        owner = self._owner(scope)
        if owner != self.operator_uid:
            who = "an unknown account" if owner is None else f"uid {owner}"
            return (
                f"the control and runtime APIs of this SuperLink answer its operator's account "
                f"(uid {self.operator_uid}) only; this connection belongs to {who}"
            )
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        client = scope.get("client")
        peer = str(client[0]) if client else None
        reason = None
        if not self.expose_control and path.startswith(PRIVATE_PREFIXES):
            reason = self.refusal(scope, peer)
        if reason is not None:
            logger.warning("refused %s from %s: %s", path, peer, reason)
            body = json.dumps({"detail": reason}).encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        if not path.startswith(NODE_ACTIVATION_PATHS):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])

        async def watch(message: Message) -> None:
            if message.get("type") == "http.response.start" and int(message.get("status", 200)) >= 400:
                key = headers.get(PUBLIC_KEY_HEADER)
                fingerprint = key_fingerprint(key) if key else "<no key sent>"
                logger.warning(
                    "refused SuperNode from %s: key %s is not enrolled (fl-server enroll) or failed to authenticate",
                    peer,
                    fingerprint,
                )
            await send(message)

        await self.app(scope, receive, watch)


def _loopback_owner_unknown(scope: Scope) -> int | None:
    """Where the kernel's socket tables cannot be read: every loopback peer counts as the operator."""
    return os.getuid()


def _install_guard(expose_control: bool) -> None:
    """Wrap Flower's ``create_app`` so the app it returns carries :class:`ControlGuard` outermost."""
    import flwr.superlink.main as link_main

    original = link_main.create_app
    owner_of: Callable[[Scope], int | None] = peer_owner
    if not expose_control and not any(os.access(path, os.R_OK) for path in SOCKET_TABLES):
        owner_of = _loopback_owner_unknown
        logger.warning(
            "cannot read %s: local accounts cannot be told apart, so the control and runtime APIs "
            "answer every loopback peer (keep other accounts off this host or network namespace)",
            " or ".join(SOCKET_TABLES),
        )

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        app.add_middleware(ControlGuard, expose_control=expose_control, owner_of=owner_of)  # outermost: added last
        return app

    link_main.create_app = create_app


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedlora.core.superlink [--expose-control] -- ARGS``: Flower's SuperLink, guarded."""
    args = list(sys.argv[1:] if argv is None else argv)
    ours, flower_args = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else ([], args)
    unknown = [a for a in ours if a != "--expose-control"]
    if unknown:
        raise SystemExit(f"fedlora.core.superlink: unknown option(s) {unknown}; only --expose-control comes before --")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s fedlora: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default and would rewrite the peer
    # address (port included) from it: the guard must see the socket's own address
    os.environ["FORWARDED_ALLOW_IPS"] = ""
    _install_guard("--expose-control" in ours)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *flower_args]  # Flower's parser reads sys.argv
    flower_superlink()


if __name__ == "__main__":
    main()
