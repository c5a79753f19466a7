/* llmkv_cuda.cuh - v0.1.0 - GPU backend for llmkv: device page pool and paged
   kernels (CUDA; HIP through llmkv_hip.h) - MIT or public domain

   The cache manager of llmkv.h keeps every piece of metadata (page tables,
   reference counts, the prefix index); this header owns only bytes on the
   device: the page pool, the uploaded tables of each step, and fixed
   workspaces. It runs what the manager decides (page copies) and the
   kernels an engine needs per layer: put (scatter and quantize new K/V),
   paged decode attention (split-K with a merge), gather, and swap of whole
   sequences between the device pool and pinned host memory.

   HOW TO INCLUDE

       In *one* .cu file:

           #define LLMKV_IMPLEMENTATION
           #define LLMKV_CUDA_IMPLEMENTATION
           #include "llmkv_cuda.cuh"

       Other files (C or C++) include "llmkv.h" and declare nothing else:
       with LLMKV_CUDA_DECLARATIONS_ONLY defined, this header is plain C as
       well, so C programs include it for the declarations and link the .cu
       file. For AMD GPUs include "llmkv_hip.h" instead (the same source;
       the functions keep their llmkv_cuda_ names, one backend per program).

   THE LOOP

       llmkv_desc d = {0};  ... d.storage = LLMKV_STORAGE_METADATA_ONLY;
       llmkv_cache_create(&d, &kv);
       llmkv_cuda* gpu;  llmkv_cuda_desc gd = {0};
       llmkv_cuda_create(kv, &gd, &gpu);           // cudaMalloc of the pool, once
       per step:
           llmkv_reserve_many(kv, ...);             // the manager decides
           llmkv_batch_build(batch, seqs, q_lens, n);
           llmkv_cuda_upload(gpu, batch, stream);   // page copies, then tables
           per layer:
               llmkv_cuda_put(gpu, layer, k, 0, v, 0, LLMKV_DTYPE_F16, stream);
               llmkv_cuda_decode(gpu, &attn_desc, stream);
           llmkv_seq_mark_written(kv, seq, length);  // for the prefix index

   STREAMS AND THREADS

       Every call takes a stream and only enqueues work on it (no device
       synchronisation, no allocation). Use one stream for all calls on one
       llmkv_cuda, or order the streams yourself: a page a call frees (swap
       out) can be written by the next put. One host thread at a time per
       llmkv_cuda (it mutates the cache it was created from).

   CUDA GRAPHS

       Tables, the split-K workspace and the copy-command buffers are sized
       at creation. llmkv_cuda_upload writes host staging and enqueues one
       copy; put, decode and gather read only device buffers whose addresses
       never change, so a captured graph of a layer's put + decode replays
       against whatever the latest upload wrote (with the same number of
       query rows and splits: see llmkv_cuda_desc.fixed_splits).

   LICENSE: see llmkv.h.
*/
#ifndef LLMKV_CUDA_CUH
#define LLMKV_CUDA_CUH

#if defined(__NVCC__)
#pragma nv_diag_suppress 1675 /* llmkv.h's "#pragma GCC unroll", meant for the host compiler */
#endif
#include "llmkv.h"
#if defined(__NVCC__)
#pragma nv_diag_default 1675
#endif

#ifndef LLMKV_CUDA_DECLARATIONS_ONLY
#if !defined(LLMKV_GPU_HIP) && !defined(LLMKV_GPU_EMULATE)
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#endif
typedef cudaStream_t llmkv_gpu_stream;
#else
typedef void* llmkv_gpu_stream; /* a cudaStream_t (or hipStream_t) */
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct llmkv_cuda llmkv_cuda;

/* Options of llmkv_cuda_create. Zero-initialise; zero fields take the
   default their comment states. */
typedef struct llmkv_cuda_desc {
    int device;                 /* device ordinal; default 0 */
    uint32_t max_seqs;          /* sequences per uploaded batch; default: the
                                   cache's max_seqs */
    uint32_t max_tokens;        /* query rows per uploaded batch; default 4096 */
    uint32_t max_splits;        /* split-K partitions of one row, 1..1024;
                                   default 64 */
    uint64_t split_workspace_bytes; /* device workspace for split-K partial
                                   results; default 64 MiB. A launch splits
                                   only as far as it fits. */
    uint32_t fixed_splits;      /* nonzero: every decode uses this many splits
                                   (at most max_splits; fewer only when the
                                   workspace cannot hold them: for CUDA graph
                                   capture, size it); 0: chosen per call */
} llmkv_cuda_desc;

/* Number of usable devices (0 when there is no driver or device). Thread
   safety: any thread. */
LLMKV_API int llmkv_cuda_device_count(void);

/* Creates the device side of a metadata-only cache: allocates its page pool
   (page_bytes * n_pages of plain device memory, zeroed), the batch tables,
   the split-K workspace, the copy-command buffers and their pinned staging.
   Nothing is allocated after this call. `cache` must outlive the result;
   `desc` may be NULL (all defaults). The cache's head_dim must be one the
   decode kernel is built for (64, 80, 96, 128 or 256) or decode returns
   LLMKV_ERR_UNSUPPORTED; put, gather, copies and swap serve every shape.
   Errors: LLMKV_ERR_INVALID_ARGUMENT (a host cache, bad options),
   LLMKV_ERR_NO_DEVICE, LLMKV_ERR_DEVICE_OUT_OF_MEMORY (the pool or a
   workspace does not fit; everything allocated so far is released),
   LLMKV_ERR_DEVICE. The cache is never changed.
   Thread safety: any thread; the cache is only read. */
LLMKV_API llmkv_result llmkv_cuda_create(llmkv_cache* cache, const llmkv_cuda_desc* desc, llmkv_cuda** out);

/* Frees the device and pinned memory of `gpu` (after synchronising the
   device, so no enqueued work still uses it). NULL is ignored. The cache
   is not touched (destroy it afterwards, or keep it). Thread safety: no
   other call on `gpu` may be running. */
LLMKV_API void llmkv_cuda_destroy(llmkv_cuda* gpu);

/* Device address and size of the page pool: page p starts at
   base + p * page_bytes, laid out as llmkv_cache_layout says (for external
   kernels). Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_cuda_pool(const llmkv_cuda* gpu, void** base, uint64_t* bytes);

/* Takes the cache's pending page-copy commands (llmkv_copy_cmds_take) and
   enqueues them on `stream`, in order (a command that reads a page an
   earlier one writes waits for it). *n_done (may be NULL) receives how
   many. llmkv_cuda_upload calls it first; call it yourself before any
   other kernel that reads pages the manager may have copied.
   Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_cuda_run_copies(llmkv_cuda* gpu, llmkv_gpu_stream stream, uint32_t* n_done);

/* Runs pending page copies, then uploads one step's batch: its CSR page
   tables, sequence lengths, query positions and slot mapping, through
   pinned staging, asynchronously on `stream`. Later put, decode and gather
   calls use this batch until the next upload. The staging is double
   buffered: an upload waits (on the host) only for the copy of the upload
   before the previous one. Errors: LLMKV_ERR_STALE_BATCH,
   LLMKV_ERR_INVALID_ARGUMENT (a batch of another cache),
   LLMKV_ERR_BATCH_FULL (more sequences, query rows or page-table entries
   than desc sized), LLMKV_ERR_DEVICE. On error the previous upload stays.
   Thread safety: mutates the cache (its copy queue). */
LLMKV_API llmkv_result llmkv_cuda_upload(llmkv_cuda* gpu, const llmkv_batch* batch, llmkv_gpu_stream stream);

/* Writes the K and V of one layer for every query row of the uploaded batch
   into its slot (the batch's slot_mapping), converting from src_dtype (F32,
   F16 or BF16; DEFAULT means F32) and quantizing to the storage types,
   byte for byte as llmkv_quantize does on the CPU.
   k, v: device arrays [n_tokens][n_kv_heads][head_dim], rows k_stride /
   v_stride bytes apart (0: packed); either may be NULL to skip that part.
   Errors: LLMKV_ERR_STALE_BATCH (no upload, or a sequence of the batch
   changed or the batch was rebuilt since), LLMKV_ERR_OUT_OF_RANGE (layer), LLMKV_ERR_INVALID_ARGUMENT,
   LLMKV_ERR_MISALIGNED (pointers or strides not aligned to the element),
   LLMKV_ERR_BUFFER_TOO_SMALL (a stride shorter than a row), LLMKV_ERR_DEVICE.
   Thread safety: as llmkv_put. */
LLMKV_API llmkv_result llmkv_cuda_put(llmkv_cuda* gpu, uint32_t layer, const void* k, size_t k_stride,
                                      const void* v, size_t v_stride, llmkv_dtype src_dtype,
                                      llmkv_gpu_stream stream);

/* Paged attention for every query row of the uploaded batch, with the
   semantics of llmkv_attend (causal positions, window, non-causal, scale,
   soft-cap, log-sum-exp out): desc->q, out and lse are device pointers;
   desc->path is ignored. Built for decode (each row reads its keys once
   per group of up to 4 query heads; long rows are split over the GPU and
   merged by log-sum-exp), and correct for any number of rows per
   sequence. Every storage type; head_dim 64, 80, 96, 128 or 256.
   Errors: as llmkv_attend (LLMKV_ERR_STALE_BATCH, INVALID_ARGUMENT,
   OUT_OF_RANGE, MISALIGNED, BUFFER_TOO_SMALL), LLMKV_ERR_UNSUPPORTED for
   another head_dim, LLMKV_ERR_DEVICE. Nothing is enqueued on error.
   Thread safety: reads the cache. */
LLMKV_API llmkv_result llmkv_cuda_decode(llmkv_cuda* gpu, const llmkv_attn_desc* desc, llmkv_gpu_stream stream);

/* Copies positions [pos, pos + n_tokens) of one layer of the uploaded
   batch's sequence `batch_index` into contiguous device buffers
   [n_tokens][n_kv_heads][head_dim] (as llmkv_gather: dst_dtype DEFAULT
   keeps F32/F16/BF16 bytes and dequantizes the quantized types to F32;
   F32, F16 or BF16 convert). Either output may be NULL.
   Errors: LLMKV_ERR_STALE_BATCH, LLMKV_ERR_OUT_OF_RANGE (index, layer,
   positions), LLMKV_ERR_INVALID_ARGUMENT, LLMKV_ERR_MISALIGNED,
   LLMKV_ERR_BUFFER_TOO_SMALL, LLMKV_ERR_DEVICE. Thread safety: reads. */
LLMKV_API llmkv_result llmkv_cuda_gather(llmkv_cuda* gpu, uint32_t batch_index, uint32_t layer, uint32_t pos,
                                         uint32_t n_tokens, void* k, size_t k_stride, void* v, size_t v_stride,
                                         llmkv_dtype dst_dtype, llmkv_gpu_stream stream);

/* Swap (preemption under memory pressure).
   llmkv_cuda_swap_out copies every page of `seq` into `host` (pinned
   memory: llmkv_cuda_host_alloc), with its length and (with a prefix
   index) its token ids, then releases its pages: the handle stays valid,
   its length becomes 0, and its pages return to the pool (or stay cached
   in the prefix index).
   llmkv_cuda_swap_in reserves the recorded length again (may evict) and
   copies the saved pages back: the sequence reads bit-identically to
   before. On failure it leaves the sequence empty, as it found it.
   The copies are asynchronous on `stream`: keep `host` alive and unread
   until the stream passes them. `host` must be 16-byte aligned.
   llmkv_cuda_swap_size: the bytes `host` needs for a sequence of `length`
   positions. Both calls allocate one uint32_t per page on the host for
   their duration (swap is not a per-step call).
   Errors: LLMKV_ERR_STALE_HANDLE, LLMKV_ERR_MISALIGNED,
   LLMKV_ERR_BUFFER_TOO_SMALL, LLMKV_ERR_BAD_FORMAT (swap_in of a buffer
   that swap_out did not write for this cache), LLMKV_ERR_INVALID_ARGUMENT
   (swap_in into a non-empty sequence), the errors of llmkv_reserve,
   LLMKV_ERR_DEVICE. Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_cuda_swap_size(const llmkv_cuda* gpu, uint32_t length, size_t* bytes);
LLMKV_API llmkv_result llmkv_cuda_swap_out(llmkv_cuda* gpu, llmkv_seq seq, void* host, size_t host_bytes,
                                           llmkv_gpu_stream stream);
LLMKV_API llmkv_result llmkv_cuda_swap_in(llmkv_cuda* gpu, llmkv_seq seq, const void* host, size_t host_bytes,
                                          llmkv_gpu_stream stream);

/* Pinned (page-locked) host memory for swap buffers, and its release.
   Errors: LLMKV_ERR_INVALID_ARGUMENT, LLMKV_ERR_DEVICE_OUT_OF_MEMORY,
   LLMKV_ERR_NO_DEVICE. Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_cuda_host_alloc(size_t bytes, void** out);
LLMKV_API void llmkv_cuda_host_free(void* host);

#ifdef __cplusplus
}
#endif
#endif /* LLMKV_CUDA_CUH */

/* ======================================================================== */
/* Implementation                                                           */
/* ======================================================================== */
#if defined(LLMKV_CUDA_IMPLEMENTATION) && !defined(LLMKV_CUDA_IMPLEMENTATION_DONE)
#define LLMKV_CUDA_IMPLEMENTATION_DONE
#ifdef LLMKV_CUDA_DECLARATIONS_ONLY
#error "LLMKV_CUDA_IMPLEMENTATION needs the CUDA (or HIP) compiler, not LLMKV_CUDA_DECLARATIONS_ONLY"
#endif
#ifndef LLMKV_IMPLEMENTATION
#error "define LLMKV_IMPLEMENTATION in the file that defines LLMKV_CUDA_IMPLEMENTATION (the backend shares llmkv.h's internals)"
#endif

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Warp primitives. A logical warp is 32 lanes on every vendor: every
   shuffle names its width, so a 64-wide AMD wavefront runs two of them. */
#ifdef LLMKV_GPU_HIP
#define LLMKV__SHFL_XOR(v, m) __shfl_xor((v), (m), 32)
#define LLMKV__SHFL(v, src) __shfl((v), (src), 32)
#else
#define LLMKV__SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m), 32)
#define LLMKV__SHFL(v, src) __shfl_sync(0xffffffffu, (v), (src), 32)
#endif

/* Kernel launch: grid, block, stream, the one argument struct, then the
   kernel (last, so template arguments may hold commas). The CPU emulator
   of the tests (tests/gpu_emu.h) defines its own. */
#ifndef LLMKV__LAUNCH
#define LLMKV__LAUNCH(grid, block, stream, arg, ...) __VA_ARGS__<<<(grid), (block), 0, (stream)>>>(arg)
#endif

#define LLMKV__GPU_WARP 32          /* logical warp */
#define LLMKV__DEC_WARPS 4          /* warps per decode block */
#define LLMKV__DEC_MAX_GROUP 4      /* query heads one decode block serves */
#define LLMKV__STAGES 2             /* upload staging buffers */

/* ---------------------------------------------------------------------- */
/* Host side: state and error mapping                                       */
/* ---------------------------------------------------------------------- */

/* Geometry of one part (K or V) as the kernels see it. */
typedef struct llmkv__gpart {
    uint64_t offset, head_stride, slot_stride;
    uint64_t scale_offset, scale_head_stride, scale_slot_stride;
    int dtype;
} llmkv__gpart;

typedef struct llmkv__geom {
    uint64_t page_bytes, layer_stride;
    uint32_t page_size, head_dim, n_kv_heads, n_layers;
    llmkv__gpart part[2]; /* K, V */
} llmkv__geom;

/* Offsets (in bytes) of the uploaded tables inside one buffer. */
typedef struct llmkv__tables {
    uint64_t row_seq, positions, slot_mapping, seq_lens, kv_indptr, kv_indices, bytes;
} llmkv__tables;

struct llmkv_cuda {
    llmkv_cache* cache;
    llmkv_desc cdesc;
    llmkv_layout layout;
    llmkv__geom geom;
    llmkv_cuda_desc desc;
    int device, n_sm;
    unsigned char* pool;        /* device: the page pool */
    uint64_t pool_bytes;
    /* batch tables */
    llmkv__tables tab;
    uint32_t max_entries;       /* page-table entries per upload */
    unsigned char* dtab;        /* device tables */
    unsigned char* stage[LLMKV__STAGES]; /* pinned staging */
    cudaEvent_t stage_done[LLMKV__STAGES];
    uint32_t stage_next;
    const llmkv_batch* batch;   /* the uploaded batch (NULL: none) */
    uint64_t batch_build;       /* its build count when uploaded */
    uint32_t n_tokens, max_len; /* of the uploaded batch: rows, longest sequence */
    /* page copies */
    uint32_t max_copies;
    llmkv_copy_cmd* cmds;       /* host [max_copies] */
    llmkv_copy_cmd* cmd_stage;  /* pinned [max_copies] */
    llmkv_copy_cmd* dcmds;      /* device [max_copies] */
    cudaEvent_t cmd_done;
    /* split-K workspace */
    float* ws;
    uint64_t ws_floats;
};

static llmkv_result llmkv__gpu_err(cudaError_t e) {
    switch (e) {
    case cudaSuccess: return LLMKV_OK;
    case cudaErrorMemoryAllocation: return LLMKV_ERR_DEVICE_OUT_OF_MEMORY;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInvalidDevice: return LLMKV_ERR_NO_DEVICE;
    default: return LLMKV_ERR_DEVICE;
    }
}

/* The launch error, if any (clears it, so one failure is reported once). */
static llmkv_result llmkv__gpu_launched(void) { return llmkv__gpu_err(cudaGetLastError()); }

static uint64_t llmkv__gpu_align(uint64_t x) { return (x + 255u) & ~(uint64_t)255u; }

/* ---------------------------------------------------------------------- */
/* Device: element conversion (bit-exact with llmkv.h)                      */
/* ---------------------------------------------------------------------- */

static __device__ __forceinline__ float llmkv__d_f16(uint32_t h) {
    return __half2float(__ushort_as_half((unsigned short)h));
}
static __device__ __forceinline__ float llmkv__d_bf16(uint32_t h) { return __uint_as_float(h << 16); }

/* llmkv_f32_to_f16, bit for bit. */
static __device__ uint32_t llmkv__d_to_f16(float x) {
    uint32_t u = __float_as_uint(x), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u);
    if (a >= 0x477ff000u) return sign | 0x7c00u;
    if (a < 0x38800000u) {
        float f = __uint_as_float(a) + 0.5f;
        return sign | (__float_as_uint(f) - 0x3f000000u);
    }
    a += 0xc8000fffu + ((a >> 13) & 1u);
    return sign | (a >> 13);
}

/* llmkv_f16_to_f32, bit for bit (NaN payloads included). */
static __device__ float llmkv__d_from_f16(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) return __uint_as_float(sign | __float_as_uint((float)m * (1.0f / 16777216.0f)));
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

/* llmkv_f32_to_bf16, bit for bit. */
static __device__ uint32_t llmkv__d_to_bf16(float x) {
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) | 0x40u) & 0xffffu;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}

static __device__ __forceinline__ int llmkv__d_finite(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

/* llmkv__q_arg: (x - m) * inv, NaN as 0, clamped. */
static __device__ float llmkv__d_q_arg(float x, float m, float inv, float lo, float hi) {
    float y;
    if (x != x) x = 0.0f;
    y = (x - m) * inv;
    if (y != y) y = 0.0f;
    return y < lo ? lo : y > hi ? hi : y;
}

static __device__ uint32_t llmkv__d_e4m3(float y) {
    uint32_t u = __float_as_uint(y), sign = (u >> 24) & 0x80u, c;
    u &= 0x7fffffffu;
    if (u < 0x3c800000u) {
        c = (uint32_t)rintf(__uint_as_float(u) * 512.0f);
    } else {
        u += 0x7ffffu + ((u >> 20) & 1u);
        c = (u >> 20) - (120u << 3);
    }
    return sign | c;
}

static __device__ __forceinline__ float llmkv__d_e4m3_value(uint32_t c) {
    uint32_t m = c & 0x7fu;
    float v = m < 8 ? (float)m * (1.0f / 512.0f) : __uint_as_float((m << 20) + 0x3c000000u);
    return c & 0x80u ? -v : v;
}

/* Element e of a stored vector of any type (data at p, scales at sc), or
   of a caller row (F32, F16, BF16; sc unused), exactly as llmkv.h
   converts it, NaN payloads included. */
static __device__ float llmkv__d_elem(int t, const unsigned char* p, const unsigned char* sc, uint32_t e) {
    switch (t) {
    case LLMKV_DTYPE_F32: return __uint_as_float(*(const uint32_t*)(p + 4 * e));
    case LLMKV_DTYPE_F16: return llmkv__d_from_f16(*(const unsigned short*)(p + 2 * e));
    case LLMKV_DTYPE_BF16: return llmkv__d_bf16(*(const unsigned short*)(p + 2 * e));
    case LLMKV_DTYPE_Q8: {
        uint32_t g = e / 32u;
        return (float)(signed char)p[e] * llmkv__d_f16(*(const unsigned short*)(sc + 2 * g));
    }
    case LLMKV_DTYPE_Q4: {
        uint32_t g = e / 32u, c = (p[e / 2] >> (4 * (e % 2))) & 15u;
        return fmaf(llmkv__d_f16(*(const unsigned short*)(sc + 4 * g)), (float)c,
                    llmkv__d_f16(*(const unsigned short*)(sc + 4 * g + 2)));
    }
    default: return llmkv__d_e4m3_value(p[e]) * __uint_as_float(*(const uint32_t*)sc);
    }
}

static __device__ __forceinline__ float llmkv__warp_max(float x) {
    for (int o = 16; o > 0; o /= 2) x = fmaxf(x, LLMKV__SHFL_XOR(x, o));
    return x;
}
static __device__ __forceinline__ float llmkv__warp_min(float x) {
    for (int o = 16; o > 0; o /= 2) x = fminf(x, LLMKV__SHFL_XOR(x, o));
    return x;
}
static __device__ __forceinline__ int llmkv__warp_imin(int x) {
    for (int o = 16; o > 0; o /= 2) {
        int y = LLMKV__SHFL_XOR(x, o);
        x = y < x ? y : x;
    }
    return x;
}

/* ---------------------------------------------------------------------- */
/* Device: put (one logical warp per (row, head, part))                     */
/* ---------------------------------------------------------------------- */

typedef struct llmkv__put_args {
    unsigned char* pool;
    llmkv__geom g;
    uint32_t layer, n_rows;
    const int64_t* slot_mapping;
    const unsigned char* src[2];
    uint64_t src_stride[2];
    int src_dtype;
} llmkv__put_args;

/* Quantizes/stores one head vector x (element lane + 32 j held by lane in
   xs[j]) exactly as llmkv_quantize. */
static __device__ void llmkv__d_store_vec(int t, uint32_t n, const float* xs, unsigned char* data, unsigned char* sc,
                                          int lane) {
    uint32_t ng = (n + 31u) / 32u, j;
    if (t == LLMKV_DTYPE_F32 || t == LLMKV_DTYPE_F16 || t == LLMKV_DTYPE_BF16) {
        for (j = 0; j < ng; ++j) {
            uint32_t e = j * 32u + (uint32_t)lane;
            if (e >= n) continue;
            if (t == LLMKV_DTYPE_F32) ((uint32_t*)data)[e] = __float_as_uint(xs[j]);
            else ((unsigned short*)data)[e] = (unsigned short)(t == LLMKV_DTYPE_F16 ? llmkv__d_to_f16(xs[j])
                                                                                 : llmkv__d_to_bf16(xs[j]));
        }
        return;
    }
    if (t == LLMKV_DTYPE_FP8) {
        float a = 0.0f, s, inv;
        for (j = 0; j < ng; ++j) {
            uint32_t e = j * 32u + (uint32_t)lane;
            float x = e < n ? xs[j] : 0.0f;
            if (llmkv__d_finite(x)) a = fmaxf(a, fabsf(x));
        }
        a = llmkv__warp_max(a);
        s = a > 0.0f ? (a / 448.0f > FLT_MIN ? a / 448.0f : FLT_MIN) : 0.0f;
        inv = s > 0.0f ? 1.0f / s : 0.0f;
        if (lane == 0) *(uint32_t*)sc = __float_as_uint(s);
        for (j = 0; j < ng; ++j) {
            uint32_t e = j * 32u + (uint32_t)lane;
            if (e < n) data[e] = (unsigned char)llmkv__d_e4m3(llmkv__d_q_arg(xs[j], 0.0f, inv, -448.0f, 448.0f));
        }
        return;
    }
    for (j = 0; j < ng; ++j) {
        uint32_t e = j * 32u + (uint32_t)lane;
        int in = e < n;
        float x = in ? xs[j] : 0.0f;
        int fin = in && llmkv__d_finite(x);
        if (t == LLMKV_DTYPE_Q8) {
            float a = llmkv__warp_max(fin ? fabsf(x) : 0.0f), s, inv;
            uint32_t s16;
            a = a / 127.0f;
            s16 = llmkv__d_to_f16(a < 65504.0f ? a : 65504.0f);
            s = llmkv__d_from_f16(s16);
            inv = s > 0.0f ? 1.0f / s : 0.0f;
            if (lane == 0) *(unsigned short*)(sc + 2 * j) = (unsigned short)s16;
            if (in) data[e] = (unsigned char)(signed char)(int)rintf(llmkv__d_q_arg(x, 0.0f, inv, -127.0f, 127.0f));
        } else { /* Q4 */
            float lo = llmkv__warp_min(fin ? x : INFINITY), hi = llmkv__warp_max(fin ? x : -INFINITY), m, s, inv;
            uint32_t m16, s16, c, c_next;
            int first_zero = llmkv__warp_imin(fin && x == 0.0f ? lane : 32);
            float zero_src = LLMKV__SHFL(x, first_zero < 32 ? first_zero : 0);
            if (!(lo <= hi)) lo = hi = 0.0f;                      /* no finite element */
            else if (lo == 0.0f) lo = zero_src;                   /* the first zero met, as the scalar scan */
            lo = lo < -65504.0f ? -65504.0f : lo > 65504.0f ? 65504.0f : lo;
            m16 = llmkv__d_to_f16(lo);
            m = llmkv__d_from_f16(m16);
            s = (hi - m) / 15.0f;
            /* <= : hi came from fmaxf, whose choice between +0 and -0 is not
               ordered; the scalar scan never yields -0 here. */
            s = s <= 0.0f ? 0.0f : s > 65504.0f ? 65504.0f : s;
            s16 = llmkv__d_to_f16(s);
            s = llmkv__d_from_f16(s16);
            inv = s > 0.0f ? 1.0f / s : 0.0f;
            if (lane == 0) {
                *(unsigned short*)(sc + 4 * j) = (unsigned short)s16;
                *(unsigned short*)(sc + 4 * j + 2) = (unsigned short)m16;
            }
            c = in ? (uint32_t)rintf(llmkv__d_q_arg(x, m, inv, 0.0f, 15.0f)) : 0u;
            c_next = (uint32_t)LLMKV__SHFL_XOR((int)c, 1);
            if (in && lane % 2 == 0) data[e / 2] = (unsigned char)(c | c_next << 4);
        }
    }
}

#define LLMKV__PUT_MAX_GROUPS 16 /* head_dim <= 512 */

static __global__ void llmkv__put_kernel(llmkv__put_args a) {
    uint32_t row = blockIdx.x, head = blockIdx.y, part = blockIdx.z, n = a.g.head_dim, j;
    int lane = (int)(threadIdx.x % 32u);
    float xs[LLMKV__PUT_MAX_GROUPS];
    const unsigned char* src = a.src[part];
    int64_t slot = a.slot_mapping[row];
    if (!src || slot < 0) return;
    {
        const llmkv__gpart* pt = &a.g.part[part];
        uint64_t page = (uint64_t)slot / a.g.page_size, s = (uint64_t)slot % a.g.page_size;
        unsigned char* layer = a.pool + page * a.g.page_bytes + a.layer * a.g.layer_stride;
        unsigned char* data = layer + pt->offset + head * pt->head_stride + s * pt->slot_stride;
        unsigned char* sc = layer + pt->scale_offset + head * pt->scale_head_stride + s * pt->scale_slot_stride;
        uint32_t es = a.src_dtype == LLMKV_DTYPE_F32 ? 4u : 2u;
        src += row * a.src_stride[part] + (uint64_t)head * n * es;
        if (pt->dtype == a.src_dtype) { /* same type: the bits as they are (as llmkv_put) */
            for (j = (uint32_t)lane; j < n; j += 32u) {
                if (es == 4) ((uint32_t*)data)[j] = ((const uint32_t*)src)[j];
                else ((unsigned short*)data)[j] = ((const unsigned short*)src)[j];
            }
            return;
        }
#pragma unroll
        for (j = 0; j < LLMKV__PUT_MAX_GROUPS; ++j) {
            uint32_t e = j * 32u + (uint32_t)lane;
            xs[j] = e < n ? llmkv__d_elem(a.src_dtype, src, NULL, e) : 0.0f;
        }
        llmkv__d_store_vec(pt->dtype, n, xs, data, sc, lane);
    }
}

/* ---------------------------------------------------------------------- */
/* Device: gather                                                           */
/* ---------------------------------------------------------------------- */

typedef struct llmkv__gather_args {
    const unsigned char* pool;
    llmkv__geom g;
    uint32_t layer, pos;
    const int32_t* pages;        /* the sequence's page table (device) */
    unsigned char* dst[2];
    uint64_t dst_stride[2];
    int dst_dtype[2];            /* per part: F32, F16 or BF16 (DEFAULT resolved) */
} llmkv__gather_args;

static __global__ void llmkv__gather_kernel(llmkv__gather_args a) {
    uint32_t t = blockIdx.x, head = blockIdx.y, part = blockIdx.z, n = a.g.head_dim, e;
    unsigned char* dst = a.dst[part];
    if (!dst) return;
    {
        const llmkv__gpart* pt = &a.g.part[part];
        uint32_t p = a.pos + t;
        uint64_t page = (uint64_t)a.pages[p / a.g.page_size], s = p % a.g.page_size;
        const unsigned char* layer = a.pool + page * a.g.page_bytes + a.layer * a.g.layer_stride;
        const unsigned char* data = layer + pt->offset + head * pt->head_stride + s * pt->slot_stride;
        const unsigned char* sc = layer + pt->scale_offset + head * pt->scale_head_stride + s * pt->scale_slot_stride;
        int out_t = a.dst_dtype[part];
        {
            uint32_t es = out_t == LLMKV_DTYPE_F32 ? 4u : 2u;
            dst += t * a.dst_stride[part] + (uint64_t)head * n * es;
            for (e = threadIdx.x; e < n; e += blockDim.x) {
                if (out_t == pt->dtype) { /* same type: raw bytes */
                    if (es == 4) ((uint32_t*)dst)[e] = ((const uint32_t*)data)[e];
                    else ((unsigned short*)dst)[e] = ((const unsigned short*)data)[e];
                    continue;
                }
                {
                    float x = llmkv__d_elem(pt->dtype, data, sc, e);
                    if (out_t == LLMKV_DTYPE_F32) ((uint32_t*)dst)[e] = __float_as_uint(x);
                    else if (out_t == LLMKV_DTYPE_F16) ((unsigned short*)dst)[e] = (unsigned short)llmkv__d_to_f16(x);
                    else ((unsigned short*)dst)[e] = (unsigned short)llmkv__d_to_bf16(x);
                }
            }
        }
    }
}

/* ---------------------------------------------------------------------- */
/* Device: page copies                                                      */
/* ---------------------------------------------------------------------- */

typedef struct llmkv__copy_args {
    unsigned char* pool;
    llmkv__geom g;
    const llmkv_copy_cmd* cmds; /* this wave */
} llmkv__copy_args;

/* Copies bytes [0, n) from s to d with the widest accesses both allow;
   threads of the block stride over it. */
static __device__ void llmkv__d_copy(unsigned char* d, const unsigned char* s, uint64_t n) {
    uint64_t i;
    if (((uintptr_t)d | (uintptr_t)s | n) % 16u == 0) {
        for (i = threadIdx.x + (uint64_t)blockIdx.x * blockDim.x; i < n / 16u; i += (uint64_t)blockDim.x * gridDim.x)
            ((uint4*)d)[i] = ((const uint4*)s)[i];
    } else {
        for (i = threadIdx.x + (uint64_t)blockIdx.x * blockDim.x; i < n; i += (uint64_t)blockDim.x * gridDim.x)
            d[i] = s[i];
    }
}

/* blockIdx.y: the command; blockIdx.x strides over its bytes. A whole page
   is one span; a partial one is, per layer, part and head, its first
   n_slots vectors and their scales. */
static __global__ void llmkv__copy_kernel(llmkv__copy_args a) {
    llmkv_copy_cmd c = a.cmds[blockIdx.y];
    unsigned char* dp = a.pool + (uint64_t)c.dst_page * a.g.page_bytes;
    const unsigned char* sp = a.pool + (uint64_t)c.src_page * a.g.page_bytes;
    uint32_t l, p, h;
    if (c.n_slots >= a.g.page_size) {
        llmkv__d_copy(dp, sp, a.g.page_bytes);
        return;
    }
    for (l = 0; l < a.g.n_layers; ++l)
        for (p = 0; p < 2; ++p)
            for (h = 0; h < a.g.n_kv_heads; ++h) {
                const llmkv__gpart* pt = &a.g.part[p];
                uint64_t o = l * a.g.layer_stride + pt->offset + h * pt->head_stride;
                llmkv__d_copy(dp + o, sp + o, c.n_slots * pt->slot_stride);
                if (pt->scale_slot_stride) {
                    o = l * a.g.layer_stride + pt->scale_offset + h * pt->scale_head_stride;
                    llmkv__d_copy(dp + o, sp + o, c.n_slots * pt->scale_slot_stride);
                }
            }
}

/* ---------------------------------------------------------------------- */
/* Device: paged decode attention                                           */
/* ---------------------------------------------------------------------- */

typedef struct llmkv__dec_args {
    const unsigned char* pool;
    llmkv__geom g;
    uint32_t layer, n_q_heads, group, n_splits;
    const int32_t *row_seq, *positions, *seq_lens, *kv_indptr, *kv_indices;
    const float* q;
    uint64_t q_stride;           /* floats */
    float* out;
    uint64_t out_stride;         /* floats */
    float* lse;
    float scale, softcap;
    uint32_t window;
    int non_causal;
    float* ws_o;                 /* split > 1: [rows][n_q_heads][n_splits][D] */
    float* ws_lse;               /*            [rows][n_q_heads][n_splits] */
} llmkv__dec_args;

/* Lanes that share one key (a power of two dividing 32) for a head_dim:
   8 elements per lane where the dimension allows (one 16-byte load of
   F16/BF16), so a dot product needs log2(lanes) shuffles and a warp
   takes 32 / lanes keys at once. */
template <int D> struct llmkv__dec_shape {
    static const int lanes = D == 64 ? 8 : D == 256 ? 32 : 16;
    static const int epl = D / lanes;         /* elements per lane: 8, or 5 (80), 6 (96) */
};

/* Loads a lane's EPL elements of a float-typed vector (T: F32, F16, BF16)
   with the widest aligned accesses, converting to F32. T 0: any type,
   element by element (quantized types and mixed K/V types). */
template <int T, int EPL> struct llmkv__lane_vec {
    static __device__ __forceinline__ void load(const unsigned char* vec, const unsigned char* sc, int t_rt,
                                                uint32_t e0, float* x) {
        const int es = T == LLMKV_DTYPE_F32 ? 4 : 2;
        const int bytes = EPL * es;
        const int w = bytes % 16 == 0 ? 16 : bytes % 8 == 0 ? 8 : bytes % 4 == 0 ? 4 : 2;
        uint32_t raw[(EPL * es + 3) / 4];
        const unsigned char* p = vec + e0 * es;
        int i;
        (void)sc;
        (void)t_rt;
        if (w == 16) {
#pragma unroll
            for (i = 0; i < bytes / 16; ++i) {
                uint4 v = ((const uint4*)p)[i];
                raw[4 * i] = v.x; raw[4 * i + 1] = v.y; raw[4 * i + 2] = v.z; raw[4 * i + 3] = v.w;
            }
        } else if (w == 8) {
#pragma unroll
            for (i = 0; i < bytes / 8; ++i) {
                uint2 v = ((const uint2*)p)[i];
                raw[2 * i] = v.x; raw[2 * i + 1] = v.y;
            }
        } else if (w == 4) {
#pragma unroll
            for (i = 0; i < bytes / 4; ++i) raw[i] = ((const uint32_t*)p)[i];
        } else {
#pragma unroll
            for (i = 0; i < (bytes + 3) / 4; ++i) {
                uint32_t lo = ((const unsigned short*)p)[2 * i];
                uint32_t hi = 2 * i + 1 < bytes / 2 ? ((const unsigned short*)p)[2 * i + 1] : 0u;
                raw[i] = lo | hi << 16;
            }
        }
#pragma unroll
        for (i = 0; i < EPL; ++i) {
            if (T == LLMKV_DTYPE_F32) x[i] = __uint_as_float(raw[i]);
            else {
                uint32_t h = (raw[i / 2] >> (16 * (i % 2))) & 0xffffu;
                x[i] = T == LLMKV_DTYPE_F16 ? llmkv__d_f16(h) : llmkv__d_bf16(h);
            }
        }
    }
};
template <int EPL> struct llmkv__lane_vec<0, EPL> {
    static __device__ __forceinline__ void load(const unsigned char* vec, const unsigned char* sc, int t_rt,
                                                uint32_t e0, float* x) {
#pragma unroll
        for (int i = 0; i < EPL; ++i) x[i] = llmkv__d_elem(t_rt, vec, sc, e0 + (uint32_t)i);
    }
};

/* Keys a decode row sees: [lo, hi). */
static __device__ __forceinline__ void llmkv__d_row_keys(const llmkv__dec_args& a, uint32_t L, uint32_t pos,
                                                         uint32_t* lo, uint32_t* hi) {
    if (a.non_causal) { *lo = 0; *hi = L; return; }
    *hi = pos + 1 < L ? pos + 1 : L;
    *lo = a.window && pos + 1 > a.window ? pos + 1 - a.window : 0;
}

/* One block: query row blockIdx.x, query heads [GB * blockIdx.y, +GB) (one
   KV head), split blockIdx.z. Each warp walks keys; within it, groups of
   `lanes` lanes each take one key, every lane holding EPL elements of it,
   two keys per group per step so loads overlap. Online softmax per lane
   group, merged across groups and warps at the end. */
template <int D, int KT, int VT, int GB>
__global__ void __launch_bounds__(LLMKV__DEC_WARPS * 32) llmkv__decode_kernel(llmkv__dec_args a) {
    const int LANES = llmkv__dec_shape<D>::lanes, EPL = llmkv__dec_shape<D>::epl, KPW = 32 / LANES, U = 2;
    const int NW = LLMKV__DEC_WARPS;
    __shared__ float sm_acc[NW][GB][D];
    __shared__ float sm_m[NW][GB], sm_l[NW][GB];
    const uint32_t row = blockIdx.x, h0 = blockIdx.y * GB, split = blockIdx.z;
    const int warp = (int)(threadIdx.x / 32u), lane = (int)(threadIdx.x % 32u), kg = lane / LANES, li = lane % LANES;
    const uint32_t kvh = h0 / a.group, seq = (uint32_t)a.row_seq[row], L = (uint32_t)a.seq_lens[seq];
    const uint32_t e0 = (uint32_t)(li * EPL);
    uint32_t lo, hi, k0, k1, chunk;
    float q[GB][EPL], acc[GB][EPL], m[GB], l[GB];
    /* Scores live in base 2 (exp2f is a few instructions cheaper than expf
       per key and head): q carries scale * log2(e), or scale alone when
       the soft-cap, defined on natural logits, is applied first. */
    const float qscale = a.softcap > 0.0f ? a.scale : a.scale * 1.4426950408889634f;
    int g, i;
    llmkv__d_row_keys(a, L, (uint32_t)a.positions[row], &lo, &hi);
    if (hi < lo) hi = lo;
    chunk = (hi - lo + a.n_splits - 1) / a.n_splits;
    k0 = lo + split * chunk;
    k1 = k0 + chunk < hi ? k0 + chunk : hi;
    if (k0 > k1) k0 = k1;

#pragma unroll
    for (g = 0; g < GB; ++g) {
        const float* qp = a.q + row * a.q_stride + (uint64_t)(h0 + g) * D + e0;
#pragma unroll
        for (i = 0; i < EPL; ++i) {
            q[g][i] = qp[i] * qscale;
            acc[g][i] = 0.0f;
        }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    {
        const int32_t* pages = a.kv_indices + a.kv_indptr[seq];
        const llmkv__gpart &kp = a.g.part[0], &vp = a.g.part[1];
        const unsigned char* lay = a.pool + (uint64_t)a.layer * a.g.layer_stride;
        const unsigned char* kbase = lay + kp.offset + kvh * kp.head_stride;
        const unsigned char* vbase = lay + vp.offset + kvh * vp.head_stride;
        const unsigned char* ksbase = lay + kp.scale_offset + kvh * kp.scale_head_stride;
        const unsigned char* vsbase = lay + vp.scale_offset + kvh * vp.scale_head_stride;
        const uint32_t ps = a.g.page_size, step = (uint32_t)(NW * KPW * U);
        uint32_t tb;
        for (tb = k0 + (uint32_t)(warp * KPW * U); tb < k1; tb += step) {
            float kx[U][EPL], vx[U][EPL];
            int valid[U], u;
#pragma unroll
            for (u = 0; u < U; ++u) {
                uint32_t t = tb + (uint32_t)(u * KPW + kg);
                valid[u] = t < k1;
                if (valid[u]) {
                    uint64_t page = (uint64_t)pages[t / ps], s = t % ps, pofs = page * a.g.page_bytes;
                    llmkv__lane_vec<KT, EPL>::load(kbase + pofs + s * kp.slot_stride,
                                                   ksbase + pofs + s * kp.scale_slot_stride, kp.dtype, e0, kx[u]);
                    llmkv__lane_vec<VT, EPL>::load(vbase + pofs + s * vp.slot_stride,
                                                   vsbase + pofs + s * vp.scale_slot_stride, vp.dtype, e0, vx[u]);
                } else {
#pragma unroll
                    for (i = 0; i < EPL; ++i) kx[u][i] = vx[u][i] = 0.0f;
                }
            }
#pragma unroll
            for (u = 0; u < U; ++u) {
#pragma unroll
                for (g = 0; g < GB; ++g) {
                    float s = 0.0f, mn, c, p;
                    int o;
#pragma unroll
                    for (i = 0; i < EPL; ++i) s = fmaf(q[g][i], kx[u][i], s);
#pragma unroll
                    for (o = LANES / 2; o > 0; o /= 2) s += LLMKV__SHFL_XOR(s, o);
                    if (!valid[u]) continue;
                    if (a.softcap > 0.0f) s = a.softcap * tanhf(s / a.softcap) * 1.4426950408889634f;
                    mn = fmaxf(m[g], s);
                    c = exp2f(m[g] - mn); /* m = -inf: 0 */
                    p = exp2f(s - mn);
                    l[g] = l[g] * c + p;
#pragma unroll
                    for (i = 0; i < EPL; ++i) acc[g][i] = fmaf(p, vx[u][i], acc[g][i] * c);
                    m[g] = mn;
                }
            }
        }
    }
    /* Merge the key groups of a warp (lanes li, li + LANES, ...). */
#pragma unroll
    for (g = 0; g < GB; ++g) {
        int o;
#pragma unroll
        for (o = LANES; o < 32; o *= 2) {
            float m2 = LLMKV__SHFL_XOR(m[g], o), l2 = LLMKV__SHFL_XOR(l[g], o), mn = fmaxf(m[g], m2);
            float c1 = mn == -INFINITY ? 0.0f : exp2f(m[g] - mn), c2 = mn == -INFINITY ? 0.0f : exp2f(m2 - mn);
            l[g] = l[g] * c1 + l2 * c2;
#pragma unroll
            for (i = 0; i < EPL; ++i) {
                float a2 = LLMKV__SHFL_XOR(acc[g][i], o);
                acc[g][i] = acc[g][i] * c1 + a2 * c2;
            }
            m[g] = mn;
        }
        if (kg == 0) {
#pragma unroll
            for (i = 0; i < EPL; ++i) sm_acc[warp][g][e0 + i] = acc[g][i];
            if (li == 0) {
                sm_m[warp][g] = m[g];
                sm_l[warp][g] = l[g];
            }
        }
    }
    __syncthreads();
    /* Merge the warps; write the row (one split) or a partial result. */
    for (uint32_t idx = threadIdx.x; idx < (uint32_t)(GB * D); idx += blockDim.x) {
        uint32_t gg = idx / D, e = idx % D, h = h0 + gg;
        float M = -INFINITY, sum = 0.0f, o = 0.0f, lse;
        int w;
        for (w = 0; w < NW; ++w) M = fmaxf(M, sm_m[w][gg]);
        if (M != -INFINITY)
            for (w = 0; w < NW; ++w) {
                float c = exp2f(sm_m[w][gg] - M);
                sum += sm_l[w][gg] * c;
                o += sm_acc[w][gg][e] * c;
            }
        o = sum > 0.0f ? o / sum : 0.0f;
        lse = sum > 0.0f ? (M + log2f(sum)) * 0.6931471805599453f : -INFINITY; /* natural */
        if (a.n_splits == 1) {
            a.out[row * a.out_stride + (uint64_t)h * D + e] = o;
            if (a.lse && e == 0) a.lse[(uint64_t)row * a.n_q_heads + h] = lse;
        } else {
            uint64_t pr = ((uint64_t)row * a.n_q_heads + h) * a.n_splits + split;
            a.ws_o[pr * D + e] = o;
            if (e == 0) a.ws_lse[pr] = lse;
        }
    }
}

/* Merges the n_splits partial results of each (row, head) by log-sum-exp. */
static __global__ void llmkv__merge_kernel(llmkv__dec_args a) {
    uint32_t D = a.g.head_dim, rh = blockIdx.x, row = rh / a.n_q_heads, h = rh % a.n_q_heads, s, e;
    const float* lse_s = a.ws_lse + (uint64_t)rh * a.n_splits;
    float M = -INFINITY, sum = 0.0f;
    for (s = 0; s < a.n_splits; ++s) M = fmaxf(M, lse_s[s]);
    if (M != -INFINITY)
        for (s = 0; s < a.n_splits; ++s) sum += expf(lse_s[s] - M);
    for (e = threadIdx.x; e < D; e += blockDim.x) {
        float o = 0.0f;
        if (sum > 0.0f) {
            for (s = 0; s < a.n_splits; ++s)
                if (lse_s[s] != -INFINITY) o += expf(lse_s[s] - M) * a.ws_o[((uint64_t)rh * a.n_splits + s) * D + e];
            o /= sum;
        }
        a.out[row * a.out_stride + (uint64_t)h * D + e] = o;
    }
    if (a.lse && threadIdx.x == 0) a.lse[(uint64_t)row * a.n_q_heads + h] = sum > 0.0f ? M + logf(sum) : -INFINITY;
}

/* ---------------------------------------------------------------------- */
/* Host: creation                                                           */
/* ---------------------------------------------------------------------- */

LLMKV_API int llmkv_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

static void llmkv__gpart_from(const llmkv_part_layout* p, llmkv__gpart* g) {
    g->offset = p->offset;
    g->head_stride = p->head_stride;
    g->slot_stride = p->slot_stride;
    g->scale_offset = p->scale_offset;
    g->scale_head_stride = p->scale_head_stride;
    g->scale_slot_stride = p->scale_slot_stride;
    g->dtype = (int)p->dtype;
}

LLMKV_API void llmkv_cuda_destroy(llmkv_cuda* gpu) {
    int i, prev = 0;
    if (!gpu) return;
    (void)cudaGetDevice(&prev);
    (void)cudaSetDevice(gpu->device);
    (void)cudaDeviceSynchronize();
    if (gpu->pool) (void)cudaFree(gpu->pool);
    if (gpu->dtab) (void)cudaFree(gpu->dtab);
    if (gpu->dcmds) (void)cudaFree(gpu->dcmds);
    if (gpu->ws) (void)cudaFree(gpu->ws);
    if (gpu->cmd_stage) (void)cudaFreeHost(gpu->cmd_stage);
    if (gpu->cmd_done) (void)cudaEventDestroy(gpu->cmd_done);
    for (i = 0; i < LLMKV__STAGES; ++i) {
        if (gpu->stage[i]) (void)cudaFreeHost(gpu->stage[i]);
        if (gpu->stage_done[i]) (void)cudaEventDestroy(gpu->stage_done[i]);
    }
    free(gpu->cmds);
    (void)cudaGetLastError();
    (void)cudaSetDevice(prev);
    free(gpu);
}

LLMKV_API llmkv_result llmkv_cuda_create(llmkv_cache* cache, const llmkv_cuda_desc* desc, llmkv_cuda** out) {
    llmkv_cuda* gpu;
    llmkv_cuda_desc d;
    llmkv_result r;
    void* base = NULL;
    uint64_t pool_bytes = 0, o;
    int n_dev = 0, prev = 0, i;
    uint32_t max_pages_per_seq;
    if (!out) return LLMKV_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!cache) return LLMKV_ERR_INVALID_ARGUMENT;
    if (llmkv_cache_pool(cache, &base, &pool_bytes) != LLMKV_OK || base != NULL) return LLMKV_ERR_INVALID_ARGUMENT;
    memset(&d, 0, sizeof d);
    if (desc) d = *desc;
    gpu = (llmkv_cuda*)calloc(1, sizeof *gpu);
    if (!gpu) return LLMKV_ERR_OUT_OF_MEMORY;
    gpu->cache = cache;
    (void)llmkv_cache_desc(cache, &gpu->cdesc);
    (void)llmkv_cache_layout(cache, &gpu->layout);
    if (d.max_seqs == 0) d.max_seqs = gpu->cdesc.max_seqs;
    if (d.max_tokens == 0) d.max_tokens = 4096;
    if (d.max_splits == 0) d.max_splits = 64;
    if (d.split_workspace_bytes == 0) d.split_workspace_bytes = (uint64_t)64 << 20;
    if (d.device < 0 || d.max_splits > 1024 || d.fixed_splits > d.max_splits || d.max_tokens > (1u << 24) ||
        d.max_seqs > (1u << 24)) {
        free(gpu);
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    gpu->desc = d;
    gpu->device = d.device;
    {
        llmkv__geom* g = &gpu->geom;
        g->page_bytes = gpu->layout.page_bytes;
        g->layer_stride = gpu->layout.layer_stride;
        g->page_size = gpu->layout.page_size;
        g->head_dim = gpu->layout.head_dim;
        g->n_kv_heads = gpu->layout.n_kv_heads;
        g->n_layers = gpu->layout.n_layers;
        llmkv__gpart_from(&gpu->layout.k, &g->part[0]);
        llmkv__gpart_from(&gpu->layout.v, &g->part[1]);
    }
    gpu->pool_bytes = pool_bytes;
    max_pages_per_seq = (gpu->cdesc.max_seq_len + gpu->layout.page_size - 1) / gpu->layout.page_size;
    gpu->max_entries = (uint32_t)((uint64_t)d.max_seqs * max_pages_per_seq < (1u << 30)
                                      ? (uint64_t)d.max_seqs * max_pages_per_seq : (1u << 30));
    o = 0;
    gpu->tab.row_seq = o;      o = llmkv__gpu_align(o + 4ull * d.max_tokens);
    gpu->tab.positions = o;    o = llmkv__gpu_align(o + 4ull * d.max_tokens);
    gpu->tab.slot_mapping = o; o = llmkv__gpu_align(o + 8ull * d.max_tokens);
    gpu->tab.seq_lens = o;     o = llmkv__gpu_align(o + 4ull * d.max_seqs);
    gpu->tab.kv_indptr = o;    o = llmkv__gpu_align(o + 4ull * (d.max_seqs + 1));
    gpu->tab.kv_indices = o;   o = llmkv__gpu_align(o + 4ull * gpu->max_entries);
    gpu->tab.bytes = o;
    gpu->max_copies = gpu->cdesc.max_pending_copies ? gpu->cdesc.max_pending_copies : 1;

    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev <= 0) {
        (void)cudaGetLastError();
        free(gpu);
        return LLMKV_ERR_NO_DEVICE;
    }
    if (d.device >= n_dev) {
        free(gpu);
        return LLMKV_ERR_NO_DEVICE;
    }
    (void)cudaGetDevice(&prev);
    r = llmkv__gpu_err(cudaSetDevice(d.device));
    if (r == LLMKV_OK) r = llmkv__gpu_err(cudaDeviceGetAttribute(&gpu->n_sm, cudaDevAttrMultiProcessorCount, d.device));
    gpu->cmds = (llmkv_copy_cmd*)calloc(gpu->max_copies, sizeof(llmkv_copy_cmd));
    if (r == LLMKV_OK && !gpu->cmds) r = LLMKV_ERR_OUT_OF_MEMORY;
    if (r == LLMKV_OK) r = llmkv__gpu_err(cudaMalloc((void**)&gpu->pool, pool_bytes));
    if (r == LLMKV_OK) r = llmkv__gpu_err(cudaMemset(gpu->pool, 0, pool_bytes));
    if (r == LLMKV_OK) r = llmkv__gpu_err(cudaMalloc((void**)&gpu->dtab, gpu->tab.bytes));
    if (r == LLMKV_OK)
        r = llmkv__gpu_err(cudaMalloc((void**)&gpu->dcmds, (size_t)gpu->max_copies * sizeof(llmkv_copy_cmd)));
    if (r == LLMKV_OK)
        r = llmkv__gpu_err(cudaMallocHost((void**)&gpu->cmd_stage, (size_t)gpu->max_copies * sizeof(llmkv_copy_cmd)));
    if (r == LLMKV_OK) r = llmkv__gpu_err(cudaEventCreateWithFlags(&gpu->cmd_done, cudaEventDisableTiming));
    for (i = 0; i < LLMKV__STAGES && r == LLMKV_OK; ++i) {
        r = llmkv__gpu_err(cudaMallocHost((void**)&gpu->stage[i], gpu->tab.bytes));
        if (r == LLMKV_OK) r = llmkv__gpu_err(cudaEventCreateWithFlags(&gpu->stage_done[i], cudaEventDisableTiming));
    }
    if (r == LLMKV_OK) {
        gpu->ws_floats = d.split_workspace_bytes / 4;
        r = llmkv__gpu_err(cudaMalloc((void**)&gpu->ws, gpu->ws_floats * 4));
    }
    if (r == LLMKV_OK) r = llmkv__gpu_err(cudaDeviceSynchronize());
    if (r != LLMKV_OK) {
        llmkv_cuda_destroy(gpu);
        (void)cudaGetLastError();
        (void)cudaSetDevice(prev);
        return r;
    }
    (void)cudaSetDevice(prev);
    *out = gpu;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_cuda_pool(const llmkv_cuda* gpu, void** base, uint64_t* bytes) {
    if (base) *base = NULL;
    if (bytes) *bytes = 0;
    if (!gpu || !base || !bytes) return LLMKV_ERR_INVALID_ARGUMENT;
    *base = gpu->pool;
    *bytes = gpu->pool_bytes;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_cuda_host_alloc(size_t bytes, void** out) {
    llmkv_result r;
    if (!out) return LLMKV_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (bytes == 0) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv__gpu_err(cudaMallocHost(out, bytes));
    if (r != LLMKV_OK) {
        (void)cudaGetLastError();
        *out = NULL;
    }
    return r;
}

LLMKV_API void llmkv_cuda_host_free(void* host) {
    if (host) (void)cudaFreeHost(host);
}

/* ---------------------------------------------------------------------- */
/* Host: page copies and batch upload                                       */
/* ---------------------------------------------------------------------- */

/* Switches to the context's device for the duration of a call. */
typedef struct llmkv__dev_scope { int prev, changed; } llmkv__dev_scope;
static void llmkv__dev_enter(const llmkv_cuda* gpu, llmkv__dev_scope* s) {
    s->prev = gpu->device;
    s->changed = 0;
    if (cudaGetDevice(&s->prev) == cudaSuccess && s->prev != gpu->device)
        s->changed = cudaSetDevice(gpu->device) == cudaSuccess;
}
static llmkv_result llmkv__dev_leave(const llmkv__dev_scope* s, llmkv_result r) {
    if (s->changed) (void)cudaSetDevice(s->prev);
    return r;
}

LLMKV_API llmkv_result llmkv_cuda_run_copies(llmkv_cuda* gpu, llmkv_gpu_stream stream, uint32_t* n_done) {
    uint32_t n = 0, w0, w1, j;
    llmkv_result r;
    llmkv__dev_scope sc;
    if (n_done) *n_done = 0;
    if (!gpu) return LLMKV_ERR_INVALID_ARGUMENT;
    llmkv__dev_enter(gpu, &sc);
    /* The staging of the previous drain may still be in flight. */
    r = llmkv__gpu_err(cudaEventSynchronize(gpu->cmd_done));
    if (r == LLMKV_OK) r = llmkv_copy_cmds_take(gpu->cache, gpu->cmds, gpu->max_copies, &n);
    if (r != LLMKV_OK || n == 0) return llmkv__dev_leave(&sc, r);
    /* From here the commands are ours: a failure is a device error. */
    memcpy(gpu->cmd_stage, gpu->cmds, (size_t)n * sizeof(llmkv_copy_cmd));
    r = llmkv__gpu_err(cudaMemcpyAsync(gpu->dcmds, gpu->cmd_stage, (size_t)n * sizeof(llmkv_copy_cmd),
                                       cudaMemcpyHostToDevice, stream));
    if (r == LLMKV_OK) r = llmkv__gpu_err(cudaEventRecord(gpu->cmd_done, stream));
    /* Waves of commands that touch disjoint pages run in one launch. */
    for (w0 = 0; w0 < n && r == LLMKV_OK; w0 = w1) {
        llmkv__copy_args a;
        for (w1 = w0 + 1; w1 < n && w1 - w0 < 256u; ++w1) { /* bounded: the check is quadratic */
            int clash = 0;
            for (j = w0; j < w1 && !clash; ++j)
                clash = gpu->cmds[w1].src_page == gpu->cmds[j].dst_page ||
                        gpu->cmds[w1].dst_page == gpu->cmds[j].dst_page ||
                        gpu->cmds[w1].dst_page == gpu->cmds[j].src_page;
            if (clash) break;
        }
        a.pool = gpu->pool;
        a.g = gpu->geom;
        a.cmds = gpu->dcmds + w0;
        {
            dim3 grid((unsigned)(gpu->n_sm > 0 ? gpu->n_sm : 16), w1 - w0);
            LLMKV__LAUNCH(grid, 256, stream, a, llmkv__copy_kernel);
        }
        r = llmkv__gpu_launched();
    }
    if (r == LLMKV_OK && n_done) *n_done = n;
    return llmkv__dev_leave(&sc, r);
}

LLMKV_API llmkv_result llmkv_cuda_upload(llmkv_cuda* gpu, const llmkv_batch* batch, llmkv_gpu_stream stream) {
    llmkv_batch_info info;
    llmkv_result r;
    uint32_t i, entries, max_len = 0, b;
    unsigned char* st;
    llmkv__dev_scope sc;
    if (!gpu || !batch) return LLMKV_ERR_INVALID_ARGUMENT;
    if (llmkv_batch_cache(batch) != gpu->cache) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv_batch_get(batch, &info);
    if (r != LLMKV_OK) return r;
    if (info.page_size != gpu->layout.page_size) return LLMKV_ERR_INVALID_ARGUMENT;
    entries = info.n_seqs ? (uint32_t)info.kv_indptr[info.n_seqs] : 0;
    if (info.n_seqs > gpu->desc.max_seqs || info.n_tokens > gpu->desc.max_tokens || entries > gpu->max_entries)
        return LLMKV_ERR_BATCH_FULL;
    /* Its pages lie in the pool (a batch is its cache's; this guards the
       kernels' addressing regardless). */
    for (i = 0; i < entries; ++i)
        if (info.kv_indices[i] < 0 || (uint64_t)info.kv_indices[i] * gpu->layout.page_bytes >= gpu->pool_bytes)
            return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv_cuda_run_copies(gpu, stream, NULL);
    if (r != LLMKV_OK) return r;
    llmkv__dev_enter(gpu, &sc);
    b = gpu->stage_next;
    r = llmkv__gpu_err(cudaEventSynchronize(gpu->stage_done[b]));
    if (r != LLMKV_OK) return llmkv__dev_leave(&sc, r);
    st = gpu->stage[b];
    for (i = 0; i < info.n_seqs; ++i) {
        int32_t q0 = info.qo_indptr[i], q1 = info.qo_indptr[i + 1], t;
        for (t = q0; t < q1; ++t) ((int32_t*)(st + gpu->tab.row_seq))[t] = (int32_t)i;
        if ((uint32_t)info.seq_lens[i] > max_len) max_len = (uint32_t)info.seq_lens[i];
    }
    if (info.n_tokens) {
        memcpy(st + gpu->tab.positions, info.positions, 4ull * info.n_tokens);
        memcpy(st + gpu->tab.slot_mapping, info.slot_mapping, 8ull * info.n_tokens);
    }
    if (info.n_seqs) {
        memcpy(st + gpu->tab.seq_lens, info.seq_lens, 4ull * info.n_seqs);
        memcpy(st + gpu->tab.kv_indptr, info.kv_indptr, 4ull * (info.n_seqs + 1));
    }
    if (entries) memcpy(st + gpu->tab.kv_indices, info.kv_indices, 4ull * entries);
    r = llmkv__gpu_err(cudaMemcpyAsync(gpu->dtab, st, gpu->tab.kv_indices + 4ull * entries, cudaMemcpyHostToDevice,
                                       stream));
    if (r == LLMKV_OK) r = llmkv__gpu_err(cudaEventRecord(gpu->stage_done[b], stream));
    if (r != LLMKV_OK) return llmkv__dev_leave(&sc, r);
    gpu->stage_next = (b + 1) % LLMKV__STAGES;
    gpu->batch = batch;
    gpu->batch_build = info.build;
    gpu->n_tokens = info.n_tokens;
    gpu->max_len = max_len;
    return llmkv__dev_leave(&sc, LLMKV_OK);
}

/* The uploaded tables still describe the cache: the batch was not rebuilt
   since the upload and none of its sequences changed. */
static llmkv_result llmkv__gpu_batch_ok(const llmkv_cuda* gpu, llmkv_batch_info* info) {
    llmkv_result r;
    memset(info, 0, sizeof *info);
    if (!gpu->batch) return LLMKV_ERR_STALE_BATCH;
    r = llmkv_batch_get(gpu->batch, info);
    if (r != LLMKV_OK) return r;
    return info->build == gpu->batch_build ? LLMKV_OK : LLMKV_ERR_STALE_BATCH;
}

/* ---------------------------------------------------------------------- */
/* Host: put, gather                                                        */
/* ---------------------------------------------------------------------- */

LLMKV_API llmkv_result llmkv_cuda_put(llmkv_cuda* gpu, uint32_t layer, const void* k, size_t k_stride,
                                      const void* v, size_t v_stride, llmkv_dtype src_dtype,
                                      llmkv_gpu_stream stream) {
    llmkv__put_args a;
    llmkv_batch_info info;
    llmkv_result r;
    size_t row;
    llmkv__dev_scope sc;
    if (!gpu) return LLMKV_ERR_INVALID_ARGUMENT;
    if (src_dtype == LLMKV_DTYPE_DEFAULT) src_dtype = LLMKV_DTYPE_F32;
    if (src_dtype != LLMKV_DTYPE_F32 && src_dtype != LLMKV_DTYPE_F16 && src_dtype != LLMKV_DTYPE_BF16)
        return LLMKV_ERR_INVALID_ARGUMENT;
    if (layer >= gpu->layout.n_layers) return LLMKV_ERR_OUT_OF_RANGE;
    if (gpu->layout.head_dim > 32u * LLMKV__PUT_MAX_GROUPS) return LLMKV_ERR_UNSUPPORTED;
    row = (size_t)gpu->layout.n_kv_heads * gpu->layout.head_dim * llmkv_dtype_size(src_dtype);
    r = llmkv__rows(k, &k_stride, row, src_dtype); /* as llmkv_put checks them; 0 becomes row */
    if (r == LLMKV_OK) r = llmkv__rows(v, &v_stride, row, src_dtype);
    if (r == LLMKV_OK) r = llmkv__gpu_batch_ok(gpu, &info);
    if (r != LLMKV_OK || gpu->n_tokens == 0 || (!k && !v)) return r;
    memset(&a, 0, sizeof a);
    a.pool = gpu->pool;
    a.g = gpu->geom;
    a.layer = layer;
    a.n_rows = gpu->n_tokens;
    a.slot_mapping = (const int64_t*)(gpu->dtab + gpu->tab.slot_mapping);
    a.src[0] = (const unsigned char*)k;
    a.src[1] = (const unsigned char*)v;
    a.src_stride[0] = k_stride;
    a.src_stride[1] = v_stride;
    a.src_dtype = (int)src_dtype;
    llmkv__dev_enter(gpu, &sc);
    {
        dim3 grid(gpu->n_tokens, gpu->layout.n_kv_heads, 2);
        LLMKV__LAUNCH(grid, 32, stream, a, llmkv__put_kernel);
    }
    return llmkv__dev_leave(&sc, llmkv__gpu_launched());
}

LLMKV_API llmkv_result llmkv_cuda_gather(llmkv_cuda* gpu, uint32_t batch_index, uint32_t layer, uint32_t pos,
                                         uint32_t n_tokens, void* k, size_t k_stride, void* v, size_t v_stride,
                                         llmkv_dtype dst_dtype, llmkv_gpu_stream stream) {
    llmkv__gather_args a;
    llmkv_batch_info info;
    llmkv_result r;
    size_t row_k, row_v;
    llmkv_dtype dk, dv;
    llmkv__dev_scope sc;
    if (!gpu) return LLMKV_ERR_INVALID_ARGUMENT;
    if (dst_dtype != LLMKV_DTYPE_DEFAULT && dst_dtype != LLMKV_DTYPE_F32 && dst_dtype != LLMKV_DTYPE_F16 &&
        dst_dtype != LLMKV_DTYPE_BF16)
        return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv__gpu_batch_ok(gpu, &info);
    if (r != LLMKV_OK) return r;
    if (layer >= gpu->layout.n_layers || batch_index >= info.n_seqs) return LLMKV_ERR_OUT_OF_RANGE;
    if ((uint64_t)pos + n_tokens > (uint64_t)info.seq_lens[batch_index]) return LLMKV_ERR_OUT_OF_RANGE;
    dk = llmkv__gather_type(gpu->layout.k.dtype, dst_dtype); /* llmkv.h's rule, as llmkv_gather */
    dv = llmkv__gather_type(gpu->layout.v.dtype, dst_dtype);
    row_k = (size_t)gpu->layout.n_kv_heads * gpu->layout.head_dim * llmkv_dtype_size(dk);
    row_v = (size_t)gpu->layout.n_kv_heads * gpu->layout.head_dim * llmkv_dtype_size(dv);
    r = llmkv__rows(k, &k_stride, row_k, dk);
    if (r == LLMKV_OK) r = llmkv__rows(v, &v_stride, row_v, dv);
    if (r != LLMKV_OK || n_tokens == 0 || (!k && !v)) return r;
    memset(&a, 0, sizeof a);
    a.pool = gpu->pool;
    a.g = gpu->geom;
    a.layer = layer;
    a.pos = pos;
    a.pages = (const int32_t*)(gpu->dtab + gpu->tab.kv_indices) + info.kv_indptr[batch_index];
    a.dst[0] = (unsigned char*)k;
    a.dst[1] = (unsigned char*)v;
    a.dst_stride[0] = k_stride;
    a.dst_stride[1] = v_stride;
    a.dst_dtype[0] = (int)dk;
    a.dst_dtype[1] = (int)dv;
    llmkv__dev_enter(gpu, &sc);
    {
        dim3 grid(n_tokens, gpu->layout.n_kv_heads, 2);
        LLMKV__LAUNCH(grid, 64, stream, a, llmkv__gather_kernel);
    }
    return llmkv__dev_leave(&sc, llmkv__gpu_launched());
}

/* ---------------------------------------------------------------------- */
/* Host: decode                                                             */
/* ---------------------------------------------------------------------- */

template <int D, int KT, int VT>
static llmkv_result llmkv__launch_decode_g(const llmkv__dec_args& a, uint32_t gb, uint32_t rows, llmkv_gpu_stream st) {
    dim3 grid(rows, a.n_q_heads / gb, a.n_splits), block(LLMKV__DEC_WARPS * 32);
    switch (gb) {
    case 4: LLMKV__LAUNCH(grid, block, st, a, llmkv__decode_kernel<D, KT, VT, 4>); break;
    case 2: LLMKV__LAUNCH(grid, block, st, a, llmkv__decode_kernel<D, KT, VT, 2>); break;
    default: LLMKV__LAUNCH(grid, block, st, a, llmkv__decode_kernel<D, KT, VT, 1>); break;
    }
    return llmkv__gpu_launched();
}

template <int D>
static llmkv_result llmkv__launch_decode_d(const llmkv__dec_args& a, uint32_t gb, uint32_t rows, llmkv_gpu_stream st) {
    int kt = a.g.part[0].dtype, vt = a.g.part[1].dtype;
    if (kt == vt && kt == LLMKV_DTYPE_F16) return llmkv__launch_decode_g<D, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16>(a, gb, rows, st);
    if (kt == vt && kt == LLMKV_DTYPE_BF16) return llmkv__launch_decode_g<D, LLMKV_DTYPE_BF16, LLMKV_DTYPE_BF16>(a, gb, rows, st);
    if (kt == vt && kt == LLMKV_DTYPE_F32) return llmkv__launch_decode_g<D, LLMKV_DTYPE_F32, LLMKV_DTYPE_F32>(a, gb, rows, st);
    return llmkv__launch_decode_g<D, 0, 0>(a, gb, rows, st);
}

/* Split count for a launch: enough blocks to fill the GPU for long rows,
   bounded by max_splits, 256 keys per split and the workspace. */
static uint32_t llmkv__gpu_splits(const llmkv_cuda* gpu, uint32_t rows, uint32_t nq, uint32_t gb) {
    uint64_t blocks = (uint64_t)rows * (nq / gb), target = (uint64_t)(gpu->n_sm > 0 ? gpu->n_sm : 1) * 4;
    uint64_t per_split = (uint64_t)rows * nq * (gpu->layout.head_dim + 1), s;
    if (gpu->desc.fixed_splits) s = gpu->desc.fixed_splits;
    else {
        if (gpu->max_len < 512 || blocks >= target) return 1;
        s = (target + blocks - 1) / blocks;
        if (s > (gpu->max_len + 255) / 256) s = (gpu->max_len + 255) / 256;
        if (s > gpu->desc.max_splits) s = gpu->desc.max_splits;
    }
    while (s > 1 && s * per_split > gpu->ws_floats) --s;
    return s ? (uint32_t)s : 1u;
}

LLMKV_API llmkv_result llmkv_cuda_decode(llmkv_cuda* gpu, const llmkv_attn_desc* d, llmkv_gpu_stream stream) {
    llmkv__dec_args a;
    llmkv_batch_info info;
    llmkv_result r;
    uint32_t D, G, gb;
    size_t row_bytes;
    llmkv__dev_scope sc;
    if (!gpu || !d) return LLMKV_ERR_INVALID_ARGUMENT;
    D = gpu->layout.head_dim;
    if (d->n_q_heads == 0 || d->n_q_heads % gpu->layout.n_kv_heads) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!d->q || !d->out) return LLMKV_ERR_INVALID_ARGUMENT;
    if (d->layer >= gpu->layout.n_layers) return LLMKV_ERR_OUT_OF_RANGE;
    if (!(d->scale >= 0.0f) || !(d->softcap >= 0.0f)) return LLMKV_ERR_INVALID_ARGUMENT;
    row_bytes = (size_t)d->n_q_heads * D * sizeof(float);
    if ((uintptr_t)d->q % 4 || (uintptr_t)d->out % 4 || (uintptr_t)d->lse % 4 || d->q_stride % 4 ||
        d->out_stride % 4)
        return LLMKV_ERR_MISALIGNED;
    if ((d->q_stride && d->q_stride < row_bytes) || (d->out_stride && d->out_stride < row_bytes))
        return LLMKV_ERR_BUFFER_TOO_SMALL;
    if (D != 64 && D != 80 && D != 96 && D != 128 && D != 256) return LLMKV_ERR_UNSUPPORTED;
    r = llmkv__gpu_batch_ok(gpu, &info);
    if (r != LLMKV_OK || gpu->n_tokens == 0) return r;
    G = d->n_q_heads / gpu->layout.n_kv_heads;
    /* Query heads per block: up to LLMKV__DEC_MAX_GROUP of a KV head's G.
       More would hold too many registers (8 heads: 200 per thread); the
       blocks of one KV head run side by side and share its keys in L2. */
    gb = G % 4 == 0 ? 4 : G % 2 == 0 ? 2 : 1;
    memset(&a, 0, sizeof a);
    a.pool = gpu->pool;
    a.g = gpu->geom;
    a.layer = d->layer;
    a.n_q_heads = d->n_q_heads;
    a.group = G;
    a.row_seq = (const int32_t*)(gpu->dtab + gpu->tab.row_seq);
    a.positions = (const int32_t*)(gpu->dtab + gpu->tab.positions);
    a.seq_lens = (const int32_t*)(gpu->dtab + gpu->tab.seq_lens);
    a.kv_indptr = (const int32_t*)(gpu->dtab + gpu->tab.kv_indptr);
    a.kv_indices = (const int32_t*)(gpu->dtab + gpu->tab.kv_indices);
    a.q = d->q;
    a.q_stride = (d->q_stride ? d->q_stride : row_bytes) / 4;
    a.out = d->out;
    a.out_stride = (d->out_stride ? d->out_stride : row_bytes) / 4;
    a.lse = d->lse;
    a.scale = d->scale > 0.0f ? d->scale : 1.0f / sqrtf((float)D);
    a.softcap = d->softcap;
    a.window = d->window;
    a.non_causal = d->non_causal;
    a.n_splits = llmkv__gpu_splits(gpu, gpu->n_tokens, d->n_q_heads, gb);
    a.ws_o = gpu->ws;
    a.ws_lse = gpu->ws + (uint64_t)gpu->n_tokens * d->n_q_heads * a.n_splits * D;
    llmkv__dev_enter(gpu, &sc);
    switch (D) {
    case 64: r = llmkv__launch_decode_d<64>(a, gb, gpu->n_tokens, stream); break;
    case 80: r = llmkv__launch_decode_d<80>(a, gb, gpu->n_tokens, stream); break;
    case 96: r = llmkv__launch_decode_d<96>(a, gb, gpu->n_tokens, stream); break;
    case 128: r = llmkv__launch_decode_d<128>(a, gb, gpu->n_tokens, stream); break;
    default: r = llmkv__launch_decode_d<256>(a, gb, gpu->n_tokens, stream); break;
    }
    if (r == LLMKV_OK && a.n_splits > 1) {
        LLMKV__LAUNCH(gpu->n_tokens * d->n_q_heads, 128, stream, a, llmkv__merge_kernel);
        r = llmkv__gpu_launched();
    }
    return llmkv__dev_leave(&sc, r);
}

/* ---------------------------------------------------------------------- */
/* Host: swap                                                               */
/* ---------------------------------------------------------------------- */

/* A swap buffer: this header, the token ids (with a prefix index), then the
   pages at a 256-byte boundary. */
typedef struct llmkv__swap_header {
    char magic[8];          /* "llmkvSW1" */
    uint32_t length, n_pages, has_tokens, reserved;
    uint64_t page_bytes, pages_offset;
} llmkv__swap_header;

/* Pages holding `length` positions. */
static uint32_t llmkv__gpu_pages_for(const llmkv_cuda* gpu, uint32_t length) {
    return (uint32_t)((length + (uint64_t)gpu->layout.page_size - 1) / gpu->layout.page_size);
}

static uint64_t llmkv__swap_pages_offset(const llmkv_cuda* gpu, uint32_t length) {
    uint64_t o = sizeof(llmkv__swap_header);
    if (gpu->cdesc.prefix_index) o += 4ull * length;
    return llmkv__gpu_align(o);
}

LLMKV_API llmkv_result llmkv_cuda_swap_size(const llmkv_cuda* gpu, uint32_t length, size_t* bytes) {
    uint64_t n;
    if (bytes) *bytes = 0;
    if (!gpu || !bytes) return LLMKV_ERR_INVALID_ARGUMENT;
    n = llmkv__gpu_pages_for(gpu, length);
    *bytes = (size_t)(llmkv__swap_pages_offset(gpu, length) + n * gpu->layout.page_bytes);
    return LLMKV_OK;
}

/* Copies n pages between the device pool (page ids ids[]) and consecutive
   host pages. Runs of consecutive ids go as one copy each; a sequence in
   more than LLMKV__SWAP_MAX_RUNS runs goes through the split-K workspace
   instead, in chunks: a kernel packs its pages there (or unpacks them)
   and each chunk crosses the bus as one copy, so scattered pages cost one
   extra pass over device memory instead of a copy call each. */
#define LLMKV__SWAP_MAX_RUNS 4

typedef struct llmkv__pack_args {
    unsigned char* pool;
    unsigned char* packed;
    const uint32_t* ids;
    uint64_t page_bytes;
    int to_packed;
} llmkv__pack_args;

/* blockIdx.y: the page; blockIdx.x strides over its bytes. */
static __global__ void llmkv__pack_kernel(llmkv__pack_args a) {
    unsigned char* page = a.pool + (uint64_t)a.ids[blockIdx.y] * a.page_bytes;
    unsigned char* slot = a.packed + (uint64_t)blockIdx.y * a.page_bytes;
    if (a.to_packed) llmkv__d_copy(slot, page, a.page_bytes);
    else llmkv__d_copy(page, slot, a.page_bytes);
}

static llmkv_result llmkv__swap_copy(llmkv_cuda* gpu, const uint32_t* ids, uint32_t n, unsigned char* host,
                                     int to_host, llmkv_gpu_stream stream) {
    uint32_t i = 0, j, runs = 0;
    uint64_t pb = gpu->layout.page_bytes, chunk = gpu->ws_floats * 4 / pb, id_cap;
    for (i = 0; i < n; ++i) runs += i == 0 || ids[i] != ids[i - 1] + 1;
    /* Page ids reach the device through the copy-command staging. */
    id_cap = (uint64_t)gpu->max_copies * sizeof(llmkv_copy_cmd) / 4;
    if (chunk > id_cap) chunk = id_cap;
    if (chunk > 65535u) chunk = 65535u;
    if (runs > LLMKV__SWAP_MAX_RUNS && chunk >= 2) {
        llmkv_result r = llmkv__gpu_err(cudaEventSynchronize(gpu->cmd_done));
        for (i = 0; i < n && r == LLMKV_OK; i += (uint32_t)chunk) {
            uint32_t m = n - i < chunk ? n - i : (uint32_t)chunk;
            llmkv__pack_args a;
            /* The previous chunk's id upload must be done before reuse. */
            if (i) r = llmkv__gpu_err(cudaEventSynchronize(gpu->cmd_done));
            if (r != LLMKV_OK) break;
            memcpy(gpu->cmd_stage, ids + i, 4ull * m);
            r = llmkv__gpu_err(cudaMemcpyAsync(gpu->dcmds, gpu->cmd_stage, 4ull * m, cudaMemcpyHostToDevice, stream));
            if (r == LLMKV_OK) r = llmkv__gpu_err(cudaEventRecord(gpu->cmd_done, stream));
            a.pool = gpu->pool;
            a.packed = (unsigned char*)gpu->ws;
            a.ids = (const uint32_t*)gpu->dcmds;
            a.page_bytes = pb;
            if (r == LLMKV_OK && !to_host)
                r = llmkv__gpu_err(cudaMemcpyAsync(a.packed, host + i * pb, m * pb, cudaMemcpyHostToDevice, stream));
            if (r == LLMKV_OK) {
                dim3 grid(pb >= (1u << 20) ? 16u : 4u, m);
                a.to_packed = to_host;
                LLMKV__LAUNCH(grid, 256, stream, a, llmkv__pack_kernel);
                r = llmkv__gpu_launched();
            }
            if (r == LLMKV_OK && to_host)
                r = llmkv__gpu_err(cudaMemcpyAsync(host + i * pb, a.packed, m * pb, cudaMemcpyDeviceToHost, stream));
        }
        return r;
    }
    i = 0;
    while (i < n) {
        cudaError_t e;
        for (j = i + 1; j < n && ids[j] == ids[j - 1] + 1; ++j) {}
        if (to_host)
            e = cudaMemcpyAsync(host + i * pb, gpu->pool + ids[i] * pb, (j - i) * pb, cudaMemcpyDeviceToHost, stream);
        else
            e = cudaMemcpyAsync(gpu->pool + ids[i] * pb, host + i * pb, (j - i) * pb, cudaMemcpyHostToDevice, stream);
        if (e != cudaSuccess) return llmkv__gpu_err(e);
        i = j;
    }
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_cuda_swap_out(llmkv_cuda* gpu, llmkv_seq seq, void* host, size_t host_bytes,
                                           llmkv_gpu_stream stream) {
    llmkv__swap_header h;
    uint32_t length = 0, n_pages = 0, *ids;
    size_t need = 0;
    llmkv_result r;
    unsigned char* hb = (unsigned char*)host;
    llmkv__dev_scope sc;
    if (!gpu || !host) return LLMKV_ERR_INVALID_ARGUMENT;
    if ((uintptr_t)host % 16u) return LLMKV_ERR_MISALIGNED;
    r = llmkv_seq_length(gpu->cache, seq, &length);
    if (r != LLMKV_OK) return r;
    (void)llmkv_cuda_swap_size(gpu, length, &need);
    if (host_bytes < need) return LLMKV_ERR_BUFFER_TOO_SMALL;
    memset(&h, 0, sizeof h);
    memcpy(h.magic, "llmkvSW1", 8);
    h.length = length;
    h.n_pages = llmkv__gpu_pages_for(gpu, length);
    h.has_tokens = gpu->cdesc.prefix_index ? 1u : 0u;
    h.page_bytes = gpu->layout.page_bytes;
    h.pages_offset = llmkv__swap_pages_offset(gpu, length);
    ids = (uint32_t*)malloc(4ull * (h.n_pages ? h.n_pages : 1));
    if (!ids) return LLMKV_ERR_OUT_OF_MEMORY;
    r = llmkv_seq_pages(gpu->cache, seq, ids, h.n_pages, &n_pages);
    if (r == LLMKV_OK && n_pages != h.n_pages) r = LLMKV_ERR_CORRUPT;
    if (r == LLMKV_OK && h.has_tokens && length)
        r = llmkv_seq_tokens(gpu->cache, seq, 0, length, (llmkv_token*)(hb + sizeof h));
    /* Copies the manager queued (into this sequence's pages too) go first. */
    if (r == LLMKV_OK) r = llmkv_cuda_run_copies(gpu, stream, NULL);
    if (r != LLMKV_OK) {
        free(ids);
        return r;
    }
    llmkv__dev_enter(gpu, &sc);
    r = llmkv__swap_copy(gpu, ids, n_pages, hb + h.pages_offset, 1, stream);
    free(ids);
    if (r != LLMKV_OK) return llmkv__dev_leave(&sc, r);
    memcpy(hb, &h, sizeof h);
    /* Releases the pages; the copies above precede any later write to them
       on this stream. */
    r = llmkv_truncate(gpu->cache, seq, 0);
    return llmkv__dev_leave(&sc, r);
}

LLMKV_API llmkv_result llmkv_cuda_swap_in(llmkv_cuda* gpu, llmkv_seq seq, const void* host, size_t host_bytes,
                                          llmkv_gpu_stream stream) {
    llmkv__swap_header h;
    uint32_t length = 0, n_pages = 0, *ids;
    size_t need = 0;
    llmkv_result r;
    const unsigned char* hb = (const unsigned char*)host;
    llmkv__dev_scope sc;
    if (!gpu || !host) return LLMKV_ERR_INVALID_ARGUMENT;
    if ((uintptr_t)host % 16u) return LLMKV_ERR_MISALIGNED;
    if (host_bytes < sizeof h) return LLMKV_ERR_BAD_FORMAT;
    memcpy(&h, hb, sizeof h);
    if (memcmp(h.magic, "llmkvSW1", 8) != 0 || h.page_bytes != gpu->layout.page_bytes ||
        h.has_tokens != (gpu->cdesc.prefix_index ? 1u : 0u) ||
        h.n_pages != llmkv__gpu_pages_for(gpu, h.length) ||
        h.pages_offset != llmkv__swap_pages_offset(gpu, h.length))
        return LLMKV_ERR_BAD_FORMAT;
    (void)llmkv_cuda_swap_size(gpu, h.length, &need);
    if (host_bytes < need) return LLMKV_ERR_BAD_FORMAT;
    r = llmkv_seq_length(gpu->cache, seq, &length);
    if (r != LLMKV_OK) return r;
    if (length != 0) return LLMKV_ERR_INVALID_ARGUMENT;
    ids = (uint32_t*)malloc(4ull * (h.n_pages ? h.n_pages : 1));
    if (!ids) return LLMKV_ERR_OUT_OF_MEMORY;
    if (!h.has_tokens) {
        r = llmkv_reserve(gpu->cache, seq, h.length);
    } else { /* runs of known ids, and of unknown ones (-1), which reserve takes as NULL */
        const llmkv_token* tok = (const llmkv_token*)(hb + sizeof h);
        uint32_t i = 0, j;
        r = LLMKV_OK;
        while (i < h.length && r == LLMKV_OK) {
            for (j = i + 1; j < h.length && (tok[j] < 0) == (tok[i] < 0); ++j) {}
            r = llmkv_reserve_tokens(gpu->cache, seq, tok[i] < 0 ? NULL : tok + i, j - i);
            i = j;
        }
    }
    if (r == LLMKV_OK) r = llmkv_seq_pages(gpu->cache, seq, ids, h.n_pages, &n_pages);
    if (r == LLMKV_OK && n_pages != h.n_pages) r = LLMKV_ERR_CORRUPT;
    if (r != LLMKV_OK) {
        if (h.length) (void)llmkv_truncate(gpu->cache, seq, 0);
        free(ids);
        return r;
    }
    /* Copies the reserve queued (none for an empty sequence) go first. */
    r = llmkv_cuda_run_copies(gpu, stream, NULL);
    llmkv__dev_enter(gpu, &sc);
    if (r == LLMKV_OK) r = llmkv__swap_copy(gpu, ids, n_pages, (unsigned char*)hb + h.pages_offset, 0, stream);
    free(ids);
    if (r == LLMKV_OK) r = llmkv_seq_mark_written(gpu->cache, seq, h.length);
    if (r != LLMKV_OK) (void)llmkv_truncate(gpu->cache, seq, 0);
    return llmkv__dev_leave(&sc, r);
}

#endif /* LLMKV_CUDA_IMPLEMENTATION */
