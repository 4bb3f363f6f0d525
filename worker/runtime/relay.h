/*
 * A small single-threaded TCP/vsock relay: listeners, and per connection two non-blocking sockets
 * with a bounded buffer each way. Used by netd (enclave side of ingress) and by the launcher's
 * ingress process (parent side). Everything is poll(2)-driven, so a slow or stalled peer only holds
 * its own buffers (at most 2 x RELAY_BUF bytes per connection) and never the other connections; a
 * connection storm beyond RELAY_MAX_CONNS is accepted and closed at once rather than left in the
 * backlog, after evicting the connection idle longest when one has been silent for RELAY_EVICT_IDLE_MS; an
 * established connection silent for RELAY_IDLE_MS is closed. No payload byte is ever logged; each connection
 * ends with one line of counters.
 *
 * The user of this header supplies three callbacks through `struct relay_ops`:
 *   open_b(conn)      — called when side A is ready (accepted and, if `header` is set, its header
 *                       read): connect side B (non-blocking) and prefill `conn->ab` with bytes to
 *                       send to B first; return B's fd or -1;
 *   header_done(conn) — (optional, `header` mode) validate the header bytes read from A;
 *   b_hello(conn)     — (optional) check the line B sent first (`need_b_line`), before relaying B->A.
 * PROXY protocol v2 helpers (encode and strict decode of the address block) are included.
 */
#ifndef NITROCONV_RELAY_H
#define NITROCONV_RELAY_H

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RELAY_BUF 65536
#define RELAY_MAX_CONNS 256
#define RELAY_MAX_LISTENERS 64
#define RELAY_SETUP_MS 10000
/* Established connections that moved no byte either way for this long are closed. */
#define RELAY_IDLE_MS 300000
/* At the limit, a new connection takes the slot of the one idle longest, if idle at least this long, so a
 * storm of silent connections cannot starve clients that talk. */
#define RELAY_EVICT_IDLE_MS 2000
#define RELAY_LINE_MAX 64
/* PROXY v2: 12-byte signature, version/command, family/protocol, 2-byte length, then addresses. */
#define PP2_HDR 16
#define PP2_MAX_BODY 216

static const unsigned char PP2_SIG[12] = {0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A};

struct relay_buf {
    unsigned char data[RELAY_BUF];
    size_t off, len;
};

struct relay_conn;

struct relay_listener {
    int fd;
    int port;   /* the published port this listener serves */
    int target; /* what side B connects to (a vsock or TCP port) */
    int proxy;  /* PROXY v2 wanted */
};

struct relay_conn {
    int used;
    int a, b;
    int a_eof, b_eof;       /* read side ended */
    int a_shut, b_shut;     /* we shut down writing to that side */
    int b_connecting;       /* connect() in progress */
    int need_header;        /* reading the PROXY v2 header from A first */
    int need_b_line;        /* B's first line not read yet */
    unsigned char hdr[PP2_HDR + PP2_MAX_BODY];
    size_t hdr_len;
    char line[RELAY_LINE_MAX];
    size_t line_len;
    long long setup_deadline;
    long long last_active;
    unsigned long long bytes_in, bytes_out; /* A->B, B->A */
    const struct relay_listener *l;
    unsigned long id;
    char peer[64];          /* A's address, for the log line */
    struct relay_buf ab, ba;
};

struct relay_ops {
    const char *prefix;
    int header;   /* A sends a PROXY v2 header before its data */
    int verbose;  /* one line per connection (the parent) or only failures (the enclave) */
    int (*open_b)(struct relay_conn *c);
    int (*header_done)(struct relay_conn *c);
    int (*b_hello)(struct relay_conn *c);
};

static struct relay_conn relay_conns[RELAY_MAX_CONNS];
static unsigned long relay_next_id = 1;
static unsigned long long relay_refused = 0;

static long long relay_now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void relay_log(const struct relay_ops *ops, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void relay_log(const struct relay_ops *ops, const char *fmt, ...) {
    char line[512];
    int n = snprintf(line, sizeof line, "%s", ops->prefix);
    va_list ap;
    va_start(ap, fmt);
    if (n >= 0 && (size_t)n < sizeof line)
        vsnprintf(line + n, sizeof line - (size_t)n, fmt, ap);
    va_end(ap);
    size_t len = strlen(line);
    if (len + 1 < sizeof line) {
        line[len++] = '\n';
    } else {
        line[sizeof line - 2] = '\n';
        len = sizeof line - 1;
    }
    /* One write per line, so lines from several processes do not interleave mid-line. */
    ssize_t w = write(2, line, len);
    (void)w;
}

/* ---- PROXY protocol v2 ------------------------------------------------------------------------ */

/* Encodes a PROXY (or, with sa NULL, LOCAL) header for a TCP client `src` reaching `dst`. */
static size_t pp2_encode(unsigned char *out, const struct sockaddr *src, const struct sockaddr *dst) {
    memcpy(out, PP2_SIG, 12);
    if (src && dst && src->sa_family == AF_INET && dst->sa_family == AF_INET) {
        const struct sockaddr_in *s = (const void *)src, *d = (const void *)dst;
        out[12] = 0x21;
        out[13] = 0x11;
        out[14] = 0;
        out[15] = 12;
        memcpy(out + 16, &s->sin_addr, 4);
        memcpy(out + 20, &d->sin_addr, 4);
        memcpy(out + 24, &s->sin_port, 2);
        memcpy(out + 26, &d->sin_port, 2);
        return 28;
    }
    if (src && dst && src->sa_family == AF_INET6 && dst->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const void *)src, *d = (const void *)dst;
        out[12] = 0x21;
        out[13] = 0x21;
        out[14] = 0;
        out[15] = 36;
        memcpy(out + 16, &s->sin6_addr, 16);
        memcpy(out + 32, &d->sin6_addr, 16);
        memcpy(out + 48, &s->sin6_port, 2);
        memcpy(out + 50, &d->sin6_port, 2);
        return 52;
    }
    out[12] = 0x20; /* LOCAL: no address to tell */
    out[13] = 0x00;
    out[14] = 0;
    out[15] = 0;
    return 16;
}

/* Length of the whole header once its first 16 bytes are known; -1 when they are not PROXY v2. */
static long pp2_total(const unsigned char *h) {
    if (memcmp(h, PP2_SIG, 12) != 0 || (h[12] & 0xF0) != 0x20)
        return -1;
    size_t body = ((size_t)h[14] << 8) | h[15];
    if (body > PP2_MAX_BODY)
        return -1;
    return (long)(PP2_HDR + body);
}

/* Strictly checks a whole header and re-encodes it into `out` (addresses only, TLVs dropped): the app
 * receives a header we made, never bytes the parent chose. Returns its length, or 0 when malformed. */
static inline size_t pp2_reencode(const unsigned char *h, size_t len, unsigned char *out, char *peer, size_t peer_len) {
    long total = pp2_total(h);
    if (total < 0 || (size_t)total != len)
        return 0;
    unsigned cmd = h[12] & 0x0F, fam = h[13];
    size_t body = len - PP2_HDR;
    snprintf(peer, peer_len, "unknown");
    if (cmd == 0x0) /* LOCAL */
        return pp2_encode(out, NULL, NULL);
    if (cmd != 0x1)
        return 0;
    if (fam == 0x11 && body >= 12) {
        struct sockaddr_in s = {.sin_family = AF_INET}, d = {.sin_family = AF_INET};
        memcpy(&s.sin_addr, h + 16, 4);
        memcpy(&d.sin_addr, h + 20, 4);
        memcpy(&s.sin_port, h + 24, 2);
        memcpy(&d.sin_port, h + 26, 2);
        char a[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &s.sin_addr, a, sizeof a);
        snprintf(peer, peer_len, "%s:%u", a, ntohs(s.sin_port));
        return pp2_encode(out, (struct sockaddr *)&s, (struct sockaddr *)&d);
    }
    if (fam == 0x21 && body >= 36) {
        struct sockaddr_in6 s = {.sin6_family = AF_INET6}, d = {.sin6_family = AF_INET6};
        memcpy(&s.sin6_addr, h + 16, 16);
        memcpy(&d.sin6_addr, h + 32, 16);
        memcpy(&s.sin6_port, h + 48, 2);
        memcpy(&d.sin6_port, h + 50, 2);
        char a[INET6_ADDRSTRLEN];
        inet_ntop(AF_INET6, &s.sin6_addr, a, sizeof a);
        snprintf(peer, peer_len, "[%s]:%u", a, ntohs(s.sin6_port));
        return pp2_encode(out, (struct sockaddr *)&s, (struct sockaddr *)&d);
    }
    if (fam == 0x00)
        return pp2_encode(out, NULL, NULL);
    return 0;
}

static void relay_peer_name(const struct sockaddr_storage *ss, char *out, size_t len) {
    char a[INET6_ADDRSTRLEN] = "?";
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *s = (const void *)ss;
        inet_ntop(AF_INET, &s->sin_addr, a, sizeof a);
        snprintf(out, len, "%s:%u", a, ntohs(s->sin_port));
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *s = (const void *)ss;
        inet_ntop(AF_INET6, &s->sin6_addr, a, sizeof a);
        snprintf(out, len, "[%s]:%u", a, ntohs(s->sin6_port));
    } else {
        snprintf(out, len, "local");
    }
}

/* ---- the loop ----------------------------------------------------------------------------------- */

static void relay_close(const struct relay_ops *ops, struct relay_conn *c, const char *why) {
    if (ops->verbose || strcmp(why, "closed") != 0)
        relay_log(ops, "port %d conn %lu from %s: %s, in=%llu out=%llu", c->l->port, c->id, c->peer, why,
                  c->bytes_in, c->bytes_out);
    if (c->a >= 0)
        close(c->a);
    if (c->b >= 0)
        close(c->b);
    c->used = 0;
}

static void relay_accept(const struct relay_ops *ops, const struct relay_listener *l) {
    for (int burst = 0; burst < 64; burst++) {
        struct sockaddr_storage ss;
        socklen_t sl = sizeof ss;
        int fd = accept4(l->fd, (struct sockaddr *)&ss, &sl, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        struct relay_conn *c = NULL, *idlest = NULL;
        long long now = relay_now_ms();
        for (int i = 0; i < RELAY_MAX_CONNS; i++) {
            if (!relay_conns[i].used) { c = &relay_conns[i]; break; }
            if (!idlest || relay_conns[i].last_active < idlest->last_active)
                idlest = &relay_conns[i];
        }
        if (!c && idlest && now - idlest->last_active >= RELAY_EVICT_IDLE_MS) {
            relay_close(ops, idlest, "closed to make room (idle at the connection limit)");
            c = idlest;
        }
        if (!c) {
            /* Full: close at once (the client sees it now) and say so once per thousand. */
            if (relay_refused++ % 1000 == 0)
                relay_log(ops, "port %d: %d connections open, refusing more (%llu refused so far)", l->port,
                          RELAY_MAX_CONNS, relay_refused);
            close(fd);
            continue;
        }
        memset(c, 0, offsetof(struct relay_conn, ab));
        c->ab.off = c->ab.len = c->ba.off = c->ba.len = 0;
        c->used = 1;
        c->a = fd;
        c->b = -1;
        c->l = l;
        c->id = relay_next_id++;
        c->setup_deadline = now + RELAY_SETUP_MS;
        c->last_active = now;
        relay_peer_name(&ss, c->peer, sizeof c->peer);
        if (ss.ss_family == AF_INET || ss.ss_family == AF_INET6) {
            int one = 1;
            setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        }
        if (ops->header) {
            c->need_header = 1;
            continue;
        }
        c->b = ops->open_b(c);
        if (c->b < 0)
            relay_close(ops, c, "cannot reach the other side");
        else if (ops->verbose)
            relay_log(ops, "port %d conn %lu from %s: open", l->port, c->id, c->peer);
    }
}

/* Reads A's PROXY v2 header in exact pieces, so no data byte after it is consumed here. */
static void relay_read_header(const struct relay_ops *ops, struct relay_conn *c) {
    size_t want = PP2_HDR;
    if (c->hdr_len >= PP2_HDR) {
        long total = pp2_total(c->hdr);
        if (total < 0) { relay_close(ops, c, "not a PROXY v2 header"); return; }
        want = (size_t)total;
    }
    ssize_t n = read(c->a, c->hdr + c->hdr_len, want - c->hdr_len);
    if (n == 0) { relay_close(ops, c, "closed before its header"); return; }
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR)
            relay_close(ops, c, "read error before its header");
        return;
    }
    c->hdr_len += (size_t)n;
    if (c->hdr_len == PP2_HDR) {
        long total = pp2_total(c->hdr);
        if (total < 0) { relay_close(ops, c, "not a PROXY v2 header"); return; }
        if ((size_t)total > PP2_HDR)
            return;
    } else if (c->hdr_len < PP2_HDR || (long)c->hdr_len < pp2_total(c->hdr)) {
        return;
    }
    c->need_header = 0;
    if (ops->header_done && ops->header_done(c) < 0) { relay_close(ops, c, "malformed PROXY v2 header"); return; }
    c->b = ops->open_b(c);
    if (c->b < 0)
        relay_close(ops, c, "cannot reach the other side");
}

/* B's first line (the emulator back-end's "OK <port>"), read a byte at a time: it is short and once. */
static void relay_read_line(const struct relay_ops *ops, struct relay_conn *c) {
    for (;;) {
        char ch;
        ssize_t n = read(c->b, &ch, 1);
        if (n == 0) { relay_close(ops, c, "refused by the other side"); return; }
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR)
                relay_close(ops, c, "refused by the other side");
            return;
        }
        if (ch == '\n') {
            c->line[c->line_len] = '\0';
            c->need_b_line = 0;
            if (ops->b_hello && ops->b_hello(c) < 0)
                relay_close(ops, c, "refused by the other side");
            return;
        }
        if (c->line_len + 1 >= sizeof c->line) { relay_close(ops, c, "bad answer from the other side"); return; }
        c->line[c->line_len++] = ch;
    }
}

/* Moves bytes from `from` into `buf` (when it has room) and from `buf` to `to`; 0, or -1 on an error. */
static int relay_pump(int from, int *from_eof, struct relay_buf *buf, int to, int *to_shut,
                      unsigned long long *count, short rev_from, short rev_to, int can_read, long long *active) {
    if (can_read && !*from_eof && buf->len < RELAY_BUF && (rev_from & (POLLIN | POLLHUP | POLLERR))) {
        if (buf->off + buf->len == RELAY_BUF && buf->off) {
            memmove(buf->data, buf->data + buf->off, buf->len);
            buf->off = 0;
        }
        ssize_t n = read(from, buf->data + buf->off + buf->len, RELAY_BUF - buf->off - buf->len);
        if (n > 0) {
            buf->len += (size_t)n;
            *count += (unsigned long long)n;
            *active = relay_now_ms();
        } else if (n == 0) {
            *from_eof = 1;
        } else if (errno != EAGAIN && errno != EINTR) {
            return -1;
        }
    }
    if (buf->len && (rev_to & (POLLOUT | POLLERR | POLLHUP))) {
        ssize_t n = send(to, buf->data + buf->off, buf->len, MSG_NOSIGNAL);
        if (n > 0) {
            *active = relay_now_ms();
            buf->off += (size_t)n;
            buf->len -= (size_t)n;
            if (!buf->len)
                buf->off = 0;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            return -1;
        }
    }
    if (*from_eof && !buf->len && !*to_shut) {
        shutdown(to, SHUT_WR);
        *to_shut = 1;
    }
    return 0;
}

/* Runs forever (until `stop` is set by a signal handler): listeners `ls[0..nl)`, plus `extra_fd`
 * (-1 for none) whose readability calls `on_extra`. */
static void relay_loop(const struct relay_ops *ops, struct relay_listener *ls, int nl, volatile int *stop,
                       int extra_fd, void (*on_extra)(void)) {
    static struct pollfd fds[1 + RELAY_MAX_LISTENERS + 2 * RELAY_MAX_CONNS];
    static int slot_a[RELAY_MAX_CONNS], slot_b[RELAY_MAX_CONNS];
    while (!*stop) {
        int n = 0;
        if (extra_fd >= 0)
            fds[n++] = (struct pollfd){extra_fd, POLLIN, 0};
        int first_l = n;
        for (int i = 0; i < nl; i++)
            fds[n++] = (struct pollfd){ls[i].fd, POLLIN, 0};
        long long now = relay_now_ms();
        int timeout = -1;
        for (int i = 0; i < RELAY_MAX_CONNS; i++) {
            struct relay_conn *c = &relay_conns[i];
            slot_a[i] = slot_b[i] = -1;
            if (!c->used)
                continue;
            int setup = c->need_header || c->b_connecting || c->need_b_line;
            long long until = setup ? c->setup_deadline : c->last_active + RELAY_IDLE_MS;
            if (now >= until) {
                relay_close(ops, c, setup ? "timed out setting up" : "idle too long");
                continue;
            }
            if (timeout < 0 || until - now < timeout)
                timeout = (int)(until - now);
            short ea = 0, eb = 0;
            if (c->need_header) {
                ea = POLLIN;
            } else {
                if (!c->a_eof && c->ab.len < RELAY_BUF && !c->b_connecting && !c->need_b_line)
                    ea |= POLLIN;
                if (c->ba.len)
                    ea |= POLLOUT;
                if (c->b_connecting)
                    eb |= POLLOUT;
                else {
                    if (c->need_b_line || (!c->b_eof && c->ba.len < RELAY_BUF))
                        eb |= POLLIN;
                    if (c->ab.len)
                        eb |= POLLOUT;
                }
            }
            /* A side with nothing to wait for is left out: a closed socket reports POLLHUP forever. */
            slot_a[i] = n;
            fds[n++] = (struct pollfd){ea ? c->a : -1, ea, 0};
            if (c->b >= 0) {
                slot_b[i] = n;
                fds[n++] = (struct pollfd){eb ? c->b : -1, eb, 0};
            }
        }
        int rc = poll(fds, (nfds_t)n, timeout);
        if (rc < 0) {
            if (errno == EINTR)
                continue;
            relay_log(ops, "poll: %s", strerror(errno));
            return;
        }
        if (extra_fd >= 0 && (fds[0].revents & POLLIN) && on_extra)
            on_extra();
        for (int i = 0; i < RELAY_MAX_CONNS; i++) {
            struct relay_conn *c = &relay_conns[i];
            if (!c->used || slot_a[i] < 0)
                continue;
            short ra = fds[slot_a[i]].revents, rb = slot_b[i] >= 0 ? fds[slot_b[i]].revents : 0;
            if (c->need_header) {
                if (ra)
                    relay_read_header(ops, c);
                continue;
            }
            if (c->b_connecting) {
                if (!rb)
                    continue;
                int err = 0;
                socklen_t el = sizeof err;
                getsockopt(c->b, SOL_SOCKET, SO_ERROR, &err, &el);
                if (err) { relay_close(ops, c, "connection refused"); continue; }
                c->b_connecting = 0;
                rb = POLLOUT;
            }
            if (c->need_b_line && (rb & (POLLIN | POLLHUP | POLLERR))) {
                /* Send what is queued (the request line) before waiting for the answer. */
                if (relay_pump(c->a, &c->a_eof, &c->ab, c->b, &c->b_shut, &c->bytes_in, 0, rb, 0, &c->last_active) < 0) {
                    relay_close(ops, c, "write error");
                    continue;
                }
                relay_read_line(ops, c);
                continue;
            }
            if (relay_pump(c->a, &c->a_eof, &c->ab, c->b, &c->b_shut, &c->bytes_in, ra, rb, 1, &c->last_active) < 0 ||
                relay_pump(c->b, &c->b_eof, &c->ba, c->a, &c->a_shut, &c->bytes_out, rb, ra, !c->need_b_line,
                           &c->last_active) < 0) {
                relay_close(ops, c, "reset");
                continue;
            }
            if (c->a_eof && c->b_eof && !c->ab.len && !c->ba.len)
                relay_close(ops, c, "closed");
            else if (((ra & (POLLERR)) || (rb & (POLLERR))))
                relay_close(ops, c, "reset");
        }
        for (int i = 0; i < nl; i++)
            if (fds[first_l + i].revents & POLLIN)
                relay_accept(ops, &ls[i]);
    }
}

#endif
