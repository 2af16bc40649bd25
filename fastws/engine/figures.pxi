# The engine's figures: counters and gauges in one Counters struct, which the master's status
# board maps into shared memory (each worker's engine writes its own, live), and what the
# engine holds, counted as it is made and freed: the tests check that each kind comes back
# to zero once a test's connections are gone (a leak fails the test that made it), and the
# status page shows them.  Counting is a few increments per connection, so every build
# counts: the binary the tests check is the one that runs.

cdef enum HeldKind:
    DBG_CONNS = 0
    DBG_UPS
    DBG_TUNNELS
    DBG_REQS
    DBG_PIPES
    DBG_BUFFERS
    DBG_LOGRECS
    DBG_COUNT

cdef inline void held_count(Eng *e, int kind, int delta) noexcept nogil:
    e.n.held[kind] += delta


HELD_NAMES = ("connections", "upstream_connections", "tunnels", "requests", "pipes", "buffers",
              "log_records")


STATE_NAMES = ("none", "tls", "head", "idle", "upstream", "exchange", "tunnel", "answer",
               "linger", "closed", "route", "proxy", "hook")
GAUGES = frozenset(["conns", "tunnels_active", "pipes_total", "pipes_free", "paused_now"]
                   + ["states." + name for name in STATE_NAMES]
                   + ["held." + name for name in HELD_NAMES])


cdef dict counters_dict(Counters *n):
    return {
        "conns": n.conns,
        "states": {name: n.states[i] for i, name in enumerate(STATE_NAMES)},
        "tunnels_active": n.tunnels_active,
        "pipes_total": n.pipes_total,
        "pipes_free": n.pipes_free,
        "paused_now": n.paused_now,
        "held": {name: n.held[i] for i, name in enumerate(HELD_NAMES)},
        "accepts": n.accepts,
        "handled": n.handled,
        "requests": n.requests,
        "tunnels_total": n.tunnels_total,
        "bytes_spliced": n.bytes_spliced,
        "bytes_copied": n.bytes_copied,
        "splice_calls": n.splice_calls,
        "copy_calls": n.copy_calls,
        "pipes_created": n.pipes_created,
        "pipe_shortage": n.pipe_shortage,
        "switches_to_splice": n.switches_to_splice,
        "switches_to_copy": n.switches_to_copy,
        "closes": {name: n.closes[-reason] for reason, name in _REASONS.items()},
        "read_timeouts": n.closes[-CLOSE_READ_TIMEOUT],
        "send_timeouts": n.closes[-CLOSE_SEND_TIMEOUT],
        "loops": n.loops,
        "tls_tunnels_total": n.tls_tunnels_total,
        "tls_handshakes": n.tls_handshakes,
        "tls_handshake_failures": n.tls_handshake_failures,
        "tls_reads": n.tls_reads,
        "tls_writes": n.tls_writes,
        "accept_errors": n.accept_errors,
        "paused": n.paused,
        "log_lines": n.log_lines,
        "proxy_protocol_errors": n.proxy_protocol_errors,
        "ws_close_codes": {name: n.ws_codes[i] for i, name in enumerate(WS_CODE_NAMES)},
        "ws_pings": n.ws_pings,
        "ws_pongs": n.ws_pongs,
        "ws_goodbyes": n.ws_goodbyes,
        "ring_overflows": n.ring_overflows,
    }


# the classes of WebSocket close codes the status pages count (WS_CODE_*), by index
WS_CODE_NAMES = ("1000", "1001", "1002", "1009", "1012", "other", "application", "none")


COUNTERS_SIZE = sizeof(Counters)


def counters_view(Py_ssize_t address):
    """The figures of an engine whose Counters live at `address` (the status board's memory
    of another worker), as stats() gives them."""
    return counters_dict(<Counters *>address)


def counters_add(Py_ssize_t total, Py_ssize_t part):
    """Add the counters (not the gauges) of the block at `part` to the block at `total`, and
    clear `part` (a worker exited: its counts stay on the board)."""
    cdef Counters *t = <Counters *>total
    cdef Counters *p = <Counters *>part
    cdef unsigned long long *tw = <unsigned long long *>&t.accepts
    cdef unsigned long long *pw = <unsigned long long *>&p.accepts
    cdef Py_ssize_t i, n = (sizeof(Counters) - (<char *>&p.accepts - <char *>p)) // 8
    for i in range(n):
        tw[i] += pw[i]
    memset(p, 0, sizeof(Counters))
