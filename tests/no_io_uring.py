"""Run a command where the kernel refuses io_uring, as a container's seccomp profile does.

    python tests/no_io_uring.py PROGRAM ARGS...

A seccomp filter (installed for this process, kept across exec) answers io_uring_setup(2)
with EPERM, the answer of Docker's default profile; every other system call is allowed.
"""
from __future__ import annotations

import ctypes
import os
import sys

IO_URING_SETUP = 425                 # the same number on every architecture since Linux 5.1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ERRNO = 0x00050000
EPERM = 1


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


def refuse_io_uring() -> None:
    program = (SockFilter * 4)(
        SockFilter(0x20, 0, 0, 0),                           # load seccomp_data.nr
        SockFilter(0x15, 0, 1, IO_URING_SETUP),              # == io_uring_setup?
        SockFilter(0x06, 0, 0, SECCOMP_RET_ERRNO | EPERM),   #   refuse it
        SockFilter(0x06, 0, 0, SECCOMP_RET_ALLOW))           # allow the rest
    prog = SockFprog(len(program), program)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 or \
            libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "cannot install the seccomp filter")


if __name__ == "__main__":
    refuse_io_uring()
    os.execvp(sys.argv[1], sys.argv[1:])
