# The engine's C types, one section per concern (engine/*.pxi implements each).

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
    # own; `headers` is the parser's array (grown with realloc, freed by head_free), valid
    # until the next parse into this Head.  A Head starts zeroed.
    const char *base
    int size                 # bytes up to and including the blank line
    int method               # Method (requests)
    Span method_name
    Span target
    int version              # major * 10 + minor: 10 or 11 for an accepted request; a response
                             # may also say 9 or 20 (llhttp accepts HTTP/0.9 and HTTP/2.0 there)
    int status               # responses
    Span reason
    int nheaders
    int cap
    Header *headers
    int first[<int>H_COUNT]  # index of the first header of each kind, -1 when absent
    int count[<int>H_COUNT]
    const char *error        # why a head was refused (a static string)

cdef struct TokenIter:
    # The comma-separated tokens of every header of one kind, in order (tokens_next).
    int kind
    int header               # index of the header being read, nheaders once done
    int pos                  # offset of the next byte of its value to read
    int end                  # offset just past its value

cdef struct Chunked:
    # A strict reader of a chunked body (RFC 9112 section 7.1), rewriting it in place.  It reads
    # byte by byte (as llhttp's chunk nodes do), so a line split across reads needs no buffer.
    int state
    long long left           # data bytes left in the current chunk (its size, while read)
    long long total          # data bytes read
    int trailers             # bytes of trailer section read
    int line                 # bytes of the current size or trailer line so far (LF excluded)
    int digits               # hex digits of the current chunk-size so far
    int sig                  # its first significant digit was passed on (rechunk)
    int zero                 # a "0" for it was passed on at the end of a read (rechunk)
    int rechunk              # 1: pass the chunks on re-framed; 0: pass the bare data
    int done
    const char *error        # why the body was refused (a static string)


# --- select: upstream groups and nginx's peer selection (engine/select.pxi) -------------------

cdef enum Balance:
    BAL_ROUND_ROBIN = 0
    BAL_LEAST_CONN
    BAL_IP_HASH
    BAL_HASH
    BAL_CHASH
    BAL_CUSTOM

cdef union SockAddr:
    sockaddr sa
    sockaddr_in sin
    sockaddr_in6 sin6
    sockaddr_un sun

cdef struct Peer:
    # One address of an upstream server: nginx's ngx_http_upstream_rr_peer_t.
    SockAddr addr
    unsigned int addrlen
    int server               # index of its server entry (a host name may give several peers)
    int weight
    int max_fails
    double fail_timeout
    int max_conns
    int backup
    int down
    int cumulative           # weights of the primaries before it (bounded load)
    # nginx's live state
    int conns
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
    int single
    int is_backup

cdef struct Group:
    int method               # Balance
    Peer *peers
    int npeers
    Tier tier[2]
    int ntiers
    unsigned int *points     # the ketama ring, sorted
    int *point_server        # the server entry of each point
    int npoints
    double balance_factor
    int all_down_logged

cdef struct Selection:
    # nginx's per-request peer data: which peers were tried, the hash state, the tier in use
    int tier
    unsigned long long *tried    # a bit per peer of the tier; points at tried1 up to 64 peers
    unsigned long long tried1
    int tries
    unsigned int hash
    int rehash
    int pending              # the peer of the attempt in progress, -1 if none
    int attempts
    char *key                # the hash key (owned), for BAL_HASH and BAL_CHASH
    int keylen
    unsigned char addr[16]   # the client address bytes ip_hash uses
    int addrlen
