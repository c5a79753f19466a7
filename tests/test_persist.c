#define _POSIX_C_SOURCE 200809L
/* Persistence: llmkv_cache_save_* / llmkv_cache_load_*, incremental
   checkpoints, llmkv_seq_export* / llmkv_seq_import*.

   What is tested, and how the expected values are known:

   - Round trips (memory and files). A random workload (create, reserve,
     put, fork, truncate, free; with the prefix index also create_prefix,
     reserve_tokens, publish, pin/unpin and eviction under tight capacity)
     drives a cache; it is saved and loaded. The reference is the live
     original: every handle it issued (live or freed), its page tables,
     token ids, stored bytes (llmkv_gather DEFAULT, byte for byte),
     statistics, prefix matches and attention outputs must be the same in
     the loaded cache. Then the same random operations run on both caches
     in lockstep and every result code, returned handle, page table and
     gather is compared after each step: that proves the free list, slot
     reuse order and the LRU order were restored, not just the contents.
   - Incremental checkpoints: base + increments loaded together must equal
     the live cache (as above) and a full save taken at the same moment;
     chains that do not build on each other are refused (MISMATCH).
   - Export/import: K/V values are a deterministic function of (token,
     position, layer, part, element), so the source values are known here.
     Same configuration: byte-identical gathers. Conversions: the expected
     stored values are computed with llmkv_quantize/llmkv_dequantize (and
     llmkv_f32_to_f16) from the source's values, and checked against a
     reference cache of the target configuration filled by llmkv_put.
   - Hostile input: every truncation, every bit flip (every byte xor 0xFF
     at least), random garbage, a bumped major version: never LLMKV_OK,
     never a crash (ASan/valgrind), an import target left as it was.
   - Faults: an allocator failing its k-th call (test_falloc.h) for every k;
     llmkv_file_ops wrapping POSIX calls that fail the k-th call (any op),
     or write half the data and fail (a full disk). After a failed save the
     file at the path must be byte-identical to the previous version,
     except after a failed final directory flush, which docs/FORMAT.md
     says is reported with the new file in place. Any failing op of a
     load or import must fail it with LLMKV_ERR_IO, except closing a file
     that was read whole and checked, which the header says is ignored.
   - A child process killed with SIGKILL at a random moment while saving in
     a loop: the file must always load and equal one of the two states.
   - Crafted input (docs/FORMAT.md): section bodies edited and every
     checksum recomputed, so only the loader's own validation stands
     between the edit and the cache: BAD_FORMAT, or a cache that passes
     llmkv_cache_check and works. The same resealing makes a newer minor
     version with an unknown section (must load) and a thread-safe file
     (UNSUPPORTED under LLMKV_NO_THREADS).
   - Metadata-only caches, thread-safe caches, API misuse.

   Statistics are compared field by field, exactly, counters since
   creation included (the STAT section saves them). An llmkv file of the
   wrong kind (a whole cache given to import, an export or an increment
   given as buffers[0]) is MISMATCH; a zero-length input is BAD_FORMAT;
   garbage that keeps the 8-byte magic may be VERSION (the version is
   checked before the checksum).

   Every reserved position is put before anything is compared, so the
   comparisons never depend on what an unwritten slot holds. Pools are not
   cleared by the tests: a save that read uninitialised page bytes would
   show under valgrind.

   LLMKV_TEST_SCALE (default 1.0) scales the random workloads, the number
   of bit flips tried and the kill trials. */
#include "test_util.h"
#include "test_falloc.h"
#include "../llmkv.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#ifndef LLMKV_NO_THREADS
#include <pthread.h>
#endif

#define OK(t, call) TST_EQ(t, (call), LLMKV_OK)

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */
/* ------------------------------------------------------------------------ */

static double ps_scale(void) {
    const char* s = getenv("LLMKV_TEST_SCALE");
    double v = s ? atof(s) : 1.0;
    return v > 0.0 ? v : 1.0;
}

/* base * LLMKV_TEST_SCALE, at least `least`. */
static uint32_t ps_scaled(uint32_t base, uint32_t least) {
    double n = (double)base * ps_scale() + 0.5;
    uint32_t k = n > 4e9 ? 4000000000u : (uint32_t)n;
    return k < least ? least : k;
}

static int ps_check_ok(llmkv_cache* kv) {
    char msg[256];
    llmkv_result r;
    msg[0] = 0;
    r = llmkv_cache_check(kv, msg, sizeof msg);
    if (r != LLMKV_OK) fprintf(stderr, "  llmkv_cache_check: %s\n", msg);
    return r == LLMKV_OK;
}

static llmkv_stats ps_stats(llmkv_cache* kv) {
    llmkv_stats st;
    memset(&st, 0, sizeof st);
    if (llmkv_cache_stats(kv, &st) != LLMKV_OK) st.n_pages_total = 0xFFFFFFFFu;
    return st;
}

static llmkv_cache* ps_create(tst* t, const llmkv_desc* d) {
    llmkv_cache* kv = NULL;
    llmkv_result r = llmkv_cache_create(d, &kv);
    TST_EQ(t, r, LLMKV_OK);
    if (r != LLMKV_OK) return NULL;
    return kv;
}

/* The value of element e (of n_kv_heads * head_dim) of part (0 K, 1 V) of
   layer `layer` for token `tok` at position `pos`: in [-2, 2), with 20
   significant bits (so F16, BF16 and the quantized types round it). */
static float ps_val(llmkv_token tok, uint32_t pos, uint32_t layer, uint32_t part, uint32_t e) {
    uint32_t x = (uint32_t)tok * 2654435761u;
    x ^= pos * 40503u + 0x9e37u;
    x *= 2246822519u;
    x ^= (layer * 31u + part * 17u + e) * 3266489917u;
    x ^= x >> 15;
    x *= 668265263u;
    x ^= x >> 13;
    return (float)((double)(x >> 12) / 262144.0 - 2.0);
}

/* Whole saved cache into a new buffer (malloc); NULL on failure (checked). */
static unsigned char* ps_save(tst* t, llmkv_cache* kv, uint32_t flags, size_t* size) {
    uint64_t need = 0;
    size_t written = 0;
    unsigned char* buf;
    llmkv_result r;
    *size = 0;
    r = llmkv_cache_save_size(kv, flags, &need);
    TST_EQ(t, r, LLMKV_OK);
    if (r != LLMKV_OK || need == 0) return NULL;
    buf = (unsigned char*)malloc((size_t)need);
    if (!buf) return NULL;
    r = llmkv_cache_save_mem(kv, flags, buf, (size_t)need, &written);
    TST_EQ(t, r, LLMKV_OK);
    TST_EQ(t, written, need); /* save_size is exact */
    if (r != LLMKV_OK) {
        free(buf);
        return NULL;
    }
    *size = written;
    return buf;
}

static llmkv_result ps_load1(const unsigned char* buf, size_t size, llmkv_cache** out) {
    const void* b[1];
    size_t s[1];
    b[0] = buf;
    s[0] = size;
    return llmkv_cache_load_mem(b, s, 1, NULL, out);
}

/* One exported sequence into a new buffer (malloc). */
static unsigned char* ps_export(tst* t, llmkv_cache* kv, llmkv_seq s, size_t* size) {
    uint64_t need = 0;
    size_t written = 0;
    unsigned char* buf;
    llmkv_result r;
    *size = 0;
    r = llmkv_seq_export_size(kv, s, &need);
    TST_EQ(t, r, LLMKV_OK);
    if (r != LLMKV_OK || need == 0) return NULL;
    buf = (unsigned char*)malloc((size_t)need);
    if (!buf) return NULL;
    r = llmkv_seq_export(kv, s, buf, (size_t)need, &written);
    TST_EQ(t, r, LLMKV_OK);
    TST_EQ(t, written, need);
    if (r != LLMKV_OK) {
        free(buf);
        return NULL;
    }
    *size = written;
    return buf;
}

/* Bytes one gathered layer of `len` positions takes, K + V, with the
   DEFAULT dtype (at most 4 bytes per element: quantized parts come out as
   F32). The buffers are zeroed before each gather, so comparing them whole
   is sound whatever the element size. */
static size_t ps_layer_bytes(const llmkv_desc* d, uint32_t len) {
    return (size_t)len * d->n_kv_heads * d->head_dim * 4u * 2u;
}

/* Gathers every layer of s (DEFAULT dtype) into one new buffer. */
static unsigned char* ps_gather_all(llmkv_cache* kv, llmkv_seq s, size_t* bytes, llmkv_result* res) {
    llmkv_desc d;
    uint32_t len = 0, layer;
    size_t lb;
    unsigned char* p;
    *bytes = 0;
    *res = llmkv_cache_desc(kv, &d);
    if (*res != LLMKV_OK) return NULL;
    *res = llmkv_seq_length(kv, s, &len);
    if (*res != LLMKV_OK) return NULL;
    lb = ps_layer_bytes(&d, len);
    p = (unsigned char*)calloc(1, lb * d.n_layers + 1);
    if (!p) {
        *res = LLMKV_ERR_OUT_OF_MEMORY;
        return NULL;
    }
    for (layer = 0; layer < d.n_layers && len; ++layer) {
        unsigned char* k = p + lb * layer;
        *res = llmkv_gather(kv, s, layer, 0, len, k, 0, k + lb / 2, 0, LLMKV_DTYPE_DEFAULT);
        if (*res != LLMKV_OK) {
            free(p);
            return NULL;
        }
    }
    *bytes = lb * d.n_layers;
    return p;
}

/* Gathers positions [0, len) of every layer as F32: [layer][K|V][len][n_kv*D]. */
static float* ps_gather_f32(llmkv_cache* kv, llmkv_seq s, uint32_t len) {
    llmkv_desc d;
    uint32_t layer;
    size_t ne;
    float* p;
    if (llmkv_cache_desc(kv, &d) != LLMKV_OK) return NULL;
    ne = (size_t)len * d.n_kv_heads * d.head_dim;
    p = (float*)calloc(ne * 2 * d.n_layers + 1, sizeof(float));
    if (!p) return NULL;
    for (layer = 0; layer < d.n_layers && len; ++layer)
        if (llmkv_gather(kv, s, layer, 0, len, p + ne * 2 * layer, 0, p + ne * (2 * layer + 1), 0,
                         LLMKV_DTYPE_F32) != LLMKV_OK) {
            free(p);
            return NULL;
        }
    return p;
}

/* FNV-1a, for digests of a cache's content. */
static uint64_t ps_fnv(uint64_t h, const void* data, size_t n) {
    const unsigned char* p = (const unsigned char*)data;
    size_t i;
    for (i = 0; i < n; ++i) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

/* Puts positions [from, from + n) of s in every layer from toks (toks[i]
   is the token at position i), K and V. */
static llmkv_result ps_put_range(llmkv_cache* kv, llmkv_seq s, const llmkv_token* toks, uint32_t from, uint32_t n) {
    llmkv_desc d;
    uint32_t layer, i, e, ne, len = 0;
    float* k;
    float* v;
    llmkv_result r;
    if (n == 0) return LLMKV_OK;
    r = llmkv_cache_desc(kv, &d);
    if (r != LLMKV_OK) return r;
    r = llmkv_seq_length(kv, s, &len);
    if (r != LLMKV_OK) return r;
    if (from + n != len) return LLMKV_ERR_OUT_OF_RANGE; /* put writes the newest positions */
    ne = d.n_kv_heads * d.head_dim;
    k = (float*)malloc((size_t)n * ne * sizeof(float));
    v = (float*)malloc((size_t)n * ne * sizeof(float));
    if (!k || !v) {
        free(k);
        free(v);
        return LLMKV_ERR_OUT_OF_MEMORY;
    }
    for (layer = 0; layer < d.n_layers && r == LLMKV_OK; ++layer) {
        for (i = 0; i < n; ++i)
            for (e = 0; e < ne; ++e) {
                k[(size_t)i * ne + e] = ps_val(toks[from + i], from + i, layer, 0, e);
                v[(size_t)i * ne + e] = ps_val(toks[from + i], from + i, layer, 1, e);
            }
        r = llmkv_put(kv, s, layer, n, k, 0, v, 0, LLMKV_DTYPE_F32);
    }
    free(k);
    free(v);
    return r;
}

/* A sequence of n tokens toks, reserved (with token ids when the cache has
   the index) and written. */
static llmkv_result ps_make_seq(llmkv_cache* kv, const llmkv_token* toks, uint32_t n, llmkv_seq* out) {
    llmkv_desc d;
    llmkv_result r = llmkv_cache_desc(kv, &d);
    if (r != LLMKV_OK) return r;
    r = llmkv_seq_create(kv, out);
    if (r != LLMKV_OK) return r;
    r = d.prefix_index ? llmkv_reserve_tokens(kv, *out, toks, n) : llmkv_reserve(kv, *out, n);
    if (r == LLMKV_OK && d.storage != LLMKV_STORAGE_METADATA_ONLY) r = ps_put_range(kv, *out, toks, 0, n);
    return r;
}

/* Equal statistics, field by field. Counters that count events since
   creation (n_evictions, prompt_tokens_*, hit_rate) are compared as
   increments over the bases given (NULL: compared as they are). */
static int ps_stats_same(tst* t, qlog* lg, const llmkv_stats* a, const llmkv_stats* b, const llmkv_stats* base_a,
                         const llmkv_stats* base_b, const char* when) {
    int bad = 0;
#define PS_SF(f)                                                                                                  \
    if (a->f != b->f) {                                                                                           \
        QFAIL(t, lg, "%s: stats.%s %llu vs %llu", when, #f, (unsigned long long)a->f, (unsigned long long)b->f);  \
        bad = 1;                                                                                                  \
    }
#define PS_SC(f)                                                                                                  \
    if ((a->f - (base_a ? base_a->f : 0)) != (b->f - (base_b ? base_b->f : 0))) {                                 \
        QFAIL(t, lg, "%s: stats.%s %llu vs %llu (bases %llu, %llu)", when, #f, (unsigned long long)a->f,          \
              (unsigned long long)b->f, (unsigned long long)(base_a ? base_a->f : 0),                             \
              (unsigned long long)(base_b ? base_b->f : 0));                                                      \
        bad = 1;                                                                                                  \
    }
    PS_SF(n_pages_total)
    PS_SF(n_pages_free)
    PS_SF(n_pages_used)
    PS_SF(n_pages_shared)
    PS_SF(n_seqs)
    PS_SF(n_pending_copies)
    PS_SF(page_bytes)
    PS_SF(pool_bytes)
    PS_SF(used_bytes)
    PS_SF(metadata_bytes)
    PS_SF(staging_bytes)
    PS_SF(n_tokens)
    PS_SF(n_slots_used)
    PS_SF(n_slots_unused)
    PS_SF(n_pages_cached)
    PS_SF(n_pages_evictable)
    PS_SF(n_pages_pinned)
    PS_SF(n_pins)
    PS_SC(n_evictions)
    PS_SC(prompt_tokens_matched)
    PS_SC(prompt_tokens_missed)
    if (!base_a && !base_b && a->hit_rate != b->hit_rate) {
        QFAIL(t, lg, "%s: stats.hit_rate %g vs %g", when, a->hit_rate, b->hit_rate);
        bad = 1;
    }
#undef PS_SF
#undef PS_SC
    return !bad;
}

/* Gathers of sequence s equal in two caches (DEFAULT dtype, every layer). */
static int ps_gathers_same(llmkv_cache* a, llmkv_cache* b, llmkv_seq s) {
    size_t na = 0, nb = 0;
    llmkv_result ra, rb;
    unsigned char* ga = ps_gather_all(a, s, &na, &ra);
    unsigned char* gb = ps_gather_all(b, s, &nb, &rb);
    int same = ra == LLMKV_OK && rb == LLMKV_OK && na == nb && (na == 0 || memcmp(ga, gb, na) == 0);
    free(ga);
    free(gb);
    return same;
}

/* Gathers of s in one cache equal a snapshot (ps_gather_all). */
static int ps_gather_is(llmkv_cache* kv, llmkv_seq s, const unsigned char* snap, size_t bytes) {
    size_t n = 0;
    llmkv_result r;
    unsigned char* g = ps_gather_all(kv, s, &n, &r);
    int same = r == LLMKV_OK && n == bytes && (n == 0 || memcmp(g, snap, n) == 0);
    free(g);
    return same;
}

/* ------------------------------------------------------------------------ */
/* A random workload, run on one cache or in lockstep on several            */
/* ------------------------------------------------------------------------ */

#define PW_SEQS 40   /* tracked handles, live and freed */
#define PW_PINS 12
#define PW_LEN 160   /* desc.max_seq_len of the workload caches */
#define PW_DOCS 4
#define PW_KV 3      /* caches driven in lockstep */

typedef struct pw_seq {
    llmkv_seq h;
    int live;
    int doc;                   /* the document it continues, or -1 */
    uint64_t ns;
    llmkv_token toks[PW_LEN];  /* token of every position (-1 unknown) */
} pw_seq;

typedef struct pw {
    tst* t;
    qlog lg;
    llmkv_desc d;
    int index, meta;
    pw_seq s[PW_SEQS];
    uint32_t n_s;
    llmkv_pin pins[PW_PINS];
    int pin_live[PW_PINS];
    uint32_t n_pins;
    llmkv_token docs[PW_DOCS][PW_LEN];
    tst_rng rng;
    llmkv_cache* kv[PW_KV];
    uint32_t n_kv;
    const char* phase;
    uint32_t step;
    char what[128];
    int bad;
} pw;

typedef struct pw_cfg {
    const char* name;
    llmkv_dtype kt, vt;
    uint32_t ps, n_pages, head_dim, max_seqs;
    int index, meta;
} pw_cfg;

static llmkv_desc pw_desc(const pw_cfg* c) {
    llmkv_desc d = tst_desc(2, 2, c->head_dim, c->ps, c->n_pages, c->kt, c->vt);
    d.max_seqs = c->max_seqs;
    d.max_seq_len = PW_LEN;
    d.prefix_index = (uint32_t)c->index;
    d.max_pins = 4;
    d.storage = c->meta ? LLMKV_STORAGE_METADATA_ONLY : LLMKV_STORAGE_DEFAULT;
    return d;
}

static void pw_fail(pw* w, const char* fmt, long long a, long long b) {
    char msg[160];
    snprintf(msg, sizeof msg, fmt, a, b);
    QFAIL(w->t, &w->lg, "%s step %u (%s): %s", w->phase, w->step, w->what, msg);
    w->bad = 1;
}

/* Results of the same call on every lockstep cache must agree. */
static int pw_agree(pw* w, const llmkv_result* r, const char* call) {
    uint32_t i;
    for (i = 1; i < w->n_kv; ++i)
        if (r[i] != r[0]) {
            char f[96];
            snprintf(f, sizeof f, "%s: cache 0 says %%lld, cache %u says %%lld", call, i);
            pw_fail(w, f, (long long)r[0], (long long)r[i]);
            return 0;
        }
    return 1;
}

static void pw_init(pw* w, tst* t, const llmkv_desc* d, unsigned long long seed) {
    uint32_t i, j;
    memset(w, 0, sizeof *w);
    w->t = t;
    w->d = *d;
    w->index = d->prefix_index != 0;
    w->meta = d->storage == LLMKV_STORAGE_METADATA_ONLY;
    w->rng.s = seed;
    w->phase = "workload";
    /* Documents over a small alphabet: 1 and 2 share prefixes of 0 (to
       positions 21 and 6), 3 is unrelated. */
    for (j = 0; j < PW_LEN; ++j) w->docs[0][j] = (llmkv_token)tst_below(&w->rng, 6);
    memcpy(w->docs[1], w->docs[0], sizeof w->docs[0]);
    memcpy(w->docs[2], w->docs[0], sizeof w->docs[0]);
    w->docs[1][21] = (w->docs[0][21] + 1) % 6;
    w->docs[2][6] = (w->docs[0][6] + 1) % 6;
    for (j = 0; j < PW_LEN; ++j) w->docs[3][j] = (llmkv_token)(100 + tst_below(&w->rng, 6));
    for (i = 0; i < PW_SEQS; ++i) w->s[i].doc = -1;
}

static uint32_t pw_len(pw* w, uint32_t c, llmkv_seq h) {
    uint32_t n = 0;
    if (llmkv_seq_length(w->kv[c], h, &n) != LLMKV_OK) return 0;
    return n;
}

/* A tracked entry for a new handle (drops the oldest freed one when full). */
static pw_seq* pw_add(pw* w, llmkv_seq h) {
    pw_seq* s;
    if (w->n_s == PW_SEQS) {
        uint32_t i;
        for (i = 0; i < w->n_s && w->s[i].live; ++i) {
        }
        if (i == w->n_s) return NULL;
        memmove(&w->s[i], &w->s[i + 1], (w->n_s - i - 1) * sizeof(pw_seq));
        w->n_s--;
    }
    s = &w->s[w->n_s++];
    memset(s, 0, sizeof *s);
    s->h = h;
    s->live = 1;
    s->doc = -1;
    return s;
}

static pw_seq* pw_pick_live(pw* w) {
    uint32_t i, n = 0, k;
    for (i = 0; i < w->n_s; ++i) n += w->s[i].live != 0;
    if (!n) return NULL;
    k = tst_below(&w->rng, n);
    for (i = 0; i < w->n_s; ++i)
        if (w->s[i].live && k-- == 0) return &w->s[i];
    return NULL;
}

/* Writes positions [from, len) of s in every cache: puts (host), or
   mark_written (metadata-only with the index). A failed write truncates
   the sequence back to `from` so that no unwritten slot is ever read. */
static void pw_write(pw* w, pw_seq* s, uint32_t from) {
    llmkv_result r[PW_KV];
    uint32_t c, len = pw_len(w, 0, s->h);
    if (len <= from) return;
    for (c = 0; c < w->n_kv; ++c) {
        if (w->meta)
            r[c] = w->index ? llmkv_seq_mark_written(w->kv[c], s->h, len) : LLMKV_OK;
        else
            r[c] = ps_put_range(w->kv[c], s->h, s->toks, from, len - from);
    }
    if (!pw_agree(w, r, "write")) return;
    if (r[0] != LLMKV_OK) {
        for (c = 0; c < w->n_kv; ++c) r[c] = llmkv_truncate(w->kv[c], s->h, from);
        pw_agree(w, r, "truncate after a failed write");
        if (r[0] != LLMKV_OK) pw_fail(w, "truncate after a failed write: %lld %lld", (long long)r[0], 0);
    }
}

/* Tokens for positions [len, len + n) of s: its document's, else random. */
static void pw_next_tokens(pw* w, pw_seq* s, uint32_t len, uint32_t n, int unknown) {
    uint32_t i;
    for (i = 0; i < n && len + i < PW_LEN; ++i) {
        if (unknown) s->toks[len + i] = -1;
        else if (s->doc >= 0) s->toks[len + i] = w->docs[s->doc][len + i];
        else s->toks[len + i] = (llmkv_token)(200 + tst_below(&w->rng, 50));
    }
}

static void pw_op_create(pw* w) {
    llmkv_result r[PW_KV];
    llmkv_seq h[PW_KV];
    uint32_t nc[PW_KV];
    uint32_t c;
    pw_seq* s;
    if (w->index && tst_below(&w->rng, 3) != 0) {
        int doc = (int)tst_below(&w->rng, PW_DOCS);
        uint64_t ns = tst_below(&w->rng, 4) == 0 ? 7u : 0u;
        uint32_t n = tst_below(&w->rng, 70);
        snprintf(w->what, sizeof w->what, "create_prefix doc %d ns %u n %u", doc, (unsigned)ns, n);
        for (c = 0; c < w->n_kv; ++c) {
            h[c].id = 0;
            nc[c] = 0;
            r[c] = llmkv_seq_create_prefix(w->kv[c], ns, w->docs[doc], n, &h[c], &nc[c]);
        }
        if (!pw_agree(w, r, "create_prefix")) return;
        for (c = 1; c < w->n_kv; ++c) {
            if (h[c].id != h[0].id) pw_fail(w, "create_prefix handle %lld vs %lld", h[0].id, h[c].id);
            if (nc[c] != nc[0]) pw_fail(w, "create_prefix n_cached %lld vs %lld", nc[0], nc[c]);
        }
        if (r[0] != LLMKV_OK) return;
        s = pw_add(w, h[0]);
        if (!s) return;
        s->doc = doc;
        s->ns = ns;
        memcpy(s->toks, w->docs[doc], sizeof s->toks);
        if (n > nc[0]) {
            for (c = 0; c < w->n_kv; ++c) r[c] = llmkv_reserve_tokens(w->kv[c], s->h, w->docs[doc] + nc[0], n - nc[0]);
            if (!pw_agree(w, r, "reserve_tokens (prompt)")) return;
            if (r[0] == LLMKV_OK) pw_write(w, s, nc[0]);
        }
        return;
    }
    snprintf(w->what, sizeof w->what, "create");
    for (c = 0; c < w->n_kv; ++c) {
        h[c].id = 0;
        r[c] = llmkv_seq_create(w->kv[c], &h[c]);
    }
    if (!pw_agree(w, r, "create")) return;
    for (c = 1; c < w->n_kv; ++c)
        if (h[c].id != h[0].id) pw_fail(w, "create handle %lld vs %lld", h[0].id, h[c].id);
    if (r[0] == LLMKV_OK) {
        s = pw_add(w, h[0]);
        if (s && tst_below(&w->rng, 2)) s->doc = (int)tst_below(&w->rng, PW_DOCS);
    }
}

static void pw_op_grow(pw* w, pw_seq* s) {
    llmkv_result r[PW_KV];
    uint32_t c, len = pw_len(w, 0, s->h);
    uint32_t n = 1 + tst_below(&w->rng, 2 * w->d.page_size + 3);
    int unknown = w->index && tst_below(&w->rng, 10) == 0;
    if (tst_below(&w->rng, 8) == 0) n = 1 + tst_below(&w->rng, 60);
    snprintf(w->what, sizeof w->what, "grow seq %u (len %u) by %u%s", s->h.id, len, n, unknown ? " unknown" : "");
    if (len + n <= PW_LEN) pw_next_tokens(w, s, len, n, unknown);
    for (c = 0; c < w->n_kv; ++c) {
        if (w->index)
            r[c] = llmkv_reserve_tokens(w->kv[c], s->h, (len + n <= PW_LEN && !unknown) ? s->toks + len : NULL, n);
        else
            r[c] = llmkv_reserve(w->kv[c], s->h, n);
    }
    if (!pw_agree(w, r, "reserve")) return;
    if (r[0] == LLMKV_OK) pw_write(w, s, len);
}

static void pw_op_rewrite(pw* w, pw_seq* s) {
    llmkv_result r[PW_KV];
    uint32_t c, len = pw_len(w, 0, s->h), n;
    if (w->meta || len == 0) return;
    n = 1 + tst_below(&w->rng, len < 40 ? len : 40);
    snprintf(w->what, sizeof w->what, "rewrite newest %u of seq %u", n, s->h.id);
    for (c = 0; c < w->n_kv; ++c) r[c] = ps_put_range(w->kv[c], s->h, s->toks, len - n, n);
    pw_agree(w, r, "put (rewrite)");
}

static void pw_op_fork(pw* w, pw_seq* s) {
    llmkv_result r[PW_KV];
    llmkv_seq h[PW_KV];
    uint32_t c;
    pw_seq* f;
    snprintf(w->what, sizeof w->what, "fork seq %u", s->h.id);
    for (c = 0; c < w->n_kv; ++c) {
        h[c].id = 0;
        r[c] = llmkv_fork(w->kv[c], s->h, &h[c]);
    }
    if (!pw_agree(w, r, "fork")) return;
    for (c = 1; c < w->n_kv; ++c)
        if (h[c].id != h[0].id) pw_fail(w, "fork handle %lld vs %lld", h[0].id, h[c].id);
    if (r[0] != LLMKV_OK) return;
    {
        pw_seq copy = *s;
        f = pw_add(w, h[0]);
        if (!f) return;
        *f = copy;
        f->h = h[0];
        f->live = 1;
    }
}

static void pw_op_truncate(pw* w, pw_seq* s) {
    llmkv_result r[PW_KV];
    uint32_t c, len = pw_len(w, 0, s->h), n = tst_below(&w->rng, len + 1);
    snprintf(w->what, sizeof w->what, "truncate seq %u from %u to %u", s->h.id, len, n);
    for (c = 0; c < w->n_kv; ++c) r[c] = llmkv_truncate(w->kv[c], s->h, n);
    pw_agree(w, r, "truncate");
}

static void pw_op_free(pw* w, pw_seq* s) {
    llmkv_result r[PW_KV];
    uint32_t c;
    snprintf(w->what, sizeof w->what, "free seq %u", s->h.id);
    for (c = 0; c < w->n_kv; ++c) r[c] = llmkv_seq_free(w->kv[c], s->h);
    if (pw_agree(w, r, "free") && r[0] == LLMKV_OK) s->live = 0;
}

static void pw_op_publish(pw* w, pw_seq* s) {
    llmkv_result r[PW_KV];
    uint32_t c;
    int partial = (int)tst_below(&w->rng, 2);
    snprintf(w->what, sizeof w->what, "publish seq %u partial %d", s->h.id, partial);
    for (c = 0; c < w->n_kv; ++c) r[c] = llmkv_seq_publish(w->kv[c], s->h, partial);
    pw_agree(w, r, "publish");
}

static void pw_op_pin(pw* w) {
    llmkv_result r[PW_KV];
    llmkv_pin p[PW_KV];
    uint32_t np[PW_KV];
    uint32_t c, doc = tst_below(&w->rng, PW_DOCS), n = tst_below(&w->rng, 80);
    uint64_t ns = tst_below(&w->rng, 4) == 0 ? 7u : 0u;
    snprintf(w->what, sizeof w->what, "pin doc %u ns %u n %u", doc, (unsigned)ns, n);
    for (c = 0; c < w->n_kv; ++c) {
        p[c].id = 0;
        np[c] = 0;
        r[c] = llmkv_prefix_pin(w->kv[c], ns, w->docs[doc], n, &p[c], &np[c]);
    }
    if (!pw_agree(w, r, "pin")) return;
    for (c = 1; c < w->n_kv; ++c) {
        if (p[c].id != p[0].id) pw_fail(w, "pin handle %lld vs %lld", p[0].id, p[c].id);
        if (np[c] != np[0]) pw_fail(w, "pin n_pinned %lld vs %lld", np[0], np[c]);
    }
    if (r[0] == LLMKV_OK) {
        if (w->n_pins == PW_PINS) {
            uint32_t i;
            for (i = 0; i < w->n_pins && w->pin_live[i]; ++i) {
            }
            if (i == w->n_pins) return; /* cannot happen: max_pins is 4 */
            memmove(&w->pins[i], &w->pins[i + 1], (w->n_pins - i - 1) * sizeof(llmkv_pin));
            memmove(&w->pin_live[i], &w->pin_live[i + 1], (w->n_pins - i - 1) * sizeof(int));
            w->n_pins--;
        }
        w->pins[w->n_pins] = p[0];
        w->pin_live[w->n_pins++] = 1;
    }
}

static void pw_op_unpin(pw* w) {
    llmkv_result r[PW_KV];
    uint32_t c, i;
    if (!w->n_pins) return;
    i = tst_below(&w->rng, w->n_pins);
    snprintf(w->what, sizeof w->what, "unpin %u (%s)", w->pins[i].id, w->pin_live[i] ? "live" : "released");
    for (c = 0; c < w->n_kv; ++c) r[c] = llmkv_prefix_unpin(w->kv[c], w->pins[i]);
    if (!pw_agree(w, r, "unpin")) return;
    if (r[0] != (w->pin_live[i] ? LLMKV_OK : LLMKV_ERR_STALE_HANDLE))
        pw_fail(w, "unpin returned %lld (live %lld)", (long long)r[0], (long long)w->pin_live[i]);
    w->pin_live[i] = 0;
}

static void pw_op_evict(pw* w) {
    llmkv_result r[PW_KV];
    uint32_t ne[PW_KV];
    uint32_t c, n = tst_below(&w->rng, 6) == 0 ? UINT32_MAX : tst_below(&w->rng, 4);
    snprintf(w->what, sizeof w->what, "evict %u", n);
    for (c = 0; c < w->n_kv; ++c) {
        ne[c] = 0;
        r[c] = llmkv_prefix_evict(w->kv[c], n, &ne[c]);
    }
    if (!pw_agree(w, r, "evict")) return;
    for (c = 1; c < w->n_kv; ++c)
        if (ne[c] != ne[0]) pw_fail(w, "evicted %lld vs %lld", ne[0], ne[c]);
}

static void pw_op_take(pw* w) {
    llmkv_copy_cmd cmds[PW_KV][4];
    uint32_t n[PW_KV];
    llmkv_result r[PW_KV];
    uint32_t c, max = 1 + tst_below(&w->rng, 4);
    snprintf(w->what, sizeof w->what, "copy_cmds_take %u", max);
    memset(cmds, 0, sizeof cmds);
    for (c = 0; c < w->n_kv; ++c) {
        n[c] = 0;
        r[c] = llmkv_copy_cmds_take(w->kv[c], cmds[c], max, &n[c]);
    }
    if (!pw_agree(w, r, "copy_cmds_take")) return;
    for (c = 1; c < w->n_kv; ++c)
        if (n[c] != n[0] || memcmp(cmds[c], cmds[0], sizeof cmds[0]) != 0)
            pw_fail(w, "copy commands differ (%lld vs %lld taken)", n[0], n[c]);
}

/* A freed handle: every cache must still call it stale. */
static void pw_op_stale(pw* w) {
    llmkv_result r[PW_KV];
    uint32_t c, i;
    for (i = 0; i < w->n_s && w->s[i].live; ++i) {
    }
    if (i == w->n_s) return;
    snprintf(w->what, sizeof w->what, "reserve on freed seq %u", w->s[i].h.id);
    for (c = 0; c < w->n_kv; ++c) r[c] = llmkv_reserve(w->kv[c], w->s[i].h, 1);
    pw_agree(w, r, "reserve (stale)");
    if (r[0] != LLMKV_ERR_STALE_HANDLE) pw_fail(w, "reserve on a freed handle: %lld", (long long)r[0], 0);
}

/* One random operation on every cache of the world. */
static void pw_op(pw* w) {
    uint32_t op = tst_below(&w->rng, 100);
    pw_seq* s = pw_pick_live(w);
    w->what[0] = 0;
    if (op < 12 || !s) pw_op_create(w);
    else if (op < 40) pw_op_grow(w, s);
    else if (op < 46) pw_op_rewrite(w, s);
    else if (op < 54) pw_op_fork(w, s);
    else if (op < 61) pw_op_truncate(w, s);
    else if (op < 70) pw_op_free(w, s);
    else if (op < 72) pw_op_stale(w);
    else if (w->meta && op < 80) pw_op_take(w);
    else if (!w->index) pw_op_grow(w, s);
    else if (op < 80) pw_op_publish(w, s);
    else if (op < 86) pw_op_pin(w);
    else if (op < 92) pw_op_unpin(w);
    else pw_op_evict(w);
    w->step++;
}

/* Compares cache a with cache b through every tracked handle: lengths,
   page tables, token ids, stored bytes, statistics (every field, the
   counters since creation included: the format saves them), prefix
   matches. */
static int pw_same(pw* w, llmkv_cache* a, llmkv_cache* b) {
    uint32_t i, pa[PW_LEN], pb[PW_LEN];
    char when[200];
    int bad = 0;
    llmkv_stats sa = ps_stats(a), sb = ps_stats(b);
    snprintf(when, sizeof when, "%s step %u (%s)", w->phase, w->step, w->what);
    if (!ps_stats_same(w->t, &w->lg, &sa, &sb, NULL, NULL, when)) bad = 1;
    for (i = 0; i < w->n_s; ++i) {
        llmkv_seq h = w->s[i].h;
        uint32_t la = 0, lb = 0, na = 0, nb = 0;
        llmkv_result ra = llmkv_seq_length(a, h, &la), rb = llmkv_seq_length(b, h, &lb);
        if (ra != rb || la != lb) {
            QFAIL(w->t, &w->lg, "%s: seq %u: length %d/%u vs %d/%u", when, h.id, (int)ra, la, (int)rb, lb);
            bad = 1;
            continue;
        }
        if (ra != (w->s[i].live ? LLMKV_OK : LLMKV_ERR_STALE_HANDLE)) {
            QFAIL(w->t, &w->lg, "%s: seq %u (live %d): length returns %d", when, h.id, w->s[i].live, (int)ra);
            bad = 1;
            continue;
        }
        if (ra != LLMKV_OK) continue;
        memset(pa, 0, sizeof pa);
        memset(pb, 0, sizeof pb);
        ra = llmkv_seq_pages(a, h, pa, PW_LEN, &na);
        rb = llmkv_seq_pages(b, h, pb, PW_LEN, &nb);
        if (ra != LLMKV_OK || rb != LLMKV_OK || na != nb || memcmp(pa, pb, sizeof pa) != 0) {
            QFAIL(w->t, &w->lg, "%s: seq %u: page tables differ (%u vs %u pages)", when, h.id, na, nb);
            bad = 1;
        }
        if (w->index && la) {
            llmkv_token ta[PW_LEN], tb[PW_LEN];
            memset(ta, 0, sizeof ta);
            memset(tb, 0, sizeof tb);
            ra = llmkv_seq_tokens(a, h, 0, la, ta);
            rb = llmkv_seq_tokens(b, h, 0, la, tb);
            if (ra != LLMKV_OK || rb != LLMKV_OK || memcmp(ta, tb, sizeof ta) != 0) {
                QFAIL(w->t, &w->lg, "%s: seq %u: token ids differ", when, h.id);
                bad = 1;
            }
        }
        if (!w->meta && !ps_gathers_same(a, b, h)) {
            QFAIL(w->t, &w->lg, "%s: seq %u: gathers differ", when, h.id);
            bad = 1;
        }
    }
    if (w->index) {
        uint32_t doc, ns;
        for (doc = 0; doc < PW_DOCS; ++doc)
            for (ns = 0; ns < 2; ++ns) {
                uint32_t ma = 0xFFFFFFFFu, mb = 0xFFFFFFFEu;
                llmkv_result ra = llmkv_prefix_match(a, ns ? 7u : 0u, w->docs[doc], PW_LEN, &ma);
                llmkv_result rb = llmkv_prefix_match(b, ns ? 7u : 0u, w->docs[doc], PW_LEN, &mb);
                if (ra != LLMKV_OK || rb != LLMKV_OK || ma != mb) {
                    QFAIL(w->t, &w->lg, "%s: prefix_match doc %u ns %u: %u vs %u", when, doc, ns, ma, mb);
                    bad = 1;
                }
            }
    }
    if (!ps_check_ok(a) || !ps_check_ok(b)) {
        QFAIL(w->t, &w->lg, "%s: llmkv_cache_check failed", when);
        bad = 1;
    }
    if (bad) w->bad = 1;
    return !bad;
}

/* Runs n random operations on w->kv[0 .. n_kv), comparing every cache with
   the first after each step. */
static void pw_run(pw* w, uint32_t n, const char* phase) {
    uint32_t i, c;
    w->phase = phase;
    w->step = 0;
    for (i = 0; i < n && !w->bad; ++i) {
        pw_op(w);
        for (c = 1; c < w->n_kv && !w->bad; ++c) pw_same(w, w->kv[0], w->kv[c]);
    }
}

/* Releases every live pin in every cache, comparing results (pin handles
   restored by a load must be releasable). */
static void pw_unpin_all(pw* w) {
    uint32_t i, c;
    llmkv_result r[PW_KV];
    w->phase = "unpin all";
    for (i = 0; i < w->n_pins; ++i) {
        if (!w->pin_live[i]) continue;
        snprintf(w->what, sizeof w->what, "unpin %u", w->pins[i].id);
        for (c = 0; c < w->n_kv; ++c) r[c] = llmkv_prefix_unpin(w->kv[c], w->pins[i]);
        if (pw_agree(w, r, "unpin") && r[0] != LLMKV_OK) pw_fail(w, "unpin of a live pin: %lld", (long long)r[0], 0);
        w->pin_live[i] = 0;
    }
}

/* The saved configuration fields of two effective descriptors agree. */
static int ps_desc_same(tst* t, llmkv_cache* a, llmkv_cache* b) {
    llmkv_desc da, db;
    int bad = 0;
    memset(&da, 0, sizeof da);
    memset(&db, 0, sizeof db);
    OK(t, llmkv_cache_desc(a, &da));
    OK(t, llmkv_cache_desc(b, &db));
#define PS_DF(f)                                                                                      \
    if (da.f != db.f) {                                                                               \
        fprintf(stderr, "  desc.%s: %llu vs %llu\n", #f, (unsigned long long)da.f, (unsigned long long)db.f); \
        bad = 1;                                                                                      \
    }
    PS_DF(n_layers)
    PS_DF(n_kv_heads)
    PS_DF(head_dim)
    PS_DF(page_size)
    PS_DF(n_pages)
    PS_DF(k_dtype)
    PS_DF(v_dtype)
    PS_DF(storage)
    PS_DF(max_seqs)
    PS_DF(max_seq_len)
    PS_DF(max_pending_copies)
    PS_DF(prefix_index)
    PS_DF(max_pins)
    PS_DF(thread_safe)
#undef PS_DF
    return !bad;
}

/* Attention over the live sequences of w (up to 4, the newest 1..3
   positions of each as queries) gives bit-identical outputs and LSEs in
   caches a and b. */
static void ps_attend_same(tst* t, pw* w, llmkv_cache* a, llmkv_cache* b) {
    llmkv_seq seqs[4];
    uint32_t ql[4], n = 0, i, ntok = 0, nq = 2 * w->d.n_kv_heads;
    llmkv_batch* ba = NULL;
    llmkv_batch* bb = NULL;
    float *q, *oa, *ob, *la, *lb;
    size_t rows;
    tst_rng r;
    llmkv_attn_desc ad;
    uint32_t layer;
    for (i = 0; i < w->n_s && n < 4; ++i) {
        uint32_t len = w->s[i].live ? pw_len(w, 0, w->s[i].h) : 0;
        if (!len) continue;
        seqs[n] = w->s[i].h;
        ql[n] = len < 3 ? len : 1 + (i % 3);
        ntok += ql[n++];
    }
    TST_REQUIRE(t, n > 0);
    OK(t, llmkv_batch_create(a, 4, 16, &ba));
    OK(t, llmkv_batch_create(b, 4, 16, &bb));
    TST_REQUIRE(t, ba && bb);
    OK(t, llmkv_batch_build(ba, seqs, ql, n));
    OK(t, llmkv_batch_build(bb, seqs, ql, n));
    rows = (size_t)ntok * nq * w->d.head_dim;
    q = (float*)malloc(rows * sizeof(float));
    oa = (float*)calloc(rows, sizeof(float));
    ob = (float*)calloc(rows, sizeof(float));
    la = (float*)calloc((size_t)ntok * nq, sizeof(float));
    lb = (float*)calloc((size_t)ntok * nq, sizeof(float));
    r.s = 0xa77e;
    for (layer = 0; q && oa && ob && la && lb && layer < w->d.n_layers; ++layer) {
        for (i = 0; i < rows; ++i) q[i] = tst_float(&r);
        memset(&ad, 0, sizeof ad);
        ad.layer = layer;
        ad.n_q_heads = nq;
        ad.q = q;
        ad.out = oa;
        ad.lse = la;
        OK(t, llmkv_attend(a, ba, &ad, NULL));
        ad.out = ob;
        ad.lse = lb;
        OK(t, llmkv_attend(b, bb, &ad, NULL));
        TST_CHECK(t, memcmp(oa, ob, rows * sizeof(float)) == 0);
        TST_CHECK(t, memcmp(la, lb, (size_t)ntok * nq * sizeof(float)) == 0);
    }
    free(q);
    free(oa);
    free(ob);
    free(la);
    free(lb);
    llmkv_batch_destroy(ba);
    llmkv_batch_destroy(bb);
}

static const pw_cfg pw_cfgs[] = {
    {"f32 ps16", LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, 16, 24, 8, 6, 0, 0},
    {"f16 ps1 index", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 1, 240, 8, 5, 1, 0},
    {"bf16 ps16 index", LLMKV_DTYPE_BF16, LLMKV_DTYPE_BF16, 16, 20, 8, 6, 1, 0},
    {"q8 ps32", LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q8, 32, 14, 40, 5, 0, 0},
    {"q4 ps16 index", LLMKV_DTYPE_Q4, LLMKV_DTYPE_Q4, 16, 22, 40, 6, 1, 0},
    {"fp8 ps16", LLMKV_DTYPE_FP8, LLMKV_DTYPE_FP8, 16, 24, 8, 6, 0, 0},
    {"q4c/q8 ps32 index", LLMKV_DTYPE_Q4C, LLMKV_DTYPE_Q8, 32, 14, 40, 5, 1, 0},
    {"q4c/f16 ps32", LLMKV_DTYPE_Q4C, LLMKV_DTYPE_F16, 32, 14, 24, 5, 0, 0},
    {"f16/q4 ps1", LLMKV_DTYPE_F16, LLMKV_DTYPE_Q4, 1, 200, 8, 4, 0, 0},
    {"q8/f16 ps16 index", LLMKV_DTYPE_Q8, LLMKV_DTYPE_F16, 16, 20, 8, 3, 1, 0},
};

/* Random workload, save, load; the loaded cache equals the live one and
   then behaves identically under the same operations. Two rounds per
   configuration (the second starts from the live cache after more work). */
static void ps_roundtrip_cfg(tst* t, const pw_cfg* cfg, unsigned long long seed, int attend) {
    pw* w = (pw*)calloc(1, sizeof(pw));
    llmkv_desc d = pw_desc(cfg);
    llmkv_cache* a;
    uint32_t round;
    uint32_t n1 = ps_scaled(160, 20), n2 = ps_scaled(90, 10);
    TST_REQUIRE(t, w != NULL);
    pw_init(w, t, &d, seed);
    a = ps_create(t, &d);
    if (!a) {
        free(w);
        return;
    }
    w->kv[0] = a;
    w->n_kv = 1;
    for (round = 0; round < 2 && !w->bad; ++round) {
        size_t size = 0;
        unsigned char* buf;
        llmkv_cache* b = NULL;
        llmkv_result r;
        pw_run(w, n1, "workload");
        buf = ps_save(t, a, 0, &size);
        if (!buf) break;
        r = ps_load1(buf, size, &b);
        TST_EQ(t, r, LLMKV_OK);
        free(buf);
        if (r != LLMKV_OK || !b) break;
        TST_CHECK(t, ps_check_ok(b));
        TST_CHECK(t, ps_desc_same(t, a, b));
        w->kv[1] = b;
        w->n_kv = 2;
        w->phase = "just loaded";
        snprintf(w->what, sizeof w->what, "%s round %u", cfg->name, round);
        pw_same(w, a, b);
        if (attend && !w->bad) ps_attend_same(t, w, a, b);
        pw_run(w, n2, "lockstep after load");
        if (round == 1 && !w->bad) {
            pw_unpin_all(w);
            pw_same(w, a, b);
        }
        llmkv_cache_destroy(b);
        w->kv[1] = NULL;
        w->n_kv = 1;
    }
    if (w->bad) fprintf(stderr, "  (config %s, seed %llu)\n", cfg->name, seed);
    llmkv_cache_destroy(a);
    free(w);
}

static void test_persist_roundtrip_mem(tst* t) {
    uint32_t i;
    for (i = 0; i < sizeof pw_cfgs / sizeof pw_cfgs[0]; ++i)
        ps_roundtrip_cfg(t, &pw_cfgs[i], 0x5eed0000ull + i, i == 0 || i == 3 || i == 6);
}

/* ------------------------------------------------------------------------ */
/* Files                                                                    */
/* ------------------------------------------------------------------------ */

/* A fresh directory under /tmp (mkdtemp); dir receives its path. */
static int ps_tmpdir(char* dir, size_t cap) {
    if (cap < 32) return 0;
    snprintf(dir, cap, "/tmp/llmkv_persist_XXXXXX");
    return mkdtemp(dir) != NULL;
}

static int ps_exists(const char* path) {
    struct stat st;
    return stat(path, &st) == 0;
}

/* Whole file into a new buffer (malloc); NULL when it cannot be read. */
static unsigned char* ps_read_file(const char* path, size_t* size) {
    FILE* f = fopen(path, "rb");
    unsigned char* buf = NULL;
    size_t cap = 0, n = 0;
    *size = 0;
    if (!f) return NULL;
    for (;;) {
        size_t got;
        if (n == cap) {
            size_t nc = cap ? cap * 2 : 65536;
            unsigned char* nb = (unsigned char*)realloc(buf, nc);
            if (!nb) {
                free(buf);
                fclose(f);
                return NULL;
            }
            buf = nb;
            cap = nc;
        }
        got = fread(buf + n, 1, cap - n, f);
        n += got;
        if (got == 0) break;
    }
    fclose(f);
    if (!buf) buf = (unsigned char*)malloc(1);
    *size = n;
    return buf;
}

/* Removes every entry of dir (one level), then dir. */
static void ps_rmdir(const char* dir) {
    static const char* const names[] = {"c.kv", "c.kv.tmp", "s.kvs", "s.kvs.tmp", "a.kv", "a.kv.tmp",
                                        "b.kv", "b.kv.tmp", "i1.kv", "i1.kv.tmp", "k.kv", "k.kv.tmp"};
    char p[512];
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; ++i) {
        snprintf(p, sizeof p, "%s/%s", dir, names[i]);
        unlink(p);
    }
    rmdir(dir);
}

/* save_file / load_file: the round trip equals save_mem's, no temporary
   remains, and saving again replaces the file. */
static void test_persist_files(tst* t) {
    pw_cfg cfg = {"files", LLMKV_DTYPE_F16, LLMKV_DTYPE_Q8, 16, 24, 40, 6, 1, 0};
    llmkv_desc d = pw_desc(&cfg);
    pw* w = (pw*)calloc(1, sizeof(pw));
    char dir[64], path[128], tmp[136];
    llmkv_cache* a;
    uint32_t round;
    TST_REQUIRE(t, w != NULL);
    if (!ps_tmpdir(dir, sizeof dir)) {
        free(w);
        TST_REQUIRE(t, 0 && "mkdtemp");
    }
    snprintf(path, sizeof path, "%s/c.kv", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    pw_init(w, t, &d, 0xf11e5ull);
    a = ps_create(t, &d);
    w->kv[0] = a;
    w->n_kv = 1;
    for (round = 0; a && round < 3 && !w->bad; ++round) {
        llmkv_cache* b = NULL;
        const char* paths[1];
        unsigned char* file;
        size_t fsize = 0;
        uint64_t need = 0;
        llmkv_result r;
        pw_run(w, ps_scaled(120, 20), "workload");
        OK(t, llmkv_cache_save_size(a, 0, &need));
        r = llmkv_cache_save_file(a, 0, path, NULL);
        TST_EQ(t, r, LLMKV_OK);
        TST_CHECK(t, !ps_exists(tmp));
        file = ps_read_file(path, &fsize);
        TST_CHECK(t, file != NULL);
        TST_EQ(t, fsize, need); /* the file holds what save_mem would write */
        paths[0] = path;
        r = llmkv_cache_load_file(paths, 1, NULL, &b);
        TST_EQ(t, r, LLMKV_OK);
        if (r == LLMKV_OK && b) {
            w->kv[1] = b;
            w->n_kv = 2;
            w->phase = "loaded from file";
            TST_CHECK(t, ps_desc_same(t, a, b));
            pw_same(w, a, b);
            pw_run(w, ps_scaled(40, 5), "lockstep after load_file");
            llmkv_cache_destroy(b);
            w->n_kv = 1;
        }
        /* The file's bytes load from memory too. */
        b = NULL;
        if (file) {
            r = ps_load1(file, fsize, &b);
            TST_EQ(t, r, LLMKV_OK);
            llmkv_cache_destroy(b);
        }
        free(file);
    }
    /* A save to a directory that does not exist fails with IO. */
    {
        char bad[160];
        llmkv_cache* b = (llmkv_cache*)&bad; /* must be overwritten with NULL */
        const char* paths[1];
        snprintf(bad, sizeof bad, "%s/no/such/dir/c.kv", dir);
        if (a) TST_EQ(t, llmkv_cache_save_file(a, 0, bad, NULL), LLMKV_ERR_IO);
        paths[0] = bad;
        TST_EQ(t, llmkv_cache_load_file(paths, 1, NULL, &b), LLMKV_ERR_IO);
        TST_CHECK(t, b == NULL);
    }
    llmkv_cache_destroy(a);
    ps_rmdir(dir);
    TST_CHECK(t, !ps_exists(dir));
    free(w);
}

/* ------------------------------------------------------------------------ */
/* Incremental checkpoints                                                  */
/* ------------------------------------------------------------------------ */

static llmkv_result ps_loadn(unsigned char* const* bufs, const size_t* sizes, uint32_t n, llmkv_cache** out) {
    const void* b[8];
    uint32_t i;
    for (i = 0; i < n && i < 8; ++i) b[i] = bufs[i];
    *out = NULL;
    return llmkv_cache_load_mem(b, sizes, n, NULL, out);
}

/* base, +inc1, +inc2 loaded together equal the live cache; base + inc1
   equals a full save taken with inc1; broken chains are refused. */
static void test_persist_incremental_chain(tst* t) {
    pw_cfg cfg = {"incremental", LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, 16, 40, 8, 6, 1, 0};
    llmkv_desc d = pw_desc(&cfg);
    pw* w = (pw*)calloc(1, sizeof(pw));
    pw* snap1 = (pw*)calloc(1, sizeof(pw));
    llmkv_cache *a = NULL, *b = NULL, *c = NULL, *other = NULL;
    unsigned char* buf[4] = {NULL, NULL, NULL, NULL};
    size_t sz[4] = {0, 0, 0, 0};
    unsigned char *full1 = NULL, *obase = NULL, *oinc = NULL;
    size_t full1_sz = 0, obase_sz = 0, oinc_sz = 0;
    llmkv_result r;
    if (!w || !snap1) {
        free(w);
        free(snap1);
        TST_REQUIRE(t, 0 && "out of memory");
    }
    pw_init(w, t, &d, 0x1c0ull);
    a = ps_create(t, &d);
    if (!a) goto done;
    w->kv[0] = a;
    w->n_kv = 1;
    /* No checkpoint yet: INCREMENTAL is refused. */
    {
        uint64_t need = 123;
        unsigned char tmpbuf[64];
        size_t written = 77;
        TST_EQ(t, llmkv_cache_save_size(a, LLMKV_SAVE_INCREMENTAL, &need), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, need, 0);
        TST_EQ(t, llmkv_cache_save_mem(a, LLMKV_SAVE_INCREMENTAL, tmpbuf, sizeof tmpbuf, &written),
               LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, written, 0);
    }
    pw_run(w, ps_scaled(120, 20), "before base");
    /* A full save without the checkpoint flag does not make one. */
    buf[0] = ps_save(t, a, 0, &sz[0]);
    free(buf[0]);
    {
        uint64_t need = 123;
        TST_EQ(t, llmkv_cache_save_size(a, LLMKV_SAVE_INCREMENTAL, &need), LLMKV_ERR_INVALID_ARGUMENT);
    }
    buf[0] = ps_save(t, a, LLMKV_SAVE_CHECKPOINT, &sz[0]);
    pw_run(w, ps_scaled(40, 8), "before inc1");
    buf[1] = ps_save(t, a, LLMKV_SAVE_INCREMENTAL, &sz[1]);
    full1 = ps_save(t, a, 0, &full1_sz); /* not a checkpoint: inc2 still builds on inc1 */
    *snap1 = *w;
    pw_run(w, ps_scaled(40, 8), "before inc2");
    buf[2] = ps_save(t, a, LLMKV_SAVE_INCREMENTAL, &sz[2]);
    if (!buf[0] || !buf[1] || !buf[2] || !full1 || w->bad) goto done;

    /* [base, inc1, inc2] equals the live cache, and behaves like it. */
    r = ps_loadn(buf, sz, 3, &b);
    TST_EQ(t, r, LLMKV_OK);
    if (r == LLMKV_OK) {
        TST_CHECK(t, ps_check_ok(b));
        w->kv[1] = b;
        w->n_kv = 2;
        w->phase = "base+inc1+inc2";
        pw_same(w, a, b);
        /* The loaded cache remembers inc2 as its checkpoint: an increment
           of it applies to [base, inc1, inc2]; so does one of the live
           cache (same state, same chain). */
        pw_run(w, ps_scaled(30, 5), "lockstep after chain load");
        buf[3] = ps_save(t, b, LLMKV_SAVE_INCREMENTAL, &sz[3]);
        if (buf[3]) {
            r = ps_loadn(buf, sz, 4, &c);
            TST_EQ(t, r, LLMKV_OK);
            if (r == LLMKV_OK) {
                w->phase = "chain + increment of the loaded cache";
                pw_same(w, b, c);
            }
            llmkv_cache_destroy(c);
            c = NULL;
            free(buf[3]);
            buf[3] = NULL;
        }
        llmkv_cache_destroy(b);
        b = NULL;
        w->n_kv = 1;
    }

    /* [base, inc1] equals the full save taken at inc1. */
    r = ps_loadn(buf, sz, 2, &b);
    TST_EQ(t, r, LLMKV_OK);
    {
        llmkv_result r2 = ps_load1(full1, full1_sz, &c);
        TST_EQ(t, r2, LLMKV_OK);
        if (r == LLMKV_OK && r2 == LLMKV_OK) {
            snap1->phase = "base+inc1 vs full save at inc1";
            snap1->lg.n = 0;
            /* Both freshly loaded from the same state: counters too. */
            pw_same(snap1, b, c);
            if (snap1->bad) w->bad = 1;
        }
    }
    llmkv_cache_destroy(b);
    llmkv_cache_destroy(c);
    b = c = NULL;

    /* Broken chains. */
    {
        unsigned char* skip[2];
        size_t skip_sz[2];
        skip[0] = buf[0];
        skip[1] = buf[2];
        skip_sz[0] = sz[0];
        skip_sz[1] = sz[2];
        TST_EQ(t, ps_loadn(skip, skip_sz, 2, &b), LLMKV_ERR_MISMATCH); /* inc2 does not build on base */
        TST_CHECK(t, b == NULL);
        skip[0] = buf[1];
        skip[1] = buf[0];
        skip_sz[0] = sz[1];
        skip_sz[1] = sz[0];
        /* An increment first, then anything: an input of the wrong kind,
           LLMKV_ERR_MISMATCH (the header's llmkv_cache_load_mem). */
        r = ps_loadn(skip, skip_sz, 1, &b);
        TST_EQ(t, r, LLMKV_ERR_MISMATCH);
        TST_CHECK(t, b == NULL);
        r = ps_loadn(skip, skip_sz, 2, &b);
        TST_EQ(t, r, LLMKV_ERR_MISMATCH);
        TST_CHECK(t, b == NULL);
        /* inc1 twice: the second does not build on the first. */
        skip[0] = buf[0];
        skip[1] = buf[1];
        {
            unsigned char* three[3];
            size_t three_sz[3];
            three[0] = buf[0];
            three[1] = buf[1];
            three[2] = buf[1];
            three_sz[0] = sz[0];
            three_sz[1] = sz[1];
            three_sz[2] = sz[1];
            TST_EQ(t, ps_loadn(three, three_sz, 3, &b), LLMKV_ERR_MISMATCH);
            TST_CHECK(t, b == NULL);
            /* inc2 before inc1. */
            three[1] = buf[2];
            three[2] = buf[1];
            three_sz[1] = sz[2];
            three_sz[2] = sz[1];
            TST_EQ(t, ps_loadn(three, three_sz, 3, &b), LLMKV_ERR_MISMATCH);
            TST_CHECK(t, b == NULL);
        }
    }
    /* Increments of another cache (same configuration, another history)
       do not apply. */
    {
        pw* w2 = (pw*)calloc(1, sizeof(pw));
        if (w2) {
            pw_init(w2, t, &d, 0x1c1ull);
            other = ps_create(t, &d);
            if (other) {
                unsigned char* mix[2];
                size_t mix_sz[2];
                w2->kv[0] = other;
                w2->n_kv = 1;
                pw_run(w2, ps_scaled(120, 20), "other cache");
                obase = ps_save(t, other, LLMKV_SAVE_CHECKPOINT, &obase_sz);
                pw_run(w2, 10, "other cache 2");
                oinc = ps_save(t, other, LLMKV_SAVE_INCREMENTAL, &oinc_sz);
                if (obase && oinc) {
                    mix[0] = buf[0];
                    mix[1] = oinc;
                    mix_sz[0] = sz[0];
                    mix_sz[1] = oinc_sz;
                    TST_EQ(t, ps_loadn(mix, mix_sz, 2, &b), LLMKV_ERR_MISMATCH);
                    TST_CHECK(t, b == NULL);
                    mix[0] = obase;
                    mix[1] = buf[1];
                    mix_sz[0] = obase_sz;
                    mix_sz[1] = sz[1];
                    TST_EQ(t, ps_loadn(mix, mix_sz, 2, &b), LLMKV_ERR_MISMATCH);
                    TST_CHECK(t, b == NULL);
                    /* Its own chain loads. */
                    mix[1] = oinc;
                    mix_sz[1] = oinc_sz;
                    TST_EQ(t, ps_loadn(mix, mix_sz, 2, &b), LLMKV_OK);
                    llmkv_cache_destroy(b);
                    b = NULL;
                }
            }
            llmkv_cache_destroy(other);
            other = NULL;
            free(w2);
        }
    }
    /* A later full checkpoint starts a new chain: its increments do not
       apply to the old base. */
    {
        unsigned char *base2, *inc;
        size_t base2_sz = 0, inc_sz = 0;
        base2 = ps_save(t, a, LLMKV_SAVE_CHECKPOINT, &base2_sz);
        pw_run(w, 10, "after base2");
        inc = ps_save(t, a, LLMKV_SAVE_INCREMENTAL, &inc_sz);
        if (base2 && inc) {
            unsigned char* two[2];
            size_t two_sz[2];
            two[0] = buf[0];
            two[1] = inc;
            two_sz[0] = sz[0];
            two_sz[1] = inc_sz;
            TST_EQ(t, ps_loadn(two, two_sz, 2, &b), LLMKV_ERR_MISMATCH);
            TST_CHECK(t, b == NULL);
            two[0] = base2;
            two_sz[0] = base2_sz;
            TST_EQ(t, ps_loadn(two, two_sz, 2, &b), LLMKV_OK);
            if (b) {
                w->kv[1] = b;
                w->n_kv = 2;
                w->phase = "base2+inc";
                pw_same(w, a, b);
                w->n_kv = 1;
                llmkv_cache_destroy(b);
                b = NULL;
            }
        }
        free(base2);
        free(inc);
    }
done:
    if (w->bad) fprintf(stderr, "  (incremental chain)\n");
    llmkv_cache_destroy(a);
    free(buf[0]);
    free(buf[1]);
    free(buf[2]);
    free(buf[3]);
    free(full1);
    free(obase);
    free(oinc);
    free(w);
    free(snap1);
}

/* An increment after few writes is much smaller than a full save. */
static void test_persist_incremental_small(tst* t) {
    llmkv_desc d = tst_desc(2, 2, 64, 16, 128, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    llmkv_cache* a;
    llmkv_seq s[8];
    llmkv_token toks[8][200];
    uint32_t i, j, pages_total = 0, pages_changed = 0;
    unsigned char *base = NULL, *inc = NULL, *full = NULL;
    size_t base_sz = 0, inc_sz = 0, full_sz = 0;
    llmkv_stats st;
    d.max_seqs = 16;
    a = ps_create(t, &d);
    TST_REQUIRE(t, a != NULL);
    for (i = 0; i < 8; ++i) {
        for (j = 0; j < 200; ++j) toks[i][j] = (llmkv_token)(i * 1000 + j);
        OK(t, ps_make_seq(a, toks[i], 190, &s[i]));
    }
    st = ps_stats(a);
    pages_total = st.n_pages_used; /* 8 * 12 = 96 */
    base = ps_save(t, a, LLMKV_SAVE_CHECKPOINT, &base_sz);
    /* Change few pages: grow two sequences by a few tokens (their last
       pages, and one new page), and one new short sequence. */
    OK(t, llmkv_reserve(a, s[0], 4));
    OK(t, ps_put_range(a, s[0], toks[0], 190, 4));
    pages_changed += 2;
    OK(t, llmkv_reserve(a, s[3], 2));
    OK(t, ps_put_range(a, s[3], toks[3], 190, 2));
    pages_changed += 1;
    {
        llmkv_seq n;
        OK(t, ps_make_seq(a, toks[7], 20, &n));
        pages_changed += 2;
    }
    st = ps_stats(a);
    TST_CHECK(t, pages_changed * 10 < st.n_pages_used);
    inc = ps_save(t, a, LLMKV_SAVE_INCREMENTAL, &inc_sz);
    full = ps_save(t, a, 0, &full_sz);
    TST_CHECK(t, base && inc && full);
    if (base && inc && full) {
        unsigned char* bufs[2];
        size_t szs[2];
        llmkv_cache* b = NULL;
        TST_CHECK(t, inc_sz < full_sz / 2);
        if (!(inc_sz < full_sz / 2))
            fprintf(stderr, "  increment %lu bytes, full save %lu bytes (%u of %u pages changed)\n",
                    (unsigned long)inc_sz, (unsigned long)full_sz, pages_changed, pages_total);
        bufs[0] = base;
        bufs[1] = inc;
        szs[0] = base_sz;
        szs[1] = inc_sz;
        TST_EQ(t, ps_loadn(bufs, szs, 2, &b), LLMKV_OK);
        if (b) {
            for (i = 0; i < 8; ++i) TST_CHECK(t, ps_gathers_same(a, b, s[i]));
            llmkv_cache_destroy(b);
        }
    }
    /* An increment with nothing changed is smaller still. */
    {
        unsigned char* again;
        size_t again_sz = 0;
        again = ps_save(t, a, LLMKV_SAVE_INCREMENTAL, &again_sz);
        TST_CHECK(t, again != NULL && again_sz < inc_sz);
        free(again);
    }
    free(base);
    free(inc);
    free(full);
    llmkv_cache_destroy(a);
}

/* ------------------------------------------------------------------------ */
/* Sequence export and import                                               */
/* ------------------------------------------------------------------------ */

#define EX_LEN 50

static void ex_tokens(llmkv_token* toks, uint32_t n, uint32_t salt) {
    uint32_t i;
    for (i = 0; i < n; ++i) toks[i] = (llmkv_token)((i * 7 + salt * 13) % 23);
}

/* Snapshot of the sequences of a cache, for "unchanged" checks. */
typedef struct ex_snap {
    llmkv_stats st;
    uint32_t n;
    llmkv_seq h[8];
    uint32_t len[8], np[8], pages[8][64];
    unsigned char* g[8];
    size_t gb[8];
} ex_snap;

static void ex_take(llmkv_cache* kv, const llmkv_seq* hs, uint32_t n, ex_snap* s) {
    uint32_t i;
    llmkv_result r;
    memset(s, 0, sizeof *s);
    s->st = ps_stats(kv);
    s->n = n;
    for (i = 0; i < n && i < 8; ++i) {
        s->h[i] = hs[i];
        llmkv_seq_length(kv, hs[i], &s->len[i]);
        llmkv_seq_pages(kv, hs[i], s->pages[i], 64, &s->np[i]);
        s->g[i] = ps_gather_all(kv, hs[i], &s->gb[i], &r);
    }
}

/* 1 when the cache still matches the snapshot (and passes its check);
   frees the snapshot. */
static int ex_same(tst* t, qlog* lg, llmkv_cache* kv, ex_snap* s, const char* when) {
    uint32_t i;
    int ok = 1;
    llmkv_stats now = ps_stats(kv);
    if (!ps_stats_same(t, lg, &s->st, &now, NULL, NULL, when)) ok = 0;
    for (i = 0; i < s->n && i < 8; ++i) {
        uint32_t len = 0, np = 0, pages[64];
        memset(pages, 0, sizeof pages);
        llmkv_seq_length(kv, s->h[i], &len);
        llmkv_seq_pages(kv, s->h[i], pages, 64, &np);
        if (len != s->len[i] || np != s->np[i] || memcmp(pages, s->pages[i], sizeof pages) != 0 ||
            !ps_gather_is(kv, s->h[i], s->g[i], s->gb[i])) {
            QFAIL(t, lg, "%s: sequence %u changed", when, s->h[i].id);
            ok = 0;
        }
        free(s->g[i]);
        s->g[i] = NULL;
    }
    if (!ps_check_ok(kv)) {
        QFAIL(t, lg, "%s: check failed", when);
        ok = 0;
    }
    return ok;
}

static void ex_free(ex_snap* s) {
    uint32_t i;
    for (i = 0; i < 8; ++i) free(s->g[i]);
    memset(s, 0, sizeof *s);
}

/* (a) the same configuration: byte-identical gathers, token ids, length,
   for every storage type; the imported sequence then grows like the
   source. */
static void test_persist_export_same_config(tst* t) {
    static const llmkv_dtype kts[] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_Q8,
                                      LLMKV_DTYPE_Q4,  LLMKV_DTYPE_FP8, LLMKV_DTYPE_Q4C};
    uint32_t i;
    for (i = 0; i < sizeof kts / sizeof kts[0]; ++i) {
        uint32_t ps = kts[i] == LLMKV_DTYPE_Q4C ? 32 : 16;
        llmkv_dtype vt = kts[i] == LLMKV_DTYPE_Q4C ? LLMKV_DTYPE_Q8 : kts[i];
        llmkv_desc d = tst_desc(2, 2, 40, ps, 24, kts[i], vt);
        llmkv_cache *src, *dst;
        llmkv_token toks[EX_LEN], got[EX_LEN];
        llmkv_seq s, s2, f, imp = {0};
        unsigned char *buf, *g;
        size_t size = 0, gb = 0;
        uint32_t n_shared = 99, len = 0;
        llmkv_result r;
        d.prefix_index = 1;
        d.max_seqs = 4;
        src = ps_create(t, &d);
        dst = ps_create(t, &d);
        if (!src || !dst) {
            llmkv_cache_destroy(src);
            llmkv_cache_destroy(dst);
            return;
        }
        ex_tokens(toks, EX_LEN, i);
        OK(t, ps_make_seq(src, toks, EX_LEN, &s));
        /* A fork makes its pages shared; the export is self-contained. */
        OK(t, llmkv_fork(src, s, &f));
        OK(t, llmkv_seq_free(src, s));
        /* Something else in src first, so page ids differ from dst's. */
        OK(t, ps_make_seq(src, toks, 3, &s2));
        buf = ps_export(t, src, f, &size);
        TST_CHECK(t, buf != NULL);
        if (buf) {
            r = llmkv_seq_import(dst, buf, size, &imp, &n_shared);
            TST_EQ(t, r, LLMKV_OK);
            TST_EQ(t, n_shared, 0); /* nothing cached in dst */
            OK(t, llmkv_seq_length(dst, imp, &len));
            TST_EQ(t, len, EX_LEN);
            memset(got, 0, sizeof got);
            OK(t, llmkv_seq_tokens(dst, imp, 0, EX_LEN, got));
            TST_CHECK(t, memcmp(got, toks, sizeof toks) == 0);
            g = ps_gather_all(src, f, &gb, &r);
            TST_CHECK(t, g && ps_gather_is(dst, imp, g, gb));
            TST_CHECK(t, ps_check_ok(dst));
            /* The imported sequence lives on: it grows and is written like
               any other (Q4C: its partial last page is in its staging). */
            {
                llmkv_token more[EX_LEN + 20];
                ex_tokens(more, EX_LEN + 20, i);
                OK(t, llmkv_reserve_tokens(dst, imp, more + EX_LEN, 20));
                OK(t, ps_put_range(dst, imp, more, EX_LEN, 20));
                OK(t, llmkv_reserve_tokens(src, f, more + EX_LEN, 20));
                OK(t, ps_put_range(src, f, more, EX_LEN, 20));
                {
                    size_t b1 = 0, b2 = 0;
                    llmkv_result r1, r2;
                    unsigned char* g1 = ps_gather_all(src, f, &b1, &r1);
                    unsigned char* g2 = ps_gather_all(dst, imp, &b2, &r2);
                    TST_CHECK(t, g1 && g2 && b1 == b2 && memcmp(g1, g2, b1) == 0);
                    free(g1);
                    free(g2);
                }
            }
            free(g);
            free(buf);
        }
        llmkv_cache_destroy(src);
        llmkv_cache_destroy(dst);
    }
}

/* (b) a cache of another capacity holding other sequences: they are
   untouched, the import equals the source. Importing the same export
   twice gives two independent sequences. */
static void test_persist_import_into_busy_cache(tst* t) {
    llmkv_desc ds = tst_desc(2, 2, 40, 16, 12, LLMKV_DTYPE_F16, LLMKV_DTYPE_Q8);
    llmkv_desc dd = ds;
    llmkv_cache *src, *dst;
    llmkv_token toks[EX_LEN], other[EX_LEN];
    llmkv_seq s, o[3], imp = {0}, imp2 = {0};
    unsigned char *buf, *g;
    size_t size = 0, gb = 0;
    ex_snap snap;
    qlog lg = {0};
    llmkv_result r;
    ds.max_seqs = 2;
    dd.n_pages = 40;
    dd.max_seqs = 8;
    src = ps_create(t, &ds);
    dst = ps_create(t, &dd);
    if (!src || !dst) {
        llmkv_cache_destroy(src);
        llmkv_cache_destroy(dst);
        return;
    }
    ex_tokens(toks, EX_LEN, 1);
    ex_tokens(other, EX_LEN, 2);
    OK(t, ps_make_seq(src, toks, EX_LEN, &s));
    OK(t, ps_make_seq(dst, other, 37, &o[0]));
    OK(t, llmkv_fork(dst, o[0], &o[1]));
    OK(t, ps_make_seq(dst, other, 5, &o[2]));
    OK(t, llmkv_truncate(dst, o[1], 20));
    buf = ps_export(t, src, s, &size);
    g = ps_gather_all(src, s, &gb, &r);
    TST_REQUIRE(t, buf && g);
    ex_take(dst, o, 3, &snap);
    r = llmkv_seq_import(dst, buf, size, &imp, NULL);
    TST_EQ(t, r, LLMKV_OK);
    {
        /* Others untouched; the new sequence took ceil(50/16) = 4 pages. */
        llmkv_stats before = snap.st, after = ps_stats(dst);
        snap.st.n_pages_free = after.n_pages_free;
        snap.st.n_pages_used = after.n_pages_used;
        snap.st.used_bytes = after.used_bytes;
        snap.st.n_seqs = after.n_seqs;
        snap.st.n_tokens = after.n_tokens;
        snap.st.n_slots_used = after.n_slots_used;
        snap.st.n_slots_unused = after.n_slots_unused;
        TST_CHECK(t, ex_same(t, &lg, dst, &snap, "import into a busy cache"));
        TST_EQ(t, after.n_pages_used, before.n_pages_used + 4);
        TST_EQ(t, after.n_pages_free, before.n_pages_free - 4);
        TST_EQ(t, after.n_seqs, before.n_seqs + 1);
        TST_EQ(t, after.n_tokens, before.n_tokens + EX_LEN);
    }
    TST_CHECK(t, ps_gather_is(dst, imp, g, gb));
    /* Twice: an independent second sequence. */
    OK(t, llmkv_seq_import(dst, buf, size, &imp2, NULL));
    TST_CHECK(t, imp2.id != imp.id && imp2.id != 0);
    TST_CHECK(t, ps_gather_is(dst, imp2, g, gb));
    OK(t, llmkv_truncate(dst, imp, 10));
    TST_CHECK(t, ps_gather_is(dst, imp2, g, gb));
    TST_CHECK(t, ps_check_ok(dst));
    ex_free(&snap);
    free(buf);
    free(g);
    llmkv_cache_destroy(src);
    llmkv_cache_destroy(dst);
}

/* (c) with the prefix index: the leading whole pages the cache already
   holds in the export's namespace are shared, not stored again. */
static void ex_shared_case(tst* t, uint64_t src_ns, uint64_t dst_ns, uint32_t held, int holder_live,
                           uint32_t expect_shared) {
    llmkv_desc d = tst_desc(2, 2, 8, 16, 24, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    llmkv_cache *src, *dst;
    llmkv_token toks[EX_LEN], got[EX_LEN];
    llmkv_seq s, h, imp = {0};
    unsigned char *buf, *g;
    size_t size = 0, gb = 0;
    uint32_t nc = 0, n_shared = 99, hp[8], ip[8], nh = 0, ni = 0, i;
    llmkv_stats before, after;
    llmkv_result r;
    d.prefix_index = 1;
    d.max_seqs = 4;
    src = ps_create(t, &d);
    dst = ps_create(t, &d);
    if (!src || !dst) {
        llmkv_cache_destroy(src);
        llmkv_cache_destroy(dst);
        return;
    }
    ex_tokens(toks, EX_LEN, 5);
    /* Source sequence in src_ns. */
    OK(t, llmkv_seq_create_prefix(src, src_ns, toks, 0, &s, &nc));
    OK(t, llmkv_reserve_tokens(src, s, toks, EX_LEN));
    OK(t, ps_put_range(src, s, toks, 0, EX_LEN));
    buf = ps_export(t, src, s, &size);
    g = ps_gather_all(src, s, &gb, &r);
    TST_REQUIRE(t, buf && g);
    /* The target holds the first `held` tokens in dst_ns, published. */
    OK(t, llmkv_seq_create_prefix(dst, dst_ns, toks, 0, &h, &nc));
    OK(t, llmkv_reserve_tokens(dst, h, toks, held));
    OK(t, ps_put_range(dst, h, toks, 0, held));
    OK(t, llmkv_seq_publish(dst, h, 0));
    memset(hp, 0, sizeof hp);
    OK(t, llmkv_seq_pages(dst, h, hp, 8, &nh));
    if (!holder_live) OK(t, llmkv_seq_free(dst, h));
    before = ps_stats(dst);
    r = llmkv_seq_import(dst, buf, size, &imp, &n_shared);
    TST_EQ(t, r, LLMKV_OK);
    TST_EQ(t, n_shared, expect_shared);
    after = ps_stats(dst);
    /* New pages taken: the sequence's 4 minus those shared. */
    TST_EQ(t, before.n_pages_free - after.n_pages_free, 4 - expect_shared / 16);
    if (holder_live)
        TST_EQ(t, after.n_pages_used - before.n_pages_used, 4 - expect_shared / 16);
    else
        TST_EQ(t, after.n_pages_used - before.n_pages_used, 4);
    memset(ip, 0, sizeof ip);
    OK(t, llmkv_seq_pages(dst, imp, ip, 8, &ni));
    TST_EQ(t, ni, 4);
    for (i = 0; i < expect_shared / 16; ++i) TST_EQ(t, ip[i], hp[i]);
    TST_CHECK(t, ps_gather_is(dst, imp, g, gb));
    memset(got, 0, sizeof got);
    OK(t, llmkv_seq_tokens(dst, imp, 0, EX_LEN, got));
    TST_CHECK(t, memcmp(got, toks, sizeof toks) == 0);
    /* Its full pages are published: the whole 48-token prefix now matches
       in the export's namespace. */
    {
        uint32_t m = 0;
        OK(t, llmkv_prefix_match(dst, src_ns, toks, EX_LEN, &m));
        TST_CHECK(t, m >= 48);
    }
    TST_CHECK(t, ps_check_ok(dst));
    free(buf);
    free(g);
    llmkv_cache_destroy(src);
    llmkv_cache_destroy(dst);
}

static void test_persist_import_shares_prefix(tst* t) {
    ex_shared_case(t, 0, 0, 35, 1, 32);  /* two whole pages of 35 held tokens */
    ex_shared_case(t, 5, 5, 35, 1, 32);  /* same, in namespace 5 */
    ex_shared_case(t, 5, 0, 35, 1, 0);   /* another namespace: nothing shared */
    ex_shared_case(t, 0, 0, 48, 1, 48);  /* three pages */
    ex_shared_case(t, 0, 0, 15, 1, 0);   /* no whole page held */
    ex_shared_case(t, 0, 0, 35, 0, 32);  /* held by the index only (evictable) */
}

/* (d) other page size or storage types: values converted through F32 and
   stored with put's rounding. */
typedef struct ex_conv {
    llmkv_dtype skt, svt;
    uint32_t sps;
    llmkv_dtype dkt, dvt;
    uint32_t dps;
} ex_conv;

static void ex_convert_case(tst* t, const ex_conv* c) {
    llmkv_desc ds = tst_desc(2, 2, 40, c->sps, 64, c->skt, c->svt);
    llmkv_desc dd = tst_desc(2, 2, 40, c->dps, 64, c->dkt, c->dvt);
    llmkv_cache *src, *dst, *ref;
    llmkv_token toks[EX_LEN];
    llmkv_seq s, imp = {0}, rs;
    unsigned char* buf;
    size_t size = 0;
    float *sv, *dv;
    uint32_t layer, part, pos, head, bad = 0, D = 40, nkv = 2;
    llmkv_result r;
    ds.max_seqs = dd.max_seqs = 2;
    src = ps_create(t, &ds);
    dst = ps_create(t, &dd);
    ref = ps_create(t, &dd);
    if (!src || !dst || !ref) {
        llmkv_cache_destroy(src);
        llmkv_cache_destroy(dst);
        llmkv_cache_destroy(ref);
        return;
    }
    ex_tokens(toks, EX_LEN, 9);
    OK(t, ps_make_seq(src, toks, EX_LEN, &s));
    buf = ps_export(t, src, s, &size);
    sv = ps_gather_f32(src, s, EX_LEN); /* the source's values */
    TST_REQUIRE(t, buf && sv);
    r = llmkv_seq_import(dst, buf, size, &imp, NULL);
    TST_EQ(t, r, LLMKV_OK);
    dv = r == LLMKV_OK ? ps_gather_f32(dst, imp, EX_LEN) : NULL;
    TST_CHECK(t, dv != NULL);
    /* Reference 1: the same values put into a cache of the target's
       configuration: byte-identical stored data. */
    OK(t, llmkv_seq_create(ref, &rs));
    OK(t, llmkv_reserve(ref, rs, EX_LEN));
    for (layer = 0; layer < 2; ++layer) {
        size_t ne = (size_t)EX_LEN * nkv * D;
        OK(t, llmkv_put(ref, rs, layer, EX_LEN, sv + ne * 2 * layer, 0, sv + ne * (2 * layer + 1), 0,
                        LLMKV_DTYPE_F32));
    }
    if (r == LLMKV_OK) {
        size_t b1 = 0, b2 = 0;
        llmkv_result r1, r2;
        unsigned char* g1 = ps_gather_all(dst, imp, &b1, &r1);
        unsigned char* g2 = ps_gather_all(ref, rs, &b2, &r2);
        TST_CHECK(t, g1 && g2 && b1 == b2 && memcmp(g1, g2, b1) == 0);
        free(g1);
        free(g2);
    }
    /* Reference 2 (per-vector types): llmkv_quantize then llmkv_dequantize
       of every source head vector. */
    for (part = 0; dv && part < 2; ++part) {
        llmkv_dtype dt = part ? c->dvt : c->dkt;
        unsigned char data[2048], scales[256];
        float x[40], y[40];
        if (dt == LLMKV_DTYPE_Q4C) continue;
        for (layer = 0; layer < 2; ++layer)
            for (pos = 0; pos < EX_LEN; ++pos)
                for (head = 0; head < nkv; ++head) {
                    size_t off = (size_t)EX_LEN * nkv * D * (2 * layer + part) + ((size_t)pos * nkv + head) * D;
                    memcpy(x, sv + off, sizeof x);
                    if (llmkv_quantize(dt, x, D, data, scales) != LLMKV_OK ||
                        llmkv_dequantize(dt, data, scales, D, y) != LLMKV_OK) {
                        bad++;
                        continue;
                    }
                    if (memcmp(y, dv + off, sizeof y) != 0) {
                        if (!bad)
                            fprintf(stderr, "  import %s->%s: layer %u part %u pos %u head %u: %g vs %g\n",
                                    llmkv_dtype_name(part ? c->svt : c->skt), llmkv_dtype_name(dt), layer, part,
                                    pos, head, (double)y[0], (double)dv[off]);
                        bad++;
                    }
                }
    }
    TST_EQ(t, bad, 0);
    /* F16 targets: the explicit rounding, F32 source only. */
    if (dv && c->dkt == LLMKV_DTYPE_F16 && c->skt == LLMKV_DTYPE_F32) {
        size_t ne = (size_t)EX_LEN * nkv * D, i;
        for (i = 0, bad = 0; i < ne; ++i)
            if (dv[i] != llmkv_f16_to_f32(llmkv_f32_to_f16(sv[i]))) bad++;
        TST_EQ(t, bad, 0);
    }
    TST_CHECK(t, ps_check_ok(dst));
    free(buf);
    free(sv);
    free(dv);
    llmkv_cache_destroy(src);
    llmkv_cache_destroy(dst);
    llmkv_cache_destroy(ref);
}

static void test_persist_import_converts(tst* t) {
    static const ex_conv cases[] = {
        {LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, 16, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16},
        {LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q8, 16},
        {LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, 16, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, 32},
        {LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 1},
        {LLMKV_DTYPE_F32, LLMKV_DTYPE_BF16, 16, LLMKV_DTYPE_Q4C, LLMKV_DTYPE_Q8, 32},
        {LLMKV_DTYPE_Q4, LLMKV_DTYPE_FP8, 16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_F32, 8},
        {LLMKV_DTYPE_Q4C, LLMKV_DTYPE_Q8, 32, LLMKV_DTYPE_F16, LLMKV_DTYPE_Q4, 16},
        {LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q8, 16, LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q8, 32},
    };
    uint32_t i;
    for (i = 0; i < sizeof cases / sizeof cases[0]; ++i) ex_convert_case(t, &cases[i]);
}

/* (e)-(f) refusals leave the cache as it was and zero the outputs. */
/* `alt` (when not LLMKV_OK) is a second acceptable code. */
static void ex_refused(tst* t, const llmkv_desc* dd, const unsigned char* buf, size_t size, llmkv_result expect,
                       llmkv_result alt, const char* what) {
    llmkv_cache* dst = ps_create(t, dd);
    llmkv_token other[EX_LEN];
    llmkv_seq o[2], imp;
    uint32_t n_shared = 77, n = 0;
    ex_snap snap;
    qlog lg = {0};
    llmkv_result r;
    if (!dst) return;
    ex_tokens(other, EX_LEN, 3);
    if (dd->storage != LLMKV_STORAGE_METADATA_ONLY) {
        r = ps_make_seq(dst, other, dd->page_size + 1, &o[n]);
        if (r == LLMKV_OK) n++;
    }
    if (dd->max_seqs > 1 && llmkv_seq_create(dst, &o[n]) == LLMKV_OK) n++;
    ex_take(dst, o, n, &snap);
    imp.id = 12345;
    r = llmkv_seq_import(dst, buf, size, &imp, &n_shared);
    if (r != expect && (alt == LLMKV_OK || r != alt)) {
        fprintf(stderr, "  %s: got %s\n", what, llmkv_result_string(r));
        TST_EQ(t, r, expect);
    }
    TST_EQ(t, imp.id, 0);
    TST_EQ(t, n_shared, 0);
    TST_CHECK(t, ex_same(t, &lg, dst, &snap, what));
    llmkv_cache_destroy(dst);
}

static void test_persist_import_refused(tst* t) {
    llmkv_desc ds = tst_desc(2, 2, 8, 16, 16, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    llmkv_desc dd;
    llmkv_cache* src;
    llmkv_token toks[EX_LEN];
    llmkv_seq s;
    unsigned char *buf, *whole;
    size_t size = 0, whole_size = 0;
    ds.max_seqs = 3; /* ex_refused fills two slots of the target */
    ds.prefix_index = 1;
    src = ps_create(t, &ds);
    TST_REQUIRE(t, src != NULL);
    ex_tokens(toks, EX_LEN, 4);
    OK(t, ps_make_seq(src, toks, EX_LEN, &s)); /* 4 pages */
    buf = ps_export(t, src, s, &size);
    whole = ps_save(t, src, 0, &whole_size);
    if (!buf || !whole) {
        free(buf);
        free(whole);
        llmkv_cache_destroy(src);
        TST_REQUIRE(t, 0);
    }
    dd = ds;
    dd.n_layers = 3;
    ex_refused(t, &dd, buf, size, LLMKV_ERR_MISMATCH, LLMKV_OK, "n_layers 3");
    dd = ds;
    dd.n_kv_heads = 1;
    ex_refused(t, &dd, buf, size, LLMKV_ERR_MISMATCH, LLMKV_OK, "n_kv_heads 1");
    dd = ds;
    dd.head_dim = 16;
    ex_refused(t, &dd, buf, size, LLMKV_ERR_MISMATCH, LLMKV_OK, "head_dim 16");
    dd = ds;
    dd.n_pages = 5; /* the sequence of 17 tokens holds 2: 3 free < 4 */
    ex_refused(t, &dd, buf, size, LLMKV_ERR_OUT_OF_PAGES, LLMKV_OK, "too few free pages");
    dd.page_size = 32; /* needs 2 pages; the other sequence (33 tokens) holds both */
    dd.n_pages = 2;
    ex_refused(t, &dd, buf, size, LLMKV_ERR_OUT_OF_PAGES, LLMKV_OK, "too few free pages, page size 32");
    dd = ds;
    dd.max_seqs = 2; /* both slots in use */
    ex_refused(t, &dd, buf, size, LLMKV_ERR_TOO_MANY_SEQUENCES, LLMKV_OK, "no free slot");
    dd = ds;
    dd.max_seq_len = 32;
    ex_refused(t, &dd, buf, size, LLMKV_ERR_SEQUENCE_TOO_LONG, LLMKV_OK, "max_seq_len 32");
    dd = ds;
    dd.storage = LLMKV_STORAGE_METADATA_ONLY;
    ex_refused(t, &dd, buf, size, LLMKV_ERR_NO_PAGE_DATA, LLMKV_OK, "metadata-only target");
    /* The wrong kind of buffer, both ways. */
    dd = ds;
    /* The wrong kind of llmkv file: LLMKV_ERR_MISMATCH (the header's
       Persistence section). */
    ex_refused(t, &dd, whole, whole_size, LLMKV_ERR_MISMATCH, LLMKV_OK, "a whole-cache save given to import");
    {
        llmkv_cache* c = NULL;
        llmkv_result r = ps_load1(buf, size, &c);
        TST_EQ(t, r, LLMKV_ERR_MISMATCH);
        TST_CHECK(t, c == NULL);
        llmkv_cache_destroy(c);
    }
    /* The source is unchanged by exporting: an export again is identical
       in size and imports the same data. */
    {
        uint64_t again = 0;
        OK(t, llmkv_seq_export_size(src, s, &again));
        TST_EQ(t, again, size);
    }
    free(buf);
    free(whole);
    llmkv_cache_destroy(src);
}

/* ------------------------------------------------------------------------ */
/* Hostile input                                                            */
/* ------------------------------------------------------------------------ */

/* A small cache with a bit of everything: two sequences sharing pages,
   token ids, cached pages, a pin. */
static llmkv_cache* hz_small_cache(tst* t, llmkv_seq* seqs /* [2] or NULL */) {
    llmkv_desc d = tst_desc(1, 1, 4, 2, 8, LLMKV_DTYPE_F16, LLMKV_DTYPE_Q8);
    llmkv_cache* kv;
    llmkv_token toks[5] = {1, 2, 3, 4, 5};
    llmkv_seq s, f;
    llmkv_pin p;
    uint32_t n = 0;
    d.prefix_index = 1;
    d.max_seqs = 3;
    d.max_pins = 2;
    kv = ps_create(t, &d);
    if (!kv) return NULL;
    OK(t, ps_make_seq(kv, toks, 5, &s));
    OK(t, llmkv_seq_publish(kv, s, 1));
    OK(t, llmkv_fork(kv, s, &f));
    OK(t, llmkv_prefix_pin(kv, 0, toks, 4, &p, &n));
    if (seqs) {
        seqs[0] = s;
        seqs[1] = f;
    }
    return kv;
}

/* Loads a copy of buf[0, len) held in a buffer of exactly len bytes (so
   AddressSanitizer sees any read past it), with a leak-tracking allocator.
   Returns the result; a cache that loads anyway is destroyed. */
static llmkv_result hz_load(tst* t, const unsigned char* buf, size_t len, int* leaked) {
    unsigned char* copy = (unsigned char*)malloc(len ? len : 1);
    llmkv_load_desc ld;
    llmkv_cache* out = (llmkv_cache*)copy; /* must become NULL */
    const void* b[1];
    size_t s[1];
    falloc fa;
    llmkv_result r;
    if (!copy) return LLMKV_ERR_OUT_OF_MEMORY;
    if (len) memcpy(copy, buf, len);
    f_init(&fa);
    memset(&ld, 0, sizeof ld);
    ld.allocator = f_allocator(&fa);
    b[0] = copy;
    s[0] = len;
    r = llmkv_cache_load_mem(b, s, 1, &ld, &out);
    if (r != LLMKV_OK && out != NULL) {
        TST_CHECK(t, out == NULL);
        out = NULL;
    }
    llmkv_cache_destroy(out);
    if (fa.n_blocks != 0 || fa.errors != 0) *leaked += 1;
    f_done(&fa);
    free(copy);
    return r;
}

/* Imports a copy of buf[0, len) (exact size) into kv; on success frees the
   new sequence again. */
static llmkv_result hz_import(tst* t, llmkv_cache* kv, const unsigned char* buf, size_t len) {
    unsigned char* copy = (unsigned char*)malloc(len ? len : 1);
    llmkv_seq s;
    uint32_t n_shared = 5;
    llmkv_result r;
    if (!copy) return LLMKV_ERR_OUT_OF_MEMORY;
    if (len) memcpy(copy, buf, len);
    s.id = 77;
    r = llmkv_seq_import(kv, copy, len, &s, &n_shared);
    if (r != LLMKV_OK) {
        TST_EQ(t, s.id, 0);
        TST_EQ(t, n_shared, 0);
    } else {
        llmkv_seq_free(kv, s);
    }
    free(copy);
    return r;
}

/* Every truncation and every bit flip of a small saved cache is refused
   (BAD_FORMAT; VERSION possible only for a flip inside the 64-byte
   header), without leaks or out-of-bounds reads. */
static void test_persist_hostile_load(tst* t) {
    llmkv_cache* kv = hz_small_cache(t, NULL);
    unsigned char *buf, *m;
    size_t size = 0, len, i;
    uint32_t bit, bad_trunc = 0, bad_flip = 0, bad_xor = 0, every_bit;
    int leaked = 0;
    llmkv_result r;
    TST_REQUIRE(t, kv != NULL);
    buf = ps_save(t, kv, 0, &size);
    llmkv_cache_destroy(kv);
    TST_REQUIRE(t, buf != NULL);
    m = (unsigned char*)malloc(size);
    TST_REQUIRE(t, m != NULL);
    TST_EQ(t, hz_load(t, buf, size, &leaked), LLMKV_OK);
    for (len = 0; len < size; ++len) {
        r = hz_load(t, buf, len, &leaked);
        if (r == LLMKV_ERR_BAD_FORMAT) continue;
        if (!bad_trunc++) fprintf(stderr, "  truncated to %lu of %lu bytes: %s\n", (unsigned long)len,
                                  (unsigned long)size, llmkv_result_string(r));
    }
    TST_EQ(t, bad_trunc, 0);
    /* Every bit at scale 1 (a few thousand loads); else every 8th bit and
       every byte below. */
    every_bit = ps_scale() >= 1.0 ? 1u : 8u;
    for (bit = 0; bit < size * 8; bit += every_bit) {
        memcpy(m, buf, size);
        m[bit / 8] ^= (unsigned char)(1u << (bit % 8));
        r = hz_load(t, m, size, &leaked);
        if (r == LLMKV_ERR_BAD_FORMAT || (r == LLMKV_ERR_VERSION && bit / 8 < 64)) continue;
        if (!bad_flip++) fprintf(stderr, "  bit %u of byte %u flipped: %s\n", bit % 8, bit / 8, llmkv_result_string(r));
    }
    TST_EQ(t, bad_flip, 0);
    for (i = 0; i < size; ++i) {
        memcpy(m, buf, size);
        m[i] ^= 0xFF;
        r = hz_load(t, m, size, &leaked);
        if (r == LLMKV_ERR_BAD_FORMAT || (r == LLMKV_ERR_VERSION && i < 64)) continue;
        if (!bad_xor++) fprintf(stderr, "  byte %lu xor 0xFF: %s\n", (unsigned long)i, llmkv_result_string(r));
    }
    TST_EQ(t, bad_xor, 0);
    TST_EQ(t, leaked, 0);
    free(m);
    free(buf);
}

/* Random garbage, with and without a genuine beginning, is BAD_FORMAT
   for load and import. When the kept beginning holds the 8-byte magic,
   the (random) version field after it may be read first: VERSION is then
   a correct answer too. */
static void test_persist_hostile_garbage(tst* t) {
    llmkv_cache* kv = hz_small_cache(t, NULL);
    llmkv_cache* dst;
    unsigned char *buf, *ex, g[4096];
    size_t size = 0, ex_size = 0;
    uint32_t i, n = ps_scaled(300, 30), bad = 0;
    int leaked = 0;
    tst_rng r;
    llmkv_seq s;
    llmkv_stats before;
    qlog lg = {0};
    TST_REQUIRE(t, kv != NULL);
    buf = ps_save(t, kv, 0, &size);
    s.id = 0;
    {
        llmkv_token toks[5] = {1, 2, 3, 4, 5};
        OK(t, ps_make_seq(kv, toks, 3, &s));
    }
    ex = ps_export(t, kv, s, &ex_size);
    dst = hz_small_cache(t, NULL);
    if (!buf || !ex || !dst) {
        free(buf);
        free(ex);
        llmkv_cache_destroy(kv);
        llmkv_cache_destroy(dst);
        TST_REQUIRE(t, 0);
    }
    before = ps_stats(dst);
    r.s = 0x6a7bull;
    for (i = 0; i < n; ++i) {
        size_t len = 1 + tst_below(&r, sizeof g - 1), j, keep, keep_i = 0;
        llmkv_result rl, ri;
        for (j = 0; j < len; ++j) g[j] = (unsigned char)tst_next(&r);
        /* A third keep a genuine prefix (magic, version, kind ...). */
        keep = i % 3 == 1 ? (size_t)tst_below(&r, 96) : 0;
        if (keep > len) keep = len;
        if (keep > size) keep = size;
        memcpy(g, buf, keep);
        rl = hz_load(t, g, len, &leaked);
        if (i % 3 == 2) {
            keep_i = (size_t)tst_below(&r, 96);
            if (keep_i > len) keep_i = len;
            if (keep_i > ex_size) keep_i = ex_size;
            memcpy(g, ex, keep_i);
        } else {
            keep_i = keep;
        }
        ri = hz_import(t, dst, g, len);
        if (!(rl == LLMKV_ERR_BAD_FORMAT || (rl == LLMKV_ERR_VERSION && keep >= 8)) ||
            !(ri == LLMKV_ERR_BAD_FORMAT || (ri == LLMKV_ERR_VERSION && keep_i >= 8))) {
            if (!bad++) fprintf(stderr, "  garbage %u (%lu bytes): load %s, import %s\n", i, (unsigned long)len,
                                llmkv_result_string(rl), llmkv_result_string(ri));
        }
    }
    TST_EQ(t, bad, 0);
    TST_EQ(t, leaked, 0);
    {
        llmkv_stats now = ps_stats(dst);
        TST_CHECK(t, ps_stats_same(t, &lg, &before, &now, NULL, NULL, "after garbage imports"));
        TST_CHECK(t, ps_check_ok(dst));
    }
    free(buf);
    free(ex);
    llmkv_cache_destroy(kv);
    llmkv_cache_destroy(dst);
}

/* Every truncation and bit flip of an exported sequence is refused by
   import, and the target cache is unchanged each time. */
static void test_persist_hostile_import(tst* t) {
    llmkv_cache* src = hz_small_cache(t, NULL);
    llmkv_seq live[2];
    llmkv_cache* dst = hz_small_cache(t, live);
    unsigned char *ex, *m;
    size_t size = 0, len, i;
    uint32_t bit, bad = 0, every_bit = ps_scale() >= 1.0 ? 1u : 8u;
    llmkv_seq s;
    llmkv_token toks[5] = {1, 2, 3, 4, 5};
    ex_snap snap;
    qlog lg = {0};
    llmkv_result r;
    if (!src || !dst) {
        llmkv_cache_destroy(src);
        llmkv_cache_destroy(dst);
        TST_REQUIRE(t, 0);
    }
    OK(t, ps_make_seq(src, toks, 5, &s));
    ex = ps_export(t, src, s, &size);
    TST_REQUIRE(t, ex != NULL);
    m = (unsigned char*)malloc(size);
    TST_REQUIRE(t, m != NULL);
    /* The target's third slot is free and it has room: a valid import
       succeeds (and is freed again by hz_import). */
    TST_EQ(t, hz_import(t, dst, ex, size), LLMKV_OK);
    /* The target's two live sequences are watched. */
    ex_take(dst, live, 2, &snap);
    for (len = 0; len < size; ++len) {
        r = hz_import(t, dst, ex, len);
        if (r != LLMKV_ERR_BAD_FORMAT && !(len == 0 && r == LLMKV_ERR_INVALID_ARGUMENT)) {
            if (!bad++) fprintf(stderr, "  export truncated to %lu of %lu: %s\n", (unsigned long)len,
                                (unsigned long)size, llmkv_result_string(r));
        }
        if (len % 7 == 0) {
            llmkv_stats now = ps_stats(dst);
            if (!ps_stats_same(t, &lg, &snap.st, &now, NULL, NULL, "after a truncated import") || !ps_check_ok(dst))
                bad++;
        }
    }
    for (bit = 0; bit < size * 8; bit += every_bit) {
        memcpy(m, ex, size);
        m[bit / 8] ^= (unsigned char)(1u << (bit % 8));
        r = hz_import(t, dst, m, size);
        if (r != LLMKV_ERR_BAD_FORMAT && !(r == LLMKV_ERR_VERSION && bit / 8 < 64)) {
            if (!bad++) fprintf(stderr, "  export bit %u of byte %u flipped: %s\n", bit % 8, bit / 8,
                                llmkv_result_string(r));
        }
    }
    for (i = 0; i < size; ++i) {
        memcpy(m, ex, size);
        m[i] ^= 0xFF;
        r = hz_import(t, dst, m, size);
        if (r != LLMKV_ERR_BAD_FORMAT && !(r == LLMKV_ERR_VERSION && i < 64)) {
            if (!bad++) fprintf(stderr, "  export byte %lu xor 0xFF: %s\n", (unsigned long)i, llmkv_result_string(r));
        }
    }
    TST_EQ(t, bad, 0);
    TST_CHECK(t, ex_same(t, &lg, dst, &snap, "after hostile imports"));
    free(m);
    free(ex);
    llmkv_cache_destroy(src);
    llmkv_cache_destroy(dst);
}

/* CRC-32C (Castagnoli, reflected 0x82F63B78, initial and final xor
   0xFFFFFFFF), bit by bit: independent of the library's tables. */
static uint32_t hz_crc32c(const unsigned char* p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    size_t i;
    int k;
    for (i = 0; i < n; ++i) {
        c ^= p[i];
        for (k = 0; k < 8; ++k) c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1u)));
    }
    return ~c;
}

static uint32_t hz_rd32(const unsigned char* p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void hz_wr32(unsigned char* p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

/* Header layout (docs/FORMAT.md): 64 bytes; the 8-byte magic, then the
   format major and minor versions as little-endian uint16 at offsets 8
   and 10; the CRC-32C of bytes [0, 60) at offset 60. Sets the versions and
   recomputes the checksum, so only the version is "wrong". Returns 0 when
   the buffer does not follow that layout (its checksum does not verify). */
static int hz_set_version(unsigned char* b, size_t size, uint32_t major, uint32_t minor) {
    if (size < 64 || hz_rd32(b + 60) != hz_crc32c(b, 60)) return 0;
    b[8] = (unsigned char)major;
    b[9] = (unsigned char)(major >> 8);
    b[10] = (unsigned char)minor;
    b[11] = (unsigned char)(minor >> 8);
    hz_wr32(b + 60, hz_crc32c(b, 60));
    return 1;
}

typedef struct hz_log { int n_error; char last[256]; } hz_log;

static void hz_log_fn(void* user, llmkv_log_level level, const char* message) {
    hz_log* l = (hz_log*)user;
    if (level == LLMKV_LOG_ERROR) l->n_error++;
    snprintf(l->last, sizeof l->last, "%s", message ? message : "(null)");
}

/* A file of a newer major format version, otherwise intact, is VERSION
   (load and import; the import target unchanged); a newer minor version
   of the same major still loads (only a newer major is refused). */
static void test_persist_version(tst* t) {
    llmkv_seq live[2];
    llmkv_cache* kv = hz_small_cache(t, live);
    unsigned char *buf, *ex, *m;
    size_t size = 0, ex_size = 0;
    int leaked = 0;
    ex_snap snap;
    qlog lg = {0};
    TST_REQUIRE(t, kv != NULL);
    buf = ps_save(t, kv, 0, &size);
    ex = ps_export(t, kv, live[0], &ex_size);
    m = (unsigned char*)malloc(size > ex_size ? size : ex_size);
    if (!buf || !ex || !m) {
        free(buf);
        free(ex);
        free(m);
        llmkv_cache_destroy(kv);
        TST_REQUIRE(t, 0);
    }
    TST_EQ(t, buf[8] | buf[9] << 8, LLMKV_FORMAT_MAJOR);
    TST_EQ(t, buf[10] | buf[11] << 8, LLMKV_FORMAT_MINOR);
    memcpy(m, buf, size);
    TST_CHECK(t, hz_set_version(m, size, LLMKV_FORMAT_MAJOR + 1, 0)); /* the layout holds */
    TST_EQ(t, hz_load(t, m, size, &leaked), LLMKV_ERR_VERSION);
    /* The load desc's logger says why (one ERROR line at least). */
    {
        llmkv_load_desc ld;
        hz_log lg_v;
        llmkv_cache* c = NULL;
        const void* bb[1];
        size_t ss[1];
        memset(&lg_v, 0, sizeof lg_v);
        memset(&ld, 0, sizeof ld);
        ld.logger.fn = hz_log_fn;
        ld.logger.user = &lg_v;
        bb[0] = m;
        ss[0] = size;
        TST_EQ(t, llmkv_cache_load_mem(bb, ss, 1, &ld, &c), LLMKV_ERR_VERSION);
        TST_CHECK(t, lg_v.n_error >= 1 && lg_v.last[0] != 0);
        memset(&lg_v, 0, sizeof lg_v);
        ss[0] = size - 1; /* truncated */
        memcpy(m, buf, size);
        TST_EQ(t, llmkv_cache_load_mem(bb, ss, 1, &ld, &c), LLMKV_ERR_BAD_FORMAT);
        TST_CHECK(t, lg_v.n_error >= 1 && lg_v.last[0] != 0);
        TST_CHECK(t, c == NULL);
    }
    memcpy(m, buf, size);
    hz_set_version(m, size, 0xFFFF, 0);
    TST_EQ(t, hz_load(t, m, size, &leaked), LLMKV_ERR_VERSION);
    memcpy(m, buf, size);
    hz_set_version(m, size, LLMKV_FORMAT_MAJOR, LLMKV_FORMAT_MINOR + 1);
    TST_EQ(t, hz_load(t, m, size, &leaked), LLMKV_OK);
    /* Import, with the target watched. */
    ex_take(kv, live, 2, &snap);
    memcpy(m, ex, ex_size);
    TST_CHECK(t, hz_set_version(m, ex_size, LLMKV_FORMAT_MAJOR + 1, LLMKV_FORMAT_MINOR));
    TST_EQ(t, hz_import(t, kv, m, ex_size), LLMKV_ERR_VERSION);
    TST_CHECK(t, ex_same(t, &lg, kv, &snap, "after an import of a newer version"));
    TST_EQ(t, leaked, 0);
    free(buf);
    free(ex);
    free(m);
    llmkv_cache_destroy(kv);
}

static uint64_t hz_rd64(const unsigned char* p) { return (uint64_t)hz_rd32(p) | (uint64_t)hz_rd32(p + 4) << 32; }

static void hz_wr64(unsigned char* p, uint64_t v) {
    hz_wr32(p, (uint32_t)v);
    hz_wr32(p + 4, (uint32_t)(v >> 32));
}

/* Offset of the body of the first section tagged `tag` (four characters),
   or 0; *bytes receives its size. Walks the layout of docs/FORMAT.md. */
static size_t hz_find(const unsigned char* b, size_t size, const char* tag, uint64_t* bytes) {
    size_t pos = 64;
    uint32_t want = (uint32_t)(unsigned char)tag[0] | (uint32_t)(unsigned char)tag[1] << 8 |
                    (uint32_t)(unsigned char)tag[2] << 16 | (uint32_t)(unsigned char)tag[3] << 24;
    while (pos + 24 <= size) {
        uint64_t n = hz_rd64(b + pos + 8);
        if (n > size - pos - 24) return 0;
        if (hz_rd32(b + pos) == want) {
            *bytes = n;
            return pos + 16;
        }
        pos += 24 + (size_t)n;
    }
    return 0;
}

/* Recomputes every checksum of a file after its section bodies were
   edited (docs/FORMAT.md): each section's CRC-32C, the identity and
   section count in END, the header's total size and CRC. Returns 0 when
   the buffer does not parse as sections ending with END. */
static int hz_reseal(unsigned char* b, size_t size) {
    size_t pos = 64;
    uint64_t f = 0, parent;
    uint32_t count = 0;
    const uint32_t end_tag = 0x20444E45u; /* "END " */
    if (size < 64) return 0;
    parent = hz_rd64(b + 32);
    hz_wr64(b + 24, (uint64_t)size);
    hz_wr32(b + 60, hz_crc32c(b, 60));
    while (pos + 24 <= size) {
        uint64_t n = hz_rd64(b + pos + 8);
        uint32_t crc;
        if (n > size - pos - 24) return 0;
        if (hz_rd32(b + pos) == end_tag) {
            uint64_t h;
            if (n != 24 || pos + 48 != size) return 0;
            h = f ^ parent * 0xBF58476D1CE4E5B9ull;
            h ^= h >> 31;
            h *= 0x94D049BB133111EBull;
            h ^= h >> 29;
            hz_wr64(b + pos + 16, h ? h : 1);
            hz_wr64(b + pos + 24, parent);
            hz_wr32(b + pos + 32, count);
            hz_wr32(b + pos + 36, 0);
            hz_wr32(b + pos + 40, hz_crc32c(b + pos, 40));
            return 1;
        }
        crc = hz_crc32c(b + pos, 16 + (size_t)n);
        hz_wr32(b + pos + 16 + (size_t)n, crc);
        f ^= crc;
        f *= 0x9E3779B97F4A7C15ull;
        f ^= f >> 29;
        count++;
        pos += 24 + (size_t)n;
    }
    return 0;
}

/* The resealing above reproduces the library's own bytes (so the tests
   built on it edit exactly what they mean to); a minor version's unknown
   section, checksummed, is skipped; a wrong checksum in it is not. */
static void test_persist_format_sections(tst* t) {
    llmkv_seq live[2];
    llmkv_cache* kv = hz_small_cache(t, live);
    unsigned char *buf, *m, *ex;
    size_t size = 0, ex_size = 0;
    uint64_t conf_bytes = 0;
    int leaked = 0;
    TST_REQUIRE(t, kv != NULL);
    buf = ps_save(t, kv, 0, &size);
    ex = ps_export(t, kv, live[0], &ex_size);
    m = (unsigned char*)malloc(size + 64);
    if (!buf || !m || !ex) {
        free(buf);
        free(m);
        free(ex);
        llmkv_cache_destroy(kv);
        TST_REQUIRE(t, 0);
    }
    {
        /* "123456789" -> 0xE3069283 (docs/FORMAT.md) */
        const unsigned char nine[9] = {'1', '2', '3', '4', '5', '6', '7', '8', '9'};
        TST_EQ(t, hz_crc32c(nine, 9), 0xE3069283u);
    }
    memcpy(m, buf, size);
    TST_CHECK(t, hz_reseal(m, size));
    TST_CHECK(t, memcmp(m, buf, size) == 0); /* nothing edited: the same bytes */
    memcpy(m, ex, ex_size);
    TST_CHECK(t, hz_reseal(m, ex_size));
    TST_CHECK(t, memcmp(m, ex, ex_size) == 0);
    TST_CHECK(t, hz_find(buf, size, "CONF", &conf_bytes) == 64 + 16);
    TST_EQ(t, conf_bytes, 72);
    /* An unknown section "XTRA" of 40 bytes right after CONF, with minor
       version 1: loads, and is the same cache. */
    {
        size_t at = 64 + 16 + 72 + 8, i;
        llmkv_cache* c = NULL;
        const void* bb[1];
        size_t ss[1];
        memcpy(m, buf, at);
        memcpy(m + at + 64, buf + at, size - at);
        hz_wr32(m + at, 0x41525458u); /* "XTRA" */
        hz_wr32(m + at + 4, 0);
        hz_wr64(m + at + 8, 40);
        for (i = 0; i < 40; ++i) m[at + 16 + i] = (unsigned char)(i * 37 + 1);
        m[10] = 1; /* minor 1 */
        TST_CHECK(t, hz_reseal(m, size + 64));
        bb[0] = m;
        ss[0] = size + 64;
        TST_EQ(t, llmkv_cache_load_mem(bb, ss, 1, NULL, &c), LLMKV_OK);
        if (c) {
            TST_CHECK(t, ps_gathers_same(kv, c, live[0]));
            TST_CHECK(t, ps_gathers_same(kv, c, live[1]));
            llmkv_cache_destroy(c);
        }
        /* Its checksum wrong: BAD_FORMAT. */
        m[at + 16 + 40] ^= 1;
        TST_EQ(t, hz_load(t, m, size + 64, &leaked), LLMKV_ERR_BAD_FORMAT);
    }
    TST_EQ(t, leaked, 0);
    free(buf);
    free(ex);
    free(m);
    llmkv_cache_destroy(kv);
}

/* A saved thread-safe cache (made by editing the thread_safe field of
   CONF and resealing, so this runs in every build): loads as thread-safe,
   or is UNSUPPORTED under LLMKV_NO_THREADS. */
static void test_persist_thread_safe_flag_load(tst* t) {
    llmkv_seq live[2];
    llmkv_cache* kv = hz_small_cache(t, live);
    unsigned char* buf;
    size_t size = 0, conf;
    uint64_t conf_bytes = 0;
    llmkv_cache* c = NULL;
    const void* bb[1];
    size_t ss[1];
    llmkv_result r;
    TST_REQUIRE(t, kv != NULL);
    buf = ps_save(t, kv, 0, &size);
    if (!buf) {
        llmkv_cache_destroy(kv);
        TST_REQUIRE(t, 0);
    }
    conf = hz_find(buf, size, "CONF", &conf_bytes);
    TST_CHECK(t, conf != 0 && conf_bytes == 72);
    if (conf && conf_bytes == 72) {
        TST_EQ(t, hz_rd32(buf + conf + 52), 0); /* thread_safe, the 14th u32 */
        hz_wr32(buf + conf + 52, 1);
        TST_CHECK(t, hz_reseal(buf, size));
        bb[0] = buf;
        ss[0] = size;
        c = (llmkv_cache*)buf;
        r = llmkv_cache_load_mem(bb, ss, 1, NULL, &c);
#ifdef LLMKV_NO_THREADS
        TST_EQ(t, r, LLMKV_ERR_UNSUPPORTED);
        TST_CHECK(t, c == NULL);
#else
        TST_EQ(t, r, LLMKV_OK);
        if (r == LLMKV_OK && c) {
            llmkv_desc d;
            memset(&d, 0, sizeof d);
            OK(t, llmkv_cache_desc(c, &d));
            TST_EQ(t, d.thread_safe, 1);
            TST_CHECK(t, ps_gathers_same(kv, c, live[0]));
            TST_CHECK(t, ps_check_ok(c));
            llmkv_cache_destroy(c);
        }
#endif
    }
    free(buf);
    llmkv_cache_destroy(kv);
}

/* Crafted input: random edits of section bodies with every checksum made
   valid again. The loader must refuse what is inconsistent (BAD_FORMAT),
   may run out of memory on absurd sizes (the allocator here refuses more
   than 64 MiB), and must never crash, leak or hand out a cache that fails
   its own checker. */
typedef struct hz_cap { falloc fa; int refused; } hz_cap;

static void* hz_cap_alloc(size_t size, size_t align, void* user) {
    hz_cap* c = (hz_cap*)user;
    if (size > ((size_t)64 << 20)) {
        c->refused = 1;
        return NULL;
    }
    return f_alloc(size, align, &c->fa);
}

static void hz_cap_free(void* p, size_t size, void* user) { f_free(p, size, &((hz_cap*)user)->fa); }

static void hz_crafted_one(tst* t, llmkv_cache* kv, const char* what, uint32_t n_mut, unsigned long long seed) {
    unsigned char *buf, *m;
    size_t size = 0;
    uint32_t i, ok = 0, bad = 0, oom = 0, wrong = 0;
    tst_rng r;
    buf = ps_save(t, kv, 0, &size);
    m = (unsigned char*)malloc(size ? size : 1);
    if (!buf || !m) {
        free(buf);
        free(m);
        return;
    }
    r.s = seed;
    for (i = 0; i < n_mut; ++i) {
        size_t pos = 64, secs[32], lens[32];
        uint32_t ns = 0, k, edits;
        hz_cap cap;
        llmkv_load_desc ld;
        llmkv_cache* c = NULL;
        const void* bb[1];
        size_t ss[1];
        llmkv_result res;
        memcpy(m, buf, size);
        while (pos + 24 <= size && ns < 32) {
            uint64_t n = hz_rd64(m + pos + 8);
            if (hz_rd32(m + pos) == 0x20444E45u) break; /* END */
            secs[ns] = pos + 16;
            lens[ns++] = (size_t)n;
            pos += 24 + (size_t)n;
        }
        if (!ns) break;
        edits = 1 + tst_below(&r, 3);
        for (k = 0; k < edits; ++k) {
            uint32_t s = tst_below(&r, ns);
            size_t off;
            if (lens[s] < 4) continue;
            off = secs[s] + (tst_below(&r, (uint32_t)(lens[s] / 4))) * 4;
            switch (tst_below(&r, 6)) {
            case 0: hz_wr32(m + off, 0); break;
            case 1: hz_wr32(m + off, 0xFFFFFFFFu); break;
            case 2: hz_wr32(m + off, hz_rd32(m + off) + 1); break;
            case 3: hz_wr32(m + off, hz_rd32(m + off) - 1); break;
            case 4: hz_wr32(m + off, tst_below(&r, 64)); break;
            default: m[off + tst_below(&r, 4)] ^= (unsigned char)(1u << tst_below(&r, 8)); break;
            }
        }
        if (!hz_reseal(m, size)) {
            wrong++;
            continue;
        }
        memset(&cap, 0, sizeof cap);
        f_init(&cap.fa);
        memset(&ld, 0, sizeof ld);
        ld.allocator.alloc = hz_cap_alloc;
        ld.allocator.free = hz_cap_free;
        ld.allocator.user = &cap;
        bb[0] = m;
        ss[0] = size;
        res = llmkv_cache_load_mem(bb, ss, 1, &ld, &c);
        if (res == LLMKV_OK) {
            llmkv_seq h;
            ok++;
            if (!ps_check_ok(c)) wrong++;
            /* It works: a new sequence comes and goes. */
            if (llmkv_seq_create(c, &h) == LLMKV_OK) {
                if (llmkv_reserve(c, h, 1) == LLMKV_OK) ps_stats(c);
                if (llmkv_seq_free(c, h) != LLMKV_OK) wrong++;
            }
            {
                /* The prefix index (LRU list, hash chains) holds up. */
                llmkv_desc cd;
                llmkv_token probe[6] = {1, 2, 3, 4, 5, 6};
                uint32_t mm = 0;
                if (llmkv_cache_desc(c, &cd) == LLMKV_OK && cd.prefix_index) {
                    if (llmkv_prefix_match(c, 0, probe, 6, &mm) != LLMKV_OK) wrong++;
                    if (llmkv_prefix_evict(c, UINT32_MAX, NULL) != LLMKV_OK) wrong++;
                }
            }
            if (!ps_check_ok(c)) wrong++;
            llmkv_cache_destroy(c);
        } else if (res == LLMKV_ERR_BAD_FORMAT) {
            bad++;
            if (c) wrong++;
        } else if (res == LLMKV_ERR_OUT_OF_MEMORY && cap.refused) {
            oom++;
        } else if (res == LLMKV_ERR_UNSUPPORTED && hz_rd32(m + 64 + 16 + 52) != 0) {
            /* The edit turned CONF's thread_safe on. */
#ifndef LLMKV_NO_THREADS
            wrong++;
#endif
        } else {
            if (!wrong) fprintf(stderr, "  %s: crafted edit %u: %s\n", what, i, llmkv_result_string(res));
            wrong++;
        }
        if (cap.fa.n_blocks || cap.fa.errors) wrong++;
        f_done(&cap.fa);
    }
    if (t->verbose) fprintf(stderr, "  %s: %u loaded, %u BAD_FORMAT, %u OOM\n", what, ok, bad, oom);
    TST_EQ(t, wrong, 0);
    TST_CHECK(t, bad > 0);
    free(buf);
    free(m);
}

static void test_persist_crafted(tst* t) {
    uint32_t n = ps_scaled(1500, 100);
    llmkv_cache* kv = hz_small_cache(t, NULL);
    if (kv) hz_crafted_one(t, kv, "small index cache", n, 0xc4af7ull);
    llmkv_cache_destroy(kv);
    {
        /* Q4C staging, and a metadata-only cache with pending copies. */
        llmkv_desc d = tst_desc(1, 2, 16, 32, 6, LLMKV_DTYPE_Q4C, LLMKV_DTYPE_Q8);
        llmkv_token toks[80];
        llmkv_seq s, f;
        uint32_t i;
        for (i = 0; i < 80; ++i) toks[i] = (llmkv_token)i;
        d.max_seqs = 3;
        kv = ps_create(t, &d);
        if (kv) {
            OK(t, ps_make_seq(kv, toks, 45, &s));
            OK(t, llmkv_fork(kv, s, &f));
            hz_crafted_one(t, kv, "q4c cache", n / 2, 0xc4af8ull);
        }
        llmkv_cache_destroy(kv);
        d = tst_desc(2, 1, 8, 4, 12, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
        d.storage = LLMKV_STORAGE_METADATA_ONLY;
        d.prefix_index = 1;
        d.max_seqs = 3;
        kv = ps_create(t, &d);
        if (kv) {
            OK(t, llmkv_seq_create(kv, &s));
            OK(t, llmkv_reserve_tokens(kv, s, toks, 6));
            OK(t, llmkv_seq_mark_written(kv, s, 6));
            OK(t, llmkv_fork(kv, s, &f));
            OK(t, llmkv_reserve(kv, s, 1)); /* a copy command */
            hz_crafted_one(t, kv, "metadata-only cache", n / 2, 0xc4af9ull);
        }
        llmkv_cache_destroy(kv);
    }
}

/* ------------------------------------------------------------------------ */
/* Allocation faults                                                        */
/* ------------------------------------------------------------------------ */

/* load_mem with the k-th allocation failing, k = 1, 2, ... until it
   succeeds: OUT_OF_MEMORY, nothing created, nothing left allocated; the
   final load equals the original. Also for a chain with an increment. */
static void test_persist_load_oom(tst* t) {
    pw_cfg cfg = {"oom", LLMKV_DTYPE_Q4C, LLMKV_DTYPE_F16, 32, 12, 16, 4, 1, 0};
    llmkv_desc d = pw_desc(&cfg);
    pw* w = (pw*)calloc(1, sizeof(pw));
    pw* wbase = (pw*)calloc(1, sizeof(pw));
    llmkv_cache* a;
    unsigned char *base = NULL, *inc = NULL;
    size_t base_sz = 0, inc_sz = 0;
    uint32_t nbuf;
    if (!w || !wbase) {
        free(w);
        free(wbase);
        TST_REQUIRE(t, 0);
    }
    pw_init(w, t, &d, 0x00aull);
    a = ps_create(t, &d);
    if (!a) {
        free(w);
        free(wbase);
        return;
    }
    w->kv[0] = a;
    w->n_kv = 1;
    pw_run(w, ps_scaled(80, 20), "workload");
    base = ps_save(t, a, LLMKV_SAVE_CHECKPOINT, &base_sz);
    *wbase = *w; /* the handles as of the base */
    pw_run(w, 10, "more");
    inc = ps_save(t, a, LLMKV_SAVE_INCREMENTAL, &inc_sz);
    for (nbuf = 1; base && inc && nbuf <= 2; ++nbuf) {
        const void* bufs[2];
        size_t sizes[2];
        long k;
        int done = 0;
        llmkv_cache* ref = NULL;
        bufs[0] = base;
        bufs[1] = inc;
        sizes[0] = base_sz;
        sizes[1] = inc_sz;
        /* The reference: the same load without faults. */
        OK(t, llmkv_cache_load_mem(bufs, sizes, nbuf, NULL, &ref));
        for (k = 1; k < 1000 && !done; ++k) {
            falloc fa;
            llmkv_load_desc ld;
            llmkv_cache* out = (llmkv_cache*)&fa; /* must be overwritten */
            llmkv_result r;
            f_init(&fa);
            fa.fail_at = k;
            memset(&ld, 0, sizeof ld);
            ld.allocator = f_allocator(&fa);
            r = llmkv_cache_load_mem(bufs, sizes, nbuf, &ld, &out);
            if (r == LLMKV_OK) {
                TST_CHECK(t, fa.calls < k); /* succeeded only once no call failed */
                if (ref && out) {
                    pw* ww = nbuf == 1 ? wbase : w;
                    ww->phase = "load with a failing allocator";
                    pw_same(ww, ref, out); /* both fresh loads of the same input */
                }
                llmkv_cache_destroy(out);
                done = 1;
            } else {
                TST_EQ(t, r, LLMKV_ERR_OUT_OF_MEMORY);
                TST_CHECK(t, out == NULL);
            }
            TST_EQ(t, fa.n_blocks, 0);
            TST_EQ(t, fa.errors, 0);
            f_done(&fa);
        }
        TST_CHECK(t, done);
        llmkv_cache_destroy(ref);
    }
    free(base);
    free(inc);
    llmkv_cache_destroy(a);
    free(w);
    free(wbase);
}

/* Import with conversion (and import_file) through a cache whose
   allocator fails its k-th call after creation: OUT_OF_MEMORY leaves the
   cache as it was; the first success equals the reference. */
static void test_persist_import_oom(tst* t) {
    llmkv_desc ds = tst_desc(2, 2, 40, 16, 16, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    llmkv_desc dd = tst_desc(2, 2, 40, 32, 16, LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q4);
    llmkv_cache *src, *ref;
    llmkv_token toks[EX_LEN];
    llmkv_seq s, rs;
    unsigned char *ex, *g = NULL;
    size_t size = 0, gb = 0;
    char dir[64], path[128];
    int mode, have_dir;
    llmkv_result r;
    ds.max_seqs = dd.max_seqs = 3;
    src = ps_create(t, &ds);
    ref = ps_create(t, &dd);
    TST_REQUIRE(t, src && ref);
    ex_tokens(toks, EX_LEN, 8);
    OK(t, ps_make_seq(src, toks, EX_LEN, &s));
    ex = ps_export(t, src, s, &size);
    TST_REQUIRE(t, ex != NULL);
    OK(t, llmkv_seq_import(ref, ex, size, &rs, NULL));
    g = ps_gather_all(ref, rs, &gb, &r);
    TST_REQUIRE(t, g != NULL);
    have_dir = ps_tmpdir(dir, sizeof dir);
    TST_CHECK(t, have_dir);
    snprintf(path, sizeof path, "%s/s.kvs", dir);
    if (have_dir) OK(t, llmkv_seq_export_file(src, s, path, NULL));
    for (mode = 0; mode < (have_dir ? 2 : 1); ++mode) {
        long k;
        int done = 0;
        for (k = 1; k < 200 && !done; ++k) {
            falloc fa;
            llmkv_cache* dst = NULL;
            llmkv_seq other, imp;
            long created;
            uint32_t n_shared = 3;
            ex_snap snap;
            qlog lg = {0};
            f_init(&fa);
            dd.allocator = f_allocator(&fa);
            OK(t, llmkv_cache_create(&dd, &dst));
            if (!dst) {
                f_done(&fa);
                break;
            }
            OK(t, ps_make_seq(dst, toks, 20, &other));
            created = fa.calls;
            ex_take(dst, &other, 1, &snap);
            fa.fail_at = created + k;
            imp.id = 9;
            r = mode == 0 ? llmkv_seq_import(dst, ex, size, &imp, &n_shared)
                          : llmkv_seq_import_file(dst, path, NULL, &imp, &n_shared);
            if (r == LLMKV_OK) {
                TST_CHECK(t, fa.calls < created + k);
                TST_CHECK(t, ps_gather_is(dst, imp, g, gb));
                ex_free(&snap);
                done = 1;
            } else {
                TST_EQ(t, r, LLMKV_ERR_OUT_OF_MEMORY);
                TST_EQ(t, imp.id, 0);
                TST_EQ(t, n_shared, 0);
                TST_CHECK(t, ex_same(t, &lg, dst, &snap, mode ? "import_file OOM" : "import OOM"));
            }
            llmkv_cache_destroy(dst);
            TST_EQ(t, fa.n_blocks, 0);
            TST_EQ(t, fa.errors, 0);
            f_done(&fa);
        }
        TST_CHECK(t, done);
    }
    if (have_dir) ps_rmdir(dir);
    free(ex);
    free(g);
    llmkv_cache_destroy(src);
    llmkv_cache_destroy(ref);
}

/* ------------------------------------------------------------------------ */
/* File faults: llmkv_file_ops over POSIX calls, failing on demand          */
/* ------------------------------------------------------------------------ */

typedef struct ff_ops {
    long calls;            /* ops so far (any op) */
    long fail_at;          /* FF_ANY: fail op number fail_at; FF_HALF: write number fail_at */
    int mode;
    long writes, reads;
    int fired;             /* the injected failure happened */
    const char* fired_op;
    int renamed;           /* a rename succeeded */
    int renamed_before_fire;
    int open_files;        /* handles open now */
    long opened;
    size_t delivered;      /* bytes read so far */
} ff_ops;

/* FF_ANY: op number fail_at fails; FF_HALF: write number fail_at writes
   half its bytes and fails; FF_SHORT_READ: reads end at byte fail_at. */
enum { FF_ANY = 0, FF_HALF = 1, FF_SHORT_READ = 2 };

typedef struct ff_file { int fd; } ff_file;

static int ff_inject(ff_ops* f, const char* op) {
    f->calls++;
    if (f->mode == FF_ANY && f->fail_at && f->calls == f->fail_at) {
        f->fired = 1;
        f->fired_op = op;
        f->renamed_before_fire = f->renamed;
        return 1;
    }
    return 0;
}

static void* ff_open_write(void* user, const char* path) {
    ff_ops* f = (ff_ops*)user;
    ff_file* h;
    int fd;
    if (ff_inject(f, "open_write")) return NULL;
    fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return NULL;
    h = (ff_file*)malloc(sizeof *h);
    if (!h) {
        close(fd);
        return NULL;
    }
    h->fd = fd;
    f->open_files++;
    f->opened++;
    return h;
}

static int ff_write_all(int fd, const unsigned char* p, size_t n) {
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int ff_write(void* user, void* file, const void* data, size_t n) {
    ff_ops* f = (ff_ops*)user;
    ff_file* h = (ff_file*)file;
    if (ff_inject(f, "write")) return -1;
    f->writes++;
    if (f->mode == FF_HALF && f->fail_at && f->writes == f->fail_at) {
        f->fired = 1;
        f->fired_op = "write (half)";
        f->renamed_before_fire = f->renamed;
        ff_write_all(h->fd, (const unsigned char*)data, n / 2);
        return -1;
    }
    return ff_write_all(h->fd, (const unsigned char*)data, n);
}

static int ff_sync(void* user, void* file) {
    ff_ops* f = (ff_ops*)user;
    if (ff_inject(f, "sync")) return -1;
    return fsync(((ff_file*)file)->fd) == 0 ? 0 : -1;
}

static int ff_close(void* user, void* file) {
    ff_ops* f = (ff_ops*)user;
    ff_file* h = (ff_file*)file;
    int fail = ff_inject(f, "close"), rc;
    rc = close(h->fd); /* released even when the close "fails" */
    free(h);
    f->open_files--;
    return fail || rc != 0 ? -1 : 0;
}

static int ff_rename(void* user, const char* from, const char* to) {
    ff_ops* f = (ff_ops*)user;
    if (ff_inject(f, "rename")) return -1;
    if (rename(from, to) != 0) return -1;
    f->renamed = 1;
    return 0;
}

/* `path` names a file (then its directory is flushed) or a directory. */
static int ff_sync_dir(void* user, const char* path) {
    ff_ops* f = (ff_ops*)user;
    char dir[512];
    struct stat st;
    int fd, rc;
    if (ff_inject(f, "sync_dir")) return -1;
    snprintf(dir, sizeof dir, "%s", path);
    if (stat(dir, &st) != 0 || !S_ISDIR(st.st_mode)) {
        char* slash = strrchr(dir, '/');
        if (slash == dir) dir[1] = 0;
        else if (slash) *slash = 0;
        else snprintf(dir, sizeof dir, ".");
    }
    fd = open(dir, O_RDONLY);
    if (fd < 0) return -1;
    rc = fsync(fd);
    close(fd);
    return rc == 0 ? 0 : -1;
}

static int ff_remove(void* user, const char* path) {
    ff_ops* f = (ff_ops*)user;
    if (ff_inject(f, "remove")) return -1;
    return unlink(path) == 0 ? 0 : -1;
}

static void* ff_open_read(void* user, const char* path) {
    ff_ops* f = (ff_ops*)user;
    ff_file* h;
    int fd;
    if (ff_inject(f, "open_read")) return NULL;
    fd = open(path, O_RDONLY);
    if (fd < 0) return NULL;
    h = (ff_file*)malloc(sizeof *h);
    if (!h) {
        close(fd);
        return NULL;
    }
    h->fd = fd;
    f->open_files++;
    f->opened++;
    return h;
}

static int ff_read(void* user, void* file, void* data, size_t n, size_t* got) {
    ff_ops* f = (ff_ops*)user;
    ff_file* h = (ff_file*)file;
    unsigned char* p = (unsigned char*)data;
    size_t done = 0;
    *got = 0;
    if (ff_inject(f, "read")) return -1;
    f->reads++;
    if (f->mode == FF_SHORT_READ && f->delivered + n > (size_t)f->fail_at) {
        /* The file seems to end at byte fail_at (a truncated file). */
        f->fired = 1;
        f->fired_op = "read (short)";
        n = (size_t)f->fail_at - f->delivered;
    }
    while (done < n) {
        ssize_t r = read(h->fd, p + done, n - done);
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) break;
        done += (size_t)r;
    }
    *got = done;
    f->delivered += done;
    return 0;
}

static llmkv_file_ops ff_make(ff_ops* f) {
    llmkv_file_ops o;
    o.open_write = ff_open_write;
    o.write = ff_write;
    o.sync = ff_sync;
    o.close = ff_close;
    o.rename = ff_rename;
    o.sync_dir = ff_sync_dir;
    o.remove = ff_remove;
    o.open_read = ff_open_read;
    o.read = ff_read;
    o.user = f;
    return o;
}

static void ff_reset(ff_ops* f, int mode, long fail_at) {
    memset(f, 0, sizeof *f);
    f->mode = mode;
    f->fail_at = fail_at;
}

/* Loads path (POSIX ops) and compares it with the state w describes in
   cache ref (a difference is reported as a failure). */
static int ff_file_is(pw* w, llmkv_cache* ref, const char* path) {
    const char* paths[1];
    llmkv_cache* c = NULL;
    int same = 0;
    paths[0] = path;
    if (llmkv_cache_load_file(paths, 1, NULL, &c) == LLMKV_OK) {
        same = pw_same(w, ref, c);
    }
    llmkv_cache_destroy(c);
    return same;
}

/* Save version B over version A with the k-th file op failing (any op),
   or the k-th write writing half its data and failing: the call fails
   with LLMKV_ERR_IO and the file at the path is still A, byte for byte.
   Then the same for llmkv_seq_export_file, and the read side of
   load_file / import_file. */
static void test_persist_file_faults(tst* t) {
    pw_cfg cfg = {"file faults", LLMKV_DTYPE_F16, LLMKV_DTYPE_FP8, 16, 20, 8, 5, 1, 0};
    llmkv_desc d = pw_desc(&cfg);
    pw* w = (pw*)calloc(1, sizeof(pw));
    pw* wa = (pw*)calloc(1, sizeof(pw));
    llmkv_cache *ka = NULL, *kb = NULL;
    char dir[64], path[128], tmp[136];
    unsigned char *file_a = NULL, *abuf = NULL;
    size_t file_a_sz = 0, abuf_sz = 0;
    ff_ops f;
    llmkv_file_ops ops;
    int mode, after_rename_new = 0;
    long max_calls = 0;
    if (!w || !wa || !ps_tmpdir(dir, sizeof dir)) {
        free(w);
        free(wa);
        TST_REQUIRE(t, 0 && "setup");
    }
    snprintf(path, sizeof path, "%s/c.kv", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    pw_init(w, t, &d, 0xfa17ull);
    ka = ps_create(t, &d);
    if (!ka) goto done;
    w->kv[0] = ka;
    w->n_kv = 1;
    pw_run(w, ps_scaled(100, 20), "state A");
    *wa = *w;
    abuf = ps_save(t, ka, 0, &abuf_sz);
    if (!abuf || ps_load1(abuf, abuf_sz, &kb) != LLMKV_OK) goto done;
    w->kv[0] = kb;
    pw_run(w, ps_scaled(40, 10), "state B");
    if (w->bad) goto done;

    for (mode = FF_ANY; mode <= FF_HALF; ++mode) {
        long k;
        int finished = 0;
        /* Version A, saved without faults, read back. */
        ff_reset(&f, FF_ANY, 0);
        ops = ff_make(&f);
        OK(t, llmkv_cache_save_file(ka, 0, path, &ops));
        free(file_a);
        file_a = ps_read_file(path, &file_a_sz);
        TST_REQUIRE(t, file_a != NULL);
        for (k = 1; k < 5000 && !finished; ++k) {
            llmkv_result r;
            unsigned char* now;
            size_t now_sz = 0;
            ff_reset(&f, mode, k);
            ops = ff_make(&f);
            r = llmkv_cache_save_file(kb, 0, path, &ops);
            TST_EQ(t, f.open_files, 0);
            if (!f.fired) {
                /* Past the last op (or write): the save succeeds. */
                TST_EQ(t, r, LLMKV_OK);
                TST_CHECK(t, !ps_exists(tmp));
                TST_CHECK(t, ff_file_is(w, kb, path));
                if (mode == FF_ANY) max_calls = f.calls;
                finished = 1;
                break;
            }
            now = ps_read_file(path, &now_sz);
            if (r == LLMKV_OK) {
                /* Only a failed remove may be ignored (a stale temporary
                   that is not there); the save then did its job. */
                if (strcmp(f.fired_op, "remove") != 0)
                    fprintf(stderr, "  k=%ld: save succeeded although %s failed\n", k, f.fired_op);
                TST_CHECK(t, strcmp(f.fired_op, "remove") == 0);
                TST_CHECK(t, ff_file_is(w, kb, path));
            } else {
                if (r != LLMKV_ERR_IO) fprintf(stderr, "  k=%ld (%s failed): %s\n", k, f.fired_op,
                                               llmkv_result_string(r));
                TST_EQ(t, r, LLMKV_ERR_IO);
                if (f.renamed_before_fire) {
                    /* The failure came after the rename: only the
                       directory flush is left, and docs/FORMAT.md ("Crash
                       safety") says it is reported with the new file in
                       place (no POSIX call could bring A back). */
                    TST_CHECK(t, strcmp(f.fired_op, "sync_dir") == 0);
                    TST_CHECK(t, ff_file_is(w, kb, path));
                    TST_CHECK(t, !ps_exists(tmp));
                    after_rename_new++;
                } else {
                    int is_a = now && now_sz == file_a_sz && memcmp(now, file_a, now_sz) == 0;
                    if (!is_a)
                        fprintf(stderr, "  k=%ld mode %d: %s failed and the file is not version A (%lu bytes)\n", k,
                                mode, f.fired_op, (unsigned long)now_sz);
                    TST_CHECK(t, is_a);
                    if (is_a && (k % 5 == 1 || mode == FF_HALF)) TST_CHECK(t, ff_file_is(wa, ka, path));
                }
                if (strcmp(f.fired_op, "remove") != 0) {
                    if (ps_exists(tmp)) fprintf(stderr, "  k=%ld: %s failed and %s remains\n", k, f.fired_op, tmp);
                    TST_CHECK(t, !ps_exists(tmp));
                }
            }
            free(now);
            /* Back to version A for the next attempt. */
            unlink(tmp);
            {
                unsigned char* again;
                size_t again_sz = 0;
                again = ps_read_file(path, &again_sz);
                if (!again || again_sz != file_a_sz || memcmp(again, file_a, again_sz) != 0) {
                    FILE* out = fopen(path, "wb");
                    if (out) {
                        fwrite(file_a, 1, file_a_sz, out);
                        fclose(out);
                    }
                }
                free(again);
            }
            if (w->bad) break;
        }
        TST_CHECK(t, finished);
    }
    TST_EQ(t, after_rename_new, 1); /* the directory flush, in FF_ANY mode only */
    TST_CHECK(t, max_calls >= 6);   /* open, write, sync, close, rename, sync_dir at least */

    /* The read side: load_file with the k-th op failing: IO, nothing
       created, nothing leaked, every handle closed. Reads that end early
       (the file seen cut at byte k * size / 16) are BAD_FORMAT. */
    for (mode = FF_ANY; mode <= FF_SHORT_READ; mode += 2) {
        long k;
        int finished = 0;
        for (k = 1; k < 5000 && !finished; ++k) {
            if (mode == FF_SHORT_READ && k == 16) break;
            falloc fa;
            llmkv_load_desc ld;
            llmkv_cache* out = (llmkv_cache*)&fa;
            const char* paths[1];
            llmkv_result r;
            {
                struct stat st;
                long cut = stat(path, &st) == 0 ? (long)st.st_size * k / 16 : 0;
                ff_reset(&f, mode, mode == FF_SHORT_READ ? cut : k);
            }
            ops = ff_make(&f);
            f_init(&fa);
            memset(&ld, 0, sizeof ld);
            ld.allocator = f_allocator(&fa);
            ld.file_ops = &ops;
            paths[0] = path;
            r = llmkv_cache_load_file(paths, 1, &ld, &out);
            TST_EQ(t, f.open_files, 0);
            if (!f.fired) {
                TST_EQ(t, r, LLMKV_OK);
                llmkv_cache_destroy(out);
                finished = 1;
            } else {
                /* The file_ops contract: a failing op fails the call with
                   LLMKV_ERR_IO, except a close after everything was read
                   and checked, which is ignored. */
                llmkv_result want = strcmp(f.fired_op, "close") == 0 ? LLMKV_OK
                                    : mode == FF_ANY                 ? LLMKV_ERR_IO
                                                                     : LLMKV_ERR_BAD_FORMAT;
                if (r != want)
                    fprintf(stderr, "  load k=%ld: %s failed: %s\n", k, f.fired_op, llmkv_result_string(r));
                TST_EQ(t, r, want);
                if (r == LLMKV_OK) llmkv_cache_destroy(out);
                else TST_CHECK(t, out == NULL);
            }
            TST_EQ(t, fa.n_blocks, 0);
            TST_EQ(t, fa.errors, 0);
            f_done(&fa);
        }
        if (mode == FF_ANY) TST_CHECK(t, finished);
    }

    /* Sequence export files: the same discipline. */
    {
        char spath[128], stmp[136];
        pw_seq* sa = NULL;
        pw_seq* sb = NULL;
        uint32_t i;
        unsigned char* prev = NULL;
        size_t prev_sz = 0;
        long k;
        int finished = 0;
        snprintf(spath, sizeof spath, "%s/s.kvs", dir);
        snprintf(stmp, sizeof stmp, "%s.tmp", spath);
        for (i = 0; i < w->n_s; ++i) {
            if (w->s[i].live && pw_len(w, 0, w->s[i].h) > 0) {
                if (!sa) sa = &w->s[i];
                else if (!sb) sb = &w->s[i];
            }
        }
        if (sa && sb) {
            ff_reset(&f, FF_ANY, 0);
            ops = ff_make(&f);
            OK(t, llmkv_seq_export_file(kb, sa->h, spath, &ops));
            prev = ps_read_file(spath, &prev_sz);
            for (k = 1; k < 5000 && !finished && prev; ++k) {
                llmkv_result r;
                unsigned char* now;
                size_t now_sz = 0;
                ff_reset(&f, FF_ANY, k);
                ops = ff_make(&f);
                r = llmkv_seq_export_file(kb, sb->h, spath, &ops);
                TST_EQ(t, f.open_files, 0);
                if (!f.fired) {
                    TST_EQ(t, r, LLMKV_OK);
                    finished = 1;
                    break;
                }
                now = ps_read_file(spath, &now_sz);
                if (r != LLMKV_OK && !f.renamed_before_fire) {
                    TST_EQ(t, r, LLMKV_ERR_IO);
                    TST_CHECK(t, now && now_sz == prev_sz && memcmp(now, prev, now_sz) == 0);
                    if (strcmp(f.fired_op, "remove") != 0) TST_CHECK(t, !ps_exists(stmp));
                } else if (r == LLMKV_OK) {
                    TST_CHECK(t, strcmp(f.fired_op, "remove") == 0);
                } else {
                    TST_EQ(t, r, LLMKV_ERR_IO);
                }
                free(now);
                unlink(stmp);
                {
                    FILE* out = fopen(spath, "wb");
                    if (out) {
                        fwrite(prev, 1, prev_sz, out);
                        fclose(out);
                    }
                }
            }
            TST_CHECK(t, finished);
            /* The final file imports sb's data; import_file read faults
               are IO and change nothing. */
            {
                llmkv_seq imp;
                size_t gb = 0;
                llmkv_result r;
                unsigned char* g = ps_gather_all(kb, sb->h, &gb, &r);
                llmkv_cache* dst = ps_create(t, &d);
                if (dst && g) {
                    ex_snap snap;
                    qlog lg = {0};
                    int fin = 0;
                    ex_take(dst, NULL, 0, &snap);
                    for (k = 1; k < 1000 && !fin; ++k) {
                        ff_reset(&f, FF_ANY, k);
                        ops = ff_make(&f);
                        imp.id = 5;
                        r = llmkv_seq_import_file(dst, spath, &ops, &imp, NULL);
                        TST_EQ(t, f.open_files, 0);
                        if (!f.fired) {
                            TST_EQ(t, r, LLMKV_OK);
                            TST_CHECK(t, ps_gather_is(dst, imp, g, gb));
                            fin = 1;
                        } else if (r == LLMKV_OK) {
                            /* only a failing close of the fully read file is ignored */
                            if (strcmp(f.fired_op, "close") != 0)
                                fprintf(stderr, "  import_file k=%ld: %s failed: LLMKV_OK\n", k, f.fired_op);
                            TST_CHECK(t, strcmp(f.fired_op, "close") == 0);
                            TST_CHECK(t, ps_gather_is(dst, imp, g, gb));
                            OK(t, llmkv_seq_free(dst, imp)); /* keep testing the later ops */
                            OK(t, llmkv_prefix_evict(dst, UINT32_MAX, NULL));
                            ex_free(&snap);
                            ex_take(dst, NULL, 0, &snap);
                        } else {
                            if (r != LLMKV_ERR_IO)
                                fprintf(stderr, "  import_file k=%ld: %s failed: %s\n", k, f.fired_op,
                                        llmkv_result_string(r));
                            TST_EQ(t, r, LLMKV_ERR_IO);
                            TST_EQ(t, imp.id, 0);
                            {
                                llmkv_stats now = ps_stats(dst);
                                TST_CHECK(t, ps_stats_same(t, &lg, &snap.st, &now, NULL, NULL, "import_file fault"));
                            }
                        }
                    }
                    TST_CHECK(t, fin);
                    ex_free(&snap);
                }
                free(g);
                llmkv_cache_destroy(dst);
            }
        }
        free(prev);
    }
done:
    if (w->bad) fprintf(stderr, "  (file faults)\n");
    llmkv_cache_destroy(ka);
    llmkv_cache_destroy(kb);
    free(file_a);
    free(abuf);
    ps_rmdir(dir);
    free(w);
    free(wa);
}

/* ------------------------------------------------------------------------ */
/* A saving process killed at random moments                                */
/* ------------------------------------------------------------------------ */

#define KT_SEQS 3

/* Digest of the sequences hs of a cache: lengths, page tables, bytes. */
static uint64_t kt_digest(llmkv_cache* kv, const llmkv_seq* hs) {
    uint64_t h = 1469598103934665603ull;
    uint32_t i;
    for (i = 0; i < KT_SEQS; ++i) {
        uint32_t len = 0, np = 0, pages[64];
        size_t gb = 0;
        llmkv_result r;
        unsigned char* g;
        memset(pages, 0, sizeof pages);
        if (llmkv_seq_length(kv, hs[i], &len) != LLMKV_OK) return 0;
        llmkv_seq_pages(kv, hs[i], pages, 64, &np);
        h = ps_fnv(h, &len, sizeof len);
        h = ps_fnv(h, pages, sizeof pages);
        g = ps_gather_all(kv, hs[i], &gb, &r);
        if (!g) return 0;
        h = ps_fnv(h, g, gb);
        free(g);
    }
    return h;
}

/* A child saves two alternating states to one path in a loop and is
   killed with SIGKILL after 0..50 ms: the file always loads and is one of
   the two states. */
static void test_persist_kill_while_saving(tst* t) {
    llmkv_desc d = tst_desc(4, 4, 64, 16, 64, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16); /* 64 KiB pages, 4 MiB */
    llmkv_cache *kx, *ky;
    llmkv_seq hx[KT_SEQS], hy[KT_SEQS];
    llmkv_token toks[400];
    uint32_t i, trials = ps_scaled(20, 4), seen_x = 0, seen_y = 0;
    uint64_t dx, dy;
    char dir[64], path[128], tmp[136];
    tst_rng rng;
    d.max_seqs = 4;
    kx = ps_create(t, &d);
    ky = ps_create(t, &d);
    if (!kx || !ky || !ps_tmpdir(dir, sizeof dir)) {
        llmkv_cache_destroy(kx);
        llmkv_cache_destroy(ky);
        TST_REQUIRE(t, 0 && "setup");
    }
    snprintf(path, sizeof path, "%s/k.kv", dir);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    for (i = 0; i < KT_SEQS; ++i) {
        uint32_t j;
        for (j = 0; j < 400; ++j) toks[j] = (llmkv_token)(j + 1000 * i);
        OK(t, ps_make_seq(kx, toks, 300, &hx[i]));
        for (j = 0; j < 400; ++j) toks[j] = (llmkv_token)(j + 1000 * i + 500);
        OK(t, ps_make_seq(ky, toks, 300 - 20 * i, &hy[i]));
        TST_EQ(t, hx[i].id, hy[i].id); /* same slots in two fresh caches */
    }
    dx = kt_digest(kx, hx);
    dy = kt_digest(ky, hx);
    TST_CHECK(t, dx != 0 && dy != 0 && dx != dy);
    OK(t, llmkv_cache_save_file(kx, 0, path, NULL));
    rng.s = 0x4b111ull;
    for (i = 0; i < trials; ++i) {
        pid_t pid;
        int status = 0;
        struct timespec ts;
        long delay_us = (long)(i * 50000u / trials) + (long)tst_below(&rng, 2500);
        const char* paths[1];
        llmkv_cache* c = NULL;
        llmkv_result r;
        fflush(stdout);
        fflush(stderr);
        pid = fork();
        if (pid < 0) {
            if (i == 0) {
                llmkv_cache_destroy(kx);
                llmkv_cache_destroy(ky);
                ps_rmdir(dir);
                TST_SKIP(t, "fork failed");
            }
            TST_CHECK(t, pid >= 0);
            break;
        }
        if (pid == 0) {
            uint32_t n;
            alarm(20); /* never outlive a parent that failed to kill */
            for (n = 0;; ++n) llmkv_cache_save_file(n % 2 ? kx : ky, 0, path, NULL);
            _exit(0);
        }
        if (delay_us > 50000) delay_us = 50000;
        ts.tv_sec = 0;
        ts.tv_nsec = delay_us * 1000;
        nanosleep(&ts, NULL);
        kill(pid, SIGKILL);
        TST_EQ(t, waitpid(pid, &status, 0), pid);
        TST_CHECK(t, WIFSIGNALED(status));
        paths[0] = path;
        r = llmkv_cache_load_file(paths, 1, NULL, &c);
        if (r != LLMKV_OK) fprintf(stderr, "  trial %u (killed after %ld us): load %s\n", i, delay_us,
                                   llmkv_result_string(r));
        TST_EQ(t, r, LLMKV_OK);
        if (c) {
            uint64_t dc = kt_digest(c, hx);
            TST_CHECK(t, ps_check_ok(c));
            if (dc == dx) seen_x++;
            else if (dc == dy) seen_y++;
            else {
                fprintf(stderr, "  trial %u: the file is neither state\n", i);
                TST_CHECK(t, dc == dx || dc == dy);
            }
            llmkv_cache_destroy(c);
        }
        unlink(tmp); /* a killed save may leave its temporary */
    }
    if (t->verbose) fprintf(stderr, "  kill test: %u x, %u y\n", seen_x, seen_y);
    llmkv_cache_destroy(kx);
    llmkv_cache_destroy(ky);
    unlink(path);
    ps_rmdir(dir);
}

/* ------------------------------------------------------------------------ */
/* Thread-safe and metadata-only caches                                     */
/* ------------------------------------------------------------------------ */

#ifndef LLMKV_NO_THREADS
typedef struct ts_arg {
    llmkv_cache* kv;
    llmkv_seq s;
    llmkv_token toks[PW_LEN];
    llmkv_result r;
} ts_arg;

static void* ts_grow(void* p) {
    ts_arg* a = (ts_arg*)p;
    uint32_t i, len = 0;
    a->r = LLMKV_OK;
    for (i = 0; i < 20 && a->r == LLMKV_OK; ++i) {
        a->r = llmkv_seq_length(a->kv, a->s, &len);
        if (a->r == LLMKV_OK) a->r = llmkv_reserve(a->kv, a->s, 2);
        if (a->r == LLMKV_OK) a->r = ps_put_range(a->kv, a->s, a->toks, len, 2);
    }
    return NULL;
}
#endif

/* The thread_safe flag round-trips, and the loaded cache takes calls from
   two threads at once. Under LLMKV_NO_THREADS such a cache cannot even be
   made: UNSUPPORTED. */
static void test_persist_thread_safe(tst* t) {
    pw_cfg cfg = {"thread-safe", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 40, 8, 6, 1, 0};
    llmkv_desc d = pw_desc(&cfg);
#ifdef LLMKV_NO_THREADS
    llmkv_cache* kv = NULL;
    d.thread_safe = 1;
    TST_EQ(t, llmkv_cache_create(&d, &kv), LLMKV_ERR_UNSUPPORTED);
    TST_CHECK(t, kv == NULL);
#else
    pw* w = (pw*)calloc(1, sizeof(pw));
    llmkv_cache *a, *b = NULL;
    unsigned char* buf;
    size_t size = 0;
    llmkv_desc lb;
    TST_REQUIRE(t, w != NULL);
    d.thread_safe = 1;
    pw_init(w, t, &d, 0x75ull);
    a = ps_create(t, &d);
    if (!a) {
        free(w);
        return;
    }
    w->kv[0] = a;
    w->n_kv = 1;
    pw_run(w, ps_scaled(80, 10), "workload");
    buf = ps_save(t, a, 0, &size);
    if (buf) TST_EQ(t, ps_load1(buf, size, &b), LLMKV_OK);
    free(buf);
    if (b) {
        memset(&lb, 0, sizeof lb);
        OK(t, llmkv_cache_desc(b, &lb));
        TST_EQ(t, lb.thread_safe != 0, 1);
        w->kv[1] = b;
        w->n_kv = 2;
        w->phase = "thread-safe loaded";
        pw_same(w, a, b);
        pw_run(w, ps_scaled(30, 5), "lockstep");
        {
            ts_arg* args = (ts_arg*)calloc(2, sizeof(ts_arg));
            pthread_t th[2];
            int i, started[2] = {0, 0};
            uint32_t k;
            /* Room for two new sequences. */
            for (k = 0; k < w->n_s; ++k)
                if (w->s[k].live) OK(t, llmkv_seq_free(b, w->s[k].h));
            if (args) {
                for (i = 0; i < 2; ++i) {
                    uint32_t j;
                    args[i].kv = b;
                    for (j = 0; j < PW_LEN; ++j) args[i].toks[j] = (llmkv_token)(j * 3 + (uint32_t)i);
                    OK(t, ps_make_seq(b, args[i].toks, 4, &args[i].s));
                }
                for (i = 0; i < 2; ++i) started[i] = pthread_create(&th[i], NULL, ts_grow, &args[i]) == 0;
                for (i = 0; i < 2; ++i)
                    if (started[i]) pthread_join(th[i], NULL);
                for (i = 0; i < 2; ++i) {
                    uint32_t len = 0;
                    float* v;
                    TST_CHECK(t, started[i]);
                    TST_EQ(t, args[i].r, LLMKV_OK);
                    OK(t, llmkv_seq_length(b, args[i].s, &len));
                    TST_EQ(t, len, 44);
                    v = ps_gather_f32(b, args[i].s, len);
                    if (v) {
                        /* position 43 of layer 1, V, element 5: F16 of its value */
                        size_t ne = (size_t)len * 2 * 8;
                        float want = llmkv_f16_to_f32(llmkv_f32_to_f16(ps_val(args[i].toks[43], 43, 1, 1, 5)));
                        TST_CHECK(t, v[ne * 3 + 43 * 16 + 5] == want);
                        free(v);
                    }
                }
                free(args);
            }
        }
        TST_CHECK(t, ps_check_ok(b));
        llmkv_cache_destroy(b);
    }
    llmkv_cache_destroy(a);
    free(w);
#endif
}

/* Metadata-only caches: page tables, handles and the pending copy
   commands survive; export has no page data to write. */
static void test_persist_metadata_only(tst* t) {
    static const pw_cfg cfgs[] = {
        {"metadata-only", LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 24, 8, 6, 0, 1},
        {"metadata-only index", LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q4, 4, 60, 8, 6, 1, 1},
    };
    uint32_t c;
    for (c = 0; c < 2; ++c) {
        pw* w = (pw*)calloc(1, sizeof(pw));
        llmkv_desc d = pw_desc(&cfgs[c]);
        llmkv_cache *a, *b = NULL;
        unsigned char* buf;
        size_t size = 0;
        llmkv_stats sa;
        TST_REQUIRE(t, w != NULL);
        pw_init(w, t, &d, 0x3e7aull + c);
        a = ps_create(t, &d);
        if (!a) {
            free(w);
            return;
        }
        w->kv[0] = a;
        w->n_kv = 1;
        pw_run(w, ps_scaled(150, 20), "workload");
        /* Make sure copies are pending: a fork of a partly filled last
           page, then a reserve that writes into it (copy-on-write). */
        {
            uint32_t i;
            llmkv_seq x, y;
            pw_seq* e;
            for (i = 0; i < w->n_s; ++i)
                if (w->s[i].live) {
                    OK(t, llmkv_seq_free(a, w->s[i].h));
                    w->s[i].live = 0;
                }
            OK(t, llmkv_seq_create(a, &x));
            OK(t, llmkv_reserve(a, x, d.page_size + 1));
            OK(t, llmkv_fork(a, x, &y));
            OK(t, llmkv_reserve(a, x, 1));
            e = pw_add(w, x);
            if (e) e->doc = -1;
            e = pw_add(w, y);
            if (e) e->doc = -1;
        }
        sa = ps_stats(a);
        TST_CHECK(t, sa.n_pending_copies > 0);
        buf = ps_save(t, a, 0, &size);
        if (buf) TST_EQ(t, ps_load1(buf, size, &b), LLMKV_OK);
        free(buf);
        if (b) {
            llmkv_copy_cmd ca[256], cb[256];
            uint32_t na = 0, nb = 0;
            TST_CHECK(t, ps_desc_same(t, a, b));
            w->kv[1] = b;
            w->n_kv = 2;
            w->phase = "metadata-only loaded";
            pw_same(w, a, b);
            /* The same pending commands, in the same order. */
            memset(ca, 0, sizeof ca);
            memset(cb, 0, sizeof cb);
            OK(t, llmkv_copy_cmds_take(a, ca, 256, &na));
            OK(t, llmkv_copy_cmds_take(b, cb, 256, &nb));
            TST_EQ(t, na, sa.n_pending_copies);
            TST_EQ(t, nb, na);
            TST_CHECK(t, memcmp(ca, cb, sizeof ca) == 0);
            pw_run(w, ps_scaled(80, 10), "lockstep");
            llmkv_cache_destroy(b);
            w->n_kv = 1;
        }
        /* No page data to export. */
        {
            uint32_t i;
            for (i = 0; i < w->n_s; ++i)
                if (w->s[i].live) {
                    unsigned char out[256];
                    size_t written = 99;
                    TST_EQ(t, llmkv_seq_export(a, w->s[i].h, out, sizeof out, &written), LLMKV_ERR_NO_PAGE_DATA);
                    TST_EQ(t, written, 0);
                    break;
                }
        }
        if (w->bad) fprintf(stderr, "  (%s)\n", cfgs[c].name);
        llmkv_cache_destroy(a);
        free(w);
    }
}

/* ------------------------------------------------------------------------ */
/* API misuse                                                               */
/* ------------------------------------------------------------------------ */

static void test_persist_misuse(tst* t) {
    llmkv_seq seqs[2];
    llmkv_cache* kv = hz_small_cache(t, seqs);
    unsigned char *buf, *ex, small[16];
    size_t size = 0, ex_size = 0, written;
    uint64_t bytes;
    llmkv_cache* out;
    llmkv_seq s;
    uint32_t n_shared;
    const void* bufs[2];
    size_t sizes[2];
    const char* paths[2];
    ex_snap snap;
    qlog lg = {0};
    TST_REQUIRE(t, kv != NULL);
    buf = ps_save(t, kv, 0, &size);
    ex = ps_export(t, kv, seqs[0], &ex_size);
    if (!buf || !ex) {
        free(buf);
        free(ex);
        llmkv_cache_destroy(kv);
        TST_REQUIRE(t, 0);
    }
    ex_take(kv, seqs, 2, &snap);

    /* save_size / save_mem / save_file */
    bytes = 5;
    TST_EQ(t, llmkv_cache_save_size(NULL, 0, &bytes), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, bytes, 0);
    TST_EQ(t, llmkv_cache_save_size(kv, 0, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    bytes = 5;
    TST_EQ(t, llmkv_cache_save_size(kv, 0x100, &bytes), LLMKV_ERR_INVALID_ARGUMENT); /* unknown flag */
    TST_EQ(t, bytes, 0);
    written = 5;
    TST_EQ(t, llmkv_cache_save_mem(NULL, 0, buf, size, &written), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, written, 0);
    written = 5;
    TST_EQ(t, llmkv_cache_save_mem(kv, 0, NULL, size, &written), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, written, 0);
    TST_EQ(t, llmkv_cache_save_mem(kv, 0x100, buf, size, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_cache_save_file(NULL, 0, "/tmp/x", NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_cache_save_file(kv, 0, NULL, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    /* Too small by one byte: refused, nothing changed; a refused
       checkpoint save is not a checkpoint. */
    {
        unsigned char* tight = (unsigned char*)malloc(size);
        TST_REQUIRE(t, tight != NULL);
        written = 5;
        TST_EQ(t, llmkv_cache_save_mem(kv, LLMKV_SAVE_CHECKPOINT, tight, size - 1, &written),
               LLMKV_ERR_BUFFER_TOO_SMALL);
        TST_EQ(t, written, 0);
        written = 5;
        TST_EQ(t, llmkv_cache_save_mem(kv, 0, small, 0, &written), LLMKV_ERR_BUFFER_TOO_SMALL);
        TST_EQ(t, written, 0);
        bytes = 5;
        TST_EQ(t, llmkv_cache_save_size(kv, LLMKV_SAVE_INCREMENTAL, &bytes), LLMKV_ERR_INVALID_ARGUMENT);
        /* Exactly enough works, and is a checkpoint. */
        OK(t, llmkv_cache_save_mem(kv, LLMKV_SAVE_CHECKPOINT, tight, size, &written));
        TST_EQ(t, written, size);
        OK(t, llmkv_cache_save_size(kv, LLMKV_SAVE_INCREMENTAL, &bytes));
        TST_CHECK(t, bytes > 0);
        /* A too-small INCREMENTAL save does not move the checkpoint: the
           next increment still builds on `tight`. */
        {
            uint64_t inc_need = 0;
            unsigned char* inc;
            size_t inc_sz = 0;
            llmkv_cache* c = NULL;
            OK(t, llmkv_cache_save_size(kv, LLMKV_SAVE_INCREMENTAL, &inc_need));
            TST_EQ(t, llmkv_cache_save_mem(kv, LLMKV_SAVE_INCREMENTAL, small, 1, NULL), LLMKV_ERR_BUFFER_TOO_SMALL);
            inc = ps_save(t, kv, LLMKV_SAVE_INCREMENTAL, &inc_sz);
            if (inc) {
                bufs[0] = tight;
                bufs[1] = inc;
                sizes[0] = size;
                sizes[1] = inc_sz;
                TST_EQ(t, llmkv_cache_load_mem(bufs, sizes, 2, NULL, &c), LLMKV_OK);
                llmkv_cache_destroy(c);
            }
            free(inc);
        }
        free(tight);
    }
    TST_CHECK(t, ex_same(t, &lg, kv, &snap, "after refused saves"));

    /* load_mem / load_file */
    bufs[0] = buf;
    sizes[0] = size;
    out = kv;
    TST_EQ(t, llmkv_cache_load_mem(NULL, sizes, 1, NULL, &out), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, out == NULL);
    out = kv;
    TST_EQ(t, llmkv_cache_load_mem(bufs, NULL, 1, NULL, &out), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, out == NULL);
    out = kv;
    TST_EQ(t, llmkv_cache_load_mem(bufs, sizes, 0, NULL, &out), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, out == NULL);
    TST_EQ(t, llmkv_cache_load_mem(bufs, sizes, 1, NULL, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    bufs[0] = NULL;
    out = kv;
    TST_EQ(t, llmkv_cache_load_mem(bufs, sizes, 1, NULL, &out), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, out == NULL);
    bufs[0] = buf;
    paths[0] = "/tmp/llmkv-no-such-file";
    out = kv;
    TST_EQ(t, llmkv_cache_load_file(NULL, 1, NULL, &out), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, out == NULL);
    out = kv;
    TST_EQ(t, llmkv_cache_load_file(paths, 0, NULL, &out), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, out == NULL);
    TST_EQ(t, llmkv_cache_load_file(paths, 1, NULL, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    paths[0] = NULL;
    out = kv;
    TST_EQ(t, llmkv_cache_load_file(paths, 1, NULL, &out), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, out == NULL);
    /* The same whole cache twice: the second is not an increment of the
       first. */
    bufs[1] = buf;
    sizes[1] = size;
    out = kv;
    {
        llmkv_result r = llmkv_cache_load_mem(bufs, sizes, 2, NULL, &out);
        TST_EQ(t, r, LLMKV_ERR_MISMATCH);
    }
    TST_CHECK(t, out == NULL);
    /* A load_desc with an allocator missing its free: INVALID_ARGUMENT. */
    {
        llmkv_load_desc ld;
        falloc fa;
        f_init(&fa);
        memset(&ld, 0, sizeof ld);
        ld.allocator = f_allocator(&fa);
        ld.allocator.free = NULL;
        out = kv;
        TST_EQ(t, llmkv_cache_load_mem(bufs, sizes, 1, &ld, &out), LLMKV_ERR_INVALID_ARGUMENT);
        TST_CHECK(t, out == NULL);
        TST_EQ(t, fa.n_blocks, 0);
        f_done(&fa);
    }
    /* File ops whose every member is NULL mean POSIX. */
    {
        llmkv_file_ops none;
        llmkv_load_desc ld;
        char dir[64], p[128];
        memset(&none, 0, sizeof none);
        if (ps_tmpdir(dir, sizeof dir)) {
            snprintf(p, sizeof p, "%s/c.kv", dir);
            OK(t, llmkv_cache_save_file(kv, 0, p, &none));
            memset(&ld, 0, sizeof ld);
            ld.file_ops = &none;
            paths[0] = p;
            out = NULL;
            OK(t, llmkv_cache_load_file(paths, 1, &ld, &out));
            TST_CHECK(t, out != NULL);
            llmkv_cache_destroy(out);
            ps_rmdir(dir);
        }
    }

    /* export_size / export / export_file / import */
    {
        llmkv_seq stale;
        llmkv_token tk[2] = {9, 9};
        OK(t, ps_make_seq(kv, tk, 2, &stale));
        OK(t, llmkv_seq_free(kv, stale));
        bytes = 5;
        TST_EQ(t, llmkv_seq_export_size(kv, stale, &bytes), LLMKV_ERR_STALE_HANDLE);
        TST_EQ(t, bytes, 0);
        written = 5;
        TST_EQ(t, llmkv_seq_export(kv, stale, buf, size, &written), LLMKV_ERR_STALE_HANDLE);
        TST_EQ(t, written, 0);
        TST_EQ(t, llmkv_seq_export_file(kv, stale, "/tmp/llmkv-never-written", NULL), LLMKV_ERR_STALE_HANDLE);
        TST_CHECK(t, !ps_exists("/tmp/llmkv-never-written"));
    }
    ex_free(&snap);
    ex_take(kv, seqs, 2, &snap);
    bytes = 5;
    TST_EQ(t, llmkv_seq_export_size(NULL, seqs[0], &bytes), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, bytes, 0);
    TST_EQ(t, llmkv_seq_export_size(kv, seqs[0], NULL), LLMKV_ERR_INVALID_ARGUMENT);
    written = 5;
    TST_EQ(t, llmkv_seq_export(kv, seqs[0], NULL, ex_size, &written), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, written, 0);
    written = 5;
    TST_EQ(t, llmkv_seq_export(kv, seqs[0], small, sizeof small, &written), LLMKV_ERR_BUFFER_TOO_SMALL);
    TST_EQ(t, written, 0);
    {
        unsigned char* tight = (unsigned char*)malloc(ex_size);
        TST_REQUIRE(t, tight != NULL);
        TST_EQ(t, llmkv_seq_export(kv, seqs[0], tight, ex_size - 1, NULL), LLMKV_ERR_BUFFER_TOO_SMALL);
        free(tight);
    }
    TST_EQ(t, llmkv_seq_export_file(kv, seqs[0], NULL, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    s.id = 5;
    n_shared = 5;
    TST_EQ(t, llmkv_seq_import(NULL, ex, ex_size, &s, &n_shared), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, s.id, 0);
    TST_EQ(t, n_shared, 0);
    s.id = 5;
    TST_EQ(t, llmkv_seq_import(kv, NULL, ex_size, &s, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, s.id, 0);
    TST_EQ(t, llmkv_seq_import(kv, ex, ex_size, NULL, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    s.id = 5;
    TST_EQ(t, llmkv_seq_import_file(kv, NULL, NULL, &s, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, s.id, 0);
    s.id = 5;
    TST_EQ(t, llmkv_seq_import_file(kv, "/tmp/llmkv-no-such-file", NULL, &s, NULL), LLMKV_ERR_IO);
    TST_EQ(t, s.id, 0);
    TST_CHECK(t, ex_same(t, &lg, kv, &snap, "after refused exports and imports"));
    free(buf);
    free(ex);
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */
/* Suite                                                                    */
/* ------------------------------------------------------------------------ */

void suite_persist(tst* t) {
    TST_RUN(t, test_persist_roundtrip_mem);
    TST_RUN(t, test_persist_files);
    TST_RUN(t, test_persist_incremental_chain);
    TST_RUN(t, test_persist_incremental_small);
    TST_RUN(t, test_persist_export_same_config);
    TST_RUN(t, test_persist_import_into_busy_cache);
    TST_RUN(t, test_persist_import_shares_prefix);
    TST_RUN(t, test_persist_import_converts);
    TST_RUN(t, test_persist_import_refused);
    TST_RUN(t, test_persist_hostile_load);
    TST_RUN(t, test_persist_hostile_garbage);
    TST_RUN(t, test_persist_hostile_import);
    TST_RUN(t, test_persist_version);
    TST_RUN(t, test_persist_format_sections);
    TST_RUN(t, test_persist_thread_safe_flag_load);
    TST_RUN(t, test_persist_crafted);
    TST_RUN(t, test_persist_load_oom);
    TST_RUN(t, test_persist_import_oom);
    TST_RUN(t, test_persist_file_faults);
    TST_RUN(t, test_persist_kill_while_saving);
    TST_RUN(t, test_persist_thread_safe);
    TST_RUN(t, test_persist_metadata_only);
    TST_RUN(t, test_persist_misuse);
}
