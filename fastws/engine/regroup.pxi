# An upstream group replaced in place while connections use it: a `resolve` server's name now
# gives other addresses (fastws/dns.py).  nginx 1.27 does this on its shared list of peers
# (ngx_http_upstream_zone_resolve_handler in ngx_http_upstream_zone_module.c): an address that
# stays keeps its state, a new one starts afresh, one that left is taken out of the rotation
# and freed once no connection uses it.  Here Python builds the new group whole
# (balancer.build_upstream: tiers, weights, the consistent-hash ring) and the engine carries
# over what it knows: each remaining address's live state, and every reference a connection
# holds to a peer (their indexes change).  An address that left while connections use it is
# kept at the end of the new group's peers, in no tier, so never chosen ("departed"); its
# tunnels close after the group's drain_timeout, politely if they follow their frames; the
# next replacement drops it if nothing uses it any more.


cdef inline void regroup_use(unsigned char *used, int peer) noexcept nogil:
    if peer >= 0:
        used[peer] = 1


cdef void regroup_mark(Conn *c, int gi, unsigned char *used) noexcept nogil:
    # The peers of group `gi` connection `c` still needs: its upstream connection, its
    # attempt in progress, the one its log line names.
    if c.up != NULL and c.up.group == gi:
        regroup_use(used, c.up.peer)
    if c.req != NULL and c.req.group == gi:
        regroup_use(used, c.req.peer)
        if c.req.sel_live:
            regroup_use(used, c.req.sel.pending)
    if c.log != NULL and c.log.group == gi:
        regroup_use(used, c.log.peer)


cdef inline int regroup_moved(const int *where, int peer) noexcept nogil:
    return where[peer] if peer >= 0 else -1


cdef inline int regroup_choosable(const Group *ng, const int *where, int peer) noexcept nogil:
    # a preference (a sticky cookie's, a hook's server): kept only for a peer still configured
    cdef int k = regroup_moved(where, peer)
    return k if k < ng.npeers else -1


cdef void regroup_carry(const RRPeer *src, RRPeer *dst) noexcept nogil:
    # An address that stays: nginx's live state and the status figures go on.
    dst.conns = src.conns
    dst.fails = src.fails
    dst.accessed = src.accessed
    dst.checked = src.checked
    dst.current_weight = src.current_weight
    dst.effective_weight = src.effective_weight if src.weight == dst.weight else dst.weight
    if src.down == PEER_UNHEALTHY and dst.down == 0:
        dst.down = PEER_UNHEALTHY          # the health checks' verdict stands
    dst.fails_total = src.fails_total
    dst.selected_total = src.selected_total
    dst.tunnels_total = src.tunnels_total
    dst.tunnels_active = src.tunnels_active
    dst.bytes_up = src.bytes_up
    dst.bytes_down = src.bytes_down


cdef int regroup_selection(const Group *og, Group *ng, Selection *s,
                           const int *where) noexcept nogil:
    # A request between two attempts: its tried bits follow their peers into the new tiers
    # (an address that left is no longer there to try), its open attempt and its sticky peer
    # are moved.  A consistent hash's ring index is left as it is: an index into the new ring
    # (always taken modulo its size), so a request caught between two attempts by a change
    # goes on from some point of the new ring.  Returns 0, or -ENOMEM.
    cdef int tier = s.tier if s.tier < ng.ntiers else 0
    cdef int ofirst = 0, ocount = og.npeers, nfirst = 0, ncount = ng.npeers, b, k
    cdef int words = (ng.tried_bits + 63) >> 6
    cdef unsigned long long *bits = <unsigned long long *>calloc(words if words else 1,
                                                                 sizeof(unsigned long long))
    s.pending = regroup_moved(where, s.pending)
    s.sticky = regroup_choosable(ng, where, s.sticky)
    if bits == NULL:
        free(s.tried)                  # (the caller closes the connection)
        s.tried = NULL
        return -ENOMEM
    if og.method != BAL_CUSTOM:
        ofirst = og.tier[s.tier].first
        ocount = og.tier[s.tier].count
        nfirst = ng.tier[tier].first
        ncount = ng.tier[tier].count
    for b in range(ocount):
        if sel_tried(s, b):
            k = where[ofirst + b] - nfirst
            if 0 <= k < ncount:
                bits[k >> 6] |= 1ULL << (k & 63)
    free(s.tried)
    s.tried = NULL
    if ng.tried_bits > 64:
        s.tried = bits
    else:
        s.tried1 = bits[0]
        free(bits)
    s.tier = tier
    return 0


cdef int regroup_conn(Eng *e, Conn *c, int gi, const Group *og, Group *ng,
                      const int *where) noexcept nogil:
    # Move connection `c`'s references to group `gi`'s peers into the new group.  Returns 1 if
    # it is a tunnel to a server that left (closing within drain_timeout, if not 0), else 0.
    cdef Req *r = c.req
    cdef int departed = 0
    if c.up != NULL and c.up.group == gi and c.up.peer >= 0:
        c.up.peer = where[c.up.peer]
        if c.state == CS_TUNNEL and c.up.peer >= ng.npeers:
            departed = 1
            if ng.drain_timeout > 0:       # (0: it goes on until it ends)
                tunnel_drain(e, c, ng.drain_timeout, CLOSE_REMOVED)
                conn_arm(e, c)
    if r != NULL and r.group == gi:
        r.peer = regroup_moved(where, r.peer)
        r.sticky_from = regroup_moved(where, r.sticky_from)
        if c.hk != NULL and c.hk.peer >= 0:            # (a hook's server, of r.group)
            c.hk.peer = regroup_choosable(ng, where, c.hk.peer)
        if r.sel_live and regroup_selection(og, ng, &r.sel, where) < 0:
            conn_close(e, c)        # out of memory: this request fails (the new group is in
            return departed         # place, and its references moved: accounted right)
    if c.log != NULL and c.log.group == gi:
        c.log.peer = regroup_moved(where, c.log.peer)
    return departed


cdef void regroup_pool(Eng *e, int gi, const Group *ng, const int *where) noexcept nogil:
    # Idle kept-alive connections: to an address that stays, kept; to one that left, closed.
    cdef Pool *pool = &e.pools[gi]
    cdef Up *u = pool.head
    cdef Up *nxt
    while u != NULL:
        nxt = u.next
        u.peer = regroup_moved(where, u.peer)
        if u.peer < 0 or u.peer >= ng.npeers:
            pool_unlink(pool, u)
            up_close(e, u)
        u = nxt
