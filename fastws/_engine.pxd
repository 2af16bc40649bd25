# The engine's C types, one section per concern (engine/*.pxi implements each).

cimport cython

from fastws.includes.linux cimport sockaddr, sockaddr_in, sockaddr_in6, sockaddr_un
from fastws.includes.buf cimport fastws_buf


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
    BAL_CUSTOM               # a Python class chooses: UpstreamGroup.select_custom, with the GIL

cdef enum:
    # RRPeer.down: why a peer is not chosen
    PEER_DOWN = 1            # configured `down`
    PEER_UNHEALTHY = 2       # failing its active health checks (fastws/health.py)

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
    const char *host         # its host as written: TLS's SNI and name check (owned likewise)
    char sticky_id[33]       # its value of a sticky cookie: MD5 of its name in hex, NUL-ended
    int server               # index of its server entry (a host name may give several peers)
    int weight
    int max_fails
    double fail_timeout
    int max_conns
    int backup
    int down                 # PEER_DOWN (configured), PEER_UNHEALTHY (health checks), or 0
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
    RRPeer *peers            # primaries, then backups, then the departed (below)
    int npeers               # the configured peers: the tiers hold them
    int nall                 # npeers, and after them the peers a DNS change removed while
                             # connections to them were open ("departed": in no tier, never
                             # chosen, kept until the next change finds them unused)
    Tier tier[2]
    int ntiers
    int tried_bits           # bits a Selection's tried bitmap needs (the larger tier; custom: all)
    unsigned int *points     # the ketama ring, sorted, without repeated points
    int *point_server        # the server entry of each point
    int npoints
    double balance_factor    # 0, or the bounded-load percentage (above 100)
    int all_down_logged
    double drain_timeout     # tunnels to a departed peer close after it (0: they go on)
    unsigned int gen         # replacements so far (engine/regroup.pxi): a custom balancer
                             # hears only of the attempts that began under its own

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
    int sticky               # the peer the request's sticky cookie names, for its first
                             # attempt; -1 if none


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

cdef enum IoKind:
    IO_LISTENER = 1
    IO_CLIENT
    IO_UPSTREAM
    IO_TIMER
    IO_WAKE
    IO_CONTROL               # the control plane's event loop (its own epoll fd)

from fastws.includes.openssl cimport FASTWS_SSL, FASTWS_SSL_CTX
from fastws.includes.pcre2 cimport fastws_regex
from fastws.includes.zone cimport fastws_zone
from fastws.includes.wsframe cimport fastws_wsframe
from fastws.includes.uring cimport fastws_uring

cdef struct Io:
    # What epoll's data.ptr points at: every pollable object starts with one.  Readiness is
    # edge-triggered (registered once, never modified, as nginx's epoll module): rd_ready and
    # wr_ready remember an edge until a read or a write finds the socket drained or full.
    int kind                 # IoKind
    int fd
    unsigned char rd_ready
    unsigned char wr_ready
    unsigned char registered
    int slot                 # io_uring: its place in Eng.slots (its polls' user_data), 0: none
    unsigned char eof        # a read returned 0 (or the TLS peer's close_notify)
    unsigned char rdhup      # the peer's FIN is queued behind the data (EPOLLRDHUP): a short
                             # read does not drain the socket, the next one returns 0
    unsigned char rderr      # EPOLLERR or EPOLLHUP came too (a reset: reads say what it is)
    unsigned char eof_next   # a short read after the FIN took the last bytes: EOF is next
    FASTWS_SSL *ssl          # NULL: plain
    unsigned int tls_want    # an SSL call that must wait: for reading (EPOLLIN) or writing (EPOLLOUT)
    int tls_pending          # OpenSSL holds decrypted bytes epoll cannot see


# --- tables: what Python builds from the configuration (engine/tables.pxi) -------------------

cdef enum VarPhase:
    PHASE_REQUEST = 0        # known once the request is routed
    PHASE_LOG = 1            # known when the log line is written

cdef struct TplPart:
    # One piece of a value with nginx variables: literal text, or a variable and its argument
    # (the NAME of $http_NAME, $arg_NAME, $cookie_NAME)
    int var                  # -1: literal
    char *text               # the literal, or the argument (owned by the table)
    int len

cdef struct Template:
    TplPart *parts
    int nparts

cdef struct HeaderOp:
    # set_headers: replace (or with no value, remove) a header going upstream
    char *name               # as written
    char *lname              # lower case
    int len
    int kind                 # HeaderKind of the name, H_OTHER if none
    Template *value          # NULL: remove

cdef struct LogFile:
    int fd                   # -1 when it cannot be written
    char *buf
    int len
    int cap
    unsigned long long errors

cdef enum:
    ESCAPE_DEFAULT = 0
    ESCAPE_JSON = 1
    ESCAPE_NONE = 2

cdef struct LogFormat:
    Template tpl             # the format; variables of both phases
    int json                 # a JSON-lines format: tpl.parts are variables only, keys are their names
    int escape               # nginx's log_format escape=: ESCAPE_DEFAULT, ESCAPE_JSON, ESCAPE_NONE
    char **names             # json keys
    int nearly               # variables of PHASE_REQUEST, rendered when the request is routed
    int *early               # their indexes in tpl.parts

cdef struct AccessLog:
    LogFile *file
    LogFormat *format
    int open                 # a line when a tunnel opens, too

cdef enum LocKind:
    LOC_PROXY = 0
    LOC_RETURN
    LOC_STATUS

cdef enum LimitKind:
    LIMIT_CONN = 0
    LIMIT_REQ = 1

cdef struct Zone:
    # A limit zone: its shared memory (includes/zone.h), and the key its entries count by
    fastws_zone *shm
    char *name
    Template *key
    int kind                 # LimitKind

cdef struct LimitRule:
    int zone                 # in the engine's zones
    int kind
    long long max            # limit_conn: connections; limit_req: burst, in 1/1000 requests
    long long delay          # limit_req: excess served at once, in 1/1000 (nodelay: no limit)

cdef struct LimitHold:
    # A connection counted in a limit_conn zone, given back when its request ends
    int zone
    unsigned long long hash

cdef struct TunnelPolicy:
    # How a tunnel is kept and ended: its location's, or one an adopted tunnel brought along.
    double idle_timeout      # silence both ways this long closes it; 0: no limit
    int frames               # a WebSocket tunnel follows its frames (engine/frames.pxi);
                             # 0: bytes relayed blind
    unsigned long long max_message   # a message over this closes with 1009; 0: no limit
    double ping_interval     # a side silent this long is pinged; 0: never
    double ping_timeout      # ... and closed (1011) when no pong came this long after
    double close_timeout     # the closing handshake is waited for this long
    int ping_to              # PING_CLIENT | PING_UPSTREAM
    int checks               # masking and opcode rules enforced (1002)

cdef struct Loc:
    char *path
    int pathlen
    int exact
    int noregex              # "^~ /path": a longest-prefix match ends the search
    fastws_regex *regex      # "~ pattern" or "~* pattern", else NULL
    int kind                 # LocKind
    int group                # upstream group index (LOC_PROXY), -1 with `pass`
    Template *pass_tpl       # proxy_pass with variables: rendered per request, else NULL
    AccessRule *rules        # allow/deny, first match decides; none: everyone
    int nrules
    int forwarded_replace    # from an untrusted peer, the client's forwarding headers are not
                             # believed: X-Forwarded-For starts at the client, Forwarded is dropped
    char **origins           # allowed Origins of WebSocket handshakes (lower case), or none
    int *origin_lens
    int norigins
    int origin_missing_deny
    LimitRule *limits        # limit_conn and limit_req, in the configuration's order
    int nlimits
    int limit_conn_status    # 503 unless configured (nginx's limit_conn_status)
    int limit_req_status
    char *proxy_uri          # replaces the matched prefix, or NULL
    int proxy_uri_len
    char *proxy_host         # $proxy_host
    int websocket
    char **tokens            # upgrade tokens that may be tunnelled (lower case)
    int *token_lens
    int ntokens
    double connect_timeout
    double send_timeout
    double read_timeout
    double max_lifetime      # a tunnel closes this long after its 101; 0: no limit
    double lifetime_spread   # ... less a random part of this, so a fleet does not reconnect at once
    TunnelPolicy tunnel
    int next_upstream_tries
    double next_upstream_timeout
    HeaderOp *ops
    int nops
    int relay                # RELAY_AUTO, RELAY_SPLICE, RELAY_COPY
    int socket_keepalive
    int return_status
    char *return_body
    int return_body_len
    int status_format        # LOC_STATUS: index into the control's formats
    int upstream_tls         # connect to the upstream with TLS
    FASTWS_SSL_CTX *tls_ctx  # its context (borrowed from Python's SSLContext)
    char *tls_name           # SNI and the name verified; NULL: each server's host
    int tls_verify
    AccessLog *log           # NULL: off
    double keepalive_timeout
    int keepalive_requests
    long long client_max_body_size   # 0: no limit
    double client_body_timeout
    int hook                 # the Python hook called before the upstream is chosen
                             # (engine/hooks.pxi): its index in the engine's list, -1: none
    int hook_requests        # ... for plain requests too, not only WebSocket handshakes
    double hook_timeout      # a coroutine hook's answer is waited for this long (then 504)
    int close_hook           # called with each closed tunnel's figures: its index, -1: none

cdef struct Server:
    char *name               # first server_name ("" if none), for $server_name
    int namelen
    Loc **exact              # exact locations, sorted by path
    int nexact
    Loc **prefix             # prefix locations, longest first
    int nprefix
    Loc **regex              # regular-expression locations, in the configuration's order
    int nregex
    double client_header_timeout
    int max_request_line
    int max_request_head
    int redirect_https       # HTTPS port to redirect to, 0: none
    FASTWS_SSL_CTX *tls_ctx  # TLS termination (SNI picks it among the servers of an address)
    double handshake_timeout
    AccessLog *log           # the server's log (requests that match no location)
    AccessRule *trusted      # realip: peers trusted to name the client (rules with allow = 1)
    int ntrusted
    char *real_ip_header     # lower case; "x-forwarded-for" is read right to left
    int real_ip_header_len
    int real_ip_recursive
    int real_ip_pp           # real_ip_header proxy_protocol: the PROXY header names the client

cdef struct AccessRule:
    # nginx's allow/deny (ngx_http_access_module): a network, or every address (family 0)
    int allow
    int family               # AF_INET, AF_INET6, or 0 for "all"
    unsigned char addr[16]
    int prefix               # bits of addr that must match

cdef struct Sticky:
    # nginx's sticky cookie: the cookie's name, the Set-Cookie header up to its value, the
    # attributes after it, and each peer's value (32 hex digits)
    char *name
    int namelen
    char *set_head           # "Set-Cookie: NAME="
    int set_head_len
    char *attrs              # "; Max-Age=3600; Path=/\r\n"
    int attrs_len            # (each peer's value: RRPeer.sticky_id)

cdef struct MapEntry:
    char *key                # lower case; ".example.com" / "www.example." for wildcards
    int len
    Template *value

cdef struct MapRegex:
    fastws_regex *regex
    Template *value

cdef struct MapTable:
    # nginx's map: the source rendered, then the exact values (binary search), with hostnames
    # the longest "*.example.com" and "www.example.*", then the regular expressions in
    # order, else the default
    Template *source
    MapEntry *exact
    int nexact
    MapEntry *head
    int nhead
    MapEntry *tail
    int ntail
    MapRegex *regex
    int nregex
    Template *dflt           # NULL: the empty value
    int hostnames

cdef struct NameEntry:
    char *name               # exact name, ".example.com" suffix, or "www.example." prefix
    int len
    Server *server

cdef struct Listener:
    # One listening socket and the servers on its address.
    Io io
    int family
    int tls
    int proxy_protocol       # a PROXY protocol header comes first
    char *addr_text          # $server_addr
    int addr_len
    int port                 # $server_port
    NameEntry *exact
    int nexact
    NameEntry *head          # "*.example.com" as ".example.com", longest first
    int nhead
    NameEntry *tail          # "www.example.*" as "www.example.", longest first
    int ntail
    fastws_regex **regex     # "~pattern" names, in the configuration's order
    Server **regex_server
    int nregex
    Server *default_server


# --- connections (engine/conn.pxi, engine/upstream.pxi, engine/http.pxi, engine/tunnel.pxi) --

from cpython.ref cimport PyObject

cdef struct Conn
cdef struct Req
cdef struct Hooked
cdef struct LogRec

cdef struct Timer:
    double deadline          # where the timer sits in the heap; the owner's real deadline may
                             # be later (the heap catches up lazily) but never earlier
    int idx                  # in the heap, -1 when not in it
    int kind                 # IO_CLIENT or IO_UPSTREAM: what `owner` is
    void *owner

cdef struct Pipe:
    int prod                 # write end: splice into it
    int cons                 # read end: splice out of it
    Py_ssize_t data          # bytes the pipe holds now
    Py_ssize_t cap           # what it can hold (pipe_size, unless the kernel refused that)
    Py_ssize_t tail          # of those, at the end, a frame's start a splice cut (FLOW_FRAMES):
                             # not to go on until the rest of it is here and looked at
    Pipe *next               # free list link

cdef enum FlowMode:
    FLOW_RAW = 0             # a tunnel: bytes as they come, EOF passed on as a half-close
    FLOW_FRAMES              # a WebSocket tunnel that follows its frames (engine/frames.pxi)
    FLOW_LENGTH              # a body of `left` bytes
    FLOW_CHUNKED             # a chunked body, re-framed (or unchunked for HTTP/1.0 clients)
    FLOW_CLOSE               # a response body that ends when the upstream closes

cdef struct Flow:
    # Bytes moving from one side to the other: 0 client -> upstream, 1 upstream -> client.
    Pipe *pipe               # only while spliced bytes are in flight
    char *held               # bytes read that the destination has not taken yet (malloc'ed)
    int held_len
    int held_off
    unsigned long long nbytes
    double last_rx           # when the source last gave bytes
    double blocked_since     # when a write to the destination blocked; 0 when not blocked
    int streak               # consecutive reads that argue for switching method
    unsigned char splicing
    unsigned char eof        # the source ended (or the body did)
    unsigned char shut       # the half-close was passed on
    unsigned char mode       # FlowMode
    long long left           # FLOW_LENGTH: bytes still to come; a tunnel that follows its
                             # frames: bytes to the next frame boundary
    Chunked *chunk           # FLOW_CHUNKED
    fastws_wsframe ws        # a tunnel that follows its frames: what its frames said

cdef enum ConnState:
    CS_TLS = 1               # TLS handshake with the client
    CS_HEAD                  # reading a request head
    CS_IDLE                  # kept alive, waiting for the next request
    CS_UPSTREAM              # choosing, connecting, sending the head, waiting for the answer
    CS_EXCHANGE              # relaying an HTTP response (and what is left of the request body)
    CS_TUNNEL                # an upgraded connection
    CS_ANSWER                # writing an answer of the proxy's own
    CS_LINGER                # answer written; reading what the client still sends, then close
    CS_CLOSED
    CS_ROUTE                 # a head is read: the request is being routed (nginx: writing)
    CS_PROXY                 # reading the PROXY protocol header (engine/proxy.pxi)
    CS_HOOK                  # waiting for a coroutine hook's decision (engine/hooks.pxi)

cdef struct Up:
    # A connection to an upstream server: connecting, in use, or idle in its group's pool.
    Io io
    Timer timer              # idle in a pool: its keepalive timeout
    Conn *owner              # NULL while idle in the pool
    int group
    int peer
    int requests
    unsigned int gen         # its group's gen when this attempt began
    int state                # UP_CONNECTING, UP_TLS, UP_READY
    double idle_since
    Up *prev                 # the pool's list, least recently used first
    Up *next

cdef struct ProxyHeader:
    # What a PROXY protocol header named: the client and the address it connected to
    sockaddr_in6 src
    sockaddr_in6 dst
    int known                # 0: LOCAL or UNKNOWN, no addresses

cdef struct Conn:
    Io io
    Timer timer
    int state                # ConnState
    double t_state           # when the state began (head, idle, linger timers)
    Listener *lis
    Server *srv
    Loc *loc
    sockaddr_in6 raddr       # the client (an IPv4 client is stored as AF_INET in the same room),
                             # after realip: the address a trusted proxy named
    sockaddr_in6 paddr       # the TCP peer, as accepted
    int peer_trusted         # the peer is one of the server's real_ip proxies
    ProxyHeader *pp          # the PROXY protocol header's addresses (malloc'ed), or NULL
    LimitHold *holds         # limit_conn entries held (malloc'ed), or NULL
    int nholds
    char *in_                # client bytes read but not consumed (a partial head, pipelined)
    int in_len
    int in_cap
    Req *req                 # the request in progress, NULL between requests
    Up *up
    Flow flow[2]
    int nreq
    int first_eof            # tunnel: side whose EOF came first, -1 before any
    int reason               # tunnel: why it closed
    unsigned char relay      # RELAY_*
    unsigned char keepalive  # the client connection stays after this exchange
    unsigned char peer_closed    # the client half-closed
    unsigned char queued     # on the ready list
    unsigned char websocket  # a WebSocket tunnel: it ends when its upstream has closed
    signed char ws_why       # tunnel: the close reason of the proxy's closing handshake
    unsigned short ws_code   # tunnel: the close code the proxy sends (at end_at, if that is
                             # still to come; else its closing handshake runs since t_state)
    TunnelPolicy *tp         # tunnel: its location's policy (or the one it was adopted with)
    double read_timeout      # tunnel
    double send_timeout      # tunnel, exchange and answers
    double started           # tunnel: from its 101
    double end_at            # tunnel: when its lifetime ends, NEVER: no limit
    unsigned long long number    # $connection
    LogRec *log              # the access log line being gathered, if the location logs
    Hooked *hk               # what a Python hook decided (engine/hooks.pxi), or NULL
    Conn *next               # the ready list, or the list freed at the end of the turn
    Conn *all_prev           # every connection of the engine
    Conn *all_next

cdef struct Hooked:
    # A request that went through a Python hook (engine/hooks.pxi), kept with its connection:
    # the decision's parts the engine applies, and its $hook_NAME values (a tunnel keeps them
    # for its close line and its close callback).  Reset at each call.
    unsigned long long ticket    # a coroutine hook running for it (its key), 0: none
    double t_call            # when the hook was called (hook_timeout counts from here)
    PyObject *result         # a coroutine's decision, once it came
    char *saved              # while a coroutine runs: the head and the bytes after it
    int saved_head
    int saved_len
    int group                # the decision's upstream group, -1: the location's
    int peer                 # ... and its server there, tried first; -1: the group's choice
    char *drop               # request headers not sent upstream: lower-case names, each
    int drop_len             # NUL-terminated
    char *add                # header lines added upstream ("Name: value\r\n" ...)
    int add_len
    char *key                # the hash key the decision set
    int keylen
    int key_set
    char *vars               # $hook_NAME values: "name\0value\0" ...
    int vars_len
    int close_hook           # a tunnel: its on_tunnel_close (Engine._close_hooks), -1: none
    char *place              # an adopted tunnel: "server_name\0location\0" for that callback
    int place_len

cdef struct LogRec:
    # What an access log line needs once its request is gone (a tunnel keeps it to its close).
    AccessLog *log
    char *early              # the request-phase variables the format uses, rendered, each
    int early_len            # NUL-terminated, in the format's order
    double t_start           # the request's first byte
    double connect_time      # -1: none
    double header_time
    double response_time
    int status
    int upstream_status
    long long request_length
    long long bytes_sent
    long long head_sent      # bytes of the answer's head
    long long head_in        # a tunnel: bytes of the request's head
    long long upstream_sent
    long long upstream_received
    int group                # -1: none
    int peer
    int event                # LOG_EVENT_*: a tunnel's open or close line
    int reason               # a tunnel's close reason

cdef struct Req:
    # One request, from its head to the end of its answer (freed then; a tunnel keeps none).
    Head *head               # while the head is at hand (synchronous part of routing), else NULL
    double delay_until       # limit_req: the request waits until then before its upstream
    const char *hbase        # the head's bytes while at hand
    double t_start
    int method
    int version
    int head_size
    int client_ka            # the client asked to keep the connection
    int upgrading
    char token[32]           # the Upgrade token asked for
    int token_len
    char accept[32]          # the Sec-WebSocket-Accept the 101 must carry
    int accept_len
    Selection sel
    int sel_live             # sel is initialised
    int peer                 # the attempt in progress, -1 if none
    int sticky_from          # the peer the client's sticky cookie named, -1 if none
    int group                # the upstream group: the location's, or its proxy_pass rendered
    char *uri                # proxy_pass with variables and a URI part: the target sent
    int urilen
    int tries
    int timed_out            # the last failure was a timeout (504 rather than 502)
    double t_first           # first attempt (next_upstream_timeout)
    double t_connect         # this attempt
    double t_connected
    double t_sent            # request head written (read_timeout counts from here)
    int retried              # a stale pooled connection was retried once
    int reused               # this attempt runs on a pooled connection
    char *uhead              # the head sent upstream and the body bytes that came with it,
    int uhead_len            # kept for a next attempt
    int ubody_len            # of which the body
    char *early              # an upgrade's bytes past its head, held until the 101 is checked
    int early_len
    char *rbuf               # the upstream's answer while its head is incomplete
    int rlen
    int rcap
    int resp_started         # bytes of the answer went to the client
    int resp_done
    int body_done            # the request body has been read whole
    int up_keep              # the upstream keeps its connection
    int resp_status
    Chunked chunk_in         # request body, chunked
    Chunked chunk_out        # response body, chunked
    PyObject *ctx            # the request as Python sees it, for a custom balancer (or NULL)


# --- the engine (engine/*.pxi) ---------------------------------------------------------------

cdef struct Pool:
    # nginx's `keepalive N` of an upstream block: idle connections to its servers, least
    # recently used first (ngx_http_upstream_keepalive_module)
    Up *head
    Up *tail
    int idle
    int size
    double timeout
    int max_requests
    unsigned long long opened
    unsigned long long reused
    int send_proxy           # 1 or 2: a PROXY protocol header of that version opens each
                             # connection (no keepalive then: the connection names one client)

cdef struct Counters:
    # Every field a 64-bit word: the master's status board maps a worker's Counters into shared
    # memory, so that a status page sums every worker's live figures.  Gauges first.
    long long conns          # client connections open, tunnels included
    long long states[13]     # client connections by ConnState
    long long tunnels_active
    long long pipes_total
    long long pipes_free
    long long paused_now     # accepting is paused (worker_connections)
    long long held[8]        # what the engine holds, by kind (engine/debug.pxi)
    # counters
    unsigned long long accepts
    unsigned long long handled
    unsigned long long requests
    unsigned long long tunnels_total
    unsigned long long bytes_spliced
    unsigned long long bytes_copied
    unsigned long long splice_calls
    unsigned long long copy_calls
    unsigned long long pipes_created
    unsigned long long pipe_shortage
    unsigned long long switches_to_splice
    unsigned long long switches_to_copy
    unsigned long long closes[17]        # tunnels by close reason: index -reason (CLOSE_REASONS)
    unsigned long long loops
    unsigned long long tls_tunnels_total
    unsigned long long tls_handshakes
    unsigned long long tls_handshake_failures
    unsigned long long tls_reads
    unsigned long long tls_writes
    unsigned long long accept_errors
    unsigned long long paused
    unsigned long long log_lines
    unsigned long long proxy_protocol_errors     # headers invalid or not sent in time
    unsigned long long ws_codes[8]       # WebSocket tunnels by their close code's class (WS_CODE_*)
    unsigned long long ws_pings          # pings the proxy sent
    unsigned long long ws_pongs          # ... and the pongs it took back
    unsigned long long ws_goodbyes       # closing handshakes the proxy began
    unsigned long long ring_overflows    # io_uring waits that found the completion queue had
                                         # been full (the rest waited in the kernel)

cdef enum Backend:
    # How the engine learns what is ready (engine/ring.pxi): epoll, or io_uring's polls
    BACKEND_EPOLL = 0
    BACKEND_URING = 1

cdef struct Eng:
    int backend              # Backend
    int epfd                 # epoll: the set; io_uring: -1
    fastws_uring ring        # io_uring: the ring (its fd is the engine's fd)
    Io **slots               # io_uring: what each slot's polls stand for (NULL: free)
    unsigned int *slot_gen   # and its generation, in the user_data's high half: a completion
    int nslots               # of a poll whose Io is gone names an old generation
    int free_slot            # the first free slot (a list through slot_next), 0: none
    int *slot_next
    int in_turn              # inside engine_turn: what is queued goes with the turn's end
    int ring_started         # the ring is enabled, for the thread that runs the engine
    int ring_failed          # the ring refused a wait (said once in the error log)
    int ring_efd             # an eventfd the ring signals, for another event loop (Engine.fd)
    Io tio                   # the timerfd: the earliest deadline of the heap
    double timer_armed       # when it is set to fire, 0 when disarmed
    double now               # monotonic, read once per turn
    double wall              # the wall clock, for log lines
    char *buf                # the one read buffer every connection shares
    int bufsize
    Head head                # the request head being routed
    Head rhead               # the response head being checked
    # timers: one heap of every connection's deadline
    Timer **heap
    int heap_len
    int heap_cap
    # pipes for splice(2)
    Pipe *free_pipes
    int max_pipes
    int pipe_size
    int peek_prod            # the scratch pipe a spliced flow's frame headers are read from
    int peek_cons            # (a tee(2) of its pipe; engine/frames.pxi)
    int peek_cap             # its size; 0: not made yet, -1: it could not be made
    Py_ssize_t peek_left     # bytes the last look left in it, skipped with the next look's first
    int null_fd              # /dev/null, open for writing: where skipped bytes are spliced
    # tables
    Listener *lis
    int nlis
    Group **groups
    PyObject **group_objs    # their UpstreamGroup objects (a custom balancer's Python side)
    char **group_names
    Template **hash_keys     # per group: the hash key, or NULL
    Sticky **sticky          # per group: its sticky cookie, or NULL
    MapTable *maps           # the configuration's maps, by index ($map_ variables)
    int nmaps
    Pool *pools
    int ngroups
    # connections
    int handshakes           # upstream TLS and engine-side upgrades in progress (for status)
    int worker_connections
    int accepting            # listeners are read (0 while paused or after stop_accepting)
    int stopping             # a graceful stop is under way: no keep-alive, idle connections close
    Conn *zombies            # closed in this turn, freed at its end
    Up *dead_ups
    Conn *ready              # connections with work no edge will announce
    Conn *all                # every connection
    unsigned long long serial
    int number_step          # $connection = serial * number_step + number_base
    int number_base
    int control_ready        # the control plane's loop has something to do
    Io *control              # its fd's Io (Engine.watch_control)
    int control_due          # io_uring: its oneshot poll came, to be armed again once the
                             # loop has had its pass (the next engine_wait)
    unsigned short goodbye_code  # a stop's closing handshakes began (Engine.goodbye): the code,
    signed char goodbye_why      # the reason and until when they are spread, for the tunnels
    double goodbye_until         # that begin after it
    Zone *zones              # limit zones, by index
    int nzones
    int pid                  # the lock word of a zone this engine holds
    int wakefd               # an eventfd the engine writes to itself for that work
    int reserve_fd           # a descriptor kept in reserve (/dev/null): given up to tell a
                             # client 503 when accept() finds the descriptors exhausted
    int starved              # accepting paused for want of descriptors (retried by the tick)
    unsigned long long starved_refused   # clients answered 503 in this starvation
    fastws_buf obuf          # heads the engine builds
    fastws_buf xbuf          # a second one (hash keys, log lines' early part, a Location)
    fastws_buf vbuf          # a variable's value
    char *pathbuf            # a percent-decoded path
    int pathcap
    char addrbuf[64]         # an address as text, for a message
    char tlserr[256]         # an OpenSSL error as text, for a message
    long time_sec            # the second time_local and time_iso were made for
    char time_local[40]
    char time_iso[40]
    PyObject *owner          # the Python Engine, for the control plane's extension points
    # messages for the error log, handed to Python at the end of a turn
    fastws_buf msgs
    int log_level            # 10 debug, 20 info, 30 warn, 40 error
    Counters *n              # the figures: in the master's shared memory, or in `own`
    Counters own


cdef extern from "buf.h" nogil:
    void eng_log "FASTWS_ENG_LOG"(Eng *e, int level, const char *fmt, ...)

cdef enum:
    # upstream connection states
    UP_CONNECTING = 1
    UP_TLS
    UP_READY


# --- variables (engine/vars.pxi; the table of names is fastws/variables.py) ------------------

cdef enum Var:
    # request phase: known once the request is routed
    V_HOST = 0
    V_REMOTE_ADDR
    V_REMOTE_PORT
    V_SCHEME
    V_SERVER_ADDR
    V_SERVER_PORT
    V_SERVER_NAME
    V_REQUEST_URI
    V_URI
    V_ARGS
    V_QUERY_STRING
    V_REQUEST_METHOD
    V_PROXY_ADD_X_FORWARDED_FOR
    V_PROXY_HOST
    V_CONNECTION_UPGRADE
    V_HTTP                   # $http_NAME
    V_ARG                    # $arg_NAME
    V_COOKIE                 # $cookie_NAME
    V_REQUEST
    V_REMOTE_USER
    V_SERVER_PROTOCOL
    V_CONNECTION
    V_CONNECTION_REQUESTS
    V_PID
    V_PROXY_PROTOCOL_ADDR    # what a PROXY protocol header named; empty without one
    V_PROXY_PROTOCOL_PORT
    V_PROXY_PROTOCOL_SERVER_ADDR
    V_PROXY_PROTOCOL_SERVER_PORT
    V_BINARY_REMOTE_ADDR
    V_MAP                    # a map's variable; its argument is the map's index
    V_HOOK                   # $hook_NAME: a value a Python hook set (engine/hooks.pxi)
    # log phase: known when the line is written
    V_UPSTREAM_ADDR
    V_STATUS
    V_BODY_BYTES_SENT
    V_BYTES_SENT
    V_REQUEST_LENGTH
    V_REQUEST_TIME
    V_TIME_LOCAL
    V_TIME_ISO8601
    V_MSEC
    V_UPSTREAM_STATUS
    V_UPSTREAM_CONNECT_TIME
    V_UPSTREAM_HEADER_TIME
    V_UPSTREAM_RESPONSE_TIME
    V_UPSTREAM_BYTES_SENT
    V_UPSTREAM_BYTES_RECEIVED
    V_TUNNEL
    V_TUNNEL_CLOSE
    V_WS_CLOSE_CODE
    V_WS_CLOSE_REASON
    V_WS_CLOSED_BY
    V_WS_MESSAGES_IN
    V_WS_MESSAGES_OUT
    V_WS_PINGS
    V_COUNT
