/*
 * hub.c — model download from the Hugging Face hub into its standard cache
 * (albedo_model_fetch in albedo.h). What it reproduces of huggingface_hub's
 * file_download.py, so that either program reuses the other's files:
 *
 *   <hub cache>/models--owner--repo/
 *       blobs/<etag>                    the bytes; etag = sha256 for LFS files
 *       blobs/<etag>.incomplete         a partial download, resumed by Range
 *       snapshots/<commit>/<file>  ->  ../../blobs/<etag>   (relative symlink)
 *       refs/<revision>                 the commit a branch or tag resolved to
 *       .no_exist/<commit>/<file>       the hub said 404 (optional files)
 *
 * A file is found by HEAD <endpoint>/<repo>/resolve/<revision>/<file>
 * without following absolute redirects: X-Repo-Commit names the snapshot,
 * X-Linked-Etag (LFS) or ETag the blob. The GET then follows redirects (LFS
 * bytes live on a CDN; curl drops the Authorization header when the host
 * changes). What is not here: the hub's metadata API, nested file paths,
 * git-sha1 checks of small non-LFS files (their size is checked instead).
 *
 * A model is config.json, its weights and tokenizer.json. The weights are
 * model.safetensors or, when the repo has none (Moondream 3 preview), the
 * shards that model.safetensors.index.json names, each fetched like any LFS
 * file (resumed, SHA-256 checked). Aliases: moondream2, moondream3 (the
 * preview) and moondream3.1, each with the Starmie tokenizer.
 *
 * The library never prints: progress goes to the caller's callback.
 */
/* realpath, flock */
#define _DEFAULT_SOURCE
#define _POSIX_C_SOURCE 200809L
#include <ctype.h>
#include <stdarg.h>
#include <curl/curl.h>
#include <dirent.h>
#include <errno.h>
#include <jansson.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

#define TOKENIZER_REPO "moondream/starmie-v1"
#define TOKENIZER_REVISION "main"
#define INDEX_FILE "model.safetensors.index.json"
#define INDEX_MAX_BYTES (64 << 20)
#define MAX_SHARDS 1024

/* Names that albedo pull and --model accept for the official checkpoints.
 * All of them take tokenizer.json from moondream/starmie-v1, as the
 * reference code does (Tokenizer.from_pretrained("moondream/starmie-v1")). */
static const struct alias {
    const char *name, *repo, *revision;
} aliases[] = {
    {"moondream2", "vikhyatk/moondream2", "2025-06-21"},
    {"moondream3", "moondream/moondream3-preview", "main"},
    {"moondream3.1", "moondream/moondream3.1-9B-A2B", "main"},
};

/* ---- SHA-256 (FIPS 180-4) --------------------------------------------------------- */

typedef struct sha256 {
    uint32_t h[8];
    uint64_t n;
    uint8_t blk[64];
    size_t fill;
} sha256;

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(sha256 *s, const uint8_t *p) {
    uint32_t w[64], a, b, c, d, e, f, g, h;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3], e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        uint32_t t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
        uint32_t t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    s->h[0] += a, s->h[1] += b, s->h[2] += c, s->h[3] += d, s->h[4] += e, s->h[5] += f, s->h[6] += g, s->h[7] += h;
}

static void sha256_init(sha256 *s) {
    static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, iv, sizeof iv);
    s->n = 0;
    s->fill = 0;
}

static void sha256_update(sha256 *s, const void *data, size_t len) {
    const uint8_t *p = data;
    s->n += len;
    while (len) {
        size_t k = 64 - s->fill < len ? 64 - s->fill : len;
        memcpy(s->blk + s->fill, p, k);
        s->fill += k, p += k, len -= k;
        if (s->fill == 64) {
            sha256_block(s, s->blk);
            s->fill = 0;
        }
    }
}

static void sha256_hex(sha256 *s, char out[65]) {
    uint64_t bits = s->n * 8;
    uint8_t pad = 0x80, zero = 0, len[8];
    sha256_update(s, &pad, 1);
    while (s->fill != 56) sha256_update(s, &zero, 1);
    for (int i = 0; i < 8; i++) len[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha256_update(s, len, 8);
    for (int i = 0; i < 8; i++) snprintf(out + 8 * i, 9, "%08x", s->h[i]);
}

static int sha256_file(const char *path, char out[65]) {
    FILE *f = fopen(path, "rb");
    if (!f) return -1;
    sha256 s;
    sha256_init(&s);
    static _Thread_local uint8_t buf[1 << 16];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) sha256_update(&s, buf, n);
    int err = ferror(f);
    fclose(f);
    if (err) return -1;
    sha256_hex(&s, out);
    return 0;
}

/* snprintf that reports truncation (-1) instead of silently cutting a path. */
static int fmt(char *out, size_t cap, const char *f, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 3, 4)))
#endif
    ;
static int fmt(char *out, size_t cap, const char *f, ...) {
    va_list ap;
    va_start(ap, f);
    int n = vsnprintf(out, cap, f, ap);
    va_end(ap);
    return n < 0 || (size_t)n >= cap ? -1 : 0;
}

/* ---- small file-system helpers ------------------------------------------------------ */

static int mkdirs(const char *path) {
    char tmp[PATH_MAX];
    snprintf(tmp, sizeof tmp, "%s", path);
    for (char *p = tmp + 1; *p; p++)
        if (*p == '/') {
            *p = 0;
            if (mkdir(tmp, 0755) && errno != EEXIST) return -1;
            *p = '/';
        }
    return mkdir(tmp, 0755) && errno != EEXIST ? -1 : 0;
}

static int is_dir(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static int is_file(const char *p) { /* follows symlinks: a dangling one is no file */
    struct stat sb;
    return stat(p, &sb) == 0 && S_ISREG(sb.st_mode);
}

static long long file_size(const char *p) {
    struct stat sb;
    return stat(p, &sb) == 0 ? (long long)sb.st_size : -1;
}

static int read_small(const char *path, char *out, size_t cap) {
    FILE *f = fopen(path, "r");
    if (!f) return -1;
    size_t n = fread(out, 1, cap - 1, f);
    fclose(f);
    out[n] = 0;
    while (n && isspace((unsigned char)out[n - 1])) out[--n] = 0;
    return n ? 0 : -1;
}

static int write_small(const char *path, const char *text) {
    char tmp[PATH_MAX + 16];
    snprintf(tmp, sizeof tmp, "%s.tmp%ld", path, (long)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return -1;
    int bad = fputs(text, f) < 0;
    bad |= fclose(f) != 0;
    if (bad || rename(tmp, path)) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

/* Replace (or create) a symlink atomically enough: a new name, then rename. */
static int relink(const char *target, const char *link) {
    char tmp[PATH_MAX + 16];
    snprintf(tmp, sizeof tmp, "%s.tmp%ld", link, (long)getpid());
    unlink(tmp);
    if (symlink(target, tmp)) return -1;
    if (rename(tmp, link)) {
        unlink(tmp);
        return -1;
    }
    return 0;
}

static int is_hex(const char *s, size_t n) {
    if (strlen(s) != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)s[i])) return 0;
    return 1;
}

static int env_true(const char *name) {
    const char *v = getenv(name);
    return v && (!strcmp(v, "1") || !strcasecmp(v, "on") || !strcasecmp(v, "yes") || !strcasecmp(v, "true"));
}

/* ---- configuration -------------------------------------------------------------------- */

typedef struct hub {
    char endpoint[1024];
    char token[1024];
    char cache[PATH_MAX];
    char albedo_cache[PATH_MAX];
    int offline, max_retries;
    long connect_timeout_s;
    albedo_progress_fn progress;
    void *user;
    errbuf *e;
} hub;

albedo_fetch_params albedo_fetch_params_default(void) {
    albedo_fetch_params p;
    memset(&p, 0, sizeof p);
    p.offline = -1;
    p.max_retries = 3;
    p.connect_timeout_s = 10;
    return p;
}

static void hub_setup(hub *h, const albedo_fetch_params *p, errbuf *e) {
    memset(h, 0, sizeof *h);
    h->e = e;
    const char *home = getenv("HOME"), *xdg = getenv("XDG_CACHE_HOME");
    char base[PATH_MAX];
    if (xdg && *xdg)
        snprintf(base, sizeof base, "%s", xdg);
    else
        snprintf(base, sizeof base, "%s/.cache", home ? home : "/tmp");

    const char *ep = p->endpoint ? p->endpoint : getenv("HF_ENDPOINT");
    snprintf(h->endpoint, sizeof h->endpoint, "%s", ep && *ep ? ep : "https://huggingface.co");
    size_t n = strlen(h->endpoint);
    while (n && h->endpoint[n - 1] == '/') h->endpoint[--n] = 0;

    const char *hf_home = getenv("HF_HOME");
    char hfh[PATH_MAX];
    if (hf_home && *hf_home)
        snprintf(hfh, sizeof hfh, "%s", hf_home);
    else
        fmt(hfh, sizeof hfh, "%s/huggingface", base);
    const char *tok = p->token ? p->token : getenv("HF_TOKEN");
    if (tok) {
        snprintf(h->token, sizeof h->token, "%s", tok);
    } else { /* where `huggingface-cli login` keeps it */
        char path[PATH_MAX + 8];
        snprintf(path, sizeof path, "%s/token", hfh);
        if (read_small(path, h->token, sizeof h->token)) h->token[0] = 0;
    }
    const char *hc = p->hub_cache ? p->hub_cache : getenv("HF_HUB_CACHE");
    if (hc && *hc)
        snprintf(h->cache, sizeof h->cache, "%s", hc);
    else
        fmt(h->cache, sizeof h->cache, "%s/hub", hfh);
    const char *ac = p->albedo_cache ? p->albedo_cache : getenv("ALBEDO_CACHE");
    if (ac && *ac)
        snprintf(h->albedo_cache, sizeof h->albedo_cache, "%s", ac);
    else
        fmt(h->albedo_cache, sizeof h->albedo_cache, "%s/albedo", base);
    h->offline = p->offline >= 0 ? p->offline : env_true("HF_HUB_OFFLINE");
    h->max_retries = p->max_retries < 0 ? 0 : p->max_retries;
    h->connect_timeout_s = p->connect_timeout_s > 0 ? p->connect_timeout_s : 10;
    h->progress = p->progress;
    h->user = p->user;
}

/* ---- HTTP --------------------------------------------------------------------------- */

static pthread_once_t curl_once = PTHREAD_ONCE_INIT;
static CURLcode curl_init_rc;
static void curl_init(void) { curl_init_rc = curl_global_init(CURL_GLOBAL_DEFAULT); }

typedef struct head_info {
    char commit[128], etag[256], location[2048];
    long long size; /* -1 unknown */
} head_info;

static void header_value(const char *line, size_t n, const char *name, char *out, size_t cap) {
    size_t k = strlen(name);
    if (n <= k + 1 || strncasecmp(line, name, k) || line[k] != ':') return;
    const char *v = line + k + 1;
    const char *end = line + n;
    while (v < end && (*v == ' ' || *v == '\t')) v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ')) end--;
    snprintf(out, cap, "%.*s", (int)(end - v), v);
}

static size_t on_head_header(char *line, size_t size, size_t nitems, void *user) {
    head_info *hi = user;
    size_t n = size * nitems;
    char tmp[256] = "";
    header_value(line, n, "X-Repo-Commit", hi->commit, sizeof hi->commit);
    header_value(line, n, "Location", hi->location, sizeof hi->location);
    /* X-Linked-Etag (LFS, the sha256) wins over ETag, whatever their order. */
    header_value(line, n, "X-Linked-Etag", tmp, sizeof tmp);
    if (tmp[0]) snprintf(hi->etag, sizeof hi->etag, "~%.254s", tmp); /* "~" marks it; an etag is far shorter */
    tmp[0] = 0;
    header_value(line, n, "ETag", tmp, sizeof tmp);
    if (tmp[0] && hi->etag[0] != '~') snprintf(hi->etag, sizeof hi->etag, "%s", tmp);
    tmp[0] = 0;
    header_value(line, n, "X-Linked-Size", tmp, sizeof tmp);
    if (tmp[0]) hi->size = atoll(tmp);
    return n;
}

/* "W/\"abc\"" → "abc" */
static void clean_etag(char *etag) {
    char *p = etag;
    if (*p == '~') p++;
    if (!strncmp(p, "W/", 2)) p += 2;
    size_t n = strlen(p);
    if (n >= 2 && p[0] == '"' && p[n - 1] == '"') {
        p++;
        n -= 2;
    }
    memmove(etag, p, n);
    etag[n] = 0;
}

static CURL *easy(const hub *h, struct curl_slist **hdrs) {
    CURL *c = curl_easy_init();
    if (!c) return NULL;
    curl_easy_setopt(c, CURLOPT_USERAGENT, "albedo/" ALBEDO_VERSION_STRING "; hf_hub-compatible");
    curl_easy_setopt(c, CURLOPT_CONNECTTIMEOUT, h->connect_timeout_s);
    /* A transfer that stalls for a minute is dropped and resumed. */
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_LIMIT, 1L);
    curl_easy_setopt(c, CURLOPT_LOW_SPEED_TIME, 60L);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    *hdrs = curl_slist_append(NULL, "Accept-Encoding: identity");
    if (h->token[0]) {
        char auth[1100];
        snprintf(auth, sizeof auth, "Authorization: Bearer %s", h->token);
        *hdrs = curl_slist_append(*hdrs, auth);
    }
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, *hdrs);
    return c;
}

enum { HEAD_OK = 0, HEAD_NOT_FOUND = 1, HEAD_FAILED = 2 };

/* HEAD the resolve URL, following only same-host (relative) redirects, as
 * huggingface_hub does: the first absolute redirect's headers are the ones
 * that describe the file. */
static int head(const hub *h, const char *url0, head_info *hi, char *why, size_t cap) {
    char url[4096];
    snprintf(url, sizeof url, "%s", url0);
    for (int hop = 0; hop < 5; hop++) {
        memset(hi, 0, sizeof *hi);
        hi->size = -1;
        struct curl_slist *hdrs = NULL;
        CURL *c = easy(h, &hdrs);
        if (!c) {
            snprintf(why, cap, "cannot start a transfer");
            return HEAD_FAILED;
        }
        curl_easy_setopt(c, CURLOPT_URL, url);
        curl_easy_setopt(c, CURLOPT_NOBODY, 1L);
        curl_easy_setopt(c, CURLOPT_TIMEOUT, 60L);
        curl_easy_setopt(c, CURLOPT_HEADERFUNCTION, on_head_header);
        curl_easy_setopt(c, CURLOPT_HEADERDATA, hi);
        CURLcode rc = curl_easy_perform(c);
        long code = 0;
        curl_off_t cl = -1;
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
        curl_easy_getinfo(c, CURLINFO_CONTENT_LENGTH_DOWNLOAD_T, &cl);
        curl_easy_cleanup(c);
        curl_slist_free_all(hdrs);
        if (rc != CURLE_OK) {
            snprintf(why, cap, "%s", curl_easy_strerror(rc));
            return HEAD_FAILED;
        }
        if (code == 404) return HEAD_NOT_FOUND;
        if (code == 401 || code == 403) {
            snprintf(why, cap, "HTTP %ld: access denied (gated or private repo? set HF_TOKEN)", code);
            return HEAD_FAILED;
        }
        if (code >= 300 && code < 400 && hi->location[0] == '/') {
            /* relative: same host, e.g. a renamed repo */
            const char *p = strstr(h->endpoint, "://");
            const char *slash = p ? strchr(p + 3, '/') : NULL;
            int hostlen = slash ? (int)(slash - h->endpoint) : (int)strlen(h->endpoint);
            snprintf(url, sizeof url, "%.*s%s", hostlen, h->endpoint, hi->location);
            continue;
        }
        if (code >= 400 || code < 200) {
            snprintf(why, cap, "HTTP %ld", code);
            return HEAD_FAILED;
        }
        if (hi->size < 0 && code == 200 && cl >= 0) hi->size = (long long)cl;
        clean_etag(hi->etag);
        return HEAD_OK;
    }
    snprintf(why, cap, "too many redirects");
    return HEAD_FAILED;
}

typedef struct dl {
    const hub *h;
    CURL *c;
    FILE *f;
    const char *name;
    long long offset; /* bytes already on disk when this attempt started */
    int checked;
    int write_error;
} dl;

static size_t on_data(char *p, size_t size, size_t nitems, void *user) {
    dl *d = user;
    size_t n = size * nitems;
    if (!d->checked) {
        /* A server that ignores Range answers 200 with the whole file. */
        long code = 0;
        curl_easy_getinfo(d->c, CURLINFO_RESPONSE_CODE, &code);
        if (code == 200 && d->offset > 0) {
            if (fflush(d->f) || ftruncate(fileno(d->f), 0) || fseek(d->f, 0, SEEK_SET)) {
                d->write_error = 1;
                return 0;
            }
            d->offset = 0;
        }
        d->checked = 1;
    }
    if (fwrite(p, 1, n, d->f) != n) {
        d->write_error = 1;
        return 0;
    }
    return n;
}

static int on_progress(void *user, curl_off_t total, curl_off_t now, curl_off_t ut, curl_off_t un) {
    dl *d = user;
    (void)ut, (void)un;
    if (d->h->progress)
        d->h->progress(d->h->user, d->name, (uint64_t)(d->offset + now), total ? (uint64_t)(d->offset + total) : 0);
    return 0;
}

/* GET url into path (appending from its current size). Retries transfer
 * errors, each time resuming where the last attempt stopped. */
static albedo_status download(const hub *h, const char *url, const char *path, const char *name, long long expect) {
    for (int attempt = 0;; attempt++) {
        FILE *f = fopen(path, "ab");
        if (!f) return errf(h->e, ALBEDO_ERR_IO, "%s: %s", path, strerror(errno));
        long long have = file_size(path);
        if (expect >= 0 && have == expect) {
            fclose(f);
            return ALBEDO_OK;
        }
        if (expect >= 0 && have > expect) { /* not ours: start again */
            if (ftruncate(fileno(f), 0)) {
                fclose(f);
                return errf(h->e, ALBEDO_ERR_IO, "%s: %s", path, strerror(errno));
            }
            have = 0;
        }
        struct curl_slist *hdrs = NULL;
        CURL *c = easy(h, &hdrs);
        if (!c) {
            fclose(f);
            return errf(h->e, ALBEDO_ERR_NETWORK, "%s: cannot start a transfer", url);
        }
        dl d = {.h = h, .c = c, .f = f, .name = name, .offset = have};
        char range[64];
        if (have > 0) {
            snprintf(range, sizeof range, "%lld-", have);
            curl_easy_setopt(c, CURLOPT_RANGE, range);
        }
        curl_easy_setopt(c, CURLOPT_URL, url);
        curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
        curl_easy_setopt(c, CURLOPT_MAXREDIRS, 10L);
        curl_easy_setopt(c, CURLOPT_FAILONERROR, 1L);
        curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_data);
        curl_easy_setopt(c, CURLOPT_WRITEDATA, &d);
        curl_easy_setopt(c, CURLOPT_NOPROGRESS, 0L);
        curl_easy_setopt(c, CURLOPT_XFERINFOFUNCTION, on_progress);
        curl_easy_setopt(c, CURLOPT_XFERINFODATA, &d);
        CURLcode rc = curl_easy_perform(c);
        long code = 0;
        curl_easy_getinfo(c, CURLINFO_RESPONSE_CODE, &code);
        curl_easy_cleanup(c);
        curl_slist_free_all(hdrs);
        int close_bad = fclose(f) != 0;
        if (d.write_error || close_bad) return errf(h->e, ALBEDO_ERR_IO, "%s: write error", path);
        if (rc == CURLE_OK) return ALBEDO_OK;
        if (rc == CURLE_HTTP_RETURNED_ERROR && code == 416 && have > 0) return ALBEDO_OK; /* complete already */
        if (rc == CURLE_HTTP_RETURNED_ERROR && code != 429 && code < 500)
            return errf(h->e, ALBEDO_ERR_NETWORK, "%s: HTTP %ld", url, code);
        if (attempt >= h->max_retries)
            return errf(h->e, ALBEDO_ERR_NETWORK, "%s: %s (after %d attempts; rerun to resume)", url,
                        rc == CURLE_HTTP_RETURNED_ERROR ? "server error" : curl_easy_strerror(rc), attempt + 1);
        sleep(attempt < 3 ? 1u << attempt : 8u);
    }
}

/* ---- one file of one repo ---------------------------------------------------------- */

enum { FILE_OK = 0, FILE_ABSENT = 1, FILE_ERROR = 2 };

static void repo_dir(const hub *h, const char *repo, char *out, size_t cap) {
    char flat[512];
    snprintf(flat, sizeof flat, "%s", repo);
    /* models--owner--repo: each '/' becomes "--" */
    char tmp[600];
    size_t k = 0;
    for (const char *p = flat; *p && k + 3 < sizeof tmp; p++) {
        if (*p == '/') {
            tmp[k++] = '-';
            tmp[k++] = '-';
        } else {
            tmp[k++] = *p;
        }
    }
    tmp[k] = 0;
    fmt(out, cap, "%s/models--%s", h->cache, tmp);
}

/* Find repo@rev/file in the cache or download it; *out = its snapshot path. */
static int fetch_file(const hub *h, const char *repo, const char *rev, const char *file, int optional, char *out,
                      size_t cap, albedo_status *st) {
    char rd[PATH_MAX], path[PATH_MAX + 512], commit[128] = "";
    repo_dir(h, repo, rd, sizeof rd);
    /* The revision is one path segment: huggingface_hub quotes "refs/pr/1"
     * as refs%2Fpr%2F1. */
    char qrev[768], url[4096];
    size_t k = 0;
    for (const char *p = rev; *p && k + 4 < sizeof qrev; p++) {
        if (*p == '/') {
            memcpy(qrev + k, "%2F", 3);
            k += 3;
        } else {
            qrev[k++] = *p;
        }
    }
    qrev[k] = 0;
    snprintf(url, sizeof url, "%s/%s/resolve/%s/%s", h->endpoint, repo, qrev, file);

    /* The cache first: a commit hash names its snapshot; a branch or tag
     * goes through refs/. */
    if (is_hex(rev, 40)) {
        snprintf(commit, sizeof commit, "%s", rev);
    } else {
        snprintf(path, sizeof path, "%s/refs/%s", rd, rev);
        if (read_small(path, commit, sizeof commit)) commit[0] = 0;
    }
    int cached = 0, known_absent = 0;
    if (commit[0]) {
        snprintf(out, cap, "%s/snapshots/%s/%s", rd, commit, file);
        cached = is_file(out);
        snprintf(path, sizeof path, "%s/.no_exist/%s/%s", rd, commit, file);
        known_absent = !cached && is_file(path);
    }
    /* Revisions other than main are treated as fixed (tags like 2025-06-21
     * and commits); main is re-checked when the network is allowed. */
    if ((cached || known_absent) && (h->offline || strcmp(rev, "main"))) return cached ? FILE_OK : FILE_ABSENT;
    if (h->offline) {
        if (optional) return FILE_ABSENT;
        *st = errf(h->e, ALBEDO_ERR_NETWORK, "%s: not in the cache %s and HF_HUB_OFFLINE is set", url, rd);
        return FILE_ERROR;
    }

    head_info hi;
    char why[512] = "";
    int hr = head(h, url, &hi, why, sizeof why);
    if (hr == HEAD_NOT_FOUND) {
        if (hi.commit[0]) { /* remember, as huggingface_hub does */
            snprintf(path, sizeof path, "%s/.no_exist/%s", rd, hi.commit);
            if (!mkdirs(path)) {
                snprintf(path, sizeof path, "%s/.no_exist/%s/%s", rd, hi.commit, file);
                write_small(path, "");
            }
        }
        if (optional) return FILE_ABSENT;
        *st = errf(h->e, ALBEDO_ERR_NETWORK, "%s: not found (HTTP 404)", url);
        return FILE_ERROR;
    }
    if (hr == HEAD_FAILED) {
        if (cached) return FILE_OK; /* offline in practice: the cached copy will do */
        *st = errf(h->e, ALBEDO_ERR_NETWORK, "%s: %s", url, why);
        return FILE_ERROR;
    }
    if (!hi.etag[0]) {
        *st = errf(h->e, ALBEDO_ERR_NETWORK, "%s: the server sent no ETag; is HF_ENDPOINT a Hugging Face hub?", url);
        return FILE_ERROR;
    }
    for (const char *p = hi.etag; *p; p++)
        if (*p == '/' || *p == '\\' || (p == hi.etag && *p == '.')) {
            *st = errf(h->e, ALBEDO_ERR_NETWORK, "%s: unusable ETag", url);
            return FILE_ERROR;
        }
    /* The commit becomes a directory name: a server must not steer it
     * outside the cache. */
    for (const char *p = hi.commit; *p; p++)
        if (!isalnum((unsigned char)*p) && *p != '-' && *p != '_' && *p != '.') {
            *st = errf(h->e, ALBEDO_ERR_NETWORK, "%s: unusable X-Repo-Commit header", url);
            return FILE_ERROR;
        }
    if (hi.commit[0] == '.') {
        *st = errf(h->e, ALBEDO_ERR_NETWORK, "%s: unusable X-Repo-Commit header", url);
        return FILE_ERROR;
    }
    /* Without X-Repo-Commit the revision names the snapshot. */
    snprintf(commit, sizeof commit, "%s", hi.commit[0] ? hi.commit : rev);

    char blob[PATH_MAX + 512], part[PATH_MAX + 600], lockp[PATH_MAX + 600];
    snprintf(path, sizeof path, "%s/blobs", rd);
    if (mkdirs(path)) {
        *st = errf(h->e, ALBEDO_ERR_IO, "%s: %s", path, strerror(errno));
        return FILE_ERROR;
    }
    snprintf(blob, sizeof blob, "%s/blobs/%s", rd, hi.etag);
    snprintf(part, sizeof part, "%s.incomplete", blob);
    snprintf(lockp, sizeof lockp, "%s.lock", blob);
    /* One downloader per blob: a second process waits, then finds it done. */
    FILE *lk = fopen(lockp, "w");
    if (lk) flock(fileno(lk), LOCK_EX);
    int sha = is_hex(hi.etag, 64);
    if (!is_file(blob)) {
        albedo_status ds = download(h, url, part, file, hi.size);
        if (ds != ALBEDO_OK) {
            if (lk) fclose(lk);
            *st = ds;
            return FILE_ERROR;
        }
        long long got = file_size(part);
        if (hi.size >= 0 && got != hi.size) {
            unlink(part);
            if (lk) fclose(lk);
            *st = errf(h->e, ALBEDO_ERR_NETWORK, "%s: got %lld bytes, the hub announced %lld", url, got, hi.size);
            return FILE_ERROR;
        }
        if (sha) {
            char hex[65];
            if (sha256_file(part, hex)) {
                if (lk) fclose(lk);
                *st = errf(h->e, ALBEDO_ERR_IO, "%s: %s", part, strerror(errno));
                return FILE_ERROR;
            }
            if (strcasecmp(hex, hi.etag)) {
                unlink(part); /* a resumed download must not build on bad bytes */
                if (lk) fclose(lk);
                *st = errf(h->e, ALBEDO_ERR_NETWORK, "%s: checksum mismatch: SHA-256 %s, the hub announced %s", url,
                           hex, hi.etag);
                return FILE_ERROR;
            }
        }
        if (rename(part, blob)) {
            if (lk) fclose(lk);
            *st = errf(h->e, ALBEDO_ERR_IO, "%s: %s", blob, strerror(errno));
            return FILE_ERROR;
        }
    }
    if (lk) {
        fclose(lk);
        unlink(lockp);
    }
    snprintf(path, sizeof path, "%s/snapshots/%s", rd, commit);
    char target[PATH_MAX];
    snprintf(target, sizeof target, "../../blobs/%s", hi.etag);
    snprintf(out, cap, "%s/%s", path, file);
    if (mkdirs(path) || relink(target, out)) {
        *st = errf(h->e, ALBEDO_ERR_IO, "%s: %s", out, strerror(errno));
        return FILE_ERROR;
    }
    if (strcmp(rev, commit)) {
        snprintf(path, sizeof path, "%s/refs", rd);
        char ref[PATH_MAX + 600];
        snprintf(ref, sizeof ref, "%s/%s", path, rev);
        if (strchr(rev, '/')) { /* refs/pr/1 and the like */
            char *slash = strrchr(ref, '/');
            *slash = 0;
            mkdirs(ref);
            *slash = '/';
        }
        if (mkdirs(path) || write_small(ref, commit)) {
            *st = errf(h->e, ALBEDO_ERR_IO, "%s: %s", ref, strerror(errno));
            return FILE_ERROR;
        }
    }
    return FILE_OK;
}

/* ---- model specs ------------------------------------------------------------------- */

static int looks_like_repo(const char *s) {
    const char *slash = strchr(s, '/');
    if (!slash || slash == s || strchr(slash + 1, '/') || !slash[1]) {
        /* owner/repo@rev where rev may hold slashes (refs/pr/1) */
        const char *at = strchr(s, '@');
        if (!slash || !at || slash > at || slash == s) return 0;
        if (memchr(slash + 1, '/', (size_t)(at - slash - 1))) return 0;
    }
    if (s[0] == '.' || s[0] == '/' || s[0] == '~') return 0;
    for (const char *p = s; *p && *p != '@'; p++)
        if (!isalnum((unsigned char)*p) && !strchr("-_./", *p)) return 0;
    return 1;
}

/* The files of one model: names in the model directory and their snapshot paths. */
typedef struct file_list {
    int n, cap;
    char (*name)[256];
    char (*path)[PATH_MAX + 1024];
} file_list;

static int list_add(file_list *l, const char *name) {
    if (l->n == l->cap) {
        int cap = l->cap ? 2 * l->cap : 8;
        void *a = realloc(l->name, (size_t)cap * sizeof *l->name);
        if (a) l->name = a;
        void *b = a ? realloc(l->path, (size_t)cap * sizeof *l->path) : NULL;
        if (!b) return -1;
        l->path = b;
        l->cap = cap;
    }
    snprintf(l->name[l->n], sizeof l->name[l->n], "%s", name);
    l->path[l->n][0] = 0;
    return l->n++;
}

static void list_free(file_list *l) {
    free(l->name);
    free(l->path);
}

/* A directory of symlinks to files of different snapshots. Links of an
 * earlier pull that this model no longer has (model.safetensors after a
 * switch to shards, say) are removed: the loader must not pick a stale one. */
static albedo_status merge_dir(const hub *h, const char *name, const file_list *l, char *out, size_t cap) {
    char dir[PATH_MAX];
    fmt(dir, sizeof dir, "%s/models/%s", h->albedo_cache, name);
    if (mkdirs(dir)) return errf(h->e, ALBEDO_ERR_IO, "%s: %s", dir, strerror(errno));
    for (int i = 0; i < l->n; i++) {
        char real[PATH_MAX], link[PATH_MAX + 300];
        if (!realpath(l->path[i], real)) return errf(h->e, ALBEDO_ERR_IO, "%s: %s", l->path[i], strerror(errno));
        snprintf(link, sizeof link, "%s/%s", dir, l->name[i]);
        if (relink(real, link)) return errf(h->e, ALBEDO_ERR_IO, "%s: %s", link, strerror(errno));
    }
    DIR *d = opendir(dir);
    for (struct dirent *de; d && (de = readdir(d));) {
        int keep = de->d_name[0] == '.';
        for (int i = 0; i < l->n && !keep; i++) keep = !strcmp(de->d_name, l->name[i]);
        char link[PATH_MAX + 300];
        struct stat sb;
        snprintf(link, sizeof link, "%s/%s", dir, de->d_name);
        if (!keep && lstat(link, &sb) == 0 && S_ISLNK(sb.st_mode)) unlink(link);
    }
    if (d) closedir(d);
    if (strlen(dir) + 1 > cap) return errf(h->e, ALBEDO_ERR_INVALID_ARGUMENT, "output buffer too small for %s", dir);
    memcpy(out, dir, strlen(dir) + 1);
    return ALBEDO_OK;
}

/* A shard name from an index that came over the network: it becomes a URL
 * segment and a cache file name, so only plain names of the hub's pattern. */
static int shard_name_ok(const char *f) {
    size_t n = strlen(f);
    if (n == 0 || n > 200 || f[0] == '.' || n < 12 || strcmp(f + n - 12, ".safetensors")) return 0;
    for (const char *p = f; *p; p++)
        if (!isalnum((unsigned char)*p) && !strchr("-_.", *p)) return 0;
    return 1;
}

/* Add the distinct shards of the index at path (in order of first
 * appearance in its weight_map) to l. */
static albedo_status add_shards(const hub *h, const char *path, const char *url, file_list *l) {
    long long size = file_size(path);
    if (size < 0 || size > INDEX_MAX_BYTES)
        return errf(h->e, ALBEDO_ERR_MODEL_FORMAT, "%s: missing or too large", path);
    json_error_t je;
    json_t *root = json_load_file(path, 0, &je);
    json_t *map = root ? json_object_get(root, "weight_map") : NULL;
    albedo_status st = ALBEDO_OK;
    if (!json_is_object(map) || json_object_size(map) == 0) {
        st = errf(h->e, ALBEDO_ERR_MODEL_FORMAT, "%s: expected {\"weight_map\": {tensor: shard file, ...}}%s%s", url,
                  root ? "" : ": ", root ? "" : je.text);
        json_decref(root);
        return st;
    }
    const int first = l->n;
    const char *key;
    json_t *v;
    json_object_foreach(map, key, v) {
        const char *f = json_string_value(v);
        if (!f || !shard_name_ok(f)) {
            st = errf(h->e, ALBEDO_ERR_MODEL_FORMAT, "%s: tensor %s: shard '%s' is not a plain *.safetensors file name",
                      url, key, f ? f : "(not a string)");
            break;
        }
        int seen = 0;
        for (int i = first; i < l->n && !seen; i++) seen = !strcmp(l->name[i], f);
        if (seen) continue;
        if (l->n - first == MAX_SHARDS) {
            st = errf(h->e, ALBEDO_ERR_MODEL_FORMAT, "%s: more than %d shards", url, MAX_SHARDS);
            break;
        }
        if (list_add(l, f) < 0) {
            st = errf(h->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
            break;
        }
    }
    json_decref(root);
    return st;
}

static albedo_status fetch_model(hub *h, const char *repo, const char *rev, int tok_from_repo, const char *name,
                                 char *out, size_t cap) {
    file_list l = {0};
    albedo_status st = ALBEDO_ERR_INTERNAL;
    char url[4096];
    int r = FILE_ERROR, tok = -1, single = -1;
    if (list_add(&l, "config.json") < 0 || (single = list_add(&l, "model.safetensors")) < 0) {
        st = errf(h->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    if (fetch_file(h, repo, rev, "config.json", 0, l.path[0], sizeof l.path[0], &st) != FILE_OK) goto done;
    /* One file, or an index and its shards. */
    r = fetch_file(h, repo, rev, "model.safetensors", 1, l.path[single], sizeof l.path[single], &st);
    if (r == FILE_ERROR) goto done;
    if (r == FILE_ABSENT) {
        snprintf(l.name[single], sizeof l.name[single], "%s", INDEX_FILE);
        r = fetch_file(h, repo, rev, INDEX_FILE, 1, l.path[single], sizeof l.path[single], &st);
        if (r == FILE_ERROR) goto done;
        snprintf(url, sizeof url, "%s/%s/resolve/%s/", h->endpoint, repo, rev);
        if (r == FILE_ABSENT) {
            st = errf(h->e, ALBEDO_ERR_NETWORK, "%smodel.safetensors: %s, nor %s", url,
                      h->offline ? "not in the cache and HF_HUB_OFFLINE is set" : "not found (HTTP 404)", INDEX_FILE);
            goto done;
        }
        strncat(url, INDEX_FILE, sizeof url - strlen(url) - 1);
        const int first = l.n;
        if ((st = add_shards(h, l.path[single], url, &l))) goto done;
        for (int i = first; i < l.n; i++)
            if (fetch_file(h, repo, rev, l.name[i], 0, l.path[i], sizeof l.path[i], &st) != FILE_OK) goto done;
    }
    if ((tok = list_add(&l, "tokenizer.json")) < 0) {
        st = errf(h->e, ALBEDO_ERR_OUT_OF_MEMORY, "out of memory");
        goto done;
    }
    r = tok_from_repo ? fetch_file(h, repo, rev, "tokenizer.json", 1, l.path[tok], sizeof l.path[tok], &st)
                      : FILE_ABSENT;
    if (r == FILE_ERROR) goto done;
    if (r == FILE_OK) { /* every file in one snapshot: that is the model directory */
        char *slash = strrchr(l.path[0], '/');
        *slash = 0;
        if (strlen(l.path[0]) + 1 > cap) {
            st = errf(h->e, ALBEDO_ERR_INVALID_ARGUMENT, "output buffer too small");
            goto done;
        }
        memcpy(out, l.path[0], strlen(l.path[0]) + 1);
        st = ALBEDO_OK;
        goto done;
    }
    /* Moondream 2 since 2025-06-21 and Moondream 3 use the Starmie tokenizer,
     * kept in its own repo. */
    if (fetch_file(h, TOKENIZER_REPO, TOKENIZER_REVISION, "tokenizer.json", 0, l.path[tok], sizeof l.path[tok], &st) !=
        FILE_OK)
        goto done;
    st = merge_dir(h, name, &l, out, cap);
done:
    list_free(&l);
    return st;
}

ALBEDO_API albedo_status albedo_model_fetch(const char *spec, const albedo_fetch_params *params, char *out_dir,
                                            size_t cap) {
    errbuf e = {{0}};
    albedo_status st;
    if (!spec || !*spec || !out_dir || !cap) {
        st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "albedo_model_fetch: spec and out_dir are required");
        goto done;
    }
    if (is_dir(spec)) {
        if (strlen(spec) + 1 > cap) {
            st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "output buffer too small for %s", spec);
            goto done;
        }
        memcpy(out_dir, spec, strlen(spec) + 1);
        return ALBEDO_OK;
    }
    albedo_fetch_params defaults = albedo_fetch_params_default();
    hub h;
    hub_setup(&h, params ? params : &defaults, &e);
    pthread_once(&curl_once, curl_init);
    if (curl_init_rc != CURLE_OK) {
        st = errf(&e, ALBEDO_ERR_NETWORK, "cannot initialise libcurl: %s", curl_easy_strerror(curl_init_rc));
        goto done;
    }
    const struct alias *a = NULL;
    for (size_t i = 0; i < sizeof aliases / sizeof aliases[0]; i++)
        if (!strcmp(spec, aliases[i].name)) a = &aliases[i];
    if (a) {
        st = fetch_model(&h, a->repo, a->revision, 0, a->name, out_dir, cap);
    } else if (looks_like_repo(spec)) {
        char repo[512], rev[256] = "main", name[800];
        const char *at = strchr(spec, '@');
        snprintf(repo, sizeof repo, "%.*s", at ? (int)(at - spec) : (int)strlen(spec), spec);
        if (at && at[1]) snprintf(rev, sizeof rev, "%s", at + 1);
        if (strstr(rev, "..")) {
            st = errf(&e, ALBEDO_ERR_INVALID_ARGUMENT, "%s: bad revision", spec);
            goto done;
        }
        snprintf(name, sizeof name, "%s@%s", repo, rev);
        for (char *p = name; *p; p++)
            if (*p == '/') *p = '-';
        st = fetch_model(&h, repo, rev, 1, name, out_dir, cap);
    } else {
        st = errf(&e, ALBEDO_ERR_IO,
                  "%s: no such model directory (nor moondream2, moondream3, moondream3.1, nor a Hugging Face "
                  "owner/repo[@revision])",
                  spec);
    }
done:
    if (st != ALBEDO_OK) error_set_last(e.msg);
    return st;
}
