# Extern declarations only: WebSocket frame boundaries, from includes/wsframe.h.

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "wsframe.h" nogil:
    ctypedef struct fastws_wsframe:
        uint32_t msg_bytes
        uint32_t messages
        uint16_t close_code
        uint8_t flags
        uint8_t ncarry
        uint8_t carry[14]
        uint16_t pings
    enum:
        FASTWS_WS_IN_MSG
        FASTWS_WS_STOP
        FASTWS_WS_PONG_DUE
        FASTWS_WS_CLOSE_SEEN
        FASTWS_WS_CLOSE_SENT
        FASTWS_WS_CHECKS
        FASTWS_WS_CLOSE_FIRST
        FASTWS_WS_CLOSE_NOTED
        FASTWS_WS_MORE
        FASTWS_WS_BOUNDARY
        FASTWS_WS_DROP
        FASTWS_WS_PROTOCOL
        FASTWS_WS_TOO_BIG
        FASTWS_WS_PING_LEN
    const char *FASTWS_WS_PING_DATA
    int fastws_ws_header(fastws_wsframe *f, const uint8_t *h, size_t n, int from_client,
                         uint64_t max_message, int *need, int *hlen, uint64_t *len)
    int fastws_ws_unit(fastws_wsframe *f, const uint8_t *h, int need, int hlen, uint64_t len)
    int fastws_ws_scan(fastws_wsframe *f, uint64_t *left, const uint8_t *p, size_t n,
                       size_t *pos, int from_client, uint64_t max_message, size_t *drop)
    int fastws_ws_make(uint8_t *out, int opcode, const uint8_t *data, int n, const uint8_t *key)
