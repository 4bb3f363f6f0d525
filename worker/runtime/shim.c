/*
 * nitroconv exec shim: the first item of a converted enclave's /cmd (docs DESIGN.md §6). The init
 * runs it as root in / of the image; it gives the program what `docker run` would:
 *
 *   /.nitroconv/shim [--workdir DIR] [--user SPEC] [--mutable NAME=DEFAULT]... [--allow-args] -- ARGV...
 *
 *   1. the allow-listed defaults (`--mutable`) go into the environment the init passed (the image's);
 *   2. run-time values: connect to the parent (vsock CID 3, port 9001), send "NCRT1\n", read
 *      records `<K><len>\n<bytes>` (K = E env entry, A extra argument) up to `Z0\n`; E entries only
 *      for allow-listed names, A only with --allow-args. Connect timeout 1 s, whole exchange 5 s; a
 *      length is decimal without leading zeros, at most 65536; at most 256 records (Z included) and
 *      1 MiB in all; no NUL in a value. Any failure or malformed answer: all values ignored, the defaults
 *      apply, and one console line says why;
 *   3. USER resolved from the image's own /etc/passwd and /etc/group with the rules of Docker's
 *      user lookup (moby/sys/user GetExecUser): the primary gid, then the groups /etc/group lists
 *      the user in (none when USER names a group) as supplementary groups, HOME from
 *      the passwd entry (default "/") when the environment has none;
 *   4. chdir(WORKDIR) (tried as root first, again as the user on EACCES, as runc does);
 *   5. setgroups, setgid, setuid; then argv[0] is looked up on the environment's PATH (not the
 *      init's) and exec'd. Errors: `nitroconv-shim: …` on stderr, exit 127 (not found) or 126.
 *
 * Before all of this (worker/runtime/netup.h): loopback up, the host name from /etc/hostname, and
 * /.nitroconv/netd (ingress) started detached when the build publishes ports.
 *
 * Everything given on the command line is in the app ramdisk, so measured in PCR2; the run-time
 * values are not, and are never logged.
 *
 * A test build (-DNITROCONV_SHIM_TEST) takes the protocol socket from $NITROCONV_SHIM_TEST_FD
 * ("none": no parent), /etc from $NITROCONV_SHIM_TEST_ETC, the exchange timeout from
 * $NITROCONV_SHIM_TEST_TIMEOUT_MS, and prints the identity instead of assuming it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#include "console.h"
#ifndef NITROCONV_SHIM_TEST
#include "netup.h"
#endif

#define SHIM_PREFIX "nitroconv-shim: "
#define PARENT_CID 3
#define RUNTIME_PORT 9001
#define HELLO "NCRT1\n"
#define CONNECT_TIMEOUT_S 1
#define EXCHANGE_TIMEOUT_MS 5000
#define MAX_RECORD_BYTES 65536
/* As the launcher counts them: 256 records with the final Z one, 1 MiB of answer with the headers. */
#define MAX_RECORDS 256
#define MAX_ANSWER_BYTES (1024 * 1024)
/* The longest header is "E65536\n"; a length field longer than 5 digits is malformed anyway. */
#define MAX_LEN_DIGITS 5
#define MAX_ETC_FILE_BYTES (1024 * 1024)
#define NAME_SHOWN_MAX 200
#define MAX_ID 2147483647L
#define EXIT_CANNOT_RUN 126
#define EXIT_NOT_FOUND 127

extern char **environ;

__attribute__((format(printf, 2, 3), noreturn)) static void fail(int code, const char *fmt, ...)
{
    char msg[900];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    say(SHIM_PREFIX "%s", msg);
    exit(code);
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (q == NULL)
        fail(EXIT_CANNOT_RUN, "out of memory");
    return q;
}

static char *xstrndup(const char *s, size_t n)
{
    char *d = xrealloc(NULL, n + 1);
    memcpy(d, s, n);
    d[n] = '\0';
    return d;
}

/* A growable NULL-terminated array of strings (argv, envp). */
struct strv {
    char **items;
    size_t len, cap;
};

static void strv_push(struct strv *v, char *s)
{
    if (v->len + 2 > v->cap) {
        v->cap = v->cap ? v->cap * 2 : 16;
        v->items = xrealloc(v->items, v->cap * sizeof(*v->items));
    }
    v->items[v->len++] = s;
    v->items[v->len] = NULL;
}

static size_t name_len(const char *entry)
{
    const char *eq = strchr(entry, '=');
    return eq ? (size_t)(eq - entry) : strlen(entry);
}

static const char *env_get(const struct strv *env, const char *name)
{
    size_t n = strlen(name);
    for (size_t i = 0; i < env->len; i++)
        if (name_len(env->items[i]) == n && strncmp(env->items[i], name, n) == 0)
            return env->items[i] + n + 1;
    return NULL;
}

/* Replaces NAME's entry in place (its position stays, as Docker's env merge keeps it) or appends. */
static void env_set(struct strv *env, char *entry)
{
    size_t n = name_len(entry);
    for (size_t i = 0; i < env->len; i++) {
        if (name_len(env->items[i]) == n && strncmp(env->items[i], entry, n) == 0) {
            env->items[i] = entry;
            return;
        }
    }
    strv_push(env, entry);
}

struct options {
    const char *workdir;
    const char *user;
    struct strv mutable_defaults; /* NAME=DEFAULT */
    int allow_args;
    char **argv;
    int argc;
};

static void parse_options(int argc, char **argv, struct options *o)
{
    memset(o, 0, sizeof(*o));
    o->workdir = "/";
    o->user = "";
    int i = 1;
    for (; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) {
            i++;
            break;
        }
        if (strcmp(a, "--allow-args") == 0) {
            o->allow_args = 1;
            continue;
        }
        if (i + 1 >= argc)
            fail(EXIT_CANNOT_RUN, "option %s needs a value", a);
        const char *value = argv[++i];
        if (strcmp(a, "--workdir") == 0) {
            o->workdir = value;
        } else if (strcmp(a, "--user") == 0) {
            o->user = value;
        } else if (strcmp(a, "--mutable") == 0) {
            if (value[0] == '=' || strchr(value, '=') == NULL)
                fail(EXIT_CANNOT_RUN, "--mutable needs NAME=DEFAULT");
            strv_push(&o->mutable_defaults, (char *)value);
        } else {
            fail(EXIT_CANNOT_RUN, "unknown option %s", a);
        }
    }
    if (i >= argc)
        fail(EXIT_CANNOT_RUN, "no command after --");
    o->argv = argv + i;
    o->argc = argc - i;
}

static int is_mutable(const struct options *o, const char *entry)
{
    size_t n = name_len(entry);
    for (size_t i = 0; i < o->mutable_defaults.len; i++) {
        const char *m = o->mutable_defaults.items[i];
        if (name_len(m) == n && strncmp(m, entry, n) == 0)
            return 1;
    }
    return 0;
}

/* ---- run-time values from the parent ---------------------------------------------------- */

struct record {
    char kind;
    char *data; /* NUL-terminated copy */
};

struct answer {
    struct record *records;
    size_t count;
};

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Reads up to `len` bytes before the deadline; returns the count, 0 on EOF, -1 with errno. */
static ssize_t read_before(int fd, void *buf, size_t len, long long deadline)
{
    for (;;) {
        long long left = deadline - now_ms();
        if (left <= 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        struct pollfd p = {.fd = fd, .events = POLLIN};
        int r = poll(&p, 1, (int)left);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -1;
        if (r == 0) {
            errno = ETIMEDOUT;
            return -1;
        }
        ssize_t n = read(fd, buf, len);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        return n;
    }
}

static int write_all(int fd, const char *buf, size_t len)
{
    for (size_t off = 0; off < len;) {
        ssize_t w = send(fd, buf + off, len - off, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w < 0)
            return -1;
        off += (size_t)w;
    }
    return 0;
}

/* A buffered reader over the protocol socket, bounded by the deadline. */
struct reader {
    int fd;
    long long deadline;
    char buf[4096];
    size_t pos, end;
    size_t consumed;
};

/* 1: byte read; 0: end of stream; -1: error (errno); -2: the answer is over its size bound. */
static int next_byte(struct reader *r, char *c)
{
    if (r->consumed >= MAX_ANSWER_BYTES)
        return -2;
    if (r->pos == r->end) {
        ssize_t n = read_before(r->fd, r->buf, sizeof(r->buf), r->deadline);
        if (n <= 0)
            return (int)n;
        r->pos = 0;
        r->end = (size_t)n;
    }
    *c = r->buf[r->pos++];
    r->consumed++;
    return 1;
}

/* Parses the parent's answer. Returns NULL on success, else why it was refused (a static
 * string; an I/O failure's cause goes into `detail`). */
static const char *read_answer(struct reader *r, struct answer *out, char *detail, size_t detail_len)
{
    int got;
    out->records = NULL;
    out->count = 0;
    for (;;) {
        char kind, c;
        got = next_byte(r, &kind);
        if (got <= 0)
            goto io;
        if (kind != 'E' && kind != 'A' && kind != 'Z')
            return "unknown record kind";
        size_t len = 0, digits = 0;
        for (;;) {
            got = next_byte(r, &c);
            if (got <= 0)
                goto io;
            if (c == '\n')
                break;
            if (c < '0' || c > '9')
                return "record length is not a decimal number";
            if (digits == 1 && len == 0)
                return "record length has a leading zero";
            if (++digits > MAX_LEN_DIGITS)
                return "record length too long";
            len = len * 10 + (size_t)(c - '0');
        }
        if (digits == 0)
            return "record length missing";
        if (kind == 'Z') {
            if (len != 0)
                return "end record with a length";
            return NULL;
        }
        if (len > MAX_RECORD_BYTES)
            return "record longer than 65536 bytes";
        if (out->count + 1 >= MAX_RECORDS)
            return "more than 256 records";
        char *data = xrealloc(NULL, len + 1);
        for (size_t k = 0; k < len; k++) {
            got = next_byte(r, &data[k]);
            if (got <= 0) {
                free(data);
                goto io;
            }
            if (data[k] == '\0') {
                free(data);
                return "NUL byte in a value";
            }
        }
        data[len] = '\0';
        if (kind == 'E' && (data[0] == '=' || strchr(data, '=') == NULL)) {
            free(data);
            return "environment record is not NAME=VALUE";
        }
        out->records = xrealloc(out->records, (out->count + 1) * sizeof(*out->records));
        out->records[out->count++] = (struct record){.kind = kind, .data = data};
    }
io:
    if (got == -2)
        return "answer larger than 1 MiB";
    snprintf(detail, detail_len, "%s", got == 0 ? "end of stream" : strerror(errno));
    return "answer cut short";
}

static void free_answer(struct answer *a)
{
    for (size_t i = 0; i < a->count; i++)
        free(a->records[i].data);
    free(a->records);
    a->records = NULL;
    a->count = 0;
}

static long exchange_timeout_ms(void)
{
#ifdef NITROCONV_SHIM_TEST
    const char *t = getenv("NITROCONV_SHIM_TEST_TIMEOUT_MS");
    if (t != NULL && *t)
        return strtol(t, NULL, 10);
#endif
    return EXCHANGE_TIMEOUT_MS;
}

/* The socket to the parent, or -1 after saying why there is none. */
static int connect_parent(void)
{
#ifdef NITROCONV_SHIM_TEST
    const char *fdv = getenv("NITROCONV_SHIM_TEST_FD");
    if (fdv != NULL) {
        if (strcmp(fdv, "none") == 0) {
            say(SHIM_PREFIX "no run-time values (test build: no parent), using the defaults");
            return -1;
        }
        return (int)strtol(fdv, NULL, 10);
    }
#endif
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        say(SHIM_PREFIX "no run-time values (vsock unavailable: %s), using the defaults", strerror(errno));
        return -1;
    }
    struct timeval tv = {.tv_sec = CONNECT_TIMEOUT_S, .tv_usec = 0};
    (void)setsockopt(fd, AF_VSOCK, SO_VM_SOCKETS_CONNECT_TIMEOUT, &tv, sizeof(tv));
    struct sockaddr_vm sa = {.svm_family = AF_VSOCK, .svm_cid = PARENT_CID, .svm_port = RUNTIME_PORT};
    if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
        say(SHIM_PREFIX "no run-time values (connect to cid %d port %d: %s), using the defaults", PARENT_CID,
            RUNTIME_PORT, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

/* Asks the parent; on any failure the answer is empty (the defaults apply) and one line says why. */
static void fetch_runtime_values(struct answer *a)
{
    a->records = NULL;
    a->count = 0;
    int fd = connect_parent();
    if (fd < 0)
        return;
    struct reader *r = xrealloc(NULL, sizeof(*r));
    r->fd = fd;
    r->deadline = now_ms() + exchange_timeout_ms();
    r->pos = r->end = r->consumed = 0;
    char detail[128] = "";
    const char *why;
    if (write_all(fd, HELLO, sizeof(HELLO) - 1) < 0) {
        snprintf(detail, sizeof(detail), "%s", strerror(errno));
        why = "cannot send the greeting";
    } else {
        why = read_answer(r, a, detail, sizeof(detail));
    }
    if (why != NULL) {
        free_answer(a);
        say(SHIM_PREFIX "run-time values ignored (%s%s%s), using the defaults", why, *detail ? ": " : "", detail);
    }
    free(r);
    close(fd);
}

/* A refused name as one console line: control bytes escaped (a newline in it must not start a
 * line that looks like the init's), bounded, and never the value after '='. */
static const char *shown_name(const char *entry)
{
    static char out[NAME_SHOWN_MAX + 8];
    size_t n = name_len(entry), o = 0, i = 0;
    for (; i < n && o < NAME_SHOWN_MAX; i++) {
        unsigned char c = (unsigned char)entry[i];
        if (c < 0x20 || c == 0x7f || c == '\\')
            o += (size_t)snprintf(out + o, sizeof(out) - o, "\\x%02x", c);
        else
            out[o++] = (char)c;
    }
    if (i < n)
        o += (size_t)snprintf(out + o, sizeof(out) - o, "...");
    out[o < sizeof(out) ? o : sizeof(out) - 1] = '\0';
    return out;
}

static void apply_runtime_values(const struct options *o, const struct answer *a, struct strv *env,
                                 struct strv *argv)
{
    size_t refused_args = 0;
    for (size_t i = 0; i < a->count; i++) {
        char *data = a->records[i].data;
        if (a->records[i].kind == 'E') {
            if (is_mutable(o, data)) {
                env_set(env, data);
            } else {
                say(SHIM_PREFIX "refused env %s: not in mutable_env_vars", shown_name(data));
            }
        } else if (o->allow_args) {
            strv_push(argv, data);
        } else {
            refused_args++;
        }
    }
    if (refused_args)
        say(SHIM_PREFIX "refused %zu argument%s: allow_cmdline_args is off", refused_args,
            refused_args == 1 ? "" : "s");
}

/* ---- USER, from the image's /etc/passwd and /etc/group ----------------------------------- */

static const char *etc_path(const char *name, char *buf, size_t len)
{
    const char *dir = "/etc";
#ifdef NITROCONV_SHIM_TEST
    const char *t = getenv("NITROCONV_SHIM_TEST_ETC");
    if (t != NULL && *t)
        dir = t;
#endif
    snprintf(buf, len, "%s/%s", dir, name);
    return buf;
}

/* The whole file, NUL-terminated; NULL when it does not exist (Docker then uses the defaults).
 * Image files are untrusted: only a regular file, at most MAX_ETC_FILE_BYTES. O_NONBLOCK keeps a
 * FIFO planted there from blocking the open. */
static char *read_etc_file(const char *name)
{
    char path[PATH_MAX];
    etc_path(name, path, sizeof(path));
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
    if (fd < 0) {
        if (errno == ENOENT || errno == ENOTDIR)
            return NULL;
        fail(EXIT_CANNOT_RUN, "cannot open %s: %s", path, strerror(errno));
    }
    struct stat st;
    if (fstat(fd, &st) < 0)
        fail(EXIT_CANNOT_RUN, "cannot stat %s: %s", path, strerror(errno));
    if (!S_ISREG(st.st_mode))
        fail(EXIT_CANNOT_RUN, "refusing %s: not a regular file", path);
    if (st.st_size > MAX_ETC_FILE_BYTES)
        fail(EXIT_CANNOT_RUN, "refusing %s: larger than %d bytes", path, MAX_ETC_FILE_BYTES);
    size_t cap = (size_t)st.st_size + 1, len = 0;
    char *data = xrealloc(NULL, cap + 1);
    /* Read until EOF but never past the bound: the file may grow between fstat and read. */
    for (;;) {
        if (len == cap)
            break;
        ssize_t n = read(fd, data + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            fail(EXIT_CANNOT_RUN, "cannot read %s: %s", path, strerror(errno));
        if (n == 0)
            break;
        len += (size_t)n;
    }
    if (len > (size_t)MAX_ETC_FILE_BYTES)
        fail(EXIT_CANNOT_RUN, "refusing %s: larger than %d bytes", path, MAX_ETC_FILE_BYTES);
    close(fd);
    data[len] = '\0';
    return data;
}

/* Splits a line on ':' into at most `max` fields (the rest of the line in the last); returns the count. */
static size_t split_fields(char *line, char **fields, size_t max)
{
    size_t n = 0;
    fields[n++] = line;
    for (char *p = line; *p && n < max; p++) {
        if (*p == ':') {
            *p = '\0';
            fields[n++] = p + 1;
        }
    }
    return n;
}

/* A decimal id in [0, 2^31-1]; -1 when `s` is not one. */
static long parse_id(const char *s)
{
    if (*s == '\0')
        return -1;
    long v = 0;
    for (const char *p = s; *p; p++) {
        if (*p < '0' || *p > '9')
            return -1;
        v = v * 10 + (*p - '0');
        if (v > MAX_ID)
            return -1;
    }
    return v;
}

/* Calls `each(fields, n, ctx)` for every non-empty line (whitespace-trimmed, as moby's parser does). */
static void each_line(char *data, size_t max_fields, int (*each)(char **, size_t, void *), void *ctx)
{
    char *save = NULL;
    for (char *line = strtok_r(data, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        while (*line == ' ' || *line == '\t' || *line == '\r')
            line++;
        size_t len = strlen(line);
        while (len && (line[len - 1] == ' ' || line[len - 1] == '\t' || line[len - 1] == '\r'))
            line[--len] = '\0';
        if (len == 0)
            continue;
        char *fields[7] = {0};
        size_t n = split_fields(line, fields, max_fields);
        if (each(fields, n, ctx))
            return;
    }
}

struct exec_user {
    long uid, gid;
    char *home;
    gid_t *sgids;
    size_t nsgids;
};

struct passwd_match {
    const char *name; /* user argument as given; "" = match the default uid */
    long uid_arg;     /* user argument as a number, or -1 */
    long default_uid;
    int found;
    char *matched_name;
    long uid, gid;
    char *home;
};

static int passwd_line(char **f, size_t n, void *ctx)
{
    struct passwd_match *m = ctx;
    /* name:password:uid:gid:gecos:home:shell; fields missing at the end are empty. */
    long uid = n > 2 ? parse_id(f[2]) : -1;
    long gid = n > 3 ? parse_id(f[3]) : -1;
    int hit;
    if (m->name[0] == '\0')
        hit = uid >= 0 && uid == m->default_uid;
    else if (m->uid_arg >= 0)
        hit = uid >= 0 && uid == m->uid_arg;
    else
        hit = strcmp(f[0], m->name) == 0;
    if (!hit)
        return 0;
    m->found = 1;
    m->matched_name = f[0];
    m->uid = uid < 0 ? 0 : uid;
    m->gid = gid < 0 ? 0 : gid;
    m->home = n > 5 ? f[5] : "";
    return 1; /* the first match wins */
}

struct group_match {
    const char *group_arg; /* "" = collect supplementary groups of member */
    long gid_arg;
    const char *member;
    int found;
    long gid;
    gid_t *sgids;
    size_t nsgids;
};

static int group_line(char **f, size_t n, void *ctx)
{
    struct group_match *m = ctx;
    /* name:password:gid:member,member */
    long gid = n > 2 ? parse_id(f[2]) : -1;
    if (gid < 0)
        return 0;
    if (m->group_arg[0] != '\0') {
        int hit = m->gid_arg >= 0 ? gid == m->gid_arg : strcmp(f[0], m->group_arg) == 0;
        if (hit) {
            m->found = 1;
            m->gid = gid;
            return 1;
        }
        return 0;
    }
    if (n < 4)
        return 0;
    char *save = NULL;
    for (char *u = strtok_r(f[3], ",", &save); u; u = strtok_r(NULL, ",", &save)) {
        if (strcmp(u, m->member) == 0) {
            m->sgids = xrealloc(m->sgids, (m->nsgids + 1) * sizeof(*m->sgids));
            m->sgids[m->nsgids++] = (gid_t)gid;
            break;
        }
    }
    return 0;
}

/* Docker's USER rules (moby/sys/user GetExecUser with defaults uid 0, gid 0, home "/"). */
static void resolve_user(const char *spec, struct exec_user *u)
{
    u->uid = 0;
    u->gid = 0;
    u->home = "/";
    u->sgids = NULL;
    u->nsgids = 0;
    char *user_arg = xstrndup(spec, strlen(spec));
    char *group_arg = strchr(user_arg, ':');
    if (group_arg != NULL)
        *group_arg++ = '\0';
    else
        group_arg = "";
    char *passwd = read_etc_file("passwd");
    struct passwd_match pm = {.name = user_arg, .uid_arg = parse_id(user_arg), .default_uid = 0};
    if (passwd != NULL)
        each_line(passwd, 7, passwd_line, &pm);
    const char *matched = "";
    if (pm.found) {
        matched = pm.matched_name;
        u->uid = pm.uid;
        u->gid = pm.gid;
        u->home = pm.home;
    } else if (user_arg[0] != '\0') {
        if (pm.uid_arg < 0)
            fail(EXIT_CANNOT_RUN, "unable to find user %s: no matching entries in passwd file", user_arg);
        u->uid = pm.uid_arg;
    }
    if (group_arg[0] == '\0' && matched[0] == '\0')
        return;
    char *group = read_etc_file("group");
    struct group_match gm = {.group_arg = group_arg, .gid_arg = parse_id(group_arg), .member = matched};
    if (group != NULL)
        each_line(group, 4, group_line, &gm);
    if (group_arg[0] != '\0') {
        if (gm.found)
            u->gid = gm.gid;
        else if (gm.gid_arg >= 0)
            u->gid = gm.gid_arg;
        else
            fail(EXIT_CANNOT_RUN, "unable to find group %s: no matching entries in group file", group_arg);
    } else {
        u->sgids = gm.sgids;
        u->nsgids = gm.nsgids;
    }
}

/* Docker's daemon gives the process its primary gid as the first supplementary group, then the
 * groups /etc/group lists the user in (so `id` shows both in a container, and here). */
static void supplementary_groups(struct exec_user *u)
{
    gid_t *all = xrealloc(NULL, (u->nsgids + 1) * sizeof(*all));
    size_t n = 0;
    all[n++] = (gid_t)u->gid;
    for (size_t i = 0; i < u->nsgids; i++)
        if (u->sgids[i] != (gid_t)u->gid)
            all[n++] = u->sgids[i];
    free(u->sgids);
    u->sgids = all;
    u->nsgids = n;
}

static void become(struct exec_user *u)
{
    supplementary_groups(u);
#ifdef NITROCONV_SHIM_TEST
    char groups[512] = "";
    size_t off = 0;
    for (size_t i = 0; i < u->nsgids && off < sizeof(groups) - 16; i++)
        off += (size_t)snprintf(groups + off, sizeof(groups) - off, "%s%u", i ? "," : "", (unsigned)u->sgids[i]);
    say("nitroconv-shim-test: uid=%ld gid=%ld groups=%s", u->uid, u->gid, groups);
#else
    if (setgroups(u->nsgids, u->sgids) < 0)
        fail(EXIT_CANNOT_RUN, "setgroups: %s", strerror(errno));
    if (setgid((gid_t)u->gid) < 0)
        fail(EXIT_CANNOT_RUN, "setgid %ld: %s", u->gid, strerror(errno));
    if (setuid((uid_t)u->uid) < 0)
        fail(EXIT_CANNOT_RUN, "setuid %ld: %s", u->uid, strerror(errno));
#endif
}

/* ---- exec ----------------------------------------------------------------------------------- */

static int executable_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode) && (st.st_mode & 0111);
}

/* Go's exec.LookPath, which runc uses: a name with '/' as is, else the first executable regular
 * file on PATH (the program's environment, not the init's). */
static char *look_path(const char *name, const char *path)
{
    if (strchr(name, '/') != NULL)
        return (char *)name;
    if (path == NULL || *name == '\0')
        return NULL;
    const char *p = path;
    for (;;) {
        const char *colon = strchr(p, ':');
        size_t dlen = colon ? (size_t)(colon - p) : strlen(p);
        /* An empty PATH entry means "." to a shell; Go refuses relative results (ErrDot). */
        if (dlen > 0 && p[0] == '/') {
            char *candidate = xrealloc(NULL, dlen + strlen(name) + 2);
            snprintf(candidate, dlen + strlen(name) + 2, "%.*s/%s", (int)dlen, p, name);
            if (executable_file(candidate))
                return candidate;
            free(candidate);
        }
        if (colon == NULL)
            return NULL;
        p = colon + 1;
    }
}

int main(int argc, char **argv)
{
    struct options o;
    parse_options(argc, argv, &o);
#ifndef NITROCONV_SHIM_TEST
    network_up();
#endif

    struct strv env = {0};
    for (char **e = environ; e && *e; e++) {
#ifdef NITROCONV_SHIM_TEST
        if (strncmp(*e, "NITROCONV_SHIM_TEST_", 20) == 0)
            continue;
#endif
        strv_push(&env, *e);
    }
    for (size_t i = 0; i < o.mutable_defaults.len; i++)
        env_set(&env, o.mutable_defaults.items[i]);

    struct strv args = {0};
    for (int i = 0; i < o.argc; i++)
        strv_push(&args, o.argv[i]);

    struct answer answer;
    fetch_runtime_values(&answer);
    apply_runtime_values(&o, &answer, &env, &args);

    struct exec_user user;
    resolve_user(o.user, &user);
    if (env_get(&env, "HOME") == NULL) {
        const char *value = user.home != NULL && *user.home ? user.home : "/";
        size_t n = strlen(value) + 6;
        char *home = xrealloc(NULL, n);
        snprintf(home, n, "HOME=%s", value);
        strv_push(&env, home);
    }

    /* As runc: chdir as root first (the user may lack search permission on a parent the program
     * does not need), and once more as the user only if root was refused. */
    int chdir_later = 0;
    if (chdir(o.workdir) < 0) {
        if (errno != EACCES && errno != EPERM)
            fail(EXIT_CANNOT_RUN, "cannot enter WORKDIR %s: %s", o.workdir, strerror(errno));
        chdir_later = 1;
    }
    become(&user);
    if (chdir_later && chdir(o.workdir) < 0)
        fail(EXIT_CANNOT_RUN, "cannot enter WORKDIR %s: %s", o.workdir, strerror(errno));

    const char *name = args.items[0];
    char *file = look_path(name, env_get(&env, "PATH"));
    if (file == NULL)
        fail(EXIT_NOT_FOUND, "exec: \"%s\": executable file not found in $PATH", name);
    execve(file, args.items, env.items);
    int e = errno;
    fail(e == ENOENT ? EXIT_NOT_FOUND : EXIT_CANNOT_RUN, "exec %s: %s", file, strerror(e));
}
