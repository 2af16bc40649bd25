# Client connections: accept, the request head, the proxy's own answers, keep-alive, close.
#
# A connection is accepted by the engine and stays in it until it closes: its head is read and
# routed, its request proxied (upstream.pxi, http.pxi), upgraded into a tunnel (tunnel.pxi) or
# answered here, and it either waits for its next request or closes.  Its deadline follows from
# its state (conn_deadline); its events and its timer both come back to conn_run.

cdef int conn_load(Eng *e) noexcept nogil:
    # worker_connections has nginx's meaning: a client connection counts two from its accept on
    # (its upstream connection is reserved), a tunnel two.
    return 2 * e.n.conns


# --- accept ------------------------------------------------------------------------------

cdef void accept_run(Eng *e, Listener *l) noexcept nogil:
    # One connection per readiness, as nginx without multi_accept: a listener is level-triggered,
    # so epoll reports it again while its queue holds more, and an accept(2) that would find
    # the queue empty (EAGAIN) is never made.
    cdef sockaddr_in6 sa
    cdef socklen_t salen = sizeof(sa)
    cdef int fd
    cdef Conn *c
    if e.accepting != 1:
        return
    if conn_load(e) + 2 > e.worker_connections:
        accept_pause(e)
        return
    fd = accept4(l.io.fd, <sockaddr *>&sa, &salen, SOCK_NONBLOCK | SOCK_CLOEXEC)
    if fd < 0:
        if errno == EAGAIN or errno == EINTR or errno == ECONNABORTED:
            return
        if errno == EMFILE or errno == ENFILE:
            accept_starved(e, l, errno)
            return
        # ENOBUFS, ENOMEM: keep serving the connections already open, and accept again when
        # one of them closes
        e.n.accept_errors += 1
        eng_log(e, LOG_ERROR, "accept() failed (%d: %s)", errno, strerror(errno))
        accept_pause(e)
        return
    e.n.accepts += 1
    if e.starved:
        e.starved = 0
        eng_log(e, LOG_WARN, "accepting again: %llu clients were answered 503 while the "
                "descriptors were exhausted", e.starved_refused)
    c = conn_new(e, l, fd, &sa)
    if c == NULL:
        close(fd)
        return
    e.n.handled += 1
    if l.proxy_protocol:
        conn_set_state(e, c, CS_PROXY)
        c.io.rd_ready = 1
        pp_read(e, c)
    elif l.tls:
        tls_accept_start(e, c)
    else:
        conn_set_state(e, c, CS_HEAD)
        # The listener defers accept until the client has sent something (TCP_DEFER_ACCEPT),
        # so the head is usually here already: read it now rather than after an edge.
        c.io.rd_ready = 1
        conn_run(e, c)


cdef void listeners_watch(Eng *e, int on) noexcept nogil:
    # Listeners watched or not (level-triggered: not while accepting is paused)
    cdef int i
    for i in range(e.nlis):
        if e.lis[i].io.fd < 0 or e.lis[i].io.registered == on:
            continue
        if on:
            watch_add(e, &e.lis[i].io, EPOLLIN)
        else:
            watch_del(e, &e.lis[i].io)


cdef void accept_pause(Eng *e) noexcept nogil:
    if e.accepting == 1:
        e.accepting = 2           # paused: accept_resume takes it back to 1
        e.n.paused_now = 1
        e.n.paused += 1
        listeners_watch(e, 0)
        eng_log(e, LOG_WARN, "%d worker_connections are not enough; accepting again when below",
                e.worker_connections)


cdef const char *ANSWER_503 = ("HTTP/1.1 503 Service Unavailable\r\nServer: fastws\r\n"
                               "Content-Length: 0\r\nRetry-After: 1\r\nConnection: close\r\n"
                               "\r\n")


cdef void accept_starved(Eng *e, Listener *l, int err) noexcept nogil:
    # accept() found the process's descriptors exhausted (EMFILE, ENFILE).  A listener that
    # stays readable would spin: leave it out of the epoll set until a connection closes or
    # the control plane's tick retries (nginx's accept pause).  Meanwhile the waiting clients
    # are told 503 at once through the descriptor kept in reserve, rather than left hanging;
    # one log line per starvation, with the count when it ends.
    cdef int fd, n = 0
    cdef char scratch[4096]
    e.n.accept_errors += 1
    if not e.starved:
        e.starved = 1
        e.starved_refused = 0
        eng_log(e, LOG_ERROR, "accept() failed (%d: %s): out of descriptors; answering 503 "
                "until some are free", err, strerror(err))
    while n < 64 and e.reserve_fd >= 0:
        close(e.reserve_fd)
        e.reserve_fd = -1
        fd = accept4(l.io.fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC)
        if fd >= 0:
            # read what the client sent, so that the close is a FIN, not a reset that could
            # destroy the answer before the client reads it
            recv(fd, scratch, sizeof(scratch), MSG_DONTWAIT)
            send(fd, ANSWER_503, strlen(ANSWER_503), MSG_DONTWAIT | MSG_NOSIGNAL)
            close(fd)
            e.starved_refused += 1
            e.n.accepts += 1
            n += 1
        e.reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
        if fd < 0:
            break
    if e.accepting == 1:
        e.accepting = 2
        e.n.paused_now = 1
        e.n.paused += 1
        listeners_watch(e, 0)


cdef void accept_retry(Eng *e) noexcept nogil:
    if e.starved and e.accepting == 2 and conn_load(e) + 2 <= e.worker_connections:
        e.accepting = 1
        e.n.paused_now = 0
        listeners_watch(e, 1)


cdef void accept_resume(Eng *e) noexcept nogil:
    if e.accepting == 2 and conn_load(e) + 2 <= e.worker_connections:
        e.accepting = 1
        e.n.paused_now = 0
        listeners_watch(e, 1)


cdef Conn *conn_new(Eng *e, Listener *l, int fd, sockaddr_in6 *sa) noexcept nogil:
    cdef Conn *c = <Conn *>calloc(1, sizeof(Conn))
    if c == NULL:
        return NULL
    held_count(e, DBG_CONNS, 1)
    c.io.kind = IO_CLIENT
    c.io.fd = fd
    c.io.wr_ready = 1
    c.timer.idx = -1
    c.timer.kind = IO_CLIENT
    c.timer.owner = <void *>c
    c.lis = l
    c.srv = l.default_server
    c.first_eof = -1
    c.started = e.now
    c.t_state = e.now
    # An IPv4 client of an IPv6 listener is an IPv4 client ($remote_addr without ::ffff:).
    memcpy(&c.raddr, sa, sizeof(sockaddr_in6))
    sockaddr_unmap(&c.raddr)
    memcpy(&c.paddr, &c.raddr, sizeof(sockaddr_in6))
    e.serial += 1
    c.number = e.serial * e.number_step + e.number_base
    if io_register(e, &c.io) < 0:
        held_count(e, DBG_CONNS, -1)
        free(c)
        return NULL
    e.n.conns += 1
    e.n.states[0] += 1
    conn_link(e, c)
    return c


# --- states and deadlines ------------------------------------------------------------------

cdef void conn_set_state(Eng *e, Conn *c, int state) noexcept nogil:
    e.n.states[c.state] -= 1
    e.n.states[state] += 1
    c.state = state
    c.t_state = e.now
    conn_arm(e, c)


cdef inline void conn_arm(Eng *e, Conn *c) noexcept nogil:
    timer_arm(e, &c.timer, conn_deadline(e, c))


cdef double conn_deadline(Eng *e, Conn *c) noexcept nogil:
    cdef int state = c.state
    if state == CS_TUNNEL:
        return tunnel_deadline(c)
    if state == CS_HEAD:
        return c.t_state + c.srv.client_header_timeout
    if state == CS_IDLE:
        return c.t_state + c.read_timeout
    if state == CS_UPSTREAM or state == CS_EXCHANGE:
        return exchange_deadline(e, c)
    if state == CS_ANSWER:
        if c.flow[1].blocked_since > 0:
            return c.flow[1].blocked_since + c.send_timeout
        return NEVER
    if state == CS_LINGER:
        return c.t_state + LINGER_TIMEOUT
    if state == CS_TLS:
        return c.t_state + c.lis.default_server.handshake_timeout
    if state == CS_PROXY:
        return c.t_state + c.lis.default_server.client_header_timeout
    if state == CS_HOOK:
        return c.hk.t_call + c.loc.hook_timeout
    return NEVER


cdef void conn_timeout(Eng *e, Conn *c) noexcept nogil:
    cdef int state = c.state
    if state == CS_HEAD:
        if c.req == NULL and c.in_len == 0 and c.nreq > 0:
            conn_close(e, c)              # the next request never began: as idle
        else:
            conn_fail(e, c, 408, "client sent no complete head in time")
    elif state == CS_IDLE or state == CS_LINGER or state == CS_ANSWER:
        conn_close(e, c)
    elif state == CS_TUNNEL:
        tunnel_timeout(e, c)
    elif state == CS_UPSTREAM or state == CS_EXCHANGE:
        exchange_timeout(e, c)
    elif state == CS_TLS:
        eng_log(e, LOG_INFO, "client %s timed out in the TLS handshake", conn_addr(e, c))
        conn_close(e, c)
    elif state == CS_PROXY:
        pp_refuse(e, c, "no PROXY protocol header in time")
    elif state == CS_HOOK:
        hook_timed_out(e, c)


# --- one place that runs a connection ------------------------------------------------------

cdef void conn_run(Eng *e, Conn *c) noexcept nogil:
    # Whatever happened (an edge on either socket, the ready list), do what the state allows.
    cdef int state = c.state
    if state == CS_HEAD or state == CS_IDLE:
        conn_read_head(e, c)
    elif state == CS_TUNNEL:
        tunnel_run(e, c)
    elif state == CS_UPSTREAM:
        upstream_run(e, c)
    elif state == CS_EXCHANGE:
        exchange_run(e, c)
    elif state == CS_ANSWER:
        answer_run(e, c)
    elif state == CS_LINGER:
        linger_run(e, c)
    elif state == CS_TLS:
        tls_accept_run(e, c)
    elif state == CS_PROXY:
        pp_read(e, c)
    elif state == CS_HOOK:
        hook_resume(e, c)


cdef inline void conn_ready(Eng *e, Conn *c) noexcept nogil:
    # Run this connection again soon: it has work no edge will announce (a pump out of budget).
    if not c.queued:
        c.queued = 1
        c.next = e.ready
        e.ready = c


# --- the request head ----------------------------------------------------------------------

cdef int conn_stash(Eng *e, Conn *c, const char *data, Py_ssize_t n) noexcept nogil:
    # Keep client bytes for later (a head in pieces, pipelined requests).  0, or -1.
    cdef char *grown
    cdef int cap
    if n <= 0:
        return 0
    if c.in_len + n > c.in_cap:
        cap = c.in_cap * 2 if c.in_cap else 1024
        while cap < c.in_len + n:
            cap *= 2
        grown = <char *>realloc(c.in_, cap)
        if grown == NULL:
            return -1
        if c.in_ == NULL:
            held_count(e, DBG_BUFFERS, 1)
        c.in_ = grown
        c.in_cap = cap
    memcpy(c.in_ + c.in_len, data, n)
    c.in_len += <int>n
    return 0


cdef void conn_unstash(Eng *e, Conn *c) noexcept nogil:
    if c.in_ != NULL:
        free(c.in_)
        held_count(e, DBG_BUFFERS, -1)
    c.in_ = NULL
    c.in_len = c.in_cap = 0


cdef void conn_read_head(Eng *e, Conn *c) noexcept nogil:
    cdef ssize_t n
    cdef Py_ssize_t end, start
    cdef char *hbuf
    cdef int hlen, status, limit = c.srv.max_request_head
    while c.state == CS_HEAD or c.state == CS_IDLE:
        if c.in_len == 0:
            # The usual case: the whole head arrives in one read, into the shared buffer, and
            # is routed from there without a copy.
            if not c.io.rd_ready:
                return
            n = io_recv(e, &c.io, e.buf, e.bufsize)
            if n <= 0:
                if n == -EAGAIN:
                    return
                conn_close(e, c)              # gone before (or between) requests: no answer
                return
            if c.state == CS_IDLE:
                conn_set_state(e, c, CS_HEAD)   # the next request begins: its head is timed
            end = head_end(e.buf, 0, n)
            if 0 < end <= limit:
                request_start(e, c, e.buf, <int>end, e.buf + end, <int>(n - end))
                continue
            if conn_stash(e, c, e.buf, n) < 0:
                conn_close(e, c)
                return
            start = 0
        else:
            start = c.in_len - 3 if c.in_len > 3 else 0
            if c.state == CS_IDLE:
                conn_set_state(e, c, CS_HEAD)
            end = head_end(c.in_, 0, c.in_len)
            if end < 0 or end > limit:
                status = request_line_check(c.in_, c.in_len, c.srv.max_request_line)
                if status == 0 and (c.in_len > limit or end > limit):
                    status = 431
                if status:
                    conn_fail(e, c, status, "request head refused" if status == 400 else
                              "request line too long" if status == 414 else "head too large")
                    return
                # more bytes are needed: read them into the connection's own buffer
                if not c.io.rd_ready:
                    return
                if c.in_cap - c.in_len < 4096 and conn_grow(e, c) < 0:
                    conn_close(e, c)
                    return
                n = io_recv(e, &c.io, c.in_ + c.in_len, c.in_cap - c.in_len)
                if n <= 0:
                    if n == -EAGAIN:
                        return
                    conn_close(e, c)
                    return
                c.in_len += <int>n
                continue
            # A complete head in the connection's buffer: take the buffer, so that what the
            # request keeps for later (a body's start, pipelined requests) can go into a new one.
            hbuf = c.in_
            hlen = c.in_len
            c.in_ = NULL
            c.in_len = c.in_cap = 0
            request_start(e, c, hbuf, <int>end, hbuf + end, <int>(hlen - end))
            free(hbuf)
            held_count(e, DBG_BUFFERS, -1)


cdef int conn_grow(Eng *e, Conn *c) noexcept nogil:
    cdef int cap = c.in_cap * 2 if c.in_cap else 4096
    cdef char *grown
    if cap > c.srv.max_request_head + 4096:
        cap = c.srv.max_request_head + 4096
    if cap <= c.in_cap:
        cap = c.in_cap + 4096
    grown = <char *>realloc(c.in_, cap)
    if grown == NULL:
        return -1
    if c.in_ == NULL:
        held_count(e, DBG_BUFFERS, 1)
    c.in_ = grown
    c.in_cap = cap
    return 0


cdef void conn_next_request(Eng *e, Conn *c) noexcept nogil:
    # The answer is complete and the connection stays: read the next request, which may be
    # here already (pipelined), or wait for it (keep-alive).
    if c.peer_closed and c.in_len == 0:
        conn_close(e, c)
        return
    c.srv = c.lis.default_server
    c.loc = NULL
    if c.in_len > 0 or c.io.rd_ready:
        # here already (pipelined): read in this turn, from the ready list rather than from
        # here, so that a long pipeline does not nest
        conn_set_state(e, c, CS_HEAD)
        conn_ready(e, c)
    else:
        conn_set_state(e, c, CS_IDLE)


# --- the proxy's own answers ---------------------------------------------------------------

cdef void conn_fail(Eng *e, Conn *c, int status, const char *why) noexcept nogil:
    # An error answer (an HTML page, as nginx's), then the connection closes.
    cdef char extra[64]
    extra[0] = 0
    if status >= 500 or status == 408:
        eng_log(e, LOG_INFO, "%d for %s: %s", status, conn_addr(e, c), why)
    if status == 426:
        memcpy(extra, b"Sec-WebSocket-Version: 13\r\n", 28)
    conn_answer(e, c, status, extra, NULL, 0, NULL, 0)


cdef int error_page(int status, char *page, int cap) noexcept nogil:
    cdef const char *reason = status_reason(status)
    return snprintf(page, cap, "<html><head><title>%d %s</title></head><body><h1>%d %s</h1>"
                    "<hr>fastws</body></html>\r\n", status, reason, status, reason)


cdef void conn_answer(Eng *e, Conn *c, int status, const char *extra, const char *body,
                      int bodylen, const char *ctype, int keep) noexcept nogil:
    # Write an answer of the proxy's own: an error page when body is NULL.  With `keep` the
    # connection then serves its next request; without, it closes gracefully.
    cdef fastws_buf *b = &e.obuf
    cdef const char *reason = status_reason(status)
    cdef char page[512]
    cdef int n
    if c.state == CS_CLOSED:
        return
    exchange_drop_upstream(e, c, 0)
    if body == NULL:
        body = page
        bodylen = error_page(status, page, sizeof(page))
        ctype = "text/html"
        keep = 0
    if e.stopping or c.peer_closed:
        keep = 0
    if keep:
        # the idle wait that follows is the location's keepalive_timeout (nginx's), and
        # keepalive_requests bounds the connection as for proxied requests
        if c.loc != NULL:
            if c.loc.keepalive_timeout <= 0 or c.nreq >= c.loc.keepalive_requests:
                keep = 0
            c.read_timeout = c.loc.keepalive_timeout
        else:
            c.read_timeout = DEFAULT_KEEPALIVE_TIMEOUT
    b.len = 0
    buf_fmt(b, "HTTP/1.1 %d %s\r\nServer: fastws\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
            "Connection: %s\r\n", status, reason, ctype, bodylen,
            "keep-alive" if keep else "close")
    if extra != NULL:
        buf_add(b, extra, <int>strlen(extra))
    buf_add(b, "\r\n", 2)
    if c.log != NULL:
        c.log.status = status
        c.log.head_sent = b.len
    buf_add(b, body, bodylen)
    if c.log != NULL:
        c.log.bytes_sent = b.len
    c.keepalive = keep
    if b.failed:
        conn_close(e, c)
        return
    c.send_timeout = c.loc.send_timeout if c.loc != NULL else DEFAULT_SEND_TIMEOUT
    conn_set_state(e, c, CS_ANSWER)
    c.flow[1].mode = FLOW_RAW
    if flow_hold(e, c, 1, b.p, b.len) < 0:
        conn_close(e, c)
        return
    c.flow[1].blocked_since = 0
    answer_run(e, c)


cdef void answer_run(Eng *e, Conn *c) noexcept nogil:
    cdef int r = flow_flush(e, c, 1)
    if r < 0:
        conn_close(e, c)
        return
    if r > 0:
        return
    request_end(e, c)
    if c.keepalive:
        conn_next_request(e, c)
    else:
        conn_linger(e, c)


cdef void conn_linger(Eng *e, Conn *c) noexcept nogil:
    # nginx's lingering close: the answer is out; read and drop what the client still sends,
    # for a while, so that closing with unread input does not reset the connection and destroy
    # the answer in flight.
    if c.io.ssl != NULL:
        fastws_ssl.err_clear()
        fastws_ssl.shutdown(c.io.ssl)
    if shutdown(c.io.fd, SHUT_WR) < 0:
        conn_close(e, c)
        return
    conn_set_state(e, c, CS_LINGER)
    linger_run(e, c)


cdef void linger_run(Eng *e, Conn *c) noexcept nogil:
    cdef ssize_t n
    while c.io.rd_ready:
        n = io_recv(e, &c.io, e.buf, e.bufsize)
        if n == -EAGAIN:
            return
        if n <= 0:
            conn_close(e, c)
            return


# --- close -----------------------------------------------------------------------------------

cdef void conn_close(Eng *e, Conn *c) noexcept nogil:
    # Let go of everything at once; the struct itself is freed at the end of the turn, since
    # events of this turn may still name it.
    if c.state == CS_CLOSED:
        return
    exchange_drop_upstream(e, c, 0)   # first: the attempt's free belongs to the request
    if c.req != NULL or c.log != NULL:
        request_end(e, c)
    hooked_free(e, c)
    if c.nholds:
        limits_release(e, c)
    flow_drop(e, &c.flow[0])
    flow_drop(e, &c.flow[1])
    timer_stop(e, &c.timer)
    io_close(e, &c.io)
    conn_unstash(e, c)
    log_free(e, c)
    e.n.states[c.state] -= 1
    c.state = CS_CLOSED
    e.n.conns -= 1
    conn_unlink(e, c)
    if not c.queued:              # (one on the ready list is freed when that list is run)
        c.next = e.zombies
        e.zombies = c
    accept_resume(e)


cdef void conn_link(Eng *e, Conn *c) noexcept nogil:
    c.all_prev = NULL
    c.all_next = e.all
    if e.all != NULL:
        e.all.all_prev = c
    e.all = c


cdef void conn_unlink(Eng *e, Conn *c) noexcept nogil:
    if c.all_prev != NULL:
        c.all_prev.all_next = c.all_next
    elif e.all == c:
        e.all = c.all_next
    if c.all_next != NULL:
        c.all_next.all_prev = c.all_prev
    c.all_prev = c.all_next = NULL


cdef void conn_free(Eng *e, Conn *c) noexcept nogil:
    held_count(e, DBG_CONNS, -1)
    free(c.pp)
    free(c)


cdef const char *conn_addr(Eng *e, Conn *c) noexcept nogil:
    # The client's address as text, for messages (a static buffer: use it at once).
    sockaddr_text(<sockaddr *>&c.raddr, e.addrbuf, sizeof(e.addrbuf))
    return e.addrbuf
