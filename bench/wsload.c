/* wsload.c - the fastws bench load generator. One epoll thread, no libraries.
 *
 * Modes (--mode):
 *   echo       --conns N WebSocket connections to --path (default /echo), each sending
 *              one --size byte masked binary message at a time and waiting for its echo,
 *              which is checked byte for byte. Reports messages/s and round-trip latency.
 *   send       --conns N connections to /sink streaming --size byte frames. Reports MB/s.
 *              With --rate R, R MB/s in all, R/N on each connection (a token bucket
 *              each, from the end of the set-up, holding at most 2 ms of credit): a proxy
 *              below its limit, whose CPU per MB is then its own work only.
 *   recv       --conns N connections to /firehose reading --size byte frames, checking
 *              every frame header and payload byte. Reports MB/s.
 *   handshake  --conns N concurrent loops of: TCP connect + upgrade (Sec-WebSocket-Accept
 *              checked) + one 64 B echo (checked) + close handshake + server FIN.
 *              Reports handshakes/s and cycle latency.
 *   idle       opens --conns N tunnels (upgrade + one checked echo each, --inflight at a
 *              time), prints "READY n", holds them until a line arrives on stdin or
 *              --hold seconds pass, then closes them.
 *   chat       --conns N WebSocket connections (opened --inflight at a time), each sending
 *              one --size byte message every --interval seconds (1 by default, the first
 *              at a random point of the first interval) and checking its echo: the shape
 *              of a chat or notification server, mostly idle connections. Reports
 *              messages/s and round-trip latency.
 *   http       --conns N keep-alive connections sending GET requests one at a time,
 *              checking status and body. Reports requests/s and latency.
 *   burst      --count N connections, --conns C at a time, each sending one request
 *              whose head is --size bytes (filler header lines of about 1 KiB, and
 *              Connection: close) and reading the answer until the peer closes. The
 *              answer must carry a status line and be a rejection (4xx or 5xx); the
 *              statuses are counted. A reset after the status line is counted, not an
 *              error (a proxy that closes with unread input resets). Reports heads/s
 *              and the time from connect to close.
 *
 * Timing: after every connection is set up, --warmup seconds run unmeasured, then
 * "MARK start" is printed, --duration seconds are measured, "MARK end" is printed.
 * With --count N (handshake, http), the run also ends once N cycles or requests are
 * done (no new ones start after the Nth; those in flight finish). In burst mode
 * "MARK start" comes before the first connect, "MARK end" after the last close, and
 * --duration bounds the whole burst (not finishing in time is an error).
 * With --wait-go (echo, chat, http), "MARK open" is printed once every connection is set
 * up, and the run goes on when a line arrives on stdin (bench.syscalls attaches its
 * tracer in between, so that the set-up is not counted).
 * The last line is "RESULT {json}". Everything is bounded by --duration, --timeout
 * and --hold; the program always stops by itself.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include "wscommon.h"

#define DRAIN_S 2   /* seconds the answers in flight get after the measured window */

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

enum { MODE_ECHO, MODE_SEND, MODE_RECV, MODE_HS, MODE_IDLE, MODE_HTTP, MODE_BURST, MODE_CHAT };
enum { ST_FREE, ST_CONNECTING, ST_UPGRADING, ST_OPEN, ST_WAIT_ECHO, ST_CLOSE_SENT, ST_WAIT_EOF, ST_IDLE, ST_DEAD };

typedef struct {
    int fd, id, state;
    uint8_t *rb; size_t rlen, rcap;
    uint8_t *wb; size_t wlen, woff, wcap;
    int want_out;
    uint64_t t0, deadline, seq;
    uint8_t *exp; size_t explen;   /* expected echo payload */
    char accept[32];
    /* recv-mode frame parser */
    uint8_t hdr[14]; size_t hdrlen; uint64_t remain, flen;
    size_t send_off;
    int paused;                    /* send --rate: waiting for the pace to allow more */
    pace_t pace;                   /* send --rate: the connection's bucket (wscommon.h) */
    int send_cut;                  /* burst: the peer stopped reading before the head was sent */
    size_t got;                    /* burst: answer bytes read */
    uint64_t due;                  /* chat: when the next message goes */
    int wnext;                     /* chat: the next connection in its wheel slot, -1 */
} conn_t;

/* ---- options ---- */
static int mode = MODE_ECHO, nconns = 64, inflight = 256;
static size_t msize = 64;
static double duration = 5, warmup = 1, timeout_s = 30, hold_s = 60;
static const char *host = "127.0.0.1", *path = NULL;
static int port = 8080;
static struct sockaddr_in dst;
static struct in_addr srcs[64]; static int nsrc;
static unsigned long long max_count;   /* --count: 0 = bounded by time only */
static double interval_s = 1.0;        /* chat: seconds between a connection's messages */
static int wait_go;                    /* --wait-go: "MARK open", then a line on stdin */
static double rate_mb;                 /* send: --rate MB/s in all, 0 = as fast as the peer takes */
static int npaused;
static int go_pending;

/* chat: a timing wheel of 1 ms slots for the connections' next messages */
#define WHEEL 4096
static int wheel[WHEEL];
static uint64_t wheel_ms;              /* the last slot run */

/* ---- state ---- */
static int ep;
static conn_t *C;
static uint64_t t_setup0, t_mstart, t_mend;
static int phase;   /* 0 setup, 1 warmup, 2 measure, 3 drain */
static unsigned long long reconnects, cnt_measured, cnt_total, bytes_measured, errors, connect_errors, opened;
static char err_samples[5][160]; static int nerr_samples;
static uint64_t hist[4096]; static unsigned long long hist_n; static uint64_t lat_max, lat_sum;
static uint8_t *send_frame; static size_t send_frame_len;
static uint8_t *fire_pat;
static uint64_t rng = 0x9E3779B97F4A7C15ull;
static int active;   /* connections not yet finished */
static unsigned long long started;   /* handshake cycles / http requests / burst connections started */
/* burst mode */
static char *burst_req; static size_t burst_len;
static unsigned long long statuses[600], resets, send_cuts, answer_bytes;

static void conn_ready(conn_t *c);
static uint64_t xrand(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }

static void err(conn_t *c, const char *fmt, ...) {
    errors++;
    if (nerr_samples < 5) {
        va_list ap; va_start(ap, fmt);
        int n = snprintf(err_samples[nerr_samples], 160, "conn %d: ", c ? c->id : -1);
        vsnprintf(err_samples[nerr_samples] + n, 160 - n, fmt, ap);
        va_end(ap);
        for (char *p = err_samples[nerr_samples]; *p; p++) if (*p == '"' || *p == '\\' || *p < 32) *p = '\'';
        nerr_samples++;
    }
}

static int hidx(uint64_t v) {
    if (v < 128) return (int)v;
    int msb = 63 - __builtin_clzll(v);
    int shift = msb - 6;
    int i = shift * 64 + (int)(v >> shift);
    return i < 4096 ? i : 4095;
}
static double hval(int i) {
    if (i < 128) return i;
    int shift = i / 64 - 1;
    uint64_t lo = (uint64_t)(i - shift * 64) << shift;
    return (double)lo + (double)((1ull << shift) - 1) / 2.0;
}
static void record(uint64_t lat_ns) {
    hist[hidx(lat_ns)]++; hist_n++; lat_sum += lat_ns;
    if (lat_ns > lat_max) lat_max = lat_ns;
}
static double pct(double p) {
    if (!hist_n) return 0;
    unsigned long long want = (unsigned long long)(p * hist_n);
    if (want >= hist_n) want = hist_n - 1;
    unsigned long long acc = 0;
    for (int i = 0; i < 4096; i++) { acc += hist[i]; if (acc > want) return hval(i) / 1000.0; }
    return lat_max / 1000.0;
}

static void set_ev(conn_t *c, int out) {
    if (c->want_out == out) return;
    struct epoll_event ev = { .events = EPOLLIN | (out ? EPOLLOUT : 0), .data.u32 = (uint32_t)c->id };
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}

static void conn_drop(conn_t *c, int st) {
    if (c->fd >= 0) { epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL); close(c->fd); c->fd = -1; }
    c->state = st; c->rlen = 0; c->wlen = c->woff = 0; c->want_out = 0;
}

static void wadd(conn_t *c, const void *p, size_t n) {
    if (c->woff == c->wlen) c->woff = c->wlen = 0;
    if (c->wlen + n > c->wcap) {
        size_t nc = c->wcap ? c->wcap : 1024;
        while (nc < c->wlen + n) nc *= 2;
        c->wb = realloc(c->wb, nc); c->wcap = nc;
    }
    memcpy(c->wb + c->wlen, p, n); c->wlen += n;
}

static int flush(conn_t *c) {
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wb + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) { set_ev(c, 1); return 0; }
            err(c, "send: %s", strerror(errno)); conn_drop(c, ST_DEAD); active--; return -1;
        }
        c->woff += n;
    }
    c->woff = c->wlen = 0;
    set_ev(c, 0);
    return 0;
}

/* append a masked client frame with payload p (len n) */
static void put_frame(conn_t *c, uint8_t op, const uint8_t *p, size_t n) {
    uint8_t h[14]; size_t hl;
    h[0] = 0x80 | op;
    if (n < 126) { h[1] = 0x80 | n; hl = 2; }
    else if (n < 65536) { h[1] = 0x80 | 126; h[2] = n >> 8; h[3] = n; hl = 4; }
    else { h[1] = 0x80 | 127; for (int i = 0; i < 8; i++) h[2+i] = (uint8_t)((uint64_t)n >> (56 - 8*i)); hl = 10; }
    uint32_t mk = (uint32_t)xrand();
    memcpy(h + hl, &mk, 4); hl += 4;
    wadd(c, h, hl);
    if (c->wlen + n > c->wcap) { size_t nc = c->wcap; while (nc < c->wlen + n) nc *= 2; c->wb = realloc(c->wb, nc); c->wcap = nc; }
    uint8_t *o = c->wb + c->wlen;
    uint64_t m8 = (uint64_t)mk | (uint64_t)mk << 32;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) { uint64_t v; memcpy(&v, p + i, 8); v ^= m8; memcpy(o + i, &v, 8); }
    const uint8_t *mb = h + hl - 4;
    for (; i < n; i++) o[i] = p[i] ^ mb[i & 3];
    c->wlen += n;
}

static void fill_expected(conn_t *c) {
    /* deterministic, varies per connection and per message */
    uint8_t *e = c->exp; size_t n = c->explen;
    uint64_t s = c->seq * 0x100000001B3ull + (uint64_t)c->id * 0x9E3779B97F4A7C15ull;
    if (n >= 16) {
        memcpy(e, &c->seq, 8);
        uint32_t id = c->id; memcpy(e + 8, &id, 4);
        e[12] ^= (uint8_t)s; e[13] = (uint8_t)(s >> 8);
    } else {
        for (size_t i = 0; i < n; i++) e[i] = (uint8_t)(s >> (8 * (i & 7))) ^ (uint8_t)i;
    }
}

static void send_echo(conn_t *c) {
    c->seq++;
    fill_expected(c);
    put_frame(c, 2, c->exp, c->explen);
    c->t0 = now_ns();
    c->state = ST_WAIT_ECHO;
    flush(c);
}

static void send_http(conn_t *c) {
    if (max_count && started >= max_count) {   /* --count reached: this connection is done */
        conn_drop(c, ST_FREE); active--; return;
    }
    started++;
    char req[256];
    int n = snprintf(req, sizeof req, "GET /hello HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: fastws-bench\r\n\r\n", host, port);
    wadd(c, req, n);
    c->t0 = now_ns();
    c->state = ST_WAIT_ECHO;
    flush(c);
}

static void start_connect(conn_t *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (fd < 0) { err(c, "socket: %s", strerror(errno)); c->state = ST_DEAD; active--; return; }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (nsrc) {
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in s = { .sin_family = AF_INET, .sin_addr = srcs[c->id % nsrc] };
        if (bind(fd, (void *)&s, sizeof s) < 0) { err(c, "bind: %s", strerror(errno)); close(fd); c->state = ST_DEAD; active--; return; }
    }
    c->fd = fd; c->rlen = 0; c->wlen = c->woff = 0;
    c->t0 = now_ns();
    c->deadline = c->t0 + (uint64_t)(timeout_s * 1e9);
    int r = connect(fd, (void *)&dst, sizeof dst);
    if (r < 0 && errno != EINPROGRESS) { connect_errors++; err(c, "connect: %s", strerror(errno)); conn_drop(c, ST_DEAD); active--; return; }
    c->state = ST_CONNECTING;
    c->want_out = 1;
    struct epoll_event ev = { .events = EPOLLIN | EPOLLOUT, .data.u32 = (uint32_t)c->id };
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev);
}

static void on_connected(conn_t *c) {
    int e = 0; socklen_t l = sizeof e;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &e, &l);
    if (e) { connect_errors++; err(c, "connect: %s", strerror(e)); conn_drop(c, ST_DEAD); active--; return; }
    if (mode == MODE_HTTP) { set_ev(c, 0); conn_ready(c); return; }
    uint8_t kb[16]; char key[32], req[512];
    for (int i = 0; i < 16; i++) kb[i] = (uint8_t)xrand();
    base64_encode(kb, 16, key);
    ws_accept_key(key, strlen(key), c->accept);
    int n = snprintf(req, sizeof req,
        "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        "Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\nUser-Agent: fastws-bench\r\n\r\n",
        path, host, port, key);
    c->state = ST_UPGRADING;
    wadd(c, req, n);
    flush(c);
}

/* a complete 101 head is in rb? returns -1 dead, 0 need more, 1 ok */
static int check_upgrade(conn_t *c) {
    uint8_t *e = memmem(c->rb, c->rlen, "\r\n\r\n", 4);
    if (!e) { if (c->rlen > 16384) { err(c, "upgrade response head too large"); conn_drop(c, ST_DEAD); active--; return -1; } return 0; }
    size_t hl = (size_t)(e - c->rb) + 4;
    const char *h = (const char *)c->rb;
    size_t vl;
    if (hl < 12 || memcmp(h, "HTTP/1.1 101", 12) != 0) {
        err(c, "expected 101, got: %.40s", h); conn_drop(c, ST_DEAD); active--; return -1;
    }
    const char *acc = http_header(h, hl, "Sec-WebSocket-Accept", &vl);
    if (!acc || vl != strlen(c->accept) || memcmp(acc, c->accept, vl) != 0) {
        err(c, "bad Sec-WebSocket-Accept"); conn_drop(c, ST_DEAD); active--; return -1;
    }
    memmove(c->rb, c->rb + hl, c->rlen - hl); c->rlen -= hl;
    return 1;
}

/* parse one server frame from rb: returns 1 and fills op/payload/len, 0 need more, -1 bad */
static int server_frame(conn_t *c, uint8_t *op, uint8_t **pl, uint64_t *len, size_t *tot) {
    if (c->rlen < 2) return 0;
    uint8_t *p = c->rb;
    if (p[1] & 0x80) return -1;              /* server frames are never masked */
    uint64_t n = p[1] & 0x7f; size_t hl = 2;
    if (n == 126) { if (c->rlen < 4) return 0; n = (uint64_t)p[2] << 8 | p[3]; hl = 4; }
    else if (n == 127) { if (c->rlen < 10) return 0; n = 0; for (int i = 0; i < 8; i++) n = n << 8 | p[2+i]; hl = 10; }
    if (c->rlen < hl + n) {
        if (c->rcap < hl + n) { c->rcap = hl + n; c->rb = realloc(c->rb, c->rcap); }
        return 0;
    }
    *op = p[0]; *pl = p + hl; *len = n; *tot = hl + n;
    return 1;
}

static void consume(conn_t *c, size_t n) { memmove(c->rb, c->rb + n, c->rlen - n); c->rlen -= n; }

static void count_unit(uint64_t lat, uint64_t bytes) {
    cnt_total++;
    if (phase == 2) { cnt_measured++; bytes_measured += bytes; if (lat) record(lat); }
}

static void next_cycle(conn_t *c);

static void chat_schedule(conn_t *c, uint64_t due) {
    c->due = due;
    int slot = (int)((due / 1000000ull) % WHEEL);
    c->wnext = wheel[slot];
    wheel[slot] = c->id;
}

/* send every message that is due; a connection whose echo is still awaited sends when it
 * comes back (chat_echoed) */
static void chat_run(uint64_t t) {
    uint64_t ms = t / 1000000ull;
    if (wheel_ms == 0 || ms - wheel_ms > WHEEL) wheel_ms = ms - 1;
    while (wheel_ms < ms) {
        wheel_ms++;
        int slot = (int)(wheel_ms % WHEEL), id = wheel[slot];
        wheel[slot] = -1;
        while (id >= 0) {
            conn_t *c = &C[id];
            id = c->wnext;
            if (c->fd < 0) continue;
            if (c->due / 1000000ull > wheel_ms) { chat_schedule(c, c->due); continue; }   /* a later round */
            if (c->state == ST_OPEN && phase < 3) send_echo(c);
        }
    }
}

/* feed recv-mode stream: verify every header and payload byte */
static int fire_feed(conn_t *c, const uint8_t *p, size_t n) {
    while (n) {
        if (c->remain) {
            size_t take = c->remain < n ? (size_t)c->remain : n;
            size_t off = (size_t)(c->flen - c->remain);
            if (memcmp(p, fire_pat + off, take) != 0) { err(c, "firehose payload mismatch at %zu", off); return -1; }
            c->remain -= take; p += take; n -= take;
            if (!c->remain) count_unit(0, c->flen);
            continue;
        }
        c->hdr[c->hdrlen++] = *p++; n--;
        if (c->hdrlen < 2) continue;
        size_t need = (c->hdr[1] & 0x7f) == 126 ? 4 : (c->hdr[1] & 0x7f) == 127 ? 10 : 2;
        if (c->hdrlen < need) continue;
        uint64_t L = c->hdr[1] & 0x7f;
        if (need == 4) L = (uint64_t)c->hdr[2] << 8 | c->hdr[3];
        else if (need == 10) { L = 0; for (int i = 0; i < 8; i++) L = L << 8 | c->hdr[2+i]; }
        if (c->hdr[0] != 0x82 || L != msize) { err(c, "firehose bad frame header %02x len %llu", c->hdr[0], (unsigned long long)L); return -1; }
        c->flen = c->remain = L; c->hdrlen = 0;
    }
    return 0;
}

static void on_readable(conn_t *c) {
    for (int spins = 0;; spins++) {
        if (mode == MODE_RECV && c->state == ST_OPEN) {
            if (spins >= 16) return;   /* level-triggered: come back later, keep timing fair */
            static uint8_t big[262144];
            ssize_t n = recv(c->fd, big, sizeof big, 0);
            if (n == 0) { if (phase < 3) err(c, "firehose closed by peer"); conn_drop(c, ST_DEAD); active--; return; }
            if (n < 0) { if (errno == EAGAIN) return; err(c, "recv: %s", strerror(errno)); conn_drop(c, ST_DEAD); active--; return; }
            if (fire_feed(c, big, n) < 0) { conn_drop(c, ST_DEAD); active--; return; }
            continue;
        }
        if (c->rcap - c->rlen < 2048) { size_t nc = c->rcap ? c->rcap * 2 : 8192; c->rb = realloc(c->rb, nc); c->rcap = nc; }
        ssize_t n = recv(c->fd, c->rb + c->rlen, c->rcap - c->rlen, 0);
        if (n == 0) {
            if (c->state == ST_WAIT_EOF || c->state == ST_CLOSE_SENT) {
                if (c->state == ST_CLOSE_SENT) { err(c, "EOF before close frame"); conn_drop(c, ST_DEAD); active--; return; }
                uint64_t t = now_ns();
                conn_drop(c, ST_FREE);
                count_unit(t - c->t0, 0);
                next_cycle(c);
                return;
            }
            if (phase < 3 || c->state == ST_WAIT_ECHO) err(c, "connection closed by peer (state %d)", c->state);
            conn_drop(c, ST_DEAD); active--; return;
        }
        if (n < 0) {
            if (errno == EAGAIN) return;
            err(c, "recv: %s", strerror(errno)); conn_drop(c, ST_DEAD); active--; return;
        }
        c->rlen += n;
        for (;;) {
            if (c->state == ST_UPGRADING) {
                int r = check_upgrade(c);
                if (r <= 0) return;
                conn_ready(c);
                if (c->fd < 0) return;
                continue;
            }
            if (mode == MODE_HTTP && c->state == ST_WAIT_ECHO) {
                uint8_t *e = memmem(c->rb, c->rlen, "\r\n\r\n", 4);
                if (!e) break;
                size_t hl = (size_t)(e - c->rb) + 4, vl;
                const char *cl = http_header((char *)c->rb, hl, "Content-Length", &vl);
                if (memcmp(c->rb, "HTTP/1.1 200", 12) != 0 || !cl) { err(c, "bad HTTP response: %.40s", (char *)c->rb); conn_drop(c, ST_DEAD); active--; return; }
                size_t bl = strtoul(cl, NULL, 10);
                if (c->rlen < hl + bl) break;
                static const char body[] = "hello from fastws bench\n";
                if (bl != sizeof body - 1 || memcmp(c->rb + hl, body, bl) != 0) { err(c, "bad HTTP body"); conn_drop(c, ST_DEAD); active--; return; }
                const char *cn = http_header((char *)c->rb, hl, "Connection", &vl);
                int server_closes = cn && header_has_token(cn, vl, "close");
                consume(c, hl + bl);
                count_unit(now_ns() - c->t0, 0);
                c->state = ST_OPEN;
                if (phase >= 3) { conn_drop(c, ST_FREE); active--; return; }
                if (server_closes) {   /* the peer ends keep-alive: reconnect and go on */
                    reconnects++;
                    conn_drop(c, ST_FREE);
                    start_connect(c);
                    return;
                }
                send_http(c);
                if (c->fd < 0) return;   /* --count reached */
                continue;
            }
            if (c->state == ST_WAIT_ECHO || c->state == ST_CLOSE_SENT || c->state == ST_OPEN || c->state == ST_IDLE) {
                uint8_t op, *pl; uint64_t len; size_t tot;
                int r = server_frame(c, &op, &pl, &len, &tot);
                if (r < 0) { err(c, "malformed server frame"); conn_drop(c, ST_DEAD); active--; return; }
                if (r == 0) break;
                if (c->state == ST_CLOSE_SENT) {
                    if (op != 0x88) { err(c, "expected close frame, got opcode %02x", op); conn_drop(c, ST_DEAD); active--; return; }
                    consume(c, tot);
                    c->state = ST_WAIT_EOF;
                    continue;
                }
                if (c->state != ST_WAIT_ECHO) { err(c, "unexpected frame opcode %02x in state %d", op, c->state); conn_drop(c, ST_DEAD); active--; return; }
                if (op != 0x82 || len != c->explen || memcmp(pl, c->exp, len) != 0) {
                    err(c, "echo mismatch (opcode %02x, len %llu, want %zu)", op, (unsigned long long)len, c->explen);
                    conn_drop(c, ST_DEAD); active--; return;
                }
                consume(c, tot);
                uint64_t t = now_ns();
                if (mode == MODE_ECHO) {
                    count_unit(t - c->t0, len);
                    c->state = ST_OPEN;
                    if (phase < 3) send_echo(c); else { conn_drop(c, ST_FREE); active--; return; }
                } else if (mode == MODE_CHAT) {
                    count_unit(t - c->t0, len);
                    c->state = ST_OPEN;
                    if (phase >= 3) { conn_drop(c, ST_FREE); active--; return; }
                    uint64_t next = c->due + (uint64_t)(interval_s * 1e9);
                    chat_schedule(c, next > t ? next : t);
                } else if (mode == MODE_HS) {
                    uint8_t code[2] = { 0x03, 0xe8 };
                    put_frame(c, 8, code, 2);
                    c->state = ST_CLOSE_SENT;
                    flush(c);
                    if (c->fd < 0) return;
                } else if (mode == MODE_IDLE) {
                    c->state = ST_IDLE;
                    opened++;
                    next_cycle(c);   /* lets the opener start another tunnel */
                }
                continue;
            }
            if (c->rlen) { err(c, "unexpected data in state %d", c->state); conn_drop(c, ST_DEAD); active--; return; }
            break;
        }
    }
}

/* the connection is upgraded (or, for http, connected) */
static void conn_ready(conn_t *c) {
    c->state = ST_OPEN;
    switch (mode) {
    case MODE_ECHO: opened++; if (phase >= 1) send_echo(c); break;
    case MODE_CHAT: opened++; next_cycle(c); break;
    case MODE_HS: case MODE_IDLE: send_echo(c); break;
    case MODE_SEND: opened++; set_ev(c, phase >= 1); break;
    case MODE_RECV: opened++; if (c->rlen) { if (fire_feed(c, c->rb, c->rlen) < 0) { conn_drop(c, ST_DEAD); active--; } c->rlen = 0; } break;
    case MODE_HTTP: opened++; if (phase >= 1) send_http(c); break;
    }
}

static int next_id;   /* handshake / idle: next slot to start */
static void next_cycle(conn_t *c) {
    if (mode == MODE_HS) {
        if (phase < 3 && (!max_count || started < max_count)) { started++; start_connect(c); } else active--;
    } else if (mode == MODE_IDLE || mode == MODE_CHAT) {
        if (next_id < nconns) start_connect(&C[next_id++]);
    }
}

static int send_paced(conn_t *c, uint64_t t) {
    /* send --rate: the connection's bucket fills at its share of the rate */
    return !rate_mb || pace_allows(&c->pace, rate_mb * 1e6 / nconns, t);
}

static void do_send(conn_t *c) {
    while (phase < 3) {
        if (!send_paced(c, now_ns())) {
            /* the pace is ahead: this connection waits, the main loop lets it go on */
            if (!c->paused) { c->paused = 1; npaused++; }
            set_ev(c, 0);
            return;
        }
        ssize_t n = send(c->fd, send_frame + c->send_off, send_frame_len - c->send_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) { set_ev(c, 1); return; }
            err(c, "send: %s", strerror(errno)); conn_drop(c, ST_DEAD); active--; return;
        }
        c->pace.tokens -= (double)n;
        c->send_off += n;
        if (c->send_off == send_frame_len) { c->send_off = 0; count_unit(0, msize); }
    }
}

/* ---- burst mode: one oversized head per connection, the answer read until close ---- */
static void burst_next(conn_t *c);

static void burst_finish(conn_t *c, int reset) {
    /* the peer closed (or reset): judge the answer */
    const char *r = (const char *)c->rb;
    int st = 0;
    if (c->rlen >= 12 && memcmp(r, "HTTP/1.", 7) == 0 && r[8] == ' ' &&
        r[9] >= '1' && r[9] <= '5' && r[10] >= '0' && r[10] <= '9' && r[11] >= '0' && r[11] <= '9')
        st = (r[9] - '0') * 100 + (r[10] - '0') * 10 + (r[11] - '0');
    uint64_t t = now_ns();
    if (!st) {
        if (c->rlen) err(c, "no status line in the answer: %.40s", r);
        else err(c, "%s without an answer%s", reset ? "reset" : "closed", c->send_cut ? " (head cut short)" : "");
        conn_drop(c, ST_DEAD); active--; return;
    }
    if (st < 400) {
        err(c, "the oversized head was accepted: status %d", st);
        conn_drop(c, ST_DEAD); active--; return;
    }
    statuses[st]++;
    if (reset) resets++;
    if (c->send_cut) send_cuts++;
    answer_bytes += c->got;
    conn_drop(c, ST_FREE);
    count_unit(t - c->t0, 0);
    burst_next(c);
}

static void burst_send(conn_t *c) {
    while (c->send_off < burst_len) {
        ssize_t n = send(c->fd, burst_req + c->send_off, burst_len - c->send_off, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) { set_ev(c, 1); return; }
            if (errno == EPIPE || errno == ECONNRESET) {
                /* the proxy answered and closed before reading all of it: read what it said */
                c->send_cut = 1; c->send_off = burst_len; break;
            }
            err(c, "send: %s", strerror(errno)); conn_drop(c, ST_DEAD); active--; return;
        }
        c->send_off += n;
    }
    c->state = ST_WAIT_EOF;
    set_ev(c, 0);
}

static void burst_read(conn_t *c) {
    for (;;) {
        static uint8_t scratch[65536];
        uint8_t *buf = scratch; size_t cap = sizeof scratch;
        if (c->rlen < c->rcap) { buf = c->rb + c->rlen; cap = c->rcap - c->rlen; }   /* keep the first bytes */
        ssize_t n = recv(c->fd, buf, cap, 0);
        if (n == 0) { burst_finish(c, 0); return; }
        if (n < 0) {
            if (errno == EAGAIN) return;
            if (errno == ECONNRESET) { burst_finish(c, 1); return; }
            err(c, "recv: %s", strerror(errno)); conn_drop(c, ST_DEAD); active--; return;
        }
        if (buf != scratch) c->rlen += n;
        c->got += n;
    }
}

static void burst_event(conn_t *c, uint32_t evs) {
    if (c->state == ST_CONNECTING) {
        if (!(evs & (EPOLLOUT | EPOLLERR | EPOLLHUP))) return;
        int e = 0; socklen_t l = sizeof e;
        getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &e, &l);
        if (e) { connect_errors++; err(c, "connect: %s", strerror(e)); conn_drop(c, ST_DEAD); active--; return; }
        opened++;
        c->state = ST_OPEN; c->send_off = 0; c->send_cut = 0; c->got = 0;
        burst_send(c);
        if (c->fd < 0) return;
    } else if ((evs & EPOLLOUT) && c->state == ST_OPEN) {
        burst_send(c);
        if (c->fd < 0) return;
    }
    if (evs & (EPOLLIN | EPOLLHUP | EPOLLERR)) burst_read(c);
}

static void burst_next(conn_t *c) {
    if (phase < 3 && started < max_count) { started++; start_connect(c); }
    else active--;
}

static void on_event(conn_t *c, uint32_t evs) {
    if (c->fd < 0) return;
    if (mode == MODE_BURST) { burst_event(c, evs); return; }
    if (c->state == ST_CONNECTING) {
        if (evs & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(c);
        return;
    }
    if (evs & EPOLLOUT) {
        if (mode == MODE_SEND && c->state == ST_OPEN && c->woff == c->wlen) { if (phase >= 1) do_send(c); else set_ev(c, 0); }
        else if (flush(c) < 0) return;
        if (c->fd < 0) return;
    }
    if (evs & (EPOLLIN | EPOLLHUP | EPOLLERR)) on_readable(c);
}

static void usage(void) {
    fprintf(stderr, "usage: wsload --mode echo|send|recv|handshake|idle|http|burst|chat [--host H] [--port P] [--path P]\n"
                    "  [--conns N] [--size B] [--duration S] [--warmup S] [--timeout S] [--hold S]\n"
                    "  [--inflight N] [--src A,B,...] [--count N] [--interval S] [--rate MB/s]\n");
    exit(2);
}

static void mark(const char *what) { printf("MARK %s\n", what); fflush(stdout); }

int main(int argc, char **argv) {
    static struct option lo[] = {
        {"mode", 1, 0, 'm'}, {"host", 1, 0, 'H'}, {"port", 1, 0, 'p'}, {"path", 1, 0, 'P'},
        {"conns", 1, 0, 'c'}, {"size", 1, 0, 's'}, {"duration", 1, 0, 'd'}, {"warmup", 1, 0, 'w'},
        {"timeout", 1, 0, 't'}, {"hold", 1, 0, 'h'}, {"inflight", 1, 0, 'i'}, {"src", 1, 0, 'S'},
        {"count", 1, 0, 'n'}, {"interval", 1, 0, 'I'}, {"wait-go", 0, 0, 'G'}, {"rate", 1, 0, 'R'},
        {0, 0, 0, 0}};
    int o;
    const char *mname = "echo";
    while ((o = getopt_long(argc, argv, "", lo, NULL)) != -1) {
        switch (o) {
        case 'm': mname = optarg; break;
        case 'H': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'P': path = optarg; break;
        case 'c': nconns = atoi(optarg); break;
        case 's': msize = strtoul(optarg, NULL, 10); break;
        case 'd': duration = atof(optarg); break;
        case 'w': warmup = atof(optarg); break;
        case 't': timeout_s = atof(optarg); break;
        case 'h': hold_s = atof(optarg); break;
        case 'i': inflight = atoi(optarg); break;
        case 'n': max_count = strtoull(optarg, NULL, 10); break;
        case 'I': interval_s = atof(optarg); break;
        case 'R': rate_mb = atof(optarg); break;
        case 'G': wait_go = 1; break;
        case 'S': {
            char *s = strdup(optarg), *tok, *save;
            for (tok = strtok_r(s, ",", &save); tok && nsrc < 64; tok = strtok_r(NULL, ",", &save))
                if (inet_pton(AF_INET, tok, &srcs[nsrc]) == 1) nsrc++;
            break;
        }
        default: usage();
        }
    }
    if (!strcmp(mname, "echo")) mode = MODE_ECHO;
    else if (!strcmp(mname, "send")) mode = MODE_SEND;
    else if (!strcmp(mname, "recv")) mode = MODE_RECV;
    else if (!strcmp(mname, "handshake")) mode = MODE_HS;
    else if (!strcmp(mname, "idle")) mode = MODE_IDLE;
    else if (!strcmp(mname, "http")) mode = MODE_HTTP;
    else if (!strcmp(mname, "burst")) mode = MODE_BURST;
    else if (!strcmp(mname, "chat")) mode = MODE_CHAT;
    else usage();
    if (!path) path = mode == MODE_SEND ? "/sink" : mode == MODE_RECV ? "/firehose" : mode == MODE_BURST ? "/burst" : "/echo";
    if (mode == MODE_BURST) {
        if (!max_count) max_count = 10000;
        if (msize < 256 || msize > (64u << 20)) usage();
    }
    if (mode == MODE_HS || mode == MODE_IDLE) { if (msize > 125 || mode == MODE_IDLE) msize = mode == MODE_IDLE ? 16 : msize; }
    if (nconns < 1 || duration <= 0 || duration > 3600 || hold_s > 3600 || timeout_s > 600) usage();
    if (interval_s < 0.01 || interval_s > 4.0) usage();
    if (rate_mb < 0 || (rate_mb > 0 && mode != MODE_SEND)) usage();
    for (int i = 0; i < WHEEL; i++) wheel[i] = -1;

    raise_nofile();
    signal(SIGPIPE, SIG_IGN);
    dst.sin_family = AF_INET; dst.sin_port = htons(port);
    if (inet_pton(AF_INET, host, &dst.sin_addr) != 1) { fprintf(stderr, "bad --host\n"); return 2; }
    ep = epoll_create1(0);
    rng ^= (uint64_t)getpid() << 21 ^ now_ns();
    C = calloc(nconns, sizeof *C);
    for (int i = 0; i < nconns; i++) {
        C[i].id = i; C[i].fd = -1;
        C[i].explen = msize;
        if (mode == MODE_ECHO || mode == MODE_HS || mode == MODE_IDLE || mode == MODE_CHAT) {
            C[i].exp = malloc(msize + 1);
            for (size_t j = 0; j < msize; j++) C[i].exp[j] = (uint8_t)(xrand() >> 11);
        }
    }
    if (mode == MODE_SEND) {
        conn_t tmp = {0};
        uint8_t *pl = malloc(msize);
        for (size_t j = 0; j < msize; j++) pl[j] = (uint8_t)(j * 13 + 5);
        put_frame(&tmp, 2, pl, msize);
        send_frame = tmp.wb; send_frame_len = tmp.wlen; free(pl);
    }
    if (mode == MODE_RECV) { fire_pat = malloc(msize); for (size_t j = 0; j < msize; j++) fire_pat[j] = (uint8_t)(j * 31 + 7); }
    if (mode == MODE_BURST) {
        /* one request head of exactly --size bytes: filler lines of about 1 KiB, like
         * big cookies; the same bytes for every connection */
        burst_req = malloc(msize + 1);
        int n = snprintf(burst_req, msize + 1, "GET %s HTTP/1.1\r\nHost: %s:%d\r\nUser-Agent: fastws-bench\r\n"
                         "Connection: close\r\n", path, host, port);
        size_t len = (size_t)n;
        for (int k = 0; len + 2 < msize; k++) {
            size_t room = msize - 2 - len;         /* what is left before the final CRLF */
            size_t line = room > 1024 ? 1024 : room;
            if (room > 1024 && room - 1024 < 32) line = room - 32;   /* keep the last line long enough */
            int h = snprintf(burst_req + len, msize + 1 - len, "X-Fill-%05d: ", k);
            if ((size_t)h + 2 > line) { fprintf(stderr, "--size does not fit\n"); return 2; }
            memset(burst_req + len + h, 'a' + k % 26, line - h - 2);
            memcpy(burst_req + len + line - 2, "\r\n", 2);
            len += line;
        }
        memcpy(burst_req + len, "\r\n", 2);
        burst_len = len + 2;
        for (int i = 0; i < nconns; i++) { C[i].rcap = 4096; C[i].rb = malloc(C[i].rcap); }
    }

    t_setup0 = now_ns();
    uint64_t setup_deadline = t_setup0 + (uint64_t)(timeout_s * 1e9);
    active = nconns;
    if (mode == MODE_IDLE || mode == MODE_CHAT) {
        next_id = nconns < inflight ? nconns : inflight;
        for (int i = 0; i < next_id; i++) start_connect(&C[i]);
    } else if (mode == MODE_HS) {
        phase = 1;   /* every cycle is work: start the clock now */
        t_mstart = now_ns() + (uint64_t)(warmup * 1e9);
        t_mend = t_mstart + (uint64_t)(duration * 1e9);
        for (int i = 0; i < nconns; i++) {
            if (max_count && started >= max_count) { active--; continue; }
            started++; start_connect(&C[i]);
        }
    } else if (mode == MODE_BURST) {
        phase = 2;   /* the whole burst is measured */
        t_mstart = now_ns();
        t_mend = t_mstart + (uint64_t)(duration * 1e9);
        mark("start");
        for (int i = 0; i < nconns; i++) {
            if (started >= max_count) { active--; continue; }
            started++; start_connect(&C[i]);
        }
    } else {
        for (int i = 0; i < nconns; i++) start_connect(&C[i]);
    }

    struct epoll_event evs[1024];
    int ready_printed = 0, stdin_added = 0;
    uint64_t hold_deadline = 0, drain_deadline = 0;
    uint64_t t_measured0 = 0, t_measured1 = 0;
    for (;;) {
        uint64_t t = now_ns();
        /* phase transitions */
        if (phase == 0 && mode != MODE_IDLE) {
            if ((int)opened == nconns - (int)errors) {
                if (errors) { phase = 3; drain_deadline = t; }
                else if (wait_go && !go_pending) {
                    /* set up: wait for the go-ahead on stdin (the tracer is attaching) */
                    struct epoll_event ev = { .events = EPOLLIN, .data.u32 = 0xFFFFFFFEu };
                    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev);
                    go_pending = 1;
                    mark("open");
                    setup_deadline = t + (uint64_t)(timeout_s * 1e9);
                } else if (wait_go && go_pending == 1) {
                    /* (waiting) */
                } else {
                    phase = 1;
                    t_mstart = t + (uint64_t)(warmup * 1e9);
                    t_mend = t_mstart + (uint64_t)(duration * 1e9);
                    for (int i = 0; i < nconns; i++) {
                        conn_t *c = &C[i];
                        if (c->state != ST_OPEN || c->fd < 0) continue;
                        if (mode == MODE_ECHO) send_echo(c);
                        else if (mode == MODE_CHAT)   /* the first message somewhere in the first interval */
                            chat_schedule(c, t + (uint64_t)((double)(xrand() % 1000000) / 1e6 * interval_s * 1e9));
                        else if (mode == MODE_HTTP) send_http(c);
                        else if (mode == MODE_SEND) { pace_start(&c->pace, t); set_ev(c, 1); }
                    }
                }
            } else if (t > setup_deadline) { err(NULL, "setup timed out: %llu of %d open", opened, nconns); phase = 3; drain_deadline = t; }
            if (go_pending == 1 && t > setup_deadline) { err(NULL, "no go-ahead on stdin"); phase = 3; drain_deadline = t; }
        }
        if (mode == MODE_BURST && phase == 2) {
            if (t_measured0 == 0) t_measured0 = t_mstart;
            if (active <= 0 || t >= t_mend) {
                if (active > 0) err(NULL, "burst not finished in %g s: %llu of %llu answered", duration, cnt_total, max_count);
                phase = 3; t_measured1 = now_ns(); mark("end");
                break;
            }
        }
        if (phase == 1 && t >= t_mstart) { phase = 2; t_measured0 = t; mark("start"); }
        if (max_count && (mode == MODE_HS || mode == MODE_HTTP) && (phase == 1 || phase == 2) && active <= 0) {
            /* --count reached and everything in flight is done */
            if (phase == 1) { t_measured0 = t; mark("start"); }
            phase = 3; t_measured1 = t; mark("end");
            break;
        }
        if (phase == 2 && t >= t_mend) {
            phase = 3; t_measured1 = t; mark("end");
            drain_deadline = t + (uint64_t)DRAIN_S * 1000000000ull;
            if (mode == MODE_SEND || mode == MODE_RECV) drain_deadline = t;
        }
        if (mode == MODE_IDLE && !ready_printed) {
            if ((int)(opened + errors) >= nconns || t > setup_deadline) {
                if ((int)opened < nconns) err(NULL, "only %llu of %d tunnels opened", opened, nconns);
                printf("READY %llu\n", opened); fflush(stdout);
                ready_printed = 1;
                t_measured0 = t;
                hold_deadline = t + (uint64_t)(hold_s * 1e9);
                struct epoll_event ev = { .events = EPOLLIN, .data.u32 = 0xFFFFFFFFu };
                if (epoll_ctl(ep, EPOLL_CTL_ADD, 0, &ev) == 0) stdin_added = 1;
            }
        }
        if (mode == MODE_IDLE && ready_printed && t >= hold_deadline) break;
        if (phase == 3 && (active <= 0 || t >= drain_deadline)) break;
        if (mode == MODE_HS && phase == 3 && active <= 0) break;

        /* per-connection timeouts (handshake / idle setup) */
        if ((mode == MODE_HS || mode == MODE_BURST || (mode == MODE_IDLE && !ready_printed))) {
            static uint64_t last_check;
            if (t - last_check > 100000000ull) {
                last_check = t;
                for (int i = 0; i < nconns; i++) {
                    conn_t *c = &C[i];
                    if (c->fd >= 0 && c->state != ST_IDLE && t > c->deadline) {
                        err(c, "timed out in state %d%s", c->state,
                            mode == MODE_BURST && c->state == ST_WAIT_EOF ? " (the answer never ended with a close)" : "");
                        conn_drop(c, ST_DEAD); active--;
                        if (mode == MODE_IDLE) next_cycle(c);
                    }
                }
            }
        }
        if (mode == MODE_CHAT && phase >= 1 && phase < 3) chat_run(t);
        if (npaused && phase >= 1 && phase < 3) {
            /* the waiting connections whose bucket has filled go on */
            for (int i = 0; i < nconns && npaused; i++) {
                conn_t *c = &C[i];
                if (!c->paused || !send_paced(c, t)) continue;
                c->paused = 0; npaused--;
                if (c->fd >= 0 && c->state == ST_OPEN) do_send(c);
            }
        }
        int wait_ms = mode == MODE_CHAT || rate_mb ? 1 : 10;
        int n = epoll_wait(ep, evs, 1024, wait_ms);
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == 0xFFFFFFFFu) { hold_deadline = 0; continue; }
            if (id == 0xFFFFFFFEu) { char line[64]; (void)!read(0, line, sizeof line); epoll_ctl(ep, EPOLL_CTL_DEL, 0, NULL); go_pending = 2; continue; }
            on_event(&C[id], evs[i].events);
        }
    }
    if (mode == MODE_IDLE) t_measured1 = now_ns();
    (void)stdin_added;
    double secs = t_measured1 > t_measured0 ? (t_measured1 - t_measured0) / 1e9 : 0;
    if (!errors && (mode == MODE_ECHO || mode == MODE_HTTP || mode == MODE_HS || mode == MODE_CHAT) && phase == 3) {
        /* every answer normally arrives within milliseconds: one still awaited DRAIN_S after
         * the measured window means the peer stalled (a proxy that accepts and never
         * answers would otherwise pass with nothing counted) */
        int stuck = 0;
        for (int i = 0; i < nconns; i++)
            if (C[i].fd >= 0 && C[i].state != ST_OPEN && C[i].state != ST_FREE && C[i].state != ST_DEAD) stuck++;
        if (stuck) err(NULL, "%d connection(s) still waiting for an answer %d s after the measured window", stuck, DRAIN_S);
    }
    if (!errors && mode != MODE_IDLE && cnt_total == 0)
        err(NULL, "no %s completed", mode == MODE_HS ? "handshake" : mode == MODE_HTTP ? "request" :
                                     mode == MODE_BURST ? "head" : "message or frame");
    for (int i = 0; i < nconns; i++) if (C[i].fd >= 0) close(C[i].fd);
    static const char *mnames[] = {"echo", "send", "recv", "handshake", "idle", "http", "burst", "chat"};
    printf("RESULT {\"mode\": \"%s\", \"conns\": %d, \"size\": %zu, \"seconds\": %.6f, "
           "\"count\": %llu, \"total_count\": %llu, \"rate\": %.3f, \"bytes\": %llu, \"mb_per_s\": %.3f, "
           "\"opened\": %llu, \"reconnects\": %llu, \"errors\": %llu, \"connect_errors\": %llu, "
           "\"lat_us\": {\"n\": %llu, \"mean\": %.3f, \"p50\": %.3f, \"p90\": %.3f, \"p99\": %.3f, \"p999\": %.3f, \"max\": %.3f}, "
           "\"error_samples\": [",
           mnames[mode], nconns, msize, secs, cnt_measured, cnt_total,
           secs > 0 ? cnt_measured / secs : 0.0, bytes_measured,
           secs > 0 ? bytes_measured / secs / 1e6 : 0.0, opened, reconnects, errors, connect_errors,
           hist_n, hist_n ? lat_sum / 1000.0 / hist_n : 0.0, pct(0.5), pct(0.9), pct(0.99), pct(0.999), lat_max / 1000.0);
    for (int i = 0; i < nerr_samples; i++) printf("%s\"%s\"", i ? ", " : "", err_samples[i]);
    printf("]");
    if (max_count) printf(", \"max_count\": %llu, \"started\": %llu", max_count, started);
    if (mode == MODE_BURST) {
        printf(", \"head_bytes\": %zu, \"resets\": %llu, \"send_cut\": %llu, \"answer_bytes\": %llu, \"statuses\": {",
               burst_len, resets, send_cuts, answer_bytes);
        int first = 1;
        for (int i = 0; i < 600; i++) if (statuses[i]) { printf("%s\"%d\": %llu", first ? "" : ", ", i, statuses[i]); first = 0; }
        printf("}");
    }
    printf("}\n");
    fflush(stdout);
    return errors ? 1 : 0;
}
