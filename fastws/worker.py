"""A worker process: one event loop for the control plane, one engine for the connections.

The engine accepts on the worker's listeners and owns every connection until it closes; the
event loop only hears of the signals and the tunnels handed over on a reload, and runs the
graceful stops.  A tick, twice a second, publishes the status figures to the master's shared
memory and flushes the access logs.
"""

from __future__ import annotations

import asyncio
import grp
import logging
import os
import pwd
import resource
import signal
import socket
import time
from typing import Any, Mapping, NamedTuple

import orjson
import uvloop

from . import _engine, accesslog, balancer, config as config_mod, handover, health, hooks
from . import metrics, tables, tls
from .config import Address, Config
from .errors import ConfigError

log = logging.getLogger("fastws")

PUBLISH_INTERVAL = 0.5
CONTROL_INTERVAL = 0.05     # the control plane's timers run at most this late
HOOK_INTERVAL = 0.005       # ... and a coroutine hook's, while one runs


async def _one_pass() -> None:
    await asyncio.sleep(0)


SETTLE_TIMEOUT = 2.0        # at exit, coroutine on_tunnel_close callbacks get this long


def descriptor_limit(config: Config, *, raise_soft: bool = True) -> str | None:
    """Raise the open-files soft limit as far as the hard one allows toward what
    worker_connections needs (a connection is one descriptor, a pipe in flight two, plus the
    engine's own); a warning when it still falls short (nginx: "worker_connections exceed
    open file resource limit")."""
    need = config.worker_connections + 2 * (config.max_pipes or config.worker_connections // 2) \
        + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need and raise_soft:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < need:
        return (f"{config.worker_connections} worker_connections (with their pipes) need "
                f"{need} open files, and the limit is {soft} (ulimit -n): when it is reached, "
                "new clients are answered 503")
    return None


def pin_worker(config: Config, index: int) -> set[int] | None:
    """nginx's worker_cpu_affinity: the CPUs worker `index` is bound to (None: not bound)."""
    spec = config.cpu_affinity
    if spec is None:
        return None
    allowed = sorted(os.sched_getaffinity(0))
    if isinstance(spec, str):                  # "auto"
        cpus = {allowed[index % len(allowed)]}
    else:
        cpus = set(spec[min(index, len(spec) - 1)]) & set(allowed)
        if not cpus:
            log.warning("worker_cpu_affinity: worker %d's mask names no CPU it may run on "
                        "(%s); not bound", index, ",".join(map(str, allowed)))
            return None
    os.sched_setaffinity(0, cpus)
    return cpus


def drop_privileges(config: Config) -> None:
    """nginx's `user`: a worker started as root gives root up once its engine holds what
    needs it (the listeners, the log files, the TLS keys), as ngx_worker_process_init does
    (setgid, initgroups, setuid)."""
    if config.user is None or os.geteuid() != 0:
        return
    user, group = config.user
    gid = grp.getgrnam(group).gr_gid
    os.setgid(gid)
    os.initgroups(user, gid)
    os.setuid(pwd.getpwnam(user).pw_uid)


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
        # the head rarely needs a wake-up of its own.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT, 1)
        # accepted sockets inherit it: one system call here instead of one per connection
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.listen(4096)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"{addr.text}: {exc.strerror}") from None
    return sock


def engine_backend(cfg: Config) -> tuple[str, str]:
    """The back end the workers' engines will run (`engine`: io_uring or epoll) and why;
    ConfigError when the configuration asks for io_uring and the kernel refuses it (checked
    by `fastws -t`, at start, on a reload and by fastws.serve, before any worker needs it)."""
    try:
        return _engine.probe_backend(cfg.engine)
    except OSError as exc:
        raise ConfigError(cfg.source, "engine", f"io_uring is refused here: {exc.strerror}") from None


class RuntimeCheck(NamedTuple):
    groups: dict[str, balancer.UpstreamGroup]   # the upstream groups, built, by name
    backend: str                           # the engine's back end ("" when not probed)
    why: str                               # ... and why it is the one


def check_runtime(cfg: Config, *, probe_engine: bool = True) -> RuntimeCheck:
    """What config.load cannot check without the runtime (ConfigError on a mistake): the TLS
    settings against the engine's OpenSSL, the back end that `engine` asks for (unless
    probe_engine is false), the upstream groups and their balancers (custom ones are imported).
    `fastws -t`, the master at start and on a reload, and fastws.load all check this way."""
    tls.check_engine(cfg)
    backend, why = engine_backend(cfg) if probe_engine else ("", "")
    return RuntimeCheck(balancer.build_upstreams(cfg), backend, why)


class Worker:
    def __init__(self, config: Config, sockets: list[socket.socket] | None = None, *,
                 board: metrics.Board | None = None, slot: metrics.Slot | None = None,
                 generation: int = 0, master: int = 0, index: int = 0,
                 zones: Mapping[str, int] | None = None,
                 control: socket.socket | None = None) -> None:
        self.config = config
        self.control = control          # what the master tells this worker (_on_control)
        self.zones = zones              # the limit zones the master mapped (None: our own)
        self.zone_addresses: dict[str, int] = {}
        self.groups = balancer.build_upstreams(config)
        if board is None or slot is None:
            board = metrics.private_board()
            slot = board.take()
        assert slot is not None
        self.board = board
        self.stats = slot
        slot.pid = os.getpid()
        slot.generation = generation
        self.master = master            # the master's pid: the worker leaves if it is gone
        self.index = index
        self.receiver: handover.Receiver | None = None
        self._retiring = False          # draining or handing over: once only
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.engine: _engine.Engine = None  # type: ignore[assignment]
        self._sockets = sockets
        self.listeners: list[socket.socket] = []
        self._stopped: asyncio.Future[None] | None = None
        self.ready: Any = None          # called with the worker once it is serving
        self._ticker: Any = None
        self._ticking = True            # the event loop runs the tick (serve()), or run() does
        self.stopping = False           # a graceful stop is under way
        self.close_callbacks: hooks.CloseCallbacks | None = None
        self.health = health.HealthChecks({})
        self.targets = hooks.Targets({})

    # --- life cycle ------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT (fast stop) or SIGQUIT (graceful stop).

        The process waits in the engine: its epoll set holds every socket and, as one more fd,
        the event loop's own epoll set, so that the sockets' edges wake one epoll_wait, not a
        nested pair.  One pass of the loop runs when it has I/O (a signal queued for it, a
        tunnel handed over), and every CONTROL_INTERVAL while a graceful stop or a hand-over,
        which wait on its timers, is under way; an idle worker wakes only for its tick."""
        loop = uvloop.new_event_loop()
        asyncio.set_event_loop(loop)
        backend = getattr(loop, "_get_backend_id", None)
        try:
            if backend is None:
                loop.run_until_complete(self.serve())   # an event loop that hides its epoll set
                return
            self._ticking = False
            loop.run_until_complete(self._start())
            self._signals(lambda sig, cb, *args: signal.signal(
                sig, lambda *_: loop.call_soon_threadsafe(cb, *args)))
            self.engine.watch_control(backend())
            assert self._stopped is not None
            next_tick = time.monotonic() + PUBLISH_INTERVAL
            while not self._stopped.done():
                now = time.monotonic()
                if now >= next_tick:
                    self._tick_once()
                    next_tick = now + PUBLISH_INTERVAL
                wait = next_tick - now
                # coroutine hooks and health checks run on the loop, whose timers are not in
                # the engine's epoll set: passes of it when they are due, and while they run
                busy = self.engine.hooks_pending or self.health.running
                due = self.health.next_wake() <= now
                if self._retiring:
                    wait = min(wait, CONTROL_INTERVAL)
                if busy:
                    wait = min(wait, HOOK_INTERVAL)
                if self.health:
                    wait = max(0.0, min(wait, self.health.next_wake() - now))
                if self.engine.wait(wait) or self._retiring or busy or due:
                    # (each pass costs uvloop a socketpair for its signal wake-up fd: only
                    # when the loop has something to do)
                    loop.run_until_complete(_one_pass())
            self._shutdown()
            if self.health:
                loop.run_until_complete(_one_pass())   # the checks' cancelled tasks end
            if self.close_callbacks is not None and self.close_callbacks.tasks:
                # coroutine on_tunnel_close callbacks of the last tunnels: a bounded chance
                loop.run_until_complete(asyncio.wait(set(self.close_callbacks.tasks),
                                                     timeout=SETTLE_TIMEOUT))
        finally:
            loop.close()

    async def serve(self, signals: bool = True) -> None:
        """Serve inside a running asyncio event loop, which watches the engine's fd (and,
        with `signals`, handles the worker's signals)."""
        await self._start()
        if signals:
            self._signals(self.loop.add_signal_handler)
        self.loop.add_reader(self.engine.fd, self.engine.run_once)
        assert self._stopped is not None
        try:
            await self._stopped
        finally:
            self.loop.remove_reader(self.engine.fd)
            self._shutdown()

    def _signals(self, install: Any) -> None:
        # nginx's: TERM and INT stop at once, QUIT gracefully, USR1 reopens the logs, USR2 hands
        # the tunnels over (a reload); HUP is the master's business.  In run(), plain handlers
        # that queue the work for the loop's next pass: the process waits in the engine, where
        # the loop's own signal machinery (active only while it runs) would miss them.
        for sig, graceful in ((signal.SIGTERM, False), (signal.SIGINT, False),
                              (signal.SIGQUIT, True)):
            install(sig, self.stop, graceful)
        install(signal.SIGUSR1, self.reopen_logs)
        install(signal.SIGUSR2, self.hand_over)
        install(signal.SIGHUP, lambda: None)

    async def _start(self) -> None:
        self.loop = asyncio.get_running_loop()
        config = self.config
        tls.check_engine(config)
        socks = self._sockets if self._sockets is not None else open_listeners(config)
        self.listeners = socks
        max_pipes = config.max_pipes or max(16, config.worker_connections // 2)
        self.engine = _engine.Engine(
            self, pipe_size=config.pipe_size, max_pipes=max_pipes,
            worker_connections=config.worker_connections,
            log_level=logging.getLogger("fastws").getEffectiveLevel(),
            number_step=self.board.count, number_base=self.stats.index,
            counters=self.stats.counters, engine=config.engine)
        if self.index == 0:
            log.info("engine: %s (%s)", self.engine.backend, self.engine.backend_why)
        self.engine.serial = self.stats.serial
        built = tables.build(config, socks, self.groups, tls.Contexts(config), self.zones)
        self.zone_addresses = {z.name: z.address for z in built.zones}
        self.engine.load(built)
        self.targets = built.targets
        self.health = health.HealthChecks(self.groups, {
            up.name: tls.upstream_context(up.tls) for up in config.upstreams
            if up.tls is not None and up.health_check is not None})
        drop_privileges(config)
        self._stopped = self.loop.create_future()
        if self.master:
            try:
                self.receiver = handover.Receiver(
                    self.loop, handover.address(self.master, self.stats.generation, self.index),
                    lambda *tunnel: handover.adopt(self, *tunnel))
            except OSError as exc:
                log.error("cannot take tunnels over from old workers: %s", exc)
        if self.control is not None:
            self.control.setblocking(False)
            self.loop.add_reader(self.control.fileno(), self._on_control)
        if self._ticking:
            self._tick()
        else:
            self._tick_once()
        self.health.start(self.loop, metrics.unhealthy_elsewhere(self) if self.health else set())
        self.engine.run_once()          # connections already queued on the listeners
        if self.ready is not None:
            self.ready(self)

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
        self.stopping = True
        self._close_listeners()
        self.engine.close_idle()        # no more keep-alive; idle connections close now
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

    async def drain_then_stop(self, why: str = "shutdown") -> None:
        # nginx's graceful stop: no new connection; the ones open end by themselves, or when
        # shutdown_timeout (worker_shutdown_timeout) has passed.  WebSocket tunnels that follow
        # their frames are not waited for: the proxy closes them politely, at frame boundaries
        # (1001 going away on a shutdown, 1012 service restart on a reload), spread over
        # close_spread so that their clients do not all reconnect at once.
        timeout = self.config.shutdown_timeout
        spread = self.config.close_spread
        drain_end = self.board.slots[0].draining / 1000.0
        if drain_end:
            # a drain (SIGTERM with drain_on_term): the rest of its window
            timeout = max(drain_end - time.monotonic(), 0.001)
            spread = timeout / 2
        if timeout:
            spread = min(spread, timeout / 2)   # the handshakes end before shutdown_timeout
        # (a reload with handover = false keeps nginx's way: the old worker relays its
        # tunnels until they end)
        reloaded = self.master and self.board.slots[0].generation > self.stats.generation
        if why == "reload" or not reloaded:
            n = self.engine.goodbye(1012 if why == "reload" else 1001, spread, why)
            if n:
                log.info("closing %d WebSocket tunnels (%s) over %gs", n, why, spread)
        deadline = time.monotonic() + timeout if timeout else float("inf")
        said = bool(drain_end) and (why == "reload" or not reloaded)
        while self.engine.active and not self.stopped:
            drain_end = self.board.slots[0].draining / 1000.0
            if drain_end and drain_end < deadline:
                # a drain began while this worker was already retiring (an older generation
                # still relaying): its window bounds this one too
                deadline = drain_end
                if not said:
                    said = True
                    self.engine.goodbye(1001, max(0.0, deadline - time.monotonic()) / 2,
                                        "shutdown")
            if time.monotonic() >= deadline:
                log.info("shutdown_timeout: closing %d connections (%d tunnels)",
                         self.engine.active, self.engine.tunnels)
                break
            self.engine.close_idle()    # a request that ended since becomes idle: close it
            await asyncio.sleep(0.05)
        self.finish()

    def hand_over(self) -> None:
        """SIGUSR2 (a reload): stop accepting and pass every tunnel to the new worker of the
        same index, then exit; drain as on SIGQUIT if it cannot be reached."""
        if not self.stopped and self.master:
            self._retire(lambda: handover.hand_over(self))

    def _on_control(self) -> None:
        # the master's messages (Master._tell_untold), each one datagram of JSON
        assert self.control is not None
        while True:
            try:
                data = self.control.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                data = b""
                log.error("the master's control socket failed: %s", exc.strerror or exc)
            if not data:                    # the master is gone (the tick notices it)
                self.loop.remove_reader(self.control.fileno())
                return
            try:
                message = orjson.loads(data)
                upstream = str(message["renew"])
                answers = {str(host): tuple(str(a) for a in addresses)
                           for host, addresses in message["answers"]}
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                log.error("a message from the master not understood (%s): %r", exc, data[:200])
                continue
            self.renew_upstream(upstream, answers)

    def renew_upstream(self, upstream: str, answers: Mapping[str, tuple[str, ...]]) -> None:
        """The `resolve` names of group `upstream` give these addresses now: the group is
        built again and put in the engine's place of the old one, with the connections that
        use it (Engine.replace_group).  Tunnels to an address that left close after the
        group's drain_timeout; everything else goes on."""
        if self.engine is None or self._retiring or upstream not in self.groups:
            return
        cfg = self.config
        try:
            for host, addresses in answers.items():
                cfg = config_mod.with_answers(cfg, upstream, host, addresses)
            up = cfg.upstream(upstream)
            group = balancer.build_upstream(cfg.source, up)
        except ConfigError as exc:
            log.error("upstream %s: the new addresses are not used: %s", upstream, exc)
            return
        before = {p.name for p in self.groups[upstream].peers}
        closing = self.engine.replace_group(group)
        self.config = cfg
        self.groups[upstream] = group
        try:
            self.targets.follow(self.engine.groups)
            self.health.renew(upstream, group)
        except Exception:                                   # noqa: BLE001  (logged; the
            log.exception("upstream %s: after its new addresses", upstream)  # group is in)
        after = {p.name for p in group.peers}
        self.stats.forget_peers({metrics.peer_key(upstream, name) for name in before - after})
        said = []
        if after - before:
            said.append("added " + ", ".join(sorted(after - before)))
        if before - after:
            said.append("removed " + ", ".join(sorted(before - after)))
        if closing:
            said.append(f"{closing} tunnel(s) to removed servers " + (
                f"close within {up.drain_timeout:g}s" if up.drain_timeout > 0 else
                "go on until they end (drain_timeout = 0)"))
        log.info("upstream %s: %s", upstream, "; ".join(said) or "the same servers")

    def reopen_logs(self) -> None:
        """SIGUSR1: reopen the log files (after logrotate moved them)."""
        accesslog.reopen(self.engine)
        accesslog.reopen_error_log()

    def _tick(self) -> None:
        # serve(): the event loop's timer; run(): the wait loop calls _tick_once itself
        self._tick_once()
        self._ticker = self.loop.call_later(PUBLISH_INTERVAL, self._tick)

    def _tick_once(self) -> None:
        self.engine.flush_logs()
        self.engine.retry_accept()      # listeners paused for want of descriptors
        metrics.publish(self)
        if self.master and os.getppid() != self.master:
            log.error("the master process is gone; worker exits")
            self.stop(graceful=False)

    def _close_listeners(self) -> None:
        if self.engine is not None:
            self.engine.stop_accepting()
        for sock in self.listeners:
            sock.close()

    def _shutdown(self) -> None:
        self.health.close()
        self._close_listeners()
        if self.receiver is not None:
            self.receiver.close()
        self.engine.stop()
        if self._ticker is not None:
            self._ticker.cancel()
        if self.close_callbacks is not None:
            self.close_callbacks.close()
        metrics.publish(self)

    # --- what the engine asks of the control plane ----------------------------------------

    def status_page(self, fmt: str) -> tuple[int, str, bytes]:
        """A status location's answer: nginx's stub_status text, JSON or Prometheus text,
        summed over every worker; or readiness and liveness."""
        return metrics.render(self, fmt)

    def log(self, level: int, text: str) -> None:
        """An error-log message from the engine."""
        log.log(level, "%s", text)

    def tunnel_closed(self, fn: Any, path: str, record: hooks.TunnelClosed) -> None:
        """A tunnel of a location with on_tunnel_close closed (after the engine's turn)."""
        if self.close_callbacks is None:
            self.close_callbacks = hooks.CloseCallbacks(self.loop)
        self.close_callbacks.deliver(fn, path, record)
