"""The engine in this process: heads, the WebSocket handshake both ways, the head sent upstream,
tunnels and what they hold, with real sockets and the engine driven as a worker drives it."""

from __future__ import annotations

import os
import socket
import threading
from typing import Any, Iterator

import pytest

from fastws import balancer, config

from engine_support import EngineRunner, tunnel_config
from support import (RawBackend, raw_echo_handler, read_all, read_head,
                     upgrade_request, wait_until, ws_accept, ws_upgrade_handler)

RFC_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


@pytest.fixture
def echo() -> Iterator[RawBackend]:
    backend = RawBackend(raw_echo_handler)
    yield backend
    backend.close()


@pytest.fixture
def runner_for(engine: str):
    made: list[EngineRunner] = []

    def make(upstream: str, *, server: dict | None = None, **location) -> EngineRunner:
        cfg = tunnel_config(upstream, **location)
        cfg["server"][0].update(server or {})
        r = EngineRunner(cfg, pipe_size=65536, max_pipes=64, engine=engine)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()          # and checks that the engine holds nothing any more


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def open_tunnel(port: int, key: bytes | None = None, early: bytes = b"") -> tuple[socket.socket, bytes]:
    s = connect(port)
    s.sendall(upgrade_request(key=key) + early)
    head, rest = read_head(s)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return s, rest


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(1 << 20)
        assert chunk, "closed early"
        out += chunk
    return bytes(out)


# --- the handshake -----------------------------------------------------------------------------

def test_rfc6455_example_key_and_accept(runner_for):
    # RFC 6455 section 1.3: the key "dGhlIHNhbXBsZSBub25jZQ==" gives this accept value
    def handler(conn, backend):
        read_head(conn)
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
                     b"\r\n\r\n")
        conn.recv(10)

    backend = RawBackend(handler)
    r = runner_for(backend.address)
    s, _ = open_tunnel(r.port, key=RFC_KEY)
    s.close()
    backend.close()


def test_a_head_sent_byte_by_byte_keeps_its_early_bytes(runner_for, echo):
    r = runner_for(echo.address)
    data = upgrade_request(key=RFC_KEY) + b"\x81\x85early-frame"
    with connect(r.port) as s:
        for i in range(len(data)):
            s.send(data[i:i + 1])
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 101 ")
        rest += recv_exactly(s, len(b"\x81\x85early-frame") - len(rest))
        assert rest == b"\x81\x85early-frame"     # echoed: it went after the 101, not before
    wait_until(lambda: echo.heads)
    assert echo.heads[0].startswith(b"GET /ws HTTP/1.1\r\n") and b"early" not in echo.heads[0]


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),           # obsolete line folding
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),                      # not an RFC 3986 host
    (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: \xc3\xa9.example\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n", 400),
    (b"GET /" + b"x" * 300 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\nX-Long: " + b"y" * 1100 + b"\r\n\r\n", 431),
])
def test_heads_that_could_be_read_two_ways_are_refused(runner_for, echo, raw, status):
    r = runner_for(echo.address, server={"max_request_line": "256", "max_request_head": "1k"})
    with connect(r.port) as s:
        s.sendall(raw)
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
    assert not echo.heads                       # nothing reached the upstream


@pytest.mark.parametrize("change, status", [
    (lambda h: h.replace(b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 8"), 426),
    (lambda h: h.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n"),
     400),                                                  # two keys
    (lambda h: h.replace(b"\r\n\r\n", b"\r\nContent-Length: 5\r\n\r\n12345"), 400),
    (lambda h: h.replace(b"GET", b"POST", 1), 400),
    (lambda h: h.replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400),
    (lambda h: h.replace(b"Sec-WebSocket-Key: ", b"Sec-WebSocket-Key: A"), 400),   # not 16 bytes
])
def test_bad_websocket_handshakes(runner_for, echo, change, status):
    r = runner_for(echo.address)
    with connect(r.port) as s:
        s.sendall(change(upgrade_request()))
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:80]
    if status == 426:
        assert b"\r\nSec-WebSocket-Version: 13\r\n" in answer
    assert not echo.heads


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",          # another key's
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: {accept}\r\n\r\n",                                # another token
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket, h2c\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: {accept}\r\n\r\n",                                # two tokens
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: {accept}\r\nSec-WebSocket-Accept: {accept}\r\n\r\n",  # two accepts
], ids=["accept", "token", "tokens", "accepts"])
def test_a_101_is_tunnelled_only_when_it_completes_the_handshake(runner_for, answer):
    key = b"AAAAAAAAAAAAAAAAAAAAAA=="

    def handler(conn, backend):
        read_head(conn)
        conn.sendall(answer.replace(b"{accept}", ws_accept(key)))
        conn.settimeout(2)
        try:
            backend.received.append(conn.recv(100))
        except OSError:
            pass

    backend = RawBackend(handler)
    r = runner_for(backend.address)
    with connect(r.port) as s:
        s.sendall(upgrade_request(key=key))
        head, _ = read_head(s)
        assert head.startswith(b"HTTP/1.1 502 ")
    assert r.stats()["tunnels_total"] == 0
    backend.close()


def test_the_head_sent_upstream(runner_for):
    backend = RawBackend(ws_upgrade_handler)
    r = runner_for(backend.address)
    extra = ("Connection: keep-alive, X-Private\r\nX-Private: 1\r\nKeep-Alive: 300\r\n"
             "TE: trailers\r\nProxy-Connection: close\r\nTrailer: X\r\nX-Kept: k  v\r\n"
             "Cookie: c=1\r\nX-Forwarded-For: 10.0.0.1\r\nX-Real-IP: 6.6.6.6\r\n")
    raw = upgrade_request(extra=extra).replace(b"Connection: Upgrade\r\n", b"")
    raw = raw.replace(b"Connection: keep-alive, X-Private", b"Connection: keep-alive, X-Private, Upgrade")
    with connect(r.port) as s:
        s.sendall(raw)
        assert read_head(s)[0].startswith(b"HTTP/1.1 101 ")
    wait_until(lambda: backend.heads)
    lines = backend.heads[0].split(b"\r\n")
    assert lines[0] == b"GET /ws HTTP/1.1" and lines[1] == b"Host: example.com"
    names = [line.split(b":")[0].lower() for line in lines[1:] if line]
    for gone in (b"x-private", b"keep-alive", b"te", b"proxy-connection", b"trailer"):
        assert gone not in names
    assert b"X-Kept: k  v" in lines and b"Cookie: c=1" in lines
    # the client's X-Forwarded-For is extended, its X-Real-IP replaced
    assert b"X-Forwarded-For: 10.0.0.1, 127.0.0.1" in lines and b"X-Real-IP: 127.0.0.1" in lines
    assert lines[-4:-2] == [b"Upgrade: websocket", b"Connection: upgrade"]
    backend.close()


# --- tunnels -------------------------------------------------------------------------------

def pump(src: socket.socket, dst: socket.socket, data: bytes) -> bytes:
    """Write data into src from a thread while reading len(data) bytes from dst."""
    writer = threading.Thread(target=src.sendall, args=(data,))
    writer.start()
    got = recv_exactly(dst, len(data))
    writer.join()
    return got


@pytest.mark.parametrize("size", [1, 4095, 4096, 65535, 65536, 65537, 16 * 1448, 8 << 20])
def test_sizes_both_ways(runner_for, echo, relay, size):
    r = runner_for(echo.address, relay=relay)
    s, _ = open_tunnel(r.port)
    data = os.urandom(size)
    assert pump(s, s, data) == data
    s.close()


def test_idle_tunnels_hold_no_pipe_and_no_buffer(runner_for, echo, relay):
    r = runner_for(echo.address, relay=relay)
    tunnels = [open_tunnel(r.port)[0] for _ in range(20)]
    for s in tunnels:
        assert pump(s, s, os.urandom(300000)) is not None
    stats = r.stats()
    assert stats["held"]["pipes"] == 0 and stats["held"]["buffers"] == 0
    assert stats["held"]["tunnels"] == 20 and stats["held"]["requests"] == 0
    for s in tunnels:
        s.close()
    wait_until(lambda: r.stats()["held"]["connections"] == 0)


def test_backpressure_holds_at_most_a_read_and_loses_nothing(runner_for, echo, relay):
    r = runner_for(echo.address, relay=relay)
    s, _ = open_tunnel(r.port)
    data = os.urandom(16 << 20)
    writer = threading.Thread(target=s.sendall, args=(data,))
    writer.start()
    # nobody reads: the bytes pile up in the sockets, the engine holds one read's worth
    wait_until(lambda: r.stats()["held"]["buffers"] + r.stats()["held"]["pipes"] >= 1)
    assert recv_exactly(s, len(data)) == data
    writer.join()
    s.close()


def test_stop_closes_every_tunnel(runner_for, echo):
    r = runner_for(echo.address)
    tunnels = [open_tunnel(r.port)[0] for _ in range(5)]
    r.call(r.engine.stop)
    for s in tunnels:
        assert read_all(s) == b""
    assert r.engine.stats()["closes"]["shutdown"] == 5


def _anon_fds() -> list[str]:
    kinds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("anon_inode:") or target.startswith("pipe:"):
            kinds.append(target.split("[")[0] if target.startswith("pipe:") else target)
    return sorted(kinds)


def test_a_stopped_engine_keeps_no_descriptor(echo, engine):
    # Its epoll set or ring, timerfd, eventfd and pipe pool are closed by stop() itself, not later by
    # the garbage collector (the engine and its control plane refer to each other).
    import gc
    cfg = tunnel_config(echo.address, relay="splice")
    before = _anon_fds()
    gc.disable()
    try:
        r = EngineRunner(cfg, engine=engine)
        s, _ = open_tunnel(r.port)
        s.sendall(b"x" * 100_000)
        assert recv_exactly(s, 100_000) == b"x" * 100_000
        assert r.stats()["pipes_created"] >= 1
        assert len(_anon_fds()) > len(before)
        r.close()
        s.close()
        assert _anon_fds() == before
    finally:
        gc.enable()


@pytest.mark.parametrize("token", [b"websocket", b"x-test"])
def test_an_upstream_that_closes_first(runner_for, token):
    # A WebSocket server closes the TCP connection once the closing handshake is over (RFC
    # 6455 7.1.1): the tunnel ends with it.  Another upgraded protocol keeps its half-close.
    def handler(conn, backend):
        head, _ = read_head(conn)
        key = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:")][0]
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + token +
                     b"\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + ws_accept(key) +
                     b"\r\n\r\nbye")
        conn.shutdown(socket.SHUT_WR)
        backend.received.append(read_all(conn))

    backend = RawBackend(handler)
    r = runner_for(backend.address, upgrade_tokens=["websocket", "x-test"])
    with connect(r.port) as s:
        s.sendall(upgrade_request().replace(b"Upgrade: websocket", b"Upgrade: " + token))
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert rest + read_all(s) == b"bye"
        try:
            s.sendall(b"late")
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        wait_until(lambda: backend.received)
    assert backend.received == [b"" if token == b"websocket" else b"late"]
    wait_until(lambda: r.stats()["tunnels_active"] == 0)
    assert r.stats()["closes"]["upstream"] == 1
    backend.close()


def test_a_refused_handshake_frees_its_attempt_once(engine):
    # nginx's get/free pair: an attempt that fails after its connect (an answer that is not a
    # 101, an upstream that closes before answering) is freed once, as failed or not; the
    # server's count of live connections stays that of its tunnels.
    def handler(conn, backend):
        head, _ = read_head(conn)
        if head.startswith(b"GET /ok "):
            raw_echo_handler_after_head(conn, head)
        elif head.startswith(b"GET /refuse "):
            conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
            conn.close()
        else:
            conn.close()                        # no answer at all

    backend = RawBackend(handler)
    cfg = tunnel_config(backend.address)
    cfg["upstream"][0]["servers"] = [{"address": backend.address, "max_fails": 0}]
    cfg["upstream"][0]["balance"] = "least_conn"
    r = EngineRunner(cfg, engine=engine)
    (peer,) = r.groups["backend"].peers
    tunnels = [open_tunnel_to(r.port, "/ok") for _ in range(2)]
    wait_until(lambda: peer.conns == 2)
    for path, status in (("/refuse", b"403"), ("/silent", b"502"), ("/refuse", b"403")):
        with connect(r.port) as s:
            s.sendall(upgrade_request(path=path))
            head, _ = read_head(s)
            assert head.split(b" ")[1] == status, head
            read_all(s)                         # the client connection closes after it
    wait_until(lambda: r.stats()["conns"] == 2)
    assert peer.conns == 2
    for s in tunnels:
        s.close()
    wait_until(lambda: peer.conns == 0)
    assert r.stats()["tunnels_active"] == 0
    r.close()
    backend.close()


def raw_echo_handler_after_head(conn: socket.socket, head: bytes) -> None:
    key = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
           if line.lower().startswith(b"sec-websocket-key:")][0]
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + ws_accept(key) + b"\r\n\r\n")
    while data := conn.recv(65536):
        conn.sendall(data)


def open_tunnel_to(port: int, path: str) -> socket.socket:
    s = connect(port)
    s.sendall(upgrade_request(path=path))
    head, _ = read_head(s)
    assert head.startswith(b"HTTP/1.1 101 "), head
    return s


def test_a_custom_balancer_reads_the_request_through_the_engine(echo, engine):
    other = RawBackend(raw_echo_handler)
    cfg = tunnel_config(echo.address)
    cfg["upstream"][0].update(servers=[echo.address, other.address],
                              balancer="engine_support:HeaderBalancer")
    r = EngineRunner(cfg, engine=engine)
    for index, backend in ((1, other), (0, echo), (1, other)):
        with connect(r.port) as s:
            s.sendall(upgrade_request(extra=f"X-Server: {index}\r\n"))
            assert read_head(s)[0].startswith(b"HTTP/1.1 101 ")
    wait_until(lambda: len(echo.heads) == 1 and len(other.heads) == 2)
    group = r.groups["backend"]
    wait_until(lambda: group.custom.events.count(("released", other.address)) == 2)
    assert ("connected", echo.address) in group.custom.events
    r.close()
    other.close()


def test_a_graceful_stop_never_resets_a_kept_alive_client(runner_for):
    # close_idle (a worker retiring) with a request already in the socket: it is answered,
    # with Connection: close; without one: an end of stream, then what the client sends is
    # read and dropped, so a request crossing the close meets an EOF it can retry on
    # (RFC 9112 9.3.1), not a reset
    from http_support import HttpBackend
    backend = HttpBackend()
    r = runner_for(backend.address, websocket=False)
    req = b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n"
    crossing, quiet = connect(r.port), connect(r.port)
    for s in (crossing, quiet):
        s.sendall(req)
        head, _ = read_head(s)
        assert head.startswith(b"HTTP/1.1 200") and b"keep-alive" in head.lower()
    wait_until(lambda: r.call(lambda: r.engine.stats()["states"]["idle"]) == 2)

    def stop_with_a_request_in_flight() -> None:
        crossing.sendall(req)           # in the socket, not yet seen by the engine
        r.engine.close_idle()
    r.call(stop_with_a_request_in_flight)
    answer = read_all(crossing)
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer.lower()
    quiet.sendall(req)                  # after the FIN: read and dropped, no reset
    assert read_all(quiet) == b""
    crossing.close()
    quiet.close()
    backend.close()


def test_a_group_replaced_in_place_keeps_its_connections(engine):
    # Engine.replace_group (a `resolve` name's change): an address that stays keeps its live
    # connections' count, a tunnel to one that left goes on (drain_timeout 0) out of the
    # rotation, an idle kept-alive connection to it is closed, and every count ends at 0.
    ended: list[int] = []                         # ports whose kept-alive connection closed

    def handler(conn, backend):
        head, _ = read_head(conn)
        if not head.startswith(b"GET /plain "):
            raw_echo_handler_after_head(conn, head)
            return
        while head:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            head, _ = read_head(conn)
        ended.append(backend.port)

    a, b, c = (RawBackend(handler) for _ in range(3))
    cfg = tunnel_config(a.address)
    cfg["upstream"][0].update(servers=[a.address, b.address], keepalive=4)
    cfg["server"][0]["location"].insert(0, {"path": "/plain", "proxy_pass": "backend"})
    r = EngineRunner(cfg, engine=engine)
    old = r.groups["backend"]
    tunnels = [open_tunnel_to(r.port, "/ok") for _ in range(2)]     # one to each
    wait_until(lambda: [p.conns for p in old.peers] == [1, 1])
    for _ in range(2):                                              # one idle to each
        with connect(r.port) as s:
            s.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_head(s)[0].startswith(b"HTTP/1.1 200")
    wait_until(lambda: r.call(r.engine.pools)["backend"]["idle"] == 2)

    def replace_with(*servers: str) -> tuple[Any, int]:
        up = config.from_dict({**cfg, "upstream": [{**cfg["upstream"][0],
                                                    "servers": list(servers)}]}).upstreams[0]
        group = balancer.build_upstream(r.config.source, up)
        return group, r.call(lambda: r.engine.replace_group(group))

    new, departing = replace_with(a.address, c.address)
    assert departing == 1 and new.departed == (b.address,)
    assert [(p.name, p.conns) for p in new.peers] == [(a.address, 1), (c.address, 0)]
    wait_until(lambda: ended == [b.port])                           # its idle connection
    assert r.call(r.engine.pools)["backend"]["idle"] == 1
    for s in tunnels:                                               # both still relay
        s.sendall(b"ping")
        assert recv_exactly(s, 4) == b"ping"
    tunnels += [open_tunnel_to(r.port, "/ok") for _ in range(4)]    # never to b any more
    wait_until(lambda: [p.conns for p in new.peers] == [3, 2])
    for s in tunnels:
        s.close()
    wait_until(lambda: [p.conns for p in new.peers] == [0, 0])
    again, departing = replace_with(a.address, c.address)
    assert departing == 0 and again.departed == ()                  # b's last use ended
    assert r.stats()["tunnels_active"] == 0
    r.close()
    for backend in (a, b, c):
        backend.close()


def test_a_replaced_custom_balancer_hears_only_of_its_own_attempts(echo, engine):
    # A DNS change builds the custom balancer again: the new one is not told of the end of a
    # connection the old one chose (it never heard of it), and is told of its own.
    cfg = tunnel_config(echo.address)
    cfg["upstream"][0].update(balancer="engine_support:HeaderBalancer")
    r = EngineRunner(cfg, engine=engine)
    old = r.groups["backend"]
    before = open_tunnel_to(r.port, "/ok")
    wait_until(lambda: old.custom.events == [("connected", echo.address)])
    new = balancer.build_upstream(r.config.source, r.config.upstreams[0])
    assert r.call(lambda: r.engine.replace_group(new)) == 0
    assert new.peers[0].conns == 1
    before.close()
    wait_until(lambda: new.peers[0].conns == 0)
    after = open_tunnel_to(r.port, "/ok")
    after.close()
    wait_until(lambda: new.custom.events == [("connected", echo.address),
                                             ("released", echo.address)])
    assert old.custom.events == [("connected", echo.address)]
    r.close()


def test_a_handshake_under_way_to_a_server_that_left_is_drained(engine):
    # the server left between the request and its 101: the tunnel that results closes after
    # the group's drain_timeout, as those that were open at the change
    gate = threading.Event()

    def handler(conn, backend):
        head, _ = read_head(conn)
        gate.wait(10)
        raw_echo_handler_after_head(conn, head)

    slow, other = RawBackend(handler), RawBackend(raw_echo_handler)
    cfg = tunnel_config(slow.address)
    cfg["upstream"][0]["drain_timeout"] = "0.2s"
    r = EngineRunner(cfg, engine=engine)
    s = connect(r.port)
    s.sendall(upgrade_request())
    wait_until(lambda: slow.connections == 1)
    up = config.from_dict({**cfg, "upstream": [{**cfg["upstream"][0],
                                                "servers": [other.address]}]}).upstreams[0]
    new = balancer.build_upstream(r.config.source, up)
    assert r.call(lambda: r.engine.replace_group(new)) == 0          # not a tunnel yet
    gate.set()
    assert read_head(s)[0].startswith(b"HTTP/1.1 101 ")
    assert read_all(s) == b""                                         # closed by the drain
    wait_until(lambda: r.stats()["closes"]["removed"] == 1)
    s.close()
    r.close()
    slow.close()
    other.close()
