/* RFC 6455 pieces the engine needs: Sec-WebSocket-Accept (SHA-1 and base64, section 4.2.2) and
 * the check of a Sec-WebSocket-Key.  Small and self-contained: the build needs no library. */
#ifndef FASTWS_WEBSOCKET_H
#define FASTWS_WEBSOCKET_H
#include <stdint.h>
#include <string.h>

#define FASTWS_WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

typedef struct { uint32_t h[5]; uint64_t len; uint8_t buf[64]; size_t n; } fastws_sha1;

#define FASTWS_ROL32(x, c) (((x) << (c)) | ((x) >> (32 - (c))))

/* One 64-byte block.  The four groups of 20 rounds each have their own loop (no test of the
 * round number inside), and the schedule is a 16-word ring, as in most SHA-1 code written for
 * speed: a handshake hashes two blocks, and this is most of its user-space cost. */
#define FASTWS_SHA1_ROUND(f, k) do { \
        if (i >= 16) \
            w[i & 15] = FASTWS_ROL32(w[(i + 13) & 15] ^ w[(i + 8) & 15] ^ w[(i + 2) & 15] ^ \
                                     w[i & 15], 1); \
        t = FASTWS_ROL32(a, 5) + (f) + e + (k) + w[i & 15]; \
        e = d; d = cc; cc = FASTWS_ROL32(b, 30); b = a; a = t; \
    } while (0)

static void fastws_sha1_block(fastws_sha1 *c, const uint8_t *p)
{
    uint32_t w[16], a, b, d, e, t, cc;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    a = c->h[0]; b = c->h[1]; cc = c->h[2]; d = c->h[3]; e = c->h[4];
    for (i = 0; i < 20; i++)
        FASTWS_SHA1_ROUND(d ^ (b & (cc ^ d)), 0x5A827999);
    for (; i < 40; i++)
        FASTWS_SHA1_ROUND(b ^ cc ^ d, 0x6ED9EBA1);
    for (; i < 60; i++)
        FASTWS_SHA1_ROUND((b & cc) | (d & (b | cc)), 0x8F1BBCDC);
    for (; i < 80; i++)
        FASTWS_SHA1_ROUND(b ^ cc ^ d, 0xCA62C1D6);
    c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d; c->h[4] += e;
}

static void fastws_sha1_update(fastws_sha1 *c, const void *data, size_t len)
{
    const uint8_t *p = (const uint8_t *)data;
    size_t take;
    c->len += len;
    while (len) {
        take = 64 - c->n;
        if (take > len)
            take = len;
        memcpy(c->buf + c->n, p, take);
        c->n += take; p += take; len -= take;
        if (c->n == 64) {
            fastws_sha1_block(c, c->buf);
            c->n = 0;
        }
    }
}

static void fastws_sha1_final(fastws_sha1 *c, uint8_t out[20])
{
    uint64_t bits = c->len * 8;
    int i;
    /* the padding (FIPS 180-4 5.1.1) written in place: 0x80, zeros, the length in bits */
    c->buf[c->n++] = 0x80;
    if (c->n > 56) {
        memset(c->buf + c->n, 0, 64 - c->n);
        fastws_sha1_block(c, c->buf);
        c->n = 0;
    }
    memset(c->buf + c->n, 0, 56 - c->n);
    for (i = 0; i < 8; i++)
        c->buf[56 + i] = (uint8_t)(bits >> (56 - 8 * i));
    fastws_sha1_block(c, c->buf);
    for (i = 0; i < 5; i++) {
        out[4 * i] = (uint8_t)(c->h[i] >> 24); out[4 * i + 1] = (uint8_t)(c->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(c->h[i] >> 8); out[4 * i + 3] = (uint8_t)c->h[i];
    }
}

static const char fastws_b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

static int fastws_base64_encode(const uint8_t *in, int n, char *out)
{
    int i, o = 0;
    uint32_t v;
    for (i = 0; i < n; i += 3) {
        v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < n) v |= in[i + 2];
        out[o++] = fastws_b64[(v >> 18) & 63];
        out[o++] = fastws_b64[(v >> 12) & 63];
        out[o++] = i + 1 < n ? fastws_b64[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? fastws_b64[v & 63] : '=';
    }
    return o;
}

static inline int fastws_b64_value(char ch)
{
    if (ch >= 'A' && ch <= 'Z') return ch - 'A';
    if (ch >= 'a' && ch <= 'z') return ch - 'a' + 26;
    if (ch >= '0' && ch <= '9') return ch - '0' + 52;
    if (ch == '+') return 62;
    if (ch == '/') return 63;
    return -1;
}

/* Strict base64 (the alphabet, then at most two '=' at the end, a whole number of quads):
 * the number of bytes written to out, or -1. */
static int fastws_base64_decode(const char *in, int n, uint8_t *out, int cap)
{
    int i, o = 0, pad = 0, v, q[4], j;
    if (n % 4)
        return -1;
    while (pad < 2 && n - pad > 0 && in[n - pad - 1] == '=')
        pad++;
    for (i = 0; i < n; i += 4) {
        for (j = 0; j < 4; j++) {
            if (i + j >= n - pad) {
                q[j] = 0;
                continue;
            }
            v = fastws_b64_value(in[i + j]);
            if (v < 0)
                return -1;
            q[j] = v;
        }
        if (o + 3 > cap)
            return -1;
        out[o++] = (uint8_t)(q[0] << 2 | q[1] >> 4);
        out[o++] = (uint8_t)(q[1] << 4 | q[2] >> 2);
        out[o++] = (uint8_t)(q[2] << 6 | q[3]);
    }
    return o - pad;
}

/* Sec-WebSocket-Accept for a key: base64(SHA-1(key + GUID)), 28 characters into out. */
static void fastws_ws_accept(const char *key, int keylen, char *out)
{
    fastws_sha1 c;
    uint8_t d[20];
    c.h[0] = 0x67452301; c.h[1] = 0xEFCDAB89; c.h[2] = 0x98BADCFE;
    c.h[3] = 0x10325476; c.h[4] = 0xC3D2E1F0; c.len = 0; c.n = 0;
    fastws_sha1_update(&c, key, (size_t)keylen);
    fastws_sha1_update(&c, FASTWS_WS_GUID, 36);
    fastws_sha1_final(&c, d);
    fastws_base64_encode(d, 20, out);
}
#endif
