/* Randomized model-based test of the cache.

   Thousands of random operations run on an llmkv cache and, side by side,
   on a model written independently here: every sequence is a plain
   contiguous array of the stored K and V bytes of each layer,
   [pos][n_kv_heads][head_dim] (converted to the storage type at put time
   with llmkv_f32_to_f16 / llmkv_f32_to_bf16), with a flag per position
   saying whether it was ever written (reserved slots hold unspecified
   bytes). Capacity needs its own bookkeeping: the model also gives every
   logical page of a sequence an abstract identity with a reference count
   (fork shares identities, copy-on-write gives a fresh one), which predicts
   exactly when a call must fail with a capacity error and which pages two
   sequences must share. The library's real page ids must map one-to-one
   onto these identities.

   After every operation: llmkv_cache_check, the statistics, every
   sequence's length and page table, the batch staleness rule and, for
   metadata-only caches, the shadow device pool (written through the batch
   slot mapping, copied by the manager's copy commands) against the model.
   A failing call must leave the model and the cache unchanged.

   LLMKV_TEST_SCALE (default 1.0) scales the number of operations;
   LLMKV_TEST_SEED=n (default 0) is mixed into every configuration's fixed
   seed, to explore further; LLMKV_TEST_TRACE=1 prints every operation. */
#include <stdarg.h>

#include "test_util.h"
#include "../llmkv.h"

#define M_MAX_SEQS 12
#define M_NONE 0xFFFFFFFFu

/* ------------------------------------------------------------------------ */
/* Failure reporting                                                        */
/* ------------------------------------------------------------------------ */

typedef struct mctx {
    tst* t;
    char cfg[256];         /* configuration and seed, printed on failure */
    unsigned op;           /* index of the running operation */
    char log[10][160];     /* the latest operations, oldest overwritten */
    unsigned n_log;
    int fails;             /* failed checks in this configuration */
    int trace;             /* LLMKV_TEST_TRACE set: print every operation */
} mctx;

static void m_fail(mctx* x, int line, const char* what) {
    x->t->cur_failures++;
    if (x->fails == 0) {
        unsigned i, first = x->n_log > 10 ? x->n_log - 10 : 0;
        fprintf(stderr, "  model test failure, config: %s\n", x->cfg);
        fprintf(stderr, "  at operation #%u; latest operations (oldest first):\n", x->op);
        for (i = first; i < x->n_log; ++i) fprintf(stderr, "    %s\n", x->log[i % 10]);
    }
    if (x->fails < 12) fprintf(stderr, "  FAIL %s:%d: %s\n", __FILE__, line, what);
    x->fails++;
}

static void m_log(mctx* x, const char* fmt, ...) {
    va_list ap;
    char* line = x->log[x->n_log % 10];
    int k = snprintf(line, sizeof x->log[0], "#%u ", x->op);
    va_start(ap, fmt);
    if (k > 0 && (size_t)k < sizeof x->log[0]) vsnprintf(line + k, sizeof x->log[0] - (size_t)k, fmt, ap);
    va_end(ap);
    if (x->trace) fprintf(stderr, "%s\n", line);
    x->n_log++;
}

#define MCHK(m, cond)                                                            \
    do {                                                                         \
        if (!(cond)) m_fail(&(m)->x, __LINE__, #cond);                           \
    } while (0)

#define MEQ(m, a, b)                                                             \
    do {                                                                         \
        long long ma_ = (long long)(a), mb_ = (long long)(b);                    \
        if (ma_ != mb_) {                                                        \
            char mbuf_[320];                                                     \
            snprintf(mbuf_, sizeof mbuf_, "%s == %s (%lld vs %lld)", #a, #b,     \
                     ma_, mb_);                                                  \
            m_fail(&(m)->x, __LINE__, mbuf_);                                    \
        }                                                                        \
    } while (0)

/* ------------------------------------------------------------------------ */
/* Element types (independent of the library except for the documented      */
/* scalar conversions)                                                      */
/* ------------------------------------------------------------------------ */

/* Bytes of one element of a resolved type (F32, F16, BF16). */
static uint32_t m_size(llmkv_dtype t) { return t == LLMKV_DTYPE_F32 ? 4u : 2u; }

static void m_enc(llmkv_dtype t, float f, unsigned char* p) {
    uint16_t h;
    if (t == LLMKV_DTYPE_F32) {
        memcpy(p, &f, 4);
        return;
    }
    h = t == LLMKV_DTYPE_BF16 ? llmkv_f32_to_bf16(f) : llmkv_f32_to_f16(f);
    memcpy(p, &h, 2);
}

static float m_dec(llmkv_dtype t, const unsigned char* p) {
    float f;
    uint16_t h;
    if (t == LLMKV_DTYPE_F32) {
        memcpy(&f, p, 4);
        return f;
    }
    memcpy(&h, p, 2);
    return t == LLMKV_DTYPE_BF16 ? llmkv_bf16_to_f32(h) : llmkv_f16_to_f32(h);
}

static const char* m_tname(llmkv_dtype t) {
    switch (t) {
    case LLMKV_DTYPE_DEFAULT: return "default";
    case LLMKV_DTYPE_F32: return "f32";
    case LLMKV_DTYPE_F16: return "f16";
    case LLMKV_DTYPE_BF16: return "bf16";
    case LLMKV_DTYPE_Q8: return "q8";
    case LLMKV_DTYPE_Q4: return "q4";
    case LLMKV_DTYPE_FP8: return "fp8";
    case LLMKV_DTYPE_Q4C: return "q4c";
    }
    return "?";
}

static void* m_xrealloc(void* p, size_t n) {
    void* q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "test_model: out of memory\n");
        exit(2);
    }
    return q;
}

/* ------------------------------------------------------------------------ */
/* The model                                                                */
/* ------------------------------------------------------------------------ */

typedef struct mseq {
    llmkv_seq h;
    uint32_t len, cap;
    unsigned char* data[2];   /* K, V: [cap][n_layers][row bytes] as stored */
    unsigned char* written;   /* [cap][n_layers]: bit 0 K, bit 1 V */
    uint32_t* page;           /* model page identity of each logical page */
    uint32_t page_cap;
} mseq;

typedef struct mcfg {
    uint32_t n_layers, n_kv_heads, head_dim, page_size, n_pages;
    uint32_t max_seqs, max_seq_len, max_pending;   /* 0: default */
    llmkv_dtype k_dtype, v_dtype;
    int metadata, lazy;       /* metadata-only; take copy commands late */
    uint32_t max_reserve;     /* largest single reserve */
    unsigned n_ops;
    unsigned long long seed;
} mcfg;

typedef struct model {
    mctx x;
    tst_rng rng;
    mcfg cfg;
    llmkv_cache* c;
    llmkv_layout lay;
    uint32_t L, H, D, ps, n_pages, max_seqs, max_len, max_pending;
    llmkv_dtype st[2];        /* storage types, resolved */
    uint32_t esz[2];
    size_t row[2];            /* bytes of one position of one layer */
    mseq s[M_MAX_SEQS];
    uint32_t n;               /* live sequences */
    uint32_t* ref;            /* [n_pages] references of each identity */
    uint32_t used;            /* identities with ref > 0 */
    uint32_t pending;         /* metadata-only: commands queued, not taken */
    unsigned char* shadow;    /* metadata-only: the device pool */
    uint64_t pool_bytes;
    /* Batch under staleness watch: 0 none/empty, 1 must be valid, 2 must
       be stale, 3 unknown (after an operation the header leaves open). */
    llmkv_batch* b;
    int b_state;
    llmkv_seq b_seqs[M_MAX_SEQS];
    uint32_t b_q[M_MAX_SEQS];
    uint32_t b_n;
    llmkv_batch* wb;          /* metadata-only writes */
    uint32_t wb_max_tokens;
    llmkv_batch* bsmall;      /* 2 sequences, 3 tokens */
    llmkv_seq freed[8];       /* recently freed handles */
    uint32_t n_freed;
    /* scratch */
    unsigned char* buf[4];
    size_t buf_cap[4];
    uint32_t* tmp;            /* [n_pages + 1] */
    uint32_t* map_m2r;        /* [n_pages] */
    uint32_t* map_r2m;
    uint32_t* fill;
    uint32_t* snap_pages;     /* [M_MAX_SEQS][n_pages + 1] */
} model;

static unsigned char* m_buf(model* m, int i, size_t bytes) {
    if (m->buf_cap[i] < bytes) {
        m->buf[i] = (unsigned char*)m_xrealloc(m->buf[i], bytes);
        m->buf_cap[i] = bytes;
    }
    return m->buf[i];
}

static uint32_t m_below(model* m, uint32_t n) { return n ? tst_below(&m->rng, n) : 0; }

static uint32_t m_npages(const model* m, uint32_t len) {
    return (uint32_t)(((uint64_t)len + m->ps - 1) / m->ps);
}

static uint32_t m_free_pages(const model* m) { return m->n_pages - m->used; }

static uint32_t mp_new(model* m) {
    uint32_t p;
    for (p = 0; p < m->n_pages; ++p)
        if (m->ref[p] == 0) {
            m->ref[p] = 1;
            m->used++;
            return p;
        }
    m_fail(&m->x, __LINE__, "model ran out of page identities (test bug)");
    return 0;
}

static void mp_unref(model* m, uint32_t p) {
    if (--m->ref[p] == 0) m->used--;
}

static void ms_grow(model* m, mseq* s, uint32_t len) {
    uint32_t np = m_npages(m, len);
    if (len > s->cap) {
        uint32_t nc = s->cap ? s->cap : 16;
        int part;
        while (nc < len) nc *= 2;
        for (part = 0; part < 2; ++part)
            s->data[part] = (unsigned char*)m_xrealloc(s->data[part], (size_t)nc * m->L * m->row[part]);
        s->written = (unsigned char*)m_xrealloc(s->written, (size_t)nc * m->L);
        s->cap = nc;
    }
    if (np > s->page_cap) {
        uint32_t nc = s->page_cap ? s->page_cap : 4;
        while (nc < np) nc *= 2;
        s->page = (uint32_t*)m_xrealloc(s->page, (size_t)nc * sizeof(uint32_t));
        s->page_cap = nc;
    }
}

static unsigned char* ms_elem(const model* m, const mseq* s, int part, uint32_t pos, uint32_t layer) {
    return s->data[part] + ((size_t)pos * m->L + layer) * m->row[part];
}

static void ms_release(mseq* s) {
    free(s->data[0]);
    free(s->data[1]);
    free(s->written);
    free(s->page);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------------------------ */
/* Batch staleness bookkeeping                                              */
/* ------------------------------------------------------------------------ */

static int m_named(const model* m, llmkv_seq h) {
    uint32_t i;
    for (i = 0; i < m->b_n; ++i)
        if (m->b_seqs[i].id == h.id) return 1;
    return 0;
}

/* An operation that the header says changes the sequence (reserve, put's
   copy-on-write, fork, truncate, free). */
static void m_changed(model* m, llmkv_seq h) {
    if ((m->b_state == 1 || m->b_state == 3) && m_named(m, h)) m->b_state = 2;
}

/* An operation whose effect on staleness the header leaves open (a reserve
   of 0 tokens, a truncate to the same length). */
static void m_ambiguous(model* m, llmkv_seq h) {
    if (m->b_state == 1 && m_named(m, h)) m->b_state = 3;
}

/* ------------------------------------------------------------------------ */
/* Checks against the model                                                 */
/* ------------------------------------------------------------------------ */

/* Every sequence's length and page table, and the one-to-one map between
   the library's page ids and the model's identities. */
static void m_check_tables(model* m) {
    uint32_t i, j;
    for (i = 0; i < m->n_pages; ++i) m->map_m2r[i] = m->map_r2m[i] = M_NONE;
    for (i = 0; i < m->n; ++i) {
        mseq* s = &m->s[i];
        uint32_t len = M_NONE, np = M_NONE;
        llmkv_result r = llmkv_seq_length(m->c, s->h, &len);
        MEQ(m, r, LLMKV_OK);
        MEQ(m, len, s->len);
        r = llmkv_seq_pages(m->c, s->h, m->tmp, m->n_pages + 1, &np);
        MEQ(m, r, LLMKV_OK);
        MEQ(m, np, m_npages(m, s->len));
        if (r != LLMKV_OK || np != m_npages(m, s->len)) continue;
        for (j = 0; j < np; ++j) {
            uint32_t real = m->tmp[j], mp = s->page[j];
            MCHK(m, real < m->n_pages);
            if (real >= m->n_pages) return;
            if (m->map_m2r[mp] == M_NONE && m->map_r2m[real] == M_NONE) {
                m->map_m2r[mp] = real;
                m->map_r2m[real] = mp;
            } else {
                /* same identity must be the same page, and vice versa */
                MEQ(m, m->map_m2r[mp], real);
                MEQ(m, m->map_r2m[real], mp);
            }
        }
    }
}

static void m_check_stats(model* m) {
    llmkv_stats st;
    uint32_t i, j, shared = 0;
    uint64_t tokens = 0, slots = 0, upper = 0;
    llmkv_result r;
    memset(&st, 0xEE, sizeof st);
    r = llmkv_cache_stats(m->c, &st);
    MEQ(m, r, LLMKV_OK);
    for (i = 0; i < m->n_pages; ++i) m->fill[i] = 0;
    for (i = 0; i < m->n; ++i) {
        const mseq* s = &m->s[i];
        tokens += s->len;
        upper += m_npages(m, s->len);
        for (j = 0; j < m_npages(m, s->len); ++j) {
            uint32_t f = s->len - j * m->ps;
            if (f > m->ps) f = m->ps;
            if (f > m->fill[s->page[j]]) m->fill[s->page[j]] = f;
        }
    }
    for (i = 0; i < m->n_pages; ++i) {
        slots += m->fill[i];
        if (m->ref[i] > 1) shared++;
    }
    MEQ(m, st.n_pages_total, m->n_pages);
    MEQ(m, st.n_pages_used + st.n_pages_free, st.n_pages_total);
    MCHK(m, st.n_pages_used <= upper); /* sharing can only reduce it */
    MEQ(m, st.n_pages_used, m->used);
    MEQ(m, st.n_pages_free, m->n_pages - m->used);
    MEQ(m, st.n_pages_shared, shared);
    MEQ(m, st.n_seqs, m->n);
    MEQ(m, st.n_pending_copies, m->pending);
    MEQ(m, st.page_bytes, m->lay.page_bytes);
    MEQ(m, st.pool_bytes, (uint64_t)m->n_pages * m->lay.page_bytes);
    MEQ(m, st.used_bytes, (uint64_t)m->used * m->lay.page_bytes);
    MEQ(m, st.n_tokens, tokens);
    MEQ(m, st.n_slots_used, slots);
    MEQ(m, st.n_slots_unused, (uint64_t)m->used * m->ps - slots);
}

/* Where the vector (page, layer, part, head, slot) sits in a pool. */
static uint64_t m_vec_off(const model* m, uint32_t page, uint32_t layer, int part, uint32_t head,
                          uint32_t slot) {
    const llmkv_part_layout* pl = part ? &m->lay.v : &m->lay.k;
    return (uint64_t)page * m->lay.page_bytes + (uint64_t)layer * m->lay.layer_stride + pl->offset +
           (uint64_t)head * pl->head_stride + (uint64_t)slot * pl->slot_stride;
}

/* Every written vector of every sequence, read from `pool` through the
   library's page tables and the reported layout. */
static void m_check_pool(model* m, const unsigned char* pool) {
    uint32_t i, pos, layer, head;
    int part;
    for (i = 0; i < m->n; ++i) {
        const mseq* s = &m->s[i];
        uint32_t np = 0;
        if (llmkv_seq_pages(m->c, s->h, m->tmp, m->n_pages + 1, &np) != LLMKV_OK) {
            m_fail(&m->x, __LINE__, "llmkv_seq_pages failed");
            return;
        }
        for (pos = 0; pos < s->len; ++pos)
            for (layer = 0; layer < m->L; ++layer)
                for (part = 0; part < 2; ++part) {
                    size_t vb = (size_t)m->D * m->esz[part];
                    if (!(s->written[(size_t)pos * m->L + layer] & (1 << part))) continue;
                    for (head = 0; head < m->H; ++head) {
                        uint64_t off = m_vec_off(m, m->tmp[pos / m->ps], layer, part, head, pos % m->ps);
                        const unsigned char* want = ms_elem(m, s, part, pos, layer) + head * vb;
                        if (off + vb > m->pool_bytes || memcmp(pool + off, want, vb) != 0) {
                            char msg[200];
                            snprintf(msg, sizeof msg,
                                     "pool bytes differ from the model: seq %u pos %u layer %u %s head %u",
                                     i, pos, layer, part ? "V" : "K", head);
                            m_fail(&m->x, __LINE__, msg);
                            return;
                        }
                    }
                }
    }
}

/* llmkv_gather of [pos, pos + n) of one layer into dst_dtype, compared
   byte for byte with the model; row padding and the bytes after the last
   row must stay untouched. parts: 1 K, 2 V, 3 both. */
static void m_gather_check(model* m, uint32_t idx, uint32_t layer, uint32_t pos, uint32_t n,
                           llmkv_dtype dd, int parts, int padded) {
    const mseq* s = &m->s[idx];
    unsigned char* out[2];
    size_t rowb[2], stride[2], eff[2], total[2];
    uint32_t osz[2], j, e, ne = m->H * m->D;
    int part;
    llmkv_result r;
    for (part = 0; part < 2; ++part) {
        osz[part] = dd == LLMKV_DTYPE_DEFAULT ? m->esz[part] : m_size(dd);
        rowb[part] = (size_t)ne * osz[part];
        stride[part] = padded ? rowb[part] + 4u * (1u + m_below(m, 3)) : 0;
        eff[part] = stride[part] ? stride[part] : rowb[part];
        total[part] = (size_t)n * eff[part] + 32;
        out[part] = m_buf(m, part, total[part]);
        memset(out[part], 0xA5, total[part]);
    }
    r = llmkv_gather(m->c, s->h, layer, pos, n, (parts & 1) ? out[0] : NULL, stride[0],
                     (parts & 2) ? out[1] : NULL, stride[1], dd);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) return;
    for (part = 0; part < 2; ++part) {
        if (!(parts & (1 << part))) continue;
        for (j = 0; j < n; ++j) {
            const unsigned char* got = out[part] + (size_t)j * eff[part];
            const unsigned char* have = ms_elem(m, s, part, pos + j, layer);
            size_t b;
            if (s->written[(size_t)(pos + j) * m->L + layer] & (1 << part)) {
                for (e = 0; e < ne; ++e) {
                    unsigned char want[4];
                    const unsigned char* src = have + (size_t)e * m->esz[part];
                    if (dd == LLMKV_DTYPE_DEFAULT || dd == m->st[part])
                        memcpy(want, src, osz[part]);
                    else
                        m_enc(dd, m_dec(m->st[part], src), want);
                    if (memcmp(got + (size_t)e * osz[part], want, osz[part]) != 0) {
                        char msg[240];
                        snprintf(msg, sizeof msg,
                                 "gather %s seq %u layer %u pos %u (of [%u,+%u)) elem %u as %s differs "
                                 "from the model",
                                 part ? "V" : "K", idx, layer, pos + j, pos, n, e, m_tname(dd));
                        m_fail(&m->x, __LINE__, msg);
                        return;
                    }
                }
            }
            for (b = rowb[part]; b < eff[part]; ++b)
                if (got[b] != 0xA5) {
                    m_fail(&m->x, __LINE__, "gather wrote into the padding between rows");
                    return;
                }
        }
        for (j = 0; j < 32; ++j)
            if (out[part][(size_t)n * eff[part] + j] != 0xA5) {
                m_fail(&m->x, __LINE__, "gather wrote past the last row");
                return;
            }
    }
}

/* All data of all sequences: gathers of every layer (host), the pool read
   directly through the layout (host), or the shadow pool (metadata-only). */
static void m_check_data(model* m) {
    uint32_t i, layer;
    if (m->cfg.metadata) {
        /* the device view holds once the queued copies have run */
        if (m->pending == 0) m_check_pool(m, m->shadow);
        return;
    }
    for (i = 0; i < m->n && !m->x.fails; ++i)
        for (layer = 0; layer < m->L && m->s[i].len; ++layer)
            m_gather_check(m, i, layer, 0, m->s[i].len, LLMKV_DTYPE_DEFAULT, 3, 0);
    {
        void* base = NULL;
        uint64_t bytes = 0;
        llmkv_result r = llmkv_cache_pool(m->c, &base, &bytes);
        MEQ(m, r, LLMKV_OK);
        MEQ(m, bytes, m->pool_bytes);
        MCHK(m, base != NULL);
        if (base && bytes == m->pool_bytes) m_check_pool(m, (const unsigned char*)base);
    }
}

/* A view of the cache taken before a call that must fail. */
typedef struct msnap {
    llmkv_stats st;
    uint32_t n;
    llmkv_seq h[M_MAX_SEQS];
    uint32_t len[M_MAX_SEQS];
    uint32_t np[M_MAX_SEQS];
} msnap;

static void m_snap(model* m, msnap* sn) {
    uint32_t i;
    memset(sn, 0, sizeof *sn);
    llmkv_cache_stats(m->c, &sn->st);
    sn->n = m->n;
    for (i = 0; i < m->n; ++i) {
        sn->h[i] = m->s[i].h;
        llmkv_seq_length(m->c, m->s[i].h, &sn->len[i]);
        llmkv_seq_pages(m->c, m->s[i].h, m->snap_pages + (size_t)i * (m->n_pages + 1), m->n_pages + 1,
                        &sn->np[i]);
    }
}

static void m_unchanged(model* m, const msnap* sn) {
    llmkv_stats st;
    uint32_t i, j;
    memset(&st, 0, sizeof st);
    llmkv_cache_stats(m->c, &st);
    MEQ(m, st.n_pages_free, sn->st.n_pages_free);
    MEQ(m, st.n_pages_used, sn->st.n_pages_used);
    MEQ(m, st.n_pages_shared, sn->st.n_pages_shared);
    MEQ(m, st.n_seqs, sn->st.n_seqs);
    MEQ(m, st.n_pending_copies, sn->st.n_pending_copies);
    MEQ(m, st.n_tokens, sn->st.n_tokens);
    MEQ(m, st.n_slots_used, sn->st.n_slots_used);
    MEQ(m, st.metadata_bytes, sn->st.metadata_bytes);
    for (i = 0; i < sn->n; ++i) {
        uint32_t len = M_NONE, np = M_NONE;
        const uint32_t* before = m->snap_pages + (size_t)i * (m->n_pages + 1);
        MEQ(m, llmkv_seq_length(m->c, sn->h[i], &len), LLMKV_OK);
        MEQ(m, len, sn->len[i]);
        MEQ(m, llmkv_seq_pages(m->c, sn->h[i], m->tmp, m->n_pages + 1, &np), LLMKV_OK);
        MEQ(m, np, sn->np[i]);
        for (j = 0; j < np && j < sn->np[i]; ++j) MEQ(m, m->tmp[j], before[j]);
    }
    m_check_data(m);
}

/* Result r must be one of the codes in `allowed` (a list ending with 1). */
static int m_result_in(llmkv_result r, const int* allowed) {
    for (; *allowed != 1; ++allowed)
        if ((int)r == *allowed) return 1;
    return 0;
}

static void m_expect(model* m, const char* what, llmkv_result r, const int* allowed) {
    if (!m_result_in(r, allowed)) {
        char msg[300];
        int k = snprintf(msg, sizeof msg, "%s returned %d (%s), expected one of:", what, (int)r,
                         llmkv_result_string(r));
        for (; *allowed != 1 && k > 0 && (size_t)k < sizeof msg; ++allowed)
            k += snprintf(msg + k, sizeof msg - (size_t)k, " %d", *allowed);
        m_fail(&m->x, __LINE__, msg);
    }
}

/* Builds the list of allowed results: OK when no failure is predicted, else
   every predicted failure (the header does not order them). */
static void m_allowed(int* out, int too_long, int no_pages, int queue_full, int too_many) {
    int k = 0;
    if (too_long) out[k++] = LLMKV_ERR_SEQUENCE_TOO_LONG;
    if (no_pages) out[k++] = LLMKV_ERR_OUT_OF_PAGES;
    if (queue_full) out[k++] = LLMKV_ERR_COPY_QUEUE_FULL;
    if (too_many) out[k++] = LLMKV_ERR_TOO_MANY_SEQUENCES;
    if (k == 0) out[k++] = LLMKV_OK;
    out[k] = 1;
}

/* ------------------------------------------------------------------------ */
/* Batches                                                                  */
/* ------------------------------------------------------------------------ */

static int m_index_of(const model* m, llmkv_seq h) {
    uint32_t i;
    for (i = 0; i < m->n; ++i)
        if (m->s[i].h.id == h.id) return (int)i;
    return -1;
}

/* The batch's arrays against the model: lengths, CSR, block table, slot
   mapping and positions; page ids against llmkv_seq_pages (whose sharing
   structure m_check_tables holds against the model). */
static void m_check_batch_info(model* m, const llmkv_batch* b, const llmkv_seq* hs, const uint32_t* q,
                               uint32_t k) {
    llmkv_batch_info in;
    uint32_t i, j, sum = 0;
    llmkv_result r;
    memset(&in, 0, sizeof in);
    r = llmkv_batch_get(b, &in);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) return;
    for (i = 0; i < k; ++i) sum += q[i];
    MEQ(m, in.n_seqs, k);
    MEQ(m, in.n_tokens, sum);
    MEQ(m, in.page_size, m->ps);
    if (in.n_seqs != k || in.n_tokens != sum || k == 0) return;
    MCHK(m, in.qo_indptr && in.seq_lens && in.kv_indptr && in.kv_last_page_len && in.block_table);
    MCHK(m, sum == 0 || (in.slot_mapping && in.positions));
    if (m->x.fails) return;
    MEQ(m, in.qo_indptr[0], 0);
    MEQ(m, in.kv_indptr[0], 0);
    for (i = 0; i < k; ++i) {
        int idx = m_index_of(m, hs[i]);
        const mseq* s;
        uint32_t np = 0, want_np, last;
        if (idx < 0) {
            m_fail(&m->x, __LINE__, "batch names a sequence the model does not hold (test bug)");
            return;
        }
        s = &m->s[idx];
        want_np = m_npages(m, s->len);
        MEQ(m, llmkv_seq_pages(m->c, s->h, m->tmp, m->n_pages + 1, &np), LLMKV_OK);
        MEQ(m, np, want_np);
        MEQ(m, in.qo_indptr[i + 1] - in.qo_indptr[i], q[i]);
        MEQ(m, in.seq_lens[i], s->len);
        MEQ(m, in.kv_indptr[i + 1] - in.kv_indptr[i], want_np);
        last = s->len ? (s->len - 1) % m->ps + 1 : 0;
        MEQ(m, in.kv_last_page_len[i], last);
        MCHK(m, in.block_table_stride >= want_np);
        if (m->x.fails) return;
        for (j = 0; j < want_np; ++j) MEQ(m, in.kv_indices[(uint32_t)in.kv_indptr[i] + j], m->tmp[j]);
        for (j = 0; j < in.block_table_stride; ++j)
            MEQ(m, in.block_table[(size_t)i * in.block_table_stride + j], j < want_np ? m->tmp[j] : 0);
        for (j = 0; j < q[i]; ++j) {
            uint32_t row = (uint32_t)in.qo_indptr[i] + j, pos = s->len - q[i] + j;
            MEQ(m, in.positions[row], pos);
            MEQ(m, in.slot_mapping[row], (int64_t)m->tmp[pos / m->ps] * m->ps + pos % m->ps);
        }
        if (m->x.fails) return;
    }
}

/* The watched batch: valid while nothing it names changed, then stale
   (and staying stale) until rebuilt. */
static void m_check_batch_state(model* m) {
    llmkv_result r;
    if (m->b_state == 1) {
        r = llmkv_batch_check(m->b);
        MEQ(m, r, LLMKV_OK);
        if (r == LLMKV_OK && m_below(m, 4) == 0) m_check_batch_info(m, m->b, m->b_seqs, m->b_q, m->b_n);
    } else if (m->b_state == 2) {
        llmkv_batch_info in;
        r = llmkv_batch_check(m->b);
        MEQ(m, r, LLMKV_ERR_STALE_BATCH);
        memset(&in, 0x5A, sizeof in);
        r = llmkv_batch_get(m->b, &in);
        MEQ(m, r, LLMKV_ERR_STALE_BATCH);
        MCHK(m, in.n_seqs == 0 && in.n_tokens == 0 && in.qo_indptr == NULL && in.kv_indices == NULL &&
                    in.block_table == NULL && in.slot_mapping == NULL && in.positions == NULL);
    }
}

/* ------------------------------------------------------------------------ */
/* Metadata-only: the shadow device pool                                    */
/* ------------------------------------------------------------------------ */

static void m_apply_cmd(model* m, const llmkv_copy_cmd* cmd) {
    uint32_t layer, head;
    int part;
    MCHK(m, cmd->src_page < m->n_pages && cmd->dst_page < m->n_pages && cmd->src_page != cmd->dst_page);
    MCHK(m, cmd->n_slots >= 1 && cmd->n_slots <= m->ps);
    if (m->x.fails) return;
    if (cmd->n_slots == m->ps) {
        memcpy(m->shadow + (size_t)cmd->dst_page * m->lay.page_bytes,
               m->shadow + (size_t)cmd->src_page * m->lay.page_bytes, (size_t)m->lay.page_bytes);
        return;
    }
    for (layer = 0; layer < m->L; ++layer)
        for (part = 0; part < 2; ++part)
            for (head = 0; head < m->H; ++head) {
                const llmkv_part_layout* pl = part ? &m->lay.v : &m->lay.k;
                memcpy(m->shadow + m_vec_off(m, cmd->dst_page, layer, part, head, 0),
                       m->shadow + m_vec_off(m, cmd->src_page, layer, part, head, 0),
                       (size_t)(cmd->n_slots * pl->slot_stride));
            }
}

/* Takes every pending command (in chunks of random size) and executes it
   on the shadow pool in order; a host cache must never queue any. */
static void m_take_cmds(model* m) {
    uint32_t total = 0;
    for (;;) {
        llmkv_copy_cmd cmds[4];
        uint32_t want = 1 + m_below(m, 4), got = M_NONE, i;
        llmkv_result r = llmkv_copy_cmds_take(m->c, cmds, want, &got);
        MEQ(m, r, LLMKV_OK);
        if (r != LLMKV_OK || got > want) {
            MCHK(m, got <= want);
            return;
        }
        if (got == 0) break;
        MCHK(m, m->cfg.metadata);
        if (!m->cfg.metadata) return;
        for (i = 0; i < got; ++i) m_apply_cmd(m, &cmds[i]);
        total += got;
    }
    MEQ(m, total, m->pending);
    m->pending = 0;
}

/* A fresh random value: mostly in [-1, 1), sometimes huge (F16 infinity),
   tiny (F16 subnormals) or large. */
static float m_value(model* m) {
    float f = tst_float(&m->rng);
    switch (m_below(m, 16)) {
    case 0: return f * 70000.0f;
    case 1: return f * 1e-6f;
    case 2: return f * 1000.0f;
    default: return f;
    }
}

/* Metadata-only: write the newest q[i] positions of each sequence into the
   shadow pool through a batch's slot mapping, as a device put kernel would
   (after executing the pending copies, as the header orders). */
static void m_meta_write(model* m, const uint32_t* idx, const uint32_t* q, uint32_t k) {
    llmkv_seq hs[M_MAX_SEQS];
    llmkv_batch_info in;
    uint32_t i, j, layer, head, e, sum = 0;
    llmkv_result r;
    int part;
    m_take_cmds(m);
    for (i = 0; i < k; ++i) {
        hs[i] = m->s[idx[i]].h;
        sum += q[i];
    }
    if (sum > m->wb_max_tokens) {
        m_fail(&m->x, __LINE__, "write batch too small (test bug)");
        return;
    }
    r = llmkv_batch_build(m->wb, hs, q, k);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) return;
    m_check_batch_info(m, m->wb, hs, q, k);
    memset(&in, 0, sizeof in);
    if (m->x.fails || llmkv_batch_get(m->wb, &in) != LLMKV_OK) return;
    for (i = 0; i < k; ++i) {
        mseq* s = &m->s[idx[i]];
        for (j = 0; j < q[i]; ++j) {
            uint32_t row = (uint32_t)in.qo_indptr[i] + j, pos = s->len - q[i] + j;
            int64_t slot = in.slot_mapping[row];
            uint32_t page = (uint32_t)(slot / m->ps), sl = (uint32_t)(slot % m->ps);
            for (layer = 0; layer < m->L; ++layer) {
                for (part = 0; part < 2; ++part) {
                    unsigned char* dst = ms_elem(m, s, part, pos, layer);
                    for (e = 0; e < m->H * m->D; ++e) m_enc(m->st[part], m_value(m), dst + (size_t)e * m->esz[part]);
                    for (head = 0; head < m->H; ++head)
                        memcpy(m->shadow + m_vec_off(m, page, layer, part, head, sl),
                               dst + (size_t)head * m->D * m->esz[part], (size_t)m->D * m->esz[part]);
                }
                s->written[(size_t)pos * m->L + layer] = 3;
            }
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Operations                                                               */
/* ------------------------------------------------------------------------ */

static void m_apply_reserve(model* m, mseq* s, uint32_t n) {
    uint32_t old = s->len, i;
    ms_grow(m, s, old + n);
    if (n && old % m->ps && m->ref[s->page[old / m->ps]] > 1) {
        mp_unref(m, s->page[old / m->ps]);
        s->page[old / m->ps] = mp_new(m);
        if (m->cfg.metadata) m->pending++;
    }
    for (i = m_npages(m, old); i < m_npages(m, old + n); ++i) s->page[i] = mp_new(m);
    if (n) memset(s->written + (size_t)old * m->L, 0, (size_t)n * m->L);
    s->len = old + n;
}

/* Writes one layer of the newest n positions of sequence idx with llmkv_put
   (parts: 1 K, 2 V, 3 both), predicting the pages copy-on-write needs. */
static void m_put(model* m, uint32_t idx, uint32_t layer, uint32_t n, int parts) {
    static const llmkv_dtype srcs[4] = {LLMKV_DTYPE_DEFAULT, LLMKV_DTYPE_F32, LLMKV_DTYPE_F16,
                                        LLMKV_DTYPE_BF16};
    mseq* s = &m->s[idx];
    llmkv_dtype src = srcs[m_below(m, 4)];
    llmkv_dtype sdt = src == LLMKV_DTYPE_DEFAULT ? LLMKV_DTYPE_F32 : src;
    uint32_t ne = m->H * m->D, first = (s->len - n) / m->ps, last = (s->len - 1) / m->ps;
    uint32_t need = 0, i, j, e;
    size_t rowb = (size_t)ne * m_size(sdt), stride[2], eff[2];
    unsigned char* in[2];
    int allowed[6], part;
    msnap sn;
    llmkv_result r;
    for (i = first; i <= last; ++i) need += m->ref[s->page[i]] > 1;
    for (part = 0; part < 2; ++part) {
        stride[part] = m_below(m, 3) == 0 ? rowb + 4u * (1u + m_below(m, 4)) : 0;
        eff[part] = stride[part] ? stride[part] : rowb;
        in[part] = m_buf(m, 2 + part, (size_t)n * eff[part]);
        for (j = 0; j < n * eff[part]; ++j) in[part][j] = (unsigned char)tst_next(&m->rng);
        for (j = 0; j < n; ++j)
            for (e = 0; e < ne; ++e) m_enc(sdt, m_value(m), in[part] + (size_t)j * eff[part] + (size_t)e * m_size(sdt));
    }
    m_allowed(allowed, 0, need > m_free_pages(m), 0, 0);
    m_snap(m, &sn);
    r = llmkv_put(m->c, s->h, layer, n, (parts & 1) ? in[0] : NULL, stride[0], (parts & 2) ? in[1] : NULL,
                  stride[1], src);
    m_log(&m->x, "put seq %u(id %#x,len %u) layer %u n %u parts %d src %s strides %u/%u cow %u free %u -> %d",
          idx, s->h.id, s->len, layer, n, parts, m_tname(src), (unsigned)stride[0], (unsigned)stride[1], need,
          m_free_pages(m), (int)r);
    m_expect(m, "llmkv_put", r, allowed);
    if (r != LLMKV_OK) {
        m_unchanged(m, &sn);
        return;
    }
    if (allowed[0] != LLMKV_OK) return; /* the model cannot follow */
    for (i = first; i <= last; ++i)
        if (m->ref[s->page[i]] > 1) {
            mp_unref(m, s->page[i]);
            s->page[i] = mp_new(m);
        }
    if (need) m_changed(m, s->h);
    for (part = 0; part < 2; ++part) {
        if (!(parts & (1 << part))) continue;
        for (j = 0; j < n; ++j) {
            uint32_t pos = s->len - n + j;
            unsigned char* dst = ms_elem(m, s, part, pos, layer);
            for (e = 0; e < ne; ++e)
                m_enc(m->st[part], m_dec(sdt, in[part] + (size_t)j * eff[part] + (size_t)e * m_size(sdt)),
                      dst + (size_t)e * m->esz[part]);
            s->written[(size_t)pos * m->L + layer] |= (unsigned char)(1 << part);
        }
    }
}

/* Writes the newest n positions of every layer (the usual step). */
static void m_put_all(model* m, uint32_t idx, uint32_t n) {
    uint32_t layer, k = m_below(m, 20);
    int parts = k == 0 ? 1 : k == 1 ? 2 : 3;
    if (n == 0) return;
    for (layer = 0; layer < m->L && !m->x.fails; ++layer) m_put(m, idx, layer, n, parts);
}

static uint32_t m_pick_n(model* m) {
    uint32_t n = 1 + m_below(m, 1 + m_below(m, m->cfg.max_reserve));
    if (m_below(m, 16) == 0) n = 1 + m_below(m, 2 * m->cfg.max_reserve);
    return n;
}

/* Reserve n tokens; returns 1 when it succeeded. */
static int m_reserve(model* m, uint32_t idx, uint32_t n) {
    mseq* s = &m->s[idx];
    uint32_t cow = n && s->len % m->ps && m->ref[s->page[s->len / m->ps]] > 1;
    uint32_t fresh = m_npages(m, s->len + n) - m_npages(m, s->len);
    int too_long = (uint64_t)s->len + n > m->max_len;
    int allowed[6];
    msnap sn;
    llmkv_result r;
    /* every failure that applies is a right answer: the header orders none */
    m_allowed(allowed, too_long, cow + fresh > m_free_pages(m),
              m->cfg.metadata && cow && m->pending + cow > m->max_pending, 0);
    m_snap(m, &sn);
    r = llmkv_reserve(m->c, s->h, n);
    m_log(&m->x, "reserve seq %u(id %#x,len %u) n %u (cow %u fresh %u free %u pending %u) -> %d", idx, s->h.id,
          s->len, n, cow, fresh, m_free_pages(m), m->pending, (int)r);
    m_expect(m, "llmkv_reserve", r, allowed);
    if (r != LLMKV_OK) {
        m_unchanged(m, &sn);
        return 0;
    }
    if (allowed[0] != LLMKV_OK) return 0;
    m_apply_reserve(m, s, n);
    if (n) m_changed(m, s->h);
    else m_ambiguous(m, s->h);
    return 1;
}

static void op_create(model* m) {
    llmkv_seq h;
    llmkv_result r;
    int allowed[3];
    msnap sn;
    uint32_t i;
    h.id = 0;
    if (m->n >= M_MAX_SEQS && m->max_seqs > M_MAX_SEQS) return; /* the model is full */
    m_allowed(allowed, 0, 0, 0, m->n >= m->max_seqs);
    m_snap(m, &sn);
    r = llmkv_seq_create(m->c, &h);
    m_log(&m->x, "seq_create (live %u of %u) -> %d id %#x", m->n, m->max_seqs, (int)r, h.id);
    m_expect(m, "llmkv_seq_create", r, allowed);
    if (r != LLMKV_OK) {
        m_unchanged(m, &sn);
        return;
    }
    if (allowed[0] != LLMKV_OK || m->n >= M_MAX_SEQS) {
        m_fail(&m->x, __LINE__, "seq_create succeeded past max_seqs");
        return;
    }
    MCHK(m, h.id != 0);
    for (i = 0; i < m->n; ++i) MCHK(m, m->s[i].h.id != h.id);
    for (i = 0; i < m->n_freed; ++i) MCHK(m, m->freed[i].id != h.id); /* a recycled slot needs a new generation */
    memset(&m->s[m->n], 0, sizeof m->s[m->n]);
    m->s[m->n].h = h;
    m->n++;
}

/* Metadata-only reserve + write of n tokens into sequences idx[0..k). */
static void m_after_reserve(model* m, const uint32_t* idx, const uint32_t* q, uint32_t k) {
    uint32_t i;
    if (m->cfg.metadata) {
        /* lazy: the engine may write later (or never); reserved slots stay
           unspecified, and copy commands pile up */
        if (!m->cfg.lazy || m_below(m, 2)) m_meta_write(m, idx, q, k);
        return;
    }
    for (i = 0; i < k && !m->x.fails; ++i) m_put_all(m, idx[i], q[i]);
}

static void op_reserve_put(model* m) {
    uint32_t idx = m_below(m, m->n), n = m_pick_n(m), len = m->s[idx].len;
    if (m_below(m, 50) == 0) n = 0;
    if (m_below(m, 25) == 0 && len < m->max_len) n = m->max_len - len + m_below(m, 2); /* to the limit, or 1 past */
    if (m_reserve(m, idx, n) && n) m_after_reserve(m, &idx, &n, 1);
}

/* Overwrite the newest positions of one layer (copy-on-write of any shared
   page in the range). */
static void op_reput(model* m) {
    uint32_t idx = m_below(m, m->n);
    uint32_t len = m->s[idx].len;
    if (len == 0) return;
    m_put(m, idx, m_below(m, m->L), 1 + m_below(m, len), 1 + (int)m_below(m, 3));
}

static int m_fork(model* m, uint32_t idx) {
    mseq* src = &m->s[idx];
    mseq* d;
    llmkv_seq h;
    llmkv_result r;
    int allowed[3], part;
    uint32_t i;
    msnap sn;
    h.id = 0;
    if (m->n >= M_MAX_SEQS && m->max_seqs > M_MAX_SEQS) return 0; /* the model is full */
    m_allowed(allowed, 0, 0, 0, m->n >= m->max_seqs);
    m_snap(m, &sn);
    r = llmkv_fork(m->c, src->h, &h);
    m_log(&m->x, "fork seq %u(id %#x,len %u) (live %u of %u) -> %d id %#x", idx, src->h.id, src->len, m->n,
          m->max_seqs, (int)r, h.id);
    m_expect(m, "llmkv_fork", r, allowed);
    if (r != LLMKV_OK) {
        m_unchanged(m, &sn);
        return 0;
    }
    if (allowed[0] != LLMKV_OK || m->n >= M_MAX_SEQS) {
        m_fail(&m->x, __LINE__, "fork succeeded past max_seqs");
        return 0;
    }
    MCHK(m, h.id != 0);
    for (i = 0; i < m->n; ++i) MCHK(m, m->s[i].h.id != h.id);
    d = &m->s[m->n];
    memset(d, 0, sizeof *d);
    d->h = h;
    ms_grow(m, d, src->len);
    for (part = 0; part < 2; ++part)
        if (src->len) memcpy(d->data[part], src->data[part], (size_t)src->len * m->L * m->row[part]);
    if (src->len) memcpy(d->written, src->written, (size_t)src->len * m->L);
    for (i = 0; i < m_npages(m, src->len); ++i) {
        d->page[i] = src->page[i];
        m->ref[src->page[i]]++;
    }
    d->len = src->len;
    m->n++;
    m_changed(m, src->h);
    return 1;
}

static void op_fork(model* m) { m_fork(m, m_below(m, m->n)); }

/* reserve, fork, then put: the put finds its pages shared and must copy
   them first (or fail with OUT_OF_PAGES having written nothing). */
static void op_reserve_fork_put(model* m) {
    uint32_t idx = m_below(m, m->n), n = m_pick_n(m);
    if (!m_reserve(m, idx, n) || m->x.fails) return;
    if (!m_fork(m, idx) || m->x.fails) {
        m_put_all(m, idx, n);
        return;
    }
    /* either the original or the fork writes first */
    m_put_all(m, m_below(m, 2) ? idx : m->n - 1, n);
}

/* Forks of one sequence, each then extended: every fork copies the shared
   tail page. Lazy metadata-only configs do not write (nor drain the copy
   queue) here, so the queue fills up and reserve must answer
   COPY_QUEUE_FULL, changing nothing. */
static void op_cow_burst(model* m) {
    uint32_t idx = m_below(m, m->n), k, one = 1;
    int chain = m_below(m, 2) == 0;
    for (k = 0; k < 4 && !m->x.fails; ++k) {
        uint32_t f;
        if (m->s[idx].len % m->ps == 0 || !m_fork(m, idx) || m->x.fails) return;
        f = m->n - 1;
        if (m_reserve(m, f, 1) && !m->cfg.lazy) m_after_reserve(m, &f, &one, 1);
        /* forking the fork chains the copies (a page copied from a copy):
           only executing them oldest first gives the right bytes */
        if (chain) idx = f;
    }
}

static void op_truncate(model* m) {
    uint32_t idx = m_below(m, m->n);
    mseq* s = &m->s[idx];
    uint32_t n, i;
    llmkv_result r;
    msnap sn;
    if (m_below(m, 20) == 0) {
        n = s->len + 1 + m_below(m, 5);
        m_snap(m, &sn);
        r = llmkv_truncate(m->c, s->h, n);
        m_log(&m->x, "truncate seq %u(id %#x,len %u) to %u (past the end) -> %d", idx, s->h.id, s->len, n, (int)r);
        MEQ(m, r, LLMKV_ERR_OUT_OF_RANGE);
        m_unchanged(m, &sn);
        return;
    }
    n = m_below(m, 3) == 0 ? 0 : m_below(m, s->len + 1);
    if (m_below(m, 4) == 0 && s->len > m->ps) n = (m_below(m, s->len / m->ps) + 1) * m->ps; /* page edge */
    if (n > s->len) n = s->len;
    r = llmkv_truncate(m->c, s->h, n);
    m_log(&m->x, "truncate seq %u(id %#x,len %u) to %u -> %d", idx, s->h.id, s->len, n, (int)r);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) return;
    for (i = m_npages(m, n); i < m_npages(m, s->len); ++i) mp_unref(m, s->page[i]);
    if (n < s->len) m_changed(m, s->h);
    else m_ambiguous(m, s->h);
    s->len = n;
}

static void op_free(model* m) {
    uint32_t idx = m_below(m, m->n), i;
    mseq* s = &m->s[idx];
    llmkv_result r = llmkv_seq_free(m->c, s->h);
    m_log(&m->x, "seq_free seq %u(id %#x,len %u) -> %d", idx, s->h.id, s->len, (int)r);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) return;
    m_changed(m, s->h);
    for (i = 0; i < m_npages(m, s->len); ++i) mp_unref(m, s->page[i]);
    m->freed[m->n_freed < 8 ? m->n_freed++ : m_below(m, 8)] = s->h;
    ms_release(s);
    m->s[idx] = m->s[m->n - 1];
    memset(&m->s[m->n - 1], 0, sizeof m->s[0]);
    m->n--;
}

static void op_gather(model* m) {
    static const llmkv_dtype dsts[4] = {LLMKV_DTYPE_DEFAULT, LLMKV_DTYPE_F32, LLMKV_DTYPE_F16,
                                        LLMKV_DTYPE_BF16};
    uint32_t idx = m_below(m, m->n), len = m->s[idx].len, pos, n, layer = m_below(m, m->L);
    llmkv_dtype dd = dsts[m_below(m, 4)];
    int parts = 1 + (int)m_below(m, 3), padded = m_below(m, 3) == 0;
    if (len == 0) return;
    pos = m_below(m, len);
    n = 1 + m_below(m, len - pos);
    if (dd != LLMKV_DTYPE_DEFAULT) {
        /* converting reserved slots nobody wrote would compute on
           unspecified (uninitialised) bytes, which valgrind reports */
        uint32_t j;
        for (j = pos; j < pos + n; ++j)
            if ((m->s[idx].written[(size_t)j * m->L + layer] & parts) != parts) dd = LLMKV_DTYPE_DEFAULT;
    }
    m_log(&m->x, "gather seq %u(id %#x,len %u) layer %u [%u,+%u) as %s parts %d padded %d", idx, m->s[idx].h.id,
          len, layer, pos, n, m_tname(dd), parts, padded);
    m_gather_check(m, idx, layer, pos, n, dd, parts, padded);
}

static void op_reserve_many(model* m) {
    uint32_t k = 2 + m_below(m, 3), idx[M_MAX_SEQS], q[M_MAX_SEQS], i, j, cows = 0, fresh = 0;
    llmkv_seq hs[M_MAX_SEQS];
    int too_long = 0, allowed[6];
    uint32_t* refs = m->fill; /* scratch copy of the reference counts */
    msnap sn;
    llmkv_result r;
    char desc[96];
    int dk = 0;
    if (k > m->n) k = m->n;
    for (i = 0; i < k; ++i) { /* k distinct sequences */
        for (;;) {
            idx[i] = m_below(m, m->n);
            for (j = 0; j < i && idx[j] != idx[i]; ++j) {}
            if (j == i) break;
        }
        q[i] = m_pick_n(m);
        hs[i] = m->s[idx[i]].h;
        if (dk >= 0 && (size_t)dk < sizeof desc)
            dk += snprintf(desc + dk, sizeof desc - (size_t)dk, " %u(len %u)+%u", idx[i], m->s[idx[i]].len, q[i]);
    }
    /* the pages the sequential reserves would take */
    memcpy(refs, m->ref, m->n_pages * sizeof(uint32_t));
    for (i = 0; i < k; ++i) {
        const mseq* s = &m->s[idx[i]];
        if ((uint64_t)s->len + q[i] > m->max_len) too_long = 1;
        if (s->len % m->ps && refs[s->page[s->len / m->ps]] > 1) {
            refs[s->page[s->len / m->ps]]--;
            cows++;
        }
        fresh += m_npages(m, s->len + q[i]) - m_npages(m, s->len);
    }
    m_allowed(allowed, too_long, cows + fresh > m_free_pages(m),
              m->cfg.metadata && m->pending + cows > m->max_pending, 0);
    m_snap(m, &sn);
    r = llmkv_reserve_many(m->c, hs, q, k);
    m_log(&m->x, "reserve_many%s (cows %u fresh %u free %u) -> %d", desc, cows, fresh, m_free_pages(m), (int)r);
    m_expect(m, "llmkv_reserve_many", r, allowed);
    if (r != LLMKV_OK) {
        m_unchanged(m, &sn);
        return;
    }
    if (allowed[0] != LLMKV_OK) return;
    for (i = 0; i < k; ++i) {
        m_apply_reserve(m, &m->s[idx[i]], q[i]);
        m_changed(m, hs[i]);
    }
    m_after_reserve(m, idx, q, k);
}

/* A sequence and its fork both grow inside their shared tail page in one
   reserve_many: the page must be copied once, not twice (the last writer
   keeps the original), so with one free page this must succeed. */
static void op_many_forked(model* m) {
    uint32_t idx = m_below(m, m->n), f, room, q[2], ids[2], one;
    llmkv_seq hs[2];
    int allowed[6];
    msnap sn;
    llmkv_result r;
    if (m->s[idx].len % m->ps == 0 || !m_fork(m, idx) || m->x.fails) return;
    f = m->n - 1;
    room = m->ps - m->s[idx].len % m->ps; /* slots left in the tail page */
    q[0] = 1 + m_below(m, room);
    q[1] = 1 + m_below(m, room);
    ids[0] = idx;
    ids[1] = f;
    hs[0] = m->s[idx].h;
    hs[1] = m->s[f].h;
    one = m->ref[m->s[idx].page[m->s[idx].len / m->ps]] == 2; /* only these two hold it */
    m_allowed(allowed, (uint64_t)m->s[idx].len + (q[0] > q[1] ? q[0] : q[1]) > m->max_len,
              (one ? 1u : 2u) > m_free_pages(m), m->cfg.metadata && m->pending + (one ? 1u : 2u) > m->max_pending, 0);
    m_snap(m, &sn);
    r = llmkv_reserve_many(m->c, hs, q, 2);
    m_log(&m->x, "reserve_many seq %u(len %u)+%u and its fork %u+%u (tail refs %u, free %u) -> %d", idx,
          m->s[idx].len, q[0], f, q[1], m->ref[m->s[idx].page[m->s[idx].len / m->ps]], m_free_pages(m), (int)r);
    m_expect(m, "llmkv_reserve_many", r, allowed);
    if (r != LLMKV_OK) {
        m_unchanged(m, &sn);
        return;
    }
    if (allowed[0] != LLMKV_OK) return;
    m_apply_reserve(m, &m->s[idx], q[0]);
    m_apply_reserve(m, &m->s[f], q[1]);
    m_changed(m, hs[0]);
    if (!m->cfg.lazy) m_after_reserve(m, ids, q, 2);
}

/* Builds the watched batch over random sequences and checks its arrays. */
static void op_batch(model* m) {
    uint32_t k = m_below(m, m->n + 1), idx[M_MAX_SEQS], i, j;
    llmkv_result r;
    for (i = 0; i < k; ++i) {
        for (;;) {
            idx[i] = m_below(m, m->n);
            for (j = 0; j < i && idx[j] != idx[i]; ++j) {}
            if (j == i) break;
        }
        m->b_seqs[i] = m->s[idx[i]].h;
        m->b_q[i] = m_below(m, 3) == 0 ? 0 : m_below(m, m->s[idx[i]].len + 1);
        if (m->b_q[i] > 64) m->b_q[i] = 64;
    }
    r = llmkv_batch_build(m->b, m->b_seqs, m->b_q, k);
    m_log(&m->x, "batch_build %u sequences -> %d", k, (int)r);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) {
        m->b_state = 0;
        return;
    }
    m->b_n = k;
    m->b_state = 1;
    m_check_batch_info(m, m->b, m->b_seqs, m->b_q, k);
}

/* Batch builds that must fail, leaving the batch empty. */
static void op_batch_bad(model* m) {
    llmkv_seq hs[3];
    uint32_t q[3], k = 0, which = m_below(m, 3);
    llmkv_batch* b = m->b;
    llmkv_batch_info in;
    llmkv_result r;
    if (which == 0 && m->n < 3) which = 2;
    if (which == 0) { /* 3 sequences into a batch of 2 */
        b = m->bsmall;
        for (k = 0; k < 3; ++k) {
            hs[k] = m->s[k].h;
            q[k] = 0;
        }
    } else if (which == 1) { /* 4 tokens into a batch of 3 */
        uint32_t i;
        for (i = 0; i < m->n && m->s[i].len < 4; ++i) {}
        if (i == m->n) return;
        b = m->bsmall;
        hs[0] = m->s[i].h;
        q[0] = 4;
        k = 1;
    } else { /* more query tokens than the sequence holds */
        uint32_t i = m_below(m, m->n);
        hs[0] = m->s[i].h;
        q[0] = m->s[i].len + 1;
        k = 1;
    }
    if (k == 0) return;
    r = llmkv_batch_build(b, hs, q, k);
    m_log(&m->x, "batch_build (must fail, case %u) -> %d", which, (int)r);
    if (which == 2) MCHK(m, r == LLMKV_ERR_OUT_OF_RANGE || r == LLMKV_ERR_INVALID_ARGUMENT);
    else MEQ(m, r, LLMKV_ERR_BATCH_FULL);
    memset(&in, 0x5A, sizeof in);
    r = llmkv_batch_get(b, &in);
    MEQ(m, r, LLMKV_OK);
    MEQ(m, in.n_seqs, 0);
    MEQ(m, in.n_tokens, 0);
    if (b == m->b) m->b_state = 0;
}

/* A freed handle must be rejected by every call, changing nothing. */
static void op_stale(model* m) {
    llmkv_seq h, out;
    uint32_t len, np, i, one = 1;
    float buf[8];
    msnap sn;
    if (m->n_freed == 0) return;
    h = m->freed[m_below(m, m->n_freed)];
    for (i = 0; i < m->n; ++i)
        if (m->s[i].h.id == h.id) {
            m_fail(&m->x, __LINE__, "a live sequence got the handle of a freed one");
            return;
        }
    m_log(&m->x, "calls with freed handle %#x", h.id);
    m_snap(m, &sn);
    MEQ(m, llmkv_seq_length(m->c, h, &len), LLMKV_ERR_STALE_HANDLE);
    MEQ(m, llmkv_seq_pages(m->c, h, m->tmp, m->n_pages + 1, &np), LLMKV_ERR_STALE_HANDLE);
    MEQ(m, llmkv_reserve(m->c, h, 1), LLMKV_ERR_STALE_HANDLE);
    MEQ(m, llmkv_reserve_many(m->c, &h, &one, 1), LLMKV_ERR_STALE_HANDLE);
    MEQ(m, llmkv_truncate(m->c, h, 0), LLMKV_ERR_STALE_HANDLE);
    MEQ(m, llmkv_fork(m->c, h, &out), LLMKV_ERR_STALE_HANDLE);
    MEQ(m, llmkv_seq_free(m->c, h), LLMKV_ERR_STALE_HANDLE);
    if (!m->cfg.metadata) {
        memset(buf, 0, sizeof buf);
        MEQ(m, llmkv_put(m->c, h, 0, 0, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_STALE_HANDLE);
        MEQ(m, llmkv_gather(m->c, h, 0, 0, 0, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_STALE_HANDLE);
    }
    m_unchanged(m, &sn);
}

/* Metadata-only: data calls answer NO_PAGE_DATA. */
static void op_nodata(model* m) {
    uint32_t idx = m_below(m, m->n);
    const mseq* s = &m->s[idx];
    unsigned char* b0;
    msnap sn;
    if (s->len == 0) return;
    b0 = m_buf(m, 0, m->row[0] + m->row[1] + 64);
    memset(b0, 0, m->row[0] + m->row[1] + 64);
    m_log(&m->x, "put/gather on metadata-only seq %u", idx);
    m_snap(m, &sn);
    MEQ(m, llmkv_put(m->c, s->h, 0, 1, b0, 0, b0, 0, LLMKV_DTYPE_F32), LLMKV_ERR_NO_PAGE_DATA);
    MEQ(m, llmkv_gather(m->c, s->h, 0, 0, 1, b0, 0, b0, 0, LLMKV_DTYPE_F32), LLMKV_ERR_NO_PAGE_DATA);
    m_unchanged(m, &sn);
}

/* ------------------------------------------------------------------------ */
/* One configuration                                                        */
/* ------------------------------------------------------------------------ */

static void m_check_layout(model* m) {
    const llmkv_layout* l = &m->lay;
    int part;
    MEQ(m, l->n_layers, m->L);
    MEQ(m, l->n_kv_heads, m->H);
    MEQ(m, l->head_dim, m->D);
    MEQ(m, l->page_size, m->ps);
    MEQ(m, l->page_bytes, (uint64_t)m->L * l->layer_stride);
    MEQ(m, l->page_bytes % 64, 0);
    MEQ(m, l->layer_stride % 64, 0);
    for (part = 0; part < 2; ++part) {
        const llmkv_part_layout* p = part ? &l->v : &l->k;
        MEQ(m, p->dtype, m->st[part]);
        MEQ(m, p->elem_bytes, m->esz[part]);
        MCHK(m, p->slot_stride >= (uint64_t)m->D * m->esz[part]);
        MEQ(m, p->head_stride, (uint64_t)m->ps * p->slot_stride);
        MEQ(m, p->bytes, (uint64_t)m->H * p->head_stride);
        MEQ(m, p->offset % 64, 0);
        MCHK(m, p->offset + p->bytes <= l->layer_stride);
    }
    /* K and V regions of a layer must not overlap */
    MCHK(m, l->k.offset + l->k.bytes <= l->v.offset || l->v.offset + l->v.bytes <= l->k.offset);
}

static void m_run(tst* t, const mcfg* cfg) {
    model* m = (model*)calloc(1, sizeof(model));
    llmkv_desc d, eff;
    llmkv_result r;
    unsigned i;
    int part;
    if (!m) {
        TST_CHECK(t, m != NULL);
        return;
    }
    m->x.t = t;
    m->x.trace = getenv("LLMKV_TEST_TRACE") != NULL;
    m->cfg = *cfg;
    {
        const char* e = getenv("LLMKV_TEST_SEED");
        m->cfg.seed ^= e ? strtoull(e, NULL, 0) * 0x9E3779B97F4A7C15ull : 0;
    }
    m->rng.s = m->cfg.seed;
    snprintf(m->x.cfg, sizeof m->x.cfg,
             "seed %#llx layers %u heads %u dim %u page_size %u n_pages %u max_seqs %u max_seq_len %u "
             "k %s v %s%s%s max_pending %u ops %u",
             m->cfg.seed, cfg->n_layers, cfg->n_kv_heads, cfg->head_dim, cfg->page_size, cfg->n_pages,
             cfg->max_seqs, cfg->max_seq_len, m_tname(cfg->k_dtype), m_tname(cfg->v_dtype),
             cfg->metadata ? " metadata-only" : "", cfg->lazy ? " (lazy copy take)" : "", cfg->max_pending,
             cfg->n_ops);

    memset(&d, 0, sizeof d);
    d.n_layers = cfg->n_layers;
    d.n_kv_heads = cfg->n_kv_heads;
    d.head_dim = cfg->head_dim;
    d.page_size = cfg->page_size;
    d.n_pages = cfg->n_pages;
    d.k_dtype = cfg->k_dtype;
    d.v_dtype = cfg->v_dtype;
    d.storage = cfg->metadata ? LLMKV_STORAGE_METADATA_ONLY : LLMKV_STORAGE_DEFAULT;
    d.max_seqs = cfg->max_seqs;
    d.max_seq_len = cfg->max_seq_len;
    d.max_pending_copies = cfg->max_pending;
    r = llmkv_cache_create(&d, &m->c);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) {
        free(m);
        return;
    }
    m->L = cfg->n_layers;
    m->H = cfg->n_kv_heads;
    m->D = cfg->head_dim;
    m->ps = cfg->page_size ? cfg->page_size : 16;
    m->n_pages = cfg->n_pages;
    m->max_seqs = cfg->max_seqs ? cfg->max_seqs : 256;
    m->max_len = cfg->max_seq_len ? cfg->max_seq_len : m->n_pages * m->ps;
    m->max_pending = cfg->max_pending ? cfg->max_pending : m->n_pages;
    m->st[0] = cfg->k_dtype == LLMKV_DTYPE_DEFAULT ? LLMKV_DTYPE_F16 : cfg->k_dtype;
    m->st[1] = cfg->v_dtype == LLMKV_DTYPE_DEFAULT ? LLMKV_DTYPE_F16 : cfg->v_dtype;
    for (part = 0; part < 2; ++part) {
        m->esz[part] = m_size(m->st[part]);
        m->row[part] = (size_t)m->H * m->D * m->esz[part];
    }
    /* the effective descriptor states the resolved defaults */
    memset(&eff, 0, sizeof eff);
    MEQ(m, llmkv_cache_desc(m->c, &eff), LLMKV_OK);
    MEQ(m, eff.page_size, m->ps);
    MEQ(m, eff.n_pages, m->n_pages);
    MEQ(m, eff.max_seqs, m->max_seqs);
    MEQ(m, eff.max_seq_len, m->max_len);
    MEQ(m, eff.k_dtype, m->st[0]);
    MEQ(m, eff.v_dtype, m->st[1]);
    if (cfg->metadata) MEQ(m, eff.max_pending_copies, m->max_pending);
    MEQ(m, llmkv_cache_layout(m->c, &m->lay), LLMKV_OK);
    m_check_layout(m);
    m->pool_bytes = (uint64_t)m->n_pages * m->lay.page_bytes;
    {
        void* base = (void*)&d;
        uint64_t bytes = 0;
        MEQ(m, llmkv_cache_pool(m->c, &base, &bytes), LLMKV_OK);
        MEQ(m, bytes, m->pool_bytes);
        if (cfg->metadata) MCHK(m, base == NULL);
        else MCHK(m, base != NULL);
    }
    m->ref = (uint32_t*)calloc(m->n_pages, sizeof(uint32_t));
    m->tmp = (uint32_t*)calloc(m->n_pages + 1, sizeof(uint32_t));
    m->map_m2r = (uint32_t*)calloc(m->n_pages, sizeof(uint32_t));
    m->map_r2m = (uint32_t*)calloc(m->n_pages, sizeof(uint32_t));
    m->fill = (uint32_t*)calloc(m->n_pages, sizeof(uint32_t));
    m->snap_pages = (uint32_t*)calloc((size_t)M_MAX_SEQS * (m->n_pages + 1), sizeof(uint32_t));
    if (cfg->metadata) m->shadow = (unsigned char*)calloc((size_t)m->pool_bytes, 1);
    if (!m->ref || !m->tmp || !m->map_m2r || !m->map_r2m || !m->fill || !m->snap_pages ||
        (cfg->metadata && !m->shadow)) {
        fprintf(stderr, "test_model: out of memory\n");
        exit(2);
    }
    m->wb_max_tokens = 4 * 2 * cfg->max_reserve; /* reserve_many: 4 sequences of up to 2 * max_reserve */
    if (m->wb_max_tokens < m->max_len) m->wb_max_tokens = m->max_len;
    MEQ(m, llmkv_batch_create(m->c, m->max_seqs, m->max_seqs * 64, &m->b), LLMKV_OK);
    MEQ(m, llmkv_batch_create(m->c, m->max_seqs, m->wb_max_tokens, &m->wb), LLMKV_OK);
    MEQ(m, llmkv_batch_create(m->c, 2, 3, &m->bsmall), LLMKV_OK);

    for (i = 0; i < cfg->n_ops && !m->x.fails; ++i) {
        uint32_t w = m_below(m, 100);
        char msg[256];
        m->x.op = i;
        if (m->n == 0 || w < 7) op_create(m);
        else if (w < 35) op_reserve_put(m);
        else if (w < 43) cfg->lazy ? op_cow_burst(m) : cfg->metadata ? op_reserve_put(m) : op_reput(m);
        else if (w < 50) op_fork(m);
        else if (w < 52) cfg->metadata ? op_cow_burst(m) : op_reserve_fork_put(m);
        else if (w < 53) op_cow_burst(m);
        else if (w < 54) op_many_forked(m);
        else if (w < 62 || (m_free_pages(m) == 0 && w < 75)) op_truncate(m);
        else if (w < 69) op_free(m);
        else if (w < 81) cfg->metadata ? op_nodata(m) : op_gather(m);
        else if (w < 88) op_reserve_many(m);
        else if (w < 94) op_batch(m);
        else if (w < 95) op_batch_bad(m);
        else if (w < 97) op_stale(m);
        else if (w < 98) op_create(m);
        else m_take_cmds(m);

        if (m->x.fails) break;
        if (cfg->metadata && (!cfg->lazy || m_below(m, 4) == 0)) m_take_cmds(m);
        if (!cfg->metadata && m_below(m, 8) == 0) m_take_cmds(m);
        msg[0] = 0;
        r = llmkv_cache_check(m->c, msg, sizeof msg);
        if (r != LLMKV_OK) {
            char line[300];
            snprintf(line, sizeof line, "llmkv_cache_check returned %d: %s", (int)r, msg);
            m_fail(&m->x, __LINE__, line);
            break;
        }
        m_check_tables(m);
        m_check_stats(m);
        m_check_batch_state(m);
        if (cfg->metadata || i % 64 == 63) m_check_data(m);
    }
    if (!m->x.fails) m_check_data(m);

    /* free everything: the pool must be whole again */
    m->x.op = cfg->n_ops;
    while (m->n && !m->x.fails) op_free(m);
    if (!m->x.fails) {
        llmkv_stats st;
        memset(&st, 0, sizeof st);
        MEQ(m, llmkv_cache_stats(m->c, &st), LLMKV_OK);
        MEQ(m, st.n_pages_free, m->n_pages);
        MEQ(m, st.n_seqs, 0);
        MEQ(m, llmkv_cache_check(m->c, NULL, 0), LLMKV_OK);
    }
    for (i = 0; i < M_MAX_SEQS; ++i) ms_release(&m->s[i]);
    llmkv_batch_destroy(m->b);
    llmkv_batch_destroy(m->wb);
    llmkv_batch_destroy(m->bsmall);
    llmkv_cache_destroy(m->c);
    for (i = 0; i < 4; ++i) free(m->buf[i]);
    free(m->ref);
    free(m->tmp);
    free(m->map_m2r);
    free(m->map_r2m);
    free(m->fill);
    free(m->snap_pages);
    free(m->shadow);
    free(m);
}

static double m_scale(void) {
    const char* e = getenv("LLMKV_TEST_SCALE");
    double v = 1.0;
    if (e && *e) {
        char* end = NULL;
        v = strtod(e, &end);
        if (end == e || !(v > 0.0)) v = 1.0;
    }
    return v;
}

static unsigned m_scaled(unsigned n) {
    double v = (double)n * m_scale();
    return v < 20.0 ? 20u : v > 1e7 ? 10000000u : (unsigned)v;
}

/* Shapes (layers, kv heads, head dim); page size 256 uses the small ones. */
static const uint32_t M_SHAPES[6][3] = {{1, 1, 1}, {2, 2, 3}, {3, 4, 8}, {1, 2, 64}, {2, 1, 64}, {3, 3, 1}};

static void m_base(mcfg* c, uint32_t ps, unsigned variant) {
    /* tight and roomy capacities per page size */
    uint32_t pages_tight, pages_roomy, max_reserve;
    const uint32_t* shape;
    switch (ps) {
    case 1: pages_tight = 24; pages_roomy = 160; max_reserve = 6; break;
    case 7: pages_tight = 7; pages_roomy = 48; max_reserve = 14; break;
    case 16: pages_tight = 4; pages_roomy = 28; max_reserve = 24; break;
    default: pages_tight = 3; pages_roomy = 10; max_reserve = 200; break;
    }
    shape = ps >= 256 ? M_SHAPES[(variant % 3) == 0 ? 0 : (variant % 3) == 1 ? 1 : 5] : M_SHAPES[variant % 6];
    memset(c, 0, sizeof *c);
    c->n_layers = shape[0];
    c->n_kv_heads = shape[1];
    c->head_dim = shape[2];
    c->page_size = ps == 16 && variant % 2 ? 0 : ps; /* 0: the default, 16 */
    c->n_pages = variant % 2 ? pages_roomy : pages_tight;
    c->max_seqs = variant % 3 == 0 ? 0 : 3 + variant % 6;
    if (variant % 4 == 1) c->max_seq_len = c->n_pages * ps / 3 + 1;
    c->max_reserve = max_reserve;
}

static void test_model_random_ops(tst* t) {
    static const uint32_t page_sizes[4] = {1, 7, 16, 256};
    static const llmkv_dtype types[3] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16};
    unsigned pi, ki, vi, variant = 0;
    for (pi = 0; pi < 4; ++pi)
        for (ki = 0; ki < 3; ++ki)
            for (vi = 0; vi < 3; ++vi, ++variant) {
                mcfg c;
                m_base(&c, page_sizes[pi], variant);
                c.k_dtype = types[ki];
                c.v_dtype = types[vi];
                c.n_ops = m_scaled(page_sizes[pi] == 256 ? 500 : 800);
                c.seed = 0x5EED0000ull + variant;
                m_run(t, &c);
            }
    {
        /* storage type left at its default (F16) */
        mcfg c;
        m_base(&c, 7, 5);
        c.n_ops = m_scaled(600);
        c.seed = 0x5EED1000ull;
        m_run(t, &c);
    }
}

static void test_model_metadata_only(tst* t) {
    static const uint32_t page_sizes[4] = {1, 7, 16, 256};
    unsigned pi, lazy, variant = 0;
    for (pi = 0; pi < 4; ++pi)
        for (lazy = 0; lazy < 2; ++lazy, ++variant) {
            mcfg c;
            m_base(&c, page_sizes[pi], 2 * pi + 2 - lazy); /* lazy: roomy (odd), else tight */
            c.k_dtype = variant % 3 == 0 ? LLMKV_DTYPE_F32 : LLMKV_DTYPE_BF16;
            c.v_dtype = variant % 2 ? LLMKV_DTYPE_F16 : LLMKV_DTYPE_F32;
            c.metadata = 1;
            c.lazy = (int)lazy;
            if (lazy) c.max_pending = 1 + variant % 3; /* COPY_QUEUE_FULL happens */
            c.n_ops = m_scaled(page_sizes[pi] == 256 ? 500 : 800);
            c.seed = 0x3E7A0000ull + variant;
            m_run(t, &c);
        }
}

void suite_model(tst* t) {
    TST_RUN(t, test_model_random_ops);
    TST_RUN(t, test_model_metadata_only);
}
