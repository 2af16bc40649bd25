"""Passing live tunnels from an old worker to a new one on reload, so old workers exit at once.

A worker of generation G and index I listens on the abstract Unix socket
"\\0fastws-MASTERPID-G-I" (SOCK_SEQPACKET: message boundaries and SCM_RIGHTS).  On a reload the
master sends the old workers SIGUSR2 instead of SIGQUIT: each stops accepting, asks its relay
engine to take every tunnel out whole (fds still open, bytes in flight turned into plain
memory, counters kept), and sends each tunnel to the new worker of the same index: one message
with the two fds, a JSON header and the pending bytes (more of them, rarely, in further
messages).  The new worker hands
them to its own engine, which carries on where the old one stopped; the client and the upstream
see nothing.  When the old worker holds nothing any more it exits.

Only processes of the same user may connect (SO_PEERCRED), and the header is JSON, never a
pickle.  If the new worker cannot be reached the old one falls back to draining its tunnels as
on a graceful stop.
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import socket
import struct
import time
from typing import TYPE_CHECKING, Any, Callable

import orjson

from . import accesslog
from ._engine import ExportedTunnel

if TYPE_CHECKING:
    from .worker import Worker

log = logging.getLogger("fastws")

CHUNK = 32768               # well under a Unix socket's send buffer: one message each
CONNECT_PATIENCE = 5.0       # seconds an old worker waits for its successor to listen
RECV_TIMEOUT = 5.0


def address(master: int, generation: int, index: int) -> bytes:
    return f"\0fastws-{master}-{generation}-{index}".encode()


# --- the new worker's side -------------------------------------------------------------------

class Receiver:
    """Accepts old workers' connections and adopts the tunnels they send."""

    def __init__(self, loop: Any, addr: bytes, adopt: Callable[..., None]) -> None:
        self.loop = loop
        self.adopt = adopt          # (client fd, upstream fd, header, to upstream, to client)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(addr)
        self.sock.listen(64)
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._on_accept)
        self.conns: list[socket.socket] = []

    def _on_accept(self) -> bool:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return False
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            log.error("tunnel handover refused: peer uid %d", uid)
            conn.close()
            return True
        conn.setblocking(False)
        self.conns.append(conn)
        self.loop.add_reader(conn.fileno(), self._on_message, conn)
        return True

    def _drop(self, conn: socket.socket) -> None:
        self.loop.remove_reader(conn.fileno())
        conn.close()
        self.conns.remove(conn)

    def _on_message(self, conn: socket.socket) -> None:
        fds = array.array("i")
        try:
            msg, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(2 * fds.itemsize))
        except BlockingIOError:
            if self.sock.fileno() < 0:      # closing: nothing more is queued
                self._drop(conn)
            return
        except InterruptedError:
            return
        except OSError:
            self._drop(conn)
            return
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not msg:
            for fd in fds:
                os.close(fd)
            self._drop(conn)
            return
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            log.error("tunnel handover: a message without its two sockets")
            return
        try:
            (size,) = struct.unpack_from("!I", msg)
            head = orjson.loads(msg[4:4 + size])
            pending = msg[4 + size:]
            want = head["n0"] + head["n1"]
            if len(pending) < want:
                pending += self._read_pending(conn, want - len(pending))
            self.adopt(fds[0], fds[1], head, pending[:head["n0"]], pending[head["n0"]:])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            log.error("tunnel handover failed: %s", exc)
            os.close(fds[0])
            os.close(fds[1])

    def _read_pending(self, conn: socket.socket, n: int) -> bytes:
        # The sender writes the pending bytes right after the header: read them at once.
        out = bytearray()
        conn.settimeout(RECV_TIMEOUT)
        try:
            while len(out) < n:
                chunk = conn.recv(CHUNK)
                if not chunk:
                    raise ValueError("the sender went away mid-tunnel")
                out += chunk
        finally:
            conn.setblocking(False)
        return bytes(out)

    def close(self) -> None:
        """Take no more tunnels.  The senders' next send fails (so they keep their tunnels),
        and the ones already queued are adopted before the connections close: closing a
        socket with fds still in its queue would close those fds."""
        if self.sock.fileno() < 0:
            return
        self.loop.remove_reader(self.sock.fileno())
        # No new connection (connect() is refused from now on), then take the ones waiting in
        # the backlog: closing the listener would drop them with what they carry.
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass
        while self._on_accept():
            pass
        self.sock.close()
        for conn in list(self.conns):
            try:
                conn.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            while conn in self.conns:
                self._on_message(conn)


# --- the old worker's side -------------------------------------------------------------------

def connect_once(addr: bytes) -> socket.socket | None:
    """A connection to the new worker, or None if it does not listen yet."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        sock.connect(addr)
    except OSError:
        sock.close()
        return None
    sock.settimeout(RECV_TIMEOUT)
    return sock


def send(sock: socket.socket, t: "ExportedTunnel") -> None:
    """Send one exported tunnel; raises OSError if it could not go (the fds stay ours)."""
    head = orjson.dumps(dict(t.header(), n0=len(t.to_upstream), n1=len(t.to_client)))
    data = t.to_upstream + t.to_client
    # One message carries the fds, the header and (nearly always all of) the pending bytes, so
    # that a tunnel goes whole or not at all; more than CHUNK bytes in flight follow in chunks.
    first = CHUNK - len(head)
    msg = struct.pack("!I", len(head)) + head + data[:max(first, 0)]
    sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                          array.array("i", [t.client_fd, t.upstream_fd]))])
    for i in range(max(first, 0), len(data), CHUNK):
        sock.sendall(data[i:i + CHUNK])


async def hand_over(w: "Worker") -> None:
    """The old worker's part of a reload: pass every tunnel, then end the worker."""
    top = w.board.slots[0]
    sock = None
    deadline = time.monotonic() + CONNECT_PATIENCE
    while sock is None and time.monotonic() < deadline:
        # the newest generation at each attempt: a reload that followed this one moves the
        # target, and the tunnels go to the workers that will stay
        sock = connect_once(address(w.master, top.generation, w.index % max(1, top.processes)))
        if sock is None:
            await asyncio.sleep(0.05)
    if sock is None:
        log.error("the new worker cannot take the tunnels; draining them here")
        await w.drain_then_stop("reload")
        return
    moved = in_flight = 0
    broken = False
    try:
        while w.engine.active and not w.stopped:
            exported = w.engine.export()
            for t in exported:
                if broken or not _send_tunnel(sock, t):
                    broken = True
                    _keep(w, t)
                else:
                    moved += 1
                    in_flight += len(t.to_upstream) + len(t.to_client)
            if broken or w.engine.active == w.engine.tunnels:
                break       # what is left cannot move, or could not be sent: drained below
            # requests still in progress may yet become tunnels
            await asyncio.sleep(0.02)
    finally:
        sock.close()
    log.info("%d tunnels handed to the new workers (%d bytes in flight)", moved, in_flight)
    if w.engine.active:
        await w.drain_then_stop("reload")
    else:
        w.finish()


def _keep(w: "Worker", t: "ExportedTunnel") -> None:
    # A tunnel that could not be sent goes back into this worker's engine, which relays it to
    # its end (the drain that follows waits for it).
    group, peer = _peer_of(w, t.upstream, t.peer)
    w.engine.adopt(t, group, peer, t.log["access_log"] if t.log is not None else -1)


def _send_tunnel(sock: socket.socket, t: "ExportedTunnel") -> bool:
    try:
        send(sock, t)
    except OSError as exc:
        log.error("handing a tunnel over failed (%s); the rest stay in this worker", exc)
        return False
    os.close(t.client_fd)
    os.close(t.upstream_fd)
    return True


def _peer_of(w: "Worker", upstream: str, peer: str) -> tuple[int, int]:
    """The group and peer numbers of a server in this worker's tables, (-1, -1) if a reload
    removed it (the tunnel still goes on)."""
    for gi, name in enumerate(w.groups):
        if name == upstream:
            for pi, p in enumerate(w.groups[name].peers):
                if p.name == peer:
                    return gi, pi
    return -1, -1


def adopt(w: "Worker", cfd: int, ufd: int, head: dict[str, Any], to_up: bytes,
          to_client: bytes) -> None:
    """The new worker's part: carry on a tunnel an old worker handed over."""
    t = ExportedTunnel.restore(cfd, ufd, head, to_up, to_client)
    group, peer = _peer_of(w, t.upstream, t.peer)
    close_after = -1.0
    if peer < 0 and t.upstream in w.groups:
        # its server left the group (a `resolve` name's address that DNS no longer gives):
        # closed after the group's drain_timeout, politely where it follows its frames
        drain = w.groups[t.upstream].config.drain_timeout
        if drain > 0:
            close_after = drain
    log_index = -1
    lc = t.log
    if lc is not None:
        fmt = lc["format"]
        log_index = w.engine.add_access_log(
            lc["path"], -1 if lc["path"] in w.engine.log_paths else accesslog.open_log(lc["path"]),
            [tuple(p) for p in fmt["parts"]], fmt["json"], fmt["names"], fmt["early"], lc["open"],
            fmt.get("escape", 0))
    w.engine.adopt(t, group, peer, log_index, close_after)
