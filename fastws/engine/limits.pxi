# limit_conn and limit_req (nginx's ngx_http_limit_conn_module, ngx_http_limit_req_module):
# checked once a request is routed to its location, counted in zones every worker shares
# (includes/zone.h).  A request over a limit is answered with the location's status (503
# unless configured) and never reaches the upstream; limit_req may instead delay it, as nginx
# does, for the excess over its rate that `delay` does not cover.  A connection counted by
# limit_conn is given back when its request ends: for a tunnel, when the tunnel closes.

cdef inline long long now_ms(Eng *e) noexcept nogil:
    # CLOCK_MONOTONIC is one clock for every process: the zones' times compare across workers
    return <long long>(e.now * 1000.0)


cdef int limits_check(Eng *e, Conn *c) noexcept nogil:
    # 0: the request goes on (perhaps delayed: req.delay_until); -1: it was refused.
    cdef Loc *loc = c.loc
    cdef LimitRule *rule
    cdef Zone *z
    cdef fastws_buf *b = &e.xbuf
    cdef unsigned long long h
    cdef long long r, delay_ms = 0, wait
    cdef int i, got, delayed_by = -1
    for i in range(loc.nlimits):
        rule = &loc.limits[i]
        z = &e.zones[rule.zone]
        b.len = 0
        tpl_render(e, c, NULL, z.key, b)
        if b.len == 0:
            continue                  # nginx: a request with an empty key is not counted
        h = fastws_zone_hash(b.p, b.len)
        if rule.kind == LIMIT_CONN:
            got = fastws_conn_acquire(z.shm, h, rule.max, e.pid, 0)
            if got == 1 and limits_hold(e, c, rule.zone, h) == 0:
                continue
            if got == 1:
                fastws_conn_release(z.shm, h, e.pid)
            if got == -1:
                eng_log(e, LOG_ERROR, "limit_conn zone \"%s\" is full, client: %s", z.name,
                        conn_addr(e, c))
            else:
                eng_log(e, LOG_ERROR, "limiting connections by zone \"%s\", client: %s",
                        z.name, conn_addr(e, c))
            limits_release(e, c)
            conn_fail(e, c, loc.limit_conn_status, "limit_conn")
            return -1
        r = fastws_req_account(z.shm, h, rule.max, now_ms(e), e.pid)
        if r < 0:
            if r == -2:
                eng_log(e, LOG_ERROR, "limit_req zone \"%s\" is full, client: %s", z.name,
                        conn_addr(e, c))
            else:
                eng_log(e, LOG_ERROR, "limiting requests by zone \"%s\", client: %s", z.name,
                        conn_addr(e, c))
            limits_release(e, c)
            conn_fail(e, c, loc.limit_req_status, "limit_req")
            return -1
        if r > rule.delay and z.shm.rate > 0:
            # nginx: (excess - delay) * 1000 / rate ms; the longest of the limits is waited
            wait = (r - rule.delay) * 1000 // z.shm.rate
            if wait > delay_ms:
                delay_ms = wait
                delayed_by = rule.zone
    if delay_ms > 0 and loc.kind == LOC_PROXY:
        c.req.delay_until = e.now + delay_ms / 1000.0
        __atomic_add(&e.zones[delayed_by].shm.delayed, 1)
        eng_log(e, LOG_WARN, "delaying request by %lld ms, client: %s", delay_ms,
                conn_addr(e, c))
    return 0


cdef extern from *:
    """
    #define __atomic_add(p, v) __atomic_add_fetch((p), (v), __ATOMIC_RELAXED)
    """
    void __atomic_add(unsigned long long *p, int v) nogil


cdef int limits_hold(Eng *e, Conn *c, int zone, unsigned long long h) noexcept nogil:
    cdef LimitHold *grown = <LimitHold *>realloc(c.holds, sizeof(LimitHold) * (c.nholds + 1))
    if grown == NULL:
        return -1
    c.holds = grown
    c.holds[c.nholds].zone = zone
    c.holds[c.nholds].hash = h
    c.nholds += 1
    return 0


cdef void limits_release(Eng *e, Conn *c) noexcept nogil:
    # The request ended (or the tunnel closed, or left for another process): every limit_conn
    # count it held is given back.
    cdef int i
    for i in range(c.nholds):
        fastws_conn_release(e.zones[c.holds[i].zone].shm, c.holds[i].hash, e.pid)
    free(c.holds)
    c.holds = NULL
    c.nholds = 0


cdef int zone_index(Eng *e, const char *name) noexcept nogil:
    cdef int i
    for i in range(e.nzones):
        if strcmp(e.zones[i].name, name) == 0:
            return i
    return -1


def zone_bytes(int nbuckets):
    """The size of a zone of that many 8-slot buckets, in bytes (limits.py maps them)."""
    return fastws_zone_size(nbuckets)


def zone_init(Py_ssize_t address, int nbuckets, long long rate):
    """Lay a new zone out at `address` (memory the master mapped shared)."""
    fastws_zone_init(<fastws_zone *>address, nbuckets, rate)


def zone_set_rate(Py_ssize_t address, long long rate):
    """A reload kept the zone: its (perhaps new) rate."""
    (<fastws_zone *>address).rate = rate


def zone_figures(Py_ssize_t address):
    """A zone's counters, for the status pages."""
    cdef fastws_zone *z = <fastws_zone *>address
    return {"passed": z.passed, "delayed": z.delayed, "rejected": z.rejected, "full": z.full,
            "entries": z.used}


def zone_force_unlock(Py_ssize_t address, int pid):
    """The master, for a worker that died: release the zone's lock if that worker held it."""
    return bool(fastws_zone_force_unlock(<fastws_zone *>address, pid))
