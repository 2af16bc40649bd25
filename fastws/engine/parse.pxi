# HTTP/1.1 heads: the one strict parser of request and response heads, in C over the bytes as
# they were read (chunked bodies: engine/chunked.pxi).
#
# What it accepts is what fastws accepted when heads went through httptools, that is llhttp
# 9.4.3 in its strict default mode (no lenient flag set), plus fastws's own checks; each
# function below names the llhttp node (src/llhttp/http.ts, url.ts) or check it mirrors.  A
# head is refused when:
# - the request line is not `method SP+ target SP+ protocol/d.d CRLF`: the method one of
#   llhttp's (case-sensitive), the target in llhttp's URL grammar (origin-, absolute-,
#   authority-form for CONNECT, "*"; no byte above 0x7E, no control byte), the version one
#   of 0.9, 1.0, 1.1, 2.0 (llhttp), then 1.0 or 1.1 only (HTTP/2.0 gets 505);
# - a line ends in a bare LF or a bare CR, a header is folded (obs-fold), a name is empty or
#   holds a byte that is not a token byte (whitespace before the colon included), a value
#   holds a control byte other than HTAB (NUL, CR and LF included) or DEL;
# - Content-Length is repeated, empty, not digits, or above 2^64-1; Transfer-Encoding is
#   empty, sent with Content-Length, or (requests) names a coding after chunked or ends in
#   another coding, unless the request is an upgrade (RFC 9112 6.1 and 6.3: nothing may be
#   read two ways);
# - (requests) Host is missing in HTTP/1.1, repeated, or not an RFC 3986 host[:port];
# - (responses) a 101 lacks Upgrade or Connection: upgrade;
# - the request line is longer than max_line (414).
# nginx refuses the same framing conflicts (ngx_http_process_request_header: Content-Length
# with Transfer-Encoding, a duplicate Content-Length) and skips CR and LF before a request
# line (ngx_http_parse_request_line, sw_start), as llhttp does and RFC 9112 2.2 advises.
# HAProxy (h1.c, h1_headers_to_hdr_list) refuses the same bytes in names and trims the
# whitespace around a value, as Head's spans do; it is laxer in values (NUL, CR, LF only).
# Where llhttp accepts something odd (RTSP/ and ICE/ protocol names, HTTP/0.9 and HTTP/2.0
# status lines, any byte in a reason phrase), so does this parser: today's behaviour, kept.
#
# A head arrives whole: head_end finds its end (the first empty line, CRLF or bare LF), the
# caller applies its size limit (431), and parse_request / parse_response read it in one pass.
# While it is incomplete, request_line_check refuses a bad or over-long request line at once.

from libc.string cimport memmove

cdef enum:
    _HT = 9
    _LF = 10
    _FF = 12
    _CR = 13
    _SP = 32

    # byte classes (_cc)
    _C_TCHAR = 1        # token byte (RFC 9110 5.6.2; llhttp's TOKEN)
    _C_URL = 2          # llhttp's URL_CHAR: what a path, query or fragment may hold
    _C_SERVER = 4       # llhttp's USERINFO_CHARS plus "[" "]": what a target's authority may hold
    _C_VALUE = 8        # HTAB, SP, VCHAR, obs-text: a field value's bytes (llhttp's HEADER_CHARS)
    _C_HEX = 16
    _C_ALPHA = 32
    _C_DIGIT = 64
    _C_HOST = 128       # RFC 3986 unreserved and sub-delims: a reg-name's bytes besides "%"

    # protocols a method may come with (llhttp's METHODS_HTTP, METHODS_RTSP, METHODS_ICECAST)
    _P_HTTP = 1
    _P_RTSP = 2
    _P_ICE = 4
    _P_PRI = 8          # PRI: only ever the start of the HTTP/2 preface (refused)
    _METHOD_MAX = 13    # GET_PARAMETER, SET_PARAMETER

    # llhttp's F_* flags that decide whether a head is accepted
    _F_CONNECTION_UPGRADE = 1
    _F_UPGRADE = 2
    _F_CHUNKED = 4
    _F_CONTENT_LENGTH = 8
    _F_TRANSFER_ENCODING = 16

    # target states (llhttp url.ts nodes)
    _U_SCHEMA = 0
    _U_SLASH1
    _U_SLASH2
    _U_SERVER
    _U_SERVER_AT
    _U_PATH
    _U_QUERY
    _U_FRAGMENT

cdef unsigned char _cc[256]

cdef struct _MethodName:
    const char *name
    int len
    int method          # Method
    int protocols       # _P_*

cdef struct _KindName:
    const char *name    # lower case
    int len
    int kind            # HeaderKind

# Most frequent first: the lookup is a scan.
cdef tuple _METHOD_NAMES = (
    (b"GET", M_GET, _P_HTTP | _P_RTSP), (b"POST", M_POST, _P_HTTP | _P_RTSP),
    (b"HEAD", M_HEAD, _P_HTTP), (b"PUT", M_PUT, _P_HTTP), (b"DELETE", M_DELETE, _P_HTTP),
    (b"OPTIONS", M_OPTIONS, _P_HTTP | _P_RTSP), (b"PATCH", M_PATCH, _P_HTTP),
    (b"CONNECT", M_CONNECT, _P_HTTP), (b"TRACE", M_TRACE, _P_HTTP),
    (b"COPY", M_OTHER, _P_HTTP), (b"LOCK", M_OTHER, _P_HTTP), (b"MKCOL", M_OTHER, _P_HTTP),
    (b"MOVE", M_OTHER, _P_HTTP), (b"PROPFIND", M_OTHER, _P_HTTP),
    (b"PROPPATCH", M_OTHER, _P_HTTP), (b"SEARCH", M_OTHER, _P_HTTP),
    (b"UNLOCK", M_OTHER, _P_HTTP), (b"BIND", M_OTHER, _P_HTTP), (b"REBIND", M_OTHER, _P_HTTP),
    (b"UNBIND", M_OTHER, _P_HTTP), (b"ACL", M_OTHER, _P_HTTP), (b"REPORT", M_OTHER, _P_HTTP),
    (b"MKACTIVITY", M_OTHER, _P_HTTP), (b"CHECKOUT", M_OTHER, _P_HTTP),
    (b"MERGE", M_OTHER, _P_HTTP), (b"M-SEARCH", M_OTHER, _P_HTTP),
    (b"NOTIFY", M_OTHER, _P_HTTP), (b"SUBSCRIBE", M_OTHER, _P_HTTP),
    (b"UNSUBSCRIBE", M_OTHER, _P_HTTP), (b"PURGE", M_OTHER, _P_HTTP),
    (b"MKCALENDAR", M_OTHER, _P_HTTP), (b"LINK", M_OTHER, _P_HTTP),
    (b"UNLINK", M_OTHER, _P_HTTP), (b"QUERY", M_OTHER, _P_HTTP),
    (b"SOURCE", M_OTHER, _P_HTTP | _P_ICE), (b"PRI", M_OTHER, _P_HTTP | _P_PRI),
    (b"DESCRIBE", M_OTHER, _P_RTSP), (b"ANNOUNCE", M_OTHER, _P_RTSP),
    (b"SETUP", M_OTHER, _P_RTSP), (b"PLAY", M_OTHER, _P_RTSP), (b"PAUSE", M_OTHER, _P_RTSP),
    (b"TEARDOWN", M_OTHER, _P_RTSP), (b"GET_PARAMETER", M_OTHER, _P_RTSP),
    (b"SET_PARAMETER", M_OTHER, _P_RTSP), (b"REDIRECT", M_OTHER, _P_RTSP),
    (b"RECORD", M_OTHER, _P_RTSP), (b"FLUSH", M_OTHER, _P_RTSP),
)
cdef tuple _KIND_NAMES = (
    (b"host", H_HOST), (b"connection", H_CONNECTION), (b"upgrade", H_UPGRADE),
    (b"content-length", H_CONTENT_LENGTH), (b"transfer-encoding", H_TRANSFER_ENCODING),
    (b"expect", H_EXPECT), (b"keep-alive", H_KEEP_ALIVE),
    (b"proxy-connection", H_PROXY_CONNECTION), (b"te", H_TE), (b"trailer", H_TRAILER),
    (b"x-forwarded-for", H_X_FORWARDED_FOR), (b"x-real-ip", H_X_REAL_IP),
    (b"x-forwarded-proto", H_X_FORWARDED_PROTO), (b"sec-websocket-key", H_SEC_WEBSOCKET_KEY),
    (b"sec-websocket-version", H_SEC_WEBSOCKET_VERSION),
    (b"sec-websocket-accept", H_SEC_WEBSOCKET_ACCEPT), (b"cookie", H_COOKIE),
    (b"authorization", H_AUTHORIZATION),
)
cdef _MethodName _methods[48]
cdef int _nmethods = 0
cdef _KindName _kinds[<int>H_COUNT]
cdef int _nkinds = 0


cdef void _classes(const char *chars, unsigned char cls) noexcept:
    cdef Py_ssize_t i = 0
    while chars[i]:
        _cc[<unsigned char>chars[i]] |= cls
        i += 1


cdef int _init_parse_tables() except -1:
    cdef int c
    cdef bytes name
    global _nmethods, _nkinds
    memset(_cc, 0, sizeof(_cc))
    for c in range(256):
        if 65 <= c <= 90 or 97 <= c <= 122:
            _cc[c] |= _C_ALPHA | _C_TCHAR | _C_URL | _C_SERVER | _C_HOST
        if 48 <= c <= 57:
            _cc[c] |= _C_DIGIT | _C_HEX | _C_TCHAR | _C_URL | _C_SERVER | _C_HOST
        if 65 <= c <= 70 or 97 <= c <= 102:
            _cc[c] |= _C_HEX
        if c == _HT or 32 <= c <= 126 or c >= 128:
            _cc[c] |= _C_VALUE
    _classes(b"!#$%&'*+-.^_`|~", _C_TCHAR)
    _classes(b"!\"$%&'()*+,-./:;<=>@[\\]^_`{|}~", _C_URL)
    _classes(b"-_.!~*'()%;:&=+$,[]", _C_SERVER)
    _classes(b"-._~!$&'()*+,;=", _C_HOST)
    if len(_METHOD_NAMES) > <Py_ssize_t>(sizeof(_methods) // sizeof(_MethodName)):
        raise AssertionError("_methods is too small for _METHOD_NAMES")
    for name, method, protocols in _METHOD_NAMES:
        _methods[_nmethods].name = name          # the tuple keeps the bytes alive
        _methods[_nmethods].len = len(name)
        _methods[_nmethods].method = method
        _methods[_nmethods].protocols = protocols
        _nmethods += 1
    for name, kind in _KIND_NAMES:
        _kinds[_nkinds].name = name
        _kinds[_nkinds].len = len(name)
        _kinds[_nkinds].kind = kind
        _nkinds += 1
    return 0

_init_parse_tables()


cdef inline unsigned char _lower(unsigned char c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef bint _lower_eq(const char *s, const char *lower, int n) noexcept nogil:
    # ASCII case-insensitive comparison with a lower-case literal (no locale: strncasecmp's
    # tolower may fold bytes above 0x7F in some locales)
    cdef int i
    for i in range(n):
        if _lower(<unsigned char>s[i]) != <unsigned char>lower[i]:
            return False
    return True


cdef const _MethodName *_method(const char *s, int n) noexcept nogil:
    cdef int i
    for i in range(_nmethods):
        if _methods[i].len == n and memcmp(s, _methods[i].name, n) == 0:
            return &_methods[i]
    return NULL


cdef bint _method_prefix(const char *s, int n) noexcept nogil:
    cdef int i
    for i in range(_nmethods):
        if _methods[i].len >= n and memcmp(s, _methods[i].name, n) == 0:
            return True
    return False


cdef int _header_kind(const char *name, int n) noexcept nogil:
    cdef int i
    for i in range(_nkinds):
        if _kinds[i].len == n and _lower_eq(name, _kinds[i].name, n):
            return _kinds[i].kind
    return H_OTHER


cdef inline int _fail(Head *h, const char *why) noexcept nogil:
    h.error = why
    return -1


cdef inline int _more(Head *h, bint partial) noexcept nogil:
    # The bytes ended inside the line: fine while a head is still arriving, not once it is whole.
    if partial:
        return 0
    h.error = b"incomplete start line"
    return -1


cdef inline bint _starts(const char *s, int avail, const char *lit, int n) noexcept nogil:
    # Do the `avail` bytes at s begin `lit` (of n bytes)?  (a partial match keeps llhttp waiting)
    return memcmp(s, lit, avail if avail < n else n) == 0


# --- the end of a head -------------------------------------------------------------------

cdef Py_ssize_t head_end(const char *buf, Py_ssize_t start, Py_ssize_t length) noexcept nogil:
    # The offset just past the empty line that ends a head, or -1.  A line ends at LF, so an
    # empty line is LF LF or LF CR LF: a head written with bare LFs ends here too and is handed
    # to the parser, which refuses it, instead of waiting for a CRLF CRLF that never comes.  A
    # caller rescanning after more bytes arrived passes the previous length minus 3.
    cdef const char *p
    cdef Py_ssize_t j
    if start < 0:
        start = 0
    while start < length:
        p = <const char *>memchr(buf + start, _LF, <size_t>(length - start))
        if p == NULL:
            return -1
        j = p - buf
        if j + 1 < length and buf[j + 1] == _LF:
            return j + 2
        if j + 2 < length and buf[j + 1] == _CR and buf[j + 2] == _LF:
            return j + 3
        start = j + 1
    return -1


# --- start lines --------------------------------------------------------------------------

cdef int _version(Head *h, const char *b, int i, int n, bint partial) noexcept nogil:
    # "/" DIGIT "." DIGIT after the protocol name, checked byte by byte as llhttp does; it
    # (checkVersion) takes 0.9, 1.0, 1.1 and 2.0 only.  The offset past it, 0 (partial) or -1.
    cdef int k, v
    cdef unsigned char c
    cdef bint ok
    for k in range(4):
        if i + k == n:
            return _more(h, partial)
        c = <unsigned char>b[i + k]
        if k == 0:
            ok = c == c'/'
        elif k == 2:
            ok = c == c'.'
        else:
            ok = _cc[c] & _C_DIGIT != 0
        if not ok:
            return _fail(h, b"invalid HTTP version")
    v = (b[i + 1] - 48) * 10 + b[i + 3] - 48
    if v != 9 and v != 10 and v != 11 and v != 20:
        return _fail(h, b"invalid HTTP version")
    h.version = v
    return i + 4


cdef int _protocol(const char *b, int i, int n) noexcept nogil:
    # llhttp's req_after_http_start / res_after_start: which protocol name is at b[i:]
    # (_P_*, its length in the upper bits), 0 for a prefix of one, -1 for none
    cdef int avail = n - i
    if avail >= 4 and memcmp(b + i, b"HTTP", 4) == 0:
        return _P_HTTP | (4 << 8)
    if avail >= 4 and memcmp(b + i, b"RTSP", 4) == 0:
        return _P_RTSP | (4 << 8)
    if avail >= 3 and memcmp(b + i, b"ICE", 3) == 0:
        return _P_ICE | (3 << 8)
    if (avail < 4 and (_starts(b + i, avail, b"HTTP", 4) or _starts(b + i, avail, b"RTSP", 4))) \
            or (avail < 3 and _starts(b + i, avail, b"ICE", 3)):
        return 0
    return -1


cdef int _request_line(Head *h, const char *b, int n, bint partial) noexcept nogil:
    # The request line at the start of b[:n]: the offset just past it, 0 when `partial` and the
    # bytes end before it does, or -1 with h.error set.  A port of llhttp's start_req ..
    # req_http_complete nodes and url.ts, in their order, so that it refuses what they refuse
    # and at the same byte (request_line_check relies on that).
    cdef int i = 0, m0, t0, state, proto
    cdef const _MethodName *m
    cdef unsigned char c
    # llhttp's start node: CR and LF before a message are skipped
    while i < n and (b[i] == _CR or b[i] == _LF):
        i += 1
    m0 = i
    while i < n and b[i] != _SP and i - m0 < _METHOD_MAX:
        i += 1
    if i == n:
        if partial and _method_prefix(b + m0, i - m0):
            return 0
        return _fail(h, b"invalid method")
    m = _method(b + m0, i - m0) if b[i] == _SP else NULL
    if m == NULL:
        return _fail(h, b"invalid method")
    h.method_name.off = m0
    h.method_name.len = i - m0
    h.method = m.method
    # req_first_space_before_url, req_spaces_before_url: one space or more
    i += 1
    while i < n and b[i] == _SP:
        i += 1
    if i == n:
        return _more(h, partial)
    t0 = i
    if h.method == M_CONNECT:
        state = _U_SERVER           # url entry_connect: the authority-form
    else:
        c = <unsigned char>b[i]
        if c == c'/' or c == c'*':
            state = _U_PATH
        elif _cc[c] & _C_ALPHA:
            state = _U_SCHEMA
        else:
            return _fail(h, b"invalid request target")
        i += 1
    while True:
        if i == n:
            return _more(h, partial)
        c = <unsigned char>b[i]
        if state == _U_PATH:
            if _cc[c] & _C_URL:
                i += 1
                continue
            if c == c'?':
                state = _U_QUERY
            elif c == c'#':
                state = _U_FRAGMENT
            else:
                break
        elif state == _U_QUERY:
            if _cc[c] & _C_URL or c == c'?':
                i += 1
                continue
            if c == c'#':
                state = _U_FRAGMENT
            else:
                break
        elif state == _U_FRAGMENT:
            if _cc[c] & _C_URL or c == c'?' or c == c'#':
                i += 1
                continue
            break
        elif state == _U_SERVER or state == _U_SERVER_AT:
            # url_server / url_server_with_at: only "@@" is refused ("Double @ in url"): any
            # authority byte after an "@" goes back to url_server
            if _cc[c] & _C_SERVER:
                state = _U_SERVER
            elif c == c'/':
                state = _U_PATH
            elif c == c'?':
                state = _U_QUERY
            elif c == c'@':
                if state == _U_SERVER_AT:
                    return _fail(h, b"invalid request target")
                state = _U_SERVER_AT
            else:
                break
        elif state == _U_SCHEMA:
            if c == c':':
                state = _U_SLASH1
            elif not _cc[c] & _C_ALPHA:
                return _fail(h, b"invalid request target")
        else:
            # schema_delim: "//"
            if c != c'/':
                return _fail(h, b"invalid request target")
            state = _U_SLASH2 if state == _U_SLASH1 else _U_SERVER
        i += 1
    h.target.off = t0
    h.target.len = i - t0
    if c == _CR or c == _LF:
        # A target ended by the line's end: an HTTP/0.9 request (url.ts skip_lf_to_http09),
        # refused later by the version rule, but read to the end as llhttp reads it.
        if c == _CR:
            if i + 1 == n:
                return _more(h, partial)
            if b[i + 1] != _LF:
                return _fail(h, b"invalid request target")
            i += 1
        # (llhttp's to_http_09 then refuses an HTAB or FF; so does _fields, as a bad name.)
        h.version = 9
        return i + 1
    if c != _SP:
        return _fail(h, b"invalid request target")
    # req_http_start: spaces, then the protocol
    i += 1
    while i < n and b[i] == _SP:
        i += 1
    if i == n:
        return _more(h, partial)
    proto = _protocol(b, i, n)
    if proto == 0:
        return _more(h, partial)
    if proto < 0:
        return _fail(h, b"invalid protocol")
    if not m.protocols & proto & 0xff:
        return _fail(h, b"invalid method for the protocol")        # llhttp checkMethod
    i = _version(h, b, i + (proto >> 8), n, partial)
    if i <= 0:
        return i
    if m.protocols & _P_PRI:
        # req_pri_upgrade: the HTTP/2 connection preface, which httptools reports as an error
        if _starts(b + i, n - i, b"\r\n\r\nSM\r\n\r\n", 10) and n - i < 10 and partial:
            return 0
        return _fail(h, b"HTTP/2 connection preface")
    # req_http_complete: CRLF, nothing else (not even a space)
    if i == n:
        return _more(h, partial)
    if b[i] != _CR:
        return _fail(h, b"expected CRLF after the version")
    if i + 1 == n:
        return _more(h, partial)
    if b[i + 1] != _LF:
        return _fail(h, b"expected CRLF after the version")
    return i + 2


cdef int _status_line(Head *h, const char *b, int n, bint partial) noexcept nogil:
    # The status line at the start of b[:n] (llhttp's start_res .. res_line_almost_done): the
    # offset just past it, 0 when `partial` and the bytes end first, or -1 with h.error set.
    cdef int i = 0, k, proto, r0
    cdef unsigned char c
    while i < n and (b[i] == _CR or b[i] == _LF):
        i += 1
    if i == n:
        return _more(h, partial)
    proto = _protocol(b, i, n)
    if proto == 0:
        return _more(h, partial)
    if proto < 0:
        return _fail(h, b"invalid protocol")
    i = _version(h, b, i + (proto >> 8), n, partial)
    if i <= 0:
        return i
    # res_after_version: one space, then res_status_code_digit_1..3
    for k in range(4):
        if i + k == n:
            return _more(h, partial)
        c = <unsigned char>b[i + k]
        if not (c == _SP if k == 0 else _cc[c] & _C_DIGIT != 0):
            return _fail(h, b"invalid status")
    h.status = (b[i + 1] - 48) * 100 + (b[i + 2] - 48) * 10 + b[i + 3] - 48
    i += 4
    if i == n:
        return _more(h, partial)
    r0 = i
    if b[i] == _SP:
        # res_status: the reason phrase is any bytes up to CR (llhttp checks none of them)
        i += 1
        r0 = i
        while i < n and b[i] != _CR and b[i] != _LF:
            i += 1
    h.reason.off = r0
    h.reason.len = i - r0
    if i == n:
        return _more(h, partial)
    if b[i] != _CR:
        return _fail(h, b"invalid status line end")
    if i + 1 == n:
        return _more(h, partial)
    if b[i + 1] != _LF:
        return _fail(h, b"invalid status line end")
    return i + 2


# --- field lines --------------------------------------------------------------------------

cdef int _content_length_value(const char *v, int n) noexcept nogil:
    # llhttp's header_value_content_length: digits (their value at most 2^64-1, the overflow
    # test of llparse's mulAdd), then only SP or HTAB.  0, or -1.
    cdef unsigned long long x = 0, d
    cdef int i = 0
    while i < n and _cc[<unsigned char>v[i]] & _C_DIGIT:
        d = <unsigned long long>(v[i] - 48)
        if x > 0xffffffffffffffffULL // 10:
            return -1
        x *= 10
        if x > 0xffffffffffffffffULL - d:
            return -1
        x += d
        i += 1
    if i == 0:
        return -1
    while i < n and (v[i] == _SP or v[i] == _HT):
        i += 1
    return 0 if i == n else -1


cdef int _te_chunked(const char *v, int n, bint request) noexcept nogil:
    # llhttp's header_value_te_* nodes: 1 when the codings end with "chunked" (F_CHUNKED),
    # 0 when they do not, -1 when a request names a coding after chunked (RFC 9112 6.1:
    # chunked is applied last, once).  Note llhttp's own reading: only spaces may follow the
    # last "chunked" ("chunked\t" is not chunked).
    cdef int i = 0, j
    while True:
        if n - i >= 7 and _lower_eq(v + i, b"chunked", 7):
            j = i + 7
            while j < n and v[j] == _SP:
                j += 1
            if j == n:
                return 1
            if v[j] == c',' and request:
                return -1
            i = j
        while i < n and v[i] != c',':
            i += 1
        if i == n:
            return 0
        i += 1
        while i < n and (v[i] == _SP or v[i] == _HT):
            i += 1


cdef bint _connection_upgrade(const char *v, int n) noexcept nogil:
    # llhttp's header_value_connection nodes: is "upgrade" one of the tokens
    # (F_CONNECTION_UPGRADE, which with an Upgrade header makes llhttp's `upgrade`)?
    cdef int i = 0, j, k
    cdef bint found = False, up
    while True:
        while i < n and (v[i] == _SP or v[i] == _HT):
            i += 1
        up = n - i >= 7 and _lower_eq(v + i, b"upgrade", 7)
        if up:
            k = 7
        elif n - i >= 5 and _lower_eq(v + i, b"close", 5):
            k = 5
        elif n - i >= 10 and _lower_eq(v + i, b"keep-alive", 10):
            k = 10
        else:
            k = 0
        if k:
            j = i + k
            while j < n and (v[j] == _SP or v[j] == _HT):
                j += 1
            if j == n or v[j] == c',':
                found = found or up
            i = j
        while i < n and v[i] != c',':
            i += 1
        if i == n:
            return found
        i += 1


cdef int _add_header(Head *h, int n0, int nlen, int v0, int vlen, int kind) noexcept nogil:
    cdef Header *grown
    cdef Header *x
    cdef int cap
    if h.nheaders == h.cap:
        cap = h.cap * 2 if h.cap else 32
        grown = <Header *>realloc(h.headers, cap * sizeof(Header))
        if grown == NULL:
            h.error = b"out of memory"
            return -1
        h.headers = grown
        h.cap = cap
    x = &h.headers[h.nheaders]
    x.name.off = n0
    x.name.len = nlen
    x.value.off = v0
    x.value.len = vlen
    x.kind = kind
    if h.count[kind] == 0:
        h.first[kind] = h.nheaders
    h.count[kind] += 1
    h.nheaders += 1
    return 0


cdef int _fields(Head *h, const char *b, int i, int n, bint request) noexcept nogil:
    # The field lines from b[i] to the empty line ending the head at n (llhttp's headers_start
    # .. headers_almost_done and after_headers_complete): 0, -1 with h.error set, -2 when out of
    # memory.
    cdef int flags = 0, n0, nlen, v0, vend, kind, r
    cdef unsigned char c
    cdef bint upgrade
    if i < n and b[i] == _SP:
        return _fail(h, b"space before the first header")        # headers_start
    while True:
        if i >= n:
            return _fail(h, b"incomplete head")
        c = <unsigned char>b[i]
        if c == _CR:
            if i + 1 < n and b[i + 1] == _LF:
                i += 2
                break
            return _fail(h, b"expected LF after CR")
        n0 = i
        while i < n and _cc[<unsigned char>b[i]] & _C_TCHAR:
            i += 1
        if i == n0 or i == n or b[i] != c':':
            # an empty name, whitespace before the colon, a bare LF, any byte not a token's
            return _fail(h, b"invalid header name")
        nlen = i - n0
        kind = _header_kind(b + n0, nlen)
        # checkInvalidTransferEncoding / checkInvalidContentLength, at the name
        if kind == H_TRANSFER_ENCODING and flags & _F_CONTENT_LENGTH or \
                kind == H_CONTENT_LENGTH and flags & _F_TRANSFER_ENCODING:
            return _fail(h, b"both Content-Length and Transfer-Encoding")
        i += 1
        while i < n and (b[i] == _SP or b[i] == _HT):
            i += 1
        v0 = i
        while i < n and _cc[<unsigned char>b[i]] & _C_VALUE:
            i += 1
        if i + 1 >= n or b[i] != _CR or b[i + 1] != _LF:
            # a control byte, DEL, a bare LF or a bare CR
            return _fail(h, b"invalid header value")
        vend = i
        i += 2
        if i < n and (b[i] == _SP or b[i] == _HT):
            return _fail(h, b"obsolete line folding")             # header_value_lws
        if vend == v0:
            if kind == H_CONTENT_LENGTH:
                return _fail(h, b"empty Content-Length")
            if kind == H_TRANSFER_ENCODING:
                return _fail(h, b"empty Transfer-Encoding")
        elif kind == H_CONTENT_LENGTH:
            if flags & _F_CONTENT_LENGTH:
                return _fail(h, b"several Content-Length headers")
            if _content_length_value(b + v0, vend - v0) < 0:
                return _fail(h, b"bad Content-Length")
            flags |= _F_CONTENT_LENGTH
        elif kind == H_TRANSFER_ENCODING:
            if request and flags & _F_CHUNKED:
                return _fail(h, b"a coding after chunked")
            r = _te_chunked(b + v0, vend - v0, request)
            if r < 0:
                return _fail(h, b"a coding after chunked")
            flags = (flags | _F_TRANSFER_ENCODING) & ~_F_CHUNKED
            if r:
                flags |= _F_CHUNKED
        elif kind == H_CONNECTION or kind == H_PROXY_CONNECTION:
            if _connection_upgrade(b + v0, vend - v0):
                flags |= _F_CONNECTION_UPGRADE
        elif kind == H_UPGRADE:
            flags |= _F_UPGRADE
        # RFC 9110 5.5: a field value does not include its surrounding whitespace (llhttp
        # drops only the leading one)
        while vend > v0 and (b[vend - 1] == _SP or b[vend - 1] == _HT):
            vend -= 1
        if _add_header(h, n0, nlen, v0, vend - v0, kind) < 0:
            return -2
    if i != n:
        return _fail(h, b"incomplete head")
    if not request and h.status == 101 and not (flags & _F_UPGRADE and flags & _F_CONNECTION_UPGRADE):
        # llhttp pauses after any 101, and httptools took that for an upgrade only with llhttp's
        # `upgrade` set, else for an error (RFC 9110 15.2.2: a 101 names the protocol it
        # switches to in Upgrade)
        return _fail(h, b"101 without Upgrade and Connection: upgrade")
    if request and flags & _F_TRANSFER_ENCODING and not flags & _F_CHUNKED:
        # llhttp's after_headers_complete returns 5 (RFC 9112 6.3: a request whose last coding
        # is not chunked has no length), unless httptools made it skip the body: an upgrade
        upgrade = (flags & _F_UPGRADE and flags & _F_CONNECTION_UPGRADE) or h.method == M_CONNECT
        if not upgrade:
            return _fail(h, b"Transfer-Encoding without chunked last")
    return 0


# --- Host ---------------------------------------------------------------------------------

cdef bint _ipv6(const char *s, int n) noexcept nogil:
    # RFC 3986 3.2.2 IPv6address: eight 16-bit groups, or fewer with one "::" standing for the
    # rest; the last two may be an IPv4address.
    cdef int i = 0, groups = 0, before = -1, k, j, octets, digits, value
    if n >= 2 and s[0] == c':' and s[1] == c':':
        before = 0
        i = 2
        if i == n:
            return True
    elif n >= 1 and s[0] == c':':
        return False
    while i < n:
        # one group: h16, or an IPv4address as the last piece
        k = i
        while k < n and _cc[<unsigned char>s[k]] & _C_HEX and k - i < 5:
            k += 1
        if k < n and s[k] == c'.':
            # dec-octet "." dec-octet "." dec-octet "." dec-octet
            octets = 0
            j = i
            while True:
                digits = 0
                value = 0
                while j < n and _cc[<unsigned char>s[j]] & _C_DIGIT and digits < 4:
                    value = value * 10 + s[j] - 48
                    digits += 1
                    j += 1
                if digits == 0 or digits > 3 or value > 255 or (digits > 1 and s[j - digits] == c'0'):
                    return False
                octets += 1
                if octets == 4:
                    break
                if j == n or s[j] != c'.':
                    return False
                j += 1
            if j != n:
                return False
            groups += 2
            break
        if k == i or k - i > 4:
            return False
        groups += 1
        i = k
        if i == n:
            break
        if s[i] != c':':
            return False
        i += 1
        if i < n and s[i] == c':':
            if before >= 0:
                return False                    # a second "::"
            before = groups
            i += 1
            if i == n:
                break
        elif i == n:
            return False                        # a single trailing ":"
    if before >= 0:
        return groups <= 7
    return groups == 8


cdef bint _ipvfuture(const char *s, int n) noexcept nogil:
    # "v" 1*HEXDIG "." 1*( unreserved / sub-delims / ":" )
    cdef int i = 1
    if n < 4 or _lower(<unsigned char>s[0]) != c'v':
        return False
    while i < n and _cc[<unsigned char>s[i]] & _C_HEX:
        i += 1
    if i == 1 or i >= n - 1 or s[i] != c'.':
        return False
    for i in range(i + 1, n):
        if not (_cc[<unsigned char>s[i]] & _C_HOST or s[i] == c':'):
            return False
    return True


cdef bint host_valid(const char *s, int n) noexcept nogil:
    # RFC 3986 3.2.2-3.2.3: IP-literal / IPv4address / reg-name, then [ ":" *DIGIT ] (RFC 9110
    # 7.2: uri-host [ ":" port ]).  An IPv4address is a reg-name too, so the rule is the
    # reg-name's: unreserved / pct-encoded / sub-delims.  Empty is allowed (RFC 9112 3.2).
    # Stricter than nginx's ngx_http_validate_host, which lets any byte above 0x20 through.
    cdef int i = 0
    cdef const char *close
    if n and s[0] == c'[':
        close = <const char *>memchr(s, c']', <size_t>n)
        if close == NULL or not (_ipv6(s + 1, <int>(close - s) - 1) or
                                 _ipvfuture(s + 1, <int>(close - s) - 1)):
            return False
        i = <int>(close - s) + 1
    else:
        while i < n and s[i] != c':':
            if _cc[<unsigned char>s[i]] & _C_HOST:
                i += 1
            elif s[i] == c'%' and i + 2 < n and _cc[<unsigned char>s[i + 1]] & _cc[<unsigned char>s[i + 2]] & _C_HEX:
                i += 3
            else:
                return False
    if i == n:
        return True
    if s[i] != c':':
        return False
    for i in range(i + 1, n):
        if not _cc[<unsigned char>s[i]] & _C_DIGIT:
            return False
    return True


# --- heads --------------------------------------------------------------------------------

cdef void _head_reset(Head *h, const char *buf) noexcept nogil:
    cdef int k
    h.base = buf
    h.size = 0
    h.method = M_OTHER
    h.method_name.off = h.method_name.len = 0
    h.target.off = h.target.len = 0
    h.version = 0
    h.status = 0
    h.reason.off = h.reason.len = 0
    h.nheaders = 0
    h.error = NULL
    for k in range(<int>H_COUNT):
        h.first[k] = -1
        h.count[k] = 0


cdef void head_free(Head *h) noexcept nogil:
    free(h.headers)
    h.headers = NULL
    h.cap = 0
    h.nheaders = 0


cdef int request_line_check(const char *buf, Py_ssize_t length, int max_line) noexcept nogil:
    # For a head still incomplete: 400 when what has arrived of the request line is already
    # invalid, 414 when it is already longer than max_line (as RequestReader measured it: more
    # than max_line bytes and no CRLF in the first max_line + 2), else 0.  Only the request line
    # is looked at: a bad header line is refused once the head is whole.
    cdef Head h
    cdef const char *p
    cdef Py_ssize_t i = 0, scan = length
    h.error = NULL
    if _request_line(&h, buf, <int>(length if length < 0x7fffffff else 0x7fffffff), 1) < 0:
        return 400
    if length > max_line:
        if scan > max_line + 2:
            scan = max_line + 2
        while True:
            p = <const char *>memchr(buf + i, _CR, <size_t>(scan - i))
            if p == NULL or p - buf + 1 >= scan:
                return 414
            if p[1] == _LF:
                return 0
            i = p - buf + 1
    return 0


cdef int status_line_check(const char *buf, Py_ssize_t length) noexcept nogil:
    # For a response head still incomplete: 502 when what has arrived of the status line is
    # already invalid (an upstream that does not speak HTTP is answered at once, as llhttp fed
    # byte by byte did), else 0.
    cdef Head h
    h.error = NULL
    if _status_line(&h, buf, <int>(length if length < 0x7fffffff else 0x7fffffff), 1) < 0:
        return 502
    return 0


cdef int parse_request(Head *h, const char *buf, int size, int max_line) noexcept nogil:
    # A whole request head buf[:size] (size from head_end) into h: 0, or the status to answer
    # with h.error set: 400, 414, 505 (500 when out of memory).  The order is RequestReader's:
    # llhttp's refusals, then the request line's length, then _check_request's rules.
    cdef int i, host
    cdef const char *p
    cdef Header *x
    _head_reset(h, buf)
    i = _request_line(h, buf, size, 0)
    if i < 0:
        return 400
    i = _fields(h, buf, i, size, 1)
    if i < 0:
        return 500 if i == -2 else 400
    h.size = size
    # the request line measured as RequestReader did: to the head's first CRLF
    p = buf
    while True:
        p = <const char *>memchr(p, _CR, <size_t>(size - 1 - (p - buf)))
        if p == NULL or p[1] == _LF:
            break
        p += 1
    if p != NULL and p - buf > max_line:
        h.error = b"request line too long"
        return 414
    # _check_request: what would let the proxy and the upstream read a request two ways.
    # (Its other rules hold by construction: one Content-Length at most, of digits, and no CR,
    # LF or NUL in any value, as _fields refuses.)
    if h.version != 10 and h.version != 11:
        h.error = b"unsupported HTTP version"
        return 505 if h.version // 10 == 2 or h.version // 10 == 3 else 400
    if h.count[<int>H_HOST] > 1:
        h.error = b"several Host headers"
        return 400
    if h.count[<int>H_HOST] == 0:
        if h.version == 11:
            h.error = b"no Host header"
            return 400
    else:
        x = &h.headers[h.first[<int>H_HOST]]
        if not host_valid(buf + x.value.off, x.value.len):
            h.error = b"invalid Host"
            return 400
    if h.count[<int>H_CONTENT_LENGTH] and h.count[<int>H_TRANSFER_ENCODING]:
        h.error = b"both Content-Length and Transfer-Encoding"
        return 400
    return 0


cdef int parse_response(Head *h, const char *buf, int size) noexcept nogil:
    # A whole response head buf[:size] into h: 0, or -1 with h.error set (the engine answers
    # 502: the upstream sent an invalid header).
    cdef int i
    _head_reset(h, buf)
    i = _status_line(h, buf, size, 0)
    if i < 0:
        return -1
    if _fields(h, buf, i, size, 0) < 0:
        return -1
    h.size = size
    return 0


# --- what the engine asks of a parsed head -------------------------------------------------

cdef long long head_content_length(Head *h) noexcept nogil:
    # The body length a Content-Length announces: -1 when there is none, -2 when it cannot be
    # used (http1._content_length's rule: 1 to 18 digits; the parser lets 19 and 20 through, as
    # llhttp did, and refuses a second Content-Length, so the first is the only one).
    cdef int k
    cdef long long n = 0
    cdef Header *x
    if h.count[<int>H_CONTENT_LENGTH] == 0:
        return -1
    x = &h.headers[h.first[<int>H_CONTENT_LENGTH]]
    if x.value.len == 0 or x.value.len > 18:
        return -2
    for k in range(x.value.len):
        if not _cc[<unsigned char>h.base[x.value.off + k]] & _C_DIGIT:
            return -2
        n = n * 10 + h.base[x.value.off + k] - 48
    return n


cdef void tokens_init(TokenIter *it, Head *h, int kind) noexcept nogil:
    it.kind = kind
    it.header = h.first[kind] if h.first[kind] >= 0 else h.nheaders
    if it.header < h.nheaders:
        it.pos = h.headers[it.header].value.off
        it.end = it.pos + h.headers[it.header].value.len


cdef bint tokens_next(TokenIter *it, Head *h, Span *tok) noexcept nogil:
    # The next comma-separated token of the headers of it.kind, OWS trimmed, empty ones
    # skipped (RequestHead.tokens); False once there are no more.
    cdef const char *b = h.base
    cdef int start, stop
    while it.header < h.nheaders:
        while it.pos < it.end:
            while it.pos < it.end and (b[it.pos] == _SP or b[it.pos] == _HT):
                it.pos += 1
            start = it.pos
            while it.pos < it.end and b[it.pos] != c',':
                it.pos += 1
            stop = it.pos
            it.pos += 1
            while stop > start and (b[stop - 1] == _SP or b[stop - 1] == _HT):
                stop -= 1
            if stop > start:
                tok.off = start
                tok.len = stop - start
                return True
        it.header += 1
        while it.header < h.nheaders and h.headers[it.header].kind != it.kind:
            it.header += 1
        if it.header < h.nheaders:
            it.pos = h.headers[it.header].value.off
            it.end = it.pos + h.headers[it.header].value.len
    return False


cdef int head_has_token(Head *h, int kind, const char *token, int toklen) noexcept nogil:
    # Is `token` (lower case) one of the tokens of the headers of that kind, case-insensitively?
    cdef TokenIter it
    cdef Span tok
    tokens_init(&it, h, kind)
    while tokens_next(&it, h, &tok):
        if tok.len == toklen and _lower_eq(h.base + tok.off, token, toklen):
            return 1
    return 0


# --- Python-facing API, for tests and debugging -------------------------------------------

class HeadError(Exception):
    """A refused head: `status` is the answer to give (400, 414, 431, 505; 502 for a response)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(status, reason)
        self.status = status
        self.reason = reason


def find_head_end(bytes data, Py_ssize_t start=0):
    """head_end(): the offset just past the empty line ending a head, or -1."""
    return head_end(data, start, len(data))


def check_request_line(bytes data, int max_line=8192):
    """request_line_check() on an incomplete head: 400, 414 or 0."""
    return request_line_check(data, len(data), max_line)


def check_status_line(bytes data):
    """status_line_check() on an incomplete response head: 502 or 0."""
    return status_line_check(data, len(data))


def parse_request_head(bytes data, int max_line=8192, int max_head=32768):
    """Read a request head as the engine does: None while it is incomplete and acceptable so
    far, else (method, target, version, headers, size); raises HeadError."""
    cdef Head h
    cdef Py_ssize_t end = head_end(data, 0, len(data))
    cdef int status
    if end < 0:
        if len(data) > max_head:
            raise HeadError(431, "head too large")
        status = request_line_check(data, len(data), max_line)
        if status:
            raise HeadError(status, "request line too long" if status == 414 else "malformed head")
        return None
    if end > max_head:
        raise HeadError(431, "head too large")
    memset(&h, 0, sizeof(Head))
    try:
        status = parse_request(&h, data, <int>end, max_line)
        if status:
            raise HeadError(status, _why(h.error))
        return (data[h.method_name.off:h.method_name.off + h.method_name.len],
                data[h.target.off:h.target.off + h.target.len], h.version, _headers_of(&h), h.size)
    finally:
        head_free(&h)


def parse_response_head(bytes data, int max_head=32768):
    """Read a response head as the engine does: None while it is incomplete, else
    (version, status, reason, headers, size); raises HeadError(502, ...)."""
    cdef Head h
    cdef Py_ssize_t end = head_end(data, 0, len(data))
    if end < 0:
        if len(data) > max_head:
            raise HeadError(502, "head too large")
        if status_line_check(data, len(data)):
            raise HeadError(502, "malformed head")
        return None
    if end > max_head:
        raise HeadError(502, "head too large")
    memset(&h, 0, sizeof(Head))
    try:
        if parse_response(&h, data, <int>end) < 0:
            raise HeadError(502, _why(h.error))
        return (h.version, h.status, data[h.reason.off:h.reason.off + h.reason.len],
                _headers_of(&h), h.size)
    finally:
        head_free(&h)


def header_kind(bytes name):
    """The HeaderKind the parser gives a header name (0: one the engine does not single out)."""
    return _header_kind(name, len(name))


cdef int _parse_whole(Head *h, bytes data, bint response) except -1:
    cdef Py_ssize_t end = head_end(data, 0, len(data))
    if end < 0:
        raise HeadError(400, "incomplete head")
    if (parse_response(h, data, <int>end) if response else parse_request(h, data, <int>end, 8192)):
        raise HeadError(502 if response else 400, _why(h.error))
    return 0


def inspect_head(bytes data, bint response=False):
    """(method, kinds of the headers, first[], count[], head_content_length()) of a whole head."""
    cdef Head h
    memset(&h, 0, sizeof(Head))
    try:
        _parse_whole(&h, data, response)
        return (h.method, [h.headers[i].kind for i in range(h.nheaders)],
                [h.first[k] for k in range(<int>H_COUNT)], [h.count[k] for k in range(<int>H_COUNT)],
                head_content_length(&h))
    finally:
        head_free(&h)


def head_tokens(bytes data, bytes name, bint response=False):
    """The tokens_next() tokens of the headers named `name` (a kind the parser knows)."""
    cdef Head h
    cdef TokenIter it
    cdef Span tok
    cdef int kind = _header_kind(name, len(name))
    if kind == H_OTHER:
        raise ValueError(f"{name!r} is not a header kind")
    memset(&h, 0, sizeof(Head))
    try:
        _parse_whole(&h, data, response)
        out = []
        tokens_init(&it, &h, kind)
        while tokens_next(&it, &h, &tok):
            out.append(data[tok.off:tok.off + tok.len])
        return out
    finally:
        head_free(&h)


def head_has(bytes data, bytes name, bytes token, bint response=False):
    """head_has_token() for the headers named `name`; `token` in lower case."""
    cdef Head h
    cdef int kind = _header_kind(name, len(name))
    if kind == H_OTHER:
        raise ValueError(f"{name!r} is not a header kind")
    memset(&h, 0, sizeof(Head))
    try:
        _parse_whole(&h, data, response)
        return bool(head_has_token(&h, kind, token, len(token)))
    finally:
        head_free(&h)


def valid_host(bytes value):
    """host_valid(): is `value` an RFC 3986 host with an optional port?"""
    return host_valid(value, len(value))
