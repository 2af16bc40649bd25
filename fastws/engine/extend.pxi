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
    """A request as a custom balancer sees it: `variable(name)` as nginx's $name, and
    `remote_addr`."""
    cdef readonly str remote_addr


cdef int select_custom(Eng *e, int gi, Selection *s, object ctx) except -3:
    # a custom balancer (balancer = "package.module:Class"): Python chooses, with the GIL
    return (<UpstreamGroup>e.group_objs[gi]).select_custom(s, ctx)


cdef PyObject *request_view(Eng *e, Conn *c) noexcept with gil:
    cdef RequestView v = RequestView.__new__(RequestView)
    sockaddr_text(<sockaddr *>&c.raddr, e.addrbuf, sizeof(e.addrbuf))
    v.remote_addr = e.addrbuf.decode()
    Py_INCREF(v)
    return <PyObject *>v
