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
#include <Python.h>

typedef struct ssl_st FASTWS_SSL;          /* opaque */

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
    if (!api.read || !api.write || !api.get_error || !api.pending || !api.has_pending ||
            !api.shutdown || !api.ctrl || !api.get_fd || !api.free_buffers || !api.err_clear)
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
#endif
