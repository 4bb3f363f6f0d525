/*
 * nitroconv attestd: the enclave's attestation endpoint (README "Attestation from inside the enclave").
 *
 * Started by the init from /.nitroconv/attestd (app ramdisk, measured in PCR2) before the program. It
 * serves HTTP/1.1 on 127.0.0.1:1300 only:
 *
 *   GET /.well-known/nitroconv/attestation[?nonce=HEX][&public_key=HEX][&user_data=HEX]
 *     200 application/cbor   the NSM's attestation document (a COSE_Sign1) binding the given values
 *     400 application/json   bad input, {"error": {"code": "<stable code>", "message": …, "details": {…}}}
 *     404, 405, 408, 431, 505 likewise; 503 nsm_unavailable without /dev/nsm; 500 nsm_error
 *
 * Values are hex (either case), at most the NSM's limits: nonce and user_data 512 bytes, public_key 1024.
 * Hex because the verifier (`nitroconv attestation verify --nonce HEX`, the API's "nonce") takes hex too.
 *
 * Start-up, as root: /dev/nsm is opened (absent: every request answers 503), loopback is brought up, the
 * socket bound; then the process forks, the parent exits 0 (the init waits for that, so the endpoint is
 * listening before the program starts) and the child drops to nobody (65534) with no_new_privs: the NSM
 * stays reachable through the descriptor it already holds, and nothing else of root's is kept.
 *
 * One thread, poll(2), non-blocking sockets: a request must arrive whole within REQUEST_TIMEOUT_MS, an
 * answer leave within RESPONSE_TIMEOUT_MS; at most MAX_CLIENTS connections, and when they are all taken the
 * one that has been sending its request the longest is dropped, so slow clients cannot lock others out.
 * Every answer closes its connection (Connection: close). The parser (parse_request) is a pure function
 * of the bytes received, fuzzed by tests/fuzz/fuzz_attestd_request.c.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "console.h"
#include "nsm_cbor.h"

#define ATTESTD_PREFIX "nitroconv-attestd: "
#define LISTEN_PORT 1300
#define ENDPOINT_PATH "/.well-known/nitroconv/attestation"
#define NSM_DEV "/dev/nsm"
#define UNPRIVILEGED_ID 65534

/* The NSM's own limits (aws-nitro-enclaves-nsm-api): bigger values are refused before they reach it. */
#define MAX_NONCE 512
#define MAX_USER_DATA 512
#define MAX_PUBLIC_KEY 1024
/* The request line and headers: the longest valid request line is ~4.2 KiB (4096 hex digits). */
#define MAX_HEAD_BYTES 8192
#define MAX_HEADERS 64
#define MAX_CLIENTS 32
#define REQUEST_TIMEOUT_MS 5000
#define RESPONSE_TIMEOUT_MS 5000
/* After the answer, what the client still sends is read and dropped for this long: closing a socket with
 * unread bytes resets it, and the reset could destroy the answer before the client read it. */
#define LINGER_MS 1000
#define NSM_REQUEST_MAX 0x1000
#define NSM_RESPONSE_MAX 0x3000

/* The NSM driver's raw ioctl (include/uapi/linux/nsm.h), as in init.c. */
struct nsm_iovec {
    uint64_t addr;
    uint64_t len;
};
struct nsm_raw {
    struct nsm_iovec request;
    struct nsm_iovec response;
};
#define NSM_IOCTL_RAW _IOWR(0x0A, 0x0, struct nsm_raw)

/* ---- the request ------------------------------------------------------------------------------------- */

struct att_request {
    uint8_t nonce[MAX_NONCE], user_data[MAX_USER_DATA], public_key[MAX_PUBLIC_KEY];
    size_t nonce_len, user_data_len, public_key_len;
    int has_nonce, has_user_data, has_public_key;
};

/* An answer other than the document: status, stable code, fixed message, and the parameter it concerns. */
struct http_error {
    int status;
    const char *code;
    const char *message;
    const char *parameter;
};

enum { PARSE_OK = 0, PARSE_MORE = 1, PARSE_ERROR = 2 };

static int fail(struct http_error *err, int status, const char *code, const char *message, const char *parameter)
{
    err->status = status;
    err->code = code;
    err->message = message;
    err->parameter = parameter;
    return PARSE_ERROR;
}

static int is_tchar(unsigned char c)
{
    /* RFC 9110 token characters */
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           (c != 0 && strchr("!#$%&'*+-.^_`|~", c) != NULL);
}

static int hex_value(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static int span_is(const char *s, size_t n, const char *want)
{
    return n == strlen(want) && memcmp(s, want, n) == 0;
}

static int span_is_nocase(const char *s, size_t n, const char *want)
{
    return n == strlen(want) && strncasecmp(s, want, n) == 0;
}

/* One query parameter's value, hex, into out (cap bytes). */
static int decode_param(const char *v, size_t n, uint8_t *out, size_t cap, size_t *out_len, const char *name,
                        struct http_error *err)
{
    if (n == 0)
        return fail(err, 400, "empty_parameter", "a parameter has no value (leave it out instead)", name);
    if (n % 2 != 0)
        return fail(err, 400, "invalid_hex", "a value is not hex: odd number of digits", name);
    if (n / 2 > cap)
        return fail(err, 400, "parameter_too_long", "a value is longer than the NSM accepts "
                                                    "(nonce, user_data: 512 bytes; public_key: 1024)", name);
    for (size_t i = 0; i < n; i += 2) {
        int hi = hex_value((unsigned char)v[i]), lo = hex_value((unsigned char)v[i + 1]);
        if (hi < 0 || lo < 0)
            return fail(err, 400, "invalid_hex", "a value is not hex (digits 0-9, a-f)", name);
        out[i / 2] = (uint8_t)(hi << 4 | lo);
    }
    *out_len = n / 2;
    return PARSE_OK;
}

static int parse_query(const char *q, size_t n, struct att_request *req, struct http_error *err)
{
    size_t pos = 0;
    if (n == 0)
        return PARSE_OK;
    for (;;) {
        size_t end = pos;
        while (end < n && q[end] != '&')
            end++;
        const char *item = q + pos, *eq = memchr(item, '=', end - pos);
        if (eq == NULL)
            return fail(err, 400, "malformed_query", "the query must be name=value pairs joined by &", NULL);
        size_t name_len = (size_t)(eq - item), value_len = end - pos - name_len - 1;
        const char *value = eq + 1;
        uint8_t *out;
        size_t cap, *out_len;
        int *seen;
        const char *name;
        if (span_is(item, name_len, "nonce")) {
            name = "nonce", out = req->nonce, cap = MAX_NONCE, out_len = &req->nonce_len, seen = &req->has_nonce;
        } else if (span_is(item, name_len, "user_data")) {
            name = "user_data", out = req->user_data, cap = MAX_USER_DATA, out_len = &req->user_data_len,
            seen = &req->has_user_data;
        } else if (span_is(item, name_len, "public_key")) {
            name = "public_key", out = req->public_key, cap = MAX_PUBLIC_KEY, out_len = &req->public_key_len,
            seen = &req->has_public_key;
        } else {
            return fail(err, 400, "unknown_parameter", "the parameters are nonce, public_key and user_data", NULL);
        }
        if (*seen)
            return fail(err, 400, "duplicate_parameter", "a parameter is given twice", name);
        if (decode_param(value, value_len, out, cap, out_len, name, err) != PARSE_OK)
            return PARSE_ERROR;
        *seen = 1;
        if (end == n)
            return PARSE_OK;
        pos = end + 1;
    }
}

/* The request target: origin-form, or absolute-form (http://authority/path) as RFC 9112 §3.2.2 asks servers
 * to accept; anything but the endpoint's path is 404. */
static int parse_target(const char *t, size_t n, struct att_request *req, struct http_error *err)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)t[i] <= 0x20 || (unsigned char)t[i] >= 0x7f)
            return fail(err, 400, "malformed_request", "the request target has a character URIs do not", NULL);
    if (n >= 7 && strncasecmp(t, "http://", 7) == 0) {
        size_t i = 7;
        while (i < n && t[i] != '/' && t[i] != '?')
            i++;
        if (i == 7)
            return fail(err, 400, "malformed_request", "the absolute request target has no authority", NULL);
        t += i;
        n -= i;
        if (n == 0 || t[0] == '?')
            return fail(err, 404, "not_found", "the endpoint is GET " ENDPOINT_PATH, NULL);
    }
    if (n == 0 || t[0] != '/')
        return fail(err, 400, "malformed_request", "the request target must start with /", NULL);
    const char *q = memchr(t, '?', n);
    size_t path_len = q ? (size_t)(q - t) : n;
    if (memchr(t, '#', n) != NULL)
        return fail(err, 400, "malformed_request", "the request target has a fragment", NULL);
    if (!span_is(t, path_len, ENDPOINT_PATH))
        return fail(err, 404, "not_found", "the endpoint is GET " ENDPOINT_PATH, NULL);
    return q ? parse_query(q + 1, n - path_len - 1, req, err) : PARSE_OK;
}

static int parse_request_line(const char *line, size_t n, struct att_request *req, struct http_error *err)
{
    const char *sp1 = memchr(line, ' ', n);
    if (sp1 == NULL || sp1 == line)
        return fail(err, 400, "malformed_request", "the request line must be METHOD SP TARGET SP VERSION", NULL);
    const char *rest = sp1 + 1, *end = line + n;
    const char *sp2 = memchr(rest, ' ', (size_t)(end - rest));
    if (sp2 == NULL || sp2 == rest || memchr(sp2 + 1, ' ', (size_t)(end - sp2 - 1)) != NULL)
        return fail(err, 400, "malformed_request", "the request line must be METHOD SP TARGET SP VERSION", NULL);
    size_t method_len = (size_t)(sp1 - line), version_len = (size_t)(end - sp2 - 1);
    for (size_t i = 0; i < method_len; i++)
        if (!is_tchar((unsigned char)line[i]))
            return fail(err, 400, "malformed_request", "the method is not a token", NULL);
    const char *version = sp2 + 1;
    if (!(version_len == 8 && memcmp(version, "HTTP/1.", 7) == 0 && (version[7] == '0' || version[7] == '1'))) {
        if (version_len == 8 && memcmp(version, "HTTP/", 5) == 0 && version[5] >= '0' && version[5] <= '9' &&
            version[6] == '.' && version[7] >= '0' && version[7] <= '9')
            return fail(err, 505, "http_version_not_supported", "HTTP/1.0 and HTTP/1.1 only", NULL);
        return fail(err, 400, "malformed_request", "the request line does not end in HTTP/1.x", NULL);
    }
    if (!span_is(line, method_len, "GET"))
        return fail(err, 405, "method_not_allowed", "the endpoint answers GET only", NULL);
    return parse_target(rest, (size_t)(sp2 - rest), req, err);
}

/* One header field line: name ":" OWS value OWS. A request with a body is refused: a GET here has none,
 * and not reading one keeps the connection's framing beyond doubt. */
static int parse_header(const char *line, size_t n, struct http_error *err)
{
    if (line[0] == ' ' || line[0] == '\t')
        return fail(err, 400, "malformed_request", "obsolete header line folding is not accepted", NULL);
    const char *colon = memchr(line, ':', n);
    if (colon == NULL || colon == line)
        return fail(err, 400, "malformed_request", "a header line has no name", NULL);
    size_t name_len = (size_t)(colon - line);
    for (size_t i = 0; i < name_len; i++)
        if (!is_tchar((unsigned char)line[i]))
            return fail(err, 400, "malformed_request", "a header name is not a token", NULL);
    const char *v = colon + 1, *end = line + n;
    for (const char *p = v; p < end; p++) {
        unsigned char c = (unsigned char)*p;
        if ((c < 0x20 && c != '\t') || c == 0x7f)
            return fail(err, 400, "malformed_request", "a header value has a control character", NULL);
    }
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == ' ' || end[-1] == '\t'))
        end--;
    if (span_is_nocase(line, name_len, "transfer-encoding") ||
        (span_is_nocase(line, name_len, "content-length") && !span_is(v, (size_t)(end - v), "0")))
        return fail(err, 400, "body_not_allowed", "a GET of this endpoint has no body", NULL);
    return PARSE_OK;
}

/* The bytes received so far: PARSE_MORE until the head (request line and headers, up to the empty line)
 * is complete, then PARSE_OK with *req filled, or PARSE_ERROR with *err. Lines end in CRLF or LF; a CR
 * anywhere else is refused. Bytes after the head (a body or another request) are never looked at. */
static int parse_request(const char *buf, size_t len, struct att_request *req, struct http_error *err)
{
    memset(req, 0, sizeof(*req));
    size_t head = 0;
    int found = 0;
    size_t scan = len < MAX_HEAD_BYTES ? len : MAX_HEAD_BYTES;
    for (size_t i = 0; i < scan; i++) {
        if (buf[i] != '\n')
            continue;
        if (i >= 1 && buf[i - 1] == '\n') {
            head = i + 1, found = 1;
            break;
        }
        if (i >= 2 && buf[i - 1] == '\r' && buf[i - 2] == '\n') {
            head = i + 1, found = 1;
            break;
        }
    }
    if (!found)
        return len >= MAX_HEAD_BYTES
                   ? fail(err, 431, "request_too_large", "the request line and headers exceed 8 KiB", NULL)
                   : PARSE_MORE;
    size_t pos = 0, lines = 0;
    /* RFC 9112 §2.2: empty lines before the request line are ignored. */
    while (pos < head && (buf[pos] == '\n' || (buf[pos] == '\r' && pos + 1 < head && buf[pos + 1] == '\n')))
        pos += buf[pos] == '\n' ? 1 : 2;
    int rc = PARSE_OK;
    while (pos < head) {
        const char *line = buf + pos;
        const char *nl = memchr(line, '\n', head - pos);
        size_t n = (size_t)(nl - line);
        pos += n + 1;
        if (n > 0 && line[n - 1] == '\r')
            n--;
        if (n == 0)
            break; /* the empty line that ends the head */
        if (memchr(line, '\r', n) != NULL || memchr(line, '\0', n) != NULL)
            return fail(err, 400, "malformed_request", "a stray CR or NUL in the request", NULL);
        if (lines++ == 0) {
            rc = parse_request_line(line, n, req, err);
            /* The request line decides 404/405/505 even when headers are bad too; a header error beats it
             * only when the line itself was good. */
            if (rc != PARSE_OK)
                return rc;
        } else if (lines > MAX_HEADERS + 1) {
            return fail(err, 431, "request_too_large", "more than 64 header fields", NULL);
        } else if (parse_header(line, n, err) != PARSE_OK) {
            return PARSE_ERROR;
        }
    }
    if (lines == 0)
        return fail(err, 400, "malformed_request", "no request line", NULL);
    return rc;
}

/* ---- answers ----------------------------------------------------------------------------------------- */

static const char *reason(int status)
{
    switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 404: return "Not Found";
    case 405: return "Method Not Allowed";
    case 408: return "Request Timeout";
    case 431: return "Request Header Fields Too Large";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    case 505: return "HTTP Version Not Supported";
    default: return "Error";
    }
}

/* An answer in a fresh buffer (malloc'd; NULL when out of memory). The messages and codes are ours, never
 * the client's bytes, so they need no JSON escaping. */
static char *error_answer(const struct http_error *e, size_t *len)
{
    char body[512];
    int b = snprintf(body, sizeof(body), "{\"error\":{\"code\":\"%s\",\"message\":\"%s\",\"details\":{%s%s%s}}}\n",
                     e->code, e->message, e->parameter ? "\"parameter\":\"" : "", e->parameter ? e->parameter : "",
                     e->parameter ? "\"" : "");
    if (b < 0 || (size_t)b >= sizeof(body))
        return NULL;
    size_t cap = (size_t)b + 512;
    char *out = malloc(cap);
    if (out == NULL)
        return NULL;
    int h = snprintf(out, cap,
                     "HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
                     "Cache-Control: no-store\r\n%sConnection: close\r\n\r\n%s",
                     e->status, reason(e->status), b, e->status == 405 ? "Allow: GET\r\n" : "", body);
    if (h < 0 || (size_t)h >= cap) {
        free(out);
        return NULL;
    }
    *len = (size_t)h;
    return out;
}

static char *document_answer(const uint8_t *doc, size_t doc_len, size_t *len)
{
    char head[256];
    int h = snprintf(head, sizeof(head),
                     "HTTP/1.1 200 OK\r\nContent-Type: application/cbor\r\nContent-Length: %zu\r\n"
                     "Cache-Control: no-store\r\nConnection: close\r\n\r\n",
                     doc_len);
    if (h < 0 || (size_t)h >= sizeof(head))
        return NULL;
    char *out = malloc((size_t)h + doc_len);
    if (out == NULL)
        return NULL;
    memcpy(out, head, (size_t)h);
    memcpy(out + h, doc, doc_len);
    *len = (size_t)h + doc_len;
    return out;
}

/* ---- the NSM ----------------------------------------------------------------------------------------- */

static int nsm_fd = -1;

static ssize_t nsm_call(const uint8_t *req, size_t req_len, uint8_t *resp, size_t cap)
{
    struct nsm_raw raw = {
        .request = {.addr = (uint64_t)(uintptr_t)req, .len = req_len},
        .response = {.addr = (uint64_t)(uintptr_t)resp, .len = cap},
    };
    int rc;
    do
        rc = ioctl(nsm_fd, NSM_IOCTL_RAW, &raw);
    while (rc < 0 && errno == EINTR);
    if (rc < 0)
        return -errno;
    if (raw.response.len > cap)
        return -EPROTO;
    return (ssize_t)raw.response.len;
}

static char *attest(const struct att_request *r, size_t *len)
{
    static uint8_t req[NSM_REQUEST_MAX], resp[NSM_RESPONSE_MAX];
    struct http_error e;
    if (nsm_fd < 0) {
        fail(&e, 503, "nsm_unavailable", "this enclave has no /dev/nsm (not a Nitro enclave or its emulator)", NULL);
        return error_answer(&e, len);
    }
    size_t req_len = nsm_attestation_request(req, sizeof(req), r->has_user_data ? r->user_data : NULL,
                                             r->user_data_len, r->has_nonce ? r->nonce : NULL, r->nonce_len,
                                             r->has_public_key ? r->public_key : NULL, r->public_key_len);
    if (req_len == 0) {
        fail(&e, 500, "nsm_error", "the NSM request does not fit", NULL);
        return error_answer(&e, len);
    }
    ssize_t n = nsm_call(req, req_len, resp, sizeof(resp));
    const uint8_t *doc = NULL;
    size_t doc_len = 0;
    char code[64] = "";
    int rc = n < 0 ? NSM_CBOR_MALFORMED : nsm_parse_attestation(resp, (size_t)n, &doc, &doc_len, code, sizeof(code));
    if (rc != NSM_CBOR_OK) {
        /* The console gets the NSM's own word; the client a stable code. */
        if (n < 0)
            say(ATTESTD_PREFIX "nsm error: Attestation: %s", strerror((int)-n));
        else if (rc == NSM_CBOR_ERROR_REPLY)
            say(ATTESTD_PREFIX "nsm error: Attestation: the NSM answered %s", code);
        else
            say(ATTESTD_PREFIX "nsm error: Attestation: malformed response (%zd bytes)", n);
        fail(&e, 500, "nsm_error", "the NSM did not give an attestation document", NULL);
        return error_answer(&e, len);
    }
    return document_answer(doc, doc_len, len);
}

/* ---- connections ------------------------------------------------------------------------------------- */

enum conn_state { FREE = 0, READING, WRITING, LINGERING };

struct conn {
    int fd;
    enum conn_state state;
    int64_t started, deadline;
    char in[MAX_HEAD_BYTES];
    size_t in_len;
    char *out;
    size_t out_len, out_pos;
};

static struct conn conns[MAX_CLIENTS];

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void conn_close(struct conn *c)
{
    if (c->fd >= 0)
        close(c->fd);
    free(c->out);
    c->fd = -1;
    c->out = NULL;
    c->state = FREE;
    c->in_len = c->out_len = c->out_pos = 0;
}

static void conn_answer(struct conn *c, char *answer, size_t len)
{
    if (answer == NULL) { /* out of memory: nothing sensible to send */
        conn_close(c);
        return;
    }
    c->out = answer;
    c->out_len = len;
    c->out_pos = 0;
    c->state = WRITING;
    c->deadline = now_ms() + RESPONSE_TIMEOUT_MS;
}

static void conn_fail(struct conn *c, int status, const char *code, const char *message)
{
    struct http_error e;
    size_t len = 0;
    fail(&e, status, code, message, NULL);
    char *answer = error_answer(&e, &len);
    conn_answer(c, answer, len);
}

static int head_may_end(const char *in, size_t len, size_t fresh)
{
    size_t from = len - fresh >= 2 ? len - fresh - 2 : 0;
    for (size_t i = from; i + 1 < len; i++)
        if (in[i] == '\n' && (in[i + 1] == '\n' || (in[i + 1] == '\r' && i + 2 < len && in[i + 2] == '\n')))
            return 1;
    return 0;
}

static void conn_read(struct conn *c)
{
    if (c->state == LINGERING) {
        char sink[4096];
        ssize_t n = recv(c->fd, sink, sizeof(sink), 0);
        if (n == 0 || (n < 0 && errno != EAGAIN && errno != EINTR))
            conn_close(c);
        return;
    }
    ssize_t n = recv(c->fd, c->in + c->in_len, sizeof(c->in) - c->in_len, 0);
    if (n < 0) {
        if (errno != EAGAIN && errno != EINTR)
            conn_close(c);
        return;
    }
    if (n == 0) { /* the client gave up before its request was whole */
        conn_close(c);
        return;
    }
    c->in_len += (size_t)n;
    /* Parse only once the head's end (an empty line) may be in: it can only end in the new bytes or the two
     * before them, so clients sending a byte at a time cost linear time, not a parse per byte. */
    if (c->in_len < sizeof(c->in) && !head_may_end(c->in, c->in_len, (size_t)n))
        return;
    struct att_request *req = malloc(sizeof(*req));
    struct http_error e;
    if (req == NULL) {
        conn_close(c);
        return;
    }
    int rc = parse_request(c->in, c->in_len, req, &e);
    if (rc == PARSE_OK) {
        size_t len = 0;
        char *answer = attest(req, &len);
        conn_answer(c, answer, len);
    } else if (rc == PARSE_ERROR) {
        size_t len = 0;
        char *answer = error_answer(&e, &len);
        conn_answer(c, answer, len);
    }
    explicit_bzero(req, sizeof(*req));
    free(req);
}

static void conn_write(struct conn *c)
{
    while (c->out_pos < c->out_len) {
        ssize_t n = send(c->fd, c->out + c->out_pos, c->out_len - c->out_pos, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR)
                conn_close(c);
            return;
        }
        c->out_pos += (size_t)n;
    }
    free(c->out);
    c->out = NULL;
    shutdown(c->fd, SHUT_WR);
    c->state = LINGERING;
    c->deadline = now_ms() + LINGER_MS;
}

static void conn_timeout(struct conn *c)
{
    if (c->state == READING)
        conn_fail(c, 408, "request_timeout", "the request did not arrive whole within 5 seconds");
    else
        conn_close(c);
}

/* A new connection; when every slot is taken, the one that has been sending its request the longest
 * makes room (answers being written or lingering end by their own deadlines). */
static void conn_accept(int lfd)
{
    int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
        return;
    struct conn *slot = NULL, *oldest = NULL;
    for (size_t i = 0; i < MAX_CLIENTS && slot == NULL; i++) {
        if (conns[i].state == FREE)
            slot = &conns[i];
        else if (conns[i].state == READING && (oldest == NULL || conns[i].started < oldest->started))
            oldest = &conns[i];
    }
    if (slot == NULL && oldest != NULL) {
        conn_close(oldest);
        slot = oldest;
    }
    if (slot == NULL) {
        close(fd);
        return;
    }
    slot->fd = fd;
    slot->state = READING;
    slot->started = now_ms();
    slot->deadline = slot->started + REQUEST_TIMEOUT_MS;
    slot->in_len = 0;
}

static _Noreturn void serve(int lfd)
{
    struct pollfd pfd[MAX_CLIENTS + 1];
    struct conn *of[MAX_CLIENTS + 1];
    for (size_t i = 0; i < MAX_CLIENTS; i++)
        conns[i].fd = -1;
    for (;;) {
        int64_t now = now_ms(), wait = -1;
        size_t n = 0;
        pfd[n] = (struct pollfd){.fd = lfd, .events = POLLIN};
        of[n++] = NULL;
        for (size_t i = 0; i < MAX_CLIENTS; i++) {
            struct conn *c = &conns[i];
            if (c->state == FREE)
                continue;
            if (c->deadline <= now) {
                conn_timeout(c);
                if (c->state == FREE)
                    continue;
            }
            pfd[n] = (struct pollfd){.fd = c->fd, .events = c->state == WRITING ? POLLOUT : POLLIN};
            of[n++] = c;
            int64_t left = c->deadline - now;
            if (wait < 0 || left < wait)
                wait = left < 0 ? 0 : left;
        }
        int ready = poll(pfd, n, wait > INT32_MAX ? INT32_MAX : (int)wait);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            say(ATTESTD_PREFIX "fatal: poll: %s", strerror(errno));
            _exit(1);
        }
        for (size_t i = 1; i < n; i++) {
            struct conn *c = of[i];
            if (pfd[i].revents == 0 || c->state == FREE)
                continue;
            if (c->state == WRITING)
                conn_write(c);
            else
                conn_read(c);
        }
        if (pfd[0].revents & POLLIN)
            conn_accept(lfd);
    }
}

/* ---- start-up ---------------------------------------------------------------------------------------- */

#ifndef ATTESTD_TEST
static int loopback_up(void)
{
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0)
        return -1;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    strcpy(ifr.ifr_name, "lo");
    int rc = ioctl(s, SIOCGIFFLAGS, &ifr);
    if (rc == 0 && !(ifr.ifr_flags & IFF_UP)) {
        ifr.ifr_flags |= IFF_UP;
        rc = ioctl(s, SIOCSIFFLAGS, &ifr);
    }
    int e = errno;
    close(s);
    errno = e;
    return rc;
}
#endif

static int listen_loopback(uint16_t port)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1;
    (void)setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(port)};
    sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (bind(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(fd, 64) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

#ifndef ATTESTD_TEST
static void drop_privileges(void)
{
    if (setgroups(0, NULL) < 0 || setgid(UNPRIVILEGED_ID) < 0 || setuid(UNPRIVILEGED_ID) < 0 ||
        prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
        say(ATTESTD_PREFIX "fatal: cannot drop privileges: %s", strerror(errno));
        _exit(1);
    }
}
#endif

#ifdef ATTESTD_TEST
/* The test build (never shipped): the port and the NSM device from the command line, no loopback
 * configuration and no privilege change, so it runs beside other tests on a development host. */
int main(int argc, char **argv)
{
    if (argc != 3) {
        fputs("usage: attestd-test PORT NSM_DEVICE\n", stderr);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    nsm_fd = open(argv[2], O_RDWR | O_CLOEXEC);
    int lfd = listen_loopback((uint16_t)atoi(argv[1]));
    if (lfd < 0) {
        say(ATTESTD_PREFIX "fatal: listen on 127.0.0.1:%s: %s", argv[1], strerror(errno));
        return 1;
    }
    say(ATTESTD_PREFIX "listening on 127.0.0.1:%s, nsm %s", argv[1], nsm_fd < 0 ? "absent" : "present");
    serve(lfd);
}
#else
int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    nsm_fd = open(NSM_DEV, O_RDWR | O_CLOEXEC);
    if (nsm_fd < 0)
        say(ATTESTD_PREFIX "no " NSM_DEV " (%s): every request will answer 503 nsm_unavailable", strerror(errno));
    if (loopback_up() < 0)
        say(ATTESTD_PREFIX "cannot bring loopback up: %s", strerror(errno));
    int lfd = listen_loopback(LISTEN_PORT);
    if (lfd < 0) {
        say(ATTESTD_PREFIX "fatal: listen on 127.0.0.1:%d: %s", LISTEN_PORT, strerror(errno));
        return 1;
    }
    /* The parent's exit tells the init that the endpoint listens. */
    pid_t pid = fork();
    if (pid < 0) {
        say(ATTESTD_PREFIX "fatal: fork: %s", strerror(errno));
        return 1;
    }
    if (pid > 0)
        _exit(0);
    setsid();
    if (chdir("/") < 0)
        _exit(1);
    int null = open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (null >= 0) {
        dup2(null, STDIN_FILENO);
        close(null);
    }
    drop_privileges();
    serve(lfd);
}
#endif
