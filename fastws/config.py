"""Configuration: a TOML file read into frozen dataclasses.

Every check happens here, at start-up (and on reload), so that a mistake is one line naming the
file, the key and the problem, and never a traceback at run time.
"""

from __future__ import annotations

import importlib
import ipaddress
import os
import re
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping

from . import accesslog, tls, variables
from .addresses import MAX_CHASH_WEIGHT, Address, PeerSpec, host_of, parse_address, resolve
from .dns import ResolverConfig
from .errors import ConfigError
from .tls import TLSConfig, UpstreamTLS
from .variables import Template, parse_template

# nginx's time units (ngx_parse_time): ms, s, m, h, d, w, M (30 days), y (365 days); a bare number is
# seconds, and units can be combined as in "1h30m".
_TIME_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800,
               "M": 2592000, "y": 31536000}
_TIME_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w|M|y)?")
_SIZE_UNITS = {"": 1, "k": 1024, "K": 1024, "m": 1 << 20, "M": 1 << 20, "g": 1 << 30, "G": 1 << 30}
_SIZE = re.compile(r"(\d+)([kKmMgG]?)")

BALANCE_METHODS = ("round_robin", "ip_hash", "hash", "least_conn")
RELAY_MODES = ("auto", "splice", "copy")
ENGINE_BACKENDS = ("auto", "io_uring", "epoll")
STATUS_FORMATS = ("stub", "json", "prometheus", "ready", "live")

def parse_duration(text: Any) -> float:
    """Turn an nginx time ('500ms', '60s', '5m', '1h30m', '7d', or a number of seconds) into seconds."""
    if isinstance(text, bool):
        raise ValueError("a duration is a string such as \"60s\" or a number of seconds")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError("a duration cannot be negative")
        return float(text)
    if not isinstance(text, str) or not text:
        raise ValueError("a duration is a string such as \"60s\" or a number of seconds")
    pos, total = 0, 0.0
    while pos < len(text):
        m = _TIME_PART.match(text, pos)
        if m is None:
            raise ValueError(f"{text!r} is not a duration (use ms, s, m, h, d, w, M or y, e.g. \"60s\")")
        total += float(m.group(1)) * _TIME_UNITS[m.group(2) or "s"]
        pos = m.end()
    return total


def parse_size(text: Any) -> int:
    """Turn an nginx size ('512', '16k', '1m', '2g') into bytes."""
    if isinstance(text, bool):
        raise ValueError("a size is a string such as \"16k\" or a number of bytes")
    if isinstance(text, int):
        if text < 0:
            raise ValueError("a size cannot be negative")
        return text
    if not isinstance(text, str):
        raise ValueError("a size is a string such as \"16k\" or a number of bytes")
    m = _SIZE.fullmatch(text)
    if m is None:
        raise ValueError(f"{text!r} is not a size (use k, m or g, e.g. \"16k\")")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """One `servers` entry of an upstream group (nginx's `server` directive)."""

    address: str
    weight: int = 1
    max_fails: int = 1
    fail_timeout: float = 10.0
    max_conns: int = 0
    backup: bool = False
    down: bool = False
    resolve: bool = False    # a name that follows DNS (fastws/dns.py): each address a server


@dataclass(frozen=True, slots=True)
class StickyConfig:
    """Session persistence by cookie (nginx's `sticky cookie`): a response from server S sets
    the cookie to S's id, MD5(address) in hex, the same on every fastws instance; a request
    that brings it goes to S while S is usable."""

    cookie: str
    max_age: float | None = None      # nginx's expires=: the cookie's lifetime (Max-Age)
    domain: str | None = None
    path: str | None = None
    httponly: bool = False
    secure: bool = False
    samesite: str | None = None       # "strict", "lax" or "none"

    def attributes(self) -> str:
        """What follows NAME=VALUE in the Set-Cookie header."""
        out = ""
        if self.max_age is not None:
            out += f"; Max-Age={int(self.max_age)}"
        if self.domain:
            out += f"; Domain={self.domain}"
        if self.path:
            out += f"; Path={self.path}"
        if self.httponly:
            out += "; HttpOnly"
        if self.secure:
            out += "; Secure"
        if self.samesite:
            out += f"; SameSite={self.samesite.capitalize()}"
        return out


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    balance: str = "round_robin"
    hash_key: Template | None = None
    consistent: bool = False
    balance_factor: float = 0.0
    balancer: str | None = None
    keepalive: int = 0
    implicit: bool = False  # made from a proxy_pass URL, not an [[upstream]] table
    tls: UpstreamTLS | None = None
    keepalive_timeout: float = 60.0  # idle upstream connections kept this long
    keepalive_requests: int = 1000  # requests one upstream connection serves
    peers: tuple[PeerSpec, ...] = ()  # the servers resolved and checked, primaries first
    balancer_class: Any = None  # the custom balancer's class, imported
    sticky: StickyConfig | None = None
    send_proxy_protocol: int = 0  # 1 or 2: each connection opens with a PROXY header
    health_check: "HealthCheck | None" = None
    drain_timeout: float = 0.0   # a tunnel to an address that left DNS closes after it (0: never)
    # the DNS answers its `resolve` servers were expanded from: (host name, addresses)
    answers: tuple[tuple[str, tuple[str, ...]], ...] = ()

    def peer_host(self, peer_name: str, server_text: str) -> str:
        """A peer's host as written: its TLS name and SNI, a health check's Host.  For an
        address a `resolve` server's name gave ("10.1.0.7:8000"), that name."""
        answers = dict(self.answers)
        for server in self.servers:
            if not server.resolve:
                continue
            addr = parse_address(server.address)
            for ip in answers.get(addr.host, ()):
                if peer_name in (f"{ip}:{addr.port}", f"[{ip}]:{addr.port}"):
                    return addr.host
        return host_of(server_text)


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """An upstream's active health checks (fastws/health.py): each server is asked every
    `interval`; `fails` failures in a row make it unhealthy (not chosen, as a `down` one),
    `passes` successes in a row healthy again."""
    interval: float = 5.0
    timeout: float = 2.0
    fails: int = 2
    passes: int = 2
    uri: str = "/"
    expect_status: tuple[tuple[int, int], ...] = ((200, 299),)   # ranges, inclusive
    websocket: bool = False        # a WebSocket handshake (101 with the right accept key)
    host: str | None = None        # the Host header; default: the server's name as written

    def expects(self, status: int) -> bool:
        return any(lo <= status <= hi for lo, hi in self.expect_status)


PING_TO = {"client": 1, "upstream": 2, "both": 3}


@dataclass(frozen=True, slots=True)
class FramesConfig:
    """What a location's WebSocket tunnels do with their frames (engine/frames.pxi)."""
    on: bool = True                # follow the frames; false: relay bytes blind (nginx's way)
    max_message_size: int = 0      # a message over it closes both ways with 1009; 0: no limit
    checks: bool = True            # masking and opcode rules (RFC 6455 5.1, 5.2): 1002
    ping_interval: float = 0.0     # a side silent this long is pinged; 0: never
    ping_timeout: float = 30.0     # ... and closed with 1011 if its pong is this late
    ping_to: str = "client"        # "client", "upstream" or "both"
    close_timeout: float = 5.0     # the proxy's closing handshake waits this long for answers


@dataclass(frozen=True, slots=True)
class HookConfig:
    """A location's Python hooks (fastws/hooks.py), or its server's, which it inherits."""
    hook: str | None = None        # "package.module:function": called before the upstream
    hook_fn: Any = None            # ... imported
    requests: bool = False         # plain requests too, not only WebSocket handshakes
    timeout: float = 5.0           # a coroutine hook's decision is waited for this long (504)
    on_tunnel_close: str | None = None   # "package.module:function": each closed tunnel
    close_fn: Any = None


@dataclass(frozen=True, slots=True)
class LocationConfig:
    path: str
    exact: bool
    proxy_pass: str | None  # upstream name (implicit groups are named by their URL)
    proxy_uri: str | None  # the URI part of a proxy_pass URL, which replaces the matched prefix
    websocket: bool = True
    upgrade_tokens: tuple[str, ...] = ("websocket",)
    connect_timeout: float = 60.0
    send_timeout: float = 60.0
    read_timeout: float = 60.0
    idle_timeout: float = 0.0  # a tunnel silent both ways this long closes (0: no limit)
    max_tunnel_lifetime: float = 0.0  # a tunnel closes this long after its 101 (0: no limit)
    lifetime_spread: float = 0.0  # each tunnel's lifetime is shortened by a random part of it
    next_upstream_tries: int = 0
    next_upstream_timeout: float = 0.0
    set_headers: tuple[tuple[str, Template | None], ...] = ()
    relay: str = "auto"
    socket_keepalive: bool = False
    return_status: int | None = None
    return_body: str = ""
    status: str | None = None  # "stub" (nginx's stub_status text), "json" or "prometheus"
    proxy_tls: bool = False  # proxy_pass = "https://..."
    access_log: Any = None  # accesslog.AccessLogConfig, or None when off
    # plain HTTP/1.1 requests (set at server level, inherited by locations, as in nginx)
    keepalive_timeout: float = 75.0
    keepalive_requests: int = 1000
    client_max_body_size: int = 1 << 20  # 0: no limit
    client_body_timeout: float = 60.0
    noregex: bool = False  # "^~ /path": when it is the longest prefix, no regex is tried
    regex: str | None = None  # "~ pattern" or "~* pattern" (path then holds the pattern)
    caseless: bool = False  # "~*"
    proxy_pass_template: Template | None = None  # proxy_pass with variables
    access: tuple[tuple[bool, str], ...] = ()  # (allow?, "10.0.0.0/8" or "all"), first match
    origins: tuple[str, ...] = ()  # allowed Origins of WebSocket handshakes; () checks none
    origin_missing: str = "allow"  # a handshake without Origin: "allow" or "deny"
    forwarded_headers: str = "append"  # "replace": an untrusted client's are not believed
    limit_conn: tuple["LimitRule", ...] = ()   # nginx's limit_conn, limit_req, in order
    limit_req: tuple["LimitRule", ...] = ()
    frames: FramesConfig = FramesConfig()
    hooks: HookConfig = HookConfig()
    limit_conn_status: int = 503
    limit_req_status: int = 503

    @property
    def written(self) -> str:
        """The path as written in the configuration."""
        if self.regex is not None:
            return f"~{'*' if self.caseless else ''} {self.regex}"
        return f"{'= ' if self.exact else '^~ ' if self.noregex else ''}{self.path}"


@dataclass(frozen=True, slots=True)
class ServerBlock:
    listen: tuple[Address, ...]
    server_name: tuple[str, ...]
    default: bool
    locations: tuple[LocationConfig, ...]
    client_header_timeout: float = 60.0
    max_request_line: int = 8192
    max_request_head: int = 32768
    tls: TLSConfig | None = None
    redirect_https: int = 0  # the HTTPS port plain-HTTP requests are redirected to; 0: none
    real_ip_from: tuple[str, ...] = ()  # peers trusted to name the client (nginx's realip)
    real_ip_header: str = "X-Real-IP"
    real_ip_recursive: bool = False
    proxy_protocol: bool = False  # its addresses read a PROXY protocol header first


@dataclass(frozen=True, slots=True)
class LimitZone:
    """A limit zone (nginx's limit_conn_zone, limit_req_zone): counted across all workers."""

    name: str
    kind: str              # "conn" or "req"
    key: Template          # what a client is counted by, e.g. $binary_remote_addr
    size: int              # bytes of shared memory (32 bytes an entry)
    rate: int = 0          # "req": requests per 1000 s (nginx's rate, r/s * 1000)


@dataclass(frozen=True, slots=True)
class LimitRule:
    """limit_conn (max: connections per key) or limit_req (burst, and delay: requests over
    the rate served at once; None for nodelay) in a location."""

    zone: str
    max: int = 0
    delay: int | None = 0


@dataclass(frozen=True, slots=True)
class MapConfig:
    """A `map`: a variable whose value is looked up from another value (nginx's map module)."""

    variable: str
    source: Template
    default: Template | None
    hostnames: bool
    exact: tuple[tuple[str, Template], ...]       # lower case keys
    head: tuple[tuple[str, Template], ...]        # "*.example.com" as ".example.com"
    tail: tuple[tuple[str, Template], ...]        # "www.example.*" as "www.example."
    regex: tuple[tuple[str, bool, Template], ...]  # pattern, caseless, value; in order


@dataclass(frozen=True, slots=True)
class Config:
    source: str
    upstreams: tuple[UpstreamConfig, ...]
    servers: tuple[ServerBlock, ...]
    processes: int = 1
    worker_connections: int = 4096
    pipe_size: int = 262144
    max_pipes: int = 0  # 0: worker_connections / 2
    pid: str | None = None
    shutdown_timeout: float = 0.0  # 0: old workers wait for their tunnels to end (nginx's default)
    close_spread: float = 1.0  # a shutdown's closing handshakes are spread over this long
    handover: bool = True  # on reload, old workers pass their tunnels to the new ones
    error_log: Any = None  # accesslog.ErrorLogConfig
    user: tuple[str, str] | None = None  # workers run as this user and group
    extra: Mapping[str, Any] = field(default_factory=dict)
    # how the file was read: "toml" or "nginx" (with nginx's -p prefix), for reloads and -T
    format: str = "toml"
    prefix: str | None = None
    files: tuple[str, ...] = ()         # every file read, the main one first
    ignored: tuple[str, ...] = ()       # nginx directives accepted that change nothing
    differences: tuple[str, ...] = ()   # where fastws keeps a stricter behaviour than nginx
    maps: tuple[MapConfig, ...] = ()
    limit_zones: tuple[LimitZone, ...] = ()
    # nginx's worker_cpu_affinity: None (the kernel places the workers), "auto" (worker i on
    # the i-th CPU this process may use, round the list), or one CPU set per worker (the last
    # one for workers past the list)
    cpu_affinity: str | tuple[frozenset[int], ...] | None = None
    # SIGTERM drains (an orchestrator's stop): readiness fails at once, the listeners close
    # drain_unready later, tunnels are closed over the rest of the window; 0: a fast stop
    drain_on_term: float = 0.0
    drain_unready: float = 5.0
    resolver: ResolverConfig = ResolverConfig()
    # how each worker's engine learns what is ready: "io_uring", "epoll", or "auto" (io_uring
    # where the kernel allows it, epoll elsewhere)
    engine: str = "auto"

    def upstream(self, name: str) -> UpstreamConfig:
        for up in self.upstreams:
            if up.name == name:
                return up
        raise KeyError(name)


class _Reader:
    """Walks one TOML table, checking keys and types, and remembers which keys it used."""

    def __init__(self, source: str, table: Mapping[str, Any], where: str) -> None:
        if not isinstance(table, Mapping):
            raise ConfigError(source, where, "expected a table")
        self.source = source
        self.table = table
        self.where = where
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def fail(self, name: str, problem: str) -> ConfigError:
        return ConfigError(self.source, self.key(name), problem)

    def get(self, name: str, kind: type | tuple[type, ...], default: Any = None,
            *, required: bool = False) -> Any:
        self.seen.add(name)
        if name not in self.table:
            if required:
                raise self.fail(name, "is required")
            return default
        value = self.table[name]
        if isinstance(value, bool) and kind is not bool and not (
            isinstance(kind, tuple) and bool in kind
        ):
            raise self.fail(name, f"expected {_kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise self.fail(name, f"expected {_kind_name(kind)}, got {_value_name(value)}")
        return value

    def convert(self, name: str, parse: Callable[[Any], Any], default: Any) -> Any:
        self.seen.add(name)
        if name not in self.table:
            return default
        try:
            return parse(self.table[name])
        except ValueError as exc:
            raise self.fail(name, str(exc)) from None

    def duration(self, name: str, default: float) -> float:
        return self.convert(name, parse_duration, default)

    def size(self, name: str, default: int) -> int:
        return self.convert(name, parse_size, default)

    def strings(self, name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
        value = self.get(name, (str, list), None)
        if value is None:
            return default
        if isinstance(value, str):
            return (value,)
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(self.source, f"{self.key(name)}[{i}]",
                                  f"expected a string, got {_value_name(item)}")
        return tuple(value)

    def finish(self, allowed_extra: Iterable[str] = ()) -> None:
        extra = set(allowed_extra)
        for name in self.table:
            if name not in self.seen and name not in extra:
                raise self.fail(name, "unknown key")


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             list: "a list", dict: "a table"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _value_name(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            list: "a list", dict: "a table"}.get(type(value), type(value).__name__)


def _positive_int(r: _Reader, name: str, default: int, *, minimum: int = 0) -> int:
    value = r.get(name, int, default)
    if value < minimum:
        raise r.fail(name, f"must be at least {minimum}")
    return value


def _read_server_entry(source: str, item: Any, where: str) -> ServerConfig:
    if isinstance(item, str):
        item = {"address": item}
    r = _Reader(source, item, where)
    address = r.get("address", str, required=True)
    if not address.startswith("unix:"):
        r.convert("address", parse_address, None)
    weight = _positive_int(r, "weight", 1, minimum=1)
    max_fails = _positive_int(r, "max_fails", 1)
    fail_timeout = r.duration("fail_timeout", 10.0)
    max_conns = _positive_int(r, "max_conns", 0)
    backup = r.get("backup", bool, False)
    down = r.get("down", bool, False)
    resolve = r.get("resolve", bool, False)
    if resolve and (address.startswith("unix:")
                    or parse_address(address).family != 0):
        raise r.fail("resolve", "applies to a host name (\"app.internal:8000\"), not an "
                     "address")
    r.finish()
    return ServerConfig(address, weight, max_fails, fail_timeout, max_conns, backup, down,
                        resolve)


def _read_upstream(source: str, table: Any, index: int,
                   resolver: ResolverConfig = ResolverConfig()) -> UpstreamConfig:
    r = _Reader(source, table, f"upstream[{index}]")
    name = r.get("name", str, required=True)
    r.where = f"upstream.{name}"
    servers_raw = r.get("servers", list, required=True)
    if not servers_raw:
        raise r.fail("servers", "needs at least one server")
    servers = tuple(_read_server_entry(source, item, f"{r.key('servers')}[{i}]")
                    for i, item in enumerate(servers_raw))
    balance = r.get("balance", str, "round_robin")
    if balance not in BALANCE_METHODS:
        raise r.fail("balance", f"unknown method {balance!r} (one of {', '.join(BALANCE_METHODS)})")
    hash_key = r.convert("hash_key", _template_value, None)
    if balance == "hash" and hash_key is None:
        raise r.fail("hash_key", "is required with balance = \"hash\" (for example \"$request_uri\")")
    if hash_key is not None and balance != "hash":
        raise r.fail("hash_key", "only applies to balance = \"hash\"")
    consistent = r.get("consistent", bool, False)
    if consistent and balance != "hash":
        raise r.fail("consistent", "only applies to balance = \"hash\"")
    factor = r.get("balance_factor", (int, float), 0)
    if factor and (balance not in ("hash", "ip_hash") or factor <= 100):
        raise r.fail("balance_factor", "is a percentage above 100 (e.g. 150) and applies to "
                     "balance = \"hash\" or \"ip_hash\"")
    balancer = r.get("balancer", str, None)
    if balancer is not None and not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", balancer):
        raise r.fail("balancer", f"{balancer!r} is not an import path \"package.module:Class\"")
    keepalive = _positive_int(r, "keepalive", 0)
    up_tls = _read_upstream_tls(r)
    keepalive_timeout = r.duration("keepalive_timeout", 60.0)
    keepalive_requests = _positive_int(r, "keepalive_requests", 1000, minimum=1)
    sticky = _read_sticky(r)
    if sticky is not None and balancer is not None:
        raise r.fail("sticky", "a custom balancer chooses its servers itself")
    send_proxy = r.get("send_proxy_protocol", str, None)
    if send_proxy is not None and send_proxy not in ("v1", "v2"):
        raise r.fail("send_proxy_protocol", f"{send_proxy!r}: expected \"v1\" or \"v2\"")
    if send_proxy is not None and keepalive:
        # HAProxy keeps such connections private to one client; fastws does not keep them
        raise r.fail("send_proxy_protocol", "a connection that opens with a PROXY header names "
                     "one client, so it cannot be kept alive for others: remove keepalive")
    health = _read_health_check(r)
    drain_timeout = r.duration("drain_timeout", 0.0)
    r.finish()
    answers = _dns_answers(source, r.where, servers, resolver)
    peers = resolve(source, r.where, servers, dict(answers))
    if balance == "hash" and consistent and balancer is None and \
            sum(p.weight for p in peers if not p.backup) > MAX_CHASH_WEIGHT:
        raise ConfigError(source, f"{r.where}.servers",
                          f"the weights of a consistent hash add up to more than {MAX_CHASH_WEIGHT}")
    cls = load_class(source, f"{r.where}.balancer", balancer) if balancer is not None else None
    return UpstreamConfig(name, servers, balance, hash_key, consistent, float(factor), balancer,
                          keepalive, tls=up_tls, keepalive_timeout=keepalive_timeout,
                          keepalive_requests=keepalive_requests, peers=peers, balancer_class=cls,
                          sticky=sticky, send_proxy_protocol=int(send_proxy[1]) if send_proxy else 0,
                          health_check=health, drain_timeout=drain_timeout, answers=answers)


def _dns_answers(source: str, where: str, servers: tuple[ServerConfig, ...],
                 resolver: ResolverConfig) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The addresses of the `resolve` servers' names, through the configured resolvers."""
    from .dns import LookupError_, lookup
    out: dict[str, tuple[str, ...]] = {}
    for i, server in enumerate(servers):
        if not server.resolve:
            continue
        host = parse_address(server.address).host
        if host in out:
            continue
        try:
            out[host] = lookup(host, resolver)[0]
        except LookupError_ as exc:
            raise ConfigError(source, f"{where}.servers[{i}]", f"cannot resolve: {exc}") from None
    return tuple(out.items())


def with_answers(cfg: Config, upstream: str, host: str, addresses: tuple[str, ...]) -> Config:
    """The configuration with a `resolve` name's new addresses (checked as at load)."""
    ups = []
    for up in cfg.upstreams:
        if up.name == upstream:
            answers = tuple((h, addresses if h == host else a) for h, a in up.answers)
            peers = resolve(cfg.source, f"upstream.{up.name}", up.servers, dict(answers))
            up = replace(up, answers=answers, peers=peers)
        ups.append(up)
    return replace(cfg, upstreams=tuple(ups))


def _read_health_check(upstream: _Reader) -> HealthCheck | None:
    """`health_check = { interval, timeout, fails, passes, uri, expect_status, websocket,
    host }` on an [[upstream]]; `true` for the defaults."""
    value = upstream.get("health_check", (bool, dict), None)
    if value is None or value is False:
        return None
    if value is True:
        value = {}
    r = _Reader(upstream.source, value, upstream.key("health_check"))
    interval = r.duration("interval", 5.0)
    timeout = r.duration("timeout", 2.0)
    if interval <= 0 or timeout <= 0:
        raise r.fail("interval" if interval <= 0 else "timeout", "must be greater than zero")
    if timeout > interval:
        raise r.fail("timeout", "must not be longer than the interval")
    fails = _positive_int(r, "fails", 2, minimum=1)
    passes = _positive_int(r, "passes", 2, minimum=1)
    uri = r.get("uri", str, "/")
    if not uri.startswith("/") or any(c in uri for c in " \r\n\t"):
        raise r.fail("uri", f"{uri!r} is not a request target such as \"/health\"")
    websocket = r.get("websocket", bool, False)
    raw = r.get("expect_status", (int, str, list), "2xx")
    ranges = []
    for item in raw if isinstance(raw, list) else [raw]:
        text = str(item)
        m = re.fullmatch(r"([1-5])xx|(\d{3})(?:-(\d{3}))?", text)
        if m is None or isinstance(item, bool):
            raise r.fail("expect_status", f"{item!r}: expected a status (200), a class (\"2xx\") "
                         "or a range (\"200-399\")")
        if m.group(1):
            ranges.append((int(m.group(1)) * 100, int(m.group(1)) * 100 + 99))
        else:
            lo, hi = int(m.group(2)), int(m.group(3) or m.group(2))
            if not 100 <= lo <= hi <= 599:
                raise r.fail("expect_status", f"{text!r} is not within 100-599")
            ranges.append((lo, hi))
    if websocket and "expect_status" in r.table:
        raise r.fail("expect_status", "a WebSocket check expects 101 and a valid accept key")
    host = r.get("host", str, None)
    r.finish()
    return HealthCheck(interval, timeout, fails, passes, uri, tuple(ranges), websocket, host)


_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_COOKIE_ATTR = re.compile(r"[!#$%&'()*+\-./0-9:<=>?@A-Z\[\]^_`a-z{|}~]*")


def _read_sticky(upstream: _Reader) -> StickyConfig | None:
    """`sticky = { cookie = "srv_id", max_age = "1h", domain, path, httponly, secure,
    samesite }` on an [[upstream]]."""
    table = upstream.get("sticky", dict, None)
    if table is None:
        return None
    r = _Reader(upstream.source, table, upstream.key("sticky"))
    cookie = r.get("cookie", str, required=True)
    if not _COOKIE_NAME.fullmatch(cookie):
        raise r.fail("cookie", f"{cookie!r} is not a cookie name")
    max_age = r.duration("max_age", -1.0)
    domain = r.get("domain", str, None)
    path = r.get("path", str, None)
    for name, value in (("domain", domain), ("path", path)):
        if value is not None and (not value or not _COOKIE_ATTR.fullmatch(value)
                                  or ";" in value):
            raise r.fail(name, f"{value!r} cannot be written in a Set-Cookie header")
    samesite = r.get("samesite", str, None)
    if samesite is not None and samesite.lower() not in ("strict", "lax", "none"):
        raise r.fail("samesite", "expected \"strict\", \"lax\" or \"none\"")
    conf = StickyConfig(cookie, None if max_age < 0 else max_age, domain, path,
                        r.get("httponly", bool, False), r.get("secure", bool, False),
                        samesite.lower() if samesite else None)
    r.finish()
    return conf


def _read_access(r: _Reader, inherited: tuple[tuple[bool, str], ...]
                 ) -> tuple[tuple[bool, str], ...]:
    """`access = ["allow 10.0.0.0/8", "allow ::1", "deny all"]` (nginx's allow and deny): the
    first rule that matches the client's address decides; none matching allows.  A level that
    sets any replaces the rules it would inherit."""
    value = r.get("access", list, None)
    if value is None:
        return inherited
    rules = []
    for i, text in enumerate(value):
        key = f"{r.key('access')}[{i}]"
        words = text.split() if isinstance(text, str) else []
        if len(words) != 2 or words[0] not in ("allow", "deny"):
            raise ConfigError(r.source, key, "expected \"allow ADDRESS\" or \"deny ADDRESS\" "
                              "(an address, a CIDR such as 10.0.0.0/8, or all)")
        if words[1] == "all":
            rules.append((words[0] == "allow", "all"))
            continue
        try:
            net = ipaddress.ip_network(words[1], strict=False)
        except ValueError:
            raise ConfigError(r.source, key, f"{words[1]!r} is not an address or CIDR") from None
        rules.append((words[0] == "allow", str(net)))
    return tuple(rules)


def _read_http_limits(r: _Reader, inherited: Mapping[str, Any]) -> dict[str, Any]:
    """The keep-alive and request body settings, at server or location level."""
    out = dict(inherited)
    out["keepalive_timeout"] = r.duration("keepalive_timeout", out["keepalive_timeout"])
    out["keepalive_requests"] = _positive_int(r, "keepalive_requests", out["keepalive_requests"])
    out["client_max_body_size"] = r.size("client_max_body_size", out["client_max_body_size"])
    out["client_body_timeout"] = r.duration("client_body_timeout", out["client_body_timeout"])
    if out["client_body_timeout"] <= 0:
        raise r.fail("client_body_timeout", "must be greater than zero")
    for kind in ("conn", "req"):
        name = f"limit_{kind}"
        if name in r.table:
            out[name] = _read_limits(r, kind)
        status = r.get(f"{name}_status", int, out[f"{name}_status"])
        if not 400 <= status <= 599:
            raise r.fail(f"{name}_status", "expected a status between 400 and 599 (nginx's "
                         "default is 503; 429 is Too Many Requests)")
        out[f"{name}_status"] = status
    return out


_HTTP_DEFAULTS = {"keepalive_timeout": 75.0, "keepalive_requests": 1000,
                  "client_max_body_size": 1 << 20, "client_body_timeout": 60.0,
                  "limit_conn": (), "limit_req": (), "limit_conn_status": 503,
                  "limit_req_status": 503}

# The zones of the configuration being read (name -> kind), for the limits that name them.
_ZONES: ContextVar[Mapping[str, str]] = ContextVar("zones", default={})


def _read_limits(r: _Reader, kind: str) -> tuple[LimitRule, ...]:
    """`limit_conn = [{ zone = "perip", max = 10 }]`, `limit_req = [{ zone = "one", burst = 5,
    nodelay = true }]` (or `delay = 3`): a level that sets any replaces the inherited ones, as
    in nginx."""
    name = f"limit_{kind}"
    value = r.get(name, (list, dict), [])
    rules = []
    for i, table in enumerate([value] if isinstance(value, dict) else value):
        if not isinstance(table, dict):
            raise ConfigError(r.source, f"{r.key(name)}[{i}]", "expected a table "
                              "{ zone = \"NAME\", ... }")
        t = _Reader(r.source, table, f"{r.key(name)}[{i}]")
        zone = t.get("zone", str, required=True)
        known = _ZONES.get().get(zone)
        if known is None:
            raise t.fail("zone", f"unknown {name}_zone {zone!r}")
        if known != kind:
            raise t.fail("zone", f"{zone!r} is a limit_{known}_zone, not a {name}_zone")
        if kind == "conn":
            if "max" not in table:
                raise t.fail("max", "is required: the connections one key may have open")
            rules.append(LimitRule(zone, _positive_int(t, "max", 1, minimum=1)))
        else:
            burst = _positive_int(t, "burst", 0)
            nodelay = t.get("nodelay", bool, False)
            delay = _positive_int(t, "delay", 0)
            if nodelay and "delay" in table:
                raise t.fail("delay", "conflicts with nodelay")
            rules.append(LimitRule(zone, burst, None if nodelay else delay))
        t.finish()
    return tuple(rules)


_RATE = re.compile(r"(\d+)r/([sm])")


def _read_zones(r: _Reader) -> tuple[LimitZone, ...]:
    """`[[limit_conn_zone]]` and `[[limit_req_zone]]`: name, key, size, and a req zone's rate
    ("10r/s", "30r/m")."""
    zones: list[LimitZone] = []
    for kind in ("conn", "req"):
        for i, table in enumerate(r.get(f"limit_{kind}_zone", list, [])):
            t = _Reader(r.source, table, f"limit_{kind}_zone[{i}]")
            name = t.get("name", str, required=True)
            if any(z.name == name for z in zones):
                raise t.fail("name", f"duplicate zone {name!r}")
            key = t.convert("key", _template_value, None)
            if key is None:
                raise t.fail("key", "is required (for example \"$binary_remote_addr\")")
            size = t.size("size", 1 << 20)
            if size < 32 * 1024:
                raise t.fail("size", "must be at least 32k")
            rate = 0
            if kind == "req":
                text = t.get("rate", str, required=True)
                m = _RATE.fullmatch(text)
                if m is None or int(m.group(1)) == 0:
                    raise t.fail("rate", f"{text!r}: expected requests per second or minute, "
                                 "such as \"10r/s\" or \"30r/m\"")
                rate = int(m.group(1)) * 1000 // (1 if m.group(2) == "s" else 60) or 1
            t.finish()
            zones.append(LimitZone(name, kind, key, size, rate))
    return tuple(zones)


def _template_value(value: Any) -> Template:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_value_name(value)}")
    return parse_template(value)


_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer",
                         "transfer-encoding", "upgrade"))


def _read_set_headers(r: _Reader) -> tuple[tuple[str, Template | None], ...]:
    table = r.get("set_headers", dict, {})
    out: list[tuple[str, Template | None]] = []
    for name, value in table.items():
        key = f"{r.key('set_headers')}.{name}"
        if not _HEADER_NAME.fullmatch(name):
            raise ConfigError(r.source, key, "is not a valid header name")
        if name.lower() in ("content-length", "transfer-encoding"):
            raise ConfigError(r.source, key, "framing headers cannot be set")
        if not isinstance(value, str):
            raise ConfigError(r.source, key, f"expected a string, got {_value_name(value)}")
        if "\r" in value or "\n" in value:
            raise ConfigError(r.source, key, "a header value cannot contain a line break")
        try:
            out.append((name, parse_template(value) if value else None))
        except ValueError as exc:
            raise ConfigError(r.source, key, str(exc)) from None
    return tuple(out)


def _read_location(source: str, table: Any, where: str, implicit: dict[str, UpstreamConfig],
                   logs: tuple[Any, Any] = ({}, None),
                   http: Mapping[str, Any] | None = None,
                   access: tuple[tuple[bool, str], ...] = (),
                   forwarded_default: str = "append",
                   hooks: HookConfig = HookConfig()) -> LocationConfig:
    r = _Reader(source, table, where)
    raw_path = r.get("path", str, required=True)
    modifier, _, rest = raw_path.partition(" ")
    regex = None
    if modifier in ("~", "~*"):
        regex = rest.strip()
        problem = _regex_problem(regex, modifier == "~*") if regex else "an empty pattern"
        if problem is not None:
            raise r.fail("path", f"{raw_path!r}: {problem}")
        path, exact = regex, False
    else:
        exact = raw_path.startswith("=")
        noregex = raw_path.startswith("^~")
        path = raw_path[2 if noregex else 1:].strip() if exact or noregex else raw_path
        if not path.startswith("/"):
            raise r.fail("path", f"{raw_path!r} must start with '/' (or be '= /path', "
                         "'^~ /path', '~ regex' or '~* regex')")
    r.where = f"{where.rsplit('[', 1)[0]}[{raw_path!r}]"
    proxy_pass = r.get("proxy_pass", str, None)
    proxy_uri = None
    upstream_name = None
    proxy_tls = False
    pass_template = None
    if proxy_pass is not None and "$" in proxy_pass:
        # rendered per request: "http://NAME[/uri]", NAME an [[upstream]] (nginx resolves
        # other names with a resolver; fastws resolves names only when it loads)
        if not proxy_pass.startswith("http://"):
            raise r.fail("proxy_pass", "with variables, proxy_pass is \"http://NAME[/uri]\"")
        pass_template = r.convert("proxy_pass", _template_value, None)
    elif proxy_pass is not None:
        if "://" in proxy_pass:
            scheme, _, rest = proxy_pass.partition("://")
            if scheme not in ("http", "https"):
                raise r.fail("proxy_pass", f"unsupported scheme {scheme!r} (use http:// or https://)")
            proxy_tls = scheme == "https"
            hostport, slash, uri = rest.partition("/")
            if slash:
                proxy_uri = "/" + uri
            try:
                parse_address(hostport, default_port=80)
            except ValueError:
                upstream_name = hostport  # "http://name" may name an [[upstream]], as in nginx
            else:
                url = f"{scheme}://{hostport}"
                upstream_name = url
                if url not in implicit:
                    port = ":443" if proxy_tls else ":80"
                    addr = hostport if ":" in hostport.lstrip("[").split("]")[-1] else hostport + port
                    implicit[url] = UpstreamConfig(url, (ServerConfig(addr),), implicit=True,
                                                   tls=UpstreamTLS() if proxy_tls else None)
        else:
            upstream_name = proxy_pass
    websocket = r.get("websocket", bool, True)
    tokens = tuple(t.lower() for t in r.strings("upgrade_tokens", ("websocket",)))
    if "h2c" in tokens:
        raise r.fail("upgrade_tokens", "h2c cannot be tunnelled through an HTTP/1.1 proxy")
    connect_timeout = r.duration("connect_timeout", 60.0)
    send_timeout = r.duration("send_timeout", 60.0)
    read_timeout = r.duration("read_timeout", 60.0)
    for name, value in (("connect_timeout", connect_timeout), ("send_timeout", send_timeout),
                        ("read_timeout", read_timeout)):
        if value <= 0:
            raise r.fail(name, "must be greater than zero")
    idle_timeout = r.duration("idle_timeout", 0.0)
    lifetime = r.duration("max_tunnel_lifetime", 0.0)
    spread = r.duration("lifetime_spread", 0.0)
    if spread and (not lifetime or spread >= lifetime):
        raise r.fail("lifetime_spread", "is a part of max_tunnel_lifetime (smaller than it)")
    frames = _read_frames(r)
    tries = _positive_int(r, "next_upstream_tries", 0)
    next_timeout = r.duration("next_upstream_timeout", 0.0)
    set_headers = _read_set_headers(r)
    relay = r.get("relay", str, "auto")
    if relay not in RELAY_MODES:
        raise r.fail("relay", f"unknown mode {relay!r} (one of {', '.join(RELAY_MODES)})")
    socket_keepalive = r.get("socket_keepalive", bool, False)
    ret = r.get("return", (int, list), None)
    return_status, return_body = None, ""
    if ret is not None:
        if isinstance(ret, int):
            ret = [ret]
        if not (1 <= len(ret) <= 2 and isinstance(ret[0], int) and 200 <= ret[0] <= 599
                and (len(ret) == 1 or isinstance(ret[1], str))):
            raise r.fail("return", "expected a status (200-599) or [status, \"body\"]")
        return_status, return_body = ret[0], (ret[1] if len(ret) == 2 else "")
    status = r.get("status", str, None)
    if status is not None and status not in STATUS_FORMATS:
        raise r.fail("status", f"unknown format {status!r} (one of {', '.join(STATUS_FORMATS)})")
    if r.get("stub_status", bool, False):
        if status is not None:
            raise r.fail("stub_status", "conflicts with status")
        status = "stub"
    handlers = sum(x is not None for x in (upstream_name or pass_template, return_status,
                                            status))
    if handlers != 1:
        raise r.fail("proxy_pass", "a location needs exactly one of proxy_pass, return or "
                     "stub_status/status")
    access_log = _access_log(r, logs)
    http = _read_http_limits(r, http if http is not None else _HTTP_DEFAULTS)
    access = _read_access(r, access)
    origins = tuple(_origin(r, f"{r.key('origins')}[{i}]", o)
                    for i, o in enumerate(r.strings("origins")))
    forwarded = r.get("forwarded_headers", str, forwarded_default)
    if forwarded not in ("append", "replace"):
        raise r.fail("forwarded_headers", "expected \"append\" or \"replace\"")
    origin_missing = r.get("origin_missing", str, "allow")
    if origin_missing not in ("allow", "deny"):
        raise r.fail("origin_missing", "expected \"allow\" or \"deny\"")
    hooks = _read_hooks(r, hooks)
    if r.table.get("hook") and (return_status is not None or status is not None):
        raise r.fail("hook", "a hook runs before an upstream is chosen: a location with "
                     "return or status has none")
    r.finish()
    if regex is not None and proxy_uri is not None:
        raise r.fail("proxy_pass", "a regular-expression location cannot replace a matched "
                     "prefix: write proxy_pass without a URI part (as nginx requires)")
    return LocationConfig(path, exact, upstream_name, proxy_uri, websocket, tokens,
                          connect_timeout, send_timeout, read_timeout, idle_timeout, lifetime,
                          spread, tries, next_timeout,
                          set_headers, relay, socket_keepalive, return_status, return_body,
                          status, proxy_tls, access_log, **http,
                          noregex=regex is None and raw_path.startswith("^~"), regex=regex,
                          caseless=modifier == "~*", proxy_pass_template=pass_template,
                          access=access, origins=origins, origin_missing=origin_missing,
                          forwarded_headers=forwarded, frames=frames, hooks=hooks)


def _read_hooks(r: "_Reader", inherited: HookConfig) -> HookConfig:
    """hook, hook_requests, hook_timeout and on_tunnel_close, each inherited from the server
    when the location does not set it ("" turns an inherited one off)."""
    hook, hook_fn = _read_callable(r, "hook", inherited.hook, inherited.hook_fn)
    close, close_fn = _read_callable(r, "on_tunnel_close", inherited.on_tunnel_close,
                                     inherited.close_fn)
    requests = r.get("hook_requests", bool, inherited.requests)
    timeout = r.duration("hook_timeout", inherited.timeout)
    if timeout <= 0:
        raise r.fail("hook_timeout", "must be greater than zero")
    return HookConfig(hook, hook_fn, requests, timeout, close, close_fn)


def _read_callable(r: "_Reader", key: str, path: str | None, fn: Any) -> tuple[str | None, Any]:
    if key not in r.table:
        r.seen.add(key)
        return path, fn
    path = r.get(key, str) or None
    if path is None:
        return None, None
    from .hooks import load as load_hook   # (imports nothing of the runtime)
    try:
        return path, load_hook(path)
    except ValueError as exc:
        raise r.fail(key, str(exc)) from None


def _read_frames(r: "_Reader") -> FramesConfig:
    on = r.get("frames", bool, True)
    size = r.size("max_message_size", 0)
    if size >= 1 << 32:
        raise r.fail("max_message_size", "must be below 4g")
    checks = r.get("frame_checks", bool, True)
    interval = r.duration("ping_interval", 0.0)
    timeout = r.duration("ping_timeout", 30.0)
    if interval and timeout <= 0:
        raise r.fail("ping_timeout", "must be greater than zero")
    ping_to = r.get("ping_to", str, "client")
    if ping_to not in PING_TO:
        raise r.fail("ping_to", f"expected one of {', '.join(PING_TO)}, not {ping_to!r}")
    close_timeout = r.duration("close_timeout", 5.0)
    if close_timeout <= 0:
        raise r.fail("close_timeout", "must be greater than zero")
    if not on:
        for key in ("max_message_size", "ping_interval"):
            if key in r.table and r.table[key]:
                raise r.fail(key, "needs frames = true (a blind tunnel does not see messages)")
    return FramesConfig(on, size, checks, interval, timeout, ping_to, close_timeout)


_ORIGIN = re.compile(r"(https?)://(\*\.)?([a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])"
                     r"(:\d{1,5})?")


def _origin(r: _Reader, key: str, text: str) -> str:
    """An allowed Origin as a browser sends it (RFC 6454): scheme://host[:port], the host
    perhaps "*.example.com" (any name under it); or "null"."""
    value = text.strip().lower().rstrip("/")
    if value != "null" and not _ORIGIN.fullmatch(value):
        raise ConfigError(r.source, key, f"{text!r} is not an origin such as "
                          "\"https://example.com\" or \"https://*.example.com:8443\"")
    return value


def _regex_problem(pattern: str, caseless: bool) -> str | None:
    # PCRE2, as the engine matches it (and nginx)
    from ._engine import regex_problem
    problem: str | None = regex_problem(pattern, caseless)
    return problem


def _access_log(r: _Reader, logs: tuple[Any, Any]) -> Any:
    r.seen.add("access_log")
    return accesslog.read_access_log(r.source, r.where, r.table.get("access_log", accesslog._UNSET),
                                     logs[0], logs[1])


def _read_server(source: str, table: Any, index: int, implicit: dict[str, UpstreamConfig],
                 logs: tuple[Any, Any] = ({}, None)) -> ServerBlock:
    r = _Reader(source, table, f"server[{index}]")
    logs = (logs[0], _access_log(r, logs))
    listen_raw = r.strings("listen")
    if not listen_raw:
        raise r.fail("listen", "is required (for example [\"127.0.0.1:8080\"])")
    listen = []
    for i, text in enumerate(listen_raw):
        try:
            addr = parse_address(text)
        except ValueError as exc:
            raise ConfigError(source, f"{r.key('listen')}[{i}]", str(exc)) from None
        if addr.family == 0:
            raise ConfigError(source, f"{r.key('listen')}[{i}]",
                              f"{text!r}: listen on an IP address, not a host name")
        listen.append(addr)
    # names as nginx's: lower case; "~pattern" a regular expression matched ignoring case
    names = tuple(n if n.startswith("~") else n.lower() for n in r.strings("server_name"))
    for name in names:
        if name.startswith("~"):
            problem = _regex_problem(name[1:], True) if name[1:] else "an empty pattern"
            if problem is not None:
                raise r.fail("server_name", f"{name!r}: {problem}")
    default = r.get("default", bool, False)
    header_timeout = r.duration("client_header_timeout", 60.0)
    max_line = r.size("max_request_line", 8192)
    max_head = r.size("max_request_head", 32768)
    if max_line < 256 or max_head < max_line:
        raise r.fail("max_request_head", "must be at least max_request_line (at least 256)")
    server_tls = _read_server_tls(r)
    redirect = r.get("redirect_https", (bool, int), False)
    redirect_https = 443 if redirect is True else int(redirect)
    if not 0 <= redirect_https < 65536:
        raise r.fail("redirect_https", "expected true or the HTTPS port (1-65535)")
    if redirect_https and server_tls is not None:
        raise r.fail("redirect_https", "applies to a plain-HTTP server, and this one has tls")
    http = _read_http_limits(r, _HTTP_DEFAULTS)
    proxy_protocol = r.get("proxy_protocol", bool, False)
    real_ip = _read_real_ip(r)
    if real_ip[1].lower() == "proxy_protocol" and not proxy_protocol:
        raise r.fail("real_ip", "header = \"proxy_protocol\" needs proxy_protocol = true on "
                     "the server (its listen addresses read the PROXY protocol)")
    access = _read_access(r, ())
    forwarded = r.get("forwarded_headers", str, "append")
    if forwarded not in ("append", "replace"):
        raise r.fail("forwarded_headers", "expected \"append\" or \"replace\"")
    hooks = _read_hooks(r, HookConfig())
    locs_raw = r.get("location", list, [])
    if not locs_raw and not redirect_https:
        raise r.fail("location", "a server needs at least one [[server.location]]")
    locations = []
    seen: set[tuple[str, bool, bool, bool]] = set()
    for i, loc in enumerate(locs_raw):
        lc = _read_location(source, loc, f"{r.key('location')}[{i}]", implicit, logs, http,
                            access, forwarded, hooks)
        # "/a" and "^~ /a" are one prefix for nginx too
        key = (lc.path, lc.exact, lc.regex is not None, lc.caseless)
        if key in seen:
            raise ConfigError(source, f"{r.key('location')}[{i}].path",
                              f"duplicate location {lc.written!r}")
        seen.add(key)
        locations.append(lc)
    r.finish()
    return ServerBlock(tuple(listen), names, default, tuple(locations), header_timeout,
                       max_line, max_head, server_tls, redirect_https, *real_ip, proxy_protocol)


def _read_real_ip(server: _Reader) -> tuple[tuple[str, ...], str, bool]:
    """`real_ip = { from = ["10.0.0.0/8"], header = "X-Forwarded-For", recursive = true }`
    (nginx's set_real_ip_from, real_ip_header, real_ip_recursive): from a trusted peer, the
    client's address is the one the header names."""
    table = server.get("real_ip", dict, None)
    if table is None:
        return (), "X-Real-IP", False
    r = _Reader(server.source, table, server.key("real_ip"))
    trusted = []
    for i, text in enumerate(r.strings("from")):
        try:
            trusted.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            raise ConfigError(r.source, f"{r.key('from')}[{i}]",
                              f"{text!r} is not an address or CIDR") from None
    if not trusted:
        raise r.fail("from", "is required: the addresses of the proxies in front")
    header = r.get("header", str, "X-Real-IP")
    if header.lower() == "proxy_protocol":
        header = "proxy_protocol"         # nginx's name for the PROXY protocol's address
    elif not _HEADER_NAME.fullmatch(header):
        raise r.fail("header", f"{header!r} is not a header name")
    recursive = r.get("recursive", bool, False)
    r.finish()
    return tuple(trusted), header, recursive


# --- TLS ----------------------------------------------------------------------------------

def _tls_path(r: _Reader, name: str, value: str) -> str:
    # Relative paths are relative to the configuration file, as nginx's are to its conf dir.
    base = os.path.dirname(os.path.abspath(r.source)) if not r.source.startswith("<") \
        else os.getcwd()
    path = os.path.join(base, os.path.expanduser(value))
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise r.fail(name, f"{value}: no such file") from None
    except OSError as exc:
        raise r.fail(name, f"{value}: {(exc.strerror or str(exc)).lower()}") from None
    return path


def _read_server_tls(server: _Reader) -> TLSConfig | None:
    """The `tls` table of a [[server]], with every file checked ."""
    table = server.get("tls", dict, None)
    if table is None:
        return None
    r = _Reader(server.source, table, server.key("tls"))
    cert = _tls_path(r, "certificate", r.get("certificate", str, required=True))
    key = _tls_path(r, "key", r.get("key", str, required=True))
    protocols = r.strings("protocols", ("TLSv1.2", "TLSv1.3"))
    for p in protocols:
        if p not in tls.PROTOCOLS:
            raise r.fail("protocols", f"unknown protocol {p!r} (one of {', '.join(tls.PROTOCOLS)}; "
                         "SSLv2 and SSLv3 are not supported)")
    if not protocols:
        raise r.fail("protocols", "needs at least one protocol")
    ciphers = r.get("ciphers", str, "HIGH:!aNULL:!MD5")
    timeout = r.duration("handshake_timeout", 60.0)
    if timeout <= 0:
        raise r.fail("handshake_timeout", "must be greater than zero")
    tickets = r.get("session_tickets", bool, True)
    verify_client = r.get("verify_client", (bool, str), "off")
    verify_client = {True: "on", False: "off"}.get(verify_client, verify_client)
    if verify_client not in ("on", "off", "optional"):
        raise r.fail("verify_client", "expected \"on\", \"optional\" or \"off\"")
    ca_raw = r.get("client_ca", str, None)
    client_ca = _tls_path(r, "client_ca", ca_raw) if ca_raw is not None else None
    if verify_client != "off" and client_ca is None:
        raise r.fail("verify_client", "needs client_ca (the CA certificates that sign the "
                     "clients' certificates, PEM)")
    r.finish()
    conf = TLSConfig(cert, key, tuple(protocols), ciphers, timeout, tickets, verify_client,
                     client_ca)
    try:
        tls.server_context(conf)
    except tls.Problem as exc:
        raise r.fail(exc.key, exc.problem) from None
    return conf


def _read_upstream_tls(upstream: _Reader) -> UpstreamTLS | None:
    """`tls = true` or `tls = {verify, ca_file, server_name}` on an [[upstream]]."""
    value = upstream.get("tls", (bool, dict), None)
    if value is None or value is False:
        return None
    if value is True:
        return UpstreamTLS()
    r = _Reader(upstream.source, value, upstream.key("tls"))
    verify = r.get("verify", bool, True)
    ca_raw = r.get("ca_file", str, None)
    ca_file = _tls_path(r, "ca_file", ca_raw) if ca_raw is not None else None
    name = r.get("server_name", str, None)
    r.finish()
    conf = UpstreamTLS(verify, ca_file, name)
    try:
        tls.upstream_context(conf)
    except tls.Problem as exc:
        raise r.fail(exc.key, exc.problem) from None
    return conf


def _check_listeners(source: str, servers: tuple[ServerBlock, ...]) -> None:
    """An address is TLS or plain, and reads the PROXY protocol or not, for every server on it
    (nginx's `listen ... ssl proxy_protocol`)."""
    seen: dict[tuple[str, int], tuple[int, bool, bool]] = {}
    for si, server in enumerate(servers):
        for addr in server.listen:
            first = seen.setdefault((addr.host, addr.port),
                                    (si, server.tls is not None, server.proxy_protocol))
            if first[1] != (server.tls is not None):
                raise ConfigError(source, f"server[{si}].tls",
                                  f"{addr.text} is {'TLS' if first[1] else 'plain HTTP'} in "
                                  f"server[{first[0]}]: every server on an address must agree")
            if first[2] != server.proxy_protocol:
                raise ConfigError(source, f"server[{si}].proxy_protocol",
                                  f"{addr.text} {'reads' if first[2] else 'does not read'} the "
                                  f"PROXY protocol in server[{first[0]}]: every server on an "
                                  "address must agree")


def from_dict(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Build a Config from parsed TOML (a dict), checking every key."""
    r = _Reader(source, data, "")
    maps_raw = r.get("map", list, [])
    names = _map_names(source, maps_raw)
    with variables.maps_known(names):
        maps = tuple(_read_map(source, table, i) for i, table in enumerate(maps_raw))
        _check_map_cycles(source, maps, names)
        zones = _read_zones(r)
        token = _ZONES.set({z.name: z.kind for z in zones})
        try:
            return replace(_from_dict(r, source), maps=maps, limit_zones=zones)
        finally:
            _ZONES.reset(token)


def _map_names(source: str, maps_raw: list[Any]) -> dict[str, int]:
    names: dict[str, int] = {}
    for i, table in enumerate(maps_raw):
        name = table.get("variable") if isinstance(table, Mapping) else None
        if not isinstance(name, str) or not re.fullmatch(r"\$?[A-Za-z0-9_]+", name):
            raise ConfigError(source, f"map[{i}].variable", "expected a variable name, such as "
                              "\"connection_upgrade\"")
        name = name.lstrip("$").lower()
        try:
            variables.lookup(name)
        except ValueError:
            pass
        else:
            raise ConfigError(source, f"map[{i}].variable", f"${name} is already a variable")
        if name in names:
            raise ConfigError(source, f"map[{i}].variable", f"duplicate map ${name}")
        names[name] = i
    return names


def _read_map(source: str, table: Any, index: int) -> MapConfig:
    r = _Reader(source, table, f"map[{index}]")
    name = r.get("variable", str, required=True).lstrip("$").lower()
    r.where = f"map.{name}"
    source_tpl = r.convert("source", _template_value, None)
    if source_tpl is None:
        raise r.fail("source", "is required (for example \"$http_upgrade\")")
    default = r.convert("default", _template_value, None)
    hostnames = r.get("hostnames", bool, False)
    exact: dict[str, Template] = {}
    head: list[tuple[str, Template]] = []
    tail: list[tuple[str, Template]] = []
    regex: list[tuple[str, bool, Template]] = []
    for i, pair in enumerate(r.get("values", list, [])):
        key_where = f"{r.key('values')}[{i}]"
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str)
                                                                   for x in pair)):
            raise ConfigError(source, key_where, "expected [\"value\", \"result\"]")
        key, value = pair
        try:
            result = parse_template(value)
        except ValueError as exc:
            raise ConfigError(source, key_where, str(exc)) from None
        if key.startswith("~"):
            caseless = key.startswith("~*")
            pattern = key[2 if caseless else 1:]
            problem = _regex_problem(pattern, caseless) if pattern else "an empty pattern"
            if problem is not None:
                raise ConfigError(source, key_where, f"{key!r}: {problem}")
            regex.append((pattern, caseless, result))
            continue
        key = key[1:] if key.startswith("\\") else key   # "\\~x": a literal "~x"
        key = key.lower()                  # nginx matches strings ignoring case
        if hostnames and key.startswith("*."):
            head.append((key[1:], result))
        elif hostnames and key.startswith("."):
            exact.setdefault(key[1:], result)
            head.append((key, result))
        elif hostnames and key.endswith(".*"):
            tail.append((key[:-1], result))
        elif key in exact:
            raise ConfigError(source, key_where, f"duplicate value {pair[0]!r}")
        else:
            exact[key] = result
    r.finish()
    # sorted as bytes: the engine looks exact values up by binary search
    return MapConfig(name, source_tpl, default, hostnames,
                     tuple(sorted(exact.items(), key=lambda e: e[0].encode())),
                     tuple(sorted(head, key=lambda e: -len(e[0]))),
                     tuple(sorted(tail, key=lambda e: -len(e[0]))), tuple(regex))


def _check_map_cycles(source: str, maps: tuple[MapConfig, ...], names: dict[str, int]) -> None:
    """A map whose value needs itself, directly or through other maps, would never end."""
    needs: dict[str, set[str]] = {}
    for m in maps:
        templates = [m.source, m.default, *(t for _, t in m.exact), *(t for _, t in m.head),
                     *(t for _, t in m.tail), *(t for _, _, t in m.regex)]
        needs[m.variable] = {v for t in templates if t is not None for v in t.variables
                             if v in names}
    for start in needs:
        seen, todo = set(), list(needs[start])
        while todo:
            v = todo.pop()
            if v == start:
                raise ConfigError(source, f"map.{start}", f"${start} depends on itself")
            if v not in seen:
                seen.add(v)
                todo.extend(needs.get(v, ()))


def _from_dict(r: _Reader, source: str) -> Config:
    processes_raw = r.get("processes", (int, str), 1)
    if processes_raw == "auto":
        # the CPUs this process may run on (a container's or a taskset's share), as nginx
        processes = len(os.sched_getaffinity(0)) or 1
    elif isinstance(processes_raw, int) and processes_raw >= 1:
        processes = processes_raw
    else:
        raise r.fail("processes", "expected a number of processes (1 or more) or \"auto\"")
    worker_connections = _positive_int(r, "worker_connections", 4096, minimum=2)
    pipe_size = r.size("pipe_size", 262144)
    if pipe_size < 4096 or pipe_size > (1 << 20):
        raise r.fail("pipe_size", "must be between 4k and 1m")
    max_pipes = _positive_int(r, "max_pipes", 0)
    engine = r.get("engine", str, "auto")
    if engine not in ENGINE_BACKENDS:
        raise r.fail("engine", f"unknown engine {engine!r} (one of {', '.join(ENGINE_BACKENDS)})")
    if "relay_thread" in r.table:
        raise r.fail("relay_thread", "is no longer a setting: the engine runs in each worker's "
                     "event loop")
    pid = r.get("pid", str, None)
    user = r.convert("user", _user, None)
    shutdown_timeout = r.duration("shutdown_timeout", 0.0)
    close_spread = r.duration("close_spread", 1.0)
    handover = r.get("handover", bool, True)
    affinity = r.convert("worker_cpu_affinity", _cpu_affinity, None)
    drain = r.duration("drain_on_term", 0.0)
    unready = r.duration("drain_unready", min(5.0, drain / 3))
    if drain and not 0 <= unready < drain:
        raise r.fail("drain_unready", "is a part of drain_on_term (smaller than it)")
    error_log = accesslog.read_error_log(source, r.get("error_log", (str, dict), None))
    logs = (accesslog.read_formats(source, r.get("log_format", dict, None)), None)
    logs = (logs[0], _access_log(r, logs))

    resolver = _read_resolver(r)
    upstreams: list[UpstreamConfig] = []
    for i, table in enumerate(r.get("upstream", list, [])):
        up = _read_upstream(source, table, i, resolver)
        if any(u.name == up.name for u in upstreams):
            raise ConfigError(source, f"upstream[{i}].name", f"duplicate upstream {up.name!r}")
        upstreams.append(up)
    implicit: dict[str, UpstreamConfig] = {}
    servers_raw = r.get("server", list, [])
    if not servers_raw:
        raise r.fail("server", "the configuration needs at least one [[server]]")
    servers = tuple(_read_server(source, t, i, implicit, logs) for i, t in enumerate(servers_raw))
    names = {u.name for u in upstreams}
    servers, implicit = _name_upstreams(servers, implicit, names)
    implicit = {url: replace(up, peers=resolve(source, f"proxy_pass {url}", up.servers))
                for url, up in implicit.items()}
    for si, server in enumerate(servers):
        for li, loc in enumerate(server.locations):
            if loc.proxy_pass is not None and loc.proxy_pass not in names \
                    and loc.proxy_pass not in implicit:
                raise ConfigError(source, f"server[{si}].location[{li}].proxy_pass",
                                  f"unknown upstream {loc.proxy_pass!r}")
    _check_defaults(source, servers)
    _check_listeners(source, servers)
    r.finish()
    return Config(source, tuple(upstreams) + tuple(implicit.values()), servers, processes,
                  worker_connections, pipe_size, max_pipes, pid, shutdown_timeout,
                  close_spread, handover, error_log, user, files=(source,),
                  cpu_affinity=affinity, drain_on_term=drain, drain_unready=unready,
                  resolver=resolver, engine=engine)


def _read_resolver(top: _Reader) -> ResolverConfig:
    """`[resolver]`: addresses (IP or IP:port, port 53 by default), timeout, min_ttl, max_ttl
    (nginx's `resolver ADDR... valid=TIME`)."""
    table = top.get("resolver", dict, None)
    if table is None:
        return ResolverConfig()
    r = _Reader(top.source, table, "resolver")
    addresses = []
    for i, text in enumerate(r.strings("addresses")):
        try:
            addr = parse_address(text, default_port=53)
        except ValueError as exc:
            raise ConfigError(top.source, f"resolver.addresses[{i}]", str(exc)) from None
        if addr.family == 0:
            raise ConfigError(top.source, f"resolver.addresses[{i}]",
                              f"{text!r}: a resolver is an IP address")
        addresses.append((addr.host.strip("[]"), addr.port))
    timeout = r.duration("timeout", 2.0)
    min_ttl = r.duration("min_ttl", 1.0)
    max_ttl = r.duration("max_ttl", 300.0)
    if timeout <= 0 or not 0 < min_ttl <= max_ttl:
        raise r.fail("min_ttl" if timeout > 0 else "timeout",
                     "expected timeout > 0 and 0 < min_ttl <= max_ttl")
    families = tuple(kind for kind, key in (("A", "ipv4"), ("AAAA", "ipv6"))
                     if r.get(key, bool, True))
    if not families:
        raise r.fail("ipv6", "ipv4 and ipv6 cannot both be false")
    r.finish()
    return ResolverConfig(tuple(addresses), timeout, min_ttl, max_ttl, families)


def _cpu_affinity(value: Any) -> str | tuple[frozenset[int], ...]:
    """`"auto"`, or nginx's masks: ["0001", "0010"] (the rightmost digit is CPU 0), one per
    worker."""
    if value == "auto":
        return value
    if not isinstance(value, list) or not value:
        raise ValueError("expected \"auto\" or a list of CPU masks such as [\"01\", \"10\"]")
    masks = []
    for mask in value:
        if not isinstance(mask, str) or not mask or set(mask) - {"0", "1"}:
            raise ValueError(f"{mask!r} is not a CPU mask of 0s and 1s (\"0101\")")
        cpus = frozenset(i for i, bit in enumerate(reversed(mask)) if bit == "1")
        if not cpus:
            raise ValueError(f"{mask!r} names no CPU")
        masks.append(cpus)
    return tuple(masks)


def _user(value: Any) -> tuple[str, str]:
    """`user = "www-data"` or "www-data www-data" (nginx's `user USER [GROUP]`): the group is
    the user's own when not given; both must exist."""
    import grp
    import pwd
    if not isinstance(value, str) or not 1 <= len(value.split()) <= 2:
        raise ValueError("expected \"USER\" or \"USER GROUP\"")
    name, *rest = value.split()
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ValueError(f"no user {name!r} on this machine") from None
    if rest:
        try:
            grp.getgrnam(rest[0])
        except KeyError:
            raise ValueError(f"no group {rest[0]!r} on this machine") from None
        return name, rest[0]
    return name, grp.getgrgid(entry.pw_gid).gr_name


def _name_upstreams(servers: tuple[ServerBlock, ...], implicit: dict[str, UpstreamConfig],
                    names: set[str]) -> tuple[tuple[ServerBlock, ...], dict[str, UpstreamConfig]]:
    """nginx: `proxy_pass http://NAME` means the upstream block NAME when there is one (the
    recipe's `proxy_pass http://backend;`), and only otherwise a host to resolve."""
    def named(loc: LocationConfig) -> LocationConfig:
        if loc.proxy_pass in implicit and loc.proxy_pass.split("://", 1)[1] in names:
            # proxy_pass https://NAME keeps proxy_tls: TLS to the group's servers
            return replace(loc, proxy_pass=loc.proxy_pass.split("://", 1)[1])
        return loc
    servers = tuple(replace(s, locations=tuple(named(loc) for loc in s.locations))
                    for s in servers)
    used = {loc.proxy_pass for s in servers for loc in s.locations}
    return servers, {k: v for k, v in implicit.items() if k in used}


def _check_defaults(source: str, servers: tuple[ServerBlock, ...]) -> None:
    defaults: dict[tuple[str, int], int] = {}
    for si, server in enumerate(servers):
        if not server.default:
            continue
        for addr in server.listen:
            key = (addr.host, addr.port)
            if key in defaults:
                raise ConfigError(source, f"server[{si}].default",
                                  f"{addr.text} already has a default server (server[{defaults[key]}])")
            defaults[key] = si


FORMATS = ("toml", "nginx")


def detect_format(path: str) -> str:
    """"nginx" or "toml": by the file's name (*.toml; nginx.conf, *.conf), else its content."""
    base = os.path.basename(path)
    if base.endswith(".toml"):
        return "toml"
    if base.endswith(".conf") or base.startswith("nginx"):
        return "nginx"
    from .nginx import looks_like_nginx
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "nginx" if looks_like_nginx(f.read(65536)) else "toml"
    except OSError:
        return "toml"


def load(path: str, fmt: str | None = None, prefix: str | None = None) -> Config:
    """Read and check the configuration at `path` (TOML, or nginx's format: `fmt`, else
    detected): every key, the files it names, the upstream servers resolved, the custom
    balancers imported.  Raise ConfigError on any mistake."""
    if (fmt or detect_format(path)) == "nginx":
        from . import nginx
        return nginx.load(path, prefix)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(path, "", "no such file") from None
    except OSError as exc:
        raise ConfigError(path, "", exc.strerror or str(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"not valid TOML: {exc}") from None
    return from_dict(data, path)


def load_class(source: str, key: str, path: str) -> type:
    """A custom balancer's class, imported: `package.module:Class`, with select(ctx, tried)."""
    module_name, sep, class_name = path.partition(":")
    if not sep or not module_name or not class_name:
        raise ConfigError(source, key, f"{path!r} is not an import path \"package.module:Class\"")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # an ImportError, or whatever the module raised while importing
        raise ConfigError(source, key, f"cannot import {module_name!r} for {path!r}: "
                          f"{type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if cls is None:
        raise ConfigError(source, key, f"module {module_name!r} has no {class_name!r}")
    if not isinstance(cls, type) or not callable(getattr(cls, "select", None)):
        raise ConfigError(source, key, f"{path!r} is not a class with a select(ctx, tried) method")
    return cls
