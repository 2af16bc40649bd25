"""engine/frames.pxi's frame tracker (includes/wsframe.h) against frames the websockets
library writes, on both of the relay's paths (a copied read scanned, a spliced flow reading
each header from a tee of its pipe): every message counted whatever the fragmentation, the control frames between
fragments and the cuts between reads; every byte let through but the proxy's own pongs; close
codes found, masked or not; every violation of RFC 6455's framing rules refused with 1002, an
oversized message with 1009."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close, Frame, Opcode
from websockets.sync.client import connect

from conftest import ws_config
from fastws import _engine
from support import (EchoBackend, RawBackend, free_port, fuzz_examples, http_get,
                     raw_echo_handler, read_head, upgrade_request, wait_until, ws_frame,
                     ws_read_frame, ws_upgrade_handler)


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
    assert got["messages"] == messages
    assert got["boundary"] and not got["in_message"]
    assert got["passed"] == data                  # nothing kept back at the end, nothing lost
    walked = _engine.ws_frames_walk(data, client)
    assert (walked["messages"], walked["frames"], walked["boundary"]) == \
        (messages, len(frames), True)


@settings(max_examples=fuzz_examples(200), deadline=None)
@given(conversations(), st.booleans(), st.lists(st.integers(0, 1 << 20), max_size=8),
       st.lists(st.integers(0, 40), max_size=4))
def test_the_proxys_pongs_are_taken_out_and_nothing_else(conv, client, points, where) -> None:
    # the proxy's pongs (its ping's payload) between frames, cut anywhere: they, and only they,
    # go no further; a peer's own pong with another payload passes
    frames = list(conv[0])
    ours = Frame(Opcode.PONG, b"fastws:p")
    theirs = Frame(Opcode.PONG, b"fastws:q")
    for i, w in enumerate(sorted(where)):
        frames.insert(min(w, len(frames)), ours if i % 2 == 0 else theirs)
    serialized = [wire([f], client) for f in frames]     # (a client's mask is random)
    expected = b"".join(w for f, w in zip(frames, serialized) if f is not ours)
    got = _engine.ws_frames(cuts(b"".join(serialized), points), client, pong_due=True)
    assert got["error"] is None
    assert got["pongs"] == min(1, sum(f is ours for f in frames))   # one ping, one pong taken
    if sum(f is ours for f in frames) <= 1:
        assert got["passed"] == expected


def test_a_close_code_is_found_split_at_every_byte() -> None:
    for client in (False, True):
        data = wire([Frame(Opcode.BINARY, b"x" * 300),
                     Frame(Opcode.CLOSE, Close(4001, "bye").serialize())], client)
        for i in range(len(data) + 1):
            got = _engine.ws_frames([data[:i], data[i:]], client)
            assert (got["close_code"], got["messages"], got["passed"]) == (4001, 1, data), i
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
        assert _engine.ws_frames_walk(data, client)["error"] == 1002, what
        # what came before the bad frame went on; the bad frame did not
        good = wire([Frame(Opcode.TEXT, b"ok")], client)
        before = data[:3] if what == "a new message inside one" else b""
        assert _engine.ws_frames([good + data], client)["passed"] == good + before, what
    # frame_checks = false: masking and reserved opcodes are not the proxy's business
    assert _engine.ws_frames([wire([text], False)], True, checks=False)["error"] is None
    assert _engine.ws_frames([bytes([0x83, 0x00])], False, checks=False)["error"] is None


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
        "messages": 1, "close_code": None, "error": None, "boundary": True,
        "in_message": False, "passed": frame, "pongs": 0}


# --- end to end: real peers through fastws --------------------------------------------------

@pytest.fixture
def server() -> Any:
    """A websockets echo server of the test's own (it records how each connection closed)."""
    backend = EchoBackend()
    yield backend
    backend.close()


LOG_FORMAT = ("$tunnel $tunnel_close $ws_close_code $ws_close_reason $ws_closed_by "
              "$ws_messages_in $ws_messages_out $ws_pings")


def frames_config(tmp: Path, port: int, upstream: str, **location: Any) -> dict[str, Any]:
    config = ws_config(port, upstream, **location)
    config["log_format"] = {"ws": LOG_FORMAT}
    config["server"][0]["location"][0]["access_log"] = {"path": str(tmp / "ws.log"),
                                                        "format": "ws"}
    config["close_spread"] = "0s"
    config["server"][0]["location"].append({"path": "= /metrics", "status": "prometheus"})
    return config


def log_lines(tmp: Path, n: int) -> list[list[str]]:
    path = tmp / "ws.log"
    wait_until(lambda: path.exists() and len(path.read_text().splitlines()) >= n)
    return [line.split() for line in path.read_text().splitlines()]


def closed_with(ws: Any) -> tuple[int | None, str | None]:
    # what the client received: the proxy's (or the server's) close frame
    with pytest.raises(ConnectionClosed):
        while True:
            ws.recv(timeout=10)
    return ws.close_code, ws.close_reason


def over_the_limit(ws: Any, server: EchoBackend, limit: int) -> None:
    # a message at the limit goes through; one byte more closes both ways with 1009
    ws.send(b"a" * limit)
    assert ws.recv(timeout=10) == b"a" * limit
    ws.send(b"a" * (limit + 1))
    assert closed_with(ws) == (1009, "message too big")
    wait_until(lambda: server.closes)
    assert server.closes == [(1009, "message too big")]


def status(port: int) -> dict[str, Any]:
    code, body = http_get("127.0.0.1", port, "/status")
    assert code == 200
    return json.loads(body)["engine"]


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 1 << 20])
def test_messages_of_every_length_encoding_go_through(make_proxy, server, port, relay,
                                                      size) -> None:
    make_proxy(ws_config(port, server.address, relay=relay), port=port)
    with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, compression=None) as ws:
        payload = os.urandom(size)
        ws.send(payload)
        assert ws.recv(timeout=10) == payload
        ws.send([b"a" * size, b"b" * 7, b"c" * 126])      # one message, three fragments
        assert ws.recv(timeout=10) == b"a" * size + b"b" * 7 + b"c" * 126


@pytest.mark.parametrize("mode", ["copy", "splice"])
def test_pings_between_fragments_and_frames_cut_at_every_byte(make_proxy, server, port,
                                                              mode) -> None:
    # one message in three fragments with pings between them, written in two pieces cut at
    # every byte (with TCP_NODELAY, so that the proxy's reads mostly see the cut; the tracker's
    # own test cuts at every byte for certain); spliced, a cut header waits in the pipe's tail
    make_proxy(ws_config(port, server.address, relay=mode), port=port)
    stream = (ws_frame(b"frag1-", fin=False) + ws_frame(b"p1", opcode=9)
              + ws_frame(b"x" * 300, opcode=0, fin=False) + ws_frame(b"p2", opcode=9)
              + ws_frame(b"-end", opcode=0))
    for cut in range(len(stream) + 1):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(upgrade_request())
            head, rest = read_head(s)
            assert head.startswith(b"HTTP/1.1 101 ")
            s.sendall(stream[:cut])
            s.sendall(stream[cut:])
            got = []
            while len(got) < 3:
                opcode, payload, rest = ws_read_frame(s, rest)
                got.append((opcode, payload))
            # the server answered both pings and echoed the message whole
            assert got == [(10, b"p1"), (10, b"p2"), (1, b"frag1-" + b"x" * 300 + b"-end")], cut


def test_permessage_deflate_passes(make_proxy, port) -> None:
    backend = EchoBackend(compression="deflate")
    try:
        make_proxy(ws_config(port, backend.address, max_message_size="64k"), port=port)
        with connect(f"ws://127.0.0.1:{port}/ws", compression="deflate") as ws:
            assert ws.protocol.extensions           # negotiated end to end
            text = "compressible " * 2000           # 26 KB: under the limit once compressed
            ws.send(text)
            assert ws.recv(timeout=10) == text
    finally:
        backend.close()


def test_proxy_pings_keep_a_silent_tunnel_and_are_answered_in_the_proxy(
        make_proxy, server, tmp_path, port) -> None:
    make_proxy(frames_config(tmp_path, port, server.address, relay="auto",
                             ping_interval="100ms", ping_to="both", idle_timeout="2s",
                             read_timeout="2s"), port=port)
    with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, compression=None,
                 ping_interval=None) as ws:
        # both sides silent: pinged, both answer, and their pongs keep the tunnel open past
        # idle_timeout and read_timeout
        wait_until(lambda: status(port)["ws_pongs"] >= 30, timeout=20)
        # a 16 MB message in fragments while the silent upstream is pinged between them
        big = os.urandom(16 << 20)
        ws.send(big[i:i + (256 << 10)] for i in range(0, len(big), 256 << 10))
        assert ws.recv(timeout=30) == big
        ws.close()
    engine = status(port)
    assert engine["ws_pings"] >= engine["ws_pongs"] >= 30
    line = log_lines(tmp_path, 1)[-1]
    # (the server ends the TCP connection after the closing handshake: RFC 6455 7.1.1)
    assert line[:6] == ["close", "upstream", "1000", "normal", "client", "1"]
    assert line[6] == "1" and int(line[7]) >= 30


def _mute_client(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(upgrade_request())
    head, _ = read_head(s)
    assert head.startswith(b"HTTP/1.1 101 ")
    return s


def _read_close(s: socket.socket) -> tuple[int, bytes]:
    rest = b""
    while True:
        frame = ws_read_frame(s, rest)
        assert frame is not None, "closed without a close frame"
        opcode, payload, rest = frame
        if opcode == 8:
            return int.from_bytes(payload[:2], "big"), payload[2:]


def test_no_pong_closes_with_1011(make_proxy, server, tmp_path, port) -> None:
    make_proxy(frames_config(tmp_path, port, server.address, ping_interval="200ms",
                             ping_timeout="300ms"), port=port)
    with _mute_client(port) as s:
        # a client that never answers: it sees the ping, then the close
        opcode, payload, rest = ws_read_frame(s)
        assert (opcode, payload) == (9, b"fastws:p")
        assert _read_close(s) == (1011, b"ping timeout")
        s.sendall(ws_frame(b"\x03\xf3", opcode=8))     # its answer ends the handshake
        assert s.recv(10) == b""
    wait_until(lambda: server.closes)
    assert server.closes == [(1011, "ping timeout")]
    assert log_lines(tmp_path, 1)[-1][:5] == ["close", "ping_timeout", "1011", "internal_error",
                                              "proxy"]


def test_a_message_over_the_limit_closes_both_ways_with_1009(make_proxy, server,
                                                            tmp_path, port, relay) -> None:
    make_proxy(frames_config(tmp_path, port, server.address, max_message_size="100k",
                             relay=relay), port=port)
    with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, compression=None) as ws:
        over_the_limit(ws, server, 102_400)
    line = log_lines(tmp_path, 1)[-1]
    assert line[:7] == ["close", "message_too_big", "1009", "message_too_big", "proxy", "1", "1"]


def test_an_unmasked_client_frame_closes_both_ways_with_1002(make_proxy, server, port):
    make_proxy(ws_config(port, server.address), port=port)
    with _mute_client(port) as s:
        s.sendall(ws_frame(b"hello", mask=False))
        assert _read_close(s) == (1002, b"protocol error")
    wait_until(lambda: server.closes)
    assert server.closes == [(1002, "protocol error")]


def test_idle_timeout_closes_politely(make_proxy, server, tmp_path, port) -> None:
    make_proxy(frames_config(tmp_path, port, server.address, idle_timeout="300ms"),
               port=port)
    with connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None) as ws:
        assert closed_with(ws) == (1001, "idle timeout")
    wait_until(lambda: server.closes)
    assert server.closes == [(1001, "idle timeout")]
    assert log_lines(tmp_path, 1)[-1][:5] == ["close", "idle_timeout", "1001", "going_away",
                                              "proxy"]


def test_quit_closes_every_tunnel_with_1001_at_a_frame_boundary(make_proxy, server,
                                                               tmp_path, port) -> None:
    config = frames_config(tmp_path, port, server.address, relay="auto")
    config["close_spread"] = "300ms"
    proxy = make_proxy(config, port=port)
    clients = [connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None, max_size=None)
               for _ in range(5)]
    for ws in clients:
        ws.send("hi")
        assert ws.recv(timeout=10) == "hi"
    # one client is in the middle of a large message when the proxy closes: its close comes
    # after the whole echo, never inside it
    streamer = clients[0]
    big = os.urandom(8 << 20)
    sender = threading.Thread(target=streamer.send, args=(big,))
    sender.start()
    proxy.proc.send_signal(signal.SIGQUIT)
    sender.join(10)
    for ws in clients:
        received = []
        with pytest.raises(ConnectionClosed):
            while True:
                received.append(ws.recv(timeout=10))
        assert ws.close_code == 1001 and ws.close_reason == "server shutting down"
        if ws is streamer:
            assert received in ([], [big])     # the message whole, or not at all
    assert proxy.proc.wait(10) == 0
    assert sorted(server.closes) == [(1001, "server shutting down")] * 5


def test_a_tunnel_closed_by_the_client_logs_its_code(make_proxy, server, tmp_path,
                                                     port) -> None:
    make_proxy(frames_config(tmp_path, port, server.address), port=port)
    with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        for i in range(3):
            ws.send(f"m{i}")
            ws.recv(timeout=10)
        ws.close(4001, "done")
    line = log_lines(tmp_path, 1)[-1]
    assert line[:8] == ["close", "upstream", "4001", "application", "client", "3", "3", "0"]
    codes = status(port)["ws_close_codes"]
    assert codes["application"] == 1 and sum(codes.values()) == 1
    assert server.closes == [(4001, "done")]
    # the same on the Prometheus page, as a scraper reads it
    from prometheus_client.parser import text_string_to_metric_families
    code, body = http_get("127.0.0.1", port, "/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode())
               for s in family.samples}
    assert samples[("fastws_websocket_close_codes_total", (("code", "application"),))] == 1
    assert samples[("fastws_tunnels_closed_total", (("reason", "upstream"),))] == 1


def test_wss_tunnels_follow_their_frames_too(make_proxy, server, tmp_path, port):
    import trustme
    from test_tls import client_context, write_cert
    authority = trustme.CA()
    config = frames_config(tmp_path, port, server.address, max_message_size="10k",
                           ping_interval="100ms")
    config["server"][0]["tls"] = write_cert(authority, tmp_path, "site", "localhost")
    plain = free_port()
    config["server"].append({"listen": [f"127.0.0.1:{plain}"],
                             "location": [{"path": "= /status", "status": "json"}]})
    make_proxy(config, port=plain)
    ctx = client_context(authority)
    with connect(f"wss://localhost:{port}/ws", ssl=ctx, ping_interval=None) as ws:
        wait_until(lambda: status(plain)["ws_pongs"] >= 3)
        over_the_limit(ws, server, 10240)


def test_a_reload_hands_over_a_tunnel_mid_message_and_closes_wss_with_1012(
        make_proxy, server, tmp_path, port) -> None:
    import trustme
    from test_tls import client_context, write_cert
    authority = trustme.CA()
    config = frames_config(tmp_path, port, server.address, max_message_size="1m")
    tls_port = free_port()
    tls_server = {"listen": [f"127.0.0.1:{tls_port}"],
                  "tls": write_cert(authority, tmp_path, "site", "localhost"),
                  "location": [dict(config["server"][0]["location"][0])]}
    config["server"].append(tls_server)
    proxy = make_proxy(config, port=port)
    plain = socket.create_connection(("127.0.0.1", port), timeout=10)
    plain.sendall(upgrade_request())
    head, rest = read_head(plain)
    assert head.startswith(b"HTTP/1.1 101 ")
    plain.sendall(ws_frame(b"m1"))
    assert ws_read_frame(plain, rest)[:2] == (1, b"m1")
    # a message begun before the reload, its second fragment's header cut in two
    second = ws_frame(b"y" * 600_000, opcode=0)
    plain.sendall(ws_frame(b"x" * 600_000, fin=False) + second[:3])
    secure = connect(f"wss://localhost:{tls_port}/ws", ssl=client_context(authority),
                     ping_interval=None)
    secure.send("hi")
    assert secure.recv(timeout=10) == "hi"
    old = set(proxy.workers())
    proxy.rewrite(config)
    os.kill(proxy.pid, signal.SIGHUP)
    # the TLS tunnel cannot be handed over: closed politely with 1012
    assert closed_with(secure) == (1012, "server restarting")
    wait_until(lambda: not set(proxy.workers()) & old)
    # the plain one goes on in the new worker, which knows where the message stands: over
    # the limit of 1m, it is refused although the new worker saw only its second half
    plain.sendall(second[3:])
    assert _read_close(plain) == (1009, b"message too big")
    plain.close()
    wait_until(lambda: len(server.closes) == 2)
    assert sorted(server.closes) == [(1009, "message too big"), (1012, "server restarting")]
    lines = log_lines(tmp_path, 2)
    assert sorted(line[2] for line in lines) == ["1009", "1012"]


def test_a_reload_without_handover_leaves_tunnels_to_end_by_themselves(make_proxy, server,
                                                                       tmp_path, port) -> None:
    config = frames_config(tmp_path, port, server.address)
    config["handover"] = False
    proxy = make_proxy(config, port=port)
    with connect(f"ws://127.0.0.1:{port}/ws", ping_interval=None) as ws:
        ws.send("before")
        assert ws.recv(timeout=10) == "before"
        old = set(proxy.workers())
        os.kill(proxy.pid, signal.SIGHUP)
        wait_until(lambda: set(proxy.workers()) - old)          # the new generation runs
        # nginx's way: the old worker keeps relaying; no close frame comes
        for i in range(3):
            ws.send(f"after {i}")
            assert ws.recv(timeout=10) == f"after {i}"
        assert old <= set(proxy.workers())
    wait_until(lambda: not set(proxy.workers()) & old)        # it ends with its last tunnel
    assert server.closes == [(1000, "")]


@settings(max_examples=fuzz_examples(25), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(garbage=st.lists(st.binary(min_size=1, max_size=300), min_size=1, max_size=4))
def test_whatever_a_client_sends_after_the_101_the_proxy_keeps_serving(
        make_proxy, server, port, garbage) -> None:
    # random bytes where frames belong: relayed if they are frames, else a 1002 close; never a
    # crash, and the next client is served
    if not getattr(server, "proxied", False):    # (the fixtures serve every example: one proxy)
        make_proxy(ws_config(port, server.address), port=port)
        server.proxied = True
    with _mute_client(port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for piece in garbage:
                s.sendall(piece)
        except OSError:
            pass                                 # closed on us: what came before was refused
    with connect(f"ws://127.0.0.1:{port}/ws") as ws:
        ws.send("still serving")
        assert ws.recv(timeout=10) == "still serving"


def test_a_broken_frame_behind_spliced_frames_closes_after_them(make_proxy, port) -> None:
    # whole frames gathered in the pipe go to the upstream before the proxy's 1002 close
    def record(conn: socket.socket, backend: RawBackend) -> None:
        rest = ws_upgrade_handler(conn, backend)
        while (frame := ws_read_frame(conn, rest)) is not None:
            opcode, payload, rest = frame
            backend.received.append(bytes([opcode]) + payload[:1])
            if opcode == 8:
                return
    backend = RawBackend(record)
    try:
        make_proxy(ws_config(port, backend.address, relay="splice"), port=port)
        with _mute_client(port) as s:
            s.sendall(b"".join(ws_frame(bytes([65 + i]) * 100_000, opcode=2) for i in range(3))
                      + ws_frame(b"unmasked", mask=False))
            assert _read_close(s) == (1002, b"protocol error")
        wait_until(lambda: backend.received and backend.received[-1][0] == 8)
        assert backend.received == [b"\x02A", b"\x02B", b"\x02C", b"\x08\x03"]
    finally:
        backend.close()



@pytest.fixture
def raw_echo() -> Any:
    """A server that echoes every byte as it came (masked frames back to the client, so the
    proxy's masking rule is switched off where it is used): streams compared byte for byte."""
    backend = RawBackend(raw_echo_handler)
    yield backend
    backend.close()


def spliced_config(port: int, backend: RawBackend, **location: Any) -> dict[str, Any]:
    return ws_config(port, backend.address, relay="splice", frame_checks=False, **location)


@pytest.mark.parametrize("pipe_size", ["256k", "64k"])
@settings(max_examples=fuzz_examples(40), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(conversations(), st.lists(st.integers(0, 1 << 20), max_size=8))
def test_a_spliced_stream_arrives_whole_however_it_is_cut(make_proxy, raw_echo, port,
                                                          tmp_path_factory, pipe_size, conv,
                                                          points) -> None:
    # frames of every length encoding, cut anywhere between writes: whatever the splices
    # bring (several frames, a header cut at the pipe's end), every byte arrives, in order;
    # with 64 KiB pipes (16 buffers) and pieces sent from a file (page-cache pages: a 4 KiB
    # buffer each), what one look at the scratch pipe leaves takes the room of the next
    if not getattr(raw_echo, "proxied", False):  # (the fixtures serve every example: one proxy)
        config = spliced_config(port, raw_echo)
        config["pipe_size"] = pipe_size
        make_proxy(config, port=port)
        raw_echo.proxied = True
    data = wire(conv[0], True)
    scratch = tmp_path_factory.mktemp("pieces") / "piece"
    got = bytearray()
    with _mute_client(port) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def read() -> None:
            while len(got) < len(data):
                chunk = s.recv(1 << 20)
                if not chunk:
                    return
                got.extend(chunk)
        reader = threading.Thread(target=read)
        reader.start()
        for piece in cuts(data, points):
            if pipe_size == "64k":
                scratch.write_bytes(piece)
                with scratch.open("rb") as f:
                    s.sendfile(f)
            else:
                s.sendall(piece)
        reader.join(timeout=30)
    assert bytes(got) == data


def test_the_proxys_pong_is_taken_out_of_the_middle_of_a_splice(make_proxy, raw_echo,
                                                                port) -> None:
    make_proxy(spliced_config(port, raw_echo, ping_interval="200ms", ping_to="client",
                              ping_timeout="60s"), port=port)
    with _mute_client(port) as s:
        opcode, payload, rest = ws_read_frame(s)
        assert (opcode, payload) == (9, b"fastws:p")
        # the answer between two large frames, in one write: one splice brings all three
        first, second = ws_frame(b"1" * 100_000, opcode=2), ws_frame(b"2" * 100_000, opcode=2)
        s.sendall(first + ws_frame(b"fastws:p", opcode=10) + second)
        got = []
        while len(got) < 2:
            opcode, payload, rest = ws_read_frame(s, rest)
            if opcode != 9:                       # (the proxy's next pings)
                got.append((opcode, payload))
        assert got == [(2, b"1" * 100_000), (2, b"2" * 100_000)]
    assert status(port)["ws_pongs"] == 1
