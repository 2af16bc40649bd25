# Timers: one deadline per connection, in one heap, behind one timerfd.
#
# A connection's real deadline follows from its state (conn_deadline): the head timeout while
# reading a head, the keep-alive timeout while idle, the connect, read and send timeouts while
# talking to an upstream, the tunnel's read and send timeouts.  The heap holds each connection
# once, keyed by a deadline that is never later than the real one: deadlines that move later
# (every byte that arrives) cost nothing, and the heap catches up when its top comes due and
# turns out not to be (nginx instead deletes and re-inserts a timer in its rbtree per read).
# A deadline that moves earlier (a write that blocks and starts send_timeout) is sifted up.
# The timerfd sits in the engine's epoll set, armed for the top of the heap, so the engine
# needs nothing from the event loop that drives it.

cdef inline void heap_swap(Eng *e, int i, int j) noexcept nogil:
    cdef Timer *t = e.heap[i]
    e.heap[i] = e.heap[j]
    e.heap[j] = t
    e.heap[i].idx = i
    e.heap[j].idx = j


cdef void heap_up(Eng *e, int i) noexcept nogil:
    cdef int parent
    while i > 0:
        parent = (i - 1) >> 1
        if e.heap[parent].deadline <= e.heap[i].deadline:
            break
        heap_swap(e, i, parent)
        i = parent


cdef void heap_down(Eng *e, int i) noexcept nogil:
    cdef int child
    while True:
        child = 2 * i + 1
        if child >= e.heap_len:
            break
        if child + 1 < e.heap_len and e.heap[child + 1].deadline < e.heap[child].deadline:
            child += 1
        if e.heap[i].deadline <= e.heap[child].deadline:
            break
        heap_swap(e, i, child)
        i = child


cdef int timer_arm(Eng *e, Timer *t, double deadline) noexcept nogil:
    # Make sure `t` fires by `deadline` (it may fire earlier: its owner then looks again).
    cdef Timer **grown
    cdef int cap
    if deadline >= NEVER:
        return 0
    if t.idx >= 0:
        if deadline < t.deadline:
            t.deadline = deadline
            heap_up(e, t.idx)
        return 0
    if e.heap_len == e.heap_cap:
        cap = e.heap_cap * 2 if e.heap_cap else 1024
        grown = <Timer **>realloc(e.heap, cap * sizeof(Timer *))
        if grown == NULL:
            return -1
        e.heap = grown
        e.heap_cap = cap
    t.deadline = deadline
    t.idx = e.heap_len
    e.heap[e.heap_len] = t
    e.heap_len += 1
    heap_up(e, t.idx)
    return 0


cdef void timer_stop(Eng *e, Timer *t) noexcept nogil:
    cdef int i = t.idx
    if i < 0:
        return
    e.heap_len -= 1
    if i != e.heap_len:
        heap_swap(e, i, e.heap_len)
        heap_down(e, i)
        heap_up(e, i)
    t.idx = -1


cdef void timers_expire(Eng *e) noexcept nogil:
    # Fire what is due.  A timer whose owner's real deadline is later goes back down the heap.
    cdef Timer *t
    cdef double d
    while e.heap_len > 0 and e.heap[0].deadline <= e.now:
        t = e.heap[0]
        if t.kind == IO_CLIENT:
            d = conn_deadline(e, <Conn *>t.owner)
        else:
            d = up_deadline(e, <Up *>t.owner)
        if d > e.now:
            if d >= NEVER:
                timer_stop(e, t)
            else:
                t.deadline = d
                heap_down(e, 0)
            continue
        timer_stop(e, t)
        if t.kind == IO_CLIENT:
            conn_timeout(e, <Conn *>t.owner)
        else:
            up_timeout(e, <Up *>t.owner)


cdef void timers_sync(Eng *e) noexcept nogil:
    # Arm the timerfd for the top of the heap when that is earlier than what it is armed for.
    cdef itimerspec its
    cdef double d
    if e.heap_len == 0:
        return
    d = e.heap[0].deadline
    if e.timer_armed != 0 and e.timer_armed <= d:
        return
    memset(&its, 0, sizeof(its))
    its.it_value.tv_sec = <long>d
    its.it_value.tv_nsec = <long>((d - <double><long>d) * 1e9)
    if its.it_value.tv_sec == 0 and its.it_value.tv_nsec == 0:
        its.it_value.tv_nsec = 1
    if timerfd_settime(e.tio.fd, TFD_TIMER_ABSTIME, &its, NULL) == 0:
        e.timer_armed = d


cdef void timers_fired(Eng *e) noexcept nogil:
    # The timerfd went off (it is one-shot): read it so that it stops being readable.
    cdef unsigned long long ticks
    read(e.tio.fd, &ticks, sizeof(ticks))
    e.timer_armed = 0


cdef double timers_next(Eng *e) noexcept nogil:
    return e.heap[0].deadline if e.heap_len > 0 else NEVER
