# The upstream half of a WebSocket handshake, run by the engine (included by _splice.pyx).
#
# Python reads and checks the client's request, picks a server and starts a non-blocking
# connect; then it hands both sockets over at once (Engine.handshake).  The engine waits for the
# connect, writes the request head, reads the answer and, when it is a 101 that is plainly valid
# (one Upgrade header with the token asked for, Connection: upgrade, one Sec-WebSocket-Accept
# equal to the expected value, nothing unusual in the head), turns it into a tunnel on the spot.
# Anything else (a failed or slow connect, an upstream that closes, any other answer, or a head
# it does not read as plainly valid) goes back to Python with the sockets and the bytes read, and
# Python decides with its strict parser: next server, an ordinary response, or a 502.  The
# common case thus costs no event-loop poll handle, no timer and no Python call per step.


cdef int hs_interest(EngineState *e, Tunnel *t) noexcept nogil:
    # Only the upstream is watched: the client's early bytes wait in its socket until the 101
    # is checked (sending them before would let them reach an upstream that did not upgrade).
    cdef epoll_event ev
    cdef unsigned int want = EPOLLOUT if flow_holds(&t.flow[0]) else EPOLLIN
    if t.registered[1] and t.want[1] == want:
        return 0
    ev.events = want
    ev.data.u64 = <uintptr_t>t | <unsigned int>1
    if epoll_ctl(e.epfd, EPOLL_CTL_MOD if t.registered[1] else EPOLL_CTL_ADD, t.fd[1], &ev) < 0:
        return -1
    t.registered[1] = 1
    t.want[1] = want
    return 0


cdef void hs_return(EngineState *e, Tunnel *t, int code, Tunnel **closed) noexcept nogil:
    # Give the sockets back to Python, open, with what was read.
    cdef epoll_event ev
    cdef int s
    for s in range(2):
        if t.registered[s]:
            epoll_ctl(e.epfd, EPOLL_CTL_DEL, t.fd[s], &ev)
            t.registered[s] = 0
    t.closing = 1
    t.reason = code
    t.ended = e.now
    heap_remove(e, t)
    e.tunnels_active -= 1
    e.handshakes_returned += 1
    t.next = closed[0]
    closed[0] = t


cdef void hs_start(EngineState *e, Tunnel *t, Tunnel **closed) noexcept nogil:
    t.heap_idx = -1
    t.deadline = t.hs_deadline
    e.tunnels_active += 1
    if heap_push(e, t) < 0:
        hs_return(e, t, HS_ERROR, closed)
        return
    hs_send(e, t, closed)


cdef void hs_send(EngineState *e, Tunnel *t, Tunnel **closed) noexcept nogil:
    # The request head goes out as soon as the connect completes; a refused connect shows here
    # as the send's error.
    cdef int r = flow_flush(e, t, 0)
    if r < 0:
        t.err = errno
        hs_return(e, t, HS_CONNECT_ERROR, closed)
        return
    if r == 0:
        t.hs_sent = 1
        t.t_connected = e.now
        t.hs_deadline = e.now + t.header_timeout     # the heap catches up lazily
    if hs_interest(e, t) < 0:
        hs_return(e, t, HS_ERROR, closed)


cdef inline bint _blank(char c) noexcept nogil:
    return c == b' ' or c == b'\t'


cdef bint hs_has_upgrade(const char *v, Py_ssize_t n) noexcept nogil:
    # Is "upgrade" one of the comma-separated tokens of a Connection value?
    cdef Py_ssize_t i = 0, start, end
    while i < n:
        while i < n and (_blank(v[i]) or v[i] == b','):
            i += 1
        start = i
        while i < n and v[i] != b',':
            i += 1
        end = i
        while end > start and _blank(v[end - 1]):
            end -= 1
        if end - start == 7 and strncasecmp(v + start, "upgrade", 7) == 0:
            return True
    return False


cdef int hs_check(Tunnel *t, Py_ssize_t end) noexcept nogil:
    # 0 when the head rbuf[:end] is a plainly valid 101 for this handshake.
    cdef const char *p = t.rbuf
    cdef Py_ssize_t line, eol, colon, vs, ve
    cdef int upgrades = 0, accepts = 0
    cdef bint connection = False
    if end < 17 or memcmp(p, "HTTP/1.1 101 ", 13) != 0:
        return 1
    line = <Py_ssize_t>(<const char *>memchr(p, b'\n', end) - p) + 1
    if p[line - 2] != b'\r':
        return 1
    while line < end - 2:
        if _blank(p[line]):
            return 1                                # obsolete line folding
        eol = line
        while p[eol] != b'\r' and p[eol] != b'\n' and p[eol] != 0:
            eol += 1
        if p[eol] != b'\r' or p[eol + 1] != b'\n':
            return 1                                # bare CR or LF, or a NUL
        colon = line
        while colon < eol and p[colon] != b':':
            if _blank(p[colon]):
                return 1
            colon += 1
        if colon == eol or colon == line:
            return 1
        vs = colon + 1
        ve = eol
        while vs < ve and _blank(p[vs]):
            vs += 1
        while ve > vs and _blank(p[ve - 1]):
            ve -= 1
        if colon - line == 7 and strncasecmp(p + line, "upgrade", 7) == 0:
            upgrades += 1
            if ve - vs != t.token_len or strncasecmp(p + vs, t.token, <size_t>(ve - vs)) != 0:
                return 1
        elif colon - line == 10 and strncasecmp(p + line, "connection", 10) == 0:
            connection = connection or hs_has_upgrade(p + vs, ve - vs)
        elif colon - line == 20 and strncasecmp(p + line, "sec-websocket-accept", 20) == 0:
            accepts += 1
            if ve - vs != t.expect_len or memcmp(p + vs, t.expect, <size_t>(ve - vs)) != 0:
                return 1
        line = eol + 2
    return 0 if upgrades == 1 and accepts == 1 and connection else 1


cdef void hs_promote(EngineState *e, Tunnel *t, Py_ssize_t end, Tunnel **closed) noexcept nogil:
    cdef Notice *notice = <Notice *>malloc(sizeof(Notice))
    cdef int reason, r = 0
    cdef int was_empty
    cdef uint64_t one = 1
    if notice == NULL:
        hs_return(e, t, HS_ERROR, closed)
        return
    notice.obj = t.hctx
    notice.connect_time = t.t_connected - t.started
    notice.header_time = e.now - t.started
    notice.head_len = end
    t.hctx = NULL
    t.phase = PHASE_TUNNEL
    t.started = e.now          # a tunnel's duration counts from its 101, as for Engine.add
    # the 101 and what followed it go to the client, the client's early bytes to the upstream
    t.flow[1].held = t.rbuf
    t.flow[1].held_len = t.rlen
    t.flow[1].held_off = 0
    t.rbuf = NULL
    t.flow[0].held = t.early
    t.flow[0].held_len = t.early_len
    t.flow[0].held_off = 0
    t.early = NULL
    t.flow[0].blocked_since = 0
    t.flow[0].last_rx = e.now
    t.flow[1].last_rx = e.now
    t.deadline = tunnel_deadline(t, &reason)
    heap_down(e, t.heap_idx)
    heap_up(e, t.heap_idx)
    e.tunnels_total += 1
    e.handshakes_done += 1
    pthread_mutex_lock(&e.lock)
    was_empty = e.done == NULL and e.opened == NULL
    notice.next = e.opened
    e.opened = notice
    pthread_mutex_unlock(&e.lock)
    if was_empty and e.threaded:
        write(e.notifyfd, &one, sizeof(one))
    if t.flow[1].held != NULL:
        r = flow_flush(e, t, 1)
    if r >= 0 and t.flow[0].held != NULL:
        r = flow_flush(e, t, 0)
    tunnel_settle(e, t, r if r < 0 else 0, closed)


cdef void hs_read(EngineState *e, Tunnel *t, Tunnel **closed) noexcept nogil:
    cdef ssize_t n
    cdef Py_ssize_t start, i
    cdef char *grown
    if t.rbuf == NULL:
        t.rbuf = <char *>malloc(HS_BUF_START)
        if t.rbuf == NULL:
            hs_return(e, t, HS_ERROR, closed)
            return
        t.rcap = HS_BUF_START
    while True:
        n = recv(t.fd[1], t.rbuf + t.rlen, <size_t>(t.rcap - t.rlen), MSG_DONTWAIT)
        if n > 0:
            start = t.rlen - 3 if t.rlen > 3 else 0
            t.rlen += n
            for i in range(start, t.rlen - 3):
                if t.rbuf[i] == b'\r' and t.rbuf[i + 1] == b'\n' and t.rbuf[i + 2] == b'\r' \
                        and t.rbuf[i + 3] == b'\n':
                    if hs_check(t, i + 4) == 0:
                        hs_promote(e, t, i + 4, closed)
                    else:
                        hs_return(e, t, HS_RESPONSE, closed)
                    return
            if t.rlen < t.rcap:
                return
            if t.rcap >= HS_BUF_MAX:
                hs_return(e, t, HS_RESPONSE, closed)     # Python answers 502: head too large
                return
            grown = <char *>realloc(t.rbuf, t.rcap * 2)
            if grown == NULL:
                hs_return(e, t, HS_ERROR, closed)
                return
            t.rbuf = grown
            t.rcap *= 2
            continue
        if n == 0:
            hs_return(e, t, HS_UPSTREAM_CLOSED, closed)
            return
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            return
        t.err = errno
        hs_return(e, t, HS_UPSTREAM_CLOSED, closed)
        return


cdef void hs_event(EngineState *e, Tunnel *t, Tunnel **closed) noexcept nogil:
    if not t.hs_sent:
        hs_send(e, t, closed)
    else:
        hs_read(e, t, closed)


cdef dict _HS_REASONS = {
    HS_CONNECT_ERROR: "connect_error",
    HS_CONNECT_TIMEOUT: "connect_timeout",
    HS_HEADER_TIMEOUT: "header_timeout",
    HS_UPSTREAM_CLOSED: "upstream_closed",
    HS_RESPONSE: "response",
    HS_ERROR: "error",
}
