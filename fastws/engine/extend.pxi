# The control plane's extension points: the only places where a connection's path calls Python,
# and only for what a configuration names (a custom balancer, a status page; Python hooks are in
# engine/hooks.pxi).

cdef void status_answer(Eng *e, Conn *c) noexcept nogil:
    # A status location: the control plane renders the page (summed over every worker).
    with gil:
        try:
            (<Engine>e.owner)._status_answer(c)
        except Exception as exc:
            import logging
            logging.getLogger("fastws").exception("status page failed")
            conn_fail(e, c, 500, "the status page failed")


@cython.final
cdef class RequestView:
    """A request as Python code sees it (a hook's `request`, a custom balancer's `ctx`; the
    protocol fastws.hooks.Request describes it): a copy of its head, parsed by the engine's own
    parser, read lazily; `variable(name)` is nginx's $name, evaluated by the engine."""

    cdef readonly str client_addr
    cdef readonly int client_port
    cdef readonly str server_name
    cdef readonly str location
    cdef readonly bint websocket
    cdef readonly bint tls
    cdef readonly object tls_sni
    cdef readonly object tls_alpn
    cdef readonly object tls_client_subject
    cdef bytes _head
    cdef object _headers
    cdef object _args
    cdef object _owner                # the Engine: its tables outlive the view
    cdef Head _h
    cdef Conn _c                      # a copy: what the engine's variables read
    cdef Req _r
    cdef ProxyHeader _pp
    cdef Eng *_e

    @property
    def remote_addr(self):
        return self.client_addr

    cdef str _span(self, Span sp):
        return self._head[sp.off:sp.off + sp.len].decode("latin-1")

    @property
    def method(self):
        return self._span(self._h.method_name)

    @property
    def target(self):
        return self._span(self._h.target)

    @property
    def path(self):
        return self.target.partition("?")[0]

    @property
    def query(self):
        return self.target.partition("?")[2]

    @property
    def args(self):
        if self._args is None:
            from urllib.parse import parse_qsl
            args = {}
            for name, value in parse_qsl(self.query, keep_blank_values=True):
                args.setdefault(name, value)      # the first, as nginx's $arg_NAME
            self._args = args
        return self._args

    @property
    def headers(self):
        cdef int i
        if self._headers is None:
            from fastws.hooks import Headers
            self._headers = Headers([(self._span(self._h.headers[i].name),
                                      self._span(self._h.headers[i].value))
                                     for i in range(self._h.nheaders)])
        return self._headers

    @property
    def host(self):
        cdef char out[256]
        cdef int i = self._h.first[<int>H_HOST]
        cdef int n
        if i < 0:
            return ""
        n = host_name(PyBytes_AS_STRING(self._head) + self._h.headers[i].value.off,
                      self._h.headers[i].value.len, out, sizeof(out))
        return out[:n].decode("latin-1")

    def variable(self, str name):
        """The value of $name ("" when it has none); ValueError for an unknown variable."""
        from fastws.variables import lookup
        var = lookup(name)
        cdef bytes arg = var.arg.encode()
        cdef fastws_buf *out = &self._e.vbuf
        if (<Engine>self._owner).stopped:
            raise RuntimeError("the engine this request came through has stopped")
        if var.phase != 0:
            raise ValueError(f"${name} is known only when the log line is written")
        out.len = 0
        var_put(self._e, &self._c, NULL, var.number, arg, len(arg), out)
        return out.p[:out.len].decode("latin-1") if out.len else ""

    def __repr__(self):
        return f"<RequestView {self.method} {self.target} from {self.client_addr}>"

    def __dealloc__(self):
        head_free(&self._h)


cdef RequestView make_view(Eng *e, Conn *c):
    # made while the request head is at hand; the view keeps its own copy
    cdef RequestView v = RequestView.__new__(RequestView)
    cdef Head *h = c.req.head
    cdef FASTWS_SSL *ssl = c.io.ssl
    cdef const char *s
    cdef char text[512]
    sockaddr_text(<sockaddr *>&c.raddr, e.addrbuf, sizeof(e.addrbuf))
    v.client_addr = e.addrbuf.decode()
    v.client_port = sockaddr_port(<sockaddr *>&c.raddr)
    v.server_name = c.srv.name[:c.srv.namelen].decode("utf-8", "replace") if c.srv != NULL else ""
    v.location = c.loc.path[:c.loc.pathlen].decode("utf-8", "replace") if c.loc != NULL else ""
    v.websocket = c.req.upgrading
    v.tls = ssl != NULL
    if ssl != NULL:
        s = fastws_ssl.get_servername(ssl, FASTWS_TLSEXT_NAMETYPE_host_name)
        v.tls_sni = s[:strlen(s)].decode("utf-8", "replace") if s != NULL else None
        if fastws_ssl_alpn(ssl, text, sizeof(text)) > 0:
            v.tls_alpn = text.decode("latin-1")
        if fastws_ssl_peer_subject(ssl, text, sizeof(text)) > 0:
            v.tls_client_subject = text.decode("utf-8", "replace")
    v._e = e
    v._owner = <object>e.owner
    v._head = PyBytes_FromStringAndSize(h.base, h.size)
    memcpy(&v._c, c, sizeof(Conn))
    # nothing the connection owns: a view may outlive it
    v._c.req = &v._r
    v._c.in_ = NULL
    v._c.log = NULL
    v._c.up = NULL
    v._c.hk = NULL
    v._c.holds = NULL
    v._c.io.ssl = NULL
    v._c.pp = NULL
    if c.pp != NULL:
        memcpy(&v._pp, c.pp, sizeof(ProxyHeader))
        v._c.pp = &v._pp
    memset(&v._c.flow, 0, sizeof(v._c.flow))
    if parse_request(&v._h, PyBytes_AS_STRING(v._head), h.size, 1 << 30) == 0:
        v._r.head = &v._h
    return v


cdef PyObject *request_view(Eng *e, Conn *c) noexcept with gil:
    # a custom balancer's ctx: a new reference, which the request holds
    cdef RequestView v = make_view(e, c)
    Py_INCREF(v)
    return <PyObject *>v


cdef int select_custom(Eng *e, int gi, Selection *s, object ctx) except -3:
    # a custom balancer (balancer = "package.module:Class"): Python chooses, with the GIL
    return (<UpstreamGroup>e.group_objs[gi]).select_custom(s, ctx)
