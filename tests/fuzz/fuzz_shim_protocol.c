/*
 * libFuzzer harness: the exec shim's reader of the parent's run-time answer (worker/runtime/shim.c
 * read_answer, over a real pipe as over the vsock socket), then what it does with an accepted answer
 * (apply_runtime_values: the allow-list, refused names shown on the console).
 *
 * The source is included as is, its main renamed, so the fuzzed code is the shipped code and the
 * shipped binary's bytes depend on nothing here (worker/runtime/SHA256SUMS).
 */
#define main shim_main
#include "shim.c"
#undef main

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) < 0)
        abort();
    /* The whole input must fit before anything reads it: a 1 MiB pipe holds every answer the reader
     * accepts (MAX_ANSWER_BYTES); longer inputs are cut there, which the bound makes equivalent. */
    if (fcntl(fds[1], F_SETPIPE_SZ, MAX_ANSWER_BYTES + 4096) < 0 && size > 65536)
        size = 65536;
    for (size_t off = 0; off < size;) {
        ssize_t w = write(fds[1], data + off, size - off);
        if (w <= 0)
            break;
        off += (size_t)w;
    }
    close(fds[1]);

    struct reader *r = xrealloc(NULL, sizeof(*r));
    r->fd = fds[0];
    r->deadline = now_ms() + EXCHANGE_TIMEOUT_MS;
    r->pos = r->end = r->consumed = 0;
    struct answer a;
    char detail[128] = "";
    const char *why = read_answer(r, &a, detail, sizeof(detail));
    if (why == NULL) {
        char *argv[] = {"shim", "--mutable", "LOG=info", "--mutable", "MODE=fast", "--allow-args", "--", "prog", NULL};
        struct options o;
        parse_options(8, argv, &o);
        struct strv env = {0}, args = {0};
        strv_push(&env, "LOG=info");
        strv_push(&args, "prog");
        apply_runtime_values(&o, &a, &env, &args);
        free(env.items);
        free(args.items);
        free(o.mutable_defaults.items);
    }
    free_answer(&a);
    free(r);
    close(fds[0]);
    return 0;
}
