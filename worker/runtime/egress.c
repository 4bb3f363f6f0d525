/*
 * nitroconv egress: the parent side of an enclave's outbound connections (/enclave/egress, spawned by the
 * launcher /enclave/run). It listens on vsock port 9002; the enclave's egressd has already checked each
 * destination against the build's policy, and asks with one line:
 *
 *   "C <host-or-ip> <port>\n"  -> "OK\n", then raw bytes both ways; or "ERR <code>\n" and close
 *   "R <name>\n"               -> "A <ip> <ip>…\n" (maybe none) or "ERR <code>\n", then close
 *
 * codes: refused (the destination refused, or this service did: too many connections, a bad request),
 * unreachable, timeout, dns (the name does not resolve). This side is untrusted by the enclave: it only
 * dials, counts and logs (one line per connection: destination, outcome, bytes each way, duration; never
 * payloads). A thread per connection, bounded by --max-conns, so a slow peer or a storm of connections
 * cannot wedge the others.
 *
 *   egress [--listen-uds PATH] [--max-conns N] [--connect-timeout SECONDS] [--policy FILE]
 *
 * NITROCONV_RUN_VSOCK_UDS=BASE (nitroconv run-local, as for the launcher): listen on the Unix socket
 * BASE_9002 where the emulator's vsock back-end delivers the enclave's connections to port 9002;
 * --listen-uds PATH listens on PATH itself (tests).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <arpa/inet.h>
#include <linux/vm_sockets.h>

#include "netpolicy.h"
#include "netrelay.h"

#define PROG "nitroconv-egress: "
#define EGRESS_PORT 9002
#define ENV_VSOCK_UDS "NITROCONV_RUN_VSOCK_UDS"
#define LINE_MAX_BYTES 320
#define REQUEST_TIMEOUT_MS 10000
#define ANSWER_MAX_ADDRS 16
#define THREAD_STACK (256 * 1024)
#define LAUNCH_JSON "/enclave/launch.json"
#define ENV_LAUNCH_JSON "NITROCONV_RUN_LAUNCH_JSON"
#define MEMORY_SLOTS 4096
#define MEMORY_MS (600 * 1000LL)

static struct np_policy policy; /* policy.present: enforced */
struct memory {
    struct np_addr addr;
    char name[NP_NAME_MAX + 1];
    long long expires;
};
static struct memory *memory;
static pthread_mutex_t memory_lock = PTHREAD_MUTEX_INITIALIZER;

static void to_np_addr(const struct sockaddr *sa, struct np_addr *a)
{
    memset(a, 0, sizeof *a);
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)(const void *)sa;
        char text[INET6_ADDRSTRLEN];
        inet_ntop(AF_INET6, &s6->sin6_addr, text, sizeof text);
        np_parse_addr(text, a); /* folds IPv4-mapped addresses into IPv4, as the policy sees them */
    } else {
        a->family = 4;
        memcpy(a->b, &((const struct sockaddr_in *)(const void *)sa)->sin_addr, 4);
    }
}

static int same_addr(const struct np_addr *a, const struct np_addr *b)
{
    return a->family == b->family && memcmp(a->b, b->b, a->family == 4 ? 4 : 16) == 0;
}

static void remember(const char *name, const struct np_addr *a)
{
    long long now = now_ms();
    pthread_mutex_lock(&memory_lock);
    struct memory *slot = &memory[0];
    for (int i = 0; i < MEMORY_SLOTS; i++) {
        if (same_addr(&memory[i].addr, a) && strcmp(memory[i].name, name) == 0) {
            slot = &memory[i];
            break;
        }
        if (memory[i].expires < slot->expires)
            slot = &memory[i];
    }
    slot->addr = *a;
    snprintf(slot->name, sizeof slot->name, "%s", name);
    slot->expires = now + MEMORY_MS;
    pthread_mutex_unlock(&memory_lock);
}

/* name: the normalised name asked for, or NULL when an address was. */
static int allowed(const char *name, const struct np_addr *a, unsigned port)
{
    if (!policy.present)
        return 1;
    if (name)
        return np_decide(&policy, name, a, port);
    if (np_decide(&policy, NULL, a, port))
        return 1;
    long long now = now_ms();
    int ok = 0;
    pthread_mutex_lock(&memory_lock);
    for (int i = 0; i < MEMORY_SLOTS && !ok; i++)
        ok = memory[i].expires > now && same_addr(&memory[i].addr, a) && np_decide(&policy, memory[i].name, a, port);
    pthread_mutex_unlock(&memory_lock);
    return ok;
}

static int max_conns = 1024;
static int connect_timeout_ms = 10000;
static atomic_int active;
static atomic_ullong total, failed, bytes_up, bytes_down;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    size_t len = (size_t)n < sizeof line - 1 ? (size_t)n : sizeof line - 2;
    line[len++] = '\n';
    /* One write per line: connection threads log concurrently. */
    char out[sizeof line + sizeof PROG];
    memcpy(out, PROG, sizeof PROG - 1);
    memcpy(out + sizeof PROG - 1, line, len);
    if (write(STDERR_FILENO, out, sizeof PROG - 1 + len) < 0) {
        /* nowhere else to say it */
    }
}

/* A host as asked: an address literal or a DNS name of letters, digits, '-', '_' and '.'. */
static int host_ok(const char *h)
{
    size_t n = strlen(h);
    if (n == 0 || n > 253)
        return 0;
    struct in6_addr a6;
    if (strchr(h, ':'))
        return inet_pton(AF_INET6, h, &a6) == 1;
    for (const char *p = h; *p; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= 'A' && *p <= 'Z') || (*p >= '0' && *p <= '9') || *p == '-' ||
              *p == '_' || *p == '.'))
            return 0;
    return 1;
}

static const char *gai_code(int rc)
{
    if (rc == EAI_AGAIN)
        return "timeout";
    return "dns";
}

static const char *errno_code(int e)
{
    switch (e) {
    case ECONNREFUSED: return "refused";
    case EACCES: return "refused";
    case ETIMEDOUT: return "timeout";
    default: return "unreachable";
    }
}

/* Dials host:port within connect_timeout_ms (every address in turn). Returns the socket, or -1 with *code. */
static int dial(const char *host, unsigned port, const char **code, char *peer, size_t peer_cap)
{
    char name[NP_NAME_MAX + 1];
    int by_name = np_normalize_name(host, strlen(host), name) == 0;
    if (policy.present && by_name && !np_name_allowed(&policy, name)) {
        *code = "refused";
        return -1;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV;
    char service[8];
    snprintf(service, sizeof service, "%u", port);
    int rc = getaddrinfo(host, service, &hints, &res);
    if (rc != 0) {
        *code = gai_code(rc);
        return -1;
    }
    long long deadline = now_ms() + connect_timeout_ms;
    int last = EHOSTUNREACH, fd = -1;
    for (struct addrinfo *ai = res; ai; ai = ai->ai_next) {
        struct np_addr a;
        to_np_addr(ai->ai_addr, &a);
        if (!allowed(by_name ? name : NULL, &a, port)) {
            last = EACCES;
            continue;
        }
        fd = socket(ai->ai_family, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
        if (fd < 0) {
            last = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            goto connected;
        if (errno == EINPROGRESS) {
            long long left = deadline - now_ms();
            struct pollfd p = {fd, POLLOUT, 0};
            int prc;
            do
                prc = poll(&p, 1, left > 0 ? (int)left : 0);
            while (prc < 0 && errno == EINTR);
            if (prc == 0) {
                last = ETIMEDOUT;
            } else {
                int err = 0;
                socklen_t len = sizeof err;
                getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len);
                if (err == 0)
                    goto connected;
                last = err;
            }
        } else {
            last = errno;
        }
        close(fd);
        fd = -1;
        if (now_ms() >= deadline) {
            last = ETIMEDOUT;
            break;
        }
        continue;
    connected:
        getnameinfo(ai->ai_addr, ai->ai_addrlen, peer, (socklen_t)peer_cap, NULL, 0, NI_NUMERICHOST);
        set_nonblock(fd, 0);
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        freeaddrinfo(res);
        return fd;
    }
    freeaddrinfo(res);
    *code = errno_code(last);
    return -1;
}

static void answer_resolve(int fd, unsigned long long id, const char *name)
{
    char norm[NP_NAME_MAX + 1];
    if (policy.present && (np_normalize_name(name, strlen(name), norm) != 0 || !np_name_allowed(&policy, norm))) {
        send_all(fd, "ERR dns\n", 8, REQUEST_TIMEOUT_MS);
        atomic_fetch_add(&failed, 1);
        say("conn %llu: resolve %s: refused by the policy", id, name);
        return;
    }
    struct addrinfo hints, *res = NULL;
    memset(&hints, 0, sizeof hints);
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(name, NULL, &hints, &res);
    char line[ANSWER_MAX_ADDRS * 48 + 8] = "A";
    size_t n = 1;
    int count = 0;
    if (rc == 0) {
        char seen[ANSWER_MAX_ADDRS][INET6_ADDRSTRLEN];
        for (struct addrinfo *ai = res; ai && count < ANSWER_MAX_ADDRS; ai = ai->ai_next) {
            char text[INET6_ADDRSTRLEN];
            if (getnameinfo(ai->ai_addr, ai->ai_addrlen, text, sizeof text, NULL, 0, NI_NUMERICHOST) != 0)
                continue;
            int dup = 0;
            for (int i = 0; i < count; i++)
                dup |= strcmp(seen[i], text) == 0;
            if (dup || strchr(text, '%'))
                continue;
            if (policy.present) {
                struct np_addr a;
                to_np_addr(ai->ai_addr, &a);
                if (!np_answer_allowed(&policy, norm, &a))
                    continue;
                remember(norm, &a);
            }
            strcpy(seen[count++], text);
            n += (size_t)snprintf(line + n, sizeof line - n, " %s", text);
        }
        freeaddrinfo(res);
        line[n++] = '\n';
    } else if (rc == EAI_NODATA) {
        line[n++] = '\n';
    } else {
        n = (size_t)snprintf(line, sizeof line, "ERR %s\n", gai_code(rc));
    }
    send_all(fd, line, n, REQUEST_TIMEOUT_MS);
    if (rc == 0 || rc == EAI_NODATA) {
        say("conn %llu: resolve %s: %d address(es)", id, name, count);
    } else {
        atomic_fetch_add(&failed, 1);
        say("conn %llu: resolve %s: %s", id, name, gai_strerror(rc));
    }
}

static void refuse(int fd, unsigned long long id, const char *code, const char *why)
{
    char line[32];
    int n = snprintf(line, sizeof line, "ERR %s\n", code);
    send_all(fd, line, (size_t)n, 1000);
    /* Closing with unread bytes would reset the connection and lose the answer: drain a moment first. */
    shutdown(fd, SHUT_WR);
    char sink[512];
    long long until = now_ms() + 1000;
    while (now_ms() < until) {
        struct pollfd p = {fd, POLLIN, 0};
        if (poll(&p, 1, 100) > 0 && recv(fd, sink, sizeof sink, MSG_DONTWAIT) == 0)
            break;
    }
    atomic_fetch_add(&failed, 1);
    say("conn %llu: refused: %s", id, why);
}

static void serve(int fd, unsigned long long id)
{
    char line[LINE_MAX_BYTES];
    int n = read_line(fd, line, sizeof line, REQUEST_TIMEOUT_MS);
    if (n < 0) {
        refuse(fd, id, "refused", errno == EMSGSIZE ? "request line too long" : "no request line");
        return;
    }
    if (n > 2 && line[0] == 'R' && line[1] == ' ') {
        if (!host_ok(line + 2) || strchr(line + 2, ':'))
            return refuse(fd, id, "refused", "R: not a DNS name");
        answer_resolve(fd, id, line + 2);
        return;
    }
    char host[LINE_MAX_BYTES];
    unsigned port = 0;
    char extra;
    if (n < 2 || line[0] != 'C' || line[1] != ' ' || sscanf(line + 2, "%319s %5u%c", host, &port, &extra) != 2 ||
        port < 1 || port > 65535 || !host_ok(host))
        return refuse(fd, id, "refused", "not a valid request line");
    const char *code = "unreachable";
    char peer[INET6_ADDRSTRLEN] = "?";
    long long start = now_ms();
    int out = dial(host, port, &code, peer, sizeof peer);
    if (out < 0) {
        char line_out[32];
        int k = snprintf(line_out, sizeof line_out, "ERR %s\n", code);
        send_all(fd, line_out, (size_t)k, 1000);
        atomic_fetch_add(&failed, 1);
        say("conn %llu: connect %s port %u: %s (%lld ms)", id, host, port, code, now_ms() - start);
        return;
    }
    if (send_all(fd, "OK\n", 3, REQUEST_TIMEOUT_MS) < 0) {
        close(out);
        say("conn %llu: connect %s port %u: the enclave went away", id, host, port);
        return;
    }
    say("conn %llu: connect %s port %u (%s): open, %d active", id, host, port, peer, atomic_load(&active));
    uint64_t up = 0, down = 0;
    relay(fd, out, &up, &down);
    close(out);
    atomic_fetch_add(&bytes_up, up);
    atomic_fetch_add(&bytes_down, down);
    say("conn %llu: connect %s port %u: closed, %llu bytes out, %llu bytes in, %lld ms", id, host, port,
        (unsigned long long)up, (unsigned long long)down, now_ms() - start);
}

struct job {
    int fd;
    unsigned long long id;
};

static void *worker(void *arg)
{
    struct job job = *(struct job *)arg;
    free(arg);
    serve(job.fd, job.id);
    close(job.fd);
    atomic_fetch_sub(&active, 1);
    return NULL;
}

static int listen_unix(const char *path)
{
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct stat st;
    if (lstat(path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(path);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 256) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static int listen_vsock(void)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = EGRESS_PORT;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 256) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static volatile sig_atomic_t stop;
static void on_term(int sig)
{
    (void)sig;
    stop = 1;
}

/* The policy from launch.json's "network" (or a network.json); a file that is not there: no check here. */
static int load_policy(const char *path, int required)
{
    FILE *f = fopen(path, "re");
    if (!f) {
        if (required) {
            say("cannot read %s: %s", path, strerror(errno));
            return -1;
        }
        return 0;
    }
    static char text[NP_MAX_JSON + 1];
    size_t len = fread(text, 1, sizeof text, f);
    fclose(f);
    const char *why = np_parse(text, len, &policy);
    if (why) {
        /* A policy that cannot be read in full allows nothing: refusing is this side's right too. */
        say("the policy in %s is refused (%s): every request will be", path, why);
        memset(&policy, 0, sizeof policy);
        policy.present = 1;
        return 0;
    }
    if (policy.present)
        say("enforcing the egress policy of %s: %zu allow rule(s), %zu deny rule(s)", path, policy.n_allow,
            policy.n_deny);
    return 0;
}

int main(int argc, char **argv)
{
    const char *uds = NULL, *policy_path = NULL;
    char path[256];
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--listen-uds") == 0 && i + 1 < argc)
            uds = argv[++i];
        else if (strcmp(argv[i], "--max-conns") == 0 && i + 1 < argc)
            max_conns = atoi(argv[++i]);
        else if (strcmp(argv[i], "--connect-timeout") == 0 && i + 1 < argc)
            connect_timeout_ms = atoi(argv[++i]) * 1000;
        else if (strcmp(argv[i], "--policy") == 0 && i + 1 < argc)
            policy_path = argv[++i];
        else {
            fprintf(stderr, "usage: %s [--listen-uds PATH] [--max-conns N] [--connect-timeout SECONDS] [--policy FILE]\n",
                    argv[0]);
            return 2;
        }
    }
    if (max_conns < 1 || connect_timeout_ms < 1000) {
        fprintf(stderr, PROG "--max-conns and --connect-timeout must be positive\n");
        return 2;
    }
    memory = calloc(MEMORY_SLOTS, sizeof *memory);
    if (!memory)
        return 1;
    const char *launch_json = getenv(ENV_LAUNCH_JSON);
    if (load_policy(policy_path ? policy_path : launch_json && *launch_json ? launch_json : LAUNCH_JSON,
                    policy_path != NULL) < 0)
        return 2;
    const char *base = getenv(ENV_VSOCK_UDS);
    if (!uds && base && *base) {
        if ((size_t)snprintf(path, sizeof path, "%s_%d", base, EGRESS_PORT) >= sizeof path) {
            fprintf(stderr, PROG "%s is too long\n", ENV_VSOCK_UDS);
            return 2;
        }
        uds = path;
    }
    int lfd = uds ? listen_unix(uds) : listen_vsock();
    if (lfd < 0) {
        say("cannot listen on %s%s: %s; the enclave has no egress", uds ? "unix socket " : "vsock port 9002",
            uds ? uds : "", strerror(errno));
        return 1;
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_term;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, THREAD_STACK);
    say("listening on %s%s (at most %d connections)", uds ? "unix socket " : "vsock port 9002", uds ? uds : "",
        max_conns);
    while (!stop) {
        struct sockaddr_vm peer;
        socklen_t plen = sizeof peer;
        memset(&peer, 0, sizeof peer);
        int fd = accept4(lfd, uds ? NULL : (struct sockaddr *)&peer, uds ? NULL : &plen, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                say("accept: %s; pausing", strerror(errno));
                usleep(100000);
                continue;
            }
            say("accept: %s", strerror(errno));
            break;
        }
        unsigned long long id = atomic_fetch_add(&total, 1) + 1;
        /* Enclaves have CIDs above the host's (2); nothing else is this service's client. */
        if (!uds && peer.svm_cid <= VMADDR_CID_HOST) {
            refuse(fd, id, "refused", "not an enclave");
            close(fd);
            continue;
        }
        if (atomic_load(&active) >= max_conns) {
            refuse(fd, id, "refused", "too many connections");
            close(fd);
            continue;
        }
        struct job *job = malloc(sizeof *job);
        pthread_t t;
        atomic_fetch_add(&active, 1);
        if (job) {
            job->fd = fd;
            job->id = id;
        }
        if (!job || pthread_create(&t, &attr, worker, job) != 0) {
            free(job);
            atomic_fetch_sub(&active, 1);
            refuse(fd, id, "refused", "no thread for it");
            close(fd);
        }
    }
    say("stopping: %llu connection(s), %llu failed, %llu bytes out, %llu bytes in", atomic_load(&total),
        atomic_load(&failed), atomic_load(&bytes_up), atomic_load(&bytes_down));
    return 0;
}
