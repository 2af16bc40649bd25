"""Upstream groups: building them from the configuration, once, for the engine to select from.

Which server a connection goes to is decided in compiled code, with no Python call for the
built-in methods: fastws/engine/select.pxi holds the one implementation of each method, a
line-by-line port of nginx 1.22's peer selection that names the nginx function each part
mirrors.  This module is the control-plane half, run at start-up and on reload: it
builds the consistent-hash ring and the custom balancers' instances, and describes the groups
for ``fastws -t``.  Checking the servers and resolving host names (one peer per address, in
nginx's order) happen once, when the configuration is loaded (addresses.py).  :func:`build_upstreams` returns one compiled :class:`UpstreamGroup` per group.

The methods, as nginx has them, so that a fleet of fastws processes, or fastws beside nginx
during a migration, sends the same client or key to the same server without sharing any state:

* round robin: ``ngx_http_upstream_get_peer`` in src/http/ngx_http_upstream_round_robin.c,
  smooth weighted round robin: each round every usable untried peer's ``current_weight`` grows
  by its ``effective_weight``, the largest wins and gives back the round's total.  A failure
  lowers ``effective_weight`` by ``weight / max_fails``; it earns one unit back per round.
  When no primary peer is left the backup tier is used the same way;
* ``ip_hash`` (ngx_http_upstream_ip_hash_module.c): the first three octets of an IPv4 client,
  all 16 bytes of an IPv6 one, ``hash = (hash * 113 + byte) % 6271`` from 89, then a walk along
  the weights; a peer that cannot be used hashes again from there, at most 20 times, then round
  robin;
* ``hash KEY`` (ngx_http_upstream_hash_module.c): Cache::Memcached's
  ``((crc32([REHASH] KEY) >> 16) & 0x7fff) + PREV_HASH`` with the same walk and the same 20
  rehashes; an empty key means round robin.  ``hash KEY consistent``: the ketama ring of 160
  points per weight unit, ``crc32(HOST "\\0" PORT PREV_HASH)`` over the server text as written
  (built here, :func:`_build_ring`); a key starts at the first point at or after
  ``crc32(KEY)`` and moves to the next point while its server cannot be used, 20 at most;
* ``least_conn`` (ngx_http_upstream_least_conn_module.c): the fewest live connections per
  weight unit, ties settled by smooth weighted round robin;
* passive health: ``max_fails`` failures within ``fail_timeout`` take a peer out for
  ``fail_timeout``, then it gets one trial; the only server of a group is never taken out;
  ``max_conns`` caps a peer's live connections; ``down`` servers are never used;
* ``balance_factor`` (fastws's addition, HAProxy's hash-balance-factor) bounds the load a hash
  method may put on one server.

docs/balancing.md tells the same for users.

Custom balancers
----------------
``balancer = "package.module:Class"`` names a class built once per upstream (and again on
reload, and on a DNS change of the group's addresses) as ``Class(upstream_config, peers)``.
It must have ``select(ctx, tried)``, returning one of ``peers`` that is not in the set ``tried``
(the peers already attempted for this client connection), or None when nothing is left.  It may also have ``connected(peer)``,
``released(peer)`` and ``failed(peer)``, called when a connect succeeds, when that connection
ends, and when a connect fails.  fastws keeps ``peer.conns``, ``peer.state`` and the failure
counters up to date for it (in the compiled group, as for the built-in methods);
``peer.usable`` says whether nginx's rules would pick the peer now.
"""

from __future__ import annotations

import struct
import time
import zlib
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from ._engine import Peer, UpstreamGroup
from .addresses import MAX_CHASH_WEIGHT, PeerSpec, resolve
from .config import BALANCE_METHODS, Config, UpstreamConfig, load_class
from .errors import ConfigError

__all__ = ["Balancer", "Peer", "PeerSpec", "UpstreamGroup", "build_upstream", "build_upstreams",
           "describe"]

# nginx: "npoints = peer->weight * 160" in ngx_http_upstream_init_chash.
_CHASH_POINTS = 160


@runtime_checkable
class Balancer(Protocol):
    """The interface of a custom balancer named by ``balancer = "package.module:Class"``.

    ``__init__(self, upstream: UpstreamConfig, peers: list[Peer])`` is called once per upstream
    group at start-up and on reload.  ``connected``, ``released`` and ``failed`` are optional.
    """

    def select(self, ctx: Any, tried: frozenset[Peer]) -> Peer | None:
        """Return a peer not in ``tried`` for this client connection, or None (-> 502)."""
        ...


def _chash_host_port(server: str) -> tuple[bytes, bytes]:
    """Split the server text as ngx_http_upstream_init_chash does: "unix:" drops the prefix;
    otherwise trailing digits after the last ':' are the port."""
    data = server.encode()
    if data[:5].lower() == b"unix:":
        return data[5:], b""
    for j in range(len(data)):
        c = data[len(data) - j - 1]
        if c == ord(":"):
            return data[:len(data) - j - 1], data[len(data) - j:]
        if not ord("0") <= c <= ord("9"):
            break
    return data, b""


def _build_ring(primary: list[PeerSpec]) -> list[tuple[int, int]]:
    """ngx_http_upstream_init_chash: the ketama ring as sorted (point, server entry) pairs.

    Each primary peer adds ``weight * 160`` points ``crc32(HOST "\\0" PORT PREV_HASH)`` over its
    server text as written (Cache::Memcached::Fast); the addresses of one host name add the
    same points, and a repeated point keeps its first server, as nginx's ring does.
    """
    points: list[tuple[int, int]] = []
    pack = struct.Struct("<I").pack  # nginx hashes prev_hash as its little-endian bytes
    for peer in primary:
        host, port = _chash_host_port(peer.server)
        base = zlib.crc32(host + b"\0" + port)
        prev = 0
        for _ in range(peer.weight * _CHASH_POINTS):
            prev = zlib.crc32(pack(prev), base)
            points.append((prev, peer.server_index))
    # nginx sorts with glibc's qsort, a merge sort for arrays this size: stable, as list.sort.
    points.sort(key=lambda point: point[0])
    ring: list[tuple[int, int]] = []
    for value, server in points:
        if not ring or ring[-1][0] != value:
            ring.append((value, server))
    return ring


# -- building the groups from the configuration --------------------------------------------------

def _balance_of(config: UpstreamConfig) -> str:
    """The method as UpstreamGroup names it."""
    if config.balancer is not None:
        return "custom"
    if config.balance == "hash" and config.consistent:
        return "hash consistent"
    return config.balance


def build_upstream(source: str, config: UpstreamConfig,
                   clock: Callable[[], float] = time.monotonic) -> UpstreamGroup:
    """Build one upstream group from its checked configuration (see :func:`build_upstreams`).

    A configuration made by config.load() carries its peers resolved and its custom balancer's
    class imported; one made by hand (the tests) is checked and resolved here, by the same
    functions."""
    where = f"upstream.{config.name}"
    if config.balancer is None and config.balance not in BALANCE_METHODS:
        raise ConfigError(source, f"{where}.balance",
                          f"unknown method {config.balance!r} (one of {', '.join(BALANCE_METHODS)})")
    if config.balancer is None and config.balance == "hash" and (
            config.hash_key is None or not config.hash_key.parts):
        raise ConfigError(source, f"{where}.hash_key",
                          "is required with balance = \"hash\" (for example \"$request_uri\")")
    factor = config.balance_factor or 0.0
    if factor and not factor > 100:
        raise ConfigError(source, f"{where}.balance_factor",
                          f"is a percentage above 100 (e.g. 150), got {factor!r}")
    peers = config.peers or resolve(source, where, config.servers)
    primary = [p for p in peers if not p.backup]
    balance = _balance_of(config)
    if balance == "hash consistent" and sum(p.weight for p in primary) > MAX_CHASH_WEIGHT:
        raise ConfigError(source, f"{where}.servers",
                          f"the weights of a consistent hash add up to more than {MAX_CHASH_WEIGHT}")
    ring = _build_ring(primary) if balance == "hash consistent" else []
    group = UpstreamGroup(config, balance, peers, ring, clock)
    if config.balancer is not None:
        key = f"{where}.balancer"
        cls = config.balancer_class or load_class(source, key, config.balancer)
        try:
            instance = cls(config, list(group.peers))
        except Exception as exc:
            raise ConfigError(source, key, f"{config.balancer} could not start: "
                              f"{type(exc).__name__}: {exc}") from None
        group.set_balancer(instance)
    return group


def build_upstreams(config: Config, *, clock: Callable[[], float] = time.monotonic
                    ) -> dict[str, UpstreamGroup]:
    """Build every upstream group of ``config`` (as config.load() checked and resolved it):
    the compiled groups the engine selects from, and the custom balancers' instances, whose
    constructor may still refuse (ConfigError).

    Called by each worker at start, and by `fastws -t` and a reload to check the balancers;
    a reload starts every peer afresh, as nginx does.
    """
    out: dict[str, UpstreamGroup] = {}
    for up in config.upstreams:
        out[up.name] = build_upstream(config.source, up, clock)
    return out


def _duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def method_text(group: UpstreamGroup) -> str:
    """The balancing method of ``group`` as ``fastws -t`` prints it."""
    config = group.config
    if group.custom is not None:
        return f"custom {config.balancer}"
    text: str = config.balance
    if config.balance == "hash":
        text = f"hash {config.hash_key.text if config.hash_key else ''}"
        if config.consistent:
            text += " consistent"
    if config.balance_factor:
        text += f" balance_factor={config.balance_factor:g}"
    return text


def describe(upstreams: dict[str, UpstreamGroup] | Iterable[UpstreamGroup]) -> str:
    """The text ``fastws -t`` prints: each upstream with its method and peers."""
    groups = list(upstreams.values()) if isinstance(upstreams, dict) else list(upstreams)
    lines: list[str] = []
    for up in groups:
        kind = " (from proxy_pass)" if up.config.implicit else ""
        lines.append(f"upstream {up.name}{kind}: {method_text(up)}, {len(up.peers)} "
                     f"peer{'s' if len(up.peers) != 1 else ''}")
        for peer in up.peers:
            label = peer.name if peer.name == peer.server else f"{peer.server} -> {peer.name}"
            flags = [f"weight={peer.weight}", f"max_fails={peer.max_fails}",
                     f"fail_timeout={_duration(peer.fail_timeout)}"]
            if peer.max_conns:
                flags.append(f"max_conns={peer.max_conns}")
            if peer.backup:
                flags.append("backup")
            if peer.down:
                flags.append("down")
            lines.append(f"    {label} {' '.join(flags)}")
    return "\n".join(lines)
