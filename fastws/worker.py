"""A worker: one event loop for accepting and handshaking, one relay engine for the tunnels."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from typing import Any

import orjson
import uvloop

from . import _splice, balancer
from .config import Address, Config, ServerBlock
from .proxy import ClientConn, TunnelRecord
from .router import Router

log = logging.getLogger("fastws")

ACCEPT_BATCH = 64


class Stats:
    """Connection counters with nginx's stub_status meaning."""

    __slots__ = ("accepts", "handled", "requests", "active", "tunnels", "tunnels_total")

    def __init__(self) -> None:
        self.accepts = 0
        self.handled = 0
        self.requests = 0
        self.active = 0         # client connections being read or answered (not yet tunnels)
        self.tunnels = 0
        self.tunnels_total = 0


def open_listeners(config: Config) -> list[socket.socket]:
    """Bind every distinct listen address of the configuration (SO_REUSEPORT, so that several
    workers, or an old and a new generation, can share them)."""
    socks = []
    seen: set[tuple[str, int]] = set()
    for server in config.servers:
        for addr in server.listen:
            if (addr.host, addr.port) in seen:
                continue
            seen.add((addr.host, addr.port))
            socks.append(bind_listener(addr))
    return socks


def bind_listener(addr: Address) -> socket.socket:
    sock = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if addr.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr.sockaddr)
        sock.listen(4096)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{addr.text}: {exc.strerror}") from None
    return sock


class Listener:
    __slots__ = ("sock", "fd", "key", "address", "family", "scheme", "default_server")

    def __init__(self, sock: socket.socket, address: Address, default_server: ServerBlock) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.key = (address.host, address.port)
        self.family = sock.family
        self.scheme = "http"
        self.default_server = default_server


class Worker:
    def __init__(self, config: Config, sockets: list[socket.socket] | None = None) -> None:
        self.config = config
        self.router = Router(config)
        self.upstreams = balancer.build_upstreams(config)
        self.stats = Stats()
        self.conns: set[ClientConn] = set()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.engine: _splice.Engine = None  # type: ignore[assignment]
        self._sockets = sockets
        self.listeners: list[Listener] = []
        self._stopped: asyncio.Future[None] | None = None
        self.ready: Any = None     # called with the worker once it is serving
        self.stopping = False      # a graceful stop is under way: no more keep-alive
        self.http_pools: dict[str, Any] = {}   # upstream name -> http1.Pool (or None)

    # --- life cycle ------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT (fast stop) or SIGQUIT (graceful stop)."""
        uvloop.run(self.serve())

    async def serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        config = self.config
        max_pipes = config.max_pipes or max(16, config.worker_connections // 2)
        self.engine = _splice.Engine(pipe_size=config.pipe_size, max_pipes=max_pipes)
        self.engine.start()
        self.loop.add_reader(self.engine.notify_fd, self._on_engine_notify)
        socks = self._sockets if self._sockets is not None else open_listeners(config)
        for sock in socks:
            host, port = sock.getsockname()[:2]
            addr = self.router.addresses.get((host, port))
            if addr is None:
                raise RuntimeError(f"no server listens on {host}:{port}")
            default = self.router.server((host, port), "")
            listener = Listener(sock, addr, default)
            self.listeners.append(listener)
            self.loop.add_reader(listener.fd, self._on_accept, listener)
        self._stopped = self.loop.create_future()
        for sig, graceful in ((signal.SIGTERM, False), (signal.SIGINT, False),
                              (signal.SIGQUIT, True)):
            self.loop.add_signal_handler(sig, self.stop, graceful)
        if self.ready is not None:
            self.ready(self)
        try:
            await self._stopped
        finally:
            self._shutdown()

    def stop(self, graceful: bool = False) -> None:
        if self._stopped is None or self._stopped.done():
            return
        if not graceful:
            self._stopped.set_result(None)
            return
        self.stopping = True
        self._close_listeners()
        self.loop.create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        while (self.conns or self.engine.active) and self._stopped and not self._stopped.done():
            for conn in [c for c in self.conns if c.state == "idle"]:
                conn.abort()       # kept-alive connections waiting for a request close now
            await asyncio.sleep(0.05)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            if listener.sock.fileno() >= 0:
                self.loop.remove_reader(listener.fd)
                listener.sock.close()

    def _shutdown(self) -> None:
        self._close_listeners()
        for conn in list(self.conns):
            conn.abort()
        self.engine.stop()
        self._on_engine_notify()
        self.loop.remove_reader(self.engine.notify_fd)

    # --- connections -----------------------------------------------------------------------

    def _on_accept(self, listener: Listener) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE/ENOBUFS: keep serving the connections already open
                log.error("accept() failed: %s", exc)
                return
            self.stats.accepts += 1
            self.stats.handled += 1
            self.stats.active += 1
            try:
                conn = ClientConn(self, listener, sock, addr)
            except OSError:
                sock.close()
                self.stats.active -= 1
                continue
            self.conns.add(conn)

    def connection_closed(self, conn: ClientConn) -> None:
        if conn in self.conns:
            self.conns.discard(conn)
            self.stats.active -= 1

    def tunnel_opened(self, record: TunnelRecord) -> None:
        self.stats.tunnels += 1
        self.stats.tunnels_total += 1

    def status_page(self, fmt: str) -> tuple[str, bytes]:
        """The body of a status location: nginx's stub_status text, or JSON."""
        s = self.stats
        reading = sum(1 for c in self.conns if c.state == "head")
        waiting = sum(1 for c in self.conns if c.state == "idle")   # kept alive, between requests
        active = s.active + self.engine.active
        writing = active - reading - waiting
        if fmt == "stub":
            text = (f"Active connections: {active} \n"
                    "server accepts handled requests\n"
                    f" {s.accepts} {s.handled} {s.requests} \n"
                    f"Reading: {reading} Writing: {writing} Waiting: {waiting} \n")
            return "text/plain", text.encode()
        data = {
            "connections": {"active": active, "reading": reading, "writing": writing,
                            "waiting": waiting, "accepted": s.accepts, "handled": s.handled},
            "requests": s.requests,
            "tunnels": {"active": self.engine.active, "total": s.tunnels_total},
            "engine": self.engine.stats(),
            "upstreams": {
                name: [{"server": p.name, "state": p.state, "active": p.conns,
                        "selected": p.selected_total, "fails": p.fails_total}
                       for p in up.peers]
                for name, up in self.upstreams.items()
            },
            "keepalive_pools": {
                name: {"idle": len(pool.idle), "opened": pool.opened, "reused": pool.reused}
                for name, pool in self.http_pools.items() if pool is not None
            },
        }
        return "application/json", orjson.dumps(data, option=orjson.OPT_INDENT_2)

    def _on_engine_notify(self) -> None:
        for record, up, down, duration, reason in self.engine.drain():
            self.stats.tunnels -= 1
            record.upstream.release(record.peer)
            self.tunnel_closed(record, up, down, duration, reason)

    def tunnel_closed(self, record: TunnelRecord, up: int, down: int, duration: float,
                      reason: str) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tunnel %s %s -> %s closed (%s): %d bytes up, %d down, %.3fs",
                      record.remote_addr, record.request.decode("latin-1"), record.peer.name,
                      reason, up, down, time.monotonic() - record.started)
