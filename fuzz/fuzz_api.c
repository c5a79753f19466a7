/* fuzz_api.c - libFuzzer target: the public API driven by a byte stream.

   Input: 6 bytes of cache descriptor (fz_desc_from), then up to MAX_OPS
   operations, each an op byte (FZ_OP_* modulo FZ_OP_COUNT) followed by its
   arguments. Arguments deliberately include invalid values: handles of
   freed or never-made sequences and pins, lengths past the end or huge,
   layers out of range, negative token ids, duplicate sequences.

   A plain model of every sequence (length, token ids, namespace and the
   K/V watermarks: positions below them were written by llmkv_put with
   fz_value) is checked after each op: llmkv_seq_length, llmkv_seq_tokens
   and the gathered values (exact for F32/F16/BF16, the quantize/dequantize
   round trip for Q8/Q4/FP8; Q4C keys are compared between caches only).
   After every op llmkv_cache_check must pass; a failed mutating call
   must leave the stats as they were; a call on a stale handle must fail;
   creating a sequence must succeed exactly when a slot is free.

   The save/load op saves (plain, checkpoint or incremental: the harness
   keeps the checkpoint chain) and loads the result: the loaded cache must
   pass the check, have equal stats, hold every model sequence under the
   same handle with the same bytes, and answer prefix matches alike.
   It may then run on in lockstep with the original (either one becoming
   the primary): every later op runs on both, which must agree on every
   result, output, stat and gathered byte (attention outputs included,
   when every position they read was written).

   The attend op builds a batch (checking its views against the model) and
   attends on one thread, on a pool of 2, or through llmkv_attend_part /
   llmkv_attend_merge (with 2 parts it must match the pool bit for bit);
   with a reserve between build and attend it must report a stale batch.

   The export/import op exports a sequence (optionally with one byte
   changed) and imports it into the same cache(s).
   FZ_VERBOSE=1 in the environment prints each op and the library's log.
   Build: make build/fuzz_api. */
#include "fuzz_util.h"

#define MAX_OPS 200
#define NC 2        /* caches run in lockstep */
#define MS 8        /* model sequence slots (= the largest max_seqs) */
#define MP 4        /* model pin slots (= the largest max_pins) */
#define CHAIN_MAX 5 /* base + increments kept */
#define NS_COUNT 3

typedef struct mseq {
    int live;
    llmkv_seq h[NC];            /* live: its handle in each cache; else a stale (or zero) one */
    uint32_t len;
    uint32_t w[FZ_MAX_LAYERS][2]; /* K (0) and V (1) written below these positions */
    uint64_t ns;
    uint32_t script;
    llmkv_token tok[FZ_MAX_LEN];
} mseq;

typedef struct mpin {
    int live;
    llmkv_pin h[NC];
} mpin;

typedef struct ctx {
    llmkv_desc d;
    uint32_t row, n_layers;
    llmkv_cache* c[NC];
    uint32_t nc;
    mseq s[MS];
    mpin p[MP];
    unsigned char* chain[CHAIN_MAX];
    size_t chain_size[CHAIN_MAX];
    uint32_t n_chain;
    int has_ckpt;   /* c[0] has a latest checkpoint */
    /* Q4C keys: a put left reserved slots unwritten before it, so a page
       may have been quantized with whatever those slots' staging held,
       which differs between caches: Q4C keys are then compared between
       caches only right after a load. */
    int q4c_gap, q4c_exact;
    fz_stream in;
} ctx;

static const uint64_t ns_values[NS_COUNT] = {0, 1, (uint64_t)1 << 40};

/* Token of script `sc` at position p: the scripts share prefixes of 5, 17
   and 40 tokens with script 0, so prompts match in part. */
static llmkv_token script_tok(uint32_t sc, uint32_t p) {
    static const uint32_t div[4] = {0xffffffffu, 5, 17, 40};
    sc &= 3;
    return p >= div[sc] ? (llmkv_token)(50 + sc * 4 + p % 3) : (llmkv_token)(p * 3 % 7);
}

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

static uint32_t n_live(const ctx* x) {
    uint32_t i, n = 0;
    for (i = 0; i < MS; ++i) n += x->s[i].live;
    return n;
}
static int free_slot(const ctx* x) {
    int i;
    for (i = 0; i < MS; ++i)
        if (!x->s[i].live) return i;
    return -1;
}
static int free_pin(const ctx* x) {
    int i;
    for (i = 0; i < MP; ++i)
        if (!x->p[i].live) return i;
    return -1;
}

/* A sequence argument: a model slot (live, or dead with a stale handle),
   or -1 for a handle no cache ever gave (zero, or a huge generation). */
static int pick_seq(ctx* x, llmkv_seq* bad) {
    uint8_t b = fz_u8(&x->in);
    if (b < 0xf0) return b % MS;
    bad->id = b == 0xff ? 0 : 0xfffffff0u | b;
    return -1;
}
/* Prefer a live slot when the byte names a dead one half the time. */
static int pick_live_seq(ctx* x, llmkv_seq* bad) {
    int i = pick_seq(x, bad), j;
    if (i >= 0 && !x->s[i].live && (fz_u8(&x->in) & 1))
        for (j = 1; j <= MS; ++j)
            if (x->s[(i + j) % MS].live) return (i + j) % MS;
    return i;
}
static llmkv_seq handle_of(const ctx* x, int i, llmkv_seq bad, uint32_t ci) { return i >= 0 ? x->s[i].h[ci] : bad; }
static int is_live(const ctx* x, int i) { return i >= 0 && x->s[i].live; }

/* A length: mostly small, sometimes at or past the limits. */
static uint32_t pick_len(ctx* x, uint32_t typical) {
    uint8_t b = fz_u8(&x->in);
    switch (b >> 5) {
    case 0: return 0xffffffffu - (b & 3);
    case 1: return x->d.max_seq_len + (b & 3) - 1;
    default: return typical ? (uint32_t)(b % (typical + 1)) : 0;
    }
}

static void stats_all(ctx* x, llmkv_stats* st) {
    uint32_t ci;
    for (ci = 0; ci < x->nc; ++ci) st[ci] = fz_stats(x->c[ci]);
}
/* A failed mutating call leaves every cache as it was. */
static void assert_unchanged(ctx* x, const llmkv_stats* before, const char* what) {
    uint32_t ci;
    for (ci = 0; ci < x->nc; ++ci) {
        llmkv_stats now = fz_stats(x->c[ci]);
        if (!fz_stats_equal(&before[ci], &now, 1, what)) FZ_ASSERT(!"a failed call changed the cache");
    }
}
/* Every cache returned the same result. */
static llmkv_result same(ctx* x, const llmkv_result* r, const char* what) {
    uint32_t ci;
    for (ci = 1; ci < x->nc; ++ci)
        if (r[ci] != r[0]) {
            fprintf(stderr, "%s: cache 0 returned %s, cache %u %s\n", what, llmkv_result_string(r[0]), ci,
                    llmkv_result_string(r[ci]));
            FZ_ASSERT(!"caches in lockstep disagree");
        }
    return r[0];
}
static void same_u32(ctx* x, const uint32_t* v, const char* what) {
    uint32_t ci;
    for (ci = 1; ci < x->nc; ++ci)
        if (v[ci] != v[0]) {
            fprintf(stderr, "%s: cache 0 gave %u, cache %u gave %u\n", what, v[0], ci, v[ci]);
            FZ_ASSERT(!"caches in lockstep disagree");
        }
}

/* ------------------------------------------------------------------------ */
/* Verification against the model                                          */
/* ------------------------------------------------------------------------ */

static float gbuf[NC][2][FZ_MAX_LEN * FZ_ROW_MAX];

/* Compares gathered rows (type out_t, rows `stride` bytes apart, starting
   at position pos) with what the model says positions below the
   watermark hold. */
/* fz_expect of (position, layer, part) for this input's cache, computed
   once per input (quantizing is the costly part of verification). */
static float exp_rows[FZ_MAX_LAYERS][2][FZ_MAX_LEN][FZ_ROW_MAX];
static uint8_t exp_have[FZ_MAX_LAYERS][2][FZ_MAX_LEN];

static const float* expected_row(ctx* x, uint32_t pos, uint32_t layer, uint32_t part) {
    float* row = exp_rows[layer][part][pos];
    if (!exp_have[layer][part][pos]) {
        fz_expect(row, part ? x->d.v_dtype : x->d.k_dtype, pos, layer, part, x->d.n_kv_heads, x->d.head_dim);
        exp_have[layer][part][pos] = 1;
    }
    return row;
}

static void check_rows(ctx* x, const mseq* m, uint32_t layer, uint32_t part, uint32_t pos, uint32_t n,
                       const unsigned char* buf, size_t stride, llmkv_dtype out_t) {
    llmkv_dtype stored = part ? x->d.v_dtype : x->d.k_dtype;
    uint32_t i, e;
    if (stored == LLMKV_DTYPE_Q4C) return;
    for (i = 0; i < n; ++i) {
        const unsigned char* r = buf + (size_t)i * stride;
        const float* want;
        if (pos + i >= m->w[layer][part]) continue;
        want = expected_row(x, pos + i, layer, part);
        if (out_t == LLMKV_DTYPE_F32 && memcmp(r, want, (size_t)x->row * 4) == 0) continue;
        for (e = 0; e < x->row; ++e) {
            int ok;
            if (out_t == LLMKV_DTYPE_F32) {
                ok = memcmp(r + e * 4, &want[e], 4) == 0;
            } else {
                uint16_t got, exp = out_t == LLMKV_DTYPE_F16 ? llmkv_f32_to_f16(want[e]) : llmkv_f32_to_bf16(want[e]);
                memcpy(&got, r + e * 2, 2);
                ok = got == exp;
            }
            if (!ok) {
                fprintf(stderr, "value mismatch: layer %u part %u position %u element %u (watermark %u, stored %s, "
                                "gathered as %s)\n",
                        layer, part, pos + i, e, m->w[layer][part], llmkv_dtype_name(stored), llmkv_dtype_name(out_t));
                FZ_ASSERT(!"a gathered value differs from the value put");
            }
        }
    }
}

/* Length, tokens and written values of model sequence i in every cache,
   and (lockstep) the same gathered bytes in each. */
static void verify_seq(ctx* x, int i) {
    const mseq* m = &x->s[i];
    uint32_t ci, layer, part, len;
    static llmkv_token t[FZ_MAX_LEN];
    for (ci = 0; ci < x->nc; ++ci) {
        llmkv_result r = llmkv_seq_length(x->c[ci], m->h[ci], &len);
        if (!m->live) {
            FZ_ASSERT(r == LLMKV_ERR_STALE_HANDLE && len == 0);
            continue;
        }
        FZ_OK(r);
        if (len != m->len) fprintf(stderr, "cache %u: length %u, model %u\n", ci, len, m->len);
        FZ_ASSERT(len == m->len);
        if (x->d.prefix_index) {
            FZ_OK(llmkv_seq_tokens(x->c[ci], m->h[ci], 0, len, t));
            if (len && memcmp(t, m->tok, (size_t)len * sizeof t[0]) != 0) FZ_ASSERT(!"token ids differ from the model");
        }
    }
    if (!m->live || m->len == 0) return;
    for (layer = 0; layer < x->n_layers; ++layer) {
        uint32_t wmax = m->w[layer][0] > m->w[layer][1] ? m->w[layer][0] : m->w[layer][1];
        if (wmax == 0) continue;
        for (ci = 0; ci < x->nc; ++ci) {
            FZ_OK(llmkv_gather(x->c[ci], m->h[ci], layer, 0, wmax, gbuf[ci][0], 0, gbuf[ci][1], 0, LLMKV_DTYPE_F32));
            for (part = 0; part < 2; ++part)
                check_rows(x, m, layer, part, 0, m->w[layer][part], (const unsigned char*)gbuf[ci][part],
                           (size_t)x->row * 4, LLMKV_DTYPE_F32);
        }
        for (ci = 1; ci < x->nc; ++ci)
            for (part = 0; part < 2; ++part)
                if ((part == 1 || x->d.k_dtype != LLMKV_DTYPE_Q4C || !x->q4c_gap || x->q4c_exact) &&
                    memcmp(gbuf[0][part], gbuf[ci][part], (size_t)m->w[layer][part] * x->row * 4) != 0) {
                    fprintf(stderr, "layer %u part %u: caches gather different bytes below position %u\n", layer, part,
                            m->w[layer][part]);
                    FZ_ASSERT(!"caches in lockstep gather different bytes");
                }
    }
}

static void verify_all(ctx* x) {
    int i;
    for (i = 0; i < MS; ++i) verify_seq(x, i);
}

/* Checks every cache and compares their stats. */
static void after_op(ctx* x, const char* what) {
    uint32_t ci;
    llmkv_stats st[NC];
    for (ci = 0; ci < x->nc; ++ci) fz_check(x->c[ci], what);
    if (x->nc < 2) return;
    stats_all(x, st);
    for (ci = 1; ci < x->nc; ++ci)
        if (!fz_stats_equal(&st[0], &st[ci], 1, what)) FZ_ASSERT(!"caches in lockstep have different stats");
}

/* ------------------------------------------------------------------------ */
/* Ops                                                                      */
/* ------------------------------------------------------------------------ */

static void op_create(ctx* x) {
    llmkv_seq h[NC];
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint32_t ci;
    int i = free_slot(x);
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_seq_create(x->c[ci], &h[ci]);
    same(x, r, "seq_create");
    if (n_live(x) < x->d.max_seqs) {
        FZ_OK(r[0]);
        FZ_ASSERT(i >= 0);
        memset(&x->s[i], 0, sizeof x->s[i]);
        x->s[i].live = 1;
        for (ci = 0; ci < x->nc; ++ci) x->s[i].h[ci] = h[ci];
        memset(x->s[i].tok, 0xff, sizeof x->s[i].tok);
    } else {
        FZ_ASSERT(r[0] == LLMKV_ERR_TOO_MANY_SEQUENCES);
        for (ci = 0; ci < x->nc; ++ci) FZ_ASSERT(h[ci].id == 0);
        assert_unchanged(x, st, "seq_create");
    }
}

static void op_free(ctx* x) {
    llmkv_seq bad;
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint32_t ci;
    int i = pick_seq(x, &bad);
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_seq_free(x->c[ci], handle_of(x, i, bad, ci));
    same(x, r, "seq_free");
    if (is_live(x, i)) {
        FZ_OK(r[0]);
        x->s[i].live = 0; /* its handles stay, stale */
    } else {
        FZ_ASSERT(r[0] == LLMKV_ERR_STALE_HANDLE);
        assert_unchanged(x, st, "seq_free of a stale handle");
    }
}

/* reserve (tokens 0) or reserve_tokens (1) */
static void op_reserve(ctx* x, int tokens) {
    llmkv_seq bad;
    llmkv_result r[NC];
    llmkv_stats st[NC];
    static llmkv_token t[FZ_MAX_LEN + 8];
    uint32_t ci, n, j, mode, sc;
    int i = pick_live_seq(x, &bad), invalid = 0, null_tokens = 0;
    uint32_t len = is_live(x, i) ? x->s[i].len : 0;
    n = pick_len(x, 40);
    mode = fz_u8(&x->in);
    sc = is_live(x, i) ? x->s[i].script : 0;
    if (tokens) {
        if ((mode & 7) == 1) sc = (mode >> 3) & 3; /* the sequence goes on as another script */
        null_tokens = (mode & 7) == 2;
        for (j = 0; j < n && j < FZ_MAX_LEN + 8; ++j) t[j] = script_tok(sc, len + j);
        if ((mode & 7) == 3 && n && n <= FZ_MAX_LEN + 8) {
            t[(mode >> 3) % n] = -1 - (llmkv_token)(mode >> 6); /* a negative id */
            invalid = 1;
        }
        if (n > FZ_MAX_LEN + 8 && !null_tokens) n = FZ_MAX_LEN + 8; /* the array holds no more */
    }
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) {
        llmkv_seq h = handle_of(x, i, bad, ci);
        r[ci] = tokens ? llmkv_reserve_tokens(x->c[ci], h, null_tokens ? NULL : t, n) : llmkv_reserve(x->c[ci], h, n);
    }
    same(x, r, tokens ? "reserve_tokens" : "reserve");
    if (tokens && !x->d.prefix_index) {
        FZ_ASSERT(r[0] == LLMKV_ERR_UNSUPPORTED);
        assert_unchanged(x, st, "reserve_tokens without an index");
        return;
    }
    if (!is_live(x, i)) {
        FZ_ASSERT(r[0] == LLMKV_ERR_STALE_HANDLE);
        assert_unchanged(x, st, "reserve of a stale handle");
        return;
    }
    if (n > x->d.max_seq_len - len) {
        FZ_ASSERT(r[0] == LLMKV_ERR_SEQUENCE_TOO_LONG);
    } else if (invalid) {
        FZ_ASSERT(r[0] == LLMKV_ERR_INVALID_ARGUMENT);
    }
    if (r[0] != LLMKV_OK) {
        FZ_ASSERT(r[0] == LLMKV_ERR_OUT_OF_PAGES || r[0] == LLMKV_ERR_SEQUENCE_TOO_LONG ||
                  r[0] == LLMKV_ERR_INVALID_ARGUMENT);
        assert_unchanged(x, st, "a failed reserve");
        return;
    }
    for (j = 0; j < n; ++j) x->s[i].tok[len + j] = tokens && !null_tokens ? t[j] : -1;
    if (tokens && !null_tokens) x->s[i].script = sc;
    x->s[i].len = len + n;
}

static void op_reserve_many(ctx* x) {
    llmkv_seq bad0, bad1, hs[2];
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint32_t ci, n[2], total;
    int i0 = pick_live_seq(x, &bad0), i1 = pick_live_seq(x, &bad1), k;
    n[0] = pick_len(x, 20);
    n[1] = pick_len(x, 20);
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) {
        hs[0] = handle_of(x, i0, bad0, ci);
        hs[1] = handle_of(x, i1, bad1, ci);
        r[ci] = llmkv_reserve_many(x->c[ci], hs, n, 2);
    }
    same(x, r, "reserve_many");
    if (!is_live(x, i0) || !is_live(x, i1) || i0 == i1) {
        FZ_ASSERT(r[0] != LLMKV_OK);
    }
    if (r[0] != LLMKV_OK) {
        assert_unchanged(x, st, "a failed reserve_many");
        return;
    }
    for (k = 0; k < 2; ++k) {
        mseq* m = &x->s[k ? i1 : i0];
        uint32_t j;
        total = m->len + n[k];
        FZ_ASSERT(total <= x->d.max_seq_len);
        for (j = m->len; j < total; ++j) m->tok[j] = -1;
        m->len = total;
    }
}

static void op_put(ctx* x) {
    static const llmkv_dtype src_types[4] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_DEFAULT};
    static float kb[(FZ_MAX_LEN + 2) * (FZ_ROW_MAX + 4)], vb[(FZ_MAX_LEN + 2) * (FZ_ROW_MAX + 4)];
    llmkv_seq bad;
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint32_t ci, layer, n, first, parts, extra, es;
    size_t stride;
    llmkv_dtype src;
    int i = pick_live_seq(x, &bad), expect_range = 0;
    uint8_t b = fz_u8(&x->in), lb = fz_u8(&x->in);
    uint32_t len = is_live(x, i) ? x->s[i].len : 0;
    layer = lb < 0xf0 ? lb % x->n_layers : x->n_layers + (lb & 3); /* sometimes out of range */
    n = fz_u8(&x->in);
    if (n < 0xf8) n = len ? n % (len + 1) : 0;
    else n = len + 1 + (n & 3); /* past the length */
    if (n > FZ_MAX_LEN + 1) n = FZ_MAX_LEN + 1;
    parts = 1 + b % 3;     /* 1: K, 2: V, 3: both */
    src = src_types[(b >> 2) & 3];
    extra = (b >> 4) & 3;  /* stride padding in elements */
    es = src == LLMKV_DTYPE_F32 || src == LLMKV_DTYPE_DEFAULT ? 4 : 2;
    stride = (size_t)(x->row + extra) * es;
    if (layer >= x->n_layers || n > len) expect_range = 1;
    first = n <= len ? len - n : 0;
    if (!expect_range) {
        fz_fill(kb, stride, first, n, layer, 0, x->row, src == LLMKV_DTYPE_DEFAULT ? LLMKV_DTYPE_F32 : src);
        fz_fill(vb, stride, first, n, layer, 1, x->row, src == LLMKV_DTYPE_DEFAULT ? LLMKV_DTYPE_F32 : src);
    }
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci)
        r[ci] = llmkv_put(x->c[ci], handle_of(x, i, bad, ci), layer, n, parts & 1 ? kb : NULL, stride,
                          parts & 2 ? vb : NULL, stride, src);
    same(x, r, "put");
    if (!is_live(x, i)) {
        FZ_ASSERT(r[0] == LLMKV_ERR_STALE_HANDLE);
    } else if (expect_range) {
        FZ_ASSERT(r[0] == LLMKV_ERR_OUT_OF_RANGE);
    }
    if (r[0] != LLMKV_OK) {
        FZ_ASSERT(r[0] == LLMKV_ERR_STALE_HANDLE || r[0] == LLMKV_ERR_OUT_OF_RANGE || r[0] == LLMKV_ERR_OUT_OF_PAGES);
        assert_unchanged(x, st, "a failed put");
        return;
    }
    if (n == 0) return;
    if ((parts & 1) && first > x->s[i].w[layer][0] && x->d.k_dtype == LLMKV_DTYPE_Q4C) x->q4c_gap = 1;
    if ((parts & 1) && first <= x->s[i].w[layer][0]) x->s[i].w[layer][0] = len;
    if ((parts & 2) && first <= x->s[i].w[layer][1]) x->s[i].w[layer][1] = len;
}

static void op_gather(ctx* x) {
    static const llmkv_dtype dst_types[4] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_DEFAULT};
    llmkv_seq bad;
    llmkv_result r[NC];
    uint32_t ci, layer, pos, n, part, pad;
    int i = pick_live_seq(x, &bad);
    uint8_t b = fz_u8(&x->in), lb = fz_u8(&x->in);
    uint32_t len = is_live(x, i) ? x->s[i].len : 0;
    llmkv_dtype dst = dst_types[b & 3], out_t[2];
    size_t stride[2];
    layer = lb < 0xf0 ? lb % x->n_layers : x->n_layers + (lb & 3);
    pos = pick_len(x, len);
    n = pick_len(x, len >= pos ? len - pos : 0);
    pad = (b >> 2) & 3;
    for (part = 0; part < 2; ++part) {
        llmkv_dtype stored = part ? x->d.v_dtype : x->d.k_dtype;
        out_t[part] = dst != LLMKV_DTYPE_DEFAULT ? dst
                      : (stored == LLMKV_DTYPE_F32 || stored == LLMKV_DTYPE_F16 || stored == LLMKV_DTYPE_BF16)
                          ? stored
                          : LLMKV_DTYPE_F32;
        stride[part] = (size_t)(x->row + pad) * llmkv_dtype_size(out_t[part]);
    }
    if (n > FZ_MAX_LEN || (uint64_t)n * stride[0] > sizeof gbuf[0][0] || (uint64_t)n * stride[1] > sizeof gbuf[0][0])
        n = FZ_MAX_LEN + 1; /* too long for the buffers: must fail before writing */
    for (ci = 0; ci < x->nc; ++ci)
        r[ci] = llmkv_gather(x->c[ci], handle_of(x, i, bad, ci), layer, pos, n,
                             n <= FZ_MAX_LEN ? (void*)gbuf[ci][0] : NULL, stride[0],
                             n <= FZ_MAX_LEN ? (void*)gbuf[ci][1] : NULL, stride[1], dst);
    same(x, r, "gather");
    if (!is_live(x, i)) {
        FZ_ASSERT(r[0] == LLMKV_ERR_STALE_HANDLE);
        return;
    }
    if (layer >= x->n_layers || pos > len || n > len - pos) {
        FZ_ASSERT(r[0] == LLMKV_ERR_OUT_OF_RANGE);
        return;
    }
    FZ_OK(r[0]);
    for (ci = 0; ci < x->nc; ++ci)
        for (part = 0; part < 2; ++part)
            check_rows(x, &x->s[i], layer, part, pos, n, (const unsigned char*)gbuf[ci][part], stride[part], out_t[part]);
}

static void op_fork(ctx* x) {
    llmkv_seq bad, h[NC];
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint32_t ci;
    int i = pick_live_seq(x, &bad), j = free_slot(x);
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_fork(x->c[ci], handle_of(x, i, bad, ci), &h[ci]);
    same(x, r, "fork");
    if (!is_live(x, i)) FZ_ASSERT(r[0] == LLMKV_ERR_STALE_HANDLE);
    else if (n_live(x) >= x->d.max_seqs) FZ_ASSERT(r[0] == LLMKV_ERR_TOO_MANY_SEQUENCES);
    else FZ_OK(r[0]);
    if (r[0] != LLMKV_OK) {
        for (ci = 0; ci < x->nc; ++ci) FZ_ASSERT(h[ci].id == 0);
        assert_unchanged(x, st, "a failed fork");
        return;
    }
    FZ_ASSERT(j >= 0);
    x->s[j] = x->s[i];
    for (ci = 0; ci < x->nc; ++ci) x->s[j].h[ci] = h[ci];
    verify_seq(x, j);
}

static void op_truncate(ctx* x) {
    llmkv_seq bad;
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint32_t ci, n, layer;
    int i = pick_live_seq(x, &bad);
    uint32_t len = is_live(x, i) ? x->s[i].len : 0;
    n = pick_len(x, len + 1);
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_truncate(x->c[ci], handle_of(x, i, bad, ci), n);
    same(x, r, "truncate");
    if (!is_live(x, i)) FZ_ASSERT(r[0] == LLMKV_ERR_STALE_HANDLE);
    else if (n > len) FZ_ASSERT(r[0] == LLMKV_ERR_OUT_OF_RANGE);
    else FZ_OK(r[0]);
    if (r[0] != LLMKV_OK) {
        assert_unchanged(x, st, "a failed truncate");
        return;
    }
    x->s[i].len = n;
    for (layer = 0; layer < FZ_MAX_LAYERS; ++layer) {
        if (x->s[i].w[layer][0] > n) x->s[i].w[layer][0] = n;
        if (x->s[i].w[layer][1] > n) x->s[i].w[layer][1] = n;
    }
    memset(x->s[i].tok + n, 0xff, (FZ_MAX_LEN - n) * sizeof(llmkv_token));
}

/* A prompt from a script: n tokens, sometimes with a negative id. */
static uint32_t pick_prompt(ctx* x, llmkv_token* t, uint32_t cap, int* invalid, uint32_t* script) {
    uint8_t b = fz_u8(&x->in);
    uint32_t n = pick_len(x, 70), j;
    *script = b & 3;
    *invalid = 0;
    if (n > cap) n = cap;
    for (j = 0; j < n; ++j) t[j] = script_tok(*script, j);
    if ((b & 0x1c) == 0x1c && n) {
        t[(b >> 5) % n] = -7;
        *invalid = 1;
    }
    return n;
}

static void op_create_prefix(ctx* x) {
    static llmkv_token t[FZ_MAX_LEN + 8];
    llmkv_seq h[NC];
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint32_t ci, n, cached[NC], script, layer;
    int invalid, j = free_slot(x);
    uint64_t ns = ns_values[fz_u8(&x->in) % NS_COUNT];
    n = pick_prompt(x, t, FZ_MAX_LEN + 8, &invalid, &script);
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_seq_create_prefix(x->c[ci], ns, t, n, &h[ci], &cached[ci]);
    same(x, r, "seq_create_prefix");
    if (invalid) FZ_ASSERT(r[0] == LLMKV_ERR_INVALID_ARGUMENT || r[0] == LLMKV_ERR_UNSUPPORTED);
    else if (!x->d.prefix_index) FZ_ASSERT(r[0] == LLMKV_ERR_UNSUPPORTED);
    else if (n > x->d.max_seq_len) FZ_ASSERT(r[0] == LLMKV_ERR_SEQUENCE_TOO_LONG);
    else if (n_live(x) >= x->d.max_seqs) FZ_ASSERT(r[0] == LLMKV_ERR_TOO_MANY_SEQUENCES);
    else FZ_OK(r[0]);
    if (r[0] != LLMKV_OK) {
        for (ci = 0; ci < x->nc; ++ci) FZ_ASSERT(h[ci].id == 0 && cached[ci] == 0);
        assert_unchanged(x, st, "a failed seq_create_prefix");
        return;
    }
    same_u32(x, cached, "seq_create_prefix n_cached");
    FZ_ASSERT(n == 0 ? cached[0] == 0 : cached[0] < n);
    FZ_ASSERT(j >= 0);
    memset(&x->s[j], 0, sizeof x->s[j]);
    memset(x->s[j].tok, 0xff, sizeof x->s[j].tok);
    x->s[j].live = 1;
    for (ci = 0; ci < x->nc; ++ci) x->s[j].h[ci] = h[ci];
    x->s[j].len = cached[0];
    x->s[j].ns = ns;
    x->s[j].script = script;
    memcpy(x->s[j].tok, t, (size_t)cached[0] * sizeof t[0]);
    for (layer = 0; layer < FZ_MAX_LAYERS; ++layer) x->s[j].w[layer][0] = x->s[j].w[layer][1] = cached[0];
    verify_seq(x, j);
}

static void op_match(ctx* x) {
    static llmkv_token t[FZ_MAX_LEN + 8];
    llmkv_result r[NC];
    uint32_t ci, n, m[NC], script;
    int invalid;
    uint64_t ns = ns_values[fz_u8(&x->in) % NS_COUNT];
    n = pick_prompt(x, t, FZ_MAX_LEN + 8, &invalid, &script);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_prefix_match(x->c[ci], ns, t, n, &m[ci]);
    same(x, r, "prefix_match");
    if (invalid) FZ_ASSERT(r[0] == LLMKV_ERR_INVALID_ARGUMENT || r[0] == LLMKV_ERR_UNSUPPORTED);
    else if (!x->d.prefix_index) FZ_ASSERT(r[0] == LLMKV_ERR_UNSUPPORTED);
    else FZ_OK(r[0]);
    if (r[0] != LLMKV_OK) return;
    same_u32(x, m, "prefix_match n_matched");
    FZ_ASSERT(m[0] <= n);
}

static void op_publish(ctx* x) {
    llmkv_seq bad;
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint32_t ci;
    int i = pick_live_seq(x, &bad), partial = fz_u8(&x->in) & 1;
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_seq_publish(x->c[ci], handle_of(x, i, bad, ci), partial);
    same(x, r, "seq_publish");
    if (!x->d.prefix_index) FZ_ASSERT(r[0] == LLMKV_ERR_UNSUPPORTED);
    else if (!is_live(x, i)) FZ_ASSERT(r[0] == LLMKV_ERR_STALE_HANDLE);
    else FZ_OK(r[0]);
    if (r[0] != LLMKV_OK) assert_unchanged(x, st, "a failed publish");
    if (is_live(x, i)) verify_seq(x, i);
}

static void op_pin(ctx* x) {
    static llmkv_token t[FZ_MAX_LEN + 8];
    llmkv_pin h[NC];
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint32_t ci, n, pinned[NC], script, live = 0;
    int invalid, j = free_pin(x), k;
    uint64_t ns = ns_values[fz_u8(&x->in) % NS_COUNT];
    n = pick_prompt(x, t, FZ_MAX_LEN + 8, &invalid, &script);
    for (k = 0; k < MP; ++k) live += (uint32_t)x->p[k].live;
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_prefix_pin(x->c[ci], ns, t, n, &h[ci], &pinned[ci]);
    same(x, r, "prefix_pin");
    if (invalid) FZ_ASSERT(r[0] == LLMKV_ERR_INVALID_ARGUMENT || r[0] == LLMKV_ERR_UNSUPPORTED);
    else if (!x->d.prefix_index) FZ_ASSERT(r[0] == LLMKV_ERR_UNSUPPORTED);
    else if (live >= x->d.max_pins) FZ_ASSERT(r[0] == LLMKV_ERR_TOO_MANY_PINS);
    else FZ_OK(r[0]);
    if (r[0] != LLMKV_OK) {
        assert_unchanged(x, st, "a failed pin");
        return;
    }
    same_u32(x, pinned, "prefix_pin n_pinned");
    FZ_ASSERT(pinned[0] <= n && j >= 0);
    x->p[j].live = 1;
    for (ci = 0; ci < x->nc; ++ci) x->p[j].h[ci] = h[ci];
}

static void op_unpin(ctx* x) {
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint32_t ci;
    uint8_t b = fz_u8(&x->in);
    int j = b < 0xf0 ? b % MP : -1;
    llmkv_pin bad;
    bad.id = b == 0xff ? 0 : 0xfffffff0u | b;
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_prefix_unpin(x->c[ci], j >= 0 ? x->p[j].h[ci] : bad);
    same(x, r, "prefix_unpin");
    if (!x->d.prefix_index) FZ_ASSERT(r[0] == LLMKV_ERR_UNSUPPORTED);
    else if (j < 0 || !x->p[j].live) FZ_ASSERT(r[0] == LLMKV_ERR_STALE_HANDLE);
    else FZ_OK(r[0]);
    if (r[0] != LLMKV_OK) {
        assert_unchanged(x, st, "a failed unpin");
        return;
    }
    x->p[j].live = 0;
}

static void op_evict(ctx* x) {
    llmkv_result r[NC];
    uint32_t ci, n[NC];
    uint8_t b = fz_u8(&x->in);
    uint32_t max = b >= 0xf0 ? UINT32_MAX : b % 8;
    llmkv_stats st = fz_stats(x->c[0]);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_prefix_evict(x->c[ci], max, &n[ci]);
    same(x, r, "prefix_evict");
    if (!x->d.prefix_index) {
        FZ_ASSERT(r[0] == LLMKV_ERR_UNSUPPORTED);
        return;
    }
    FZ_OK(r[0]);
    same_u32(x, n, "prefix_evict n_evicted");
    FZ_ASSERT(n[0] <= max && n[0] <= st.n_pages_evictable);
    FZ_ASSERT(n[0] == (max < st.n_pages_evictable ? max : st.n_pages_evictable));
}

/* One attention call: mode 2 on a pool of 2 threads (made once, from the
   default allocator: it outlives inputs), mode 3 through
   llmkv_attend_part / llmkv_attend_merge with nth parts called in turn on
   this thread, else on the calling thread alone. */
static llmkv_threadpool* attn_pool;

static llmkv_result run_attend(const llmkv_cache* c, const llmkv_batch* b, const llmkv_attn_desc* a, uint32_t mode,
                               uint32_t nth) {
    if (mode == 2) {
        if (!attn_pool) FZ_OK(llmkv_threadpool_create(2, NULL, &attn_pool));
        return llmkv_attend(c, b, a, attn_pool);
    }
    if (mode == 3) {
        size_t ws = 0;
        uint32_t i;
        void* w;
        llmkv_result r = llmkv_attend_workspace_size(c, b, a, nth, &ws);
        if (r != LLMKV_OK) return r;
        w = malloc(ws ? ws : 4);
        FZ_ASSERT(w != NULL);
        for (i = 0; i < nth && r == LLMKV_OK; ++i) r = llmkv_attend_part(c, b, a, i, nth, w, ws);
        for (i = 0; i < nth && r == LLMKV_OK; ++i) r = llmkv_attend_merge(c, b, a, i, nth, w, ws);
        free(w);
        return r;
    }
    return llmkv_attend(c, b, a, NULL);
}

static void op_attend(ctx* x) {
    static float q[3 * 8 * FZ_MAX_HEADS * 2 * FZ_MAX_DIM], out[NC][3 * 8 * FZ_MAX_HEADS * 2 * FZ_MAX_DIM];
    static float lse[NC][3 * 8 * FZ_MAX_HEADS * 2];
    llmkv_batch* b[NC];
    llmkv_seq hs[NC][3], bad[3];
    uint32_t q_lens[3], ci, k, n, tokens = 0, e;
    int idx[3], expect_fail = 0, all_written = 1, stale;
    llmkv_result r[NC];
    llmkv_attn_desc a;
    uint8_t f = fz_u8(&x->in), lb = fz_u8(&x->in), g = fz_u8(&x->in);
    uint32_t mode = f >> 6, nth = 2 + ((f >> 2) & 1);
    n = 1 + f % 3;
    for (k = 0; k < n; ++k) {
        uint8_t ql = fz_u8(&x->in);
        idx[k] = pick_live_seq(x, &bad[k]);
        q_lens[k] = ql < 0xf8 ? ql % 5 : 6 + (ql & 7);
        if (!is_live(x, idx[k])) expect_fail = 1;
        else if (q_lens[k] > x->s[idx[k]].len) expect_fail = 1;
        else if (q_lens[k] > 8) expect_fail = 1;
        tokens += q_lens[k];
        for (e = 0; e < k; ++e)
            if (idx[e] == idx[k] && idx[k] >= 0) expect_fail = 1;
        for (ci = 0; ci < x->nc; ++ci) hs[ci][k] = handle_of(x, idx[k], bad[k], ci);
    }
    if (tokens > 8) expect_fail = 1; /* the batch holds 8 query tokens */
    for (ci = 0; ci < x->nc; ++ci) {
        uint32_t ms = x->d.max_seqs < 3 ? x->d.max_seqs : 3;
        FZ_OK(llmkv_batch_create(x->c[ci], ms, 8, &b[ci]));
        r[ci] = llmkv_batch_build(b[ci], hs[ci], q_lens, n);
    }
    same(x, r, "batch_build");
    if (expect_fail || n > x->d.max_seqs) FZ_ASSERT(r[0] != LLMKV_OK);
    if (r[0] == LLMKV_OK) {
        llmkv_batch_info info;
        FZ_OK(llmkv_batch_get(b[0], &info));
        FZ_ASSERT(info.n_seqs == n && info.n_tokens == tokens && info.page_size == x->d.page_size);
        for (k = 0; k < n; ++k) {
            FZ_ASSERT((uint32_t)info.seq_lens[k] == x->s[idx[k]].len);
            FZ_ASSERT((uint32_t)(info.qo_indptr[k + 1] - info.qo_indptr[k]) == q_lens[k]);
        }
        for (e = 0; e < (uint32_t)info.kv_indptr[n]; ++e)
            FZ_ASSERT(info.kv_indices[e] >= 0 && (uint32_t)info.kv_indices[e] < x->d.n_pages);
        memset(&a, 0, sizeof a);
        a.layer = lb < 0xf0 ? lb % x->n_layers : x->n_layers + (lb & 3);
        a.n_q_heads = x->d.n_kv_heads * (1 + (g & 1));
        if ((g & 0x0e) == 0x0e) a.n_q_heads += 1; /* not a multiple of n_kv_heads (unless 1 head) */
        a.q = q;
        a.lse = (g >> 4) & 1 ? lse[0] : NULL;
        a.window = (g >> 5) & 1 ? 3 : 0;
        a.non_causal = (g >> 6) & 1;
        a.softcap = (g >> 7) ? 5.0f : 0.0f;
        for (e = 0; e < tokens * a.n_q_heads * x->d.head_dim; ++e) q[e] = fz_value(e, 9, 0, 1);
        stale = (f & 0x38) == 0x38 && n && is_live(x, idx[0]) && x->s[idx[0]].len < x->d.max_seq_len;
        if (stale) { /* a reserve after the build: the batch is stale */
            llmkv_result rr[NC];
            for (ci = 0; ci < x->nc; ++ci) rr[ci] = llmkv_reserve(x->c[ci], hs[ci][0], 1);
            same(x, rr, "reserve after batch_build");
            if (rr[0] == LLMKV_OK) {
                x->s[idx[0]].tok[x->s[idx[0]].len] = -1;
                x->s[idx[0]].len++;
            } else {
                stale = 0;
            }
        }
        for (ci = 0; ci < x->nc; ++ci) {
            a.out = out[ci];
            a.lse = a.lse ? lse[ci] : NULL;
            r[ci] = run_attend(x->c[ci], b[ci], &a, mode, nth);
        }
        same(x, r, "attend");
        {
            int bad_layer = a.layer >= x->n_layers, bad_heads = a.n_q_heads % x->d.n_kv_heads != 0;
            int ok = r[0] == (stale ? LLMKV_ERR_STALE_BATCH : LLMKV_OK);
            if (bad_layer || bad_heads) /* which error comes first is not specified */
                ok = (stale && r[0] == LLMKV_ERR_STALE_BATCH) || (bad_layer && r[0] == LLMKV_ERR_OUT_OF_RANGE) ||
                     (bad_heads && r[0] == LLMKV_ERR_INVALID_ARGUMENT);
            if (!ok)
                fprintf(stderr, "attend: %s (stale batch %d, layer %u of %u, %u query heads over %u)\n",
                        llmkv_result_string(r[0]), stale, a.layer, x->n_layers, a.n_q_heads, x->d.n_kv_heads);
            FZ_ASSERT(ok);
        }
        if (r[0] == LLMKV_OK && x->nc > 1) {
            for (k = 0; k < n; ++k) {
                const mseq* m = &x->s[idx[k]];
                if (m->w[a.layer][0] < m->len || m->w[a.layer][1] < m->len) all_written = 0;
            }
            if (x->d.k_dtype == LLMKV_DTYPE_Q4C && x->q4c_gap) all_written = 0;
            if (all_written)
                for (ci = 1; ci < x->nc; ++ci) {
                    FZ_ASSERT(memcmp(out[0], out[ci], (size_t)tokens * a.n_q_heads * x->d.head_dim * 4) == 0);
                    if (a.lse) FZ_ASSERT(memcmp(lse[0], lse[ci], (size_t)tokens * a.n_q_heads * 4) == 0);
                }
        }
        if (r[0] == LLMKV_OK && mode == 3 && nth == 2) {
            /* The split depends only on the batch and the thread count: a
               pool of 2 threads computes the same bits as 2 parts. */
            static float out2[3 * 8 * FZ_MAX_HEADS * 2 * FZ_MAX_DIM], lse2[3 * 8 * FZ_MAX_HEADS * 2];
            a.out = out2;
            a.lse = a.lse ? lse2 : NULL;
            FZ_OK(run_attend(x->c[0], b[0], &a, 2, 2));
            if (memcmp(out[0], out2, (size_t)tokens * a.n_q_heads * x->d.head_dim * 4) != 0 ||
                (a.lse && memcmp(lse[0], lse2, (size_t)tokens * a.n_q_heads * 4) != 0))
                FZ_ASSERT(!"llmkv_attend on 2 threads differs from llmkv_attend_part/merge with nth 2");
        }
    }
    for (ci = 0; ci < x->nc; ++ci) llmkv_batch_destroy(b[ci]);
}

/* Loaded cache `l` against c[0]: equal stats, every model sequence and pin
   under the same handle, equal gathers, the same prefix matches. */
static void compare_loaded(ctx* x, llmkv_cache* l) {
    llmkv_stats a = fz_stats(x->c[0]), b = fz_stats(l);
    llmkv_cache* saved_c1 = x->c[1];
    uint32_t saved_nc = x->nc, ci, sc, k;
    llmkv_seq saved_h[MS];
    llmkv_pin saved_p[MP];
    int i;
    fz_check(l, "load of a saved cache");
    if (!fz_stats_equal(&a, &b, 1, "saved vs loaded")) /* counters included: the format saves them */
        FZ_ASSERT(!"a loaded cache has other stats than the cache saved");
    /* Borrow lockstep slot 1 for the loaded cache, with c[0]'s handles. */
    for (i = 0; i < MS; ++i) {
        saved_h[i] = x->s[i].h[1];
        x->s[i].h[1] = x->s[i].h[0];
    }
    for (i = 0; i < MP; ++i) saved_p[i] = x->p[i].h[1];
    x->c[1] = l;
    x->nc = 2;
    x->q4c_exact = 1;
    verify_all(x);
    x->q4c_exact = 0;
    for (k = 0; k < NS_COUNT; ++k)
        for (sc = 0; sc < 4; ++sc) {
            llmkv_token t[70];
            uint32_t j, m[NC];
            llmkv_result r[NC];
            for (j = 0; j < 70; ++j) t[j] = script_tok(sc, j);
            for (ci = 0; ci < 2; ++ci) r[ci] = llmkv_prefix_match(x->c[ci], ns_values[k], t, 70, &m[ci]);
            same(x, r, "prefix_match after load");
            if (r[0] == LLMKV_OK) same_u32(x, m, "prefix_match after load");
        }
    x->c[1] = saved_c1;
    x->nc = saved_nc;
    for (i = 0; i < MS; ++i) x->s[i].h[1] = saved_h[i];
    for (i = 0; i < MP; ++i) x->p[i].h[1] = saved_p[i];
}

static void chain_clear(ctx* x) {
    uint32_t i;
    for (i = 0; i < x->n_chain; ++i) free(x->chain[i]);
    x->n_chain = 0;
}

static void op_save_load(ctx* x) {
    static const uint32_t flag_choices[4] = {0, LLMKV_SAVE_CHECKPOINT, LLMKV_SAVE_INCREMENTAL,
                                             LLMKV_SAVE_CHECKPOINT | LLMKV_SAVE_INCREMENTAL};
    uint8_t b = fz_u8(&x->in);
    uint32_t flags = flag_choices[b & 3], mode = (b >> 2) & 3, n_set, i;
    uint64_t bytes = 0;
    size_t written = 0;
    unsigned char* buf;
    const void* set[CHAIN_MAX];
    size_t set_sizes[CHAIN_MAX];
    llmkv_cache* l = NULL;
    llmkv_load_desc ld = fz_load_desc();
    llmkv_result r;
    if ((flags & LLMKV_SAVE_INCREMENTAL) && x->has_ckpt && x->n_chain >= CHAIN_MAX) flags = LLMKV_SAVE_CHECKPOINT;
    r = llmkv_cache_save_size(x->c[0], flags, &bytes);
    if ((flags & LLMKV_SAVE_INCREMENTAL) && !x->has_ckpt) {
        FZ_ASSERT(r == LLMKV_ERR_INVALID_ARGUMENT);
        return;
    }
    FZ_OK(r);
    FZ_ASSERT(bytes > 0 && bytes < ((uint64_t)1 << 30));
    buf = (unsigned char*)malloc((size_t)bytes);
    FZ_ASSERT(buf != NULL);
    if (b & 0x10)
        FZ_ASSERT(llmkv_cache_save_mem(x->c[0], flags, buf, (size_t)bytes - 1, &written) == LLMKV_ERR_BUFFER_TOO_SMALL);
    FZ_OK(llmkv_cache_save_mem(x->c[0], flags, buf, (size_t)bytes, &written));
    FZ_ASSERT(written == bytes);
    fz_check(x->c[0], "save_mem");
    if (flags == 0) {
        set[0] = buf;
        set_sizes[0] = written;
        n_set = 1;
    } else {
        if (!(flags & LLMKV_SAVE_INCREMENTAL)) chain_clear(x);
        FZ_ASSERT(x->n_chain < CHAIN_MAX);
        x->chain[x->n_chain] = buf;
        x->chain_size[x->n_chain++] = written;
        x->has_ckpt = 1;
        for (i = 0; i < x->n_chain; ++i) {
            set[i] = x->chain[i];
            set_sizes[i] = x->chain_size[i];
        }
        n_set = x->n_chain;
    }
    r = llmkv_cache_load_mem(set, set_sizes, n_set, &ld, &l);
    if (r != LLMKV_OK) fprintf(stderr, "loading a save (flags %u, %u buffers): %s\n", flags, n_set, llmkv_result_string(r));
    FZ_OK(r);
    compare_loaded(x, l);
    if (mode == 0 || mode == 3) { /* keep only the original */
        llmkv_cache_destroy(l);
        if (flags == 0) free(buf);
        return;
    }
    if (x->nc == 2) llmkv_cache_destroy(x->c[1]);
    if (mode == 1) { /* the loaded cache runs alongside */
        x->c[1] = l;
        if (flags == 0) free(buf);
    } else { /* the loaded cache becomes the primary; its checkpoint is the last buffer loaded */
        x->c[1] = x->c[0];
        x->c[0] = l;
        if (flags == 0) {
            chain_clear(x);
            x->chain[0] = buf;
            x->chain_size[0] = written;
            x->n_chain = 1;
        }
        x->has_ckpt = 1;
    }
    x->nc = 2;
    for (i = 0; i < MS; ++i) x->s[i].h[1] = x->s[i].h[0];
    for (i = 0; i < MP; ++i) x->p[i].h[1] = x->p[i].h[0];
}

static void op_export_import(ctx* x) {
    llmkv_seq bad, h[NC];
    llmkv_result r[NC];
    llmkv_stats st[NC];
    uint64_t bytes = 0;
    size_t written = 0;
    unsigned char* buf;
    uint32_t ci, shared[NC], corrupt_at = 0;
    int i = pick_live_seq(x, &bad), j = free_slot(x), corrupt;
    uint8_t b = fz_u8(&x->in);
    corrupt = (b & 7) == 7;
    if (corrupt) corrupt_at = fz_u16(&x->in);
    r[0] = llmkv_seq_export_size(x->c[0], handle_of(x, i, bad, 0), &bytes);
    if (!is_live(x, i)) {
        FZ_ASSERT(r[0] == LLMKV_ERR_STALE_HANDLE);
        return;
    }
    FZ_OK(r[0]);
    FZ_ASSERT(bytes > 0 && bytes < ((uint64_t)1 << 30));
    buf = (unsigned char*)malloc((size_t)bytes);
    FZ_ASSERT(buf != NULL);
    if (b & 8) FZ_ASSERT(llmkv_seq_export(x->c[0], x->s[i].h[0], buf, (size_t)bytes - 1, &written) == LLMKV_ERR_BUFFER_TOO_SMALL);
    FZ_OK(llmkv_seq_export(x->c[0], x->s[i].h[0], buf, (size_t)bytes, &written));
    FZ_ASSERT(written == bytes);
    fz_check(x->c[0], "seq_export");
    if (corrupt) buf[corrupt_at % written] ^= (uint8_t)(1u << (b >> 5));
    stats_all(x, st);
    for (ci = 0; ci < x->nc; ++ci) r[ci] = llmkv_seq_import(x->c[ci], buf, written, &h[ci], &shared[ci]);
    free(buf);
    same(x, r, "seq_import");
    if (r[0] != LLMKV_OK) {
        if (!corrupt && n_live(x) < x->d.max_seqs && r[0] != LLMKV_ERR_OUT_OF_PAGES)
            fprintf(stderr, "importing an export into its own cache: %s\n", llmkv_result_string(r[0]));
        FZ_ASSERT(corrupt || r[0] == LLMKV_ERR_OUT_OF_PAGES || r[0] == LLMKV_ERR_TOO_MANY_SEQUENCES);
        if (r[0] == LLMKV_ERR_TOO_MANY_SEQUENCES) FZ_ASSERT(n_live(x) >= x->d.max_seqs);
        for (ci = 0; ci < x->nc; ++ci) FZ_ASSERT(h[ci].id == 0 && shared[ci] == 0);
        assert_unchanged(x, st, "a failed import");
        return;
    }
    same_u32(x, shared, "seq_import n_shared");
    FZ_ASSERT(j >= 0 && n_live(x) < x->d.max_seqs);
    x->s[j] = x->s[i];
    for (ci = 0; ci < x->nc; ++ci) x->s[j].h[ci] = h[ci];
    FZ_ASSERT(shared[0] <= x->s[j].len && shared[0] % x->d.page_size == 0);
    if (corrupt) {
        /* One changed byte that still imports: the bytes the format does not
           cover. The copy cannot be modelled: drop it. */
        for (ci = 0; ci < x->nc; ++ci) FZ_OK(llmkv_seq_free(x->c[ci], h[ci]));
        x->s[j].live = 0;
        return;
    }
    verify_seq(x, j);
}

/* ------------------------------------------------------------------------ */
/* Driver                                                                   */
/* ------------------------------------------------------------------------ */

static ctx X;

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    ctx* x = &X;
    uint32_t op_i, ci;
    llmkv_result r;
    FZ_ASSERT(fz_alloc_st.live == 0);
    memset(x, 0, sizeof *x);
    memset(exp_have, 0, sizeof exp_have);
    fz_alloc_reset();
    fz_init(&x->in, data, size);
    fz_desc_from(&x->in, &x->d);
    x->row = x->d.n_kv_heads * x->d.head_dim;
    x->n_layers = x->d.n_layers;
    r = llmkv_cache_create(&x->d, &x->c[0]);
    if (r != LLMKV_OK) fprintf(stderr, "cache_create: %s\n", llmkv_result_string(r));
    FZ_OK(r);
    FZ_OK(llmkv_cache_desc(x->c[0], &x->d)); /* the effective values */
    FZ_ASSERT(x->d.max_seq_len <= FZ_MAX_LEN);
    x->nc = 1;
    fz_check(x->c[0], "cache_create");

    for (op_i = 0; op_i < MAX_OPS && fz_more(&x->in); ++op_i) {
        uint32_t op = fz_u8(&x->in) % FZ_OP_COUNT;
        if (fz_verbose()) {
            static const char* names[FZ_OP_COUNT] = {"create", "free", "reserve", "reserve_tokens", "put", "gather",
                                                     "fork", "truncate", "create_prefix", "match", "publish", "pin",
                                                     "unpin", "evict", "attend", "save_load", "export_import",
                                                     "reserve_many", "verify"};
            fprintf(stderr, "op %u at byte %zu: %s (%u caches, %u live)\n", op_i, x->in.pos - 1, names[op], x->nc,
                    n_live(x));
        }
        switch (op) {
        case FZ_OP_CREATE: op_create(x); break;
        case FZ_OP_FREE: op_free(x); break;
        case FZ_OP_RESERVE: op_reserve(x, 0); break;
        case FZ_OP_RESERVE_TOKENS: op_reserve(x, 1); break;
        case FZ_OP_PUT: op_put(x); break;
        case FZ_OP_GATHER: op_gather(x); break;
        case FZ_OP_FORK: op_fork(x); break;
        case FZ_OP_TRUNCATE: op_truncate(x); break;
        case FZ_OP_CREATE_PREFIX: op_create_prefix(x); break;
        case FZ_OP_MATCH: op_match(x); break;
        case FZ_OP_PUBLISH: op_publish(x); break;
        case FZ_OP_PIN: op_pin(x); break;
        case FZ_OP_UNPIN: op_unpin(x); break;
        case FZ_OP_EVICT: op_evict(x); break;
        case FZ_OP_ATTEND: op_attend(x); break;
        case FZ_OP_SAVE_LOAD: op_save_load(x); break;
        case FZ_OP_EXPORT_IMPORT: op_export_import(x); break;
        case FZ_OP_RESERVE_MANY: op_reserve_many(x); break;
        default: verify_all(x); break;
        }
        after_op(x, "an op");
        if (op_i % 16 == 15) verify_all(x);
        else {
            int i;
            for (i = 0; i < MS; ++i) /* lengths of every sequence, every op */
                if (x->s[i].live)
                    for (ci = 0; ci < x->nc; ++ci) {
                        uint32_t len;
                        FZ_OK(llmkv_seq_length(x->c[ci], x->s[i].h[ci], &len));
                        FZ_ASSERT(len == x->s[i].len);
                    }
        }
    }
    verify_all(x);
    /* Free everything: a valid, empty cache. */
    for (ci = 0; ci < x->nc; ++ci) {
        int i;
        llmkv_stats st;
        for (i = 0; i < MS; ++i)
            if (x->s[i].live) FZ_OK(llmkv_seq_free(x->c[ci], x->s[i].h[ci]));
        for (i = 0; i < MP; ++i)
            if (x->p[i].live) FZ_OK(llmkv_prefix_unpin(x->c[ci], x->p[i].h[ci]));
        fz_check(x->c[ci], "freeing everything");
        st = fz_stats(x->c[ci]);
        FZ_ASSERT(st.n_seqs == 0 && st.n_pages_used == 0 && st.n_tokens == 0 && st.n_pins == 0);
        FZ_ASSERT(st.n_pages_free + st.n_pages_cached == st.n_pages_total);
        llmkv_cache_destroy(x->c[ci]);
    }
    chain_clear(x);
    FZ_ASSERT(fz_alloc_st.live == 0);
    return 0;
}
