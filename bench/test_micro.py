"""Micro-benchmarks: fastws's compiled pieces against a plain-Python version of the same work.

    python -m pytest bench/test_micro.py --benchmark-only

Not part of the default test run (the repository's pytest config collects tests/ only).
Each compiled test skips cleanly while its extension is not built.

- head: parse a WebSocket upgrade request head with httptools, then build the head sent
  upstream (hop-by-hop headers and Connection tokens dropped; Host first; X-Real-IP,
  X-Forwarded-For, X-Forwarded-Proto, Upgrade, Connection last). The plain-Python side does
  the rewrite with list and bytes operations; the compiled side with fastws._http.build_head.
  Both must produce the same bytes.
- relay: one message through a relay between two socketpairs and its echo back
  (client -> relay -> upstream, upstream -> relay -> client), 64 B and 4 KB, and 1 MiB one
  way. The plain-Python side is a selectors loop in a thread; the compiled side is
  fastws._splice.Engine (its own thread, epoll, splice or copy). The socket calls of the
  two ends are the same in both and are included in the time.
"""
from __future__ import annotations

import os
import selectors
import socket
import threading

import pytest

pytest.importorskip("pytest_benchmark")
httptools = pytest.importorskip("httptools")

REQUEST = (
    b"GET /chat/ws?room=lobby&token=abcdef0123456789 HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: */*\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Sec-WebSocket-Version: 13\r\n"
    b"Origin: https://example.com\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n"
    b"X-Forwarded-For: 203.0.113.7\r\n"
    b"Pragma: no-cache\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Upgrade: websocket\r\n"
    b"\r\n"
)
REMOTE = b"127.0.0.1"
HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade")


class _Head:
    __slots__ = ("url", "headers")

    def __init__(self):
        self.url = b""
        self.headers = []

    def on_url(self, url):
        self.url += url

    def on_header(self, name, value):
        self.headers.append((name, value))


def parse(data: bytes):
    head = _Head()
    parser = httptools.HttpRequestParser(head)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    return parser.get_method(), head


def rewrite_args(method, head):
    """What the proxy passes to the head builder: the same for both sides."""
    get = {}
    for n, v in head.headers:
        get.setdefault(n.lower(), v)
    xff = get.get(b"x-forwarded-for")
    first = [(b"Host", get.get(b"host", b""))]
    last = [(b"X-Real-IP", REMOTE),
            (b"X-Forwarded-For", xff + b", " + REMOTE if xff else REMOTE),
            (b"X-Forwarded-Proto", b"http"),
            (b"Upgrade", get.get(b"upgrade", b"websocket")),
            (b"Connection", b"upgrade")]
    drop = [b"host", b"x-real-ip", b"x-forwarded-for", b"x-forwarded-proto"]
    drop += [t.strip().lower() for t in get.get(b"connection", b"").split(b",")
             if t.strip() and t.strip().lower() != b"upgrade"]
    line = b"%s %s HTTP/1.1" % (method, head.url)
    return line, head.headers, tuple(drop), first, last


def py_build_head(first_line, headers, drop, first, last) -> bytes:
    """Plain-Python reference of the head builder."""
    out = [first_line]
    out += [n + b": " + v for n, v in first]
    for n, v in headers:
        ln = n.lower()
        if ln in HOP_BY_HOP or ln in drop:
            continue
        out.append(n + b": " + v)
    out += [n + b": " + v for n, v in last]
    out.append(b"\r\n")
    return b"\r\n".join(out)


def _compiled_http():
    mod = pytest.importorskip("fastws._http")
    fn = getattr(mod, "build_head", None)
    if fn is None:
        pytest.skip("fastws._http has no build_head yet")
    return fn


def test_head_reference_matches_compiled():
    build_head = _compiled_http()
    args = rewrite_args(*parse(REQUEST))
    assert build_head(*args) == py_build_head(*args)


@pytest.mark.benchmark(group="head parse + rewrite")
def test_head_python(benchmark):
    def work():
        return py_build_head(*rewrite_args(*parse(REQUEST)))
    out = benchmark(work)
    assert out.startswith(b"GET /chat/ws?room=lobby") and b"X-Real-IP: 127.0.0.1\r\n" in out


@pytest.mark.benchmark(group="head parse + rewrite")
def test_head_compiled(benchmark):
    build_head = _compiled_http()

    def work():
        return build_head(*rewrite_args(*parse(REQUEST)))
    out = benchmark(work)
    assert out.startswith(b"GET /chat/ws?room=lobby") and b"X-Real-IP: 127.0.0.1\r\n" in out


@pytest.mark.benchmark(group="head rewrite only")
def test_rewrite_python(benchmark):
    args = rewrite_args(*parse(REQUEST))
    benchmark(py_build_head, *args)


@pytest.mark.benchmark(group="head rewrite only")
def test_rewrite_compiled(benchmark):
    build_head = _compiled_http()
    args = rewrite_args(*parse(REQUEST))
    benchmark(build_head, *args)


# --- relay ---------------------------------------------------------------------------------

class PyRelay:
    """Plain-Python relay between two sockets: a selectors loop in a thread."""

    def __init__(self, a: socket.socket, b: socket.socket):
        self.a, self.b = a, b
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        sel = selectors.DefaultSelector()
        for s in (self.a, self.b):
            s.setblocking(True)
        sel.register(self.a, selectors.EVENT_READ, self.b)
        sel.register(self.b, selectors.EVENT_READ, self.a)
        sel.register(self.stop_r, selectors.EVENT_READ, None)
        try:
            while True:
                for key, _ in sel.select():
                    if key.data is None:
                        return
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    key.data.sendall(data)
        finally:
            sel.close()

    def close(self):
        os.write(self.stop_w, b"x")
        self.thread.join(5)
        for fd in (self.stop_r, self.stop_w):
            os.close(fd)
        self.a.close()
        self.b.close()


def _recv_exact(s: socket.socket, n: int) -> None:
    view = bytearray(n)
    got = 0
    while got < n:
        k = s.recv_into(memoryview(view)[got:], n - got)
        if not k:
            raise EOFError("relay closed")
        got += k


@pytest.fixture(params=["python", "compiled"])
def relay(request):
    """(client end, upstream end) of a relay of the given kind, both blocking, 10 s timeout."""
    client, c_in = socket.socketpair()
    u_out, upstream = socket.socketpair()
    for s in (client, upstream):
        s.settimeout(10)
    if request.param == "python":
        r = PyRelay(c_in, u_out)
        yield request.param, client, upstream
        client.close()
        upstream.close()
        r.close()
        return
    _splice = pytest.importorskip("fastws._splice")
    engine = _splice.Engine()
    engine.start()
    engine.add(c_in.detach(), u_out.detach(), b"", b"", 60.0, 60.0, "auto", None)
    yield request.param, client, upstream
    client.close()
    upstream.close()
    engine.stop()


def _ping_pong(client, upstream, msg):
    n = len(msg)

    def work():
        client.sendall(msg)
        _recv_exact(upstream, n)
        upstream.sendall(msg)
        _recv_exact(client, n)
    return work


@pytest.mark.benchmark(group="relay round trip 64 B")
def test_relay_64(benchmark, relay):
    kind, client, upstream = relay
    benchmark.extra_info["relay"] = kind
    benchmark(_ping_pong(client, upstream, os.urandom(64)))


@pytest.mark.benchmark(group="relay round trip 4 KB")
def test_relay_4k(benchmark, relay):
    kind, client, upstream = relay
    benchmark.extra_info["relay"] = kind
    benchmark(_ping_pong(client, upstream, os.urandom(4096)))


@pytest.mark.benchmark(group="relay 1 MiB one way")
def test_relay_1m(benchmark, relay):
    kind, client, upstream = relay
    benchmark.extra_info["relay"] = kind
    msg = os.urandom(1 << 20)

    def work():
        t = threading.Thread(target=client.sendall, args=(msg,))
        t.start()
        _recv_exact(upstream, len(msg))
        t.join()
    benchmark(work)
