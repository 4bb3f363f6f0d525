/*
 * libFuzzer harness: attestd's request parser (worker/runtime/attestd.c parse_request, fed the bytes a
 * client sent, as conn_read feeds it), then what attestd does with the outcome: the NSM request built
 * from an accepted request (which must always fit), or the error answer (which must always be written).
 * The same input is also read as an NSM Attestation response (nsm_cbor.h nsm_parse_attestation).
 *
 * The source is included as is, its main renamed, so the fuzzed code is the shipped code and the
 * shipped binary's bytes depend on nothing here (worker/runtime/SHA256SUMS).
 */
#define main attestd_main
#include "attestd.c"
#undef main

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size heap copy: a read past what the client sent is caught by ASan. */
    char *buf = malloc(size ? size : 1);
    if (buf == NULL)
        abort();
    memcpy(buf, data, size);
    struct att_request *req = malloc(sizeof(*req));
    struct http_error err = {0};
    int rc = parse_request(buf, size, req, &err);
    if (rc == PARSE_OK) {
        if (req->nonce_len > MAX_NONCE || req->user_data_len > MAX_USER_DATA || req->public_key_len > MAX_PUBLIC_KEY)
            abort();
        static uint8_t nsm_req[NSM_REQUEST_MAX];
        if (nsm_attestation_request(nsm_req, sizeof(nsm_req), req->has_user_data ? req->user_data : NULL,
                                    req->user_data_len, req->has_nonce ? req->nonce : NULL, req->nonce_len,
                                    req->has_public_key ? req->public_key : NULL, req->public_key_len) == 0)
            abort(); /* every request the parser accepts must fit the NSM's 4 KiB */
    } else if (rc == PARSE_ERROR) {
        size_t len = 0;
        char *answer = error_answer(&err, &len);
        if (answer == NULL || err.status < 400 || err.status > 599 || err.code == NULL)
            abort();
        free(answer);
    } else if (rc != PARSE_MORE || size >= MAX_HEAD_BYTES) {
        abort(); /* more bytes are asked for only while the head can still fit */
    }
    free(req);
    free(buf);

    const uint8_t *doc = NULL;
    size_t doc_len = 0;
    char code[64];
    if (nsm_parse_attestation(data, size, &doc, &doc_len, code, sizeof(code)) == NSM_CBOR_OK &&
        (doc < data || doc_len == 0 || doc + doc_len > data + size))
        abort();
    return 0;
}
