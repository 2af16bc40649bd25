# Extern declarations only: limit zones in shared memory, from includes/zone.h.

from libc.stdint cimport int32_t, int64_t, uint64_t

cdef extern from "zone.h" nogil:
    ctypedef struct fastws_zone:
        int32_t lock
        int32_t nbuckets
        int64_t rate
        uint64_t passed
        uint64_t delayed
        uint64_t rejected
        uint64_t full
        int64_t used
    size_t fastws_zone_size(int32_t nbuckets)
    void fastws_zone_init(fastws_zone *z, int32_t nbuckets, int64_t rate)
    int fastws_zone_force_unlock(fastws_zone *z, int32_t pid)
    uint64_t fastws_zone_hash(const char *key, int n)
    int fastws_conn_acquire(fastws_zone *z, uint64_t hash, int64_t max, int32_t pid, int force)
    void fastws_conn_release(fastws_zone *z, uint64_t hash, int32_t pid)
    int64_t fastws_req_account(fastws_zone *z, uint64_t hash, int64_t burst, int64_t now,
                               int32_t pid)
