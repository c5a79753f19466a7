/* make_corpus.c - regenerates the seed corpus of the fuzz targets.

   From the repository root:

       cc -O1 -I. fuzz/make_corpus.c -o /tmp/make_corpus -lm -pthread && /tmp/make_corpus fuzz/corpus

   writes (overwriting files of the same name, creating the directories):
     fuzz/corpus/load/    saved caches of several configurations (one
                          buffer each), and checkpoint chains: two bytes
                          (little-endian length of the base), the base,
                          then an increment (fuzz_load's split format);
     fuzz/corpus/import/  one byte picking fuzz_import's target
                          configuration, then an exported sequence (shape
                          2 layers x 2 KV heads x head_dim 8, every storage
                          type and page size, with and without token ids);
     fuzz/corpus/api/     op streams for fuzz_api (a descriptor, then ops
                          encoded as fuzz_api.c decodes them).
   Every file stays under 16 KB. The output is deterministic. Files the
   program no longer makes are not removed: to start afresh, delete
   fuzz/corpus/ first. */
#define _POSIX_C_SOURCE 200809L
#include "fuzz_util.h"

#include <errno.h>
#include <sys/stat.h>

static const char* out_root;
static size_t total_bytes;
static unsigned n_files;

static void ensure_dir(const char* path) {
    if (mkdir(path, 0755) != 0 && errno != EEXIST) {
        fprintf(stderr, "make_corpus: cannot create %s\n", path);
        exit(1);
    }
}

static void write_file(const char* dir, const char* name, const void* a, size_t na, const void* b, size_t nb) {
    char path[512];
    FILE* f;
    snprintf(path, sizeof path, "%s/%s/%s", out_root, dir, name);
    if (na + nb > 16384) {
        fprintf(stderr, "make_corpus: %s would be %zu bytes (over 16 KB)\n", path, na + nb);
        exit(1);
    }
    f = fopen(path, "wb");
    if (!f || (na && fwrite(a, 1, na, f) != na) || (nb && fwrite(b, 1, nb, f) != nb) || fclose(f) != 0) {
        fprintf(stderr, "make_corpus: cannot write %s\n", path);
        exit(1);
    }
    total_bytes += na + nb;
    n_files++;
    printf("%6zu  %s\n", na + nb, path);
}

#define CHECK(call) FZ_OK(call)

/* ------------------------------------------------------------------------ */
/* Building caches                                                          */
/* ------------------------------------------------------------------------ */

static llmkv_cache* make_cache(llmkv_dtype k, llmkv_dtype v, uint32_t ps, uint32_t layers, uint32_t heads,
                               uint32_t dim, uint32_t n_pages, uint32_t max_seqs, uint32_t prefix,
                               llmkv_storage storage) {
    llmkv_desc d;
    llmkv_cache* c = NULL;
    memset(&d, 0, sizeof d);
    d.k_dtype = k;
    d.v_dtype = v;
    d.page_size = ps;
    d.n_layers = layers;
    d.n_kv_heads = heads;
    d.head_dim = dim;
    d.n_pages = n_pages;
    d.max_seqs = max_seqs;
    d.prefix_index = prefix;
    d.max_pins = prefix ? 4 : 0;
    d.storage = storage;
    CHECK(llmkv_cache_create(&d, &c));
    return c;
}

static llmkv_token tok_a(uint32_t p) { return (llmkv_token)(p * 7 % 11); } /* fuzz_import's target tokens */

/* Extends s by n positions (token ids tok(p) + salt with a prefix index)
   and puts them in every layer unless write is 0; write 2 leaves the first
   new position of layer 0 unwritten (so its watermark stays behind). */
static void grow(llmkv_cache* c, llmkv_seq s, uint32_t n, llmkv_token salt, int write) {
    llmkv_desc d;
    llmkv_token t[128];
    static float kb[128 * 64], vb[128 * 64];
    uint32_t len, i, layer, row;
    CHECK(llmkv_cache_desc(c, &d));
    CHECK(llmkv_seq_length(c, s, &len));
    row = d.n_kv_heads * d.head_dim;
    FZ_ASSERT(n <= 128 && row <= 64);
    for (i = 0; i < n; ++i) t[i] = (llmkv_token)(tok_a(len + i) + salt);
    if (d.prefix_index) CHECK(llmkv_reserve_tokens(c, s, t, n));
    else CHECK(llmkv_reserve(c, s, n));
    if (!write || d.storage == LLMKV_STORAGE_METADATA_ONLY) return;
    for (layer = 0; layer < d.n_layers; ++layer) {
        uint32_t skip = write == 2 && layer == 0 && n > 1 ? 1 : 0;
        fz_fill(kb, 0, len + skip, n - skip, layer, 0, row, LLMKV_DTYPE_F32);
        fz_fill(vb, 0, len + skip, n - skip, layer, 1, row, LLMKV_DTYPE_F32);
        CHECK(llmkv_put(c, s, layer, n - skip, kb, 0, vb, 0, LLMKV_DTYPE_F32));
    }
}

static unsigned char* save(llmkv_cache* c, uint32_t flags, size_t* size) {
    uint64_t n = 0;
    unsigned char* buf;
    CHECK(llmkv_cache_save_size(c, flags, &n));
    buf = (unsigned char*)malloc((size_t)n);
    FZ_ASSERT(buf != NULL);
    CHECK(llmkv_cache_save_mem(c, flags, buf, (size_t)n, size));
    return buf;
}

static unsigned char* export_seq(llmkv_cache* c, llmkv_seq s, size_t* size) {
    uint64_t n = 0;
    unsigned char* buf;
    CHECK(llmkv_seq_export_size(c, s, &n));
    buf = (unsigned char*)malloc((size_t)n);
    FZ_ASSERT(buf != NULL);
    CHECK(llmkv_seq_export(c, s, buf, (size_t)n, size));
    return buf;
}

/* A small history: a (len_a), its fork b with a different tail, a prefix
   sequence from a's prompt freed again (cached pages), a pin. */
static void populate(llmkv_cache* c, uint32_t len_a, llmkv_seq* a_out, llmkv_seq* b_out) {
    llmkv_desc d;
    llmkv_seq a, b;
    CHECK(llmkv_cache_desc(c, &d));
    CHECK(llmkv_seq_create(c, &a));
    grow(c, a, len_a, 0, 1);
    CHECK(llmkv_fork(c, a, &b));
    CHECK(llmkv_truncate(c, b, len_a / 2));
    grow(c, b, 3, 50, 1);
    if (d.prefix_index) {
        llmkv_token t[64];
        llmkv_seq p;
        llmkv_pin pin;
        uint32_t i, cached = 0, pinned = 0;
        CHECK(llmkv_seq_publish(c, a, 1));
        for (i = 0; i < 64; ++i) t[i] = tok_a(i);
        CHECK(llmkv_seq_create_prefix(c, 0, t, len_a + 4, &p, &cached));
        grow(c, p, len_a + 4 - cached, 0, 1);
        CHECK(llmkv_seq_free(c, p));
        CHECK(llmkv_prefix_pin(c, 0, t, d.page_size, &pin, &pinned));
    }
    fz_check(c, "populate");
    *a_out = a;
    *b_out = b;
}

/* ------------------------------------------------------------------------ */
/* load                                                                     */
/* ------------------------------------------------------------------------ */

static void corpus_load(void) {
    static const struct {
        const char* name;
        llmkv_dtype k, v;
        uint32_t ps, layers, heads, dim, pages, seqs, prefix, len;
        llmkv_storage storage;
    } cf[] = {
        {"f16_ps16_prefix", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 2, 1, 8, 12, 4, 1, 40, LLMKV_STORAGE_DEFAULT},
        {"q8_q4_ps4_prefix", LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q4, 4, 2, 1, 16, 24, 4, 1, 30, LLMKV_STORAGE_DEFAULT},
        {"q4c_fp8_ps32_prefix", LLMKV_DTYPE_Q4C, LLMKV_DTYPE_FP8, 32, 1, 2, 8, 8, 4, 1, 40, LLMKV_STORAGE_DEFAULT},
        {"f32_bf16_ps1", LLMKV_DTYPE_F32, LLMKV_DTYPE_BF16, 1, 1, 1, 5, 48, 3, 0, 20, LLMKV_STORAGE_DEFAULT},
        {"bf16_q8_ps16", LLMKV_DTYPE_BF16, LLMKV_DTYPE_Q8, 16, 2, 2, 4, 10, 2, 0, 33, LLMKV_STORAGE_DEFAULT},
        {"fp8_f16_ps4_prefix", LLMKV_DTYPE_FP8, LLMKV_DTYPE_F16, 4, 1, 2, 8, 20, 4, 1, 18, LLMKV_STORAGE_DEFAULT},
        {"meta_f16_ps16_prefix", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 2, 2, 8, 12, 4, 1, 40,
         LLMKV_STORAGE_METADATA_ONLY},
    };
    uint32_t i;
    llmkv_cache* c;
    llmkv_seq a, b;
    unsigned char *base, *inc;
    size_t nb, ni;
    char name[128];
    for (i = 0; i < sizeof cf / sizeof cf[0]; ++i) {
        c = make_cache(cf[i].k, cf[i].v, cf[i].ps, cf[i].layers, cf[i].heads, cf[i].dim, cf[i].pages, cf[i].seqs,
                       cf[i].prefix, cf[i].storage);
        /* an empty cache */
        if (i < 2) {
            base = save(c, 0, &nb);
            snprintf(name, sizeof name, "empty_%s.bin", cf[i].name);
            write_file("load", name, base, nb, NULL, 0);
            free(base);
        }
        populate(c, cf[i].len, &a, &b);
        /* a checkpoint, more work, an increment */
        base = save(c, LLMKV_SAVE_CHECKPOINT, &nb);
        snprintf(name, sizeof name, "%s.bin", cf[i].name);
        write_file("load", name, base, nb, NULL, 0);
        grow(c, b, 5, 70, 1);
        CHECK(llmkv_truncate(c, a, cf[i].len - 3));
        if (cf[i].prefix) CHECK(llmkv_prefix_evict(c, 1, NULL));
        inc = save(c, LLMKV_SAVE_INCREMENTAL, &ni);
        {
            unsigned char hdr[2];
            hdr[0] = (unsigned char)(nb & 0xff);
            hdr[1] = (unsigned char)(nb >> 8 | (i & 1) << 7); /* odd ones: fix checksums (a no-op here) */
            FZ_ASSERT(nb < 32768);
            snprintf(name, sizeof name, "chain_%s.bin", cf[i].name);
            {
                unsigned char* both = (unsigned char*)malloc(2 + nb + ni);
                FZ_ASSERT(both != NULL);
                memcpy(both, hdr, 2);
                memcpy(both + 2, base, nb);
                memcpy(both + 2 + nb, inc, ni);
                write_file("load", name, both, 2 + nb + ni, NULL, 0);
                free(both);
            }
        }
        free(base);
        free(inc);
        llmkv_cache_destroy(c);
    }
}

/* ------------------------------------------------------------------------ */
/* import                                                                   */
/* ------------------------------------------------------------------------ */

static void corpus_import(void) {
    static const struct {
        const char* name;
        llmkv_dtype k, v;
        uint32_t ps, dim, prefix, len, write;
        uint8_t target; /* fuzz_import's byte 0 */
    } cf[] = {
        {"f16_ps16_tok_to0", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 8, 1, 45, 1, 0},
        {"f16_ps16_tok_to1", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 8, 1, 45, 1, 1},
        {"q8_q4_ps4_tok_to1", LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q4, 4, 8, 1, 30, 1, 1},
        {"q4c_fp8_ps32_tok_to2", LLMKV_DTYPE_Q4C, LLMKV_DTYPE_FP8, 32, 8, 1, 45, 1, 2},
        {"f32_bf16_ps1_to3", LLMKV_DTYPE_F32, LLMKV_DTYPE_BF16, 1, 8, 0, 20, 1, 3},
        {"bf16_f16_ps16_to4", LLMKV_DTYPE_BF16, LLMKV_DTYPE_F16, 16, 8, 0, 33, 1, 4},
        {"f16_ps16_tok_to5_tight", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 8, 1, 60, 1, 5},
        {"fp8_q8_ps16_tok_to6", LLMKV_DTYPE_FP8, LLMKV_DTYPE_Q8, 16, 8, 1, 40, 1, 6},
        {"f16_q4_ps4_to7", LLMKV_DTYPE_F16, LLMKV_DTYPE_Q4, 4, 8, 0, 25, 1, 7},
        {"f16_ps16_partial_to0", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 8, 1, 20, 2, 0},
        {"f16_ps16_unwritten_to1", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 8, 1, 20, 0, 1},
        {"f16_ps16_empty_to0", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 8, 1, 0, 1, 0},
        {"f16_ps16_oom_to1", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 8, 1, 30, 1, 1 | 1 << 3},
        {"f16_ps16_misaligned_to2", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 8, 1, 30, 1, 2 | 1 << 5},
        {"q8_q4_ps4_tok_fix_to2", LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q4, 4, 8, 1, 30, 1, 2 | 1 << 6},
        {"f32_bf16_ps1_fix_to0", LLMKV_DTYPE_F32, LLMKV_DTYPE_BF16, 1, 8, 0, 20, 1, 0 | 1 << 6},
        {"f16_ps16_long_to5_full", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 8, 0, 90, 1, 5}, /* OUT_OF_PAGES */
        {"dim4_mismatch_to0", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 4, 1, 10, 1, 0},
    };
    uint32_t i;
    char name[128];
    for (i = 0; i < sizeof cf / sizeof cf[0]; ++i) {
        llmkv_cache* c = make_cache(cf[i].k, cf[i].v, cf[i].ps, 2, 2, cf[i].dim, 96, 4, cf[i].prefix,
                                    LLMKV_STORAGE_DEFAULT);
        llmkv_seq s, f;
        unsigned char* buf;
        size_t n;
        CHECK(llmkv_seq_create(c, &s));
        if (cf[i].len) grow(c, s, cf[i].len, 0, (int)cf[i].write);
        if (i == 1) { /* a fork's export holds the shared pages too */
            CHECK(llmkv_fork(c, s, &f));
            grow(c, f, 4, 9, 1);
            s = f;
        }
        buf = export_seq(c, s, &n);
        snprintf(name, sizeof name, "%s.bin", cf[i].name);
        write_file("import", name, &cf[i].target, 1, buf, n);
        free(buf);
        llmkv_cache_destroy(c);
    }
}

/* ------------------------------------------------------------------------ */
/* api: op streams                                                          */
/* ------------------------------------------------------------------------ */

typedef struct stream {
    unsigned char b[4096];
    size_t n;
} stream;

static void put8(stream* s, uint32_t v) {
    FZ_ASSERT(s->n < sizeof s->b);
    s->b[s->n++] = (unsigned char)v;
}
/* A pick_len byte meaning v (<= typical): b % (typical + 1) == v, b >= 64. */
static void len8(stream* s, uint32_t v, uint32_t typical) {
    uint32_t b;
    FZ_ASSERT(v <= typical);
    for (b = 64; b < 256; ++b)
        if (b % (typical + 1) == v) {
            put8(s, b);
            return;
        }
    FZ_ASSERT(!"no byte encodes this length");
}

static void op_create(stream* s) { put8(s, FZ_OP_CREATE); }
static void op_reserve_tokens(stream* s, uint32_t seq, uint32_t n, uint32_t mode) {
    put8(s, FZ_OP_RESERVE_TOKENS); put8(s, seq); len8(s, n, 40); put8(s, mode);
}
static void op_reserve(stream* s, uint32_t seq, uint32_t n) {
    put8(s, FZ_OP_RESERVE); put8(s, seq); len8(s, n, 40); put8(s, 0);
}
/* put the newest n positions of `layer`, both parts, src type idx, padding */
static void op_put(stream* s, uint32_t seq, uint32_t layer, uint32_t n, uint32_t len, uint32_t src) {
    uint32_t b, nb;
    for (b = 0; b < 256; ++b) /* parts 1 + b % 3 = both, src type (b >> 2) & 3, no padding */
        if (b % 3 == 2 && ((b >> 2) & 3) == src && ((b >> 4) & 3) == 0) break;
    FZ_ASSERT(b < 256);
    put8(s, FZ_OP_PUT); put8(s, seq); put8(s, b); put8(s, layer);
    for (nb = 0; nb < 0xf8; ++nb)
        if (nb % (len + 1) == n) break;
    put8(s, nb);
}
static void op_publish(stream* s, uint32_t seq, uint32_t partial) { put8(s, FZ_OP_PUBLISH); put8(s, seq); put8(s, partial); }
static void op_fork(stream* s, uint32_t seq) { put8(s, FZ_OP_FORK); put8(s, seq); }
static void op_truncate(stream* s, uint32_t seq, uint32_t n, uint32_t len) { put8(s, FZ_OP_TRUNCATE); put8(s, seq); len8(s, n, len + 1); }
static void op_free(stream* s, uint32_t seq) { put8(s, FZ_OP_FREE); put8(s, seq); }
static void op_create_prefix(stream* s, uint32_t ns, uint32_t script, uint32_t n) {
    put8(s, FZ_OP_CREATE_PREFIX); put8(s, ns); put8(s, script); len8(s, n, 70);
}
static void op_match(stream* s, uint32_t ns, uint32_t script, uint32_t n) {
    put8(s, FZ_OP_MATCH); put8(s, ns); put8(s, script); len8(s, n, 70);
}
static void op_pin(stream* s, uint32_t script, uint32_t n) { put8(s, FZ_OP_PIN); put8(s, 0); put8(s, script); len8(s, n, 70); }
static void op_unpin(stream* s, uint32_t pin) { put8(s, FZ_OP_UNPIN); put8(s, pin); }
static void op_evict(stream* s, uint32_t b) { put8(s, FZ_OP_EVICT); put8(s, b); }
static void op_save_load(stream* s, uint32_t flags, uint32_t mode, uint32_t too_small) {
    put8(s, FZ_OP_SAVE_LOAD); put8(s, flags | mode << 2 | too_small << 4);
}
static void op_export_import(stream* s, uint32_t seq) { put8(s, FZ_OP_EXPORT_IMPORT); put8(s, seq); put8(s, 8); }
/* one sequence, q_len 2 */
static void op_attend(stream* s, uint32_t seq, uint32_t layer) {
    put8(s, FZ_OP_ATTEND); put8(s, 0); put8(s, layer); put8(s, 0x11); put8(s, 2); put8(s, seq);
}
static void op_gather(stream* s, uint32_t seq, uint32_t layer, uint32_t dst, uint32_t pos, uint32_t n, uint32_t len) {
    put8(s, FZ_OP_GATHER); put8(s, seq); put8(s, dst); put8(s, layer); len8(s, pos, len); len8(s, n, len - pos);
}
static void op_verify(stream* s) { put8(s, FZ_OP_VERIFY); }

static void desc6(stream* s, uint32_t k, uint32_t v, uint32_t ps_idx, uint32_t layers, uint32_t heads, uint32_t dim_idx,
                  uint32_t prefix, uint32_t pins, uint32_t pages, uint32_t seqs, uint32_t len_mode) {
    uint8_t d[6];
    uint32_t i;
    fz_desc_bytes(d, k, v, ps_idx, layers, heads, dim_idx, prefix, pins, pages, seqs, len_mode);
    for (i = 0; i < 6; ++i) put8(s, d[i]);
}

/* A prefix-cache session: prompt, generate, publish, a second request from
   the same prompt, fork, truncate, saves of every kind, export/import,
   attention, pins and eviction. */
static void session(stream* s, uint32_t layers, int prefix) {
    uint32_t l;
    op_create(s);                                   /* slot 0 */
    if (prefix) op_reserve_tokens(s, 0, 30, 0);
    else op_reserve(s, 0, 30);
    for (l = 0; l < layers; ++l) op_put(s, 0, l, 30, 30, 0);
    if (prefix) op_publish(s, 0, 1);
    op_save_load(s, LLMKV_SAVE_CHECKPOINT, 1, 1);   /* lockstep with the loaded copy */
    if (prefix) {
        op_create_prefix(s, 0, 0, 35);              /* slot 1 */
        op_match(s, 0, 2, 30);
    } else {
        op_fork(s, 0);                              /* slot 1 */
    }
    op_verify(s);
    op_fork(s, 0);                                  /* slot 2 */
    op_truncate(s, 2, 20, 30);
    if (prefix) op_reserve_tokens(s, 2, 7, 1 | 2 << 3);
    else op_reserve(s, 2, 7);
    for (l = 0; l < layers; ++l) op_put(s, 2, l, 7, 27, 1 + l % 2);
    op_gather(s, 2, 0, 0, 0, 27, 27);
    op_attend(s, 2, 0);
    op_save_load(s, LLMKV_SAVE_INCREMENTAL, 2, 0);  /* the loaded copy becomes the primary */
    op_export_import(s, 2);                         /* slot 3 */
    if (prefix) {
        op_pin(s, 0, 16);
        op_free(s, 0);
        op_evict(s, 0xff);
        op_unpin(s, 0);
        op_evict(s, 3);
    } else {
        op_free(s, 0);
    }
    op_save_load(s, 0, 2, 0);
    op_verify(s);
}

static void corpus_api(void) {
    stream s;
    uint32_t i;
    char name[64];

    memset(&s, 0, sizeof s);
    desc6(&s, 1, 1, 2, 2, 2, 0, 1, 2, 20, 4, 0); /* f16/f16, pages of 16, prefix */
    session(&s, 2, 1);
    write_file("api", "session_f16_ps16_prefix.bin", s.b, s.n, NULL, 0);

    memset(&s, 0, sizeof s);
    desc6(&s, 6, 5, 3, 1, 2, 0, 1, 1, 8, 4, 0); /* q4c/fp8, pages of 32, prefix */
    session(&s, 1, 1);
    write_file("api", "session_q4c_fp8_prefix.bin", s.b, s.n, NULL, 0);

    memset(&s, 0, sizeof s);
    desc6(&s, 4, 3, 1, 2, 1, 3, 0, 0, 30, 5, 0); /* q4/q8, pages of 4, dim 5 */
    session(&s, 2, 0);
    write_file("api", "session_q4_q8_ps4.bin", s.b, s.n, NULL, 0);

    memset(&s, 0, sizeof s);
    desc6(&s, 2, 0, 0, 1, 2, 2, 1, 4, 33, 8, 2); /* bf16/f32, pages of 1, prefix, max_seq_len 37 */
    session(&s, 1, 1);
    write_file("api", "session_bf16_f32_ps1_prefix.bin", s.b, s.n, NULL, 0);

    memset(&s, 0, sizeof s);
    desc6(&s, 3, 5, 2, 2, 1, 5, 1, 1, 6, 3, 0); /* q8/fp8, pages of 16, dim 40, tight: 6 pages, 3 sequences */
    session(&s, 2, 1);
    write_file("api", "session_q8_fp8_tight.bin", s.b, s.n, NULL, 0);

    /* Pseudo-random streams over a few descriptors. */
    for (i = 0; i < 4; ++i) {
        uint64_t h = 0x1234 + i;
        uint32_t j;
        memset(&s, 0, sizeof s);
        desc6(&s, i * 2 % 7, i % 6, i & 3, 1 + (i & 1), 1 + (i >> 1 & 1), i, 1, 2, 10 + i * 5, 4, 0);
        for (j = 0; j < 600; ++j) {
            h = fz_mix(h);
            put8(&s, (uint32_t)h);
        }
        snprintf(name, sizeof name, "random_%u.bin", i);
        write_file("api", name, s.b, s.n, NULL, 0);
    }
}

int main(int argc, char** argv) {
    char path[512];
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUT_DIR (fuzz/corpus)\n", argv[0]);
        return 2;
    }
    out_root = argv[1];
    ensure_dir(out_root);
    snprintf(path, sizeof path, "%s/load", out_root);
    ensure_dir(path);
    snprintf(path, sizeof path, "%s/import", out_root);
    ensure_dir(path);
    snprintf(path, sizeof path, "%s/api", out_root);
    ensure_dir(path);
    corpus_load();
    corpus_import();
    corpus_api();
    printf("%u files, %zu bytes\n", n_files, total_bytes);
    return 0;
}
