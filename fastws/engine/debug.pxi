# What the engine holds: connections, upstream connections, tunnels, requests, pipes, buffers
# and log records, counted as they are made and freed.  The tests check that each comes back
# to zero once a test's connections are gone (a leak fails the test that made it), and the
# status page shows them.  Counting is a few increments per connection, so every build counts:
# the binary the tests check is the one that runs.

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
