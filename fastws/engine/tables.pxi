# The tables the engine runs on, copied from what tables.py builds out of a configuration into
# plain C arrays and strings (one arena, freed with the engine).  Python objects the tables
# borrow from (the upstream groups, the ssl contexts) are kept alive by the Engine.

cdef struct Chunk:
    Chunk *next
    size_t used
    size_t size

cdef struct Arena:
    Chunk *head


cdef void *arena_alloc(Arena *a, size_t n) except NULL:
    cdef Chunk *c = a.head
    cdef size_t size
    n = (n + 15) & ~(<size_t>15)
    if c == NULL or c.used + n > c.size:
        size = 65536 if n < 32768 else n + 64
        c = <Chunk *>calloc(1, sizeof(Chunk) + size)
        if c == NULL:
            raise MemoryError()
        c.size = size
        c.next = a.head
        a.head = c
    c.used += n
    return <char *>c + sizeof(Chunk) + c.used - n


cdef void arena_free(Arena *a) noexcept nogil:
    cdef Chunk *c = a.head
    cdef Chunk *nxt
    while c != NULL:
        nxt = c.next
        free(c)
        c = nxt
    a.head = NULL


cdef char *arena_str(Arena *a, object text, int *length=NULL) except NULL:
    # A NUL-terminated copy of a str (UTF-8) or bytes.
    cdef bytes data = text.encode() if isinstance(text, str) else bytes(text)
    cdef Py_ssize_t n = len(data)
    cdef char *p = <char *>arena_alloc(a, n + 1)
    memcpy(p, <const char *>data, n)
    p[n] = 0
    if length != NULL:
        length[0] = <int>n
    return p


cdef Template *arena_template(Arena *a, object parts) except NULL:
    # parts: [(variable number or -1, text)], text the literal or the variable's argument
    cdef Template *t = <Template *>arena_alloc(a, sizeof(Template))
    cdef int i = 0
    t.nparts = len(parts)
    t.parts = <TplPart *>arena_alloc(a, sizeof(TplPart) * (t.nparts or 1))
    for var, text in parts:
        t.parts[i].var = var
        t.parts[i].text = arena_str(a, text, &t.parts[i].len)
        i += 1
    return t


cdef FASTWS_SSL_CTX *borrow_context(object ctx) except? NULL:
    if ctx is None:
        return NULL
    if not load_openssl():
        raise RuntimeError("the OpenSSL library of the ssl module cannot be found in the process")
    # an ssl.SSLContext is an _ssl._SSLContext: its SSL_CTX* is the first field after the
    # header (check_tls_context has made sure at start-up)
    return fastws_ctx_of(<PyObject *>ctx)


cdef int header_kind_of(object lname):
    return _HEADER_KINDS.get(lname, H_OTHER)


cdef dict _HEADER_KINDS = {
    "host": H_HOST, "connection": H_CONNECTION, "upgrade": H_UPGRADE,
    "content-length": H_CONTENT_LENGTH, "transfer-encoding": H_TRANSFER_ENCODING,
    "expect": H_EXPECT, "keep-alive": H_KEEP_ALIVE, "proxy-connection": H_PROXY_CONNECTION,
    "te": H_TE, "trailer": H_TRAILER, "x-forwarded-for": H_X_FORWARDED_FOR,
    "x-real-ip": H_X_REAL_IP, "x-forwarded-proto": H_X_FORWARDED_PROTO,
    "sec-websocket-key": H_SEC_WEBSOCKET_KEY, "sec-websocket-version": H_SEC_WEBSOCKET_VERSION,
    "sec-websocket-accept": H_SEC_WEBSOCKET_ACCEPT, "cookie": H_COOKIE,
    "authorization": H_AUTHORIZATION,
}
