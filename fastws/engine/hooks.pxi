# Python hooks (fastws/hooks.py): the one place where a request's path calls Python code that
# the configuration names, and only for the locations that name it.
#
# A location's hook is called once the request is routed and checked (access, limits, the
# handshake's own checks), before an upstream server is chosen.  A plain function decides at
# once; a coroutine runs on the control plane's event loop while its connection waits in
# CS_HOOK, holding a copy of its head, with one deadline (hook_timeout, then 504).  The decision
# is applied here, as C values the Python side prepared (hooks.Hook.decide): an answer of the
# proxy's own, another group or server, request headers dropped and added, the hash key, and
# $hook_NAME values.  A closed tunnel's figures go to its location's on_tunnel_close after the
# turn, in one batch (Engine._deliver_closed).

cdef enum:
    HOOK_GO = 0               # go on: the decision is applied
    HOOK_DONE = -1            # answered or closed
    HOOK_WAIT = 1             # a coroutine runs; the connection waits in CS_HOOK


cdef void hooked_clear(Hooked *hk) noexcept nogil:
    free(hk.saved)
    free(hk.drop)
    free(hk.add)
    free(hk.key)
    free(hk.vars)
    free(hk.place)
    memset(hk, 0, sizeof(Hooked))
    hk.group = hk.peer = hk.close_hook = -1


cdef Hooked *hooked_new(Eng *e, Conn *c) noexcept nogil:
    # c.hk, made if it is not there
    if c.hk == NULL:
        c.hk = <Hooked *>calloc(1, sizeof(Hooked))
        if c.hk == NULL:
            return NULL
        held_count(e, DBG_BUFFERS, 1)
        c.hk.group = c.hk.peer = c.hk.close_hook = -1
    return c.hk


cdef void hooked_trim(Hooked *hk) noexcept nogil:
    # A tunnel began: only the $hook_ values are needed now.
    free(hk.saved)
    free(hk.drop)
    free(hk.add)
    free(hk.key)
    hk.saved = hk.drop = hk.add = hk.key = NULL
    hk.saved_len = hk.drop_len = hk.add_len = hk.keylen = 0


cdef void hooked_free(Eng *e, Conn *c) noexcept nogil:
    # The connection closes, or its next request begins: a coroutine still running is
    # cancelled (its decision would find no one).
    cdef Hooked *hk = c.hk
    if hk == NULL:
        return
    if hk.ticket or hk.result != NULL:
        with gil:
            if hk.result != NULL:
                Py_DECREF(<object>hk.result)
                hk.result = NULL
            if hk.ticket:
                try:
                    (<Engine>e.owner)._hook_forget(hk.ticket)
                except BaseException:     # (a loop already closed: nothing left to cancel)
                    pass
    hooked_clear(hk)
    free(hk)
    c.hk = NULL
    held_count(e, DBG_BUFFERS, -1)


cdef int hook_start(Eng *e, Conn *c, const char *base, int end, char *rest,
                    int restlen) noexcept nogil:
    # Call the location's hook for the request whose head is base[:end] (rest: what followed).
    cdef Hooked *hk
    cdef int r
    hooked_free(e, c)
    hk = hooked_new(e, c)
    if hk == NULL:
        conn_close(e, c)
        return HOOK_DONE
    hk.t_call = e.now
    r = hook_call(e, c, rest, restlen)
    if r != HOOK_WAIT:
        return r
    # The head's buffer is about to be reused: keep a copy, parsed again when the decision comes.
    hk.saved = <char *>malloc(end + restlen if end + restlen > 0 else 1)
    if hk.saved == NULL:
        conn_close(e, c)
        return HOOK_DONE
    memcpy(hk.saved, base, end)
    memcpy(hk.saved + end, rest, restlen)
    hk.saved_head = end
    hk.saved_len = end + restlen
    c.req.head = NULL
    conn_set_state(e, c, CS_HOOK)
    conn_arm(e, c)
    e.control_ready = 1               # the loop's next pass starts the coroutine
    return HOOK_WAIT


cdef int hook_call(Eng *e, Conn *c, char *rest, int restlen) noexcept with gil:
    cdef Engine eng = <Engine>e.owner
    try:
        d = eng._hook_call(c.loc.hook, make_view(e, c), c.number, <size_t>c)
    except BaseException as exc:      # (_hook_call catches what the hook raises)
        d = eng._hooks[c.loc.hook].failed(exc)
    if d is _HOOK_PENDING:
        c.hk.ticket = c.number        # first: whatever closes the connection now forgets it
        return HOOK_WAIT
    return hook_apply(e, c, d, rest, restlen)


cdef int hook_apply(Eng *e, Conn *c, object d, char *rest, int restlen) noexcept with gil:
    # A decision (hooks.Hook.decide's tuple), while the request's head is at hand.  A hook
    # fails closed: whatever goes wrong here answers 500, never lets the request through.
    try:
        return hook_apply_checked(e, c, d, rest, restlen)
    except BaseException as exc:
        _hook_log.error("the decision of the hook of location %s could not be applied: "
                        "%s: %s", c.loc.path.decode("utf-8", "replace"), type(exc).__name__,
                        exc)
        if c.state != CS_CLOSED:
            conn_answer(e, c, 500, NULL, NULL, 0, NULL, 0)
        return HOOK_DONE


cdef int hook_apply_checked(Eng *e, Conn *c, object d, char *rest, int restlen) except -2:
    cdef Hooked *hk = c.hk
    cdef Req *req = c.req
    cdef bytes extra, body, ctype, drop, add, key, values
    cdef int status
    if d is None:
        return HOOK_GO
    status, extra, body, ctype, group, peer, drop, add, key, values = d
    if len(values):
        hk.vars = hook_copy(values, &hk.vars_len)
        if hk.vars == NULL:
            conn_close(e, c)
            return HOOK_DONE
        if c.log != NULL:
            # the log line's request part again, now with the $hook_ values
            log_free(e, c)
            log_begin(e, c, c.loc.log)
    if status:
        if body is None:
            # the status's error page, and the connection closes (as the proxy's own errors)
            conn_answer(e, c, status, extra, NULL, 0, NULL, 0)
        elif req.upgrading:
            # a refused handshake: what followed its head may be the client's first frames
            conn_answer(e, c, status, extra, body, len(body), ctype, 0)
        else:
            request_local(e, c, rest, restlen)
            conn_answer(e, c, status, extra, body, len(body), ctype, req.client_ka)
        return HOOK_DONE
    if group >= 0:
        req.group = group
        hk.peer = peer
    if len(drop):
        hk.drop = hook_copy(drop, &hk.drop_len)
    if len(add):
        hk.add = hook_copy(add, &hk.add_len)
    if key is not None:
        hk.key = hook_copy(key, &hk.keylen)
        hk.key_set = 1
    if (len(drop) and hk.drop == NULL) or (len(add) and hk.add == NULL) or \
            (key is not None and hk.key == NULL):
        conn_close(e, c)
        return HOOK_DONE
    return HOOK_GO


cdef char *hook_copy(bytes data, int *n) noexcept:
    cdef char *p = bytes_copy(data)
    if p != NULL:
        n[0] = <int>len(data)
    return p


cdef void hook_resume(Eng *e, Conn *c) noexcept nogil:
    # CS_HOOK: a coroutine's decision has come (or an edge woke us before it: nothing to do).
    cdef Hooked *hk = c.hk
    cdef Head *h = &e.head
    cdef char *saved
    cdef int r, head, restlen
    if hk == NULL:
        return
    if hk.result == NULL:
        # an edge before the decision: the client may have gone (nginx's
        # ngx_http_upstream_check_broken_connection); its hook is cancelled then
        if c.io.rdhup or c.io.rderr:
            eng_log(e, LOG_INFO, "client %s closed the connection while its hook ran",
                    conn_addr(e, c))
            conn_close(e, c)
        return
    # the head parsed again from its copy: it was parsed whole before, it is whole now
    if parse_request(h, hk.saved, hk.saved_head, 1 << 30) != 0:
        conn_close(e, c)
        return
    c.req.head = h
    conn_set_state(e, c, CS_ROUTE)
    saved = hk.saved
    head = hk.saved_head
    restlen = hk.saved_len - head
    hk.saved = NULL                   # ours now: freed once the request is on its way
    with gil:
        boxed = <object>hk.result
        Py_DECREF(boxed)
        hk.result = NULL
        r = hook_apply(e, c, boxed[0], saved + head, restlen)
    if r == HOOK_GO:
        request_proceed(e, c, h, saved, saved + head, restlen)
    free(saved)


cdef void hook_timed_out(Eng *e, Conn *c) noexcept nogil:
    eng_log(e, LOG_ERROR, "the hook of location %s gave no decision within %.3gs, client: %s",
            c.loc.path, c.loc.hook_timeout, conn_addr(e, c))
    hooked_free(e, c)
    conn_fail(e, c, 504, "the location's hook timed out")


cdef inline bint hook_drops(Hooked *hk, const char *name, int n) noexcept nogil:
    # Is this request header one the decision removes or replaces?
    cdef int pos = 0, k
    if hk == NULL or hk.drop == NULL:
        return False
    while pos < hk.drop_len:
        k = <int>strlen(hk.drop + pos)
        if k == n and strncasecmp(hk.drop + pos, name, n) == 0:
            return True
        pos += k + 1
    return False


cdef void hook_var(Conn *c, const char *name, int n, fastws_buf *out) noexcept nogil:
    # $hook_NAME
    cdef Hooked *hk = c.hk
    cdef int pos = 0, k, v
    if hk == NULL or hk.vars == NULL:
        return
    while pos < hk.vars_len:
        k = <int>strlen(hk.vars + pos)
        v = <int>strlen(hk.vars + pos + k + 1)
        if k == n and memcmp(hk.vars + pos, name, n) == 0:
            buf_add(out, hk.vars + pos + k + 1, v)
            return
        pos += k + v + 2


cdef void hook_tunnel_begins(Eng *e, Conn *c) noexcept nogil:
    # A tunnel of a location with on_tunnel_close: the callback goes with it (to its close, or
    # to the worker it is handed to on a reload).
    cdef Hooked *hk = hooked_new(e, c)
    if hk != NULL:
        hk.close_hook = c.loc.close_hook


cdef list tunnel_place(Conn *c):
    # [server name, location] a tunnel came through: its own, or (adopted) where it was
    if c.loc != NULL:
        return [c.srv.name[:c.srv.namelen].decode("utf-8", "replace"),
                c.loc.path[:c.loc.pathlen].decode("utf-8", "replace")]
    return c.hk.place[:c.hk.place_len].decode("utf-8", "replace").split("\0")[:2]


cdef void hook_tunnel_closed(Eng *e, Conn *c, int reason) noexcept nogil:
    # A tunnel with an on_tunnel_close callback: its figures, for the control plane to deliver
    # after the turn.
    cdef const char *upstream = ""
    cdef const char *why = close_reason(reason)
    cdef const char *by = ""
    cdef int frames = c.flow[0].mode == FLOW_FRAMES
    cdef Hooked *hk = c.hk
    if frames:
        by = ws_closed_by(c)
    if c.up != NULL and c.up.group >= 0 and c.up.peer >= 0:
        upstream = e.groups[c.up.group].peers[c.up.peer].name
    sockaddr_text(<sockaddr *>&c.raddr, e.addrbuf, sizeof(e.addrbuf))
    with gil:
        server, location = tunnel_place(c)
        (<Engine>e.owner)._closed.append((
            hk.close_hook, e.addrbuf.decode(), sockaddr_port(<sockaddr *>&c.raddr),
            server, location,
            upstream[:strlen(upstream)].decode("utf-8", "replace"),
            c.flow[0].nbytes, c.flow[1].nbytes,
            c.flow[0].ws.messages if frames else 0, c.flow[1].ws.messages if frames else 0,
            e.now - c.started, why[:strlen(why)].decode(),
            ws_close_code(c) if frames else 0, by[:strlen(by)].decode(),
            hk.vars[:hk.vars_len] if hk.vars != NULL else b""))
