# Leak counters: a FASTWS_DEBUG build counts what the engine holds (connections, upstream
# connections, tunnels, requests, pipes, buffers, log records), and the tests check that each
# comes back to zero when a test's connections are gone.  A normal build counts nothing.

cdef enum DebugKind:
    DBG_CONNS = 0
    DBG_UPS
    DBG_TUNNELS
    DBG_REQS
    DBG_PIPES
    DBG_BUFFERS
    DBG_LOGRECS
    DBG_COUNT

cdef long long _debug_counts[<int>DBG_COUNT]

cdef inline void debug_count(int kind, int delta) noexcept nogil:
    if FASTWS_DEBUG:
        _debug_counts[kind] += delta


def debug_counts():
    """What the engine holds now, by kind, in a FASTWS_DEBUG build (None otherwise)."""
    if not FASTWS_DEBUG:
        return None
    names = ("connections", "upstream_connections", "tunnels", "requests", "pipes", "buffers",
             "log_records")
    return {name: _debug_counts[i] for i, name in enumerate(names)}
