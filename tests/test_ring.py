"""The engine's back ends (engine/ring.pxi): io_uring where the kernel allows it, epoll
elsewhere, and what `fastws -t` and the start-up log say of the choice."""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from websockets.sync.client import connect

from fastws import _engine
from support import EchoBackend, free_port, read_all, wait_until

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


def test_a_reload_to_a_refused_io_uring_keeps_the_old_configuration(make_proxy, tmp_path: Path):
    import signal
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
