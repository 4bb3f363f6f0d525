/*
 * nitroconv enclave init: PID 1 of a converted enclave (dev blobs), written for nitroconv to the
 * contract of the AWS enclave init (docs EIF.md §5.3, DESIGN.md §6).
 *
 * Boot sequence (the initramfs is the bootstrap ramdisk `dev/ init nsm.ko` followed by the app
 * ramdisk `rootfs/… cmd env`):
 *   1. mount devtmpfs on /dev, put the console on fds 0, 1, 2;
 *   2. load /nsm.ko with finit_module when it is a real module (an empty placeholder is skipped),
 *      then unlink it; with /dev/nsm present, seed the kernel's entropy pool from the NSM's
 *      GetRandom (an enclave has no other entropy source) and print PCR0, 1, 2 and 8 as the NSM
 *      reports them, so a boot check can compare them with the measured ones; no /dev/nsm (a plain
 *      QEMU boot) is one console line;
 *   3. send the "enclave ready" heartbeat (byte 0xB7 to vsock CID 3 port 9000, echoed back); without
 *      vsock (a plain QEMU boot) the init says so on the console and carries on;
 *   4. read /cmd (argv) and /env (envp), one item per line, then unlink both;
 *   5. make /rootfs the root (bind, move onto /, chroot) and mount the usual filesystems in it;
 *   6. fork; the child starts a session and execvpe()s argv[0] with the PATH of the AWS init;
 *   7. reap every child until the first one exits, then sync and reboot.
 *
 * Console protocol: every line the init writes starts with NCI_PREFIX and is written with one
 * write(2), so it cannot interleave mid-line with the program's output. The NCI_* strings below
 * are mirrored by worker/pipeline/bootcheck.py (a unit test keeps both in step).
 *
 * Ending: the AWS init calls reboot(RB_AUTOBOOT) with `reboot=k` on the cmdline; on Nitro the
 * hypervisor ends the enclave on reset, and an enclave has no ACPI to power off with. This init
 * does the same: under QEMU `-no-reboot` turns the reset into QEMU exiting, so it "powers off"
 * in both places without depending on ACPI (the AWS cmdline also has pci=off).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/random.h>
#include <linux/vm_sockets.h>

#include "console.h"
#include "nsm_cbor.h"

/* Console markers (mirrored in worker/pipeline/bootcheck.py). */
#define NCI_PREFIX "nitroconv-init: "
#define NCI_START "nitroconv-init: start"
#define NCI_LAUNCH "nitroconv-init: launch "
#define NCI_EXEC_OK "nitroconv-init: exec ok "
#define NCI_EXEC_FAILED "nitroconv-init: exec failed: "
#define NCI_EXIT "nitroconv-init: exit "
#define NCI_FATAL "nitroconv-init: fatal: "
#define NCI_PCR "nitroconv-init: pcr "
#define NCI_NO_NSM "nitroconv-init: no nsm "
#define NCI_NSM_ERROR "nitroconv-init: nsm error: "

/* The AWS init looks commands up with this PATH whatever /env says; keeping it makes a boot check
 * here predict what happens on a Nitro host. It is also the whole environment when /env is
 * missing. */
#define LOOKUP_PATH_ENV "PATH=/sbin:/usr/sbin:/bin:/usr/bin"
#define NSM_PATH "/nsm.ko"
#define VSOCK_PARENT_CID 3
#define VSOCK_READY_PORT 9000
#define HEARTBEAT_BYTE 0xB7
#define HEARTBEAT_TIMEOUT_S 5
#define ARGV0_SHOWN_MAX 200
#define NSM_DEV "/dev/nsm"
/* The PCRs a boot check compares: the image, the kernel and bootstrap, the application, the
 * signing certificate (all zero when the EIF is unsigned). */
static const uint16_t reported_pcrs[] = {0, 1, 2, 8};
#define PCR_MAX_BYTES 64
#define RANDOM_MAX_BYTES 1024

/* The NSM driver's raw ioctl (include/uapi/linux/nsm.h, Linux 6.8+; the build host's headers may
 * predate it). The driver refuses requests above 4 KiB and truncates responses to our buffer. */
struct nsm_iovec {
    uint64_t addr;
    uint64_t len;
};
struct nsm_raw {
    struct nsm_iovec request;
    struct nsm_iovec response;
};
#define NSM_IOCTL_RAW _IOWR(0x0A, 0x0, struct nsm_raw)
#define NSM_RESPONSE_MAX 0x3000

static char *const default_argv[] = {"sh", NULL};
static char *const default_envp[] = {LOOKUP_PATH_ENV, NULL};

static _Noreturn void end_enclave(void)
{
    sync();
    reboot(RB_AUTOBOOT);
    /* Only reached when not allowed to reboot; exiting PID 1 panics the kernel, which also ends. */
    _exit(1);
}

static _Noreturn void die(const char *what)
{
    say(NCI_FATAL "%s: %s", what, strerror(errno));
    end_enclave();
}

/* argv[0] comes from the image: show it on one line, control bytes escaped, bounded. */
static const char *shown(const char *s)
{
    static char out[ARGV0_SHOWN_MAX + 8];
    size_t o = 0;
    for (; *s && o < ARGV0_SHOWN_MAX; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f || c == '\\')
            o += (size_t)snprintf(out + o, sizeof(out) - o, "\\x%02x", c);
        else
            out[o++] = (char)c;
    }
    if (*s)
        o += (size_t)snprintf(out + o, sizeof(out) - o, "...");
    out[o < sizeof(out) ? o : sizeof(out) - 1] = '\0';
    return out;
}

static void mount_dev(void)
{
    /* EBUSY: devtmpfs.mount=1 or CONFIG_DEVTMPFS_MOUNT already mounted it. */
    if (mount("dev", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, NULL) < 0 && errno != EBUSY)
        die("mount devtmpfs on /dev");
}

static void open_console(void)
{
    int fd = open("/dev/console", O_RDWR | O_NOCTTY);
    if (fd < 0)
        die("open /dev/console"); /* unreadable without a console: the log ends at the kernel's lines */
    for (int i = 0; i < 3; i++)
        if (fd != i && dup2(fd, i) < 0)
            die("dup2 console");
    if (fd > 2)
        close(fd);
}

static void load_nsm_driver(void)
{
    int fd = open(NSM_PATH, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno != ENOENT)
            die("open " NSM_PATH);
        say(NCI_PREFIX "no " NSM_PATH ", NSM driver not loaded");
        return;
    }
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("stat " NSM_PATH);
    if (st.st_size == 0) {
        say(NCI_PREFIX NSM_PATH " is an empty placeholder (dev blobs), NSM driver not loaded");
    } else if (syscall(SYS_finit_module, fd, "", 0) < 0) {
        /* A real module that does not load means no attestation: fail closed, as AWS does. */
        die("finit_module " NSM_PATH);
    } else {
        say(NCI_PREFIX "NSM driver loaded");
    }
    close(fd);
    if (unlink(NSM_PATH) < 0)
        say(NCI_PREFIX "cannot unlink " NSM_PATH ": %s", strerror(errno));
}

/* One request/response round trip; returns the response length, or -errno. */
static ssize_t nsm_call(int fd, const uint8_t *req, size_t req_len, uint8_t *resp, size_t cap)
{
    struct nsm_raw raw = {
        .request = {.addr = (uint64_t)(uintptr_t)req, .len = req_len},
        .response = {.addr = (uint64_t)(uintptr_t)resp, .len = cap},
    };
    int rc;
    do
        rc = ioctl(fd, NSM_IOCTL_RAW, &raw);
    while (rc < 0 && errno == EINTR);
    if (rc < 0)
        return -errno;
    if (raw.response.len > cap) /* the driver never returns more than asked; refuse if it did */
        return -EPROTO;
    return (ssize_t)raw.response.len;
}

static void say_nsm_failure(const char *what, ssize_t n, int rc, const char *code)
{
    if (n < 0)
        say(NCI_NSM_ERROR "%s: %s", what, strerror((int)-n));
    else if (rc == NSM_CBOR_ERROR_REPLY)
        say(NCI_NSM_ERROR "%s: the NSM answered %s", what, code);
    else
        say(NCI_NSM_ERROR "%s: malformed response (%zd bytes)", what, n);
}

static uint8_t nsm_response[NSM_RESPONSE_MAX];

/* An enclave has no entropy source but the NSM; without this, early getrandom() calls block. */
static void seed_entropy(int fd)
{
    uint8_t req[16];
    size_t req_len = nsm_get_random_request(req, sizeof(req));
    /* struct rand_pool_info ends in a flexible array: the bytes go right after its header. */
    union {
        struct rand_pool_info info;
        uint8_t raw[sizeof(struct rand_pool_info) + RANDOM_MAX_BYTES];
    } pool;
    char code[64] = "";
    size_t got = 0;
    ssize_t n = nsm_call(fd, req, req_len, nsm_response, sizeof(nsm_response));
    int rc = n < 0 ? NSM_CBOR_MALFORMED
                   : nsm_parse_get_random(nsm_response, (size_t)n, pool.raw + sizeof(struct rand_pool_info),
                                          RANDOM_MAX_BYTES, &got, code, sizeof(code));
    explicit_bzero(nsm_response, sizeof(nsm_response));
    if (n < 0 || rc != NSM_CBOR_OK || got == 0) {
        say_nsm_failure("GetRandom", n, rc == NSM_CBOR_OK ? NSM_CBOR_MALFORMED : rc, code);
        return;
    }
    pool.info.entropy_count = (int)(got * 8);
    pool.info.buf_size = (int)got;
    int rfd = open("/dev/random", O_WRONLY | O_CLOEXEC);
    if (rfd < 0 || ioctl(rfd, RNDADDENTROPY, &pool.info) < 0)
        say(NCI_NSM_ERROR "RNDADDENTROPY: %s", strerror(errno));
    else
        say(NCI_PREFIX "entropy pool seeded with %zu bytes from the NSM", got);
    if (rfd >= 0)
        close(rfd);
    explicit_bzero(&pool, sizeof(pool));
}

static void print_pcrs(int fd)
{
    for (size_t i = 0; i < sizeof(reported_pcrs) / sizeof(reported_pcrs[0]); i++) {
        uint16_t index = reported_pcrs[i];
        uint8_t req[32], data[PCR_MAX_BYTES];
        char hex[2 * PCR_MAX_BYTES + 1], code[64] = "", what[32];
        size_t req_len = nsm_describe_pcr_request(req, sizeof(req), index), len = 0;
        int locked = 0;
        ssize_t n = nsm_call(fd, req, req_len, nsm_response, sizeof(nsm_response));
        int rc = n < 0 ? NSM_CBOR_MALFORMED
                       : nsm_parse_describe_pcr(nsm_response, (size_t)n, data, sizeof(data), &len, &locked, code,
                                                sizeof(code));
        if (n < 0 || rc != NSM_CBOR_OK || len == 0) {
            snprintf(what, sizeof(what), "DescribePCR %u", (unsigned)index);
            say_nsm_failure(what, n, rc == NSM_CBOR_OK ? NSM_CBOR_MALFORMED : rc, code);
            continue;
        }
        for (size_t b = 0; b < len; b++)
            snprintf(hex + 2 * b, 3, "%02x", data[b]);
        say(NCI_PCR "%u %s", (unsigned)index, hex);
    }
}

/* With the NSM driver loaded: seed the entropy pool, then report the PCRs. Neither is fatal: an
 * enclave that cannot report them still runs, and a boot check fails on the missing lines. */
static void use_nsm(void)
{
    int fd = open(NSM_DEV, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        say(NCI_NO_NSM "(%s: %s), PCRs not read, entropy not seeded", NSM_DEV, strerror(errno));
        return;
    }
    seed_entropy(fd);
    print_pcrs(fd);
    close(fd);
}

/* Tell the parent (nitro-cli) the enclave booted. Without vsock there is nobody to tell: say so
 * and carry on, which is what lets the same init boot under plain QEMU. */
static void send_heartbeat(void)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        say(NCI_PREFIX "vsock unavailable (%s), no heartbeat sent, continuing", strerror(errno));
        return;
    }
    struct timeval tv = {.tv_sec = HEARTBEAT_TIMEOUT_S, .tv_usec = 0};
    /* Best effort: without the timeouts a missing listener could hold the boot for minutes. */
    (void)setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv));
    (void)setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    struct sockaddr_vm sa = {
        .svm_family = AF_VSOCK,
        .svm_cid = VSOCK_PARENT_CID,
        .svm_port = VSOCK_READY_PORT,
    };
    unsigned char b = HEARTBEAT_BYTE;
    const char *step = "connect";
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
        goto failed;
    step = "write";
    if (write(fd, &b, 1) != 1)
        goto failed;
    step = "read";
    b = 0;
    if (read(fd, &b, 1) != 1)
        goto failed;
    if (b != HEARTBEAT_BYTE) {
        say(NCI_PREFIX "heartbeat answered 0x%02x instead of 0x%02x, continuing", b, HEARTBEAT_BYTE);
    } else {
        say(NCI_PREFIX "heartbeat acknowledged");
    }
    close(fd);
    return;
failed:
    say(NCI_PREFIX "heartbeat %s to cid %d port %d failed (%s), continuing", step, VSOCK_PARENT_CID,
        VSOCK_READY_PORT, errno ? strerror(errno) : "end of stream");
    close(fd);
}

/* Reads `path` as one item per line (a trailing '\n' removed; no length limit) into a
 * NULL-terminated array; NULL when the file does not exist. The file is unlinked afterwards.
 * An empty line is an empty argument in /cmd but means nothing in /env (`keep_empty`). */
static char **read_items(const char *path, int keep_empty, size_t *count)
{
    *count = 0;
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        if (errno != ENOENT)
            die(path);
        return NULL;
    }
    size_t cap = 8;
    char **items = calloc(cap, sizeof(*items));
    if (items == NULL)
        die("calloc");
    char *line = NULL;
    size_t len = 0;
    ssize_t n;
    while ((n = getline(&line, &len, f)) >= 0) {
        if (n > 0 && line[n - 1] == '\n')
            line[--n] = '\0';
        if (n == 0 && !keep_empty)
            continue;
        if (*count + 1 >= cap) {
            if (cap > SIZE_MAX / 2 / sizeof(*items)) {
                errno = ENOMEM;
                die(path);
            }
            cap *= 2;
            char **grown = realloc(items, cap * sizeof(*items));
            if (grown == NULL)
                die("realloc");
            items = grown;
        }
        items[(*count)++] = line;
        items[*count] = NULL;
        line = NULL;
        len = 0;
    }
    if (ferror(f))
        die(path);
    free(line);
    fclose(f);
    if (unlink(path) < 0)
        say(NCI_PREFIX "cannot unlink %s: %s", path, strerror(errno));
    return items;
}

static void enter_rootfs(void)
{
    /* A bind mount makes /rootfs a mount point, which MS_MOVE needs (the switch_root dance). */
    if (mount("/rootfs", "/rootfs", NULL, MS_BIND | MS_REC, NULL) < 0)
        die("bind /rootfs");
    if (chdir("/rootfs") < 0)
        die("chdir /rootfs");
    if (mount(".", "/", NULL, MS_MOVE, NULL) < 0)
        die("move /rootfs to /");
    if (chroot(".") < 0)
        die("chroot");
    if (chdir("/") < 0)
        die("chdir /");
}

struct mnt {
    const char *source, *target, *type;
    unsigned long flags;
    const char *data;
};

/* The filesystems of the AWS init, in its order; each is required there, and here. */
static const struct mnt rootfs_mounts_before_links[] = {
    {"dev", "/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, NULL},
    {"proc", "/proc", "proc", MS_NODEV | MS_NOSUID | MS_NOEXEC, NULL},
};
static const struct mnt rootfs_mounts_after_links[] = {
    {"tmpfs", "/run", "tmpfs", MS_NODEV | MS_NOSUID | MS_NOEXEC, "mode=0755"},
    {"tmpfs", "/tmp", "tmpfs", MS_NODEV | MS_NOSUID | MS_NOEXEC, NULL},
    {"shm", "/dev/shm", "tmpfs", MS_NODEV | MS_NOSUID | MS_NOEXEC, NULL},
    {"devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, NULL},
    {"sysfs", "/sys", "sysfs", MS_NODEV | MS_NOSUID | MS_NOEXEC, NULL},
    {"cgroup_root", "/sys/fs/cgroup", "tmpfs", MS_NODEV | MS_NOSUID | MS_NOEXEC, "mode=0755"},
};

static void mount_all(const struct mnt *m, size_t n)
{
    char what[128];
    for (size_t i = 0; i < n; i++) {
        if (mount(m[i].source, m[i].target, m[i].type, m[i].flags, m[i].data) < 0) {
            int e = errno;
            snprintf(what, sizeof(what), "mount %s on %s", m[i].type, m[i].target);
            errno = e;
            die(what);
        }
    }
}

/* An existing entry is fine (the image may ship /dev/shm, a later mount covers it anyway). */
static void ensure(int rc, const char *what)
{
    if (rc < 0 && errno != EEXIST)
        die(what);
}

/* cgroup v1, one hierarchy per enabled controller, as the AWS init does. Best effort: a
 * controller that cannot be mounted costs the program only that controller. */
static void mount_cgroups(void)
{
    FILE *f = fopen("/proc/cgroups", "re");
    if (f == NULL) {
        say(NCI_PREFIX "no /proc/cgroups (%s), cgroups not mounted", strerror(errno));
        return;
    }
    char *line = NULL;
    size_t len = 0;
    while (getline(&line, &len, f) >= 0) {
        char name[64];
        int hierarchy, groups, enabled;
        if (line[0] == '#' || sscanf(line, "%63s %d %d %d", name, &hierarchy, &groups, &enabled) != 4 || !enabled)
            continue;
        char path[96];
        snprintf(path, sizeof(path), "/sys/fs/cgroup/%s", name);
        if (mkdir(path, 0755) < 0 && errno != EEXIST) {
            say(NCI_PREFIX "cgroup %s: mkdir: %s", name, strerror(errno));
            continue;
        }
        if (mount(name, path, "cgroup", MS_NODEV | MS_NOSUID | MS_NOEXEC, name) < 0)
            say(NCI_PREFIX "cgroup %s: mount: %s", name, strerror(errno));
    }
    free(line);
    fclose(f);
}

static void prepare_rootfs(void)
{
    mount_all(rootfs_mounts_before_links, sizeof(rootfs_mounts_before_links) / sizeof(rootfs_mounts_before_links[0]));
    ensure(symlink("/proc/self/fd", "/dev/fd"), "symlink /dev/fd");
    ensure(symlink("/proc/self/fd/0", "/dev/stdin"), "symlink /dev/stdin");
    ensure(symlink("/proc/self/fd/1", "/dev/stdout"), "symlink /dev/stdout");
    ensure(symlink("/proc/self/fd/2", "/dev/stderr"), "symlink /dev/stderr");
    ensure(mkdir("/dev/shm", 0755), "mkdir /dev/shm");
    ensure(mkdir("/dev/pts", 0755), "mkdir /dev/pts");
    mount_all(rootfs_mounts_after_links, sizeof(rootfs_mounts_after_links) / sizeof(rootfs_mounts_after_links[0]));
    mount_cgroups();
}

/* Runs argv in a child and reports on the console whether execvpe() succeeded. The child's end of
 * a close-on-exec pipe closes exactly when the exec succeeds (EOF for the parent); on failure
 * the child sends errno through it instead. Only then is the marker printed, so the marker
 * proves that the entrypoint was exec'd and not merely attempted. */
static pid_t launch(char *const argv[], char *const envp[], size_t argc)
{
    int pipefd[2];
    if (pipe2(pipefd, O_CLOEXEC) < 0)
        die("pipe2");
    say(NCI_LAUNCH "argc=%zu argv0=%s", argc, shown(argv[0]));
    pid_t pid = fork();
    if (pid < 0)
        die("fork");
    if (pid == 0) {
        close(pipefd[0]);
        sigset_t all;
        sigfillset(&all);
        sigprocmask(SIG_UNBLOCK, &all, NULL);
        setsid();
        /* execvpe searches the caller's PATH, not envp's. */
        putenv((char *)LOOKUP_PATH_ENV);
        execvpe(argv[0], argv, envp);
        int e = errno;
        ssize_t w;
        do
            w = write(pipefd[1], &e, sizeof(e));
        while (w < 0 && errno == EINTR);
        _exit(127);
    }
    close(pipefd[1]);
    int e = 0;
    ssize_t r;
    do
        r = read(pipefd[0], &e, sizeof(e));
    while (r < 0 && errno == EINTR);
    close(pipefd[0]);
    if (r == 0)
        say(NCI_EXEC_OK "pid=%d argv0=%s", (int)pid, shown(argv[0]));
    else if (r == (ssize_t)sizeof(e))
        say(NCI_EXEC_FAILED "%s: %s", shown(argv[0]), strerror(e));
    else
        say(NCI_EXEC_FAILED "%s: cannot tell (%s)", shown(argv[0]), r < 0 ? strerror(errno) : "short read");
    return pid;
}

/* PID 1 inherits every orphan; reap them all, and return when the program itself ends. */
static void reap_until(pid_t first)
{
    for (;;) {
        int status;
        pid_t pid = wait(&status);
        if (pid < 0) {
            if (errno == EINTR)
                continue;
            die("wait");
        }
        if (pid != first)
            continue;
        if (WIFEXITED(status))
            say(NCI_EXIT "status=%d", WEXITSTATUS(status));
        else
            say(NCI_EXIT "signal=%d", WTERMSIG(status));
        return;
    }
}

int main(void)
{
    if (getpid() != 1) {
        /* Everything below (mounts, chroot, reboot) is for PID 1 of an enclave only. */
        fputs("nitroconv-init: refusing to run as anything but PID 1 of an enclave\n", stderr);
        return 2;
    }
    /* PID 1 receives only signals it handles; blocking them all keeps it that way even for
     * SIGCHLD, which wait() still collects. The child unblocks them before exec. */
    sigset_t all;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, NULL);

    mount_dev();
    open_console();
    say(NCI_START);
    load_nsm_driver();
    use_nsm();
    send_heartbeat();

    size_t envc, argc;
    char *const *envp = read_items("/env", 0, &envc);
    char *const *argv = read_items("/cmd", 1, &argc);
    if (argv == NULL || argc == 0) {
        say(NCI_PREFIX "%s, running sh", argv == NULL ? "no /cmd" : "empty /cmd");
        argv = default_argv;
        argc = 1;
    }
    if (envp == NULL || envc == 0) {
        say(NCI_PREFIX "%s, environment is " LOOKUP_PATH_ENV, envp == NULL ? "no /env" : "empty /env");
        envp = default_envp;
    }

    enter_rootfs();
    prepare_rootfs();

    pid_t pid = launch(argv, envp, argc);
    reap_until(pid);
    end_enclave();
}
