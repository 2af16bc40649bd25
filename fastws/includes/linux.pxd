# Extern declarations only: the Linux calls the relay engine makes, from includes/compat.h.

cdef extern from "compat.h" nogil:
    double fastws_monotonic()
    double fastws_realtime()
    double NEVER "FASTWS_NEVER"

    # splice(2), tee(2), pipe2(2), fcntl(2)
    ssize_t splice(int fd_in, long long *off_in, int fd_out, long long *off_out,
                   size_t length, unsigned int flags)
    ssize_t tee(int fd_in, int fd_out, size_t length, unsigned int flags)
    int pipe2(int pipefd[2], int flags)
    int fcntl(int fd, int cmd, ...)
    int open(const char *path, int flags)
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        O_NONBLOCK
        O_CLOEXEC
        O_RDONLY
        O_WRONLY
        F_SETPIPE_SZ
        F_GETPIPE_SZ
        F_GETFL
        F_SETFL

    # epoll(7), eventfd(2)
    union epoll_data:
        void *ptr
        int fd
        unsigned long long u64
    struct epoll_event:
        unsigned int events
        epoll_data data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

    # sockets
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t
    struct sockaddr:
        sa_family_t sa_family
    struct in_addr:
        unsigned int s_addr
    struct sockaddr_in:
        sa_family_t sin_family
        unsigned short sin_port
        in_addr sin_addr
    struct in6_addr:
        unsigned char s6_addr[16]
    struct sockaddr_in6:
        sa_family_t sin6_family
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id
    struct sockaddr_un:
        sa_family_t sun_family
        char sun_path[108]
    struct sockaddr_storage:
        sa_family_t ss_family
    struct iovec:
        void *iov_base
        size_t iov_len
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t sendmsg(int sockfd, const msghdr *msg, int flags)
    int socket(int domain, int type, int protocol)
    int connect(int sockfd, const sockaddr *addr, socklen_t addrlen)
    int accept4(int sockfd, sockaddr *addr, socklen_t *addrlen, int flags)
    int setsockopt(int sockfd, int level, int optname, const void *optval, socklen_t optlen)
    int getsockname(int sockfd, sockaddr *addr, socklen_t *addrlen)
    int getpeername(int sockfd, sockaddr *addr, socklen_t *addrlen)
    ssize_t writev(int fd, const iovec *iov, int iovcnt)
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    unsigned short htons(unsigned short)
    unsigned short ntohs(unsigned short)
    enum:
        AF_UNIX
        AF_INET
        AF_INET6
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        IPPROTO_TCP
        TCP_NODELAY
        TCP_DEFER_ACCEPT
        SO_KEEPALIVE
        INET6_ADDRSTRLEN

    # timerfd(2)
    struct timespec:
        long tv_sec
        long tv_nsec
    struct itimerspec:
        timespec it_interval
        timespec it_value
    int timerfd_create(int clockid, int flags)
    int timerfd_settime(int fd, int flags, const itimerspec *new_value, itimerspec *old_value)
    enum:
        CLOCK_MONOTONIC
        TFD_NONBLOCK
        TFD_CLOEXEC
        TFD_TIMER_ABSTIME
        EPOLLET

    ssize_t recv(int sockfd, void *buf, size_t length, int flags)
    ssize_t send(int sockfd, const void *buf, size_t length, int flags)
    int shutdown(int sockfd, int how)
    int getsockopt(int sockfd, int level, int optname, void *optval, unsigned int *optlen)
    enum:
        MSG_DONTWAIT
        MSG_PEEK
        MSG_NOSIGNAL
        MSG_MORE
        SHUT_WR
        SOL_SOCKET
        SO_ERROR

    # threads
    ctypedef struct pthread_t:
        pass
    ctypedef struct pthread_mutex_t:
        pass
    ctypedef struct pthread_attr_t:
        pass
    ctypedef struct pthread_mutexattr_t:
        pass
    int pthread_create(pthread_t *thread, const pthread_attr_t *attr,
                       void *(*start_routine)(void *) noexcept nogil, void *arg)
    int pthread_join(pthread_t thread, void **retval)
    int pthread_mutex_init(pthread_mutex_t *mutex, const pthread_mutexattr_t *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)


cdef extern from "websocket.h" nogil:
    int base64_decode "fastws_base64_decode"(const char *s, int n, unsigned char *out, int cap)
    int base64_encode "fastws_base64_encode"(const unsigned char *s, int n, char *out)
    void ws_accept "fastws_ws_accept"(const char *key, int keylen, char *out)
