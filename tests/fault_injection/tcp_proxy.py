"""A TCP proxy on loopback in front of an engine server, to make its link slow, stalling or dropping.

The kernels the tests run on have no netem qdisc (`tc qdisc add ... netem` is refused), so network faults are
made here, between the client and the server: `mode` is read for every chunk, so a test switches it while
requests run.

- "pass": bytes go through as they come;
- "slow": each chunk waits `delay` seconds first (a slow or congested link);
- "stall": connections stay open and nothing more goes through in either direction (a black-holed link:
  the peer sees no reset, only silence);
- "drop": every connection, open or new, is reset (a link that drops connections; new ones are accepted and
  reset at once, as a failing load balancer does).

The proxy runs its own event loop in a daemon thread; `close()` (or leaving the `with` block) closes every
connection and joins the thread.
"""

from __future__ import annotations

import asyncio
import socket
import threading

MODES = ("pass", "slow", "stall", "drop")


class TcpProxy:
    def __init__(self, target_host: str, target_port: int, *, delay: float = 0.2):
        self.target = (target_host, target_port)
        self.delay = delay
        self.mode = "pass"
        self.connections = 0  # accepted so far
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._server: asyncio.AbstractServer | None = None
        self._thread.start()
        self._ready.wait(10)
        if self._server is None:
            raise RuntimeError("tcp proxy: the listening socket was not opened")
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def set_mode(self, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"tcp proxy: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        if mode == "drop":
            self._loop.call_soon_threadsafe(self._reset_all)

    # -- the loop thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    def _reset_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.mode == "drop":
            _reset(client_w)
            return
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_w)
            return
        self._writers |= {client_w, server_w}
        try:
            await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))
        finally:
            for w in (client_w, server_w):
                self._writers.discard(w)
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                while self.mode == "stall":
                    await asyncio.sleep(0.05)
                if self.mode == "slow":
                    await asyncio.sleep(self.delay)
                if self.mode == "drop":
                    break
                writer.write(chunk)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if writer.can_write_eof() and not writer.is_closing():
                try:
                    writer.write_eof()
                except OSError:
                    pass

    # -- teardown --------------------------------------------------------------------------------------
    def close(self) -> None:
        if not self._thread.is_alive():
            return

        async def shutdown():
            self._server.close()
            self._reset_all()
            await asyncio.sleep(0)
            for task in asyncio.all_tasks() - {asyncio.current_task()}:
                task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a dropped connection looks to the peer."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        except OSError:
            pass
    writer.transport.abort()
