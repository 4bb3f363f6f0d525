/*
 * nitroconv netd: the enclave side of ingress, /.nitroconv/netd in the app rootfs (measured in PCR2),
 * started by the exec shim before the program.
 *
 *   netd CONF        CONF: one "PORT PROXY" line per published port (PROXY 0 or 1), written by the
 *                    converter from the build's network policy (common/enclave/network.py::netd_conf)
 *
 * For each published port P it listens on vsock port P; each connection the parent makes there starts
 * with a PROXY protocol v2 header (the parent's launcher always sends one, with the TCP client's address
 * when it has one), then carries the client's bytes. netd reads and strictly checks that header, connects
 * to 127.0.0.1:P (the app), sends the app a header it encoded itself when the port has proxy_protocol (so
 * a parent cannot smuggle TLVs or a malformed header to the app), and relays both ways (worker/runtime/
 * relay.h: bounded buffers, half-close, a connection limit). The parent sees and can alter every byte
 * anyway; the header only tells the app who the client was.
 *
 * netd logs only failures and refusals (the console is the app's output), never payload bytes.
 *
 * Built with -DNETD_TEST_HOOKS (tests only): the listener for port P is the Unix socket
 * $NETD_TEST_DIR/vsock_P instead of vsock, so the enclave side is tested without a VM.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#include "relay.h"

#define PREFIX "nitroconv-netd: "

static struct relay_listener listeners[RELAY_MAX_LISTENERS];
static int n_listeners;
static volatile int stop_flag;

static int listen_port(int port) {
#ifdef NETD_TEST_HOOKS
    const char *dir = getenv("NETD_TEST_DIR");
    struct sockaddr_un un = {.sun_family = AF_UNIX};
    if (!dir || snprintf(un.sun_path, sizeof un.sun_path, "%s/vsock_%d", dir, port) >= (int)sizeof un.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    unlink(un.sun_path);
    if (bind(fd, (struct sockaddr *)&un, sizeof un) < 0 || listen(fd, 128) < 0) {
        close(fd);
        return -1;
    }
    return fd;
#else
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = (unsigned)port;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 128) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
#endif
}

static int header_done(struct relay_conn *c) {
    unsigned char out[PP2_HDR + PP2_MAX_BODY];
    size_t n = pp2_reencode(c->hdr, c->hdr_len, out, c->peer, sizeof c->peer);
    if (n == 0)
        return -1;
    if (c->l->proxy) {
        memcpy(c->ab.data, out, n);
        c->ab.len = n;
    }
    return 0;
}

static int open_app(struct relay_conn *c) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    struct sockaddr_in sin = {.sin_family = AF_INET, .sin_port = htons((uint16_t)c->l->target)};
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&sin, sizeof sin) < 0 && errno != EINPROGRESS) {
        close(fd);
        return -1;
    }
    c->b_connecting = 1;
    return fd;
}

static const struct relay_ops ops = {
    .prefix = PREFIX, .header = 1, .verbose = 0, .open_b = open_app, .header_done = header_done,
};

static void read_conf(const char *path) {
    FILE *f = fopen(path, "re");
    if (!f) {
        relay_log(&ops, "cannot open %s: %s", path, strerror(errno));
        exit(1);
    }
    int port, proxy;
    char extra;
    char line[64];
    while (fgets(line, sizeof line, f)) {
        if (sscanf(line, "%d %d %c", &port, &proxy, &extra) != 2 || port < 1 || port > 65535 ||
            (proxy != 0 && proxy != 1) || n_listeners == RELAY_MAX_LISTENERS) {
            relay_log(&ops, "%s: bad line, ignoring the whole file", path);
            exit(1);
        }
        struct relay_listener *l = &listeners[n_listeners++];
        l->port = l->target = port;
        l->proxy = proxy;
    }
    fclose(f);
}

static void on_term(int sig) {
    (void)sig;
    stop_flag = 1;
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: netd CONF\n");
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_term);
    read_conf(argv[1]);
    int ok = 0;
    for (int i = 0; i < n_listeners; i++) {
        listeners[i].fd = listen_port(listeners[i].port);
        if (listeners[i].fd < 0)
            relay_log(&ops, "cannot listen on vsock port %d: %s", listeners[i].port, strerror(errno));
        else
            ok++;
    }
    /* Ports that could not be opened are left out; the others still serve. */
    int k = 0;
    for (int i = 0; i < n_listeners; i++)
        if (listeners[i].fd >= 0)
            listeners[k++] = listeners[i];
    n_listeners = k;
    if (!ok)
        return 1;
    relay_log(&ops, "ingress on %d port(s)", n_listeners);
    relay_loop(&ops, listeners, n_listeners, &stop_flag, -1, NULL);
    return 0;
}
