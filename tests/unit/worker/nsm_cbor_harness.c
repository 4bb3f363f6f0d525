/* Drives worker/runtime/nsm_cbor.h from tests/unit/worker/test_nsm_cbor.py: one request per line on
 * stdin, one answer per line on stdout, so a single compiled binary (with sanitizers) serves every case.
 *   req-describe <index>          -> hex of the DescribePCR request
 *   req-random                    -> hex of the GetRandom request
 *   describe <cap> <hex response> -> "ok <locked> <hex data>" | "err <rc> <error code>"
 *   random <cap> <hex response>   -> "ok - <hex random>"      | "err <rc> <error code>"
 *   req-attest <ud> <nonce> <pk>  -> hex of the Attestation request; each value hex, or "-" for none
 *   attest 0 <hex response>       -> "ok - <hex document>"    | "err <rc> <error code>" */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nsm_cbor.h"

static size_t unhex(const char *s, uint8_t *out, size_t cap)
{
    size_t n = 0;
    while (s[0] && s[1] && n < cap) {
        unsigned v;
        if (sscanf(s, "%2x", &v) != 1)
            break;
        out[n++] = (uint8_t)v;
        s += 2;
    }
    return n;
}

static void put_hex(const uint8_t *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        printf("%02x", p[i]);
}

int main(void)
{
    static char line[1 << 16];
    while (fgets(line, sizeof(line), stdin)) {
        line[strcspn(line, "\n")] = '\0';
        char mode[32] = "", hex[sizeof(line)] = "";
        size_t cap = 0;
        uint8_t req[64], out[4096];
        static char a[3][8192];
        if (sscanf(line, "req-attest %8191s %8191s %8191s", a[0], a[1], a[2]) == 3) {
            static uint8_t v[3][4096], big[8192];
            size_t n[3];
            for (int i = 0; i < 3; i++)
                n[i] = strcmp(a[i], "-") == 0 ? 0 : unhex(a[i], v[i], sizeof(v[i]));
            size_t len = nsm_attestation_request(big, sizeof(big), strcmp(a[0], "-") ? v[0] : NULL, n[0],
                                                 strcmp(a[1], "-") ? v[1] : NULL, n[1],
                                                 strcmp(a[2], "-") ? v[2] : NULL, n[2]);
            put_hex(big, len);
        } else if (sscanf(line, "req-describe %zu", &cap) == 1) {
            size_t n = nsm_describe_pcr_request(req, sizeof(req), (uint16_t)cap);
            put_hex(req, n);
        } else if (strcmp(line, "req-random") == 0) {
            put_hex(req, nsm_get_random_request(req, sizeof(req)));
        } else if (sscanf(line, "%31s %zu %65535s", mode, &cap, hex) >= 2 && cap <= sizeof(out)) {
            /* An exact-size heap copy, so a read past the response's end is caught by ASan. */
            size_t len = strlen(hex) / 2;
            uint8_t *resp = malloc(len ? len : 1);
            len = unhex(hex, resp, len);
            char code[16] = "";
            size_t got = 0;
            int locked = -1, rc;
            const uint8_t *doc = NULL;
            if (strcmp(mode, "attest") == 0) {
                rc = nsm_parse_attestation(resp, len, &doc, &got, code, sizeof(code));
                if (rc == NSM_CBOR_OK) {
                    if (got > sizeof(out))
                        abort();
                    memcpy(out, doc, got);
                }
            } else if (strcmp(mode, "describe") == 0)
                rc = nsm_parse_describe_pcr(resp, len, out, cap, &got, &locked, code, sizeof(code));
            else
                rc = nsm_parse_get_random(resp, len, out, cap, &got, code, sizeof(code));
            free(resp);
            if (rc == NSM_CBOR_OK) {
                printf("ok %s ", locked < 0 ? "-" : locked ? "1" : "0");
                put_hex(out, got);
            } else {
                printf("err %d %s", rc, code);
            }
        } else {
            printf("bad-input");
        }
        putchar('\n');
        fflush(stdout);
    }
    return 0;
}
