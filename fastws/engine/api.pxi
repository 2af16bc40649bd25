# The Engine as Python sees it: the control plane's handle on one worker's engine.

cdef int engine_log_level(int level) noexcept nogil:
    return level


@cython.final
cdef class Engine:
    """One worker's engine.  `control` is the control plane's object: the engine calls its
    `status_page(fmt)` for status locations and `log(level, text)` with error-log messages."""

    cdef Eng *e
    cdef Arena arena
    cdef readonly object control
    cdef list _keep                   # Python objects the tables borrow from
    cdef list _groups                 # UpstreamGroup per group index
    cdef list _log_paths
    cdef list _status_formats
    cdef list _access_logs            # (file index, format index, open) per AccessLog
    cdef list _format_specs
    cdef list _regexes                # addresses of the compiled fastws_regex, freed with us
    cdef AccessLog **_als
    cdef int _nals
    cdef LogFile **_files
    cdef int _nfiles
    cdef LogFormat **_formats
    cdef int _nformats
    cdef bint loaded
    cdef bint stopped
    cdef dict _policies               # adopted tunnels' TunnelPolicy, by value: address
    cdef list _hooks                  # hooks.Hook per index (Loc.hook)
    cdef list _close_hooks            # (function, its import path) per index (Loc.close_hook)
    cdef dict _pending                # coroutine hooks running: ticket -> (task, Conn, index)
    cdef list _closed                 # closed tunnels' figures, for on_tunnel_close
    cdef readonly str backend_why     # why this back end runs (`fastws -t`, the start-up log)

    def __cinit__(self, object control=None, *, int pipe_size=262144, int max_pipes=1024,
                  int bufsize=65536, int worker_connections=4096, int log_level=20,
                  int number_step=1, int number_base=0, Py_ssize_t counters=0,
                  str engine="auto", int ring_sq=1024, int ring_cq=0):
        cdef Eng *e
        cdef unsigned int cq
        if bufsize < 4096:
            raise ValueError("bufsize must be at least 4096")
        self.e = e = <Eng *>calloc(1, sizeof(Eng))
        if e == NULL:
            raise MemoryError()
        e.owner = <PyObject *>self
        # the figures live where the status board can read them, if it gave an address
        e.n = <Counters *>counters if counters else &e.own
        memset(e.n, 0, sizeof(Counters))
        e.epfd = e.tio.fd = e.wakefd = e.ring.fd = e.ring_efd = -1
        e.pipe_size = pipe_size
        e.max_pipes = max_pipes
        e.bufsize = bufsize
        e.worker_connections = worker_connections
        e.log_level = log_level
        e.number_step = number_step
        e.number_base = number_base
        e.buf = <char *>malloc(bufsize)
        e.pathcap = bufsize
        e.pathbuf = <char *>malloc(bufsize)
        if e.buf == NULL or e.pathbuf == NULL:
            raise MemoryError()
        self.control = control
        self._keep = []
        self._groups = []
        self._log_paths = []
        self._status_formats = []
        self._access_logs = []
        self._format_specs = []
        self._policies = {}
        self._hooks = []
        self._close_hooks = []
        self._pending = {}
        self._closed = []
        # room for two completions per connection between two turns (each direction's edge);
        # past that they wait in the kernel's overflow list (IORING_FEAT_NODROP).  ring_sq and
        # ring_cq give other sizes, for the tests of a full queue.
        cq = 4096
        while ring_cq <= 0 and cq < 2 * worker_connections and cq < 65536:
            cq *= 2
        self.backend_why = _open_ring(&e.ring, engine, ring_sq, ring_cq if ring_cq > 0 else cq)
        if e.ring.fd >= 0:
            e.backend = BACKEND_URING
        if e.backend == BACKEND_EPOLL:
            e.epfd = _errcheck(epoll_create1(EPOLL_CLOEXEC))
        e.tio.kind = IO_TIMER
        e.tio.fd = _errcheck(timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC))
        _errneg(watch_add(e, &e.tio, EPOLLIN))
        e.wakefd = _errcheck(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC))
        e.reserve_fd = open("/dev/null", O_RDONLY | O_CLOEXEC)
        ws_scratch(e)                 # (held for the engine's life: opened with the rest)
        self._wake_io()
        e.now = fastws_monotonic()
        e.wall = fastws_realtime()
        e.accepting = 1
        srand(<unsigned int>(getpid() * 2654435761u) ^ <unsigned int>(e.wall * 1000))

    def __init__(self, object control=None, *, int pipe_size=262144, int max_pipes=1024,
                 int bufsize=65536, int worker_connections=4096, int log_level=20,
                 int number_step=1, int number_base=0, Py_ssize_t counters=0,
                 str engine="auto", int ring_sq=1024, int ring_cq=0):
        # (__cinit__ did the work: this gives the class its signature)
        pass

    cdef void _wake_io(self):
        # the wake-up eventfd's Io lives in the arena (its kind is all a watch needs)
        cdef Io *io = <Io *>arena_alloc(&self.arena, sizeof(Io))
        io.kind = IO_WAKE
        io.fd = self.e.wakefd
        _errneg(watch_add(self.e, io, EPOLLIN))

    # --- tables -----------------------------------------------------------------------------

    def load(self, tables):
        """Take the tables built by fastws.tables.build() (once per engine)."""
        if self.loaded:
            raise RuntimeError("the engine's tables are loaded already")
        self._load_logs(tables)
        self._load_maps(tables)
        self._load_groups(tables)
        self._load_zones(tables)
        self._load_servers(tables)
        self._hooks = list(tables.hooks)
        self._close_hooks = list(tables.close_hooks)
        self._keep.append(tables.keep)
        self.loaded = True

    cdef _load_zones(self, tables):
        cdef Eng *e = self.e
        cdef int i
        e.pid = getpid()
        e.nzones = len(tables.zones)
        e.zones = <Zone *>arena_alloc(&self.arena, sizeof(Zone) * (e.nzones + 1))
        for i, spec in enumerate(tables.zones):
            e.zones[i].shm = <fastws_zone *><Py_ssize_t>spec.address
            e.zones[i].name = arena_str(&self.arena, spec.name)
            e.zones[i].key = arena_template(&self.arena, spec.key)
            e.zones[i].kind = spec.kind

    cdef _load_logs(self, tables):
        cdef int i
        for spec in tables.log_files:
            self._add_file(spec.path, spec.fd)
        self._formats = <LogFormat **>arena_alloc(&self.arena, sizeof(LogFormat *) * (len(tables.log_formats) + 64))
        for spec in tables.log_formats:
            self._add_format(spec.parts, spec.json, spec.names, spec.early, spec.escape)
        self._als = <AccessLog **>arena_alloc(&self.arena, sizeof(AccessLog *) * (len(tables.access_logs) + 64))
        for spec in tables.access_logs:
            self._add_al(spec.file, spec.format, spec.open)

    cdef int _add_file(self, str path, int fd) except -1:
        cdef LogFile **grown
        cdef LogFile *f = <LogFile *>calloc(1, sizeof(LogFile))
        if f == NULL:
            raise MemoryError()
        f.fd = fd
        grown = <LogFile **>realloc(self._files, sizeof(LogFile *) * (self._nfiles + 1))
        if grown == NULL:
            free(f)
            raise MemoryError()
        self._files = grown
        self._files[self._nfiles] = f
        self._nfiles += 1
        self._log_paths.append(path)
        return self._nfiles - 1

    cdef int _add_format(self, parts, bint json, names, early, int escape=0) except -1:
        cdef LogFormat *fmt = <LogFormat *>arena_alloc(&self.arena, sizeof(LogFormat))
        cdef Template *t = arena_template(&self.arena, parts)
        cdef int i
        fmt.tpl = t[0]
        fmt.json = json
        fmt.escape = escape
        fmt.names = <char **>arena_alloc(&self.arena, sizeof(char *) * (len(names) + 1))
        for i, name in enumerate(names):
            fmt.names[i] = arena_str(&self.arena, name)
        fmt.nearly = len(early)
        fmt.early = <int *>arena_alloc(&self.arena, sizeof(int) * (len(early) + 1))
        for i, k in enumerate(early):
            fmt.early[i] = k
        self._formats[self._nformats] = fmt
        self._nformats += 1
        self._format_specs.append({"parts": [list(p) for p in parts], "json": json,
                                   "escape": escape,
                                   "names": list(names), "early": list(early)})
        return self._nformats - 1

    cdef int _add_al(self, int file, int format, bint opened) except -1:
        cdef AccessLog *al = <AccessLog *>arena_alloc(&self.arena, sizeof(AccessLog))
        al.file = self._files[file]
        al.format = self._formats[format]
        al.open = opened
        self._als[self._nals] = al
        self._nals += 1
        self._access_logs.append((file, format, opened))
        return self._nals - 1

    cdef _load_groups(self, tables):
        cdef Eng *e = self.e
        cdef int n = len(tables.groups), i
        e.ngroups = n
        e.groups = <Group **>arena_alloc(&self.arena, sizeof(Group *) * (n + 1))
        e.group_objs = <PyObject **>arena_alloc(&self.arena, sizeof(PyObject *) * (n + 1))
        e.group_names = <char **>arena_alloc(&self.arena, sizeof(char *) * (n + 1))
        e.hash_keys = <Template **>arena_alloc(&self.arena, sizeof(Template *) * (n + 1))
        e.pools = <Pool *>arena_alloc(&self.arena, sizeof(Pool) * (n + 1))
        e.sticky = <Sticky **>arena_alloc(&self.arena, sizeof(Sticky *) * (n + 1))
        for i, spec in enumerate(tables.groups):
            grp = spec.group
            self._groups.append(grp)
            e.groups[i] = &(<UpstreamGroup>grp).g
            e.group_objs[i] = <PyObject *>grp
            e.group_names[i] = arena_str(&self.arena, spec.name)
            e.hash_keys[i] = arena_template(&self.arena, spec.hash_key) if spec.hash_key else NULL
            e.pools[i].size = spec.keepalive
            e.pools[i].timeout = spec.keepalive_timeout
            e.pools[i].max_requests = spec.keepalive_requests
            e.pools[i].send_proxy = spec.send_proxy
            e.sticky[i] = self._sticky(spec.sticky) if spec.sticky is not None else NULL

    cdef _load_servers(self, tables):
        cdef Eng *e = self.e
        cdef int i, j, k
        cdef Loc *locs
        cdef Loc *loc
        cdef Server *servers
        cdef Server *s
        cdef Listener *l
        cdef HeaderOp *op
        locs = <Loc *>arena_alloc(&self.arena, sizeof(Loc) * (len(tables.locations) + 1))
        for i, spec in enumerate(tables.locations):
            loc = &locs[i]
            loc.path = arena_str(&self.arena, spec.path, &loc.pathlen)
            loc.exact = spec.exact
            loc.noregex = spec.noregex
            loc.regex = self._compile(spec.regex, spec.caseless) if spec.regex is not None \
                else NULL
            loc.kind = spec.kind
            loc.group = spec.group
            loc.pass_tpl = arena_template(&self.arena, spec.pass_parts) \
                if spec.pass_parts is not None else NULL
            loc.forwarded_replace = spec.forwarded_replace
            loc.norigins = len(spec.origins)
            loc.origins = <char **>arena_alloc(&self.arena, sizeof(char *) * (loc.norigins + 1))
            loc.origin_lens = <int *>arena_alloc(&self.arena, sizeof(int) * (loc.norigins + 1))
            for j, origin in enumerate(spec.origins):
                loc.origins[j] = arena_str(&self.arena, origin, &loc.origin_lens[j])
            loc.origin_missing_deny = spec.origin_missing_deny
            loc.nlimits = len(spec.limits)
            loc.limits = <LimitRule *>arena_alloc(&self.arena, sizeof(LimitRule) * (loc.nlimits + 1))
            for j, (zone, kind, most, delay) in enumerate(spec.limits):
                loc.limits[j].zone = zone
                loc.limits[j].kind = kind
                loc.limits[j].max = most
                loc.limits[j].delay = delay
            loc.limit_conn_status = spec.limit_conn_status
            loc.limit_req_status = spec.limit_req_status
            loc.nrules = len(spec.access)
            loc.rules = <AccessRule *>arena_alloc(&self.arena, sizeof(AccessRule) * (loc.nrules + 1))
            for j, (allow, family, packed, prefix) in enumerate(spec.access):
                loc.rules[j].allow = allow
                loc.rules[j].family = family
                memcpy(loc.rules[j].addr, <const char *>packed, len(packed))
                loc.rules[j].prefix = prefix
            loc.proxy_uri = arena_str(&self.arena, spec.proxy_uri, &loc.proxy_uri_len) \
                if spec.proxy_uri is not None else NULL
            loc.proxy_host = arena_str(&self.arena, spec.proxy_host) \
                if spec.proxy_host is not None else NULL
            loc.websocket = spec.websocket
            loc.ntokens = len(spec.tokens)
            loc.tokens = <char **>arena_alloc(&self.arena, sizeof(char *) * (loc.ntokens + 1))
            loc.token_lens = <int *>arena_alloc(&self.arena, sizeof(int) * (loc.ntokens + 1))
            for j, token in enumerate(spec.tokens):
                loc.tokens[j] = arena_str(&self.arena, token, &loc.token_lens[j])
            loc.connect_timeout = spec.connect_timeout
            loc.send_timeout = spec.send_timeout
            loc.read_timeout = spec.read_timeout
            loc.tunnel.idle_timeout = spec.idle_timeout
            (loc.tunnel.frames, loc.tunnel.max_message, loc.tunnel.checks,
             loc.tunnel.ping_interval, loc.tunnel.ping_timeout, loc.tunnel.ping_to,
             loc.tunnel.close_timeout) = spec.frames
            loc.max_lifetime = spec.max_lifetime
            loc.lifetime_spread = spec.lifetime_spread
            loc.next_upstream_tries = spec.next_upstream_tries
            loc.next_upstream_timeout = spec.next_upstream_timeout
            loc.nops = len(spec.ops)
            loc.ops = <HeaderOp *>arena_alloc(&self.arena, sizeof(HeaderOp) * (loc.nops + 1))
            for j, (name, template) in enumerate(spec.ops):
                op = &loc.ops[j]
                op.name = arena_str(&self.arena, name, &op.len)
                op.lname = arena_str(&self.arena, name.lower())
                op.kind = header_kind_of(name.lower())
                op.value = arena_template(&self.arena, template) if template is not None else NULL
            loc.relay = spec.relay
            loc.socket_keepalive = spec.socket_keepalive
            loc.return_status = spec.return_status
            loc.return_body = arena_str(&self.arena, spec.return_body, &loc.return_body_len)
            loc.status_format = len(self._status_formats)
            self._status_formats.append(spec.status_format)
            if spec.upstream_tls is not None:
                self._keep.append(spec.upstream_tls)
                loc.upstream_tls = 1
                loc.tls_ctx = borrow_context(spec.upstream_tls)
                loc.tls_name = arena_str(&self.arena, spec.tls_name) if spec.tls_name else NULL
                loc.tls_verify = spec.tls_verify
            loc.log = self._als[spec.access_log] if spec.access_log >= 0 else NULL
            loc.keepalive_timeout = spec.keepalive_timeout
            loc.keepalive_requests = spec.keepalive_requests
            loc.client_max_body_size = spec.client_max_body_size
            loc.client_body_timeout = spec.client_body_timeout
            loc.hook = spec.hook
            loc.hook_requests = spec.hook_requests
            loc.hook_timeout = spec.hook_timeout
            loc.close_hook = spec.close_hook
        servers = <Server *>arena_alloc(&self.arena, sizeof(Server) * (len(tables.servers) + 1))
        for i, spec in enumerate(tables.servers):
            s = &servers[i]
            s.name = arena_str(&self.arena, spec.name, &s.namelen)
            s.nexact = len(spec.exact)
            s.exact = <Loc **>arena_alloc(&self.arena, sizeof(Loc *) * (s.nexact + 1))
            for j, k in enumerate(spec.exact):
                s.exact[j] = &locs[k]
            s.nprefix = len(spec.prefix)
            s.prefix = <Loc **>arena_alloc(&self.arena, sizeof(Loc *) * (s.nprefix + 1))
            for j, k in enumerate(spec.prefix):
                s.prefix[j] = &locs[k]
            s.nregex = len(spec.regex)
            s.regex = <Loc **>arena_alloc(&self.arena, sizeof(Loc *) * (s.nregex + 1))
            for j, k in enumerate(spec.regex):
                s.regex[j] = &locs[k]
            s.client_header_timeout = spec.client_header_timeout
            s.max_request_line = spec.max_request_line
            s.max_request_head = spec.max_request_head
            s.redirect_https = spec.redirect_https
            if spec.tls is not None:
                self._keep.append(spec.tls)
                s.tls_ctx = borrow_context(spec.tls)
                fastws_set_sni_callback(s.tls_ctx, tls_sni)
            s.handshake_timeout = spec.handshake_timeout
            s.ntrusted = len(spec.real_ip_from)
            s.trusted = <AccessRule *>arena_alloc(&self.arena, sizeof(AccessRule) * (s.ntrusted + 1))
            for j, (allow, family, packed, prefix) in enumerate(spec.real_ip_from):
                s.trusted[j].allow = 1
                s.trusted[j].family = family
                memcpy(s.trusted[j].addr, <const char *>packed, len(packed))
                s.trusted[j].prefix = prefix
            s.real_ip_header = arena_str(&self.arena, spec.real_ip_header.lower(),
                                         &s.real_ip_header_len)
            s.real_ip_recursive = spec.real_ip_recursive
            s.real_ip_pp = spec.real_ip_header.lower() == "proxy_protocol"
            s.log = self._als[spec.access_log] if spec.access_log >= 0 else NULL
        e.nlis = len(tables.listeners)
        e.lis = <Listener *>arena_alloc(&self.arena, sizeof(Listener) * (e.nlis + 1))
        for i, spec in enumerate(tables.listeners):
            l = &e.lis[i]
            l.io.kind = IO_LISTENER
            l.io.fd = spec.fd
            l.family = spec.family
            l.tls = spec.tls
            l.proxy_protocol = spec.proxy_protocol
            l.addr_text = arena_str(&self.arena, spec.addr_text, &l.addr_len)
            l.port = spec.port
            l.nexact = len(spec.exact)
            l.exact = self._names(spec.exact, servers)
            l.nhead = len(spec.head)
            l.head = self._names(spec.head, servers)
            l.ntail = len(spec.tail)
            l.tail = self._names(spec.tail, servers)
            l.nregex = len(spec.regex)
            l.regex = <fastws_regex **>arena_alloc(&self.arena, sizeof(fastws_regex *) * (l.nregex + 1))
            l.regex_server = <Server **>arena_alloc(&self.arena, sizeof(Server *) * (l.nregex + 1))
            for j, (pattern, k) in enumerate(spec.regex):
                l.regex[j] = self._compile(pattern, True)
                l.regex_server[j] = &servers[k]
            l.default_server = &servers[spec.default]
        listeners_watch(e, 1)

    cdef Sticky *_sticky(self, spec) except NULL:
        cdef Sticky *st = <Sticky *>arena_alloc(&self.arena, sizeof(Sticky))
        name, attrs = spec
        st.name = arena_str(&self.arena, name, &st.namelen)
        st.set_head = arena_str(&self.arena, f"Set-Cookie: {name}=", &st.set_head_len)
        st.attrs = arena_str(&self.arena, attrs + "\r\n", &st.attrs_len)
        return st

    cdef _load_maps(self, tables):
        cdef Eng *e = self.e
        cdef MapTable *m
        cdef int i, j
        e.nmaps = len(tables.maps)
        e.maps = <MapTable *>arena_alloc(&self.arena, sizeof(MapTable) * (e.nmaps + 1))
        for i, spec in enumerate(tables.maps):
            m = &e.maps[i]
            m.source = arena_template(&self.arena, spec.source)
            m.dflt = arena_template(&self.arena, spec.default) if spec.default is not None \
                else NULL
            m.hostnames = spec.hostnames
            m.exact = self._map_entries(spec.exact)
            m.nexact = len(spec.exact)
            m.head = self._map_entries(spec.head)
            m.nhead = len(spec.head)
            m.tail = self._map_entries(spec.tail)
            m.ntail = len(spec.tail)
            m.nregex = len(spec.regex)
            m.regex = <MapRegex *>arena_alloc(&self.arena, sizeof(MapRegex) * (m.nregex + 1))
            for j, (pattern, caseless, parts) in enumerate(spec.regex):
                m.regex[j].regex = self._compile(pattern, caseless)
                m.regex[j].value = arena_template(&self.arena, parts)

    cdef MapEntry *_map_entries(self, entries) except NULL:
        cdef MapEntry *out = <MapEntry *>arena_alloc(&self.arena, sizeof(MapEntry) * (len(entries) + 1))
        cdef int i
        for i, (key, parts) in enumerate(entries):
            out[i].key = arena_str(&self.arena, key, &out[i].len)
            out[i].value = arena_template(&self.arena, parts)
        return out

    cdef fastws_regex *_compile(self, str pattern, bint caseless) except NULL:
        cdef fastws_regex *re = <fastws_regex *>arena_alloc(&self.arena, sizeof(fastws_regex))
        cdef bytes p = pattern.encode()
        cdef char err[320]
        if fastws_regex_compile(re, p, len(p), caseless, err, sizeof(err)) < 0:
            raise ValueError(f"{pattern!r}: {err.decode(errors='replace')}")
        if self._regexes is None:
            self._regexes = []
        self._regexes.append(<size_t>re)
        return re

    cdef NameEntry *_names(self, entries, Server *servers) except NULL:
        cdef NameEntry *out = <NameEntry *>arena_alloc(&self.arena, sizeof(NameEntry) * (len(entries) + 1))
        cdef int i
        for i, (name, server) in enumerate(entries):
            out[i].name = arena_str(&self.arena, name, &out[i].len)
            out[i].server = &servers[server]
        return out

    cdef dict _format_spec(self, int i):
        return self._format_specs[i]

    def add_access_log(self, str path, int fd, parts, bint json, names, early, bint opened,
                       int escape=0):
        """An access log for a tunnel adopted from another process whose log this engine's
        tables lack; returns its index (as access_log indexes in the tables)."""
        cdef int f, fmt
        if path in self._log_paths:
            f = self._log_paths.index(path)
            if fd >= 0:
                import os
                os.close(fd)
        else:
            f = self._add_file(path, fd)
        fmt = self._add_format(parts, json, names, early, escape)
        return self._add_al(f, fmt, opened)

    # --- running ------------------------------------------------------------------------------

    @property
    def fd(self):
        """A fd readable when run_once() has work (edges, timers, its own wake-ups): the
        epoll set, or an eventfd the ring signals (the ring posts its completions only when
        the engine asks, so its own fd would not tell)."""
        cdef Eng *e = self.e
        if e.backend == BACKEND_EPOLL:
            return e.epfd
        cdef int efd, r
        cdef unsigned long long one = 1
        if e.ring_efd < 0:
            efd = _errcheck(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC))
            r = uring_eventfd(&e.ring, efd)
            if r < 0:
                close(efd)
                _errneg(r)
            e.ring_efd = efd
            # The kernel signals it when work comes to a ring with none waiting: what came
            # before it was registered (a turn may have run already) needs a turn now.
            write(efd, &one, sizeof(one))
        return e.ring_efd

    @property
    def backend(self):
        """What the engine learns readiness from: "io_uring" or "epoll"."""
        return "io_uring" if self.e.backend == BACKEND_URING else "epoll"

    def run_once(self):
        """One turn: whatever is ready, without waiting."""
        cdef unsigned long long counter
        if self.stopped:
            return
        with nogil:
            if self.e.ring_efd >= 0:
                read(self.e.ring_efd, &counter, sizeof(counter))
            ring_control_rearm(self.e)
            engine_turn(self.e, 0)
        if self.e.msgs.len:
            self._deliver_messages()
        if self._closed:
            self._deliver_closed()

    def watch_control(self, int fd):
        """Put the control plane's event loop (its epoll fd) in the engine's set, so that one
        process can wait in the engine alone: wait() returns when that loop has work."""
        cdef Io *io
        if self.e.control != NULL:
            raise RuntimeError("the engine already watches a control plane's loop")
        io = <Io *>arena_alloc(&self.arena, sizeof(Io))
        io.kind = IO_CONTROL
        io.fd = fd
        _errneg(watch_add(self.e, io, EPOLLIN))
        self.e.control = io

    def wait(self, double timeout):
        """Turns, each waiting in epoll_wait for what comes, until the control plane's loop has
        work (True) or `timeout` seconds have passed (False).  The worker's main loop: the
        sockets are in one epoll set, not behind the event loop's."""
        cdef double end = fastws_monotonic() + timeout
        cdef int why
        if self.stopped:
            return False
        while True:
            with nogil:
                why = engine_wait(self.e, end)
            if self.e.msgs.len:
                self._deliver_messages()
            if self._closed:
                self._deliver_closed()
            if why == WAIT_SIGNAL:
                # a signal interrupted the wait: its Python handler runs now
                if PyErr_CheckSignals() < 0:
                    raise_pending()
                continue
            if why == WAIT_CONTROL:
                return True
            if why == WAIT_TIMEOUT:
                return False

    cdef _deliver_messages(self):
        cdef fastws_buf *m = &self.e.msgs
        cdef int pos = 0, n
        out = []
        while pos < m.len:
            n = <int>strlen(m.p + pos + 1)
            out.append((<unsigned char>m.p[pos], m.p[pos + 1:pos + 1 + n].decode("utf-8", "replace")))
            pos += n + 2
        m.len = 0
        if self.control is not None:
            for level, text in out:
                self.control.log(level, text)

    def set_log_level(self, int level):
        self.e.log_level = level

    def retry_accept(self):
        """The control plane's tick: listeners paused for want of descriptors are read again
        (nginx retries after its accept pause the same way)."""
        accept_retry(self.e)

    def stop_accepting(self):
        """No more connections: the listeners leave the epoll set (the caller closes them)."""
        cdef epoll_event ev
        cdef int i
        listeners_watch(self.e, 0)
        for i in range(self.e.nlis):
            self.e.lis[i].io.fd = -1
        self.e.accepting = 0

    def close_idle(self):
        """A graceful stop: no more keep-alive; connections waiting between requests close."""
        cdef Conn *c
        cdef Conn *nxt
        cdef char one
        cdef unsigned long long counter = 1
        self.e.stopping = 1
        self.e.now = fastws_monotonic()
        ring_batch(self.e)
        c = self.e.all
        while c != NULL:
            nxt = c.all_next
            if c.state == CS_IDLE:
                if recv(c.io.fd, &one, 1, MSG_PEEK | MSG_DONTWAIT) > 0:
                    # a request came before this close: it is served (with Connection: close)
                    c.io.rd_ready = 1
                    conn_set_state(self.e, c, CS_HEAD)
                    conn_ready(self.e, c)
                else:
                    # a FIN, and what the client sends meanwhile is read and dropped: a request
                    # that crosses the close meets an end of stream the client retries on
                    # (RFC 9112 9.3.1), not a reset (a plain close with unread input)
                    conn_linger(self.e, c)
            c = nxt
        ring_batch_end(self.e)
        if self.e.ready != NULL:
            write(self.e.wakefd, &counter, sizeof(counter))   # run them in the next turn
        with nogil:
            engine_reap(self.e)

    def goodbye(self, int code, double spread, str why="shutdown"):
        """Begin a closing handshake (close `code`: 1001 going away, 1012 service restart) on
        each WebSocket tunnel that follows its frames, each at a random moment within `spread`
        seconds so that the clients do not all reconnect at once; the number of tunnels."""
        cdef Eng *e = self.e
        cdef Conn *c
        cdef Conn *nxt
        cdef int n = 0
        cdef int reason = CLOSE_RELOAD if why == "reload" else CLOSE_SHUTDOWN
        e.now = fastws_monotonic()
        e.wall = fastws_realtime()
        # tunnels that begin later (a handshake under way now) get theirs too, in what is left
        e.goodbye_code = <unsigned short>code
        e.goodbye_why = <signed char>reason
        e.goodbye_until = e.now + spread
        c = e.all
        while c != NULL:
            nxt = c.all_next
            if c.state == CS_TUNNEL and c.flow[0].mode == FLOW_FRAMES and not ws_closing(c):
                n += 1
                with nogil:
                    ws_goodbye_schedule(e, c, spread, code, reason)
            c = nxt
        with nogil:
            engine_reap(e)
        return n

    def stop(self):
        """Close everything now (tunnels with reason "shutdown")."""
        cdef Conn *c
        cdef Up *u
        cdef int i
        if self.stopped:
            return
        self.e.now = fastws_monotonic()
        self.e.wall = fastws_realtime()
        self.stop_accepting()
        ring_batch(self.e)
        while self.e.all != NULL:
            c = self.e.all
            if c.state == CS_TUNNEL:
                tunnel_close(self.e, c, CLOSE_SHUTDOWN)
            else:
                conn_close(self.e, c)
        for i in range(self.e.ngroups):
            while self.e.pools[i].head != NULL:
                u = self.e.pools[i].head
                pool_unlink(&self.e.pools[i], u)
                up_close(self.e, u)
        ring_batch_end(self.e)
        self._drain_ready()
        engine_reap(self.e)
        self.flush_logs()
        held = {name: self.e.n.held[i] for i, name in enumerate(HELD_NAMES) if self.e.n.held[i]}
        if held:
            # everything was just closed: what is still counted was lost track of somewhere
            import sys
            print(f"fastws: engine: still held after closing everything: {held}", file=sys.stderr,
                  flush=True)
        if self.e.msgs.len:
            self._deliver_messages()
        if self._closed:
            self._deliver_closed()
        for task, _, _ in self._pending.values():
            task.cancel()
        self._pending.clear()
        if self.e.n != &self.e.own:
            # the figures leave the status board, which may go before this object does
            memcpy(&self.e.own, self.e.n, sizeof(Counters))
            self.e.n = &self.e.own
        self.stopped = True
        self._release_fds()
        # the control plane refers to the engine: without this the pair waits for the cycle
        # collector, and the engine's descriptors with it
        self.control = None

    cdef void _release_fds(self):
        # A stopped engine keeps no descriptor: its pipe pool and scratch pipe, epoll set, timerfd
        # and eventfd.
        cdef Pipe *p
        cdef int *fds[4]
        cdef int i
        while self.e.free_pipes != NULL:
            p = self.e.free_pipes
            self.e.free_pipes = p.next
            close(p.prod)
            close(p.cons)
            free(p)
        ws_scratch_close(self.e)
        ring_close(self.e)
        if self.e.ring_efd >= 0:
            close(self.e.ring_efd)
            self.e.ring_efd = -1
        fds[0] = &self.e.epfd
        fds[1] = &self.e.tio.fd
        fds[2] = &self.e.wakefd
        fds[3] = &self.e.reserve_fd
        for i in range(4):
            if fds[i][0] >= 0:
                close(fds[i][0])
                fds[i][0] = -1

    cdef void _drain_ready(self):
        cdef Conn *c
        while self.e.ready != NULL:
            c = self.e.ready
            self.e.ready = c.next
            c.next = NULL
            c.queued = 0
            if c.state == CS_CLOSED:
                conn_free(self.e, c)

    def flush_logs(self):
        """Write the access-log lines gathered so far (the control plane's tick)."""
        cdef int i
        for i in range(self._nfiles):
            log_flush(self._files[i])

    def reopen_log(self, int index, int fd):
        """Write log file `index` to a new fd from now on (after logrotate); returns the old
        fd for the caller to close."""
        cdef LogFile *f = self._files[index]
        cdef int old = f.fd
        log_flush(f)
        f.fd = fd
        return old

    @property
    def log_paths(self):
        return list(self._log_paths)

    # --- what it holds ------------------------------------------------------------------------

    @property
    def active(self):
        """Client connections open, tunnels included."""
        return self.e.n.conns

    @property
    def serial(self):
        """How many connections the engine numbered ($connection); set it to go on from a
        number another engine reached."""
        return self.e.serial

    @serial.setter
    def serial(self, unsigned long long value):
        self.e.serial = value

    @property
    def paused(self):
        """Accepting is paused: worker_connections are all in use."""
        return self.e.accepting == 2

    @property
    def tunnels(self):
        return self.e.n.tunnels_active

    def connection_states(self):
        """Connections by what they are doing: reading a head, waiting for the next request
        (kept alive), and the others (nginx's stub_status reading, waiting, writing)."""
        cdef long long *st = self.e.n.states
        reading = st[<int>CS_HEAD] + st[<int>CS_TLS]
        waiting = st[<int>CS_IDLE]
        return {"reading": reading, "waiting": waiting,
                "writing": self.e.n.conns - reading - waiting - st[<int>CS_TUNNEL],
                "tunnels": st[<int>CS_TUNNEL]}

    def pools(self):
        """Each upstream group's pool of kept-alive connections: idle, opened, reused."""
        cdef int i
        return {self.e.group_names[i].decode(): {"idle": self.e.pools[i].idle,
                                                "opened": self.e.pools[i].opened,
                                                "reused": self.e.pools[i].reused}
                for i in range(self.e.ngroups) if self.e.pools[i].size}

    @property
    def groups(self):
        return list(self._groups)

    def replace_group(self, UpstreamGroup group):
        """Put `group` in the place of the group of the same name, with the connections that
        use it (engine/regroup.pxi): a `resolve` server's name gave other addresses.  An
        address in both keeps its state; tunnels to one that left close within the group's
        drain_timeout (0: they go on until they end).  Returns the number of those tunnels.
        Called between two turns of the engine (from the control plane), never inside one."""
        cdef Eng *e = self.e
        cdef UpstreamGroup old = None
        cdef Group *og
        cdef Group *ng = &group.g
        cdef RRPeer *p
        cdef RRPeer *grown
        cdef Conn *c
        cdef Conn *nxt
        cdef int gi = -1, i, j, k, departed = 0, closing = 0
        cdef int *where = NULL
        cdef unsigned char *used = NULL
        for i, g in enumerate(self._groups):
            if (<UpstreamGroup>g).name == group.name:
                gi = i
                old = g
        if old is None:
            raise KeyError(f"no upstream group {group.name!r}")
        og = &old.g
        if group is old or ng.nall != ng.npeers or ng.method != og.method:
            raise ValueError("a new group of the same method, not yet in use")
        e.now = fastws_monotonic()
        e.wall = fastws_realtime()
        with nogil:
            engine_reap(e)
        where = <int *>malloc(sizeof(int) * og.nall)
        used = <unsigned char *>calloc(og.nall, 1)
        if where == NULL or used == NULL:
            free(where)
            free(used)
            raise MemoryError()
        try:
            c = e.all
            while c != NULL:
                regroup_mark(c, gi, used)
                c = c.all_next
            # each old peer's place in the new group: the same name, in order
            spots: dict = {}
            for k in range(ng.npeers):
                spots.setdefault(<bytes>ng.peers[k].name, []).append(k)
            for j in range(og.nall):
                free_spots = spots.get(<bytes>og.peers[j].name)
                where[j] = free_spots.pop(0) if free_spots else -1
                if where[j] < 0 and used[j]:
                    departed += 1
            if departed:
                grown = <RRPeer *>realloc(ng.peers, sizeof(RRPeer) * (ng.npeers + departed))
                if grown == NULL:
                    raise MemoryError()
                ng.peers = grown
            for j in range(og.nall):
                k = where[j]
                if k >= 0:
                    regroup_carry(&og.peers[j], &ng.peers[k])
                elif used[j]:
                    # departed: kept whole, out of the tiers, until nothing uses it
                    p = &ng.peers[ng.nall]
                    memcpy(p, &og.peers[j], sizeof(RRPeer))
                    p.name = p.host = NULL
                    ng.nall += 1
                    where[j] = ng.nall - 1
                    p.down = PEER_DOWN
                    p.name = _strdup(<bytes>og.peers[j].name)
                    p.host = _strdup(<bytes>og.peers[j].host)
            ng.all_down_logged = og.all_down_logged
            ng.gen = og.gen + 1
            # in place first, so that a connection closed on the way frees into the new group
            e.groups[gi] = ng
            e.group_objs[gi] = <PyObject *>group
            self._groups[gi] = group
            c = e.all
            while c != NULL:
                nxt = c.all_next
                if c.hk != NULL and c.hk.result != NULL:
                    self._regroup_decision(c, gi, ng, where)
                closing += regroup_conn(e, c, gi, og, ng, where)
                c = nxt
            regroup_pool(e, gi, ng, where)
        finally:
            free(where)
            free(used)
        with nogil:
            engine_reap(e)
        return closing

    cdef _regroup_decision(self, Conn *c, int gi, Group *ng, const int *where):
        # A coroutine hook's decision that came but is not applied yet (its turn is to come):
        # the server it names is moved, or left to the group's choice if it left.
        boxed = <object>c.hk.result
        d = boxed[0]
        if d[4] == gi and d[5] >= 0:
            moved = (d[:5] + (regroup_choosable(ng, where, d[5]),) + d[6:],)
            Py_INCREF(moved)
            c.hk.result = <PyObject *>moved
            Py_DECREF(boxed)

    def stats(self):
        """Counters of the engine, for tests, status pages and metrics."""
        return counters_dict(self.e.n)

    # --- reloads: tunnels out and in ----------------------------------------------------------

    def export(self):
        """Take every tunnel that can move out of the engine whole (see ExportedTunnel).  The
        others (TLS tunnels: their state lives in this process) stay."""
        cdef Conn *c
        cdef Conn *nxt
        cdef Eng *e = self.e
        out = []
        e.now = fastws_monotonic()
        e.wall = fastws_realtime()
        c = e.all
        ring_batch(e)
        try:
            while c != NULL:
                nxt = c.all_next
                if tunnel_exportable(c) and tunnel_detach(e, c) == 0:
                    out.append(self._exported(c))
                c = nxt
        finally:
            ring_batch_end(e)             # (before the caller sends the fds on)
        engine_reap(e)
        return out

    cdef ExportedTunnel _exported(self, Conn *c):
        cdef Eng *e = self.e
        cdef ExportedTunnel t = ExportedTunnel.__new__(ExportedTunnel)
        cdef Up *u = c.up
        cdef RRPeer *pr
        t.client_fd = c.io.fd
        t.upstream_fd = u.io.fd
        t.to_upstream = _held(&c.flow[0])
        t.to_client = _held(&c.flow[1])
        t.up = c.flow[0].nbytes
        t.down = c.flow[1].nbytes
        t.age = e.now - c.started
        t.first_eof = c.first_eof
        t.read_timeout = c.read_timeout
        t.send_timeout = c.send_timeout
        t.idle_timeout = c.tp.idle_timeout
        t.websocket = c.websocket
        t.policy = _policy_dict(c.tp)
        t.frames = _frames_state(c)
        t.closing = self._exported_closing(c)
        t.lifetime_left = c.end_at - e.now if c.end_at < NEVER else -1.0
        # a scheduled end (a drain, a stop's goodbye) keeps its reason across the hand-over
        t.ending = [c.ws_code, c.ws_why] if c.ws_why and c.end_at < NEVER else None
        t.relay = _RELAYS[c.relay]
        t.upstream = e.group_names[u.group].decode() if u.group >= 0 else ""
        t.peer = e.groups[u.group].peers[u.peer].name.decode() if u.group >= 0 else ""
        t.log = self._exported_log(c) if c.log != NULL else None
        # its limit_conn counts go with it: given back here (by conn_close), taken in the
        # new worker's zones of the same names
        t.limits = [[e.zones[c.holds[i].zone].name.decode(), c.holds[i].hash]
                    for i in range(c.nholds)]
        # the fds are the caller's now: forget them without closing
        c.io.fd = -1
        u.io.fd = -1
        if u.group >= 0:
            pr = &e.groups[u.group].peers[u.peer]
            pr.tunnels_active -= 1
            pr.bytes_up += c.flow[0].nbytes
            pr.bytes_down += c.flow[1].nbytes
        e.n.tunnels_active -= 1
        e.n.closes[-CLOSE_EXPORTED] += 1
        held_count(e, DBG_TUNNELS, -1)
        log_free(e, c)
        conn_close(e, c)
        return t

    cdef dict _exported_log(self, Conn *c):
        cdef LogRec *lr = c.log
        cdef int k = 0
        cdef int i
        for i in range(self._nals):
            if self._als[i] == lr.log:
                k = i
                break
        fi, fmi, opened = self._access_logs[k]
        return {"access_log": k, "path": self._log_paths[fi], "open": opened,
                "format": self._format_spec(fmi),
                "early": PyBytes_FromStringAndSize(lr.early, lr.early_len) if lr.early else b"",
                "life": self.e.now - lr.t_start, "connect_time": lr.connect_time,
                "header_time": lr.header_time, "head_sent": lr.head_sent,
                "head_in": lr.head_in}

    def adopt(self, ExportedTunnel t, int group, int peer, int access_log=-1,
              double close_after=-1.0):
        """Carry on a tunnel another engine exported; `group` and `peer` name its server in
        this engine's tables (-1 when a reload removed it), `access_log` its log; with
        `close_after` (seconds), it ends then at the latest (as its lifetime would)."""
        cdef Eng *e = self.e
        cdef Conn *c
        cdef Up *u
        cdef sockaddr_in6 sa
        cdef socklen_t salen = sizeof(sa)
        cdef int i
        e.now = fastws_monotonic()
        e.wall = fastws_realtime()
        memset(&sa, 0, sizeof(sa))
        getpeername(t.client_fd, <sockaddr *>&sa, &salen)
        c = <Conn *>calloc(1, sizeof(Conn))
        u = <Up *>calloc(1, sizeof(Up))
        if c == NULL or u == NULL:
            free(c)
            free(u)
            raise MemoryError()
        held_count(e, DBG_CONNS, 1)
        held_count(e, DBG_UPS, 1)
        c.io.kind = IO_CLIENT
        c.io.fd = t.client_fd
        c.io.wr_ready = c.io.rd_ready = 1
        c.timer.idx = -1
        c.timer.kind = IO_CLIENT
        c.timer.owner = <void *>c
        c.lis = &e.lis[0] if e.nlis else NULL
        c.srv = c.lis.default_server if c.lis != NULL else NULL
        memcpy(&c.raddr, &sa, sizeof(sa))
        memcpy(&c.paddr, &sa, sizeof(sa))
        u.io.kind = IO_UPSTREAM
        u.io.fd = t.upstream_fd
        u.io.wr_ready = u.io.rd_ready = 1
        u.timer.idx = -1
        u.timer.kind = IO_UPSTREAM
        u.timer.owner = <void *>u
        u.owner = c
        u.state = UP_READY
        u.group = group
        u.peer = peer
        if group >= 0:
            u.gen = e.groups[group].gen
        c.up = u
        c.relay = _RELAYS.index(t.relay)
        c.read_timeout = t.read_timeout
        c.send_timeout = t.send_timeout
        c.tp = self._adopted_policy(t)
        c.websocket = t.websocket
        c.end_at = e.now + t.lifetime_left if t.lifetime_left >= 0 else NEVER
        c.first_eof = t.first_eof
        c.started = e.now - t.age
        for i in range(2):
            c.flow[i].mode = FLOW_RAW
            c.flow[i].splicing = c.relay == RELAY_SPLICE
            c.flow[i].last_rx = e.now
        if t.frames is not None and c.tp.frames:
            _frames_restore(c, t.frames)
        c.flow[0].nbytes = t.up
        c.flow[1].nbytes = t.down
        for name, h in t.limits or ():
            i = zone_index(e, name.encode())
            if i >= 0 and e.zones[i].kind == LIMIT_CONN:
                # counted whatever the limit now: the tunnel exists already
                if fastws_conn_acquire(e.zones[i].shm, h, 0, e.pid, 1) == 1 and \
                        limits_hold(e, c, i, h) < 0:
                    fastws_conn_release(e.zones[i].shm, h, e.pid)
        if _hold_bytes(e, &c.flow[0], t.to_upstream) < 0 or _hold_bytes(e, &c.flow[1], t.to_client) < 0:
            raise MemoryError()
        if access_log >= 0 and t.log is not None:
            self._adopt_log(c, self._als[access_log], t.log)
        if t.closing is not None:
            self._adopt_closing(c, t.closing)
        if t.ending is not None and c.end_at < NEVER:
            c.ws_code = t.ending[0] if c.flow[0].mode == FLOW_FRAMES else 0
            c.ws_why = t.ending[1]
        if close_after >= 0:
            tunnel_drain(e, c, close_after, CLOSE_REMOVED)     # (tunnel_run arms its timer)
        if group >= 0 and not (0 <= group < e.ngroups and 0 <= peer < e.groups[group].nall):
            raise ValueError(f"no peer {peer} in group {group}")
        if group >= 0:
            # as if selected: peer_free gives it back when the tunnel closes
            peer_adopt(e.groups[group], peer)
            e.groups[group].peers[peer].tunnels_active += 1
        e.n.tunnels_active += 1        # (not tunnels_total: the board counted it already)
        held_count(e, DBG_TUNNELS, 1)
        e.serial += 1
        c.number = e.serial * e.number_step + e.number_base
        e.n.conns += 1
        e.n.states[0] += 1
        conn_link(e, c)
        if io_register(e, &c.io) < 0 or io_register(e, &u.io) < 0:
            conn_set_state(e, c, CS_TUNNEL)
            tunnel_close(e, c, CLOSE_ERROR)
            return
        conn_set_state(e, c, CS_TUNNEL)
        with nogil:
            tunnel_run(e, c)

    cdef TunnelPolicy *_adopted_policy(self, ExportedTunnel t) except NULL:
        # The policy an adopted tunnel brought: one per distinct policy, for the engine's life.
        cdef TunnelPolicy *tp
        p = t.policy
        key = (t.idle_timeout, tuple(sorted(p.items())))
        address = self._policies.get(key)
        if address is not None:
            return <TunnelPolicy *><size_t>address
        tp = <TunnelPolicy *>arena_alloc(&self.arena, sizeof(TunnelPolicy))
        if tp == NULL:
            raise MemoryError()
        tp.idle_timeout = t.idle_timeout
        tp.frames = p.get("frames", 0)
        tp.max_message = p.get("max_message", 0)
        tp.ping_interval = p.get("ping_interval", 0.0)
        tp.ping_timeout = p.get("ping_timeout", 0.0)
        tp.close_timeout = p.get("close_timeout", DEFAULT_CLOSE_TIMEOUT)
        tp.ping_to = p.get("ping_to", 0)
        tp.checks = p.get("checks", 1)
        self._policies[key] = <size_t>tp
        return tp

    cdef void _adopt_log(self, Conn *c, AccessLog *al, dict log):
        cdef LogRec *lr = <LogRec *>calloc(1, sizeof(LogRec))
        cdef bytes early = log["early"]
        if lr == NULL:
            return
        held_count(self.e, DBG_LOGRECS, 1)
        lr.log = al
        lr.t_start = self.e.now - log["life"]
        lr.connect_time = log["connect_time"]
        lr.header_time = log["header_time"]
        lr.head_sent = log["head_sent"]
        lr.head_in = log["head_in"]
        lr.status = lr.upstream_status = 101
        lr.group = c.up.group
        lr.peer = c.up.peer
        if early:
            lr.early = <char *>malloc(len(early))
            if lr.early != NULL:
                memcpy(lr.early, <const char *>early, len(early))
                lr.early_len = len(early)
        c.log = lr

    # --- extension points ---------------------------------------------------------------------

    @property
    def hooks_pending(self):
        """Coroutine hooks running (connections waiting for their decision)."""
        return len(self._pending)

    def _hook_call(self, int index, RequestView view, unsigned long long ticket, size_t conn):
        # A location's hook (engine/hooks.pxi, hook_call): its decision as hooks.Hook.decide
        # prepares it, or _HOOK_PENDING once a coroutine is started on the control plane's loop.
        hook = self._hooks[index]
        try:
            result = hook.fn(view)
        except Exception as exc:
            return hook.failed(exc)
        if result is None:
            return None
        if _inspect.isawaitable(result):
            try:
                task = _asyncio.ensure_future(result, loop=self.control.loop)
            except Exception as exc:          # no event loop to run it on
                if _asyncio.iscoroutine(result):
                    result.close()
                return hook.failed(exc)
            self._pending[ticket] = (task, conn, index)
            task.add_done_callback(_functools.partial(self._hook_done, ticket))
            return _HOOK_PENDING
        return hook.decide(result)

    def _hook_done(self, unsigned long long ticket, task):
        # A coroutine hook ended: its connection (still waiting, or it would have been
        # forgotten) runs again in the engine's next turn with the decision.
        cdef Conn *c
        cdef unsigned long long one = 1
        entry = self._pending.pop(ticket, None)
        if entry is None or self.stopped:
            return
        _, conn, index = entry
        hook = self._hooks[index]
        if task.cancelled():
            d = hook.failed(_asyncio.CancelledError("the hook's task was cancelled"))
        elif task.exception() is not None:
            d = hook.failed(task.exception())
        else:
            d = hook.decide(task.result())
        c = <Conn *><size_t>conn
        boxed = (d,)
        Py_INCREF(boxed)
        c.hk.ticket = 0
        c.hk.result = <PyObject *>boxed
        conn_ready(self.e, c)
        write(self.e.wakefd, &one, sizeof(one))

    def _hook_forget(self, unsigned long long ticket):
        # its connection closed or timed out: the coroutine is cancelled, its end ignored
        entry = self._pending.pop(ticket, None)
        if entry is not None:
            entry[0].cancel()

    cdef dict _exported_closing(self, Conn *c):
        # a tunnel's on_tunnel_close goes with it to the new worker, by its import path
        cdef Hooked *hk = c.hk
        if hk == NULL or hk.close_hook < 0:
            return None
        return {"callback": self._close_hooks[hk.close_hook][1], "place": tunnel_place(c),
                "hook": hk.vars[:hk.vars_len].decode("utf-8", "replace") if hk.vars != NULL
                else ""}

    cdef int _adopt_closing(self, Conn *c, dict closing) except -1:
        # called at its close if this worker's configuration still names that callback
        cdef Hooked *hk
        cdef bytes place, values
        paths = [path for _, path in self._close_hooks]
        if closing["callback"] not in paths:
            return 0
        hk = hooked_new(self.e, c)
        if hk == NULL:
            raise MemoryError()
        hk.close_hook = paths.index(closing["callback"])
        place = "\0".join(closing["place"]).encode() + b"\0"
        hk.place = hook_copy(place, &hk.place_len)
        values = closing["hook"].encode()
        if values:
            hk.vars = hook_copy(values, &hk.vars_len)
        if hk.place == NULL or (values and hk.vars == NULL):
            raise MemoryError()
        return 0

    cdef _deliver_closed(self):
        # closed tunnels' figures (engine/hooks.pxi, hook_tunnel_closed), to on_tunnel_close
        records = self._closed
        self._closed = []
        if self.control is None:
            return
        for r in records:
            fn, path = self._close_hooks[r[0]]
            parts = (<bytes>r[14]).decode("utf-8", "replace").split("\0")
            record = _TunnelClosed(*r[1:14], dict(zip(parts[0:-1:2], parts[1::2])))
            try:
                self.control.tunnel_closed(fn, path, record)
            except Exception as exc:          # (a control plane that cannot take it now)
                _hook_log.error("on_tunnel_close %s: not delivered: %s: %s", path,
                                type(exc).__name__, exc)

    cdef int _status_answer(self, Conn *c) except -1:
        fmt = self._status_formats[c.loc.status_format]
        status, ctype, body = self.control.status_page(fmt)
        cdef bytes ct = ctype.encode() if isinstance(ctype, str) else ctype
        cdef bytes data = body
        conn_answer(self.e, c, status, NULL, <const char *>data, <int>len(data),
                    <const char *>ct, c.req.client_ka if c.req != NULL else 0)
        return 0

    def __dealloc__(self):
        cdef int i
        if self.e == NULL:
            return
        if not self.stopped:
            try:
                self.stop()
            except Exception:
                pass
        self._release_fds()
        for i in range(self._nfiles):
            log_flush(self._files[i])
            free(self._files[i].buf)
            free(self._files[i])
        free(self._files)
        for address in self._regexes or ():
            fastws_regex_free(<fastws_regex *><size_t>address)
        head_free(&self.e.head)
        head_free(&self.e.rhead)
        free(self.e.heap)
        free(self.e.buf)
        free(self.e.pathbuf)
        free(self.e.obuf.p)
        free(self.e.xbuf.p)
        free(self.e.vbuf.p)
        free(self.e.msgs.p)
        free(self.e)
        self.e = NULL
        arena_free(&self.arena)


def regex_problem(str pattern, bint caseless=False):
    """Why PCRE2 cannot compile a pattern (nginx's regular expressions), or None."""
    cdef fastws_regex re
    cdef bytes p = pattern.encode()
    cdef char err[320]
    if fastws_regex_compile(&re, p, len(p), caseless, err, sizeof(err)) < 0:
        return err.decode(errors="replace")
    fastws_regex_free(&re)
    return None


cdef tuple _RELAYS = ("auto", "splice", "copy")

# tunnels' close reasons by name, as $tunnel_close writes them (log.pxi's close_reason)
cdef dict _REASONS = {r: close_reason(r).decode() for r in range(-1, -CLOSE_REASONS, -1)}


cdef extern from "Python.h":
    int PyErr_CheckSignals()


cdef int raise_pending() except -1:
    return -1


def probe_backend(str engine="auto"):
    """The back end an engine made now would run, and why: ("io_uring" | "epoll", reason).
    OSError when `engine` is "io_uring" and the kernel refuses it."""
    cdef fastws_uring ring
    why = _open_ring(&ring, engine, 8, 16)
    if ring.fd < 0:
        return "epoll", why
    uring_close(&ring)
    return "io_uring", why


cdef str _open_ring(fastws_uring *ring, str engine, unsigned int entries, unsigned int cq):
    # The ring `engine` asks for, made in `ring` (its fd -1 for epoll), and why this back end.
    cdef char why[256]
    cdef int r
    ring.fd = -1
    if engine not in ("auto", "io_uring", "epoll"):
        raise ValueError(f"engine must be auto, io_uring or epoll, not {engine!r}")
    if engine == "epoll":
        return "engine = \"epoll\" in the configuration"
    why[0] = 0
    r = uring_init(ring, entries, cq, why, sizeof(why))
    if r < 0:
        if engine == "io_uring":
            raise OSError(-r, why.decode())
        return why.decode()
    return ("engine = \"io_uring\" in the configuration" if engine == "io_uring"
            else "io_uring is available")


cdef int _errneg(int rc) except -1:
    # (for the engine's functions that return -errno)
    if rc < 0:
        raise OSError(-rc, strerror(-rc).decode())
    return rc


cdef int _errcheck(int rc) except -1:
    if rc < 0:
        raise OSError(errno, strerror(errno).decode())
    return rc
