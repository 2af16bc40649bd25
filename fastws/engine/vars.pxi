# nginx variables: one table (fastws/variables.py names them and gives each its phase and its
# number, the Var enum), one evaluator here, used by set_headers values, hash keys and log
# formats alike.
#
# Request-phase variables read the request head while it is at hand (the synchronous part of
# routing a request: the head sent upstream, the hash key and the log line's early part are
# rendered then); log-phase variables read the LogRec when the line is written.

cdef Header *head_find(Head *h, const char *lname, int n) noexcept nogil:
    # The first header named lname (lower case, compared without regard to case).
    cdef int i
    cdef Header *hd
    for i in range(h.nheaders):
        hd = &h.headers[i]
        if hd.name.len == n and strncasecmp(h.base + hd.name.off, lname, n) == 0:
            return hd
    return NULL


cdef void head_join(Head *h, const char *lname, int n, int kind, fastws_buf *out) noexcept nogil:
    # Every value of a header, joined by ", " (as a repeated field's values combine).
    cdef int i, found = 0
    cdef Header *hd
    for i in range(h.nheaders):
        hd = &h.headers[i]
        if kind != H_OTHER:
            if hd.kind != kind:
                continue
        elif hd.name.len != n or strncasecmp(h.base + hd.name.off, lname, n) != 0:
            continue
        if found:
            buf_add(out, ", ", 2)
        buf_add(out, h.base + hd.value.off, hd.value.len)
        found = 1


cdef int ipv4_text(const unsigned char *a, char *out) noexcept nogil:
    # inet_ntop's dotted quad without its sprintf (it is written for every request's
    # X-Real-IP and X-Forwarded-For)
    cdef int i, n = 0
    cdef unsigned char v
    for i in range(4):
        v = a[i]
        if v >= 100:
            out[n] = <char>(48 + v // 100)
            n += 1
        if v >= 10:
            out[n] = <char>(48 + v // 10 % 10)
            n += 1
        out[n] = <char>(48 + v % 10)
        n += 1
        if i < 3:
            out[n] = b'.'
            n += 1
    out[n] = 0
    return n


cdef int sockaddr_text(const sockaddr *sa, char *out, int cap) noexcept nogil:
    cdef const char *r
    if sa.sa_family == AF_INET and cap >= 16:
        return ipv4_text(<const unsigned char *>&(<sockaddr_in *>sa).sin_addr, out)
    if sa.sa_family == AF_INET:
        r = inet_ntop(AF_INET, &(<sockaddr_in *>sa).sin_addr, out, cap)
    elif sa.sa_family == AF_INET6:
        r = inet_ntop(AF_INET6, &(<sockaddr_in6 *>sa).sin6_addr, out, cap)
    else:
        r = NULL
    if r == NULL:
        out[0] = 0
        return 0
    return <int>strlen(out)


cdef void sockaddr_unmap(sockaddr_in6 *sa) noexcept nogil:
    # ::ffff:a.b.c.d (a dual-stack socket's IPv4 peer) as the IPv4 address it is
    cdef sockaddr_in *sin = <sockaddr_in *>sa
    cdef unsigned char v4[4]
    cdef unsigned short port
    if sa.sin6_family == AF_INET6 and memcmp(sa.sin6_addr.s6_addr, V4MAPPED, 12) == 0:
        port = sa.sin6_port
        memcpy(v4, sa.sin6_addr.s6_addr + 12, 4)
        memset(sa, 0, sizeof(sockaddr_in6))
        sin.sin_family = AF_INET
        sin.sin_port = port
        memcpy(&sin.sin_addr, v4, 4)


cdef inline const unsigned char *sockaddr_bytes(sockaddr_in6 *sa, int *n) noexcept nogil:
    # the address itself: 4 bytes for IPv4, 16 for IPv6 ($binary_remote_addr)
    if sa.sin6_family == AF_INET:
        n[0] = 4
        return <const unsigned char *>&(<sockaddr_in *>sa).sin_addr
    n[0] = 16
    return <const unsigned char *>&sa.sin6_addr


cdef inline int sockaddr_port(const sockaddr *sa) noexcept nogil:
    if sa.sa_family == AF_INET:
        return ntohs((<sockaddr_in *>sa).sin_port)
    if sa.sa_family == AF_INET6:
        return ntohs((<sockaddr_in6 *>sa).sin6_port)
    return 0


cdef void query_param(const char *q, int n, const char *name, int nlen, fastws_buf *out) noexcept nogil:
    # ngx_http_arg: the raw value of the first NAME= in the query string, the name compared
    # without regard to case.
    cdef int i = 0, start, eq
    while i <= n:
        start = i
        while i < n and q[i] != b'&':
            i += 1
        eq = start
        while eq < i and q[eq] != b'=':
            eq += 1
        if eq - start == nlen and strncasecmp(q + start, name, nlen) == 0:
            if eq < i:
                buf_add(out, q + eq + 1, i - eq - 1)
            return
        i += 1


cdef void cookie_value(Head *h, const char *name, int nlen, fastws_buf *out) noexcept nogil:
    # ngx_http_parse_multi_header_lines over the Cookie headers: "a=1; b=2".
    cdef int i, p, end, start, eq
    cdef Header *hd
    cdef const char *v
    for i in range(h.nheaders):
        hd = &h.headers[i]
        if hd.kind != H_COOKIE:
            continue
        v = h.base + hd.value.off
        end = hd.value.len
        p = 0
        while p < end:
            while p < end and (v[p] == b' ' or v[p] == b';' or v[p] == b','):
                p += 1
            start = p
            while p < end and v[p] != b';' and v[p] != b',':
                p += 1
            eq = start
            while eq < p and v[eq] != b'=':
                eq += 1
            if eq - start == nlen and strncasecmp(v + start, name, nlen) == 0 and eq < p:
                buf_add(out, v + eq + 1, p - eq - 1)
                return


cdef void remote_user(Head *h, fastws_buf *out) noexcept nogil:
    # The user of a Basic Authorization header (ngx_http_auth_basic_user).
    cdef int i = h.first[<int>H_AUTHORIZATION], n, k
    cdef const char *v
    cdef unsigned char dec[512]
    if i < 0:
        return
    v = h.base + h.headers[i].value.off
    n = h.headers[i].value.len
    if n < 6 or strncasecmp(v, "basic ", 6) != 0:
        return
    v += 6
    n -= 6
    while n > 0 and v[0] == b' ':
        v += 1
        n -= 1
    n = base64_decode(v, n, dec, sizeof(dec))
    if n < 0:
        return
    k = 0
    while k < n and dec[k] != b':':
        k += 1
    buf_add(out, <const char *>dec, k)


cdef void var_put(Eng *e, Conn *c, LogRec *lr, int var, const char *arg, int arglen,
                  fastws_buf *out) noexcept nogil:
    # Append the value of a variable (nothing when it has none).
    cdef Req *req = c.req
    cdef Head *h = req.head if req != NULL else NULL
    cdef char tmp[INET6_ADDRSTRLEN + 8]
    cdef int n, i, q
    cdef const char *t
    if var >= <int>V_UPSTREAM_ADDR:
        log_var_put(e, c, lr, var, out)
        return
    if var == V_REMOTE_ADDR:
        n = sockaddr_text(<sockaddr *>&c.raddr, tmp, sizeof(tmp))
        buf_add(out, tmp, n)
    elif var == V_REMOTE_PORT:
        buf_fmt(out, "%d", sockaddr_port(<sockaddr *>&c.raddr))
    elif var == V_SCHEME:
        buf_add(out, "https" if c.lis.tls else "http", 5 if c.lis.tls else 4)
    elif var == V_SERVER_ADDR:
        buf_add(out, c.lis.addr_text, c.lis.addr_len)
    elif var == V_SERVER_PORT:
        buf_fmt(out, "%d", c.lis.port)
    elif var == V_SERVER_NAME:
        buf_add(out, c.srv.name, c.srv.namelen)
    elif var == V_CONNECTION:
        buf_fmt(out, "%llu", c.number)
    elif var == V_CONNECTION_REQUESTS:
        buf_fmt(out, "%d", c.nreq)
    elif var == V_PID:
        buf_fmt(out, "%d", <int>getpid())
    elif var == V_BINARY_REMOTE_ADDR:
        t = <const char *>sockaddr_bytes(&c.raddr, &n)
        buf_add(out, t, n)
    elif var == V_PROXY_PROTOCOL_ADDR or var == V_PROXY_PROTOCOL_SERVER_ADDR:
        if c.pp != NULL:
            n = sockaddr_text(<sockaddr *>(&c.pp.src if var == V_PROXY_PROTOCOL_ADDR
                                           else &c.pp.dst), tmp, sizeof(tmp))
            buf_add(out, tmp, n)
    elif var == V_PROXY_PROTOCOL_PORT or var == V_PROXY_PROTOCOL_SERVER_PORT:
        if c.pp != NULL:
            buf_fmt(out, "%d", sockaddr_port(<sockaddr *>(&c.pp.src if var == V_PROXY_PROTOCOL_PORT
                                                          else &c.pp.dst)))
    elif var == V_HOOK:
        hook_var(c, arg, arglen, out)
    elif var == V_MAP:
        map_put(e, c, lr, arg, out)
    elif var == V_PROXY_HOST:
        if c.loc != NULL and c.loc.proxy_host != NULL:
            buf_add(out, c.loc.proxy_host, <int>strlen(c.loc.proxy_host))
        elif c.req != NULL and c.req.group >= 0 and c.loc != NULL and c.loc.pass_tpl != NULL:
            buf_add(out, e.group_names[c.req.group], <int>strlen(e.group_names[c.req.group]))
    elif h == NULL:
        return                        # the head is gone: a request variable has no value now
    elif var == V_HOST:
        i = h.first[<int>H_HOST]
        n = host_name(h.base + h.headers[i].value.off, h.headers[i].value.len, tmp,
                      sizeof(tmp)) if i >= 0 else 0
        if n > 0:
            # (a Host longer than tmp is cut; long names are rare and only as long as DNS's)
            if n == sizeof(tmp):
                n = host_name_into(h, out)
            else:
                buf_add(out, tmp, n)
        else:
            buf_add(out, c.srv.name, c.srv.namelen)
    elif var == V_REQUEST_URI:
        buf_add(out, h.base + h.target.off, h.target.len)
    elif var == V_URI:
        t = h.base + h.target.off
        q = 0
        while q < h.target.len and t[q] != b'?':
            q += 1
        if buf_reserve(out, q) == 0:
            out.len += percent_decode(t, q, out.p + out.len)
    elif var == V_ARGS or var == V_QUERY_STRING:
        t = h.base + h.target.off
        q = 0
        while q < h.target.len and t[q] != b'?':
            q += 1
        if q < h.target.len:
            buf_add(out, t + q + 1, h.target.len - q - 1)
    elif var == V_REQUEST_METHOD:
        buf_add(out, h.base + h.method_name.off, h.method_name.len)
    elif var == V_PROXY_ADD_X_FORWARDED_FOR:
        if h.first[<int>H_X_FORWARDED_FOR] >= 0 and not (
                c.loc != NULL and c.loc.forwarded_replace and not c.peer_trusted):
            head_join(h, NULL, 0, H_X_FORWARDED_FOR, out)
            buf_add(out, ", ", 2)
        n = sockaddr_text(<sockaddr *>&c.raddr, tmp, sizeof(tmp))
        buf_add(out, tmp, n)
    elif var == V_CONNECTION_UPGRADE:
        if h.first[<int>H_UPGRADE] >= 0:
            buf_add(out, "upgrade", 7)
        else:
            buf_add(out, "close", 5)
    elif var == V_HTTP:
        head_join(h, arg, arglen, H_OTHER, out)
    elif var == V_ARG:
        t = h.base + h.target.off
        q = 0
        while q < h.target.len and t[q] != b'?':
            q += 1
        if q < h.target.len:
            query_param(t + q + 1, h.target.len - q - 1, arg, arglen, out)
    elif var == V_COOKIE:
        cookie_value(h, arg, arglen, out)
    elif var == V_REQUEST:
        buf_add(out, h.base + h.method_name.off, h.method_name.len)
        buf_add(out, " ", 1)
        buf_add(out, h.base + h.target.off, h.target.len)
        buf_fmt(out, " HTTP/1.%d", h.version - 10)
    elif var == V_REMOTE_USER:
        remote_user(h, out)
    elif var == V_SERVER_PROTOCOL:
        buf_fmt(out, "HTTP/1.%d", h.version - 10)


cdef void map_put(Eng *e, Conn *c, LogRec *lr, const char *arg, fastws_buf *out) noexcept nogil:
    # ngx_http_map_variable / ngx_http_map_find: the source rendered, matched as the map says.
    cdef int index = 0, i, n, lo, hi, mid, cmp
    cdef MapTable *m
    cdef MapEntry *me
    cdef Template *found = NULL
    cdef fastws_buf src
    cdef char *low
    while arg[0] != 0:
        index = index * 10 + (arg[0] - 48)
        arg += 1
    if index >= e.nmaps:
        return
    m = &e.maps[index]
    memset(&src, 0, sizeof(src))
    tpl_render(e, c, lr, m.source, &src)
    n = <int>src.len
    if m.hostnames and n > 0 and src.p[n - 1] == b'.':
        n -= 1
    # strings are matched ignoring case: a lower-case copy after the value
    if buf_reserve(&src, n) == 0:
        low = src.p + src.len
        for i in range(n):
            low[i] = src.p[i] + 32 if c'A' <= src.p[i] <= c'Z' else src.p[i]
        lo = 0
        hi = m.nexact - 1
        while lo <= hi and found == NULL:
            mid = (lo + hi) >> 1
            me = &m.exact[mid]
            cmp = memcmp(me.key, low, me.len if me.len < n else n)
            if cmp == 0:
                cmp = me.len - n
            if cmp == 0:
                found = me.value
            elif cmp < 0:
                lo = mid + 1
            else:
                hi = mid - 1
        i = 0
        while found == NULL and i < m.nhead:
            me = &m.head[i]
            if me.len < n and memcmp(me.key, low + n - me.len, me.len) == 0:
                found = me.value
            i += 1
        i = 0
        while found == NULL and i < m.ntail:
            me = &m.tail[i]
            if me.len < n and memcmp(me.key, low, me.len) == 0:
                found = me.value
            i += 1
    i = 0
    while found == NULL and i < m.nregex:
        if fastws_regex_match(m.regex[i].regex, src.p, <size_t>src.len):
            found = m.regex[i].value
        i += 1
    if found == NULL:
        found = m.dflt
    free(src.p)
    if found != NULL:
        tpl_render(e, c, lr, found, out)


cdef int host_name_into(Head *h, fastws_buf *out) noexcept nogil:
    cdef int i = h.first[<int>H_HOST]
    cdef int n = h.headers[i].value.len
    if buf_reserve(out, n) < 0:
        return 0
    n = host_name(h.base + h.headers[i].value.off, n, out.p + out.len, n)
    out.len += n
    return 0


cdef void tpl_render(Eng *e, Conn *c, LogRec *lr, Template *t, fastws_buf *out) noexcept nogil:
    cdef int i
    cdef TplPart *p
    for i in range(t.nparts):
        p = &t.parts[i]
        if p.var < 0:
            buf_add(out, p.text, p.len)
        else:
            var_put(e, c, lr, p.var, p.text, p.len, out)
