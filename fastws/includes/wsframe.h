/* WebSocket frame boundaries, tracked over a byte stream that is relayed as it is (RFC 6455
 * section 5.2): the 2 to 14 byte header, the 16- and 64-bit lengths, the mask, continuation
 * frames, control frames between the fragments of a message.  The tracker reads headers
 * where they pass and skips payloads, so that it costs nothing per payload byte; a header
 * split across reads is kept (at most 14 bytes) until it is whole.  RSV bits are extensions'
 * (permessage-deflate's RSV1) and are left alone.
 *
 * It counts whole data messages, remembers the status code of a close frame (unmasking its
 * two bytes with the frame's key), and reports a protocol error (1002: a client frame without
 * a mask, an upstream frame with one, an unknown opcode, a fragmented or oversized control
 * frame, a continuation with no message or a new message inside one, a 64-bit length with its
 * top bit set) or a message over the limit (1009). */
#ifndef FASTWS_WSFRAME_H
#define FASTWS_WSFRAME_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t left;          /* payload bytes of the current frame still to pass */
    uint64_t msg_bytes;     /* payload bytes of the data message in progress */
    uint64_t messages;      /* whole data messages */
    uint64_t frames;        /* whole frames */
    uint8_t hdr[14];        /* a header split across reads */
    uint8_t hlen;
    uint8_t in_msg;         /* a fragmented data message is in progress */
    uint8_t opcode;         /* the current frame's */
    uint8_t fin;
    uint8_t key[4];         /* the current frame's mask key, when masked */
    uint8_t masked;
    uint8_t close_got;      /* bytes of the close frame's code seen, 0 to 2 */
    uint16_t close_code;    /* the code of the last close frame (1005: none given) */
    uint64_t close_off;     /* payload offset of the current frame (for the close code) */
} fastws_wsframe;

enum { FASTWS_WS_PROTOCOL = 1002, FASTWS_WS_TOO_BIG = 1009 };

/* the length of a header from its first bytes: 0 if more are needed */
static inline int fastws_ws_hlen(const uint8_t *h, int have)
{
    int n;
    if (have < 2)
        return 0;
    n = 2 + ((h[1] & 0x7f) == 126 ? 2 : (h[1] & 0x7f) == 127 ? 8 : 0) + ((h[1] & 0x80) ? 4 : 0);
    return have >= n ? n : 0;
}

/* a whole header: check it and start its frame.  0, or 1002 / 1009 */
static inline int fastws_ws_header(fastws_wsframe *f, const uint8_t *h, int from_client,
                                   uint64_t max_message)
{
    uint8_t op = h[0] & 0x0f, fin = h[0] >> 7, masked = h[1] >> 7;
    uint64_t len = h[1] & 0x7f;
    const uint8_t *p = h + 2;
    int i;
    if (masked != (from_client ? 1 : 0))
        return FASTWS_WS_PROTOCOL;             /* RFC 6455 5.1: clients mask, servers do not */
    if (len == 126) {
        len = (uint64_t)p[0] << 8 | p[1];
        p += 2;
    } else if (len == 127) {
        if (p[0] & 0x80)
            return FASTWS_WS_PROTOCOL;
        len = 0;
        for (i = 0; i < 8; i++)
            len = len << 8 | p[i];
        p += 8;
    }
    if (op >= 8) {
        if (op > 10 || !fin || len > 125)
            return FASTWS_WS_PROTOCOL;         /* control frames: whole and small (5.5) */
    } else if (op == 0) {
        if (!f->in_msg)
            return FASTWS_WS_PROTOCOL;
    } else if (op == 1 || op == 2) {
        if (f->in_msg)
            return FASTWS_WS_PROTOCOL;
        f->msg_bytes = 0;
    } else {
        return FASTWS_WS_PROTOCOL;             /* opcodes 3-7 are reserved */
    }
    if (op < 8) {
        f->msg_bytes += len;
        if (max_message && f->msg_bytes > max_message)
            return FASTWS_WS_TOO_BIG;
        f->in_msg = !fin;
    }
    f->opcode = op;
    f->fin = fin;
    f->masked = masked;
    if (masked)
        memcpy(f->key, p, 4);
    f->left = len;
    f->close_off = 0;
    if (op == 8) {
        f->close_got = 0;
        f->close_code = 1005;                  /* no status code (7.1.5) unless it has one */
    }
    return 0;
}

/* the end of the current frame */
static inline void fastws_ws_frame_end(fastws_wsframe *f)
{
    f->frames++;
    if (f->opcode < 8 && f->fin)
        f->messages++;
}

/* n bytes of the stream: 0, or 1002 / 1009 (the stream is then not to be trusted further) */
static inline int fastws_ws_feed(fastws_wsframe *f, const uint8_t *p, size_t n, int from_client,
                                 uint64_t max_message)
{
    size_t pos = 0, take;
    int need, r;
    while (pos < n) {
        if (f->left > 0) {
            take = n - pos < f->left ? n - pos : (size_t)f->left;
            if (f->opcode == 8) {
                /* the close code: the payload's first two bytes, unmasked */
                while (take > 0 && f->close_got < 2) {
                    uint8_t b = p[pos] ^ (f->masked ? f->key[f->close_off & 3] : 0);
                    f->close_code = f->close_got == 0 ? (uint16_t)(b << 8)
                                                      : (uint16_t)(f->close_code | b);
                    f->close_got++;
                    f->close_off++;
                    pos++;
                    take--;
                    f->left--;
                }
            }
            pos += take;
            f->left -= take;
            f->close_off += take;
            if (f->left == 0)
                fastws_ws_frame_end(f);
            continue;
        }
        /* a header: whole in the bytes at hand, or gathered across reads */
        if (f->hlen == 0) {
            need = fastws_ws_hlen(p + pos, (int)(n - pos > 14 ? 14 : n - pos));
            if (need > 0) {
                r = fastws_ws_header(f, p + pos, from_client, max_message);
                if (r)
                    return r;
                pos += (size_t)need;
                if (f->left == 0)
                    fastws_ws_frame_end(f);
                continue;
            }
        }
        while (pos < n) {
            f->hdr[f->hlen++] = p[pos++];
            need = fastws_ws_hlen(f->hdr, f->hlen);
            if (need > 0)
                break;
        }
        need = fastws_ws_hlen(f->hdr, f->hlen);
        if (need == 0)
            return 0;                          /* the rest of the header comes later */
        f->hlen = 0;
        r = fastws_ws_header(f, f->hdr, from_client, max_message);
        if (r)
            return r;
        if (f->left == 0)
            fastws_ws_frame_end(f);
    }
    return 0;
}

#endif
