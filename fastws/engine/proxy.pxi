# The PROXY protocol (haproxy.org/download/2.9/doc/proxy-protocol.txt), versions 1 and 2:
# read on the listeners that ask for it, before TLS and the request head; written at the start
# of each new connection to the upstream groups that ask for it.
#
# Reading peeks (MSG_PEEK) and then takes exactly the header's bytes, as HAProxy's
# conn_recv_proxy does, so that what follows (a TLS ClientHello, a request head) stays in the
# socket for the code that reads it next.  A connection whose first bytes are not a valid
# header is closed and counted (proxy_protocol_errors); one that sends no complete header
# within client_header_timeout too.

cdef const char *PP2_SIGNATURE = b"\r\n\r\n\0\r\nQUIT\n"
cdef enum:
    PP1_MAX = 107                # "PROXY TCP6 " + two longest addresses and ports + CRLF
    PP2_MAX = 16 + 4096          # a v2 header with its TLVs; longer ones are refused


cdef int pp_port(const char *s, int n) noexcept nogil:
    # a decimal port, 0-65535, without leading zeros (as the specification asks); -1 if not
    cdef int i, v = 0
    if n < 1 or n > 5 or (n > 1 and s[0] == c'0'):
        return -1
    for i in range(n):
        if s[i] < c'0' or s[i] > c'9':
            return -1
        v = v * 10 + (s[i] - c'0')
    return v if v <= 65535 else -1


cdef int pp_addr(int family, const char *s, int n, int port, sockaddr_in6 *out) noexcept nogil:
    cdef char text[48]
    if n <= 0 or n >= <int>sizeof(text):
        return -1
    memcpy(text, s, n)
    text[n] = 0
    memset(out, 0, sizeof(sockaddr_in6))
    if family == AF_INET:
        if inet_pton(AF_INET, text, &(<sockaddr_in *>out).sin_addr) != 1:
            return -1
        (<sockaddr_in *>out).sin_family = AF_INET
        (<sockaddr_in *>out).sin_port = htons(<unsigned short>port)
    else:
        if inet_pton(AF_INET6, text, &out.sin6_addr) != 1:
            return -1
        out.sin6_family = AF_INET6
        out.sin6_port = htons(<unsigned short>port)
    return 0


cdef int pp_parse_v1(const char *p, int n, ProxyHeader *h) noexcept nogil:
    # "PROXY TCP4 198.51.100.22 203.0.113.7 35646 80\r\n", or "PROXY UNKNOWN ...\r\n"
    cdef const char *end
    cdef const char *f[4]
    cdef int flen[4]
    cdef int i, k, family, start, sport, dport, lim = n if n < PP1_MAX else PP1_MAX
    end = <const char *>memchr(p, c'\n', lim)
    if end == NULL:
        return 0 if n < PP1_MAX else -1
    lim = <int>(end - p) + 1
    if lim < 8 or p[lim - 2] != c'\r':
        return -1
    if lim >= 15 and memcmp(p + 6, b"UNKNOWN", 7) == 0 and (p[13] == c' ' or p[13] == c'\r'):
        h.known = 0                   # the sender does not know the addresses: keep the peer's
        return lim
    if lim < 11 or p[10] != c' ' or memcmp(p + 6, b"TCP", 3) != 0:
        return -1
    if p[9] == c'4':
        family = AF_INET
    elif p[9] == c'6':
        family = AF_INET6
    else:
        return -1
    # four fields, each after one space: source, destination, their ports
    start = 11
    k = 0
    for i in range(11, lim - 1):
        if p[i] == c' ' or p[i] == c'\r':
            if k == 4 or i == start:
                return -1
            f[k] = p + start
            flen[k] = i - start
            k += 1
            start = i + 1
    if k != 4 or start != lim - 1:
        return -1
    sport = pp_port(f[2], flen[2])
    dport = pp_port(f[3], flen[3])
    if sport < 0 or dport < 0 or pp_addr(family, f[0], flen[0], sport, &h.src) < 0 or \
            pp_addr(family, f[1], flen[1], dport, &h.dst) < 0:
        return -1
    h.known = 1
    return lim


cdef int pp_parse_v2(const unsigned char *p, int n, ProxyHeader *h) noexcept nogil:
    # the 12-byte signature, version and command, family, length, then the addresses and TLVs
    cdef int total, fam, cmd
    cdef sockaddr_in *s4
    cdef sockaddr_in *d4
    if n < 16:
        return 0
    if p[12] >> 4 != 2:
        return -1
    cmd = p[12] & 0x0f
    fam = p[13]
    total = 16 + (p[14] << 8 | p[15])
    if total > PP2_MAX:
        return -1
    if n < total:
        return 0
    h.known = 0
    if cmd == 0:
        return total                  # LOCAL: the sender's own connection (a health check)
    if cmd != 1:
        return -1
    memset(&h.src, 0, sizeof(sockaddr_in6))
    memset(&h.dst, 0, sizeof(sockaddr_in6))
    if fam == 0x11 or fam == 0x12:    # TCP or UDP over IPv4
        if total < 16 + 12:
            return -1
        s4 = <sockaddr_in *>&h.src
        d4 = <sockaddr_in *>&h.dst
        s4.sin_family = d4.sin_family = AF_INET
        memcpy(&s4.sin_addr, p + 16, 4)
        memcpy(&d4.sin_addr, p + 20, 4)
        memcpy(&s4.sin_port, p + 24, 2)
        memcpy(&d4.sin_port, p + 26, 2)
        h.known = 1
    elif fam == 0x21 or fam == 0x22:  # over IPv6
        if total < 16 + 36:
            return -1
        h.src.sin6_family = h.dst.sin6_family = AF_INET6
        memcpy(&h.src.sin6_addr, p + 16, 16)
        memcpy(&h.dst.sin6_addr, p + 32, 16)
        memcpy(&h.src.sin6_port, p + 48, 2)
        memcpy(&h.dst.sin6_port, p + 50, 2)
        h.known = 1
    elif fam != 0x00 and fam != 0x31 and fam != 0x32:
        return -1                     # UNSPEC and unix sockets carry no address we use
    return total


cdef int pp_parse(const char *p, int n, ProxyHeader *h) noexcept nogil:
    # The header's length; 0: more bytes are needed; -1: not a PROXY protocol header.
    cdef int k = n if n < 12 else 12
    if n <= 0:
        return 0
    if memcmp(p, PP2_SIGNATURE, k) == 0:
        return pp_parse_v2(<const unsigned char *>p, n, h) if n >= 12 else 0
    k = n if n < 6 else 6
    if memcmp(p, b"PROXY ", k) != 0:
        return -1
    return pp_parse_v1(p, n, h) if n >= 6 else 0


# --- on a listener -------------------------------------------------------------------------

cdef void pp_read(Eng *e, Conn *c) noexcept nogil:
    # CS_PROXY: the header, whole, then the connection goes on as accepted (TLS or the head).
    cdef ssize_t n
    cdef int r
    cdef ProxyHeader h
    if not c.io.rd_ready:
        return
    n = recv(c.io.fd, e.buf, PP2_MAX if e.bufsize > PP2_MAX else e.bufsize, MSG_PEEK)
    if n < 0 and (errno == EAGAIN or errno == EINTR):
        c.io.rd_ready = 0
        return
    if n <= 0:
        conn_close(e, c)              # gone before its header: nothing to count
        return
    memset(&h, 0, sizeof(h))
    r = pp_parse(e.buf, <int>n, &h)
    if r == 0:
        c.io.rd_ready = 0             # the rest comes with the next edge
        return
    if r < 0:
        pp_refuse(e, c, "an invalid PROXY protocol header")
        return
    if recv(c.io.fd, e.buf, r, 0) != r:
        conn_close(e, c)
        return
    if h.known:
        c.pp = <ProxyHeader *>malloc(sizeof(ProxyHeader))
        if c.pp == NULL:
            conn_close(e, c)
            return
        memcpy(c.pp, &h, sizeof(h))
    if c.lis.tls:
        tls_accept_start(e, c)
    else:
        conn_set_state(e, c, CS_HEAD)
        conn_run(e, c)


cdef void pp_refuse(Eng *e, Conn *c, const char *why) noexcept nogil:
    e.n.proxy_protocol_errors += 1
    eng_log(e, LOG_INFO, "closed %s: %s", conn_addr(e, c), why)
    conn_close(e, c)


# --- to an upstream ------------------------------------------------------------------------

cdef int pp_write(Conn *c, int version, char *out) noexcept nogil:
    # The header naming the client (after realip) and the address it connected to: the one a
    # PROXY header named, else the client socket's own.  Returns its length (at most 108 + 1).
    cdef sockaddr_in6 src, dst
    cdef socklen_t dlen = sizeof(dst)
    cdef char a[48]
    cdef char b[48]
    cdef int n
    memcpy(&src, &c.raddr, sizeof(src))
    if c.pp != NULL:
        memcpy(&dst, &c.pp.dst, sizeof(dst))
    else:
        memset(&dst, 0, sizeof(dst))
        getsockname(c.io.fd, <sockaddr *>&dst, &dlen)
        sockaddr_unmap(&dst)
    if src.sin6_family != dst.sin6_family:
        pp_map(&src)                  # one family for both, as HAProxy: IPv4 as ::ffff:a.b.c.d
        pp_map(&dst)
    if version == 1:
        sockaddr_text(<sockaddr *>&src, a, sizeof(a))
        sockaddr_text(<sockaddr *>&dst, b, sizeof(b))
        return snprintf(out, 120, "PROXY TCP%c %s %s %d %d\r\n",
                        c'4' if src.sin6_family == AF_INET else c'6', a, b,
                        sockaddr_port(<sockaddr *>&src), sockaddr_port(<sockaddr *>&dst))
    memcpy(out, PP2_SIGNATURE, 12)
    out[12] = 0x21                    # version 2, PROXY
    if src.sin6_family == AF_INET:
        out[13] = 0x11
        out[14] = 0
        out[15] = 12
        memcpy(out + 16, &(<sockaddr_in *>&src).sin_addr, 4)
        memcpy(out + 20, &(<sockaddr_in *>&dst).sin_addr, 4)
        memcpy(out + 24, &(<sockaddr_in *>&src).sin_port, 2)
        memcpy(out + 26, &(<sockaddr_in *>&dst).sin_port, 2)
        return 28
    out[13] = 0x21
    out[14] = 0
    out[15] = 36
    memcpy(out + 16, &src.sin6_addr, 16)
    memcpy(out + 32, &dst.sin6_addr, 16)
    memcpy(out + 48, &src.sin6_port, 2)
    memcpy(out + 50, &dst.sin6_port, 2)
    return 52


cdef void pp_map(sockaddr_in6 *sa) noexcept nogil:
    cdef sockaddr_in *sin = <sockaddr_in *>sa
    cdef unsigned char v4[4]
    cdef unsigned short port
    if sa.sin6_family == AF_INET:
        port = sin.sin_port
        memcpy(v4, &sin.sin_addr, 4)
        memset(sa, 0, sizeof(sockaddr_in6))
        sa.sin6_family = AF_INET6
        sa.sin6_port = port
        memcpy(sa.sin6_addr.s6_addr, V4MAPPED, 12)
        memcpy(sa.sin6_addr.s6_addr + 12, v4, 4)


cdef int pp_send(Eng *e, Conn *c, int version) noexcept nogil:
    # On a new upstream connection, before anything else: 1 sent, 0 not connected yet,
    # -errno on failure.  The header is small and the socket new: it goes whole or not at all.
    cdef char hdr[128]
    cdef int n = pp_write(c, version, hdr)
    cdef ssize_t r = io_send(e, &c.up.io, hdr, n)
    if r == -EAGAIN:
        return 0
    if r < 0:
        return <int>r
    if r < n:
        return -EPROTO
    return 1


def proxy_header_parse(bytes data):
    """The engine's PROXY protocol reader, for the tests: None if more bytes are needed,
    ValueError if the bytes are not a header, else (length, source, destination) where each
    address is (host, port) or None for a header that names none (LOCAL, UNKNOWN)."""
    cdef ProxyHeader h
    cdef char a[48]
    cdef int r
    memset(&h, 0, sizeof(h))
    r = pp_parse(PyBytes_AS_STRING(data), <int>PyBytes_GET_SIZE(data), &h)
    if r == 0:
        return None
    if r < 0:
        raise ValueError("not a PROXY protocol header")
    if not h.known:
        return r, None, None
    sockaddr_text(<sockaddr *>&h.src, a, sizeof(a))
    src = (a.decode(), sockaddr_port(<sockaddr *>&h.src))
    sockaddr_text(<sockaddr *>&h.dst, a, sizeof(a))
    return r, src, (a.decode(), sockaddr_port(<sockaddr *>&h.dst))
