# Tunnels handed to another process on a reload: what an exported tunnel carries (its sockets,
# the bytes in flight, its accounting and its log line's state), as a typed record.

@cython.final
cdef class ExportedTunnel:
    """A tunnel taken out of an engine whole, to go on in another process (a reload): its two
    sockets (the caller owns them now), the bytes in flight each way, and what its accounting
    and its log line need."""

    cdef readonly int client_fd
    cdef readonly int upstream_fd
    cdef readonly bytes to_upstream
    cdef readonly bytes to_client
    cdef readonly unsigned long long up
    cdef readonly unsigned long long down
    cdef readonly double age
    cdef readonly int first_eof
    cdef readonly double read_timeout
    cdef readonly double send_timeout
    cdef readonly double idle_timeout
    cdef readonly double lifetime_left     # seconds, or -1: no limit
    cdef readonly list ending       # why it ends at lifetime_left, if not its lifetime: [close
                                    # code (0: a blind tunnel), close reason]; or None
    cdef readonly str relay
    cdef readonly str upstream
    cdef readonly str peer
    cdef readonly object log        # None, or what the tunnel's access log line needs
    cdef readonly list limits       # [zone name, key hash] of each limit_conn count it holds
    cdef readonly bint websocket
    cdef readonly dict policy       # its TunnelPolicy, past idle_timeout (frames, pings, ...)
    cdef readonly list frames       # a tunnel that follows its frames: each flow's tracker
    cdef readonly dict closing      # its on_tunnel_close: the callback's path, where the tunnel
                                    # was (server, location) and its $hook_ values; or None

    _FIELDS = ("up", "down", "age", "first_eof", "read_timeout", "send_timeout", "idle_timeout",
               "lifetime_left", "ending", "relay", "upstream", "peer", "log", "limits",
               "websocket", "policy", "frames", "closing")

    def header(self):
        """Everything but the fds and the bytes in flight, as plain data (JSON-safe)."""
        out = {name: getattr(self, name) for name in self._FIELDS}
        if self.log is not None:
            out["log"] = dict(self.log, early=self.log["early"].decode("latin-1"))
        return out

    @staticmethod
    def restore(int client_fd, int upstream_fd, dict header, bytes to_upstream, bytes to_client):
        """The tunnel again, in the process it was handed to."""
        cdef ExportedTunnel t = ExportedTunnel.__new__(ExportedTunnel)
        t.client_fd = client_fd
        t.upstream_fd = upstream_fd
        t.to_upstream = to_upstream
        t.to_client = to_client
        t.up = header["up"]
        t.down = header["down"]
        t.age = header["age"]
        t.first_eof = header["first_eof"]
        t.read_timeout = header["read_timeout"]
        t.send_timeout = header["send_timeout"]
        t.idle_timeout = header.get("idle_timeout", 0.0)
        t.lifetime_left = header.get("lifetime_left", -1.0)
        t.ending = header.get("ending")
        t.relay = header["relay"]
        t.upstream = header["upstream"]
        t.peer = header["peer"]
        t.limits = header.get("limits", [])
        t.websocket = header.get("websocket", False)
        t.policy = header.get("policy") or {}
        t.frames = header.get("frames")
        t.closing = header.get("closing")
        log = header.get("log")
        t.log = dict(log, early=log["early"].encode("latin-1")) if log is not None else None
        return t


cdef dict _policy_dict(TunnelPolicy *tp):
    return {"frames": tp.frames, "max_message": tp.max_message,
            "ping_interval": tp.ping_interval, "ping_timeout": tp.ping_timeout,
            "close_timeout": tp.close_timeout, "ping_to": tp.ping_to, "checks": tp.checks}


cdef list _frames_state(Conn *c):
    cdef Flow *f
    if c.flow[0].mode != FLOW_FRAMES:
        return None
    out = []
    for d in range(2):
        f = &c.flow[d]
        out.append({"left": f.left, "msg_bytes": f.ws.msg_bytes, "messages": f.ws.messages,
                    "close_code": f.ws.close_code, "flags": f.ws.flags, "pings": f.ws.pings,
                    "carry": PyBytes_FromStringAndSize(<char *>f.ws.carry, f.ws.ncarry)
                    .decode("latin-1")})
    return out


cdef void _frames_restore(Conn *c, list state):
    cdef Flow *f
    cdef bytes carry
    for d in range(2):
        f = &c.flow[d]
        s = state[d]
        f.mode = FLOW_FRAMES
        f.left = s["left"]
        f.ws.msg_bytes = s["msg_bytes"]
        f.ws.messages = s["messages"]
        f.ws.close_code = s["close_code"]
        f.ws.flags = s["flags"]
        f.ws.pings = s["pings"]
        carry = s["carry"].encode("latin-1")[:sizeof(f.ws.carry)]
        f.ws.ncarry = len(carry)
        memcpy(f.ws.carry, <char *>carry, len(carry))


cdef bytes _held(Flow *f):
    if f.held == NULL:
        return b""
    return PyBytes_FromStringAndSize(f.held + f.held_off, f.held_len - f.held_off)


cdef int _hold_bytes(Eng *e, Flow *f, bytes data) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    cdef char *room
    if n == 0:
        return 0
    room = held_room(e, f, n)
    if room == NULL:
        return -1
    memcpy(room, PyBytes_AS_STRING(data), n)
    return 0
