/*
 * libFuzzer harness: the enclave init's readers of /cmd and /env (worker/runtime/init.c read_items,
 * one item per line through getline), then how it shows argv[0] on the console (shown).
 *
 * The source is included as is, its main renamed, so the fuzzed code is the shipped code and the
 * shipped binary's bytes depend on nothing here (worker/runtime/SHA256SUMS). Its fatal path ends the
 * machine (sync, reboot): here those abort instead, so a path that would end an enclave is a crash.
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <limits.h>
#include <sys/reboot.h>
#include <unistd.h>
static int fuzz_reboot(int how) { (void)how; abort(); }
static void fuzz_sync(void) { abort(); }
#define reboot fuzz_reboot
#define sync fuzz_sync
#define main init_main
#include "init.c"
#undef main
#undef sync
#undef reboot

static char dir[PATH_MAX], path[PATH_MAX];

static void remove_dir(void)
{
    unlink(path);
    rmdir(dir);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    (void)argc;
    (void)argv;
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof(dir), "%s/nitroconv-fuzz-init-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(dir) == NULL)
        abort();
    snprintf(path, sizeof(path), "%s/items", dir);
    atexit(remove_dir);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    for (int keep_empty = 0; keep_empty < 2; keep_empty++) {
        FILE *f = fopen(path, "we");
        if (f == NULL || fwrite(data, 1, size, f) != size || fclose(f) != 0)
            abort();
        size_t count;
        char **items = read_items(path, keep_empty, &count);
        if (items == NULL || items[count] != NULL)
            abort(); /* the file exists: an array, NULL-terminated after `count` items */
        if (count > 0)
            (void)shown(items[0]);
        for (size_t i = 0; i < count; i++)
            free(items[i]);
        free(items);
        if (access(path, F_OK) == 0)
            abort(); /* read_items unlinks what it read */
    }
    return 0;
}
