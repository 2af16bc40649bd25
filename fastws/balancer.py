"""Upstream groups: which server a connection goes to, connection accounting and passive health.

This runs once per client connection (not per byte), so it is plain Python.  Every method is a
line-by-line port of nginx 1.22's peer selection, so that a fleet of fastws processes, or fastws
beside nginx during a migration, sends the same client or key to the same server without sharing
any state:

* round robin: ``ngx_http_upstream_get_peer`` in src/http/ngx_http_upstream_round_robin.c
  (smooth weighted round robin, ``effective_weight`` recovery after failures, backup tier);
* ``ip_hash``: src/http/modules/ngx_http_upstream_ip_hash_module.c (first three octets of an
  IPv4 client, all 16 bytes of an IPv6 one, ``hash = (hash * 113 + byte) % 6271`` from 89, the
  weight walk, at most 20 rehashes and then round robin);
* ``hash KEY``: src/http/modules/ngx_http_upstream_hash_module.c (Cache::Memcached compatible
  ``((crc32([REHASH] KEY) >> 16) & 0x7fff) + PREV_HASH``), and ``hash KEY consistent`` (the
  ketama ring of 160 points per weight unit, ``crc32(HOST "\\0" PORT PREV_HASH)`` over the server
  text as written);
* ``least_conn``: src/http/modules/ngx_http_upstream_least_conn_module.c.

A :class:`Selection` is nginx's per-request peer data: the ``tried`` bitmap, the hash state and
the tier (primary or backup) in use.  :meth:`Selection.next` is nginx's ``get`` and
:meth:`Selection.failed` / :meth:`Selection.connected` / :meth:`Upstream.release` together are
its ``free``.  The proxy enforces ``next_upstream_tries`` and ``next_upstream_timeout``.

Custom balancers
----------------
``balancer = "package.module:Class"`` names a class built once per upstream (and again on
reload) as ``Class(upstream_config, peers)``.  It must have ``select(ctx, tried)``, returning one
of ``peers`` that is not in the set ``tried`` (the peers already attempted for this client
connection), or None when nothing is left.  It may also have ``connected(peer)``,
``released(peer)`` and ``failed(peer)``, called when a connect succeeds, when that connection
ends, and when a connect fails.  fastws keeps ``peer.conns``, ``peer.state`` and the failure
counters up to date for it; ``peer.usable`` says whether nginx's rules would pick the peer now.
"""

from __future__ import annotations

import bisect
import importlib
import ipaddress
import logging
import math
import socket
import struct
import time
import zlib
from typing import Any, Callable, Iterable, Protocol, runtime_checkable

from .config import BALANCE_METHODS, Config, ServerConfig, UpstreamConfig, parse_address
from .errors import ConfigError

__all__ = ["Balancer", "Peer", "Selection", "Upstream", "build_upstreams", "describe"]

log = logging.getLogger("fastws.upstream")

# nginx: "if (++hp->tries > 20)" in the hash and ip_hash modules.
_HASH_TRIES = 20
# nginx: "npoints = peer->weight * 160" in ngx_http_upstream_init_chash.
_CHASH_POINTS = 160
# The ketama ring holds 160 points per weight unit; keep building it well under a second.
_MAX_WEIGHT = 10000
_MAX_CHASH_WEIGHT = 20000
# ngx_http_upstream_ip_hash_pseudo_addr: clients that are neither IPv4 nor IPv6 (unix sockets).
_PSEUDO_ADDR = b"\0\0\0"


@runtime_checkable
class Balancer(Protocol):
    """The interface of a custom balancer named by ``balancer = "package.module:Class"``.

    ``__init__(self, upstream: UpstreamConfig, peers: list[Peer])`` is called once per upstream
    group at start-up and on reload.  ``connected``, ``released`` and ``failed`` are optional.
    """

    def select(self, ctx: Any, tried: frozenset[Peer]) -> Peer | None:
        """Return a peer not in ``tried`` for this client connection, or None (-> 502)."""
        ...


class Peer:
    """One address of an upstream server (a host name that resolves to two addresses is two)."""

    __slots__ = (
        "name", "server", "family", "sockaddr", "weight", "max_fails", "fail_timeout",
        "max_conns", "backup", "down", "conns", "fails", "accessed", "checked",
        "current_weight", "effective_weight", "fails_total", "selected_total", "upstream",
        "_clock", "_cumulative",
    )

    def __init__(self, upstream: str, server: ServerConfig, name: str, family: int,
                 sockaddr: Any, clock: Callable[[], float]) -> None:
        self.upstream = upstream
        self.server = server.address  # as written: the consistent-hash ring is built from it
        self.name = name  # the address text, as nginx names a peer in $upstream_addr
        self.family = family
        self.sockaddr = sockaddr
        self.weight = server.weight
        self.max_fails = server.max_fails
        self.fail_timeout = server.fail_timeout
        self.max_conns = server.max_conns
        self.backup = server.backup
        self.down = server.down
        self.conns = 0
        self.fails = 0
        # nginx starts both at 0 (the epoch); a monotonic clock needs "long ago" instead.
        self.accessed = -math.inf
        self.checked = -math.inf
        self.current_weight = 0
        self.effective_weight = server.weight
        self.fails_total = 0
        self.selected_total = 0
        self._clock = clock
        self._cumulative = 0

    def _failed_out(self, now: float) -> bool:
        return bool(self.max_fails and self.fails >= self.max_fails
                    and now - self.checked <= self.fail_timeout)

    @property
    def state(self) -> str:
        """Either "up", or "down": configured down, or max_fails reached within fail_timeout."""
        return "down" if self.down or self._failed_out(self._clock()) else "up"

    @property
    def usable(self) -> bool:
        """True if nginx's rules allow choosing this peer now (up and under max_conns)."""
        return (self.state == "up"
                and not (self.max_conns and self.conns >= self.max_conns))

    def __repr__(self) -> str:
        return (f"<Peer {self.name} weight={self.weight} conns={self.conns} "
                f"state={self.state}{' backup' if self.backup else ''}>")


class _Tier:
    """nginx's ngx_http_upstream_rr_peers_t: the primary servers, or the backup servers."""

    __slots__ = ("peers", "total_weight", "single", "is_backup")

    def __init__(self, peers: list[Peer], single: bool, is_backup: bool) -> None:
        self.peers = peers
        self.total_weight = sum(p.weight for p in peers)
        self.single = single
        self.is_backup = is_backup


class Upstream:
    """An upstream group: its peers, their shared state, and the balancing method."""

    def __init__(self, config: UpstreamConfig, peers: list[Peer],
                 clock: Callable[[], float] = time.monotonic,
                 balancer: Any = None) -> None:
        self.name = config.name
        self.config = config
        self.peers = peers
        self.balance = config.balance
        self.consistent = config.consistent
        self.balance_factor = float(config.balance_factor or 0.0)
        self.hash_key = config.hash_key
        self.custom = balancer
        self._clock = clock
        primary = [p for p in peers if not p.backup]
        backup = [p for p in peers if p.backup]
        # ngx_http_upstream_init_round_robin: "single" is one primary address and no backups.
        self._primary = _Tier(primary, len(primary) == 1 and not backup, False)
        self._backup = _Tier(backup, False, True) if backup else None
        # Bounded load (HAProxy's hash-balance-factor): each peer's share of the slots.
        cumulative = 0
        for p in primary:
            p._cumulative = cumulative
            cumulative += p.weight
        self._points: list[int] = []
        self._point_servers: list[str] = []
        if self.balance == "hash" and self.consistent and self.custom is None:
            self._build_ring()
        self._all_down_logged = False

    # -- the consistent hash ring (ngx_http_upstream_init_chash) --------------------------------

    def _build_ring(self) -> None:
        points: list[tuple[int, str]] = []
        for peer in self._primary.peers:
            host, port = _chash_host_port(peer.server)
            base = zlib.crc32(host + b"\0" + port)
            prev = 0
            pack = struct.Struct("<I").pack  # nginx hashes prev_hash as little-endian bytes
            for _ in range(peer.weight * _CHASH_POINTS):
                prev = zlib.crc32(pack(prev), base)
                points.append((prev, peer.server))
        # glibc's qsort (a merge sort for arrays this size) is stable, and so is list.sort.
        points.sort(key=lambda point: point[0])
        last = None
        for value, server in points:
            if value != last:
                self._points.append(value)
                self._point_servers.append(server)
                last = value

    def ring(self) -> list[tuple[int, str]]:
        """The consistent-hash ring as (point, server text) pairs, sorted (empty otherwise)."""
        return list(zip(self._points, self._point_servers))

    # -- the public API -------------------------------------------------------------------------

    def select(self, ctx: Any) -> Selection:
        """Start choosing a server for one client connection (or request)."""
        return Selection(self, ctx)

    def release(self, peer: Peer) -> None:
        """A connection or tunnel that was ``connected`` to ``peer`` has ended."""
        if peer.conns > 0:
            peer.conns -= 1
        if self.custom is not None:
            _call_optional(self.custom, "released", peer)

    @property
    def method(self) -> str:
        """The balancing method as ``fastws -t`` prints it."""
        if self.custom is not None:
            return f"custom {self.config.balancer}"
        text = self.balance
        if self.balance == "hash":
            text = f"hash {self.hash_key.text if self.hash_key else ''}"
            if self.consistent:
                text += " consistent"
        if self.balance_factor:
            text += f" balance_factor={self.balance_factor:g}"
        return text

    # -- internal helpers shared by the selections ------------------------------------------------

    def _eligible(self, peer: Peer) -> bool:
        """HAProxy's chash_server_is_eligible: may ``peer`` take one more connection?"""
        served = sum(p.conns for p in self.peers)
        total = self._primary.total_weight
        slots_total = math.ceil((served + 1) * self.balance_factor / 100.0)
        per_weight, remainder = divmod(slots_total, total)
        cum = peer._cumulative
        slots = (peer.weight * per_weight
                 + ((cum + peer.weight) * remainder) // total - (cum * remainder) // total)
        return peer.conns < max(slots, 1)

    def _note_failure(self, peer: Peer, single: bool) -> None:
        """ngx_http_upstream_free_round_robin_peer with NGX_PEER_FAILED."""
        peer.fails_total += 1
        if peer.conns > 0:
            peer.conns -= 1
        if single:
            # nginx never marks down the only server of a group: there is nowhere else to go.
            return
        now = self._clock()
        peer.fails += 1
        peer.accessed = now
        peer.checked = now
        if peer.max_fails:
            peer.effective_weight -= peer.weight // peer.max_fails
            if peer.fails >= peer.max_fails:
                log.warning("upstream %s: server %s marked down for %gs after %d failed "
                            "attempt(s)", self.name, peer.name, peer.fail_timeout, peer.fails)
        if peer.effective_weight < 0:
            peer.effective_weight = 0

    def _note_success(self, peer: Peer) -> None:
        """ngx_http_upstream_free_round_robin_peer without NGX_PEER_FAILED: mark the peer live
        if this was the trial after fail_timeout (``accessed < checked``)."""
        if peer.accessed < peer.checked and peer.fails:
            if peer.max_fails and peer.fails >= peer.max_fails:
                log.info("upstream %s: server %s is up again", self.name, peer.name)
            peer.fails = 0
        if self._all_down_logged:
            self._all_down_logged = False
            log.info("upstream %s: a server is available again", self.name)


def _call_optional(obj: Any, name: str, *args: Any) -> None:
    method = getattr(obj, name, None)
    if method is not None:
        method(*args)


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


def _key_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    text = "" if value is None else str(value)
    try:
        # Header and URI text decoded as latin-1 maps back to the raw bytes nginx hashes.
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogateescape")


def _client_addr_bytes(remote_addr: Any) -> bytes:
    """The bytes ip_hash uses: 3 octets of IPv4, 16 bytes of IPv6, else nginx's pseudo address."""
    try:
        ip = ipaddress.ip_address(str(remote_addr).split("%", 1)[0])
    except ValueError:
        return _PSEUDO_ADDR
    return ip.packed[:3] if ip.version == 4 else ip.packed


def _credit(peer: Peer) -> int:
    """One round of smooth weighted round robin for a candidate (ngx_http_upstream_get_peer):
    its current weight grows by its effective weight, which recovers one unit after failures.
    Returns what it added, for the round's total."""
    w = peer.effective_weight
    peer.current_weight += w
    if w < peer.weight:
        peer.effective_weight = w + 1
    return w


def _weight_walk(peers: list[Peer], w: int) -> int:
    """The index of the peer whose share of the total weight holds `w` (nginx's walk in
    ngx_http_upstream_get_ip_hash_peer and ngx_http_upstream_get_hash_peer)."""
    p = 0
    while w >= peers[p].weight:
        w -= peers[p].weight
        p += 1
    return p


class Selection:
    """The choice of a server for one client connection: nginx's per-request peer data.

    Call :meth:`next` for a peer to connect to; after a refused or timed-out connect call
    :meth:`failed` and then :meth:`next` again; after a successful one call :meth:`connected`,
    and :meth:`Upstream.release` when that connection ends.  :meth:`next` returns None when no
    server is left, at once: the proxy answers 502.
    """

    __slots__ = ("upstream", "ctx", "tried_peers", "_tier", "_tried", "_pending", "_tries",
                 "_hash", "_rehash", "_key", "_addr", "_attempts")

    def __init__(self, upstream: Upstream, ctx: Any) -> None:
        self.upstream = upstream
        self.ctx = ctx
        self.tried_peers: list[Peer] = []
        self._tier = upstream._primary
        self._tried = 0  # nginx's rrp->tried bitmap, one bit per peer of the current tier
        self._pending: Peer | None = None
        self._tries = 0  # hp->tries / iphp->tries
        self._hash = 0
        self._rehash = 0
        self._key = b""
        self._addr = b""
        self._attempts = 0
        if upstream.custom is not None:
            return
        if upstream.balance == "ip_hash":
            self._addr = _client_addr_bytes(getattr(ctx, "remote_addr", ""))
            self._hash = 89
        elif upstream.balance == "hash":
            template = upstream.hash_key
            if template is not None:
                self._key = b"".join(
                    _key_bytes(ctx.variable(text)) if is_var else _key_bytes(text)
                    for is_var, text in template.parts)
            if upstream.consistent and upstream._points:
                # ngx_http_upstream_init_chash_peer: the first point >= crc32(key).
                self._hash = bisect.bisect_left(upstream._points, zlib.crc32(self._key))

    @property
    def key(self) -> bytes:
        """The evaluated hash key (empty for other methods)."""
        return self._key

    def next(self) -> Peer | None:
        """The next peer to try, or None when none is left (answer 502 at once)."""
        up = self.upstream
        if self._pending is not None:
            # The previous attempt was neither reported failed nor connected: abandon it.
            self.abort()
        if up.custom is not None:
            peer = self._get_custom()
        else:
            method = up.balance
            if method == "ip_hash":
                peer = self._get_ip_hash()
            elif method == "hash":
                peer = self._get_chash() if up.consistent else self._get_hash()
            elif method == "least_conn":
                peer = self._get_least_conn()
            else:
                peer = self._get_round_robin()
        if peer is None:
            if not self._attempts and not up._all_down_logged:
                up._all_down_logged = True
                log.error("upstream %s: no server available", up.name)
            return None
        self._attempts += 1
        peer.selected_total += 1
        self._pending = peer
        self.tried_peers.append(peer)
        return peer

    def failed(self, peer: Peer) -> None:
        """A connect to ``peer`` was refused or timed out (nginx's NGX_PEER_FAILED)."""
        if self._pending is peer:
            self._pending = None
        self.upstream._note_failure(peer, self._tier.single and not self._tier.is_backup)
        if self.upstream.custom is not None:
            _call_optional(self.upstream.custom, "failed", peer)

    def connected(self, peer: Peer) -> None:
        """The connect to ``peer`` succeeded; it counts as live until ``Upstream.release``."""
        if self._pending is peer:
            self._pending = None
        self.upstream._note_success(peer)
        if self.upstream.custom is not None:
            _call_optional(self.upstream.custom, "connected", peer)

    def abort(self) -> None:
        """Forget the attempt in progress without counting a failure (the client went away)."""
        peer, self._pending = self._pending, None
        if peer is not None and peer.conns > 0:
            peer.conns -= 1

    def __del__(self) -> None:
        # A connection dropped while connecting must not hold its place in least_conn and
        # max_conns forever.
        if self._pending is not None:
            self.abort()

    # -- nginx's get-peer functions ---------------------------------------------------------------

    def _take(self, peer: Peer, index: int, now: float) -> Peer:
        peer.conns += 1
        if now - peer.checked > peer.fail_timeout:
            peer.checked = now
        self._tried |= 1 << index
        return peer

    def _unusable(self, peer: Peer, now: float) -> bool:
        if peer.down or peer._failed_out(now):
            return True
        if peer.max_conns and peer.conns >= peer.max_conns:
            return True
        return bool(self.upstream.balance_factor) and not self.upstream._eligible(peer)

    def _to_backup(self) -> bool:
        """The "failed:" label of the get functions: switch to the backup tier if there is one."""
        backup = self.upstream._backup
        if self._tier.is_backup or backup is None:
            return False
        self._tier = backup
        self._tried = 0
        return True

    def _get_round_robin(self) -> Peer | None:
        """ngx_http_upstream_get_round_robin_peer."""
        now = self.upstream._clock()
        tier = self._tier
        if tier.single:
            peer = tier.peers[0]
            # nginx lets pc->tries (1) stop a second attempt; the tried bit does it here.
            if not (peer.down or self._tried & 1
                    or (peer.max_conns and peer.conns >= peer.max_conns)):
                peer.conns += 1
                self._tried |= 1
                return peer
        else:
            peer = self._get_peer(now)
            if peer is not None:
                return peer
        if self._to_backup():
            return self._get_round_robin()
        return None

    def _get_peer(self, now: float) -> Peer | None:
        """ngx_http_upstream_get_peer: smooth weighted round robin over the untried peers."""
        best: Peer | None = None
        best_i = 0
        total = 0
        tried = self._tried
        for i, peer in enumerate(self._tier.peers):
            if tried >> i & 1:
                continue
            if peer.down or peer._failed_out(now):
                continue
            if peer.max_conns and peer.conns >= peer.max_conns:
                continue
            total += _credit(peer)
            if best is None or peer.current_weight > best.current_weight:
                best, best_i = peer, i
        if best is None:
            return None
        best.current_weight -= total
        return self._take(best, best_i, now)

    def _get_least_conn(self) -> Peer | None:
        """ngx_http_upstream_get_least_conn_peer."""
        tier = self._tier
        if tier.single:
            return self._get_round_robin()
        now = self.upstream._clock()
        peers = tier.peers
        tried = self._tried
        best: Peer | None = None
        best_i = 0
        many = False
        for i, peer in enumerate(peers):
            if tried >> i & 1:
                continue
            if peer.down or peer._failed_out(now):
                continue
            if peer.max_conns and peer.conns >= peer.max_conns:
                continue
            # The least connections per weight unit; ties are settled by round robin.
            if best is None or peer.conns * best.weight < best.conns * peer.weight:
                best, best_i, many = peer, i, False
            elif peer.conns * best.weight == best.conns * peer.weight:
                many = True
        if best is None:
            if self._to_backup():
                return self._get_least_conn()
            return None
        if many:
            total = 0
            first = best
            for i in range(best_i, len(peers)):
                peer = peers[i]
                if tried >> i & 1:
                    continue
                if peer.down:
                    continue
                if peer.conns * first.weight != first.conns * peer.weight:
                    continue
                if peer._failed_out(now):
                    continue
                if peer.max_conns and peer.conns >= peer.max_conns:
                    continue
                total += _credit(peer)
                if peer.current_weight > best.current_weight:
                    best, best_i = peer, i
            best.current_weight -= total
        return self._take(best, best_i, now)

    def _get_ip_hash(self) -> Peer | None:
        """ngx_http_upstream_get_ip_hash_peer."""
        tier = self._tier
        if self._tries > _HASH_TRIES or tier.single:
            return self._get_round_robin()
        now = self.upstream._clock()
        peers = tier.peers
        total_weight = tier.total_weight
        addr = self._addr
        hash_ = self._hash
        while True:
            for byte in addr:
                hash_ = (hash_ * 113 + byte) % 6271
            p = _weight_walk(peers, hash_ % total_weight)
            peer = peers[p]
            if not (self._tried >> p & 1) and not self._unusable(peer, now):
                break
            self._tries += 1
            if self._tries > _HASH_TRIES:
                return self._get_round_robin()
        self._hash = hash_  # only a successful pick moves iphp->hash on
        return self._take(peer, p, now)

    def _get_hash(self) -> Peer | None:
        """ngx_http_upstream_get_hash_peer."""
        tier = self._tier
        if self._tries > _HASH_TRIES or tier.single or not self._key:
            return self._get_round_robin()
        now = self.upstream._clock()
        peers = tier.peers
        total_weight = tier.total_weight
        key = self._key
        while True:
            # Cache::Memcached: ((crc32([REHASH] KEY) >> 16) & 0x7fff) + PREV_HASH
            prefix = str(self._rehash).encode() if self._rehash > 0 else b""
            value = (zlib.crc32(prefix + key) >> 16) & 0x7FFF
            self._hash = (self._hash + value) & 0xFFFFFFFF
            self._rehash += 1
            p = _weight_walk(peers, self._hash % total_weight)
            peer = peers[p]
            if not (self._tried >> p & 1) and not self._unusable(peer, now):
                break
            self._tries += 1
            if self._tries > _HASH_TRIES:
                return self._get_round_robin()
        return self._take(peer, p, now)

    def _get_chash(self) -> Peer | None:
        """ngx_http_upstream_get_chash_peer."""
        up = self.upstream
        tier = self._tier
        if self._tries > _HASH_TRIES or tier.single or not self._key:
            return self._get_round_robin()
        now = up._clock()
        points = up._point_servers
        number = len(points)
        while True:
            server = points[self._hash % number]
            best: Peer | None = None
            best_i = 0
            total = 0
            for i, peer in enumerate(tier.peers):
                if self._tried >> i & 1:
                    continue
                if peer.server != server or self._unusable(peer, now):
                    continue
                # Several addresses of one host name share its points: smooth round robin.
                total += _credit(peer)
                if best is None or peer.current_weight > best.current_weight:
                    best, best_i = peer, i
            if best is not None:
                best.current_weight -= total
                return self._take(best, best_i, now)
            self._hash += 1
            self._tries += 1
            if self._tries > _HASH_TRIES:
                return self._get_round_robin()

    def _get_custom(self) -> Peer | None:
        up = self.upstream
        tried = frozenset(self.tried_peers)
        peer = up.custom.select(self.ctx, tried)
        if peer is None:
            return None
        if not isinstance(peer, Peer) or peer not in up.peers or peer in tried:
            log.error("upstream %s: balancer %s returned %r, which is not an untried peer of "
                      "the group", up.name, up.config.balancer, peer)
            return None
        peer.conns += 1
        return peer


# -- building the groups from the configuration --------------------------------------------------

def _resolve(source: str, key: str, server: ServerConfig) -> list[tuple[str, int, Any]]:
    """The peers of one server entry: (name, family, sockaddr) for each address, as nginx's
    ngx_parse_url/ngx_inet_resolve_host produce them (IPv4 addresses first, then IPv6)."""
    text = server.address
    if not isinstance(text, str) or not text:
        raise ConfigError(source, key, "a server address is a string \"host:port\"")
    if text[:5].lower() == "unix:":
        path = text[5:]
        if not path:
            raise ConfigError(source, key, f"{text!r}: a unix socket path is required")
        return [(text, socket.AF_UNIX, path)]
    try:
        addr = parse_address(text)
    except ValueError as exc:
        raise ConfigError(source, key, str(exc)) from None
    if addr.family != socket.AF_UNSPEC:
        ip = ipaddress.ip_address(addr.host)
        if ip.version == 6:
            return [(f"[{ip.compressed}]:{addr.port}", socket.AF_INET6,
                     (ip.compressed, addr.port, 0, 0))]
        return [(f"{ip}:{addr.port}", socket.AF_INET, (str(ip), addr.port))]
    try:
        infos = socket.getaddrinfo(addr.host, addr.port, socket.AF_UNSPEC, socket.SOCK_STREAM,
                                   0, socket.AI_ADDRCONFIG)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
        raise ConfigError(source, key, f"host {addr.host!r} not found ({reason})") from None
    out: list[tuple[str, int, Any]] = []
    seen: set[str] = set()
    for family in (socket.AF_INET, socket.AF_INET6):
        for fam, _type, _proto, _canon, sockaddr in infos:
            if fam != family:
                continue
            if fam == socket.AF_INET:
                name = f"{sockaddr[0]}:{addr.port}"
                sa: Any = (sockaddr[0], addr.port)
            else:
                name = f"[{sockaddr[0]}]:{addr.port}"
                sa = (sockaddr[0], addr.port, sockaddr[2], sockaddr[3])
            if name not in seen:
                seen.add(name)
                out.append((name, fam, sa))
    if not out:
        raise ConfigError(source, key, f"host {addr.host!r} has no IPv4 or IPv6 address")
    return out


def _identity(text: str) -> str:
    """What makes two server entries the same server (for the duplicate check)."""
    if text[:5].lower() == "unix:":
        return "unix:" + text[5:]
    try:
        addr = parse_address(text)
    except ValueError:
        return text
    if addr.family != socket.AF_UNSPEC:
        ip = ipaddress.ip_address(addr.host)
        return f"{ip.compressed}|{addr.port}"
    return f"{addr.host.lower()}|{addr.port}"


def _check_server(source: str, key: str, server: ServerConfig) -> None:
    def bad_int(value: Any, minimum: int) -> bool:
        return isinstance(value, bool) or not isinstance(value, int) or value < minimum

    if bad_int(server.weight, 1) or server.weight > _MAX_WEIGHT:
        raise ConfigError(source, f"{key}.weight",
                          f"weight must be a whole number from 1 to {_MAX_WEIGHT}, "
                          f"got {server.weight!r}")
    if bad_int(server.max_fails, 0):
        raise ConfigError(source, f"{key}.max_fails",
                          f"max_fails must be a whole number, 0 or more, got {server.max_fails!r}")
    if bad_int(server.max_conns, 0):
        raise ConfigError(source, f"{key}.max_conns",
                          f"max_conns must be a whole number, 0 or more, got {server.max_conns!r}")
    if (isinstance(server.fail_timeout, bool) or not isinstance(server.fail_timeout, (int, float))
            or not server.fail_timeout >= 0):
        raise ConfigError(source, f"{key}.fail_timeout",
                          f"fail_timeout must be a duration, 0 or more, got {server.fail_timeout!r}")


def _load_balancer(source: str, key: str, path: str) -> type:
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


def build_upstream(source: str, config: UpstreamConfig,
                   clock: Callable[[], float] = time.monotonic) -> Upstream:
    """Resolve, check and build one upstream group (see :func:`build_upstreams`)."""
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
    if not config.servers:
        raise ConfigError(source, f"{where}.servers", "needs at least one server")
    peers: list[Peer] = []
    seen: dict[str, int] = {}
    for i, server in enumerate(config.servers):
        key = f"{where}.servers[{i}]"
        _check_server(source, key, server)
        ident = _identity(server.address) if isinstance(server.address, str) else ""
        if ident in seen:
            raise ConfigError(source, key, f"duplicate server {server.address!r} "
                              f"(already servers[{seen[ident]}])")
        seen[ident] = i
        for name, family, sockaddr in _resolve(source, key, server):
            peers.append(Peer(config.name, server, name, family, sockaddr, clock))
    primary = [p for p in peers if not p.backup]
    if not primary:
        raise ConfigError(source, f"{where}.servers", "needs at least one server that is not a backup")
    if (config.balancer is None and config.balance == "hash" and config.consistent
            and sum(p.weight for p in primary) > _MAX_CHASH_WEIGHT):
        raise ConfigError(source, f"{where}.servers",
                          f"the weights of a consistent hash add up to more than {_MAX_CHASH_WEIGHT}")
    # nginx orders peers by server entry; backups form their own tier after the primaries.
    peers = primary + [p for p in peers if p.backup]
    instance = None
    if config.balancer is not None:
        key = f"{where}.balancer"
        cls = _load_balancer(source, key, config.balancer)
        try:
            instance = cls(config, list(peers))
        except Exception as exc:
            raise ConfigError(source, key, f"{config.balancer} could not start: "
                              f"{type(exc).__name__}: {exc}") from None
    return Upstream(config, peers, clock, instance)


def build_upstreams(config: Config, *, clock: Callable[[], float] = time.monotonic
                    ) -> dict[str, Upstream]:
    """Build every upstream group of ``config``: resolve host names (each address a peer, as
    nginx does), check the servers, and import custom balancers.  Raises ConfigError.

    Called at start-up and on reload; a reload starts every peer afresh, as nginx does.
    """
    out: dict[str, Upstream] = {}
    for up in config.upstreams:
        out[up.name] = build_upstream(config.source, up, clock)
    from ._engine import UpstreamGroup
    return {k: UpstreamGroup(v) for k, v in out.items()}  # type: ignore


def _duration(seconds: float) -> str:
    if seconds and seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


def describe(upstreams: dict[str, Upstream] | Iterable[Upstream]) -> str:
    """The text ``fastws -t`` prints: each upstream with its method and peers."""
    groups = list(upstreams.values()) if isinstance(upstreams, dict) else list(upstreams)
    lines: list[str] = []
    for up in groups:
        kind = " (from proxy_pass)" if up.config.implicit else ""
        lines.append(f"upstream {up.name}{kind}: {up.method}, {len(up.peers)} "
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
