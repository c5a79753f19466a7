/* fuzz_import.c - libFuzzer target for llmkv_seq_import.

   Input: byte 0 picks the target cache and the fault (bits 0-2: one of
   the configurations below, each 2 layers x 2 KV heads x head_dim 8, with
   different page sizes and storage types so that the conversion path is
   fuzzed too; bits 3-4: 0 none, else the 1st/2nd/3rd allocation of the
   import fails; bit 5: the data is misaligned by one byte; bit 6: its
   checksums are fixed first, with fz_fix_checksums, so that mutations
   reach the checks behind them); the rest is the exported sequence.

   The target is built the same way for every input: sequence A (40
   tokens), its fork B (truncated to 30, then 5 new tokens), a sequence C
   made from A's prompt, extended and freed (its pages stay cached), and a
   pin over A's first page (prefix index configurations). Their gathers,
   token ids and the cache's stats are recorded, then the input is
   imported:
     - on failure: the handle and *n_shared are zero, and the cache is as
       it was: equal stats (counters included), equal gathers and tokens,
       llmkv_cache_check OK;
     - on success: llmkv_cache_check OK, the new sequence's gathers and
       tokens are readable, *n_shared is whole pages within its length,
       A and B are unchanged, one more sequence is live; then it is
       exported and imported again, and the copy must gather bit for bit
       what the first import gathers (or fail for lack of pages or
       sequence slots), an attention call runs over it, and freeing
       everything leaves a valid cache.
   Build: make build/fuzz_import. */
#include "fuzz_util.h"

#define IMP_LAYERS 2u
#define IMP_HEADS 2u
#define IMP_DIM 8u
#define IMP_ROW (IMP_HEADS * IMP_DIM)

typedef struct imp_config {
    llmkv_dtype k, v;
    uint32_t page_size, n_pages, max_seqs, max_seq_len, prefix;
} imp_config;

static const imp_config configs[8] = {
    {LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 16, 4, 0, 1},
    {LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q4, 4, 40, 4, 0, 1},
    {LLMKV_DTYPE_Q4C, LLMKV_DTYPE_FP8, 32, 8, 4, 0, 1},
    {LLMKV_DTYPE_F32, LLMKV_DTYPE_BF16, 1, 96, 4, 0, 0},
    {LLMKV_DTYPE_BF16, LLMKV_DTYPE_F16, 16, 12, 4, 40, 0},
    {LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 16, 6, 3, 0, 1}, /* tight: few pages, one free sequence slot */
    {LLMKV_DTYPE_FP8, LLMKV_DTYPE_Q8, 16, 16, 4, 0, 1},
    {LLMKV_DTYPE_F16, LLMKV_DTYPE_Q4, 4, 48, 4, 0, 0},
};

static llmkv_token tok_a(uint32_t p) { return (llmkv_token)(p * 7 % 11); }

static void put_range(llmkv_cache* c, llmkv_seq s, uint32_t first, uint32_t n) {
    float kb[64 * IMP_ROW], vb[64 * IMP_ROW];
    uint32_t layer;
    FZ_ASSERT(n <= 64);
    for (layer = 0; layer < IMP_LAYERS; ++layer) {
        fz_fill(kb, 0, first, n, layer, 0, IMP_ROW, LLMKV_DTYPE_F32);
        fz_fill(vb, 0, first, n, layer, 1, IMP_ROW, LLMKV_DTYPE_F32);
        FZ_OK(llmkv_put(c, s, layer, n, kb, 0, vb, 0, LLMKV_DTYPE_F32));
    }
}

static void extend(llmkv_cache* c, const imp_config* cf, llmkv_seq s, uint32_t from, uint32_t n, llmkv_token salt) {
    llmkv_token t[64];
    uint32_t i;
    for (i = 0; i < n; ++i) t[i] = (llmkv_token)(tok_a(from + i) + salt);
    if (cf->prefix) FZ_OK(llmkv_reserve_tokens(c, s, t, n));
    else FZ_OK(llmkv_reserve(c, s, n));
    put_range(c, s, from, n);
}

/* The fixed target; seqs[0] = A, seqs[1] = B. */
static llmkv_cache* build_target(const imp_config* cf, llmkv_seq seqs[2]) {
    llmkv_desc d;
    llmkv_cache* c = NULL;
    llmkv_seq a, b, cs;
    memset(&d, 0, sizeof d);
    d.n_layers = IMP_LAYERS;
    d.n_kv_heads = IMP_HEADS;
    d.head_dim = IMP_DIM;
    d.k_dtype = cf->k;
    d.v_dtype = cf->v;
    d.page_size = cf->page_size;
    d.n_pages = cf->n_pages;
    d.max_seqs = cf->max_seqs;
    d.max_seq_len = cf->max_seq_len;
    d.prefix_index = cf->prefix;
    d.max_pins = 4;
    d.allocator = fz_allocator();
    d.logger = fz_logger();
    FZ_OK(llmkv_cache_create(&d, &c));
    FZ_OK(llmkv_seq_create(c, &a));
    extend(c, cf, a, 0, 40, 0);
    if (cf->prefix) FZ_OK(llmkv_seq_publish(c, a, 0));
    FZ_OK(llmkv_fork(c, a, &b));
    FZ_OK(llmkv_truncate(c, b, 30));
    extend(c, cf, b, 30, 5, 100);
    if (cf->prefix) {
        llmkv_token t[44];
        llmkv_pin pin;
        uint32_t i, cached = 0, pinned = 0;
        for (i = 0; i < 44; ++i) t[i] = tok_a(i);
        if (cf->max_seqs > 2) {
            FZ_OK(llmkv_seq_create_prefix(c, 0, t, 44, &cs, &cached));
            extend(c, cf, cs, cached, 44 - cached, 0);
            FZ_OK(llmkv_seq_free(c, cs));
        }
        FZ_OK(llmkv_prefix_pin(c, 0, t, 16, &pin, &pinned));
    }
    fz_check(c, "building the import target");
    seqs[0] = a;
    seqs[1] = b;
    return c;
}

typedef struct seq_snap {
    uint32_t len;
    float k[IMP_LAYERS][64 * IMP_ROW], v[IMP_LAYERS][64 * IMP_ROW];
    llmkv_token tok[64];
} seq_snap;

static void snap(llmkv_cache* c, llmkv_seq s, int prefix, seq_snap* out) {
    uint32_t layer;
    memset(out, 0, sizeof *out);
    FZ_OK(llmkv_seq_length(c, s, &out->len));
    FZ_ASSERT(out->len <= 64);
    for (layer = 0; layer < IMP_LAYERS; ++layer)
        FZ_OK(llmkv_gather(c, s, layer, 0, out->len, out->k[layer], 0, out->v[layer], 0, LLMKV_DTYPE_F32));
    if (prefix) FZ_OK(llmkv_seq_tokens(c, s, 0, out->len, out->tok));
}

static int snap_equal(const seq_snap* a, const seq_snap* b) {
    return a->len == b->len && memcmp(a, b, sizeof *a) == 0;
}

/* Every position of an imported sequence, gathered in chunks (its length
   is up to the target's max_seq_len). Returns a hash of the bytes. */
static uint64_t gather_all(llmkv_cache* c, llmkv_seq s, int prefix, uint32_t* len_out) {
    float kb[64 * IMP_ROW], vb[64 * IMP_ROW];
    llmkv_token t[64];
    uint32_t len, pos, layer, n, i;
    uint64_t h = 1;
    FZ_OK(llmkv_seq_length(c, s, &len));
    for (pos = 0; pos < len; pos += n) {
        n = len - pos < 64 ? len - pos : 64;
        for (layer = 0; layer < IMP_LAYERS; ++layer) {
            const unsigned char* bytes[2];
            FZ_OK(llmkv_gather(c, s, layer, pos, n, kb, 0, vb, 0, LLMKV_DTYPE_F32));
            bytes[0] = (const unsigned char*)kb;
            bytes[1] = (const unsigned char*)vb;
            for (i = 0; i < n * IMP_ROW * 4; ++i) h = fz_mix(h ^ bytes[0][i] ^ (uint64_t)bytes[1][i] << 8);
        }
        if (prefix) {
            FZ_OK(llmkv_seq_tokens(c, s, pos, n, t));
            for (i = 0; i < n; ++i) {
                FZ_ASSERT(t[i] >= -1);
                h = fz_mix(h ^ (uint32_t)t[i]);
            }
        }
    }
    *len_out = len;
    return h;
}

static void attend_one(llmkv_cache* c, llmkv_seq s, uint32_t len) {
    llmkv_batch* b = NULL;
    uint32_t q_len = len < 2 ? len : 2, i;
    float q[2 * IMP_ROW * 2], out[2 * IMP_ROW * 2];
    llmkv_attn_desc a;
    FZ_OK(llmkv_batch_create(c, 1, 2, &b));
    FZ_OK(llmkv_batch_build(b, &s, &q_len, 1));
    for (i = 0; i < 2 * IMP_ROW * 2; ++i) q[i] = fz_value(i, 1, 0, 3);
    memset(&a, 0, sizeof a);
    a.layer = 1;
    a.n_q_heads = IMP_HEADS * 2;
    a.q = q;
    a.out = out;
    FZ_OK(llmkv_attend(c, b, &a, NULL));
    llmkv_batch_destroy(b);
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static seq_snap before[2], after[2];
    const imp_config* cf;
    llmkv_cache* c;
    llmkv_seq seqs[2], s, s2;
    llmkv_stats st0, st1;
    uint32_t n_shared = 7, n_shared2 = 0, len = 0, len2 = 0, i, fail, misalign;
    void* blk;
    const unsigned char* in;
    llmkv_result r;
    uint64_t h1, h2, bytes = 0;
    size_t written = 0;
    unsigned char* exp;

    FZ_ASSERT(fz_alloc_st.live == 0);
    if (size < 1) return 0;
    cf = &configs[data[0] & 7];
    fail = (data[0] >> 3) & 3;
    misalign = (data[0] >> 5) & 1;
    fz_alloc_reset();
    c = build_target(cf, seqs);
    for (i = 0; i < 2; ++i) snap(c, seqs[i], cf->prefix, &before[i]);
    st0 = fz_stats(c);

    {
        unsigned char* m = fz_buf_copy(data + 1, size - 1, misalign, &blk);
        if (data[0] & 0x40) {
            const uint64_t zero = 0;
            fz_fix_checksums(m, size - 1, &zero, NULL);
        }
        in = m;
    }
    fz_alloc_reset();
    if (fail) fz_alloc_fail_in((long)fail);
    s.id = 12345;
    r = llmkv_seq_import(c, in, size - 1, &s, &n_shared);
    fz_alloc_reset();
    free(blk);

    if (r != LLMKV_OK) {
        FZ_ASSERT(s.id == 0 && n_shared == 0);
        fz_check(c, "a failed import");
        st1 = fz_stats(c);
        if (!fz_stats_equal(&st0, &st1, 1, "failed import")) {
            fprintf(stderr, "import failed with %s\n", llmkv_result_string(r));
            FZ_ASSERT(!"a failed import changed the stats");
        }
        for (i = 0; i < 2; ++i) {
            snap(c, seqs[i], cf->prefix, &after[i]);
            FZ_ASSERT(snap_equal(&before[i], &after[i]));
        }
        llmkv_cache_destroy(c);
        FZ_ASSERT(fz_alloc_st.live == 0);
        return 0;
    }

    fz_check(c, "import");
    FZ_ASSERT(s.id != 0);
    st1 = fz_stats(c);
    FZ_ASSERT(st1.n_seqs == st0.n_seqs + 1);
    for (i = 0; i < 2; ++i) {
        snap(c, seqs[i], cf->prefix, &after[i]);
        FZ_ASSERT(snap_equal(&before[i], &after[i]));
    }
    h1 = gather_all(c, s, cf->prefix, &len);
    FZ_ASSERT(n_shared <= len && n_shared % cf->page_size == 0);
    if (!cf->prefix) FZ_ASSERT(n_shared == 0);
    if (len) attend_one(c, s, len);
    fz_check(c, "reads of an imported sequence");

    /* Export it and import the copy: the same gathers. */
    FZ_OK(llmkv_seq_export_size(c, s, &bytes));
    exp = (unsigned char*)malloc((size_t)bytes);
    FZ_ASSERT(exp != NULL);
    FZ_OK(llmkv_seq_export(c, s, exp, (size_t)bytes, &written));
    FZ_ASSERT(written == bytes);
    fz_check(c, "export of an imported sequence");
    r = llmkv_seq_import(c, exp, written, &s2, &n_shared2);
    free(exp);
    if (r == LLMKV_OK) {
        fz_check(c, "re-import");
        h2 = gather_all(c, s2, cf->prefix, &len2);
        FZ_ASSERT(len2 == len);
        if (h2 != h1) FZ_ASSERT(!"a re-imported sequence gathers other bytes than the sequence it was exported from");
        FZ_OK(llmkv_seq_free(c, s2));
        fz_check(c, "freeing a re-imported sequence");
    } else {
        if (r != LLMKV_ERR_OUT_OF_PAGES && r != LLMKV_ERR_TOO_MANY_SEQUENCES)
            fprintf(stderr, "re-import: %s\n", llmkv_result_string(r));
        FZ_ASSERT(r == LLMKV_ERR_OUT_OF_PAGES || r == LLMKV_ERR_TOO_MANY_SEQUENCES);
    }
    FZ_OK(llmkv_seq_free(c, s));
    fz_check(c, "freeing an imported sequence");
    for (i = 0; i < 2; ++i) {
        snap(c, seqs[i], cf->prefix, &after[i]);
        FZ_ASSERT(snap_equal(&before[i], &after[i]));
    }
    if (cf->prefix) {
        uint32_t n_ev = 0;
        FZ_OK(llmkv_prefix_evict(c, UINT32_MAX, &n_ev));
        fz_check(c, "evicting after an import");
    }
    llmkv_cache_destroy(c);
    FZ_ASSERT(fz_alloc_st.live == 0);
    return 0;
}
