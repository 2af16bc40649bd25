# The engine: one per worker process, it owns every client connection from accept to close.
#
# Python is the control plane: it builds the tables the engine runs on from the configuration
# (tables.py), runs the processes and reloads, renders status pages, and hears what happened in
# batches (error-log messages; access-log lines are written by the engine itself).  A
# connection that uses only built-in features runs no Python code from accept to close; the
# engine calls Python only for the extension points a configuration names (a custom balancer,
# a status page, a hook or a tunnel-close callback).
#
# The engine is driven by whoever watches its epoll fd (`fd`): the worker's event loop calls
# run_once() when it is readable.  Its own timerfd and a wake-up eventfd are in that set, so
# it needs nothing else from the loop.  Each concern is one file under engine/:
#
#   accept, request heads, answers, close   engine/conn.pxi
#   server and location                     engine/route.pxi
#   the request and the head sent upstream  engine/request.pxi
#   servers, connect, pool, next upstream   engine/select.pxi, engine/upstream.pxi
#   the HTTP exchange                       engine/http.pxi
#   moving bytes                            engine/flow.pxi, engine/tunnel.pxi
#   TLS                                     engine/tls.pxi
#   timers, sockets                         engine/timers.pxi, engine/io.pxi
#   variables, access logs                  engine/vars.pxi, engine/log.pxi
#   HTTP/1.1 heads, chunked bodies          engine/parse.pxi
#   the tables                              engine/tables.pxi
#   Python hooks, tunnel-close callbacks    engine/hooks.pxi

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_DECREF, Py_INCREF
from libc.errno cimport (errno, EAGAIN, EALREADY, ECONNABORTED, ECONNRESET, EINPROGRESS, EINTR,
                         EBADF, EINVAL, EMFILE, ENFILE, ENOMEM, ENOSYS, EPIPE, EPROTO)
from libc.stdio cimport snprintf
from libc.stdlib cimport RAND_MAX, calloc, free, malloc, rand, realloc, srand
from libc.string cimport memchr, memcmp, memcpy, memmove, memset, strcmp, strerror, strlen
from libc.time cimport localtime_r, strftime, time_t, tm
from posix.unistd cimport getpid

from fastws.includes.buf cimport buf_add, buf_fmt, buf_reserve, fastws_buf
from fastws.includes.linux cimport *
from fastws.includes.openssl cimport *
from fastws.includes.pcre2 cimport fastws_regex, fastws_regex_compile, fastws_regex_free, fastws_regex_match
from fastws.includes.zone cimport *
from fastws.includes.wsframe cimport *
from fastws.includes.uring cimport *
from libc.stdint cimport uint8_t

import asyncio as _asyncio
import functools as _functools
import hashlib as _hashlib
import inspect as _inspect

import logging as _logging

from fastws.hooks import PENDING as _HOOK_PENDING, TunnelClosed as _TunnelClosed

_hook_log = _logging.getLogger("fastws")

cdef extern from "<strings.h>" nogil:
    int strncasecmp(const char *s1, const char *s2, size_t n)

include "includes/consts.pxi"

cdef double DEFAULT_CLOSE_TIMEOUT = 5.0   # a closing handshake of the proxy's is waited for
cdef double LINGER_TIMEOUT = 2.0          # nginx's lingering_timeout is 5s; its close waits 30s
cdef double DEFAULT_SEND_TIMEOUT = 60.0
cdef double DEFAULT_KEEPALIVE_TIMEOUT = 75.0  # the server default of keepalive_timeout
cdef const char *HEXDIGITS = "0123456789ABCDEF"
cdef const char *HEXDIGITS_LOWER = "0123456789abcdef"
cdef const unsigned char *V4MAPPED = b"\0\0\0\0\0\0\0\0\0\0\xff\xff"

include "engine/figures.pxi"
include "engine/parse.pxi"
include "engine/chunked.pxi"
include "engine/select.pxi"
include "engine/groups.pxi"
include "engine/timers.pxi"
include "engine/ring.pxi"
include "engine/io.pxi"
include "engine/flow.pxi"
include "engine/tunnel.pxi"
include "engine/route.pxi"
include "engine/vars.pxi"
include "engine/log.pxi"
include "engine/request.pxi"
include "engine/upstream.pxi"
include "engine/http.pxi"
include "engine/conn.pxi"
include "engine/tls.pxi"
include "engine/proxy.pxi"
include "engine/limits.pxi"
include "engine/frames.pxi"
include "engine/tables.pxi"
include "engine/turn.pxi"
include "engine/export.pxi"
include "engine/regroup.pxi"
include "engine/extend.pxi"
include "engine/hooks.pxi"
include "engine/api.pxi"
