/*
 * libFuzzer harness: the exec shim's readers of the image's /etc/passwd and /etc/group
 * (worker/runtime/shim.c each_line, passwd_line, group_line, parse_id), driven as resolve_user drives
 * them, then the supplementary groups it derives.
 *
 * Input: the USER spec (`user[:group]`) up to the first '\n', then /etc/passwd up to the first NUL
 * byte, then /etc/group.
 *
 * The source is included as is, its main renamed, so the fuzzed code is the shipped code and the
 * shipped binary's bytes depend on nothing here (worker/runtime/SHA256SUMS).
 */
#define main shim_main
#include "shim.c"
#undef main

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *text = (const char *)data, *end = text + size;
    const char *nl = memchr(text, '\n', size);
    if (nl == NULL)
        return 0;
    /* The spec is a C string on the shim's command line: no NUL in it. */
    if (memchr(text, '\0', (size_t)(nl - text)))
        return 0;
    char *spec = xstrndup(text, (size_t)(nl - text));
    const char *rest = nl + 1;
    const char *nul = memchr(rest, '\0', (size_t)(end - rest));
    /* read_etc_file's result: the file's bytes, NUL-terminated (a NUL inside ends the text early). */
    char *passwd = xstrndup(rest, nul ? (size_t)(nul - rest) : (size_t)(end - rest));
    char *group = xstrndup(nul ? nul + 1 : end, nul ? (size_t)(end - nul - 1) : 0);

    char *group_arg = strchr(spec, ':');
    if (group_arg != NULL)
        *group_arg++ = '\0';
    else
        group_arg = "";
    struct passwd_match pm = {.name = spec, .uid_arg = parse_id(spec), .default_uid = 0};
    each_line(passwd, 7, passwd_line, &pm);
    struct exec_user u = {.uid = pm.found ? pm.uid : 0, .gid = pm.found ? pm.gid : 0,
                          .home = pm.found ? pm.home : "/"};
    const char *matched = pm.found ? pm.matched_name : "";
    struct group_match gm = {.group_arg = group_arg, .gid_arg = parse_id(group_arg), .member = matched};
    each_line(group, 4, group_line, &gm);
    if (group_arg[0] != '\0' && gm.found)
        u.gid = gm.gid;
    if (group_arg[0] == '\0') {
        u.sgids = gm.sgids;
        u.nsgids = gm.nsgids;
    } else {
        free(gm.sgids);
    }
    supplementary_groups(&u);
    /* What main does with the home field: HOME=<home>. */
    if (u.home != NULL && strlen(u.home) > (size_t)-1 / 2)
        abort();
    free(u.sgids);
    free(spec);
    free(passwd);
    free(group);
    return 0;
}
