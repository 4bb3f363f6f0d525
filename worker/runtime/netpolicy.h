/*
 * The egress policy of a converted enclave (NETDESIGN: converter_options.network.egress), as egressd
 * enforces it. The converter normalises and validates the policy (common/enclave/network.py) and writes
 * it as canonical JSON into the app ramdisk (/.nitroconv/network.json, measured into PCR2); this reader is
 * strict anyway, because whatever it does not understand it must not silently widen: an unknown key or
 * a malformed rule refuses the whole policy (egressd then allows nothing).
 *
 * Decision for one connection (name may be NULL, addr may be NULL, port 1..65535):
 *   a rule matches when its ports (none = every port) hold the port and either it is a host rule and the
 *   name matches ("api.example.com" exactly, "*.example.com" any name below example.com but not itself;
 *   ASCII case-insensitive, one trailing dot ignored) or it is a cidr rule holding the address;
 *   a deny match refuses, else an allow match allows, else refused.
 */
#ifndef NITROCONV_NETPOLICY_H
#define NITROCONV_NETPOLICY_H

#include <stddef.h>
#include <stdint.h>

#define NP_MAX_RULES 256
#define NP_MAX_PORT_RANGES 64
#define NP_NAME_MAX 253 /* a DNS name in text form, without the trailing dot */
#define NP_MAX_JSON (256 * 1024)

enum np_mode { NP_MODE_NONE = 0, NP_MODE_PROXY = 1, NP_MODE_TRANSPARENT = 2 };

struct np_addr {
    int family; /* 4 or 6 */
    uint8_t b[16]; /* IPv4 in the first 4 bytes */
};

struct np_range {
    uint16_t lo, hi;
};

struct np_rule {
    int is_cidr;
    int wildcard; /* host rules: "*.suffix", host holds the suffix */
    char host[NP_NAME_MAX + 1];
    struct np_addr net;
    int prefix;
    struct np_range ports[NP_MAX_PORT_RANGES];
    size_t n_ports; /* 0: every port */
};

struct np_policy {
    int present; /* an egress object was read (a document without one is mode none, and says nothing) */
    enum np_mode mode;
    struct np_rule allow[NP_MAX_RULES];
    size_t n_allow;
    struct np_rule deny[NP_MAX_RULES];
    size_t n_deny;
};

/* Parses either the policy object itself ({"egress": …, "ingress": …, "hostname": …}) or a document that
 * holds it under "network" (launch.json). Returns NULL, or why the text was refused (then `p` is mode none
 * with no rules). Keys other than "egress"/"network" at the top are skipped; inside egress and rules every
 * key must be known. A document without egress is mode none. */
const char *np_parse(const char *text, size_t len, struct np_policy *p);

/* A DNS name as the policy compares it: lower case, one trailing dot dropped, labels of 1..63 letters,
 * digits, '-' or '_', at most NP_NAME_MAX characters. Returns 0 and writes `out` (NP_NAME_MAX + 1 bytes),
 * or -1 for anything else (an address literal is not a name). */
int np_normalize_name(const char *in, size_t len, char *out);

/* IPv4 dotted quad or IPv6 text (no zone, no brackets) into `a`; 0, or -1 when it is neither. */
int np_parse_addr(const char *text, struct np_addr *a);
/* Text form of `a` into out (at least 46 bytes). */
void np_format_addr(const struct np_addr *a, char *out, size_t cap);

/* 1 when the connection is allowed, else 0 (see the top of this file). */
int np_decide(const struct np_policy *p, const char *name, const struct np_addr *addr, unsigned port);

/* Whether the DNS stub may answer `name` (normalised) at all: no deny host rule for every port matches it,
 * and an allow host rule matches it or some allow cidr rule exists (its addresses may fall in one). */
int np_name_allowed(const struct np_policy *p, const char *name);

/* Whether the stub hands out `addr` as an answer for `name`: not inside a deny cidr rule for every port,
 * and either an allow host rule matches the name or an allow cidr rule holds the address. */
int np_answer_allowed(const struct np_policy *p, const char *name, const struct np_addr *addr);

/* The parent's answer to "R <name>": "A <addr> <addr>…" (the trailing newline already removed). Fills at
 * most `cap` addresses, skips none: any malformed item refuses the whole line (-1); else the count. */
int np_parse_answer(const char *line, size_t len, struct np_addr *out, int cap);

#endif
