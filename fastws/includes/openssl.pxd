# Extern declarations only: the OpenSSL calls of TLS tunnels, from includes/openssl.h.

from cpython.ref cimport PyObject

cdef extern from "openssl.h" nogil:
    ctypedef struct FASTWS_SSL:
        pass
    ctypedef struct FASTWS_SSL_CTX:
        pass
    ctypedef struct FASTWS_X509_VERIFY_PARAM:
        pass
    ctypedef int (*fastws_sni_cb)(FASTWS_SSL *, int *, void *) noexcept nogil
    long fastws_set_sni_callback(FASTWS_SSL_CTX *ctx, fastws_sni_cb cb)
    FASTWS_SSL_CTX *fastws_ctx_of(PyObject *ctxobj)
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
        FASTWS_SSL *(*new_)(FASTWS_SSL_CTX *) noexcept nogil
        void (*free)(FASTWS_SSL *) noexcept nogil
        int (*set_fd)(FASTWS_SSL *, int) noexcept nogil
        void (*set_accept_state)(FASTWS_SSL *) noexcept nogil
        void (*set_connect_state)(FASTWS_SSL *) noexcept nogil
        int (*do_handshake)(FASTWS_SSL *) noexcept nogil
        FASTWS_SSL_CTX *(*set_ssl_ctx)(FASTWS_SSL *, FASTWS_SSL_CTX *) noexcept nogil
        FASTWS_SSL_CTX *(*get_ssl_ctx)(const FASTWS_SSL *) noexcept nogil
        const char *(*get_servername)(const FASTWS_SSL *, const int) noexcept nogil
        int (*set_ex_data)(FASTWS_SSL *, int, void *) noexcept nogil
        void *(*get_ex_data)(const FASTWS_SSL *, int) noexcept nogil
        FASTWS_X509_VERIFY_PARAM *(*get0_param)(FASTWS_SSL *) noexcept nogil
        int (*param_set1_host)(FASTWS_X509_VERIFY_PARAM *, const char *, size_t) noexcept nogil
        int (*param_set1_ip)(FASTWS_X509_VERIFY_PARAM *, const unsigned char *, size_t) noexcept nogil
        long (*get_verify_result)(const FASTWS_SSL *) noexcept nogil
        const char *(*verify_error_string)(long) noexcept nogil
        unsigned long (*err_get)() noexcept nogil
        unsigned long (*err_peek)() noexcept nogil
        void (*err_string)(unsigned long, char *, size_t) noexcept nogil
        int (*session_reused)(const FASTWS_SSL *) noexcept nogil
    fastws_ssl_api fastws_ssl
    int fastws_ssl_load(const char *hint)
    int fastws_ssl_alpn(FASTWS_SSL *ssl, char *out, int cap) noexcept nogil
    int fastws_ssl_peer_subject(FASTWS_SSL *ssl, char *out, int cap) noexcept nogil
    int fastws_ssl_copy_verify(FASTWS_SSL *ssl, FASTWS_SSL_CTX *ctx) noexcept nogil
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
        FASTWS_SSL_CTRL_SET_TLSEXT_HOSTNAME
        FASTWS_TLSEXT_NAMETYPE_host_name
        FASTWS_SSL_TLSEXT_ERR_OK
        FASTWS_SSL_R_HTTP_REQUEST
        FASTWS_ERR_REASON_MASK
