"""Python hooks: code a configuration names, which the engine calls at two points only.

- `hook = "package.module:function"` (a server or a location): called once per WebSocket
  handshake (and once per plain request with `hook_requests = true`) after the request is
  routed and checked, before an upstream server is chosen.  It gets a read-only `Request` and
  returns None (go on as configured), a `Decision` or a `Deny`.  A coroutine function runs on
  the worker's event loop; the connection waits, bounded by `hook_timeout`, and nothing else
  does.
- `on_tunnel_close = "package.module:function"`: called once per tunnel after it closed, with
  a `TunnelClosed`.  It runs off the engine's path: a plain function in one thread of its own
  per worker, a coroutine function on the event loop; the relay never waits for it.

A location without them costs nothing: the engine checks one integer.  docs/extending.md says
what runs where.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import queue
import re
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, Union

log = logging.getLogger("fastws")

__all__ = ["Decision", "Deny", "Headers", "Request", "TunnelClosed"]


# --- what a hook is given ---------------------------------------------------------------------

class Headers:
    """A request's headers in their order, as sent; lookups ignore case."""

    __slots__ = ("_items", "_index")

    def __init__(self, items: Sequence[tuple[str, str]]) -> None:
        self._items = tuple(items)
        self._index: dict[str, list[str]] | None = None

    def _lookup(self) -> dict[str, list[str]]:
        if self._index is None:
            index: dict[str, list[str]] = {}
            for name, value in self._items:
                index.setdefault(name.lower(), []).append(value)
            self._index = index
        return self._index

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of the header `name`, or `default`."""
        values = self._lookup().get(name.lower())
        return values[0] if values else default

    def getall(self, name: str) -> list[str]:
        """Every value of the header `name`, in order."""
        return list(self._lookup().get(name.lower(), ()))

    def items(self) -> tuple[tuple[str, str], ...]:
        return self._items

    def __getitem__(self, name: str) -> str:
        values = self._lookup().get(name.lower())
        if not values:
            raise KeyError(name)
        return values[0]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Headers({list(self._items)!r})"


class Request(Protocol):
    """What a hook is given (the engine's `RequestView`): a copy of the request, read-only."""

    method: str                  # "GET"
    target: str                  # the request target as sent: "/chat?room=1"
    path: str                    # the target before '?', as sent (not percent-decoded)
    query: str                   # after '?', "" when none
    args: Mapping[str, str]      # the query's arguments (the first value of each)
    headers: Headers
    host: str                    # the Host header's name, lower case, without its port
    client_addr: str             # the client's address (the real one, after real_ip)
    client_port: int
    server_name: str             # the server block's first server_name
    location: str                # the location's path, as written
    websocket: bool              # a WebSocket handshake (else a plain request)
    tls: bool
    tls_sni: str | None          # the name the client asked for in its TLS handshake
    tls_alpn: str | None         # the protocol ALPN settled on
    tls_client_subject: str | None   # the client certificate's subject ("/CN=..."), if any

    def variable(self, name: str) -> str:
        """nginx's $name, as the engine evaluates it ("" when it has none)."""
        ...


# --- what a hook returns ----------------------------------------------------------------------

HeaderItems = Union[Mapping[str, str], Sequence[tuple[str, str]]]


@dataclass(frozen=True, slots=True)
class Deny:
    """Answer the client now; nothing goes upstream.  Without a body, the status's error page
    (as the proxy's own errors), and the connection closes after it."""

    status: int = 403
    body: str | bytes | None = None
    headers: HeaderItems = ()
    content_type: str = "text/plain"
    log: Mapping[str, str] = field(default_factory=dict)   # $hook_NAME values


@dataclass(frozen=True, slots=True)
class Decision:
    """Go on, changed:

    - `upstream`: another [[upstream]] group, by name;
    - `address`: a server of a configured upstream group ("10.0.0.5:8080", "[::1]:9000"),
      tried first; if it is down or full, its group's method chooses (a hook cannot send a
      request anywhere the configuration does not name);
    - `set_headers` replaces (or adds) request headers going upstream, `add_headers` appends,
      `remove_headers` removes (hop-by-hop and framing headers cannot be touched);
    - `hash_key`: the key of a `hash` or consistent-hash group, instead of its template;
    - `log`: values for the log variables $hook_NAME (also in set_headers and hash keys, and
      given to on_tunnel_close)."""

    upstream: str | None = None
    address: str | None = None
    set_headers: HeaderItems = ()
    add_headers: Sequence[tuple[str, str]] = ()
    remove_headers: Sequence[str] = ()
    hash_key: str | bytes | None = None
    log: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TunnelClosed:
    """A tunnel's figures, given to on_tunnel_close once it closed."""

    client_addr: str
    client_port: int
    server_name: str
    location: str
    upstream: str                # the server's address, as $upstream_addr
    bytes_from_client: int
    bytes_to_client: int
    messages_from_client: int    # data messages (a tunnel that follows its frames; else 0)
    messages_to_client: int
    duration: float              # seconds from the 101 to the close
    reason: str                  # as $tunnel_close: "client", "upstream", "idle_timeout", ...
    close_code: int              # the first close frame's code; 1006: none; 0: frames off
    closed_by: str               # "client", "upstream", "proxy" ("" with frames off)
    hook: Mapping[str, str]      # the $hook_NAME values the handshake's hook set


class HookError(Exception):
    """A hook's decision the engine cannot carry out (an unknown upstream, a bad header)."""


# --- running them -----------------------------------------------------------------------------

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# a header value (RFC 9110 5.5): no CR, LF, NUL or other control character but tab
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_LOG_NAME = re.compile(r"[a-z0-9_]+")
# headers whose change would break the exchange's framing or the upgrade
_FRAMING = frozenset(["connection", "upgrade", "keep-alive", "proxy-connection", "te", "trailer",
                      "transfer-encoding", "content-length"])
_ANSWER_OWN = frozenset(["content-length", "content-type", "connection", "transfer-encoding"])
MAX_ADDED = 16384            # bytes of header lines and log values one decision may add


@dataclass(frozen=True, slots=True)
class Targets:
    """Where a decision may send a request: upstream groups by name, and each configured
    server's address ("127.0.0.1:8001", "[::1]:8001") as (group, server) indexes."""

    groups: Mapping[str, int]
    addresses: dict[str, list[tuple[int, int]]] = field(default_factory=dict)

    def follow(self, groups: Sequence[Any]) -> None:
        """The servers' addresses as the compiled groups (in the engine's order) have them
        now: at start, and after a `resolve` name changed its addresses."""
        self.addresses.clear()
        for gi, group in enumerate(groups):
            for pi, peer in enumerate(group.peers):          # in the configuration's order
                self.addresses.setdefault(peer.name, []).append((gi, pi))


_loaded: dict[str, int] = {}     # module name -> its file's mtime when it was (re)loaded


def load(path: str) -> Callable[..., Any]:
    """The function `package.module:function` names; ValueError naming the problem.  A module
    whose file changed since it was imported is imported again (a reload runs the new code)."""
    import importlib
    import sys
    module_name, sep, name = path.partition(":")
    if not sep or not module_name or not name:
        raise ValueError(f"{path!r} is not an import path \"package.module:function\"")
    try:
        module = sys.modules.get(module_name)
        if module is not None and module_name in _loaded:
            mtime = _mtime(module)
            if mtime != _loaded[module_name]:
                module = importlib.reload(module)
        else:
            module = importlib.import_module(module_name)
        _loaded[module_name] = _mtime(module)
    except Exception as exc:   # an ImportError, or whatever the module raised while importing
        raise ValueError(f"cannot import {module_name!r} for {path!r}: "
                         f"{type(exc).__name__}: {exc}") from None
    fn: Any = module
    for part in name.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"module {module_name!r} has no {name!r}")
    if not callable(fn):
        raise ValueError(f"{path!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _mtime(module: Any) -> int:
    import os
    try:
        return os.stat(module.__file__).st_mtime_ns if getattr(module, "__file__", None) else 0
    except OSError:
        return 0


def where(exc: BaseException) -> str:
    """The traceback's last frame, for one log line: "file.py:12 in check"."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" ({last.filename.rsplit('/', 1)[-1]}:{last.lineno} in {last.name})"


PENDING = object()   # a coroutine hook was started: its decision comes later


class Hook:
    """One configured hook, as a worker runs it."""

    __slots__ = ("fn", "path", "targets")

    def __init__(self, fn: Callable[..., Any], path: str, targets: Targets) -> None:
        self.fn = fn
        self.path = path
        self.targets = targets

    def failed(self, exc: BaseException) -> tuple[Any, ...]:
        log.error("hook %s failed: %s: %s%s", self.path, type(exc).__name__, exc, where(exc))
        return error(500)

    def decide(self, result: Any) -> tuple[Any, ...] | None:
        """A hook's return value as the engine applies it (see `engine/hooks.pxi`):
        (status, extra head lines, body or None, content type, group, peer, header names
        dropped, header lines added, hash key or None, $hook_ values); None: go on unchanged.
        Anything that cannot be applied is a 500 (a hook fails closed, never open)."""
        try:
            return self._decide(result)
        except HookError as exc:
            log.error("hook %s: %s", self.path, exc)
        except Exception as exc:       # a field of the wrong type, a value that cannot encode
            log.error("hook %s returned a decision that cannot be applied: %s: %s", self.path,
                      type(exc).__name__, exc)
        return error(500)

    def _decide(self, result: Any) -> tuple[Any, ...] | None:
        if result is None:
            return None
        if isinstance(result, Deny):
            return self._deny(result)
        if not isinstance(result, Decision):
            raise HookError(f"returned {type(result).__name__}, not None, a Decision or a Deny")
        group = peer = -1
        if result.upstream is not None:
            try:
                group = self.targets.groups[result.upstream]
            except KeyError:
                raise HookError(f"no upstream group {result.upstream!r}") from None
        if result.address is not None:
            group, peer = self._address(result.address, group)
        drop: list[bytes] = []
        add: list[bytes] = []
        for name, value in _pairs(result.set_headers):
            lname = _header_name(name, "set_headers")
            drop.append(lname.encode() + b"\0")
            add.append(_header_line(name, value))
        for name, value in result.add_headers:
            if _header_name(name, "add_headers") == "host":
                raise HookError("add_headers cannot add a second Host (set_headers replaces it)")
            add.append(_header_line(name, value))
        for name in result.remove_headers:
            if _header_name(name, "remove_headers") == "host":
                raise HookError("remove_headers cannot remove Host (HTTP/1.1 requires it; "
                                "set_headers replaces it)")
            drop.append(_header_name(name, "remove_headers").encode() + b"\0")
        key = None
        if result.hash_key is not None:
            key = result.hash_key.encode() if isinstance(result.hash_key, str) \
                else bytes(result.hash_key)
            if len(key) > 4096:
                raise HookError("hash_key is longer than 4096 bytes")
        added = b"".join(add)
        values = _log_values(result.log)
        if len(added) + len(values) > MAX_ADDED:
            raise HookError(f"the decision adds more than {MAX_ADDED} bytes")
        return (0, b"", None, b"", group, peer, b"".join(drop), added, key, values)

    def _deny(self, d: Deny) -> tuple[Any, ...]:
        if not isinstance(d.status, int) or not 200 <= d.status <= 599:
            raise HookError(f"Deny status {d.status!r} is not 200-599")
        extra = []
        for name, value in _pairs(d.headers):
            if _TOKEN.fullmatch(name) is None:
                raise HookError(f"Deny header name {name!r} is not a token")
            if name.lower() in _ANSWER_OWN:
                raise HookError(f"Deny cannot set {name} (the proxy writes it)")
            extra.append(_header_line(name, value))
        if not isinstance(d.body, (str, bytes, bytearray, memoryview, type(None))):
            raise HookError(f"Deny body is {type(d.body).__name__}, not text or bytes")
        body = d.body.encode() if isinstance(d.body, str) else \
            None if d.body is None else bytes(d.body)
        if not isinstance(d.content_type, str) or _BAD_VALUE.search(d.content_type):
            raise HookError("Deny content_type is not a one-line string")
        ctype = d.content_type.encode()
        return (d.status, b"".join(extra), body, ctype, -1, -1, b"", b"", None,
                _log_values(d.log))

    def _address(self, text: str, group: int) -> tuple[int, int]:
        # (group, server) of a configured server: in `group` if given, else the first group
        # that lists it
        if not isinstance(text, str):
            raise HookError(f"address {text!r} is not \"IP:port\"")
        host, sep, port = text.rpartition(":")
        try:
            ip = ipaddress.ip_address(host.strip("[]"))
            if not sep or not port.isdigit():
                raise ValueError
        except ValueError:
            raise HookError(f"address {text!r} is not \"IP:port\"") from None
        key = f"[{ip}]:{int(port)}" if ip.version == 6 else f"{ip}:{int(port)}"
        for gi, pi in self.targets.addresses.get(key, ()):
            if group < 0 or gi == group:
                return gi, pi
        if group >= 0:
            raise HookError(f"address {text!r} is not a server of that upstream group")
        raise HookError(f"address {text!r} is not a server of any upstream group")


def error(status: int) -> tuple[Any, ...]:
    return (status, b"", None, b"", -1, -1, b"", b"", None, b"")


def _pairs(items: HeaderItems) -> Sequence[tuple[str, str]]:
    if isinstance(items, Mapping):
        return list(items.items())
    return items


def _header_name(name: str, what: str) -> str:
    if not isinstance(name, str) or _TOKEN.fullmatch(name) is None:
        raise HookError(f"{what}: header name {name!r} is not a token")
    lname = name.lower()
    if lname in _FRAMING:
        raise HookError(f"{what}: {name} belongs to the proxy (hop-by-hop or framing)")
    return lname


def _header_line(name: str, value: str) -> bytes:
    if not isinstance(value, str) or _BAD_VALUE.search(value):
        raise HookError(f"header {name}: {value!r} is not a one-line string")
    return f"{name}: {value}\r\n".encode()


def _log_values(values: Mapping[str, str]) -> bytes:
    out = []
    for name, value in values.items():
        if not isinstance(name, str) or _LOG_NAME.fullmatch(name.lower()) is None:
            raise HookError(f"log: {name!r} is not a variable name ([a-z0-9_])")
        text = str(value)
        if _BAD_VALUE.search(text):
            # (a $hook_ value may go into a header upstream through set_headers)
            raise HookError(f"log: the value of {name} has a control character")
        out.append(f"{name.lower()}\0{text}\0".encode())
    return b"".join(out)


# --- tunnel-close callbacks -------------------------------------------------------------------

QUEUE_LIMIT = 100_000        # records waiting for a slow callback; more are dropped (counted)


class CloseCallbacks:
    """Delivers TunnelClosed records off the engine's path: plain functions in one thread per
    worker (in order), coroutine functions as tasks on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.dropped = 0
        self.tasks: set[asyncio.Task[Any]] = set()     # coroutine callbacks running
        self._queue: queue.SimpleQueue[tuple[Callable[..., Any], str, TunnelClosed] | None] = \
            queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def deliver(self, fn: Callable[..., Any], path: str, record: TunnelClosed) -> None:
        if asyncio.iscoroutinefunction(fn):
            task = self.loop.create_task(fn(record))
            self.tasks.add(task)
            task.add_done_callback(lambda t: self._done(path, t))
            return
        if self._queue.qsize() >= QUEUE_LIMIT:
            self.dropped += 1
            if self.dropped in (1, 1000) or self.dropped % 100_000 == 0:
                log.warning("on_tunnel_close %s is slower than tunnels close: %d records "
                            "dropped", path, self.dropped)
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="fastws-on-tunnel-close",
                                            daemon=True)
            self._thread.start()
        self._queue.put((fn, path, record))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            fn, path, record = item
            try:
                fn(record)
            except Exception as exc:
                log.error("on_tunnel_close %s failed: %s: %s%s", path, type(exc).__name__, exc,
                          where(exc))

    def _done(self, path: str, task: "asyncio.Task[Any]") -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            assert exc is not None
            log.error("on_tunnel_close %s failed: %s: %s%s", path, type(exc).__name__, exc,
                      where(exc))

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (within `timeout`), then stop the thread."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

