# Extern declarations only: regular expressions through PCRE2, from includes/pcre2.h.

cdef extern from "pcre2.h" nogil:
    ctypedef struct fastws_regex:
        void *code
        void *match_data
    int fastws_regex_compile(fastws_regex *re, const char *pattern, size_t len, int caseless,
                             char *err, size_t errcap)
    int fastws_regex_match(fastws_regex *re, const char *s, size_t n)
    void fastws_regex_free(fastws_regex *re)
