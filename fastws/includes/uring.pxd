# Extern declarations only: the engine's io_uring, from includes/uring.h.

cdef extern from "uring.h" nogil:
    ctypedef struct fastws_uring:
        int fd
        unsigned features
        unsigned sq_queued
    int uring_init "fastws_uring_init"(fastws_uring *r, unsigned entries, unsigned cq_entries,
                                       char *why, size_t whylen)
    void uring_close "fastws_uring_close"(fastws_uring *r)
    int uring_eventfd "fastws_uring_eventfd"(fastws_uring *r, int efd)
    int uring_start "fastws_uring_start"(fastws_uring *r)
    int uring_enter "fastws_uring_enter"(fastws_uring *r, int wait, int timeout_ms)
    int uring_poll_add "fastws_uring_poll_add"(fastws_uring *r, int fd, unsigned mask,
                                               unsigned long long data, int multishot)
    int uring_poll_remove "fastws_uring_poll_remove"(fastws_uring *r, unsigned long long target,
                                                     unsigned long long data)
    int uring_peek "fastws_uring_peek"(fastws_uring *r, unsigned long long *data, int *res,
                                       unsigned *flags)
    void uring_seen "fastws_uring_seen"(fastws_uring *r)
    int uring_ready "fastws_uring_ready"(fastws_uring *r)
    int uring_overflowed "fastws_uring_overflowed"(fastws_uring *r)
    unsigned CQE_F_MORE "FASTWS_CQE_F_MORE"
    unsigned long long REMOVAL "FASTWS_URING_REMOVAL"
    enum:
        ECANCELED            # (errno.h: a removed poll's completion)
        ENOENT

cdef extern from "<unistd.h>" nogil:
    int usleep(unsigned int usec)
