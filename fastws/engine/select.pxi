# TEMPORARY STUB (replaced by the real selection)
cdef void sel_init(Group *g, Selection *s, const unsigned char *addr, int addrlen, const char *key, int keylen) noexcept nogil:
    memset(s, 0, sizeof(Selection))
    s.pending = -1

cdef void sel_clear(Selection *s) noexcept nogil:
    pass

cdef int sel_next(Group *g, Selection *s, double now) noexcept nogil:
    cdef int i
    for i in range(g.npeers):
        if not (s.tried1 >> i) & 1:
            s.tried1 |= 1ULL << i
            g.peers[i].conns += 1
            return i
    return -1

cdef void peer_connected(Group *g, Selection *s, int peer, double now) noexcept nogil:
    pass

cdef int peer_free(Group *g, Selection *s, int peer, int failed, double now) noexcept nogil:
    g.peers[peer].conns -= 1
    return 0

cdef int iphash_addr(const SockAddr *sa, unsigned char *out) noexcept nogil:
    return 0

@cython.final
cdef class PeerView:
    cdef UpstreamGroup grp
    cdef int i
    cdef object py
    @property
    def name(self): return self.py.name
    @property
    def server(self): return self.py.server
    @property
    def backup(self): return self.py.backup
    @property
    def state(self): return "up"
    @property
    def conns(self): return self.grp.peers[self.i].conns
    @property
    def tunnels_active(self): return self.grp.peers[self.i].tunnels_active
    @property
    def tunnels_total(self): return self.grp.peers[self.i].tunnels_total
    @property
    def bytes_up(self): return self.grp.peers[self.i].bytes_up
    @property
    def bytes_down(self): return self.grp.peers[self.i].bytes_down
    @property
    def fails_total(self): return self.grp.peers[self.i].fails_total
    @property
    def selected_total(self): return self.grp.peers[self.i].selected_total

@cython.final
cdef class UpstreamGroup:
    cdef Group g
    cdef Peer *peers
    cdef readonly str name
    cdef readonly object config
    cdef readonly list peers_
    def __cinit__(self, up):
        cdef int i
        cdef PeerView v
        self.name = up.name
        self.config = up.config
        self.peers = <Peer *>calloc(len(up.peers), sizeof(Peer))
        self.g.peers = self.peers
        self.g.npeers = len(up.peers)
        self.peers_ = []
        for i, p in enumerate(up.peers):
            if p.family == AF_INET:
                self.peers[i].addr.sin.sin_family = AF_INET
                self.peers[i].addr.sin.sin_port = htons(p.sockaddr[1])
                inet_pton(AF_INET, p.sockaddr[0].encode(), &self.peers[i].addr.sin.sin_addr)
                self.peers[i].addrlen = sizeof(sockaddr_in)
            elif p.family == AF_INET6:
                self.peers[i].addr.sin6.sin6_family = AF_INET6
                self.peers[i].addr.sin6.sin6_port = htons(p.sockaddr[1])
                inet_pton(AF_INET6, p.sockaddr[0].encode(), &self.peers[i].addr.sin6.sin6_addr)
                self.peers[i].addrlen = sizeof(sockaddr_in6)
            else:
                self.peers[i].addr.sun.sun_family = AF_UNIX
                path = p.sockaddr.encode()
                memcpy(self.peers[i].addr.sun.sun_path, <const char *>path, len(path))
                self.peers[i].addrlen = 2 + len(path)
            v = PeerView.__new__(PeerView)
            v.grp = self
            v.i = i
            v.py = p
            self.peers_.append(v)
    @property
    def peers(self):
        return self.peers_

cdef Group *group_of(object grp) except NULL:
    return &(<UpstreamGroup>grp).g

cdef int select_custom(Eng *e, int gi, Selection *s, object ctx) except -3:
    return -1
