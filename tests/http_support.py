"""A real HTTP/1.1 backend for the plain-request tests: keep-alive, every body framing, and the
misbehaviours a proxy must survive, chosen by the request path."""

from __future__ import annotations

import hashlib
import os
import socket
import socketserver
import threading
import time
from typing import Any


def read_chunked(rfile: Any) -> tuple[bytes, list[bytes]]:
    """Read a chunked body; return (data, trailer lines)."""
    data = []
    while True:
        line = rfile.readline(65537)
        size = int(line.split(b";")[0].strip(), 16)
        if size == 0:
            break
        data.append(rfile.read(size))
        assert rfile.read(2) == b"\r\n"
    trailers = []
    while True:
        line = rfile.readline(65537)
        if line in (b"\r\n", b""):
            break
        trailers.append(line.rstrip(b"\r\n"))
    return b"".join(data), trailers


class Request:
    def __init__(self, line: bytes, headers: list[tuple[bytes, bytes]], raw: bytes) -> None:
        self.method, self.target, self.version = line.split(b" ", 2)
        self.headers = headers
        self.raw = raw

    def get(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n.lower() == name:
                return v
        return None


class _Handler(socketserver.StreamRequestHandler):
    server: "_Server"

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def handle(self) -> None:
        backend = self.server.backend
        with backend.lock:
            backend.connections += 1
        served = 0
        while True:
            line = self.rfile.readline(65537)
            if not line:
                return
            raw = line
            headers = []
            while True:
                h = self.rfile.readline(65537)
                raw += h
                if h in (b"\r\n", b"\n", b""):
                    break
                name, _, value = h.partition(b":")
                headers.append((name, value.strip()))
            req = Request(line.rstrip(b"\r\n"), headers, raw)
            with backend.lock:
                backend.requests.append(req)
            served += 1
            if not backend.answer(self, req, served):
                return
            if (req.get(b"connection") or b"").lower() == b"close":
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512
    backend: "HttpBackend"


class HttpBackend:
    """A threaded HTTP/1.1 server on 127.0.0.1 that keeps connections alive; counts the
    connections it accepted and records every request head."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connections = 0
        self.requests: list[Request] = []
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.backend = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- answers by path ------------------------------------------------------------------

    def answer(self, h: _Handler, req: Request, served: int) -> bool:
        """Write the answer; False to close the connection."""
        path = req.target.split(b"?")[0].decode()
        w = h.wfile
        body = b""
        trailers: list[bytes] = []
        te = req.get(b"transfer-encoding")
        cl = req.get(b"content-length")
        if path == "/sink":
            # read and digest a body of any size without holding it
            digest = hashlib.sha256()
            n = 0
            if te is not None:
                data, trailers = read_chunked(h.rfile)
                digest.update(data)
                n = len(data)
            else:
                left = int(cl or 0)
                while left:
                    chunk = h.rfile.read(min(left, 1 << 20))
                    if not chunk:
                        return False
                    digest.update(chunk)
                    n += len(chunk)
                    left -= len(chunk)
            reply = f"{n} {digest.hexdigest()}".encode()
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(reply), reply))
            return True
        if te is not None:
            body, trailers = read_chunked(h.rfile)
        elif cl is not None:
            body = h.rfile.read(int(cl))
        if path == "/echo":
            extra = b"".join(b"X-Trailer-Seen: " + t + b"\r\n" for t in trailers)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body))
        elif path == "/head":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(req.raw), req.raw))
        elif path.startswith("/bytes/"):
            n = int(path.rsplit("/", 1)[1])
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            if req.method == b"HEAD":
                n = 0
            block = (b"0123456789abcdef" * 65536)
            while n:
                piece = block[:min(n, len(block))]
                w.write(piece)
                n -= len(piece)
        elif path == "/chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
                    b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Checksum: 42\r\n\r\n")
        elif path == "/close":
            w.write(b"HTTP/1.1 200 OK\r\nX-Framing: close\r\n\r\nuntil the end")
            return False
        elif path == "/http10":
            w.write(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nold")
            return False
        elif path in ("/204", "/304"):
            w.write(b"HTTP/1.1 %s Whatever\r\nX-No-Body: yes\r\n\r\n" % path[1:].encode())
        elif path == "/early-hints":
            w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfinal")
        elif path == "/headers":
            w.write(b"HTTP/1.1 200 OK\r\nServer: backend/1.0\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT"
                    b"\r\nX-Z: last\r\nConnection: keep-alive, X-Private\r\nX-Private: secret\r\n"
                    b"Keep-Alive: timeout=5\r\nSet-Cookie: a=1\r\nX-A: first\r\n"
                    b"Set-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok")
        elif path == "/cut-length":
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 1000)
            w.flush()
            return False
        elif path == "/cut-chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            w.flush()
            return False
        elif path == "/bad-chunked":
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            w.flush()
            time.sleep(0.2)     # apart, so that the head goes to the client before the bad chunk
            w.write(b"zz\r\nhello\r\n0\r\n\r\n")
            w.flush()
        elif path == "/slow":
            # a backend slow to answer (what is tested), not a wait
            time.sleep(float(req.target.split(b"?")[1] or b"1"))
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        elif path == "/drop-second":
            # answers the first request of a connection, then closes on the next one without a
            # word: a kept-alive connection that died between two requests
            if served > 1:
                return False
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst")
        else:
            w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello")
        w.flush()
        return True


def rss_kb(pid: int, field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def http_config(port: int, upstream: str, *, keepalive: int = 0, server: dict[str, Any] | None
                = None, upstream_extra: dict[str, Any] | None = None,
                **location: Any) -> dict[str, Any]:
    """The recipe's `location /` (proxy_pass http://backend) beside `/ws`, and a status page."""
    up: dict[str, Any] = {"name": "backend", "servers": [upstream]}
    if keepalive:
        up["keepalive"] = keepalive
    up.update(upstream_extra or {})
    loc = {"path": "/", "proxy_pass": "http://backend",      # the recipe's location /
           "set_headers": {"Host": "$host", "X-Real-IP": "$remote_addr",
                           "X-Forwarded-For": "$proxy_add_x_forwarded_for"}}
    loc.update(location)
    srv: dict[str, Any] = {"listen": [f"127.0.0.1:{port}"]}
    srv.update(server or {})
    srv["location"] = [loc, {"path": "/ws", "proxy_pass": "backend", "frames": False},
                       {"path": "= /status", "status": "json"}]
    return {"upstream": [up], "server": [srv]}


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
