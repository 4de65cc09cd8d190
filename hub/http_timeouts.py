"""uvicorn's HTTP/1.1 protocol with the two timeouts it lacks: request headers and body reads.

uvicorn times out an idle keep-alive connection, but a client that opens a connection and
sends nothing, or sends headers or a body a byte at a time, holds a connection and a file
descriptor for ever: 1,000 such clients held a hub worker's sockets for as long as they
liked. Here the request headers must be complete within ``header_timeout`` seconds of the
connection (or of the previous response); while a body is read each read must follow the
last within ``body_timeout`` seconds and the whole body arrive at :data:`MIN_BODY_RATE` at
least (so a byte now and then does not hold it either); and a client that stops reading its
response for ``body_timeout`` seconds is dropped too. Otherwise the connection is aborted
(buffered output dropped, not drained) and the reason logged.
The limits come from the hub's settings through the environment, so every worker process of
``fl-hub serve --workers N`` reads the same ones.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEADER_TIMEOUT_ENV = "FEDLORA_HUB_HEADER_TIMEOUT"
BODY_TIMEOUT_ENV = "FEDLORA_HUB_BODY_TIMEOUT"
DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_BODY_TIMEOUT = 30.0
#: the slowest a request body may arrive on average, bytes per second, after ``body_timeout``
MIN_BODY_RATE = 16 * 1024
#: the body size assumed for the deadline when a request declares none (chunked)
UNDECLARED_BODY = 64 << 20

logger = logging.getLogger("fedlora.hub")


def _seconds(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


class TimedH11Protocol(H11Protocol):
    """:class:`H11Protocol` that closes connections whose request headers or body stall."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout = _seconds(HEADER_TIMEOUT_ENV, DEFAULT_HEADER_TIMEOUT)
        self.body_timeout = _seconds(BODY_TIMEOUT_ENV, DEFAULT_BODY_TIMEOUT)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._body_cycle: object = None  # the request whose body the deadline below is for
        self._body_deadline = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._follow()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        self._follow()

    def pause_writing(self) -> None:
        """The client is not reading what we send: it has ``body_timeout`` seconds to resume."""
        super().pause_writing()
        if self._write_timer is None:
            self._write_timer = self.loop.call_later(self.body_timeout, self._write_late)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None

    def _awaiting_request(self) -> bool:
        """No request in progress: the next one's headers are due."""
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _follow(self) -> None:
        """After every event: while a request is awaited the header clock runs (once, from the
        start of the wait, so headers sent a byte at a time do not reset it); while a body is
        read the body clock restarts at each read; otherwise neither runs."""
        if self.transport.is_closing():
            self._cancel()
            return
        if not self._awaiting_request():
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
        elif self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        if self.conn.their_state is h11.SEND_BODY:
            now = self.loop.time()
            if self._body_cycle is not self.cycle:  # a new request's body: its overall deadline
                self._body_cycle = self.cycle
                self._body_deadline = now + self.body_timeout + self._declared_length() / MIN_BODY_RATE
            if now >= self._body_deadline:
                self._close(f"the request body came slower than {MIN_BODY_RATE} bytes/s on average")
                return
            overall = self._body_deadline - now < self.body_timeout
            wait = self._body_deadline - now if overall else self.body_timeout
            self._body_timer = self.loop.call_later(wait, self._body_late, overall)

    def _declared_length(self) -> int:
        for name, value in self.headers:
            if name == b"content-length" and value.strip().isdigit():
                return int(value)
        return UNDECLARED_BODY

    def _headers_late(self) -> None:
        self._header_timer = None
        if self._awaiting_request():
            self._close(f"no complete request headers within {self.header_timeout:g} s")

    def _body_late(self, overall: bool) -> None:
        self._body_timer = None
        if self.conn.their_state is not h11.SEND_BODY:
            return
        if overall:
            self._close(f"the request body came slower than {MIN_BODY_RATE} bytes/s on average")
        else:
            self._close(f"the request body stalled for {self.body_timeout:g} s")

    def _write_late(self) -> None:
        self._write_timer = None
        self._close(f"the client read none of its response for {self.body_timeout:g} s")

    def _close(self, reason: str) -> None:
        if self.transport.is_closing():
            return
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        logger.warning("closed the connection from %s: %s", peer, reason)
        self._cancel()
        self.transport.abort()  # close() would wait for buffered output a stalled client never reads

    def _cancel(self) -> None:
        for timer in (self._header_timer, self._body_timer, self._write_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = self._write_timer = None
