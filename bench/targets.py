"""The targets: no proxy, fastws, nginx, HAProxy (with and without splice).

Every proxy gets the same job, equivalent to the nginx WebSocket recipe the project
reproduces: one listener on loopback, everything proxied to one upstream (the bench
backend), the Upgrade/Connection handshake passed through, Host kept, X-Real-IP and
X-Forwarded-For added, one worker process/thread, access logs off, long tunnel
timeouts, keep-alive to the upstream for plain HTTP where the proxy supports it.
"""
from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import deps, procs

PEERS = ("nginx", "haproxy", "haproxy-splice")
REPO = Path(__file__).resolve().parent.parent


def _nofile_hard() -> int:
    return resource.getrlimit(resource.RLIMIT_NOFILE)[1]


# most connections a one-process proxy is asked to hold (idle tunnels use 2 fds each)
MAXCONN = (_nofile_hard() - 160) // 2


def _raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def _preexec(cpus: set[int] | None):
    def fn():
        os.setsid()  # own process group, so the bench's Ctrl-C is ours to forward
        _raise_nofile()
        if cpus:
            os.sched_setaffinity(0, cpus)
    return fn


def free_port(avoid: set[int] = frozenset()) -> int:
    """A loopback TCP port nobody uses, below the ephemeral range, picked at random
    (other programs on the machine may be running their own servers)."""
    import random
    for _ in range(500):
        port = random.randrange(20000, 32000)
        if port in avoid or procs.listening_inodes(port):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free loopback port found")


def wait_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class Target:
    name: str
    label: str
    port: int
    available: bool = True
    note: str = ""
    proc: subprocess.Popen | None = None
    workdir: Path | None = None
    extra_pids: list[int] = field(default_factory=list)
    env: dict | None = None
    only: tuple[str, ...] | None = None     # the scenarios it runs (None: all)
    cpus: set[int] | None = None            # its own CPUs (None: the proxy's core)

    # -- interface -------------------------------------------------------------
    def command(self, workdir: Path, backend: tuple[str, int]) -> list[str] | None:
        raise NotImplementedError

    @property
    def is_proxy(self) -> bool:
        return True

    def address(self, backend: tuple[str, int]) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def start(self, workdir: Path, backend: tuple[str, int], cpus: set[int] | None) -> str | None:
        """Start the target; returns an error string or None."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        if self.is_proxy:
            self.port = free_port({backend[1]})
        cmd = self.command(workdir, backend)
        if cmd is None:
            return None
        log = open(workdir / f"{self.name}.log", "ab")
        env = dict(os.environ, **self.env) if self.env else None
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                     cwd=workdir, env=env, preexec_fn=_preexec(cpus))
        log.close()
        if not wait_port("127.0.0.1", self.port, 15.0, self.proc):
            tail = self.log_tail()
            self.stop()
            return f"{self.label} did not start listening on port {self.port}: {tail}"
        time.sleep(0.2)  # let workers settle
        if self.proc.poll() is not None:
            return f"{self.label} exited right after start: {self.log_tail()}"
        if not procs.owns_listener(self.pids(), self.port):
            self.stop()
            return f"port {self.port} is held by a process that is not {self.label}'s: not measured"
        return None

    def log_tail(self) -> str:
        try:
            data = (self.workdir / f"{self.name}.log").read_text(errors="replace")
            return " | ".join(data.strip().splitlines()[-3:])[-400:]
        except OSError:
            return ""

    def pids(self) -> list[int]:
        if self.proc is None or self.proc.poll() is not None:
            return []
        return procs.tree(self.proc.pid)

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        p = self.proc
        known = self.pids()
        if p.poll() is None:
            try:
                p.send_signal(signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=8)
            except subprocess.TimeoutExpired:
                for pid in known:  # only the processes this target started
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                p.wait(timeout=5)
        # reap workers that outlived their master (by PID, ours only)
        deadline = time.monotonic() + 3
        for pid in known:
            if pid == p.pid:
                continue
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.05)
            if os.path.exists(f"/proc/{pid}"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc = None


class NoProxy(Target):
    """The load generator talks to the backend directly: the physical limit."""

    @property
    def is_proxy(self) -> bool:
        return False

    def address(self, backend):
        return backend

    def command(self, workdir, backend):
        return None


class Nginx(Target):
    def command(self, workdir, backend):
        exe = deps.which("nginx")
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / d).mkdir(exist_ok=True)
        user = "user root root;\n" if os.geteuid() == 0 else ""
        conf = f"""# generated by python -m bench
{user}worker_processes 1;
worker_rlimit_nofile {_nofile_hard()};
daemon off;
master_process on;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;

events {{
    # nginx starts closing connections once fewer than 1/16 of worker_connections are
    # free, so the ceiling sits well above what the fd limit lets it hold
    worker_connections {2 * _nofile_hard()};
}}

http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      '';
    }}

    upstream backend {{
        server {backend[0]}:{backend[1]};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen 127.0.0.1:{self.port} backlog=4096;

        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Real-IP $remote_addr;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_connect_timeout 60s;
            proxy_send_timeout 3600s;
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""
        (workdir / "nginx.conf").write_text(conf)
        return [exe, "-e", str(workdir / "nginx-error.log"), "-p", str(workdir), "-c", str(workdir / "nginx.conf")]


class HAProxy(Target):
    def __init__(self, *a, splice: bool = False, splice_mode: str = "always", **kw):
        super().__init__(*a, **kw)
        self.splice = splice
        self.splice_mode = splice_mode

    def command(self, workdir, backend):
        exe = deps.which("haproxy")
        splice = ""
        if self.splice:
            splice = ("    option splice-auto\n" if self.splice_mode == "auto"
                      else "    option splice-request\n    option splice-response\n")
        # HAProxy counts 2 fds per connection plus 2 per pipe against ulimit-n; both
        # variants get the same maxconn, the splice one a small pipe pool that fits.
        pipes = "    maxpipes 64\n" if self.splice else ""
        conf = f"""# generated by python -m bench
global
    nbthread 1
    maxconn {MAXCONN}
    ulimit-n {_nofile_hard()}
{pipes}
defaults
    mode http
    maxconn {MAXCONN}
    timeout connect 60s
    timeout client 3600s
    timeout server 3600s
    timeout tunnel 3600s
    timeout http-keep-alive 3600s
{splice}
frontend fe
    bind 127.0.0.1:{self.port} backlog 4096
    default_backend be

backend be
    option forwardfor
    http-request set-header X-Real-IP %[src]
    server s1 {backend[0]}:{backend[1]}
"""
        (workdir / "haproxy.cfg").write_text(conf)
        return [exe, "-db", "-f", str(workdir / "haproxy.cfg")]


class FastWS(Target):
    def __init__(self, *a, cmd: list[str] | None = None, processes: int | None = None,
                 options: dict[str, str] | None = None, location: str = "", **kw):
        super().__init__(*a, **kw)
        self.cmd = cmd
        self.processes = processes
        self.options = options or {}
        self.location = location        # more keys for the location, in TOML

    def command(self, workdir, backend):
        top = f"processes = {self.processes}\n" if self.processes else ""
        options = dict(self.options)
        # the same connection ceiling nginx gets (fastws's worker_connections has nginx's
        # meaning: two per tunnel); the fd limit is what really bounds both
        options.setdefault("worker_connections", str(2 * _nofile_hard()))
        for k, v in options.items():   # --fastws-option KEY=VALUE, VALUE in TOML syntax
            top += f"{k} = {v}\n"
        top += "\n" if top else ""
        conf = f"""# generated by python -m bench
{top}[[upstream]]
name = "backend"
servers = ["{backend[0]}:{backend[1]}"]
# as nginx's upstream block: a pool of kept-alive connections for plain requests
keepalive = 64
keepalive_requests = 1000000

[[server]]
listen = ["127.0.0.1:{self.port}"]
keepalive_requests = 1000000

[[server.location]]
path = "/"
proxy_pass = "backend"
{self.location}"""
        (workdir / "fastws.toml").write_text(conf)
        return [*self.cmd, "-c", str(workdir / "fastws.toml")]

    def stop(self):
        # fastws stops on SIGTERM or SIGINT
        super().stop()


ALL = ("noproxy", "fastws", "fastws-epoll", "fastws-blind", "fastws-hook", "fastws-2w", "nginx",
       "haproxy", "haproxy-splice")
LABELS = {
    "noproxy": "no proxy",
    "fastws": "fastws",
    "fastws-epoll": "fastws, epoll",
    "fastws-blind": "fastws, frames off",
    "fastws-hook": "fastws, with a hook",
    "fastws-2w": "fastws, 2 workers",
    "nginx": "nginx",
    "haproxy": "HAProxy",
    "haproxy-splice": "HAProxy + splice",
}


def make_targets(names: list[str], base_port: int, fastws_processes: int | None,
                 haproxy_splice: str = "always", fastws_options: dict[str, str] | None = None) -> list[Target]:
    out: list[Target] = []
    for i, name in enumerate(names):
        port = base_port + 1 + i
        label = LABELS[name]
        if name == "noproxy":
            t: Target = NoProxy(name, label, port)
        elif name == "nginx":
            t = Nginx(name, label, port)
            if not deps.which("nginx"):
                t.available, t.note = False, "nginx is not installed: skipped"
        elif name in ("haproxy", "haproxy-splice"):
            t = HAProxy(name, label, port, splice=name.endswith("splice"), splice_mode=haproxy_splice)
            if not deps.which("haproxy"):
                t.available, t.note = False, "haproxy is not installed: skipped"
        elif name in ("fastws", "fastws-epoll", "fastws-blind", "fastws-hook", "fastws-2w"):
            # fastws: the engine's default back end (io_uring where the kernel allows it);
            # fastws-epoll: the epoll back end, beside it; fastws-blind: WebSocket tunnels
            # relayed as bytes (frames = false), to show what following the frames costs
            # (docs/websocket.md); fastws-hook: a trivial Python hook on the location
            # (bench/hook.py), handshakes only, to show what a hook costs
            cmd, env, why = deps.fastws_command()
            location = {"fastws-blind": "frames = false\n",
                        "fastws-hook": 'hook = "bench.hook:check"\n'}.get(name, "")
            options = dict(fastws_options or {})
            if name == "fastws-epoll":
                options["engine"] = '"epoll"'
            t = FastWS(name, label, port, cmd=cmd,
                       processes=2 if name == "fastws-2w" else fastws_processes,
                       options=options, location=location)
            t.env = env
            if name == "fastws-hook":
                t.only = ("handshake",)
                t.env = dict(env or {}, PYTHONPATH=deps.repo_path(env))
            if name == "fastws-2w":
                # scaling: two workers on every core (the load generator's included)
                t.only = ("echo-64", "handshake")
                t.cpus = set(range(os.cpu_count() or 1))
            if cmd is None:
                t.available, t.note = False, why
            else:
                t.note = why
        else:
            raise ValueError(f"unknown target {name!r}; known: {', '.join(ALL)}")
        out.append(t)
    return out
