/* Prefix index: token ids, create_prefix / prefix_match, publishing (what
   is written, when, partial pages, dedupe), LRU eviction, pins,
   namespaces, statistics, data read through shared pages (gather and
   attention against a cache without the index), and that every failing
   call leaves the cache as it was.

   Expected values are worked out here from the documented rules (the
   "Prefix index" section of llmkv.h): match lengths, which page a sequence
   holds, which cached prefix survives an eviction, every counter. The K/V
   values written for a token depend only on (token id, position, layer,
   part, element), so two sequences that compute the same prompt write the
   same bytes, and a gather can be checked against the function directly.
   llmkv_cache_check runs after every step of every scenario. Forks are
   covered by a scenario test of their own; a model of the rules checks
   random workloads without them, step by step. */
#include "test_util.h"
#include "../llmkv.h"

#define OK(t, call) TST_EQ(t, (call), LLMKV_OK)
#define CHK(t, kv) TST_CHECK(t, p_check_ok(kv))

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

/* 2 layers, 2 KV heads, head_dim 8, the index on. */
static llmkv_desc p_desc(uint32_t ps, uint32_t n_pages, llmkv_dtype kt, llmkv_dtype vt) {
    llmkv_desc d = tst_desc(2, 2, 8, ps, n_pages, kt, vt);
    d.prefix_index = 1;
    d.max_seqs = 8;
    return d;
}

static int p_check_ok(llmkv_cache* kv) {
    char msg[256];
    llmkv_result r;
    msg[0] = 0;
    r = llmkv_cache_check(kv, msg, sizeof msg);
    if (r != LLMKV_OK) fprintf(stderr, "  llmkv_cache_check: %s\n", msg);
    return r == LLMKV_OK;
}

/* The value of element e (of n_kv_heads * head_dim) of part (0 K, 1 V) of
   layer `layer` for token `tok` at position `pos`: a multiple of 1/8 in
   [-4, 4), exact in F16 and BF16. */
static float p_val(llmkv_token tok, uint32_t pos, uint32_t layer, uint32_t part, uint32_t e) {
    uint32_t x = (uint32_t)tok * 2654435761u;
    x ^= pos * 40503u + 0x9e37u;
    x *= 2246822519u;
    x ^= (layer * 31u + part * 17u + e) * 3266489917u;
    x ^= x >> 15;
    x *= 668265263u;
    x ^= x >> 13;
    return (float)((int)(x % 64u) - 32) / 8.0f;
}

/* Puts the sequence's newest n positions of one layer, parts 1 (K), 2 (V)
   or 3 (both); toks[i] is the token at position length - n + i. */
static llmkv_result p_put(llmkv_cache* kv, llmkv_seq s, const llmkv_token* toks, uint32_t n, uint32_t layer,
                          int parts) {
    llmkv_desc d;
    uint32_t len = 0, i, e, ne;
    float* k;
    float* v;
    llmkv_result r;
    if (n == 0) return LLMKV_OK;
    r = llmkv_cache_desc(kv, &d);
    if (r != LLMKV_OK) return r;
    r = llmkv_seq_length(kv, s, &len);
    if (r != LLMKV_OK) return r;
    if (n > len) return LLMKV_ERR_OUT_OF_RANGE;
    ne = d.n_kv_heads * d.head_dim;
    k = (float*)malloc((size_t)n * ne * sizeof(float));
    v = (float*)malloc((size_t)n * ne * sizeof(float));
    if (!k || !v) {
        free(k);
        free(v);
        return LLMKV_ERR_OUT_OF_MEMORY;
    }
    for (i = 0; i < n; ++i)
        for (e = 0; e < ne; ++e) {
            k[(size_t)i * ne + e] = p_val(toks[i], len - n + i, layer, 0, e);
            v[(size_t)i * ne + e] = p_val(toks[i], len - n + i, layer, 1, e);
        }
    r = llmkv_put(kv, s, layer, n, (parts & 1) ? k : NULL, 0, (parts & 2) ? v : NULL, 0, LLMKV_DTYPE_F32);
    free(k);
    free(v);
    return r;
}

/* Puts the newest n positions of every layer, K and V. */
static llmkv_result p_write(llmkv_cache* kv, llmkv_seq s, const llmkv_token* toks, uint32_t n) {
    llmkv_desc d;
    uint32_t layer;
    llmkv_result r = llmkv_cache_desc(kv, &d);
    for (layer = 0; r == LLMKV_OK && layer < d.n_layers; ++layer) r = p_put(kv, s, toks, n, layer, 3);
    return r;
}

/* reserve_tokens, then p_write: the sequence computes n more tokens. */
static llmkv_result p_feed(llmkv_cache* kv, llmkv_seq s, const llmkv_token* toks, uint32_t n) {
    llmkv_result r = llmkv_reserve_tokens(kv, s, toks, n);
    if (r != LLMKV_OK) return r;
    return p_write(kv, s, toks, n);
}

/* 1 when every layer of s holds p_val(toks[pos], pos) at [0, n) (gathered
   as F32; exact for the float storage types). */
static int p_holds(llmkv_cache* kv, llmkv_seq s, const llmkv_token* toks, uint32_t n) {
    llmkv_desc d;
    uint32_t layer, i, e, ne, bad = 0;
    float* k;
    float* v;
    if (n == 0) return 1;
    if (llmkv_cache_desc(kv, &d) != LLMKV_OK) return 0;
    ne = d.n_kv_heads * d.head_dim;
    k = (float*)malloc((size_t)n * ne * sizeof(float));
    v = (float*)malloc((size_t)n * ne * sizeof(float));
    if (!k || !v) {
        free(k);
        free(v);
        return 0;
    }
    for (layer = 0; layer < d.n_layers && !bad; ++layer) {
        if (llmkv_gather(kv, s, layer, 0, n, k, 0, v, 0, LLMKV_DTYPE_F32) != LLMKV_OK) {
            bad = 1;
            break;
        }
        for (i = 0; i < n; ++i)
            for (e = 0; e < ne; ++e)
                if (k[(size_t)i * ne + e] != p_val(toks[i], i, layer, 0, e) ||
                    v[(size_t)i * ne + e] != p_val(toks[i], i, layer, 1, e)) {
                    if (!bad)
                        fprintf(stderr, "  data differs at layer %u position %u element %u\n", layer, i, e);
                    bad = 1;
                }
    }
    free(k);
    free(v);
    return !bad;
}

/* Length of the cached prefix of toks[0, n) in ns (0xFFFFFFFF on error). */
static uint32_t p_match(const llmkv_cache* kv, uint64_t ns, const llmkv_token* toks, uint32_t n) {
    uint32_t m = 0xFFFFFFFFu;
    if (llmkv_prefix_match(kv, ns, toks, n, &m) != LLMKV_OK) return 0xFFFFFFFFu;
    return m;
}

static llmkv_stats p_stats(llmkv_cache* kv) {
    llmkv_stats st;
    memset(&st, 0, sizeof st);
    if (llmkv_cache_stats(kv, &st) != LLMKV_OK) st.n_pages_total = 0xFFFFFFFFu;
    return st;
}

static uint32_t p_len(const llmkv_cache* kv, llmkv_seq s) {
    uint32_t n = 0xFFFFFFFFu;
    if (llmkv_seq_length(kv, s, &n) != LLMKV_OK) return 0xFFFFFFFFu;
    return n;
}

/* Page table of s into pt (max 64); returns its length (0xFFFFFFFF on error). */
static uint32_t p_pages(const llmkv_cache* kv, llmkv_seq s, uint32_t* pt) {
    uint32_t n = 0;
    if (llmkv_seq_pages(kv, s, pt, 64, &n) != LLMKV_OK) return 0xFFFFFFFFu;
    return n;
}

/* Page `page` of the pool, all page_bytes of it, into a new buffer. */
static unsigned char* p_page_copy(const llmkv_cache* kv, uint32_t page, size_t* bytes) {
    llmkv_layout l;
    void* base = NULL;
    uint64_t pool = 0;
    unsigned char* p;
    *bytes = 0;
    if (llmkv_cache_layout(kv, &l) != LLMKV_OK || llmkv_cache_pool(kv, &base, &pool) != LLMKV_OK || !base)
        return NULL;
    if ((uint64_t)(page + 1) * l.page_bytes > pool) return NULL;
    p = (unsigned char*)malloc((size_t)l.page_bytes);
    if (!p) return NULL;
    memcpy(p, (const unsigned char*)base + (size_t)page * (size_t)l.page_bytes, (size_t)l.page_bytes);
    *bytes = (size_t)l.page_bytes;
    return p;
}

/* Zeroes a host cache's pool, so that whole-page comparisons (which cover
   slots nobody wrote) read defined bytes under valgrind. */
static void p_clear_pool(llmkv_cache* kv) {
    void* base = NULL;
    uint64_t bytes = 0;
    if (llmkv_cache_pool(kv, &base, &bytes) == LLMKV_OK && base) memset(base, 0, (size_t)bytes);
}

/* 1 when page `page` still holds the bytes of `saved`; frees saved. */
static int p_page_same(const llmkv_cache* kv, uint32_t page, unsigned char* saved, size_t bytes) {
    size_t now_bytes = 0;
    unsigned char* now = p_page_copy(kv, page, &now_bytes);
    int same = saved && now && now_bytes == bytes && memcmp(now, saved, bytes) == 0;
    free(now);
    free(saved);
    return same;
}

/* Every field of two stats, hit_rate included. */
static int p_stats_same(const llmkv_stats* a, const llmkv_stats* b) {
    return a->n_pages_total == b->n_pages_total && a->n_pages_free == b->n_pages_free &&
           a->n_pages_used == b->n_pages_used && a->n_pages_shared == b->n_pages_shared &&
           a->n_seqs == b->n_seqs && a->n_pending_copies == b->n_pending_copies &&
           a->page_bytes == b->page_bytes && a->pool_bytes == b->pool_bytes && a->used_bytes == b->used_bytes &&
           a->metadata_bytes == b->metadata_bytes && a->staging_bytes == b->staging_bytes &&
           a->n_tokens == b->n_tokens && a->n_slots_used == b->n_slots_used &&
           a->n_slots_unused == b->n_slots_unused && a->n_pages_cached == b->n_pages_cached &&
           a->n_pages_evictable == b->n_pages_evictable && a->n_pages_pinned == b->n_pages_pinned &&
           a->n_pins == b->n_pins && a->n_evictions == b->n_evictions &&
           a->prompt_tokens_matched == b->prompt_tokens_matched &&
           a->prompt_tokens_missed == b->prompt_tokens_missed && a->hit_rate == b->hit_rate;
}

static void p_stats_print(const char* what, const llmkv_stats* s) {
    fprintf(stderr,
            "  %s: free %u used %u shared %u seqs %u tokens %llu cached %u evictable %u pinned %u pins %u "
            "evictions %llu matched %llu missed %llu\n",
            what, s->n_pages_free, s->n_pages_used, s->n_pages_shared, s->n_seqs, (unsigned long long)s->n_tokens,
            s->n_pages_cached, s->n_pages_evictable, s->n_pages_pinned, s->n_pins,
            (unsigned long long)s->n_evictions, (unsigned long long)s->prompt_tokens_matched,
            (unsigned long long)s->prompt_tokens_missed);
}

/* The prefix counters of the stats against expected values. */
#define P_EXPECT(t, kv, cached, evictable, pinned, pins)                                                      \
    do {                                                                                                      \
        llmkv_stats pst_ = p_stats(kv);                                                                       \
        TST_EQ(t, pst_.n_pages_cached, (cached));                                                             \
        TST_EQ(t, pst_.n_pages_evictable, (evictable));                                                       \
        TST_EQ(t, pst_.n_pages_pinned, (pinned));                                                             \
        TST_EQ(t, pst_.n_pins, (pins));                                                                       \
    } while (0)

/* Fills toks[0, n) with base + i * step. */
static void p_toks(llmkv_token* toks, uint32_t n, llmkv_token base, llmkv_token step) {
    uint32_t i;
    for (i = 0; i < n; ++i) toks[i] = base + (llmkv_token)i * step;
}

/* ------------------------------------------------------------------------ */
/* Token ids                                                                */
/* ------------------------------------------------------------------------ */

/* reserve_tokens / reserve_many_tokens record ids (NULL: unknown, -1), as
   plain llmkv_reserve does; seq_tokens reads any range back; fork copies
   them, truncate + reserve replaces them; a negative id is refused with
   nothing changed. */
static void test_prefix_tokens_roundtrip(tst* t) {
    llmkv_desc d = p_desc(4, 16, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b, f, seqs[2];
    static const llmkv_token ta[5] = {7, 0, 123456789, 2147483647, 3}, tb[3] = {1, 2, 3};
    static const llmkv_token bad[3] = {4, -1, 5}, bad2[2] = {9, INT32_MIN};
    llmkv_token want[12], got[16];
    const llmkv_token* many[2];
    uint32_t n2[2], i;
    llmkv_stats s0, s1;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, llmkv_seq_create(kv, &b));
    OK(t, llmkv_reserve_tokens(kv, a, ta, 5));
    OK(t, llmkv_seq_tokens(kv, a, 0, 5, got));
    for (i = 0; i < 5; ++i) TST_EQ(t, got[i], ta[i]);
    OK(t, llmkv_reserve_tokens(kv, a, NULL, 2)); /* positions 5, 6 unknown */
    OK(t, llmkv_reserve(kv, a, 1));              /* 7 unknown */
    seqs[0] = a;
    seqs[1] = b;
    many[0] = tb;
    many[1] = NULL;
    n2[0] = 3;
    n2[1] = 2;
    OK(t, llmkv_reserve_many_tokens(kv, seqs, n2, many, 2)); /* a: 8..10 = tb; b: 0, 1 unknown */
    n2[0] = 1;
    n2[1] = 2;
    OK(t, llmkv_reserve_many_tokens(kv, seqs, n2, NULL, 2)); /* a: 11; b: 2, 3 unknown */
    CHK(t, kv);
    for (i = 0; i < 5; ++i) want[i] = ta[i];
    want[5] = want[6] = want[7] = -1;
    want[8] = 1;
    want[9] = 2;
    want[10] = 3;
    want[11] = -1;
    TST_EQ(t, p_len(kv, a), 12);
    TST_EQ(t, p_len(kv, b), 4);
    for (i = 0; i < 16; ++i) got[i] = 555;
    OK(t, llmkv_seq_tokens(kv, a, 0, 12, got));
    for (i = 0; i < 12; ++i) TST_EQ(t, got[i], want[i]);
    TST_EQ(t, got[12], 555); /* nothing written past n_tokens */
    OK(t, llmkv_seq_tokens(kv, a, 3, 6, got));
    for (i = 0; i < 6; ++i) TST_EQ(t, got[i], want[3 + i]);
    OK(t, llmkv_seq_tokens(kv, b, 0, 4, got));
    for (i = 0; i < 4; ++i) TST_EQ(t, got[i], -1);
    TST_EQ(t, llmkv_seq_tokens(kv, a, 10, 3, got), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_seq_tokens(kv, a, 13, 0, got), LLMKV_ERR_OUT_OF_RANGE);
    OK(t, llmkv_seq_tokens(kv, a, 12, 0, got));

    /* fork copies the ids; truncate then reserve replaces them in the fork only */
    OK(t, llmkv_fork(kv, a, &f));
    OK(t, llmkv_seq_tokens(kv, f, 0, 12, got));
    for (i = 0; i < 12; ++i) TST_EQ(t, got[i], want[i]);
    OK(t, llmkv_truncate(kv, f, 4));
    OK(t, llmkv_reserve_tokens(kv, f, tb, 3));
    OK(t, llmkv_seq_tokens(kv, f, 0, 7, got));
    for (i = 0; i < 4; ++i) TST_EQ(t, got[i], ta[i]);
    for (i = 0; i < 3; ++i) TST_EQ(t, got[4 + i], tb[i]);
    OK(t, llmkv_seq_tokens(kv, a, 0, 12, got));
    for (i = 0; i < 12; ++i) TST_EQ(t, got[i], want[i]);
    CHK(t, kv);

    /* negative ids: refused, nothing changes */
    s0 = p_stats(kv);
    TST_EQ(t, llmkv_reserve_tokens(kv, a, bad, 3), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_reserve_tokens(kv, a, bad2, 2), LLMKV_ERR_INVALID_ARGUMENT);
    many[0] = tb;
    many[1] = bad;
    n2[0] = 3;
    n2[1] = 3;
    TST_EQ(t, llmkv_reserve_many_tokens(kv, seqs, n2, many, 2), LLMKV_ERR_INVALID_ARGUMENT);
    s1 = p_stats(kv);
    TST_CHECK(t, p_stats_same(&s0, &s1));
    TST_EQ(t, p_len(kv, a), 12);
    TST_EQ(t, p_len(kv, b), 4);
    OK(t, llmkv_seq_tokens(kv, a, 0, 12, got));
    for (i = 0; i < 12; ++i) TST_EQ(t, got[i], want[i]);
    CHK(t, kv);

    /* a freed handle */
    OK(t, llmkv_seq_free(kv, f));
    TST_EQ(t, llmkv_seq_tokens(kv, f, 0, 1, got), LLMKV_ERR_STALE_HANDLE);
    TST_EQ(t, llmkv_reserve_tokens(kv, f, tb, 1), LLMKV_ERR_STALE_HANDLE);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* Without desc.prefix_index the token calls answer UNSUPPORTED and change
   nothing, and the prefix counters stay 0. max_pins: default 64, range
   1..65536. */
static void test_prefix_unsupported_without_index(tst* t) {
    llmkv_desc d = p_desc(4, 8, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32), e;
    llmkv_cache* kv = NULL;
    llmkv_seq s, c, seqs[1];
    llmkv_pin pin;
    static const llmkv_token toks[4] = {1, 2, 3, 4};
    const llmkv_token* many[1];
    llmkv_token got[4];
    uint32_t n1[1] = {2}, nc = 77, np = 77;
    llmkv_stats st;
    d.prefix_index = 0;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &s));
    TST_EQ(t, llmkv_reserve_tokens(kv, s, toks, 2), LLMKV_ERR_UNSUPPORTED);
    seqs[0] = s;
    many[0] = toks;
    TST_EQ(t, llmkv_reserve_many_tokens(kv, seqs, n1, many, 1), LLMKV_ERR_UNSUPPORTED);
    TST_EQ(t, p_len(kv, s), 0);
    OK(t, llmkv_reserve(kv, s, 4));
    OK(t, p_write(kv, s, toks, 4));
    TST_EQ(t, llmkv_seq_tokens(kv, s, 0, 2, got), LLMKV_ERR_UNSUPPORTED);
    c.id = 99;
    TST_EQ(t, llmkv_seq_create_prefix(kv, 0, toks, 4, &c, &nc), LLMKV_ERR_UNSUPPORTED);
    TST_EQ(t, c.id, 0);
    TST_EQ(t, nc, 0);
    pin.id = 99;
    TST_EQ(t, llmkv_prefix_pin(kv, 0, toks, 4, &pin, &np), LLMKV_ERR_UNSUPPORTED);
    TST_EQ(t, pin.id, 0);
    TST_EQ(t, np, 0);
    OK(t, llmkv_seq_free(kv, s));
    st = p_stats(kv);
    TST_EQ(t, st.n_seqs, 0);
    TST_EQ(t, st.n_pages_free, 8); /* nothing was kept cached */
    TST_EQ(t, st.n_pages_cached, 0);
    TST_EQ(t, st.n_pages_evictable, 0);
    TST_EQ(t, st.n_pages_pinned, 0);
    TST_EQ(t, st.n_pins, 0);
    TST_EQ(t, st.n_evictions, 0);
    TST_EQ(t, st.prompt_tokens_matched, 0);
    TST_EQ(t, st.prompt_tokens_missed, 0);
    TST_CHECK(t, st.hit_rate == 0.0);
    CHK(t, kv);
    llmkv_cache_destroy(kv);

    /* descriptor: max_pins defaults to 64; 65536 is the largest */
    d.prefix_index = 1;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_cache_desc(kv, &e));
    TST_CHECK(t, e.prefix_index != 0);
    TST_EQ(t, e.max_pins, 64);
    llmkv_cache_destroy(kv);
    kv = NULL;
    d.max_pins = 65537;
    TST_EQ(t, llmkv_cache_create(&d, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, kv == NULL);
    d.max_pins = 65536;
    OK(t, llmkv_cache_create(&d, &kv));
    if (kv) {
        OK(t, llmkv_cache_desc(kv, &e));
        TST_EQ(t, e.max_pins, 65536);
        CHK(t, kv);
    }
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */
/* create_prefix and prefix_match                                           */
/* ------------------------------------------------------------------------ */

/* Pages of 4. a computes P[0, 10) and publishes its 2 full pages. Then:
   no match on an empty index; a full-page match (b holds a's pages, then
   grows into its own); the cap at n_prompt - 1 (a prompt of exactly 2
   pages matches 7); a match ending inside a page (c shares a's page 1 for
   2 slots; its first write copies it, a's page keeps its bytes, c reads its
   own tokens); n_prompt 0; and the errors, which change nothing. */
static void test_prefix_create_and_match(tst* t) {
    llmkv_desc d = p_desc(4, 16, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b, c, e, x, extra[2];
    llmkv_token P[40], Q[10], got[10];
    static const llmkv_token probe[2] = {100, 999};
    static const llmkv_token neg[2] = {100, -3};
    uint32_t pa[64], pb[64], pc[64], n, nc, i;
    uint64_t matched = 0, missed = 0;
    unsigned char* saved;
    size_t bytes;
    llmkv_stats s0, s1;
    d.max_seqs = 6;
    d.max_seq_len = 32;
    p_toks(P, 40, 100, 1);
    for (i = 0; i < 6; ++i) Q[i] = P[i];
    p_toks(Q + 6, 4, 300, 1);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    p_clear_pool(kv);

    /* empty index: no match; the sequence is empty */
    nc = 77;
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 10, &a, &nc));
    TST_EQ(t, nc, 0);
    TST_EQ(t, p_len(kv, a), 0);
    missed += 10;
    OK(t, p_feed(kv, a, P, 10));
    CHK(t, kv);
    P_EXPECT(t, kv, 0, 0, 0, 0); /* written after its reserve: not yet published */
    TST_EQ(t, p_match(kv, 0, P, 10), 0);
    OK(t, llmkv_seq_publish(kv, a, 0));
    CHK(t, kv);
    P_EXPECT(t, kv, 2, 0, 0, 0);
    TST_EQ(t, p_pages(kv, a, pa), 3);

    /* prefix_match: no cap, token-granular inside the first page too */
    TST_EQ(t, p_match(kv, 0, P, 10), 8);
    TST_EQ(t, p_match(kv, 0, P, 8), 8);
    TST_EQ(t, p_match(kv, 0, P, 7), 7);
    TST_EQ(t, p_match(kv, 0, P, 3), 3);
    TST_EQ(t, p_match(kv, 0, P, 0), 0);
    TST_EQ(t, p_match(kv, 0, probe, 2), 1);
    TST_EQ(t, p_match(kv, 0, Q, 10), 6);
    TST_EQ(t, p_match(kv, 0, P + 1, 8), 0);

    /* full-page match: b holds a's pages 0 and 1 */
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 10, &b, &nc));
    TST_EQ(t, nc, 8);
    matched += 8;
    missed += 2;
    TST_EQ(t, p_len(kv, b), 8);
    TST_EQ(t, p_pages(kv, b, pb), 2);
    TST_EQ(t, pb[0], pa[0]);
    TST_EQ(t, pb[1], pa[1]);
    OK(t, llmkv_seq_tokens(kv, b, 0, 8, got));
    for (i = 0; i < 8; ++i) TST_EQ(t, got[i], P[i]);
    TST_CHECK(t, p_holds(kv, b, P, 8));
    s0 = p_stats(kv);
    TST_EQ(t, s0.prompt_tokens_matched, matched);
    TST_EQ(t, s0.prompt_tokens_missed, missed);
    TST_EQ(t, s0.n_pages_used, 3);
    TST_EQ(t, s0.n_pages_shared, 2);
    CHK(t, kv);
    OK(t, p_feed(kv, b, P + 8, 2)); /* b's own page 2 */
    TST_EQ(t, p_pages(kv, b, pb), 3);
    TST_EQ(t, pb[0], pa[0]);
    TST_EQ(t, pb[1], pa[1]);
    TST_CHECK(t, pb[2] != pa[2]);
    TST_CHECK(t, p_holds(kv, b, P, 10));
    CHK(t, kv);

    /* the cap: the caller always computes the last prompt token */
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 8, &x, &nc));
    TST_EQ(t, nc, 7); /* 2 whole pages cached, but only 7 may match */
    matched += 7;
    missed += 1;
    TST_EQ(t, p_len(kv, x), 7);
    TST_EQ(t, p_pages(kv, x, pc), 2);
    TST_EQ(t, pc[1], pa[1]);
    OK(t, llmkv_seq_free(kv, x));
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 9, &x, &nc));
    TST_EQ(t, nc, 8);
    matched += 8;
    missed += 1;
    OK(t, llmkv_seq_free(kv, x));
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 5, &x, &nc));
    TST_EQ(t, nc, 4); /* ends on the page boundary */
    matched += 4;
    missed += 1;
    TST_EQ(t, p_pages(kv, x, pc), 1);
    OK(t, llmkv_seq_free(kv, x));
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 1, &x, &nc));
    TST_EQ(t, nc, 0);
    missed += 1;
    TST_EQ(t, p_len(kv, x), 0);
    OK(t, llmkv_seq_free(kv, x));
    CHK(t, kv);

    /* a match ending inside page 1: c shares it for 2 slots */
    OK(t, llmkv_seq_create_prefix(kv, 0, Q, 10, &c, &nc));
    TST_EQ(t, nc, 6);
    matched += 6;
    missed += 4;
    TST_EQ(t, p_len(kv, c), 6);
    TST_EQ(t, p_pages(kv, c, pc), 2);
    TST_EQ(t, pc[0], pa[0]);
    TST_EQ(t, pc[1], pa[1]);
    OK(t, llmkv_seq_tokens(kv, c, 0, 6, got));
    for (i = 0; i < 6; ++i) TST_EQ(t, got[i], Q[i]);
    TST_CHECK(t, p_holds(kv, c, Q, 6));
    s0 = p_stats(kv);
    TST_EQ(t, s0.n_pages_used, 4); /* no page taken */
    CHK(t, kv);
    saved = p_page_copy(kv, pa[1], &bytes);
    OK(t, p_feed(kv, c, Q + 6, 4)); /* first write: c's page 1 is copied */
    CHK(t, kv);
    TST_EQ(t, p_pages(kv, c, pc), 3);
    TST_EQ(t, pc[0], pa[0]);
    TST_CHECK(t, pc[1] != pa[1]);
    TST_CHECK(t, p_page_same(kv, pa[1], saved, bytes)); /* the cached page is untouched */
    TST_CHECK(t, p_holds(kv, c, Q, 10));
    TST_CHECK(t, p_holds(kv, a, P, 10));
    TST_CHECK(t, p_holds(kv, b, P, 10));
    TST_EQ(t, p_match(kv, 0, P, 10), 8);
    s0 = p_stats(kv);
    TST_EQ(t, s0.prompt_tokens_matched, matched);
    TST_EQ(t, s0.prompt_tokens_missed, missed);
    TST_CHECK(t, s0.hit_rate == (double)matched / (double)(matched + missed));

    /* n_prompt 0: an empty sequence, nothing counted */
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 0, &e, &nc));
    TST_EQ(t, nc, 0);
    TST_EQ(t, p_len(kv, e), 0);
    s1 = p_stats(kv);
    TST_EQ(t, s1.prompt_tokens_matched, matched);
    TST_EQ(t, s1.prompt_tokens_missed, missed);
    TST_EQ(t, s1.n_seqs, s0.n_seqs + 1);
    CHK(t, kv);

    /* errors change nothing */
    s0 = p_stats(kv);
    x.id = 5;
    nc = 5;
    TST_EQ(t, llmkv_seq_create_prefix(kv, 0, P, 33, &x, &nc), LLMKV_ERR_SEQUENCE_TOO_LONG);
    TST_EQ(t, x.id, 0);
    TST_EQ(t, nc, 0);
    x.id = 5;
    nc = 5;
    TST_EQ(t, llmkv_seq_create_prefix(kv, 0, neg, 2, &x, &nc), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, x.id, 0);
    TST_EQ(t, nc, 0);
    TST_EQ(t, llmkv_seq_create_prefix(kv, 0, NULL, 3, &x, &nc), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_seq_create_prefix(kv, 0, P, 3, NULL, &nc), LLMKV_ERR_INVALID_ARGUMENT);
    s1 = p_stats(kv);
    TST_CHECK(t, p_stats_same(&s0, &s1));
    CHK(t, kv);
    /* 32 = max_seq_len is allowed */
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 32, &x, &nc));
    TST_EQ(t, nc, 8);
    matched += 8;
    missed += 24;
    OK(t, llmkv_seq_free(kv, x));
    /* 6 live sequences: the seventh is refused, references untouched */
    OK(t, llmkv_seq_create(kv, &extra[0]));
    OK(t, llmkv_seq_create(kv, &extra[1]));
    s0 = p_stats(kv);
    TST_EQ(t, s0.n_seqs, 6);
    x.id = 5;
    nc = 5;
    TST_EQ(t, llmkv_seq_create_prefix(kv, 0, P, 10, &x, &nc), LLMKV_ERR_TOO_MANY_SEQUENCES);
    TST_EQ(t, x.id, 0);
    TST_EQ(t, nc, 0);
    s1 = p_stats(kv);
    TST_CHECK(t, p_stats_same(&s0, &s1));
    TST_EQ(t, s1.prompt_tokens_matched, matched);
    TST_EQ(t, s1.prompt_tokens_missed, missed);
    CHK(t, kv);
    OK(t, llmkv_seq_free(kv, extra[0]));
    OK(t, llmkv_seq_free(kv, extra[1]));
    OK(t, llmkv_seq_free(kv, e));
    OK(t, llmkv_seq_free(kv, a));
    OK(t, llmkv_seq_free(kv, b));
    OK(t, llmkv_seq_free(kv, c));
    CHK(t, kv);
    /* free publishes full pages only: c's copied page 1 (Q4..Q7) became a
       node under a's page 0; the 2-token pages 2 of a, b and c did not */
    n = p_match(kv, 0, Q, 10);
    TST_EQ(t, n, 8);
    TST_EQ(t, p_match(kv, 0, P, 10), 8);
    P_EXPECT(t, kv, 3, 3, 0, 0);
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */
/* Publishing                                                               */
/* ------------------------------------------------------------------------ */

/* A full page enters the index only once K and V of every layer are
   written over it (the watermark rules), only at reserve / publish / free,
   only with known tokens, and never after a page with an unknown slot. A
   reserved page nobody wrote is never matched. */
static void test_prefix_publish_needs_written(tst* t) {
    llmkv_desc d = p_desc(4, 32, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b, c, e, g, h, h2, i, x;
    llmkv_token P[8], R[8], S[9], T[8], U[5], V[8], W[4], X[9];
    uint32_t nc, cached = 0;
    p_toks(P, 8, 1000, 1);
    p_toks(R, 8, 2000, 1);
    p_toks(S, 9, 3000, 1);
    p_toks(T, 8, 4000, 1);
    p_toks(U, 5, 5000, 1);
    p_toks(V, 8, 6000, 1);
    p_toks(W, 4, 7000, 1);
    p_toks(X, 9, 8000, 1);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);

    /* layer by layer, part by part: published only when all are written */
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, llmkv_reserve_tokens(kv, a, P, 8));
    OK(t, p_put(kv, a, P, 8, 0, 3));
    OK(t, llmkv_seq_publish(kv, a, 1));
    P_EXPECT(t, kv, 0, 0, 0, 0);
    OK(t, p_put(kv, a, P, 8, 1, 1)); /* layer 1 K only */
    OK(t, llmkv_seq_publish(kv, a, 1));
    P_EXPECT(t, kv, 0, 0, 0, 0);
    TST_EQ(t, p_match(kv, 0, P, 8), 0);
    OK(t, p_put(kv, a, P, 8, 1, 2)); /* layer 1 V */
    CHK(t, kv);
    P_EXPECT(t, kv, 0, 0, 0, 0); /* put itself publishes nothing */
    OK(t, llmkv_seq_publish(kv, a, 0));
    cached += 2;
    P_EXPECT(t, kv, cached, 0, 0, 0);
    TST_EQ(t, p_match(kv, 0, P, 8), 8);
    CHK(t, kv);

    /* a put that starts past the watermark does not advance it */
    OK(t, llmkv_seq_create(kv, &b));
    OK(t, llmkv_reserve_tokens(kv, b, R, 8));
    OK(t, p_write(kv, b, R + 4, 4)); /* positions 4..7 only */
    OK(t, llmkv_seq_publish(kv, b, 0));
    P_EXPECT(t, kv, cached, 0, 0, 0);
    OK(t, p_write(kv, b, R, 8));
    OK(t, llmkv_seq_publish(kv, b, 0));
    cached += 2;
    P_EXPECT(t, kv, cached, 0, 0, 0);
    CHK(t, kv);

    /* published by the next reserve */
    OK(t, llmkv_seq_create(kv, &c));
    OK(t, p_feed(kv, c, S, 8));
    P_EXPECT(t, kv, cached, 0, 0, 0);
    OK(t, llmkv_reserve_tokens(kv, c, S + 8, 1));
    cached += 2;
    P_EXPECT(t, kv, cached, 0, 0, 0);
    TST_EQ(t, p_match(kv, 0, S, 9), 8);
    OK(t, p_write(kv, c, S + 8, 1));
    CHK(t, kv);

    /* truncate lowers the watermark: after truncate(6) + reserve 2, page 1
       is not written until the put */
    OK(t, llmkv_seq_create(kv, &e));
    OK(t, p_feed(kv, e, T, 8));
    OK(t, llmkv_truncate(kv, e, 6));
    OK(t, llmkv_reserve_tokens(kv, e, T + 6, 2));
    cached += 1; /* page 0 only */
    P_EXPECT(t, kv, cached, 0, 0, 0);
    TST_EQ(t, p_match(kv, 0, T, 8), 4);
    OK(t, p_write(kv, e, T + 6, 2));
    OK(t, llmkv_seq_publish(kv, e, 0));
    cached += 1;
    P_EXPECT(t, kv, cached, 0, 0, 0);
    TST_EQ(t, p_match(kv, 0, T, 8), 8);
    CHK(t, kv);

    /* published by free (full pages only), then evictable */
    OK(t, llmkv_seq_create(kv, &g));
    OK(t, p_feed(kv, g, U, 5));
    OK(t, llmkv_seq_free(kv, g));
    cached += 1;
    P_EXPECT(t, kv, cached, 1, 0, 0);
    TST_EQ(t, p_match(kv, 0, U, 5), 4);
    CHK(t, kv);

    /* unknown ids: that page and every later one stay out */
    OK(t, llmkv_seq_create(kv, &h));
    OK(t, llmkv_reserve(kv, h, 4));
    OK(t, p_write(kv, h, V, 4));
    OK(t, p_feed(kv, h, V + 4, 4));
    OK(t, llmkv_seq_publish(kv, h, 0));
    P_EXPECT(t, kv, cached, 1, 0, 0);
    TST_EQ(t, p_match(kv, 0, V + 4, 4), 0);
    OK(t, llmkv_seq_create(kv, &h2));
    OK(t, llmkv_reserve_tokens(kv, h2, W, 3));
    OK(t, llmkv_reserve_tokens(kv, h2, NULL, 1));
    OK(t, p_write(kv, h2, W, 4));
    OK(t, llmkv_seq_publish(kv, h2, 0));
    P_EXPECT(t, kv, cached, 1, 0, 0);
    /* the unknown slot rewritten with a known id: now it goes in */
    OK(t, llmkv_truncate(kv, h2, 3));
    OK(t, p_feed(kv, h2, W + 3, 1));
    OK(t, llmkv_seq_publish(kv, h2, 0));
    cached += 1;
    P_EXPECT(t, kv, cached, 1, 0, 0);
    TST_EQ(t, p_match(kv, 0, W, 4), 4);
    CHK(t, kv);

    /* reserved, never written: never matched, not even after free */
    OK(t, llmkv_seq_create(kv, &i));
    OK(t, llmkv_reserve_tokens(kv, i, X, 9));
    OK(t, llmkv_seq_publish(kv, i, 1));
    P_EXPECT(t, kv, cached, 1, 0, 0);
    OK(t, llmkv_seq_create_prefix(kv, 0, X, 9, &x, &nc));
    TST_EQ(t, nc, 0);
    OK(t, llmkv_seq_free(kv, x));
    OK(t, llmkv_seq_free(kv, i));
    P_EXPECT(t, kv, cached, 1, 0, 0);
    TST_EQ(t, p_match(kv, 0, X, 9), 0);
    CHK(t, kv);
    OK(t, llmkv_seq_free(kv, a));
    OK(t, llmkv_seq_free(kv, b));
    OK(t, llmkv_seq_free(kv, c));
    OK(t, llmkv_seq_free(kv, e));
    OK(t, llmkv_seq_free(kv, h));
    OK(t, llmkv_seq_free(kv, h2));
    P_EXPECT(t, kv, cached, cached, 0, 0);
    TST_EQ(t, p_stats(kv).n_pages_used, 0);
    TST_EQ(t, p_stats(kv).n_pages_free, 32 - cached);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* A failing reserve publishes nothing (3 pages: one held by a filler, two
   by a, full and written). */
static void test_prefix_failed_reserve_publishes_nothing(tst* t) {
    llmkv_desc d = p_desc(4, 3, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, filler;
    llmkv_token P[9];
    llmkv_stats s0, s1;
    p_toks(P, 9, 10, 3);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &filler));
    OK(t, llmkv_reserve(kv, filler, 1));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 8));
    s0 = p_stats(kv);
    TST_EQ(t, llmkv_reserve_tokens(kv, a, P + 8, 1), LLMKV_ERR_OUT_OF_PAGES);
    TST_EQ(t, llmkv_reserve(kv, a, 1), LLMKV_ERR_OUT_OF_PAGES);
    s1 = p_stats(kv);
    TST_CHECK(t, p_stats_same(&s0, &s1));
    P_EXPECT(t, kv, 0, 0, 0, 0);
    TST_EQ(t, p_match(kv, 0, P, 8), 0);
    CHK(t, kv);
    OK(t, llmkv_seq_publish(kv, a, 0));
    P_EXPECT(t, kv, 2, 0, 0, 0);
    /* held by a: not evictable, so still no room */
    TST_EQ(t, llmkv_reserve_tokens(kv, a, P + 8, 1), LLMKV_ERR_OUT_OF_PAGES);
    TST_EQ(t, p_len(kv, a), 8);
    TST_CHECK(t, p_holds(kv, a, P, 8));
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* Metadata-only caches: llmkv_seq_mark_written declares what the device
   wrote (clamped to the length, never lowered); a partial match's first
   write queues the copy of exactly the matched slots. */
static void test_prefix_mark_written_metadata_only(tst* t) {
    llmkv_desc d = p_desc(4, 8, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b;
    llmkv_token P[10], Q[11], got[11];
    llmkv_copy_cmd cmds[8];
    uint32_t pa[64], pb[64], n, nc, i;
    p_toks(P, 10, 40, 7);
    for (i = 0; i < 9; ++i) Q[i] = P[i];
    Q[9] = 777;
    Q[10] = 778;
    d.storage = LLMKV_STORAGE_METADATA_ONLY;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, llmkv_reserve_tokens(kv, a, P, 8));
    OK(t, llmkv_seq_publish(kv, a, 0));
    P_EXPECT(t, kv, 0, 0, 0, 0);
    OK(t, llmkv_seq_mark_written(kv, a, 5));
    OK(t, llmkv_seq_publish(kv, a, 0));
    P_EXPECT(t, kv, 1, 0, 0, 0);
    TST_EQ(t, p_match(kv, 0, P, 8), 4);
    OK(t, llmkv_seq_mark_written(kv, a, 100)); /* clamped to 8 */
    OK(t, llmkv_seq_publish(kv, a, 0));
    P_EXPECT(t, kv, 2, 0, 0, 0);
    TST_EQ(t, p_match(kv, 0, P, 8), 8);
    CHK(t, kv);
    OK(t, llmkv_seq_mark_written(kv, a, 3)); /* never lowers */
    OK(t, llmkv_reserve_tokens(kv, a, P + 8, 2));
    OK(t, llmkv_seq_publish(kv, a, 1)); /* 8 written of 10: no partial page */
    P_EXPECT(t, kv, 2, 0, 0, 0);
    OK(t, llmkv_seq_mark_written(kv, a, 10));
    OK(t, llmkv_seq_publish(kv, a, 1));
    P_EXPECT(t, kv, 3, 0, 0, 0);
    TST_EQ(t, p_match(kv, 0, P, 10), 10);
    CHK(t, kv);
    TST_EQ(t, p_pages(kv, a, pa), 3);

    /* b matches 9 (1 slot of the partial node); its reserve copies 1 slot */
    OK(t, llmkv_copy_cmds_take(kv, cmds, 8, &n));
    OK(t, llmkv_seq_create_prefix(kv, 0, Q, 11, &b, &nc));
    TST_EQ(t, nc, 9);
    TST_EQ(t, p_pages(kv, b, pb), 3);
    TST_EQ(t, pb[2], pa[2]);
    OK(t, llmkv_copy_cmds_take(kv, cmds, 8, &n));
    TST_EQ(t, n, 0); /* create_prefix allocates and copies nothing */
    OK(t, llmkv_reserve_tokens(kv, b, Q + 9, 2));
    TST_EQ(t, p_pages(kv, b, pb), 3);
    TST_CHECK(t, pb[2] != pa[2]);
    OK(t, llmkv_copy_cmds_take(kv, cmds, 8, &n));
    TST_EQ(t, n, 1);
    if (n == 1) {
        TST_EQ(t, cmds[0].src_page, pa[2]);
        TST_EQ(t, cmds[0].dst_page, pb[2]);
        TST_EQ(t, cmds[0].n_slots, 1);
    }
    OK(t, llmkv_seq_tokens(kv, b, 0, 11, got));
    for (i = 0; i < 11; ++i) TST_EQ(t, got[i], Q[i]);
    OK(t, llmkv_seq_tokens(kv, a, 0, 10, got));
    for (i = 0; i < 10; ++i) TST_EQ(t, got[i], P[i]);
    CHK(t, kv);
    /* stale handles */
    OK(t, llmkv_seq_free(kv, b));
    TST_EQ(t, llmkv_seq_mark_written(kv, b, 1), LLMKV_ERR_STALE_HANDLE);
    TST_EQ(t, llmkv_seq_publish(kv, b, 0), LLMKV_ERR_STALE_HANDLE);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* llmkv_seq_publish(seq, 1): the written, partly filled last page becomes
   a (leaf) node; the sequence's next write copies it (its bytes stay);
   matching and create_prefix go token by token into it; ties between
   candidates go to the lowest page id; a partial page is not published
   while unwritten, with an unknown id, or when a node under the same parent
   already holds the same first tokens (a longer one counts, a shorter one
   does not). Pins cover a partial node only when all its tokens match. */
static void test_prefix_partial_publish(tst* t) {
    llmkv_desc d = p_desc(4, 32, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b, c, e, g, x;
    llmkv_token P[8], Pz[6], Y[8], R[6], S[6], Z[7];
    llmkv_pin pin;
    uint32_t pa[64], pa_partial, pb[64], pc[64], px[64], pz[64], nc, np, i, c2p, e2p;
    unsigned char* saved;
    size_t bytes;
    p_toks(P, 8, 60, 1);
    for (i = 0; i < 5; ++i) Pz[i] = P[i];
    Pz[5] = 999;
    for (i = 0; i < 6; ++i) Y[i] = P[i];
    Y[6] = 888;
    Y[7] = 887;
    p_toks(R, 6, 160, 1);
    p_toks(S, 6, 260, 1);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    p_clear_pool(kv);

    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 6));
    OK(t, llmkv_seq_publish(kv, a, 0));
    P_EXPECT(t, kv, 1, 0, 0, 0);
    OK(t, llmkv_seq_publish(kv, a, 1));
    P_EXPECT(t, kv, 2, 0, 0, 0);
    OK(t, llmkv_seq_publish(kv, a, 1)); /* already a node: nothing more */
    P_EXPECT(t, kv, 2, 0, 0, 0);
    CHK(t, kv);
    TST_EQ(t, p_pages(kv, a, pa), 2);
    pa_partial = pa[1];
    TST_EQ(t, p_match(kv, 0, P, 6), 6);
    TST_EQ(t, p_match(kv, 0, P, 5), 5);
    TST_EQ(t, p_match(kv, 0, P, 8), 6);
    TST_EQ(t, p_match(kv, 0, Pz, 6), 5);
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 7, &b, &nc));
    TST_EQ(t, nc, 6);
    TST_EQ(t, p_pages(kv, b, pb), 2);
    TST_EQ(t, pb[1], pa_partial);
    TST_CHECK(t, p_holds(kv, b, P, 6));
    OK(t, llmkv_seq_free(kv, b));
    CHK(t, kv);

    /* a writes on: its page 1 is copied first, the node keeps its bytes */
    saved = p_page_copy(kv, pa_partial, &bytes);
    OK(t, p_feed(kv, a, P + 6, 1));
    CHK(t, kv);
    TST_EQ(t, p_pages(kv, a, pa), 2);
    TST_CHECK(t, pa[1] != pa_partial);
    TST_CHECK(t, p_page_same(kv, pa_partial, saved, bytes));
    TST_CHECK(t, p_holds(kv, a, P, 7));
    P_EXPECT(t, kv, 2, 1, 0, 0); /* the partial node: held by nobody now */
    TST_EQ(t, p_match(kv, 0, P, 8), 6);
    OK(t, p_feed(kv, a, P + 7, 1));
    OK(t, llmkv_seq_publish(kv, a, 0)); /* the full page 1 is a new node beside the partial one */
    P_EXPECT(t, kv, 3, 1, 0, 0);
    TST_EQ(t, p_match(kv, 0, P, 8), 8);
    /* a tie (lcp 2 on both): the lower page id */
    OK(t, llmkv_seq_create_prefix(kv, 0, Y, 8, &x, &nc));
    TST_EQ(t, nc, 6);
    TST_EQ(t, p_pages(kv, x, px), 2);
    TST_EQ(t, px[1], pa[1] < pa_partial ? pa[1] : pa_partial);
    OK(t, llmkv_seq_free(kv, x));
    CHK(t, kv);

    /* c computes P[0, 6): page 0 dedupes, its partial page is not published
       (nodes under page 0 hold P4 P5 already) */
    OK(t, llmkv_seq_create(kv, &c));
    OK(t, p_feed(kv, c, P, 6));
    OK(t, llmkv_seq_publish(kv, c, 1));
    P_EXPECT(t, kv, 3, 1, 0, 0);
    TST_EQ(t, p_pages(kv, c, pc), 2);
    TST_EQ(t, pc[0], pa[0]);
    TST_CHECK(t, pc[1] != pa[1] && pc[1] != pa_partial);
    TST_CHECK(t, p_holds(kv, c, P, 6));
    CHK(t, kv);

    /* not written to the end: no partial page until it is */
    OK(t, llmkv_seq_create(kv, &e));
    OK(t, p_feed(kv, e, R, 5));
    OK(t, llmkv_reserve_tokens(kv, e, R + 5, 1)); /* publishes page 0 */
    P_EXPECT(t, kv, 4, 1, 0, 0);
    OK(t, llmkv_seq_publish(kv, e, 1));
    P_EXPECT(t, kv, 4, 1, 0, 0);
    OK(t, p_write(kv, e, R + 5, 1));
    OK(t, llmkv_seq_publish(kv, e, 1));
    P_EXPECT(t, kv, 5, 1, 0, 0);
    TST_EQ(t, p_match(kv, 0, R, 6), 6);

    /* an unknown id in the last page: only the full page */
    OK(t, llmkv_seq_create(kv, &g));
    OK(t, llmkv_reserve_tokens(kv, g, S, 4));
    OK(t, llmkv_reserve_tokens(kv, g, NULL, 1));
    OK(t, llmkv_reserve_tokens(kv, g, S + 5, 1));
    OK(t, p_write(kv, g, S, 6));
    OK(t, llmkv_seq_publish(kv, g, 1));
    P_EXPECT(t, kv, 6, 1, 0, 0);
    TST_EQ(t, p_match(kv, 0, S, 6), 4);
    CHK(t, kv);
    OK(t, llmkv_seq_free(kv, a));
    OK(t, llmkv_seq_free(kv, c));
    OK(t, llmkv_seq_free(kv, e));
    OK(t, llmkv_seq_free(kv, g));
    P_EXPECT(t, kv, 6, 6, 0, 0);
    CHK(t, kv);
    llmkv_cache_destroy(kv);

    /* a longer node blocks, a shorter one does not */
    for (i = 0; i < 4; ++i) Z[i] = P[i];
    Z[4] = 50;
    Z[5] = 51;
    Z[6] = 52;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 8));
    OK(t, llmkv_seq_publish(kv, a, 1));
    P_EXPECT(t, kv, 2, 0, 0, 0);
    TST_EQ(t, p_pages(kv, a, pa), 2);
    OK(t, llmkv_seq_create(kv, &b));
    OK(t, p_feed(kv, b, P, 6));
    OK(t, llmkv_seq_publish(kv, b, 1)); /* the full node P4..P7 holds P4 P5 */
    P_EXPECT(t, kv, 2, 0, 0, 0);
    TST_EQ(t, p_stats(kv).n_pages_used, 3);
    OK(t, llmkv_seq_create(kv, &c));
    OK(t, p_feed(kv, c, Z, 5));
    OK(t, llmkv_seq_publish(kv, c, 1)); /* [50] */
    P_EXPECT(t, kv, 3, 0, 0, 0);
    OK(t, llmkv_seq_create(kv, &e));
    OK(t, p_feed(kv, e, Z, 6));
    OK(t, llmkv_seq_publish(kv, e, 1)); /* [50 51]: the shorter [50] does not block */
    P_EXPECT(t, kv, 4, 0, 0, 0);
    OK(t, llmkv_seq_create(kv, &g));
    OK(t, p_feed(kv, g, Z, 5));
    OK(t, llmkv_seq_publish(kv, g, 1)); /* [50]: blocked */
    P_EXPECT(t, kv, 4, 0, 0, 0);
    TST_EQ(t, p_pages(kv, c, pz), 2);
    c2p = pz[1];
    TST_EQ(t, p_pages(kv, e, pz), 2);
    e2p = pz[1];
    TST_EQ(t, pz[0], pa[0]);
    TST_EQ(t, p_match(kv, 0, Z, 7), 6);
    TST_EQ(t, p_match(kv, 0, Z, 5), 5);
    CHK(t, kv);
    /* pins: whole nodes only */
    OK(t, llmkv_prefix_pin(kv, 0, P, 6, &pin, &np));
    TST_EQ(t, np, 4); /* P4..P7 only partly matched */
    OK(t, llmkv_prefix_unpin(kv, pin));
    OK(t, llmkv_prefix_pin(kv, 0, Z, 6, &pin, &np));
    TST_EQ(t, np, 6); /* [50 51] whole */
    P_EXPECT(t, kv, 4, 0, 2, 1);
    OK(t, llmkv_prefix_unpin(kv, pin));
    /* limit 5: [50] and [50 51] both match 1 token; the lower page id is
       the candidate, and it is pinned only if that is [50] */
    OK(t, llmkv_prefix_pin(kv, 0, Z, 5, &pin, &np));
    TST_EQ(t, np, c2p < e2p ? 5 : 4);
    OK(t, llmkv_prefix_unpin(kv, pin));
    P_EXPECT(t, kv, 4, 0, 0, 0);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* Two sequences computing the same prompt: the second's pages are swapped
   for the cached ones (at publish, at reserve, at free), its own pages
   freed, its data unchanged. Keys include the parent: the same tokens after
   a different first page are a different node. */
static void test_prefix_dedupe(tst* t) {
    llmkv_desc d = p_desc(4, 16, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b, c, e, g, h;
    llmkv_token P[9], H[8];
    uint32_t pa[64], pb[64], pc[64], ph[64], i;
    llmkv_stats st;
    p_toks(P, 9, 11, 5);
    p_toks(H, 4, 9000, 1);
    for (i = 4; i < 8; ++i) H[i] = P[i];
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, llmkv_seq_create(kv, &b));
    OK(t, llmkv_reserve_tokens(kv, a, P, 8));
    OK(t, llmkv_reserve_tokens(kv, b, P, 8));
    OK(t, p_write(kv, a, P, 8));
    OK(t, p_write(kv, b, P, 8));
    TST_EQ(t, p_stats(kv).n_pages_used, 4);
    OK(t, llmkv_seq_publish(kv, a, 0));
    TST_EQ(t, p_stats(kv).n_pages_used, 4);
    OK(t, llmkv_seq_publish(kv, b, 0));
    CHK(t, kv);
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_used, 2);
    TST_EQ(t, st.n_pages_free, 14);
    TST_EQ(t, st.n_pages_shared, 2);
    TST_EQ(t, st.n_pages_cached, 2);
    TST_EQ(t, p_pages(kv, a, pa), 2);
    TST_EQ(t, p_pages(kv, b, pb), 2);
    TST_EQ(t, pb[0], pa[0]);
    TST_EQ(t, pb[1], pa[1]);
    TST_CHECK(t, p_holds(kv, b, P, 8));

    /* at reserve (after it succeeded) */
    OK(t, llmkv_seq_create(kv, &c));
    OK(t, p_feed(kv, c, P, 8));
    TST_EQ(t, p_stats(kv).n_pages_used, 4);
    OK(t, llmkv_reserve_tokens(kv, c, P + 8, 1));
    CHK(t, kv);
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_used, 3);
    TST_EQ(t, st.n_pages_free, 13);
    TST_EQ(t, p_pages(kv, c, pc), 3);
    TST_EQ(t, pc[0], pa[0]);
    TST_EQ(t, pc[1], pa[1]);
    OK(t, p_write(kv, c, P + 8, 1));
    TST_CHECK(t, p_holds(kv, c, P, 9));

    /* at free */
    OK(t, llmkv_seq_create(kv, &e));
    OK(t, p_feed(kv, e, P, 8));
    TST_EQ(t, p_stats(kv).n_pages_free, 11);
    OK(t, llmkv_seq_free(kv, e));
    CHK(t, kv);
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_free, 13);
    TST_EQ(t, st.n_pages_cached, 2);
    TST_EQ(t, st.n_pages_evictable, 0);

    /* into evictable cached pages: they leave the LRU */
    OK(t, llmkv_seq_free(kv, a));
    OK(t, llmkv_seq_free(kv, b));
    OK(t, llmkv_seq_free(kv, c));
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_used, 0);
    TST_EQ(t, st.n_pages_free, 14);
    TST_EQ(t, st.n_pages_evictable, 2);
    OK(t, llmkv_seq_create(kv, &g));
    OK(t, p_feed(kv, g, P, 8));
    TST_EQ(t, p_stats(kv).n_pages_free, 12);
    OK(t, llmkv_seq_publish(kv, g, 0));
    CHK(t, kv);
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_free, 14);
    TST_EQ(t, st.n_pages_used, 2);
    TST_EQ(t, st.n_pages_evictable, 0);
    TST_EQ(t, st.n_pages_cached, 2);
    TST_EQ(t, p_pages(kv, g, pc), 2);
    TST_EQ(t, pc[0], pa[0]);
    TST_EQ(t, pc[1], pa[1]);
    TST_CHECK(t, p_holds(kv, g, P, 8));

    /* same tokens under another parent: new nodes */
    OK(t, llmkv_seq_create(kv, &h));
    OK(t, p_feed(kv, h, H, 8));
    OK(t, llmkv_seq_publish(kv, h, 0));
    CHK(t, kv);
    P_EXPECT(t, kv, 4, 0, 0, 0);
    TST_EQ(t, p_pages(kv, h, ph), 2);
    TST_CHECK(t, ph[0] != pa[0] && ph[0] != pa[1] && ph[1] != pa[0] && ph[1] != pa[1]);
    TST_EQ(t, p_match(kv, 0, H, 8), 8);
    TST_CHECK(t, p_holds(kv, h, H, 8));
    OK(t, llmkv_seq_free(kv, g));
    OK(t, llmkv_seq_free(kv, h));
    P_EXPECT(t, kv, 4, 4, 0, 0);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */
/* Eviction                                                                 */
/* ------------------------------------------------------------------------ */

/* A known history decides exactly which prefix goes first. 6 pages of 4;
   A, B, C one page each, cached in that order, then A touched (a sequence
   takes and drops it; prefix_match does not count as a touch): LRU is
   B, C, A. A reserve of 4 pages takes the 3 free ones and evicts B (whose
   page it then holds), the next page evicts C, the next A; then nothing
   is left to evict. */
static void test_prefix_lru_order(tst* t) {
    llmkv_desc d = p_desc(4, 6, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq s, h;
    llmkv_token A[5], B[4], C[4];
    uint32_t pg[64], pA, pB, pC, nc;
    llmkv_stats st;
    p_toks(A, 5, 100, 1);
    A[4] = 5;
    p_toks(B, 4, 200, 1);
    p_toks(C, 4, 300, 1);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &s));
    OK(t, p_feed(kv, s, A, 4));
    TST_EQ(t, p_pages(kv, s, pg), 1);
    pA = pg[0];
    OK(t, llmkv_seq_free(kv, s));
    OK(t, llmkv_seq_create(kv, &s));
    OK(t, p_feed(kv, s, B, 4));
    TST_EQ(t, p_pages(kv, s, pg), 1);
    pB = pg[0];
    OK(t, llmkv_seq_free(kv, s));
    OK(t, llmkv_seq_create(kv, &s));
    OK(t, p_feed(kv, s, C, 4));
    TST_EQ(t, p_pages(kv, s, pg), 1);
    pC = pg[0];
    OK(t, llmkv_seq_free(kv, s));
    P_EXPECT(t, kv, 3, 3, 0, 0);
    TST_EQ(t, p_stats(kv).n_pages_free, 3);
    CHK(t, kv);
    /* touch A */
    OK(t, llmkv_seq_create_prefix(kv, 0, A, 5, &s, &nc));
    TST_EQ(t, nc, 4);
    TST_EQ(t, p_pages(kv, s, pg), 1);
    TST_EQ(t, pg[0], pA);
    P_EXPECT(t, kv, 3, 2, 0, 0);
    OK(t, llmkv_seq_free(kv, s));
    P_EXPECT(t, kv, 3, 3, 0, 0);
    TST_EQ(t, p_match(kv, 0, B, 4), 4); /* read-only: no touch */
    CHK(t, kv);

    OK(t, llmkv_seq_create(kv, &h));
    OK(t, llmkv_reserve(kv, h, 16));
    CHK(t, kv);
    st = p_stats(kv);
    TST_EQ(t, st.n_evictions, 1);
    TST_EQ(t, st.n_pages_cached, 2);
    TST_EQ(t, st.n_pages_evictable, 2);
    TST_EQ(t, st.n_pages_free, 0);
    TST_EQ(t, p_match(kv, 0, B, 4), 0);
    TST_EQ(t, p_match(kv, 0, C, 4), 4);
    TST_EQ(t, p_match(kv, 0, A, 4), 4);
    TST_EQ(t, p_pages(kv, h, pg), 4);
    TST_EQ(t, pg[3], pB); /* the evicted page is the one taken */
    OK(t, llmkv_reserve(kv, h, 4));
    TST_EQ(t, p_match(kv, 0, C, 4), 0);
    TST_EQ(t, p_match(kv, 0, A, 4), 4);
    TST_EQ(t, p_pages(kv, h, pg), 5);
    TST_EQ(t, pg[4], pC);
    OK(t, llmkv_reserve(kv, h, 4));
    TST_EQ(t, p_match(kv, 0, A, 4), 0);
    TST_EQ(t, p_pages(kv, h, pg), 6);
    TST_EQ(t, pg[5], pA);
    st = p_stats(kv);
    TST_EQ(t, st.n_evictions, 3);
    TST_EQ(t, st.n_pages_cached, 0);
    TST_EQ(t, st.n_pages_evictable, 0);
    OK(t, llmkv_seq_create(kv, &s));
    TST_EQ(t, llmkv_reserve(kv, s, 1), LLMKV_ERR_OUT_OF_PAGES);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* A copy-on-write that drops a sequence's reference makes the cached page
   evictable at that moment (most recent), not at its old place. */
static void test_prefix_lru_after_copy_on_write(tst* t) {
    llmkv_desc d = p_desc(4, 8, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq s, b;
    llmkv_token P[4], X[4], Q[4];
    uint32_t nc, n;
    p_toks(P, 4, 10, 1);
    p_toks(X, 4, 20, 1);
    Q[0] = P[0];
    Q[1] = P[1];
    Q[2] = 77;
    Q[3] = 78;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &s));
    OK(t, p_feed(kv, s, P, 4));
    OK(t, llmkv_seq_free(kv, s)); /* LRU: P */
    OK(t, llmkv_seq_create(kv, &s));
    OK(t, p_feed(kv, s, X, 4));
    OK(t, llmkv_seq_free(kv, s)); /* LRU: P X */
    OK(t, llmkv_seq_create_prefix(kv, 0, Q, 4, &b, &nc));
    TST_EQ(t, nc, 2); /* b holds P's page: LRU X */
    P_EXPECT(t, kv, 2, 1, 0, 0);
    OK(t, p_feed(kv, b, Q + 2, 2)); /* copies: P's page released, LRU X P */
    P_EXPECT(t, kv, 2, 2, 0, 0);
    TST_CHECK(t, p_holds(kv, b, Q, 4));
    OK(t, llmkv_prefix_evict(kv, 1, &n));
    TST_EQ(t, n, 1);
    TST_EQ(t, p_match(kv, 0, X, 4), 0);
    TST_EQ(t, p_match(kv, 0, P, 4), 4);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* A chain is evicted leaf first: free releases from the last page to the
   first, so a branch published later sits between. P = 3 pages, then a
   branch Q sharing P's first page: LRU P2 P1 Q1 P0. */
static void test_prefix_evict_leaves_first(tst* t) {
    llmkv_desc d = p_desc(4, 16, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b;
    llmkv_token P[12], Q[9];
    uint32_t n = 99, nc, i;
    llmkv_stats st;
    p_toks(P, 12, 500, 1);
    for (i = 0; i < 4; ++i) Q[i] = P[i];
    p_toks(Q + 4, 5, 600, 1);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 12));
    OK(t, llmkv_seq_free(kv, a));
    P_EXPECT(t, kv, 3, 3, 0, 0);
    OK(t, llmkv_seq_create_prefix(kv, 0, Q, 9, &b, &nc));
    TST_EQ(t, nc, 4);
    P_EXPECT(t, kv, 3, 2, 0, 0);
    OK(t, p_feed(kv, b, Q + 4, 5));
    OK(t, llmkv_seq_free(kv, b)); /* publishes Q1; releases b's page 2, Q1, P0 */
    P_EXPECT(t, kv, 4, 4, 0, 0);
    TST_EQ(t, p_match(kv, 0, P, 12), 12);
    TST_EQ(t, p_match(kv, 0, Q, 9), 8);
    CHK(t, kv);
    OK(t, llmkv_prefix_evict(kv, 1, &n));
    TST_EQ(t, n, 1);
    TST_EQ(t, p_match(kv, 0, P, 12), 8);
    TST_EQ(t, p_match(kv, 0, Q, 9), 8);
    CHK(t, kv);
    OK(t, llmkv_prefix_evict(kv, 1, NULL));
    TST_EQ(t, p_match(kv, 0, P, 12), 4);
    TST_EQ(t, p_match(kv, 0, Q, 9), 8);
    CHK(t, kv);
    OK(t, llmkv_prefix_evict(kv, 1, &n));
    TST_EQ(t, n, 1);
    TST_EQ(t, p_match(kv, 0, P, 12), 4);
    TST_EQ(t, p_match(kv, 0, Q, 9), 4);
    CHK(t, kv);
    OK(t, llmkv_prefix_evict(kv, 0, &n));
    TST_EQ(t, n, 0);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    TST_EQ(t, n, 1);
    TST_EQ(t, p_match(kv, 0, P, 12), 0);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    TST_EQ(t, n, 0);
    st = p_stats(kv);
    TST_EQ(t, st.n_evictions, 4);
    TST_EQ(t, st.n_pages_cached, 0);
    TST_EQ(t, st.n_pages_free, 16);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* Pages a live sequence holds or a pin keeps are never evicted, by
   llmkv_prefix_evict or by a reserve under pressure. */
static void test_prefix_evict_spares_held_and_pinned(tst* t) {
    llmkv_desc d = p_desc(4, 12, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b, h, x;
    llmkv_token P[8], Q[9], R[8];
    llmkv_pin pin;
    uint32_t n, np, nc;
    llmkv_stats st;
    p_toks(P, 8, 1, 1);
    p_toks(Q, 9, 101, 1);
    p_toks(R, 8, 201, 1);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 8));
    OK(t, llmkv_seq_publish(kv, a, 0)); /* held by a */
    OK(t, llmkv_seq_create(kv, &b));
    OK(t, p_feed(kv, b, Q, 8));
    OK(t, llmkv_seq_free(kv, b));
    OK(t, llmkv_prefix_pin(kv, 0, Q, 8, &pin, &np)); /* pinned */
    TST_EQ(t, np, 8);
    OK(t, llmkv_seq_create(kv, &b));
    OK(t, p_feed(kv, b, R, 8));
    OK(t, llmkv_seq_free(kv, b)); /* evictable */
    P_EXPECT(t, kv, 6, 2, 2, 1);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    TST_EQ(t, n, 2);
    P_EXPECT(t, kv, 4, 0, 2, 1);
    TST_EQ(t, p_match(kv, 0, P, 8), 8);
    TST_EQ(t, p_match(kv, 0, Q, 8), 8);
    TST_EQ(t, p_match(kv, 0, R, 8), 0);
    CHK(t, kv);
    /* pressure: everything else taken, repeatedly */
    OK(t, llmkv_seq_create(kv, &h));
    OK(t, llmkv_reserve(kv, h, 32)); /* 8 free pages */
    TST_EQ(t, llmkv_reserve(kv, h, 1), LLMKV_ERR_OUT_OF_PAGES);
    OK(t, llmkv_truncate(kv, h, 0));
    OK(t, llmkv_reserve(kv, h, 32));
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_free, 0);
    TST_EQ(t, st.n_evictions, 2);
    TST_CHECK(t, p_holds(kv, a, P, 8));
    OK(t, llmkv_seq_create_prefix(kv, 0, Q, 9, &x, &nc));
    TST_EQ(t, nc, 8);
    TST_CHECK(t, p_holds(kv, x, Q, 8));
    OK(t, llmkv_seq_free(kv, x));
    CHK(t, kv);
    OK(t, llmkv_seq_free(kv, h));
    OK(t, llmkv_seq_free(kv, a));
    OK(t, llmkv_prefix_unpin(kv, pin));
    P_EXPECT(t, kv, 4, 4, 0, 0);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* Evictions inside reserve: 4 pages, all cached and evictable. A reserve
   of 2 pages succeeds by evicting the 2 deepest (and holds exactly those
   pages); one of 3 fails (free 0 + evictable 2) with nothing changed;
   reserve_many counts evictable pages the same way. */
static void test_prefix_evict_in_reserve(tst* t) {
    llmkv_desc d = p_desc(4, 4, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b, c, seqs[2];
    llmkv_token P[16];
    uint32_t pa[64], pb[64], four[2] = {4, 4}, five[2] = {4, 5};
    llmkv_stats s0, s1;
    p_toks(P, 16, 3, 2);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 16));
    TST_EQ(t, p_pages(kv, a, pa), 4);
    OK(t, llmkv_seq_free(kv, a));
    P_EXPECT(t, kv, 4, 4, 0, 0);
    TST_EQ(t, p_stats(kv).n_pages_free, 0);
    OK(t, llmkv_seq_create(kv, &b));
    OK(t, llmkv_reserve(kv, b, 8));
    CHK(t, kv);
    TST_EQ(t, p_pages(kv, b, pb), 2);
    TST_EQ(t, pb[0], pa[3]);
    TST_EQ(t, pb[1], pa[2]);
    s0 = p_stats(kv);
    TST_EQ(t, s0.n_evictions, 2);
    TST_EQ(t, s0.n_pages_cached, 2);
    TST_EQ(t, s0.n_pages_evictable, 2);
    TST_EQ(t, p_match(kv, 0, P, 16), 8);
    OK(t, llmkv_seq_create(kv, &c));
    s0 = p_stats(kv);
    TST_EQ(t, llmkv_reserve(kv, c, 12), LLMKV_ERR_OUT_OF_PAGES);
    TST_EQ(t, llmkv_reserve_tokens(kv, c, P, 12), LLMKV_ERR_OUT_OF_PAGES);
    seqs[0] = b;
    seqs[1] = c;
    TST_EQ(t, llmkv_reserve_many(kv, seqs, five, 2), LLMKV_ERR_OUT_OF_PAGES);
    s1 = p_stats(kv);
    TST_CHECK(t, p_stats_same(&s0, &s1));
    TST_EQ(t, p_len(kv, b), 8);
    TST_EQ(t, p_len(kv, c), 0);
    TST_EQ(t, p_match(kv, 0, P, 16), 8);
    CHK(t, kv);
    OK(t, llmkv_reserve_many(kv, seqs, four, 2));
    s1 = p_stats(kv);
    TST_EQ(t, s1.n_evictions, 4);
    TST_EQ(t, s1.n_pages_cached, 0);
    TST_EQ(t, p_match(kv, 0, P, 16), 0);
    TST_EQ(t, p_pages(kv, b, pb), 3);
    TST_EQ(t, p_pages(kv, c, pb + 3), 1);
    TST_CHECK(t, (pb[2] == pa[1] && pb[3] == pa[0]) || (pb[2] == pa[0] && pb[3] == pa[1]));
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* Copy-on-write in put (a rewrite inside a page shared with the index)
   needs a page: it evicts when the free list is empty, and fails with
   nothing changed when nothing is evictable. */
static void test_prefix_put_copy_evicts(tst* t) {
    llmkv_desc d = p_desc(4, 3, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b, x;
    llmkv_token P[8], Q[8], X[4];
    uint32_t pa[64], pb[64], px[64], nc, i;
    llmkv_stats s0, s1;
    p_toks(P, 8, 31, 1);
    for (i = 0; i < 6; ++i) Q[i] = P[i];
    Q[6] = 99;
    Q[7] = 98;
    p_toks(X, 4, 71, 1);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &x));
    OK(t, p_feed(kv, x, X, 4));
    TST_EQ(t, p_pages(kv, x, px), 1);
    OK(t, llmkv_seq_publish(kv, x, 0)); /* X: cached, held by x for now */
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 8));
    OK(t, llmkv_seq_publish(kv, a, 0));
    TST_EQ(t, p_pages(kv, a, pa), 2);
    OK(t, llmkv_seq_create_prefix(kv, 0, Q, 8, &b, &nc));
    TST_EQ(t, nc, 6);
    P_EXPECT(t, kv, 3, 0, 0, 0);
    TST_EQ(t, p_stats(kv).n_pages_free, 0);
    /* b rewrites positions 4, 5 (inside the shared page): no page for the copy */
    s0 = p_stats(kv);
    TST_EQ(t, p_write(kv, b, Q + 4, 2), LLMKV_ERR_OUT_OF_PAGES);
    TST_EQ(t, llmkv_reserve_tokens(kv, b, Q + 6, 1), LLMKV_ERR_OUT_OF_PAGES);
    s1 = p_stats(kv);
    TST_CHECK(t, p_stats_same(&s0, &s1));
    TST_EQ(t, p_pages(kv, b, pb), 2);
    TST_EQ(t, pb[1], pa[1]);
    TST_CHECK(t, p_holds(kv, b, Q, 6));
    CHK(t, kv);
    /* X becomes evictable: the copy evicts it */
    OK(t, llmkv_seq_free(kv, x));
    P_EXPECT(t, kv, 3, 1, 0, 0);
    OK(t, p_write(kv, b, Q + 4, 2));
    CHK(t, kv);
    s1 = p_stats(kv);
    TST_EQ(t, s1.n_evictions, 1);
    TST_EQ(t, s1.n_pages_cached, 2);
    TST_EQ(t, p_pages(kv, b, pb), 2);
    TST_EQ(t, pb[0], pa[0]);
    TST_EQ(t, pb[1], px[0]);
    TST_EQ(t, p_match(kv, 0, X, 4), 0);
    TST_CHECK(t, p_holds(kv, b, Q, 6));
    TST_CHECK(t, p_holds(kv, a, P, 8));
    llmkv_cache_destroy(kv);
}

/* Two sequences share one cached page as their partial tail: a
   reserve_many that writes both makes two copies (the index's reference
   means neither may keep the page), or fails with nothing changed when
   only one page is free; on a metadata-only cache a full copy queue fails
   the same way. */
static void test_prefix_shared_cached_tail(tst* t) {
    llmkv_desc d = p_desc(4, 3, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, x, y, two[2];
    llmkv_token P[8], Q1[8], Q2[8];
    const llmkv_token* tk[2];
    uint32_t pa[64], px[64], py[64], one[2] = {1, 1}, nc, i, n;
    llmkv_stats s0, s1;
    unsigned char* saved;
    size_t bytes;
    llmkv_copy_cmd cmds[4];
    p_toks(P, 8, 20, 1);
    for (i = 0; i < 6; ++i) Q1[i] = Q2[i] = P[i];
    Q1[6] = 900;
    Q1[7] = 901;
    Q2[6] = 910;
    Q2[7] = 911;
    tk[0] = Q1 + 6;
    tk[1] = Q2 + 6;
    for (i = 0; i < 2; ++i) {
        d.n_pages = i ? 4 : 3;
        TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
        p_clear_pool(kv);
        OK(t, llmkv_seq_create(kv, &a));
        OK(t, p_feed(kv, a, P, 8));
        TST_EQ(t, p_pages(kv, a, pa), 2);
        OK(t, llmkv_seq_free(kv, a));
        OK(t, llmkv_seq_create_prefix(kv, 0, Q1, 8, &x, &nc));
        TST_EQ(t, nc, 6);
        OK(t, llmkv_seq_create_prefix(kv, 0, Q2, 8, &y, &nc));
        TST_EQ(t, nc, 6);
        two[0] = x;
        two[1] = y;
        if (i == 0) { /* 1 free page, 0 evictable: 2 copies do not fit */
            s0 = p_stats(kv);
            TST_EQ(t, llmkv_reserve_many_tokens(kv, two, one, tk, 2), LLMKV_ERR_OUT_OF_PAGES);
            s1 = p_stats(kv);
            TST_CHECK(t, p_stats_same(&s0, &s1));
            TST_EQ(t, p_len(kv, x), 6);
            TST_EQ(t, p_len(kv, y), 6);
            CHK(t, kv);
            llmkv_cache_destroy(kv);
            continue;
        }
        saved = p_page_copy(kv, pa[1], &bytes);
        OK(t, llmkv_reserve_many_tokens(kv, two, one, tk, 2));
        CHK(t, kv);
        TST_EQ(t, p_pages(kv, x, px), 2);
        TST_EQ(t, p_pages(kv, y, py), 2);
        TST_CHECK(t, px[1] != pa[1] && py[1] != pa[1] && px[1] != py[1]);
        P_EXPECT(t, kv, 2, 1, 0, 0); /* page 1 cached, held by nobody */
        OK(t, p_write(kv, x, Q1 + 6, 1));
        OK(t, p_write(kv, y, Q2 + 6, 1));
        TST_CHECK(t, p_holds(kv, x, Q1, 7));
        TST_CHECK(t, p_holds(kv, y, Q2, 7));
        TST_CHECK(t, p_page_same(kv, pa[1], saved, bytes));
        TST_EQ(t, p_match(kv, 0, P, 8), 8);
        llmkv_cache_destroy(kv);
    }

    /* metadata-only, a queue of 1 */
    d = p_desc(4, 8, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    d.storage = LLMKV_STORAGE_METADATA_ONLY;
    d.max_pending_copies = 1;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, llmkv_reserve_tokens(kv, a, P, 8));
    OK(t, llmkv_seq_mark_written(kv, a, 8));
    OK(t, llmkv_seq_free(kv, a));
    P_EXPECT(t, kv, 2, 2, 0, 0);
    OK(t, llmkv_seq_create_prefix(kv, 0, Q1, 8, &x, &nc));
    OK(t, llmkv_seq_create_prefix(kv, 0, Q2, 8, &y, &nc));
    OK(t, llmkv_reserve_tokens(kv, x, Q1 + 6, 1)); /* queues the copy */
    OK(t, llmkv_seq_mark_written(kv, x, 7));
    s0 = p_stats(kv);
    TST_EQ(t, s0.n_pending_copies, 1);
    TST_EQ(t, llmkv_reserve_tokens(kv, y, Q2 + 6, 2), LLMKV_ERR_COPY_QUEUE_FULL);
    two[0] = x;
    two[1] = y;
    TST_EQ(t, llmkv_reserve_many_tokens(kv, two, one, tk, 2), LLMKV_ERR_COPY_QUEUE_FULL);
    s1 = p_stats(kv);
    TST_CHECK(t, p_stats_same(&s0, &s1));
    CHK(t, kv);
    OK(t, llmkv_copy_cmds_take(kv, cmds, 4, &n));
    TST_EQ(t, n, 1);
    OK(t, llmkv_reserve_tokens(kv, y, Q2 + 6, 2));
    TST_EQ(t, p_len(kv, y), 8);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */
/* Pins                                                                     */
/* ------------------------------------------------------------------------ */

/* max_pins 2. Pins nest per page; a pin keeps pages out of the LRU and
   through any pressure; unpin walks from the deepest node up, appending
   each page whose last pin went (so after an older page Z); stale and zero
   handles are refused; a pin that matches nothing is valid and counted. */
static void test_prefix_pins(tst* t) {
    llmkv_desc d = p_desc(4, 8, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, h, x;
    llmkv_token P[13], Y[4], Z[4], W[4];
    llmkv_pin pin1, pin2, pin3, zero, pe, pn, pa, pb;
    uint32_t n, np, nc, round;
    llmkv_stats s0, s1;
    d.max_pins = 2;
    p_toks(P, 13, 900, 1);
    p_toks(Y, 4, 800, 1);
    p_toks(Z, 4, 700, 1);
    p_toks(W, 4, 600, 1);
    zero.id = 0;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, Y, 4));
    OK(t, llmkv_seq_free(kv, a));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 12));
    OK(t, llmkv_seq_free(kv, a)); /* LRU: Y P2 P1 P0 */
    P_EXPECT(t, kv, 4, 4, 0, 0);

    OK(t, llmkv_prefix_pin(kv, 0, P, 12, &pin1, &np));
    TST_CHECK(t, pin1.id != 0);
    TST_EQ(t, np, 12);
    P_EXPECT(t, kv, 4, 1, 3, 1);
    OK(t, llmkv_prefix_pin(kv, 0, P, 6, &pin2, &np));
    TST_CHECK(t, pin2.id != 0 && pin2.id != pin1.id);
    TST_EQ(t, np, 4); /* P1 only half matched: not pinned */
    P_EXPECT(t, kv, 4, 1, 3, 2);
    s0 = p_stats(kv);
    pin3.id = 42;
    np = 42;
    TST_EQ(t, llmkv_prefix_pin(kv, 0, P, 12, &pin3, &np), LLMKV_ERR_TOO_MANY_PINS);
    TST_EQ(t, pin3.id, 0);
    TST_EQ(t, np, 0);
    s1 = p_stats(kv);
    TST_CHECK(t, p_stats_same(&s0, &s1));
    CHK(t, kv);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    TST_EQ(t, n, 1); /* Y only */
    P_EXPECT(t, kv, 3, 0, 3, 2);
    TST_EQ(t, p_match(kv, 0, P, 12), 12);

    /* heavy pressure: the 5 other pages taken and given back, again and again */
    OK(t, llmkv_seq_create(kv, &h));
    for (round = 0; round < 20; ++round) {
        OK(t, llmkv_reserve(kv, h, 20));
        TST_EQ(t, llmkv_reserve(kv, h, 1), LLMKV_ERR_OUT_OF_PAGES);
        OK(t, p_write(kv, h, P, 12));
        OK(t, llmkv_truncate(kv, h, 0));
    }
    OK(t, llmkv_seq_free(kv, h));
    CHK(t, kv);
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 13, &x, &nc));
    TST_EQ(t, nc, 12);
    TST_CHECK(t, p_holds(kv, x, P, 12));
    OK(t, llmkv_seq_free(kv, x));
    P_EXPECT(t, kv, 3, 0, 3, 2);

    /* unpin order: Z is older than what the unpin releases */
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, Z, 4));
    OK(t, llmkv_seq_free(kv, a));
    OK(t, llmkv_prefix_unpin(kv, pin1)); /* P2, P1 released; P0 still under pin2 */
    P_EXPECT(t, kv, 4, 3, 1, 1);
    s0 = p_stats(kv);
    TST_EQ(t, llmkv_prefix_unpin(kv, pin1), LLMKV_ERR_STALE_HANDLE);
    TST_EQ(t, llmkv_prefix_unpin(kv, zero), LLMKV_ERR_STALE_HANDLE);
    s1 = p_stats(kv);
    TST_CHECK(t, p_stats_same(&s0, &s1));
    OK(t, llmkv_prefix_evict(kv, 1, &n));
    TST_EQ(t, p_match(kv, 0, Z, 4), 0);
    TST_EQ(t, p_match(kv, 0, P, 12), 12);
    OK(t, llmkv_prefix_evict(kv, 1, &n));
    TST_EQ(t, p_match(kv, 0, P, 12), 8);
    CHK(t, kv);

    /* nesting on P0 */
    OK(t, llmkv_prefix_pin(kv, 0, P, 4, &pin3, &np));
    TST_EQ(t, np, 4);
    P_EXPECT(t, kv, 2, 1, 1, 2);
    OK(t, llmkv_prefix_unpin(kv, pin2));
    P_EXPECT(t, kv, 2, 1, 1, 1); /* pin3 still holds P0 */
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    TST_EQ(t, n, 1);
    TST_EQ(t, p_match(kv, 0, P, 12), 4);
    OK(t, llmkv_prefix_unpin(kv, pin3));
    P_EXPECT(t, kv, 1, 1, 0, 0);
    CHK(t, kv);

    /* empty pins are valid and count */
    OK(t, llmkv_prefix_pin(kv, 0, W, 4, &pe, &np));
    TST_CHECK(t, pe.id != 0);
    TST_EQ(t, np, 0);
    OK(t, llmkv_prefix_pin(kv, 7, P, 4, &pn, &np)); /* another namespace */
    TST_EQ(t, np, 0);
    P_EXPECT(t, kv, 1, 1, 0, 2);
    TST_EQ(t, llmkv_prefix_pin(kv, 0, P, 4, &pin3, &np), LLMKV_ERR_TOO_MANY_PINS);
    OK(t, llmkv_prefix_unpin(kv, pe));
    OK(t, llmkv_prefix_unpin(kv, pn));
    P_EXPECT(t, kv, 1, 1, 0, 0);

    /* a reused pin slot does not revive an old handle */
    OK(t, llmkv_prefix_pin(kv, 0, P, 4, &pa, &np));
    OK(t, llmkv_prefix_unpin(kv, pa));
    OK(t, llmkv_prefix_pin(kv, 0, P, 4, &pb, &np));
    OK(t, llmkv_prefix_pin(kv, 0, P, 4, &pin3, &np));
    TST_CHECK(t, pb.id != pa.id && pin3.id != pa.id);
    TST_EQ(t, llmkv_prefix_unpin(kv, pa), LLMKV_ERR_STALE_HANDLE);
    P_EXPECT(t, kv, 1, 0, 1, 2);
    OK(t, llmkv_prefix_unpin(kv, pb));
    OK(t, llmkv_prefix_unpin(kv, pin3));
    CHK(t, kv);

    /* pinned while a sequence holds it: not evictable after the free */
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 5, &x, &nc));
    TST_EQ(t, nc, 4);
    P_EXPECT(t, kv, 1, 0, 0, 0);
    OK(t, llmkv_prefix_pin(kv, 0, P, 8, &pa, &np));
    TST_EQ(t, np, 4);
    OK(t, llmkv_seq_free(kv, x));
    P_EXPECT(t, kv, 1, 0, 1, 1);
    OK(t, llmkv_prefix_unpin(kv, pa));
    P_EXPECT(t, kv, 1, 1, 0, 0);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */
/* Namespaces                                                               */
/* ------------------------------------------------------------------------ */

/* The same tokens in namespaces A (0x100000001), B (1), 0 and D: never
   matched, deduped or pinned across; each namespace's cache works alone. */
static void test_prefix_namespaces(tst* t) {
    const uint64_t nsA = 0x100000001ull, nsB = 1, nsC = 0xFFFFFFFFFFFFFFFFull, nsD = 0x8000000000000000ull;
    llmkv_desc d = p_desc(4, 32, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b, c, e, x;
    llmkv_token P[12];
    llmkv_pin pin;
    uint32_t pa[64], pb[64], pc[64], pe[64], px[64], nc, np, i, j;
    llmkv_stats st;
    p_toks(P, 12, 42, 3);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create_prefix(kv, nsA, P, 10, &a, &nc));
    TST_EQ(t, nc, 0);
    OK(t, p_feed(kv, a, P, 10));
    OK(t, llmkv_seq_publish(kv, a, 1));
    TST_EQ(t, p_pages(kv, a, pa), 3);
    OK(t, llmkv_seq_free(kv, a));
    P_EXPECT(t, kv, 3, 3, 0, 0);
    TST_EQ(t, p_match(kv, nsA, P, 10), 10);
    TST_EQ(t, p_match(kv, nsB, P, 10), 0);
    TST_EQ(t, p_match(kv, 0, P, 10), 0);
    TST_EQ(t, p_match(kv, nsC, P, 10), 0);
    OK(t, llmkv_prefix_pin(kv, nsB, P, 10, &pin, &np));
    TST_EQ(t, np, 0);
    P_EXPECT(t, kv, 3, 3, 0, 1);
    OK(t, llmkv_prefix_unpin(kv, pin));
    CHK(t, kv);

    /* B computes the same prompt: nothing matched, nothing deduped */
    OK(t, llmkv_seq_create_prefix(kv, nsB, P, 10, &b, &nc));
    TST_EQ(t, nc, 0);
    TST_EQ(t, p_len(kv, b), 0);
    OK(t, p_feed(kv, b, P, 10));
    OK(t, llmkv_seq_publish(kv, b, 1));
    P_EXPECT(t, kv, 6, 3, 0, 0);
    TST_EQ(t, p_pages(kv, b, pb), 3);
    /* namespace 0 (llmkv_seq_create) too */
    OK(t, llmkv_seq_create(kv, &c));
    OK(t, p_feed(kv, c, P, 10));
    OK(t, llmkv_seq_publish(kv, c, 1));
    P_EXPECT(t, kv, 9, 3, 0, 0);
    TST_EQ(t, p_pages(kv, c, pc), 3);
    /* an empty sequence made in D publishes into D */
    OK(t, llmkv_seq_create_prefix(kv, nsD, P, 0, &e, &nc));
    OK(t, p_feed(kv, e, P, 8));
    OK(t, llmkv_seq_publish(kv, e, 0));
    P_EXPECT(t, kv, 11, 3, 0, 0);
    TST_EQ(t, p_pages(kv, e, pe), 2);
    for (i = 0; i < 3; ++i)
        for (j = 0; j < 3; ++j) {
            TST_CHECK(t, pb[i] != pa[j] && pc[i] != pa[j] && pc[i] != pb[j]);
            if (i < 2) TST_CHECK(t, pe[i] != pa[j] && pe[i] != pb[j] && pe[i] != pc[j]);
        }
    TST_EQ(t, p_match(kv, nsD, P, 10), 8);
    TST_EQ(t, p_match(kv, nsC, P, 10), 0);
    CHK(t, kv);

    /* each namespace finds its own pages */
    OK(t, llmkv_seq_create_prefix(kv, nsB, P, 11, &x, &nc));
    TST_EQ(t, nc, 10);
    TST_EQ(t, p_pages(kv, x, px), 3);
    for (i = 0; i < 3; ++i) TST_EQ(t, px[i], pb[i]);
    OK(t, llmkv_seq_free(kv, x));
    OK(t, llmkv_seq_create_prefix(kv, nsA, P, 11, &x, &nc));
    TST_EQ(t, nc, 10);
    TST_EQ(t, p_pages(kv, x, px), 3);
    for (i = 0; i < 3; ++i) TST_EQ(t, px[i], pa[i]);
    TST_CHECK(t, p_holds(kv, x, P, 10));
    OK(t, llmkv_seq_free(kv, x));
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 11, &x, &nc));
    TST_EQ(t, nc, 10);
    TST_EQ(t, p_pages(kv, x, px), 3);
    for (i = 0; i < 3; ++i) TST_EQ(t, px[i], pc[i]);
    OK(t, llmkv_seq_free(kv, x));
    OK(t, llmkv_seq_create_prefix(kv, nsD, P, 11, &x, &nc));
    TST_EQ(t, nc, 8);
    TST_EQ(t, p_pages(kv, x, px), 2);
    for (i = 0; i < 2; ++i) TST_EQ(t, px[i], pe[i]);
    OK(t, llmkv_seq_free(kv, x));
    OK(t, llmkv_seq_create_prefix(kv, nsC, P, 11, &x, &nc));
    TST_EQ(t, nc, 0);
    OK(t, llmkv_seq_free(kv, x));
    OK(t, llmkv_prefix_pin(kv, nsB, P, 10, &pin, &np));
    TST_EQ(t, np, 10);
    OK(t, llmkv_prefix_unpin(kv, pin));
    CHK(t, kv);

    /* evicting A's pages leaves B's */
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &np));
    TST_EQ(t, np, 3);
    TST_EQ(t, p_match(kv, nsA, P, 10), 0);
    TST_EQ(t, p_match(kv, nsB, P, 10), 10);
    TST_EQ(t, p_match(kv, 0, P, 10), 10);
    OK(t, llmkv_seq_free(kv, b));
    OK(t, llmkv_seq_free(kv, c));
    OK(t, llmkv_seq_free(kv, e));
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_cached, 8);
    TST_EQ(t, st.n_pages_evictable, 8);
    TST_EQ(t, st.n_pages_used, 0);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */
/* Statistics                                                               */
/* ------------------------------------------------------------------------ */

#define P_STATS(t, kv, used, fr, cached, evictable, pinned, pins, evictions, matched, missed)                  \
    do {                                                                                                      \
        llmkv_stats pss_ = p_stats(kv);                                                                       \
        TST_EQ(t, pss_.n_pages_used, (used));                                                                 \
        TST_EQ(t, pss_.n_pages_free, (fr));                                                                   \
        TST_EQ(t, pss_.n_pages_cached, (cached));                                                             \
        TST_EQ(t, pss_.n_pages_evictable, (evictable));                                                       \
        TST_EQ(t, pss_.n_pages_pinned, (pinned));                                                             \
        TST_EQ(t, pss_.n_pins, (pins));                                                                       \
        TST_EQ(t, pss_.n_evictions, (evictions));                                                             \
        TST_EQ(t, pss_.prompt_tokens_matched, (matched));                                                     \
        TST_EQ(t, pss_.prompt_tokens_missed, (missed));                                                       \
        TST_CHECK(t, pss_.hit_rate ==                                                                         \
                         ((matched) + (missed) ? (double)(matched) / (double)((matched) + (missed)) : 0.0));  \
        TST_CHECK(t, p_check_ok(kv));                                                                         \
    } while (0)

/* Every prefix counter, and used / free, through a scripted scenario
   (8 pages of 4). */
static void test_prefix_stats_exact(tst* t) {
    llmkv_desc d = p_desc(4, 8, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, b, c, e;
    llmkv_token P[10];
    llmkv_pin pin;
    uint32_t nc, np, n;
    llmkv_stats s0, s1;
    p_toks(P, 10, 17, 4);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    P_STATS(t, kv, 0, 8, 0, 0, 0, 0, 0, 0, 0);
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 10, &a, &nc));
    TST_EQ(t, nc, 0);
    P_STATS(t, kv, 0, 8, 0, 0, 0, 0, 0, 0, 10);
    OK(t, p_feed(kv, a, P, 10));
    P_STATS(t, kv, 3, 5, 0, 0, 0, 0, 0, 0, 10);
    OK(t, llmkv_seq_publish(kv, a, 0));
    P_STATS(t, kv, 3, 5, 2, 0, 0, 0, 0, 0, 10);
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 10, &b, &nc));
    TST_EQ(t, nc, 8);
    P_STATS(t, kv, 3, 5, 2, 0, 0, 0, 0, 8, 12);
    s0 = p_stats(kv);
    TST_EQ(t, s0.n_pages_shared, 2);
    TST_EQ(t, s0.n_seqs, 2);
    TST_EQ(t, s0.n_tokens, 18);
    TST_CHECK(t, s0.hit_rate == 0.4);
    OK(t, llmkv_seq_free(kv, a));
    P_STATS(t, kv, 2, 6, 2, 0, 0, 0, 0, 8, 12);
    OK(t, llmkv_seq_free(kv, b));
    P_STATS(t, kv, 0, 6, 2, 2, 0, 0, 0, 8, 12);
    OK(t, llmkv_prefix_pin(kv, 0, P, 8, &pin, &np));
    TST_EQ(t, np, 8);
    P_STATS(t, kv, 0, 6, 2, 0, 2, 1, 0, 8, 12);
    OK(t, llmkv_seq_create(kv, &c));
    s0 = p_stats(kv);
    TST_EQ(t, llmkv_reserve(kv, c, 28), LLMKV_ERR_OUT_OF_PAGES); /* 7 > 6 free + 0 evictable */
    s1 = p_stats(kv);
    TST_CHECK(t, p_stats_same(&s0, &s1));
    OK(t, llmkv_prefix_unpin(kv, pin)); /* LRU: P1 P0 */
    P_STATS(t, kv, 0, 6, 2, 2, 0, 0, 0, 8, 12);
    OK(t, llmkv_reserve(kv, c, 28));
    P_STATS(t, kv, 7, 0, 1, 1, 0, 0, 1, 8, 12);
    TST_EQ(t, p_match(kv, 0, P, 10), 4);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    TST_EQ(t, n, 1);
    P_STATS(t, kv, 7, 1, 0, 0, 0, 0, 2, 8, 12);
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 10, &e, &nc));
    TST_EQ(t, nc, 0);
    P_STATS(t, kv, 7, 1, 0, 0, 0, 0, 2, 8, 22);
    OK(t, llmkv_seq_free(kv, e));
    OK(t, llmkv_seq_free(kv, c));
    P_STATS(t, kv, 0, 8, 0, 0, 0, 0, 2, 8, 22);
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */
/* Data through shared pages                                                */
/* ------------------------------------------------------------------------ */

/* Every layer's K and V of positions [0, n), gathered in `dt` (DEFAULT:
   as stored, a quantized part as F32), into one zeroed buffer of
   *bytes (4 bytes an element, whatever the type). */
static unsigned char* p_gather_all(const llmkv_cache* kv, llmkv_seq s, uint32_t n, llmkv_dtype dt, size_t* bytes) {
    llmkv_desc d;
    size_t part, off = 0;
    uint32_t layer;
    unsigned char* p;
    *bytes = 0;
    if (llmkv_cache_desc(kv, &d) != LLMKV_OK || n == 0) return NULL;
    part = (size_t)n * d.n_kv_heads * d.head_dim * 4;
    p = (unsigned char*)calloc(1, part * 2 * d.n_layers);
    if (!p) return NULL;
    for (layer = 0; layer < d.n_layers; ++layer) {
        if (llmkv_gather(kv, s, layer, 0, n, p + off, 0, p + off + part, 0, dt) != LLMKV_OK) {
            free(p);
            return NULL;
        }
        off += 2 * part;
    }
    *bytes = off;
    return p;
}

/* 1 when s1 in kv1 and s2 in kv2 gather the same bytes at [0, n), raw
   (DEFAULT) and as F32. */
static int p_same_data(const llmkv_cache* kv1, llmkv_seq s1, const llmkv_cache* kv2, llmkv_seq s2, uint32_t n) {
    int same = 1, k;
    for (k = 0; k < 2 && same; ++k) {
        llmkv_dtype dt = k ? LLMKV_DTYPE_F32 : LLMKV_DTYPE_DEFAULT;
        size_t b1 = 0, b2 = 0;
        unsigned char* g1 = p_gather_all(kv1, s1, n, dt, &b1);
        unsigned char* g2 = p_gather_all(kv2, s2, n, dt, &b2);
        same = g1 && g2 && b1 == b2 && memcmp(g1, g2, b1) == 0;
        if (!same) fprintf(stderr, "  gathered %s data differ\n", k ? "F32" : "raw");
        free(g1);
        free(g2);
    }
    return same;
}

/* llmkv_attend over all n rows of s1 (in kv1) and of s2 (in kv2), one
   sequence per batch, every layer: 1 when out and lse are bitwise equal. */
static int p_same_attention(tst* t, llmkv_cache* kv1, llmkv_seq s1, llmkv_cache* kv2, llmkv_seq s2, uint32_t n) {
    llmkv_desc d;
    llmkv_batch* b1 = NULL;
    llmkv_batch* b2 = NULL;
    llmkv_attn_desc a;
    uint32_t nq, layer, i;
    size_t rows;
    float *q = NULL, *o1 = NULL, *o2 = NULL, *l1 = NULL, *l2 = NULL;
    int same = 1;
    tst_rng rng = {0x5eedull};
    if (llmkv_cache_desc(kv1, &d) != LLMKV_OK) return 0;
    nq = d.n_kv_heads * 2;
    rows = (size_t)n * nq;
    q = (float*)malloc(rows * d.head_dim * sizeof(float));
    o1 = (float*)malloc(rows * d.head_dim * sizeof(float));
    o2 = (float*)malloc(rows * d.head_dim * sizeof(float));
    l1 = (float*)malloc(rows * sizeof(float));
    l2 = (float*)malloc(rows * sizeof(float));
    if (!q || !o1 || !o2 || !l1 || !l2) {
        same = 0;
        goto out;
    }
    for (i = 0; i < rows * d.head_dim; ++i) q[i] = tst_float(&rng);
    TST_EQ(t, llmkv_batch_create(kv1, 1, n, &b1), LLMKV_OK);
    TST_EQ(t, llmkv_batch_create(kv2, 1, n, &b2), LLMKV_OK);
    if (!b1 || !b2) {
        same = 0;
        goto out;
    }
    TST_EQ(t, llmkv_batch_build(b1, &s1, &n, 1), LLMKV_OK);
    TST_EQ(t, llmkv_batch_build(b2, &s2, &n, 1), LLMKV_OK);
    for (layer = 0; layer < d.n_layers; ++layer) {
        double worst = 0.0;
        memset(&a, 0, sizeof a);
        a.layer = layer;
        a.n_q_heads = nq;
        a.q = q;
        a.out = o1;
        a.lse = l1;
        TST_EQ(t, llmkv_attend(kv1, b1, &a, NULL), LLMKV_OK);
        a.out = o2;
        a.lse = l2;
        TST_EQ(t, llmkv_attend(kv2, b2, &a, NULL), LLMKV_OK);
        for (i = 0; i < rows * d.head_dim; ++i) {
            double diff = fabs((double)o1[i] - (double)o2[i]);
            if (diff > worst) worst = diff;
        }
        if (memcmp(o1, o2, rows * d.head_dim * sizeof(float)) != 0 || memcmp(l1, l2, rows * sizeof(float)) != 0) {
            fprintf(stderr, "  attention over the prefix sequence differs (layer %u, max |diff| %.3g)\n", layer,
                    worst);
            same = 0;
        }
    }
out:
    llmkv_batch_destroy(b1);
    llmkv_batch_destroy(b2);
    free(q);
    free(o1);
    free(o2);
    free(l1);
    free(l2);
    return same;
}

/* p_val's values survive these storage types exactly. */
static int p_exact(llmkv_dtype dt) {
    return dt == LLMKV_DTYPE_F32 || dt == LLMKV_DTYPE_F16 || dt == LLMKV_DTYPE_BF16;
}

/* For one pair of storage types: a computes P[0, 12) (3 full pages) in a
   cache with the index; b starts from Q = P[0, 10) + 4 new tokens and
   matches 10 (2 pages whole, 2 slots of page 2). A cache without the index
   holds r, written the plain way with the same values: P[0, 12) truncated
   to 10 (for Q4C keys that turns page 2's slots back into F16 copies of
   their dequantized values, which is what the partial match must give b),
   then the 4 new tokens. b and r must gather the same bytes and attend to
   the same bits, before and after b's writes; a's cached page 2 keeps its
   bytes. */
static void p_data_case(tst* t, llmkv_dtype kt, llmkv_dtype vt) {
    llmkv_desc d = p_desc(4, 16, kt, vt), dr;
    llmkv_cache *kv = NULL, *ref = NULL;
    llmkv_seq a, b, r;
    llmkv_token P[12], Q[14];
    uint32_t pa[64], pb[64], nc, i;
    unsigned char* saved;
    size_t bytes;
    p_toks(P, 12, 1234, 7);
    for (i = 0; i < 10; ++i) Q[i] = P[i];
    p_toks(Q + 10, 4, 4321, 1);
    dr = d;
    dr.prefix_index = 0;
    if (llmkv_cache_create(&d, &kv) != LLMKV_OK || llmkv_cache_create(&dr, &ref) != LLMKV_OK) {
        fprintf(stderr, "  %s/%s: cache creation failed\n", llmkv_dtype_name(kt), llmkv_dtype_name(vt));
        TST_CHECK(t, 0);
        llmkv_cache_destroy(kv);
        llmkv_cache_destroy(ref);
        return;
    }
    p_clear_pool(kv);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 12));
    TST_EQ(t, p_pages(kv, a, pa), 3);
    OK(t, llmkv_seq_create(ref, &r));
    OK(t, llmkv_reserve(ref, r, 12));
    OK(t, p_write(ref, r, P, 12));
    TST_CHECK(t, p_same_data(kv, a, ref, r, 12));
    OK(t, llmkv_seq_free(kv, a));
    P_EXPECT(t, kv, 3, 3, 0, 0);
    CHK(t, kv);

    OK(t, llmkv_seq_create_prefix(kv, 0, Q, 14, &b, &nc));
    TST_EQ(t, nc, 10);
    TST_EQ(t, p_pages(kv, b, pb), 3);
    for (i = 0; i < 3; ++i) TST_EQ(t, pb[i], pa[i]);
    CHK(t, kv);
    if (kt == LLMKV_DTYPE_Q4C) {
        /* b's positions 8, 9 are F16 copies of page 2's dequantized keys */
        size_t bf = 0, br = 0;
        unsigned char* full = p_gather_all(ref, r, 12, LLMKV_DTYPE_F32, &br);
        unsigned char* got = p_gather_all(kv, b, 10, LLMKV_DTYPE_F32, &bf);
        uint32_t ne = d.n_kv_heads * d.head_dim, layer, bad = 0, differs = 0;
        TST_REQUIRE(t, full && got);
        for (layer = 0; layer < d.n_layers; ++layer)
            for (i = 8 * ne; i < 10 * ne; ++i) {
                float deq, want, have;
                memcpy(&deq, full + ((size_t)layer * 2 * 12 * ne + i) * 4, 4);
                memcpy(&have, got + ((size_t)layer * 2 * 10 * ne + i) * 4, 4);
                want = llmkv_f16_to_f32(llmkv_f32_to_f16(deq));
                bad += memcmp(&want, &have, 4) != 0;
                differs += want != deq;
            }
        TST_EQ(t, bad, 0);
        TST_CHECK(t, differs > 0); /* the values tell the two apart */
        free(full);
        free(got);
    }
    OK(t, llmkv_truncate(ref, r, 10));
    TST_CHECK(t, p_same_data(kv, b, ref, r, 10));
    TST_CHECK(t, p_same_attention(t, kv, b, ref, r, 10));
    if (p_exact(kt) && p_exact(vt)) TST_CHECK(t, p_holds(kv, b, Q, 10));

    /* b writes on; the cached page 2 keeps its bytes */
    saved = p_page_copy(kv, pa[2], &bytes);
    OK(t, p_feed(kv, b, Q + 10, 4));
    OK(t, llmkv_reserve(ref, r, 4));
    OK(t, p_write(ref, r, Q + 10, 4));
    CHK(t, kv);
    TST_EQ(t, p_pages(kv, b, pb), 4);
    TST_CHECK(t, pb[2] != pa[2]);
    TST_CHECK(t, p_page_same(kv, pa[2], saved, bytes));
    TST_CHECK(t, p_same_data(kv, b, ref, r, 14));
    TST_CHECK(t, p_same_attention(t, kv, b, ref, r, 14));
    if (p_exact(kt) && p_exact(vt)) TST_CHECK(t, p_holds(kv, b, Q, 14));
    /* and a sequence matching all of P still reads a's data */
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 12, &a, &nc));
    TST_EQ(t, nc, 11);
    OK(t, llmkv_seq_free(ref, r));
    OK(t, llmkv_seq_create(ref, &r));
    OK(t, llmkv_reserve(ref, r, 12));
    OK(t, p_write(ref, r, P, 12));
    OK(t, llmkv_truncate(ref, r, 11));
    TST_CHECK(t, p_same_data(kv, a, ref, r, 11));
    TST_CHECK(t, p_same_attention(t, kv, a, ref, r, 11));
    OK(t, llmkv_seq_free(kv, a));
    /* a match ending on a page boundary: the new page is the sequence's own */
    OK(t, llmkv_seq_create_prefix(kv, 0, P, 9, &a, &nc));
    TST_EQ(t, nc, 8);
    OK(t, p_feed(kv, a, P + 8, 4));
    OK(t, llmkv_seq_free(ref, r));
    OK(t, llmkv_seq_create(ref, &r));
    OK(t, llmkv_reserve(ref, r, 12));
    OK(t, p_write(ref, r, P, 12));
    TST_CHECK(t, p_same_data(kv, a, ref, r, 12));
    TST_CHECK(t, p_same_attention(t, kv, a, ref, r, 12));
    OK(t, llmkv_seq_free(kv, a));
    OK(t, llmkv_seq_free(kv, b));
    CHK(t, kv);
    llmkv_cache_destroy(kv);
    llmkv_cache_destroy(ref);
}

static void test_prefix_gather_and_attend_f16(tst* t) {
    p_data_case(t, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    p_data_case(t, LLMKV_DTYPE_F32, LLMKV_DTYPE_BF16);
}

static void test_prefix_gather_and_attend_q8(tst* t) {
    p_data_case(t, LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q8);
    p_data_case(t, LLMKV_DTYPE_FP8, LLMKV_DTYPE_Q4);
}

/* Q4C keys: the partial match restages page 2's slots (and a partial page
   is never published: its keys live in the sequence's staging). */
static void test_prefix_gather_and_attend_q4c(tst* t) {
    llmkv_desc d = p_desc(4, 8, LLMKV_DTYPE_Q4C, LLMKV_DTYPE_F16);
    llmkv_cache* kv = NULL;
    llmkv_seq a;
    llmkv_token P[6];
    p_data_case(t, LLMKV_DTYPE_Q4C, LLMKV_DTYPE_F16);
    p_data_case(t, LLMKV_DTYPE_Q4C, LLMKV_DTYPE_Q8);
    p_toks(P, 6, 3, 3);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 6));
    OK(t, llmkv_seq_publish(kv, a, 1));
    P_EXPECT(t, kv, 1, 0, 0, 0);
    TST_EQ(t, p_match(kv, 0, P, 6), 4);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */
/* Failing calls change nothing                                             */
/* ------------------------------------------------------------------------ */

#define P_SNAP_SEQS 4
#define P_SNAP_PROBES 5

typedef struct p_snap {
    llmkv_stats st;
    uint32_t len[P_SNAP_SEQS], np[P_SNAP_SEQS], pages[P_SNAP_SEQS][64];
    llmkv_token toks[P_SNAP_SEQS][64];
    uint32_t match[P_SNAP_PROBES];
} p_snap;

typedef struct p_probe {
    const llmkv_token* toks;
    uint32_t n;
} p_probe;

static void p_snap_take(llmkv_cache* kv, const llmkv_seq* s, const p_probe* pr, p_snap* out) {
    uint32_t i;
    memset(out, 0, sizeof *out);
    out->st = p_stats(kv);
    for (i = 0; i < P_SNAP_SEQS; ++i) {
        out->len[i] = p_len(kv, s[i]);
        out->np[i] = p_pages(kv, s[i], out->pages[i]);
        if (out->len[i] <= 64) llmkv_seq_tokens(kv, s[i], 0, out->len[i], out->toks[i]);
    }
    for (i = 0; i < P_SNAP_PROBES; ++i) out->match[i] = p_match(kv, 0, pr[i].toks, pr[i].n);
}

static void p_snap_check(tst* t, llmkv_cache* kv, const llmkv_seq* s, const p_probe* pr, const p_snap* before,
                         const char* what) {
    p_snap now;
    int same;
    p_snap_take(kv, s, pr, &now);
    same = p_stats_same(&before->st, &now.st) && memcmp(before->len, now.len, sizeof now.len) == 0 &&
           memcmp(before->np, now.np, sizeof now.np) == 0 && memcmp(before->pages, now.pages, sizeof now.pages) == 0 &&
           memcmp(before->toks, now.toks, sizeof now.toks) == 0 &&
           memcmp(before->match, now.match, sizeof now.match) == 0;
    if (!same) {
        fprintf(stderr, "  the cache changed across a failed %s\n", what);
        p_stats_print("before", &before->st);
        p_stats_print("after ", &now.st);
    }
    TST_CHECK(t, same);
    if (!p_check_ok(kv)) {
        fprintf(stderr, "  ... after a failed %s\n", what);
        TST_CHECK(t, 0);
    }
}

/* A cache with held, evictable and pinned cached pages, a sequence sharing
   a partial page, written but unpublished pages and every sequence and pin
   slot in use (free 1 page + 2 evictable). Each failing call answers its
   code and leaves stats, tables, token ids, matches and the LRU order
   (checked at the end by evicting) exactly as they were. */
static void test_prefix_failures_change_nothing(tst* t) {
    llmkv_desc d = p_desc(4, 10, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq s[P_SNAP_SEQS], tmp, x, two[2];
    llmkv_token P[41], Q[9], R[4], T[24], X[8];
    static const llmkv_token neg[2] = {1, -2};
    const llmkv_token* tk[2];
    uint32_t nc, np, n2[2], n, i;
    llmkv_pin pin_old, pin, p2;
    llmkv_result r;
    llmkv_token got[8];
    p_probe pr[P_SNAP_PROBES];
    p_snap before;
    d.max_seqs = 4;
    d.max_pins = 1;
    d.max_seq_len = 40;
    p_toks(P, 41, 10, 1);
    p_toks(Q, 9, 100, 1);
    p_toks(R, 4, 200, 1);
    p_toks(T, 24, 300, 1);
    for (i = 0; i < 6; ++i) X[i] = P[i];
    X[6] = 55;
    X[7] = 56;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &s[0]));
    OK(t, p_feed(kv, s[0], P, 12));
    OK(t, llmkv_seq_publish(kv, s[0], 0));
    OK(t, llmkv_seq_create(kv, &tmp));
    OK(t, p_feed(kv, tmp, Q, 8));
    OK(t, llmkv_seq_free(kv, tmp)); /* LRU: Q1 Q0 */
    OK(t, llmkv_seq_create(kv, &tmp));
    OK(t, p_feed(kv, tmp, R, 4));
    OK(t, llmkv_seq_free(kv, tmp)); /* tmp stays a stale handle */
    OK(t, llmkv_prefix_pin(kv, 0, P, 4, &pin_old, &np));
    OK(t, llmkv_prefix_unpin(kv, pin_old)); /* a stale pin */
    OK(t, llmkv_prefix_pin(kv, 0, R, 4, &pin, &np));
    TST_EQ(t, np, 4);
    OK(t, llmkv_seq_create_prefix(kv, 0, X, 8, &s[1], &nc));
    TST_EQ(t, nc, 6);
    OK(t, llmkv_seq_create(kv, &s[2]));
    OK(t, p_feed(kv, s[2], T, 8));
    OK(t, llmkv_seq_create(kv, &s[3]));
    OK(t, llmkv_reserve(kv, s[3], 4));
    CHK(t, kv);
    {
        llmkv_stats st = p_stats(kv);
        TST_EQ(t, st.n_pages_free, 1);
        TST_EQ(t, st.n_pages_used, 6);
        TST_EQ(t, st.n_pages_cached, 6);
        TST_EQ(t, st.n_pages_evictable, 2);
        TST_EQ(t, st.n_pages_pinned, 1);
        TST_EQ(t, st.n_pins, 1);
        TST_EQ(t, st.n_seqs, 4);
    }
    pr[0].toks = P;
    pr[0].n = 12;
    pr[1].toks = Q;
    pr[1].n = 8;
    pr[2].toks = R;
    pr[2].n = 4;
    pr[3].toks = T;
    pr[3].n = 8;
    pr[4].toks = X;
    pr[4].n = 8;
    p_snap_take(kv, s, pr, &before);
    TST_EQ(t, before.match[0], 12);
    TST_EQ(t, before.match[1], 8);
    TST_EQ(t, before.match[2], 4);
    TST_EQ(t, before.match[3], 0);
    TST_EQ(t, before.match[4], 6);

    TST_EQ(t, llmkv_reserve_tokens(kv, s[0], neg, 2), LLMKV_ERR_INVALID_ARGUMENT);
    p_snap_check(t, kv, s, pr, &before, "reserve_tokens with a negative id");
    TST_EQ(t, llmkv_reserve(kv, s[3], 13), LLMKV_ERR_OUT_OF_PAGES); /* 4 pages > 1 + 2 */
    p_snap_check(t, kv, s, pr, &before, "reserve past free + evictable");
    TST_EQ(t, llmkv_reserve_tokens(kv, s[2], T + 8, 16), LLMKV_ERR_OUT_OF_PAGES);
    p_snap_check(t, kv, s, pr, &before, "reserve_tokens of a written, unpublished sequence");
    two[0] = s[2];
    two[1] = s[3];
    n2[0] = 4;
    n2[1] = 12;
    tk[0] = T + 8;
    tk[1] = NULL;
    TST_EQ(t, llmkv_reserve_many_tokens(kv, two, n2, tk, 2), LLMKV_ERR_OUT_OF_PAGES);
    p_snap_check(t, kv, s, pr, &before, "reserve_many_tokens (1 + 3 pages)");
    tk[1] = neg;
    n2[1] = 2;
    TST_EQ(t, llmkv_reserve_many_tokens(kv, two, n2, tk, 2), LLMKV_ERR_INVALID_ARGUMENT);
    p_snap_check(t, kv, s, pr, &before, "reserve_many_tokens with a negative id");
    two[1] = s[2];
    tk[1] = NULL;
    TST_EQ(t, llmkv_reserve_many_tokens(kv, two, n2, tk, 2), LLMKV_ERR_INVALID_ARGUMENT);
    p_snap_check(t, kv, s, pr, &before, "reserve_many_tokens listing a sequence twice");
    TST_EQ(t, llmkv_reserve_tokens(kv, s[0], P + 12, 29), LLMKV_ERR_SEQUENCE_TOO_LONG);
    p_snap_check(t, kv, s, pr, &before, "reserve_tokens past max_seq_len");
    TST_EQ(t, llmkv_seq_create_prefix(kv, 0, Q, 9, &x, &nc), LLMKV_ERR_TOO_MANY_SEQUENCES);
    TST_EQ(t, x.id, 0);
    p_snap_check(t, kv, s, pr, &before, "create_prefix with every slot live");
    r = llmkv_seq_create_prefix(kv, 0, P, 41, &x, &nc);
    TST_CHECK(t, r == LLMKV_ERR_SEQUENCE_TOO_LONG || r == LLMKV_ERR_TOO_MANY_SEQUENCES);
    p_snap_check(t, kv, s, pr, &before, "create_prefix past max_seq_len");
    r = llmkv_seq_create_prefix(kv, 0, neg, 2, &x, &nc);
    TST_CHECK(t, r == LLMKV_ERR_INVALID_ARGUMENT || r == LLMKV_ERR_TOO_MANY_SEQUENCES);
    p_snap_check(t, kv, s, pr, &before, "create_prefix with a negative id");
    TST_EQ(t, llmkv_prefix_pin(kv, 0, Q, 8, &p2, &np), LLMKV_ERR_TOO_MANY_PINS);
    p_snap_check(t, kv, s, pr, &before, "pin with every pin slot live");
    TST_EQ(t, llmkv_prefix_unpin(kv, pin_old), LLMKV_ERR_STALE_HANDLE);
    p_snap_check(t, kv, s, pr, &before, "unpin of a released pin");
    TST_EQ(t, llmkv_truncate(kv, s[0], 13), LLMKV_ERR_OUT_OF_RANGE);
    p_snap_check(t, kv, s, pr, &before, "truncate past the end");
    TST_EQ(t, llmkv_seq_publish(kv, tmp, 1), LLMKV_ERR_STALE_HANDLE);
    TST_EQ(t, llmkv_seq_mark_written(kv, tmp, 4), LLMKV_ERR_STALE_HANDLE);
    TST_EQ(t, llmkv_reserve_tokens(kv, tmp, Q, 1), LLMKV_ERR_STALE_HANDLE);
    p_snap_check(t, kv, s, pr, &before, "publish / mark_written / reserve_tokens of a freed sequence");
    TST_EQ(t, llmkv_seq_tokens(kv, s[0], 10, 5, got), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_prefix_match(kv, 0, NULL, 3, &n), LLMKV_ERR_INVALID_ARGUMENT);
    p_snap_check(t, kv, s, pr, &before, "seq_tokens / prefix_match");

    /* the LRU order survived: Q1, then Q0; nothing else may go */
    OK(t, llmkv_prefix_evict(kv, 1, &n));
    TST_EQ(t, n, 1);
    TST_EQ(t, p_match(kv, 0, Q, 8), 4);
    OK(t, llmkv_prefix_evict(kv, 1, &n));
    TST_EQ(t, p_match(kv, 0, Q, 8), 0);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    TST_EQ(t, n, 0);
    TST_EQ(t, p_match(kv, 0, P, 12), 12);
    TST_EQ(t, p_match(kv, 0, R, 4), 4);
    /* s[2]'s pages were never published by the failed reserves */
    TST_EQ(t, p_match(kv, 0, T, 8), 0);
    OK(t, llmkv_reserve_tokens(kv, s[2], T + 8, 4)); /* now it succeeds, and publishes */
    TST_EQ(t, p_match(kv, 0, T, 8), 8);
    CHK(t, kv);
    OK(t, llmkv_prefix_unpin(kv, pin));
    for (i = 0; i < P_SNAP_SEQS; ++i) OK(t, llmkv_seq_free(kv, s[i]));
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}


/* ------------------------------------------------------------------------ */
/* Forks                                                                    */
/* ------------------------------------------------------------------------ */

/* Forks share unpublished pages; publishing and dedupe must keep every
   sequence's table a path of the tree (a page is never cached under a
   parent its holders do not hold, and no page is evicted while a page
   below it is still cached). Asserted here: data, the checker, match
   lengths, and the final counts once everything is freed and evicted,
   which do not depend on when a shared page gets swapped. */
static void test_prefix_fork_interplay(tst* t) {
    const uint64_t nsX = 0x77;
    llmkv_desc d = p_desc(4, 24, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq a, c, f, g, x, y;
    llmkv_token P[12], Q[8], X1[8], X2[8], A2[8];
    uint32_t n, nc, i;
    llmkv_stats st;
    p_toks(P, 12, 70, 1);
    for (i = 0; i < 4; ++i) Q[i] = P[i];
    p_toks(Q + 4, 4, 170, 1); /* page 0 as P, page 1 new */
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);

    /* c caches P's page 0; a computes Q and forks f before publishing */
    OK(t, llmkv_seq_create(kv, &c));
    OK(t, p_feed(kv, c, P, 4));
    OK(t, llmkv_seq_free(kv, c));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, Q, 8));
    OK(t, llmkv_fork(kv, a, &f));
    OK(t, llmkv_seq_publish(kv, a, 1));
    CHK(t, kv);
    TST_CHECK(t, p_holds(kv, a, Q, 8));
    TST_CHECK(t, p_holds(kv, f, Q, 8));
    OK(t, llmkv_seq_free(kv, a));
    CHK(t, kv);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n)); /* nothing f needs may go */
    CHK(t, kv);
    TST_CHECK(t, p_holds(kv, f, Q, 8));
    OK(t, p_feed(kv, f, P + 8, 2));
    OK(t, llmkv_seq_publish(kv, f, 1));
    CHK(t, kv);
    TST_EQ(t, p_match(kv, 0, Q, 8), 8);
    OK(t, llmkv_seq_free(kv, f));
    CHK(t, kv);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_cached, 0);
    TST_EQ(t, st.n_pages_free, 24);
    CHK(t, kv);

    /* the same with the cached page 0 and a second page cached too: a's
       pages equal c's, f's as well; after both are freed only c's remain */
    OK(t, llmkv_seq_create(kv, &c));
    OK(t, p_feed(kv, c, P, 8));
    OK(t, llmkv_seq_free(kv, c));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 8));
    OK(t, llmkv_fork(kv, a, &f));
    OK(t, llmkv_seq_publish(kv, a, 0));
    OK(t, llmkv_seq_publish(kv, f, 0));
    CHK(t, kv);
    OK(t, llmkv_seq_free(kv, f));
    CHK(t, kv);
    OK(t, llmkv_seq_free(kv, a));
    CHK(t, kv);
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_cached, 2);
    TST_EQ(t, st.n_pages_evictable, 2);
    TST_EQ(t, st.n_pages_free, 22);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    TST_EQ(t, n, 2);

    /* a partial page shared with a fork that holds more of it */
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 7));
    OK(t, llmkv_fork(kv, a, &f));
    OK(t, llmkv_truncate(kv, a, 5));
    OK(t, llmkv_seq_publish(kv, a, 1));
    CHK(t, kv);
    OK(t, llmkv_seq_publish(kv, f, 1));
    CHK(t, kv);
    OK(t, p_feed(kv, f, P + 7, 5)); /* f fills its page 1 and more */
    OK(t, llmkv_seq_publish(kv, f, 1));
    CHK(t, kv);
    TST_CHECK(t, p_holds(kv, f, P, 12));
    TST_CHECK(t, p_holds(kv, a, P, 5));
    TST_EQ(t, p_match(kv, 0, P, 12), 12);
    OK(t, p_feed(kv, a, Q + 5, 3)); /* a goes its own way */
    OK(t, llmkv_seq_publish(kv, a, 0));
    CHK(t, kv);
    for (i = 0; i < 5; ++i) A2[i] = P[i];
    for (i = 5; i < 8; ++i) A2[i] = Q[i];
    TST_CHECK(t, p_holds(kv, a, A2, 8));
    TST_EQ(t, p_match(kv, 0, A2, 8), 8);
    TST_EQ(t, p_match(kv, 0, P, 12), 12);
    OK(t, llmkv_seq_free(kv, f));
    OK(t, llmkv_seq_free(kv, a));
    CHK(t, kv);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_cached, 0);
    TST_EQ(t, st.n_pages_free, 24);
    CHK(t, kv);

    /* the fork holds the whole page the source publishes a part of: the
       fork's full pages must still be published as full nodes (children
       hang under full nodes only) and match */
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, p_feed(kv, a, P, 12));
    OK(t, llmkv_fork(kv, a, &f));
    OK(t, llmkv_truncate(kv, a, 5));
    OK(t, llmkv_seq_publish(kv, a, 1));
    CHK(t, kv);
    OK(t, llmkv_seq_publish(kv, f, 0));
    CHK(t, kv);
    TST_EQ(t, p_match(kv, 0, P, 12), 12);
    OK(t, llmkv_seq_free(kv, a));
    OK(t, llmkv_seq_free(kv, f));
    CHK(t, kv);
    TST_EQ(t, p_match(kv, 0, P, 12), 12);
    OK(t, llmkv_prefix_evict(kv, 0xFFFFFFFFu, &n));
    TST_EQ(t, p_stats(kv).n_pages_free, 24);
    CHK(t, kv);

    /* a fork of a prefix-created sequence stays in its namespace */
    OK(t, llmkv_seq_create_prefix(kv, nsX, P, 8, &a, &nc));
    TST_EQ(t, nc, 0);
    OK(t, p_feed(kv, a, P, 8));
    OK(t, llmkv_seq_free(kv, a));
    for (i = 0; i < 6; ++i) X1[i] = X2[i] = P[i];
    X1[6] = 501;
    X1[7] = 502;
    X2[6] = 601;
    X2[7] = 602;
    OK(t, llmkv_seq_create_prefix(kv, nsX, X1, 8, &x, &nc));
    TST_EQ(t, nc, 6);
    OK(t, llmkv_fork(kv, x, &y));
    OK(t, p_feed(kv, x, X1 + 6, 2));
    OK(t, p_feed(kv, y, X2 + 6, 2));
    OK(t, llmkv_seq_publish(kv, x, 0));
    OK(t, llmkv_seq_publish(kv, y, 0));
    CHK(t, kv);
    TST_CHECK(t, p_holds(kv, x, X1, 8));
    TST_CHECK(t, p_holds(kv, y, X2, 8));
    TST_EQ(t, p_match(kv, nsX, X1, 8), 8);
    TST_EQ(t, p_match(kv, nsX, X2, 8), 8);
    TST_EQ(t, p_match(kv, nsX, P, 8), 8);
    TST_EQ(t, p_match(kv, 0, X2, 8), 0);
    OK(t, llmkv_fork(kv, y, &g)); /* a fork of published pages */
    OK(t, p_feed(kv, g, P + 8, 4));
    OK(t, llmkv_seq_free(kv, g)); /* publishes X2 + P8.. in nsX */
    TST_EQ(t, p_match(kv, nsX, X2, 8), 8);
    OK(t, llmkv_seq_free(kv, x));
    OK(t, llmkv_seq_free(kv, y));
    st = p_stats(kv);
    TST_EQ(t, st.n_pages_cached, 5); /* P0, P1, X1's and X2's page 1, g's page 2 */
    TST_EQ(t, st.n_pages_evictable, 5);
    TST_EQ(t, st.n_pages_used, 0);
    CHK(t, kv);
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */
/* A model of the rules, against random workloads                           */
/* ------------------------------------------------------------------------ */

/* An independent implementation of the documented rules (references,
   nodes, watermarks, publishing with dedupe and partial pages, matching,
   the LRU list, the LIFO free list, pins, eviction, copy-on-write),
   driven by random operations without forks: after every step each live
   sequence's page table (exact page ids), length and token ids, every
   counter, the match length of random probes, and the data below the
   written watermark must agree, and llmkv_cache_check must pass. The one
   thing the model cannot know is the order of the free list at creation:
   a page taken from those it reads from the library's table and checks it
   was one of them. */

#define M_PS 4
#define M_PAGES 24
#define M_SEQS 6
#define M_PINS 4
#define M_MAXLEN 40
#define M_TPAGES (M_MAXLEN / M_PS)
#define M_DOCS 3
#define M_NONE 0xFFFFFFFFu

typedef struct m_page {
    uint32_t ref; /* sequence table entries (the index's reference is `node`) */
    int node;
    uint32_t parent;
    uint64_t ns;
    uint32_t ntok;
    uint32_t pins;
    llmkv_token tok[M_PS];
} m_page;

typedef struct m_seq {
    int live;
    llmkv_seq h;
    uint64_t ns;
    uint32_t len, n_pages, n_pub;
    uint32_t table[M_TPAGES];
    uint32_t w[2]; /* per layer, K and V together */
    llmkv_token src[M_MAXLEN]; /* the tokens it will reserve */
} m_seq;

typedef struct m_pin {
    int live;
    llmkv_pin h;
    uint32_t nodes[M_TPAGES + 1]; /* deepest first */
    uint32_t n;
} m_pin;

typedef struct mdl {
    tst* t;
    llmkv_cache* kv;
    tst_rng rng;
    m_page pg[M_PAGES];
    uint32_t stack[M_PAGES], n_stack; /* known free pages, top last */
    int unknown[M_PAGES];             /* free since creation: order not known */
    uint32_t n_unknown;
    uint32_t lru[M_PAGES], n_lru;     /* oldest first */
    m_seq s[M_SEQS];
    m_pin pins[M_PINS];
    llmkv_pin stale_pin;
    uint64_t evictions, matched, missed;
    llmkv_token docs[M_DOCS][M_MAXLEN];
    const uint32_t* bind; /* the library's table of the sequence being changed */
    int bad;
    uint32_t step;
    char what[160];
} mdl;

static const uint64_t m_spaces[3] = {0, 1, 0x100000000ull};

static void m_fail(mdl* m, const char* msg, long long a, long long b) {
    if (!m->bad)
        fprintf(stderr, "  FAIL model step %u (%s): %s (library %lld, model %lld)\n", m->step, m->what, msg, a, b);
    m->bad = 1;
    m->t->cur_failures++;
}

static int m_evictable(const mdl* m, uint32_t p) {
    return m->pg[p].node && m->pg[p].ref == 0 && m->pg[p].pins == 0;
}

static void m_lru_remove(mdl* m, uint32_t p) {
    uint32_t i;
    for (i = 0; i < m->n_lru && m->lru[i] != p; ++i) {}
    if (i == m->n_lru) return;
    memmove(m->lru + i, m->lru + i + 1, (m->n_lru - i - 1) * sizeof(uint32_t));
    m->n_lru--;
}

static void m_lru_push(mdl* m, uint32_t p) { m->lru[m->n_lru++] = p; }

static void m_hold(mdl* m, uint32_t p) {
    if (m_evictable(m, p)) m_lru_remove(m, p);
    m->pg[p].ref++;
}

static void m_release(mdl* m, uint32_t p) {
    m->pg[p].ref--;
    if (m->pg[p].ref == 0 && !m->pg[p].node) m->stack[m->n_stack++] = p;
    else if (m_evictable(m, p)) m_lru_push(m, p);
}

static void m_evict_one(mdl* m) {
    uint32_t p = m->lru[0], q;
    for (q = 0; q < M_PAGES; ++q)
        if (m->pg[q].node && m->pg[q].parent == p) m_fail(m, "model: evicting a page with a child", q, p);
    m_lru_remove(m, p);
    m->pg[p].node = 0;
    m->stack[m->n_stack++] = p;
    m->evictions++;
}

/* A page for table entry `idx` of the sequence being changed. */
static uint32_t m_take(mdl* m, uint32_t idx) {
    uint32_t p;
    if (m->n_stack == 0 && m->n_unknown) {
        p = m->bind ? m->bind[idx] : M_NONE;
        if (p >= M_PAGES || !m->unknown[p]) {
            m_fail(m, "a page taken that was not free", p, -1);
            return 0;
        }
        m->unknown[p] = 0;
        m->n_unknown--;
        m->pg[p].ref = 1;
        return p;
    }
    if (m->n_stack == 0) m_evict_one(m);
    p = m->stack[--m->n_stack];
    m->pg[p].ref = 1;
    return p;
}

static uint32_t m_avail(const mdl* m) { return m->n_stack + m->n_unknown + m->n_lru; }

static int m_known(const llmkv_token* t, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; ++i)
        if (t[i] < 0) return 0;
    return 1;
}

static uint32_t m_find_full(const mdl* m, uint32_t parent, uint64_t ns, const llmkv_token* t) {
    uint32_t p;
    for (p = 0; p < M_PAGES; ++p) {
        const m_page* g = &m->pg[p];
        if (g->node && g->ntok == M_PS && g->parent == parent && g->ns == ns &&
            memcmp(g->tok, t, sizeof g->tok) == 0)
            return p;
    }
    return M_NONE;
}

/* The brief's walk: returns the match; path[0, *d) the full nodes, *cand
   the partially matched node (M_NONE when lcp is 0). */
static uint32_t m_walk(const mdl* m, uint64_t ns, const llmkv_token* t, uint32_t limit, uint32_t* path, uint32_t* d,
                       uint32_t* cand, uint32_t* lcp) {
    uint32_t node = M_NONE, k = 0, p, best = M_NONE, bl = 0;
    while ((k + 1) * M_PS <= limit) {
        p = m_find_full(m, node, ns, t + k * M_PS);
        if (p == M_NONE) break;
        path[k++] = p;
        node = p;
    }
    if (k * M_PS < limit)
        for (p = 0; p < M_PAGES; ++p) {
            const m_page* g = &m->pg[p];
            uint32_t l = 0, lim = limit - k * M_PS;
            if (!g->node || g->parent != node || g->ns != ns) continue;
            while (l < g->ntok && l < lim && g->tok[l] == t[k * M_PS + l]) ++l;
            if (l > bl) { /* pages in increasing id: ties keep the lowest */
                bl = l;
                best = p;
            }
        }
    *d = k;
    *cand = bl ? best : M_NONE;
    *lcp = bl;
    return k * M_PS + bl;
}

static void m_make_node(mdl* m, uint32_t p, uint32_t parent, uint64_t ns, uint32_t ntok) {
    m->pg[p].node = 1;
    m->pg[p].parent = parent;
    m->pg[p].ns = ns;
    m->pg[p].ntok = ntok;
    m->pg[p].pins = 0;
}

static uint32_t m_wend(const m_seq* s) {
    uint32_t e = s->len;
    if (s->w[0] < e) e = s->w[0];
    if (s->w[1] < e) e = s->w[1];
    return e;
}

static void m_publish(mdl* m, m_seq* s, int partial) {
    uint32_t end = m_wend(s), k = s->n_pub;
    while ((k + 1) * M_PS <= end) {
        uint32_t p = s->table[k], parent = k ? s->table[k - 1] : M_NONE, n;
        if (!m_known(m->pg[p].tok, M_PS)) break;
        if (!m->pg[p].node) {
            n = m_find_full(m, parent, s->ns, m->pg[p].tok);
            if (n != M_NONE) {
                m_hold(m, n);
                s->table[k] = n;
                m_release(m, p);
            } else {
                m_make_node(m, p, parent, s->ns, M_PS);
            }
        }
        ++k;
    }
    s->n_pub = k;
    if (partial && k + 1 == s->n_pages && s->len % M_PS && end >= s->len) {
        uint32_t p = s->table[k], parent = k ? s->table[k - 1] : M_NONE, ntok = s->len - k * M_PS, q;
        int held = 0;
        if (m->pg[p].node || !m_known(m->pg[p].tok, ntok)) return;
        for (q = 0; q < M_PAGES; ++q) {
            const m_page* g = &m->pg[q];
            if (g->node && g->parent == parent && g->ns == s->ns && g->ntok >= ntok &&
                memcmp(g->tok, m->pg[p].tok, ntok * sizeof(llmkv_token)) == 0)
                held = 1;
        }
        if (!held) m_make_node(m, p, parent, s->ns, ntok);
    }
}

/* Copy-on-write of table[i] (`used` slots). */
static void m_cow(mdl* m, m_seq* s, uint32_t i, uint32_t used) {
    uint32_t old = s->table[i], fresh;
    if (s->n_pub > i) s->n_pub = i;
    fresh = m_take(m, i);
    memcpy(m->pg[fresh].tok, m->pg[old].tok, used * sizeof(llmkv_token));
    m_release(m, old);
    s->table[i] = fresh;
}

static int m_shared(const mdl* m, uint32_t p) { return m->pg[p].ref + (m->pg[p].node ? 1u : 0u) > 1; }

static llmkv_token m_tok_at(const mdl* m, const m_seq* s, uint32_t pos) {
    return m->pg[s->table[pos / M_PS]].tok[pos % M_PS];
}

/* The token whose values a position holds (unknown ids: a fixed one). */
static llmkv_token m_eff(llmkv_token tok) { return tok < 0 ? 1000003 : tok; }

static void m_compare(mdl* m) {
    llmkv_stats st = p_stats(m->kv);
    uint32_t i, j, used = 0, cached = 0, pinned = 0, npins = 0, tokens = 0, nseq = 0;
    char msg[256];
    for (i = 0; i < M_PAGES; ++i) {
        used += m->pg[i].ref > 0;
        cached += m->pg[i].node != 0;
        pinned += m->pg[i].node && m->pg[i].pins > 0;
    }
    for (i = 0; i < M_PINS; ++i) npins += m->pins[i].live;
    for (i = 0; i < M_SEQS; ++i) {
        m_seq* s = &m->s[i];
        uint32_t pt[64], np;
        llmkv_token got[M_MAXLEN];
        if (!s->live) continue;
        nseq++;
        tokens += s->len;
        if (p_len(m->kv, s->h) != s->len) m_fail(m, "length", p_len(m->kv, s->h), s->len);
        np = p_pages(m->kv, s->h, pt);
        if (np != s->n_pages) m_fail(m, "number of pages", np, s->n_pages);
        for (j = 0; j < np && j < s->n_pages; ++j)
            if (pt[j] != s->table[j]) m_fail(m, "page table entry", pt[j], s->table[j]);
        if (llmkv_seq_tokens(m->kv, s->h, 0, s->len, got) != LLMKV_OK) m_fail(m, "seq_tokens", 0, 0);
        else
            for (j = 0; j < s->len; ++j)
                if (got[j] != m_tok_at(m, s, j)) m_fail(m, "token id", got[j], m_tok_at(m, s, j));
    }
    if (st.n_pages_free != m->n_stack + m->n_unknown)
        m_fail(m, "n_pages_free", st.n_pages_free, m->n_stack + m->n_unknown);
    if (st.n_pages_used != used) m_fail(m, "n_pages_used", st.n_pages_used, used);
    if (st.n_pages_cached != cached) m_fail(m, "n_pages_cached", st.n_pages_cached, cached);
    if (st.n_pages_evictable != m->n_lru) m_fail(m, "n_pages_evictable", st.n_pages_evictable, m->n_lru);
    if (st.n_pages_pinned != pinned) m_fail(m, "n_pages_pinned", st.n_pages_pinned, pinned);
    if (st.n_pins != npins) m_fail(m, "n_pins", st.n_pins, npins);
    if (st.n_evictions != m->evictions) m_fail(m, "n_evictions", (long long)st.n_evictions, (long long)m->evictions);
    if (st.prompt_tokens_matched != m->matched)
        m_fail(m, "prompt_tokens_matched", (long long)st.prompt_tokens_matched, (long long)m->matched);
    if (st.prompt_tokens_missed != m->missed)
        m_fail(m, "prompt_tokens_missed", (long long)st.prompt_tokens_missed, (long long)m->missed);
    if (st.n_seqs != nseq) m_fail(m, "n_seqs", st.n_seqs, nseq);
    if (st.n_tokens != tokens) m_fail(m, "n_tokens", (long long)st.n_tokens, tokens);
    msg[0] = 0;
    if (llmkv_cache_check(m->kv, msg, sizeof msg) != LLMKV_OK) {
        fprintf(stderr, "  llmkv_cache_check: %s\n", msg);
        m_fail(m, "llmkv_cache_check", 0, 0);
    }
    /* random probes, in every namespace */
    for (i = 0; i < 3; ++i) {
        llmkv_token pr[M_MAXLEN];
        uint32_t n = tst_below(&m->rng, M_MAXLEN + 1), path[M_TPAGES + 1], d, cand, lcp, want;
        uint64_t ns = m_spaces[tst_below(&m->rng, 3)];
        memcpy(pr, m->docs[tst_below(&m->rng, M_DOCS)], sizeof pr);
        if (tst_below(&m->rng, 3) == 0) pr[tst_below(&m->rng, M_MAXLEN)] = (llmkv_token)tst_below(&m->rng, 4);
        want = m_walk(m, ns, pr, n, path, &d, &cand, &lcp);
        if (p_match(m->kv, ns, pr, n) != want) m_fail(m, "prefix_match", p_match(m->kv, ns, pr, n), want);
    }
    /* data below the watermark */
    for (i = 0; i < M_SEQS; ++i) {
        m_seq* s = &m->s[i];
        float k[M_MAXLEN * 16], v[M_MAXLEN * 16];
        uint32_t end = m_wend(s), layer, pos, e;
        if (!s->live || end == 0) continue;
        for (layer = 0; layer < 2; ++layer) {
            if (llmkv_gather(m->kv, s->h, layer, 0, end, k, 0, v, 0, LLMKV_DTYPE_F32) != LLMKV_OK) {
                m_fail(m, "gather", 0, 0);
                continue;
            }
            for (pos = 0; pos < end; ++pos)
                for (e = 0; e < 16; ++e)
                    if (k[pos * 16 + e] != p_val(m_eff(m_tok_at(m, s, pos)), pos, layer, 0, e) ||
                        v[pos * 16 + e] != p_val(m_eff(m_tok_at(m, s, pos)), pos, layer, 1, e)) {
                        m_fail(m, "data below the watermark", pos, layer);
                        pos = end;
                        break;
                    }
        }
    }
}

static m_seq* m_pick(mdl* m) {
    uint32_t i, n = 0, live[M_SEQS];
    for (i = 0; i < M_SEQS; ++i)
        if (m->s[i].live) live[n++] = i;
    return n ? &m->s[live[tst_below(&m->rng, n)]] : NULL;
}

static void m_new_src(mdl* m, m_seq* s) {
    memcpy(s->src, m->docs[tst_below(&m->rng, M_DOCS)], sizeof s->src);
    if (tst_below(&m->rng, 3) == 0) s->src[tst_below(&m->rng, M_MAXLEN)] = (llmkv_token)tst_below(&m->rng, 4);
}

static void m_op_create(mdl* m) {
    m_seq* s = NULL;
    uint32_t i, nc = 0, n, path[M_TPAGES + 1], d = 0, cand = M_NONE, lcp = 0, match = 0;
    llmkv_seq h;
    llmkv_result r;
    uint64_t ns = m_spaces[tst_below(&m->rng, 3)];
    int plain = tst_below(&m->rng, 4) == 0;
    llmkv_token src[M_MAXLEN];
    for (i = 0; i < M_SEQS; ++i)
        if (!m->s[i].live) {
            s = &m->s[i];
            break;
        }
    memcpy(src, m->docs[tst_below(&m->rng, M_DOCS)], sizeof src);
    if (tst_below(&m->rng, 3) == 0) src[tst_below(&m->rng, M_MAXLEN)] = (llmkv_token)tst_below(&m->rng, 4);
    n = tst_below(&m->rng, 25);
    snprintf(m->what, sizeof m->what, plain ? "seq_create" : "create_prefix ns %llu n %u", (unsigned long long)ns, n);
    r = plain ? llmkv_seq_create(m->kv, &h) : llmkv_seq_create_prefix(m->kv, ns, src, n, &h, &nc);
    if (!s) {
        if (r != LLMKV_ERR_TOO_MANY_SEQUENCES)
            m_fail(m, "create with every slot live", r, LLMKV_ERR_TOO_MANY_SEQUENCES);
        return;
    }
    if (r != LLMKV_OK) {
        m_fail(m, "create", r, LLMKV_OK);
        return;
    }
    memset(s, 0, sizeof *s);
    s->live = 1;
    s->h = h;
    s->ns = plain ? 0 : ns;
    memcpy(s->src, src, sizeof src);
    if (!plain && n) {
        match = m_walk(m, ns, src, n - 1, path, &d, &cand, &lcp);
        for (i = 0; i < d; ++i) {
            m_hold(m, path[i]);
            s->table[i] = path[i];
        }
        if (cand != M_NONE) {
            m_hold(m, cand);
            s->table[d] = cand;
        }
        s->n_pages = d + (cand != M_NONE);
        s->n_pub = d;
        s->len = s->w[0] = s->w[1] = match;
    }
    if (!plain) {
        m->matched += match;
        m->missed += n - match;
        if (nc != match) m_fail(m, "n_cached", nc, match);
    }
}

static void m_op_reserve(mdl* m, m_seq* s) {
    uint32_t n = 1 + tst_below(&m->rng, 7), need, i, new_pages, pt[64];
    int unknown = tst_below(&m->rng, 10) == 0, tail_cow;
    llmkv_result r, want;
    const llmkv_token* toks = s->len + n <= M_MAXLEN ? s->src + s->len : NULL;
    snprintf(m->what, sizeof m->what, "reserve_tokens %u (%s) at %u", n, unknown ? "unknown" : "ids", s->len);
    r = llmkv_reserve_tokens(m->kv, s->h, unknown ? NULL : toks, n);
    new_pages = (s->len + n + M_PS - 1) / M_PS;
    tail_cow = s->len % M_PS && m_shared(m, s->table[s->n_pages - 1]);
    need = new_pages - s->n_pages + (tail_cow ? 1u : 0u);
    if (s->len + n > M_MAXLEN) want = LLMKV_ERR_SEQUENCE_TOO_LONG;
    else if (need > m_avail(m)) want = LLMKV_ERR_OUT_OF_PAGES;
    else want = LLMKV_OK;
    if (r != want) {
        m_fail(m, "reserve result", r, want);
        return;
    }
    if (r != LLMKV_OK) return;
    p_pages(m->kv, s->h, pt);
    m->bind = pt;
    m_publish(m, s, 0);
    if (s->len % M_PS && m_shared(m, s->table[s->n_pages - 1])) m_cow(m, s, s->n_pages - 1, s->len % M_PS);
    while (s->n_pages < new_pages) {
        s->table[s->n_pages] = m_take(m, s->n_pages);
        s->n_pages++;
    }
    for (i = 0; i < n; ++i)
        m->pg[s->table[(s->len + i) / M_PS]].tok[(s->len + i) % M_PS] = unknown ? -1 : toks[i];
    s->len += n;
    m->bind = NULL;
}

static void m_op_write(mdl* m, m_seq* s) {
    uint32_t mask = tst_below(&m->rng, 5) == 0 ? 1u + tst_below(&m->rng, 2) : 3u, n, first, i, layer, cow = 0,
             pt[64], lo;
    llmkv_token toks[M_MAXLEN];
    llmkv_result r = LLMKV_OK, want;
    if (s->len == 0) return;
    lo = s->len;
    for (layer = 0; layer < 2; ++layer)
        if ((mask >> layer & 1u) && s->w[layer] < lo) lo = s->w[layer];
    n = lo < s->len && tst_below(&m->rng, 4) ? s->len - lo : 1 + tst_below(&m->rng, s->len);
    first = s->len - n;
    for (i = 0; i < n; ++i) toks[i] = m_eff(m_tok_at(m, s, first + i));
    snprintf(m->what, sizeof m->what, "put layers %u, newest %u of %u", mask, n, s->len);
    for (layer = 0; layer < 2 && r == LLMKV_OK; ++layer)
        if (mask >> layer & 1u) r = p_put(m->kv, s->h, toks, n, layer, 3);
    for (i = first / M_PS; i <= (s->len - 1) / M_PS; ++i) cow += m_shared(m, s->table[i]);
    want = cow > m_avail(m) ? LLMKV_ERR_OUT_OF_PAGES : LLMKV_OK;
    if (r != want) {
        m_fail(m, "put result", r, want);
        return;
    }
    if (r != LLMKV_OK) return;
    p_pages(m->kv, s->h, pt);
    m->bind = pt;
    for (i = (s->len - 1) / M_PS + 1; i-- > first / M_PS;)
        if (m_shared(m, s->table[i])) m_cow(m, s, i, s->len - i * M_PS < M_PS ? s->len - i * M_PS : M_PS);
    m->bind = NULL;
    for (layer = 0; layer < 2; ++layer)
        if ((mask >> layer & 1u) && first <= s->w[layer]) s->w[layer] = s->len;
}

static void m_op_truncate(mdl* m, m_seq* s) {
    uint32_t n = tst_below(&m->rng, s->len + 1), keep = (n + M_PS - 1) / M_PS;
    snprintf(m->what, sizeof m->what, "truncate %u to %u", s->len, n);
    if (llmkv_truncate(m->kv, s->h, n) != LLMKV_OK) {
        m_fail(m, "truncate", 0, 0);
        return;
    }
    while (s->n_pages > keep) m_release(m, s->table[--s->n_pages]);
    if (s->n_pub > n / M_PS) s->n_pub = n / M_PS;
    if (s->w[0] > n) s->w[0] = n;
    if (s->w[1] > n) s->w[1] = n;
    s->len = n;
}

static void m_op_free(mdl* m, m_seq* s) {
    snprintf(m->what, sizeof m->what, "free (length %u)", s->len);
    if (llmkv_seq_free(m->kv, s->h) != LLMKV_OK) {
        m_fail(m, "free", 0, 0);
        return;
    }
    m_publish(m, s, 0);
    while (s->n_pages) m_release(m, s->table[--s->n_pages]);
    s->live = 0;
}

static void m_op_pin(mdl* m) {
    m_pin* pn = NULL;
    llmkv_token pr[M_MAXLEN];
    uint32_t i, n = tst_below(&m->rng, M_MAXLEN + 1), np = 0, path[M_TPAGES + 1], d, cand, lcp, want;
    uint64_t ns = m_spaces[tst_below(&m->rng, 3)];
    llmkv_pin h;
    llmkv_result r;
    for (i = 0; i < M_PINS; ++i)
        if (!m->pins[i].live) {
            pn = &m->pins[i];
            break;
        }
    memcpy(pr, m->docs[tst_below(&m->rng, M_DOCS)], sizeof pr);
    snprintf(m->what, sizeof m->what, "pin ns %llu n %u", (unsigned long long)ns, n);
    r = llmkv_prefix_pin(m->kv, ns, pr, n, &h, &np);
    if (!pn) {
        if (r != LLMKV_ERR_TOO_MANY_PINS) m_fail(m, "pin with every slot live", r, LLMKV_ERR_TOO_MANY_PINS);
        return;
    }
    if (r != LLMKV_OK) {
        m_fail(m, "pin", r, LLMKV_OK);
        return;
    }
    want = m_walk(m, ns, pr, n, path, &d, &cand, &lcp);
    pn->live = 1;
    pn->h = h;
    pn->n = 0;
    want = d * M_PS;
    if (cand != M_NONE && lcp == m->pg[cand].ntok) {
        pn->nodes[pn->n++] = cand;
        want += lcp;
    }
    for (i = d; i-- > 0;) pn->nodes[pn->n++] = path[i];
    for (i = 0; i < pn->n; ++i) {
        if (m_evictable(m, pn->nodes[i])) m_lru_remove(m, pn->nodes[i]);
        m->pg[pn->nodes[i]].pins++;
    }
    if (np != want) m_fail(m, "n_pinned", np, want);
}

static void m_op_unpin(mdl* m) {
    uint32_t i, n = 0, live[M_PINS];
    m_pin* pn;
    for (i = 0; i < M_PINS; ++i)
        if (m->pins[i].live) live[n++] = i;
    if (n == 0 || tst_below(&m->rng, 8) == 0) {
        snprintf(m->what, sizeof m->what, "unpin a released pin");
        if (m->stale_pin.id && llmkv_prefix_unpin(m->kv, m->stale_pin) != LLMKV_ERR_STALE_HANDLE)
            m_fail(m, "unpin of a released pin", 0, LLMKV_ERR_STALE_HANDLE);
        return;
    }
    pn = &m->pins[live[tst_below(&m->rng, n)]];
    snprintf(m->what, sizeof m->what, "unpin (%u nodes)", pn->n);
    if (llmkv_prefix_unpin(m->kv, pn->h) != LLMKV_OK) {
        m_fail(m, "unpin", 0, 0);
        return;
    }
    for (i = 0; i < pn->n; ++i) {
        uint32_t p = pn->nodes[i];
        if (--m->pg[p].pins == 0 && m_evictable(m, p)) m_lru_push(m, p);
    }
    pn->live = 0;
    m->stale_pin = pn->h;
}

static void m_op_evict(mdl* m) {
    static const uint32_t maxes[4] = {0, 1, 2, 0xFFFFFFFFu};
    uint32_t mx = maxes[tst_below(&m->rng, 4)], n = 77, want = 0;
    snprintf(m->what, sizeof m->what, "evict %u", mx);
    if (llmkv_prefix_evict(m->kv, mx, &n) != LLMKV_OK) m_fail(m, "evict", 0, 0);
    while (want < mx && m->n_lru) {
        m_evict_one(m);
        want++;
    }
    if (n != want) m_fail(m, "n_evicted", n, want);
}

static void m_run(tst* t, unsigned long long seed, uint32_t steps) {
    mdl* m = (mdl*)calloc(1, sizeof(mdl));
    llmkv_desc d = p_desc(M_PS, M_PAGES, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
    uint32_t i, j;
    if (!m) {
        TST_CHECK(t, 0);
        return;
    }
    d.max_seqs = M_SEQS;
    d.max_pins = M_PINS;
    d.max_seq_len = M_MAXLEN;
    m->t = t;
    m->rng.s = seed;
    if (llmkv_cache_create(&d, &m->kv) != LLMKV_OK) {
        TST_CHECK(t, 0);
        free(m);
        return;
    }
    for (i = 0; i < M_PAGES; ++i) m->unknown[i] = 1;
    m->n_unknown = M_PAGES;
    /* three documents over 4 token ids sharing prefixes: 1 and 2 leave 0 at
       positions 9 and 2 */
    for (j = 0; j < M_MAXLEN; ++j) m->docs[0][j] = (llmkv_token)tst_below(&m->rng, 4);
    memcpy(m->docs[1], m->docs[0], sizeof m->docs[0]);
    memcpy(m->docs[2], m->docs[0], sizeof m->docs[0]);
    m->docs[1][9] = (m->docs[0][9] + 1) % 4;
    m->docs[2][2] = (m->docs[0][2] + 1) % 4;
    for (m->step = 0; m->step < steps && !m->bad; ++m->step) {
        uint32_t op = tst_below(&m->rng, 100);
        m_seq* s = m_pick(m);
        if (op < 10 || !s) m_op_create(m);
        else if (op < 35) m_op_reserve(m, s);
        else if (op < 60) m_op_write(m, s);
        else if (op < 66) m_op_truncate(m, s);
        else if (op < 74) m_op_free(m, s);
        else if (op < 80) {
            int partial = (int)tst_below(&m->rng, 2);
            snprintf(m->what, sizeof m->what, "publish partial %d", partial);
            if (llmkv_seq_publish(m->kv, s->h, partial) != LLMKV_OK) m_fail(m, "publish", 0, 0);
            m_publish(m, s, partial);
        } else if (op < 86) m_op_pin(m);
        else if (op < 92) m_op_unpin(m);
        else m_op_evict(m);
        if (s && !s->live && op >= 66 && op < 74) m_new_src(m, s);
        if (!m->bad) m_compare(m);
    }
    if (m->bad) fprintf(stderr, "  (model run seed %llu)\n", seed);
    llmkv_cache_destroy(m->kv);
    free(m);
}

static void test_prefix_model_random(tst* t) {
    m_run(t, 0x9a11ull, 4000);
    m_run(t, 0x9a12ull, 4000);
    m_run(t, 0x9a13ull, 4000);
    m_run(t, 0x9a14ull, 4000);
}

void suite_prefix(tst* t) {
    TST_RUN(t, test_prefix_tokens_roundtrip);
    TST_RUN(t, test_prefix_unsupported_without_index);
    TST_RUN(t, test_prefix_create_and_match);
    TST_RUN(t, test_prefix_publish_needs_written);
    TST_RUN(t, test_prefix_failed_reserve_publishes_nothing);
    TST_RUN(t, test_prefix_mark_written_metadata_only);
    TST_RUN(t, test_prefix_partial_publish);
    TST_RUN(t, test_prefix_dedupe);
    TST_RUN(t, test_prefix_lru_order);
    TST_RUN(t, test_prefix_lru_after_copy_on_write);
    TST_RUN(t, test_prefix_evict_leaves_first);
    TST_RUN(t, test_prefix_evict_spares_held_and_pinned);
    TST_RUN(t, test_prefix_evict_in_reserve);
    TST_RUN(t, test_prefix_put_copy_evicts);
    TST_RUN(t, test_prefix_shared_cached_tail);
    TST_RUN(t, test_prefix_pins);
    TST_RUN(t, test_prefix_namespaces);
    TST_RUN(t, test_prefix_stats_exact);
    TST_RUN(t, test_prefix_gather_and_attend_f16);
    TST_RUN(t, test_prefix_gather_and_attend_q8);
    TST_RUN(t, test_prefix_gather_and_attend_q4c);
    TST_RUN(t, test_prefix_failures_change_nothing);
    TST_RUN(t, test_prefix_fork_interplay);
    TST_RUN(t, test_prefix_model_random);
}
