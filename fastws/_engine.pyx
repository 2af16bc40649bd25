# The engine: one per worker process, it owns every client connection from accept to close.
#
# Python is the control plane: it builds the tables the engine runs on from the configuration,
# runs the processes and reloads, renders status pages and hears about what happened in
# batches.  The engine's concerns are one file each under engine/, joined here by include.

cimport cython
from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memset, strlen

from fastws.includes.linux cimport *

cdef extern from "<strings.h>" nogil:
    int strncasecmp(const char *s1, const char *s2, size_t n)

include "includes/consts.pxi"
include "engine/parse.pxi"
include "engine/select.pxi"
