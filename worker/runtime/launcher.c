/*
 * nitroconv launcher: /enclave/run, the entrypoint of a converted (output) image, on the parent
 * instance. Static, no libc outside the binary, no shell and no Python needed in the image.
 *
 *   /enclave/run [--dry-run] [--debug] [--help] [--] [ARG…]
 *
 * 1. reads /enclave/launch.json (written by worker/pipeline/convert.py::_enclave_files) with the
 *    small strict JSON reader below: bounded size, known keys only, anything else is refused;
 * 2. builds the run-time answer for the enclave's exec shim (protocol of docs round 2, mirrored in
 *    tests/unit/test_launcher.py): an `E` record for every name of `mutable_env_vars` set in this
 *    process's environment (`docker run -e NAME=value`), an `A` record per extra argument
 *    (`docker run IMAGE arg…`, refused at start unless `allow_cmdline_args`), then `Z0\n`;
 * 3. listens on vsock (CID any, port 9001), starts `nitro-cli run-enclave --eif-path … --cpu-count N
 *    --memory M [--debug-mode --attach-console]`, answers every enclave that says `NCRT1\n`,
 *    forwards SIGINT/SIGTERM/SIGHUP to nitro-cli and exits with its status.
 *
 * Without --attach-console, nitro-cli returns once the enclave has sent its ready heartbeat, which
 * is *before* the shim asks for its values; so after a successful nitro-cli the launcher keeps
 * serving until one exchange has completed or SERVE_GRACE_SECONDS have passed (when there are
 * values to serve; without any, the shim's defaults are the answer anyway).
 *
 * Launcher options are recognised only before the program's arguments; the first other word (or
 * `--`) starts those, so `docker run IMAGE -v` passes `-v` on and `docker run IMAGE -- --dry-run`
 * passes a literal `--dry-run`. Values of the environment are never printed.
 *
 * Emulated enclaves (`nitroconv run-local`, worker/emulator/runlocal.py): three environment variables
 * switch the parent side from a Nitro host to QEMU's nitro-enclave machine with our vhost-user-vsock
 * back-end, so the same launcher, the same launch.json rules and the same run-time protocol serve it.
 * Variables, not options, because argv belongs to the program (`docker run IMAGE ARG…`):
 *   NITROCONV_RUN_LAUNCH_JSON=PATH  read PATH instead of /enclave/launch.json;
 *   NITROCONV_RUN_VSOCK_UDS=BASE    serve on the Unix socket BASE_9001, where the back-end delivers the
 *                                   enclave's connections to port 9001 (the peer is the enclave: the
 *                                   back-end only forwards the guest's own connections);
 *   NITROCONV_RUN_NITRO_CLI=PATH    run PATH instead of nitro-cli, with nitro-cli's arguments; it stays
 *                                   attached until the enclave ends and exits with its status.
 *
 * Built with -DLAUNCHER_TEST_HOOKS (tests only), two more options exist: `--launch-json PATH`
 * reads another file, and `--serve-fd N` answers exactly one exchange on the inherited connected
 * socket N and exits (0 when served), so the protocol is tested over a socket pair.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

#include "ingress.h"

#define PROG "nitroconv-run: "
#define LAUNCH_JSON "/enclave/launch.json"
#define NITRO_CLI "nitro-cli"
#define ENV_LAUNCH_JSON "NITROCONV_RUN_LAUNCH_JSON"
#define ENV_VSOCK_UDS "NITROCONV_RUN_VSOCK_UDS"
#define ENV_NITRO_CLI "NITROCONV_RUN_NITRO_CLI"
#define RUNTIME_PORT 9001
#define HELLO "NCRT1\n"
#define HELLO_LEN 6
/* Protocol bounds (round 2): a value of at most 64 KiB, at most 256 records (the final Z one
 * included), 1 MiB in all. launch.json itself is small; 1 MiB bounds a hostile one. */
#define MAX_VALUE 65536
#define MAX_RECORDS 256
#define MAX_ANSWER (1024 * 1024)
#define MAX_JSON (1024 * 1024)
#define MAX_ENV_VARS (MAX_RECORDS - 1)
#define EXCHANGE_SECONDS 5
#define SERVE_GRACE_SECONDS 30
#define EXIT_USAGE 2
#define EXIT_NO_NITRO_CLI 127

struct env_default {
    char *name;
    char *value;
};

struct launch {
    char *eif;
    long long cpu_count;
    long long memory_mib;
    int debug;
    int allow_cmdline_args;
    struct env_default env[MAX_ENV_VARS];
    size_t n_env;
    char *java_mode; /* NULL for JSON null */
    int overlay_persistence;
    /* "network": the published ports of the build's policy (the rest of it is the enclave's business). */
    struct ingress_port ingress[INGRESS_MAX];
    int n_ingress;
};

struct answer {
    char *buf;
    size_t len;
    size_t n_env;
    size_t n_args;
};

static void die(int code, const char *fmt, ...) __attribute__((noreturn, format(printf, 2, 3)));
static void die(int code, const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, PROG "%s\n", line);
    exit(code);
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, PROG "%s\n", line);
}

/* ---- strict JSON reader ------------------------------------------------------------------------ */

struct reader {
    const char *p;
    const char *end;
    const char *err;
};

static int fail(struct reader *r, const char *why) {
    if (!r->err)
        r->err = why;
    return -1;
}

static void skip_ws(struct reader *r) {
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static int expect(struct reader *r, char c) {
    skip_ws(r);
    if (r->p >= r->end || *r->p != c)
        return fail(r, "unexpected character");
    r->p++;
    return 0;
}

static int literal(struct reader *r, const char *word) {
    size_t n = strlen(word);
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, word, n) != 0)
        return fail(r, "unexpected word");
    r->p += n;
    return 0;
}

static int hex4(struct reader *r, unsigned *out) {
    unsigned v = 0;
    if (r->end - r->p < 4)
        return fail(r, "truncated \\u escape");
    for (int i = 0; i < 4; i++) {
        char c = *r->p++;
        v <<= 4;
        if (c >= '0' && c <= '9') v |= (unsigned)(c - '0');
        else if (c >= 'a' && c <= 'f') v |= (unsigned)(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F') v |= (unsigned)(c - 'A' + 10);
        else return fail(r, "bad \\u escape");
    }
    *out = v;
    return 0;
}

static size_t put_utf8(char *o, unsigned cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xC0 | (cp >> 6)); o[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xE0 | (cp >> 12)); o[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (char)(0x80 | (cp & 0x3F)); return 3;
    }
    o[0] = (char)(0xF0 | (cp >> 18)); o[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F)); return 4;
}

/* Length of one well-formed UTF-8 sequence at p (no overlongs, no surrogates), 0 if malformed. */
static size_t utf8_seq(const unsigned char *p, const unsigned char *end) {
    unsigned char c = p[0];
    size_t n;
    unsigned cp;
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) { n = 2; cp = c & 0x1F; }
    else if (c >= 0xE0 && c <= 0xEF) { n = 3; cp = c & 0x0F; }
    else if (c >= 0xF0 && c <= 0xF4) { n = 4; cp = c & 0x07; }
    else return 0;
    if ((size_t)(end - p) < n) return 0;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (p[i] & 0x3F);
    }
    if ((n == 3 && (cp < 0x800 || (cp >= 0xD800 && cp <= 0xDFFF))) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)))
        return 0;
    return n;
}

/* A JSON string into a fresh NUL-terminated buffer. NUL (\u0000) is refused: no C string, no
 * environment entry and no argument can hold it. */
static int string(struct reader *r, char **out) {
    skip_ws(r);
    if (r->p >= r->end || *r->p != '"')
        return fail(r, "expected a string");
    r->p++;
    /* Decoded text is never longer than its escaped form. */
    char *buf = malloc((size_t)(r->end - r->p) + 1);
    if (!buf)
        die(1, "out of memory");
    size_t n = 0;
    for (;;) {
        if (r->p >= r->end) { free(buf); return fail(r, "unterminated string"); }
        unsigned char c = (unsigned char)*r->p;
        if (c == '"') { r->p++; break; }
        if (c < 0x20) { free(buf); return fail(r, "control character in string"); }
        if (c != '\\') {
            size_t len = utf8_seq((const unsigned char *)r->p, (const unsigned char *)r->end);
            if (!len) { free(buf); return fail(r, "invalid UTF-8 in string"); }
            memcpy(buf + n, r->p, len);
            n += len;
            r->p += len;
            continue;
        }
        r->p++;
        if (r->p >= r->end) { free(buf); return fail(r, "unterminated escape"); }
        char e = *r->p++;
        switch (e) {
        case '"': buf[n++] = '"'; break;
        case '\\': buf[n++] = '\\'; break;
        case '/': buf[n++] = '/'; break;
        case 'b': buf[n++] = '\b'; break;
        case 'f': buf[n++] = '\f'; break;
        case 'n': buf[n++] = '\n'; break;
        case 'r': buf[n++] = '\r'; break;
        case 't': buf[n++] = '\t'; break;
        case 'u': {
            unsigned cp, lo;
            if (hex4(r, &cp)) { free(buf); return -1; }
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (r->end - r->p < 2 || r->p[0] != '\\' || r->p[1] != 'u') { free(buf); return fail(r, "lone surrogate"); }
                r->p += 2;
                if (hex4(r, &lo)) { free(buf); return -1; }
                if (lo < 0xDC00 || lo > 0xDFFF) { free(buf); return fail(r, "lone surrogate"); }
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                free(buf);
                return fail(r, "lone surrogate");
            }
            if (cp == 0) { free(buf); return fail(r, "NUL in string"); }
            n += put_utf8(buf + n, cp);
            break;
        }
        default: free(buf); return fail(r, "unknown escape");
        }
    }
    buf[n] = '\0';
    *out = buf;
    return 0;
}

/* A non-negative integer without sign, fraction, exponent or leading zero, at most `max`. */
static int integer(struct reader *r, long long max, long long *out) {
    skip_ws(r);
    if (r->p >= r->end || *r->p < '0' || *r->p > '9')
        return fail(r, "expected an integer");
    if (*r->p == '0' && r->end - r->p > 1 && r->p[1] >= '0' && r->p[1] <= '9')
        return fail(r, "leading zero");
    long long v = 0;
    while (r->p < r->end && *r->p >= '0' && *r->p <= '9') {
        v = v * 10 + (*r->p++ - '0');
        if (v > max)
            return fail(r, "integer out of range");
    }
    if (r->p < r->end && (*r->p == '.' || *r->p == 'e' || *r->p == 'E'))
        return fail(r, "expected an integer");
    *out = v;
    return 0;
}

static int boolean(struct reader *r, int *out) {
    skip_ws(r);
    if (r->p < r->end && *r->p == 't') { *out = 1; return literal(r, "true"); }
    if (r->p < r->end && *r->p == 'f') { *out = 0; return literal(r, "false"); }
    return fail(r, "expected true or false");
}

/* Environment names as the converter accepts them (common/enclave/launch.py::parse_env): not empty, no '='.
 * Control characters are refused too: a name is printed in --dry-run and in logs. */
static int env_name_ok(const char *s) {
    if (!*s)
        return 0;
    for (; *s; s++)
        if (*s == '=' || (unsigned char)*s < 0x20 || *s == 0x7F)
            return 0;
    return 1;
}

static int env_object(struct reader *r, struct launch *l) {
    if (expect(r, '{'))
        return -1;
    skip_ws(r);
    if (r->p < r->end && *r->p == '}') { r->p++; return 0; }
    for (;;) {
        char *name, *value;
        if (string(r, &name))
            return -1;
        if (!env_name_ok(name)) { free(name); return fail(r, "mutable_env_vars: bad variable name"); }
        for (size_t i = 0; i < l->n_env; i++)
            if (strcmp(l->env[i].name, name) == 0) { free(name); return fail(r, "mutable_env_vars: duplicate name"); }
        if (l->n_env == MAX_ENV_VARS) { free(name); return fail(r, "mutable_env_vars: too many names"); }
        if (expect(r, ':') || string(r, &value)) { free(name); return -1; }
        l->env[l->n_env].name = name;
        l->env[l->n_env].value = value;
        l->n_env++;
        skip_ws(r);
        if (r->p < r->end && *r->p == ',') { r->p++; continue; }
        return expect(r, '}');
    }
}

/* Any JSON value, checked and skipped (bounded nesting). */
static int skip_value(struct reader *r, int depth) {
    skip_ws(r);
    if (depth > 16)
        return fail(r, "nested too deeply");
    if (r->p >= r->end)
        return fail(r, "truncated");
    char c = *r->p;
    if (c == '"') {
        char *s;
        if (string(r, &s))
            return -1;
        free(s);
        return 0;
    }
    if (c == 't' || c == 'f') { int b; return boolean(r, &b); }
    if (c == 'n') return literal(r, "null");
    if (c >= '0' && c <= '9') { long long v; return integer(r, 1LL << 53, &v); }
    if (c != '{' && c != '[')
        return fail(r, "unexpected character");
    char close_c = c == '{' ? '}' : ']';
    r->p++;
    skip_ws(r);
    if (r->p < r->end && *r->p == close_c) { r->p++; return 0; }
    for (;;) {
        if (c == '{') {
            char *k;
            if (string(r, &k))
                return -1;
            free(k);
            if (expect(r, ':'))
                return -1;
        }
        if (skip_value(r, depth + 1))
            return -1;
        skip_ws(r);
        if (r->p < r->end && *r->p == ',') { r->p++; continue; }
        return expect(r, close_c);
    }
}

/* {"port": N, "proxy_protocol": B} */
static int ingress_entry(struct reader *r, struct ingress_port *e) {
    int seen_port = 0, seen_proxy = 0;
    e->proxy = 0;
    if (expect(r, '{'))
        return -1;
    for (;;) {
        char *k;
        if (string(r, &k))
            return -1;
        if (expect(r, ':')) { free(k); return -1; }
        int rc;
        if (strcmp(k, "port") == 0 && !seen_port++) {
            long long v;
            rc = integer(r, 65535, &v);
            e->port = (int)v;
            if (!rc && v < 1)
                rc = fail(r, "network: ingress port out of range");
        } else if (strcmp(k, "proxy_protocol") == 0 && !seen_proxy++) {
            rc = boolean(r, &e->proxy);
        } else {
            rc = fail(r, "network: unknown or duplicate ingress key");
        }
        free(k);
        if (rc)
            return -1;
        skip_ws(r);
        if (r->p < r->end && *r->p == ',') { r->p++; continue; }
        if (expect(r, '}'))
            return -1;
        return seen_port ? 0 : fail(r, "network: ingress entry without a port");
    }
}

static int network_object(struct reader *r, struct launch *l) {
    if (expect(r, '{'))
        return -1;
    skip_ws(r);
    if (r->p < r->end && *r->p == '}') { r->p++; return 0; }
    for (;;) {
        char *k;
        if (string(r, &k))
            return -1;
        int is_ingress = strcmp(k, "ingress") == 0;
        free(k);
        if (expect(r, ':'))
            return -1;
        if (!is_ingress) {
            if (skip_value(r, 1))
                return -1;
        } else {
            if (expect(r, '['))
                return -1;
            skip_ws(r);
            if (r->p < r->end && *r->p == ']') {
                r->p++;
            } else {
                for (;;) {
                    if (l->n_ingress == INGRESS_MAX)
                        return fail(r, "network: too many ingress ports");
                    struct ingress_port *e = &l->ingress[l->n_ingress];
                    if (ingress_entry(r, e))
                        return -1;
                    for (int i = 0; i < l->n_ingress; i++)
                        if (l->ingress[i].port == e->port)
                            return fail(r, "network: an ingress port is listed twice");
                    l->n_ingress++;
                    skip_ws(r);
                    if (r->p < r->end && *r->p == ',') { r->p++; continue; }
                    if (expect(r, ']'))
                        return -1;
                    break;
                }
            }
        }
        skip_ws(r);
        if (r->p < r->end && *r->p == ',') { r->p++; continue; }
        return expect(r, '}');
    }
}

enum key { K_EIF, K_CPU, K_MEM, K_DEBUG, K_ARGS, K_ENV, K_JAVA, K_OVERLAY, K_NETWORK, K_COUNT };
static const char *const KEYS[K_COUNT] = {
    "eif", "cpu_count", "memory_mib", "debug", "allow_cmdline_args", "mutable_env_vars", "java_mode",
    "enable_overlay_filesystem_persistence", "network",
};

/* Parses launch.json text into `l`; returns NULL or why it was refused. */
static const char *parse_launch(const char *text, size_t len, struct launch *l) {
    struct reader r = {text, text + len, NULL};
    int seen[K_COUNT] = {0};
    memset(l, 0, sizeof *l);
    l->overlay_persistence = 1;
    if (memchr(text, '\0', len))
        return "NUL byte in file";
    if (expect(&r, '{'))
        return r.err;
    skip_ws(&r);
    if (r.p < r.end && *r.p == '}') {
        r.p++;
    } else {
        for (;;) {
            char *key;
            if (string(&r, &key))
                return r.err;
            int k = 0;
            while (k < K_COUNT && strcmp(KEYS[k], key) != 0)
                k++;
            free(key);
            if (k == K_COUNT)
                return "unknown key";
            if (seen[k]++)
                return "duplicate key";
            if (expect(&r, ':'))
                return r.err;
            int rc = 0;
            switch ((enum key)k) {
            case K_EIF: rc = string(&r, &l->eif); break;
            case K_CPU: rc = integer(&r, 4096, &l->cpu_count); break;
            case K_MEM: rc = integer(&r, 1LL << 30, &l->memory_mib); break;
            case K_DEBUG: rc = boolean(&r, &l->debug); break;
            case K_ARGS: rc = boolean(&r, &l->allow_cmdline_args); break;
            case K_ENV: rc = env_object(&r, l); break;
            case K_JAVA:
                skip_ws(&r);
                if (r.p < r.end && *r.p == 'n') rc = literal(&r, "null");
                else rc = string(&r, &l->java_mode);
                break;
            case K_OVERLAY: rc = boolean(&r, &l->overlay_persistence); break;
            case K_NETWORK: rc = network_object(&r, l); break;
            case K_COUNT: break;
            }
            if (rc)
                return r.err;
            skip_ws(&r);
            if (r.p < r.end && *r.p == ',') { r.p++; continue; }
            if (expect(&r, '}'))
                return r.err;
            break;
        }
    }
    skip_ws(&r);
    if (r.p != r.end)
        return "trailing data after the object";
    if (!seen[K_EIF] || !seen[K_CPU] || !seen[K_MEM])
        return "eif, cpu_count and memory_mib are required";
    if (l->eif[0] != '/')
        return "eif must be an absolute path";
    if (l->cpu_count < 1 || l->memory_mib < 1)
        return "cpu_count and memory_mib must be positive";
    return NULL;
}

static void read_launch(const char *path, struct launch *l) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        die(1, "cannot open %s: %s", path, strerror(errno));
    char *buf = malloc(MAX_JSON + 1);
    if (!buf)
        die(1, "out of memory");
    size_t len = 0;
    for (;;) {
        ssize_t got = read(fd, buf + len, MAX_JSON + 1 - len);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            die(1, "cannot read %s: %s", path, strerror(errno));
        if (got == 0)
            break;
        len += (size_t)got;
        if (len > MAX_JSON)
            die(1, "%s is larger than %d bytes; refusing it", path, MAX_JSON);
    }
    close(fd);
    const char *why = parse_launch(buf, len, l);
    if (why)
        die(1, "%s is not a valid launch file: %s", path, why);
    free(buf);
}

/* ---- the run-time answer ----------------------------------------------------------------------- */

static void append(struct answer *a, char kind, const char *s1, const char *s2) {
    size_t n1 = strlen(s1), n2 = s2 ? strlen(s2) : 0, len = n1 + (s2 ? 1 + n2 : 0);
    char head[32];
    int hn = snprintf(head, sizeof head, "%c%zu\n", kind, len);
    if (a->len + (size_t)hn + len > MAX_ANSWER)
        die(EXIT_USAGE, "the run-time values exceed %d bytes in all", MAX_ANSWER);
    memcpy(a->buf + a->len, head, (size_t)hn);
    a->len += (size_t)hn;
    memcpy(a->buf + a->len, s1, n1);
    a->len += n1;
    if (s2) {
        a->buf[a->len++] = '=';
        memcpy(a->buf + a->len, s2, n2);
        a->len += n2;
    }
}

static void build_answer(const struct launch *l, int argc, char **argv, struct answer *a) {
    a->buf = malloc(MAX_ANSWER);
    if (!a->buf)
        die(1, "out of memory");
    a->len = a->n_env = a->n_args = 0;
    if (argc > 0 && !l->allow_cmdline_args)
        die(EXIT_USAGE, "this image does not accept extra arguments (allow_cmdline_args is false); "
                        "got %d; convert with allow_cmdline_args to allow them", argc);
    if ((size_t)argc + l->n_env > MAX_RECORDS - 1)
        die(EXIT_USAGE, "too many run-time values (at most %d environment entries and arguments)", MAX_RECORDS - 1);
    for (size_t i = 0; i < l->n_env; i++) {
        const char *v = getenv(l->env[i].name);
        if (!v)
            continue;
        if (strlen(l->env[i].name) + 1 + strlen(v) > MAX_VALUE)
            die(EXIT_USAGE, "env %s is longer than %d bytes", l->env[i].name, MAX_VALUE);
        append(a, 'E', l->env[i].name, v);
        a->n_env++;
    }
    for (int i = 0; i < argc; i++) {
        if (strlen(argv[i]) > MAX_VALUE)
            die(EXIT_USAGE, "argument %d is longer than %d bytes", i + 1, MAX_VALUE);
        append(a, 'A', argv[i], NULL);
        a->n_args++;
    }
    append(a, 'Z', "", NULL);
}

static int write_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* One exchange on a connected socket: read the hello, send the answer. 0 when served. `cid` is the
 * peer's vsock CID for the log, or -1 when unknown (an inherited socket). */
static int serve_one(int fd, const struct answer *a, long cid) {
    struct timeval tv = {EXCHANGE_SECONDS, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    char hello[HELLO_LEN];
    size_t got = 0;
    while (got < HELLO_LEN) {
        ssize_t n = recv(fd, hello + got, HELLO_LEN - got, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            say("enclave connection ended before its hello");
            return -1;
        }
        got += (size_t)n;
    }
    if (memcmp(hello, HELLO, HELLO_LEN) != 0) {
        say("refused a connection: not the nitroconv run-time hello");
        return -1;
    }
    if (write_all(fd, a->buf, a->len)) {
        say("sending the run-time values failed: %s", strerror(errno));
        return -1;
    }
    if (cid >= 0)
        say("served %zu env value(s) and %zu argument(s) to the enclave (CID %ld)", a->n_env, a->n_args, cid);
    else
        say("served %zu env value(s) and %zu argument(s) to the enclave", a->n_env, a->n_args);
    return 0;
}

/* ---- nitro-cli --------------------------------------------------------------------------------- */

/* The first executable nitro-cli on PATH (as execvp would find it), or NULL. */
static char *find_on_path(const char *name) {
    const char *path = getenv("PATH");
    if (!path || !*path)
        path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    size_t nlen = strlen(name);
    while (*path) {
        const char *colon = strchr(path, ':');
        size_t dlen = colon ? (size_t)(colon - path) : strlen(path);
        if (dlen && dlen + 1 + nlen < PATH_MAX) {
            char *full = malloc(dlen + nlen + 2);
            if (!full)
                die(1, "out of memory");
            memcpy(full, path, dlen);
            full[dlen] = '/';
            memcpy(full + dlen + 1, name, nlen + 1);
            struct stat st;
            if (stat(full, &st) == 0 && S_ISREG(st.st_mode) && access(full, X_OK) == 0)
                return full;
            free(full);
        }
        path += dlen;
        if (*path == ':')
            path++;
    }
    return NULL;
}

static volatile sig_atomic_t child_pid = 0;
static volatile sig_atomic_t pending_signal = 0;
static int wake_pipe[2] = {-1, -1};

static volatile sig_atomic_t egress_pid = 0;

static void on_signal(int sig) {
    int saved = errno;
    if (egress_pid > 0)
        kill((pid_t)egress_pid, sig);
    if (child_pid > 0)
        kill((pid_t)child_pid, sig);
    else
        pending_signal = sig;
    if (write(wake_pipe[1], "s", 1) < 0) {
        /* full pipe: the loop is already awake */
    }
    errno = saved;
}

static void on_child(int sig) {
    (void)sig;
    int saved = errno;
    if (write(wake_pipe[1], "c", 1) < 0) {
        /* full pipe: the loop is already awake */
    }
    errno = saved;
}

static int exit_code(int status) {
    if (WIFEXITED(status))
        return WEXITSTATUS(status);
    if (WIFSIGNALED(status))
        return 128 + WTERMSIG(status);
    return 1;
}

static int listen_vsock(void) {
    int fd = socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct sockaddr_vm addr;
    memset(&addr, 0, sizeof addr);
    addr.svm_family = AF_VSOCK;
    addr.svm_cid = VMADDR_CID_ANY;
    addr.svm_port = RUNTIME_PORT;
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 16) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

/* The emulator's stand-in for vsock port 9001: the back-end's Unix socket BASE_9001 (stale ones replaced). */
static int listen_uds(const char *base) {
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    int n = snprintf(addr.sun_path, sizeof addr.sun_path, "%s_%d", base, RUNTIME_PORT);
    if (n < 0 || (size_t)n >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    struct stat st;
    if (lstat(addr.sun_path, &st) == 0 && S_ISSOCK(st.st_mode))
        unlink(addr.sun_path);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(fd, 16) < 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

/* The egress service (worker/runtime/egress.c) beside this binary (/enclave/egress): the enclave's way out,
 * on vsock port 9002 (BASE_9002 under NITROCONV_RUN_VSOCK_UDS, which it reads too). It ends with the
 * launcher. Without it the enclave has no egress, which is all a `none` policy needs. */
static pid_t spawn_egress(void) {
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 16);
    char *slash = n > 0 ? memrchr(self, '/', (size_t)n) : NULL;
    if (!slash)
        return -1;
    strcpy(slash + 1, "egress");
    if (access(self, X_OK) != 0)
        return -1;
    sigset_t block, old;
    sigfillset(&block);
    sigprocmask(SIG_BLOCK, &block, &old);
    pid_t parent = getpid(), pid = fork();
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(0);
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL); /* run() holds SIGTERM & co. blocked here: not for this child */
        execl(self, "egress", (char *)NULL);
        _exit(127);
    }
    sigprocmask(SIG_SETMASK, &old, NULL);
    return pid;
}

static int run(const char *nitro_cli, char *const cmd[], const struct answer *a, int attached, const char *uds,
               const struct launch *l) {
    if (pipe2(wake_pipe, O_CLOEXEC | O_NONBLOCK) < 0)
        die(1, "pipe: %s", strerror(errno));
    /* Published ports first: a port that cannot be bound fails the launch before any enclave starts. */
    char why[256];
    int ingress = ingress_start(l->ingress, l->n_ingress, uds, why, sizeof why);
    if (ingress < 0)
        die(1, "ingress: %s", why);
    int lfd = uds ? listen_uds(uds) : listen_vsock();
    if (lfd < 0) {
        int err = errno;
        /* Docker's default seccomp profile refuses AF_VSOCK sockets; say what to change. */
        const char *hint = (err == EPERM || err == EACCES)
            ? " (Docker's default seccomp profile denies vsock: run with --privileged or a profile that allows it)"
            : "";
        /* Without vsock nothing can reach the enclave: values the user gave would be lost silently. */
        if (a->n_env || a->n_args)
            die(1, "cannot listen on vsock port %d (%s)%s, so the given env values/arguments cannot reach the "
                   "enclave", RUNTIME_PORT, strerror(err), hint);
        say("cannot listen on vsock port %d (%s)%s; the enclave will use its defaults", RUNTIME_PORT, strerror(err),
            hint);
    }
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sigemptyset(&sa.sa_mask);
    sa.sa_flags = SA_RESTART;
    sa.sa_handler = on_signal;
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    sa.sa_handler = on_child;
    sa.sa_flags = SA_RESTART | SA_NOCLDSTOP;
    sigaction(SIGCHLD, &sa, NULL);

    sigset_t block, old;
    sigemptyset(&block);
    sigaddset(&block, SIGINT);
    sigaddset(&block, SIGTERM);
    sigaddset(&block, SIGHUP);
    sigprocmask(SIG_BLOCK, &block, &old);
    pid_t egress = spawn_egress();
    egress_pid = egress;
    pid_t pid = fork();
    if (pid < 0)
        die(1, "fork: %s", strerror(errno));
    if (pid == 0) {
        signal(SIGINT, SIG_DFL);
        signal(SIGTERM, SIG_DFL);
        signal(SIGHUP, SIG_DFL);
        signal(SIGCHLD, SIG_DFL);
        sigprocmask(SIG_SETMASK, &old, NULL);
        execv(nitro_cli, cmd);
        fprintf(stderr, PROG "cannot run %s: %s\n", nitro_cli, strerror(errno));
        _exit(EXIT_NO_NITRO_CLI);
    }
    child_pid = pid;
    sigprocmask(SIG_SETMASK, &old, NULL);
    if (pending_signal)
        kill(pid, pending_signal);

    int status = 0, child_done = 0, served = 0;
    struct timespec deadline = {0, 0};
    for (;;) {
        int timeout = -1;
        if (child_done) {
            /* nitro-cli is gone: serve the late shim for a while, then leave with its status. With
             * nothing to serve there is no need to wait: the shim's defaults are the answer. */
            if (!attached && exit_code(status) == 0 && ingress > 0) {
                /* nitro-cli returned with the enclave running: the published ports live as long as this
                 * process, so it stays until it is told to stop. */
                if (pending_signal)
                    break;
                timeout = -1;
                goto wait;
            }
            if (attached || exit_code(status) != 0 || served || lfd < 0 || !(a->n_env || a->n_args))
                break;
            struct timespec now;
            clock_gettime(CLOCK_MONOTONIC, &now);
            long long left = (deadline.tv_sec - now.tv_sec) * 1000LL + (deadline.tv_nsec - now.tv_nsec) / 1000000;
            if (left <= 0) {
                say("the enclave did not ask for its run-time values within %d s; it runs with its defaults",
                    SERVE_GRACE_SECONDS);
                break;
            }
            timeout = (int)left;
        }
    wait:;
        struct pollfd fds[2] = {{wake_pipe[0], POLLIN, 0}, {lfd, POLLIN, 0}};
        int rc = poll(fds, lfd >= 0 ? 2 : 1, timeout);
        if (rc < 0 && errno != EINTR)
            die(1, "poll: %s", strerror(errno));
        if (rc > 0 && (fds[0].revents & POLLIN)) {
            char drain[64];
            while (read(wake_pipe[0], drain, sizeof drain) > 0) {
            }
            if (child_done && pending_signal)
                break;
        }
        if (!child_done) {
            int st;
            pid_t w;
            while ((w = waitpid(-1, &st, WNOHANG)) > 0) {
                if (w == pid) {
                    status = st;
                    child_done = 1;
                    child_pid = 0;
                    clock_gettime(CLOCK_MONOTONIC, &deadline);
                    deadline.tv_sec += SERVE_GRACE_SECONDS;
                    if (!attached && exit_code(status) == 0 && !served && lfd >= 0 && (a->n_env || a->n_args))
                        say("enclave started; serving its run-time values for up to %d s", SERVE_GRACE_SECONDS);
                }
            }
        }
        if (rc > 0 && lfd >= 0 && (fds[1].revents & POLLIN)) {
            struct sockaddr_vm peer;
            socklen_t peer_len = sizeof peer;
            memset(&peer, 0, sizeof peer);
            int cfd = accept4(lfd, uds ? NULL : (struct sockaddr *)&peer, uds ? NULL : &peer_len, SOCK_CLOEXEC);
            if (cfd >= 0 && uds) {
                if (serve_one(cfd, a, -1) == 0)
                    served = 1;
                close(cfd);
            } else if (cfd >= 0) {
                /* Enclaves have CIDs above the host's (2); the hypervisor, loopback and the host
                 * itself are not the enclave this launcher started. */
                if (peer.svm_cid <= VMADDR_CID_HOST)
                    say("refused a vsock connection from CID %u: not an enclave", peer.svm_cid);
                else if (serve_one(cfd, a, (long)peer.svm_cid) == 0)
                    served = 1;
                /* The enclave's CID, for the published ports to reach its vsock listeners. */
                if (peer.svm_cid > VMADDR_CID_HOST && ingress > 0 &&
                    write(ingress, &peer.svm_cid, sizeof peer.svm_cid) < 0)
                    say("ingress: cannot pass on the enclave's CID: %s", strerror(errno));
                close(cfd);
            }
        }
    }
    if (egress > 0 && !attached && exit_code(status) == 0) {
        /* nitro-cli returned with the enclave running: the enclave's way out must outlive it. */
        int st;
        while (waitpid(egress, &st, 0) < 0 && errno == EINTR) {
        }
    } else if (egress > 0) {
        kill(egress, SIGTERM);
    }
    return exit_code(status);
}

static void usage(FILE *out) {
    fprintf(out,
            "usage: /enclave/run [--dry-run] [--debug] [--] [ARG...]\n"
            "Starts this image's enclave with nitro-cli (as /enclave/launch.json says) and serves it the\n"
            "run-time values: env NAME=value for names on its mutable_env_vars list, ARGs when it allows\n"
            "extra arguments.\n"
            "  --dry-run  print the nitro-cli command and what would be served, then exit\n"
            "  --debug    run in debug mode (--debug-mode --attach-console): attests all-zero PCRs\n"
            "  --         what follows are the program's arguments, even if they look like options\n");
}

int main(int argc, char **argv) {
    int dry_run = 0, force_debug = 0, i = 1;
    const char *launch_path = LAUNCH_JSON;
#ifdef LAUNCHER_TEST_HOOKS
    int serve_fd = -1;
#endif
    for (; i < argc; i++) {
        if (strcmp(argv[i], "--") == 0) { i++; break; }
        if (strcmp(argv[i], "--dry-run") == 0) dry_run = 1;
        else if (strcmp(argv[i], "--debug") == 0) force_debug = 1;
        else if (strcmp(argv[i], "--help") == 0) { usage(stdout); return 0; }
#ifdef LAUNCHER_TEST_HOOKS
        else if (strcmp(argv[i], "--launch-json") == 0 && i + 1 < argc) launch_path = argv[++i];
        else if (strcmp(argv[i], "--serve-fd") == 0 && i + 1 < argc) serve_fd = atoi(argv[++i]);
#endif
        else break;
    }
    int n_args = argc - i;
    char **args = argv + i;

    if (strcmp(launch_path, LAUNCH_JSON) == 0 && getenv(ENV_LAUNCH_JSON) && *getenv(ENV_LAUNCH_JSON))
        launch_path = getenv(ENV_LAUNCH_JSON);
    const char *uds = getenv(ENV_VSOCK_UDS);
    if (uds && !*uds)
        uds = NULL;
    const char *emulator = getenv(ENV_NITRO_CLI);
    if (emulator && !*emulator)
        emulator = NULL;

    static struct launch l;
    read_launch(launch_path, &l);
    struct answer a;
    build_answer(&l, n_args, args, &a);
#ifdef LAUNCHER_TEST_HOOKS
    if (serve_fd >= 0)
        return serve_one(serve_fd, &a, -1) == 0 ? 0 : 1;
#endif

    int debug = l.debug || force_debug;
    char cpus[24], mem[24];
    snprintf(cpus, sizeof cpus, "%lld", l.cpu_count);
    snprintf(mem, sizeof mem, "%lld", l.memory_mib);
    char *cmd[12];
    int c = 0;
    cmd[c++] = NITRO_CLI;
    cmd[c++] = "run-enclave";
    cmd[c++] = "--eif-path";
    cmd[c++] = l.eif;
    cmd[c++] = "--cpu-count";
    cmd[c++] = cpus;
    cmd[c++] = "--memory";
    cmd[c++] = mem;
    if (debug) {
        cmd[c++] = "--debug-mode";
        cmd[c++] = "--attach-console";
    }
    cmd[c] = NULL;

    char *nitro_cli = emulator ? strdup(emulator) : find_on_path(NITRO_CLI);
    if (dry_run) {
        printf("command:");
        for (int k = 0; k < c; k++)
            printf(" %s", cmd[k]);
        printf("\nnitro-cli: %s\n", nitro_cli ? nitro_cli : "not found (set NITROCONV_OUTPUT_BASE_IMAGE to an image with nitro-cli)");
        if (uds)
            printf("serve: unix socket %s_%d\n", uds, RUNTIME_PORT);
        else
            printf("serve: vsock port %d\n", RUNTIME_PORT);
        printf("env:");
        for (size_t k = 0; k < l.n_env; k++)
            if (getenv(l.env[k].name))
                printf(" %s", l.env[k].name);
        printf("%s\n", a.n_env ? "" : " (none set)");
        printf("allowed env: %zu\n", l.n_env);
        printf("args: %zu\n", a.n_args);
        printf("allow_cmdline_args: %s\n", l.allow_cmdline_args ? "true" : "false");
        printf("debug: %s\n", debug ? "true" : "false");
        printf("java_mode: %s\n", l.java_mode ? l.java_mode : "null");
        printf("enable_overlay_filesystem_persistence: %s\n", l.overlay_persistence ? "true" : "false");
        printf("ingress:");
        for (int k = 0; k < l.n_ingress; k++)
            printf(" %d%s", l.ingress[k].port, l.ingress[k].proxy ? "(proxy-protocol)" : "");
        printf("%s\n", l.n_ingress ? "" : " (none)");
        return 0;
    }
    if (emulator && access(emulator, X_OK) != 0)
        die(EXIT_NO_NITRO_CLI, "%s=%s is not an executable: %s", ENV_NITRO_CLI, emulator, strerror(errno));
    if (!nitro_cli)
        die(EXIT_NO_NITRO_CLI, "nitro-cli was not found on PATH: this output image has no nitro-cli. Convert with "
                               "NITROCONV_OUTPUT_BASE_IMAGE set to an image that has it (or run with --dry-run)");
    if (debug)
        say("debug mode: the enclave's console is attached and its attestation shows all-zero PCRs");
    fflush(stdout);
    /* The emulator stays attached until the enclave ends, like nitro-cli --attach-console. */
    return run(nitro_cli, cmd, &a, debug || emulator != NULL, uds, &l);
}
