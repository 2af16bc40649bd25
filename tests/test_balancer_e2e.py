"""Stickiness and failover end to end: real WebSocket clients, fastws, real WebSocket backends.

Every backend says which port it is as soon as a client connects, so a test sees which server
its tunnel reached.  Clients bind 127.a.b.c source addresses, as ip_hash sees them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

import websockets.asyncio.client as websockets_client
import websockets.asyncio.server as websockets_server

from fastws.balancer import build_upstreams
from fastws.config import load
from support import to_toml, ws_frame, ws_read_frame
from balancer_support import Ctx, start

ROOT = Path(__file__).resolve().parent.parent


def sticky_id(address: str) -> str:
    # nginx's sticky cookie value: the MD5 of the server's address, in hex
    return hashlib.md5(address.encode()).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Backends:
    """WebSocket servers on 127.0.0.1 that send their own port, then echo."""

    def __init__(self, count: int) -> None:
        self.ports: list[int] = []
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(count, ready), daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def _run(self, count: int, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)

        async def handler(ws: Any) -> None:
            await ws.send(str(ws.local_address[1]))
            try:
                async for message in ws:
                    await ws.send(message)
            except Exception:
                pass

        async def main() -> None:
            servers = []
            for _ in range(count):
                server = await websockets_server.serve(handler, "127.0.0.1", 0)
                servers.append(server)
                self.ports.append(server.sockets[0].getsockname()[1])
            self.servers = servers
            ready.set()
            self.stop = asyncio.Event()
            await self.stop.wait()
            for server in servers:
                server.close()
                await server.wait_closed()

        self.loop.run_until_complete(main())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)


def _toml(upstream: dict[str, Any], port: int) -> str:
    return to_toml({
        "upstream": [upstream],
        "server": [{"listen": [f"127.0.0.1:{port}"],
                    "location": [{"path": "/ws", "proxy_pass": upstream["name"],
                                  "connect_timeout": "5s"}]}],
    })


class Fastws:
    def __init__(self, tmp: Path, upstream: dict[str, Any]) -> None:
        self.port = _free_port()
        self.path = tmp / "fastws.toml"
        self.path.write_text(_toml(upstream, self.port))
        env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, "-m", "fastws", "-c", str(self.path)],
                                     cwd=tmp, env=env, stdout=subprocess.DEVNULL,
                                     stderr=open(tmp / "fastws.log", "wb"))
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("fastws did not start: "
                                       + (tmp / "fastws.log").read_text(errors="replace")[-500:])
                time.sleep(0.05)     # a poll: the loop waits for the port

    def predict(self) -> Any:
        """The balancer the proxy runs, built from the same file, for predictions."""
        return build_upstreams(load(str(self.path)))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def backends() -> Iterator[Backends]:
    b = Backends(4)
    yield b
    b.close()


@pytest.fixture
def fastws(tmp_path: Path) -> Iterator[Any]:
    started: list[Fastws] = []

    def start(upstream: dict[str, Any]) -> Fastws:
        for attempt in range(3):  # the port picked may be taken by another process meanwhile
            try:
                proxy = Fastws(tmp_path, upstream)
            except RuntimeError as exc:
                if attempt == 2:
                    pytest.fail(str(exc))
                continue
            started.append(proxy)
            return proxy
        raise AssertionError("unreachable")

    yield start
    for proxy in started:
        proxy.stop()


async def _which_backend(port: int, path: str = "/ws", source: str = "127.0.0.1") -> int:
    async with websockets_client.connect(f"ws://127.0.0.1:{port}{path}",
                                         local_addr=(source, 0), open_timeout=10) as ws:
        backend = int(await ws.recv())
        await ws.send("ping")
        assert await ws.recv() == "ping"
        return backend


SOURCES = [f"127.{a}.{b}.{c}" for a, b, c in
           ((0, 1, 5), (0, 2, 9), (0, 3, 1), (1, 7, 3), (2, 0, 8), (3, 5, 5), (9, 9, 9),
            (10, 20, 30), (44, 1, 2), (100, 3, 4), (200, 8, 1), (250, 250, 250))]


def test_ip_hash_sticks_each_client_to_one_backend(backends: Backends, fastws: Any) -> None:
    servers = [f"127.0.0.1:{p}" for p in backends.ports]
    proxy = fastws({"name": "backend", "balance": "ip_hash", "servers": servers})
    predicted = proxy.predict()["backend"]

    async def run() -> dict[str, list[int]]:
        seen: dict[str, list[int]] = {}
        for _round in range(3):
            for source in SOURCES:
                seen.setdefault(source, []).append(await _which_backend(proxy.port, source=source))
        return seen

    seen = asyncio.run(run())
    for source, ports in seen.items():
        assert len(set(ports)) == 1, (source, ports)
        want = start(predicted, Ctx(source)).next().name
        assert f"127.0.0.1:{ports[0]}" == want, source
    assert len({ports[0] for ports in seen.values()}) >= 2


def test_consistent_hash_sticks_each_uri(backends: Backends, fastws: Any) -> None:
    servers = [f"127.0.0.1:{p}" for p in backends.ports]
    proxy = fastws({"name": "rooms", "balance": "hash", "hash_key": "$request_uri",
                    "consistent": True, "servers": servers})
    predicted = proxy.predict()["rooms"]
    paths = [f"/ws/room/{i}" for i in range(12)]

    async def run() -> dict[str, set[int]]:
        seen: dict[str, set[int]] = {}
        for _round in range(2):
            for i, path in enumerate(paths):
                seen.setdefault(path, set()).add(
                    await _which_backend(proxy.port, path, SOURCES[i % len(SOURCES)]))
        return seen

    seen = asyncio.run(run())
    for path, ports in seen.items():
        assert len(ports) == 1
        assert f"127.0.0.1:{ports.pop()}" == start(predicted, Ctx(request_uri=path)).next().name


def test_failover_past_a_refusing_server_and_backup(backends: Backends, fastws: Any) -> None:
    refuser = socket.socket()  # bound, never listening: connections are refused
    refuser.bind(("127.0.0.1", 0))
    dead = f"127.0.0.1:{refuser.getsockname()[1]}"
    try:
        proxy = fastws({"name": "backend", "balance": "ip_hash", "servers": [
            dead, f"127.0.0.1:{backends.ports[0]}",
            {"address": f"127.0.0.1:{backends.ports[1]}", "backup": True}]})

        async def run() -> list[int]:
            return [await _which_backend(proxy.port, source=s) for s in SOURCES]

        ports = asyncio.run(run())
        # Clients whose hash names the dead server fail over; nobody is left without a server.
        assert set(ports) == {backends.ports[0]}
    finally:
        refuser.close()


def test_all_servers_down_answers_502(fastws: Any) -> None:
    refusers = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        refusers.append(s)
    try:
        proxy = fastws({"name": "backend", "servers": [
            f"127.0.0.1:{s.getsockname()[1]}" for s in refusers]})

        async def run() -> int:
            try:
                await _which_backend(proxy.port)
            except Exception as exc:  # websockets.exceptions.InvalidStatus
                response = getattr(exc, "response", None)
                return getattr(response, "status_code", 0)
            return 101

        assert asyncio.run(run()) == 502
        # Both are marked down now: the next client gets 502 too, without a connect.
        assert asyncio.run(run()) == 502
    finally:
        for s in refusers:
            s.close()


def _get(port: int, path: str, cookie: str | None = None) -> tuple[str, str | None]:
    """GET through the proxy: (the backend that answered, the Set-Cookie sent, if any)."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Cookie": cookie} if cookie else {})
        r = conn.getresponse()
        return r.read().decode(), r.getheader("Set-Cookie")
    finally:
        conn.close()


def test_sticky_cookie_keeps_a_client_on_its_server(tmp_path: Path) -> None:
    from support import NamedBackend, Proxy, read_head, upgrade_request
    servers = [NamedBackend(f"b{i}") for i in range(3)]
    port = _free_port()
    config = {"upstream": [{"name": "g", "servers": [b.address for b in servers],
                            "sticky": {"cookie": "srv", "max_age": "1h", "path": "/",
                                       "httponly": True, "samesite": "lax"}}],
              "server": [{"listen": [f"127.0.0.1:{port}"],
                          "location": [{"path": "/", "proxy_pass": "g"}]}]}
    proxy = Proxy(tmp_path, config, port=port)
    try:
        # without the cookie: round robin, and each answer names its server in the cookie
        first = [_get(port, "/") for _ in range(3)]
        assert sorted(name for name, _ in first) == ["b0", "b1", "b2"]
        for name, cookie in first:
            address = servers[int(name[1])].address
            assert cookie == f"srv={sticky_id(address)}; Max-Age=3600; Path=/; HttpOnly; " \
                             "SameSite=Lax"
        # with it: always that server, and no new cookie
        value = first[1][1].split(";")[0]
        chosen = first[1][0]
        assert [_get(port, "/", f"a=1; {value}") for _ in range(6)] == [(chosen, None)] * 6
        # the upgrade that follows long-polling lands on the same server
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(upgrade_request(path="/socket.io/", extra=f"Cookie: {value}\r\n"))
            head, _ = read_head(s)
            assert head.startswith(b"HTTP/1.1 101") and b"Set-Cookie" not in head
            s.sendall(ws_frame(b"echo"))
            assert ws_read_frame(s)[:2] == (1, b"echo")
        assert servers[int(chosen[1])].heads[-1][0].startswith("GET /socket.io/")
        # a WebSocket client without the cookie gets it with its 101, then relays as usual
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(upgrade_request(path="/ws") + ws_frame(b"early"))
            head, rest = read_head(s)
            assert head.startswith(b"HTTP/1.1 101") and head.endswith(b"\r\n\r\n")
            cookies = [line for line in head.split(b"\r\n") if line.startswith(b"Set-Cookie")]
            assert len(cookies) == 1 and cookies[0].startswith(b"Set-Cookie: srv=")
            assert ws_read_frame(s, rest)[:2] == (1, b"early")
        # a cookie naming no server (or garbage) is balanced and replaced
        name, cookie = _get(port, "/", "srv=" + "0" * 32)
        assert cookie is not None and cookie.startswith(f"srv={sticky_id(servers[int(name[1])].address)}")
    finally:
        proxy.stop()
        for b in servers:
            b.close()


def test_sticky_cookie_moves_off_a_server_that_is_down(tmp_path: Path) -> None:
    from support import NamedBackend, Proxy
    live = NamedBackend("live")
    dead_port = _free_port()                 # nothing listens there: connects are refused
    dead = f"127.0.0.1:{dead_port}"
    port = _free_port()
    config = {"upstream": [{"name": "g", "servers": [dead, live.address],
                            "sticky": {"cookie": "srv"}}],
              "server": [{"listen": [f"127.0.0.1:{port}"],
                          "location": [{"path": "/", "proxy_pass": "g"}]}]}
    proxy = Proxy(tmp_path, config, port=port)
    try:
        name, cookie = _get(port, "/", f"srv={sticky_id(dead)}")
        assert name == "live" and cookie == f"srv={sticky_id(live.address)}"
    finally:
        proxy.stop()
        live.close()
