"""Access log and error log: their configuration (nginx's log_format and access_log), the
error log's setup, and the files a worker's engine writes access-log lines to.

A format is parsed once, at configuration time, into literal text and variables of the one
table (variables.py).  The engine renders and gathers the lines and writes them with one
write(2) per batch on an O_APPEND descriptor, so that several workers can share a file; Python
opens the files, and reopens them on SIGUSR1.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from . import variables
from .errors import ConfigError

if TYPE_CHECKING:
    from ._engine import Engine

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
    text: str                           # as written (a JSON format: its variable names)
    parts: tuple[tuple[int, str], ...]  # (variable number, argument), or (-1, literal)
    names: tuple[str, ...] = ()         # a JSON format: the key of each part
    json: bool = False
    escape: str = "default"             # nginx's escape=: "default", "json" or "none"

    @property
    def early(self) -> tuple[int, ...]:
        """The parts holding request-phase variables, rendered when the request is routed."""
        return tuple(i for i, (number, _) in enumerate(self.parts)
                     if number >= 0 and number < variables.NUMBERS["upstream_addr"])


@dataclass(frozen=True, slots=True)
class AccessLogConfig:
    path: str                  # a file, or "stderr"
    format: LogFormat
    open: bool = False         # also write a line when a tunnel opens


@dataclass(frozen=True, slots=True)
class ErrorLogConfig:
    path: str = "stderr"
    level: str = "info"


ESCAPES = ("default", "json", "none")   # in the engine's order (ESCAPE_*)


def compile_format(name: str, text: str | list[str] | tuple[str, ...], *,
                   json: bool = False, escape: str = "default") -> LogFormat:
    """Parse a log_format once: a string with $variables, or (json) a list of variable names."""
    if json:
        parts, names = [], []
        for v in text:
            var = variables.lookup(v.lstrip("$"))
            parts.append((var.number, var.arg))
            names.append(var.name)
        return LogFormat(name, " ".join(text), tuple(parts), tuple(names), True)
    assert isinstance(text, str)
    template = variables.parse_template(text, phase=variables.LOG)
    return LogFormat(name, text, template.parts, escape=escape)


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
            elif isinstance(value, Mapping) and "format" in value and \
                    set(value) <= {"format", "escape"}:
                text = value["format"]
                escape = value.get("escape", "default")
                if escape not in ESCAPES:
                    raise ValueError(f"escape: expected one of {', '.join(ESCAPES)}")
                if isinstance(text, list) and all(isinstance(v, str) for v in text):
                    text = "".join(text)
                if not isinstance(text, str):
                    raise ValueError("format: expected a format string")
                formats[name] = compile_format(name, text, escape=escape)
            elif isinstance(value, Mapping) and set(value) == {"json"} \
                    and isinstance(value["json"], list) and value["json"] \
                    and all(isinstance(v, str) for v in value["json"]):
                formats[name] = compile_format(name, value["json"], json=True)
            else:
                raise ValueError("expected a format string, { format = \"...\", escape = "
                                 "\"json\" }, or { json = [\"variable\", ...] }")
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


# --- the worker's log files ------------------------------------------------------------------

def open_log(path: str) -> int:
    """An fd for the engine to append a log's lines to (2 for "stderr"; -1 if it cannot)."""
    if path == "stderr":
        return os.dup(2)
    try:
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        log.error("cannot open access log %s: %s", path, exc.strerror)
        return -1


def reopen(engine: "Engine") -> None:
    """SIGUSR1 (after logrotate moved the files): the engine writes to new fds from now on."""
    for index, path in enumerate(engine.log_paths):
        old = engine.reopen_log(index, open_log(path))
        if old >= 0:
            os.close(old)
