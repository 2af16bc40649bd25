# WebSocket frame boundaries (includes/wsframe.h): the tracker a tunnel will run over the
# bytes it relays, to count messages, find close codes and enforce message limits without
# copying payloads.  Until the relay runs it, `ws_frames` exposes it for the tests.

def ws_frames(chunks, bint from_client, unsigned long long max_message=0):
    """Feed `chunks` (bytes, in order, as reads would bring them) to a fresh tracker; what
    it found: messages, frames, the last close code (or None), the error code that stopped
    it (1002, 1009, or None) and whether it ended at a frame boundary."""
    cdef fastws_wsframe f
    cdef bytes chunk
    cdef int r = 0
    memset(&f, 0, sizeof(f))
    for chunk in chunks:
        r = fastws_ws_feed(&f, <const uint8_t *>PyBytes_AS_STRING(chunk),
                           <size_t>PyBytes_GET_SIZE(chunk), from_client, max_message)
        if r:
            break
    return {"messages": f.messages, "frames": f.frames,
            "close_code": f.close_code if f.close_code else None,
            "error": r or None, "boundary": f.left == 0 and f.hlen == 0,
            "in_message": bool(f.in_msg)}
