"""Request and response heads: incremental parsing, strict checks, the WebSocket handshake."""

from __future__ import annotations

import pytest

from fastws._http import build_head
from fastws.handshake import (HeadError, RequestReader, ResponseReader, check_websocket_request,
                              check_websocket_response, websocket_accept)
from support import upgrade_request


def test_rfc6455_example_accept():
    assert websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def test_head_fed_one_byte_at_a_time_keeps_the_leftover():
    data = upgrade_request(key=b"dGhlIHNhbXBsZSBub25jZQ==") + b"\x81\x85early-frame"
    reader = RequestReader()
    head = None
    for i in range(len(data)):
        head = reader.feed(data[i:i + 1])
        if head is not None:
            head.leftover += data[i + 1:]
            break
    assert head is not None
    assert head.method == b"GET" and head.target == b"/ws"
    assert head.leftover == b"\x81\x85early-frame"
    assert check_websocket_request(head) == b"dGhlIHNhbXBsZSBub25jZQ=="


def test_pipelined_bytes_stay_out_of_the_parsed_head():
    data = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: y\r\n\r\n"
    head = RequestReader().feed(data)
    assert head.target == b"/a" and head.headers == [(b"Host", b"x")]
    assert head.leftover == b"GET /b HTTP/1.1\r\nHost: y\r\n\r\n"


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n", 400),           # obsolete line folding
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nHost : a\r\n\r\n", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40, 400),  # a TLS hello
])
def test_heads_that_could_be_read_two_ways_are_refused(raw, status):
    with pytest.raises(HeadError) as info:
        RequestReader().feed(raw)
    assert info.value.status == status


def test_limits():
    with pytest.raises(HeadError) as info:
        RequestReader(max_line=256, max_head=1024).feed(b"GET /" + b"x" * 300)
    assert info.value.status == 414
    reader = RequestReader(max_line=256, max_head=1024)
    reader.feed(b"GET / HTTP/1.1\r\n")
    with pytest.raises(HeadError) as info:
        reader.feed(b"X-Long: " + b"y" * 1100)
    assert info.value.status == 431


@pytest.mark.parametrize("extra, status", [
    ("Sec-WebSocket-Version: 8\r\n", 426),
    ("Sec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n", 400),   # two keys
    ("Content-Length: 5\r\n", 400),
])
def test_bad_websocket_handshakes(extra, status):
    raw = upgrade_request(extra=extra)
    if "Version: 8" in extra:
        raw = raw.replace(b"Sec-WebSocket-Version: 13\r\n", b"")
    head = RequestReader().feed(raw)
    with pytest.raises(HeadError) as info:
        check_websocket_request(head)
    assert info.value.status == status


def test_post_is_not_a_websocket_handshake():
    head = RequestReader().feed(upgrade_request().replace(b"GET", b"POST", 1))
    with pytest.raises(HeadError):
        check_websocket_request(head)


def response(accept: bytes, upgrade: bytes = b"websocket") -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: " + upgrade +
            b"\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n")


def test_101_checks():
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    good = ResponseReader().feed(response(websocket_accept(key)) + b"\x81\x02hi")
    assert good.status == 101 and good.leftover == b"\x81\x02hi"
    assert check_websocket_response(good, b"websocket", key) is None
    forged = ResponseReader().feed(response(b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", b"websocket"))
    assert "Accept" in check_websocket_response(forged, b"websocket", b"AAAAAAAAAAAAAAAAAAAAAA==")
    other = ResponseReader().feed(response(websocket_accept(key), b"h2c"))
    assert "Upgrade" in check_websocket_response(other, b"websocket", key)


def test_build_head_drops_hop_by_hop_and_named_headers_in_one_pass():
    headers = [(b"Host", b"a"), (b"Connection", b"keep-alive, X-Private"), (b"X-Private", b"1"),
               (b"keep-alive", b"300"), (b"TE", b"trailers"), (b"Upgrade", b"websocket"),
               (b"Proxy-Connection", b"close"), (b"Trailer", b"X"), (b"X-Kept", b"k  v"),
               (b"Cookie", b"c=1")]
    out = build_head(b"GET / HTTP/1.1", headers, (b"host", b"x-private"),
                     [(b"Host", b"b")], [(b"Connection", b"upgrade")])
    assert out == (b"GET / HTTP/1.1\r\nHost: b\r\nX-Kept: k  v\r\nCookie: c=1\r\n"
                   b"Connection: upgrade\r\n\r\n")
    assert build_head(b"HTTP/1.1 200 OK", [], (), [], []) == b"HTTP/1.1 200 OK\r\n\r\n"
