/* fuzz_util.h - helpers shared by the libFuzzer targets (fuzz_load.c,
   fuzz_import.c, fuzz_api.c) and by make_corpus.c.

   Include it from exactly one translation unit, after nothing else: it
   defines LLMKV_IMPLEMENTATION and includes ../llmkv.h itself.

     - fz_stream: a byte reader over (data, size) that yields integers in
       ranges and returns zeros once the bytes run out;
     - fz_desc_from: a small cache descriptor built from a few bytes (every
       storage type, Q4C keys with pages of 32, page sizes 1/4/16/32, the
       prefix index on or off, tiny shapes so that each exec is fast);
     - fz_alloc: the allocator every target hands the library: zeroed
       memory (runs are deterministic), a cap on single allocations (a
       crafted file cannot ask for gigabytes) and an optional injected
       failure (the Nth allocation from now returns NULL);
     - fz_value / fz_expect: the K and V value of (position, layer, part,
       element), and what a cache storing it as a given type gives back;
     - fz_fix_checksums: rewrites a saved file's or export's checksums
       (and END record) so that mutated inputs get past them;
     - fz_stats / fz_stats_equal: llmkv_cache_stats, compared field by
       field;
     - fz_logger / fz_verbose: FZ_VERBOSE=1 in the environment sends the
       library's log (why a load or import failed) to stderr;
     - fz_check: llmkv_cache_check, abort() with a message when it fails;
     - FZ_ASSERT / FZ_OK: abort() with file, line and message;
     - FZ_OP_*: the op codes of fuzz_api (shared with make_corpus). */
#ifndef LLMKV_FUZZ_UTIL_H
#define LLMKV_FUZZ_UTIL_H

#define LLMKV_IMPLEMENTATION
#include "../llmkv.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define FZ_FN static __attribute__((unused))
#else
#define FZ_FN static
#endif

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

/* ------------------------------------------------------------------------ */
/* Failing loudly                                                           */
/* ------------------------------------------------------------------------ */

FZ_FN void fz_fail(const char* file, int line, const char* what) {
    fprintf(stderr, "\nFUZZ ASSERTION FAILED %s:%d: %s\n", file, line, what);
    fflush(stderr);
    abort();
}
#define FZ_ASSERT(cond)                                                  \
    do {                                                                 \
        if (!(cond)) fz_fail(__FILE__, __LINE__, #cond);                 \
    } while (0)
/* FZ_ASSERT with the llmkv result printed. */
#define FZ_OK(call)                                                      \
    do {                                                                 \
        llmkv_result fz_r_ = (call);                                     \
        if (fz_r_ != LLMKV_OK) {                                         \
            fprintf(stderr, "\n%s returned %s\n", #call, llmkv_result_string(fz_r_)); \
            fz_fail(__FILE__, __LINE__, #call " == LLMKV_OK");           \
        }                                                                \
    } while (0)

/* llmkv_cache_check must return LLMKV_OK after everything the targets do. */
#define fz_check(cache, where) fz_check_at((cache), (where), __FILE__, __LINE__)
FZ_FN void fz_check_at(llmkv_cache* cache, const char* where, const char* file, int line) {
    char msg[512];
    llmkv_result r;
    msg[0] = 0;
    r = llmkv_cache_check(cache, msg, sizeof msg);
    if (r != LLMKV_OK) {
        fprintf(stderr, "\nllmkv_cache_check failed after %s: %s: %s\n", where, llmkv_result_string(r), msg);
        fz_fail(file, line, "llmkv_cache_check == LLMKV_OK");
    }
}

/* ------------------------------------------------------------------------ */
/* Byte stream                                                              */
/* ------------------------------------------------------------------------ */

typedef struct fz_stream {
    const uint8_t* data;
    size_t size, pos;
} fz_stream;

FZ_FN void fz_init(fz_stream* s, const uint8_t* data, size_t size) {
    s->data = data;
    s->size = size;
    s->pos = 0;
}
FZ_FN int fz_more(const fz_stream* s) { return s->pos < s->size; }
FZ_FN uint8_t fz_u8(fz_stream* s) { return s->pos < s->size ? s->data[s->pos++] : 0; }
FZ_FN uint16_t fz_u16(fz_stream* s) {
    uint16_t a = fz_u8(s);
    return (uint16_t)(a | (uint16_t)fz_u8(s) << 8);
}
FZ_FN uint32_t fz_u32(fz_stream* s) {
    uint32_t a = fz_u16(s);
    return a | (uint32_t)fz_u16(s) << 16;
}
/* An integer in [lo, hi] (lo <= hi), from as few bytes as the range needs. */
FZ_FN uint32_t fz_range(fz_stream* s, uint32_t lo, uint32_t hi) {
    uint64_t span = (uint64_t)hi - lo + 1, x;
    if (span <= 1) return lo;
    if (span <= 0x100) x = fz_u8(s);
    else if (span <= 0x10000) x = fz_u16(s);
    else x = fz_u32(s);
    return lo + (uint32_t)(x % span);
}
FZ_FN int fz_bool(fz_stream* s) { return fz_u8(s) & 1; }

/* ------------------------------------------------------------------------ */
/* Allocator                                                                */
/* ------------------------------------------------------------------------ */

/* One allocation may not exceed this (a crafted descriptor asking for more
   gets LLMKV_ERR_OUT_OF_MEMORY instead of exhausting the fuzzer's RSS). */
#define FZ_ALLOC_CAP ((size_t)64 << 20)

typedef struct fz_alloc_state {
    long fail_in;        /* > 0: the fail_in-th allocation from now fails; <= 0: none */
    unsigned long count; /* allocations attempted since the last fz_alloc_reset */
    unsigned long live;  /* outstanding allocations */
} fz_alloc_state;
static fz_alloc_state fz_alloc_st;

FZ_FN void* fz_alloc_fn(size_t size, size_t align, void* user) {
    unsigned char* raw;
    uintptr_t p;
    (void)user;
    fz_alloc_st.count++;
    if (fz_alloc_st.fail_in > 0 && --fz_alloc_st.fail_in == 0) return NULL;
    if (size > FZ_ALLOC_CAP) return NULL;
    if (align < sizeof(void*)) align = sizeof(void*);
    FZ_ASSERT((align & (align - 1)) == 0 && align <= 4096);
    raw = (unsigned char*)calloc(1, size + align + sizeof(void*));
    if (!raw) return NULL;
    p = ((uintptr_t)raw + sizeof(void*) + align - 1) & ~(uintptr_t)(align - 1);
    memcpy((unsigned char*)p - sizeof(void*), &raw, sizeof raw);
    fz_alloc_st.live++;
    return (void*)p;
}

FZ_FN void fz_free_fn(void* ptr, size_t size, void* user) {
    void* raw;
    (void)size;
    (void)user;
    if (!ptr) return;
    memcpy(&raw, (unsigned char*)ptr - sizeof(void*), sizeof raw);
    FZ_ASSERT(fz_alloc_st.live > 0);
    fz_alloc_st.live--;
    free(raw);
}

FZ_FN llmkv_allocator fz_allocator(void) {
    llmkv_allocator a;
    a.alloc = fz_alloc_fn;
    a.free = fz_free_fn;
    a.user = NULL;
    return a;
}
/* No injected failure, counters zeroed (live is kept: it is a balance). */
FZ_FN void fz_alloc_reset(void) {
    fz_alloc_st.fail_in = 0;
    fz_alloc_st.count = 0;
}
/* The n-th allocation from now (n >= 1) returns NULL; 0: none. */
FZ_FN void fz_alloc_fail_in(long n) { fz_alloc_st.fail_in = n; }

/* With FZ_VERBOSE set in the environment, the library's log messages go
   to stderr (why a load or an import failed, when reproducing an input). */
FZ_FN void fz_log_fn(void* user, llmkv_log_level level, const char* message) {
    (void)user;
    fprintf(stderr, "llmkv log (%d): %s\n", (int)level, message);
}
FZ_FN int fz_verbose(void) {
    static int verbose = -1;
    if (verbose < 0) verbose = getenv("FZ_VERBOSE") != NULL;
    return verbose;
}
FZ_FN llmkv_logger fz_logger(void) {
    llmkv_logger lg;
    lg.fn = fz_verbose() ? fz_log_fn : NULL;
    lg.user = NULL;
    return lg;
}

FZ_FN llmkv_load_desc fz_load_desc(void) {
    llmkv_load_desc ld;
    memset(&ld, 0, sizeof ld);
    ld.allocator = fz_allocator();
    ld.logger = fz_logger();
    ld.max_bytes = FZ_ALLOC_CAP; /* untrusted input: refuse caches larger than this */
    return ld;
}

/* A copy of `size` bytes in a fresh heap block that ends exactly where the
   bytes end (ASan sees any read past them), `misalign` bytes past an
   aligned start. Free with fz_buf_free. */
FZ_FN unsigned char* fz_buf_copy(const void* src, size_t size, unsigned misalign, void** block) {
    unsigned char* b = (unsigned char*)malloc(size + misalign + 1);
    FZ_ASSERT(b != NULL);
    *block = b;
    if (size) memcpy(b + misalign, src, size);
    return b + misalign;
}

/* ------------------------------------------------------------------------ */
/* Checksum fix-up                                                          */
/* ------------------------------------------------------------------------ */

/* Mutated inputs almost never pass the per-section CRC-32C, so the loaders'
   deeper checks would stay unreached. This rewrites, in place, everything
   that only guards integrity in a saved file or export (docs/FORMAT.md):
   the header's total size (the buffer's size; parent replaced by *parent
   unless parent is NULL) and checksum, each section's CRC-32C, and the END
   record (identity, parent, section count). It walks sections as long as
   their sizes fit the buffer. *id_out (may be NULL) receives the identity
   written into END (0 if there is none). Uses the implementation's own
   checksum and identity functions, so it needs LLMKV_IMPLEMENTATION. */
FZ_FN void fz_fix_checksums(unsigned char* b, size_t size, const uint64_t* parent, uint64_t* id_out) {
    static llmkv__crc32c ct;
    static int ct_ready;
    uint64_t pos = LLMKV__HEADER_BYTES, fold = 0, par;
    uint32_t n_sections = 0;
    if (id_out) *id_out = 0;
    if (size < LLMKV__HEADER_BYTES) return;
    if (!ct_ready) {
        llmkv__crc_init(&ct);
        ct_ready = 1;
    }
    llmkv__wr64(b + 24, size);
    if (parent) llmkv__wr64(b + 32, *parent);
    par = llmkv__rd64(b + 32);
    llmkv__wr32(b + 60, ~llmkv__crc_update(&ct, 0xffffffffu, b, 60));
    while (pos + LLMKV__SECTION_HEAD + LLMKV__SECTION_TAIL <= size) {
        uint32_t tag = llmkv__rd32(b + pos), crc;
        uint64_t n = llmkv__rd64(b + pos + 8);
        if (n > size - pos - LLMKV__SECTION_HEAD - LLMKV__SECTION_TAIL) break;
        if (tag == LLMKV__T_END && n == LLMKV__END_BYTES) {
            uint64_t id = llmkv__identity(par, fold);
            llmkv__wr64(b + pos + LLMKV__SECTION_HEAD, id);
            llmkv__wr64(b + pos + LLMKV__SECTION_HEAD + 8, par);
            llmkv__wr32(b + pos + LLMKV__SECTION_HEAD + 16, n_sections);
            if (id_out) *id_out = id;
        }
        crc = ~llmkv__crc_update(&ct, 0xffffffffu, b + pos, (size_t)(LLMKV__SECTION_HEAD + n));
        llmkv__wr32(b + pos + LLMKV__SECTION_HEAD + n, crc);
        llmkv__wr32(b + pos + LLMKV__SECTION_HEAD + n + 4, 0);
        fold = llmkv__fold(fold, crc);
        n_sections++;
        pos += LLMKV__SECTION_HEAD + n + LLMKV__SECTION_TAIL;
        if (tag == LLMKV__T_END) break;
    }
}

/* ------------------------------------------------------------------------ */
/* Cache descriptors                                                        */
/* ------------------------------------------------------------------------ */

static const llmkv_dtype fz_k_types[7] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_Q8,
                                          LLMKV_DTYPE_Q4,  LLMKV_DTYPE_FP8, LLMKV_DTYPE_Q4C};
static const uint32_t fz_page_sizes[4] = {1, 4, 16, 32};
static const uint32_t fz_head_dims[8] = {8, 4, 16, 5, 32, 40, 1, 64};

/* Largest positions a fuzzed sequence may hold (max_seq_len is capped to
   it) and the largest shape the descriptors below make. */
#define FZ_MAX_LEN 256u
#define FZ_MAX_LAYERS 2u
#define FZ_MAX_HEADS 2u
#define FZ_MAX_DIM 64u
#define FZ_MAX_SEQS 8u
#define FZ_ROW_MAX (FZ_MAX_HEADS * FZ_MAX_DIM)

/* Builds a small descriptor from 6 bytes of `s`:
     byte 0: K type (f32 f16 bf16 q8 q4 fp8 q4c), byte 1: V type (not q4c),
     byte 2: page size (1 4 16 32; 32 for q4c keys), layers 1-2, heads 1-2,
     byte 3: head_dim (8 4 16 5 32 40 1 64), prefix index bit, max_pins 1-4,
     byte 4: n_pages 2..33, byte 5: max_seqs 1..8 and max_seq_len.
   Allocator: fz_alloc. thread_safe off. */
FZ_FN void fz_desc_from(fz_stream* s, llmkv_desc* d) {
    uint8_t b0 = fz_u8(s), b1 = fz_u8(s), b2 = fz_u8(s), b3 = fz_u8(s), b4 = fz_u8(s), b5 = fz_u8(s);
    uint32_t full;
    memset(d, 0, sizeof *d);
    d->k_dtype = fz_k_types[b0 % 7];
    d->v_dtype = fz_k_types[b1 % 6];
    d->page_size = d->k_dtype == LLMKV_DTYPE_Q4C ? 32 : fz_page_sizes[b2 & 3];
    d->n_layers = 1 + ((b2 >> 2) & 1);
    d->n_kv_heads = 1 + ((b2 >> 3) & 1);
    d->head_dim = fz_head_dims[b3 & 7];
    d->prefix_index = (b3 >> 3) & 1;
    d->max_pins = d->prefix_index ? 1 + ((b3 >> 4) & 3) : 0;
    d->n_pages = 2 + (b4 & 31);
    d->max_seqs = 1 + (b5 & 7);
    full = d->n_pages * d->page_size;
    switch ((b5 >> 3) & 3) {
    case 0: d->max_seq_len = full; break;
    case 1: d->max_seq_len = full / 2 + 1; break;
    case 2: d->max_seq_len = 37; break;
    default: d->max_seq_len = 7; break;
    }
    if (d->max_seq_len > FZ_MAX_LEN) d->max_seq_len = FZ_MAX_LEN;
    if (d->max_seq_len > full) d->max_seq_len = full;
    d->allocator = fz_allocator();
    d->logger = fz_logger();
}

/* The six bytes fz_desc_from reads back into exactly these fields (for
   make_corpus). ps_idx indexes fz_page_sizes, dim_idx fz_head_dims,
   len_mode is byte 5's max_seq_len choice. */
FZ_FN void fz_desc_bytes(uint8_t out[6], uint32_t k_idx, uint32_t v_idx, uint32_t ps_idx, uint32_t n_layers,
                         uint32_t n_kv_heads, uint32_t dim_idx, uint32_t prefix, uint32_t max_pins, uint32_t n_pages,
                         uint32_t max_seqs, uint32_t len_mode) {
    out[0] = (uint8_t)k_idx;
    out[1] = (uint8_t)v_idx;
    out[2] = (uint8_t)(ps_idx | (n_layers - 1) << 2 | (n_kv_heads - 1) << 3);
    out[3] = (uint8_t)(dim_idx | prefix << 3 | (max_pins ? max_pins - 1 : 0) << 4);
    out[4] = (uint8_t)(n_pages - 2);
    out[5] = (uint8_t)((max_seqs - 1) | len_mode << 3);
}

/* ------------------------------------------------------------------------ */
/* Deterministic K/V values                                                 */
/* ------------------------------------------------------------------------ */

FZ_FN uint64_t fz_mix(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Element e (over [n_kv_heads][head_dim]) of K (part 0) or V (part 1) of
   `layer` at position `pos`: a multiple of 1/64 in [-1, 1), exact in F32,
   F16 and BF16, so those caches give it back bit for bit. */
FZ_FN float fz_value(uint32_t pos, uint32_t layer, uint32_t part, uint32_t e) {
    uint64_t h = fz_mix(((uint64_t)pos << 32) ^ ((uint64_t)layer << 20) ^ ((uint64_t)part << 19) ^ e);
    return (float)((int)(h & 127) - 64) / 64.0f;
}

/* Rows of positions [first, first + n) of one part and layer, in `t` (F32,
   F16 or BF16), rows `stride` bytes apart (0: packed). */
FZ_FN void fz_fill(void* buf, size_t stride, uint32_t first, uint32_t n, uint32_t layer, uint32_t part,
                   uint32_t row, llmkv_dtype t) {
    uint32_t i, e;
    size_t es = t == LLMKV_DTYPE_F32 ? 4 : 2;
    if (!stride) stride = row * es;
    for (i = 0; i < n; ++i) {
        unsigned char* r = (unsigned char*)buf + (size_t)i * stride;
        for (e = 0; e < row; ++e) {
            float x = fz_value(first + i, layer, part, e);
            if (t == LLMKV_DTYPE_F32) {
                memcpy(r + e * 4, &x, 4);
            } else {
                uint16_t h = t == LLMKV_DTYPE_F16 ? llmkv_f32_to_f16(x) : llmkv_f32_to_bf16(x);
                memcpy(r + e * 2, &h, 2);
            }
        }
    }
}

/* The [n_kv_heads][head_dim] F32 values a cache storing part `part` of
   `layer` as `stored` gathers (as F32) for position pos: the exact value
   for float types, llmkv_dequantize(llmkv_quantize(.)) per head vector for
   the per-vector quantized types. Returns 0 for Q4C (no per-vector
   expectation: a page's codes depend on all its slots). */
FZ_FN int fz_expect(float* out, llmkv_dtype stored, uint32_t pos, uint32_t layer, uint32_t part, uint32_t n_heads,
                    uint32_t dim) {
    uint32_t h, e;
    if (stored == LLMKV_DTYPE_Q4C) return 0;
    for (h = 0; h < n_heads; ++h) {
        float* x = out + (size_t)h * dim;
        for (e = 0; e < dim; ++e) x[e] = fz_value(pos, layer, part, h * dim + e);
        if (stored == LLMKV_DTYPE_Q8 || stored == LLMKV_DTYPE_Q4 || stored == LLMKV_DTYPE_FP8) {
            unsigned char data[FZ_MAX_DIM * 2], sc[64];
            FZ_OK(llmkv_quantize(stored, x, dim, data, sc));
            FZ_OK(llmkv_dequantize(stored, data, sc, dim, x));
        }
    }
    return 1;
}

/* ------------------------------------------------------------------------ */
/* Statistics                                                               */
/* ------------------------------------------------------------------------ */

/* Compares two stats; prints the first differing field (prefixed with
   `what`) and returns 0 when they differ. counters: also compare the
   running counters (evictions, prompt tokens, hit rate). */
FZ_FN int fz_stats_equal(const llmkv_stats* a, const llmkv_stats* b, int counters, const char* what) {
#define FZ_SF(f)                                                                                         \
    if (a->f != b->f) {                                                                                  \
        fprintf(stderr, "%s: stats." #f " differs: %llu vs %llu\n", what, (unsigned long long)a->f,      \
                (unsigned long long)b->f);                                                               \
        return 0;                                                                                        \
    }
    FZ_SF(n_pages_total) FZ_SF(n_pages_free) FZ_SF(n_pages_used) FZ_SF(n_pages_shared) FZ_SF(n_seqs)
    FZ_SF(n_pending_copies) FZ_SF(page_bytes) FZ_SF(pool_bytes) FZ_SF(used_bytes) FZ_SF(metadata_bytes)
    FZ_SF(staging_bytes) FZ_SF(n_tokens) FZ_SF(n_slots_used) FZ_SF(n_slots_unused) FZ_SF(n_pages_cached)
    FZ_SF(n_pages_evictable) FZ_SF(n_pages_pinned) FZ_SF(n_pins)
    if (counters) {
        FZ_SF(n_evictions) FZ_SF(prompt_tokens_matched) FZ_SF(prompt_tokens_missed)
        if (memcmp(&a->hit_rate, &b->hit_rate, sizeof a->hit_rate) != 0) {
            fprintf(stderr, "%s: stats.hit_rate differs: %g vs %g\n", what, a->hit_rate, b->hit_rate);
            return 0;
        }
    }
#undef FZ_SF
    return 1;
}

FZ_FN llmkv_stats fz_stats(llmkv_cache* c) {
    llmkv_stats st;
    FZ_OK(llmkv_cache_stats(c, &st));
    return st;
}

/* ------------------------------------------------------------------------ */
/* fuzz_api op codes (shared with make_corpus.c)                            */
/* ------------------------------------------------------------------------ */

enum {
    FZ_OP_CREATE = 0,
    FZ_OP_FREE,
    FZ_OP_RESERVE,
    FZ_OP_RESERVE_TOKENS,
    FZ_OP_PUT,
    FZ_OP_GATHER,
    FZ_OP_FORK,
    FZ_OP_TRUNCATE,
    FZ_OP_CREATE_PREFIX,
    FZ_OP_MATCH,
    FZ_OP_PUBLISH,
    FZ_OP_PIN,
    FZ_OP_UNPIN,
    FZ_OP_EVICT,
    FZ_OP_ATTEND,
    FZ_OP_SAVE_LOAD,
    FZ_OP_EXPORT_IMPORT,
    FZ_OP_RESERVE_MANY,
    FZ_OP_VERIFY,
    FZ_OP_COUNT
};

#endif /* LLMKV_FUZZ_UTIL_H */
