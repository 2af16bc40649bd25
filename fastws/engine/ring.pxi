# How the engine learns what is ready: epoll, or io_uring (`engine = "io_uring"`).
#
# Both give the same edges to the same code (io_event, engine_turn's dispatch): a socket is
# watched once for both directions, edge-triggered; a listener level-triggered (one accept
# per readiness, as nginx without multi_accept); the timerfd, the wake-up eventfd and the
# control plane's loop for reading.
#
# With io_uring each watch is a multishot poll (a listener's a oneshot poll, armed again
# after each accept).  Arming, and removing, is an entry in the submission queue, handed to
# the kernel by the wait that ends the turn: a connection's registration costs no system call
# of its own, and the wait is one io_uring_enter.  A poll holds its file: a socket is closed
# for good (its FIN sent) once its poll is removed, at the end of the turn that closed it.
# A poll's user_data is its slot and the slot's generation: a completion that was already
# queued for an Io since closed names an old generation and is dropped.
#
# The ring is made with IORING_SETUP_DEFER_TASKRUN (includes/uring.h): a poll's wake-up only
# queues work that the engine's next io_uring_enter runs.  Without it each wake-up interrupts
# the worker to post its completion, and the engine cost twice what it costs on epoll (64 B
# echo, 23.6 µs of CPU per message against 11.9); with it the two cost the same per message,
# and a handshake makes two system calls fewer (no epoll_ctl).

cdef int watch_add(Eng *e, Io *io, unsigned int mask) noexcept nogil:
    # Watch `io`: EPOLLET in `mask` for edge-triggered; otherwise level-triggered (listeners,
    # the timerfd, the eventfds: each read or accept drains what its edge announced).
    cdef epoll_event ev
    cdef int s
    if e.backend == BACKEND_EPOLL:
        ev.events = mask
        ev.data.ptr = <void *>io
        if epoll_ctl(e.epfd, EPOLL_CTL_ADD, io.fd, &ev) < 0:
            return -errno
    else:
        if e.ring.fd < 0:
            return -EBADF            # (a stopped engine)
        s = slot_take(e, io)
        if s < 0:
            return s
        if ring_arm(e, io) < 0:
            slot_give(e, io)
            return -ENOMEM
    io.registered = 1
    ring_flush_outside(e)
    return 0


cdef void watch_del(Eng *e, Io *io) noexcept nogil:
    # Stop watching `io` (still open).  (Closing an fd takes it out of an epoll set, not out
    # of a ring: io_close calls this first.)
    cdef epoll_event ev
    if not io.registered:
        return
    io.registered = 0
    if e.backend == BACKEND_EPOLL:
        if io.fd >= 0:
            epoll_ctl(e.epfd, EPOLL_CTL_DEL, io.fd, &ev)
    elif io.slot and e.ring.fd >= 0:
        ring_remove(e, slot_data(e, io.slot))
        slot_give(e, io)
        ring_flush_outside(e)


cdef inline void ring_flush_outside(Eng *e) noexcept nogil:
    # In a turn, what is queued is submitted by the wait that follows (or by run_once's end);
    # a change made from Python between turns is submitted now, and its work run (a removed
    # poll lets go of its file only then): an engine driven by another event loop might not
    # turn again until it is, and a listener closed by the caller must stop listening now.
    if e.backend == BACKEND_URING and not e.in_turn and e.ring_started:
        uring_enter(&e.ring, 0, 0)


cdef inline void ring_batch(Eng *e) noexcept nogil:
    # Changes made from Python between turns (stop, close_idle, export) are queued from here
    # and submitted together by ring_batch_end, rather than one io_uring_enter each.
    e.in_turn = 1


cdef inline void ring_batch_end(Eng *e) noexcept nogil:
    e.in_turn = 0
    ring_flush_outside(e)


cdef inline unsigned long long slot_data(Eng *e, int s) noexcept nogil:
    return (<unsigned long long>e.slot_gen[s] << 32) | <unsigned int>s


cdef inline void ring_remove(Eng *e, unsigned long long data) noexcept nogil:
    # The removal's completion is told apart from the poll's by REMOVAL in its user_data.
    uring_poll_remove(&e.ring, data, data | REMOVAL)


cdef int ring_arm(Eng *e, Io *io) noexcept nogil:
    # Sockets: multishot, for both directions and the peer's FIN; the rest: one completion,
    # armed again when it came (level-triggered, as they are in the epoll set).
    if io.kind == IO_CLIENT or io.kind == IO_UPSTREAM:
        return uring_poll_add(&e.ring, io.fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP,
                              slot_data(e, io.slot), 1)
    # the timerfd and the wake-up eventfd are read empty at each edge; a listener (one accept
    # per readiness) and the control plane's loop (Python empties it) are level-triggered
    return uring_poll_add(&e.ring, io.fd, EPOLLIN, slot_data(e, io.slot),
                          io.kind == IO_TIMER or io.kind == IO_WAKE)


cdef inline void ring_control_rearm(Eng *e) noexcept nogil:
    # The control plane's poll, armed again now that its loop has had the pass it asked for
    # (level-triggered, as in an epoll set: if the loop has work still, it comes at once).
    if e.control_due and e.control != NULL and e.control.registered:
        if ring_arm(e, e.control) == 0:
            e.control_due = 0         # (else tried again at the next wait)


cdef int slot_take(Eng *e, Io *io) noexcept nogil:
    cdef int s, n, i
    cdef Io **slots
    cdef unsigned int *gen
    cdef int *nxt
    if e.free_slot == 0:
        n = e.nslots * 2 if e.nslots else 1024
        slots = <Io **>realloc(e.slots, n * sizeof(Io *))
        if slots == NULL:
            return -ENOMEM
        e.slots = slots
        gen = <unsigned int *>realloc(e.slot_gen, n * sizeof(unsigned int))
        if gen == NULL:
            return -ENOMEM
        e.slot_gen = gen
        nxt = <int *>realloc(e.slot_next, n * sizeof(int))
        if nxt == NULL:
            return -ENOMEM
        e.slot_next = nxt
        # slot 0 is never used: an Io's slot 0 means none
        for i in range(e.nslots if e.nslots else 1, n):
            e.slots[i] = NULL
            e.slot_gen[i] = 0
            e.slot_next[i] = i + 1 if i + 1 < n else 0
        e.free_slot = e.nslots if e.nslots else 1
        e.nslots = n
    s = e.free_slot
    e.free_slot = e.slot_next[s]
    e.slots[s] = io
    io.slot = s
    return s


cdef void slot_give(Eng *e, Io *io) noexcept nogil:
    cdef int s = io.slot
    e.slots[s] = NULL
    e.slot_gen[s] += 1
    e.slot_next[s] = e.free_slot
    e.free_slot = s
    io.slot = 0


cdef int ring_wait(Eng *e, int timeout) noexcept nogil:
    # Submit what the turn queued and wait for a completion (timeout in ms, 0: no wait).
    # -1 after a signal, as epoll_wait's EINTR.
    cdef int r
    if not e.ring_started:
        # the first turn: this thread becomes the ring's submitter; what was queued before
        # (the engine's own fds, the listeners) goes in now
        r = uring_start(&e.ring)
        if r < 0:
            return ring_failed(e, "the ring cannot be enabled", r, timeout)
        e.ring_started = 1
    if uring_ready(&e.ring) or timeout == 0:
        r = uring_enter(&e.ring, 0, 0)        # (what is ready, without sleeping)
    else:
        r = uring_enter(&e.ring, 1, timeout)
        if r > 0 and not uring_ready(&e.ring):
            # The wait submitted entries, so the kernel said how many and not why it ended:
            # a timeout or a signal.  Take it for a signal (the caller looks, and turns again).
            return -1
    if r == -EINTR:
        return -1
    if r < 0:
        return ring_failed(e, "io_uring_enter() failed", r, timeout)
    if uring_overflowed(&e.ring):
        # more completions than the queue holds: the kernel keeps the rest and hands them over
        # at the next waits; a multishot poll it could not post for ends, and ring_next arms
        # it again
        e.n.ring_overflows += 1
    return 0


cdef int ring_failed(Eng *e, const char *what, int err, int timeout) noexcept nogil:
    # (not expected: a ring the kernel made and then refuses.)  Said once, and the turn waits
    # out its timeout rather than spinning.
    if not e.ring_failed:
        e.ring_failed = 1
        eng_log(e, LOG_ERROR, "io_uring: %s: %s", what, strerror(-err))
    if timeout > 0:
        usleep(<unsigned int>timeout * 1000)
    return 0


cdef Io *ring_next(Eng *e, unsigned int *ev) noexcept nogil:
    # The next completion's Io and its events; NULL when the queue is empty.  A completion of
    # a removed poll (an old generation, -ECANCELED, -ENOENT) is dropped here; a poll the
    # kernel ended (no IORING_CQE_F_MORE: a oneshot, or a multishot it had to stop) is armed
    # again while its Io is watched.
    cdef unsigned long long data
    cdef int res, s
    cdef unsigned int flags
    cdef Io *io
    while uring_peek(&e.ring, &data, &res, &flags):
        uring_seen(&e.ring)
        if data & REMOVAL:
            if res == -EALREADY:
                # the poll was firing as the removal came, and a multishot poll goes on after
                # that: remove it again (until it is gone it holds its socket open)
                ring_remove(e, data & ~REMOVAL)
            continue
        s = <int>(data & 0x7fffffffu)
        io = e.slots[s] if 0 < s < e.nslots else NULL
        if io == NULL or e.slot_gen[s] != <unsigned int>(data >> 32):
            # a poll of an Io since unwatched.  Still armed (IORING_CQE_F_MORE): its removal
            # missed it, or it was armed after its fd was closed and the number given to a new
            # socket (a registration and a close in one turn): remove it now.
            if flags & CQE_F_MORE:
                ring_remove(e, data)
            continue
        if not (flags & CQE_F_MORE) and (res >= 0 or res == -ECANCELED):
            # A oneshot stands for a level-triggered watch: armed again once its reader has
            # read.  A listener's after its accept (turn_event); the control plane's once its
            # loop has had its pass (the next engine_wait): armed now, a full queue could send
            # it to the kernel while the fd is still readable, and it would come again.
            if io.kind == IO_CONTROL and res >= 0:
                e.control_due = 1
            elif io.kind != IO_LISTENER:
                ring_arm(e, io)
        if res < 0:
            if res == -ECANCELED:
                if io.kind == IO_LISTENER and io.registered:
                    ring_arm(e, io)  # (cancelled by the kernel, not by a removal: watch again)
                continue
            res = EPOLLERR       # (the poll could not be armed: let the next read or write say)
        ev[0] = <unsigned int>res
        return io
    return NULL


cdef void ring_close(Eng *e) noexcept nogil:
    # (the ring's fd closed: every poll goes, and the files they held)
    uring_close(&e.ring)
    free(e.slots)
    free(e.slot_gen)
    free(e.slot_next)
    e.slots = NULL
    e.slot_gen = NULL
    e.slot_next = NULL
    e.nslots = 0
    e.free_slot = 0
