# Chunked bodies (RFC 9112 section 7.1): read strictly and rewritten in place, re-framed for
# the peer (or unchunked for an HTTP/1.0 client).  The head parser is engine/parse.pxi.

# --- chunked bodies -----------------------------------------------------------------------

cdef enum:
    MAX_CHUNK_LINE = 4096       # bytes of a size or trailer line before its LF
    MAX_TRAILERS = 16384        # bytes of the trailer section

    # Chunked.state: the size line (RFC 9112 7.1.1 chunk-ext: [ BWS ";" BWS token
    # [ BWS "=" BWS ( token / quoted-string ) ] ]*, as http1._CHUNK_EXT read it)
    CH_SIZE = 0                 # a line's first byte: a hex digit
    CH_DIGITS                   # in the chunk-size
    CH_SIZE_WS                  # SP / HTAB after it: ";" must follow
    CH_EXT                      # after ";": a name, after SP / HTAB
    CH_EXT_NAME
    CH_EXT_NAME_WS              # SP / HTAB after a name: "=" or ";"
    CH_EXT_VALUE                # after "=": a token or a quoted-string, after SP / HTAB
    CH_EXT_TOKEN
    CH_EXT_QUOTED
    CH_EXT_QPAIR                # after a backslash in a quoted-string
    CH_EXT_CLOSED               # after the closing quote
    CH_EXT_VALUE_WS             # SP / HTAB after a value: ";" must follow
    CH_SIZE_LF                  # the size line's CR read
    CH_DATA
    CH_DATA_CR
    CH_DATA_LF
    CH_TRAILER                  # a trailer line's first byte, or the last CRLF
    CH_TRAILER_NAME
    CH_TRAILER_VALUE
    CH_TRAILER_LF
    CH_END_LF
    CH_DONE


cdef void chunked_init(Chunked *c, int rechunk) noexcept nogil:
    memset(c, 0, sizeof(Chunked))
    c.state = CH_SIZE
    c.rechunk = rechunk


cdef inline Py_ssize_t _chunk_error(Chunked *c, const char *why, Py_ssize_t p,
                                    Py_ssize_t *consumed) noexcept nogil:
    c.error = why
    consumed[0] = p
    return -1


cdef Py_ssize_t chunked_feed(Chunked *c, char *buf, Py_ssize_t n, Py_ssize_t *consumed) noexcept nogil:
    # Read buf[:n] of a chunked body and rewrite it in place: return how many bytes to pass on,
    # left at the start of buf, or -1 (c.error says why).  *consumed is how much of buf the
    # body took: n, or less once c.done (the rest is what follows the body).
    #
    # With rechunk the output is the chunks re-framed, "%x\r\n" data "\r\n" ... "0\r\n\r\n"
    # (http1.Chunked's), extensions and trailers dropped; without, the bare data.  Why it fits
    # in place: the output is written as the input is read, and each byte read puts out at most
    # one byte (a significant size digit, lower-cased; a CR or LF of a size line, of the CRLF
    # after data, of the last empty line; a data byte), written at w <= p, the offset of that
    # input byte.  Leading zeros, spaces, extensions and trailers put out nothing.  The one
    # output byte with no input byte of its own is the "0" of an all-zero size: it is put out
    # where its digits end, in the room left by those zero digits read in the same call (so
    # w < p there), or, when the digits run to the end of a read, at that end in the same room;
    # a later digit is then put out after it (a leading "0": still a valid chunk-size).  So the
    # output never overtakes the input, and a size line split across reads needs no copy.
    cdef Py_ssize_t p = 0, w = 0, k
    cdef unsigned char ch
    cdef int st = c.state, v
    cdef bint re = c.rechunk
    if st == CH_DONE:
        consumed[0] = 0
        return 0
    while p < n:
        if st == CH_DATA:
            k = n - p
            if k > c.left:
                k = <Py_ssize_t>c.left
            if w != p:
                memmove(buf + w, buf + p, <size_t>k)
            w += k
            p += k
            c.left -= k
            c.total += k
            if c.left == 0:
                st = CH_DATA_CR
            continue
        ch = <unsigned char>buf[p]
        p += 1
        if st == CH_DATA_CR or st == CH_DATA_LF:
            if ch != (_CR if st == CH_DATA_CR else _LF):
                return _chunk_error(c, b"no CRLF after chunk data", p, consumed)
            if re:
                buf[w] = ch
                w += 1
            st = CH_DATA_LF if st == CH_DATA_CR else CH_SIZE
            continue
        # a size or trailer line
        if ch == _LF:
            if st != CH_SIZE_LF and st != CH_TRAILER_LF and st != CH_END_LF:
                return _chunk_error(c, b"bare LF in a chunk line", p, consumed)
            if re and st != CH_TRAILER_LF:
                buf[w] = ch
                w += 1
            if st == CH_SIZE_LF:
                st = CH_DATA if c.left else CH_TRAILER
            elif st == CH_TRAILER_LF:
                # http1.Chunked counted len(line) + 2; c.line has the line and its CR
                c.trailers += c.line + 1
                if c.trailers > MAX_TRAILERS:
                    return _chunk_error(c, b"trailer section too large", p, consumed)
                st = CH_TRAILER
            else:
                st = CH_DONE
            c.line = 0
            if st == CH_DONE:
                c.state = CH_DONE
                c.done = 1
                consumed[0] = p
                return w
            continue
        c.line += 1
        if c.line > MAX_CHUNK_LINE:
            return _chunk_error(c, b"chunk line too long", p, consumed)
        if st == CH_SIZE or st == CH_DIGITS:
            if _cc[ch] & _C_HEX:
                if st == CH_SIZE:
                    st = CH_DIGITS
                    c.left = 0
                    c.digits = 0
                    c.sig = 0
                    c.zero = 0
                c.digits += 1
                if c.digits > 15:
                    return _chunk_error(c, b"bad chunk size", p, consumed)
                v = ch - 48 if ch <= 57 else _lower(ch) - 87
                c.left = c.left * 16 + v
                if re and (v or c.sig):
                    buf[w] = _lower(ch)
                    w += 1
                    c.sig = 1
                continue
            if st == CH_SIZE:
                return _chunk_error(c, b"bad chunk size", p, consumed)
            if ch != c';' and ch != _SP and ch != _HT and ch != _CR:
                return _chunk_error(c, b"bad chunk size", p, consumed)
            if re and not c.sig and not c.zero:
                buf[w] = c'0'
                w += 1
            if ch == c';':
                st = CH_EXT
            elif ch == _CR:
                st = CH_SIZE_LF
                if re:
                    buf[w] = ch
                    w += 1
            else:
                st = CH_SIZE_WS
            continue
        if st == CH_TRAILER or st == CH_TRAILER_NAME:
            if _cc[ch] & _C_TCHAR:
                st = CH_TRAILER_NAME
            elif st == CH_TRAILER and ch == _CR:
                st = CH_END_LF
                if re:
                    buf[w] = ch
                    w += 1
            elif st == CH_TRAILER_NAME and ch == c':':
                st = CH_TRAILER_VALUE
            else:
                return _chunk_error(c, b"bad trailer field", p, consumed)
            continue
        if st == CH_TRAILER_VALUE:
            if ch == _CR:
                st = CH_TRAILER_LF
            elif not _cc[ch] & _C_VALUE:
                return _chunk_error(c, b"bad trailer field", p, consumed)
            continue
        if st == CH_SIZE_LF or st == CH_TRAILER_LF or st == CH_END_LF:
            return _chunk_error(c, b"CR without LF in a chunk line", p, consumed)
        # chunk extensions
        if ch == _CR and (st == CH_EXT_NAME or st == CH_EXT_TOKEN or st == CH_EXT_CLOSED):
            st = CH_SIZE_LF
            if re:
                buf[w] = ch
                w += 1
        elif st == CH_EXT_QUOTED:
            if ch == c'"':
                st = CH_EXT_CLOSED
            elif ch == c'\\':
                st = CH_EXT_QPAIR
            elif not _cc[ch] & _C_VALUE:
                return _chunk_error(c, b"bad chunk extension", p, consumed)
        elif st == CH_EXT_QPAIR:
            if not _cc[ch] & _C_VALUE:
                return _chunk_error(c, b"bad chunk extension", p, consumed)
            st = CH_EXT_QUOTED
        elif ch == _SP or ch == _HT:
            if st == CH_EXT_NAME:
                st = CH_EXT_NAME_WS
            elif st == CH_EXT_TOKEN or st == CH_EXT_CLOSED:
                st = CH_EXT_VALUE_WS
        elif ch == c';' and st != CH_EXT and st != CH_EXT_VALUE:
            st = CH_EXT
        elif ch == c'=' and (st == CH_EXT_NAME or st == CH_EXT_NAME_WS):
            st = CH_EXT_VALUE
        elif _cc[ch] & _C_TCHAR and (st == CH_EXT or st == CH_EXT_NAME or st == CH_EXT_VALUE
                                      or st == CH_EXT_TOKEN):
            st = CH_EXT_TOKEN if st == CH_EXT_VALUE or st == CH_EXT_TOKEN else CH_EXT_NAME
        elif ch == c'"' and st == CH_EXT_VALUE:
            st = CH_EXT_QUOTED
        else:
            return _chunk_error(c, b"bad chunk extension", p, consumed)
    if st == CH_DIGITS and re and not c.sig and not c.zero:
        # the "0" of a size whose zero digits end this read (see above)
        buf[w] = c'0'
        w += 1
        c.zero = 1
    c.state = st
    consumed[0] = n
    return w


# --- Python-facing API, for tests and debugging ------------------------------------------

class ChunkError(Exception):
    """A refused chunked body: `reason`, and `index`, the piece being read when it was."""

    def __init__(self, reason: str, index: int) -> None:
        super().__init__(reason, index)
        self.reason = reason
        self.index = index


cdef str _why(const char *error):
    return error.decode() if error != NULL else ""


cdef list _headers_of(Head *h):
    cdef int i
    cdef Header *x
    cdef list out = []
    for i in range(h.nheaders):
        x = &h.headers[i]
        out.append((h.base[x.name.off:x.name.off + x.name.len],
                    h.base[x.value.off:x.value.off + x.value.len]))
    return out


def dechunk(pieces, bint rechunk=True):
    """Feed the byte strings of `pieces`, each rewritten in place as the engine's read buffer
    is: (output, done, extra), extra being what followed the body; raises ChunkError."""
    cdef Chunked c
    cdef bytearray piece
    cdef Py_ssize_t r, used
    cdef list out = []
    pieces = list(pieces)
    chunked_init(&c, rechunk)
    for index, data in enumerate(pieces):
        piece = bytearray(data)
        r = chunked_feed(&c, <char *>piece, len(piece), &used)
        if r < 0:
            raise ChunkError(_why(c.error), index)
        out.append(bytes(piece[:r]))
        if c.done:
            return b"".join(out), True, bytes(piece[used:]) + b"".join(pieces[index + 1:])
    return b"".join(out), False, b""
