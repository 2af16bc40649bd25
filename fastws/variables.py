"""The one table of nginx variables fastws knows: name, number and phase.

The engine evaluates them (engine/vars.pxi), by number, for set_headers values, hash keys and
access-log formats alike.  A variable of the request phase is known once a request is routed
(its head, its client, its server); one of the log phase only when its log line is written
(status, bytes, times).  set_headers values and hash keys may use request-phase variables;
log formats may use both.  The numbers are the engine's `Var` enum (_engine.pxd), in the same
order; a test checks that the two agree.

Adding a variable: a row here, a member of `Var` at the same place, and a branch in var_put
(or log_var_put) in engine/vars.pxi (or engine/log.pxi).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator, Mapping

REQUEST, LOG = 0, 1

# name, phase; the number is the position (the engine's Var enum).
_TABLE: tuple[tuple[str, int], ...] = (
    ("host", REQUEST),
    ("remote_addr", REQUEST),
    ("remote_port", REQUEST),
    ("scheme", REQUEST),
    ("server_addr", REQUEST),
    ("server_port", REQUEST),
    ("server_name", REQUEST),
    ("request_uri", REQUEST),
    ("uri", REQUEST),
    ("args", REQUEST),
    ("query_string", REQUEST),
    ("request_method", REQUEST),
    ("proxy_add_x_forwarded_for", REQUEST),
    ("proxy_host", REQUEST),
    ("connection_upgrade", REQUEST),
    ("http_", REQUEST),           # $http_NAME: a request header
    ("arg_", REQUEST),            # $arg_NAME: a query argument
    ("cookie_", REQUEST),         # $cookie_NAME: a cookie
    ("request", REQUEST),
    ("remote_user", REQUEST),
    ("server_protocol", REQUEST),
    ("connection", REQUEST),
    ("connection_requests", REQUEST),
    ("pid", REQUEST),
    ("proxy_protocol_addr", REQUEST),
    ("proxy_protocol_port", REQUEST),
    ("proxy_protocol_server_addr", REQUEST),
    ("proxy_protocol_server_port", REQUEST),
    ("binary_remote_addr", REQUEST),   # the client's address as 4 or 16 bytes (limit keys)
    ("map_", REQUEST),            # a variable made by a `map` (its argument: the map's index)
    ("hook_", REQUEST),           # $hook_NAME: a value the location's Python hook set
    ("upstream_addr", LOG),
    ("status", LOG),
    ("body_bytes_sent", LOG),
    ("bytes_sent", LOG),
    ("request_length", LOG),
    ("request_time", LOG),
    ("time_local", LOG),
    ("time_iso8601", LOG),
    ("msec", LOG),
    ("upstream_status", LOG),
    ("upstream_connect_time", LOG),
    ("upstream_header_time", LOG),
    ("upstream_response_time", LOG),
    ("upstream_bytes_sent", LOG),
    ("upstream_bytes_received", LOG),
    ("tunnel", LOG),
    ("tunnel_close", LOG),
    # a WebSocket tunnel that follows its frames (engine/frames.pxi), on its close line
    ("ws_close_code", LOG),       # the first close frame's code (1006: none either way)
    ("ws_close_reason", LOG),     # that code's name (RFC 6455 7.4.1): normal, going_away, ...
    ("ws_closed_by", LOG),        # who sent that close frame, or ended the stream: client,
                                  # upstream or proxy
    ("ws_messages_in", LOG),      # data messages from the client
    ("ws_messages_out", LOG),     # data messages to the client
    ("ws_pings", LOG),            # pings the proxy sent (either way)
)

NUMBERS: dict[str, int] = {name: i for i, (name, _) in enumerate(_TABLE)}
PHASES: dict[str, int] = dict(_TABLE)
FAMILIES = ("http_", "arg_", "cookie_", "hook_")
NAMED = FAMILIES + ("map_",)   # rows that are not variables by themselves

# The variables the configuration's maps make: name -> the map's index, while a configuration
# is read (config.from_dict sets it around the reading, so that every template sees them).
_MAPS: ContextVar[Mapping[str, int]] = ContextVar("maps", default={})


@contextmanager
def maps_known(maps: Mapping[str, int]) -> Iterator[None]:
    token = _MAPS.set(maps)
    try:
        yield
    finally:
        _MAPS.reset(token)

_VAR = re.compile(r"\$(?:\{([A-Za-z0-9_]+)\}|([A-Za-z0-9_]+))")


@dataclass(frozen=True, slots=True)
class Variable:
    name: str           # as written, lower case ("http_x_real_ip")
    number: int         # the engine's Var
    arg: str            # a family's NAME, as the engine compares it ("x-real-ip"), else ""
    phase: int


def lookup(name: str) -> Variable:
    """The variable $name; ValueError if fastws does not know it."""
    name = name.lower()
    maps = _MAPS.get()
    if name in maps:
        return Variable(name, NUMBERS["map_"], str(maps[name]), REQUEST)
    if name in NUMBERS and name not in NAMED:
        return Variable(name, NUMBERS[name], "", PHASES[name])
    for family in FAMILIES:
        if name.startswith(family) and len(name) > len(family):
            arg = name[len(family):]
            # $http_x_real_ip names the header X-Real-IP (nginx: '_' for '-', any case)
            if family == "http_":
                arg = arg.replace("_", "-")
            return Variable(name, NUMBERS[family], arg, REQUEST)
    raise ValueError(f"unknown variable ${name}")


@dataclass(frozen=True, slots=True)
class Template:
    """A value with nginx variables in it, split once into literal text and variables."""

    text: str
    parts: tuple[tuple[int, str], ...]   # (variable number, its argument), or (-1, literal)

    @property
    def variables(self) -> tuple[str, ...]:
        return tuple(_names(self.text))


def _names(text: str) -> list[str]:
    return [(m.group(1) or m.group(2)).lower() for m in _VAR.finditer(text)]


def parse_template(text: str, *, phase: int = REQUEST) -> Template:
    """Split a value into literals and variables; ValueError for an unknown variable or one
    not known in `phase` (a log-phase variable where only request ones make sense)."""
    parts: list[tuple[int, str]] = []
    pos = 0
    for m in _VAR.finditer(text):
        if m.start() > pos:
            parts.append((-1, text[pos:m.start()]))
        var = lookup(m.group(1) or m.group(2))
        if var.phase > phase:
            raise ValueError(f"${var.name} is known only when the log line is written")
        parts.append((var.number, var.arg))
        pos = m.end()
    if pos < len(text):
        parts.append((-1, text[pos:]))
    return Template(text, tuple(parts))
