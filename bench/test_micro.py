"""Micro-benchmarks: fastws's compiled engine against plain-Python versions of the same work.

    python -m pytest bench/test_micro.py --benchmark-only

Not part of the default test run (the repository's pytest config collects tests/ and the
bench's own checks, not this file).
Every pair is checked to give the same result.  The plain-Python sides skip, with a reason,
when httptools is missing; the fastws sides never skip: a fastws whose compiled engine cannot
be imported fails.  Each benchmark has a fixed number of rounds.

- head parse: a WebSocket upgrade request head (a browser's, 15 header lines) read by
  fastws._engine.parse_request_head, the engine's own parser with its checks, against
  httptools.HttpRequestParser collecting the same fields (method, target, version, headers).
- keep-alive GET: one GET and its answer through a proxy on a kept-alive client connection and
  a kept-alive upstream connection: the head parsed, routed and rebuilt for the upstream
  (hop-by-hop headers dropped, Host first, X-Real-IP, X-Forwarded-For, X-Forwarded-Proto
  last), the answer's head read and passed back with Connection: keep-alive.  fastws's
  engine against a selectors loop in a thread with httptools for both heads.  Both must send
  the upstream the same head and the client the same answer.
- relay: a WebSocket tunnel opened through the proxy (client -> proxy -> backend over loopback
  TCP), then one message up and its echo back, 64 B and 4 KB, and 1 MiB one way (client to
  backend), as raw bytes (neither relay reads frames).  The test plays both ends: the client, and the backend that answered the upgrade
  and echoes.  fastws's engine (its tunnel relay: epoll, splice or copy) against a plain
  selectors relay in a thread between the same kind of sockets.  Every byte is checked.

The fastws side runs the engine in this process, on its own listener, driven from a thread
as a worker drives it (as tests/engine_support.py does), with the configuration the bench's
fastws target uses.  The whole module runs on one CPU (see one_cpu), and checks that every
thread, socket and engine it started is gone after each test.
"""
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import queue
import selectors
import socket
import threading
from typing import Any, Callable, Iterator

import pytest

pytest.importorskip("pytest_benchmark")

try:
    import httptools
except ImportError:                     # only the plain-Python sides need it
    httptools = None  # type: ignore[assignment]

TIMEOUT = 10.0
ROUNDS, WARMUP = 5000, 200          # of the round trips; 1 MiB: a tenth of them

# A browser's WebSocket upgrade head; 15 header lines, some hop-by-hop, one X-Forwarded-For.
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
# What parse_request_head gives for it: (method, target, version, header pairs).
PARSED = (b"GET", b"/chat/ws?room=lobby&token=abcdef0123456789", 11,
          [tuple(line.split(b": ", 1)) for line in REQUEST.split(b"\r\n")[1:-2]])

# The same browser's GET on a kept-alive connection, and the head a proxy sends upstream for
# it: hop-by-hop headers dropped, Host first, X-Real-IP, X-Forwarded-For (extended) and
# X-Forwarded-Proto last, no Connection toward a kept-alive upstream (fastws's defaults).
GET_REQUEST = (
    b"GET /chat/history?room=lobby&limit=50 HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Referer: https://example.com/chat\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n"
    b"X-Forwarded-For: 203.0.113.7\r\n"
    b"Pragma: no-cache\r\n"
    b"Cache-Control: no-cache\r\n"
    b"\r\n"
)
UPSTREAM_HEAD = (
    b"GET /chat/history?room=lobby&limit=50 HTTP/1.1\r\n"
    b"Host: example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: application/json\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\n"
    b"Referer: https://example.com/chat\r\n"
    b"Cookie: session=0123456789abcdef0123456789abcdef; theme=dark\r\n"
    b"Pragma: no-cache\r\n"
    b"Cache-Control: no-cache\r\n"
    b"X-Real-IP: 127.0.0.1\r\n"
    b"X-Forwarded-For: 203.0.113.7, 127.0.0.1\r\n"
    b"X-Forwarded-Proto: http\r\n"
    b"\r\n"
)
# The backend's answer, and what the client gets: the same with Connection: keep-alive.
BODY = b'{"room":"lobby","members":12,"messages":[{"from":"ann","text":"hello"}]}'
ANSWER = (b"HTTP/1.1 200 OK\r\nServer: backend\r\nContent-Type: application/json\r\n"
          b"Cache-Control: no-store\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY))
ANSWER_PROXIED = ANSWER.replace(b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n", 1)
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade"))
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def need_httptools() -> None:
    if httptools is None:
        pytest.skip("httptools is not installed (pip install httptools): "
                    "no plain-Python side to compare with")


def compiled() -> Any:
    """fastws's compiled engine and the modules that build one; a missing build fails."""
    try:
        from fastws import _engine, balancer, config, tables, tls, worker
    except ImportError as exc:
        pytest.fail(f"fastws's compiled engine cannot be imported ({exc}): build it first",
                    pytrace=False)
    return _engine, balancer, config, tables, tls, worker


def side(benchmark: Any, name: str) -> None:
    """Which side of the comparison this benchmark is (bench/micro.py reads it)."""
    benchmark.extra_info["side"] = name


@pytest.fixture(scope="module", autouse=True)
def one_cpu() -> Iterator[None]:
    """The whole module on one CPU (threads inherit it): the figures are then the CPU cost of
    each exchange, every party's included, and not how long the machine takes to wake an idle
    CPU for the next hop, which on a virtual machine can be 100 us a hop and varies by run."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(before)})
    yield
    os.sched_setaffinity(0, before)


@pytest.fixture(autouse=True)
def nothing_left() -> Iterator[None]:
    """Every thread, socket and pipe a benchmark started is gone once it is over."""
    threads = set(threading.enumerate())
    fds = set(os.listdir("/proc/self/fd"))
    yield
    left = [t.name for t in threading.enumerate() if t not in threads]
    assert not left, f"threads left running: {left}"
    opened = set(os.listdir("/proc/self/fd")) - fds
    assert not opened, f"file descriptors left open: {sorted(opened)}"


# --- head parse ----------------------------------------------------------------------------

class _Fields:
    __slots__ = ("url", "headers")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))


def httptools_parse(data: bytes) -> tuple[bytes, bytes, int, list[tuple[bytes, bytes]]]:
    """(method, target, version as 11, headers), as parse_request_head gives them."""
    fields = _Fields()
    parser = httptools.HttpRequestParser(fields)
    try:
        parser.feed_data(data)
    except httptools.HttpParserUpgrade:
        pass
    major, _, minor = parser.get_http_version().partition(".")
    return parser.get_method(), fields.url, int(major) * 10 + int(minor), fields.headers


def test_head_parse_same_fields():
    need_httptools()
    engine = compiled()[0]
    assert httptools_parse(REQUEST) == PARSED
    assert engine.parse_request_head(REQUEST, 8192, 32768) == (*PARSED, len(REQUEST))


@pytest.mark.benchmark(group="parse a WebSocket upgrade head (15 headers)")
def test_head_parse_python(benchmark):
    need_httptools()
    side(benchmark, "python")
    out = benchmark.pedantic(httptools_parse, args=(REQUEST,), rounds=500, iterations=100,
                             warmup_rounds=10)
    assert out == PARSED


@pytest.mark.benchmark(group="parse a WebSocket upgrade head (15 headers)")
def test_head_parse_compiled(benchmark):
    engine = compiled()[0]
    side(benchmark, "compiled")
    out = benchmark.pedantic(engine.parse_request_head, args=(REQUEST, 8192, 32768), rounds=500,
                             iterations=100, warmup_rounds=10)
    assert out == (*PARSED, len(REQUEST))


# --- the proxies ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fastws_config(port: int, upstream: str) -> dict[str, Any]:
    """What `python -m bench` runs fastws with (bench/targets.py), on `port`; its tunnels carry
    raw bytes here, so they are relayed blind (as the selectors relay does)."""
    return {"upstream": [{"name": "backend", "servers": [upstream], "keepalive": 64,
                          "keepalive_requests": 1000000}],
            "server": [{"listen": [f"127.0.0.1:{port}"], "keepalive_requests": 1000000,
                        "location": [{"path": "/", "proxy_pass": "backend", "frames": False}]}]}


class EngineProxy:
    """fastws's engine in this process, on its own listener, waiting in a thread as a worker's
    main loop does; built as a worker builds it."""

    def __init__(self, upstream: str) -> None:
        _engine, balancer, config, tables, tls, worker = compiled()
        for attempt in range(5):            # the free port may be taken before it is bound
            cfg = config.from_dict(fastws_config(free_port(), upstream))
            try:
                self.sockets = worker.open_listeners(cfg)
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or attempt == 4:
                    raise
        self.port = self.sockets[0].getsockname()[1]
        self.messages: list[tuple[int, str]] = []
        self.engine = _engine.Engine(
            self, pipe_size=cfg.pipe_size,
            max_pipes=cfg.max_pipes or max(16, cfg.worker_connections // 2),
            worker_connections=cfg.worker_connections)
        self.engine.load(tables.build(cfg, self.sockets, balancer.build_upstreams(cfg),
                                      tls.Contexts(cfg)))
        self._running = True
        self._thread = threading.Thread(target=self._run, name="fastws-engine", daemon=True)
        self._thread.start()

    def log(self, level: int, text: str) -> None:      # what the engine asks of its control
        self.messages.append((level, text))

    def status_page(self, fmt: str) -> tuple[str, bytes]:
        return "text/plain", b""

    def _run(self) -> None:
        while self._running:
            self.engine.wait(0.02)

    def close(self) -> None:
        self._running = False
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), "the engine's thread did not stop"
        self.engine.stop()                  # from here: nothing else touches it any more
        for sock in self.sockets:
            sock.close()
        held = self.engine.stats()["held"]
        self.engine = None                  # its epoll, timer and event fds go with it
        assert not any(held.values()), (held, self.messages)


class _PyLoop:
    """A plain-Python server: a selectors loop in a thread, its listener, what it accepts."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.socket()
        self.listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self.error: BaseException | None = None
        self._sel = selectors.DefaultSelector()
        self._stop_r, self._stop_w = os.pipe()
        self._sel.register(self.listener, selectors.EVENT_READ, self._accept)
        self._sel.register(self._stop_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=type(self).__name__, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                for key, _ in self._sel.select():
                    if key.data is None:
                        return
                    sock = key.fileobj
                    if isinstance(sock, socket.socket) and sock.fileno() >= 0:
                        key.data(sock)      # (unless an earlier one of this turn closed it)
        except BaseException as exc:        # handed to close(); the test's reads time out
            self.error = exc

    def _open(self, listener: socket.socket) -> tuple[socket.socket, socket.socket, bytes]:
        """Accept a client and connect to the upstream for it: both blocking, no Nagle."""
        client, addr = listener.accept()
        upstream = socket.create_connection(self.upstream, timeout=TIMEOUT)
        for s in (client, upstream):
            s.settimeout(None)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sockets.append(s)
        return client, upstream, addr[0].encode()

    def _accept(self, listener: socket.socket) -> None:
        raise NotImplementedError

    def _drop(self, *socks: socket.socket) -> None:
        for s in socks:
            self._sel.unregister(s)
            s.close()

    def close(self) -> None:
        os.write(self._stop_w, b"x")
        self._thread.join(TIMEOUT)
        assert not self._thread.is_alive(), f"{type(self).__name__}'s thread did not stop"
        self._sel.close()
        for s in (*self.sockets, self.listener):
            s.close()
        os.close(self._stop_r)
        os.close(self._stop_w)
        if self.error is not None:
            raise self.error


class PyRelay(_PyLoop):
    """A plain-Python relay: each client's bytes go to a connection of its own to the upstream,
    and back; a recv of up to 64 KiB, then sendall."""

    def _accept(self, listener: socket.socket) -> None:
        client, upstream, _ = self._open(listener)
        self._sel.register(client, selectors.EVENT_READ, self._pass(client, upstream))
        self._sel.register(upstream, selectors.EVENT_READ, self._pass(upstream, client))

    def _pass(self, src: socket.socket, dst: socket.socket) -> Callable[[Any], None]:
        def readable(_: Any) -> None:
            data = src.recv(65536)
            if data:
                dst.sendall(data)
            else:
                self._drop(src, dst)
        return readable


class _PyHttpConn:
    """One client connection of PyHttpProxy and its kept-alive upstream connection."""

    def __init__(self, proxy: PyHttpProxy, client: socket.socket, upstream: socket.socket,
                 remote: bytes) -> None:
        self.proxy, self.client, self.upstream, self.remote = proxy, client, upstream, remote
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.request = httptools.HttpRequestParser(self)
        self.response = httptools.HttpResponseParser(_Answer(self))

    # the request's head, from the client
    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_message_complete(self) -> None:
        # the head for the upstream, as fastws builds it with its default settings
        host = xff = b""
        drop = set(HOP_BY_HOP) | {b"host", b"x-real-ip", b"x-forwarded-for", b"x-forwarded-proto"}
        for name, value in self.headers:
            low = name.lower()
            if low == b"host":
                host = value
            elif low == b"x-forwarded-for":
                xff = xff + b", " + value if xff else value
            elif low == b"connection":
                drop.update(t.strip().lower() for t in value.split(b","))
        out = [b"%s %s HTTP/1.1" % (self.request.get_method(), self.url), b"Host: " + host]
        out += [n + b": " + v for n, v in self.headers if n.lower() not in drop]
        out += [b"X-Real-IP: " + self.remote,
                b"X-Forwarded-For: " + (xff + b", " + self.remote if xff else self.remote),
                b"X-Forwarded-Proto: http", b"\r\n"]
        self.upstream.sendall(b"\r\n".join(out))

    def from_client(self, _: Any) -> None:
        data = self.client.recv(65536)
        if data:
            self.request.feed_data(data)
        else:
            self.proxy._drop(self.client, self.upstream)

    def from_upstream(self, _: Any) -> None:
        data = self.upstream.recv(65536)
        if data:
            self.response.feed_data(data)
        else:
            self.proxy._drop(self.client, self.upstream)


class _Answer:
    """The answer's head and body, from the upstream, passed back to the client."""

    def __init__(self, conn: _PyHttpConn) -> None:
        self.conn = conn
        self.reason = b""
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def on_message_begin(self) -> None:
        self.reason = b""
        self.headers = []
        self.body = []

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP_BY_HOP:
            self.headers.append(name + b": " + value)

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        status = self.conn.response.get_status_code()
        out = [b"HTTP/1.1 %d %s" % (status, self.reason), *self.headers,
               b"Connection: keep-alive", b"\r\n"]
        self.conn.client.sendall(b"\r\n".join(out) + b"".join(self.body))


class PyHttpProxy(_PyLoop):
    """A plain-Python HTTP/1.1 proxy for GET requests on kept-alive connections, httptools
    reading both heads."""

    def _accept(self, listener: socket.socket) -> None:
        conn = _PyHttpConn(self, *self._open(listener))
        self._sel.register(conn.client, selectors.EVENT_READ, conn.from_client)
        self._sel.register(conn.upstream, selectors.EVENT_READ, conn.from_upstream)


def _make_proxy(kind: str, upstream: str, python: type[_PyLoop]) -> Any:
    if kind == "python":
        if python is PyHttpProxy:
            need_httptools()
        return python(upstream)
    return EngineProxy(upstream)


# --- ends: the client and the backend -------------------------------------------------------

def recv_exact(s: socket.socket, buf: bytearray) -> bytearray:
    """Fill `buf` from `s`.  (Compare bytearrays, not memoryviews: a memoryview compares item
    by item, milliseconds a MiB.)"""
    view = memoryview(buf)
    got, n = 0, len(buf)
    while got < n:
        k = s.recv_into(view[got:], n - got)
        if not k:
            raise EOFError("closed early")
        got += k
    return buf


def read_head(s: socket.socket) -> tuple[bytes, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise EOFError(f"closed before the end of a head: {buf[:200]!r}")
        buf += chunk
    head, sep, rest = buf.partition(b"\r\n\r\n")
    return head + sep, rest


def listener() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    s.settimeout(TIMEOUT)
    return s


class HttpBackend:
    """Answers every GET with ANSWER, a thread per connection; counts the heads it read and
    keeps those that are not UPSTREAM_HEAD."""

    def __init__(self) -> None:
        self.sock = listener()
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.heads = 0
        self.unexpected: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._serve, daemon=True)]
        self.threads[0].start()

    def _serve(self) -> None:
        self.sock.settimeout(None)
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conns.append(conn)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _run(self, conn: socket.socket) -> None:
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                self.heads += 1
                if head + b"\r\n\r\n" != UPSTREAM_HEAD and len(self.unexpected) < 4:
                    self.unexpected.append(head + b"\r\n\r\n")
                conn.sendall(ANSWER)
        except OSError:
            return

    def close(self) -> None:
        for s in (self.sock, *self.conns):      # wakes accept() and recv() in the threads
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(TIMEOUT)
            assert not t.is_alive(), "a backend thread did not stop"
        for s in (self.sock, *self.conns):
            s.close()


@contextlib.contextmanager
def get_through(kind: str) -> Iterator[tuple[socket.socket, HttpBackend]]:
    """A proxy of that kind in front of an HttpBackend: (a client connection through it, kept
    alive after a first GET, the backend)."""
    backend = HttpBackend()
    proxy = client = None
    try:
        proxy = _make_proxy(kind, backend.address, PyHttpProxy)
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.sendall(GET_REQUEST)
        got = b"".join(read_head(client))
        assert got == ANSWER_PROXIED[:len(got)], got
        got += recv_exact(client, bytearray(len(ANSWER_PROXIED) - len(got)))
        assert got == ANSWER_PROXIED, got
        assert backend.heads == 1 and not backend.unexpected, backend.unexpected
        yield client, backend
    finally:
        if client is not None:
            client.close()
        try:
            if proxy is not None:
                proxy.close()
        finally:
            backend.close()


@pytest.fixture(params=["python", "compiled"])
def http_proxy(request) -> Iterator[tuple[str, socket.socket, HttpBackend]]:
    with get_through(request.param) as (client, backend):
        yield request.param, client, backend


def test_get_same_head_upstream_and_same_answer():
    """Both proxies send the backend UPSTREAM_HEAD and the client ANSWER_PROXIED."""
    need_httptools()
    for kind in ("python", "compiled"):
        with get_through(kind):
            pass


@pytest.mark.benchmark(group="keep-alive GET round trip (head read, rebuilt upstream)")
def test_get(benchmark, http_proxy):
    kind, client, backend = http_proxy
    side(benchmark, kind)
    buf = bytearray(len(ANSWER_PROXIED))
    sent = [1]                                  # get_through's GET

    def work() -> None:
        client.sendall(GET_REQUEST)
        sent[0] += 1
        if recv_exact(client, buf) != ANSWER_PROXIED:
            raise AssertionError(bytes(buf))
    benchmark.pedantic(work, rounds=ROUNDS, warmup_rounds=WARMUP)
    # every head that reached the backend was UPSTREAM_HEAD
    assert backend.heads == sent[0] and not backend.unexpected, backend.unexpected


def ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


@contextlib.contextmanager
def tunnel_through(kind: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """A WebSocket tunnel through a proxy of that kind: (client end, backend end), both
    blocking, with a timeout."""
    backend = listener()
    proxy = client = upstream = None
    try:
        proxy = _make_proxy(kind, "127.0.0.1:%d" % backend.getsockname()[1], PyRelay)
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=TIMEOUT)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        key = base64.b64encode(os.urandom(16))
        client.sendall(REQUEST.replace(b"dGhlIHNhbXBsZSBub25jZQ==", key))
        upstream, _ = backend.accept()
        upstream.settimeout(TIMEOUT)
        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        head, rest = read_head(upstream)
        assert head.startswith(b"GET /chat/ws?") and not rest
        upstream.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                         b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + ws_accept(key)
                         + b"\r\n\r\n")
        head, rest = read_head(client)
        assert head.startswith(b"HTTP/1.1 101 ") and not rest, head
        yield client, upstream
    finally:
        for s in (client, upstream, backend):
            if s is not None:
                s.close()
        if proxy is not None:
            proxy.close()


@pytest.fixture(params=["python", "compiled"])
def tunnel(request) -> Iterator[tuple[str, socket.socket, socket.socket]]:
    with tunnel_through(request.param) as (client, upstream):
        yield request.param, client, upstream


def _round_trip(client: socket.socket, upstream: socket.socket, size: int) -> Callable[[], None]:
    msg = os.urandom(size)
    up = bytearray(size)
    down = bytearray(size)

    def work() -> None:
        client.sendall(msg)
        upstream.sendall(recv_exact(upstream, up))          # the backend echoes it
        recv_exact(client, down)
        if up != msg or down != msg:
            raise AssertionError("the relay changed the bytes")
    return work


@pytest.mark.benchmark(group="relay round trip 64 B")
def test_relay_64(benchmark, tunnel):
    kind, client, upstream = tunnel
    side(benchmark, kind)
    benchmark.pedantic(_round_trip(client, upstream, 64), rounds=ROUNDS, warmup_rounds=WARMUP)


@pytest.mark.benchmark(group="relay round trip 4 KB")
def test_relay_4k(benchmark, tunnel):
    kind, client, upstream = tunnel
    side(benchmark, kind)
    benchmark.pedantic(_round_trip(client, upstream, 4096), rounds=ROUNDS, warmup_rounds=WARMUP)


class _Sender:
    """A thread that sends `msg` on `sock` each time it is asked (no thread start per round)."""

    def __init__(self, sock: socket.socket, msg: bytes) -> None:
        self.sock, self.msg = sock, msg
        self.asked: queue.Queue[bool] = queue.Queue()
        self.done: queue.Queue[BaseException | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while self.asked.get():
            try:
                self.sock.sendall(self.msg)
                self.done.put(None)
            except BaseException as exc:
                self.done.put(exc)
                return

    def send(self) -> None:
        self.asked.put(True)

    def wait(self) -> None:
        exc = self.done.get(timeout=TIMEOUT)
        if exc is not None:
            raise exc

    def close(self) -> None:
        self.asked.put(False)
        self.thread.join(TIMEOUT)
        assert not self.thread.is_alive(), "the sender thread did not stop"


@pytest.mark.benchmark(group="relay 1 MiB one way")
def test_relay_1m(benchmark, tunnel):
    kind, client, upstream = tunnel
    side(benchmark, kind)
    msg = os.urandom(1 << 20)
    got = bytearray(len(msg))
    sender = _Sender(client, msg)

    def work() -> None:
        sender.send()
        recv_exact(upstream, got)
        sender.wait()
        if got != msg:
            raise AssertionError("the relay changed the bytes")
    try:
        benchmark.pedantic(work, rounds=ROUNDS // 10, warmup_rounds=WARMUP // 10)
    finally:
        sender.close()
