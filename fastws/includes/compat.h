/* Declarations the engine needs from Linux, with _GNU_SOURCE defined before any system header
 * so that splice(2), pipe2(2), accept4(2) and F_SETPIPE_SZ are visible whatever the flags. */
#ifndef FASTWS_COMPAT_H
#define FASTWS_COMPAT_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1
#endif
#include <fcntl.h>
#include <unistd.h>
#include <pthread.h>
#include <time.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <sys/un.h>
#include <sys/uio.h>
#include <sys/timerfd.h>

/* A deadline that never comes. */
#define FASTWS_NEVER 1e300

static inline double fastws_monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static inline double fastws_realtime(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
#endif
