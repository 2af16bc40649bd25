"""End to end: real WebSocket clients, fastws as a child process, real backends."""

from __future__ import annotations

import asyncio
import os
import socket
import time

import pytest
from websockets.asyncio.client import connect as aconnect
from websockets.sync.client import connect

from conftest import ws_config
from support import (RawBackend, accept_queue, raw_echo_handler, read_all, read_head,
                     upgrade_request, wait_until, ws_accept, ws_frame, ws_key,
                     ws_upgrade_handler)


def test_messages_arrive_intact(make_proxy, echo_backend, port, relay):
    proxy = make_proxy(ws_config(port, echo_backend.address, relay=relay), port=port)
    big = os.urandom(16 << 20)
    with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, compression=None) as ws:
        ws.send("hello, fastws")
        assert ws.recv() == "hello, fastws"
        ws.send(b"\x00\x01\xfe\xff" * 100)
        assert ws.recv() == b"\x00\x01\xfe\xff" * 100
        ws.send(["frag", "mented ", "message"])      # one message in three frames
        assert ws.recv() == "fragmented message"
        ws.send(big)
        assert ws.recv() == big
        ws.send(b"")
        assert ws.recv() == b""
    engine = proxy.status()["engine"]
    assert engine["tunnels_total"] == 1
    if relay == "splice":
        assert engine["bytes_spliced"] >= 2 * len(big)
        assert engine["bytes_copied"] == 0
    elif relay == "copy":
        assert engine["bytes_spliced"] == 0
        assert engine["bytes_copied"] >= 2 * len(big)
    else:
        # auto: the 16 MB message is a bulk flow and goes to splice, the small ones are copied
        assert engine["bytes_spliced"] > len(big)
        assert engine["bytes_copied"] > 0
        assert engine["switches_to_splice"] >= 1


def test_backend_receives_the_rewritten_head(make_proxy, port):
    backend = RawBackend(ws_upgrade_handler)
    make_proxy(ws_config(port, backend.address), port=port)
    key = ws_key()
    request = (
        "GET /ws/chat?room=1 HTTP/1.1\r\n"
        "Host: example.com:8080\r\n"
        "User-Agent: test-agent\r\n"
        "Upgrade: websocket\r\n"
        "Connection: keep-alive, Upgrade, X-Hop\r\n"
        "X-Hop: private\r\n"
        "Keep-Alive: 300\r\n"
        "Proxy-Connection: keep-alive\r\n"
        "TE: trailers\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: chat, superchat\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        "Origin: http://example.com\r\n"
        "Cookie: a=1;  b=2\r\n"
        "X-Forwarded-For: 10.1.2.3\r\n"
        "X-Real-IP: 6.6.6.6\r\n"
        "X-Forwarded-Proto: https\r\n"
        "x-custom:   spaced value\r\n"
        "\r\n").encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(request)
        head, _ = read_head(s)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert ws_accept(key) in head
    expected = (
        "GET /ws/chat?room=1 HTTP/1.1\r\n"
        "Host: example.com:8080\r\n"
        "User-Agent: test-agent\r\n"
        f"Sec-WebSocket-Key: {key.decode()}\r\n"
        "Sec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: chat, superchat\r\n"
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        "Origin: http://example.com\r\n"
        "Cookie: a=1;  b=2\r\n"
        "x-custom: spaced value\r\n"
        "X-Real-IP: 127.0.0.1\r\n"
        "X-Forwarded-For: 10.1.2.3, 127.0.0.1\r\n"
        "X-Forwarded-Proto: http\r\n"
        "Upgrade: websocket\r\n"
        "Connection: upgrade\r\n"
        "\r\n").encode()
    assert backend.heads == [expected]
    backend.close()


def test_set_headers_override_add_and_remove(make_proxy, port):
    backend = RawBackend(ws_upgrade_handler)
    make_proxy(ws_config(port, backend.address, set_headers={
        "Host": "$host", "X-Real-IP": "", "X-Client": "$remote_addr:$http_user_agent",
        "X-Forwarded-For": "$proxy_add_x_forwarded_for", "X-Arg": "$arg_room/$cookie_sid"}),
        port=port)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(upgrade_request("/ws?room=7", host="Example.COM:8080",
                                  extra="User-Agent: ua\r\nCookie: sid=abc\r\n"))
        head, _ = read_head(s)
        assert head.startswith(b"HTTP/1.1 101 ")
    lines = backend.heads[0].split(b"\r\n")
    assert lines[1] == b"Host: example.com"
    assert b"X-Client: 127.0.0.1:ua" in lines
    assert b"X-Arg: 7/abc" in lines
    assert b"X-Forwarded-For: 127.0.0.1" in lines
    assert not any(line.lower().startswith(b"x-real-ip") for line in lines)
    backend.close()


def test_early_bytes_both_ways_are_delivered_first(make_proxy, port, relay):
    def handler(conn, backend):
        got = ws_upgrade_handler(conn, backend)
        conn.sendall(b"server-first|")
        early = len(b"client-early|")
        while len(got) < early:
            got += conn.recv(early - len(got))
        backend.received.append(got)
        raw_echo_loop(conn)

    backend = RawBackend(handler)
    make_proxy(ws_config(port, backend.address, frames=False, relay=relay), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request() + b"client-early|")   # frames sent before the 101
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 101 ")
        while len(rest) < len(b"server-first|"):
            rest += s.recv(100)
        assert rest == b"server-first|"
        s.sendall(b"ping")
        assert s.recv(100) == b"ping"
    assert backend.received == [b"client-early|"]
    backend.close()


def raw_echo_loop(conn: socket.socket) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            return
        conn.sendall(data)


def test_non_101_answer_is_relayed_and_never_tunnelled(make_proxy, port):
    def handler(conn, backend):
        head, _ = read_head(conn)
        backend.heads.append(head)
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 6\r\nConnection: keep-alive\r\n"
                     b"X-Why: nope\r\n\r\ndenied")
        conn.settimeout(3)
        try:
            backend.received.append(conn.recv(65536))   # anything smuggled would land here
        except OSError:
            pass

    backend = RawBackend(handler)
    make_proxy(ws_config(port, backend.address), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request())
        head, body = read_head(s)
        assert head.startswith(b"HTTP/1.1 403 Forbidden\r\n")
        assert b"X-Why: nope\r\n" in head
        assert b"Connection: close\r\n" in head
        assert b"keep-alive" not in head
        try:
            s.sendall(b"GET /internal/admin HTTP/1.1\r\nHost: x\r\n\r\n")
        except OSError:
            pass
        body += read_all(s)
        assert body == b"denied"
    wait_until(lambda: backend.received)
    assert all(b"/internal/admin" not in r for r in backend.received)
    backend.close()


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
], ids=["forged-accept", "other-token", "no-upgrade-header"])
def test_forged_101_is_refused(make_proxy, port, answer):
    def handler(conn, backend):
        head, _ = read_head(conn)
        backend.heads.append(head)
        conn.sendall(answer)
        conn.settimeout(3)
        try:
            backend.received.append(conn.recv(65536))
        except OSError:
            pass

    backend = RawBackend(handler)
    proxy = make_proxy(ws_config(port, backend.address), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request())
        head, _ = read_head(s)
        assert head.startswith(b"HTTP/1.1 502 ")
        try:
            s.sendall(b"smuggled bytes")
        except OSError:
            pass
        read_all(s)
    wait_until(lambda: backend.received)
    assert all(b"smuggled" not in r for r in backend.received)
    assert proxy.status()["tunnels"]["total"] == 0
    backend.close()


def test_h2c_upgrade_is_passed_as_a_plain_request(make_proxy, port):
    def handler(conn, backend):
        head, _ = read_head(conn)
        backend.heads.append(head)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    backend = RawBackend(handler)
    make_proxy(ws_config(port, backend.address), port=port)
    raw = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n" \
          b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(raw)
        answer, body = read_head(s)     # the connection is kept alive: read just the answer
        while len(body) < 2:
            body += s.recv(10)
    assert answer.startswith(b"HTTP/1.1 200 OK") and body == b"ok"
    head = backend.heads[0].lower()
    assert b"upgrade" not in head.replace(b"connection: close", b"")
    assert b"http2-settings" not in head
    assert b"connection: close\r\n" in head
    backend.close()


def test_half_close_propagates(make_proxy, port, relay):
    def handler(conn, backend):
        ws_upgrade_handler(conn, backend)
        got = b""
        while True:
            data = conn.recv(65536)
            if not data:
                break
            got += data
        backend.received.append(got)
        conn.sendall(b"reply after your EOF")
        conn.shutdown(socket.SHUT_WR)

    backend = RawBackend(handler)
    make_proxy(ws_config(port, backend.address, frames=False, relay=relay), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request())
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 101 ")
        s.sendall(b"last words")
        s.shutdown(socket.SHUT_WR)
        assert rest + read_all(s) == b"reply after your EOF"
    assert backend.received == [b"last words"]
    backend.close()


@pytest.mark.parametrize("frames, pipe_size", [(False, "4k"), (True, "64k")])
def test_a_pipe_full_of_small_segments_loses_no_byte_and_no_eof(make_proxy, port, frames,
                                                                 pipe_size):
    # A pipe holds so many buffers, not bytes: with small pipes (4 KiB: one buffer; 64 KiB,
    # the least a tunnel that follows its frames splices through: 16) and small segments, a
    # splice often moves fewer bytes than asked for while the socket holds more.  Every
    # byte, then the client's EOF, must still go on (a short splice is not an empty socket,
    # nor the end of the stream).
    def handler(conn, backend):
        ws_upgrade_handler(conn, backend)
        got = bytearray()
        while data := conn.recv(65536):
            got += data
        backend.received.append(bytes(got))
        conn.sendall(b"bye")
        conn.shutdown(socket.SHUT_WR)

    backend = RawBackend(handler)
    config = ws_config(port, backend.address, relay="splice", frames=frames,
                       frame_checks=False)
    config["pipe_size"] = pipe_size
    make_proxy(config, port=port)
    # whole frames, so that a tunnel following them sees a valid stream
    payload = b"".join(ws_frame(os.urandom(n), opcode=2) for n in (70_000, 5, 300_000, 126))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(upgrade_request())
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 101 ")
        for i in range(0, len(payload), 1000):
            s.sendall(payload[i:i + 1000])
        s.shutdown(socket.SHUT_WR)
        assert rest + read_all(s) == b"bye"
    assert backend.received == [payload]
    backend.close()


def test_read_timeout_closes_a_silent_tunnel_but_not_a_busy_one(make_proxy, port):
    backend = RawBackend(raw_echo_handler)
    proxy = make_proxy(ws_config(port, backend.address, frames=False, read_timeout="700ms"), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as busy, \
            socket.create_connection(("127.0.0.1", port), timeout=10) as idle:
        for s in (busy, idle):
            s.sendall(upgrade_request())
            assert read_head(s)[0].startswith(b"HTTP/1.1 101 ")
        started = time.monotonic()
        # the busy tunnel's upstream answers every 200 ms: it outlives the idle one
        while time.monotonic() - started < 2.0:
            busy.sendall(b"tick")
            assert busy.recv(100) == b"tick"
            time.sleep(0.2)             # the busy client's pace (what is tested), not a wait
        assert read_all(idle) == b""       # closed by the proxy
        busy.sendall(b"still here")
        assert busy.recv(100) == b"still here"
    assert proxy.status()["engine"]["read_timeouts"] == 1
    backend.close()


def test_send_timeout_closes_a_tunnel_whose_client_does_not_read(make_proxy, port):
    def flood(conn, backend):
        ws_upgrade_handler(conn, backend)
        chunk = b"x" * 65536
        conn.settimeout(20)
        try:
            while True:
                conn.sendall(chunk)
        except OSError:
            backend.received.append(b"closed")

    backend = RawBackend(flood)
    proxy = make_proxy(ws_config(port, backend.address, frames=False, send_timeout="500ms"), port=port)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.sendall(upgrade_request())
    wait_until(lambda: backend.received, timeout=15)
    assert proxy.status()["engine"]["send_timeouts"] == 1
    s.close()
    backend.close()


def test_upstream_refused_is_502(make_proxy, port):
    from support import free_port
    dead = free_port()
    make_proxy(ws_config(port, f"127.0.0.1:{dead}"), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request())
        assert read_all(s).startswith(b"HTTP/1.1 502 Bad Gateway\r\n")


def test_connect_timeout_is_504(make_proxy, port):
    # A listener whose accept queue is full drops new SYNs: connect() hangs until the timeout.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(blackhole.getsockname())
        fillers.append(f)
    # listen(0): one connection waiting to be accepted is a full queue
    wait_until(lambda: accept_queue(blackhole.getsockname()[1]) >= 1)
    addr = f"127.0.0.1:{blackhole.getsockname()[1]}"
    make_proxy(ws_config(port, addr, connect_timeout="400ms"), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request())
        assert read_all(s).startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")
    for f in fillers:
        f.close()
    blackhole.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /ws HTTP/1.1\r\nHost: a\r\nBad Header Line\r\n\r\n", 400),
    (b"GET /ws HTTP/1.1\nHost: a\n\n", 400),
    (b"GET /ws HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400),
    (b"POST /ws HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
     400),
    (upgrade_request(extra="Sec-WebSocket-Version: 8\r\n").replace(
        b"Sec-WebSocket-Version: 13\r\n", b""), 426),
    (upgrade_request(key=b"c2hvcnQ="), 400),
    (b"GET /nothing-here HTTP/1.1\r\nHost: a\r\n\r\n", 404),
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET /ws HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"b" * 40000 + b"\r\n\r\n", 431),
], ids=["bad-header", "bare-lf", "two-hosts", "no-host", "cl-and-te", "ws-version-8",
        "short-key", "no-location", "long-line", "big-head"])
def test_bad_requests_get_a_clear_status(make_proxy, port, request_bytes, status):
    backend = RawBackend(raw_echo_handler)
    config = ws_config(port, backend.address, frames=False)
    config["server"][0]["location"][0]["path"] = "/ws"
    make_proxy(config, port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request_bytes)
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:200]
    if status == 426:
        assert b"Sec-WebSocket-Version: 13\r\n" in answer
    # ... and the proxy keeps serving
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request() + b"still serving")
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 101 ")
        while len(rest) < len(b"still serving"):
            rest += s.recv(100)
        assert rest == b"still serving"
    backend.close()


def test_200_concurrent_tunnels(make_proxy, echo_backend, port):
    proxy = make_proxy(ws_config(port, echo_backend.address), port=port)

    async def one(i: int) -> int:
        async with aconnect(f"ws://127.0.0.1:{port}/ws", open_timeout=20,
                            compression=None) as ws:
            for j in range(10):
                msg = f"{i}:{j}:" + "z" * (i * 7 % 300)
                await ws.send(msg)
                assert await ws.recv() == msg
        return i

    async def run() -> list[int]:
        return await asyncio.gather(*(one(i) for i in range(200)))

    assert sorted(asyncio.run(run())) == list(range(200))
    wait_until(lambda: proxy.status()["tunnels"]["active"] == 0)
    assert proxy.status()["tunnels"]["total"] == 200


def test_no_fd_left_behind_after_1000_tunnels(make_proxy, port):
    backend = RawBackend(raw_echo_handler)
    proxy = make_proxy(ws_config(port, backend.address, frames=False), port=port)
    proxy.status()
    wait_until(lambda: proxy.connections() == 0)    # the status request's, closed
    before = proxy.fds()
    for batch in range(20):
        socks = []
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(upgrade_request() + b"hi")
            socks.append(s)
        for i, s in enumerate(socks):
            head, rest = read_head(s)
            assert head.startswith(b"HTTP/1.1 101 ")
            if not rest:
                rest = s.recv(10)
            assert rest == b"hi"
            if i % 2:
                s.shutdown(socket.SHUT_WR)   # half the tunnels close cleanly, half abruptly
                read_all(s)
            else:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
    wait_until(lambda: proxy.status()["tunnels"]["active"] == 0)
    assert proxy.status()["tunnels"]["total"] == 1000
    wait_until(lambda: proxy.fds() <= before, timeout=5)
    assert proxy.fds() == before
    backend.close()


def test_ipv6_and_ipv4_listeners_and_several_locations(make_proxy, echo_backend, port):
    backend = RawBackend(raw_echo_handler)
    config = {
        "upstream": [{"name": "chat", "servers": [echo_backend.address]},
                     {"name": "notify", "servers": [backend.address]}],
        "server": [{
            "listen": [f"127.0.0.1:{port}", f"[::1]:{port}"],
            "location": [{"path": "/chat/ws", "proxy_pass": "chat"},
                         {"path": "/notification/ws", "proxy_pass": "notify"},
                         {"path": "= /status", "status": "json"}],
        }],
    }
    make_proxy(config, port=port)
    for host in ("127.0.0.1", "[::1]"):
        with connect(f"ws://{host}:{port}/chat/ws") as ws:
            ws.send("to chat")
            assert ws.recv() == "to chat"
    with socket.create_connection(("::1", port), timeout=10) as s:
        s.sendall(upgrade_request("/notification/ws"))
        assert read_head(s)[0].startswith(b"HTTP/1.1 101 ")
    assert len(backend.heads) == 1 and b"GET /notification/ws " in backend.heads[0]
    assert any(("X-Real-IP", "::1") in r for r in echo_backend.requests)
    backend.close()


def test_server_name_routing(make_proxy, port):
    config = {
        "server": [
            {"listen": [f"127.0.0.1:{port}"], "server_name": ["example.com"],
             "location": [{"path": "/", "return": [200, "exact"]}]},
            {"listen": [f"127.0.0.1:{port}"], "server_name": ["*.example.org"],
             "location": [{"path": "/", "return": [200, "wildcard"]}]},
            {"listen": [f"127.0.0.1:{port}"], "server_name": ["fallback"], "default": True,
             "location": [{"path": "/", "return": [200, "default"]},
                          {"path": "/a/b", "return": [200, "longest"]},
                          {"path": "= /a", "return": [200, "exact-location"]}]},
        ],
    }
    proxy = make_proxy(config, port=port)
    for host, path, body in [("example.com", "/", b"exact"), ("EXAMPLE.com:80", "/", b"exact"),
                             ("a.b.example.org", "/", b"wildcard"), ("other", "/", b"default"),
                             ("other", "/a/b/c", b"longest"), ("other", "/a", b"exact-location"),
                             ("other", "/a/", b"default")]:
        raw = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(raw)
            answer = read_all(s)
        assert answer.endswith(b"\r\n\r\n" + body), (host, path, answer)
    assert proxy.proc.poll() is None


def test_next_upstream_after_a_server_fails_before_its_101(make_proxy, echo_backend, port):
    def hang_up(conn, backend):
        head, _ = read_head(conn)
        backend.heads.append(head)          # takes the request, then closes without answering

    broken = RawBackend(hang_up)
    config = ws_config(port, broken.address)
    config["upstream"][0]["servers"] = [broken.address, echo_backend.address]
    make_proxy(config, port=port)
    for _ in range(4):
        with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=10) as ws:
            ws.send("through the second server")
            assert ws.recv() == "through the second server"
    # the failed server was tried once, then marked down (max_fails 1) for fail_timeout
    assert len(broken.heads) == 1
    broken.close()


@pytest.mark.parametrize("answer", [
    # valid 101s in other spellings: case, spacing, more tokens and headers
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade"
    b"\r\nSec-WebSocket-Accept:    {accept}   \r\nX-Extra: 1\r\n\r\n",
    b"HTTP/1.1 101 OK\r\nupgrade: websocket\r\nconnection: upgrade\r\n"
    b"sec-websocket-accept: {accept}\r\n\r\n",
], ids=["spaced-mixed-case", "lower-case"])
def test_valid_101_variants_are_tunnelled(make_proxy, port, answer):
    def handler(conn, backend):
        head, _ = read_head(conn)
        backend.heads.append(head)
        key = [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
               if line.lower().startswith(b"sec-websocket-key:")][0]
        conn.sendall(answer.replace(b"{accept}", ws_accept(key)) + b"first")
        raw_echo_loop(conn)

    backend = RawBackend(handler)
    make_proxy(ws_config(port, backend.address, frames=False), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(upgrade_request())
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 101 ")
        while len(rest) < 5:
            rest += s.recv(100)
        assert rest == b"first"
        s.sendall(b"echo me")
        assert s.recv(100) == b"echo me"
    backend.close()
