/* Byte relaying and line reading shared by egressd (enclave) and egress (parent). Header-only, static. */
#ifndef NITROCONV_NETRELAY_H
#define NITROCONV_NETRELAY_H

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RELAY_BUF 16384

static inline long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline int set_nonblock(int fd, int on)
{
    int fl = fcntl(fd, F_GETFL);
    if (fl < 0)
        return -1;
    return fcntl(fd, F_SETFL, on ? (fl | O_NONBLOCK) : (fl & ~O_NONBLOCK));
}

/* Writes everything on a blocking or non-blocking socket, waiting at most timeout_ms in all. */
static inline int send_all(int fd, const void *buf, size_t n, int timeout_ms)
{
    const char *p = buf;
    long long deadline = now_ms() + timeout_ms;
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (w > 0) {
            p += w;
            n -= (size_t)w;
            continue;
        }
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            long long left = deadline - now_ms();
            if (left <= 0) {
                errno = ETIMEDOUT;
                return -1;
            }
            struct pollfd pfd = {fd, POLLOUT, 0};
            poll(&pfd, 1, (int)left);
            continue;
        }
        return -1;
    }
    return 0;
}

/* One '\n'-terminated line of at most cap-1 bytes, read a byte at a time so nothing after it is consumed
 * (the raw stream follows). Returns its length without the '\n' (NUL-terminated), -1 on EOF, error,
 * timeout (errno ETIMEDOUT) or an overlong line (errno EMSGSIZE). */
static inline int read_line(int fd, char *buf, size_t cap, int timeout_ms)
{
    size_t n = 0;
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        struct pollfd pfd = {fd, POLLIN, 0};
        int rc = poll(&pfd, 1, (int)left);
        if (rc < 0 && errno == EINTR)
            continue;
        if (rc <= 0)
            continue;
        char c;
        ssize_t r = recv(fd, &c, 1, MSG_DONTWAIT);
        if (r < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = ECONNRESET;
            return -1;
        }
        if (c == '\n') {
            buf[n] = '\0';
            return (int)n;
        }
        if (n + 1 >= cap) {
            errno = EMSGSIZE;
            return -1;
        }
        buf[n++] = c;
    }
}

/* Exactly n bytes within timeout_ms; 0, or -1 (EOF, error, timeout). */
static inline int read_exact(int fd, void *buf, size_t n, int timeout_ms)
{
    char *p = buf;
    long long deadline = now_ms() + timeout_ms;
    while (n) {
        long long left = deadline - now_ms();
        if (left <= 0)
            return -1;
        struct pollfd pfd = {fd, POLLIN, 0};
        int rc = poll(&pfd, 1, (int)left);
        if (rc <= 0)
            continue;
        ssize_t r = recv(fd, p, n, MSG_DONTWAIT);
        if (r < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK))
            continue;
        if (r <= 0)
            return -1;
        p += r;
        n -= (size_t)r;
    }
    return 0;
}

struct relay_dir {
    char buf[RELAY_BUF];
    size_t len, off;
    int eof;       /* the source said end of stream */
    int shut;      /* the end was passed on (shutdown SHUT_WR of the sink) */
    uint64_t bytes;
};

/* Moves bytes both ways between a and b until both directions have ended, passing half-closes on.
 * Either side's error or reset ends both. `*ab` counts a->b bytes, `*ba` b->a. A peer that stops reading
 * stalls only its own direction (non-blocking sockets, one buffer each way). */
static inline void relay(int a, int b, uint64_t *ab, uint64_t *ba)
{
    /* On the heap: relay runs on small thread stacks. */
    struct relay_dir *d = calloc(2, sizeof *d);
    int fds[2] = {a, b};
    *ab = *ba = 0;
    if (!d)
        return;
    set_nonblock(a, 1);
    set_nonblock(b, 1);
    for (;;) {
        struct pollfd p[2] = {{a, 0, 0}, {b, 0, 0}};
        int done = 1;
        for (int i = 0; i < 2; i++) {
            /* direction i: fds[i] -> fds[1 - i] */
            struct relay_dir *dir = &d[i];
            if (dir->shut)
                continue;
            done = 0;
            if (dir->len == dir->off && !dir->eof)
                p[i].events |= POLLIN;
            if (dir->len > dir->off)
                p[1 - i].events |= POLLOUT;
        }
        if (done)
            break;
        int rc = poll(p, 2, -1);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            break;
        }
        int broken = 0;
        for (int i = 0; i < 2 && !broken; i++) {
            struct relay_dir *dir = &d[i];
            int src = fds[i], dst = fds[1 - i];
            if ((p[i].revents & (POLLIN | POLLHUP | POLLERR)) && (p[i].events & POLLIN)) {
                ssize_t r = recv(src, dir->buf, sizeof dir->buf, 0);
                if (r > 0) {
                    dir->len = (size_t)r;
                    dir->off = 0;
                } else if (r == 0) {
                    dir->eof = 1;
                } else if (errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
                    broken = 1;
                }
            }
            if (!broken && dir->len > dir->off && (p[1 - i].revents & (POLLOUT | POLLERR | POLLHUP))) {
                ssize_t w = send(dst, dir->buf + dir->off, dir->len - dir->off, MSG_NOSIGNAL);
                if (w > 0) {
                    dir->off += (size_t)w;
                    dir->bytes += (uint64_t)w;
                } else if (w < 0 && errno != EINTR && errno != EAGAIN && errno != EWOULDBLOCK) {
                    broken = 1;
                }
            }
            if (!broken && dir->eof && dir->len == dir->off && !dir->shut) {
                shutdown(dst, SHUT_WR);
                dir->shut = 1;
            }
        }
        if (broken)
            break;
    }
    *ab = d[0].bytes;
    *ba = d[1].bytes;
    free(d);
}

#endif
