# Extern declarations only: WebSocket frame boundaries, from includes/wsframe.h.

from libc.stdint cimport uint8_t, uint16_t, uint64_t

cdef extern from "wsframe.h" nogil:
    ctypedef struct fastws_wsframe:
        uint64_t left
        uint64_t msg_bytes
        uint64_t messages
        uint64_t frames
        uint8_t hlen
        uint8_t in_msg
        uint16_t close_code
    int fastws_ws_feed(fastws_wsframe *f, const uint8_t *p, size_t n, int from_client,
                       uint64_t max_message)
