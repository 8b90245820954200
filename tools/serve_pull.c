/*
 * serve_pull.c — `albedo pull [moondream2|moondream3|moondream3.1|owner/repo[@rev]|DIR]`:
 * download a model into the Hugging Face cache (or find it there) and print
 * the model directory that --model accepts. It sits beside the server because both are
 * the tool's network-facing commands; the work is the library's
 * albedo_model_fetch (src/hub.c). The progress bar is drawn here, on stderr
 * and only for a terminal: the library itself never prints.
 */
#define _POSIX_C_SOURCE 200809L
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "albedo.h"
#include "serve.h"

typedef struct bar {
    int tty;
    int last_pct;
    char file[256];
} bar;

static void draw(void *user, const char *file, uint64_t done, uint64_t total) {
    bar *b = user;
    if (!b->tty) return;
    int pct = total ? (int)(done * 100 / total) : 0;
    if (strcmp(b->file, file)) {
        snprintf(b->file, sizeof b->file, "%s", file);
        b->last_pct = -1;
    }
    if (pct == b->last_pct && done != total) return;
    b->last_pct = pct;
    int width = 30, fill = total ? (int)(done * (uint64_t)width / total) : 0;
    char line[64];
    for (int i = 0; i < width; i++) line[i] = i < fill ? '#' : '.';
    line[width] = 0;
    fprintf(stderr, "\r%-24.24s [%s] %3d%% %8.1f / %.1f MB", file, line, pct, (double)done / 1e6, (double)total / 1e6);
    if (total && done >= total) fputc('\n', stderr);
    fflush(stderr);
}

int albedo_pull_main(int argc, char **argv) {
    const char *spec = NULL;
    int quiet = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--quiet") || !strcmp(argv[i], "-q"))
            quiet = 1;
        else if (!strcmp(argv[i], "--help") || !strcmp(argv[i], "-h"))
            spec = NULL, i = argc;
        else if (argv[i][0] == '-' && argv[i][1] == '-') {
            fprintf(stderr, "albedo pull: unknown option %s\n", argv[i]);
            return 2;
        } else if (!spec)
            spec = argv[i];
        else {
            fprintf(stderr, "albedo pull: one model at a time\n");
            return 2;
        }
    }
    if (!spec) {
        fprintf(stderr, "usage: albedo pull [--quiet] moondream2|moondream3|moondream3.1|owner/repo[@revision]\n\n"
                        "Downloads config.json, the weights (model.safetensors, or the shards that\n"
                        "model.safetensors.index.json names) and tokenizer.json into the Hugging Face cache\n"
                        "($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub) and prints the model\n"
                        "directory. Interrupted downloads resume. Honours HF_ENDPOINT, HF_TOKEN and\n"
                        "HF_HUB_OFFLINE=1.\n\n"
                        "  moondream2     vikhyatk/moondream2@2025-06-21\n"
                        "  moondream3     moondream/moondream3-preview (about 18.5 GB in shards)\n"
                        "  moondream3.1   moondream/moondream3.1-9B-A2B\n"
                        "  (all three with tokenizer.json of moondream/starmie-v1)\n");
        return 2;
    }
    bar b = {.tty = !quiet && isatty(2), .last_pct = -1};
    albedo_fetch_params p = albedo_fetch_params_default();
    p.progress = draw;
    p.user = &b;
    char dir[4096];
    if (albedo_model_fetch(spec, &p, dir, sizeof dir) != ALBEDO_OK) {
        fprintf(stderr, "albedo pull: %s\n", albedo_last_error());
        return 1;
    }
    printf("%s\n", dir);
    return 0;
}
