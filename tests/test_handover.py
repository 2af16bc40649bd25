"""The relay engine's export: tunnels taken out whole, bytes in flight included, and carried on
by another engine as if nothing happened."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from fastws._splice import Engine


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(1 << 20)
        assert chunk, "closed early"
        out += chunk
    return out


def take(engine: Engine) -> list:
    deadline = time.monotonic() + 10
    while True:
        out = engine.take_exported()
        if out is not None:
            return out
        assert time.monotonic() < deadline, "export did not finish"
        time.sleep(0.005)


@pytest.mark.parametrize("mode", ["splice", "copy", "auto"])
def test_an_exported_tunnel_goes_on_in_another_engine(mode):
    old, new = Engine(), Engine()
    old.start()
    new.start()
    client, proxy_client = socket.socketpair()
    upstream, proxy_upstream = socket.socketpair()
    for s in (proxy_client, proxy_upstream):
        s.setblocking(False)
    old.add(proxy_client.detach(), proxy_upstream.detach(), b"early-up", b"early-down",
            60.0, 30.0, mode, "the record")
    client.sendall(b"hello")
    assert recv_exactly(upstream, 13) == b"early-uphello"
    assert recv_exactly(client, 10) == b"early-down"
    # the client stops reading: bytes pile up in the socket buffers and in the engine
    big = os.urandom(4 << 20)
    upstream.setblocking(False)
    sent = 0
    try:
        while sent < len(big):
            sent += upstream.send(big[sent:sent + 65536])
    except BlockingIOError:
        pass
    time.sleep(0.2)
    old.export()
    [(ctx, cfd, ufd, to_up, to_client, up, down, age, first_eof, rt, st, m)] = take(old)
    assert old.active == 0 and old.take_exported() is None
    assert (ctx, to_up, first_eof, rt, st, m) == ("the record", b"", -1, 60.0, 30.0, mode)
    assert up == 5 and down >= len(to_client) and age > 0.2
    new.add(cfd, ufd, to_up, to_client, rt, st, m, ctx, up=up, down=down, age=age,
            first_eof=first_eof)
    upstream.setblocking(True)
    writer = threading.Thread(target=upstream.sendall, args=(big[sent:],))
    writer.start()
    client.settimeout(10)
    assert recv_exactly(client, len(big)) == big       # nothing lost, nothing reordered
    writer.join()
    client.sendall(b"and back")
    assert recv_exactly(upstream, 8) == b"and back"
    client.shutdown(socket.SHUT_WR)
    assert upstream.recv(10) == b""
    upstream.close()
    assert client.recv(10) == b""
    deadline = time.monotonic() + 10
    closed = []
    while not closed and time.monotonic() < deadline:
        closed = new.drain()
        time.sleep(0.01)
    [(ctx, up, down, duration, reason)] = closed
    assert (ctx, up, down, reason) == ("the record", 13, len(big), "client")
    assert duration >= age
    old.stop()
    new.stop()
    client.close()


def test_export_with_no_tunnel_returns_an_empty_list():
    engine = Engine()
    engine.start()
    assert engine.take_exported() is None
    engine.export()
    assert take(engine) == []
    engine.stop()


def test_handover_transport_carries_fds_header_and_large_pending_bytes():
    import asyncio

    from fastws import handover
    from fastws.proxy import TunnelRecord

    class Up:
        name = "backend"

    class Peer:
        name = "127.0.0.1:9"

    adopted: list = []

    async def main():
        addr = handover.address(os.getpid(), 99, 0)
        receiver = handover.Receiver(asyncio.get_running_loop(), addr,
                                     lambda *tunnel: adopted.append(tunnel))
        sock = handover.connect_once(addr)
        assert sock is not None
        a, b = socket.socketpair()
        record = TunnelRecord(Up(), Peer(), "10.0.0.1", b"GET /ws HTTP/1.1", time.monotonic() - 3,
                              0.001, 0.002, 200, 129)
        small, large = b"u" * 10, os.urandom(300_000)     # more than one message can carry
        item = (record, a.fileno(), b.fileno(), small, large, 11, 22, 2.5, 1, 60.0, 30.0, "copy")
        await asyncio.get_running_loop().run_in_executor(None, handover.send, sock, item)
        deadline = time.monotonic() + 10
        while not adopted and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        sock.close()
        receiver.close()
        return a, b

    a, b = asyncio.run(main())
    [(cfd, ufd, head, to_up, to_client)] = adopted
    assert len(to_up) == 10 and len(to_client) == 300_000
    assert (head["up"], head["down"], head["first_eof"], head["mode"], head["upstream"],
            head["peer"], head["request"]) == (11, 22, 1, "copy", "backend", "127.0.0.1:9",
                                               "GET /ws HTTP/1.1")
    # the received fds are the same sockets (a and b are the two ends of one pair)
    with socket.socket(fileno=cfd) as a2, socket.socket(fileno=ufd) as b2:
        b.settimeout(10)
        b2.settimeout(10)
        a.sendall(b"ping")
        assert b2.recv(10) == b"ping"
        a2.sendall(b"pong")
        assert b.recv(10) == b"pong"
    a.close()
    b.close()
