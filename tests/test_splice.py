"""The relay engine on its own: socket pairs handed over, bytes checked, closures reported."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from fastws._splice import Engine


@pytest.fixture
def engine():
    e = Engine(pipe_size=65536, max_pipes=64)
    e.start()
    yield e
    e.stop()


def tunnel(engine, mode, *, early_up=b"", early_down=b"", read_timeout=30.0, send_timeout=30.0,
           ctx=None, family=socket.AF_UNIX):
    """(client end, upstream end) of a tunnel whose middle belongs to the engine."""
    if family == socket.AF_UNIX:
        client, c_in = socket.socketpair()
        u_in, upstream = socket.socketpair()
    else:
        client, c_in = tcp_pair()
        u_in, upstream = tcp_pair()
    c_in.setblocking(False)
    u_in.setblocking(False)
    engine.add(c_in.detach(), u_in.detach(), early_up, early_down, read_timeout, send_timeout,
               mode, ctx)
    client.settimeout(10)
    upstream.settimeout(10)
    return client, upstream


def tcp_pair():
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        a = socket.create_connection(lsock.getsockname())
        b, _ = lsock.accept()
    return a, b


def pump(src: socket.socket, dst: socket.socket, data: bytes) -> bytes:
    """Write data into src from a thread while reading len(data) bytes from dst."""
    writer = threading.Thread(target=src.sendall, args=(data,))
    writer.start()
    got = bytearray()
    while len(got) < len(data):
        chunk = dst.recv(1 << 20)
        if not chunk:
            break
        got += chunk
    writer.join()
    return bytes(got)


def closures(engine, n=1, timeout=10.0):
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += engine.drain()
        time.sleep(0.01)
    return out


@pytest.mark.parametrize("size", [1, 4095, 4096, 65535, 65536, 65537, 16 * 1448, 8 << 20])
@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET], ids=["unix", "tcp"])
def test_sizes_both_ways(engine, relay, size, family):
    client, upstream = tunnel(engine, relay, family=family)
    data = os.urandom(size)
    assert pump(client, upstream, data) == data
    assert pump(upstream, client, data[::-1]) == data[::-1]
    client.close()
    upstream.close()
    (_, up, down, _, _), = closures(engine)
    assert (up, down) == (size, size)


def test_early_bytes_go_first_and_are_not_counted_twice(engine, relay):
    client, upstream = tunnel(engine, relay, early_up=b"early-up", early_down=b"101 head|")
    assert upstream.recv(100) == b"early-up"
    assert client.recv(100) == b"101 head|"
    client.sendall(b"next")
    assert upstream.recv(100) == b"next"


def test_empty_tunnel_closes_cleanly(engine, relay):
    client, upstream = tunnel(engine, relay, ctx="the ctx")
    client.shutdown(socket.SHUT_WR)
    assert upstream.recv(10) == b""
    upstream.shutdown(socket.SHUT_WR)
    assert client.recv(10) == b""
    (ctx, up, down, duration, reason), = closures(engine)
    assert (ctx, up, down, reason) == ("the ctx", 0, 0, "client")
    assert duration >= 0


def test_half_close_each_way(engine, relay):
    client, upstream = tunnel(engine, relay)
    upstream.sendall(b"bye")
    upstream.shutdown(socket.SHUT_WR)
    assert client.recv(10) == b"bye"
    assert client.recv(10) == b""
    # the other direction still flows after the upstream's EOF
    client.sendall(b"still talking")
    assert upstream.recv(100) == b"still talking"
    client.shutdown(socket.SHUT_WR)
    assert upstream.recv(10) == b""
    (_, up, down, _, reason), = closures(engine)
    assert (up, down, reason) == (13, 3, "upstream")


def test_reset_closes_both_sides(engine, relay):
    client, upstream = tunnel(engine, relay, family=socket.AF_INET)
    client.sendall(b"x")
    assert upstream.recv(10) == b"x"
    upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    upstream.close()
    try:
        assert client.recv(10) == b""
    except ConnectionResetError:
        pass
    (_, _, _, _, reason), = closures(engine)
    assert reason == "upstream_error"


def test_backpressure_stops_reading_and_loses_nothing(engine, relay):
    client, upstream = tunnel(engine, relay, family=socket.AF_INET)
    data = os.urandom(32 << 20)
    sent = [0]

    def write():
        view = memoryview(data)
        while sent[0] < len(data):
            sent[0] += client.send(view[sent[0]:sent[0] + 65536])

    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(0.5)
    # the upstream reads nothing: the writer is held back by the kernel buffers, not by the
    # engine's memory (it holds at most one pipe or one chunk per direction)
    assert sent[0] < len(data)
    stats = engine.stats()
    assert stats["pipes_total"] - stats["pipes_free"] <= 1
    got = bytearray()
    while len(got) < len(data):
        got += upstream.recv(1 << 20)
    writer.join()
    assert bytes(got) == data


def test_idle_tunnels_hold_no_pipe(engine):
    pairs = [tunnel(engine, "splice") for _ in range(300)]
    for client, upstream in pairs:
        client.sendall(b"a" * 5000)
        assert upstream.recv(8192) == b"a" * 5000
    stats = engine.stats()
    assert stats["bytes_spliced"] == 300 * 5000
    assert stats["pipes_total"] == stats["pipes_free"]      # every pipe went back to the pool
    assert stats["pipes_total"] <= 64
    assert engine.active == 300
    for client, upstream in pairs:
        client.close()
        upstream.close()
    assert len(closures(engine, 300)) == 300


def test_read_timeout_counts_upstream_silence_only(engine):
    client, upstream = tunnel(engine, "auto", read_timeout=0.4)
    deadline = time.monotonic() + 5.0
    with pytest.raises(OSError):
        while time.monotonic() < deadline:  # client traffic does not keep it alive
            client.sendall(b"c")
            if not upstream.recv(10):
                raise ConnectionResetError
            time.sleep(0.05)
    (_, up, _, _, reason), = closures(engine, timeout=2)
    assert reason == "read_timeout"
    assert up >= 4                          # it did relay for a while first


def test_send_timeout(engine):
    client, upstream = tunnel(engine, "copy", send_timeout=0.3, family=socket.AF_INET)
    upstream.settimeout(5)
    try:
        while True:
            upstream.sendall(b"z" * 65536)   # the client never reads
    except OSError:
        pass
    (_, _, _, _, reason), = closures(engine)
    assert reason == "send_timeout"


def test_stop_closes_every_tunnel():
    e = Engine()
    e.start()
    pairs = [tunnel(e, "auto", ctx=i) for i in range(10)]
    e.stop()
    done = e.drain()
    assert sorted(c[0] for c in done) == list(range(10))
    assert {c[4] for c in done} == {"shutdown"}
    for client, _ in pairs:
        assert client.recv(10) == b""
    with pytest.raises(RuntimeError):
        tunnel(e, "auto")
