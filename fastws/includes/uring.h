/* io_uring by its system calls (no liburing, so that the build needs nothing Debian does not
 * ship with gcc: <linux/io_uring.h> comes with the C library's headers).  One ring per
 * engine: readiness comes as multishot polls' completions, every registration and removal
 * is an entry submitted with the next wait, and the wait itself is one io_uring_enter.
 *
 * The layout and memory ordering follow the kernel's io_uring(7) and liburing's queue.c: the
 * application writes the SQ tail and the CQ head (release), reads the SQ head and the CQ
 * tail (acquire). */
#ifndef FASTWS_URING_H
#define FASTWS_URING_H
#include "compat.h"
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <linux/io_uring.h>

#ifndef __NR_io_uring_setup
#define __NR_io_uring_setup 425
#define __NR_io_uring_enter 426
#define __NR_io_uring_register 427
#endif

typedef struct {
    int fd;                          /* -1: no ring */
    unsigned features;
    /* submission queue */
    unsigned *sq_head, *sq_tail, *sq_array;
    unsigned *sq_flags;              /* IORING_SQ_CQ_OVERFLOW: completions wait in the kernel */
    unsigned sq_mask, sq_entries;
    unsigned sq_queued;              /* entries written since the last submission */
    unsigned sq_local;               /* the tail as written here, published at submission */
    struct io_uring_sqe *sqes;
    /* completion queue */
    unsigned *cq_head, *cq_tail;
    unsigned cq_mask;
    struct io_uring_cqe *cqes;
    /* the mappings, for fastws_uring_close */
    void *ring; size_t ring_sz;
    void *sqe_map; size_t sqe_sz;
} fastws_uring;

static inline int fastws_uring_setup_call(unsigned entries, struct io_uring_params *p)
{
    return (int)syscall(__NR_io_uring_setup, entries, p);
}

static inline int fastws_uring_enter_call(int fd, unsigned submit, unsigned wait, unsigned flags,
                                          void *arg, size_t argsz)
{
    return (int)syscall(__NR_io_uring_enter, fd, submit, wait, flags, arg, argsz);
}

static inline void fastws_uring_close(fastws_uring *r)
{
    if (r->ring != NULL && r->ring != MAP_FAILED)
        munmap(r->ring, r->ring_sz);
    if (r->sqe_map != NULL && r->sqe_map != MAP_FAILED)
        munmap(r->sqe_map, r->sqe_sz);
    if (r->fd >= 0)
        close(r->fd);
    memset(r, 0, sizeof(*r));
    r->fd = -1;
}

/* Make the ring.  0, or -errno with `why` saying what was refused (for `fastws -t` and the
 * start-up log).  The features the engine relies on: completions posted when it asks
 * (IORING_SETUP_DEFER_TASKRUN, 6.1), a single mapping of both rings (IORING_FEAT_SINGLE_MMAP),
 * no dropped completions (IORING_FEAT_NODROP), a wait with a timeout (IORING_FEAT_EXT_ARG)
 * and multishot polls (5.13, announced by IORING_FEAT_RSRC_TAGS, of the same release). */
static inline int fastws_uring_init(fastws_uring *r, unsigned entries, unsigned cq_entries,
                                    char *why, size_t whylen)
{
    struct io_uring_params p;
    int fd, err;
    memset(r, 0, sizeof(*r));
    r->fd = -1;
    memset(&p, 0, sizeof(p));
    /* Completions are posted when the engine asks for them (DEFER_TASKRUN, 6.1), not by
     * interrupting it: a socket's wake-up then costs what an epoll wake-up costs.  That needs
     * one submitting thread (SINGLE_ISSUER): the ring starts disabled (R_DISABLED) and the
     * thread that first runs the engine enables it (fastws_uring_start), which need not be
     * the one that made it. */
    p.flags = IORING_SETUP_CQSIZE | IORING_SETUP_CLAMP | IORING_SETUP_SINGLE_ISSUER
              | IORING_SETUP_DEFER_TASKRUN | IORING_SETUP_R_DISABLED;
    p.cq_entries = cq_entries;
    fd = fastws_uring_setup_call(entries, &p);
    if (fd < 0) {
        err = errno;
        snprintf(why, whylen, "io_uring_setup() failed: %s%s", strerror(err),
                 err == ENOSYS ? " (no io_uring in this kernel, or a seccomp profile blocks it)"
                 : err == EPERM ? " (kernel.io_uring_disabled, or a seccomp profile)"
                 : err == EINVAL ? " (the engine's ring needs Linux 6.1)" : "");
        return -err;
    }
    r->fd = fd;
    r->features = p.features;
    if (!(p.features & IORING_FEAT_SINGLE_MMAP) || !(p.features & IORING_FEAT_NODROP)
            || !(p.features & IORING_FEAT_EXT_ARG) || !(p.features & IORING_FEAT_RSRC_TAGS)) {
        snprintf(why, whylen, "io_uring lacks features the engine uses (multishot polls and "
                 "waits with a timeout need Linux 5.13)");
        fastws_uring_close(r);
        return -EOPNOTSUPP;
    }
    r->ring_sz = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    if (p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe) > r->ring_sz)
        r->ring_sz = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    r->ring = mmap(NULL, r->ring_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                   IORING_OFF_SQ_RING);
    r->sqe_sz = p.sq_entries * sizeof(struct io_uring_sqe);
    r->sqe_map = mmap(NULL, r->sqe_sz, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd,
                      IORING_OFF_SQES);
    if (r->ring == MAP_FAILED || r->sqe_map == MAP_FAILED) {
        err = errno;
        snprintf(why, whylen, "mmap() of the io_uring failed: %s", strerror(err));
        fastws_uring_close(r);
        return -err;
    }
    r->sq_head = (unsigned *)((char *)r->ring + p.sq_off.head);
    r->sq_tail = (unsigned *)((char *)r->ring + p.sq_off.tail);
    r->sq_mask = *(unsigned *)((char *)r->ring + p.sq_off.ring_mask);
    r->sq_entries = p.sq_entries;
    r->sq_array = (unsigned *)((char *)r->ring + p.sq_off.array);
    r->sq_flags = (unsigned *)((char *)r->ring + p.sq_off.flags);
    r->sqes = (struct io_uring_sqe *)r->sqe_map;
    r->cq_head = (unsigned *)((char *)r->ring + p.cq_off.head);
    r->cq_tail = (unsigned *)((char *)r->ring + p.cq_off.tail);
    r->cq_mask = *(unsigned *)((char *)r->ring + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)((char *)r->ring + p.cq_off.cqes);
    /* the SQ array maps slot i to entry i, once and for all */
    for (unsigned i = 0; i < r->sq_entries; i++)
        r->sq_array[i] = i;
    r->sq_local = *r->sq_tail;
    return 0;
}

/* The calling thread becomes the ring's one submitter (see fastws_uring_init). */
static inline int fastws_uring_start(fastws_uring *r)
{
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_ENABLE_RINGS, NULL, 0) < 0)
        return -errno;
    return 0;
}

/* Whether completions wait in the kernel's overflow list: the completion queue was full when
 * they came (kept, not dropped: IORING_FEAT_NODROP; the next io_uring_enter that asks for
 * completions moves them in as room is made). */
static inline int fastws_uring_overflowed(fastws_uring *r)
{
    return (__atomic_load_n(r->sq_flags, __ATOMIC_RELAXED) & IORING_SQ_CQ_OVERFLOW) != 0;
}

/* Have the kernel signal `efd` (an eventfd) when a completion is on its way, for a program
 * that waits on the ring from another event loop. */
static inline int fastws_uring_eventfd(fastws_uring *r, int efd)
{
    if (syscall(__NR_io_uring_register, r->fd, IORING_REGISTER_EVENTFD, &efd, 1) < 0)
        return -errno;
    return 0;
}

/* Hand the queued entries to the kernel; with `wait` 1, sleep until a completion comes or
 * `timeout_ms` passes (< 0: no limit); with `wait` 0, collect the completions that are ready
 * without sleeping (a ring made with IORING_SETUP_DEFER_TASKRUN posts them only when asked);
 * with `wait` -1, only submit.  Returns the entries submitted, or -errno (-EINTR: a signal
 * cut the wait short, told only when nothing was submitted: the kernel then returns the
 * count). */
static inline int fastws_uring_enter(fastws_uring *r, int wait, int timeout_ms)
{
    struct io_uring_getevents_arg arg;
    struct __kernel_timespec ts;
    unsigned submit = r->sq_queued;
    unsigned flags = 0;
    int n;
    /* the entries are written whole: the kernel may read them from here on */
    __atomic_store_n(r->sq_tail, r->sq_local, __ATOMIC_RELEASE);
    if (wait >= 0) {
        flags = IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG;
        memset(&arg, 0, sizeof(arg));
        if (wait && timeout_ms >= 0) {
            ts.tv_sec = timeout_ms / 1000;
            ts.tv_nsec = (long long)(timeout_ms % 1000) * 1000000;
            arg.ts = (unsigned long long)(unsigned long)&ts;
        }
    } else if (!submit) {
        return 0;
    }

    n = fastws_uring_enter_call(r->fd, submit, wait > 0 ? 1 : 0, flags, wait >= 0 ? &arg : NULL,
                                wait >= 0 ? sizeof(arg) : 0);
    if (n < 0) {
        if (errno == ETIME || errno == EBUSY)
            n = 0;  /* (EBUSY: completions to reap first; what was taken is taken) */
        else
            return -errno;
    }
    r->sq_queued = submit > (unsigned)n ? submit - (unsigned)n : 0;
    return n;
}

/* A free submission entry, zeroed, or NULL when the queue is full even after submitting. */
static inline struct io_uring_sqe *fastws_uring_sqe(fastws_uring *r)
{
    unsigned tail = r->sq_local;
    struct io_uring_sqe *sqe;
    if (r->sqes == NULL)
        return NULL;                 /* (the ring is closed) */
    if (tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) >= r->sq_entries) {
        if (fastws_uring_enter(r, -1, 0) < 0)
            return NULL;
        if (tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE) >= r->sq_entries)
            return NULL;
    }
    sqe = &r->sqes[tail & r->sq_mask];
    memset(sqe, 0, sizeof(*sqe));
    r->sq_local = tail + 1;          /* published by fastws_uring_enter */
    r->sq_queued++;
    return sqe;
}

/* Watch `fd` for `mask` (epoll's bits): every change comes as a completion carrying
 * `data` (multishot, edge-triggered like EPOLLET), or one completion only (oneshot). */
static inline int fastws_uring_poll_add(fastws_uring *r, int fd, unsigned mask,
                                        unsigned long long data, int multishot)
{
    struct io_uring_sqe *sqe = fastws_uring_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    sqe->opcode = IORING_OP_POLL_ADD;
    sqe->fd = fd;
    sqe->poll32_events = mask;
    sqe->len = multishot ? IORING_POLL_ADD_MULTI : 0;
    sqe->user_data = data;
    return 0;
}

/* Stop the poll that carries `target`; the removal's own completion carries `data`. */
static inline int fastws_uring_poll_remove(fastws_uring *r, unsigned long long target,
                                           unsigned long long data)
{
    struct io_uring_sqe *sqe = fastws_uring_sqe(r);
    if (sqe == NULL)
        return -EBUSY;
    sqe->opcode = IORING_OP_POLL_REMOVE;
    sqe->fd = -1;
    sqe->addr = target;
    sqe->user_data = data;
    return 0;
}

/* The next completion: 1 with its fields, or 0 when there is none.  Take it with
 * fastws_uring_seen once handled. */
static inline int fastws_uring_peek(fastws_uring *r, unsigned long long *data, int *res,
                                    unsigned *flags)
{
    unsigned head = *r->cq_head;
    struct io_uring_cqe *cqe;
    if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE))
        return 0;
    cqe = &r->cqes[head & r->cq_mask];
    *data = cqe->user_data;
    *res = cqe->res;
    *flags = cqe->flags;
    return 1;
}

static inline void fastws_uring_seen(fastws_uring *r)
{
    __atomic_store_n(r->cq_head, *r->cq_head + 1, __ATOMIC_RELEASE);
}

static inline int fastws_uring_ready(fastws_uring *r)
{
    return *r->cq_head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
}

#define FASTWS_CQE_F_MORE IORING_CQE_F_MORE
/* in a user_data: the completion of a poll's removal (the slot's half, below the generation) */
#define FASTWS_URING_REMOVAL 0x80000000ULL
#endif
