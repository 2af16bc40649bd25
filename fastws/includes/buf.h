/* Growable byte buffers with printf-style appends, for heads the engine builds and for the
 * messages it hands to Python's error log.  Plain C so that the engine's Cython can call the
 * variadic functions (Cython cannot define one). */
#ifndef FASTWS_BUF_H
#define FASTWS_BUF_H
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    char *p;
    int len;
    int cap;
    int failed;     /* an allocation failed: the content is incomplete */
} fastws_buf;

static int fastws_buf_reserve(fastws_buf *b, int extra)
{
    int cap;
    char *grown;
    if (b->len + extra <= b->cap)
        return 0;
    cap = b->cap ? b->cap : 1024;
    while (cap < b->len + extra)
        cap *= 2;
    grown = (char *)realloc(b->p, (size_t)cap);
    if (grown == NULL) {
        b->failed = 1;
        return -1;
    }
    b->p = grown;
    b->cap = cap;
    return 0;
}

static inline void fastws_buf_add(fastws_buf *b, const char *data, int n)
{
    if (n <= 0 || fastws_buf_reserve(b, n) < 0)
        return;
    memcpy(b->p + b->len, data, (size_t)n);
    b->len += n;
}

static void fastws_buf_fmt(fastws_buf *b, const char *fmt, ...)
{
    va_list ap;
    int n;
    va_start(ap, fmt);
    n = vsnprintf(b->p ? b->p + b->len : NULL, b->p ? (size_t)(b->cap - b->len) : 0, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if (b->p == NULL || n >= b->cap - b->len) {
        if (fastws_buf_reserve(b, n + 1) < 0)
            return;
        va_start(ap, fmt);
        vsnprintf(b->p + b->len, (size_t)(b->cap - b->len), fmt, ap);
        va_end(ap);
    }
    b->len += n;
}

/* The error log's messages, each a level byte, the text and a NUL, until Python takes them. */
#define FASTWS_MSGS_MAX (1 << 20)

static void fastws_msg(fastws_buf *m, int level, const char *fmt, ...)
{
    va_list ap;
    char text[1024];
    int n;
    va_start(ap, fmt);
    n = vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);
    if (n < 0 || m->len > FASTWS_MSGS_MAX)
        return;
    if (n >= (int)sizeof(text))
        n = sizeof(text) - 1;
    if (fastws_buf_reserve(m, n + 2) < 0)
        return;
    m->p[m->len] = (char)level;
    memcpy(m->p + m->len + 1, text, (size_t)n);
    m->p[m->len + 1 + n] = 0;
    m->len += n + 2;
}

#define FASTWS_ENG_LOG(e, level, ...) \
    do { if ((level) >= (e)->log_level) fastws_msg(&(e)->msgs, (level), __VA_ARGS__); } while (0)
#endif
