"""The scenarios and how each maps onto the load generator."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    mode: str            # wsload --mode
    conns: int
    size: int
    unit: str            # one unit of work, for CPU per unit
    rate_label: str      # what the throughput column shows
    cpu_scale: float     # CPU seconds per unit -> shown value
    cpu_label: str
    latency: bool = False
    idle: bool = False
    uses_src: bool = False
    what: str = ""
    burst: bool = False  # a fixed count of connections (count), conns at a time; memory before/end/settled
    count: int = 0
    pace_mb: float = 0.0  # bulk: MB/s in all, paced by the sender (0: as fast as it goes)


# The paced bulk scenarios' rate: well below what fastws (with frames or without) relays here,
# where the cost of following frames is judged; high enough that its CPU per MB is measured
# over more than a second of its work each run.  nginx, at about 600 MB/s, runs at its limit.
# Why bulk is paced at all: bench/README.md.
BULK_PACE_MB = 1000.0


# the burst's settle time: memory is read this long after the last connection closed
BURST_SETTLE_S = 2.0
# the burst's head: over fastws's default max_request_head (32 KiB), nginx's default
# large_client_header_buffers (4 x 8k) and HAProxy's default buffer (16 KiB)
BURST_HEAD = 40960


SCENARIOS = [
    Scenario("echo-64", "Echo ping-pong, 64 B messages", "echo", 64, 64, "message",
             "messages/s", 1e6, "proxy CPU µs/message", latency=True,
             what="64 connections, one 64 B message in flight each, echo checked byte for byte"),
    Scenario("echo-4k", "Echo ping-pong, 4 KB messages", "echo", 64, 4096, "message",
             "messages/s", 1e6, "proxy CPU µs/message", latency=True,
             what="64 connections, one 4096 B message in flight each, echo checked byte for byte"),
    Scenario("bulk-up", "Bulk one way, client to sink, 64 KB frames", "send", 8, 65536, "MB",
             "MB/s", 1e3, "proxy CPU ms/MB",
             what="8 connections streaming 64 KiB masked frames to /sink"),
    Scenario("bulk-down", "Bulk one way, firehose to client, 64 KB frames", "recv", 8, 65536, "MB",
             "MB/s", 1e3, "proxy CPU ms/MB",
             what="8 connections reading 64 KiB frames from /firehose, every byte checked"),
    Scenario("bulk-up-paced", f"Bulk one way at {BULK_PACE_MB:,.0f} MB/s, client to sink", "send", 8, 65536,
             "MB", "MB/s", 1e3, "proxy CPU ms/MB", pace_mb=BULK_PACE_MB,
             what=f"bulk-up paced by the load generator at {BULK_PACE_MB:,.0f} MB/s in all: the proxy's CPU "
                  f"per MB below its limit"),
    Scenario("bulk-down-paced", f"Bulk one way at {BULK_PACE_MB:,.0f} MB/s, firehose to client", "recv", 8,
             65536, "MB", "MB/s", 1e3, "proxy CPU ms/MB", pace_mb=BULK_PACE_MB,
             what=f"bulk-down paced by the backend at {BULK_PACE_MB:,.0f} MB/s in all "
                  f"({BULK_PACE_MB / 8:g} MB/s a connection): the proxy's CPU per MB below its limit"),
    Scenario("chat-5k", "Chat-shaped: 5,000 connections, one 64 B message each a second", "chat", 5000, 64,
             "message", "messages/s", 1e6, "proxy CPU µs/message", latency=True, uses_src=True,
             what="5,000 WebSocket connections, mostly idle, each sending a 64 B message about once a "
                  "second (at a random point of the first second), echo checked byte for byte"),
    Scenario("handshake", "Handshake rate (connect + upgrade + one echo + close)", "handshake", 32, 64,
             "handshake", "handshakes/s", 1e6, "proxy CPU µs/handshake", latency=True, uses_src=True,
             what="32 concurrent loops of TCP connect, upgrade, one 64 B echo, close handshake"),
    Scenario("idle-5k", "Idle tunnels, 5,000 held open", "idle", 5000, 16, "tunnel",
             "tunnels", 1e6, "proxy CPU µs/tunnel opened", idle=True, uses_src=True,
             what="5,000 upgraded tunnels opened (one echo each) and held; proxy memory before/after"),
    Scenario("idle-10k", "Idle tunnels, 10,000 held open", "idle", 10000, 16, "tunnel",
             "tunnels", 1e6, "proxy CPU µs/tunnel opened", idle=True, uses_src=True,
             what="10,000 upgraded tunnels (capped by the per-process fd limit, see notes) held"),
    Scenario("http", "Small HTTP GETs with keep-alive", "http", 64, 0, "request",
             "requests/s", 1e6, "proxy CPU µs/request", latency=True,
             what="64 keep-alive connections, one GET in flight each, status and body checked"),
    Scenario("burst-431", "Burst of oversized request heads, then memory", "burst", 50, BURST_HEAD, "head",
             "heads/s", 1e6, "proxy CPU µs/head", uses_src=True, burst=True, count=10000,
             what=f"10,000 connections, 50 at a time, each sending one {BURST_HEAD:,} B request head (over every "
                  f"proxy's limit) and reading the answer until the proxy closes; the proxy's memory before, at "
                  f"the end, and {BURST_SETTLE_S:g} s after the last close"),
]

BY_KEY = {s.key: s for s in SCENARIOS}
