# Upstream groups as Python sees them: the compiled UpstreamGroup that owns a Group (its peers'
# addresses, configuration and live state, where engine/select.pxi chooses), its Peer views
# (fastws -t, status pages, custom balancers) and, for tests, a SelectionHandle that drives a
# choice exactly as the engine does.

cdef int sockaddr_from(SockAddr *sa, unsigned int *salen, int family, object addr) except -1:
    # A peer's socket address from the tuple (or path) Python's socket module uses.  nginx's
    # addresses carry no IPv6 flow label, nor do these.
    cdef bytes host, path
    memset(sa, 0, sizeof(SockAddr))
    if family == AF_INET:
        host = str(addr[0]).encode("ascii")
        if inet_pton(AF_INET, host, &sa.sin.sin_addr) != 1:
            raise ValueError(f"not an IPv4 address: {addr[0]!r}")
        sa.sin.sin_family = AF_INET
        sa.sin.sin_port = htons(<unsigned short>int(addr[1]))
        salen[0] = sizeof(sockaddr_in)
    elif family == AF_INET6:
        host = str(addr[0]).partition("%")[0].encode("ascii")
        if inet_pton(AF_INET6, host, &sa.sin6.sin6_addr) != 1:
            raise ValueError(f"not an IPv6 address: {addr[0]!r}")
        sa.sin6.sin6_family = AF_INET6
        sa.sin6.sin6_port = htons(<unsigned short>int(addr[1]))
        sa.sin6.sin6_scope_id = int(addr[3]) if len(addr) > 3 else 0
        salen[0] = sizeof(sockaddr_in6)
    elif family == AF_UNIX:
        path = _os.fsencode(addr)
        if not 0 < len(path) < <Py_ssize_t>sizeof(sa.sun.sun_path):
            raise ValueError(f"unix socket path of {len(path)} bytes")
        sa.sun.sun_family = AF_UNIX
        memcpy(sa.sun.sun_path, <const char *>path, len(path))
        salen[0] = <unsigned int>(<char *>sa.sun.sun_path - <char *>sa) + len(path) + 1
    else:
        raise ValueError(f"address family {family}")
    return 0


cdef char *bytes_copy(bytes text) noexcept:
    # a NUL-terminated malloc'ed copy (the caller owns it), or NULL when memory is short
    cdef char *out = <char *>malloc(len(text) + 1)
    if out != NULL:
        memcpy(out, <const char *>text, len(text) + 1)
    return out


cdef const char *_strdup(bytes text) except NULL:
    # bytes_copy, or MemoryError
    cdef char *out = bytes_copy(text)
    if out == NULL:
        raise MemoryError()
    return out


@cython.final
cdef class UpstreamGroup:
    """An upstream group: its peers' addresses, configuration and live state in C, where the
    engine selects from them, and their Python views.

    Built by fastws.balancer.build_upstreams from checked and resolved configuration:
    ``UpstreamGroup(config, balance, peers, ring=(), clock=time.monotonic)`` where ``balance``
    is "round_robin", "least_conn", "ip_hash", "hash", "hash consistent" or "custom", ``peers``
    describes each peer (primaries first, then backups) with the attributes ``server_index``,
    ``server``, ``name``, ``family``, ``sockaddr``, ``weight``, ``max_fails``,
    ``fail_timeout``, ``max_conns``, ``backup`` and ``down``, and ``ring`` is the ketama ring
    of "hash consistent" as sorted (point, server_index) pairs without repeated points.
    """

    def __init__(self, config: Any, str balance, peers: Any, ring: Any = (),
                 clock: Any = _time.monotonic) -> None:
        cdef Group *g = &self.g
        cdef RRPeer *p
        cdef Peer view
        cdef int i, n, nprimary
        cdef long cumulative
        cdef bytes name, sticky
        if g.peers != NULL:
            raise RuntimeError("an UpstreamGroup is built once")
        if balance not in _BALANCE:
            raise ValueError(f"unknown balance {balance!r}")
        specs = list(peers)
        n = len(specs)
        if n < 1:
            raise ValueError("an upstream group needs a peer")
        nprimary = 0
        while nprimary < n and not specs[nprimary].backup:
            nprimary += 1
        if nprimary == 0 or any(not s.backup for s in specs[nprimary:]):
            raise ValueError("primary peers first, then backups, and at least one primary")
        self.name = config.name
        self.config = config
        self.balance = balance
        self.custom = None
        self.clock = clock
        g.method = _BALANCE[balance]
        g.balance_factor = float(config.balance_factor or 0.0)
        g.drain_timeout = float(config.drain_timeout or 0.0)
        g.peers = <RRPeer *>calloc(n, sizeof(RRPeer))
        if g.peers == NULL:
            raise MemoryError()
        g.npeers = g.nall = n
        servers: dict[int, str] = {}
        views = []
        cumulative = 0
        # ngx_http_upstream_init_round_robin: the peers of each tier in the order written
        for i, spec in enumerate(specs):
            if not (1 <= spec.weight and spec.max_fails >= 0 and spec.max_conns >= 0
                    and spec.fail_timeout >= 0 and spec.server_index >= 0):
                raise ValueError(f"peer {spec.name}: weight, max_fails, max_conns or "
                                 "fail_timeout out of range")
            p = &g.peers[i]
            sockaddr_from(&p.addr, &p.addrlen, spec.family, spec.sockaddr)
            name = spec.name.encode()
            p.name = _strdup(name)
            p.name_len = len(name)
            p.host = _strdup(config.peer_host(spec.name, spec.server).encode())
            sticky = _hashlib.md5(name).hexdigest().encode()   # nginx's sticky cookie value
            memcpy(p.sticky_id, <const char *>sticky, 33)
            p.server = spec.server_index
            servers[spec.server_index] = spec.server
            p.weight = spec.weight
            p.max_fails = spec.max_fails
            p.fail_timeout = spec.fail_timeout
            p.max_conns = spec.max_conns
            p.backup = bool(spec.backup)
            p.down = PEER_DOWN if spec.down else 0
            if not p.backup:
                p.cumulative = cumulative
                cumulative += p.weight
            # nginx starts both at 0 (the epoch); a monotonic clock needs "long ago" instead.
            p.accessed = -INFINITY
            p.checked = -INFINITY
            p.current_weight = 0
            p.effective_weight = p.weight
            view = Peer.__new__(Peer)
            view.group = self
            view.index = i
            view.name = spec.name
            view.server = spec.server
            view.upstream = self.name
            view.family = spec.family
            view.sockaddr = spec.sockaddr
            views.append(view)
        self.peers = tuple(views)
        self._server_text = tuple(servers.get(i, "") for i in range(max(servers) + 1))
        tier_init(g, &g.tier[0], 0, nprimary, 0)
        g.ntiers = 1
        if nprimary < n:
            tier_init(g, &g.tier[1], nprimary, n - nprimary, 1)
            g.ntiers = 2
        # "single" is one primary address and no backups (peers->single, backup->single = 0)
        g.tier[0].single = nprimary == 1 and n == 1
        g.tried_bits = n if g.method == BAL_CUSTOM else max(nprimary, n - nprimary)
        points = list(ring)
        if g.method == BAL_CHASH and not points:
            raise ValueError("hash consistent needs its ring")
        if points:
            g.points = <unsigned int *>malloc(len(points) * sizeof(unsigned int))
            g.point_server = <int *>malloc(len(points) * sizeof(int))
            if g.points == NULL or g.point_server == NULL:
                raise MemoryError()
            last = -1
            for i, (value, server) in enumerate(points):
                if not last < value <= 0xffffffff or server not in servers:
                    raise ValueError("the ring's points are sorted, unique, of known servers")
                g.points[i] = value
                g.point_server[i] = server
                last = value
            g.npoints = len(points)

    def __dealloc__(self) -> None:
        cdef int i
        if self.g.peers != NULL:
            for i in range(self.g.nall):
                free(<void *>self.g.peers[i].name)
                free(<void *>self.g.peers[i].host)
            free(self.g.peers)
            self.g.peers = NULL
        free(self.g.points)
        self.g.points = NULL
        free(self.g.point_server)
        self.g.point_server = NULL

    def set_balancer(self, instance: Any) -> None:
        """Attach the custom balancer of a "custom" group (built with this group's peers)."""
        if self.g.method != BAL_CUSTOM or self.custom is not None:
            raise RuntimeError("only a custom group takes a balancer, once")
        if not callable(getattr(instance, "select", None)):
            raise TypeError("a balancer has a select(ctx, tried) method")
        self.custom = instance
        self._on_connected = getattr(instance, "connected", None)
        self._on_released = getattr(instance, "released", None)
        self._on_failed = getattr(instance, "failed", None)

    @property
    def departed(self) -> tuple:
        """The addresses that left the group (Engine.replace_group) while connections still
        used them: kept out of the rotation until a later replacement finds them unused."""
        cdef int i
        return tuple(self.g.peers[i].name.decode() for i in range(self.g.npeers, self.g.nall))

    def ring(self) -> list:
        """The consistent-hash ring as (point, server text) pairs, sorted (empty otherwise)."""
        cdef int i
        return [(self.g.points[i], self._server_text[self.g.point_server[i]])
                for i in range(self.g.npoints)]

    def selection(self, remote_addr: Any = None, key: Any = None, ctx: Any = None
                  ) -> SelectionHandle:
        # Choose a peer from Python exactly as the engine does (tests, tools): `remote_addr`
        # is the client address text (ip_hash), `key` the evaluated hash key, `ctx` what a custom
        # balancer's select() is given.
        return SelectionHandle(self, remote_addr, key, ctx)

    def release(self, Peer peer, failed: bool = False, now: Any = None) -> bool:
        """Free an attempt the caller owns (Selection.detach(), or adopt()): peer_free with no
        Selection.  Returns True if this failure marked the peer down."""
        if peer.group is not self:
            raise ValueError("a peer of another group")
        marked = peer_free(&self.g, NULL, peer.index, bool(failed),
                           self.clock() if now is None else now)
        if marked:
            self.log_marked_down(peer.index)
        if self.custom is not None:
            self.notify_custom(NOTE_FAILED if failed else NOTE_RELEASED, peer.index)
        return marked == 1

    def adopt(self, Peer peer) -> None:
        """A live connection to `peer` joins the group (a tunnel handed over on reload); it is
        freed with release()."""
        if peer.group is not self:
            raise ValueError("a peer of another group")
        peer_adopt(&self.g, peer.index)

    def __repr__(self) -> str:
        return f"<UpstreamGroup {self.name} {self.balance}, {self.g.npeers} peers>"

    cdef int select_custom(self, Selection *s, object ctx) except -3:
        # sel_next for BAL_CUSTOM, with the GIL: the balancer's select(ctx, tried), checked and
        # counted as a built-in choice is.  An answer that is not an untried peer of the group
        # logs an error and counts as nothing left.
        cdef Group *g = &self.g
        cdef int i
        if s.pending >= 0:
            peer_free(g, s, s.pending, 0, 0.0)
        tried = frozenset([self.peers[i] for i in range(g.npeers) if sel_tried(s, i)])
        peer = self.custom.select(ctx, tried)
        if peer is None:
            return sel_nothing_left(g, s)
        if not isinstance(peer, Peer) or (<Peer>peer).group is not self or peer in tried:
            _upstream_log.error("upstream %s: balancer %s returned %r, which is not an untried "
                                "peer of the group", self.name, self.config.balancer, peer)
            return sel_nothing_left(g, s)
        i = (<Peer>peer).index
        g.peers[i].conns += 1
        sel_mark(s, i)
        sel_count(g, s, i)
        return i

    cdef int notify_custom(self, int event, int peer) except -1:
        # Call the custom balancer's optional connected/released/failed(peer), if it has it.
        if event == NOTE_CONNECTED:
            method = self._on_connected
        elif event == NOTE_RELEASED:
            method = self._on_released
        else:
            method = self._on_failed
        if method is not None and 0 <= peer < self.g.npeers:
            method(self.peers[peer])
        return 0

    cdef int log_no_server(self) except -1:
        _upstream_log.error("upstream %s: no server available", self.name)
        return 0

    cdef int log_connected(self, int peer, int flags) except -1:
        if flags & SEL_PEER_UP:
            _upstream_log.info("upstream %s: server %s is up again", self.name,
                               self.g.peers[peer].name.decode())
        if flags & SEL_GROUP_UP:
            _upstream_log.info("upstream %s: a server is available again", self.name)
        return 0

    cdef int log_marked_down(self, int peer) except -1:
        cdef RRPeer *p = &self.g.peers[peer]
        _upstream_log.warning("upstream %s: server %s marked down for %gs after %d failed "
                              "attempt(s)", self.name, p.name.decode(), p.fail_timeout,
                              p.fails)
        return 0


cdef void tier_init(Group *g, Tier *t, int first, int count, int is_backup) noexcept nogil:
    # The per-tier half of ngx_http_upstream_init_round_robin: number and total_weight.
    cdef int i
    t.first = first
    t.count = count
    t.is_backup = is_backup
    t.single = 0
    t.total_weight = 0
    for i in range(first, first + count):
        t.total_weight += g.peers[i].weight


cdef inline RRPeer *view_peer(Peer view) noexcept:
    return &view.group.g.peers[view.index]


@cython.final
@cython.no_gc_clear
cdef class Peer:
    """One address of an upstream server (a host name that resolves to two addresses is two),
    with its live state.  Made by UpstreamGroup; it keeps its group alive."""

    def __init__(self) -> None:
        raise TypeError("peers are made by UpstreamGroup")

    @property
    def host(self) -> str:
        """Its host as written: the name TLS sends and checks, and a health check's Host (for
        an address a `resolve` server's name gave, that name)."""
        return view_peer(self).host.decode()

    @property
    def weight(self) -> int:
        return view_peer(self).weight

    @property
    def max_fails(self) -> int:
        return view_peer(self).max_fails

    @property
    def fail_timeout(self) -> float:
        return view_peer(self).fail_timeout

    @property
    def max_conns(self) -> int:
        return view_peer(self).max_conns

    @property
    def backup(self) -> bool:
        return bool(view_peer(self).backup)

    @property
    def down(self) -> bool:
        """Configured down (the state is then "down" too)."""
        return view_peer(self).down == PEER_DOWN

    @property
    def healthy(self) -> bool:
        """False while active health checks (fastws/health.py) find it failing."""
        return view_peer(self).down != PEER_UNHEALTHY

    def set_health(self, bint ok) -> None:
        """An active health check's verdict: an unhealthy server is not chosen, as a down one
        is (nginx Plus's way; the hash methods rehash past it); a server configured down
        stays down."""
        cdef RRPeer *p = view_peer(self)
        if ok and p.down == PEER_UNHEALTHY:
            p.down = 0
        elif not ok and p.down == 0:
            p.down = PEER_UNHEALTHY

    @property
    def conns(self) -> int:
        """Attempts in progress and live connections (least_conn and max_conns count them)."""
        return view_peer(self).conns

    @property
    def fails(self) -> int:
        return view_peer(self).fails

    @property
    def accessed(self) -> float:
        return view_peer(self).accessed

    @property
    def checked(self) -> float:
        return view_peer(self).checked

    @property
    def current_weight(self) -> int:
        return view_peer(self).current_weight

    @property
    def effective_weight(self) -> int:
        return view_peer(self).effective_weight

    @property
    def fails_total(self) -> int:
        return view_peer(self).fails_total

    @property
    def selected_total(self) -> int:
        return view_peer(self).selected_total

    @property
    def tunnels_total(self) -> int:
        return view_peer(self).tunnels_total

    @property
    def tunnels_active(self) -> int:
        return view_peer(self).tunnels_active

    @property
    def bytes_up(self) -> int:
        return view_peer(self).bytes_up

    @property
    def bytes_down(self) -> int:
        return view_peer(self).bytes_down

    @property
    def state(self) -> str:
        """"up"; "down": configured down, or max_fails reached within fail_timeout; or
        "unhealthy": failing its active health checks."""
        cdef RRPeer *p = view_peer(self)
        if p.down == PEER_DOWN or peer_failed_out(p, float(self.group.clock())):
            return "down"
        if p.down == PEER_UNHEALTHY:
            return "unhealthy"
        return "up"

    @property
    def usable(self) -> bool:
        """True if nginx's rules allow choosing this peer now (up and under max_conns)."""
        cdef RRPeer *p = view_peer(self)
        return self.state == "up" and not (p.max_conns and p.conns >= p.max_conns)

    def __repr__(self) -> str:
        return (f"<Peer {self.name} weight={self.weight} conns={self.conns} "
                f"state={self.state}{' backup' if self.backup else ''}>")


@cython.final
@cython.no_gc_clear
cdef class SelectionHandle:
    """A Selection driven from Python, through the functions the engine calls (tests, tools).

    ``next()`` is a peer to try, or None (answer 502 now); then ``connected(peer)`` when the
    connect succeeds, and ``free(peer, failed)`` exactly once per attempt: failed when it was
    refused or timed out (or failed before the response head), not failed when the connection
    ends or is dropped.  ``detach()`` hands the open attempt over to a connection that
    outlives this object, freed later with ``UpstreamGroup.release(peer)``.  ``now`` defaults
    to the group's clock.  Dropping the handle frees an attempt still open, as not failed.
    """

    cdef UpstreamGroup group
    cdef Selection s
    cdef object ctx
    cdef object _key
    cdef int connected_peer

    def __cinit__(self, UpstreamGroup group, remote_addr: Any, key: Any, ctx: Any) -> None:
        cdef SockAddr sa
        cdef unsigned char addr[16]
        cdef int addrlen = 0, rc
        cdef bytes kb
        self.s.pending = -1
        self.connected_peer = -1
        self.group = group
        self.ctx = ctx
        if key is None:
            kb = b""
        elif isinstance(key, bytes):
            kb = key
        else:
            kb = str(key).encode("utf-8", "surrogateescape")
        self._key = kb
        if group.g.method == BAL_IP_HASH:
            sockaddr_from_text(&sa, remote_addr)
            addrlen = iphash_addr(&sa, addr)
        rc = sel_init(&group.g, &self.s, addr, addrlen, <const char *>kb, len(kb))
        if rc < 0:
            self.s.pending = -1
            raise MemoryError()

    def __dealloc__(self) -> None:
        if self.group is not None:
            sel_clear(&self.group.g, &self.s)

    cdef double _now(self, now: Any) except? -1:
        return float(self.group.clock() if now is None else now)

    cdef int _index(self, Peer peer) except -1:
        if peer is None or peer.group is not self.group:
            raise ValueError("a peer of another group")
        return peer.index

    def next(self, now: Any = None) -> Peer | None:
        """The next peer to try, counted; None when nothing is left (answer 502 at once)."""
        cdef UpstreamGroup group = self.group
        cdef int rc
        if group.g.method == BAL_CUSTOM:
            rc = group.select_custom(&self.s, self.ctx)
        else:
            rc = sel_next(&group.g, &self.s, self._now(now))
        self.connected_peer = -1
        if rc == SEL_ALL_DOWN:
            group.log_no_server()
        if rc < 0:
            return None
        return group.peers[rc]

    def connected(self, Peer peer, now: Any = None) -> None:
        """The connect to `peer` succeeded; free() it when that connection ends."""
        cdef UpstreamGroup group = self.group
        cdef int i = self._index(peer)
        flags = peer_connected(&group.g, &self.s, i, self._now(now))
        group.log_connected(i, flags)
        self.connected_peer = i
        if group.custom is not None:
            group.notify_custom(NOTE_CONNECTED, i)

    def free(self, Peer peer, failed: bool = False, now: Any = None) -> bool:
        """End the attempt at `peer` (once; a second call does nothing): failed, or not.
        Returns True if this failure marked the peer down."""
        cdef UpstreamGroup group = self.group
        cdef int i = self._index(peer)
        if self.s.pending != i:
            return False
        was_connected = self.connected_peer == i
        self.connected_peer = -1
        marked = peer_free(&group.g, &self.s, i, bool(failed), self._now(now))
        if marked:
            group.log_marked_down(i)
        if group.custom is not None:
            if failed:
                group.notify_custom(NOTE_FAILED, i)
            elif was_connected:
                group.notify_custom(NOTE_RELEASED, i)
        return marked == 1

    def detach(self) -> Peer | None:
        """Hand the open attempt to the caller (free it with UpstreamGroup.release)."""
        cdef int i = sel_detach(&self.s)
        self.connected_peer = -1
        return self.group.peers[i] if i >= 0 else None

    @property
    def pending(self) -> Peer | None:
        # The open attempt's peer, or None.
        return self.group.peers[self.s.pending] if self.s.pending >= 0 else None

    @property
    def key(self) -> bytes:
        """The hash key: the Selection's own copy for "hash", else as given."""
        if self.s.key != NULL:
            return self.s.key[:self.s.keylen]
        return self._key

    @property
    def tried(self) -> frozenset:
        """The peers tried in the tier in use (the backups once the primaries are exhausted)."""
        cdef Group *g = &self.group.g
        cdef int i, first = 0, count = g.npeers
        if g.method != BAL_CUSTOM:
            first = g.tier[self.s.tier].first
            count = g.tier[self.s.tier].count
        return frozenset([self.group.peers[first + i] for i in range(count)
                          if sel_tried(&self.s, i)])

    @property
    def backup(self) -> bool:
        """True once the selection has moved on to the backup tier."""
        return self.s.tier == 1


cdef int sockaddr_from_text(SockAddr *sa, object text) except -1:
    # A client address as $remote_addr writes it; anything that is not an IP address (a unix
    # socket client) has family AF_UNIX, which ip_hash hashes as nginx's pseudo address.
    cdef bytes host = str(text or "").partition("%")[0].encode("ascii", "replace")
    memset(sa, 0, sizeof(SockAddr))
    if inet_pton(AF_INET, host, &sa.sin.sin_addr) == 1:
        sa.sa.sa_family = AF_INET
    elif inet_pton(AF_INET6, host, &sa.sin6.sin6_addr) == 1:
        sa.sa.sa_family = AF_INET6
    else:
        sa.sa.sa_family = AF_UNIX
    return 0
