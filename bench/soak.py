"""A soak: fastws under a mixed load for a while, checked for errors, dropped tunnels and growth.

    python -m bench.soak --minutes 10
    python -m bench.soak --seconds 60 --json       # the CI version (tests/test_soak.py)

One fastws instance (two workers) in front of an in-process backend, and, at once, until the
time is up:

- long tunnels, each echoing a message every 100 ms: one that drops, or echoes wrongly, is a
  failure (they must survive every reload);
- handshake churn (open, echo, close), keep-alive GETs, GETs through a limit_req zone;
- client resets (RST mid-tunnel), upstream resets (the backend aborts a tunnel), slow readers
  (a tunnel whose client reads a large echo a little at a time), garbage (bytes that are not
  HTTP: answered 400 or closed);
- a reload (SIGHUP) every few seconds, alternating two configurations.

Then the load stops, every connection closes, and the proxy's descriptors (its pipe pool
aside), what its engines hold, and its memory are compared with the figures taken after the
warm-up.  Exit status 1 on any failure or growth beyond noise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from .procs import memory_kb, tree

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
LONG_TUNNELS = 40


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- the backend ---------------------------------------------------------------------------

def _mask(data: bytes, key: bytes) -> bytes:
    # XOR with the repeated key, as one big integer (fast for a 1 MiB payload)
    n = len(data)
    keys = int.from_bytes((key * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ keys).to_bytes(n, "big") if n else b""


def frame(payload: bytes, mask: bool = True) -> bytes:
    """A binary WebSocket frame: masked as a client sends it, or not, as a server does."""
    n = len(payload)
    bit = 0x80 if mask else 0
    head = b"\x82" + (bytes([bit | n]) if n < 126 else bytes([bit | 126]) + n.to_bytes(2, "big")
                      if n < 65536 else bytes([bit | 127]) + n.to_bytes(8, "big"))
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _mask(payload, key)


async def read_frame(reader: asyncio.StreamReader) -> bytes:
    """The payload of the next frame, unmasked."""
    head = await reader.readexactly(2)
    n = head[1] & 0x7f
    if n >= 126:
        n = int.from_bytes(await reader.readexactly(2 if n == 126 else 8), "big")
    key = await reader.readexactly(4) if head[1] & 0x80 else b""
    data = await reader.readexactly(n)
    return _mask(data, key) if key else data


async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await _serve(reader, writer)
    except asyncio.CancelledError:                  # the soak is over
        writer.transport.abort()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            fields = {k.lower(): v.strip() for k, _, v in
                      (line.partition(":") for line in lines[1:] if line)}
            path = lines[0].split(" ")[1]
            if fields.get("upgrade", "").lower() == "websocket":
                key = fields["sec-websocket-key"].encode()
                accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                             b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept +
                             b"\r\n\r\n")
                if path.startswith("/ws-reset"):
                    await reader.read(65536)
                    writer.transport.abort()              # an upstream reset
                    return
                try:
                    while True:                  # each message echoed, as a server frames it
                        writer.write(frame(await read_frame(reader), mask=False))
                        await writer.drain()
                except asyncio.IncompleteReadError:
                    pass
                writer.close()
                return
            body = b"ok" * 64
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        writer.transport.abort()


# --- the proxy -----------------------------------------------------------------------------

def config(port: int, status_port: int, upstream: int, variant: int) -> str:
    return f"""
processes = 2
worker_connections = 4096
shutdown_timeout = "30s"

[[limit_req_zone]]
name = "soak"
key = "$binary_remote_addr"
size = "1m"
rate = "200r/s"

[[upstream]]
name = "b"
servers = ["127.0.0.1:{upstream}"]
keepalive = 16

[[server]]
listen = ["127.0.0.1:{port}"]

[[server.location]]
path = "/"
proxy_pass = "b"
read_timeout = "{60 + variant}s"

[[server.location]]
path = "/limited"
proxy_pass = "b"
limit_req = {{ zone = "soak", burst = 50, nodelay = true }}
limit_req_status = 429

[[server]]
listen = ["127.0.0.1:{status_port}"]

[[server.location]]
path = "= /status"
status = "json"
"""


class Proxy:
    def __init__(self, tmp: Path, port: int, status_port: int, upstream: int) -> None:
        self.tmp, self.port, self.status_port, self.upstream = tmp, port, status_port, upstream
        self.path = tmp / "fastws.toml"
        self.variant = 0
        self.path.write_text(config(port, status_port, upstream, 0))
        self.log = open(tmp / "fastws.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "fastws", "-c", str(self.path)],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.status_port}/status",
                                    timeout=10) as r:
            return json.loads(r.read())

    def reload(self) -> None:
        self.variant ^= 1
        self.path.write_text(config(self.port, self.status_port, self.upstream, self.variant))
        os.kill(self.proc.pid, signal.SIGHUP)

    def figures(self) -> dict[str, Any]:
        """Descriptors (the pipe pool's aside), memory, and what the engines hold."""
        deadline = time.monotonic() + 10
        st = self.status()
        while st["connections"]["active"] > 1 and time.monotonic() < deadline:
            st = self.status()          # the previous status request's close, not yet seen
        pids = tree(self.proc.pid)
        fds = 0
        for pid in pids:
            try:
                fds += len(os.listdir(f"/proc/{pid}/fd"))
            except OSError:
                pass
        mem = memory_kb([self.proc.pid])
        workers = memory_kb([p for p in pids if p != self.proc.pid])
        # what the engines hold beyond the status request itself and their pools (pipes,
        # idle upstream connections: with no client, every upstream connection is pooled)
        held = dict(st["engine"]["held"])
        pooled = held.pop("upstream_connections")
        held.pop("pipes")
        held["connections"] -= 1
        held["requests"] -= 1
        return {"fds": fds - 2 * st["engine"]["pipes_total"] - pooled, "pooled": pooled,
                "master_pss_kb": mem["pss_kb"],
                "workers_pss_kb": workers["pss_kb"], "workers": len(pids) - 1,
                "connections": st["connections"]["active"], "held": held}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# --- the load ------------------------------------------------------------------------------

class Load:
    def __init__(self, port: int, until: float) -> None:
        self.port = port
        self.until = until
        self.done = Counter[str]()
        self.errors = Counter[str]()
        self.dropped = 0

    def running(self) -> bool:
        return time.monotonic() < self.until

    async def handshake(self, path: str = "/ws") -> tuple[asyncio.StreamReader,
                                                         asyncio.StreamWriter]:
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        key = base64.b64encode(os.urandom(16)).decode()
        w.write(f"GET {path} HTTP/1.1\r\nHost: soak\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode())
        head = await r.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            w.close()
            raise RuntimeError(f"handshake answered {head[:12]!r}")
        return r, w

    async def guarded(self, name: str, coro: Any) -> None:
        try:
            await asyncio.wait_for(coro, 30)
            self.done[name] += 1
        except Exception as exc:                                  # noqa: BLE001
            self.errors[f"{name}: {type(exc).__name__} {exc}"[:120]] += 1

    async def long_tunnel(self, i: int) -> None:
        # must live through every reload, echoing correctly, until the end
        try:
            r, w = await self.handshake(f"/ws/long/{i}")
        except Exception as exc:                                  # noqa: BLE001
            self.errors[f"long tunnel handshake: {exc}"[:120]] += 1
            return
        n = 0
        try:
            while self.running():
                msg = b"long %d %d|" % (i, n)
                w.write(frame(msg))
                got = await asyncio.wait_for(read_frame(r), 15)
                if got != msg:
                    self.errors["long tunnel: wrong echo"] += 1
                    self.dropped += 1
                    break
                n += 1
                await asyncio.sleep(0.1)
            self.done["long tunnel messages"] += n
        except Exception as exc:                                  # noqa: BLE001
            self.dropped += 1
            self.errors[f"long tunnel dropped: {type(exc).__name__}"] += 1
        w.close()

    async def churn(self) -> None:
        r, w = await self.handshake()
        w.write(frame(b"hello"))
        assert await read_frame(r) == b"hello"
        w.close()

    async def keepalive_gets(self, path: str = "/") -> None:
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        codes = Counter[str]()
        for i in range(20):
            w.write(f"GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if i == 0 or exc.partial:
                    raise
                # a kept-alive connection closed as the request went (a worker retiring on a
                # reload closes its idle ones): retried on a new one, as RFC 9112 9.3.1 allows
                self.done["keep-alive closes retried"] += 1
                w.close()
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.write(f"GET {path} HTTP/1.1\r\nHost: soak\r\n\r\n".encode())
                head = await r.readuntil(b"\r\n\r\n")
            code = head.split(b" ")[1].decode()
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            await r.readexactly(length)
            codes[code] += 1
            if b"connection: close" in head.lower():
                # a refusal ends the connection: the client reconnects, as a browser would
                w.close()
                r, w = await asyncio.open_connection("127.0.0.1", self.port)
        w.close()
        if set(codes) - {"200", "429"}:
            raise RuntimeError(f"answers {dict(codes)}")
        self.done["429 from limit_req"] += codes["429"]

    async def client_reset(self) -> None:
        r, w = await self.handshake()
        w.write(frame(b"x" * 1000))
        await read_frame(r)
        sock = w.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        w.transport.abort()

    async def upstream_reset(self) -> None:
        r, w = await self.handshake("/ws-reset")
        w.write(frame(b"bye"))
        await r.read()                  # the proxy passes the end on
        w.close()

    async def slow_reader(self) -> None:
        r, w = await self.handshake()
        payload = os.urandom(1 << 20)
        w.write(frame(payload))
        got, expected = 0, len(frame(payload, mask=False))
        while got < expected:
            chunk = await r.read(16384)
            if not chunk:
                raise RuntimeError("closed during a slow read")
            got += len(chunk)
            await asyncio.sleep(0.002)
        w.close()

    async def garbage(self) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        w.write(random.choice([b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                               b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                               b"\x00" * 64 + b"\r\n\r\n", os.urandom(200) + b"\r\n\r\n"]))
        answer = await r.read()
        if answer and not answer.startswith(b"HTTP/1.1 400"):
            raise RuntimeError(f"garbage answered {answer[:12]!r}")
        w.close()

    async def loop(self, name: str, make: Any, pause: float) -> None:
        while self.running():
            await self.guarded(name, make())
            await asyncio.sleep(pause)


async def run(seconds: float, tmp: Path, out: dict[str, Any]) -> None:
    server = await asyncio.start_server(backend, "127.0.0.1", 0, limit=1 << 20)
    upstream = server.sockets[0].getsockname()[1]
    port, status_port = free_port(), free_port()
    proxy = Proxy(tmp, port, status_port, upstream)
    try:
        for _ in range(200):
            try:
                proxy.status()
                break
            except OSError:
                await asyncio.sleep(0.05)
        # warm-up: every kind of connection once, then the first figures, with none open
        warm = Load(port, time.monotonic() + 3600)
        for coro in (warm.churn(), warm.keepalive_gets(), warm.slow_reader(), warm.garbage()):
            await warm.guarded("warm-up", coro)
        await settle(proxy, 0)
        out["start"] = proxy.figures()
        load = Load(port, time.monotonic() + seconds)
        tasks = [asyncio.create_task(load.long_tunnel(i)) for i in range(LONG_TUNNELS)]
        tasks += [asyncio.create_task(load.loop(name, make, pause)) for name, make, pause in (
            ("handshake", load.churn, 0.005), ("handshake", load.churn, 0.005),
            ("keep-alive GETs", load.keepalive_gets, 0.01),
            ("limited GETs", lambda: load.keepalive_gets("/limited"), 0.01),
            ("client reset", load.client_reset, 0.05),
            ("upstream reset", load.upstream_reset, 0.05),
            ("slow reader", load.slow_reader, 0.2),
            ("garbage", load.garbage, 0.05))]
        reloads = 0
        while load.running():
            await asyncio.sleep(min(3.0, max(0.0, load.until - time.monotonic())))
            if load.running():
                proxy.reload()
                reloads += 1
        await asyncio.gather(*tasks)
        await settle(proxy, 0)
        out["end"] = proxy.figures()
        out["reloads"] = reloads
        out["done"] = dict(load.done)
        out["errors"] = dict(load.errors)
        out["dropped_tunnels"] = load.dropped
    finally:
        server.close()
        proxy.stop()                    # whatever happened: the soak leaves nothing running
        out["proxy_log_tail"] = (tmp / "fastws.log").read_text(errors="replace").splitlines()[-5:]


async def settle(proxy: Proxy, connections: int) -> None:
    """Wait until the proxy has `connections` open (the status request aside) and only the
    current workers run."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = proxy.status()
        if st["connections"]["active"] <= connections + 1 and \
                len({w["generation"] for w in st["workers"]}) == 1 and \
                len(tree(proxy.proc.pid)) - 1 == len(st["workers"]):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the proxy did not settle: connections or old workers remain")


def verdict(out: dict[str, Any]) -> list[str]:
    """What is wrong, if anything."""
    problems = []
    if out.get("dropped_tunnels"):
        problems.append(f"{out['dropped_tunnels']} long tunnels dropped")
    if out.get("errors"):
        problems.append(f"errors: {out['errors']}")
    start, end = out.get("start"), out.get("end")
    if start and end:
        if end["fds"] > start["fds"] + 2:        # (an upstream connection a pool closes late)
            problems.append(f"descriptors grew from {start['fds']} to {end['fds']}")
        if any(end["held"].values()):
            problems.append(f"the engines still hold {end['held']}")
        if end["master_pss_kb"] > start["master_pss_kb"] + 8192:
            problems.append(f"the master grew from {start['master_pss_kb']} kB to "
                            f"{end['master_pss_kb']} kB")
        per_start = start["workers_pss_kb"] / max(1, start["workers"])
        per_end = end["workers_pss_kb"] / max(1, end["workers"])
        if per_end > per_start * 1.5 + 8192:
            problems.append(f"a worker grew from {per_start:.0f} kB to {per_end:.0f} kB")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=0)
    ap.add_argument("--seconds", type=float, default=0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = ap.parse_args(argv)
    seconds = args.seconds + 60 * args.minutes or 60
    out: dict[str, Any] = {"seconds": seconds}
    with tempfile.TemporaryDirectory(prefix="fastws-soak-") as tmp:
        try:
            asyncio.run(run(seconds, Path(tmp), out))
        except Exception as exc:                                  # noqa: BLE001
            out.setdefault("errors", {})[f"soak: {type(exc).__name__} {exc}"] = 1
    problems = verdict(out)
    out["problems"] = problems
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"soak: {seconds:.0f} s, {out.get('reloads', 0)} reloads")
        for name, n in sorted(out.get("done", {}).items()):
            print(f"  {name}: {n}")
        for key in ("start", "end"):
            if key in out:
                print(f"  {key}: {out[key]}")
        print("  " + ("; ".join(problems) if problems else "no errors, no dropped tunnel, "
                      "no growth"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
