/* Fault injection and argument validation.

   An allocator that counts its calls, fails the k-th one (or every one) and
   tracks every block it hands out proves that: creation either succeeds or
   returns OUT_OF_MEMORY with nothing left allocated, for every k; nothing
   allocates after creation; llmkv_cache_create_in never allocates. Tiny
   pools prove that each capacity failure leaves the cache exactly as it was
   (statistics, lengths, page tables, stored bytes, pending copies). Every
   public function is called with NULL pointers, stale handles and values
   out of range, and must answer the documented code without changing the
   cache. */
#include "test_util.h"
#include "test_falloc.h"
#include "../llmkv.h"

static llmkv_desc f_desc(uint32_t n_pages, llmkv_storage storage) {
    llmkv_desc d;
    memset(&d, 0, sizeof d);
    d.n_layers = 2;
    d.n_kv_heads = 2;
    d.head_dim = 8;
    d.page_size = 4;
    d.n_pages = n_pages;
    d.k_dtype = LLMKV_DTYPE_F32;
    d.v_dtype = LLMKV_DTYPE_BF16;
    d.storage = storage;
    d.max_seqs = 8;
    return d;
}

/* A value exactly representable in F16 and BF16 (k / 8, |k| < 64), so a
   gather to F32 must return it exactly whatever the storage type. */
static float f_value(uint32_t pos, uint32_t layer, uint32_t part, uint32_t e, uint32_t salt) {
    return (float)((int)((pos * 7 + layer * 13 + part * 5 + e * 3 + salt * 11) % 64) - 32) / 8.0f;
}

/* ------------------------------------------------------------------------ */
/* Snapshots: a failed call must leave all of this as it was                */
/* ------------------------------------------------------------------------ */

#define F_MAX 8
#define F_MAX_PAGES 64

typedef struct fsnap {
    llmkv_stats st;
    uint32_t n;
    llmkv_seq h[F_MAX];
    uint32_t len[F_MAX], np[F_MAX];
    uint32_t pages[F_MAX][F_MAX_PAGES];
    unsigned char* data[F_MAX];   /* raw K and V bytes of every layer (host) */
    size_t bytes[F_MAX];
} fsnap;

/* Raw stored bytes of every layer of a sequence; NULL for metadata-only. */
static unsigned char* f_gather_all(llmkv_cache* c, llmkv_seq h, uint32_t len, size_t* bytes) {
    llmkv_layout l;
    size_t kr, vr, off = 0;
    uint32_t layer;
    unsigned char* p;
    *bytes = 0;
    if (llmkv_cache_layout(c, &l) != LLMKV_OK || len == 0) return NULL;
    kr = (size_t)l.n_kv_heads * l.head_dim * l.k.elem_bytes;
    vr = (size_t)l.n_kv_heads * l.head_dim * l.v.elem_bytes;
    *bytes = (size_t)len * (kr + vr) * l.n_layers;
    p = (unsigned char*)malloc(*bytes);
    if (!p) return NULL;
    for (layer = 0; layer < l.n_layers; ++layer) {
        if (llmkv_gather(c, h, layer, 0, len, p + off, 0, p + off + (size_t)len * kr, 0, LLMKV_DTYPE_DEFAULT) !=
            LLMKV_OK) {
            free(p);
            *bytes = 0;
            return NULL;
        }
        off += (size_t)len * (kr + vr);
    }
    return p;
}

static void fs_take(llmkv_cache* c, const llmkv_seq* hs, uint32_t n, fsnap* s) {
    uint32_t i;
    memset(s, 0, sizeof *s);
    llmkv_cache_stats(c, &s->st);
    s->n = n;
    for (i = 0; i < n; ++i) {
        s->h[i] = hs[i];
        llmkv_seq_length(c, hs[i], &s->len[i]);
        llmkv_seq_pages(c, hs[i], s->pages[i], F_MAX_PAGES, &s->np[i]);
        s->data[i] = f_gather_all(c, hs[i], s->len[i], &s->bytes[i]);
    }
}

/* Compares the cache with the snapshot (and releases it); `what` names the
   failed call in the report. */
static void fs_check(tst* t, llmkv_cache* c, fsnap* s, const char* what) {
    llmkv_stats st;
    uint32_t i, j;
    int bad = 0;
    char msg[256];
    memset(&st, 0, sizeof st);
    if (llmkv_cache_stats(c, &st) != LLMKV_OK) bad = 1;
    if (st.n_pages_free != s->st.n_pages_free || st.n_pages_used != s->st.n_pages_used ||
        st.n_pages_shared != s->st.n_pages_shared || st.n_seqs != s->st.n_seqs ||
        st.n_pending_copies != s->st.n_pending_copies || st.n_tokens != s->st.n_tokens ||
        st.n_slots_used != s->st.n_slots_used || st.metadata_bytes != s->st.metadata_bytes)
        bad = 1;
    for (i = 0; i < s->n; ++i) {
        uint32_t len = 0xFFFFFFFFu, np = 0xFFFFFFFFu, pages[F_MAX_PAGES];
        size_t bytes = 0;
        unsigned char* data;
        if (llmkv_seq_length(c, s->h[i], &len) != LLMKV_OK || len != s->len[i]) bad = 1;
        if (llmkv_seq_pages(c, s->h[i], pages, F_MAX_PAGES, &np) != LLMKV_OK || np != s->np[i]) bad = 1;
        for (j = 0; j < np && j < s->np[i] && j < F_MAX_PAGES; ++j)
            if (pages[j] != s->pages[i][j]) bad = 1;
        data = f_gather_all(c, s->h[i], len, &bytes);
        if (bytes != s->bytes[i] || (bytes && (!data || !s->data[i] || memcmp(data, s->data[i], bytes) != 0)))
            bad = 1;
        free(data);
        free(s->data[i]);
        s->data[i] = NULL;
    }
    if (bad) fprintf(stderr, "  the cache changed across a failed %s\n", what);
    TST_CHECK(t, !bad);
    msg[0] = 0;
    if (llmkv_cache_check(c, msg, sizeof msg) != LLMKV_OK) {
        fprintf(stderr, "  llmkv_cache_check after %s: %s\n", what, msg);
        TST_CHECK(t, 0);
    }
}

/* ------------------------------------------------------------------------ */
/* A scripted workload touching every mutating call                         */
/* ------------------------------------------------------------------------ */

/* Puts the newest n positions of every layer (values keyed by position). */
static void f_put(tst* t, llmkv_cache* c, llmkv_seq h, uint32_t n, uint32_t salt) {
    llmkv_desc d;
    uint32_t len = 0, layer, j, e, ne;
    float* k;
    float* v;
    llmkv_result expect;
    TST_EQ(t, llmkv_cache_desc(c, &d), LLMKV_OK);
    TST_EQ(t, llmkv_seq_length(c, h, &len), LLMKV_OK);
    if (n > len || n == 0) return;
    expect = d.storage == LLMKV_STORAGE_METADATA_ONLY ? LLMKV_ERR_NO_PAGE_DATA : LLMKV_OK;
    ne = d.n_kv_heads * d.head_dim;
    k = (float*)malloc((size_t)n * ne * sizeof(float));
    v = (float*)malloc((size_t)n * ne * sizeof(float));
    if (!k || !v) {
        free(k);
        free(v);
        TST_CHECK(t, 0);
        return;
    }
    for (layer = 0; layer < d.n_layers; ++layer) {
        for (j = 0; j < n; ++j)
            for (e = 0; e < ne; ++e) {
                k[(size_t)j * ne + e] = f_value(len - n + j, layer, 0, e, salt);
                v[(size_t)j * ne + e] = f_value(len - n + j, layer, 1, e, salt);
            }
        TST_EQ(t, llmkv_put(c, h, layer, n, k, 0, v, 0, LLMKV_DTYPE_F32), expect);
    }
    free(k);
    free(v);
}

/* Gathers [0, n) of every layer as F32 and compares with f_value(salt). */
static void f_expect_values(tst* t, llmkv_cache* c, llmkv_seq h, uint32_t n, uint32_t salt) {
    llmkv_desc d;
    uint32_t layer, j, e, ne, bad = 0;
    float* k;
    float* v;
    TST_EQ(t, llmkv_cache_desc(c, &d), LLMKV_OK);
    if (d.storage == LLMKV_STORAGE_METADATA_ONLY || n == 0) return;
    ne = d.n_kv_heads * d.head_dim;
    k = (float*)malloc((size_t)n * ne * sizeof(float));
    v = (float*)malloc((size_t)n * ne * sizeof(float));
    if (!k || !v) {
        free(k);
        free(v);
        TST_CHECK(t, 0);
        return;
    }
    for (layer = 0; layer < d.n_layers; ++layer) {
        TST_EQ(t, llmkv_gather(c, h, layer, 0, n, k, 0, v, 0, LLMKV_DTYPE_F32), LLMKV_OK);
        for (j = 0; j < n; ++j)
            for (e = 0; e < ne; ++e) {
                bad += k[(size_t)j * ne + e] != f_value(j, layer, 0, e, salt);
                bad += v[(size_t)j * ne + e] != f_value(j, layer, 1, e, salt);
            }
    }
    TST_EQ(t, bad, 0);
    free(k);
    free(v);
}

/* Needs 4 live sequences and about 9 pages of 4 slots. */
static void f_workload(tst* t, llmkv_cache* c, llmkv_batch* b) {
    llmkv_desc d;
    llmkv_seq a, s2, f, hs[3];
    llmkv_stats st;
    llmkv_batch_info info;
    llmkv_copy_cmd cmds[8];
    uint32_t q[3] = {1, 1, 0}, more[2] = {3, 1}, n = 0, len = 0;
    char msg[200];
    TST_EQ(t, llmkv_cache_desc(c, &d), LLMKV_OK);
    TST_EQ(t, llmkv_seq_create(c, &a), LLMKV_OK);
    TST_EQ(t, llmkv_seq_create(c, &s2), LLMKV_OK);
    TST_EQ(t, llmkv_reserve(c, a, 6), LLMKV_OK);
    f_put(t, c, a, 6, 0);
    TST_EQ(t, llmkv_reserve(c, s2, 3), LLMKV_OK);
    f_put(t, c, s2, 3, 0);
    TST_EQ(t, llmkv_fork(c, a, &f), LLMKV_OK);
    f_put(t, c, f, 2, 0);                        /* copy-on-write in put */
    TST_EQ(t, llmkv_reserve(c, f, 2), LLMKV_OK); /* copy-on-write in reserve (maybe) */
    f_put(t, c, f, 2, 0);
    hs[0] = a;
    hs[1] = s2;
    TST_EQ(t, llmkv_reserve_many(c, hs, more, 2), LLMKV_OK);
    f_put(t, c, a, 3, 0);
    f_put(t, c, s2, 1, 0);
    TST_EQ(t, llmkv_truncate(c, a, 5), LLMKV_OK);
    TST_EQ(t, llmkv_reserve(c, a, 2), LLMKV_OK); /* back into a page of its own */
    f_put(t, c, a, 2, 0);
    f_expect_values(t, c, a, 7, 0);
    f_expect_values(t, c, s2, 4, 0);
    f_expect_values(t, c, f, 8, 0);
    if (b) {
        hs[2] = f;
        TST_EQ(t, llmkv_batch_build(b, hs, q, 3), LLMKV_OK);
        memset(&info, 0, sizeof info);
        TST_EQ(t, llmkv_batch_get(b, &info), LLMKV_OK);
        TST_EQ(t, info.n_seqs, 3);
        TST_EQ(t, info.n_tokens, 2);
        TST_EQ(t, llmkv_batch_check(b), LLMKV_OK);
        TST_EQ(t, llmkv_truncate(c, f, 3), LLMKV_OK);
        TST_EQ(t, llmkv_batch_check(b), LLMKV_ERR_STALE_BATCH);
    }
    do {
        TST_EQ(t, llmkv_copy_cmds_take(c, cmds, 8, &n), LLMKV_OK);
    } while (n == 8);
    memset(&st, 0, sizeof st);
    TST_EQ(t, llmkv_cache_stats(c, &st), LLMKV_OK);
    TST_EQ(t, st.n_seqs, 3);
    TST_EQ(t, llmkv_seq_length(c, f, &len), LLMKV_OK);
    msg[0] = 0;
    TST_EQ(t, llmkv_cache_check(c, msg, sizeof msg), LLMKV_OK);
    TST_EQ(t, llmkv_seq_free(c, a), LLMKV_OK);
    TST_EQ(t, llmkv_seq_free(c, s2), LLMKV_OK);
    TST_EQ(t, llmkv_seq_free(c, f), LLMKV_OK);
    TST_EQ(t, llmkv_cache_stats(c, &st), LLMKV_OK);
    TST_EQ(t, st.n_pages_free, st.n_pages_total);
    TST_EQ(t, st.n_seqs, 0);
    TST_EQ(t, llmkv_cache_check(c, msg, sizeof msg), LLMKV_OK);
}

/* ------------------------------------------------------------------------ */
/* Allocation failures                                                      */
/* ------------------------------------------------------------------------ */

/* For k = 1, 2, ...: fail the k-th allocation of llmkv_cache_create; it
   must succeed or answer OUT_OF_MEMORY with nothing left allocated. The
   first k that injects no failure ends the loop: then the workload must
   not allocate at all (every further call would fail). */
static void f_create_every_k(tst* t, llmkv_desc d, const char* name) {
    long k;
    for (k = 1; k <= 10000; ++k) {
        falloc a;
        llmkv_cache* c = NULL;
        llmkv_batch* b = NULL;
        llmkv_result r;
        f_init(&a);
        a.fail_at = k;
        d.allocator = f_allocator(&a);
        r = llmkv_cache_create(&d, &c);
        if (a.calls < k) { /* nothing failed */
            long calls;
            TST_EQ(t, r, LLMKV_OK);
            if (r != LLMKV_OK) {
                f_done(&a);
                return;
            }
            a.fail_at = 0;
            TST_EQ(t, llmkv_batch_create(c, 4, 16, &b), LLMKV_OK);
            calls = a.calls;
            a.fail_all = 1;
            f_workload(t, c, b);
            if (a.calls != calls) fprintf(stderr, "  %s: the cache allocated after creation\n", name);
            TST_EQ(t, a.calls, calls);
            llmkv_batch_destroy(b);
            llmkv_cache_destroy(c);
            TST_EQ(t, a.n_blocks, 0);
            TST_EQ(t, a.errors, 0);
            f_done(&a);
            return;
        }
        if (r != LLMKV_ERR_OUT_OF_MEMORY || a.n_blocks != 0 || a.errors)
            fprintf(stderr, "  %s: allocation %ld failed: result %d, %lu blocks left\n", name, k, (int)r,
                    (unsigned long)a.n_blocks);
        TST_EQ(t, r, LLMKV_ERR_OUT_OF_MEMORY);
        TST_EQ(t, a.n_blocks, 0);
        TST_EQ(t, a.errors, 0);
        if (r == LLMKV_OK) llmkv_cache_destroy(c);
        f_done(&a);
    }
    fprintf(stderr, "  %s: creation never stopped allocating\n", name);
    TST_CHECK(t, 0);
}

static void test_fault_cache_create_oom(tst* t) {
    llmkv_desc d = f_desc(16, LLMKV_STORAGE_DEFAULT);
    llmkv_layout l;
    f_create_every_k(t, d, "host cache");
    d.k_dtype = LLMKV_DTYPE_DEFAULT;
    d.v_dtype = LLMKV_DTYPE_F16;
    d.max_seqs = 0; /* default 256 */
    d.max_seq_len = 40;
    f_create_every_k(t, d, "host cache, defaults");
    d = f_desc(16, LLMKV_STORAGE_METADATA_ONLY);
    d.max_pending_copies = 4;
    f_create_every_k(t, d, "metadata-only cache");
    d = f_desc(0, LLMKV_STORAGE_DEFAULT);
    TST_EQ(t, llmkv_layout_for(&d, &l), LLMKV_OK);
    d.capacity_bytes = 16 * l.page_bytes + l.page_bytes / 2; /* rounds down to 16 pages */
    f_create_every_k(t, d, "cache sized by capacity_bytes");
    d = f_desc(16, LLMKV_STORAGE_DEFAULT);
    d.prefix_index = 1;
    d.max_pins = 3;
    f_create_every_k(t, d, "host cache with a prefix index");
#ifndef LLMKV_NO_THREADS
    d.thread_safe = 1;
    f_create_every_k(t, d, "thread-safe host cache with a prefix index");
#endif
}

/* The k-th allocation after the cache exists fails inside batch_create. */
static void test_fault_batch_create_oom(tst* t) {
    int meta;
    for (meta = 0; meta < 2; ++meta) {
        falloc a;
        llmkv_desc d = f_desc(16, meta ? LLMKV_STORAGE_METADATA_ONLY : LLMKV_STORAGE_DEFAULT);
        llmkv_cache* c = NULL;
        size_t cache_blocks;
        long k;
        f_init(&a);
        d.allocator = f_allocator(&a);
        TST_EQ(t, llmkv_cache_create(&d, &c), LLMKV_OK);
        if (!c) {
            f_done(&a);
            return;
        }
        cache_blocks = a.n_blocks;
        for (k = 1; k <= 1000; ++k) {
            llmkv_batch* b = NULL;
            long base = a.calls;
            llmkv_result r;
            a.fail_at = base + k;
            r = llmkv_batch_create(c, 8, 64, &b);
            if (a.calls < base + k) { /* nothing failed */
                long calls;
                TST_EQ(t, r, LLMKV_OK);
                if (r != LLMKV_OK) break;
                a.fail_at = 0;
                a.fail_all = 1;
                calls = a.calls;
                f_workload(t, c, b);
                TST_EQ(t, a.calls, calls);
                a.fail_all = 0;
                llmkv_batch_destroy(b);
                TST_EQ(t, a.n_blocks, cache_blocks);
                break;
            }
            TST_EQ(t, r, LLMKV_ERR_OUT_OF_MEMORY);
            TST_EQ(t, a.n_blocks, cache_blocks); /* nothing of the batch left */
            TST_EQ(t, llmkv_cache_check(c, NULL, 0), LLMKV_OK);
            if (r == LLMKV_OK) llmkv_batch_destroy(b);
        }
        TST_CHECK(t, k <= 1000);
        llmkv_cache_destroy(c);
        TST_EQ(t, a.n_blocks, 0);
        TST_EQ(t, a.errors, 0);
        f_done(&a);
    }
}

/* ------------------------------------------------------------------------ */
/* llmkv_cache_create_in                                                    */
/* ------------------------------------------------------------------------ */

static void test_fault_create_in(tst* t) {
    int variant;
    for (variant = 0; variant < 4; ++variant) { /* host / metadata-only, without / with a prefix index */
        int meta = variant & 1;
        falloc a;
        llmkv_desc d = f_desc(12, meta ? LLMKV_STORAGE_METADATA_ONLY : LLMKV_STORAGE_DEFAULT);
        d.prefix_index = (uint32_t)(variant >> 1);
        size_t size = 0, per_page = 1;
        unsigned char* mem;
        unsigned off;
        f_init(&a);
        a.fail_all = 1; /* create_in must never call it */
        d.allocator = f_allocator(&a);
        TST_EQ(t, llmkv_cache_memory_size(&d, &size, &per_page), LLMKV_OK);
        TST_CHECK(t, size > 0);
        mem = (unsigned char*)malloc(size + 64);
        if (!mem) {
            TST_CHECK(t, 0);
            return;
        }
        /* every alignment of the caller's buffer */
        for (off = 0; off < 64; off += meta ? 13 : 1) {
            llmkv_cache* c = NULL;
            llmkv_stats st;
            TST_EQ(t, llmkv_cache_create_in(&d, mem + off, size - 1, &c), LLMKV_ERR_BUFFER_TOO_SMALL);
            c = NULL;
            TST_EQ(t, llmkv_cache_create_in(&d, mem + off, size, &c), LLMKV_OK);
            if (!c) continue;
            memset(&st, 0, sizeof st);
            TST_EQ(t, llmkv_cache_stats(c, &st), LLMKV_OK);
            TST_EQ(t, st.n_pages_total, 12);
            if (!meta) { /* the pool lies inside the buffer */
                void* base = NULL;
                uint64_t bytes = 0;
                TST_EQ(t, llmkv_cache_pool(c, &base, &bytes), LLMKV_OK);
                TST_CHECK(t, (unsigned char*)base >= mem + off && (unsigned char*)base + bytes <= mem + off + size);
                TST_EQ(t, (uintptr_t)base % 64, 0);
            }
            f_workload(t, c, NULL);
            llmkv_cache_destroy(c); /* frees nothing */
        }
        TST_EQ(t, a.calls, 0);
        TST_EQ(t, a.frees, 0);
        free(mem);

        /* no capacity: as many pages as fit */
        if (!meta) {
            size_t base_size = 0;
            uint32_t k;
            d.n_pages = 0;
            TST_EQ(t, llmkv_cache_memory_size(&d, &base_size, &per_page), LLMKV_OK);
            TST_CHECK(t, per_page > 0);
            mem = (unsigned char*)malloc(base_size + 10 * per_page + 64);
            if (!mem) {
                TST_CHECK(t, 0);
                return;
            }
            for (k = 0; k <= 10; k += 5) {
                llmkv_cache* c = NULL;
                llmkv_result r = llmkv_cache_create_in(&d, mem + 3, base_size + k * per_page, &c);
                if (k == 0) {
                    TST_EQ(t, r, LLMKV_ERR_BUFFER_TOO_SMALL); /* not even one page */
                } else {
                    llmkv_desc eff;
                    TST_EQ(t, r, LLMKV_OK);
                    if (!c) continue;
                    TST_EQ(t, llmkv_cache_desc(c, &eff), LLMKV_OK);
                    TST_CHECK(t, eff.n_pages >= k);
                    if (k == 10) f_workload(t, c, NULL);
                    llmkv_cache_destroy(c);
                }
            }
            TST_EQ(t, a.calls, 0);
            free(mem);
        }
        f_done(&a);
    }
}

/* ------------------------------------------------------------------------ */
/* Capacity failures leave the cache unchanged                              */
/* ------------------------------------------------------------------------ */

static void test_fault_capacity_unchanged(tst* t) {
    llmkv_desc d = f_desc(4, LLMKV_STORAGE_DEFAULT);
    llmkv_cache* c = NULL;
    llmkv_batch* b = NULL;
    llmkv_seq s1, s2, f, hs[3];
    uint32_t n2[2], q[3] = {0, 0, 0};
    llmkv_batch_info info;
    fsnap sn;
    d.max_seqs = 3;
    d.max_seq_len = 11; /* 3 pages of 4 */
    TST_EQ(t, llmkv_cache_create(&d, &c), LLMKV_OK);
    if (!c) return;
    TST_EQ(t, llmkv_batch_create(c, 2, 4, &b), LLMKV_OK);

    /* pool: s1 10 positions (3 pages), s2 4 (1 page): nothing free */
    TST_EQ(t, llmkv_seq_create(c, &s1), LLMKV_OK);
    TST_EQ(t, llmkv_seq_create(c, &s2), LLMKV_OK);
    TST_EQ(t, llmkv_reserve(c, s1, 10), LLMKV_OK);
    f_put(t, c, s1, 10, 1);
    TST_EQ(t, llmkv_reserve(c, s2, 4), LLMKV_OK);
    f_put(t, c, s2, 4, 2);
    hs[0] = s1;
    hs[1] = s2;

    fs_take(c, hs, 2, &sn); /* needs a page */
    TST_EQ(t, llmkv_reserve(c, s2, 1), LLMKV_ERR_OUT_OF_PAGES);
    fs_check(t, c, &sn, "reserve (out of pages)");

    fs_take(c, hs, 2, &sn); /* 12 > max_seq_len 11, though page 3 has room */
    TST_EQ(t, llmkv_reserve(c, s1, 2), LLMKV_ERR_SEQUENCE_TOO_LONG);
    fs_check(t, c, &sn, "reserve (too long)");

    fs_take(c, hs, 2, &sn); /* s1 would fit in its tail page, s2 would not */
    n2[0] = 1;
    n2[1] = 1;
    TST_EQ(t, llmkv_reserve_many(c, hs, n2, 2), LLMKV_ERR_OUT_OF_PAGES);
    fs_check(t, c, &sn, "reserve_many (out of pages)");

    fs_take(c, hs, 2, &sn); /* s1 too long (needing no page), s2 unchanged */
    n2[0] = 2;
    n2[1] = 0;
    TST_EQ(t, llmkv_reserve_many(c, hs, n2, 2), LLMKV_ERR_SEQUENCE_TOO_LONG);
    fs_check(t, c, &sn, "reserve_many (too long)");

    /* s1 forked: its partial tail page (positions 8, 9) is shared */
    TST_EQ(t, llmkv_fork(c, s1, &f), LLMKV_OK);
    hs[2] = f;
    fs_take(c, hs, 3, &sn); /* writing the shared tail needs a copy */
    TST_EQ(t, llmkv_reserve(c, s1, 1), LLMKV_ERR_OUT_OF_PAGES);
    fs_check(t, c, &sn, "reserve (copy-on-write, out of pages)");

    fs_take(c, hs, 3, &sn); /* put into shared pages: copy first, none free */
    {
        float buf[2 * 8 * 6];
        memset(buf, 0, sizeof buf);
        TST_EQ(t, llmkv_put(c, f, 1, 6, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_PAGES);
        TST_EQ(t, llmkv_put(c, s1, 0, 1, buf, 0, NULL, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_PAGES);
    }
    fs_check(t, c, &sn, "put (copy-on-write, out of pages)");

    fs_take(c, hs, 3, &sn); /* max_seqs 3 are live */
    {
        llmkv_seq x;
        x.id = 0;
        TST_EQ(t, llmkv_seq_create(c, &x), LLMKV_ERR_TOO_MANY_SEQUENCES);
        TST_EQ(t, llmkv_fork(c, s2, &x), LLMKV_ERR_TOO_MANY_SEQUENCES);
    }
    fs_check(t, c, &sn, "seq_create / fork (too many sequences)");

    fs_take(c, hs, 3, &sn); /* batches too small: empty, cache untouched */
    TST_EQ(t, llmkv_batch_build(b, hs, q, 3), LLMKV_ERR_BATCH_FULL);
    memset(&info, 0x5A, sizeof info);
    TST_EQ(t, llmkv_batch_get(b, &info), LLMKV_OK);
    TST_EQ(t, info.n_seqs, 0);
    q[0] = 3;
    q[1] = 2;
    TST_EQ(t, llmkv_batch_build(b, hs, q, 2), LLMKV_ERR_BATCH_FULL);
    TST_EQ(t, llmkv_batch_get(b, &info), LLMKV_OK);
    TST_EQ(t, info.n_seqs, 0);
    fs_check(t, c, &sn, "batch_build (full)");

    /* put with copy-on-write, one page short: two shared pages, one free */
    TST_EQ(t, llmkv_seq_free(c, s2), LLMKV_OK);
    hs[1] = f;
    fs_take(c, hs, 2, &sn);
    {
        float buf[2 * 8 * 6];
        memset(buf, 0, sizeof buf);
        TST_EQ(t, llmkv_put(c, s1, 0, 6, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_PAGES);
    }
    fs_check(t, c, &sn, "put (two copies, one page free)");
    /* and what succeeds after the failures is still right */
    f_put(t, c, f, 2, 1);
    f_expect_values(t, c, s1, 10, 1);
    f_expect_values(t, c, f, 10, 1);

    TST_EQ(t, llmkv_seq_free(c, s1), LLMKV_OK);
    TST_EQ(t, llmkv_seq_free(c, f), LLMKV_OK);
    llmkv_batch_destroy(b);
    llmkv_cache_destroy(c);
}

/* Metadata-only: a full copy queue refuses the reserve that needs a copy. */
static void test_fault_copy_queue_full(tst* t) {
    llmkv_desc d = f_desc(8, LLMKV_STORAGE_METADATA_ONLY);
    llmkv_cache* c = NULL;
    llmkv_seq s1, f1, f2, hs[3];
    llmkv_copy_cmd cmd[2];
    uint32_t n = 0, two[2] = {1, 1};
    fsnap sn;
    d.max_pending_copies = 1;
    TST_EQ(t, llmkv_cache_create(&d, &c), LLMKV_OK);
    if (!c) return;
    TST_EQ(t, llmkv_seq_create(c, &s1), LLMKV_OK);
    TST_EQ(t, llmkv_reserve(c, s1, 5), LLMKV_OK); /* tail page half full */
    TST_EQ(t, llmkv_fork(c, s1, &f1), LLMKV_OK);
    TST_EQ(t, llmkv_fork(c, s1, &f2), LLMKV_OK);
    hs[0] = s1;
    hs[1] = f1;
    hs[2] = f2;
    TST_EQ(t, llmkv_reserve(c, f1, 1), LLMKV_OK); /* one copy queued */
    fs_take(c, hs, 3, &sn);
    TST_EQ(t, llmkv_reserve(c, f2, 1), LLMKV_ERR_COPY_QUEUE_FULL);
    TST_EQ(t, llmkv_reserve_many(c, hs + 1, two, 2), LLMKV_ERR_COPY_QUEUE_FULL);
    fs_check(t, c, &sn, "reserve (copy queue full)");
    TST_EQ(t, llmkv_copy_cmds_take(c, cmd, 2, &n), LLMKV_OK);
    TST_EQ(t, n, 1);
    TST_EQ(t, cmd[0].n_slots >= 1 && cmd[0].n_slots <= 4, 1);
    TST_EQ(t, llmkv_reserve(c, f2, 1), LLMKV_OK);
    TST_EQ(t, llmkv_copy_cmds_take(c, cmd, 2, &n), LLMKV_OK);
    TST_EQ(t, n, 1);
    TST_EQ(t, llmkv_cache_check(c, NULL, 0), LLMKV_OK);
    llmkv_cache_destroy(c);
}

/* ------------------------------------------------------------------------ */
/* Argument validation                                                      */
/* ------------------------------------------------------------------------ */

static void test_fault_bad_descriptors(tst* t) {
    falloc a;
    int i;
    f_init(&a);
    for (i = 0; i < 17; ++i) {
        llmkv_desc d = f_desc(4, LLMKV_STORAGE_DEFAULT);
        llmkv_cache* c = NULL;
        llmkv_layout l;
        size_t size = 0;
        int shape = 1; /* the geometry itself is bad (layout_for fails too) */
        d.allocator = f_allocator(&a);
        switch (i) {
        case 0: d.n_layers = 0; break;
        case 1: d.n_layers = 65537; break;
        case 2: d.n_kv_heads = 0; break;
        case 3: d.n_kv_heads = 65537; break;
        case 4: d.head_dim = 0; break;
        case 5: d.head_dim = 513; break;
        case 6: d.page_size = 1025; break;
        case 7: d.k_dtype = (llmkv_dtype)99; break;
        case 8: d.v_dtype = (llmkv_dtype)99; break;
        case 9: d.storage = (llmkv_storage)2; break;
        case 10: d.max_seqs = 1048576; break;
        case 11: d.allocator.free = NULL; break;
        case 12: d.allocator.alloc = NULL; break;
        case 13: d.n_pages = 0; shape = 0; break; /* no capacity */
        case 14: d.head_dim = 0xFFFFFFFFu; break;
        case 15: d.page_size = 0xFFFFFFFFu; break;
        default: d.n_layers = 0xFFFFFFFFu; break;
        }
        TST_EQ(t, llmkv_cache_create(&d, &c), LLMKV_ERR_INVALID_ARGUMENT);
        if (c) llmkv_cache_destroy(c);
        c = NULL;
        if (shape) {
            TST_EQ(t, llmkv_layout_for(&d, &l), LLMKV_ERR_INVALID_ARGUMENT);
            TST_EQ(t, llmkv_cache_memory_size(&d, &size, NULL), LLMKV_ERR_INVALID_ARGUMENT);
        }
        if (a.n_blocks) fprintf(stderr, "  bad descriptor %d left memory allocated\n", i);
        TST_EQ(t, a.n_blocks, 0);
    }
    TST_EQ(t, a.errors, 0);
    f_done(&a);

    { /* max_seq_len past n_pages * page_size ("at most" that): refused, or
         held to it */
        llmkv_desc d = f_desc(4, LLMKV_STORAGE_DEFAULT), eff;
        llmkv_cache* c = NULL;
        llmkv_result r;
        d.max_seq_len = 4 * 4 + 1;
        r = llmkv_cache_create(&d, &c);
        TST_CHECK(t, r == LLMKV_OK || r == LLMKV_ERR_INVALID_ARGUMENT);
        if (r == LLMKV_OK && c) {
            llmkv_seq s;
            TST_EQ(t, llmkv_cache_desc(c, &eff), LLMKV_OK);
            TST_EQ(t, eff.max_seq_len, 16);
            TST_EQ(t, llmkv_seq_create(c, &s), LLMKV_OK);
            TST_EQ(t, llmkv_reserve(c, s, 16), LLMKV_OK);
            r = llmkv_reserve(c, s, 1);
            TST_CHECK(t, r == LLMKV_ERR_SEQUENCE_TOO_LONG || r == LLMKV_ERR_OUT_OF_PAGES);
            llmkv_cache_destroy(c);
        }
    }

    { /* the edges of each range are valid */
        llmkv_desc d = f_desc(1, LLMKV_STORAGE_DEFAULT);
        llmkv_cache* c = NULL;
        d.n_layers = 1;
        d.n_kv_heads = 1;
        d.head_dim = 512;
        d.page_size = 1024;
        d.k_dtype = LLMKV_DTYPE_BF16;
        TST_EQ(t, llmkv_cache_create(&d, &c), LLMKV_OK);
        llmkv_cache_destroy(c);
        d = f_desc(1, LLMKV_STORAGE_METADATA_ONLY);
        d.n_layers = 65536;
        d.n_kv_heads = 65536;
        d.head_dim = 1;
        d.page_size = 1;
        d.max_seqs = 1;
        c = NULL;
        TST_EQ(t, llmkv_cache_create(&d, &c), LLMKV_OK);
        llmkv_cache_destroy(c);
    }
    { /* NULL descriptors and outputs */
        llmkv_desc d = f_desc(4, LLMKV_STORAGE_DEFAULT);
        llmkv_cache* c = NULL;
        llmkv_layout l;
        size_t size;
        unsigned char mem[64];
        TST_EQ(t, llmkv_cache_create(NULL, &c), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_cache_create(&d, NULL), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_layout_for(NULL, &l), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_layout_for(&d, NULL), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_cache_memory_size(NULL, &size, NULL), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_cache_memory_size(&d, NULL, NULL), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_cache_create_in(NULL, mem, sizeof mem, &c), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_cache_create_in(&d, NULL, 1 << 20, &c), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_cache_create_in(&d, mem, sizeof mem, NULL), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_cache_create_in(&d, mem, sizeof mem, &c), LLMKV_ERR_BUFFER_TOO_SMALL);
        llmkv_cache_destroy(NULL);
        llmkv_batch_destroy(NULL);
    }
}

/* Every call on `c` with bad arguments: the documented code, no change. */
static void test_fault_bad_arguments(tst* t) {
    llmkv_desc d = f_desc(16, LLMKV_STORAGE_DEFAULT), eff;
    llmkv_cache* c = NULL;
    llmkv_batch* b = NULL;
    llmkv_seq s1, s2, gone, zero, x, hs[3];
    llmkv_layout l;
    llmkv_stats st;
    llmkv_batch_info info;
    llmkv_copy_cmd cmd[2];
    uint32_t n = 0, pages[8], ns[2] = {1, 1}, q[2] = {1, 1};
    uint64_t u64 = 0;
    void* base = NULL;
    float buf[4 * 2 * 8 * 2];
    fsnap sn;
    memset(buf, 0, sizeof buf);
    TST_EQ(t, llmkv_cache_create(&d, &c), LLMKV_OK);
    if (!c) return;
    TST_EQ(t, llmkv_batch_create(c, 2, 8, &b), LLMKV_OK);
    TST_EQ(t, llmkv_seq_create(c, &s1), LLMKV_OK);
    TST_EQ(t, llmkv_seq_create(c, &s2), LLMKV_OK);
    TST_EQ(t, llmkv_seq_create(c, &gone), LLMKV_OK);
    TST_EQ(t, llmkv_seq_free(c, gone), LLMKV_OK);
    TST_EQ(t, llmkv_reserve(c, s1, 5), LLMKV_OK);
    f_put(t, c, s1, 5, 3);
    TST_EQ(t, llmkv_reserve(c, s2, 2), LLMKV_OK);
    f_put(t, c, s2, 2, 4);
    zero.id = 0;
    hs[0] = s1;
    hs[1] = s2;
    fs_take(c, hs, 2, &sn);

    /* NULL cache */
    TST_EQ(t, llmkv_cache_desc(NULL, &eff), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_cache_layout(NULL, &l), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_cache_pool(NULL, &base, &u64), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_seq_create(NULL, &x), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_seq_free(NULL, s1), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_seq_length(NULL, s1, &n), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_seq_pages(NULL, s1, pages, 8, &n), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_reserve(NULL, s1, 1), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_reserve_many(NULL, hs, ns, 2), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_put(NULL, s1, 0, 1, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_gather(NULL, s1, 0, 0, 1, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_fork(NULL, s1, &x), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_truncate(NULL, s1, 0), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_copy_cmds_take(NULL, cmd, 2, &n), LLMKV_ERR_INVALID_ARGUMENT);
    {
        llmkv_batch* nb = NULL;
        TST_EQ(t, llmkv_batch_create(NULL, 1, 1, &nb), LLMKV_ERR_INVALID_ARGUMENT);
    }
    TST_EQ(t, llmkv_cache_stats(NULL, &st), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_cache_check(NULL, NULL, 0), LLMKV_ERR_INVALID_ARGUMENT);

    /* NULL outputs and arrays */
    TST_EQ(t, llmkv_cache_desc(c, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_cache_layout(c, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_seq_create(c, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_seq_length(c, s1, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_seq_pages(c, s1, pages, 8, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_seq_pages(c, s1, NULL, 8, &n), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_reserve_many(c, NULL, ns, 2), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_reserve_many(c, hs, NULL, 2), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_fork(c, s1, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_copy_cmds_take(c, cmd, 2, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_copy_cmds_take(c, NULL, 2, &n), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_cache_stats(c, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_batch_create(c, 1, 1, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_batch_build(NULL, hs, q, 1), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_batch_build(b, NULL, q, 1), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_batch_build(b, hs, NULL, 1), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_batch_check(NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_batch_get(NULL, &info), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_batch_get(b, NULL), LLMKV_ERR_INVALID_ARGUMENT);

    /* freed, zero and never-issued handles */
    {
        llmkv_seq bad[2];
        int i;
        bad[0] = gone;
        bad[1] = zero;
        for (i = 0; i < 2; ++i) {
            llmkv_seq h = bad[i];
            llmkv_seq two[2];
            two[0] = s1;
            two[1] = h;
            TST_EQ(t, llmkv_seq_free(c, h), LLMKV_ERR_STALE_HANDLE);
            TST_EQ(t, llmkv_seq_length(c, h, &n), LLMKV_ERR_STALE_HANDLE);
            TST_EQ(t, llmkv_seq_pages(c, h, pages, 8, &n), LLMKV_ERR_STALE_HANDLE);
            TST_EQ(t, llmkv_reserve(c, h, 1), LLMKV_ERR_STALE_HANDLE);
            TST_EQ(t, llmkv_reserve_many(c, two, ns, 2), LLMKV_ERR_STALE_HANDLE); /* s1 must not grow */
            TST_EQ(t, llmkv_put(c, h, 0, 1, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_STALE_HANDLE);
            TST_EQ(t, llmkv_gather(c, h, 0, 0, 1, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_STALE_HANDLE);
            TST_EQ(t, llmkv_fork(c, h, &x), LLMKV_ERR_STALE_HANDLE);
            TST_EQ(t, llmkv_truncate(c, h, 0), LLMKV_ERR_STALE_HANDLE);
            TST_EQ(t, llmkv_batch_build(b, two, q, 2), LLMKV_ERR_STALE_HANDLE);
            memset(&info, 0x5A, sizeof info);
            TST_EQ(t, llmkv_batch_get(b, &info), LLMKV_OK);
            TST_EQ(t, info.n_seqs, 0); /* left empty */
        }
        /* ids one bit away from live ones */
        for (i = 0; i < 32; ++i) {
            llmkv_seq h;
            h.id = s1.id ^ ((uint32_t)1 << i);
            if (h.id == s2.id) continue;
            if (llmkv_seq_length(c, h, &n) != LLMKV_ERR_STALE_HANDLE) {
                fprintf(stderr, "  forged handle %#x (from %#x) accepted\n", h.id, s1.id);
                TST_CHECK(t, 0);
            }
        }
    }

    /* out of range */
    TST_EQ(t, llmkv_cache_desc(c, &eff), LLMKV_OK);
    TST_EQ(t, llmkv_put(c, s1, eff.n_layers, 1, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_put(c, s1, 0xFFFFFFFFu, 1, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_put(c, s2, 0, 3, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE); /* length 2 */
    TST_EQ(t, llmkv_gather(c, s1, eff.n_layers, 0, 1, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_gather(c, s1, 0, 4, 2, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE); /* 6 > 5 */
    TST_EQ(t, llmkv_gather(c, s1, 0, 6, 0, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_gather(c, s1, 0, 0xFFFFFFFFu, 2, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_gather(c, s1, 0, 1, 0xFFFFFFFFu, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_truncate(c, s1, 6), LLMKV_ERR_OUT_OF_RANGE);
    q[0] = 6;
    TST_EQ(t, llmkv_batch_build(b, hs, q, 1), LLMKV_ERR_OUT_OF_RANGE);
    q[0] = 1;
    { /* lengths that wrap 32 bits: too long, and too many pages (either) */
        llmkv_result r = llmkv_reserve(c, s1, 0xFFFFFFFFu);
        TST_CHECK(t, r == LLMKV_ERR_SEQUENCE_TOO_LONG || r == LLMKV_ERR_OUT_OF_PAGES);
        ns[0] = 1;
        ns[1] = 0xFFFFFFFFu - 1;
        r = llmkv_reserve_many(c, hs, ns, 2);
        TST_CHECK(t, r == LLMKV_ERR_SEQUENCE_TOO_LONG || r == LLMKV_ERR_OUT_OF_PAGES);
        ns[1] = 1;
    }

    /* bad types, short strides, duplicates */
    TST_EQ(t, llmkv_put(c, s1, 0, 1, buf, 0, buf, 0, (llmkv_dtype)9), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_gather(c, s1, 0, 0, 1, buf, 0, buf, 0, (llmkv_dtype)9), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_put(c, s1, 0, 2, buf, 4, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_BUFFER_TOO_SMALL);
    TST_EQ(t, llmkv_put(c, s1, 0, 2, buf, 0, buf, 2 * 8 * 4 - 4, LLMKV_DTYPE_F32), LLMKV_ERR_BUFFER_TOO_SMALL);
    TST_EQ(t, llmkv_gather(c, s1, 0, 0, 2, buf, 8, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_BUFFER_TOO_SMALL);
    hs[1] = s1;
    TST_EQ(t, llmkv_reserve_many(c, hs, ns, 2), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_batch_build(b, hs, q, 2), LLMKV_ERR_INVALID_ARGUMENT);
    hs[1] = s2;
    TST_EQ(t, llmkv_seq_pages(c, s1, pages, 1, &n), LLMKV_ERR_BUFFER_TOO_SMALL);
    TST_EQ(t, n, 2); /* the length, still */

    fs_check(t, c, &sn, "call with bad arguments");

    /* a slot reused by a new sequence: the old handle stays stale */
    {
        llmkv_desc d1 = f_desc(4, LLMKV_STORAGE_DEFAULT);
        llmkv_cache* c1 = NULL;
        llmkv_seq old, cur;
        int i;
        d1.max_seqs = 1;
        TST_EQ(t, llmkv_cache_create(&d1, &c1), LLMKV_OK);
        if (c1) {
            TST_EQ(t, llmkv_seq_create(c1, &old), LLMKV_OK);
            for (i = 0; i < 100; ++i) { /* many generations of one slot */
                TST_EQ(t, llmkv_seq_free(c1, old), LLMKV_OK);
                TST_EQ(t, llmkv_seq_create(c1, &cur), LLMKV_OK);
                TST_CHECK(t, cur.id != old.id);
                TST_EQ(t, llmkv_seq_length(c1, old, &n), LLMKV_ERR_STALE_HANDLE);
                TST_EQ(t, llmkv_reserve(c1, old, 1), LLMKV_ERR_STALE_HANDLE);
                TST_EQ(t, llmkv_seq_free(c1, old), LLMKV_ERR_STALE_HANDLE);
                TST_EQ(t, llmkv_seq_length(c1, cur, &n), LLMKV_OK);
                old = cur;
            }
            TST_EQ(t, llmkv_cache_check(c1, NULL, 0), LLMKV_OK);
            llmkv_cache_destroy(c1);
        }
    }

    /* metadata-only: data calls answer NO_PAGE_DATA, changing nothing */
    {
        llmkv_desc dm = f_desc(4, LLMKV_STORAGE_METADATA_ONLY);
        llmkv_cache* cm = NULL;
        llmkv_seq sm;
        TST_EQ(t, llmkv_cache_create(&dm, &cm), LLMKV_OK);
        if (cm) {
            TST_EQ(t, llmkv_cache_pool(cm, &base, &u64), LLMKV_OK);
            TST_CHECK(t, base == NULL);
            TST_EQ(t, llmkv_seq_create(cm, &sm), LLMKV_OK);
            TST_EQ(t, llmkv_reserve(cm, sm, 2), LLMKV_OK);
            fs_take(cm, &sm, 1, &sn);
            TST_EQ(t, llmkv_put(cm, sm, 0, 2, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_NO_PAGE_DATA);
            TST_EQ(t, llmkv_gather(cm, sm, 0, 0, 2, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_NO_PAGE_DATA);
            fs_check(t, cm, &sn, "put/gather on a metadata-only cache");
            llmkv_cache_destroy(cm);
        }
    }

    /* the rest of the surface */
    TST_EQ(t, llmkv_plan_bytes(NULL, 1, &u64), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_plan_bytes(&d, 1, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_plan_tokens(NULL, 1, &u64), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_plan_tokens(&d, 1, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_cache_layout(c, &l), LLMKV_OK);
    TST_EQ(t, llmkv_plan_bytes(&d, 9, &u64), LLMKV_OK);
    TST_EQ(t, u64, 3 * l.page_bytes);
    TST_EQ(t, llmkv_plan_tokens(&d, 3 * l.page_bytes - 1, &u64), LLMKV_OK);
    TST_EQ(t, u64, 2 * 4);
    {
        llmkv_desc dp = d, before;
        TST_EQ(t, llmkv_desc_from_preset(NULL, "llama-3-8b"), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_desc_from_preset(&dp, NULL), LLMKV_ERR_INVALID_ARGUMENT);
        before = dp;
        TST_EQ(t, llmkv_desc_from_preset(&dp, "no-such-model"), LLMKV_ERR_INVALID_ARGUMENT);
        TST_CHECK(t, dp.n_layers == before.n_layers && dp.n_kv_heads == before.n_kv_heads &&
                         dp.head_dim == before.head_dim && dp.n_pages == before.n_pages);
        TST_CHECK(t, llmkv_model_preset_find(NULL) == NULL);
        TST_CHECK(t, llmkv_model_preset_find("no-such-model") == NULL);
    }
    {
        static const int codes[] = {0, -1, -2, -3, -4, -5, -20, -21, -22, -23, -24, -25, -40, -41, -42, -100,
                                    -6, -99, 1, 12345};
        unsigned i;
        for (i = 0; i < sizeof codes / sizeof codes[0]; ++i) {
            const char* s = llmkv_result_string((llmkv_result)codes[i]);
            TST_CHECK(t, s != NULL && s[0] != 0);
        }
        TST_CHECK(t, strcmp(llmkv_version(), LLMKV_VERSION_STRING) == 0);
        TST_EQ(t, llmkv_dtype_size((llmkv_dtype)99), 0);
        TST_CHECK(t, strcmp(llmkv_dtype_name((llmkv_dtype)99), "?") == 0);
    }
    TST_EQ(t, llmkv_seq_free(c, s1), LLMKV_OK);
    TST_EQ(t, llmkv_seq_free(c, s2), LLMKV_OK);
    TST_EQ(t, llmkv_cache_check(c, NULL, 0), LLMKV_OK);
    llmkv_batch_destroy(b);
    llmkv_cache_destroy(c);
}

void suite_fault(tst* t) {
    TST_RUN(t, test_fault_cache_create_oom);
    TST_RUN(t, test_fault_batch_create_oom);
    TST_RUN(t, test_fault_create_in);
    TST_RUN(t, test_fault_capacity_unchanged);
    TST_RUN(t, test_fault_copy_queue_full);
    TST_RUN(t, test_fault_bad_descriptors);
    TST_RUN(t, test_fault_bad_arguments);
}
