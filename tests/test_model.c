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

   Prefix-index configurations (desc.prefix_index) add a second model, a
   plain list of cached nodes (page identity, parent identity, namespace,
   tokens, pin count, LRU stamp) searched by linear scans, following the
   written rules of the index: publishing (watermarks, dedupe, partial
   pages), matching (page walk, then the longest partial match, ties to
   the lowest page id), LRU eviction (a page enters the order when it
   becomes evictable; the oldest goes first), pins and namespaces. It
   predicts which page every allocation evicts, every match length, the
   cached/evictable/pinned counts and the page tables after dedupe. The
   bytes written for a position are a function of (namespace, token ids of
   positions 0..pos, layer, part, element), exactly representable in F16,
   BF16 and F32, so a page shared through the index holds exactly the
   bytes the model expects. Every cached node is looked up again through
   llmkv_prefix_match after every operation.

   LLMKV_TEST_SCALE (default 1.0) scales the number of operations;
   LLMKV_TEST_PREFIX_SCALE (default: LLMKV_TEST_SCALE) scales only the
   prefix-index configurations (the test named test_model_prefix; run it
   alone with `build/tests model_prefix`, LLMKV_TEST_VERBOSE=1 prints its
   operation count, time and coverage counters, =2 also per configuration);
   LLMKV_TEST_SEED=n (default 0) is mixed into every configuration's fixed
   seed, to explore further; LLMKV_TEST_TRACE=1 prints every operation. */
#include <stdarg.h>
#include <time.h>

#include "test_util.h"
#include "../llmkv.h"

#define M_MAX_SEQS 12
#define M_NONE 0xFFFFFFFFu
#define M_ROOT M_NONE     /* parent of a top-level node */
#define M_MAX_PINS 16     /* live pins the model follows */
#define M_FAMS 4          /* prompt families */

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
    /* prefix index */
    uint64_t ns;              /* namespace */
    llmkv_token* tok;         /* [cap] token id of each position, -1 unknown */
    uint64_t* ph;             /* [cap] hash of (ns, tok[0..pos]): the data key */
    uint32_t* w;              /* [n_layers][K, V] written watermarks */
} mseq;

typedef struct mcfg {
    uint32_t n_layers, n_kv_heads, head_dim, page_size, n_pages;
    uint32_t max_seqs, max_seq_len, max_pending;   /* 0: default */
    llmkv_dtype k_dtype, v_dtype;
    int metadata, lazy;       /* metadata-only; take copy commands late */
    uint32_t max_reserve;     /* largest single reserve */
    unsigned n_ops;
    unsigned long long seed;
    /* prefix index */
    int prefix;               /* desc.prefix_index = 1 */
    uint32_t max_pins;        /* desc.max_pins (0: default 64) */
    uint32_t alphabet;        /* token symbols drawn from (2..8) */
    uint32_t n_ns;            /* namespaces in use (1..3) */
    uint32_t max_prompt;      /* longest prompt (besides the too-long probes) */
} mcfg;

/* A live pin: the nodes it keeps, root first. */
typedef struct mpin {
    llmkv_pin h;
    uint32_t n;
    uint32_t* nodes;          /* [n_pages] */
} mpin;

/* Coverage counters of the prefix configurations (LLMKV_TEST_VERBOSE). */
typedef struct mcov {
    unsigned long long ops, evictions, dedupes, published, partial_published, prompts, matched_full_pages,
        matched_inside_page, capped, reserve_fail_pages, pins, pins_refused, unpins, stale_unpins, evict_calls,
        ns_prompts;
} mcov;

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
    /* prefix index (px): the cached nodes, by page identity */
    int px;
    uint32_t max_pins;        /* effective */
    unsigned char* nd_cached;
    uint32_t* nd_parent;      /* parent identity or M_ROOT */
    uint32_t* nd_ntok;        /* tokens held: page size (full) or fewer (partial) */
    uint32_t* nd_pins;
    uint64_t* nd_ns;
    uint64_t* nd_stamp;       /* when it last became evictable (LRU order) */
    llmkv_token* nd_tok;      /* [n_pages][page size] */
    uint64_t clock;
    uint64_t n_evictions, matched, missed;
    mpin pins[M_MAX_PINS];
    uint32_t n_pins;
    llmkv_pin dead_pins[8];   /* released pins */
    uint32_t n_dead_pins;
    llmkv_token* fam[M_FAMS]; /* prompt families: [fam_len] */
    uint32_t fam_len;
    llmkv_token* prompt;      /* scratch [fam_len] */
    llmkv_token* tokbuf[4];   /* scratch [fam_len] each */
    uint32_t* path;           /* scratch [n_pages + 1] */
    uint32_t* path2;
    uint32_t* fstack;         /* the free list as the rules order it: real ids, M_NONE unknown; top last */
    uint32_t fsp;
    mcov* cov;
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

/* Pages on the free list: identities nobody references (no sequence,
   not cached). */
static uint32_t m_free_pages(const model* m) { return m->n_pages - m->used; }

/* References of the model: ref[p] = page-table entries holding p + 1 while
   p is a node of the index (cached). A cached page is evictable when no
   sequence holds it and no pin keeps it. */
static int mp_evictable(const model* m, uint32_t p) {
    return m->px && m->nd_cached[p] && m->ref[p] == 1 && m->nd_pins[p] == 0;
}

static uint32_t m_evictable(const model* m) {
    uint32_t p, n = 0;
    if (!m->px) return 0;
    for (p = 0; p < m->n_pages; ++p) n += (uint32_t)mp_evictable(m, p);
    return n;
}

/* Pages a call may take: free ones plus evictable ones. */
static uint32_t m_avail(const model* m) { return m_free_pages(m) + m_evictable(m); }

/* References held by sequences (not the index's). */
static uint32_t mp_held(const model* m, uint32_t p) { return m->ref[p] - (m->px && m->nd_cached[p] ? 1u : 0u); }

/* The real page id bound to an identity is forgotten when the identity
   dies (the library may give the page to anyone next). */
static void mp_unbind(model* m, uint32_t p) {
    if (m->map_m2r[p] != M_NONE) {
        m->map_r2m[m->map_m2r[p]] = M_NONE;
        m->map_m2r[p] = M_NONE;
    }
}

static void mp_unref(model* m, uint32_t p) {
    if (--m->ref[p] == 0) {
        m->used--;
        if (m->px && m->fsp < m->n_pages) m->fstack[m->fsp++] = m->map_m2r[p]; /* freed last, taken first */
        mp_unbind(m, p);
        if (m->px && m->nd_cached[p]) m_fail(&m->x, __LINE__, "model freed a cached page (test bug)");
    } else if (mp_evictable(m, p)) {
        m->nd_stamp[p] = ++m->clock; /* the most recent end of the LRU order */
    }
}

/* Evicts the oldest evictable page (the LRU head); 0 when none. */
static int m_evict_one(model* m) {
    uint32_t p, best = M_NONE;
    for (p = 0; p < m->n_pages; ++p)
        if (mp_evictable(m, p) && (best == M_NONE || m->nd_stamp[p] < m->nd_stamp[best])) best = p;
    if (best == M_NONE) return 0;
    for (p = 0; p < m->n_pages; ++p)
        if (m->nd_cached[p] && m->nd_parent[p] == best) {
            m_fail(&m->x, __LINE__, "the LRU head has a cached child: the order rules broke the leaf guarantee");
            break;
        }
    m->nd_cached[best] = 0;
    m->n_evictions++;
    if (m->cov) m->cov->evictions++;
    mp_unref(m, best);
    return 1;
}

/* A fresh page: from the free list, else the LRU head is evicted first. */
static uint32_t mp_new(model* m) {
    uint32_t p;
    if (m->used == m->n_pages && !m_evict_one(m)) {
        m_fail(&m->x, __LINE__, "model ran out of pages (test bug)");
        return 0;
    }
    for (p = 0; p < m->n_pages; ++p)
        if (m->ref[p] == 0) {
            m->ref[p] = 1;
            m->used++;
            if (m->px && m->fsp) { /* the free list is LIFO: the page freed last comes back first */
                uint32_t real = m->fstack[--m->fsp];
                if (real != M_NONE && m->map_r2m[real] == M_NONE) {
                    m->map_m2r[p] = real;
                    m->map_r2m[real] = p;
                }
            }
            return p;
        }
    m_fail(&m->x, __LINE__, "model ran out of page identities (test bug)");
    return 0;
}

/* A sequence takes a reference (a cached page leaves the LRU order). */
static void mp_hold(model* m, uint32_t p) { m->ref[p]++; }

static void ms_grow(model* m, mseq* s, uint32_t len) {
    uint32_t np = m_npages(m, len);
    if (len > s->cap) {
        uint32_t nc = s->cap ? s->cap : 16;
        int part;
        while (nc < len) nc *= 2;
        for (part = 0; part < 2; ++part)
            s->data[part] = (unsigned char*)m_xrealloc(s->data[part], (size_t)nc * m->L * m->row[part]);
        s->written = (unsigned char*)m_xrealloc(s->written, (size_t)nc * m->L);
        s->tok = (llmkv_token*)m_xrealloc(s->tok, (size_t)nc * sizeof(llmkv_token));
        s->ph = (uint64_t*)m_xrealloc(s->ph, (size_t)nc * sizeof(uint64_t));
        s->cap = nc;
    }
    if (!s->w) s->w = (uint32_t*)calloc((size_t)m->L * 2, sizeof(uint32_t));
    if (!s->w) {
        fprintf(stderr, "test_model: out of memory\n");
        exit(2);
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
    free(s->tok);
    free(s->ph);
    free(s->w);
    memset(s, 0, sizeof *s);
}

/* ------------------------------------------------------------------------ */
/* The prefix index model                                                   */
/* ------------------------------------------------------------------------ */

static uint64_t m_mix(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* The data key of position pos: a hash of the namespace and the token ids
   of positions 0..pos (-1 for unknown ones). */
static uint64_t m_ph(const mseq* s, uint32_t pos, llmkv_token t) {
    uint64_t prev = pos ? s->ph[pos - 1] : m_mix(s->ns ^ 0x6A09E667F3BCC908ull);
    return m_mix(prev + 0x9E3779B97F4A7C15ull * ((uint64_t)(uint32_t)t + 1u));
}

/* The value written at (data key, layer, part, element): exactly
   representable in F32, F16 and BF16 (at most 7 significant bits, F16
   range, F16 subnormals included, infinities), so every source and
   storage type stores the same value. */
static float m_det(uint64_t key, uint32_t layer, int part, uint32_t e) {
    uint64_t x = m_mix(key ^ m_mix(((uint64_t)layer << 33) ^ ((uint64_t)part << 32) ^ e));
    float k = (float)((int)((x >> 8) % 255u) - 127);
    switch (x & 31) {
    case 0: return ldexpf(k, -24 + (int)((x >> 20) % 10)); /* F16 subnormals and the smallest normals */
    case 1: return ldexpf(k, 1 + (int)((x >> 20) % 8));    /* up to 32512 */
    case 2: return (x >> 20) & 1 ? INFINITY : -INFINITY;
    default: return k / 64.0f;
    }
}

/* Records the token ids of positions [from, from + n) (toks NULL: unknown). */
static void ms_set_tokens(mseq* s, uint32_t from, uint32_t n, const llmkv_token* toks) {
    uint32_t i;
    for (i = 0; i < n; ++i) {
        s->tok[from + i] = toks ? toks[i] : -1;
        s->ph[from + i] = m_ph(s, from + i, s->tok[from + i]);
    }
}

static int m_known(const llmkv_token* t, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; ++i)
        if (t[i] < 0) return 0;
    return 1;
}

/* min over layers and parts of the watermarks. */
static uint32_t m_written_end(const model* m, const mseq* s) {
    uint32_t i, end = s->len;
    for (i = 0; i < m->L * 2; ++i)
        if (s->w[i] < end) end = s->w[i];
    return end;
}

/* Longest [0, n) every layer and part of which the model wrote. */
static uint32_t m_contig_written(const model* m, const mseq* s) {
    uint32_t pos, layer;
    for (pos = 0; pos < s->len; ++pos)
        for (layer = 0; layer < m->L; ++layer)
            if (s->written[(size_t)pos * m->L + layer] != 3) return pos;
    return s->len;
}

/* Leading pages of the table that are full nodes on the sequence's path
   (parent: the previous entry, the root first; its namespace). */
static uint32_t m_npub(const model* m, const mseq* s) {
    uint32_t k, np = m_npages(m, s->len);
    for (k = 0; k < np; ++k) {
        uint32_t p = s->page[k];
        if (!m->nd_cached[p] || m->nd_ntok[p] != m->ps || m->nd_ns[p] != s->ns ||
            m->nd_parent[p] != (k ? s->page[k - 1] : M_ROOT))
            break;
    }
    return k;
}

static int m_same_tokens(const llmkv_token* a, const llmkv_token* b, uint32_t n) {
    return n == 0 || memcmp(a, b, (size_t)n * sizeof(llmkv_token)) == 0;
}

/* The full node with key (parent, ns, t[0, page size)), or M_NONE. */
static uint32_t m_find_full(const model* m, uint32_t parent, uint64_t ns, const llmkv_token* t) {
    uint32_t p;
    for (p = 0; p < m->n_pages; ++p)
        if (m->nd_cached[p] && m->nd_ntok[p] == m->ps && m->nd_parent[p] == parent && m->nd_ns[p] == ns &&
            m_same_tokens(m->nd_tok + (size_t)p * m->ps, t, m->ps))
            return p;
    return M_NONE;
}

/* Common prefix of node p's tokens and t[0, n). */
static uint32_t m_node_lcp(const model* m, uint32_t p, const llmkv_token* t, uint32_t n) {
    const llmkv_token* nt = m->nd_tok + (size_t)p * m->ps;
    uint32_t k, lim = m->nd_ntok[p] < n ? m->nd_ntok[p] : n;
    for (k = 0; k < lim && nt[k] == t[k]; ++k) {}
    return k;
}

/* Among the nodes (full or partial) under (parent, ns), the one sharing the
   longest prefix > 0 with t[0, n); ties to the lowest real page id. */
static uint32_t m_best_child(model* m, uint32_t parent, uint64_t ns, const llmkv_token* t, uint32_t n,
                             uint32_t* lcp) {
    uint32_t p, best = M_NONE, bl = 0;
    for (p = 0; p < m->n_pages; ++p) {
        uint32_t k;
        if (!m->nd_cached[p] || m->nd_parent[p] != parent || m->nd_ns[p] != ns) continue;
        k = m_node_lcp(m, p, t, n);
        if (k == 0 || k < bl) continue;
        if (k == bl) {
            if (m->map_m2r[p] == M_NONE || m->map_m2r[best] == M_NONE) {
                m_fail(&m->x, __LINE__, "a tie between cached nodes whose page ids the model never saw (test bug)");
                continue;
            }
            if (m->map_m2r[p] > m->map_m2r[best]) continue;
        }
        best = p;
        bl = k;
    }
    *lcp = bl;
    return best;
}

/* The walk over the index: *d full pages (path[0..*d)), then the best
   candidate (*cand, M_NONE when *lcp is 0). Returns the match length. */
static uint32_t m_walk(model* m, uint64_t ns, const llmkv_token* t, uint32_t limit, uint32_t* path, uint32_t* d,
                       uint32_t* cand, uint32_t* lcp) {
    uint32_t node = M_ROOT, k = 0;
    *cand = M_NONE;
    *lcp = 0;
    while ((uint64_t)(k + 1) * m->ps <= limit) {
        uint32_t p = m_find_full(m, node, ns, t + (size_t)k * m->ps);
        if (p == M_NONE) break;
        path[k++] = node = p;
    }
    *d = k;
    if ((uint64_t)k * m->ps < limit) *cand = m_best_child(m, node, ns, t + (size_t)k * m->ps, limit - k * m->ps, lcp);
    if (*lcp == 0) *cand = M_NONE;
    return k * m->ps + *lcp;
}

/* Page p (held by a sequence) becomes a node: the index takes a reference. */
static void m_node_insert(model* m, uint32_t p, uint32_t parent, uint64_t ns, uint32_t ntok, const llmkv_token* t) {
    m->nd_cached[p] = 1;
    m->nd_parent[p] = parent;
    m->nd_ns[p] = ns;
    m->nd_ntok[p] = ntok;
    m->nd_pins[p] = 0;
    memcpy(m->nd_tok + (size_t)p * m->ps, t, (size_t)ntok * sizeof(llmkv_token));
    m->ref[p]++;
}

/* Token ids from the root to node p (inclusive) into out; returns their
   number. */
static uint32_t m_node_path(const model* m, uint32_t p, llmkv_token* out) {
    uint32_t chain[512], n = 0, len = 0, q; /* a path has at most n_pages nodes: configurations stay below */
    for (q = p; q != M_ROOT && n < 512; q = m->nd_parent[q]) chain[n++] = q;
    while (n--) {
        memcpy(out + len, m->nd_tok + (size_t)chain[n] * m->ps, (size_t)m->nd_ntok[chain[n]] * sizeof(llmkv_token));
        len += m->nd_ntok[chain[n]];
    }
    return len;
}

/* Publishing (see the rules): the sequence's full written pages with known
   tokens past its published ones become nodes, or switch to the cached
   page with the same key; with `partial`, its written partly filled last
   page too. Returns 1 when its page table changed. */
static int m_publish(model* m, mseq* s, int partial) {
    uint32_t ps = m->ps, k = m_npub(m, s), end = m_written_end(m, s), np = m_npages(m, s->len);
    int changed = 0;
    while ((uint64_t)(k + 1) * ps <= end) {
        uint32_t p = s->page[k], parent = k ? s->page[k - 1] : M_ROOT, n;
        const llmkv_token* pt = s->tok + (size_t)k * ps;
        if (m->nd_cached[p]) { /* a node not on its path: the rules never make one */
            m_fail(&m->x, __LINE__, "a sequence holds a cached page off its path (model invariant)");
            return changed;
        }
        if (!m_known(pt, ps)) break;
        n = m_find_full(m, parent, s->ns, pt);
        /* A page other sequences share too is swapped only by all of them:
           publishing stops there (swapping for one sequence would leave the
           others holding, under a parent they lack, what it publishes next). */
        if (n != M_NONE && m->ref[p] > 1) break;
        if (n == M_NONE) {
            m_node_insert(m, p, parent, s->ns, ps, pt);
            if (m->cov) m->cov->published++;
        } else { /* dedupe */
            mp_hold(m, n);
            s->page[k] = n;
            mp_unref(m, p);
            changed = 1;
            if (m->cov) m->cov->dedupes++;
        }
        ++k;
    }
    if (partial && k + 1 == np && s->len % ps && end >= s->len) {
        uint32_t p = s->page[k], nt = s->len - k * ps, parent = k ? s->page[k - 1] : M_ROOT, q, held = 0;
        const llmkv_token* pt = s->tok + (size_t)k * ps;
        /* only a page no other sequence holds: a fork may hold more of it */
        if (!m->nd_cached[p] && m->ref[p] == 1 && m_known(pt, nt)) {
            for (q = 0; q < m->n_pages && !held; ++q)
                held = m->nd_cached[q] && m->nd_parent[q] == parent && m->nd_ns[q] == s->ns && m->nd_ntok[q] >= nt &&
                       m_same_tokens(m->nd_tok + (size_t)q * ps, pt, nt);
            if (!held) {
                m_node_insert(m, p, parent, s->ns, nt, pt);
                if (m->cov) m->cov->partial_published++;
            }
        }
    }
    return changed;
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
   the library's page ids and the model's identities. The map lives as long
   as the identity: a page never changes its id while referenced, and the
   ids of cached pages decide ties when matching. */
static void m_check_tables(model* m) {
    uint32_t i, j;
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
    uint32_t i, j, shared = 0, held = 0, cached = 0, pinned = 0;
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
        if (mp_held(m, i) > 1) shared++; /* held by more than one sequence reference */
        if (mp_held(m, i) > 0) held++;
        if (m->px && m->nd_cached[i]) {
            cached++;
            if (m->nd_pins[i]) pinned++;
        }
    }
    MEQ(m, st.n_pages_total, m->n_pages);
    MEQ(m, st.n_pages_used + st.n_pages_free + (m->used - held), st.n_pages_total); /* + cached, unheld */
    MCHK(m, st.n_pages_used <= upper); /* sharing can only reduce it */
    MEQ(m, st.n_pages_used, held);
    MEQ(m, st.n_pages_free, m->n_pages - m->used);
    MEQ(m, st.n_pages_shared, shared);
    MEQ(m, st.n_pages_cached, cached);
    MEQ(m, st.n_pages_evictable, m_evictable(m));
    MEQ(m, st.n_pages_pinned, pinned);
    MEQ(m, st.n_pins, m->n_pins);
    MEQ(m, st.n_evictions, m->n_evictions);
    MEQ(m, st.prompt_tokens_matched, m->matched);
    MEQ(m, st.prompt_tokens_missed, m->missed);
    {
        double want = m->matched + m->missed ? (double)m->matched / (double)(m->matched + m->missed) : 0.0;
        MCHK(m, fabs(st.hit_rate - want) <= 1e-12);
    }
    MEQ(m, st.n_seqs, m->n);
    MEQ(m, st.n_pending_copies, m->pending);
    MEQ(m, st.page_bytes, m->lay.page_bytes);
    MEQ(m, st.pool_bytes, (uint64_t)m->n_pages * m->lay.page_bytes);
    MEQ(m, st.used_bytes, (uint64_t)held * m->lay.page_bytes);
    MEQ(m, st.n_tokens, tokens);
    MEQ(m, st.n_slots_used, slots);
    MEQ(m, st.n_slots_unused, (uint64_t)held * m->ps - slots);
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
    MEQ(m, st.n_pages_cached, sn->st.n_pages_cached);
    MEQ(m, st.n_pages_evictable, sn->st.n_pages_evictable);
    MEQ(m, st.n_pages_pinned, sn->st.n_pages_pinned);
    MEQ(m, st.n_pins, sn->st.n_pins);
    MEQ(m, st.n_evictions, sn->st.n_evictions);
    MEQ(m, st.prompt_tokens_matched, sn->st.prompt_tokens_matched);
    MEQ(m, st.prompt_tokens_missed, sn->st.prompt_tokens_missed);
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
static void m_allowed_x(int* out, int invalid, int too_long, int no_pages, int queue_full, int too_many) {
    int k = 0;
    if (invalid) out[k++] = LLMKV_ERR_INVALID_ARGUMENT;
    if (too_long) out[k++] = LLMKV_ERR_SEQUENCE_TOO_LONG;
    if (no_pages) out[k++] = LLMKV_ERR_OUT_OF_PAGES;
    if (queue_full) out[k++] = LLMKV_ERR_COPY_QUEUE_FULL;
    if (too_many) out[k++] = LLMKV_ERR_TOO_MANY_SEQUENCES;
    if (k == 0) out[k++] = LLMKV_OK;
    out[k] = 1;
}

static void m_allowed(int* out, int too_long, int no_pages, int queue_full, int too_many) {
    m_allowed_x(out, 0, too_long, no_pages, queue_full, too_many);
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
                    for (e = 0; e < m->H * m->D; ++e)
                        m_enc(m->st[part], m->px ? m_det(s->ph[pos], layer, part, e) : m_value(m),
                              dst + (size_t)e * m->esz[part]);
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

/* The model of a successful reserve of n tokens (toks: their ids, NULL
   unknown): the shared tail page is copied (a fresh page taken, then the
   old one let go), then the new pages are taken. */
static void m_apply_reserve(model* m, mseq* s, uint32_t n, const llmkv_token* toks) {
    uint32_t old = s->len, i;
    ms_grow(m, s, old + n);
    if (n && old % m->ps && m->ref[s->page[old / m->ps]] > 1) {
        uint32_t was = s->page[old / m->ps];
        s->page[old / m->ps] = mp_new(m);
        mp_unref(m, was);
        if (m->cfg.metadata) m->pending++;
    }
    for (i = m_npages(m, old); i < m_npages(m, old + n); ++i) s->page[i] = mp_new(m);
    if (n) memset(s->written + (size_t)old * m->L, 0, (size_t)n * m->L);
    if (m->px) ms_set_tokens(s, old, n, toks);
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
            for (e = 0; e < ne; ++e)
                m_enc(sdt, m->px ? m_det(s->ph[s->len - n + j], layer, part, e) : m_value(m),
                      in[part] + (size_t)j * eff[part] + (size_t)e * m_size(sdt));
    }
    m_allowed(allowed, 0, need > m_avail(m), 0, 0);
    m_snap(m, &sn);
    r = llmkv_put(m->c, s->h, layer, n, (parts & 1) ? in[0] : NULL, stride[0], (parts & 2) ? in[1] : NULL,
                  stride[1], src);
    m_log(&m->x, "put seq %u(id %#x,len %u) layer %u n %u parts %d src %s strides %u/%u cow %u avail %u -> %d",
          idx, s->h.id, s->len, layer, n, parts, m_tname(src), (unsigned)stride[0], (unsigned)stride[1], need,
          m_avail(m), (int)r);
    m_expect(m, "llmkv_put", r, allowed);
    if (r != LLMKV_OK) {
        m_unchanged(m, &sn);
        return;
    }
    if (allowed[0] != LLMKV_OK) return; /* the model cannot follow */
    for (i = last + 1; i-- > first;) /* copy-on-write: last page first */
        if (m->ref[s->page[i]] > 1) {
            uint32_t was = s->page[i];
            s->page[i] = mp_new(m);
            mp_unref(m, was);
        }
    if (need) m_changed(m, s->h);
    if (m->px) { /* watermarks: a write that starts at or below one extends it */
        if ((parts & 1) && s->len - n <= s->w[layer * 2]) s->w[layer * 2] = s->len;
        if ((parts & 2) && s->len - n <= s->w[layer * 2 + 1]) s->w[layer * 2 + 1] = s->len;
    }
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

/* A token symbol: mostly from the configuration's small alphabet, rarely
   any of the larger ids (up to INT32_MAX). */
static llmkv_token m_sym(model* m) {
    static const llmkv_token syms[8] = {0, 1, 2, 3, 5, 8, 1000, 2147483647};
    if (m_below(m, 64) == 0) return syms[m_below(m, 8)];
    return syms[m_below(m, m->cfg.alphabet)];
}

/* Token ids for the next n positions of sequence s: mostly the
   continuation of a prompt family or of a live sequence (same namespace)
   that s follows so far, so pages repeat across sequences; else random
   symbols. */
static void m_gen_cont(model* m, uint64_t ns, const llmkv_token* tok, uint32_t len, const mseq* self, uint32_t n,
                       llmkv_token* out) {
    uint32_t i, k, start;
    if (n == 0) return;
    if (m_below(m, 4) != 0 && m_known(tok, len)) {
        start = m_below(m, M_FAMS + M_MAX_SEQS);
        for (k = 0; k < M_FAMS + M_MAX_SEQS; ++k) {
            uint32_t c = (start + k) % (M_FAMS + M_MAX_SEQS);
            const llmkv_token* src = NULL;
            uint32_t src_len = 0;
            if (c < M_FAMS) {
                src = m->fam[c];
                src_len = m->fam_len;
            } else if (c - M_FAMS < m->n && &m->s[c - M_FAMS] != self && m->s[c - M_FAMS].ns == ns) {
                src = m->s[c - M_FAMS].tok;
                src_len = m->s[c - M_FAMS].len;
            }
            if (src && src_len > len && m_same_tokens(tok, src, len)) {
                uint32_t take = src_len - len < n ? src_len - len : n;
                memcpy(out, src + len, (size_t)take * sizeof(llmkv_token));
                for (i = take; i < n; ++i) out[i] = m_sym(m);
                if (!m_known(out, take)) break; /* a sequence's unknown ids: draw fresh ones */
                return;
            }
        }
    }
    for (i = 0; i < n; ++i) out[i] = m_sym(m);
}

static void m_gen_tokens(model* m, const mseq* s, uint32_t n, llmkv_token* out) {
    m_gen_cont(m, s->ns, s->tok, s->len, s, n, out);
}

/* Reserve n tokens through `api` (0 llmkv_reserve, 1 llmkv_reserve_tokens,
   2 llmkv_reserve_many_tokens with one sequence) with token ids toks (NULL:
   unknown); returns 1 when it succeeded. A prefix cache publishes the
   sequence's written pages first. */
static int m_reserve_ex(model* m, uint32_t idx, uint32_t n, const llmkv_token* toks, int api) {
    mseq* s = &m->s[idx];
    uint32_t cow = n && s->len % m->ps && m->ref[s->page[s->len / m->ps]] > 1;
    uint32_t fresh = m_npages(m, s->len + n) - m_npages(m, s->len);
    int too_long = (uint64_t)s->len + n > m->max_len, changed = 0;
    int allowed[6];
    msnap sn;
    llmkv_result r;
    static const char* const names[3] = {"reserve", "reserve_tokens", "reserve_many_tokens"};
    /* every failure that applies is a right answer: the header orders none */
    m_allowed(allowed, too_long, cow + fresh > m_avail(m),
              m->cfg.metadata && cow && m->pending + cow > m->max_pending, 0);
    if (m->px) m_check_tables(m); /* ids of the pages it may publish */
    m_snap(m, &sn);
    if (api == 0) {
        r = llmkv_reserve(m->c, s->h, n);
    } else if (api == 1) {
        r = llmkv_reserve_tokens(m->c, s->h, toks, n);
    } else {
        const llmkv_token* tk[1];
        tk[0] = toks;
        r = llmkv_reserve_many_tokens(m->c, &s->h, &n, toks || m_below(m, 2) ? tk : NULL, 1);
    }
    m_log(&m->x, "%s seq %u(id %#x,len %u) n %u%s (cow %u fresh %u avail %u pending %u) -> %d", names[api], idx,
          s->h.id, s->len, n, toks ? "" : " unknown ids", cow, fresh, m_avail(m), m->pending, (int)r);
    m_expect(m, names[api], r, allowed);
    if (r != LLMKV_OK) {
        if (m->cov && allowed[0] == LLMKV_ERR_OUT_OF_PAGES) m->cov->reserve_fail_pages++;
        m_unchanged(m, &sn);
        return 0;
    }
    if (allowed[0] != LLMKV_OK) return 0;
    if (m->px) changed = m_publish(m, s, 0);
    m_apply_reserve(m, s, n, toks);
    if (n || changed) m_changed(m, s->h);
    else m_ambiguous(m, s->h);
    return 1;
}

/* Reserve n tokens; returns 1 when it succeeded. Prefix caches mostly give
   token ids (families, continuations), sometimes none. */
static int m_reserve(model* m, uint32_t idx, uint32_t n) {
    uint32_t w;
    llmkv_token* toks = m->px ? m->tokbuf[0] : NULL;
    if (!m->px) return m_reserve_ex(m, idx, n, NULL, 0);
    if (n + m->s[idx].len > m->fam_len) n = m->fam_len - m->s[idx].len; /* scratch size; still past max_seq_len */
    w = m_below(m, 20);
    if (w < 3) return m_reserve_ex(m, idx, n, NULL, 0);
    if (w < 4) return m_reserve_ex(m, idx, n, NULL, 1 + (int)m_below(m, 2));
    m_gen_tokens(m, &m->s[idx], n, toks);
    return m_reserve_ex(m, idx, n, toks, w < 6 ? 2 : 1);
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
    ms_grow(m, &m->s[m->n], 0);
    m->n++;
}

/* llmkv_seq_mark_written(n): every watermark becomes at least min(n, len).
   The model only declares what it wrote. */
static void m_mark_written(model* m, uint32_t idx, uint32_t n) {
    mseq* s = &m->s[idx];
    uint32_t i, c = n < s->len ? n : s->len;
    llmkv_result r = llmkv_seq_mark_written(m->c, s->h, n);
    m_log(&m->x, "seq_mark_written seq %u(id %#x,len %u) %u (model wrote [0,%u)) -> %d", idx, s->h.id, s->len, n,
          m_contig_written(m, s), (int)r);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) return;
    if (c > m_contig_written(m, s)) m_fail(&m->x, __LINE__, "marking unwritten positions written (test bug)");
    for (i = 0; i < m->L * 2; ++i)
        if (s->w[i] < c) s->w[i] = c;
    m_ambiguous(m, s->h);
}

/* Metadata-only reserve + write of n tokens into sequences idx[0..k). */
static void m_after_reserve(model* m, const uint32_t* idx, const uint32_t* q, uint32_t k) {
    uint32_t i;
    if (m->cfg.metadata) {
        /* lazy: the engine may write later (or never); reserved slots stay
           unspecified, and copy commands pile up */
        if (!m->cfg.lazy || m_below(m, 2)) {
            m_meta_write(m, idx, q, k);
            /* a device backend declares what it wrote, so pages publish */
            for (i = 0; i < k && m->px && !m->x.fails; ++i)
                if (m_below(m, 4) != 0) m_mark_written(m, idx[i], m_contig_written(m, &m->s[idx[i]]));
        }
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
    d->ns = src->ns;
    if (src->len && m->px) {
        memcpy(d->tok, src->tok, (size_t)src->len * sizeof(llmkv_token));
        memcpy(d->ph, src->ph, (size_t)src->len * sizeof(uint64_t));
    }
    memcpy(d->w, src->w, (size_t)m->L * 2 * sizeof(uint32_t));
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
    for (i = m_npages(m, s->len); i-- > m_npages(m, n);) mp_unref(m, s->page[i]); /* last page first */
    for (i = 0; i < m->L * 2; ++i)
        if (s->w[i] > n) s->w[i] = n;
    if (n < s->len) m_changed(m, s->h);
    else m_ambiguous(m, s->h);
    s->len = n;
}

static void op_free(model* m) {
    uint32_t idx = m_below(m, m->n), i;
    mseq* s = &m->s[idx];
    llmkv_result r;
    if (m->px) m_check_tables(m); /* ids of the pages it may publish */
    r = llmkv_seq_free(m->c, s->h);
    m_log(&m->x, "seq_free seq %u(id %#x,len %u) -> %d", idx, s->h.id, s->len, (int)r);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) return;
    m_changed(m, s->h);
    if (m->px) m_publish(m, s, 0);
    for (i = m_npages(m, s->len); i-- > 0;) mp_unref(m, s->page[i]); /* last page first */
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

/* llmkv_reserve_many, or on a prefix cache mostly llmkv_reserve_many_tokens
   with token ids for some sequences, checked against `allowed`; on success
   the model publishes every listed sequence, then reserves. */
static llmkv_result m_call_reserve_many(model* m, const llmkv_seq* hs, const uint32_t* idx, uint32_t* q, uint32_t k,
                                        const int* allowed, const char* desc, uint32_t need) {
    const llmkv_token* tk[M_MAX_SEQS];
    msnap sn;
    llmkv_result r;
    uint32_t i;
    int api = 0, none = 0;
    for (i = 0; i < k; ++i) tk[i] = NULL;
    if (m->px && m_below(m, 4) != 0) {
        api = 1;
        none = m_below(m, 20) == 0; /* tokens itself NULL */
        for (i = 0; i < k && !none; ++i) {
            uint32_t n = q[i];
            if (m_below(m, 8) == 0) continue; /* unknown ids for this one */
            if (m->s[idx[i]].len + n > m->fam_len) {
                n = m->fam_len - m->s[idx[i]].len;
                q[i] = n; /* still past max_seq_len: fam_len is longer */
            }
            m_gen_tokens(m, &m->s[idx[i]], n, m->tokbuf[i % 4]);
            tk[i] = m->tokbuf[i % 4];
        }
    }
    if (m->px) m_check_tables(m); /* ids of the pages it may publish */
    m_snap(m, &sn);
    r = api ? llmkv_reserve_many_tokens(m->c, hs, q, none ? NULL : tk, k) : llmkv_reserve_many(m->c, hs, q, k);
    m_log(&m->x, "%s%s (need %u avail %u) -> %d", api ? "reserve_many_tokens" : "reserve_many", desc, need,
          m_avail(m), (int)r);
    m_expect(m, api ? "llmkv_reserve_many_tokens" : "llmkv_reserve_many", r, allowed);
    if (r != LLMKV_OK) {
        if (m->cov && allowed[0] == LLMKV_ERR_OUT_OF_PAGES) m->cov->reserve_fail_pages++;
        m_unchanged(m, &sn);
        return r;
    }
    if (allowed[0] != LLMKV_OK) return r;
    if (m->px)
        for (i = 0; i < k; ++i) m_publish(m, &m->s[idx[i]], 0);
    for (i = 0; i < k; ++i) {
        m_apply_reserve(m, &m->s[idx[i]], q[i], tk[i]);
        m_changed(m, hs[i]);
    }
    return r;
}

static void op_reserve_many(model* m) {
    uint32_t k = 2 + m_below(m, 3), idx[M_MAX_SEQS], q[M_MAX_SEQS], i, j, cows = 0, fresh = 0;
    llmkv_seq hs[M_MAX_SEQS];
    int too_long = 0, allowed[6];
    uint32_t* refs = m->fill; /* scratch copy of the reference counts */
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
    m_allowed(allowed, too_long, cows + fresh > m_avail(m),
              m->cfg.metadata && m->pending + cows > m->max_pending, 0);
    r = m_call_reserve_many(m, hs, idx, q, k, allowed, desc, cows + fresh);
    if (r != LLMKV_OK || allowed[0] != LLMKV_OK) return;
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
              (one ? 1u : 2u) > m_avail(m), m->cfg.metadata && m->pending + (one ? 1u : 2u) > m->max_pending, 0);
    if (m->px) {
        char desc[96];
        snprintf(desc, sizeof desc, " seq %u(len %u)+%u and its fork %u+%u (tail refs %u)", idx, m->s[idx].len,
                 q[0], f, q[1], m->ref[m->s[idx].page[m->s[idx].len / m->ps]]);
        r = m_call_reserve_many(m, hs, ids, q, 2, allowed, desc, one ? 1u : 2u);
        if (r == LLMKV_OK && allowed[0] == LLMKV_OK && !m->cfg.lazy) m_after_reserve(m, ids, q, 2);
        return;
    }
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
    m_apply_reserve(m, &m->s[idx], q[0], NULL);
    m_apply_reserve(m, &m->s[f], q[1], NULL);
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

/* Without a prefix index the prefix calls answer UNSUPPORTED, changing
   nothing. */
static void m_unsupported(model* m) {
    llmkv_token tk[2] = {1, 2};
    const llmkv_token* tkp[1];
    llmkv_seq h;
    llmkv_pin pn;
    uint32_t got = 0, two = 2;
    msnap sn;
    tkp[0] = tk;
    m_log(&m->x, "prefix calls without a prefix index");
    m_snap(m, &sn);
    MEQ(m, llmkv_reserve_tokens(m->c, m->s[0].h, tk, 2), LLMKV_ERR_UNSUPPORTED);
    MEQ(m, llmkv_reserve_many_tokens(m->c, &m->s[0].h, &two, tkp, 1), LLMKV_ERR_UNSUPPORTED);
    MEQ(m, llmkv_seq_tokens(m->c, m->s[0].h, 0, 0, tk), LLMKV_ERR_UNSUPPORTED);
    MEQ(m, llmkv_seq_create_prefix(m->c, 0, tk, 2, &h, &got), LLMKV_ERR_UNSUPPORTED);
    MEQ(m, llmkv_prefix_pin(m->c, 0, tk, 2, &pn, &got), LLMKV_ERR_UNSUPPORTED);
    m_unchanged(m, &sn);
}

/* A freed handle must be rejected by every call, changing nothing. */
static void op_stale(model* m) {
    llmkv_seq h, out;
    uint32_t len, np, i, one = 1;
    float buf[8];
    msnap sn;
    if (!m->px && m->n) m_unsupported(m);
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
    if (m->px) {
        llmkv_token tk[2] = {1, 2};
        const llmkv_token* tkp[1];
        tkp[0] = tk;
        MEQ(m, llmkv_reserve_tokens(m->c, h, tk, 2), LLMKV_ERR_STALE_HANDLE);
        MEQ(m, llmkv_reserve_many_tokens(m->c, &h, &one, tkp, 1), LLMKV_ERR_STALE_HANDLE);
        MEQ(m, llmkv_seq_tokens(m->c, h, 0, 0, tk), LLMKV_ERR_STALE_HANDLE);
        MEQ(m, llmkv_seq_publish(m->c, h, 1), LLMKV_ERR_STALE_HANDLE);
        MEQ(m, llmkv_seq_mark_written(m->c, h, 1), LLMKV_ERR_STALE_HANDLE);
    }
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
/* Prefix index operations                                                  */
/* ------------------------------------------------------------------------ */

/* A prompt (its namespace into *ns, its ids into out; returns its length,
   at most cfg.max_prompt): a prefix of a prompt family, of a live
   sequence or of a cached node's path (exactly a node's path: the whole
   prompt is cached and the match is capped at n - 1; or cut inside a
   page), or random ids; often followed by a few more ids. */
static uint32_t m_gen_prompt(model* m, uint64_t* ns, llmkv_token* out) {
    static const uint64_t nss[3] = {0, 1, 0xFFFFFFFF00000007ull};
    uint32_t cap = m->cfg.max_prompt, n = 0, w = m_below(m, 40), i;
    *ns = m_below(m, 3) ? 0 : nss[m_below(m, m->cfg.n_ns)];
    if (w < 12) { /* a prompt family */
        uint32_t f = m_below(m, M_FAMS);
        n = m_below(m, 2) ? m_below(m, cap + 1) : cap - m_below(m, m->ps + 1) * (cap > m->ps);
        if (n > cap) n = cap;
        memcpy(out, m->fam[f], (size_t)n * sizeof(llmkv_token));
    } else if (w < 22 && m->n) { /* a live sequence: its next turn, or a retry */
        const mseq* s = &m->s[m_below(m, m->n)];
        if (m_below(m, 4)) *ns = s->ns;
        n = m_below(m, 2) ? s->len : m_below(m, s->len + 1);
        if (n > cap) n = cap;
        for (i = 0; i < n; ++i) out[i] = s->tok[i] >= 0 ? s->tok[i] : m_sym(m);
    } else if (w < 34) { /* a cached node's path */
        uint32_t p, k = m_below(m, m->n_pages), found = M_NONE;
        for (p = 0; p < m->n_pages && found == M_NONE; ++p)
            if (m->nd_cached[(k + p) % m->n_pages]) found = (k + p) % m->n_pages;
        if (found != M_NONE) {
            *ns = m->nd_ns[found];
            n = m_node_path(m, found, out);
            if (m_below(m, 3) == 0 && n) n = 1 + m_below(m, n); /* cut, often inside a page */
            if (n > cap) n = cap;
            if (m_below(m, 2) == 0) return n; /* exactly: the cap at n - 1 applies */
        }
    } else if (w < 39) { /* random */
        n = m_below(m, cap + 1);
        for (i = 0; i < n; ++i) out[i] = m_sym(m);
    } else {
        return 0;
    }
    if (n < cap && m_below(m, 2)) { /* a few more ids */
        uint32_t more = 1 + m_below(m, 2 * m->ps);
        if (more > cap - n) more = cap - n;
        m_gen_cont(m, *ns, out, n, NULL, more, out + n);
        n += more;
    }
    return n;
}

/* A new sequence from a prompt (llmkv_seq_create_prefix), then usually the
   rest of the prompt reserved with its ids and written. */
static void op_create_prefix(model* m) {
    llmkv_token* pr = m->prompt;
    llmkv_seq h;
    uint64_t ns = 0;
    uint32_t n, d = 0, cand = M_NONE, lcp = 0, match = 0, n_cached = M_NONE, i, layer, e, idx;
    int too_long = 0, allowed[6], part;
    llmkv_result r;
    mseq* s;
    msnap sn;
    if (m->n >= M_MAX_SEQS && m->max_seqs > M_MAX_SEQS) return; /* the model is full */
    n = m_gen_prompt(m, &ns, pr);
    if (m_below(m, 6) == 0 && n) { /* a caller that does not match: its pages dedupe when published */
        uint32_t rest = n, before = m->n;
        op_create(m);
        if (m->x.fails || m->n == before) return;
        idx = m->n - 1;
        if (m_reserve_ex(m, idx, rest, pr, 1) && !m->x.fails) m_after_reserve(m, &idx, &rest, 1);
        return;
    }
    if (m_below(m, 40) == 0) { /* too long */
        n = m->max_len + 1 + m_below(m, 2);
        for (i = 0; i < n; ++i) pr[i] = m_sym(m);
        too_long = 1;
    }
    m_allowed(allowed, too_long, 0, 0, m->n >= m->max_seqs);
    if (n && !too_long) match = m_walk(m, ns, pr, n - 1, m->path, &d, &cand, &lcp);
    m_snap(m, &sn);
    h.id = 0;
    r = llmkv_seq_create_prefix(m->c, ns, n || m_below(m, 2) ? pr : NULL, n, &h, &n_cached);
    m_log(&m->x, "seq_create_prefix ns %#llx n %u (model: %u full pages + %u, match %u) -> %d id %#x n_cached %u",
          (unsigned long long)ns, n, d, lcp, match, (int)r, h.id, n_cached);
    m_expect(m, "llmkv_seq_create_prefix", r, allowed);
    if (r != LLMKV_OK) {
        m_unchanged(m, &sn);
        return;
    }
    if (allowed[0] != LLMKV_OK || m->n >= M_MAX_SEQS) {
        m_fail(&m->x, __LINE__, "seq_create_prefix succeeded past max_seqs or max_seq_len");
        return;
    }
    MEQ(m, n_cached, match);
    MCHK(m, h.id != 0);
    for (i = 0; i < m->n; ++i) MCHK(m, m->s[i].h.id != h.id);
    for (i = 0; i < m->n_freed; ++i) MCHK(m, m->freed[i].id != h.id);
    idx = m->n;
    s = &m->s[idx];
    memset(s, 0, sizeof *s);
    s->h = h;
    s->ns = ns;
    ms_grow(m, s, match);
    for (i = 0; i < d; ++i) {
        s->page[i] = m->path[i];
        mp_hold(m, m->path[i]);
    }
    if (cand != M_NONE) {
        s->page[d] = cand;
        mp_hold(m, cand);
    }
    ms_set_tokens(s, 0, match, pr);
    s->len = match;
    for (i = 0; i < m->L * 2; ++i) s->w[i] = match;
    for (i = 0; i < match; ++i) /* the cached pages hold what the model would have written */
        for (layer = 0; layer < m->L; ++layer) {
            for (part = 0; part < 2; ++part) {
                unsigned char* dst = ms_elem(m, s, part, i, layer);
                for (e = 0; e < m->H * m->D; ++e)
                    m_enc(m->st[part], m_det(s->ph[i], layer, part, e), dst + (size_t)e * m->esz[part]);
            }
            s->written[(size_t)i * m->L + layer] = 3;
        }
    m->n++;
    m->matched += match;
    m->missed += n - match;
    if (m->cov) {
        m->cov->prompts++;
        m->cov->matched_full_pages += d;
        m->cov->matched_inside_page += lcp != 0;
        m->cov->capped += n && match == n - 1;
        m->cov->ns_prompts += ns != 0;
    }
    if (n > match && m_below(m, 8) != 0) { /* compute the rest of the prompt */
        uint32_t rest = n - match;
        if (m_reserve_ex(m, idx, rest, pr + match, m_below(m, 4) ? 1 : 2) && !m->x.fails) {
            m_after_reserve(m, &idx, &rest, 1);
            if (!m->x.fails && m_below(m, 3) == 0) {
                int partial = (int)m_below(m, 2);
                m_check_tables(m);
                r = llmkv_seq_publish(m->c, s->h, partial);
                m_log(&m->x, "seq_publish seq %u partial %d -> %d", idx, partial, (int)r);
                MEQ(m, r, LLMKV_OK);
                if (m_publish(m, s, partial)) m_changed(m, s->h);
                else m_ambiguous(m, s->h);
            }
        }
    }
}

static void op_publish(model* m) {
    uint32_t idx = m_below(m, m->n);
    mseq* s = &m->s[idx];
    int partial = (int)m_below(m, 2);
    llmkv_result r;
    m_check_tables(m);
    r = llmkv_seq_publish(m->c, s->h, partial);
    m_log(&m->x, "seq_publish seq %u(id %#x,len %u, written %u) partial %d -> %d", idx, s->h.id, s->len,
          m_written_end(m, s), partial, (int)r);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) return;
    if (m_publish(m, s, partial)) m_changed(m, s->h);
    else m_ambiguous(m, s->h);
}

static void op_mark_written(model* m) {
    uint32_t idx = m_below(m, m->n), cw = m_contig_written(m, &m->s[idx]), n;
    if (m->cfg.metadata && cw < m->s[idx].len && m_below(m, 2)) { /* the engine catches up first */
        uint32_t q = m->s[idx].len - cw;
        m_meta_write(m, &idx, &q, 1);
        cw = m_contig_written(m, &m->s[idx]);
    }
    n = m_below(m, 2) ? cw : m_below(m, cw + 1);
    if (cw == m->s[idx].len && m_below(m, 4) == 0) n = cw + m_below(m, 3); /* clamped to the length */
    m_mark_written(m, idx, n);
}

static void op_match(model* m) {
    uint64_t ns = 0;
    uint32_t n = m_gen_prompt(m, &ns, m->prompt), d, cand, lcp, want, got = M_NONE;
    llmkv_result r;
    want = n ? m_walk(m, ns, m->prompt, n, m->path, &d, &cand, &lcp) : 0;
    r = llmkv_prefix_match(m->c, ns, n || m_below(m, 2) ? m->prompt : NULL, n, &got);
    m_log(&m->x, "prefix_match ns %#llx n %u -> %d matched %u (model %u)", (unsigned long long)ns, n, (int)r, got, want);
    MEQ(m, r, LLMKV_OK);
    MEQ(m, got, want);
}

static void op_pin(model* m) {
    uint64_t ns = 0;
    uint32_t n = m_gen_prompt(m, &ns, m->prompt), d = 0, cand = M_NONE, lcp = 0, want, got = M_NONE, i;
    llmkv_pin h;
    llmkv_result r;
    mpin* pn;
    msnap sn;
    if (m->n_pins >= m->max_pins) {
        m_snap(m, &sn);
        h.id = 0;
        r = llmkv_prefix_pin(m->c, ns, m->prompt, n, &h, &got);
        m_log(&m->x, "prefix_pin with %u of %u pins live -> %d", m->n_pins, m->max_pins, (int)r);
        MEQ(m, r, LLMKV_ERR_TOO_MANY_PINS);
        if (m->cov) m->cov->pins_refused++;
        m_unchanged(m, &sn);
        return;
    }
    if (m->n_pins >= M_MAX_PINS) return; /* the model is full */
    pn = &m->pins[m->n_pins];
    if (n) m_walk(m, ns, m->prompt, n, m->path, &d, &cand, &lcp);
    want = d * m->ps;
    for (i = 0; i < d; ++i) pn->nodes[i] = m->path[i];
    pn->n = d;
    if (cand != M_NONE && lcp == m->nd_ntok[cand]) { /* a node wholly matched */
        pn->nodes[pn->n++] = cand;
        want += lcp;
    }
    h.id = 0;
    r = llmkv_prefix_pin(m->c, ns, n || m_below(m, 2) ? m->prompt : NULL, n, &h, &got);
    m_log(&m->x, "prefix_pin ns %#llx n %u -> %d id %#x pinned %u (model %u in %u pages)", (unsigned long long)ns, n,
          (int)r, h.id, got, want, pn->n);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) return;
    MEQ(m, got, want);
    MCHK(m, h.id != 0);
    for (i = 0; i < m->n_pins; ++i) MCHK(m, m->pins[i].h.id != h.id);
    for (i = 0; i < m->n_dead_pins; ++i) MCHK(m, m->dead_pins[i].id != h.id); /* a released handle stays dead */
    for (i = 0; i < pn->n; ++i) m->nd_pins[pn->nodes[i]]++;
    pn->h = h;
    m->n_pins++;
    if (m->cov) m->cov->pins++;
}

static void op_unpin(model* m) {
    llmkv_result r;
    uint32_t k, i;
    mpin tmp;
    if (m->n_pins == 0 || m_below(m, 5) == 0) { /* a released or never valid handle */
        llmkv_pin h;
        msnap sn;
        h.id = 0;
        if (m->n_dead_pins && m_below(m, 4)) h = m->dead_pins[m_below(m, m->n_dead_pins)];
        m_snap(m, &sn);
        r = llmkv_prefix_unpin(m->c, h);
        m_log(&m->x, "prefix_unpin stale %#x -> %d", h.id, (int)r);
        MEQ(m, r, LLMKV_ERR_STALE_HANDLE);
        if (m->cov) m->cov->stale_unpins++;
        m_unchanged(m, &sn);
        return;
    }
    k = m_below(m, m->n_pins);
    r = llmkv_prefix_unpin(m->c, m->pins[k].h);
    m_log(&m->x, "prefix_unpin %#x (%u pages) -> %d", m->pins[k].h.id, m->pins[k].n, (int)r);
    MEQ(m, r, LLMKV_OK);
    if (r != LLMKV_OK) return;
    for (i = m->pins[k].n; i-- > 0;) { /* deepest first */
        uint32_t p = m->pins[k].nodes[i];
        if (m->nd_pins[p] == 0 || !m->nd_cached[p]) {
            m_fail(&m->x, __LINE__, "model: a pinned page is gone (test bug)");
            return;
        }
        if (--m->nd_pins[p] == 0 && mp_evictable(m, p)) m->nd_stamp[p] = ++m->clock;
    }
    m->dead_pins[m->n_dead_pins < 8 ? m->n_dead_pins++ : m_below(m, 8)] = m->pins[k].h;
    tmp = m->pins[k]; /* keep the node arrays: swap with the last */
    m->pins[k] = m->pins[m->n_pins - 1];
    m->pins[m->n_pins - 1] = tmp;
    m->n_pins--;
    if (m->cov) m->cov->unpins++;
}

static void op_evict(model* m) {
    static const uint32_t maxes[5] = {0, 1, 2, 3, 0xFFFFFFFFu};
    uint32_t max = maxes[m_below(m, 5)], want = 0, got = M_NONE;
    int with_out = m_below(m, 6) != 0;
    llmkv_result r = llmkv_prefix_evict(m->c, max, with_out ? &got : NULL);
    m_log(&m->x, "prefix_evict max %u (evictable %u) -> %d evicted %u", max, m_evictable(m), (int)r, got);
    MEQ(m, r, LLMKV_OK);
    while (want < max && m_evict_one(m)) ++want;
    if (with_out) MEQ(m, got, want);
    if (m->cov) m->cov->evict_calls++;
}

/* Calls that must fail and change nothing: negative ids, a prompt past
   max_seq_len, a token range past the end. */
static void op_prefix_bad(model* m) {
    uint32_t which = m_below(m, 6), idx = m_below(m, m->n), n = 1 + m_below(m, 2 * m->ps), got = 0, i;
    mseq* s = &m->s[idx];
    llmkv_token* t = m->tokbuf[0];
    int allowed[6];
    llmkv_result r;
    llmkv_seq h;
    llmkv_pin pn;
    msnap sn;
    if (n + s->len > m->fam_len) n = 1;
    if (which == 4 && m->max_len + 1 > m->fam_len) which = 3;
    for (i = 0; i < n; ++i) t[i] = m_sym(m);
    t[m_below(m, n)] = -1 - (llmkv_token)m_below(m, 3);
    if (m_below(m, 8) == 0) t[m_below(m, n)] = -2147483647 - 1;
    m_snap(m, &sn);
    switch (which) {
    case 0: {
        uint32_t cow = s->len % m->ps && m->ref[s->page[s->len / m->ps]] > 1;
        m_allowed_x(allowed, 1, (uint64_t)s->len + n > m->max_len,
                    cow + m_npages(m, s->len + n) - m_npages(m, s->len) > m_avail(m),
                    m->cfg.metadata && cow && m->pending + cow > m->max_pending, 0);
        if (m_below(m, 2)) {
            r = llmkv_reserve_tokens(m->c, s->h, t, n);
        } else {
            const llmkv_token* tk[1];
            tk[0] = t;
            r = llmkv_reserve_many_tokens(m->c, &s->h, &n, tk, 1);
        }
        break;
    }
    case 1:
        m_allowed_x(allowed, 1, n > m->max_len, 0, 0, m->n >= m->max_seqs);
        r = llmkv_seq_create_prefix(m->c, 0, t, n, &h, &got);
        break;
    case 2:
        m_allowed_x(allowed, 1, 0, 0, 0, 0);
        if (m->n_pins >= m->max_pins) {
            allowed[1] = LLMKV_ERR_TOO_MANY_PINS;
            allowed[2] = 1;
        }
        r = llmkv_prefix_pin(m->c, 0, t, n, &pn, &got);
        break;
    case 3:
        m_allowed_x(allowed, 1, 0, 0, 0, 0);
        r = llmkv_prefix_match(m->c, 0, t, n, &got);
        break;
    case 4:
        n = m->max_len + 1;
        for (i = 0; i < n; ++i) t[i] = m_sym(m);
        m_allowed(allowed, 1, 0, 0, m->n >= m->max_seqs);
        r = llmkv_seq_create_prefix(m->c, 0, t, n, &h, &got);
        break;
    default: { /* past the end: [pos, len + 1 or 2), or an empty range at len + 1 */
        uint32_t pos = m_below(m, s->len + 1);
        allowed[0] = LLMKV_ERR_OUT_OF_RANGE;
        allowed[1] = LLMKV_ERR_INVALID_ARGUMENT;
        allowed[2] = 1;
        r = llmkv_seq_tokens(m->c, s->h, pos, s->len - pos + 1 + m_below(m, 2), t);
        if (r == LLMKV_OK || m_below(m, 2)) break;
        r = llmkv_seq_tokens(m->c, s->h, s->len + 1, 0, t);
        break;
    }
    }
    m_log(&m->x, "prefix call that must fail (case %u, seq %u len %u, n %u) -> %d", which, idx, s->len, n, (int)r);
    m_expect(m, "prefix call", r, allowed);
    m_unchanged(m, &sn);
}

/* After every operation on a prefix cache: every sequence's token ids, and
   every cached node found again through llmkv_prefix_match (its path from
   the root is cached whole). */
static void m_check_prefix(model* m) {
    uint32_t i, p;
    llmkv_token* t = m->tokbuf[3];
    for (i = 0; i < m->n && !m->x.fails; ++i) {
        const mseq* s = &m->s[i];
        llmkv_result r;
        if (s->len) t[s->len - 1] = -7;
        r = llmkv_seq_tokens(m->c, s->h, 0, s->len, t);
        MEQ(m, r, LLMKV_OK);
        if (r == LLMKV_OK && !m_same_tokens(t, s->tok, s->len)) {
            char msg[160];
            uint32_t j;
            for (j = 0; t[j] == s->tok[j]; ++j) {}
            snprintf(msg, sizeof msg, "llmkv_seq_tokens of seq %u: position %u holds %d, the model %d", i, j, (int)t[j],
                     (int)s->tok[j]);
            m_fail(&m->x, __LINE__, msg);
        }
    }
    for (p = 0; p < m->n_pages && !m->x.fails; ++p) {
        uint32_t n, got = M_NONE, d, cand, lcp;
        if (!m->nd_cached[p]) continue;
        n = m_node_path(m, p, t);
        MEQ(m, llmkv_prefix_match(m->c, m->nd_ns[p], t, n, &got), LLMKV_OK);
        if (got != n) {
            char msg[200];
            snprintf(msg, sizeof msg,
                     "cached node (model page %u, real %u, ns %#llx, %u tokens, depth %u tokens) not found: match %u",
                     p, m->map_m2r[p], (unsigned long long)m->nd_ns[p], m->nd_ntok[p], n, got);
            m_fail(&m->x, __LINE__, msg);
        }
        MEQ(m, m_walk(m, m->nd_ns[p], t, n, m->path2, &d, &cand, &lcp), n); /* the model agrees with itself */
    }
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

static void m_run(tst* t, const mcfg* cfg, mcov* cov) {
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
    if (cfg->prefix) {
        size_t k = strlen(m->x.cfg);
        snprintf(m->x.cfg + k, sizeof m->x.cfg - k, " prefix index: max_pins %u alphabet %u namespaces %u prompts <= %u",
                 cfg->max_pins, cfg->alphabet, cfg->n_ns, cfg->max_prompt);
    }
    m->px = cfg->prefix;
    m->cov = cov;

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
    d.prefix_index = cfg->prefix ? 1u : 0u;
    d.max_pins = cfg->max_pins;
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
    m->max_pins = cfg->prefix ? (cfg->max_pins ? cfg->max_pins : 64) : 0;
    MEQ(m, eff.prefix_index, cfg->prefix ? 1 : 0);
    if (cfg->prefix) MEQ(m, eff.max_pins, m->max_pins);
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
    for (i = 0; i < m->n_pages; ++i) m->map_m2r[i] = m->map_r2m[i] = M_NONE;
    /* prefix index: node arrays, prompt families (each shares a prefix of
       random length with the previous one, so they branch inside pages),
       scratch for prompts and ids */
    if (m->cfg.max_prompt > m->max_len) m->cfg.max_prompt = m->max_len;
    m->fam_len = m->max_len + 2 * cfg->max_reserve + 4 * m->ps + 16;
    m->nd_cached = (unsigned char*)calloc(m->n_pages, 1);
    m->nd_parent = (uint32_t*)calloc(m->n_pages, sizeof(uint32_t));
    m->nd_ntok = (uint32_t*)calloc(m->n_pages, sizeof(uint32_t));
    m->nd_pins = (uint32_t*)calloc(m->n_pages, sizeof(uint32_t));
    m->nd_ns = (uint64_t*)calloc(m->n_pages, sizeof(uint64_t));
    m->nd_stamp = (uint64_t*)calloc(m->n_pages, sizeof(uint64_t));
    m->nd_tok = (llmkv_token*)calloc((size_t)m->n_pages * m->ps, sizeof(llmkv_token));
    m->path = (uint32_t*)calloc(m->n_pages + 1, sizeof(uint32_t));
    m->path2 = (uint32_t*)calloc(m->n_pages + 1, sizeof(uint32_t));
    m->prompt = (llmkv_token*)calloc(m->fam_len, sizeof(llmkv_token));
    m->fstack = (uint32_t*)calloc(m->n_pages, sizeof(uint32_t));
    for (i = 0; m->fstack && i < m->n_pages; ++i) m->fstack[i] = M_NONE; /* the first order is unknown */
    m->fsp = m->n_pages;
    if (!m->nd_cached || !m->nd_parent || !m->nd_ntok || !m->nd_pins || !m->nd_ns || !m->nd_stamp || !m->nd_tok ||
        !m->path || !m->path2 || !m->prompt || !m->fstack) {
        fprintf(stderr, "test_model: out of memory\n");
        exit(2);
    }
    for (i = 0; i < 4; ++i) m->tokbuf[i] = (llmkv_token*)m_xrealloc(NULL, (size_t)m->fam_len * sizeof(llmkv_token));
    for (i = 0; i < M_MAX_PINS; ++i) m->pins[i].nodes = (uint32_t*)m_xrealloc(NULL, (size_t)(m->n_pages + 1) * 4);
    for (i = 0; i < M_FAMS; ++i) {
        uint32_t j, cut = m->px && i && i != 3 ? m_below(m, 3 * m->ps + 1) : 0;
        m->fam[i] = (llmkv_token*)m_xrealloc(NULL, (size_t)m->fam_len * sizeof(llmkv_token));
        if (cut > m->fam_len) cut = m->fam_len;
        if (cut) memcpy(m->fam[i], m->fam[i - 1], (size_t)cut * sizeof(llmkv_token));
        for (j = cut; j < m->fam_len; ++j) m->fam[i][j] = m->px ? m_sym(m) : 0;
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
        if (m->px) {
            if (m->n + 1 >= (m->max_seqs < 6 ? m->max_seqs : 6) && w % 4 == 0)
                op_free(m); /* keep a few sequences, so they can grow and new ones come */
            else if (m->n == 0 || w < 3) op_create(m);
            else if (w < 13) op_create_prefix(m);
            else if (w < 31) op_reserve_put(m);
            else if (w < 35) cfg->metadata ? op_reserve_put(m) : op_reput(m);
            else if (w < 40) op_fork(m);
            else if (w < 42) cfg->metadata ? op_cow_burst(m) : op_reserve_fork_put(m);
            else if (w < 43) op_cow_burst(m);
            else if (w < 44) op_many_forked(m);
            else if (w < 50 || (m_avail(m) == 0 && w < 60)) op_truncate(m);
            else if (w < 58) op_free(m);
            else if (w < 63) cfg->metadata ? op_nodata(m) : op_gather(m);
            else if (w < 68) op_reserve_many(m);
            else if (w < 71) op_batch(m);
            else if (w < 72) op_batch_bad(m);
            else if (w < 73) op_stale(m);
            else if (w < 77) op_publish(m);
            else if (w < 80) op_mark_written(m);
            else if (w < 85) op_match(m);
            else if (w < 89) op_pin(m);
            else if (w < 93) op_unpin(m);
            else if (w < 95) op_evict(m);
            else if (w < 97) op_prefix_bad(m);
            else if (w < 99) op_create_prefix(m);
            else m_take_cmds(m);
            if (cov) cov->ops++;
        } else if (m->n == 0 || w < 7) op_create(m);
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
        if (m->px) m_check_prefix(m);
        if (cfg->metadata || i % 64 == 63 || (m->px && i % 8 == 7)) m_check_data(m);
    }
    if (!m->x.fails) m_check_data(m);

    /* free everything: the pool must be whole again (a prefix cache keeps
       its pages cached until the pins go and everything is evicted) */
    m->x.op = cfg->n_ops;
    while (m->n && !m->x.fails) op_free(m);
    while (m->px && m->n_pins && !m->x.fails) {
        m->x.op++;
        op_unpin(m);
    }
    if (!m->x.fails && m->px) {
        uint32_t cached = 0, got = M_NONE, p;
        m_check_stats(m);
        m_check_prefix(m);
        for (p = 0; p < m->n_pages; ++p) cached += m->nd_cached[p];
        MEQ(m, m_evictable(m), cached);
        MEQ(m, llmkv_prefix_evict(m->c, 0xFFFFFFFFu, &got), LLMKV_OK);
        MEQ(m, got, cached);
        while (m_evict_one(m)) {}
    }
    if (!m->x.fails) {
        llmkv_stats st;
        memset(&st, 0, sizeof st);
        MEQ(m, llmkv_cache_stats(m->c, &st), LLMKV_OK);
        MEQ(m, st.n_pages_free, m->n_pages);
        MEQ(m, st.n_seqs, 0);
        MEQ(m, st.n_pages_cached, 0);
        MEQ(m, llmkv_cache_check(m->c, NULL, 0), LLMKV_OK);
        if (m->px) m_check_stats(m);
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
    free(m->nd_cached);
    free(m->nd_parent);
    free(m->nd_ntok);
    free(m->nd_pins);
    free(m->nd_ns);
    free(m->nd_stamp);
    free(m->nd_tok);
    free(m->path);
    free(m->path2);
    free(m->prompt);
    free(m->fstack);
    for (i = 0; i < 4; ++i) free(m->tokbuf[i]);
    for (i = 0; i < M_MAX_PINS; ++i) free(m->pins[i].nodes);
    for (i = 0; i < M_FAMS; ++i) free(m->fam[i]);
    free(m);
}

static double m_scale_env(const char* name) {
    const char* e = getenv(name);
    double v = 1.0;
    if (e && *e) {
        char* end = NULL;
        v = strtod(e, &end);
        if (end == e || !(v > 0.0)) v = 1.0;
    }
    return v;
}

static double m_scale(void) { return m_scale_env("LLMKV_TEST_SCALE"); }

static unsigned m_scaled_by(unsigned n, double scale) {
    double v = (double)n * scale;
    return v < 20.0 ? 20u : v > 1e7 ? 10000000u : (unsigned)v;
}

static unsigned m_scaled(unsigned n) { return m_scaled_by(n, m_scale()); }

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
                m_run(t, &c, NULL);
            }
    {
        /* storage type left at its default (F16) */
        mcfg c;
        m_base(&c, 7, 5);
        c.n_ops = m_scaled(600);
        c.seed = 0x5EED1000ull;
        m_run(t, &c, NULL);
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
            m_run(t, &c, NULL);
        }
}

/* Prefix-index configurations: page sizes 1 to 32 against prompts of up to
   a few dozen tokens, tight capacity (eviction on most reserves), host and
   metadata-only storage, a few pins at most. */
static void test_model_prefix(tst* t) {
    /* ps, n_pages, shape, k, v, metadata, lazy, max_pins, alphabet, namespaces, max_prompt, max_reserve, ops */
    static const struct {
        uint32_t ps, n_pages, shape, kt, vt, metadata, lazy, max_pins, alphabet, n_ns, max_prompt, max_reserve, ops;
    } C[] = {
        {1, 24, 0, 0, 1, 0, 0, 3, 2, 3, 20, 6, 19200},  /* pages tiny against prompts */
        {1, 40, 1, 1, 2, 0, 0, 2, 3, 2, 30, 8, 12800},
        {2, 14, 5, 2, 0, 0, 0, 4, 2, 2, 20, 6, 19200},
        {3, 12, 0, 1, 1, 0, 0, 0, 2, 3, 24, 8, 16000},  /* max_pins default (64) */
        {4, 9, 2, 0, 2, 0, 0, 1, 3, 1, 24, 8, 11200},
        {7, 8, 1, 0, 0, 0, 0, 3, 2, 2, 40, 14, 12800},
        {16, 6, 0, 1, 2, 0, 0, 2, 2, 2, 64, 24, 11200},
        {32, 4, 5, 2, 1, 0, 0, 2, 2, 1, 60, 40, 8000}, /* prompts mostly inside one page: partial nodes */
        {1, 20, 0, 0, 1, 1, 0, 2, 2, 2, 18, 6, 16000},  /* metadata-only */
        {2, 12, 1, 2, 0, 1, 1, 3, 2, 3, 20, 6, 16000},  /* metadata-only, lazy writes */
        {5, 10, 5, 0, 0, 1, 0, 1, 3, 2, 30, 10, 12800},
        {16, 8, 0, 1, 1, 1, 1, 4, 2, 1, 64, 24, 9600},
        {2, 64, 1, 0, 1, 0, 0, 8, 2, 2, 60, 12, 8000}, /* roomy: deep trees, eviction only when full */
    };
    static const llmkv_dtype types[3] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16};
    double scale = getenv("LLMKV_TEST_PREFIX_SCALE") ? m_scale_env("LLMKV_TEST_PREFIX_SCALE") : m_scale();
    mcov cov;
    unsigned i;
    clock_t t0 = clock();
    memset(&cov, 0, sizeof cov);
    { /* the descriptor's limits */
        llmkv_desc d = tst_desc(1, 1, 1, 4, 8, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
        llmkv_cache* c = NULL;
        d.prefix_index = 1;
        d.max_pins = 65537;
        TST_EQ(t, llmkv_cache_create(&d, &c), LLMKV_ERR_INVALID_ARGUMENT);
        if (c) llmkv_cache_destroy(c);
        c = NULL;
        d.max_pins = 65536;
        TST_EQ(t, llmkv_cache_create(&d, &c), LLMKV_OK);
        llmkv_cache_destroy(c);
    }
    for (i = 0; i < sizeof C / sizeof C[0]; ++i) {
        mcfg c;
        memset(&c, 0, sizeof c);
        c.n_layers = M_SHAPES[C[i].shape][0];
        c.n_kv_heads = M_SHAPES[C[i].shape][1];
        c.head_dim = M_SHAPES[C[i].shape][2];
        c.page_size = C[i].ps;
        c.n_pages = C[i].n_pages;
        c.k_dtype = types[C[i].kt];
        c.v_dtype = types[C[i].vt];
        c.metadata = (int)C[i].metadata;
        c.lazy = (int)C[i].lazy;
        if (c.lazy) c.max_pending = 2 + i % 3;
        c.max_seqs = i % 3 == 1 ? 4 + i % 4 : 0;
        if (i % 4 == 2) c.max_seq_len = C[i].max_prompt + C[i].ps;
        c.max_reserve = C[i].max_reserve;
        c.prefix = 1;
        c.max_pins = C[i].max_pins;
        c.alphabet = C[i].alphabet;
        c.n_ns = C[i].n_ns;
        c.max_prompt = C[i].max_prompt;
        c.n_ops = m_scaled_by(C[i].ops, scale);
        c.seed = 0x9F1E0000ull + i;
        {
            mcov before = cov;
            m_run(t, &c, &cov);
            if (t->verbose && getenv("LLMKV_TEST_VERBOSE") && strcmp(getenv("LLMKV_TEST_VERBOSE"), "2") == 0)
                fprintf(stderr,
                        "  model prefix config %u (page size %u): ops %llu evictions %llu dedupes %llu published "
                        "%llu+%llu prompts %llu (full pages %llu, inside a page %llu, capped %llu) refused %llu "
                        "pins %llu (+%llu refused)\n",
                        i, C[i].ps, cov.ops - before.ops, cov.evictions - before.evictions,
                        cov.dedupes - before.dedupes, cov.published - before.published,
                        cov.partial_published - before.partial_published, cov.prompts - before.prompts,
                        cov.matched_full_pages - before.matched_full_pages,
                        cov.matched_inside_page - before.matched_inside_page, cov.capped - before.capped,
                        cov.reserve_fail_pages - before.reserve_fail_pages, cov.pins - before.pins,
                        cov.pins_refused - before.pins_refused);
        }
    }
    if (t->verbose) {
        double secs = (double)(clock() - t0) / CLOCKS_PER_SEC;
        fprintf(stderr,
                "  model prefix: %llu operations in %.1f s CPU; evictions %llu, dedupes %llu, published %llu full + %llu "
                "partial, prompts %llu (%llu in other namespaces; %llu full pages matched, %llu matches inside a page, "
                "%llu capped at n-1), reserves refused for pages %llu, pins %llu (+%llu refused), unpins %llu (+%llu "
                "stale), evict calls %llu\n",
                cov.ops, secs, cov.evictions, cov.dedupes, cov.published, cov.partial_published, cov.prompts,
                cov.ns_prompts, cov.matched_full_pages, cov.matched_inside_page, cov.capped, cov.reserve_fail_pages,
                cov.pins, cov.pins_refused, cov.unpins, cov.stale_unpins, cov.evict_calls);
    }
}

void suite_model(tst* t) {
    TST_RUN(t, test_model_random_ops);
    TST_RUN(t, test_model_metadata_only);
    TST_RUN(t, test_model_prefix);
}
