"""engine/frames.pxi's frame tracker (includes/wsframe.h) against frames the websockets
library writes: every message counted whatever the fragmentation, the control frames between
fragments and the cuts between reads; close codes found, masked or not; every violation of
RFC 6455's framing rules refused with 1002, an oversized message with 1009."""

from __future__ import annotations

import os

from hypothesis import given, settings, strategies as st
from websockets.frames import Close, Frame, Opcode

from fastws import _engine
from support import fuzz_examples


def wire(frames: list[Frame], client: bool) -> bytes:
    # clients mask (with a random key), servers do not: RFC 6455 5.1
    return b"".join(f.serialize(mask=client, extensions=[]) for f in frames)


def cuts(data: bytes, points: list[int]) -> list[bytes]:
    points = sorted({p % (len(data) + 1) for p in points})
    out, last = [], 0
    for p in points + [len(data)]:
        out.append(data[last:p])
        last = p
    return out


# lengths at and around the three encodings' limits (7-bit, 16-bit, 64-bit)
SIZES = st.one_of(st.integers(0, 130), st.sampled_from([125, 126, 127, 65535, 65536, 70000]))


@st.composite
def conversations(draw: st.DrawFn) -> tuple[list[Frame], int]:
    frames: list[Frame] = []
    messages = draw(st.integers(0, 6))
    for _ in range(messages):
        sizes = draw(st.lists(SIZES, min_size=1, max_size=4))      # the message's fragments
        opcode = draw(st.sampled_from([Opcode.TEXT, Opcode.BINARY]))
        for i, size in enumerate(sizes):
            data = b"a" * size if opcode == Opcode.TEXT else os.urandom(size)
            frames.append(Frame(opcode if i == 0 else Opcode.CONT, data, fin=i == len(sizes) - 1))
            if i < len(sizes) - 1 and draw(st.booleans()):
                # a control frame between two fragments, as 5.4 allows
                frames.append(Frame(draw(st.sampled_from([Opcode.PING, Opcode.PONG])),
                                    os.urandom(draw(st.integers(0, 125)))))
    return frames, messages


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(conversations(), st.booleans(), st.lists(st.integers(0, 1 << 20), max_size=8))
def test_every_message_is_counted_however_it_is_cut(conv, client, points) -> None:
    frames, messages = conv
    data = wire(frames, client)
    got = _engine.ws_frames(cuts(data, points), client)
    assert got["error"] is None
    assert (got["messages"], got["frames"]) == (messages, len(frames))
    assert got["boundary"] and not got["in_message"]


def test_a_close_code_is_found_split_at_every_byte() -> None:
    for client in (False, True):
        data = wire([Frame(Opcode.BINARY, b"x" * 300),
                     Frame(Opcode.CLOSE, Close(4001, "bye").serialize())], client)
        for i in range(len(data) + 1):
            got = _engine.ws_frames([data[:i], data[i:]], client)
            assert (got["close_code"], got["messages"], got["frames"]) == (4001, 1, 2), i
    empty = _engine.ws_frames([wire([Frame(Opcode.CLOSE, b"")], False)], False)
    assert empty["close_code"] == 1005                     # 7.1.5: no status code given


def test_what_breaks_the_framing_rules_is_refused() -> None:
    text = Frame(Opcode.TEXT, b"hi")
    bad = {
        "an unmasked client frame": (wire([text], False), True),
        "a masked upstream frame": (wire([text], True), False),
        "a reserved opcode": (bytes([0x83, 0x00]), False),
        "a fragmented ping": (bytes([0x09, 0x00]), False),
        "a ping over 125 bytes": (bytes([0x89, 0x7e, 0x00, 0x7e]) + b"p" * 126, False),
        "a continuation with no message": (bytes([0x80, 0x00]), False),
        "a new message inside one": (bytes([0x01, 0x01]) + b"a" + bytes([0x81, 0x00]), False),
        "a 64-bit length with its top bit": (bytes([0x82, 0x7f, 0x80]) + bytes(7), False),
    }
    for what, (data, client) in bad.items():
        assert _engine.ws_frames([data], client)["error"] == 1002, what


def test_a_message_over_the_limit_is_1009_even_in_fragments() -> None:
    frames = [Frame(Opcode.BINARY, b"a" * 600, fin=False), Frame(Opcode.CONT, b"b" * 600)]
    data = wire(frames, False)
    assert _engine.ws_frames([data], False, 1200)["error"] is None
    assert _engine.ws_frames([data], False, 1199)["error"] == 1009
    # the limit counts a message, not a frame: two messages of 1,000 are fine
    two = wire([Frame(Opcode.TEXT, b"a" * 1000), Frame(Opcode.TEXT, b"b" * 1000)], False)
    assert _engine.ws_frames([two], False, 1000)["messages"] == 2


def test_rsv_bits_of_extensions_pass() -> None:
    # permessage-deflate sets RSV1 on a compressed message's first frame: not the tracker's
    frame = bytes([0xC1, 0x03]) + b"abc"
    assert _engine.ws_frames([frame], False) == {
        "messages": 1, "frames": 1, "close_code": None, "error": None, "boundary": True,
        "in_message": False}
