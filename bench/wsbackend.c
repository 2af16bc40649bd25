/* wsbackend.c - the fastws bench backend: one epoll thread serving
 *   WebSocket  /echo      echo every data frame back (unmasked, same opcode)
 *   WebSocket  /sink      read and discard frames
 *   WebSocket  /firehose  send 64 KiB binary frames as fast as the peer reads
 *              (/firehose?rate=R: R MB/s on that connection, a token bucket from the 101
 *              holding at most 2 ms of credit)
 *   plain HTTP (any path, no Upgrade)  200 with a small body, keep-alive
 * Close frames are answered with a close frame and the server closes first,
 * so TIME_WAIT stays on the server side of each hop.
 *
 * usage: wsbackend [-a ADDR] [-p PORT] [-f FRAME_BYTES] [-t MAX_SECONDS] [-x N] [-l BYTES]
 * -x N flips one bit in every Nth echoed message: only to test that wsload catches it.
 * -l BYTES answers a request head larger than BYTES with 431 and closes, as a proxy
 *    does: only to test wsload's burst mode against a correct server.
 * Prints one JSON line on SIGTERM/SIGINT or when MAX_SECONDS have passed. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>
#include "wscommon.h"

enum { M_HTTP = 0, M_ECHO, M_SINK, M_FIRE };

typedef struct {
    int fd;
    int mode;          /* M_HTTP until upgraded */
    int closing;       /* close frame sent: close after output drains */
    uint8_t *rb; size_t rlen, rcap;
    uint8_t *wb; size_t wlen, woff, wcap;
    size_t fire_off;   /* offset into firehose frame */
    double pace;       /* firehose ?rate=: MB/s, 0 = as fast as the peer reads */
    pace_t bucket;     /* the pace's bucket (wscommon.h) */
    int paused;        /* the pace is ahead: waiting for the main loop */
    int want_out;
} conn_t;

static volatile sig_atomic_t stop_flag;
static void on_sig(int s) { (void)s; stop_flag = 1; }

static int ep;
static conn_t **conns;
static int maxfd;
static uint8_t *fire_frame; static size_t fire_len;
static unsigned long corrupt_every, echo_count;
static size_t head_limit;   /* -l: 0 = no limit below the 64 KiB buffer */
static unsigned long long st_conns, st_upgrades, st_http, st_frames, st_bytes_in, st_bytes_out, st_errors;

static const char HTTP_BODY[] = "hello from fastws bench\n";
static int npaused;
static int hifd;   /* the highest fd a connection has had: what the paced loop looks through */

static int fire_paced(conn_t *c) {
    return !c->pace || pace_allows(&c->bucket, c->pace * 1e6, now_ns());
}

static void set_ev(conn_t *c, int out) {
    if (c->want_out == out) return;
    struct epoll_event ev = { .events = EPOLLIN | (out ? EPOLLOUT : 0), .data.fd = c->fd };
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->want_out = out;
}

static void conn_close(conn_t *c) {
    if (c->paused) npaused--;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    conns[c->fd] = NULL;
    free(c->rb); free(c->wb); free(c);
}

static void wbuf_add(conn_t *c, const void *p, size_t n) {
    if (c->woff && c->woff == c->wlen) c->woff = c->wlen = 0;
    if (c->wlen + n > c->wcap) {
        if (c->woff) { memmove(c->wb, c->wb + c->woff, c->wlen - c->woff); c->wlen -= c->woff; c->woff = 0; }
        if (c->wlen + n > c->wcap) {
            size_t nc = c->wcap ? c->wcap : 4096;
            while (nc < c->wlen + n) nc *= 2;
            c->wb = realloc(c->wb, nc); c->wcap = nc;
        }
    }
    memcpy(c->wb + c->wlen, p, n); c->wlen += n;
}

/* returns -1 if the connection was closed */
static int flush_out(conn_t *c) {
    while (c->woff < c->wlen) {
        ssize_t n = send(c->fd, c->wb + c->woff, c->wlen - c->woff, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN) { set_ev(c, 1); return 0; }
            conn_close(c); return -1;
        }
        c->woff += n; st_bytes_out += n;
    }
    c->woff = c->wlen = 0;
    if (c->closing) { conn_close(c); return -1; }
    if (c->mode == M_FIRE) {
        for (;;) {
            if (!fire_paced(c)) {
                if (!c->paused) { c->paused = 1; npaused++; }
                break;
            }
            ssize_t n = send(c->fd, fire_frame + c->fire_off, fire_len - c->fire_off, MSG_NOSIGNAL);
            if (n < 0) {
                if (errno == EAGAIN) { set_ev(c, 1); return 0; }
                conn_close(c); return -1;
            }
            st_bytes_out += n;
            c->bucket.tokens -= (double)n;
            c->fire_off += n;
            if (c->fire_off == fire_len) { c->fire_off = 0; st_frames++; }
        }
    }
    set_ev(c, 0);
    return 0;
}

static void frame_header(uint8_t op, size_t len, uint8_t *h, size_t *hl) {
    h[0] = 0x80 | op;
    if (len < 126) { h[1] = len; *hl = 2; }
    else if (len < 65536) { h[1] = 126; h[2] = len >> 8; h[3] = len; *hl = 4; }
    else { h[1] = 127; for (int i = 0; i < 8; i++) h[2+i] = (uint8_t)((uint64_t)len >> (56 - 8*i)); *hl = 10; }
}

static void bad(conn_t *c, const char *why) {
    (void)why;
    st_errors++;
    conn_close(c);
}

/* Handle HTTP request heads. returns -1 if closed, 0 if need more, 1 if consumed something */
static int handle_http(conn_t *c) {
    uint8_t *end = memmem(c->rb, c->rlen, "\r\n\r\n", 4);
    if (head_limit && (end ? (size_t)(end - c->rb) + 4 : c->rlen) > head_limit) {
        static const char r431[] = "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Type: text/plain\r\n"
                                   "Content-Length: 16\r\nConnection: close\r\n\r\nhead too large\r\n";
        c->rlen = 0;
        wbuf_add(c, r431, sizeof r431 - 1);
        c->closing = 1;
        flush_out(c);
        return -1;   /* closed, or closing once the answer is out: read nothing more */
    }
    if (!end) {
        if (c->rlen > 65536) { bad(c, "head too large"); return -1; }
        return 0;
    }
    size_t hlen = (size_t)(end - c->rb) + 4;
    const char *head = (const char *)c->rb;
    size_t vl;
    const char *up = http_header(head, hlen, "Upgrade", &vl);
    if (up && vl == 9 && strncasecmp(up, "websocket", 9) == 0) {
        size_t kl;
        const char *key = http_header(head, hlen, "Sec-WebSocket-Key", &kl);
        if (!key || kl > 64) { bad(c, "no key"); return -1; }
        char acc[40];
        ws_accept_key(key, kl, acc);
        int mode = M_ECHO;
        const char *sp = memchr(head, ' ', hlen);
        if (sp) {
            if (strncmp(sp + 1, "/sink", 5) == 0) mode = M_SINK;
            else if (strncmp(sp + 1, "/firehose", 9) == 0) {
                mode = M_FIRE;
                if (strncmp(sp + 10, "?rate=", 6) == 0) { c->pace = atof(sp + 16); pace_start(&c->bucket, now_ns()); }
            }
        }
        char resp[256];
        int n = snprintf(resp, sizeof resp,
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Accept: %s\r\n\r\n", acc);
        memmove(c->rb, c->rb + hlen, c->rlen - hlen); c->rlen -= hlen;
        c->mode = mode; st_upgrades++;
        wbuf_add(c, resp, n);
        if (flush_out(c) < 0) return -1;
        return 1;
    }
    /* plain HTTP: skip a body if Content-Length says so */
    size_t body = 0;
    const char *cl = http_header(head, hlen, "Content-Length", &vl);
    if (cl) body = strtoul(cl, NULL, 10);
    if (c->rlen < hlen + body) return 0;
    int keep = 1;
    const char *cn = http_header(head, hlen, "Connection", &vl);
    if (cn && header_has_token(cn, vl, "close")) keep = 0;
    if (hlen > 9 && memmem(head, memchr(head, '\n', hlen) - (void *)head, "HTTP/1.0", 8) && !(cn && header_has_token(cn, vl, "keep-alive"))) keep = 0;
    char resp[256];
    int n = snprintf(resp, sizeof resp,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n%s\r\n%s",
        sizeof(HTTP_BODY) - 1, keep ? "" : "Connection: close\r\n", HTTP_BODY);
    memmove(c->rb, c->rb + hlen + body, c->rlen - hlen - body); c->rlen -= hlen + body;
    st_http++;
    wbuf_add(c, resp, n);
    if (!keep) c->closing = 1;
    if (flush_out(c) < 0) return -1;
    return 1;
}

/* Parse client (masked) frames. returns -1 if closed, 0 need more, 1 consumed */
static int handle_ws(conn_t *c) {
    if (c->rlen < 2) return 0;
    uint8_t *p = c->rb;
    uint8_t op = p[0] & 0x0f;
    int masked = p[1] & 0x80;
    uint64_t len = p[1] & 0x7f;
    size_t hl = 2;
    if (len == 126) { if (c->rlen < 4) return 0; len = (uint64_t)p[2] << 8 | p[3]; hl = 4; }
    else if (len == 127) {
        if (c->rlen < 10) return 0;
        len = 0; for (int i = 0; i < 8; i++) len = len << 8 | p[2+i];
        hl = 10;
    }
    if (!masked) { bad(c, "unmasked client frame"); return -1; }
    if (len > (64u << 20)) { bad(c, "frame too large"); return -1; }
    hl += 4;
    if (c->mode == M_SINK && op != 8 && op != 9) {
        /* discard payload without buffering it */
        if (c->rlen < hl) return 0;
        size_t have = c->rlen - hl;
        if (have >= len) {
            size_t tot = hl + len;
            memmove(c->rb, c->rb + tot, c->rlen - tot); c->rlen -= tot;
            st_frames++;
            return 1;
        }
        return 0;
    }
    if (c->rlen < hl + len) {
        if (c->rcap < hl + len) { c->rcap = hl + len; c->rb = realloc(c->rb, c->rcap); }
        return 0;
    }
    uint8_t *mk = p + hl - 4, *pl = p + hl;
    for (uint64_t i = 0; i < len; i++) pl[i] ^= mk[i & 3];
    uint8_t h[10]; size_t hsz;
    st_frames++;
    if (c->mode == M_FIRE) {               /* never interleave with a partial firehose frame */
        if (op == 8) { conn_close(c); return -1; }
        size_t tot = hl + len;
        memmove(c->rb, c->rb + tot, c->rlen - tot); c->rlen -= tot;
        return 1;
    }
    if (op == 8) {                         /* close: answer and close */
        frame_header(8, len, h, &hsz);
        wbuf_add(c, h, hsz); wbuf_add(c, pl, len);
        c->closing = 1;
        return flush_out(c) < 0 ? -1 : 1;
    }
    if (op == 9) { frame_header(10, len, h, &hsz); wbuf_add(c, h, hsz); wbuf_add(c, pl, len); }
    else if (c->mode == M_ECHO && op != 10) {
        if (corrupt_every && len && ++echo_count % corrupt_every == 0)
            pl[len / 2] ^= 0x01;           /* -x: self-test of the load generator's checks */
        frame_header(op, len, h, &hsz);
        wbuf_add(c, h, hsz); wbuf_add(c, pl, len);
    }
    size_t tot = hl + len;
    memmove(c->rb, c->rb + tot, c->rlen - tot); c->rlen -= tot;
    return 1;
}

static void on_readable(conn_t *c) {
    for (;;) {
        if (c->rcap - c->rlen < 4096) {
            size_t nc = c->rcap < 16384 ? 16384 : c->rcap * 2;
            c->rb = realloc(c->rb, nc); c->rcap = nc;
        }
        ssize_t n = recv(c->fd, c->rb + c->rlen, c->rcap - c->rlen, 0);
        if (n == 0) { conn_close(c); return; }
        if (n < 0) {
            if (errno == EAGAIN) break;
            conn_close(c); return;
        }
        st_bytes_in += n;
        c->rlen += n;
        if (c->mode == M_SINK) {
            /* fast path: consume whole frames in place */
            int r;
            while ((r = handle_ws(c)) == 1) {}
            if (r < 0) return;
            continue;
        }
        if ((size_t)n < c->rcap - c->rlen + n) break; /* short read: socket drained */
    }
    int r;
    for (;;) {
        if (c->closing) break;
        r = c->mode == M_HTTP ? handle_http(c) : handle_ws(c);
        if (r < 0) return;
        if (r == 0) break;
    }
    if (c->wlen > c->woff) flush_out(c);
}

int main(int argc, char **argv) {
    const char *addr = "127.0.0.1"; int port = 9001; size_t fsz = 65536; int maxsec = 7200;
    int opt;
    while ((opt = getopt(argc, argv, "a:p:f:t:x:l:")) != -1) {
        if (opt == 'a') addr = optarg;
        else if (opt == 'p') port = atoi(optarg);
        else if (opt == 'f') fsz = strtoul(optarg, NULL, 10);
        else if (opt == 't') maxsec = atoi(optarg);
        else if (opt == 'x') corrupt_every = strtoul(optarg, NULL, 10);
        else if (opt == 'l') head_limit = strtoul(optarg, NULL, 10);
        else { fprintf(stderr, "usage: %s [-a addr] [-p port] [-f frame] [-t maxsec] [-x N] [-l head_bytes]\n", argv[0]); return 2; }
    }
    raise_nofile();
    struct rlimit rl; getrlimit(RLIMIT_NOFILE, &rl);
    maxfd = (int)rl.rlim_cur + 16;
    conns = calloc(maxfd, sizeof *conns);
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = { .sa_handler = on_sig };
    sigaction(SIGTERM, &sa, NULL); sigaction(SIGINT, &sa, NULL);

    /* prebuilt firehose frame: header + deterministic payload */
    uint8_t h[10]; size_t hsz;
    frame_header(2, fsz, h, &hsz);
    fire_len = hsz + fsz;
    fire_frame = malloc(fire_len);
    memcpy(fire_frame, h, hsz);
    for (size_t i = 0; i < fsz; i++) fire_frame[hsz + i] = (uint8_t)(i * 31 + 7);

    int ls = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_port = htons(port) };
    inet_pton(AF_INET, addr, &sin.sin_addr);
    if (bind(ls, (void *)&sin, sizeof sin) < 0 || listen(ls, 4096) < 0) { perror("bind/listen"); return 1; }
    ep = epoll_create1(0);
    struct epoll_event ev = { .events = EPOLLIN, .data.fd = ls };
    epoll_ctl(ep, EPOLL_CTL_ADD, ls, &ev);
    fprintf(stderr, "wsbackend listening on %s:%d\n", addr, port);
    uint64_t deadline = now_ns() + (uint64_t)maxsec * 1000000000ull;
    struct epoll_event evs[512];
    while (!stop_flag && now_ns() < deadline) {
        int n = epoll_wait(ep, evs, 512, npaused ? 1 : 500);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd == ls) {
                for (;;) {
                    int cfd = accept4(ls, NULL, NULL, SOCK_NONBLOCK);
                    if (cfd < 0) break;
                    if (cfd >= maxfd) { close(cfd); st_errors++; continue; }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    conn_t *c = calloc(1, sizeof *c);
                    c->fd = cfd;
                    conns[cfd] = c;
                    if (cfd > hifd) hifd = cfd;
                    struct epoll_event e2 = { .events = EPOLLIN, .data.fd = cfd };
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &e2);
                    st_conns++;
                }
                continue;
            }
            conn_t *c = conns[fd];
            if (!c) continue;
            if (evs[i].events & (EPOLLERR)) { conn_close(c); continue; }
            if (evs[i].events & EPOLLOUT) { if (flush_out(c) < 0) continue; }
            if (evs[i].events & (EPOLLIN | EPOLLHUP)) on_readable(c);
        }
        /* start firehose streams that just upgraded */
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            conn_t *c = fd < maxfd ? conns[fd] : NULL;
            if (c && c->mode == M_FIRE && !c->want_out && !c->closing && !c->paused) flush_out(c);
        }
        /* paced firehoses whose pace allows more */
        for (int fd = 0; npaused && fd <= hifd; fd++) {
            conn_t *c = conns[fd];
            if (c && c->paused && fire_paced(c)) { c->paused = 0; npaused--; flush_out(c); }
        }
    }
    printf("{\"connections\": %llu, \"upgrades\": %llu, \"http_requests\": %llu, \"frames\": %llu, "
           "\"bytes_in\": %llu, \"bytes_out\": %llu, \"errors\": %llu}\n",
           st_conns, st_upgrades, st_http, st_frames, st_bytes_in, st_bytes_out, st_errors);
    return 0;
}
