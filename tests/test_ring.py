"""The engine's back ends (engine/ring.pxi): io_uring where the kernel allows it, epoll
elsewhere, and what `fastws -t` and the start-up log say of the choice."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import connect

from engine_support import EngineRunner, tunnel_config
from fastws import _engine
from support import EchoBackend, free_port, proc_net, read_all, wait_until

HERE = Path(__file__).resolve().parent
REFUSE = (sys.executable, str(HERE / "no_io_uring.py"))   # runs a command with io_uring refused
REFUSED = "io_uring_setup() failed: Operation not permitted"


def kernel_allows_io_uring() -> bool:
    """Asked of the kernel directly (io_uring_setup with one entry), not of the engine."""
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)            # struct io_uring_params, zeroed
    fd = libc.syscall(425, 1, params)
    if fd < 0:
        return False
    os.close(fd)
    return True


def config_file(tmp_path: Path, port: int, engine: str | None,
                upstream: str = "127.0.0.1:9") -> Path:
    path = tmp_path / "fastws.toml"
    top = f'engine = "{engine}"\n' if engine else ""
    path.write_text(f"""{top}
[[upstream]]
name = "backend"
servers = ["{upstream}"]

[[server]]
listen = ["127.0.0.1:{port}"]

[[server.location]]
path = "/ws"
proxy_pass = "backend"

[[server.location]]
path = "/"
return = 200
""")
    return path


def check(path: Path, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, sys.executable, "-m", "fastws", "-t", "-c", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_fastws_t_says_which_back_end_runs_and_why(tmp_path: Path):
    run = check(config_file(tmp_path, free_port(), None))
    assert run.returncode == 0, run.stderr
    if kernel_allows_io_uring():
        assert "fastws: engine: io_uring (io_uring is available)" in run.stdout
    else:
        assert "fastws: engine: epoll (io_uring_setup() failed: " in run.stdout
    run = check(config_file(tmp_path, free_port(), "epoll"))
    assert 'fastws: engine: epoll (engine = "epoll" in the configuration)' in run.stdout


def test_where_io_uring_is_refused_auto_falls_back_to_epoll(tmp_path: Path):
    run = check(config_file(tmp_path, free_port(), None), REFUSE)
    assert run.returncode == 0, run.stderr
    assert f"fastws: engine: epoll ({REFUSED}" in run.stdout


def test_io_uring_asked_for_and_refused_is_one_line(tmp_path: Path):
    path = config_file(tmp_path, free_port(), "io_uring")
    run = check(path, REFUSE)
    assert run.returncode == 1
    assert run.stderr.strip() == (f"fastws: {path}: engine: io_uring is refused here: "
                                  f"{REFUSED} (kernel.io_uring_disabled, or a seccomp profile)")


def test_an_unknown_engine_is_one_line(tmp_path: Path):
    path = config_file(tmp_path, free_port(), "kqueue")
    run = check(path)
    assert run.returncode == 1
    assert run.stderr.strip() == (f"fastws: {path}: engine: unknown engine 'kqueue' "
                                  "(one of auto, io_uring, epoll)")


def test_a_proxy_where_io_uring_is_refused_relays_on_epoll(make_proxy, tmp_path: Path):
    backend = EchoBackend()
    port = free_port()
    proxy = make_proxy(config_file(tmp_path, port, None, backend.address).read_text(),
                       port=port, prefix=REFUSE, engine=None)
    with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        for size in (1, 4096, 100_000):
            ws.send(b"x" * size)
            assert ws.recv() == b"x" * size
    assert f"engine: epoll ({REFUSED}" in proxy.output()
    backend.close()


def test_the_start_up_log_names_the_back_end(make_proxy, engine: str, tmp_path: Path):
    port = free_port()
    proxy = make_proxy(config_file(tmp_path, port, None).read_text(), port=port)
    wait_until(lambda: f"engine: {engine} (engine = \"{engine}\" in the configuration)"
               in proxy.output())


def test_sockets_closed_in_the_turn_that_opened_them_are_closed_for_good(make_proxy):
    # With io_uring a poll holds its socket: one accepted, answered and closed before its
    # registration reached the kernel, whose fd number the next client then gets, must still
    # be closed (its client sees the end), and so must the next one.
    port = free_port()
    proxy = make_proxy({"server": [{"listen": [f"127.0.0.1:{port}"], "location": [
        {"path": "/", "return": 204}]}]}, port=port)
    def served() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            return read_all(s).startswith(b"HTTP/1.1 204")

    for _ in range(50):                     # (the worker is up and has opened what it opens)
        assert served()
    start = proxy.fds()
    for _ in range(300):
        assert served()
    wait_until(lambda: proxy.fds() <= start)


def test_the_engine_refuses_an_unknown_back_end():
    with pytest.raises(ValueError, match="engine must be auto, io_uring or epoll"):
        _engine.Engine(engine="select")
    with pytest.raises(ValueError, match="engine must be auto, io_uring or epoll"):
        _engine.probe_backend("select")


def test_the_engine_watches_one_control_plane(engine: str):
    # (one Io is armed again after the control plane's pass: a second would be forgotten)
    e = _engine.Engine(engine=engine)
    r, w = os.pipe()
    try:
        e.watch_control(r)
        with pytest.raises(RuntimeError, match="already watches a control plane"):
            e.watch_control(w)
    finally:
        e.stop()
        os.close(r)
        os.close(w)


def test_a_reload_to_a_refused_io_uring_keeps_the_old_configuration(make_proxy, tmp_path: Path):
    port = free_port()
    path = config_file(tmp_path, port, None)
    proxy = make_proxy(path.read_text(), port=port, prefix=REFUSE, engine=None)
    wait_until(lambda: "engine: epoll (" in proxy.output())
    [worker] = proxy.workers()
    proxy.path.write_text('engine = "io_uring"\n' + proxy.path.read_text())
    os.kill(proxy.pid, signal.SIGHUP)
    wait_until(lambda: "reload failed, the old configuration stays" in proxy.output())
    assert "engine: io_uring is refused here" in proxy.output()
    assert proxy.workers() == [worker]
    assert proxy.get("/")[0] == 200


# A WebSocket server in its own process, to be killed: it answers every opening handshake
# with a 101, then sends back every byte it gets, as it is, and closes after the client.
HOLDING_BACKEND = r"""
import asyncio, base64, hashlib, sys

async def hold(reader, writer):
    head = await reader.readuntil(b"\r\n\r\n")
    key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")
           if l.lower().startswith(b"sec-websocket-key:")][0]
    accept = base64.b64encode(hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest())
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()

async def main():
    server = await asyncio.start_server(hold, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


@pytest.fixture
def echo_process() -> Iterator[tuple[subprocess.Popen[str], str]]:
    """The server above, started: the process and its address.  The open-files limit is
    raised first (for this process, and so for the server and the proxy started after): 1,000
    tunnels take 1,000 sockets in each of them, over the usual soft limit of 1,024."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"1,000 tunnels need more open files than the hard limit here ({hard})")
    raised = soft != resource.RLIM_INFINITY and soft < 4096
    if raised:
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, hard))
    backend = subprocess.Popen([sys.executable, "-c", HOLDING_BACKEND], stdout=subprocess.PIPE,
                               text=True)
    try:
        yield backend, f"127.0.0.1:{int(backend.stdout.readline())}"  # type: ignore[union-attr]
    finally:
        backend.kill()
        backend.wait()
        backend.stdout.close()                                      # type: ignore[union-attr]
        if raised:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def many_tunnels(port: int, n: int) -> list[socket.socket]:
    """`n` tunnels through the proxy on `port`, their 101s read."""
    clients: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            clients.append(s)
            s.sendall(UPGRADE)
        for s in clients:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = s.recv(4096)
                assert chunk, "a tunnel was refused"
                head += chunk
            assert head.startswith(b"HTTP/1.1 101 "), head
    except BaseException:
        for s in clients:
            s.close()
        raise
    return clients


def echoed(s: socket.socket, n: int, ended: str) -> bytes:
    """The next `n` bytes the tunnel `s` brings back (`ended`: the failure if it ends first)."""
    got = b""
    while len(got) < n:
        chunk = s.recv(4096)
        assert chunk, ended
        got += chunk
    return got


def ring_config(port: int, upstream: str) -> dict[str, Any]:
    # worker_connections 2,048: the completion queue is its smallest, 4,096 entries
    return {"worker_connections": 2048,
            "upstream": [{"name": "backend", "servers": [upstream]}],
            "server": [{"listen": [f"127.0.0.1:{port}"], "location": [
                {"path": "/ws", "proxy_pass": "backend", "frames": False},
                {"path": "/", "return": 200}]}]}


def test_a_backend_dying_under_a_thousand_tunnels_ends_every_one(make_proxy, echo_process):
    # 1,000 tunnels whose upstream ends while the worker is stopped: when it runs again the
    # kernel has all 1,000 ends waiting (epoll hands them over 512 a turn, io_uring as its
    # deferred work runs), and the worker closes 2,000 sockets in a few turns.  With io_uring
    # a socket is closed for good only once its poll is removed: a removal that went missing
    # would leave its client waiting for an end that never comes.  Every client must see it,
    # the worker must hold no connection after, and it must serve the next one.
    backend, upstream = echo_process
    port = free_port()
    proxy = make_proxy(ring_config(port, upstream), port=port)
    clients = many_tunnels(port, 1000)
    try:
        assert proxy.connections() == 2000
        [worker] = proxy.workers()
        backend_port = f":{int(upstream.rsplit(':', 1)[1]):04X}"
        def upstream_ends_waiting() -> int:                 # CLOSE_WAIT toward the backend
            return sum(1 for row in proc_net("tcp")
                       if row[2].endswith(backend_port) and row[3] == "08")
        os.kill(worker, signal.SIGSTOP)
        try:
            backend.kill()
            backend.wait()
            wait_until(lambda: upstream_ends_waiting() == 1000)
        finally:
            os.kill(worker, signal.SIGCONT)
        for s in clients:
            assert read_all(s) == b""        # (a timeout fails the test: that tunnel hangs)
        wait_until(lambda: proxy.connections() == 0)
        assert proxy.get("/")[0] == 200
    finally:
        for s in clients:
            s.close()


def test_a_reload_hands_over_a_thousand_tunnels_at_once(make_proxy, echo_process):
    # The old worker lets go of 2,000 sockets in one call (Engine.export): with io_uring,
    # 2,000 poll removals for a submission queue of 1,024 entries, submitted early when it
    # fills, with no turn between to read their completions.  Every tunnel must go on
    # relaying in the new worker, and end cleanly after.
    _, upstream = echo_process
    port = free_port()
    config = ring_config(port, upstream)
    proxy = make_proxy(config, port=port)
    clients = many_tunnels(port, 1000)
    try:
        [old] = proxy.workers()
        config["server"][0]["location"][0]["read_timeout"] = "61s"    # a reload that changes
        proxy.rewrite(config)
        os.kill(proxy.pid, signal.SIGHUP)
        wait_until(lambda: old not in proxy.workers() and len(proxy.workers()) == 1)
        for i, s in enumerate(clients):
            message = b"tunnel %d" % i
            s.sendall(message)
            assert echoed(s, len(message), f"tunnel {i} ended in the reload") == message
    finally:
        for s in clients:
            s.close()
    wait_until(lambda: proxy.connections() == 0)


@pytest.mark.skipif(not kernel_allows_io_uring(),
                    reason="io_uring is refused here (epoll has no completion queue to fill)")
def test_a_full_completion_queue_loses_no_edge(echo_process):
    # A ring of 8 submission and 16 completion entries under 300 tunnels (the kernel posts at
    # most about 20 deferred completions per io_uring_enter, so only a queue smaller than that
    # fills).  Each round, all 300 clients send while the engine is held between two turns, so
    # 300 polls fire at once.  The kernel keeps what does not fit (IORING_FEAT_NODROP) and
    # ends each multishot poll it could not post for: every message must still be relayed,
    # every ended poll armed again (the next rounds need them), and every socket closed after.
    # The full submission queue is submitted early, over and over: the control plane's poll
    # must not be armed again before its loop has had its pass (that would report its fd ready
    # once more, and this test's control plane would block reading an empty pipe).
    _, upstream = echo_process
    config = tunnel_config(upstream)
    runner = EngineRunner(config, engine="io_uring", ring_sq=8, ring_cq=16)
    try:
        clients = many_tunnels(runner.port, 300)
        try:
            for turn in range(4):
                held, release = threading.Event(), threading.Event()
                def hold() -> None:
                    held.set()
                    release.wait(30)
                failed: list[BaseException] = []
                def call_hold() -> None:
                    try:
                        runner.call(hold)
                    except BaseException as exc:                # (told by the main thread)
                        failed.append(exc)
                holder = threading.Thread(target=call_hold)
                holder.start()
                assert held.wait(10)
                messages = [b"round %d, tunnel %d" % (turn, i) for i in range(len(clients))]
                for s, message in zip(clients, messages):
                    s.sendall(message)
                release.set()
                holder.join(10)
                assert not holder.is_alive() and not failed, failed
                for i, (s, message) in enumerate(zip(clients, messages)):
                    assert echoed(s, len(message), f"tunnel {i} ended in round {turn}") == message
            assert runner.stats()["ring_overflows"] > 0      # (the queue did fill)
        finally:
            for s in clients:
                s.close()
        wait_until(lambda: runner.stats()["conns"] == 0)
    finally:
        runner.close()
