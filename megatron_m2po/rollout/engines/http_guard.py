"""Keep an aiohttp server answering when its clients are slow, many or noisy.

aiohttp waits for a request head as long as the connection stays open, accepts connections until the
process runs out of file descriptors, and logs every failure with its traceback. A few hundred clients
that send their headers a byte at a time then lock everyone else out and fill the disk with logs. This
module adds, for one server:

- a deadline for each request head: `header_timeout_s` from the connection's opening, or from the first
  byte of a next request on a kept-alive connection (idle kept-alive connections are aiohttp's
  `keepalive_timeout`); the server answers 408 and closes;
- a cap on open connections: at the cap, the oldest connection still waiting for a request head (then the
  oldest idle kept-alive one) gives way to the new one, so a client that sends its head at once gets in
  however many slow ones are open; when every connection is busy in a handler the new one gets 503;
- rate-limited logging: at most `burst` records per logger and message in each `window_s`, then one line
  saying how many were left out.

The body deadline, which needs the request, is the server's middleware (`read_body` in local_server.py);
it calls `request_started` / `request_finished` so the head deadline is off while a handler runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from aiohttp import web

logger = logging.getLogger(__name__)

_REFUSED = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class RateLimitFilter(logging.Filter):
    """Pass at most `burst` records per (logger, message template) in each `window_s`; the first record
    after a window in which some were dropped says how many."""

    def __init__(self, burst: int = 10, window_s: float = 60.0):
        super().__init__()
        self.burst, self.window_s = burst, window_s
        self._seen: dict[tuple[str, str], list[float | int]] = {}  # key -> [window start, passed, dropped]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, str(record.msg))
        now = time.monotonic()
        state = self._seen.get(key)
        if state is None or now - state[0] >= self.window_s:
            dropped = state[2] if state else 0
            if len(self._seen) > 1000:  # many distinct messages: forget the old windows
                self._seen.clear()
            self._seen[key] = [now, 1, 0]
            if dropped:
                record.msg = (
                    f"{record.msg} [{dropped} more like this in the last {self.window_s:.0f}s not logged]"
                )
            return True
        if state[1] < self.burst:
            state[1] += 1
            return True
        state[2] += 1
        return False


# Loggers that write a line (often a traceback) per bad connection or request.
NOISY_LOGGERS = ("asyncio", "aiohttp.server", "aiohttp.web", "aiohttp.access", "aiohttp.internal", __name__)


def limit_log_rate(names: tuple[str, ...] = NOISY_LOGGERS, burst: int = 10, window_s: float = 60.0) -> None:
    """Attach one RateLimitFilter to each named logger (once; later calls keep the first)."""
    for name in names:
        target = logging.getLogger(name)
        if not any(isinstance(f, RateLimitFilter) for f in target.filters):
            target.addFilter(RateLimitFilter(burst, window_s))


class _GuardedProtocol(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the guard's head deadline and connection cap."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol):
        self.guard, self.inner = guard, inner
        self.transport: asyncio.Transport | None = None
        self.phase = "head"  # head: waiting for a request head; busy: in a handler; idle: kept alive
        self.admitted = False
        self._deadline: asyncio.TimerHandle | None = None

    # asyncio.Protocol ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self.guard.admit(self):
            self.guard.refused += 1
            logger.warning(
                "connection refused: %d connections are open and all are busy (--max-connections)",
                self.guard.max_connections,
            )
            transport.write(_REFUSED)  # type: ignore[attr-defined]
            transport.close()
            return
        self.admitted = True
        self.inner.connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if not self.admitted:
            return
        if self.phase == "idle":
            self.phase = "head"
            self._arm()
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self.admitted:
            self.guard.forget(self)
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.admitted:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.admitted:
            self.inner.resume_writing()

    # the guard's side ---------------------------------------------------------------------------------
    def _arm(self) -> None:
        self._disarm()
        loop = asyncio.get_running_loop()
        self._deadline = loop.call_later(self.guard.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _head_timed_out(self) -> None:
        self._deadline = None
        if self.phase == "head" and self.transport is not None and not self.transport.is_closing():
            self.guard.timed_out += 1
            logger.warning(
                "closed a connection that sent no complete request head in %.3gs (%d so far)",
                self.guard.header_timeout_s,
                self.guard.timed_out,
            )
            self.close(_TIMED_OUT)

    def close(self, reply: bytes) -> None:
        self._disarm()
        if self.transport is not None and not self.transport.is_closing():
            if reply:
                self.transport.write(reply)
            self.transport.close()

    def started(self) -> None:
        self.phase = "busy"
        self._disarm()

    def finished(self) -> None:
        self.phase = "idle"


class ConnectionGuard:
    """The connections of one server: the cap, the head deadline, and the lookup the middleware uses."""

    def __init__(self, factory, *, max_connections: int, header_timeout_s: float):
        self.factory = factory
        self.max_connections, self.header_timeout_s = max_connections, header_timeout_s
        self.open: OrderedDict[asyncio.BaseTransport, _GuardedProtocol] = OrderedDict()  # oldest first
        self.timed_out = self.evicted = self.refused = 0

    def __call__(self) -> _GuardedProtocol:
        return _GuardedProtocol(self, self.factory())

    def admit(self, conn: _GuardedProtocol) -> bool:
        """Room for `conn`: below the cap, or after closing the oldest connection waiting for a head."""
        if len(self.open) >= self.max_connections:
            waiting = next((c for c in self.open.values() if c.phase == "head"), None)
            waiting = waiting or next((c for c in self.open.values() if c.phase == "idle"), None)
            if waiting is None:
                return False
            self.evicted += 1
            logger.warning(
                "at %d open connections (--max-connections): closed the oldest one waiting for a request",
                self.max_connections,
            )
            self.forget(waiting)
            waiting.close(_REFUSED if waiting.phase == "head" else b"")
        self.open[conn.transport] = conn
        return True

    def forget(self, conn: _GuardedProtocol) -> None:
        if self.open.get(conn.transport) is conn:
            del self.open[conn.transport]

    def request_started(self, transport) -> None:
        conn = self.open.get(transport)
        if conn is not None:
            conn.started()

    def request_finished(self, transport) -> None:
        conn = self.open.get(transport)
        if conn is not None:
            conn.finished()


class GuardedTCPSite(web.TCPSite):
    """aiohttp's TCPSite with every connection behind `guard`."""

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard_kwargs: dict):
        super().__init__(runner, host, port)
        self._guard_kwargs = guard_kwargs
        self.guard: ConnectionGuard | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        self.guard = ConnectionGuard(self._runner.server, **self._guard_kwargs)
        self._server = await loop.create_server(self.guard, self._host, self._port, backlog=self._backlog)
        self._bound_port = self._server.sockets[0].getsockname()[1]
