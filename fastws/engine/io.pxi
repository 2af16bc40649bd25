# Reading and writing a socket, plain or TLS, with edge-triggered readiness.
#
# Every socket is watched once (engine/ring.pxi: epoll or io_uring), for both directions,
# edge-triggered (as nginx's epoll module): nothing to change per state.  `rd_ready` and
# `wr_ready` remember an edge until a read comes back short or empty (the kernel had no more)
# or a write is refused or partial (the send buffer is full); a new edge sets them again.
# Returns follow recv(2): >0 bytes, 0 end of stream, or -errno (-EAGAIN: wait for the next
# edge).

cdef int io_register(Eng *e, Io *io) noexcept nogil:
    return watch_add(e, io, EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET)


cdef inline void io_event(Io *io, unsigned int ev) noexcept nogil:
    if ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        io.rd_ready = 1
    if ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR):
        io.rdhup = 1              # as nginx's pending_eof
        if ev & (EPOLLHUP | EPOLLERR):
            io.rderr = 1          # (a reset, maybe: let the next read tell)
    if ev & (EPOLLOUT | EPOLLHUP | EPOLLERR):
        io.wr_ready = 1
    if io.tls_want:
        # an SSL read that had to write first, or a write that had to read first
        if ev & EPOLLOUT and io.tls_want & EPOLLOUT:
            io.rd_ready = 1
        if ev & EPOLLIN and io.tls_want & EPOLLIN:
            io.wr_ready = 1
        io.tls_want = 0


cdef ssize_t io_recv(Eng *e, Io *io, char *buf, Py_ssize_t n) noexcept nogil:
    cdef ssize_t r
    if io.ssl != NULL:
        return tls_recv(e, io, buf, n)
    if io.eof_next:
        io.eof = 1
        io.rd_ready = 0
        return 0
    while True:
        r = recv(io.fd, buf, <size_t>n, 0)
        if r > 0:
            if r < n:
                if not io.rdhup:
                    io.rd_ready = 0  # a short read: the socket is drained until the next edge
                elif not io.rderr:
                    # The FIN came before this read (EPOLLRDHUP), so everything before it was
                    # queued, and a short read took it all: the next read would return 0.
                    # Spare that read: the end of the stream is now.
                    io.eof_next = 1
                # (after a reset, maybe: the next read says whether it is an EOF or an error)
            return r
        if r == 0:
            io.eof = 1
            io.rd_ready = 0
            return 0
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            io.rd_ready = 0
            return -EAGAIN
        return -errno


cdef ssize_t io_send(Eng *e, Io *io, const char *buf, Py_ssize_t n, int flags=0) noexcept nogil:
    # flags: MSG_MORE when the caller ends the stream right after these bytes (close() or
    # shutdown()): the kernel then sends them with the FIN in one segment, not two.
    cdef ssize_t r
    if io.ssl != NULL:
        return tls_send(e, io, buf, n)
    while True:
        r = send(io.fd, buf, <size_t>n, MSG_NOSIGNAL | flags)
        if r >= 0:
            if r < n:
                io.wr_ready = 0      # the send buffer is full until the next edge
            return r
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            io.wr_ready = 0
            return -EAGAIN
        return -errno


cdef ssize_t io_send2(Eng *e, Io *io, const char *a, Py_ssize_t alen, const char *b,
                      Py_ssize_t blen) noexcept nogil:
    # Two pieces in one system call (a head and the body bytes that came with it).
    cdef iovec iov[2]
    cdef msghdr msg
    cdef ssize_t r, r2
    if blen == 0:
        return io_send(e, io, a, alen)
    if io.ssl != NULL:
        r = tls_send(e, io, a, alen)
        if r < alen:
            return r
        r2 = tls_send(e, io, b, blen)
        return r + (r2 if r2 > 0 else 0)
    iov[0].iov_base = <void *>a
    iov[0].iov_len = <size_t>alen
    iov[1].iov_base = <void *>b
    iov[1].iov_len = <size_t>blen
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = iov
    msg.msg_iovlen = 2
    while True:
        r = sendmsg(io.fd, &msg, MSG_NOSIGNAL)
        if r >= 0:
            if r < alen + blen:
                io.wr_ready = 0
            return r
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            io.wr_ready = 0
            return -EAGAIN
        return -errno


cdef void io_close(Eng *e, Io *io) noexcept nogil:
    # Closing the fd also takes it out of the epoll set; a ring's poll must be removed.
    if io.ssl != NULL:
        fastws_ssl.free(io.ssl)
        io.ssl = NULL
    if e.backend == BACKEND_URING:
        watch_del(e, io)
    if io.fd >= 0:
        close(io.fd)
        io.fd = -1
    io.registered = 0
    io.rd_ready = 0
    io.wr_ready = 0
