# Access logs: nginx's log_format variables, rendered by the engine, written in batches.
#
# The request-phase variables a format uses are rendered when the request is routed, while its
# head is at hand (a tunnel keeps only those strings, for hours); the log-phase ones (status,
# bytes, times) when the line is written.  Lines gather in a buffer per file and are written
# with one write(2) when it fills and on the control plane's tick, on an O_APPEND descriptor
# that several workers share; Python opens and reopens the files.

cdef void log_begin(Eng *e, Conn *c, AccessLog *al) noexcept nogil:
    cdef LogRec *lr
    cdef LogFormat *fmt
    cdef fastws_buf *b = &e.xbuf
    cdef TplPart *p
    cdef int i
    if al == NULL or c.log != NULL:
        return
    lr = <LogRec *>calloc(1, sizeof(LogRec))
    if lr == NULL:
        return
    held_count(e, DBG_LOGRECS, 1)
    lr.log = al
    lr.t_start = c.req.t_start if c.req != NULL else c.t_state
    lr.connect_time = lr.header_time = lr.response_time = -1
    lr.group = lr.peer = -1
    fmt = al.format
    b.len = 0
    b.failed = 0
    for i in range(fmt.nearly):
        p = &fmt.tpl.parts[fmt.early[i]]
        if p.var == V_BINARY_REMOTE_ADDR:
            log_binary_addr(c, b)     # raw bytes (a NUL among them) as nginx logs them
        else:
            var_put(e, c, NULL, p.var, p.text, p.len, b)
        buf_add(b, "", 1)             # its NUL
    if b.len and not b.failed:
        lr.early = <char *>malloc(b.len)
        if lr.early != NULL:
            memcpy(lr.early, b.p, b.len)
            lr.early_len = b.len
    c.log = lr


cdef void log_binary_addr(Conn *c, fastws_buf *b) noexcept nogil:
    cdef int i, n
    cdef const unsigned char *a = sockaddr_bytes(&c.raddr, &n)
    for i in range(n):
        buf_fmt(b, "\\x%02X", a[i])


cdef void log_free(Eng *e, Conn *c) noexcept nogil:
    if c.log != NULL:
        free(c.log.early)
        free(c.log)
        held_count(e, DBG_LOGRECS, -1)
        c.log = NULL


cdef void log_end(Eng *e, Conn *c) noexcept nogil:
    # A request's line: it was answered, relayed, or cut.
    cdef LogRec *lr = c.log
    cdef Req *req = c.req
    if req != NULL:
        if lr.request_length == 0:
            lr.request_length = req.head_size + c.flow[0].nbytes
        if lr.peer < 0 and req.tries and c.loc != NULL:
            lr.group = req.group
            lr.peer = req.peer
        if lr.connect_time < 0 and req.t_connected > 0:
            lr.connect_time = req.t_connected - req.t_connect
        lr.upstream_sent = req.uhead_len + c.flow[0].nbytes - req.ubody_len
    log_line(e, c, lr)
    log_free(e, c)


cdef void log_tunnel(Eng *e, Conn *c, int event, int reason) noexcept nogil:
    # A tunnel's line: status 101, the bytes it carried each way (heads included, as nginx's
    # $bytes_sent and $request_length), its whole life in $request_time, and in
    # $upstream_response_time the time from the upstream connect to now.
    cdef LogRec *lr = c.log
    cdef long long up = c.flow[0].nbytes, down = c.flow[1].nbytes
    lr.event = event
    lr.reason = reason
    if event == LOG_EVENT_OPEN:
        up = down = 0
        lr.response_time = -1
    else:
        lr.response_time = lr.header_time + (e.now - c.started)
    lr.bytes_sent = lr.head_sent + down
    lr.upstream_received = lr.head_sent + down
    lr.request_length = lr.head_in + up
    lr.upstream_sent = lr.head_in + up
    lr.status = 101
    log_line(e, c, lr)
    if event == LOG_EVENT_CLOSE:
        log_free(e, c)


cdef void log_line(Eng *e, Conn *c, LogRec *lr) noexcept nogil:
    cdef LogFormat *fmt = lr.log.format
    cdef LogFile *file = lr.log.file
    cdef fastws_buf *v = &e.vbuf
    cdef TplPart *p
    cdef const char *early = lr.early
    cdef int i, k, n, ei = 0
    cdef const char *val
    cdef int vlen
    if file.fd < 0 and file.len > LOG_BUFFER:
        return
    if fmt.json:
        log_add(file, "{", 1)
    for i in range(fmt.tpl.nparts):
        p = &fmt.tpl.parts[i]
        if p.var < 0:
            log_add(file, p.text, p.len)
            continue
        if ei < fmt.nearly and fmt.early[ei] == i:
            if early != NULL:
                val = early
                vlen = <int>strlen(val)
                early += vlen + 1
            else:
                val = ""
                vlen = 0
            ei += 1
        else:
            v.len = 0
            var_put(e, c, lr, p.var, p.text, p.len, v)
            val = v.p
            vlen = v.len
        if fmt.json:
            if i:
                log_add(file, ",", 1)
            log_add(file, "\"", 1)
            log_add(file, fmt.names[i], <int>strlen(fmt.names[i]))
            log_add(file, "\":\"", 3)
            log_json(file, val, vlen)
            log_add(file, "\"", 1)
        elif fmt.escape == ESCAPE_JSON:
            log_json_escape(file, val, vlen)
        elif fmt.escape == ESCAPE_NONE:
            log_add(file, val, vlen)
        else:
            log_escape(file, val, vlen)
    if fmt.json:
        log_add(file, "}", 1)
    log_add(file, "\n", 1)
    e.n.log_lines += 1
    if file.len >= LOG_BUFFER:
        log_flush(file)


cdef void log_add(LogFile *f, const char *s, int n) noexcept nogil:
    cdef char *grown
    cdef int cap
    if n <= 0:
        return
    if f.len + n > f.cap:
        cap = f.cap * 2 if f.cap else LOG_BUFFER * 2
        while cap < f.len + n:
            cap *= 2
        grown = <char *>realloc(f.buf, cap)
        if grown == NULL:
            return
        f.buf = grown
        f.cap = cap
    memcpy(f.buf + f.len, s, n)
    f.len += n


cdef void log_escape(LogFile *f, const char *s, int n) noexcept nogil:
    # nginx's default escaping (ngx_http_log_escape): '"', '\' and bytes outside 0x20-0x7e as
    # \xHH; an empty value is "-".
    cdef int i, start = 0
    cdef unsigned char ch
    cdef char hexa[4]
    if n == 0:
        log_add(f, "-", 1)
        return
    for i in range(n):
        ch = <unsigned char>s[i]
        if ch < 0x20 or ch > 0x7e or ch == b'"' or ch == b'\\':
            log_add(f, s + start, i - start)
            hexa[0] = b'\\'
            hexa[1] = b'x'
            hexa[2] = HEXDIGITS[ch >> 4]
            hexa[3] = HEXDIGITS[ch & 15]
            log_add(f, hexa, 4)
            start = i + 1
    log_add(f, s + start, n - start)


cdef void log_json_escape(LogFile *f, const char *s, int n) noexcept nogil:
    # nginx's log_format escape=json (ngx_escape_json): '"' and '\' escaped, control bytes as
    # \n, \r, \t, \b, \f or \u00XX, other bytes as they are; an empty value stays empty.
    cdef int i, start = 0
    cdef unsigned char ch
    cdef char out[6]
    for i in range(n):
        ch = <unsigned char>s[i]
        if ch >= 0x20 and ch != b'"' and ch != b'\\':
            continue
        log_add(f, s + start, i - start)
        start = i + 1
        out[0] = b'\\'
        if ch == b'"' or ch == b'\\':
            out[1] = ch
            log_add(f, out, 2)
        elif ch == b'\n' or ch == b'\r' or ch == b'\t' or ch == 8 or ch == 12:
            out[1] = b'n' if ch == b'\n' else b'r' if ch == b'\r' else b't' if ch == b'\t' \
                else b'b' if ch == 8 else b'f'
            log_add(f, out, 2)
        else:
            out[1] = b'u'
            out[2] = b'0'
            out[3] = b'0'
            out[4] = HEXDIGITS[ch >> 4]
            out[5] = HEXDIGITS[ch & 15]
            log_add(f, out, 6)
    log_add(f, s + start, n - start)


cdef void log_json(LogFile *f, const char *s, int n) noexcept nogil:
    # A JSON string's content: the value's bytes read as Latin-1 (each byte one character, as
    # the wire had them), written as UTF-8 with JSON's escapes.
    cdef int i, start = 0
    cdef unsigned char ch
    cdef char out[6]
    for i in range(n):
        ch = <unsigned char>s[i]
        if ch >= 0x20 and ch < 0x7f and ch != b'"' and ch != b'\\':
            continue
        log_add(f, s + start, i - start)
        start = i + 1
        if ch == b'"' or ch == b'\\':
            out[0] = b'\\'
            out[1] = ch
            log_add(f, out, 2)
        elif ch == b'\n':
            log_add(f, "\\n", 2)
        elif ch == b'\r':
            log_add(f, "\\r", 2)
        elif ch == b'\t':
            log_add(f, "\\t", 2)
        elif ch == 8:
            log_add(f, "\\b", 2)
        elif ch == 12:
            log_add(f, "\\f", 2)
        elif ch < 0x20:
            out[0] = b'\\'
            out[1] = b'u'
            out[2] = b'0'
            out[3] = b'0'
            out[4] = HEXDIGITS_LOWER[ch >> 4]
            out[5] = HEXDIGITS_LOWER[ch & 15]
            log_add(f, out, 6)
        elif ch == 0x7f:
            log_add(f, <const char *>&ch, 1)
        else:
            out[0] = <char>(0xC0 | (ch >> 6))
            out[1] = <char>(0x80 | (ch & 0x3F))
            log_add(f, out, 2)
    log_add(f, s + start, n - start)


cdef void log_flush(LogFile *f) noexcept nogil:
    cdef ssize_t n
    cdef int off = 0
    if f.len == 0:
        return
    if f.fd >= 0:
        while off < f.len:
            n = write(f.fd, f.buf + off, f.len - off)
            if n < 0:
                if errno == EINTR:
                    continue
                f.errors += 1
                break
            off += <int>n
    f.len = 0


cdef void log_ms(fastws_buf *out, double seconds) noexcept nogil:
    buf_fmt(out, "%.3f", seconds)


cdef void log_var_put(Eng *e, Conn *c, LogRec *lr, int var, fastws_buf *out) noexcept nogil:
    cdef long long body
    if lr == NULL:
        return
    if var == V_STATUS:
        if lr.status:
            buf_fmt(out, "%d", lr.status)
    elif var == V_BODY_BYTES_SENT:
        body = lr.bytes_sent - lr.head_sent
        buf_fmt(out, "%lld", body if body > 0 else 0)
    elif var == V_BYTES_SENT:
        buf_fmt(out, "%lld", lr.bytes_sent)
    elif var == V_REQUEST_LENGTH:
        buf_fmt(out, "%lld", lr.request_length)
    elif var == V_REQUEST_TIME:
        log_ms(out, e.now - lr.t_start)
    elif var == V_TIME_LOCAL:
        log_time(e, out, 0)
    elif var == V_TIME_ISO8601:
        log_time(e, out, 1)
    elif var == V_MSEC:
        buf_fmt(out, "%.3f", e.wall)
    elif var == V_UPSTREAM_STATUS:
        if lr.upstream_status:
            buf_fmt(out, "%d", lr.upstream_status)
    elif var == V_UPSTREAM_CONNECT_TIME:
        if lr.connect_time >= 0:
            log_ms(out, lr.connect_time)
    elif var == V_UPSTREAM_HEADER_TIME:
        if lr.header_time >= 0:
            log_ms(out, lr.header_time)
    elif var == V_UPSTREAM_RESPONSE_TIME:
        if lr.response_time >= 0:
            log_ms(out, lr.response_time)
    elif var == V_UPSTREAM_BYTES_SENT:
        if lr.upstream_status:
            buf_fmt(out, "%lld", lr.upstream_sent)
    elif var == V_UPSTREAM_BYTES_RECEIVED:
        if lr.upstream_status:
            buf_fmt(out, "%lld", lr.upstream_received if lr.upstream_received else
                    lr.bytes_sent)
    elif var == V_UPSTREAM_ADDR:
        if lr.group >= 0 and lr.peer >= 0:
            buf_add(out, e.groups[lr.group].peers[lr.peer].name,
                    <int>strlen(e.groups[lr.group].peers[lr.peer].name))
    elif var == V_TUNNEL:
        if lr.event == LOG_EVENT_OPEN:
            buf_add(out, "open", 4)
        elif lr.event == LOG_EVENT_CLOSE:
            buf_add(out, "close", 5)
    elif var == V_TUNNEL_CLOSE:
        if lr.event == LOG_EVENT_CLOSE:
            buf_add(out, close_reason(lr.reason), <int>strlen(close_reason(lr.reason)))
    elif var >= V_WS_CLOSE_CODE and var <= V_WS_PINGS:
        if lr.event == LOG_EVENT_CLOSE and c != NULL and c.flow[0].mode == FLOW_FRAMES:
            log_ws_var(c, var, out)


cdef void log_ws_var(Conn *c, int var, fastws_buf *out) noexcept nogil:
    cdef const char *s
    if var == V_WS_CLOSE_CODE:
        buf_fmt(out, "%d", ws_close_code(c))
    elif var == V_WS_CLOSE_REASON:
        s = ws_code_name(ws_close_code(c))
        buf_add(out, s, <int>strlen(s))
    elif var == V_WS_CLOSED_BY:
        s = ws_closed_by(c)
        buf_add(out, s, <int>strlen(s))
    elif var == V_WS_MESSAGES_IN:
        buf_fmt(out, "%u", c.flow[0].ws.messages)
    elif var == V_WS_MESSAGES_OUT:
        buf_fmt(out, "%u", c.flow[1].ws.messages)
    elif var == V_WS_PINGS:
        buf_fmt(out, "%u", <unsigned int>(c.flow[0].ws.pings + c.flow[1].ws.pings))


cdef const char *close_reason(int reason) noexcept nogil:
    # $tunnel_close: the names of the status pages (api.pxi's _REASONS)
    if reason == CLOSE_CLIENT: return "client"
    if reason == CLOSE_UPSTREAM: return "upstream"
    if reason == CLOSE_CLIENT_ERROR: return "client_error"
    if reason == CLOSE_UPSTREAM_ERROR: return "upstream_error"
    if reason == CLOSE_READ_TIMEOUT: return "read_timeout"
    if reason == CLOSE_SEND_TIMEOUT: return "send_timeout"
    if reason == CLOSE_SHUTDOWN: return "shutdown"
    if reason == CLOSE_EXPORTED: return "exported"
    if reason == CLOSE_IDLE_TIMEOUT: return "idle_timeout"
    if reason == CLOSE_LIFETIME: return "lifetime"
    if reason == CLOSE_WS_PROTOCOL: return "protocol_error"
    if reason == CLOSE_WS_TOO_BIG: return "message_too_big"
    if reason == CLOSE_PING_TIMEOUT: return "ping_timeout"
    if reason == CLOSE_RELOAD: return "reload"
    if reason == CLOSE_REMOVED: return "removed"
    return "error"


cdef void log_time(Eng *e, fastws_buf *out, int iso) noexcept nogil:
    # $time_local ("01/Dec/2026:10:00:00 +0000") and $time_iso8601, made once a second.
    cdef time_t t = <time_t>e.wall
    cdef tm lt
    cdef char *dst
    cdef int n
    if t != e.time_sec:
        e.time_sec = t
        localtime_r(&t, &lt)
        strftime(e.time_local, sizeof(e.time_local), "%d/%b/%Y:%H:%M:%S %z", &lt)
        strftime(e.time_iso, sizeof(e.time_iso), "%Y-%m-%dT%H:%M:%S%z", &lt)
        # ISO 8601 writes the offset with a colon: +00:00
        n = <int>strlen(e.time_iso)
        if n >= 5:
            e.time_iso[n + 1] = 0
            e.time_iso[n] = e.time_iso[n - 1]
            e.time_iso[n - 1] = e.time_iso[n - 2]
            e.time_iso[n - 2] = b':'
    if iso:
        buf_add(out, e.time_iso, <int>strlen(e.time_iso))
    else:
        buf_add(out, e.time_local, <int>strlen(e.time_local))
