/* WebSocket frame boundaries, tracked over a byte stream that is relayed as it is (RFC 6455
 * section 5.2): the 2 to 14 byte header, the 16- and 64-bit lengths, the mask, continuation
 * frames, control frames between the fragments of a message.  The tracker reads headers where
 * they pass and skips payloads, so that it costs nothing per payload byte.  RSV bits are
 * extensions' (permessage-deflate's RSV1) and are left alone.
 *
 * The relay hands it what it read and learns how far the bytes may go on: a header that a read
 * cut in two stays behind (the caller keeps it in `carry` and puts it in front of the next
 * read), so that whatever went on ends at a frame boundary or inside a payload, and the proxy
 * can always put a frame of its own (a ping, a close) between two frames.  A close frame's
 * status code and the proxy's own pongs are held back the same way until they are whole.
 *
 * It counts whole data messages, remembers the code of the first close frame, and reports a protocol
 * error (1002: a client frame without a mask, an upstream frame with one, an unknown opcode, a
 * fragmented or oversized control frame, a continuation with no message or a new message
 * inside one, a 64-bit length with its top bit set) or a message over the limit (1009). */
#ifndef FASTWS_WSFRAME_H
#define FASTWS_WSFRAME_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint32_t msg_bytes;     /* payload bytes of the data message in progress (saturating) */
    uint32_t messages;      /* whole data messages */
    uint16_t close_code;    /* the close frame's code (1005: it gave none), 0: none seen */
    uint8_t flags;          /* FASTWS_WS_* */
    uint8_t ncarry;         /* bytes in carry */
    uint8_t carry[14];      /* the start of a unit (a header, ...) that a read cut */
    uint16_t pings;         /* pings the proxy sent on this flow */
} fastws_wsframe;

enum {
    FASTWS_WS_IN_MSG = 1,       /* a fragmented data message is in progress */
    FASTWS_WS_STOP = 2,         /* stop at the next boundary: the proxy has a frame to put in */
    FASTWS_WS_PONG_DUE = 4,     /* the proxy pinged this flow's source: its pong is the proxy's */
    FASTWS_WS_CLOSE_SEEN = 8,   /* a close frame came from this flow's source */
    FASTWS_WS_CLOSE_SENT = 16,  /* the proxy's close went to this flow's destination */
    FASTWS_WS_CHECKS = 32,      /* enforce the masking and opcode rules */
    FASTWS_WS_CLOSE_FIRST = 64, /* this flow's close frame came before the other's */
    FASTWS_WS_CLOSE_NOTED = 128,/* ... and the relay has looked at which came first */
};

enum {
    FASTWS_WS_MORE = 0,         /* all of it was looked at */
    FASTWS_WS_BOUNDARY = 1,     /* stopped at a frame boundary (FASTWS_WS_STOP) */
    FASTWS_WS_DROP = 2,         /* a frame to take out of the stream: the proxy's pong */
    FASTWS_WS_PROTOCOL = 1002,
    FASTWS_WS_TOO_BIG = 1009,
};

/* what the proxy's pings carry, and so its pongs */
#define FASTWS_WS_PING_DATA "fastws:p"
#define FASTWS_WS_PING_LEN 8

/* The frame whose header starts at h (n bytes at hand): 0, with *need the bytes the caller
 * must have to decide (more than n: wait for them), or an error code.  Once n >= *need, *hlen
 * is the header's length, *len the payload's, and the message counters are updated. */
static inline int fastws_ws_header(fastws_wsframe *f, const uint8_t *h, size_t n, int from_client,
                                   uint64_t max_message, int *need, int *hlen, uint64_t *len)
{
    uint8_t op, fin, masked;
    uint64_t l;
    int i;
    if (n < 2) {
        *need = 2;
        return 0;
    }
    op = h[0] & 0x0f;
    fin = h[0] >> 7;
    masked = h[1] >> 7;
    l = h[1] & 0x7f;
    *hlen = 2 + (l == 126 ? 2 : l == 127 ? 8 : 0) + (masked ? 4 : 0);
    *need = *hlen;
    if (op == 8 && l >= 2)
        *need += 2;                             /* the status code: read where it is */
    else if (op == 10 && l == FASTWS_WS_PING_LEN && (f->flags & FASTWS_WS_PONG_DUE))
        *need += FASTWS_WS_PING_LEN;            /* maybe the proxy's pong: seen whole */
    if ((size_t)*need > n)
        return 0;
    if ((f->flags & FASTWS_WS_CHECKS) && masked != (from_client ? 1 : 0))
        return FASTWS_WS_PROTOCOL;              /* RFC 6455 5.1: clients mask, servers do not */
    if (l == 126) {
        l = (uint64_t)h[2] << 8 | h[3];
    } else if (l == 127) {
        if (h[2] & 0x80)
            return FASTWS_WS_PROTOCOL;
        l = 0;
        for (i = 0; i < 8; i++)
            l = l << 8 | h[2 + i];
    }
    if (op >= 8) {
        if (op > 10 || !fin || l > 125)
            return FASTWS_WS_PROTOCOL;          /* control frames: whole and small (5.5) */
    } else if (op == 0) {
        if (!(f->flags & FASTWS_WS_IN_MSG))
            return FASTWS_WS_PROTOCOL;
    } else if (op == 1 || op == 2) {
        if (f->flags & FASTWS_WS_IN_MSG)
            return FASTWS_WS_PROTOCOL;
        f->msg_bytes = 0;
    } else if (f->flags & FASTWS_WS_CHECKS) {
        return FASTWS_WS_PROTOCOL;              /* opcodes 3-7 are reserved */
    }
    if (op < 8) {
        f->msg_bytes = l > UINT32_MAX - f->msg_bytes ? UINT32_MAX : f->msg_bytes + (uint32_t)l;
        if (max_message && f->msg_bytes > max_message)
            return FASTWS_WS_TOO_BIG;
        if (fin) {
            f->flags &= ~FASTWS_WS_IN_MSG;
            f->messages++;
        } else {
            f->flags |= FASTWS_WS_IN_MSG;
        }
    }
    *len = l;
    return 0;
}

/* payload byte i of a frame whose payload starts at m, unmasked (the key is the 4 bytes
 * before the payload when the frame is masked) */
static inline uint8_t fastws_ws_byte(const uint8_t *h, const uint8_t *m, int i)
{
    return (h[1] & 0x80) ? (uint8_t)(m[i] ^ m[(i & 3) - 4]) : m[i];
}

/* A whole unit at h (fastws_ws_header's): notes a close frame's code; 1 if it is the proxy's
 * pong, which goes no further. */
static inline int fastws_ws_unit(fastws_wsframe *f, const uint8_t *h, int need, int hlen,
                                 uint64_t len)
{
    const uint8_t *m = h + hlen;
    int i;
    if (need == hlen + FASTWS_WS_PING_LEN) {
        for (i = 0; i < FASTWS_WS_PING_LEN; i++)
            if (fastws_ws_byte(h, m, i) != (uint8_t)FASTWS_WS_PING_DATA[i])
                break;
        if (i == FASTWS_WS_PING_LEN) {
            f->flags &= ~FASTWS_WS_PONG_DUE;
            return 1;
        }
    }
    if ((h[0] & 0x0f) == 8 && !(f->flags & FASTWS_WS_CLOSE_SEEN)) {
        f->close_code = len >= 2 ? (uint16_t)(fastws_ws_byte(h, m, 0) << 8
                                              | fastws_ws_byte(h, m, 1))
                                 : 1005;        /* 7.1.5: no status code */
        f->flags |= FASTWS_WS_CLOSE_SEEN;
    }
    return 0;
}

/* The n bytes at p, from a frame boundary or `*left` bytes into a frame, looked at from *pos
 * on.  Returns with *pos where it stopped:
 *  - FASTWS_WS_MORE: at n, or at the start of a unit the read cut (*pos < n: the caller keeps
 *    p[*pos:n] for later, and only p[:*pos] goes on);
 *  - FASTWS_WS_BOUNDARY: at a boundary, as FASTWS_WS_STOP asked;
 *  - FASTWS_WS_DROP: at the start of the proxy's pong, *drop bytes long, whole in p;
 *  - 1002 or 1009: at the start of the frame that broke the rules. */
static inline int fastws_ws_scan(fastws_wsframe *f, uint64_t *left, const uint8_t *p, size_t n,
                                 size_t *pos, int from_client, uint64_t max_message, size_t *drop)
{
    size_t at = *pos, take;
    const uint8_t *h;
    uint64_t len;
    int need, hlen, r;
    while (at < n) {
        if (*left > 0) {
            take = n - at < *left ? n - at : (size_t)*left;
            at += take;
            *left -= take;
            continue;
        }
        if (f->flags & FASTWS_WS_STOP) {
            *pos = at;
            return FASTWS_WS_BOUNDARY;
        }
        h = p + at;
        r = fastws_ws_header(f, h, n - at, from_client, max_message, &need, &hlen, &len);
        if (r) {
            *pos = at;
            return r;
        }
        if ((size_t)need > n - at)
            break;                              /* cut: kept for the next read */
        if (fastws_ws_unit(f, h, need, hlen, len)) {
            *pos = at;
            *drop = (size_t)need;
            return FASTWS_WS_DROP;
        }
        at += (size_t)hlen;
        *left = len;
    }
    *pos = at;
    return FASTWS_WS_MORE;
}

/* A frame of the proxy's own into out (at least 2 + 4 + 125 bytes): a ping or a close, masked
 * with `key` when it goes to an upstream (clients mask, 5.3); its length. */
static inline int fastws_ws_make(uint8_t *out, int opcode, const uint8_t *data, int n,
                                 const uint8_t *key)
{
    int i, at = 2;
    if (n > 125)
        n = 125;
    out[0] = (uint8_t)(0x80 | opcode);
    out[1] = (uint8_t)n | (key ? 0x80 : 0);
    if (key) {
        memcpy(out + 2, key, 4);
        at = 6;
    }
    for (i = 0; i < n; i++)
        out[at + i] = key ? (uint8_t)(data[i] ^ key[i & 3]) : data[i];
    return at + n;
}

#endif
