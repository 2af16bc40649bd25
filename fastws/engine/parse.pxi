# TEMPORARY STUB (replaced by the real parser)
cdef Py_ssize_t head_end(const char *buf, Py_ssize_t start, Py_ssize_t length) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(start, length):
        if buf[i] == b'\n':
            if i + 1 < length and buf[i + 1] == b'\n':
                return i + 2
            if i + 2 < length and buf[i + 1] == b'\r' and buf[i + 2] == b'\n':
                return i + 3
    return -1

cdef int request_line_check(const char *buf, Py_ssize_t length, int max_line) noexcept nogil:
    if length > max_line and memchr(buf, b'\n', max_line + 2) == NULL:
        return 414
    return 0

cdef int _kind(const char *n, int l) noexcept nogil:
    if l == 4 and strncasecmp(n, "host", 4) == 0: return H_HOST
    if l == 10 and strncasecmp(n, "connection", 10) == 0: return H_CONNECTION
    if l == 7 and strncasecmp(n, "upgrade", 7) == 0: return H_UPGRADE
    if l == 14 and strncasecmp(n, "content-length", 14) == 0: return H_CONTENT_LENGTH
    if l == 17 and strncasecmp(n, "transfer-encoding", 17) == 0: return H_TRANSFER_ENCODING
    if l == 6 and strncasecmp(n, "expect", 6) == 0: return H_EXPECT
    if l == 10 and strncasecmp(n, "keep-alive", 10) == 0: return H_KEEP_ALIVE
    if l == 16 and strncasecmp(n, "proxy-connection", 16) == 0: return H_PROXY_CONNECTION
    if l == 2 and strncasecmp(n, "te", 2) == 0: return H_TE
    if l == 7 and strncasecmp(n, "trailer", 7) == 0: return H_TRAILER
    if l == 15 and strncasecmp(n, "x-forwarded-for", 15) == 0: return H_X_FORWARDED_FOR
    if l == 9 and strncasecmp(n, "x-real-ip", 9) == 0: return H_X_REAL_IP
    if l == 17 and strncasecmp(n, "x-forwarded-proto", 17) == 0: return H_X_FORWARDED_PROTO
    if l == 17 and strncasecmp(n, "sec-websocket-key", 17) == 0: return H_SEC_WEBSOCKET_KEY
    if l == 21 and strncasecmp(n, "sec-websocket-version", 21) == 0: return H_SEC_WEBSOCKET_VERSION
    if l == 20 and strncasecmp(n, "sec-websocket-accept", 20) == 0: return H_SEC_WEBSOCKET_ACCEPT
    if l == 6 and strncasecmp(n, "cookie", 6) == 0: return H_COOKIE
    if l == 13 and strncasecmp(n, "authorization", 13) == 0: return H_AUTHORIZATION
    return H_OTHER

cdef int _headers(Head *h, const char *buf, int pos, int size) noexcept nogil:
    cdef int eol, colon, vs, ve, k
    cdef Header *grown
    for k in range(H_COUNT):
        h.first[k] = -1
        h.count[k] = 0
    h.nheaders = 0
    while pos < size - 2:
        eol = pos
        while eol < size and buf[eol] != b'\r':
            eol += 1
        colon = pos
        while colon < eol and buf[colon] != b':':
            colon += 1
        if colon == eol:
            h.error = "bad header"
            return -1
        vs = colon + 1
        while vs < eol and buf[vs] == b' ':
            vs += 1
        ve = eol
        while ve > vs and buf[ve - 1] == b' ':
            ve -= 1
        if h.nheaders == h.cap:
            grown = <Header *>realloc(h.headers, sizeof(Header) * (h.cap * 2 + 16))
            if grown == NULL:
                return -1
            h.headers = grown
            h.cap = h.cap * 2 + 16
        h.headers[h.nheaders].name.off = pos
        h.headers[h.nheaders].name.len = colon - pos
        h.headers[h.nheaders].value.off = vs
        h.headers[h.nheaders].value.len = ve - vs
        k = _kind(buf + pos, colon - pos)
        h.headers[h.nheaders].kind = k
        if h.first[k] < 0:
            h.first[k] = h.nheaders
        h.count[k] += 1
        h.nheaders += 1
        pos = eol + 2
    return 0

cdef int parse_request(Head *h, const char *buf, int size, int max_line) noexcept nogil:
    cdef int i = 0, sp1, sp2, eol
    h.base = buf
    h.size = size
    h.error = "malformed head"
    while i < size and buf[i] != b' ':
        i += 1
    sp1 = i
    i += 1
    while i < size and buf[i] != b' ':
        i += 1
    sp2 = i
    eol = sp2
    while eol < size and buf[eol] != b'\r':
        eol += 1
    if eol > max_line:
        return 414
    h.method_name.off = 0
    h.method_name.len = sp1
    h.method = M_OTHER
    if sp1 == 3 and memcmp(buf, "GET", 3) == 0: h.method = M_GET
    elif sp1 == 4 and memcmp(buf, "HEAD", 4) == 0: h.method = M_HEAD
    elif sp1 == 4 and memcmp(buf, "POST", 4) == 0: h.method = M_POST
    elif sp1 == 3 and memcmp(buf, "PUT", 3) == 0: h.method = M_PUT
    h.target.off = sp1 + 1
    h.target.len = sp2 - sp1 - 1
    h.version = 11 if buf[eol - 1] == b'1' else 10
    if _headers(h, buf, eol + 2, size) < 0:
        return 400
    return 0

cdef int parse_response(Head *h, const char *buf, int size) noexcept nogil:
    cdef int eol = 0
    h.base = buf
    h.size = size
    h.error = "malformed response"
    while eol < size and buf[eol] != b'\r':
        eol += 1
    if eol < 12:
        return -1
    h.version = 11 if buf[7] == b'1' else 10
    h.status = (buf[9] - 48) * 100 + (buf[10] - 48) * 10 + buf[11] - 48
    h.reason.off = 13 if eol > 13 else eol
    h.reason.len = eol - h.reason.off
    return _headers(h, buf, eol + 2, size)

cdef long long head_content_length(Head *h) noexcept nogil:
    cdef int i = h.first[<int>H_CONTENT_LENGTH], k
    cdef long long v = 0
    cdef const char *p
    if i < 0:
        return -1
    p = h.base + h.headers[i].value.off
    if h.headers[i].value.len == 0:
        return -2
    for k in range(h.headers[i].value.len):
        if p[k] < b'0' or p[k] > b'9':
            return -2
        v = v * 10 + p[k] - 48
    return v

cdef int head_has_token(Head *h, int kind, const char *token, int toklen) noexcept nogil:
    cdef int i, s, e2, n
    cdef const char *v
    for i in range(h.nheaders):
        if h.headers[i].kind != kind:
            continue
        v = h.base + h.headers[i].value.off
        n = h.headers[i].value.len
        s = 0
        while s < n:
            while s < n and (v[s] == b' ' or v[s] == b','):
                s += 1
            e2 = s
            while e2 < n and v[e2] != b',':
                e2 += 1
            while e2 > s and v[e2 - 1] == b' ':
                e2 -= 1
            if e2 - s == toklen and strncasecmp(v + s, token, toklen) == 0:
                return 1
            while e2 < n and v[e2] != b',':
                e2 += 1
            s = e2
    return 0

cdef void head_free(Head *h) noexcept nogil:
    free(h.headers)
    h.headers = NULL
    h.cap = 0

cdef void chunked_init(Chunked *c, int rechunk) noexcept nogil:
    memset(c, 0, sizeof(Chunked))
    c.rechunk = rechunk

cdef void chunked_free(Chunked *c) noexcept nogil:
    free(c.line)
    c.line = NULL

cdef Py_ssize_t chunked_feed(Chunked *c, char *buf, Py_ssize_t n, Py_ssize_t *consumed) noexcept nogil:
    consumed[0] = n
    return n
