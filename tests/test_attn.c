/* CPU attention (llmkv_attend, llmkv_attend_part / merge) against an
   independent double-precision reference.

   Every test keeps, per sequence, its own contiguous copy of the K and V
   values of the attended layer AS STORED (rounded to the storage type with
   llmkv_f32_to_f16 / llmkv_f32_to_bf16 and back; F32 stays exact) and
   computes in double: logit = scale * q.k (scale 0 means 1/sqrt(head_dim)),
   optional soft-cap cap * tanh(s / cap), the mask (causal: key position <=
   query position; window w > 0: also > position - w; non-causal: every key
   of the sequence), softmax, out = sum p * v, lse = log(sum exp(logit)).
   Query row r of a batch sits at position seq_len - q_len + i.

   What would otherwise go unnoticed is made loud:
   - the other layers of the cache hold NaN, and so do the attended layer's
     pages that no query row of the batch can see (fully masked pages, the
     pages of sequences with no query rows, and the unused slots past the
     end of every last page): reading any of them turns a result into NaN;
   - q rows are padded with NaN (a read past a row shows);
   - out rows are padded, and out and lse have guard zones, all filled with
     a canary checked bit for bit afterwards (a write past a row shows);
   - external-pool workspaces start full of NaN bytes and have a guard.

   Scale: LLMKV_TEST_SCALE (default 1.0) multiplies the number of random
   cases. LLMKV_TEST_SEED changes the random seed. LLMKV_TEST_VERBOSE prints
   the worst errors seen per path and storage type. */
#include "test_util.h"
#include "../llmkv.h"

#include <math.h>
#include <stdint.h>

#ifndef LLMKV_NO_THREADS
#include <pthread.h>
#endif

/* ------------------------------------------------------------------------ */
/* Error bounds                                                             */
/* ------------------------------------------------------------------------ */

/* Output error = max |out - ref| / max |V| over the keys of that sequence
   and KV head; lse error must satisfy |lse - ref| <= tol * (1 + |ref|).
   The reference is exact (double) on the stored K/V values, so the error
   left is float arithmetic (dot products of up to 512 terms, the float
   exp/log, sums over thousands of keys) and, for 16-bit storage, the
   rounding of q to the storage type that a path may do before the dot
   product (as llama.cpp does): 2^-11 relative for F16, 2^-8 for BF16. A
   case with mixed K and V types uses the looser bound of the two. */
#define TOL_F32 1e-5
#define TOL_F16 1e-3
#define TOL_BF16 8e-3

#define MAX_SEQS 8
#define OUT_GUARD 64            /* floats of canary before and after out / lse */
#define WS_GUARD 256            /* bytes of canary after an external workspace */
#define CANARY_BITS 0xA5C3E10Fu /* bit pattern of every out / lse canary */
#define CASE_WORK 3000000.0     /* q.k multiply-adds per random case at most */
#define N_PATHS (LLMKV_CPU_PATH_LAST + 1)

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

static double attn_env_scale(void) {
    const char* s = getenv("LLMKV_TEST_SCALE");
    double v = s ? atof(s) : 1.0;
    return v > 0.0 ? v : 1.0;
}

/* base * LLMKV_TEST_SCALE, at least `least`. */
static int scaled(int base, int least) {
    int n = (int)(base * attn_env_scale() + 0.5);
    return n < least ? least : n;
}

static unsigned long long attn_seed(unsigned long long dflt) {
    const char* s = getenv("LLMKV_TEST_SEED");
    return s ? strtoull(s, NULL, 0) ^ dflt : dflt;
}

static double unit(tst_rng* r) { return (double)(tst_next(r) >> 11) * (1.0 / 9007199254740992.0); }

static float stored_value(llmkv_dtype t, float x) {
    if (t == LLMKV_DTYPE_F16) return llmkv_f16_to_f32(llmkv_f32_to_f16(x));
    if (t == LLMKV_DTYPE_BF16) return llmkv_bf16_to_f32(llmkv_f32_to_bf16(x));
    return x;
}

/* The quantized types are compared with attention over their dequantized
   values (what the cache holds), so they keep the F32 bound: the kernels
   dequantize exactly (Q4 to within one rounding). Their error against the
   unquantized data is measured in test_quant.c. */
static double type_tol(llmkv_dtype t) {
    return t == LLMKV_DTYPE_BF16 ? TOL_BF16 : t == LLMKV_DTYPE_F16 ? TOL_F16 : TOL_F32;
}

static int is_quant(llmkv_dtype t) {
    return t == LLMKV_DTYPE_Q8 || t == LLMKV_DTYPE_Q4 || t == LLMKV_DTYPE_FP8;
}

/* A head vector as a quantized type stores it: llmkv_quantize then
   llmkv_dequantize (both checked against an independent model in
   test_quant.c), in place. */
static void store_vector(llmkv_dtype t, float* x, uint32_t n) {
    unsigned char data[512 * 4], sc[64];
    if (llmkv_quantize(t, x, n, data, sc) != LLMKV_OK || llmkv_dequantize(t, data, sc, n, x) != LLMKV_OK) {
        fprintf(stderr, "test_attn: llmkv_quantize refused a vector\n");
        exit(2);
    }
}

static void fill_canary(float* p, size_t n) {
    uint32_t c = CANARY_BITS;
    size_t i;
    for (i = 0; i < n; ++i) memcpy(p + i, &c, 4);
}

static int is_canary(const float* p) {
    uint32_t c;
    memcpy(&c, p, 4);
    return c == CANARY_BITS;
}

/* Index of the first element of p[0..n) that is not the canary, or n. */
static size_t first_non_canary(const float* p, size_t n) {
    size_t i;
    for (i = 0; i < n; ++i)
        if (!is_canary(p + i)) return i;
    return n;
}

static float qnan(void) {
    uint32_t b = 0x7fc00000u;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

/* Records a failed check with a message (like a TST_CHECK that failed). */
#define ATTN_FAIL(t, msg)                                                        \
    do {                                                                         \
        fprintf(stderr, "  FAIL %s:%d: %s\n", __FILE__, __LINE__, (msg));       \
        (t)->cur_failures++;                                                     \
    } while (0)

/* Failure messages are capped so a broken build does not flood the log. */
static int g_fail_msgs;
#define FAIL_MSG_MAX 30

/* Worst errors seen, per path and K / V storage type. */
static double g_worst_out[N_PATHS][7][7], g_worst_lse[N_PATHS][7][7];
static long g_n_checked[N_PATHS][7][7];


/* ------------------------------------------------------------------------ */
/* A test case: cache shape, batch, attention options                       */
/* ------------------------------------------------------------------------ */

typedef struct acase {
    uint32_t D, ps, n_kv, G, n_layers, layer;
    llmkv_dtype kt, vt;
    uint32_t n_seqs;
    uint32_t lens[MAX_SEQS], qlens[MAX_SEQS];
    uint32_t window;
    float softcap;
    int non_causal;
    float scale;        /* 0: default */
    int use_lse;
    int q_stride_kind;  /* 0: stride 0; 1: explicit packed stride; 2: padded */
    int out_stride_kind;
    uint32_t q_pad, out_pad; /* floats of padding per row (kind 2) */
    double logit_sigma; /* target standard deviation of the logits */
    double v_amp;       /* V elements are uniform in [-v_amp, v_amp) */
} acase;

static double g_worst_ratio[N_PATHS]; /* worst error / bound, and its case */
static acase g_worst_case[N_PATHS];

static void print_case(const acase* c) {
    uint32_t i;
    fprintf(stderr, "    case: D=%u page=%u kv_heads=%u q_heads=%u (G=%u) layers=%u layer=%u k=%s v=%s\n", c->D,
            c->ps, c->n_kv, c->n_kv * c->G, c->G, c->n_layers, c->layer, llmkv_dtype_name(c->kt),
            llmkv_dtype_name(c->vt));
    fprintf(stderr, "          window=%u softcap=%g non_causal=%d scale=%g lse=%d q_pad=%d/%u out_pad=%d/%u seqs:",
            c->window, (double)c->softcap, c->non_causal, (double)c->scale, c->use_lse, c->q_stride_kind, c->q_pad,
            c->out_stride_kind, c->out_pad);
    for (i = 0; i < c->n_seqs; ++i) fprintf(stderr, " %u/%u", c->lens[i], c->qlens[i]);
    fprintf(stderr, " (len/q)\n");
}

static acase base_case(uint32_t D, uint32_t ps, uint32_t n_kv, uint32_t G, llmkv_dtype kt, llmkv_dtype vt) {
    acase c;
    memset(&c, 0, sizeof c);
    c.D = D;
    c.ps = ps;
    c.n_kv = n_kv;
    c.G = G;
    c.n_layers = 1;
    c.kt = kt;
    c.vt = vt;
    c.use_lse = 1;
    c.logit_sigma = 2.5;
    c.v_amp = 1.0;
    return c;
}

/* Keys row at position pos of a sequence of length L sees: [lo, hi). */
static void visible_keys(const acase* c, uint32_t L, uint32_t pos, uint32_t* lo, uint32_t* hi) {
    if (c->non_causal) {
        *lo = 0;
        *hi = L;
        return;
    }
    *hi = pos + 1;
    *lo = (c->window && pos + 1 > c->window) ? pos + 1 - c->window : 0;
}

/* q.k multiply-adds of the whole case. */
static double case_work(const acase* c) {
    double w = 0;
    uint32_t i, t;
    for (i = 0; i < c->n_seqs; ++i)
        for (t = 0; t < c->qlens[i]; ++t) {
            uint32_t lo, hi;
            visible_keys(c, c->lens[i], c->lens[i] - c->qlens[i] + t, &lo, &hi);
            w += (double)(hi - lo);
        }
    return w * c->n_kv * c->G * c->D;
}

/* ------------------------------------------------------------------------ */
/* Environment: the cache, the batch, the reference                          */
/* ------------------------------------------------------------------------ */

typedef struct aenv {
    acase c;
    uint32_t nqh;                  /* query heads */
    llmkv_cache* kv;
    llmkv_layout ly;
    llmkv_seq seqs[MAX_SEQS];
    llmkv_batch* b;
    llmkv_batch_info info;
    uint32_t n_tokens;
    float* kref[MAX_SEQS];         /* attended layer as stored: [len][n_kv][D] */
    float* vref[MAX_SEQS];
    double vmax[MAX_SEQS][4];      /* max |V| per sequence and KV head */
    float* q;
    float* q_copy;                 /* q as it was made: calls must not write q */
    size_t q_floats;
    size_t q_stride;               /* floats between rows */
    size_t row;                    /* floats of one row: nqh * D */
    double* ref_out;               /* [n_tokens][nqh][D] */
    double* ref_lse;               /* [n_tokens][nqh] */
    double* ref_out_i8;            /* the same with the int8 query (NULL when no path uses it) */
    double* ref_lse_i8;
    float* out_buf;                /* OUT_GUARD, rows, OUT_GUARD */
    float* out;
    size_t out_stride, out_floats; /* floats between rows; floats of the rows */
    float* lse_buf;
    float* lse;
    size_t lse_floats;
} aenv;

static void env_free(aenv* e) {
    uint32_t i;
    for (i = 0; i < MAX_SEQS; ++i) {
        free(e->kref[i]);
        free(e->vref[i]);
    }
    free(e->q);
    free(e->q_copy);
    free(e->ref_out);
    free(e->ref_lse);
    free(e->ref_out_i8);
    free(e->ref_lse_i8);
    free(e->out_buf);
    free(e->lse_buf);
    llmkv_batch_destroy(e->b);
    llmkv_cache_destroy(e->kv);
    memset(e, 0, sizeof *e);
}

static void fill_outputs_canary(aenv* e) {
    fill_canary(e->out_buf, e->out_floats + 2 * OUT_GUARD);
    fill_canary(e->lse_buf, e->lse_floats + 2 * OUT_GUARD);
}

/* Writes a NaN of the storage type into slots [s0, s1) of one page, every
   KV head, K and V, of the attended layer (through the public layout). */
static void poison_slots(aenv* e, unsigned char* pool, uint32_t page, uint32_t s0, uint32_t s1) {
    int part;
    uint32_t h, s, d;
    for (part = 0; part < 2; ++part) {
        const llmkv_part_layout* pl = part ? &e->ly.v : &e->ly.k;
        for (h = 0; h < e->c.n_kv; ++h)
            for (s = s0; s < s1; ++s) {
                unsigned char* p = pool + (uint64_t)page * e->ly.page_bytes + (uint64_t)e->c.layer * e->ly.layer_stride +
                                   pl->offset + h * pl->head_stride + s * pl->slot_stride;
                if (is_quant(pl->dtype)) { /* NaN scales: every element of the slot reads as NaN */
                    unsigned char* sc = pool + (uint64_t)page * e->ly.page_bytes +
                                        (uint64_t)e->c.layer * e->ly.layer_stride + pl->scale_offset +
                                        h * pl->scale_head_stride + s * pl->scale_slot_stride;
                    uint32_t nb = 0x7fc00000u, b;
                    uint16_t nh = 0x7e00u;
                    if (pl->dtype == LLMKV_DTYPE_FP8) memcpy(sc, &nb, 4);
                    else for (b = 0; b < pl->scale_slot_stride; b += 2) memcpy(sc + b, &nh, 2);
                    continue;
                }
                for (d = 0; d < e->c.D; ++d) {
                    if (pl->dtype == LLMKV_DTYPE_F32) {
                        uint32_t nb = 0x7fc00000u;
                        memcpy(p + 4 * (size_t)d, &nb, 4);
                    } else {
                        uint16_t nb = pl->dtype == LLMKV_DTYPE_F16 ? (uint16_t)0x7e00u : (uint16_t)0x7fc0u;
                        memcpy(p + 2 * (size_t)d, &nb, 2);
                    }
                }
            }
    }
}

/* Builds everything for case c. Returns 0 (with a failed check) if the
   library refused a step that must succeed. */
/* Exact attention (double) over the stored K/V of every query row into
   out / lse; int8q: with each query head as tst_int8_query makes it. */
static void env_reference(aenv* e, double scale, int int8q, double* out, double* lse) {
    const acase* c = &e->c;
    uint32_t maxlen = 1, i, tok, dd;
    double* s;
    double qd[512];
    for (i = 0; i < c->n_seqs; ++i)
        if (c->lens[i] > maxlen) maxlen = c->lens[i];
    s = (double*)malloc(maxlen * sizeof(double));
    for (i = 0; i < c->n_seqs; ++i) {
        uint32_t L = c->lens[i], q = c->qlens[i], row0 = (uint32_t)e->info.qo_indptr[i];
        for (tok = 0; tok < q; ++tok) {
            uint32_t pos = L - q + tok, lo, hi, j, hq;
            visible_keys(c, L, pos, &lo, &hi);
            for (hq = 0; hq < e->nqh; ++hq) {
                uint32_t kvh = hq / c->G;
                const float* qr = e->q + (size_t)(row0 + tok) * e->q_stride + (size_t)hq * c->D;
                double* o = out + ((size_t)(row0 + tok) * e->nqh + hq) * c->D;
                double m = -INFINITY, sum = 0;
                if (int8q) tst_int8_query(qr, c->D, c->scale > 0.0f ? c->scale : 1.0f / sqrtf((float)c->D), qd);
                else for (dd = 0; dd < c->D; ++dd) qd[dd] = (double)qr[dd];
                for (dd = 0; dd < c->D; ++dd) o[dd] = 0;
                for (j = lo; j < hi; ++j) {
                    const float* kr = e->kref[i] + ((size_t)j * c->n_kv + kvh) * c->D;
                    double acc = 0;
                    for (dd = 0; dd < c->D; ++dd) acc += qd[dd] * (double)kr[dd];
                    acc *= scale;
                    if (c->softcap > 0.0f) acc = (double)c->softcap * tanh(acc / (double)c->softcap);
                    s[j - lo] = acc;
                    if (acc > m) m = acc;
                }
                for (j = lo; j < hi; ++j) {
                    const float* vr = e->vref[i] + ((size_t)j * c->n_kv + kvh) * c->D;
                    double p = exp(s[j - lo] - m);
                    sum += p;
                    for (dd = 0; dd < c->D; ++dd) o[dd] += p * (double)vr[dd];
                }
                if (sum > 0) {
                    for (dd = 0; dd < c->D; ++dd) o[dd] /= sum;
                    lse[(size_t)(row0 + tok) * e->nqh + hq] = m + log(sum);
                } else {
                    lse[(size_t)(row0 + tok) * e->nqh + hq] = -INFINITY;
                }
            }
        }
    }
    free(s);
}

static int env_setup(tst* t, aenv* e, const acase* c, tst_rng* r) {
    llmkv_desc d;
    uint32_t i, pages_needed = 0, filler_len, done[MAX_SEQS], l, tok, h, dd, active;
    llmkv_seq filler;
    float *kbuf = NULL, *vbuf = NULL, *gk = NULL, *gv = NULL;
    const uint32_t CH = 64; /* largest put chunk */
    double qa, scale;
    size_t n_heads_rows;
    void* pool_base = NULL;
    uint64_t pool_bytes = 0;
    int ok = 1;

    memset(e, 0, sizeof *e);
    e->c = *c;
    e->nqh = c->n_kv * c->G;
    for (i = 0; i < c->n_seqs; ++i) pages_needed += (c->lens[i] + c->ps - 1) / c->ps;
    filler_len = tst_below(r, 3 * c->ps + 1);

    memset(&d, 0, sizeof d);
    d.n_layers = c->n_layers;
    d.n_kv_heads = c->n_kv;
    d.head_dim = c->D;
    d.page_size = c->ps;
    d.n_pages = pages_needed + (filler_len + c->ps - 1) / c->ps + 1 + tst_below(r, 3);
    d.k_dtype = c->kt;
    d.v_dtype = c->vt;
    d.max_seqs = MAX_SEQS + 1;
    TST_EQ(t, llmkv_cache_create(&d, &e->kv), LLMKV_OK);
    if (!e->kv) return 0;
    TST_EQ(t, llmkv_cache_layout(e->kv, &e->ly), LLMKV_OK);
    TST_EQ(t, llmkv_cache_pool(e->kv, &pool_base, &pool_bytes), LLMKV_OK);
    if (!pool_base) return 0;

    /* A filler sequence takes pages first and is freed at the end, so the
       sequences' pages are neither the first ids nor contiguous. */
    TST_EQ(t, llmkv_seq_create(e->kv, &filler), LLMKV_OK);
    TST_EQ(t, llmkv_reserve(e->kv, filler, filler_len), LLMKV_OK);
    for (i = 0; i < c->n_seqs; ++i) {
        TST_EQ(t, llmkv_seq_create(e->kv, &e->seqs[i]), LLMKV_OK);
        e->kref[i] = (float*)malloc(((size_t)c->lens[i] * c->n_kv * c->D + 1) * sizeof(float));
        e->vref[i] = (float*)malloc(((size_t)c->lens[i] * c->n_kv * c->D + 1) * sizeof(float));
        done[i] = 0;
    }
    kbuf = (float*)malloc((size_t)CH * c->n_kv * c->D * sizeof(float));
    vbuf = (float*)malloc((size_t)CH * c->n_kv * c->D * sizeof(float));

    /* Fill the sequences in interleaved chunks of random sizes (reserve,
       then put every layer), so their pages interleave in the pool. */
    do {
        active = 0;
        for (i = 0; i < c->n_seqs; ++i) {
            uint32_t n = c->lens[i] - done[i];
            size_t per = (size_t)c->n_kv * c->D;
            if (n == 0) continue;
            active = 1;
            if (n > CH) n = CH;
            n = 1 + tst_below(r, n);
            if (llmkv_reserve(e->kv, e->seqs[i], n) != LLMKV_OK) {
                ATTN_FAIL(t, "reserve failed");
                ok = 0;
                goto out;
            }
            for (l = 0; l < c->n_layers; ++l) {
                for (tok = 0; tok < n; ++tok)
                    for (h = 0; h < c->n_kv; ++h) {
                        size_t ref0 = (done[i] + tok) * per + (size_t)h * c->D;
                        for (dd = 0; dd < c->D; ++dd) {
                            size_t at = ((size_t)tok * c->n_kv + h) * c->D + dd;
                            if (l == c->layer) {
                                float kx = tst_float(r);
                                float vx = (float)(c->v_amp * (double)tst_float(r));
                                kbuf[at] = kx;
                                vbuf[at] = vx;
                                e->kref[i][ref0 + dd] = stored_value(c->kt, kx);
                                e->vref[i][ref0 + dd] = stored_value(c->vt, vx);
                            } else {
                                kbuf[at] = qnan(); /* never read: another layer */
                                vbuf[at] = qnan();
                            }
                        }
                        if (l == c->layer && is_quant(c->kt)) store_vector(c->kt, e->kref[i] + ref0, c->D);
                        if (l == c->layer && is_quant(c->vt)) store_vector(c->vt, e->vref[i] + ref0, c->D);
                    }
                if (llmkv_put(e->kv, e->seqs[i], l, n, kbuf, 0, vbuf, 0, LLMKV_DTYPE_F32) != LLMKV_OK) {
                    ATTN_FAIL(t, "put failed");
                    ok = 0;
                    goto out;
                }
            }
            done[i] += n;
        }
    } while (active);
    TST_EQ(t, llmkv_seq_free(e->kv, filler), LLMKV_OK);

    /* The cache must hold exactly what the reference says is stored (a
       mismatch here is a put / conversion bug, not an attention bug). */
    for (i = 0; i < c->n_seqs && ok; ++i) {
        size_t n = (size_t)c->lens[i] * c->n_kv * c->D;
        if (n == 0) continue;
        gk = (float*)malloc(n * sizeof(float));
        gv = (float*)malloc(n * sizeof(float));
        TST_EQ(t, llmkv_gather(e->kv, e->seqs[i], c->layer, 0, c->lens[i], gk, 0, gv, 0, LLMKV_DTYPE_F32), LLMKV_OK);
        if (memcmp(gk, e->kref[i], n * sizeof(float)) || memcmp(gv, e->vref[i], n * sizeof(float))) {
            fprintf(stderr, "  stored K/V differ from llmkv_f32_to_* rounding (seq %u)\n", i);
            ATTN_FAIL(t, "gather matches the reference copy");
        }
        free(gk);
        free(gv);
        gk = gv = NULL;
    }

    /* Per sequence and KV head: max |V| (the error unit). */
    for (i = 0; i < c->n_seqs; ++i)
        for (h = 0; h < c->n_kv; ++h) {
            double m = 0;
            for (tok = 0; tok < c->lens[i]; ++tok)
                for (dd = 0; dd < c->D; ++dd) {
                    double a = fabs((double)e->vref[i][((size_t)tok * c->n_kv + h) * c->D + dd]);
                    if (a > m) m = a;
                }
            e->vmax[i][h] = m > 0 ? m : 1.0;
        }

    /* Poison what no query row of the batch may read: pages wholly outside
       the keys its rows can see, and the slots past each sequence's end. */
    for (i = 0; i < c->n_seqs; ++i) {
        uint32_t L = c->lens[i], q = c->qlens[i], vis_lo = 0, vis_hi = 0, np = 0, pg, lo, hi;
        uint32_t* pt = (uint32_t*)malloc(((size_t)L / c->ps + 2) * sizeof(uint32_t));
        TST_EQ(t, llmkv_seq_pages(e->kv, e->seqs[i], pt, L / c->ps + 2, &np), LLMKV_OK);
        if (q) {
            visible_keys(c, L, L - q, &vis_lo, &hi);
            visible_keys(c, L, L - 1, &lo, &vis_hi);
        }
        for (pg = 0; pg < np; ++pg) {
            uint32_t start = pg * c->ps, end = start + c->ps < L ? start + c->ps : L;
            if (end <= vis_lo || start >= vis_hi)
                poison_slots(e, (unsigned char*)pool_base, pt[pg], 0, c->ps);
            else if (end - start < c->ps)
                poison_slots(e, (unsigned char*)pool_base, pt[pg], end - start, c->ps);
        }
        free(pt);
    }

    /* The batch. */
    e->n_tokens = 0;
    for (i = 0; i < c->n_seqs; ++i) e->n_tokens += c->qlens[i];
    TST_EQ(t, llmkv_batch_create(e->kv, c->n_seqs ? c->n_seqs : 1, e->n_tokens ? e->n_tokens : 1, &e->b), LLMKV_OK);
    if (!e->b) {
        ok = 0;
        goto out;
    }
    TST_EQ(t, llmkv_batch_build(e->b, e->seqs, c->qlens, c->n_seqs), LLMKV_OK);
    TST_EQ(t, llmkv_batch_get(e->b, &e->info), LLMKV_OK);
    TST_EQ(t, e->info.n_tokens, e->n_tokens);
    TST_EQ(t, e->info.n_seqs, c->n_seqs);
    if (e->info.n_tokens != e->n_tokens || e->info.n_seqs != c->n_seqs) {
        ok = 0;
        goto out;
    }
    for (i = 0; i < c->n_seqs; ++i) {
        uint32_t row0 = (uint32_t)e->info.qo_indptr[i];
        TST_EQ(t, e->info.qo_indptr[i + 1] - e->info.qo_indptr[i], c->qlens[i]);
        TST_EQ(t, e->info.seq_lens[i], c->lens[i]);
        for (tok = 0; tok < c->qlens[i]; ++tok)
            TST_EQ(t, e->info.positions[row0 + tok], c->lens[i] - c->qlens[i] + tok);
    }

    /* Queries, with NaN padding after every row. */
    e->row = (size_t)e->nqh * c->D;
    e->q_stride = e->row + (c->q_stride_kind == 2 ? c->q_pad : 0);
    e->out_stride = e->row + (c->out_stride_kind == 2 ? c->out_pad : 0);
    {
        size_t qn = e->n_tokens ? (size_t)(e->n_tokens - 1) * e->q_stride + e->row : 1, k;
        e->q = (float*)malloc(qn * sizeof(float));
        e->q_copy = (float*)malloc(qn * sizeof(float));
        e->q_floats = qn;
        for (k = 0; k < qn; ++k) e->q[k] = qnan();
    }
    scale = c->scale > 0.0f ? (double)c->scale : 1.0 / sqrt((double)c->D);
    /* logit std = scale * sqrt(D) * (qa / sqrt 3) * (1 / sqrt 3) */
    qa = c->logit_sigma * 3.0 / (scale * sqrt((double)c->D));
    for (tok = 0; tok < e->n_tokens; ++tok)
        for (dd = 0; dd < e->row; ++dd) e->q[(size_t)tok * e->q_stride + dd] = (float)(qa * (double)tst_float(r));
    memcpy(e->q_copy, e->q, e->q_floats * sizeof(float));

    /* The reference, and for a path that rounds q to int8 (Q4 keys on
       AVX512_BF16 and AVX512_VNNI) the reference with that query. */
    n_heads_rows = (size_t)e->n_tokens * e->nqh;
    e->ref_out = (double*)malloc((n_heads_rows * c->D + 1) * sizeof(double));
    e->ref_lse = (double*)malloc((n_heads_rows + 1) * sizeof(double));
    env_reference(e, scale, 0, e->ref_out, e->ref_lse);
    if (tst_int8_query_used(LLMKV_CPU_PATH_AVX512_BF16, c->kt, c->D)) {
        e->ref_out_i8 = (double*)malloc((n_heads_rows * c->D + 1) * sizeof(double));
        e->ref_lse_i8 = (double*)malloc((n_heads_rows + 1) * sizeof(double));
        env_reference(e, scale, 1, e->ref_out_i8, e->ref_lse_i8);
    }

    /* Outputs with guards and canary padding. */
    e->out_floats = e->n_tokens ? (size_t)e->n_tokens * e->out_stride : 0;
    e->out_buf = (float*)malloc((e->out_floats + 2 * OUT_GUARD) * sizeof(float));
    e->out = e->out_buf + OUT_GUARD;
    e->lse_floats = n_heads_rows;
    e->lse_buf = (float*)malloc((e->lse_floats + 2 * OUT_GUARD) * sizeof(float));
    e->lse = e->lse_buf + OUT_GUARD;
    fill_outputs_canary(e);
out:
    free(kbuf);
    free(vbuf);
    return ok;
}

static llmkv_attn_desc env_desc(const aenv* e, llmkv_cpu_path path) {
    llmkv_attn_desc d;
    memset(&d, 0, sizeof d);
    d.layer = e->c.layer;
    d.n_q_heads = e->nqh;
    d.q = e->q;
    d.q_stride = e->c.q_stride_kind ? e->q_stride * sizeof(float) : 0;
    d.out = e->out;
    d.out_stride = e->c.out_stride_kind ? e->out_stride * sizeof(float) : 0;
    d.lse = e->c.use_lse ? e->lse : NULL;
    d.scale = e->c.scale;
    d.softcap = e->c.softcap;
    d.window = e->c.window;
    d.non_causal = e->c.non_causal;
    d.path = path;
    return d;
}

/* ------------------------------------------------------------------------ */
/* Thread modes                                                             */
/* ------------------------------------------------------------------------ */

enum { M_SINGLE, M_POOL, M_EXT, M_EXT_THREADS };

typedef struct amode {
    int kind;
    uint32_t nth;
    llmkv_threadpool* pool;
    char name[32];
} amode;

typedef struct apools {
    llmkv_threadpool *p1, *p2, *p3;
    amode modes[10];
    int n_modes;
} apools;

static void pools_create(tst* t, apools* ps) {
    static const uint32_t ext_nth[] = {1, 2, 3, 5};
    llmkv_result r2, r3;
    unsigned i;
    memset(ps, 0, sizeof *ps);
    TST_EQ(t, llmkv_threadpool_create(1, NULL, &ps->p1), LLMKV_OK);
    r2 = llmkv_threadpool_create(2, NULL, &ps->p2);
    r3 = llmkv_threadpool_create(3, NULL, &ps->p3);
#ifdef LLMKV_NO_THREADS
    TST_EQ(t, r2, LLMKV_ERR_UNSUPPORTED);
    TST_EQ(t, r3, LLMKV_ERR_UNSUPPORTED);
#else
    TST_EQ(t, r2, LLMKV_OK);
    TST_EQ(t, r3, LLMKV_OK);
#endif
    ps->modes[ps->n_modes].kind = M_SINGLE;
    strcpy(ps->modes[ps->n_modes++].name, "pool NULL");
    if (ps->p1) {
        ps->modes[ps->n_modes].kind = M_POOL;
        ps->modes[ps->n_modes].pool = ps->p1;
        ps->modes[ps->n_modes].nth = 1;
        strcpy(ps->modes[ps->n_modes++].name, "pool of 1");
    }
    if (ps->p2) {
        ps->modes[ps->n_modes].kind = M_POOL;
        ps->modes[ps->n_modes].pool = ps->p2;
        ps->modes[ps->n_modes].nth = 2;
        strcpy(ps->modes[ps->n_modes++].name, "pool of 2");
    }
    if (ps->p3) {
        ps->modes[ps->n_modes].kind = M_POOL;
        ps->modes[ps->n_modes].pool = ps->p3;
        ps->modes[ps->n_modes].nth = 3;
        strcpy(ps->modes[ps->n_modes++].name, "pool of 3");
    }
    for (i = 0; i < sizeof ext_nth / sizeof ext_nth[0]; ++i) {
        ps->modes[ps->n_modes].kind = M_EXT;
        ps->modes[ps->n_modes].nth = ext_nth[i];
        sprintf(ps->modes[ps->n_modes++].name, "part/merge nth=%u", ext_nth[i]);
    }
#ifndef LLMKV_NO_THREADS
    ps->modes[ps->n_modes].kind = M_EXT_THREADS;
    ps->modes[ps->n_modes].nth = 3;
    strcpy(ps->modes[ps->n_modes++].name, "part/merge on 3 pthreads");
#endif
}

static void pools_destroy(apools* ps) {
    llmkv_threadpool_destroy(ps->p1);
    llmkv_threadpool_destroy(ps->p2);
    llmkv_threadpool_destroy(ps->p3);
}

#ifndef LLMKV_NO_THREADS
typedef struct ext_thread_arg {
    const aenv* e;
    const llmkv_attn_desc* d;
    uint32_t ith, nth;
    void* ws;
    size_t ws_size;
    int merge;
    llmkv_result r;
} ext_thread_arg;

static void* ext_thread(void* p) {
    ext_thread_arg* a = (ext_thread_arg*)p;
    if (a->merge)
        a->r = llmkv_attend_merge(a->e->kv, a->e->b, a->d, a->ith, a->nth, a->ws, a->ws_size);
    else
        a->r = llmkv_attend_part(a->e->kv, a->e->b, a->d, a->ith, a->nth, a->ws, a->ws_size);
    return NULL;
}
#endif

/* Runs one attention call in mode m. *ws_bytes receives the workspace size
   of the external modes (0 otherwise). Returns the first failing code. */
static llmkv_result run_mode(tst* t, const aenv* e, const llmkv_attn_desc* d, const amode* m, tst_rng* r,
                             size_t* ws_bytes) {
    llmkv_result res = LLMKV_OK;
    size_t ws = 0, k;
    unsigned char* wsb;
    uint32_t perm[8], i, j, tmp, nth = m->nth;
    *ws_bytes = 0;
    if (m->kind == M_SINGLE) return llmkv_attend(e->kv, e->b, d, NULL);
    if (m->kind == M_POOL) return llmkv_attend(e->kv, e->b, d, m->pool);

    res = llmkv_attend_workspace_size(e->kv, e->b, d, nth, &ws);
    if (res != LLMKV_OK) return res;
    *ws_bytes = ws;
    /* A workspace full of NaN bytes, 4-byte aligned but not more (offset by
       4 from malloc's alignment), then a guard. */
    wsb = (unsigned char*)malloc(ws + WS_GUARD + 4);
    memset(wsb, 0xFF, ws + 4);
    memset(wsb + 4 + ws, 0x5A, WS_GUARD);
    if (m->kind == M_EXT) {
        /* Sequential, in shuffled order: a valid schedule (every part before
           every merge). */
        for (i = 0; i < nth; ++i) perm[i] = i;
        for (i = nth; i > 1; --i) {
            j = tst_below(r, i);
            tmp = perm[i - 1];
            perm[i - 1] = perm[j];
            perm[j] = tmp;
        }
        for (i = 0; i < nth && res == LLMKV_OK; ++i)
            res = llmkv_attend_part(e->kv, e->b, d, perm[i], nth, wsb + 4, ws);
        for (i = 0; i < nth && res == LLMKV_OK; ++i)
            res = llmkv_attend_merge(e->kv, e->b, d, perm[nth - 1 - i], nth, wsb + 4, ws);
    }
#ifndef LLMKV_NO_THREADS
    else {
        ext_thread_arg args[8];
        pthread_t th[8];
        int phase;
        for (phase = 0; phase < 2 && res == LLMKV_OK; ++phase) {
            for (i = 0; i < nth; ++i) {
                args[i].e = e;
                args[i].d = d;
                args[i].ith = i;
                args[i].nth = nth;
                args[i].ws = wsb + 4;
                args[i].ws_size = ws;
                args[i].merge = phase;
                args[i].r = LLMKV_OK;
                if (pthread_create(&th[i], NULL, ext_thread, &args[i]) != 0) {
                    ext_thread(&args[i]);
                    th[i] = pthread_self();
                }
            }
            for (i = 0; i < nth; ++i) {
                if (!pthread_equal(th[i], pthread_self())) pthread_join(th[i], NULL);
                if (args[i].r != LLMKV_OK) res = args[i].r;
            }
        }
    }
#endif
    for (k = 0; k < WS_GUARD; ++k)
        if (wsb[4 + ws + k] != 0x5A) {
            fprintf(stderr, "  workspace guard overwritten at byte %lu past the %lu reported\n", (unsigned long)k,
                    (unsigned long)ws);
            ATTN_FAIL(t, "workspace guard intact");
            break;
        }
    free(wsb);
    return res;
}

/* ------------------------------------------------------------------------ */
/* Checking a result                                                        */
/* ------------------------------------------------------------------------ */

typedef struct aerr { double out, lse; } aerr;

/* Compares out / lse with the reference and checks every canary. Returns 1
   when all is well. */
static int check_result(tst* t, const aenv* e, llmkv_cpu_path path, const char* mode_name, aerr* worst_case) {
    const acase* c = &e->c;
    double tol = type_tol(c->kt) > type_tol(c->vt) ? type_tol(c->kt) : type_tol(c->vt);
    double worst_o = 0, worst_l = 0;
    int i8 = tst_int8_query_used(path == LLMKV_CPU_PATH_AUTO ? llmkv_cpu_path_auto() : path, c->kt, c->D);
    const double* ref_out = i8 ? e->ref_out_i8 : e->ref_out;
    const double* ref_lse = i8 ? e->ref_lse_i8 : e->ref_lse;
    uint32_t i, tok, hq, dd;
    size_t bad_at;
    int ok = 1, reported = 0;
    const char* pname = llmkv_cpu_path_name(path);

    /* Guards and padding. */
    bad_at = first_non_canary(e->out_buf, OUT_GUARD);
    if (bad_at < OUT_GUARD) {
        fprintf(stderr, "  [%s, %s] out guard before the buffer written (%lu floats before)\n", pname, mode_name,
                (unsigned long)(OUT_GUARD - bad_at));
        ok = 0;
    }
    bad_at = first_non_canary(e->out + e->out_floats, OUT_GUARD);
    if (bad_at < OUT_GUARD) {
        fprintf(stderr, "  [%s, %s] out guard after the buffer written (float %lu past the end)\n", pname,
                mode_name, (unsigned long)bad_at);
        ok = 0;
    }
    for (tok = 0; tok < e->n_tokens; ++tok) {
        size_t pad = e->out_stride - e->row;
        bad_at = first_non_canary(e->out + (size_t)tok * e->out_stride + e->row, pad);
        if (bad_at < pad) {
            fprintf(stderr, "  [%s, %s] out row %u padding written (float %lu after the row)\n", pname, mode_name,
                    tok, (unsigned long)bad_at);
            ok = 0;
            break;
        }
    }
    if (first_non_canary(e->lse_buf, OUT_GUARD) < OUT_GUARD ||
        first_non_canary(e->lse + e->lse_floats, OUT_GUARD) < OUT_GUARD) {
        fprintf(stderr, "  [%s, %s] lse guard written\n", pname, mode_name);
        ok = 0;
    }
    if (memcmp(e->q, e->q_copy, e->q_floats * sizeof(float))) {
        fprintf(stderr, "  [%s, %s] q was written\n", pname, mode_name);
        ok = 0;
    }
    if (!c->use_lse && first_non_canary(e->lse, e->lse_floats) < e->lse_floats) {
        fprintf(stderr, "  [%s, %s] lse written although desc.lse is NULL\n", pname, mode_name);
        ok = 0;
    }

    /* Values. */
    for (i = 0; i < c->n_seqs; ++i) {
        uint32_t row0 = (uint32_t)e->info.qo_indptr[i];
        for (tok = 0; tok < c->qlens[i]; ++tok)
            for (hq = 0; hq < e->nqh; ++hq) {
                size_t r = (size_t)(row0 + tok);
                const float* o = e->out + r * e->out_stride + (size_t)hq * c->D;
                const double* ro = ref_out + (r * e->nqh + hq) * c->D;
                double vm = e->vmax[i][hq / c->G], err_row = 0;
                uint32_t worst_d = 0;
                for (dd = 0; dd < c->D; ++dd) {
                    double err = fabs((double)o[dd] - ro[dd]) / vm;
                    if (!(err <= err_row)) { /* NaN counts as infinite */
                        err_row = err != err ? INFINITY : err;
                        worst_d = dd;
                    }
                }
                if (err_row > worst_o) worst_o = err_row;
                if (!(err_row <= tol)) {
                    ok = 0;
                    if (reported++ < 3 && g_fail_msgs < FAIL_MSG_MAX)
                        fprintf(stderr,
                                "  [%s, %s] seq %u row %u (pos %u) head %u dim %u: expected %.9g got %.9g "
                                "(error %.3g x max|V|, bound %.3g)\n",
                                pname, mode_name, i, tok, c->lens[i] - c->qlens[i] + tok, hq, worst_d,
                                ro[worst_d], (double)o[worst_d], err_row, tol);
                }
                if (c->use_lse) {
                    double ref = ref_lse[r * e->nqh + hq], got = (double)e->lse[r * e->nqh + hq];
                    double err = ref == -INFINITY ? (got == -INFINITY ? 0.0 : INFINITY) : fabs(got - ref) / (1.0 + fabs(ref));
                    if (err != err) err = INFINITY;
                    if (err > worst_l) worst_l = err;
                    if (!(err <= tol)) {
                        ok = 0;
                        if (reported++ < 3 && g_fail_msgs < FAIL_MSG_MAX)
                            fprintf(stderr, "  [%s, %s] seq %u row %u head %u: lse expected %.9g got %.9g\n", pname,
                                    mode_name, i, tok, hq, ref, got);
                    }
                }
            }
    }
    if (!ok) {
        if (g_fail_msgs++ < FAIL_MSG_MAX) print_case(c);
        ATTN_FAIL(t, "attention result matches the double-precision reference");
    }
    if (path >= 0 && path < N_PATHS) {
        if (worst_o > g_worst_out[path][c->kt][c->vt]) g_worst_out[path][c->kt][c->vt] = worst_o;
        if (worst_l > g_worst_lse[path][c->kt][c->vt]) g_worst_lse[path][c->kt][c->vt] = worst_l;
        g_n_checked[path][c->kt][c->vt]++;
        if ((worst_o > worst_l ? worst_o : worst_l) / tol > g_worst_ratio[path]) {
            g_worst_ratio[path] = (worst_o > worst_l ? worst_o : worst_l) / tol;
            g_worst_case[path] = *c;
        }
    }
    if (worst_case) {
        worst_case->out = worst_o;
        worst_case->lse = worst_l;
    }
    return ok;
}

/* Runs the case on `path` in mode m and checks it. */
static int run_and_check(tst* t, aenv* e, llmkv_cpu_path path, const amode* m, tst_rng* r) {
    llmkv_attn_desc d = env_desc(e, path);
    size_t ws;
    llmkv_result res;
    fill_outputs_canary(e);
    res = run_mode(t, e, &d, m, r, &ws);
    if (res != LLMKV_OK) {
        fprintf(stderr, "  [%s, %s] returned %s\n", llmkv_cpu_path_name(path), m->name, llmkv_result_string(res));
        print_case(&e->c);
        ATTN_FAIL(t, "attention call returns LLMKV_OK");
        return 0;
    }
    return check_result(t, e, path, m->name, NULL);
}

static int supported_paths(llmkv_cpu_path* out) {
    int n = 0, p;
    for (p = LLMKV_CPU_PATH_SCALAR; p <= LLMKV_CPU_PATH_LAST; ++p)
        if (llmkv_cpu_path_supported((llmkv_cpu_path)p)) out[n++] = (llmkv_cpu_path)p;
    return n;
}

/* ------------------------------------------------------------------------ */
/* Random cases                                                             */
/* ------------------------------------------------------------------------ */

static uint32_t pick_len(tst_rng* r, uint32_t ps, uint32_t maxlen) {
    uint32_t k, len;
    switch (tst_below(r, 6)) {
    case 0: return 0;
    case 1: /* page boundary: a multiple of the page size, or one off */
    case 2:
        k = 1 + tst_below(r, maxlen / ps > 0 ? (maxlen / ps < 40 ? maxlen / ps : 40) : 1);
        len = k * ps + tst_below(r, 3);
        return len > 0 ? len - 1 : 0;
    case 3: return 1 + tst_below(r, ps + 2);
    default: return 1 + tst_below(r, maxlen);
    }
}

static acase random_case(tst_rng* r) {
    static const uint32_t dims[] = {1, 3, 8, 64, 80, 96, 128, 256, 512};
    static const uint32_t pages[] = {1, 7, 16, 256};
    static const uint32_t ratios[] = {1, 2, 4, 8};
    static const llmkv_dtype types[] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16,
                                        LLMKV_DTYPE_Q8,  LLMKV_DTYPE_Q4,  LLMKV_DTYPE_FP8};
    acase c;
    uint32_t i, maxlen;
    memset(&c, 0, sizeof c);
    c.D = tst_below(r, 5) == 0 ? 1 + tst_below(r, 512) : dims[tst_below(r, 9)];
    c.ps = pages[tst_below(r, 4)];
    if (tst_below(r, 6) == 0) { /* MQA */
        c.n_kv = 1;
        c.G = tst_below(r, 2) ? 8 : 16;
    } else {
        c.n_kv = 1 + tst_below(r, 4);
        c.G = ratios[tst_below(r, 4)];
    }
    c.n_layers = 1 + tst_below(r, 3);
    c.layer = tst_below(r, c.n_layers);
    c.kt = types[tst_below(r, 6)];
    c.vt = types[tst_below(r, 6)];
    c.n_seqs = 1 + tst_below(r, 6);
    maxlen = tst_below(r, 3) == 0 ? 64 : 600;
    for (i = 0; i < c.n_seqs; ++i) {
        uint32_t L = pick_len(r, c.ps, maxlen), q;
        switch (L ? tst_below(r, 6) : 0) {
        case 0: q = 0; break;
        case 1:
        case 2: q = 1; break;       /* decode */
        case 3: q = L; break;       /* whole prompt */
        default: q = 1 + tst_below(r, L); break; /* chunked prefill */
        }
        c.lens[i] = L;
        c.qlens[i] = q;
    }
    switch (tst_below(r, 10)) {
    case 5: c.window = 1; break;
    case 6: c.window = 2 + tst_below(r, 31); break;
    case 7: c.window = maxlen + 1 + tst_below(r, 10000); break; /* longer than any sequence */
    case 8: c.window = 1 + tst_below(r, maxlen); break;
    case 9: c.window = c.ps + tst_below(r, 3) - (c.ps > 1 ? 1 : 0); break;
    default: c.window = 0; break;
    }
    c.non_causal = tst_below(r, 8) == 0;
    c.logit_sigma = tst_below(r, 3) == 0 ? 1.0 : tst_below(r, 2) ? 2.0 : 3.0;
    switch (tst_below(r, 10)) {
    /* Larger logits with a cap. A float dot product's rounding error grows
       with the size of its terms and with head_dim: with F32 storage at
       D = 512, a single-accumulator float path (the scalar one) reaches
       about 0.9 of the 1e-5 bound with logits of std 4 uncapped or 8 under
       a cap of 30, measured over thousands of cases. The stds used here
       (at most 3 uncapped, 6 under cap 30, 8 under the saturating cap 5)
       keep a correct float implementation clear of the bound. */
    case 7:
    case 8:
        c.softcap = 30.0f;
        c.logit_sigma = 6.0;
        break;
    case 9:
        c.softcap = 5.0f;
        c.logit_sigma = 8.0;
        break;
    default: break;
    }
    if (tst_below(r, 4) == 0) c.scale = (float)(0.02 + 0.5 * unit(r));
    c.use_lse = tst_below(r, 10) < 7;
    c.q_stride_kind = (int)tst_below(r, 3);
    c.out_stride_kind = (int)tst_below(r, 3);
    c.q_pad = c.q_stride_kind == 2 ? 1 + tst_below(r, 17) : 0;
    c.out_pad = c.out_stride_kind == 2 ? 1 + tst_below(r, 17) : 0;
    c.v_amp = 0.5 + 3.5 * unit(r);
    /* Keep the pool small (a page of D = 512, 4 KV heads, 3 F32 layers and
       256 slots is 25 MiB): halve the longest sequence while over 48 MiB. */
    for (;;) {
        double n_pages = 4.0, page_bytes = (double)c.ps * c.D * c.n_kv * c.n_layers *
                                         (double)(llmkv_dtype_size(c.kt) + llmkv_dtype_size(c.vt) + 2);
        uint32_t big = 0;
        for (i = 0; i < c.n_seqs; ++i) {
            n_pages += (double)((c.lens[i] + c.ps - 1) / c.ps);
            if (c.lens[i] > c.lens[big]) big = i;
        }
        if (n_pages * page_bytes <= 48.0 * 1048576.0 || c.lens[big] == 0) break;
        c.lens[big] /= 2;
        if (c.qlens[big] > c.lens[big]) c.qlens[big] = c.lens[big];
    }
    /* Keep the case cheap: halve the longest query runs, then lengths. */
    while (case_work(&c) > CASE_WORK) {
        uint32_t big = 0;
        double bw = -1;
        for (i = 0; i < c.n_seqs; ++i) {
            double w = (double)c.qlens[i] * c.lens[i];
            if (w > bw) {
                bw = w;
                big = i;
            }
        }
        if (c.qlens[big] > 1)
            c.qlens[big] /= 2;
        else {
            c.lens[big] /= 2;
            if (c.qlens[big] > c.lens[big]) c.qlens[big] = c.lens[big];
        }
    }
    return c;
}

static void test_attn_random(tst* t) {
    tst_rng r;
    apools ps;
    llmkv_cpu_path paths[N_PATHS];
    int n_paths = supported_paths(paths), n = scaled(300, 6), k, p;
    r.s = attn_seed(0xA77E4D01ull);
    pools_create(t, &ps);
    for (k = 0; k < n; ++k) {
        aenv e;
        acase c = random_case(&r);
        if (!env_setup(t, &e, &c, &r)) {
            print_case(&c);
            env_free(&e);
            break;
        }
        for (p = 0; p < n_paths; ++p) {
            const amode* m = &ps.modes[tst_below(&r, (unsigned)ps.n_modes)];
            run_and_check(t, &e, paths[p], m, &r);
        }
        if (k % 8 == 0) /* AUTO resolves to a supported path */
            run_and_check(t, &e, LLMKV_CPU_PATH_AUTO, &ps.modes[0], &r);
        env_free(&e);
    }
    pools_destroy(&ps);
}

/* Every head_dim of the list, every page size, the 36 K/V type pairs in turn, on
   one small ragged batch each, through every path: the shapes the random
   test may draw only rarely. */
static void test_attn_shapes(tst* t) {
    static const uint32_t dims[] = {1, 3, 8, 64, 80, 96, 128, 256, 512, 17, 130, 333};
    static const uint32_t pages[] = {1, 7, 16, 256};
    static const llmkv_dtype types[] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16,
                                        LLMKV_DTYPE_Q8,  LLMKV_DTYPE_Q4,  LLMKV_DTYPE_FP8};
    llmkv_cpu_path paths[N_PATHS];
    int n_paths = supported_paths(paths), p;
    unsigned di, pi, ki;
    tst_rng r;
    apools ps;
    r.s = attn_seed(0x5A9E5ull);
    pools_create(t, &ps);
    for (di = 0; di < sizeof dims / sizeof dims[0]; ++di)
        for (pi = 0; pi < 4; ++pi) {
            ki = (di * 4 + pi) % 36;
            {
                acase c = base_case(dims[di], pages[pi], 2, di % 2 ? 4 : 2, types[ki / 6], types[ki % 6]);
                aenv e;
                uint32_t ps_ = pages[pi];
                if (attn_env_scale() < 0.5 && pi != di % 4) continue; /* a reduced run: one page size per dim */
                c.n_layers = 2;
                c.layer = 1;
                c.n_seqs = 4;
                /* page-boundary lengths: ps - 1, ps, ps + 1, 2 ps */
                c.lens[0] = ps_ > 1 ? ps_ - 1 : 1;
                c.lens[1] = ps_;
                c.lens[2] = ps_ + 1;
                c.lens[3] = 2 * ps_;
                c.qlens[0] = 1;
                c.qlens[1] = c.lens[1] > 3 ? 3 : c.lens[1];
                c.qlens[2] = 1;
                c.qlens[3] = c.lens[3] > 5 ? 5 : c.lens[3];
                if (ps_ == 1) c.qlens[3] = 2;
                c.q_stride_kind = 2;
                c.q_pad = 3;
                c.out_stride_kind = 2;
                c.out_pad = 5;
                if (!env_setup(t, &e, &c, &r)) {
                    env_free(&e);
                    continue;
                }
                for (p = 0; p < n_paths; ++p) run_and_check(t, &e, paths[p], &ps.modes[(unsigned)p % ps.n_modes], &r);
                env_free(&e);
            }
        }
    pools_destroy(&ps);
}

/* Runs the case twice in one mode: the first result against the
   reference, the second bit-identical to the first. Returns the workspace
   size the mode used. */
static size_t check_twice(tst* t, aenv* e, llmkv_cpu_path path, const amode* m, tst_rng* r) {
    llmkv_attn_desc d = env_desc(e, path);
    float* first = (float*)malloc((e->out_floats + e->lse_floats + 1) * sizeof(float));
    size_t ws = 0;
    int run;
    if (!first) return 0;
    for (run = 0; run < 2; ++run) {
        llmkv_result res;
        fill_outputs_canary(e);
        res = run_mode(t, e, &d, m, r, &ws);
        TST_EQ(t, res, LLMKV_OK);
        if (res != LLMKV_OK) break;
        if (run == 0) {
            if (!check_result(t, e, path, m->name, NULL)) print_case(&e->c);
            memcpy(first, e->out, e->out_floats * sizeof(float));
            memcpy(first + e->out_floats, e->lse, e->lse_floats * sizeof(float));
        } else {
            int same = !memcmp(first, e->out, e->out_floats * sizeof(float)) &&
                       !memcmp(first + e->out_floats, e->lse, e->lse_floats * sizeof(float));
            if (!same) fprintf(stderr, "  [%s, %s] two runs differ\n", llmkv_cpu_path_name(path), m->name);
            TST_CHECK(t, same);
        }
    }
    free(first);
    return ws;
}

/* Prefill tiles (the AVX-512 paths compute sequences with at least 16 rows
   per KV head with rows in vector lanes): every tile shape the planner can
   make, against the reference, through every path and thread mode, twice
   (bit-identical). Rows of 16 per vector from 1 to 4 vectors (head_dim 256
   down to 8), head_dim tails of 8, rows that do not fill a vector, GQA
   groups larger than a tile, windows and caps cutting inside a chunk,
   quantized types, and one long sequence split across threads (partial
   results merged, every thread mode). Sequences just under the threshold
   (15 rows) take the other kernels in the same batch. To keep sanitizer
   runs short, the other cases run in a third of the thread modes each
   (all of them over the list), always including pool NULL; in reduced
   runs (LLMKV_TEST_SCALE < 0.5) in pool NULL only. */
static void test_attn_tiles(tst* t) {
    typedef struct tcfg {
        uint32_t D, G, n_kv, ps;
        llmkv_dtype kt, vt;
        uint32_t n_seqs, lens[4], qlens[4], window;
        float softcap;
        int non_causal;
    } tcfg;
    static const tcfg cfgs[] = {
        {128, 4, 2, 16, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 4, {150, 64, 5, 200}, {40, 64, 5, 1}, 0, 0.0f, 0},
        {80, 1, 3, 7, LLMKV_DTYPE_BF16, LLMKV_DTYPE_F32, 2, {150, 40}, {150, 17}, 0, 0.0f, 0},
        {256, 32, 1, 16, LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, 2, {70, 33}, {3, 33}, 0, 0.0f, 0},
        {24, 3, 2, 1, LLMKV_DTYPE_Q8, LLMKV_DTYPE_Q4, 2, {90, 31}, {90, 6}, 10, 0.0f, 0},
        {136, 2, 1, 256, LLMKV_DTYPE_FP8, LLMKV_DTYPE_BF16, 2, {400, 90}, {60, 45}, 77, 30.0f, 0},
        {64, 8, 1, 16, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 2, {100, 20}, {40, 20}, 0, 0.0f, 1},
        {8, 2, 4, 16, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, 1, {260}, {260}, 0, 0.0f, 0},
        {96, 5, 1, 16, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, 3, {16, 40, 9}, {4, 3, 9}, 0, 0.0f, 0},
        {128, 1, 1, 16, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 1, {3000}, {16}, 0, 0.0f, 0},
        {128, 4, 1, 16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_BF16, 1, {900}, {70}, 300, 0.0f, 0},
    };
    llmkv_cpu_path paths[N_PATHS];
    int n_paths = supported_paths(paths), p, mi;
    unsigned ci;
    tst_rng r;
    apools ps;
    r.s = attn_seed(0x711E5ull);
    pools_create(t, &ps);
    for (ci = 0; ci < sizeof cfgs / sizeof cfgs[0]; ++ci) {
        const tcfg* f = &cfgs[ci];
        acase c = base_case(f->D, f->ps, f->n_kv, f->G, f->kt, f->vt);
        aenv e;
        uint32_t i;
        c.n_seqs = f->n_seqs;
        for (i = 0; i < f->n_seqs; ++i) {
            c.lens[i] = f->lens[i];
            c.qlens[i] = f->qlens[i];
        }
        c.window = f->window;
        c.softcap = f->softcap;
        c.non_causal = f->non_causal;
        if (f->softcap > 0.0f) c.logit_sigma = 6.0;
        c.n_layers = 2;
        c.layer = ci % 2;
        c.q_stride_kind = (int)(ci % 3);
        c.q_pad = c.q_stride_kind == 2 ? 3 : 0;
        c.out_stride_kind = (int)((ci + 1) % 3);
        c.out_pad = c.out_stride_kind == 2 ? 5 : 0;
        if (!env_setup(t, &e, &c, &r)) {
            print_case(&c);
            env_free(&e);
            continue;
        }
        for (p = 0; p < n_paths; ++p)
            for (mi = 0; mi < ps.n_modes; ++mi) {
                const amode* m = &ps.modes[mi];
                size_t ws;
                if (ci != 8 && mi != 0 && ((unsigned)mi % 3 != ci % 3 || attn_env_scale() < 0.5)) continue;
                ws = check_twice(t, &e, paths[p], m, &r);
                /* one 16-row sequence on several threads must be split */
                if (ci == 8 && (m->kind == M_EXT || m->kind == M_EXT_THREADS) && m->nth > 1) TST_CHECK(t, ws > 0);
            }
        env_free(&e);
    }
    pools_destroy(&ps);
}

/* Masks with exact expectations: window 1 returns the row's own V and its
   logit as lse; a window as long as the sequence equals causal; non-causal
   ignores the window. All against the reference, and window 1 also against
   the stored V itself. */
static void test_attn_masks(tst* t) {
    llmkv_cpu_path paths[N_PATHS];
    int n_paths = supported_paths(paths), p, variant;
    tst_rng r;
    apools ps;
    r.s = attn_seed(0x3A5Cull);
    pools_create(t, &ps);
    for (variant = 0; variant < 4; ++variant) {
        acase c = base_case(24, 7, 2, 2, LLMKV_DTYPE_F32, LLMKV_DTYPE_F16);
        aenv e;
        uint32_t i, tok, hq, dd;
        c.n_seqs = 3;
        c.lens[0] = 40;
        c.qlens[0] = 40;
        c.lens[1] = 15;
        c.qlens[1] = 6;
        c.lens[2] = 1;
        c.qlens[2] = 1;
        c.window = variant == 0 ? 1 : variant == 1 ? 40 : variant == 2 ? 5 : 3;
        c.non_causal = variant == 3;
        c.logit_sigma = 4.0;
        if (!env_setup(t, &e, &c, &r)) {
            env_free(&e);
            continue;
        }
        for (p = 0; p < n_paths; ++p) {
            run_and_check(t, &e, paths[p], &ps.modes[0], &r);
            if (variant == 0) { /* each row sees only its own key */
                int good = 1;
                for (i = 0; i < c.n_seqs; ++i)
                    for (tok = 0; tok < c.qlens[i]; ++tok) {
                        uint32_t row = (uint32_t)e.info.qo_indptr[i] + tok, pos = c.lens[i] - c.qlens[i] + tok;
                        for (hq = 0; hq < e.nqh; ++hq)
                            for (dd = 0; dd < c.D; ++dd) {
                                double v = (double)e.vref[i][((size_t)pos * c.n_kv + hq / c.G) * c.D + dd];
                                double o = (double)e.out[(size_t)row * e.out_stride + (size_t)hq * c.D + dd];
                                if (!(fabs(o - v) <= TOL_F32 * e.vmax[i][hq / c.G])) good = 0;
                            }
                    }
                TST_CHECK(t, good);
            }
        }
        env_free(&e);
    }
    pools_destroy(&ps);
}

/* ------------------------------------------------------------------------ */
/* Threads: long sequences, every mode, determinism                          */
/* ------------------------------------------------------------------------ */

static void test_attn_threads(tst* t) {
    llmkv_cpu_path paths[N_PATHS];
    int n_paths = supported_paths(paths), p, k, n = scaled(7, 2), mi;
    tst_rng r;
    apools ps;
    r.s = attn_seed(0x7123ADull);
    pools_create(t, &ps);
    for (k = 0; k < n; ++k) {
        int variant = k % 7;
        acase c = base_case(variant == 1 ? 64 : 128, variant == 2 ? 256 : 16, variant == 1 ? 2 : 1,
                            variant == 1 ? 4 : variant == 3 ? 2 : 1,
                            variant == 1 ? LLMKV_DTYPE_BF16 : variant == 4 ? LLMKV_DTYPE_F32 : LLMKV_DTYPE_F16,
                            variant == 1 ? LLMKV_DTYPE_F32 : variant == 5 ? LLMKV_DTYPE_BF16 : LLMKV_DTYPE_F16);
        aenv e;
        double sc = attn_env_scale() < 1.0 ? attn_env_scale() : 1.0;
        uint32_t L = 2000 + tst_below(&r, 1 + (unsigned)(3000.0 * sc));
        c.n_seqs = 1;
        c.lens[0] = L;
        c.qlens[0] = 1;
        switch (variant) {
        case 2: c.qlens[0] = 5; break;           /* chunked prefill */
        case 3: c.window = 700; break;           /* split inside a window */
        case 4: /* a long sequence beside short ones */
            c.n_seqs = 3;
            c.lens[1] = 3;
            c.qlens[1] = 1;
            c.lens[2] = 40;
            c.qlens[2] = 2;
            break;
        case 5: c.non_causal = 1; c.qlens[0] = 3; break;
        case 6: c.softcap = 30.0f; c.logit_sigma = 12.0; c.use_lse = 0; break;
        default: break;
        }
        c.n_layers = 2;
        c.layer = (uint32_t)variant % 2;
        c.out_stride_kind = 2;
        c.out_pad = 2;
        if (!env_setup(t, &e, &c, &r)) {
            env_free(&e);
            continue;
        }
        for (p = 0; p < n_paths; ++p)
            for (mi = 0; mi < ps.n_modes; ++mi) {
                const amode* m = &ps.modes[mi];
                size_t ws = check_twice(t, &e, paths[p], m, &r);
                /* The design splits a long decode across threads (merging
                   by log-sum-exp); without a split this test would not
                   exercise the merge at all. */
                if ((m->kind == M_EXT || m->kind == M_EXT_THREADS) && m->nth > 1 && c.n_seqs == 1 && c.qlens[0] == 1 &&
                    c.n_kv * c.G <= 2 && c.window == 0) {
                    if (ws == 0)
                        fprintf(stderr, "  no split for a %u-token decode on %u threads\n", L, m->nth);
                    TST_CHECK(t, ws > 0);
                }
                if (t->verbose && p == 0 && (m->kind == M_EXT || m->kind == M_EXT_THREADS))
                    fprintf(stderr, "    L=%u q=%u heads=%u/%u nth=%u: workspace %lu bytes\n", L, c.qlens[0],
                            c.n_kv * c.G, c.n_kv, m->nth, (unsigned long)ws);
            }
        env_free(&e);
    }
    pools_destroy(&ps);
}

#ifndef LLMKV_NO_THREADS
typedef struct conc_arg {
    const aenv* e;
    llmkv_attn_desc d;
    llmkv_threadpool* pool;
    llmkv_result r;
} conc_arg;

static void* conc_thread(void* p) {
    conc_arg* a = (conc_arg*)p;
    a->r = llmkv_attend(a->e->kv, a->e->b, &a->d, a->pool);
    return NULL;
}
#endif

/* Concurrent llmkv_attend calls on one cache (it only reads): three threads
   with their own outputs, one of them through its own pool. */
static void test_attn_concurrent(tst* t) {
#ifdef LLMKV_NO_THREADS
    TST_SKIP(t, "built with LLMKV_NO_THREADS");
#else
    acase c = base_case(64, 16, 2, 2, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    aenv e;
    tst_rng r;
    conc_arg a[3];
    pthread_t th[3];
    float* outs[3];
    float* lses[3];
    llmkv_threadpool* pool = NULL;
    int i;
    r.s = attn_seed(0xC0C0ull);
    c.n_seqs = 2;
    c.lens[0] = 1500;
    c.qlens[0] = 2;
    c.lens[1] = 300;
    c.qlens[1] = 1;
    if (!env_setup(t, &e, &c, &r)) {
        env_free(&e);
        return;
    }
    TST_EQ(t, llmkv_threadpool_create(2, NULL, &pool), LLMKV_OK);
    for (i = 0; i < 3; ++i) {
        outs[i] = (float*)malloc((e.out_floats + 1) * sizeof(float));
        lses[i] = (float*)malloc((e.lse_floats + 1) * sizeof(float));
        a[i].e = &e;
        a[i].d = env_desc(&e, LLMKV_CPU_PATH_AUTO);
        a[i].d.out = outs[i];
        a[i].d.lse = lses[i];
        a[i].pool = i == 2 ? pool : NULL;
        a[i].r = LLMKV_ERR_CORRUPT;
        TST_EQ(t, pthread_create(&th[i], NULL, conc_thread, &a[i]), 0);
    }
    for (i = 0; i < 3; ++i) {
        pthread_join(th[i], NULL);
        TST_EQ(t, a[i].r, LLMKV_OK);
        memcpy(e.out, outs[i], e.out_floats * sizeof(float));
        memcpy(e.lse, lses[i], e.lse_floats * sizeof(float));
        check_result(t, &e, llmkv_cpu_path_auto(), "concurrent", NULL);
        free(outs[i]);
        free(lses[i]);
    }
    llmkv_threadpool_destroy(pool);
    env_free(&e);
#endif
}

/* The built-in pool hands units out one by one to whichever of its threads
   asks (a worker that wakes late leaves its share to the others), so its
   results must not depend on the schedule: for every spin window (0: the
   workers sleep between calls and often join late; the longest: they poll)
   and pools larger than the machine, each call must equal, bit for bit,
   the same call through llmkv_attend_part / merge with nth = the pool's
   size, run sequentially. Cases: a split decode (merge task), a ragged
   batch, a prefill chunk, and a decode too small to hand to the workers
   (the caller computes it alone). Then the spin window's bad arguments,
   and a pool destroyed while its workers poll. Under LLMKV_TEST_SCALE <
   0.5 (valgrind, qemu, TSan), shorter sequences, pools of 1, 2 and 6, and
   the windows 0 and 1 s only. */
static void test_attn_pool_schedules(tst* t) {
    static const uint32_t sizes[] = {1, 2, 6, 3};
    static const uint32_t spins[] = {0, 1000000, 200};
    tst_rng r;
    int variant, calls = scaled(6, 2), light = attn_env_scale() < 0.5;
    unsigned n_sizes = light ? 3 : 4, n_spins = light ? 2 : 3;
    r.s = attn_seed(0x5C4EDull);
    for (variant = 0; variant < 4; ++variant) {
        acase c = base_case(64, 16, 2, 4, LLMKV_DTYPE_F16, variant == 1 ? LLMKV_DTYPE_BF16 : LLMKV_DTYPE_F16);
        aenv e;
        unsigned si, pi;
        c.n_seqs = 1;
        c.lens[0] = variant == 3 ? 20 : light ? 600 : 1200;
        c.qlens[0] = variant == 2 ? 40 : 1;
        if (variant == 1) {
            c.n_seqs = 5;
            c.lens[1] = 3;
            c.lens[2] = 700;
            c.lens[3] = 64;
            c.lens[4] = 129;
            c.qlens[1] = c.qlens[2] = c.qlens[3] = 1;
            c.qlens[4] = 7;
        }
        if (!env_setup(t, &e, &c, &r)) {
            env_free(&e);
            continue;
        }
        for (pi = 0; pi < n_sizes; ++pi) {
            llmkv_attn_desc d = env_desc(&e, LLMKV_CPU_PATH_AUTO);
            llmkv_threadpool* pool = NULL;
            amode ext;
            size_t ws = 0, bytes = (e.out_floats + e.lse_floats) * sizeof(float);
            float* want = (float*)malloc(bytes + sizeof(float));
            llmkv_result res = llmkv_threadpool_create(sizes[pi], NULL, &pool);
#ifdef LLMKV_NO_THREADS
            if (sizes[pi] > 1) {
                TST_EQ(t, res, LLMKV_ERR_UNSUPPORTED);
                free(want);
                continue;
            }
#endif
            TST_EQ(t, res, LLMKV_OK);
            if (res != LLMKV_OK || !want) {
                free(want);
                continue;
            }
            memset(&ext, 0, sizeof ext);
            ext.kind = M_EXT;
            ext.nth = sizes[pi];
            fill_outputs_canary(&e);
            TST_EQ(t, run_mode(t, &e, &d, &ext, &r, &ws), LLMKV_OK);
            check_result(t, &e, LLMKV_CPU_PATH_AUTO, "part/merge", NULL);
            memcpy(want, e.out, e.out_floats * sizeof(float));
            memcpy(want + e.out_floats, e.lse, e.lse_floats * sizeof(float));
            if (variant == 0 && sizes[pi] > 1) TST_CHECK(t, ws > 0); /* the decode is split: a merge task runs */
            for (si = 0; si < n_spins; ++si) {
                int k, same = 1;
                TST_EQ(t, llmkv_threadpool_set_spin(pool, spins[si]), LLMKV_OK);
                for (k = 0; k < calls; ++k) {
                    fill_outputs_canary(&e);
                    TST_EQ(t, llmkv_attend(e.kv, e.b, &d, pool), LLMKV_OK);
                    same &= !memcmp(want, e.out, e.out_floats * sizeof(float)) &&
                            !memcmp(want + e.out_floats, e.lse, e.lse_floats * sizeof(float));
                }
                if (!same)
                    fprintf(stderr, "  pool of %u, spin %u us: differs from part/merge (variant %d)\n", sizes[pi],
                            spins[si], variant);
                TST_CHECK(t, same);
            }
            llmkv_threadpool_destroy(pool); /* its workers are polling now */
            free(want);
        }
        env_free(&e);
    }
    {
        llmkv_threadpool* pool = NULL;
        TST_EQ(t, llmkv_threadpool_set_spin(NULL, 10), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_threadpool_create(1, NULL, &pool), LLMKV_OK);
        TST_EQ(t, llmkv_threadpool_set_spin(pool, 1000001), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_threadpool_set_spin(pool, 1000000), LLMKV_OK);
        TST_EQ(t, llmkv_threadpool_set_spin(pool, 0), LLMKV_OK);
        llmkv_threadpool_destroy(pool);
    }
}

/* A window of 16 over a 4000-token sequence: all but the last pages are
   masked for every row and hold NaN; the result must be the reference. */
static void test_attn_window_skips_pages(tst* t) {
    llmkv_cpu_path paths[N_PATHS];
    int n_paths = supported_paths(paths), p, variant;
    tst_rng r;
    apools ps;
    r.s = attn_seed(0x816ull);
    pools_create(t, &ps);
    for (variant = 0; variant < 3; ++variant) {
        acase c = base_case(64, 16, 2, 2, variant == 2 ? LLMKV_DTYPE_BF16 : LLMKV_DTYPE_F16,
                            variant == 1 ? LLMKV_DTYPE_F32 : LLMKV_DTYPE_F16);
        aenv e;
        int mi;
        c.n_seqs = 1;
        c.lens[0] = 4000 + (uint32_t)variant * 7;
        c.qlens[0] = variant == 0 ? 1 : variant == 1 ? 4 : 37;
        c.window = 16;
        if (!env_setup(t, &e, &c, &r)) {
            env_free(&e);
            continue;
        }
        for (p = 0; p < n_paths; ++p)
            for (mi = 0; mi < ps.n_modes; ++mi) run_and_check(t, &e, paths[p], &ps.modes[mi], &r);
        env_free(&e);
    }
    pools_destroy(&ps);
}

/* Batches whose sequences receive no query rows: the call succeeds and
   writes nothing (every page of those sequences holds NaN). */
static void test_attn_no_rows(tst* t) {
    llmkv_cpu_path paths[N_PATHS];
    int n_paths = supported_paths(paths), p, mi;
    tst_rng r;
    apools ps;
    acase c = base_case(32, 16, 2, 2, LLMKV_DTYPE_F16, LLMKV_DTYPE_F32);
    aenv e;
    r.s = attn_seed(0x0E0ull);
    pools_create(t, &ps);
    c.n_seqs = 3;
    c.lens[0] = 0;
    c.lens[1] = 33;
    c.lens[2] = 700;
    if (!env_setup(t, &e, &c, &r)) {
        env_free(&e);
        pools_destroy(&ps);
        return;
    }
    TST_EQ(t, e.n_tokens, 0);
    for (p = 0; p < n_paths; ++p)
        for (mi = 0; mi < ps.n_modes; ++mi) run_and_check(t, &e, paths[p], &ps.modes[mi], &r);
    /* A batch of no sequence at all, when the batch API accepts one. */
    if (llmkv_batch_build(e.b, e.seqs, c.qlens, 0) == LLMKV_OK) {
        llmkv_attn_desc d = env_desc(&e, LLMKV_CPU_PATH_AUTO);
        fill_outputs_canary(&e);
        TST_EQ(t, llmkv_attend(e.kv, e.b, &d, NULL), LLMKV_OK);
        TST_CHECK(t, first_non_canary(e.out_buf, 2 * OUT_GUARD) == 2 * OUT_GUARD);
        TST_CHECK(t, first_non_canary(e.lse_buf, 2 * OUT_GUARD) == 2 * OUT_GUARD);
    }
    env_free(&e);
    pools_destroy(&ps);
}

/* ------------------------------------------------------------------------ */
/* Bad calls                                                                */
/* ------------------------------------------------------------------------ */

static int outputs_untouched(const aenv* e) {
    size_t no = e->out_floats + 2 * OUT_GUARD, nl = e->lse_floats + 2 * OUT_GUARD;
    return first_non_canary(e->out_buf, no) == no && first_non_canary(e->lse_buf, nl) == nl;
}

/* Every entry point must answer `want` and write nothing. */
static void expect_code(tst* t, aenv* e, const llmkv_cache* kv, const llmkv_batch* b, const llmkv_attn_desc* d,
                        llmkv_threadpool* pool, llmkv_result want, int line) {
    llmkv_result got[5];
    size_t ws_size = 12345;
    size_t big = (size_t)1 << 20;
    void* ws = malloc(big);
    int i, untouched;
    static const char* names[5] = {"attend", "attend(pool)", "workspace_size", "part", "merge"};
    fill_outputs_canary(e);
    got[0] = llmkv_attend(kv, b, d, NULL);
    got[1] = pool ? llmkv_attend(kv, b, d, pool) : want;
    got[2] = llmkv_attend_workspace_size(kv, b, d, 2, &ws_size);
    got[3] = llmkv_attend_part(kv, b, d, 0, 2, ws, big);
    got[4] = llmkv_attend_merge(kv, b, d, 1, 2, ws, big);
    untouched = outputs_untouched(e);
    for (i = 0; i < 5; ++i)
        if (got[i] != want) {
            fprintf(stderr, "  line %d: %s returned %s, expected %s\n", line, names[i], llmkv_result_string(got[i]),
                    llmkv_result_string(want));
            TST_CHECK(t, got[i] == want);
        }
    if (!untouched) {
        fprintf(stderr, "  line %d: a failing call wrote to out or lse\n", line);
        TST_CHECK(t, untouched);
    }
    free(ws);
}

#define EXPECT(d_, code_) expect_code(t, &e, e.kv, e.b, &(d_), pool, (code_), __LINE__)

static void test_attn_bad_calls(tst* t) {
    acase c = base_case(8, 4, 2, 2, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    aenv e, lng;
    tst_rng r;
    llmkv_attn_desc good, d;
    llmkv_threadpool* pool = NULL;
    size_t row_bytes;
    int p, found_unsupported = 0;
    r.s = attn_seed(0xBADull);
    c.n_layers = 2;
    c.layer = 1;
    c.n_seqs = 2;
    c.lens[0] = 10;
    c.qlens[0] = 3;
    c.lens[1] = 5;
    c.qlens[1] = 5;
    if (!env_setup(t, &e, &c, &r)) {
        env_free(&e);
        return;
    }
    if (llmkv_threadpool_create(2, NULL, &pool) != LLMKV_OK) pool = NULL;
    good = env_desc(&e, LLMKV_CPU_PATH_AUTO);
    good.lse = e.lse;
    row_bytes = e.row * sizeof(float);

    /* Positive control: the valid call works, so "untouched" means something. */
    fill_outputs_canary(&e);
    TST_EQ(t, llmkv_attend(e.kv, e.b, &good, NULL), LLMKV_OK);
    TST_CHECK(t, !outputs_untouched(&e));
    check_result(t, &e, llmkv_cpu_path_auto(), "control", NULL);

    /* Thread pools outside 1..256 threads, or without an out pointer. */
    {
        llmkv_threadpool* tp = NULL;
        TST_EQ(t, llmkv_threadpool_create(0, NULL, &tp), LLMKV_ERR_INVALID_ARGUMENT);
        TST_CHECK(t, tp == NULL);
        TST_EQ(t, llmkv_threadpool_create(257, NULL, &tp), LLMKV_ERR_INVALID_ARGUMENT);
        TST_CHECK(t, tp == NULL);
        TST_EQ(t, llmkv_threadpool_create(2, NULL, NULL), LLMKV_ERR_INVALID_ARGUMENT);
        llmkv_threadpool_destroy(NULL);
    }

    /* n_q_heads not a multiple of n_kv_heads, or 0. */
    d = good; d.n_q_heads = 3; EXPECT(d, LLMKV_ERR_INVALID_ARGUMENT);
    d = good; d.n_q_heads = 5; EXPECT(d, LLMKV_ERR_INVALID_ARGUMENT);
    d = good; d.n_q_heads = 0; EXPECT(d, LLMKV_ERR_INVALID_ARGUMENT);
    /* NULL q, out, desc, batch, cache. */
    d = good; d.q = NULL; EXPECT(d, LLMKV_ERR_INVALID_ARGUMENT);
    d = good; d.out = NULL; EXPECT(d, LLMKV_ERR_INVALID_ARGUMENT);
    expect_code(t, &e, e.kv, e.b, NULL, pool, LLMKV_ERR_INVALID_ARGUMENT, __LINE__);
    expect_code(t, &e, e.kv, NULL, &good, pool, LLMKV_ERR_INVALID_ARGUMENT, __LINE__);
    expect_code(t, &e, NULL, e.b, &good, pool, LLMKV_ERR_INVALID_ARGUMENT, __LINE__);
    /* Layer out of range. */
    d = good; d.layer = 2; EXPECT(d, LLMKV_ERR_OUT_OF_RANGE);
    d = good; d.layer = 0xFFFFFFFFu; EXPECT(d, LLMKV_ERR_OUT_OF_RANGE);
    /* Misaligned pointers and strides. */
    d = good; d.q = (const float*)(const void*)((const char*)e.q + 1); EXPECT(d, LLMKV_ERR_MISALIGNED);
    d = good; d.out = (float*)(void*)((char*)e.out + 1); EXPECT(d, LLMKV_ERR_MISALIGNED);
    d = good; d.out = (float*)(void*)((char*)e.out + 2); EXPECT(d, LLMKV_ERR_MISALIGNED);
    d = good; d.lse = (float*)(void*)((char*)e.lse + 1); EXPECT(d, LLMKV_ERR_MISALIGNED);
    d = good; d.q_stride = row_bytes + 1; EXPECT(d, LLMKV_ERR_MISALIGNED);
    d = good; d.out_stride = row_bytes + 2; EXPECT(d, LLMKV_ERR_MISALIGNED);
    /* Strides shorter than a row. */
    d = good; d.q_stride = row_bytes - 4; EXPECT(d, LLMKV_ERR_BUFFER_TOO_SMALL);
    d = good; d.q_stride = 4; EXPECT(d, LLMKV_ERR_BUFFER_TOO_SMALL);
    d = good; d.out_stride = row_bytes - 4; EXPECT(d, LLMKV_ERR_BUFFER_TOO_SMALL);
    /* A path this machine cannot run. */
    for (p = LLMKV_CPU_PATH_AVX2; p <= LLMKV_CPU_PATH_LAST; ++p)
        if (!llmkv_cpu_path_supported((llmkv_cpu_path)p)) {
            d = good;
            d.path = (llmkv_cpu_path)p;
            EXPECT(d, LLMKV_ERR_UNSUPPORTED);
            found_unsupported = 1;
            if (t->verbose) fprintf(stderr, "    unsupported path tested: %s\n", llmkv_cpu_path_name((llmkv_cpu_path)p));
        }
    if (!found_unsupported) fprintf(stderr, "  note: every CPU path is supported here; UNSUPPORTED not tested\n");

    /* A batch of another cache (same shape, same lengths). */
    {
        aenv other;
        tst_rng r2;
        r2.s = 99;
        if (env_setup(t, &other, &c, &r2)) {
            expect_code(t, &e, e.kv, other.b, &good, pool, LLMKV_ERR_INVALID_ARGUMENT, __LINE__);
            expect_code(t, &e, other.kv, e.b, &good, pool, LLMKV_ERR_INVALID_ARGUMENT, __LINE__);
        }
        env_free(&other);
    }

    /* A metadata-only cache. */
    {
        llmkv_desc md;
        llmkv_cache* mkv = NULL;
        llmkv_batch* mb = NULL;
        llmkv_seq s;
        uint32_t q = 2;
        memset(&md, 0, sizeof md);
        md.n_layers = 2;
        md.n_kv_heads = 2;
        md.head_dim = 8;
        md.page_size = 4;
        md.n_pages = 8;
        md.storage = LLMKV_STORAGE_METADATA_ONLY;
        TST_EQ(t, llmkv_cache_create(&md, &mkv), LLMKV_OK);
        if (mkv) {
            TST_EQ(t, llmkv_seq_create(mkv, &s), LLMKV_OK);
            TST_EQ(t, llmkv_reserve(mkv, s, 6), LLMKV_OK);
            TST_EQ(t, llmkv_batch_create(mkv, 1, 4, &mb), LLMKV_OK);
            TST_EQ(t, llmkv_batch_build(mb, &s, &q, 1), LLMKV_OK);
            d = good;
            expect_code(t, &e, mkv, mb, &d, pool, LLMKV_ERR_NO_PAGE_DATA, __LINE__);
            llmkv_batch_destroy(mb);
            llmkv_cache_destroy(mkv);
        }
    }

    /* A stale batch: a sequence of it grew after the build. Rebuilding
       makes it usable again. */
    TST_EQ(t, llmkv_reserve(e.kv, e.seqs[1], 1), LLMKV_OK);
    EXPECT(good, LLMKV_ERR_STALE_BATCH);
    {
        uint32_t q2[2] = {3, 0};
        TST_EQ(t, llmkv_batch_build(e.b, e.seqs, q2, 2), LLMKV_OK);
        fill_outputs_canary(&e);
        TST_EQ(t, llmkv_attend(e.kv, e.b, &good, NULL), LLMKV_OK);
    }

    /* External pool: ith >= nth, nth 0, NULL size, short workspace. */
    c = base_case(16, 16, 1, 1, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    c.n_seqs = 1;
    c.lens[0] = 3000;
    c.qlens[0] = 1;
    if (env_setup(t, &lng, &c, &r)) {
        llmkv_attn_desc ld = env_desc(&lng, LLMKV_CPU_PATH_AUTO);
        size_t ws = 0, k;
        unsigned char* wsb;
        uint32_t ith, bad_ws;
        TST_EQ(t, llmkv_attend_workspace_size(lng.kv, lng.b, &ld, 2, &ws), LLMKV_OK);
        TST_EQ(t, llmkv_attend_workspace_size(lng.kv, lng.b, &ld, 2, NULL), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_attend_workspace_size(lng.kv, lng.b, &ld, 0, &ws), LLMKV_ERR_INVALID_ARGUMENT);
        wsb = (unsigned char*)malloc(ws + 64);
        memset(wsb, 0x77, ws + 64);
        fill_outputs_canary(&lng);
        TST_EQ(t, llmkv_attend_part(lng.kv, lng.b, &ld, 2, 2, wsb, ws), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_attend_merge(lng.kv, lng.b, &ld, 2, 2, wsb, ws), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_attend_part(lng.kv, lng.b, &ld, 7, 5, wsb, ws), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_attend_part(lng.kv, lng.b, &ld, 0, 0, wsb, ws), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_attend_merge(lng.kv, lng.b, &ld, 0, 0, wsb, ws), LLMKV_ERR_INVALID_ARGUMENT);
        TST_CHECK(t, ws > 0); /* a 3000-token decode on 2 threads splits */
        if (ws > 0) {
            TST_EQ(t, llmkv_attend_part(lng.kv, lng.b, &ld, 0, 2, wsb, ws - 4), LLMKV_ERR_BUFFER_TOO_SMALL);
            TST_EQ(t, llmkv_attend_part(lng.kv, lng.b, &ld, 1, 2, wsb, ws - 4), LLMKV_ERR_BUFFER_TOO_SMALL);
            TST_EQ(t, llmkv_attend_merge(lng.kv, lng.b, &ld, 0, 2, wsb, ws - 4), LLMKV_ERR_BUFFER_TOO_SMALL);
            TST_EQ(t, llmkv_attend_part(lng.kv, lng.b, &ld, 0, 2, NULL, 0), LLMKV_ERR_BUFFER_TOO_SMALL);
            TST_EQ(t, llmkv_attend_merge(lng.kv, lng.b, &ld, 1, 2, NULL, 0), LLMKV_ERR_BUFFER_TOO_SMALL);
        }
        bad_ws = 0;
        for (k = 0; k < ws + 64; ++k) bad_ws |= wsb[k] != 0x77;
        TST_CHECK(t, !bad_ws); /* failing calls left the workspace alone */
        TST_CHECK(t, outputs_untouched(&lng));
        /* and the proper schedule with that workspace gives the reference */
        for (ith = 0; ith < 2; ++ith) TST_EQ(t, llmkv_attend_part(lng.kv, lng.b, &ld, ith, 2, wsb, ws), LLMKV_OK);
        for (ith = 0; ith < 2; ++ith) TST_EQ(t, llmkv_attend_merge(lng.kv, lng.b, &ld, ith, 2, wsb, ws), LLMKV_OK);
        check_result(t, &lng, llmkv_cpu_path_auto(), "control nth=2", NULL);
        /* the stale rule holds for the external entry points as well */
        TST_EQ(t, llmkv_reserve(lng.kv, lng.seqs[0], 1), LLMKV_OK);
        fill_outputs_canary(&lng);
        TST_EQ(t, llmkv_attend_workspace_size(lng.kv, lng.b, &ld, 2, &ws), LLMKV_ERR_STALE_BATCH);
        TST_EQ(t, llmkv_attend_part(lng.kv, lng.b, &ld, 0, 2, wsb, ws), LLMKV_ERR_STALE_BATCH);
        TST_EQ(t, llmkv_attend_merge(lng.kv, lng.b, &ld, 0, 2, wsb, ws), LLMKV_ERR_STALE_BATCH);
        TST_CHECK(t, outputs_untouched(&lng));
        free(wsb);
    }
    env_free(&lng);
    llmkv_threadpool_destroy(pool);
    env_free(&e);
}

/* ------------------------------------------------------------------------ */
/* Suite                                                                    */
/* ------------------------------------------------------------------------ */

static void print_worst(void) {
    int p, kt, vt;
    fprintf(stderr, "  worst errors (out: x max|V|; lse: relative to 1+|lse|), per path and K/V storage:\n");
    for (p = 0; p < N_PATHS; ++p)
        for (kt = 1; kt <= 6; ++kt)
            for (vt = 1; vt <= 6; ++vt)
                if (g_n_checked[p][kt][vt])
                    fprintf(stderr, "    %-7s K %-4s V %-4s  out %.3e  lse %.3e  (%ld results, bound %.0e)\n",
                            llmkv_cpu_path_name((llmkv_cpu_path)p), llmkv_dtype_name((llmkv_dtype)kt),
                            llmkv_dtype_name((llmkv_dtype)vt), g_worst_out[p][kt][vt], g_worst_lse[p][kt][vt],
                            g_n_checked[p][kt][vt],
                            type_tol((llmkv_dtype)kt) > type_tol((llmkv_dtype)vt) ? type_tol((llmkv_dtype)kt)
                                                                                   : type_tol((llmkv_dtype)vt));
    for (p = 0; p < N_PATHS; ++p)
        if (g_worst_ratio[p] > 0) {
            fprintf(stderr, "  %s: worst error at %.2f of its bound, in\n", llmkv_cpu_path_name((llmkv_cpu_path)p),
                    g_worst_ratio[p]);
            print_case(&g_worst_case[p]);
        }
}

void suite_attn(tst* t) {
    llmkv_cpu_path paths[N_PATHS];
    int n = supported_paths(paths), i;
    fprintf(stderr, "attn: CPU paths tested:");
    for (i = 0; i < n; ++i) fprintf(stderr, " %s", llmkv_cpu_path_name(paths[i]));
    fprintf(stderr, " (auto = %s)\n", llmkv_cpu_path_name(llmkv_cpu_path_auto()));
    TST_RUN(t, test_attn_bad_calls);
    TST_RUN(t, test_attn_masks);
    TST_RUN(t, test_attn_no_rows);
    TST_RUN(t, test_attn_shapes);
    TST_RUN(t, test_attn_tiles);
    TST_RUN(t, test_attn_window_skips_pages);
    TST_RUN(t, test_attn_threads);
    TST_RUN(t, test_attn_concurrent);
    TST_RUN(t, test_attn_pool_schedules);
    TST_RUN(t, test_attn_random);
    if (t->verbose) print_worst();
}
