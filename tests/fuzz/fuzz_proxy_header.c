/*
 * libFuzzer harness: netd's reading of the PROXY protocol v2 header the parent sends first on every ingress
 * connection (worker/runtime/relay.h: pp2_total, then pp2_reencode), with the same length checks the relay
 * makes, then the header netd would hand the app checked by its own reader again.
 */
#define _GNU_SOURCE
#include "relay.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < PP2_HDR)
        return 0;
    long total = pp2_total(data);
    if (total < 0 || (size_t)total > size)
        return 0; /* the relay closes the connection, or waits for more bytes */
    unsigned char out[PP2_HDR + PP2_MAX_BODY];
    char peer[64];
    size_t n = pp2_reencode(data, (size_t)total, out, peer, sizeof peer);
    if (n == 0)
        return 0;
    /* What netd made must be a header it accepts, unchanged by a second pass. */
    unsigned char again[PP2_HDR + PP2_MAX_BODY];
    char peer2[64];
    if (pp2_total(out) != (long)n || pp2_reencode(out, n, again, peer2, sizeof peer2) != n ||
        memcmp(out, again, n) != 0 || strcmp(peer, peer2) != 0)
        __builtin_trap();
    return 0;
}
