# WebSocket tunnels that follow their frames (FLOW_FRAMES; the tracker is includes/wsframe.h).
#
# The bytes still go as they come, by copy or by splice: the tracker reads each frame's header
# where it passes and skips its payload.  A copied read is scanned in the shared buffer; a
# header a read cut in two waits in the flow's carry for the rest, so what went on always ends
# inside a payload or at a boundary.  A spliced flow reads its headers from a tee(2) of its pipe
# (ws_pipe_scan, below), so that frames, large or small, still move without a copy.
#
# Knowing the boundaries, the proxy can put frames of its own between two frames: pings toward
# a silent side (ping_interval; the pong that answers is taken out of the stream), and the
# close frames of a closing handshake it begins (a shutdown, a reload, a timeout, a broken
# rule): to each side at its next boundary, after which what that side's peer sends is read
# and dropped until its own close frame (or its EOF) answers, or close_timeout passes.

# the mask key of the frames the proxy sends upstream (RFC 6455 5.3 wants one; the frames are
# the proxy's own, so a fixed key gives away nothing)
cdef const uint8_t *WS_KEY = <const uint8_t *>b"\x5a\x1e\x93\xc7"


cdef inline bint flow_tunnel(Flow *f) noexcept nogil:
    return f.mode <= FLOW_FRAMES


cdef inline bint ws_closing(Conn *c) noexcept nogil:
    # the proxy's closing handshake runs (a scheduled one waits for end_at)
    return c.ws_code != 0 and c.end_at >= NEVER


cdef const char *ws_close_text(int why) noexcept nogil:
    # the reason a close frame of the proxy's gives (7.1.6: for people reading a trace)
    if why == CLOSE_SHUTDOWN: return "server shutting down"
    if why == CLOSE_RELOAD: return "server restarting"
    if why == CLOSE_REMOVED: return "server removed"
    if why == CLOSE_IDLE_TIMEOUT or why == CLOSE_READ_TIMEOUT: return "idle timeout"
    if why == CLOSE_LIFETIME: return "connection lifetime reached"
    if why == CLOSE_WS_PROTOCOL: return "protocol error"
    if why == CLOSE_WS_TOO_BIG: return "message too big"
    if why == CLOSE_PING_TIMEOUT: return "ping timeout"
    return ""


cdef int ws_code_class(int code) noexcept nogil:
    if code == 1000: return WS_CODE_NORMAL
    if code == 1001: return WS_CODE_GOING_AWAY
    if code == 1002: return WS_CODE_PROTOCOL
    if code == 1009: return WS_CODE_TOO_BIG
    if code == 1012: return WS_CODE_RESTART
    if code == 0 or code == 1006: return WS_CODE_NONE
    if code >= 3000: return WS_CODE_APPLICATION
    return WS_CODE_OTHER


cdef int ws_emit(Eng *e, Conn *c, int d, const char *p, Py_ssize_t n,
                 int flags=0) noexcept nogil:
    # Bytes for flow d's destination, behind what the flow holds (flags: io_send's).  0: sent,
    # 1: held, <0: a close reason.
    cdef Flow *f = &c.flow[d]
    cdef Io *dst = flow_dst(c, d)
    cdef ssize_t w = 0
    if n <= 0:
        return 0
    if f.pipe != NULL and f.pipe.data > 0 and flow_take_pipe(e, f) < 0:
        # frames gathered in the pipe go first: held bytes are written before a pipe's (only
        # a close of the proxy's, on a broken frame, can come while the pipe holds bytes)
        return CLOSE_ERROR
    if f.held == NULL and dst.wr_ready:
        w = io_send(e, dst, p, n, flags)
        if w < 0:
            if w != -EAGAIN:
                return flow_error(d, False)
            w = 0
    if w < n:
        return flow_hold(e, c, d, p + w, n - w)
    return 0


cdef int ws_inject(Eng *e, Conn *c, int d) noexcept nogil:
    # Flow d's destination has had whole frames only: the frame the proxy has for it goes now
    # (a close during the proxy's closing handshake, else a ping).
    cdef Flow *f = &c.flow[d]
    cdef uint8_t frame[2 + 4 + 125]
    cdef uint8_t data[125]
    cdef const uint8_t *key = WS_KEY if d == 0 else NULL     # clients mask (5.3)
    cdef const char *text
    cdef int n, m
    f.ws.flags &= ~FASTWS_WS_STOP
    if f.shut:
        f.ws.flags |= FASTWS_WS_CLOSE_SENT        # the destination has our FIN already
        return 0
    if ws_closing(c):
        if f.ws.flags & FASTWS_WS_CLOSE_SENT:
            return 0
        f.ws.flags |= FASTWS_WS_CLOSE_SENT
        f.splicing = 0                # what comes after is read only to find the answer
        text = ws_close_text(c.ws_why)
        m = <int>strlen(text)
        data[0] = <uint8_t>(c.ws_code >> 8)
        data[1] = <uint8_t>(c.ws_code & 0xff)
        memcpy(data + 2, text, m)
        n = fastws_ws_make(frame, 8, data, 2 + m, key)
        return ws_emit(e, c, d, <const char *>frame, n)
    n = fastws_ws_make(frame, 9, <const uint8_t *>FASTWS_WS_PING_DATA, FASTWS_WS_PING_LEN, key)
    f.ws.pings += 1
    e.n.ws_pings += 1
    c.flow[1 - d].ws.flags |= FASTWS_WS_PONG_DUE   # the answer comes the other way
    conn_arm(e, c)                                 # ping_timeout starts
    return ws_emit(e, c, d, <const char *>frame, n)


cdef inline void ws_note_close(Conn *c, int d) noexcept nogil:
    # After a unit of flow d: if a close frame came, is it the first of the tunnel?
    if (c.flow[d].ws.flags & (FASTWS_WS_CLOSE_SEEN | FASTWS_WS_CLOSE_NOTED)) != \
            FASTWS_WS_CLOSE_SEEN:
        return
    c.flow[d].ws.flags |= FASTWS_WS_CLOSE_NOTED
    if not (c.flow[1 - d].ws.flags & FASTWS_WS_CLOSE_SEEN) and not ws_closing(c):
        c.flow[d].ws.flags |= FASTWS_WS_CLOSE_FIRST


cdef inline void ws_pong_taken(Eng *e, Conn *c) noexcept nogil:
    e.n.ws_pongs += 1
    conn_arm(e, c)                    # the next ping is due sooner than the pong's deadline


cdef int ws_forward(Eng *e, Conn *c, int d, Py_ssize_t n) noexcept nogil:
    # n bytes at the shared buffer (a carried unit first): send on what may go, keep a cut unit,
    # take out the proxy's pongs, stop at a boundary where the proxy has a frame to put in.
    # 0: sent, 1: held, <0: a close reason.
    cdef Flow *f = &c.flow[d]
    cdef uint8_t *p = <uint8_t *>e.buf
    cdef size_t pos = 0, start = 0, drop = 0
    cdef int r, w, rc = 0
    cdef bint dropping = f.ws.flags & FASTWS_WS_CLOSE_SENT   # after the proxy's close
    # the source's FIN follows these bytes (a server's close frame, as a rule): they go with
    # the FIN the flow passes on next, in one segment (as flow_forward's)
    cdef int more = MSG_MORE if flow_src(c, d).eof_next else 0
    f.ws.ncarry = 0
    if dropping and f.ws.flags & FASTWS_WS_CLOSE_SEEN:
        return 0                      # the source's answer came (or is not waited for)
    while True:
        r = fastws_ws_scan(&f.ws, <uint64_t *>&f.left, p, <size_t>n, &pos, d == 0,
                           c.tp.max_message, &drop)
        if not dropping:
            w = ws_emit(e, c, d, e.buf + start, <Py_ssize_t>(pos - start), more)
            if w < 0:
                return w
            rc |= w
        if r == FASTWS_WS_MORE:
            break
        if r == FASTWS_WS_DROP:
            ws_pong_taken(e, c)
            pos += drop
            start = pos
            continue
        if r == FASTWS_WS_BOUNDARY:
            w = ws_inject(e, c, d)
            if w < 0:
                return w
            rc |= w
            dropping = f.ws.flags & FASTWS_WS_CLOSE_SENT
            start = pos
            continue
        # 1002 or 1009: the frame at pos goes no further, nor anything after it
        f.left = 0
        if dropping:
            return rc
        return ws_fail(e, c, d, r)
    if pos < <size_t>n:
        f.ws.ncarry = <uint8_t>(n - pos)         # at most 13 bytes: a unit is at most 14
        memcpy(f.ws.carry, e.buf + pos, n - pos)
    ws_note_close(c, d)
    if f.ws.flags & FASTWS_WS_STOP and f.left == 0 and f.ws.ncarry == 0:
        w = ws_inject(e, c, d)                # the read ended at a boundary
        if w < 0:
            return w
        rc |= w
    return rc


# --- a spliced flow: its headers read from a tee(2) of its pipe ---------------------------
#
# A splice brings as many frames as the pipe takes, cut anywhere.  The bytes past the last
# boundary the flow knew (the pipe's tail) are looked at through the engine's scratch pipe: a
# tee(2) puts the pipe's pages there too, without a copy; each header is read from it (at most
# 14 bytes copied) and each payload spliced to /dev/null (what is left after the last header
# goes with the next look's first skip).  So a frame costs two system calls on a pipe, not a
# peek and a splice of its own on the socket: a socket read is what makes the kernel send the
# ACK that wakes the sender, and fewer of them is most of what splice saves.

# A frame start a splice cut (at most 13 bytes) waits in the pipe, in as many buffers as
# segments brought it: a pipe needs more than that many buffers (a page each) to take more
# behind it.  Smaller pipes (pipe_size under 64 KiB) leave such tunnels to the copy path.
cdef enum:
    WS_PIPE_MIN = 65536


cdef int ws_scratch(Eng *e) noexcept nogil:
    # The scratch pipe and /dev/null, made when the engine starts (and again if the pipe broke).
    # 0, or -1: they cannot be had (the flows that follow frames then copy).
    cdef int fds[2]
    if e.peek_cap != 0:
        return 0 if e.peek_cap > 0 else -1
    e.peek_cap = -1
    e.null_fd = open("/dev/null", O_WRONLY | O_CLOEXEC)
    if e.null_fd < 0:
        return -1
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        close(e.null_fd)
        return -1
    # as large as any flow's pipe, so that a tee of a whole pipe always fits in an empty one
    fcntl(fds[1], F_SETPIPE_SZ, e.pipe_size)
    e.peek_cons = fds[0]
    e.peek_prod = fds[1]
    e.peek_cap = fcntl(fds[1], F_GETPIPE_SZ)
    if e.peek_cap < e.pipe_size:
        close(fds[0])
        close(fds[1])
        close(e.null_fd)
        e.peek_cap = -1
        return -1
    return 0


cdef void ws_scratch_close(Eng *e) noexcept nogil:
    if e.peek_cap > 0:
        close(e.peek_cons)
        close(e.peek_prod)
        close(e.null_fd)
    e.peek_cap = 0
    e.peek_left = 0


cdef int pipe_skip(Eng *e, int fd, Py_ssize_t n) noexcept nogil:
    # The first n bytes of the pipe read at fd go to /dev/null.  0, or -1.
    cdef ssize_t k
    while n > 0:
        k = splice(fd, NULL, e.null_fd, NULL, <size_t>n, SPLICE_F_NONBLOCK)
        if k < 0 and errno == EINTR:
            continue
        if k <= 0:
            return -1
        n -= k
    return 0


cdef int ws_splice_ready(Eng *e, Conn *c, int d) noexcept nogil:
    # A spliced flow that follows its frames, before it splices more in: at a boundary the
    # proxy's frame goes (after what the pipe holds that may go); a frame start the copy path
    # cut (or a handed-over tunnel brought) begins the pipe.  0: splice, 1: wait for the
    # destination, 2: look again, <0: a close reason.
    cdef Flow *f = &c.flow[d]
    cdef int r
    if f.ws.flags & FASTWS_WS_STOP and f.left == 0:
        if f.held != NULL or pipe_ready(f.pipe) > 0:
            r = flow_flush(e, c, d)
            return r if r != 0 else 2
        r = ws_inject(e, c, d)
        return r if r < 0 else 2
    if f.pipe.cap < WS_PIPE_MIN or ws_scratch(e) < 0:
        r = flow_copy_from_now(e, f)
        return r if r < 0 else 2
    if f.ws.ncarry:
        if write(f.pipe.prod, f.ws.carry, f.ws.ncarry) != f.ws.ncarry:
            return CLOSE_ERROR
        f.pipe.data += f.ws.ncarry
        f.pipe.tail += f.ws.ncarry
        f.ws.ncarry = 0
    return 0


cdef int ws_spliced(Eng *e, Conn *c, int d, Py_ssize_t n) noexcept nogil:
    # n bytes were spliced into the flow's pipe: those past the current frame are looked at.
    # 0, or a close reason.
    cdef Flow *f = &c.flow[d]
    if f.pipe.tail == 0:
        if f.left >= n:
            f.left -= n
            return 0
        f.pipe.tail = n - <Py_ssize_t>f.left
        f.left = 0
    else:
        f.pipe.tail += n              # (behind a cut frame start: f.left is 0)
    return ws_pipe_scan(e, c, d)


cdef int ws_pipe_scan(Eng *e, Conn *c, int d) noexcept nogil:
    # Read the headers in the pipe's tail and skip their payloads, until the tail is a frame
    # start the splice cut (it waits there for the rest) or the last frame goes on past the
    # pipe (f.left: its bytes still to come).  The proxy's pong and a frame that breaks a rule
    # are taken out once what is before them has gone on.  0, or a close reason.
    cdef Flow *f = &c.flow[d]
    cdef Pipe *p
    cdef uint8_t h[14]
    cdef ssize_t t, k
    cdef Py_ssize_t pos, seen, room
    cdef int r, have, need = 0, hlen = 0
    cdef uint64_t length = 0
    while True:
        p = f.pipe
        if p.tail == 0:
            return 0
        t = tee(p.cons, e.peek_prod, <size_t>p.data, SPLICE_F_NONBLOCK)
        if t != p.data and e.peek_left > 0:
            # a pipe counts buffers, not bytes: what the last look left can take the room of
            # this one's (many small buffers).  It goes, with what was tee'd, and the tee again
            # (the scratch pipe has as many buffers as any flow's).
            if pipe_skip(e, e.peek_cons, e.peek_left + (t if t > 0 else 0)) < 0:
                return ws_scratch_broken(e)
            e.peek_left = 0
            t = tee(p.cons, e.peek_prod, <size_t>p.data, SPLICE_F_NONBLOCK)
        if t != p.data:
            eng_log(e, LOG_ERROR, "tee(2) of a pipe of %zd bytes gave %zd (errno %d)", p.data, t,
                    errno)
            if t > 0:
                e.peek_left += t
            return CLOSE_ERROR
        # what the last look left goes with the bytes before the tail, in one splice
        pos = seen = p.data - p.tail  # seen: how far this tee has been read
        if pipe_skip(e, e.peek_cons, e.peek_left + seen) < 0:
            return ws_scratch_broken(e)
        e.peek_left = 0
        r = 0
        have = 0                      # bytes of the unit at pos in h (a header read may take
        while pos < p.data:           # the start of the next unit too)
            k = p.data - pos if p.data - pos < 14 else 14
            if have < k:
                if read(e.peek_cons, h + have, <size_t>(k - have)) != k - have:
                    return ws_scratch_broken(e)
                seen += k - have
                have = <int>k
            r = fastws_ws_header(&f.ws, h, <size_t>have, d == 0, c.tp.max_message, &need,
                                 &hlen, &length)
            if r != 0 or need > have:
                break                 # a broken rule, or a frame start the splice cut
            if fastws_ws_unit(&f.ws, h, need, hlen, length):
                r = FASTWS_WS_DROP    # the proxy's pong
                break
            ws_note_close(c, d)
            room = p.data - pos - hlen
            if length >= <uint64_t>room:
                f.left = <long long>(length - <uint64_t>room)
                pos = p.data
                break
            k = hlen + <Py_ssize_t>length
            pos += k
            if k < have:
                have -= <int>k
                memmove(h, h + k, <size_t>have)
            else:
                if pipe_skip(e, e.peek_cons, pos - seen) < 0:
                    return ws_scratch_broken(e)
                seen = pos
                have = 0
        e.peek_left = t - seen
        p.tail = p.data - pos
        if r == 0:
            return 0
        # the frame at pos goes no further: what is before it goes first, then it is taken out
        k = ws_pipe_before(e, c, d, pos)
        if k < 0:
            return <int>k
        if r == FASTWS_WS_DROP:
            if pipe_skip(e, p.cons, need) < 0:
                return CLOSE_ERROR
            p.data -= need
            p.tail = p.data
            f.last_rx = e.now
            ws_pong_taken(e, c)
            continue
        if pipe_skip(e, p.cons, p.data) < 0:
            return CLOSE_ERROR
        p.data = p.tail = 0
        return ws_fail(e, c, d, r)


cdef int ws_pipe_before(Eng *e, Conn *c, int d, Py_ssize_t pos) noexcept nogil:
    # The pipe's first pos bytes go before anything else happens to the flow: spliced out if
    # the destination takes them, else kept as held bytes.  0, or a close reason.
    cdef Flow *f = &c.flow[d]
    cdef Pipe *p = f.pipe
    cdef int r
    if pos == 0:
        return 0
    p.tail = p.data - pos
    r = flow_flush(e, c, d)           # (the pipe stays: the frame at pos is still in it)
    if r < 0:
        return r
    if pipe_ready(p) > 0 and pipe_to_held(e, f, pipe_ready(p)) < 0:
        return CLOSE_ERROR
    return 0


cdef int ws_scratch_broken(Eng *e) noexcept nogil:
    # The scratch pipe failed mid-read (it should not): it may hold bytes no scan can place, so
    # it goes, and is made anew at the next use.
    eng_log(e, LOG_ERROR, "the scratch pipe failed (errno %d): made anew", errno)
    ws_scratch_close(e)
    return CLOSE_ERROR


cdef int ws_fail(Eng *e, Conn *c, int d, int code) noexcept nogil:
    # Flow d's source broke a rule (1002) or the message limit (1009), in the frame that starts
    # where the flow stands: nothing more of what it sends goes on (its stream cannot be
    # followed past that frame), the close goes to both sides, and its answer is not waited for.
    cdef Flow *f = &c.flow[d]
    cdef int r
    eng_log(e, LOG_INFO, "%s %s %s: closing the WebSocket with %d",
            "client" if d == 0 else "upstream", conn_addr(e, c),
            "sent a frame that breaks RFC 6455" if code == FASTWS_WS_PROTOCOL
            else "sent a message over max_message_size", code)
    ws_goodbye(e, c, code, CLOSE_WS_PROTOCOL if code == FASTWS_WS_PROTOCOL else CLOSE_WS_TOO_BIG,
               0)
    r = ws_inject(e, c, d)
    f.ws.flags |= FASTWS_WS_CLOSE_SEEN | FASTWS_WS_CLOSE_NOTED | FASTWS_WS_CLOSE_SENT
    f.ws.flags &= ~FASTWS_WS_STOP
    f.splicing = 0
    return r if r < 0 else 0


cdef void ws_goodbye_schedule(Eng *e, Conn *c, double spread, int code,
                              int reason) noexcept nogil:
    # The proxy's closing handshake at a random moment within `spread` seconds (at once when
    # 0), so that a fleet's clients do not all reconnect at once.
    cdef double at
    if spread > 0:
        at = e.now + spread * (rand() / (RAND_MAX + 1.0))
        if at < c.end_at:
            c.end_at = at
        c.ws_code = <unsigned short>code
        c.ws_why = <signed char>reason
        conn_arm(e, c)
    else:
        ws_goodbye(e, c, code, reason, 1)


cdef void ws_goodbye(Eng *e, Conn *c, int code, int why, bint run) noexcept nogil:
    # Begin the proxy's closing handshake: a close frame to each side at its next boundary.
    cdef int d
    cdef Flow *f
    if ws_closing(c) or c.flow[0].mode != FLOW_FRAMES:
        return
    c.ws_code = <unsigned short>code
    c.ws_why = <signed char>why
    c.end_at = NEVER
    c.t_state = e.now
    e.n.ws_goodbyes += 1
    for d in range(2):
        f = &c.flow[d]
        if f.ws.flags & FASTWS_WS_CLOSE_SEEN:
            # this flow carried its source's close already: the destination has one
            f.ws.flags |= FASTWS_WS_CLOSE_SENT
        else:
            f.ws.flags |= FASTWS_WS_STOP
    conn_arm(e, c)
    if run:
        tunnel_run(e, c)


cdef bint ws_goodbye_done(Conn *c) noexcept nogil:
    # Both sides have the proxy's close (written) and have answered it (or ended).
    cdef Flow *f
    cdef int d
    for d in range(2):
        f = &c.flow[d]
        if not (f.ws.flags & FASTWS_WS_CLOSE_SENT) or flow_holds(f):
            return False
        if not (f.ws.flags & FASTWS_WS_CLOSE_SEEN) and not f.eof:
            return False
    return True


cdef void ws_ping(Eng *e, Conn *c, int d) noexcept nogil:
    # A ping goes on flow d (1: to the client, 0: to the upstream) at its next boundary.
    c.flow[d].ws.flags |= FASTWS_WS_STOP
    tunnel_run(e, c)
    conn_arm(e, c)


cdef double ws_deadline(Conn *c, double d) noexcept nogil:
    # tunnel_deadline's part for the pings: when a silent side is pinged, or given up on.
    cdef TunnelPolicy *tp = c.tp
    cdef Flow *src
    cdef double t
    cdef int side
    for side in range(2):             # the side pinged is flow `side`'s source
        if not (tp.ping_to & (PING_CLIENT if side == 0 else PING_UPSTREAM)):
            continue
        src = &c.flow[side]
        if src.eof:
            continue
        if src.ws.flags & FASTWS_WS_PONG_DUE or c.flow[1 - side].ws.flags & FASTWS_WS_STOP:
            t = src.last_rx + tp.ping_interval + tp.ping_timeout
            if t < d:
                d = t
                c.reason = CLOSE_PING_TIMEOUT
        else:
            t = src.last_rx + tp.ping_interval
            if t < d:
                d = t
                c.reason = TUNNEL_PING_CLIENT if side == 0 else TUNNEL_PING_UPSTREAM
    return d


cdef void ws_tunnel_start(Eng *e, Conn *c) noexcept nogil:
    cdef int i
    for i in range(2):
        c.flow[i].mode = FLOW_FRAMES
        c.flow[i].left = 0
        memset(&c.flow[i].ws, 0, sizeof(fastws_wsframe))
        if c.tp.checks:
            c.flow[i].ws.flags = FASTWS_WS_CHECKS


cdef void ws_count_close(Eng *e, Conn *c) noexcept nogil:
    e.n.ws_codes[ws_code_class(ws_close_code(c))] += 1


cdef int ws_close_code(Conn *c) noexcept nogil:
    # The code of the tunnel's first close frame, whoever sent it; 1006 if none was sent.
    if c.flow[0].ws.flags & FASTWS_WS_CLOSE_FIRST:
        return c.flow[0].ws.close_code
    if c.flow[1].ws.flags & FASTWS_WS_CLOSE_FIRST:
        return c.flow[1].ws.close_code
    if ws_closing(c):
        return c.ws_code
    return 1006


cdef const char *ws_closed_by(Conn *c) noexcept nogil:
    # Who began the closing: the first close frame's sender, else whoever ended the stream.
    if c.flow[0].ws.flags & FASTWS_WS_CLOSE_FIRST:
        return "client"
    if c.flow[1].ws.flags & FASTWS_WS_CLOSE_FIRST:
        return "upstream"
    if ws_closing(c):
        return "proxy"
    if c.reason == CLOSE_CLIENT or c.reason == CLOSE_CLIENT_ERROR:
        return "client"
    if c.reason == CLOSE_UPSTREAM or c.reason == CLOSE_UPSTREAM_ERROR:
        return "upstream"
    return "proxy"


cdef const char *ws_code_name(int code) noexcept nogil:
    # RFC 6455 7.4.1 and the IANA registry, for $ws_close_reason
    if code == 1000: return "normal"
    if code == 1001: return "going_away"
    if code == 1002: return "protocol_error"
    if code == 1003: return "unsupported_data"
    if code == 1005: return "no_status"
    if code == 1006: return "abnormal"
    if code == 1007: return "invalid_payload"
    if code == 1008: return "policy_violation"
    if code == 1009: return "message_too_big"
    if code == 1010: return "mandatory_extension"
    if code == 1011: return "internal_error"
    if code == 1012: return "service_restart"
    if code == 1013: return "try_again_later"
    if code == 1014: return "bad_gateway"
    if code >= 4000: return "application"
    if code >= 3000: return "registered"
    return "other"


# --- for the tests -------------------------------------------------------------------------

def ws_frames(chunks, bint from_client, unsigned long long max_message=0, bint checks=True,
              bint pong_due=False):
    """Run the copy path's tracker over `chunks` (bytes, in order, as reads would bring them),
    carrying a cut unit from one read to the next as ws_forward does; what it found: messages,
    the first close code (or None), the error that stopped it (1002, 1009, or None), whether it
    ended at a boundary, the bytes it let through and the pongs it took out."""
    cdef fastws_wsframe f
    cdef uint64_t left = 0
    cdef size_t pos, start, drop = 0
    cdef bytes data
    cdef int r = 0, pongs = 0
    out = []
    memset(&f, 0, sizeof(f))
    f.flags = (FASTWS_WS_CHECKS if checks else 0) | (FASTWS_WS_PONG_DUE if pong_due else 0)
    carry = b""
    for chunk in chunks:
        data = carry + chunk
        pos = start = 0
        while True:
            r = fastws_ws_scan(&f, &left, <const uint8_t *>PyBytes_AS_STRING(data),
                               <size_t>len(data), &pos, from_client, max_message, &drop)
            out.append(data[start:pos])
            if r != FASTWS_WS_DROP:
                break
            pongs += 1
            pos += drop
            start = pos
        if r >= 1000:
            break
        carry = data[pos:]
    return {"messages": f.messages,
            "close_code": f.close_code if f.flags & FASTWS_WS_CLOSE_SEEN else None,
            "error": r if r >= 1000 else None, "boundary": left == 0 and not carry,
            "in_message": bool(f.flags & FASTWS_WS_IN_MSG), "passed": b"".join(out),
            "pongs": pongs}


def ws_frames_walk(bytes data, bint from_client, unsigned long long max_message=0,
                   bint checks=True):
    """The splice path's way through the same stream: at each boundary the header read whole,
    then the payload skipped; the frames it found, its messages, close code and error."""
    cdef fastws_wsframe f
    cdef int r = 0, need = 0, hlen = 0
    cdef uint64_t length = 0
    cdef size_t at = 0, k
    cdef bytes head
    frames = 0
    memset(&f, 0, sizeof(f))
    f.flags = FASTWS_WS_CHECKS if checks else 0
    while at < <size_t>len(data):
        head = data[at:at + 14]
        k = len(head)
        r = fastws_ws_header(&f, <const uint8_t *>PyBytes_AS_STRING(head), k, from_client,
                             max_message, &need, &hlen, &length)
        if r or <size_t>need > k:
            break
        fastws_ws_unit(&f, <const uint8_t *>PyBytes_AS_STRING(head), need, hlen, length)
        at += hlen + length
        frames += 1
    return {"messages": f.messages, "frames": frames,
            "close_code": f.close_code if f.flags & FASTWS_WS_CLOSE_SEEN else None,
            "error": r or None, "boundary": at == <size_t>len(data)}
