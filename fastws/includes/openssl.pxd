# Extern declarations only: the OpenSSL calls of TLS tunnels, from includes/openssl.h.

from cpython.ref cimport PyObject

cdef extern from "openssl.h" nogil:
    ctypedef struct FASTWS_SSL:
        pass
    ctypedef struct fastws_ssl_api:
        int (*read)(FASTWS_SSL *, void *, int) noexcept nogil
        int (*write)(FASTWS_SSL *, const void *, int) noexcept nogil
        int (*get_error)(const FASTWS_SSL *, int) noexcept nogil
        int (*pending)(const FASTWS_SSL *) noexcept nogil
        int (*has_pending)(const FASTWS_SSL *) noexcept nogil
        int (*shutdown)(FASTWS_SSL *) noexcept nogil
        long (*ctrl)(FASTWS_SSL *, int, long, void *) noexcept nogil
        int (*get_fd)(const FASTWS_SSL *) noexcept nogil
        int (*free_buffers)(FASTWS_SSL *) noexcept nogil
        void (*err_clear)() noexcept nogil
    fastws_ssl_api fastws_ssl
    int fastws_ssl_load(const char *hint)
    FASTWS_SSL *fastws_ssl_of(PyObject *sslobj)
    void fastws_set_errno(int value)
    enum:
        FASTWS_SSL_ERROR_NONE
        FASTWS_SSL_ERROR_SSL
        FASTWS_SSL_ERROR_WANT_READ
        FASTWS_SSL_ERROR_WANT_WRITE
        FASTWS_SSL_ERROR_SYSCALL
        FASTWS_SSL_ERROR_ZERO_RETURN
        FASTWS_SSL_CTRL_MODE
        FASTWS_SSL_CTRL_SET_READ_AHEAD
        FASTWS_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER
        FASTWS_SSL_MODE_RELEASE_BUFFERS
