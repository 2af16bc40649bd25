# Extern declarations only: growable buffers and messages, from includes/buf.h.

cdef extern from "buf.h" nogil:
    ctypedef struct fastws_buf:
        char *p
        int len
        int cap
        int failed
    int buf_reserve "fastws_buf_reserve"(fastws_buf *b, int extra)
    void buf_add "fastws_buf_add"(fastws_buf *b, const char *data, int n)
    void buf_fmt "fastws_buf_fmt"(fastws_buf *b, const char *fmt, ...)
    void eng_log "FASTWS_ENG_LOG"(void *e, int level, const char *fmt, ...)
