# The relay engine: after the 101 handshake a tunnel's two sockets belong to this module.
#
# One engine per worker process runs its own epoll loop in a native thread that never holds the
# GIL.  Python hands a tunnel over once (Engine.add) and hears from it once, when it has closed
# (Engine.drain, woken through an eventfd the worker's event loop watches).  Between the two no
# Python code runs: bytes move by splice(2) through pipes borrowed from a per-engine pool, or by
# recv/send through one shared per-engine buffer where that is cheaper (small messages), chosen
# per direction as HAProxy's splice-auto does.  An idle tunnel holds neither a pipe nor a buffer:
# only its Tunnel struct.
#
# A TLS side (wss://, https://, or TLS to the upstream) is read with SSL_read and written with
# SSL_write on the same shared buffer, on the SSL* of the connection Python's ssl module
# handshook (includes/openssl.h): no splice, since the kernel cannot decrypt, but still no Python
# code per message.  SSL wants map to epoll interest, and plaintext OpenSSL holds that epoll
# cannot see is picked up through a ready list.

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.errno cimport errno, EAGAIN, EINTR, EINVAL, ENOSYS, ENOMEM, EPIPE, EPROTO
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.stdlib cimport realloc
from libc.string cimport memchr, memcmp, memcpy, strerror


cdef extern from "<strings.h>" nogil:
    int strncasecmp(const char *s1, const char *s2, size_t n)

from fastws.includes.linux cimport *
from fastws.includes.openssl cimport *

include "includes/consts.pxi"


cdef struct Pipe:
    int prod                 # write end: splice into it
    int cons                 # read end: splice out of it
    Py_ssize_t data          # bytes the pipe holds now
    Pipe *next               # free list link


cdef struct Flow:
    # Bytes moving from fd[d] to fd[1 - d] of a tunnel.
    Pipe *pipe               # only while spliced bytes are in flight
    char *held               # copied bytes the destination has not taken yet (malloc'ed)
    Py_ssize_t held_len
    Py_ssize_t held_off
    unsigned long long nbytes
    double last_rx           # when the source last gave bytes
    double blocked_since     # when a write to the destination last blocked; 0 when not blocked
    int streak               # consecutive reads that argue for switching method
    int splicing             # 1: splice(2) through a pipe, 0: recv/send through the shared buffer
    int eof                  # the source reached EOF
    int shut                 # SHUT_WR was sent to the destination


cdef struct Tunnel:
    int fd[2]                # 0: client, 1: upstream
    unsigned int want[2]     # epoll interest registered for each fd
    int registered[2]
    Flow flow[2]             # 0: client -> upstream, 1: upstream -> client
    double started
    double ended
    double deadline
    double read_timeout
    double send_timeout
    int heap_idx
    int mode
    int reason
    int first_eof            # side whose EOF came first, -1 before any
    int closing
    PyObject *ctx
    Tunnel *next
    FASTWS_SSL *ssl[2]       # NULL: a plain socket
    PyObject *sslobj[2]      # the _ssl._SSLSocket that owns ssl[s], kept alive while it is used
    unsigned int tls_want[2] # interest OpenSSL asked for on a side (a read that must write...)
    int ready                # sides whose SSL holds bytes epoll cannot see (bit per side)
    Tunnel *ready_next
    # the upstream half of the handshake, while phase is PHASE_HANDSHAKE (_relay_handshake.pxi)
    int phase
    char *rbuf               # the upstream's answer so far
    Py_ssize_t rlen
    Py_ssize_t rcap
    char *early              # the client's bytes past its head, held until the 101 is checked
    Py_ssize_t early_len
    char expect[32]          # the Sec-WebSocket-Accept the answer must carry
    int expect_len
    char token[32]           # the Upgrade token asked for
    int token_len
    int hs_sent              # the request head is out (so the connect completed)
    int err                  # errno of a failed connect or read
    double hs_deadline
    double header_timeout
    double t_connected
    PyObject *hctx           # Python's connection object, until the 101 or the return


cdef struct Notice:
    # A tunnel that became one in the engine: Python drops its handshake object.
    PyObject *obj
    double connect_time
    double header_time
    Py_ssize_t head_len
    Notice *next


cdef struct EngineState:
    int epfd
    int wakefd               # Python -> relay thread: new tunnels, stop
    int notifyfd             # relay thread -> Python: closed tunnels to drain
    pthread_mutex_t lock
    Tunnel *incoming         # under lock
    Tunnel *done             # under lock; closed tunnels for Python
    Notice *opened           # under lock; handshakes the engine completed
    Tunnel *exported         # under lock; tunnels taken out whole, for Python
    int stopping             # under lock
    int exporting            # under lock: 1 take every tunnel out at the next turn; -1 done
    int sleeping             # under lock: the relay thread may wait in epoll_wait; wake it
    int threaded             # 0: no relay thread, the event loop calls run_once()
    int running
    Tunnel **heap            # relay thread only: tunnels by deadline
    int heap_len
    int heap_cap
    Tunnel *ready            # relay thread only: tunnels with ready sides
    Pipe *free_pipes
    int pipes_total
    int pipes_free
    int max_pipes
    int pipe_size
    char *buf
    Py_ssize_t bufsize
    double now
    # counters, written by the relay thread only
    unsigned long long tunnels_total
    unsigned long long tunnels_active
    unsigned long long bytes_spliced
    unsigned long long bytes_copied
    unsigned long long splice_calls
    unsigned long long copy_calls
    unsigned long long pipes_created
    unsigned long long pipe_shortage
    unsigned long long switches_to_splice
    unsigned long long switches_to_copy
    unsigned long long closes[9]     # by reason: index -reason
    unsigned long long loops
    unsigned long long tls_tunnels_total
    unsigned long long handshakes_done
    unsigned long long handshakes_returned
    unsigned long long tls_reads
    unsigned long long tls_writes
    unsigned long long tls_ready_runs


# --- timer heap (relay thread only) -------------------------------------------------------

cdef inline void heap_swap(EngineState *e, int i, int j) noexcept nogil:
    cdef Tunnel *t = e.heap[i]
    e.heap[i] = e.heap[j]
    e.heap[j] = t
    e.heap[i].heap_idx = i
    e.heap[j].heap_idx = j


cdef void heap_up(EngineState *e, int i) noexcept nogil:
    cdef int parent
    while i > 0:
        parent = (i - 1) >> 1
        if e.heap[parent].deadline <= e.heap[i].deadline:
            break
        heap_swap(e, i, parent)
        i = parent


cdef void heap_down(EngineState *e, int i) noexcept nogil:
    cdef int child
    while True:
        child = 2 * i + 1
        if child >= e.heap_len:
            break
        if child + 1 < e.heap_len and e.heap[child + 1].deadline < e.heap[child].deadline:
            child += 1
        if e.heap[i].deadline <= e.heap[child].deadline:
            break
        heap_swap(e, i, child)
        i = child


cdef int heap_push(EngineState *e, Tunnel *t) noexcept nogil:
    cdef Tunnel **grown
    cdef int cap
    if e.heap_len == e.heap_cap:
        cap = e.heap_cap * 2 if e.heap_cap else 1024
        grown = <Tunnel **>malloc(cap * sizeof(Tunnel *))
        if grown == NULL:
            return -ENOMEM
        if e.heap_len:
            memcpy(grown, e.heap, e.heap_len * sizeof(Tunnel *))
        free(e.heap)
        e.heap = grown
        e.heap_cap = cap
    t.heap_idx = e.heap_len
    e.heap[e.heap_len] = t
    e.heap_len += 1
    heap_up(e, t.heap_idx)
    return 0


cdef void heap_remove(EngineState *e, Tunnel *t) noexcept nogil:
    cdef int i = t.heap_idx
    if i < 0:
        return
    e.heap_len -= 1
    if i != e.heap_len:
        heap_swap(e, i, e.heap_len)
        heap_down(e, i)
        heap_up(e, i)
    t.heap_idx = -1


cdef double tunnel_deadline(Tunnel *t, int *reason) noexcept nogil:
    # nginx times an upgraded connection on upstream reads (proxy_read_timeout) and on blocked
    # writes (send_timeout).  Reading from a side is suspended while its flow is blocked, so the
    # read timer then gives way to the send timer.  Once the upstream has finished, the client's
    # side is held to the same idle limit, so a half-closed tunnel cannot linger for ever.
    cdef double d = 1e300
    cdef double c
    cdef int i
    if t.phase == PHASE_HANDSHAKE:
        reason[0] = HS_HEADER_TIMEOUT if t.hs_sent else HS_CONNECT_TIMEOUT
        return t.hs_deadline
    reason[0] = CLOSE_READ_TIMEOUT
    if not t.flow[1].eof:
        if t.flow[1].blocked_since == 0:
            d = t.flow[1].last_rx + t.read_timeout
    elif not t.flow[0].eof and t.flow[0].blocked_since == 0:
        d = t.flow[0].last_rx + t.read_timeout
    for i in range(2):
        if t.flow[i].blocked_since > 0:
            c = t.flow[i].blocked_since + t.send_timeout
            if c < d:
                d = c
                reason[0] = CLOSE_SEND_TIMEOUT
    return d


cdef void tunnel_rearm(EngineState *e, Tunnel *t) noexcept nogil:
    # Deadlines only move later while bytes flow, and the heap is corrected lazily when the top
    # expires; a write that blocks can move it earlier, which is the one case handled here.
    cdef int reason
    cdef double d = tunnel_deadline(t, &reason)
    if d < t.deadline and t.heap_idx >= 0:
        t.deadline = d
        heap_up(e, t.heap_idx)


# --- pipe pool ----------------------------------------------------------------------------

cdef Pipe *pipe_get(EngineState *e) noexcept nogil:
    cdef Pipe *p = e.free_pipes
    cdef int fds[2]
    if p != NULL:
        e.free_pipes = p.next
        e.pipes_free -= 1
        p.next = NULL
        return p
    if e.pipes_total >= e.max_pipes:
        e.pipe_shortage += 1
        return NULL
    if pipe2(fds, O_NONBLOCK | O_CLOEXEC) < 0:
        e.pipe_shortage += 1
        return NULL
    p = <Pipe *>malloc(sizeof(Pipe))
    if p == NULL:
        close(fds[0])
        close(fds[1])
        return NULL
    # A larger pipe moves more per splice pair; the kernel may refuse past fs.pipe-max-size or
    # the per-user page budget, and then the default 64 KiB pipe is kept.
    fcntl(fds[1], F_SETPIPE_SZ, e.pipe_size)
    p.cons = fds[0]
    p.prod = fds[1]
    p.data = 0
    p.next = NULL
    e.pipes_total += 1
    e.pipes_created += 1
    return p


cdef void pipe_put(EngineState *e, Pipe *p) noexcept nogil:
    # As HAProxy's put_pipe: only an empty pipe goes back to the pool; one still holding bytes
    # (a tunnel closed mid-transfer) is destroyed.
    if p.data == 0 and e.pipes_free < POOL_KEEP_FREE:
        p.next = e.free_pipes
        e.free_pipes = p
        e.pipes_free += 1
        return
    close(p.prod)
    close(p.cons)
    free(p)
    e.pipes_total -= 1


# --- moving bytes -------------------------------------------------------------------------

cdef inline bint flow_holds(Flow *f) noexcept nogil:
    return f.held != NULL or (f.pipe != NULL and f.pipe.data > 0)


cdef int flow_flush(EngineState *e, Tunnel *t, int d) noexcept nogil:
    # Write what the flow holds to its destination.  1: still blocked, 0: empty, <0: close reason.
    cdef Flow *f = &t.flow[d]
    cdef int dst = t.fd[1 - d]
    cdef ssize_t n
    while f.held != NULL:
        n = side_send(e, t, 1 - d, f.held + f.held_off, f.held_len - f.held_off)
        if n > 0:
            f.held_off += n
            if f.held_off == f.held_len:
                free(f.held)
                f.held = NULL
            continue
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            return flow_blocked(e, t, f)
        return CLOSE_CLIENT_ERROR if d == 1 else CLOSE_UPSTREAM_ERROR
    while f.pipe != NULL and f.pipe.data > 0:
        n = splice(f.pipe.cons, NULL, dst, NULL, <size_t>f.pipe.data, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
        e.splice_calls += 1
        if n > 0:
            f.pipe.data -= n
            continue
        if n < 0 and errno == EINTR:
            continue
        if n < 0 and errno == EAGAIN:
            return flow_blocked(e, t, f)
        return CLOSE_CLIENT_ERROR if d == 1 else CLOSE_UPSTREAM_ERROR
    if f.blocked_since > 0:
        f.blocked_since = 0
        # reading from this flow's source resumes now; its idle clock restarts with it
        f.last_rx = e.now
    if f.pipe != NULL:
        pipe_put(e, f.pipe)
        f.pipe = NULL
    if f.eof and not f.shut:
        if t.ssl[1 - d] != NULL:
            # TLS's half-close: a close_notify alert, then the FIN (best effort, never waited for)
            fastws_ssl.err_clear()
            fastws_ssl.shutdown(t.ssl[1 - d])
        shutdown(dst, SHUT_WR)
        f.shut = 1
    return 0


cdef inline int flow_blocked(EngineState *e, Tunnel *t, Flow *f) noexcept nogil:
    if f.blocked_since == 0:
        f.blocked_since = e.now
        tunnel_rearm(e, t)
    return 1


cdef int flow_hold(EngineState *e, Tunnel *t, int d, const char *data, Py_ssize_t n) noexcept nogil:
    cdef Flow *f = &t.flow[d]
    f.held = <char *>malloc(n)
    if f.held == NULL:
        return CLOSE_ERROR
    memcpy(f.held, data, n)
    f.held_len = n
    f.held_off = 0
    return flow_blocked(e, t, f)


cdef int flow_forward(EngineState *e, Tunnel *t, int d, ssize_t n) noexcept nogil:
    # n bytes read into the shared buffer: count them and send them on, holding what the
    # destination does not take.  0: all sent, 1: held, <0: close reason.
    cdef Flow *f = &t.flow[d]
    cdef ssize_t w
    f.nbytes += n
    f.last_rx = e.now
    e.bytes_copied += n
    w = side_send(e, t, 1 - d, e.buf, n)
    if w < 0:
        if errno != EAGAIN and errno != EINTR:
            return CLOSE_UPSTREAM_ERROR if d == 0 else CLOSE_CLIENT_ERROR
        w = 0
    if w < n:
        return flow_hold(e, t, d, e.buf + w, n - w)
    return 0


cdef int flow_read_eof(EngineState *e, Tunnel *t, int d) noexcept nogil:
    t.flow[d].eof = 1
    if t.first_eof < 0:
        t.first_eof = d
    return flow_flush(e, t, d)


cdef int flow_pump(EngineState *e, Tunnel *t, int d) noexcept nogil:
    # Move what the source has to the destination.  0: done for now, <0: close reason.
    cdef Flow *f = &t.flow[d]
    cdef int src = t.fd[d]
    cdef int dst = t.fd[1 - d]
    cdef int r
    cdef ssize_t n
    cdef Py_ssize_t budget = PUMP_BUDGET
    cdef int src_error = CLOSE_CLIENT_ERROR if d == 0 else CLOSE_UPSTREAM_ERROR

    if t.ssl[d] != NULL:
        return flow_pump_tls(e, t, d)
    r = flow_flush(e, t, d)
    if r != 0:
        return r if r < 0 else 0
    while budget > 0 and not f.eof:
        if f.splicing and f.pipe == NULL:
            f.pipe = pipe_get(e)        # none to be had: copy this time, splice again later
        if f.splicing and f.pipe != NULL:
            n = splice(src, NULL, f.pipe.prod, NULL, <size_t>e.pipe_size,
                       SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            e.splice_calls += 1
            if n > 0:
                f.pipe.data += n
                f.nbytes += n
                f.last_rx = e.now
                e.bytes_spliced += n
                budget -= n
                # As HAProxy: splice out right after splicing in, without waiting for a poll.
                r = flow_flush(e, t, d)
                if r != 0:
                    return r if r < 0 else 0
                if n < SPLICE_SMALL:
                    f.streak += 1
                    if t.mode == RELAY_AUTO and f.streak >= SPLICE_SMALL_STREAK:
                        f.splicing = 0
                        f.streak = 0
                        e.switches_to_copy += 1
                    break               # a short read: the socket is drained for now
                f.streak = 0
                continue
            if n == 0:
                return flow_read_eof(e, t, d)
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                break
            if errno == EINVAL or errno == ENOSYS:
                f.splicing = 0          # this socket cannot splice: copy from now on
                continue
            return src_error
        else:
            n = recv(src, e.buf, <size_t>e.bufsize, MSG_DONTWAIT)
            e.copy_calls += 1
            if n > 0:
                budget -= n
                r = flow_forward(e, t, d, n)
                if r != 0:
                    return r if r < 0 else 0
                if n == e.bufsize:
                    f.streak += 1
                    if t.mode == RELAY_AUTO and f.streak >= COPY_FULL_STREAK:
                        f.splicing = 1
                        f.streak = 0
                        e.switches_to_splice += 1
                    continue
                f.streak = 0
                break                   # a short read: the socket is drained for now
            if n == 0:
                return flow_read_eof(e, t, d)
            if errno == EINTR:
                continue
            if errno == EAGAIN:
                break
            return src_error
    if f.pipe != NULL and f.pipe.data == 0:
        pipe_put(e, f.pipe)
        f.pipe = NULL
    return 0


# --- TLS sides ----------------------------------------------------------------------------

cdef ssize_t side_send(EngineState *e, Tunnel *t, int s, const char *buf, Py_ssize_t n) noexcept nogil:
    # Bytes taken by side s, or -1 with errno: EAGAIN (wait for the socket) or a failure.  A TLS
    # write that blocked must be repeated with the same bytes: the caller holds exactly the rest
    # (SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER lets them move).
    if t.ssl[s] == NULL:
        return send(t.fd[s], buf, <size_t>n, MSG_DONTWAIT | MSG_NOSIGNAL)
    return tls_io(e, t, s, <char *>buf, TLS_WRITE_MAX if n > TLS_WRITE_MAX else n, 1)


cdef ssize_t tls_io(EngineState *e, Tunnel *t, int s, char *buf, Py_ssize_t n, bint writing) noexcept nogil:
    # SSL_write or SSL_read with recv(2)'s answers: >0 bytes, 0 end of stream (reads), -1 with
    # errno (EAGAIN: wait; OpenSSL may want the other readiness, which tls_want records).
    cdef FASTWS_SSL *ssl = t.ssl[s]
    cdef int r, err, saved
    fastws_ssl.err_clear()
    if writing:
        r = fastws_ssl.write(ssl, buf, <int>n)
        e.tls_writes += 1
    else:
        r = fastws_ssl.read(ssl, buf, <int>n)
        e.tls_reads += 1
    if r > 0:
        return r
    saved = errno
    err = fastws_ssl.get_error(ssl, r)
    if err == FASTWS_SSL_ERROR_WANT_READ or err == FASTWS_SSL_ERROR_WANT_WRITE:
        if writing and err == FASTWS_SSL_ERROR_WANT_READ:
            t.tls_want[s] |= EPOLLIN
        elif not writing and err == FASTWS_SSL_ERROR_WANT_WRITE:
            t.tls_want[s] |= EPOLLOUT
        fastws_set_errno(EAGAIN)
        return -1
    if not writing and (err == FASTWS_SSL_ERROR_ZERO_RETURN
                        or err == FASTWS_SSL_ERROR_SYSCALL and saved == 0):
        # close_notify, or (OpenSSL 1.1) a FIN without it; 3.x reports the latter as
        # ZERO_RETURN under SSL_OP_IGNORE_UNEXPECTED_EOF, which tls.py sets
        return 0
    fastws_set_errno(saved if err == FASTWS_SSL_ERROR_SYSCALL and saved != 0
                     else (EPIPE if writing else EPROTO))
    return -1


cdef void tunnel_ready(EngineState *e, Tunnel *t, int s) noexcept nogil:
    if t.ready == 0:
        t.ready_next = e.ready
        e.ready = t
    t.ready |= 1 << s


cdef void tunnel_unready(EngineState *e, Tunnel *t) noexcept nogil:
    cdef Tunnel **link = &e.ready
    if t.ready == 0:
        return
    while link[0] != NULL:
        if link[0] == t:
            link[0] = t.ready_next
            break
        link = &link[0].ready_next
    t.ready = 0
    t.ready_next = NULL


cdef int flow_pump_tls(EngineState *e, Tunnel *t, int d) noexcept nogil:
    # flow_pump for a TLS source: SSL_read fills the shared buffer record after record (a record
    # holds at most 16 KiB), and the destination takes it in one write.
    cdef Flow *f = &t.flow[d]
    cdef int r, status
    cdef ssize_t n, got
    cdef Py_ssize_t budget = PUMP_BUDGET
    cdef int src_error = CLOSE_CLIENT_ERROR if d == 0 else CLOSE_UPSTREAM_ERROR

    r = flow_flush(e, t, d)
    if r != 0:
        return r if r < 0 else 0
    while budget > 0 and not f.eof:
        n = 0
        status = 1                  # 1: more may come, 0: end of stream, -1: drained, -2: error
        while n < e.bufsize:
            got = tls_io(e, t, d, e.buf + n, e.bufsize - n, 0)
            if got > 0:
                n += got
                if not fastws_ssl.has_pending(t.ssl[d]):
                    # OpenSSL holds nothing more: the socket is drained for now, or epoll
                    # (level-triggered) reports it again; this spares a read that would fail
                    status = -1
                    break
                continue
            if got == 0:
                status = 0
            elif errno == EINTR:
                continue
            elif errno == EAGAIN:
                status = -1
            else:
                status = -2
            break
        if n > 0:
            e.copy_calls += 1
            budget -= n
            r = flow_forward(e, t, d, n)
            if r < 0:
                return r
            if r > 0:
                # held: the rest goes when the destination drains, and then the EOF
                if status == 0:
                    f.eof = 1
                    if t.first_eof < 0:
                        t.first_eof = d
                return src_error if status == -2 else 0
        if status == 0:
            return flow_read_eof(e, t, d)
        if status == -2:
            return src_error
        if status == -1:
            return 0
    if not f.eof and fastws_ssl.has_pending(t.ssl[d]):
        # out of budget with plaintext inside OpenSSL: epoll would never report it
        tunnel_ready(e, t, d)
    return 0


cdef int tunnel_tls_event(EngineState *e, Tunnel *t, int side, unsigned int ev) noexcept nogil:
    # An event on a TLS side: its read may have been waiting for writability (and its write for
    # readability), so both ways are retried whatever the event.
    cdef unsigned int want = t.tls_want[side]
    cdef int r = 0
    t.tls_want[side] = 0
    if ev & (EPOLLIN | EPOLLHUP | EPOLLERR) or want & EPOLLOUT:
        r = flow_pump(e, t, side)
    if r == 0 and flow_holds(&t.flow[1 - side]):
        r = flow_flush(e, t, 1 - side)
        if r == 0 and not t.flow[1 - side].eof:
            r = flow_pump(e, t, 1 - side)
        elif r > 0:
            r = 0
    return r


cdef void tunnel_close(EngineState *e, Tunnel *t, int reason, Tunnel **closed) noexcept nogil:
    cdef int i
    if t.closing:
        return
    t.closing = 1
    t.reason = reason
    t.ended = e.now
    for i in range(2):
        if t.fd[i] >= 0:
            close(t.fd[i])          # also drops the fd from the epoll set
            t.fd[i] = -1
        if t.flow[i].pipe != NULL:
            pipe_put(e, t.flow[i].pipe)
            t.flow[i].pipe = NULL
        if t.flow[i].held != NULL:
            free(t.flow[i].held)
            t.flow[i].held = NULL
    free(t.rbuf)
    t.rbuf = NULL
    free(t.early)
    t.early = NULL
    heap_remove(e, t)
    tunnel_unready(e, t)
    e.tunnels_active -= 1
    e.closes[-reason] += 1
    t.next = closed[0]
    closed[0] = t


cdef int flow_take_pipe(EngineState *e, Flow *f) noexcept nogil:
    # Move the bytes a flow's pipe holds behind its held bytes, so that the flow is plain
    # memory; the pipe goes back to the pool.  0, or CLOSE_ERROR.
    cdef Py_ssize_t rest, n
    cdef ssize_t r
    cdef char *buf
    if f.pipe == NULL:
        return 0
    if f.pipe.data > 0:
        rest = f.held_len - f.held_off if f.held != NULL else 0
        n = rest + f.pipe.data
        buf = <char *>malloc(n)
        if buf == NULL:
            return CLOSE_ERROR
        if rest:
            memcpy(buf, f.held + f.held_off, rest)
        while f.pipe.data > 0:
            r = read(f.pipe.cons, buf + rest, <size_t>f.pipe.data)
            if r < 0 and errno == EINTR:
                continue
            if r <= 0:
                free(buf)
                return CLOSE_ERROR
            rest += r
            f.pipe.data -= r
        free(f.held)
        f.held = buf
        f.held_len = n
        f.held_off = 0
    pipe_put(e, f.pipe)
    f.pipe = NULL
    return 0


cdef inline bint tunnel_exportable(Tunnel *t) noexcept nogil:
    # Only a tunnel whose whole state is its two sockets and its counters can move to another
    # process (state kept in this process's memory, as a TLS session's, cannot).
    return not t.closing and t.phase == PHASE_TUNNEL and t.ssl[0] == NULL and t.ssl[1] == NULL


cdef void engine_export(EngineState *e, Tunnel **exported, Tunnel **closed) noexcept nogil:
    # Export every tunnel that can move; the others stay.  Exporting reshapes the heap, so the
    # candidates are picked first.
    cdef Tunnel **picked
    cdef int i, n = 0
    if e.heap_len == 0:
        return
    picked = <Tunnel **>malloc(e.heap_len * sizeof(Tunnel *))
    if picked == NULL:
        return
    for i in range(e.heap_len):
        if tunnel_exportable(e.heap[i]):
            picked[n] = e.heap[i]
            n += 1
    for i in range(n):
        tunnel_export(e, picked[i], exported, closed)
    free(picked)


cdef void tunnel_export(EngineState *e, Tunnel *t, Tunnel **exported,
                        Tunnel **closed) noexcept nogil:
    # Take a tunnel out of the engine whole: its fds leave the epoll set (still open), bytes in
    # flight become plain memory, its counters stay; Python takes it with take_exported().
    cdef int i
    cdef epoll_event ev
    for i in range(2):
        if flow_take_pipe(e, &t.flow[i]) < 0:
            tunnel_close(e, t, CLOSE_ERROR, closed)
            return
    for i in range(2):
        if t.registered[i]:
            epoll_ctl(e.epfd, EPOLL_CTL_DEL, t.fd[i], &ev)
            t.registered[i] = 0
    t.closing = 1
    t.reason = CLOSE_EXPORTED
    t.ended = e.now
    heap_remove(e, t)
    e.tunnels_active -= 1
    t.next = exported[0]
    exported[0] = t


cdef int tunnel_interest(EngineState *e, Tunnel *t) noexcept nogil:
    # Level-triggered interest: read a side while its flow is not holding bytes (backpressure),
    # write a side while the opposite flow holds bytes for it.
    cdef int s
    cdef unsigned int want
    cdef epoll_event ev
    for s in range(2):
        want = t.tls_want[s]
        if not t.flow[s].eof and not flow_holds(&t.flow[s]):
            want |= EPOLLIN
        if flow_holds(&t.flow[1 - s]):
            want |= EPOLLOUT
        if t.registered[s] and want == t.want[s]:
            continue
        ev.events = want
        ev.data.u64 = <uintptr_t>t | <unsigned int>s
        if not t.registered[s]:
            if want == 0:
                continue
            if epoll_ctl(e.epfd, EPOLL_CTL_ADD, t.fd[s], &ev) < 0:
                return CLOSE_ERROR
            t.registered[s] = 1
        elif want == 0:
            # Nothing to wait for on this side; leaving it in the set would report EPOLLHUP
            # over and over once its peer has gone.
            epoll_ctl(e.epfd, EPOLL_CTL_DEL, t.fd[s], &ev)
            t.registered[s] = 0
        elif epoll_ctl(e.epfd, EPOLL_CTL_MOD, t.fd[s], &ev) < 0:
            return CLOSE_ERROR
        t.want[s] = want
    return 0


cdef void tunnel_settle(EngineState *e, Tunnel *t, int r, Tunnel **closed) noexcept nogil:
    if r == 0 and t.flow[0].shut and t.flow[1].shut:
        r = CLOSE_CLIENT if t.first_eof == 0 else CLOSE_UPSTREAM
    if r == 0:
        r = tunnel_interest(e, t)
    if r < 0:
        tunnel_close(e, t, r, closed)


cdef void tunnel_start(EngineState *e, Tunnel *t, Tunnel **closed) noexcept nogil:
    cdef int r = 0
    cdef int reason, i
    t.flow[0].last_rx = e.now
    t.flow[1].last_rx = e.now
    t.heap_idx = -1
    t.deadline = tunnel_deadline(t, &reason)
    e.tunnels_total += 1
    e.tunnels_active += 1
    if heap_push(e, t) < 0:
        tunnel_close(e, t, CLOSE_ERROR, closed)
        return
    # Bytes that arrived before the handoff go first.
    if t.flow[0].held != NULL:
        r = flow_flush(e, t, 0)
    if r >= 0 and t.flow[1].held != NULL:
        r = flow_flush(e, t, 1)
    # A TLS side may already hold bytes the handshake code did not ask for, where epoll
    # cannot see them.
    for i in range(2):
        if t.ssl[i] != NULL and fastws_ssl.has_pending(t.ssl[i]):
            tunnel_ready(e, t, i)
    tunnel_settle(e, t, r if r < 0 else 0, closed)


include "_relay_handshake.pxi"


cdef void engine_expire(EngineState *e, Tunnel **closed) noexcept nogil:
    cdef Tunnel *t
    cdef int reason
    cdef double d
    while e.heap_len > 0 and e.heap[0].deadline <= e.now:
        t = e.heap[0]
        d = tunnel_deadline(t, &reason)
        if d > e.now:
            t.deadline = d
            heap_down(e, 0)
        elif t.phase == PHASE_HANDSHAKE:
            hs_return(e, t, reason, closed)
        else:
            tunnel_close(e, t, reason, closed)


cdef int engine_timeout(EngineState *e) noexcept nogil:
    # Milliseconds epoll_wait may sleep: until the earliest deadline, or for ever.
    cdef double wait
    if e.ready != NULL:
        return 0
    if e.heap_len > 0:
        wait = e.heap[0].deadline - fastws_monotonic()
        return 0 if wait <= 0 else <int>(wait * 1000.0) + 1
    return -1


cdef int engine_step(EngineState *e, int timeout) noexcept nogil:
    # One turn: wait for events (up to timeout ms), move bytes, start what was handed over,
    # expire deadlines, report closures.  Returns whether the engine is stopping.
    cdef epoll_event events[MAX_EVENTS]
    cdef int n, i, side, r, stopping
    cdef unsigned int ev
    cdef unsigned long long u
    cdef Tunnel *t
    cdef Tunnel *nxt
    cdef Tunnel *closed = NULL
    cdef Tunnel *incoming
    cdef Tunnel *exported
    cdef Tunnel *last
    cdef uint64_t counter
    cdef uint64_t one = 1
    cdef int exporting
    n = epoll_wait(e.epfd, events, MAX_EVENTS, timeout)
    e.now = fastws_monotonic()
    e.loops += 1
    for i in range(n if n > 0 else 0):
        u = events[i].data.u64
        if u == 0:
            read(e.wakefd, &counter, sizeof(counter))
            continue
        t = <Tunnel *><uintptr_t>(u & ~(<unsigned long long>1))
        side = <int>(u & 1)
        if t.closing:
            continue
        ev = events[i].events
        if t.phase == PHASE_HANDSHAKE:
            hs_event(e, t, &closed)
            continue
        if t.ssl[side] != NULL:
            tunnel_settle(e, t, tunnel_tls_event(e, t, side, ev), &closed)
            continue
        r = 0
        if ev & (EPOLLIN | EPOLLHUP | EPOLLERR):
            r = flow_pump(e, t, side)
        if r == 0 and ev & (EPOLLOUT | EPOLLHUP | EPOLLERR):
            r = flow_flush(e, t, 1 - side)
            if r == 0 and not t.flow[1 - side].eof:
                # the destination drained: pick up what the source has meanwhile
                r = flow_pump(e, t, 1 - side)
            elif r > 0:
                r = 0
        tunnel_settle(e, t, r, &closed)

    pthread_mutex_lock(&e.lock)
    e.sleeping = 0
    incoming = e.incoming
    e.incoming = NULL
    stopping = e.stopping
    exporting = e.exporting == 1
    if exporting:
        e.exporting = 0
    pthread_mutex_unlock(&e.lock)
    while incoming != NULL:
        nxt = incoming.next
        incoming.next = NULL
        if incoming.phase == PHASE_HANDSHAKE:
            hs_start(e, incoming, &closed)
        else:
            tunnel_start(e, incoming, &closed)
        incoming = nxt
    if exporting and not stopping:
        exported = NULL
        engine_export(e, &exported, &closed)
        pthread_mutex_lock(&e.lock)
        if exported != NULL:
            last = exported
            while last.next != NULL:
                last = last.next
            last.next = e.exported
            e.exported = exported
        e.exporting = -1            # done: take_exported() may look
        pthread_mutex_unlock(&e.lock)
        if e.threaded:
            write(e.notifyfd, &one, sizeof(one))
    engine_run_ready(e, &closed)
    if stopping:
        while e.heap_len > 0:
            tunnel_close(e, e.heap[0], CLOSE_SHUTDOWN, &closed)
    else:
        engine_expire(e, &closed)
    if closed != NULL:
        engine_report(e, closed)
    return stopping


cdef void *engine_main(void *arg) noexcept nogil:
    cdef EngineState *e = <EngineState *>arg
    cdef int timeout
    while True:
        timeout = engine_timeout(e)
        # Python writes the wake-up eventfd only while this thread may be asleep, so a burst of
        # handovers costs one write, not one each.
        pthread_mutex_lock(&e.lock)
        if e.incoming != NULL or e.stopping:
            timeout = 0
        elif timeout != 0:
            e.sleeping = 1
        pthread_mutex_unlock(&e.lock)
        if engine_step(e, timeout):
            break
    return NULL


cdef void engine_run_ready(EngineState *e, Tunnel **closed) noexcept nogil:
    cdef Tunnel *t = e.ready
    cdef Tunnel *nxt
    cdef int mask, side, r
    e.ready = NULL
    while t != NULL:
        nxt = t.ready_next
        mask = t.ready
        t.ready = 0
        t.ready_next = NULL
        if not t.closing:
            e.tls_ready_runs += 1
            r = 0
            for side in range(2):
                if r == 0 and mask & (1 << side):
                    r = flow_pump(e, t, side)
            tunnel_settle(e, t, r, closed)
        t = nxt


cdef void engine_report(EngineState *e, Tunnel *closed) noexcept nogil:
    cdef Tunnel *last = closed
    cdef int was_empty
    cdef uint64_t one = 1
    while last.next != NULL:
        last = last.next
    pthread_mutex_lock(&e.lock)
    was_empty = e.done == NULL and e.opened == NULL
    last.next = e.done
    e.done = closed
    pthread_mutex_unlock(&e.lock)
    if was_empty and e.threaded:
        write(e.notifyfd, &one, sizeof(one))


cdef dict _REASONS = {
    CLOSE_CLIENT: "client",
    CLOSE_UPSTREAM: "upstream",
    CLOSE_CLIENT_ERROR: "client_error",
    CLOSE_UPSTREAM_ERROR: "upstream_error",
    CLOSE_READ_TIMEOUT: "read_timeout",
    CLOSE_SEND_TIMEOUT: "send_timeout",
    CLOSE_SHUTDOWN: "shutdown",
    CLOSE_ERROR: "error",
}

_MODES = {"auto": RELAY_AUTO, "splice": RELAY_SPLICE, "copy": RELAY_COPY}
_MODE_NAMES = {v: k for k, v in _MODES.items()}


cdef int _errcheck(int rc) except -1:
    if rc < 0:
        raise OSError(errno, strerror(errno).decode())
    return rc


@cython.final
cdef class Engine:
    """A relay engine: a native thread with its own epoll set that owns handed-over tunnels.

    :param pipe_size: capacity asked for each pipe of the pool (F_SETPIPE_SZ).
    :param max_pipes: pipes that may exist at once (each costs two fds while in use).
    :param bufsize: size of the one buffer shared by every copying flow.
    """

    cdef EngineState *e
    cdef pthread_t thread
    cdef bint started
    cdef bint stopped
    cdef list _handshake_events

    def __cinit__(self, int pipe_size=262144, int max_pipes=1024, Py_ssize_t bufsize=65536):
        if bufsize < 1024:
            raise ValueError("bufsize must be at least 1024")
        self.e = <EngineState *>calloc(1, sizeof(EngineState))
        if self.e == NULL:
            raise MemoryError()
        self.e.epfd = -1
        self.e.wakefd = -1
        self.e.notifyfd = -1
        self.e.pipe_size = pipe_size
        self.e.max_pipes = max_pipes
        self.e.bufsize = bufsize
        self.e.buf = <char *>malloc(bufsize)
        if self.e.buf == NULL:
            raise MemoryError()
        pthread_mutex_init(&self.e.lock, NULL)
        self._handshake_events = []

    def start(self, bint threaded=True):
        """Create the epoll set and the eventfds and start the relay thread.

        With threaded=False there is no thread: the caller's event loop watches `fd` and calls
        run_once() when it is readable and when run_once()'s deadline comes, and drains after
        each call.  That spares a cross-thread wake-up per handover, which is what a handshake
        costs most where waking another CPU is expensive (virtual machines).
        """
        cdef epoll_event ev
        if self.started:
            raise RuntimeError("engine already started")
        self.e.threaded = threaded
        self.e.epfd = _errcheck(epoll_create1(EPOLL_CLOEXEC))
        self.e.wakefd = _errcheck(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC))
        self.e.notifyfd = _errcheck(eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC))
        ev.events = EPOLLIN
        ev.data.u64 = 0
        _errcheck(epoll_ctl(self.e.epfd, EPOLL_CTL_ADD, self.e.wakefd, &ev))
        self.e.now = fastws_monotonic()
        if threaded and pthread_create(&self.thread, NULL, engine_main, self.e) != 0:
            raise OSError("cannot start the relay thread")
        self.started = True

    @property
    def fd(self):
        """The engine's epoll fd: readable when run_once() has work (threaded=False)."""
        return self.e.epfd

    @property
    def pending(self):
        """Whether tunnels were handed over since the last run_once() (threaded=False)."""
        return self.e.incoming != NULL

    def run_once(self):
        """One turn of the engine without waiting (threaded=False); returns the monotonic time
        of its next deadline, or None."""
        if self.e.threaded or not self.started or self.stopped:
            raise RuntimeError("run_once() is for a started engine without a thread")
        with nogil:
            engine_step(self.e, 0)
        if self.e.ready != NULL:
            return 0.0
        return self.e.heap[0].deadline if self.e.heap_len > 0 else None

    @property
    def notify_fd(self):
        """An fd that becomes readable when closed tunnels wait in drain()."""
        return self.e.notifyfd

    def add(self, int client_fd, int upstream_fd, bytes to_upstream, bytes to_client,
            double read_timeout, double send_timeout, str mode, object ctx,
            object client_ssl=None, object upstream_ssl=None,
            unsigned long long up=0, unsigned long long down=0, double age=0.0,
            int first_eof=-1):
        """Hand a tunnel's two sockets to the engine, which owns (and will close) them from now on.

        Both must be non-blocking: splice(2) blocks on a blocking socket whatever
        SPLICE_F_NONBLOCK says.

        to_upstream and to_client are bytes already read from each side past its head: they are
        delivered before anything else.  ctx comes back from drain() when the tunnel closes.
        client_ssl and upstream_ssl are, for a TLS side, the ssl module's connection object
        (SSLSocket._sslobj) whose handshake is done: the engine reads and writes through its
        SSL* and keeps the object alive until the tunnel is drained.
        up, down, age and first_eof continue a tunnel exported by another engine: its byte
        counts, its age in seconds, and which side's EOF came first (-1: none yet).
        """
        cdef Tunnel *t
        cdef uint64_t one = 1
        cdef int i
        cdef FASTWS_SSL *ssl[2]
        if not self.started or self.stopped:
            raise RuntimeError("engine is not running")
        if client_fd < 0 or upstream_fd < 0:
            raise ValueError("bad file descriptor")
        ssl[0] = _borrow_ssl(client_ssl, client_fd)
        ssl[1] = _borrow_ssl(upstream_ssl, upstream_fd)
        t = <Tunnel *>calloc(1, sizeof(Tunnel))
        if t == NULL:
            raise MemoryError()
        t.fd[0] = client_fd
        t.fd[1] = upstream_fd
        t.read_timeout = read_timeout
        t.send_timeout = send_timeout
        t.first_eof = first_eof
        t.heap_idx = -1
        t.mode = _MODES[mode]
        if ssl[0] != NULL or ssl[1] != NULL:
            t.mode = RELAY_COPY         # the kernel cannot splice what it cannot decrypt
        t.started = fastws_monotonic() - age
        t.flow[0].nbytes = up
        t.flow[1].nbytes = down
        for i in range(2):
            t.flow[i].splicing = 1 if t.mode == RELAY_SPLICE else 0
        if _hold(&t.flow[0], to_upstream) < 0 or _hold(&t.flow[1], to_client) < 0:
            free(t.flow[0].held)
            free(t)
            raise MemoryError()
        Py_INCREF(ctx)
        t.ctx = <PyObject *>ctx
        for i, obj in enumerate((client_ssl, upstream_ssl)):
            if ssl[i] != NULL:
                # Drop the 16 KiB+ record buffers while a tunnel idles; read ahead, so that one
                # read(2) brings a record's header and body, or several records.
                fastws_ssl.ctrl(ssl[i], FASTWS_SSL_CTRL_MODE, FASTWS_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
                                | FASTWS_SSL_MODE_RELEASE_BUFFERS, NULL)
                fastws_ssl.ctrl(ssl[i], FASTWS_SSL_CTRL_SET_READ_AHEAD, 1, NULL)
                fastws_ssl.free_buffers(ssl[i])     # those of the handshake; refused if in use
                Py_INCREF(obj)
                t.sslobj[i] = <PyObject *>obj
                t.ssl[i] = ssl[i]
        if ssl[0] != NULL or ssl[1] != NULL:
            self.e.tls_tunnels_total += 1
        self._queue(t)

    def drain(self):
        """Closed tunnels since the last call: a list of (ctx, bytes client->upstream,
        bytes upstream->client, duration in seconds, close reason)."""
        cdef Tunnel *t
        cdef Tunnel *nxt
        cdef uint64_t counter
        cdef list out = []
        cdef list events = []
        cdef Notice *notice
        cdef Notice *notices
        if self.e.threaded:
            read(self.e.notifyfd, &counter, sizeof(counter))
        pthread_mutex_lock(&self.e.lock)
        t = self.e.done
        self.e.done = NULL
        notices = self.e.opened
        self.e.opened = NULL
        pthread_mutex_unlock(&self.e.lock)
        while notices != NULL:
            notice = notices
            notices = notice.next
            events.append(("opened", <object>notice.obj, notice.connect_time,
                           notice.header_time, notice.head_len))
            Py_XDECREF(notice.obj)
            free(notice)
        while t != NULL:
            nxt = t.next
            if t.phase == PHASE_HANDSHAKE:
                # given back (fds open, Python's now), or closed by stop() before its 101
                events.append(("returned", <object>t.hctx, t.fd[0], t.fd[1],
                               _HS_REASONS.get(t.reason, "error") if t.fd[0] >= 0 else "shutdown",
                               PyBytes_FromStringAndSize(t.rbuf, t.rlen) if t.rbuf != NULL else b"",
                               t.err))
                free(t.rbuf)
                free(t.early)
                Py_XDECREF(t.hctx)
                Py_XDECREF(t.ctx)
                free(t)
                t = nxt
                continue
            out.append((<object>t.ctx, t.flow[0].nbytes, t.flow[1].nbytes,
                        t.ended - t.started, _REASONS.get(t.reason, "error")))
            Py_XDECREF(t.ctx)
            Py_XDECREF(t.sslobj[0])
            Py_XDECREF(t.sslobj[1])
            free(t)
            t = nxt
        out.reverse()
        events.reverse()
        self._handshake_events.extend(events)
        return out

    cdef void _queue(self, Tunnel *t) noexcept:
        cdef uint64_t one = 1
        cdef int wake
        pthread_mutex_lock(&self.e.lock)
        t.next = self.e.incoming
        self.e.incoming = t
        wake = self.e.sleeping and self.e.threaded
        self.e.sleeping = 0
        pthread_mutex_unlock(&self.e.lock)
        if wake:
            write(self.e.wakefd, &one, sizeof(one))

    def drain_handshakes(self):
        """Handshakes the engine finished since the last drain() (call drain() first):
        ("opened", hctx, connect time, time to the 101, length of the 101 head) for one that
        became a tunnel, ("returned", hctx, client fd, upstream fd, reason, bytes read, errno)
        for one given back to Python with its sockets open ("shutdown": closed by stop())."""
        events = self._handshake_events
        self._handshake_events = []
        return events

    def handshake(self, int client_fd, int upstream_fd, bytes request, bytes early,
                  bytes accept, bytes token, double connect_timeout, double header_timeout,
                  double read_timeout, double send_timeout, str mode, object ctx, object hctx):
        """Hand over a WebSocket handshake whose upstream connect is under way (non-blocking
        sockets): the engine sends `request` once connected, reads the answer and, for a valid
        101 (`token`, `accept`), makes the tunnel at once; else the sockets come back from
        drain_handshakes().  `early` (client bytes past its head) is held until the 101.
        ctx is the tunnel's, as for add(); hctx comes back with the outcome."""
        cdef Tunnel *t
        cdef uint64_t one = 1
        if not self.started or self.stopped:
            raise RuntimeError("engine is not running")
        if client_fd < 0 or upstream_fd < 0:
            raise ValueError("bad file descriptor")
        if len(accept) >= 32 or len(token) >= 32 or not request:
            raise ValueError("bad handshake")
        t = <Tunnel *>calloc(1, sizeof(Tunnel))
        if t == NULL:
            raise MemoryError()
        t.phase = PHASE_HANDSHAKE
        t.fd[0] = client_fd
        t.fd[1] = upstream_fd
        t.read_timeout = read_timeout
        t.send_timeout = send_timeout
        t.header_timeout = header_timeout
        t.first_eof = -1
        t.heap_idx = -1
        t.mode = _MODES[mode]
        t.started = fastws_monotonic()
        t.hs_deadline = t.started + connect_timeout
        for i in range(2):
            t.flow[i].splicing = 1 if t.mode == RELAY_SPLICE else 0
        memcpy(t.expect, PyBytes_AS_STRING(accept), len(accept))
        t.expect_len = len(accept)
        memcpy(t.token, PyBytes_AS_STRING(token), len(token))
        t.token_len = len(token)
        if _hold(&t.flow[0], request) < 0:
            free(t)
            raise MemoryError()
        if early:
            t.early = <char *>malloc(len(early))
            if t.early == NULL:
                free(t.flow[0].held)
                free(t)
                raise MemoryError()
            memcpy(t.early, PyBytes_AS_STRING(early), len(early))
            t.early_len = len(early)
        Py_INCREF(ctx)
        t.ctx = <PyObject *>ctx
        Py_INCREF(hctx)
        t.hctx = <PyObject *>hctx
        self._queue(t)

    def export(self):
        """Ask the relay thread to take every tunnel that can move out whole (see
        take_exported()); the notify fd becomes readable when it is done."""
        cdef uint64_t one = 1
        if not self.started or self.stopped:
            raise RuntimeError("engine is not running")
        pthread_mutex_lock(&self.e.lock)
        self.e.exporting = 1
        pthread_mutex_unlock(&self.e.lock)
        write(self.e.wakefd, &one, sizeof(one))     # wakes the thread, or the loop's poll of fd

    def take_exported(self):
        """The tunnels taken out since the last call, once the export asked for is done (None
        before): a list of (ctx, client fd, upstream fd, bytes for the upstream, bytes for the
        client, bytes up, bytes down, age in seconds, first EOF side, read timeout, send timeout,
        relay mode).  The caller owns the fds."""
        cdef Tunnel *t
        cdef Tunnel *nxt
        cdef list out = []
        cdef double now = fastws_monotonic()
        pthread_mutex_lock(&self.e.lock)
        if self.e.exporting != -1:
            pthread_mutex_unlock(&self.e.lock)
            return None
        self.e.exporting = 0
        t = self.e.exported
        self.e.exported = NULL
        pthread_mutex_unlock(&self.e.lock)
        while t != NULL:
            nxt = t.next
            out.append((<object>t.ctx, t.fd[0], t.fd[1], _held(&t.flow[0]), _held(&t.flow[1]),
                        t.flow[0].nbytes, t.flow[1].nbytes, now - t.started, t.first_eof,
                        t.read_timeout, t.send_timeout, _MODE_NAMES[t.mode]))
            free(t.flow[0].held)
            free(t.flow[1].held)
            Py_XDECREF(t.ctx)
            free(t)
            t = nxt
        out.reverse()
        return out

    def stop(self):
        """Close every tunnel (reason "shutdown") and end the relay thread; drain() then
        returns the last closures."""
        cdef uint64_t one = 1
        if not self.started or self.stopped:
            return
        pthread_mutex_lock(&self.e.lock)
        self.e.stopping = 1
        pthread_mutex_unlock(&self.e.lock)
        if self.e.threaded:
            write(self.e.wakefd, &one, sizeof(one))
            with nogil:
                pthread_join(self.thread, NULL)
        else:
            with nogil:
                engine_step(self.e, 0)
        self.stopped = True

    @property
    def active(self):
        """Tunnels the engine holds now (including ones handed over but not yet started)."""
        cdef Tunnel *t
        cdef unsigned long long pending = 0
        pthread_mutex_lock(&self.e.lock)
        t = self.e.incoming
        while t != NULL:
            pending += 1
            t = t.next
        pthread_mutex_unlock(&self.e.lock)
        return self.e.tunnels_active + pending

    def stats(self):
        """Counters of the engine, for tests, status pages and metrics."""
        cdef EngineState *e = self.e
        return {
            "tunnels_total": e.tunnels_total,
            "tunnels_active": e.tunnels_active,
            "bytes_spliced": e.bytes_spliced,
            "bytes_copied": e.bytes_copied,
            "splice_calls": e.splice_calls,
            "copy_calls": e.copy_calls,
            "pipes_total": e.pipes_total,
            "pipes_free": e.pipes_free,
            "pipes_created": e.pipes_created,
            "pipe_shortage": e.pipe_shortage,
            "switches_to_splice": e.switches_to_splice,
            "switches_to_copy": e.switches_to_copy,
            "read_timeouts": e.closes[-CLOSE_READ_TIMEOUT],
            "send_timeouts": e.closes[-CLOSE_SEND_TIMEOUT],
            "closes": {name: e.closes[-reason] for reason, name in _REASONS.items()},
            "loops": e.loops,
            "tls_tunnels_total": e.tls_tunnels_total,
            "handshakes_done": e.handshakes_done,
            "handshakes_returned": e.handshakes_returned,
            "tls_reads": e.tls_reads,
            "tls_writes": e.tls_writes,
            "tls_ready_runs": e.tls_ready_runs,
        }

    def __dealloc__(self):
        cdef Tunnel *t
        cdef Tunnel *nxt
        cdef Notice *notice
        cdef Pipe *p
        if self.e == NULL:
            return
        if self.started and not self.stopped:
            self.stop()
        for head in (0, 1, 2):
            t = self.e.done if head == 0 else self.e.incoming if head == 1 else self.e.exported
            while t != NULL:
                nxt = t.next
                if head >= 1 or t.phase == PHASE_HANDSHAKE:
                    if t.fd[0] >= 0:
                        close(t.fd[0])
                    if t.fd[1] >= 0:
                        close(t.fd[1])
                    free(t.flow[0].held)
                    free(t.flow[1].held)
                free(t.rbuf)
                free(t.early)
                Py_XDECREF(t.hctx)
                Py_XDECREF(t.ctx)
                Py_XDECREF(t.sslobj[0])
                Py_XDECREF(t.sslobj[1])
                free(t)
                t = nxt
        while self.e.opened != NULL:
            notice = self.e.opened
            self.e.opened = notice.next
            Py_XDECREF(notice.obj)
            free(notice)
        while self.e.free_pipes != NULL:
            p = self.e.free_pipes
            self.e.free_pipes = p.next
            close(p.prod)
            close(p.cons)
            free(p)
        for fd in (self.e.epfd, self.e.wakefd, self.e.notifyfd):
            if fd >= 0:
                close(fd)
        pthread_mutex_destroy(&self.e.lock)
        free(self.e.heap)
        free(self.e.buf)
        free(self.e)
        self.e = NULL


cdef bytes _held(Flow *f):
    if f.held == NULL:
        return b""
    return PyBytes_FromStringAndSize(f.held + f.held_off, f.held_len - f.held_off)


cdef int _hold(Flow *f, bytes data) noexcept:
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    if n == 0:
        return 0
    f.held = <char *>malloc(n)
    if f.held == NULL:
        return -1
    memcpy(f.held, PyBytes_AS_STRING(data), n)
    f.held_len = n
    f.held_off = 0
    return 0


cdef FASTWS_SSL *_borrow_ssl(object sslobj, int fd) except? NULL:
    cdef FASTWS_SSL *ssl
    if sslobj is None:
        return NULL
    cls = type(sslobj)
    if cls.__name__ != "_SSLSocket" or cls.__module__ != "_ssl":
        raise TypeError(f"expected an ssl connection object (_ssl._SSLSocket), got {cls.__name__}")
    if not load_openssl():
        raise RuntimeError("the OpenSSL library of the ssl module cannot be found in the process")
    ssl = fastws_ssl_of(<PyObject *>sslobj)
    # The layout of _ssl._SSLSocket is CPython's private business: trust the pointer only if
    # OpenSSL itself says it is the connection on this socket.
    if ssl == NULL or fastws_ssl.get_fd(ssl) != fd:
        raise RuntimeError("cannot find the SSL connection inside the ssl module's object")
    return ssl


def check_ssl(object sslobj, int fd):
    """Raise unless the engine can relay through this ssl connection object (SSLSocket._sslobj)
    on socket fd: the check Engine.add makes, for a start-up self-test."""
    _borrow_ssl(sslobj, fd)


def load_openssl():
    """Resolve the OpenSSL calls of TLS tunnels in the libssl the ssl module loaded; True when
    TLS tunnels can be relayed by the engine."""
    import _ssl
    hint = getattr(_ssl, "__file__", None)
    cdef bytes b = hint.encode() if hint else b""
    cdef const char *path = NULL
    if hint:
        path = b
    return fastws_ssl_load(path) == 0
