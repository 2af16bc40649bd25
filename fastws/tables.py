"""The engine's tables, built from a checked configuration: what the engine runs on.

Python prepares everything once per worker (sorted name and location tables, upstream groups
with their balancing data, templates as variable numbers, log formats, TLS contexts), and the
engine copies it into C arrays (engine/tables.pxi).  Nothing here runs per connection.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from typing import Any, Mapping

from . import accesslog, hooks, limits, tls
from .config import PING_TO, Config, FramesConfig, LocationConfig, ServerBlock
from .hooks import Targets
from .variables import Template

# The engine's constants (engine/... and includes/consts.pxi).
LOC_PROXY, LOC_RETURN, LOC_STATUS = 0, 1, 2
RELAYS = {"auto": 0, "splice": 1, "copy": 2}


@dataclass
class ListenerTable:
    fd: int
    family: int
    tls: bool
    addr_text: str
    port: int
    exact: list[tuple[str, int]]     # (name, server index)
    head: list[tuple[str, int]]      # "*.example.com" as ".example.com", longest first
    tail: list[tuple[str, int]]      # "www.example.*" as "www.example.", longest first
    default: int
    regex: list[tuple[str, int]] = field(default_factory=list)  # "~pattern" names, in order
    proxy_protocol: bool = False     # a PROXY protocol header comes first


@dataclass
class ServerTable:
    name: str
    exact: list[int]                 # location indexes, sorted by path
    prefix: list[int]                # location indexes, longest path first
    client_header_timeout: float
    max_request_line: int
    max_request_head: int
    redirect_https: int
    tls: Any                         # ssl.SSLContext or None
    handshake_timeout: float
    access_log: int
    regex: list[int] = field(default_factory=list)   # regex locations, in configuration order
    real_ip_from: list[tuple[bool, int, bytes, int]] = field(default_factory=list)
    real_ip_header: str = "X-Real-IP"
    real_ip_recursive: bool = False


@dataclass
class LocationTable:
    path: str
    exact: bool
    kind: int
    group: int
    proxy_uri: str | None
    proxy_host: str | None
    websocket: bool
    tokens: tuple[str, ...]
    connect_timeout: float
    send_timeout: float
    read_timeout: float
    next_upstream_tries: int
    next_upstream_timeout: float
    ops: list[tuple[str, Any]]       # (header name, template parts or None)
    relay: int
    socket_keepalive: bool
    return_status: int
    return_body: str
    status_format: str | None
    upstream_tls: Any                # ssl.SSLContext or None
    tls_name: str | None
    tls_verify: bool
    access_log: int
    keepalive_timeout: float
    keepalive_requests: int
    client_max_body_size: int
    client_body_timeout: float
    noregex: bool = False            # "^~ /path"
    regex: str | None = None         # "~ pattern" / "~* pattern": the pattern
    caseless: bool = False
    pass_parts: Any = None           # proxy_pass with variables: its template's parts
    access: list[tuple[bool, int, bytes, int]] = field(default_factory=list)
    # (allow?, family (0: all), network address bytes, prefix length), in order
    origins: tuple[str, ...] = ()    # allowed Origins ("https://*.example.com" a wildcard)
    origin_missing_deny: bool = False
    idle_timeout: float = 0.0
    max_lifetime: float = 0.0
    lifetime_spread: float = 0.0
    forwarded_replace: bool = False
    # limit_conn and limit_req: (zone index, kind (0 conn, 1 req), max connections or burst in
    # 1/1000 requests, delay in 1/1000 requests), in order
    limits: list[tuple[int, int, int, int]] = field(default_factory=list)
    limit_conn_status: int = 503
    limit_req_status: int = 503
    # WebSocket frames (engine/frames.pxi): on, max message, checks, ping interval, ping
    # timeout, ping_to (1 client, 2 upstream, 3 both), close timeout
    frames: tuple[bool, int, bool, float, float, int, float] = (False, 0, True, 0.0, 30.0, 1, 5.0)
    # Python hooks (engine/hooks.pxi): indexes into Tables.hooks and Tables.close_hooks, -1: none
    hook: int = -1
    hook_requests: bool = False
    hook_timeout: float = 5.0
    close_hook: int = -1


@dataclass
class ZoneTable:
    name: str
    kind: int                        # 0: limit_conn, 1: limit_req
    address: int                     # its shared memory (limits.py)
    key: Any                         # template parts


@dataclass
class GroupTable:
    group: Any                       # balancer's compiled UpstreamGroup
    name: str
    hash_key: Any
    keepalive: int
    keepalive_timeout: float
    keepalive_requests: int
    sticky: tuple[str, str] | None = None  # cookie, attributes (each peer's value: its
                                           # RRPeer.sticky_id, the MD5 of its address)
    send_proxy: int = 0              # the PROXY protocol version sent first, 0: none


@dataclass
class LogFileTable:
    path: str
    fd: int


@dataclass
class LogFormatTable:
    parts: tuple[tuple[int, str], ...]
    json: bool
    names: tuple[str, ...]
    early: tuple[int, ...]
    escape: int = 0                  # accesslog.ESCAPES: default, json, none


@dataclass
class AccessLogTable:
    file: int
    format: int
    open: bool


@dataclass
class Tables:
    listeners: list[ListenerTable] = field(default_factory=list)
    servers: list[ServerTable] = field(default_factory=list)
    locations: list[LocationTable] = field(default_factory=list)
    groups: list[GroupTable] = field(default_factory=list)
    log_files: list[LogFileTable] = field(default_factory=list)
    log_formats: list[LogFormatTable] = field(default_factory=list)
    access_logs: list[AccessLogTable] = field(default_factory=list)
    maps: list[MapTableSpec] = field(default_factory=list)
    zones: list[ZoneTable] = field(default_factory=list)
    hooks: list[hooks.Hook] = field(default_factory=list)
    close_hooks: list[tuple[Any, str]] = field(default_factory=list)  # (function, its path)
    targets: Targets = field(default_factory=lambda: Targets({}))   # where hooks may send
    keep: list[Any] = field(default_factory=list)     # what must outlive the engine's use


@dataclass
class MapTableSpec:
    source: Any                      # template parts
    default: Any                     # template parts or None
    hostnames: bool
    exact: list[tuple[str, Any]]     # (lower-case value, template parts), sorted as bytes
    head: list[tuple[str, Any]]      # (".example.com", parts), longest first
    tail: list[tuple[str, Any]]      # ("www.example.", parts), longest first
    regex: list[tuple[str, bool, Any]]  # (pattern, caseless, parts), in order


def _parts(template: Template | None) -> Any:
    return list(template.parts) if template is not None else None


class _Logs:
    """Access logs, each file opened once and each (file, format, open) once."""

    def __init__(self, tables: Tables) -> None:
        self.t = tables
        self.files: dict[str, int] = {}
        self.formats: dict[int, int] = {}
        self.logs: dict[tuple[int, int, bool], int] = {}

    def index(self, cfg: Any) -> int:
        if cfg is None:
            return -1
        f = self.files.get(cfg.path)
        if f is None:
            f = self.files[cfg.path] = len(self.t.log_files)
            self.t.log_files.append(LogFileTable(cfg.path, accesslog.open_log(cfg.path)))
        fmt = self.formats.get(id(cfg.format))
        if fmt is None:
            fmt = self.formats[id(cfg.format)] = len(self.t.log_formats)
            lf = cfg.format
            self.t.log_formats.append(LogFormatTable(lf.parts, lf.json, lf.names, lf.early,
                                                     accesslog.ESCAPES.index(lf.escape)))
        key = (f, fmt, cfg.open)
        al = self.logs.get(key)
        if al is None:
            al = self.logs[key] = len(self.t.access_logs)
            self.t.access_logs.append(AccessLogTable(f, fmt, cfg.open))
        return al


class _Hooks:
    """The configuration's hooks, each function once, with where a decision may send a
    request."""

    def __init__(self, tables: Tables, targets: hooks.Targets) -> None:
        self.t = tables
        self.targets = targets
        self.hooks: dict[str, int] = {}
        self.close: dict[str, int] = {}

    def hook(self, path: str | None, fn: Any) -> int:
        if path is None:
            return -1
        if path not in self.hooks:
            self.hooks[path] = len(self.t.hooks)
            self.t.hooks.append(hooks.Hook(fn, path, self.targets))
        return self.hooks[path]

    def close_hook(self, path: str | None, fn: Any) -> int:
        if path is None:
            return -1
        if path not in self.close:
            self.close[path] = len(self.t.close_hooks)
            self.t.close_hooks.append((fn, path))
        return self.close[path]


def build(config: Config, sockets: list[socket.socket], groups: dict[str, Any],
          contexts: "tls.Contexts", zones: Mapping[str, int] | None = None) -> Tables:
    """The tables for one worker: its listening sockets, the configuration's servers and
    locations, the upstream groups balancer.py built, the TLS contexts of tls.py, and the
    limit zones' shared memory the master mapped (a private mapping when there is none)."""
    t = Tables()
    if zones is None:
        own = limits.Zones()
        zones = own.prepare(config)
        t.keep.append(own)
    zone_index = {}
    for z in config.limit_zones:
        zone_index[z.name] = len(t.zones)
        t.zones.append(ZoneTable(z.name, 0 if z.kind == "conn" else 1, zones[z.name],
                                 _parts(z.key)))
    for m in config.maps:
        t.maps.append(MapTableSpec(
            _parts(m.source), _parts(m.default), m.hostnames,
            [(k, _parts(v)) for k, v in m.exact], [(k, _parts(v)) for k, v in m.head],
            [(k, _parts(v)) for k, v in m.tail], [(p, c, _parts(v)) for p, c, v in m.regex]))
    logs = _Logs(t)
    group_index: dict[str, int] = {}
    for name, grp in groups.items():
        up = grp.config
        group_index[name] = len(t.groups)
        t.groups.append(GroupTable(
            grp, name, _parts(up.hash_key), up.keepalive, up.keepalive_timeout,
            up.keepalive_requests,
            (up.sticky.cookie, up.sticky.attributes()) if up.sticky is not None else None,
            up.send_proxy_protocol))
    # a hook's decision may name a group, or a server of one
    t.targets = Targets(dict(group_index))
    t.targets.follow([spec.group for spec in t.groups])
    hook_tables = _Hooks(t, t.targets)
    server_index: dict[int, int] = {}
    for server in config.servers:
        server_index[id(server)] = len(t.servers)
        t.servers.append(_server(t, server, group_index, logs, contexts, zone_index,
                                 hook_tables))
    for sock in sockets:
        host, port = sock.getsockname()[:2]
        on = [s for s in config.servers if any((a.host, a.port) == (host, port) or
                                                (_same(a.host, host) and a.port == port)
                                                for a in s.listen)]
        if not on:
            raise RuntimeError(f"no server listens on {host}:{port}")
        addr = next(a for s in on for a in s.listen if a.port == port and _same(a.host, host))
        t.listeners.append(_listener(sock, addr.host, port, on, server_index))
    return t


def _same(written: str, bound: str) -> bool:
    # "[::1]" in the configuration is "::1" in getsockname()
    return written.strip("[]") == bound


def _listener(sock: socket.socket, host: str, port: int, servers: list[ServerBlock],
              index: dict[int, int]) -> ListenerTable:
    # nginx's server_name rules (ngx_http_find_virtual_server): exact names, then the longest
    # "*.example.com", then the longest "www.example.*", then "~regex" names in order.
    exact: list[tuple[str, int]] = []
    head: list[tuple[str, int]] = []
    tail: list[tuple[str, int]] = []
    regex: list[tuple[str, int]] = []
    seen: set[str] = set()
    for server in servers:
        si = index[id(server)]
        for name in server.server_name:
            if name.startswith("~"):
                regex.append((name[1:], si))
            elif name.startswith("*."):
                head.append((name[1:], si))
            elif name.startswith("."):           # ".example.com": both forms
                if name[1:] not in seen:
                    seen.add(name[1:])
                    exact.append((name[1:], si))
                head.append((name, si))
            elif name.endswith(".*"):
                tail.append((name[:-1], si))
            elif name not in seen:
                seen.add(name)
                exact.append((name, si))
    head.sort(key=lambda item: -len(item[0]))
    tail.sort(key=lambda item: -len(item[0]))
    default = next((s for s in servers if s.default), servers[0])
    return ListenerTable(sock.fileno(), sock.family, default.tls is not None, host.strip("[]"),
                         port, exact, head, tail, index[id(default)], regex,
                         default.proxy_protocol)


def _server(t: Tables, server: ServerBlock, groups: dict[str, int], logs: _Logs,
            contexts: "tls.Contexts", zones: dict[str, int], hook_tables: _Hooks) -> ServerTable:
    first = len(t.locations)
    locs = [_location(loc, groups, logs, contexts, zones, hook_tables)
            for loc in server.locations]
    t.locations.extend(locs)
    exact = sorted((first + i for i, loc in enumerate(locs) if loc.exact),
                   key=lambda i: t.locations[i].path.encode())
    prefix = sorted((first + i for i, loc in enumerate(locs)
                     if not loc.exact and loc.regex is None),
                    key=lambda i: -len(t.locations[i].path.encode()))
    regex = [first + i for i, loc in enumerate(locs) if loc.regex is not None]
    tls_conf = server.tls
    server_log = {loc.access_log for loc in server.locations}
    return ServerTable(
        server.server_name[0] if server.server_name else "", exact, prefix,
        server.client_header_timeout, server.max_request_line, server.max_request_head,
        server.redirect_https, contexts.server(server),
        tls_conf.handshake_timeout if tls_conf is not None else 60.0,
        # a request that matches no location is logged by the server's log: the one its
        # locations share
        logs.index(server_log.pop()) if len(server_log) == 1 else -1, regex,
        [_rule(True, n) for n in server.real_ip_from], server.real_ip_header,
        server.real_ip_recursive)


def _location(loc: LocationConfig, groups: dict[str, int], logs: _Logs,
              contexts: "tls.Contexts", zones: dict[str, int], hook_tables: _Hooks
              ) -> LocationTable:
    if loc.return_status is not None:
        kind = LOC_RETURN
    elif loc.status is not None:
        kind = LOC_STATUS
    else:
        kind = LOC_PROXY
    up_tls = contexts.upstream(loc)
    return LocationTable(
        loc.path, loc.exact, kind, groups.get(loc.proxy_pass or "", -1), loc.proxy_uri,
        loc.proxy_pass, loc.websocket, loc.upgrade_tokens, loc.connect_timeout,
        loc.send_timeout, loc.read_timeout, loc.next_upstream_tries, loc.next_upstream_timeout,
        [(name, _parts(template)) for name, template in loc.set_headers], RELAYS[loc.relay],
        loc.socket_keepalive, loc.return_status or 0, loc.return_body, loc.status,
        up_tls.context if up_tls is not None else None,
        up_tls.conf.server_name if up_tls is not None else None,
        up_tls.conf.verify if up_tls is not None else True,
        logs.index(loc.access_log), loc.keepalive_timeout, loc.keepalive_requests,
        loc.client_max_body_size, loc.client_body_timeout, loc.noregex, loc.regex,
        loc.caseless, _parts(loc.proxy_pass_template), [_rule(a, n) for a, n in loc.access],
        loc.origins, loc.origin_missing == "deny", loc.idle_timeout, loc.max_tunnel_lifetime,
        loc.lifetime_spread, loc.forwarded_headers == "replace",
        # limit_req before limit_conn, as nginx's PREACCESS handlers run: a request refused
        # for its rate is never counted as a connection
        [(zones[r.zone], 1, r.max * 1000, NODELAY if r.delay is None else r.delay * 1000)
         for r in loc.limit_req]
        + [(zones[r.zone], 0, r.max, 0) for r in loc.limit_conn],
        loc.limit_conn_status, loc.limit_req_status, _frames(loc.frames),
        hook_tables.hook(loc.hooks.hook, loc.hooks.hook_fn) if kind == LOC_PROXY else -1,
        loc.hooks.requests, loc.hooks.timeout,
        hook_tables.close_hook(loc.hooks.on_tunnel_close, loc.hooks.close_fn)
        if kind == LOC_PROXY else -1)


def _frames(f: "FramesConfig") -> tuple[bool, int, bool, float, float, int, float]:
    return (f.on, f.max_message_size, f.checks, f.ping_interval, f.ping_timeout,
            PING_TO[f.ping_to], f.close_timeout)


NODELAY = 1 << 60                    # limit_req nodelay: no excess is ever delayed


def _rule(allow: bool, network: str) -> tuple[bool, int, bytes, int]:
    if network == "all":
        return allow, 0, b"", 0
    net = ipaddress.ip_network(network)
    family = socket.AF_INET if net.version == 4 else socket.AF_INET6
    return allow, family, net.network_address.packed, net.prefixlen
