# An HTTP exchange: the answer's head rewritten and relayed, both bodies streamed with their
# framing (nginx's proxy_buffering off and proxy_request_buffering off), then either the next
# request on the kept-alive client connection or a graceful close.  The upstream connection
# goes back to its pool as soon as its answer is read whole.
#
# Framing is strict, so that the proxy and the upstream can never read a message two ways: a
# chunked body is checked and re-framed, a Content-Length body is passed byte for byte and
# never beyond its length; an answer that ends too soon is cut short for the client too (a
# close before the announced length, or a chunked body without its last chunk), never made
# to look complete.

cdef void response_start(Eng *e, Conn *c, char *data, int end, int total) noexcept nogil:
    # The upstream's answer head is rh (in data[:end]); data[end:total] are its first body
    # bytes.  Rewrite the head, choose the framing, and start relaying.
    cdef Req *req = c.req
    cdef Loc *loc = c.loc
    cdef Head *rh = &e.rhead
    cdef Flow *f = &c.flow[1]
    cdef fastws_buf *b = &e.obuf
    cdef Header *hd
    cdef int i, kind, st = rh.status, keep, te, unchunk = 0
    cdef long long cl
    cdef Py_ssize_t bn = total - end
    cdef ssize_t w
    cdef const char *name
    cdef Sticky *sticky
    cl = head_content_length(rh)
    if cl == -2:
        upstream_bad(e, c, "upstream sent an invalid Content-Length")
        return
    req.up_keep = wants_keepalive(rh)
    te = rh.first[<int>H_TRANSFER_ENCODING]
    f.mode = FLOW_LENGTH
    f.left = 0
    if req.method == M_HEAD or st == 204 or st == 304:
        pass
    elif te >= 0:
        if transfer_chunked(rh):
            f.mode = FLOW_CHUNKED
        else:
            f.mode = FLOW_CLOSE
    elif cl >= 0:
        f.left = cl
    else:
        f.mode = FLOW_CLOSE
    keep = (req.client_ka and req.body_done and f.mode != FLOW_CLOSE and not req.upgrading
            and loc.keepalive_timeout > 0 and c.nreq < loc.keepalive_requests and not e.stopping
            and not c.peer_closed)
    if f.mode == FLOW_CHUNKED:
        f.chunk = &req.chunk_out
        if req.version == 10:
            # An HTTP/1.0 client cannot read chunks: pass the bare data, ended by the close.
            chunked_init(f.chunk, 0)
            unchunk = 1
            keep = 0
        else:
            chunked_init(f.chunk, 1)
    if not req.body_done:
        # The upstream answered before the request body ended: the rest is not passed on, and
        # the client connection closes after the answer.
        keep = 0
        c.peer_closed = 1
    c.keepalive = keep
    b.len = 0
    b.failed = 0
    buf_fmt(b, "HTTP/1.1 %d ", st)
    buf_add(b, rh.base + rh.reason.off, rh.reason.len)
    buf_add(b, "\r\n", 2)
    for i in range(rh.nheaders):
        hd = &rh.headers[i]
        kind = hd.kind
        if kind == H_CONNECTION or kind == H_KEEP_ALIVE or kind == H_PROXY_CONNECTION \
                or kind == H_TE or kind == H_TRAILER or kind == H_UPGRADE:
            continue
        if kind == H_CONTENT_LENGTH and te >= 0:
            continue                  # RFC 9112 section 6.3: Transfer-Encoding wins
        if kind == H_TRANSFER_ENCODING and unchunk:
            continue
        name = rh.base + hd.name.off
        if rh.count[<int>H_CONNECTION] and named_by_connection(rh, name, hd.name.len):
            continue
        buf_add(b, name, hd.name.len)
        buf_add(b, ": ", 2)
        buf_add(b, rh.base + hd.value.off, hd.value.len)
        buf_add(b, "\r\n", 2)
    sticky = e.sticky[c.up.group] if c.up != NULL else NULL
    if sticky != NULL and c.req.sticky_from != c.up.peer:
        # a client without the cookie of the server that answered gets it (nginx's sticky)
        buf_add(b, sticky.set_head, sticky.set_head_len)
        buf_add(b, e.groups[c.up.group].peers[c.up.peer].sticky_id, 32)
        buf_add(b, sticky.attrs, sticky.attrs_len)
    if keep:
        buf_add(b, "Connection: keep-alive\r\n\r\n", 26)
    else:
        buf_add(b, "Connection: close\r\n\r\n", 21)
    if b.failed:
        conn_close(e, c)
        return
    if c.log != NULL:
        c.log.status = st
        c.log.upstream_status = st
        c.log.head_sent = b.len
        c.log.header_time = e.now - req.t_connect
    req.rlen = 0
    c.send_timeout = loc.send_timeout
    conn_set_state(e, c, CS_EXCHANGE)
    f.last_rx = e.now
    f.nbytes = 0
    if bn > 0 and flow_frame(e, c, 1, data + end, &bn) < 0:
        upstream_bad(e, c, "upstream sent an invalid chunked response")
        return
    if f.mode == FLOW_LENGTH and f.left == 0:
        f.eof = 1
    f.nbytes = bn
    req.resp_started = 1
    w = io_send2(e, &c.io, b.p, b.len, data + end, bn)
    if w < 0:
        if w != -EAGAIN:
            exchange_client_gone(e, c)
            return
        w = 0
    if w < b.len:
        if flow_hold(e, c, 1, b.p + w, b.len - w) < 0 or \
                flow_hold(e, c, 1, data + end, bn) < 0:
            conn_close(e, c)
            return
    elif w < b.len + bn:
        if flow_hold(e, c, 1, data + end + (w - b.len), bn - (w - b.len)) < 0:
            conn_close(e, c)
            return
    if f.eof:
        exchange_response_done(e, c)
    exchange_run(e, c)


cdef int transfer_chunked(Head *rh) noexcept nogil:
    # Is chunked the last coding of the Transfer-Encoding (RFC 9112 section 6.3)?
    cdef int i, n
    cdef const char *v
    for i in range(rh.nheaders - 1, -1, -1):
        if rh.headers[i].kind != H_TRANSFER_ENCODING:
            continue
        v = rh.base + rh.headers[i].value.off
        n = rh.headers[i].value.len
        while n > 0 and (v[n - 1] == b' ' or v[n - 1] == b'\t'):
            n -= 1
        return n >= 7 and strncasecmp(v + n - 7, "chunked", 7) == 0
    return 0


cdef void exchange_run(Eng *e, Conn *c) noexcept nogil:
    # CS_EXCHANGE: the rest of the request body up, the answer's body down.
    cdef Req *req = c.req
    cdef int r
    if not req.body_done and not c.peer_closed and c.up != NULL:
        r = flow_pump(e, c, 0)
        if r < 0:
            exchange_body_error(e, c, r)
            return
        if c.state != CS_EXCHANGE:
            return
    if c.up != NULL and not req.resp_done:
        r = flow_pump(e, c, 1)
    else:
        r = flow_flush(e, c, 1)
    if c.state != CS_EXCHANGE:
        return
    if r < 0:
        if r == CLOSE_CLIENT_ERROR:
            exchange_client_gone(e, c)
        elif r == CLOSE_UPSTREAM or r == CLOSE_UPSTREAM_ERROR:
            exchange_truncate(e, c, "upstream prematurely closed connection while reading upstream")
        else:
            exchange_truncate(e, c, "upstream sent an invalid chunked response")
        return
    if req.resp_done and not flow_holds(&c.flow[1]):
        exchange_finish(e, c)


cdef int exchange_request_done(Eng *e, Conn *c) noexcept nogil:
    # The request body is read whole (and sent, or held for the upstream).
    c.req.body_done = 1
    c.flow[0].eof = 1
    return 0


cdef int exchange_response_done(Eng *e, Conn *c) noexcept nogil:
    # The answer is read whole: the upstream connection is free (back to its pool when both it
    # and the exchange allow), before the client has taken the last bytes.
    cdef Req *req = c.req
    cdef Flow *f = &c.flow[1]
    cdef int reuse
    req.resp_done = 1
    if c.log != NULL:
        c.log.response_time = e.now - req.t_connect
    reuse = (req.up_keep and req.body_done and not flow_holds(&c.flow[0])
             and f.mode != FLOW_CLOSE and c.up != NULL and c.up.state == UP_READY)
    exchange_release_upstream(e, c, 0, reuse)
    return 0


cdef void exchange_finish(Eng *e, Conn *c) noexcept nogil:
    # The client has the whole answer: the next request, or a graceful close.
    cdef int keep = c.keepalive
    cdef Loc *loc = c.loc
    if c.log != NULL:
        c.log.bytes_sent = c.log.head_sent + c.flow[1].nbytes
        c.log.request_length = c.req.head_size + c.flow[0].nbytes
    request_end(e, c)
    flow_reset(e, &c.flow[0])
    flow_reset(e, &c.flow[1])
    if keep:
        c.read_timeout = loc.keepalive_timeout
        conn_next_request(e, c)
    else:
        conn_linger(e, c)


cdef void flow_reset(Eng *e, Flow *f) noexcept nogil:
    flow_drop(e, f)
    memset(f, 0, sizeof(Flow))


cdef void exchange_fail(Eng *e, Conn *c, int status, const char *why) noexcept nogil:
    # An error answer if nothing of the upstream's answer went to the client yet, else the
    # answer is cut.
    if c.req != NULL and c.req.resp_started:
        exchange_truncate(e, c, why)
        return
    exchange_release_upstream(e, c, 0, 0)
    flow_reset(e, &c.flow[0])
    flow_reset(e, &c.flow[1])
    conn_fail(e, c, status, why)


cdef void exchange_truncate(Eng *e, Conn *c, const char *why) noexcept nogil:
    # The answer has started: the client must see it end short, never as complete.  What is
    # held still goes out, then the connection closes.
    eng_log(e, LOG_ERROR, "%s, client: %s, upstream: %s", why, conn_addr(e, c),
            upstream_name(e, c))
    exchange_release_upstream(e, c, 0, 0)
    c.keepalive = 0
    if c.log != NULL:
        c.log.bytes_sent = c.log.head_sent + c.flow[1].nbytes
    flow_reset(e, &c.flow[0])
    c.flow[1].mode = FLOW_RAW
    c.flow[1].eof = 0
    conn_set_state(e, c, CS_ANSWER)
    answer_run(e, c)


cdef void exchange_client_gone(Eng *e, Conn *c) noexcept nogil:
    eng_log(e, LOG_INFO, "client %s closed the connection while sending the response",
            conn_addr(e, c))
    conn_close(e, c)


cdef void exchange_body_error(Eng *e, Conn *c, int r) noexcept nogil:
    # The request body failed: its framing, its size, the client, or the upstream taking it.
    cdef Req *req = c.req
    if r == FRAME_TOO_LARGE:
        exchange_fail(e, c, 413, "chunked body larger than client_max_body_size")
    elif r == FRAME_BAD:
        exchange_fail(e, c, 400, "bad chunked body")
    elif r == CLOSE_CLIENT or r == CLOSE_CLIENT_ERROR:
        eng_log(e, LOG_INFO, "client %s prematurely closed connection while sending the body",
                conn_addr(e, c))
        conn_close(e, c)
    elif c.state == CS_UPSTREAM:
        upstream_failed(e, c, ECONNRESET, "send() failed", "while sending request to upstream", 0)
    else:
        exchange_truncate(e, c, "send() failed while sending request to upstream")


cdef double exchange_deadline(Eng *e, Conn *c) noexcept nogil:
    cdef Req *req = c.req
    cdef Loc *loc = c.loc
    cdef double d = NEVER, t
    if req == NULL:
        return NEVER
    if c.state == CS_UPSTREAM:
        if c.up == NULL:
            return req.delay_until if req.delay_until > 0 else NEVER
        if c.up.state != UP_READY:
            return req.t_connect + loc.connect_timeout
        if c.flow[0].blocked_since > 0:
            d = c.flow[0].blocked_since + loc.send_timeout
        elif req.t_sent > 0 and req.body_done:
            d = req.t_sent + loc.read_timeout
    else:
        if c.flow[1].blocked_since > 0:
            d = c.flow[1].blocked_since + c.send_timeout
        elif not req.resp_done:
            d = c.flow[1].last_rx + loc.read_timeout
        if not req.body_done and not c.peer_closed and c.flow[0].blocked_since > 0:
            t = c.flow[0].blocked_since + loc.send_timeout
            if t < d:
                d = t
    if not req.body_done and not c.peer_closed and c.flow[0].blocked_since == 0:
        t = c.flow[0].last_rx + loc.client_body_timeout
        if t < d:
            d = t
    return d


cdef void exchange_timeout(Eng *e, Conn *c) noexcept nogil:
    # Which of the exchange's deadlines came, and its answer.
    cdef Req *req = c.req
    cdef Loc *loc = c.loc
    if req == NULL:
        conn_close(e, c)
        return
    if c.state == CS_UPSTREAM and c.up == NULL and req.delay_until > 0:
        req.delay_until = 0           # limit_req's delay is over
        upstream_next(e, c)
        return
    if not req.body_done and not c.peer_closed and c.flow[0].blocked_since == 0 \
            and c.flow[0].last_rx + loc.client_body_timeout <= e.now:
        exchange_fail(e, c, 408, "client timed out (110: Connection timed out) while reading "
                      "the request body")
        return
    if c.state == CS_UPSTREAM:
        if c.up != NULL and c.up.state != UP_READY:
            upstream_failed(e, c, 0, "upstream timed out (110: Connection timed out)",
                            "while connecting to upstream", 1)
        elif c.flow[0].blocked_since > 0:
            upstream_failed(e, c, 0, "upstream timed out (110: Connection timed out)",
                            "while sending request to upstream", 1)
        else:
            upstream_failed(e, c, 0, "upstream timed out (110: Connection timed out)",
                            "while reading response header from upstream", 1)
        return
    if c.flow[1].blocked_since > 0:
        eng_log(e, LOG_INFO, "client timed out (110: Connection timed out) while sending the "
                "response, client: %s", conn_addr(e, c))
        conn_close(e, c)
        return
    exchange_truncate(e, c, "upstream timed out (110: Connection timed out) while reading upstream")
