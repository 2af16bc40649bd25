/* wscommon.h - small shared helpers for the fastws bench C programs:
 * SHA-1 and base64 (for Sec-WebSocket-Accept), monotonic clock, fd limits, pacing.
 * No external libraries. */
#ifndef WSCOMMON_H
#define WSCOMMON_H

#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <time.h>
#include <sys/resource.h>

#define WS_GUID "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Pacing (wsload --rate, wsbackend /firehose?rate=): a token bucket per connection, filled
 * at bytes_per_s and holding at most PACE_CREDIT_S of it, so that a sender held up does not
 * catch up in a burst that would put the proxy behind.  The connection may send while the
 * bucket is not empty (one send may take it below zero: the next waits longer); each send
 * takes its bytes out of *tokens. */
#define PACE_CREDIT_S 0.002

typedef struct { double tokens; uint64_t tlast; } pace_t;

static inline void pace_start(pace_t *p, uint64_t t) { p->tokens = 0; p->tlast = t; }

static inline int pace_allows(pace_t *p, double bytes_per_s, uint64_t t) {
    p->tokens += bytes_per_s * (double)(t - p->tlast) / 1e9;
    p->tlast = t;
    if (p->tokens > bytes_per_s * PACE_CREDIT_S) p->tokens = bytes_per_s * PACE_CREDIT_S;
    return p->tokens > 0;
}

static void raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
}

/* ---- SHA-1 (FIPS 180-1), compact ---- */
typedef struct { uint32_t h[5]; uint64_t len; uint8_t buf[64]; size_t n; } sha1_ctx;

#define ROL32(x, c) (((x) << (c)) | ((x) >> (32 - (c))))

static void sha1_block(sha1_ctx *c, const uint8_t *p) {
    uint32_t w[80], a, b, d, e, f, k, t, cc;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4*i] << 24 | (uint32_t)p[4*i+1] << 16 | (uint32_t)p[4*i+2] << 8 | p[4*i+3];
    for (int i = 16; i < 80; i++) w[i] = ROL32(w[i-3] ^ w[i-8] ^ w[i-14] ^ w[i-16], 1);
    a = c->h[0]; b = c->h[1]; cc = c->h[2]; d = c->h[3]; e = c->h[4];
    for (int i = 0; i < 80; i++) {
        if (i < 20)      { f = (b & cc) | (~b & d);           k = 0x5A827999; }
        else if (i < 40) { f = b ^ cc ^ d;                    k = 0x6ED9EBA1; }
        else if (i < 60) { f = (b & cc) | (b & d) | (cc & d); k = 0x8F1BBCDC; }
        else             { f = b ^ cc ^ d;                    k = 0xCA62C1D6; }
        t = ROL32(a, 5) + f + e + k + w[i];
        e = d; d = cc; cc = ROL32(b, 30); b = a; a = t;
    }
    c->h[0] += a; c->h[1] += b; c->h[2] += cc; c->h[3] += d; c->h[4] += e;
}

static void sha1_init(sha1_ctx *c) {
    c->h[0] = 0x67452301; c->h[1] = 0xEFCDAB89; c->h[2] = 0x98BADCFE;
    c->h[3] = 0x10325476; c->h[4] = 0xC3D2E1F0; c->len = 0; c->n = 0;
}

static void sha1_update(sha1_ctx *c, const void *data, size_t len) {
    const uint8_t *p = data;
    c->len += len;
    while (len) {
        size_t take = 64 - c->n;
        if (take > len) take = len;
        memcpy(c->buf + c->n, p, take);
        c->n += take; p += take; len -= take;
        if (c->n == 64) { sha1_block(c, c->buf); c->n = 0; }
    }
}

static void sha1_final(sha1_ctx *c, uint8_t out[20]) {
    uint64_t bits = c->len * 8;
    uint8_t pad = 0x80, z = 0, lb[8];
    sha1_update(c, &pad, 1);
    while (c->n != 56) sha1_update(c, &z, 1);
    for (int i = 0; i < 8; i++) lb[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha1_update(c, lb, 8);
    for (int i = 0; i < 5; i++) {
        out[4*i] = c->h[i] >> 24; out[4*i+1] = c->h[i] >> 16;
        out[4*i+2] = c->h[i] >> 8; out[4*i+3] = c->h[i];
    }
}

static size_t base64_encode(const uint8_t *in, size_t n, char *out) {
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16;
        if (i + 1 < n) v |= (uint32_t)in[i+1] << 8;
        if (i + 2 < n) v |= in[i+2];
        out[o++] = tbl[(v >> 18) & 63];
        out[o++] = tbl[(v >> 12) & 63];
        out[o++] = i + 1 < n ? tbl[(v >> 6) & 63] : '=';
        out[o++] = i + 2 < n ? tbl[v & 63] : '=';
    }
    out[o] = 0;
    return o;
}

/* Sec-WebSocket-Accept for a client key (NUL-terminated, trimmed). out >= 29 bytes. */
static void ws_accept_key(const char *key, size_t keylen, char *out) {
    sha1_ctx c; uint8_t d[20];
    sha1_init(&c);
    sha1_update(&c, key, keylen);
    sha1_update(&c, WS_GUID, sizeof(WS_GUID) - 1);
    sha1_final(&c, d);
    base64_encode(d, 20, out);
}

/* Case-insensitive search for header `name` (without colon) in an HTTP head.
 * Returns pointer to the trimmed value and its length via *vlen, or NULL. */
static const char *http_header(const char *head, size_t hlen, const char *name, size_t *vlen) {
    size_t nl = strlen(name);
    const char *p = head, *end = head + hlen;
    /* skip request/status line */
    while (p < end && *p != '\n') p++;
    while (p < end) {
        p++;
        const char *line = p;
        while (p < end && *p != '\n') p++;
        size_t ll = (size_t)(p - line);
        if (ll > nl && line[nl] == ':' && strncasecmp(line, name, nl) == 0) {
            const char *v = line + nl + 1, *ve = line + ll;
            while (v < ve && (*v == ' ' || *v == '\t')) v++;
            while (ve > v && (ve[-1] == '\r' || ve[-1] == ' ' || ve[-1] == '\t')) ve--;
            *vlen = (size_t)(ve - v);
            return v;
        }
    }
    return NULL;
}

/* Does a comma-separated header value contain token (case-insensitive)? */
static int header_has_token(const char *v, size_t vl, const char *tok) {
    size_t tl = strlen(tok);
    const char *p = v, *e = v + vl;
    while (p < e) {
        while (p < e && (*p == ' ' || *p == ',' || *p == '\t')) p++;
        const char *s = p;
        while (p < e && *p != ',') p++;
        const char *t = p;
        while (t > s && (t[-1] == ' ' || t[-1] == '\t')) t--;
        if ((size_t)(t - s) == tl && strncasecmp(s, tok, tl) == 0) return 1;
    }
    return 0;
}

#endif
