/*
 * nitroconv egressd: the enclave's way out, started by the init before the program. Every destination is
 * checked against the build's egress policy here, inside the enclave (netpolicy.h), and only then carried
 * over vsock to the parent's egress service (worker/runtime/egress.c, port 9002), which is untrusted: it
 * may refuse, lie about names (answers are checked again) or die (connections end, nothing hangs).
 *
 *   127.0.0.1:3128  HTTP proxy: CONNECT host:port, and absolute-form http:// requests (sent on with
 *                   "Connection: close"); 403 when the policy refuses, 502/504 when the parent cannot.
 *   127.0.0.1:3129  transparent mode: TCP to any non-loopback IPv4 address is redirected here by a nat
 *                   OUTPUT rule this daemon installs (no iptables binary in the enclave), the destination
 *                   read back with SO_ORIGINAL_DST; a default route over lo makes such connections start.
 *   127.0.0.1:53    DNS stub (UDP and TCP): A queries for names the policy allows, resolved by the parent
 *                   ("R") and filtered by the policy; a name with no address left is NXDOMAIN; AAAA and
 *                   other types of a name with addresses answer no data (IPv6 leaves only by name, through
 *                   the proxy). Addresses it answered are remembered (IP -> name) so a
 *                   connection by address can be matched to an allowed name, as with Evervault's stub.
 *
 * Parent protocol (one line, then raw bytes): "C <ip> <port>\n" -> "OK\n" | "ERR <code>\n";
 * "R <name>\n" -> "A <ip>…\n" | "ERR <code>\n". egressd resolves names itself and asks the parent for
 * addresses only, so a deny cidr rule holds whatever the parent answers for a name.
 *
 *   egressd [--policy PATH] [--parent-uds PATH] [--foreground]
 * --policy defaults to /.nitroconv/network.json; --parent-uds replaces vsock CID 3 port 9002 by a Unix
 * socket (process-level tests); without --foreground it returns once its sockets are bound and serves
 * in the background, so the program starts with DNS and the proxy already there.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <net/if.h> /* before the linux headers, which then leave its names alone */
#include <linux/netfilter/nf_nat.h>
#include <linux/netfilter/x_tables.h>
#include <linux/netfilter_ipv4.h>
#include <linux/netfilter_ipv4/ip_tables.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/vm_sockets.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "console.h"
#include "netpolicy.h"
#include "netrelay.h"

#define PROG "nitroconv-egressd: "
#define DEFAULT_POLICY "/.nitroconv/network.json"
#define PARENT_CID 3
#define PARENT_PORT 9002
#define PROXY_PORT 3128
#define TRANSPARENT_PORT 3129
#define DNS_PORT 53
#define MAX_CONNS 512
#define MAX_DNS_INFLIGHT 64
#define THREAD_STACK (256 * 1024)
#define HEAD_MAX 16384
#define HEAD_TIMEOUT_MS 30000
#define PARENT_TIMEOUT_MS 10000
#define PARENT_CONNECT_S 5
#define MAX_ADDRS 16
#define DNS_TTL 30
#define CACHE_SLOTS 256
#define MEMORY_SLOTS 4096
#define MEMORY_SECONDS 600

static struct np_policy policy;
static const char *parent_uds;
static atomic_int conns, dns_inflight;
static atomic_ullong conn_ids;

/* ---- the parent ----------------------------------------------------------------------------------- */

static int parent_open(void)
{
    int fd;
    if (parent_uds) {
        struct sockaddr_un a;
        memset(&a, 0, sizeof a);
        a.sun_family = AF_UNIX;
        snprintf(a.sun_path, sizeof a.sun_path, "%s", parent_uds);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (fd < 0)
            return -1;
        if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
            close(fd);
            return -1;
        }
        return fd;
    }
    fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {PARENT_CONNECT_S, 0};
    setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof tv);
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = PARENT_CID;
    a.svm_port = PARENT_PORT;
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* Sends one request line and reads the answer line into `answer`. Returns the open socket or -1. */
static int parent_ask(const char *request, char *answer, size_t cap)
{
    int fd = parent_open();
    if (fd < 0)
        return -1;
    if (send_all(fd, request, strlen(request), PARENT_TIMEOUT_MS) < 0 ||
        read_line(fd, answer, cap, PARENT_TIMEOUT_MS) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

/* ---- what names stand behind which addresses ------------------------------------------------------ */

struct cached {
    char name[NP_NAME_MAX + 1];
    struct np_addr addrs[MAX_ADDRS];
    int n; /* -1: the name does not exist */
    long long expires;
};

struct memory {
    struct np_addr addr;
    char name[NP_NAME_MAX + 1];
    long long expires;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct cached cache[CACHE_SLOTS];
static struct memory *memory; /* MEMORY_SLOTS */

static int same_addr(const struct np_addr *a, const struct np_addr *b)
{
    return a->family == b->family && memcmp(a->b, b->b, a->family == 4 ? 4 : 16) == 0;
}

static void remember(const char *name, const struct np_addr *a)
{
    long long now = now_ms();
    pthread_mutex_lock(&lock);
    struct memory *slot = &memory[0];
    for (int i = 0; i < MEMORY_SLOTS; i++) {
        struct memory *m = &memory[i];
        if (same_addr(&m->addr, a) && strcmp(m->name, name) == 0) {
            slot = m;
            break;
        }
        if (m->expires < slot->expires)
            slot = m;
    }
    slot->addr = *a;
    snprintf(slot->name, sizeof slot->name, "%s", name);
    slot->expires = now + MEMORY_SECONDS * 1000LL;
    pthread_mutex_unlock(&lock);
}

/* Allowed by address alone, or by a name the stub answered with this address. */
static int addr_allowed(const struct np_addr *a, unsigned port, char *via, size_t via_cap)
{
    via[0] = '\0';
    if (np_decide(&policy, NULL, a, port))
        return 1;
    long long now = now_ms();
    int ok = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MEMORY_SLOTS && !ok; i++) {
        struct memory *m = &memory[i];
        if (m->expires > now && same_addr(&m->addr, a) && np_decide(&policy, m->name, a, port)) {
            snprintf(via, via_cap, "%s", m->name);
            ok = 1;
        }
    }
    pthread_mutex_unlock(&lock);
    return ok;
}

enum resolve_status { RESOLVED = 0, NO_SUCH_NAME = 1, RESOLVE_FAILED = 2 };

/* The parent's addresses for a (normalised) name, cached DNS_TTL seconds. */
static enum resolve_status resolve(const char *name, struct np_addr *out, int *n)
{
    long long now = now_ms();
    pthread_mutex_lock(&lock);
    for (int i = 0; i < CACHE_SLOTS; i++) {
        if (cache[i].expires > now && strcmp(cache[i].name, name) == 0) {
            *n = cache[i].n;
            if (*n > 0)
                memcpy(out, cache[i].addrs, sizeof(struct np_addr) * (size_t)*n);
            pthread_mutex_unlock(&lock);
            return *n < 0 ? NO_SUCH_NAME : RESOLVED;
        }
    }
    pthread_mutex_unlock(&lock);
    char request[NP_NAME_MAX + 8], answer[MAX_ADDRS * 48 + 16];
    snprintf(request, sizeof request, "R %s\n", name);
    int fd = parent_ask(request, answer, sizeof answer);
    if (fd < 0)
        return RESOLVE_FAILED;
    close(fd);
    enum resolve_status st;
    if (strcmp(answer, "ERR dns") == 0) {
        st = NO_SUCH_NAME;
        *n = -1;
    } else {
        *n = np_parse_answer(answer, strlen(answer), out, MAX_ADDRS);
        if (*n < 0) {
            say(PROG "resolve %s: the parent answered %s", name,
                strncmp(answer, "ERR ", 4) == 0 ? answer : "something malformed");
            return RESOLVE_FAILED;
        }
        st = RESOLVED;
    }
    pthread_mutex_lock(&lock);
    struct cached *slot = &cache[0];
    for (int i = 0; i < CACHE_SLOTS; i++)
        if (cache[i].expires < slot->expires)
            slot = &cache[i];
    snprintf(slot->name, sizeof slot->name, "%s", name);
    slot->n = *n;
    if (*n > 0)
        memcpy(slot->addrs, out, sizeof(struct np_addr) * (size_t)*n);
    slot->expires = now + DNS_TTL * 1000LL;
    pthread_mutex_unlock(&lock);
    return st;
}

/* ---- opening a connection through the parent ------------------------------------------------------ */

enum outcome { OPENED = 0, POLICY_REFUSED, PARENT_REFUSED, PARENT_TIMEOUT, NAME_FAILED, PARENT_DOWN };
static const char *const outcome_text[] = {"open", "refused by policy", "refused by the parent",
                                           "timed out at the parent", "name does not resolve",
                                           "parent unreachable"};

static int connect_addr(const struct np_addr *a, unsigned port, enum outcome *why)
{
    char text[64], request[96], answer[64];
    np_format_addr(a, text, sizeof text);
    snprintf(request, sizeof request, "C %s %u\n", text, port);
    int fd = parent_ask(request, answer, sizeof answer);
    if (fd < 0) {
        *why = PARENT_DOWN;
        return -1;
    }
    if (strcmp(answer, "OK") == 0) {
        *why = OPENED;
        return fd;
    }
    close(fd);
    *why = strcmp(answer, "ERR timeout") == 0 ? PARENT_TIMEOUT
         : strcmp(answer, "ERR dns") == 0     ? NAME_FAILED
                                              : PARENT_REFUSED;
    return -1;
}

/* host: an address literal or a name. Checked against the policy, then opened via the parent. */
static int open_destination(const char *host, unsigned port, enum outcome *why, char *shown, size_t shown_cap)
{
    struct np_addr a;
    char name[NP_NAME_MAX + 1], via[NP_NAME_MAX + 1];
    if (np_parse_addr(host, &a) == 0) {
        np_format_addr(&a, shown, shown_cap);
        if (!addr_allowed(&a, port, via, sizeof via)) {
            *why = POLICY_REFUSED;
            return -1;
        }
        return connect_addr(&a, port, why);
    }
    if (np_normalize_name(host, strlen(host), name) != 0) {
        snprintf(shown, shown_cap, "(not a host name)");
        *why = POLICY_REFUSED;
        return -1;
    }
    snprintf(shown, shown_cap, "%s", name);
    if (!np_name_allowed(&policy, name)) {
        *why = POLICY_REFUSED;
        return -1;
    }
    struct np_addr addrs[MAX_ADDRS];
    int n = 0;
    enum resolve_status st = resolve(name, addrs, &n);
    if (st != RESOLVED) {
        *why = st == NO_SUCH_NAME ? NAME_FAILED : PARENT_DOWN;
        return -1;
    }
    *why = n > 0 ? POLICY_REFUSED : NAME_FAILED;
    for (int i = 0; i < n; i++) {
        if (!np_decide(&policy, name, &addrs[i], port))
            continue;
        remember(name, &addrs[i]);
        int fd = connect_addr(&addrs[i], port, why);
        if (fd >= 0 || *why == PARENT_DOWN)
            return fd;
    }
    return -1;
}

static void log_conn(unsigned long long id, const char *kind, const char *dest, unsigned port, enum outcome o)
{
    say(PROG "%s %llu: %s port %u: %s", kind, id, dest, port, outcome_text[o]);
}

static void carry(unsigned long long id, const char *kind, int app, int up, const char *dest, unsigned port)
{
    uint64_t out = 0, in = 0;
    long long start = now_ms();
    relay(app, up, &out, &in);
    say(PROG "%s %llu: %s port %u: closed, %llu bytes out, %llu bytes in, %lld ms", kind, id, dest, port,
        (unsigned long long)out, (unsigned long long)in, now_ms() - start);
}

/* ---- HTTP proxy ----------------------------------------------------------------------------------- */

static void http_error(int fd, int code, const char *reason)
{
    char body[160], head[320];
    int bl = snprintf(body, sizeof body, "nitroconv egress: %s\n", reason);
    int hl = snprintf(head, sizeof head,
                      "HTTP/1.1 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %d\r\nConnection: close\r\n\r\n",
                      code, code == 403 ? "Forbidden" : code == 400 ? "Bad Request" : code == 504 ? "Gateway Timeout"
                          : code == 503 ? "Service Unavailable" : "Bad Gateway", bl);
    send_all(fd, head, (size_t)hl, 2000);
    send_all(fd, body, (size_t)bl, 2000);
}

static int outcome_status(enum outcome o)
{
    switch (o) {
    case POLICY_REFUSED: return 403;
    case PARENT_TIMEOUT: return 504;
    default: return 502;
    }
}

/* "host:port", "[v6]:port" or (default_port) "host"; host written to out. */
static int split_host_port(const char *s, size_t len, char *out, size_t cap, unsigned *port, unsigned default_port)
{
    const char *host = s, *end = s + len, *colon = NULL;
    size_t hlen;
    if (len && s[0] == '[') {
        const char *close = memchr(s, ']', len);
        if (!close)
            return -1;
        host = s + 1;
        hlen = (size_t)(close - host);
        if (close + 1 < end) {
            if (close[1] != ':')
                return -1;
            colon = close + 1;
        }
    } else {
        colon = memrchr(s, ':', len);
        hlen = colon ? (size_t)(colon - s) : len;
    }
    if (hlen == 0 || hlen >= cap)
        return -1;
    memcpy(out, host, hlen);
    out[hlen] = '\0';
    if (!colon) {
        if (!default_port)
            return -1;
        *port = default_port;
        return 0;
    }
    unsigned long p = 0;
    const char *q = colon + 1;
    if (q >= end)
        return -1;
    for (; q < end; q++) {
        if (*q < '0' || *q > '9')
            return -1;
        p = p * 10 + (unsigned long)(*q - '0');
        if (p > 65535)
            return -1;
    }
    if (p < 1)
        return -1;
    *port = (unsigned)p;
    return 0;
}

static int header_is(const char *line, size_t len, const char *name)
{
    size_t n = strlen(name);
    return len > n && line[n] == ':' && strncasecmp(line, name, n) == 0;
}

static void proxy_client(int fd, unsigned long long id)
{
    char *head = malloc(HEAD_MAX + 1);
    if (!head)
        return;
    size_t got = 0;
    char *end = NULL;
    long long deadline = now_ms() + HEAD_TIMEOUT_MS;
    while (!end) {
        long long left = deadline - now_ms();
        struct pollfd p = {fd, POLLIN, 0};
        if (left <= 0 || got == HEAD_MAX) {
            if (got == HEAD_MAX)
                http_error(fd, 400, "request head too large");
            goto out;
        }
        if (poll(&p, 1, (int)left) <= 0)
            continue;
        ssize_t r = recv(fd, head + got, HEAD_MAX - got, 0);
        if (r <= 0)
            goto out;
        got += (size_t)r;
        head[got] = '\0';
        end = memmem(head, got, "\r\n\r\n", 4);
    }
    size_t head_len = (size_t)(end - head) + 4;
    char *line_end = memmem(head, head_len, "\r\n", 2);
    char *sp1 = memchr(head, ' ', (size_t)(line_end - head));
    char *sp2 = sp1 ? memchr(sp1 + 1, ' ', (size_t)(line_end - sp1 - 1)) : NULL;
    if (!sp1 || !sp2) {
        http_error(fd, 400, "malformed request line");
        goto out;
    }
    char host[300];
    unsigned port = 0;
    const char *target = sp1 + 1;
    size_t target_len = (size_t)(sp2 - target);
    int is_connect = (size_t)(sp1 - head) == 7 && memcmp(head, "CONNECT", 7) == 0;
    const char *path = "/";
    size_t path_len = 1;
    if (is_connect) {
        if (split_host_port(target, target_len, host, sizeof host, &port, 0)) {
            http_error(fd, 400, "CONNECT needs host:port");
            goto out;
        }
    } else {
        if (target_len < 8 || strncasecmp(target, "http://", 7) != 0) {
            http_error(fd, 400, "a proxy request needs an absolute http:// URL (or CONNECT)");
            goto out;
        }
        const char *authority = target + 7;
        const char *slash = memchr(authority, '/', target_len - 7);
        size_t alen = slash ? (size_t)(slash - authority) : target_len - 7;
        const char *at = memchr(authority, '@', alen);
        if (at) { /* user info is not sent on */
            alen -= (size_t)(at + 1 - authority);
            authority = at + 1;
        }
        if (split_host_port(authority, alen, host, sizeof host, &port, 80)) {
            http_error(fd, 400, "bad host in the URL");
            goto out;
        }
        if (slash) {
            path = slash;
            path_len = (size_t)(target + target_len - slash);
        }
    }
    enum outcome why;
    char shown[NP_NAME_MAX + 1];
    int up = open_destination(host, port, &why, shown, sizeof shown);
    log_conn(id, "proxy", shown, port, why);
    if (up < 0) {
        http_error(fd, outcome_status(why), outcome_text[why]);
        goto out;
    }
    if (is_connect) {
        static const char ok[] = "HTTP/1.1 200 Connection established\r\n\r\n";
        if (send_all(fd, ok, sizeof ok - 1, 5000) < 0 ||
            (got > head_len && send_all(up, head + head_len, got - head_len, PARENT_TIMEOUT_MS) < 0)) {
            close(up);
            goto out;
        }
    } else {
        /* The request line in origin form, the headers without hop-by-hop proxy ones, then Connection: close:
         * one connection per request keeps each destination checked on its own. */
        char *out_head = malloc(HEAD_MAX + 64);
        size_t o = 0;
        if (!out_head) {
            close(up);
            goto out;
        }
        memcpy(out_head, head, (size_t)(sp1 - head) + 1);
        o = (size_t)(sp1 - head) + 1;
        memcpy(out_head + o, path, path_len);
        o += path_len;
        memcpy(out_head + o, sp2, (size_t)(line_end - sp2) + 2);
        o += (size_t)(line_end - sp2) + 2;
        for (char *l = line_end + 2; l < end + 2;) {
            char *le = memmem(l, (size_t)(end + 2 - l), "\r\n", 2);
            size_t ll = (size_t)(le - l);
            if (!header_is(l, ll, "proxy-connection") && !header_is(l, ll, "proxy-authorization") &&
                !header_is(l, ll, "connection") && !header_is(l, ll, "keep-alive")) {
                memcpy(out_head + o, l, ll + 2);
                o += ll + 2;
            }
            l = le + 2;
        }
        o += (size_t)snprintf(out_head + o, 64, "Connection: close\r\n\r\n");
        int bad = send_all(up, out_head, o, PARENT_TIMEOUT_MS) < 0 ||
                  (got > head_len && send_all(up, head + head_len, got - head_len, PARENT_TIMEOUT_MS) < 0);
        free(out_head);
        if (bad) {
            close(up);
            goto out;
        }
    }
    free(head);
    head = NULL;
    carry(id, "proxy", fd, up, shown, port);
    close(up);
out:
    free(head);
}

/* ---- transparent ---------------------------------------------------------------------------------- */

static void transparent_client(int fd, unsigned long long id)
{
    struct sockaddr_in dst;
    socklen_t len = sizeof dst;
    if (getsockopt(fd, SOL_IP, SO_ORIGINAL_DST, &dst, &len) < 0) {
        say(PROG "transparent %llu: no original destination: %s", id, strerror(errno));
        return;
    }
    struct np_addr a = {.family = 4};
    memcpy(a.b, &dst.sin_addr, 4);
    char text[64];
    np_format_addr(&a, text, sizeof text);
    enum outcome why;
    char shown[NP_NAME_MAX + 1];
    int up = open_destination(text, ntohs(dst.sin_port), &why, shown, sizeof shown);
    log_conn(id, "transparent", shown, ntohs(dst.sin_port), why);
    if (up < 0) {
        /* A reset, not a clean end: the program sees the connection refused rather than an empty answer. */
        struct linger lg = {1, 0};
        setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
        return;
    }
    carry(id, "transparent", fd, up, shown, ntohs(dst.sin_port));
    close(up);
}

/* ---- DNS stub ------------------------------------------------------------------------------------- */

#define DNS_MAX 4096

/* Answers one query message; returns the answer's length, 0 to say nothing (not a query we can read). */
static size_t dns_answer(const uint8_t *q, size_t qlen, uint8_t *out, size_t cap)
{
    if (qlen < 12 || cap < 512)
        return 0;
    if (q[2] & 0x80) /* a response, not a query */
        return 0;
    unsigned opcode = (q[2] >> 3) & 0x0F, qd = (unsigned)(q[4] << 8 | q[5]);
    char name[NP_NAME_MAX + 2], norm[NP_NAME_MAX + 1];
    size_t p = 12, nl = 0;
    int rcode = 0, readable = opcode == 0 && qd == 1;
    while (readable) {
        if (p >= qlen) {
            readable = 0;
            break;
        }
        unsigned l = q[p++];
        if (l == 0)
            break;
        if (l > 63 || p + l > qlen || nl + l + 1 > sizeof name - 1) {
            readable = 0;
            break;
        }
        if (nl)
            name[nl++] = '.';
        for (unsigned i = 0; i < l; i++) {
            char c = (char)q[p + i];
            name[nl++] = (c == '.' || c == 0) ? '\x01' : c; /* such labels never normalise */
        }
        p += l;
    }
    name[nl] = '\0';
    if (readable && p + 4 > qlen)
        readable = 0;
    size_t qend = readable ? p + 4 : 12;
    unsigned qtype = readable ? (unsigned)(q[p] << 8 | q[p + 1]) : 0;
    unsigned qclass = readable ? (unsigned)(q[p + 2] << 8 | q[p + 3]) : 0;
    memcpy(out, q, qend);
    out[2] = (uint8_t)(0x80 | (q[2] & 0x79)); /* QR, the query's opcode and RD */
    out[3] = 0x80;                            /* RA */
    out[4] = 0, out[5] = readable ? 1 : 0;
    memset(out + 6, 0, 6);
    size_t o = qend;
    if (!readable) {
        rcode = opcode == 0 ? 1 : 4; /* FORMERR, NOTIMP */
    } else if (np_normalize_name(name, nl, norm) != 0 || !np_name_allowed(&policy, norm)) {
        rcode = 3; /* NXDOMAIN: the policy does not let this name out */
    } else if (qclass != 1) {
        rcode = 4;
    } else {
        struct np_addr addrs[MAX_ADDRS];
        int n = 0;
        enum resolve_status st = resolve(norm, addrs, &n);
        if (st == NO_SUCH_NAME) {
            rcode = 3;
        } else if (st != RESOLVED) {
            rcode = 2; /* SERVFAIL */
        } else {
            /* Only IPv4 answers (transparent mode carries IPv4; IPv6 leaves by name, through the proxy), and
             * only those the policy lets out for this name. None left: the name does not exist for the
             * program, whatever the type asked; else A gets them and any other type no data. */
            unsigned count = 0;
            for (int i = 0; i < n; i++) {
                if (addrs[i].family != 4 || !np_answer_allowed(&policy, norm, &addrs[i]))
                    continue;
                remember(norm, &addrs[i]);
                if (qtype == 1 && o + 16 <= cap) { /* 512 bytes over UDP: no truncation, fewer answers */
                    const uint8_t rr[12] = {0xC0, 0x0C, 0, 1, 0, 1, 0, 0, 0, DNS_TTL, 0, 4};
                    memcpy(out + o, rr, sizeof rr);
                    memcpy(out + o + sizeof rr, addrs[i].b, 4);
                    o += sizeof rr + 4;
                    out[7] = (uint8_t)(out[7] + 1);
                }
                count++;
            }
            if (count == 0)
                rcode = 3;
        }
    }
    out[3] = (uint8_t)(0x80 | rcode);
    return o;
}

struct udp_job {
    int fd;
    struct sockaddr_in from;
    size_t len;
    uint8_t q[DNS_MAX];
};

static void *udp_worker(void *arg)
{
    struct udp_job *job = arg;
    uint8_t out[DNS_MAX];
    size_t n = dns_answer(job->q, job->len, out, 512);
    if (n)
        sendto(job->fd, out, n, 0, (struct sockaddr *)&job->from, sizeof job->from);
    free(job);
    atomic_fetch_sub(&dns_inflight, 1);
    return NULL;
}

static pthread_attr_t thread_attr;

static void *dns_udp_loop(void *arg)
{
    int fd = (int)(intptr_t)arg;
    for (;;) {
        struct udp_job *job = malloc(sizeof *job);
        if (!job) {
            sleep(1);
            continue;
        }
        socklen_t fl = sizeof job->from;
        ssize_t r = recvfrom(fd, job->q, sizeof job->q, 0, (struct sockaddr *)&job->from, &fl);
        if (r <= 0) {
            free(job);
            continue;
        }
        job->fd = fd;
        job->len = (size_t)r;
        pthread_t t;
        if (atomic_fetch_add(&dns_inflight, 1) >= MAX_DNS_INFLIGHT ||
            pthread_create(&t, &thread_attr, udp_worker, job) != 0) {
            /* Too many lookups waiting on the parent: fail this one at once rather than queue it. */
            atomic_fetch_sub(&dns_inflight, 1);
            if (r >= 12) {
                uint8_t out[12];
                memcpy(out, job->q, 12);
                out[2] = (uint8_t)(0x80 | (job->q[2] & 0x79));
                out[3] = 0x82;
                memset(out + 4, 0, 8);
                sendto(fd, out, sizeof out, 0, (struct sockaddr *)&job->from, fl);
            }
            free(job);
        }
    }
    return NULL;
}

static void dns_tcp_client(int fd, unsigned long long id)
{
    (void)id;
    uint8_t *q = malloc(2 + 65535), *out = malloc(2 + DNS_MAX);
    while (q && out) {
        uint8_t lenb[2];
        if (read_exact(fd, lenb, 2, 10000) < 0)
            break;
        size_t len = (size_t)(lenb[0] << 8 | lenb[1]);
        if (read_exact(fd, q, len, 10000) < 0)
            break;
        size_t n = dns_answer(q, len, out + 2, DNS_MAX);
        if (!n)
            break;
        out[0] = (uint8_t)(n >> 8);
        out[1] = (uint8_t)n;
        if (send_all(fd, out, n + 2, 10000) < 0)
            break;
    }
    free(q);
    free(out);
}

/* ---- listeners ------------------------------------------------------------------------------------ */

struct listener {
    int fd;
    void (*serve)(int, unsigned long long);
};

struct conn_job {
    int fd;
    unsigned long long id;
    void (*serve)(int, unsigned long long);
};

static void *conn_worker(void *arg)
{
    struct conn_job job = *(struct conn_job *)arg;
    free(arg);
    job.serve(job.fd, job.id);
    close(job.fd);
    atomic_fetch_sub(&conns, 1);
    return NULL;
}

static void *accept_loop(void *arg)
{
    struct listener *l = arg;
    for (;;) {
        int fd = accept4(l->fd, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EMFILE || errno == ENFILE || errno == ENOMEM || errno == ENOBUFS)
                usleep(100000);
            continue;
        }
        unsigned long long id = atomic_fetch_add(&conn_ids, 1) + 1;
        struct conn_job *job = NULL;
        pthread_t t;
        if (atomic_fetch_add(&conns, 1) >= MAX_CONNS || !(job = malloc(sizeof *job))) {
            atomic_fetch_sub(&conns, 1);
            if (l->serve == proxy_client)
                http_error(fd, 503, "too many connections");
            say(PROG "connection %llu refused: %d open", id, MAX_CONNS);
            close(fd);
            continue;
        }
        job->fd = fd;
        job->id = id;
        job->serve = l->serve;
        if (pthread_create(&t, &thread_attr, conn_worker, job) != 0) {
            free(job);
            atomic_fetch_sub(&conns, 1);
            close(fd);
        }
    }
    return NULL;
}

static int bind_loopback(int type, unsigned port)
{
    int fd = socket(AF_INET, type | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0 || (type == SOCK_STREAM && listen(fd, 256) < 0)) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

/* ---- the network: lo up, a default route over lo, the nat OUTPUT rule ---------------------------- */

static int loopback_up(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
    int rc = ioctl(fd, SIOCGIFFLAGS, &ifr);
    if (rc == 0 && !(ifr.ifr_flags & IFF_UP)) {
        ifr.ifr_flags |= IFF_UP;
        rc = ioctl(fd, SIOCSIFFLAGS, &ifr);
    }
    close(fd);
    return rc;
}

/* `ip route add default dev lo src 127.0.0.1`: without a route, connect() to an outside address fails before the nat
 * rule ever sees the packet. EEXIST is fine. */
static int default_route_via_lo(void)
{
    struct {
        struct nlmsghdr nh;
        struct rtmsg rt;
        struct rtattr oif_attr;
        int oif;
        struct rtattr src_attr;
        struct in_addr src;
    } req;
    memset(&req, 0, sizeof req);
    req.nh.nlmsg_len = sizeof req;
    req.nh.nlmsg_type = RTM_NEWROUTE;
    req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
    req.nh.nlmsg_seq = 1;
    req.rt.rtm_family = AF_INET;
    req.rt.rtm_table = RT_TABLE_MAIN;
    req.rt.rtm_protocol = RTPROT_BOOT;
    req.rt.rtm_scope = RT_SCOPE_LINK;
    req.rt.rtm_type = RTN_UNICAST;
    req.oif_attr.rta_len = RTA_LENGTH(sizeof(int));
    req.oif_attr.rta_type = RTA_OIF;
    req.oif = (int)if_nametoindex("lo");
    /* Without a preferred source the redirected connections would come from 0.0.0.0. */
    req.src_attr.rta_len = RTA_LENGTH(sizeof(struct in_addr));
    req.src_attr.rta_type = RTA_PREFSRC;
    req.src.s_addr = htonl(INADDR_LOOPBACK);
    if (req.oif == 0)
        return -1;
    int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (fd < 0)
        return -1;
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    if (sendto(fd, &req, sizeof req, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0) {
        close(fd);
        return -1;
    }
    char buf[1024];
    ssize_t r = recv(fd, buf, sizeof buf, 0);
    close(fd);
    if (r < (ssize_t)(sizeof(struct nlmsghdr) + sizeof(struct nlmsgerr)))
        return -1;
    struct nlmsghdr *nh = (struct nlmsghdr *)buf;
    if (nh->nlmsg_type != NLMSG_ERROR)
        return -1;
    int err = ((struct nlmsgerr *)NLMSG_DATA(nh))->error;
    if (err && err != -EEXIST) {
        errno = -err;
        return -1;
    }
    return 0;
}

/* The nat table replaced by: every hook ACCEPT, and in OUTPUT first
 *   -p tcp ! -d 127.0.0.0/8 -j REDIRECT --to-ports 3129
 * written as iptables-legacy would (IPT_SO_SET_REPLACE on a raw socket): the enclave has no iptables
 * binary, and the kernel has legacy xtables (CONFIG_IP_NF_NAT, CONFIG_IP_NF_TARGET_REDIRECT), not nftables. */
#define STD_SIZE (sizeof(struct ipt_entry) + XT_ALIGN(sizeof(struct xt_standard_target)))
#define REDIRECT_TARGET_SIZE XT_ALIGN(sizeof(struct xt_entry_target) + sizeof(struct nf_nat_ipv4_multi_range_compat))
#define REDIRECT_SIZE (sizeof(struct ipt_entry) + REDIRECT_TARGET_SIZE)
#define ERROR_SIZE (sizeof(struct ipt_entry) + XT_ALIGN(sizeof(struct xt_error_target)))
#define TABLE_SIZE (4 * STD_SIZE + REDIRECT_SIZE + ERROR_SIZE)

/* An ACCEPT policy entry at `at` (8-byte aligned); returns the next offset. */
static size_t put_accept(uint8_t *entries, size_t at)
{
    struct ipt_entry *e = (struct ipt_entry *)(void *)(entries + at);
    e->target_offset = sizeof *e;
    e->next_offset = STD_SIZE;
    struct xt_standard_target *t = (struct xt_standard_target *)(void *)(entries + at + sizeof *e);
    t->target.u.user.target_size = XT_ALIGN(sizeof *t);
    t->verdict = -NF_ACCEPT - 1;
    return at + STD_SIZE;
}

static int install_redirect(void)
{
    int fd = socket(AF_INET, SOCK_RAW | SOCK_CLOEXEC, IPPROTO_RAW);
    if (fd < 0)
        return -1;
    struct ipt_getinfo info;
    memset(&info, 0, sizeof info);
    snprintf(info.name, sizeof info.name, "nat");
    socklen_t ilen = sizeof info;
    if (getsockopt(fd, IPPROTO_IP, IPT_SO_GET_INFO, &info, &ilen) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    /* ipt_replace, then the entries right after it; uint64_t keeps every entry 8-byte aligned. */
    static uint64_t buf[(sizeof(struct ipt_replace) + TABLE_SIZE) / 8 + 1];
    memset(buf, 0, sizeof buf);
    struct ipt_replace *r = (struct ipt_replace *)(void *)buf;
    uint8_t *entries = (uint8_t *)buf + sizeof *r;
    size_t at = 0;
    r->hook_entry[NF_INET_PRE_ROUTING] = r->underflow[NF_INET_PRE_ROUTING] = (unsigned)at;
    at = put_accept(entries, at);
    r->hook_entry[NF_INET_LOCAL_IN] = r->underflow[NF_INET_LOCAL_IN] = (unsigned)at;
    at = put_accept(entries, at);
    r->hook_entry[NF_INET_LOCAL_OUT] = (unsigned)at;
    struct ipt_entry *e = (struct ipt_entry *)(void *)(entries + at);
    e->ip.proto = IPPROTO_TCP;
    e->ip.dst.s_addr = htonl(0x7F000000);
    e->ip.dmsk.s_addr = htonl(0xFF000000);
    e->ip.invflags = IPT_INV_DSTIP;
    e->target_offset = sizeof *e;
    e->next_offset = REDIRECT_SIZE;
    struct xt_entry_target *t = (struct xt_entry_target *)(void *)(entries + at + sizeof *e);
    t->u.user.target_size = REDIRECT_TARGET_SIZE;
    snprintf(t->u.user.name, sizeof t->u.user.name, "REDIRECT");
    struct nf_nat_ipv4_multi_range_compat *range = (struct nf_nat_ipv4_multi_range_compat *)(void *)(t + 1);
    range->rangesize = 1;
    range->range[0].flags = NF_NAT_RANGE_PROTO_SPECIFIED;
    range->range[0].min.tcp.port = range->range[0].max.tcp.port = htons(TRANSPARENT_PORT);
    at += REDIRECT_SIZE;
    r->underflow[NF_INET_LOCAL_OUT] = (unsigned)at;
    at = put_accept(entries, at);
    r->hook_entry[NF_INET_POST_ROUTING] = r->underflow[NF_INET_POST_ROUTING] = (unsigned)at;
    at = put_accept(entries, at);
    e = (struct ipt_entry *)(void *)(entries + at);
    e->target_offset = sizeof *e;
    e->next_offset = ERROR_SIZE;
    struct xt_error_target *err = (struct xt_error_target *)(void *)(entries + at + sizeof *e);
    err->target.u.user.target_size = XT_ALIGN(sizeof *err);
    snprintf(err->target.u.user.name, sizeof err->target.u.user.name, "%s", XT_ERROR_TARGET);
    snprintf(err->errorname, sizeof err->errorname, "ERROR");
    at += ERROR_SIZE;

    snprintf(r->name, sizeof r->name, "nat");
    r->valid_hooks = info.valid_hooks;
    r->num_entries = 6;
    r->size = (unsigned)at;
    r->num_counters = info.num_entries;
    struct xt_counters *counters = calloc(info.num_entries ? info.num_entries : 1, sizeof *counters);
    r->counters = counters;
    int rc = counters ? setsockopt(fd, IPPROTO_IP, IPT_SO_SET_REPLACE, buf, (socklen_t)(sizeof *r + at)) : -1;
    int saved = errno;
    free(counters);
    close(fd);
    errno = saved;
    return rc;
}

/* ---- start ---------------------------------------------------------------------------------------- */

static int read_policy(const char *path)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        say(PROG "no policy at %s (%s): no egress", path, strerror(errno));
        return -1;
    }
    static char text[NP_MAX_JSON + 1];
    size_t len = 0;
    for (;;) {
        ssize_t r = read(fd, text + len, sizeof text - len);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            break;
        len += (size_t)r;
        if (len == sizeof text)
            break;
    }
    close(fd);
    const char *why = np_parse(text, len, &policy);
    if (why) {
        say(PROG "policy %s refused (%s): no egress", path, why);
        return -1;
    }
    return 0;
}

int main(int argc, char **argv)
{
    const char *policy_path = DEFAULT_POLICY;
    int foreground = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--policy") == 0 && i + 1 < argc)
            policy_path = argv[++i];
        else if (strcmp(argv[i], "--parent-uds") == 0 && i + 1 < argc)
            parent_uds = argv[++i];
        else if (strcmp(argv[i], "--foreground") == 0)
            foreground = 1;
        else {
            say(PROG "usage: egressd [--policy PATH] [--parent-uds PATH] [--foreground]");
            return 2;
        }
    }
    signal(SIGPIPE, SIG_IGN);
    if (read_policy(policy_path) < 0 || policy.mode == NP_MODE_NONE) {
        if (policy.mode == NP_MODE_NONE)
            say(PROG "egress mode none: not started");
        return 0;
    }
    memory = calloc(MEMORY_SLOTS, sizeof *memory);
    if (!memory)
        return 1;
    if (loopback_up() < 0)
        say(PROG "cannot bring lo up: %s", strerror(errno));
    int udp = bind_loopback(SOCK_DGRAM, DNS_PORT), tcp = bind_loopback(SOCK_STREAM, DNS_PORT);
    int proxy = bind_loopback(SOCK_STREAM, PROXY_PORT);
    int transparent = -1;
    if (udp < 0 || tcp < 0)
        say(PROG "DNS stub on 127.0.0.1:%d: %s", DNS_PORT, strerror(errno));
    if (proxy < 0)
        say(PROG "proxy on 127.0.0.1:%d: %s", PROXY_PORT, strerror(errno));
    if (policy.mode == NP_MODE_TRANSPARENT) {
        transparent = bind_loopback(SOCK_STREAM, TRANSPARENT_PORT);
        if (transparent < 0)
            say(PROG "transparent listener on 127.0.0.1:%d: %s", TRANSPARENT_PORT, strerror(errno));
        else if (default_route_via_lo() < 0)
            say(PROG "default route over lo: %s; transparent egress is off", strerror(errno));
        else if (install_redirect() < 0)
            say(PROG "nat OUTPUT REDIRECT rule: %s; transparent egress is off", strerror(errno));
        else
            say(PROG "transparent: TCP to outside addresses goes through 127.0.0.1:%d", TRANSPARENT_PORT);
    }
    say(PROG "egress %s: %zu allow rule(s), %zu deny rule(s); proxy 127.0.0.1:%d, DNS 127.0.0.1:%d",
        policy.mode == NP_MODE_PROXY ? "proxy" : "transparent", policy.n_allow, policy.n_deny, PROXY_PORT, DNS_PORT);
    if (!foreground) {
        pid_t pid = fork();
        if (pid < 0)
            return 1;
        if (pid > 0)
            return 0; /* the sockets are bound: the program can start */
        setsid();
    }
    pthread_attr_init(&thread_attr);
    pthread_attr_setdetachstate(&thread_attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&thread_attr, THREAD_STACK);
    static struct listener ls[3];
    int nl = 0;
    if (tcp >= 0)
        ls[nl++] = (struct listener){tcp, dns_tcp_client};
    if (proxy >= 0)
        ls[nl++] = (struct listener){proxy, proxy_client};
    if (transparent >= 0)
        ls[nl++] = (struct listener){transparent, transparent_client};
    pthread_t t;
    for (int i = 0; i < nl; i++)
        pthread_create(&t, &thread_attr, accept_loop, &ls[i]);
    if (udp >= 0)
        dns_udp_loop((void *)(intptr_t)udp);
    for (;;)
        pause();
}
