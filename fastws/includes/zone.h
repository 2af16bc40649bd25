/* Limit zones in shared memory: nginx's limit_conn_zone and limit_req_zone, counted across
 * every worker of an instance.  The master maps each zone (MAP_SHARED) before it forks; every
 * worker's engine counts in place, under the zone's lock.
 *
 * A zone is a header and a table of 8-slot buckets; a slot holds a key's 64-bit hash (0:
 * free), its open connections (limit_conn) or nginx's leaky-bucket state (limit_req: the
 * excess in 1/1000 requests and the time of its last request, in ms).  nginx keeps its nodes in
 * a red-black tree with an LRU queue; a fixed table keeps each operation to one bucket with
 * no allocation.  A bucket with no slot to spare refuses the request, as nginx does when a
 * zone cannot allocate a node ("zone is full").
 *
 * The lock holds the owner's pid, so that the master can release the lock of a worker that
 * died holding it (nginx's ngx_shmtx_force_unlock). */
#ifndef FASTWS_ZONE_H
#define FASTWS_ZONE_H
#include <sched.h>
#include <stdint.h>
#include <string.h>

#define FASTWS_ZONE_WAYS 8

typedef struct {
    uint64_t hash;
    int64_t excess;     /* limit_req: 1/1000 requests */
    int64_t last;       /* limit_req: ms */
    int64_t conns;      /* limit_conn */
} fastws_slot;

typedef struct {
    int32_t lock;       /* 0, or the pid holding it */
    int32_t nbuckets;
    int64_t rate;       /* limit_req: requests per 1000 s (nginx's rate * 1000 per s) */
    uint64_t passed;
    uint64_t delayed;
    uint64_t rejected;
    uint64_t full;      /* refused because the key's bucket had no free slot */
    int64_t used;       /* slots in use */
    int64_t pad;
} fastws_zone;

static inline size_t fastws_zone_size(int32_t nbuckets)
{
    return sizeof(fastws_zone) + (size_t)nbuckets * FASTWS_ZONE_WAYS * sizeof(fastws_slot);
}

static inline void fastws_zone_init(fastws_zone *z, int32_t nbuckets, int64_t rate)
{
    memset(z, 0, fastws_zone_size(nbuckets));
    z->nbuckets = nbuckets;
    z->rate = rate;
}

static inline void fastws_zone_lock(fastws_zone *z, int32_t pid)
{
    int spins = 0;
    int32_t free_ = 0;
    while (!__atomic_compare_exchange_n(&z->lock, &free_, pid, 0, __ATOMIC_ACQUIRE,
                                        __ATOMIC_RELAXED)) {
        free_ = 0;
        if (++spins > 64) {
            sched_yield();
            spins = 0;
        }
    }
}

static inline void fastws_zone_unlock(fastws_zone *z)
{
    __atomic_store_n(&z->lock, 0, __ATOMIC_RELEASE);
}

/* The master, for a worker that died: 1 if that worker held the lock (now released). */
static inline int fastws_zone_force_unlock(fastws_zone *z, int32_t pid)
{
    int32_t held = pid;
    return __atomic_compare_exchange_n(&z->lock, &held, 0, 0, __ATOMIC_RELEASE,
                                       __ATOMIC_RELAXED);
}

static inline uint64_t fastws_zone_hash(const char *key, int n)
{
    /* FNV-1a, then a final mix so that the bucket bits depend on every byte */
    uint64_t h = 1469598103934665603ULL;
    int i;
    for (i = 0; i < n; i++) {
        h ^= (unsigned char)key[i];
        h *= 1099511628211ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h ? h : 1;
}

static inline fastws_slot *fastws_zone_bucket(fastws_zone *z, uint64_t hash)
{
    return (fastws_slot *)(z + 1) + (hash % (uint64_t)z->nbuckets) * FASTWS_ZONE_WAYS;
}

/* limit_conn: one more connection for the key.  1: counted; 0: the key has `max` already;
 * -1: the zone is full. */
static inline int fastws_conn_acquire(fastws_zone *z, uint64_t hash, int64_t max, int32_t pid,
                                      int force)
{
    fastws_slot *b, *free_ = NULL;
    int i, r = 1;
    fastws_zone_lock(z, pid);
    b = fastws_zone_bucket(z, hash);
    for (i = 0; i < FASTWS_ZONE_WAYS; i++) {
        if (b[i].hash == hash)
            break;
        if (b[i].hash == 0 && free_ == NULL)
            free_ = &b[i];
    }
    if (i < FASTWS_ZONE_WAYS) {
        if (b[i].conns >= max && !force)
            r = 0;
        else
            b[i].conns++;
    } else if (free_ != NULL) {
        free_->hash = hash;
        free_->conns = 1;
        z->used++;
    } else {
        r = -1;
    }
    if (r == 1)
        z->passed++;
    else if (r == 0)
        z->rejected++;
    else
        z->full++;
    fastws_zone_unlock(z);
    return r;
}

static inline void fastws_conn_release(fastws_zone *z, uint64_t hash, int32_t pid)
{
    fastws_slot *b;
    int i;
    fastws_zone_lock(z, pid);
    b = fastws_zone_bucket(z, hash);
    for (i = 0; i < FASTWS_ZONE_WAYS; i++) {
        if (b[i].hash == hash) {
            if (--b[i].conns <= 0) {
                b[i].hash = 0;
                b[i].conns = 0;
                z->used--;
            }
            break;
        }
    }
    fastws_zone_unlock(z);
}

static inline int64_t fastws_req_decayed(fastws_zone *z, fastws_slot *s, int64_t now)
{
    /* nginx's ngx_http_limit_req_lookup: the excess drains at the zone's rate */
    int64_t ms = now - s->last, excess;
    if (ms < -60000)
        ms = 1;
    else if (ms < 0)
        ms = 0;
    excess = s->excess - z->rate * ms / 1000;
    return excess < 0 ? 0 : excess;
}

/* limit_req: account a request at `now` (ms).  Returns the excess after it (>= 0, in 1/1000
 * requests), -1 if it is over burst (refused), -2 if the zone is full. */
static inline int64_t fastws_req_account(fastws_zone *z, uint64_t hash, int64_t burst,
                                         int64_t now, int32_t pid)
{
    fastws_slot *b, *victim = NULL;
    int64_t excess, r;
    int i;
    fastws_zone_lock(z, pid);
    b = fastws_zone_bucket(z, hash);
    for (i = 0; i < FASTWS_ZONE_WAYS; i++)
        if (b[i].hash == hash)
            break;
    if (i < FASTWS_ZONE_WAYS) {
        excess = fastws_req_decayed(z, &b[i], now) + 1000;
        if (excess > burst) {
            z->rejected++;
            r = -1;
        } else {
            b[i].excess = excess;
            b[i].last = now;
            r = excess;
        }
    } else {
        /* a new key: a free slot, or one whose bucket has drained (as nginx expires nodes
         * whose excess is back to 0), the one idle longest */
        for (i = 0; i < FASTWS_ZONE_WAYS; i++) {
            if (b[i].hash == 0) {
                victim = &b[i];
                z->used++;
                break;
            }
            if (fastws_req_decayed(z, &b[i], now) == 0 &&
                    (victim == NULL || b[i].last < victim->last))
                victim = &b[i];
        }
        if (victim == NULL) {
            z->full++;
            r = -2;
        } else {
            victim->hash = hash;
            victim->excess = 0;
            victim->last = now;
            r = 0;
        }
    }
    if (r >= 0)
        z->passed++;
    fastws_zone_unlock(z);
    return r;
}

#endif
