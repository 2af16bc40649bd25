cdef enum:
    # Close reasons; negative, as the pumps return them.
    CLOSE_CLIENT = -1            # both ways finished, the client's EOF came first
    CLOSE_UPSTREAM = -2          # both ways finished, the upstream's EOF came first
    CLOSE_CLIENT_ERROR = -3      # reset or error on the client's socket
    CLOSE_UPSTREAM_ERROR = -4    # reset or error on the upstream's socket
    CLOSE_READ_TIMEOUT = -5
    CLOSE_SEND_TIMEOUT = -6
    CLOSE_SHUTDOWN = -7
    CLOSE_ERROR = -8             # out of memory or epoll refused the fd
    CLOSE_EXPORTED = -9          # taken out of the engine whole, to go on in another process
    CLOSE_IDLE_TIMEOUT = -10     # no byte either way for idle_timeout
    CLOSE_LIFETIME = -11         # max_tunnel_lifetime reached
    CLOSE_WS_PROTOCOL = -12      # a frame broke RFC 6455's rules (1002)
    CLOSE_WS_TOO_BIG = -13       # a message over max_message_size (1009)
    CLOSE_PING_TIMEOUT = -14     # no pong came for the proxy's ping (1011)
    CLOSE_RELOAD = -15           # a reload that could not hand the tunnel over (1012)
    CLOSE_REMOVED = -16          # its server left the upstream group (DNS, a reload): drained
    CLOSE_REASONS = 17           # the size of the tables indexed by -reason

    # a tunnel's deadline that is not a close (tunnel_deadline sets c.reason to it)
    TUNNEL_PING_CLIENT = 1
    TUNNEL_PING_UPSTREAM = 2

    # ws_splice_head: the source ended
    WS_EOF = 3

    # whom a tunnel's pings go to (ping_to)
    PING_CLIENT = 1
    PING_UPSTREAM = 2

    # WebSocket close codes by class, as the status pages count them
    WS_CODE_NORMAL = 0           # 1000
    WS_CODE_GOING_AWAY = 1       # 1001
    WS_CODE_PROTOCOL = 2         # 1002
    WS_CODE_TOO_BIG = 3          # 1009
    WS_CODE_RESTART = 4          # 1012
    WS_CODE_OTHER = 5            # the other codes of RFC 6455 and its registry (1003-2999)
    WS_CODE_APPLICATION = 6      # 3000-4999
    WS_CODE_NONE = 7             # no close frame either way (1006)

    RELAY_AUTO = 0
    RELAY_SPLICE = 1
    RELAY_COPY = 2

    MAX_EVENTS = 256
    # Bytes one readiness event may move before the loop serves other tunnels.
    PUMP_BUDGET = 1048576
    # auto mode, as HAProxy's splice-auto: a flow whose reads fill the shared buffer this many
    # times in a row is a bulk streamer and switches to splice; a spliced flow whose reads stay
    # under SPLICE_SMALL bytes SPLICE_SMALL_STREAK times in a row goes back to copying.
    COPY_FULL_STREAK = 2
    SPLICE_SMALL = 4096
    SPLICE_SMALL_STREAK = 4
    # Empty pipes kept for reuse; more than that are closed when returned.
    POOL_KEEP_FREE = 64
    # Largest SSL_write asked for at once (an int in OpenSSL's API).
    TLS_WRITE_MAX = 1073741824

    # Phases of a Tunnel, and why the engine gives a handshake back to Python.
    PHASE_TUNNEL = 0
    PHASE_HANDSHAKE = 1
    HS_CONNECT_ERROR = 1
    HS_CONNECT_TIMEOUT = 2
    HS_HEADER_TIMEOUT = 3
    HS_UPSTREAM_CLOSED = 4
    HS_RESPONSE = 5              # an answer Python must read: not a plainly valid 101
    HS_ERROR = 6
    # The upstream's answer to a handshake is read into a buffer of this size, grown up to the
    # largest head fastws accepts from an upstream.
    HS_BUF_START = 4096
    HS_BUF_MAX = 32768

    # Accepts per listener per turn before the other connections get their turn.
    ACCEPT_BATCH = 64
    # Error-log levels, as Python's logging.
    LOG_DEBUG = 10
    LOG_INFO = 20
    LOG_WARN = 30
    LOG_ERROR = 40
    # Largest upstream response head.
    MAX_RESPONSE_HEAD = 32768
    LOG_EVENT_NONE = 0
    LOG_EVENT_OPEN = 1
    LOG_EVENT_CLOSE = 2
    # flow_frame's verdicts on a request body (not close reasons)
    FRAME_TOO_LARGE = -40
    FRAME_BAD = -41
    # Bytes of log lines gathered per file before a write(2).
    LOG_BUFFER = 65536
    # why engine_wait returned
    WAIT_TIMEOUT = 0
    WAIT_CONTROL = 1
    WAIT_MESSAGES = 2
    WAIT_SIGNAL = 3
