"""Access log and error log: nginx's log_format variables, buffered writers, reopen on SIGUSR1.

A format is parsed once into parts.  The variables that depend on the request (its line, its
headers, the client, the chosen upstream) are rendered when the request is routed, and a tunnel
keeps only that small tuple of strings; the ones that depend on the end (status, bytes, times)
are rendered when the line is written.  Lines are gathered in memory and written by a timer (or
when the buffer is full, or at exit), one write(2) per flush on an O_APPEND descriptor, so that
several workers can share a file and the relay engine, in its own thread, never waits for a disk.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

import orjson

from .errors import ConfigError

if TYPE_CHECKING:
    from .proxy import ClientConn, TunnelRecord
    from .worker import Worker

log = logging.getLogger("fastws")

# nginx's built-in format (ngx_http_log_module.c).
COMBINED = ('$remote_addr - $remote_user [$time_local] "$request" $status $body_bytes_sent '
            '"$http_referer" "$http_user_agent"')
# The built-in JSON-lines format: one object per line, keys named after the variables.
JSON_FIELDS = ("time_iso8601", "remote_addr", "remote_user", "request", "status",
               "body_bytes_sent", "bytes_sent", "request_time", "http_referer",
               "http_user_agent", "upstream_addr", "upstream_status", "upstream_connect_time",
               "upstream_header_time", "upstream_response_time", "tunnel", "tunnel_close",
               "connection", "connection_requests")

# Variables known when the request has been routed (kept by a tunnel until it closes).
EARLY = frozenset((
    "remote_addr", "remote_port", "remote_user", "request", "request_method", "request_uri",
    "uri", "args", "query_string", "host", "scheme", "server_addr", "server_port", "server_name",
    "server_protocol", "connection", "connection_requests", "upstream_addr", "pid",
))
# Variables known only when the line is written.
LATE = frozenset((
    "status", "body_bytes_sent", "bytes_sent", "request_length", "request_time", "time_local",
    "time_iso8601", "msec", "upstream_status", "upstream_connect_time", "upstream_header_time",
    "upstream_response_time", "upstream_bytes_sent", "upstream_bytes_received", "tunnel",
    "tunnel_close",
))
FAMILIES = ("http_", "arg_", "cookie_")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": logging.INFO,
          "warn": logging.WARNING, "error": logging.ERROR, "crit": logging.CRITICAL}

_VAR = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")
# nginx's default escaping (ngx_http_log_escape): '"', '\' and bytes outside 0x20-0x7e as \xHH.
_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f-\U0010ffff]')
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")

FLUSH_INTERVAL = 1.0
BUFFER_SIZE = 65536


@dataclass(frozen=True, slots=True)
class LogFormat:
    name: str
    parts: tuple[tuple[int, str], ...]  # (kind, text): 0 literal, 1 early variable, 2 late
    early: tuple[str, ...]              # early variables, in the order render_early gives them
    json: bool = False                  # a JSON-lines format: parts are (kind, variable name)


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str                  # a file, or "stderr"
    format: LogFormat
    open: bool = False         # also write a line when a tunnel opens


@dataclass(frozen=True, slots=True)
class ErrorLogConfig:
    path: str = "stderr"
    level: str = "info"


def _known(name: str) -> bool:
    return name in EARLY or name in LATE or (
        name.startswith(FAMILIES) and len(name) > len(name.split("_", 1)[0]) + 1)


def compile_format(name: str, text: str | list[str] | tuple[str, ...], *,
                   json: bool = False) -> LogFormat:
    """Parse a log_format once: a string with $variables, or (json) a list of variable names."""
    parts: list[tuple[int, str]] = []
    early: list[str] = []

    def var(v: str) -> None:
        v = v.lower()
        if not _known(v):
            raise ValueError(f"unknown variable ${v}")
        if v in LATE:
            parts.append((2, v))
        else:
            if v not in early:
                early.append(v)
            parts.append((1, v))

    if json:
        for v in text:
            var(v.lstrip("$"))
        return LogFormat(name, tuple(parts), tuple(early), True)
    assert isinstance(text, str)
    pos = 0
    for m in _VAR.finditer(text):
        if m.start() > pos:
            parts.append((0, text[pos:m.start()]))
        var(m.group(1) or m.group(2))
        pos = m.end()
    if pos < len(text):
        parts.append((0, text[pos:]))
    return LogFormat(name, tuple(parts), tuple(early))


def builtin_formats() -> dict[str, LogFormat]:
    return {"combined": compile_format("combined", COMBINED),
            "json": compile_format("json", JSON_FIELDS, json=True)}


# --- configuration ---------------------------------------------------------------------------

def check_path(path: str) -> None:
    """Raise ValueError if a log file cannot be opened for appending (as `fastws -t` must)."""
    if path == "stderr":
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise ValueError(f"cannot open {path!r}: {exc.strerror}") from None
    os.close(fd)


def read_formats(source: str, table: Any) -> dict[str, LogFormat]:
    """The [log_format] table: name = "format string" (or a list of strings joined, as nginx's
    several quoted strings), or name = { json = ["var", ...] } for a JSON-lines format."""
    formats = builtin_formats()
    if table is None:
        return formats
    if not isinstance(table, Mapping):
        raise ConfigError(source, "log_format", "expected a table of name = \"format\"")
    for name, value in table.items():
        key = f"log_format.{name}"
        if name in formats:
            raise ConfigError(source, key, f"{name!r} is a built-in format")
        try:
            if isinstance(value, list) and all(isinstance(v, str) for v in value):
                formats[name] = compile_format(name, "".join(value))
            elif isinstance(value, str):
                formats[name] = compile_format(name, value)
            elif isinstance(value, Mapping) and set(value) == {"json"} \
                    and isinstance(value["json"], list) and value["json"] \
                    and all(isinstance(v, str) for v in value["json"]):
                formats[name] = compile_format(name, value["json"], json=True)
            else:
                raise ValueError("expected a format string, or { json = [\"variable\", ...] }")
        except ValueError as exc:
            raise ConfigError(source, key, str(exc)) from None
    return formats


_UNSET: Any = object()


def read_access_log(source: str, where: str, value: Any, formats: Mapping[str, LogFormat],
                    inherited: AccessLogConfig | None) -> AccessLogConfig | None:
    """An `access_log` value: false (off), "path" (combined format), or
    { path = "...", format = "name", open = true }.  Absent (_UNSET): inherited."""
    if value is _UNSET:
        return inherited
    key = f"{where}.access_log" if where else "access_log"
    if value is False:
        return None
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, Mapping):
        raise ConfigError(source, key, "expected false, a path, or { path = \"...\", format = "
                          "\"name\" }")
    unknown = set(value) - {"path", "format", "open"}
    if unknown:
        raise ConfigError(source, f"{key}.{sorted(unknown)[0]}", "unknown key")
    path = value.get("path")
    if not isinstance(path, str) or not path:
        raise ConfigError(source, f"{key}.path", "is required (a file, or \"stderr\")")
    fmt_name = value.get("format", "combined")
    if not isinstance(fmt_name, str) or fmt_name not in formats:
        raise ConfigError(source, f"{key}.format",
                          f"unknown format {fmt_name!r} (define it in [log_format])")
    opened = value.get("open", False)
    if not isinstance(opened, bool):
        raise ConfigError(source, f"{key}.open", "expected true or false")
    try:
        check_path(path)
    except ValueError as exc:
        raise ConfigError(source, f"{key}.path", str(exc)) from None
    return AccessLogConfig(path, formats[fmt_name], opened)


def read_error_log(source: str, value: Any) -> ErrorLogConfig | None:
    """`error_log = "path"` or { path = "...", level = "warn" } (stderr and info by default;
    None when absent: the command line's --log-level then applies)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, Mapping):
        raise ConfigError(source, "error_log", "expected a path or { path = \"...\", level = "
                          "\"warn\" }")
    unknown = set(value) - {"path", "level"}
    if unknown:
        raise ConfigError(source, f"error_log.{sorted(unknown)[0]}", "unknown key")
    path = value.get("path", "stderr")
    level = value.get("level", "info")
    if not isinstance(path, str) or not path:
        raise ConfigError(source, "error_log.path", "expected a path or \"stderr\"")
    if level not in ("debug", "info", "notice", "warn", "error", "crit"):
        raise ConfigError(source, "error_log.level",
                          f"unknown level {level!r} (debug, info, notice, warn, error or crit)")
    try:
        check_path(path)
    except ValueError as exc:
        raise ConfigError(source, "error_log.path", str(exc)) from None
    return ErrorLogConfig(path, level)


# --- error log -------------------------------------------------------------------------------

_error_handler: logging.Handler | None = None
_error_config: ErrorLogConfig | None = None


def setup_error_log(cfg: ErrorLogConfig | None, default_level: str = "info") -> None:
    """Send the "fastws" logger to the configured file (or stderr), at the configured level;
    called again on reload and on SIGUSR1 (reopen)."""
    global _error_handler, _error_config
    cfg = cfg or ErrorLogConfig(level=default_level)
    logger = logging.getLogger("fastws")
    if _error_handler is not None:
        logger.removeHandler(_error_handler)
        _error_handler.close()
    handler: logging.Handler
    if cfg.path == "stderr":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = logging.FileHandler(cfg.path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(
        "%(asctime)s [%(levelname)s] %(process)d: %(message)s", "%Y/%m/%d %H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(LEVELS[cfg.level])
    logger.propagate = False
    _error_handler, _error_config = handler, cfg


def reopen_error_log() -> None:
    if _error_config is not None and _error_config.path != "stderr":
        setup_error_log(_error_config)


# --- rendering -------------------------------------------------------------------------------

def _escape(value: str) -> str:
    if not value:
        return "-"
    if _UNSAFE.search(value) is None:
        return value
    # values are bytes from the wire read as latin-1: each character is one byte again
    return _UNSAFE.sub(lambda m: "".join(f"\\x{b:02X}" for b in _wire(m.group())), value)


def _wire(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _remote_user(conn: "ClientConn") -> str:
    import base64
    auth = conn.head.get(b"authorization") if getattr(conn, "head", None) else None
    if not auth or not auth[:6].lower() == b"basic ":
        return ""
    try:
        return base64.b64decode(auth[6:].strip(), validate=True).split(b":", 1)[0].decode(
            "latin-1")
    except ValueError:
        return ""


def render_early(fmt: LogFormat, conn: "ClientConn") -> tuple[str, ...]:
    """The request's variables a format uses, rendered now (a tunnel keeps only this tuple)."""
    from .proxy import Variables

    head = getattr(conn, "head", None)
    values = Variables(conn, head) if head is not None else None
    out = []
    for name in fmt.early:
        if name == "request":
            v = head.request_line.decode("latin-1") if head is not None else ""
        elif name == "remote_user":
            v = _remote_user(conn)
        elif name == "connection":
            v = str(getattr(conn, "number", 0))
        elif name == "connection_requests":
            v = "1"
        elif name == "upstream_addr":
            v = conn.peer.name if conn.peer is not None else ""
        elif name == "server_protocol":
            v = head.request_line.rsplit(b" ", 1)[-1].decode("latin-1") if head is not None else ""
        elif name == "pid":
            v = str(os.getpid())
        elif name == "remote_addr":
            v = conn.remote_addr
        elif values is not None:
            v = values.variable(name)
        else:
            v = ""
        out.append(v)
    return tuple(out)


def _ms(seconds: float) -> str:
    return f"{seconds:.3f}"


class Ending:
    """What is known when a line is written: the answer and the times."""

    __slots__ = ("status", "bytes_sent", "head_sent", "request_length", "request_time",
                 "upstream_status", "connect_time", "header_time", "response_time",
                 "upstream_sent", "upstream_received", "tunnel", "close")

    def __init__(self, status: int, bytes_sent: int, head_sent: int, request_length: int,
                 request_time: float, upstream_status: int = 0, connect_time: float = -1.0,
                 header_time: float = -1.0, response_time: float = -1.0,
                 upstream_sent: int = 0, upstream_received: int = 0, tunnel: str = "",
                 close: str = "") -> None:
        self.status = status
        self.bytes_sent = bytes_sent
        self.head_sent = head_sent
        self.request_length = request_length
        self.request_time = request_time
        self.upstream_status = upstream_status
        self.connect_time = connect_time
        self.header_time = header_time
        self.response_time = response_time
        self.upstream_sent = upstream_sent
        self.upstream_received = upstream_received
        self.tunnel = tunnel
        self.close = close

    def variable(self, name: str, now: float) -> str:
        if name == "status":
            return str(self.status) if self.status else ""
        if name == "body_bytes_sent":
            return str(max(0, self.bytes_sent - self.head_sent))
        if name == "bytes_sent":
            return str(self.bytes_sent)
        if name == "request_length":
            return str(self.request_length)
        if name == "request_time":
            return _ms(self.request_time)
        if name == "time_local":
            return _time_local(now)
        if name == "time_iso8601":
            return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now)) + _tz(now, ":")
        if name == "msec":
            return f"{now:.3f}"
        if name == "upstream_status":
            return str(self.upstream_status) if self.upstream_status else ""
        if name == "upstream_connect_time":
            return _ms(self.connect_time) if self.connect_time >= 0 else ""
        if name == "upstream_header_time":
            return _ms(self.header_time) if self.header_time >= 0 else ""
        if name == "upstream_response_time":
            return _ms(self.response_time) if self.response_time >= 0 else ""
        if name == "upstream_bytes_sent":
            return str(self.upstream_sent) if self.upstream_status else ""
        if name == "upstream_bytes_received":
            return str(self.upstream_received) if self.upstream_status else ""
        if name == "tunnel":
            return self.tunnel
        if name == "tunnel_close":
            return self.close
        return ""


def _tz(now: float, sep: str = "") -> str:
    off = time.localtime(now).tm_gmtoff
    sign = "+" if off >= 0 else "-"
    off = abs(off) // 60
    return f"{sign}{off // 60:02d}{sep}{off % 60:02d}"


def _time_local(now: float) -> str:
    t = time.localtime(now)
    return (f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year}:"
            f"{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} {_tz(now)}")


def render(fmt: LogFormat, early: tuple[str, ...], end: Ending, now: float) -> bytes:
    if fmt.json:
        obj = {}
        for kind, name in fmt.parts:
            obj[name] = early[fmt.early.index(name)] if kind == 1 else end.variable(name, now)
        return orjson.dumps(obj) + b"\n"
    out = []
    for kind, text in fmt.parts:
        if kind == 0:
            out.append(text)
        elif kind == 1:
            out.append(_escape(early[fmt.early.index(text)]))
        else:
            out.append(_escape(end.variable(text, now)))
    out.append("\n")
    return "".join(out).encode("utf-8", "backslashreplace")


# --- what a worker logs ----------------------------------------------------------------------

def log_request(w: "Worker", conn: "ClientConn") -> None:
    """The line of a request answered without a tunnel, when its connection closes."""
    loc = conn.location
    cfg = loc.access_log if loc is not None else _server_log(conn)
    if cfg is None:
        return
    now = time.monotonic()
    head = getattr(conn, "head", None)
    connected = getattr(conn, "t_connected", None) if conn.peer is not None else None
    end = Ending(
        conn.status, conn.sent, conn.head_sent, head.size if head is not None else 0,
        now - conn.started,
        upstream_status=conn.response.status if conn.response is not None else 0,
        connect_time=connected - conn.t_connect if connected else -1.0,
        response_time=now - conn.t_connect if connected else -1.0)
    w.logs.write(cfg, render_early(cfg.format, conn), end)


def _server_log(conn: "ClientConn") -> AccessLogConfig | None:
    # A request that matched no location (or had no head) is logged by the server's log: the
    # one its locations inherit unless they set their own.
    logs = {loc.access_log for loc in conn.server.locations}
    return logs.pop() if len(logs) == 1 else None


def log_tunnel(w: "Worker", record: "TunnelRecord", event: str, up: int, down: int,
               relayed: float, reason: str = "") -> None:
    """A tunnel's line: status 101, the bytes it carried each way (heads included, as nginx's
    $bytes_sent and $request_length), its whole life in $request_time, and in
    $upstream_response_time the time from the upstream connect to the close (relayed: the
    engine's part of it; -1 when the tunnel opens)."""
    cfg, early = record.log
    plain = record.head_bytes_out == 0     # a plain request relayed as a stream
    sent = record.head_bytes_out + down
    w.logs.write(cfg, early, Ending(
        0 if plain else 101, sent, record.head_bytes_out, record.head_bytes_in + up,
        time.monotonic() - record.started, upstream_status=0 if plain else 101,
        connect_time=record.connect_time, header_time=record.header_time,
        response_time=record.header_time + relayed if relayed >= 0 else -1.0,
        upstream_sent=record.head_bytes_in + up, upstream_received=sent,
        tunnel=event, close=reason))


# --- writers ---------------------------------------------------------------------------------

class LogFile:
    """One access log file of a worker: lines gathered in memory, written in one write(2) by a
    timer, when the buffer is full, and at exit."""

    __slots__ = ("path", "fd", "buf", "size")

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = -1
        self.buf: list[bytes] = []
        self.size = 0
        self.open()

    def open(self) -> None:
        if self.path == "stderr":
            self.fd = 2
            return
        try:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                              0o644)
        except OSError as exc:
            log.error("cannot open access log %s: %s", self.path, exc.strerror)
            self.fd = -1

    def write(self, line: bytes) -> None:
        self.buf.append(line)
        self.size += len(line)
        if self.size >= BUFFER_SIZE:
            self.flush()

    def flush(self) -> None:
        if not self.buf:
            return
        data = b"".join(self.buf)
        self.buf.clear()
        self.size = 0
        if self.fd < 0:
            return
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except OSError as exc:
            log.error("cannot write to access log %s: %s", self.path, exc.strerror)

    def reopen(self) -> None:
        self.flush()
        if self.fd > 2:
            os.close(self.fd)
        self.open()

    def close(self) -> None:
        self.flush()
        if self.fd > 2:
            os.close(self.fd)
        self.fd = -1


class AccessLogs:
    """The access logs of one worker, by path."""

    def __init__(self) -> None:
        self.files: dict[str, LogFile] = {}
        self._timer: Any = None
        self._loop: Any = None

    def start(self, loop: Any) -> None:
        self._loop = loop
        self._tick()

    def _tick(self) -> None:
        self.flush()
        self._timer = self._loop.call_later(FLUSH_INTERVAL, self._tick)

    def file(self, path: str) -> LogFile:
        f = self.files.get(path)
        if f is None:
            f = self.files[path] = LogFile(path)
        return f

    def write(self, cfg: AccessLogConfig, early: tuple[str, ...], end: Ending) -> None:
        self.file(cfg.path).write(render(cfg.format, early, end, time.time()))

    def flush(self) -> None:
        for f in self.files.values():
            f.flush()

    def reopen(self) -> None:
        for f in self.files.values():
            f.reopen()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for f in self.files.values():
            f.close()
