# One turn of the engine: the edges epoll or the ring has (engine/ring.pxi), the connections
# with work no edge announces, the listeners with a queue left, the deadlines that came; then
# the structs closed during the turn are freed (events of the turn may have named them until
# then).

cdef int engine_wait(Eng *e, double end) noexcept nogil:
    # Turns until something needs Python: the control plane's loop has work, messages wait
    # for the error log, a signal came (epoll_wait said EINTR), or `end` passed.
    cdef int ms
    ring_control_rearm(e)
    while True:
        ms = <int>((end - fastws_monotonic()) * 1000.0) + 1
        if ms < 0:
            ms = 0
        if engine_turn(e, ms) < 0:
            return WAIT_SIGNAL
        if e.control_ready:
            e.control_ready = 0
            return WAIT_CONTROL
        if e.msgs.len:
            return WAIT_MESSAGES
        if e.now >= end:
            return WAIT_TIMEOUT


cdef int engine_turn(Eng *e, int timeout) noexcept nogil:
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i
    cdef unsigned int ev
    cdef Io *io
    cdef Conn *c
    cdef Conn *ready
    cdef unsigned long long counter
    if e.backend == BACKEND_URING:
        if ring_wait(e, timeout) < 0:
            return -1
        turn_begin(e)
        e.in_turn = 1
        while True:
            io = ring_next(e, &ev)
            if io == NULL:
                break
            turn_event(e, io, ev)
    else:
        n = epoll_wait(e.epfd, events, MAX_EVENTS, timeout)
        if n < 0 and errno == EINTR:
            return -1
        turn_begin(e)
        for i in range(n if n > 0 else 0):
            turn_event(e, <Io *>events[i].data.ptr, events[i].events)
    # connections that asked to run again (this turn's own requests wait for the next)
    ready = e.ready
    e.ready = NULL
    while ready != NULL:
        c = ready
        ready = c.next
        c.next = NULL
        c.queued = 0
        if c.state == CS_CLOSED:
            conn_free(e, c)
        else:
            conn_run(e, c)
    timers_expire(e)
    engine_reap(e)
    timers_sync(e)
    if e.ready != NULL:
        # work no edge will announce: keep the engine's fd readable for the next turn
        counter = 1
        write(e.wakefd, &counter, sizeof(counter))
    e.in_turn = 0
    if timeout == 0 and e.backend == BACKEND_URING:
        # run_once, from another event loop: it waits on the ring's fd, which tells nothing
        # of entries not yet submitted
        uring_enter(&e.ring, -1, 0)
    return 0


cdef inline void turn_begin(Eng *e) noexcept nogil:
    e.now = fastws_monotonic()
    e.wall = fastws_realtime()
    e.n.loops += 1


cdef void turn_event(Eng *e, Io *io, unsigned int ev) noexcept nogil:
    # What one edge means, by the kind of its Io
    cdef Conn *c
    cdef Up *u
    cdef unsigned long long counter
    if io.kind == IO_CLIENT:
        c = <Conn *>io
        if c.state == CS_CLOSED:
            return
        io_event(io, ev)
        conn_run(e, c)
    elif io.kind == IO_UPSTREAM:
        u = <Up *>io
        if u.io.fd < 0:
            return
        io_event(io, ev)
        if u.owner != NULL:
            if u.owner.state != CS_CLOSED:
                conn_run(e, u.owner)
        else:
            pool_event(e, u)
    elif io.kind == IO_LISTENER:
        accept_run(e, <Listener *>io)
        if e.backend == BACKEND_URING and io.registered:
            ring_arm(e, io)          # (a oneshot poll: level-triggered, as in the epoll set)
    elif io.kind == IO_TIMER:
        timers_fired(e)
    elif io.kind == IO_WAKE:
        read(io.fd, &counter, sizeof(counter))
    elif io.kind == IO_CONTROL:
        e.control_ready = 1


cdef void engine_reap(Eng *e) noexcept nogil:
    cdef Conn *c
    cdef Up *u
    while e.zombies != NULL:
        c = e.zombies
        e.zombies = c.next
        conn_free(e, c)
    while e.dead_ups != NULL:
        u = e.dead_ups
        e.dead_ups = u.next
        free(u)
        held_count(e, DBG_UPS, -1)
