"""The master process: listeners, workers, signals, reloads (nginx's master process).

The master binds the listening sockets, forks the workers and then only watches: it never
accepts a connection.  For each listen address it holds one SO_REUSEPORT socket per worker
index, so that the kernel spreads connections over the workers, and since the master keeps every
socket open, a worker that dies or a reload that replaces it leaves the socket's accept queue in
place for its successor: no connection waiting in a queue is lost.

Signals (as nginx): SIGHUP reload, SIGQUIT graceful stop, SIGTERM/SIGINT fast stop, SIGUSR1
reopen the log files.  All are blocked and read synchronously with sigtimedwait(), SIGCHLD too,
so that no handler ever runs in the middle of a fork.
"""

from __future__ import annotations

import grp
import logging
import os
import queue
import pwd
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import orjson

from . import accesslog, balancer, config as config_mod, limits, metrics
from .config import Address, Config
from .errors import ConfigError

log = logging.getLogger("fastws")

SIGNALS = {signal.SIGHUP, signal.SIGQUIT, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1,
           signal.SIGCHLD}
# (stop sends SIGINT: a fast stop even where SIGTERM drains, drain_on_term)
COMMANDS = {"reload": signal.SIGHUP, "quit": signal.SIGQUIT, "stop": signal.SIGINT,
            "reopen": signal.SIGUSR1, "drain": signal.SIGTERM}
FAST_STOP_GRACE = 5.0          # after SIGTERM, workers still alive then are killed
RESTART_MAX_DELAY = 5.0
STABLE_AFTER = 10.0            # a worker that lived this long resets its index's backoff
HANDOVER_WINDOW = 10.0         # a reload waits at most this long for the last one's hand-over


@dataclass
class WorkerProc:
    pid: int
    index: int
    generation: int
    slot: metrics.Slot
    started: float
    stopping: bool = False
    control: socket.socket | None = None   # the master's end of the worker's control socket
    # messages not sent yet on it (its queue was full), the last one per upstream
    untold: dict[str, dict[str, Any]] = field(default_factory=dict)


def control_pair() -> tuple[socket.socket, socket.socket]:
    """A worker's control socket: the master sends it what it must apply without a new
    generation (a `resolve` name's new addresses), one message each (SOCK_SEQPACKET)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


@dataclass
class _Index:
    failures: int = 0
    restart_at: float = 0.0


@dataclass
class Master:
    path: str
    config: Config
    default_level: str = "info"
    generation: int = 0
    workers: dict[int, WorkerProc] = field(default_factory=dict)
    sockets: dict[tuple[str, int], list[socket.socket]] = field(default_factory=dict)
    indexes: dict[int, _Index] = field(default_factory=dict)
    stopping: str = ""           # "", "graceful" or "fast"
    stop_deadline: float = 0.0
    reload_pending: bool = False  # a SIGHUP came while the last reload was handing over
    reload_started: float = 0.0
    data: Mapping[str, Any] | None = None   # fastws.serve(dict): reloads check it again
    drain_at: float = 0.0        # a drain: when the listeners close
    drain_kill_at: float = 0.0   # ... and when workers still there are killed
    watcher: Any = None          # the `resolve` names' dns.Watcher

    # --- start -------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; the exit status of the fastws command."""
        if self.config.pid:
            other = _running(self.config.pid)
            if other:
                # SO_REUSEPORT would let a second master bind the same ports and share them
                print(f"fastws: {self.config.pid}: fastws is already running as pid {other}",
                      file=sys.stderr)
                return 1
        signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
        try:
            self._listen(self.config)
        except OSError as exc:
            print(f"fastws: cannot listen: {exc.strerror or exc}", file=sys.stderr)
            return 1
        if self.config.pid:
            try:
                _write_pid(self.config.pid)
            except OSError as exc:
                print(f"fastws: cannot write the pid file {self.config.pid}: {exc.strerror}",
                      file=sys.stderr)
                return 1
        if self.config.user is not None and os.geteuid() != 0:
            log.warning("the \"user\" setting applies only when fastws starts as root; "
                        "ignored")
        _give_logs(self.config)
        from .worker import descriptor_limit
        short = descriptor_limit(self.config)
        if short:
            log.warning("%s", short)
        slots = max(8, 4 * max(self.config.processes, os.cpu_count() or 1))
        self.board = metrics.Board(slots)
        self.zones = limits.Zones()
        self.zone_addresses = self.zones.prepare(self.config)
        self._generation(1)
        for i in range(self.config.processes):
            self._spawn(i)
        self._watch_names()
        log.info("fastws master %d: %d worker processes", os.getpid(), self.config.processes)
        try:
            self._loop()
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            if self.config.pid:
                _remove_pid(self.config.pid)
        return 0

    def _listen(self, cfg: Config) -> None:
        """Make sure every listen address of cfg has one socket per worker index; close the
        sockets of addresses cfg no longer has (and of indexes it no longer uses)."""
        wanted: dict[tuple[str, int], Address] = {}
        for server in cfg.servers:
            for addr in server.listen:
                wanted.setdefault((addr.host, addr.port), addr)
        from .worker import bind_listener
        opened: list[socket.socket] = []
        try:
            for key, addr in wanted.items():
                socks = self.sockets.get(key, [])
                while len(socks) < cfg.processes:
                    sock = bind_listener(addr)
                    opened.append(sock)
                    socks.append(sock)
                self.sockets[key] = socks
        except OSError:
            for sock in opened:
                sock.close()
            for key in list(self.sockets):
                self.sockets[key] = [s for s in self.sockets[key] if s.fileno() >= 0]
            raise
        for key in list(self.sockets):
            if key not in wanted:
                for sock in self.sockets.pop(key):
                    sock.close()
            else:
                for sock in self.sockets[key][cfg.processes:]:
                    sock.close()
                del self.sockets[key][cfg.processes:]

    def _generation(self, generation: int) -> None:
        # Slot 0 tells old workers where their tunnels go: the generation and its size.
        self.generation = generation
        self.board.slots[0].generation = generation
        self.board.slots[0].processes = self.config.processes

    def _spawn(self, index: int) -> None:
        slot = self.board.take()
        if slot is None:
            log.error("no status slot left for a new worker; its figures are not shown")
            slot = metrics.private_board().take()
            assert slot is not None
        cfg = self.config
        socks = [socks[index] for socks in self.sockets.values()]
        # the master's pid as the parent knows it: a child that asked getppid() would get 1 if
        # the master died before it asked, and would then never notice that it is gone
        master = os.getpid()
        ours, theirs = control_pair()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            raise
        if pid == 0:
            code = 0
            try:
                ours.close()
                for other in self.workers.values():
                    if other.control is not None:
                        other.control.close()
                self._in_worker(cfg, socks, slot, index, master, theirs)
            except BaseException:                                     # noqa: BLE001
                log.exception("worker failed")
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        theirs.close()
        ours.setblocking(False)
        self.workers[pid] = WorkerProc(pid, index, self.generation, slot, time.monotonic(),
                                       control=ours)

    def _in_worker(self, cfg: Config, socks: list[socket.socket], slot: metrics.Slot,
                   index: int, master: int, control: socket.socket) -> None:
        keep = {s.fileno() for s in socks}
        for others in self.sockets.values():
            for s in others:
                if s.fileno() not in keep:
                    s.close()
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        from .worker import Worker, pin_worker
        cpus = pin_worker(cfg, index)
        if cpus is not None:
            log.info("worker %d runs on CPU %s", index, ",".join(map(str, sorted(cpus))))
        # The event loop is created here, after the fork (uvloop cannot cross one).
        Worker(cfg, socks, board=self.board, slot=slot, generation=self.generation,
               master=master, index=index, zones=self.zone_addresses, control=control).run()

    # --- watch -------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            self._reap()
            if self.stopping and not self.workers:
                log.info("fastws master %d: exiting", os.getpid())
                return
            now = time.monotonic()
            if self.stopping == "drain" and now >= self.drain_at:
                # readiness has failed for drain_unready: no new client is sent here any more
                self._stop("graceful", signal.SIGQUIT)
            if self.drain_kill_at and now >= self.drain_kill_at:
                # the drain's window is over (a worker still relaying tunnels of an older
                # generation, say): what is left goes as in a fast stop
                for w in self.workers.values():
                    _kill(w.pid, signal.SIGKILL)
                self.drain_kill_at = now + 60
            if self.stopping == "fast" and now >= self.stop_deadline:
                for w in self.workers.values():
                    _kill(w.pid, signal.SIGKILL)
                self.stop_deadline = now + 60
            if not self.stopping:
                self._restart_due(now)
                if self.reload_pending and not self._handing_over(now):
                    self.reload_pending = False
                    self.reload()
                elif self.watcher is not None and not self.watcher.changes.empty() \
                        and not self._handing_over(now):
                    self._names_changed()
                self._tell_untold()
            info = signal.sigtimedwait(SIGNALS, 0.05 if self.reload_pending else 0.2)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            sig = info.si_signo
            if sig == signal.SIGHUP and not self.stopping:
                if self._handing_over(time.monotonic()):
                    # reloads in quick succession are coalesced: one more once the workers
                    # of the last one have handed their tunnels over, so that hand-overs
                    # never overlap (an old worker's tunnels always reach the newest ones)
                    if not self.reload_pending:
                        log.info("reload requested while the last one hands its tunnels "
                                 "over; it follows")
                    self.reload_pending = True
                else:
                    self.reload()
            elif sig == signal.SIGUSR1:
                accesslog.reopen_error_log()
                _give_logs(self.config)
                log.info("log files reopened")
                self._signal_all(signal.SIGUSR1)
            elif sig == signal.SIGQUIT and not self.stopping:
                self._stop("graceful", signal.SIGQUIT)
            elif sig == signal.SIGTERM and self.config.drain_on_term and not self.stopping:
                self._drain()
            elif sig in (signal.SIGTERM, signal.SIGINT) and self.stopping != "fast":
                # (a second SIGTERM during a drain stops at once)
                self.stop_deadline = time.monotonic() + FAST_STOP_GRACE
                self._stop("fast", signal.SIGTERM)

    def _drain(self) -> None:
        # An orchestrator's stop (Kubernetes sends SIGTERM as it takes the pod out of its
        # Service): the readiness pages fail now, the workers keep accepting for
        # drain_unready (clients routed here before the change took effect are served), then
        # stop accepting and close their tunnels politely over the rest of drain_on_term.
        cfg = self.config
        now = time.monotonic()
        self.stopping = "drain"
        self.drain_at = now + cfg.drain_unready
        self.drain_kill_at = now + cfg.drain_on_term + FAST_STOP_GRACE
        self.board.slots[0].draining = int((now + cfg.drain_on_term) * 1000)
        log.info("draining: not ready from now, accepting for %gs more, every connection "
                 "closed within %gs", cfg.drain_unready, cfg.drain_on_term)

    def _stop(self, how: str, sig: int) -> None:
        # nginx's master closes its listening sockets as it stops: new connections are refused
        # at once instead of waiting in a queue that no worker will read again.
        log.info("%s stop", how)
        self.stopping = how
        for socks in self.sockets.values():
            for sock in socks:
                sock.close()
        self.sockets.clear()
        self._signal_all(sig)

    def _signal_all(self, sig: int) -> None:
        for w in self.workers.values():
            _kill(w.pid, sig)

    def _reap(self) -> None:
        while self.workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            if w.control is not None:
                w.control.close()
            self.board.retire(w.slot)
            for name in self.zones.force_unlock(pid):
                log.error("worker process %d died holding the lock of limit zone \"%s\"; "
                          "released", pid, name)
            if os.WIFSIGNALED(status):
                how = f"on signal {os.WTERMSIG(status)}"
            else:
                how = f"with code {os.WEXITSTATUS(status)}"
            if w.generation != self.generation or self.stopping:
                log.info("worker process %d exited %s", pid, how)
                continue
            idx = self.indexes.setdefault(w.index, _Index())
            now = time.monotonic()
            if now - w.started >= STABLE_AFTER:
                idx.failures = 0
            delay = 0.0 if idx.failures == 0 else min(RESTART_MAX_DELAY,
                                                      0.1 * 2 ** (idx.failures - 1))
            idx.failures += 1
            idx.restart_at = now + delay
            log.error("worker process %d exited %s; restarting it in %.1fs", pid, how, delay)

    def _restart_due(self, now: float) -> None:
        running = {w.index for w in self.workers.values()
                   if w.generation == self.generation}
        for index, idx in self.indexes.items():
            if index not in running and index < self.config.processes and idx.restart_at \
                    and now >= idx.restart_at:
                idx.restart_at = 0.0
                self._spawn(index)

    # --- reload ------------------------------------------------------------------------------

    def _handing_over(self, now: float) -> bool:
        """Old-generation workers are still alive shortly after a reload: they are handing
        their tunnels over (one that keeps TLS tunnels to drain them stays longer, and is
        not waited for past HANDOVER_WINDOW)."""
        return now - self.reload_started < HANDOVER_WINDOW and any(
            w.generation < self.generation for w in self.workers.values())

    def reload(self) -> None:
        """SIGHUP: check the new configuration; if good, start a new generation of workers on
        it and ask the old ones to stop gracefully (their tunnels keep relaying until they
        end or shutdown_timeout passes); if bad, keep serving with the old one."""
        log.info("reloading %s", self.path)
        try:
            from .dns import known
            # the names the master follows keep their current answers (dns.known)
            answers = {h: a for up in self.config.upstreams for h, a in up.answers}
            if self.data is not None:
                with known(answers):
                    cfg = config_mod.from_dict(self.data, self.path)
            else:
                with known(answers):
                    cfg = config_mod.load(self.path, self.config.format, self.config.prefix)
            from .worker import check_runtime
            check_runtime(cfg)
        except ConfigError as exc:
            log.error("reload failed, the old configuration stays: %s", exc)
            return
        try:
            self._listen(cfg)
        except OSError as exc:
            log.error("reload failed, the old configuration stays: cannot listen: %s",
                      exc.strerror or exc)
            return
        old = self.config
        self.config = cfg
        accesslog.setup_error_log(cfg.error_log, self.default_level)
        _give_logs(cfg)
        if cfg.pid != old.pid:
            if old.pid:
                _remove_pid(old.pid)
            if cfg.pid:
                try:
                    _write_pid(cfg.pid)
                except OSError as exc:
                    log.error("cannot write the pid file %s: %s", cfg.pid, exc.strerror)
        self.zone_addresses = self.zones.prepare(cfg)
        self._generation(self.generation + 1)
        self.reload_started = time.monotonic()
        olds = list(self.workers.values())
        self.indexes.clear()
        for i in range(cfg.processes):
            self._spawn(i)
        for w in olds:
            # SIGUSR2: hand the tunnels to the new worker of the same index, then exit (a
            # worker that cannot falls back to SIGQUIT's graceful drain)
            w.stopping = True
            _kill(w.pid, signal.SIGUSR2 if cfg.handover else signal.SIGQUIT)
        log.info("reloaded: generation %d, %d worker processes", self.generation, cfg.processes)
        self._watch_names()

    def _tell_untold(self) -> None:
        # Each worker's messages not sent yet go on its control socket (Worker._on_control); one
        # whose queue is full (a worker still starting) gets them at a later pass of the loop.
        for w in self.workers.values():
            while w.untold and w.control is not None:
                upstream, message = next(iter(w.untold.items()))
                try:
                    w.control.send(orjson.dumps(message))
                except BlockingIOError:
                    break
                except OSError as exc:                # the worker is gone (reaped soon)
                    log.error("cannot tell worker process %d: %s", w.pid, exc.strerror or exc)
                    w.untold.clear()
                    break
                del w.untold[upstream]

    def _watch_names(self) -> None:
        # the `resolve` names of this configuration, looked up again in a thread (fastws/dns.py)
        from .dns import Watcher
        if self.watcher is not None:
            self.watcher.stop()
        self.watcher = Watcher.of(self.config)
        self.watcher.start()

    def _names_changed(self) -> None:
        # A `resolve` name's answer changed: each worker of the current generation is told, and
        # replaces the group in its engine (Worker.renew_upstream: no new generation, nothing
        # handed over); workers started later have it in their configuration.
        if self.watcher is None or self.stopping:
            return
        cfg = self.config
        changed: set[str] = set()
        refused = False
        while True:
            try:
                upstream, host, addresses = self.watcher.changes.get_nowait()
            except queue.Empty:
                break
            before = dict(cfg.upstream(upstream).answers)[host]
            log.info("upstream %s: %s now resolves to %s (was %s)", upstream, host,
                     ", ".join(addresses), ", ".join(before))
            try:
                new = config_mod.with_answers(cfg, upstream, host, addresses)
                # built here as each worker will build it: what a worker would refuse (a
                # ring's weights over the limit, a custom balancer's constructor) is refused
                balancer.build_upstream(new.source, new.upstream(upstream))
            except ConfigError as exc:
                log.error("upstream %s: %s's new addresses are not used: %s", upstream, host,
                          exc)
                refused = True
                continue
            cfg = new
            changed.add(upstream)
        if changed and cfg.upstreams != self.config.upstreams:
            self.config = cfg
            for upstream in changed:
                # each message holds every answer of the group: the last one sent is enough
                answers = cfg.upstream(upstream).answers
                message = {"renew": upstream,
                           "answers": [[host, list(addresses)] for host, addresses in answers]}
                for w in self.workers.values():
                    if w.generation == self.generation and not w.stopping:
                        w.untold[upstream] = message
            self._tell_untold()
        if refused:
            # the watcher starts again from what runs, so that a change that could not be
            # applied is reported again
            self._watch_names()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _give_logs(cfg: Config) -> None:
    """With `user`, the access logs are created by the master and given to that user, so
    that workers can open and reopen them (as nginx's ngx_reopen_files chowns them)."""
    if cfg.user is None or os.geteuid() != 0:
        return
    uid = pwd.getpwnam(cfg.user[0]).pw_uid
    gid = grp.getgrnam(cfg.user[1]).gr_gid
    paths = {loc.access_log.path for server in cfg.servers for loc in server.locations
             if loc.access_log is not None and loc.access_log.path != "stderr"}
    if cfg.error_log is not None and cfg.error_log.path != "stderr":
        paths.add(cfg.error_log.path)
    for path in sorted(paths):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            log.error("cannot open the access log %s: %s", path, exc.strerror)
            continue
        try:
            os.fchown(fd, uid, gid)
        finally:
            os.close(fd)


def _running(path: str) -> int:
    """The pid in a pid file if that process is alive, else 0."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return 0
    if not text.isdigit() or int(text) in (0, os.getpid()):
        return 0
    try:
        os.kill(int(text), 0)
        with open(f"/proc/{text}/cmdline", "rb") as f:
            if b"fastws" not in f.read():
                return 0        # a stale file whose pid went to another program
    except ProcessLookupError:
        return 0
    except OSError:
        pass
    return int(text)


def _write_pid(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _remove_pid(path: str) -> None:
    try:
        with open(path) as f:
            if f.read().strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass


def send_signal(cfg: Config, command: str) -> int:
    """`fastws -s reload|quit|stop|reopen|drain`: signal the master whose pid is in the pid
    file.  `drain` (a Kubernetes preStop command) sends SIGTERM, which drains with
    drain_on_term, and returns once the master has exited."""
    if command == "drain" and not cfg.drain_on_term:
        print(f"fastws: {cfg.source}: drain_on_term: is not set, so SIGTERM would stop at once",
              file=sys.stderr)
        return 1
    if not cfg.pid:
        print(f"fastws: {cfg.source}: pid: is not set, so there is no master to signal",
              file=sys.stderr)
        return 1
    try:
        with open(cfg.pid) as f:
            text = f.read().strip()
    except FileNotFoundError:
        print(f"fastws: {cfg.pid}: no pid file (is fastws running?)", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fastws: {cfg.pid}: cannot read the pid file: {exc.strerror}", file=sys.stderr)
        return 1
    if not text.isdigit() or int(text) < 1 or (int(text) == 1 and not _is_fastws(1)):
        # (pid 1: fastws as a container's first process, as examples/deploy runs it)
        print(f"fastws: {cfg.pid}: invalid pid {text!r}", file=sys.stderr)
        return 1
    pid = int(text)
    try:
        os.kill(pid, COMMANDS[command])
    except ProcessLookupError:
        print(f"fastws: {cfg.pid}: no process {pid} (stale pid file)", file=sys.stderr)
        return 1
    except PermissionError:
        print(f"fastws: {cfg.pid}: not allowed to signal process {pid}", file=sys.stderr)
        return 1
    if command == "drain":
        deadline = time.monotonic() + cfg.drain_on_term + FAST_STOP_GRACE
        while _alive(pid):
            if time.monotonic() > deadline:
                print(f"fastws: process {pid} still runs {cfg.drain_on_term:g}s after the "
                      "drain began", file=sys.stderr)
                return 1
            time.sleep(0.05)
    return 0


def _is_fastws(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"fastws" in f.read()
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:        # a zombie has exited
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False

