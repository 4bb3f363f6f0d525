/* The egress policy reader and matcher (see netpolicy.h). No allocation: a policy is one fixed struct. */
#define _GNU_SOURCE
#include "netpolicy.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

struct rd {
    const char *p, *end;
    const char *err;
    int depth;
};

#define MAX_DEPTH 32
#define MAX_STRING 512

static int fail(struct rd *r, const char *why)
{
    if (!r->err)
        r->err = why;
    return -1;
}

static void ws(struct rd *r)
{
    while (r->p < r->end && (*r->p == ' ' || *r->p == '\t' || *r->p == '\n' || *r->p == '\r'))
        r->p++;
}

static int peek(struct rd *r, char c)
{
    ws(r);
    return r->p < r->end && *r->p == c;
}

static int expect(struct rd *r, char c)
{
    if (!peek(r, c))
        return fail(r, "unexpected character");
    r->p++;
    return 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* A JSON string into out (cap bytes, NUL-terminated). Only ASCII matters to the policy: a \u escape or a
 * byte above 0x7f is kept as '?' so a name holding one is refused by the name check, never matched. */
static int string(struct rd *r, char *out, size_t cap)
{
    size_t n = 0;
    if (expect(r, '"'))
        return fail(r, "expected a string");
    for (;;) {
        if (r->p >= r->end)
            return fail(r, "unterminated string");
        unsigned char c = (unsigned char)*r->p++;
        if (c == '"')
            break;
        if (c < 0x20)
            return fail(r, "control character in string");
        if (c == '\\') {
            if (r->p >= r->end)
                return fail(r, "unterminated escape");
            char e = *r->p++;
            switch (e) {
            case '"': c = '"'; break;
            case '\\': c = '\\'; break;
            case '/': c = '/'; break;
            case 'b': case 'f': case 'n': case 'r': case 't': c = '?'; break;
            case 'u':
                if (r->end - r->p < 4)
                    return fail(r, "truncated \\u escape");
                for (int i = 0; i < 4; i++)
                    if (hexval(r->p[i]) < 0)
                        return fail(r, "bad \\u escape");
                r->p += 4;
                c = '?';
                break;
            default:
                return fail(r, "unknown escape");
            }
        } else if (c >= 0x80) {
            c = '?';
        }
        if (n + 1 >= cap)
            return fail(r, "string too long");
        out[n++] = (char)c;
    }
    out[n] = '\0';
    return 0;
}

static int integer(struct rd *r, long max, long *out)
{
    ws(r);
    if (r->p >= r->end || *r->p < '0' || *r->p > '9')
        return fail(r, "expected an integer");
    if (*r->p == '0' && r->end - r->p > 1 && r->p[1] >= '0' && r->p[1] <= '9')
        return fail(r, "leading zero");
    long v = 0;
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

static int skip_value(struct rd *r);

static int skip_container(struct rd *r, char open, char close)
{
    if (++r->depth > MAX_DEPTH)
        return fail(r, "nested too deeply");
    r->p++;
    if (peek(r, close)) {
        r->p++;
        r->depth--;
        return 0;
    }
    for (;;) {
        if (open == '{') {
            char key[MAX_STRING];
            if (string(r, key, sizeof key) || expect(r, ':'))
                return -1;
        }
        if (skip_value(r))
            return -1;
        if (peek(r, ',')) {
            r->p++;
            continue;
        }
        if (expect(r, close))
            return -1;
        r->depth--;
        return 0;
    }
}

static int word(struct rd *r, const char *w)
{
    size_t n = strlen(w);
    if ((size_t)(r->end - r->p) < n || memcmp(r->p, w, n) != 0)
        return fail(r, "unexpected word");
    r->p += n;
    return 0;
}

static int skip_value(struct rd *r)
{
    ws(r);
    if (r->p >= r->end)
        return fail(r, "truncated value");
    char c = *r->p;
    if (c == '{')
        return skip_container(r, '{', '}');
    if (c == '[')
        return skip_container(r, '[', ']');
    if (c == '"') {
        char s[MAX_STRING];
        return string(r, s, sizeof s);
    }
    if (c == 't')
        return word(r, "true");
    if (c == 'f')
        return word(r, "false");
    if (c == 'n')
        return word(r, "null");
    if (c == '-')
        r->p++;
    long v;
    return integer(r, 1L << 40, &v);
}

int np_normalize_name(const char *in, size_t len, char *out)
{
    if (len > 0 && in[len - 1] == '.')
        len--;
    if (len == 0 || len > NP_NAME_MAX)
        return -1;
    size_t label = 0;
    int all_digits_or_dots = 1;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (c >= 'A' && c <= 'Z')
            c = (char)(c - 'A' + 'a');
        if (c == '.') {
            if (label == 0)
                return -1;
            label = 0;
        } else if ((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_') {
            if (++label > 63)
                return -1;
            if (!(c >= '0' && c <= '9'))
                all_digits_or_dots = 0;
        } else {
            return -1;
        }
        out[i] = c;
    }
    if (label == 0)
        return -1;
    out[len] = '\0';
    /* "10.0.0.1" is an address, never a name: it must not match a host rule by its text. */
    if (all_digits_or_dots)
        return -1;
    return 0;
}

static const uint8_t v4_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xFF, 0xFF};

/* `raw` keeps an IPv4-mapped IPv6 address as IPv6 (for cidr rules, which keep their own prefix). */
static int parse_addr(const char *text, struct np_addr *a, int raw)
{
    memset(a, 0, sizeof *a);
    if (strchr(text, ':')) {
        if (inet_pton(AF_INET6, text, a->b) != 1)
            return -1;
        a->family = 6;
        /* ::ffff:10.0.0.1 reaches 10.0.0.1: it must meet the IPv4 rules, not slip past them as IPv6. */
        if (!raw && memcmp(a->b, v4_mapped, sizeof v4_mapped) == 0) {
            memmove(a->b, a->b + 12, 4);
            memset(a->b + 4, 0, 12);
            a->family = 4;
        }
        return 0;
    }
    /* inet_pton's IPv4 form is exactly four decimal parts: no octal, hex or short forms. */
    if (inet_pton(AF_INET, text, a->b) != 1)
        return -1;
    a->family = 4;
    return 0;
}

int np_parse_addr(const char *text, struct np_addr *a)
{
    return parse_addr(text, a, 0);
}

void np_format_addr(const struct np_addr *a, char *out, size_t cap)
{
    if (!inet_ntop(a->family == 6 ? AF_INET6 : AF_INET, a->b, out, (socklen_t)cap))
        snprintf(out, cap, "?");
}

static int parse_port_text(const char *s, struct np_range *range)
{
    long lo = 0, hi;
    const char *p = s;
    if (!*p)
        return -1;
    while (*p >= '0' && *p <= '9') {
        lo = lo * 10 + (*p++ - '0');
        if (lo > 65535)
            return -1;
    }
    if (p == s)
        return -1;
    hi = lo;
    if (*p == '-') {
        const char *q = ++p;
        hi = 0;
        while (*p >= '0' && *p <= '9') {
            hi = hi * 10 + (*p++ - '0');
            if (hi > 65535)
                return -1;
        }
        if (p == q)
            return -1;
    }
    if (*p || lo < 1 || hi < lo)
        return -1;
    range->lo = (uint16_t)lo;
    range->hi = (uint16_t)hi;
    return 0;
}

static int ports(struct rd *r, struct np_rule *rule)
{
    if (expect(r, '['))
        return -1;
    if (peek(r, ']'))
        return fail(r, "ports: empty list (leave it out for every port)");
    for (;;) {
        if (rule->n_ports == NP_MAX_PORT_RANGES)
            return fail(r, "ports: too many");
        struct np_range *range = &rule->ports[rule->n_ports];
        if (peek(r, '"')) {
            char s[32];
            if (string(r, s, sizeof s))
                return -1;
            if (parse_port_text(s, range))
                return fail(r, "ports: expected a port or \"LOW-HIGH\"");
        } else {
            long v;
            if (integer(r, 65535, &v))
                return -1;
            if (v < 1)
                return fail(r, "ports: 0 is not a port");
            range->lo = range->hi = (uint16_t)v;
        }
        rule->n_ports++;
        if (peek(r, ',')) {
            r->p++;
            continue;
        }
        return expect(r, ']');
    }
}

static int parse_cidr(const char *s, struct np_rule *rule)
{
    char addr[64];
    const char *slash = strchr(s, '/');
    size_t alen = slash ? (size_t)(slash - s) : strlen(s);
    if (alen == 0 || alen >= sizeof addr)
        return -1;
    memcpy(addr, s, alen);
    addr[alen] = '\0';
    if (parse_addr(addr, &rule->net, 1))
        return -1;
    int max = rule->net.family == 4 ? 32 : 128;
    int prefix = max;
    if (slash) {
        const char *p = slash + 1;
        if (!*p || (p[0] == '0' && p[1]))
            return -1;
        prefix = 0;
        for (; *p; p++) {
            if (*p < '0' || *p > '9')
                return -1;
            prefix = prefix * 10 + (*p - '0');
            if (prefix > max)
                return -1;
        }
    }
    if (rule->net.family == 6 && prefix >= 96 && memcmp(rule->net.b, v4_mapped, sizeof v4_mapped) == 0) {
        memmove(rule->net.b, rule->net.b + 12, 4);
        memset(rule->net.b + 4, 0, 12);
        rule->net.family = 4;
        prefix -= 96;
        max = 32;
    }
    rule->prefix = prefix;
    /* Host bits are cleared so matching compares whole bytes plus one masked byte. */
    for (int bit = prefix; bit < max; bit++)
        rule->net.b[bit / 8] &= (uint8_t)~(0x80u >> (bit % 8));
    return 0;
}

static int rule(struct rd *r, struct np_rule *out)
{
    int seen_host = 0, seen_cidr = 0, seen_ports = 0;
    memset(out, 0, sizeof *out);
    if (expect(r, '{'))
        return -1;
    if (peek(r, '}'))
        return fail(r, "rule: needs host or cidr");
    for (;;) {
        char key[32], value[MAX_STRING];
        if (string(r, key, sizeof key) || expect(r, ':'))
            return -1;
        if (strcmp(key, "host") == 0) {
            if (seen_host++)
                return fail(r, "rule: duplicate host");
            if (string(r, value, sizeof value))
                return -1;
            const char *name = value;
            if (value[0] == '*') {
                if (value[1] != '.')
                    return fail(r, "rule: a wildcard host is \"*.domain\"");
                out->wildcard = 1;
                name = value + 2;
            }
            if (np_normalize_name(name, strlen(name), out->host))
                return fail(r, "rule: bad host name");
        } else if (strcmp(key, "cidr") == 0) {
            if (seen_cidr++)
                return fail(r, "rule: duplicate cidr");
            if (string(r, value, sizeof value))
                return -1;
            if (parse_cidr(value, out))
                return fail(r, "rule: bad cidr");
            out->is_cidr = 1;
        } else if (strcmp(key, "ports") == 0) {
            if (seen_ports++)
                return fail(r, "rule: duplicate ports");
            if (ports(r, out))
                return -1;
        } else {
            return fail(r, "rule: unknown key");
        }
        if (peek(r, ',')) {
            r->p++;
            continue;
        }
        if (expect(r, '}'))
            return -1;
        break;
    }
    if (seen_host + seen_cidr != 1)
        return fail(r, "rule: exactly one of host and cidr");
    return 0;
}

static int rules(struct rd *r, struct np_rule *list, size_t *n)
{
    if (expect(r, '['))
        return -1;
    if (peek(r, ']')) {
        r->p++;
        return 0;
    }
    for (;;) {
        if (*n == NP_MAX_RULES)
            return fail(r, "too many rules");
        if (rule(r, &list[*n]))
            return -1;
        (*n)++;
        if (peek(r, ',')) {
            r->p++;
            continue;
        }
        return expect(r, ']');
    }
}

static int egress(struct rd *r, struct np_policy *p)
{
    int seen_mode = 0, seen_allow = 0, seen_deny = 0;
    if (expect(r, '{'))
        return -1;
    if (peek(r, '}')) {
        r->p++;
        return fail(r, "egress: no mode");
    }
    for (;;) {
        char key[32];
        if (string(r, key, sizeof key) || expect(r, ':'))
            return -1;
        if (strcmp(key, "mode") == 0) {
            char m[32];
            if (seen_mode++)
                return fail(r, "egress: duplicate mode");
            if (string(r, m, sizeof m))
                return -1;
            if (strcmp(m, "none") == 0) p->mode = NP_MODE_NONE;
            else if (strcmp(m, "proxy") == 0) p->mode = NP_MODE_PROXY;
            else if (strcmp(m, "transparent") == 0) p->mode = NP_MODE_TRANSPARENT;
            else return fail(r, "egress: unknown mode");
        } else if (strcmp(key, "allow") == 0) {
            if (seen_allow++)
                return fail(r, "egress: duplicate allow");
            if (rules(r, p->allow, &p->n_allow))
                return -1;
        } else if (strcmp(key, "deny") == 0) {
            if (seen_deny++)
                return fail(r, "egress: duplicate deny");
            if (rules(r, p->deny, &p->n_deny))
                return -1;
        } else {
            return fail(r, "egress: unknown key");
        }
        if (peek(r, ',')) {
            r->p++;
            continue;
        }
        if (expect(r, '}'))
            return -1;
        break;
    }
    if (!seen_mode)
        return fail(r, "egress: no mode");
    return 0;
}

/* An object whose "egress" is read and whose "network" (when `nested`) is read as such an object. */
static int document(struct rd *r, struct np_policy *p, int nested, int *seen)
{
    if (expect(r, '{'))
        return -1;
    if (peek(r, '}')) {
        r->p++;
        return 0;
    }
    for (;;) {
        char key[64];
        if (string(r, key, sizeof key) || expect(r, ':'))
            return -1;
        if (strcmp(key, "egress") == 0) {
            if ((*seen)++)
                return fail(r, "duplicate egress");
            if (egress(r, p))
                return -1;
            p->present = 1;
        } else if (nested && strcmp(key, "network") == 0) {
            if (peek(r, 'n')) {
                if (word(r, "null"))
                    return -1;
            } else if (document(r, p, 0, seen)) {
                return -1;
            }
        } else if (skip_value(r)) {
            return -1;
        }
        if (peek(r, ',')) {
            r->p++;
            continue;
        }
        return expect(r, '}');
    }
}

const char *np_parse(const char *text, size_t len, struct np_policy *p)
{
    struct rd r = {text, text + len, NULL, 0};
    int seen = 0;
    memset(p, 0, sizeof *p);
    if (len > NP_MAX_JSON)
        r.err = "policy too large";
    else if (memchr(text, '\0', len))
        r.err = "NUL byte in policy";
    else if (document(&r, p, 1, &seen) == 0) {
        ws(&r);
        if (r.p != r.end)
            fail(&r, "trailing bytes after the policy");
    }
    if (r.err)
        memset(p, 0, sizeof *p);
    return r.err;
}

static int name_matches(const struct np_rule *rule, const char *name)
{
    if (rule->is_cidr || !name)
        return 0;
    if (!rule->wildcard)
        return strcmp(rule->host, name) == 0;
    size_t n = strlen(name), s = strlen(rule->host);
    return n > s + 1 && name[n - s - 1] == '.' && strcmp(name + n - s, rule->host) == 0;
}

static int addr_matches(const struct np_rule *rule, const struct np_addr *a)
{
    if (!rule->is_cidr || !a || a->family != rule->net.family)
        return 0;
    int whole = rule->prefix / 8, bits = rule->prefix % 8;
    if (memcmp(a->b, rule->net.b, (size_t)whole) != 0)
        return 0;
    if (bits) {
        uint8_t mask = (uint8_t)(0xFFu << (8 - bits));
        if ((a->b[whole] & mask) != rule->net.b[whole])
            return 0;
    }
    return 1;
}

static int port_matches(const struct np_rule *rule, unsigned port)
{
    if (rule->n_ports == 0)
        return 1;
    for (size_t i = 0; i < rule->n_ports; i++)
        if (port >= rule->ports[i].lo && port <= rule->ports[i].hi)
            return 1;
    return 0;
}

static int any_match(const struct np_rule *list, size_t n, const char *name, const struct np_addr *a, unsigned port)
{
    for (size_t i = 0; i < n; i++)
        if (port_matches(&list[i], port) && (name_matches(&list[i], name) || addr_matches(&list[i], a)))
            return 1;
    return 0;
}

int np_decide(const struct np_policy *p, const char *name, const struct np_addr *addr, unsigned port)
{
    if (p->mode == NP_MODE_NONE || port < 1 || port > 65535)
        return 0;
    if (any_match(p->deny, p->n_deny, name, addr, port))
        return 0;
    return any_match(p->allow, p->n_allow, name, addr, port);
}

int np_name_allowed(const struct np_policy *p, const char *name)
{
    if (p->mode == NP_MODE_NONE)
        return 0;
    for (size_t i = 0; i < p->n_deny; i++)
        if (p->deny[i].n_ports == 0 && name_matches(&p->deny[i], name))
            return 0;
    for (size_t i = 0; i < p->n_allow; i++)
        if (p->allow[i].is_cidr || name_matches(&p->allow[i], name))
            return 1;
    return 0;
}

int np_answer_allowed(const struct np_policy *p, const char *name, const struct np_addr *addr)
{
    if (!np_name_allowed(p, name))
        return 0;
    for (size_t i = 0; i < p->n_deny; i++)
        if (p->deny[i].n_ports == 0 && addr_matches(&p->deny[i], addr))
            return 0;
    for (size_t i = 0; i < p->n_allow; i++)
        if (name_matches(&p->allow[i], name) || addr_matches(&p->allow[i], addr))
            return 1;
    return 0;
}

int np_parse_answer(const char *line, size_t len, struct np_addr *out, int cap)
{
    if (len < 1 || line[0] != 'A' || (len > 1 && line[1] != ' '))
        return -1;
    int n = 0;
    size_t i = 1;
    for (;;) {
        while (i < len && line[i] == ' ')
            i++;
        if (i >= len)
            return n;
        size_t start = i;
        while (i < len && line[i] != ' ')
            i++;
        char item[64];
        if (i - start >= sizeof item)
            return -1;
        memcpy(item, line + start, i - start);
        item[i - start] = '\0';
        struct np_addr a;
        if (np_parse_addr(item, &a))
            return -1;
        if (n < cap)
            out[n] = a;
        n++;
        if (n > cap)
            return -1;
    }
}
