"""Real peers for the tests: fastws as a child process, WebSocket and raw TCP backends."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def fuzz_examples(n: int) -> int:
    """A property's examples: n in the normal run, FASTWS_FUZZ times more under `make fuzz`."""
    return n * max(1, int(os.environ.get("FASTWS_FUZZ", "1")))


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.02)


def port_refused(port: int, host: str = "127.0.0.1") -> bool:
    """Nothing listens there (a connect is refused)."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    while True:
        try:
            with socket.socket(family) as s:
                s.settimeout(0.5)
                s.connect((host, port))
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port}") from None
            time.sleep(0.02)


def proc_net(table: str) -> list[list[str]]:
    """The rows of /proc/net/<table> (tcp, tcp6, unix, ...), split into fields."""
    with open(f"/proc/net/{table}") as f:
        return [line.split() for line in f][1:]


def accept_queue(port: int) -> int:
    """How many connections wait in the accept queue of the listener on 127.0.0.1:port (the
    rx_queue the kernel shows for a listening socket)."""
    local = f"0100007F:{port:04X}"
    for row in proc_net("tcp"):
        if row[1] == local and row[3] == "0A":
            return int(row[4].split(":")[1], 16)
    raise LookupError(f"nothing listens on 127.0.0.1:{port}")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(config: dict[str, Any]) -> str:
    """Enough of a TOML writer for fastws configurations: top-level keys, [[upstream]],
    [[server]] and [[server.location]]."""
    lines = []
    for key, value in config.items():
        if key not in ("upstream", "server"):
            lines.append(f"{key} = {toml_value(value)}")
    for up in config.get("upstream", []):
        lines.append("\n[[upstream]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in up.items())
    for server in config.get("server", []):
        lines.append("\n[[server]]")
        lines.extend(f"{k} = {toml_value(v)}" for k, v in server.items() if k != "location")
        for loc in server.get("location", []):
            lines.append("\n[[server.location]]")
            lines.extend(f"{k} = {toml_value(v)}" for k, v in loc.items())
    return "\n".join(lines) + "\n"


def with_engine(config: dict[str, Any] | str, engine: str) -> dict[str, Any] | str:
    """`config` with `engine = ENGINE` at its top, unless it names one."""
    if isinstance(config, dict):
        return config if "engine" in config else {"engine": engine, **config}
    if any(line.split("=")[0].strip() == "engine" for line in config.splitlines()):
        return config
    return f'engine = "{engine}"\n' + config


class Proxy:
    """fastws running as a real child process on a configuration written to a file."""

    def __init__(self, tmp: Path, config: dict[str, Any] | str | Path, *,
                 port: int | None = None, args: tuple[str, ...] = (),
                 nofile: int | None = None, engine: str | None = None,
                 prefix: tuple[str, ...] = ()) -> None:
        # engine: the back end (io_uring or epoll) for a configuration that names none;
        # prefix: a command that runs fastws (tests/no_io_uring.py)
        self.tmp = tmp
        self.engine = engine
        if isinstance(config, Path):        # a file written by the test (an nginx.conf)
            self.path = config
        else:
            if engine is not None:
                config = with_engine(config, engine)
            self.path = tmp / f"fastws-{id(self)}.toml"
            self.path.write_text(config if isinstance(config, str) else to_toml(config))
        self.port = port
        self.log = tmp / f"fastws-{id(self)}.log"
        self._log_file = open(self.log, "wb")
        def limit() -> None:              # `ulimit -n` for the proxy only
            if nofile is not None:
                import resource
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
        self.proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "fastws", "-c", str(self.path), *args],
            stdout=self._log_file, stderr=subprocess.STDOUT, preexec_fn=limit)
        if port is not None:
            try:
                wait_port("127.0.0.1", port)
            except TimeoutError:
                self.stop()
                raise RuntimeError(f"fastws did not start:\n{self.output()}") from None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def rewrite(self, config: dict[str, Any]) -> None:
        """A new configuration in the proxy's file (for a reload), on the proxy's back end."""
        if self.engine is not None:
            config = with_engine(config, self.engine)  # type: ignore[assignment]
        self.path.write_text(to_toml(config))

    def output(self) -> str:
        if not self._log_file.closed:
            self._log_file.flush()
        return self.log.read_text(errors="replace")

    def workers(self) -> list[int]:
        """The pids of the master's worker processes."""
        with open(f"/proc/{self.pid}/task/{self.pid}/children") as f:
            return [int(p) for p in f.read().split()]

    def fds(self) -> int:
        """Open fds of the master and its workers."""
        total = 0
        for pid in [self.pid, *self.workers()]:
            try:
                total += len(os.listdir(f"/proc/{pid}/fd"))
            except FileNotFoundError:
                pass
        return total

    def connections(self) -> int:
        """The TCP connections (client or upstream, open or closing) the master and its workers
        hold: their sockets other than listeners and unix, UDP or netlink ones (counted this way
        round because a closing TCP socket leaves the kernel's tables before its fd is closed)."""
        held = []
        for pid in [self.pid, *self.workers()]:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except FileNotFoundError:
                continue
            for fd in fds:
                try:
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                except FileNotFoundError:
                    continue
                if link.startswith("socket:["):
                    held.append(link[8:-1])
        others = {row[9] for table in ("tcp", "tcp6") for row in proc_net(table)
                  if row[3] == "0A"}                                  # listeners
        others |= {row[6] for row in proc_net("unix")}
        others |= {row[9] for table in ("udp", "udp6", "netlink") for row in proc_net(table)}
        return sum(1 for inode in held if inode not in others)

    def get(self, path: str, port: int | None = None) -> tuple[int, bytes]:
        return http_get("127.0.0.1", port or self.port, path)  # type: ignore[arg-type]

    def status(self, path: str = "/status") -> dict[str, Any]:
        code, body = self.get(path)
        assert code == 200, body
        return json.loads(body)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()
        return self.proc.returncode


def http_get(host: str, port: int, path: str, headers: dict[str, str] | None = None,
             timeout: float = 10.0) -> tuple[int, bytes]:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    raw = raw_exchange(host, port, f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}"
                       "Connection: close\r\n\r\n".encode(), timeout=timeout)
    return parse_response(raw)


def raw_exchange(host: str, port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes, then read until the peer closes."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        return read_all(s)


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def parse_response(raw: bytes) -> tuple[int, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    if not head:
        return 0, b""
    return int(head.split(b" ", 2)[1]), body


def read_head(s: socket.socket) -> tuple[bytes, bytes]:
    """Read up to the end of a head; return (head, bytes after it)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, sep, rest = buf.partition(b"\r\n\r\n")
    return head + sep, rest


def closes_of(ws: Any) -> list[tuple[Any, Any]]:
    """Read a websockets sync client in a thread until it is closed; the list returned then
    holds its (close code, close reason)."""
    out: list[tuple[Any, Any]] = []

    def held() -> None:
        try:
            while True:
                ws.recv(timeout=60)
        except Exception:                     # noqa: BLE001  (its close)
            out.append((ws.close_code, ws.close_reason))

    threading.Thread(target=held, daemon=True).start()
    return out


def ws_key() -> bytes:
    return base64.b64encode(os.urandom(16))


def ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + WS_GUID).digest())


def ws_frame(payload: bytes, opcode: int = 1, mask: bool = True, fin: bool = True) -> bytes:
    """One WebSocket frame (RFC 6455 5.2), masked as a client sends it unless `mask` is false."""
    n = len(payload)
    head = bytes([(0x80 if fin else 0) | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head += bytes([bit | n])
    elif n < 65536:
        head += bytes([bit | 126]) + n.to_bytes(2, "big")
    else:
        head += bytes([bit | 127]) + n.to_bytes(8, "big")
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i & 3] for i, b in enumerate(payload))


def ws_read_frame(s: socket.socket, buf: bytes = b"") -> tuple[int, bytes, bytes] | None:
    """The next frame from `s` (`buf`: bytes already read): opcode, payload (unmasked), what
    was read past it; None at EOF."""
    def need(n: int) -> bool:
        nonlocal buf
        while len(buf) < n:
            data = s.recv(65536)
            if not data:
                return False
            buf += data
        return True
    if not need(2):
        return None
    n, at = buf[1] & 0x7f, 2
    if n >= 126:
        size = 2 if n == 126 else 8
        if not need(at + size):
            return None
        n, at = int.from_bytes(buf[at:at + size], "big"), at + size
    key = b""
    if buf[1] & 0x80:
        if not need(at + 4):
            return None
        key, at = buf[at:at + 4], at + 4
    if not need(at + n):
        return None
    payload = buf[at:at + n]
    if key:
        payload = bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    return buf[0] & 0x0f, payload, buf[at + n:]


def upgrade_request(path: str = "/ws", host: str = "example.com", key: bytes | None = None,
                    extra: str = "") -> bytes:
    key = key or ws_key()
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key.decode()}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n").encode()


class RawBackend:
    """A TCP server on 127.0.0.1 that runs `handler(conn, backend)` in a thread per connection
    and keeps what it was sent."""

    def __init__(self, handler: Callable[[socket.socket, "RawBackend"], None]) -> None:
        self.handler = handler
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(512)
        self.port = self.sock.getsockname()[1]
        self.heads: list[bytes] = []
        self.received: list[bytes] = []
        self.connections = 0
        self._closed = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        with conn:
            try:
                self.handler(conn, self)
            except OSError:
                pass

    def close(self) -> None:
        self._closed = True
        self.sock.close()


def ws_upgrade_handler(conn: socket.socket, backend: RawBackend) -> bytes:
    """Read an opening handshake, record it and answer with a valid 101; return the leftover."""
    head, rest = read_head(conn)
    backend.heads.append(head)
    key = b""
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"sec-websocket-key:"):
            key = line.split(b":", 1)[1].strip()
    conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                 b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + ws_accept(key) + b"\r\n\r\n")
    return rest


def raw_echo_handler(conn: socket.socket, backend: RawBackend) -> None:
    """A 101, then every byte echoed back as it is (the tests speak raw bytes, not frames)."""
    rest = ws_upgrade_handler(conn, backend)
    if rest:
        conn.sendall(rest)
    while True:
        data = conn.recv(262144)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


class EchoBackend:
    """A `websockets` echo server in its own thread; records each request's headers in order,
    and the close code and reason each connection ended with as the server saw them."""

    def __init__(self, compression: str | None = None) -> None:
        self.compression = compression
        self.requests: list[list[tuple[str, str]]] = []
        self.closes: list[tuple[int | None, str | None]] = []
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        self._ready.wait(10)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _main(self) -> None:
        from websockets.asyncio.server import serve
        from websockets.exceptions import ConnectionClosed

        async def echo(ws: Any) -> None:
            try:
                async for message in ws:
                    await ws.send(message)
            except ConnectionClosed:
                pass
            await ws.wait_closed()
            self.closes.append((ws.close_code, ws.close_reason))

        def record(connection: Any, request: Any) -> None:
            self.requests.append(list(request.headers.raw_items()))

        self._loop = asyncio.get_running_loop()
        self._stop = self._loop.create_future()
        async with serve(echo, sock=self.sock, max_size=None, compression=self.compression,
                         process_request=record, ping_interval=None):
            self._ready.set()
            await self._stop

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set_result, None)
            self._thread.join(5)


class ThreadedServer:
    """A TCP server on 127.0.0.1: a thread per connection runs `_run(conn)`; `close()` stops
    accepting."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.address = f"{host}:{self.port}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.sock.close()


class NamedBackend(ThreadedServer):
    """An upstream server that records each request head it gets, answers a WebSocket
    handshake with a valid 101 and echoes, and a plain request with 200 and its own name."""

    def __init__(self, name: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.name = name
        self.heads: list[tuple[str, list[tuple[str, str]]]] = []
        self.lock = threading.Lock()
        super().__init__(host, port)

    def _run(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            try:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = conn.recv(65536)
                        if not data:
                            return
                        buf += data
                    raw, buf = buf.split(b"\r\n\r\n", 1)
                    lines = raw.decode("latin-1").split("\r\n")
                    fields = [(k.strip(), v.strip()) for k, v in
                              (line.split(":", 1) for line in lines[1:])]
                    with self.lock:
                        self.heads.append((lines[0], fields))
                    named = {k.lower(): v for k, v in fields}
                    if named.get("upgrade", "").lower() == "websocket":
                        key = named["sec-websocket-key"].encode()
                        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket"
                                     b"\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
                                     + ws_accept(key) + b"\r\n\r\n")
                        # each message echoed, unmasked as a server sends it
                        while (frame := ws_read_frame(conn, buf)) is not None:
                            opcode, payload, buf = frame
                            conn.sendall(ws_frame(payload, opcode, mask=False))
                            if opcode == 8:
                                return
                        return
                    body = self.name.encode()
                    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                    if named.get("connection", "").lower() == "close" or \
                            lines[0].endswith("HTTP/1.0"):
                        return
            except OSError:
                return

    def take(self) -> list[tuple[str, list[tuple[str, str]]]]:
        with self.lock:
            heads, self.heads = self.heads, []
        return heads

    def close(self) -> None:
        self.sock.close()


class EmbeddedProxy:
    """fastws.Proxy (one engine, in this process) on an event loop of its own thread, so that a
    test drives it with plain blocking clients.  Error-log lines are kept in `messages`."""

    def __init__(self, config: dict[str, Any]) -> None:
        import fastws
        self.messages: list[str] = []
        self._handler = _ListHandler(self.messages)
        logging.getLogger("fastws").addHandler(self._handler)
        self.proxy = fastws.Proxy(config)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._started.wait(10)
        if self._error is not None:
            raise self._error
        self.port = self.proxy.addresses[0][1]
        self.engine = self.proxy.worker.engine

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.proxy.start())
        except BaseException as exc:        # handed to the test
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def call(self, fn: Callable[[], Any]) -> Any:
        """fn() on the proxy's loop (the engine's thread)."""
        done: "asyncio.Future[Any]" = asyncio.run_coroutine_threadsafe(_call(fn), self.loop)
        return done.result(10)

    def close(self) -> dict[str, int]:
        """Stop; what the engine still held after (nothing, unless something leaked)."""
        engine = self.engine
        asyncio.run_coroutine_threadsafe(self.proxy.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        logging.getLogger("fastws").removeHandler(self._handler)
        return {k: v for k, v in engine.stats()["held"].items() if v}


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


class _ListHandler(logging.Handler):
    def __init__(self, out: list[str]) -> None:
        super().__init__()
        self._out = out
        self.setFormatter(logging.Formatter("%(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self._out.append(self.format(record))
