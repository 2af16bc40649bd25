"""Active health checks of upstream servers (`health_check` on an [[upstream]]).

Each worker asks each server of such a group, every `interval`, with a plain GET of `uri` (the
answer's status must be one `expect_status` allows) or, with `websocket = true`, a real WebSocket
handshake (101 with the right Sec-WebSocket-Accept, then a close frame).  `fails` failures in a
row make the server unhealthy: the engine chooses it no more (as a server configured `down`: the
hash methods rehash past it, so only its keys move), until `passes` successes in a row.  The
passive checks (max_fails, fail_timeout) go on beside them.  Each worker checks for itself, as
each keeps its own passive accounting; the checks run on the worker's event loop, never on the
engine's path.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import AbstractSet, Any

from .config import HealthCheck

log = logging.getLogger("fastws")

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HEAD = 16384


@dataclass
class Target:
    """One server under checks, and what they found."""

    upstream: str
    peer: Any                    # the compiled group's Peer
    check: HealthCheck
    ssl: Any = None              # an SSLContext for a TLS upstream
    host: str = ""               # the server's name as written (Host)
    sni: str = ""                # the TLS name
    healthy: bool = True         # (servers start healthy, as nginx Plus's without `mandatory`)
    streak: int = 0              # consecutive results against the current state
    checks: int = 0
    failures: int = 0
    last_status: int = 0         # the last answer's status, 0: none came
    last_error: str = ""         # why the last check failed, "" if it passed
    last_at: float = 0.0         # wall clock of the last result
    next_at: float = 0.0         # monotonic: when the next check starts
    running: bool = False
    task: "asyncio.Task[None] | None" = field(default=None, repr=False)


class HealthChecks:
    """The checks of one worker's upstream groups."""

    def __init__(self, groups: dict[str, Any], contexts: dict[str, Any] | None = None) -> None:
        self.contexts = contexts or {}
        self.targets: list[Target] = []
        for name, group in groups.items():
            self.targets += self._targets(name, group)
        self.by_peer = {(t.upstream, t.peer.name): t for t in self.targets}
        self.loop: asyncio.AbstractEventLoop | None = None

    def _targets(self, name: str, group: Any) -> list[Target]:
        check = group.config.health_check
        if check is None:
            return []
        up = group.config
        # the name a request's Host and TLS use: the server as written (for a `resolve`
        # name's address, that name), or the group's tls.server_name
        return [Target(name, peer, check, self.contexts.get(name), peer.host,
                       up.tls.server_name if up.tls is not None and up.tls.server_name
                       else peer.host)
                for peer in group.peers]

    def __bool__(self) -> bool:
        return bool(self.targets)

    def start(self, loop: asyncio.AbstractEventLoop,
              unhealthy: AbstractSet[tuple[str, str]] = frozenset()) -> None:
        """Begin; the servers in `unhealthy` (upstream, server) start unhealthy (what the
        workers of the last generation found), the others healthy."""
        self.loop = loop
        for t in self.targets:
            if (t.upstream, t.peer.name) in unhealthy:
                t.healthy = False
                t.peer.set_health(False)
        self._begin(self.targets)

    def _begin(self, targets: list[Target]) -> None:
        assert self.loop is not None
        now = time.monotonic()
        for i, t in enumerate(targets):
            # spread the first round over the interval: not every server at once
            t.next_at = now + t.check.interval * (i / max(1, len(targets)))
            t.task = self.loop.create_task(self._run(t))

    def renew(self, name: str, group: Any) -> None:
        """Group `name` was replaced (a `resolve` name's addresses changed): a server that
        stays keeps its checks and verdict (the engine carried its state over), one that left
        is checked no more, a new one is checked from now on, healthy until found otherwise."""
        kept = {t.peer.name: t for t in self.targets if t.upstream == name}
        fresh: list[Target] = []
        others = [t for t in self.targets if t.upstream != name]
        for t in self._targets(name, group):
            old = kept.pop(t.peer.name, None)
            if old is not None:
                old.peer = t.peer
                others.append(old)
            else:
                fresh.append(t)
        for t in kept.values():
            if t.task is not None:
                t.task.cancel()
        self.targets = others + fresh
        self.by_peer = {(t.upstream, t.peer.name): t for t in self.targets}
        if self.loop is not None:
            self._begin(fresh)

    def close(self) -> None:
        for t in self.targets:
            if t.task is not None:
                t.task.cancel()

    @property
    def running(self) -> bool:
        return any(t.running for t in self.targets)

    def next_wake(self) -> float:
        """When the earliest check not under way is due (monotonic); the worker's wait is
        bounded by it (one under way wakes the loop by its I/O, or `running` polls it)."""
        return min((t.next_at for t in self.targets if not t.running), default=float("inf"))

    async def _run(self, t: Target) -> None:
        while True:
            await asyncio.sleep(max(0.0, t.next_at - time.monotonic()))
            t.next_at = time.monotonic() + t.check.interval
            t.running = True
            try:
                status, error = await self.probe(t)
            except asyncio.CancelledError:
                raise
            except Exception as exc:       # whatever it was, a failed check, and go on
                status, error = 0, f"{type(exc).__name__}: {exc}"
            finally:
                t.running = False
            self.record(t, status, error)

    def record(self, t: Target, status: int, error: str) -> None:
        """One result: the server's state changes after `fails` (`passes`) in a row."""
        ok = not error
        t.checks += 1
        t.failures += 0 if ok else 1
        t.last_status, t.last_error, t.last_at = status, error, time.time()
        if ok == t.healthy:
            t.streak = 0
            return
        t.streak += 1
        if t.streak < (t.check.passes if ok else t.check.fails):
            return
        t.healthy, t.streak = ok, 0
        t.peer.set_health(ok)
        if ok:
            log.warning("upstream %s server %s is healthy again", t.upstream, t.peer.name)
        else:
            log.warning("upstream %s server %s is unhealthy: %s", t.upstream, t.peer.name, error)

    async def probe(self, t: Target) -> tuple[int, str]:
        """(status, "") when the server answered as expected, else (status or 0, why not)."""
        check = t.check
        try:
            return await asyncio.wait_for(self._ask(t), check.timeout)
        except asyncio.TimeoutError:
            return 0, f"no answer within {check.timeout:g}s"
        except OSError as exc:
            return 0, exc.strerror or str(exc)

    async def _ask(self, t: Target) -> tuple[int, str]:
        check, peer = t.check, t.peer
        if peer.name.startswith("unix:"):
            reader, writer = await asyncio.open_unix_connection(
                peer.name[5:], ssl=t.ssl, server_hostname=t.sni or "localhost" if t.ssl else None)
            host = check.host or "localhost"
        else:
            addr = peer.sockaddr
            reader, writer = await asyncio.open_connection(
                addr[0], addr[1], ssl=t.ssl, server_hostname=t.sni if t.ssl else None)
            host = check.host or t.host
        try:
            key = base64.b64encode(os.urandom(16))
            lines = [f"GET {check.uri} HTTP/1.1", f"Host: {host}",
                     "User-Agent: fastws-health-check"]
            if check.websocket:
                lines += ["Upgrade: websocket", "Connection: Upgrade",
                          f"Sec-WebSocket-Key: {key.decode()}", "Sec-WebSocket-Version: 13"]
            else:
                lines.append("Connection: close")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status, fields = _parse(head)
            if check.websocket:
                if status != 101:
                    return status, f"the handshake was answered {status}"
                want = base64.b64encode(hashlib.sha1(key + WS_GUID).digest()).decode()
                if fields.get("sec-websocket-accept") != want:
                    return status, "the 101 has no valid Sec-WebSocket-Accept"
                # a close frame (1000, masked as a client's), then the connection closes
                writer.write(_close_frame())
                return status, ""
            if not check.expects(status):
                return status, f"the answer's status is {status}"
            return status, ""
        except asyncio.IncompleteReadError:
            return 0, "the connection closed before an answer"
        except asyncio.LimitOverrunError:
            return 0, "the answer's head is too long"
        except ValueError as exc:
            return 0, str(exc)
        finally:
            writer.close()

    def figures(self, upstream: str, server: str) -> dict[str, Any] | None:
        """What the status pages show of a server's checks (None: it has none)."""
        t = self.by_peer.get((upstream, server))
        if t is None:
            return None
        return {"healthy": t.healthy, "checks": t.checks, "failures": t.failures,
                "last_status": t.last_status, "last_error": t.last_error,
                "last_at": round(t.last_at, 3)}


def _close_frame() -> bytes:
    mask = os.urandom(4)
    payload = (1000).to_bytes(2, "big")
    return b"\x88\x82" + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def _parse(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"not an HTTP answer: {lines[0][:60]!r}")
    fields = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            fields[name.strip().lower()] = value.strip()
    return int(parts[1]), fields

