"""Operations: the master and its workers, signals, reloads, access logs and status pages, with
real fastws processes, real signals and real sockets."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import (Proxy, RawBackend, free_port, http_get, port_refused, raw_echo_handler,
                     raw_exchange, read_all, read_head, to_toml, upgrade_request, wait_until)

WEBSOCKET_FORMAT = ('$remote_addr - $remote_user [$time_local] "$request" $status '
                    '$body_bytes_sent "$http_referer" "$http_user_agent" rt=$request_time '
                    'uct="$upstream_connect_time" uht="$upstream_header_time" '
                    'urt="$upstream_response_time"')


def ops_config(tmp: Path, port: int, backend: str, *, body: str = "v1",
               **top: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "processes": 2,
        "pid": str(tmp / "fastws.pid"),
        "error_log": {"path": str(tmp / "error.log"), "level": "info"},
        "log_format": {"websocket": WEBSOCKET_FORMAT},
        "access_log": {"path": str(tmp / "access.log"), "format": "websocket"},
    }
    config.update(top)
    config["upstream"] = [{"name": "backend", "servers": [backend]}]
    config["server"] = [{
        "listen": [f"127.0.0.1:{port}"],
        "location": [
            # the tests speak raw bytes through the tunnels: relayed blind
            {"path": "/ws", "proxy_pass": "backend", "frames": False},
            {"path": "/", "return": [200, body]},
            {"path": "= /nginx_status", "stub_status": True, "access_log": False},
            {"path": "= /status", "status": "json", "access_log": False},
            {"path": "= /metrics", "status": "prometheus", "access_log": False},
        ],
    }]
    return config


@pytest.fixture
def backend():
    b = RawBackend(raw_echo_handler)
    yield b
    b.close()


def tunnel(port: int, path: str = "/ws", extra: str = "") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(upgrade_request(path, extra=extra))
    head, rest = read_head(s)
    assert head.startswith(b"HTTP/1.1 101 "), head
    assert rest == b""
    return s


def echo(s: socket.socket, data: bytes) -> None:
    s.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = s.recv(65536)
        assert chunk, "the tunnel closed"
        got += chunk
    assert got == data


def body_of(proxy: Any, path: str = "/", port: int | None = None) -> bytes:
    code, body = proxy.get(path, port)
    assert code == 200
    return body


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def one_worker(make_proxy, config: dict, port: int) -> tuple[Any, int]:
    """A proxy of one worker on `config`, started; the proxy and its worker's pid."""
    proxy = make_proxy(config, port=port)
    wait_until(lambda: len(proxy.workers()) == 1)
    [worker] = proxy.workers()
    return proxy, worker


def reload_with(proxy, config: dict) -> None:
    """`config` written to the proxy's file, and SIGHUP."""
    proxy.rewrite(config)
    os.kill(proxy.pid, signal.SIGHUP)


def workers_of(proxy: Any) -> list[dict[str, Any]]:
    return proxy.status()["workers"]


# --- processes -----------------------------------------------------------------------------

def test_connections_spread_over_the_workers(make_proxy, tmp_path, port, backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address, processes=3), port=port)
    wait_until(lambda: len(proxy.workers()) == 3)
    for _ in range(120):
        assert body_of(proxy) == b"v1"
    workers = workers_of(proxy)
    assert len(workers) == 3
    assert sorted(w["pid"] for w in workers) == sorted(proxy.workers())
    assert proxy.pid not in [w["pid"] for w in workers]   # the master serves nothing
    assert all(w["accepts"] > 0 for w in workers), workers
    assert sum(w["accepts"] for w in workers) >= 120


def cpus_of(pid: int) -> set[int]:
    return os.sched_getaffinity(pid)


@pytest.mark.parametrize("affinity", ["auto", "masks"])
def test_worker_cpu_affinity_binds_each_worker(make_proxy, tmp_path, port, backend, affinity):
    allowed = sorted(os.sched_getaffinity(0))
    if affinity == "auto":
        spec: Any = "auto"
        want = [{allowed[i % len(allowed)]} for i in range(3)]
    else:
        # worker 0 on the last CPU, the others on the first (the last mask serves the rest)
        spec = ["1" + "0" * allowed[-1], "1" + "0" * allowed[0]]
        want = [{allowed[-1]}, {allowed[0]}, {allowed[0]}]
    proxy = make_proxy(ops_config(tmp_path, port, backend.address, processes=3,
                                  worker_cpu_affinity=spec), port=port)
    wait_until(lambda: len(proxy.workers()) == 3)
    assert body_of(proxy) == b"v1"
    got = [sorted(cpus_of(pid)) for pid in proxy.workers()]
    assert sorted(got) == sorted(sorted(c) for c in want)
    for i, cpus in enumerate(want):      # and which worker is where, as the error log says
        wait_until(lambda: f"worker {i} runs on CPU {min(cpus)}" in
                   (tmp_path / "error.log").read_text())
    assert cpus_of(proxy.pid) == set(allowed)        # the master stays where it was


@pytest.mark.parametrize("spec, problem", [
    ("all", "expected \"auto\" or a list of CPU masks"),
    (["012"], "is not a CPU mask of 0s and 1s"),
    (["0"], "names no CPU"),
])
def test_worker_cpu_affinity_mistakes(spec, problem):
    from fastws import config
    from fastws.errors import ConfigError
    with pytest.raises(ConfigError, match=problem):
        config.from_dict({"worker_cpu_affinity": spec, "upstream": [
            {"name": "b", "servers": ["127.0.0.1:9"]}], "server": [
            {"listen": ["127.0.0.1:8080"], "location": [{"path": "/", "proxy_pass": "b"}]}]})


def test_a_killed_worker_is_replaced_and_service_goes_on(make_proxy, tmp_path, port, backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    wait_until(lambda: len(proxy.workers()) == 2)
    before = proxy.workers()
    accepted = proxy.status()["connections"]["accepted"]
    os.kill(before[0], signal.SIGKILL)
    for _ in range(40):            # no request fails, even those queued for the dead worker
        assert body_of(proxy) == b"v1"
    wait_until(lambda: len(proxy.workers()) == 2 and before[0] not in proxy.workers())
    assert before[1] in proxy.workers()
    status = proxy.status()
    # the dead worker's counts are kept: accepts never go back
    assert status["connections"]["accepted"] >= accepted + 40
    # (the master reaps the worker, then logs: wait for the line, not only the process)
    wait_until(lambda: f"worker process {before[0]} exited on signal 9; restarting it in 0.0s"
               in (tmp_path / "error.log").read_text())
    with tunnel(port) as s:
        echo(s, b"after the restart")
    # a replacement that dies young is restarted after a growing delay
    [second] = set(proxy.workers()) - set(before)
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: len(proxy.workers()) == 2 and second not in proxy.workers())
    wait_until(lambda: f"worker process {second} exited on signal 9; restarting it in 0.1s"
               in (tmp_path / "error.log").read_text())
    assert body_of(proxy) == b"v1"


def test_worker_connections_limit_pauses_accepting_and_drops_nothing(make_proxy, tmp_path,
                                                                     port, backend):
    config = ops_config(tmp_path, port, backend.address, processes=1, worker_connections=6)
    proxy = make_proxy(config, port=port)
    # three clients that have started their heads and stall (3 x 2 = 6); listeners defer
    # accept until a client has sent something, so a silent one would not be accepted at all
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    for s in idle:
        s.sendall(b"GET / HTTP/1.1\r\n")
    wait_until(lambda: proxy.connections() == 3)    # all three accepted: the worker is full
    late = socket.create_connection(("127.0.0.1", port), timeout=10)
    late.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    late.settimeout(0.5)
    with pytest.raises(socket.timeout):
        late.recv(100)          # queued by the kernel, not accepted while the worker is full
    wait_until(lambda: "worker_connections are not enough" in
               (tmp_path / "error.log").read_text())
    idle[0].close()
    late.settimeout(10)
    assert read_all(late).endswith(b"\r\n\r\nv1")
    for s in idle[1:]:
        s.close()
    late.close()
    assert body_of(proxy) == b"v1"


# --- reload --------------------------------------------------------------------------------

def reload_under_load(proxy: Any, tmp_path: Path, port: int, backend: RawBackend,
                      tunnels: list[socket.socket], **top: Any) -> int:
    """Rewrite the config (answer "v2"), SIGHUP, and keep every tunnel echoing until the new
    configuration is served; return how many rounds of echoes that took."""
    config = ops_config(tmp_path, port, backend.address, body="v2", **top)
    reload_with(proxy, config)
    deadline = time.monotonic() + 10
    rounds = 0
    while True:
        code, body = proxy.get("/")
        # (a reload to fewer workers closes a listener, and a request the kernel had queued
        # on it is reset: docs/operations.md, "Connections waiting in a closing listener")
        assert code == 200 or (code == 0 and top.get("processes", 2) < 2), code
        if body == b"v2":
            break
        assert time.monotonic() < deadline, "the new configuration is not served"
        for i, s in enumerate(tunnels):
            echo(s, b"during %d" % i)
        rounds += 1
    # once the old workers have stopped accepting, every new connection gets the new config
    wait_until(lambda: all(w["retiring"] for w in workers_of(proxy) if w["generation"] == 1))
    assert all(body_of(proxy) == b"v2" for _ in range(20))
    return rounds


@pytest.mark.parametrize("after", [2, 1])
def test_reload_hands_live_tunnels_to_the_new_workers(make_proxy, tmp_path, port, backend,
                                                      after):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    wait_until(lambda: len(proxy.workers()) == 2)
    old = set(proxy.workers())
    tunnels = [tunnel(port) for _ in range(20)]
    for i, s in enumerate(tunnels):
        echo(s, b"before %d" % i)
    rounds = reload_under_load(proxy, tmp_path, port, backend, tunnels, processes=after)
    # the old workers pass their tunnels on and exit at once, while the tunnels stay open
    wait_until(lambda: not set(proxy.workers()) & old)      # exited and reaped
    new = set(proxy.workers())
    assert len(new) == after
    for i, s in enumerate(tunnels):
        echo(s, b"after %d " % i * 20000)
    wait_until(lambda: len(workers_of(proxy)) == after)     # the master reaped the old ones
    data = proxy.status()
    assert {w["generation"] for w in data["workers"]} == {2}
    assert sum(w["tunnels"] for w in data["workers"]) == 20
    assert data["tunnels"] == {"active": 20, "total": 20}
    assert "tunnels handed to the new workers" in (tmp_path / "error.log").read_text()
    for s in tunnels:
        s.close()
    wait_until(lambda: proxy.status()["tunnels"]["active"] == 0)
    # each tunnel is logged once, with everything it carried in both generations
    wait_until(lambda: len([ln for ln in log_lines(tmp_path / "access.log")
                            if '"GET /ws ' in ln]) == 20)
    sizes = sorted(int(LINE.match(ln)["body_bytes_sent"])
                   for ln in log_lines(tmp_path / "access.log") if '"GET /ws ' in ln)
    assert sizes == sorted(len(b"before %d" % i) + rounds * len(b"during %d" % i)
                           + len(b"after %d " % i * 20000) for i in range(20))


BULK = bytes(range(256)) * (32 << 10)      # 8 MiB with a pattern that shows any reordering


def bulk_handler(conn: socket.socket, backend: RawBackend) -> None:
    """A 101; on "go", 8 MiB at once however slowly the client reads; then an echo."""
    from support import ws_upgrade_handler
    ws_upgrade_handler(conn, backend)
    assert conn.recv(2) == b"go"
    conn.sendall(BULK)
    raw_echo_handler_tail(conn)


def raw_echo_handler_tail(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


@pytest.mark.parametrize("relay", ["splice", "copy"])
def test_bytes_in_flight_survive_the_handover(make_proxy, tmp_path, port, relay):
    bulk = RawBackend(bulk_handler)
    config = ops_config(tmp_path, port, bulk.address, processes=1)
    config["server"][0]["location"][0]["relay"] = relay
    proxy, old = one_worker(make_proxy, config, port)
    s = tunnel(port)
    s.sendall(b"go")
    # the client does not read yet: bytes pile up in the kernel and in the old worker's engine,
    # where the blocked flow holds them (in a pipe when splicing, in a buffer when copying)
    wait_until(lambda: proxy.status()["engine"]["bytes_spliced" if relay == "splice"
                                               else "bytes_copied"] > 0)
    wait_until(lambda: proxy.status()["engine"]["held"][
        "pipes" if relay == "splice" else "buffers"] >= 1)
    config["server"][0]["location"][1]["return"] = [200, "v2"]
    reload_with(proxy, config)
    wait_until(lambda: not alive(old))
    assert body_of(proxy) == b"v2"
    s.settimeout(10)
    got = bytearray()
    while len(got) < len(BULK):
        chunk = s.recv(1 << 20)
        assert chunk, "the tunnel closed"
        got += chunk
    assert got == BULK
    echo(s, b"still the same tunnel")
    s.close()
    bulk.close()
    moved = re.search(r"1 tunnels handed to the new workers \((\d+) bytes in flight\)",
                      (tmp_path / "error.log").read_text())
    assert moved and int(moved[1]) > 0, "nothing was in flight: the test proves nothing"


def test_a_handed_over_tunnel_outlives_its_upstream_group(make_proxy, tmp_path, port, backend):
    config = ops_config(tmp_path, port, backend.address, processes=1)
    proxy, old = one_worker(make_proxy, config, port)
    s = tunnel(port)
    echo(s, b"one")
    config["upstream"][0]["name"] = "renamed"          # the tunnel's group is gone
    config["server"][0]["location"][0]["proxy_pass"] = "renamed"
    reload_with(proxy, config)
    wait_until(lambda: old not in proxy.workers())
    echo(s, b"two")
    assert proxy.status()["tunnels"]["active"] == 1
    s.close()
    wait_until(lambda: proxy.status()["tunnels"]["active"] == 0)
    with tunnel(port) as s2:
        echo(s2, b"a new tunnel to the renamed group")
    wait_until(lambda: len(log_lines(tmp_path / "access.log")) == 2)
    first = LINE.match(log_lines(tmp_path / "access.log")[0])
    assert first and first["status"] == "101" and first["body_bytes_sent"] == "6"


def test_a_handover_that_cannot_reach_the_new_worker_drains_in_the_old_one(make_proxy, tmp_path,
                                                                           port, backend):
    config = ops_config(tmp_path, port, backend.address, processes=1)
    proxy, old = one_worker(make_proxy, config, port)
    tunnels = [tunnel(port) for _ in range(3)]
    # an impostor holds the new worker's handover address and never answers
    impostor = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    impostor.bind(f"\0fastws-{proxy.pid}-2-0".encode())
    reload_under_load(proxy, tmp_path, port, backend, tunnels, processes=1)
    wait_until(lambda: "the new worker cannot take the tunnels; draining them here" in
               (tmp_path / "error.log").read_text())
    for i, s in enumerate(tunnels):
        echo(s, b"still relayed by the old worker %d" % i)
    assert alive(old)
    for s in tunnels:
        s.close()
    wait_until(lambda: old not in proxy.workers())
    impostor.close()


def test_reload_without_handover_lets_old_workers_drain(make_proxy, tmp_path, port, backend):
    config = ops_config(tmp_path, port, backend.address, handover=False)
    proxy = make_proxy(config, port=port)
    wait_until(lambda: len(proxy.workers()) == 2)
    old = set(proxy.workers())
    tunnels = [tunnel(port) for _ in range(10)]
    for i, s in enumerate(tunnels):
        echo(s, b"before %d" % i)
    reload_under_load(proxy, tmp_path, port, backend, tunnels, handover=False)
    new = set(proxy.workers()) - old
    assert len(new) == 2
    for i, s in enumerate(tunnels):
        echo(s, b"after %d" % i * 100)
    assert all(alive(pid) for pid in old)      # draining: they still relay the old tunnels
    wait_until(lambda: len(workers_of(proxy)) == 4)     # the new ones are up
    gens = {w["pid"]: w["generation"] for w in workers_of(proxy)}
    assert {gens[p] for p in new} == {2} and {gens[p] for p in old} == {1}
    with tunnel(port) as s:
        echo(s, b"a tunnel of the new generation")
    for s in tunnels:
        s.close()
    wait_until(lambda: not set(proxy.workers()) & old)      # exited and reaped
    assert set(proxy.workers()) == new
    assert proxy.status()["tunnels"]["total"] == 11


def test_an_invalid_config_on_reload_leaves_the_old_one_serving(make_proxy, tmp_path, port,
                                                                backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    wait_until(lambda: len(proxy.workers()) == 2)
    before = sorted(proxy.workers())
    proxy.path.write_text(proxy.path.read_text().replace("processes = 2", "processes = 0"))
    # (`fastws -s reload` checks the file first, as nginx -s does, and would refuse to signal)
    r = fastws("-c", str(proxy.path), "-s", "reload")
    assert r.returncode == 1 and "processes: expected a number" in r.stderr
    os.kill(proxy.pid, signal.SIGHUP)
    wait_until(lambda: "reload failed" in (tmp_path / "error.log").read_text())
    text = (tmp_path / "error.log").read_text()
    assert "reload failed, the old configuration stays: " \
           f"{proxy.path}: processes: expected a number of processes" in text
    assert body_of(proxy) == b"v1"
    assert sorted(proxy.workers()) == before
    with tunnel(port) as s:
        echo(s, b"still serving")


def test_a_reload_whose_new_address_cannot_be_bound_keeps_the_old_config(make_proxy, tmp_path,
                                                                          port, backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    wait_until(lambda: len(proxy.workers()) == 2)
    before = sorted(proxy.workers())
    taken = socket.socket()             # no SO_REUSEPORT: fastws cannot share this port
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    config = ops_config(tmp_path, port, backend.address, body="v2")
    config["server"][0]["listen"].append(f"127.0.0.1:{taken.getsockname()[1]}")
    reload_with(proxy, config)
    wait_until(lambda: "cannot listen" in (tmp_path / "error.log").read_text())
    assert body_of(proxy) == b"v1" and sorted(proxy.workers()) == before
    taken.close()
    os.kill(proxy.pid, signal.SIGHUP)   # the same file, now that the port is free
    wait_until(lambda: body_of(proxy) == b"v2")
    assert body_of(proxy, port=int(config["server"][0]["listen"][1].rsplit(":", 1)[1])) == b"v2"


# --- stopping ------------------------------------------------------------------------------

def test_graceful_stop_lets_a_tunnel_finish(make_proxy, tmp_path, port, backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    s = tunnel(port)
    echo(s, b"one")
    subprocess.run([sys.executable, "-m", "fastws", "-c", str(proxy.path), "-s", "quit"],
                   check=True, timeout=30)

    wait_until(lambda: port_refused(port))   # no new connection...
    echo(s, b"two" * 1000)              # ...but the open tunnel goes on
    assert proxy.proc.poll() is None
    s.close()
    assert proxy.proc.wait(10) == 0
    assert not (tmp_path / "fastws.pid").exists()


def test_graceful_stop_ends_at_shutdown_timeout(make_proxy, tmp_path, port, backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address, shutdown_timeout="300ms"),
                       port=port)
    s = tunnel(port)
    echo(s, b"one")
    os.kill(proxy.pid, signal.SIGQUIT)
    assert proxy.proc.wait(10) == 0
    s.settimeout(5)
    assert read_all(s) == b""           # closed by the proxy, not by the client
    s.close()


def test_fast_stop_does_not_wait_for_tunnels(make_proxy, tmp_path, port, backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    wait_until(lambda: len(proxy.workers()) == 2)
    workers = proxy.workers()
    s = tunnel(port)
    echo(s, b"one")
    os.kill(proxy.pid, signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    s.settimeout(5)
    assert read_all(s) == b""
    s.close()
    assert not any(alive(pid) for pid in workers)


def test_workers_leave_when_their_master_is_killed(make_proxy, tmp_path, port, backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    wait_until(lambda: len(proxy.workers()) == 2)
    workers = proxy.workers()
    proxy.proc.kill()
    proxy.proc.wait()
    wait_until(lambda: not any(alive(pid) for pid in workers))


# --- logs ----------------------------------------------------------------------------------

LINE = re.compile(
    r'(?P<remote_addr>\S+) - (?P<remote_user>\S+) \[(?P<time_local>[^\]]+)\] "(?P<request>[^"]*)" '
    r'(?P<status>\d+|-) (?P<body_bytes_sent>\d+) "(?P<referer>[^"]*)" "(?P<agent>[^"]*)" '
    r'rt=(?P<request_time>[\d.]+) uct="(?P<uct>[^"]*)" uht="(?P<uht>[^"]*)" '
    r'urt="(?P<urt>[^"]*)"$')


def log_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_access_log_of_a_tunnel_and_of_a_plain_request(make_proxy, tmp_path, port, backend):
    json_log = tmp_path / "tunnels.jsonl"
    config = ops_config(tmp_path, port, backend.address, processes=1)
    config["server"][0]["location"].append(
        {"path": "/json/ws", "proxy_pass": "backend", "frames": False,
         "access_log": {"path": str(json_log), "format": "json", "open": True}})
    proxy = make_proxy(config, port=port)
    access = tmp_path / "access.log"
    code, _ = http_get("127.0.0.1", port, "/plain?x=1", {"User-Agent": 'a "q" \\ é'})
    assert code == 200
    with tunnel(port, extra="Referer: http://example.com/page\r\nUser-Agent: agent/1.0\r\n"
                "Authorization: Basic dXNlcjpwYXNz\r\n") as s:
        echo(s, b"x" * 1000)
        echo(s, b"y" * 10)
        s.shutdown(socket.SHUT_WR)      # the client closes first
        assert read_all(s) == b""
    wait_until(lambda: len(log_lines(access)) == 2)
    plain, ws = (LINE.match(line) for line in log_lines(access))
    assert plain and ws, log_lines(access)
    assert plain["remote_addr"] == "127.0.0.1" and plain["remote_user"] == "-"
    assert plain["request"] == "GET /plain?x=1 HTTP/1.1"
    assert plain["status"] == "200" and plain["body_bytes_sent"] == "2"
    assert plain["agent"] == r"a \x22q\x22 \x5C \xC3\xA9"       # escaped as nginx does
    assert plain["uct"] == plain["uht"] == plain["urt"] == "-"
    assert re.fullmatch(r"\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}", ws["time_local"])
    assert ws["remote_user"] == "user"
    assert ws["request"] == "GET /ws HTTP/1.1" and ws["status"] == "101"
    assert ws["referer"] == "http://example.com/page" and ws["agent"] == "agent/1.0"
    assert int(ws["body_bytes_sent"]) == 1010       # what the tunnel carried to the client
    rt, uct, uht, urt = (float(ws[k]) for k in ("request_time", "uct", "uht", "urt"))
    assert 0 <= uct <= uht <= urt <= rt

    # the JSON-lines format, and a line when the tunnel opens as well as when it closes
    with tunnel(port, "/json/ws") as s:
        wait_until(lambda: len(log_lines(json_log)) == 1)
        opened = json.loads(log_lines(json_log)[0])
        assert opened["tunnel"] == "open" and opened["status"] == "101"
        assert opened["upstream_response_time"] == "" and opened["tunnel_close"] == ""
        echo(s, b"z" * 5000)
    wait_until(lambda: len(log_lines(json_log)) == 2)
    closed = json.loads(log_lines(json_log)[1])
    assert closed["tunnel"] == "close" and closed["tunnel_close"] == "client"
    assert closed["request"] == "GET /json/ws HTTP/1.1"
    assert closed["upstream_addr"] == backend.address and closed["upstream_status"] == "101"
    head = int(closed["bytes_sent"]) - int(closed["body_bytes_sent"])
    assert head > 0 and int(closed["body_bytes_sent"]) == 5000
    assert closed["connection"] == opened["connection"] and closed["connection_requests"] == "1"
    assert closed["time_iso8601"].startswith(time.strftime("%Y-%m-%dT"))
    # status locations with access_log = false are not logged
    proxy.get("/nginx_status")
    assert body_of(proxy, "/last") == b"v1"
    wait_until(lambda: len(log_lines(access)) == 3)
    assert "/nginx_status" not in access.read_text()


def test_reopen_writes_to_a_new_file_after_logrotate(make_proxy, tmp_path, port, backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    access = tmp_path / "access.log"
    body_of(proxy, "/first")
    wait_until(lambda: len(log_lines(access)) == 1)
    access.rename(tmp_path / "access.log.1")
    (tmp_path / "error.log").rename(tmp_path / "error.log.1")
    subprocess.run([sys.executable, "-m", "fastws", "-c", str(proxy.path), "-s", "reopen"],
                   check=True, timeout=30)
    wait_until(lambda: access.exists())
    wait_until(lambda: "log files reopened" in "".join(log_lines(tmp_path / "error.log")))
    body_of(proxy, "/second")
    wait_until(lambda: len(log_lines(access)) == 1)
    assert "/second" in access.read_text()
    assert "/second" not in (tmp_path / "access.log.1").read_text()


# --- status ----------------------------------------------------------------------------------

def parse_stub_status(text: str) -> dict[str, int]:
    """As nginx-prometheus-exporter reads it: four lines, fixed words, numbers in place."""
    lines = text.split("\n")
    assert len(lines) == 5 and lines[4] == "", text
    m1 = re.fullmatch(r"Active connections: (\d+) ", lines[0])
    assert lines[1] == "server accepts handled requests"
    m2 = re.fullmatch(r" (\d+) (\d+) (\d+) ", lines[2])
    m3 = re.fullmatch(r"Reading: (\d+) Writing: (\d+) Waiting: (\d+) ", lines[3])
    assert m1 and m2 and m3, text
    return dict(zip(("active", "accepts", "handled", "requests", "reading", "writing",
                     "waiting"), map(int, m1.groups() + m2.groups() + m3.groups())))


def test_status_pages_sum_every_worker(make_proxy, tmp_path, port, backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    wait_until(lambda: len(proxy.workers()) == 2)
    for _ in range(30):
        body_of(proxy)
    tunnels = [tunnel(port) for _ in range(6)]
    for s in tunnels:
        echo(s, b"a" * 100)
    idle = socket.create_connection(("127.0.0.1", port))    # reading its head

    def stub_status() -> dict[str, int]:
        return parse_stub_status(body_of(proxy, "/nginx_status").decode())

    # the 6 tunnels, the idle connection and this request (nginx counts it as writing); the
    # previous status requests may still be closing, and each worker publishes its reading
    # count twice a second: hence the wait
    seen: list[dict[str, int]] = []
    try:
        wait_until(lambda: seen.append(stub_status()) or (seen[-1]["active"], seen[-1]["reading"])
                   == (8, 1))
    except AssertionError:
        raise AssertionError(seen[-3:])
    stub = seen[-1]
    assert stub["writing"] == 7 and stub["waiting"] == 0
    assert stub["accepts"] == stub["handled"] >= 38
    assert stub["requests"] >= 37

    data = proxy.status()
    assert data["tunnels"]["active"] == 6
    assert sum(w["tunnels"] for w in data["workers"]) == 6
    wait_until(lambda: proxy.status()["upstreams"]["backend"][0]["active"] == 6)
    [server] = proxy.status()["upstreams"]["backend"]
    assert server["server"] == backend.address and server["state"] == "up"
    assert server["tunnels"] == 6

    for s in tunnels:
        s.close()
    idle.close()
    wait_until(lambda: proxy.status()["tunnels"]["active"] == 0)
    wait_until(lambda: proxy.status()["upstreams"]["backend"][0]["bytes_down"] == 600)
    server = proxy.status()["upstreams"]["backend"][0]
    assert server["bytes_up"] == 600 and server["active"] == 0

    code, body = proxy.get("/metrics")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    value = {(s.name, tuple(sorted(s.labels.items()))): s.value
             for f in families.values() for s in f.samples}
    assert families["fastws_connections_accepted"].type == "counter"
    assert value[("fastws_tunnels_total", ())] == 6
    labels = (("server", backend.address), ("upstream", "backend"))
    assert value[("fastws_upstream_up", labels)] == 1
    assert value[("fastws_upstream_tunnels_total", labels)] == 6
    assert value[("fastws_upstream_bytes_total", (("direction", "down"),) + labels)] == 600
    assert value[("fastws_upstream_connect_failures_total", labels)] == 0
    assert value[("fastws_workers", ())] == 2


def test_a_server_that_refuses_is_counted_and_shown_down(make_proxy, tmp_path, port):
    # (nginx never marks the only server of a group down: two servers, then)
    dead = [f"127.0.0.1:{free_port()}" for _ in range(2)]
    config = ops_config(tmp_path, port, dead[0], processes=1)
    config["upstream"][0]["servers"] = dead
    proxy = make_proxy(config, port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request())
        assert read_head(s)[0].startswith(b"HTTP/1.1 502 ")
    servers = proxy.status()["upstreams"]["backend"]
    assert [(s["server"], s["fails"], s["state"]) for s in servers] == \
        [(dead[0], 1, "down"), (dead[1], 1, "down")]
    code, body = proxy.get("/metrics")
    for address in dead:
        assert f'fastws_upstream_up{{upstream="backend",server="{address}"}} 0\n' \
            in body.decode()
        assert f'fastws_upstream_connect_failures_total{{upstream="backend",' \
            f'server="{address}"}} 1\n' in body.decode()


# --- command line mistakes -------------------------------------------------------------------

def test_a_second_master_on_the_same_pid_file_refuses_to_start(make_proxy, tmp_path, port,
                                                              backend):
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    wait_until(lambda: (tmp_path / "fastws.pid").exists())
    r = fastws("-c", str(proxy.path))
    assert r.returncode == 1
    assert r.stderr == f"fastws: {tmp_path / 'fastws.pid'}: fastws is already running as " \
                       f"pid {proxy.pid}\n"
    assert (tmp_path / "fastws.pid").read_text() == f"{proxy.pid}\n"
    assert body_of(proxy) == b"v1"


def fastws(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fastws", *args], capture_output=True,
                          text=True, timeout=30)


def test_signal_without_a_running_master_is_a_clear_error(tmp_path, port, backend):
    path = tmp_path / "fastws.toml"
    config = ops_config(tmp_path, port, backend.address)
    path.write_text(to_toml(config))
    r = fastws("-c", str(path), "-s", "reload")
    assert r.returncode == 1
    assert r.stderr == f"fastws: {tmp_path / 'fastws.pid'}: no pid file (is fastws running?)\n"
    (tmp_path / "fastws.pid").write_text(f"{2 ** 22 + 1}\n")
    r = fastws("-c", str(path), "-s", "stop")
    assert r.returncode == 1 and "stale pid file" in r.stderr
    del config["pid"]
    path.write_text(to_toml(config))
    r = fastws("-c", str(path), "-s", "quit")
    assert r.returncode == 1 and r.stderr == f"fastws: {path}: pid: is not set, so there is " \
                                             "no master to signal\n"


@pytest.mark.parametrize("where", ["access_log", "error_log", "location"])
def test_a_log_path_that_cannot_be_opened_fails_the_check(tmp_path, port, backend, where):
    path = tmp_path / "fastws.toml"
    bad = str(tmp_path / "missing-dir" / "x.log")
    config = ops_config(tmp_path, port, backend.address)
    if where == "location":
        config["server"][0]["location"][0]["access_log"] = {"path": bad}
        key = "server[0].location['/ws'].access_log.path"
    else:
        config[where] = {"path": bad}
        key = f"{where}.path"
    path.write_text(to_toml(config))
    r = fastws("-t", "-c", str(path))
    assert r.returncode == 1
    assert r.stderr == f"fastws: {path}: {key}: cannot open {bad!r}: No such file or directory\n"


@pytest.mark.parametrize("change, message", [
    ({"access_log": {"path": "x.log", "format": "nope"}},
     "access_log.format: unknown format 'nope' (define it in [log_format])"),
    ({"log_format": {"bad": "$remote_addr $no_such_variable"}},
     "log_format.bad: unknown variable $no_such_variable"),
    ({"error_log": {"level": "loud"}},
     "error_log.level: unknown level 'loud' (debug, info, notice, warn, error or crit)"),
    ({"shutdown_timeout": "soon"}, "shutdown_timeout: 'soon' is not a duration"),
])
def test_log_and_process_config_mistakes_are_one_line(tmp_path, port, change, message):
    path = tmp_path / "fastws.toml"
    config = ops_config(tmp_path, port, "127.0.0.1:9")
    config.update(change)
    path.write_text(to_toml(config))
    r = fastws("-t", "-c", str(path))
    assert r.returncode == 1
    assert r.stderr.startswith(f"fastws: {path}: {message}") and r.stderr.count("\n") == 1


def test_out_of_descriptors_answers_503_and_recovers(tmp_path, port, backend):
    # ulimit -n 64 and 150 clients at once: the worker stops reading its listener instead of
    # spinning on EMFILE, tells the clients it cannot take 503 at once, logs once per burst,
    # warns at start-up, and accepts again when descriptors are free.
    config = ops_config(tmp_path, port, backend.address, processes=1, worker_connections=512)
    proxy = Proxy(tmp_path, config, port=port, nofile=64)
    try:
        clients = []
        for _ in range(150):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(s)
        answers = []
        for s in clients:
            head = s.recv(200)          # every client is answered, none left hanging
            answers.append(head.split(b" ")[1])
        assert set(answers) <= {b"200", b"503"} and b"503" in answers and b"200" in answers
        for s in clients:
            s.close()
        # accepting again (503s until the closes have freed descriptors)
        wait_until(lambda: http_get("127.0.0.1", port, "/") == (200, b"v1"))
        # (the engine's log lines reach the file in batches)
        wait_until(lambda: "accepting again: " in (tmp_path / "error.log").read_text())
        text = (tmp_path / "error.log").read_text()
        starved = text.count("accept() failed (24: Too many open files)")
        assert 1 <= starved <= 10, starved                    # a line per burst, not per try
        assert "accepting again: " in text
        assert "worker_connections (with their pipes) need" in text
        assert proxy.status()["connections"]["accepted"] >= 150
    finally:
        proxy.stop()


def test_the_proxys_own_answers_keep_the_connection(make_proxy, tmp_path, port, backend):
    # return and status pages are answered with keep-alive, and the connection then waits
    # keepalive_timeout for the next request (as after a proxied one), each answer once
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    paths = ["/", "/status", "/nginx_status", "/"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for path in paths:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            head, rest = read_head(s)
            assert head.startswith(b"HTTP/1.1 200") and b"Connection: keep-alive" in head, head
            length = int(re.search(rb"Content-Length: (\d+)", head).group(1))  # type: ignore
            while len(rest) < length:
                rest += s.recv(65536)
            assert len(rest) == length          # nothing but this answer
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        last = read_all(s)
    assert last.count(b"HTTP/1.1 ") == 1 and last.endswith(b"\r\n\r\nv1"), last
    assert proxy.status()["connections"]["accepted"] >= 1


@pytest.mark.parametrize("count, gap", [(2, 0.02), (10, 0.05)])
def test_reloads_in_quick_succession_converge(make_proxy, tmp_path, port, backend, count, gap):
    # a deploy script's burst of SIGHUPs: reloads that come while the last one hands its
    # tunnels over are coalesced, every tunnel ends in the newest generation, no old worker
    # stays, no byte is lost, and the status page counts them exactly
    proxy = make_proxy(ops_config(tmp_path, port, backend.address), port=port)
    wait_until(lambda: len(proxy.workers()) == 2)
    tunnels = [tunnel(port) for _ in range(12)]
    for i in range(count):
        os.kill(proxy.pid, signal.SIGHUP)
        time.sleep(gap)             # the burst's own spacing (what is tested), not a wait
    newest = 0

    def settled() -> bool:
        nonlocal newest
        for i, s in enumerate(tunnels):
            echo(s, b"round %d" % i)
        workers = proxy.status()["workers"]
        newest = max(w["generation"] for w in workers)
        return len(proxy.workers()) == 2 and all(w["generation"] == newest and
                                                 not w["retiring"] for w in workers)
    wait_until(settled)
    assert proxy.status()["tunnels"]["active"] == len(tunnels)
    text = (tmp_path / "error.log").read_text()
    assert "cannot take the tunnels" not in text and "handing a tunnel over failed" not in text
    assert "no status slot left" not in text
    for s in tunnels:
        s.close()


def test_access_rules_over_ipv4_and_ipv6(make_proxy, tmp_path, backend):
    port = free_port()
    config = {"server": [{"listen": [f"127.0.0.1:{port}", f"[::1]:{port}"],
                          "access": ["deny ::1", "allow 127.0.0.0/8", "deny all"],
                          "location": [{"path": "/", "return": [200, "in"]},
                                       {"path": "/v6", "return": [200, "v6"],
                                        "access": ["allow ::/0", "deny all"]}]}]}
    make_proxy(config, port=port)

    def get(host: str, path: str) -> int:
        raw = raw_exchange(host, port, f"GET {path} HTTP/1.1\r\nHost: x\r\n"
                           "Connection: close\r\n\r\n".encode())
        return int(raw.split(b" ")[1])
    assert get("127.0.0.1", "/") == 200
    assert get("::1", "/") == 403          # denied by the server's first rule
    assert get("::1", "/v6") == 200        # the location's own rules replace the server's
    assert get("127.0.0.1", "/v6") == 403


def test_websocket_origin_check(make_proxy, tmp_path, port, backend):
    # allowed origins (exact, or any name under a wildcard, same scheme and port), a missing
    # Origin refused where asked; a refused handshake gets 403 and never reaches the upstream
    config = ops_config(tmp_path, port, backend.address)
    config["server"][0]["location"][0].update(
        origins=["https://app.example.com", "https://*.example.org:8443"],
        origin_missing="deny")
    make_proxy(config, port=port)
    cases = [("https://app.example.com", 101), ("HTTPS://APP.EXAMPLE.COM", 101),
             ("https://a.b.example.org:8443", 101), ("https://example.org:8443", 403),
             ("http://app.example.com", 403), ("https://a.example.org", 403),
             ("https://evil.com/x.example.org:8443", 403), ("https://app.example.com.evil", 403),
             (None, 403)]
    seen = backend.connections
    for origin, status in cases:
        extra = f"Origin: {origin}\r\n" if origin else ""
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(upgrade_request(extra=extra))
            head, _ = read_head(s)
        assert head.split(b" ")[1] == str(status).encode(), (origin, head)
    assert backend.connections - seen == 3          # only the allowed ones reached it


def _silent_upstream(conn: socket.socket, backend: RawBackend) -> None:
    # a 101, then it reads and never answers (a server that only listens)
    from support import ws_upgrade_handler
    ws_upgrade_handler(conn, backend)
    while conn.recv(65536):
        pass


def test_idle_timeout_counts_both_ways_and_lifetime_ends_tunnels(make_proxy, tmp_path, port):
    backend = RawBackend(_silent_upstream)
    config = ops_config(tmp_path, port, backend.address, processes=1)
    config["server"][0]["location"][0].update(idle_timeout="1s", read_timeout="1h")
    config["server"][0]["location"].append(
        {"path": "/short", "proxy_pass": "backend", "max_tunnel_lifetime": "1s",
         "lifetime_spread": "500ms", "frames": False})
    proxy = make_proxy(config, port=port)
    # the client's bytes keep a tunnel alive although the upstream never answers
    # (nginx's proxy_read_timeout would count only the upstream's)
    s = tunnel(port)
    for _ in range(8):
        s.sendall(b"still here")
        time.sleep(0.3)                 # the client's pace (what is tested), not a wait
    s.sendall(b"last words")
    s.settimeout(10)
    assert s.recv(100) == b""           # then silence both ways closes it
    s.close()
    # a tunnel with traffic still ends at its lifetime
    t = tunnel(port, "/short")
    t.settimeout(0.2)
    ended = False
    for _ in range(50):
        try:
            t.sendall(b"talking")
            if t.recv(100) == b"":
                ended = True
                break
        except socket.timeout:
            continue
        except OSError:
            ended = True
            break
    assert ended
    t.close()
    wait_until(lambda: proxy.status()["engine"]["closes"]["lifetime"] == 1)
    assert proxy.status()["engine"]["closes"]["idle_timeout"] == 1
    backend.close()


def test_forwarded_headers_replace_believes_only_trusted_peers(make_proxy, tmp_path):
    from support import NamedBackend
    backend = NamedBackend("b")
    port = free_port()
    config = {"upstream": [{"name": "b", "servers": [backend.address]}],
              "server": [{"listen": [f"127.0.0.1:{port}"], "forwarded_headers": "replace",
                          "real_ip": {"from": ["127.0.0.0/24"], "header": "X-Forwarded-For"},
                          "location": [{"path": "/", "proxy_pass": "b"}]}]}
    make_proxy(config, port=port)

    def sent(source: str, extra: str) -> dict[str, str]:
        with socket.create_connection(("127.0.0.1", port), timeout=10,
                                      source_address=(source, 0)) as s:
            s.sendall(f"GET / HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode())
            assert read_all(s).startswith(b"HTTP/1.1 200")
        return {k.lower(): v for k, v in backend.take()[-1][1]}
    forged = "X-Forwarded-For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\n"
    head = sent("127.1.0.5", forged)          # not a trusted proxy: its claims are dropped
    assert head["x-forwarded-for"] == "127.1.0.5" and head["x-real-ip"] == "127.1.0.5"
    assert "forwarded" not in head
    head = sent("127.0.0.5", "X-Forwarded-For: 203.0.113.7\r\nForwarded: for=203.0.113.7\r\n")
    assert head["x-real-ip"] == "203.0.113.7"  # a trusted one names the client
    assert head["x-forwarded-for"] == "203.0.113.7, 203.0.113.7"
    assert head["forwarded"] == "for=203.0.113.7"
    backend.close()


def test_a_reload_onto_the_other_back_end_hands_the_tunnels_over(make_proxy, tmp_path, port,
                                                                  backend, engine):
    # The new workers run the other back end (`engine` changed in the file): a tunnel taken
    # out of an io_uring engine goes on in an epoll one, and the other way round.
    config = ops_config(tmp_path, port, backend.address, processes=1)
    proxy, old = one_worker(make_proxy, config, port)
    s = tunnel(port)
    echo(s, b"before the reload")
    other = "epoll" if engine == "io_uring" else "io_uring"
    config["engine"] = other
    reload_with(proxy, config)
    wait_until(lambda: not alive(old))
    echo(s, b"after it, on the other back end")
    s.close()
    log = (tmp_path / "error.log").read_text()
    assert f"engine: {engine} (" in log and f"engine: {other} (" in log
    assert "1 tunnels handed to the new workers" in log
