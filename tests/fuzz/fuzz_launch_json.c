/*
 * libFuzzer harness: the launcher's strict JSON reader (worker/runtime/launcher.c parse_launch) over
 * /enclave/launch.json bytes, then the run-time answer it builds from what it accepted.
 *
 * The source is included as is, its main renamed, so the fuzzed code is the shipped code and the
 * shipped binary's bytes depend on nothing here (worker/runtime/SHA256SUMS).
 */
#define main launcher_main
#include "launcher.c"
#undef main

static void free_launch(struct launch *l)
{
    free(l->eif);
    free(l->java_mode);
    for (size_t i = 0; i < l->n_env; i++) {
        free(l->env[i].name);
        free(l->env[i].value);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct launch l;
    if (size > MAX_JSON)
        return 0; /* read_launch refuses larger files before parsing */
    /* A copy of exactly `size` bytes: ASan sees any read past the end of the file's bytes. */
    char *text = malloc(size ? size : 1);
    memcpy(text, data, size);
    const char *why = parse_launch(text, size, &l);
    if (why == NULL) {
        struct answer a;
        build_answer(&l, 0, NULL, &a);
        free(a.buf);
    }
    free_launch(&l);
    free(text);
    return 0;
}
