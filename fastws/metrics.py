"""Counters shared by all workers, and the status pages drawn from them.

The master maps one anonymous shared memory area before it forks (MAP_SHARED, so every worker
and every later generation sees the same pages).  Each worker owns one slot and is its only
writer: its engine keeps its figures (connections, tunnels, requests, bytes) right there, live,
and the worker adds its upstream servers' figures every half second; a status request sums
every slot.  Slot 0 keeps what exited workers counted: when the
master reaps a worker it adds the slot's monotonic counters to slot 0 and clears the slot, so
"accepts" and the byte counts never go back (nginx keeps its stub_status counters in a shared
zone for the same reason).  Values are aligned 64-bit words; a reader may see a value a moment
old, never a torn one.
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
from typing import TYPE_CHECKING, AbstractSet, Any, Iterator

import orjson

from . import _engine, limits

if TYPE_CHECKING:
    from .worker import Worker



# A slot: the worker's control words, then its engine's figures (the engine writes them in
# place, live: _engine.Counters), then a table of its upstream servers' figures.
HEADER = ("pid", "generation", "processes", "serial", "retiring", "draining")
HEADER_WORDS = len(HEADER)
ENGINE_WORDS = (_engine.COUNTERS_SIZE + 7) // 8
KEPT = frozenset(("serial",))   # never moved nor cleared: connection numbers stay unique

# Per-peer words: the peer's key, then its figures.
PEER = ("key", "active", "tunnels_total", "bytes_up", "bytes_down", "fails", "selected", "down")
PEER_GAUGES = frozenset(("active", "down"))
PEER_STATES = {"down": 1, "unhealthy": 2}     # a peer's "down" word
PEER_CAP = 256
TOMBSTONE = -1                # the key of an entry whose server left (Slot.forget_peers)
PEERS_AT = HEADER_WORDS + ENGINE_WORDS
SLOT_WORDS = PEERS_AT + PEER_CAP * len(PEER)

_H = {name: i for i, name in enumerate(HEADER)}


def peer_key(upstream: str, server: str) -> int:
    digest = hashlib.blake2b(f"{upstream}\0{server}".encode(), digest_size=8).digest()
    key = int.from_bytes(digest, "little", signed=True)
    return key if key not in (0, TOMBSTONE) else 1        # (0 ends the table)


def _field(name: str) -> Any:
    i = _H[name]

    def get(self: "Slot") -> int:
        return self.v[i]

    def put(self: "Slot", value: int) -> None:
        self.v[i] = value

    return property(get, put)


class Slot:
    """One worker's words in the board: header fields as attributes, its engine's figures at
    `counters` (an address the engine writes to), and its peer table."""

    __slots__ = ("v", "index", "counters", "_peers")

    pid = _field("pid")
    generation = _field("generation")
    processes = _field("processes")
    serial = _field("serial")
    retiring = _field("retiring")
    draining = _field("draining")  # slot 0: a drain's end, ms of CLOCK_MONOTONIC; 0: none

    def __init__(self, view: memoryview, index: int, address: int) -> None:
        self.v = view
        self.index = index
        self.counters = address + HEADER_WORDS * 8
        self._peers: dict[int, int] = {}   # peer key -> word offset (writer side)

    def clear(self) -> None:
        for i in range(len(self.v)):
            if i != _H["serial"]:
                self.v[i] = 0
        self._peers.clear()

    def figures(self) -> dict[str, Any]:
        """Its engine's figures, as Engine.stats() gives them."""
        return _engine.counters_view(self.counters)

    def peer_offset(self, key: int) -> int:
        """The offset of a peer's words in this slot (a free entry is taken for a new key), or
        -1 when the table is full."""
        off = self._peers.get(key)
        if off is not None:
            return off
        for i in range(PEER_CAP):
            off = PEERS_AT + i * len(PEER)
            if self.v[off] in (0, TOMBSTONE, key):      # (a tombstone's figures are 0)
                self.v[off] = key
                self._peers[key] = off
                return off
        return -1

    def forget_peers(self, keys: AbstractSet[int]) -> None:
        """Servers that left their group (a `resolve` name's change): each entry becomes a
        tombstone (its key first, so that no reader takes its figures for another server's;
        then its figures cleared), which a later new server takes over."""
        for key in keys:
            off = self._peers.pop(key, None)
            if off is None:
                continue
            self.v[off] = TOMBSTONE
            for j in range(1, len(PEER)):
                self.v[off + j] = 0

    def peers(self) -> Iterator[tuple[int, int]]:
        for i in range(PEER_CAP):
            off = PEERS_AT + i * len(PEER)
            key = self.v[off]
            if key == 0:
                return
            if key != TOMBSTONE:
                yield key, off


class Board:
    """The shared area: slot 0 for exited workers, then one slot per live worker."""

    def __init__(self, slots: int) -> None:
        self.count = slots + 1
        self.mem = mmap.mmap(-1, self.count * SLOT_WORDS * 8,
                             flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        words = memoryview(self.mem).cast("q")
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        self.slots = [Slot(words[i * SLOT_WORDS:(i + 1) * SLOT_WORDS], i,
                           base + i * SLOT_WORDS * 8) for i in range(self.count)]
        self.used: set[int] = set()

    def take(self) -> Slot | None:
        for slot in self.slots[1:]:
            if slot.index not in self.used:
                self.used.add(slot.index)
                slot.clear()
                return slot
        return None

    def retire(self, slot: Slot) -> None:
        """A worker exited: keep its counters in slot 0 and free its slot (master side)."""
        total = self.slots[0]
        _engine.counters_add(total.counters, slot.counters)
        for key, off in slot.peers():
            toff = total.peer_offset(key)
            if toff < 0:
                continue
            for j, name in enumerate(PEER[1:], 1):
                if name not in PEER_GAUGES:
                    total.v[toff + j] += slot.v[off + j]
        slot.clear()
        self.used.discard(slot.index)

    def live(self) -> list[Slot]:
        """Slot 0 and every slot a worker holds (pid set)."""
        return [self.slots[0]] + [s for s in self.slots[1:] if s.pid]


def unhealthy_elsewhere(w: "Worker") -> set[tuple[str, str]]:
    """The servers another live worker's health checks find failing (a new generation starts
    from them rather than from "every server healthy")."""
    keys = {peer_key(name, p.name): (name, p.name) for name, g in w.groups.items()
            for p in g.peers}
    out = set()
    for slot in w.board.live()[1:]:
        if slot is w.stats:
            continue
        for key, off in slot.peers():
            if key in keys and slot.v[off + 7] == PEER_STATES["unhealthy"]:
                out.add(keys[key])
    return out


def private_board() -> Board:
    """A board for a worker that runs without a master."""
    return Board(1)


# --- the worker's side -------------------------------------------------------------------------

def publish(w: "Worker") -> None:
    """Write the worker's figures that its engine does not keep live into its slot: the
    connection numbering, and its upstream servers' figures."""
    slot = w.stats
    if w.engine is None:
        return
    slot.serial = w.engine.serial
    words = slot.v
    for name, group in w.groups.items():
        for p in group.peers:
            off = slot.peer_offset(peer_key(name, p.name))
            if off < 0:
                continue
            words[off + 1] = p.tunnels_active
            words[off + 2] = p.tunnels_total
            words[off + 3] = p.bytes_up
            words[off + 4] = p.bytes_down
            words[off + 5] = p.fails_total
            words[off + 6] = p.selected_total
            words[off + 7] = PEER_STATES.get(p.state, 0)


def _add(total: dict[str, Any], part: dict[str, Any]) -> None:
    for k, v in part.items():
        if isinstance(v, dict):
            _add(total.setdefault(k, {}), v)
        else:
            total[k] = total.get(k, 0) + v


def totals(w: "Worker") -> dict[str, Any]:
    """Everything summed over the workers: the data of every status format."""
    publish(w)
    slots = w.board.live()
    figures = {s.index: s.figures() for s in slots}
    e: dict[str, Any] = {}
    for f in figures.values():
        _add(e, f)
    peers: dict[int, list[int]] = {}
    for s in slots:
        for key, off in s.peers():
            acc = peers.setdefault(key, [0] * len(PEER))
            for j in range(1, len(PEER)):
                acc[j] += s.v[off + j]
    workers = [s for s in slots[1:]]
    upstreams = {}
    for name, up in w.groups.items():
        servers = []
        for p in up.peers:
            acc = peers.get(peer_key(name, p.name), [0] * len(PEER))
            # A server is "down" when the worker answering sees it down (each worker keeps its
            # own failure accounting, as nginx's workers do without a shared zone).
            entry = {"server": p.name, "state": p.state, "active": acc[1],
                     "tunnels": acc[2], "bytes_up": acc[3], "bytes_down": acc[4],
                     "fails": acc[5], "selected": acc[6], "backup": p.backup}
            checks = w.health.figures(name, p.name)
            if checks is not None:
                entry["health_check"] = checks   # (the answering worker's, as "state")
            servers.append(entry)
        upstreams[name] = servers
    states = e["states"]
    active = e["conns"]
    reading = states["head"] + states["tls"]
    waiting = states["idle"]
    return {
        "connections": {"active": active, "reading": reading,
                        "writing": active - reading - waiting, "waiting": waiting,
                        "accepted": e["accepts"], "handled": e["handled"]},
        "requests": e["requests"],
        "tunnels": {"active": e["tunnels_active"], "total": e["tunnels_total"]},
        "engine": e,
        "workers": [{"pid": s.pid, "generation": s.generation,
                     "accepts": figures[s.index]["accepts"],
                     "active": figures[s.index]["conns"],
                     "tunnels": figures[s.index]["tunnels_active"],
                     "paused": bool(figures[s.index]["paused_now"]),
                     "retiring": bool(s.retiring)}
                    for s in workers],
        "upstreams": upstreams,
        # upstream keep-alive pools are per worker: these are the answering worker's
        "keepalive_pools": w.engine.pools(),
        # limit zones are shared: every worker's counts, in one place
        "limits": limits.figures(w.zone_addresses, w.config),
    }


def render(w: "Worker", fmt: str) -> tuple[int, str, bytes]:
    """A status location's answer: (status, content type, body).  `ready` fails (503) once a
    stop or a drain began, so that a load balancer sends nothing new; `live` answers while the
    worker runs."""
    if fmt == "live":
        return 200, "text/plain", b"alive\n"
    if fmt == "ready":
        if w.stopping or w.board.slots[0].draining:
            return 503, "text/plain", b"draining\n"
        return 200, "text/plain", b"ready\n"
    data = totals(w)
    c = data["connections"]
    if fmt == "stub":
        # ngx_http_stub_status_module.c, byte for byte (the trailing spaces included).
        text = (f"Active connections: {c['active']} \n"
                "server accepts handled requests\n"
                f" {c['accepted']} {c['handled']} {data['requests']} \n"
                f"Reading: {c['reading']} Writing: {c['writing']} Waiting: {c['waiting']} \n")
        return 200, "text/plain", text.encode()
    if fmt == "prometheus":
        return 200, "text/plain; version=0.0.4; charset=utf-8", prometheus(data).encode()
    return 200, "application/json", orjson.dumps(data, option=orjson.OPT_INDENT_2)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def prometheus(data: dict[str, Any]) -> str:
    """The Prometheus text exposition format (version 0.0.4)."""
    out: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, int | float]]) -> None:
        out.append(f"# HELP fastws_{name} {help_}")
        out.append(f"# TYPE fastws_{name} {kind}")
        for labels, value in samples:
            out.append(f"fastws_{name}{labels} {value}")

    c = data["connections"]
    metric("connections_active", "gauge", "Client connections open, tunnels included.",
           [("", c["active"])])
    metric("connections_reading", "gauge", "Connections reading a request head.",
           [("", c["reading"])])
    metric("connections_writing", "gauge", "Connections being answered or tunnelled.",
           [("", c["writing"])])
    metric("connections_waiting", "gauge", "Idle keep-alive connections.", [("", c["waiting"])])
    metric("connections_accepted_total", "counter", "Client connections accepted.",
           [("", c["accepted"])])
    metric("connections_handled_total", "counter", "Client connections handled.",
           [("", c["handled"])])
    metric("http_requests_total", "counter", "Request heads read.", [("", data["requests"])])
    metric("tunnels_active", "gauge", "Tunnels relaying now.", [("", data["tunnels"]["active"])])
    metric("tunnels_total", "counter", "Tunnels opened.", [("", data["tunnels"]["total"])])
    metric("workers", "gauge", "Worker processes running (draining ones included).",
           [("", len(data["workers"]))])
    e = data["engine"]
    metric("relay_bytes_total", "counter", "Bytes relayed by the core, by method.",
           [('{method="splice"}', e["bytes_spliced"]), ('{method="copy"}', e["bytes_copied"])])
    metric("relay_timeouts_total", "counter", "Tunnels closed by a timeout.",
           [('{kind="read"}', e["read_timeouts"]), ('{kind="send"}', e["send_timeouts"])])
    metric("relay_pipes", "gauge", "Pipes in the pools.", [("", e["pipes_total"])])
    metric("proxy_protocol_errors_total", "counter",
           "Connections closed for an invalid or missing PROXY protocol header.",
           [("", e["proxy_protocol_errors"])])
    metric("tunnels_closed_total", "counter", "Tunnels closed, by reason ($tunnel_close).",
           [(f'{{reason="{r}"}}', n) for r, n in e["closes"].items()])
    metric("websocket_close_codes_total", "counter",
           "WebSocket tunnels that followed their frames, by the class of their close code.",
           [(f'{{code="{k}"}}', n) for k, n in e["ws_close_codes"].items()])
    metric("websocket_pings_total", "counter", "Pings the proxy sent on WebSocket tunnels.",
           [("", e["ws_pings"])])
    metric("websocket_pongs_total", "counter", "Pongs to the proxy's pings, taken back.",
           [("", e["ws_pongs"])])
    metric("websocket_proxy_closes_total", "counter",
           "Closing handshakes the proxy began (shutdown, reload, timeouts, limits, servers "
           "removed).",
           [("", e["ws_goodbyes"])])
    zones = [(f'{{zone="{_label(name)}",kind="{z["kind"]}"', z)
             for name, z in data["limits"].items()]
    metric("limit_requests_total", "counter", "Requests checked by a limit zone, by result.",
           [(lbl + f',result="{r}"}}', z[r]) for lbl, z in zones
            for r in ("passed", "delayed", "rejected", "full")])
    metric("limit_entries", "gauge", "Keys a limit zone holds now.",
           [(lbl + "}", z["entries"]) for lbl, z in zones])
    ups = [(f'{{upstream="{_label(u)}",server="{_label(s["server"])}"}}', s)
           for u, servers in data["upstreams"].items() for s in servers]
    metric("upstream_up", "gauge", "1 if the server is up, 0 if down.",
           [(lbl, 1 if s["state"] == "up" else 0) for lbl, s in ups])
    metric("upstream_tunnels_active", "gauge", "Tunnels open to the server.",
           [(lbl, s["active"]) for lbl, s in ups])
    metric("upstream_tunnels_total", "counter", "Tunnels opened to the server.",
           [(lbl, s["tunnels"]) for lbl, s in ups])
    metric("upstream_bytes_total", "counter",
           "Bytes carried by closed tunnels, to (up) and from (down) the server.",
           [(lbl[:-1] + ',direction="up"}', s["bytes_up"]) for lbl, s in ups]
           + [(lbl[:-1] + ',direction="down"}', s["bytes_down"]) for lbl, s in ups])
    metric("upstream_connect_failures_total", "counter", "Failed attempts on the server.",
           [(lbl, s["fails"]) for lbl, s in ups])
    metric("upstream_selected_total", "counter", "Times the balancer chose the server.",
           [(lbl, s["selected"]) for lbl, s in ups])
    checked = [(lbl, s["health_check"]) for lbl, s in ups if "health_check" in s]
    if checked:
        metric("upstream_healthy", "gauge",
               "1 if the server passes its active health checks, 0 if it fails them.",
               [(lbl, 1 if h["healthy"] else 0) for lbl, h in checked])
        metric("upstream_health_checks_total", "counter", "Active health checks of the server.",
               [(lbl, h["checks"]) for lbl, h in checked])
        metric("upstream_health_check_failures_total", "counter",
               "Active health checks of the server that failed.",
               [(lbl, h["failures"]) for lbl, h in checked])
    return "\n".join(out) + "\n"
