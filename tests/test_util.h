/* Minimal test harness shared by every llmkv test file.

   A test is `static void test_name(tst* t)`; it records failures with
   TST_CHECK / TST_EQ (which print file:line and keep going) and may bail
   out early with TST_REQUIRE. Each suite file exports one
   `void suite_<area>(tst* t)` that runs its tests with TST_RUN. A test
   passes when none of its checks failed; the runner prints
   "N passed, N failed" as its last line. */
#ifndef LLMKV_TEST_UTIL_H
#define LLMKV_TEST_UTIL_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include "../llmkv.h"

typedef struct tst {
    int passed;           /* tests without a failed check */
    int failed;           /* tests with at least one */
    int skipped;          /* tests that could not run here (said why) */
    int cur_failures;     /* failed checks in the running test */
    int cur_skipped;
    const char* filter;   /* run only tests whose name contains this */
    int verbose;
} tst;

#define TST_CHECK(t, cond)                                                       \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "  FAIL %s:%d: %s\n", __FILE__, __LINE__, #cond);    \
            (t)->cur_failures++;                                                 \
        }                                                                        \
    } while (0)

/* Like TST_CHECK, with the two integer values printed. */
#define TST_EQ(t, a, b)                                                          \
    do {                                                                         \
        long long tst_a_ = (long long)(a), tst_b_ = (long long)(b);              \
        if (tst_a_ != tst_b_) {                                                  \
            fprintf(stderr, "  FAIL %s:%d: %s == %s (%lld vs %lld)\n", __FILE__, \
                    __LINE__, #a, #b, tst_a_, tst_b_);                           \
            (t)->cur_failures++;                                                 \
        }                                                                        \
    } while (0)

/* Fails the test and returns from it when cond is false. */
#define TST_REQUIRE(t, cond)                                                     \
    do {                                                                         \
        if (!(cond)) {                                                           \
            fprintf(stderr, "  FAIL %s:%d: %s (test stopped)\n", __FILE__,       \
                    __LINE__, #cond);                                            \
            (t)->cur_failures++;                                                 \
            return;                                                              \
        }                                                                        \
    } while (0)

/* Marks the running test skipped, with the reason printed, and returns. */
#define TST_SKIP(t, why)                                                         \
    do {                                                                         \
        fprintf(stderr, "  SKIP %s\n", (why));                                   \
        (t)->cur_skipped = 1;                                                    \
        return;                                                                  \
    } while (0)

#define TST_RUN(t, fn)                                                           \
    do {                                                                         \
        if (!(t)->filter || strstr(#fn, (t)->filter)) {                          \
            (t)->cur_failures = 0;                                               \
            (t)->cur_skipped = 0;                                                \
            if ((t)->verbose) fprintf(stderr, "%s\n", #fn);                      \
            fn(t);                                                               \
            if ((t)->cur_failures) {                                             \
                (t)->failed++;                                                   \
                fprintf(stderr, "failed: %s\n", #fn);                            \
            } else if ((t)->cur_skipped) {                                       \
                (t)->skipped++;                                                  \
            } else {                                                             \
                (t)->passed++;                                                   \
            }                                                                    \
        }                                                                        \
    } while (0)

/* Deterministic 64-bit generator (splitmix64) for reproducible tests. */
typedef struct tst_rng { unsigned long long s; } tst_rng;

static inline unsigned long long tst_next(tst_rng* r) {
    unsigned long long z = (r->s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
/* Uniform in [0, n) (n > 0). */
static inline unsigned tst_below(tst_rng* r, unsigned n) {
    return (unsigned)(tst_next(r) % n);
}
/* Uniform float in [-1, 1). */
static inline float tst_float(tst_rng* r) {
    return (float)((double)(tst_next(r) >> 11) * (1.0 / 9007199254740992.0) * 2.0 - 1.0);
}

/* Suites, one per test file. */
void suite_cache(tst* t);
void suite_model(tst* t);
void suite_fault(tst* t);
void suite_attn(tst* t);
void suite_quant(tst* t);
void suite_q4c(tst* t);
void suite_prefix(tst* t);
void suite_threads(tst* t);
void suite_persist(tst* t);
void suite_format(tst* t);
void suite_llama(tst* t);


/* The query of one head as the VNNI kernel (paths AVX512_BF16 and
   AVX512_VNNI) uses it against Q4 keys (head_dim a multiple of 128), see
   llmkv_cpu_path: x = q * scale in F32, q_int = rint(clamp(x * (127 / m),
   -127, 127)) with m = max |x| (F32 throughout), used as q_int * (m / 127).
   Writes that effective query divided by `scale` to out (double), so a
   reference that multiplies its dot products by scale gets the path's
   logits. tst_int8_query_used says whether a (resolved) path does this. */
static inline int tst_int8_query_used(llmkv_cpu_path path, llmkv_dtype kt, unsigned D) {
    return (path == LLMKV_CPU_PATH_AVX512_BF16 || path == LLMKV_CPU_PATH_AVX512_VNNI) && kt == LLMKV_DTYPE_Q4 &&
           D % 128 == 0;
}

static inline void tst_int8_query(const float* q, unsigned D, float scale, double* out) {
    float m = 0.0f, inv, back;
    unsigned d;
    for (d = 0; d < D; ++d) {
        float x = q[d] * scale;
        if (fabsf(x) > m) m = fabsf(x);
    }
    inv = m > 0.0f ? 127.0f / m : 0.0f;
    back = m / 127.0f;
    for (d = 0; d < D; ++d) {
        float y = q[d] * scale * inv;
        y = y < -127.0f ? -127.0f : y > 127.0f ? 127.0f : y;
        out[d] = (double)rintf(y) * (double)back / (double)scale;
    }
}

/* QFAIL: a failed check with a printf-style message. Messages are capped per test so a broken build does not flood
   the log; the count lives in the test's own frame. */
typedef struct qlog { int n; } qlog;
#define QFAIL(t, lg, ...)                                                        \
    do {                                                                         \
        (t)->cur_failures++;                                                     \
        if ((lg)->n++ < 12) {                                                    \
            fprintf(stderr, "  FAIL %s:%d: ", __FILE__, __LINE__);               \
            fprintf(stderr, __VA_ARGS__);                                        \
            fputc('\n', stderr);                                                 \
        }                                                                        \
    } while (0)

/* A cache descriptor with the shape fields set and everything else 0
   (defaults). */
static inline llmkv_desc tst_desc(unsigned n_layers, unsigned n_kv, unsigned D, unsigned ps, unsigned n_pages,
                                  llmkv_dtype kt, llmkv_dtype vt) {
    llmkv_desc d;
    memset(&d, 0, sizeof d);
    d.n_layers = n_layers;
    d.n_kv_heads = n_kv;
    d.head_dim = D;
    d.page_size = ps;
    d.n_pages = n_pages;
    d.k_dtype = kt;
    d.v_dtype = vt;
    return d;
}

#endif
