/* Regular expressions (nginx's `location ~`, `~*` and map keys), with PCRE2, as nginx uses,
 * resolved at run time.
 *
 * fastws builds without the PCRE2 headers (Debian ships them only in libpcre2-dev): the few
 * functions used are looked up with dlopen + dlsym in libpcre2-8.so.0, which every Debian
 * system has (grep depends on it).  A configuration that uses no regular expression never loads
 * it.  The prototypes and constants below are PCRE2's (pcre2.h, 10.x), unchanged since 10.00. */
#ifndef FASTWS_PCRE2_H
#define FASTWS_PCRE2_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <dlfcn.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#define FASTWS_PCRE2_CASELESS 0x00000008u
#define FASTWS_PCRE2_JIT_COMPLETE 0x00000001u

typedef struct {
    void *(*compile)(const unsigned char *, size_t, uint32_t, int *, size_t *, void *);
    int (*jit_compile)(void *, uint32_t);
    void *(*match_data_create_from_pattern)(const void *, void *);
    int (*match)(const void *, const unsigned char *, size_t, size_t, uint32_t, void *, void *);
    void (*code_free)(void *);
    void (*match_data_free)(void *);
    int (*get_error_message)(int, unsigned char *, size_t);
    int loaded;     /* 0: not tried, 1: ready, -1: missing */
} fastws_pcre2_api;

static fastws_pcre2_api fastws_pcre2;

typedef struct {
    void *code;
    void *match_data;
} fastws_regex;

static int fastws_pcre2_load(void) {
    void *h;
    if (fastws_pcre2.loaded)
        return fastws_pcre2.loaded;
    h = dlopen("libpcre2-8.so.0", RTLD_NOW | RTLD_LOCAL);
    if (h == NULL) {
        fastws_pcre2.loaded = -1;
        return -1;
    }
    *(void **)&fastws_pcre2.compile = dlsym(h, "pcre2_compile_8");
    *(void **)&fastws_pcre2.jit_compile = dlsym(h, "pcre2_jit_compile_8");
    *(void **)&fastws_pcre2.match_data_create_from_pattern =
        dlsym(h, "pcre2_match_data_create_from_pattern_8");
    *(void **)&fastws_pcre2.match = dlsym(h, "pcre2_match_8");
    *(void **)&fastws_pcre2.code_free = dlsym(h, "pcre2_code_free_8");
    *(void **)&fastws_pcre2.match_data_free = dlsym(h, "pcre2_match_data_free_8");
    *(void **)&fastws_pcre2.get_error_message = dlsym(h, "pcre2_get_error_message_8");
    if (!fastws_pcre2.compile || !fastws_pcre2.jit_compile || !fastws_pcre2.match ||
        !fastws_pcre2.match_data_create_from_pattern || !fastws_pcre2.code_free ||
        !fastws_pcre2.match_data_free || !fastws_pcre2.get_error_message) {
        fastws_pcre2.loaded = -1;
        return -1;
    }
    fastws_pcre2.loaded = 1;
    return 1;
}

/* Compile a pattern (JIT when the library can); 0, or -1 with the reason in err. */
static int fastws_regex_compile(fastws_regex *re, const char *pattern, size_t len,
                                int caseless, char *err, size_t errcap) {
    int code = 0;
    size_t offset = 0;
    unsigned char msg[256];
    re->code = NULL;
    re->match_data = NULL;
    if (fastws_pcre2_load() < 0) {
        snprintf(err, errcap, "regular expressions need the PCRE2 library (libpcre2-8.so.0; "
                 "Debian: libpcre2-8-0)");
        return -1;
    }
    re->code = fastws_pcre2.compile((const unsigned char *)pattern, len,
                                    caseless ? FASTWS_PCRE2_CASELESS : 0, &code, &offset, NULL);
    if (re->code == NULL) {
        if (fastws_pcre2.get_error_message(code, msg, sizeof(msg)) < 0)
            strcpy((char *)msg, "invalid pattern");
        snprintf(err, errcap, "%s at offset %zu", (char *)msg, offset);
        return -1;
    }
    fastws_pcre2.jit_compile(re->code, FASTWS_PCRE2_JIT_COMPLETE);   /* interpreted otherwise */
    re->match_data = fastws_pcre2.match_data_create_from_pattern(re->code, NULL);
    if (re->match_data == NULL) {
        fastws_pcre2.code_free(re->code);
        re->code = NULL;
        snprintf(err, errcap, "out of memory");
        return -1;
    }
    return 0;
}

/* 1 when the subject matches, 0 when it does not (or on a matching error). */
static int fastws_regex_match(fastws_regex *re, const char *s, size_t n) {
    return fastws_pcre2.match(re->code, (const unsigned char *)s, n, 0, 0, re->match_data,
                              NULL) > 0;
}

static void fastws_regex_free(fastws_regex *re) {
    if (re->match_data != NULL)
        fastws_pcre2.match_data_free(re->match_data);
    if (re->code != NULL)
        fastws_pcre2.code_free(re->code);
    re->code = NULL;
    re->match_data = NULL;
}

#endif
