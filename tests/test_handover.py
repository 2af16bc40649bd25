"""Handing tunnels over: taken out of one engine whole, bytes in flight included, carried to
another process over a Unix socket, and carried on by the new engine as if nothing happened."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from typing import Any

import pytest

from engine_support import EngineRunner, tunnel_config
from fastws import handover
from fastws._engine import ExportedTunnel
from support import (RawBackend, raw_echo_handler, read_head, upgrade_request,
                     wait_until)


def runner(upstream: str, engine: str = "auto", **location) -> EngineRunner:
    cfg = tunnel_config(upstream, **location)
    return EngineRunner(cfg, engine=engine)


def recv_exactly(s: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(1 << 20)
        assert chunk, "closed early"
        out += chunk
    return bytes(out)


@pytest.mark.parametrize("relay", ["splice", "copy", "auto"])
def test_an_exported_tunnel_goes_on_in_another_engine(relay, engine):
    backend = RawBackend(raw_echo_handler)
    old = runner(backend.address, engine, relay=relay)
    new = runner(backend.address, engine, relay=relay)
    client = socket.create_connection(("127.0.0.1", old.port), timeout=10)
    client.sendall(upgrade_request() + b"early")
    head, rest = read_head(client)
    assert head.startswith(b"HTTP/1.1 101 ")
    assert rest + recv_exactly(client, 5 - len(rest)) == b"early"
    # the client stops reading: the echo's bytes pile up in the sockets and in the engine
    big = os.urandom(8 << 20)
    writer = threading.Thread(target=client.sendall, args=(big,))
    writer.start()
    held = lambda: old.stats()["held"]          # noqa: E731
    wait_until(lambda: held()["buffers"] + held()["pipes"] >= 1)   # the engine holds some
    [t] = old.call(old.engine.export)
    assert isinstance(t, ExportedTunnel) and old.call(lambda: old.engine.active) == 0
    assert (t.first_eof, t.relay, t.upstream, t.peer) == (-1, relay, "backend", backend.address)
    assert t.up >= 5 and t.age > 0
    new.call(lambda: new.engine.adopt(t, 0, 0))
    assert recv_exactly(client, len(big)) == big          # nothing lost, nothing reordered
    writer.join()
    client.sendall(b"and back")
    assert recv_exactly(client, 8) == b"and back"
    client.shutdown(socket.SHUT_WR)
    assert client.recv(10) == b""
    client.close()
    wait_until(lambda: new.stats()["tunnels_active"] == 0)
    stats = new.stats()
    assert stats["tunnels_active"] == 0 and stats["closes"]["client"] == 1
    peer = new.groups["backend"].peers[0]
    assert peer.conns == 0 and peer.bytes_up == 5 + len(big) + 8    # its accounting carried over
    old.close()
    new.close()
    backend.close()


def test_export_with_no_tunnel_returns_an_empty_list(engine):
    backend = RawBackend(raw_echo_handler)
    r = runner(backend.address, engine)
    assert r.call(r.engine.export) == []
    r.close()
    backend.close()


def test_handover_transport_carries_fds_header_and_large_pending_bytes():
    adopted: list = []

    async def main():
        addr = handover.address(os.getpid(), 99, 0)
        arrived = asyncio.Event()

        def adopt(*tunnel: Any) -> None:
            adopted.append(tunnel)
            arrived.set()
        receiver = handover.Receiver(asyncio.get_running_loop(), addr, adopt)
        sock = handover.connect_once(addr)
        assert sock is not None
        a, b = socket.socketpair()
        small, large = b"u" * 10, os.urandom(300_000)     # more than one message can carry
        t = ExportedTunnel.restore(a.fileno(), b.fileno(), {
            "up": 11, "down": 22, "age": 2.5, "first_eof": 1, "read_timeout": 60.0,
            "send_timeout": 30.0, "relay": "copy", "upstream": "backend", "peer": "127.0.0.1:9",
            "log": None}, small, large)
        await asyncio.get_running_loop().run_in_executor(None, handover.send, sock, t)
        await asyncio.wait_for(arrived.wait(), 10)
        sock.close()
        receiver.close()
        return a, b

    a, b = asyncio.run(main())
    [(cfd, ufd, head, to_up, to_client)] = adopted
    assert len(to_up) == 10 and len(to_client) == 300_000
    t = ExportedTunnel.restore(cfd, ufd, head, to_up, to_client)
    assert (t.up, t.down, t.first_eof, t.relay, t.upstream, t.peer) == \
        (11, 22, 1, "copy", "backend", "127.0.0.1:9")
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
