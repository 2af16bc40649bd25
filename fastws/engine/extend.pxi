# The control plane's extension points: the only places where a connection's path calls Python,
# and only for what a configuration names (a custom balancer, a status page).

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
    """A request as Python code sees it (a custom balancer's `ctx`): `variable(name)` is nginx's
    $name, evaluated by the engine's own variables from a copy of the request head, and
    `remote_addr` the client's address."""

    cdef readonly str remote_addr
    cdef bytes _head
    cdef Head _h
    cdef Conn _c
    cdef Req _r
    cdef Eng *_e

    def variable(self, str name):
        """The value of $name ("" when it has none); ValueError for an unknown variable."""
        from fastws.variables import lookup
        var = lookup(name)
        cdef bytes arg = var.arg.encode()
        cdef fastws_buf *out = &self._e.vbuf
        out.len = 0
        var_put(self._e, &self._c, NULL, var.number, arg, len(arg), out)
        return out.p[:out.len].decode("latin-1") if out.len else ""

    def __dealloc__(self):
        head_free(&self._h)


cdef int select_custom(Eng *e, int gi, Selection *s, object ctx) except -3:
    # a custom balancer (balancer = "package.module:Class"): Python chooses, with the GIL
    return (<UpstreamGroup>e.group_objs[gi]).select_custom(s, ctx)


cdef PyObject *request_view(Eng *e, Conn *c) noexcept with gil:
    # made while the request head is at hand; the view keeps its own copy
    cdef RequestView v = RequestView.__new__(RequestView)
    cdef Head *h = c.req.head
    sockaddr_text(<sockaddr *>&c.raddr, e.addrbuf, sizeof(e.addrbuf))
    v.remote_addr = e.addrbuf.decode()
    v._e = e
    v._head = PyBytes_FromStringAndSize(h.base, h.size)
    memcpy(&v._c, c, sizeof(Conn))
    v._c.req = &v._r
    v._c.in_ = NULL
    v._c.log = NULL
    v._c.up = NULL
    memset(&v._c.flow, 0, sizeof(v._c.flow))
    if parse_request(&v._h, PyBytes_AS_STRING(v._head), h.size, 1 << 30) == 0:
        v._r.head = &v._h
    Py_INCREF(v)
    return <PyObject *>v
