/*
 * libFuzzer harness: the enclave egress daemon's readers of untrusted bytes (worker/runtime/netpolicy.c and
 * egressd.c): the policy JSON, then with what it accepted the matcher on a probe (a name, an address and the
 * parent's "A …" answer line), a DNS query message as the stub answers it, and a proxy's host:port.
 *
 * Input: policy bytes, then optionally 0xFF and the probe bytes. The sources are included as they are
 * (egressd's main renamed), so the code fuzzed is the code shipped. The parent is a Unix socket path that
 * does not exist: a lookup fails at once, as with a dead parent, except for two names already in the cache.
 */
#include "netpolicy.c"
#define main egressd_main
#include "egressd.c"
#undef main

static void check(int cond)
{
    if (!cond)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    if (!ready) {
        parent_uds = "/nonexistent/nitroconv-fuzz-parent";
        memory = calloc(MEMORY_SLOTS, sizeof *memory);
        ready = 1;
    }
    /* Names the "parent" already answered (the stub's cache), so the answer-building path runs: as many addresses
     * as an answer may hold, IPv4 and IPv6, for a long name and a short one. */
#define LABEL63 "a-very-long-label-of-sixty-three-characters-to-fill-the-packet-"
    static const char *const known[] = {"a.test", LABEL63 "." LABEL63 "." LABEL63 ".test"};
    for (int k = 0; k < 2; k++) {
        struct cached *c = &cache[k];
        snprintf(c->name, sizeof c->name, "%s", known[k]);
        c->n = MAX_ADDRS;
        for (int i = 0; i < MAX_ADDRS; i++) {
            c->addrs[i].family = k == 1 || i % 3 ? 4 : 6; /* the long name: 16 IPv4 answers, past 512 bytes */
            memset(c->addrs[i].b, 0, sizeof c->addrs[i].b);
            c->addrs[i].b[0] = 10;
            c->addrs[i].b[3] = (uint8_t)i;
        }
        c->expires = now_ms() + 3600 * 1000LL;
    }
    const uint8_t *sep = memchr(data, 0xFF, size);
    size_t plen = sep ? (size_t)(sep - data) : size;
    const uint8_t *probe = sep ? sep + 1 : data + size;
    size_t qlen = sep ? size - plen - 1 : 0;

    char *text = malloc(plen ? plen : 1); /* exactly plen bytes: ASan sees any read past them */
    memcpy(text, data, plen);
    const char *why = np_parse(text, plen, &policy);
    free(text);
    if (why)
        check(policy.mode == NP_MODE_NONE && policy.n_allow == 0 && policy.n_deny == 0);
    check(policy.n_allow <= NP_MAX_RULES && policy.n_deny <= NP_MAX_RULES);

    char *q = malloc(qlen + 1);
    memcpy(q, probe, qlen);
    q[qlen] = '\0';
    char name[NP_NAME_MAX + 1];
    int is_name = np_normalize_name(q, qlen, name) == 0;
    struct np_addr a, answers[MAX_ADDRS];
    int is_addr = strlen(q) == qlen && np_parse_addr(q, &a) == 0;
    if (is_name)
        check(strlen(name) <= NP_NAME_MAX);
    if (is_addr) {
        char back[64];
        np_format_addr(&a, back, sizeof back);
        struct np_addr again;
        check(np_parse_addr(back, &again) == 0 && same_addr(&a, &again));
    }
    static const unsigned ports[] = {0, 1, 80, 443, 8080, 65535, 65536};
    for (size_t i = 0; i < sizeof ports / sizeof ports[0]; i++) {
        int d = np_decide(&policy, is_name ? name : NULL, is_addr ? &a : NULL, ports[i]);
        if (d)
            check(policy.mode != NP_MODE_NONE && ports[i] >= 1 && ports[i] <= 65535 && policy.n_allow > 0);
    }
    if (is_name) {
        int allowed = np_name_allowed(&policy, name);
        int n = np_parse_answer(q, qlen, answers, MAX_ADDRS);
        (void)n;
        if (is_addr && np_answer_allowed(&policy, name, &a))
            check(allowed);
    }
    int n = np_parse_answer(q, qlen, answers, MAX_ADDRS);
    check(n <= MAX_ADDRS);

    /* The probe as a DNS query: the answer fits, echoes the id and is a response. */
    uint8_t out[512];
    size_t o = dns_answer(probe, qlen, out, sizeof out);
    check(o <= sizeof out);
    if (o)
        check(o >= 12 && out[0] == probe[0] && out[1] == probe[1] && (out[2] & 0x80));

    char host[300];
    unsigned port = 0;
    if (split_host_port(q, qlen, host, sizeof host, &port, 80) == 0)
        check(port >= 1 && port <= 65535 && strlen(host) < sizeof host);
    free(q);
    return 0;
}
