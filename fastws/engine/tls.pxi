# TLS: the engine runs every handshake itself, on OpenSSL objects it makes from the contexts
# Python's ssl module configured (certificates, protocols, ciphers, ALPN, session tickets,
# verification), and reads and writes through them; wss:// and https:// then take the same
# path as ws:// and http://.
#
# fastws builds without OpenSSL's headers and without linking -lssl: the calls are resolved at
# run time in the libssl that Python's _ssl module loaded (includes/openssl.h), and the SSL_CTX*
# is borrowed from the ssl.SSLContext, checked at start-up against an SSL object the ssl module
# made itself (check_tls_context).  SNI picks a server's certificate from the engine's tables in
# OpenSSL's servername callback; renegotiation is refused by the contexts.

cdef int tls_sni(FASTWS_SSL *ssl, int *alert, void *arg) noexcept nogil:
    # OpenSSL's servername callback: the server block named by SNI, by the same rules as Host.
    cdef Conn *c = <Conn *>fastws_ssl.get_ex_data(ssl, 0)
    cdef const char *name
    cdef char host[256]
    cdef int n
    cdef Server *s
    if c == NULL:
        return FASTWS_SSL_TLSEXT_ERR_OK
    name = fastws_ssl.get_servername(ssl, FASTWS_TLSEXT_NAMETYPE_host_name)
    if name == NULL:
        return FASTWS_SSL_TLSEXT_ERR_OK
    n = host_name(name, <int>strlen(name), host, sizeof(host))
    s = route_server(c.lis, host, n)
    if s.tls_ctx != NULL and s.tls_ctx != fastws_ssl.get_ssl_ctx(ssl):
        fastws_ssl.set_ssl_ctx(ssl, s.tls_ctx)
        fastws_ssl_copy_verify(ssl, s.tls_ctx)
    return FASTWS_SSL_TLSEXT_ERR_OK


cdef FASTWS_SSL *tls_new(FASTWS_SSL_CTX *ctx, int fd, void *owner, int server) noexcept nogil:
    cdef FASTWS_SSL *ssl = fastws_ssl.new_(ctx)
    if ssl == NULL:
        return NULL
    if fastws_ssl.set_fd(ssl, fd) != 1:
        fastws_ssl.free(ssl)
        return NULL
    # Writes that must wait are repeated from wherever the held bytes are now; the 16 KiB+
    # record buffers are dropped while a connection idles; read ahead, so that one read(2)
    # brings a record's header and body, or several records.
    fastws_ssl.ctrl(ssl, FASTWS_SSL_CTRL_MODE, FASTWS_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                    | FASTWS_SSL_MODE_RELEASE_BUFFERS, NULL)
    fastws_ssl.ctrl(ssl, FASTWS_SSL_CTRL_SET_READ_AHEAD, 1, NULL)
    fastws_ssl.set_ex_data(ssl, 0, owner)
    if server:
        fastws_ssl.set_accept_state(ssl)
    else:
        fastws_ssl.set_connect_state(ssl)
    return ssl


cdef int tls_step(Io *io) noexcept nogil:
    # One go at a handshake: 1 done, 0 must wait (for the edge it asked for), -1 failed.
    cdef int r, err
    fastws_ssl.err_clear()
    r = fastws_ssl.do_handshake(io.ssl)
    if r == 1:
        return 1
    err = fastws_ssl.get_error(io.ssl, r)
    if err == FASTWS_SSL_ERROR_WANT_READ:
        io.rd_ready = 0
        return 0
    if err == FASTWS_SSL_ERROR_WANT_WRITE:
        io.wr_ready = 0
        return 0
    return -1


cdef const char *tls_error(Eng *e, Io *io) noexcept nogil:
    cdef unsigned long code = fastws_ssl.err_peek()
    if code == 0:
        if errno == 0:
            return "the peer closed the connection"
        return strerror(errno)
    fastws_ssl.err_string(code, e.tlserr, sizeof(e.tlserr))
    return e.tlserr


# --- the client side ---------------------------------------------------------------------------

cdef void tls_accept_start(Eng *e, Conn *c) noexcept nogil:
    c.io.ssl = tls_new(c.lis.default_server.tls_ctx, c.io.fd, <void *>c, 1)
    if c.io.ssl == NULL:
        conn_close(e, c)
        return
    conn_set_state(e, c, CS_TLS)
    c.io.rd_ready = 1                 # deferred accept: the ClientHello is usually here
    tls_accept_run(e, c)


cdef void tls_accept_run(Eng *e, Conn *c) noexcept nogil:
    cdef int r
    if not c.io.rd_ready and not c.io.wr_ready:
        return
    r = tls_step(&c.io)
    if r == 0:
        return
    if r < 0:
        if fastws_ssl.err_peek() & FASTWS_ERR_REASON_MASK == FASTWS_SSL_R_HTTP_REQUEST:
            # nginx's 497: a plain HTTP request on an HTTPS port gets a plain 400
            fastws_ssl.free(c.io.ssl)
            c.io.ssl = NULL
            e.n.tls_handshake_failures += 1
            conn_fail(e, c, 400, "the plain HTTP request was sent to an HTTPS port")
            return
        e.n.tls_handshake_failures += 1
        eng_log(e, LOG_INFO, "TLS handshake with %s failed: %s", conn_addr(e, c),
                tls_error(e, &c.io))
        fastws_ssl.err_clear()
        fastws_ssl.free(c.io.ssl)     # no close_notify for a connection that never was TLS
        c.io.ssl = NULL
        conn_close(e, c)
        return
    e.n.tls_handshakes += 1
    fastws_ssl.free_buffers(c.io.ssl)
    conn_set_state(e, c, CS_HEAD)
    c.io.rd_ready = 1                 # the request may have come with the handshake's end
    conn_run(e, c)


# --- the upstream side ---------------------------------------------------------------------------

cdef void tls_connect_start(Eng *e, Conn *c) noexcept nogil:
    cdef Loc *loc = c.loc
    cdef Up *u = c.up
    cdef const char *name = e.groups[u.group].peers[u.peer].host
    cdef unsigned char ip[16]
    cdef FASTWS_X509_VERIFY_PARAM *param
    if loc.tls_name != NULL:
        name = loc.tls_name
    u.io.ssl = tls_new(loc.tls_ctx, u.io.fd, <void *>u, 0)
    if u.io.ssl == NULL:
        upstream_failed(e, c, 0, "cannot start TLS to the upstream", "", 0)
        return
    u.state = UP_TLS
    if name != NULL and name[0] != 0:
        param = fastws_ssl.get0_param(u.io.ssl)
        if inet_pton(AF_INET, name, ip) == 1:
            if loc.tls_verify:
                fastws_ssl.param_set1_ip(param, ip, 4)
        elif inet_pton(AF_INET6, name, ip) == 1:
            if loc.tls_verify:
                fastws_ssl.param_set1_ip(param, ip, 16)
        else:
            # SNI for names only (RFC 6066 section 3), and the name the certificate must carry
            fastws_ssl.ctrl(u.io.ssl, FASTWS_SSL_CTRL_SET_TLSEXT_HOSTNAME,
                            FASTWS_TLSEXT_NAMETYPE_host_name, <void *>name)
            if loc.tls_verify:
                fastws_ssl.param_set1_host(param, name, 0)
    e.handshakes += 1
    tls_connect_run(e, c)


cdef void tls_connect_run(Eng *e, Conn *c) noexcept nogil:
    cdef Up *u = c.up
    cdef long verify
    cdef int r = tls_step(&u.io)
    if r == 0:
        return
    e.handshakes -= 1
    if r < 0:
        verify = fastws_ssl.get_verify_result(u.io.ssl)
        if verify != 0:
            eng_log(e, LOG_ERROR, "upstream SSL certificate verify error: (%ld:%s) while SSL "
                    "handshaking to upstream, client: %s, upstream: %s", verify,
                    fastws_ssl.verify_error_string(verify), conn_addr(e, c), upstream_name(e, c))
            upstream_failed(e, c, 0, "upstream SSL certificate verify error",
                            "while SSL handshaking to upstream", 0)
        else:
            upstream_failed(e, c, 0, "SSL handshake to upstream failed:", tls_error(e, &u.io), 0)
        return
    fastws_ssl.free_buffers(u.io.ssl)
    u.state = UP_READY
    u.io.wr_ready = 1
    u.io.rd_ready = 1
    if flow_hold(e, c, 0, c.req.uhead, c.req.uhead_len) < 0:
        conn_close(e, c)
        return
    c.flow[0].blocked_since = 0
    upstream_run(e, c)


# --- reading and writing through OpenSSL -------------------------------------------------------

cdef ssize_t tls_recv(Eng *e, Io *io, char *buf, Py_ssize_t n) noexcept nogil:
    # SSL_read until the buffer is full or OpenSSL wants the socket (WANT_READ: the socket and
    # OpenSSL are both drained, so the next edge is the one to wait for).  recv(2)'s answers.
    cdef Py_ssize_t total = 0
    cdef int r, err, saved
    while total < n:
        fastws_ssl.err_clear()
        r = fastws_ssl.read(io.ssl, buf + total, <int>(n - total if n - total < TLS_WRITE_MAX
                                                      else TLS_WRITE_MAX))
        e.n.tls_reads += 1
        if r > 0:
            total += r
            continue
        saved = errno
        err = fastws_ssl.get_error(io.ssl, r)
        if err == FASTWS_SSL_ERROR_WANT_READ:
            io.rd_ready = 0
            break
        if err == FASTWS_SSL_ERROR_WANT_WRITE:
            io.rd_ready = 0
            io.tls_want |= EPOLLOUT
            break
        if err == FASTWS_SSL_ERROR_ZERO_RETURN or (err == FASTWS_SSL_ERROR_SYSCALL and saved == 0):
            # close_notify, or a FIN without it (OpenSSL 3 reports the latter as ZERO_RETURN
            # under SSL_OP_IGNORE_UNEXPECTED_EOF, which tls.py sets)
            io.rd_ready = 0
            if total:
                io.rd_ready = 1       # the EOF comes with the next read
                return total
            io.eof = 1
            return 0
        if total:
            return total
        io.rd_ready = 0
        return -(saved if err == FASTWS_SSL_ERROR_SYSCALL and saved != 0 else EPROTO)
    if total == 0:
        return -EAGAIN
    return total


cdef ssize_t tls_send(Eng *e, Io *io, const char *buf, Py_ssize_t n) noexcept nogil:
    # SSL_write writes all or nothing (no partial writes); one that must wait is repeated with
    # the same bytes, which the caller holds (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER lets them move).
    cdef int r, err, saved
    fastws_ssl.err_clear()
    r = fastws_ssl.write(io.ssl, buf, <int>(n if n < TLS_WRITE_MAX else TLS_WRITE_MAX))
    e.n.tls_writes += 1
    if r > 0:
        return r
    saved = errno
    err = fastws_ssl.get_error(io.ssl, r)
    if err == FASTWS_SSL_ERROR_WANT_WRITE:
        io.wr_ready = 0
        return -EAGAIN
    if err == FASTWS_SSL_ERROR_WANT_READ:
        io.wr_ready = 0
        io.tls_want |= EPOLLIN
        return -EAGAIN
    return -(saved if err == FASTWS_SSL_ERROR_SYSCALL and saved != 0 else EPIPE)


# --- Python-facing API -------------------------------------------------------------------------

def load_openssl():
    """Resolve the OpenSSL calls of the engine in the libssl the ssl module loaded; True when
    the engine can do TLS."""
    import _ssl
    hint = getattr(_ssl, "__file__", None)
    cdef bytes b = hint.encode() if hint else b""
    cdef const char *path = NULL
    if hint:
        path = b
    return fastws_ssl_load(path) == 0


def check_tls_context(object ctx):
    """Raise unless the engine can use this ssl.SSLContext: its SSL_CTX* as the engine reads it
    must be the one an SSL object the ssl module made from it uses (a start-up self-test of
    the layout of CPython's private _ssl objects)."""
    import socket
    cdef FASTWS_SSL *ssl
    if not load_openssl():
        raise RuntimeError("the OpenSSL library of the ssl module cannot be found in the process")
    a, b = socket.socketpair()
    try:
        import ssl as _ssl_module
        if ctx.protocol == _ssl_module.PROTOCOL_TLS_SERVER:
            s = ctx.wrap_socket(a, server_side=True, do_handshake_on_connect=False)
        else:
            s = ctx.wrap_socket(a, server_hostname="check.invalid", do_handshake_on_connect=False)
        try:
            obj = s._sslobj
            cls = type(obj)
            if cls.__name__ != "_SSLSocket" or cls.__module__ != "_ssl":
                raise TypeError(f"unexpected ssl object {cls.__name__}")
            ssl = fastws_ssl_of(<PyObject *>obj)
            if ssl == NULL or fastws_ssl.get_fd(ssl) != s.fileno():
                raise RuntimeError("cannot find the SSL connection inside the ssl module's object")
            if fastws_ssl.get_ssl_ctx(ssl) != fastws_ctx_of(<PyObject *>ctx):
                raise RuntimeError("cannot find the SSL context inside the ssl module's object")
        finally:
            s.close()
    finally:
        a.close()
        b.close()
