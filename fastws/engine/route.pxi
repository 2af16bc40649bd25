# Choosing a server block and a location for a request, with nginx's rules.
#
# Server: among the blocks listening on the connection's address, the one whose server_name
# matches the Host (exact names first, then the longest leading wildcard "*.example.com", then
# the longest trailing wildcard "www.example.*"), else the default server of the address (the
# one marked default, or the first) - ngx_http_find_virtual_server; "~regex" names last, in
# order, ignoring case.
# Location (ngx_http_core_find_location): an exact "= /path" first; then the longest matching
# prefix, which ends the search if it is a "^~ /path"; else the regular-expression locations
# in the configuration's order, the first that matches the decoded path winning; else that
# longest prefix.  Python sorts the tables (tables.py); the lookups here are plain loops over
# C arrays, and a server without regular expressions never reaches PCRE2.

cdef int host_name(const char *v, int n, char *out, int cap) noexcept nogil:
    # nginx's $host from a Host value: lower case, without the port and a trailing dot.
    cdef int i = 0, j = 0, end = n
    cdef char ch
    while i < n and (v[i] == b' ' or v[i] == b'\t'):
        i += 1
    while end > i and (v[end - 1] == b' ' or v[end - 1] == b'\t'):
        end -= 1
    if i < end and v[i] == b'[':
        while i < end and j < cap:
            ch = v[i]
            out[j] = ch + 32 if c'A' <= ch <= c'Z' else ch
            j += 1
            i += 1
            if ch == b']':
                break
        return j
    while i < end and v[i] != b':' and j < cap:
        ch = v[i]
        out[j] = ch + 32 if c'A' <= ch <= c'Z' else ch
        j += 1
        i += 1
    while j > 0 and out[j - 1] == b'.':
        j -= 1
    return j


cdef Server *route_server(Listener *l, const char *host, int n) noexcept nogil:
    cdef int i
    cdef NameEntry *ne
    if n > 0:
        for i in range(l.nexact):
            ne = &l.exact[i]
            if ne.len == n and memcmp(ne.name, host, n) == 0:
                return ne.server
        for i in range(l.nhead):
            ne = &l.head[i]
            if ne.len <= n and memcmp(ne.name, host + n - ne.len, ne.len) == 0:
                return ne.server
        for i in range(l.ntail):
            ne = &l.tail[i]
            if ne.len <= n and memcmp(ne.name, host, ne.len) == 0:
                return ne.server
        for i in range(l.nregex):
            if fastws_regex_match(l.regex[i], host, n):
                return l.regex_server[i]
    return l.default_server


cdef Loc *route_location(Server *s, const char *path, int n) noexcept nogil:
    cdef int lo = 0, hi = s.nexact - 1, mid, cmp, i
    cdef Loc *loc
    cdef Loc *found = NULL
    while lo <= hi:
        mid = (lo + hi) >> 1
        loc = s.exact[mid]
        cmp = memcmp(loc.path, path, loc.pathlen if loc.pathlen < n else n)
        if cmp == 0:
            cmp = loc.pathlen - n
        if cmp == 0:
            return loc
        if cmp < 0:
            lo = mid + 1
        else:
            hi = mid - 1
    for i in range(s.nprefix):
        loc = s.prefix[i]
        if loc.pathlen <= n and memcmp(loc.path, path, loc.pathlen) == 0:
            found = loc
            break
    if found != NULL and found.noregex:
        return found
    for i in range(s.nregex):
        loc = s.regex[i]
        if fastws_regex_match(loc.regex, path, n):
            return loc
    return found


cdef bint access_allowed(Loc *loc, sockaddr_in6 *client) noexcept nogil:
    # ngx_http_access_handler: the rules in order, the first that matches decides
    return rules_match(loc.rules, loc.nrules, client, True)


cdef bint rules_match(AccessRule *rules, int nrules, sockaddr_in6 *client,
                      bint otherwise) noexcept nogil:
    # The `allow` of the first rule matching the client (an IPv4-mapped IPv6 address is
    # matched as IPv4, as $remote_addr shows it), else `otherwise`.
    cdef const unsigned char *a
    cdef unsigned char mapped[4]
    cdef int family = client.sin6_family, i, n
    cdef AccessRule *r
    if family == AF_INET:
        a = <const unsigned char *>&(<sockaddr_in *>client).sin_addr
    else:
        a = <const unsigned char *>&client.sin6_addr
        for i in range(10):
            if a[i]:
                break
        else:
            if a[10] == 0xff and a[11] == 0xff:
                memcpy(mapped, a + 12, 4)
                a = mapped
                family = AF_INET
    for i in range(nrules):
        r = &rules[i]
        if r.family == 0:
            return r.allow
        if r.family != family:
            continue
        n = r.prefix >> 3
        if memcmp(r.addr, a, n) != 0:
            continue
        if r.prefix & 7 and ((r.addr[n] ^ a[n]) & (0xff00 >> (r.prefix & 7)) & 0xff):
            continue
        return r.allow
    return otherwise


cdef void real_ip(Server *s, Conn *c, Head *h, const char *base) noexcept nogil:
    # nginx's realip (ngx_http_realip_handler, ngx_http_get_forwarded_addr): from a trusted
    # peer, the client is the address the header names; with X-Forwarded-For the rightmost one,
    # or (recursive) the rightmost one that is not itself trusted.
    cdef Header *hd
    cdef const char *v
    cdef int n, end, start, i
    cdef char text[64]
    cdef sockaddr_in6 found
    memcpy(&c.raddr, &c.paddr, sizeof(sockaddr_in6))
    c.peer_trusted = s.ntrusted > 0 and rules_match(s.trusted, s.ntrusted, &c.paddr, False)
    if not c.peer_trusted:
        return
    if s.real_ip_pp:
        # real_ip_header proxy_protocol: the address and port the PROXY header named
        if c.pp != NULL:
            memcpy(&c.raddr, &c.pp.src, sizeof(sockaddr_in6))
        return
    hd = head_find(h, s.real_ip_header, s.real_ip_header_len)
    if hd == NULL:
        return
    # the last field of that name holds the nearest hops (XFF lists combine in order)
    for i in range(h.nheaders - 1, -1, -1):
        if h.headers[i].name.len == s.real_ip_header_len and strncasecmp(
                base + h.headers[i].name.off, s.real_ip_header, s.real_ip_header_len) == 0:
            hd = &h.headers[i]
            break
    v = base + hd.value.off
    end = hd.value.len
    while end > 0:
        while end > 0 and (v[end - 1] == b' ' or v[end - 1] == b',' or v[end - 1] == b'\t'):
            end -= 1
        start = end
        while start > 0 and v[start - 1] != b',' and v[start - 1] != b' ':
            start -= 1
        n = end - start
        if n <= 0 or n >= <int>sizeof(text):
            return
        memcpy(text, v + start, n)
        text[n] = 0
        memset(&found, 0, sizeof(found))
        if inet_pton(AF_INET, text, &(<sockaddr_in *>&found).sin_addr) == 1:
            found.sin6_family = AF_INET
            (<sockaddr_in *>&found).sin_port = (<sockaddr_in *>&c.paddr).sin_port
        elif inet_pton(AF_INET6, text, &found.sin6_addr) == 1:
            found.sin6_family = AF_INET6
            found.sin6_port = c.paddr.sin6_port
        else:
            return                        # not an address: the peer stays the client
        memcpy(&c.raddr, &found, sizeof(found))
        if not s.real_ip_recursive or not rules_match(s.trusted, s.ntrusted, &found, False):
            return
        end = start


cdef int unhex(char ch) noexcept nogil:
    if c'0' <= ch <= c'9':
        return ch - c'0'
    if c'a' <= ch <= c'f':
        return ch - c'a' + 10
    if c'A' <= ch <= c'F':
        return ch - c'A' + 10
    return -1


cdef int percent_decode(const char *s, int n, char *out) noexcept nogil:
    # %XX escapes decoded (an invalid one is kept as it is, as Python's unquote); out has room
    # for n bytes.
    cdef int i = 0, j = 0, hi, lo
    while i < n:
        if s[i] == b'%' and i + 2 < n:
            hi = unhex(s[i + 1])
            lo = unhex(s[i + 2])
            if hi >= 0 and lo >= 0:
                out[j] = <char>(hi * 16 + lo)
                j += 1
                i += 3
                continue
        out[j] = s[i]
        j += 1
        i += 1
    return j
