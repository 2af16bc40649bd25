"""Plain HTTP/1.1 requests beside the tunnels: one request/response exchange at a time on a
kept-alive client connection, bodies streamed both ways, upstream connections pooled.

A ClientConn reads the request head and routes it; a request that is not a WebSocket upgrade
becomes an Exchange, which frames and streams the request body to the upstream, reads the
response head, frames and streams the response body back (nginx's `proxy_buffering off` and
`proxy_request_buffering off`), then either hands the client connection back to ClientConn for
the next request (keep-alive) or closes it.  Upstream connections are taken from and returned
to a per-worker Pool of each upstream group (nginx's `keepalive N` in an upstream block).

Framing is checked strictly so that the proxy and the upstream can never read a request two
ways: a chunked body is parsed here and passed on re-framed (its extensions and trailers
dropped), a Content-Length body is passed on byte for byte and never beyond its length.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
from typing import TYPE_CHECKING, Any

from . import _http
from .handshake import HeadError, RequestHead, ResponseHead, ResponseReader

if TYPE_CHECKING:
    from .balancer import Peer, Upstream
    from .config import LocationConfig
    from .proxy import ClientConn

log = logging.getLogger("fastws")

RECV_SIZE = 65536   # larger reads make CPython mmap and munmap a buffer per call
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# RFC 9110 section 9.2.2: a request that may be sent twice.
IDEMPOTENT = frozenset((b"GET", b"HEAD", b"PUT", b"DELETE", b"OPTIONS", b"TRACE"))

# response body framing
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = 0, 1, 2, 3

MAX_CHUNK_LINE = 4096
MAX_TRAILERS = 16384
_HEX = b"0123456789abcdefABCDEF"
_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_CHUNK_EXT = re.compile(rb"(?:[ \t]*;[ \t]*" + _TOKEN + rb"(?:[ \t]*=[ \t]*(?:" + _TOKEN +
                        rb"|\"(?:[^\"\\\x00-\x08\x0a-\x1f\x7f]|\\[\t\x20-\x7e\x80-\xff])*\"))?)*")
_FIELD_LINE = re.compile(_TOKEN + rb":[^\x00-\x08\x0a-\x1f\x7f]*")


class ChunkError(Exception):
    pass


class Chunked:
    """A strict reader of a chunked body.  feed() returns the bytes to pass on: the same chunks
    re-framed (`rechunk`), or the bare data; `done` once the last chunk and the trailer section
    are read, and `extra` then holds the bytes that followed."""

    __slots__ = ("state", "left", "pending", "rechunk", "done", "extra", "total", "trailers")

    def __init__(self, rechunk: bool) -> None:
        self.state = 0           # 0: size line, 1: data, 2: CRLF after data, 3: trailer lines
        self.left = 0
        self.pending = b""
        self.rechunk = rechunk
        self.done = False
        self.extra = b""
        self.total = 0           # data bytes read
        self.trailers = 0

    def feed(self, data: bytes) -> bytes:
        if self.pending:
            data = self.pending + data
            self.pending = b""
        out = []
        pos, n = 0, len(data)
        while pos < n:
            state = self.state
            if state == 1:
                take = min(self.left, n - pos)
                out.append(data[pos:pos + take] if take != n else data)
                pos += take
                self.left -= take
                self.total += take
                if self.left == 0:
                    self.state = 2
            elif state == 2:
                if n - pos < 2:
                    if data[pos] != 13:
                        raise ChunkError("no CRLF after chunk data")
                    self.pending = data[pos:]
                    break
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise ChunkError("no CRLF after chunk data")
                pos += 2
                self.state = 0
                if self.rechunk:
                    out.append(b"\r\n")
            else:
                end = data.find(b"\n", pos)
                if end < 0:
                    if n - pos > MAX_CHUNK_LINE:
                        raise ChunkError("chunk size line too long")
                    self.pending = data[pos:]
                    break
                if end == pos or data[end - 1] != 13:
                    raise ChunkError("bare LF in a chunk line")
                line = data[pos:end - 1]
                pos = end + 1
                if state == 0:
                    size, semi, ext = line.partition(b";")
                    if semi:
                        size = size.rstrip(b" \t")
                        if not _CHUNK_EXT.fullmatch(b";" + ext):
                            raise ChunkError("bad chunk extension")
                    if not size or len(size) > 15 or size.translate(None, _HEX):
                        raise ChunkError(f"bad chunk size {size[:20]!r}")
                    self.left = int(size, 16)
                    if self.left:
                        self.state = 1
                        if self.rechunk:
                            out.append(b"%x\r\n" % self.left)
                    else:
                        self.state = 3
                else:
                    if not line:
                        self.done = True
                        self.extra = data[pos:]
                        if self.rechunk:
                            out.append(b"0\r\n\r\n")
                        break
                    # Trailer fields are read, checked and dropped (as nginx does).
                    self.trailers += len(line) + 2
                    if self.trailers > MAX_TRAILERS or not _FIELD_LINE.fullmatch(line):
                        raise ChunkError("bad or too large trailer section")
        return b"".join(out)


class UpstreamConn:
    """An open connection to one upstream server, in use by an exchange or idle in a pool."""

    __slots__ = ("sock", "fd", "peer", "requests", "idle_since", "reused", "owner", "pool")

    def __init__(self, sock: socket.socket, peer: "Peer", pool: "Pool | None") -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.peer = peer
        self.pool = pool
        self.requests = 0
        self.idle_since = 0.0
        self.reused = False
        self.owner: Exchange | None = None

    def on_readable(self) -> None:
        # One reader stays registered for the connection's whole life, in use or idle: no
        # epoll change per request.
        owner = self.owner
        if owner is not None:
            owner._on_up_read()
        elif self.pool is not None:
            self.pool.idle_event(self)

    def close(self) -> None:
        self.sock.close()


class Pool:
    """Idle keep-alive connections to the servers of one upstream group, for one worker
    (ngx_http_upstream_keepalive_module: up to `keepalive` kept, least recently used closed
    first, each kept for `keepalive_timeout` and used for `keepalive_requests` requests)."""

    __slots__ = ("loop", "size", "timeout", "max_requests", "idle", "timer", "opened", "reused")

    def __init__(self, loop: Any, size: int, timeout: float, max_requests: int) -> None:
        self.loop = loop
        self.size = size
        self.timeout = timeout
        self.max_requests = max_requests
        self.idle: list[UpstreamConn] = []
        self.timer: Any = None
        self.opened = 0
        self.reused = 0

    def take(self, peer: "Peer") -> UpstreamConn | None:
        idle = self.idle
        for i in range(len(idle) - 1, -1, -1):
            uc = idle[i]
            if uc.peer is peer:
                del idle[i]
                self.reused += 1
                uc.reused = True
                return uc
        return None

    def put(self, uc: UpstreamConn) -> None:
        if uc.requests >= self.max_requests or self.timeout <= 0:
            self._drop(uc)
            return
        idle = self.idle
        if len(idle) >= self.size:
            self._drop(idle.pop(0))
        uc.idle_since = self.loop.time()
        idle.append(uc)
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._sweep)

    def _drop(self, uc: UpstreamConn) -> None:
        self.loop.remove_reader(uc.fd)
        uc.close()

    def idle_event(self, uc: UpstreamConn) -> None:
        """An idle connection became readable: the upstream closed it (or misbehaves)."""
        if uc in self.idle:
            self.idle.remove(uc)
        self._drop(uc)

    def _sweep(self) -> None:
        self.timer = None
        limit = self.loop.time() - self.timeout
        while self.idle and self.idle[0].idle_since <= limit:
            self._drop(self.idle.pop(0))
        if self.idle:
            self.timer = self.loop.call_later(
                max(0.01, self.idle[0].idle_since + self.timeout - self.loop.time()), self._sweep)

    def close(self) -> None:
        while self.idle:
            self._drop(self.idle.pop())
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def pool_for(worker: Any, upstream: "Upstream") -> Pool | None:
    pools = worker.http_pools
    try:
        return pools[upstream.name]
    except KeyError:
        cfg = upstream.config
        pool = Pool(worker.loop, cfg.keepalive, cfg.keepalive_timeout,
                    cfg.keepalive_requests) if cfg.keepalive else None
        pools[upstream.name] = pool
        return pool


def wants_keepalive(head: RequestHead | ResponseHead, tokens: Any = None) -> bool:
    """RFC 9112 section 9.3: HTTP/1.1 stays open unless "close"; HTTP/1.0 closes unless
    "keep-alive" (httptools' own answer is not settled until the whole message is read)."""
    if tokens is None:
        tokens = head.tokens(b"connection")
    if head.version == "1.1":
        return b"close" not in tokens
    return b"keep-alive" in tokens


def _content_length(head: RequestHead | ResponseHead) -> int | None:
    values = head.values(b"content-length")
    if not values:
        return None
    first = values[0].strip()
    if not first.isdigit() or len(first) > 18 or any(v.strip() != first for v in values):
        raise ValueError("bad Content-Length")
    return int(first)


class Exchange:
    """One request and its response on a client connection."""

    __slots__ = ("conn", "loop", "head", "loc", "csock", "cfd", "pool", "up", "held", "upstream",
                 "req_head", "req_first", "req_left", "req_dec", "body_done", "reading_body",
                 "stash", "up_out", "resp", "rreader", "mode", "left", "dec", "keep_client",
                 "resp_done", "cout", "t_up", "t_cl", "up_wsince", "cl_wsince", "retried", "max_body", "up_paused", "finished", "started", "peer", "up_keep",
                 "connecting")

    def __init__(self, conn: "ClientConn", head: RequestHead, loc: "LocationConfig") -> None:
        self.conn = conn
        self.loop = conn.loop
        self.head = head
        self.loc = loc
        self.csock = conn.sock
        self.cfd = conn.fd
        self.up: UpstreamConn | None = None
        self.peer: Any = None
        self.connecting = False
        self.held = False
        self.upstream: Any = None
        self.pool: Pool | None = None
        self.resp: ResponseHead | None = None
        self.up_keep = False
        self.rreader: ResponseReader | None = None
        self.mode = NO_BODY
        self.left = 0
        self.dec: Chunked | None = None
        self.resp_done = False
        self.finished = False
        self.started = False
        self.cout = b""
        self.up_out = b""
        self.up_wsince = 0.0
        self.cl_wsince = 0.0
        self.up_paused = False
        self.retried = False
        self.reading_body = False
        self.req_head = b""
        self.max_body = loc.client_max_body_size
        # request body framing (RFC 9112 section 6.3); the head's own checks already refused a
        # request with both Content-Length and Transfer-Encoding.
        self.req_dec = None
        leftover = head.leftover
        te = head.get(b"transfer-encoding")
        if te is not None:
            if head.version == "1.0":
                raise HeadError(400, "Transfer-Encoding in an HTTP/1.0 request")
            if te.strip().lower() != b"chunked":
                raise HeadError(400, f"unsupported Transfer-Encoding {te[:40]!r}")
            self.req_dec = Chunked(True)
            self.req_left = -1
        else:
            try:
                length = _content_length(head)
            except ValueError:
                raise HeadError(400, "bad Content-Length") from None
            self.req_left = length or 0
            if self.max_body and self.req_left > self.max_body:
                raise HeadError(413, f"body of {self.req_left} bytes is over client_max_body_size")
        has_body = self.req_left != 0
        expect = head.get(b"expect")
        if expect is not None and head.version == "1.1":
            if expect.strip().lower() != b"100-continue":
                raise HeadError(417, "unsupported Expect")
            # The proxy answers the expectation itself (nginx does too) and does not pass it on.
            if has_body and not leftover:
                try:
                    self.csock.send(CONTINUE)
                except OSError:
                    pass
        self.stash = b""
        if self.req_dec is not None:
            self.req_first = self._feed_chunked(leftover)
        elif self.req_left:
            self.req_first = leftover[:self.req_left]
            self.stash = leftover[self.req_left:]
            self.req_left -= len(self.req_first)
        else:
            self.req_first = b""
            self.stash = leftover
        self.body_done = self.req_left == 0
        if not self.body_done:
            # the body is read once the upstream can take it, not into the next request's head
            self.loop.remove_reader(self.cfd)
        now = self.loop.time()
        self.t_up = now
        self.t_cl = now

    def _feed_chunked(self, data: bytes) -> bytes:
        dec = self.req_dec
        assert dec is not None
        try:
            out = dec.feed(data)
        except ChunkError as exc:
            raise HeadError(400, f"bad chunked body: {exc}") from None
        if self.max_body and dec.total > self.max_body:
            raise HeadError(413, "chunked body over client_max_body_size")
        if dec.done:
            self.req_left = 0
            self.stash = dec.extra
        return out

    # --- the upstream connection ------------------------------------------------------------

    def reuse(self, peer: "Peer") -> bool:
        """Called once a peer is chosen: serve the request on an idle connection to it, if the
        pool has one."""
        if self.pool is None:
            return False
        uc = self.pool.take(peer)
        if uc is None:
            return False
        self.conn.selection.connected(peer)
        self._start(uc)
        return True

    def connected(self, sock: socket.socket, peer: "Peer") -> None:
        """A new connection to `peer` is established (the ClientConn connected it)."""
        if self.pool is not None:
            self.pool.opened += 1
        uc = UpstreamConn(sock, peer, self.pool)
        self.loop.add_reader(uc.fd, uc.on_readable)
        self._start(uc)

    def _start(self, uc: UpstreamConn) -> None:
        self.up = uc
        self.peer = uc.peer
        self.held = True
        self.started = True
        uc.requests += 1
        uc.owner = self
        self.rreader = ResponseReader()
        self.t_up = self.loop.time()
        self._arm(self.t_up + (self.loc.read_timeout if self.body_done
                               else self.loc.client_body_timeout))
        self._send_up(self.req_head + self.req_first)

    def _retryable(self) -> bool:
        # A reused connection the upstream had closed meanwhile: nothing of the answer came and
        # the whole request is still at hand, so it may go again once on a fresh connection.
        return (self.up is not None and self.up.reused and not self.retried and self.resp is None
                and self.rreader is not None and not self.rreader._buf
                and self.head.method in IDEMPOTENT and self.req_dec is None
                and self.body_done and not self.reading_body)

    def _retry(self) -> None:
        uc = self.up
        assert uc is not None
        self.retried = True
        self.loop.remove_reader(uc.fd)
        self.loop.remove_writer(uc.fd)
        uc.close()
        self.up = None
        peer = uc.peer
        try:
            sock = socket.socket(peer.family, socket.SOCK_STREAM)
        except OSError as exc:
            self._fail(502, f"cannot open a socket: {exc}")
            return
        sock.setblocking(False)
        if peer.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(peer.sockaddr)
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._fail(502, f"connect() to {peer.name} failed on retry")
            return
        self.up = UpstreamConn(sock, peer, self.pool)
        self.connecting = True
        self.t_up = self.loop.time()
        self.loop.add_writer(self.up.fd, self._on_retry_connected)
        self._arm(self.t_up + self.loc.connect_timeout)

    def _on_retry_connected(self) -> None:
        uc = self.up
        assert uc is not None
        self.connecting = False
        self.loop.remove_writer(uc.fd)
        err = uc.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(502, f"connect() to {uc.peer.name} failed on retry ({err})")
            return
        if self.pool is not None:
            self.pool.opened += 1
        self.up = None
        self.loop.add_reader(uc.fd, uc.on_readable)
        self._start(uc)

    # --- the request ------------------------------------------------------------------------

    def _send_up(self, data: bytes) -> None:
        uc = self.up
        assert uc is not None
        if self.up_out:
            self.up_out += data
            return
        try:
            n = uc.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError as exc:
            if self._retryable():
                self._retry()
                return
            self._up_error(f"sending the request failed: {exc}")
            return
        if n < len(data):
            self.up_out = data[n:]
            self.loop.add_writer(uc.fd, self._on_up_writable)
            if self.reading_body:
                self.loop.remove_reader(self.cfd)
            self.up_wsince = self.loop.time()
            self._arm(self.up_wsince + self.loc.send_timeout)
            return
        self._request_sent()

    def _on_up_writable(self) -> None:
        uc = self.up
        assert uc is not None
        try:
            n = uc.sock.send(self.up_out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._up_error(f"sending the request failed: {exc}")
            return
        self.up_out = self.up_out[n:]
        self.up_wsince = self.loop.time()
        if self.up_out:
            return
        self.loop.remove_writer(uc.fd)
        self.up_wsince = 0.0
        if self.reading_body:
            self.loop.add_reader(self.cfd, self._on_client_body)
        self._request_sent()

    def _request_sent(self) -> None:
        if self.body_done:
            if self.reading_body:
                self.reading_body = False
                self.loop.add_reader(self.cfd, self.conn._on_client_head)
            self.t_up = self.loop.time()
        elif not self.reading_body and not self.resp_done:
            self.reading_body = True
            self.t_cl = self.loop.time()
            self.loop.add_reader(self.cfd, self._on_client_body)

    def _on_client_body(self) -> None:
        try:
            data = self.csock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._client_gone("client prematurely closed connection while sending the body")
            return
        self.t_cl = self.loop.time()
        if self.req_dec is not None:
            try:
                out = self._feed_chunked(data)
            except HeadError as exc:
                self._fail(exc.status, exc.reason)
                return
        else:
            left = self.req_left
            if len(data) > left:
                self.stash = data[left:]
                data = data[:left]
            self.req_left = left - len(data)
            out = data
        if self.req_left == 0:
            self.body_done = True
        if out:
            self._send_up(out)
        elif self.body_done:
            self._request_sent()

    # --- the response -----------------------------------------------------------------------

    def _on_up_read(self) -> None:
        uc = self.up
        assert uc is not None
        try:
            data = uc.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if self.resp is None and self._retryable():
                self._retry()
                return
            data = b""
            why = str(exc)
        else:
            why = "upstream prematurely closed connection"
        self.t_up = self.loop.time()
        if self.resp is not None:
            if data:
                self._body(data)
            else:
                self._body_eof(why)
            return
        if not data:
            if self._retryable():
                self._retry()
                return
            self._up_error(f"{why} while reading response header from upstream")
            return
        rreader = self.rreader
        assert rreader is not None
        while True:
            try:
                resp = rreader.feed(data)
            except HeadError as exc:
                self._up_error(f"upstream sent an invalid header: {exc.reason}")
                return
            if resp is None:
                return
            if resp.status >= 200:
                break
            if resp.status == 101:
                self._up_error("upstream sent 101 to a request that asked for no upgrade")
                return
            # Interim 1xx answers (100 Continue, 103 Early Hints) are not passed on: the proxy
            # answered any Expect itself.
            rreader = self.rreader = ResponseReader()
            data = resp.leftover
            if not data:
                return
        self._respond(resp)

    def _respond(self, resp: ResponseHead) -> None:
        self.resp = resp
        head = self.head
        conn = self.conn
        status = resp.status
        tokens = resp.tokens(b"connection")
        self.up_keep = wants_keepalive(resp, tokens)
        drop: tuple[bytes, ...] = tuple(tokens)
        try:
            length = _content_length(resp)
        except ValueError:
            self._up_error("upstream sent an invalid Content-Length")
            return
        if head.method == b"HEAD" or status == 204 or status == 304:
            self.mode = NO_BODY
        elif resp.get(b"transfer-encoding") is not None:
            self.mode = CHUNKED if resp.chunked else UNTIL_CLOSE
            if length is not None:
                drop += (b"content-length",)       # RFC 9112 6.3: Transfer-Encoding wins
        elif length is not None:
            self.mode = LENGTH
            self.left = length
        else:
            self.mode = UNTIL_CLOSE
        keep = (wants_keepalive(head) and self.body_done and self.mode != UNTIL_CLOSE
                and conn.keepalive_ok(self.loc))
        if self.mode == CHUNKED:
            if head.version == "1.0":
                # An HTTP/1.0 client cannot read chunks: pass the bare data, ended by the close.
                self.dec = Chunked(False)
                drop += (b"transfer-encoding",)
                keep = False
            else:
                self.dec = Chunked(True)
        self.keep_client = keep
        if self.reading_body and not self.body_done:
            # The upstream answered before the body ended: the rest is not passed on.
            self.reading_body = False
            self.conn.peer_closed = True
            self.loop.remove_reader(self.cfd)
        out = _http.build_head(b"HTTP/1.1 %d %s" % (status, resp.reason), resp.headers, drop, [],
                               [(b"Connection", b"keep-alive" if keep else b"close")])
        if self.mode == NO_BODY:
            self._write_client(out)
            self._response_done(bool(resp.leftover))
            return
        self._body(resp.leftover, out)

    def _body(self, data: bytes, out: bytes = b"") -> None:
        mode = self.mode
        extra = False
        done = False
        if mode == LENGTH:
            left = self.left
            if len(data) >= left:
                extra = len(data) > left
                data = data[:left]
                done = True
            self.left = left - len(data)
        elif mode == CHUNKED:
            dec = self.dec
            assert dec is not None
            try:
                data = dec.feed(data)
            except ChunkError as exc:
                if out:
                    self.resp = None        # nothing was sent to the client yet
                    self._up_error(f"upstream sent an invalid chunked response: {exc}")
                else:
                    self._truncate(f"upstream sent an invalid chunked response: {exc}")
                return
            if dec.done:
                done = True
                extra = bool(dec.extra)
        elif mode == NO_BODY:
            done = True
            extra = bool(data)
            data = b""
        if out:
            data = out + data if data else out
        if data:
            self._write_client(data)
        if done:
            self._response_done(extra)

    def _body_eof(self, why: str) -> None:
        if self.mode == UNTIL_CLOSE:
            self._response_done(True)
            return
        self._truncate(f"{why} while sending the response to the client")

    def _response_done(self, broken: bool) -> None:
        """The response is complete; `broken` when the upstream connection cannot serve again."""
        self.resp_done = True
        uc = self.up
        self.up = None
        if uc is not None:
            uc.owner = None
            if (self.pool is not None and not broken and self.body_done and not self.up_out
                    and self.up_keep and self.mode != UNTIL_CLOSE):
                if self.up_paused:
                    self.up_paused = False
                    self.loop.add_reader(uc.fd, uc.on_readable)
                self.pool.put(uc)
            else:
                self.loop.remove_reader(uc.fd)
                self.loop.remove_writer(uc.fd)
                uc.close()
        self._release()
        if not self.body_done:
            self.keep_client = False
        if not self.cout:
            self._finish()

    def _release(self) -> None:
        if self.held:
            self.held = False
            self.upstream.release(self.peer)

    # --- writing to the client --------------------------------------------------------------

    def _write_client(self, data: bytes) -> None:
        if self.cout:
            self.cout += data
            return
        try:
            n = self.csock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._client_gone("client closed the connection while sending the response")
            return
        if n < len(data):
            self.cout = data[n:]
            self.loop.add_writer(self.cfd, self._on_client_writable)
            if self.up is not None and not self.up_paused:
                self.up_paused = True
                self.loop.remove_reader(self.up.fd)
            self.cl_wsince = self.loop.time()
            self._arm(self.cl_wsince + self.loc.send_timeout)

    def _on_client_writable(self) -> None:
        try:
            n = self.csock.send(self.cout)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._client_gone("client closed the connection while sending the response")
            return
        self.cout = self.cout[n:]
        self.cl_wsince = self.loop.time()
        if self.cout:
            return
        self.loop.remove_writer(self.cfd)
        self.cl_wsince = 0.0
        if self.resp_done:
            self._finish()
        elif self.up is not None and self.up_paused:
            self.up_paused = False
            self.t_up = self.loop.time()
            self.loop.add_reader(self.up.fd, self.up.on_readable)

    # --- timers -----------------------------------------------------------------------------

    def _arm(self, at: float) -> None:
        # The client connection's one timer serves the exchange too (see ClientConn.arm_at).
        self.conn.arm_at(at)

    def on_timer(self) -> float | None:
        """The connection's timer fired: act on an expired deadline (and return None), or return
        the next deadline."""
        now = self.loop.time()
        loc = self.loc
        deadline, what = float("inf"), ""
        if self.cl_wsince:
            deadline, what = self.cl_wsince + loc.send_timeout, "client send"
        elif self.up is not None and not self.up_paused and (self.body_done or self.resp):
            deadline, what = self.t_up + loc.read_timeout, "upstream read"
        if self.up_wsince and self.up_wsince + loc.send_timeout < deadline:
            deadline, what = self.up_wsince + loc.send_timeout, "upstream send"
        if self.reading_body and self.t_cl + loc.client_body_timeout < deadline:
            deadline, what = self.t_cl + loc.client_body_timeout, "client body"
        if self.connecting:
            deadline, what = self.t_up + loc.connect_timeout, "upstream connect"
        if deadline > now:
            return deadline if deadline != float("inf") else None
        if what == "client body":
            self._fail(408, "client timed out (110: Connection timed out) while reading the "
                       "request body")
        elif what == "client send":
            self._client_gone("client timed out (110: Connection timed out) while sending the "
                              "response")
        elif self.resp is None:
            self._up_error(f"upstream timed out (110: Connection timed out) ({what})",
                           status=504)
        else:
            self._truncate(f"upstream timed out (110: Connection timed out) ({what})")
        return None

    # --- endings ----------------------------------------------------------------------------

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        conn = self.conn
        conn.exchange = None
        if self.keep_client:
            conn.next_request(self.stash, self.loc.keepalive_timeout)
        else:
            conn.close_after_answer()

    def _drop_up(self) -> None:
        uc = self.up
        if uc is not None:
            self.loop.remove_reader(uc.fd)
            self.loop.remove_writer(uc.fd)
            self._release()
            uc.close()
            self.up = None
        else:
            self._release()

    def abort(self) -> None:
        """Let go of everything at once (the client connection is closing)."""
        if self.finished:
            return
        self.finished = True
        self._drop_up()
        if self.reading_body:
            self.loop.remove_reader(self.cfd)
        if self.cout:
            self.loop.remove_writer(self.cfd)
        self.conn.exchange = None

    def _up_error(self, why: str, status: int = 502) -> None:
        peer = self.up.peer.name if self.up is not None else "-"
        if self.resp is not None:
            self._truncate(why)
            return
        log.error("%s, client: %s, upstream: %s", why, self.conn.remote_addr, peer)
        self._fail(status, why)

    def _fail(self, status: int, why: str) -> None:
        """An error answer, if the response has not started; else the connection is cut."""
        if self.resp is not None:
            self._truncate(why)
            return
        self.abort()
        self.conn._fail(status, why)

    def _truncate(self, why: str) -> None:
        # The response has started: the client must see it end short (a close before the
        # announced length, or a chunked body without its last chunk), never as complete.
        log.error("%s, client: %s", why, self.conn.remote_addr)
        cout = self.cout
        self.abort()
        self.conn.close_after_answer(cout)

    def _client_gone(self, why: str) -> None:
        if log.isEnabledFor(logging.INFO):
            log.info("%s, client: %s", why, self.conn.remote_addr)
        self.abort()
        self.conn._close()


