/*
 * The parent side of ingress, for the launcher (/enclave/run): a TCP listener per published port, each
 * connection bridged to the enclave's vsock port of the same number, where netd (worker/runtime/netd.c)
 * listens. Every connection starts with a PROXY protocol v2 header carrying the TCP client's address
 * (netd passes it to the app only for ports whose policy asks for it). One log line when a connection
 * opens and one with its byte counters when it ends; never payloads.
 *
 * It runs in a child process of the launcher (its own poll loop, relay.h), which dies with the launcher.
 * The enclave's CID comes from the launcher once known (the shim's run-time connection shows it) through
 * a pipe; until then connections are refused. In the emulator (NITROCONV_RUN_VSOCK_UDS=BASE) the enclave
 * is reached through the back-end's Unix socket BASE with "CONNECT P\n" (worker/emulator/vsock.py).
 *
 * Where each port is published: NITROCONV_RUN_PUBLISH="[IP:]HOSTPORT:PORT,…" (`nitroconv run-local
 * --publish`), else every port of the policy on 0.0.0.0:PORT (`docker run -p` maps them further).
 */
#ifndef NITROCONV_INGRESS_H
#define NITROCONV_INGRESS_H

#include <signal.h>
#include <sys/prctl.h>
#include <sys/un.h>
#include <linux/vm_sockets.h>

#include "relay.h"

#define INGRESS_ENV_PUBLISH "NITROCONV_RUN_PUBLISH"
#define INGRESS_MAX RELAY_MAX_LISTENERS

struct ingress_port {
    int port;
    int proxy;
};

struct published {
    char host[64];
    int host_port;
    int port;
};

static const char *ingress_uds;
static unsigned ingress_cid; /* 0 until the launcher tells */
static int ingress_pipe = -1;
static volatile int ingress_stop;

static int ingress_open_b(struct relay_conn *c);
static int ingress_b_hello(struct relay_conn *c);

static const struct relay_ops ingress_ops = {
    .prefix = "nitroconv-run: ingress: ", .header = 0, .verbose = 1, .open_b = ingress_open_b,
    .b_hello = ingress_b_hello,
};

static int ingress_open_b(struct relay_conn *c) {
    int fd;
    if (ingress_uds) {
        struct sockaddr_un un = {.sun_family = AF_UNIX};
        snprintf(un.sun_path, sizeof un.sun_path, "%s", ingress_uds);
        fd = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (fd < 0 || connect(fd, (struct sockaddr *)&un, sizeof un) < 0) {
            if (fd >= 0)
                close(fd);
            return -1;
        }
        c->ab.len = (size_t)snprintf((char *)c->ab.data, 32, "CONNECT %d\n", c->l->target);
        c->need_b_line = 1;
    } else {
        if (!ingress_cid) {
            relay_log(&ingress_ops, "port %d: the enclave has not started yet", c->l->port);
            return -1;
        }
        fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        struct sockaddr_vm vm;
        memset(&vm, 0, sizeof vm);
        vm.svm_family = AF_VSOCK;
        vm.svm_cid = ingress_cid;
        vm.svm_port = (unsigned)c->l->target;
        if (fd < 0 || (connect(fd, (struct sockaddr *)&vm, sizeof vm) < 0 && errno != EINPROGRESS)) {
            if (fd >= 0)
                close(fd);
            return -1;
        }
        c->b_connecting = 1;
    }
    struct sockaddr_storage peer, local;
    socklen_t pl = sizeof peer, ll = sizeof local;
    int known = getpeername(c->a, (struct sockaddr *)&peer, &pl) == 0 &&
                getsockname(c->a, (struct sockaddr *)&local, &ll) == 0;
    c->ab.len += pp2_encode(c->ab.data + c->ab.len, known ? (struct sockaddr *)&peer : NULL,
                            known ? (struct sockaddr *)&local : NULL);
    return fd;
}

static int ingress_b_hello(struct relay_conn *c) {
    return strncmp(c->line, "OK ", 3) == 0 ? 0 : -1;
}

static void ingress_on_pipe(void) {
    unsigned cid;
    ssize_t n = read(ingress_pipe, &cid, sizeof cid);
    if (n == (ssize_t)sizeof cid)
        ingress_cid = cid;
    else if (n == 0)
        ingress_stop = 1; /* the launcher is gone */
}

/* "[IP:]HOSTPORT:PORT,…" into `out`; returns the count or -1 with `why` set. */
static int ingress_parse_publish(const char *spec, struct published *out, int max, const char **why) {
    int n = 0;
    const char *p = spec;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        char item[96];
        if (len == 0 || len >= sizeof item || n == max) { *why = "bad list"; return -1; }
        memcpy(item, p, len);
        item[len] = '\0';
        char *last = strrchr(item, ':');
        if (!last) { *why = "expected [IP:]HOSTPORT:PORT"; return -1; }
        *last = '\0';
        char *hp = strrchr(item, ':');
        const char *host = "0.0.0.0", *hport = item;
        if (hp) { *hp = '\0'; host = item; hport = hp + 1; }
        char *e1, *e2;
        long a = strtol(hport, &e1, 10), b = strtol(last + 1, &e2, 10);
        if (!*hport || *e1 || !last[1] || *e2 || a < 0 || a > 65535 || b < 1 || b > 65535) {
            *why = "ports must be numbers (HOSTPORT 0 picks a free one)";
            return -1;
        }
        struct in_addr ia;
        if (inet_pton(AF_INET, host, &ia) != 1) { *why = "IP must be an IPv4 address"; return -1; }
        snprintf(out[n].host, sizeof out[n].host, "%s", host);
        out[n].host_port = (int)a;
        out[n].port = (int)b;
        n++;
        p = end ? end + 1 : p + len;
        if (end && !*p) { *why = "bad list"; return -1; }
    }
    return n;
}

static int ingress_listen(const char *host, int port, int *bound) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    inet_pton(AF_INET, host, &sin.sin_addr);
    socklen_t sl = sizeof sin;
    if (bind(fd, (struct sockaddr *)&sin, sizeof sin) < 0 || listen(fd, 128) < 0 ||
        getsockname(fd, (struct sockaddr *)&sin, &sl) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    *bound = ntohs(sin.sin_port);
    return fd;
}

/* Binds the listeners (failing the launch with `why` when one cannot be), then forks the relay process.
 * Returns the write end of the CID pipe, 0 when nothing is published, -1 with `why`/`errno` on failure. */
static int ingress_start(const struct ingress_port *ports, int n_ports, const char *uds, char *why, size_t why_len) {
    static struct relay_listener ls[INGRESS_MAX];
    struct published pub[INGRESS_MAX];
    int n_pub = 0;
    const char *spec = getenv(INGRESS_ENV_PUBLISH);
    if (spec && *spec) {
        const char *err = NULL;
        n_pub = ingress_parse_publish(spec, pub, INGRESS_MAX, &err);
        if (n_pub < 0) {
            snprintf(why, why_len, "%s=%s: %s", INGRESS_ENV_PUBLISH, spec, err);
            return -1;
        }
    } else {
        for (int i = 0; i < n_ports; i++) {
            snprintf(pub[i].host, sizeof pub[i].host, "0.0.0.0");
            pub[i].host_port = pub[i].port = ports[i].port;
        }
        n_pub = n_ports;
    }
    if (!n_pub)
        return 0;
    for (int i = 0; i < n_pub; i++) {
        int k = 0;
        while (k < n_ports && ports[k].port != pub[i].port)
            k++;
        if (k == n_ports) {
            snprintf(why, why_len, "port %d is not published by this image's network policy", pub[i].port);
            for (int j = 0; j < i; j++)
                close(ls[j].fd);
            return -1;
        }
        int bound = 0;
        ls[i].fd = ingress_listen(pub[i].host, pub[i].host_port, &bound);
        if (ls[i].fd < 0) {
            snprintf(why, why_len, "cannot listen on %s:%d: %s", pub[i].host, pub[i].host_port, strerror(errno));
            for (int j = 0; j < i; j++)
                close(ls[j].fd);
            return -1;
        }
        ls[i].port = bound;
        ls[i].target = pub[i].port;
        ls[i].proxy = ports[k].proxy;
        relay_log(&ingress_ops, "%s:%d -> enclave port %d", pub[i].host, bound, pub[i].port);
    }
    int pfd[2];
    if (pipe2(pfd, O_CLOEXEC) < 0) {
        snprintf(why, why_len, "pipe: %s", strerror(errno));
        return -1;
    }
    pid_t pid = fork();
    if (pid < 0) {
        snprintf(why, why_len, "fork: %s", strerror(errno));
        return -1;
    }
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        signal(SIGINT, SIG_IGN);
        signal(SIGHUP, SIG_IGN);
        signal(SIGTERM, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        signal(SIGPIPE, SIG_IGN);
        close(pfd[1]);
        if (getppid() == 1)
            _exit(0);
        ingress_uds = uds;
        ingress_pipe = pfd[0];
        relay_loop(&ingress_ops, ls, n_pub, &ingress_stop, ingress_pipe, ingress_on_pipe);
        _exit(0);
    }
    close(pfd[0]);
    for (int i = 0; i < n_pub; i++)
        close(ls[i].fd);
    return pfd[1];
}

#endif
