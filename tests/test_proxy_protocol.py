"""engine/proxy.pxi's reader of PROXY protocol headers, v1 and v2, as properties: every valid
header is read back exactly, every proper prefix of one asks for more, and any bytes at all
give a header, a request for more, or a refusal (never a crash, never a length past the
bytes given)."""

from __future__ import annotations

import ipaddress
import socket
import struct

from hypothesis import given, settings, strategies as st

from fastws import _engine
from support import fuzz_examples

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"

ipv4 = st.builds(lambda n: str(ipaddress.IPv4Address(n)), st.integers(0, 2**32 - 1))
ipv6 = st.builds(lambda n: str(ipaddress.IPv6Address(n)), st.integers(0, 2**128 - 1))
ports = st.integers(0, 65535)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int], tuple[str, int]]:
    six = draw(st.booleans())
    src, dst = draw(ipv6 if six else ipv4), draw(ipv6 if six else ipv4)
    sport, dport = draw(ports), draw(ports)
    if draw(st.booleans()):
        data = f"PROXY TCP{6 if six else 4} {src} {dst} {sport} {dport}\r\n".encode()
    else:
        family = socket.AF_INET6 if six else socket.AF_INET
        body = socket.inet_pton(family, src) + socket.inet_pton(family, dst) + \
            struct.pack("!HH", sport, dport) + draw(st.binary(max_size=64))   # TLVs: skipped
        data = V2_SIG + bytes([0x21, 0x21 if six else 0x11]) + struct.pack("!H", len(body)) + body
    return data, (src, sport), (dst, dport)


@settings(max_examples=fuzz_examples(300), deadline=None)
@given(headers(), st.binary(max_size=32))
def test_a_valid_header_is_read_exactly_and_the_rest_is_left(header, rest) -> None:
    data, src, dst = header
    length, got_src, got_dst = _engine.proxy_header_parse(data + rest)
    assert length == len(data)
    # the same address, however it is written (glibc writes ::0.1.0.0 where Python ::1:0)
    assert [(ipaddress.ip_address(a), p) for a, p in (got_src, got_dst)] == \
        [(ipaddress.ip_address(a), p) for a, p in (src, dst)]
    for cut in range(len(data)):
        assert _engine.proxy_header_parse(data[:cut]) is None   # more bytes are needed


@settings(max_examples=fuzz_examples(1000), deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.builds(lambda b: b"PROXY " + b, st.binary(max_size=120)),
                 st.builds(lambda b: V2_SIG + b, st.binary(max_size=120))))
def test_any_bytes_are_a_header_a_wait_or_a_refusal(data: bytes) -> None:
    try:
        parsed = _engine.proxy_header_parse(data)
    except ValueError:
        return
    if parsed is None:
        # only a prefix of something that could still become a header waits for more
        assert len(data) < 16 + 4096
        assert data.startswith(V2_SIG[:len(data)]) or data.startswith(b"PROXY "[:len(data)])
        return
    length, src, dst = parsed
    assert 0 < length <= len(data)
    if data.startswith(b"PROXY "):
        assert data[length - 2:length] == b"\r\n" and length <= 107


def test_what_is_refused() -> None:
    for bad in (b"GET / HTTP/1.1\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", b"PROXY TCP4 ::1 ::2 1 2\r\n",
                b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
                b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", b"PROXY " + b"x" * 110,
                V2_SIG + b"\x22\x11\x00\x0c" + bytes(12),          # command 2
                V2_SIG + b"\x21\x41\x00\x0c" + bytes(12),          # family 4
                V2_SIG + b"\x21\x21\x00\x0c" + bytes(12),          # IPv6 in 12 bytes
                V2_SIG + b"\x21\x11\xff\xff"):                     # longer than 4 KiB
        try:
            parsed = _engine.proxy_header_parse(bad)
        except ValueError:
            continue
        raise AssertionError(f"{bad!r} read as {parsed}")
    assert _engine.proxy_header_parse(b"PROXY UNKNOWN\r\nGET") == (15, None, None)
    assert _engine.proxy_header_parse(V2_SIG + b"\x20\x00\x00\x00") == (16, None, None)
