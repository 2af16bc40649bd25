# Flows: bytes moving between a client and its upstream, in a tunnel or in an HTTP exchange.
#
# flow 0 goes client -> upstream, flow 1 upstream -> client.  A flow reads its source while the
# source has bytes (rd_ready) and its destination takes them; what the destination does not
# take is held (copied out of the shared buffer, or left in a pipe) and the source is not read
# again until it is written: backpressure with at most one read's worth of bytes per flow.
#
# In a tunnel (FLOW_RAW; FLOW_FRAMES follows a WebSocket's frames too: frames.pxi) bytes go as
# they come, by splice(2) through a pipe taken from the pool while bytes are in flight, or by
# recv/send through the one shared buffer, chosen per flow as HAProxy's splice-auto does; an
# EOF is passed on as shutdown(SHUT_WR) once the bytes before it are written.  In an exchange a flow carries a body with its framing: a Content-Length body is
# cut at its length, a chunked body is checked and re-framed in place, a close-delimited
# response runs to the upstream's EOF; whatever comes past the end belongs to what follows.

cdef inline Io *flow_src(Conn *c, int d) noexcept nogil:
    return &c.io if d == 0 else &c.up.io


cdef inline Io *flow_dst(Conn *c, int d) noexcept nogil:
    return &c.up.io if d == 0 else &c.io


cdef inline Py_ssize_t pipe_ready(Pipe *p) noexcept nogil:
    # the bytes of a pipe that may go on (all but a cut frame start, FLOW_FRAMES)
    return p.data - p.tail


cdef inline bint flow_holds(Flow *f) noexcept nogil:
    return f.held != NULL or (f.pipe != NULL and pipe_ready(f.pipe) > 0)


# --- the pipe pool (HAProxy's src/pipe.c) --------------------------------------------------

cdef Pipe *pipe_get(Eng *e) noexcept nogil:
    cdef Pipe *p = e.free_pipes
    cdef int fds[2]
    if p != NULL:
        e.free_pipes = p.next
        e.n.pipes_free -= 1
        p.next = NULL
        held_count(e, DBG_PIPES, 1)
        return p
    if e.n.pipes_total >= e.max_pipes:
        e.n.pipe_shortage += 1
        return NULL
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        e.n.pipe_shortage += 1
        return NULL
    p = <Pipe *>malloc(sizeof(Pipe))
    if p == NULL:
        close(fds[0])
        close(fds[1])
        return NULL
    # A larger pipe moves more per splice pair; the kernel may refuse past fs.pipe-max-size or
    # the per-user page budget, and then the default 64 KiB pipe is kept.  A splice asks for
    # what the pipe can take: fewer bytes than asked for then means the socket is empty.
    fcntl(fds[1], F_SETPIPE_SZ, e.pipe_size)
    p.cap = fcntl(fds[1], F_GETPIPE_SZ)
    if p.cap <= 0:
        p.cap = 65536
    p.cons = fds[0]
    p.prod = fds[1]
    p.data = 0
    p.tail = 0
    p.next = NULL
    e.n.pipes_total += 1
    e.n.pipes_created += 1
    held_count(e, DBG_PIPES, 1)
    return p


cdef void pipe_put(Eng *e, Pipe *p) noexcept nogil:
    # As HAProxy's put_pipe: only an empty pipe goes back to the pool; one still holding bytes
    # (a tunnel closed mid-transfer) is destroyed.
    held_count(e, DBG_PIPES, -1)      # (pipes in use; the pool's are not held by anyone)
    if p.data == 0 and e.n.pipes_free < POOL_KEEP_FREE:
        p.next = e.free_pipes
        e.free_pipes = p
        e.n.pipes_free += 1
        return
    close(p.prod)
    close(p.cons)
    free(p)
    e.n.pipes_total -= 1


# --- moving bytes ------------------------------------------------------------------------

cdef char *held_room(Eng *e, Flow *f, Py_ssize_t n) noexcept nogil:
    # Room for n more bytes behind those the flow holds (a head and its body, an answer after a
    # 100, a pipe's bytes): where the caller puts them, or NULL (no memory).
    cdef Py_ssize_t rest = f.held_len - f.held_off if f.held != NULL else 0
    cdef char *grown = <char *>malloc(rest + n)
    if grown == NULL:
        return NULL
    if f.held == NULL:
        held_count(e, DBG_BUFFERS, 1)
    else:
        memcpy(grown, f.held + f.held_off, rest)
        free(f.held)
    f.held = grown
    f.held_len = <int>(rest + n)
    f.held_off = 0
    return grown + rest


cdef int flow_hold(Eng *e, Conn *c, int d, const char *data, Py_ssize_t n) noexcept nogil:
    # Keep bytes the destination did not take; 1 (blocked), or CLOSE_ERROR.
    cdef Flow *f = &c.flow[d]
    cdef char *room
    if n <= 0:
        return 0
    room = held_room(e, f, n)
    if room == NULL:
        return CLOSE_ERROR
    memcpy(room, data, n)
    return flow_blocked(e, c, f)


cdef inline int flow_blocked(Eng *e, Conn *c, Flow *f) noexcept nogil:
    if f.blocked_since == 0:
        f.blocked_since = e.now
        conn_arm(e, c)                # send_timeout may come before the current deadline
    return 1


cdef void flow_drop(Eng *e, Flow *f) noexcept nogil:
    if f.pipe != NULL:
        pipe_put(e, f.pipe)
        f.pipe = NULL
    if f.held != NULL:
        free(f.held)
        f.held = NULL
        held_count(e, DBG_BUFFERS, -1)
    f.held_len = f.held_off = 0
    f.chunk = NULL


cdef inline int flow_error(int d, bint at_source) noexcept nogil:
    # Which side failed, as a close reason: the source of flow 0 is the client.
    if (d == 0) == at_source:
        return CLOSE_CLIENT_ERROR
    return CLOSE_UPSTREAM_ERROR


cdef int flow_flush(Eng *e, Conn *c, int d) noexcept nogil:
    # Write what the flow holds.  0: nothing left, 1: blocked, <0: a close reason.
    cdef Flow *f = &c.flow[d]
    cdef Io *dst = flow_dst(c, d)
    cdef ssize_t n
    cdef Py_ssize_t want
    while f.held != NULL:
        if not dst.wr_ready:
            return flow_blocked(e, c, f)
        n = io_send(e, dst, f.held + f.held_off, f.held_len - f.held_off)
        if n > 0:
            f.held_off += <int>n
            if f.held_off == f.held_len:
                free(f.held)
                f.held = NULL
                f.held_len = f.held_off = 0
                held_count(e, DBG_BUFFERS, -1)
            continue
        if n == -EAGAIN or n == 0:
            return flow_blocked(e, c, f)
        return flow_error(d, False)
    while f.pipe != NULL and pipe_ready(f.pipe) > 0:
        if not dst.wr_ready:
            return flow_blocked(e, c, f)
        want = pipe_ready(f.pipe)
        n = splice(f.pipe.cons, NULL, dst.fd, NULL, <size_t>want,
                   SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        e.n.splice_calls += 1
        if n > 0:
            f.pipe.data -= n
            if n < want:
                dst.wr_ready = 0
            continue
        if n < 0 and errno == EINTR:
            continue
        if n < 0 and errno == EAGAIN:
            dst.wr_ready = 0
            return flow_blocked(e, c, f)
        return flow_error(d, False)
    if f.blocked_since > 0:
        f.blocked_since = 0
        # reading from this flow's source resumes now; its idle clock restarts with it
        f.last_rx = e.now
    if f.pipe != NULL and f.pipe.data == 0:
        pipe_put(e, f.pipe)
        f.pipe = NULL
    if f.eof and not f.shut and flow_tunnel(f):
        f.shut = 1
        if c.flow[1 - d].shut or (d == 1 and c.websocket):
            # the tunnel ends now (both ways are done, or a WebSocket server closed): close()
            # sends the FIN, a shutdown() first would only cost a system call
            return 0
        if dst.ssl != NULL:
            # TLS's half-close: a close_notify alert, then the FIN (best effort, never waited for)
            fastws_ssl.err_clear()
            fastws_ssl.shutdown(dst.ssl)
        shutdown(dst.fd, SHUT_WR)
    return 0


cdef int flow_frame(Eng *e, Conn *c, int d, char *buf, Py_ssize_t *n) noexcept nogil:
    # Apply an exchange's framing to the n bytes at buf (just read): cut them where the body
    # ends, re-frame a chunked body in place.  Sets f.eof at the end of the body and keeps
    # what follows it (flow 0: the next request; flow 1: a sign the upstream cannot be reused).
    # 0, or a close reason (a broken chunked body).
    cdef Flow *f = &c.flow[d]
    cdef Py_ssize_t consumed, out, extra = 0
    if f.mode == FLOW_LENGTH:
        if n[0] >= f.left:
            extra = n[0] - f.left
            n[0] = f.left
            f.left = 0
            f.eof = 1
        else:
            f.left -= n[0]
    elif f.mode == FLOW_CHUNKED:
        out = chunked_feed(f.chunk, buf, n[0], &consumed)
        if out < 0:
            return FRAME_BAD
        if d == 0 and c.loc != NULL and c.loc.client_max_body_size \
                and f.chunk.total > c.loc.client_max_body_size:
            return FRAME_TOO_LARGE
        extra = n[0] - consumed
        if f.chunk.done:
            f.eof = 1
        if extra > 0:
            memmove(buf + out, buf + consumed, extra)
        n[0] = out
    if extra > 0:
        if d == 0:
            if conn_stash(e, c, buf + n[0], extra) < 0:
                return CLOSE_ERROR
        elif c.req != NULL:
            c.req.up_keep = 0         # the upstream sent more than its answer: not reusable
    return 0


cdef int flow_forward(Eng *e, Conn *c, int d, Py_ssize_t n) noexcept nogil:
    # n bytes read into the shared buffer: frame them, send them on, hold what the destination
    # does not take.  0: all sent, 1: held, <0: a close reason.
    cdef Flow *f = &c.flow[d]
    cdef Io *dst = flow_dst(c, d)
    cdef ssize_t w = 0
    cdef int r
    f.last_rx = e.now
    if f.mode == FLOW_FRAMES:
        f.nbytes += n - f.ws.ncarry   # (a carried unit was counted when it was read)
        e.n.bytes_copied += n - f.ws.ncarry
        return ws_forward(e, c, d, n)
    e.n.bytes_copied += n
    if f.mode != FLOW_RAW:
        r = flow_frame(e, c, d, e.buf, &n)
        if r < 0:
            return r
    f.nbytes += n
    if n == 0:
        return 0
    if dst.wr_ready:
        # A tunnel's last bytes (the source's FIN is known to follow them): the EOF is passed on
        # right after them (flow_eof, in the same pump), so they go out with the FIN.
        w = io_send(e, dst, e.buf, n, MSG_MORE if f.mode == FLOW_RAW and flow_src(c, d).eof_next
                    else 0)
        if w < 0:
            if w != -EAGAIN:
                return flow_error(d, False)
            w = 0
    if w < n:
        return flow_hold(e, c, d, e.buf + w, n - w)
    return 0


cdef int flow_feed(Eng *e, Conn *c, int d, const char *p, Py_ssize_t n) noexcept nogil:
    # Bytes the flow's source sent before the flow ran (a tunnel's first frames, which came with
    # a head): on the path a read takes, a buffer's worth at a time.  As flow_forward.
    cdef Flow *f = &c.flow[d]
    cdef Py_ssize_t k, m
    cdef int r, rc = 0
    while n > 0:
        k = f.ws.ncarry if f.mode == FLOW_FRAMES else 0
        if k:
            memcpy(e.buf, f.ws.carry, k)
        m = n if n < e.bufsize - k else e.bufsize - k
        memmove(e.buf + k, p, m)      # (p may be in the shared buffer itself)
        r = flow_forward(e, c, d, m + k)
        if r < 0:
            return r
        rc |= r
        p += m
        n -= m
    return rc


cdef int flow_pump(Eng *e, Conn *c, int d) noexcept nogil:
    # Move what the source has to the destination.  0: done for now, <0: a close reason.
    cdef Flow *f = &c.flow[d]
    cdef Io *src = flow_src(c, d)
    cdef Io *dst = flow_dst(c, d)
    cdef int r
    cdef ssize_t n
    cdef Py_ssize_t budget = PUMP_BUDGET, want, k
    r = flow_flush(e, c, d)
    if r != 0:
        return r if r < 0 else 0
    if f.mode == FLOW_FRAMES and f.ws.flags & FASTWS_WS_STOP and f.left == 0:
        r = ws_inject(e, c, d)        # the proxy's frame, now that the flow is at a boundary
        if r != 0:
            return r if r < 0 else 0
    while src.rd_ready and not f.eof:
        if budget <= 0:
            conn_ready(e, c)          # more to read, and no edge will say so: come back soon
            break
        if f.splicing and f.pipe == NULL:
            f.pipe = pipe_get(e)      # none to be had: copy this time, splice again later
        if f.splicing and f.pipe != NULL:
            if src.eof_next:
                src.rd_ready = 0
                src.eof = 1
                return flow_eof(e, c, d)
            want = f.pipe.cap - f.pipe.data
            if f.mode == FLOW_FRAMES:
                r = ws_splice_ready(e, c, d)
                if r == 1:
                    return 0                  # the destination is full: its edge comes back
                if r == 2:
                    continue
                if r < 0:
                    return r
                # as many frames as the pipe takes, cut anywhere: ws_spliced finds the
                # boundaries; only for a frame of the proxy's does the splice stop at one
                want = f.pipe.cap - f.pipe.data
                if f.ws.flags & FASTWS_WS_STOP and f.left < want:
                    want = <Py_ssize_t>f.left
            n = splice(src.fd, NULL, f.pipe.prod, NULL, <size_t>want,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            e.n.splice_calls += 1
            if n > 0:
                # Fewer bytes than asked for do not tell that the socket is empty, as they do for
                # recv(): a pipe holds so many buffers, not bytes, and small segments (a NIC's,
                # 1.5 KB each) fill it first.  Only EAGAIN, or 0 at the EOF, tells (as HAProxy's
                # raw_sock_to_pipe).
                f.pipe.data += n
                f.nbytes += n
                f.last_rx = e.now
                e.n.bytes_spliced += n
                budget -= n
                if f.mode == FLOW_FRAMES:
                    r = ws_spliced(e, c, d, n)
                    if r < 0:
                        return r
                    if not f.splicing:
                        continue      # a broken rule: the flow's close went, it copies now
                # As HAProxy: splice out right after splicing in, without waiting for a poll.
                r = flow_flush(e, c, d)
                if r != 0:
                    return r if r < 0 else 0
                if n < SPLICE_SMALL and n < want:   # (not a frame's end that was asked for)
                    f.streak += 1
                    if c.relay == RELAY_AUTO and f.streak >= SPLICE_SMALL_STREAK:
                        r = flow_copy_from_now(e, f)
                        if r < 0:
                            return r
                        e.n.switches_to_copy += 1
                else:
                    f.streak = 0
                continue
            if n == 0:
                src.rd_ready = 0
                src.eof = 1
                return flow_eof(e, c, d)
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                if pipe_ready(f.pipe) > 0:
                    # the pipe may be what is full, not the socket empty
                    r = flow_flush(e, c, d)
                    if r != 0:
                        return r if r < 0 else 0
                    continue
                src.rd_ready = 0
                break
            if errno == EINVAL or errno == ENOSYS:
                r = flow_copy_from_now(e, f)    # this socket cannot splice
                if r < 0:
                    return r
                continue
            return flow_error(d, True)
        k = 0
        if f.mode == FLOW_FRAMES and f.ws.ncarry:
            k = f.ws.ncarry           # a unit the last read cut goes first
            memcpy(e.buf, f.ws.carry, k)
        n = io_recv(e, src, e.buf + k, e.bufsize - k)
        e.n.copy_calls += 1
        if n > 0:
            budget -= n
            r = flow_forward(e, c, d, n + k)
            if r != 0:
                return r if r < 0 else 0
            if f.eof:
                return flow_done(e, c, d)
            if flow_tunnel(f) and c.relay == RELAY_AUTO and src.ssl == NULL:
                if n + k == e.bufsize:
                    f.streak += 1
                    if f.streak >= COPY_FULL_STREAK:
                        f.splicing = 1
                        f.streak = 0
                        e.n.switches_to_splice += 1
                else:
                    f.streak = 0
            continue
        if n == 0:
            return flow_eof(e, c, d)
        if n == -EAGAIN:
            break
        return flow_error(d, True)
    if f.pipe != NULL and pipe_ready(f.pipe) > 0:
        r = flow_flush(e, c, d)
        if r < 0:
            return r
    if f.pipe != NULL and f.pipe.data == f.pipe.tail:
        # nothing in flight: the pipe goes back to the pool (a cut frame start waits in the
        # carry), so that a quiet tunnel holds none
        return flow_take_pipe(e, f)
    return 0


cdef int flow_eof(Eng *e, Conn *c, int d) noexcept nogil:
    # The source ended.  A tunnel passes it on; a body that ends with its connection is done;
    # any other body ends too soon.
    cdef Flow *f = &c.flow[d]
    cdef int r
    if flow_tunnel(f):
        f.eof = 1
        if c.first_eof < 0:
            c.first_eof = d
        r = flow_flush(e, c, d)
        return r if r < 0 else 0
    if f.mode == FLOW_CLOSE:
        f.eof = 1
        return flow_done(e, c, d)
    return CLOSE_CLIENT if d == 0 else CLOSE_UPSTREAM


cdef int flow_done(Eng *e, Conn *c, int d) noexcept nogil:
    # An exchange's body is complete (flow 0: the request's, flow 1: the response's).
    if c.state != CS_EXCHANGE and c.state != CS_UPSTREAM:
        return 0
    if d == 0:
        return exchange_request_done(e, c)
    return exchange_response_done(e, c)


cdef int flow_copy_from_now(Eng *e, Flow *f) noexcept nogil:
    # A spliced flow copies from now on: what its pipe holds becomes plain memory.
    f.splicing = 0
    f.streak = 0
    return flow_take_pipe(e, f)


cdef int pipe_to_held(Eng *e, Flow *f, Py_ssize_t n) noexcept nogil:
    # The first n bytes of the flow's pipe join its held bytes, behind them.  0, or CLOSE_ERROR.
    cdef Py_ssize_t got = 0
    cdef ssize_t r
    cdef char *room = held_room(e, f, n)
    if room == NULL:
        return CLOSE_ERROR
    while got < n:
        r = read(f.pipe.cons, room + got, <size_t>(n - got))
        if r < 0 and errno == EINTR:
            continue
        if r <= 0:
            f.held_len -= <int>(n - got)      # (the connection closes: keep only what came)
            return CLOSE_ERROR
        got += r
    f.pipe.data -= n
    return 0


cdef int flow_take_pipe(Eng *e, Flow *f) noexcept nogil:
    # Make what a flow's pipe holds plain memory: the bytes that may go join its held bytes, a
    # frame start a splice cut becomes the carry (which the next read or pipe starts with); the
    # pipe goes back to the pool.  0, or CLOSE_ERROR.
    cdef Py_ssize_t n
    cdef ssize_t r
    if f.pipe == NULL:
        return 0
    n = pipe_ready(f.pipe)
    if n > 0 and pipe_to_held(e, f, n) < 0:
        return CLOSE_ERROR
    n = f.pipe.tail
    if n > 0:
        if n > <Py_ssize_t>sizeof(f.ws.carry) or f.ws.ncarry:
            return CLOSE_ERROR        # (a scan leaves less than a unit's 14 bytes, and no carry)
        r = read(f.pipe.cons, f.ws.carry, <size_t>n)
        if r != n:
            return CLOSE_ERROR
        f.ws.ncarry = <uint8_t>n
        f.pipe.data = f.pipe.tail = 0
    pipe_put(e, f.pipe)
    f.pipe = NULL
    return 0
