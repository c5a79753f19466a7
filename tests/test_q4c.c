/* Per-channel keys (LLMKV_DTYPE_Q4C) against an independent model.

   Q4C quantizes the keys of a full page per (layer, KV head, channel) over
   the page's tokens, with the Q4 group algorithm, and keeps the partly
   filled last page of a sequence at F16. Everything here is checked
   against code written in this file from that specification, never
   against the library's own output:

   - a reference per-channel quantizer (ref_channel: the Q4 group algorithm
     of llmkv_quantize, the same float operations in the same order, over
     a page's tokens instead of 32 consecutive elements), so stored keys
     must match bit for bit;
   - a plain model of a cache (qm: per sequence the F16 value of every
     key, what gather must return, and per page whether it is quantized)
     that applies put / truncate / rewrite / fork itself, driven by random
     operations and compared with llmkv_gather after every step;
   - attention on every CPU path against a double-precision attention over
     the keys and values llmkv_gather returns (the exact stored values);
   - the accuracy Q4C buys over per-token Q4 on keys with outlier channels;
   - sizes, bad arguments, capacity failures and allocation failures.

   The only arithmetic trusted from the library is llmkv_f32_to_f16 /
   llmkv_f16_to_f32 / llmkv_f32_to_bf16 / llmkv_bf16_to_f32 (tested in
   test_cache.c).

   LLMKV_TEST_SCALE (default 1.0) scales the number of random operations,
   LLMKV_TEST_SEED changes the seeds, LLMKV_TEST_VERBOSE prints figures. */
#include "test_util.h"
#include "test_falloc.h"
#include "../llmkv.h"

#include <math.h>
#include <stdarg.h>
#include <stdint.h>


#define OK(t, call) TST_EQ(t, (call), LLMKV_OK)
#define N_PATHS (LLMKV_CPU_PATH_LAST + 1)


/* ------------------------------------------------------------------------ */
/* Environment, floats, random numbers                                      */
/* ------------------------------------------------------------------------ */

static double q4c_env_scale(void) {
    const char* s = getenv("LLMKV_TEST_SCALE");
    double v = s ? atof(s) : 1.0;
    return v > 0.0 ? v : 1.0;
}

/* base * LLMKV_TEST_SCALE, at least `least`. */
static uint32_t q4c_scaled(uint32_t base, uint32_t least) {
    double n = (double)base * q4c_env_scale() + 0.5;
    uint32_t k = n > 4e9 ? 4000000000u : (uint32_t)n;
    return k < least ? least : k;
}

static unsigned long long q4c_seed(unsigned long long dflt) {
    const char* s = getenv("LLMKV_TEST_SEED");
    return s ? strtoull(s, NULL, 0) ^ dflt : dflt;
}

static uint32_t fbits(float x) { uint32_t u; memcpy(&u, &x, 4); return u; }
static float bitsf(uint32_t u) { float x; memcpy(&x, &u, 4); return x; }
static int finite_f(float x) { return (fbits(x) & 0x7f800000u) != 0x7f800000u; }
static int nan_f(float x) { return (fbits(x) & 0x7fffffffu) > 0x7f800000u; }
static float f16r(float x) { return llmkv_f16_to_f32(llmkv_f32_to_f16(x)); }
static float bf16r(float x) { return llmkv_bf16_to_f32(llmkv_f32_to_bf16(x)); }
/* Bit-identical, or both NaN (NaN payloads are not specified). */
static int same_f(float a, float b) { return fbits(a) == fbits(b) || (nan_f(a) && nan_f(b)); }
static float clampf_(float y, float lo, float hi) { return y < lo ? lo : y > hi ? hi : y; }
static uint32_t umin(uint32_t a, uint32_t b) { return a < b ? a : b; }

/* Uniform in (0, 1). */
static double unit_open(tst_rng* r) { return ((double)(tst_next(r) >> 11) + 0.5) * (1.0 / 9007199254740992.0); }

/* Standard normal (Box-Muller). */
static double gauss(tst_rng* r) {
    double u1 = unit_open(r), u2 = unit_open(r);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

static float rsign(tst_rng* r) { return (tst_next(r) & 1u) ? -1.0f : 1.0f; }

/* A value of the kinds the specification singles out: zeros, infinities,
   NaNs (several encodings), values F16 turns into infinities (1e5, 65520)
   or keeps at its limit (65504, 65519), F16 subnormals and underflow. */
static float special_value(tst_rng* r) {
    static const uint32_t nans[3] = {0x7fc00000u, 0xffc00000u, 0x7fa5a5a5u};
    switch (tst_below(r, 12)) {
    case 0: return 0.0f;
    case 1: return -0.0f;
    case 2: return bitsf(0x7f800000u);
    case 3: return bitsf(0xff800000u);
    case 4: return bitsf(nans[tst_below(r, 3)]);
    case 5: return rsign(r) * 1e5f;
    case 6: return rsign(r) * 65504.0f;
    case 7: return rsign(r) * 65519.0f;
    case 8: return rsign(r) * 65520.0f;
    case 9: return rsign(r) * 1e-8f;
    case 10: return rsign(r) * 6e-8f;
    default: return rsign(r) * 3e-5f;
    }
}

/* ------------------------------------------------------------------------ */
/* Reference quantizer (rule 3)                                             */
/* ------------------------------------------------------------------------ */

/* One channel of one (page, layer, head): the n values x[j * xs] (already
   F16 values) quantized as Q4 quantizes a group: lo, hi the finite
   extremes (0, 0 if none), m = f16(clamp(lo, +-65504)),
   s = f16(clamp((hi - m) / 15, 0, 65504)), inv = 1/s (0 when s is 0),
   code = rint(clamp((x - m) * inv, 0, 15)) with a NaN x taken as 0 and a
   NaN product as 0; the value fmaf(s, code, m) goes to out[j * os]. */
static void ref_channel(const float* x, size_t xs, uint32_t n, float* out, size_t os) {
    float lo = 0.0f, hi = 0.0f, m, s, inv;
    int any = 0;
    uint32_t j;
    for (j = 0; j < n; ++j) {
        float v = x[j * xs];
        if (!finite_f(v)) continue;
        if (!any || v < lo) lo = v;
        if (!any || v > hi) hi = v;
        any = 1;
    }
    m = f16r(clampf_(lo, -65504.0f, 65504.0f));
    s = f16r(clampf_((hi - m) / 15.0f, 0.0f, 65504.0f));
    inv = s > 0.0f ? 1.0f / s : 0.0f;
    for (j = 0; j < n; ++j) {
        float v = x[j * xs], y;
        unsigned code;
        if (nan_f(v)) v = 0.0f;
        y = (v - m) * inv;
        if (nan_f(y)) y = 0.0f;
        code = (unsigned)rintf(clampf_(y, 0.0f, 15.0f));
        out[j * os] = fmaf(s, (float)code, m);
    }
}

/* Keys of one sequence in the normal flow (rules 3-5): x holds `len`
   tokens [len][H][D] as the library reads them (F32); out receives what
   gather must return: full pages quantized per channel from the F16
   values, the partial last page at F16. */
static void ref_keys(const float* x, uint32_t len, uint32_t H, uint32_t D, uint32_t ps, float* out) {
    size_t row = (size_t)H * D, i;
    uint32_t p, h, c;
    for (i = 0; i < (size_t)len * row; ++i) out[i] = f16r(x[i]);
    for (p = 0; p < len / ps; ++p)
        for (h = 0; h < H; ++h)
            for (c = 0; c < D; ++c) {
                float* base = out + (size_t)p * ps * row + (size_t)h * D + c;
                ref_channel(base, row, ps, base, row);
            }
}

/* V as a float storage type holds it. */
static float v_stored(llmkv_dtype vt, float x) {
    return vt == LLMKV_DTYPE_F16 ? f16r(x) : vt == LLMKV_DTYPE_BF16 ? bf16r(x) : x;
}

/* The caller buffer for n floats x in type src (F32, F16 or BF16) and what
   the library reads from it, as F32 (rule 2's input). buf: 4-aligned. */
static void src_encode(llmkv_dtype src, const float* x, size_t n, void* buf, float* dec) {
    size_t i;
    unsigned char* b = (unsigned char*)buf;
    for (i = 0; i < n; ++i) {
        if (src == LLMKV_DTYPE_F16) {
            uint16_t h = llmkv_f32_to_f16(x[i]);
            memcpy(b + 2 * i, &h, 2);
            dec[i] = llmkv_f16_to_f32(h);
        } else if (src == LLMKV_DTYPE_BF16) {
            uint16_t h = llmkv_f32_to_bf16(x[i]);
            memcpy(b + 2 * i, &h, 2);
            dec[i] = llmkv_bf16_to_f32(h);
        } else {
            memcpy(b + 4 * i, x + i, 4);
            dec[i] = x[i];
        }
    }
}

static llmkv_desc q4c_desc(uint32_t n_layers, uint32_t n_kv, uint32_t D, uint32_t ps, uint32_t n_pages,
                           llmkv_dtype vt) {
    return tst_desc(n_layers, n_kv, D, ps, n_pages, LLMKV_DTYPE_Q4C, vt);
}

static int cache_ok(llmkv_cache* kv) {
    char msg[256];
    llmkv_result r = llmkv_cache_check(kv, msg, sizeof msg);
    if (r != LLMKV_OK) fprintf(stderr, "  llmkv_cache_check: %s\n", msg);
    return r == LLMKV_OK;
}

/* ------------------------------------------------------------------------ */
/* The model (rules 3-8)                                                    */
/* ------------------------------------------------------------------------ */

#define QM_LAYERS 2u
#define QM_MAX_SEQS 8u

typedef struct qm_seq {
    int live;
    llmkv_seq id;
    uint32_t len;
    uint32_t valid[QM_LAYERS]; /* positions [0, valid) of a layer hold written keys */
    float* kh;            /* [layer][pos][head][D]: the F16 value a quantization reads */
    float* kg;            /* [layer][pos][head][D]: what gather must return */
    float* v;             /* [layer][pos][head][D]: V as stored */
    unsigned char* quant; /* [layer][page]: 1 while the page is quantized */
} qm_seq;

typedef struct qm {
    uint32_t H, D, ps, maxlen, max_pages;
    size_t row; /* H * D */
    llmkv_dtype vt;
    qm_seq s[QM_MAX_SEQS];
} qm;

static size_t qm_at(const qm* m, uint32_t layer, uint32_t pos) {
    return ((size_t)layer * m->maxlen + pos) * m->row;
}

static void qm_seq_release(qm_seq* s) {
    free(s->kh);
    free(s->kg);
    free(s->v);
    free(s->quant);
    memset(s, 0, sizeof *s);
}

static int qm_seq_alloc(const qm* m, qm_seq* s) {
    size_t n = (size_t)QM_LAYERS * m->maxlen * m->row;
    memset(s, 0, sizeof *s);
    s->kh = (float*)calloc(n, sizeof(float));
    s->kg = (float*)calloc(n, sizeof(float));
    s->v = (float*)calloc(n, sizeof(float));
    s->quant = (unsigned char*)calloc((size_t)QM_LAYERS * m->max_pages, 1);
    if (s->kh && s->kg && s->v && s->quant) return 1;
    qm_seq_release(s);
    return 0;
}

/* dst becomes a copy of src (fork: the child sees everything, rule 8). */
static int qm_seq_copy(const qm* m, qm_seq* dst, const qm_seq* src) {
    size_t n = (size_t)QM_LAYERS * m->maxlen * m->row;
    if (!qm_seq_alloc(m, dst)) return 0;
    memcpy(dst->kh, src->kh, n * sizeof(float));
    memcpy(dst->kg, src->kg, n * sizeof(float));
    memcpy(dst->v, src->v, n * sizeof(float));
    memcpy(dst->quant, src->quant, (size_t)QM_LAYERS * m->max_pages);
    dst->len = src->len;
    memcpy(dst->valid, src->valid, sizeof dst->valid);
    dst->live = 1;
    return 1;
}

/* A quantized page goes back to F16 copies of its dequantized values
   (rules 6 and 7), slots [0, n_slots). */
static void qm_unquantize(const qm* m, qm_seq* s, uint32_t layer, uint32_t page, uint32_t n_slots) {
    size_t a = qm_at(m, layer, page * m->ps), i;
    for (i = 0; i < (size_t)n_slots * m->row; ++i) s->kh[a + i] = s->kg[a + i] = f16r(s->kg[a + i]);
    s->quant[layer * m->max_pages + page] = 0;
}

static void qm_quantize(const qm* m, qm_seq* s, uint32_t layer, uint32_t page) {
    size_t a = qm_at(m, layer, page * m->ps);
    uint32_t h, c;
    for (h = 0; h < m->H; ++h)
        for (c = 0; c < m->D; ++c) {
            size_t o = a + (size_t)h * m->D + c;
            ref_channel(s->kh + o, m->row, m->ps, s->kg + o, m->row);
        }
    s->quant[layer * m->max_pages + page] = 1;
}

/* llmkv_put of n tokens at [len - n, len): kin / vin are what the library
   reads (F32), [n][H][D]. */
static void qm_put(const qm* m, qm_seq* s, uint32_t layer, uint32_t n, const float* kin, const float* vin) {
    uint32_t first, p0, p1, p;
    size_t a, i;
    if (n == 0) return;
    first = s->len - n;
    p0 = first / m->ps;
    p1 = (s->len - 1) / m->ps;
    for (p = p0; p <= p1; ++p) /* rule 7: a rewritten full page first returns to F16 */
        if (s->quant[layer * m->max_pages + p]) qm_unquantize(m, s, layer, p, m->ps);
    a = qm_at(m, layer, first);
    for (i = 0; i < (size_t)n * m->row; ++i) {
        s->kh[a + i] = s->kg[a + i] = f16r(kin[i]);
        s->v[a + i] = v_stored(m->vt, vin[i]);
    }
    for (p = p0; p <= p1; ++p) /* rule 5: every page this put completed */
        if ((p + 1) * m->ps <= s->len) qm_quantize(m, s, layer, p);
    if (s->valid[layer] < s->len) s->valid[layer] = s->len;
}

static void qm_truncate(const qm* m, qm_seq* s, uint32_t n) {
    uint32_t layer, p;
    if (n >= s->len) return;
    for (layer = 0; layer < QM_LAYERS; ++layer) {
        if (n % m->ps && s->quant[layer * m->max_pages + n / m->ps]) /* rule 6 */
            qm_unquantize(m, s, layer, n / m->ps, n % m->ps);
        for (p = (n + m->ps - 1) / m->ps; p < m->max_pages; ++p) s->quant[layer * m->max_pages + p] = 0;
        if (s->valid[layer] > n) s->valid[layer] = n;
    }
    s->len = n;
}

/* Gathers every written position of every layer as F32 and compares it
   with the model, bit for bit (NaN-aware). kb, vb: maxlen * row floats. */
static int qm_check(tst* t, qlog* lg, const llmkv_cache* kv, const qm* m, uint32_t idx, float* kb, float* vb) {
    const qm_seq* s = &m->s[idx];
    uint32_t layer, len;
    int good = 1;
    OK(t, llmkv_seq_length(kv, s->id, &len));
    if (len != s->len) {
        QFAIL(t, lg, "seq %u: length %u, model %u", idx, len, s->len);
        return 0;
    }
    for (layer = 0; layer < QM_LAYERS; ++layer) {
        uint32_t n = s->valid[layer];
        size_t a = qm_at(m, layer, 0), i;
        if (n == 0) continue;
        if (llmkv_gather(kv, s->id, layer, 0, n, kb, 0, vb, 0, LLMKV_DTYPE_F32) != LLMKV_OK) {
            QFAIL(t, lg, "seq %u layer %u: gather of %u positions failed", idx, layer, n);
            return 0;
        }
        for (i = 0; i < (size_t)n * m->row; ++i) {
            if (!same_f(kb[i], s->kg[a + i])) {
                uint32_t pos = (uint32_t)(i / m->row), h = (uint32_t)(i % m->row) / m->D, c = (uint32_t)(i % m->D);
                QFAIL(t, lg, "seq %u layer %u pos %u head %u channel %u (page %u, %s): K %.9g (0x%08x), model %.9g "
                      "(0x%08x)", idx, layer, pos, h, c, pos / m->ps,
                      s->quant[layer * m->max_pages + pos / m->ps] ? "quantized" : "F16",
                      (double)kb[i], fbits(kb[i]), (double)s->kg[a + i], fbits(s->kg[a + i]));
                good = 0;
                break;
            }
        }
        for (i = 0; i < (size_t)n * m->row; ++i) {
            if (!same_f(vb[i], s->v[a + i])) {
                QFAIL(t, lg, "seq %u layer %u pos %u: V %.9g, model %.9g", idx, layer, (uint32_t)(i / m->row),
                      (double)vb[i], (double)s->v[a + i]);
                good = 0;
                break;
            }
        }
    }
    return good;
}

/* Element i of a gathered buffer of type `out` (F32, F16 or BF16). */
static float gathered(const void* buf, llmkv_dtype out, size_t i) {
    float f;
    uint16_t h;
    if (out == LLMKV_DTYPE_F32) {
        memcpy(&f, (const unsigned char*)buf + 4 * i, 4);
        return f;
    }
    memcpy(&h, (const unsigned char*)buf + 2 * i, 2);
    return out == LLMKV_DTYPE_F16 ? llmkv_f16_to_f32(h) : llmkv_bf16_to_f32(h);
}

/* The model's value `want` as gather to type `out` gives it. */
static float as_gathered(float want, llmkv_dtype out) {
    return out == LLMKV_DTYPE_F16 ? f16r(want) : out == LLMKV_DTYPE_BF16 ? bf16r(want) : want;
}

/* Rule 9: gather to F16, BF16 and DEFAULT converts from the same values
   (DEFAULT: K as F32, V in its storage type). */
static int qm_check_types(tst* t, qlog* lg, const llmkv_cache* kv, const qm* m, uint32_t idx, uint32_t layer,
                          float* kb, float* vb) {
    const qm_seq* s = &m->s[idx];
    uint32_t n = s->valid[layer], ti, part;
    size_t a = qm_at(m, layer, 0), i, cnt = (size_t)n * m->row;
    static const llmkv_dtype types[3] = {LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_DEFAULT};
    int good = 1;
    if (n == 0) return 1;
    for (ti = 0; ti < 3; ++ti) {
        llmkv_dtype dt = types[ti];
        if (llmkv_gather(kv, s->id, layer, 0, n, kb, 0, vb, 0, dt) != LLMKV_OK) {
            QFAIL(t, lg, "seq %u: gather to %s failed", idx, dt == LLMKV_DTYPE_DEFAULT ? "DEFAULT" : llmkv_dtype_name(dt));
            return 0;
        }
        for (part = 0; part < 2; ++part) { /* K (DEFAULT: F32), then V (DEFAULT: its storage type) */
            llmkv_dtype out = dt != LLMKV_DTYPE_DEFAULT ? dt : part ? m->vt : LLMKV_DTYPE_F32;
            for (i = 0; i < cnt && good; ++i) {
                float got = gathered(part ? (const void*)vb : (const void*)kb, out, i);
                float want = as_gathered(part ? s->v[a + i] : s->kg[a + i], out);
                if (!same_f(got, want)) {
                    QFAIL(t, lg, "seq %u layer %u element %u: %s gathered as %s is %.9g, want %.9g", idx, layer,
                          (uint32_t)i, part ? "V" : "K", dt == LLMKV_DTYPE_DEFAULT ? "DEFAULT" : llmkv_dtype_name(dt),
                          (double)got, (double)want);
                    good = 0;
                }
            }
        }
    }
    return good;
}

/* Keys for n tokens: per head a magnitude from 1e-5 to 3000, Gaussian,
   some channels offset by +-10 magnitudes (an outlier channel), and, when
   `specials`, about one element in 200 a special value. */
static void gen_keys(tst_rng* r, float* x, uint32_t n, uint32_t H, uint32_t D, int specials) {
    static const float mags[6] = {1e-5f, 1e-2f, 1.0f, 1.0f, 40.0f, 3000.0f};
    uint32_t h, c, j;
    for (h = 0; h < H; ++h) {
        float mag = mags[tst_below(r, 6)];
        for (c = 0; c < D; ++c) {
            float off = tst_below(r, 8) == 0 ? rsign(r) * 10.0f * mag : 0.0f;
            for (j = 0; j < n; ++j) {
                float v = off + (float)gauss(r) * mag;
                if (specials && tst_below(r, 200) == 0) v = special_value(r);
                x[((size_t)j * H + h) * D + c] = v;
            }
        }
    }
}

static void gen_values(tst_rng* r, float* x, size_t n) {
    size_t i;
    for (i = 0; i < n; ++i) x[i] = (float)gauss(r) * 3.0f;
}

/* The last operations, printed with the first mismatch. */
typedef struct qtrace {
    char line[12][128];
    unsigned n;
} qtrace;

static void tr_add(qtrace* tr, const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tr->line[tr->n % 12], sizeof tr->line[0], fmt, ap);
    va_end(ap);
    tr->n++;
}

static void tr_dump(const qtrace* tr) {
    unsigned i = tr->n > 12 ? tr->n - 12 : 0;
    fprintf(stderr, "  last operations:\n");
    for (; i < tr->n; ++i) fprintf(stderr, "    %u: %s\n", i, tr->line[i % 12]);
}

/* ------------------------------------------------------------------------ */
/* a. Random operations against the model                                    */
/* ------------------------------------------------------------------------ */

typedef struct qm_run {
    tst* t;
    qlog lg;
    qtrace tr;
    qm m;
    llmkv_cache* kv;
    tst_rng r;
    int specials;
    float *kx, *vx, *kdec, *vdec, *kb, *vb; /* scratch: maxlen * row floats each */
    long n_puts, n_rewrites, n_forks, n_truncs, n_trunc_inside, n_oop;
} qm_run;

/* Puts n tokens into every layer of model sequence idx (already reserved
   for `fresh` of them); each layer may rewrite up to 2 pages more.
   Returns 0 after a failed check. */
static int run_puts(qm_run* R, uint32_t idx, uint32_t fresh, int allow_rewrite) {
    qm* m = &R->m;
    qm_seq* s = &m->s[idx];
    uint32_t layer;
    for (layer = 0; layer < QM_LAYERS; ++layer) {
        static const llmkv_dtype srcs[3] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16};
        llmkv_dtype src = srcs[tst_below(&R->r, 3)];
        uint32_t n = fresh, old = s->len - fresh;
        llmkv_result res;
        if (allow_rewrite && old > 0 && (fresh == 0 || tst_below(&R->r, 4) == 0))
            n += 1 + tst_below(&R->r, umin(old, 2 * m->ps + 1));
        if (n == 0) continue;
        gen_keys(&R->r, R->kdec, n, m->H, m->D, R->specials);
        gen_values(&R->r, R->vdec, (size_t)n * m->row);
        src_encode(src, R->kdec, (size_t)n * m->row, R->kx, R->kdec);
        src_encode(src, R->vdec, (size_t)n * m->row, R->vx, R->vdec);
        tr_add(&R->tr, "put seq %u layer %u n %u (len %u, %s%s)", idx, layer, n, s->len, llmkv_dtype_name(src),
               n > fresh ? ", rewrite" : "");
        res = llmkv_put(R->kv, s->id, layer, n, R->kx, 0, R->vx, 0, src);
        if (res == LLMKV_ERR_OUT_OF_PAGES && n > fresh) {
            /* a rewrite that needs a copy of a shared page: nothing changed */
            R->n_oop++;
            if (!qm_check(R->t, &R->lg, R->kv, m, idx, R->kb, R->vb)) return 0;
            if (fresh == 0) continue;
            n = fresh;
            gen_keys(&R->r, R->kdec, n, m->H, m->D, R->specials);
            src_encode(src, R->kdec, (size_t)n * m->row, R->kx, R->kdec);
            tr_add(&R->tr, "  (out of pages) put seq %u layer %u n %u", idx, layer, n);
            res = llmkv_put(R->kv, s->id, layer, n, R->kx, 0, R->vx, 0, src);
        }
        TST_EQ(R->t, res, LLMKV_OK);
        if (res != LLMKV_OK) return 0;
        qm_put(m, s, layer, n, R->kdec, R->vdec);
        R->n_puts++;
        if (n > fresh) R->n_rewrites++;
    }
    return 1;
}

static int live_count(const qm* m) {
    uint32_t i;
    int n = 0;
    for (i = 0; i < QM_MAX_SEQS; ++i) n += m->s[i].live;
    return n;
}

static uint32_t pick_live(qm_run* R) {
    uint32_t i, k = tst_below(&R->r, (unsigned)live_count(&R->m)), seen = 0;
    for (i = 0; i < QM_MAX_SEQS; ++i)
        if (R->m.s[i].live && seen++ == k) return i;
    return 0;
}

static uint32_t free_slot(const qm* m) {
    uint32_t i;
    for (i = 0; i < QM_MAX_SEQS; ++i)
        if (!m->s[i].live) return i;
    return QM_MAX_SEQS;
}

/* One random operation, then every check. Returns 0 to stop the run. */
static int run_step(qm_run* R) {
    qm* m = &R->m;
    unsigned op = tst_below(&R->r, 100);
    uint32_t i, idx;
    int n_live = live_count(m);
    if (n_live == 0 || (op < 8 && n_live < (int)QM_MAX_SEQS)) { /* create */
        idx = free_slot(m);
        if (!qm_seq_alloc(m, &m->s[idx])) return 0;
        TST_EQ(R->t, llmkv_seq_create(R->kv, &m->s[idx].id), LLMKV_OK);
        m->s[idx].live = 1;
        tr_add(&R->tr, "create seq %u", idx);
    } else if (op < 55) { /* reserve + put every layer */
        qm_seq* s;
        uint32_t room, want;
        llmkv_result res;
        idx = pick_live(R);
        s = &m->s[idx];
        room = m->maxlen - s->len;
        switch (tst_below(&R->r, 3)) {
        case 0: want = 1; break;
        case 1: want = 1 + tst_below(&R->r, m->ps); break;
        default: want = 1 + tst_below(&R->r, 3 * m->ps); break;
        }
        want = umin(want, room);
        if (want == 0) { /* full: drop a page or two instead */
            uint32_t n = s->len > 2 * m->ps ? s->len - 2 * m->ps : 0;
            tr_add(&R->tr, "truncate seq %u to %u (full)", idx, n);
            OK(R->t, llmkv_truncate(R->kv, s->id, n));
            qm_truncate(m, s, n);
        } else {
            tr_add(&R->tr, "reserve seq %u %u (len %u)", idx, want, s->len);
            res = llmkv_reserve(R->kv, s->id, want);
            if (res == LLMKV_ERR_OUT_OF_PAGES) {
                R->n_oop++;
            } else {
                TST_EQ(R->t, res, LLMKV_OK);
                if (res != LLMKV_OK) return 0;
                s->len += want;
                if (!run_puts(R, idx, want, 1)) return 0;
            }
        }
    } else if (op < 62) { /* rewrite the last tokens without reserving */
        idx = pick_live(R);
        if (m->s[idx].len && !run_puts(R, idx, 0, 1)) return 0;
    } else if (op < 72) { /* fork */
        uint32_t dst = free_slot(m);
        idx = pick_live(R);
        if (dst < QM_MAX_SEQS) {
            llmkv_seq h;
            TST_EQ(R->t, llmkv_fork(R->kv, m->s[idx].id, &h), LLMKV_OK);
            if (!qm_seq_copy(m, &m->s[dst], &m->s[idx])) return 0;
            m->s[dst].id = h;
            tr_add(&R->tr, "fork seq %u -> %u (len %u)", idx, dst, m->s[idx].len);
            R->n_forks++;
        }
    } else if (op < 92) { /* truncate */
        qm_seq* s;
        uint32_t L, ps = m->ps, n;
        const char* kind;
        idx = pick_live(R);
        s = &m->s[idx];
        L = s->len;
        switch (tst_below(&R->r, 5)) {
        case 0: /* inside the partial tail page */
            kind = "inside the tail";
            n = L % ps > 1 ? L - L % ps + 1 + tst_below(&R->r, L % ps - 1) : L - L % ps;
            break;
        case 1: /* a page boundary */
            kind = "page boundary";
            n = ps * tst_below(&R->r, L / ps + 1);
            break;
        case 2:
        case 3: /* inside a full page */
            kind = "inside a full page";
            n = L / ps && ps > 1 ? ps * tst_below(&R->r, L / ps) + 1 + tst_below(&R->r, ps - 1) : L;
            if (n < L && n % ps) R->n_trunc_inside++;
            break;
        default:
            kind = "one position";
            n = L ? L - 1 : 0;
            break;
        }
        tr_add(&R->tr, "truncate seq %u from %u to %u (%s)", idx, L, n, kind);
        OK(R->t, llmkv_truncate(R->kv, s->id, n));
        qm_truncate(m, s, n);
        R->n_truncs++;
    } else if (op < 97) { /* free */
        idx = pick_live(R);
        tr_add(&R->tr, "free seq %u", idx);
        OK(R->t, llmkv_seq_free(R->kv, m->s[idx].id));
        qm_seq_release(&m->s[idx]);
    } else { /* gather to the other types */
        idx = pick_live(R);
        if (!qm_check_types(R->t, &R->lg, R->kv, m, idx, tst_below(&R->r, QM_LAYERS), R->kb, R->vb)) return 0;
    }

    if (!cache_ok(R->kv)) {
        TST_CHECK(R->t, 0);
        return 0;
    }
    for (i = 0; i < QM_MAX_SEQS; ++i)
        if (m->s[i].live && !qm_check(R->t, &R->lg, R->kv, m, i, R->kb, R->vb)) return 0;
    return 1;
}

static void model_run(tst* t, uint32_t H, uint32_t D, uint32_t ps, llmkv_dtype vt, int specials, uint32_t steps,
                      unsigned long long seed) {
    qm_run* R = (qm_run*)calloc(1, sizeof(qm_run));
    llmkv_desc d;
    size_t n;
    uint32_t step, i;
    TST_REQUIRE(t, R != NULL);
    R->t = t;
    R->r.s = q4c_seed(seed);
    R->specials = specials;
    R->m.H = H;
    R->m.D = D;
    R->m.ps = ps;
    R->m.vt = vt;
    R->m.row = (size_t)H * D;
    R->m.max_pages = 160 / ps > 6 ? 160 / ps : 6;
    R->m.maxlen = R->m.max_pages * ps;
    /* a pool that runs out now and then (forks share pages): failed
       reserves and rewriting puts must change nothing */
    d = q4c_desc(QM_LAYERS, H, D, ps, QM_MAX_SEQS * R->m.max_pages * 3 / 8, vt);
    d.max_seqs = QM_MAX_SEQS;
    d.max_seq_len = R->m.maxlen;
    n = (size_t)R->m.maxlen * R->m.row;
    R->kx = (float*)malloc(n * sizeof(float));
    R->vx = (float*)malloc(n * sizeof(float));
    R->kdec = (float*)malloc(n * sizeof(float));
    R->vdec = (float*)malloc(n * sizeof(float));
    R->kb = (float*)malloc(n * sizeof(float));
    R->vb = (float*)malloc(n * sizeof(float));
    if (R->kx && R->vx && R->kdec && R->vdec && R->kb && R->vb && llmkv_cache_create(&d, &R->kv) == LLMKV_OK) {
        for (step = 0; step < steps; ++step)
            if (!run_step(R)) {
                fprintf(stderr, "  model run H=%u D=%u page=%u v=%s: stopped at step %u\n", H, D, ps,
                        llmkv_dtype_name(vt), step);
                tr_dump(&R->tr);
                TST_CHECK(t, 0);
                break;
            }
        /* The run must reach what it is meant to test: short runs (a small
           LLMKV_TEST_SCALE) go on until it has, within a bound. */
        while (step < steps * 20 && step >= steps &&
               !(R->n_rewrites > 0 && R->n_forks > 0 && (ps == 1 || R->n_trunc_inside > 0))) {
            if (!run_step(R)) {
                TST_CHECK(t, 0);
                break;
            }
            ++step;
        }
        if (step >= steps) {
            TST_CHECK(t, R->n_rewrites > 0);
            TST_CHECK(t, R->n_forks > 0);
            TST_CHECK(t, ps == 1 || R->n_trunc_inside > 0);
        }
        if (t->verbose)
            fprintf(stderr, "  q4c model H=%u D=%u page=%u v=%s%s: %u steps, %ld puts (%ld rewriting), %ld forks, "
                    "%ld truncates (%ld inside a full page), %ld out of pages\n", H, D, ps, llmkv_dtype_name(vt),
                    specials ? " specials" : "", step, R->n_puts, R->n_rewrites, R->n_forks, R->n_truncs,
                    R->n_trunc_inside, R->n_oop);
    } else {
        TST_CHECK(t, 0);
    }
    for (i = 0; i < QM_MAX_SEQS; ++i) qm_seq_release(&R->m.s[i]);
    llmkv_cache_destroy(R->kv);
    free(R->kx);
    free(R->vx);
    free(R->kdec);
    free(R->vdec);
    free(R->kb);
    free(R->vb);
    free(R);
}

static void test_q4c_model_random(tst* t) {
    uint32_t steps = q4c_scaled(400, 40);
    model_run(t, 2, 33, 5, LLMKV_DTYPE_F32, 1, steps, 0x4c01ull);
    model_run(t, 2, 64, 16, LLMKV_DTYPE_F16, 0, steps, 0x4c02ull);
    model_run(t, 3, 7, 1, LLMKV_DTYPE_BF16, 1, steps / 2, 0x4c03ull);
    model_run(t, 1, 33, 32, LLMKV_DTYPE_F32, 1, steps / 2, 0x4c04ull);
}

/* ------------------------------------------------------------------------ */
/* Deterministic cases of rules 3-7 (small reproducers)                     */
/* ------------------------------------------------------------------------ */

/* One layer, one head, D 3, pages of 4. Tokens t0..t5 are put one at a
   time; after t3 page 0 is quantized, t4 t5 are F16. Then: truncate to 2
   (page 0's slots 0, 1 become F16 of their dequantized values), put 2
   (page 0 quantized again from those and the new F16 inputs), rewrite the
   last 3 positions without reserving (page 0 again: slot 0 F16 of its
   dequantized value, slots 1..3 new), and gather after each step. */
static void test_q4c_rules_small(tst* t) {
    enum { D = 3, PS = 4 };
    static const float in[10][D] = {
        {0.1f, -3.0f, 1000.0f}, {0.7f, 2.0f, 1001.0f}, {1.3f, 0.333f, 999.5f}, {2.9f, 0.0f, 1000.25f},
        {0.123456f, 7.77777f, -1.0f}, {5.5f, -0.001f, 2.0f},
        {0.4f, 1.1f, 998.0f}, {2.0f, -2.9f, 1003.0f},
        {9.0f, 9.0f, 9.0f}, {-1.0f, 0.5f, 1000.5f}};
    float want[8][D], got[8][D], f[PS][D], deq[PS][D];
    llmkv_desc d = q4c_desc(1, 1, D, PS, 8, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq s;
    uint32_t i, c, j;
    int differs = 0;
    memset(want, 0, sizeof want);
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    OK(t, llmkv_seq_create(kv, &s));
    for (i = 0; i < 6; ++i) {
        OK(t, llmkv_reserve(kv, s, 1));
        OK(t, llmkv_put(kv, s, 0, 1, in[i], 0, in[i], 0, LLMKV_DTYPE_F32));
        /* F16 until page 0 is full (rule 4), then page 0 per channel (rule 3) */
        for (j = 0; j <= i; ++j)
            for (c = 0; c < D; ++c) want[j][c] = f16r(in[j][c]);
        if (i >= PS - 1)
            for (c = 0; c < D; ++c) {
                for (j = 0; j < PS; ++j) f[j][c] = f16r(in[j][c]);
                ref_channel(&f[0][c], D, PS, &want[0][c], D);
            }
        OK(t, llmkv_gather(kv, s, 0, 0, i + 1, got, 0, NULL, 0, LLMKV_DTYPE_F32));
        for (j = 0; j <= i; ++j)
            for (c = 0; c < D; ++c)
                if (!same_f(got[j][c], want[j][c]))
                    fprintf(stderr, "  FAIL after %u puts of one token: pos %u ch %u: %.9g, want %.9g\n", i + 1, j, c,
                            (double)got[j][c], (double)want[j][c]);
        TST_CHECK(t, memcmp(got, want, (i + 1) * sizeof got[0]) == 0);
    }
    /* page 0 quantized per channel from the F16 inputs (rule 3) */
    for (c = 0; c < D; ++c) {
        for (j = 0; j < PS; ++j) f[j][c] = f16r(in[j][c]);
        ref_channel(&f[0][c], D, PS, &want[0][c], D);
        for (j = PS; j < 6; ++j) want[j][c] = f16r(in[j][c]);
    }
    OK(t, llmkv_gather(kv, s, 0, 0, 6, got, 0, NULL, 0, LLMKV_DTYPE_F32));
    TST_CHECK(t, memcmp(got, want, 6 * sizeof got[0]) == 0);
    memcpy(deq, want, sizeof deq);

    /* truncate to 2: slots 0, 1 become F16(dequantized) (rule 6) */
    OK(t, llmkv_truncate(kv, s, 2));
    TST_CHECK(t, cache_ok(kv));
    for (j = 0; j < 2; ++j)
        for (c = 0; c < D; ++c) {
            want[j][c] = f16r(deq[j][c]);
            differs |= fbits(want[j][c]) != fbits(deq[j][c]);
        }
    TST_CHECK(t, differs); /* the data must tell F16(dequantized) from dequantized */
    OK(t, llmkv_gather(kv, s, 0, 0, 2, got, 0, NULL, 0, LLMKV_DTYPE_F32));
    for (j = 0; j < 2; ++j)
        for (c = 0; c < D; ++c)
            if (!same_f(got[j][c], want[j][c]))
                fprintf(stderr, "  FAIL after truncate to 2: pos %u ch %u: %.9g, want F16(%.9g) = %.9g\n", j, c,
                        (double)got[j][c], (double)deq[j][c], (double)want[j][c]);
    TST_CHECK(t, memcmp(got, want, 2 * sizeof got[0]) == 0);

    /* put 2 more: page 0 full again, quantized from F16(deq) + new inputs */
    OK(t, llmkv_reserve(kv, s, 2));
    OK(t, llmkv_put(kv, s, 0, 2, in[6], 0, in[6], 0, LLMKV_DTYPE_F32));
    for (c = 0; c < D; ++c) {
        f[0][c] = want[0][c];
        f[1][c] = want[1][c];
        f[2][c] = f16r(in[6][c]);
        f[3][c] = f16r(in[7][c]);
        ref_channel(&f[0][c], D, PS, &want[0][c], D);
    }
    OK(t, llmkv_gather(kv, s, 0, 0, 4, got, 0, NULL, 0, LLMKV_DTYPE_F32));
    for (j = 0; j < 4; ++j)
        for (c = 0; c < D; ++c)
            if (!same_f(got[j][c], want[j][c]))
                fprintf(stderr, "  FAIL after re-filling page 0: pos %u ch %u: %.9g, want %.9g\n", j, c,
                        (double)got[j][c], (double)want[j][c]);
    TST_CHECK(t, memcmp(got, want, 4 * sizeof got[0]) == 0);

    /* one more token (page 1 starts, F16), then rewrite the last 3
       positions [2, 5) without reserving (rule 7) */
    OK(t, llmkv_reserve(kv, s, 1));
    OK(t, llmkv_put(kv, s, 0, 1, in[8], 0, in[8], 0, LLMKV_DTYPE_F32));
    for (c = 0; c < D; ++c) want[4][c] = f16r(in[8][c]);
    memcpy(deq, want, sizeof deq);
    {
        float rw[3][D];
        for (c = 0; c < D; ++c) {
            rw[0][c] = in[9][c];
            rw[1][c] = in[2][c] * 3.0f;
            rw[2][c] = in[4][c];
        }
        OK(t, llmkv_put(kv, s, 0, 3, rw, 0, rw, 0, LLMKV_DTYPE_F32));
        for (c = 0; c < D; ++c) {
            f[0][c] = f16r(deq[0][c]);
            f[1][c] = f16r(deq[1][c]);
            f[2][c] = f16r(rw[0][c]);
            f[3][c] = f16r(rw[1][c]);
            ref_channel(&f[0][c], D, PS, &want[0][c], D);
            want[4][c] = f16r(rw[2][c]);
        }
    }
    OK(t, llmkv_gather(kv, s, 0, 0, 5, got, 0, NULL, 0, LLMKV_DTYPE_F32));
    for (j = 0; j < 5; ++j)
        for (c = 0; c < D; ++c)
            if (!same_f(got[j][c], want[j][c]))
                fprintf(stderr, "  FAIL after the rewriting put: pos %u ch %u: %.9g, want %.9g\n", j, c,
                        (double)got[j][c], (double)want[j][c]);
    TST_CHECK(t, memcmp(got, want, 5 * sizeof got[0]) == 0);
    TST_CHECK(t, cache_ok(kv));
    llmkv_cache_destroy(kv);
}

/* Rule 5: a page's codes do not depend on how its tokens arrived. For each
   head_dim and page size, the same keys go into one sequence in a single
   put, into another one token at a time, into a third in random chunks
   (F16 and BF16 callers too); every gather equals the reference. */
static void test_q4c_put_gather(tst* t) {
    static const uint32_t dims[] = {1, 7, 33, 64, 80, 128, 256};
    static const uint32_t pss[] = {1, 5, 16, 32, 64};
    qlog lg = {0};
    tst_rng r;
    uint32_t di, pi;
    r.s = q4c_seed(0x9a70ull);
    for (di = 0; di < sizeof dims / sizeof dims[0]; ++di)
        for (pi = 0; pi < sizeof pss / sizeof pss[0]; ++pi) {
            const uint32_t D = dims[di], ps = pss[pi], H = 2, T = 2 * ps + ps / 2 + 1;
            const llmkv_dtype src = di % 3 == 0 ? LLMKV_DTYPE_F32 : di % 3 == 1 ? LLMKV_DTYPE_F16 : LLMKV_DTYPE_BF16;
            size_t row = (size_t)H * D, n = (size_t)T * row, i;
            llmkv_desc d = q4c_desc(1, H, D, ps, 3 * 3 + 2, pi % 2 ? LLMKV_DTYPE_Q8 : LLMKV_DTYPE_F16);
            llmkv_cache* kv = NULL;
            llmkv_seq s[3];
            float* x = (float*)malloc(n * sizeof(float));
            float* buf = (float*)malloc(n * sizeof(float));
            float* dec = (float*)malloc(n * sizeof(float));
            float* want = (float*)malloc(n * sizeof(float));
            float* got = (float*)malloc(n * sizeof(float));
            unsigned way;
            if (!x || !buf || !dec || !want || !got || llmkv_cache_create(&d, &kv) != LLMKV_OK) {
                TST_CHECK(t, 0);
            } else {
                gen_keys(&r, x, T, H, D, 0);
                src_encode(src, x, n, buf, dec);
                ref_keys(dec, T, H, D, ps, want);
                for (way = 0; way < 3; ++way) {
                    uint32_t done = 0;
                    OK(t, llmkv_seq_create(kv, &s[way]));
                    while (done < T) {
                        uint32_t cnt = way == 0 ? T : way == 1 ? 1 : 1 + tst_below(&r, umin(T - done, 2 * ps + 1));
                        size_t off = (size_t)done * row * (src == LLMKV_DTYPE_F32 ? 4 : 2);
                        cnt = umin(cnt, T - done);
                        OK(t, llmkv_reserve(kv, s[way], cnt));
                        OK(t, llmkv_put(kv, s[way], 0, cnt, (unsigned char*)buf + off, 0, (unsigned char*)buf + off,
                                        0, src));
                        done += cnt;
                        /* the prefix written so far is already final, except the open page */
                        OK(t, llmkv_gather(kv, s[way], 0, 0, done, got, 0, NULL, 0, LLMKV_DTYPE_F32));
                        for (i = 0; i < (size_t)(done / ps) * ps * row; ++i)
                            if (!same_f(got[i], want[i])) {
                                QFAIL(t, &lg, "D=%u page=%u %s, %s: after %u tokens, element %u (pos %u) %.9g, want "
                                      "%.9g", D, ps, llmkv_dtype_name(src),
                                      way == 0 ? "one put" : way == 1 ? "one token per put" : "random chunks", done,
                                      (uint32_t)i, (uint32_t)(i / row), (double)got[i], (double)want[i]);
                                break;
                            }
                        for (; i < (size_t)done * row; ++i)
                            if (!same_f(got[i], f16r(dec[i]))) {
                                QFAIL(t, &lg, "D=%u page=%u: open page element %u (pos %u) is %.9g, not its F16 %.9g",
                                      D, ps, (uint32_t)i, (uint32_t)(i / row), (double)got[i], (double)f16r(dec[i]));
                                break;
                            }
                    }
                    OK(t, llmkv_gather(kv, s[way], 0, 0, T, got, 0, NULL, 0, LLMKV_DTYPE_F32));
                    if (memcmp(got, want, n * sizeof(float)))
                        QFAIL(t, &lg, "D=%u page=%u %s: final keys (way %u) differ from the reference", D, ps,
                              llmkv_dtype_name(src), way);
                }
                TST_CHECK(t, cache_ok(kv));
            }
            llmkv_cache_destroy(kv);
            free(x);
            free(buf);
            free(dec);
            free(want);
            free(got);
        }
}

/* NaN, infinities and values F16 cannot hold, against the properties
   rule 3 implies. Every channel of every page holds -2.5 and +2.5 (slots
   0 and 1), so a 0 in place of a NaN changes no scale. Sequence A is
   clean; B has special values in some channels; C is B with each NaN
   replaced by 0. Then:
   - B equals the reference quantizer, and C equals B in the full pages
     (a NaN is stored as 0 would be);
   - every (page, head, channel) without a special value equals A's (a
     special value never reaches another channel);
   - in a full page, a +inf (after F16 rounding: 1e5 and 65520 are +inf)
     reads as the channel's largest value there, a -inf as its smallest;
     with only the anchors finite those are exactly m + 15 s and m for
     m = -2.5, s = f16(5 / 15);
   - a channel with nothing finite in a full page reads as +0;
   - the open page holds the F16 inputs (1e5 -> inf, NaN stays NaN). */
/* Channels whose extremes are zeros of either sign, in every order, in
   full SIMD vectors and in the scalar tail of the range pass (D = 40: two
   16-lane blocks and 8 more), put in one call and token by token: the
   values match the model bit for bit. (The sign of a zero minimum never
   shows in a value: s * code + m with s * code >= +0 gives +0.) */
static void test_q4c_zero_extremes(tst* t) {
    enum { H = 1, D = 40, PS = 8, T = 2 * PS };
    const size_t n = (size_t)T * H * D;
    llmkv_desc d = q4c_desc(1, H, D, PS, 8, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq s[2];
    float x[T * H * D], g[T * H * D], want[T * H * D];
    const float pz = 0.0f, nz = bitsf(0x80000000u);
    qlog lg = {0};
    uint32_t j, c, k;
    size_t i;
    for (j = 0; j < T; ++j)
        for (c = 0; c < D; ++c) {
            float v;
            switch (c % 5) {
            case 0: v = j % 2 ? nz : pz; break;              /* +0 first */
            case 1: v = j % 2 ? pz : nz; break;              /* -0 first */
            case 2: v = nz; break;                           /* all -0 */
            case 3: v = j % 3 == 0 ? nz : (float)(j + 1); break; /* minimum -0, positives */
            default: v = j % 3 == 1 ? pz : -(float)(j + 1); break; /* maximum +0, negatives */
            }
            if (c >= 20 && c % 5 >= 3) v = v == 0.0f ? (c % 2 ? pz : nz) : v; /* the other zero too */
            x[(size_t)j * D + c] = v;
        }
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    ref_keys(x, T, H, D, PS, want);
    for (k = 0; k < 2; ++k) {
        OK(t, llmkv_seq_create(kv, &s[k]));
        if (k == 0) {
            OK(t, llmkv_reserve(kv, s[k], T));
            OK(t, llmkv_put(kv, s[k], 0, T, x, 0, x, 0, LLMKV_DTYPE_F32));
        } else {
            for (j = 0; j < T; ++j) {
                OK(t, llmkv_reserve(kv, s[k], 1));
                OK(t, llmkv_put(kv, s[k], 0, 1, x + (size_t)j * D, 0, x + (size_t)j * D, 0, LLMKV_DTYPE_F32));
            }
        }
        OK(t, llmkv_gather(kv, s[k], 0, 0, T, g, 0, NULL, 0, LLMKV_DTYPE_F32));
        for (i = 0; i < n; ++i)
            if (!same_f(g[i], want[i]))
                QFAIL(t, &lg, "put %s: pos %u ch %u: %.9g (bits %08x), reference %.9g (bits %08x)",
                      k ? "token by token" : "at once", (uint32_t)(i / D), (uint32_t)(i % D), (double)g[i],
                      (unsigned)fbits(g[i]), (double)want[i], (unsigned)fbits(want[i]));
    }
    TST_CHECK(t, cache_ok(kv));
    llmkv_cache_destroy(kv);
}

static void test_q4c_special_values(tst* t) {
    enum { H = 2, D = 33, PS = 16, T = 2 * PS + 7 };
    const size_t row = (size_t)H * D, n = (size_t)T * row;
    llmkv_desc d = q4c_desc(1, H, D, PS, 12, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_seq s[3];
    float *xa = (float*)malloc(n * sizeof(float)), *xb = (float*)malloc(n * sizeof(float));
    float *xc = (float*)malloc(n * sizeof(float)), *ga = (float*)malloc(n * sizeof(float));
    float *gb = (float*)malloc(n * sizeof(float)), *gc = (float*)malloc(n * sizeof(float));
    float* want = (float*)malloc(n * sizeof(float));
    unsigned char* touched = (unsigned char*)calloc((size_t)3 * row, 1); /* [page][head][channel] */
    const float top16 = fmaf(f16r(5.0f / 15.0f), 15.0f, -2.5f);
    qlog lg = {0};
    tst_rng r;
    uint32_t j, h, c, p, k;
    size_t i;
    r.s = q4c_seed(0x5bec4ull);
    if (!xa || !xb || !xc || !ga || !gb || !gc || !want || !touched || llmkv_cache_create(&d, &kv) != LLMKV_OK) {
        TST_CHECK(t, 0);
        goto done;
    }
    for (j = 0; j < T; ++j)
        for (i = 0; i < row; ++i)
            xa[(size_t)j * row + i] = j % PS == 0 ? -2.5f : j % PS == 1 ? 2.5f : (float)gauss(&r);
    memcpy(xb, xa, n * sizeof(float));
    /* page 0, head 0: three special values in each even channel */
    for (c = 0; c < D; c += 2) {
        for (k = 0; k < 3; ++k) xb[(size_t)(2 + tst_below(&r, PS - 2)) * row + c] = special_value(&r);
        touched[c] = 1;
    }
    /* page 0, head 0, channel 1: +inf, -inf and 1e5 (an F16 infinity) */
    xb[(size_t)3 * row + 1] = bitsf(0x7f800000u);
    xb[(size_t)4 * row + 1] = bitsf(0xff800000u);
    xb[(size_t)5 * row + 1] = 1e5f;
    touched[1] = 1;
    /* page 1, head 1: channel 6 has only the anchors finite (NaN, +inf,
       -7e4 -> -inf); channel 7 NaN in every other slot */
    for (j = PS + 2; j < 2 * PS; ++j) {
        xb[(size_t)j * row + D + 6] = j % 3 == 0 ? bitsf(0x7fc00000u) : j % 3 == 1 ? bitsf(0x7f800000u) : -7e4f;
        if (j % 2) xb[(size_t)j * row + D + 7] = bitsf(0xffc00000u);
    }
    touched[row + D + 6] = touched[row + D + 7] = 1;
    /* page 2 (open), head 1, channel 3 */
    for (j = 2 * PS; j < T; ++j) xb[(size_t)j * row + D + 3] = special_value(&r);
    touched[2 * row + D + 3] = 1;
    for (i = 0; i < n; ++i) xc[i] = nan_f(xb[i]) ? 0.0f : xb[i];

    for (k = 0; k < 3; ++k) {
        const float* x = k == 0 ? xa : k == 1 ? xb : xc;
        OK(t, llmkv_seq_create(kv, &s[k]));
        OK(t, llmkv_reserve(kv, s[k], T));
        OK(t, llmkv_put(kv, s[k], 0, T, x, 0, x, 0, LLMKV_DTYPE_F32));
    }
    OK(t, llmkv_gather(kv, s[0], 0, 0, T, ga, 0, NULL, 0, LLMKV_DTYPE_F32));
    OK(t, llmkv_gather(kv, s[1], 0, 0, T, gb, 0, NULL, 0, LLMKV_DTYPE_F32));
    OK(t, llmkv_gather(kv, s[2], 0, 0, T, gc, 0, NULL, 0, LLMKV_DTYPE_F32));
    ref_keys(xb, T, H, D, PS, want);
    for (i = 0; i < n; ++i)
        if (!same_f(gb[i], want[i]))
            QFAIL(t, &lg, "pos %u head %u ch %u: %.9g, reference %.9g (input %.9g)", (uint32_t)(i / row),
                  (uint32_t)(i % row) / D, (uint32_t)(i % D), (double)gb[i], (double)want[i], (double)xb[i]);
    for (i = 0; i < 2 * PS * row; ++i)
        if (!same_f(gb[i], gc[i]))
            QFAIL(t, &lg, "pos %u head %u ch %u: a NaN is not stored as 0 would be (%.9g vs %.9g)",
                  (uint32_t)(i / row), (uint32_t)(i % row) / D, (uint32_t)(i % D), (double)gb[i], (double)gc[i]);
    for (p = 0; p < 3; ++p)
        for (h = 0; h < H; ++h)
            for (c = 0; c < D; ++c) {
                uint32_t end = umin((p + 1) * PS, T);
                size_t col = (size_t)h * D + c;
                float top = -INFINITY, bottom = INFINITY;
                if (!touched[p * row + col]) {
                    for (j = p * PS; j < end; ++j)
                        if (!same_f(ga[(size_t)j * row + col], gb[(size_t)j * row + col])) {
                            QFAIL(t, &lg, "pos %u head %u ch %u: changed by another channel's special value", j, h, c);
                            break;
                        }
                    continue;
                }
                if (p == 2) continue; /* the open page: below */
                for (j = p * PS; j < end; ++j) {
                    float v = gb[(size_t)j * row + col];
                    if (v > top) top = v;
                    if (v < bottom) bottom = v;
                }
                for (j = p * PS; j < end; ++j) {
                    size_t at = (size_t)j * row + col;
                    uint32_t in = fbits(f16r(xb[at]));
                    if (in == 0x7f800000u && fbits(gb[at]) != fbits(top))
                        QFAIL(t, &lg, "page %u head %u ch %u: +inf reads %.9g, the channel's top is %.9g", p, h, c,
                              (double)gb[at], (double)top);
                    if (in == 0xff800000u && fbits(gb[at]) != fbits(bottom))
                        QFAIL(t, &lg, "page %u head %u ch %u: -inf reads %.9g, the channel's bottom is %.9g", p, h, c,
                              (double)gb[at], (double)bottom);
                }
            }
    /* page 1, head 1, channel 6: lo = -2.5, hi = 2.5 from the anchors */
    for (j = PS + 2; j < 2 * PS; ++j) {
        float v = gb[(size_t)j * row + D + 6], w = j % 3 == 1 ? top16 : j % 3 == 2 ? -2.5f : NAN;
        if (j % 3 == 0) { /* NaN: as 0 would be: code rint(2.5 / s) */
            float s16 = f16r(5.0f / 15.0f);
            w = fmaf(s16, rintf((0.0f + 2.5f) * (1.0f / s16)), -2.5f);
        }
        if (fbits(v) != fbits(w))
            QFAIL(t, &lg, "page 1 head 1 ch 6 slot %u: %.9g, want %.9g", j - PS, (double)v, (double)w);
    }
    /* the open page holds the F16 inputs */
    for (j = 2 * PS; j < T; ++j)
        for (i = 0; i < row; ++i) {
            size_t at = (size_t)j * row + i;
            if (!same_f(gb[at], f16r(xb[at]))) {
                QFAIL(t, &lg, "open page pos %u: %.9g, not F16(%.9g)", j, (double)gb[at], (double)xb[at]);
                break;
            }
        }
    /* a channel with nothing finite in a full page reads as +0 */
    {
        llmkv_seq z;
        float zx[PS * 2 * D], zg[PS * 2 * D];
        for (j = 0; j < PS; ++j)
            for (i = 0; i < row; ++i) {
                static const uint32_t nf[3] = {0x7fc00000u, 0x7f800000u, 0xff800000u};
                zx[(size_t)j * row + i] = i == 4 ? bitsf(nf[j % 3]) : (float)gauss(&r);
            }
        OK(t, llmkv_seq_create(kv, &z));
        OK(t, llmkv_reserve(kv, z, PS));
        OK(t, llmkv_put(kv, z, 0, PS, zx, 0, zx, 0, LLMKV_DTYPE_F32));
        OK(t, llmkv_gather(kv, z, 0, 0, PS, zg, 0, NULL, 0, LLMKV_DTYPE_F32));
        for (j = 0; j < PS; ++j) TST_EQ(t, fbits(zg[(size_t)j * row + 4]), 0);
    }
    TST_CHECK(t, cache_ok(kv));
done:
    llmkv_cache_destroy(kv);
    free(xa);
    free(xb);
    free(xc);
    free(ga);
    free(gb);
    free(gc);
    free(want);
    free(touched);
}

/* ------------------------------------------------------------------------ */
/* b. Attention against a double-precision reference                         */
/* ------------------------------------------------------------------------ */

/* Error bounds, as test_attn.c: output error = max |out - ref| / max |V|
   of the sequence and KV head; lse error |lse - ref| / (1 + |ref|). The
   reference is exact (double) over the keys and values llmkv_gather
   returns, which are the stored values: Q4C keys are compared like the
   quantized types there (1e-5, float arithmetic only); V of a 16-bit type
   takes that type's bound (a path may round the softmax weights to it),
   the looser of the two applying. */
#define TOL_F32 1e-5
#define TOL_F16 1e-3
#define TOL_BF16 8e-3
#define QA_MAX_SEQS 6
#define QA_GUARD 32

static double v_tol(llmkv_dtype vt) {
    return vt == LLMKV_DTYPE_BF16 ? TOL_BF16 : vt == LLMKV_DTYPE_F16 ? TOL_F16 : TOL_F32;
}

typedef struct qa_case {
    uint32_t D, ps, n_kv, G, n_layers, layer;
    llmkv_dtype vt;
    uint32_t n_seqs, lens[QA_MAX_SEQS], qlens[QA_MAX_SEQS];
    int chunking; /* 0: random chunks up to 3 pages; 1: one token per put; 2: one put per sequence */
    int outliers; /* a few key channels with large offsets */
    int trunc_back; /* fill each sequence to its page end, then truncate back into that full page (rule 6) */
} qa_case;

typedef struct qa_env {
    qa_case c;
    uint32_t nqh, n_tokens;
    llmkv_cache* kv;
    llmkv_seq seqs[QA_MAX_SEQS];
    llmkv_batch* b;
    llmkv_batch_info info;
    float* kref[QA_MAX_SEQS]; /* gathered K / V of the attended layer [len][n_kv][D] */
    float* vref[QA_MAX_SEQS];
    double vmax[QA_MAX_SEQS][4];
    float* q;
    double* ref_out;
    double* ref_lse;
    float* out_buf; /* guard, rows, guard */
    float* lse_buf;
    size_t out_n, lse_n;
} qa_env;

static void qa_free(qa_env* e) {
    uint32_t i;
    for (i = 0; i < QA_MAX_SEQS; ++i) {
        free(e->kref[i]);
        free(e->vref[i]);
    }
    free(e->q);
    free(e->ref_out);
    free(e->ref_lse);
    free(e->out_buf);
    free(e->lse_buf);
    llmkv_batch_destroy(e->b);
    llmkv_cache_destroy(e->kv);
    memset(e, 0, sizeof *e);
}

static void print_qa_case(const qa_case* c) {
    uint32_t i;
    fprintf(stderr, "    case: D=%u page=%u kv_heads=%u G=%u layers=%u layer=%u v=%s chunking=%d outliers=%d "
            "trunc_back=%d seqs:", c->D, c->ps, c->n_kv, c->G, c->n_layers, c->layer, llmkv_dtype_name(c->vt),
            c->chunking, c->outliers, c->trunc_back);
    for (i = 0; i < c->n_seqs; ++i) fprintf(stderr, " %u/%u", c->lens[i], c->qlens[i]);
    fprintf(stderr, " (len/q)\n");
}

/* Builds the cache, fills it, checks the stored keys against the
   reference quantizer, and computes the reference attention. */
static int qa_setup(tst* t, qa_env* e, const qa_case* c, tst_rng* r) {
    static const llmkv_dtype srcs[3] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16};
    llmkv_desc d;
    uint32_t i, done[QA_MAX_SEQS], fill[QA_MAX_SEQS], pages = 0, active, l, maxlen = 1, tok, h, dd, hq;
    size_t row = (size_t)c->n_kv * c->D;
    float *orig[QA_MAX_SEQS], *kbuf = NULL, *vbuf = NULL, *kdec = NULL, *vdec = NULL, *want = NULL;
    uint32_t out_ch[4];
    double krms = 0.0, scale, qa;
    size_t cnt = 0, k;
    int ok = 1;

    memset(e, 0, sizeof *e);
    memset(orig, 0, sizeof orig);
    e->c = *c;
    e->nqh = c->n_kv * c->G;
    for (i = 0; i < c->n_seqs; ++i) {
        fill[i] = c->trunc_back && c->lens[i] % c->ps ? (c->lens[i] / c->ps + 1) * c->ps : c->lens[i];
        pages += (fill[i] + c->ps - 1) / c->ps;
        if (fill[i] > maxlen) maxlen = fill[i];
    }
    d = q4c_desc(c->n_layers, c->n_kv, c->D, c->ps, pages + 2, c->vt);
    d.max_seqs = QA_MAX_SEQS;
    TST_EQ(t, llmkv_cache_create(&d, &e->kv), LLMKV_OK);
    if (!e->kv) return 0;
    for (i = 0; i < 4; ++i) out_ch[i] = (uint32_t)((i * 37u + 5u) % c->D);
    for (i = 0; i < c->n_seqs; ++i) {
        TST_EQ(t, llmkv_seq_create(e->kv, &e->seqs[i]), LLMKV_OK);
        orig[i] = (float*)malloc(((size_t)fill[i] * row + 1) * sizeof(float));
        e->kref[i] = (float*)malloc(((size_t)c->lens[i] * row + 1) * sizeof(float));
        e->vref[i] = (float*)malloc(((size_t)c->lens[i] * row + 1) * sizeof(float));
        if (!orig[i] || !e->kref[i] || !e->vref[i]) ok = 0;
        done[i] = 0;
    }
    kbuf = (float*)malloc(((size_t)maxlen * row + 1) * sizeof(float));
    vbuf = (float*)malloc(((size_t)maxlen * row + 1) * sizeof(float));
    kdec = (float*)malloc(((size_t)maxlen * row + 1) * sizeof(float));
    vdec = (float*)malloc(((size_t)maxlen * row + 1) * sizeof(float));
    want = (float*)malloc(((size_t)maxlen * row + 1) * sizeof(float));
    if (!ok || !kbuf || !vbuf || !kdec || !vdec || !want) {
        TST_CHECK(t, 0);
        ok = 0;
        goto out;
    }

    /* Interleaved chunks, every layer put (the other layers with data of
       another scale, so reading the wrong layer shows). */
    do {
        active = 0;
        for (i = 0; i < c->n_seqs && ok; ++i) {
            uint32_t n = fill[i] - done[i];
            if (n == 0) continue;
            active = 1;
            if (c->chunking == 0) n = 1 + tst_below(r, umin(n, 3 * c->ps));
            else if (c->chunking == 1) n = 1;
            if (llmkv_reserve(e->kv, e->seqs[i], n) != LLMKV_OK) {
                TST_CHECK(t, 0);
                ok = 0;
                break;
            }
            for (l = 0; l < c->n_layers; ++l) {
                llmkv_dtype src = srcs[tst_below(r, 3)];
                for (tok = 0; tok < n; ++tok)
                    for (h = 0; h < c->n_kv; ++h)
                        for (dd = 0; dd < c->D; ++dd) {
                            size_t at = ((size_t)tok * c->n_kv + h) * c->D + dd;
                            float kx = tst_float(r), vx = tst_float(r);
                            if (c->outliers && (dd == out_ch[0] || dd == out_ch[1] || dd == out_ch[2]))
                                kx = (dd == out_ch[1] ? -12.0f : 12.0f) + 3.0f * kx;
                            if (l != c->layer) {
                                kx *= 100.0f;
                                vx *= 100.0f;
                            }
                            kdec[at] = kx;
                            vdec[at] = vx;
                        }
                src_encode(src, kdec, (size_t)n * row, kbuf, kdec);
                src_encode(src, vdec, (size_t)n * row, vbuf, vdec);
                if (l == c->layer) memcpy(orig[i] + (size_t)done[i] * row, kdec, (size_t)n * row * sizeof(float));
                if (llmkv_put(e->kv, e->seqs[i], l, n, kbuf, 0, vbuf, 0, src) != LLMKV_OK) {
                    TST_CHECK(t, 0);
                    ok = 0;
                    break;
                }
            }
            done[i] += n;
        }
    } while (active && ok);
    if (!ok) goto out;
    for (i = 0; i < c->n_seqs; ++i) /* back into the full last page */
        if (fill[i] != c->lens[i]) OK(t, llmkv_truncate(e->kv, e->seqs[i], c->lens[i]));
    TST_CHECK(t, cache_ok(e->kv));

    /* The stored keys are the reference quantizer's (rules 3-5; after a
       truncation into a full page, rule 6: F16 of the dequantized values);
       the reference attention reads them as gathered. */
    for (i = 0; i < c->n_seqs; ++i) {
        size_t n = (size_t)c->lens[i] * row;
        if (n == 0) continue;
        TST_EQ(t, llmkv_gather(e->kv, e->seqs[i], c->layer, 0, c->lens[i], e->kref[i], 0, e->vref[i], 0,
                               LLMKV_DTYPE_F32), LLMKV_OK);
        ref_keys(orig[i], fill[i], c->n_kv, c->D, c->ps, want);
        if (fill[i] != c->lens[i])
            for (k = (size_t)(c->lens[i] / c->ps) * c->ps * row; k < n; ++k) want[k] = f16r(want[k]);
        for (k = 0; k < n; ++k)
            if (!same_f(e->kref[i][k], want[k])) {
                fprintf(stderr, "  FAIL %s:%d: seq %u pos %u head %u ch %u: gathered key %.9g, reference %.9g%s\n",
                        __FILE__, __LINE__, i, (uint32_t)(k / row), (uint32_t)(k % row) / c->D,
                        (uint32_t)(k % c->D), (double)e->kref[i][k], (double)want[k],
                        fill[i] != c->lens[i] ? " (after a truncation into a full page: rule 6)" : "");
                print_qa_case(c);
                t->cur_failures++;
                break;
            }
        for (k = 0; k < n; ++k) {
            krms += (double)e->kref[i][k] * (double)e->kref[i][k];
            ++cnt;
        }
        for (h = 0; h < c->n_kv; ++h) {
            double mv = 0.0;
            for (tok = 0; tok < c->lens[i]; ++tok)
                for (dd = 0; dd < c->D; ++dd) {
                    double a = fabs((double)e->vref[i][((size_t)tok * c->n_kv + h) * c->D + dd]);
                    if (a > mv) mv = a;
                }
            e->vmax[i][h] = mv > 0.0 ? mv : 1.0;
        }
    }
    krms = cnt ? sqrt(krms / (double)cnt) : 1.0;

    /* Batch and queries: logits of standard deviation about 2.5. */
    e->n_tokens = 0;
    for (i = 0; i < c->n_seqs; ++i) e->n_tokens += c->qlens[i];
    TST_EQ(t, llmkv_batch_create(e->kv, c->n_seqs, e->n_tokens ? e->n_tokens : 1, &e->b), LLMKV_OK);
    if (!e->b) {
        ok = 0;
        goto out;
    }
    TST_EQ(t, llmkv_batch_build(e->b, e->seqs, c->qlens, c->n_seqs), LLMKV_OK);
    TST_EQ(t, llmkv_batch_get(e->b, &e->info), LLMKV_OK);
    if (e->info.n_tokens != e->n_tokens || e->info.n_seqs != c->n_seqs) {
        TST_CHECK(t, 0);
        ok = 0;
        goto out;
    }
    scale = 1.0 / sqrt((double)c->D);
    qa = 2.5 * sqrt(3.0) / (scale * sqrt((double)c->D) * (krms > 0.0 ? krms : 1.0));
    e->out_n = (size_t)e->n_tokens * e->nqh * c->D;
    e->lse_n = (size_t)e->n_tokens * e->nqh;
    e->q = (float*)malloc((e->out_n + 1) * sizeof(float));
    e->ref_out = (double*)malloc((e->out_n + 1) * sizeof(double));
    e->ref_lse = (double*)malloc((e->lse_n + 1) * sizeof(double));
    e->out_buf = (float*)malloc((e->out_n + 2 * QA_GUARD) * sizeof(float));
    e->lse_buf = (float*)malloc((e->lse_n + 2 * QA_GUARD) * sizeof(float));
    if (!e->q || !e->ref_out || !e->ref_lse || !e->out_buf || !e->lse_buf) {
        TST_CHECK(t, 0);
        ok = 0;
        goto out;
    }
    for (k = 0; k < e->out_n; ++k) e->q[k] = (float)(qa * (double)tst_float(r));
    {
        double* s = (double*)malloc((size_t)maxlen * sizeof(double));
        if (!s) {
            ok = 0;
            goto out;
        }
        for (i = 0; i < c->n_seqs; ++i) {
            uint32_t L = c->lens[i], qn = c->qlens[i], row0 = (uint32_t)e->info.qo_indptr[i];
            for (tok = 0; tok < qn; ++tok) {
                uint32_t pos = L - qn + tok, j;
                TST_EQ(t, e->info.positions[row0 + tok], pos);
                for (hq = 0; hq < e->nqh; ++hq) {
                    uint32_t kvh = hq / c->G;
                    const float* qr = e->q + ((size_t)(row0 + tok) * e->nqh + hq) * c->D;
                    double* o = e->ref_out + ((size_t)(row0 + tok) * e->nqh + hq) * c->D;
                    double mx = -INFINITY, sum = 0.0;
                    for (dd = 0; dd < c->D; ++dd) o[dd] = 0.0;
                    for (j = 0; j <= pos; ++j) {
                        const float* kr = e->kref[i] + ((size_t)j * c->n_kv + kvh) * c->D;
                        double acc = 0.0;
                        for (dd = 0; dd < c->D; ++dd) acc += (double)qr[dd] * (double)kr[dd];
                        s[j] = acc * scale;
                        if (s[j] > mx) mx = s[j];
                    }
                    for (j = 0; j <= pos; ++j) {
                        const float* vr = e->vref[i] + ((size_t)j * c->n_kv + kvh) * c->D;
                        double p = exp(s[j] - mx);
                        sum += p;
                        for (dd = 0; dd < c->D; ++dd) o[dd] += p * (double)vr[dd];
                    }
                    for (dd = 0; dd < c->D; ++dd) o[dd] /= sum;
                    e->ref_lse[(size_t)(row0 + tok) * e->nqh + hq] = mx + log(sum);
                }
            }
        }
        free(s);
    }
out:
    for (i = 0; i < QA_MAX_SEQS; ++i) free(orig[i]);
    free(kbuf);
    free(vbuf);
    free(kdec);
    free(vdec);
    free(want);
    return ok;
}

enum { QA_MODE_NULL, QA_MODE_POOL2, QA_MODE_PARTS2, QA_N_MODES };
static const char* const QA_MODE_NAME[QA_N_MODES] = {"pool NULL", "pool of 2", "part/merge nth=2"};

/* One attention call in a mode; *ws receives the part/merge workspace. */
static llmkv_result qa_attend(const qa_env* e, const llmkv_attn_desc* d, int mode, llmkv_threadpool* pool2,
                              size_t* ws) {
    llmkv_result res;
    unsigned char* w;
    *ws = 0;
    if (mode == QA_MODE_NULL) return llmkv_attend(e->kv, e->b, d, NULL);
    if (mode == QA_MODE_POOL2) return llmkv_attend(e->kv, e->b, d, pool2);
    res = llmkv_attend_workspace_size(e->kv, e->b, d, 2, ws);
    if (res != LLMKV_OK) return res;
    w = (unsigned char*)malloc(*ws + 4);
    if (!w) return LLMKV_ERR_OUT_OF_MEMORY;
    memset(w, 0xFF, *ws + 4); /* NaN bytes: the workspace holds nothing on entry */
    /* a valid schedule in reverse order: both parts, then both merges */
    res = llmkv_attend_part(e->kv, e->b, d, 1, 2, w + 4, *ws);
    if (res == LLMKV_OK) res = llmkv_attend_part(e->kv, e->b, d, 0, 2, w + 4, *ws);
    if (res == LLMKV_OK) res = llmkv_attend_merge(e->kv, e->b, d, 1, 2, w + 4, *ws);
    if (res == LLMKV_OK) res = llmkv_attend_merge(e->kv, e->b, d, 0, 2, w + 4, *ws);
    free(w);
    return res;
}

/* Runs every path and mode and checks each result. Returns the worst
   error / bound seen. */
static double qa_run_all(tst* t, qa_env* e, llmkv_threadpool* pool2, size_t* ws_parts) {
    const qa_case* c = &e->c;
    double tol = v_tol(c->vt) > TOL_F32 ? v_tol(c->vt) : TOL_F32, worst = 0.0;
    float* out = e->out_buf + QA_GUARD;
    float* lse = e->lse_buf + QA_GUARD;
    int p, mode;
    *ws_parts = 0;
    for (p = LLMKV_CPU_PATH_AUTO; p <= LLMKV_CPU_PATH_LAST; ++p) {
        if (!llmkv_cpu_path_supported((llmkv_cpu_path)p)) continue;
        for (mode = 0; mode < QA_N_MODES; ++mode) {
            llmkv_attn_desc d;
            llmkv_result res;
            size_t k, ws = 0;
            uint32_t i, tok, hq, dd;
            int bad = 0;
            if (mode == QA_MODE_POOL2 && !pool2) continue;
            if (p == LLMKV_CPU_PATH_AUTO && mode != QA_MODE_NULL) continue;
            memset(&d, 0, sizeof d);
            d.layer = c->layer;
            d.n_q_heads = e->nqh;
            d.q = e->q;
            d.out = out;
            d.lse = lse;
            d.path = (llmkv_cpu_path)p;
            for (k = 0; k < e->out_n + 2 * QA_GUARD; ++k) e->out_buf[k] = bitsf(0x7fc00000u);
            for (k = 0; k < e->lse_n + 2 * QA_GUARD; ++k) e->lse_buf[k] = bitsf(0x7fc00000u);
            res = qa_attend(e, &d, mode, pool2, &ws);
            if (mode == QA_MODE_PARTS2 && ws > *ws_parts) *ws_parts = ws;
            if (res != LLMKV_OK) {
                fprintf(stderr, "  FAIL %s:%d: [%s, %s] returned %s\n", __FILE__, __LINE__,
                        llmkv_cpu_path_name((llmkv_cpu_path)p), QA_MODE_NAME[mode], llmkv_result_string(res));
                print_qa_case(c);
                t->cur_failures++;
                return 1e9;
            }
            for (k = 0; k < QA_GUARD; ++k)
                if (!nan_f(e->out_buf[k]) || !nan_f(out[e->out_n + k]) || !nan_f(e->lse_buf[k]) ||
                    !nan_f(lse[e->lse_n + k]))
                    bad = 1;
            if (bad) fprintf(stderr, "  [%s, %s] wrote outside out / lse\n", llmkv_cpu_path_name((llmkv_cpu_path)p),
                             QA_MODE_NAME[mode]);
            for (i = 0; i < c->n_seqs; ++i) {
                uint32_t row0 = (uint32_t)e->info.qo_indptr[i];
                for (tok = 0; tok < c->qlens[i]; ++tok)
                    for (hq = 0; hq < e->nqh; ++hq) {
                        size_t r = (size_t)(row0 + tok) * e->nqh + hq;
                        double vm = e->vmax[i][hq / c->G], err_row = 0.0, el, rl = e->ref_lse[r];
                        for (dd = 0; dd < c->D; ++dd) {
                            double err = fabs((double)out[r * c->D + dd] - e->ref_out[r * c->D + dd]) / vm;
                            if (!(err <= err_row)) err_row = err != err ? INFINITY : err;
                        }
                        el = fabs((double)lse[r] - rl) / (1.0 + fabs(rl));
                        if (el != el) el = INFINITY;
                        if (err_row / tol > worst) worst = err_row / tol;
                        if (el / tol > worst) worst = el / tol;
                        if (!(err_row <= tol) || !(el <= tol)) {
                            if (!bad)
                                fprintf(stderr, "  [%s, %s] seq %u row %u (pos %u) head %u: out error %.3g x max|V|, "
                                        "lse %.9g vs %.9g (bound %.0e)\n", llmkv_cpu_path_name((llmkv_cpu_path)p),
                                        QA_MODE_NAME[mode], i, tok, c->lens[i] - c->qlens[i] + tok, hq, err_row,
                                        (double)lse[r], rl, tol);
                            bad = 1;
                        }
                    }
            }
            if (bad) {
                print_qa_case(c);
                fprintf(stderr, "  FAIL %s:%d: attention over Q4C keys matches the reference\n", __FILE__, __LINE__);
                t->cur_failures++;
            }
        }
    }
    return worst;
}

/* Sets up case c, runs it on every path and thread mode, frees it; keeps
   the worst error (relative to its bound) and counts the case. Returns
   the workspace bytes the 2-thread part/merge run needed (0 on a failed
   setup). */
static size_t qa_case_run(tst* t, const qa_case* c, tst_rng* r, llmkv_threadpool* pool2, double* worst,
                          uint32_t* n_cases) {
    qa_env e;
    size_t ws = 0;
    double w;
    if (!qa_setup(t, &e, c, r)) {
        print_qa_case(c);
        qa_free(&e);
        return 0;
    }
    w = qa_run_all(t, &e, pool2, &ws);
    if (w > *worst) *worst = w;
    qa_free(&e);
    ++*n_cases;
    return ws;
}

static void test_q4c_attention(tst* t) {
    static const uint32_t dims[] = {1, 7, 33, 64, 80, 128, 256};
    static const uint32_t pss[] = {1, 5, 16, 32, 64};
    static const llmkv_dtype vts[6] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16,
                                       LLMKV_DTYPE_Q8,  LLMKV_DTYPE_Q4,  LLMKV_DTYPE_FP8};
    llmkv_threadpool* pool2 = NULL;
    llmkv_result pr = llmkv_threadpool_create(2, NULL, &pool2);
    double worst = 0.0;
    uint32_t di, pi, n_cases = 0;
    tst_rng r;
#ifdef LLMKV_NO_THREADS
    TST_EQ(t, pr, LLMKV_ERR_UNSUPPORTED);
#else
    TST_EQ(t, pr, LLMKV_OK);
#endif
    r.s = q4c_seed(0xa77c4ull);
    for (di = 0; di < sizeof dims / sizeof dims[0]; ++di)
        for (pi = 0; pi < sizeof pss / sizeof pss[0]; ++pi) {
            qa_case c;
            uint32_t ps = pss[pi];
            memset(&c, 0, sizeof c);
            c.D = dims[di];
            c.ps = ps;
            c.n_kv = di % 2 ? 2 : 1;
            c.G = (di + pi) % 2 ? 4 : 1;
            c.n_layers = 2;
            c.layer = (di + pi) % 2;
            c.vt = vts[(di * 5 + pi) % 6];
            c.chunking = (int)((di + pi) % 3);
            c.outliers = (int)(pi % 2);
            c.n_seqs = 4;
            c.lens[0] = 2 * ps;                 /* a multiple of the page size: decode */
            c.qlens[0] = 1;
            c.lens[1] = 2 * ps + ps / 2 + 1;    /* ends inside a page: a prefill chunk */
            c.qlens[1] = umin(c.lens[1], 5);
            c.lens[2] = ps > 1 ? ps - 1 : 1;    /* the open page only: the whole prompt */
            c.qlens[2] = umin(c.lens[2], 24);
            c.lens[3] = 3 * ps + 1;             /* decode just past a page boundary */
            c.qlens[3] = 1;
            qa_case_run(t, &c, &r, pool2, &worst, &n_cases);
        }
    /* Every sequence truncated back into its full last page (rule 6): the
       kernels must read what gather returns there too. */
    for (di = 0; di < sizeof dims / sizeof dims[0]; ++di) {
        qa_case c;
        uint32_t ps = pss[1 + di % 3];
        memset(&c, 0, sizeof c);
        c.D = dims[di];
        c.ps = ps;
        c.n_kv = 2;
        c.G = di % 2 ? 1 : 4;
        c.n_layers = 1;
        c.vt = vts[(di + 3) % 6];
        c.chunking = (int)(di % 3);
        c.trunc_back = 1;
        c.n_seqs = 3;
        c.lens[0] = ps + ps / 2;           /* page 1 refilled, then cut to half */
        c.qlens[0] = 1;
        c.lens[1] = 3 * ps - 1;            /* one slot dropped */
        c.qlens[1] = umin(c.lens[1], 4);
        c.lens[2] = 1;                     /* page 0 cut to its first slot */
        c.qlens[2] = 1;
        qa_case_run(t, &c, &r, pool2, &worst, &n_cases);
    }
    /* Long sequences: a decode the 2-thread split must divide (as in
       test_attn.c: one sequence, one query, at most 2 query heads), and a
       64-token prefill chunk at 700. */
    {
        qa_case c;
        size_t ws;
        int k;
        for (k = 0; k < 2; ++k) {
            memset(&c, 0, sizeof c);
            c.D = k ? 64 : 128;
            c.ps = k ? 16 : 32;
            c.n_kv = k ? 2 : 1;
            c.G = k ? 4 : 2;
            c.n_layers = 1;
            c.vt = k ? LLMKV_DTYPE_Q8 : LLMKV_DTYPE_F16;
            c.n_seqs = 1;
            c.lens[0] = k ? 700 : 1500;
            c.qlens[0] = k ? 64 : 1;
            c.outliers = 1;
            ws = qa_case_run(t, &c, &r, pool2, &worst, &n_cases);
            if (k == 0) {
                if (ws == 0) fprintf(stderr, "  no split for a 1500-token decode on 2 threads\n");
                TST_CHECK(t, ws > 0);
            }
        }
    }
    llmkv_threadpool_destroy(pool2);
    if (t->verbose) fprintf(stderr, "  q4c attention: %u cases, worst error at %.3f of its bound\n", n_cases, worst);
}

/* ------------------------------------------------------------------------ */
/* d. Outlier channels: Q4C against per-token Q4                            */
/* ------------------------------------------------------------------------ */

/* Keys: 1024 tokens, 2 KV heads of 128 channels; per head 4 fixed
   channels carry sign_c * (40 + 8 N(0,1)), the rest N(0,1) (the pattern
   real LLM keys show). V N(0,1) at F32 in both caches, so only the keys
   differ. Queries N(0,1) per channel (they weigh the outlier channels as
   much as the others), 8 query heads (GQA 4), scale 1/sqrt(128); a batch
   of four forks truncated to 256, 512, 768 and 1024 tokens (page
   boundaries: every page full), 4 query tokens each (causal).

   Figures are relative RMS errors, sqrt(sum err^2 / sum ref^2), over all
   elements: of the gathered keys against the original keys, and of the
   attention output against double-precision attention over the original
   keys.

   Bounds. A per-token Q4 group of 32 holding an outlier (here nearly every
   group) has a step s ~ 45/15 = 3, an RMS error s/sqrt(12) ~ 0.85 on all
   its elements; against an RMS key of ~7 that is ~12%. Per channel over
   a page, the normal channels span ~5 (page 64: s ~ 0.33, error ~0.1)
   and the outliers ~40 (s ~ 2.7, error ~0.8, on 4 channels of 128):
   ~2%. The assertions leave a wide margin: (i) Q4C key error <= half of
   Q4's; (ii) Q4C attention error < Q4's. On Gaussian keys (no outliers)
   Q4C's key error is ~8-9% (step range/15 over a page); asserted < 15%. */
#define OD_D 128u
#define OD_KV 2u
#define OD_QH 8u
#define OD_T 1024u
#define OD_FORKS 4u
#define OD_QLEN 4u
#define OD_ROWS (OD_FORKS * OD_QLEN)

static const uint32_t OD_LENS[OD_FORKS] = {256, 512, 768, 1024};

static void od_reference(const float* k, const float* v, const float* q, double* out) {
    const double scale = 1.0 / sqrt((double)OD_D);
    double* w = (double*)malloc(OD_T * sizeof(double));
    uint32_t f, tok, hq, j, e;
    if (!w) return;
    for (f = 0; f < OD_FORKS; ++f)
        for (tok = 0; tok < OD_QLEN; ++tok)
            for (hq = 0; hq < OD_QH; ++hq) {
                uint32_t row = f * OD_QLEN + tok, pos = OD_LENS[f] - OD_QLEN + tok, kvh = hq / (OD_QH / OD_KV);
                const float* qr = q + ((size_t)row * OD_QH + hq) * OD_D;
                double* o = out + ((size_t)row * OD_QH + hq) * OD_D;
                double mx = -INFINITY, sum = 0.0;
                for (j = 0; j <= pos; ++j) {
                    const float* kr = k + ((size_t)j * OD_KV + kvh) * OD_D;
                    double acc = 0.0;
                    for (e = 0; e < OD_D; ++e) acc += (double)qr[e] * (double)kr[e];
                    w[j] = acc * scale;
                    if (w[j] > mx) mx = w[j];
                }
                for (e = 0; e < OD_D; ++e) o[e] = 0.0;
                for (j = 0; j <= pos; ++j) {
                    const float* vr = v + ((size_t)j * OD_KV + kvh) * OD_D;
                    double p = exp(w[j] - mx);
                    sum += p;
                    for (e = 0; e < OD_D; ++e) o[e] += p * (double)vr[e];
                }
                for (e = 0; e < OD_D; ++e) o[e] /= sum;
            }
    free(w);
}

/* Stores k, v in a cache with keys of type kt, pages of ps; returns the
   key and attention relative RMS errors (negative on failure). */
static void od_measure(tst* t, llmkv_dtype kt, uint32_t ps, const float* k, const float* v, const float* q,
                       const double* ref, double* key_err, double* att_err) {
    llmkv_desc d = q4c_desc(1, OD_KV, OD_D, ps, OD_T / ps + 2, LLMKV_DTYPE_F32);
    llmkv_cache* kv = NULL;
    llmkv_batch* b = NULL;
    llmkv_seq seqs[OD_FORKS];
    uint32_t qlens[OD_FORKS], i;
    const size_t n = (size_t)OD_T * OD_KV * OD_D, no = (size_t)OD_ROWS * OD_QH * OD_D;
    float* g = (float*)malloc(n * sizeof(float));
    float* out = (float*)malloc(no * sizeof(float));
    double num = 0.0, den = 0.0;
    size_t e;
    llmkv_attn_desc ad;
    *key_err = *att_err = -1.0;
    d.k_dtype = kt;
    if (!g || !out || llmkv_cache_create(&d, &kv) != LLMKV_OK) {
        TST_CHECK(t, 0);
        goto done;
    }
    OK(t, llmkv_seq_create(kv, &seqs[OD_FORKS - 1]));
    OK(t, llmkv_reserve(kv, seqs[OD_FORKS - 1], OD_T));
    OK(t, llmkv_put(kv, seqs[OD_FORKS - 1], 0, OD_T, k, 0, v, 0, LLMKV_DTYPE_F32));
    OK(t, llmkv_gather(kv, seqs[OD_FORKS - 1], 0, 0, OD_T, g, 0, NULL, 0, LLMKV_DTYPE_F32));
    for (e = 0; e < n; ++e) {
        double diff = (double)g[e] - (double)k[e];
        num += diff * diff;
        den += (double)k[e] * (double)k[e];
    }
    *key_err = sqrt(num / den);
    for (i = 0; i + 1 < OD_FORKS; ++i) {
        OK(t, llmkv_fork(kv, seqs[OD_FORKS - 1], &seqs[i]));
        OK(t, llmkv_truncate(kv, seqs[i], OD_LENS[i]));
    }
    for (i = 0; i < OD_FORKS; ++i) qlens[i] = OD_QLEN;
    TST_CHECK(t, cache_ok(kv));
    if (llmkv_batch_create(kv, OD_FORKS, OD_ROWS, &b) != LLMKV_OK || llmkv_batch_build(b, seqs, qlens, OD_FORKS) != LLMKV_OK) {
        TST_CHECK(t, 0);
        goto done;
    }
    memset(&ad, 0, sizeof ad);
    ad.n_q_heads = OD_QH;
    ad.q = q;
    ad.out = out;
    OK(t, llmkv_attend(kv, b, &ad, NULL));
    num = den = 0.0;
    for (e = 0; e < no; ++e) {
        double diff = (double)out[e] - ref[e];
        num += diff * diff;
        den += ref[e] * ref[e];
    }
    *att_err = sqrt(num / den);
done:
    llmkv_batch_destroy(b);
    llmkv_cache_destroy(kv);
    free(g);
    free(out);
}

static void test_q4c_outlier_accuracy(tst* t) {
    const size_t n = (size_t)OD_T * OD_KV * OD_D, no = (size_t)OD_ROWS * OD_QH * OD_D;
    float* k = (float*)malloc(n * sizeof(float));
    float* v = (float*)malloc(n * sizeof(float));
    float* q = (float*)malloc(no * sizeof(float));
    double* ref = (double*)malloc(no * sizeof(double));
    int outlier;
    tst_rng r;
    if (!k || !v || !q || !ref) {
        TST_CHECK(t, 0);
        goto done;
    }
    for (outlier = 1; outlier >= 0; --outlier) {
        uint32_t ch[OD_KV][4], h, c, j, pi;
        float sgn[OD_KV][4];
        double k4, a4;
        size_t e;
        r.s = q4c_seed(0x0071e4ull + (unsigned long long)outlier);
        for (h = 0; h < OD_KV; ++h) /* 4 distinct channels per head, signs varying */
            for (c = 0; c < 4; ++c) {
                uint32_t pick, u;
                int dup;
                do {
                    pick = tst_below(&r, OD_D);
                    for (dup = 0, u = 0; u < c; ++u) dup |= ch[h][u] == pick;
                } while (dup);
                ch[h][c] = pick;
                sgn[h][c] = c % 2 ? -1.0f : 1.0f;
            }
        for (e = 0; e < n; ++e) k[e] = (float)gauss(&r);
        if (outlier)
            for (j = 0; j < OD_T; ++j)
                for (h = 0; h < OD_KV; ++h)
                    for (c = 0; c < 4; ++c)
                        k[((size_t)j * OD_KV + h) * OD_D + ch[h][c]] = sgn[h][c] * (40.0f + 8.0f * (float)gauss(&r));
        for (e = 0; e < n; ++e) v[e] = (float)gauss(&r);
        for (e = 0; e < no; ++e) q[e] = (float)gauss(&r);
        od_reference(k, v, q, ref);
        od_measure(t, LLMKV_DTYPE_Q4, 32, k, v, q, ref, &k4, &a4);
        if (t->verbose)
            fprintf(stderr, "  q4c accuracy %-8s q4  (per token)  : key rel rms %.4f, attention rel rms %.4f\n",
                    outlier ? "outlier" : "gaussian", k4, a4);
        for (pi = 0; pi < 2; ++pi) {
            uint32_t ps = pi ? 64 : 32;
            double kc, ac;
            od_measure(t, LLMKV_DTYPE_Q4C, ps, k, v, q, ref, &kc, &ac);
            if (t->verbose)
                fprintf(stderr, "  q4c accuracy %-8s q4c (page %2u)   : key rel rms %.4f, attention rel rms %.4f"
                        " (q4c/q4: keys %.2f, attention %.2f)\n", outlier ? "outlier" : "gaussian", ps, kc, ac,
                        kc / k4, ac / a4);
            TST_CHECK(t, kc >= 0.0 && ac >= 0.0 && k4 >= 0.0 && a4 >= 0.0);
            if (outlier) {
                if (!(kc <= 0.5 * k4))
                    fprintf(stderr, "  FAIL page %u: Q4C key error %.4f > half of Q4's %.4f\n", ps, kc, k4);
                TST_CHECK(t, kc <= 0.5 * k4);
                if (!(ac < a4)) fprintf(stderr, "  FAIL page %u: Q4C attention error %.4f >= Q4's %.4f\n", ps, ac, a4);
                TST_CHECK(t, ac < a4);
            } else {
                if (!(kc < 0.15)) fprintf(stderr, "  FAIL page %u: Q4C key error on Gaussian keys %.4f\n", ps, kc);
                TST_CHECK(t, kc < 0.15);
            }
        }
    }
done:
    free(k);
    free(v);
    free(q);
    free(ref);
}

/* ------------------------------------------------------------------------ */
/* Sizes (rule 11)                                                          */
/* ------------------------------------------------------------------------ */

/* bytes_per_token is page_bytes / page_size of llmkv_layout_for; the K
   part is ceil(D/2) code bytes per token and head plus a (page, head)
   table of ceil(D/16) * 64 bytes; a page is every layer's K and V with
   each region padded to 64 bytes (at most 4 regions per layer). With
   pages of 32 or more, Q4C costs at most 1.15x per-token Q4 (same V). */
static void test_q4c_sizes(tst* t) {
    static const uint32_t dims[] = {1, 7, 16, 33, 64, 80, 128, 256, 512};
    static const uint32_t pss[] = {1, 5, 16, 32, 64, 128, 256};
    static const llmkv_dtype vts[6] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16,
                                       LLMKV_DTYPE_Q8,  LLMKV_DTYPE_Q4,  LLMKV_DTYPE_FP8};
    uint32_t di, pi, vi;
    for (di = 0; di < sizeof dims / sizeof dims[0]; ++di)
        for (pi = 0; pi < sizeof pss / sizeof pss[0]; ++pi)
            for (vi = 0; vi < 6; ++vi) {
                uint32_t D = dims[di], ps = pss[pi], L = 2, H = 3, vdb = 0, vsb = 0;
                llmkv_desc d = q4c_desc(L, H, D, ps, 0, vts[vi]);
                llmkv_layout l;
                uint64_t kbytes, vbytes, lo, hi;
                double bpt = llmkv_bytes_per_token(&d);
                memset(&l, 0, sizeof l);
                OK(t, llmkv_layout_for(&d, &l));
                OK(t, llmkv_vector_bytes(vts[vi], D, &vdb, &vsb));
                TST_CHECK(t, bpt == (double)l.page_bytes / (double)ps);
                TST_EQ(t, l.page_bytes % 64, 0);
                TST_EQ(t, l.k.dtype, LLMKV_DTYPE_Q4C);
                TST_EQ(t, l.k.slot_stride, (D + 1) / 2);
                TST_EQ(t, l.k.head_stride, (uint64_t)ps * ((D + 1) / 2));
                kbytes = (uint64_t)H * ((uint64_t)ps * ((D + 1) / 2) + (uint64_t)((D + 15) / 16) * 64);
                vbytes = (uint64_t)H * ps * (vdb + vsb);
                lo = L * (kbytes + vbytes);
                hi = L * (kbytes + vbytes + 4 * 63);
                if (!(l.page_bytes >= lo && l.page_bytes <= hi)) {
                    fprintf(stderr, "  FAIL D=%u page=%u v=%s: page_bytes %lu outside [%lu, %lu]\n", D, ps,
                            llmkv_dtype_name(vts[vi]), (unsigned long)l.page_bytes, (unsigned long)lo,
                            (unsigned long)hi);
                    TST_CHECK(t, 0);
                }
                if (ps >= 32) {
                    double q4;
                    d.k_dtype = LLMKV_DTYPE_Q4;
                    q4 = llmkv_bytes_per_token(&d);
                    if (!(bpt <= 1.15 * q4)) {
                        fprintf(stderr, "  FAIL D=%u page=%u v=%s: q4c %.2f bytes/token > 1.15 x q4 %.2f\n", D, ps,
                                llmkv_dtype_name(vts[vi]), bpt, q4);
                        TST_CHECK(t, 0);
                    }
                }
            }
    /* A created cache reports the same layout. */
    {
        llmkv_desc d = q4c_desc(2, 2, 33, 5, 4, LLMKV_DTYPE_Q8);
        llmkv_layout a, b;
        llmkv_cache* kv = NULL;
        OK(t, llmkv_layout_for(&d, &a));
        if (llmkv_cache_create(&d, &kv) == LLMKV_OK) {
            OK(t, llmkv_cache_layout(kv, &b));
            TST_CHECK(t, memcmp(&a, &b, sizeof a) == 0);
            llmkv_cache_destroy(kv);
        } else {
            TST_CHECK(t, 0);
        }
    }
    if (t->verbose) { /* the shape of test_quant_sizes: 8 KV heads of 128, one layer */
        static const llmkv_dtype vshow[2] = {LLMKV_DTYPE_Q4, LLMKV_DTYPE_F16};
        for (vi = 0; vi < 2; ++vi)
            for (pi = 2; pi < 6; ++pi) {
                llmkv_desc d = q4c_desc(1, 8, 128, pss[pi], 0, vshow[vi]);
                double c = llmkv_bytes_per_token(&d), q4;
                d.k_dtype = LLMKV_DTYPE_Q4;
                q4 = llmkv_bytes_per_token(&d);
                fprintf(stderr, "  q4c bytes/token (8 heads x 128, V %s, page %3u): q4c %.1f, q4 %.1f (%.3fx)\n",
                        llmkv_dtype_name(vshow[vi]), pss[pi], c, q4, c / q4);
            }
    }
}

/* ------------------------------------------------------------------------ */
/* e. Bad input, capacity and allocation failures                           */
/* ------------------------------------------------------------------------ */

static void test_q4c_bad_arguments(tst* t) {
    static const llmkv_dtype vts[7] = {LLMKV_DTYPE_DEFAULT, LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16,
                                       LLMKV_DTYPE_Q8,      LLMKV_DTYPE_Q4,  LLMKV_DTYPE_FP8};
    llmkv_desc d;
    llmkv_cache* kv;
    float x[64], out[64];
    unsigned char data[512], sc[512];
    uint32_t db, sb, i, e;
    unsigned char dummy = 0;
    TST_EQ(t, (int)LLMKV_DTYPE_Q4C, 7);
    TST_CHECK(t, strcmp(llmkv_dtype_name(LLMKV_DTYPE_Q4C), "q4c") == 0);
    TST_EQ(t, llmkv_dtype_size(LLMKV_DTYPE_Q4C), 0);
    for (i = 0; i < 64; ++i) x[i] = (float)i - 20.0f;

    /* rule 1: Q4C is a key type only */
    d = q4c_desc(1, 2, 32, 16, 4, LLMKV_DTYPE_Q4C);
    kv = (llmkv_cache*)(void*)&dummy; /* must be cleared */
    TST_EQ(t, llmkv_cache_create(&d, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, kv == NULL);
    d.k_dtype = LLMKV_DTYPE_F16;
    kv = NULL;
    TST_EQ(t, llmkv_cache_create(&d, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, kv == NULL);
    /* not on metadata-only caches */
    d = q4c_desc(1, 2, 32, 16, 4, LLMKV_DTYPE_F16);
    d.storage = LLMKV_STORAGE_METADATA_ONLY;
    kv = NULL;
    TST_EQ(t, llmkv_cache_create(&d, &kv), LLMKV_ERR_UNSUPPORTED);
    TST_CHECK(t, kv == NULL);
    /* not a per-vector format */
    TST_EQ(t, llmkv_quantize(LLMKV_DTYPE_Q4C, x, 32, data, sc), LLMKV_ERR_INVALID_ARGUMENT);
    memset(data, 0, sizeof data);
    memset(sc, 0, sizeof sc);
    TST_EQ(t, llmkv_dequantize(LLMKV_DTYPE_Q4C, data, sc, 32, out), LLMKV_ERR_INVALID_ARGUMENT);
    db = sb = 777;
    TST_EQ(t, llmkv_vector_bytes(LLMKV_DTYPE_Q4C, 32, &db, &sb), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, db, 0);
    TST_EQ(t, sb, 0);
    /* any other V type works */
    for (i = 0; i < 7; ++i) {
        llmkv_seq s;
        float g[2 * 32], gv[2 * 32];
        d = q4c_desc(1, 2, 32, 4, 4, vts[i]);
        kv = NULL;
        TST_EQ(t, llmkv_cache_create(&d, &kv), LLMKV_OK);
        if (!kv) continue;
        OK(t, llmkv_seq_create(kv, &s));
        OK(t, llmkv_reserve(kv, s, 1));
        OK(t, llmkv_put(kv, s, 0, 1, x, 0, x, 0, LLMKV_DTYPE_F32));
        OK(t, llmkv_gather(kv, s, 0, 0, 1, g, 0, gv, 0, LLMKV_DTYPE_F32));
        for (e = 0; e < 64; ++e) TST_CHECK(t, same_f(g[e], f16r(x[e])));
        /* caller buffers are F32, F16 or BF16 only */
        TST_EQ(t, llmkv_put(kv, s, 0, 1, x, 0, x, 0, LLMKV_DTYPE_Q4C), LLMKV_ERR_INVALID_ARGUMENT);
        TST_EQ(t, llmkv_gather(kv, s, 0, 0, 1, g, 0, gv, 0, LLMKV_DTYPE_Q4C), LLMKV_ERR_INVALID_ARGUMENT);
        OK(t, llmkv_gather(kv, s, 0, 0, 1, g, 0, NULL, 0, LLMKV_DTYPE_F32));
        for (e = 0; e < 64; ++e) TST_CHECK(t, same_f(g[e], f16r(x[e]))); /* the refused put wrote nothing */
        TST_CHECK(t, cache_ok(kv));
        llmkv_cache_destroy(kv);
    }
}

/* A put that needs a copy-on-write page when no page is free fails with
   OUT_OF_PAGES and changes nothing: both sequences' keys (the full page's
   codes and the open page's F16 keys) and V, lengths, page tables. Also a
   rewriting put into the shared full page and a reserve that must copy
   the shared tail. Then, with pages back, everything completes and
   matches the model (the fork truncated inside the shared full page
   included). */
typedef struct cow_snap {
    uint32_t len[2], np[2], pages[2][8];
    float k[2][2][16 * 2 * 33], v[2][2][16 * 2 * 33]; /* [seq][layer] */
    llmkv_stats st;
} cow_snap;

static void cow_take(tst* t, llmkv_cache* kv, const llmkv_seq* s, uint32_t valid, cow_snap* c) {
    uint32_t i, l;
    memset(c, 0, sizeof *c);
    OK(t, llmkv_cache_stats(kv, &c->st));
    for (i = 0; i < 2; ++i) {
        OK(t, llmkv_seq_length(kv, s[i], &c->len[i]));
        OK(t, llmkv_seq_pages(kv, s[i], c->pages[i], 8, &c->np[i]));
        for (l = 0; l < 2; ++l)
            OK(t, llmkv_gather(kv, s[i], l, 0, valid, c->k[i][l], 0, c->v[i][l], 0, LLMKV_DTYPE_F32));
    }
}

static void test_q4c_cow_out_of_pages(tst* t) {
    enum { H = 2, D = 33, PS = 8 };
    qm* m = (qm*)calloc(1, sizeof(qm));
    cow_snap* before = (cow_snap*)malloc(sizeof(cow_snap));
    cow_snap* after = (cow_snap*)malloc(sizeof(cow_snap));
    llmkv_desc d = q4c_desc(2, H, D, PS, 6, LLMKV_DTYPE_F16);
    llmkv_cache* kv = NULL;
    llmkv_seq s[2], hog;
    float kx[16 * H * D], vx[16 * H * D];
    float kb[16 * H * D], vb[16 * H * D];
    qlog lg = {0};
    tst_rng r;
    uint32_t l;
    llmkv_stats st;
    if (!m || !before || !after) {
        TST_CHECK(t, 0);
        goto done;
    }
    r.s = q4c_seed(0xc0e4ull);
    m->H = H;
    m->D = D;
    m->ps = PS;
    m->vt = LLMKV_DTYPE_F16;
    m->row = (size_t)H * D;
    m->max_pages = 4;
    m->maxlen = 4 * PS;
    d.max_seqs = 4;
    TST_REQUIRE(t, llmkv_cache_create(&d, &kv) == LLMKV_OK);
    TST_REQUIRE(t, qm_seq_alloc(m, &m->s[0]));

    /* a: 13 tokens (page 0 full, 5 at F16 in page 1), then 2 reserved */
    OK(t, llmkv_seq_create(kv, &s[0]));
    m->s[0].id = s[0];
    m->s[0].live = 1;
    OK(t, llmkv_reserve(kv, s[0], 13));
    m->s[0].len = 13;
    for (l = 0; l < 2; ++l) {
        gen_keys(&r, kx, 13, H, D, 0);
        gen_values(&r, vx, (size_t)13 * H * D);
        OK(t, llmkv_put(kv, s[0], l, 13, kx, 0, vx, 0, LLMKV_DTYPE_F32));
        qm_put(m, &m->s[0], l, 13, kx, vx);
    }
    OK(t, llmkv_reserve(kv, s[0], 2)); /* stays in page 1: no copy, no page */
    m->s[0].len = 15;
    /* b: a fork; page 1 (with a's reserved slots) is now shared */
    OK(t, llmkv_fork(kv, s[0], &s[1]));
    TST_REQUIRE(t, qm_seq_copy(m, &m->s[1], &m->s[0]));
    m->s[1].id = s[1];
    /* the hog takes every free page */
    OK(t, llmkv_seq_create(kv, &hog));
    OK(t, llmkv_cache_stats(kv, &st));
    OK(t, llmkv_reserve(kv, hog, st.n_pages_free * PS));
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_free, 0);
    TST_CHECK(t, qm_check(t, &lg, kv, m, 0, kb, vb) && qm_check(t, &lg, kv, m, 1, kb, vb));

    cow_take(t, kv, s, 13, before);
    gen_keys(&r, kx, 16, H, D, 0);
    gen_values(&r, vx, (size_t)16 * H * D);
    TST_EQ(t, llmkv_put(kv, s[0], 0, 2, kx, 0, vx, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_PAGES);
    TST_EQ(t, llmkv_put(kv, s[1], 1, 2, kx, 0, vx, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_PAGES);
    TST_EQ(t, llmkv_put(kv, s[0], 1, 9, kx, 0, vx, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_PAGES); /* rewrites into page 0 */
    TST_EQ(t, llmkv_put(kv, s[1], 0, 15, kx, 0, NULL, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_PAGES);
    TST_EQ(t, llmkv_reserve(kv, s[1], 3), LLMKV_ERR_OUT_OF_PAGES); /* must copy the shared tail and take a page */
    TST_EQ(t, llmkv_reserve(kv, s[0], 1), LLMKV_ERR_OUT_OF_PAGES);
    cow_take(t, kv, s, 13, after);
    TST_CHECK(t, memcmp(before, after, sizeof *before) == 0);
    TST_CHECK(t, cache_ok(kv));
    TST_CHECK(t, qm_check(t, &lg, kv, m, 0, kb, vb) && qm_check(t, &lg, kv, m, 1, kb, vb));

    /* b truncated inside the shared full page 0: b's slots 0..4 become F16
       of their dequantized values; a's page 0 is untouched */
    OK(t, llmkv_truncate(kv, s[1], 5));
    qm_truncate(m, &m->s[1], 5);
    TST_CHECK(t, cache_ok(kv));
    TST_CHECK(t, qm_check(t, &lg, kv, m, 0, kb, vb) && qm_check(t, &lg, kv, m, 1, kb, vb));

    /* pages back: a's puts copy page 1 and complete it */
    OK(t, llmkv_truncate(kv, hog, 0));
    for (l = 0; l < 2; ++l) {
        gen_keys(&r, kx, 2, H, D, 0);
        OK(t, llmkv_put(kv, s[0], l, 2, kx, 0, vx, 0, LLMKV_DTYPE_F32));
        qm_put(m, &m->s[0], l, 2, kx, vx);
    }
    TST_CHECK(t, cache_ok(kv));
    TST_CHECK(t, qm_check(t, &lg, kv, m, 0, kb, vb) && qm_check(t, &lg, kv, m, 1, kb, vb));
    /* b refills page 0 (a copy: a still holds it) and re-quantizes it from
       the F16 copies and 3 new keys; then a 4th, and a rewrite of 6 */
    OK(t, llmkv_reserve(kv, s[1], 3));
    m->s[1].len += 3;
    for (l = 0; l < 2; ++l) {
        gen_keys(&r, kx, 3, H, D, 0);
        OK(t, llmkv_put(kv, s[1], l, 3, kx, 0, vx, 0, LLMKV_DTYPE_F32));
        qm_put(m, &m->s[1], l, 3, kx, vx);
    }
    TST_CHECK(t, qm_check(t, &lg, kv, m, 0, kb, vb) && qm_check(t, &lg, kv, m, 1, kb, vb));
    OK(t, llmkv_reserve(kv, s[1], 1));
    m->s[1].len += 1;
    for (l = 0; l < 2; ++l) {
        gen_keys(&r, kx, 6, H, D, 0);
        OK(t, llmkv_put(kv, s[1], l, 6, kx, 0, vx, 0, LLMKV_DTYPE_F32));
        qm_put(m, &m->s[1], l, 6, kx, vx);
    }
    TST_CHECK(t, cache_ok(kv));
    TST_CHECK(t, qm_check(t, &lg, kv, m, 0, kb, vb) && qm_check(t, &lg, kv, m, 1, kb, vb));
done:
    llmkv_cache_destroy(kv);
    if (m) {
        qm_seq_release(&m->s[0]);
        qm_seq_release(&m->s[1]);
    }
    free(m);
    free(before);
    free(after);
}

/* A small Q4C workload: fills, forks, truncates inside a full page,
   rewrites, frees; checks the model after each step. V: F32, F16 or BF16
   (the model's V is a float type). */
static void q4c_workload(tst* t, llmkv_cache* kv, uint32_t H, uint32_t D, uint32_t ps, llmkv_dtype vt) {
    qm* m = (qm*)calloc(1, sizeof(qm));
    float *kx = NULL, *vx = NULL, *kb = NULL, *vb = NULL;
    qlog lg = {0};
    tst_rng r;
    uint32_t l, i, step;
    size_t n;
    if (!m) {
        TST_CHECK(t, 0);
        return;
    }
    m->H = H;
    m->D = D;
    m->ps = ps;
    m->vt = vt;
    m->row = (size_t)H * D;
    m->max_pages = 4;
    m->maxlen = 4 * ps;
    n = (size_t)m->maxlen * m->row;
    kx = (float*)malloc(n * sizeof(float));
    vx = (float*)malloc(n * sizeof(float));
    kb = (float*)malloc(n * sizeof(float));
    vb = (float*)malloc(n * sizeof(float));
    r.s = 0xf0a1ull;
    if (!kx || !vx || !kb || !vb || !qm_seq_alloc(m, &m->s[0])) {
        TST_CHECK(t, 0);
        goto done;
    }
    OK(t, llmkv_seq_create(kv, &m->s[0].id));
    m->s[0].live = 1;
    for (step = 0; step < 6; ++step) {
        qm_seq* s = &m->s[step % 2 && m->s[1].live ? 1 : 0];
        uint32_t add = step == 0 ? ps + 3 : 2, put = step == 3 ? add + ps / 2 + 1 : add;
        if (s->len + add > m->maxlen) add = 0;
        if (put > s->len + add) put = s->len + add;
        OK(t, llmkv_reserve(kv, s->id, add));
        s->len += add;
        for (l = 0; l < QM_LAYERS; ++l) {
            gen_keys(&r, kx, put, H, D, 0);
            gen_values(&r, vx, (size_t)put * m->row);
            OK(t, llmkv_put(kv, s->id, l, put, kx, 0, vx, 0, LLMKV_DTYPE_F32));
            qm_put(m, s, l, put, kx, vx);
        }
        if (step == 1) {
            llmkv_seq h;
            OK(t, llmkv_fork(kv, m->s[0].id, &h));
            if (!qm_seq_copy(m, &m->s[1], &m->s[0])) break;
            m->s[1].id = h;
        }
        if (step == 2) { /* inside page 0, full and shared with the fork */
            OK(t, llmkv_truncate(kv, m->s[0].id, ps / 2 + 1));
            qm_truncate(m, &m->s[0], ps / 2 + 1);
        }
        if (step == 4) {
            OK(t, llmkv_seq_free(kv, m->s[1].id));
            qm_seq_release(&m->s[1]);
        }
        TST_CHECK(t, cache_ok(kv));
        for (i = 0; i < 2; ++i)
            if (m->s[i].live) TST_CHECK(t, qm_check(t, &lg, kv, m, i, kb, vb));
    }
    for (i = 0; i < 2; ++i)
        if (m->s[i].live) OK(t, llmkv_seq_free(kv, m->s[i].id));
done:
    qm_seq_release(&m->s[0]);
    qm_seq_release(&m->s[1]);
    free(m);
    free(kx);
    free(vx);
    free(kb);
    free(vb);
}

/* Creation with Q4C keys, failing the k-th allocation for k = 1, 2, ...:
   OUT_OF_MEMORY with nothing left allocated, until creation succeeds;
   then the workload allocates nothing and destroy frees everything. */
static void test_q4c_alloc_faults(tst* t) {
    int shape;
    for (shape = 0; shape < 2; ++shape) {
        long k;
        llmkv_desc d = shape ? q4c_desc(2, 2, 33, 5, 12, LLMKV_DTYPE_F32) : q4c_desc(2, 3, 64, 16, 12, LLMKV_DTYPE_F16);
        d.max_seqs = 4;
        for (k = 1; k <= 1000; ++k) {
            falloc a;
            llmkv_cache* kv = NULL;
            llmkv_result res;
            memset(&a, 0, sizeof a);
            a.fail_at = k;
            d.allocator.alloc = f_alloc;
            d.allocator.free = f_free;
            d.allocator.user = &a;
            res = llmkv_cache_create(&d, &kv);
            if (a.calls < k) { /* nothing failed */
                long calls = a.calls;
                TST_EQ(t, res, LLMKV_OK);
                if (res == LLMKV_OK) {
                    a.fail_all = 1;
                    q4c_workload(t, kv, d.n_kv_heads, d.head_dim, d.page_size, d.v_dtype);
                    if (a.calls != calls) fprintf(stderr, "  the Q4C cache allocated after creation\n");
                    TST_EQ(t, a.calls, calls);
                    llmkv_cache_destroy(kv);
                }
                TST_EQ(t, a.n_blocks, 0);
                TST_EQ(t, a.errors, 0);
                f_done(&a);
                break;
            }
            if (res != LLMKV_ERR_OUT_OF_MEMORY || a.n_blocks)
                fprintf(stderr, "  allocation %ld failed: result %d, %lu blocks left\n", k, (int)res,
                        (unsigned long)a.n_blocks);
            TST_EQ(t, res, LLMKV_ERR_OUT_OF_MEMORY);
            TST_CHECK(t, kv == NULL);
            TST_EQ(t, a.n_blocks, 0);
            TST_EQ(t, a.errors, 0);
            if (res == LLMKV_OK) llmkv_cache_destroy(kv);
            f_done(&a);
        }
        TST_CHECK(t, k <= 1000);
    }
}

/* llmkv_cache_create_in with Q4C keys: the buffer llmkv_cache_memory_size
   asks for suffices (a smaller one is refused), nothing past it is
   written, and no allocator is called. */
static void test_q4c_create_in(tst* t) {
    enum { GUARD = 4096 };
    llmkv_desc d = q4c_desc(2, 2, 33, 5, 10, LLMKV_DTYPE_BF16);
    falloc a;
    size_t size = 0, i;
    unsigned char* mem;
    llmkv_cache* kv = NULL;
    memset(&a, 0, sizeof a);
    a.fail_all = 1;
    d.allocator.alloc = f_alloc;
    d.allocator.free = f_free;
    d.allocator.user = &a;
    d.max_seqs = 3;
    OK(t, llmkv_cache_memory_size(&d, &size, NULL));
    mem = (unsigned char*)malloc(size + GUARD + 3);
    TST_REQUIRE(t, mem != NULL);
    memset(mem, 0xA5, size + GUARD + 3);
    TST_EQ(t, llmkv_cache_create_in(&d, mem + 3, size - 1, &kv), LLMKV_ERR_BUFFER_TOO_SMALL);
    TST_EQ(t, llmkv_cache_create_in(&d, mem + 3, size, &kv), LLMKV_OK);
    if (kv) {
        llmkv_stats st;
        OK(t, llmkv_cache_stats(kv, &st));
        /* F16 staging: max_seqs x layers x heads x page_size x head_dim x 2 */
        TST_EQ(t, st.staging_bytes, 3 * 2 * 2 * 5 * 33 * 2);
        TST_CHECK(t, st.pool_bytes + st.metadata_bytes + st.staging_bytes <= size);
        q4c_workload(t, kv, 2, 33, 5, LLMKV_DTYPE_BF16);
        llmkv_cache_destroy(kv);
    }
    for (i = 0; i < GUARD; ++i)
        if (mem[3 + size + i] != 0xA5) {
            fprintf(stderr, "  create_in wrote %lu bytes past its buffer\n", (unsigned long)i + 1);
            TST_CHECK(t, 0);
            break;
        }
    for (i = 0; i < 3; ++i) TST_EQ(t, mem[i], 0xA5);
    TST_EQ(t, a.calls, 0);
    free(mem);
}

/* ------------------------------------------------------------------------ */

void suite_q4c(tst* t) {
    TST_RUN(t, test_q4c_bad_arguments);
    TST_RUN(t, test_q4c_sizes);
    TST_RUN(t, test_q4c_rules_small);
    TST_RUN(t, test_q4c_put_gather);
    TST_RUN(t, test_q4c_special_values);
    TST_RUN(t, test_q4c_zero_extremes);
    TST_RUN(t, test_q4c_model_random);
    TST_RUN(t, test_q4c_cow_out_of_pages);
    TST_RUN(t, test_q4c_alloc_faults);
    TST_RUN(t, test_q4c_create_in);
    TST_RUN(t, test_q4c_attention);
    TST_RUN(t, test_q4c_outlier_accuracy);
}
