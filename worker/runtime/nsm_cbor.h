/* The Nitro Secure Module requests of the init (DescribePCR, GetRandom) and of attestd (Attestation), in
 * the CBOR the NSM speaks (the serde encoding of aws-nitro-enclaves-nsm-api's Request/Response enums,
 * passed raw through the driver's NSM_IOCTL_RAW):
 *
 *   DescribePCR request   {"DescribePCR": {"index": n}}
 *   DescribePCR response  {"DescribePCR": {"lock": bool, "data": bytes}}   (keys in any order)
 *   GetRandom request     "GetRandom"
 *   GetRandom response    {"GetRandom": {"random": bytes}}
 *   Attestation request   {"Attestation": {"user_data": bytes|null, "nonce": bytes|null, "public_key": bytes|null}}
 *   Attestation response  {"Attestation": {"document": bytes}}                (a COSE_Sign1)
 *   any error             {"Error": "<ErrorCode>"}
 *
 * Only what these need: definite lengths, no tags, no floats. The decoder is strict: every length
 * is checked against what remains of the buffer before it is used, the response must be exactly one
 * item with nothing after it, and a key other than the expected ones is an error. Pure functions of
 * their buffers (no I/O), so the host's unit tests compile and feed them directly. Each program uses only
 * some of them, hence NSM_CBOR_FN's `unused`. */
#ifndef NITROCONV_NSM_CBOR_H
#define NITROCONV_NSM_CBOR_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define NSM_CBOR_FN static __attribute__((unused))

enum {
    NSM_CBOR_OK = 0,
    NSM_CBOR_MALFORMED = -1,   /* not the CBOR shape expected, truncated, or trailing bytes */
    NSM_CBOR_TOO_LONG = -2,    /* a byte string longer than the caller's buffer */
    NSM_CBOR_ERROR_REPLY = -3, /* the NSM answered {"Error": …}; its code is in the error buffer */
};

#define NSM_CBOR_MAJOR_UINT 0u
#define NSM_CBOR_MAJOR_BYTES 2u
#define NSM_CBOR_MAJOR_TEXT 3u
#define NSM_CBOR_MAJOR_MAP 5u
#define NSM_CBOR_MAJOR_SIMPLE 7u
#define NSM_CBOR_FALSE 20u
#define NSM_CBOR_TRUE 21u
#define NSM_CBOR_NULL 22u

struct nsm_cbor_in {
    const uint8_t *p;
    size_t left;
};

/* Appends a head (major type and argument, shortest form) to buf; returns the new length, or 0
 * when it does not fit. */
NSM_CBOR_FN size_t nsm_cbor_put_head(uint8_t *buf, size_t cap, size_t len, unsigned major, uint32_t arg)
{
    uint8_t head[5];
    size_t n;
    if (arg < 24) {
        head[0] = (uint8_t)(major << 5 | arg);
        n = 1;
    } else if (arg <= 0xff) {
        head[0] = (uint8_t)(major << 5 | 24);
        head[1] = (uint8_t)arg;
        n = 2;
    } else if (arg <= 0xffff) {
        head[0] = (uint8_t)(major << 5 | 25);
        head[1] = (uint8_t)(arg >> 8);
        head[2] = (uint8_t)arg;
        n = 3;
    } else {
        head[0] = (uint8_t)(major << 5 | 26);
        head[1] = (uint8_t)(arg >> 24);
        head[2] = (uint8_t)(arg >> 16);
        head[3] = (uint8_t)(arg >> 8);
        head[4] = (uint8_t)arg;
        n = 5;
    }
    if (len > cap || cap - len < n)
        return 0;
    memcpy(buf + len, head, n);
    return len + n;
}

NSM_CBOR_FN size_t nsm_cbor_put_text(uint8_t *buf, size_t cap, size_t len, const char *s)
{
    size_t n = strlen(s);
    len = nsm_cbor_put_head(buf, cap, len, NSM_CBOR_MAJOR_TEXT, (uint32_t)n);
    if (len == 0 || cap - len < n)
        return 0;
    memcpy(buf + len, s, n);
    return len + n;
}

/* {"DescribePCR": {"index": index}}; returns its length, 0 when cap is too small. */
NSM_CBOR_FN size_t nsm_describe_pcr_request(uint8_t *buf, size_t cap, uint16_t index)
{
    size_t len = nsm_cbor_put_head(buf, cap, 0, NSM_CBOR_MAJOR_MAP, 1);
    if (len)
        len = nsm_cbor_put_text(buf, cap, len, "DescribePCR");
    if (len)
        len = nsm_cbor_put_head(buf, cap, len, NSM_CBOR_MAJOR_MAP, 1);
    if (len)
        len = nsm_cbor_put_text(buf, cap, len, "index");
    if (len)
        len = nsm_cbor_put_head(buf, cap, len, NSM_CBOR_MAJOR_UINT, index);
    return len;
}

/* "GetRandom" (a unit variant is a bare string). */
NSM_CBOR_FN size_t nsm_get_random_request(uint8_t *buf, size_t cap)
{
    return nsm_cbor_put_text(buf, cap, 0, "GetRandom");
}

/* A byte string, or null when `s` is NULL (an Option the NSM reads as absent). */
NSM_CBOR_FN size_t nsm_cbor_put_bytes_or_null(uint8_t *buf, size_t cap, size_t len, const uint8_t *s, size_t n)
{
    if (s == NULL)
        return nsm_cbor_put_head(buf, cap, len, NSM_CBOR_MAJOR_SIMPLE, NSM_CBOR_NULL);
    if (n > UINT32_MAX)
        return 0;
    len = nsm_cbor_put_head(buf, cap, len, NSM_CBOR_MAJOR_BYTES, (uint32_t)n);
    if (len == 0 || cap - len < n)
        return 0;
    if (n)
        memcpy(buf + len, s, n);
    return len + n;
}

/* {"Attestation": {"user_data": …, "nonce": …, "public_key": …}}, every key present and null for what the
 * caller did not give, as aws-nitro-enclaves-nsm-api's own client sends it; 0 when cap is too small. */
NSM_CBOR_FN size_t nsm_attestation_request(uint8_t *buf, size_t cap, const uint8_t *user_data, size_t user_data_len,
                                           const uint8_t *nonce, size_t nonce_len, const uint8_t *public_key,
                                           size_t public_key_len)
{
    size_t len = nsm_cbor_put_head(buf, cap, 0, NSM_CBOR_MAJOR_MAP, 1);
    if (len)
        len = nsm_cbor_put_text(buf, cap, len, "Attestation");
    if (len)
        len = nsm_cbor_put_head(buf, cap, len, NSM_CBOR_MAJOR_MAP, 3);
    if (len)
        len = nsm_cbor_put_text(buf, cap, len, "user_data");
    if (len)
        len = nsm_cbor_put_bytes_or_null(buf, cap, len, user_data, user_data_len);
    if (len)
        len = nsm_cbor_put_text(buf, cap, len, "nonce");
    if (len)
        len = nsm_cbor_put_bytes_or_null(buf, cap, len, nonce, nonce_len);
    if (len)
        len = nsm_cbor_put_text(buf, cap, len, "public_key");
    if (len)
        len = nsm_cbor_put_bytes_or_null(buf, cap, len, public_key, public_key_len);
    return len;
}

/* Reads one head; arguments above 32 bits, indefinite lengths and reserved forms are refused. */
NSM_CBOR_FN int nsm_cbor_head(struct nsm_cbor_in *in, unsigned *major, uint32_t *arg)
{
    if (in->left < 1)
        return NSM_CBOR_MALFORMED;
    uint8_t first = in->p[0];
    unsigned info = first & 0x1fu;
    size_t extra = info < 24 ? 0 : info == 24 ? 1 : info == 25 ? 2 : info == 26 ? 4 : 99;
    if (extra == 99 || in->left - 1 < extra)
        return NSM_CBOR_MALFORMED;
    uint32_t v = info < 24 ? info : 0;
    for (size_t i = 0; i < extra; i++)
        v = v << 8 | in->p[1 + i];
    *major = first >> 5;
    *arg = v;
    in->p += 1 + extra;
    in->left -= 1 + extra;
    return NSM_CBOR_OK;
}

/* A string of the given major type: points *s into the buffer (not NUL-terminated). */
NSM_CBOR_FN int nsm_cbor_string(struct nsm_cbor_in *in, unsigned want_major, const uint8_t **s, size_t *n)
{
    unsigned major;
    uint32_t len;
    if (nsm_cbor_head(in, &major, &len) != NSM_CBOR_OK || major != want_major || len > in->left)
        return NSM_CBOR_MALFORMED;
    *s = in->p;
    *n = len;
    in->p += len;
    in->left -= len;
    return NSM_CBOR_OK;
}

NSM_CBOR_FN int nsm_cbor_is(const uint8_t *s, size_t n, const char *want)
{
    return n == strlen(want) && memcmp(s, want, n) == 0;
}

/* Opens {name: {…}}: checks the envelope and returns the number of entries of the inner map. An
 * {"Error": "<code>"} reply copies the code (NUL-terminated, truncated to err_cap) and returns
 * NSM_CBOR_ERROR_REPLY. */
NSM_CBOR_FN int nsm_cbor_open(struct nsm_cbor_in *in, const char *name, uint32_t *entries, char *err, size_t err_cap)
{
    unsigned major;
    uint32_t count;
    const uint8_t *key, *code;
    size_t key_len, code_len;
    if (nsm_cbor_head(in, &major, &count) != NSM_CBOR_OK || major != NSM_CBOR_MAJOR_MAP || count != 1)
        return NSM_CBOR_MALFORMED;
    if (nsm_cbor_string(in, NSM_CBOR_MAJOR_TEXT, &key, &key_len) != NSM_CBOR_OK)
        return NSM_CBOR_MALFORMED;
    if (nsm_cbor_is(key, key_len, "Error")) {
        if (nsm_cbor_string(in, NSM_CBOR_MAJOR_TEXT, &code, &code_len) != NSM_CBOR_OK || in->left != 0)
            return NSM_CBOR_MALFORMED;
        if (err_cap > 0) {
            size_t n = code_len < err_cap - 1 ? code_len : err_cap - 1;
            for (size_t i = 0; i < n; i++) /* the code goes to the console: printable ASCII only */
                err[i] = code[i] >= 0x20 && code[i] < 0x7f ? (char)code[i] : '?';
            err[n] = '\0';
        }
        return NSM_CBOR_ERROR_REPLY;
    }
    if (!nsm_cbor_is(key, key_len, name))
        return NSM_CBOR_MALFORMED;
    if (nsm_cbor_head(in, &major, entries) != NSM_CBOR_OK || major != NSM_CBOR_MAJOR_MAP)
        return NSM_CBOR_MALFORMED;
    return NSM_CBOR_OK;
}

NSM_CBOR_FN int nsm_cbor_bytes_into(struct nsm_cbor_in *in, uint8_t *out, size_t cap, size_t *out_len)
{
    const uint8_t *s;
    size_t n;
    if (nsm_cbor_string(in, NSM_CBOR_MAJOR_BYTES, &s, &n) != NSM_CBOR_OK)
        return NSM_CBOR_MALFORMED;
    if (n > cap)
        return NSM_CBOR_TOO_LONG;
    memcpy(out, s, n);
    *out_len = n;
    return NSM_CBOR_OK;
}

/* {"DescribePCR": {"lock": bool, "data": bytes}}: both keys exactly once, nothing else. */
NSM_CBOR_FN int nsm_parse_describe_pcr(const uint8_t *resp, size_t len, uint8_t *data, size_t cap, size_t *data_len,
                                  int *locked, char *err, size_t err_cap)
{
    struct nsm_cbor_in in = {resp, len};
    uint32_t entries;
    int rc = nsm_cbor_open(&in, "DescribePCR", &entries, err, err_cap);
    if (rc != NSM_CBOR_OK)
        return rc;
    if (entries != 2)
        return NSM_CBOR_MALFORMED;
    int seen_lock = 0, seen_data = 0;
    for (uint32_t i = 0; i < entries; i++) {
        const uint8_t *key;
        size_t key_len;
        if (nsm_cbor_string(&in, NSM_CBOR_MAJOR_TEXT, &key, &key_len) != NSM_CBOR_OK)
            return NSM_CBOR_MALFORMED;
        if (nsm_cbor_is(key, key_len, "lock") && !seen_lock) {
            unsigned major;
            uint32_t v;
            if (nsm_cbor_head(&in, &major, &v) != NSM_CBOR_OK || major != NSM_CBOR_MAJOR_SIMPLE ||
                (v != NSM_CBOR_TRUE && v != NSM_CBOR_FALSE))
                return NSM_CBOR_MALFORMED;
            *locked = v == NSM_CBOR_TRUE;
            seen_lock = 1;
        } else if (nsm_cbor_is(key, key_len, "data") && !seen_data) {
            rc = nsm_cbor_bytes_into(&in, data, cap, data_len);
            if (rc != NSM_CBOR_OK)
                return rc;
            seen_data = 1;
        } else {
            return NSM_CBOR_MALFORMED;
        }
    }
    return in.left == 0 ? NSM_CBOR_OK : NSM_CBOR_MALFORMED;
}

/* {"GetRandom": {"random": bytes}}. */
NSM_CBOR_FN int nsm_parse_get_random(const uint8_t *resp, size_t len, uint8_t *out, size_t cap, size_t *out_len,
                                char *err, size_t err_cap)
{
    struct nsm_cbor_in in = {resp, len};
    uint32_t entries;
    const uint8_t *key;
    size_t key_len;
    int rc = nsm_cbor_open(&in, "GetRandom", &entries, err, err_cap);
    if (rc != NSM_CBOR_OK)
        return rc;
    if (entries != 1 || nsm_cbor_string(&in, NSM_CBOR_MAJOR_TEXT, &key, &key_len) != NSM_CBOR_OK ||
        !nsm_cbor_is(key, key_len, "random"))
        return NSM_CBOR_MALFORMED;
    rc = nsm_cbor_bytes_into(&in, out, cap, out_len);
    if (rc != NSM_CBOR_OK)
        return rc;
    return in.left == 0 ? NSM_CBOR_OK : NSM_CBOR_MALFORMED;
}

/* {"Attestation": {"document": bytes}}: points *doc into `resp` (the document is not copied). */
NSM_CBOR_FN int nsm_parse_attestation(const uint8_t *resp, size_t len, const uint8_t **doc, size_t *doc_len, char *err,
                                      size_t err_cap)
{
    struct nsm_cbor_in in = {resp, len};
    uint32_t entries;
    const uint8_t *key;
    size_t key_len;
    int rc = nsm_cbor_open(&in, "Attestation", &entries, err, err_cap);
    if (rc != NSM_CBOR_OK)
        return rc;
    if (entries != 1 || nsm_cbor_string(&in, NSM_CBOR_MAJOR_TEXT, &key, &key_len) != NSM_CBOR_OK ||
        !nsm_cbor_is(key, key_len, "document"))
        return NSM_CBOR_MALFORMED;
    if (nsm_cbor_string(&in, NSM_CBOR_MAJOR_BYTES, doc, doc_len) != NSM_CBOR_OK || *doc_len == 0)
        return NSM_CBOR_MALFORMED;
    return in.left == 0 ? NSM_CBOR_OK : NSM_CBOR_MALFORMED;
}

#endif
