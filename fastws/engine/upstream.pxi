# The upstream side of a request: choosing a server, connecting (or taking a kept-alive
# connection from the pool), sending the head, reading and checking the answer's head, and
# nginx's next upstream when an attempt fails before the answer.
#
# Accounting follows nginx's get/free pair: every peer that sel_next hands out (get) is given
# back by exactly one peer_free, failed or not, in exchange_release_upstream, or at once when
# the attempt never got a socket.

cdef int upstream_select_init(Eng *e, Conn *c, Head *h) noexcept nogil:
    # The request's selection state: ip_hash's client address bytes, the hash key rendered
    # from its template, or the Python view a custom balancer reads.  0, or -1 (closed).
    cdef Req *req = c.req
    cdef int gi = req.group
    cdef Group *g = e.groups[gi]
    cdef unsigned char addr[16]
    cdef int alen = 0
    cdef fastws_buf *b = &e.xbuf
    cdef const char *key = NULL
    cdef int keylen = 0
    if g.method == BAL_IP_HASH:
        alen = iphash_addr(<SockAddr *>&c.raddr, addr)
    elif (g.method == BAL_HASH or g.method == BAL_CHASH) and c.hk != NULL and c.hk.key_set:
        key = c.hk.key                # the hook's key
        keylen = c.hk.keylen
    elif (g.method == BAL_HASH or g.method == BAL_CHASH) and e.hash_keys[gi] != NULL:
        b.len = 0
        tpl_render(e, c, NULL, e.hash_keys[gi], b)
        key = b.p
        keylen = b.len
    elif g.method == BAL_CUSTOM:
        with gil:
            req.ctx = request_view(e, c)
        if req.ctx == NULL:
            conn_close(e, c)
            return -1
    if sel_init(g, &req.sel, addr, alen, key, keylen) < 0:
        conn_close(e, c)
        return -1
    req.sel_live = 1
    req.sticky_from = -1
    if e.sticky[gi] != NULL:
        req.sticky_from = sticky_peer(e.sticky[gi], g, h, b)
        req.sel.sticky = req.sticky_from
    if c.hk != NULL and c.hk.peer >= 0:
        req.sel.sticky = c.hk.peer    # the hook's server, tried first (as a sticky cookie's)
    return 0


cdef int sticky_peer(Sticky *st, Group *g, Head *h, fastws_buf *b) noexcept nogil:
    # The peer whose id the request's sticky cookie holds, or -1.
    cdef int i
    b.len = 0
    cookie_value(h, st.name, st.namelen, b)
    if b.len != 32:
        return -1
    for i in range(g.npeers):
        if memcmp(g.peers[i].sticky_id, b.p, 32) == 0:
            return i
    return -1


cdef void upstream_next(Eng *e, Conn *c) noexcept nogil:
    # nginx's ngx_http_upstream_connect: the next server, within next_upstream_tries and
    # next_upstream_timeout; a kept-alive connection to it if the pool has one.
    cdef Req *req = c.req
    cdef Loc *loc = c.loc
    cdef Group *g = e.groups[req.group]
    cdef Pool *pool = &e.pools[req.group]
    cdef Up *u
    cdef int peer
    if loc.next_upstream_tries and req.tries >= loc.next_upstream_tries or \
            loc.next_upstream_timeout and req.tries and e.now - req.t_first >= loc.next_upstream_timeout:
        exchange_fail(e, c, 504 if req.timed_out else 502, "no upstream left to try")
        return
    if g.method == BAL_CUSTOM:
        with gil:
            peer = select_custom(e, req.group, &req.sel, <object>req.ctx)
    else:
        peer = sel_next(g, &req.sel, e.now)
    if peer == SEL_ALL_DOWN:
        eng_log(e, LOG_ERROR, "upstream %s: no server available", e.group_names[req.group])
    if peer < 0:
        exchange_fail(e, c, 504 if req.timed_out else 502, "no live upstream")
        return
    req.tries += 1
    req.peer = peer
    req.t_connect = e.now
    req.t_sent = 0
    req.reused = 0
    req.rlen = 0
    if not req.upgrading and pool.size:
        u = pool_take(e, pool, peer)
        if u != NULL:
            req.reused = 1
            u.owner = c
            u.gen = g.gen
            c.up = u
            u.requests += 1
            req.t_connected = e.now
            group_connected(e, req.group, &req.sel, peer, u.gen)
            conn_arm(e, c)
            upstream_send_head(e, c)
            return
    up_open(e, c, peer)


cdef void up_open(Eng *e, Conn *c, int peer) noexcept nogil:
    cdef Req *req = c.req
    cdef Loc *loc = c.loc
    cdef Group *g = e.groups[req.group]
    cdef RRPeer *pr = &g.peers[peer]
    cdef Up *u
    cdef int fd, one = 1, err
    fd = socket(pr.addr.sa.sa_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        err = errno
        eng_log(e, LOG_ERROR, "socket() failed (%d: %s) while connecting to upstream, client: %s",
                err, strerror(err), conn_addr(e, c))
        group_free(e, req.group, &req.sel, peer, 0, g.gen)
        exchange_fail(e, c, 502, "cannot open a socket")
        return
    if pr.addr.sa.sa_family != AF_UNIX:
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one))
        # On a connecting socket TCP_DEFER_ACCEPT delays the ACK of the server's SYN-ACK so
        # that it rides on the head, sent right after (Linux, tcp_rcv_synsent_state_process:
        # "Save one ACK"): one segment fewer per connection for the proxy and the upstream
        # alike; the delayed-ACK timer sends it alone if the head is slow to go.
        setsockopt(fd, IPPROTO_TCP, TCP_DEFER_ACCEPT, &one, sizeof(one))
    if loc.socket_keepalive:
        setsockopt(fd, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one))
    u = <Up *>calloc(1, sizeof(Up))
    if u == NULL:
        close(fd)
        group_free(e, req.group, &req.sel, peer, 0, g.gen)
        conn_close(e, c)
        return
    held_count(e, DBG_UPS, 1)
    u.io.kind = IO_UPSTREAM
    u.io.fd = fd
    u.timer.idx = -1
    u.timer.kind = IO_UPSTREAM
    u.timer.owner = <void *>u
    u.owner = c
    u.group = req.group
    u.peer = peer
    u.gen = g.gen
    u.requests = 1
    u.state = UP_CONNECTING
    c.up = u
    if e.pools[req.group].size:
        e.pools[req.group].opened += 1
    if connect(fd, &pr.addr.sa, pr.addrlen) < 0 and errno != EINPROGRESS:
        err = errno
        upstream_failed(e, c, err, "connect() failed", "while connecting to upstream", 0)
        return
    if io_register(e, &u.io) < 0:
        upstream_failed(e, c, errno, "epoll_ctl() failed", "while connecting to upstream", 0)
        return
    conn_arm(e, c)
    # Try the head at once: on loopback and near servers the connect is usually complete
    # already, and a send says so (EAGAIN while it is still in progress), which spares a
    # wake-up and the getsockopt(SO_ERROR) nginx makes.
    u.io.wr_ready = 1
    upstream_run(e, c)


cdef void upstream_run(Eng *e, Conn *c) noexcept nogil:
    # CS_UPSTREAM: whatever either socket allows now.
    cdef Req *req = c.req
    cdef Up *u = c.up
    cdef ssize_t n
    cdef int r
    if u == NULL:
        return
    if u.state == UP_CONNECTING:
        if not u.io.wr_ready:
            return
        if e.pools[req.group].send_proxy:
            # The PROXY header first, alone and in the clear (before TLS too); its send says
            # whether the connect is complete.  The head then goes as held bytes.
            r = pp_send(e, c, e.pools[req.group].send_proxy)
            if r == 0:
                return
            if r < 0:
                upstream_failed(e, c, -r, "connect() failed", "while connecting to upstream", 0)
                return
            up_connected(e, c)
            if c.loc.upstream_tls:
                tls_connect_start(e, c)
                return
            if flow_hold(e, c, 0, req.uhead, req.uhead_len) < 0:
                conn_close(e, c)
                return
        elif c.loc.upstream_tls:
            r = socket_error(u.io.fd)
            if r == EINPROGRESS or r == EALREADY or (r == 0 and not u.io.wr_ready):
                return
            if r != 0:
                upstream_failed(e, c, r, "connect() failed", "while connecting to upstream", 0)
                return
            up_connected(e, c)
            tls_connect_start(e, c)
            return
        else:
            n = io_send(e, &u.io, req.uhead, req.uhead_len)
            if n == -EAGAIN:
                return
            if n < 0:
                upstream_failed(e, c, <int>-n, "connect() failed", "while connecting to upstream",
                                0)
                return
            up_connected(e, c)
            if n < req.uhead_len and flow_hold(e, c, 0, req.uhead + n, req.uhead_len - n) < 0:
                conn_close(e, c)
                return
            if n == req.uhead_len:
                request_sent(e, c)
    elif u.state == UP_TLS:
        tls_connect_run(e, c)
        return
    if c.state != CS_UPSTREAM or c.up != u:
        return
    r = flow_flush(e, c, 0)
    if r < 0:
        upstream_failed(e, c, ECONNRESET, "send() failed", "while sending request to upstream", 0)
        return
    if r > 0:
        return
    if req.t_sent == 0:
        request_sent(e, c)
    if not req.body_done and not c.peer_closed:
        r = flow_pump(e, c, 0)
        if r < 0:
            exchange_body_error(e, c, r)
            return
        if c.state != CS_UPSTREAM or c.up != u:
            return
    if u.io.rd_ready:
        upstream_read_head(e, c)


cdef inline void request_sent(Eng *e, Conn *c) noexcept nogil:
    c.req.t_sent = e.now
    c.flow[1].last_rx = e.now
    conn_arm(e, c)                    # read_timeout counts from here


cdef void up_connected(Eng *e, Conn *c) noexcept nogil:
    cdef Req *req = c.req
    c.up.state = UP_READY
    req.t_connected = e.now
    group_connected(e, c.up.group, &req.sel, c.up.peer, c.up.gen)


cdef void group_connected(Eng *e, int gi, Selection *s, int peer, unsigned int gen) noexcept nogil:
    # nginx marks a server live again when a connection to it succeeds after fail_timeout
    cdef int flags = peer_connected(e.groups[gi], s, peer, e.now)
    if flags & SEL_PEER_UP:
        eng_log(e, LOG_INFO, "upstream %s: server %s is up again", e.group_names[gi],
                e.groups[gi].peers[peer].name)
    if flags & SEL_GROUP_UP:
        eng_log(e, LOG_INFO, "upstream %s: a server is available again", e.group_names[gi])
    if e.groups[gi].method == BAL_CUSTOM:
        group_note(e, gi, NOTE_CONNECTED, peer, gen)


cdef void group_note(Eng *e, int gi, int event, int peer, unsigned int gen) noexcept nogil:
    # a custom balancer's optional connected/released/failed methods, for an attempt that
    # began under this balancer (a replaced group's new one never saw the ones before it)
    if gen != e.groups[gi].gen:
        return
    with gil:
        try:
            (<UpstreamGroup>e.group_objs[gi]).notify_custom(event, peer)
        except Exception:
            import logging
            logging.getLogger("fastws").exception("the balancer of upstream %s failed",
                                                  e.group_names[gi].decode())


cdef void upstream_send_head(Eng *e, Conn *c) noexcept nogil:
    # On a kept-alive connection: the head (and the body bytes that came with it) at once.
    cdef Req *req = c.req
    cdef ssize_t n = io_send(e, &c.up.io, req.uhead, req.uhead_len)
    if n == -EAGAIN:
        n = 0
    if n < 0:
        upstream_failed(e, c, <int>-n, "send() failed", "while sending request to upstream", 0)
        return
    if n < req.uhead_len:
        if flow_hold(e, c, 0, req.uhead + n, req.uhead_len - n) < 0:
            conn_close(e, c)
        return
    request_sent(e, c)
    if not req.body_done:
        upstream_run(e, c)


cdef int socket_error(int fd) noexcept nogil:
    cdef int err = 0
    cdef socklen_t n = sizeof(err)
    if getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &n) < 0:
        return errno
    return err


cdef void upstream_read_head(Eng *e, Conn *c) noexcept nogil:
    # The answer's head: read into the shared buffer, or into the request's own buffer when it
    # comes in pieces; then checked and acted on.
    cdef Req *req = c.req
    cdef Up *u = c.up
    cdef ssize_t n
    cdef Py_ssize_t end
    cdef char *data
    cdef int total, start, cap
    cdef char *grown
    while u.io.rd_ready:
        if req.rlen == 0:
            n = io_recv(e, &u.io, e.buf, e.bufsize)
            data = e.buf
            start = 0
        else:
            if req.rcap - req.rlen < 4096:
                cap = req.rcap * 2 if req.rcap else 8192
                if cap > MAX_RESPONSE_HEAD + 8192:
                    cap = MAX_RESPONSE_HEAD + 8192
                grown = <char *>realloc(req.rbuf, cap)
                if grown == NULL:
                    conn_close(e, c)
                    return
                req.rbuf = grown
                req.rcap = cap
            n = io_recv(e, &u.io, req.rbuf + req.rlen, req.rcap - req.rlen)
            data = req.rbuf
            start = req.rlen - 3 if req.rlen > 3 else 0
        if n == -EAGAIN:
            return
        if n <= 0:
            if n == 0:
                upstream_failed(e, c, 0, "upstream prematurely closed connection",
                                "while reading response header from upstream", 0)
            else:
                upstream_failed(e, c, <int>-n, "recv() failed",
                                "while reading response header from upstream", 0)
            return
        total = <int>n if data == e.buf else req.rlen + <int>n
        end = head_end(data, start, total)
        if end < 0 or end > MAX_RESPONSE_HEAD:
            if total > MAX_RESPONSE_HEAD:
                upstream_bad(e, c, "upstream sent too big header")
                return
            if status_line_check(data, total) != 0:
                upstream_bad(e, c, "upstream sent no valid HTTP/1.x status line")
                return
            if data == e.buf:
                if req_keep_answer(req, data, total) < 0:
                    conn_close(e, c)
                    return
            else:
                req.rlen = total
            continue
        if data != e.buf:
            req.rlen = total
        upstream_head(e, c, data, <int>end, total)
        return


cdef int req_keep_answer(Req *req, const char *data, int n) noexcept nogil:
    cdef int cap = 8192
    while cap < n + 4096:
        cap *= 2
    req.rbuf = <char *>realloc(req.rbuf, cap)
    if req.rbuf == NULL:
        return -1
    req.rcap = cap
    memcpy(req.rbuf, data, n)
    req.rlen = n
    return 0


cdef void upstream_head(Eng *e, Conn *c, char *data, int end, int total) noexcept nogil:
    cdef Req *req = c.req
    cdef Head *rh = &e.rhead
    cdef int st
    while True:
        if parse_response(rh, data, end) < 0:
            upstream_bad(e, c, rh.error)
            return
        st = rh.status
        if st < 100 or st >= 200 or st == 101:
            break
        # Interim answers (100 Continue, 103 Early Hints) are not passed on: the proxy
        # answered any Expect itself.
        data += end
        total -= end
        if total == 0:
            req.rlen = 0
            return
        end = <int>head_end(data, 0, total)
        if end < 0:
            if req_keep_answer(req, data, total) < 0:
                conn_close(e, c)
            return
    req.resp_status = st
    if st == 101:
        if not req.upgrading:
            upstream_bad(e, c, "upstream sent 101 to a request that asked for no upgrade")
            return
        if check_101(req, rh) != NULL:
            upstream_bad(e, c, check_101(req, rh))
            return
        tunnel_start(e, c, data, end, total)
        return
    response_start(e, c, data, end, total)


cdef const char *check_101(Req *req, Head *rh) noexcept nogil:
    # A 101 completes the handshake only with the Upgrade token asked for, Connection:
    # upgrade, and the Sec-WebSocket-Accept of the client's key (RFC 6455 section 4.1).  A
    # proxy that tunnels on anything less lets a client smuggle requests to the upstream.
    cdef int i, n, start, end, tokens = 0, found = 0
    cdef const char *v
    for i in range(rh.nheaders):
        if rh.headers[i].kind != H_UPGRADE:
            continue
        v = rh.base + rh.headers[i].value.off
        n = rh.headers[i].value.len
        start = 0
        while start < n:
            while start < n and (v[start] == b' ' or v[start] == b'\t' or v[start] == b','):
                start += 1
            end = start
            while end < n and v[end] != b',':
                end += 1
            if end > start:
                tokens += 1
                while end > start and (v[end - 1] == b' ' or v[end - 1] == b'\t'):
                    end -= 1
                if end - start == req.token_len and strncasecmp(v + start, req.token, end - start) == 0:
                    found += 1
                while end < n and v[end] != b',':
                    end += 1
            start = end
    if tokens != 1 or found != 1:
        return "upstream sent 101 with another Upgrade token; not tunnelled"
    if not head_has_token(rh, H_CONNECTION, "upgrade", 7):
        return "upstream sent 101 without Connection: upgrade; not tunnelled"
    i = rh.first[<int>H_SEC_WEBSOCKET_ACCEPT]
    if i < 0 or rh.count[<int>H_SEC_WEBSOCKET_ACCEPT] != 1 or rh.headers[i].value.len != req.accept_len \
            or memcmp(rh.base + rh.headers[i].value.off, req.accept, req.accept_len) != 0:
        return "upstream sent 101 with a wrong Sec-WebSocket-Accept; not tunnelled"
    return NULL


cdef void upstream_bad(Eng *e, Conn *c, const char *why) noexcept nogil:
    # An answer that cannot be relayed: 502, and the connection to the upstream is not kept.
    eng_log(e, LOG_ERROR, "%s, client: %s, upstream: %s", why, conn_addr(e, c),
            upstream_name(e, c))
    exchange_release_upstream(e, c, 0, 0)
    exchange_fail(e, c, 502, why)


cdef const char *upstream_name(Eng *e, Conn *c) noexcept nogil:
    if c.up != NULL and c.up.group >= 0:
        return e.groups[c.up.group].peers[c.up.peer].name
    if c.req != NULL and c.req.peer >= 0 and c.loc != NULL:
        return e.groups[c.req.group].peers[c.req.peer].name
    return "-"


cdef void upstream_failed(Eng *e, Conn *c, int err, const char *what, const char *when,
                          int timeout) noexcept nogil:
    # nginx's proxy_next_upstream "error timeout": a connect that fails or times out, or an
    # upstream that fails before its answer's head is complete, counts against the server and
    # the next one is tried, if the request can be sent again.
    cdef Req *req = c.req
    cdef Up *u = c.up
    cdef int peer
    if err:
        eng_log(e, LOG_ERROR, "%s (%d: %s) %s, client: %s, upstream: %s", what, err,
                strerror(err), when, conn_addr(e, c), upstream_name(e, c))
    else:
        eng_log(e, LOG_ERROR, "%s %s, client: %s, upstream: %s", what, when, conn_addr(e, c),
                upstream_name(e, c))
    if u != NULL and req.reused and not req.retried and not timeout and req.rlen == 0 \
            and req.body_done and request_replayable(req):
        # A kept-alive connection the upstream had closed meanwhile: nothing of the answer
        # came and the whole request is at hand, so it goes again, once, on a new connection
        # to the same server (the attempt goes on: no failure is counted).
        req.retried = 1
        peer = u.peer
        c.up = NULL
        up_close(e, u)
        flow_drop(e, &c.flow[0])
        up_open(e, c, peer)
        return
    req.timed_out = timeout
    exchange_release_upstream(e, c, 1, 0)
    flow_drop(e, &c.flow[0])
    if req.body_done and request_replayable(req):
        upstream_next(e, c)
    else:
        exchange_fail(e, c, 504 if timeout else 502, what)


cdef inline bint request_replayable(Req *req) noexcept nogil:
    # The whole request is in uhead (no body streamed from the client yet): an upgrade or an
    # idempotent method may go to another server even once sent (RFC 9110 section 9.2.2);
    # another method only if nothing of it was sent.
    if req.upgrading:
        return True
    if req.t_sent == 0:
        return True
    return req.method == M_GET or req.method == M_HEAD or req.method == M_PUT or \
        req.method == M_DELETE or req.method == M_OPTIONS or req.method == M_TRACE


cdef void exchange_release_upstream(Eng *e, Conn *c, int failed, int reuse) noexcept nogil:
    # nginx's free: the attempt's one peer_free, then the connection closes or goes back to
    # the pool.
    cdef Up *u = c.up
    cdef Req *req = c.req
    if u == NULL:
        return
    c.up = NULL
    if u.group >= 0:
        group_free(e, u.group, &req.sel if req != NULL and req.sel_live else NULL, u.peer,
                   failed, u.gen)
    if req != NULL:
        req.peer = -1
    u.owner = NULL
    if reuse and pool_put(e, u) == 0:
        return
    up_close(e, u)


cdef void group_free(Eng *e, int gi, Selection *s, int peer, int failed,
                     unsigned int gen) noexcept nogil:
    # nginx's free: once per attempt, failed or not (peer_free makes sure of it)
    if peer_free(e.groups[gi], s, peer, failed, e.now) == 1:
        eng_log(e, LOG_WARN, "upstream %s: server %s marked down for %gs after %d failed attempt(s)",
                e.group_names[gi], e.groups[gi].peers[peer].name,
                e.groups[gi].peers[peer].fail_timeout, e.groups[gi].peers[peer].fails)
    if e.groups[gi].method == BAL_CUSTOM:
        group_note(e, gi, NOTE_FAILED if failed else NOTE_RELEASED, peer, gen)


cdef void exchange_drop_upstream(Eng *e, Conn *c, int failed) noexcept nogil:
    exchange_release_upstream(e, c, failed, 0)


# --- the pool of kept-alive connections ------------------------------------------------------

cdef Up *pool_take(Eng *e, Pool *pool, int peer) noexcept nogil:
    # The most recently used idle connection to this server (ngx_http_upstream_get_keepalive_peer
    # searches its cache for the peer's address).
    cdef Up *u = pool.tail
    while u != NULL:
        if u.peer == peer:
            pool_unlink(pool, u)
            timer_stop(e, &u.timer)
            pool.reused += 1
            return u
        u = u.prev
    return NULL


cdef int pool_put(Eng *e, Up *u) noexcept nogil:
    # 0 when kept; -1 when it must close instead (past keepalive_requests, or no pool).
    cdef Pool *pool = &e.pools[u.group]
    cdef Up *old
    if pool.size == 0 or u.requests >= pool.max_requests or pool.timeout <= 0 or e.stopping \
            or u.io.fd < 0 or u.io.eof or u.peer >= e.groups[u.group].npeers:
        return -1           # (the last: a server that left the group, engine/regroup.pxi)
    if pool.idle >= pool.size:
        old = pool.head
        pool_unlink(pool, old)
        up_close(e, old)
    u.idle_since = e.now
    u.prev = pool.tail
    u.next = NULL
    if pool.tail != NULL:
        pool.tail.next = u
    else:
        pool.head = u
    pool.tail = u
    pool.idle += 1
    timer_arm(e, &u.timer, e.now + pool.timeout)
    return 0


cdef void pool_unlink(Pool *pool, Up *u) noexcept nogil:
    if u.prev != NULL:
        u.prev.next = u.next
    else:
        pool.head = u.next
    if u.next != NULL:
        u.next.prev = u.prev
    else:
        pool.tail = u.prev
    u.prev = u.next = NULL
    pool.idle -= 1


cdef void pool_event(Eng *e, Up *u) noexcept nogil:
    # An idle connection became readable: the upstream closed it (or misbehaves).
    if u.io.rd_ready:
        pool_unlink(&e.pools[u.group], u)
        up_close(e, u)


cdef double up_deadline(Eng *e, Up *u) noexcept nogil:
    if u.owner == NULL and u.io.fd >= 0:
        return u.idle_since + e.pools[u.group].timeout
    return NEVER


cdef void up_timeout(Eng *e, Up *u) noexcept nogil:
    if u.owner == NULL and u.io.fd >= 0:
        pool_unlink(&e.pools[u.group], u)
        up_close(e, u)


cdef void up_close(Eng *e, Up *u) noexcept nogil:
    # Freed at the end of the turn, since events of this turn may still name it.
    timer_stop(e, &u.timer)
    io_close(e, &u.io)
    u.owner = NULL
    u.next = e.dead_ups
    e.dead_ups = u
