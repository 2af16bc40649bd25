"""Plain HTTP/1.1 through fastws: keep-alive both sides, bodies streamed both ways, limits,
errors and request smuggling, with a real client (http.client), raw sockets for what no client
library would send, and a real keep-alive backend."""

from __future__ import annotations

import hashlib
import http.client
import socket

import pytest

from http_support import HttpBackend, http_config, rss_kb
from support import free_port, read_all, read_head, upgrade_request, wait_until


@pytest.fixture(scope="module")
def backend():
    b = HttpBackend()
    yield b
    b.close()


def client(port: int, timeout: float = 10.0) -> http.client.HTTPConnection:
    return http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)


def read_response(s: socket.socket, buf: bytes = b"") -> tuple[bytes, bytes, bytes]:
    """Read one Content-Length-framed response from a raw socket: (head, body, bytes after)."""
    while b"\r\n\r\n" not in buf:
        data = s.recv(65536)
        if not data:
            raise ConnectionError(f"closed after {buf!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        data = s.recv(65536)
        if not data:
            raise ConnectionError("closed in the body")
        rest += data
    return head + b"\r\n\r\n", rest[:length], rest[length:]


def upstream_count(backend: HttpBackend) -> int:
    with backend.lock:
        return backend.connections


# --- keep-alive -----------------------------------------------------------------------------

def test_keepalive_reuses_client_and_upstream_connections(make_proxy, backend, port):
    proxy = make_proxy(http_config(port, backend.address, keepalive=4), port=port)
    before = upstream_count(backend)
    conn = client(port)
    sock = None
    for i in range(50):
        conn.request("GET", f"/small?{i}")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"hello"
        assert resp.getheader("Connection") == "keep-alive"
        sock = sock or conn.sock
        assert conn.sock is sock           # never reconnected: the proxy kept it open
    status = proxy.status()
    assert status["connections"]["waiting"] == 1          # ours, kept alive between requests
    assert status["keepalive_pools"]["backend"] == {"idle": 1, "opened": 1, "reused": 49}
    conn.close()
    assert upstream_count(backend) - before == 1
    head = backend.requests[-1].raw.lower()
    assert b"connection:" not in head      # the recipe's keepalive setup: Connection ""
    assert backend.requests[-1].target == b"/small?49"


def test_upstream_keepalive_requests_limit(make_proxy, backend, port):
    # Upstream connections retired after 3 requests; their fd numbers come back for new client
    # and upstream sockets, which must each be watched afresh.
    make_proxy(http_config(port, backend.address, keepalive=2,
                           upstream_extra={"keepalive_requests": 3}), port=port)
    before = upstream_count(backend)
    for _ in range(15):
        conn = client(port, timeout=5)
        for _ in range(2):
            conn.request("GET", "/small")
            assert conn.getresponse().read() == b"hello"
        conn.close()
    assert upstream_count(backend) - before == 10


def test_without_upstream_keepalive_each_request_has_its_own_connection(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address), port=port)
    before = upstream_count(backend)
    conn = client(port)
    for _ in range(5):
        conn.request("GET", "/small")
        assert conn.getresponse().read() == b"hello"
    conn.close()
    assert upstream_count(backend) - before == 5
    assert b"Connection: close\r\n" in backend.requests[-1].raw


def test_pipelined_requests_are_answered_in_order(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address, keepalive=2), port=port)
    reqs = (b"GET /small?1 HTTP/1.1\r\nHost: a\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nsecond"
            b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nthird\r\n0\r\n\r\n"
            b"GET /chunked HTTP/1.1\r\nHost: a\r\n\r\n"
            b"GET /small?5 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(reqs)
        answer = read_all(s)
    bodies = [b"hello", b"second", b"third"]
    rest = answer
    for body in bodies:
        head, _, rest = rest.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
        assert rest.startswith(body)
        rest = rest[len(body):]
    head, _, rest = rest.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    chunked, sep, rest = rest.partition(b"0\r\n\r\n")
    assert chunked == b"5\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n"
    assert rest.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in rest
    assert rest.endswith(b"hello")


def test_a_burst_of_pipelined_requests_larger_than_a_head(make_proxy, backend, port):
    # 3000 requests (100 KB) sent while the first answer is awaited: a head's worth is read
    # ahead, the rest waits in the socket until the proxy reads on
    make_proxy(http_config(port, backend.address, keepalive=2, keepalive_requests=5000),
               port=port)
    n = 3000
    burst = b"".join(b"GET /small?%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(n))
    assert len(burst) > 65536 + 32768
    seen = len(backend.requests)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"GET /slow?0.3 HTTP/1.1\r\nHost: a\r\n\r\n")
        # the burst goes once the first request is at the backend, its answer not yet come
        wait_until(lambda: [r.target for r in backend.requests[seen:]] == [b"/slow?0.3"])
        s.sendall(burst + b"GET /small HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n")
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == n + 2
    assert answer.count(b"Connection: close") == 1 and answer.endswith(b"close\r\n\r\nhello")
    targets = [r.target for r in backend.requests[-(n + 2):]]
    assert targets == [b"/slow?0.3"] + [b"/small?%d" % i for i in range(n)] + [b"/small"]


def test_keepalive_requests_and_timeout(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address, keepalive_requests=3,
                           keepalive_timeout="400ms"), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for i in range(3):
            s.sendall(b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
            head, body, _ = read_response(s)
            assert (b"Connection: close" in head) == (i == 2)
        assert s.recv(10) == b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
        read_response(s)
        # closed by the proxy once idle for 400ms (the default would keep it for 75s, past
        # the socket's 10s timeout)
        assert s.recv(10) == b""


def test_http10_client(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /small HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        head, body, _ = read_response(s)
        assert b"Connection: keep-alive" in head and body == b"hello"
        s.sendall(b"GET /chunked HTTP/1.0\r\n\r\n")
        answer = read_all(s)
    assert b"Transfer-Encoding" not in answer and b"Connection: close" in answer
    assert answer.endswith(b"\r\n\r\nhello world")


def test_upgrade_on_a_kept_alive_connection(make_proxy, port):
    from support import RawBackend, ws_accept

    def handler(conn, backend):
        buf = b""
        while True:
            head, buf = read_head_buf(conn, buf)
            if not head:
                return
            if b"Upgrade: websocket" in head:
                key = [l.split(b":", 1)[1].strip() for l in head.split(b"\r\n")
                       if l.lower().startswith(b"sec-websocket-key")][0]
                conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + ws_accept(key)
                             + b"\r\n\r\n" + buf)
                while data := conn.recv(65536):
                    conn.sendall(data)
                return
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    backend = RawBackend(handler)
    make_proxy(http_config(port, backend.address, keepalive=2), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /page HTTP/1.1\r\nHost: a\r\n\r\n")
        head, body, _ = read_response(s)
        assert body == b"ok"
        s.sendall(upgrade_request("/ws"))
        head, rest = read_head(s)
        assert head.startswith(b"HTTP/1.1 101 ")
        s.sendall(b"frames")
        while len(rest) < 6:
            rest += s.recv(100)
        assert rest == b"frames"
    backend.close()


def read_head_buf(conn: socket.socket, buf: bytes) -> tuple[bytes, bytes]:
    while b"\r\n\r\n" not in buf:
        data = conn.recv(65536)
        if not data:
            return b"", b""
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n", rest


# --- bodies ---------------------------------------------------------------------------------

def test_request_bodies_content_length_and_chunked(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address, keepalive=2), port=port)
    conn = client(port)
    body = bytes(range(256)) * 1000
    conn.request("POST", "/echo", body=body)
    assert conn.getresponse().read() == body
    conn.request("POST", "/echo", body=iter([b"abc", b"", b"defg" * 10000]),
                 encode_chunked=True, headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().read() == b"abc" + b"defg" * 10000
    conn.request("PUT", "/echo", body=b"")
    assert conn.getresponse().read() == b""
    conn.close()
    # extensions are dropped and trailers are not passed on: the upstream sees clean chunks
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"3;name=\"va;lue\"\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n")
        head, body, _ = read_response(s)
    assert body == b"abc" and b"X-Trailer-Seen" not in head


def test_response_framings(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address, keepalive=2), port=port)
    conn = client(port)
    conn.request("GET", "/chunked")
    resp = conn.getresponse()
    assert resp.getheader("Transfer-Encoding") == "chunked" and resp.read() == b"hello world"
    assert resp.getheader("X-Checksum") is None          # trailers are dropped
    conn.request("HEAD", "/bytes/1000")
    resp = conn.getresponse()
    assert resp.getheader("Content-Length") == "1000" and resp.read() == b""
    for path, status in (("/204", 204), ("/304", 304)):
        conn.request("GET", path)
        resp = conn.getresponse()
        assert resp.status == status and resp.read() == b""
        assert resp.getheader("X-No-Body") == "yes"
    conn.request("GET", "/early-hints")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"final"
    conn.request("GET", "/http10")
    assert conn.getresponse().read() == b"old"
    conn.request("GET", "/small")
    assert conn.getresponse().read() == b"hello"
    conn.request("GET", "/close")
    resp = conn.getresponse()
    assert resp.getheader("Connection") == "close" and resp.read() == b"until the end"
    conn.close()


def test_expect_100_continue(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address, client_max_body_size="1k"), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"body")
        head, body, _ = read_response(s)
        assert head.startswith(b"HTTP/1.1 200 ") and body == b"body"
    assert b"expect" not in backend.requests[-1].raw.lower()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        # over the limit: refused at once, no 100 Continue
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 413 ")


def test_client_max_body_size(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address, client_max_body_size="10k"), port=port)
    conn = client(port)
    conn.request("POST", "/echo", body=b"x" * 10240)
    assert conn.getresponse().status == 200
    conn.close()
    for body in (b"x" * 10241,):
        conn = client(port)
        conn.request("POST", "/echo", body=body)
        assert conn.getresponse().status == 413
        conn.close()
    conn = client(port)
    conn.request("POST", "/echo", body=iter([b"x" * 8000, b"y" * 8000]), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().status == 413
    conn.close()


def test_100_mb_both_ways_with_bounded_memory(make_proxy, backend, port):
    proxy = make_proxy(http_config(port, backend.address, keepalive=2,
                                   client_max_body_size=0), port=port)
    size = 100 << 20
    conn = client(port, timeout=60)
    conn.request("GET", "/small")
    conn.getresponse().read()
    base = rss_kb(proxy.pid)
    block = bytes(range(256)) * 4096            # 1 MiB
    digest = hashlib.sha256()
    for _ in range(100):
        digest.update(block)
    conn.request("POST", "/sink", body=(block for _ in range(100)),
                 headers={"Content-Length": str(size)})
    assert conn.getresponse().read() == f"{size} {digest.hexdigest()}".encode()
    conn.request("POST", "/sink", body=(block for _ in range(100)), encode_chunked=True,
                 headers={"Transfer-Encoding": "chunked"})
    assert conn.getresponse().read() == f"{size} {digest.hexdigest()}".encode()
    conn.request("GET", f"/bytes/{size}")
    resp = conn.getresponse()
    got = 0
    expect = hashlib.sha256()
    pattern = b"0123456789abcdef" * 65536
    for _ in range(100):
        expect.update(pattern)
    digest = hashlib.sha256()
    while True:
        piece = resp.read(1 << 20)
        if not piece:
            break
        got += len(piece)
        digest.update(piece)
    assert got == size and digest.digest() == expect.digest()
    conn.close()
    peak = rss_kb(proxy.pid, "VmHWM")
    # 300 MB went through; the proxy held no more than a few buffers of it at a time
    assert peak - base < 40 * 1024, (base, peak)


# --- limits and errors ----------------------------------------------------------------------

@pytest.mark.parametrize("request_bytes, status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"b" * 40000 + b"\r\n\r\n", 431),
], ids=["long-line", "big-head"])
def test_head_limits(make_proxy, backend, port, request_bytes, status):
    make_proxy(http_config(port, backend.address), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request_bytes)
        assert read_all(s).startswith(b"HTTP/1.1 %d " % status)


def test_client_header_and_body_timeouts(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address, client_body_timeout="400ms",
                           server={"client_header_timeout": "400ms"}), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
        assert read_all(s).startswith(b"HTTP/1.1 408 ")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
        assert read_all(s).startswith(b"HTTP/1.1 408 ")
    # the header timer also runs for the next request on a kept-alive connection
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /small HTTP/1.1\r\nHost: a\r\n\r\nGET / HTTP/1.1\r\n")
        head, body, rest = read_response(s)
        assert body == b"hello"
        assert (rest + read_all(s)).startswith(b"HTTP/1.1 408 ")


def test_upstream_refused_and_timeout(make_proxy, backend, port):
    dead = free_port()
    make_proxy(http_config(port, f"127.0.0.1:{dead}"), port=port)
    conn = client(port)
    conn.request("GET", "/")
    assert conn.getresponse().status == 502
    conn.close()


def test_upstream_read_timeout_is_504(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address, read_timeout="300ms"), port=port)
    conn = client(port)
    conn.request("GET", "/slow?1.5")
    assert conn.getresponse().status == 504
    conn.close()
    conn = client(port)
    conn.request("GET", "/slow?0.05")
    assert conn.getresponse().read() == b"slow"
    conn.close()


@pytest.mark.parametrize("path", ["/cut-length", "/cut-chunked", "/bad-chunked"])
def test_upstream_dying_mid_response_is_seen_as_truncated(make_proxy, backend, port, path):
    make_proxy(http_config(port, backend.address, keepalive=2), port=port)
    conn = client(port)
    conn.request("GET", path)
    resp = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()


def test_stale_pooled_connection_is_retried_once_for_idempotent_requests(make_proxy, backend,
                                                                          port):
    make_proxy(http_config(port, backend.address, keepalive=1), port=port)
    conn = client(port)
    before = upstream_count(backend)
    conn.request("GET", "/drop-second")
    assert conn.getresponse().read() == b"first"
    # the pooled connection dies when it is given the next request: retried on a fresh one
    conn.request("GET", "/drop-second")
    assert conn.getresponse().read() == b"first"
    assert upstream_count(backend) - before == 2
    # not for a POST: it may have had an effect
    conn.request("POST", "/drop-second", body=b"x")
    assert conn.getresponse().status == 502
    conn.close()


# --- headers --------------------------------------------------------------------------------

def test_headers_both_ways(make_proxy, backend, port):
    make_proxy(http_config(port, backend.address, keepalive=2), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /headers HTTP/1.1\r\nHost: Example.com:8080\r\n"
                  b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: 300\r\nTE: trailers\r\n"
                  b"Proxy-Connection: keep-alive\r\nUpgrade: h2c\r\nX-Forwarded-For: 10.0.0.1\r\n"
                  b"X-Keep: yes\r\n\r\n")
        head, body, _ = read_response(s)
    sent = backend.requests[-1].raw
    assert sent.startswith(b"GET /headers HTTP/1.1\r\nHost: example.com\r\n")
    for gone in (b"x-hop", b"keep-alive", b"te:", b"proxy-connection", b"upgrade", b"connection"):
        assert gone not in sent.lower()
    assert b"X-Keep: yes\r\n" in sent and b"X-Real-IP: 127.0.0.1\r\n" in sent
    assert b"X-Forwarded-For: 10.0.0.1, 127.0.0.1\r\n" in sent
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 200 OK"
    assert lines[1:8] == [b"Server: backend/1.0", b"Date: Mon, 01 Jan 2024 00:00:00 GMT",
                          b"X-Z: last", b"Set-Cookie: a=1", b"X-A: first", b"Set-Cookie: b=2",
                          b"Content-Length: 2"]
    assert b"X-Private" not in head and b"Keep-Alive" not in head
    assert lines[8] == b"Connection: keep-alive"


# --- smuggling ------------------------------------------------------------------------------

SMUGGLING = {
    "cl-and-te": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
    "te-and-cl": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Length: 4\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
    "two-cl": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\n"
              b"abcdGET /admin HTTP/1.1\r\nHost: a\r\n\r\n",
    "cl-list": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 4, 40\r\n\r\nabcd",
    "cl-sign": b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: +4\r\n\r\nabcd",
    "te-twice": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
                b"Transfer-Encoding: identity\r\n\r\n0\r\n\r\n",
    "te-list": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n"
               b"0\r\n\r\n",
    "te-gzip": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n",
    "te-space-colon": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n"
                      b"0\r\n\r\n",
    "te-http10": b"POST /echo HTTP/1.0\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "chunk-size-hex-prefix": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"0x4\r\nabcd\r\n0\r\n\r\n",
    "chunk-size-negative": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"-4\r\nabcd\r\n0\r\n\r\n",
    "chunk-size-space": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b" 4\r\nabcd\r\n0\r\n\r\n",
    "chunk-size-overflow": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"10000000000000004\r\nabcd\r\n0\r\n\r\n",
    "chunk-bare-lf": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"4\nabcd\r\n0\r\n\r\n",
    "chunk-no-crlf-after-data": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked"
                                b"\r\n\r\n4\r\nabcdX\r\n0\r\n\r\n",
    "chunk-ext-bare-cr": b"POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"4;a=b\rc\r\nabcd\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n",
    "bare-lf-in-head": b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
    "bare-lf-request-line": b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\x00c\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
}


@pytest.fixture(scope="module")
def smuggling_proxy(tmp_path_factory):
    from support import Proxy
    b = HttpBackend()
    port = free_port()
    proxy = Proxy(tmp_path_factory.mktemp("smuggling"), http_config(port, b.address, keepalive=2),
                  port=port)
    yield proxy, b
    proxy.stop()
    b.close()


@pytest.mark.parametrize("name", list(SMUGGLING))
def test_smuggling_attempts_are_refused_with_400(smuggling_proxy, name):
    proxy, b = smuggling_proxy
    before = len(b.requests)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(SMUGGLING[name])
        answer = read_all(s)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:100]
    assert b"Connection: close" in answer
    assert answer.count(b"HTTP/1.1") == 1
    assert all(b"/admin" not in r.target for r in b.requests[before:])
    # ... and the proxy goes on serving
    conn = client(proxy.port)
    conn.request("POST", "/echo", body=b"fine")
    assert conn.getresponse().read() == b"fine"
    conn.close()


@pytest.mark.parametrize("request_bytes, status", [
    (b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nExpect: 200-ok\r\n\r\nx", 417),
    (b"GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
], ids=["expect-other", "absolute-form"])
def test_unsupported_requests(smuggling_proxy, request_bytes, status):
    proxy, _ = smuggling_proxy
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as s:
        s.sendall(request_bytes)
        assert read_all(s).startswith(b"HTTP/1.1 %d " % status)


def test_graceful_stop_closes_idle_kept_alive_connections(make_proxy, backend, port):
    import signal
    proxy = make_proxy(http_config(port, backend.address, keepalive=2), port=port)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /small HTTP/1.1\r\nHost: a\r\n\r\n")
        read_response(s)
        proxy.proc.send_signal(signal.SIGQUIT)
        assert s.recv(10) == b""             # closed by the proxy, not after keepalive_timeout
    assert proxy.proc.wait(10) == 0


def test_no_fd_left_behind(make_proxy, backend, port):
    proxy = make_proxy(http_config(port, backend.address, keepalive=4), port=port)
    proxy.status()
    wait_until(lambda: proxy.connections() == 0)    # the status request's, closed
    before = proxy.fds()
    for i in range(100):
        conn = client(port)
        for path in ("/small", "/chunked", "/close", "/cut-length", "/204"):
            try:
                conn.request("GET", path)
                conn.getresponse().read()
            except http.client.HTTPException:
                conn.close()
        conn.close()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(SMUGGLING["two-cl"] if i % 2 else b"POST /echo HTTP/1.1\r\nHost: a\r\n"
                      b"Content-Length: 10\r\n\r\nabc")       # the second one is cut short
    wait_until(lambda: proxy.fds() <= before + 4)   # at most the pool's idle upstream connections
    assert proxy.status()["keepalive_pools"]["backend"]["idle"] <= 4


def test_client_leaving_mid_transfer_frees_everything(make_proxy, backend, port):
    proxy = make_proxy(http_config(port, backend.address, keepalive=4, client_max_body_size=0),
                       port=port)
    proxy.status()
    wait_until(lambda: proxy.connections() == 0)    # the status request's, closed
    before = proxy.fds()
    pipes_before = proxy.status()["engine"]["pipes_total"]
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.sendall(b"GET /bytes/104857600 HTTP/1.1\r\nHost: a\r\n\r\n")
            got = 0
            while got < 1 << 20:
                got += len(s.recv(65536))
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /sink HTTP/1.1\r\nHost: a\r\nContent-Length: 104857600\r\n\r\n")
            s.sendall(b"x" * (1 << 20))
    # the upstream connections of cut transfers are closed, never pooled half-way; what may
    # remain is the relay's pipes, kept in its pool (two descriptors each) for the next ones
    def settled() -> bool:
        pipes = proxy.status()["engine"]["pipes_total"] - pipes_before
        return proxy.fds() == before + 2 * pipes
    wait_until(settled)
    conn = client(port)
    conn.request("GET", "/small")
    assert conn.getresponse().read() == b"hello"


def test_config_errors_are_one_line(tmp_path):
    import subprocess
    import sys
    from support import to_toml
    for key, value, problem in (("client_max_body_size", "1x", "is not a size"),
                                ("keepalive_timeout", "soon", "is not a duration"),
                                ("client_body_timeout", "0s", "greater than zero")):
        config = http_config(8080, "127.0.0.1:9", **{key: value})
        path = tmp_path / "bad.toml"
        path.write_text(to_toml(config))
        out = subprocess.run([sys.executable, "-m", "fastws", "-t", "-c", str(path)],
                             capture_output=True, text=True)
        assert out.returncode == 1
        lines = (out.stderr + out.stdout).strip().splitlines()
        assert len(lines) == 1 and key in lines[0] and problem in lines[0], lines


# --- the head sent upstream, for any head a client may send ---------------------------------

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from engine_support import EngineRunner  # noqa: E402
from support import fuzz_examples  # noqa: E402

_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade",
        b"host", b"x-real-ip", b"x-forwarded-for", b"x-forwarded-proto", b"expect",
        b"transfer-encoding", b"content-length"}
_NAMES = st.one_of(
    st.sampled_from([b"Accept", b"Cookie", b"X-Thing", b"x-thing", b"Via", b"Forwarded",
                     b"X-Forwarded-For", b"X-Real-IP", b"Connection", b"Keep-Alive", b"TE",
                     b"Upgrade", b"Authorization", b"User-Agent", b"Origin"]),
    st.text(alphabet="abcXYZ019-_!#$%&'*+.^`|~", min_size=1, max_size=12).map(str.encode))
_VALUES = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e),
                  max_size=40).map(lambda v: v.strip().encode())


@pytest.fixture(scope="module")
def rewriting():
    b = HttpBackend()
    r = EngineRunner(http_config(free_port(), b.address))
    yield r, b
    r.close()
    b.close()


@settings(max_examples=fuzz_examples(150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=12),
       st.text(alphabet="abc/%20-._~!$&'()*+,;=:@?", max_size=30))
def test_the_head_sent_upstream_reads_the_same_under_a_strict_parser(rewriting, headers, path):
    # whatever head fastws accepts, the one it sends upstream parses under llhttp, has one
    # Host, and carries the client's end-to-end fields in order and byte for byte
    import httptools
    runner, backend = rewriting
    named = {t.strip().lower() for n, v in headers if n.lower() == b"connection"
             for t in v.split(b",")}
    raw = b"GET /" + path.encode() + b" HTTP/1.1\r\nHost: example.com\r\n" + b"".join(
        n + b": " + v + b"\r\n" for n, v in headers) + b"Connection: close\r\n\r\n"
    before = len(backend.requests)
    with socket.create_connection(("127.0.0.1", runner.port), timeout=10) as s:
        s.sendall(raw)
        answer = read_all(s)
    if not answer.startswith(b"HTTP/1.1 200"):
        assert answer.startswith(b"HTTP/1.1 4"), answer[:100]   # refused, never forwarded
        assert len(backend.requests) == before
        return
    sent = backend.requests[-1].raw
    seen: list[tuple[bytes, bytes]] = []

    class Collect:
        def on_header(self, name: bytes, value: bytes) -> None:
            seen.append((name.lower(), value))

    httptools.HttpRequestParser(Collect()).feed_data(sent)     # raises on a malformed head
    assert [n for n, _ in seen].count(b"host") == 1
    kept = [(n.lower(), v) for n, v in headers
            if n.lower() not in _HOP and n.lower() not in named]
    assert [(n, v) for n, v in seen if n in {k for k, _ in kept}] == kept
    assert dict(seen)[b"host"] == b"example.com"
