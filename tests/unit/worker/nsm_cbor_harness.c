/* Drives worker/runtime/nsm_cbor.h from tests/unit/worker/test_nsm_cbor.py: one request per line on
 * stdin, one answer per line on stdout, so a single compiled binary (with sanitizers) serves every case.
 *   req-describe <index>          -> hex of the DescribePCR request
 *   req-random                    -> hex of the GetRandom request
 *   describe <cap> <hex response> -> "ok <locked> <hex data>" | "err <rc> <error code>"
 *   random <cap> <hex response>   -> "ok - <hex random>"      | "err <rc> <error code>" */
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
        if (sscanf(line, "req-describe %zu", &cap) == 1) {
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
            if (strcmp(mode, "describe") == 0)
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
