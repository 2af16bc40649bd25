# Header rewriting for the proxied request and response heads, built in one pass over the headers
# the client sent: no Python object is made per header that is kept or dropped.

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.string cimport memcpy

cdef extern from "<strings.h>" nogil:
    int strncasecmp(const char *s1, const char *s2, size_t n)

# Hop-by-hop headers (RFC 9110 section 7.6.1, plus the non-standard Keep-Alive and
# Proxy-Connection that nginx also drops): never passed on, whatever the client sent.
cdef tuple _HOP_BY_HOP = (b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                          b"upgrade")


cdef inline bint _named(const char *name, Py_ssize_t n, tuple names):
    cdef Py_ssize_t i
    cdef bytes candidate
    for i in range(PyTuple_GET_SIZE(names)):
        candidate = <bytes>PyTuple_GET_ITEM(names, i)
        if PyBytes_GET_SIZE(candidate) == n and strncasecmp(
                name, PyBytes_AS_STRING(candidate), <size_t>n) == 0:
            return True
    return False


cdef Py_ssize_t _pairs_size(list pairs) except -1:
    cdef Py_ssize_t size = 0, i
    cdef tuple pair
    for i in range(PyList_GET_SIZE(pairs)):
        pair = <tuple>PyList_GET_ITEM(pairs, i)
        size += PyBytes_GET_SIZE(<bytes>PyTuple_GET_ITEM(pair, 0)) + \
            PyBytes_GET_SIZE(<bytes>PyTuple_GET_ITEM(pair, 1)) + 4
    return size


cdef inline char *_put(char *out, bytes data):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
    memcpy(out, PyBytes_AS_STRING(data), n)
    return out + n


cdef char *_put_pairs(char *out, list pairs):
    cdef Py_ssize_t i
    cdef tuple pair
    for i in range(PyList_GET_SIZE(pairs)):
        pair = <tuple>PyList_GET_ITEM(pairs, i)
        out = _put(out, <bytes>PyTuple_GET_ITEM(pair, 0))
        out[0] = b':'
        out[1] = b' '
        out = _put(out + 2, <bytes>PyTuple_GET_ITEM(pair, 1))
        out[0] = b'\r'
        out[1] = b'\n'
        out += 2
    return out


def build_head(bytes first_line, list headers, tuple drop, list first, list last):
    """Build a message head: `first_line`, the `first` headers, then each of `headers` (a list of
    (name, value) bytes pairs, in the order received) that is neither hop-by-hop nor named in
    `drop` (lower-case names), then the `last` headers, then the blank line.
    """
    cdef Py_ssize_t size, i, n
    cdef list keep = []
    cdef tuple pair
    cdef bytes name
    cdef bytes out
    cdef char *p
    for i in range(PyList_GET_SIZE(headers)):
        pair = <tuple>PyList_GET_ITEM(headers, i)
        name = <bytes>PyTuple_GET_ITEM(pair, 0)
        n = PyBytes_GET_SIZE(name)
        if _named(PyBytes_AS_STRING(name), n, _HOP_BY_HOP) or _named(PyBytes_AS_STRING(name), n, drop):
            continue
        keep.append(pair)
    size = PyBytes_GET_SIZE(first_line) + 4 + _pairs_size(first) + _pairs_size(keep) + \
        _pairs_size(last)
    out = PyBytes_FromStringAndSize(NULL, size)
    p = PyBytes_AS_STRING(out)
    p = _put(p, first_line)
    p[0] = b'\r'
    p[1] = b'\n'
    p = _put_pairs(p + 2, first)
    p = _put_pairs(p, keep)
    p = _put_pairs(p, last)
    p[0] = b'\r'
    p[1] = b'\n'
    return out
