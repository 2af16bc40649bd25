"""httptools glue: request and response heads, read incrementally, checked strictly.

Each reader is fed bytes as they arrive.  It returns nothing until the head is complete, then a
head object whose `leftover` holds the bytes that followed the head: they belong to the body or,
after an upgrade, to the stream, and are delivered before anything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib

import httptools

# RFC 6455 section 1.3
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class HeadError(Exception):
    """A head that cannot be accepted; `status` is the answer to give (400, 414, 431...)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


_NONE: list[bytes] = []


class RequestHead:
    __slots__ = ("method", "target", "version", "headers", "leftover", "upgrade_offer",
                 "size", "keep_alive", "_index")
    _index: dict[bytes, list[bytes]] | None

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.leftover = b""
        self.upgrade_offer = False
        self.size = 0
        self.keep_alive = False
        self._index = None

    def values(self, lname: bytes) -> list[bytes]:
        """Every value of the header named `lname` (lower case), in order."""
        index = self._index
        if index is None:
            # built once per head: a request is asked about a dozen names on its way through
            index = self._index = {}
            for n, v in self.headers:
                n = n.lower()
                if n in index:
                    index[n].append(v)
                else:
                    index[n] = [v]
        return index.get(lname, _NONE)

    def get(self, lname: bytes) -> bytes | None:
        """The value of the header named `lname` (lower case); several are joined by ", "."""
        found = self.values(lname)
        if not found:
            return None
        return found[0] if len(found) == 1 else b", ".join(found)

    def count(self, lname: bytes) -> int:
        return len(self.values(lname))

    def tokens(self, lname: bytes) -> list[bytes]:
        """The comma-separated tokens of a header such as Connection, lower-cased."""
        value = self.get(lname)
        if not value:
            return []
        return [t.strip().lower() for t in value.split(b",") if t.strip()]

    @property
    def request_line(self) -> bytes:
        return b"%s %s HTTP/%s" % (self.method, self.target, self.version.encode())


class _Reader:
    __slots__ = ("_parser", "_buf", "_done", "_max_head", "_headers", "_url", "_name_parts")

    def __init__(self, max_head: int) -> None:
        self._buf = bytearray()
        self._done = False
        self._max_head = max_head
        self._headers: list[tuple[bytes, bytes]] = []
        self._url = b""

    # httptools callbacks
    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._done = True

    def _feed(self, data: bytes) -> int | None:
        """Feed bytes; once the head is complete, return the offset where it ends in the buffer.

        Only the head itself reaches the parser: what follows it (a body, a pipelined request,
        WebSocket frames) is left in the buffer untouched.
        """
        if not self._buf:
            # the usual case, a whole head in one read: no copy into the buffer
            end = data.find(b"\r\n\r\n")
            if 0 <= end <= self._max_head - 4:
                end += 4
                self._buf = data      # type: ignore[assignment]
                try:
                    self._parser.feed_data(data if end == len(data) else data[:end])
                except httptools.HttpParserUpgrade:
                    pass
                except httptools.HttpParserError as exc:
                    raise HeadError(400, f"malformed head: {exc}") from None
                if not self._done:
                    raise HeadError(400, "malformed head")
                return end
        start = len(self._buf)
        self._buf += data
        end = self._buf.find(b"\r\n\r\n", max(0, start - 3))
        if end >= 0:
            end += 4
            if end > self._max_head:
                raise HeadError(431, "head too large")
            data = bytes(self._buf[start:end])
        elif len(self._buf) > self._max_head:
            raise HeadError(431, "head too large")
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError as exc:
            raise HeadError(400, f"malformed head: {exc}") from None
        if end < 0:
            if self._done:
                raise HeadError(400, "malformed head")
            return None
        if not self._done:
            raise HeadError(400, "malformed head")
        return end


class RequestReader(_Reader):
    __slots__ = ("_max_line",)

    def __init__(self, max_line: int = 8192, max_head: int = 32768) -> None:
        super().__init__(max_head)
        self._max_line = max_line
        self._parser = httptools.HttpRequestParser(self)

    def feed(self, data: bytes) -> RequestHead | None:
        end = self._feed(data)
        if end is None:
            if len(self._buf) > self._max_line and b"\r\n" not in self._buf[:self._max_line + 2]:
                raise HeadError(414, "request line too long")
            return None
        line_end = self._buf.find(b"\r\n")
        if line_end > self._max_line:
            raise HeadError(414, "request line too long")
        head = RequestHead()
        p = self._parser
        head.method = p.get_method()
        head.target = self._url
        head.version = p.get_http_version()
        head.headers = self._headers
        head.upgrade_offer = p.should_upgrade()
        head.keep_alive = p.should_keep_alive()
        head.leftover = bytes(self._buf[end:])
        head.size = end
        # The parser holds bound methods of this reader: dropping it breaks the cycle, so that
        # both are freed at once rather than left to the cyclic garbage collector (which, once
        # per request and per response, was a large share of the CPU a request costs).
        self._parser = None
        _check_request(head)
        return head


def _check_request(head: RequestHead) -> None:
    # Refuse what would let a request be read two ways by the proxy and the upstream.
    if head.version not in ("1.0", "1.1"):
        raise HeadError(505 if head.version.startswith(("2", "3")) else 400,
                        f"HTTP/{head.version} is not supported")
    hosts = head.count(b"host")
    if hosts > 1:
        raise HeadError(400, "several Host headers")
    if hosts == 0 and head.version == "1.1":
        raise HeadError(400, "no Host header")
    cl = head.values(b"content-length")
    te = head.get(b"transfer-encoding")
    if cl and te is not None:
        raise HeadError(400, "both Content-Length and Transfer-Encoding")
    if len(set(cl)) > 1 or any(not v.strip().isdigit() for v in cl):
        raise HeadError(400, "bad Content-Length")
    for name, value in head.headers:
        if b"\r" in value or b"\n" in value or b"\x00" in value:
            raise HeadError(400, f"bad value in header {name.decode('latin-1')}")


class ResponseHead:
    __slots__ = ("status", "reason", "version", "headers", "leftover", "raw", "keep_alive",
                 "chunked", "content_length", "_index")
    _index: dict[bytes, list[bytes]] | None

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.version = ""
        self.headers: list[tuple[bytes, bytes]] = []
        self.leftover = b""
        self.raw = b""
        self.keep_alive = False
        self.chunked = False
        self.content_length: int | None = None
        self._index = None

    values = RequestHead.values
    get = RequestHead.get
    count = RequestHead.count
    tokens = RequestHead.tokens


class ResponseReader(_Reader):
    __slots__ = ("_reason",)

    def __init__(self, max_head: int = 32768) -> None:
        super().__init__(max_head)
        self._reason = b""
        self._parser = httptools.HttpResponseParser(self)

    def on_status(self, status: bytes) -> None:
        self._reason += status

    def feed(self, data: bytes) -> ResponseHead | None:
        end = self._feed(data)
        if end is None:
            return None
        head = ResponseHead()
        p = self._parser
        head.status = p.get_status_code()
        head.reason = self._reason
        head.version = p.get_http_version()
        head.headers = self._headers
        head.keep_alive = p.should_keep_alive()
        head.raw = bytes(self._buf[:end])
        head.leftover = bytes(self._buf[end:])
        self._parser = None         # see RequestReader.feed
        te = head.get(b"transfer-encoding")
        head.chunked = te is not None and te.lower().rstrip().endswith(b"chunked")
        cl = head.get(b"content-length")
        if cl is not None and not head.chunked:
            try:
                head.content_length = int(cl.split(b",")[0])
            except ValueError:
                raise HeadError(502, "bad Content-Length from the upstream") from None
        return head


def websocket_accept(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key: base64(SHA-1(key + GUID)) (RFC 6455 4.2.2)."""
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def check_websocket_request(head: RequestHead) -> bytes:
    """Check a client's opening handshake (RFC 6455 section 4.1); return its key.

    Raises HeadError with 400 (or 426 for a version other than 13) when it is not one.
    """
    if head.method != b"GET":
        raise HeadError(400, "a WebSocket handshake must be a GET")
    if head.version != "1.1":
        raise HeadError(400, "a WebSocket handshake needs HTTP/1.1")
    if head.get(b"content-length") not in (None, b"0") or head.get(b"transfer-encoding"):
        raise HeadError(400, "a WebSocket handshake has no body")
    version = head.get(b"sec-websocket-version")
    if version is None or version.strip() != b"13":
        raise HeadError(426, "Sec-WebSocket-Version must be 13")
    key = head.get(b"sec-websocket-key")
    if key is None or head.count(b"sec-websocket-key") != 1:
        raise HeadError(400, "missing Sec-WebSocket-Key")
    key = key.strip()
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error):
        raise HeadError(400, "Sec-WebSocket-Key is not 16 bytes in base64") from None
    return key


def check_websocket_response(head: ResponseHead, token: bytes, key: bytes) -> str | None:
    """None when a 101 completes the handshake for `key`; else why the tunnel is refused."""
    upgrade = head.tokens(b"upgrade")
    if upgrade != [token]:
        return f"101 with Upgrade {head.get(b'upgrade')!r}, expected {token.decode()!r}"
    if b"upgrade" not in head.tokens(b"connection"):
        return "101 without Connection: upgrade"
    accept = head.get(b"sec-websocket-accept")
    if accept is None or accept.strip() != websocket_accept(key):
        return "101 with a wrong Sec-WebSocket-Accept"
    return None
