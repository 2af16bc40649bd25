# Tunnels: an upgraded connection's two sockets, relayed until both ways have ended.
#
# Bytes each side sent past its head go first (the 101 and what followed it to the client, the
# client's early bytes to the upstream, only now that the 101 is checked).  Half-close: an EOF
# one way is passed on as shutdown(SHUT_WR) once the bytes before it are written; the tunnel
# closes when both ways are done.  A reset on either side closes both.  read_timeout: no bytes
# from the upstream for that long closes it (once the upstream has finished, the client's side
# is held to the same limit); send_timeout: a write that stays blocked that long closes it, as
# nginx's proxy_read_timeout and proxy_send_timeout on an upgraded connection.

cdef void tunnel_start(Eng *e, Conn *c, char *data, int end, int total) noexcept nogil:
    # A checked 101 is at data[:end]; data[:total] (the 101 and what followed it) goes to the
    # client, with the group's sticky cookie added to the head when the client lacks it.
    cdef Req *req = c.req
    cdef Loc *loc = c.loc
    cdef RRPeer *pr = &e.groups[c.up.group].peers[c.up.peer]
    cdef Sticky *st = e.sticky[c.up.group]
    cdef int i, r
    if c.log != NULL:
        c.log.status = 101
        c.log.upstream_status = 101
        c.log.connect_time = req.t_connected - req.t_connect
        c.log.header_time = e.now - req.t_connect
        c.log.head_sent = total
        c.log.head_in = req.head_size
        c.log.group = c.up.group
        c.log.peer = c.up.peer
    c.read_timeout = loc.read_timeout
    c.send_timeout = loc.send_timeout
    c.tp = &loc.tunnel
    c.end_at = NEVER
    if loc.max_lifetime > 0:
        # a random share of the spread off each tunnel's lifetime: tunnels opened together
        # (a reconnect storm) do not all end together
        c.end_at = e.now + loc.max_lifetime - loc.lifetime_spread * (rand() / (RAND_MAX + 1.0))
    c.relay = loc.relay
    c.websocket = req.token_len == 9 and memcmp(req.token, "websocket", 9) == 0
    if c.io.ssl != NULL or c.up.io.ssl != NULL:
        c.relay = RELAY_COPY          # the kernel cannot splice what it cannot decrypt
        e.n.tls_tunnels_total += 1
    flow_reset(e, &c.flow[0])
    flow_reset(e, &c.flow[1])
    for i in range(2):
        c.flow[i].mode = FLOW_RAW
        c.flow[i].splicing = c.relay == RELAY_SPLICE
        c.flow[i].last_rx = e.now
    if c.websocket and c.tp.frames:
        ws_tunnel_start(e, c)
    if c.up.peer >= e.groups[c.up.group].npeers and e.groups[c.up.group].drain_timeout > 0:
        # its server left the group while the handshake was under way (engine/regroup.pxi)
        tunnel_drain(e, c, e.groups[c.up.group].drain_timeout, CLOSE_REMOVED)
    c.first_eof = -1
    c.started = e.now
    if st != NULL and req.sticky_from != c.up.peer and end >= 4:
        # the head without its empty line, the Set-Cookie, the empty line
        r = flow_hold(e, c, 1, data, end - 2)
        r |= flow_hold(e, c, 1, st.set_head, st.set_head_len)
        r |= flow_hold(e, c, 1, e.groups[c.up.group].peers[c.up.peer].sticky_id, 32)
        r |= flow_hold(e, c, 1, st.attrs, st.attrs_len)
        r |= flow_hold(e, c, 1, data + end - 2, 2)
        if c.log != NULL:
            c.log.head_sent = total + st.set_head_len + 32 + st.attrs_len
    else:
        r = flow_hold(e, c, 1, data, end)
    if r >= 0 and total > end:
        # the upstream's first frames (read with the 101)
        if c.flow[1].mode == FLOW_FRAMES:
            r = flow_feed(e, c, 1, data + end, total - end)
        else:
            r = flow_hold(e, c, 1, data + end, total - end)
    c.flow[1].blocked_since = 0
    if r >= 0 and req.early_len:
        # the client's first frames, held until the 101 was checked: the tunnel's first bytes
        if c.flow[0].mode == FLOW_FRAMES:
            r = flow_feed(e, c, 0, req.early, req.early_len)
        else:
            c.flow[0].held = req.early
            c.flow[0].held_len = req.early_len
            c.flow[0].nbytes = req.early_len
            req.early = NULL
            held_count(e, DBG_BUFFERS, 1)
    if r < 0:
        conn_close(e, c)
        return
    e.n.tunnels_total += 1
    e.n.tunnels_active += 1
    pr.tunnels_total += 1
    pr.tunnels_active += 1
    held_count(e, DBG_TUNNELS, 1)
    conn_set_state(e, c, CS_TUNNEL)
    # the attempt stays open as long as the tunnel: the connection frees it when it closes
    sel_detach(&req.sel)
    request_end(e, c)                 # the request is done with; the tunnel keeps its log line
    if c.hk != NULL:
        hooked_trim(c.hk)             # (and its $hook_ values)
    if c.loc.close_hook >= 0:
        hook_tunnel_begins(e, c)      # (out of memory: this tunnel's callback is lost)
    if c.log != NULL and c.log.log.open:
        log_tunnel(e, c, LOG_EVENT_OPEN, 0)
    if e.goodbye_code and c.flow[0].mode == FLOW_FRAMES:
        # a stop began while this handshake was under way (upstream, or a hook's coroutine)
        ws_goodbye_schedule(e, c, e.goodbye_until - e.now if e.goodbye_until > e.now else 0,
                            e.goodbye_code, e.goodbye_why)
        if c.state != CS_TUNNEL:
            return
    tunnel_run(e, c)


cdef void tunnel_run(Eng *e, Conn *c) noexcept nogil:
    cdef int r = flow_pump(e, c, 0)
    if r == 0:
        r = flow_pump(e, c, 1)
    if r == 0 and ws_closing(c) and ws_goodbye_done(c):
        r = c.ws_why                  # the proxy's closing handshake is over
    if r == 0 and (c.flow[0].shut and c.flow[1].shut
                   or c.websocket and c.flow[1].shut and not ws_closing(c)):
        # Both ways are done; or the upstream of a WebSocket closed and all it sent is with
        # the client: RFC 6455 (7.1.1) has the server close the TCP connection once the closing
        # handshake is over, so nothing the client sends after it has a reader (nginx closes
        # an upgraded connection at either side's EOF).  Other upgrades keep their half-close.
        r = CLOSE_CLIENT if c.first_eof == 0 else CLOSE_UPSTREAM
    if r < 0:
        tunnel_close(e, c, r)


cdef double tunnel_deadline(Conn *c) noexcept nogil:
    # nginx times an upgraded connection on upstream reads (proxy_read_timeout) and on blocked
    # writes (send_timeout).  Reading from a side is suspended while its flow is blocked, so the
    # read timer then gives way to the send timer.  Once the upstream has finished, the
    # client's side is held to the same idle limit, so a half-closed tunnel cannot linger.
    cdef double d = NEVER
    cdef double t
    cdef int i
    if ws_closing(c):
        # the proxy's closing handshake: waited for close_timeout, and writes for send_timeout
        d = c.t_state + c.tp.close_timeout
        c.reason = c.ws_why
        for i in range(2):
            if c.flow[i].blocked_since > 0:
                t = c.flow[i].blocked_since + c.send_timeout
                if t < d:
                    d = t
                    c.reason = CLOSE_SEND_TIMEOUT
        return d
    c.reason = CLOSE_READ_TIMEOUT
    if not c.flow[1].eof:
        if c.flow[1].blocked_since == 0:
            d = c.flow[1].last_rx + c.read_timeout
    elif not c.flow[0].eof and c.flow[0].blocked_since == 0:
        d = c.flow[0].last_rx + c.read_timeout
    for i in range(2):
        if c.flow[i].blocked_since > 0:
            t = c.flow[i].blocked_since + c.send_timeout
            if t < d:
                d = t
                c.reason = CLOSE_SEND_TIMEOUT
    if c.tp.idle_timeout > 0:
        # silence both ways (nginx's proxy_read_timeout counts only the upstream's bytes)
        t = (c.flow[0].last_rx if c.flow[0].last_rx > c.flow[1].last_rx
             else c.flow[1].last_rx) + c.tp.idle_timeout
        if t < d:
            d = t
            c.reason = CLOSE_IDLE_TIMEOUT
    if c.end_at < d:
        d = c.end_at
        c.reason = CLOSE_LIFETIME
    if c.tp.ping_interval > 0 and c.flow[0].mode == FLOW_FRAMES:
        d = ws_deadline(c, d)
    return d


cdef void tunnel_timeout(Eng *e, Conn *c) noexcept nogil:
    # Its deadline came (tunnel_deadline said why, in c.reason).  A tunnel that follows its
    # frames pings, or ends with a closing handshake of the proxy's where a blind one closes.
    cdef int why = c.reason
    if why == TUNNEL_PING_CLIENT:
        ws_ping(e, c, 1)
        return
    if why == TUNNEL_PING_UPSTREAM:
        ws_ping(e, c, 0)
        return
    if why >= 0:
        why = CLOSE_READ_TIMEOUT
    cdef bint scheduled = why == CLOSE_LIFETIME and c.ws_why != 0
    if scheduled:
        why = c.ws_why          # a scheduled end: a stop's, a reload's, a departed server's
    if c.flow[0].mode == FLOW_FRAMES and not ws_closing(c) and why != CLOSE_SEND_TIMEOUT:
        if scheduled and c.ws_code:
            ws_goodbye(e, c, c.ws_code, why, 1)     # the scheduled end's code, at its turn
        else:
            ws_goodbye(e, c, 1011 if why == CLOSE_PING_TIMEOUT else 1001, why, 1)
        return
    tunnel_close(e, c, why)


cdef void tunnel_drain(Eng *e, Conn *c, double after, int why) noexcept nogil:
    # The tunnel ends within `after` seconds (as its lifetime would, for reason `why`), with a
    # closing handshake going away (1001) if it follows its frames; the caller arms its timer.
    cdef double at = e.now + after
    if ws_closing(c) or at >= c.end_at:
        return
    c.end_at = at
    c.ws_why = <signed char>why
    if c.flow[0].mode == FLOW_FRAMES:
        c.ws_code = 1001


cdef void tunnel_close(Eng *e, Conn *c, int reason) noexcept nogil:
    cdef Up *u = c.up
    cdef RRPeer *pr
    if c.state != CS_TUNNEL:
        conn_close(e, c)
        return
    c.reason = reason                 # (who ended the stream, for $ws_closed_by)
    e.n.closes[-reason] += 1
    if c.flow[0].mode == FLOW_FRAMES:
        ws_count_close(e, c)
    e.n.tunnels_active -= 1
    held_count(e, DBG_TUNNELS, -1)
    if u != NULL and u.group >= 0:
        pr = &e.groups[u.group].peers[u.peer]
        pr.tunnels_active -= 1
        pr.bytes_up += c.flow[0].nbytes
        pr.bytes_down += c.flow[1].nbytes
    if c.log != NULL:
        log_tunnel(e, c, LOG_EVENT_CLOSE, reason)
    if c.hk != NULL and c.hk.close_hook >= 0:
        hook_tunnel_closed(e, c, reason)
    conn_close(e, c)


# --- handing tunnels to another process (reload) -------------------------------------------

cdef inline bint tunnel_exportable(Conn *c) noexcept nogil:
    # Only a tunnel whose whole state is its two sockets and its counters can move to another
    # process (state kept in this process's memory, as a TLS session's, cannot).
    return (c.state == CS_TUNNEL and c.up != NULL and c.io.ssl == NULL and c.up.io.ssl == NULL
            and not ws_closing(c))


cdef int tunnel_detach(Eng *e, Conn *c) noexcept nogil:
    # Take a tunnel out of the engine whole: its fds are no longer watched (still open), bytes
    # in flight become plain memory; the caller sends them on and then frees the connection.
    cdef int i
    for i in range(2):
        if flow_take_pipe(e, &c.flow[i]) < 0:
            return -1
    watch_del(e, &c.io)              # (Engine.export submits the removals before the fds go)
    watch_del(e, &c.up.io)
    return 0
