/* Unit tests, one or more per operation, with expected values worked out
   here by hand or by independent reference code (never by the library).

   This file holds its own private copy of the implementation (LLMKV_STATIC):
   that tests the static-linkage option and lets the checker tests corrupt
   internal state on purpose to prove llmkv_cache_check notices. */
#define LLMKV_STATIC
#define LLMKV_IMPLEMENTATION
#include "../llmkv.h"
#include "test_util.h"

#include <math.h>

#define OK(t, call) TST_EQ(t, (call), LLMKV_OK)

static llmkv_desc small_desc(uint32_t page_size, uint32_t n_pages) {
    llmkv_desc d;
    memset(&d, 0, sizeof d);
    d.n_layers = 2;
    d.n_kv_heads = 2;
    d.head_dim = 4;
    d.page_size = page_size;
    d.n_pages = n_pages;
    d.k_dtype = LLMKV_DTYPE_F32;
    d.v_dtype = LLMKV_DTYPE_F32;
    return d;
}

/* Deterministic value of element e of head h, token at position pos, layer l. */
static float val(uint32_t layer, uint32_t pos, uint32_t h, uint32_t e, int is_v) {
    return (float)(is_v ? -1 : 1) * (float)(layer * 1000 + pos * 10 + h * 4 + e) * 0.25f;
}

/* Fills rows [n][2 heads][4] for positions [first, first + n). */
static void fill_rows(float* k, float* v, uint32_t layer, uint32_t first, uint32_t n) {
    uint32_t i, h, e;
    for (i = 0; i < n; ++i)
        for (h = 0; h < 2; ++h)
            for (e = 0; e < 4; ++e) {
                k[(i * 2 + h) * 4 + e] = val(layer, first + i, h, e, 0);
                v[(i * 2 + h) * 4 + e] = val(layer, first + i, h, e, 1);
            }
}

/* Appends n tokens to s (reserve, then put every layer with val()). */
static llmkv_result append(llmkv_cache* kv, llmkv_seq s, uint32_t n) {
    float k[64 * 8], v[64 * 8];
    uint32_t len = 0, layer;
    llmkv_result r = llmkv_reserve(kv, s, n);
    if (r != LLMKV_OK) return r;
    r = llmkv_seq_length(kv, s, &len);
    if (r != LLMKV_OK) return r;
    for (layer = 0; layer < 2; ++layer) {
        fill_rows(k, v, layer, len - n, n);
        r = llmkv_put(kv, s, layer, n, k, 0, v, 0, LLMKV_DTYPE_F32);
        if (r != LLMKV_OK) return r;
    }
    return LLMKV_OK;
}

/* 1 when every layer of s holds val() at positions [0, length). */
static int holds_vals(llmkv_cache* kv, llmkv_seq s) {
    float k[256 * 8], v[256 * 8], ek[256 * 8], ev[256 * 8];
    uint32_t len, layer;
    if (llmkv_seq_length(kv, s, &len) != LLMKV_OK || len > 256) return 0;
    for (layer = 0; layer < 2; ++layer) {
        if (llmkv_gather(kv, s, layer, 0, len, k, 0, v, 0, LLMKV_DTYPE_F32) != LLMKV_OK) return 0;
        fill_rows(ek, ev, layer, 0, len);
        if (memcmp(k, ek, (size_t)len * 32) || memcmp(v, ev, (size_t)len * 32)) return 0;
    }
    return 1;
}

static int check_ok(llmkv_cache* kv) {
    char msg[256];
    llmkv_result r = llmkv_cache_check(kv, msg, sizeof msg);
    if (r != LLMKV_OK) fprintf(stderr, "  check: %s\n", msg);
    return r == LLMKV_OK;
}

/* ---- results, version, conversions ------------------------------------ */

static void test_result_strings(tst* t) {
    static const llmkv_result codes[] = {
        LLMKV_OK, LLMKV_ERR_INVALID_ARGUMENT, LLMKV_ERR_OUT_OF_RANGE, LLMKV_ERR_STALE_HANDLE,
        LLMKV_ERR_BUFFER_TOO_SMALL, LLMKV_ERR_MISALIGNED, LLMKV_ERR_OUT_OF_MEMORY, LLMKV_ERR_OUT_OF_PAGES,
        LLMKV_ERR_TOO_MANY_SEQUENCES, LLMKV_ERR_SEQUENCE_TOO_LONG, LLMKV_ERR_COPY_QUEUE_FULL,
        LLMKV_ERR_BATCH_FULL, LLMKV_ERR_STALE_BATCH, LLMKV_ERR_NO_PAGE_DATA, LLMKV_ERR_CORRUPT,
        LLMKV_ERR_NO_DEVICE, LLMKV_ERR_DEVICE_OUT_OF_MEMORY, LLMKV_ERR_DEVICE, LLMKV_ERR_UNSUPPORTED};
    size_t i, j, n = sizeof codes / sizeof codes[0];
    for (i = 0; i < n; ++i) {
        const char* s = llmkv_result_string(codes[i]);
        TST_CHECK(t, s && strncmp(s, "LLMKV_", 6) == 0);
        for (j = 0; j < i; ++j) TST_CHECK(t, strcmp(s, llmkv_result_string(codes[j])) != 0);
    }
    TST_CHECK(t, strstr(llmkv_result_string((llmkv_result)-77), "unknown") != NULL);
    TST_CHECK(t, strcmp(llmkv_version(), LLMKV_VERSION_STRING) == 0);
    TST_CHECK(t, LLMKV_VERSION_MAJOR == 0 && LLMKV_VERSION_MINOR == 1);
}

/* Value of an f16 bit pattern, computed with ldexp (independent of the library). */
static double f16_ref_value(unsigned h) {
    unsigned e = (h >> 10) & 31, m = h & 1023;
    double s = (h & 0x8000) ? -1.0 : 1.0;
    if (e == 0) return s * ldexp((double)m, -24);
    if (e == 31) return m ? NAN : s * INFINITY;
    return s * ldexp((double)(m | 1024), (int)e - 25);
}

/* Nearest f16 to x, ties to even mantissa, by search over every finite
   positive pattern (independent of the library's bit tricks). */
static unsigned f16_ref_round(float xf) {
    double x = fabs((double)xf);
    unsigned sign = signbit(xf) ? 0x8000u : 0u, best = 0, h;
    double best_err = INFINITY;
    if (isnan(xf)) return 0x7e00u;
    if (x >= 65520.0) return sign | 0x7c00u; /* past max + half ulp: inf */
    for (h = 0; h < 0x7c00u; ++h) {
        double err = fabs(f16_ref_value(h) - x);
        if (err < best_err || (err == best_err && (h & 1u) == 0)) { best_err = err; best = h; }
    }
    return sign | best;
}

static void test_f16_conversion(tst* t) {
    unsigned h;
    tst_rng rng = {42};
    int i;
    /* Every f16 pattern decodes to its exact value and encodes back. */
    for (h = 0; h < 0x10000u; ++h) {
        double ref = f16_ref_value(h);
        float f = llmkv_f16_to_f32((uint16_t)h);
        if (isnan(ref)) {
            TST_CHECK(t, isnan(f));
            TST_CHECK(t, (llmkv_f32_to_f16(f) & 0x7c00u) == 0x7c00u && (llmkv_f32_to_f16(f) & 0x3ffu));
            continue;
        }
        if ((double)f != ref) { TST_CHECK(t, (double)f == ref); break; }
        if (llmkv_f32_to_f16(f) != h) { TST_EQ(t, llmkv_f32_to_f16(f), h); break; }
    }
    /* Halfway points between neighbours round to the even one. */
    for (h = 0; h < 0x7bffu; h += 97) {
        float mid = (float)((f16_ref_value(h) + f16_ref_value(h + 1)) / 2);
        TST_EQ(t, llmkv_f32_to_f16(mid), (h & 1u) ? h + 1 : h);
    }
    TST_EQ(t, llmkv_f32_to_f16(65504.0f), 0x7bffu);
    TST_EQ(t, llmkv_f32_to_f16(65519.99f), 0x7bffu);
    TST_EQ(t, llmkv_f32_to_f16(65520.0f), 0x7c00u);
    TST_EQ(t, llmkv_f32_to_f16(-1e30f), 0xfc00u);
    TST_EQ(t, llmkv_f32_to_f16(1e-30f), 0u);
    TST_EQ(t, llmkv_f32_to_f16(-0.0f), 0x8000u);
    /* Random values of every magnitude against the exhaustive reference. */
    for (i = 0; i < 300; ++i) {
        float x = tst_float(&rng) * (float)ldexp(1.0, (int)tst_below(&rng, 44) - 28);
        unsigned got = llmkv_f32_to_f16(x), want = f16_ref_round(x);
        if (got != want) {
            fprintf(stderr, "  f16(%.9g): got %04x want %04x\n", (double)x, got, want);
            TST_EQ(t, got, want);
            break;
        }
    }
}

static void test_bf16_conversion(tst* t) {
    tst_rng rng = {7};
    int i;
    for (i = 0; i < 100000; ++i) {
        uint32_t u = (uint32_t)tst_next(&rng), lo, hi, want;
        float x, flo, fhi;
        double dlo, dhi, dx;
        memcpy(&x, &u, 4);
        if (isnan(x)) {
            TST_CHECK(t, isnan(llmkv_bf16_to_f32(llmkv_f32_to_bf16(x))));
            continue;
        }
        /* The two bf16 neighbours by truncation; pick the nearer (ties even). */
        lo = u >> 16;
        hi = lo + 1;
        flo = llmkv_bf16_to_f32((uint16_t)lo);
        fhi = llmkv_bf16_to_f32((uint16_t)hi);
        dx = (double)x; dlo = (double)flo; dhi = isinf(fhi) ? (double)fhi : (double)fhi;
        if (isinf(x)) want = lo;
        else if (fabs(dx - dlo) < fabs(dhi - dx)) want = lo;
        else if (fabs(dx - dlo) > fabs(dhi - dx)) want = hi;
        else want = (lo & 1u) ? hi : lo;
        if (llmkv_f32_to_bf16(x) != (uint16_t)want) {
            TST_EQ(t, llmkv_f32_to_bf16(x), want);
            break;
        }
    }
    TST_EQ(t, llmkv_f32_to_bf16(1.0f), 0x3f80u);
    TST_CHECK(t, llmkv_bf16_to_f32(0x3f80u) == 1.0f);
    TST_CHECK(t, isinf(llmkv_bf16_to_f32(llmkv_f32_to_bf16(3.4e38f)))); /* rounds up past max */
}

/* The vector conversions used by put and gather (F16C/AVX2) give exactly
   the scalar functions' bits: every 2^32/2^20-th pattern, NaNs, infinities
   and subnormals included. */
static void test_simd_conversion_matches_scalar(tst* t) {
    enum { N = 4096 };
    static float src[N], wide[N];
    static uint16_t got[N], want[N];
    uint64_t u = 0;
    int round, i, k;
    if (!llmkv_cpu_path_supported(LLMKV_CPU_PATH_AVX2) || llmkv__convert_simd(got, LLMKV_DTYPE_F16, src, LLMKV_DTYPE_F32, 8) == 0)
        TST_SKIP(t, "test_simd_conversion_matches_scalar: no vector conversion on this machine or build");
    for (round = 0; round < 256; ++round) {
        for (i = 0; i < N; ++i) {
            uint32_t bits = (uint32_t)(u >> 12);
            memcpy(&src[i], &bits, 4);
            u += 0x1000ull * 1048573ull + (uint64_t)round;
        }
        for (k = 0; k < 2; ++k) {
            llmkv_dtype dt = k ? LLMKV_DTYPE_BF16 : LLMKV_DTYPE_F16;
            uint32_t done = llmkv__convert_simd(got, dt, src, LLMKV_DTYPE_F32, N);
            TST_EQ(t, done, N);
            for (i = 0; i < N; ++i) want[i] = k ? llmkv_f32_to_bf16(src[i]) : llmkv_f32_to_f16(src[i]);
            if (memcmp(got, want, sizeof got)) {
                fprintf(stderr, "  f32 -> %s: vector and scalar conversions differ\n", llmkv_dtype_name(dt));
                TST_CHECK(t, 0);
                return;
            }
            llmkv__convert_simd(wide, LLMKV_DTYPE_F32, want, dt, N);
            for (i = 0; i < N; ++i) {
                float w = k ? llmkv_bf16_to_f32(want[i]) : llmkv_f16_to_f32(want[i]);
                if (memcmp(&w, &wide[i], 4)) {
                    fprintf(stderr, "  %s -> f32: vector and scalar conversions differ\n", llmkv_dtype_name(dt));
                    TST_CHECK(t, 0);
                    return;
                }
            }
        }
    }
}

/* ---- descriptor, layout, creation ------------------------------------- */

static void test_desc_validation(tst* t) {
    llmkv_desc d = small_desc(16, 4), b;
    llmkv_cache* kv = NULL;
    b = d; b.n_layers = 0;     TST_EQ(t, llmkv_cache_create(&b, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, kv == NULL);
    b = d; b.n_kv_heads = 0;   TST_EQ(t, llmkv_cache_create(&b, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    b = d; b.head_dim = 0;     TST_EQ(t, llmkv_cache_create(&b, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    b = d; b.head_dim = 513;   TST_EQ(t, llmkv_cache_create(&b, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    b = d; b.page_size = 1025; TST_EQ(t, llmkv_cache_create(&b, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    b = d; b.k_dtype = (llmkv_dtype)99; TST_EQ(t, llmkv_cache_create(&b, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    b = d; b.storage = (llmkv_storage)5; TST_EQ(t, llmkv_cache_create(&b, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    b = d; b.max_seqs = 1048576; TST_EQ(t, llmkv_cache_create(&b, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    b = d; b.n_pages = 0;      TST_EQ(t, llmkv_cache_create(&b, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    b = d; b.allocator.alloc = NULL; b.allocator.free = llmkv__default_free;
    TST_EQ(t, llmkv_cache_create(&b, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_cache_create(NULL, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_cache_create(&d, NULL), LLMKV_ERR_INVALID_ARGUMENT);
    /* Boundary values that must work. */
    b = d; b.head_dim = 512; b.page_size = 1024; b.n_pages = 1;
    OK(t, llmkv_cache_create(&b, &kv));
    llmkv_cache_destroy(kv);
    b = d; b.head_dim = 1; b.page_size = 1; b.n_layers = 1; b.n_kv_heads = 1;
    OK(t, llmkv_cache_create(&b, &kv));
    llmkv_cache_destroy(kv);
}

typedef struct log_capture { int calls; char last[256]; } log_capture;
static void capture_log(void* user, llmkv_log_level level, const char* msg) {
    log_capture* c = (log_capture*)user;
    (void)level;
    c->calls++;
    strncpy(c->last, msg, sizeof c->last - 1);
}

static void test_logger_says_why(tst* t) {
    llmkv_desc d = small_desc(16, 4);
    llmkv_cache* kv;
    log_capture cap;
    memset(&cap, 0, sizeof cap);
    d.head_dim = 600;
    d.logger.fn = capture_log;
    d.logger.user = &cap;
    TST_EQ(t, llmkv_cache_create(&d, &kv), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, cap.calls, 1);
    TST_CHECK(t, strstr(cap.last, "head_dim") != NULL);
}

static void test_defaults(tst* t) {
    llmkv_desc d, e;
    llmkv_cache* kv;
    memset(&d, 0, sizeof d);
    memset(&e, 0, sizeof e); /* read even if a call under test fails */
    d.n_layers = 3; d.n_kv_heads = 2; d.head_dim = 8; d.n_pages = 10;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_cache_desc(kv, &e));
    TST_EQ(t, e.page_size, 16);
    TST_EQ(t, e.k_dtype, LLMKV_DTYPE_F16);
    TST_EQ(t, e.v_dtype, LLMKV_DTYPE_F16);
    TST_EQ(t, e.max_seqs, 256);
    TST_EQ(t, e.max_seq_len, 160);
    llmkv_cache_destroy(kv);
    /* capacity_bytes rounds down to whole pages: page = 3 * 2 * 2*16*8*2 = 3 * 1024 bytes. */
    d.n_pages = 0;
    d.capacity_bytes = 3072 * 5 + 3071;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_cache_desc(kv, &e));
    TST_EQ(t, e.n_pages, 5);
    llmkv_cache_destroy(kv);
    d.capacity_bytes = 3071;
    TST_EQ(t, llmkv_cache_create(&d, &kv), LLMKV_ERR_INVALID_ARGUMENT);
}

static void test_layout_geometry(tst* t) {
    llmkv_desc d;
    llmkv_layout l;
    memset(&d, 0, sizeof d);
    d.n_layers = 3; d.n_kv_heads = 5; d.head_dim = 7; d.page_size = 3;
    d.k_dtype = LLMKV_DTYPE_F32; d.v_dtype = LLMKV_DTYPE_BF16;
    OK(t, llmkv_layout_for(&d, &l));
    TST_EQ(t, l.k.slot_stride, 28);          /* 7 * 4 */
    TST_EQ(t, l.k.head_stride, 84);          /* 3 slots */
    TST_EQ(t, l.k.bytes, 420);               /* 5 heads */
    TST_EQ(t, l.k.offset, 0);
    TST_EQ(t, l.v.offset, 448);              /* 420 rounded up to 64 */
    TST_EQ(t, l.v.slot_stride, 14);
    TST_EQ(t, l.v.bytes, 210);
    TST_EQ(t, l.layer_stride, 704);          /* 448 + 210 = 658 -> 704 */
    TST_EQ(t, l.page_bytes, 3 * 704);
    TST_EQ(t, l.k.scale_bytes, 0);
    TST_EQ(t, l.k.elem_bytes, 4);
    TST_EQ(t, l.v.dtype, LLMKV_DTYPE_BF16);
}

/* External addressing: what put stored is where the layout says it is. */
static void test_layout_addresses_vectors(tst* t) {
    llmkv_desc d = small_desc(3, 8);
    llmkv_cache* kv;
    llmkv_layout l;
    llmkv_seq s;
    uint32_t pages[8], n, pos, layer, h, e;
    void* base = NULL;
    uint64_t bytes = 0;
    memset(&l, 0, sizeof l);
    d.v_dtype = LLMKV_DTYPE_F16;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_cache_layout(kv, &l));
    OK(t, llmkv_seq_create(kv, &s));
    OK(t, append(kv, s, 7));
    OK(t, llmkv_seq_pages(kv, s, pages, 8, &n));
    OK(t, llmkv_cache_pool(kv, &base, &bytes));
    TST_EQ(t, bytes, 8 * l.page_bytes);
    TST_EQ(t, n, 3);
    TST_CHECK(t, ((uintptr_t)base % 64) == 0);
    for (pos = 0; pos < 7; ++pos)
        for (layer = 0; layer < 2; ++layer)
            for (h = 0; h < 2; ++h)
                for (e = 0; e < 4; ++e) {
                    const unsigned char* pg = (const unsigned char*)base + pages[pos / 3] * l.page_bytes +
                                              layer * l.layer_stride;
                    float kf, vf;
                    uint16_t vh;
                    memcpy(&kf, pg + l.k.offset + h * l.k.head_stride + (pos % 3) * l.k.slot_stride + e * 4, 4);
                    memcpy(&vh, pg + l.v.offset + h * l.v.head_stride + (pos % 3) * l.v.slot_stride + e * 2, 2);
                    vf = llmkv_f16_to_f32(vh);
                    TST_CHECK(t, kf == val(layer, pos, h, e, 0));
                    TST_CHECK(t, vf == (float)f16_ref_value(llmkv_f32_to_f16(val(layer, pos, h, e, 1))));
                }
    llmkv_cache_destroy(kv);
}

/* Byte offsets are 64-bit: a pool larger than 4 GiB, metadata-only. */
static void test_pool_over_4gib_metadata(tst* t) {
    llmkv_desc d;
    llmkv_cache* kv;
    llmkv_layout l;
    llmkv_seq s;
    llmkv_batch* b;
    llmkv_batch_info bi;
    uint64_t bytes = 0;
    void* base = NULL;
    uint32_t q = 1;
    memset(&l, 0, sizeof l);
    memset(&d, 0, sizeof d);
    d.n_layers = 32; d.n_kv_heads = 8; d.head_dim = 128; d.page_size = 16;
    d.storage = LLMKV_STORAGE_METADATA_ONLY;
    d.capacity_bytes = (uint64_t)80 << 30; /* 80 GiB, as an H100 */
    d.max_seqs = 4;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_cache_layout(kv, &l));
    TST_EQ(t, l.page_bytes, (uint64_t)2 << 20);
    OK(t, llmkv_cache_pool(kv, &base, &bytes));
    TST_CHECK(t, base == NULL);
    TST_EQ(t, bytes, (uint64_t)80 << 30);
    OK(t, llmkv_seq_create(kv, &s));
    OK(t, llmkv_reserve(kv, s, 40960 * 16)); /* every page */
    OK(t, llmkv_batch_create(kv, 1, 1, &b));
    OK(t, llmkv_batch_build(b, &s, &q, 1));
    OK(t, llmkv_batch_get(b, &bi));
    TST_EQ(t, bi.kv_indices[40959], 40959);
    TST_EQ(t, bi.slot_mapping[0], (int64_t)40959 * 16 + 15);
    /* The last page's byte offset passes 2^32 many times over. */
    TST_EQ(t, (uint64_t)bi.kv_indices[40959] * l.page_bytes, (uint64_t)40959 << 21);
    TST_EQ(t, llmkv_put(kv, s, 0, 1, &q, 0, NULL, 0, LLMKV_DTYPE_F32), LLMKV_ERR_NO_PAGE_DATA);
    llmkv_batch_destroy(b);
    llmkv_cache_destroy(kv);
}

/* And with real host memory: a sparse 5 GiB allocation, only its ends touched. */
static void test_pool_over_4gib_host(tst* t) {
    llmkv_desc d;
    llmkv_cache* kv;
    llmkv_seq s;
    float* row;
    float* out;
    uint32_t i, len;
    if (getenv("LLMKV_TEST_NO_HUGE")) TST_SKIP(t, "test_pool_over_4gib_host: LLMKV_TEST_NO_HUGE is set");
    memset(&d, 0, sizeof d);
    d.n_layers = 1; d.n_kv_heads = 1; d.head_dim = 512; d.page_size = 1024;
    d.k_dtype = LLMKV_DTYPE_F32; d.v_dtype = LLMKV_DTYPE_F32;
    d.n_pages = 1300; /* 4 MiB pages: 5.08 GiB */
    d.max_seqs = 1;
    if (llmkv_cache_create(&d, &kv) != LLMKV_OK) TST_SKIP(t, "test_pool_over_4gib_host: 5 GiB not available");
    row = (float*)malloc(512 * 4);
    out = (float*)malloc(512 * 4);
    TST_REQUIRE(t, row && out);
    for (i = 0; i < 512; ++i) row[i] = (float)i + 0.5f;
    OK(t, llmkv_seq_create(kv, &s));
    OK(t, llmkv_reserve(kv, s, 1300 * 1024));
    OK(t, llmkv_seq_length(kv, s, &len));
    OK(t, llmkv_put(kv, s, 0, 1, row, 0, row, 0, LLMKV_DTYPE_F32)); /* last slot of page 1299 */
    memset(out, 0, 512 * 4);
    OK(t, llmkv_gather(kv, s, 0, len - 1, 1, NULL, 0, out, 0, LLMKV_DTYPE_F32));
    TST_CHECK(t, memcmp(out, row, 512 * 4) == 0);
    {
        void* base = NULL;
        uint64_t bytes;
        float last;
        OK(t, llmkv_cache_pool(kv, &base, &bytes));
        /* Independent address: page 1299, V part (offset 2 MiB), slot 1023, element 511. */
        memcpy(&last, (unsigned char*)base + (uint64_t)1299 * (4u << 20) + (2u << 20) + 1023u * 2048u + 511u * 4u, 4);
        TST_CHECK(t, last == 511.5f);
    }
    free(row);
    free(out);
    llmkv_cache_destroy(kv);
}

static void test_create_in_caller_memory(tst* t) {
    llmkv_desc d = small_desc(4, 10);
    size_t size = 0, per_page = 0;
    unsigned char* buf;
    llmkv_cache* kv;
    llmkv_seq s;
    llmkv_desc e;
    memset(&e, 0, sizeof e);
    OK(t, llmkv_cache_memory_size(&d, &size, &per_page));
    TST_EQ(t, per_page, 0);
    buf = (unsigned char*)malloc(size + 3);
    TST_REQUIRE(t, buf);
    /* Any alignment works; one byte short does not. */
    TST_EQ(t, llmkv_cache_create_in(&d, buf + 3, size - 1, &kv), LLMKV_ERR_BUFFER_TOO_SMALL);
    OK(t, llmkv_cache_create_in(&d, buf + 3, size, &kv));
    OK(t, llmkv_seq_create(kv, &s));
    OK(t, append(kv, s, 30));
    TST_CHECK(t, holds_vals(kv, s));
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv); /* frees nothing: the buffer is the caller's */
    free(buf);
    /* No capacity given: the buffer's size decides, per the size query. */
    d.n_pages = 0;
    OK(t, llmkv_cache_memory_size(&d, &size, &per_page));
    TST_CHECK(t, per_page > 0);
    buf = (unsigned char*)malloc(size + 7 * per_page);
    TST_REQUIRE(t, buf);
    OK(t, llmkv_cache_create_in(&d, buf, size + 7 * per_page, &kv));
    OK(t, llmkv_cache_desc(kv, &e));
    TST_CHECK(t, e.n_pages >= 8);
    llmkv_cache_destroy(kv);
    TST_EQ(t, llmkv_cache_create_in(&d, buf, 64, &kv), LLMKV_ERR_BUFFER_TOO_SMALL);
    free(buf);
}

/* ---- sequences ------------------------------------------------------- */

static void test_handles_and_generations(tst* t) {
    llmkv_desc d = small_desc(4, 4);
    llmkv_cache* kv;
    llmkv_seq s[3], extra, old, zero = {0};
    uint32_t len, i, ids[1000];
    d.max_seqs = 3;
    OK(t, llmkv_cache_create(&d, &kv));
    for (i = 0; i < 3; ++i) OK(t, llmkv_seq_create(kv, &s[i]));
    TST_EQ(t, llmkv_seq_create(kv, &extra), LLMKV_ERR_TOO_MANY_SEQUENCES);
    TST_EQ(t, llmkv_seq_length(kv, zero, &len), LLMKV_ERR_STALE_HANDLE);
    old = s[1];
    OK(t, llmkv_seq_free(kv, s[1]));
    TST_EQ(t, llmkv_seq_free(kv, old), LLMKV_ERR_STALE_HANDLE);
    TST_EQ(t, llmkv_reserve(kv, old, 1), LLMKV_ERR_STALE_HANDLE);
    OK(t, llmkv_seq_create(kv, &s[1])); /* reuses the slot, new generation */
    TST_CHECK(t, s[1].id != old.id);
    TST_EQ(t, llmkv_seq_length(kv, old, &len), LLMKV_ERR_STALE_HANDLE);
    /* One slot recycled many times: every handle distinct, old ones dead. */
    OK(t, llmkv_seq_free(kv, s[0]));
    OK(t, llmkv_seq_free(kv, s[1]));
    OK(t, llmkv_seq_free(kv, s[2]));
    for (i = 0; i < 1000; ++i) {
        uint32_t j;
        OK(t, llmkv_seq_create(kv, &extra));
        ids[i] = extra.id;
        for (j = 0; j < i; ++j) if (ids[j] == ids[i]) break;
        TST_CHECK(t, j == i);
        OK(t, llmkv_seq_free(kv, extra));
        TST_EQ(t, llmkv_seq_length(kv, extra, &len), LLMKV_ERR_STALE_HANDLE);
    }
    /* A handle naming a slot past max_seqs. */
    extra.id = 0xffffffffu;
    TST_EQ(t, llmkv_seq_free(kv, extra), LLMKV_ERR_STALE_HANDLE);
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv);
}

static void test_reserve_pages(tst* t) {
    llmkv_desc d = small_desc(4, 5);
    llmkv_cache* kv;
    llmkv_seq a, b;
    llmkv_stats st;
    uint32_t len, pages[8], n;
    d.max_seq_len = 18;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, llmkv_reserve(kv, a, 0));
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_used, 0);
    OK(t, llmkv_reserve(kv, a, 1));
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_used, 1);
    OK(t, llmkv_reserve(kv, a, 3)); /* fills the page, no new one */
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_used, 1);
    OK(t, llmkv_reserve(kv, a, 1)); /* crosses */
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_used, 2);
    TST_EQ(t, st.n_slots_unused, 3);
    /* Past max_seq_len: nothing changes. */
    TST_EQ(t, llmkv_reserve(kv, a, 14), LLMKV_ERR_SEQUENCE_TOO_LONG);
    OK(t, llmkv_seq_length(kv, a, &len));
    TST_EQ(t, len, 5);
    /* Not enough pages: a needs 3 more for 17, b takes 1 first. */
    OK(t, llmkv_seq_create(kv, &b));
    OK(t, llmkv_reserve(kv, b, 4));
    TST_EQ(t, llmkv_reserve(kv, a, 12), LLMKV_ERR_OUT_OF_PAGES);
    OK(t, llmkv_seq_length(kv, a, &len));
    TST_EQ(t, len, 5);
    OK(t, llmkv_seq_pages(kv, a, pages, 8, &n));
    TST_EQ(t, n, 2);
    TST_EQ(t, llmkv_seq_pages(kv, a, pages, 1, &n), LLMKV_ERR_BUFFER_TOO_SMALL);
    TST_EQ(t, n, 2);
    OK(t, llmkv_reserve(kv, a, 11)); /* 16 positions: exactly the last 2 pages */
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_free, 0);
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv);
}

static void test_reserve_many_is_atomic(tst* t) {
    llmkv_desc d = small_desc(4, 4);
    llmkv_cache* kv;
    llmkv_seq s[3];
    uint32_t n[3] = {4, 4, 9}, len, i;
    llmkv_stats st;
    OK(t, llmkv_cache_create(&d, &kv));
    for (i = 0; i < 3; ++i) OK(t, llmkv_seq_create(kv, &s[i]));
    TST_EQ(t, llmkv_reserve_many(kv, s, n, 3), LLMKV_ERR_OUT_OF_PAGES); /* needs 5 of 4 */
    for (i = 0; i < 3; ++i) {
        OK(t, llmkv_seq_length(kv, s[i], &len));
        TST_EQ(t, len, 0);
    }
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_free, 4);
    n[2] = 8;
    OK(t, llmkv_reserve_many(kv, s, n, 3));
    OK(t, llmkv_seq_length(kv, s[2], &len));
    TST_EQ(t, len, 8);
    s[1] = s[0];
    TST_EQ(t, llmkv_reserve_many(kv, s, n, 2), LLMKV_ERR_INVALID_ARGUMENT); /* listed twice */
    TST_EQ(t, llmkv_reserve_many(kv, NULL, n, 2), LLMKV_ERR_INVALID_ARGUMENT);
    OK(t, llmkv_reserve_many(kv, NULL, NULL, 0));
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv);
}

/* Several listed sequences sharing one tail page: the last writer keeps the
   page, so w writers among r references need min(w, r - 1) copies. */
static void test_reserve_many_shared_tail(tst* t) {
    llmkv_desc d = small_desc(4, 2);
    llmkv_cache* kv;
    llmkv_seq s[3];
    uint32_t one[3] = {1, 1, 1}, pa[2], pb[2], n;
    llmkv_stats st;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &s[0]));
    OK(t, append(kv, s[0], 2));
    OK(t, llmkv_fork(kv, s[0], &s[1]));
    OK(t, llmkv_reserve_many(kv, s, one, 2)); /* one copy, into the one free page */
    OK(t, llmkv_seq_pages(kv, s[0], pa, 2, &n));
    OK(t, llmkv_seq_pages(kv, s[1], pb, 2, &n));
    TST_CHECK(t, pa[0] != pb[0]);
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_free, 0);
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv);
    /* Three holders, two writers: two copies; with one free page, refused. */
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &s[0]));
    OK(t, append(kv, s[0], 2));
    OK(t, llmkv_fork(kv, s[0], &s[1]));
    OK(t, llmkv_fork(kv, s[0], &s[2]));
    TST_EQ(t, llmkv_reserve_many(kv, s, one, 2), LLMKV_ERR_OUT_OF_PAGES);
    TST_CHECK(t, holds_vals(kv, s[0]) && holds_vals(kv, s[1]));
    TST_CHECK(t, check_ok(kv)); /* the failed plan left no trace in scratch */
    OK(t, llmkv_seq_free(kv, s[2]));
    OK(t, llmkv_reserve_many(kv, s, one, 2));
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv);
}

static void test_put_and_gather(tst* t) {
    llmkv_desc d = small_desc(3, 8);
    llmkv_cache* kv;
    llmkv_seq s;
    float k[16 * 8], v[16 * 8], wide[16 * 12], out[16 * 8];
    uint16_t h16[16 * 8], b16[16 * 8];
    uint32_t i;
    d.k_dtype = LLMKV_DTYPE_F16;
    d.v_dtype = LLMKV_DTYPE_BF16;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &s));
    OK(t, llmkv_reserve(kv, s, 10));
    fill_rows(k, v, 1, 0, 10);
    /* Strided input: rows of 12 floats, the 8 we want first. */
    for (i = 0; i < 10; ++i) memcpy(wide + i * 12, k + i * 8, 32);
    OK(t, llmkv_put(kv, s, 1, 10, wide, 48, v, 0, LLMKV_DTYPE_DEFAULT));
    /* Raw gather returns exactly the storage encodings. */
    OK(t, llmkv_gather(kv, s, 1, 2, 5, h16, 0, b16, 0, LLMKV_DTYPE_DEFAULT));
    for (i = 0; i < 40; ++i) {
        TST_EQ(t, h16[i], f16_ref_round(k[16 + i]));
        TST_EQ(t, b16[i], llmkv_f32_to_bf16(v[16 + i]));
    }
    /* Converted gather, and a strided output. */
    OK(t, llmkv_gather(kv, s, 1, 0, 10, wide, 48, NULL, 0, LLMKV_DTYPE_F32));
    for (i = 0; i < 80; ++i) TST_CHECK(t, wide[(i / 8) * 12 + i % 8] == (float)f16_ref_value(f16_ref_round(k[i])));
    /* F16 input into F16 storage is stored bit for bit. */
    for (i = 0; i < 8; ++i) h16[i] = (uint16_t)(0x3c00u + i);
    OK(t, llmkv_put(kv, s, 0, 1, h16, 0, NULL, 0, LLMKV_DTYPE_F16));
    OK(t, llmkv_gather(kv, s, 0, 9, 1, b16, 0, NULL, 0, LLMKV_DTYPE_DEFAULT));
    TST_CHECK(t, memcmp(h16, b16, 16) == 0);
    /* Errors. */
    TST_EQ(t, llmkv_put(kv, s, 2, 1, k, 0, v, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_put(kv, s, 0, 11, k, 0, v, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_put(kv, s, 0, 1, k, 16, v, 0, LLMKV_DTYPE_F32), LLMKV_ERR_BUFFER_TOO_SMALL);
    TST_EQ(t, llmkv_put(kv, s, 0, 1, (const char*)k + 1, 0, v, 0, LLMKV_DTYPE_F32), LLMKV_ERR_MISALIGNED);
    TST_EQ(t, llmkv_put(kv, s, 0, 1, k, 0, v, 0, (llmkv_dtype)42), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_gather(kv, s, 0, 8, 3, out, 0, NULL, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_gather(kv, s, 0, 11, 0, out, 0, NULL, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, llmkv_gather(kv, s, 0, 0xffffffffu, 2, out, 0, NULL, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_RANGE);
    OK(t, llmkv_gather(kv, s, 0, 10, 0, out, 0, NULL, 0, LLMKV_DTYPE_F32));
    llmkv_cache_destroy(kv);
}

static void test_fork_shares_then_copies(tst* t) {
    llmkv_desc d = small_desc(4, 8);
    llmkv_cache* kv;
    llmkv_seq a, b;
    llmkv_stats st;
    uint32_t pa[8], pb[8], na, nb;
    float k[8], v[8], got[8];
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, append(kv, a, 10));
    OK(t, llmkv_fork(kv, a, &b));
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_used, 3);   /* nothing copied */
    TST_EQ(t, st.n_pages_shared, 3);
    TST_EQ(t, st.n_tokens, 20);
    TST_EQ(t, st.n_slots_used, 10);
    /* b writes: only its partial tail page is copied. */
    OK(t, llmkv_reserve(kv, b, 1));
    OK(t, llmkv_seq_pages(kv, a, pa, 8, &na));
    OK(t, llmkv_seq_pages(kv, b, pb, 8, &nb));
    TST_EQ(t, na, 3);
    TST_EQ(t, nb, 3);
    TST_EQ(t, pa[0], pb[0]);
    TST_EQ(t, pa[1], pb[1]);
    TST_CHECK(t, pa[2] != pb[2]);
    for (na = 0; na < 8; ++na) k[na] = v[na] = 99.0f;
    OK(t, llmkv_put(kv, b, 0, 1, k, 0, v, 0, LLMKV_DTYPE_F32));
    OK(t, llmkv_put(kv, b, 1, 1, k, 0, v, 0, LLMKV_DTYPE_F32));
    TST_CHECK(t, holds_vals(kv, a)); /* the source never sees b's writes */
    OK(t, llmkv_gather(kv, b, 1, 10, 1, got, 0, NULL, 0, LLMKV_DTYPE_F32));
    TST_CHECK(t, got[0] == 99.0f);
    OK(t, llmkv_truncate(kv, b, 10));
    TST_CHECK(t, holds_vals(kv, b)); /* the copy carried the shared slots */
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_used, 4);
    TST_EQ(t, st.n_pages_shared, 2);
    /* Freeing the source leaves b whole. */
    OK(t, llmkv_seq_free(kv, a));
    TST_CHECK(t, holds_vals(kv, b));
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_used, 3);
    TST_EQ(t, st.n_pages_shared, 0);
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv);
}

/* A fork taken between reserve and put: put copies before writing. */
static void test_put_copies_page_shared_after_reserve(tst* t) {
    llmkv_desc d = small_desc(4, 3);
    llmkv_cache* kv;
    llmkv_seq a, b, c;
    float k[8], v[8];
    uint32_t i;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, append(kv, a, 2));
    OK(t, llmkv_reserve(kv, a, 1));
    OK(t, llmkv_fork(kv, a, &b));
    OK(t, llmkv_fork(kv, a, &c));
    for (i = 0; i < 8; ++i) k[i] = v[i] = 7.0f;
    OK(t, llmkv_put(kv, a, 0, 1, k, 0, v, 0, LLMKV_DTYPE_F32)); /* takes page 2 of 3 */
    OK(t, llmkv_put(kv, b, 0, 1, k, 0, v, 0, LLMKV_DTYPE_F32)); /* takes page 3 */
    /* c's page is now held by c alone: no copy needed, and no page is left. */
    OK(t, llmkv_put(kv, c, 0, 1, k, 0, v, 0, LLMKV_DTYPE_F32));
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv);
    /* With no page free, put fails before writing anything. */
    d.n_pages = 1;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, append(kv, a, 2));
    OK(t, llmkv_fork(kv, a, &b));
    TST_EQ(t, llmkv_put(kv, b, 0, 1, k, 0, v, 0, LLMKV_DTYPE_F32), LLMKV_ERR_OUT_OF_PAGES);
    TST_CHECK(t, holds_vals(kv, a));
    TST_CHECK(t, holds_vals(kv, b));
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv);
}

static void test_truncate_rollback(tst* t) {
    llmkv_desc d = small_desc(4, 8);
    llmkv_cache* kv;
    llmkv_seq a, b;
    llmkv_stats st;
    uint32_t len, pa[8], pb[8], n;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, append(kv, a, 13));
    OK(t, llmkv_truncate(kv, a, 8)); /* releases exactly one page */
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_used, 2);
    OK(t, llmkv_seq_length(kv, a, &len));
    TST_EQ(t, len, 8);
    TST_EQ(t, llmkv_truncate(kv, a, 9), LLMKV_ERR_OUT_OF_RANGE);
    OK(t, append(kv, a, 5)); /* rewrite positions 8..12 */
    TST_CHECK(t, holds_vals(kv, a));
    /* Shared tail page kept after truncate is copied when written again. */
    OK(t, llmkv_fork(kv, a, &b));
    OK(t, llmkv_truncate(kv, b, 6));
    OK(t, llmkv_seq_pages(kv, a, pa, 8, &n));
    OK(t, llmkv_seq_pages(kv, b, pb, 8, &n));
    TST_EQ(t, n, 2);
    TST_EQ(t, pa[1], pb[1]); /* still shared */
    OK(t, append(kv, b, 1));
    OK(t, llmkv_seq_pages(kv, b, pb, 8, &n));
    TST_CHECK(t, pa[1] != pb[1]);
    TST_CHECK(t, holds_vals(kv, a));
    TST_CHECK(t, holds_vals(kv, b));
    OK(t, llmkv_truncate(kv, a, 0));
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_used, 2);
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv);
}

/* ---- batches ---------------------------------------------------------- */

static void test_batch_formats(tst* t) {
    llmkv_desc d = small_desc(4, 16);
    llmkv_cache* kv;
    llmkv_seq s[3];
    llmkv_batch* b;
    llmkv_batch_info bi;
    uint32_t q[3] = {2, 0, 5}, lens[3] = {9, 4, 5}, pages[3][8], np[3], i, j, row = 0;
    OK(t, llmkv_cache_create(&d, &kv));
    for (i = 0; i < 3; ++i) {
        OK(t, llmkv_seq_create(kv, &s[i]));
        OK(t, llmkv_reserve(kv, s[i], lens[i]));
    }
    for (i = 0; i < 3; ++i) OK(t, llmkv_seq_pages(kv, s[i], pages[i], 8, &np[i]));
    OK(t, llmkv_batch_create(kv, 3, 7, &b));
    TST_CHECK(t, llmkv_batch_cache(b) == kv);
    TST_CHECK(t, llmkv_batch_cache(NULL) == NULL);
    OK(t, llmkv_batch_build(b, s, q, 3));
    OK(t, llmkv_batch_get(b, &bi));
    TST_EQ(t, bi.n_seqs, 3);
    TST_EQ(t, bi.n_tokens, 7);
    TST_EQ(t, bi.page_size, 4);
    TST_EQ(t, bi.block_table_stride, 3);
    TST_EQ(t, bi.kv_indptr[0], 0);
    TST_EQ(t, bi.kv_indptr[1], 3);
    TST_EQ(t, bi.kv_indptr[2], 4);
    TST_EQ(t, bi.kv_indptr[3], 6);
    TST_EQ(t, bi.kv_last_page_len[0], 1);
    TST_EQ(t, bi.kv_last_page_len[1], 4);
    TST_EQ(t, bi.kv_last_page_len[2], 1);
    TST_EQ(t, bi.qo_indptr[1], 2);
    TST_EQ(t, bi.qo_indptr[2], 2);
    TST_EQ(t, bi.qo_indptr[3], 7);
    for (i = 0; i < 3; ++i) {
        TST_EQ(t, bi.seq_lens[i], lens[i]);
        for (j = 0; j < np[i]; ++j) {
            TST_EQ(t, bi.kv_indices[bi.kv_indptr[i] + (int32_t)j], pages[i][j]);
            TST_EQ(t, bi.block_table[i * 3 + j], pages[i][j]);
        }
        for (; j < 3; ++j) TST_EQ(t, bi.block_table[i * 3 + j], 0);
        for (j = lens[i] - q[i]; j < lens[i]; ++j, ++row) {
            TST_EQ(t, bi.positions[row], j);
            TST_EQ(t, bi.slot_mapping[row], (int64_t)pages[i][j / 4] * 4 + j % 4);
        }
    }
    /* Limits and bad input leave the batch empty. */
    q[2] = 6;
    TST_EQ(t, llmkv_batch_build(b, s, q, 3), LLMKV_ERR_OUT_OF_RANGE);
    TST_EQ(t, b->n_seqs, 0);
    q[2] = 5; q[1] = 1;
    TST_EQ(t, llmkv_batch_build(b, s, q, 3), LLMKV_ERR_BATCH_FULL); /* 8 tokens > 7 */
    s[1] = s[0];
    q[1] = 0;
    TST_EQ(t, llmkv_batch_build(b, s, q, 3), LLMKV_ERR_INVALID_ARGUMENT);
    llmkv_batch_destroy(b);
    TST_EQ(t, llmkv_batch_create(kv, 0, 4, &b), LLMKV_ERR_INVALID_ARGUMENT);
    TST_EQ(t, llmkv_batch_create(kv, 257, 4, &b), LLMKV_ERR_INVALID_ARGUMENT);
    llmkv_cache_destroy(kv);
}

static void test_batch_staleness(tst* t) {
    llmkv_desc d = small_desc(4, 16);
    llmkv_cache* kv;
    llmkv_seq s[2], f;
    llmkv_batch* b;
    llmkv_batch_info bi;
    uint32_t q[2] = {1, 1};
    float k[8] = {0};
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &s[0]));
    OK(t, llmkv_seq_create(kv, &s[1]));
    OK(t, llmkv_reserve(kv, s[0], 3));
    OK(t, llmkv_reserve(kv, s[1], 6));
    OK(t, llmkv_batch_create(kv, 2, 4, &b));
#define REBUILD() OK(t, llmkv_batch_build(b, s, q, 2)); OK(t, llmkv_batch_check(b))
    REBUILD();
    /* A put without copy-on-write changes nothing the batch describes. */
    OK(t, llmkv_put(kv, s[0], 0, 1, k, 0, k, 0, LLMKV_DTYPE_F32));
    OK(t, llmkv_batch_check(b));
    OK(t, llmkv_reserve(kv, s[1], 1));
    TST_EQ(t, llmkv_batch_check(b), LLMKV_ERR_STALE_BATCH);
    TST_EQ(t, llmkv_batch_get(b, &bi), LLMKV_ERR_STALE_BATCH);
    TST_CHECK(t, bi.kv_indices == NULL);
    REBUILD();
    OK(t, llmkv_truncate(kv, s[0], 2));
    TST_EQ(t, llmkv_batch_check(b), LLMKV_ERR_STALE_BATCH);
    REBUILD();
    OK(t, llmkv_fork(kv, s[1], &f)); /* its pages became read-only */
    TST_EQ(t, llmkv_batch_check(b), LLMKV_ERR_STALE_BATCH);
    REBUILD();
    OK(t, llmkv_put(kv, s[1], 0, 1, k, 0, k, 0, LLMKV_DTYPE_F32)); /* copy-on-write */
    TST_EQ(t, llmkv_batch_check(b), LLMKV_ERR_STALE_BATCH);
    REBUILD();
    OK(t, llmkv_seq_free(kv, s[0]));
    TST_EQ(t, llmkv_batch_check(b), LLMKV_ERR_STALE_BATCH);
    OK(t, llmkv_seq_create(kv, &s[0])); /* same slot, new generation */
    TST_EQ(t, llmkv_batch_check(b), LLMKV_ERR_STALE_BATCH);
#undef REBUILD
    llmkv_batch_destroy(b);
    llmkv_cache_destroy(kv);
}

/* ---- metadata-only copy commands -------------------------------------- */

static void test_metadata_only_copy_commands(tst* t) {
    llmkv_desc d = small_desc(4, 8);
    llmkv_cache* kv;
    llmkv_seq a, b, c;
    llmkv_copy_cmd cmds[4];
    uint32_t n, pa[4], pb[4], np;
    float buf[8];
    d.storage = LLMKV_STORAGE_METADATA_ONLY;
    d.max_pending_copies = 1;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, llmkv_reserve(kv, a, 6));
    OK(t, llmkv_fork(kv, a, &b));
    OK(t, llmkv_fork(kv, a, &c));
    OK(t, llmkv_reserve(kv, b, 1));
    OK(t, llmkv_seq_pages(kv, a, pa, 4, &np));
    OK(t, llmkv_seq_pages(kv, b, pb, 4, &np));
    /* The queue is full: a second copy-on-write (a's tail is still shared
       with c) is refused, unchanged. */
    TST_EQ(t, llmkv_reserve(kv, a, 1), LLMKV_ERR_COPY_QUEUE_FULL);
    OK(t, llmkv_seq_length(kv, a, &n));
    TST_EQ(t, n, 6);
    OK(t, llmkv_copy_cmds_take(kv, cmds, 4, &n));
    TST_EQ(t, n, 1);
    TST_EQ(t, cmds[0].src_page, pa[1]);
    TST_EQ(t, cmds[0].dst_page, pb[1]);
    TST_EQ(t, cmds[0].n_slots, 2); /* only the slots b holds */
    OK(t, llmkv_copy_cmds_take(kv, cmds, 4, &n));
    TST_EQ(t, n, 0);
    TST_EQ(t, llmkv_put(kv, a, 0, 1, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_NO_PAGE_DATA);
    TST_EQ(t, llmkv_gather(kv, a, 0, 0, 1, buf, 0, buf, 0, LLMKV_DTYPE_F32), LLMKV_ERR_NO_PAGE_DATA);
    TST_CHECK(t, check_ok(kv));
    llmkv_cache_destroy(kv);
}

/* ---- stats, planner, presets ------------------------------------------ */

static void test_planner_and_presets(tst* t) {
    /* name, layers, q heads, kv heads, head_dim: from the models' config.json. */
    static const struct { const char* name; uint32_t l, q, kvh, hd; } want[] = {
        {"llama-3-8b", 32, 32, 8, 128},  {"Llama-3-70B", 80, 64, 8, 128}, {"mistral-7b", 32, 32, 8, 128},
        {"qwen2.5-7b", 28, 28, 4, 128},  {"phi-3-mini", 32, 32, 32, 96},  {"gemma-2-9b", 42, 16, 8, 256}};
    size_t i;
    llmkv_desc d;
    uint64_t bytes = 0, tokens = 0;
    uint32_t count;
    for (i = 0; i < sizeof want / sizeof want[0]; ++i) {
        const llmkv_model_preset* p = llmkv_model_preset_find(want[i].name);
        TST_REQUIRE(t, p != NULL);
        TST_EQ(t, p->n_layers, want[i].l);
        TST_EQ(t, p->n_q_heads, want[i].q);
        TST_EQ(t, p->n_kv_heads, want[i].kvh);
        TST_EQ(t, p->head_dim, want[i].hd);
        memset(&d, 0, sizeof d);
        OK(t, llmkv_desc_from_preset(&d, want[i].name));
        /* F16, page 16: 2 (K,V) * layers * kv heads * dim * 2 bytes per token. */
        OK(t, llmkv_plan_bytes(&d, 1000, &bytes));
        TST_EQ(t, bytes, (uint64_t)63 * 16 * 4 * want[i].l * want[i].kvh * want[i].hd);
        OK(t, llmkv_plan_tokens(&d, (uint64_t)1 << 30, &tokens));
        TST_EQ(t, tokens, ((uint64_t)1 << 30) / ((uint64_t)64 * want[i].l * want[i].kvh * want[i].hd) * 16);
    }
    TST_CHECK(t, llmkv_model_preset_find("no-such-model") == NULL);
    TST_EQ(t, llmkv_desc_from_preset(&d, "no-such-model"), LLMKV_ERR_INVALID_ARGUMENT);
    TST_CHECK(t, llmkv_model_presets(&count) != NULL && count >= 6);
    /* Llama-3-8B: 128 KiB per token, so 8192 tokens is exactly 1 GiB. */
    memset(&d, 0, sizeof d);
    OK(t, llmkv_desc_from_preset(&d, "llama-3-8b"));
    OK(t, llmkv_plan_bytes(&d, 8192, &bytes));
    TST_EQ(t, bytes, (uint64_t)1 << 30);
    OK(t, llmkv_plan_bytes(&d, 0, &bytes));
    TST_EQ(t, bytes, 0);
}

static void test_stats_exact(tst* t) {
    llmkv_desc d = small_desc(4, 10);
    llmkv_cache* kv;
    llmkv_seq a, b;
    llmkv_stats st;
    llmkv_layout l;
    memset(&l, 0, sizeof l);
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_cache_layout(kv, &l));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, llmkv_reserve(kv, a, 6));  /* pages: 2, slots 6 */
    OK(t, llmkv_fork(kv, a, &b));
    OK(t, llmkv_reserve(kv, b, 3));  /* b copies its tail: 3 pages, 9 slots */
    OK(t, llmkv_cache_stats(kv, &st));
    TST_EQ(t, st.n_pages_total, 10);
    TST_EQ(t, st.n_pages_used, 4);
    TST_EQ(t, st.n_pages_free, 6);
    TST_EQ(t, st.n_pages_shared, 1);
    TST_EQ(t, st.n_seqs, 2);
    TST_EQ(t, st.n_tokens, 15);
    TST_EQ(t, st.n_slots_used, 4 + 2 + 4 + 1);
    TST_EQ(t, st.n_slots_unused, 16 - 11);
    TST_EQ(t, st.page_bytes, l.page_bytes);
    TST_EQ(t, st.pool_bytes, 10 * l.page_bytes);
    TST_EQ(t, st.used_bytes, 4 * l.page_bytes);
    TST_CHECK(t, st.metadata_bytes > 0 && st.metadata_bytes < 64 * 1024);
    TST_EQ(t, st.staging_bytes, 0); /* only Q4C keys stage */
    llmkv_cache_destroy(kv);
}

/* ---- invariant checker ------------------------------------------------ */

static void test_checker_finds_corruption(tst* t) {
    llmkv_desc d = small_desc(4, 6);
    llmkv_cache* kv;
    llmkv_seq a, b;
    char msg[256];
    uint32_t saved, slot;
    OK(t, llmkv_cache_create(&d, &kv));
    OK(t, llmkv_seq_create(kv, &a));
    OK(t, llmkv_reserve(kv, a, 6));
    OK(t, llmkv_fork(kv, a, &b));
    TST_CHECK(t, check_ok(kv));
    slot = llmkv__handle_slot(kv->seq_ids, a.id);

    kv->refcount[0]++;
    TST_EQ(t, llmkv_cache_check(kv, msg, sizeof msg), LLMKV_ERR_CORRUPT);
    TST_CHECK(t, strstr(msg, "refcount") != NULL);
    kv->refcount[0]--;

    saved = kv->free_pages[0];
    kv->free_pages[0] = kv->free_pages[1]; /* a duplicate, and a page lost */
    TST_EQ(t, llmkv_cache_check(kv, msg, sizeof msg), LLMKV_ERR_CORRUPT);
    TST_CHECK(t, strstr(msg, "twice") != NULL);
    kv->free_pages[0] = saved;

    kv->n_free--; /* a free page missing from the list: leaked */
    TST_EQ(t, llmkv_cache_check(kv, msg, sizeof msg), LLMKV_ERR_CORRUPT);
    TST_CHECK(t, strstr(msg, "leaked") != NULL);
    kv->n_free++;

    kv->seqs[slot].n_pages = 1; /* table shorter than the length needs */
    TST_EQ(t, llmkv_cache_check(kv, msg, sizeof msg), LLMKV_ERR_CORRUPT);
    TST_CHECK(t, strstr(msg, "pages for") != NULL);
    kv->seqs[slot].n_pages = 2;

    saved = llmkv__table(kv, slot)[1];
    llmkv__table(kv, slot)[1] = 6; /* page id past the pool */
    TST_EQ(t, llmkv_cache_check(kv, msg, sizeof msg), LLMKV_ERR_CORRUPT);
    TST_CHECK(t, strstr(msg, ">= 6") != NULL);
    llmkv__table(kv, slot)[1] = saved;

    kv->n_live++;
    TST_EQ(t, llmkv_cache_check(kv, msg, sizeof msg), LLMKV_ERR_CORRUPT);
    kv->n_live--;

    TST_CHECK(t, check_ok(kv));
    TST_EQ(t, llmkv_cache_check(kv, NULL, 0), LLMKV_OK);
    llmkv_cache_destroy(kv);
}

void suite_cache(tst* t) {
    TST_RUN(t, test_result_strings);
    TST_RUN(t, test_f16_conversion);
    TST_RUN(t, test_bf16_conversion);
    TST_RUN(t, test_simd_conversion_matches_scalar);
    TST_RUN(t, test_desc_validation);
    TST_RUN(t, test_logger_says_why);
    TST_RUN(t, test_defaults);
    TST_RUN(t, test_layout_geometry);
    TST_RUN(t, test_layout_addresses_vectors);
    TST_RUN(t, test_pool_over_4gib_metadata);
    TST_RUN(t, test_pool_over_4gib_host);
    TST_RUN(t, test_create_in_caller_memory);
    TST_RUN(t, test_handles_and_generations);
    TST_RUN(t, test_reserve_pages);
    TST_RUN(t, test_reserve_many_is_atomic);
    TST_RUN(t, test_reserve_many_shared_tail);
    TST_RUN(t, test_put_and_gather);
    TST_RUN(t, test_fork_shares_then_copies);
    TST_RUN(t, test_put_copies_page_shared_after_reserve);
    TST_RUN(t, test_truncate_rollback);
    TST_RUN(t, test_batch_formats);
    TST_RUN(t, test_batch_staleness);
    TST_RUN(t, test_metadata_only_copy_commands);
    TST_RUN(t, test_planner_and_presets);
    TST_RUN(t, test_stats_exact);
    TST_RUN(t, test_checker_finds_corruption);
}
