/* bench_attn_cuda.cu - llmkv_cuda_decode and swap on the GPU: how fast, and
   how close to the device's memory bandwidth measured in the same run.

   Shapes (head_dim 128, page 16 tokens, one layer, K and V of one storage
   type):
     decode   32 query heads over 8 KV heads, and 32 over 32; contexts 1024,
              4096, 16384, 32768; batch 1, 16, 64 (each sequence holds `ctx`
              tokens, its newest is the query, written by llmkv_cuda_put);
              storage types f16 and bf16
     swap     one sequence of 32768 tokens (8 and 32 KV heads, the first
              storage type selected) moved to pinned host memory
              (llmkv_cuda_swap_out) and back (llmkv_cuda_swap_in), with its
              pages allocated in order ("contiguous") and interleaved page by
              page with another sequence ("interleaved")
   Each (KV heads, type, context) makes one metadata-only cache and device
   pool for the largest batch that fits the device (a batch that does not
   fit is skipped and says so) and fills the pool directly with random
   finite values (a kernel of this file: magnitudes in [1/64, 1), random
   sign); a batch uses the first `batch` sequences.

   The same run measures, before the cases and again after them:
     copy     a device-to-device cudaMemcpyAsync of a 1 GiB buffer (smaller
              if memory is short), median of 7, counted as bytes read plus
              bytes written: 2 N / t (the convention under which an H100's
              copy "moves about 3.0 TB/s"). The reference of decode's %bw.
     read     a read-only kernel over the same buffer, N / t (shown only)
     h2d, d2h a cudaMemcpyAsync of 256 MiB between the device and pinned
              host memory (llmkv_cuda_host_alloc) in each direction, N / t,
              median of 7. The references of swap_in and swap_out.
   Each case reports:
     time      median (and minimum) over repetitions of one call, GPU time
               between two events around it (decode: the decode and merge
               kernels; swap: the whole call, host work included, to the end
               of its copies), after one untimed warm-up. Decode: at least
               10 repetitions, more for fast cases (up to 201); before each,
               untimed, a read of 4 x the L2 size (at least 64 MiB) evicts
               the L2, so no case is served from it. Swap: 5 of each way.
     tokens/s  decode: batch / time; swap: tokens moved / time
     KV GB/s   decode: K/V bytes the call must read from the pool / time:
               sum over sequences of len * n_kv_heads * (K + V bytes of one
               head vector) (f16/bf16: 512 bytes per token and KV head);
               queries, outputs, page tables and split-K partial results are
               not counted. Swap: the pages moved (pages * page_bytes) / time.
     %bw       decode: KV GB/s as a percent of the copy bandwidth (read +
               write); swap_out: of d2h; swap_in: of h2d
     target    the figure the issue asks for (decode batch >= 16 and context
               >= 4096: 85%; batch 1 and context >= 32768: 60%; swap: 80%)
               and whether this run met it
   After the warm-up, untimed, every decode output is checked finite and six
   (sequence, head) outputs (first and last sequence; heads 0, 17 and 31)
   are compared with a double-precision softmax over the stored keys and
   values (llmkv_cuda_gather'ed to the host): the run fails (exit 1) if any
   element is off by more than 1e-2 or any row's relative L2 error passes
   1e-2. So that a fault shared by gather and decode cannot pass, at three
   positions (first, middle, newest) the gathered vectors are compared with
   the pool bytes at the address the manager's page table and layout give,
   and the newest with what llmkv_cuda_put was given, converted on the host.
   Each swap compares three windows of 256 positions (start, middle, end)
   before and after, byte for byte.

   JSON fields: bench ("attn_cuda"), kind ("bandwidth", "decode",
   "swap_out", "swap_in"), backend, device (the runtime's device name; in
   place of the CPU benchmark's threads and path), dtype, batch, ctx,
   q_tokens, n_q_heads, n_kv_heads, head_dim, page_size, kv_bytes, seconds,
   seconds_min, reps, tokens_per_s, kv_gbps, bw_gbps (the reference),
   pct_bw, cold; decode: max_abs_err, max_rel_err; swap: layout, pages,
   copy_runs (runs of consecutive page ids: one cudaMemcpyAsync each);
   target_pct and target_met where a target applies; skipped cases:
   skipped, need_bytes, device_bytes instead of the figures.

   Usage: bench_attn_cuda [--json] [--quick] [--kind decode|swap] [--dtype f16|bf16]
                          [--ctx N] [--batch N] [--kv-heads 1|2|4|8|16|32]
     --json     one JSON object per line (bandwidth lines, then one per case,
                skipped cases included), nothing else on stdout
     --quick    a smoke run: context 1024, batch 1 and 16, a swap of 4096
                tokens, 5 decode and 3 swap repetitions, 256 MiB bandwidth
                buffers; figures not meant to be reported
     --kind     only decode or only swap cases
     --dtype    only that storage type
     --ctx, --batch, --kv-heads
                only that context (1..4194304; also the swap length),
                batch (1..4096) or KV head count (with 32 query heads)

   Without a CUDA (or HIP) device it prints "no CUDA device: nothing to
   measure" and exits 0. Exit status 1, with a message on stderr, if any
   llmkv or runtime call fails or an output disagrees with the reference;
   2 on a bad command line. */
#define LLMKV_IMPLEMENTATION
#define LLMKV_CUDA_IMPLEMENTATION
#ifdef LLMKV_BENCH_HIP
#include "../llmkv_hip.h"
#define BENCH_BACKEND "hip"
#else
#include "../llmkv_cuda.cuh"
#define BENCH_BACKEND "cuda"
#endif
#include "bench_util.h"

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define HEAD_DIM 128u
#define PAGE_SIZE 16u
#define N_Q_HEADS 32u
#define MAX_LIST 8
#define BW_BYTES ((size_t)1 << 30)            /* device copy buffer */
#define BW_BYTES_QUICK ((size_t)256 << 20)
#define BW_BYTES_MIN ((size_t)64 << 20)
#define HOST_BW_BYTES ((size_t)256 << 20)     /* pinned copy buffer */
#define HOST_BW_BYTES_QUICK ((size_t)64 << 20)
#define BW_RUNS 7
#define QUICK_RUNS 3
#define FLUSH_MIN_BYTES ((size_t)64 << 20)    /* L2 eviction read: max(4 x L2, this) */
#define MIN_REPS 10
#define MAX_REPS 201
#define QUICK_REPS 5
#define CASE_SECONDS 0.25                     /* aimed-at time of one case's repetitions */
#define SWAP_LEN 32768u
#define SWAP_LEN_QUICK 4096u
#define SWAP_REPS 5
#define VERIFY_TOKENS 256u                    /* swap: positions compared per window */
#define CHECK_CHUNK 2048u                     /* reference: positions gathered per copy */
#define MAX_ABS_ERR 1e-2
#define MAX_REL_ERR 1e-2
#define MEM_MARGIN ((uint64_t)2 << 30)        /* device memory left to everything but the pool */
#define TARGET_DECODE 85.0
#define TARGET_DECODE_B1 60.0
#define TARGET_SWAP 80.0

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

static void die(const char* what) {
    fprintf(stderr, "bench_attn_cuda: %s\n", what);
    exit(1);
}

static void cuda_fail(cudaError_t e, const char* call, const char* file, int line) {
    fprintf(stderr, "%s:%d: %s failed: %s\n", file, line, call, cudaGetErrorString(e));
    exit(1);
}

#define CUDA_CHECK(call)                                                              \
    do {                                                                              \
        cudaError_t cuda_e_ = (call);                                                 \
        if (cuda_e_ != cudaSuccess) cuda_fail(cuda_e_, #call, __FILE__, __LINE__);    \
    } while (0)

static double gib(uint64_t bytes) { return (double)bytes / (1024.0 * 1024.0 * 1024.0); }

/* Seconds between two recorded events (the later one already passed). */
static double elapsed_s(cudaEvent_t a, cudaEvent_t b) {
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    return (double)ms * 1e-3;
}

/* A cudaMalloc that reports failure instead of stopping (clearing the
   error, so it does not surface in a later check). */
static void* try_device_alloc(size_t bytes) {
    void* p = NULL;
    if (cudaMalloc(&p, bytes) != cudaSuccess) {
        (void)cudaGetLastError();
        return NULL;
    }
    return p;
}

static void* device_alloc(size_t bytes) {
    void* p = try_device_alloc(bytes);
    if (!p) {
        fprintf(stderr, "bench_attn_cuda: out of device memory (%llu bytes)\n", (unsigned long long)bytes);
        exit(1);
    }
    return p;
}

/* The device name as a JSON string body. */
static void json_escape(const char* s, char* out, size_t size) {
    size_t n = 0;
    for (; *s && n + 7 < size; ++s) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[n++] = '\\';
            out[n++] = (char)c;
        } else if (c < 0x20) {
            n += (size_t)snprintf(out + n, size - n, "\\u%04x", c);
        } else {
            out[n++] = (char)c;
        }
    }
    out[n] = 0;
}

/* ------------------------------------------------------------------------ */
/* Kernels of the benchmark: test data and the streaming read               */
/* ------------------------------------------------------------------------ */

static __device__ __forceinline__ uint64_t dev_mix(uint64_t z) { /* splitmix64's finaliser */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Fills n 16-bit elements with finite F16 (bf16 0) or BF16 (bf16 1) values
   built from their bits: random sign, magnitude in [1/64, 1) (exponent
   2^-6 .. 2^-1, random mantissa). Never a NaN, infinity or subnormal. */
static __global__ void fill16_kernel(unsigned short* p, size_t n, uint64_t seed, int bf16) {
    size_t i;
    for (i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t h = dev_mix(seed + (uint64_t)i * 0x9E3779B97F4A7C15ull);
        uint32_t sign = (uint32_t)(h & 1u), e = (uint32_t)((h >> 1) % 6u), m = (uint32_t)(h >> 16);
        uint32_t bits = bf16 ? (sign << 15) | ((121u + e) << 7) | (m & 0x7fu)
                             : (sign << 15) | ((9u + e) << 10) | (m & 0x3ffu);
        p[i] = (unsigned short)bits;
    }
}

/* Fills n floats with values uniform in [-1, 1) (24 random bits: exact). */
static __global__ void fill_f32_kernel(float* p, size_t n, uint64_t seed) {
    size_t i;
    for (i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t h = dev_mix(seed + (uint64_t)i * 0x9E3779B97F4A7C15ull);
        p[i] = (float)(uint32_t)(h >> 40) * (2.0f / 16777216.0f) - 1.0f;
    }
}

/* Reads n 16-byte words, four independent loads in flight per thread; the
   result is stored only if it equals a constant it practically never does,
   which keeps every load. */
static __global__ void read_kernel(const uint4* p, size_t n, unsigned int* sink) {
    const size_t stride = (size_t)gridDim.x * blockDim.x;
    size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x;
    unsigned int acc = 0;
    for (; i + 3 * stride < n; i += 4 * stride) {
        uint4 a = p[i], b = p[i + stride], c = p[i + 2 * stride], d = p[i + 3 * stride];
        acc ^= (a.x ^ a.y ^ a.z ^ a.w) + (b.x ^ b.y ^ b.z ^ b.w) + (c.x ^ c.y ^ c.z ^ c.w) + (d.x ^ d.y ^ d.z ^ d.w);
    }
    for (; i < n; i += stride) {
        uint4 a = p[i];
        acc ^= a.x ^ a.y ^ a.z ^ a.w;
    }
    if (acc == 0x9E3779B9u) sink[0] = acc;
}

/* ------------------------------------------------------------------------ */
/* Options and run state                                                    */
/* ------------------------------------------------------------------------ */

typedef struct bench {
    int json, quick;
    int only_kind;              /* 0: both, 1: decode, 2: swap */
    llmkv_dtype only_dtype;     /* DEFAULT: f16 and bf16 */
    uint32_t only_ctx;          /* 0: every context */
    uint32_t only_batch;        /* 0: every batch */
    uint32_t only_kv_heads;     /* 0: 8 and 32 */

    char device_name[256];      /* as the runtime names it */
    char device_json[512];      /* the same, escaped for JSON */
    int cc_major, cc_minor, n_sm;
    uint64_t total_mem;
    size_t l2_bytes;
    unsigned int grid;          /* blocks of 256 threads for the benchmark's own kernels */
    cudaStream_t stream;
    cudaEvent_t ev[2 * MAX_REPS];

    unsigned char* flush_buf;   /* read before every timed decode call */
    size_t flush_bytes;
    double flush_seconds;
    unsigned int* sink;

    /* bandwidth at the start (the references) */
    double copy_gbps, read_gbps, h2d_gbps, d2h_gbps;

    /* reference check: one chunk of gathered K and V */
    unsigned char *d_ck, *d_cv, *h_ck, *h_cv;
    size_t chunk_bytes;

    int n_run, n_skipped, n_targets, n_targets_met;
} bench;

static void launch_fill16(const bench* b, void* p, size_t n, uint64_t seed, int bf16) {
    fill16_kernel<<<b->grid, 256, 0, b->stream>>>((unsigned short*)p, n, seed, bf16);
    CUDA_CHECK(cudaGetLastError());
}

static void launch_fill_f32(const bench* b, float* p, size_t n, uint64_t seed) {
    fill_f32_kernel<<<b->grid, 256, 0, b->stream>>>(p, n, seed);
    CUDA_CHECK(cudaGetLastError());
}

static void launch_read(const bench* b, const void* p, size_t bytes) {
    read_kernel<<<b->grid, 256, 0, b->stream>>>((const uint4*)p, bytes / 16, b->sink);
    CUDA_CHECK(cudaGetLastError());
}

/* Evicts the L2 (untimed): reads a buffer four times its size. */
static void flush_l2(const bench* b) { launch_read(b, b->flush_buf, b->flush_bytes); }

/* ------------------------------------------------------------------------ */
/* Bandwidth                                                                */
/* ------------------------------------------------------------------------ */

typedef struct bw_result {
    double copy_gbps, read_gbps, h2d_gbps, d2h_gbps; /* 0: not measured */
    size_t copy_bytes, host_bytes;
    int runs;
} bw_result;

enum { COPY_D2D, COPY_H2D, COPY_D2H };

/* One cudaMemcpyAsync on the benchmark's stream (the direction as one of
   the constants above: the HIP alias header names no cudaMemcpyKind). */
static void copy_async(const bench* b, void* dst, const void* src, size_t bytes, int dir) {
    if (dir == COPY_D2D) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, b->stream));
    else if (dir == COPY_H2D) CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, b->stream));
    else CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, b->stream));
}

/* Median GB/s of `runs` copies (after one warm-up) of `bytes` from src to
   dst in direction `dir`, counting `count` x bytes per copy. */
static double copy_gbps(bench* b, void* dst, const void* src, size_t bytes, int dir, double count, int runs) {
    double gbps[BW_RUNS];
    int r;
    copy_async(b, dst, src, bytes, dir);
    CUDA_CHECK(cudaStreamSynchronize(b->stream));
    for (r = 0; r < runs; ++r) {
        CUDA_CHECK(cudaEventRecord(b->ev[0], b->stream));
        copy_async(b, dst, src, bytes, dir);
        CUDA_CHECK(cudaEventRecord(b->ev[1], b->stream));
        CUDA_CHECK(cudaEventSynchronize(b->ev[1]));
        gbps[r] = count * (double)bytes / elapsed_s(b->ev[0], b->ev[1]) / 1e9;
    }
    return median_of(gbps, runs);
}

static double read_gbps(bench* b, const void* src, size_t bytes, int runs) {
    double gbps[BW_RUNS];
    int r;
    launch_read(b, src, bytes);
    CUDA_CHECK(cudaStreamSynchronize(b->stream));
    for (r = 0; r < runs; ++r) {
        CUDA_CHECK(cudaEventRecord(b->ev[0], b->stream));
        launch_read(b, src, bytes);
        CUDA_CHECK(cudaEventRecord(b->ev[1], b->stream));
        CUDA_CHECK(cudaEventSynchronize(b->ev[1]));
        gbps[r] = (double)bytes / elapsed_s(b->ev[0], b->ev[1]) / 1e9;
    }
    return median_of(gbps, runs);
}

static void measure_bandwidth(bench* b, int at_end) {
    size_t bytes = b->quick ? BW_BYTES_QUICK : BW_BYTES;
    size_t host_bytes = b->quick ? HOST_BW_BYTES_QUICK : HOST_BW_BYTES;
    unsigned char *src = NULL, *dst = NULL;
    void* host = NULL;
    bw_result r;
    int changed = 0;
    memset(&r, 0, sizeof r);
    r.runs = b->quick ? QUICK_RUNS : BW_RUNS;
    for (; bytes >= BW_BYTES_MIN; bytes /= 2) {
        src = (unsigned char*)try_device_alloc(bytes);
        dst = src ? (unsigned char*)try_device_alloc(bytes) : NULL;
        if (dst) break;
        if (src) CUDA_CHECK(cudaFree(src));
        src = NULL;
    }
    if (!dst) die("cannot allocate two 64 MiB device buffers for the bandwidth measurement");
    r.copy_bytes = bytes;
    launch_fill16(b, src, bytes / 2, 0xB0u, 0);
    CUDA_CHECK(cudaMemset(dst, 0, bytes));
    CUDA_CHECK(cudaDeviceSynchronize());
    r.copy_gbps = copy_gbps(b, dst, src, bytes, COPY_D2D, 2.0, r.runs);
    r.read_gbps = read_gbps(b, src, bytes, r.runs);
    if (host_bytes > bytes) host_bytes = bytes;
    if (llmkv_cuda_host_alloc(host_bytes, &host) == LLMKV_OK) {
        memset(host, 0x3c, host_bytes); /* touched before anything is timed */
        r.host_bytes = host_bytes;
        r.h2d_gbps = copy_gbps(b, dst, host, host_bytes, COPY_H2D, 1.0, r.runs);
        r.d2h_gbps = copy_gbps(b, host, src, host_bytes, COPY_D2H, 1.0, r.runs);
        llmkv_cuda_host_free(host);
    }
    CUDA_CHECK(cudaFree(src));
    CUDA_CHECK(cudaFree(dst));
    if (!at_end) {
        b->copy_gbps = r.copy_gbps;
        b->read_gbps = r.read_gbps;
        b->h2d_gbps = r.h2d_gbps;
        b->d2h_gbps = r.d2h_gbps;
    } else if (fabs(r.copy_gbps / b->copy_gbps - 1.0) > 0.05 ||
               (b->h2d_gbps > 0 && r.h2d_gbps > 0 && fabs(r.h2d_gbps / b->h2d_gbps - 1.0) > 0.10) ||
               (b->d2h_gbps > 0 && r.d2h_gbps > 0 && fabs(r.d2h_gbps / b->d2h_gbps - 1.0) > 0.10)) {
        changed = 1;
    }
    if (b->json) {
        printf("{\"bench\":\"attn_cuda\",\"kind\":\"bandwidth\",\"when\":\"%s\",\"backend\":\"%s\",\"device\":\"%s\","
               "\"copy_gbps\":%.3f,\"copy_counts\":\"read+write\",\"copy_bytes\":%llu,\"read_gbps\":%.3f,"
               "\"h2d_gbps\":%.3f,\"d2h_gbps\":%.3f,\"host_bytes\":%llu,\"runs\":%d}\n",
               at_end ? "end" : "start", BENCH_BACKEND, b->device_json, r.copy_gbps,
               (unsigned long long)r.copy_bytes, r.read_gbps, r.h2d_gbps, r.d2h_gbps,
               (unsigned long long)r.host_bytes, r.runs);
    } else {
        printf("%s:\n", at_end ? "bandwidth again at the end" : "device bandwidth");
        printf("  device-to-device copy %.1f GB/s (cudaMemcpyAsync of a %llu MiB buffer; counts bytes read + "
               "bytes written, 2N/t; median of %d)\n",
               r.copy_gbps, (unsigned long long)(r.copy_bytes >> 20), r.runs);
        printf("  read-only kernel      %.1f GB/s (the same buffer, N/t; shown only)\n", r.read_gbps);
        if (r.host_bytes)
            printf("  pinned host memory    host->device %.1f GB/s, device->host %.1f GB/s (cudaMemcpyAsync of "
                   "%llu MiB, N/t; median of %d)\n",
                   r.h2d_gbps, r.d2h_gbps, (unsigned long long)(r.host_bytes >> 20), r.runs);
        else
            printf("  pinned host memory    not measured: llmkv_cuda_host_alloc of %llu MiB failed\n",
                   (unsigned long long)(host_bytes >> 20));
        if (changed)
            printf("  away from the start (copy by more than 5%%, host copies by more than 10%%): the device or "
                   "bus was busy or throttled, so %%bw (and every time) is uncertain\n");
    }
    fflush(stdout);
}

/* ------------------------------------------------------------------------ */
/* Cases and their output                                                   */
/* ------------------------------------------------------------------------ */

typedef struct acase {
    const char* kind;   /* "decode", "swap_out", "swap_in" */
    llmkv_dtype dtype;
    uint32_t n_kv_heads;
    uint32_t batch;     /* sequences */
    uint32_t ctx;       /* tokens per sequence */
    uint32_t q_tokens;  /* query rows (decode: batch; swap: 0) */
    /* swap only */
    const char* layout; /* "contiguous" or "interleaved" */
    uint32_t pages, copy_runs;
} acase;

static void desc_for(llmkv_desc* d, uint32_t n_kv_heads, llmkv_dtype dtype) {
    memset(d, 0, sizeof *d);
    d->n_layers = 1;
    d->n_kv_heads = n_kv_heads;
    d->head_dim = HEAD_DIM;
    d->page_size = PAGE_SIZE;
    d->k_dtype = dtype;
    d->v_dtype = dtype;
    d->storage = LLMKV_STORAGE_METADATA_ONLY;
    d->max_pending_copies = 256; /* nothing here forks: no copy is ever queued */
}

static llmkv_layout layout_of(uint32_t n_kv_heads, llmkv_dtype dtype) {
    llmkv_desc d;
    llmkv_layout l;
    desc_for(&d, n_kv_heads, dtype);
    CHECK(llmkv_layout_for(&d, &l));
    return l;
}

static uint32_t pages_for(uint32_t tokens) { return (tokens + PAGE_SIZE - 1) / PAGE_SIZE; }

/* Decode: K and V of every head the call reads (data and scales, no
   padding). Swap: the page bytes moved. */
static uint64_t case_bytes(const acase* c) {
    llmkv_layout l = layout_of(c->n_kv_heads, c->dtype);
    if (strcmp(c->kind, "decode") != 0) return (uint64_t)c->pages * l.page_bytes;
    return (uint64_t)c->batch * c->ctx * (l.k.bytes + l.k.scale_bytes + l.v.bytes + l.v.scale_bytes) / l.page_size;
}

/* Device bytes of the page pool a decode group of n_seqs sequences needs. */
static uint64_t pool_bytes_for(uint32_t n_kv_heads, llmkv_dtype dtype, uint32_t n_seqs, uint32_t ctx) {
    llmkv_layout l = layout_of(n_kv_heads, dtype);
    return (uint64_t)n_seqs * pages_for(ctx) * l.page_bytes;
}

static double target_for(const acase* c) {
    if (strcmp(c->kind, "decode") != 0) return TARGET_SWAP;
    if (c->batch >= 16 && c->ctx >= 4096) return TARGET_DECODE;
    if (c->batch == 1 && c->ctx >= 32768) return TARGET_DECODE_B1;
    return 0;
}

static void print_table_header(void) {
    printf("%-8s %-5s %-5s %5s %6s %5s %11s %11s %4s %11s %8s %6s  %s\n", "kind", "dtype", "heads", "batch", "ctx",
           "q_tok", "median us", "min us", "reps", "tokens/s", "KV GB/s", "%bw", "target");
}

static void print_shape(const acase* c) {
    char heads[16];
    snprintf(heads, sizeof heads, "%u/%u", N_Q_HEADS, c->n_kv_heads);
    printf("%-8s %-5s %-5s %5u %6u %5u", c->kind, llmkv_dtype_name(c->dtype), heads, c->batch, c->ctx, c->q_tokens);
}

static void json_shape(const bench* b, const acase* c) {
    printf("{\"bench\":\"attn_cuda\",\"kind\":\"%s\",\"backend\":\"%s\",\"device\":\"%s\",\"dtype\":\"%s\","
           "\"batch\":%u,\"ctx\":%u,\"q_tokens\":%u,\"n_q_heads\":%u,\"n_kv_heads\":%u,\"head_dim\":%u,"
           "\"page_size\":%u,\"kv_bytes\":%llu",
           c->kind, BENCH_BACKEND, b->device_json, llmkv_dtype_name(c->dtype), c->batch, c->ctx, c->q_tokens,
           N_Q_HEADS, c->n_kv_heads, HEAD_DIM, PAGE_SIZE, (unsigned long long)case_bytes(c));
    if (c->layout)
        printf(",\"layout\":\"%s\",\"pages\":%u,\"copy_runs\":%u", c->layout, c->pages, c->copy_runs);
}

static void emit_skip(bench* b, const acase* c, const char* why, uint64_t need) {
    b->n_skipped++;
    if (b->json) {
        json_shape(b, c);
        printf(",\"skipped\":\"%s\",\"need_bytes\":%llu,\"device_bytes\":%llu}\n", why, (unsigned long long)need,
               (unsigned long long)b->total_mem);
    } else {
        print_shape(c);
        printf("   skipped: %s (needs %.1f GiB; the device has %.1f GiB)\n", why, gib(need), gib(b->total_mem));
    }
    fflush(stdout);
}

/* ref_gbps: the reference bandwidth of %bw; err_* < 0: not checked. */
static void emit_result(bench* b, const acase* c, double median, double min, int reps, double ref_gbps,
                        double err_abs, double err_rel) {
    double gbps = (double)case_bytes(c) / median / 1e9;
    double pct = ref_gbps > 0 ? 100.0 * gbps / ref_gbps : 0;
    double tok_s = (double)(strcmp(c->kind, "decode") == 0 ? c->batch : c->ctx) / median;
    double target = target_for(c);
    int met = target > 0 && ref_gbps > 0 && pct >= target;
    b->n_run++;
    if (target > 0) {
        b->n_targets++;
        b->n_targets_met += met;
    }
    if (b->json) {
        json_shape(b, c);
        printf(",\"seconds\":%.9f,\"seconds_min\":%.9f,\"reps\":%d,\"tokens_per_s\":%.1f,\"kv_gbps\":%.3f,"
               "\"bw_gbps\":%.3f,\"pct_bw\":%.2f,\"cold\":%s",
               median, min, reps, tok_s, gbps, ref_gbps, pct, strcmp(c->kind, "decode") == 0 ? "true" : "false");
        if (err_abs >= 0) printf(",\"max_abs_err\":%.3g,\"max_rel_err\":%.3g", err_abs, err_rel);
        if (target > 0) printf(",\"target_pct\":%.0f,\"target_met\":%s", target, met ? "true" : "false");
        printf("}\n");
    } else {
        char tgt[32] = "";
        if (target > 0) snprintf(tgt, sizeof tgt, "%.0f%% %s", target, met ? "met" : "MISSED");
        print_shape(c);
        printf(" %11.1f %11.1f %4d %11.1f %8.1f %5.1f%%  %s", median * 1e6, min * 1e6, reps, tok_s, gbps, pct, tgt);
        if (c->layout)
            printf("  (%s, %u pages in %u cop%s)", c->layout, c->pages, c->copy_runs, c->copy_runs == 1 ? "y" : "ies");
        printf("\n");
    }
    fflush(stdout);
}

/* ------------------------------------------------------------------------ */
/* Decode: a filled cache and its cases                                     */
/* ------------------------------------------------------------------------ */

typedef struct dgroup {
    llmkv_cache* kv;
    llmkv_cuda* gpu;
    llmkv_batch* batch;
    llmkv_seq* seqs;
    uint32_t n_seqs, ctx, n_kv_heads;
    llmkv_dtype dtype;
    float *d_q, *d_out, *d_k, *d_v; /* queries and outputs [n_seqs][32][128]; new K, V [n_seqs][kv][128] */
} dgroup;

/* Makes the cache and device pool of n_seqs sequences of ctx tokens, fills
   the pool with random values and reserves every sequence's positions.
   Returns 0 (everything released) when the pool does not fit the device. */
static int dgroup_create(bench* b, dgroup* g, uint32_t n_kv_heads, llmkv_dtype dtype, uint32_t n_seqs,
                         uint32_t ctx) {
    llmkv_desc d;
    llmkv_cuda_desc gd;
    llmkv_result r;
    void* pool = NULL;
    uint64_t pool_bytes = 0;
    uint32_t i;
    size_t nq = (size_t)n_seqs * N_Q_HEADS * HEAD_DIM, nkv = (size_t)n_seqs * n_kv_heads * HEAD_DIM;
    memset(g, 0, sizeof *g);
    desc_for(&d, n_kv_heads, dtype);
    d.n_pages = n_seqs * pages_for(ctx);
    d.max_seqs = n_seqs;
    d.max_seq_len = ctx;
    CHECK(llmkv_cache_create(&d, &g->kv));
    memset(&gd, 0, sizeof gd);
    gd.max_seqs = n_seqs;
    gd.max_tokens = n_seqs;
    r = llmkv_cuda_create(g->kv, &gd, &g->gpu);
    if (r == LLMKV_ERR_DEVICE_OUT_OF_MEMORY) {
        llmkv_cache_destroy(g->kv);
        g->kv = NULL;
        return 0;
    }
    CHECK(r);
    g->d_q = (float*)try_device_alloc(nq * sizeof(float));
    g->d_out = (float*)try_device_alloc(nq * sizeof(float));
    g->d_k = (float*)try_device_alloc(nkv * sizeof(float));
    g->d_v = (float*)try_device_alloc(nkv * sizeof(float));
    if (!g->d_q || !g->d_out || !g->d_k || !g->d_v) {
        if (g->d_q) CUDA_CHECK(cudaFree(g->d_q));
        if (g->d_out) CUDA_CHECK(cudaFree(g->d_out));
        if (g->d_k) CUDA_CHECK(cudaFree(g->d_k));
        if (g->d_v) CUDA_CHECK(cudaFree(g->d_v));
        llmkv_cuda_destroy(g->gpu);
        llmkv_cache_destroy(g->kv);
        memset(g, 0, sizeof *g);
        return 0;
    }
    CHECK(llmkv_cuda_pool(g->gpu, &pool, &pool_bytes));
    launch_fill16(b, pool, (size_t)(pool_bytes / 2), 0x5eed0000u + n_kv_heads * 131u + (uint64_t)dtype + ctx,
                  dtype == LLMKV_DTYPE_BF16);
    launch_fill_f32(b, g->d_q, nq, 0x9000u + ctx);
    launch_fill_f32(b, g->d_k, nkv, 0x9100u + ctx);
    launch_fill_f32(b, g->d_v, nkv, 0x9200u + ctx);
    CUDA_CHECK(cudaStreamSynchronize(b->stream));
    g->seqs = (llmkv_seq*)xmalloc(n_seqs * sizeof(llmkv_seq));
    for (i = 0; i < n_seqs; ++i) {
        CHECK(llmkv_seq_create(g->kv, &g->seqs[i]));
        CHECK(llmkv_reserve(g->kv, g->seqs[i], ctx)); /* the newest position is the query's */
    }
    CHECK(llmkv_batch_create(g->kv, n_seqs, n_seqs, &g->batch));
    g->n_seqs = n_seqs;
    g->ctx = ctx;
    g->n_kv_heads = n_kv_heads;
    g->dtype = dtype;
    return 1;
}

static void dgroup_destroy(dgroup* g) {
    uint32_t i;
    llmkv_batch_destroy(g->batch);
    for (i = 0; i < g->n_seqs; ++i) CHECK(llmkv_seq_free(g->kv, g->seqs[i]));
    free(g->seqs);
    CUDA_CHECK(cudaFree(g->d_q));
    CUDA_CHECK(cudaFree(g->d_out));
    CUDA_CHECK(cudaFree(g->d_k));
    CUDA_CHECK(cudaFree(g->d_v));
    llmkv_cuda_destroy(g->gpu);
    llmkv_cache_destroy(g->kv);
    memset(g, 0, sizeof *g);
}

/* Online softmax in double precision over one (query row, head). */
typedef struct ref_acc {
    double m, l, o[HEAD_DIM];
} ref_acc;

static void ref_add(ref_acc* r, double s, const float* v) {
    double p;
    uint32_t d;
    if (s > r->m) {
        double c = exp(r->m - s); /* m = -inf: 0 */
        r->l *= c;
        for (d = 0; d < HEAD_DIM; ++d) r->o[d] *= c;
        r->m = s;
    }
    p = exp(s - r->m);
    r->l += p;
    for (d = 0; d < HEAD_DIM; ++d) r->o[d] += p * (double)v[d];
}

static float stored_to_f32(llmkv_dtype dtype, uint16_t h) {
    return dtype == LLMKV_DTYPE_BF16 ? llmkv_bf16_to_f32(h) : llmkv_f16_to_f32(h);
}

static void storage_mismatch(const acase* c, uint32_t seq, uint32_t pos, uint32_t kvh, const char* what) {
    fprintf(stderr, "bench_attn_cuda: WARNING: decode %s %u/%u batch %u ctx %u: sequence %u position %u KV head %u: "
            "%s: the kernels are broken, no speed is reported\n",
            llmkv_dtype_name(c->dtype), N_Q_HEADS, c->n_kv_heads, c->batch, c->ctx, seq, pos, kvh, what);
    exit(1);
}

/* The reference reads K/V through llmkv_cuda_gather; so that a fault shared
   by gather and decode cannot pass unseen, a few gathered vectors are
   compared with the pool bytes at the address the manager's page table and
   llmkv_cache_layout give (read with cudaMemcpy), and the newest position
   with what llmkv_cuda_put was given, converted on the host
   (llmkv_f32_to_f16 / _bf16: put stores exactly those bytes). */
static void check_stored(const dgroup* g, const acase* c, uint32_t seq, uint32_t pos, uint32_t kvh,
                         const uint16_t* k_got, const uint16_t* v_got, const uint32_t* pages) {
    llmkv_layout l;
    void* pool = NULL;
    uint64_t pool_bytes = 0;
    uint16_t k_pool[HEAD_DIM], v_pool[HEAD_DIM];
    uint32_t d;
    CHECK(llmkv_cache_layout(g->kv, &l));
    CHECK(llmkv_cuda_pool(g->gpu, &pool, &pool_bytes));
    {
        const unsigned char* page = (const unsigned char*)pool + (uint64_t)pages[pos / l.page_size] * l.page_bytes;
        const uint64_t slot = pos % l.page_size;
        CUDA_CHECK(cudaMemcpy(k_pool, page + l.k.offset + kvh * l.k.head_stride + slot * l.k.slot_stride,
                              sizeof k_pool, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(v_pool, page + l.v.offset + kvh * l.v.head_stride + slot * l.v.slot_stride,
                              sizeof v_pool, cudaMemcpyDeviceToHost));
    }
    if (memcmp(k_pool, k_got, sizeof k_pool) != 0 || memcmp(v_pool, v_got, sizeof v_pool) != 0)
        storage_mismatch(c, seq, pos, kvh, "llmkv_cuda_gather disagrees with the pool bytes at the page table's address");
    if (pos + 1 == c->ctx) {
        float k_in[HEAD_DIM], v_in[HEAD_DIM];
        const size_t at = ((size_t)seq * g->n_kv_heads + kvh) * HEAD_DIM;
        CUDA_CHECK(cudaMemcpy(k_in, g->d_k + at, sizeof k_in, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(v_in, g->d_v + at, sizeof v_in, cudaMemcpyDeviceToHost));
        for (d = 0; d < HEAD_DIM; ++d) {
            uint16_t kw = c->dtype == LLMKV_DTYPE_BF16 ? llmkv_f32_to_bf16(k_in[d]) : llmkv_f32_to_f16(k_in[d]);
            uint16_t vw = c->dtype == LLMKV_DTYPE_BF16 ? llmkv_f32_to_bf16(v_in[d]) : llmkv_f32_to_f16(v_in[d]);
            if (k_got[d] != kw || v_got[d] != vw)
                storage_mismatch(c, seq, pos, kvh, "the stored new token differs from what llmkv_cuda_put was given");
        }
    }
}

/* Checks the outputs of the decode just run: all finite, and six (sequence,
   head) rows against a double-precision reference over the stored K/V
   (whose addressing check_stored checks at three positions).
   Stops the run on a mismatch; returns the largest errors seen. */
static void check_decode(bench* b, const dgroup* g, const acase* c, double* max_abs, double* max_rel) {
    const uint32_t heads[3] = {0, N_Q_HEADS / 2 + 1, N_Q_HEADS - 1}, group = N_Q_HEADS / g->n_kv_heads;
    const size_t nq = (size_t)c->batch * N_Q_HEADS * HEAD_DIM;
    const size_t row_elems = (size_t)g->n_kv_heads * HEAD_DIM;
    const double scale = 1.0 / sqrt((double)HEAD_DIM);
    float* q = (float*)xmalloc(nq * sizeof(float));
    float* out = (float*)xmalloc(nq * sizeof(float));
    uint32_t seqs[2] = {0, c->batch - 1}, a, h, pos, t, d;
    llmkv_batch_info info;
    size_t i;
    *max_abs = *max_rel = 0;
    CUDA_CHECK(cudaMemcpy(q, g->d_q, nq * sizeof(float), cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(out, g->d_out, nq * sizeof(float), cudaMemcpyDeviceToHost));
    for (i = 0; i < nq; ++i) {
        if (!isfinite(out[i])) {
            fprintf(stderr, "bench_attn_cuda: WARNING: decode %s %u/%u batch %u ctx %u: output %llu is not finite "
                    "(%g): the kernel is broken, no speed is reported\n",
                    llmkv_dtype_name(c->dtype), N_Q_HEADS, c->n_kv_heads, c->batch, c->ctx, (unsigned long long)i,
                    (double)out[i]);
            exit(1);
        }
    }
    CHECK(llmkv_batch_get(g->batch, &info));
    if (info.n_seqs != c->batch || info.n_tokens != c->batch) die("batch does not match the case");
    for (a = 0; a < (seqs[1] == seqs[0] ? 1u : 2u); ++a) {
        const uint32_t seq = seqs[a], row = (uint32_t)info.qo_indptr[seq], len = (uint32_t)info.seq_lens[seq];
        const uint32_t probes[3] = {0, len / 2, len - 1};
        uint32_t* pages = (uint32_t*)xmalloc((size_t)pages_for(len) * sizeof(uint32_t)), n_pages = 0, p;
        ref_acc ref[3];
        float kf[HEAD_DIM], vf[HEAD_DIM];
        if (len != c->ctx || (uint32_t)info.positions[row] != len - 1) die("decode row is not the newest position");
        CHECK(llmkv_seq_pages(g->kv, g->seqs[seq], pages, pages_for(len), &n_pages));
        EXPECT(n_pages, pages_for(len));
        for (h = 0; h < 3; ++h) {
            memset(&ref[h], 0, sizeof ref[h]);
            ref[h].m = -HUGE_VAL;
        }
        for (pos = 0; pos < len; pos += CHECK_CHUNK) {
            const uint32_t n = len - pos < CHECK_CHUNK ? len - pos : CHECK_CHUNK;
            const size_t bytes = (size_t)n * row_elems * 2;
            CHECK(llmkv_cuda_gather(g->gpu, seq, 0, pos, n, b->d_ck, 0, b->d_cv, 0, LLMKV_DTYPE_DEFAULT,
                                    b->stream));
            CUDA_CHECK(cudaStreamSynchronize(b->stream));
            CUDA_CHECK(cudaMemcpy(b->h_ck, b->d_ck, bytes, cudaMemcpyDeviceToHost));
            CUDA_CHECK(cudaMemcpy(b->h_cv, b->d_cv, bytes, cudaMemcpyDeviceToHost));
            for (p = 0; p < 3; ++p)
                if (probes[p] >= pos && probes[p] < pos + n)
                    for (h = 0; h < 3; ++h) {
                        const size_t at = (size_t)(probes[p] - pos) * row_elems + (size_t)(heads[h] / group) * HEAD_DIM;
                        check_stored(g, c, seq, probes[p], heads[h] / group, (const uint16_t*)b->h_ck + at,
                                     (const uint16_t*)b->h_cv + at, pages);
                    }
            for (h = 0; h < 3; ++h) {
                const uint32_t kvh = heads[h] / group;
                const float* qv = q + ((size_t)row * N_Q_HEADS + heads[h]) * HEAD_DIM;
                for (t = 0; t < n; ++t) {
                    const uint16_t* kr = (const uint16_t*)b->h_ck + (size_t)t * row_elems + (size_t)kvh * HEAD_DIM;
                    const uint16_t* vr = (const uint16_t*)b->h_cv + (size_t)t * row_elems + (size_t)kvh * HEAD_DIM;
                    double s = 0;
                    for (d = 0; d < HEAD_DIM; ++d) {
                        kf[d] = stored_to_f32(c->dtype, kr[d]);
                        vf[d] = stored_to_f32(c->dtype, vr[d]);
                        s += (double)qv[d] * (double)kf[d];
                    }
                    ref_add(&ref[h], s * scale, vf);
                }
            }
        }
        for (h = 0; h < 3; ++h) {
            const float* ov = out + ((size_t)row * N_Q_HEADS + heads[h]) * HEAD_DIM;
            double err2 = 0, norm2 = 0, worst = 0, rel;
            for (d = 0; d < HEAD_DIM; ++d) {
                double want = ref[h].o[d] / ref[h].l, e = fabs((double)ov[d] - want);
                err2 += e * e;
                norm2 += want * want;
                if (e > worst) worst = e;
            }
            rel = sqrt(err2) / (sqrt(norm2) > 1e-30 ? sqrt(norm2) : 1e-30);
            if (worst > *max_abs) *max_abs = worst;
            if (rel > *max_rel) *max_rel = rel;
            if (!(worst <= MAX_ABS_ERR) || !(rel <= MAX_REL_ERR)) {
                fprintf(stderr, "bench_attn_cuda: WARNING: decode %s %u/%u batch %u ctx %u: sequence %u head %u "
                        "differs from the double-precision reference (max abs error %.3g, limit %.0e; relative "
                        "L2 error %.3g, limit %.0e): the kernel is broken, no speed is reported\n",
                        llmkv_dtype_name(c->dtype), N_Q_HEADS, c->n_kv_heads, c->batch, c->ctx, seq, heads[h],
                        worst, MAX_ABS_ERR, rel, MAX_REL_ERR);
                exit(1);
            }
        }
        free(pages);
    }
    free(q);
    free(out);
}

/* One decode case on the first c->batch sequences of g. */
static void run_decode(bench* b, dgroup* g, const acase* c) {
    llmkv_attn_desc desc;
    uint32_t* q_lens = (uint32_t*)xmalloc(c->batch * sizeof(uint32_t));
    double t[MAX_REPS], est, median, min, err_abs, err_rel;
    int reps, r;
    uint32_t i;
    for (i = 0; i < c->batch; ++i) q_lens[i] = 1; /* the newest token is the query */
    CHECK(llmkv_batch_build(g->batch, g->seqs, q_lens, c->batch));
    free(q_lens);
    CHECK(llmkv_cuda_upload(g->gpu, g->batch, b->stream));
    CHECK(llmkv_cuda_put(g->gpu, 0, g->d_k, 0, g->d_v, 0, LLMKV_DTYPE_F32, b->stream));
    memset(&desc, 0, sizeof desc);
    desc.layer = 0;
    desc.n_q_heads = N_Q_HEADS;
    desc.q = g->d_q;
    desc.out = g->d_out;
    CUDA_CHECK(cudaStreamSynchronize(b->stream));
    CUDA_CHECK(cudaMemset(g->d_out, 0xff, (size_t)c->batch * N_Q_HEADS * HEAD_DIM * sizeof(float))); /* NaN */
    CUDA_CHECK(cudaDeviceSynchronize());

    /* warm-up, then the check */
    CHECK(llmkv_cuda_decode(g->gpu, &desc, b->stream));
    CUDA_CHECK(cudaStreamSynchronize(b->stream));
    check_decode(b, g, c, &err_abs, &err_rel);

    /* one cold call to size the repetitions */
    flush_l2(b);
    CUDA_CHECK(cudaEventRecord(b->ev[0], b->stream));
    CHECK(llmkv_cuda_decode(g->gpu, &desc, b->stream));
    CUDA_CHECK(cudaEventRecord(b->ev[1], b->stream));
    CUDA_CHECK(cudaEventSynchronize(b->ev[1]));
    est = elapsed_s(b->ev[0], b->ev[1]);
    if (b->quick) {
        reps = QUICK_REPS;
    } else {
        double want = CASE_SECONDS / (est + b->flush_seconds);
        reps = want >= MAX_REPS ? MAX_REPS : want <= MIN_REPS ? MIN_REPS : (int)want;
    }
    /* Every call between its own two events, after an untimed L2 eviction;
       all enqueued at once, so the device never waits for the host. */
    for (r = 0; r < reps; ++r) {
        flush_l2(b);
        CUDA_CHECK(cudaEventRecord(b->ev[2 * r], b->stream));
        CHECK(llmkv_cuda_decode(g->gpu, &desc, b->stream));
        CUDA_CHECK(cudaEventRecord(b->ev[2 * r + 1], b->stream));
    }
    CUDA_CHECK(cudaStreamSynchronize(b->stream));
    CUDA_CHECK(cudaGetLastError());
    for (r = 0; r < reps; ++r) t[r] = elapsed_s(b->ev[2 * r], b->ev[2 * r + 1]);
    median = median_of(t, reps);
    min = t[0];
    emit_result(b, c, median, min, reps, b->copy_gbps, err_abs, err_rel);
}

static void section(const bench* b, const char* kind, uint32_t n_kv_heads, llmkv_dtype dtype) {
    if (!b->json)
        printf("\n-- %s, %u query heads over %u KV heads, %s K/V\n", kind, N_Q_HEADS, n_kv_heads,
               llmkv_dtype_name(dtype));
}

static void bench_decode(bench* b, uint32_t n_kv_heads, llmkv_dtype dtype, const uint32_t* ctxs, int n_ctx,
                         const uint32_t* batches, int n_batch) {
    int ci, bi;
    section(b, "decode", n_kv_heads, dtype);
    for (ci = 0; ci < n_ctx; ++ci) {
        const uint64_t budget = b->total_mem > MEM_MARGIN ? b->total_mem - MEM_MARGIN : 0;
        dgroup g;
        uint32_t fit = 0; /* the largest batch whose pool fits */
        acase c;
        memset(&c, 0, sizeof c);
        c.kind = "decode";
        c.dtype = dtype;
        c.n_kv_heads = n_kv_heads;
        c.ctx = ctxs[ci];
        for (bi = 0; bi < n_batch; ++bi)
            if (batches[bi] > fit && pool_bytes_for(n_kv_heads, dtype, batches[bi], c.ctx) <= budget)
                fit = batches[bi];
        /* The estimate cannot see what the runtime keeps: step down on failure. */
        while (fit && !dgroup_create(b, &g, n_kv_heads, dtype, fit, c.ctx)) {
            uint32_t next = 0;
            for (bi = 0; bi < n_batch; ++bi)
                if (batches[bi] < fit && batches[bi] > next) next = batches[bi];
            fit = next;
        }
        for (bi = 0; bi < n_batch; ++bi) {
            c.batch = c.q_tokens = batches[bi];
            if (c.batch > fit) {
                emit_skip(b, &c, "does not fit device memory", pool_bytes_for(n_kv_heads, dtype, c.batch, c.ctx));
                continue;
            }
            run_decode(b, &g, &c);
        }
        if (fit) dgroup_destroy(&g);
    }
}

/* ------------------------------------------------------------------------ */
/* Swap                                                                     */
/* ------------------------------------------------------------------------ */

/* Pages of seq and how many runs of consecutive ids they form (one copy
   each in llmkv_cuda_swap_out / _in). */
static uint32_t copy_runs(llmkv_cache* kv, llmkv_seq seq, uint32_t* ids, uint32_t max_ids, uint32_t* n_pages) {
    uint32_t i, runs = 0;
    CHECK(llmkv_seq_pages(kv, seq, ids, max_ids, n_pages));
    for (i = 0; i < *n_pages; ++i)
        if (i == 0 || ids[i] != ids[i - 1] + 1) ++runs;
    return runs;
}

/* Gathers three windows (start, middle, end) of seq's K and V, raw, into
   host buffers out[3][2] of VERIFY_TOKENS rows each. */
static void swap_windows(bench* b, llmkv_cuda* gpu, llmkv_batch* batch, llmkv_seq seq, uint32_t len,
                         size_t row_bytes, unsigned char* out) {
    uint32_t zero = 0, w, n = len < VERIFY_TOKENS ? len : VERIFY_TOKENS;
    uint32_t starts[3] = {0, (len - n) / 2, len - n};
    size_t win = (size_t)VERIFY_TOKENS * row_bytes;
    CHECK(llmkv_batch_build(batch, &seq, &zero, 1));
    CHECK(llmkv_cuda_upload(gpu, batch, b->stream));
    for (w = 0; w < 3; ++w) {
        CHECK(llmkv_cuda_gather(gpu, 0, 0, starts[w], n, b->d_ck, 0, b->d_cv, 0, LLMKV_DTYPE_DEFAULT, b->stream));
        CUDA_CHECK(cudaStreamSynchronize(b->stream));
        CUDA_CHECK(cudaMemcpy(out + (2 * w) * win, b->d_ck, (size_t)n * row_bytes, cudaMemcpyDeviceToHost));
        CUDA_CHECK(cudaMemcpy(out + (2 * w + 1) * win, b->d_cv, (size_t)n * row_bytes, cudaMemcpyDeviceToHost));
    }
}

static void bench_swap(bench* b, uint32_t n_kv_heads, llmkv_dtype dtype, uint32_t len, int interleaved) {
    const uint32_t n_pages_seq = pages_for(len), reps = b->quick ? QUICK_RUNS : SWAP_REPS;
    const size_t row_bytes = (size_t)n_kv_heads * HEAD_DIM * 2, win = (size_t)VERIFY_TOKENS * row_bytes;
    llmkv_layout l = layout_of(n_kv_heads, dtype);
    llmkv_desc d;
    llmkv_cache* kv;
    llmkv_cuda* gpu = NULL;
    llmkv_batch* batch;
    llmkv_seq seq, other;
    llmkv_result res;
    void *pool, *host = NULL;
    uint64_t pool_bytes;
    size_t host_bytes = 0;
    uint32_t* ids = (uint32_t*)xmalloc(n_pages_seq * sizeof(uint32_t));
    unsigned char* before = (unsigned char*)xmalloc(6 * win);
    unsigned char* after = (unsigned char*)xmalloc(6 * win);
    double t_out[SWAP_REPS], t_in[SWAP_REPS];
    uint32_t n_pages = 0, runs_out = 0, runs_in = 0, r, done;
    acase c;
    memset(&c, 0, sizeof c);
    c.kind = "swap_out";
    c.dtype = dtype;
    c.n_kv_heads = n_kv_heads;
    c.batch = 1;
    c.ctx = len;
    c.layout = interleaved ? "interleaved" : "contiguous";
    c.pages = n_pages_seq;

    desc_for(&d, n_kv_heads, dtype);
    d.n_pages = n_pages_seq * (interleaved ? 2 : 1);
    d.max_seqs = 2;
    d.max_seq_len = len;
    CHECK(llmkv_cache_create(&d, &kv));
    res = (uint64_t)d.n_pages * l.page_bytes + MEM_MARGIN <= b->total_mem ? llmkv_cuda_create(kv, NULL, &gpu)
                                                                          : LLMKV_ERR_DEVICE_OUT_OF_MEMORY;
    if (res == LLMKV_ERR_DEVICE_OUT_OF_MEMORY) {
        emit_skip(b, &c, "does not fit device memory", (uint64_t)d.n_pages * l.page_bytes);
        c.kind = "swap_in";
        emit_skip(b, &c, "does not fit device memory", (uint64_t)d.n_pages * l.page_bytes);
        llmkv_cache_destroy(kv);
        free(ids);
        free(before);
        free(after);
        return;
    }
    CHECK(res);
    CHECK(llmkv_cuda_pool(gpu, &pool, &pool_bytes));
    launch_fill16(b, pool, (size_t)(pool_bytes / 2), 0x5a00u + n_kv_heads + (uint64_t)dtype, dtype == LLMKV_DTYPE_BF16);
    CUDA_CHECK(cudaStreamSynchronize(b->stream));
    CHECK(llmkv_seq_create(kv, &seq));
    CHECK(llmkv_seq_create(kv, &other));
    if (interleaved) { /* page by page, alternating: no two neighbours belong to seq */
        for (done = 0; done < len; done += PAGE_SIZE) {
            uint32_t n = len - done < PAGE_SIZE ? len - done : PAGE_SIZE;
            CHECK(llmkv_reserve(kv, seq, n));
            CHECK(llmkv_reserve(kv, other, n));
        }
    } else {
        CHECK(llmkv_reserve(kv, seq, len));
    }
    CHECK(llmkv_batch_create(kv, 1, 1, &batch));
    CHECK(llmkv_cuda_swap_size(gpu, len, &host_bytes));
    if (llmkv_cuda_host_alloc(host_bytes, &host) != LLMKV_OK) {
        emit_skip(b, &c, "llmkv_cuda_host_alloc failed", host_bytes);
        c.kind = "swap_in";
        emit_skip(b, &c, "llmkv_cuda_host_alloc failed", host_bytes);
    } else {
        memset(host, 0, host_bytes); /* touched before anything is timed */
        swap_windows(b, gpu, batch, seq, len, row_bytes, before);
        /* warm-up: one round trip */
        CHECK(llmkv_cuda_swap_out(gpu, seq, host, host_bytes, b->stream));
        CUDA_CHECK(cudaStreamSynchronize(b->stream));
        CHECK(llmkv_cuda_swap_in(gpu, seq, host, host_bytes, b->stream));
        CUDA_CHECK(cudaStreamSynchronize(b->stream));
        for (r = 0; r < reps; ++r) {
            runs_out = copy_runs(kv, seq, ids, n_pages_seq, &n_pages);
            EXPECT(n_pages, n_pages_seq);
            CUDA_CHECK(cudaEventRecord(b->ev[0], b->stream));
            CHECK(llmkv_cuda_swap_out(gpu, seq, host, host_bytes, b->stream));
            CUDA_CHECK(cudaEventRecord(b->ev[1], b->stream));
            CUDA_CHECK(cudaEventSynchronize(b->ev[1]));
            t_out[r] = elapsed_s(b->ev[0], b->ev[1]);
            CUDA_CHECK(cudaEventRecord(b->ev[2], b->stream));
            CHECK(llmkv_cuda_swap_in(gpu, seq, host, host_bytes, b->stream));
            CUDA_CHECK(cudaEventRecord(b->ev[3], b->stream));
            CUDA_CHECK(cudaEventSynchronize(b->ev[3]));
            t_in[r] = elapsed_s(b->ev[2], b->ev[3]);
            runs_in = copy_runs(kv, seq, ids, n_pages_seq, &n_pages);
            EXPECT(n_pages, n_pages_seq);
        }
        CUDA_CHECK(cudaGetLastError());
        swap_windows(b, gpu, batch, seq, len, row_bytes, after);
        if (memcmp(before, after, 6 * win) != 0) {
            fprintf(stderr, "bench_attn_cuda: WARNING: swap %s %u/%u ctx %u (%s): the sequence does not read "
                    "the same after swap out and in: swap is broken, no speed is reported\n",
                    llmkv_dtype_name(dtype), N_Q_HEADS, n_kv_heads, len, c.layout);
            exit(1);
        }
        c.copy_runs = runs_out;
        emit_result(b, &c, median_of(t_out, (int)reps), t_out[0], (int)reps, b->d2h_gbps, -1, -1);
        c.kind = "swap_in";
        c.copy_runs = runs_in;
        emit_result(b, &c, median_of(t_in, (int)reps), t_in[0], (int)reps, b->h2d_gbps, -1, -1);
        llmkv_cuda_host_free(host);
    }
    llmkv_batch_destroy(batch);
    CHECK(llmkv_seq_free(kv, seq));
    CHECK(llmkv_seq_free(kv, other));
    llmkv_cuda_destroy(gpu);
    llmkv_cache_destroy(kv);
    free(ids);
    free(before);
    free(after);
}

/* ------------------------------------------------------------------------ */

static void usage(const char* argv0) {
    fprintf(stderr,
            "usage: %s [--json] [--quick] [--kind decode|swap] [--dtype f16|bf16]\n"
            "       [--ctx N] [--batch N] [--kv-heads 1|2|4|8|16|32]\n",
            argv0);
    exit(2);
}

int main(int argc, char** argv) {
    static const uint32_t all_ctxs[] = {1024, 4096, 16384, 32768}, all_batches[] = {1, 16, 64};
    static const uint32_t quick_ctxs[] = {1024}, quick_batches[] = {1, 16};
    static const uint32_t kv_heads[] = {8, 32};
    static const llmkv_dtype dtypes[] = {LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16};
    bench b;
    cudaDeviceProp prop;
    uint32_t ctxs[MAX_LIST], batches[MAX_LIST], heads[2];
    int n_ctx = 0, n_batch = 0, n_heads = 0, i, h, t;
    uint64_t t_start = now_ns();
    memset(&b, 0, sizeof b);
    for (i = 1; i < argc; ++i) {
        const char* a = argv[i];
        const char* v = i + 1 < argc ? argv[i + 1] : NULL;
        if (strcmp(a, "--json") == 0) {
            b.json = 1;
        } else if (strcmp(a, "--quick") == 0) {
            b.quick = 1;
        } else if (strcmp(a, "--kind") == 0 && v) {
            if (strcmp(v, "decode") == 0) b.only_kind = 1;
            else if (strcmp(v, "swap") == 0) b.only_kind = 2;
            else usage(argv[0]);
            ++i;
        } else if (strcmp(a, "--dtype") == 0 && v) {
            if (strcmp(v, "f16") == 0) b.only_dtype = LLMKV_DTYPE_F16;
            else if (strcmp(v, "bf16") == 0) b.only_dtype = LLMKV_DTYPE_BF16;
            else usage(argv[0]);
            ++i;
        } else if ((strcmp(a, "--ctx") == 0 || strcmp(a, "--batch") == 0 || strcmp(a, "--kv-heads") == 0) && v) {
            char* end;
            long n = strtol(v, &end, 10);
            if (*end || n < 1) usage(argv[0]);
            if (a[2] == 'c') {
                if (n > (1L << 22)) usage(argv[0]);
                b.only_ctx = (uint32_t)n;
            } else if (a[2] == 'b') {
                if (n > 4096) usage(argv[0]);
                b.only_batch = (uint32_t)n;
            } else {
                if (n > (long)N_Q_HEADS || N_Q_HEADS % (uint32_t)n != 0) usage(argv[0]);
                b.only_kv_heads = (uint32_t)n;
            }
            ++i;
        } else {
            usage(argv[0]);
        }
    }

    if (llmkv_cuda_device_count() == 0) {
        fprintf(b.json ? stderr : stdout, "no CUDA device: nothing to measure\n");
        return 0;
    }
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    snprintf(b.device_name, sizeof b.device_name, "%s", prop.name);
    json_escape(b.device_name, b.device_json, sizeof b.device_json);
    b.cc_major = prop.major;
    b.cc_minor = prop.minor;
    b.n_sm = prop.multiProcessorCount > 0 ? prop.multiProcessorCount : 1;
    b.total_mem = (uint64_t)prop.totalGlobalMem;
    b.l2_bytes = prop.l2CacheSize > 0 ? (size_t)prop.l2CacheSize : 0;
    b.grid = (unsigned int)b.n_sm * 8u;
    CUDA_CHECK(cudaStreamCreate(&b.stream));
    for (i = 0; i < 2 * MAX_REPS; ++i) CUDA_CHECK(cudaEventCreate(&b.ev[i]));
    b.sink = (unsigned int*)device_alloc(sizeof(unsigned int));

    if (b.only_ctx) ctxs[n_ctx++] = b.only_ctx;
    else if (b.quick) for (i = 0; i < (int)(sizeof quick_ctxs / sizeof quick_ctxs[0]); ++i) ctxs[n_ctx++] = quick_ctxs[i];
    else for (i = 0; i < (int)(sizeof all_ctxs / sizeof all_ctxs[0]); ++i) ctxs[n_ctx++] = all_ctxs[i];
    if (b.only_batch) batches[n_batch++] = b.only_batch;
    else if (b.quick)
        for (i = 0; i < (int)(sizeof quick_batches / sizeof quick_batches[0]); ++i) batches[n_batch++] = quick_batches[i];
    else for (i = 0; i < (int)(sizeof all_batches / sizeof all_batches[0]); ++i) batches[n_batch++] = all_batches[i];
    if (b.only_kv_heads) heads[n_heads++] = b.only_kv_heads;
    else for (i = 0; i < 2; ++i) heads[n_heads++] = kv_heads[i];

    if (!b.json) {
        printf("llmkv %s GPU attention benchmark (%s): %s, compute capability %d.%d, %d SMs, %.1f GiB, L2 %llu "
               "MiB; head_dim %u, page %u, %u query heads, one layer\n",
               llmkv_version(), BENCH_BACKEND, b.device_name, b.cc_major, b.cc_minor, b.n_sm, gib(b.total_mem),
               (unsigned long long)(b.l2_bytes >> 20), HEAD_DIM, PAGE_SIZE, N_Q_HEADS);
    }
    measure_bandwidth(&b, 0);

    /* The L2 eviction buffer, and what one eviction costs (to size reps). */
    b.flush_bytes = 4 * b.l2_bytes > FLUSH_MIN_BYTES ? 4 * b.l2_bytes : FLUSH_MIN_BYTES;
    b.flush_buf = (unsigned char*)device_alloc(b.flush_bytes);
    launch_fill16(&b, b.flush_buf, b.flush_bytes / 2, 0xF1u, 0);
    CUDA_CHECK(cudaStreamSynchronize(b.stream));
    b.flush_seconds = (double)b.flush_bytes / (read_gbps(&b, b.flush_buf, b.flush_bytes, 3) * 1e9);
    /* Reference check buffers: one chunk of K and V at 32 KV heads. */
    b.chunk_bytes = (size_t)CHECK_CHUNK * N_Q_HEADS * HEAD_DIM * 2;
    b.d_ck = (unsigned char*)device_alloc(b.chunk_bytes);
    b.d_cv = (unsigned char*)device_alloc(b.chunk_bytes);
    b.h_ck = (unsigned char*)xmalloc(b.chunk_bytes);
    b.h_cv = (unsigned char*)xmalloc(b.chunk_bytes);

    if (!b.json) {
        printf("time: median (and minimum) over reps of one call, GPU time between events around it, after an "
               "untimed warm-up;\n");
        printf("  decode: llmkv_cuda_decode (decode + merge kernels), each call after an untimed %llu MiB read "
               "that evicts the L2\n",
               (unsigned long long)(b.flush_bytes >> 20));
        printf("  swap: the whole llmkv_cuda_swap_out / _in call (host work included) to the end of its copies\n");
        printf("KV GB/s: decode: K/V bytes the call must read / time, sum over sequences of len * n_kv_heads * "
               "(K + V bytes\n");
        printf("  per head vector) (queries, outputs, tables, split-K partials not counted); swap: pages * "
               "page_bytes / time\n");
        printf("%%bw: decode: KV GB/s / device-to-device copy bandwidth (read + write); swap_out: / device->host; "
               "swap_in: / host->device\n");
        printf("tokens/s: decode: batch / time; swap: tokens / time. Every decode output is checked against a "
               "double-precision\n");
        printf("  reference (6 rows per case), every swap byte for byte (3 windows): a mismatch stops the run\n");
        if (b.quick)
            printf("--quick: a smoke run, %d decode and %d swap repetitions; do not report these figures\n",
                   QUICK_REPS, QUICK_RUNS);
        printf("\n");
        print_table_header();
    }

    if (b.only_kind != 2)
        for (h = 0; h < n_heads; ++h)
            for (t = 0; t < (int)(sizeof dtypes / sizeof dtypes[0]); ++t)
                if (!b.only_dtype || b.only_dtype == dtypes[t])
                    bench_decode(&b, heads[h], dtypes[t], ctxs, n_ctx, batches, n_batch);
    if (b.only_kind != 1) {
        const llmkv_dtype dt = b.only_dtype ? b.only_dtype : dtypes[0]; /* same bytes for f16 and bf16 */
        const uint32_t len = b.only_ctx ? b.only_ctx : b.quick ? SWAP_LEN_QUICK : SWAP_LEN;
        int lay;
        for (h = 0; h < n_heads; ++h) {
            section(&b, "swap", heads[h], dt);
            for (lay = 0; lay < 2; ++lay) bench_swap(&b, heads[h], dt, len, lay);
        }
    }

    CUDA_CHECK(cudaFree(b.flush_buf));
    CUDA_CHECK(cudaFree(b.d_ck));
    CUDA_CHECK(cudaFree(b.d_cv));
    free(b.h_ck);
    free(b.h_cv);
    if (!b.json) printf("\n");
    measure_bandwidth(&b, 1);
    CUDA_CHECK(cudaFree(b.sink));
    for (i = 0; i < 2 * MAX_REPS; ++i) CUDA_CHECK(cudaEventDestroy(b.ev[i]));
    CUDA_CHECK(cudaStreamDestroy(b.stream));
    if (!b.json)
        printf("%d cases run, %d skipped; targets met: %d of %d; %.1f s in all\n", b.n_run, b.n_skipped,
               b.n_targets_met, b.n_targets, (double)(now_ns() - t_start) * 1e-9);
    return 0;
}
