/* The few OpenSSL calls the relay engine makes on TLS tunnels, resolved at run time.
 *
 * fastws builds without OpenSSL headers and without linking -lssl: the handshake is done by
 * Python's ssl module, whose _ssl extension has already loaded libssl into the process, and the
 * engine then borrows that connection's SSL* for the tunnel.  The functions are looked up with
 * dlopen(RTLD_NOLOAD) + dlsym in that very library, so the engine and Python always agree on the
 * OpenSSL they use.  Only calls that are stable across OpenSSL 1.1.1 and 3.x are used; the
 * constants below are from <openssl/ssl.h>, where they have not changed since 1.1.0. */
#ifndef FASTWS_OPENSSL_H
#define FASTWS_OPENSSL_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <dlfcn.h>
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <Python.h>

typedef struct ssl_st FASTWS_SSL;          /* opaque */
typedef struct ssl_ctx_st FASTWS_SSL_CTX;  /* opaque */

#define FASTWS_SSL_ERROR_NONE 0
#define FASTWS_SSL_ERROR_SSL 1
#define FASTWS_SSL_ERROR_WANT_READ 2
#define FASTWS_SSL_ERROR_WANT_WRITE 3
#define FASTWS_SSL_ERROR_SYSCALL 5
#define FASTWS_SSL_ERROR_ZERO_RETURN 6
#define FASTWS_SSL_CTRL_MODE 33
#define FASTWS_SSL_CTRL_SET_READ_AHEAD 41
#define FASTWS_SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER 0x2L
#define FASTWS_SSL_MODE_RELEASE_BUFFERS 0x10L
#define FASTWS_SSL_CTRL_SET_TLSEXT_SERVERNAME_CB 53
#define FASTWS_SSL_CTRL_SET_TLSEXT_HOSTNAME 55
#define FASTWS_TLSEXT_NAMETYPE_host_name 0
#define FASTWS_SSL_TLSEXT_ERR_OK 0
#define FASTWS_SSL_R_HTTP_REQUEST 156
#define FASTWS_ERR_REASON_MASK 0x7FFFFF

typedef struct X509_VERIFY_PARAM_st FASTWS_X509_VERIFY_PARAM;

typedef struct {
    int (*read)(FASTWS_SSL *, void *, int);
    int (*write)(FASTWS_SSL *, const void *, int);
    int (*get_error)(const FASTWS_SSL *, int);
    int (*pending)(const FASTWS_SSL *);
    int (*has_pending)(const FASTWS_SSL *);
    int (*shutdown)(FASTWS_SSL *);
    long (*ctrl)(FASTWS_SSL *, int, long, void *);
    int (*get_fd)(const FASTWS_SSL *);
    int (*free_buffers)(FASTWS_SSL *);
    void (*err_clear)(void);
    /* the engine's own TLS handshakes */
    FASTWS_SSL *(*new_)(FASTWS_SSL_CTX *);
    void (*free)(FASTWS_SSL *);
    int (*set_fd)(FASTWS_SSL *, int);
    void (*set_accept_state)(FASTWS_SSL *);
    void (*set_connect_state)(FASTWS_SSL *);
    int (*do_handshake)(FASTWS_SSL *);
    FASTWS_SSL_CTX *(*set_ssl_ctx)(FASTWS_SSL *, FASTWS_SSL_CTX *);
    FASTWS_SSL_CTX *(*get_ssl_ctx)(const FASTWS_SSL *);
    const char *(*get_servername)(const FASTWS_SSL *, const int);
    long (*ctx_callback_ctrl)(FASTWS_SSL_CTX *, int, void (*)(void));
    int (*set_ex_data)(FASTWS_SSL *, int, void *);
    void *(*get_ex_data)(const FASTWS_SSL *, int);
    FASTWS_X509_VERIFY_PARAM *(*get0_param)(FASTWS_SSL *);
    int (*param_set1_host)(FASTWS_X509_VERIFY_PARAM *, const char *, size_t);
    int (*param_set1_ip)(FASTWS_X509_VERIFY_PARAM *, const unsigned char *, size_t);
    long (*get_verify_result)(const FASTWS_SSL *);
    const char *(*verify_error_string)(long);
    unsigned long (*err_get)(void);
    unsigned long (*err_peek)(void);
    void (*err_string)(unsigned long, char *, size_t);
    int (*session_reused)(const FASTWS_SSL *);
    /* optional (a hook's view of the TLS session): NULL when the library lacks them */
    void (*get0_alpn_selected)(const FASTWS_SSL *, const unsigned char **, unsigned int *);
    void *(*get_peer_certificate)(const FASTWS_SSL *);
    void *(*x509_get_subject_name)(const void *);
    char *(*x509_name_oneline)(const void *, char *, int);
    void (*x509_free)(void *);
    /* optional (client certificates on a server that SNI chose) */
    int (*ctx_get_verify_mode)(const FASTWS_SSL_CTX *);
    void *(*ctx_get_verify_callback)(const FASTWS_SSL_CTX *);
    int (*ctx_get_verify_depth)(const FASTWS_SSL_CTX *);
    void (*set_verify)(FASTWS_SSL *, int, void *);
    void (*set_verify_depth)(FASTWS_SSL *, int);
} fastws_ssl_api;

static fastws_ssl_api fastws_ssl;
static int fastws_ssl_ready = 0;

/* Resolve the calls in the libssl already loaded in the process.  `hint` is a file that has it
 * loaded or linked in (Python's _ssl extension, for builds that link OpenSSL statically).
 * Returns 0, or -1 with nothing resolved. */
static int fastws_ssl_load(const char *hint)
{
    static const char *names[] = {"libssl.so.3", "libssl.so.1.1", "libssl.so", NULL};
    void *h = NULL;
    int i;
    fastws_ssl_api api;
    if (fastws_ssl_ready)
        return 0;
    for (i = 0; names[i] != NULL && h == NULL; i++)
        h = dlopen(names[i], RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL && hint != NULL)
        h = dlopen(hint, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL)
        return -1;
    /* dlsym on a handle searches the library and then its dependencies (libcrypto). */
    *(void **)&api.read = dlsym(h, "SSL_read");
    *(void **)&api.write = dlsym(h, "SSL_write");
    *(void **)&api.get_error = dlsym(h, "SSL_get_error");
    *(void **)&api.pending = dlsym(h, "SSL_pending");
    *(void **)&api.has_pending = dlsym(h, "SSL_has_pending");
    *(void **)&api.shutdown = dlsym(h, "SSL_shutdown");
    *(void **)&api.ctrl = dlsym(h, "SSL_ctrl");
    *(void **)&api.get_fd = dlsym(h, "SSL_get_fd");
    *(void **)&api.free_buffers = dlsym(h, "SSL_free_buffers");
    *(void **)&api.err_clear = dlsym(h, "ERR_clear_error");
    *(void **)&api.new_ = dlsym(h, "SSL_new");
    *(void **)&api.free = dlsym(h, "SSL_free");
    *(void **)&api.set_fd = dlsym(h, "SSL_set_fd");
    *(void **)&api.set_accept_state = dlsym(h, "SSL_set_accept_state");
    *(void **)&api.set_connect_state = dlsym(h, "SSL_set_connect_state");
    *(void **)&api.do_handshake = dlsym(h, "SSL_do_handshake");
    *(void **)&api.set_ssl_ctx = dlsym(h, "SSL_set_SSL_CTX");
    *(void **)&api.get_ssl_ctx = dlsym(h, "SSL_get_SSL_CTX");
    *(void **)&api.get_servername = dlsym(h, "SSL_get_servername");
    *(void **)&api.ctx_callback_ctrl = dlsym(h, "SSL_CTX_callback_ctrl");
    *(void **)&api.set_ex_data = dlsym(h, "SSL_set_ex_data");
    *(void **)&api.get_ex_data = dlsym(h, "SSL_get_ex_data");
    *(void **)&api.get0_param = dlsym(h, "SSL_get0_param");
    *(void **)&api.param_set1_host = dlsym(h, "X509_VERIFY_PARAM_set1_host");
    *(void **)&api.param_set1_ip = dlsym(h, "X509_VERIFY_PARAM_set1_ip");
    *(void **)&api.get_verify_result = dlsym(h, "SSL_get_verify_result");
    *(void **)&api.verify_error_string = dlsym(h, "X509_verify_cert_error_string");
    *(void **)&api.err_get = dlsym(h, "ERR_get_error");
    *(void **)&api.err_peek = dlsym(h, "ERR_peek_error");
    *(void **)&api.err_string = dlsym(h, "ERR_error_string_n");
    *(void **)&api.session_reused = dlsym(h, "SSL_session_reused");
    *(void **)&api.get0_alpn_selected = dlsym(h, "SSL_get0_alpn_selected");
    *(void **)&api.get_peer_certificate = dlsym(h, "SSL_get1_peer_certificate");
    if (api.get_peer_certificate == NULL)   /* OpenSSL 1.1 */
        *(void **)&api.get_peer_certificate = dlsym(h, "SSL_get_peer_certificate");
    *(void **)&api.x509_get_subject_name = dlsym(h, "X509_get_subject_name");
    *(void **)&api.x509_name_oneline = dlsym(h, "X509_NAME_oneline");
    *(void **)&api.x509_free = dlsym(h, "X509_free");
    *(void **)&api.ctx_get_verify_mode = dlsym(h, "SSL_CTX_get_verify_mode");
    *(void **)&api.ctx_get_verify_callback = dlsym(h, "SSL_CTX_get_verify_callback");
    *(void **)&api.ctx_get_verify_depth = dlsym(h, "SSL_CTX_get_verify_depth");
    *(void **)&api.set_verify = dlsym(h, "SSL_set_verify");
    *(void **)&api.set_verify_depth = dlsym(h, "SSL_set_verify_depth");
    if (!api.read || !api.write || !api.get_error || !api.pending || !api.has_pending ||
            !api.shutdown || !api.ctrl || !api.get_fd || !api.free_buffers || !api.err_clear ||
            !api.new_ || !api.free || !api.set_fd || !api.set_accept_state ||
            !api.set_connect_state || !api.do_handshake || !api.set_ssl_ctx ||
            !api.get_ssl_ctx || !api.get_servername || !api.ctx_callback_ctrl ||
            !api.set_ex_data || !api.get_ex_data || !api.get0_param || !api.param_set1_host ||
            !api.param_set1_ip || !api.get_verify_result || !api.verify_error_string ||
            !api.err_get || !api.err_peek || !api.err_string || !api.session_reused)
        return -1;
    fastws_ssl = api;
    fastws_ssl_ready = 1;
    return 0;
}

/* CPython's _ssl._SSLSocket keeps its SSL* right after the object header and the weak reference
 * to its socket (Modules/_ssl.c, PySSLSocket, unchanged from 3.6 to 3.13).  The caller checks
 * the type, and that SSL_get_fd() of the pointer found is the socket's fd, before trusting it. */
typedef struct {
    PyObject_HEAD
    PyObject *Socket;
    FASTWS_SSL *ssl;
} fastws_pyssl_head;

static inline void fastws_set_errno(int value)
{
    errno = value;
}

static inline FASTWS_SSL *fastws_ssl_of(PyObject *sslobj)
{
    return ((fastws_pyssl_head *)sslobj)->ssl;
}

/* CPython's _ssl._SSLContext keeps its SSL_CTX* right after the object header (Modules/_ssl.c,
 * PySSLContext, unchanged from 3.6 to 3.13).  The caller checks it against an SSL object the
 * ssl module itself made from the context before trusting it (check_tls_context). */
typedef struct {
    PyObject_HEAD
    FASTWS_SSL_CTX *ctx;
} fastws_pyctx_head;

static inline FASTWS_SSL_CTX *fastws_ctx_of(PyObject *ctxobj)
{
    return ((fastws_pyctx_head *)ctxobj)->ctx;
}

/* The protocol ALPN settled on, NUL-terminated in out; its length, 0 for none. */
static inline int fastws_ssl_alpn(FASTWS_SSL *ssl, char *out, int cap)
{
    const unsigned char *p = NULL;
    unsigned int n = 0;
    if (fastws_ssl.get0_alpn_selected == NULL)
        return 0;
    fastws_ssl.get0_alpn_selected(ssl, &p, &n);
    if (p == NULL || n == 0 || (int)n >= cap)
        return 0;
    memcpy(out, p, n);
    out[n] = 0;
    return (int)n;
}

/* The client certificate's subject ("/C=../CN=..", as nginx's $ssl_client_s_dn_legacy),
 * NUL-terminated in out; its length, 0 for none. */
static inline int fastws_ssl_peer_subject(FASTWS_SSL *ssl, char *out, int cap)
{
    void *cert, *name;
    if (fastws_ssl.get_peer_certificate == NULL || fastws_ssl.x509_get_subject_name == NULL ||
            fastws_ssl.x509_name_oneline == NULL || fastws_ssl.x509_free == NULL)
        return 0;
    cert = fastws_ssl.get_peer_certificate(ssl);
    if (cert == NULL)
        return 0;
    name = fastws_ssl.x509_get_subject_name(cert);
    out[0] = 0;
    if (name != NULL)
        fastws_ssl.x509_name_oneline(name, out, cap);
    fastws_ssl.x509_free(cert);
    return (int)strlen(out);
}

/* After SSL_set_SSL_CTX (SNI chose another server): its client-certificate verification too,
 * which SSL_set_SSL_CTX leaves as the first context's (nginx's ngx_http_ssl_servername does
 * the same).  0, or -1 when the library lacks the calls. */
static inline int fastws_ssl_copy_verify(FASTWS_SSL *ssl, FASTWS_SSL_CTX *ctx)
{
    if (fastws_ssl.ctx_get_verify_mode == NULL || fastws_ssl.ctx_get_verify_callback == NULL ||
            fastws_ssl.ctx_get_verify_depth == NULL || fastws_ssl.set_verify == NULL ||
            fastws_ssl.set_verify_depth == NULL)
        return -1;
    fastws_ssl.set_verify(ssl, fastws_ssl.ctx_get_verify_mode(ctx),
                          fastws_ssl.ctx_get_verify_callback(ctx));
    fastws_ssl.set_verify_depth(ssl, fastws_ssl.ctx_get_verify_depth(ctx));
    return 0;
}

/* The servername callback's type (SSL_CTX_set_tlsext_servername_callback is a macro). */
typedef int (*fastws_sni_cb)(FASTWS_SSL *, int *, void *);

static inline long fastws_set_sni_callback(FASTWS_SSL_CTX *ctx, fastws_sni_cb cb)
{
    return fastws_ssl.ctx_callback_ctrl(ctx, FASTWS_SSL_CTRL_SET_TLSEXT_SERVERNAME_CB,
                                        (void (*)(void))cb);
}
#endif
