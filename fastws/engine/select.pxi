# Upstream groups: nginx 1.22's peer selection, ported function by function.
#
# Each function below carries the name of the nginx function it ports (without the ngx_http_
# prefix) and keeps its order of tests, so that fastws and nginx send the same client or key
# to the same server given the same server list:
#
#   src/http/ngx_http_upstream_round_robin.c     init_round_robin, init_round_robin_peer,
#                                                 get_round_robin_peer, get_peer,
#                                                 free_round_robin_peer
#   src/http/modules/ngx_http_upstream_least_conn_module.c    get_least_conn_peer
#   src/http/modules/ngx_http_upstream_ip_hash_module.c       init_ip_hash_peer, get_ip_hash_peer
#   src/http/modules/ngx_http_upstream_hash_module.c          init_hash_peer, get_hash_peer,
#                                                 find_chash_point, init_chash_peer, get_chash_peer
#
# What differs from nginx, on purpose (docs/balancing.md says why):
#   * time is a monotonic double passed in (nginx: ngx_time(), whole seconds), and a peer that
#     never failed has accessed = checked = -inf (nginx: 0, the epoch);
#   * nginx bounds the attempts of a single-server tier with pc->tries = 1; the tried bit does
#     it here;
#   * `balance_factor` (HAProxy's hash-balance-factor, chash_server_is_eligible in
#     src/lb_chash.c) can make the hash methods skip a server that is at its share of the
#     live connections;
#   * the "mark the peer live if the check passed" half of free_round_robin_peer runs when the
#     connect succeeds (peer_connected), not when the connection ends hours later;
#   * a Selection remembers its open attempt, so that an attempt is freed once whatever path
#     ends it (see peer_free).
#
# The ketama ring itself (init_chash) is built once per configuration in fastws/balancer.py,
# in Python; UpstreamGroup copies it into the Group.

from libc.errno cimport ENOMEM
from libc.math cimport INFINITY, ceil

import logging as _logging
import os as _os
import time as _time
from typing import Any

_upstream_log = _logging.getLogger("fastws.upstream")

cdef enum:
    # nginx: "if (++hp->tries > 20)" in the hash and ip_hash modules.
    HASH_TRIES = 20

cdef extern from *:
    """
    #define FASTWS_CRC32_INIT 0xffffffffU
    """
    const unsigned int CRC32_INIT "FASTWS_CRC32_INIT"


# -- crc32, as ngx_crc32_init / ngx_crc32_update / ngx_crc32_final (src/core/ngx_crc32.h) -------

cdef unsigned int crc32_table[256]


cdef void crc32_table_init() noexcept nogil:
    # The reflected CRC-32 (polynomial 0xedb88320) of zlib, Cache::Memcached and nginx's
    # ngx_crc32_table256.
    cdef unsigned int c, i, k
    for i in range(256):
        c = i
        for k in range(8):
            if c & 1:
                c = (c >> 1) ^ <unsigned int>0xedb88320
            else:
                c >>= 1
        crc32_table[i] = c


crc32_table_init()


cdef inline unsigned int crc32_update(unsigned int crc, const unsigned char *p,
                                      size_t n) noexcept nogil:
    # crc stays inverted between calls: start from CRC32_INIT, end with ^ CRC32_INIT.
    while n:
        crc = crc32_table[(crc ^ p[0]) & 0xff] ^ (crc >> 8)
        p += 1
        n -= 1
    return crc


cdef inline unsigned int crc32_of(const unsigned char *p, size_t n) noexcept nogil:
    # ngx_crc32_long
    return crc32_update(CRC32_INIT, p, n) ^ CRC32_INIT


cdef int format_uint(unsigned char *buf, unsigned int v) noexcept nogil:
    # ngx_sprintf(buf, "%ui", v): the decimal digits, no NUL; buf holds 10 bytes.
    cdef unsigned char tmp[10]
    cdef int n = 0, i
    while True:
        tmp[n] = 48 + v % 10
        v //= 10
        n += 1
        if v == 0:
            break
    for i in range(n):
        buf[i] = tmp[n - 1 - i]
    return n


# -- the tried bitmap (rrp->tried) -----------------------------------------------------------------

cdef inline unsigned long long *sel_bits(Selection *s) noexcept nogil:
    # tried1 is used in place up to 64 peers (rrp->data in nginx), so a Selection without an
    # allocated bitmap can be copied.
    return s.tried if s.tried != NULL else &s.tried1


cdef inline bint sel_tried(Selection *s, int i) noexcept nogil:
    return (sel_bits(s)[i >> 6] >> (i & 63)) & 1


cdef inline void sel_mark(Selection *s, int i) noexcept nogil:
    sel_bits(s)[i >> 6] |= (<unsigned long long>1) << (i & 63)


# -- what every get function checks ---------------------------------------------------------------

cdef inline bint peer_failed_out(const RRPeer *peer, double now) noexcept nogil:
    # max_fails reached within fail_timeout: the test every get function repeats
    return (peer.max_fails != 0 and peer.fails >= peer.max_fails
            and now - peer.checked <= peer.fail_timeout)


cdef bint peer_eligible(const Group *g, const RRPeer *peer) noexcept nogil:
    # HAProxy's chash_server_is_eligible (src/lb_chash.c): may `peer` take one more
    # connection?  Every peer's share of ceil(balance_factor% of (live connections + 1)) slots,
    # split by weight so that the shares add up exactly.
    cdef long long served = 0, slots_total, per_weight, remainder, slots, total, cum
    cdef int i
    for i in range(g.npeers):
        served += g.peers[i].conns
    total = g.tier[0].total_weight
    slots_total = <long long>ceil((served + 1) * g.balance_factor / 100.0)
    per_weight = slots_total // total
    remainder = slots_total % total
    cum = peer.cumulative
    slots = (peer.weight * per_weight
             + ((cum + peer.weight) * remainder) // total - (cum * remainder) // total)
    return peer.conns < (slots if slots > 1 else 1)


cdef inline bint peer_unusable(const Group *g, const RRPeer *peer, double now) noexcept nogil:
    # down, failed out, at max_conns, or (bounded load) at its share of the connections
    if peer.down or peer_failed_out(peer, now):
        return True
    if peer.max_conns and peer.conns >= peer.max_conns:
        return True
    return g.balance_factor != 0 and not peer_eligible(g, peer)


cdef inline long peer_credit(RRPeer *peer) noexcept nogil:
    # One round of smooth weighted round robin for a candidate (the loop body of
    # ngx_http_upstream_get_peer): its current weight grows by its effective weight, which
    # recovers one unit per round after failures.  Returns what it added, for the total.
    cdef long w = peer.effective_weight
    peer.current_weight += w
    if w < peer.weight:
        peer.effective_weight = w + 1
    return w


cdef inline int weight_walk(const Group *g, const Tier *t, long w) noexcept nogil:
    # The peer whose share of the total weight holds w ("while (w >= peer->weight)" in
    # get_ip_hash_peer and get_hash_peer); w < t.total_weight.
    cdef int p = 0
    while w >= g.peers[t.first + p].weight:
        w -= g.peers[t.first + p].weight
        p += 1
    return p


cdef inline int sel_take(Group *g, Selection *s, int i, double now) noexcept nogil:
    # The common end of the get functions for peer i of the tier: peer->conns++, the checked
    # update and the tried bit.  Returns its index into g.peers.
    cdef int idx = g.tier[s.tier].first + i
    cdef RRPeer *peer = &g.peers[idx]
    peer.conns += 1
    if now - peer.checked > peer.fail_timeout:
        peer.checked = now
    sel_mark(s, i)
    return idx


cdef int sel_to_backup(Group *g, Selection *s) noexcept nogil:
    # The "failed:" label of get_round_robin_peer and get_least_conn_peer: on to the backup
    # tier (rrp->peers = peers->next) with a clean tried bitmap, if there is one.
    if s.tier != 0 or g.ntiers < 2:
        return 0
    s.tier = 1
    memset(sel_bits(s), 0, ((g.tier[1].count + 63) >> 6) * sizeof(unsigned long long))
    return 1


# -- nginx's get functions ------------------------------------------------------------------------
# Each returns the index into g.peers of the peer chosen and counted (conns++, tried bit), or
# -1 (nginx: NGX_BUSY).

cdef int upstream_get_peer(Group *g, Selection *s, double now) noexcept nogil:
    # ngx_http_upstream_get_peer: smooth weighted round robin over the untried usable peers.
    cdef Tier *t = &g.tier[s.tier]
    cdef RRPeer *peer
    cdef RRPeer *best = NULL
    cdef int i, p = 0
    cdef long total = 0
    for i in range(t.count):
        if sel_tried(s, i):
            continue
        peer = &g.peers[t.first + i]
        if peer.down or peer_failed_out(peer, now):
            continue
        if peer.max_conns and peer.conns >= peer.max_conns:
            continue
        total += peer_credit(peer)
        if best == NULL or peer.current_weight > best.current_weight:
            best = peer
            p = i
    if best == NULL:
        return -1
    best.current_weight -= total
    return sel_take(g, s, p, now)


cdef int upstream_get_round_robin_peer(Group *g, Selection *s, double now) noexcept nogil:
    # ngx_http_upstream_get_round_robin_peer
    cdef Tier *t = &g.tier[s.tier]
    cdef RRPeer *peer
    cdef int idx
    if t.single:
        peer = &g.peers[t.first]
        # A single peer is never failed out; nginx stops its second attempt with pc->tries = 1,
        # the tried bit does it here.  No checked update, as in nginx.
        if not (peer.down or sel_tried(s, 0) or (peer.max_conns and peer.conns >= peer.max_conns)):
            peer.conns += 1
            sel_mark(s, 0)
            return t.first
    else:
        idx = upstream_get_peer(g, s, now)
        if idx >= 0:
            return idx
    if sel_to_backup(g, s):
        return upstream_get_round_robin_peer(g, s, now)
    return -1


cdef int upstream_get_least_conn_peer(Group *g, Selection *s, double now) noexcept nogil:
    # ngx_http_upstream_get_least_conn_peer: the fewest connections per weight unit; ties are
    # settled by smooth weighted round robin among the tied peers.
    cdef Tier *t = &g.tier[s.tier]
    cdef RRPeer *peer
    cdef RRPeer *best = NULL
    cdef int i, p = 0, many = 0
    cdef long total = 0
    if t.single:
        return upstream_get_round_robin_peer(g, s, now)
    for i in range(t.count):
        if sel_tried(s, i):
            continue
        peer = &g.peers[t.first + i]
        if peer.down or peer_failed_out(peer, now):
            continue
        if peer.max_conns and peer.conns >= peer.max_conns:
            continue
        if best == NULL or <long>peer.conns * best.weight < <long>best.conns * peer.weight:
            best = peer
            many = 0
            p = i
        elif <long>peer.conns * best.weight == <long>best.conns * peer.weight:
            many = 1
    if best == NULL:
        if sel_to_backup(g, s):
            return upstream_get_least_conn_peer(g, s, now)
        return -1
    if many:
        for i in range(p, t.count):
            if sel_tried(s, i):
                continue
            peer = &g.peers[t.first + i]
            if peer.down:
                continue
            if <long>peer.conns * best.weight != <long>best.conns * peer.weight:
                continue
            if peer_failed_out(peer, now):
                continue
            if peer.max_conns and peer.conns >= peer.max_conns:
                continue
            total += peer_credit(peer)
            if peer.current_weight > best.current_weight:
                best = peer
                p = i
    best.current_weight -= total
    return sel_take(g, s, p, now)


cdef int upstream_get_ip_hash_peer(Group *g, Selection *s, double now) noexcept nogil:
    # ngx_http_upstream_get_ip_hash_peer: hash = (hash * 113 + byte) % 6271 over the client's
    # address bytes, from 89 (init_ip_hash_peer), then the weight walk; a peer that is tried,
    # down, failed out or full hashes again from there, 20 times at most, then round robin.
    cdef Tier *t = &g.tier[s.tier]
    cdef unsigned int hash
    cdef int i, p
    if s.tries > HASH_TRIES or t.single:
        return upstream_get_round_robin_peer(g, s, now)
    hash = s.hash
    while True:
        for i in range(s.addrlen):
            hash = (hash * 113 + s.addr[i]) % 6271
        p = weight_walk(g, t, hash % t.total_weight)
        if not sel_tried(s, p) and not peer_unusable(g, &g.peers[t.first + p], now):
            break
        s.tries += 1
        if s.tries > HASH_TRIES:
            return upstream_get_round_robin_peer(g, s, now)
    s.hash = hash           # only a successful pick moves iphp->hash on
    return sel_take(g, s, p, now)


cdef int upstream_get_hash_peer(Group *g, Selection *s, double now) noexcept nogil:
    # ngx_http_upstream_get_hash_peer, Cache::Memcached compatible:
    # ((crc32([REHASH] KEY) >> 16) & 0x7fff) + PREV_HASH, REHASH omitted the first time.  An
    # empty key falls back to round robin (nginx >= 1.17.7).
    cdef Tier *t = &g.tier[s.tier]
    cdef unsigned char buf[10]
    cdef unsigned int crc
    cdef int p, n
    if s.tries > HASH_TRIES or t.single or s.keylen == 0:
        return upstream_get_round_robin_peer(g, s, now)
    while True:
        crc = CRC32_INIT
        if s.rehash > 0:
            n = format_uint(buf, <unsigned int>s.rehash)
            crc = crc32_update(crc, buf, n)
        crc = crc32_update(crc, <const unsigned char *>s.key, s.keylen) ^ CRC32_INIT
        s.hash += (crc >> 16) & 0x7fff       # uint32_t hp->hash: wraps as nginx's does
        s.rehash += 1
        p = weight_walk(g, t, s.hash % t.total_weight)
        if not sel_tried(s, p) and not peer_unusable(g, &g.peers[t.first + p], now):
            break
        s.tries += 1
        if s.tries > HASH_TRIES:
            return upstream_get_round_robin_peer(g, s, now)
    return sel_take(g, s, p, now)


cdef unsigned int upstream_find_chash_point(const Group *g, unsigned int hash) noexcept nogil:
    # ngx_http_upstream_find_chash_point: the first point >= hash (may be npoints: the
    # caller takes it modulo npoints, wrapping round the ring).
    cdef unsigned int i = 0, j = g.npoints, k
    while i < j:
        k = (i + j) // 2
        if hash > g.points[k]:
            i = k + 1
        elif hash < g.points[k]:
            j = k
        else:
            return k
    return i


cdef int upstream_get_chash_peer(Group *g, Selection *s, double now) noexcept nogil:
    # ngx_http_upstream_get_chash_peer: the server entry of the ring point s.hash; among its
    # usable untried addresses, smooth weighted round robin; none: the next point, 20 at most,
    # then round robin.  Peers and points are matched by server entry (nginx compares the
    # server text; fastws refuses two entries for the same server, so it is the same test).
    cdef Tier *t = &g.tier[s.tier]
    cdef RRPeer *peer
    cdef RRPeer *best
    cdef int i, p, server
    cdef long total
    if s.tries > HASH_TRIES or t.single or s.keylen == 0 or g.npoints == 0:
        return upstream_get_round_robin_peer(g, s, now)
    while True:
        server = g.point_server[s.hash % <unsigned int>g.npoints]
        best = NULL
        p = 0
        total = 0
        for i in range(t.count):
            if sel_tried(s, i):
                continue
            peer = &g.peers[t.first + i]
            if peer.server != server or peer_unusable(g, peer, now):
                continue
            total += peer_credit(peer)
            if best == NULL or peer.current_weight > best.current_weight:
                best = peer
                p = i
        if best != NULL:
            best.current_weight -= total
            return sel_take(g, s, p, now)
        s.hash += 1
        s.tries += 1
        if s.tries > HASH_TRIES:
            return upstream_get_round_robin_peer(g, s, now)


# -- the engine's interface -----------------------------------------------------------------------

cdef int sel_init(Group *g, Selection *s, const unsigned char *addr, int addrlen,
                  const char *key, int keylen) noexcept nogil:
    # Start a selection (ngx_http_upstream_init_round_robin_peer and the init_*_peer of each
    # method): tier 0, nothing tried, the method's hash state.  `addr` is what iphash_addr gave
    # (ip_hash only); `key` is the evaluated hash key (hash: copied; consistent: hashed now).
    # Returns 0, or -ENOMEM (then `s` owns nothing: no sel_clear is needed).
    memset(s, 0, sizeof(Selection))
    s.pending = -1
    s.sticky = -1
    if g.tried_bits > 64:
        # nginx sizes rrp->tried for the larger of the two tiers, as here
        s.tried = <unsigned long long *>calloc((g.tried_bits + 63) >> 6,
                                               sizeof(unsigned long long))
        if s.tried == NULL:
            return -ENOMEM
    if g.method == BAL_IP_HASH:
        # ngx_http_upstream_init_ip_hash_peer
        if addrlen > 16:
            addrlen = 16
        if addrlen > 0:
            memcpy(s.addr, addr, addrlen)
            s.addrlen = addrlen
        s.hash = 89
    elif g.method == BAL_HASH:
        # ngx_http_upstream_init_hash_peer: every rehash hashes the key again
        if keylen > 0:
            s.key = <char *>malloc(keylen)
            if s.key == NULL:
                free(s.tried)
                s.tried = NULL
                return -ENOMEM
            memcpy(s.key, key, keylen)
            s.keylen = keylen
    elif g.method == BAL_CHASH:
        # ngx_http_upstream_init_chash_peer: the first ring point >= crc32(key)
        if keylen > 0:
            s.keylen = keylen
            if g.npoints:
                s.hash = upstream_find_chash_point(
                    g, crc32_of(<const unsigned char *>key, keylen))
    return 0


cdef inline void sel_count(Group *g, Selection *s, int idx) noexcept nogil:
    s.attempts += 1
    g.peers[idx].selected_total += 1
    s.pending = idx


cdef inline int sel_nothing_left(Group *g, Selection *s) noexcept nogil:
    # "no server available" is worth one log line when a request finds nothing at its first
    # attempt, and once only until a connect succeeds (peer_connected clears it).
    if s.attempts == 0 and not g.all_down_logged:
        g.all_down_logged = 1
        return SEL_ALL_DOWN
    return SEL_NONE


cdef int sel_next(Group *g, Selection *s, double now) noexcept nogil:
    # nginx's peer.get: the index into g.peers of the next peer to try, counted (conns++, its
    # tried bit, selected_total++); SEL_NONE (-1) when nothing is left, SEL_ALL_DOWN (-2) instead
    # the first time a group runs out (log "no server available").  An attempt still open is
    # freed first, as not failed.  BAL_CUSTOM groups go through UpstreamGroup.select_custom.
    cdef int idx
    if s.pending >= 0:
        peer_free(g, s, s.pending, 0, now)
    if s.sticky >= 0:
        idx = sel_sticky(g, s, now)
        if idx >= 0:
            return idx
    if g.method == BAL_ROUND_ROBIN:
        idx = upstream_get_round_robin_peer(g, s, now)
    elif g.method == BAL_LEAST_CONN:
        idx = upstream_get_least_conn_peer(g, s, now)
    elif g.method == BAL_IP_HASH:
        idx = upstream_get_ip_hash_peer(g, s, now)
    elif g.method == BAL_HASH:
        idx = upstream_get_hash_peer(g, s, now)
    elif g.method == BAL_CHASH:
        idx = upstream_get_chash_peer(g, s, now)
    else:
        return SEL_NONE
    if idx < 0:
        return sel_nothing_left(g, s)
    sel_count(g, s, idx)
    return idx


cdef int sel_sticky(Group *g, Selection *s, double now) noexcept nogil:
    # The first attempt of a request whose sticky cookie names a peer: that peer, if it is in
    # the tier in use and usable (not down, failed out or at max_conns); otherwise, or once it
    # failed, the group's own method (whose tried bit then skips it).
    cdef int idx = s.sticky
    cdef const Tier *t = &g.tier[s.tier]
    s.sticky = -1
    if idx < t.first or idx >= t.first + t.count or sel_tried(s, idx - t.first):
        return -1
    if peer_unusable(g, &g.peers[idx], now):
        return -1
    idx = sel_take(g, s, idx - t.first, now)
    sel_count(g, s, idx)
    return idx


cdef int peer_connected(Group *g, Selection *s, int peer, double now) noexcept nogil:
    # The connect to `peer` succeeded: the "mark peer live if check passed" half of
    # ngx_http_upstream_free_round_robin_peer (accessed < checked: this was the trial after
    # fail_timeout).  The attempt stays open until peer_free.  `s` may be NULL.  Returns
    # SEL_PEER_UP and/or SEL_GROUP_UP for the caller's log lines.
    cdef RRPeer *p
    cdef int flags = 0
    if peer < 0 or peer >= g.nall:
        return 0
    p = &g.peers[peer]
    if p.accessed < p.checked and p.fails:
        if p.max_fails and p.fails >= p.max_fails:
            flags |= SEL_PEER_UP
        p.fails = 0
    if g.all_down_logged:
        g.all_down_logged = 0
        flags |= SEL_GROUP_UP
    return flags


cdef int peer_free(Group *g, Selection *s, int peer, int failed, double now) noexcept nogil:
    # nginx's peer.free (ngx_http_upstream_free_round_robin_peer), once per attempt: conns--,
    # and with `failed` (NGX_PEER_FAILED) the failure accounting.  Returns 1 if this failure
    # marks the peer down (log it), else 0.
    #
    # With a Selection, only its open attempt is freed, and only once: a second call for the same
    # attempt (a failure, then the end of that connection) does nothing.  With s = NULL the
    # caller owns the attempt (sel_detach gave it, or a tunnel was handed over: peer_adopt) and
    # frees it once.
    cdef RRPeer *p
    cdef int marked = 0
    if peer < 0 or peer >= g.nall:
        return 0
    if s != NULL:
        if s.pending != peer:
            return 0
        s.pending = -1
    p = &g.peers[peer]
    if p.conns > 0:
        p.conns -= 1
    if not failed:
        return 0
    p.fails_total += 1
    if g.tier[0].single:
        # nginx never marks down the only server of a group: there is nowhere else to go.
        return 0
    p.fails += 1
    p.accessed = now
    p.checked = now
    if p.max_fails:
        p.effective_weight -= p.weight // p.max_fails
        if p.fails >= p.max_fails:
            marked = 1
    if p.effective_weight < 0:
        p.effective_weight = 0
    return marked


cdef int sel_detach(Selection *s) noexcept nogil:
    # Hand the open attempt (a connection that outlives the request's Selection: a tunnel)
    # to the caller, who frees it later with peer_free(g, NULL, peer, ...).  Returns the peer,
    # or -1 if no attempt is open.
    cdef int peer = s.pending
    s.pending = -1
    return peer


cdef void sel_clear(Group *g, Selection *s) noexcept nogil:
    # End a selection: an attempt still open (the client went away while connecting) is
    # freed as not failed, then what the Selection owns.  Idempotent.
    if s.pending >= 0 and g != NULL:
        peer_free(g, s, s.pending, 0, 0.0)
    s.pending = -1
    if s.tried != NULL:
        free(s.tried)
        s.tried = NULL
    if s.key != NULL:
        free(s.key)
        s.key = NULL
    s.keylen = 0


cdef void peer_adopt(Group *g, int peer) noexcept nogil:
    # A live connection to `peer` joins this group (a tunnel handed over by the previous
    # process on reload): it counts in conns until peer_free(g, NULL, peer, ...).
    if 0 <= peer < g.nall:
        g.peers[peer].conns += 1


cdef int iphash_addr(const SockAddr *sa, unsigned char *out) noexcept nogil:
    # The client address bytes ip_hash uses (ngx_http_upstream_init_ip_hash_peer): the first 3
    # octets of IPv4, the 16 bytes of IPv6, else nginx's 3-byte pseudo address (zeros).  An
    # IPv4-mapped IPv6 address counts as IPv4, as fastws's $remote_addr strips "::ffff:".
    # `out` holds 16 bytes; returns how many were written.
    cdef const unsigned char *b
    cdef int i
    if sa.sa.sa_family == AF_INET:
        memcpy(out, &sa.sin.sin_addr.s_addr, 3)
        return 3
    if sa.sa.sa_family == AF_INET6:
        b = <const unsigned char *>&sa.sin6.sin6_addr.s6_addr[0]
        for i in range(10):
            if b[i]:
                break
        else:
            if b[10] == 0xff and b[11] == 0xff:
                memcpy(out, b + 12, 3)
                return 3
        memcpy(out, b, 16)
        return 16
    memset(out, 0, 3)
    return 3


# -- the Python half: UpstreamGroup, Peer ----------------------------------------------------------

_BALANCE = {"round_robin": BAL_ROUND_ROBIN, "least_conn": BAL_LEAST_CONN,
            "ip_hash": BAL_IP_HASH, "hash": BAL_HASH, "hash consistent": BAL_CHASH,
            "custom": BAL_CUSTOM}
