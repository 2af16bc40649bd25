"""Per-connection glue: accept -> request head -> route -> pick -> connect -> 101 -> the core.

Everything here runs once per connection on the worker's event loop, on raw non-blocking sockets
(no asyncio transports, so that the two fds can go to the relay engine as they are).  After a
valid 101 the sockets are detached and handed to the engine together with the bytes already read
past each head; Python hears of the tunnel again only when it closes.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote

from . import _http, http1, tls
from .config import LocationConfig, ServerBlock, Template
from .handshake import (HeadError, RequestHead, RequestReader, ResponseHead, ResponseReader,
                        check_websocket_request, check_websocket_response, websocket_accept)
from .router import host_name

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("fastws")

REASONS = {
    200: "OK", 301: "Moved Permanently", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
    405: "Not Allowed", 408: "Request Timeout", 413: "Payload Too Large", 414: "URI Too Long",
    426: "Upgrade Required", 431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable", 504: "Gateway Timeout", 505: "HTTP Version Not Supported",
}

# Answers lingered over for this long (reading and dropping what the client still sends) before
# the socket closes, so a close with unread input does not reset the connection and destroy the
# answer in flight (nginx's lingering_close).
LINGER_TIMEOUT = 2.0
RECV_SIZE = 65536


def error_response(status: int, *, extra: bytes = b"") -> bytes:
    reason = REASONS.get(status, "Error")
    body = f"<html><head><title>{status} {reason}</title></head><body><h1>{status} {reason}</h1>" \
           f"<hr>fastws</body></html>\r\n".encode()
    return (f"HTTP/1.1 {status} {reason}\r\nServer: fastws\r\nContent-Type: text/html\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode() + extra + b"\r\n" + body


class TunnelRecord:
    """What a tunnel keeps in Python while it lives: enough for the log line and the accounting
    when it closes, and nothing more (no head, no buffers)."""

    __slots__ = ("upstream", "peer", "remote_addr", "request", "started", "connect_time",
                 "header_time", "head_bytes_in", "head_bytes_out", "log")

    def __init__(self, upstream: Any, peer: Any, remote_addr: str, request: bytes,
                 started: float, connect_time: float, header_time: float,
                 head_bytes_in: int, head_bytes_out: int) -> None:
        self.upstream = upstream
        self.peer = peer
        self.remote_addr = remote_addr
        self.request = request
        self.started = started
        self.connect_time = connect_time
        self.header_time = header_time
        self.head_bytes_in = head_bytes_in
        self.head_bytes_out = head_bytes_out
        self.log: Any = None   # (access log, the request's rendered variables), set by the worker


class Variables:
    """nginx variables for one request, for set_headers values and hash keys."""

    __slots__ = ("conn", "head", "remote_addr")

    def __init__(self, conn: "ClientConn", head: RequestHead) -> None:
        self.conn = conn
        self.head = head
        self.remote_addr = conn.remote_addr

    def variable(self, name: str) -> str:
        conn, head = self.conn, self.head
        if name == "remote_addr":
            return conn.remote_addr
        if name == "host":
            return conn.host or (conn.server.server_name[0] if conn.server.server_name else "")
        if name == "scheme":
            return conn.listener.scheme
        if name == "request_uri":
            return head.target.decode("latin-1")
        if name == "uri":
            return unquote(head.target.split(b"?", 1)[0].decode("latin-1"))
        if name in ("args", "query_string"):
            return head.target.partition(b"?")[2].decode("latin-1")
        if name == "request_method":
            return head.method.decode("latin-1")
        if name == "remote_port":
            return str(conn.remote_port)
        if name == "server_addr":
            return conn.listener.address.host
        if name == "server_port":
            return str(conn.listener.address.port)
        if name == "server_name":
            return conn.server.server_name[0] if conn.server.server_name else ""
        if name == "proxy_add_x_forwarded_for":
            xff = head.get(b"x-forwarded-for")
            return f"{xff.decode('latin-1')}, {conn.remote_addr}" if xff else conn.remote_addr
        if name == "proxy_host":
            return conn.location.proxy_pass or ""
        if name == "connection_upgrade":
            return "upgrade" if head.get(b"upgrade") else "close"
        if name.startswith("http_"):
            value = head.get(name[5:].replace("_", "-").encode())
            return value.decode("latin-1") if value is not None else ""
        if name.startswith("arg_"):
            for k, v in parse_qsl(head.target.partition(b"?")[2].decode("latin-1"),
                                  keep_blank_values=True):
                if k == name[4:]:
                    return v
            return ""
        if name.startswith("cookie_"):
            for cookie in (head.get(b"cookie") or b"").split(b";"):
                k, _, v = cookie.strip().partition(b"=")
                if k.decode("latin-1") == name[7:]:
                    return v.decode("latin-1")
            return ""
        return ""

    def render(self, template: Template) -> str:
        return "".join(self.variable(p) if is_var else p for is_var, p in template.parts)


class ClientConn:
    """One client connection until it becomes a tunnel, or gets its answer and closes."""

    __slots__ = ("w", "loop", "listener", "sock", "fd", "remote_addr", "remote_port", "reader",
                 "timer", "server", "location", "host", "head", "started", "upstream", "selection",
                 "peer", "usock", "ufd", "to_upstream", "rreader", "token", "key", "tries",
                 "t_connect", "t_connected", "deadline", "out", "closed", "state", "response",
                 "upgrading", "remaining", "eof_delimited", "timed_out", "held", "record",
                 "number", "status", "sent", "head_sent", "exchange", "nreq", "ktimer",
                 "ktimer_at", "t_state", "ka_timeout", "pipelined", "peer_closed", "reader_off")

    def __init__(self, worker: "Worker", listener: Any, sock: socket.socket, addr: Any) -> None:
        self.w = worker
        self.loop = worker.loop
        self.listener = listener
        self.sock = sock
        self.fd = sock.fileno()
        if listener.family == socket.AF_INET6:
            self.remote_addr, self.remote_port = addr[0], addr[1]
            if self.remote_addr.startswith("::ffff:"):
                self.remote_addr = self.remote_addr[7:]
        else:
            self.remote_addr, self.remote_port = addr
        self.started = time.monotonic()
        self.closed = False
        self.usock: socket.socket | None = None
        self.ufd = -1
        self.timer: Any = None
        self.out = b""
        self.state = "head"
        self.server: ServerBlock = listener.default_server
        self.location: LocationConfig | None = None
        self.host = ""
        self.peer: Any = None
        self.selection: Any = None
        self.upstream: Any = None
        self.response: ResponseHead | None = None
        self.timed_out = False
        self.held = False          # the peer counts this connection (released when it ends)
        self.number = 0            # $connection, set by the worker
        self.status = 0            # the status answered, and bytes sent to the client (access log)
        self.sent = self.head_sent = 0
        self.exchange: http1.Exchange | None = None   # a plain request in progress
        self.nreq = 0
        self.pipelined = b""       # read while an exchange was in progress
        self.peer_closed = False
        self.reader_off = False
        self.ka_timeout = 0.0
        self.ktimer: Any = None
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = RequestReader(self.server.max_request_line, self.server.max_request_head)

    def start(self) -> None:
        if self.listener.tls is not None:
            self.listener.tls.accept(self)     # reading starts once the handshake is done
        else:
            self._start_reading()

    def _start_reading(self) -> None:
        self.loop.add_reader(self.fd, self._on_client_head)
        # The head and keep-alive timer is not re-made per request: it is armed once and, when
        # it fires, checks the deadline of the state the connection is in then.
        self.t_state = self.loop.time()
        self.ktimer_at = self.t_state + self.server.client_header_timeout
        self.ktimer = self.loop.call_at(self.ktimer_at, self._on_ktimer)
        # The listener defers accept until the client has sent something (TCP_DEFER_ACCEPT), so
        # the head is usually here already: read it now rather than after a poll.
        self._on_client_head()

    # --- reading the request ---------------------------------------------------------------

    def _on_client_head(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        state = self.state
        if self.exchange is not None:
            # The client reader stays registered while an exchange runs (no epoll change per
            # request): what comes meanwhile is the next request, kept for later.
            if not data:
                self.peer_closed = True
                self.loop.remove_reader(self.fd)
                return
            self.pipelined += data
            if len(self.pipelined) > self.server.max_request_head:
                self.loop.remove_reader(self.fd)
                self.reader_off = True
            return
        if not data:
            self._close()
            return
        if state == "idle":
            # the next request on a kept-alive connection begins: its head is timed from now
            self.state = "head"
            self._time_state(self.server.client_header_timeout)
        self._feed_head(data)

    def _time_state(self, timeout: float) -> None:
        now = self.t_state = self.loop.time()
        self.arm_at(now + timeout)

    def arm_at(self, at: float) -> None:
        """Make sure the connection's timer fires by `at` (it may fire earlier: whoever it
        serves then checks its own deadline)."""
        if self.ktimer is None:
            self.ktimer_at = at
            self.ktimer = self.loop.call_at(at, self._on_ktimer)
        elif at < self.ktimer_at:
            self.ktimer.cancel()
            self.ktimer_at = at
            self.ktimer = self.loop.call_at(at, self._on_ktimer)

    def _on_ktimer(self) -> None:
        self.ktimer = None
        state = self.state
        if self.exchange is not None:
            # the exchange acts on its own deadlines, or says when to look again
            limit = self.exchange.on_timer()
            if limit is not None:
                self.ktimer_at = limit
                self.ktimer = self.loop.call_at(limit, self._on_ktimer)
            return
        if state == "idle":
            limit = self.t_state + self.ka_timeout
        elif state == "head":
            limit = self.t_state + self.server.client_header_timeout
        else:
            return
        if self.loop.time() >= limit:
            if state == "idle":
                self._close()
            else:
                self._fail(408, "client sent no complete head in time")
            return
        self.ktimer_at = limit
        self.ktimer = self.loop.call_at(limit, self._on_ktimer)

    def _feed_head(self, data: bytes) -> None:
        try:
            head = self.reader.feed(data)
        except HeadError as exc:
            self._fail(exc.status, exc.reason)
            return
        if head is None:
            return
        self.state = "dispatch"
        self.head = head
        self.nreq += 1
        self.w.stats.requests += 1
        try:
            self._dispatch(head)
        except HeadError as exc:
            self._fail(exc.status, exc.reason)

    def _dispatch(self, head: RequestHead) -> None:
        self.host = host_name(head.get(b"host"))
        self.server = self.w.router.server(self.listener.key, self.host)
        if self.server.redirect_https:
            port = self.server.redirect_https
            url = b"https://%s%s%s" % ((self.host or self.listener.address.host).encode("idna"),
                                       b"" if port == 443 else b":%d" % port, head.target)
            self._fail(301, "redirect to https", b"Location: " + url + b"\r\n")
            return
        path = head.target.split(b"?", 1)[0]
        if not path.startswith(b"/"):
            raise HeadError(400, "the request target is not an absolute path")
        path_text = path.decode("latin-1")
        loc = self.w.router.location(self.server,
                                     unquote(path_text) if "%" in path_text else path_text)
        if loc is None:
            raise HeadError(404, "no location matches")
        self.location = loc
        upgrade = head.get(b"upgrade")
        if loc.proxy_pass is None or loc.websocket and upgrade is not None:
            # only a plain exchange keeps reading the client while the upstream answers
            self.loop.remove_reader(self.fd)
        if loc.return_status is not None:
            self._answer(loc.return_status, loc.return_body.encode())
            return
        if loc.status is not None:
            ctype, body = self.w.status_page(loc.status)
            self._answer(200, body, ctype)
            return
        self.upgrading = False
        if upgrade is not None and b"upgrade" in head.tokens(b"connection"):
            token = upgrade.strip().lower()
            if loc.websocket and token.decode("latin-1") in loc.upgrade_tokens:
                self.key = check_websocket_request(head)
                self.token = token
                self.upgrading = True
            # Any other token (h2c, or websocket where the location forbids it) is served as a
            # plain request: the Upgrade header is hop-by-hop and is not passed on.
        self.upstream = self.w.upstreams[loc.proxy_pass]
        if not self.upgrading:
            if upgrade is not None and loc.websocket:
                self.loop.add_reader(self.fd, self._on_client_head)
            self.state = "exchange"
            ex = self.exchange = http1.Exchange(self, head, loc)
            ex.upstream = self.upstream
            ex.pool = http1.pool_for(self.w, self.upstream)
        self.to_upstream = self._build_request(head)
        self.selection = self.upstream.select(Variables(self, head))
        self.tries = 0
        self.deadline = (time.monotonic() + loc.next_upstream_timeout
                         if loc.next_upstream_timeout else 0.0)
        self._connect_next()

    def _build_request(self, head: RequestHead) -> bytes:
        loc = self.location
        assert loc is not None
        target = head.target
        if loc.proxy_uri is not None:
            # nginx: with a URI in proxy_pass, the part of the path the location matched is
            # replaced by it.
            path, q, query = target.partition(b"?")
            tail = b"" if loc.exact else path[len(loc.path):]
            target = loc.proxy_uri.encode() + tail + q + query
        xff = head.get(b"x-forwarded-for")
        remote = self.remote_addr.encode()
        first = [(b"Host", head.get(b"host") or self.host.encode() or (
            self.server.server_name[0] if self.server.server_name
            else self.listener.address.host).encode())]
        last = [
            (b"X-Real-IP", remote),
            (b"X-Forwarded-For", xff + b", " + remote if xff else remote),
            (b"X-Forwarded-Proto", self.listener.scheme.encode()),
        ]
        drop = [b"host", b"x-real-ip", b"x-forwarded-for", b"x-forwarded-proto"]
        drop.extend(t for t in head.tokens(b"connection") if t != b"upgrade")
        if loc.set_headers:
            values = Variables(self, head)
            for name, template in loc.set_headers:
                lname = name.lower().encode()
                drop.append(lname)
                first = [p for p in first if p[0].lower() != lname]
                last = [p for p in last if p[0].lower() != lname]
                if template is not None:
                    value = values.render(template).encode("latin-1", "replace")
                    if value:
                        (first if lname == b"host" else last).append((name.encode(), value))
        if self.upgrading:
            last.append((b"Upgrade", head.get(b"upgrade") or b"websocket"))
            last.append((b"Connection", b"upgrade"))
        else:
            # the proxy answers Expect itself; no Connection header at all toward a keep-alive
            # pool (the recipe's proxy_set_header Connection "")
            drop.append(b"expect")
            if self.exchange is None or self.exchange.pool is None:
                last.append((b"Connection", b"close"))
        line = b"%s %s HTTP/1.1" % (head.method, target)
        out = _http.build_head(line, head.headers, tuple(drop), first, last)
        if self.exchange is not None:
            self.exchange.req_head = out
        return out

    # --- connecting to the upstream --------------------------------------------------------

    def _connect_next(self) -> None:
        loc = self.location
        assert loc is not None
        if self.closed:
            return
        now = time.monotonic()
        if loc.next_upstream_tries and self.tries >= loc.next_upstream_tries or \
                self.deadline and self.tries and now >= self.deadline:
            self._fail(self._last_failure_status(), "no upstream left to try")
            return
        peer = self.selection.next()
        if peer is None:
            self._fail(self._last_failure_status(), "no live upstream")
            return
        self.tries += 1
        self.peer = peer
        self.t_connect = now
        if self.exchange is not None and self.exchange.reuse(peer):
            return
        try:
            usock = socket.socket(peer.family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            log.error("cannot open a socket for %s: %s", peer.name, exc)
            self._fail(502, "cannot open a socket")
            return
        if peer.family != socket.AF_UNIX:
            usock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if loc.socket_keepalive:
            usock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.usock = usock
        self.ufd = usock.fileno()
        err = usock.connect_ex(peer.sockaddr)
        if err in (0, errno.EINPROGRESS) and self.upgrading and self.listener.tls is None \
                and self.w.tls.for_location(loc) is None:
            self._engine_handshake()
        elif err == errno.EINPROGRESS:
            self.state = "connect"
            self.loop.add_writer(self.ufd, self._on_connected)
            self.timer = self.loop.call_later(loc.connect_timeout, self._on_connect_timeout)
        elif err == 0:
            self.state = "connect"
            self._on_connected()
        else:
            self._upstream_failed(f"connect() to {peer.name} failed ({err}: {os.strerror(err)}) "
                                  "while connecting to upstream", timeout=False)

    # --- the upstream half of a plain WebSocket handshake, in the engine ---------------------

    def _engine_handshake(self) -> None:
        # The engine waits for the connect, sends the head and checks the 101 itself; this
        # object hears back once: engine_opened() (a tunnel now), or engine_returned() (the
        # sockets, for Python to decide: next server, an ordinary answer, or a 502).
        loc = self.location
        assert loc is not None and self.usock is not None
        self.selection.connected(self.peer)
        self.record = TunnelRecord(self.upstream, self.peer, self.remote_addr,
                                   self.head.request_line, self.started, 0.0, 0.0,
                                   self.head.size, 0)
        cfd = self.sock.detach()
        ufd = self.usock.detach()
        self.usock = None
        self.ufd = -1
        self.state = "tunnel"       # the engine has it: no access log line from here
        if self.ktimer is not None:
            self.ktimer.cancel()
            self.ktimer = None
        self.w.connection_closed(self, handshaking=True)
        self.w.engine.handshake(cfd, ufd, self.to_upstream, self.head.leftover,
                                websocket_accept(self.key), self.token, loc.connect_timeout,
                                loc.read_timeout, loc.read_timeout, loc.send_timeout, loc.relay,
                                self.record, self)
        self.w.engine_kick()

    def engine_opened(self, connect_time: float, header_time: float, head_len: int) -> None:
        record = self.record
        record.connect_time = connect_time
        record.header_time = header_time
        record.head_bytes_out = head_len
        self.closed = True
        self.selection = None      # its context refers back to this object: let both go now
        self.w.handshake_settled(self)
        self.w.tunnel_opened(record, self)

    def engine_returned(self, cfd: int, ufd: int, reason: str, data: bytes, err: int) -> None:
        self.w.handshake_settled(self)
        if reason == "shutdown":            # closed by the engine's stop()
            self.upstream.release(self.peer)
            self.closed = True
            return
        self.sock = socket.socket(self.listener.family, socket.SOCK_STREAM, fileno=cfd)
        self.sock.setblocking(False)
        self.fd = cfd
        self.usock = socket.socket(self.peer.family, socket.SOCK_STREAM, fileno=ufd)
        self.usock.setblocking(False)
        self.ufd = ufd
        self.held = True
        self.w.connection_reopened(self)
        self.t_connected = self.t_connect
        if reason == "response":
            self.state = "response"
            self.rreader = ResponseReader()
            self.timer = self.loop.call_later(self.location.read_timeout, self._on_read_timeout)
            self._on_response_data(data, polled=False)
            return
        why = {
            "connect_error": f"connect() failed ({err}: {os.strerror(err)}) while connecting to "
                             "upstream",
            "connect_timeout": "upstream timed out (110: Connection timed out) while connecting "
                               "to upstream",
            "header_timeout": "upstream timed out (110: Connection timed out) while reading "
                              "response header from upstream",
            "upstream_closed": "upstream prematurely closed connection while reading response "
                               "header from upstream" if not err else
                               f"recv() failed ({err}: {os.strerror(err)}) while reading "
                               "response header from upstream",
        }.get(reason, f"the relay engine failed ({reason}) while reading response header")
        self._upstream_failed(why, timeout=reason.endswith("timeout"))

    def _last_failure_status(self) -> int:
        return 504 if self.timed_out else 502

    def _drop_upstream(self) -> None:
        if self.exchange is not None:
            self.exchange.abort()
        if self.held:
            self.held = False
            self.upstream.release(self.peer)
        elif self.selection is not None:
            self.selection.abort()  # a connect in progress: neither a failure nor a live conn
        if self.usock is not None:
            self.loop.remove_writer(self.ufd)
            self.loop.remove_reader(self.ufd)
            self.usock.close()
            self.usock = None
            self.ufd = -1
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _upstream_failed(self, why: str, *, timeout: bool) -> None:
        # nginx's proxy_next_upstream "error timeout": a connect that fails or times out, or an
        # upstream that fails before its response head is complete, counts against the server
        # and the next one is tried.  Only the handshake's GET gets here after its head was sent.
        log.error("%s, client: %s, upstream: %s", why, self.remote_addr, self.peer.name)
        self.timed_out = timeout
        peer = self.peer
        if self.held:
            self.held = False
            self.upstream.release(peer)
        self.selection.failed(peer)
        self.peer = None
        self._drop_upstream()
        self._connect_next()

    def _on_connect_timeout(self) -> None:
        self.timer = None
        self._upstream_failed("upstream timed out (110: Connection timed out) while connecting to "
                              "upstream", timeout=True)

    def _on_connected(self) -> None:
        assert self.usock is not None
        err = self.usock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._upstream_failed(f"connect() failed ({err}: {os.strerror(err)}) while connecting "
                                  "to upstream", timeout=False)
            return
        if self.timer is not None:
            # the writer stays registered until the reader replaces it: uvloop then keeps the
            # fd's poll handle instead of making a new one (which costs three system calls)
            self.timer.cancel()
            self.timer = None
        assert self.location is not None
        upstream_tls = self.w.tls.for_location(self.location)
        if upstream_tls is not None:
            self.loop.remove_writer(self.ufd)
            upstream_tls.connect(self, self.location.connect_timeout)
            return
        self._upstream_ready()

    def _upstream_ready(self) -> None:
        self.t_connected = time.monotonic()
        self.selection.connected(self.peer)
        if self.exchange is not None:
            self.loop.remove_writer(self.ufd)      # kept registered by _on_connected
            usock, self.usock, self.ufd, self.timer = self.usock, None, -1, None
            self.state = "exchange"
            self.exchange.connected(usock, self.peer)
            return
        self.held = True
        self.state = "send"
        # The head is kept in to_upstream for a retry on the next server.  Not a tunnel: what
        # followed the head (a body) goes straight after it; a tunnel gets it after the 101.
        self.out = self.to_upstream if self.upgrading else self.to_upstream + self.head.leftover
        self.rreader = ResponseReader()
        self.timer = self.loop.call_later(self.location.read_timeout, self._on_read_timeout)
        self._send_upstream()

    def _send_upstream(self) -> None:
        try:
            n = self.usock.send(self.out)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            self._bad_gateway(f"sending the request failed: {exc}")
            return
        self.out = self.out[n:]
        if self.out:
            self.loop.add_writer(self.ufd, self._send_upstream_more)
            return
        self.state = "response"
        self.loop.add_reader(self.ufd, self._on_upstream_head)
        self.loop.remove_writer(self.ufd)

    def _send_upstream_more(self) -> None:
        self._send_upstream()

    def _on_read_timeout(self) -> None:
        self.timer = None
        if self.state == "response" and self.upgrading:
            self._upstream_failed("upstream timed out (110: Connection timed out) while reading "
                                  "response header from upstream", timeout=True)
            return
        log.error("upstream timed out (110: Connection timed out) while sending request to "
                  "upstream, client: %s, upstream: %s", self.remote_addr, self.peer.name)
        self._fail(504, "upstream send timeout")

    # --- the upstream's answer -------------------------------------------------------------

    def _on_upstream_head(self) -> None:
        try:
            data = self.usock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._upstream_failed(f"recv() failed ({exc.errno}: {exc.strerror}) while reading "
                                  "response header from upstream", timeout=False)
            return
        if not data:
            self._upstream_failed("upstream prematurely closed connection while reading response "
                                  "header from upstream", timeout=False)
            return
        self._on_response_data(data, polled=True)

    def _on_response_data(self, data: bytes, *, polled: bool) -> None:
        try:
            resp = self.rreader.feed(data)
        except HeadError as exc:
            self._bad_gateway(f"upstream sent an invalid head: {exc.reason}")
            return
        if resp is None:
            if not polled:
                self.loop.add_reader(self.ufd, self._on_upstream_head)
            return
        if polled:
            self.loop.remove_reader(self.ufd)
        self.response = resp
        if resp.status == 101:
            why = check_websocket_response(resp, self.token, self.key)
            if why is not None:
                self._bad_gateway(f"upstream {why}; not tunnelled")
                return
            self._start_tunnel(resp)
            return
        # Any other answer is an ordinary response: relay it, then close the client connection,
        # which is never tunnelled (a tunnel opened on a non-101 would let a client smuggle
        # requests to the upstream).
        self._relay_response(resp)

    def _start_tunnel(self, resp: ResponseHead) -> None:
        now = time.monotonic()
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        loc = self.location
        assert loc is not None and self.usock is not None
        record = TunnelRecord(self.upstream, self.peer, self.remote_addr,
                              self.head.request_line, self.started,
                              self.t_connected - self.t_connect, now - self.t_connect,
                              self.head.size, len(resp.raw))
        to_client = resp.raw + resp.leftover
        self.held = False          # released by the worker when the tunnel closes
        cssl, ussl = tls.sslobj(self.sock), tls.sslobj(self.usock)
        if self.ktimer is not None:
            self.ktimer.cancel()
            self.ktimer = None
        cfd = self.sock.detach()
        ufd = self.usock.detach()
        self.usock = None
        self.closed = True
        self.state = "tunnel"
        self.w.connection_closed(self)
        self.w.engine.add(cfd, ufd, self.head.leftover, to_client, loc.read_timeout,
                          loc.send_timeout, loc.relay, record, cssl, ussl)
        self.w.engine_kick()
        self.w.tunnel_opened(record, self)

    def _bad_gateway(self, why: str) -> None:
        log.error("%s, client: %s, upstream: %s", why, self.remote_addr,
                  self.peer.name if self.peer else "-")
        self._fail(502, why)

    # --- relaying an ordinary answer, then closing -----------------------------------------

    def _relay_response(self, resp: ResponseHead) -> None:
        # Hop-by-hop headers of the upstream are dropped; the client connection closes after it.
        first_line = b"HTTP/1.1 %d %s" % (resp.status, resp.reason)
        drop = tuple(t for t in resp.tokens(b"connection"))
        head = _http.build_head(first_line, resp.headers, drop, [], [(b"Connection", b"close")])
        self.status, self.head_sent = resp.status, len(head)
        body = resp.leftover
        if resp.status in (204, 304) or 100 <= resp.status < 200 or self.head.method == b"HEAD":
            self.remaining = 0
        elif resp.content_length is not None:
            self.remaining = resp.content_length
        else:
            self.remaining = -1   # chunked or close-delimited: relayed until the upstream closes
        self.eof_delimited = self.remaining < 0
        if self.remaining >= 0:
            body = body[:self.remaining]
            self.remaining -= len(body)
        self.state = "relay"
        self._client_write(head + body)
        if self.remaining == 0:
            self._finish_relay()
        else:
            self.loop.add_reader(self.ufd, self._on_upstream_body)

    def _on_upstream_body(self) -> None:
        try:
            data = self.usock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if not self.eof_delimited:
                log.error("upstream prematurely closed connection while sending response")
            self._finish_relay()
            return
        if self.remaining > 0:
            data = data[:self.remaining]
            self.remaining -= len(data)
        self._client_write(data)
        if self.remaining == 0:
            self._finish_relay()
        elif self.out:
            # the client is slower: stop reading the upstream until it has taken what is held
            self.loop.remove_reader(self.ufd)

    def _client_write(self, data: bytes) -> None:
        if self.out:
            self.out += data
            return
        try:
            n = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._close()
            return
        self.sent += n
        if n < len(data):
            self.out = data[n:]
            self.loop.add_writer(self.fd, self._client_write_more)

    def _client_write_more(self) -> None:
        try:
            n = self.sock.send(self.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close()
            return
        self.sent += n
        self.out = self.out[n:]
        if self.out:
            return
        self.loop.remove_writer(self.fd)
        if self.state == "linger-send":
            self._linger()
        elif self.state == "relay" and self.usock is not None:
            self.loop.add_reader(self.ufd, self._on_upstream_body)

    def _finish_relay(self) -> None:
        self._drop_upstream()
        if self.out:
            self.state = "linger-send"
        else:
            self._linger()

    # --- answering and closing -------------------------------------------------------------

    def _answer(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        reason = REASONS.get(status, "")
        head = (f"HTTP/1.1 {status} {reason}\r\nServer: fastws\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        self.status, self.head_sent = status, len(head)
        self.state = "linger-send"
        self._client_write(head + body)
        if not self.out and not self.closed:
            self._linger()

    def _fail(self, status: int, why: str, extra: bytes = b"") -> None:
        if self.closed:
            return
        if status >= 500 or status == 408:
            log.info("%d for %s: %s", status, self.remote_addr, why)
        self._drop_upstream()
        self.loop.remove_reader(self.fd)
        if status == 426:
            extra = b"Sec-WebSocket-Version: 13\r\n"
        self.state = "linger-send"
        self.out = b""
        answer = error_response(status, extra=extra)
        self.status, self.head_sent = status, answer.index(b"\r\n\r\n") + 4
        self._client_write(answer)
        if not self.out and not self.closed:
            self._linger()

    def _linger(self) -> None:
        if self.closed:
            return
        self.state = "linger"
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close()
            return
        self.loop.remove_reader(self.fd)
        self.loop.add_reader(self.fd, self._on_linger_read)
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_later(LINGER_TIMEOUT, self._close)

    def _on_linger_read(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close()

    # --- keep-alive ---------------------------------------------------------------------------

    def keepalive_ok(self, loc: LocationConfig) -> bool:
        """May the connection stay open after this request's response?"""
        return (loc.keepalive_timeout > 0 and self.nreq < loc.keepalive_requests
                and not self.w.stopping)

    def next_request(self, data: bytes, idle_timeout: float) -> None:
        """The exchange is over and the connection stays: wait for the next request (or read
        the one already received, pipelined)."""
        if self.peer_closed and not data and not self.pipelined:
            self._close()
            return
        self.head = None
        self.location = None
        self.peer = None
        self.selection = None
        self.server = self.listener.default_server
        self.reader = RequestReader(self.server.max_request_line, self.server.max_request_head)
        self.ka_timeout = idle_timeout
        if self.reader_off and not self.peer_closed:
            # (an exchange that read a body gave the reader back; only this case took it away)
            self.reader_off = False
            self.loop.add_reader(self.fd, self._on_client_head)
        if self.pipelined:
            data += self.pipelined
            self.pipelined = b""
        if data:
            self.state = "head"
            self._time_state(self.server.client_header_timeout)
            self._feed_head(data)
            return
        self.state = "idle"
        self._time_state(idle_timeout)

    def close_after_answer(self, data: bytes = b"") -> None:
        """The last answer is written (or `data` still is): close gracefully."""
        self.state = "linger-send"
        self.out = b""
        if data:
            self._client_write(data)
        if not self.out and not self.closed:
            self._linger()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.ktimer is not None:
            self.ktimer.cancel()
            self.ktimer = None
        self._drop_upstream()
        if self.sock.fileno() >= 0:
            self.loop.remove_reader(self.fd)
            self.loop.remove_writer(self.fd)
            self.sock.close()
        self.w.connection_closed(self)

    def abort(self) -> None:
        """Close now, whatever the state (worker shutdown)."""
        self._close()
