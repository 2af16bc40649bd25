"""A worker: one event loop for accepting and handshaking, one relay engine for the tunnels."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from typing import Any

import uvloop

from . import _splice, accesslog, balancer, handover, metrics, tls
from .config import Address, Config, ServerBlock
from .proxy import ClientConn, TunnelRecord
from .router import Router

log = logging.getLogger("fastws")

ACCEPT_BATCH = 64
PUBLISH_INTERVAL = 0.5


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
        # nginx's "deferred": accept once the client has sent its first bytes, so that reading
        # the head rarely needs a poll of its own.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        sock.listen(4096)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{addr.text}: {exc.strerror}") from None
    return sock


class Listener:
    __slots__ = ("sock", "fd", "key", "address", "family", "scheme", "default_server", "tls")

    def __init__(self, sock: socket.socket, address: Address, default_server: ServerBlock,
                 tls: "tls.ListenerTLS | None" = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.address = address
        self.key = (address.host, address.port)
        self.family = sock.family
        self.scheme = "https" if tls is not None else "http"
        self.default_server = default_server
        self.tls = tls


class Worker:
    def __init__(self, config: Config, sockets: list[socket.socket] | None = None, *,
                 board: metrics.Board | None = None, slot: metrics.Slot | None = None,
                 generation: int = 0, master: int = 0, index: int = 0) -> None:
        self.config = config
        self.router = Router(config)
        self.upstreams = balancer.build_upstreams(config)
        self.tls = tls.WorkerTLS(config, self.router)
        if board is None or slot is None:
            board = metrics.private_board()
            slot = board.take()
        assert slot is not None
        self.board = board
        # Connection counters with nginx's stub_status meaning, in this worker's shared slot:
        # accepts, handled, requests, active (client connections not yet tunnels), tunnels.
        self.stats = slot
        slot.pid = os.getpid()
        slot.generation = generation
        self.master = master            # the master's pid: the worker leaves if it is gone
        self.index = index
        self.receiver: handover.Receiver | None = None
        self._retiring = False          # draining or handing over: once only
        self.peers: dict[Any, metrics.PeerFigures] = {}
        self.logs = accesslog.AccessLogs()
        self.paused = False
        self._publisher: Any = None
        self.conns: set[ClientConn] = set()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.engine: _splice.Engine = None  # type: ignore[assignment]
        self._sockets = sockets
        self.listeners: list[Listener] = []
        self._stopped: asyncio.Future[None] | None = None
        self.ready: Any = None     # called with the worker once it is serving
        self._engine_scheduled = False
        self.handshaking = 0            # connections whose handshake the engine finishes
        self._engine_timer: asyncio.TimerHandle | None = None
        self._engine_deadline: float | None = None
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
        self.engine.start(config.relay_thread)
        if config.relay_thread:
            self.loop.add_reader(self.engine.notify_fd, self._on_engine_notify)
        else:
            self.loop.add_reader(self.engine.fd, self._run_engine)
        socks = self._sockets if self._sockets is not None else open_listeners(config)
        for sock in socks:
            host, port = sock.getsockname()[:2]
            addr = self.router.addresses.get((host, port))
            if addr is None:
                raise RuntimeError(f"no server listens on {host}:{port}")
            default = self.router.server((host, port), "")
            listener = Listener(sock, addr, default, self.tls.listener((host, port), default))
            self.listeners.append(listener)
            self.loop.add_reader(listener.fd, self._on_accept, listener)
        self._stopped = self.loop.create_future()
        for sig, graceful in ((signal.SIGTERM, False), (signal.SIGINT, False),
                              (signal.SIGQUIT, True)):
            self.loop.add_signal_handler(sig, self.stop, graceful)
        self.loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        self.loop.add_signal_handler(signal.SIGUSR2, self.hand_over)
        if self.master:
            try:
                self.receiver = handover.Receiver(
                    self.loop, handover.address(self.master, self.stats.generation, self.index),
                    lambda *tunnel: handover.adopt(self, *tunnel))
            except OSError as exc:
                log.error("cannot take tunnels over from old workers: %s", exc)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: None)   # the master's business
        self.logs.start(self.loop)
        self._publish()
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
        self._retire(self.drain_then_stop)

    def _retire(self, then: Any) -> None:
        # Stop accepting connections, and tunnels from older workers; then `then` (once).
        if self._retiring:
            return
        self._retiring = True
        self.stats.retiring = 1
        self.stopping = True       # no more keep-alive: answered connections close
        for conn in [c for c in self.conns if c.state == "idle"]:
            conn.abort()           # kept-alive connections waiting for a request close now
        self._close_listeners()
        if self.receiver is not None:
            self.receiver.close()
        self.loop.create_task(then())

    @property
    def stopped(self) -> bool:
        return self._stopped is None or self._stopped.done()

    def finish(self) -> None:
        """End serve() now (whatever is left is closed)."""
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    async def drain_then_stop(self) -> None:
        # nginx's graceful stop: no new connection; the ones open end by themselves, or when
        # shutdown_timeout (worker_shutdown_timeout) has passed.
        timeout = self.config.shutdown_timeout
        deadline = time.monotonic() + timeout if timeout else float("inf")
        while (self.conns or self.engine.active) and self._stopped and not self._stopped.done():
            for conn in [c for c in self.conns if c.state == "idle"]:
                conn.abort()       # kept-alive connections waiting for a request close now
            if time.monotonic() >= deadline:
                log.info("shutdown_timeout: closing %d connections and %d tunnels",
                         len(self.conns), self.engine.active)
                break
            await asyncio.sleep(0.05)
        if self._stopped is not None and not self._stopped.done():
            self._stopped.set_result(None)

    def hand_over(self) -> None:
        """SIGUSR2 (a reload): stop accepting and pass every tunnel to the new worker of the
        same index, then exit; drain as on SIGQUIT if it cannot be reached."""
        if not self.stopped and self.master:
            self._retire(lambda: handover.hand_over(self))

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the log files (after logrotate moved them)."""
        self.logs.reopen()
        accesslog.reopen_error_log()

    def _publish(self) -> None:
        metrics.publish(self)
        self._publisher = self.loop.call_later(PUBLISH_INTERVAL, self._publish)
        if self.master and os.getppid() != self.master:
            log.error("the master process is gone; worker exits")
            self.stop(graceful=False)

    def _close_listeners(self) -> None:
        for listener in self.listeners:
            if listener.sock.fileno() >= 0:
                self.loop.remove_reader(listener.fd)
                listener.sock.close()
        self.paused = False

    def _shutdown(self) -> None:
        self._close_listeners()
        for conn in list(self.conns):
            conn.abort()
        if self.receiver is not None:
            self.receiver.close()
        self.engine.stop()
        self._on_engine_notify()
        self.loop.remove_reader(self.engine.notify_fd if self.config.relay_thread
                                else self.engine.fd)
        if self._engine_timer is not None:
            self._engine_timer.cancel()
        if self._publisher is not None:
            self._publisher.cancel()
        self.logs.close()
        self.stats.active = self.stats.tunnels = self.stats.reading = 0

    # --- connections -----------------------------------------------------------------------

    def _load(self) -> int:
        # worker_connections has nginx's meaning: a tunnel holds two connections; a client
        # connection counts two from its accept on (its upstream connection is reserved).
        return 2 * (len(self.conns) + self.handshaking + self.stats.tunnels)

    def _pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.stats.paused = 1
            for listener in self.listeners:
                self.loop.remove_reader(listener.fd)
            log.warning("%d worker_connections are not enough; accepting again when below",
                        self.config.worker_connections)

    def _maybe_resume(self) -> None:
        if self.paused and self._load() < self.config.worker_connections:
            self.paused = False
            self.stats.paused = 0
            for listener in self.listeners:
                if listener.sock.fileno() >= 0:
                    self.loop.add_reader(listener.fd, self._on_accept, listener)

    def _on_accept(self, listener: Listener) -> None:
        limit = self.config.worker_connections
        for _ in range(ACCEPT_BATCH):
            if self._load() + 2 > limit:
                self._pause()
                return
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
            serial = self.stats.serial = self.stats.serial + 1
            try:
                conn = ClientConn(self, listener, sock, addr)
            except OSError:
                sock.close()
                self.stats.active -= 1
                continue
            # $connection: unique over all workers of this master (each slot numbers its own)
            conn.number = serial * self.board.count + self.stats.index
            self.conns.add(conn)
            conn.start()

    def connection_closed(self, conn: ClientConn, handshaking: bool = False) -> None:
        """`conn` is no longer Python's: closed, a tunnel, or (handshaking) in the engine until
        its 101 is checked, where it still counts as an active connection."""
        if conn in self.conns:
            self.conns.discard(conn)
            if handshaking:
                self.handshaking += 1
            else:
                self.stats.active -= 1
            if conn.state != "tunnel" and (conn.status or getattr(conn, "head", None)):
                accesslog.log_request(self, conn)
            if self.paused:
                self.loop.call_soon(self._maybe_resume)

    def peer_figures(self, peer: Any) -> metrics.PeerFigures:
        fig = self.peers.get(peer)
        if fig is None:
            fig = self.peers[peer] = metrics.PeerFigures(metrics.peer_key(peer.upstream, peer.name))
        return fig

    def tunnel_opened(self, record: TunnelRecord, conn: ClientConn | None = None) -> None:
        self.stats.tunnels += 1
        self.stats.tunnels_total += 1
        fig = self.peer_figures(record.peer)
        fig.active += 1
        fig.tunnels_total += 1
        loc = conn.location if conn is not None else None
        cfg = loc.access_log if loc is not None else None
        if cfg is not None and conn is not None:
            record.log = (cfg, accesslog.render_early(cfg.format, conn))
            if cfg.open:
                accesslog.log_tunnel(self, record, "open", 0, 0, -1.0)

    def status_page(self, fmt: str) -> tuple[str, bytes]:
        """The body of a status location: nginx's stub_status text, JSON or Prometheus text,
        summed over every worker."""
        return metrics.render(self, fmt)

    # --- the relay engine without its own thread (relay_thread = false) --------------------

    def engine_kick(self) -> None:
        """Tunnels were handed over: have the engine start them soon (one turn per batch)."""
        if not self.config.relay_thread and not self._engine_scheduled:
            self._engine_scheduled = True
            self.loop.call_soon(self._run_engine)

    def _run_engine(self) -> None:
        self._engine_scheduled = False
        deadline = self.engine.run_once()
        self._on_engine_notify()
        if deadline == self._engine_deadline and self._engine_timer is not None:
            return
        if self._engine_timer is not None:
            self._engine_timer.cancel()
            self._engine_timer = None
        self._engine_deadline = deadline
        if deadline is not None:
            self._engine_timer = self.loop.call_later(max(0.0, deadline - time.monotonic()),
                                                      self._on_engine_deadline)

    def _on_engine_deadline(self) -> None:
        self._engine_timer = None
        self._engine_deadline = None
        self._run_engine()

    def handshake_settled(self, conn: ClientConn) -> None:
        """The engine is done with `conn`'s handshake: a tunnel now, or given back."""
        self.handshaking -= 1
        self.stats.active -= 1

    def connection_reopened(self, conn: ClientConn) -> None:
        """A connection the engine gave back to Python after its handshake."""
        self.conns.add(conn)
        self.stats.active += 1

    def _on_engine_notify(self) -> None:
        closed = self.engine.drain()
        for event in self.engine.drain_handshakes():
            conn = event[1]
            if event[0] == "opened":
                conn.engine_opened(*event[2:])
            else:
                conn.engine_returned(*event[2:])
        for record, up, down, duration, reason in closed:
            self.stats.tunnels -= 1
            record.upstream.release(record.peer)
            fig = self.peer_figures(record.peer)
            fig.active -= 1
            fig.bytes_up += up
            fig.bytes_down += down
            self.tunnel_closed(record, up, down, duration, reason)
        if self.paused:
            self._maybe_resume()

    def tunnel_closed(self, record: TunnelRecord, up: int, down: int, duration: float,
                      reason: str) -> None:
        if record.log is not None:
            accesslog.log_tunnel(self, record, "close", up, down, duration, reason)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("tunnel %s %s -> %s closed (%s): %d bytes up, %d down, %.3fs",
                      record.remote_addr, record.request.decode("latin-1"), record.peer.name,
                      reason, up, down, time.monotonic() - record.started)
