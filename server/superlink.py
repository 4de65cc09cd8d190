"""Flower's own ``flower-superlink``, with one guard in front of its HTTP app.

Flower 1.41 serves the Fleet (node), Control and Runtime APIs on one port, and open-source
Flower has no login on the Control API: anyone who reaches the port could submit runs or
register nodes. SuperNodes must reach the port from other machines, so binding to loopback
is no answer. This launcher runs Flower's unchanged command-line entry point, with an ASGI
middleware added to the app Flower builds, that

- answers ``403`` to Control and Runtime requests from any peer that is not loopback
  (``--expose-control`` lifts that for operators who put their own gate in front), and
- logs the SHA-256 fingerprint of every SuperNode key Flower refuses, so an operator can
  match a refused node against ``fl-server enroll`` output.

Transport, TLS and node authentication stay Flower's. Run as
``python -m fedlora.server.superlink [--expose-control] -- <flower-superlink arguments>``.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

from fedlora.core.pki import fingerprint_pem

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: path prefixes of the APIs only the server's own processes (and its operator) may call
PRIVATE_PREFIXES = ("/v1/control", "/v1/runtime")
#: the Fleet calls whose refusal means "this key is not registered"
NODE_ACTIVATION_PATHS = ("/v1/fleet/activate-node", "/v1/fleet/register-node")
PUBLIC_KEY_HEADER = b"flwr-public-key"  # Flower's FLEET_HTTP_PUBLIC_KEY_HEADER (base64 of a PEM key)

logger = logging.getLogger("fedlora.superlink")


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; a missing or odd peer address is not."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def key_fingerprint(header_value: bytes) -> str:
    """SSH-style fingerprint of the PEM key a SuperNode sent (base64 in a header)."""

    try:
        return fingerprint_pem(base64.b64decode(header_value, validate=True))
    except ValueError:
        return "<unreadable key>"


class ControlGuard:
    """ASGI middleware: Control/Runtime for loopback peers only; log refused node keys.

    Parameters
    ----------
    app
        Flower's SuperLink app.
    expose_control
        Let every peer reach the Control and Runtime APIs (Flower's behaviour).
    """

    def __init__(self, app: ASGIApp, expose_control: bool = False) -> None:
        self.app = app
        self.expose_control = expose_control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = str(scope.get("path", ""))
        client = scope.get("client")
        peer = str(client[0]) if client else None
        if not self.expose_control and path.startswith(PRIVATE_PREFIXES) and not is_loopback(peer):
            logger.warning("refused %s from %s: the control and runtime APIs answer loopback only", path, peer)
            body = json.dumps(
                {"detail": "the control and runtime APIs of this SuperLink answer loopback only (fl-server start)"}
            ).encode()
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


def _install_guard(expose_control: bool) -> None:
    """Wrap Flower's ``create_app`` so the app it returns carries :class:`ControlGuard` outermost."""
    import flwr.superlink.main as link_main

    original = link_main.create_app

    def create_app(*args: Any, **kwargs: Any) -> Any:
        app = original(*args, **kwargs)
        app.add_middleware(ControlGuard, expose_control=expose_control)  # outermost: added last
        return app

    link_main.create_app = create_app


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedlora.server.superlink [--expose-control] -- ARGS``: Flower's SuperLink, guarded."""
    args = list(sys.argv[1:] if argv is None else argv)
    ours, flower_args = (args[: args.index("--")], args[args.index("--") + 1 :]) if "--" in args else ([], args)
    unknown = [a for a in ours if a != "--expose-control"]
    if unknown:
        raise SystemExit(
            f"fedlora.server.superlink: unknown option(s) {unknown}; only --expose-control comes before --"
        )
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s fedlora: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    _install_guard("--expose-control" in ours)
    from flwr.superlink.cli.flower_superlink import flower_superlink

    sys.argv = ["flower-superlink", *flower_args]  # Flower's parser reads sys.argv
    flower_superlink()


if __name__ == "__main__":
    main()
