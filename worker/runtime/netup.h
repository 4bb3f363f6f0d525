/*
 * The enclave's network basics, done by the exec shim as root before it starts the program: the
 * loopback interface up (an enclave has no other), the host name from /etc/hostname (written by the
 * converter), and the converter's daemons from /.nitroconv started detached. The shim does this rather
 * than the init because on a Nitro host the init is AWS's, and the shim is the first code of ours to run.
 * Nothing here is fatal: without loopback or a daemon the program still starts, and a console line says why.
 */
#ifndef NITROCONV_NETUP_H
#define NITROCONV_NETUP_H

#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "console.h"

#define NETUP_PREFIX "nitroconv-shim: "
#define NETUP_DIR "/.nitroconv/"

static void loopback_up(void)
{
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strcpy(ifr.ifr_name, "lo");
    if (fd < 0 || ioctl(fd, SIOCGIFFLAGS, &ifr) < 0 ||
        (!(ifr.ifr_flags & IFF_UP) && (ifr.ifr_flags |= IFF_UP, ioctl(fd, SIOCSIFFLAGS, &ifr) < 0)))
        say(NETUP_PREFIX "cannot bring up the loopback interface: %s", strerror(errno));
    if (fd >= 0)
        close(fd);
}

static void hostname_from_etc(void)
{
    char name[65];
    int fd = open("/etc/hostname", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    ssize_t n = read(fd, name, sizeof name - 1);
    close(fd);
    if (n <= 0)
        return;
    name[n] = '\0';
    name[strcspn(name, "\r\n")] = '\0';
    if (*name && sethostname(name, strlen(name)) < 0)
        say(NETUP_PREFIX "cannot set the host name: %s", strerror(errno));
}

/* Starts NETUP_DIR `name` with `conf` as its argument when both exist, detached (a grandchild: the init
 * reaps it, and the program the shim becomes never sees it as a child), stdin from /dev/null, its
 * console lines on stderr, an empty environment. */
static void start_daemon(const char *name, const char *conf)
{
    char path[64], conf_path[64];
    snprintf(path, sizeof path, NETUP_DIR "%s", name);
    snprintf(conf_path, sizeof conf_path, NETUP_DIR "%s", conf);
    if (access(path, X_OK) != 0 || access(conf_path, R_OK) != 0)
        return;
    pid_t pid = fork();
    if (pid < 0) {
        say(NETUP_PREFIX "cannot start %s: %s", name, strerror(errno));
        return;
    }
    if (pid == 0) {
        setsid();
        if (fork() != 0)
            _exit(0);
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0 && null != 0) {
            dup2(null, 0);
            close(null);
        }
        char *argv[] = {(char *)name, conf_path, NULL};
        char *envp[] = {NULL};
        execve(path, argv, envp);
        say(NETUP_PREFIX "cannot start %s: %s", name, strerror(errno));
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
}

/* Runs NETUP_DIR `name` with `args` when it exists, and waits for its first process: egressd and attestd
 * fork once their sockets are bound and that process exits, so the program starts with the service there.
 * The daemon ends up a child of the init, never of the program the shim becomes. */
static void start_ready_daemon(const char *name, char *const args[])
{
    char path[64];
    snprintf(path, sizeof path, NETUP_DIR "%s", name);
    if (access(path, X_OK) != 0)
        return;
    pid_t pid = fork();
    if (pid < 0) {
        say(NETUP_PREFIX "cannot start %s: %s", name, strerror(errno));
        return;
    }
    if (pid == 0) {
        setsid();
        int null = open("/dev/null", O_RDONLY);
        if (null >= 0 && null != 0) {
            dup2(null, 0);
            close(null);
        }
        char *envp[] = {NULL};
        execve(path, args, envp);
        say(NETUP_PREFIX "cannot start %s: %s", name, strerror(errno));
        _exit(127);
    }
    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
        say(NETUP_PREFIX "%s did not start (status 0x%x); the program runs without it", name, (unsigned)status);
}

static void network_up(void)
{
    loopback_up();
    hostname_from_etc();
    start_daemon("netd", "netd.conf");
    char *egressd[] = {"egressd", "--policy", NETUP_DIR "network.json", NULL};
    start_ready_daemon("egressd", egressd);
    char *attestd[] = {"attestd", NULL};
    start_ready_daemon("attestd", attestd);
}

#endif
