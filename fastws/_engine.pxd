# The engine's C types, one section per concern (engine/*.pxi implements each).

cimport cython

from fastws.includes.linux cimport sockaddr, sockaddr_in, sockaddr_in6, sockaddr_un


# --- parse: HTTP/1.1 heads and chunked bodies (engine/parse.pxi) -----------------------------

cdef enum HeaderKind:
    # Header names the engine acts on, recognised (case-insensitively) by the parser.
    H_OTHER = 0
    H_HOST
    H_CONNECTION
    H_UPGRADE
    H_CONTENT_LENGTH
    H_TRANSFER_ENCODING
    H_EXPECT
    H_KEEP_ALIVE
    H_PROXY_CONNECTION
    H_TE
    H_TRAILER
    H_X_FORWARDED_FOR
    H_X_REAL_IP
    H_X_FORWARDED_PROTO
    H_SEC_WEBSOCKET_KEY
    H_SEC_WEBSOCKET_VERSION
    H_SEC_WEBSOCKET_ACCEPT
    H_COOKIE
    H_AUTHORIZATION
    H_COUNT

cdef enum Method:
    M_OTHER = 0             # a method llhttp knows that the engine does not single out
    M_GET
    M_HEAD
    M_POST
    M_PUT
    M_DELETE
    M_CONNECT
    M_OPTIONS
    M_TRACE
    M_PATCH

cdef struct Span:
    int off                  # from the start of the head
    int len

cdef struct Header:
    Span name
    Span value               # without leading and trailing OWS
    int kind                 # HeaderKind

cdef struct Head:
    # A parsed request or response head.  Spans point into `base`, which the parser does not
    # own; `headers` is the parser's array, valid until the next parse into this Head.
    const char *base
    int size                 # bytes up to and including the blank line
    int method               # Method (requests)
    Span method_name
    Span target
    int version              # 10 (HTTP/1.0) or 11 (HTTP/1.1)
    int status               # responses
    Span reason
    int nheaders
    int cap
    Header *headers
    int first[<int>H_COUNT]  # index of the first header of each kind, -1 when absent
    int count[<int>H_COUNT]
    const char *error        # why a head was refused (a static string)

cdef struct Chunked:
    # A strict reader of a chunked body (RFC 9112 section 7.1), rewriting it in place.
    int state
    long long left           # data bytes left in the current chunk
    long long total          # data bytes read
    int trailers             # bytes of trailer section read
    int rechunk              # 1: pass the chunks on re-framed; 0: pass the bare data
    int done
    char *line               # a size or trailer line split across reads (malloc'ed)
    int line_len


# --- select: upstream groups and nginx's peer selection (engine/select.pxi) -------------------

cdef enum Balance:
    BAL_ROUND_ROBIN = 0
    BAL_LEAST_CONN
    BAL_IP_HASH
    BAL_HASH
    BAL_CHASH
    BAL_CUSTOM               # a Python class chooses: UpstreamGroup.select_custom, with the GIL

cdef enum:
    # sel_next's answers besides a peer index
    SEL_NONE = -1            # nothing is left: answer 502 now
    SEL_ALL_DOWN = -2        # as SEL_NONE, and the group has just run out: log "no server
                             # available" (once, until a connect to it succeeds again)
    # peer_connected's flags, for its caller's log lines
    SEL_PEER_UP = 1          # "server ... is up again" (the trial after fail_timeout passed)
    SEL_GROUP_UP = 2         # "a server is available again"
    # UpstreamGroup.notify_custom's events (a custom balancer's optional methods)
    NOTE_CONNECTED = 0
    NOTE_RELEASED = 1
    NOTE_FAILED = 2

cdef union SockAddr:
    sockaddr sa
    sockaddr_in sin
    sockaddr_in6 sin6
    sockaddr_un sun

cdef struct RRPeer:
    # One address of an upstream server: nginx's ngx_http_upstream_rr_peer_t.
    SockAddr addr
    unsigned int addrlen
    const char *name         # as $upstream_addr names it: "1.2.3.4:80", "[::1]:80",
    int name_len             # "unix:/path" (NUL-terminated; owned by the UpstreamGroup)
    int server               # index of its server entry (a host name may give several peers)
    int weight
    int max_fails
    double fail_timeout
    int max_conns
    int backup
    int down
    long cumulative          # weights of the primaries before it (bounded load)
    # nginx's live state
    int conns                # attempts and connections open: sel_next ... peer_free
    int fails
    double accessed
    double checked
    long current_weight
    long effective_weight
    # figures for the status pages
    unsigned long long fails_total
    unsigned long long selected_total
    unsigned long long tunnels_total
    unsigned long long tunnels_active
    unsigned long long bytes_up
    unsigned long long bytes_down

cdef struct Tier:
    # nginx's ngx_http_upstream_rr_peers_t: the primary servers, or the backups
    int first                # peers[first:first + count]
    int count
    long total_weight
    int single               # one primary peer and no backups: never marked down
    int is_backup

cdef struct Group:
    int method               # Balance
    RRPeer *peers            # primaries, then backups
    int npeers
    Tier tier[2]
    int ntiers
    int tried_bits           # bits a Selection's tried bitmap needs (the larger tier; custom: all)
    unsigned int *points     # the ketama ring, sorted, without repeated points
    int *point_server        # the server entry of each point
    int npoints
    double balance_factor    # 0, or the bounded-load percentage (above 100)
    int all_down_logged

cdef struct Selection:
    # nginx's per-request peer data: which peers were tried, the hash state, the tier in use,
    # and the attempt in progress.  Plain data, safe to copy while no attempt is open.
    int tier
    unsigned long long *tried    # a bit per peer of the tier: NULL while tried1 holds them
    unsigned long long tried1    # (up to 64 peers), else calloc'ed
    int tries                # the hash methods' rehashes (nginx: hp->tries, iphp->tries)
    unsigned int hash        # ip_hash: iphp->hash; hash: hp->hash; consistent: the ring index
    int rehash
    int pending              # the open attempt: from sel_next until peer_free, -1 if none
    int attempts
    char *key                # the hash key (malloc'ed copy), for BAL_HASH
    int keylen               # also BAL_CHASH's, which hashes the key once, in sel_init
    unsigned char addr[16]   # the client address bytes ip_hash uses (iphash_addr)
    int addrlen


@cython.final
cdef class UpstreamGroup:
    # An upstream group: the Group the engine selects from, and its Python half.
    cdef Group g
    cdef readonly str name
    cdef readonly object config          # the UpstreamConfig
    cdef readonly str balance            # "round_robin", "least_conn", "ip_hash", "hash",
                                         # "hash consistent" or "custom"
    cdef readonly object custom          # the custom balancer instance, or None
    cdef readonly tuple peers            # a Peer view per peer, primaries then backups
    cdef public object clock             # what views and selection() use when not told now
    cdef tuple _server_text              # each server entry as written
    cdef object _on_connected, _on_released, _on_failed
    cdef int select_custom(self, Selection *s, object ctx) except -3
    cdef int notify_custom(self, int event, int peer) except -1
    cdef int log_no_server(self) except -1
    cdef int log_connected(self, int peer, int flags) except -1
    cdef int log_marked_down(self, int peer) except -1


@cython.final
@cython.no_gc_clear
cdef class Peer:
    # A Python view of one peer of a group; it keeps the group alive.
    cdef readonly UpstreamGroup group
    cdef readonly int index              # into group.peers and Group.peers
    cdef readonly str name
    cdef readonly str server
    cdef readonly str upstream
    cdef readonly int family
    cdef readonly object sockaddr
