# A request: its head checked and routed, the head that goes upstream, its body's framing.
#
# Everything here runs once per request, synchronously, while the request head is at hand in
# the buffer it was read into: the head is parsed in place (no copy), routed, checked, and what
# must outlive it (the head sent upstream, the hash key, the log line's early part) is
# rendered before the buffer is read into again.

cdef const char *status_reason(int status) noexcept nogil:
    if status == 101: return "Switching Protocols"
    if status == 200: return "OK"
    if status == 204: return "No Content"
    if status == 301: return "Moved Permanently"
    if status == 302: return "Found"
    if status == 303: return "See Other"
    if status == 304: return "Not Modified"
    if status == 307: return "Temporary Redirect"
    if status == 308: return "Permanent Redirect"
    if status == 400: return "Bad Request"
    if status == 401: return "Unauthorized"
    if status == 402: return "Payment Required"
    if status == 403: return "Forbidden"
    if status == 404: return "Not Found"
    if status == 405: return "Not Allowed"
    if status == 406: return "Not Acceptable"
    if status == 407: return "Proxy Authentication Required"
    if status == 408: return "Request Timeout"
    if status == 409: return "Conflict"
    if status == 410: return "Gone"
    if status == 413: return "Payload Too Large"
    if status == 414: return "URI Too Long"
    if status == 417: return "Expectation Failed"
    if status == 426: return "Upgrade Required"
    if status == 428: return "Precondition Required"
    if status == 429: return "Too Many Requests"
    if status == 431: return "Request Header Fields Too Large"
    if status == 451: return "Unavailable For Legal Reasons"
    if status == 500: return "Internal Server Error"
    if status == 502: return "Bad Gateway"
    if status == 503: return "Service Unavailable"
    if status == 504: return "Gateway Timeout"
    if status == 505: return "HTTP Version Not Supported"
    return "Unknown"


cdef bint origin_allowed(Loc *loc, Head *h, const char *base) noexcept nogil:
    # The handshake's Origin (one, RFC 6454's serialization) against the location's list:
    # equal ignoring case, or under a "scheme://*.domain[:port]" wildcard (one or more
    # labels, never a different scheme or port).
    cdef Header *hd = head_find(h, "origin", 6)
    cdef char low[256]
    cdef const char *p
    cdef const char *star
    cdef int n, i, k, pre, suf, mid
    if hd == NULL:
        return not loc.origin_missing_deny
    n = hd.value.len
    if n == 0 or n > <int>sizeof(low):
        return False
    for i in range(n):
        low[i] = base[hd.value.off + i] + 32 if c'A' <= base[hd.value.off + i] <= c'Z' \
            else base[hd.value.off + i]
    if loc.norigins == 0:
        return True
    for i in range(loc.norigins):
        p = loc.origins[i]
        if loc.origin_lens[i] == n and memcmp(p, low, n) == 0:
            return True
        star = <const char *>memchr(p, b'*', loc.origin_lens[i])
        if star == NULL:
            continue
        pre = <int>(star - p)                 # "https://"
        suf = loc.origin_lens[i] - pre - 1    # ".example.com[:port]"
        mid = n - pre - suf
        if mid < 1 or memcmp(p, low, pre) != 0 or memcmp(star + 1, low + n - suf, suf) != 0:
            continue
        for k in range(pre, pre + mid):
            if low[k] == b'/' or low[k] == b':' or low[k] == b'@':
                break
        else:
            return True
    return False


cdef Req *req_new(Eng *e, Conn *c) noexcept nogil:
    cdef Req *req = <Req *>calloc(1, sizeof(Req))
    if req == NULL:
        return NULL
    held_count(e, DBG_REQS, 1)
    req.peer = -1
    req.t_start = c.t_state
    c.req = req
    return req


cdef int request_pass(Eng *e, Conn *c, char *rest, int restlen) noexcept nogil:
    # proxy_pass with variables (ngx_http_proxy_eval): "http://NAME[/uri]" rendered; NAME must
    # be an upstream group (fastws resolves no names while running, as nginx without a
    # resolver); a URI part replaces the whole request target.  0, or -1 (answered 502).
    cdef fastws_buf *b = &e.xbuf
    cdef Req *req = c.req
    cdef int i, start = 7, end
    b.len = 0
    tpl_render(e, c, NULL, c.loc.pass_tpl, b)
    if b.len < 7 or memcmp(b.p, "http://", 7) != 0:
        start = b.len
    end = start
    while end < b.len and b.p[end] != b'/':
        end += 1
    req.group = -1
    for i in range(e.ngroups):
        if <int>strlen(e.group_names[i]) == end - start and \
                memcmp(e.group_names[i], b.p + start, end - start) == 0:
            req.group = i
            break
    if req.group < 0 or end - start == 0:
        eng_log(e, LOG_ERROR, "proxy_pass %.*s: no such upstream group, client: %s",
                b.len if b.len < 200 else 200, b.p, conn_addr(e, c))
        request_refuse(e, c, rest, restlen, 502, "proxy_pass names no upstream group")
        return -1
    if end < b.len:
        req.uri = <char *>malloc(b.len - end)
        if req.uri == NULL:
            conn_close(e, c)
            return -1
        memcpy(req.uri, b.p + end, b.len - end)
        req.urilen = b.len - end
    return 0


cdef void request_start(Eng *e, Conn *c, char *base, int end, char *rest, int restlen) noexcept nogil:
    # A complete request head is at base[:end]; rest[:restlen] are the bytes that followed it.
    cdef Head *h = &e.head
    cdef Req *req
    cdef Loc *loc
    cdef int status, i, n, q
    cdef char host[256]
    cdef char page[256]
    cdef char *path
    cdef const char *t
    e.n.requests += 1
    c.nreq += 1
    status = parse_request(h, base, end, c.srv.max_request_line)
    if status != 0:
        conn_stash_drop(e, c)
        conn_fail(e, c, status, h.error)
        return
    req = req_new(e, c)
    if req == NULL:
        conn_close(e, c)
        return
    conn_set_state(e, c, CS_ROUTE)
    req.head = h
    req.method = h.method
    req.version = h.version
    req.head_size = end
    req.client_ka = wants_keepalive(h)

    # the server block, by Host
    i = h.first[<int>H_HOST]
    n = host_name(base + h.headers[i].value.off, h.headers[i].value.len, host,
                  sizeof(host)) if i >= 0 else 0
    c.srv = route_server(c.lis, host, n)
    real_ip(c.srv, c, h, base)
    if c.srv.redirect_https:
        request_redirect(e, c, host, n)
        return
    # the location, by path (percent-decoded for the match, as nginx's)
    t = base + h.target.off
    q = 0
    while q < h.target.len and t[q] != b'?':
        q += 1
    if q == 0 or t[0] != b'/':
        request_refuse(e, c, rest, restlen, 400, "the request target is not an absolute path")
        return
    if memchr(t, b'%', q) != NULL:
        path = e.pathbuf
        if q > e.pathcap:
            q = e.pathcap
        n = percent_decode(t, q, path)
    else:
        path = <char *>t
        n = q
    loc = route_location(c.srv, path, n)
    if loc == NULL:
        request_refuse(e, c, rest, restlen, 404, "no location matches")
        return
    c.loc = loc
    if loc.log != NULL:
        log_begin(e, c, loc.log)
    if loc.nrules and not access_allowed(loc, &c.raddr):
        eng_log(e, LOG_ERROR, "access forbidden by rule, client: %s", conn_addr(e, c))
        request_refuse(e, c, rest, restlen, 403, "access forbidden by rule")
        return
    if loc.nlimits and limits_check(e, c) < 0:
        return
    if loc.kind == LOC_RETURN:
        request_local(e, c, rest, restlen)
        if loc.return_body_len == 0 and loc.return_status >= 400:
            # nginx's `return 403;`: the status's page, and the connection kept
            conn_answer(e, c, loc.return_status, NULL, page, error_page(loc.return_status, page,
                        sizeof(page)), "text/html", req.client_ka)
        else:
            conn_answer(e, c, loc.return_status, NULL, loc.return_body, loc.return_body_len,
                        "text/plain", req.client_ka)
        return
    if loc.kind == LOC_STATUS:
        request_local(e, c, rest, restlen)
        status_answer(e, c)
        return
    req.group = loc.group
    if loc.pass_tpl != NULL and request_pass(e, c, rest, restlen) < 0:
        return
    if request_upgrade(e, c, h, base) < 0:
        return
    if loc.hook >= 0 and (req.upgrading or loc.hook_requests):
        if hook_start(e, c, base, end, rest, restlen) != HOOK_GO:
            return                    # answered, or a coroutine decides (hook_resume goes on)
    request_proceed(e, c, h, base, rest, restlen)


cdef void request_proceed(Eng *e, Conn *c, Head *h, const char *base, char *rest,
                          int restlen) noexcept nogil:
    # The request routed and checked (and its hook's decision applied): its body's framing,
    # the head sent upstream, the server chosen, the first attempt.
    cdef Req *req = c.req
    if not req.upgrading and request_body(e, c, h, rest, &restlen) < 0:
        return
    if request_head_upstream(e, c, h, base, rest, 0 if req.upgrading else restlen) < 0:
        return
    if req.upgrading and restlen > 0:
        # An upgrade's early bytes wait until the 101 is checked: sent before, they would
        # reach an upstream that did not upgrade.
        req.early = <char *>malloc(restlen)
        if req.early == NULL:
            conn_close(e, c)
            return
        memcpy(req.early, rest, restlen)
        req.early_len = restlen
    if upstream_select_init(e, c, h) < 0:
        return
    req.head = NULL                   # the buffer it points into is about to be reused
    conn_set_state(e, c, CS_UPSTREAM)
    req.t_first = e.now
    if req.delay_until > e.now:
        conn_arm(e, c)                # limit_req: exchange_timeout goes on at delay_until
        return
    req.delay_until = 0
    upstream_next(e, c)


cdef int wants_keepalive(Head *h) noexcept nogil:
    # RFC 9112 section 9.3: HTTP/1.1 stays open unless "close"; HTTP/1.0 closes unless
    # "keep-alive".
    if h.version == 11:
        return not head_has_token(h, H_CONNECTION, "close", 5)
    return head_has_token(h, H_CONNECTION, "keep-alive", 10)


cdef void conn_stash_drop(Eng *e, Conn *c) noexcept nogil:
    conn_unstash(e, c)


cdef void request_refuse(Eng *e, Conn *c, char *rest, int restlen, int status,
                         const char *why) noexcept nogil:
    conn_fail(e, c, status, why)


cdef void request_local(Eng *e, Conn *c, char *rest, int restlen) noexcept nogil:
    # An answer of the proxy's own to a request that may have a body: the body (if its length
    # is known) is skipped, and what follows is the next request.
    cdef Head *h = &e.head
    cdef long long cl = head_content_length(h)
    if h.first[<int>H_TRANSFER_ENCODING] >= 0 or cl > restlen:
        c.req.client_ka = 0           # a body that is not at hand: not worth reading
        return
    if cl > 0:
        rest += cl
        restlen -= <int>cl
    conn_stash(e, c, rest, restlen)


cdef void request_redirect(Eng *e, Conn *c, const char *host, int n) noexcept nogil:
    # redirect_https: 301 to the same host and target on the HTTPS port.
    cdef Head *h = &e.head
    cdef fastws_buf *b = &e.xbuf
    b.len = 0
    buf_add(b, "Location: https://", 18)
    if n > 0:
        buf_add(b, host, n)
    else:
        buf_add(b, c.lis.addr_text, c.lis.addr_len)
    if c.srv.redirect_https != 443:
        buf_fmt(b, ":%d", c.srv.redirect_https)
    buf_add(b, h.base + h.target.off, h.target.len)
    buf_add(b, "\r\n", 3)            # with its NUL: conn_answer reads it as a C string
    conn_answer(e, c, 301, b.p, NULL, 0, NULL, 0)


cdef int request_upgrade(Eng *e, Conn *c, Head *h, const char *base) noexcept nogil:
    # Is this a WebSocket handshake the location tunnels?  Then check it (RFC 6455 section 4.1).
    # Any other upgrade token (h2c from curl --http2, or websocket where the location forbids
    # it) is served as a plain request: Upgrade is hop-by-hop and is not passed on (RFC 9110
    # lets a server ignore it).  0, or -1 when the request was answered.
    cdef Req *req = c.req
    cdef Loc *loc = c.loc
    cdef int i, n, k, s, v
    cdef const char *val
    cdef unsigned char raw[32]
    i = h.first[<int>H_UPGRADE]
    if i < 0 or not head_has_token(h, H_CONNECTION, "upgrade", 7) or not loc.websocket:
        return 0
    val = base + h.headers[i].value.off
    n = h.headers[i].value.len
    if n >= <int>sizeof(req.token):
        return 0
    for k in range(n):
        req.token[k] = val[k] + 32 if c'A' <= val[k] <= c'Z' else val[k]
    req.token_len = n
    for k in range(loc.ntokens):
        if loc.token_lens[k] == n and memcmp(loc.tokens[k], req.token, n) == 0:
            break
    else:
        return 0
    if h.method != M_GET:
        conn_fail(e, c, 400, "a WebSocket handshake must be a GET")
        return -1
    if h.version != 11:
        conn_fail(e, c, 400, "a WebSocket handshake needs HTTP/1.1")
        return -1
    if h.first[<int>H_TRANSFER_ENCODING] >= 0 or head_content_length(h) > 0:
        conn_fail(e, c, 400, "a WebSocket handshake has no body")
        return -1
    s = h.first[<int>H_SEC_WEBSOCKET_VERSION]
    if s < 0 or h.count[<int>H_SEC_WEBSOCKET_VERSION] != 1 or h.headers[s].value.len != 2 \
            or memcmp(base + h.headers[s].value.off, "13", 2) != 0:
        conn_fail(e, c, 426, "Sec-WebSocket-Version must be 13")
        return -1
    s = h.first[<int>H_SEC_WEBSOCKET_KEY]
    if s < 0 or h.count[<int>H_SEC_WEBSOCKET_KEY] != 1:
        conn_fail(e, c, 400, "missing Sec-WebSocket-Key")
        return -1
    v = base64_decode(base + h.headers[s].value.off, h.headers[s].value.len, raw, sizeof(raw))
    if v != 16:
        conn_fail(e, c, 400, "Sec-WebSocket-Key is not 16 bytes in base64")
        return -1
    if (loc.norigins or loc.origin_missing_deny) and not origin_allowed(loc, h, base):
        # cross-site WebSocket hijacking: a page elsewhere opening a tunnel with the user's
        # cookies; refused here, the upstream never sees it
        eng_log(e, LOG_INFO, "WebSocket handshake from a refused origin, client: %s",
                conn_addr(e, c))
        conn_fail(e, c, 403, "origin not allowed")
        return -1
    ws_accept(base + h.headers[s].value.off, h.headers[s].value.len, req.accept)
    req.accept_len = 28
    req.upgrading = 1
    req.body_done = 1
    return 0


cdef int request_body(Eng *e, Conn *c, Head *h, char *rest, int *restlen) noexcept nogil:
    # The request body's framing (RFC 9112 section 6.3); the parser already refused a request
    # with both Content-Length and Transfer-Encoding.  The bytes of the body that came with
    # the head are framed here (re-chunked in place); what follows the body is the next
    # request.  Leaves restlen at the body bytes to send with the head.  0, or -1 (answered).
    cdef Req *req = c.req
    cdef Loc *loc = c.loc
    cdef Flow *f = &c.flow[0]
    cdef int i = h.first[<int>H_TRANSFER_ENCODING], n = restlen[0], has_body
    cdef long long cl
    cdef Py_ssize_t consumed, out
    cdef const char *v
    if i >= 0:
        if h.version == 10:
            conn_fail(e, c, 400, "Transfer-Encoding in an HTTP/1.0 request")
            return -1
        v = h.base + h.headers[i].value.off
        if h.count[<int>H_TRANSFER_ENCODING] != 1 or h.headers[i].value.len != 7 \
                or strncasecmp(v, "chunked", 7) != 0:
            conn_fail(e, c, 400, "unsupported Transfer-Encoding")
            return -1
        f.mode = FLOW_CHUNKED
        f.chunk = &req.chunk_in
        chunked_init(f.chunk, 1)
        has_body = 1
    else:
        cl = head_content_length(h)
        if cl == -2:
            conn_fail(e, c, 400, "bad Content-Length")
            return -1
        if cl < 0:
            cl = 0
        if loc.client_max_body_size and cl > loc.client_max_body_size:
            conn_fail(e, c, 413, "body larger than client_max_body_size")
            return -1
        f.mode = FLOW_LENGTH
        f.left = cl
        has_body = cl > 0
    i = h.first[<int>H_EXPECT]
    if i >= 0 and h.version == 11:
        if h.headers[i].value.len != 12 or strncasecmp(h.base + h.headers[i].value.off,
                                                      "100-continue", 12) != 0:
            conn_fail(e, c, 417, "unsupported Expect")
            return -1
        # The proxy answers the expectation itself (as nginx) and does not pass it on.
        if has_body and n == 0:
            io_send(e, &c.io, "HTTP/1.1 100 Continue\r\n\r\n", 25)
    if f.mode == FLOW_CHUNKED:
        out = chunked_feed(f.chunk, rest, n, &consumed)
        if out < 0:
            conn_fail(e, c, 400, "bad chunked body")
            return -1
        if loc.client_max_body_size and f.chunk.total > loc.client_max_body_size:
            conn_fail(e, c, 413, "chunked body larger than client_max_body_size")
            return -1
        if conn_stash(e, c, rest + consumed, n - consumed) < 0:
            conn_close(e, c)
            return -1
        restlen[0] = <int>out
        req.body_done = f.chunk.done
    else:
        if n > f.left:
            if conn_stash(e, c, rest + f.left, n - <int>f.left) < 0:
                conn_close(e, c)
                return -1
            n = <int>f.left
        f.left -= n
        restlen[0] = n
        req.body_done = f.left == 0
    f.nbytes = restlen[0]
    f.last_rx = e.now                 # client_body_timeout counts from here
    if req.body_done:
        f.eof = 1
    return 0


cdef bint named_by_connection(Head *h, const char *name, int n) noexcept nogil:
    # Is this header (its name as sent, in any case) named by a token of the Connection
    # header, and so hop-by-hop (RFC 9110 section 7.6.1)?
    cdef TokenIter it
    cdef Span tok
    tokens_init(&it, h, H_CONNECTION)
    while tokens_next(&it, h, &tok):
        if tok.len == n and strncasecmp(h.base + tok.off, name, n) == 0:
            return True
    return False


cdef inline bint op_named(Loc *loc, const char *name, int n) noexcept nogil:
    cdef int k
    for k in range(loc.nops):
        if loc.ops[k].len == n and strncasecmp(loc.ops[k].lname, name, n) == 0:
            return True
    return False


cdef int request_head_upstream(Eng *e, Conn *c, Head *h, const char *base, char *body,
                               int bodylen) noexcept nogil:
    # The head sent upstream, rebuilt in one pass (as ngx_http_proxy_create_request): the
    # request line (with proxy_pass's URI in place of the matched prefix), Host, the client's
    # headers in their order and byte for byte less the hop-by-hop ones (Connection and the
    # headers it names, Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade) and those the
    # proxy sets, then X-Real-IP, X-Forwarded-For, X-Forwarded-Proto and set_headers, then
    # Upgrade and Connection.  Kept whole (with the body bytes that came with the head) for a
    # next attempt.  0, or -1 (closed).
    cdef fastws_buf *b = &e.obuf
    cdef Req *req = c.req
    cdef Loc *loc = c.loc
    cdef Hooked *hk = c.hk
    cdef Header *hd
    cdef HeaderOp *op
    cdef const char *name
    cdef int i, k, kind, n, mark, host_set = 0, pool = e.pools[req.group].size > 0
    cdef int q
    cdef const char *t = base + h.target.off
    b.len = 0
    b.failed = 0
    buf_add(b, base + h.method_name.off, h.method_name.len)
    buf_add(b, " ", 1)
    if req.uri != NULL:
        buf_add(b, req.uri, req.urilen)
    elif loc.proxy_uri != NULL:
        buf_add(b, loc.proxy_uri, loc.proxy_uri_len)
        q = 0
        while q < h.target.len and t[q] != b'?':
            q += 1
        if not loc.exact and loc.pathlen <= q:
            buf_add(b, t + loc.pathlen, h.target.len - loc.pathlen)
        else:
            buf_add(b, t + q, h.target.len - q)
    else:
        buf_add(b, t, h.target.len)
    buf_add(b, " HTTP/1.1\r\n", 11)
    # Host first: set_headers may replace it, else the client's (port included), else $host
    for k in range(loc.nops):
        op = &loc.ops[k]
        if op.kind == H_HOST and hook_drops(hk, "host", 4):
            host_set = 1              # the hook's Host replaces the location's
        elif op.kind == H_HOST:
            host_set = 1
            if op.value != NULL:
                mark = b.len
                buf_add(b, op.name, op.len)
                buf_add(b, ": ", 2)
                n = b.len
                tpl_render(e, c, NULL, op.value, b)
                if b.len == n:
                    b.len = mark      # an empty value removes the header, as nginx's
                else:
                    buf_add(b, "\r\n", 2)
    if not host_set and hook_drops(hk, "host", 4):
        host_set = 1                  # the hook's Host comes with its other headers
    if not host_set:
        buf_add(b, "Host: ", 6)
        i = h.first[<int>H_HOST]
        if i >= 0 and h.headers[i].value.len > 0:
            buf_add(b, base + h.headers[i].value.off, h.headers[i].value.len)
        elif c.srv.namelen:
            buf_add(b, c.srv.name, c.srv.namelen)
        else:
            buf_add(b, c.lis.addr_text, c.lis.addr_len)
        buf_add(b, "\r\n", 2)
    for i in range(h.nheaders):
        hd = &h.headers[i]
        kind = hd.kind
        if kind == H_CONNECTION or kind == H_KEEP_ALIVE or kind == H_PROXY_CONNECTION \
                or kind == H_TE or kind == H_TRAILER or kind == H_UPGRADE or kind == H_HOST \
                or kind == H_X_REAL_IP or kind == H_X_FORWARDED_FOR \
                or kind == H_X_FORWARDED_PROTO:
            continue
        if kind == H_EXPECT and not req.upgrading:
            continue
        name = base + hd.name.off
        if loc.forwarded_replace and not c.peer_trusted and hd.name.len == 9 and \
                strncasecmp(name, "forwarded", 9) == 0:
            continue                  # RFC 7239's header, from a peer that is not trusted
        if h.count[<int>H_CONNECTION] and named_by_connection(h, name, hd.name.len):
            continue
        if loc.nops and op_named(loc, name, hd.name.len):
            continue
        if hk != NULL and hook_drops(hk, name, hd.name.len):
            continue
        if name[hd.name.len] == b':' and name[hd.name.len + 1] == b' ' and \
                name + hd.name.len + 2 == base + hd.value.off:
            buf_add(b, name, hd.name.len + 2 + hd.value.len)   # "Name: value" as it came
        else:
            buf_add(b, name, hd.name.len)
            buf_add(b, ": ", 2)
            buf_add(b, base + hd.value.off, hd.value.len)
        buf_add(b, "\r\n", 2)
    # the proxy's own headers, unless set_headers or the hook names them
    if not op_has_kind(loc, H_X_REAL_IP) and not hook_drops(hk, "x-real-ip", 9):
        buf_add(b, "X-Real-IP: ", 11)
        var_put(e, c, NULL, V_REMOTE_ADDR, NULL, 0, b)
        buf_add(b, "\r\n", 2)
    if not op_has_kind(loc, H_X_FORWARDED_FOR) and not hook_drops(hk, "x-forwarded-for", 15):
        buf_add(b, "X-Forwarded-For: ", 17)
        var_put(e, c, NULL, V_PROXY_ADD_X_FORWARDED_FOR, NULL, 0, b)
        buf_add(b, "\r\n", 2)
    if not op_has_kind(loc, H_X_FORWARDED_PROTO) and \
            not hook_drops(hk, "x-forwarded-proto", 17):
        buf_add(b, "X-Forwarded-Proto: ", 19)
        var_put(e, c, NULL, V_SCHEME, NULL, 0, b)
        buf_add(b, "\r\n", 2)
    for k in range(loc.nops):
        op = &loc.ops[k]
        if op.kind == H_HOST or op.value == NULL:
            continue
        if hk != NULL and hook_drops(hk, op.lname, op.len):
            continue                  # the hook sets or removes it: the hook wins
        mark = b.len
        buf_add(b, op.name, op.len)
        buf_add(b, ": ", 2)
        n = b.len
        tpl_render(e, c, NULL, op.value, b)
        if b.len == n:
            b.len = mark
        else:
            buf_add(b, "\r\n", 2)
    if hk != NULL and hk.add != NULL:
        buf_add(b, hk.add, hk.add_len)
    if req.upgrading:
        i = h.first[<int>H_UPGRADE]
        buf_add(b, "Upgrade: ", 9)
        buf_add(b, base + h.headers[i].value.off, h.headers[i].value.len)
        buf_add(b, "\r\nConnection: upgrade\r\n", 23)
    elif not pool:
        # no Connection header at all toward a keep-alive pool (the recipe's
        # proxy_set_header Connection "")
        buf_add(b, "Connection: close\r\n", 19)
    buf_add(b, "\r\n", 2)
    if b.failed:
        conn_close(e, c)
        return -1
    req.uhead = <char *>malloc(b.len + bodylen)
    if req.uhead == NULL:
        conn_close(e, c)
        return -1
    held_count(e, DBG_BUFFERS, 1)
    memcpy(req.uhead, b.p, b.len)
    if bodylen:
        memcpy(req.uhead + b.len, body, bodylen)
    req.uhead_len = b.len + bodylen
    req.ubody_len = bodylen
    return 0


cdef inline bint op_has_kind(Loc *loc, int kind) noexcept nogil:
    cdef int k
    for k in range(loc.nops):
        if loc.ops[k].kind == kind:
            return True
    return False


cdef void request_end(Eng *e, Conn *c) noexcept nogil:
    # The request is over (answered, relayed, or cut): its log line, and everything it held.
    cdef Req *req = c.req
    if c.log != NULL and c.state != CS_TUNNEL:
        log_end(e, c)
    if c.nholds and c.state != CS_TUNNEL:
        limits_release(e, c)          # a tunnel keeps its limit_conn counts to its close
    if req == NULL:
        return
    if req.sel_live:
        sel_clear(e.groups[req.group], &req.sel)
    if req.uhead != NULL:
        free(req.uhead)
        held_count(e, DBG_BUFFERS, -1)
    free(req.early)
    free(req.rbuf)
    free(req.uri)
    if c.flow[0].chunk == &req.chunk_in:
        c.flow[0].chunk = NULL
    if c.flow[1].chunk == &req.chunk_out:
        c.flow[1].chunk = NULL
    if req.ctx != NULL:
        with gil:
            Py_DECREF(<object>req.ctx)
    if c.hk != NULL and c.state != CS_TUNNEL:
        hooked_free(e, c)             # (a tunnel keeps its $hook_ values to its close)
    free(req)
    held_count(e, DBG_REQS, -1)
    c.req = NULL
