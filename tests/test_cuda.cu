/* GPU backend tests: llmkv_cuda.cuh (or, built with -DLLMKV_TEST_HIP by
   hipcc, llmkv_hip.h) against the CPU path of llmkv.h.

   Mirror design. Every case makes two caches from one descriptor: a host
   cache (the reference: llmkv_put, llmkv_gather, llmkv_attend) and a
   metadata-only cache driven by llmkv_cuda, and applies the same manager
   calls to both (create, reserve, fork, truncate, prefix sharing, publish,
   free), checking that both answer alike. Each step builds a batch on each
   cache, uploads the metadata-only one (which runs its queued page copies)
   and writes the same random K/V bytes with llmkv_put on the host and
   llmkv_cuda_put on the device. Then:
     - storage, bit-exact: llmkv_gather vs llmkv_cuda_gather (dst DEFAULT,
       F32 and F16 or BF16, plus a strided sub-range) for every sequence and
       layer, compared with memcmp; and the raw page bytes (codes and
       scales) of every written slot whenever both caches gave a sequence
       the same pages, so put is checked byte for byte against llmkv_put;
     - decode: llmkv_cuda_decode vs llmkv_attend on the host mirror and vs an
       exact (double) attention over the stored values (tolerances below).
   The device pool is filled with 0xFF bytes when a case starts (NaN in every
   storage type), so a kernel that reads a slot nobody wrote (past the end of
   a sequence, the part of a page a copy skipped) produces NaN and fails; q
   rows are padded with NaN (a read past a row shows) and outputs are
   guarded by a canary (a write past a row or buffer shows).

   Usage: test_cuda [filter] (runs the tests whose name contains filter).
   LLMKV_TEST_SEED changes the random seed; LLMKV_TEST_VERBOSE=1 prints each
   case. Per-test times go to stderr; the last line on stdout is
   "N passed, N failed" and the exit status is nonzero on any failure.
   Without a device: "no CUDA device: GPU tests not run", "0 passed,
   0 failed", exit status 0.

   The same source runs without a GPU on the CPU emulator of tests/gpu_emu.h
   (the kernels as C++, one fiber per GPU thread; about 1.5 minutes):
       g++ -std=c++17 -O2 -I. -Itests -include tests/gpu_emu.h -x c++ \
           tests/test_cuda.cu -o test_cuda_emu
   (add -DLLMKV_EMU_SMS=132 for the split counts of an H100). test_graph
   (a decode captured in a CUDA graph and replayed) needs a real device and
   is compiled only for it. */
#define LLMKV_IMPLEMENTATION
#define LLMKV_CUDA_IMPLEMENTATION
#ifdef LLMKV_TEST_HIP
#include "llmkv_hip.h"
#else
#include "llmkv_cuda.cuh"
#endif
#include "test_util.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <time.h>

/* ------------------------------------------------------------------------ */
/* Tolerances (decode only; put, gather, copies and swap are bit-exact)      */
/* ------------------------------------------------------------------------ */

/* GPU vs exact attention in double over the stored (dequantized) K/V: the
   GPU dequantizes exactly and computes in F32 (q * scale rounded, F32 dot
   products of head_dim terms, online softmax with F32 sums over at most a
   few thousand keys per lane group, split-K merged by log-sum-exp), which
   leaves errors of order 1e-6 relative (the same kernels on the emulator of
   tests/gpu_emu.h stay below 1% of this bound). The output is a convex
   combination of the V vectors the row sees, so its error is measured
   against vmax, the largest |V| element among them:
   |gpu - ref| <= TOL_REF * vmax; the log-sum-exp:
   |gpu - ref| <= TOL_REF * (1 + |ref|). */
#define TOL_REF 2e-4
/* GPU vs llmkv_attend (pool NULL, path AUTO): as the issue asks,
   |gpu - cpu| <= TOL_CPU_OUT * (1 + max |cpu|) over a (row, head)
   and |lse_gpu - lse_cpu| <= TOL_CPU_LSE absolute. AUTO may be
   AVX512_BF16, which rounds the softmax weights of BF16 values to BF16
   (up to 2^-9 max|V| ~ 1.95e-3 for the |V| <= 1 used here), hence 3e-3
   rather than 2e-3. Where AUTO would score Q4 keys against an int8-rounded
   query (AVX512_VNNI / AVX512_BF16 with head_dim % 128 == 0: an error of
   order 1e-2), the comparison uses LLMKV_CPU_PATH_AVX512 (F32 arithmetic)
   instead. A row that sees no key must give 0 and lse -inf on every side. */
#define TOL_CPU_OUT 3e-3
#define TOL_CPU_LSE 1e-3

/* ------------------------------------------------------------------------ */
/* Small helpers                                                            */
/* ------------------------------------------------------------------------ */

#define MAX_MSGS 20      /* failure messages printed per mirror (counted all the same) */
#define MAX_BSEQS 16     /* sequences per batch */
#define GUARD 64         /* canary floats before and after decode outputs */
#define CANARY 0xA5C3E10Fu
#define RAW_MAX ((uint64_t)512 << 20) /* pools up to this size get the raw page comparison */

static cudaStream_t g_stream;
static double g_worst_ref, g_worst_cpu; /* largest error / bound seen (printed at the end) */
static unsigned long long g_seed = 0x6c6c6d6b76637564ull;
static int g_verbose;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static float f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static uint32_t bits_of_f32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static int is_quant(llmkv_dtype t) {
    return t == LLMKV_DTYPE_Q8 || t == LLMKV_DTYPE_Q4 || t == LLMKV_DTYPE_FP8;
}

/* Bytes of one element of a caller buffer type (F32, F16, BF16). */
static size_t elem_size(llmkv_dtype t) { return t == LLMKV_DTYPE_F32 ? 4 : 2; }

/* The type gather writes for a part stored as `stored` when asked for `asked`. */
static llmkv_dtype gather_type(llmkv_dtype stored, llmkv_dtype asked) {
    if (asked != LLMKV_DTYPE_DEFAULT) return asked;
    return is_quant(stored) ? LLMKV_DTYPE_F32 : stored;
}

static const char* tname(llmkv_dtype t) { return t == LLMKV_DTYPE_DEFAULT ? "default" : llmkv_dtype_name(t); }

/* The CPU path llmkv_attend is compared with (see TOL_CPU_OUT). */
static llmkv_cpu_path ref_path(llmkv_dtype kt, uint32_t D) {
    return tst_int8_query_used(llmkv_cpu_path_auto(), kt, D) ? LLMKV_CPU_PATH_AVX512 : LLMKV_CPU_PATH_AUTO;
}

/* A failed check outside a mirror, with a printf-style message. */
static void tfail(tst* t, qlog* lg, int line, const char* fmt, ...) {
    va_list ap;
    t->cur_failures++;
    if (lg->n++ >= MAX_MSGS) return;
    fprintf(stderr, "  FAIL %s:%d: ", __FILE__, line);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

/* A CUDA runtime call that must succeed. */
static int cu_check(tst* t, qlog* lg, cudaError_t e, const char* what, int line) {
    if (e == cudaSuccess) return 1;
    tfail(t, lg, line, "%s: %s", what, cudaGetErrorString(e));
    return 0;
}
#define CU(t, lg, call) cu_check((t), (lg), (call), #call, __LINE__)

/* An llmkv call with an expected result. */
static int expect_r(tst* t, qlog* lg, llmkv_result got, llmkv_result want, const char* what, const char* ctx,
                    int line) {
    if (got == want) return 1;
    tfail(t, lg, line, "[%s] %s returned %s, expected %s", ctx, what, llmkv_result_string(got),
          llmkv_result_string(want));
    return 0;
}
#define T_EXPECT(t, lg, ctx, call, want) expect_r((t), (lg), (call), (want), #call, (ctx), __LINE__)

static void* dev_alloc(tst* t, qlog* lg, size_t bytes) {
    void* p = NULL;
    if (!CU(t, lg, cudaMalloc(&p, bytes ? bytes : 1))) return NULL;
    return p;
}

static void dev_free(void* p) {
    if (p) (void)cudaFree(p);
}

/* Host to device on the test stream; returns when the copy is done. */
static int h2d(tst* t, qlog* lg, void* d, const void* h, size_t n) {
    if (n == 0) return 1;
    return CU(t, lg, cudaMemcpyAsync(d, h, n, cudaMemcpyHostToDevice, g_stream)) &&
           CU(t, lg, cudaStreamSynchronize(g_stream));
}

/* Device to host after everything enqueued on the test stream. */
static int d2h(tst* t, qlog* lg, void* h, const void* d, size_t n) {
    if (!CU(t, lg, cudaStreamSynchronize(g_stream))) return 0;
    if (n == 0) return 1;
    return CU(t, lg, cudaMemcpyAsync(h, d, n, cudaMemcpyDeviceToHost, g_stream)) &&
           CU(t, lg, cudaStreamSynchronize(g_stream));
}

/* Fills device bytes (after the test stream's work; done on return). */
static int dev_fill(tst* t, qlog* lg, void* d, int byte, size_t n) {
    return CU(t, lg, cudaStreamSynchronize(g_stream)) && CU(t, lg, cudaMemset(d, byte, n)) &&
           CU(t, lg, cudaDeviceSynchronize());
}

static void* xmalloc(size_t n) {
    void* p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "test_cuda: out of host memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

static void fill_canary(float* p, size_t n) {
    size_t i;
    uint32_t c = CANARY;
    for (i = 0; i < n; ++i) memcpy(p + i, &c, 4);
}

static int is_canary(const float* p) { return bits_of_f32(*p) == CANARY; }

/* ------------------------------------------------------------------------ */
/* Random data                                                              */
/* ------------------------------------------------------------------------ */

/* Values llmkv_quantize treats specially, and rounding cases: zeros of both
   signs, infinities, quiet NaN of both signs (signalling NaN are left out:
   the float types may quiet them on either side), the F16 limits (65504,
   65519 rounds to 65504, 65520 to infinity), F32 and F16 subnormals, huge
   values, ties of F16 and BF16 rounding, the FP8 limit 448. */
static float special_value(tst_rng* r) {
    static const uint32_t bits[] = {0x00000000u, 0x80000000u, 0x7f800000u, 0xff800000u, 0x7fc00000u,
                                    0xffc00000u, 0x477fe000u /* 65504 */, 0x477fef00u /* 65519 */,
                                    0x477ff000u /* 65520 */, 0xc77fe000u, 0x00000001u, 0x80012345u,
                                    0x33800000u /* 2^-24 */, 0x32800000u /* 2^-26 */, 0x7f7fffffu,
                                    0xff000000u, 0x3f801000u /* 1 + 2^-11 */, 0x3f808000u /* 1 + 2^-8 */,
                                    0x45001000u /* 2049 */, 0x43e00000u /* 448 */, 0xc3e08000u /* -449 */};
    return f32_from_bits(bits[tst_below(r, (unsigned)(sizeof bits / sizeof bits[0]))]);
}

static float signed_zero(tst_rng* r) { return tst_below(r, 2) ? 0.0f : -0.0f; }

/* One head vector for the put/gather tests: a random mix of ordinary
   ranges and the cases the quantizers treat specially (groups of 32 with
   only zeros, a zero minimum or maximum, no finite element, one finite
   element, infinities and NaN among ordinary values). */
static void gen_special(tst_rng* r, float* x, uint32_t n) {
    static const float amps[] = {1.0f, 1e-3f, 300.0f, 7e4f, 1e-6f, 3e38f};
    uint32_t i, kind = tst_below(r, 12);
    float a = amps[tst_below(r, 6)];
    for (i = 0; i < n; ++i) {
        switch (kind) {
        case 3: x[i] = signed_zero(r); break;                                       /* zeros only */
        case 4: x[i] = i % 32 == 0 ? 0.0f : tst_below(r, 4) ? -0.0f : f32_from_bits(0x7fc00000u); break;
        case 5: x[i] = tst_below(r, 3) ? fabsf(tst_float(r)) : signed_zero(r); break;  /* minimum zero */
        case 6: x[i] = tst_below(r, 3) ? -fabsf(tst_float(r)) : signed_zero(r); break; /* maximum zero */
        case 7:
        case 8: x[i] = tst_below(r, 6) ? tst_float(r) * a : special_value(r); break;
        case 9: x[i] = f32_from_bits(tst_below(r, 3) == 0 ? 0x7fc00000u : tst_below(r, 2) ? 0x7f800000u : 0xff800000u);
            break;                                                                   /* no finite element */
        case 10: x[i] = tst_below(r, 3) ? signed_zero(r) : f32_from_bits(tst_below(r, 2) ? 0x7f800000u : 0xff800000u);
            break;
        case 11: x[i] = i == n / 2 ? (tst_below(r, 2) ? special_value(r) : tst_float(r) * a) : signed_zero(r); break;
        default: x[i] = tst_float(r) * a; break;
        }
    }
}

/* Writes n floats as a caller row of type src (F32, F16, BF16). */
static void store_src(llmkv_dtype src, const float* x, uint32_t n, unsigned char* dst) {
    uint32_t i;
    for (i = 0; i < n; ++i) {
        if (src == LLMKV_DTYPE_F32) {
            memcpy(dst + 4 * (size_t)i, &x[i], 4);
        } else {
            uint16_t h = src == LLMKV_DTYPE_F16 ? llmkv_f32_to_f16(x[i]) : llmkv_f32_to_bf16(x[i]);
            memcpy(dst + 2 * (size_t)i, &h, 2);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* The mirror: a host cache and a metadata-only cache with its llmkv_cuda    */
/* ------------------------------------------------------------------------ */

typedef struct mseq {
    llmkv_seq h; /* in the host cache */
    llmkv_seq g; /* in the metadata-only cache */
} mseq;

typedef struct mirror {
    char name[240];            /* the case, printed with every failure */
    tst* t;
    qlog lg;
    llmkv_desc desc;           /* effective descriptor of the host cache */
    llmkv_layout lay;
    llmkv_cache* host;
    llmkv_cache* meta;
    llmkv_cuda* gpu;
    llmkv_batch* hb;           /* the current step's batch on each side */
    llmkv_batch* gb;
    uint32_t max_btokens;
    mseq cur[MAX_BSEQS];       /* the sequences of the current batches */
    uint32_t cur_n;
    int special;               /* put special values (zeros, infinities, NaN, ...) */
    uint32_t step;             /* steps so far: rotates source types and strides */
    tst_rng rng;
} mirror;

#define MFAIL(m, ...)                                                                   \
    do {                                                                                \
        (m)->t->cur_failures++;                                                         \
        if ((m)->lg.n++ < MAX_MSGS) {                                                   \
            fprintf(stderr, "  FAIL %s:%d [%s]: ", __FILE__, __LINE__, (m)->name);      \
            fprintf(stderr, __VA_ARGS__);                                               \
            fputc('\n', stderr);                                                        \
        }                                                                               \
    } while (0)

static int m_expect(mirror* m, llmkv_result got, llmkv_result want, const char* what, int line) {
    if (got == want) return 1;
    m->t->cur_failures++;
    if (m->lg.n++ < MAX_MSGS)
        fprintf(stderr, "  FAIL %s:%d [%s]: %s returned %s, expected %s\n", __FILE__, line, m->name, what,
                llmkv_result_string(got), llmkv_result_string(want));
    return 0;
}
#define M_EXPECT(m, call, want) m_expect((m), (call), (want), #call, __LINE__)
#define M_CU(m, call) cu_check((m)->t, &(m)->lg, (call), #call, __LINE__)

/* Creates both caches (desc->storage is ignored), the GPU context (gd may be
   NULL) and a batch of up to max_btokens rows on each side, and fills the
   device pool with 0xFF bytes. Returns 0 (reported) on failure; m_free
   releases whatever was made either way. */
static int m_init(mirror* m, tst* t, const llmkv_desc* d, const llmkv_cuda_desc* gd, uint32_t max_btokens,
                  int special, const char* name) {
    llmkv_desc hd = *d, md = *d;
    void *base = NULL, *meta_base = NULL;
    uint64_t bytes = 0, meta_bytes = 0;
    memset(m, 0, sizeof *m);
    m->t = t;
    snprintf(m->name, sizeof m->name, "%s", name);
    m->special = special;
    m->max_btokens = max_btokens;
    m->rng.s = g_seed ^ (unsigned long long)strlen(name) * 0x9E3779B97F4A7C15ull;
    {
        size_t i;
        for (i = 0; name[i]; ++i) m->rng.s = m->rng.s * 1099511628211ull ^ (unsigned char)name[i];
    }
    if (g_verbose) fprintf(stderr, "  case %s\n", name);
    hd.storage = LLMKV_STORAGE_DEFAULT;
    md.storage = LLMKV_STORAGE_METADATA_ONLY;
    if (!M_EXPECT(m, llmkv_cache_create(&hd, &m->host), LLMKV_OK)) return 0;
    if (!M_EXPECT(m, llmkv_cache_create(&md, &m->meta), LLMKV_OK)) return 0;
    (void)llmkv_cache_desc(m->host, &m->desc);
    (void)llmkv_cache_layout(m->host, &m->lay);
    if (!M_EXPECT(m, llmkv_cuda_create(m->meta, gd, &m->gpu), LLMKV_OK)) return 0;
    if (!M_EXPECT(m, llmkv_batch_create(m->host, MAX_BSEQS, max_btokens, &m->hb), LLMKV_OK)) return 0;
    if (!M_EXPECT(m, llmkv_batch_create(m->meta, MAX_BSEQS, max_btokens, &m->gb), LLMKV_OK)) return 0;
    if (!M_EXPECT(m, llmkv_cuda_pool(m->gpu, &base, &bytes), LLMKV_OK)) return 0;
    (void)llmkv_cache_pool(m->meta, &meta_base, &meta_bytes); /* NULL base, the size the device pool needs */
    if (meta_base || bytes != meta_bytes || bytes != m->lay.page_bytes * m->desc.n_pages || !base) {
        MFAIL(m, "llmkv_cuda_pool: %llu bytes at %p, the cache says %llu", (unsigned long long)bytes, base,
              (unsigned long long)meta_bytes);
        return 0;
    }
    return dev_fill(t, &m->lg, base, 0xFF, (size_t)bytes);
}

static void m_free(mirror* m) {
    llmkv_batch_destroy(m->hb);
    llmkv_batch_destroy(m->gb);
    llmkv_cuda_destroy(m->gpu);
    llmkv_cache_destroy(m->meta);
    llmkv_cache_destroy(m->host);
    m->hb = m->gb = NULL;
    m->gpu = NULL;
    m->meta = m->host = NULL;
}

/* Both caches must still pass their invariant checker. */
static void m_check_caches(mirror* m) {
    char msg[256];
    if (llmkv_cache_check(m->host, msg, sizeof msg) != LLMKV_OK) MFAIL(m, "host cache: %s", msg);
    if (llmkv_cache_check(m->meta, msg, sizeof msg) != LLMKV_OK) MFAIL(m, "metadata-only cache: %s", msg);
}

/* --- Manager calls, applied to both caches ------------------------------- */

static int m_same(mirror* m, llmkv_result rh, llmkv_result rg, const char* what, int line) {
    if (rh == LLMKV_OK && rg == LLMKV_OK) return 1;
    m->t->cur_failures++;
    if (m->lg.n++ < MAX_MSGS)
        fprintf(stderr, "  FAIL %s:%d [%s]: %s: host %s, metadata-only %s\n", __FILE__, line, m->name, what,
                llmkv_result_string(rh), llmkv_result_string(rg));
    return 0;
}
#define M_BOTH(m, what, rh, rg) m_same((m), (rh), (rg), (what), __LINE__)

static int m_create(mirror* m, mseq* s) {
    return M_BOTH(m, "llmkv_seq_create", llmkv_seq_create(m->host, &s->h), llmkv_seq_create(m->meta, &s->g));
}

static int m_reserve(mirror* m, const mseq* s, uint32_t n) {
    return M_BOTH(m, "llmkv_reserve", llmkv_reserve(m->host, s->h, n), llmkv_reserve(m->meta, s->g, n));
}

static int m_reserve_many(mirror* m, const mseq* s, const uint32_t* n, uint32_t count) {
    llmkv_seq hs[MAX_BSEQS], gs[MAX_BSEQS];
    uint32_t i;
    for (i = 0; i < count; ++i) {
        hs[i] = s[i].h;
        gs[i] = s[i].g;
    }
    return M_BOTH(m, "llmkv_reserve_many", llmkv_reserve_many(m->host, hs, n, count),
                  llmkv_reserve_many(m->meta, gs, n, count));
}

static int m_reserve_tokens(mirror* m, const mseq* s, const llmkv_token* tok, uint32_t n) {
    return M_BOTH(m, "llmkv_reserve_tokens", llmkv_reserve_tokens(m->host, s->h, tok, n),
                  llmkv_reserve_tokens(m->meta, s->g, tok, n));
}

static int m_fork(mirror* m, const mseq* src, mseq* out) {
    return M_BOTH(m, "llmkv_fork", llmkv_fork(m->host, src->h, &out->h), llmkv_fork(m->meta, src->g, &out->g));
}

static int m_truncate(mirror* m, const mseq* s, uint32_t n) {
    return M_BOTH(m, "llmkv_truncate", llmkv_truncate(m->host, s->h, n), llmkv_truncate(m->meta, s->g, n));
}

static int m_seq_free(mirror* m, const mseq* s) {
    return M_BOTH(m, "llmkv_seq_free", llmkv_seq_free(m->host, s->h), llmkv_seq_free(m->meta, s->g));
}

static int m_publish(mirror* m, const mseq* s, int partial) {
    return M_BOTH(m, "llmkv_seq_publish", llmkv_seq_publish(m->host, s->h, partial),
                  llmkv_seq_publish(m->meta, s->g, partial));
}

/* Starts a sequence from a prompt on both sides; both must match the same
   number of cached tokens. */
static int m_create_prefix(mirror* m, const llmkv_token* prompt, uint32_t n, mseq* out, uint32_t* n_cached) {
    uint32_t nh = 0, ng = 0;
    if (!M_BOTH(m, "llmkv_seq_create_prefix", llmkv_seq_create_prefix(m->host, 0, prompt, n, &out->h, &nh),
                llmkv_seq_create_prefix(m->meta, 0, prompt, n, &out->g, &ng)))
        return 0;
    if (nh != ng) {
        MFAIL(m, "llmkv_seq_create_prefix matched %u tokens on the host, %u on the metadata-only cache", nh, ng);
        return 0;
    }
    *n_cached = nh;
    return 1;
}

/* The sequence's length (the same on both sides). */
static uint32_t m_len(mirror* m, const mseq* s) {
    uint32_t a = 0, b = 0;
    (void)llmkv_seq_length(m->host, s->h, &a);
    (void)llmkv_seq_length(m->meta, s->g, &b);
    if (a != b) MFAIL(m, "sequence lengths differ: host %u, metadata-only %u", a, b);
    return a;
}

static uint32_t pending_copies(llmkv_cache* c) {
    llmkv_stats st;
    memset(&st, 0, sizeof st);
    (void)llmkv_cache_stats(c, &st);
    return st.n_pending_copies;
}

/* --- One step ------------------------------------------------------------ */

/* One engine step on both caches: sequences s[0..n) with q[i] query rows
   each (their newest positions, already reserved). Builds both batches,
   uploads the metadata-only one (running its pending page copies) and
   writes random K and V rows for every layer from the same bytes:
   llmkv_put per sequence on the host, llmkv_cuda_put for the whole batch on
   the GPU (one call, or K and V in separate calls). The source type and
   row stride rotate with the step. Then marks the GPU side's sequences
   written (llmkv_seq_mark_written, for the prefix index). */
static int m_step(mirror* m, const mseq* s, const uint32_t* q, uint32_t n) {
    static const llmkv_dtype srcs[3] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16};
    llmkv_seq hs[MAX_BSEQS], gs[MAX_BSEQS];
    llmkv_batch_info hi, gi;
    const uint32_t D = m->lay.head_dim, nkv = m->lay.n_kv_heads, step = m->step++;
    const llmkv_dtype src = srcs[step % 3];
    const size_t es = elem_size(src), row = (size_t)nkv * D * es;
    const size_t pad = (step / 3) % 3 == 0 ? 0 : (step / 3) % 3 == 1 ? 3 * es : 64;
    const size_t stride = row + pad, stride_arg = pad ? stride : 0; /* 0: packed rows */
    unsigned char *hk = NULL, *hv = NULL;
    void *dk = NULL, *dv = NULL;
    float x[512];
    uint32_t i, r, h, layer, nt;
    int ok = 0;
    for (i = 0; i < n; ++i) {
        hs[i] = s[i].h;
        gs[i] = s[i].g;
        m->cur[i] = s[i];
    }
    m->cur_n = n;
    if (!M_EXPECT(m, llmkv_batch_build(m->hb, hs, q, n), LLMKV_OK)) return 0;
    if (!M_EXPECT(m, llmkv_batch_build(m->gb, gs, q, n), LLMKV_OK)) return 0;
    if (!M_EXPECT(m, llmkv_batch_get(m->hb, &hi), LLMKV_OK) || !M_EXPECT(m, llmkv_batch_get(m->gb, &gi), LLMKV_OK))
        return 0;
    if (hi.n_tokens != gi.n_tokens || memcmp(hi.seq_lens, gi.seq_lens, 4 * (size_t)n) != 0 ||
        memcmp(hi.qo_indptr, gi.qo_indptr, 4 * ((size_t)n + 1)) != 0 ||
        (hi.n_tokens && memcmp(hi.positions, gi.positions, 4 * (size_t)hi.n_tokens) != 0)) {
        MFAIL(m, "step %u: the host and metadata-only batches differ", step);
        return 0;
    }
    if (!M_EXPECT(m, llmkv_cuda_upload(m->gpu, m->gb, g_stream), LLMKV_OK)) return 0;
    nt = hi.n_tokens;
    if (nt == 0) { /* nothing to write; a put over no rows is a no-op */
        ok = M_EXPECT(m, llmkv_cuda_put(m->gpu, 0, NULL, 0, NULL, 0, src, g_stream), LLMKV_OK);
        goto mark;
    }
    hk = (unsigned char*)xmalloc(nt * stride);
    hv = (unsigned char*)xmalloc(nt * stride);
    dk = dev_alloc(m->t, &m->lg, nt * stride);
    dv = dev_alloc(m->t, &m->lg, nt * stride);
    if (!dk || !dv) goto done;
    for (layer = 0; layer < m->lay.n_layers; ++layer) {
        uint32_t mode = tst_below(&m->rng, 4); /* 0, 1: one call; 2: K then V; 3: V then K */
        memset(hk, 0xFF, nt * stride);          /* padding past a row reads as NaN */
        memset(hv, 0xFF, nt * stride);
        for (r = 0; r < nt; ++r)
            for (h = 0; h < nkv; ++h) {
                if (m->special) gen_special(&m->rng, x, D);
                else for (i = 0; i < D; ++i) x[i] = tst_float(&m->rng);
                store_src(src, x, D, hk + r * stride + h * D * es);
                if (m->special) gen_special(&m->rng, x, D);
                else for (i = 0; i < D; ++i) x[i] = tst_float(&m->rng);
                store_src(src, x, D, hv + r * stride + h * D * es);
            }
        for (i = 0; i < n; ++i) {
            const unsigned char* kr = hk + (size_t)hi.qo_indptr[i] * stride;
            const unsigned char* vr = hv + (size_t)hi.qo_indptr[i] * stride;
            if (q[i] == 0) continue;
            if (mode < 2) {
                if (!M_EXPECT(m, llmkv_put(m->host, hs[i], layer, q[i], kr, stride_arg, vr, stride_arg, src), LLMKV_OK))
                    goto done;
            } else if (!M_EXPECT(m, llmkv_put(m->host, hs[i], layer, q[i], kr, stride_arg, NULL, 0, src), LLMKV_OK) ||
                       !M_EXPECT(m, llmkv_put(m->host, hs[i], layer, q[i], NULL, 0, vr, stride_arg, src), LLMKV_OK)) {
                goto done;
            }
        }
        if (!h2d(m->t, &m->lg, dk, hk, nt * stride) || !h2d(m->t, &m->lg, dv, hv, nt * stride)) goto done;
        if (mode < 2) {
            if (!M_EXPECT(m, llmkv_cuda_put(m->gpu, layer, dk, stride_arg, dv, stride_arg, src, g_stream), LLMKV_OK))
                goto done;
        } else if (mode == 2) {
            if (!M_EXPECT(m, llmkv_cuda_put(m->gpu, layer, dk, stride_arg, NULL, 0, src, g_stream), LLMKV_OK) ||
                !M_EXPECT(m, llmkv_cuda_put(m->gpu, layer, NULL, 0, dv, stride_arg, src, g_stream), LLMKV_OK))
                goto done;
        } else {
            if (!M_EXPECT(m, llmkv_cuda_put(m->gpu, layer, NULL, 0, dv, stride_arg, src, g_stream), LLMKV_OK) ||
                !M_EXPECT(m, llmkv_cuda_put(m->gpu, layer, dk, stride_arg, NULL, 0, src, g_stream), LLMKV_OK))
                goto done;
        }
        if (!M_CU(m, cudaStreamSynchronize(g_stream))) goto done;
    }
    ok = 1;
mark:
    for (i = 0; i < n && ok; ++i) ok = M_EXPECT(m, llmkv_seq_mark_written(m->meta, gs[i], (uint32_t)hi.seq_lens[i]), LLMKV_OK);
done:
    free(hk);
    free(hv);
    dev_free(dk);
    dev_free(dv);
    return ok;
}

/* Grows each s[i] to target[i] positions in steps of at most max_btokens
   rows (so long prefills take several uploads), writing every new position.
   Returns the number of steps, -1 on failure. */
static int m_fill(mirror* m, const mseq* s, const uint32_t* target, uint32_t n) {
    uint32_t q[MAX_BSEQS], i;
    int steps = 0;
    for (;;) {
        uint32_t budget = m->max_btokens, any = 0;
        for (i = 0; i < n; ++i) {
            uint32_t len = m_len(m, &s[i]), want = target[i] > len ? target[i] - len : 0;
            q[i] = want < budget ? want : budget;
            budget -= q[i];
            any |= q[i];
            if (q[i] && !m_reserve(m, &s[i], q[i])) return -1;
        }
        if (!any) return steps;
        if (!m_step(m, s, q, n)) return -1;
        ++steps;
    }
}

/* --- Storage comparison --------------------------------------------------- */

/* Reports the first differing element of two gather outputs. */
static void report_gather_diff(mirror* m, const unsigned char* a, const unsigned char* b, size_t bytes,
                               size_t stride, size_t es, uint32_t pos, const char* part, uint32_t bi,
                               uint32_t layer, llmkv_dtype dst, const char* where) {
    size_t off = 0, row, e;
    uint32_t D = m->lay.head_dim;
    while (off < bytes && a[off] == b[off]) ++off;
    row = off / stride;
    e = (off % stride) / es;
    if (e >= (size_t)m->lay.n_kv_heads * D) {
        MFAIL(m, "%s: gather %s (batch seq %u, layer %u, dst %s): the padding after row %zu was written", where, part,
              bi, layer, tname(dst), row);
        return;
    }
    {
        const unsigned char* pa = a + row * stride + e * es;
        const unsigned char* pb = b + row * stride + e * es;
        uint32_t va = 0, vb = 0;
        memcpy(&va, pa, es);
        memcpy(&vb, pb, es);
        MFAIL(m,
              "%s: gather %s differs (batch seq %u, layer %u, dst %s) at position %zu, head %zu, element %zu: "
              "host 0x%0*x, gpu 0x%0*x",
              where, part, bi, layer, tname(dst), pos + row, e / D, e % D, (int)(2 * es), va, (int)(2 * es), vb);
    }
}

/* llmkv_gather on the host vs llmkv_cuda_gather of batch sequence bi,
   positions [pos, pos + n), one layer, type dst; parts: 1 K, 2 V, 3 both;
   pad: extra elements per output row (0: packed, stride 0). Buffers start
   as 0xCD bytes on both sides, so the padding is compared too. */
static void cmp_gather(mirror* m, uint32_t bi, uint32_t layer, uint32_t pos, uint32_t n, llmkv_dtype dst,
                       uint32_t pad, int parts, const char* where) {
    const llmkv_dtype tk = gather_type(m->lay.k.dtype, dst), tv = gather_type(m->lay.v.dtype, dst);
    const size_t ek = elem_size(tk), ev = elem_size(tv), hd = (size_t)m->lay.n_kv_heads * m->lay.head_dim;
    const size_t sk = (hd + pad) * ek, sv = (hd + pad) * ev; /* the row strides used */
    const size_t bk = n * sk, bv = n * sv;
    unsigned char *hk = (unsigned char*)xmalloc(bk), *hv = (unsigned char*)xmalloc(bv);
    unsigned char *gk = (unsigned char*)xmalloc(bk), *gv = (unsigned char*)xmalloc(bv);
    void* dk = dev_alloc(m->t, &m->lg, bk);
    void* dv = dev_alloc(m->t, &m->lg, bv);
    memset(hk, 0xCD, bk);
    memset(hv, 0xCD, bv);
    if (!dk || !dv || !dev_fill(m->t, &m->lg, dk, 0xCD, bk) || !dev_fill(m->t, &m->lg, dv, 0xCD, bv)) goto done;
    if (!M_EXPECT(m, llmkv_gather(m->host, m->cur[bi].h, layer, pos, n, parts & 1 ? hk : NULL, pad ? sk : 0,
                                  parts & 2 ? hv : NULL, pad ? sv : 0, dst),
                  LLMKV_OK))
        goto done;
    if (!M_EXPECT(m, llmkv_cuda_gather(m->gpu, bi, layer, pos, n, parts & 1 ? dk : NULL, pad ? sk : 0,
                                       parts & 2 ? dv : NULL, pad ? sv : 0, dst, g_stream),
                  LLMKV_OK))
        goto done;
    if (!d2h(m->t, &m->lg, gk, dk, bk) || !d2h(m->t, &m->lg, gv, dv, bv)) goto done;
    if (memcmp(hk, gk, bk) != 0) report_gather_diff(m, hk, gk, bk, sk, ek, pos, "K", bi, layer, dst, where);
    if (memcmp(hv, gv, bv) != 0) report_gather_diff(m, hv, gv, bv, sv, ev, pos, "V", bi, layer, dst, where);
done:
    free(hk);
    free(hv);
    free(gk);
    free(gv);
    dev_free(dk);
    dev_free(dv);
}

/* Raw page bytes: for every sequence of the current batch that both caches
   store in the same pages, the data and scale bytes of every written slot,
   every layer, part and head (pools up to RAW_MAX). */
static void m_check_raw(mirror* m, const char* where) {
    void *hbase = NULL, *dbase = NULL;
    uint64_t hbytes = 0, dbytes = 0;
    unsigned char* dev;
    uint32_t maxp = (m->desc.max_seq_len + m->lay.page_size - 1) / m->lay.page_size, i;
    uint32_t *hp = (uint32_t*)xmalloc(4 * (size_t)maxp), *gp = (uint32_t*)xmalloc(4 * (size_t)maxp);
    (void)llmkv_cache_pool(m->host, &hbase, &hbytes);
    (void)llmkv_cuda_pool(m->gpu, &dbase, &dbytes);
    if (hbytes != dbytes || hbytes > RAW_MAX) {
        free(hp);
        free(gp);
        return;
    }
    dev = (unsigned char*)xmalloc((size_t)dbytes);
    if (!d2h(m->t, &m->lg, dev, dbase, (size_t)dbytes)) goto done;
    for (i = 0; i < m->cur_n; ++i) {
        uint32_t nh = 0, ng = 0, L = m_len(m, &m->cur[i]), pos, l, part, h;
        int bad = 0;
        if (llmkv_seq_pages(m->host, m->cur[i].h, hp, maxp, &nh) != LLMKV_OK ||
            llmkv_seq_pages(m->meta, m->cur[i].g, gp, maxp, &ng) != LLMKV_OK) {
            MFAIL(m, "%s: llmkv_seq_pages failed", where);
            continue;
        }
        if (nh != ng || memcmp(hp, gp, 4 * (size_t)nh) != 0) continue; /* different pages: gathers only */
        for (pos = 0; pos < L && !bad; ++pos)
            for (l = 0; l < m->lay.n_layers && !bad; ++l)
                for (part = 0; part < 2 && !bad; ++part)
                    for (h = 0; h < m->lay.n_kv_heads && !bad; ++h) {
                        const llmkv_part_layout* pl = part ? &m->lay.v : &m->lay.k;
                        uint64_t base = (uint64_t)hp[pos / m->lay.page_size] * m->lay.page_bytes + l * m->lay.layer_stride;
                        uint64_t s = pos % m->lay.page_size;
                        uint64_t od = base + pl->offset + h * pl->head_stride + s * pl->slot_stride;
                        uint64_t os = base + pl->scale_offset + h * pl->scale_head_stride + s * pl->scale_slot_stride;
                        const char* what = NULL;
                        uint64_t o = 0, n = 0, k;
                        if (memcmp((unsigned char*)hbase + od, dev + od, (size_t)pl->slot_stride) != 0) {
                            what = "data";
                            o = od;
                            n = pl->slot_stride;
                        } else if (pl->scale_slot_stride &&
                                   memcmp((unsigned char*)hbase + os, dev + os, (size_t)pl->scale_slot_stride) != 0) {
                            what = "scale";
                            o = os;
                            n = pl->scale_slot_stride;
                        }
                        if (what) { /* the first differing byte and the 4-byte word around it */
                            const unsigned char *a = (unsigned char*)hbase + o, *b = dev + o;
                            for (k = 0; a[k] == b[k]; ++k) {}
                            k &= ~(uint64_t)3;
                            MFAIL(m,
                                  "%s: stored %s bytes differ (batch seq %u, position %u, layer %u, %s, head %u) from "
                                  "byte %llu of %llu: host %02x %02x %02x %02x, gpu %02x %02x %02x %02x",
                                  where, what, i, pos, l, part ? "V" : "K", h, (unsigned long long)k,
                                  (unsigned long long)n, a[k], a[k + 1 < n ? k + 1 : k], a[k + 2 < n ? k + 2 : k],
                                  a[k + 3 < n ? k + 3 : k], b[k], b[k + 1 < n ? k + 1 : k], b[k + 2 < n ? k + 2 : k],
                                  b[k + 3 < n ? k + 3 : k]);
                            bad = 1;
                        }
                    }
    }
done:
    free(dev);
    free(hp);
    free(gp);
}

/* Every sequence of the current batches: whole-sequence gathers of every
   layer as DEFAULT, F32 and F16 or BF16; a strided sub-range (K only every
   third step); and the raw bytes. */
static void m_check_storage(mirror* m, const char* where) {
    llmkv_batch_info bi;
    const llmkv_dtype dsts[3] = {LLMKV_DTYPE_DEFAULT, LLMKV_DTYPE_F32,
                                 m->step % 2 ? LLMKV_DTYPE_F16 : LLMKV_DTYPE_BF16};
    uint32_t i, l, d;
    if (!M_CU(m, cudaStreamSynchronize(g_stream))) return;
    if (!M_EXPECT(m, llmkv_batch_get(m->hb, &bi), LLMKV_OK)) return;
    for (i = 0; i < bi.n_seqs; ++i) {
        uint32_t L = (uint32_t)bi.seq_lens[i];
        if (L == 0) continue;
        for (l = 0; l < m->lay.n_layers; ++l)
            for (d = 0; d < 3; ++d) cmp_gather(m, i, l, 0, L, dsts[d], 0, 3, where);
        if (L >= 2)
            cmp_gather(m, i, m->step % m->lay.n_layers, L / 3, (L - L / 3 + 1) / 2, m->step % 2 ? LLMKV_DTYPE_DEFAULT : LLMKV_DTYPE_F32,
                       1 + m->step % 5, m->step % 3 ? 3 : 1, where);
    }
    m_check_raw(m, where);
}

/* --- Decode comparison ---------------------------------------------------- */

typedef struct dec_opts {
    uint32_t layer, n_q_heads;
    float scale, softcap;
    uint32_t window;
    int non_causal, lse;
    uint32_t q_pad, out_pad; /* floats past each row (0: packed rows, stride 0) */
    float q_amp;             /* q elements uniform in [-q_amp, q_amp) */
} dec_opts;

static dec_opts dec_plain(uint32_t n_q_heads) {
    dec_opts o;
    memset(&o, 0, sizeof o);
    o.n_q_heads = n_q_heads;
    o.q_amp = 1.0f;
    return o;
}

/* q.k multiply-adds a decode over the current batch costs the CPU side. */
static double m_decode_work(mirror* m, uint32_t n_q_heads) {
    llmkv_batch_info bi;
    double w = 0.0;
    uint32_t r;
    if (llmkv_batch_get(m->hb, &bi) != LLMKV_OK) return 0.0;
    for (r = 0; r < bi.n_tokens; ++r) w += (double)(bi.positions[r] + 1);
    return w * n_q_heads * m->lay.head_dim;
}

/* Exact attention of one query head over keys [lo, hi) of KV head kvh, in
   double. K, V: the sequence's F32 rows [L][n_kv][D]. */
static void ref_head(const float* q, const float* K, const float* V, uint32_t nkv, uint32_t D, uint32_t kvh,
                     uint32_t lo, uint32_t hi, double scale, double softcap, double* logit, double* out, double* lse,
                     double* vmax) {
    double M = -INFINITY, sum = 0.0;
    uint32_t j, d;
    for (d = 0; d < D; ++d) out[d] = 0.0;
    *vmax = 0.0;
    if (lo >= hi) {
        *lse = -INFINITY;
        return;
    }
    for (j = lo; j < hi; ++j) {
        const float* k = K + ((size_t)j * nkv + kvh) * D;
        double s = 0.0;
        for (d = 0; d < D; ++d) s += (double)q[d] * (double)k[d];
        s *= scale;
        if (softcap > 0.0) s = softcap * tanh(s / softcap);
        logit[j - lo] = s;
        if (s > M) M = s;
    }
    for (j = lo; j < hi; ++j) {
        const float* v = V + ((size_t)j * nkv + kvh) * D;
        double p = exp(logit[j - lo] - M);
        sum += p;
        for (d = 0; d < D; ++d) {
            out[d] += p * (double)v[d];
            if (fabs((double)v[d]) > *vmax) *vmax = fabs((double)v[d]);
        }
    }
    for (d = 0; d < D; ++d) out[d] /= sum;
    *lse = M + log(sum);
}

/* llmkv_cuda_decode over the uploaded batch vs llmkv_attend over the host
   batch and vs ref_head, for the rows of every sequence; checks the
   padding and guards of out and lse are untouched. */
static void m_check_decode(mirror* m, const dec_opts* o, const char* where) {
    llmkv_batch_info bi;
    llmkv_attn_desc ga, ca;
    const uint32_t D = m->lay.head_dim, nkv = m->lay.n_kv_heads, nq = o->n_q_heads, G = nq / nkv;
    const size_t qs = (size_t)nq * D + o->q_pad, os = (size_t)nq * D + o->out_pad;
    const double scale = o->scale > 0.0f ? (double)o->scale : 1.0 / sqrt((double)D);
    const float qnan = f32_from_bits(0x7fc00000u);
    float *hq = NULL, *gout = NULL, *cout = NULL, *glse = NULL, *clse = NULL, *K = NULL, *V = NULL;
    double *ref = NULL, *logit = NULL;
    void *dq = NULL, *dout = NULL, *dlse = NULL;
    uint32_t nt, i, r, h;
    size_t e, n_out, n_lse;
    if (!M_CU(m, cudaStreamSynchronize(g_stream))) return;
    if (!M_EXPECT(m, llmkv_batch_get(m->hb, &bi), LLMKV_OK)) return;
    nt = bi.n_tokens;
    n_out = 2 * GUARD + (size_t)nt * os;
    n_lse = 2 * GUARD + (size_t)nt * nq;
    hq = (float*)xmalloc(sizeof(float) * ((size_t)nt * qs));
    gout = (float*)xmalloc(sizeof(float) * n_out);
    glse = (float*)xmalloc(sizeof(float) * n_lse);
    cout = (float*)xmalloc(sizeof(float) * ((size_t)nt * os));
    clse = (float*)xmalloc(sizeof(float) * ((size_t)nt * nq));
    for (r = 0; r < nt; ++r)
        for (e = 0; e < qs; ++e) hq[r * qs + e] = e < (size_t)nq * D ? tst_float(&m->rng) * o->q_amp : qnan;
    fill_canary(gout, n_out);
    fill_canary(glse, n_lse);
    dq = dev_alloc(m->t, &m->lg, sizeof(float) * (size_t)nt * qs);
    dout = dev_alloc(m->t, &m->lg, sizeof(float) * n_out);
    dlse = dev_alloc(m->t, &m->lg, sizeof(float) * n_lse);
    if (!dq || !dout || !dlse || !h2d(m->t, &m->lg, dq, hq, sizeof(float) * (size_t)nt * qs) ||
        !h2d(m->t, &m->lg, dout, gout, sizeof(float) * n_out) || !h2d(m->t, &m->lg, dlse, glse, sizeof(float) * n_lse))
        goto done;
    memset(&ga, 0, sizeof ga);
    ga.layer = o->layer;
    ga.n_q_heads = nq;
    ga.q = (const float*)dq;
    ga.q_stride = o->q_pad ? qs * sizeof(float) : 0;
    ga.out = (float*)dout + GUARD;
    ga.out_stride = o->out_pad ? os * sizeof(float) : 0;
    ga.lse = o->lse ? (float*)dlse + GUARD : NULL;
    ga.scale = o->scale;
    ga.softcap = o->softcap;
    ga.window = o->window;
    ga.non_causal = o->non_causal;
    ca = ga;
    ca.q = hq;
    ca.out = cout;
    ca.lse = o->lse ? clse : NULL;
    ca.path = ref_path(m->lay.k.dtype, D);
    if (!M_EXPECT(m, llmkv_cuda_decode(m->gpu, &ga, g_stream), LLMKV_OK)) goto done;
    if (!M_EXPECT(m, llmkv_attend(m->host, m->hb, &ca, NULL), LLMKV_OK)) goto done;
    if (!d2h(m->t, &m->lg, gout, dout, sizeof(float) * n_out) || !d2h(m->t, &m->lg, glse, dlse, sizeof(float) * n_lse))
        goto done;
    /* Guards and padding untouched. */
    for (e = 0; e < GUARD; ++e)
        if (!is_canary(gout + e) || !is_canary(gout + n_out - 1 - e) || !is_canary(glse + e) ||
            !is_canary(glse + n_lse - 1 - e)) {
            MFAIL(m, "%s: decode wrote outside out / lse", where);
            break;
        }
    for (r = 0; r < nt; ++r)
        for (e = (size_t)nq * D; e < os; ++e)
            if (!is_canary(gout + GUARD + r * os + e)) {
                MFAIL(m, "%s: decode wrote the padding of out row %u", where, r);
                r = nt;
                break;
            }
    if (!o->lse)
        for (e = GUARD; e < n_lse - GUARD; ++e)
            if (!is_canary(glse + e)) {
                MFAIL(m, "%s: decode wrote lse although desc.lse was NULL", where);
                break;
            }
    ref = (double*)xmalloc(sizeof(double) * D);
    for (i = 0; i < bi.n_seqs; ++i) {
        const uint32_t L = (uint32_t)bi.seq_lens[i], q0 = (uint32_t)bi.qo_indptr[i];
        uint32_t q1 = (uint32_t)bi.qo_indptr[i + 1];
        const size_t kv_floats = (size_t)L * nkv * D;
        if (q0 == q1) continue;
        K = (float*)xmalloc(sizeof(float) * kv_floats);
        V = (float*)xmalloc(sizeof(float) * kv_floats);
        logit = (double*)xmalloc(sizeof(double) * L);
        if (!M_EXPECT(m, llmkv_gather(m->host, m->cur[i].h, o->layer, 0, L, K, 0, V, 0, LLMKV_DTYPE_F32), LLMKV_OK))
            q1 = q0; /* no reference for this sequence */
        for (r = q0; r < q1; ++r) {
            const uint32_t pos = (uint32_t)bi.positions[r];
            uint32_t lo, hi;
            if (o->non_causal) {
                lo = 0;
                hi = L;
            } else {
                hi = pos + 1;
                lo = o->window && pos + 1 > o->window ? pos + 1 - o->window : 0;
            }
            for (h = 0; h < nq; ++h) {
                const float* g = gout + GUARD + r * os + (size_t)h * D;
                const float* c = cout + r * os + (size_t)h * D;
                double rl, vmax, err_ref = 0.0, err_cpu = 0.0, cmax = 0.0, b_ref, b_cpu;
                uint32_t d;
                ref_head(hq + r * qs + (size_t)h * D, K, V, nkv, D, h / G, lo, hi, scale, o->softcap, logit, ref, &rl,
                         &vmax);
                for (d = 0; d < D; ++d) {
                    double a = fabs((double)g[d] - ref[d]), b = fabs((double)g[d] - (double)c[d]);
                    if (!(a <= err_ref)) err_ref = a; /* NaN sticks */
                    if (!(b <= err_cpu)) err_cpu = b;
                    if (fabs((double)c[d]) > cmax) cmax = fabs((double)c[d]);
                }
                b_ref = TOL_REF * vmax;
                b_cpu = TOL_CPU_OUT * (1.0 + cmax);
                if (b_ref > 0.0 && err_ref / b_ref > g_worst_ref) g_worst_ref = err_ref / b_ref;
                if (err_cpu / b_cpu > g_worst_cpu) g_worst_cpu = err_cpu / b_cpu;
                if (!(err_ref <= b_ref))
                    MFAIL(m,
                          "%s: out vs exact: batch seq %u (length %u), row %u (position %u), q head %u, keys [%u, %u): "
                          "max error %.3g > %.3g (vmax %.3g)",
                          where, i, L, r, pos, h, lo, hi, err_ref, b_ref, vmax);
                if (!(err_cpu <= b_cpu))
                    MFAIL(m,
                          "%s: out vs llmkv_attend: batch seq %u (length %u), row %u (position %u), q head %u: "
                          "max error %.3g > %.3g",
                          where, i, L, r, pos, h, err_cpu, b_cpu);
                if (o->lse) {
                    double gl = (double)glse[GUARD + (size_t)r * nq + h], cl = (double)clse[(size_t)r * nq + h];
                    if (isinf(rl)) {
                        if (!(isinf(gl) && gl < 0.0) || !(isinf(cl) && cl < 0.0))
                            MFAIL(m, "%s: lse of a row without keys: gpu %g, cpu %g (want -inf)", where, gl, cl);
                    } else {
                        if (!(fabs(gl - rl) <= TOL_REF * (1.0 + fabs(rl))))
                            MFAIL(m, "%s: lse vs exact: batch seq %u, row %u, q head %u: gpu %.9g, exact %.9g", where, i,
                                  r, h, gl, rl);
                        if (!(fabs(gl - cl) <= TOL_CPU_LSE))
                            MFAIL(m, "%s: lse vs llmkv_attend: batch seq %u, row %u, q head %u: gpu %.9g, cpu %.9g",
                                  where, i, r, h, gl, cl);
                    }
                }
            }
        }
        free(K);
        free(V);
        free(logit);
        K = V = NULL;
        logit = NULL;
    }
done:
    free(hq);
    free(gout);
    free(glse);
    free(cout);
    free(clse);
    free(ref);
    dev_free(dq);
    dev_free(dout);
    dev_free(dlse);
}

/* A snapshot of the device pool, to prove a failed call wrote nothing. */
static unsigned char* m_pool_snapshot(mirror* m) {
    void* base = NULL;
    uint64_t bytes = 0;
    unsigned char* p;
    (void)llmkv_cuda_pool(m->gpu, &base, &bytes);
    p = (unsigned char*)xmalloc((size_t)bytes);
    if (!d2h(m->t, &m->lg, p, base, (size_t)bytes)) memset(p, 0, (size_t)bytes);
    return p;
}

static void m_pool_unchanged(mirror* m, const unsigned char* snap, const char* where) {
    uint64_t bytes = 0;
    void* base = NULL;
    unsigned char* now = m_pool_snapshot(m);
    (void)llmkv_cuda_pool(m->gpu, &base, &bytes);
    if (memcmp(now, snap, (size_t)bytes) != 0) MFAIL(m, "%s: the device pool changed", where);
    free(now);
}

/* ------------------------------------------------------------------------ */
/* Put and gather: every storage type, odd head_dims, special values        */
/* ------------------------------------------------------------------------ */

static llmkv_desc make_desc(uint32_t n_layers, uint32_t nkv, uint32_t D, uint32_t ps, uint32_t n_pages, llmkv_dtype kt,
                            llmkv_dtype vt) {
    llmkv_desc d = tst_desc(n_layers, nkv, D, ps, n_pages, kt, vt);
    d.max_seqs = 16;
    return d;
}

/* Ragged steps around page boundaries with forks, truncation and a freed
   sequence; storage compared after every step. */
static void run_put_gather(mirror* m) {
    const uint32_t ps = m->lay.page_size;
    mseq s[5];
    uint32_t q[5], i;
    for (i = 0; i < 4; ++i)
        if (!m_create(m, &s[i])) return;
    /* lengths ps - 1, ps, ps + 1 and 2 ps + 3 (page boundaries) */
    q[0] = ps > 1 ? ps - 1 : 1;
    q[1] = ps;
    q[2] = ps + 1;
    q[3] = 2 * ps + 3;
    for (i = 0; i < 4; ++i)
        if (!m_reserve(m, &s[i], q[i])) return;
    if (!m_step(m, s, q, 4)) return;
    m_check_storage(m, "step 1 (page boundaries)");
    /* a decode-like step, one sequence without new rows (s0 ends inside
       its second page, so the fork below shares a partly full page) */
    q[0] = 2;
    q[1] = 0;
    q[2] = 3;
    q[3] = 2;
    if (!m_reserve_many(m, s, q, 4) || !m_step(m, s, q, 4)) return;
    m_check_storage(m, "step 2 (ragged)");
    /* fork s0 (its last page shared), truncate s2 by 2 and write again: the
       reserves queue copy-on-write copies that the upload runs */
    if (!m_fork(m, &s[0], &s[4]) || !m_truncate(m, &s[2], m_len(m, &s[2]) - 2)) return;
    q[0] = 2;
    q[1] = 1;
    q[2] = 1;
    q[3] = 0;
    q[4] = 3;
    if (!m_reserve_many(m, s, q, 5) || !m_step(m, s, q, 5)) return;
    m_check_storage(m, "step 3 (fork, truncate)");
    /* free s1; s3 grows by a whole page into the freed pages */
    if (!m_seq_free(m, &s[1])) return;
    s[1] = s[4];
    q[0] = 0;
    q[1] = 0;
    q[2] = 0;
    q[3] = ps;
    if (!m_reserve(m, &s[3], ps) || !m_step(m, s, q, 4)) return;
    m_check_storage(m, "step 4 (after a free)");
    m_check_caches(m);
}

/* Every storage type (K and V alike, then mixed pairs) with head_dims that
   are not multiples of 32 (7, 33, 40, 80) as well as 64, 128 and 512, page
   sizes 1, 7 and 16, source types F32, F16 and BF16 (rotating per step),
   and K/V that mix ordinary values with zeros of both signs, infinities,
   NaN and values past the F16 range: llmkv_cuda_put must store the bytes
   llmkv_put stores and llmkv_cuda_gather must return what llmkv_gather
   returns. */
static void test_put_gather(tst* t) {
    static const llmkv_dtype types[6] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16,
                                         LLMKV_DTYPE_Q8,  LLMKV_DTYPE_Q4,  LLMKV_DTYPE_FP8};
    static const uint32_t dims[7] = {7, 33, 40, 64, 80, 128, 512};
    static const uint32_t pss[3] = {1, 7, 16};
    static const llmkv_dtype mixed[6][2] = {{LLMKV_DTYPE_F16, LLMKV_DTYPE_Q4}, {LLMKV_DTYPE_Q8, LLMKV_DTYPE_FP8},
                                            {LLMKV_DTYPE_BF16, LLMKV_DTYPE_F32}, {LLMKV_DTYPE_FP8, LLMKV_DTYPE_Q8},
                                            {LLMKV_DTYPE_Q4, LLMKV_DTYPE_BF16}, {LLMKV_DTYPE_F32, LLMKV_DTYPE_Q4}};
    static const uint32_t mixed_dims[6] = {80, 7, 40, 128, 33, 64};
    uint32_t c;
    for (c = 0; c < 6 * 7 + 6; ++c) {
        mirror m;
        char name[160];
        llmkv_dtype kt, vt;
        uint32_t D, ps, nkv, n_pages;
        llmkv_desc d;
        if (c < 42) {
            kt = vt = types[c / 7];
            D = dims[c % 7];
        } else {
            kt = mixed[c - 42][0];
            vt = mixed[c - 42][1];
            D = mixed_dims[c - 42];
        }
        ps = pss[(c + c / 7) % 3];
        nkv = D >= 256 ? 1 : 1 + (c + 2 * (c / 7)) % 3;
        n_pages = ps == 1 ? 200 : 64;
        d = make_desc(2, nkv, D, ps, n_pages, kt, vt);
        snprintf(name, sizeof name, "put/gather k %s v %s head_dim %u kv_heads %u page %u", tname(kt), tname(vt), D, nkv,
                 ps);
        if (m_init(&m, t, &d, NULL, 256, 1, name)) run_put_gather(&m);
        m_free(&m);
    }
}

/* ------------------------------------------------------------------------ */
/* Decode: head_dims, GQA ratios, page sizes, ragged batches, options        */
/* ------------------------------------------------------------------------ */

/* Sequences of lengths around page boundaries (ps - 1, ps, ps + 1,
   2 ps + 1), a one-token sequence without query rows, and a longer random
   one; prefilled (and attended when the CPU side is cheap), then one step
   of 1 to 3 query rows per sequence (speculative verification rows) and
   decodes with the options. */
static void run_decode_case(mirror* m, uint32_t nq, uint32_t layer) {
    const uint32_t ps = m->lay.page_size, nkv = m->lay.n_kv_heads;
    mseq s[6];
    uint32_t L[6], qf[6], pre[6], i;
    int steps;
    dec_opts o;
    char where[128];
    L[0] = ps - 1; /* 0 when ps is 1: an empty sequence in the batch */
    L[1] = ps;
    L[2] = ps + 1;
    L[3] = 2 * ps + 1;
    L[4] = 1;
    L[5] = 37 + tst_below(&m->rng, 150);
    qf[0] = 1;
    qf[1] = 1;
    qf[2] = 3;
    qf[3] = 2;
    qf[4] = 0; /* q_len 0 */
    qf[5] = 3;
    for (i = 0; i < 6; ++i) {
        if (qf[i] > L[i]) qf[i] = L[i];
        pre[i] = L[i] - qf[i];
        if (!m_create(m, &s[i])) return;
    }
    steps = m_fill(m, s, pre, 6);
    if (steps < 0) return;
    m_check_storage(m, "prefill");
    if (steps == 1 && m_decode_work(m, nq) < 4e7) { /* the prefill batch itself: causal rows across pages */
        o = dec_plain(nq);
        o.layer = layer;
        o.lse = 1;
        m_check_decode(m, &o, "prefill rows");
    }
    if (!m_reserve_many(m, s, qf, 6) || !m_step(m, s, qf, 6)) return;
    m_check_storage(m, "decode step");
    o = dec_plain(nq);
    o.layer = layer;
    m_check_decode(m, &o, "plain");
    o.lse = 1;
    o.q_pad = 3;
    o.out_pad = 5;
    o.scale = 0.3f;
    o.q_amp = 2.0f;
    m_check_decode(m, &o, "lse, q/out strides, scale 0.3");
    o = dec_plain(nq);
    o.layer = layer;
    o.window = ps + 2;
    o.softcap = 20.0f;
    o.lse = 1;
    o.q_amp = 4.0f;
    snprintf(where, sizeof where, "window %u, softcap 20", o.window);
    m_check_decode(m, &o, where);
    o = dec_plain(nq);
    o.layer = layer;
    o.non_causal = 1;
    o.lse = 1;
    m_check_decode(m, &o, "non_causal");
    o = dec_plain(nq);
    o.layer = layer;
    o.window = 1;
    o.lse = 1;
    m_check_decode(m, &o, "window 1");
    if (nq != nkv) {
        o = dec_plain(nkv);
        o.layer = 1 - layer;
        m_check_decode(m, &o, "one q head per KV head on the same cache");
    }
    m_check_caches(m);
}

/* Every decode head_dim (64, 80, 96, 128, 256) with every storage type
   (F16, BF16, F32, Q8, Q4, FP8 for K and V, and a mixed pair); GQA ratios
   1, 2, 3 (6 q heads over 2 KV heads), 4, 6, 8, 12 and 16, with 1 (MQA) to
   3 KV heads; pages of 1, 7, 16 and 64 tokens; some cases with
   fixed_splits (split-K on short rows, many splits empty). */
static void test_decode_shapes(tst* t) {
    static const uint32_t dims[5] = {64, 80, 96, 128, 256};
    static const llmkv_dtype types[6] = {LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_F32,
                                         LLMKV_DTYPE_Q8,  LLMKV_DTYPE_Q4,   LLMKV_DTYPE_FP8};
    static const llmkv_dtype mixed[5][2] = {{LLMKV_DTYPE_F16, LLMKV_DTYPE_Q8}, {LLMKV_DTYPE_BF16, LLMKV_DTYPE_FP8},
                                            {LLMKV_DTYPE_Q4, LLMKV_DTYPE_F16}, {LLMKV_DTYPE_FP8, LLMKV_DTYPE_BF16},
                                            {LLMKV_DTYPE_Q8, LLMKV_DTYPE_F32}};
    static const uint32_t gs[8] = {1, 2, 3, 4, 8, 16, 6, 12};
    static const uint32_t pss[4] = {1, 7, 16, 64};
    static const uint32_t fixed[5] = {0, 0, 0, 3, 16};
    uint32_t c;
    for (c = 0; c < 5 * 7; ++c) {
        const uint32_t di = c / 7, ti = c % 7, D = dims[di], G = gs[c % 8], ps = pss[(c + c / 4) % 4];
        const uint32_t nkv = G == 3 ? 2 : 1 + (c / 8) % 3, nq = G * nkv;
        const llmkv_dtype kt = ti < 6 ? types[ti] : mixed[di][0], vt = ti < 6 ? types[ti] : mixed[di][1];
        const uint32_t tokens = 4 * ps + 200, n_pages = tokens / ps + 16;
        llmkv_cuda_desc gd;
        llmkv_desc d = make_desc(2, nkv, D, ps, n_pages, kt, vt);
        mirror m;
        char name[200];
        memset(&gd, 0, sizeof gd);
        gd.fixed_splits = fixed[c % 5];
        snprintf(name, sizeof name, "decode k %s v %s head_dim %u q heads %u kv heads %u page %u fixed_splits %u",
                 tname(kt), tname(vt), D, nq, nkv, ps, gd.fixed_splits);
        if (m_init(&m, t, &d, &gd, 1024, 0, name)) run_decode_case(&m, nq, c % 2);
        m_free(&m);
    }
}

/* ------------------------------------------------------------------------ */
/* Long contexts: split-K and the merge kernel                              */
/* ------------------------------------------------------------------------ */

typedef struct long_case {
    uint32_t D, nkv, nq, ps;
    llmkv_dtype kt, vt;
    uint32_t fixed_splits;
    uint64_t workspace;        /* split_workspace_bytes (0: default) */
    uint32_t n;                /* sequences */
    uint32_t len[6], qf[6];    /* final lengths, query rows of the decode step */
} long_case;

static void run_long(mirror* m, const long_case* lc) {
    mseq s[6];
    uint32_t pre[6], i;
    dec_opts o;
    for (i = 0; i < lc->n; ++i) {
        pre[i] = lc->len[i] - lc->qf[i];
        if (!m_create(m, &s[i])) return;
    }
    if (m_fill(m, s, pre, lc->n) < 0) return;
    if (!m_reserve_many(m, s, lc->qf, lc->n) || !m_step(m, s, lc->qf, lc->n)) return;
    m_check_storage(m, "after the prefill");
    o = dec_plain(lc->nq);
    m_check_decode(m, &o, "plain");
    o.lse = 1;
    o.window = 3000;
    m_check_decode(m, &o, "lse, window 3000");
    o = dec_plain(lc->nq);
    o.lse = 1;
    o.softcap = 30.0f;
    o.scale = 0.1f;
    o.q_amp = 3.0f;
    o.out_pad = 7;
    m_check_decode(m, &o, "lse, softcap 30, scale 0.1");
    o = dec_plain(lc->nq);
    o.non_causal = 1;
    o.lse = 1;
    m_check_decode(m, &o, "non_causal");
    m_check_caches(m);
}

/* Contexts of 20000 and 8192 tokens (split over the GPU by the automatic
   choice, merged by log-sum-exp) next to short ones; fixed_splits 7 over
   rows of 1 to 8 keys (empty splits) and 8192; a split-K workspace so
   small that the split count is cut to fit; pages of one token. Prefills
   take several uploads of up to 4096 rows. */
static void test_decode_long(tst* t) {
    static const long_case cases[4] = {
        {128, 2, 16, 16, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16, 0, 0, 4, {20000, 8192, 511, 17}, {1, 3, 1, 1}},
        {256, 1, 4, 64, LLMKV_DTYPE_Q8, LLMKV_DTYPE_BF16, 7, 0, 6, {8192, 1, 6, 7, 8, 300}, {2, 1, 1, 1, 1, 3}},
        {64, 4, 12, 7, LLMKV_DTYPE_FP8, LLMKV_DTYPE_Q4, 0, 64 << 10, 3, {4000, 3001, 7}, {1, 2, 1}},
        {96, 2, 32, 1, LLMKV_DTYPE_BF16, LLMKV_DTYPE_BF16, 0, 0, 2, {6000, 2}, {2, 1}},
    };
    uint32_t c, i;
    for (c = 0; c < 4; ++c) {
        const long_case* lc = &cases[c];
        uint32_t tokens = 0, longest = 0;
        llmkv_cuda_desc gd;
        llmkv_desc d;
        mirror m;
        char name[200];
        for (i = 0; i < lc->n; ++i) {
            tokens += lc->len[i];
            if (lc->len[i] > longest) longest = lc->len[i];
        }
        d = make_desc(1, lc->nkv, lc->D, lc->ps, tokens / lc->ps + 2 * lc->n + 8, lc->kt, lc->vt);
        d.max_seq_len = longest + 64;
        memset(&gd, 0, sizeof gd);
        gd.fixed_splits = lc->fixed_splits;
        gd.split_workspace_bytes = lc->workspace;
        snprintf(name, sizeof name,
                 "long k %s v %s head_dim %u q heads %u kv heads %u page %u fixed_splits %u workspace %llu, longest %u",
                 tname(lc->kt), tname(lc->vt), lc->D, lc->nq, lc->nkv, lc->ps, lc->fixed_splits,
                 (unsigned long long)lc->workspace, longest);
        if (m_init(&m, t, &d, &gd, 4096, 0, name)) run_long(&m, lc);
        m_free(&m);
    }
}

/* ------------------------------------------------------------------------ */
/* Copy-on-write commands                                                   */
/* ------------------------------------------------------------------------ */

/* Forks of sequences whose last page is partly full, written on both
   sides: the reserves queue partial-page copies (one that reads the page an
   earlier one writes, so they run in order; two from one page, run
   together), and the upload runs them before the puts. */
static void run_copies(mirror* m, uint32_t nq) {
    const uint32_t ps = m->lay.page_size;
    mseq a, s[6];
    uint32_t q[6], n_done = 99, base = ps + ps / 2; /* a partly full second page */
    dec_opts o = dec_plain(nq);
    if (!m_create(m, &a) || !m_reserve(m, &a, base) || !m_step(m, &a, &base, 1)) return;
    m_check_storage(m, "source");
    s[0] = a;
    /* b = fork(a), reserve b: copy P -> Q; c = fork(b), reserve c: copy Q -> R
       (reads what the first copy writes); d, e = fork(a), reserve a, d, e
       together: two copies from P (the last writer keeps it). */
    if (!m_fork(m, &a, &s[1]) || !m_reserve(m, &s[1], 3)) return;
    if (!m_fork(m, &s[1], &s[2]) || !m_reserve(m, &s[2], 2)) return;
    if (!m_fork(m, &a, &s[3]) || !m_fork(m, &a, &s[4])) return;
    q[0] = 2;
    q[1] = 4;
    q[2] = 1;
    {
        mseq ade[3];
        ade[0] = a;
        ade[1] = s[3];
        ade[2] = s[4];
        if (!m_reserve_many(m, ade, q, 3)) return;
    }
    if (ps > 1 && pending_copies(m->meta) != 4)
        MFAIL(m, "expected 4 queued copies before the upload, the cache holds %u", pending_copies(m->meta));
    if (pending_copies(m->host) != 0) MFAIL(m, "a host cache queued copies");
    /* every sequence writes its rows past base (c: the rows b left unwritten too) */
    q[0] = 2;
    q[1] = 3;
    q[2] = 5;
    q[3] = 4;
    q[4] = 1;
    if (!m_step(m, s, q, 5)) return;
    if (pending_copies(m->meta) != 0) MFAIL(m, "the upload left %u copies queued", pending_copies(m->meta));
    m_check_storage(m, "after the copies");
    o.layer = m->lay.n_layers - 1;
    o.lse = 1;
    m_check_decode(m, &o, "after the copies");
    /* a fork of b truncated into the page it shares with b, then written: a
       partial copy, run by llmkv_cuda_run_copies itself before the upload */
    if (!m_fork(m, &s[1], &s[5]) || !m_truncate(m, &s[5], base + 1) || !m_reserve(m, &s[5], 4)) return;
    if (!M_EXPECT(m, llmkv_cuda_run_copies(m->gpu, g_stream, &n_done), LLMKV_OK)) return;
    if (n_done != (ps > 1 && (base + 1) % ps ? 1u : 0u)) MFAIL(m, "llmkv_cuda_run_copies ran %u copies", n_done);
    if (!M_EXPECT(m, llmkv_cuda_run_copies(m->gpu, g_stream, &n_done), LLMKV_OK) || n_done != 0)
        MFAIL(m, "a second llmkv_cuda_run_copies ran %u copies", n_done);
    q[0] = 0;
    q[1] = 0;
    q[2] = 0;
    q[3] = 0;
    q[4] = 0;
    q[5] = 4;
    if (!m_step(m, s, q, 6)) return;
    m_check_storage(m, "after truncate and run_copies");
    /* free two sequences; the others grow into their pages */
    if (!m_seq_free(m, &s[3]) || !m_seq_free(m, &s[1])) return;
    s[1] = s[5];
    s[3] = s[4];
    q[0] = ps + 1;
    q[1] = 2;
    q[2] = 1;
    q[3] = 2 * ps;
    if (!m_reserve_many(m, s, q, 4) || !m_step(m, s, q, 4)) return;
    m_check_storage(m, "after frees");
    o.layer = 0;
    m_check_decode(m, &o, "after frees");
    m_check_caches(m);
}

/* Quantized K and V (the copies move scales too), then float types with
   pages of 7 and MQA. */
static void test_copies(tst* t) {
    mirror m;
    llmkv_desc d = make_desc(2, 2, 80, 16, 64, LLMKV_DTYPE_Q4, LLMKV_DTYPE_FP8);
    if (m_init(&m, t, &d, NULL, 256, 0, "copies k q4 v fp8 head_dim 80 kv heads 2 page 16")) run_copies(&m, 4);
    m_free(&m);
    d = make_desc(2, 1, 64, 7, 96, LLMKV_DTYPE_F32, LLMKV_DTYPE_F16);
    if (m_init(&m, t, &d, NULL, 256, 0, "copies k f32 v f16 head_dim 64 kv heads 1 page 7")) run_copies(&m, 8);
    m_free(&m);
    d = make_desc(2, 2, 40, 16, 64, LLMKV_DTYPE_Q8, LLMKV_DTYPE_BF16);
    if (m_init(&m, t, &d, NULL, 256, 1, "copies k q8 v bf16 head_dim 40 kv heads 2 page 16, special values")) {
        /* head_dim 40 has no decode kernel: copies and storage only */
        mseq a, b;
        uint32_t n = 21, q[2];
        if (m_create(&m, &a) && m_reserve(&m, &a, n) && m_step(&m, &a, &n, 1) && m_fork(&m, &a, &b)) {
            q[0] = 3;
            q[1] = 5;
            if (m_reserve(&m, &a, 3) && m_reserve(&m, &b, 5)) {
                mseq s2[2];
                s2[0] = a;
                s2[1] = b;
                if (m_step(&m, s2, q, 2)) m_check_storage(&m, "fork");
            }
        }
    }
    m_free(&m);
}

/* ------------------------------------------------------------------------ */
/* Prefix index: partial-page matches copy on the GPU                        */
/* ------------------------------------------------------------------------ */

static void rand_tokens(tst_rng* r, llmkv_token* t, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; ++i) t[i] = (llmkv_token)tst_below(r, 50000);
}

/* A's 48 tokens are published (3 pages of 16); B's prompt shares 37 of
   them, so it holds A's third page for 5 slots and its first write copies
   them (a copy of 5 < 16 slots); B's partly filled page is published and C
   matches 8 of its slots (another partial copy); D matches A's 3 pages
   exactly (no copy); then every sequence decodes one more token (B's
   published partial page is copied again), and C is swapped out and in. */
static void run_prefix(mirror* m, uint32_t nq) {
    llmkv_token T[48], U[8], W[4], V4[4], PB[45], PC[44], PD[52], one[4], tb[64], tg[64];
    mseq s[4];
    uint32_t n_cached = 0, q[4], i;
    dec_opts o = dec_plain(nq);
    rand_tokens(&m->rng, T, 48);
    rand_tokens(&m->rng, U, 8);
    rand_tokens(&m->rng, W, 4);
    rand_tokens(&m->rng, V4, 4);
    rand_tokens(&m->rng, one, 4);
    U[0] = T[37] + 1; /* B leaves A's third page after 5 slots */
    W[0] = U[3] + 1;  /* C leaves B's page after 8 slots */
    memcpy(PB, T, 37 * sizeof(llmkv_token));
    memcpy(PB + 37, U, 8 * sizeof(llmkv_token));
    memcpy(PC, PB, 40 * sizeof(llmkv_token));
    memcpy(PC + 40, W, 4 * sizeof(llmkv_token));
    memcpy(PD, T, 48 * sizeof(llmkv_token));
    memcpy(PD + 48, V4, 4 * sizeof(llmkv_token));
    /* A: nothing cached yet */
    if (!m_create_prefix(m, T, 48, &s[0], &n_cached)) return;
    if (n_cached != 0) MFAIL(m, "A matched %u tokens of an empty index", n_cached);
    q[0] = 48;
    if (!m_reserve_tokens(m, &s[0], T, 48) || !m_step(m, s, q, 1) || !m_publish(m, &s[0], 0)) return;
    /* B: 32 tokens in whole pages + 5 of A's third page */
    if (!m_create_prefix(m, PB, 45, &s[1], &n_cached)) return;
    if (n_cached != 37) MFAIL(m, "B matched %u tokens, expected 37 (the scenario needs a partial page)", n_cached);
    if (!m_reserve_tokens(m, &s[1], PB + n_cached, 45 - n_cached)) return;
    if (pending_copies(m->meta) != 1) MFAIL(m, "B's reserve queued %u copies, expected 1", pending_copies(m->meta));
    q[0] = 0;
    q[1] = 45 - n_cached;
    if (!m_step(m, s, q, 2)) return;
    m_check_storage(m, "B from a partial match");
    o.lse = 1;
    m_check_decode(m, &o, "B's rows");
    /* C: B's partial page, published, matched for 8 slots */
    if (!m_publish(m, &s[1], 1) || !m_create_prefix(m, PC, 44, &s[2], &n_cached)) return;
    if (n_cached != 40) MFAIL(m, "C matched %u tokens, expected 40", n_cached);
    if (!m_reserve_tokens(m, &s[2], PC + n_cached, 44 - n_cached)) return;
    if (pending_copies(m->meta) != 1) MFAIL(m, "C's reserve queued %u copies, expected 1", pending_copies(m->meta));
    q[1] = 0;
    q[2] = 44 - n_cached;
    if (!m_step(m, s, q, 3)) return;
    m_check_storage(m, "C from a published partial page");
    /* D: A's three pages, whole */
    if (!m_create_prefix(m, PD, 52, &s[3], &n_cached)) return;
    if (n_cached != 48) MFAIL(m, "D matched %u tokens, expected 48", n_cached);
    if (!m_reserve_tokens(m, &s[3], PD + n_cached, 52 - n_cached)) return;
    q[2] = 0;
    q[3] = 52 - n_cached;
    if (!m_step(m, s, q, 4)) return;
    m_check_storage(m, "D from whole pages");
    /* one more token each (publishing first, copying B's published page) */
    for (i = 0; i < 4; ++i) {
        q[i] = 1;
        if (!m_reserve_tokens(m, &s[i], one + i, 1)) return;
    }
    if (!m_step(m, s, q, 4)) return;
    m_check_storage(m, "one more token");
    o.layer = m->lay.n_layers - 1;
    m_check_decode(m, &o, "one more token");
    /* swap C out and back in: its token ids travel with it */
    {
        size_t need = 0;
        void* buf = NULL;
        uint32_t L = m_len(m, &s[2]);
        if (!M_EXPECT(m, llmkv_cuda_swap_size(m->gpu, L, &need), LLMKV_OK) ||
            !M_EXPECT(m, llmkv_cuda_host_alloc(need, &buf), LLMKV_OK))
            return;
        if (M_EXPECT(m, llmkv_cuda_swap_out(m->gpu, s[2].g, buf, need, g_stream), LLMKV_OK) &&
            M_CU(m, cudaStreamSynchronize(g_stream)) &&
            M_EXPECT(m, llmkv_cuda_swap_in(m->gpu, s[2].g, buf, need, g_stream), LLMKV_OK) &&
            M_CU(m, cudaStreamSynchronize(g_stream))) {
            if (llmkv_seq_tokens(m->host, s[2].h, 0, L, tb) != LLMKV_OK ||
                llmkv_seq_tokens(m->meta, s[2].g, 0, L, tg) != LLMKV_OK || memcmp(tb, tg, L * sizeof(llmkv_token)))
                MFAIL(m, "C's token ids changed across the swap");
            q[0] = q[1] = q[2] = q[3] = 0;
            if (m_step(m, s, q, 4)) m_check_storage(m, "after swapping C");
        }
        llmkv_cuda_host_free(buf);
    }
    for (i = 0; i < 4; ++i)
        if (!m_seq_free(m, &s[i])) return;
    m_check_caches(m);
}

static void test_prefix(tst* t) {
    mirror m;
    llmkv_desc d = make_desc(2, 2, 128, 16, 64, LLMKV_DTYPE_F16, LLMKV_DTYPE_Q8);
    d.prefix_index = 1;
    if (m_init(&m, t, &d, NULL, 256, 0, "prefix k f16 v q8 head_dim 128 kv heads 2 page 16")) run_prefix(&m, 8);
    m_free(&m);
    d = make_desc(1, 1, 80, 16, 64, LLMKV_DTYPE_Q4, LLMKV_DTYPE_BF16);
    d.prefix_index = 1;
    if (m_init(&m, t, &d, NULL, 256, 0, "prefix k q4 v bf16 head_dim 80 kv heads 1 page 16")) run_prefix(&m, 3);
    m_free(&m);
}

/* ------------------------------------------------------------------------ */
/* Swap                                                                     */
/* ------------------------------------------------------------------------ */

/* One step on the GPU side alone: the sequence's last q rows get random K/V. */
static int gpu_only_step(mirror* m, llmkv_seq g, uint32_t q) {
    const uint32_t D = m->lay.head_dim, nkv = m->lay.n_kv_heads;
    const size_t floats = (size_t)q * nkv * D;
    float* h = (float*)xmalloc(sizeof(float) * floats);
    void* dkv = dev_alloc(m->t, &m->lg, sizeof(float) * floats);
    size_t i;
    uint32_t l;
    int ok = 0;
    for (i = 0; i < floats; ++i) h[i] = tst_float(&m->rng) * 8.0f;
    if (dkv && h2d(m->t, &m->lg, dkv, h, sizeof(float) * floats) &&
        M_EXPECT(m, llmkv_batch_build(m->gb, &g, &q, 1), LLMKV_OK) &&
        M_EXPECT(m, llmkv_cuda_upload(m->gpu, m->gb, g_stream), LLMKV_OK)) {
        ok = 1;
        for (l = 0; l < m->lay.n_layers && ok; ++l)
            ok = M_EXPECT(m, llmkv_cuda_put(m->gpu, l, dkv, 0, dkv, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_OK);
        ok = ok && M_CU(m, cudaStreamSynchronize(g_stream));
    }
    free(h);
    dev_free(dkv);
    return ok;
}

/* Swaps s out on the GPU, lets another sequence take and overwrite the
   freed pages, checks the error cases, and swaps s back in. The host mirror
   keeps s as it was (a swap changes no contents). */
static void swap_round(mirror* m, const mseq* s, int check_errors) {
    const uint32_t L = m_len(m, s), maxp = (m->desc.max_seq_len + m->lay.page_size - 1) / m->lay.page_size;
    uint32_t *old = (uint32_t*)xmalloc(4 * (size_t)maxp), *tp = (uint32_t*)xmalloc(4 * (size_t)maxp);
    uint32_t n_old = 0, n_tp = 0, len = 0, i, j, overlap = 0;
    size_t need = 0;
    void* buf = NULL;
    llmkv_seq tseq;
    tseq.id = 0;
    if (!M_EXPECT(m, llmkv_seq_pages(m->meta, s->g, old, maxp, &n_old), LLMKV_OK) ||
        !M_EXPECT(m, llmkv_cuda_swap_size(m->gpu, L, &need), LLMKV_OK) ||
        !M_EXPECT(m, llmkv_cuda_host_alloc(need, &buf), LLMKV_OK))
        goto done;
    if (need < (size_t)n_old * m->lay.page_bytes) MFAIL(m, "llmkv_cuda_swap_size: %zu bytes for %u pages", need, n_old);
    if (check_errors) {
        llmkv_seq bad;
        bad.id = 0;
        M_EXPECT(m, llmkv_cuda_swap_out(m->gpu, s->g, buf, need - 1, g_stream), LLMKV_ERR_BUFFER_TOO_SMALL);
        M_EXPECT(m, llmkv_cuda_swap_out(m->gpu, bad, buf, need, g_stream), LLMKV_ERR_STALE_HANDLE);
        M_EXPECT(m, llmkv_cuda_swap_out(m->gpu, s->g, (char*)buf + 8, need - 8, g_stream), LLMKV_ERR_MISALIGNED);
        if (m_len(m, s) != L) MFAIL(m, "a failed swap_out changed the sequence");
    }
    if (!M_EXPECT(m, llmkv_cuda_swap_out(m->gpu, s->g, buf, need, g_stream), LLMKV_OK) ||
        !M_CU(m, cudaStreamSynchronize(g_stream)))
        goto done;
    (void)llmkv_seq_length(m->meta, s->g, &len);
    if (len != 0) MFAIL(m, "after swap_out the sequence holds %u positions", len);
    /* another sequence takes the freed pages and writes them */
    if (!M_EXPECT(m, llmkv_seq_create(m->meta, &tseq), LLMKV_OK) ||
        !M_EXPECT(m, llmkv_reserve(m->meta, tseq, L + 1), LLMKV_OK) || !gpu_only_step(m, tseq, L + 1))
        goto done;
    (void)llmkv_seq_pages(m->meta, tseq, tp, maxp, &n_tp);
    for (i = 0; i < n_tp; ++i)
        for (j = 0; j < n_old; ++j) overlap += tp[i] == old[j];
    if (overlap == 0) MFAIL(m, "the swapped-out pages were not reused: the test proves nothing");
    if (check_errors) {
        unsigned char* hb = (unsigned char*)buf;
        uint32_t n_t = 0;
        /* into a sequence that holds positions */
        M_EXPECT(m, llmkv_cuda_swap_in(m->gpu, tseq, buf, need, g_stream), LLMKV_ERR_INVALID_ARGUMENT);
        (void)llmkv_seq_length(m->meta, tseq, &n_t);
        if (n_t != L + 1) MFAIL(m, "a failed swap_in changed the target");
        /* a corrupted header, a short buffer */
        hb[0] ^= 0x20;
        M_EXPECT(m, llmkv_cuda_swap_in(m->gpu, s->g, buf, need, g_stream), LLMKV_ERR_BAD_FORMAT);
        hb[0] ^= 0x20;
        M_EXPECT(m, llmkv_cuda_swap_in(m->gpu, s->g, buf, need - 1, g_stream), LLMKV_ERR_BAD_FORMAT);
        M_EXPECT(m, llmkv_cuda_swap_in(m->gpu, s->g, buf, 8, g_stream), LLMKV_ERR_BAD_FORMAT);
        M_EXPECT(m, llmkv_cuda_swap_in(m->gpu, s->g, (char*)buf + 8, need - 8, g_stream), LLMKV_ERR_MISALIGNED);
        (void)llmkv_seq_length(m->meta, s->g, &len);
        if (len != 0) MFAIL(m, "a failed swap_in changed the sequence (length %u)", len);
    }
    if (!M_EXPECT(m, llmkv_cuda_swap_in(m->gpu, s->g, buf, need, g_stream), LLMKV_OK) ||
        !M_CU(m, cudaStreamSynchronize(g_stream)))
        goto done;
    (void)llmkv_seq_length(m->meta, s->g, &len);
    if (len != L) MFAIL(m, "after swap_in the sequence holds %u positions, expected %u", len, L);
done:
    if (tseq.id) (void)llmkv_seq_free(m->meta, tseq);
    llmkv_cuda_host_free(buf);
    free(old);
    free(tp);
}

/* A standalone sequence (all its pages freed by the swap and overwritten),
   then one that shares pages with a fork; after each swap_in every
   sequence must read as on the host, and decode must match again. */
static void run_swap(mirror* m, uint32_t nq) {
    mseq s[3]; /* s0 standalone, s1 and its fork s2 */
    uint32_t q[3];
    dec_opts o = dec_plain(nq);
    if (!m_create(m, &s[0]) || !m_create(m, &s[1])) return;
    q[0] = 100;
    q[1] = 37;
    if (!m_reserve_many(m, s, q, 2) || !m_step(m, s, q, 2)) return;
    if (!m_fork(m, &s[1], &s[2]) || !m_reserve(m, &s[2], 5)) return;
    q[0] = q[1] = 0;
    q[2] = 5;
    if (!m_step(m, s, q, 3)) return;
    m_check_storage(m, "before the swaps");
    swap_round(m, &s[0], 1);
    q[2] = 0;
    if (!m_step(m, s, q, 3)) return; /* no new rows: the batch only reads */
    m_check_storage(m, "after swapping the standalone sequence");
    swap_round(m, &s[1], 0);
    if (!m_step(m, s, q, 3)) return;
    m_check_storage(m, "after swapping the forked sequence");
    /* the swapped sequences keep working */
    q[0] = 1;
    q[1] = 2;
    q[2] = 1;
    if (!m_reserve_many(m, s, q, 3) || !m_step(m, s, q, 3)) return;
    m_check_storage(m, "after the swaps, one more step");
    o.lse = 1;
    m_check_decode(m, &o, "after the swaps");
    o.layer = m->lay.n_layers - 1;
    m_check_decode(m, &o, "after the swaps, last layer");
    /* an empty sequence swaps out and in */
    {
        mseq e;
        size_t need = 0;
        void* buf = NULL;
        uint32_t len = 1;
        if (m_create(m, &e) && M_EXPECT(m, llmkv_cuda_swap_size(m->gpu, 0, &need), LLMKV_OK) &&
            M_EXPECT(m, llmkv_cuda_host_alloc(need, &buf), LLMKV_OK) &&
            M_EXPECT(m, llmkv_cuda_swap_out(m->gpu, e.g, buf, need, g_stream), LLMKV_OK) &&
            M_CU(m, cudaStreamSynchronize(g_stream)) &&
            M_EXPECT(m, llmkv_cuda_swap_in(m->gpu, e.g, buf, need, g_stream), LLMKV_OK)) {
            (void)llmkv_seq_length(m->meta, e.g, &len);
            if (len != 0) MFAIL(m, "an empty sequence came back with %u positions", len);
        }
        M_CU(m, cudaStreamSynchronize(g_stream));
        llmkv_cuda_host_free(buf);
    }
    m_check_caches(m);
}

/* Two sequences grown a page at a time in turn, so each one's pages
   alternate with the other's: every page is its own run, and the swap goes
   through the workspace (pack kernel, one copy per chunk) instead of one
   copy per page. */
static void run_swap_scattered(mirror* m, uint32_t nq) {
    mseq s[2];
    uint32_t q[2], step, ps = m->lay.page_size;
    dec_opts o = dec_plain(nq);
    if (!m_create(m, &s[0]) || !m_create(m, &s[1])) return;
    for (step = 0; step < 12; ++step) {
        uint32_t w = step % 2, z[2];
        z[w] = ps;
        z[1 - w] = 0;
        if (!m_reserve(m, &s[w], ps) || !m_step(m, s, z, 2)) return;
    }
    m_check_storage(m, "before the scattered swaps");
    swap_round(m, &s[0], 0);
    q[0] = q[1] = 0;
    if (!m_step(m, s, q, 2)) return;
    m_check_storage(m, "after swapping a scattered sequence");
    swap_round(m, &s[1], 0);
    q[0] = q[1] = 1;
    if (!m_reserve_many(m, s, q, 2) || !m_step(m, s, q, 2)) return;
    m_check_storage(m, "after the scattered swaps, one more step");
    o.lse = 1;
    m_check_decode(m, &o, "after the scattered swaps");
    m_check_caches(m);
}

static void test_swap(tst* t) {
    mirror m;
    llmkv_cuda_desc small;
    llmkv_desc d = make_desc(2, 2, 96, 16, 64, LLMKV_DTYPE_BF16, LLMKV_DTYPE_Q4);
    if (m_init(&m, t, &d, NULL, 256, 0, "swap k bf16 v q4 head_dim 96 kv heads 2 page 16")) run_swap(&m, 6);
    m_free(&m);
    if (m_init(&m, t, &d, NULL, 256, 0, "scattered swap k bf16 v q4 head_dim 96 kv heads 2 page 16"))
        run_swap_scattered(&m, 6);
    m_free(&m);
    /* A workspace of three pages: the scattered swap runs in chunks. */
    memset(&small, 0, sizeof small);
    {
        llmkv_layout lay;
        if (llmkv_layout_for(&d, &lay) == LLMKV_OK) small.split_workspace_bytes = 3 * lay.page_bytes;
    }
    if (m_init(&m, t, &d, &small, 256, 0, "scattered swap in chunks of 3 pages, head_dim 96 page 16"))
        run_swap_scattered(&m, 6);
    m_free(&m);
    d = make_desc(1, 1, 64, 7, 96, LLMKV_DTYPE_F32, LLMKV_DTYPE_FP8);
    if (m_init(&m, t, &d, NULL, 256, 0, "swap k f32 v fp8 head_dim 64 kv heads 1 page 7")) run_swap(&m, 8);
    m_free(&m);
}

/* With a prefix index, a sequence reserved without token ids (llmkv_reserve:
   "unknown") must swap out and back in as any other: swap_out records its
   ids as -1, and swap_in must restore them without failing. */
static void test_swap_unknown_tokens(tst* t) {
    mirror m;
    llmkv_desc d = make_desc(1, 2, 64, 16, 32, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    d.prefix_index = 1;
    if (m_init(&m, t, &d, NULL, 256, 0, "swap of unknown token ids, prefix index, head_dim 64 page 16")) {
        mseq s;
        uint32_t n = 20, len = 0;
        size_t need = 0;
        void* buf = NULL;
        if (m_create(&m, &s) && m_reserve(&m, &s, n) && m_step(&m, &s, &n, 1) &&
            M_EXPECT(&m, llmkv_cuda_swap_size(m.gpu, n, &need), LLMKV_OK) &&
            M_EXPECT(&m, llmkv_cuda_host_alloc(need, &buf), LLMKV_OK) &&
            M_EXPECT(&m, llmkv_cuda_swap_out(m.gpu, s.g, buf, need, g_stream), LLMKV_OK) &&
            M_CU(&m, cudaStreamSynchronize(g_stream))) {
            if (M_EXPECT(&m, llmkv_cuda_swap_in(m.gpu, s.g, buf, need, g_stream), LLMKV_OK)) {
                uint32_t z = 0;
                (void)llmkv_seq_length(m.meta, s.g, &len);
                if (len != n) MFAIL(&m, "swap_in restored %u positions of %u", len, n);
                if (m_step(&m, &s, &z, 1)) m_check_storage(&m, "after the swap");
            }
            M_CU(&m, cudaStreamSynchronize(g_stream));
        }
        llmkv_cuda_host_free(buf);
    }
    m_free(&m);
}

/* ------------------------------------------------------------------------ */
/* CUDA graphs (a real device only: the emulator and HIP builds skip it)     */
/* ------------------------------------------------------------------------ */

#if !defined(LLMKV_GPU_EMULATE) && !defined(LLMKV_TEST_HIP)
/* A decode captured once in a CUDA graph, then replayed over later steps:
   each step reserves a token per sequence, rebuilds and uploads the batch
   and puts the new K/V (outside the graph); the replay must read the
   latest upload (the tables and the workspace never move) and match
   llmkv_attend, with fixed_splits so the captured grid stays valid. */
static void test_graph(tst* t) {
    mirror m;
    llmkv_cuda_desc gd;
    llmkv_desc d = make_desc(1, 2, 128, 16, 64, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    memset(&gd, 0, sizeof gd);
    gd.fixed_splits = 4;
    if (m_init(&m, t, &d, &gd, 256, 0, "graph: decode captured once, replayed over 4 steps, fixed_splits 4")) {
        const uint32_t nq = 8, D = 128, rows = 3;
        const size_t n = (size_t)rows * nq * D;
        mseq s[3];
        uint32_t q[3] = {50, 70, 90}, one[3] = {1, 1, 1}, step, i;
        float *hq = (float*)xmalloc(sizeof(float) * n), *hout = (float*)xmalloc(sizeof(float) * n);
        float* cout = (float*)xmalloc(sizeof(float) * n);
        void *dq = dev_alloc(t, &m.lg, sizeof(float) * n), *dout = dev_alloc(t, &m.lg, sizeof(float) * n);
        cudaGraph_t graph = NULL;
        cudaGraphExec_t exec = NULL;
        llmkv_attn_desc ga, ca;
        int ok = dq && dout;
        for (i = 0; i < 3 && ok; ++i) ok = m_create(&m, &s[i]);
        ok = ok && m_reserve_many(&m, s, q, 3) && m_step(&m, s, q, 3);
        ok = ok && m_reserve_many(&m, s, one, 3) && m_step(&m, s, one, 3);
        memset(&ga, 0, sizeof ga);
        ga.n_q_heads = nq;
        ga.q = (const float*)dq;
        ga.out = (float*)dout;
        ca = ga;
        ca.q = hq;
        ca.out = cout;
        ca.path = ref_path(m.lay.k.dtype, D);
        if (ok) {
            ok = M_CU(&m, cudaStreamSynchronize(g_stream)) &&
                 M_CU(&m, cudaStreamBeginCapture(g_stream, cudaStreamCaptureModeThreadLocal));
            if (ok) {
                llmkv_result r = llmkv_cuda_decode(m.gpu, &ga, g_stream);
                ok = M_CU(&m, cudaStreamEndCapture(g_stream, &graph)) && M_EXPECT(&m, r, LLMKV_OK) &&
                     M_CU(&m, cudaGraphInstantiateWithFlags(&exec, graph, 0));
            }
        }
        for (step = 0; step < 4 && ok; ++step) {
            double worst = 0.0, amax = 0.0;
            if (step > 0) ok = m_reserve_many(&m, s, one, 3) && m_step(&m, s, one, 3);
            for (i = 0; i < n; ++i) hq[i] = tst_float(&m.rng);
            ok = ok && h2d(t, &m.lg, dq, hq, sizeof(float) * n) && M_CU(&m, cudaGraphLaunch(exec, g_stream)) &&
                 d2h(t, &m.lg, hout, dout, sizeof(float) * n) &&
                 M_EXPECT(&m, llmkv_attend(m.host, m.hb, &ca, NULL), LLMKV_OK);
            for (i = 0; i < n && ok; ++i) {
                double e = fabs((double)hout[i] - (double)cout[i]);
                worst = e > worst || e != e ? e : worst;
                amax = fabs((double)cout[i]) > amax ? fabs((double)cout[i]) : amax;
            }
            if (ok && !(worst <= TOL_CPU_OUT * (1.0 + amax)))
                MFAIL(&m, "replay %u: max |graph - llmkv_attend| %.3g > %.3g", step, worst, TOL_CPU_OUT * (1.0 + amax));
        }
        if (exec) (void)cudaGraphExecDestroy(exec);
        if (graph) (void)cudaGraphDestroy(graph);
        dev_free(dq);
        dev_free(dout);
        free(hq);
        free(hout);
        free(cout);
    }
    m_free(&m);
}
#endif

/* ------------------------------------------------------------------------ */
/* Errors leave everything unchanged                                        */
/* ------------------------------------------------------------------------ */

/* One bad decode descriptor: the GPU and the CPU must both refuse it with
   `want` (the CPU side gets the same descriptor with host pointers, moved
   by the same byte offsets). */
static void bad_decode(mirror* m, const llmkv_attn_desc* gd, const llmkv_attn_desc* cd, llmkv_result want,
                       const char* what) {
    llmkv_result rg = llmkv_cuda_decode(m->gpu, gd, g_stream), rc = llmkv_attend(m->host, m->hb, cd, NULL);
    if (rg != want || rc != want)
        MFAIL(m, "decode with %s: gpu %s, cpu %s, expected %s", what, llmkv_result_string(rg), llmkv_result_string(rc),
              llmkv_result_string(want));
}

static const float* shift_c(const float* p, size_t bytes) { return p ? (const float*)(const void*)((const char*)p + bytes) : p; }
static float* shift(float* p, size_t bytes) { return p ? (float*)(void*)((char*)p + bytes) : p; }

static void run_errors(mirror* m) {
    const uint32_t D = m->lay.head_dim, nkv = m->lay.n_kv_heads, nq = 2 * nkv;
    const size_t row = (size_t)nq * D * 4;
    mseq s[2];
    uint32_t q[2], nt = 0, i;
    llmkv_attn_desc ga, ca, g2, c2;
    llmkv_batch_info bi;
    unsigned char* snap = NULL;
    float *hq = NULL, *hout = NULL, *hlse = NULL, *chk = NULL;
    void *dq = NULL, *dout = NULL, *dlse = NULL, *dsrc = NULL, *dg = NULL;
    size_t out_floats;
    if (!m_create(m, &s[0]) || !m_create(m, &s[1])) return;
    q[0] = 40;
    q[1] = 5;
    if (!m_reserve_many(m, s, q, 2) || !m_step(m, s, q, 2)) return;
    q[0] = 2;
    q[1] = 1;
    if (!m_reserve_many(m, s, q, 2) || !m_step(m, s, q, 2)) return;
    if (!M_EXPECT(m, llmkv_batch_get(m->hb, &bi), LLMKV_OK)) return;
    nt = bi.n_tokens;
    out_floats = (size_t)nt * nq * D + 64;
    hq = (float*)xmalloc(sizeof(float) * out_floats);
    hout = (float*)xmalloc(sizeof(float) * out_floats);
    hlse = (float*)xmalloc(sizeof(float) * (nt * nq + 64));
    chk = (float*)xmalloc(sizeof(float) * out_floats);
    for (i = 0; i < out_floats; ++i) hq[i] = tst_float(&m->rng);
    fill_canary(hout, out_floats);
    fill_canary(hlse, nt * nq + 64);
    dq = dev_alloc(m->t, &m->lg, sizeof(float) * out_floats);
    dout = dev_alloc(m->t, &m->lg, sizeof(float) * out_floats);
    dlse = dev_alloc(m->t, &m->lg, sizeof(float) * (nt * nq + 64));
    dsrc = dev_alloc(m->t, &m->lg, (size_t)nt * nkv * D * 4 + 64);
    dg = dev_alloc(m->t, &m->lg, (size_t)64 * nkv * D * 4 + 64);
    if (!dq || !dout || !dlse || !dsrc || !dg || !h2d(m->t, &m->lg, dq, hq, sizeof(float) * out_floats) ||
        !h2d(m->t, &m->lg, dout, hout, sizeof(float) * out_floats) ||
        !h2d(m->t, &m->lg, dlse, hlse, sizeof(float) * (nt * nq + 64)) || !dev_fill(m->t, &m->lg, dg, 0x5A, (size_t)64 * nkv * D * 4 + 64))
        goto done;
    snap = m_pool_snapshot(m);
    memset(&ga, 0, sizeof ga);
    ga.n_q_heads = nq;
    ga.q = (const float*)dq;
    ga.out = (float*)dout;
    ga.lse = (float*)dlse;
    ca = ga;
    ca.q = hq;
    ca.out = hout;
    ca.lse = hlse;
    /* decode descriptors llmkv_attend refuses too */
    g2 = ga; c2 = ca; g2.n_q_heads = c2.n_q_heads = 2 * nkv + 1; bad_decode(m, &g2, &c2, LLMKV_ERR_INVALID_ARGUMENT, "n_q_heads not a multiple of n_kv_heads");
    g2 = ga; c2 = ca; g2.n_q_heads = c2.n_q_heads = 0; bad_decode(m, &g2, &c2, LLMKV_ERR_INVALID_ARGUMENT, "n_q_heads 0");
    g2 = ga; c2 = ca; g2.q = c2.q = NULL; bad_decode(m, &g2, &c2, LLMKV_ERR_INVALID_ARGUMENT, "q NULL");
    g2 = ga; c2 = ca; g2.out = c2.out = NULL; bad_decode(m, &g2, &c2, LLMKV_ERR_INVALID_ARGUMENT, "out NULL");
    g2 = ga; c2 = ca; g2.layer = c2.layer = m->lay.n_layers; bad_decode(m, &g2, &c2, LLMKV_ERR_OUT_OF_RANGE, "layer past the end");
    g2 = ga; c2 = ca; g2.scale = c2.scale = -1.0f; bad_decode(m, &g2, &c2, LLMKV_ERR_INVALID_ARGUMENT, "negative scale");
    g2 = ga; c2 = ca; g2.softcap = c2.softcap = f32_from_bits(0x7fc00000u); bad_decode(m, &g2, &c2, LLMKV_ERR_INVALID_ARGUMENT, "NaN softcap");
    g2 = ga; c2 = ca; g2.q = shift_c(g2.q, 2); c2.q = shift_c(c2.q, 2); bad_decode(m, &g2, &c2, LLMKV_ERR_MISALIGNED, "misaligned q");
    g2 = ga; c2 = ca; g2.out = shift(g2.out, 2); c2.out = shift(c2.out, 2); bad_decode(m, &g2, &c2, LLMKV_ERR_MISALIGNED, "misaligned out");
    g2 = ga; c2 = ca; g2.lse = shift(g2.lse, 1); c2.lse = shift(c2.lse, 1); bad_decode(m, &g2, &c2, LLMKV_ERR_MISALIGNED, "misaligned lse");
    g2 = ga; c2 = ca; g2.q_stride = c2.q_stride = row + 2; bad_decode(m, &g2, &c2, LLMKV_ERR_MISALIGNED, "q_stride not a multiple of 4");
    g2 = ga; c2 = ca; g2.out_stride = c2.out_stride = row - 4; bad_decode(m, &g2, &c2, LLMKV_ERR_BUFFER_TOO_SMALL, "out_stride shorter than a row");
    g2 = ga; c2 = ca; g2.q_stride = c2.q_stride = 4; bad_decode(m, &g2, &c2, LLMKV_ERR_BUFFER_TOO_SMALL, "q_stride 4");
    /* put and gather arguments */
    {
        const size_t prow = (size_t)nkv * D * 4;
        void* mis = (void*)((char*)dsrc + 2);
        M_EXPECT(m, llmkv_cuda_put(m->gpu, m->lay.n_layers, dsrc, 0, dsrc, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_OUT_OF_RANGE);
        M_EXPECT(m, llmkv_cuda_put(m->gpu, 0, dsrc, 0, dsrc, 0, LLMKV_DTYPE_Q8, g_stream), LLMKV_ERR_INVALID_ARGUMENT);
        M_EXPECT(m, llmkv_cuda_put(m->gpu, 0, mis, 0, dsrc, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_MISALIGNED);
        M_EXPECT(m, llmkv_cuda_put(m->gpu, 0, dsrc, 0, dsrc, prow - 4, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_BUFFER_TOO_SMALL);
        M_EXPECT(m, llmkv_cuda_put(m->gpu, 0, dsrc, prow / 2 + 1, NULL, 0, LLMKV_DTYPE_F16, g_stream), LLMKV_ERR_MISALIGNED);
        M_EXPECT(m, llmkv_cuda_gather(m->gpu, 2, 0, 0, 1, dg, 0, NULL, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_OUT_OF_RANGE);
        M_EXPECT(m, llmkv_cuda_gather(m->gpu, 0, m->lay.n_layers, 0, 1, dg, 0, NULL, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_OUT_OF_RANGE);
        M_EXPECT(m, llmkv_cuda_gather(m->gpu, 1, 0, 5, 2, dg, 0, NULL, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_OUT_OF_RANGE);
        M_EXPECT(m, llmkv_cuda_gather(m->gpu, 0, 0, 0, 1, dg, 0, NULL, 0, LLMKV_DTYPE_Q8, g_stream), LLMKV_ERR_INVALID_ARGUMENT);
        M_EXPECT(m, llmkv_cuda_gather(m->gpu, 0, 0, 0, 1, (char*)dg + 2, 0, NULL, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_MISALIGNED);
        M_EXPECT(m, llmkv_cuda_gather(m->gpu, 0, 0, 0, 2, dg, prow - 4, NULL, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_BUFFER_TOO_SMALL);
    }
    m_pool_unchanged(m, snap, "after refused calls");
    /* a stale batch: a reserve after the upload */
    if (!m_reserve(m, &s[0], 1)) goto done;
    M_EXPECT(m, llmkv_cuda_put(m->gpu, 0, dsrc, 0, dsrc, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_STALE_BATCH);
    M_EXPECT(m, llmkv_cuda_decode(m->gpu, &ga, g_stream), LLMKV_ERR_STALE_BATCH);
    M_EXPECT(m, llmkv_cuda_gather(m->gpu, 0, 0, 0, 1, dg, 0, NULL, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_STALE_BATCH);
    M_EXPECT(m, llmkv_cuda_upload(m->gpu, m->gb, g_stream), LLMKV_ERR_STALE_BATCH);
    m_pool_unchanged(m, snap, "after a stale batch");
    /* nothing written to out, lse or the gather buffer */
    if (d2h(m->t, &m->lg, chk, dout, sizeof(float) * out_floats)) {
        for (i = 0; i < out_floats; ++i)
            if (!is_canary(chk + i)) {
                MFAIL(m, "a refused decode wrote out[%u]", i);
                break;
            }
    }
    if (d2h(m->t, &m->lg, chk, dlse, sizeof(float) * (nt * nq + 64))) {
        for (i = 0; i < nt * nq + 64; ++i)
            if (!is_canary(chk + i)) {
                MFAIL(m, "a refused decode wrote lse[%u]", i);
                break;
            }
    }
    {
        size_t gb = (size_t)64 * nkv * D * 4 + 64;
        unsigned char* g = (unsigned char*)xmalloc(gb);
        if (d2h(m->t, &m->lg, g, dg, gb))
            for (i = 0; i < gb; ++i)
                if (g[i] != 0x5A) {
                    MFAIL(m, "a refused gather wrote byte %u", i);
                    break;
                }
        free(g);
    }
    /* the next step works */
    q[0] = 1;
    q[1] = 0;
    if (!m_step(m, s, q, 2)) goto done;
    m_check_storage(m, "after the errors");
    {
        dec_opts o = dec_plain(nq);
        o.lse = 1;
        m_check_decode(m, &o, "after the errors");
    }
    /* upload errors keep the previous upload: more rows (max_tokens 48) or
       sequences (max_seqs 2) than the context holds, a batch of a cache with
       another page size */
    {
        llmkv_batch* big = NULL;
        llmkv_seq gs[3];
        uint32_t bq[3];
        gs[0] = s[0].g;
        gs[1] = s[1].g;
        gs[2].id = 0;
        bq[0] = m_len(m, &s[0]);
        bq[1] = m_len(m, &s[1]);
        bq[2] = 0;
        if (M_EXPECT(m, llmkv_batch_create(m->meta, 3, 256, &big), LLMKV_OK) &&
            M_EXPECT(m, llmkv_batch_build(big, gs, bq, 2), LLMKV_OK))
            M_EXPECT(m, llmkv_cuda_upload(m->gpu, big, g_stream), LLMKV_ERR_BATCH_FULL);
        bq[0] = bq[1] = 1;
        if (big && M_EXPECT(m, llmkv_seq_create(m->meta, &gs[2]), LLMKV_OK) &&
            M_EXPECT(m, llmkv_batch_build(big, gs, bq, 3), LLMKV_OK))
            M_EXPECT(m, llmkv_cuda_upload(m->gpu, big, g_stream), LLMKV_ERR_BATCH_FULL);
        if (gs[2].id) M_EXPECT(m, llmkv_seq_free(m->meta, gs[2]), LLMKV_OK);
        llmkv_batch_destroy(big);
    }
    {
        llmkv_desc od = m->desc;
        llmkv_cache* other = NULL;
        llmkv_batch* ob = NULL;
        llmkv_seq os;
        uint32_t one = 1;
        od.storage = LLMKV_STORAGE_METADATA_ONLY;
        od.page_size = m->lay.page_size * 2;
        od.max_seq_len = 0;
        od.n_pages = 4;
        if (M_EXPECT(m, llmkv_cache_create(&od, &other), LLMKV_OK) && M_EXPECT(m, llmkv_seq_create(other, &os), LLMKV_OK) &&
            M_EXPECT(m, llmkv_reserve(other, os, 1), LLMKV_OK) &&
            M_EXPECT(m, llmkv_batch_create(other, 1, 8, &ob), LLMKV_OK) &&
            M_EXPECT(m, llmkv_batch_build(ob, &os, &one, 1), LLMKV_OK))
            M_EXPECT(m, llmkv_cuda_upload(m->gpu, ob, g_stream), LLMKV_ERR_INVALID_ARGUMENT);
        llmkv_batch_destroy(ob);
        llmkv_cache_destroy(other);
    }
    m_check_storage(m, "the upload before the refused ones still serves");
    m_check_caches(m);
done:
    free(snap);
    free(hq);
    free(hout);
    free(hlse);
    free(chk);
    dev_free(dq);
    dev_free(dout);
    dev_free(dlse);
    dev_free(dsrc);
    dev_free(dg);
}

/* Refused decode, put and gather calls (bad descriptors, stale batches)
   return the error llmkv_attend returns and change nothing: not the pool,
   not out, lse or gather outputs; refused uploads keep the previous one. */
static void test_errors(tst* t) {
    mirror m;
    llmkv_cuda_desc gd;
    llmkv_desc d = make_desc(2, 2, 64, 16, 32, LLMKV_DTYPE_F16, LLMKV_DTYPE_Q8);
    memset(&gd, 0, sizeof gd);
    gd.max_tokens = 48;
    gd.max_seqs = 2;
    if (m_init(&m, t, &d, &gd, 48, 0, "errors k f16 v q8 head_dim 64 kv heads 2 page 16 max_tokens 48 max_seqs 2"))
        run_errors(&m);
    m_free(&m);
}

/* head_dim 48 has no decode kernel: decode says LLMKV_ERR_UNSUPPORTED (and
   writes nothing) while put, gather, copies and swap still serve it. */
static void test_unsupported_head_dim(tst* t) {
    mirror m;
    llmkv_desc d = make_desc(2, 2, 48, 16, 32, LLMKV_DTYPE_F16, LLMKV_DTYPE_Q4);
    if (m_init(&m, t, &d, NULL, 256, 1, "head_dim 48 k f16 v q4 page 16")) {
        mseq s[2];
        uint32_t q[2];
        q[0] = 21;
        q[1] = 16;
        int ok = m_create(&m, &s[0]) && m_reserve(&m, &s[0], q[0]) && m_step(&m, s, q, 1) && m_fork(&m, &s[0], &s[1]);
        q[0] = 2;
        q[1] = 3;
        if (ok && m_reserve_many(&m, s, q, 2) && m_step(&m, s, q, 2)) {
            llmkv_attn_desc a;
            void* dq = dev_alloc(t, &m.lg, 4 * 5 * 4 * 48);
            float* back = (float*)xmalloc(4 * 5 * 4 * 48);
            uint32_t i;
            m_check_storage(&m, "put/gather at head_dim 48");
            memset(&a, 0, sizeof a);
            a.n_q_heads = 4;
            a.q = (const float*)dq;
            a.out = (float*)dq;
            if (dq && dev_fill(t, &m.lg, dq, 0x3C, 4 * 5 * 4 * 48)) {
                M_EXPECT(&m, llmkv_cuda_decode(m.gpu, &a, g_stream), LLMKV_ERR_UNSUPPORTED);
                if (d2h(t, &m.lg, back, dq, 4 * 5 * 4 * 48))
                    for (i = 0; i < 5 * 4 * 48; ++i)
                        if (bits_of_f32(back[i]) != 0x3C3C3C3Cu) {
                            MFAIL(&m, "a refused decode wrote out");
                            break;
                        }
            }
            free(back);
            dev_free(dq);
            swap_round(&m, &s[1], 0);
            q[0] = q[1] = 0;
            if (m_step(&m, s, q, 2)) m_check_storage(&m, "after a swap at head_dim 48");
        }
    }
    m_free(&m);
}

/* llmkv_cuda_create refuses a host cache, bad options, a device past the
   last and a pool larger than the device (about 1 TiB), and leaves the
   cache as it was; put, gather and decode before any upload say
   LLMKV_ERR_STALE_BATCH. */
static void test_create_errors(tst* t) {
    qlog lg;
    llmkv_cache *host = NULL, *meta = NULL, *huge = NULL;
    llmkv_cuda* g = NULL;
    llmkv_cuda_desc gd;
    llmkv_desc d = make_desc(1, 2, 64, 16, 8, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    void* p = NULL;
    char msg[256];
    lg.n = 0;
    if (!T_EXPECT(t, &lg, "create", llmkv_cache_create(&d, &host), LLMKV_OK)) goto done;
    g = (llmkv_cuda*)&lg; /* any non-NULL value: a failed create must reset *out */
    T_EXPECT(t, &lg, "host cache", llmkv_cuda_create(host, NULL, &g), LLMKV_ERR_INVALID_ARGUMENT);
    if (g) tfail(t, &lg, __LINE__, "a failed llmkv_cuda_create left *out set");
    d.storage = LLMKV_STORAGE_METADATA_ONLY;
    if (!T_EXPECT(t, &lg, "create", llmkv_cache_create(&d, &meta), LLMKV_OK)) goto done;
    T_EXPECT(t, &lg, "out NULL", llmkv_cuda_create(meta, NULL, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    T_EXPECT(t, &lg, "cache NULL", llmkv_cuda_create(NULL, NULL, &g), LLMKV_ERR_INVALID_ARGUMENT);
    memset(&gd, 0, sizeof gd);
    gd.device = llmkv_cuda_device_count();
    T_EXPECT(t, &lg, "device past the last", llmkv_cuda_create(meta, &gd, &g), LLMKV_ERR_NO_DEVICE);
    if (g) tfail(t, &lg, __LINE__, "a failed llmkv_cuda_create left *out set");
    gd.device = -1;
    T_EXPECT(t, &lg, "device -1", llmkv_cuda_create(meta, &gd, &g), LLMKV_ERR_INVALID_ARGUMENT);
    memset(&gd, 0, sizeof gd);
    gd.max_splits = 1025;
    T_EXPECT(t, &lg, "max_splits 1025", llmkv_cuda_create(meta, &gd, &g), LLMKV_ERR_INVALID_ARGUMENT);
    memset(&gd, 0, sizeof gd);
    gd.fixed_splits = 65; /* past the default max_splits 64 */
    T_EXPECT(t, &lg, "fixed_splits > max_splits", llmkv_cuda_create(meta, &gd, &g), LLMKV_ERR_INVALID_ARGUMENT);
    /* 2048 pages of 512 MiB */
    {
        llmkv_desc hd = make_desc(64, 8, 128, 1024, 2048, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32);
        llmkv_layout lay;
        memset(&lay, 0, sizeof lay);
        hd.storage = LLMKV_STORAGE_METADATA_ONLY;
        hd.max_seqs = 4;
        hd.max_seq_len = 8192;
        if (T_EXPECT(t, &lg, "huge", llmkv_cache_create(&hd, &huge), LLMKV_OK)) {
            (void)llmkv_cache_layout(huge, &lay);
            if (lay.page_bytes * 2048 < ((uint64_t)1 << 40)) tfail(t, &lg, __LINE__, "the huge pool is only %llu bytes", (unsigned long long)(lay.page_bytes * 2048));
            T_EXPECT(t, &lg, "1 TiB pool", llmkv_cuda_create(huge, NULL, &g), LLMKV_ERR_DEVICE_OUT_OF_MEMORY);
            if (g) tfail(t, &lg, __LINE__, "a failed llmkv_cuda_create left *out set");
            if (llmkv_cache_check(huge, msg, sizeof msg) != LLMKV_OK) tfail(t, &lg, __LINE__, "huge cache: %s", msg);
        }
    }
    /* the device still works: a context, and calls before any upload */
    if (T_EXPECT(t, &lg, "small", llmkv_cuda_create(meta, NULL, &g), LLMKV_OK)) {
        llmkv_attn_desc a;
        void* dbuf = dev_alloc(t, &lg, 4096);
        memset(&a, 0, sizeof a);
        a.n_q_heads = 2;
        a.q = (const float*)dbuf;
        a.out = (float*)dbuf;
        T_EXPECT(t, &lg, "no upload", llmkv_cuda_put(g, 0, dbuf, 0, NULL, 0, LLMKV_DTYPE_F32, g_stream), LLMKV_ERR_STALE_BATCH);
        T_EXPECT(t, &lg, "no upload", llmkv_cuda_gather(g, 0, 0, 0, 1, dbuf, 0, NULL, 0, LLMKV_DTYPE_DEFAULT, g_stream), LLMKV_ERR_STALE_BATCH);
        T_EXPECT(t, &lg, "no upload", llmkv_cuda_decode(g, &a, g_stream), LLMKV_ERR_STALE_BATCH);
        dev_free(dbuf);
        llmkv_cuda_destroy(g);
        g = NULL;
    }
    if (llmkv_cache_check(meta, msg, sizeof msg) != LLMKV_OK) tfail(t, &lg, __LINE__, "metadata-only cache: %s", msg);
    T_EXPECT(t, &lg, "host_alloc", llmkv_cuda_host_alloc(0, &p), LLMKV_ERR_INVALID_ARGUMENT);
    T_EXPECT(t, &lg, "host_alloc", llmkv_cuda_host_alloc(64, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    T_EXPECT(t, &lg, "pool", llmkv_cuda_pool(NULL, &p, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    llmkv_cuda_host_free(NULL);
    llmkv_cuda_destroy(NULL);
done:
    llmkv_cache_destroy(huge);
    llmkv_cache_destroy(meta);
    llmkv_cache_destroy(host);
}

/* llmkv_cuda_upload must refuse a batch built on another cache, even one of
   the same shape whose page ids all lie inside this pool (the API promises
   LLMKV_ERR_INVALID_ARGUMENT for "a batch of another cache"). */
static void test_upload_foreign_batch(tst* t) {
    qlog lg;
    llmkv_desc d = make_desc(1, 2, 64, 16, 8, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    llmkv_cache *a = NULL, *b = NULL;
    llmkv_cuda* g = NULL;
    llmkv_batch* bb = NULL;
    llmkv_seq s;
    uint32_t one = 1;
    lg.n = 0;
    d.storage = LLMKV_STORAGE_METADATA_ONLY;
    if (T_EXPECT(t, &lg, "foreign", llmkv_cache_create(&d, &a), LLMKV_OK) &&
        T_EXPECT(t, &lg, "foreign", llmkv_cache_create(&d, &b), LLMKV_OK) &&
        T_EXPECT(t, &lg, "foreign", llmkv_cuda_create(a, NULL, &g), LLMKV_OK) &&
        T_EXPECT(t, &lg, "foreign", llmkv_seq_create(b, &s), LLMKV_OK) &&
        T_EXPECT(t, &lg, "foreign", llmkv_reserve(b, s, 3), LLMKV_OK) &&
        T_EXPECT(t, &lg, "foreign", llmkv_batch_create(b, 1, 8, &bb), LLMKV_OK) &&
        T_EXPECT(t, &lg, "foreign", llmkv_batch_build(bb, &s, &one, 1), LLMKV_OK))
        T_EXPECT(t, &lg, "a same-shape batch of another cache", llmkv_cuda_upload(g, bb, g_stream),
                 LLMKV_ERR_INVALID_ARGUMENT);
    (void)cudaStreamSynchronize(g_stream);
    llmkv_batch_destroy(bb);
    llmkv_cuda_destroy(g);
    llmkv_cache_destroy(b);
    llmkv_cache_destroy(a);
}

/* ------------------------------------------------------------------------ */
/* Runner                                                                   */
/* ------------------------------------------------------------------------ */

/* Runs one test (when its name contains the filter), with its time, and
   fails it if it leaves a device error behind. */
#define RUN(t, fn)                                                                                   \
    do {                                                                                             \
        if (!(t)->filter || strstr(#fn, (t)->filter)) {                                              \
            double t0_ = now_s();                                                                    \
            cudaError_t e_;                                                                          \
            (t)->cur_failures = 0;                                                                   \
            (t)->cur_skipped = 0;                                                                    \
            fn(t);                                                                                   \
            e_ = cudaDeviceSynchronize();                                                            \
            if (e_ == cudaSuccess) e_ = cudaGetLastError();                                          \
            if (e_ != cudaSuccess) {                                                                 \
                fprintf(stderr, "  FAIL %s: device error %s\n", #fn, cudaGetErrorString(e_));        \
                (t)->cur_failures++;                                                                 \
            }                                                                                        \
            if ((t)->cur_failures) {                                                                 \
                (t)->failed++;                                                                       \
                fprintf(stderr, "failed: %s (%.2f s)\n", #fn, now_s() - t0_);                       \
            } else {                                                                                 \
                (t)->passed++;                                                                       \
                fprintf(stderr, "ok: %s (%.2f s)\n", #fn, now_s() - t0_);                           \
            }                                                                                        \
        }                                                                                            \
    } while (0)

int main(int argc, char** argv) {
    tst t;
    cudaDeviceProp prop;
    const char* seed = getenv("LLMKV_TEST_SEED");
    memset(&t, 0, sizeof t);
    t.filter = argc > 1 ? argv[1] : NULL;
    g_verbose = getenv("LLMKV_TEST_VERBOSE") != NULL;
    if (seed) g_seed ^= strtoull(seed, NULL, 0);
    if (llmkv_cuda_device_count() == 0) {
        printf("no CUDA device: GPU tests not run\n");
        printf("0 passed, 0 failed\n");
        return 0;
    }
    memset(&prop, 0, sizeof prop);
    if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess)
        fprintf(stderr, "device 0: %s, %d multiprocessors; CPU reference path %s\n", prop.name,
                prop.multiProcessorCount, llmkv_cpu_path_name(llmkv_cpu_path_auto()));
    if (cudaStreamCreate(&g_stream) != cudaSuccess) {
        printf("cudaStreamCreate failed\n");
        printf("0 passed, 1 failed\n");
        return 1;
    }
    RUN(&t, test_create_errors);
    RUN(&t, test_put_gather);
    RUN(&t, test_decode_shapes);
    RUN(&t, test_decode_long);
    RUN(&t, test_copies);
    RUN(&t, test_prefix);
    RUN(&t, test_swap);
    RUN(&t, test_swap_unknown_tokens);
    RUN(&t, test_errors);
    RUN(&t, test_unsupported_head_dim);
    RUN(&t, test_upload_foreign_batch);
#if !defined(LLMKV_GPU_EMULATE) && !defined(LLMKV_TEST_HIP)
    RUN(&t, test_graph);
#endif
    (void)cudaStreamDestroy(g_stream);
    fprintf(stderr, "largest decode error / bound: %.3g against the exact reference, %.3g against llmkv_attend\n",
            g_worst_ref, g_worst_cpu);
    printf("%d passed, %d failed\n", t.passed, t.failed);
    return t.failed ? 1 : 0;
}
