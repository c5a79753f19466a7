/* llmkv.h - v0.1.0 - paged key/value cache for LLM inference - MIT or public domain

   llmkv gives an inference engine vLLM-class KV-cache management in one C
   header: a pool of fixed-size pages, per-sequence page tables, copy-on-write
   fork and rollback, batch descriptors in the layouts that FlashInfer,
   FlashAttention and vLLM kernels take, statistics, a memory planner and an
   invariant checker. Memory is held in proportion to the tokens actually
   stored, never to a maximum length. No dependency beyond the C library.

   HOW TO INCLUDE

       Do this in *one* C or C++ file:

           #define LLMKV_IMPLEMENTATION
           #include "llmkv.h"

       Every other file includes "llmkv.h" without the define. To keep all
       functions private to one translation unit, also define LLMKV_STATIC
       there (then only that file may use the library).

   OPTIONS

       Define before including. "All" means every file that includes the
       header must agree; "impl" means only the implementation file reads it.

       LLMKV_STATIC      impl  all public functions become `static`.
       LLMKV_API         all   linkage of public functions (default: extern).
       LLMKV_MALLOC(sz)  impl  fallback allocator used when a descriptor
       LLMKV_FREE(p)     impl  names none; define both or neither
                               (default: malloc/free). The library aligns
                               the pointers itself, to 64 bytes.
       LLMKV_ASSERT(x)   impl  internal-invariant assertion (default:
                               assert). Never used to check caller input.
       LLMKV_NO_THREADS  impl  no pthreads: llmkv_threadpool runs on the
                               calling thread only. Otherwise link with
                               -pthread (POSIX threads).
       LLMKV_NO_SIMD     impl  compile only the scalar attention kernels.

   MANUAL

       A *cache* holds the K and V vectors of one model (or of one shard of
       its KV heads). Its memory is a pool of *pages*; a page holds
       `page_size` token slots for every layer, K and V, every KV head, in one
       contiguous span of `page_bytes`:

           page = [layer][K | V][kv_head][slot][dim]   then each layer's
                                                       quantisation scales

       so one (layer, K|V, head) of a page is `page_size` consecutive vectors.
       llmkv_cache_layout() reports every offset and stride, so external
       kernels can address any vector.

       A *sequence* is a handle { uint32_t id } (slot + generation: a freed
       handle is rejected). It owns a length and a *page table*, the ordered
       ids of the pages that hold its tokens. Pages have reference counts;
       fork shares every page, and a page referenced twice is read-only:
       whichever sequence writes into it first gets a private copy
       (copy-on-write).

       The loop an engine writes:

           llmkv_desc d;
           memset(&d, 0, sizeof d);                  // zero means default
           d.n_layers = 32; d.n_kv_heads = 8; d.head_dim = 128;
           d.capacity_bytes = (uint64_t)4 << 30;     // or d.n_pages
           llmkv_cache* kv;
           if (llmkv_cache_create(&d, &kv) != LLMKV_OK) ...

           llmkv_seq s;
           llmkv_seq_create(kv, &s);
           // per step: make room for n tokens in every layer at once ...
           llmkv_reserve(kv, s, n);
           for (layer = 0; layer < 32; ++layer) {
               // ... project q, k, v for the n new tokens, then store k, v
               llmkv_put(kv, s, layer, n, k, 0, v, 0, LLMKV_DTYPE_F32);
               // ... attend over positions [0, length) (llmkv_gather, or a
               // kernel driven by an llmkv_batch)
           }
           llmkv_seq_free(kv, s);
           llmkv_cache_destroy(kv);

       Attention reads the pages directly. Per step, after the puts of a
       layer, describe the step once with a batch and attend:

           llmkv_batch_build(batch, seqs, q_lens, n_seqs);   // once per step
           llmkv_attn_desc a = {0};
           a.layer = layer; a.n_q_heads = 32; a.q = q; a.out = out;
           llmkv_attend(kv, batch, &a, pool);                // pool may be NULL

       Query heads are grouped onto KV heads (GQA; MHA and MQA are the ends),
       masking is causal by position (a step's q_lens[i] queries are the
       newest positions of sequence i, so prefill, chunked prefill and
       decode are one call), with optional sliding window, soft-capping and
       log-sum-exp output. The kernels (scalar, AVX2, AVX-512, NEON) are
       chosen at run time.

       Every fallible function returns llmkv_result: LLMKV_OK (0) or a
       negative code (llmkv_result_string() names it). A failed call leaves
       the cache exactly as it was; its out-parameters are zeroed (a zero
       handle, length or count) whenever the pointer itself was valid. After creation the cache allocates
       nothing: page tables, the free list and every other structure are
       sized from the descriptor up front.

       Storage modes. By default pages and metadata come from the allocator
       (llmkv_allocator, or LLMKV_MALLOC). llmkv_cache_create_in() places
       the whole cache inside one caller buffer (llmkv_cache_memory_size()
       says how large) and never allocates at all. LLMKV_STORAGE_METADATA_ONLY
       keeps no page bytes: a GPU backend owns them, and every copy the
       manager decides is queued as an llmkv_copy_cmd for it to execute.

   THREAD SAFETY

       A cache is not internally locked: calls that change a cache must not
       run concurrently with any other call on the same cache. Read-only
       calls (those taking `const llmkv_cache*`, attention included) may run
       concurrently with each other. Distinct caches are independent. Each
       function states its rule.

   LICENSE: see the end of this file.
*/
#ifndef LLMKV_H
#define LLMKV_H

#define LLMKV_VERSION_MAJOR 0
#define LLMKV_VERSION_MINOR 1
#define LLMKV_VERSION_PATCH 0
#define LLMKV_VERSION_STRING "0.1.0"

#include <stddef.h>
#include <stdint.h>

#ifndef LLMKV_API
#ifdef LLMKV_STATIC
#if defined(__GNUC__) || defined(__clang__)
#define LLMKV_API static __attribute__((unused)) /* a file need not call them all */
#else
#define LLMKV_API static
#endif
#else
#define LLMKV_API extern
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Results                                                                  */
/* ------------------------------------------------------------------------ */

/* Result of every fallible call. Codes are grouped by kind:
   -1..-19 bad arguments, -20..-39 capacity, -40..-59 state,
   -60..-79 I/O and format, -80..-99 device, -100.. unsupported. */
typedef enum llmkv_result {
    LLMKV_OK = 0,

    LLMKV_ERR_INVALID_ARGUMENT = -1,  /* a parameter is null, zero or out of its domain */
    LLMKV_ERR_OUT_OF_RANGE = -2,      /* a layer, position or count past the end */
    LLMKV_ERR_STALE_HANDLE = -3,      /* a sequence handle that is freed or was never valid */
    LLMKV_ERR_BUFFER_TOO_SMALL = -4,  /* a caller buffer or stride smaller than required */
    LLMKV_ERR_MISALIGNED = -5,        /* a caller buffer without the required alignment */

    LLMKV_ERR_OUT_OF_MEMORY = -20,        /* the allocator returned NULL */
    LLMKV_ERR_OUT_OF_PAGES = -21,         /* not enough free pages for the request */
    LLMKV_ERR_TOO_MANY_SEQUENCES = -22,   /* every sequence slot is in use */
    LLMKV_ERR_SEQUENCE_TOO_LONG = -23,    /* the request passes desc.max_seq_len */
    LLMKV_ERR_COPY_QUEUE_FULL = -24,      /* metadata-only: pending page copies fill the queue */
    LLMKV_ERR_BATCH_FULL = -25,           /* more sequences or tokens than the batch holds */
    LLMKV_ERR_TOO_MANY_PINS = -26,        /* desc.max_pins pins are live */

    LLMKV_ERR_STALE_BATCH = -40,      /* a sequence in the batch changed after it was built */
    LLMKV_ERR_NO_PAGE_DATA = -41,     /* a data call on a metadata-only cache */
    LLMKV_ERR_CORRUPT = -42,          /* the invariant checker found an inconsistency */

    LLMKV_ERR_IO = -60,               /* a file could not be opened, written, flushed, renamed or read */
    LLMKV_ERR_BAD_FORMAT = -61,       /* a saved file or buffer is corrupt, truncated or not llmkv's */
    LLMKV_ERR_VERSION = -62,          /* saved by a newer, incompatible format version */
    LLMKV_ERR_MISMATCH = -63,         /* saved data does not fit this cache (shape, or checkpoint chain) */

    LLMKV_ERR_NO_DEVICE = -80,        /* GPU backends: no usable device (or no driver) */
    LLMKV_ERR_DEVICE_OUT_OF_MEMORY = -81, /* GPU backends: device or pinned host memory exhausted */
    LLMKV_ERR_DEVICE = -82,           /* GPU backends: any other runtime error (a failed launch) */

    LLMKV_ERR_UNSUPPORTED = -100      /* a valid request this build or type cannot serve */
} llmkv_result;

/* Name and meaning of a result code, as a static string; never NULL.
   Thread safety: any thread. */
LLMKV_API const char* llmkv_result_string(llmkv_result result);

/* Library version as "major.minor.patch" (same as LLMKV_VERSION_STRING).
   Thread safety: any thread. */
LLMKV_API const char* llmkv_version(void);

/* ------------------------------------------------------------------------ */
/* Configuration                                                            */
/* ------------------------------------------------------------------------ */

/* Element type of stored K or V vectors (and of caller buffers: F32, F16
   and BF16 only). The quantized types keep their scales in the page next
   to the data (llmkv_part_layout); each head vector (one token, one KV
   head) is quantized on its own, so one token's values never change
   another's. Exact formats, rounding and the handling of NaN and infinity:
   llmkv_quantize. Q4C (keys only) is the exception: see "Per-channel keys"
   below. */
typedef enum llmkv_dtype {
    LLMKV_DTYPE_DEFAULT = 0,  /* storage: F16; caller buffers: see each call */
    LLMKV_DTYPE_F32 = 1,      /* IEEE binary32 */
    LLMKV_DTYPE_F16 = 2,      /* IEEE binary16 */
    LLMKV_DTYPE_BF16 = 3,     /* bfloat16: the high half of a binary32 */
    LLMKV_DTYPE_Q8 = 4,       /* storage: int8, one F16 scale per 32 elements */
    LLMKV_DTYPE_Q4 = 5,       /* storage: 4-bit codes, an F16 scale and minimum per 32 elements */
    LLMKV_DTYPE_FP8 = 6,      /* storage: FP8 E4M3 (finite, |x| <= 448), one F32 scale per vector */
    LLMKV_DTYPE_Q4C = 7       /* K storage only: 4-bit codes quantized per channel over each full
                                 page's tokens, the partly filled last page at F16 (see below) */
} llmkv_dtype;

/* Per-channel keys (Q4C, in the spirit of KIVI). Real keys have a few
   channels far larger than the rest; a per-token group that holds one of
   them spends all its 16 levels on it. Q4C groups along tokens instead:
     - Every key element is first rounded to F16 (F32 and BF16 input are
       converted; |x| > 65504 becomes an infinity).
     - A page whose page_size slots are all written is quantized per
       (layer, KV head, channel c) over its page_size values x_j exactly as
       Q4 quantizes a group (llmkv_quantize): lo, hi = finite extremes,
       m = f16(clamp(lo)), s = f16(clamp((hi - m) / 15, 0, 65504)),
       codes rint(clamp((x_j - m) / s, 0, 15)), value m + s c (one
       rounding); NaN as 0, infinities saturate. The codes of a token sit
       in its slot (two per byte, as Q4); the (s, m) pairs of a page and
       head form one table of ceil(head_dim / 16) blocks of 64 bytes (16
       F16 scales, then the 16 minimums of those channels).
     - The last page of a sequence, while not full, holds its keys at F16
       in a staging area owned by the sequence slot (preallocated:
       max_seqs * n_layers * n_kv_heads * page_size * head_dim * 2 bytes,
       counted by llmkv_cache_memory_size, reported as
       llmkv_stats.staging_bytes). llmkv_put quantizes a page
       when it writes the page's last slot, so a page's codes do not
       depend on how its tokens arrived.
     - llmkv_truncate into a full page, or a put that rewrites part of
       one, turns the page's remaining slots back into F16 copies of their
       dequantized values (lossy); it is quantized again when full.
     - Every position of a page should be written before the page fills:
       an unwritten slot (reserved, never put) takes part in its channels'
       ranges with whatever its staging held.
     - Values (V) stay per token: v_dtype Q4C is invalid. Not available
       on metadata-only caches (LLMKV_ERR_UNSUPPORTED), nor to
       llmkv_quantize / llmkv_dequantize / llmkv_vector_bytes (not a
       per-vector format). The per-page table costs
       ceil(head_dim / 16) * 64 / page_size bytes per token and head: use
       pages of 32 tokens or more. */

/* Where page bytes live. */
typedef enum llmkv_storage {
    LLMKV_STORAGE_DEFAULT = 0,        /* host memory (from the allocator, or the
                                         caller's buffer with llmkv_cache_create_in) */
    LLMKV_STORAGE_METADATA_ONLY = 1   /* no page bytes: a device backend owns them */
} llmkv_storage;

typedef enum llmkv_log_level {
    LLMKV_LOG_ERROR = 0,  /* a call failed; the message says why */
    LLMKV_LOG_WARN = 1,
    LLMKV_LOG_INFO = 2
} llmkv_log_level;

/* Memory callbacks. `alloc` returns `size` bytes aligned to `align` (a power
   of two, at most 4096) or NULL; `free` releases a pointer `alloc` returned,
   with the same size. Both or neither must be set. */
typedef struct llmkv_allocator {
    void* (*alloc)(size_t size, size_t align, void* user);
    void (*free)(void* ptr, size_t size, void* user);
    void* user;
} llmkv_allocator;

/* Log callback: called with a one-line, NUL-terminated message when a call
   fails for a reason its result code alone does not say. The library never
   prints by itself. */
typedef struct llmkv_logger {
    void (*fn)(void* user, llmkv_log_level level, const char* message);
    void* user;
} llmkv_logger;

/* Cache descriptor. Zero-initialise, then set the required fields; every
   zero field takes the default its comment states. */
typedef struct llmkv_desc {
    uint32_t n_layers;      /* required: 1..65536 */
    uint32_t n_kv_heads;    /* required: 1..65536 (the KV heads of this shard) */
    uint32_t head_dim;      /* required: elements per head vector, 1..512 */
    uint32_t page_size;     /* token slots per page, 1..1024; default 16 */
    uint32_t n_pages;       /* capacity in pages; or 0 to use capacity_bytes */
    uint64_t capacity_bytes;/* capacity as a budget of page bytes (rounded down
                               to whole pages) when n_pages is 0. When both are
                               0: llmkv_cache_create_in fills its buffer;
                               llmkv_cache_create fails. */
    llmkv_dtype k_dtype;    /* K storage type; default F16 */
    llmkv_dtype v_dtype;    /* V storage type; default F16 */
    llmkv_storage storage;  /* default: host memory */
    uint32_t max_seqs;      /* live sequences at once, 1..1048575; default 256 */
    uint32_t max_seq_len;   /* tokens per sequence; default (and at most)
                               n_pages * page_size. Page tables are sized from it. */
    uint32_t max_pending_copies; /* metadata-only: copy-command queue length;
                                    default n_pages */
    llmkv_allocator allocator;   /* default: LLMKV_MALLOC / LLMKV_FREE */
    llmkv_logger logger;         /* default: silent */
    uint32_t prefix_index;  /* nonzero: keep each slot's token id and the
                               prefix index (see "Prefix index"); 0: off */
    uint32_t max_pins;      /* prefix index: pins alive at once, 1..65536;
                               default 64 */
    uint32_t thread_safe;   /* nonzero: calls from many threads at once are
                               safe (an internal mutex; see "Threads").
                               LLMKV_ERR_UNSUPPORTED under LLMKV_NO_THREADS */
} llmkv_desc;

/* Where one part (K or V) of one layer sits inside a page. Offsets are from
   the start of the layer's block; strides are in bytes. The vector of
   (page p, layer l, head h, slot s) starts at
       pool + p * page_bytes + l * layer_stride + offset + h * head_stride
            + s * slot_stride
   and its elements are `dtype` (Q4, Q4C: two per byte, see llmkv_quantize).
   The scales of that vector start at
       pool + p * page_bytes + l * layer_stride + scale_offset
            + h * scale_head_stride + s * scale_slot_stride
   Types without scales report 0 for the scale fields. Q4C keys have one
   table per (page, layer, head) instead (scale_slot_stride 0,
   scale_head_stride its size; see "Per-channel keys"), and the keys of a
   sequence's partly filled last page are not in the page but in its
   staging. */
typedef struct llmkv_part_layout {
    llmkv_dtype dtype;
    uint32_t elem_bytes;        /* bytes per element (llmkv_dtype_size; Q4: 0) */
    uint64_t offset;            /* first byte of head 0, slot 0 */
    uint64_t head_stride;       /* = page_size * slot_stride */
    uint64_t slot_stride;       /* bytes of one head vector */
    uint64_t bytes;             /* n_kv_heads * head_stride */
    uint64_t scale_offset;      /* quantised types: first scale byte */
    uint64_t scale_head_stride;
    uint64_t scale_slot_stride;
    uint64_t scale_bytes;
} llmkv_part_layout;

/* The whole page geometry. Every region starts on a 64-byte boundary and
   page_bytes is a multiple of 64. */
typedef struct llmkv_layout {
    uint32_t n_layers, n_kv_heads, head_dim, page_size;
    uint64_t page_bytes;    /* one page: n_layers * layer_stride */
    uint64_t layer_stride;  /* bytes from layer l's block to layer l+1's */
    llmkv_part_layout k, v;
} llmkv_layout;

/* ------------------------------------------------------------------------ */
/* Cache                                                                    */
/* ------------------------------------------------------------------------ */

typedef struct llmkv_cache llmkv_cache;

/* Threads. Without desc.thread_safe, calls that change the cache (those
   taking a non-const llmkv_cache*) must not overlap any other call on it;
   const calls may overlap each other. With desc.thread_safe, any threads
   may call anything at once, under two rules that stay the caller's:
     - calls on the same sequence do not overlap (fork counts as a call on
       its source; a batch's build, attention and puts count as calls on
       each of its sequences);
     - llmkv_cache_destroy overlaps nothing.
   Every call that reads or changes shared metadata (page references, the
   free list, sequence slots, the prefix index, pins, statistics) holds the
   cache's mutex for its duration; llmkv_put holds it only while it decides
   copy-on-write and writes the bytes outside it, so puts into different
   sequences run in parallel; llmkv_gather, llmkv_seq_length,
   llmkv_seq_pages, llmkv_seq_tokens and llmkv_attend* read only their own
   sequences' pages and take no lock. */

/* Sequence handle: a slot index and a generation packed in `id`. The zero
   handle is never valid. */
typedef struct llmkv_seq { uint32_t id; } llmkv_seq;

/* Creates a cache. Page memory and all metadata come from desc->allocator
   (or LLMKV_MALLOC) now and never later.
   desc: read only, not kept. out: receives the cache, owned by the caller
   (llmkv_cache_destroy). Returns LLMKV_ERR_INVALID_ARGUMENT for a bad
   descriptor (the logger says which field), LLMKV_ERR_OUT_OF_MEMORY if an
   allocation fails (everything allocated so far is released).
   Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_cache_create(const llmkv_desc* desc, llmkv_cache** out);

/* Bytes a cache for `desc` needs inside a caller buffer (pages, metadata and
   alignment slack), for llmkv_cache_create_in. When desc sets no capacity,
   `size` is the footprint without pages and per_page receives the bytes one
   more page costs; per_page may be NULL. Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_cache_memory_size(const llmkv_desc* desc, size_t* size,
                                               size_t* per_page);

/* Creates a cache entirely inside `memory` (`size` bytes, any alignment),
   which the caller owns and must keep until llmkv_cache_destroy. Never calls
   an allocator. When desc sets no capacity, as many pages as fit are made.
   Returns LLMKV_ERR_BUFFER_TOO_SMALL when the buffer cannot hold the cache
   (or a single page). Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_cache_create_in(const llmkv_desc* desc, void* memory, size_t size,
                                             llmkv_cache** out);

/* Releases the cache and everything it allocated; handles and batches of it
   become invalid (destroy batches first). NULL is ignored. A cache made by
   llmkv_cache_create_in frees nothing, but with desc.thread_safe it ends
   the cache's mutex, so call it for those too.
   Thread safety: no other call on this cache may be running. */
LLMKV_API void llmkv_cache_destroy(llmkv_cache* cache);

/* Copies the effective descriptor (defaults filled in, n_pages resolved).
   Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_cache_desc(const llmkv_cache* cache, llmkv_desc* out);

/* Reports the page geometry. Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_cache_layout(const llmkv_cache* cache, llmkv_layout* out);

/* Computes the page geometry `desc` would produce, without creating a cache.
   Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_layout_for(const llmkv_desc* desc, llmkv_layout* out);

/* Base of the page pool and its size in bytes (page p starts at
   base + p * page_bytes). A metadata-only cache reports NULL and the size
   the device pool must have. Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_cache_pool(const llmkv_cache* cache, void** base, uint64_t* bytes);

/* ------------------------------------------------------------------------ */
/* Sequences                                                                */
/* ------------------------------------------------------------------------ */

/* Starts an empty sequence. Returns LLMKV_ERR_TOO_MANY_SEQUENCES when
   desc.max_seqs are live. Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_seq_create(llmkv_cache* cache, llmkv_seq* out);

/* Ends a sequence: each of its pages loses one reference and returns to the
   free list when none remain. The handle becomes stale.
   Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_seq_free(llmkv_cache* cache, llmkv_seq seq);

/* Number of token positions the sequence holds (reserved slots included).
   Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_seq_length(const llmkv_cache* cache, llmkv_seq seq, uint32_t* length);

/* Copies the sequence's page table (page ids, position p is in page
   table[p / page_size]) into `pages` (capacity `max_pages`); *n_pages
   receives its length. LLMKV_ERR_BUFFER_TOO_SMALL if it does not fit
   (*n_pages still receives the length). Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_seq_pages(const llmkv_cache* cache, llmkv_seq seq, uint32_t* pages,
                                       uint32_t max_pages, uint32_t* n_pages);

/* Extends a sequence by n_tokens positions in every layer at once, taking
   free pages as needed and copying a shared tail page before it can be
   written (copy-on-write). Until llmkv_put writes them, the new slots
   read as zeros (a host page is cleared when it is taken), or as what a
   position truncated away left there; never as uninitialised memory, so
   saved files are a function of the cache's contents alone. All or
   nothing: LLMKV_ERR_OUT_OF_PAGES,
   LLMKV_ERR_SEQUENCE_TOO_LONG or LLMKV_ERR_COPY_QUEUE_FULL change nothing.
   n_tokens 0 is a no-op. Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_reserve(llmkv_cache* cache, llmkv_seq seq, uint32_t n_tokens);

/* llmkv_reserve for several sequences in one transaction: either every
   sequence grows by its n_tokens[i] or none changes. A sequence may appear
   once only. Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_reserve_many(llmkv_cache* cache, const llmkv_seq* seqs,
                                          const uint32_t* n_tokens, uint32_t n_seqs);

/* Writes the K and V vectors of one layer for the sequence's newest n_tokens
   positions, [length - n_tokens, length), converting from src_dtype (F32,
   F16 or BF16; DEFAULT means F32) to the storage types.
   k, v: [n_tokens][n_kv_heads][head_dim] elements, token rows k_stride and
   v_stride bytes apart (0: packed). Either pointer may be NULL to leave
   that part untouched. If a page in the range became shared since it was
   reserved (a fork in between), it is copied first; that copy can fail with
   LLMKV_ERR_OUT_OF_PAGES, before anything is written.
   Returns LLMKV_ERR_NO_PAGE_DATA on a metadata-only cache.
   Thread safety: mutates the cache (its page data; metadata only when a
   copy is needed). */
LLMKV_API llmkv_result llmkv_put(llmkv_cache* cache, llmkv_seq seq, uint32_t layer,
                                 uint32_t n_tokens, const void* k, size_t k_stride,
                                 const void* v, size_t v_stride, llmkv_dtype src_dtype);

/* Copies positions [pos, pos + n_tokens) of one layer into contiguous caller
   buffers [n_tokens][n_kv_heads][head_dim], rows k_stride / v_stride bytes
   apart (0: packed). dst_dtype DEFAULT copies the stored bytes as they are
   (each part in its own storage type; a quantized part as F32); F32, F16
   or BF16 converts (a quantized part is dequantized as llmkv_dequantize
   does, then converted).
   Either output may be NULL. Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_gather(const llmkv_cache* cache, llmkv_seq seq, uint32_t layer,
                                    uint32_t pos, uint32_t n_tokens, void* k, size_t k_stride,
                                    void* v, size_t v_stride, llmkv_dtype dst_dtype);

/* Starts a new sequence that shares every page of `src` (reference counts
   only; no page is copied until either side writes a shared page; with
   Q4C keys the F16 staging of the last page is copied).
   Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_fork(llmkv_cache* cache, llmkv_seq src, llmkv_seq* out);

/* Shortens a sequence to n_tokens positions (n_tokens <= length): pages past
   the new end lose a reference. A shared tail page that remains is copied
   by the next reserve that writes into it. With Q4C keys, a full page that
   becomes the partial last one is copied to the sequence's F16 staging
   (see "Per-channel keys"); nothing is allocated. Thread safety: mutates
   the cache. */
LLMKV_API llmkv_result llmkv_truncate(llmkv_cache* cache, llmkv_seq seq, uint32_t n_tokens);

/* ------------------------------------------------------------------------ */
/* Prefix index                                                             */
/* ------------------------------------------------------------------------ */

/* With desc.prefix_index set, the cache records the token id of every slot
   and keeps a radix tree over token ids whose nodes are pages: a node is a
   page, keyed by its parent node, its namespace and the tokens its slots
   hold. Requests that start with the same tokens share those pages instead
   of storing and computing them again.

   Sharing is page-granular, matching token-granular: a new sequence from a
   prompt shares every cached page its prompt covers whole, and when the
   match ends inside a cached page it shares that page too and holds only
   the matched slots; its first write there copies them into a fresh page
   (copy-on-write, as after llmkv_truncate). The match stops at most at
   n_prompt - 1 tokens, so the caller always computes the last prompt token
   (it needs that token's logits).

   Publishing: a sequence's full pages enter the index once their K and V
   are written for every layer (llmkv_put records that; device backends
   call llmkv_seq_mark_written). That happens at its next llmkv_reserve*,
   at llmkv_seq_publish and at llmkv_seq_free, so a conversation's next
   turn finds its own history. llmkv_seq_publish can also publish the
   partly filled last page (not with Q4C keys, whose last page lives in the
   sequence's staging). A page whose tokens equal a cached page under the
   same parent is not stored twice: the sequence switches to the cached
   page and its own copy is freed (its page table changes: rebuild
   batches, which a reserve requires anyway). Two rules for pages a fork
   also holds keep every sequence's cached pages one path from the root:
   such a page is not swapped for a cached twin (publishing stops there
   until the other holders let it go), and a partial page is published
   only when no other sequence holds it (a fork may hold more of it).

   Matching: full pages are found by exact key; where none matches, the
   cached pages under the last match that start with the next token are
   compared (the 64 most recently published of them) and the one sharing
   the most tokens wins, ties to the lowest page id.

   References: the index holds one reference on each of its pages (so a
   sequence writing into a cached page copies it first), each sequence one
   per page-table entry. A cached page that no sequence holds and no pin
   keeps is evictable. When a call needs a page and the free list is empty,
   the least recently used evictable page goes first; the order makes it a
   leaf (a page is never evicted before the pages below it), each eviction
   is O(1), and a page a live sequence holds or a pin keeps is never
   evicted. Capacity checks count evictable pages as available.

   Namespaces: every node belongs to the 64-bit namespace of the sequence
   that published it, and a lookup only ever compares nodes of its own
   namespace: tenants, adapters or model variants given distinct namespaces
   never share pages, and the time a lookup takes does not depend on what
   another namespace has cached (only on how many of its pages collide in
   the hash table, never on their tokens). Sequences made by
   llmkv_seq_create are in namespace 0.

   Token ids are int32 values >= 0. Slots reserved without token ids
   (llmkv_reserve) hold "unknown": a page with an unknown slot is never
   published, and neither is any page after it. */

typedef int32_t llmkv_token;

/* A pin handle (slot and generation, like llmkv_seq). Zero is never valid. */
typedef struct llmkv_pin { uint32_t id; } llmkv_pin;

/* llmkv_reserve that also records the token ids of the new positions
   (tokens: n_tokens ids; NULL records "unknown"), publishing the sequence's
   full, written pages first. LLMKV_ERR_UNSUPPORTED without a prefix index;
   LLMKV_ERR_INVALID_ARGUMENT for a negative id. Transactional like
   llmkv_reserve; may evict. Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_reserve_tokens(llmkv_cache* cache, llmkv_seq seq, const llmkv_token* tokens,
                                            uint32_t n_tokens);

/* llmkv_reserve_many with token ids: tokens[i] holds n_tokens[i] ids for
   seqs[i] (tokens itself or any tokens[i] may be NULL: unknown).
   Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_reserve_many_tokens(llmkv_cache* cache, const llmkv_seq* seqs,
                                                 const uint32_t* n_tokens, const llmkv_token* const* tokens,
                                                 uint32_t n_seqs);

/* Copies the token ids of positions [pos, pos + n_tokens) into `out`
   (-1 for unknown). LLMKV_ERR_OUT_OF_RANGE past the sequence's length;
   LLMKV_ERR_UNSUPPORTED without a prefix index.
   Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_seq_tokens(const llmkv_cache* cache, llmkv_seq seq, uint32_t pos, uint32_t n_tokens,
                                        llmkv_token* out);

/* Starts a sequence in namespace `ns` from a prompt: it shares the longest
   cached prefix of prompt[0, n_prompt - 1) (see above) and *n_cached
   receives its length, the positions the sequence already holds; the caller
   reserves (llmkv_reserve_tokens) and computes prompt[*n_cached, n_prompt).
   n_prompt 0 makes an empty sequence in `ns`. Counts the matched and missed
   tokens in the stats. Allocates no page (a partial match copies at the
   first write). Errors: LLMKV_ERR_UNSUPPORTED without a prefix index,
   LLMKV_ERR_SEQUENCE_TOO_LONG when n_prompt > desc.max_seq_len,
   LLMKV_ERR_TOO_MANY_SEQUENCES, LLMKV_ERR_INVALID_ARGUMENT (a negative id);
   nothing changes on error. Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_seq_create_prefix(llmkv_cache* cache, uint64_t ns, const llmkv_token* prompt,
                                               uint32_t n_prompt, llmkv_seq* out, uint32_t* n_cached);

/* Read-only lookup: *n_matched receives the length of the longest cached
   prefix of tokens[0, n_tokens) in namespace `ns` (all n_tokens may match;
   no cap). Holds no page, touches no LRU order, counts nothing.
   Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_prefix_match(const llmkv_cache* cache, uint64_t ns, const llmkv_token* tokens,
                                          uint32_t n_tokens, uint32_t* n_matched);

/* Publishes the sequence's full, written pages now, and with `partial`
   nonzero its written, partly filled last page too (skipped with Q4C keys,
   or when a cached page already holds those tokens). The sequence's next
   write into a published partial page copies it first.
   Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_seq_publish(llmkv_cache* cache, llmkv_seq seq, int partial);

/* Declares positions [0, n_tokens) of the sequence written for every layer,
   K and V (clamped to its length). For callers that write page bytes
   themselves: device backends, or code writing through llmkv_cache_pool.
   llmkv_put records its writes itself. Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_seq_mark_written(llmkv_cache* cache, llmkv_seq seq, uint32_t n_tokens);

/* Pins the cached pages that hold the longest cached prefix of
   tokens[0, n_tokens) in namespace `ns` (whole nodes only: a cached page is
   pinned when every token it holds is inside the match), so they are never
   evicted; *n_pinned receives the tokens they hold. Pinned pages stay
   cached when no sequence holds them and count against capacity. Pins
   nest: a page stays pinned until every pin over it is released. A match
   of 0 tokens gives a valid, empty pin. LLMKV_ERR_TOO_MANY_PINS when
   desc.max_pins pins are live; LLMKV_ERR_UNSUPPORTED without a prefix
   index. Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_prefix_pin(llmkv_cache* cache, uint64_t ns, const llmkv_token* tokens,
                                        uint32_t n_tokens, llmkv_pin* out, uint32_t* n_pinned);

/* Releases a pin; pages no other pin keeps and no sequence holds become
   evictable (most recently used). LLMKV_ERR_STALE_HANDLE for a released
   or invalid pin. Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_prefix_unpin(llmkv_cache* cache, llmkv_pin pin);

/* Evicts up to max_pages evictable pages, least recently used first
   (UINT32_MAX: all); *n_evicted (may be NULL) receives how many.
   Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_prefix_evict(llmkv_cache* cache, uint32_t max_pages, uint32_t* n_evicted);

/* ------------------------------------------------------------------------ */
/* Page-copy commands (metadata-only caches)                                */
/* ------------------------------------------------------------------------ */

/* One data movement decided by the manager: copy the first n_slots slots of
   every layer, K and V (scales included), from page src to page dst.
   n_slots == page_size means the whole page (one contiguous copy). */
typedef struct llmkv_copy_cmd {
    uint32_t src_page;
    uint32_t dst_page;
    uint32_t n_slots;
} llmkv_copy_cmd;

/* Moves up to max_cmds pending commands, oldest first, into `cmds`; *n_cmds
   receives how many. A device layer executes them, in order, before its
   next kernel that touches the pool. A host cache copies at once and never
   queues. Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_copy_cmds_take(llmkv_cache* cache, llmkv_copy_cmd* cmds,
                                            uint32_t max_cmds, uint32_t* n_cmds);

/* ------------------------------------------------------------------------ */
/* Batches                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct llmkv_batch llmkv_batch;

/* A read-only view of a built batch. Pointers stay valid until the batch is
   rebuilt or destroyed. Sequence i has seq_lens[i] positions of which its
   newest q_lens[i] are this step's query tokens, at rows
   [qo_indptr[i], qo_indptr[i+1]) of the step's token arrays. */
typedef struct llmkv_batch_info {
    uint32_t n_seqs;
    uint32_t n_tokens;              /* sum of q_lens: rows of the query array */
    uint32_t page_size;
    const int32_t* qo_indptr;       /* [n_seqs + 1] */
    const int32_t* seq_lens;        /* [n_seqs] */
    /* CSR page tables (FlashInfer): the pages of sequence i are
       kv_indices[kv_indptr[i] .. kv_indptr[i+1]); the last is filled to
       kv_last_page_len[i] slots (1..page_size; 0 for an empty sequence). */
    const int32_t* kv_indptr;       /* [n_seqs + 1] */
    const int32_t* kv_indices;      /* [kv_indptr[n_seqs]] */
    const int32_t* kv_last_page_len;/* [n_seqs] */
    /* Padded block table (vLLM, FlashAttention): row i holds the pages of
       sequence i, then zeros up to block_table_stride entries. */
    const int32_t* block_table;     /* [n_seqs][block_table_stride] */
    uint32_t block_table_stride;
    /* Slot mapping (vLLM): the cache slot of every query token, as
       page * page_size + slot, in the order of the rows. */
    const int64_t* slot_mapping;    /* [n_tokens] */
    const int32_t* positions;       /* [n_tokens]: position of every query row */
    uint64_t build;                 /* counts this batch's builds (failed ones too): a
                                       copy of the tables (a device upload) is current
                                       while this value is unchanged */
} llmkv_batch_info;

/* Creates a batch able to describe up to max_seqs sequences and max_tokens
   query tokens of `cache` (every table entry is sized up front; building
   never allocates). Owned by the caller (llmkv_batch_destroy) and tied to
   the cache, which must outlive it. Thread safety: read-only on the
   cache. */
LLMKV_API llmkv_result llmkv_batch_create(const llmkv_cache* cache, uint32_t max_seqs,
                                          uint32_t max_tokens, llmkv_batch** out);

/* Releases a batch. NULL is ignored. */
LLMKV_API void llmkv_batch_destroy(llmkv_batch* batch);

/* Describes one step: sequence seqs[i] receives q_lens[i] query tokens (its
   newest positions, already reserved; 0 allowed, at most its length). A
   sequence may appear once only. On failure the batch is left empty
   (n_seqs 0). Thread safety: reads the cache; the batch is mutated. */
LLMKV_API llmkv_result llmkv_batch_build(llmkv_batch* batch, const llmkv_seq* seqs,
                                         const uint32_t* q_lens, uint32_t n_seqs);

/* LLMKV_OK while no sequence of the batch has changed since it was built
   (reserve, put's copy-on-write, fork, truncate and free all change one);
   LLMKV_ERR_STALE_BATCH otherwise. Kernels call this before they read.
   Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_batch_check(const llmkv_batch* batch);

/* The cache a batch was created for (NULL for a NULL batch), so a device
   layer can refuse another cache's batch. Thread safety: read-only. */
LLMKV_API const llmkv_cache* llmkv_batch_cache(const llmkv_batch* batch);

/* Fills `info` with views of the batch's arrays. Returns
   LLMKV_ERR_STALE_BATCH (and leaves info zeroed) when llmkv_batch_check
   would. Thread safety: read-only. */
LLMKV_API llmkv_result llmkv_batch_get(const llmkv_batch* batch, llmkv_batch_info* info);

/* ------------------------------------------------------------------------ */
/* Persistence: save, load, checkpoints, sequence export and import          */
/* ------------------------------------------------------------------------ */

/* Format of every file and buffer these calls write: docs/FORMAT.md.
   In short: a 64-byte header (magic, format version, kind, byte order),
   sections each with its own CRC-32C, and an end record with the file's
   identity. Little-endian; big-endian hosts get LLMKV_ERR_UNSUPPORTED.

   Files are written crash-safely: to "<path>.tmp" (which must be on the
   same file system; one writer per path at a time), flushed with fsync,
   renamed over `path`, and the directory flushed. A save that fails before
   the rename (full disk, I/O error, a killed process) leaves the previous
   file at `path` as it was and removes the temporary when it can; if only
   the final directory flush fails, the call returns LLMKV_ERR_IO with the
   new file in place.

   Loading validates every field and checksum before anything is handed to
   the caller or changed: a corrupt, truncated or crafted input returns
   LLMKV_ERR_BAD_FORMAT (a newer major format version: LLMKV_ERR_VERSION;
   a valid file of the wrong kind, such as a sequence export given to a
   cache load or a whole cache given to an import: LLMKV_ERR_MISMATCH),
   and the logger says what was wrong. */

#define LLMKV_FORMAT_MAJOR 1
#define LLMKV_FORMAT_MINOR 0

/* File access, for platforms without POSIX files or to inject faults. Every
   function returns 0 on success and nonzero on failure (the call then
   fails with LLMKV_ERR_IO). open_* return a handle or NULL. NULL ops (or
   a NULL member) means the POSIX default (LLMKV_ERR_UNSUPPORTED when built
   with LLMKV_NO_FILE_IO or on a non-POSIX system). */
typedef struct llmkv_file_ops {
    void* (*open_write)(void* user, const char* path);      /* create or truncate */
    int (*write)(void* user, void* file, const void* data, size_t n); /* all n bytes */
    int (*sync)(void* user, void* file);                     /* data on stable storage */
    int (*close)(void* user, void* file);                    /* also after failures; a failure
                                                                closing a file that was read is
                                                                ignored (all of it was read and
                                                                checked by then) */
    int (*rename)(void* user, const char* from, const char* to); /* atomic replace */
    int (*sync_dir)(void* user, const char* path);           /* the directory holding path */
    int (*remove)(void* user, const char* path);
    void* (*open_read)(void* user, const char* path);
    int (*read)(void* user, void* file, void* data, size_t n, size_t* got); /* *got < n: end of file */
    void* user;
} llmkv_file_ops;

/* Flags of the whole-cache saves. */
enum {
    /* After a successful save, the cache remembers it as its latest
       checkpoint: the next LLMKV_SAVE_INCREMENTAL builds on it. */
    LLMKV_SAVE_CHECKPOINT = 1,
    /* Write only the pages written or newly taken since the latest
       checkpoint (plus all metadata, which is small); implies
       LLMKV_SAVE_CHECKPOINT. LLMKV_ERR_INVALID_ARGUMENT without a previous
       checkpoint. Restore by loading the base followed by its increments
       in order. Writes that bypass the API (through llmkv_cache_pool) are
       not seen. */
    LLMKV_SAVE_INCREMENTAL = 2
};

/* Bytes llmkv_cache_save_mem would write with `flags` (the cache as it is
   now). Thread safety: counts as a mutating call. */
LLMKV_API llmkv_result llmkv_cache_save_size(llmkv_cache* cache, uint32_t flags, uint64_t* bytes);

/* Writes the whole cache into `buffer` (size bytes): configuration, every
   page a sequence or the prefix index holds (each once, however shared),
   page tables, sequence slots and handles, token ids, the prefix index
   with its LRU order and pins, pending copy commands. A metadata-only
   cache saves everything but page bytes (the device owns those). *written
   (may be NULL) receives the bytes used. LLMKV_ERR_BUFFER_TOO_SMALL when
   size < llmkv_cache_save_size. Does not change the cache, except that
   a checkpoint save resets which pages count as changed.
   Thread safety: counts as a mutating call, and no llmkv_put may run on
   the cache meanwhile (its bytes would be torn). */
LLMKV_API llmkv_result llmkv_cache_save_mem(llmkv_cache* cache, uint32_t flags, void* buffer, size_t size,
                                            size_t* written);

/* llmkv_cache_save_mem to a file, crash-safely (see above). `ops` may be
   NULL. LLMKV_ERR_IO (the logger names the step) on any I/O failure.
   Thread safety: as llmkv_cache_save_mem. */
LLMKV_API llmkv_result llmkv_cache_save_file(llmkv_cache* cache, uint32_t flags, const char* path,
                                             const llmkv_file_ops* ops);

/* How to load: everything not saved in a file. Zero-initialise. */
typedef struct llmkv_load_desc {
    llmkv_allocator allocator;      /* for the new cache; default LLMKV_MALLOC */
    llmkv_logger logger;            /* says why a load failed; default silent */
    const llmkv_file_ops* file_ops; /* file loads; NULL: POSIX */
    uint64_t max_bytes;             /* refuse inputs whose cache would take more
                                       memory than this (LLMKV_ERR_OUT_OF_MEMORY);
                                       0: no limit. Set it for untrusted input. */
} llmkv_load_desc;

/* Creates a cache from a saved whole cache (buffers[0]) and, after it, the
   incremental checkpoints built on it, in order (buffers[1 .. n)). The new
   cache has the saved configuration, and every saved sequence handle and
   pin handle is valid in it with the same meaning: the same gathers,
   attention outputs, prefix matches and LRU order as the cache that was
   saved. It remembers the last file as its latest checkpoint. `ld` may be
   NULL. Nothing is created on failure: LLMKV_ERR_INVALID_ARGUMENT (n = 0,
   a NULL pointer), LLMKV_ERR_BAD_FORMAT (including a buffer too short for
   a header), LLMKV_ERR_VERSION, LLMKV_ERR_MISMATCH (an increment that does
   not build on the file before it, or an input of the wrong kind: an
   increment first, a whole cache later, a sequence export anywhere),
   LLMKV_ERR_OUT_OF_MEMORY, LLMKV_ERR_UNSUPPORTED
   (a thread-safe cache under LLMKV_NO_THREADS, or a big-endian host).
   Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_cache_load_mem(const void* const* buffers, const size_t* sizes, uint32_t n,
                                            const llmkv_load_desc* ld, llmkv_cache** out);

/* llmkv_cache_load_mem from files, read in one pass straight into the new
   cache. LLMKV_ERR_IO when a file cannot be opened or read. */
LLMKV_API llmkv_result llmkv_cache_load_file(const char* const* paths, uint32_t n, const llmkv_load_desc* ld,
                                             llmkv_cache** out);

/* Bytes llmkv_seq_export would write for `seq`. Thread safety: as
   llmkv_seq_export. */
LLMKV_API llmkv_result llmkv_seq_export_size(llmkv_cache* cache, llmkv_seq seq, uint64_t* bytes);

/* Writes one sequence, self-contained, into `buffer`: the shape and storage
   types of the cache, its length, namespace and token ids (prefix index),
   which positions are written, and the bytes of every page it holds (its
   shared pages too). *written (may be NULL) receives the bytes used.
   LLMKV_ERR_NO_PAGE_DATA on a metadata-only cache. Changes nothing.
   Thread safety: counts as a mutating call; puts on other sequences may
   run meanwhile (it reads only this sequence's pages), puts on this one
   may not. */
LLMKV_API llmkv_result llmkv_seq_export(llmkv_cache* cache, llmkv_seq seq, void* buffer, size_t size,
                                        size_t* written);

/* llmkv_seq_export to a file, crash-safely. Thread safety: as
   llmkv_seq_export. */
LLMKV_API llmkv_result llmkv_seq_export_file(llmkv_cache* cache, llmkv_seq seq, const char* path,
                                             const llmkv_file_ops* ops);

/* Creates a new sequence in a running cache from an exported one (*out).
   The cache may differ in capacity, page size and storage types, but not
   in n_layers, n_kv_heads or head_dim (LLMKV_ERR_MISMATCH):
     - same page size and types: page bytes are copied as they are
       (bit-identical gathers);
     - otherwise the vectors are converted through F32 and stored with
       llmkv_put's rounding (for example F16 pages into a Q8 cache).
   With a prefix index in the cache and token ids in the export, the
   leading whole pages whose tokens the cache already holds in the same
   namespace are shared instead of stored again (*n_shared, may be NULL,
   receives the positions they hold), and the new sequence's full pages are
   published. All or nothing: LLMKV_ERR_BAD_FORMAT, LLMKV_ERR_VERSION,
   LLMKV_ERR_MISMATCH, LLMKV_ERR_SEQUENCE_TOO_LONG, LLMKV_ERR_OUT_OF_PAGES,
   LLMKV_ERR_TOO_MANY_SEQUENCES, LLMKV_ERR_OUT_OF_MEMORY and
   LLMKV_ERR_NO_PAGE_DATA leave the cache as it was. Memory: a conversion
   restores the export into a temporary private cache first (from the
   cache's allocator, as large as the export's pages), then moves it page
   by page; a same-configuration import needs 8 KiB.
   Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_seq_import(llmkv_cache* cache, const void* data, size_t size, llmkv_seq* out,
                                        uint32_t* n_shared);

/* llmkv_seq_import from a file (read whole into a temporary buffer from
   the cache's allocator). Thread safety: mutates the cache. */
LLMKV_API llmkv_result llmkv_seq_import_file(llmkv_cache* cache, const char* path, const llmkv_file_ops* ops,
                                             llmkv_seq* out, uint32_t* n_shared);

/* ------------------------------------------------------------------------ */
/* Statistics, planning, checking                                           */
/* ------------------------------------------------------------------------ */

typedef struct llmkv_stats {
    uint32_t n_pages_total;
    uint32_t n_pages_free;      /* on the free list (evictable pages not included) */
    uint32_t n_pages_used;      /* held by at least one sequence */
    uint32_t n_pages_shared;    /* held by more than one sequence */
    uint32_t n_seqs;            /* live sequences */
    uint32_t n_pending_copies;  /* metadata-only: queued copy commands */
    uint64_t page_bytes;
    uint64_t pool_bytes;        /* n_pages_total * page_bytes */
    uint64_t used_bytes;        /* n_pages_used * page_bytes */
    uint64_t metadata_bytes;    /* everything the cache holds besides pages and staging */
    uint64_t staging_bytes;     /* Q4C keys: the F16 staging of every sequence slot's
                                   last page (see "Per-channel keys"); else 0 */
    uint64_t n_tokens;          /* sum of sequence lengths (shared counted per sequence) */
    uint64_t n_slots_used;      /* distinct physical slots holding a position */
    uint64_t n_slots_unused;    /* slots in used pages that hold none */
    /* Prefix index (all 0 when desc.prefix_index is off). */
    uint32_t n_pages_cached;    /* pages in the prefix index (held or not) */
    uint32_t n_pages_evictable; /* cached pages no sequence holds and no pin keeps */
    uint32_t n_pages_pinned;    /* cached pages that a pin keeps */
    uint32_t n_pins;            /* live pins */
    uint64_t n_evictions;       /* pages evicted since creation */
    uint64_t prompt_tokens_matched; /* llmkv_seq_create_prefix: tokens found cached */
    uint64_t prompt_tokens_missed;  /* ... and tokens the caller had to compute */
    double hit_rate;            /* matched / (matched + missed); 0 before any prompt */
} llmkv_stats;

/* Fills `out`. O(pages + page-table entries). Changes no state, but uses
   the cache's scratch memory (counting distinct slots needs a mark per
   page, and the cache allocates nothing after creation).
   Thread safety: counts as a mutating call. */
LLMKV_API llmkv_result llmkv_cache_stats(llmkv_cache* cache, llmkv_stats* out);

/* Page bytes that n_tokens tokens of one sequence occupy under `desc`
   (whole pages: ceil(n_tokens / page_size) * page_bytes).
   Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_plan_bytes(const llmkv_desc* desc, uint64_t n_tokens, uint64_t* bytes);

/* Tokens of one sequence that fit in `bytes` of pages under `desc`
   (floor(bytes / page_bytes) * page_size). Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_plan_tokens(const llmkv_desc* desc, uint64_t bytes, uint64_t* n_tokens);

/* Shape of a well-known model, from its published configuration. */
typedef struct llmkv_model_preset {
    const char* name;        /* e.g. "llama-3-8b" */
    uint32_t n_layers;
    uint32_t n_q_heads;
    uint32_t n_kv_heads;
    uint32_t head_dim;
    uint32_t max_seq_len;    /* the model's trained context length */
} llmkv_model_preset;

/* The preset table (static, read-only) and its length in *count.
   Thread safety: any thread. */
LLMKV_API const llmkv_model_preset* llmkv_model_presets(uint32_t* count);

/* The preset whose name matches (ASCII case-insensitive), or NULL.
   Thread safety: any thread. */
LLMKV_API const llmkv_model_preset* llmkv_model_preset_find(const char* name);

/* Sets n_layers, n_kv_heads and head_dim of `desc` from the named preset,
   leaving every other field as it is. LLMKV_ERR_INVALID_ARGUMENT for an
   unknown name. Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_desc_from_preset(llmkv_desc* desc, const char* name);

/* Verifies every internal invariant: reference counts against the page
   tables, the free list (no duplicates, only unreferenced pages, free + used
   = total), sequence slots and generations, each page table's length and
   page ids, the copy queue. Returns LLMKV_ERR_CORRUPT with a description
   in `message` (capacity message_size; may be NULL) on the first violation.
   O(pages + table entries). Changes no state, but recounts references in
   the cache's scratch memory. Thread safety: counts as a mutating call. */
LLMKV_API llmkv_result llmkv_cache_check(llmkv_cache* cache, char* message, size_t message_size);

/* ------------------------------------------------------------------------ */
/* CPU attention                                                            */
/* ------------------------------------------------------------------------ */

/* CPU code paths. x86 chooses at run time (cpuid + xgetbv), so one binary
   runs on every x86-64 machine; AArch64 always has NEON. AUTO prefers
   AVX512_BF16 on AMD CPUs, then AVX512_VNNI (every other CPU with VNNI,
   Intel's with AVX512_BF16 included: there the vdpbf16ps kernels read
   BF16 1.6x slower than the FMA kernels), then AVX512, AVX2, NEON,
   scalar. docs/DESIGN.md ("Kernels") has the measurements. */
typedef enum llmkv_cpu_path {
    LLMKV_CPU_PATH_AUTO = 0,    /* the best supported; env LLMKV_CPU_PATH=scalar|avx2|avx512|neon|avx512bf16|avx512vnni
                                   overrides */
    LLMKV_CPU_PATH_SCALAR = 1,  /* portable C: the reference every other path is tested against */
    LLMKV_CPU_PATH_AVX2 = 2,    /* AVX2 + FMA + F16C */
    LLMKV_CPU_PATH_AVX512 = 3,  /* AVX-512 F/BW/VL/DQ (F32 arithmetic for every storage type) */
    LLMKV_CPU_PATH_NEON = 4,    /* AArch64 Advanced SIMD */
    LLMKV_CPU_PATH_AVX512_BF16 = 5, /* AVX-512 plus AVX512-BF16 and AVX512-VNNI: BF16 K and V use
                                   vdpbf16ps dot products (the query split into two BF16 parts,
                                   the softmax weights rounded to BF16, F32 accumulation); Q4
                                   keys with head_dim a multiple of 128 use vpdpbusd against
                                   the query rounded to int8 per row (q_int =
                                   rint(q * 127 / max|q|), q the scaled query); other storage
                                   types as LLMKV_CPU_PATH_AVX512 */
    LLMKV_CPU_PATH_AVX512_VNNI = 6 /* AVX-512 plus AVX512-VNNI: Q4 keys as LLMKV_CPU_PATH_AVX512_BF16
                                   scores them (vpdpbusd, the query rounded to int8 per row);
                                   every other storage type, BF16 included, as
                                   LLMKV_CPU_PATH_AVX512 */
} llmkv_cpu_path;
#define LLMKV_CPU_PATH_LAST LLMKV_CPU_PATH_AVX512_VNNI /* the highest path value */

/* 1 when this build and this machine can run `path` (AUTO: always).
   Thread safety: any thread. */
LLMKV_API int llmkv_cpu_path_supported(llmkv_cpu_path path);

/* The path AUTO resolves to: LLMKV_CPU_PATH if set to a supported path,
   else the best the machine supports. A cache makes this choice once, when
   it is created (cpuid is slow under virtualisation), and its attention
   calls use that. Thread safety: any thread. */
LLMKV_API llmkv_cpu_path llmkv_cpu_path_auto(void);

/* "scalar", "avx2", "avx512", "neon", "avx512bf16" or "auto"; "?" for others. */
LLMKV_API const char* llmkv_cpu_path_name(llmkv_cpu_path path);

/* One attention call over a batch, for one layer. Query row r of the batch
   (sequence i owns rows [qo_indptr[i], qo_indptr[i+1])) is at position
   positions[r]; with causal masking it sees keys at positions <= its own,
   and with a window w > 0 only those > position - w as well. */
typedef struct llmkv_attn_desc {
    uint32_t layer;         /* < n_layers */
    uint32_t n_q_heads;     /* required: a multiple of the cache's n_kv_heads; query
                               head h reads KV head h / (n_q_heads / n_kv_heads) */
    const float* q;         /* [n_tokens][n_q_heads][head_dim] F32, 4-byte aligned */
    size_t q_stride;        /* bytes between token rows; 0: packed */
    float* out;             /* [n_tokens][n_q_heads][head_dim]; may not overlap q */
    size_t out_stride;      /* bytes between token rows; 0: packed */
    float* lse;             /* optional [n_tokens][n_q_heads]: log(sum(exp(logit))) of
                               each row's final logits (natural log; -inf when the row
                               sees no key, and then its output is zero) */
    float scale;            /* logit = scale * q.k; 0: 1 / sqrt(head_dim) */
    float softcap;          /* > 0: logit = softcap * tanh(logit / softcap); 0: off */
    uint32_t window;        /* sliding window in tokens; 0: off */
    int non_causal;         /* 1: every row sees every key of its sequence */
    llmkv_cpu_path path;    /* AUTO by default */
} llmkv_attn_desc;

/* A small pool of worker threads (pthreads) for llmkv_attend. It also owns
   the workspace split-K partial results need, grown on demand (the only
   allocation an attention call can make). */
typedef struct llmkv_threadpool llmkv_threadpool;

/* Starts n_threads - 1 workers (the calling thread is the n-th); n_threads
   1..256. `allocator` may be NULL (LLMKV_MALLOC). Returns
   LLMKV_ERR_UNSUPPORTED for n_threads > 1 when built with LLMKV_NO_THREADS.
   Thread safety: any thread; one llmkv_attend at a time per pool. */
LLMKV_API llmkv_result llmkv_threadpool_create(uint32_t n_threads, const llmkv_allocator* allocator,
                                               llmkv_threadpool** out);

/* Stops the workers and frees the pool. NULL is ignored. */
LLMKV_API void llmkv_threadpool_destroy(llmkv_threadpool* pool);

/* How long a thread of the pool polls before it sleeps: a worker, for the
   next call after finishing its part of one; the caller, for the workers
   to finish. Waking a sleeping thread costs tens of microseconds (more on
   virtual machines), about what a decode step over a short context takes,
   so polling is what makes small calls faster on two threads than on one.
   A worker that wakes late is not waited for: the work is handed out item
   by item, and the threads present take it all (the results do not depend
   on which thread computes what). The price is CPU time: after each call,
   each worker keeps a core busy for up to the window, which an engine
   running other threads on the same cores between calls may not want.
   A pool with more threads than the machine has cores should not poll
   (window 0): its polling threads take turns the working ones need.
   A call with little work (its rows times the keys they see, summed, under
   4096: about 30 us of AVX-512 decode) runs on the caller alone, with the
   same units and results as on the whole pool.
   microseconds: 0 (never poll: sleep at once) .. 1000000; the default is
   50. The window is approximate: on x86 it is measured with the time
   stamp counter taken as 3 GHz (0.75x to 1.5x on current machines); on
   compilers other than GCC and Clang the pool never polls.
   Returns LLMKV_ERR_INVALID_ARGUMENT for a NULL pool or a longer window.
   Thread safety: not during an llmkv_attend on the same pool. */
LLMKV_API llmkv_result llmkv_threadpool_set_spin(llmkv_threadpool* pool, uint32_t microseconds);

/* Computes attention for every query row of the batch, reading K/V straight
   from the pages. pool NULL: on the calling thread alone. The work split
   depends only on the batch and the thread count, so for a given count the
   results are bit-for-bit reproducible.
   Returns LLMKV_ERR_STALE_BATCH if the batch no longer matches the cache,
   LLMKV_ERR_INVALID_ARGUMENT for a bad descriptor (n_q_heads not a multiple
   of n_kv_heads, NULL q/out, a batch of another cache), LLMKV_ERR_OUT_OF_RANGE
   for a layer past the end, LLMKV_ERR_MISALIGNED for q/out/lse or strides not
   4-byte aligned, LLMKV_ERR_BUFFER_TOO_SMALL for strides shorter than a row,
   LLMKV_ERR_NO_PAGE_DATA on a metadata-only cache, LLMKV_ERR_UNSUPPORTED for
   a path this machine cannot run. Nothing is written on error.
   Uses about 110 KiB of the calling thread's stack (so do llmkv_attend_part
   and its workers); allocates only as the pool's workspace grows.
   Thread safety: reads the cache (concurrent attends on one cache are fine
   as long as nothing mutates it); the pool runs one call at a time. */
LLMKV_API llmkv_result llmkv_attend(const llmkv_cache* cache, const llmkv_batch* batch,
                                    const llmkv_attn_desc* desc, llmkv_threadpool* pool);

/* For an engine's own thread pool: nth threads each call llmkv_attend_part
   with their ith (0..nth-1), then, once all have returned (a barrier),
   each calls llmkv_attend_merge with the same arguments. The workspace,
   shared by all of them, must hold the bytes llmkv_attend_workspace_size
   reports for this batch, descriptor and nth (0 when nothing is split). */
LLMKV_API llmkv_result llmkv_attend_workspace_size(const llmkv_cache* cache, const llmkv_batch* batch,
                                                   const llmkv_attn_desc* desc, uint32_t nth, size_t* bytes);
LLMKV_API llmkv_result llmkv_attend_part(const llmkv_cache* cache, const llmkv_batch* batch,
                                         const llmkv_attn_desc* desc, uint32_t ith, uint32_t nth,
                                         void* workspace, size_t workspace_size);
LLMKV_API llmkv_result llmkv_attend_merge(const llmkv_cache* cache, const llmkv_batch* batch,
                                          const llmkv_attn_desc* desc, uint32_t ith, uint32_t nth,
                                          void* workspace, size_t workspace_size);

/* ------------------------------------------------------------------------ */
/* Element conversion (scalar, round-to-nearest-even; NaN stays NaN)         */
/* ------------------------------------------------------------------------ */

LLMKV_API uint16_t llmkv_f32_to_f16(float x);
LLMKV_API float llmkv_f16_to_f32(uint16_t h);
LLMKV_API uint16_t llmkv_f32_to_bf16(float x);
LLMKV_API float llmkv_bf16_to_f32(uint16_t h);

/* Bytes of one element of a type (DEFAULT: F16's): 4, 2, 2 for F32, F16,
   BF16; 1 for Q8 and FP8 (data only, see llmkv_vector_bytes); 0 for Q4
   (two elements per byte) and for an unknown value.
   Thread safety: any thread. */
LLMKV_API uint32_t llmkv_dtype_size(llmkv_dtype dtype);

/* Lower-case name of a type ("f32", "f16", "bf16", "q8", "q4", "fp8",
   "q4c"), or "?". */
LLMKV_API const char* llmkv_dtype_name(llmkv_dtype dtype);

/* Storage of one head vector of n elements (1..512) in type `dtype`:
   *data_bytes of elements and *scale_bytes of scales (0 for F32, F16 and
   BF16; Q8: 2 per group of 32; Q4: 4 per group; FP8: 4). Either output may
   be NULL. Returns LLMKV_ERR_INVALID_ARGUMENT for a bad type or n (outputs
   then 0). Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_vector_bytes(llmkv_dtype dtype, uint32_t n, uint32_t* data_bytes,
                                          uint32_t* scale_bytes);

/* Stores n (1..512) floats x as one head vector of type `dtype`: its
   elements to `data`, its scales to `scales` (NULL allowed for the float
   types), sized by llmkv_vector_bytes. This is exactly what llmkv_put does
   to each head vector; external kernels and tests can rely on it.
     F32/F16/BF16: llmkv_f32_to_* of each element.
     Q8: per group g of 32 elements (the last may be shorter), with a = the
       largest |x| of its finite elements (0 if none): scale
       s = f16(min(a / 127, 65504)) (so |x| up to about 8.3e6 is
       representable; more saturates), stored as F16 bits; codes
       c = rint(clamp(x * (1/s), -127, 127)) (0 when s is 0).
     Q4: per group of 32: lo, hi = the smallest and largest finite element
       (0, 0 if none); minimum m = f16(clamp(lo, -65504, 65504)), scale
       s = f16(clamp((hi - m) / 15, 0, 65504)), stored as F16 pairs
       (s, m) per group; codes c = rint(clamp((x - m) * (1/s), 0, 15)), two
       per byte, element 2i in the low nibble of byte i (a final unused
       nibble is 0; codes are 0 when s is 0). Value: m + s c, one rounding.
     FP8: E4M3 with bias 7, no infinities (0x7f/0xff are NaN and never
       written), largest 448; with a the largest finite |x|, the F32 scale
       s = max(a / 448, FLT_MIN) (0 if a is 0) and codes
       e4m3(clamp(x * (1/s), -448, 448)), rounded to nearest even
       (subnormals m 2^-9; when s is 0 every code is a zero, 0x80 for a
       negative input). Value: e4m3 value times s.
   In every quantized type NaN is stored as 0 would be, +-infinity as the
   largest (smallest) value the group can hold, and neither affects the
   scales, which come from the finite elements only. Rounding is to
   nearest, ties to even, throughout; every SIMD path produces these exact
   bytes. Returns LLMKV_ERR_INVALID_ARGUMENT for a bad type, n or a NULL
   pointer that is needed. Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_quantize(llmkv_dtype dtype, const float* x, uint32_t n, void* data, void* scales);

/* The inverse of llmkv_quantize: n (1..512) values of one head vector of
   type `dtype` (data and scales as llmkv_quantize writes them) to floats.
   Returns LLMKV_ERR_INVALID_ARGUMENT for a bad type, n or a NULL pointer
   that is needed. Thread safety: any thread. */
LLMKV_API llmkv_result llmkv_dequantize(llmkv_dtype dtype, const void* data, const void* scales, uint32_t n,
                                        float* out);

/* Page bytes one token takes in a cache created from `desc` (page_bytes /
   page_size: every layer's K and V, every KV head, scales and padding
   included); 0 if desc is invalid. Thread safety: any thread. */
LLMKV_API double llmkv_bytes_per_token(const llmkv_desc* desc);

#ifdef __cplusplus
}
#endif
#endif /* LLMKV_H */

/* ======================================================================== */
/*                              IMPLEMENTATION                              */
/* ======================================================================== */
#ifdef LLMKV_IMPLEMENTATION
#ifndef LLMKV_IMPLEMENTATION_ONCE
#define LLMKV_IMPLEMENTATION_ONCE

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#if defined(LLMKV_MALLOC) && !defined(LLMKV_FREE)
#error "LLMKV_MALLOC and LLMKV_FREE must be defined together"
#endif
#if defined(LLMKV_FREE) && !defined(LLMKV_MALLOC)
#error "LLMKV_MALLOC and LLMKV_FREE must be defined together"
#endif
#ifndef LLMKV_MALLOC
#include <stdlib.h>
#define LLMKV_MALLOC(sz) malloc(sz)
#define LLMKV_FREE(p) free(p)
#endif

#ifndef LLMKV_ASSERT
#include <assert.h>
#define LLMKV_ASSERT(x) assert(x)
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* ------------------------------------------------------------------------ */
/* Limits and small helpers                                                 */
/* ------------------------------------------------------------------------ */

#define LLMKV__ALIGN 64u
#define LLMKV__MAX_HEAD_DIM 512u
#define LLMKV__MAX_PAGE_SIZE 1024u
#define LLMKV__MAX_LAYERS 65536u
#define LLMKV__MAX_KV_HEADS 65536u
#define LLMKV__MAX_SEQS 1048575u
#define LLMKV__MAX_PAGES 0x7fffffffu    /* page ids travel as int32 in batches */
#define LLMKV__MAX_LEN 0x7fffffffu      /* positions travel as int32 */
#define LLMKV__DEFAULT_PAGE_SIZE 16u
#define LLMKV__DEFAULT_MAX_SEQS 256u

static uint64_t llmkv__align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }
static uint32_t llmkv__div_up(uint32_t a, uint32_t b) { return a / b + (a % b != 0); }

static void llmkv__log(const llmkv_logger* logger, llmkv_log_level level, const char* fmt, ...) {
    char msg[256];
    va_list ap;
    if (!logger || !logger->fn) return;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    logger->fn(logger->user, level, msg);
}

/* ------------------------------------------------------------------------ */
/* Results, version, element types                                          */
/* ------------------------------------------------------------------------ */

LLMKV_API const char* llmkv_result_string(llmkv_result result) {
    switch (result) {
    case LLMKV_OK: return "LLMKV_OK: success";
    case LLMKV_ERR_INVALID_ARGUMENT: return "LLMKV_ERR_INVALID_ARGUMENT: a parameter is null, zero or out of its domain";
    case LLMKV_ERR_OUT_OF_RANGE: return "LLMKV_ERR_OUT_OF_RANGE: a layer, position or count past the end";
    case LLMKV_ERR_STALE_HANDLE: return "LLMKV_ERR_STALE_HANDLE: the sequence handle is freed or was never valid";
    case LLMKV_ERR_BUFFER_TOO_SMALL: return "LLMKV_ERR_BUFFER_TOO_SMALL: a caller buffer or stride is too small";
    case LLMKV_ERR_MISALIGNED: return "LLMKV_ERR_MISALIGNED: a caller buffer lacks the required alignment";
    case LLMKV_ERR_OUT_OF_MEMORY: return "LLMKV_ERR_OUT_OF_MEMORY: the allocator returned NULL";
    case LLMKV_ERR_OUT_OF_PAGES: return "LLMKV_ERR_OUT_OF_PAGES: not enough free pages";
    case LLMKV_ERR_TOO_MANY_SEQUENCES: return "LLMKV_ERR_TOO_MANY_SEQUENCES: every sequence slot is in use";
    case LLMKV_ERR_SEQUENCE_TOO_LONG: return "LLMKV_ERR_SEQUENCE_TOO_LONG: the sequence would pass max_seq_len";
    case LLMKV_ERR_COPY_QUEUE_FULL: return "LLMKV_ERR_COPY_QUEUE_FULL: the page-copy queue is full";
    case LLMKV_ERR_BATCH_FULL: return "LLMKV_ERR_BATCH_FULL: more sequences or tokens than the batch holds";
    case LLMKV_ERR_TOO_MANY_PINS: return "LLMKV_ERR_TOO_MANY_PINS: every pin slot is in use";
    case LLMKV_ERR_STALE_BATCH: return "LLMKV_ERR_STALE_BATCH: a sequence changed after the batch was built";
    case LLMKV_ERR_NO_PAGE_DATA: return "LLMKV_ERR_NO_PAGE_DATA: the cache is metadata-only";
    case LLMKV_ERR_CORRUPT: return "LLMKV_ERR_CORRUPT: an internal invariant does not hold";
    case LLMKV_ERR_IO: return "LLMKV_ERR_IO: a file could not be opened, written, flushed, renamed or read";
    case LLMKV_ERR_BAD_FORMAT: return "LLMKV_ERR_BAD_FORMAT: the saved data is corrupt, truncated or not llmkv's";
    case LLMKV_ERR_VERSION: return "LLMKV_ERR_VERSION: saved by a newer, incompatible format version";
    case LLMKV_ERR_MISMATCH: return "LLMKV_ERR_MISMATCH: the saved data does not fit this cache";
    case LLMKV_ERR_NO_DEVICE: return "LLMKV_ERR_NO_DEVICE: no usable GPU device";
    case LLMKV_ERR_DEVICE_OUT_OF_MEMORY: return "LLMKV_ERR_DEVICE_OUT_OF_MEMORY: too little device or pinned memory";
    case LLMKV_ERR_DEVICE: return "LLMKV_ERR_DEVICE: the GPU runtime reported an error";
    case LLMKV_ERR_UNSUPPORTED: return "LLMKV_ERR_UNSUPPORTED: not supported by this build or type";
    }
    return "LLMKV_ERR_?: unknown result code";
}

LLMKV_API const char* llmkv_version(void) { return LLMKV_VERSION_STRING; }

static float llmkv__bits_to_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static uint32_t llmkv__f32_to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

LLMKV_API uint16_t llmkv_f32_to_f16(float x) {
    uint32_t u = llmkv__f32_to_bits(x);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) /* inf stays inf; NaN stays a quiet NaN with its top payload */
        return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u | ((a >> 13) & 0x3ffu) : 0u));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* >= 65520 rounds to inf */
    if (a < 0x38800000u) {
        /* Below 2^-14: the result is subnormal. Adding 0.5 puts the f16 ulp
           (2^-24) at the float ulp, so the FPU rounds to nearest-even. */
        float f = llmkv__bits_to_f32(a) + 0.5f;
        return (uint16_t)(sign | (llmkv__f32_to_bits(f) - 0x3f000000u));
    }
    /* Normal: rebias the exponent (-112) and round to nearest-even on bit 13. */
    a += 0xc8000fffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | (a >> 13));
}

LLMKV_API float llmkv_f16_to_f32(uint16_t h) {
    uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
    uint32_t e = ((uint32_t)h >> 10) & 0x1fu, m = (uint32_t)h & 0x3ffu;
    if (e == 0) {
        float f = (float)m * (1.0f / 16777216.0f); /* m * 2^-24, exact */
        return llmkv__bits_to_f32(sign | llmkv__f32_to_bits(f));
    }
    if (e == 31) return llmkv__bits_to_f32(sign | 0x7f800000u | (m << 13));
    return llmkv__bits_to_f32(sign | ((e + 112u) << 23) | (m << 13));
}

LLMKV_API uint16_t llmkv_f32_to_bf16(float x) {
    uint32_t u = llmkv__f32_to_bits(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

LLMKV_API float llmkv_bf16_to_f32(uint16_t h) { return llmkv__bits_to_f32((uint32_t)h << 16); }

LLMKV_API uint32_t llmkv_dtype_size(llmkv_dtype dtype) {
    switch (dtype) {
    case LLMKV_DTYPE_DEFAULT: return 2;
    case LLMKV_DTYPE_F32: return 4;
    case LLMKV_DTYPE_F16: return 2;
    case LLMKV_DTYPE_BF16: return 2;
    case LLMKV_DTYPE_Q8: return 1;
    case LLMKV_DTYPE_Q4: return 0;
    case LLMKV_DTYPE_FP8: return 1;
    case LLMKV_DTYPE_Q4C: return 0;
    }
    return 0;
}

LLMKV_API const char* llmkv_dtype_name(llmkv_dtype dtype) {
    switch (dtype) {
    case LLMKV_DTYPE_DEFAULT: return "f16";
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

/* A type of caller buffers (and of float storage). */
static int llmkv__dtype_valid(llmkv_dtype t) {
    return t == LLMKV_DTYPE_F32 || t == LLMKV_DTYPE_F16 || t == LLMKV_DTYPE_BF16;
}

/* A quantized storage type. */
static int llmkv__dtype_quant(llmkv_dtype t) {
    return t == LLMKV_DTYPE_Q8 || t == LLMKV_DTYPE_Q4 || t == LLMKV_DTYPE_FP8;
}

/* Any storage type. */
/* Keys quantized per channel over a page (LLMKV_DTYPE_Q4C). */
static int llmkv__dtype_channel(llmkv_dtype t) { return t == LLMKV_DTYPE_Q4C; }

static int llmkv__dtype_storage(llmkv_dtype t) {
    return llmkv__dtype_valid(t) || llmkv__dtype_quant(t) || llmkv__dtype_channel(t);
}

/* Converts n elements between the plain float types. Same type: a copy. */
/* Vector conversion (x86 with F16C/AVX2): converts a prefix of the n
   elements, bit-identical to the scalar functions, and returns its length. */
static uint32_t llmkv__convert_simd(void* dst, llmkv_dtype dt, const void* src, llmkv_dtype st, uint32_t n);

/* Converts n elements; `simd` says the machine has F16C/AVX2 (the cache
   detected it at creation). */
static void llmkv__convert(void* dst, llmkv_dtype dt, const void* src, llmkv_dtype st, uint32_t n, int simd) {
    uint32_t i;
    if (dt == st) { memcpy(dst, src, (size_t)n * llmkv_dtype_size(st)); return; }
    if (simd) {
        uint32_t done = llmkv__convert_simd(dst, dt, src, st, n);
        dst = (unsigned char*)dst + (size_t)done * llmkv_dtype_size(dt);
        src = (const unsigned char*)src + (size_t)done * llmkv_dtype_size(st);
        n -= done;
    }
    if (st == LLMKV_DTYPE_F32) {
        const float* s = (const float*)src;
        uint16_t* d = (uint16_t*)dst;
        if (dt == LLMKV_DTYPE_F16) for (i = 0; i < n; ++i) d[i] = llmkv_f32_to_f16(s[i]);
        else                        for (i = 0; i < n; ++i) d[i] = llmkv_f32_to_bf16(s[i]);
        return;
    }
    {
        const uint16_t* s = (const uint16_t*)src;
        if (dt == LLMKV_DTYPE_F32) {
            float* d = (float*)dst;
            if (st == LLMKV_DTYPE_F16) for (i = 0; i < n; ++i) d[i] = llmkv_f16_to_f32(s[i]);
            else                        for (i = 0; i < n; ++i) d[i] = llmkv_bf16_to_f32(s[i]);
        } else {
            uint16_t* d = (uint16_t*)dst;
            if (st == LLMKV_DTYPE_F16) for (i = 0; i < n; ++i) d[i] = llmkv_f32_to_bf16(llmkv_f16_to_f32(s[i]));
            else                        for (i = 0; i < n; ++i) d[i] = llmkv_f32_to_f16(llmkv_bf16_to_f32(s[i]));
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Quantized storage (the formats are specified at llmkv_quantize)          */
/* ------------------------------------------------------------------------ */

#define LLMKV__QGROUP 32u /* elements per Q8 / Q4 group */

/* Bytes of the first n elements of a stored vector of type t (for Q4 a
   final odd element takes a whole byte). Also the byte offset of element n
   (even for Q4), so kernels call it with a constant t. */
static uint32_t llmkv__vec_data_bytes(llmkv_dtype t, uint32_t n) {
    return t == LLMKV_DTYPE_F32 ? 4 * n
         : t == LLMKV_DTYPE_F16 || t == LLMKV_DTYPE_BF16 ? 2 * n
         : t == LLMKV_DTYPE_Q4 || t == LLMKV_DTYPE_Q4C ? (n + 1) / 2 : n;
}

/* Bytes of one query row prepared for the VNNI kernels (llmkv__qint_prepare). */
static uint32_t llmkv__qint_row_bytes(uint32_t D) { return 2 * D + 64; }

/* Bytes of a Q4C (page, head) table: per 16 channels, 16 F16 scales then
   16 F16 minimums; the unused channels of the last block are zero. */
static uint32_t llmkv__channel_table_bytes(uint32_t n) { return (n + 15) / 16 * 64; }

static uint32_t llmkv__vec_scale_bytes(llmkv_dtype t, uint32_t n) {
    uint32_t g = (n + LLMKV__QGROUP - 1) / LLMKV__QGROUP;
    return t == LLMKV_DTYPE_Q8 ? 2 * g : t == LLMKV_DTYPE_Q4 ? 4 * g : t == LLMKV_DTYPE_FP8 ? 4 : 0;
}

static uint16_t llmkv__ld_u16(const unsigned char* p) { uint16_t v; memcpy(&v, p, 2); return v; }
static void llmkv__st_u16(unsigned char* p, uint16_t v) { memcpy(p, &v, 2); }
static float llmkv__ld_f32s(const unsigned char* p) { float v; memcpy(&v, p, 4); return v; }

static int llmkv__finite(float x) { return (llmkv__f32_to_bits(x) & 0x7f800000u) != 0x7f800000u; }

/* The Q8 scale of a group whose largest finite magnitude is a: stores its
   F16 bits to *s16 and returns 1/s (0 when s is 0). */
static float llmkv__q8_scale(float a, unsigned char* s16) {
    float s;
    a = a / 127.0f;
    llmkv__st_u16(s16, llmkv_f32_to_f16(a < 65504.0f ? a : 65504.0f));
    s = llmkv_f16_to_f32(llmkv__ld_u16(s16));
    return s > 0.0f ? 1.0f / s : 0.0f;
}

/* The Q4 scale and minimum of a group with finite extremes lo <= hi:
   stores (s, m) as F16 bits to sm[0..4), the minimum to *m, and returns
   1/s (0 when s is 0). */
static float llmkv__q4_scale(float lo, float hi, unsigned char* sm, float* m) {
    float s;
    lo = lo < -65504.0f ? -65504.0f : lo > 65504.0f ? 65504.0f : lo;
    llmkv__st_u16(sm + 2, llmkv_f32_to_f16(lo));
    *m = llmkv_f16_to_f32(llmkv__ld_u16(sm + 2));
    s = (hi - *m) / 15.0f;
    s = s < 0.0f ? 0.0f : s > 65504.0f ? 65504.0f : s;
    llmkv__st_u16(sm, llmkv_f32_to_f16(s));
    s = llmkv_f16_to_f32(llmkv__ld_u16(sm));
    return s > 0.0f ? 1.0f / s : 0.0f;
}

/* The FP8 scale of a vector whose largest finite magnitude is a: stores it
   to *s, returns 1/s (0 when s is 0). */
static float llmkv__fp8_scale(float a, unsigned char* sc) {
    float s = a > 0.0f ? (a / 448.0f > FLT_MIN ? a / 448.0f : FLT_MIN) : 0.0f;
    memcpy(sc, &s, 4);
    return s > 0.0f ? 1.0f / s : 0.0f;
}

/* (x - m) * inv with NaN inputs taken as 0, a NaN product (infinity times
   a zero scale) as 0, clamped to [lo, hi]. */
static float llmkv__q_arg(float x, float m, float inv, float lo, float hi) {
    float y;
    if (x != x) x = 0.0f;
    y = (x - m) * inv;
    if (y != y) y = 0.0f;
    return y < lo ? lo : y > hi ? hi : y;
}

/* E4M3 code of y, |y| <= 448, rounded to nearest even. */
static uint8_t llmkv__e4m3(float y) {
    uint32_t u = llmkv__f32_to_bits(y), sign = (u >> 24) & 0x80u, c;
    u &= 0x7fffffffu;
    if (u < 0x3c800000u) { /* below 2^-6: subnormal codes m 2^-9, m <= 8 */
        c = (uint32_t)rintf(llmkv__bits_to_f32(u) * 512.0f);
    } else {
        u += 0x7ffffu + ((u >> 20) & 1u);
        c = (u >> 20) - (120u << 3);
    }
    return (uint8_t)(sign | c);
}

static float llmkv__e4m3_value(uint8_t c) {
    uint32_t m = c & 0x7fu;
    float v = m < 8 ? (float)m * (1.0f / 512.0f) : llmkv__bits_to_f32((m << 20) + 0x3c000000u);
    return c & 0x80u ? -v : v;
}

/* Largest finite magnitude, and the finite extremes, of x[0 .. n). */
static float llmkv__amax_finite(const float* x, uint32_t n) {
    float a = 0.0f;
    uint32_t i;
    for (i = 0; i < n; ++i)
        if (llmkv__finite(x[i]) && fabsf(x[i]) > a) a = fabsf(x[i]);
    return a;
}

static void llmkv__range_finite(const float* x, uint32_t n, float* lo, float* hi) {
    float a = INFINITY, b = -INFINITY;
    uint32_t i;
    for (i = 0; i < n; ++i)
        if (llmkv__finite(x[i])) {
            a = x[i] < a ? x[i] : a;
            b = x[i] > b ? x[i] : b;
        }
    *lo = a <= b ? a : 0.0f;
    *hi = a <= b ? b : 0.0f;
}

/* The encoding of elements [i0, n) of a vector whose scales are already
   written (the scalar reference; SIMD paths encode a prefix and call this
   for the rest). inv and mins hold one entry per group, or for a Q4C key
   row one per element (its channels' scales). */
static void llmkv__encode_tail(llmkv_dtype t, const float* x, uint32_t i0, uint32_t n, unsigned char* data,
                               const float* inv, const float* mins) {
    uint32_t i;
    for (i = i0; i < n; ++i) {
        uint32_t g = i / LLMKV__QGROUP;
        if (t == LLMKV_DTYPE_Q8) {
            data[i] = (unsigned char)(int8_t)rintf(llmkv__q_arg(x[i], 0.0f, inv[g], -127.0f, 127.0f));
        } else if (t == LLMKV_DTYPE_Q4 || t == LLMKV_DTYPE_Q4C) { /* Q4C: per element */
            uint32_t e = t == LLMKV_DTYPE_Q4C ? i : g;
            uint32_t c = (uint32_t)rintf(llmkv__q_arg(x[i], mins[e], inv[e], 0.0f, 15.0f));
            if (i % 2 == 0) data[i / 2] = (unsigned char)c;
            else data[i / 2] = (unsigned char)(data[i / 2] | c << 4);
        } else {
            data[i] = llmkv__e4m3(llmkv__q_arg(x[i], 0.0f, inv[0], -448.0f, 448.0f));
        }
    }
}

/* Per group of 32 of x[0 .. n) (SIMD paths, defined with the kernels): the
   largest finite |x| (am, +0 when none) and the finite extremes (lo, hi;
   +inf, -inf when none) of the first `returned` whole groups. */
static uint32_t llmkv__group_stats_simd(const float* x, uint32_t n, float* am, float* lo, float* hi, uint32_t paths);

/* lo[i] = min(lo[i], x[i]), hi[i] = max(hi[i], x[i]) over the finite x[i]
   for a prefix of [0, n) (SIMD paths, defined with the kernels), exactly as
   the scalar loop (an equal value keeps the old one, so the first of +-0
   met stays); returns its length. */
static uint32_t llmkv__range_update_simd(const float* x, uint32_t n, float* lo, float* hi, uint32_t paths);

/* Writes the scales of a quantized vector; inv[g] (and mins[g] for Q4)
   receive each group's 1/s (and minimum). `paths`: as llmkv__encode_simd
   (0: scalar). The SIMD statistics are exact; only the sign of a zero
   extreme depends on the order of the elements, so a group with one takes
   the scalar pass, which defines it (the first zero met). */
static void llmkv__quant_scales(llmkv_dtype t, const float* x, uint32_t n, unsigned char* sc, float* inv, float* mins,
                                uint32_t paths) {
    float am[16], lo[16], hi[16], a = 0.0f;
    uint32_t g, i0, done = paths ? llmkv__group_stats_simd(x, n, am, lo, hi, paths) : 0;
    for (g = 0, i0 = 0; i0 < n; ++g, i0 += LLMKV__QGROUP) {
        uint32_t len = n - i0 < LLMKV__QGROUP ? n - i0 : LLMKV__QGROUP;
        if (g >= done || lo[g] == 0.0f || hi[g] == 0.0f) {
            am[g] = llmkv__amax_finite(x + i0, len);
            llmkv__range_finite(x + i0, len, &lo[g], &hi[g]);
        } else if (lo[g] > hi[g]) { /* no finite element */
            lo[g] = hi[g] = 0.0f;
        }
        a = am[g] > a ? am[g] : a;
        if (t == LLMKV_DTYPE_Q8) inv[g] = llmkv__q8_scale(am[g], sc + 2 * g);
        else if (t == LLMKV_DTYPE_Q4) inv[g] = llmkv__q4_scale(lo[g], hi[g], sc + 4 * g, &mins[g]);
    }
    if (t == LLMKV_DTYPE_FP8) inv[0] = llmkv__fp8_scale(a, sc);
}

/* Element i of a quantized vector. */
static float llmkv__q_value(llmkv_dtype t, const unsigned char* data, const unsigned char* sc, uint32_t i) {
    uint32_t g = i / LLMKV__QGROUP;
    if (t == LLMKV_DTYPE_Q8) return (float)(int8_t)data[i] * llmkv_f16_to_f32(llmkv__ld_u16(sc + 2 * g));
    if (t == LLMKV_DTYPE_Q4)
        return fmaf(llmkv_f16_to_f32(llmkv__ld_u16(sc + 4 * g)), (float)((data[i / 2] >> (4 * (i % 2))) & 15u),
                    llmkv_f16_to_f32(llmkv__ld_u16(sc + 4 * g + 2)));
    return llmkv__e4m3_value(data[i]) * llmkv__ld_f32s(sc);
}

/* Vector quantization (SIMD paths, defined with the kernels): encodes a
   prefix of the vector whose scales quant_scales wrote, bit-identical to
   llmkv__encode_tail, and returns its length. `paths`: the cache's
   supported CPU paths. */
static uint32_t llmkv__encode_simd(llmkv_dtype t, const float* x, uint32_t n, unsigned char* data, const float* inv,
                                   const float* mins, uint32_t paths);

/* Quantizes one head vector (n <= 512) with the fastest path in `paths`
   (0: scalar). */
static void llmkv__quantize_vec(llmkv_dtype t, const float* x, uint32_t n, unsigned char* data, unsigned char* sc,
                                uint32_t paths) {
    float inv[16], mins[16];
    uint32_t done;
    llmkv__quant_scales(t, x, n, sc, inv, mins, paths);
    done = paths ? llmkv__encode_simd(t, x, n, data, inv, mins, paths) : 0;
    llmkv__encode_tail(t, x, done, n, data, inv, mins);
}

static void llmkv__dequantize_vec(llmkv_dtype t, const unsigned char* data, const unsigned char* sc, uint32_t n,
                                  float* out) {
    uint32_t i;
    for (i = 0; i < n; ++i) out[i] = llmkv__q_value(t, data, sc, i);
}

LLMKV_API llmkv_result llmkv_vector_bytes(llmkv_dtype dtype, uint32_t n, uint32_t* data_bytes, uint32_t* scale_bytes) {
    int ok = llmkv__dtype_storage(dtype) && !llmkv__dtype_channel(dtype) && n >= 1 && n <= 512;
    if (data_bytes) *data_bytes = ok ? llmkv__vec_data_bytes(dtype, n) : 0;
    if (scale_bytes) *scale_bytes = ok ? llmkv__vec_scale_bytes(dtype, n) : 0;
    return ok ? LLMKV_OK : LLMKV_ERR_INVALID_ARGUMENT;
}

LLMKV_API llmkv_result llmkv_quantize(llmkv_dtype dtype, const float* x, uint32_t n, void* data, void* scales) {
    if (!x || !data || n < 1 || n > 512) return LLMKV_ERR_INVALID_ARGUMENT;
    if (llmkv__dtype_valid(dtype)) {
        llmkv__convert(data, dtype, x, LLMKV_DTYPE_F32, n, 0);
        return LLMKV_OK;
    }
    if (!llmkv__dtype_quant(dtype) || !scales) return LLMKV_ERR_INVALID_ARGUMENT;
    llmkv__quantize_vec(dtype, x, n, (unsigned char*)data, (unsigned char*)scales, 0);
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_dequantize(llmkv_dtype dtype, const void* data, const void* scales, uint32_t n,
                                        float* out) {
    if (!out || !data || n < 1 || n > 512) return LLMKV_ERR_INVALID_ARGUMENT;
    if (llmkv__dtype_valid(dtype)) {
        llmkv__convert(out, LLMKV_DTYPE_F32, data, dtype, n, 0);
        return LLMKV_OK;
    }
    if (!llmkv__dtype_quant(dtype) || !scales) return LLMKV_ERR_INVALID_ARGUMENT;
    llmkv__dequantize_vec(dtype, (const unsigned char*)data, (const unsigned char*)scales, n, out);
    return LLMKV_OK;
}

/* ------------------------------------------------------------------------ */
/* Allocation                                                               */
/* ------------------------------------------------------------------------ */

/* The fallback allocator over LLMKV_MALLOC: over-allocates and keeps the
   original pointer just below the aligned block. */
static void* llmkv__default_alloc(size_t size, size_t align, void* user) {
    unsigned char* raw;
    uintptr_t p;
    (void)user;
    if (size > (size_t)-1 - align - sizeof(void*)) return NULL;
    raw = (unsigned char*)LLMKV_MALLOC(size + align + sizeof(void*));
    if (!raw) return NULL;
    p = ((uintptr_t)raw + sizeof(void*) + align - 1) & ~(uintptr_t)(align - 1);
    memcpy((unsigned char*)p - sizeof(void*), &raw, sizeof(void*));
    return (void*)p;
}

static void llmkv__default_free(void* ptr, size_t size, void* user) {
    void* raw;
    (void)size; (void)user;
    if (!ptr) return;
    memcpy(&raw, (unsigned char*)ptr - sizeof(void*), sizeof(void*));
    LLMKV_FREE(raw);
}

/* The caller's allocator, or the LLMKV_MALLOC fallback when none is set
   (a may be NULL). */
static llmkv_allocator llmkv__allocator_or_default(const llmkv_allocator* a) {
    llmkv_allocator r;
    if (a && a->alloc) return *a;
    r.alloc = llmkv__default_alloc;
    r.free = llmkv__default_free;
    r.user = NULL;
    return r;
}

/* Carves aligned pieces out of one block, or measures them (base NULL). */
typedef struct llmkv__carver {
    unsigned char* base;
    uint64_t used;
} llmkv__carver;

static void* llmkv__carve(llmkv__carver* c, uint64_t bytes) {
    void* p;
    c->used = llmkv__align_up(c->used, LLMKV__ALIGN);
    p = c->base ? (void*)(c->base + c->used) : NULL;
    c->used += bytes;
    return p;
}

/* ------------------------------------------------------------------------ */
/* Descriptor and layout                                                    */
/* ------------------------------------------------------------------------ */

/* Validates the shape fields and fills their defaults into `d` (a copy).
   Capacity is resolved separately because it depends on the storage mode. */
static llmkv_result llmkv__desc_shape(const llmkv_desc* in, llmkv_desc* d) {
    const llmkv_logger* lg = &in->logger;
    *d = *in;
    if (d->n_layers == 0 || d->n_layers > LLMKV__MAX_LAYERS) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: n_layers must be 1..%u (got %u)", LLMKV__MAX_LAYERS, d->n_layers);
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    if (d->n_kv_heads == 0 || d->n_kv_heads > LLMKV__MAX_KV_HEADS) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: n_kv_heads must be 1..%u (got %u)", LLMKV__MAX_KV_HEADS, d->n_kv_heads);
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    if (d->head_dim == 0 || d->head_dim > LLMKV__MAX_HEAD_DIM) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: head_dim must be 1..%u (got %u)", LLMKV__MAX_HEAD_DIM, d->head_dim);
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    if (d->page_size == 0) d->page_size = LLMKV__DEFAULT_PAGE_SIZE;
    if (d->page_size > LLMKV__MAX_PAGE_SIZE) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: page_size must be 1..%u (got %u)", LLMKV__MAX_PAGE_SIZE, d->page_size);
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    if (d->k_dtype == LLMKV_DTYPE_DEFAULT) d->k_dtype = LLMKV_DTYPE_F16;
    if (d->v_dtype == LLMKV_DTYPE_DEFAULT) d->v_dtype = LLMKV_DTYPE_F16;
    if (!llmkv__dtype_storage(d->k_dtype) || !llmkv__dtype_storage(d->v_dtype)) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: unknown storage type (k %d, v %d)", (int)d->k_dtype, (int)d->v_dtype);
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    if (llmkv__dtype_channel(d->v_dtype)) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: q4c is a key type (values stay per token)");
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    if (d->storage != LLMKV_STORAGE_DEFAULT && d->storage != LLMKV_STORAGE_METADATA_ONLY) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: unknown storage mode %d", (int)d->storage);
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    if (d->storage == LLMKV_STORAGE_METADATA_ONLY && llmkv__dtype_channel(d->k_dtype)) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: q4c keys need host pages (not metadata-only)");
        return LLMKV_ERR_UNSUPPORTED;
    }
    if (d->max_seqs == 0) d->max_seqs = LLMKV__DEFAULT_MAX_SEQS;
    if (d->max_seqs > LLMKV__MAX_SEQS) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: max_seqs must be at most %u (got %u)", LLMKV__MAX_SEQS, d->max_seqs);
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    if (d->prefix_index) {
        d->prefix_index = 1;
        if (d->max_pins == 0) d->max_pins = 64;
        if (d->max_pins > 65536) {
            llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: max_pins must be 1..65536 (got %u)", d->max_pins);
            return LLMKV_ERR_INVALID_ARGUMENT;
        }
    } else {
        d->max_pins = 0;
    }
    d->thread_safe = d->thread_safe != 0;
#ifdef LLMKV_NO_THREADS
    if (d->thread_safe) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: thread_safe needs threads (built with LLMKV_NO_THREADS)");
        return LLMKV_ERR_UNSUPPORTED;
    }
#endif
    if (!d->allocator.alloc != !d->allocator.free) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: allocator needs both alloc and free");
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    return LLMKV_OK;
}

static void llmkv__part(llmkv_part_layout* p, llmkv_dtype t, const llmkv_desc* d, uint64_t offset) {
    memset(p, 0, sizeof *p);
    p->dtype = t;
    p->elem_bytes = llmkv_dtype_size(t);
    p->offset = offset;
    p->slot_stride = llmkv__vec_data_bytes(t, d->head_dim);
    p->head_stride = p->slot_stride * d->page_size;
    p->bytes = p->head_stride * d->n_kv_heads;
    p->scale_slot_stride = llmkv__vec_scale_bytes(t, d->head_dim);
    p->scale_head_stride = llmkv__dtype_channel(t) ? llmkv__channel_table_bytes(d->head_dim)
                                                   : p->scale_slot_stride * d->page_size;
    p->scale_bytes = p->scale_head_stride * d->n_kv_heads;
}

/* Page geometry of a validated descriptor: per layer, K data, V data, K
   scales, V scales, each 64-byte aligned. Cannot overflow: every factor is
   bounded (2^9 * 4 * 2^10 * 2^16 * 4 regions * 2^16 layers < 2^63). */
static void llmkv__layout(const llmkv_desc* d, llmkv_layout* l) {
    uint64_t end;
    memset(l, 0, sizeof *l);
    l->n_layers = d->n_layers;
    l->n_kv_heads = d->n_kv_heads;
    l->head_dim = d->head_dim;
    l->page_size = d->page_size;
    llmkv__part(&l->k, d->k_dtype, d, 0);
    llmkv__part(&l->v, d->v_dtype, d, llmkv__align_up(l->k.bytes, LLMKV__ALIGN));
    end = llmkv__align_up(l->v.offset + l->v.bytes, LLMKV__ALIGN);
    if (l->k.scale_bytes) {
        l->k.scale_offset = end;
        end = llmkv__align_up(end + l->k.scale_bytes, LLMKV__ALIGN);
    }
    if (l->v.scale_bytes) {
        l->v.scale_offset = end;
        end = llmkv__align_up(end + l->v.scale_bytes, LLMKV__ALIGN);
    }
    l->layer_stride = end;
    l->page_bytes = l->layer_stride * d->n_layers;
}

LLMKV_API double llmkv_bytes_per_token(const llmkv_desc* desc) {
    llmkv_desc d;
    llmkv_layout l;
    if (!desc || llmkv__desc_shape(desc, &d) != LLMKV_OK) return 0.0;
    llmkv__layout(&d, &l);
    return (double)l.page_bytes / (double)l.page_size;
}

LLMKV_API llmkv_result llmkv_layout_for(const llmkv_desc* desc, llmkv_layout* out) {
    llmkv_desc d;
    llmkv_result r;
    if (!desc || !out) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv__desc_shape(desc, &d);
    if (r != LLMKV_OK) return r;
    llmkv__layout(&d, out);
    return LLMKV_OK;
}

/* ------------------------------------------------------------------------ */
/* Cache structure                                                          */
/* ------------------------------------------------------------------------ */

#ifndef LLMKV_NO_THREADS
#include <pthread.h>
#endif

typedef struct llmkv__seq {
    uint32_t gen;       /* generation in the current handle; never 0 */
    uint32_t live;      /* 1 while a handle refers to this slot */
    uint32_t length;    /* positions held */
    uint32_t n_pages;   /* = ceil(length / page_size) */
    uint64_t epoch;     /* cache-unique stamp of the last change (batches compare it) */
    uint32_t next_free; /* free-slot FIFO link */
    uint32_t mark;      /* call stamp for duplicate detection */
    uint32_t n_pub;     /* prefix index: leading table pages that are full nodes on its path */
    uint32_t tok_gap;   /* prefix index: first position with an unknown token, or NO_SLOT */
    uint64_t ns;        /* prefix index: namespace it matches and publishes in */
} llmkv__seq;

/* A page's place in the prefix index (see "Prefix index" in the API): its
   parent page (LLMKV__NO_SLOT at the root), its namespace (always its
   parent's) and the tokens in its first ntok slots (ntok 0: not in the
   index). Full nodes are chained in the full-key hash table (parent, ns,
   all tokens), every node in the first-token table (parent, ns, first
   token); evictable nodes in the LRU list, oldest at lru_head.

   A node is two records. llmkv__key holds what a full-key lookup reads:
   16 bytes, four pages to a cache line, so the walk along a cached prompt
   reads its bucket and a quarter of a line per page and never the rest of
   the node. llmkv__node holds the rest. */
typedef struct llmkv__key {
    uint32_t parent;
    llmkv_token tok0;   /* its first token, inline: page size 1 never reads the token array */
    uint32_t hash_full; /* full nodes: bucket hash in the full-key table */
    uint32_t full_next; /* full nodes: next in that bucket's chain */
} llmkv__key;
typedef struct llmkv__node {
    uint32_t ntok, n_children, pins;
    uint32_t full_prev, first_next, first_prev;
    uint32_t lru_next, lru_prev;
    uint64_t ns;
    uint64_t chain; /* full nodes: hash state of the path (see llmkv__chain_step) */
} llmkv__node;      /* 48 bytes */

/* Handle ids of one kind of slot (sequences, pins): id = gen << bits | slot,
   with bits the fewest that index every slot and generations 1..gen_max
   (wrapping to 1, never 0, so the zero id is never valid). */
typedef struct llmkv__handles {
    uint32_t bits, gen_max;
} llmkv__handles;

static llmkv__handles llmkv__handles_for(uint32_t n_slots) {
    llmkv__handles h;
    for (h.bits = 1; ((uint32_t)1 << h.bits) < n_slots; ++h.bits) {}
    h.gen_max = (uint32_t)((((uint64_t)1) << (32 - h.bits)) - 1);
    return h;
}
static uint32_t llmkv__handle_id(llmkv__handles h, uint32_t gen, uint32_t slot) { return gen << h.bits | slot; }
static uint32_t llmkv__handle_slot(llmkv__handles h, uint32_t id) { return id & (((uint32_t)1 << h.bits) - 1); }
static uint32_t llmkv__handle_gen(llmkv__handles h, uint32_t id) { return id >> h.bits; }
static uint32_t llmkv__next_gen(llmkv__handles h, uint32_t gen) { return gen >= h.gen_max ? 1 : gen + 1; }

/* A pin: the deepest node it keeps (LLMKV__NO_SLOT for an empty pin). */
typedef struct llmkv__pin {
    uint32_t gen, live, node, next_free;
} llmkv__pin;

struct llmkv_cache {
    llmkv_desc desc;            /* effective: defaults filled, capacity resolved */
    llmkv_layout layout;
    llmkv_allocator alloc;
    void* meta_block;           /* allocation holding this struct and metadata */
    size_t meta_block_size;
    void* page_block;           /* allocation holding the pages (host mode, allocated) */
    size_t page_block_size;
    int in_caller_memory;       /* created by llmkv_cache_create_in: free nothing */

    unsigned char* pool;        /* page 0; NULL when metadata-only */
    uint32_t n_pages;
    uint32_t max_pages_per_seq; /* = ceil(max_seq_len / page_size) */
    uint32_t* refcount;         /* [n_pages] */
    uint32_t* free_pages;       /* [n_pages] stack; top at free_pages[n_free - 1] */
    uint32_t n_free;
    uint32_t* scratch;          /* [n_pages] for check and stats */

    llmkv__seq* seqs;           /* [max_seqs] */
    uint32_t* tables;           /* [max_seqs][max_pages_per_seq] */
    uint32_t n_live;
    uint32_t free_head, free_tail; /* free-slot FIFO (oldest freed reused last) */
    llmkv__handles seq_ids;     /* sequence handle ids */
    uint64_t epoch;
    uint32_t mark;

    uint32_t cpu_paths;         /* bit p: CPU path p runs here (detected at creation) */
    llmkv_cpu_path cpu_auto;    /* what LLMKV_CPU_PATH_AUTO means for this cache */
    llmkv_copy_cmd* copies;     /* ring [max_pending_copies]; metadata-only */
    uint32_t copy_cap, copy_head, copy_count;
    uint64_t meta_bytes;        /* metadata footprint, for stats */

    /* Checkpoints (host pools): dirty[p] is 1 when page p was taken or
       written since the latest checkpoint save, whose id is ckpt_id (0:
       none). One byte per page, so puts on distinct sequences never write
       the same byte. */
    unsigned char* dirty;
    uint64_t ckpt_id;

    /* Q4C keys only (else NULL): kfill[slot * n_layers + layer] is the first
       position of the page whose keys that slot holds at F16 in its
       staging area (llmkv__stage_block: [n_kv_heads][page_size][head_dim]
       F16 per (slot, layer)), or LLMKV__NO_SLOT. */
    uint32_t* kfill;
    uint16_t* stage;

    /* Prefix index (desc.prefix_index; else NULL / 0). */
    llmkv_token* tok;           /* [n_pages * page_size] token id of every slot, -1 unknown */
    llmkv__node* nodes;         /* [n_pages] */
    llmkv__key* keys;           /* [n_pages] */
    uint32_t* heads;            /* [2 * n_buckets]: full-key chains, then first-token chains */
    uint32_t n_buckets;         /* per table: n_pages (memory stays affine in n_pages) */
    uint32_t* written;          /* [max_seqs][n_layers][2]: K, V written below this position */
    llmkv__pin* pins;           /* [max_pins] */
    llmkv__handles pin_ids;     /* pin handle ids */
    uint32_t pin_free, n_pins;
    uint32_t lru_head, lru_tail;
    uint32_t n_evictable, n_cached, n_pinned_pages;
    uint64_t n_evictions, tokens_matched, tokens_missed;

#ifndef LLMKV_NO_THREADS
    pthread_mutex_t mu;         /* desc.thread_safe: serializes metadata calls */
#endif
};

/* desc.thread_safe: the cache's mutex around every call that reads or
   changes shared metadata (no-ops otherwise). The mutex is not part of the
   cache's logical state, so const calls take it too. */
static void llmkv__lock(const llmkv_cache* kv) {
#ifndef LLMKV_NO_THREADS
    if (kv && kv->desc.thread_safe) pthread_mutex_lock((pthread_mutex_t*)(void*)&kv->mu);
#else
    (void)kv;
#endif
}
static void llmkv__unlock(const llmkv_cache* kv) {
#ifndef LLMKV_NO_THREADS
    if (kv && kv->desc.thread_safe) pthread_mutex_unlock((pthread_mutex_t*)(void*)&kv->mu);
#else
    (void)kv;
#endif
}

/* The body of every locking public call: evaluates `call` (an llmkv_result
   expression, the call's unlocked body) under the mutex of cache `lk` and
   returns its result. */
#define LLMKV__RETURN_LOCKED(lk, call)         \
    do {                                       \
        const llmkv_cache* locked_c_ = (lk);   \
        llmkv_result locked_r_;                \
        llmkv__lock(locked_c_);                \
        locked_r_ = (call);                    \
        llmkv__unlock(locked_c_);              \
        return locked_r_;                      \
    } while (0)

#define LLMKV__NO_SLOT 0xffffffffu

/* Elements of the Q4C staging of one (sequence slot, layer), and of one
   slot (every layer). */
static uint64_t llmkv__stage_layer_elems(const llmkv_layout* l) {
    return (uint64_t)l->n_kv_heads * l->page_size * l->head_dim;
}
static uint64_t llmkv__stage_slot_elems(const llmkv_layout* l) { return l->n_layers * llmkv__stage_layer_elems(l); }

/* CPU detection (defined with the attention kernels). cpuid is costly in a
   virtual machine (each one traps to the hypervisor), so a cache detects
   once, when it is created, and keeps the answer. */
static uint32_t llmkv__cpu_detect(void);
static llmkv_cpu_path llmkv__cpu_auto(uint32_t paths);

/* Footprint of the metadata block and of the pages for `d` (capacity
   resolved). Returns 0 when the sizes do not fit the address space. */
static int llmkv__footprint(const llmkv_desc* d, const llmkv_layout* l, uint64_t* meta, uint64_t* pages) {
    llmkv__carver c;
    uint64_t pps = llmkv__div_up(d->max_seq_len, d->page_size);
    uint64_t table_entries = pps * d->max_seqs;
    uint64_t queue = d->storage == LLMKV_STORAGE_METADATA_ONLY ? d->max_pending_copies : 0;
    c.base = NULL;
    c.used = 0;
    llmkv__carve(&c, sizeof(llmkv_cache));
    llmkv__carve(&c, (uint64_t)d->n_pages * 4 * 3);
    llmkv__carve(&c, (uint64_t)d->max_seqs * sizeof(llmkv__seq));
    llmkv__carve(&c, table_entries * 4);
    llmkv__carve(&c, queue * sizeof(llmkv_copy_cmd));
    if (d->storage != LLMKV_STORAGE_METADATA_ONLY) llmkv__carve(&c, d->n_pages); /* dirty marks */
    if (llmkv__dtype_channel(l->k.dtype)) llmkv__carve(&c, (uint64_t)d->max_seqs * d->n_layers * 4);
    if (d->prefix_index) {
        llmkv__carve(&c, (uint64_t)d->n_pages * d->page_size * sizeof(llmkv_token));
        llmkv__carve(&c, (uint64_t)d->n_pages * sizeof(llmkv__node));
        llmkv__carve(&c, (uint64_t)d->n_pages * sizeof(llmkv__key));
        llmkv__carve(&c, (uint64_t)d->n_pages * 2 * 4); /* hash buckets: n_pages per table */
        llmkv__carve(&c, (uint64_t)d->max_seqs * d->n_layers * 2 * 4);
        llmkv__carve(&c, (uint64_t)d->max_pins * sizeof(llmkv__pin));
    }
    *meta = llmkv__align_up(c.used, LLMKV__ALIGN);
    *pages = d->storage == LLMKV_STORAGE_METADATA_ONLY ? 0 : l->page_bytes * d->n_pages;
    if (llmkv__dtype_channel(l->k.dtype)) { /* + the F16 staging of every slot's tail page */
        uint64_t per_slot = llmkv__stage_slot_elems(l) * 2;
        if (per_slot > ((uint64_t)1 << 62) / d->max_seqs) return 0;
        *pages = llmkv__align_up(*pages, LLMKV__ALIGN) + per_slot * d->max_seqs;
    }
    return *meta < ((uint64_t)1 << 62) && *pages < ((uint64_t)1 << 62) &&
           *meta + *pages + LLMKV__ALIGN <= (uint64_t)(size_t)-1;
}

/* Fills capacity defaults that depend on n_pages. */
static llmkv_result llmkv__desc_capacity(llmkv_desc* d, const llmkv_layout* l, uint64_t n_pages) {
    uint64_t full_len;
    if (n_pages == 0) {
        llmkv__log(&d->logger, LLMKV_LOG_ERROR, "llmkv: capacity is zero (set n_pages or capacity_bytes of at least %llu)",
                   (unsigned long long)l->page_bytes);
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    if (n_pages > LLMKV__MAX_PAGES) {
        llmkv__log(&d->logger, LLMKV_LOG_ERROR, "llmkv: at most %u pages (asked for %llu)", LLMKV__MAX_PAGES,
                   (unsigned long long)n_pages);
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    d->n_pages = (uint32_t)n_pages;
    full_len = n_pages * d->page_size;
    if (full_len > LLMKV__MAX_LEN) full_len = LLMKV__MAX_LEN;
    if (d->max_seq_len == 0 || d->max_seq_len > full_len) d->max_seq_len = (uint32_t)full_len;
    if (d->max_pending_copies == 0) d->max_pending_copies = d->n_pages;
    return LLMKV_OK;
}

/* Lays the cache out in `meta` (and `pages`, host mode) and initialises it. */
static llmkv_cache* llmkv__init(const llmkv_desc* d, const llmkv_layout* l, void* meta, uint64_t meta_size,
                                void* pages) {
    llmkv__carver c;
    llmkv_cache* kv;
    uint32_t i;
    c.base = (unsigned char*)meta;
    c.used = 0;
    kv = (llmkv_cache*)llmkv__carve(&c, sizeof(llmkv_cache));
    memset(kv, 0, sizeof *kv);
    kv->desc = *d;
    kv->layout = *l;
    kv->n_pages = d->n_pages;
    kv->max_pages_per_seq = llmkv__div_up(d->max_seq_len, d->page_size);
    kv->refcount = (uint32_t*)llmkv__carve(&c, (uint64_t)d->n_pages * 4 * 3);
    kv->free_pages = kv->refcount + d->n_pages;
    kv->scratch = kv->free_pages + d->n_pages;
    kv->seqs = (llmkv__seq*)llmkv__carve(&c, (uint64_t)d->max_seqs * sizeof(llmkv__seq));
    kv->tables = (uint32_t*)llmkv__carve(&c, (uint64_t)kv->max_pages_per_seq * d->max_seqs * 4);
    if (d->storage == LLMKV_STORAGE_METADATA_ONLY) {
        kv->copies = (llmkv_copy_cmd*)llmkv__carve(&c, (uint64_t)d->max_pending_copies * sizeof(llmkv_copy_cmd));
        kv->copy_cap = d->max_pending_copies;
    } else {
        kv->dirty = (unsigned char*)llmkv__carve(&c, d->n_pages);
        memset(kv->dirty, 0, d->n_pages);
    }
    if (llmkv__dtype_channel(l->k.dtype)) {
        uint64_t e;
        kv->kfill = (uint32_t*)llmkv__carve(&c, (uint64_t)d->max_seqs * d->n_layers * 4);
        for (e = 0; e < (uint64_t)d->max_seqs * d->n_layers; ++e) kv->kfill[e] = LLMKV__NO_SLOT;
        if (pages)
            kv->stage = (uint16_t*)(void*)((unsigned char*)pages +
                                           llmkv__align_up(l->page_bytes * d->n_pages, LLMKV__ALIGN));
    }
    if (d->prefix_index) {
        uint64_t nb = d->n_pages, e;
        kv->tok = (llmkv_token*)llmkv__carve(&c, (uint64_t)d->n_pages * d->page_size * sizeof(llmkv_token));
        kv->nodes = (llmkv__node*)llmkv__carve(&c, (uint64_t)d->n_pages * sizeof(llmkv__node));
        kv->keys = (llmkv__key*)llmkv__carve(&c, (uint64_t)d->n_pages * sizeof(llmkv__key));
        kv->heads = (uint32_t*)llmkv__carve(&c, nb * 2 * 4);
        kv->written = (uint32_t*)llmkv__carve(&c, (uint64_t)d->max_seqs * d->n_layers * 2 * 4);
        kv->pins = (llmkv__pin*)llmkv__carve(&c, (uint64_t)d->max_pins * sizeof(llmkv__pin));
        kv->n_buckets = d->n_pages;
        for (e = 0; e < (uint64_t)d->n_pages * d->page_size; ++e) kv->tok[e] = -1;
        memset(kv->nodes, 0, (size_t)d->n_pages * sizeof(llmkv__node));
        memset(kv->keys, 0, (size_t)d->n_pages * sizeof(llmkv__key));
        for (e = 0; e < nb * 2; ++e) kv->heads[e] = LLMKV__NO_SLOT;
        memset(kv->written, 0, (size_t)d->max_seqs * d->n_layers * 2 * 4);
        for (e = 0; e < d->max_pins; ++e) {
            kv->pins[e].gen = 1;
            kv->pins[e].live = 0;
            kv->pins[e].node = LLMKV__NO_SLOT;
            kv->pins[e].next_free = e + 1 < d->max_pins ? (uint32_t)e + 1 : LLMKV__NO_SLOT;
        }
        kv->pin_free = 0;
        kv->pin_ids = llmkv__handles_for(d->max_pins);
        kv->lru_head = kv->lru_tail = LLMKV__NO_SLOT;
    }
    kv->meta_bytes = meta_size;
    kv->pool = (unsigned char*)pages;
    kv->cpu_paths = llmkv__cpu_detect();
    kv->cpu_auto = llmkv__cpu_auto(kv->cpu_paths);
#ifndef LLMKV_NO_THREADS
    if (d->thread_safe && pthread_mutex_init(&kv->mu, NULL) != 0) return NULL;
#endif

    memset(kv->refcount, 0, (size_t)d->n_pages * 4);
    memset(kv->scratch, 0, (size_t)d->n_pages * 4); /* kept all zero between calls */
    for (i = 0; i < d->n_pages; ++i) kv->free_pages[i] = d->n_pages - 1 - i; /* page 0 on top */
    kv->n_free = d->n_pages;
    memset(kv->seqs, 0, (size_t)d->max_seqs * sizeof(llmkv__seq));
    for (i = 0; i < d->max_seqs; ++i) {
        kv->seqs[i].gen = 1;
        kv->seqs[i].next_free = i + 1 < d->max_seqs ? i + 1 : LLMKV__NO_SLOT;
    }
    kv->free_head = 0;
    kv->free_tail = d->max_seqs - 1;
    kv->seq_ids = llmkv__handles_for(d->max_seqs);
    return kv;
}

/* Validates a descriptor and resolves its capacity from n_pages or
   capacity_bytes (0 pages if neither is set). */
static llmkv_result llmkv__prepare(const llmkv_desc* desc, llmkv_desc* d, llmkv_layout* l, uint64_t* n_pages) {
    llmkv_result r;
    if (!desc) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv__desc_shape(desc, d);
    if (r != LLMKV_OK) return r;
    llmkv__layout(d, l);
    *n_pages = d->n_pages ? d->n_pages : d->capacity_bytes / l->page_bytes;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_cache_create(const llmkv_desc* desc, llmkv_cache** out) {
    llmkv_desc d;
    llmkv_layout l;
    llmkv_allocator a;
    uint64_t n_pages, meta_size, page_size;
    void *meta, *pages = NULL;
    llmkv_cache* kv;
    llmkv_result r;
    if (!out) return LLMKV_ERR_INVALID_ARGUMENT;
    *out = NULL;
    r = llmkv__prepare(desc, &d, &l, &n_pages);
    if (r != LLMKV_OK) return r;
    r = llmkv__desc_capacity(&d, &l, n_pages);
    if (r != LLMKV_OK) return r;
    if (!llmkv__footprint(&d, &l, &meta_size, &page_size)) {
        llmkv__log(&d.logger, LLMKV_LOG_ERROR, "llmkv: the cache does not fit the address space");
        return LLMKV_ERR_OUT_OF_MEMORY;
    }
    a = llmkv__allocator_or_default(&d.allocator);
    meta = a.alloc((size_t)meta_size, LLMKV__ALIGN, a.user);
    if (!meta) {
        llmkv__log(&d.logger, LLMKV_LOG_ERROR, "llmkv: cannot allocate %llu bytes of metadata", (unsigned long long)meta_size);
        return LLMKV_ERR_OUT_OF_MEMORY;
    }
    if (page_size) {
        pages = a.alloc((size_t)page_size, LLMKV__ALIGN, a.user);
        if (!pages) {
            a.free(meta, (size_t)meta_size, a.user);
            llmkv__log(&d.logger, LLMKV_LOG_ERROR, "llmkv: cannot allocate %llu bytes of pages", (unsigned long long)page_size);
            return LLMKV_ERR_OUT_OF_MEMORY;
        }
    }
    kv = llmkv__init(&d, &l, meta, meta_size, pages);
    if (!kv) { /* the mutex could not be made */
        if (pages) a.free(pages, (size_t)page_size, a.user);
        a.free(meta, (size_t)meta_size, a.user);
        return LLMKV_ERR_OUT_OF_MEMORY;
    }
    kv->alloc = a;
    kv->meta_block = meta;
    kv->meta_block_size = (size_t)meta_size;
    kv->page_block = pages;
    kv->page_block_size = (size_t)page_size;
    *out = kv;
    return LLMKV_OK;
}

/* Whole footprint inside a caller buffer of unknown alignment. */
static uint64_t llmkv__caller_size(const llmkv_desc* d, const llmkv_layout* l, int* fits) {
    uint64_t meta, pages;
    *fits = llmkv__footprint(d, l, &meta, &pages);
    return LLMKV__ALIGN - 1 + meta + pages;
}

LLMKV_API llmkv_result llmkv_cache_memory_size(const llmkv_desc* desc, size_t* size, size_t* per_page) {
    llmkv_desc d;
    llmkv_layout l;
    uint64_t n_pages, total;
    int fits;
    llmkv_result r;
    if (!size) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv__prepare(desc, &d, &l, &n_pages);
    if (r != LLMKV_OK) return r;
    if (n_pages == 0) {
        /* The footprint is affine in n_pages (given fixed or defaulted
           max_seq_len); report it at one page and the cost of each more. */
        llmkv_desc d1 = d, d2 = d;
        uint64_t s1, s2;
        int f2;
        if (llmkv__desc_capacity(&d1, &l, 1) != LLMKV_OK || llmkv__desc_capacity(&d2, &l, 2) != LLMKV_OK)
            return LLMKV_ERR_INVALID_ARGUMENT;
        s1 = llmkv__caller_size(&d1, &l, &fits);
        s2 = llmkv__caller_size(&d2, &l, &f2);
        if (!fits || !f2) return LLMKV_ERR_OUT_OF_MEMORY;
        /* Alignment can make one step cost up to 3 * 63 bytes more or less;
           report the worst case so that a buffer sized from it fits. */
        *size = (size_t)(s1 - l.page_bytes);
        if (per_page) *per_page = (size_t)(s2 - s1 + 3 * LLMKV__ALIGN);
        return LLMKV_OK;
    }
    r = llmkv__desc_capacity(&d, &l, n_pages);
    if (r != LLMKV_OK) return r;
    total = llmkv__caller_size(&d, &l, &fits);
    if (!fits) return LLMKV_ERR_OUT_OF_MEMORY;
    *size = (size_t)total;
    if (per_page) *per_page = 0;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_cache_create_in(const llmkv_desc* desc, void* memory, size_t size, llmkv_cache** out) {
    llmkv_desc d, trial;
    llmkv_layout l;
    uint64_t n_pages, meta, pages, need;
    unsigned char* base;
    llmkv_cache* kv;
    llmkv_result r;
    int fits;
    if (!out) return LLMKV_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!memory) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv__prepare(desc, &d, &l, &n_pages);
    if (r != LLMKV_OK) return r;
    if (n_pages == 0) {
        /* Largest page count that fits: binary search on the footprint. */
        uint64_t lo = 0, hi = size / (l.page_bytes ? l.page_bytes : 1) + 1;
        if (d.storage == LLMKV_STORAGE_METADATA_ONLY) {
            llmkv__log(&d.logger, LLMKV_LOG_ERROR, "llmkv: a metadata-only cache needs n_pages or capacity_bytes");
            return LLMKV_ERR_INVALID_ARGUMENT;
        }
        if (hi > LLMKV__MAX_PAGES) hi = LLMKV__MAX_PAGES;
        while (lo < hi) {
            uint64_t mid = lo + (hi - lo + 1) / 2;
            trial = d;
            if (llmkv__desc_capacity(&trial, &l, mid) == LLMKV_OK &&
                llmkv__caller_size(&trial, &l, &fits) <= size && fits)
                lo = mid;
            else
                hi = mid - 1;
        }
        if (lo == 0) {
            llmkv__log(&d.logger, LLMKV_LOG_ERROR, "llmkv: a %llu-byte buffer cannot hold even one page", (unsigned long long)size);
            return LLMKV_ERR_BUFFER_TOO_SMALL;
        }
        n_pages = lo;
    }
    r = llmkv__desc_capacity(&d, &l, n_pages);
    if (r != LLMKV_OK) return r;
    need = llmkv__caller_size(&d, &l, &fits);
    if (!fits) return LLMKV_ERR_OUT_OF_MEMORY;
    if (need > size) {
        llmkv__log(&d.logger, LLMKV_LOG_ERROR, "llmkv: buffer of %llu bytes is smaller than the %llu needed",
                   (unsigned long long)size, (unsigned long long)need);
        return LLMKV_ERR_BUFFER_TOO_SMALL;
    }
    llmkv__footprint(&d, &l, &meta, &pages);
    base = (unsigned char*)(((uintptr_t)memory + LLMKV__ALIGN - 1) & ~(uintptr_t)(LLMKV__ALIGN - 1));
    kv = llmkv__init(&d, &l, base, meta, pages ? base + meta : NULL);
    if (!kv) return LLMKV_ERR_OUT_OF_MEMORY; /* the mutex could not be made */
    kv->in_caller_memory = 1;
    *out = kv;
    return LLMKV_OK;
}

LLMKV_API void llmkv_cache_destroy(llmkv_cache* cache) {
    llmkv_allocator a;
    void *meta, *pages;
    size_t meta_size, page_size;
    if (!cache) return;
#ifndef LLMKV_NO_THREADS
    if (cache->desc.thread_safe) pthread_mutex_destroy(&cache->mu);
#endif
    if (cache->in_caller_memory) return;
    a = cache->alloc;
    meta = cache->meta_block;
    meta_size = cache->meta_block_size;
    pages = cache->page_block;
    page_size = cache->page_block_size;
    if (pages) a.free(pages, page_size, a.user);
    a.free(meta, meta_size, a.user); /* the cache itself lives in this block */
}

LLMKV_API llmkv_result llmkv_cache_desc(const llmkv_cache* cache, llmkv_desc* out) {
    if (!cache || !out) return LLMKV_ERR_INVALID_ARGUMENT;
    *out = cache->desc;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_cache_layout(const llmkv_cache* cache, llmkv_layout* out) {
    if (!cache || !out) return LLMKV_ERR_INVALID_ARGUMENT;
    *out = cache->layout;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_cache_pool(const llmkv_cache* cache, void** base, uint64_t* bytes) {
    if (!cache || !base || !bytes) return LLMKV_ERR_INVALID_ARGUMENT;
    *base = cache->pool;
    *bytes = cache->layout.page_bytes * cache->n_pages;
    return LLMKV_OK;
}

/* ------------------------------------------------------------------------ */
/* Pages and sequences                                                      */
/* ------------------------------------------------------------------------ */

static uint32_t* llmkv__table(const llmkv_cache* kv, uint32_t slot) {
    return kv->tables + (size_t)slot * kv->max_pages_per_seq;
}

/* The record behind a handle, or NULL when the handle is stale or invalid. */
static llmkv__seq* llmkv__lookup(const llmkv_cache* kv, llmkv_seq h, uint32_t* slot_out) {
    uint32_t slot = llmkv__handle_slot(kv->seq_ids, h.id), gen = llmkv__handle_gen(kv->seq_ids, h.id);
    llmkv__seq* s;
    if (slot >= kv->desc.max_seqs) return NULL;
    s = &kv->seqs[slot];
    if (!s->live || s->gen != gen) return NULL;
    if (slot_out) *slot_out = slot;
    return s;
}

/* --- Prefix index: LRU list, hash chains, nodes ------------------------- */

/* A cached page that no sequence holds and no pin keeps. */
static int llmkv__evictable(const llmkv_cache* kv, uint32_t p) {
    return kv->nodes && kv->nodes[p].ntok && kv->refcount[p] == 1 && kv->nodes[p].pins == 0;
}

/* Pages a call may take: the free list plus what eviction can free. */
static uint64_t llmkv__avail(const llmkv_cache* kv) { return (uint64_t)kv->n_free + kv->n_evictable; }

static void llmkv__lru_push(llmkv_cache* kv, uint32_t p) { /* at the most recent end */
    llmkv__node* n = &kv->nodes[p];
    n->lru_next = LLMKV__NO_SLOT;
    n->lru_prev = kv->lru_tail;
    if (kv->lru_tail == LLMKV__NO_SLOT) kv->lru_head = p;
    else kv->nodes[kv->lru_tail].lru_next = p;
    kv->lru_tail = p;
    kv->n_evictable++;
}

static void llmkv__lru_remove(llmkv_cache* kv, uint32_t p) {
    llmkv__node* n = &kv->nodes[p];
    if (n->lru_prev == LLMKV__NO_SLOT) kv->lru_head = n->lru_next;
    else kv->nodes[n->lru_prev].lru_next = n->lru_next;
    if (n->lru_next == LLMKV__NO_SLOT) kv->lru_tail = n->lru_prev;
    else kv->nodes[n->lru_next].lru_prev = n->lru_prev;
    kv->n_evictable--;
}

#if defined(__GNUC__) || defined(__clang__)
#define LLMKV__PREFETCH(p) __builtin_prefetch((p), 0, 3)
#define LLMKV__FORCE_INLINE static inline __attribute__((always_inline))
#define LLMKV__NOINLINE static __attribute__((noinline))
#elif defined(_MSC_VER)
#define LLMKV__PREFETCH(p) ((void)(p))
#define LLMKV__FORCE_INLINE static __forceinline
#define LLMKV__NOINLINE static __declspec(noinline)
#else
#define LLMKV__PREFETCH(p) ((void)(p))
#define LLMKV__FORCE_INLINE static
#define LLMKV__NOINLINE static
#endif

/* Node keys hash through a chain: a full node's `chain` state mixes its
   parent's (at the root, the namespace's) with its tokens, so it is a
   function of the namespace and every token of the path, and a walk can
   hash pages it has not reached yet and prefetch their buckets. The chain
   step is one multiply and a shift (short: at page_size 1 it is the walk's
   critical path); bucket hashes are finished off the chain. Only speed
   depends on the hashes: every lookup compares parent, namespace and tokens
   exactly. */
#define LLMKV__HASH_K1 0x9e3779b97f4a7c15ull
#define LLMKV__HASH_K2 0xc4ceb9fe1a85ec53ull
#define LLMKV__HASH_K3 0xff51afd7ed558ccdull

static uint64_t llmkv__root_chain(uint64_t ns) {
    uint64_t h = (ns ^ LLMKV__HASH_K2) * LLMKV__HASH_K3;
    return (h ^ h >> 32) * LLMKV__HASH_K1;
}

static uint64_t llmkv__chain_step(uint64_t s, const llmkv_token* t, uint32_t n) {
    uint32_t i;
    for (i = 0; i + 1 < n; i += 2) {
        s = (s ^ ((uint64_t)(uint32_t)t[i] | (uint64_t)(uint32_t)t[i + 1] << 32)) * LLMKV__HASH_K1;
        s ^= s >> 31;
    }
    if (i < n) {
        s = (s ^ (uint32_t)t[i]) * LLMKV__HASH_K1;
        s ^= s >> 31;
    }
    return s;
}

/* Bucket hash of a full node from its chain state; of a first-token key
   from its parent's state and the token. */
static uint32_t llmkv__full_hash(uint64_t chain) { return (uint32_t)((chain ^ chain >> 29) * LLMKV__HASH_K2 >> 32); }
static uint32_t llmkv__first_hash(uint64_t parent_chain, llmkv_token t0) {
    uint64_t h = (parent_chain ^ (uint32_t)t0) * LLMKV__HASH_K3;
    return (uint32_t)((h ^ h >> 31) * LLMKV__HASH_K2 >> 32);
}

/* The chain state a child of `parent` (NO_SLOT: the root of ns) extends. */
static uint64_t llmkv__parent_chain(const llmkv_cache* kv, uint32_t parent, uint64_t ns) {
    return parent == LLMKV__NO_SLOT ? llmkv__root_chain(ns) : kv->nodes[parent].chain;
}

/* Page p's chain links in table `which` (0 full-key, 1 first-token). */
static uint32_t* llmkv__chain_next(const llmkv_cache* kv, uint32_t p, int which) {
    return which ? &kv->nodes[p].first_next : &kv->keys[p].full_next;
}
static uint32_t* llmkv__chain_prev(const llmkv_cache* kv, uint32_t p, int which) {
    return which ? &kv->nodes[p].first_prev : &kv->nodes[p].full_prev;
}
/* hash * n / 2^32: a bucket in [0, n) from the hash's high bits, no division. */
static size_t llmkv__bucket_index(uint64_t n_buckets, uint32_t hash) { return (size_t)((hash * n_buckets) >> 32); }
static uint32_t* llmkv__bucket(const llmkv_cache* kv, int which, uint32_t hash) {
    return kv->heads + (size_t)which * kv->n_buckets + llmkv__bucket_index(kv->n_buckets, hash);
}

static void llmkv__chain_link(llmkv_cache* kv, uint32_t p, int which, uint32_t hash) {
    uint32_t* head = llmkv__bucket(kv, which, hash);
    *llmkv__chain_prev(kv, p, which) = LLMKV__NO_SLOT;
    *llmkv__chain_next(kv, p, which) = *head;
    if (*head != LLMKV__NO_SLOT) *llmkv__chain_prev(kv, *head, which) = p;
    *head = p;
}

static void llmkv__chain_unlink(llmkv_cache* kv, uint32_t p, int which, uint32_t hash) {
    uint32_t next = *llmkv__chain_next(kv, p, which), prev = *llmkv__chain_prev(kv, p, which);
    if (prev == LLMKV__NO_SLOT) *llmkv__bucket(kv, which, hash) = next;
    else *llmkv__chain_next(kv, prev, which) = next;
    if (next != LLMKV__NO_SLOT) *llmkv__chain_prev(kv, next, which) = prev;
}

/* Moves full node p to the head of its full-key chain, where the walk
   looks first: a prefix in use (a system prompt) stays found at the first
   probe however many nodes were published into its buckets after it. */
static void llmkv__chain_front(llmkv_cache* kv, uint32_t p) {
    uint32_t h = kv->keys[p].hash_full;
    if (*llmkv__bucket(kv, 0, h) == p) return;
    llmkv__chain_unlink(kv, p, 0, h);
    llmkv__chain_link(kv, p, 0, h);
}

static int llmkv__tokens_equal(const llmkv_token* a, const llmkv_token* b, uint32_t n) {
    uint32_t i;
    if (n > 16) return memcmp(a, b, (size_t)n * sizeof(llmkv_token)) == 0;
    for (i = 0; i < n; ++i) /* short keys: no library call */
        if (a[i] != b[i]) return 0;
    return 1;
}

/* The full node with key (parent, ns, tokens t[0, page_size)), whose
   chained hash is h, or NO_SLOT: find_full searches its bucket's chain,
   chain_find the chain from page p on. Below the root a node's namespace
   is its parent's, so only a root node's is compared (the one read of a
   node record); a node of another namespace is rejected before its tokens
   are read. */
static uint32_t llmkv__chain_find(const llmkv_cache* kv, uint32_t p, uint32_t parent, uint64_t ns, const llmkv_token* t,
                                  uint32_t h) {
    uint32_t ps = kv->layout.page_size;
    for (; p != LLMKV__NO_SLOT; p = kv->keys[p].full_next) {
        const llmkv__key* k = &kv->keys[p];
        /* at page size 1, (parent, tok0) is the whole key: no hash needed */
        if ((ps == 1 || k->hash_full == h) && k->tok0 == t[0] && k->parent == parent &&
            (parent != LLMKV__NO_SLOT || kv->nodes[p].ns == ns) &&
            (ps == 1 || llmkv__tokens_equal(kv->tok + (size_t)p * ps + 1, t + 1, ps - 1)))
            return p;
    }
    return LLMKV__NO_SLOT;
}
static uint32_t llmkv__find_full(const llmkv_cache* kv, uint32_t parent, uint64_t ns, const llmkv_token* t, uint32_t h) {
    return llmkv__chain_find(kv, *llmkv__bucket(kv, 0, h), parent, ns, t, h);
}

/* Among the nodes under (parent, ns) whose first token is t[0], the one
   sharing the longest prefix with t[0, limit) (ties: lowest page id);
   *lcp receives that length (0 and NO_SLOT when none). limit >= 1. At most
   LLMKV__PARTIAL_CANDIDATES such nodes are compared, the most recently
   published first (chains are pushed at the head), so a prompt prefix
   shared by thousands of conversations whose next page starts alike costs
   a bounded scan; past that bound the partial match may be shorter than
   the best one (never by a page or more). */
#define LLMKV__PARTIAL_CANDIDATES 64u
static uint32_t llmkv__best_child(const llmkv_cache* kv, uint32_t parent, uint64_t ns, const llmkv_token* t,
                                  uint32_t limit, uint32_t* lcp) {
    uint32_t ps = kv->layout.page_size, h = llmkv__first_hash(llmkv__parent_chain(kv, parent, ns), t[0]), p;
    uint32_t best = LLMKV__NO_SLOT, bl = 0, seen = 0;
    for (p = *llmkv__bucket(kv, 1, h); p != LLMKV__NO_SLOT && seen < LLMKV__PARTIAL_CANDIDATES;
         p = kv->nodes[p].first_next) {
        const llmkv__node* n = &kv->nodes[p];
        const llmkv_token* nt = kv->tok + (size_t)p * ps;
        uint32_t m, k;
        if (kv->keys[p].tok0 != t[0] || kv->keys[p].parent != parent || n->ns != ns) continue;
        ++seen;
        m = n->ntok < limit ? n->ntok : limit;
        for (k = 1; k < m && nt[k] == t[k]; ++k) {}
        if (k > bl || (k == bl && p < best)) {
            bl = k;
            best = p;
        }
    }
    *lcp = bl;
    return best;
}

/* Makes page p (held by the caller) a node holding its first ntok tokens. */
static void llmkv__node_insert(llmkv_cache* kv, uint32_t p, uint32_t parent, uint64_t ns, uint32_t ntok) {
    llmkv__node* n = &kv->nodes[p];
    llmkv__key* k = &kv->keys[p];
    const llmkv_token* t = kv->tok + (size_t)p * kv->layout.page_size;
    uint64_t pc = llmkv__parent_chain(kv, parent, ns);
    k->parent = parent;
    k->tok0 = t[0];
    n->ns = ns;
    n->ntok = ntok;
    n->n_children = 0;
    n->pins = 0;
    n->chain = 0;
    if (ntok == kv->layout.page_size) {
        n->chain = llmkv__chain_step(pc, t, ntok);
        k->hash_full = llmkv__full_hash(n->chain);
        llmkv__chain_link(kv, p, 0, k->hash_full);
    }
    llmkv__chain_link(kv, p, 1, llmkv__first_hash(pc, t[0]));
    if (parent != LLMKV__NO_SLOT) kv->nodes[parent].n_children++;
    kv->refcount[p]++; /* the index's reference */
    kv->n_cached++;
}

/* Evicts the least recently used evictable page to the free list. Its
   place in the order makes it a leaf. */
static void llmkv__evict_one(llmkv_cache* kv) {
    uint32_t p = kv->lru_head;
    llmkv__node* n;
    const llmkv__key* k;
    LLMKV_ASSERT(p != LLMKV__NO_SLOT);
    n = &kv->nodes[p];
    k = &kv->keys[p];
    LLMKV_ASSERT(n->n_children == 0 && kv->refcount[p] == 1);
    llmkv__lru_remove(kv, p);
    if (n->ntok == kv->layout.page_size) llmkv__chain_unlink(kv, p, 0, k->hash_full);
    llmkv__chain_unlink(kv, p, 1, llmkv__first_hash(llmkv__parent_chain(kv, k->parent, n->ns), k->tok0));
    if (k->parent != LLMKV__NO_SLOT) kv->nodes[k->parent].n_children--;
    n->ntok = 0;
    kv->n_cached--;
    kv->n_evictions++;
    kv->refcount[p] = 0;
    kv->free_pages[kv->n_free++] = p;
}

/* Takes a page for the caller's exclusive use, evicting one when the free
   list is empty (the caller checked llmkv__avail). */
static uint32_t llmkv__page_take(llmkv_cache* kv) {
    uint32_t p;
    if (kv->n_free == 0) llmkv__evict_one(kv);
    LLMKV_ASSERT(kv->n_free > 0);
    p = kv->free_pages[--kv->n_free];
    LLMKV_ASSERT(kv->refcount[p] == 0);
    kv->refcount[p] = 1;
    if (kv->pool) { /* a reserved, unwritten slot reads as zeros, never as stale bytes */
        memset(kv->pool + (size_t)p * kv->layout.page_bytes, 0, (size_t)kv->layout.page_bytes);
        kv->dirty[p] = 1;
    }
    return p;
}

/* Adds a sequence's reference to page p (a cached page leaves the LRU). */
static void llmkv__page_hold(llmkv_cache* kv, uint32_t p) {
    if (llmkv__evictable(kv, p)) llmkv__lru_remove(kv, p);
    kv->refcount[p]++;
}

/* Drops a sequence's reference: the page returns to the free list, or,
   cached and now unheld and unpinned, becomes the most recently used
   evictable page. */
static void llmkv__page_release(llmkv_cache* kv, uint32_t p) {
    LLMKV_ASSERT(kv->refcount[p] > 0);
    if (--kv->refcount[p] == 0) kv->free_pages[kv->n_free++] = p;
    else if (llmkv__evictable(kv, p)) llmkv__lru_push(kv, p);
}

/* Copies the first n_slots slots of every layer, K and V, from page src to
   page dst: the meaning of an llmkv_copy_cmd. Host caches run it now;
   metadata-only caches queue it (the caller checked there is room). */
static void llmkv__page_copy(llmkv_cache* kv, uint32_t src, uint32_t dst, uint32_t n_slots) {
    const llmkv_layout* l = &kv->layout;
    if (kv->tok) /* token ids are host metadata in every storage mode */
        memcpy(kv->tok + (size_t)dst * l->page_size, kv->tok + (size_t)src * l->page_size,
               (size_t)n_slots * sizeof(llmkv_token));
    if (!kv->pool) {
        llmkv_copy_cmd* c = &kv->copies[(kv->copy_head + kv->copy_count) % kv->copy_cap];
        LLMKV_ASSERT(kv->copy_count < kv->copy_cap);
        c->src_page = src;
        c->dst_page = dst;
        c->n_slots = n_slots;
        kv->copy_count++;
        return;
    }
    if (n_slots == l->page_size) {
        memcpy(kv->pool + dst * l->page_bytes, kv->pool + src * l->page_bytes, (size_t)l->page_bytes);
    } else {
        uint32_t layer, h, part;
        for (layer = 0; layer < l->n_layers; ++layer) {
            for (part = 0; part < 2; ++part) {
                const llmkv_part_layout* pl = part ? &l->v : &l->k;
                uint64_t base = layer * l->layer_stride + pl->offset;
                uint64_t sbase = layer * l->layer_stride + pl->scale_offset;
                for (h = 0; h < l->n_kv_heads; ++h) {
                    uint64_t off = base + h * pl->head_stride, soff = sbase + h * pl->scale_head_stride;
                    memcpy(kv->pool + dst * l->page_bytes + off, kv->pool + src * l->page_bytes + off,
                           (size_t)(n_slots * pl->slot_stride));
                    if (pl->scale_bytes) /* Q4C: one table per page and head */
                        memcpy(kv->pool + dst * l->page_bytes + soff, kv->pool + src * l->page_bytes + soff,
                               (size_t)(pl->scale_slot_stride ? n_slots * pl->scale_slot_stride
                                                              : pl->scale_head_stride));
                }
            }
        }
    }
}

/* Number of shared pages that hold positions [from, length) of a sequence:
   the copies a write into that range must make first. */
static uint32_t llmkv__shared_in_range(const llmkv_cache* kv, uint32_t slot, uint32_t from, uint32_t length) {
    const uint32_t* t = llmkv__table(kv, slot);
    uint32_t ps = kv->layout.page_size, i, n = 0, end;
    if (from >= length) return 0;
    end = (length - 1) / ps;
    for (i = from / ps; i <= end; ++i) n += kv->refcount[t[i]] > 1;
    return n;
}

/* Gives the sequence private copies of the shared pages holding positions
   [from, length), last page first (so that cached pages the sequence lets
   go enter the LRU order below their parents). The caller checked that
   enough pages and queue room exist. */
static void llmkv__unshare_range(llmkv_cache* kv, uint32_t slot, uint32_t from, uint32_t length) {
    uint32_t* t = llmkv__table(kv, slot);
    uint32_t ps = kv->layout.page_size, i, end;
    llmkv__seq* s = &kv->seqs[slot];
    if (from >= length) return;
    end = (length - 1) / ps;
    for (i = end + 1; i-- > from / ps;) {
        uint32_t old = t[i], fresh, used;
        if (kv->refcount[old] <= 1) continue;
        if (s->n_pub > i) s->n_pub = i;
        fresh = llmkv__page_take(kv);
        used = length - i * ps < ps ? length - i * ps : ps;
        llmkv__page_copy(kv, old, fresh, used);
        llmkv__page_release(kv, old);
        t[i] = fresh;
    }
}

/* --- Per-channel keys (Q4C; see "Per-channel keys" in the API) ----------- */

/* Channel c of a Q4C token row `codes` under the page table `tab`. */
static float llmkv__channel_value(const unsigned char* codes, const unsigned char* tab, uint32_t c) {
    const unsigned char* b = tab + (size_t)(c / 16) * 64 + (c % 16) * 2;
    return fmaf(llmkv_f16_to_f32(llmkv__ld_u16(b)), (float)((codes[c / 2] >> (4 * (c % 2))) & 15u),
                llmkv_f16_to_f32(llmkv__ld_u16(b + 32)));
}

/* Where the F16 key values of a page's slots (one layer, one head) come
   from while the page is quantized: slots [in_lo, in_hi) from caller rows
   (`in`, in_stride bytes apart, type in_type); the others from staging
   rows (`stage`, head_dim apart) or, when stage is NULL, from the page's
   own codes under its table `tab` (still the old one while they are
   read). */
typedef struct llmkv__channel_src {
    const unsigned char* in;
    size_t in_stride;
    llmkv_dtype in_type;
    uint32_t in_lo, in_hi;
    const uint16_t* stage;
    unsigned char* codes;       /* the page's codes and table: read, and written by encode */
    size_t slot_stride;
    unsigned char* tab;
} llmkv__channel_src;

/* Slot j's F16 values, as F16 bits. */
static void llmkv__channel_row16(const llmkv__channel_src* src, uint32_t j, uint32_t D, uint16_t* out, int simd) {
    uint32_t c;
    if (j >= src->in_lo && j < src->in_hi)
        llmkv__convert(out, LLMKV_DTYPE_F16, src->in + (size_t)(j - src->in_lo) * src->in_stride, src->in_type, D,
                       simd);
    else if (src->stage)
        memcpy(out, src->stage + (size_t)j * D, (size_t)D * 2);
    else
        for (c = 0; c < D; ++c)
            out[c] = llmkv_f32_to_f16(llmkv__channel_value(src->codes + j * src->slot_stride, src->tab, c));
}

/* Quantizes the page_size slots of one (page, layer, head) per channel
   from `src`, writing the codes (rows src->slot_stride apart from
   src->codes) and then the table src->tab. A slot read from the page
   itself is read, in both passes, before its row is rewritten, and the
   old table is replaced only at the end. */
static void llmkv__channel_encode(const llmkv__channel_src* src, uint32_t ps, uint32_t D, uint32_t paths) {
    float lo[LLMKV__MAX_HEAD_DIM], hi[LLMKV__MAX_HEAD_DIM], inv[LLMKV__MAX_HEAD_DIM], mn[LLMKV__MAX_HEAD_DIM];
    float x[LLMKV__MAX_HEAD_DIM];
    uint16_t h[LLMKV__MAX_HEAD_DIM];
    unsigned char tab[LLMKV__MAX_HEAD_DIM / 16 * 64], row[LLMKV__MAX_HEAD_DIM / 2];
    uint32_t j, c, nb = (D + 1) / 2;
    int simd = (int)(paths >> LLMKV_CPU_PATH_AVX2 & 1u);
    for (c = 0; c < D; ++c) {
        lo[c] = INFINITY;
        hi[c] = -INFINITY;
    }
    for (j = 0; j < ps; ++j) {
        llmkv__channel_row16(src, j, D, h, simd);
        llmkv__convert(x, LLMKV_DTYPE_F32, h, LLMKV_DTYPE_F16, D, simd);
        for (c = paths ? llmkv__range_update_simd(x, D, lo, hi, paths) : 0; c < D; ++c)
            if (llmkv__finite(x[c])) {
                lo[c] = x[c] < lo[c] ? x[c] : lo[c];
                hi[c] = x[c] > hi[c] ? x[c] : hi[c];
            }
    }
    memset(tab, 0, llmkv__channel_table_bytes(D));
    for (c = 0; c < D; ++c) {
        unsigned char sm[4];
        unsigned char* b = tab + (size_t)(c / 16) * 64 + (c % 16) * 2;
        if (lo[c] > hi[c]) lo[c] = hi[c] = 0.0f; /* no finite value */
        inv[c] = llmkv__q4_scale(lo[c], hi[c], sm, &mn[c]);
        memcpy(b, sm, 2);
        memcpy(b + 32, sm + 2, 2);
    }
    for (j = 0; j < ps; ++j) {
        llmkv__channel_row16(src, j, D, h, simd);
        llmkv__convert(x, LLMKV_DTYPE_F32, h, LLMKV_DTYPE_F16, D, simd);
        c = paths ? llmkv__encode_simd(LLMKV_DTYPE_Q4C, x, D, row, inv, mn, paths) : 0;
        llmkv__encode_tail(LLMKV_DTYPE_Q4C, x, c, D, row, inv, mn);
        memcpy(src->codes + j * src->slot_stride, row, nb);
    }
    memcpy(src->tab, tab, llmkv__channel_table_bytes(D));
}

/* Page bytes of (page p, layer) and that slot's staging block. */
static unsigned char* llmkv__page_layer(const llmkv_cache* kv, uint32_t p, uint32_t layer) {
    return kv->pool + (size_t)p * kv->layout.page_bytes + (size_t)layer * kv->layout.layer_stride;
}
static uint16_t* llmkv__stage_block(const llmkv_cache* kv, uint32_t slot, uint32_t layer) {
    return kv->stage + ((size_t)slot * kv->layout.n_layers + layer) * llmkv__stage_layer_elems(&kv->layout);
}

/* Quantizes the staged page of (slot, layer) into its page and clears the
   staging mark. */
static void llmkv__channel_flush(llmkv_cache* kv, uint32_t slot, uint32_t layer) {
    const llmkv_layout* l = &kv->layout;
    uint32_t* kf = &kv->kfill[(size_t)slot * l->n_layers + layer];
    uint32_t page = llmkv__table(kv, slot)[*kf / l->page_size], h;
    unsigned char* base = llmkv__page_layer(kv, page, layer);
    kv->dirty[page] = 1;
    for (h = 0; h < l->n_kv_heads; ++h) {
        llmkv__channel_src src;
        memset(&src, 0, sizeof src);
        src.stage = llmkv__stage_block(kv, slot, layer) + (size_t)h * l->page_size * l->head_dim;
        src.codes = base + l->k.offset + h * l->k.head_stride;
        src.slot_stride = l->k.slot_stride;
        src.tab = base + l->k.scale_offset + h * l->k.scale_head_stride;
        llmkv__channel_encode(&src, l->page_size, l->head_dim, kv->cpu_paths);
    }
    *kf = LLMKV__NO_SLOT;
}

/* Stages slots [0, n) of the full page at index P of (slot, layer): F16
   copies of their dequantized keys. */
static void llmkv__channel_stage(llmkv_cache* kv, uint32_t slot, uint32_t layer, uint32_t P, uint32_t n) {
    const llmkv_layout* l = &kv->layout;
    unsigned char* base = llmkv__page_layer(kv, llmkv__table(kv, slot)[P], layer);
    int simd = (int)(kv->cpu_paths >> LLMKV_CPU_PATH_AVX2 & 1u);
    uint32_t h, j;
    for (h = 0; h < l->n_kv_heads; ++h) {
        llmkv__channel_src src;
        uint16_t* sh = llmkv__stage_block(kv, slot, layer) + (size_t)h * l->page_size * l->head_dim;
        memset(&src, 0, sizeof src);
        src.codes = base + l->k.offset + h * l->k.head_stride;
        src.slot_stride = l->k.slot_stride;
        src.tab = base + l->k.scale_offset + h * l->k.scale_head_stride;
        for (j = 0; j < n; ++j) llmkv__channel_row16(&src, j, l->head_dim, sh + (size_t)j * l->head_dim, simd);
    }
    kv->kfill[(size_t)slot * l->n_layers + layer] = P * l->page_size;
}

/* The staged page a put of positions [first, length) must quantize before
   it stages another (an older page left staged because no put reached its
   end), or LLMKV__NO_SLOT. */
static uint32_t llmkv__channel_stale(const llmkv_cache* kv, uint32_t slot, uint32_t layer, uint32_t first,
                                     uint32_t length) {
    uint32_t ps = kv->layout.page_size, kf;
    if (!kv->kfill) return LLMKV__NO_SLOT;
    kf = kv->kfill[(size_t)slot * kv->layout.n_layers + layer];
    return kf != LLMKV__NO_SLOT && kf / ps < first / ps && length % ps ? kf : LLMKV__NO_SLOT;
}

/* The key half of a put of positions [first, length) of one layer into
   Q4C pages (already private): full pages are quantized, the partial last
   page is staged at F16. k: the caller's rows, k_stride apart, type st. */
static void llmkv__put_channel(llmkv_cache* kv, uint32_t slot, uint32_t layer, uint32_t first, uint32_t length,
                               const unsigned char* k, size_t k_stride, llmkv_dtype st, int simd) {
    const llmkv_layout* l = &kv->layout;
    const uint32_t* t = llmkv__table(kv, slot);
    uint32_t ps = l->page_size, D = l->head_dim, P, h, j;
    uint32_t* kf = &kv->kfill[(size_t)slot * l->n_layers + layer];
    uint16_t* stage = llmkv__stage_block(kv, slot, layer);
    size_t head_in = (size_t)D * llmkv_dtype_size(st);
    for (P = first / ps; P <= (length - 1) / ps; ++P) {
        uint32_t lo = first > P * ps ? first : P * ps, hi = length < (P + 1) * ps ? length : (P + 1) * ps;
        unsigned char* base = llmkv__page_layer(kv, t[P], layer);
        int staged = *kf == P * ps, full = hi == (P + 1) * ps;
        if (!full && !staged && *kf != LLMKV__NO_SLOT) llmkv__channel_flush(kv, slot, layer);
        for (h = 0; h < l->n_kv_heads; ++h) {
            llmkv__channel_src src;
            uint16_t* sh = stage + (size_t)h * ps * D;
            src.in = k + (size_t)(lo - first) * k_stride + h * head_in;
            src.in_stride = k_stride;
            src.in_type = st;
            src.in_lo = lo - P * ps;
            src.in_hi = hi - P * ps;
            src.stage = staged ? sh : NULL;
            src.codes = base + l->k.offset + h * l->k.head_stride;
            src.slot_stride = l->k.slot_stride;
            src.tab = base + l->k.scale_offset + h * l->k.scale_head_stride;
            if (full) {
                llmkv__channel_encode(&src, ps, D, kv->cpu_paths);
                continue;
            }
            /* The partial last page: every slot at F16 in the staging (the
               earlier ones from the page when it was not staged yet). */
            for (j = staged ? src.in_lo : 0; j < src.in_hi; ++j) llmkv__channel_row16(&src, j, D, sh + (size_t)j * D, simd);
        }
        *kf = full ? (staged ? LLMKV__NO_SLOT : *kf) : P * ps;
    }
}

/* --- Prefix index: publishing and matching ----------------------------- */

/* The sequence slot's written watermarks: [layer][K, V]. */
static uint32_t* llmkv__written(const llmkv_cache* kv, uint32_t slot) {
    return kv->written + (size_t)slot * kv->layout.n_layers * 2;
}

/* Positions below which every layer's K and V are written. */
static uint32_t llmkv__written_end(const llmkv_cache* kv, uint32_t slot) {
    const uint32_t* w = llmkv__written(kv, slot);
    uint32_t i, end = kv->seqs[slot].length;
    for (i = 0; i < kv->layout.n_layers * 2; ++i)
        if (w[i] < end) end = w[i];
    return end;
}

static int llmkv__tokens_known(const llmkv_token* t, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; ++i)
        if (t[i] < 0) return 0;
    return 1;
}

/* A caller's token argument: n ids >= 0 (t may be NULL when n is 0). */
static int llmkv__tokens_valid(const llmkv_token* t, uint32_t n) { return (t || !n) && llmkv__tokens_known(t, n); }

/* Publishes the sequence's full written pages past n_pub (and, with
   `partial`, its written partial last page): each becomes a node, or is
   swapped for the cached page that already holds the same key. Needs no
   page and cannot fail. */
static void llmkv__publish(llmkv_cache* kv, uint32_t slot, int partial) {
    llmkv__seq* s = &kv->seqs[slot];
    uint32_t* t = llmkv__table(kv, slot);
    uint32_t ps = kv->layout.page_size, k = s->n_pub, end = s->length < s->tok_gap ? s->length : s->tok_gap, w;
    /* The usual reserve (inside a page, or past an unknown token) returns
       here in O(1); the O(n_layers) watermark scan runs once per page. */
    if ((uint64_t)(k + 1) * ps > end && (!partial || end < s->length)) return;
    w = llmkv__written_end(kv, slot);
    if (w < end) end = w;
    while ((uint64_t)(k + 1) * ps <= end) {
        uint32_t p = t[k], parent = k ? t[k - 1] : LLMKV__NO_SLOT, n;
        const llmkv_token* pt = kv->tok + (size_t)p * ps;
        if (kv->nodes[p].ntok == 0) {
            if (!llmkv__tokens_known(pt, ps)) break;
            n = llmkv__find_full(kv, parent, s->ns, pt,
                                 llmkv__full_hash(llmkv__chain_step(llmkv__parent_chain(kv, parent, s->ns), pt, ps)));
            /* A page other sequences share is swapped only by them all:
               swapping it for one would leave the others holding pages
               published under a parent they do not hold. */
            if (n != LLMKV__NO_SLOT && kv->refcount[p] > 1) break;
            if (n == LLMKV__NO_SLOT) {
                llmkv__node_insert(kv, p, parent, s->ns, ps);
            } else { /* the same tokens are cached: share that page */
                llmkv__page_hold(kv, n);
                t[k] = n;
                llmkv__page_release(kv, p);
                s->epoch = ++kv->epoch;
            }
        }
        ++k;
    }
    s->n_pub = k;
    if (partial && !kv->kfill && k + 1 == s->n_pages && s->length % ps && end >= s->length) {
        uint32_t p = t[k], ntok = s->length - k * ps, lcp;
        const llmkv_token* pt = kv->tok + (size_t)p * ps;
        uint32_t parent = k ? t[k - 1] : LLMKV__NO_SLOT;
        /* Only a page no other sequence holds: a fork may hold more of it. */
        if (kv->nodes[p].ntok == 0 && kv->refcount[p] == 1 && llmkv__tokens_known(pt, ntok)) {
            llmkv__best_child(kv, parent, s->ns, pt, ntok, &lcp);
            if (lcp < ntok) llmkv__node_insert(kv, p, parent, s->ns, ntok);
        }
    }
}

/* The walk's hashing stage for page i of t: extends the chain state h
   (returned), records the page's bucket index in ring[] (and its hash in
   hring[] when ps > 1) and prefetches the bucket. */
LLMKV__FORCE_INLINE uint64_t llmkv__walk_hash(uint64_t h, const llmkv_token* t, uint32_t i, uint32_t ps, uint64_t nb,
                                              const uint32_t* heads, uint32_t* ring, uint32_t* hring) {
    uint32_t hb;
    h = llmkv__chain_step(h, t + (size_t)i * ps, ps);
    hb = llmkv__full_hash(h);
    ring[i % 32] = (uint32_t)llmkv__bucket_index(nb, hb);
    if (ps > 1) hring[i % 32] = hb;
    LLMKV__PREFETCH(&heads[ring[i % 32]]);
    return h;
}

/* The full pages of the walk (see llmkv__prefix_walk): how many of
   t[0, pages * ps) are cached, their ids into path[] when not NULL, the
   last into *deepest. pages >= 1. Inlined with ps a constant 1 and with
   the cache's page size, so page size 1 runs without the token loops.

   Page 0 is looked up alone: a prompt the index does not hold costs one
   lookup. Past it, a rolling pipeline: page d + 17 is hashed and its
   bucket prefetched, page d + 9's bucket head read and its key (and
   tokens) prefetched, and page d verified, so the memory latency of a
   large index overlaps. The chain state h is the loop's one serial
   dependency (one multiply a page at page size 1), so the loop keeps it
   in a register: one page hashed per iteration, no inner loop. The
   bucket's head is checked inline (it is the sought node unless a later
   node took its bucket and no match moved it back, see
   llmkv__chain_front); only then is the chain searched. */
LLMKV__FORCE_INLINE uint32_t llmkv__walk_full(const llmkv_cache* kv, uint64_t ns, const llmkv_token* t, uint32_t pages,
                                              uint32_t ps, uint32_t* path, uint32_t* deepest) {
    /* The table's fields in locals: path[] stores could alias them. */
    const llmkv__key* keys = kv->keys;
    const uint32_t* heads = kv->heads; /* the full-key table */
    const llmkv_token* tok = kv->tok;
    const uint64_t nb = kv->n_buckets;
    uint32_t node, d, p, hashed;
    uint32_t ring[32], hring[32]; /* per page: bucket index; hash (page size > 1) */
    uint64_t h = llmkv__chain_step(llmkv__root_chain(ns), t, ps);
    node = llmkv__find_full(kv, LLMKV__NO_SLOT, ns, t, llmkv__full_hash(h));
    *deepest = node;
    if (node == LLMKV__NO_SLOT) return 0;
    if (path) path[0] = node;
    for (hashed = 1; hashed < pages && hashed < 18; ++hashed)
        h = llmkv__walk_hash(h, t, hashed, ps, nb, heads, ring, hring);
    for (d = 1; d < pages; ++d) {
        const llmkv_token* td = t + (size_t)d * ps;
        const llmkv__key* k;
        p = heads[ring[d % 32]];
        if (p == LLMKV__NO_SLOT) break;
        k = &keys[p];
        /* Exact: below the root a node's namespace is its parent's; the
           hash only spares a token comparison. */
        if (!(k->tok0 == td[0] && k->parent == node &&
              (ps == 1 || (k->hash_full == hring[d % 32] &&
                           llmkv__tokens_equal(tok + (size_t)p * ps + 1, td + 1, ps - 1))))) {
            p = llmkv__chain_find(kv, k->full_next, node, ns, td, ps == 1 ? 0 : hring[d % 32]);
            if (p == LLMKV__NO_SLOT) break;
        }
        if (path) path[d] = p;
        node = p;
        if (hashed < pages) h = llmkv__walk_hash(h, t, hashed++, ps, nb, heads, ring, hring);
        if (d + 9 < hashed && (p = heads[ring[(d + 9) % 32]]) != LLMKV__NO_SLOT) {
            LLMKV__PREFETCH(&keys[p]);
            if (ps > 1) LLMKV__PREFETCH(tok + (size_t)p * ps);
        }
    }
    *deepest = node;
    return d;
}

/* llmkv__walk_full's two instances, page size 1 and any other, each a
   function of its own: inlined into their caller, they shared its
   registers and the page-size-1 loop took 5% longer. */
LLMKV__NOINLINE uint32_t llmkv__walk_full1(const llmkv_cache* kv, uint64_t ns, const llmkv_token* t, uint32_t pages, uint32_t* path,
                                  uint32_t* deepest) {
    return llmkv__walk_full(kv, ns, t, pages, 1, path, deepest);
}
LLMKV__NOINLINE uint32_t llmkv__walk_fullp(const llmkv_cache* kv, uint64_t ns, const llmkv_token* t, uint32_t pages, uint32_t* path,
                                  uint32_t* deepest) {
    return llmkv__walk_full(kv, ns, t, pages, kv->layout.page_size, path, deepest);
}

/* Longest cached prefix of t[0, limit) in namespace ns: *n_full full pages
   (their ids into path[] when path is not NULL; *deepest the last, or
   NO_SLOT), then *cand, the node sharing *lcp more tokens (NO_SLOT, 0 when
   none). Returns the match length. Reads only. */
static uint32_t llmkv__prefix_walk(const llmkv_cache* kv, uint64_t ns, const llmkv_token* t, uint32_t limit, uint32_t* path,
                                   uint32_t* n_full, uint32_t* deepest, uint32_t* cand, uint32_t* lcp) {
    uint32_t ps = kv->layout.page_size, node = LLMKV__NO_SLOT, d = 0, c = LLMKV__NO_SLOT, l = 0;
    if (limit >= ps)
        d = ps == 1 ? llmkv__walk_full1(kv, ns, t, limit, path, &node)
                    : llmkv__walk_fullp(kv, ns, t, limit / ps, path, &node);
    if ((uint64_t)d * ps < limit) c = llmkv__best_child(kv, node, ns, t + (size_t)d * ps, limit - d * ps, &l);
    *n_full = d;
    *deepest = node;
    *cand = l ? c : LLMKV__NO_SLOT;
    *lcp = l;
    return d * ps + l;
}

static llmkv_result llmkv__seq_create_unlocked(llmkv_cache* cache, llmkv_seq* out) {
    uint32_t slot;
    llmkv__seq* s;
    if (out) out->id = 0; /* the never-valid handle, until this succeeds */
    if (!cache || !out) return LLMKV_ERR_INVALID_ARGUMENT;
    if (cache->free_head == LLMKV__NO_SLOT) return LLMKV_ERR_TOO_MANY_SEQUENCES;
    slot = cache->free_head;
    s = &cache->seqs[slot];
    cache->free_head = s->next_free;
    if (cache->free_head == LLMKV__NO_SLOT) cache->free_tail = LLMKV__NO_SLOT;
    s->live = 1;
    s->length = 0;
    s->n_pages = 0;
    s->n_pub = 0;
    s->tok_gap = LLMKV__NO_SLOT;
    s->ns = 0;
    s->epoch = ++cache->epoch;
    s->next_free = LLMKV__NO_SLOT;
    cache->n_live++;
    out->id = llmkv__handle_id(cache->seq_ids, s->gen, slot);
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_seq_create(llmkv_cache* cache, llmkv_seq* out) {
    LLMKV__RETURN_LOCKED(cache, llmkv__seq_create_unlocked(cache, out));
}

/* Returns a slot to the FIFO with a new generation, so old handles fail. */
static void llmkv__slot_release(llmkv_cache* kv, uint32_t slot) {
    llmkv__seq* s = &kv->seqs[slot];
    s->live = 0;
    s->length = 0;
    s->n_pages = 0;
    s->n_pub = 0;
    s->ns = 0;
    if (kv->written) memset(llmkv__written(kv, slot), 0, (size_t)kv->layout.n_layers * 2 * 4);
    if (kv->kfill) {
        uint32_t l;
        for (l = 0; l < kv->layout.n_layers; ++l) kv->kfill[(size_t)slot * kv->layout.n_layers + l] = LLMKV__NO_SLOT;
    }
    s->gen = llmkv__next_gen(kv->seq_ids, s->gen);
    s->next_free = LLMKV__NO_SLOT;
    if (kv->free_tail == LLMKV__NO_SLOT) kv->free_head = slot;
    else kv->seqs[kv->free_tail].next_free = slot;
    kv->free_tail = slot;
    kv->n_live--;
}

static llmkv_result llmkv__seq_free_unlocked(llmkv_cache* cache, llmkv_seq seq) {
    uint32_t slot, i;
    llmkv__seq* s;
    const uint32_t* t;
    if (!cache) return LLMKV_ERR_INVALID_ARGUMENT;
    s = llmkv__lookup(cache, seq, &slot);
    if (!s) return LLMKV_ERR_STALE_HANDLE;
    if (cache->nodes) llmkv__publish(cache, slot, 0);
    t = llmkv__table(cache, slot);
    for (i = s->n_pages; i-- > 0;) llmkv__page_release(cache, t[i]); /* deepest first: see LRU order */
    llmkv__slot_release(cache, slot);
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_seq_free(llmkv_cache* cache, llmkv_seq seq) {
    LLMKV__RETURN_LOCKED(cache, llmkv__seq_free_unlocked(cache, seq));
}

LLMKV_API llmkv_result llmkv_seq_length(const llmkv_cache* cache, llmkv_seq seq, uint32_t* length) {
    const llmkv__seq* s;
    if (length) *length = 0;
    if (!cache || !length) return LLMKV_ERR_INVALID_ARGUMENT;
    s = llmkv__lookup(cache, seq, NULL);
    if (!s) return LLMKV_ERR_STALE_HANDLE;
    *length = s->length;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_seq_pages(const llmkv_cache* cache, llmkv_seq seq, uint32_t* pages,
                                       uint32_t max_pages, uint32_t* n_pages) {
    const llmkv__seq* s;
    uint32_t slot;
    if (n_pages) *n_pages = 0;
    if (!cache || !n_pages || (!pages && max_pages)) return LLMKV_ERR_INVALID_ARGUMENT;
    s = llmkv__lookup(cache, seq, &slot);
    if (!s) return LLMKV_ERR_STALE_HANDLE;
    *n_pages = s->n_pages;
    if (s->n_pages > max_pages) return LLMKV_ERR_BUFFER_TOO_SMALL;
    if (s->n_pages) memcpy(pages, llmkv__table(cache, slot), (size_t)s->n_pages * 4);
    return LLMKV_OK;
}

/* The tail page a reserve of n_tokens writes into when it is shared (the
   new slots start inside it), or LLMKV__NO_SLOT. */
static uint32_t llmkv__shared_tail(const llmkv_cache* kv, uint32_t slot, const llmkv__seq* s, uint32_t n_tokens) {
    uint32_t p;
    if (n_tokens == 0 || s->length % kv->layout.page_size == 0) return LLMKV__NO_SLOT;
    p = llmkv__table(kv, slot)[s->n_pages - 1];
    return kv->refcount[p] > 1 ? p : LLMKV__NO_SLOT;
}

/* reserve_many with optional token ids (tokens NULL: all unknown). */
static llmkv_result llmkv__reserve(llmkv_cache* cache, const llmkv_seq* seqs, const uint32_t* n_tokens,
                                   const llmkv_token* const* tokens, uint32_t n_seqs) {
    uint64_t pages_needed = 0, copies_needed = 0;
    uint32_t i, j, mark, ps, slot = 0;
    if (!cache || (n_seqs && (!seqs || !n_tokens))) return LLMKV_ERR_INVALID_ARGUMENT;
    ps = cache->layout.page_size;
    mark = ++cache->mark;
    if (mark == 0) { /* the stamp wrapped: clear stale marks once */
        for (i = 0; i < cache->desc.max_seqs; ++i) cache->seqs[i].mark = 0;
        mark = cache->mark = 1;
    }
    /* Validate everything before counting or touching state. */
    for (i = 0; i < n_seqs; ++i) {
        llmkv__seq* s = llmkv__lookup(cache, seqs[i], &slot);
        if (!s) return LLMKV_ERR_STALE_HANDLE;
        if (s->mark == mark) return LLMKV_ERR_INVALID_ARGUMENT; /* listed twice */
        s->mark = mark;
        if (n_tokens[i] > cache->desc.max_seq_len - s->length) return LLMKV_ERR_SEQUENCE_TOO_LONG;
        if (tokens && tokens[i] && !llmkv__tokens_known(tokens[i], n_tokens[i])) return LLMKV_ERR_INVALID_ARGUMENT;
    }
    /* Count pages. A shared tail page with w writers among r references
       needs min(w, r - 1) copies: the last writer left holds it alone.
       scratch[] is all zero between calls; writers are counted there and
       the entries touched are zeroed again in the second loop. */
    for (i = 0; i < n_seqs; ++i) {
        const llmkv__seq* s = llmkv__lookup(cache, seqs[i], &slot);
        uint32_t p = llmkv__shared_tail(cache, slot, s, n_tokens[i]);
        if (n_tokens[i]) pages_needed += llmkv__div_up(s->length + n_tokens[i], ps) - s->n_pages;
        if (p != LLMKV__NO_SLOT) cache->scratch[p]++;
    }
    for (i = 0; i < n_seqs; ++i) {
        const llmkv__seq* s = llmkv__lookup(cache, seqs[i], &slot);
        uint32_t p = llmkv__shared_tail(cache, slot, s, n_tokens[i]), w;
        if (p == LLMKV__NO_SLOT || cache->scratch[p] == 0) continue;
        w = cache->scratch[p];
        copies_needed += w < cache->refcount[p] - 1 ? w : cache->refcount[p] - 1;
        cache->scratch[p] = 0;
    }
    pages_needed += copies_needed;
    if (pages_needed > llmkv__avail(cache)) return LLMKV_ERR_OUT_OF_PAGES;
    if (!cache->pool && copies_needed > cache->copy_cap - cache->copy_count) return LLMKV_ERR_COPY_QUEUE_FULL;
    /* Apply: nothing below can fail. Publishing first (full pages only: it
       neither needs pages nor makes a written tail page shared). */
    for (i = 0; i < n_seqs && cache->nodes; ++i) {
        llmkv__lookup(cache, seqs[i], &slot);
        llmkv__publish(cache, slot, 0);
    }
    for (i = 0; i < n_seqs; ++i) {
        uint32_t new_len, new_pages;
        uint32_t* t;
        llmkv__seq* s = llmkv__lookup(cache, seqs[i], &slot);
        if (n_tokens[i] == 0) continue;
        t = llmkv__table(cache, slot);
        if (s->length % ps) llmkv__unshare_range(cache, slot, s->length - 1, s->length);
        new_len = s->length + n_tokens[i];
        new_pages = llmkv__div_up(new_len, ps);
        while (s->n_pages < new_pages) t[s->n_pages++] = llmkv__page_take(cache);
        if (cache->tok && !(tokens && tokens[i]) && s->tok_gap > s->length) s->tok_gap = s->length;
        if (cache->tok)
            for (j = s->length; j < new_len; ++j)
                cache->tok[(size_t)t[j / ps] * ps + j % ps] =
                    tokens && tokens[i] ? tokens[i][j - s->length] : (llmkv_token)-1;
        s->length = new_len;
        s->epoch = ++cache->epoch;
    }
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_reserve_many(llmkv_cache* cache, const llmkv_seq* seqs, const uint32_t* n_tokens,
                                          uint32_t n_seqs) {
    LLMKV__RETURN_LOCKED(cache, llmkv__reserve(cache, seqs, n_tokens, NULL, n_seqs));
}

LLMKV_API llmkv_result llmkv_reserve(llmkv_cache* cache, llmkv_seq seq, uint32_t n_tokens) {
    LLMKV__RETURN_LOCKED(cache, llmkv__reserve(cache, &seq, &n_tokens, NULL, 1));
}

/* The token variants: whether the index exists is fixed at creation, so it
   is checked before taking the lock. */
LLMKV_API llmkv_result llmkv_reserve_many_tokens(llmkv_cache* cache, const llmkv_seq* seqs,
                                                 const uint32_t* n_tokens, const llmkv_token* const* tokens,
                                                 uint32_t n_seqs) {
    if (cache && !cache->nodes) return LLMKV_ERR_UNSUPPORTED;
    LLMKV__RETURN_LOCKED(cache, llmkv__reserve(cache, seqs, n_tokens, tokens, n_seqs));
}

LLMKV_API llmkv_result llmkv_reserve_tokens(llmkv_cache* cache, llmkv_seq seq, const llmkv_token* tokens,
                                            uint32_t n_tokens) {
    if (cache && !cache->nodes) return LLMKV_ERR_UNSUPPORTED;
    LLMKV__RETURN_LOCKED(cache, llmkv__reserve(cache, &seq, &n_tokens, &tokens, 1));
}

/* The type gather writes for a part stored as `stored` when asked for
   `asked`: DEFAULT keeps float storage as it is and gives F32 for the
   quantized types. */
static llmkv_dtype llmkv__gather_type(llmkv_dtype stored, llmkv_dtype asked) {
    if (asked != LLMKV_DTYPE_DEFAULT) return asked;
    return llmkv__dtype_quant(stored) || llmkv__dtype_channel(stored) ? LLMKV_DTYPE_F32 : stored;
}

/* Checks a token-row buffer argument; 0 stride means packed rows. */
static llmkv_result llmkv__rows(const void* p, size_t* stride, size_t row_bytes, llmkv_dtype t) {
    if (!p) return LLMKV_OK;
    if (*stride == 0) *stride = row_bytes;
    if (*stride < row_bytes) return LLMKV_ERR_BUFFER_TOO_SMALL;
    if ((uintptr_t)p % llmkv_dtype_size(t) || *stride % llmkv_dtype_size(t)) return LLMKV_ERR_MISALIGNED;
    return LLMKV_OK;
}

/* Writes positions [first, end) of one layer of sequence slot `slot`, whose
   pages there are already its own, from the caller's rows (K and/or V,
   type src_dtype, validated by the caller), marks those pages dirty and
   raises the written marks. */
static void llmkv__put_rows(llmkv_cache* cache, uint32_t slot, uint32_t layer, uint32_t first, uint32_t end,
                            const void* k, size_t k_stride, const void* v, size_t v_stride, llmkv_dtype src_dtype) {
    const llmkv_layout* l = &cache->layout;
    const uint32_t* t = llmkv__table(cache, slot);
    int simd = (int)(cache->cpu_paths >> LLMKV_CPU_PATH_AVX2 & 1u);
    size_t elem = llmkv_dtype_size(src_dtype);
    uint32_t i, h, part;
    for (i = first / l->page_size; i <= (end - 1) / l->page_size; ++i) cache->dirty[t[i]] = 1;
    for (part = 0; part < 2; ++part) {
        const llmkv_part_layout* pl = part ? &l->v : &l->k;
        const unsigned char* src = (const unsigned char*)(part ? v : k);
        size_t stride = part ? v_stride : k_stride;
        int quant = llmkv__dtype_quant(pl->dtype);
        if (!src) continue;
        if (llmkv__dtype_channel(pl->dtype)) {
            llmkv__put_channel(cache, slot, layer, first, end, src, stride, src_dtype, simd);
            continue;
        }
        for (i = 0; i < end - first; ++i) {
            uint32_t pos = first + i;
            unsigned char* page = cache->pool + t[pos / l->page_size] * l->page_bytes + layer * l->layer_stride;
            unsigned char* dst = page + pl->offset + (pos % l->page_size) * pl->slot_stride;
            unsigned char* sc = page + pl->scale_offset + (pos % l->page_size) * pl->scale_slot_stride;
            const unsigned char* row_src = src + i * stride;
            for (h = 0; h < l->n_kv_heads; ++h) {
                const unsigned char* hs = row_src + (size_t)h * l->head_dim * elem;
                if (quant) { /* from F32: the caller's row itself (aligned: llmkv__rows) */
                    float x[512];
                    const float* xf = (const float*)(const void*)hs;
                    if (src_dtype != LLMKV_DTYPE_F32) {
                        llmkv__convert(x, LLMKV_DTYPE_F32, hs, src_dtype, l->head_dim, simd);
                        xf = x;
                    }
                    llmkv__quantize_vec(pl->dtype, xf, l->head_dim, dst + h * pl->head_stride,
                                        sc + h * pl->scale_head_stride, cache->cpu_paths);
                } else {
                    llmkv__convert(dst + h * pl->head_stride, pl->dtype, hs, src_dtype, l->head_dim, simd);
                }
            }
        }
    }
    if (cache->written) { /* the prefix index publishes only written positions */
        uint32_t* w = llmkv__written(cache, slot) + (size_t)layer * 2;
        if (k && first <= w[0] && end > w[0]) w[0] = end;
        if (v && first <= w[1] && end > w[1]) w[1] = end;
    }
}

LLMKV_API llmkv_result llmkv_put(llmkv_cache* cache, llmkv_seq seq, uint32_t layer, uint32_t n_tokens,
                                 const void* k, size_t k_stride, const void* v, size_t v_stride,
                                 llmkv_dtype src_dtype) {
    const llmkv_layout* l;
    llmkv__seq* s;
    uint32_t slot, first, shared, stale;
    size_t row;
    llmkv_result r;
    if (!cache) return LLMKV_ERR_INVALID_ARGUMENT;
    l = &cache->layout;
    s = llmkv__lookup(cache, seq, &slot);
    if (!s) return LLMKV_ERR_STALE_HANDLE;
    if (src_dtype == LLMKV_DTYPE_DEFAULT) src_dtype = LLMKV_DTYPE_F32;
    if (!llmkv__dtype_valid(src_dtype)) return LLMKV_ERR_INVALID_ARGUMENT;
    if (layer >= l->n_layers || n_tokens > s->length) return LLMKV_ERR_OUT_OF_RANGE;
    row = (size_t)l->n_kv_heads * l->head_dim * llmkv_dtype_size(src_dtype);
    if ((r = llmkv__rows(k, &k_stride, row, src_dtype)) != LLMKV_OK) return r;
    if ((r = llmkv__rows(v, &v_stride, row, src_dtype)) != LLMKV_OK) return r;
    if (!cache->pool) return LLMKV_ERR_NO_PAGE_DATA;
    if (n_tokens == 0 || (!k && !v)) return LLMKV_OK;
    first = s->length - n_tokens;
    /* Reference counts are shared metadata: the copy-on-write decision is
       taken under the lock; the bytes are then written outside it (every
       page in the range is this sequence's own from here on). */
    llmkv__lock(cache);
    /* Q4C: an older staged page this put must quantize is written too. */
    stale = k ? llmkv__channel_stale(cache, slot, layer, first, s->length) : LLMKV__NO_SLOT;
    shared = llmkv__shared_in_range(cache, slot, first, s->length) +
             (stale != LLMKV__NO_SLOT ? llmkv__shared_in_range(cache, slot, stale, stale + l->page_size) : 0);
    if (shared) {
        if (shared > llmkv__avail(cache)) {
            llmkv__unlock(cache);
            return LLMKV_ERR_OUT_OF_PAGES;
        }
        llmkv__unshare_range(cache, slot, first, s->length);
        if (stale != LLMKV__NO_SLOT) llmkv__unshare_range(cache, slot, stale, stale + l->page_size);
        s->epoch = ++cache->epoch;
    }
    llmkv__unlock(cache);
    llmkv__put_rows(cache, slot, layer, first, s->length, k, k_stride, v, v_stride, src_dtype);
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_gather(const llmkv_cache* cache, llmkv_seq seq, uint32_t layer, uint32_t pos,
                                    uint32_t n_tokens, void* k, size_t k_stride, void* v, size_t v_stride,
                                    llmkv_dtype dst_dtype) {
    const llmkv_layout* l;
    const llmkv__seq* s;
    const uint32_t* t;
    uint32_t slot, i, h, part;
    llmkv_result r;
    int simd;
    if (!cache) return LLMKV_ERR_INVALID_ARGUMENT;
    l = &cache->layout;
    simd = (int)(cache->cpu_paths >> LLMKV_CPU_PATH_AVX2 & 1u);
    s = llmkv__lookup(cache, seq, &slot);
    if (!s) return LLMKV_ERR_STALE_HANDLE;
    if (dst_dtype != LLMKV_DTYPE_DEFAULT && !llmkv__dtype_valid(dst_dtype)) return LLMKV_ERR_INVALID_ARGUMENT;
    if (layer >= l->n_layers || pos > s->length || n_tokens > s->length - pos) return LLMKV_ERR_OUT_OF_RANGE;
    for (part = 0; part < 2; ++part) {
        const llmkv_part_layout* pl = part ? &l->v : &l->k;
        llmkv_dtype out_t = llmkv__gather_type(pl->dtype, dst_dtype);
        size_t row = (size_t)l->n_kv_heads * l->head_dim * llmkv_dtype_size(out_t);
        if ((r = llmkv__rows(part ? v : k, part ? &v_stride : &k_stride, row, out_t)) != LLMKV_OK) return r;
    }
    if (!cache->pool) return LLMKV_ERR_NO_PAGE_DATA;
    t = llmkv__table(cache, slot);
    for (part = 0; part < 2; ++part) {
        const llmkv_part_layout* pl = part ? &l->v : &l->k;
        llmkv_dtype out_t = llmkv__gather_type(pl->dtype, dst_dtype);
        size_t out_head = (size_t)l->head_dim * llmkv_dtype_size(out_t);
        unsigned char* dst = (unsigned char*)(part ? v : k);
        size_t stride = part ? v_stride : k_stride;
        int quant = llmkv__dtype_quant(pl->dtype), channel = llmkv__dtype_channel(pl->dtype);
        uint32_t kf = channel ? cache->kfill[(size_t)slot * l->n_layers + layer] : LLMKV__NO_SLOT;
        if (!dst) continue;
        for (i = 0; i < n_tokens; ++i) {
            uint32_t p = pos + i;
            if (channel) { /* staged at F16, or per-channel codes */
                const unsigned char* page = llmkv__page_layer(cache, t[p / l->page_size], layer);
                for (h = 0; h < l->n_kv_heads; ++h) {
                    unsigned char* out = dst + i * stride + h * out_head;
                    float x[LLMKV__MAX_HEAD_DIM];
                    uint32_t c;
                    if (kf == p / l->page_size * l->page_size) {
                        llmkv__convert(out, out_t,
                                       llmkv__stage_block(cache, slot, layer) +
                                           ((size_t)h * l->page_size + p % l->page_size) * l->head_dim,
                                       LLMKV_DTYPE_F16, l->head_dim, simd);
                        continue;
                    }
                    for (c = 0; c < l->head_dim; ++c)
                        x[c] = llmkv__channel_value(page + pl->offset + h * pl->head_stride +
                                                        (p % l->page_size) * pl->slot_stride,
                                                    page + pl->scale_offset + h * pl->scale_head_stride, c);
                    llmkv__convert(out, out_t, x, LLMKV_DTYPE_F32, l->head_dim, simd);
                }
                continue;
            }
            const unsigned char* page = cache->pool + t[p / l->page_size] * l->page_bytes + layer * l->layer_stride;
            const unsigned char* src = page + pl->offset + (p % l->page_size) * pl->slot_stride;
            const unsigned char* sc = page + pl->scale_offset + (p % l->page_size) * pl->scale_slot_stride;
            for (h = 0; h < l->n_kv_heads; ++h) {
                unsigned char* out = dst + i * stride + h * out_head;
                if (quant) { /* to F32: straight into the caller's row (aligned: llmkv__rows) */
                    float x[512];
                    float* xf = out_t == LLMKV_DTYPE_F32 ? (float*)(void*)out : x;
                    llmkv__dequantize_vec(pl->dtype, src + h * pl->head_stride, sc + h * pl->scale_head_stride,
                                          l->head_dim, xf);
                    if (xf == x) llmkv__convert(out, out_t, x, LLMKV_DTYPE_F32, l->head_dim, simd);
                } else {
                    llmkv__convert(out, out_t, src + h * pl->head_stride, pl->dtype, l->head_dim, simd);
                }
            }
        }
    }
    return LLMKV_OK;
}

static llmkv_result llmkv__fork_unlocked(llmkv_cache* cache, llmkv_seq src, llmkv_seq* out) {
    llmkv__seq *s, *d;
    uint32_t src_slot = 0, dst_slot = 0, i;
    const uint32_t* st;
    llmkv_seq h;
    llmkv_result r;
    if (out) out->id = 0;
    if (!cache || !out) return LLMKV_ERR_INVALID_ARGUMENT;
    s = llmkv__lookup(cache, src, &src_slot);
    if (!s) return LLMKV_ERR_STALE_HANDLE;
    r = llmkv__seq_create_unlocked(cache, &h);
    if (r != LLMKV_OK) return r;
    d = llmkv__lookup(cache, h, &dst_slot);
    st = llmkv__table(cache, src_slot);
    memcpy(llmkv__table(cache, dst_slot), st, (size_t)s->n_pages * 4);
    for (i = 0; i < s->n_pages; ++i) cache->refcount[st[i]]++;
    d->length = s->length;
    d->n_pages = s->n_pages;
    d->n_pub = s->n_pub;
    d->tok_gap = s->tok_gap;
    d->ns = s->ns;
    if (cache->written)
        memcpy(llmkv__written(cache, dst_slot), llmkv__written(cache, src_slot),
               (size_t)cache->layout.n_layers * 2 * 4);
    if (cache->kfill) { /* Q4C: the staged keys are the sequence's own */
        uint32_t l, L = cache->layout.n_layers;
        for (l = 0; l < L; ++l) {
            uint32_t kf = cache->kfill[(size_t)src_slot * L + l];
            cache->kfill[(size_t)dst_slot * L + l] = kf;
            if (kf != LLMKV__NO_SLOT)
                memcpy(llmkv__stage_block(cache, dst_slot, l), llmkv__stage_block(cache, src_slot, l),
                       (size_t)llmkv__stage_layer_elems(&cache->layout) * 2);
        }
    }
    /* The source's pages just became read-only: batches that could write
       through its slot mapping must be rebuilt. */
    s->epoch = ++cache->epoch;
    *out = h;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_fork(llmkv_cache* cache, llmkv_seq src, llmkv_seq* out) {
    LLMKV__RETURN_LOCKED(cache, llmkv__fork_unlocked(cache, src, out));
}

static llmkv_result llmkv__truncate_unlocked(llmkv_cache* cache, llmkv_seq seq, uint32_t n_tokens) {
    llmkv__seq* s;
    uint32_t slot, keep;
    const uint32_t* t;
    if (!cache) return LLMKV_ERR_INVALID_ARGUMENT;
    s = llmkv__lookup(cache, seq, &slot);
    if (!s) return LLMKV_ERR_STALE_HANDLE;
    if (n_tokens > s->length) return LLMKV_ERR_OUT_OF_RANGE;
    if (n_tokens == s->length) return LLMKV_OK;
    t = llmkv__table(cache, slot);
    keep = llmkv__div_up(n_tokens, cache->layout.page_size);
    while (s->n_pages > keep) llmkv__page_release(cache, t[--s->n_pages]);
    if (s->n_pub > n_tokens / cache->layout.page_size) s->n_pub = n_tokens / cache->layout.page_size;
    if (s->tok_gap >= n_tokens) s->tok_gap = LLMKV__NO_SLOT;
    if (cache->written) {
        uint32_t* w = llmkv__written(cache, slot);
        for (keep = 0; keep < cache->layout.n_layers * 2; ++keep)
            if (w[keep] > n_tokens) w[keep] = n_tokens;
    }
    if (cache->kfill) { /* Q4C: a staged page that starts past the end is gone; a
                             full page that becomes the last is staged */
        uint32_t l, L = cache->layout.n_layers, ps = cache->layout.page_size;
        for (l = 0; l < L; ++l) {
            uint32_t* kf = &cache->kfill[(size_t)slot * L + l];
            if (*kf != LLMKV__NO_SLOT && *kf >= n_tokens) *kf = LLMKV__NO_SLOT;
            if (n_tokens % ps && *kf == LLMKV__NO_SLOT) llmkv__channel_stage(cache, slot, l, n_tokens / ps, n_tokens % ps);
        }
    }
    s->length = n_tokens;
    s->epoch = ++cache->epoch;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_truncate(llmkv_cache* cache, llmkv_seq seq, uint32_t n_tokens) {
    LLMKV__RETURN_LOCKED(cache, llmkv__truncate_unlocked(cache, seq, n_tokens));
}

/* --- Prefix index: public calls ---------------------------------------- */

LLMKV_API llmkv_result llmkv_seq_tokens(const llmkv_cache* cache, llmkv_seq seq, uint32_t pos, uint32_t n_tokens,
                                        llmkv_token* out) {
    const llmkv__seq* s;
    const uint32_t* t;
    uint32_t slot, i, ps;
    if (!cache || (n_tokens && !out)) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!cache->tok) return LLMKV_ERR_UNSUPPORTED;
    s = llmkv__lookup(cache, seq, &slot);
    if (!s) return LLMKV_ERR_STALE_HANDLE;
    if (pos > s->length || n_tokens > s->length - pos) return LLMKV_ERR_OUT_OF_RANGE;
    t = llmkv__table(cache, slot);
    ps = cache->layout.page_size;
    for (i = 0; i < n_tokens; ++i) out[i] = cache->tok[(size_t)t[(pos + i) / ps] * ps + (pos + i) % ps];
    return LLMKV_OK;
}

static llmkv_result llmkv__seq_create_prefix_unlocked(llmkv_cache* cache, uint64_t ns, const llmkv_token* prompt,
                                                      uint32_t n_prompt, llmkv_seq* out, uint32_t* n_cached) {
    uint32_t slot, d = 0, node, cand = LLMKV__NO_SLOT, lcp = 0, matched = 0, k;
    llmkv__seq* s;
    uint32_t* t;
    if (out) out->id = 0;
    if (n_cached) *n_cached = 0;
    if (!cache || !out || !n_cached || !llmkv__tokens_valid(prompt, n_prompt)) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!cache->nodes) return LLMKV_ERR_UNSUPPORTED;
    if (n_prompt > cache->desc.max_seq_len) return LLMKV_ERR_SEQUENCE_TOO_LONG;
    if (cache->free_head == LLMKV__NO_SLOT) return LLMKV_ERR_TOO_MANY_SEQUENCES;
    /* The walk writes the path straight into the row of the slot that
       llmkv_seq_create takes next (an unused row until then). */
    slot = cache->free_head;
    t = llmkv__table(cache, slot);
    if (n_prompt) matched = llmkv__prefix_walk(cache, ns, prompt, n_prompt - 1, t, &d, &node, &cand, &lcp);
    llmkv__seq_create_unlocked(cache, out); /* cannot fail: a slot is free */
    s = &cache->seqs[slot];
    s->ns = ns;
    for (k = 0; k < d; ++k) {
        llmkv__page_hold(cache, t[k]);
        llmkv__chain_front(cache, t[k]);
    }
    if (cand != LLMKV__NO_SLOT) {
        t[d] = cand;
        llmkv__page_hold(cache, cand);
    }
    s->length = matched;
    s->n_pages = d + (cand != LLMKV__NO_SLOT);
    s->n_pub = d;
    for (k = 0; k < cache->layout.n_layers * 2; ++k) llmkv__written(cache, slot)[k] = matched;
    if (cache->kfill && lcp) /* Q4C: the partly used page's keys go to the staging */
        for (k = 0; k < cache->layout.n_layers; ++k) llmkv__channel_stage(cache, slot, k, d, lcp);
    cache->tokens_matched += matched;
    cache->tokens_missed += n_prompt - matched;
    *n_cached = matched;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_seq_create_prefix(llmkv_cache* cache, uint64_t ns, const llmkv_token* prompt,
                                               uint32_t n_prompt, llmkv_seq* out, uint32_t* n_cached) {
    LLMKV__RETURN_LOCKED(cache, llmkv__seq_create_prefix_unlocked(cache, ns, prompt, n_prompt, out, n_cached));
}

static llmkv_result llmkv__prefix_match_unlocked(const llmkv_cache* cache, uint64_t ns, const llmkv_token* tokens,
                                                 uint32_t n_tokens, uint32_t* n_matched) {
    uint32_t d, node, cand, lcp;
    if (n_matched) *n_matched = 0;
    if (!cache || !n_matched || !llmkv__tokens_valid(tokens, n_tokens)) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!cache->nodes) return LLMKV_ERR_UNSUPPORTED;
    if (n_tokens) *n_matched = llmkv__prefix_walk(cache, ns, tokens, n_tokens, NULL, &d, &node, &cand, &lcp);
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_prefix_match(const llmkv_cache* cache, uint64_t ns, const llmkv_token* tokens,
                                          uint32_t n_tokens, uint32_t* n_matched) {
    LLMKV__RETURN_LOCKED(cache, llmkv__prefix_match_unlocked(cache, ns, tokens, n_tokens, n_matched));
}

static llmkv_result llmkv__seq_publish_unlocked(llmkv_cache* cache, llmkv_seq seq, int partial) {
    uint32_t slot;
    if (!cache) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!cache->nodes) return LLMKV_ERR_UNSUPPORTED;
    if (!llmkv__lookup(cache, seq, &slot)) return LLMKV_ERR_STALE_HANDLE;
    llmkv__publish(cache, slot, partial);
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_seq_publish(llmkv_cache* cache, llmkv_seq seq, int partial) {
    LLMKV__RETURN_LOCKED(cache, llmkv__seq_publish_unlocked(cache, seq, partial));
}

static llmkv_result llmkv__seq_mark_written_unlocked(llmkv_cache* cache, llmkv_seq seq, uint32_t n_tokens) {
    const llmkv__seq* s;
    uint32_t slot, i, *w;
    if (!cache) return LLMKV_ERR_INVALID_ARGUMENT;
    s = llmkv__lookup(cache, seq, &slot);
    if (!s) return LLMKV_ERR_STALE_HANDLE;
    if (!cache->written) return LLMKV_OK; /* nothing to record without a prefix index */
    if (n_tokens > s->length) n_tokens = s->length;
    w = llmkv__written(cache, slot);
    for (i = 0; i < cache->layout.n_layers * 2; ++i)
        if (w[i] < n_tokens) w[i] = n_tokens;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_seq_mark_written(llmkv_cache* cache, llmkv_seq seq, uint32_t n_tokens) {
    LLMKV__RETURN_LOCKED(cache, llmkv__seq_mark_written_unlocked(cache, seq, n_tokens));
}

static llmkv__pin* llmkv__pin_lookup(const llmkv_cache* kv, llmkv_pin h) {
    uint32_t slot = llmkv__handle_slot(kv->pin_ids, h.id), gen = llmkv__handle_gen(kv->pin_ids, h.id);
    llmkv__pin* p;
    if (slot >= kv->desc.max_pins) return NULL;
    p = &kv->pins[slot];
    return p->live && p->gen == gen ? p : NULL;
}

static llmkv_result llmkv__prefix_pin_unlocked(llmkv_cache* cache, uint64_t ns, const llmkv_token* tokens,
                                               uint32_t n_tokens, llmkv_pin* out, uint32_t* n_pinned) {
    uint32_t d = 0, node = LLMKV__NO_SLOT, cand = LLMKV__NO_SLOT, lcp = 0, slot, p, pinned;
    llmkv__pin* rec;
    if (out) out->id = 0;
    if (n_pinned) *n_pinned = 0;
    if (!cache || !out || !llmkv__tokens_valid(tokens, n_tokens)) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!cache->nodes) return LLMKV_ERR_UNSUPPORTED;
    if (cache->pin_free == LLMKV__NO_SLOT) return LLMKV_ERR_TOO_MANY_PINS;
    if (n_tokens) llmkv__prefix_walk(cache, ns, tokens, n_tokens, NULL, &d, &node, &cand, &lcp);
    pinned = d * cache->layout.page_size;
    if (cand != LLMKV__NO_SLOT && lcp == cache->nodes[cand].ntok) { /* a partial node, wholly matched */
        node = cand;
        pinned += lcp;
    }
    for (p = node; p != LLMKV__NO_SLOT; p = cache->keys[p].parent) {
        llmkv__node* n = &cache->nodes[p];
        if (llmkv__evictable(cache, p)) llmkv__lru_remove(cache, p);
        if (n->pins++ == 0) cache->n_pinned_pages++;
    }
    slot = cache->pin_free;
    rec = &cache->pins[slot];
    cache->pin_free = rec->next_free;
    rec->live = 1;
    rec->node = node;
    rec->next_free = LLMKV__NO_SLOT;
    cache->n_pins++;
    out->id = llmkv__handle_id(cache->pin_ids, rec->gen, slot);
    if (n_pinned) *n_pinned = pinned;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_prefix_pin(llmkv_cache* cache, uint64_t ns, const llmkv_token* tokens,
                                        uint32_t n_tokens, llmkv_pin* out, uint32_t* n_pinned) {
    LLMKV__RETURN_LOCKED(cache, llmkv__prefix_pin_unlocked(cache, ns, tokens, n_tokens, out, n_pinned));
}

static llmkv_result llmkv__prefix_unpin_unlocked(llmkv_cache* cache, llmkv_pin pin) {
    llmkv__pin* rec;
    uint32_t p;
    if (!cache) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!cache->nodes) return LLMKV_ERR_UNSUPPORTED;
    rec = llmkv__pin_lookup(cache, pin);
    if (!rec) return LLMKV_ERR_STALE_HANDLE;
    for (p = rec->node; p != LLMKV__NO_SLOT; p = cache->keys[p].parent) { /* deepest first */
        llmkv__node* n = &cache->nodes[p];
        if (--n->pins == 0) {
            cache->n_pinned_pages--;
            if (llmkv__evictable(cache, p)) llmkv__lru_push(cache, p);
        }
    }
    rec->live = 0;
    rec->node = LLMKV__NO_SLOT;
    rec->gen = llmkv__next_gen(cache->pin_ids, rec->gen);
    rec->next_free = cache->pin_free;
    cache->pin_free = (uint32_t)(rec - cache->pins);
    cache->n_pins--;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_prefix_unpin(llmkv_cache* cache, llmkv_pin pin) {
    LLMKV__RETURN_LOCKED(cache, llmkv__prefix_unpin_unlocked(cache, pin));
}

static llmkv_result llmkv__prefix_evict_unlocked(llmkv_cache* cache, uint32_t max_pages, uint32_t* n_evicted) {
    uint32_t n = 0;
    if (n_evicted) *n_evicted = 0;
    if (!cache) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!cache->nodes) return LLMKV_ERR_UNSUPPORTED;
    while (n < max_pages && cache->n_evictable) {
        llmkv__evict_one(cache);
        ++n;
    }
    if (n_evicted) *n_evicted = n;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_prefix_evict(llmkv_cache* cache, uint32_t max_pages, uint32_t* n_evicted) {
    LLMKV__RETURN_LOCKED(cache, llmkv__prefix_evict_unlocked(cache, max_pages, n_evicted));
}

static llmkv_result llmkv__copy_cmds_take_unlocked(llmkv_cache* cache, llmkv_copy_cmd* cmds, uint32_t max_cmds,
                                                   uint32_t* n_cmds) {
    uint32_t n, i;
    if (n_cmds) *n_cmds = 0;
    if (!cache || !n_cmds || (!cmds && max_cmds)) return LLMKV_ERR_INVALID_ARGUMENT;
    n = cache->copy_count < max_cmds ? cache->copy_count : max_cmds;
    for (i = 0; i < n; ++i) cmds[i] = cache->copies[(cache->copy_head + i) % cache->copy_cap];
    if (n) cache->copy_head = (cache->copy_head + n) % cache->copy_cap;
    cache->copy_count -= n;
    *n_cmds = n;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_copy_cmds_take(llmkv_cache* cache, llmkv_copy_cmd* cmds, uint32_t max_cmds,
                                            uint32_t* n_cmds) {
    LLMKV__RETURN_LOCKED(cache, llmkv__copy_cmds_take_unlocked(cache, cmds, max_cmds, n_cmds));
}

/* ------------------------------------------------------------------------ */
/* Batches                                                                  */
/* ------------------------------------------------------------------------ */

struct llmkv_batch {
    const llmkv_cache* cache;
    llmkv_allocator alloc;
    void* block;
    size_t block_size;
    uint32_t max_seqs, max_tokens;
    uint32_t n_seqs, n_tokens, block_table_stride;
    uint32_t mark;
    uint64_t builds;          /* llmkv_batch_build calls so far */
    llmkv_seq* seqs;          /* [max_seqs] handles of the built step */
    uint64_t* epochs;         /* [max_seqs] their epochs when built */
    uint32_t* seen;           /* [cache max_seqs] duplicate marks by slot */
    int32_t *qo_indptr, *seq_lens, *kv_indptr, *kv_indices, *kv_last_page_len, *block_table, *positions;
    int64_t* slot_mapping;
};

static uint64_t llmkv__batch_carve(llmkv__carver* c, llmkv_batch* b, const llmkv_cache* kv, uint32_t ms, uint32_t mt) {
    uint64_t entries = (uint64_t)ms * kv->max_pages_per_seq;
    llmkv__carve(c, sizeof(llmkv_batch));
    b->seqs = (llmkv_seq*)llmkv__carve(c, (uint64_t)ms * sizeof(llmkv_seq));
    b->epochs = (uint64_t*)llmkv__carve(c, (uint64_t)ms * 8);
    b->seen = (uint32_t*)llmkv__carve(c, (uint64_t)kv->desc.max_seqs * 4);
    b->qo_indptr = (int32_t*)llmkv__carve(c, ((uint64_t)ms + 1) * 4);
    b->seq_lens = (int32_t*)llmkv__carve(c, (uint64_t)ms * 4);
    b->kv_indptr = (int32_t*)llmkv__carve(c, ((uint64_t)ms + 1) * 4);
    b->kv_last_page_len = (int32_t*)llmkv__carve(c, (uint64_t)ms * 4);
    b->kv_indices = (int32_t*)llmkv__carve(c, entries * 4);
    b->block_table = (int32_t*)llmkv__carve(c, entries * 4);
    b->positions = (int32_t*)llmkv__carve(c, (uint64_t)mt * 4);
    b->slot_mapping = (int64_t*)llmkv__carve(c, (uint64_t)mt * 8);
    return llmkv__align_up(c->used, LLMKV__ALIGN);
}

LLMKV_API llmkv_result llmkv_batch_create(const llmkv_cache* cache, uint32_t max_seqs, uint32_t max_tokens,
                                          llmkv_batch** out) {
    llmkv__carver c;
    llmkv_batch tmp, *b;
    llmkv_allocator a;
    uint64_t size;
    void* block;
    if (!out) return LLMKV_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!cache || max_seqs == 0 || max_seqs > cache->desc.max_seqs || max_tokens > LLMKV__MAX_LEN)
        return LLMKV_ERR_INVALID_ARGUMENT;
    c.base = NULL;
    c.used = 0;
    size = llmkv__batch_carve(&c, &tmp, cache, max_seqs, max_tokens);
    if (size > (uint64_t)(size_t)-1 / 2) return LLMKV_ERR_OUT_OF_MEMORY;
    a = llmkv__allocator_or_default(&cache->alloc); /* a caller-memory cache has none: the fallback */
    block = a.alloc((size_t)size, LLMKV__ALIGN, a.user);
    if (!block) return LLMKV_ERR_OUT_OF_MEMORY;
    c.base = (unsigned char*)block;
    c.used = 0;
    b = (llmkv_batch*)block;
    memset(b, 0, sizeof *b);
    llmkv__batch_carve(&c, b, cache, max_seqs, max_tokens);
    memset(b->seen, 0, (size_t)cache->desc.max_seqs * 4);
    b->cache = cache;
    b->alloc = a;
    b->block = block;
    b->block_size = (size_t)size;
    b->max_seqs = max_seqs;
    b->max_tokens = max_tokens;
    b->qo_indptr[0] = 0;
    b->kv_indptr[0] = 0;
    *out = b;
    return LLMKV_OK;
}

LLMKV_API void llmkv_batch_destroy(llmkv_batch* batch) {
    llmkv_allocator a;
    if (!batch) return;
    a = batch->alloc;
    a.free(batch->block, batch->block_size, a.user);
}

static llmkv_result llmkv__batch_build_unlocked(llmkv_batch* batch, const llmkv_seq* seqs, const uint32_t* q_lens,
                                                uint32_t n_seqs) {
    const llmkv_cache* kv;
    uint64_t tokens = 0;
    uint32_t i, j, mark, stride = 0, ps, row = 0, idx = 0;
    if (!batch) return LLMKV_ERR_INVALID_ARGUMENT;
    batch->n_seqs = 0;
    batch->n_tokens = 0;
    batch->block_table_stride = 0;
    if (n_seqs && (!seqs || !q_lens)) return LLMKV_ERR_INVALID_ARGUMENT;
    if (n_seqs > batch->max_seqs) return LLMKV_ERR_BATCH_FULL;
    kv = batch->cache;
    ps = kv->layout.page_size;
    mark = ++batch->mark;
    if (mark == 0) {
        memset(batch->seen, 0, (size_t)kv->desc.max_seqs * 4);
        mark = batch->mark = 1;
    }
    for (i = 0; i < n_seqs; ++i) {
        uint32_t slot;
        const llmkv__seq* s = llmkv__lookup(kv, seqs[i], &slot);
        if (!s) return LLMKV_ERR_STALE_HANDLE;
        if (batch->seen[slot] == mark) return LLMKV_ERR_INVALID_ARGUMENT;
        batch->seen[slot] = mark;
        if (q_lens[i] > s->length) return LLMKV_ERR_OUT_OF_RANGE;
        tokens += q_lens[i];
        if (s->n_pages > stride) stride = s->n_pages;
    }
    if (tokens > batch->max_tokens) return LLMKV_ERR_BATCH_FULL;
    for (i = 0; i < n_seqs; ++i) {
        uint32_t slot;
        const llmkv__seq* s = llmkv__lookup(kv, seqs[i], &slot);
        const uint32_t* t = llmkv__table(kv, slot);
        int32_t* bt = batch->block_table + (size_t)i * stride;
        batch->seqs[i] = seqs[i];
        batch->epochs[i] = s->epoch;
        batch->seq_lens[i] = (int32_t)s->length;
        batch->kv_last_page_len[i] = s->length ? (int32_t)(s->length - (s->n_pages - 1) * ps) : 0;
        for (j = 0; j < s->n_pages; ++j) {
            batch->kv_indices[idx + j] = (int32_t)t[j];
            bt[j] = (int32_t)t[j];
        }
        for (; j < stride; ++j) bt[j] = 0;
        idx += s->n_pages;
        batch->kv_indptr[i + 1] = (int32_t)idx;
        for (j = s->length - q_lens[i]; j < s->length; ++j, ++row) {
            batch->positions[row] = (int32_t)j;
            batch->slot_mapping[row] = (int64_t)t[j / ps] * ps + j % ps;
        }
        batch->qo_indptr[i + 1] = (int32_t)row;
    }
    batch->n_seqs = n_seqs;
    batch->n_tokens = row;
    batch->block_table_stride = stride;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_batch_build(llmkv_batch* batch, const llmkv_seq* seqs, const uint32_t* q_lens,
                                         uint32_t n_seqs) {
    if (batch) ++batch->builds;
    LLMKV__RETURN_LOCKED(batch ? batch->cache : NULL, llmkv__batch_build_unlocked(batch, seqs, q_lens, n_seqs));
}

static llmkv_result llmkv__batch_check_unlocked(const llmkv_batch* batch) {
    uint32_t i;
    if (!batch) return LLMKV_ERR_INVALID_ARGUMENT;
    for (i = 0; i < batch->n_seqs; ++i) {
        const llmkv__seq* s = llmkv__lookup(batch->cache, batch->seqs[i], NULL);
        if (!s || s->epoch != batch->epochs[i]) return LLMKV_ERR_STALE_BATCH;
    }
    return LLMKV_OK;
}

LLMKV_API const llmkv_cache* llmkv_batch_cache(const llmkv_batch* batch) { return batch ? batch->cache : NULL; }

LLMKV_API llmkv_result llmkv_batch_check(const llmkv_batch* batch) {
    LLMKV__RETURN_LOCKED(batch ? batch->cache : NULL, llmkv__batch_check_unlocked(batch));
}

LLMKV_API llmkv_result llmkv_batch_get(const llmkv_batch* batch, llmkv_batch_info* info) {
    llmkv_result r;
    if (info) memset(info, 0, sizeof *info);
    if (!batch || !info) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv_batch_check(batch);
    if (r != LLMKV_OK) return r;
    info->n_seqs = batch->n_seqs;
    info->n_tokens = batch->n_tokens;
    info->page_size = batch->cache->layout.page_size;
    info->qo_indptr = batch->qo_indptr;
    info->seq_lens = batch->seq_lens;
    info->kv_indptr = batch->kv_indptr;
    info->kv_indices = batch->kv_indices;
    info->kv_last_page_len = batch->kv_last_page_len;
    info->block_table = batch->block_table;
    info->block_table_stride = batch->block_table_stride;
    info->slot_mapping = batch->slot_mapping;
    info->positions = batch->positions;
    info->build = batch->builds;
    return LLMKV_OK;
}

/* ------------------------------------------------------------------------ */
/* Statistics, planning, presets, checking                                  */
/* ------------------------------------------------------------------------ */

static llmkv_result llmkv__cache_stats_unlocked(llmkv_cache* cache, llmkv_stats* out) {
    uint32_t i, j, ps;
    uint64_t slots = 0;
    if (!cache || !out) return LLMKV_ERR_INVALID_ARGUMENT;
    memset(out, 0, sizeof *out);
    ps = cache->layout.page_size;
    out->n_pages_total = cache->n_pages;
    out->n_pages_free = cache->n_free;
    out->n_seqs = cache->n_live;
    out->n_pending_copies = cache->copy_count;
    out->page_bytes = cache->layout.page_bytes;
    out->pool_bytes = cache->layout.page_bytes * cache->n_pages;
    out->metadata_bytes = cache->meta_bytes;
    out->staging_bytes = cache->stage ? cache->desc.max_seqs * llmkv__stage_slot_elems(&cache->layout) * 2 : 0;
    for (i = 0; i < cache->n_pages; ++i) { /* references held by sequences */
        uint32_t held = cache->refcount[i] - (cache->nodes && cache->nodes[i].ntok ? 1u : 0u);
        out->n_pages_used += held > 0;
        out->n_pages_shared += held > 1;
    }
    out->used_bytes = cache->layout.page_bytes * out->n_pages_used;
    out->n_pages_cached = cache->n_cached;
    out->n_pages_evictable = cache->n_evictable;
    out->n_pages_pinned = cache->n_pinned_pages;
    out->n_pins = cache->n_pins;
    out->n_evictions = cache->n_evictions;
    out->prompt_tokens_matched = cache->tokens_matched;
    out->prompt_tokens_missed = cache->tokens_missed;
    if (cache->tokens_matched + cache->tokens_missed)
        out->hit_rate = (double)cache->tokens_matched / (double)(cache->tokens_matched + cache->tokens_missed);
    /* scratch[p] = the most slots any sequence uses in page p. */
    memset(cache->scratch, 0, (size_t)cache->n_pages * 4);
    for (i = 0; i < cache->desc.max_seqs; ++i) {
        const llmkv__seq* s = &cache->seqs[i];
        const uint32_t* t = llmkv__table(cache, i);
        if (!s->live) continue;
        out->n_tokens += s->length;
        for (j = 0; j < s->n_pages; ++j) {
            uint32_t used = s->length - j * ps < ps ? s->length - j * ps : ps;
            if (used > cache->scratch[t[j]]) cache->scratch[t[j]] = used;
        }
    }
    for (i = 0; i < cache->n_pages; ++i) slots += cache->scratch[i];
    memset(cache->scratch, 0, (size_t)cache->n_pages * 4);
    out->n_slots_used = slots;
    out->n_slots_unused = (uint64_t)out->n_pages_used * ps - slots;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_cache_stats(llmkv_cache* cache, llmkv_stats* out) {
    LLMKV__RETURN_LOCKED(cache, llmkv__cache_stats_unlocked(cache, out));
}

LLMKV_API llmkv_result llmkv_plan_bytes(const llmkv_desc* desc, uint64_t n_tokens, uint64_t* bytes) {
    llmkv_layout l;
    llmkv_result r;
    uint64_t pages;
    if (!bytes) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv_layout_for(desc, &l);
    if (r != LLMKV_OK) return r;
    pages = n_tokens / l.page_size + (n_tokens % l.page_size != 0);
    if (pages && l.page_bytes > (uint64_t)-1 / pages) return LLMKV_ERR_OUT_OF_RANGE;
    *bytes = pages * l.page_bytes;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_plan_tokens(const llmkv_desc* desc, uint64_t bytes, uint64_t* n_tokens) {
    llmkv_layout l;
    llmkv_result r;
    if (!n_tokens) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv_layout_for(desc, &l);
    if (r != LLMKV_OK) return r;
    *n_tokens = bytes / l.page_bytes * l.page_size;
    return LLMKV_OK;
}

/* From each model's published configuration (config.json): layers,
   attention heads, key/value heads, head dimension, context length. */
static const llmkv_model_preset llmkv__presets[] = {
    {"llama-3-8b", 32, 32, 8, 128, 8192},
    {"llama-3.1-8b", 32, 32, 8, 128, 131072},
    {"llama-3-70b", 80, 64, 8, 128, 8192},
    {"llama-3.1-70b", 80, 64, 8, 128, 131072},
    {"llama-2-7b", 32, 32, 32, 128, 4096},
    {"mistral-7b", 32, 32, 8, 128, 32768},
    {"mixtral-8x7b", 32, 32, 8, 128, 32768},
    {"qwen2.5-7b", 28, 28, 4, 128, 32768},
    {"qwen2.5-72b", 80, 64, 8, 128, 32768},
    {"phi-3-mini", 32, 32, 32, 96, 4096},
    {"gemma-2-9b", 42, 16, 8, 256, 8192},
    {"gemma-2-27b", 46, 32, 16, 128, 8192},
    {"stories260k", 5, 8, 4, 8, 512},
};

LLMKV_API const llmkv_model_preset* llmkv_model_presets(uint32_t* count) {
    if (count) *count = (uint32_t)(sizeof llmkv__presets / sizeof llmkv__presets[0]);
    return llmkv__presets;
}

static int llmkv__lower(int c) { return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c; }

LLMKV_API const llmkv_model_preset* llmkv_model_preset_find(const char* name) {
    uint32_t i, n;
    const llmkv_model_preset* p = llmkv_model_presets(&n);
    if (!name) return NULL;
    for (i = 0; i < n; ++i) {
        const char *a = p[i].name, *b = name;
        while (*a && llmkv__lower((unsigned char)*a) == llmkv__lower((unsigned char)*b)) { ++a; ++b; }
        if (!*a && !*b) return &p[i];
    }
    return NULL;
}

LLMKV_API llmkv_result llmkv_desc_from_preset(llmkv_desc* desc, const char* name) {
    const llmkv_model_preset* p = llmkv_model_preset_find(name);
    if (!desc || !p) return LLMKV_ERR_INVALID_ARGUMENT;
    desc->n_layers = p->n_layers;
    desc->n_kv_heads = p->n_kv_heads;
    desc->head_dim = p->head_dim;
    return LLMKV_OK;
}

static llmkv_result llmkv__corrupt(char* msg, size_t size, const char* fmt, ...) {
    va_list ap;
    if (msg && size) {
        va_start(ap, fmt);
        vsnprintf(msg, size, fmt, ap);
        va_end(ap);
    }
    return LLMKV_ERR_CORRUPT;
}

/* The prefix index against its own redundancy: node keys and hash chains,
   child counts, the LRU list (exactly the evictable pages, each below its
   parent in the order), pin counts, and each sequence's published path.
   scratch[] is all zero on entry and on return. */
static llmkv_result llmkv__check_prefix(llmkv_cache* kv, char* msg, size_t size) {
    uint32_t ps = kv->layout.page_size, n = kv->n_pages, p, j, which, cached = 0, full = 0, pinned = 0, count;
    llmkv_result r = LLMKV_OK;
    for (p = 0; p < n; ++p) { /* nodes; children counted in scratch */
        const llmkv__node* d = &kv->nodes[p];
        const llmkv__key* k = &kv->keys[p];
        const llmkv_token* t = kv->tok + (size_t)p * ps;
        if (!d->ntok) continue;
        cached++;
        pinned += d->pins > 0;
        if (d->ntok > ps || !llmkv__tokens_known(t, d->ntok)) {
            r = llmkv__corrupt(msg, size, "node %u: %u tokens, or an unknown one", p, d->ntok);
            goto done;
        }
        if (k->parent != LLMKV__NO_SLOT) {
            if (k->parent >= n || kv->nodes[k->parent].ntok != ps || kv->nodes[k->parent].ns != d->ns) {
                r = llmkv__corrupt(msg, size, "node %u: parent %u is not a full node of its namespace", p, k->parent);
                goto done;
            }
            kv->scratch[k->parent]++;
        }
        if (k->tok0 != t[0] ||
            (d->ntok == ps && (d->chain != llmkv__chain_step(llmkv__parent_chain(kv, k->parent, d->ns), t, ps) ||
                               k->hash_full != llmkv__full_hash(d->chain)))) {
            r = llmkv__corrupt(msg, size, "node %u: its key does not match its tokens", p);
            goto done;
        }
        full += d->ntok == ps;
    }
    if (cached != kv->n_cached || pinned != kv->n_pinned_pages) {
        r = llmkv__corrupt(msg, size, "%u nodes (%u pinned) but the counts say %u (%u)", cached, pinned, kv->n_cached,
                           kv->n_pinned_pages);
        goto done;
    }
    for (p = 0; p < n; ++p)
        if (kv->scratch[p] != (kv->nodes[p].ntok ? kv->nodes[p].n_children : 0)) {
            r = llmkv__corrupt(msg, size, "node %u: %u children, counted %u", p, kv->scratch[p], kv->nodes[p].n_children);
            goto done;
        }
    memset(kv->scratch, 0, (size_t)n * 4);
    for (which = 0; which < 2; ++which) { /* hash chains */
        uint64_t b, nb = kv->n_buckets, total = 0;
        for (b = 0; b < nb; ++b) {
            uint32_t prev = LLMKV__NO_SLOT;
            for (p = kv->heads[which * nb + b]; p != LLMKV__NO_SLOT; p = *llmkv__chain_next(kv, p, (int)which)) {
                const llmkv__node* d;
                const llmkv__key* k;
                if (p >= n || ++total > n) {
                    r = llmkv__corrupt(msg, size, "hash chain %u/%llu is broken", which, (unsigned long long)b);
                    goto done;
                }
                d = &kv->nodes[p];
                k = &kv->keys[p];
                if (!d->ntok || (which == 0 && d->ntok != ps) ||
                    llmkv__bucket(kv, (int)which,
                                  which ? llmkv__first_hash(llmkv__parent_chain(kv, k->parent, d->ns), k->tok0)
                                        : k->hash_full) != kv->heads + which * nb + b ||
                    *llmkv__chain_prev(kv, p, (int)which) != prev) {
                    r = llmkv__corrupt(msg, size, "hash chain %u/%llu: page %u misplaced", which, (unsigned long long)b, p);
                    goto done;
                }
                prev = p;
            }
        }
        if (total != (which ? cached : full)) {
            r = llmkv__corrupt(msg, size, "hash table %u holds %llu nodes of %u", which, (unsigned long long)total,
                               which ? cached : full);
            goto done;
        }
    }
    for (p = 0; p < n; ++p) /* lookups (the chains are finite now) find each full node */
        if (kv->nodes[p].ntok == ps && llmkv__find_full(kv, kv->keys[p].parent, kv->nodes[p].ns, kv->tok + (size_t)p * ps,
                                                        kv->keys[p].hash_full) != p) {
            r = llmkv__corrupt(msg, size, "node %u: not found under its key", p);
            goto done;
        }
    count = 0; /* LRU: scratch[p] = position from the oldest, 1-based */
    for (p = kv->lru_head, j = LLMKV__NO_SLOT; p != LLMKV__NO_SLOT; j = p, p = kv->nodes[p].lru_next) {
        if (p >= n || count >= n || kv->scratch[p] || !llmkv__evictable(kv, p) || kv->nodes[p].lru_prev != j) {
            r = llmkv__corrupt(msg, size, "LRU list is broken at page %u", p);
            goto done;
        }
        kv->scratch[p] = ++count;
    }
    if (count != kv->n_evictable || j != kv->lru_tail) {
        r = llmkv__corrupt(msg, size, "LRU list holds %u pages, count says %u", count, kv->n_evictable);
        goto done;
    }
    for (p = 0; p < n; ++p) {
        uint32_t q = kv->keys[p].parent;
        int ev = llmkv__evictable(kv, p);
        if (!kv->nodes[p].ntok) continue;
        if (ev != (kv->scratch[p] != 0)) {
            r = llmkv__corrupt(msg, size, "page %u: evictable %d but LRU membership %d", p, ev, kv->scratch[p] != 0);
            goto done;
        }
        if (q != LLMKV__NO_SLOT && llmkv__evictable(kv, q) && (!ev || kv->scratch[q] < kv->scratch[p])) {
            r = llmkv__corrupt(msg, size, "page %u: its evictable parent %u would be evicted first", p, q);
            goto done;
        }
    }
    memset(kv->scratch, 0, (size_t)n * 4);
    count = 0; /* pins: recount along each pin's path */
    for (j = 0; j < kv->desc.max_pins; ++j) {
        const llmkv__pin* pr = &kv->pins[j];
        uint32_t depth = 0;
        if (!pr->live) continue;
        count++;
        for (p = pr->node; p != LLMKV__NO_SLOT; p = kv->keys[p].parent) {
            if (p >= n || !kv->nodes[p].ntok || ++depth > n) {
                r = llmkv__corrupt(msg, size, "pin %u: path through page %u is not in the index", j, p);
                goto done;
            }
            kv->scratch[p]++;
        }
    }
    if (count != kv->n_pins) {
        r = llmkv__corrupt(msg, size, "%u live pins, count says %u", count, kv->n_pins);
        goto done;
    }
    for (p = 0; p < n; ++p)
        if (kv->scratch[p] != kv->nodes[p].pins) {
            r = llmkv__corrupt(msg, size, "page %u: pin count %u, pins over it %u", p, kv->nodes[p].pins, kv->scratch[p]);
            goto done;
        }
    for (p = kv->pin_free, count = 0; p != LLMKV__NO_SLOT; p = kv->pins[p].next_free)
        if (p >= kv->desc.max_pins || kv->pins[p].live || ++count > kv->desc.max_pins) {
            r = llmkv__corrupt(msg, size, "free-pin list is broken at %u", p);
            goto done;
        }
    if (count + kv->n_pins != kv->desc.max_pins) {
        r = llmkv__corrupt(msg, size, "%u free + %u live pins != max_pins", count, kv->n_pins);
        goto done;
    }
    for (j = 0; j < kv->desc.max_seqs; ++j) { /* each sequence's published path */
        const llmkv__seq* s = &kv->seqs[j];
        const uint32_t* t = llmkv__table(kv, j);
        const uint32_t* w = llmkv__written(kv, j);
        uint32_t k, gap;
        if (!s->live) continue;
        if ((uint64_t)s->n_pub * ps > s->length) {
            r = llmkv__corrupt(msg, size, "slot %u: %u published pages of %u positions", j, s->n_pub, s->length);
            goto done;
        }
        for (k = 0, gap = 0; k < s->n_pages; ++k) { /* nodes: a prefix of the table, along one path */
            const llmkv__node* d = &kv->nodes[t[k]];
            int on_path = d->ntok && d->ns == s->ns && kv->keys[t[k]].parent == (k ? t[k - 1] : LLMKV__NO_SLOT);
            if ((k < s->n_pub && (!on_path || d->ntok != ps)) || (d->ntok && (!on_path || gap))) {
                r = llmkv__corrupt(msg, size, "slot %u: page %u (id %u) breaks its published path", j, k, t[k]);
                goto done;
            }
            gap |= !d->ntok;
        }
        for (k = 0; k < s->length && k < s->tok_gap; ++k)
            if (kv->tok[(size_t)t[k / ps] * ps + k % ps] < 0) {
                r = llmkv__corrupt(msg, size, "slot %u: unknown token at %u before its gap mark %u", j, k, s->tok_gap);
                goto done;
            }
        for (k = 0; k < kv->layout.n_layers * 2; ++k)
            if (w[k] > s->length) {
                r = llmkv__corrupt(msg, size, "slot %u: written mark %u past its length %u", j, w[k], s->length);
                goto done;
            }
    }
done:
    memset(kv->scratch, 0, (size_t)n * 4);
    return r;
}

static llmkv_result llmkv__check(llmkv_cache* cache, char* message, size_t message_size) {
    uint32_t i, j, ps, live = 0, free_slots = 0, slot;
    ps = cache->layout.page_size;
    /* Page tables: lengths, page counts, ids; recount references. */
    memset(cache->scratch, 0, (size_t)cache->n_pages * 4);
    for (i = 0; i < cache->desc.max_seqs; ++i) {
        const llmkv__seq* s = &cache->seqs[i];
        const uint32_t* t = llmkv__table(cache, i);
        if (s->gen == 0 || s->gen > cache->seq_ids.gen_max)
            return llmkv__corrupt(message, message_size, "slot %u: generation %u out of range", i, s->gen);
        if (!s->live) {
            if (s->length || s->n_pages)
                return llmkv__corrupt(message, message_size, "free slot %u holds %u positions", i, s->length);
            for (j = 0; cache->kfill && j < cache->layout.n_layers; ++j)
                if (cache->kfill[(size_t)i * cache->layout.n_layers + j] != LLMKV__NO_SLOT)
                    return llmkv__corrupt(message, message_size, "free slot %u holds staged keys", i);
            continue;
        }
        live++;
        if (s->length > cache->desc.max_seq_len)
            return llmkv__corrupt(message, message_size, "slot %u: length %u > max_seq_len", i, s->length);
        if (s->n_pages != llmkv__div_up(s->length, ps))
            return llmkv__corrupt(message, message_size, "slot %u: %u pages for %u positions", i, s->n_pages, s->length);
        if (s->epoch > cache->epoch)
            return llmkv__corrupt(message, message_size, "slot %u: epoch from the future", i);
        for (j = 0; cache->kfill && j < cache->layout.n_layers; ++j) {
            uint32_t kf = cache->kfill[(size_t)i * cache->layout.n_layers + j];
            if (kf != LLMKV__NO_SLOT && (kf % ps || kf >= s->length))
                return llmkv__corrupt(message, message_size, "slot %u layer %u: staged page at %u of %u positions", i,
                                      j, kf, s->length);
        }
        for (j = 0; j < s->n_pages; ++j) {
            if (t[j] >= cache->n_pages)
                return llmkv__corrupt(message, message_size, "slot %u: page %u of its table is id %u >= %u", i, j,
                                      t[j], cache->n_pages);
            cache->scratch[t[j]]++;
        }
    }
    if (live != cache->n_live)
        return llmkv__corrupt(message, message_size, "%u live slots but n_live %u", live, cache->n_live);
    for (i = 0; cache->nodes && i < cache->n_pages; ++i) cache->scratch[i] += cache->nodes[i].ntok != 0; /* the index's reference */
    for (i = 0; i < cache->n_pages; ++i)
        if (cache->scratch[i] != cache->refcount[i])
            return llmkv__corrupt(message, message_size, "page %u: refcount %u but %u page-table references", i,
                                  cache->refcount[i], cache->scratch[i]);
    /* Free list: only unreferenced pages, each once, and every such page. */
    if (cache->n_free > cache->n_pages)
        return llmkv__corrupt(message, message_size, "free list holds %u of %u pages", cache->n_free, cache->n_pages);
    for (i = 0; i < cache->n_free; ++i) {
        uint32_t p = cache->free_pages[i];
        if (p >= cache->n_pages) return llmkv__corrupt(message, message_size, "free list entry %u is id %u", i, p);
        if (cache->refcount[p] != 0)
            return llmkv__corrupt(message, message_size, "page %u is free but has refcount %u", p, cache->refcount[p]);
        if (cache->scratch[p] == 0xffffffffu)
            return llmkv__corrupt(message, message_size, "page %u is on the free list twice", p);
        cache->scratch[p] = 0xffffffffu;
    }
    for (i = 0; i < cache->n_pages; ++i)
        if (cache->refcount[i] == 0 && cache->scratch[i] != 0xffffffffu)
            return llmkv__corrupt(message, message_size, "page %u is unreferenced but not free (leaked)", i);
    /* Free-slot FIFO: exactly the dead slots, no cycle. */
    if ((cache->free_head == LLMKV__NO_SLOT) != (cache->free_tail == LLMKV__NO_SLOT))
        return llmkv__corrupt(message, message_size, "free-slot list: head %u, tail %u", cache->free_head,
                              cache->free_tail);
    for (slot = cache->free_head; slot != LLMKV__NO_SLOT; slot = cache->seqs[slot].next_free) {
        if (slot >= cache->desc.max_seqs || cache->seqs[slot].live || ++free_slots > cache->desc.max_seqs)
            return llmkv__corrupt(message, message_size, "free-slot list is broken at slot %u", slot);
        if (cache->seqs[slot].next_free == LLMKV__NO_SLOT && slot != cache->free_tail)
            return llmkv__corrupt(message, message_size, "free-slot list ends at %u, tail says %u", slot,
                                  cache->free_tail);
    }
    if (free_slots + live != cache->desc.max_seqs)
        return llmkv__corrupt(message, message_size, "%u free + %u live slots != max_seqs %u", free_slots, live,
                              cache->desc.max_seqs);
    /* Copy queue: bounded, page ids in range. */
    if (cache->copy_count > cache->copy_cap)
        return llmkv__corrupt(message, message_size, "copy queue holds %u of %u", cache->copy_count, cache->copy_cap);
    for (i = 0; i < cache->copy_count; ++i) {
        const llmkv_copy_cmd* c = &cache->copies[(cache->copy_head + i) % cache->copy_cap];
        if (c->src_page >= cache->n_pages || c->dst_page >= cache->n_pages || c->n_slots == 0 || c->n_slots > ps)
            return llmkv__corrupt(message, message_size, "copy command %u is out of range", i);
    }
    if (cache->nodes) {
        memset(cache->scratch, 0, (size_t)cache->n_pages * 4);
        return llmkv__check_prefix(cache, message, message_size);
    }
    return LLMKV_OK;
}

static llmkv_result llmkv__cache_check_unlocked(llmkv_cache* cache, char* message, size_t message_size) {
    llmkv_result r;
    uint32_t i;
    if (message && message_size) message[0] = '\0';
    if (!cache) return LLMKV_ERR_INVALID_ARGUMENT;
    for (i = 0; i < cache->n_pages; ++i)
        if (cache->scratch[i]) return llmkv__corrupt(message, message_size, "scratch entry %u not clear", i);
    r = llmkv__check(cache, message, message_size);
    memset(cache->scratch, 0, (size_t)cache->n_pages * 4);
    return r;
}

LLMKV_API llmkv_result llmkv_cache_check(llmkv_cache* cache, char* message, size_t message_size) {
    LLMKV__RETURN_LOCKED(cache, llmkv__cache_check_unlocked(cache, message, message_size));
}

/* ------------------------------------------------------------------------ */
/* CPU attention: path detection                                           */
/* ------------------------------------------------------------------------ */

#if !defined(LLMKV_NO_SIMD) && (defined(__x86_64__) || defined(__i386__) || defined(_M_X64)) && \
    (defined(__GNUC__) || defined(__clang__))
#define LLMKV__X86 1
#include <immintrin.h>
#include <cpuid.h>
#define LLMKV__T256 __attribute__((target("avx2,fma,f16c")))
#define LLMKV__T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#endif
#if !defined(LLMKV_NO_SIMD) && (defined(__aarch64__) || defined(_M_ARM64))
#define LLMKV__NEON 1
#include <arm_neon.h>
#endif

#ifdef LLMKV__X86
static uint64_t llmkv__xgetbv0(void) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((uint64_t)hi << 32) | lo;
}
#endif

/* 1 when the machine (not only the build) can run `path`. */
static int llmkv__cpu_has(llmkv_cpu_path path) {
    switch (path) {
    case LLMKV_CPU_PATH_AUTO:
    case LLMKV_CPU_PATH_SCALAR: return 1;
#ifdef LLMKV__X86
    case LLMKV_CPU_PATH_AVX2:
    case LLMKV_CPU_PATH_AVX512:
    case LLMKV_CPU_PATH_AVX512_VNNI:
    case LLMKV_CPU_PATH_AVX512_BF16: {
        unsigned a, b, c, d;
        uint64_t xcr;
        if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
        /* FMA (12), OSXSAVE (27), AVX (28), F16C (29) */
        if ((c & (1u << 12)) == 0 || (c & (1u << 27)) == 0 || (c & (1u << 28)) == 0 || (c & (1u << 29)) == 0)
            return 0;
        xcr = llmkv__xgetbv0();
        if ((xcr & 6) != 6) return 0; /* the OS saves XMM and YMM state */
        if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
        if ((b & (1u << 5)) == 0) return 0; /* AVX2 */
        if (path == LLMKV_CPU_PATH_AVX2) return 1;
        /* AVX512F (16), DQ (17), BW (30), VL (31), and opmask + ZMM state saved */
        if ((b & (1u << 16)) == 0 || (b & (1u << 17)) == 0 || (b & (1u << 30)) == 0 || (b & (1u << 31)) == 0)
            return 0;
        if ((xcr & 0xe6) != 0xe6) return 0;
        if (path == LLMKV_CPU_PATH_AVX512) return 1;
        if ((c & (1u << 11)) == 0) return 0; /* AVX512_VNNI */
        if (path == LLMKV_CPU_PATH_AVX512_VNNI) return 1;
        /* AVX512_BF16: leaf 7 sub-leaf 1, EAX bit 5 */
        if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return 0;
        return (a & (1u << 5)) != 0;
    }
#endif
#ifdef LLMKV__NEON
    case LLMKV_CPU_PATH_NEON: return 1;
#endif
    default: return 0;
    }
}

LLMKV_API int llmkv_cpu_path_supported(llmkv_cpu_path path) { return llmkv__cpu_has(path); }

LLMKV_API const char* llmkv_cpu_path_name(llmkv_cpu_path path) {
    switch (path) {
    case LLMKV_CPU_PATH_AUTO: return "auto";
    case LLMKV_CPU_PATH_SCALAR: return "scalar";
    case LLMKV_CPU_PATH_AVX2: return "avx2";
    case LLMKV_CPU_PATH_AVX512: return "avx512";
    case LLMKV_CPU_PATH_NEON: return "neon";
    case LLMKV_CPU_PATH_AVX512_BF16: return "avx512bf16";
    case LLMKV_CPU_PATH_AVX512_VNNI: return "avx512vnni";
    }
    return "?";
}

static uint32_t llmkv__cpu_detect(void) {
    uint32_t paths = 0;
    int p;
    for (p = LLMKV_CPU_PATH_AUTO; p <= LLMKV_CPU_PATH_LAST; ++p)
        if (llmkv__cpu_has((llmkv_cpu_path)p)) paths |= 1u << p;
    return paths;
}

/* 1 where the vdpbf16ps kernels are expected to beat the FMA kernels on
   BF16: AMD CPUs. No feature bit says how fast vdpbf16ps runs; on an Intel
   Xeon (Emerald Rapids) it ran at 0.7 of the FMA rate (1.13 G/s against
   1.6 G/s per core) and BF16 decode took 1.6x as long as with FMAs. */
static int llmkv__cpu_bf16_dot_fast(void) {
#ifdef LLMKV__X86
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return 0;
    return b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u; /* "AuthenticAMD" */
#else
    return 0;
#endif
}

static llmkv_cpu_path llmkv__cpu_auto(uint32_t paths) {
    const char* env = getenv("LLMKV_CPU_PATH");
    int p;
    if (env)
        for (p = LLMKV_CPU_PATH_SCALAR; p <= LLMKV_CPU_PATH_LAST; ++p)
            if (strcmp(env, llmkv_cpu_path_name((llmkv_cpu_path)p)) == 0 && (paths >> p & 1u))
                return (llmkv_cpu_path)p;
    if ((paths >> LLMKV_CPU_PATH_AVX512_BF16 & 1u) && llmkv__cpu_bf16_dot_fast()) return LLMKV_CPU_PATH_AVX512_BF16;
    if (paths >> LLMKV_CPU_PATH_AVX512_VNNI & 1u) return LLMKV_CPU_PATH_AVX512_VNNI;
    if (paths >> LLMKV_CPU_PATH_AVX512 & 1u) return LLMKV_CPU_PATH_AVX512;
    if (paths >> LLMKV_CPU_PATH_AVX2 & 1u) return LLMKV_CPU_PATH_AVX2;
    if (paths >> LLMKV_CPU_PATH_NEON & 1u) return LLMKV_CPU_PATH_NEON;
    return LLMKV_CPU_PATH_SCALAR;
}

LLMKV_API llmkv_cpu_path llmkv_cpu_path_auto(void) { return llmkv__cpu_auto(llmkv__cpu_detect()); }

/* ------------------------------------------------------------------------ */
/* CPU attention: kernels                                                   */
/*                                                                          */
/* Each path provides three primitives over J keys (at most a chunk of 64;  */
/* the driver passes one page's keys at a time), given as row pointers plus */
/* a byte offset (the offset picks the KV head), and the rows of their     */
/* scales the same way (quantized types; the others ignore them):          */
/*   qk:  S[m][j] = Q[m] . K[j]           for M query rows (already scaled) */
/*   pv:  A[m][:] += sum_j P[m][j] V[j]   the weighted sum of values        */
/*   ex:  x[i] = exp(x[i] - sub), returning the sum (exp(-inf) is 0)        */
/* with K/V converted from their storage type in registers, each K/V vector */
/* loaded once for a block of rows (the query heads of a GQA group). qk and */
/* pv also prefetch rows pf[0 .. npf) at the same offset: the rows they    */
/* will read a little later (see llmkv__attend_unit).                       */
/* ------------------------------------------------------------------------ */

/* Sizes of the work units (see the planning section below). */
#define LLMKV__ATTN_HEAD_ROWS 16u
#define LLMKV__ATTN_MAX_ROWS 64u
#define LLMKV__ATTN_MAX_ELEMS 4096u
#define LLMKV__ATTN_CHUNK 64u       /* keys scored at once */
#define LLMKV__ATTN_AHEAD 32u       /* prefetch distance in keys (<= CHUNK) */
#define LLMKV__ATTN_SJ (LLMKV__ATTN_CHUNK + 16u) /* score row stride: a kernel may write
                                       up to 15 scores past a part's end */
#define LLMKV__ATTN_MIN_SPLIT 256u  /* keys per split-K part at least */
/* Prefill tiles (llmkv__attend_tile): rows in vectors of sixteen. */
#define LLMKV__TILE_ROWS 64u        /* rows of a tile at most */
#define LLMKV__TILE_ELEMS 8192u     /* rows (rounded up to 16) x head_dim at most */
#define LLMKV__TILE_MAX_KEYS 32u    /* keys per chunk at most */
#define LLMKV__TILE_SCRATCH 4096u   /* keys per chunk x head_dim at most (values as F32) */
#define LLMKV__TILE_SCORES 2048u    /* keys per chunk x rows at most */
#define LLMKV__MAX_TILE_DIM 256u    /* head_dim of the tile path at most (a multiple of 8) */
#define LLMKV__TILE_MIN_ROWS 16u    /* a sequence's rows per KV head for the tile path */
#define LLMKV__LOG2E 1.44269504f     /* log2(e): tiles score in base 2 */
#define LLMKV__LN2 0.693147181f      /* ln(2) */

typedef void (*llmkv__qk_fn)(const float* q, uint32_t M, uint32_t D, const unsigned char* const* k, size_t koff,
                             const unsigned char* const* ks, size_t ksoff, uint32_t J, float* S, uint32_t sj,
                             const unsigned char* const* pf, uint32_t npf);
typedef void (*llmkv__pv_fn)(const float* P, uint32_t sj, uint32_t M, uint32_t D, const unsigned char* const* v, size_t voff,
                             const unsigned char* const* vs, size_t vsoff, uint32_t J, float* acc,
                             const unsigned char* const* pf, uint32_t npf);
typedef float (*llmkv__ex_fn)(float* x, uint32_t n, float sub);
/* Tile kernels (rows in lanes; see llmkv__attend_tile): QT[d][r] and
   accT[c][r] hold 16 RB rows each, 16 RB floats apart, 64-byte aligned;
   scores ST[j][r] likewise. K/V rows as for qk/pv, of storage type t;
   scratch holds the rows a kernel converts to F32. Spread over its work, a
   kernel also prefetches rows pf[0 .. npf) (pf_bytes each). */
typedef void (*llmkv__tqk_fn)(const float* QT, uint32_t RB, uint32_t D, llmkv_dtype t, const unsigned char* const* k,
                              size_t koff, const unsigned char* const* ks, size_t ksoff, uint32_t J, float* ST,
                              float* scratch, const unsigned char* const* pf, uint32_t npf, uint32_t pf_bytes);
typedef void (*llmkv__tpv_fn)(const float* PT, uint32_t RB, uint32_t D, llmkv_dtype t, const unsigned char* const* v,
                              size_t voff, const unsigned char* const* vs, size_t vsoff, uint32_t J, float* accT,
                              const float* alpha, int rescale, float* scratch, const unsigned char* const* pf,
                              uint32_t npf, uint32_t pf_bytes);
/* QT[d][r] = src[r][d] * scale (r < 16 RB, d < D); dst[r][d] = accT[d][r] * mult[r] (r < M). */
typedef void (*llmkv__tin_fn)(float* QT, uint32_t RB, uint32_t D, const float* const* src, float scale);
typedef void (*llmkv__tout_fn)(float* const* dst, uint32_t M, const float* accT, uint32_t RB, uint32_t D, const float* mult);
typedef int (*llmkv__tsoft_fn)(float* ST, uint32_t RB, uint32_t J, uint32_t k, const uint32_t* lo, const uint32_t* hi,
                               int whole, float* mx, float* l, float* alpha);
typedef float (*llmkv__max_fn)(const float* x, uint32_t n);

typedef struct llmkv__kernels {
    llmkv__qk_fn qk[7]; /* by storage type: F32, F16, BF16, Q8, Q4, FP8, Q4C (raw codes) */
    llmkv__pv_fn pv[7]; /* pv[6] unused: values are never Q4C */
    llmkv__ex_fn ex;
    llmkv__max_fn max; /* max of n >= 1 scores (-inf allowed) */
    int q_bf16[7];     /* qk[t] reads its query rows as BF16 high and low parts (see llmkv__attend_unit) */
    llmkv__qk_fn qk_int8[7]; /* when set: QK against an int8 query (llmkv__qint_prepare) for head_dim
                                a multiple of 128 (Q4 keys); otherwise qk[t] */
    llmkv__tqk_fn tile_qk;   /* prefill tiles, all NULL on a path without them: */
    llmkv__tpv_fn tile_pv;   /* every storage type but Q4C keys */
    llmkv__tsoft_fn tile_soft;
    llmkv__tin_fn tile_in;
    llmkv__tout_fn tile_out;
} llmkv__kernels;

/* Asks for n rows (each at `offset` from its pointer) to be brought into the
   cache hierarchy (L2) ahead of use. */
static void llmkv__prefetch_rows(const unsigned char* const* rows, uint32_t n, uint32_t row_bytes, size_t offset) {
#if defined(__GNUC__) || defined(__clang__)
    uint32_t j, off;
    for (j = 0; j < n; ++j)
        for (off = 0; off < row_bytes; off += 64) __builtin_prefetch(rows[j] + offset + off, 0, 2);
#else
    (void)rows; (void)n; (void)row_bytes; (void)offset;
#endif
}

/* --- scalar reference ---------------------------------------------------- */

/* Element i of a stored vector p with scales sc. */
static float llmkv__ld_f32(const unsigned char* p, const unsigned char* sc, uint32_t i) {
    (void)sc;
    return llmkv__ld_f32s(p + 4 * (size_t)i);
}
static float llmkv__ld_f16(const unsigned char* p, const unsigned char* sc, uint32_t i) {
    (void)sc;
    return llmkv_f16_to_f32(llmkv__ld_u16(p + 2 * (size_t)i));
}
static float llmkv__ld_bf16(const unsigned char* p, const unsigned char* sc, uint32_t i) {
    (void)sc;
    return llmkv_bf16_to_f32(llmkv__ld_u16(p + 2 * (size_t)i));
}
static float llmkv__ld_q8(const unsigned char* p, const unsigned char* sc, uint32_t i) {
    return llmkv__q_value(LLMKV_DTYPE_Q8, p, sc, i);
}
static float llmkv__ld_q4(const unsigned char* p, const unsigned char* sc, uint32_t i) {
    return llmkv__q_value(LLMKV_DTYPE_Q4, p, sc, i);
}
static float llmkv__ld_fp8(const unsigned char* p, const unsigned char* sc, uint32_t i) {
    return llmkv__q_value(LLMKV_DTYPE_FP8, p, sc, i);
}
static float llmkv__ld_code4(const unsigned char* p, const unsigned char* sc, uint32_t i) { /* a bare 4-bit code */
    (void)sc;
    return (float)((p[i / 2] >> (4 * (i % 2))) & 15u);
}

#define LLMKV__SCALAR_QK(SUFFIX, LD, TY)                                                                     \
    static void llmkv__qk_scalar_##SUFFIX(const float* q, uint32_t M, uint32_t D, const unsigned char* const* k,     \
                                          size_t koff, const unsigned char* const* ks, size_t ksoff, uint32_t J,   \
                                          float* S, uint32_t sj, const unsigned char* const* pf, uint32_t npf) {    \
        uint32_t m, j, d;                                                                                        \
        llmkv__prefetch_rows(pf, npf, llmkv__vec_data_bytes(TY, D), koff);                                       \
        for (j = 0; j < J; ++j)                                                                                  \
            for (m = 0; m < M; ++m) {                                                                            \
                float s = 0.0f;                                                                                  \
                for (d = 0; d < D; ++d) s += q[(size_t)m * D + d] * LD(k[j] + koff, ks[j] + ksoff, d);            \
                S[(size_t)m * sj + j] = s;                                                                       \
            }                                                                                                    \
    }
#define LLMKV__SCALAR_PV(SUFFIX, LD, TY) \
    static void llmkv__pv_scalar_##SUFFIX(const float* P, uint32_t sj, uint32_t M, uint32_t D,                    \
                                          const unsigned char* const* v, size_t voff, const unsigned char* const* vs, \
                                          size_t vsoff, uint32_t J, float* acc, const unsigned char* const* pf,     \
                                          uint32_t npf) {                                                        \
        uint32_t m, j, d;                                                                                        \
        llmkv__prefetch_rows(pf, npf, llmkv__vec_data_bytes(TY, D), voff);                                       \
        for (j = 0; j < J; ++j)                                                                                  \
            for (d = 0; d < D; ++d) {                                                                            \
                float x = LD(v[j] + voff, vs[j] + vsoff, d);                                                     \
                for (m = 0; m < M; ++m) acc[(size_t)m * D + d] += P[(size_t)m * sj + j] * x;                     \
            }                                                                                                    \
    }
#define LLMKV__SCALAR_KERNELS(SUFFIX, LD, TY) LLMKV__SCALAR_QK(SUFFIX, LD, TY) LLMKV__SCALAR_PV(SUFFIX, LD, TY)
LLMKV__SCALAR_KERNELS(f32, llmkv__ld_f32, LLMKV_DTYPE_F32)
LLMKV__SCALAR_KERNELS(f16, llmkv__ld_f16, LLMKV_DTYPE_F16)
LLMKV__SCALAR_KERNELS(bf16, llmkv__ld_bf16, LLMKV_DTYPE_BF16)
LLMKV__SCALAR_KERNELS(q8, llmkv__ld_q8, LLMKV_DTYPE_Q8)
LLMKV__SCALAR_KERNELS(q4, llmkv__ld_q4, LLMKV_DTYPE_Q4)
LLMKV__SCALAR_KERNELS(fp8, llmkv__ld_fp8, LLMKV_DTYPE_FP8)
/* Q4C keys: QK over the raw codes (llmkv__qk_channel folds the table into
   the query); values are never Q4C. */
LLMKV__SCALAR_QK(q4c, llmkv__ld_code4, LLMKV_DTYPE_Q4C)

static float llmkv__max_scalar(const float* x, uint32_t n) {
    float m = x[0];
    uint32_t i;
    for (i = 1; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
}

static float llmkv__ex_scalar(float* x, uint32_t n, float sub) {
    uint32_t i;
    float sum = 0.0f;
    for (i = 0; i < n; ++i) sum += (x[i] = expf(x[i] - sub));
    return sum;
}

#ifdef LLMKV__X86
/* GCC 12 in C++ mode reports (maybe-)uninitialized values inside its own AVX-512
   intrinsic headers (the _mm512_undefined_ps() they pass as a dummy source;
   GCC bug 105593, fixed in GCC 13). The warning is about the compiler's
   headers, not this code, so it is silenced for these kernels alone. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wsign-conversion" /* its -O0 macros pass (__mmask16)-1 to signed builtins */
#endif
static LLMKV__T256 float llmkv__hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The sums of four vectors, [sum a, sum b, sum c, sum d]: three hadds and
   one 128-bit add, where four llmkv__hsum256 take six operations each. */
static LLMKV__T256 __m128 llmkv__hsum256x4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* --- element conversion (F16C + AVX2) ------------------------------------- */
/* Bit-identical to llmkv_f32_to_f16 / llmkv_f32_to_bf16: vcvtps2ph rounds to
   nearest-even, handles subnormal results and keeps NaN payloads with the
   quiet bit set, exactly as the scalar code does. */
static LLMKV__T256 uint32_t llmkv__convert_avx2(void* dst, llmkv_dtype dt, const void* src, llmkv_dtype st,
                                                uint32_t n) {
    uint32_t i = 0;
    if (st == LLMKV_DTYPE_F32 && dt == LLMKV_DTYPE_F16) {
        for (; i + 8 <= n; i += 8)
            _mm_storeu_si128((__m128i*)((uint16_t*)dst + i),
                             _mm256_cvtps_ph(_mm256_loadu_ps((const float*)src + i), _MM_FROUND_TO_NEAREST_INT));
    } else if (st == LLMKV_DTYPE_F16 && dt == LLMKV_DTYPE_F32) {
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps((float*)dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)src + i))));
    } else if (st == LLMKV_DTYPE_BF16 && dt == LLMKV_DTYPE_F32) {
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps((float*)dst + i, _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)((const uint16_t*)src + i))), 16)));
    } else if (st == LLMKV_DTYPE_F32 && dt == LLMKV_DTYPE_BF16) {
        const __m256i one = _mm256_set1_epi32(1), round = _mm256_set1_epi32(0x7fff), quiet = _mm256_set1_epi32(0x40);
        for (; i + 8 <= n; i += 8) {
            __m256 x = _mm256_loadu_ps((const float*)src + i);
            __m256i u = _mm256_castps_si256(x);
            __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, round),
                                                           _mm256_and_si256(_mm256_srli_epi32(u, 16), one)), 16);
            __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), quiet);
            __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
            r = _mm256_blendv_epi8(r, q, nan);
            /* 8 x 32-bit to 8 x 16-bit: pack within lanes, then order the lanes. */
            r = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
            _mm_storeu_si128((__m128i*)((uint16_t*)dst + i), _mm256_castsi256_si128(r));
        }
    }
    return i;
}

/* --- AVX-512 ------------------------------------------------------------- */
/* 16 elements per vector; the last partial vector of a row uses a mask, so
   nothing past head_dim is read. */

/* Elements [c, c + 16) of a stored vector p with scales sc; the masked
   forms read only the lanes of m (a prefix) and zero the others. */
static LLMKV__T512 __m512 llmkv__z_f32(__mmask16 m, const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return _mm512_maskz_loadu_ps(m, p + 4 * (size_t)c);
}
static LLMKV__T512 __m512 llmkv__z_f16(__mmask16 m, const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p + 2 * (size_t)c));
}
static LLMKV__T512 __m512 llmkv__z_bf16(__mmask16 m, const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p + 2 * (size_t)c)), 16));
}
/* An F16 value broadcast to every lane. */
static LLMKV__T512 __m512 llmkv__z_f16_bcast(const unsigned char* h) {
    return _mm512_cvtph_ps(_mm256_set1_epi16((short)llmkv__ld_u16(h)));
}
/* E4M3 codes as F16 bit patterns worth 1/256 of their values: the
   magnitude's 7 bits placed at F16 bits 13..7 give 2^(e - 15) (1 + m/8),
   E4M3's 2^(e - 7) (1 + m/8) over 256, and for e = 0 the F16 subnormal
   m 2^-17, E4M3's m 2^-9 over 256; the sign goes to bit 15. So a code
   costs two shifts and a merge before the F16 conversion, and the scale
   multiplies in the 256 (a power of two: the product rounds once, as
   value * scale does, so the results equal the direct decoding's). */
static LLMKV__T512 __m256i llmkv__z_e4m3_f16(__m256i w) { /* codes in 16-bit lanes */
    __m256i mag = _mm256_srli_epi16(_mm256_slli_epi16(w, 9), 2);
    return _mm256_ternarylogic_epi32(_mm256_slli_epi16(w, 8), mag, _mm256_set1_epi16((short)0x8000), 0xEC); /* (a & sign) | mag */
}
/* The values of 16 loaded bytes: Q8 codes, Q4 code pairs (the low 8
   bytes), FP8 codes; elements [c, c + 16) of their vector. */
static LLMKV__T512 __m512 llmkv__z_q8_bytes(__m128i b, const unsigned char* sc, uint32_t c) {
    __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
    return _mm512_mul_ps(x, llmkv__z_f16_bcast(sc + 2 * (c / LLMKV__QGROUP)));
}
static LLMKV__T512 __m512 llmkv__z_code4_bytes(__m128i b) { /* bare 4-bit codes */
    __m128i lo = _mm_and_si128(b, _mm_set1_epi8(15)), hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}
static LLMKV__T512 __m512 llmkv__z_q4_bytes(__m128i b, const unsigned char* sc, uint32_t c) {
    const unsigned char* g = sc + 4 * (c / LLMKV__QGROUP);
    return _mm512_fmadd_ps(llmkv__z_code4_bytes(b), llmkv__z_f16_bcast(g), llmkv__z_f16_bcast(g + 2));
}
static LLMKV__T512 __m512 llmkv__z_fp8_bytes(__m128i b, const unsigned char* sc) {
    return _mm512_mul_ps(_mm512_cvtph_ps(llmkv__z_e4m3_f16(_mm256_cvtepu8_epi16(b))),
                         _mm512_set1_ps(256.0f * llmkv__ld_f32s(sc)));
}
static LLMKV__T512 __m512 llmkv__z_q8(__mmask16 m, const unsigned char* p, const unsigned char* sc, uint32_t c) {
    return llmkv__z_q8_bytes(_mm_maskz_loadu_epi8(m, p + c), sc, c);
}
static LLMKV__T512 __m512 llmkv__z_q4(__mmask16 m, const unsigned char* p, const unsigned char* sc, uint32_t c) {
    uint32_t n = (uint32_t)__builtin_popcount((unsigned)m);
    __m128i b = _mm_maskz_loadu_epi8((__mmask16)((1u << (n + 1) / 2) - 1), p + c / 2);
    return _mm512_maskz_mov_ps(m, llmkv__z_q4_bytes(b, sc, c)); /* m + s 0 past the end: zeroed */
}
static LLMKV__T512 __m512 llmkv__z_fp8(__mmask16 m, const unsigned char* p, const unsigned char* sc, uint32_t c) {
    return llmkv__z_fp8_bytes(_mm_maskz_loadu_epi8(m, p + c), sc);
}
static LLMKV__T512 __m512 llmkv__z_code4(__mmask16 m, const unsigned char* p, const unsigned char* sc, uint32_t c) {
    uint32_t n = (uint32_t)__builtin_popcount((unsigned)m);
    (void)sc;
    return _mm512_maskz_mov_ps(m, llmkv__z_code4_bytes(_mm_maskz_loadu_epi8((__mmask16)((1u << (n + 1) / 2) - 1), p + c / 2)));
}

static LLMKV__T512 float llmkv__hsum512(__m512 v) {
    __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return llmkv__hsum256(h);
}

/* Byte offset, in a vector's scale row, of the scales of the group that
   starts at element c (a multiple of 32). */
static size_t llmkv__scale_off(llmkv_dtype t, uint32_t c) {
    return t == LLMKV_DTYPE_Q8 ? 2 * (c / LLMKV__QGROUP) : t == LLMKV_DTYPE_Q4 ? 4 * (c / LLMKV__QGROUP) : 0;
}

/* Rows per kernel block: 4 while at least four remain, then 2, then 1. */
static uint32_t llmkv__row_block(uint32_t left) { return left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* out[i] = rows[min(j + i, n - 1)] + offset for i < count: a block's row
   pointers, the last row repeated past the end (its results are unused). */
static void llmkv__block_rows(const unsigned char* const* rows, uint32_t n, uint32_t j, uint32_t count, size_t offset,
                              const unsigned char** out) {
    uint32_t i;
    for (i = 0; i < count; ++i) out[i] = rows[j + i < n ? j + i : n - 1] + offset;
}

/* Both kernels work on blocks that fill sixteen accumulators, so FMA
   latency is hidden and each K/V vector is converted once per block:
     QK  R rows x 16/R keys (R = 4, 2 or 1, by how many rows remain), each
         accumulator one (row, key) dot product over head_dim; one
         transposing reduction turns the sixteen into a vector of scores.
     PV  R rows x NB 16-element column blocks (NB <= 4), the accumulators
         held in registers across every key of the part.
   The block bodies are always inlined with R and NB constant (unrolled
   loops over small arrays the compiler keeps in registers). */
#if defined(__clang__)
#define LLMKV__UNROLL _Pragma("unroll")
#else
#define LLMKV__UNROLL _Pragma("GCC unroll 16")
#endif
#define LLMKV__I512 static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))

static LLMKV__T512 __m512 llmkv__z16_f32(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return _mm512_loadu_ps(p + 4 * (size_t)c);
}
static LLMKV__T512 __m512 llmkv__z16_f16(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(const void*)(p + 2 * (size_t)c)));
}
static LLMKV__T512 __m512 llmkv__z16_bf16(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(const void*)(p + 2 * (size_t)c))), 16));
}
static LLMKV__T512 __m512 llmkv__z16_q8(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    return llmkv__z_q8_bytes(_mm_loadu_si128((const __m128i*)(const void*)(p + c)), sc, c);
}
static LLMKV__T512 __m512 llmkv__z16_q4(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    return llmkv__z_q4_bytes(_mm_loadl_epi64((const __m128i*)(const void*)(p + c / 2)), sc, c);
}
static LLMKV__T512 __m512 llmkv__z16_fp8(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    return llmkv__z_fp8_bytes(_mm_loadu_si128((const __m128i*)(const void*)(p + c)), sc);
}
static LLMKV__T512 __m512 llmkv__z16_code4(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return llmkv__z_code4_bytes(_mm_loadl_epi64((const __m128i*)(const void*)(p + c / 2)));
}

/* Lane n of the result is the sum of the lanes of x[n]. */
LLMKV__I512 __m512 llmkv__reduce16(const __m512* x) {
    __m512 t[8], u[4], v0, v1;
    int i;
    /* t[i]: the 256-bit halves of x[i] and x[i + 4] folded (i < 4), of
       x[i + 4] and x[i + 8] (i >= 4). */
    LLMKV__UNROLL for (i = 0; i < 4; ++i) {
        t[i] = _mm512_add_ps(_mm512_shuffle_f32x4(x[i], x[i + 4], 0x44), _mm512_shuffle_f32x4(x[i], x[i + 4], 0xee));
        t[i + 4] = _mm512_add_ps(_mm512_shuffle_f32x4(x[i + 8], x[i + 12], 0x44),
                                 _mm512_shuffle_f32x4(x[i + 8], x[i + 12], 0xee));
    }
    /* u[i]: 128-bit lane L holds four partial sums of x[i + 4 L]. */
    LLMKV__UNROLL for (i = 0; i < 4; ++i)
        u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(t[i], t[i + 4], 0x88), _mm512_shuffle_f32x4(t[i], t[i + 4], 0xdd));
    v0 = _mm512_add_ps(_mm512_unpacklo_ps(u[0], u[1]), _mm512_unpackhi_ps(u[0], u[1]));
    v1 = _mm512_add_ps(_mm512_unpacklo_ps(u[2], u[3]), _mm512_unpackhi_ps(u[2], u[3]));
    return _mm512_add_ps(_mm512_shuffle_ps(v0, v1, 0x44), _mm512_shuffle_ps(v0, v1, 0xee));
}

/* Stores lane r * (16 / R) + i of s to S[r * sj + i], i < 16 / R. */
LLMKV__I512 void llmkv__store_scores(__m512 s, float* S, uint32_t sj, uint32_t R) {
    if (R == 4) {
        _mm_storeu_ps(S, _mm512_castps512_ps128(s));
        _mm_storeu_ps(S + sj, _mm512_extractf32x4_ps(s, 1));
        _mm_storeu_ps(S + 2 * (size_t)sj, _mm512_extractf32x4_ps(s, 2));
        _mm_storeu_ps(S + 3 * (size_t)sj, _mm512_extractf32x4_ps(s, 3));
    } else if (R == 2) {
        _mm256_storeu_ps(S, _mm512_castps512_ps256(s));
        _mm256_storeu_ps(S + sj, _mm512_extractf32x8_ps(s, 1));
    } else {
        _mm512_storeu_ps(S, s);
    }
}

/* One QK block: rows q (D floats apart), keys kr[0 .. 16/R) with scale
   rows kc. */
#define LLMKV__QK512_BLOCK(SUFFIX, LD16, LDM, TY)                                                                   \
    LLMKV__I512 __m512 llmkv__qkb_##SUFFIX(const float* q, uint32_t D, const unsigned char* const* kr,             \
                                           const unsigned char* const* kc, uint32_t R,                              \
                                           const unsigned char* const* pr) {                                        \
        __m512 a[16], kv[16], qv[4];                                                                                \
        uint32_t KB = 16 / R, c, r, i;                                                                              \
        LLMKV__UNROLL for (i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();                                          \
        for (c = 0; c + 16 <= D; c += 16) {                                                                         \
            if (pr && llmkv__vec_data_bytes(TY, c) % 64 == 0)                                                                 \
                LLMKV__UNROLL for (i = 0; i < KB; ++i)                                                              \
                    _mm_prefetch((const char*)pr[i] + llmkv__vec_data_bytes(TY, c), _MM_HINT_T1);                             \
            LLMKV__UNROLL for (i = 0; i < KB; ++i) kv[i] = LD16(kr[i], kc[i], c);                                   \
            LLMKV__UNROLL for (r = 0; r < R; ++r) qv[r] = _mm512_loadu_ps(q + (size_t)r * D + c);                  \
            LLMKV__UNROLL for (r = 0; r < R; ++r)                                                                   \
                LLMKV__UNROLL for (i = 0; i < KB; ++i) a[r * KB + i] = _mm512_fmadd_ps(qv[r], kv[i], a[r * KB + i]); \
        }                                                                                                           \
        if (c < D) {                                                                                                \
            __mmask16 mk = (__mmask16)((1u << (D - c)) - 1);                                                        \
            LLMKV__UNROLL for (i = 0; i < KB; ++i) kv[i] = LDM(mk, kr[i], kc[i], c);                                \
            LLMKV__UNROLL for (r = 0; r < R; ++r) qv[r] = _mm512_maskz_loadu_ps(mk, q + (size_t)r * D + c);        \
            LLMKV__UNROLL for (r = 0; r < R; ++r)                                                                   \
                LLMKV__UNROLL for (i = 0; i < KB; ++i) a[r * KB + i] = _mm512_fmadd_ps(qv[r], kv[i], a[r * KB + i]); \
        }                                                                                                           \
        return llmkv__reduce16(a);                                                                                  \
    }

/* One PV block: R rows of acc (D floats apart), NB column blocks, the
   last one masked by `last`; every key of the part. acc, voff and vsoff
   are already offset to the block's first column (a multiple of 64, so
   the loaders' column c counts groups from there). */
#define LLMKV__PV512_BLOCK(SUFFIX, LD16, LDM, TY)                                                                   \
    LLMKV__I512 void llmkv__pvb_##SUFFIX(const float* P, uint32_t sj, uint32_t D, const unsigned char* const* v,   \
                                         size_t voff, const unsigned char* const* vs, size_t vsoff,                 \
                                         uint32_t J, float* acc, uint32_t R, uint32_t NB, __mmask16 last,           \
                                         const unsigned char* const* pf, uint32_t npf) {                            \
        __m512 a[16], vv[4];                                                                                        \
        uint32_t j, r, i;                                                                                           \
        LLMKV__UNROLL for (r = 0; r < R; ++r)                                                                       \
            LLMKV__UNROLL for (i = 0; i < NB; ++i)                                                                  \
                a[r * NB + i] = _mm512_maskz_loadu_ps(i + 1 == NB ? last : (__mmask16)0xffffu,                      \
                                                      acc + (size_t)r * D + 16 * i);                                \
        for (j = 0; j < J; ++j) {                                                                                   \
            const unsigned char* row = v[j] + voff;                                                                 \
            const unsigned char* sc = llmkv__dtype_quant(TY) ? vs[j] + vsoff : row; /* unread without scales */   \
            if (j < npf)                                                                                            \
                LLMKV__UNROLL for (i = 0; i < llmkv__vec_data_bytes(TY, NB * 16); i += 64)                                    \
                    _mm_prefetch((const char*)pf[j] + voff + i, _MM_HINT_T1);                                       \
            LLMKV__UNROLL for (i = 0; i + 1 < NB; ++i) vv[i] = LD16(row, sc, 16 * i);                               \
            vv[NB - 1] = LDM(last, row, sc, 16 * (NB - 1));                                                         \
            LLMKV__UNROLL for (r = 0; r < R; ++r) {                                                                 \
                __m512 p = _mm512_set1_ps(P[(size_t)r * sj + j]);                                                   \
                LLMKV__UNROLL for (i = 0; i < NB; ++i) a[r * NB + i] = _mm512_fmadd_ps(p, vv[i], a[r * NB + i]);    \
            }                                                                                                       \
        }                                                                                                           \
        LLMKV__UNROLL for (r = 0; r < R; ++r)                                                                       \
            LLMKV__UNROLL for (i = 0; i < NB; ++i)                                                                  \
                _mm512_mask_storeu_ps(acc + (size_t)r * D + 16 * i, i + 1 == NB ? last : (__mmask16)0xffffu,        \
                                      a[r * NB + i]);                                                               \
    }

#define LLMKV__PVB_CALL(SUFFIX, TY, R, NB)                                                                              \
    llmkv__pvb_##SUFFIX(Pm, sj, D, v, voff + llmkv__vec_data_bytes(TY, c), vs, vsoff + llmkv__scale_off(TY, c), J,  \
                        am + c, R, NB, last, pfm, npfm)

/* The kernels proper: rows in blocks of 4, then 2, then 1. */
#define LLMKV__AVX512_QK(SUFFIX, LD16, LDM, TY)                                                                \
    LLMKV__QK512_BLOCK(SUFFIX, LD16, LDM, TY)                                                                       \
    static LLMKV__T512 void llmkv__qk_avx512_##SUFFIX(const float* q, uint32_t M, uint32_t D,                      \
                                                      const unsigned char* const* k, size_t koff,                   \
                                                      const unsigned char* const* ks, size_t ksoff, uint32_t J,     \
                                                      float* S, uint32_t sj, const unsigned char* const* pf,        \
                                                      uint32_t npf) {                                               \
        const unsigned char *kr[16], *kc[16], *pr[16];                                                              \
        const unsigned char* const* kcs = llmkv__dtype_quant(TY) ? kc : kr; /* scale rows (unread without) */      \
        uint32_t m = 0, j, R, KB;                                                                                   \
        while (m < M) {                                                                                             \
            R = llmkv__row_block(M - m);                                                                            \
            KB = 16 / R;                                                                                            \
            for (j = 0; j < J; j += KB) {                                                                           \
                const float* qm = q + (size_t)m * D;                                                                \
                const unsigned char* const* prj = m == 0 && j < npf ? pr : NULL;                                    \
                __m512 s;                                                                                           \
                llmkv__block_rows(k, J, j, KB, koff, kr);                                                           \
                if (llmkv__dtype_quant(TY)) llmkv__block_rows(ks, J, j, KB, ksoff, kc);                             \
                if (prj) llmkv__block_rows(pf, npf, j, KB, koff, pr);                                               \
                s = R == 4 ? llmkv__qkb_##SUFFIX(qm, D, kr, kcs, 4, prj)                                             \
                           : R == 2 ? llmkv__qkb_##SUFFIX(qm, D, kr, kcs, 2, prj)                                    \
                                    : llmkv__qkb_##SUFFIX(qm, D, kr, kcs, 1, prj);                                   \
                llmkv__store_scores(s, S + (size_t)m * sj + j, sj, R);                                              \
            }                                                                                                       \
            m += R;                                                                                                 \
        }                                                                                                           \
    }
#define LLMKV__AVX512_PV(SUFFIX, LD16, LDM, TY) \
    LLMKV__PV512_BLOCK(SUFFIX, LD16, LDM, TY)                                                                       \
    static LLMKV__T512 void llmkv__pv_avx512_##SUFFIX(const float* P, uint32_t sj, uint32_t M, uint32_t D,         \
                                                      const unsigned char* const* v, size_t voff,                   \
                                                      const unsigned char* const* vs, size_t vsoff, uint32_t J,     \
                                                      float* acc, const unsigned char* const* pf, uint32_t npf) {   \
        uint32_t m = 0, c, R, NB;                                                                                   \
        while (m < M) {                                                                                             \
            const float* Pm = P + (size_t)m * sj;                                                                   \
            float* am = acc + (size_t)m * D;                                                                        \
            const unsigned char* const* pfm = m == 0 ? pf : NULL; /* the first rows prefetch */                    \
            uint32_t npfm = m == 0 ? npf : 0;                                                                       \
            R = llmkv__row_block(M - m);                                                                            \
            for (c = 0; c < D; c += 64) {                                                                           \
                uint32_t left = D - c < 64 ? D - c : 64, tail = left % 16;                                          \
                __mmask16 last = (__mmask16)(tail ? (1u << tail) - 1 : 0xffffu);                                    \
                NB = (left + 15) / 16;                                                                              \
                switch (R * 4 + NB) {                                                                               \
                case 20: LLMKV__PVB_CALL(SUFFIX, TY, 4, 4); break;                                                      \
                case 19: LLMKV__PVB_CALL(SUFFIX, TY, 4, 3); break;                                                      \
                case 18: LLMKV__PVB_CALL(SUFFIX, TY, 4, 2); break;                                                      \
                case 17: LLMKV__PVB_CALL(SUFFIX, TY, 4, 1); break;                                                      \
                case 12: LLMKV__PVB_CALL(SUFFIX, TY, 2, 4); break;                                                      \
                case 11: LLMKV__PVB_CALL(SUFFIX, TY, 2, 3); break;                                                      \
                case 10: LLMKV__PVB_CALL(SUFFIX, TY, 2, 2); break;                                                      \
                case 9: LLMKV__PVB_CALL(SUFFIX, TY, 2, 1); break;                                                       \
                case 8: LLMKV__PVB_CALL(SUFFIX, TY, 1, 4); break;                                                       \
                case 7: LLMKV__PVB_CALL(SUFFIX, TY, 1, 3); break;                                                       \
                case 6: LLMKV__PVB_CALL(SUFFIX, TY, 1, 2); break;                                                       \
                default: LLMKV__PVB_CALL(SUFFIX, TY, 1, 1); break;                                                      \
                }                                                                                                   \
            }                                                                                                       \
            m += R;                                                                                                 \
        }                                                                                                           \
    }
#define LLMKV__AVX512_KERNELS(SUFFIX, LD16, LDM, TY) LLMKV__AVX512_QK(SUFFIX, LD16, LDM, TY) LLMKV__AVX512_PV(SUFFIX, LD16, LDM, TY)
LLMKV__AVX512_KERNELS(f32, llmkv__z16_f32, llmkv__z_f32, LLMKV_DTYPE_F32)
LLMKV__AVX512_KERNELS(f16, llmkv__z16_f16, llmkv__z_f16, LLMKV_DTYPE_F16)
LLMKV__AVX512_KERNELS(bf16, llmkv__z16_bf16, llmkv__z_bf16, LLMKV_DTYPE_BF16)
LLMKV__AVX512_KERNELS(q8, llmkv__z16_q8, llmkv__z_q8, LLMKV_DTYPE_Q8)
LLMKV__AVX512_KERNELS(q4, llmkv__z16_q4, llmkv__z_q4, LLMKV_DTYPE_Q4)
LLMKV__AVX512_KERNELS(fp8, llmkv__z16_fp8, llmkv__z_fp8, LLMKV_DTYPE_FP8)
LLMKV__AVX512_QK(q4c, llmkv__z16_code4, llmkv__z_code4, LLMKV_DTYPE_Q4C)

/* --- AVX-512: Q8 keys a group at a time ------------------------------------ */
/* The generic QK block converts each 16-element chunk with its own copy of
   the group's scale (a broadcast and an F16 conversion per chunk); this
   one converts the scale once per 32-element group and key. The products
   and their order are those of the generic block, so the scores are
   bit-identical. head_dim a multiple of 32. */
LLMKV__I512 __m512 llmkv__qkb_q8g(const float* q, uint32_t D, const unsigned char* const* kr,
                                  const unsigned char* const* kc, uint32_t R, const unsigned char* const* pr) {
    __m512 a[16], q0[4], q1[4];
    uint32_t KB = 16 / R, c, r, i;
    LLMKV__UNROLL for (i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
    for (c = 0; c < D; c += 32) {
        if (pr && c % 64 == 0) LLMKV__UNROLL for (i = 0; i < KB; ++i) _mm_prefetch((const char*)pr[i] + c, _MM_HINT_T1);
        LLMKV__UNROLL for (r = 0; r < R; ++r) {
            q0[r] = _mm512_loadu_ps(q + (size_t)r * D + c);
            q1[r] = _mm512_loadu_ps(q + (size_t)r * D + c + 16);
        }
        LLMKV__UNROLL for (i = 0; i < KB; ++i) {
            __m512 sv = llmkv__z_f16_bcast(kc[i] + 2 * (c / LLMKV__QGROUP));
            const unsigned char* kp = kr[i] + c;
            __m512 k0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(const void*)kp))), sv);
            __m512 k1 = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)(const void*)(kp + 16)))), sv);
            LLMKV__UNROLL for (r = 0; r < R; ++r)
                a[r * KB + i] = _mm512_fmadd_ps(q1[r], k1, _mm512_fmadd_ps(q0[r], k0, a[r * KB + i]));
        }
    }
    return llmkv__reduce16(a);
}

/* --- AVX-512: Q4 values through a table per group ------------------------- */
/* vpermps reads only the low four bits of each index lane, so a 4-bit code
   in a 32-bit lane picks its entry from a 16-entry table directly. With the
   table of a group's values, fmadd(0..15, s, m) (the rounding of the direct
   dequantizer, so the results are bit-identical to llmkv__pv_avx512_q4), a
   group's 32 values cost one widening of its 16 code bytes, one shift (the
   high nibbles) and two lookups, where the code-by-code loader spends about
   fifteen operations per 16 values; the table and the lookups are shared
   by every row of the block. The lookups give the group's even elements and its odd ones in
   separate vectors, so the accumulators hold [even | odd] per group and
   are permuted from and to the natural order once per call. head_dim a
   multiple of 32 (other sizes keep the direct kernel). */
/* The 16 values of a Q4 group whose F16 (scale, minimum) pair is at sm:
   fmadd(0..15, s, m); bare (Q4C's raw codes): 0..15. */
LLMKV__I512 __m512 llmkv__z_q4_table(const unsigned char* sm, int bare) {
    const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    int32_t pair;
    __m512 v;
    if (bare) return iota;
    memcpy(&pair, sm, 4);
    v = _mm512_cvtph_ps(_mm256_set1_epi32(pair)); /* s, m, s, m, ... */
    return _mm512_fmadd_ps(iota, _mm512_moveldup_ps(v), _mm512_movehdup_ps(v));
}
/* The even and the odd elements of the 32 floats at x. */
LLMKV__I512 void llmkv__z_even_odd(const float* x, __m512* even, __m512* odd) {
    __m512 x0 = _mm512_loadu_ps(x), x1 = _mm512_loadu_ps(x + 16);
    *even = _mm512_permutex2var_ps(x0, _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0), x1);
    *odd = _mm512_permutex2var_ps(x0, _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1), x1);
}

LLMKV__I512 void llmkv__pvb_q4t(const float* P, uint32_t sj, uint32_t D, const unsigned char* const* v, size_t voff,
                                const unsigned char* const* vs, size_t vsoff, uint32_t J, float* acc, uint32_t R,
                                uint32_t G, const unsigned char* const* pf, uint32_t npf) {
    const __m512i lo = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i hi = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    __m512 a[16], ve[2], vo[2];
    uint32_t j, r, g, NA = 2 * G;
    LLMKV__UNROLL for (r = 0; r < R; ++r)
        LLMKV__UNROLL for (g = 0; g < G; ++g)
            llmkv__z_even_odd(acc + (size_t)r * D + 32 * g, &a[r * NA + 2 * g], &a[r * NA + 2 * g + 1]);
    for (j = 0; j < J; ++j) {
        const unsigned char* row = v[j] + voff;
        const unsigned char* sc = vs[j] + vsoff;
        if (j < npf) _mm_prefetch((const char*)pf[j] + voff, _MM_HINT_T1);
        LLMKV__UNROLL for (g = 0; g < G; ++g) {
            __m512 t = llmkv__z_q4_table(sc + 4 * g, 0);
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(const void*)(row + 16 * g)));
            ve[g] = _mm512_permutexvar_ps(b, t);
            vo[g] = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
        }
        LLMKV__UNROLL for (r = 0; r < R; ++r) {
            __m512 p = _mm512_set1_ps(P[(size_t)r * sj + j]);
            LLMKV__UNROLL for (g = 0; g < G; ++g) {
                a[r * NA + 2 * g] = _mm512_fmadd_ps(p, ve[g], a[r * NA + 2 * g]);
                a[r * NA + 2 * g + 1] = _mm512_fmadd_ps(p, vo[g], a[r * NA + 2 * g + 1]);
            }
        }
    }
    LLMKV__UNROLL for (r = 0; r < R; ++r)
        LLMKV__UNROLL for (g = 0; g < G; ++g) {
            float* x = acc + (size_t)r * D + 32 * g;
            __m512 e = a[r * NA + 2 * g], o = a[r * NA + 2 * g + 1];
            _mm512_storeu_ps(x, _mm512_permutex2var_ps(e, lo, o));
            _mm512_storeu_ps(x + 16, _mm512_permutex2var_ps(e, hi, o));
        }
}

/* One QK block against Q4 keys through the group tables: the query rows'
   even and odd elements of each group (two permutes per row and group,
   shared by the block's keys) against the keys' even and odd values. */
LLMKV__I512 __m512 llmkv__qkb_q4t(const float* q, uint32_t D, const unsigned char* const* kr,
                                  const unsigned char* const* kc, uint32_t R, const unsigned char* const* pr, int bare) {
    __m512 a[16], qe[4], qo[4];
    uint32_t KB = 16 / R, c, r, i;
    LLMKV__UNROLL for (i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
    for (c = 0; c < D; c += 32) {
        if (pr && c % 128 == 0) LLMKV__UNROLL for (i = 0; i < KB; ++i) _mm_prefetch((const char*)pr[i] + c / 2, _MM_HINT_T1);
        LLMKV__UNROLL for (r = 0; r < R; ++r) llmkv__z_even_odd(q + (size_t)r * D + c, &qe[r], &qo[r]);
        LLMKV__UNROLL for (i = 0; i < KB; ++i) {
            __m512 t = llmkv__z_q4_table(bare ? NULL : kc[i] + 4 * (c / LLMKV__QGROUP), bare);
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)(const void*)(kr[i] + c / 2)));
            __m512 ke = _mm512_permutexvar_ps(b, t), ko = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), t);
            LLMKV__UNROLL for (r = 0; r < R; ++r)
                a[r * KB + i] = _mm512_fmadd_ps(qo[r], ko, _mm512_fmadd_ps(qe[r], ke, a[r * KB + i]));
        }
    }
    return llmkv__reduce16(a);
}

/* The driver of the group-at-a-time QK blocks (rows in blocks of 4, 2, 1,
   as LLMKV__AVX512_QK); kind 0: Q8 keys, 1: Q4 keys, 2: Q4C's bare codes
   (no scale rows). head_dim a multiple of 32. */
LLMKV__I512 void llmkv__qk_grouped(const float* q, uint32_t M, uint32_t D, const unsigned char* const* k, size_t koff,
                                   const unsigned char* const* ks, size_t ksoff, uint32_t J, float* S, uint32_t sj,
                                   const unsigned char* const* pf, uint32_t npf, int kind) {
    const unsigned char *kr[16], *kc[16], *pr[16];
    uint32_t m = 0, j, R, KB;
    while (m < M) {
        R = llmkv__row_block(M - m);
        KB = 16 / R;
        for (j = 0; j < J; j += KB) {
            const float* qm = q + (size_t)m * D;
            const unsigned char* const* prj = m == 0 && j < npf ? pr : NULL; /* the first rows prefetch */
            __m512 sv;
            llmkv__block_rows(k, J, j, KB, koff, kr);
            if (kind != 2) llmkv__block_rows(ks, J, j, KB, ksoff, kc);
            if (prj) llmkv__block_rows(pf, npf, j, KB, koff, pr);
            if (kind == 0)
                sv = R == 4 ? llmkv__qkb_q8g(qm, D, kr, kc, 4, prj)
                            : R == 2 ? llmkv__qkb_q8g(qm, D, kr, kc, 2, prj) : llmkv__qkb_q8g(qm, D, kr, kc, 1, prj);
            else
                sv = R == 4   ? llmkv__qkb_q4t(qm, D, kr, kc, 4, prj, kind == 2)
                     : R == 2 ? llmkv__qkb_q4t(qm, D, kr, kc, 2, prj, kind == 2)
                              : llmkv__qkb_q4t(qm, D, kr, kc, 1, prj, kind == 2);
            llmkv__store_scores(sv, S + (size_t)m * sj + j, sj, R);
        }
        m += R;
    }
}

/* Q8 keys, Q4 keys, and Q4C's bare codes (the table 0..15); other
   head_dims take the generic kernels. */
#define LLMKV__QK_GROUPED(NAME, FALLBACK, KIND)                                                                      \
    static LLMKV__T512 void NAME(const float* q, uint32_t M, uint32_t D, const unsigned char* const* k, size_t koff, \
                                 const unsigned char* const* ks, size_t ksoff, uint32_t J, float* S, uint32_t sj,   \
                                 const unsigned char* const* pf, uint32_t npf) {                                    \
        if (D % 32) FALLBACK(q, M, D, k, koff, ks, ksoff, J, S, sj, pf, npf);                                       \
        else llmkv__qk_grouped(q, M, D, k, koff, ks, ksoff, J, S, sj, pf, npf, KIND);                                \
    }
LLMKV__QK_GROUPED(llmkv__qk_avx512_q8g, llmkv__qk_avx512_q8, 0)
LLMKV__QK_GROUPED(llmkv__qk_avx512_q4t, llmkv__qk_avx512_q4, 1)
LLMKV__QK_GROUPED(llmkv__qk_avx512_code4t, llmkv__qk_avx512_q4c, 2)

static LLMKV__T512 void llmkv__pv_avx512_q4t(const float* P, uint32_t sj, uint32_t M, uint32_t D,
                                             const unsigned char* const* v, size_t voff, const unsigned char* const* vs,
                                             size_t vsoff, uint32_t J, float* acc, const unsigned char* const* pf,
                                             uint32_t npf) {
    uint32_t m = 0, c, R;
    if (D % 32) {
        llmkv__pv_avx512_q4(P, sj, M, D, v, voff, vs, vsoff, J, acc, pf, npf);
        return;
    }
    while (m < M) {
        const float* Pm = P + (size_t)m * sj;
        float* am = acc + (size_t)m * D;
        const unsigned char* const* pfm = m == 0 ? pf : NULL; /* the first rows prefetch */
        uint32_t npfm = m == 0 ? npf : 0;
        R = llmkv__row_block(M - m);
        for (c = 0; c < D; c += 64) {
            size_t vo = voff + c / 2, so = vsoff + 4 * (c / LLMKV__QGROUP);
            uint32_t G = D - c >= 64 ? 2 : 1;
            switch (R * 2 + G) {
            case 10: llmkv__pvb_q4t(Pm, sj, D, v, vo, vs, so, J, am + c, 4, 2, pfm, npfm); break;
            case 9: llmkv__pvb_q4t(Pm, sj, D, v, vo, vs, so, J, am + c, 4, 1, pfm, npfm); break;
            case 6: llmkv__pvb_q4t(Pm, sj, D, v, vo, vs, so, J, am + c, 2, 2, pfm, npfm); break;
            case 5: llmkv__pvb_q4t(Pm, sj, D, v, vo, vs, so, J, am + c, 2, 1, pfm, npfm); break;
            case 4: llmkv__pvb_q4t(Pm, sj, D, v, vo, vs, so, J, am + c, 1, 2, pfm, npfm); break;
            default: llmkv__pvb_q4t(Pm, sj, D, v, vo, vs, so, J, am + c, 1, 1, pfm, npfm); break;
            }
        }
        m += R;
    }
}

/* --- AVX-512 with BF16 dot products ---------------------------------------- */
/* For BF16 K and V only: vdpbf16ps multiplies pairs of BF16 values and adds
   both products to an F32 lane, twice the work of an F32 FMA. QK splits the
   query into BF16 high and low parts (two dot products, so no K conversion
   and the query keeps about 16 bits); PV rounds the softmax weights to BF16
   (relative error 2^-9 per weight, so at most 2^-9 max|V| in the output)
   and pairs two keys: the dot product runs along j, so the values of keys
   j and j + 1 are interleaved (vpunpck[lh]wd), which orders each
   accumulator's dimensions [0-3, 8-11, 16-19, 24-27] (lo) and [4-7, ...]
   (hi) within 32-dimension blocks; acc is permuted to and from that order
   once per call. Accumulation is F32 throughout. */
#define LLMKV__T512BF __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))
#define LLMKV__I512BF \
    static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx2,fma,f16c")))

/* One QK block over query rows already in BF16: row r's high part at
   qb + 2 r Dp, its low part Dp after (Dp a multiple of 32, zero-padded).
   Two dot products per block of K, so the query keeps about 16 bits: BF16
   alone would add logit errors of 2^-9 relative, which large logits turn
   into visible weight errors. */
LLMKV__I512BF __m512 llmkv__qkb_dp(const uint16_t* qb, uint32_t Dp, uint32_t D, const unsigned char* const* kr,
                                   uint32_t R, const unsigned char* const* pr) {
    __m512 a[16];
    __m512i kv[16], qh[4], ql[4];
    uint32_t KB = 16 / R, c, r, i;
    LLMKV__UNROLL for (i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
    for (c = 0; c < D; c += 32) {
        __mmask32 mk = D - c >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << (D - c)) - 1);
        if (pr) LLMKV__UNROLL for (i = 0; i < KB; ++i) _mm_prefetch((const char*)pr[i] + (size_t)c * 2, _MM_HINT_T1);
        LLMKV__UNROLL for (i = 0; i < KB; ++i) kv[i] = _mm512_maskz_loadu_epi16(mk, kr[i] + (size_t)c * 2);
        LLMKV__UNROLL for (r = 0; r < R; ++r) {
            qh[r] = _mm512_loadu_si512((const void*)(qb + (size_t)r * 2 * Dp + c));
            ql[r] = _mm512_loadu_si512((const void*)(qb + (size_t)r * 2 * Dp + Dp + c));
        }
        LLMKV__UNROLL for (r = 0; r < R; ++r)
            LLMKV__UNROLL for (i = 0; i < KB; ++i) {
                a[r * KB + i] = _mm512_dpbf16_ps(a[r * KB + i], (__m512bh)qh[r], (__m512bh)kv[i]);
                a[r * KB + i] = _mm512_dpbf16_ps(a[r * KB + i], (__m512bh)ql[r], (__m512bh)kv[i]);
            }
    }
    return llmkv__reduce16(a);
}

/* q: the rows as BF16 high and low parts (see llmkv__qkb_dp and
   llmkv__attend_unit). */
static LLMKV__T512BF void llmkv__qk_avx512bf_bf16(const float* q, uint32_t M, uint32_t D, const unsigned char* const* k,
                                                  size_t koff, const unsigned char* const* ks, size_t ksoff, uint32_t J,
                                                  float* S, uint32_t sj, const unsigned char* const* pf, uint32_t npf) {
    const uint16_t* qb = (const uint16_t*)(const void*)q;
    const unsigned char *kr[16], *pr[16];
    uint32_t m = 0, j, R, KB, Dp = (D + 31) / 32 * 32;
    (void)ks;
    (void)ksoff;
    while (m < M) {
        R = llmkv__row_block(M - m);
        KB = 16 / R;
        for (j = 0; j < J; j += KB) {
            const uint16_t* qm = qb + (size_t)m * 2 * Dp;
            const unsigned char* const* prj = m == 0 && j < npf ? pr : NULL;
            __m512 s;
            llmkv__block_rows(k, J, j, KB, koff, kr);
            if (prj) llmkv__block_rows(pf, npf, j, KB, koff, pr);
            s = R == 4 ? llmkv__qkb_dp(qm, Dp, D, kr, 4, prj)
                       : R == 2 ? llmkv__qkb_dp(qm, Dp, D, kr, 2, prj) : llmkv__qkb_dp(qm, Dp, D, kr, 1, prj);
            llmkv__store_scores(s, S + (size_t)m * sj + j, sj, R);
        }
        m += R;
    }
}

/* One PV block: R rows, NP 32-dimension blocks from column c0 (acc and voff
   already offset), `left` dimensions remaining from c0. Pb: the rows'
   weights in BF16, Jp apart, zero past J. */
LLMKV__I512BF void llmkv__pvb_dp(const uint16_t* Pb, uint32_t Jp, uint32_t D, const unsigned char* const* v, size_t voff,
                                 uint32_t J, float* acc, uint32_t R, uint32_t NP, uint32_t left,
                                 const unsigned char* const* pf, uint32_t npf) {
    __m512 lo[8], hi[8];
    __m512i xl[2], xh[2];
    __mmask32 wm[2];
    __mmask16 m0[2], m1[2];
    uint32_t j, r, b, i;
    LLMKV__UNROLL for (b = 0; b < NP; ++b) {
        uint32_t n = left > 32 * b ? left - 32 * b : 0;
        if (n > 32) n = 32;
        wm[b] = n >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << n) - 1);
        m0[b] = (__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1);
        m1[b] = (__mmask16)(n >= 32 ? 0xffffu : n > 16 ? (1u << (n - 16)) - 1 : 0);
    }
    LLMKV__UNROLL for (r = 0; r < R; ++r)
        LLMKV__UNROLL for (b = 0; b < NP; ++b) {
            const float* o = acc + (size_t)r * D + 32 * b;
            __m512 a0 = _mm512_maskz_loadu_ps(m0[b], o), a1 = _mm512_maskz_loadu_ps(m1[b], o + 16);
            lo[r * NP + b] = _mm512_shuffle_f32x4(a0, a1, 0x88);
            hi[r * NP + b] = _mm512_shuffle_f32x4(a0, a1, 0xdd);
        }
    for (j = 0; j < J; j += 2) {
        const unsigned char* r0 = v[j] + voff;
        const unsigned char* r1 = v[j + 1 < J ? j + 1 : j] + voff;
        if (j < npf)
            LLMKV__UNROLL for (i = 0; i < NP; ++i) {
                _mm_prefetch((const char*)pf[j] + voff + 64 * i, _MM_HINT_T1);
                _mm_prefetch((const char*)pf[j + 1 < npf ? j + 1 : j] + voff + 64 * i, _MM_HINT_T1);
            }
        LLMKV__UNROLL for (b = 0; b < NP; ++b) {
            __m512i x = _mm512_maskz_loadu_epi16(wm[b], r0 + 64 * b), y = _mm512_maskz_loadu_epi16(wm[b], r1 + 64 * b);
            xl[b] = _mm512_unpacklo_epi16(x, y);
            xh[b] = _mm512_unpackhi_epi16(x, y);
        }
        LLMKV__UNROLL for (r = 0; r < R; ++r) {
            int32_t pair;
            __m512i p;
            memcpy(&pair, Pb + (size_t)r * Jp + j, 4);
            p = _mm512_set1_epi32(pair);
            LLMKV__UNROLL for (b = 0; b < NP; ++b) {
                lo[r * NP + b] = _mm512_dpbf16_ps(lo[r * NP + b], (__m512bh)p, (__m512bh)xl[b]);
                hi[r * NP + b] = _mm512_dpbf16_ps(hi[r * NP + b], (__m512bh)p, (__m512bh)xh[b]);
            }
        }
    }
    LLMKV__UNROLL for (r = 0; r < R; ++r)
        LLMKV__UNROLL for (b = 0; b < NP; ++b) {
            float* o = acc + (size_t)r * D + 32 * b;
            __m512 t0 = _mm512_shuffle_f32x4(lo[r * NP + b], hi[r * NP + b], 0x44);
            __m512 t1 = _mm512_shuffle_f32x4(lo[r * NP + b], hi[r * NP + b], 0xee);
            _mm512_mask_storeu_ps(o, m0[b], _mm512_shuffle_f32x4(t0, t0, 0xd8));
            _mm512_mask_storeu_ps(o + 16, m1[b], _mm512_shuffle_f32x4(t1, t1, 0xd8));
        }
}

static LLMKV__T512BF void llmkv__pv_avx512bf_bf16(const float* P, uint32_t sj, uint32_t M, uint32_t D,
                                                  const unsigned char* const* v, size_t voff,
                                                  const unsigned char* const* vs, size_t vsoff, uint32_t J, float* acc,
                                                  const unsigned char* const* pf, uint32_t npf) {
    uint16_t Pb[LLMKV__ATTN_HEAD_ROWS * (LLMKV__ATTN_CHUNK + 16)];
    uint32_t Jp = (J + 15) / 16 * 16, m, j, c, R, NP;
    (void)vs;
    (void)vsoff;
    /* The weights in BF16, rounded to nearest even, zero past J. */
    for (m = 0; m < M; ++m)
        for (j = 0; j < Jp; j += 16) {
            __mmask16 mk = (__mmask16)(J - j >= 16 ? 0xffffu : (1u << (J - j)) - 1);
            __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(mk, P + (size_t)m * sj + j));
            _mm256_storeu_si256((__m256i*)(void*)(Pb + (size_t)m * Jp + j), (__m256i)h);
        }
    for (m = 0; m < M; m += R) {
        const unsigned char* const* pfm = m == 0 ? pf : NULL; /* the first rows prefetch */
        uint32_t npfm = m == 0 ? npf : 0;
        R = llmkv__row_block(M - m);
        for (c = 0; c < D; c += 64) {
            const uint16_t* pm = Pb + (size_t)m * Jp;
            float* am = acc + (size_t)m * D + c;
            size_t off = voff + (size_t)c * 2;
            uint32_t left = D - c;
            NP = left > 32 ? 2 : 1;
            switch (R * 2 + NP) {
            case 10: llmkv__pvb_dp(pm, Jp, D, v, off, J, am, 4, 2, left, pfm, npfm); break;
            case 9: llmkv__pvb_dp(pm, Jp, D, v, off, J, am, 4, 1, left, pfm, npfm); break;
            case 6: llmkv__pvb_dp(pm, Jp, D, v, off, J, am, 2, 2, left, pfm, npfm); break;
            case 5: llmkv__pvb_dp(pm, Jp, D, v, off, J, am, 2, 1, left, pfm, npfm); break;
            case 4: llmkv__pvb_dp(pm, Jp, D, v, off, J, am, 1, 2, left, pfm, npfm); break;
            default: llmkv__pvb_dp(pm, Jp, D, v, off, J, am, 1, 1, left, pfm, npfm); break;
            }
        }
    }
}

/* exp on [-87, 88] by 2^n * p(r), r = x - n ln2 in [-ln2/2, ln2/2], p the
   degree-6 Taylor polynomial (relative error < 2e-7); below -87 (masked
   keys are -inf) the result is exactly 0. */
/* --- AVX-512 VNNI: int8 query against Q4 keys ----------------------------- */
/* vpdpbusd multiplies 64 unsigned bytes by 64 signed bytes and adds each
   group of four products to an int32 lane: four times the elements of an
   F32 FMA. The driver rounds each query row to int8 once per unit (see
   llmkv__qint_prepare): q_int = rint(q * 127 / max|q|), so the kernel
   computes (max|q| / 127) * (q_int . code) exactly in integers per
   32-element group, then applies the group's F16 scale, and its minimum
   times the group's sum of q_int, in F32. The only approximation beyond the
   stored keys is the query's rounding to 8 bits (at most 1/254 of its
   largest element, per element): next to Q4's own error (about 10%
   relative on Gaussian data) it is invisible (10.80% -> 10.81%). Q8 keys
   keep the F32 query: there the rounding would add as much error as the
   format itself (measured 0.80% -> 1.08%). The even elements (low nibbles)
   and the odd ones (high nibbles) are multiplied by the query's even and
   odd elements, which the prepared row keeps apart. Used when head_dim is a
   multiple of 128; other sizes take the AVX-512 F32 kernels. */
#define LLMKV__T512VN __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#define LLMKV__I512VN \
    static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))

/* The scores of a block (lane r * KB + i for row r, key i) times each
   row's query scale, stored. */
LLMKV__I512VN void llmkv__store_qint_scores(__m512 s, const unsigned char* q, uint32_t RB, uint32_t D, float* S,
                                            uint32_t sj, uint32_t R) {
    __m512 sc = _mm512_setzero_ps();
    uint32_t r, KB = 16 / R;
    for (r = 0; r < R; ++r)
        sc = _mm512_mask_mov_ps(sc, (__mmask16)(((1u << KB) - 1) << (r * KB)),
                                _mm512_set1_ps(llmkv__ld_f32s(q + (size_t)r * RB + 2 * (size_t)D)));
    llmkv__store_scores(_mm512_mul_ps(s, sc), S, sj, R);
}

/* One block of rows q against Q4 keys: 128 elements (64 code bytes, four
   groups) at a time. */
LLMKV__I512VN __m512 llmkv__qkb_vnni_q4(const unsigned char* q, uint32_t RB, uint32_t D, const unsigned char* const* kr,
                                        const unsigned char* const* kc, uint32_t R, const unsigned char* const* pr) {
    __m512 a[16], qg[4];
    __m512i qe[4], qo[4];
    const __m512i ps = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
    const __m512i pm = _mm512_set_epi32(7, 7, 7, 7, 5, 5, 5, 5, 3, 3, 3, 3, 1, 1, 1, 1);
    const __m512i low = _mm512_set1_epi8(15);
    uint32_t KB = 16 / R, c, r, i;
    LLMKV__UNROLL for (i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
    for (c = 0; c < D; c += 128) {
        if (pr) LLMKV__UNROLL for (i = 0; i < KB; ++i) _mm_prefetch((const char*)pr[i] + c / 2, _MM_HINT_T1);
        LLMKV__UNROLL for (r = 0; r < R; ++r) {
            qe[r] = _mm512_loadu_si512((const void*)(q + (size_t)r * RB + c));
            qo[r] = _mm512_loadu_si512((const void*)(q + (size_t)r * RB + c + 64));
            qg[r] = _mm512_loadu_ps((const void*)(q + (size_t)r * RB + D + c / 2));
        }
        LLMKV__UNROLL for (i = 0; i < KB; ++i) {
            __m512i b = _mm512_loadu_si512((const void*)(kr[i] + c / 2));
            __m512i lo = _mm512_and_si512(b, low), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
            /* (s, m) of the four groups, each to the four lanes of its group */
            __m512 sm = _mm512_castps256_ps512(
                _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(const void*)(kc[i] + 4 * (c / LLMKV__QGROUP)))));
            __m512 sv = _mm512_permutexvar_ps(ps, sm), mv = _mm512_permutexvar_ps(pm, sm);
            LLMKV__UNROLL for (r = 0; r < R; ++r) {
                __m512i t = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, qe[r]), hi, qo[r]);
                a[r * KB + i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), sv, a[r * KB + i]);
                a[r * KB + i] = _mm512_fmadd_ps(mv, qg[r], a[r * KB + i]);
            }
        }
    }
    return llmkv__reduce16(a);
}

#define LLMKV__VNNI_KERNEL(SUFFIX, TY)                                                                              \
    static LLMKV__T512VN void llmkv__qk_vnni_##SUFFIX(const float* qf, uint32_t M, uint32_t D,                      \
                                                      const unsigned char* const* k, size_t koff,                   \
                                                      const unsigned char* const* ks, size_t ksoff, uint32_t J,     \
                                                      float* S, uint32_t sj, const unsigned char* const* pf,        \
                                                      uint32_t npf) {                                               \
        const unsigned char* q = (const unsigned char*)(const void*)qf;                                             \
        const unsigned char *kr[16], *kc[16], *pr[16];                                                              \
        uint32_t m = 0, j, R, KB, RB = llmkv__qint_row_bytes(D);                                                    \
        while (m < M) {                                                                                             \
            R = llmkv__row_block(M - m);                                                                            \
            KB = 16 / R;                                                                                            \
            for (j = 0; j < J; j += KB) {                                                                           \
                const unsigned char* qm = q + (size_t)m * RB;                                                       \
                const unsigned char* const* prj = m == 0 && j < npf ? pr : NULL; /* the first rows prefetch */     \
                __m512 s;                                                                                           \
                llmkv__block_rows(k, J, j, KB, koff, kr);                                                           \
                llmkv__block_rows(ks, J, j, KB, ksoff, kc);                                                         \
                if (prj) llmkv__block_rows(pf, npf, j, KB, koff, pr);                                               \
                s = R == 4 ? llmkv__qkb_vnni_##SUFFIX(qm, RB, D, kr, kc, 4, prj)                                    \
                           : R == 2 ? llmkv__qkb_vnni_##SUFFIX(qm, RB, D, kr, kc, 2, prj)                           \
                                    : llmkv__qkb_vnni_##SUFFIX(qm, RB, D, kr, kc, 1, prj);                          \
                llmkv__store_qint_scores(s, qm, RB, D, S + (size_t)m * sj + j, sj, R);                              \
            }                                                                                                       \
            m += R;                                                                                                 \
        }                                                                                                           \
    }
LLMKV__VNNI_KERNEL(q4, LLMKV_DTYPE_Q4)

/* exp(x) for x already clamped to a range where 2^n cannot overflow: x =
   n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r, scaled by 2^n. */
LLMKV__I512 __m512 llmkv__exp512_core(__m512 x) {
    __m512 n, r, p;
    n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145752f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860677e-6f), r);
    p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static LLMKV__T512 __m512 llmkv__exp512(__m512 x) {
    __mmask16 tiny = _mm512_mask_cmp_ps_mask((__mmask16)0xffffu, x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), _mm512_max_ps(_mm512_set1_ps(-87.0f), x)); /* NaN stays NaN */
    return _mm512_maskz_mov_ps((__mmask16)~tiny, llmkv__exp512_core(x));
}

static LLMKV__T512 float llmkv__max_avx512(const float* x, uint32_t n) {
    __m512 m = _mm512_set1_ps(-INFINITY);
    uint32_t i;
    float t[16], r;
    for (i = 0; i < n; i += 16) {
        __mmask16 mk = (__mmask16)(n - i >= 16 ? 0xffffu : (1u << (n - i)) - 1);
        m = _mm512_mask_max_ps(m, mk, m, _mm512_maskz_loadu_ps(mk, x + i));
    }
    _mm512_storeu_ps(t, m);
    r = t[0];
    for (i = 1; i < 16; ++i) r = t[i] > r ? t[i] : r;
    return r;
}

static LLMKV__T512 float llmkv__ex_avx512(float* x, uint32_t n, float sub) {
    __m512 s = _mm512_setzero_ps(), b = _mm512_set1_ps(sub);
    uint32_t i;
    for (i = 0; i < n; i += 16) {
        __mmask16 mk = (__mmask16)(n - i >= 16 ? 0xffffu : (1u << (n - i)) - 1);
        __m512 e = llmkv__exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, x + i), b));
        e = _mm512_maskz_mov_ps(mk, e);
        _mm512_mask_storeu_ps(x + i, mk, e);
        s = _mm512_add_ps(s, e);
    }
    return llmkv__hsum512(s);
}

/* --- AVX-512 prefill tiles (see llmkv__attend_tile) ------------------------ */
/* Rows in lanes: a tile of Mp = 16 RB query rows is held transposed (QT[d][r]
   and accT[c][r], Mp floats apart), so each K or V element, broadcast,
   meets sixteen rows in one FMA and no reduction is needed. Keys and values
   are read as F32 rows: F32 pages directly, other types converted once per
   tile into per-thread scratch. */

/* Rows [0, n) of a part converted to F32 into dst, D floats apart. */
#define LLMKV__TILE_ROWS_LOOP(Z16, Z)                                                                             \
    for (i = 0; i < n; ++i) {                                                                                     \
        const unsigned char* p = rows[i] + off;                                                                   \
        const unsigned char* sc = srows ? srows[i] + soff : NULL;                                                 \
        float* o = dst + (size_t)i * D;                                                                           \
        for (c = 0; c + 16 <= D; c += 16) _mm512_storeu_ps(o + c, Z16(p, sc, c));                                \
        if (c < D) _mm512_mask_storeu_ps(o + c, tail, Z(tail, p, sc, c));                                        \
    }
static LLMKV__T512 void llmkv__tile_rows_avx512(llmkv_dtype t, const unsigned char* const* rows, size_t off,
                                                const unsigned char* const* srows, size_t soff, uint32_t n,
                                                uint32_t D, float* dst) {
    uint32_t i, c;
    __mmask16 tail = (__mmask16)((1u << D % 16) - 1);
    switch (t) {
    case LLMKV_DTYPE_F16: LLMKV__TILE_ROWS_LOOP(llmkv__z16_f16, llmkv__z_f16) break;
    case LLMKV_DTYPE_BF16: LLMKV__TILE_ROWS_LOOP(llmkv__z16_bf16, llmkv__z_bf16) break;
    case LLMKV_DTYPE_Q8: LLMKV__TILE_ROWS_LOOP(llmkv__z16_q8, llmkv__z_q8) break;
    case LLMKV_DTYPE_Q4: LLMKV__TILE_ROWS_LOOP(llmkv__z16_q4, llmkv__z_q4) break;
    case LLMKV_DTYPE_FP8: LLMKV__TILE_ROWS_LOOP(llmkv__z16_fp8, llmkv__z_fp8) break;
    default: LLMKV__TILE_ROWS_LOOP(llmkv__z16_f32, llmkv__z_f32) break;
    }
}
#undef LLMKV__TILE_ROWS_LOOP

/* Scores of the tile's 16 RB rows against NK keys (rows kr[0 .. NK), F32):
   ST[j][r] for j < nk. Accumulators RB x NK (16 or 15). */
LLMKV__I512 void llmkv__tqk_block(const float* QT, uint32_t D, const float* const* kr, uint32_t nk, float* ST,
                                  const uint32_t RB, const uint32_t NK) {
    __m512 acc[4][8];
    const float* k[8];
    uint32_t d, b, j, Mp = 16 * RB;
    LLMKV__UNROLL for (j = 0; j < NK; ++j) k[j] = kr[j];
    LLMKV__UNROLL for (b = 0; b < RB; ++b) LLMKV__UNROLL for (j = 0; j < NK; ++j) acc[b][j] = _mm512_setzero_ps();
    for (d = 0; d < D; ++d) {
        __m512 q[4];
        LLMKV__UNROLL for (b = 0; b < RB; ++b) q[b] = _mm512_load_ps(QT + (size_t)d * Mp + 16 * b);
        LLMKV__UNROLL for (j = 0; j < NK; ++j) {
            __m512 kv = _mm512_set1_ps(k[j][d]);
            LLMKV__UNROLL for (b = 0; b < RB; ++b) acc[b][j] = _mm512_fmadd_ps(q[b], kv, acc[b][j]);
        }
    }
    LLMKV__UNROLL for (j = 0; j < NK; ++j)
        if (j < nk)
            LLMKV__UNROLL for (b = 0; b < RB; ++b) _mm512_store_ps(ST + (size_t)j * Mp + 16 * b, acc[b][j]);
}

/* accT[c][r] (columns c0 .. c0 + CW) = alpha[r] accT[c][r] (when rescale)
   + sum_j PT[j][r] V[j][c]; accumulators RB x CW held over all J keys. */
LLMKV__I512 void llmkv__tpv_block(const float* PT, uint32_t J, const float* const* vr, uint32_t c0, float* accT,
                                  const float* alpha, int rescale, const uint32_t RB, const uint32_t CW) {
    __m512 acc[4][8], p[4];
    uint32_t j, b, c, Mp = 16 * RB;
    LLMKV__UNROLL for (c = 0; c < CW; ++c) LLMKV__UNROLL for (b = 0; b < RB; ++b) {
        acc[b][c] = _mm512_load_ps(accT + (size_t)(c0 + c) * Mp + 16 * b);
        if (rescale) acc[b][c] = _mm512_mul_ps(acc[b][c], _mm512_load_ps(alpha + 16 * b));
    }
    for (j = 0; j < J; ++j) {
        const float* v = vr[j] + c0;
        LLMKV__UNROLL for (b = 0; b < RB; ++b) p[b] = _mm512_load_ps(PT + (size_t)j * Mp + 16 * b);
        LLMKV__UNROLL for (c = 0; c < CW; ++c) {
            __m512 vb = _mm512_set1_ps(v[c]);
            LLMKV__UNROLL for (b = 0; b < RB; ++b) acc[b][c] = _mm512_fmadd_ps(p[b], vb, acc[b][c]);
        }
    }
    LLMKV__UNROLL for (c = 0; c < CW; ++c) LLMKV__UNROLL for (b = 0; b < RB; ++b)
        _mm512_store_ps(accT + (size_t)(c0 + c) * Mp + 16 * b, acc[b][c]);
}

/* Keys per QK block and value columns per PV block for RB row vectors. */
#define LLMKV__TILE_NK(RB) ((RB) <= 2 ? 8u : (RB) == 3 ? 5u : 4u)
#define LLMKV__TILE_CW(RB) ((RB) <= 2 ? 8u : 4u)

static LLMKV__T512 void llmkv__tile_qk_avx512(const float* QT, uint32_t RB, uint32_t D, llmkv_dtype t,
                                              const unsigned char* const* k, size_t koff,
                                              const unsigned char* const* ks, size_t ksoff, uint32_t J, float* ST,
                                              float* scratch, const unsigned char* const* pf, uint32_t npf,
                                              uint32_t pf_bytes) {
    const float* kr[8];
    uint32_t NK = LLMKV__TILE_NK(RB), j0, j, nk;
    for (j0 = 0; j0 < J; j0 += nk) {
        nk = J - j0 < NK ? J - j0 : NK;
        if (j0 < npf) llmkv__prefetch_rows(pf + j0, npf - j0 < nk ? npf - j0 : nk, pf_bytes, 0); /* npf <= J */
        if (t == LLMKV_DTYPE_F32)
            for (j = 0; j < NK; ++j) kr[j] = (const float*)(const void*)(k[j0 + (j < nk ? j : nk - 1)] + koff);
        else {
            llmkv__tile_rows_avx512(t, k + j0, koff, ks ? ks + j0 : NULL, ksoff, nk, D, scratch);
            for (j = 0; j < NK; ++j) kr[j] = scratch + (size_t)(j < nk ? j : nk - 1) * D;
        }
        switch (RB) {
        case 1: llmkv__tqk_block(QT, D, kr, nk, ST + (size_t)j0 * 16, 1, LLMKV__TILE_NK(1)); break;
        case 2: llmkv__tqk_block(QT, D, kr, nk, ST + (size_t)j0 * 32, 2, LLMKV__TILE_NK(2)); break;
        case 3: llmkv__tqk_block(QT, D, kr, nk, ST + (size_t)j0 * 48, 3, LLMKV__TILE_NK(3)); break;
        default: llmkv__tqk_block(QT, D, kr, nk, ST + (size_t)j0 * 64, 4, LLMKV__TILE_NK(4)); break;
        }
    }
}

static LLMKV__T512 void llmkv__tile_pv_avx512(const float* PT, uint32_t RB, uint32_t D, llmkv_dtype t,
                                              const unsigned char* const* v, size_t voff,
                                              const unsigned char* const* vs, size_t vsoff, uint32_t J, float* accT,
                                              const float* alpha, int rescale, float* scratch,
                                              const unsigned char* const* pf, uint32_t npf, uint32_t pf_bytes) {
    const float* vr[LLMKV__TILE_MAX_KEYS];
    uint32_t CW = LLMKV__TILE_CW(RB), j, c0, p = 0, credit = 0;
    if (t == LLMKV_DTYPE_F32)
        for (j = 0; j < J; ++j) vr[j] = (const float*)(const void*)(v[j] + voff);
    else {
        llmkv__tile_rows_avx512(t, v, voff, vs, vsoff, J, D, scratch);
        for (j = 0; j < J; ++j) vr[j] = scratch + (size_t)j * D;
    }
    for (c0 = 0; c0 < D; c0 += CW) {
        for (credit += npf * CW; credit >= D && p < npf; credit -= D) /* npf rows spread over D / CW blocks */
            llmkv__prefetch_rows(pf + p++, 1, pf_bytes, 0);
        switch (RB) {
        case 1: llmkv__tpv_block(PT, J, vr, c0, accT, alpha, rescale, 1, LLMKV__TILE_CW(1)); break;
        case 2: llmkv__tpv_block(PT, J, vr, c0, accT, alpha, rescale, 2, LLMKV__TILE_CW(2)); break;
        case 3: llmkv__tpv_block(PT, J, vr, c0, accT, alpha, rescale, 3, LLMKV__TILE_CW(3)); break;
        default: llmkv__tpv_block(PT, J, vr, c0, accT, alpha, rescale, 4, LLMKV__TILE_CW(4)); break;
        }
    }
}

/* Transposes 16 x 16 floats in place: x[i] lane j <- x[j] lane i. */
LLMKV__I512 void llmkv__transpose16(__m512* x) {
    __m512 t[16];
    uint32_t i;
    LLMKV__UNROLL for (i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_ps(x[2 * i], x[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(x[2 * i], x[2 * i + 1]);
    }
    LLMKV__UNROLL for (i = 0; i < 4; ++i) {
        x[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
        x[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i]), _mm512_castps_pd(t[4 * i + 2])));
        x[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
        x[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[4 * i + 1]), _mm512_castps_pd(t[4 * i + 3])));
    }
    /* x[4i + k] now holds, in each 128-bit lane L, elements k of rows 4i..4i+3 at columns 4L + k' order */
    LLMKV__UNROLL for (i = 0; i < 4; ++i) {
        t[i] = _mm512_shuffle_f32x4(x[i], x[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(x[i], x[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_f32x4(x[8 + i], x[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(x[8 + i], x[12 + i], 0xdd);
    }
    LLMKV__UNROLL for (i = 0; i < 4; ++i) {
        x[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        x[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
        x[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        x[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
    }
}

static LLMKV__T512 void llmkv__tile_in_avx512(float* QT, uint32_t RB, uint32_t D, const float* const* src, float scale) {
    uint32_t Mp = 16 * RB, r0, c, i, n;
    __m512 x[16], sc = _mm512_set1_ps(scale);
    for (r0 = 0; r0 < Mp; r0 += 16)
        for (c = 0; c < D; c += 16) {
            __mmask16 m = (__mmask16)(D - c >= 16 ? 0xffffu : (1u << (D - c)) - 1);
            n = D - c >= 16 ? 16 : D - c;
            LLMKV__UNROLL for (i = 0; i < 16; ++i) x[i] = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, src[r0 + i] + c), sc);
            llmkv__transpose16(x);
            for (i = 0; i < n; ++i) _mm512_store_ps(QT + (size_t)(c + i) * Mp + r0, x[i]);
        }
}

static LLMKV__T512 void llmkv__tile_out_avx512(float* const* dst, uint32_t M, const float* accT, uint32_t RB, uint32_t D,
                                               const float* mult) {
    uint32_t Mp = 16 * RB, r0, c, i, n, nr;
    __m512 x[16];
    for (r0 = 0; r0 < M; r0 += 16) {
        __m512 mu = _mm512_load_ps(mult + r0);
        nr = M - r0 < 16 ? M - r0 : 16;
        for (c = 0; c < D; c += 16) {
            __mmask16 m = (__mmask16)(D - c >= 16 ? 0xffffu : (1u << (D - c)) - 1);
            n = D - c >= 16 ? 16 : D - c;
            LLMKV__UNROLL for (i = 0; i < 16; ++i)
                x[i] = i < n ? _mm512_mul_ps(_mm512_load_ps(accT + (size_t)(c + i) * Mp + r0), mu) : _mm512_setzero_ps();
            llmkv__transpose16(x);
            for (i = 0; i < nr; ++i) _mm512_mask_storeu_ps(dst[r0 + i] + c, m, x[i]);
        }
    }
}

/* 2^x for x <= 0 or NaN (a score minus its row's maximum, in base 2: the
   tile path scales its queries by log2(e)): x = n + r, |r| <= 1/2, a
   degree-6 polynomial in r (the series of e^(r ln 2)), scaled by 2^n.
   Below -160 the result underflows to exactly 0 (2^-inf is 0), so no mask
   is needed; NaN stays NaN. Two operations fewer than exp: no multiply by
   log2(e), and r needs no two-part ln 2. */
LLMKV__I512 __m512 llmkv__exp2_512_neg(__m512 x) {
    __m512 n, r, p;
    x = _mm512_max_ps(_mm512_set1_ps(-160.0f), x); /* NaN stays NaN */
    n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_sub_ps(x, n);
    p = _mm512_set1_ps(1.540353040e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.333355815e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.618129108e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550410866e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.402265070e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931471806e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The online-softmax step of a tile over scores ST[j][r], j < J (keys k + j),
   in base 2 (scores and maximums are log2(e) times the natural ones):
   masks keys outside [lo[r], hi[r]) unless `whole`, turns scores into
   2^(s - m) with m the row's new running maximum, updates mx and l, and
   sets alpha[r] = 2^(old m - new m), the factor accT must be scaled by.
   Returns 0 when every alpha is 1 (nothing to rescale). A row with no
   visible key so far keeps max -inf, sum 0 and alpha 0. */
static LLMKV__T512 int llmkv__tile_soft_avx512(float* ST, uint32_t RB, uint32_t J, uint32_t k, const uint32_t* lo,
                                               const uint32_t* hi, int whole, float* mx, float* l, float* alpha) {
    uint32_t Mp = 16 * RB, b, j;
    const __m512 ninf = _mm512_set1_ps(-INFINITY), one = _mm512_set1_ps(1.0f);
    __mmask16 changed = 0;
    for (b = 0; b < RB; ++b) {
        float* s = ST + 16 * b;
        __m512 m = ninf, mo = _mm512_load_ps(mx + 16 * b), newm, base, a, sum = _mm512_setzero_ps();
        if (!whole) {
            __m512i lov = _mm512_loadu_si512((const void*)(lo + 16 * b)), hiv = _mm512_loadu_si512((const void*)(hi + 16 * b));
            for (j = 0; j < J; ++j) {
                __m512i key = _mm512_set1_epi32((int)(k + j));
                __mmask16 vis = _mm512_cmpge_epu32_mask(key, lov) & _mm512_cmplt_epu32_mask(key, hiv);
                __m512 x = _mm512_mask_mov_ps(ninf, vis, _mm512_load_ps(s + (size_t)j * Mp));
                _mm512_store_ps(s + (size_t)j * Mp, x);
                m = _mm512_max_ps(m, x);
            }
        } else
            for (j = 0; j < J; ++j) m = _mm512_max_ps(m, _mm512_load_ps(s + (size_t)j * Mp));
        newm = _mm512_max_ps(mo, m);
        base = _mm512_mask_mov_ps(newm, _mm512_cmp_ps_mask(newm, ninf, _CMP_EQ_OQ), _mm512_setzero_ps());
        a = llmkv__exp2_512_neg(_mm512_sub_ps(mo, base));
        for (j = 0; j < J; ++j) {
            __m512 e = llmkv__exp2_512_neg(_mm512_sub_ps(_mm512_load_ps(s + (size_t)j * Mp), base));
            _mm512_store_ps(s + (size_t)j * Mp, e);
            sum = _mm512_add_ps(sum, e);
        }
        _mm512_store_ps(l + 16 * b, _mm512_fmadd_ps(_mm512_load_ps(l + 16 * b), a, sum));
        _mm512_store_ps(mx + 16 * b, newm);
        _mm512_store_ps(alpha + 16 * b, a);
        changed |= _mm512_cmp_ps_mask(a, one, _CMP_NEQ_UQ);
    }
    return changed != 0;
}

/* --- AVX2 + FMA + F16C ----------------------------------------------------- */
/* 8 elements per vector; a row's tail past the last full vector is scalar. */

/* Elements [c, c + 8) of a stored vector p with scales sc. */
static LLMKV__T256 __m256 llmkv__y_f32(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return _mm256_loadu_ps((const float*)(const void*)(p + 4 * (size_t)c));
}
static LLMKV__T256 __m256 llmkv__y_f16(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(const void*)(p + 2 * (size_t)c)));
}
static LLMKV__T256 __m256 llmkv__y_bf16(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)(const void*)(p + 2 * (size_t)c))), 16));
}
static LLMKV__T256 __m256 llmkv__y_f16_bcast(const unsigned char* h) {
    return _mm256_cvtph_ps(_mm_set1_epi16((short)llmkv__ld_u16(h)));
}
static LLMKV__T256 __m256 llmkv__y_q8(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(const void*)(p + c))));
    return _mm256_mul_ps(x, llmkv__y_f16_bcast(sc + 2 * (c / LLMKV__QGROUP)));
}
static LLMKV__T256 __m256 llmkv__y_code4(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    int32_t w;
    __m128i b, lo, hi;
    (void)sc;
    memcpy(&w, p + c / 2, 4);
    b = _mm_cvtsi32_si128(w);
    lo = _mm_and_si128(b, _mm_set1_epi8(15));
    hi = _mm_and_si128(_mm_srli_epi16(b, 4), _mm_set1_epi8(15));
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)));
}
static LLMKV__T256 __m256 llmkv__y_q4(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    const unsigned char* g = sc + 4 * (c / LLMKV__QGROUP);
    return _mm256_fmadd_ps(llmkv__y_code4(p, sc, c), llmkv__y_f16_bcast(g), llmkv__y_f16_bcast(g + 2));
}
/* E4M3 through F16 bit patterns, as llmkv__z_e4m3_f16 explains. */
static LLMKV__T256 __m256 llmkv__y_fp8(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    __m128i w = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)(const void*)(p + c)));
    __m128i mag = _mm_srli_epi16(_mm_slli_epi16(w, 9), 2);
    __m128i h = _mm_or_si128(_mm_and_si128(_mm_slli_epi16(w, 8), _mm_set1_epi16((short)0x8000)), mag);
    return _mm256_mul_ps(_mm256_cvtph_ps(h), _mm256_set1_ps(256.0f * llmkv__ld_f32s(sc)));
}

#define LLMKV__AVX2_QK(SUFFIX, LD, LDS, TY)                                                                  \
    static LLMKV__T256 void llmkv__qk_avx2_##SUFFIX(const float* q, uint32_t M, uint32_t D,                      \
                                                    const unsigned char* const* k, size_t koff, const unsigned char* const* ks, size_t ksoff, uint32_t J, float* S,      \
                                                    uint32_t sj, const unsigned char* const* pf, uint32_t npf) {  \
        uint32_t n = D / 8, m = 0, j, c, d;                                                                       \
        llmkv__prefetch_rows(pf, npf, llmkv__vec_data_bytes(TY, D), koff);                                                              \
        for (; m + 4 <= M; m += 4) {                                                                              \
            const float* q0 = q + (size_t)m * D;                                                                  \
            /* two keys at a time (each query chunk loaded once for both),         \
               reduced together; head_dim a multiple of 8 */                       \
            for (j = 0; n * 8 == D && j + 2 <= J; j += 2) {                                                       \
                const unsigned char *kr0 = k[j] + koff, *kc0 = ks[j] + ksoff;                                     \
                const unsigned char *kr1 = k[j + 1] + koff, *kc1 = ks[j + 1] + ksoff;                             \
                __m256 x0 = _mm256_setzero_ps(), x1 = x0, x2 = x0, x3 = x0, x4 = x0, x5 = x0, x6 = x0, x7 = x0;  \
                __m128 r01, r23;                                                                                  \
                for (c = 0; c < n; ++c) {                                                                         \
                    __m256 k0 = LD(kr0, kc0, c * 8), k1 = LD(kr1, kc1, c * 8), qv;                                \
                    qv = _mm256_loadu_ps(q0 + c * 8);                                                             \
                    x0 = _mm256_fmadd_ps(qv, k0, x0);                                                             \
                    x1 = _mm256_fmadd_ps(qv, k1, x1);                                                             \
                    qv = _mm256_loadu_ps(q0 + D + c * 8);                                                         \
                    x2 = _mm256_fmadd_ps(qv, k0, x2);                                                             \
                    x3 = _mm256_fmadd_ps(qv, k1, x3);                                                             \
                    qv = _mm256_loadu_ps(q0 + 2 * D + c * 8);                                                     \
                    x4 = _mm256_fmadd_ps(qv, k0, x4);                                                             \
                    x5 = _mm256_fmadd_ps(qv, k1, x5);                                                             \
                    qv = _mm256_loadu_ps(q0 + 3 * D + c * 8);                                                     \
                    x6 = _mm256_fmadd_ps(qv, k0, x6);                                                             \
                    x7 = _mm256_fmadd_ps(qv, k1, x7);                                                             \
                }                                                                                                 \
                r01 = llmkv__hsum256x4(x0, x1, x2, x3); /* [r0 k0, r0 k1, r1 k0, r1 k1] */                    \
                r23 = llmkv__hsum256x4(x4, x5, x6, x7);                                                           \
                _mm_storel_pi((__m64*)(void*)(S + (size_t)m * sj + j), r01);                                      \
                _mm_storeh_pi((__m64*)(void*)(S + (size_t)(m + 1) * sj + j), r01);                                \
                _mm_storel_pi((__m64*)(void*)(S + (size_t)(m + 2) * sj + j), r23);                                \
                _mm_storeh_pi((__m64*)(void*)(S + (size_t)(m + 3) * sj + j), r23);                                \
            }                                                                                                     \
            for (; j < J; ++j) {                                                                                  \
                const unsigned char *kr = k[j] + koff, *kc = ks[j] + ksoff;                                                             \
                __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                       \
                float t0 = 0, t1 = 0, t2 = 0, t3 = 0;                                                             \
                for (c = 0; c < n; ++c) {                                                                         \
                    __m256 kv = LD(kr, kc, c * 8);                                                      \
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c * 8), kv, a0);                                    \
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + D + c * 8), kv, a1);                                \
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 2 * D + c * 8), kv, a2);                            \
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + 3 * D + c * 8), kv, a3);                            \
                }                                                                                                 \
                for (d = n * 8; d < D; ++d) {                                                                     \
                    float x = LDS(kr, kc, d);                                                                         \
                    t0 += q0[d] * x; t1 += q0[D + d] * x; t2 += q0[2 * D + d] * x; t3 += q0[3 * D + d] * x;       \
                }                                                                                                 \
                S[(size_t)m * sj + j] = llmkv__hsum256(a0) + t0;                                                  \
                S[(size_t)(m + 1) * sj + j] = llmkv__hsum256(a1) + t1;                                            \
                S[(size_t)(m + 2) * sj + j] = llmkv__hsum256(a2) + t2;                                            \
                S[(size_t)(m + 3) * sj + j] = llmkv__hsum256(a3) + t3;                                            \
            }                                                                                                     \
        }                                                                                                         \
        for (; m < M; ++m) {                                                                                      \
            const float* q0 = q + (size_t)m * D;                                                                  \
            for (j = 0; n * 8 == D && j + 4 <= J; j += 4) { /* four keys, reduced together */                     \
                __m256 x0 = _mm256_setzero_ps(), x1 = x0, x2 = x0, x3 = x0;                                       \
                for (c = 0; c < n; ++c) {                                                                         \
                    __m256 qv = _mm256_loadu_ps(q0 + c * 8);                                                      \
                    x0 = _mm256_fmadd_ps(qv, LD(k[j] + koff, ks[j] + ksoff, c * 8), x0);                          \
                    x1 = _mm256_fmadd_ps(qv, LD(k[j + 1] + koff, ks[j + 1] + ksoff, c * 8), x1);                  \
                    x2 = _mm256_fmadd_ps(qv, LD(k[j + 2] + koff, ks[j + 2] + ksoff, c * 8), x2);                  \
                    x3 = _mm256_fmadd_ps(qv, LD(k[j + 3] + koff, ks[j + 3] + ksoff, c * 8), x3);                  \
                }                                                                                                 \
                _mm_storeu_ps(S + (size_t)m * sj + j, llmkv__hsum256x4(x0, x1, x2, x3));                          \
            }                                                                                                     \
            for (; j < J; ++j) {                                                                                  \
                const unsigned char *kr = k[j] + koff, *kc = ks[j] + ksoff;                                                             \
                __m256 a0 = _mm256_setzero_ps();                                                                  \
                float t0 = 0;                                                                                     \
                for (c = 0; c < n; ++c)                                                                           \
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q0 + c * 8), LD(kr, kc, c * 8), a0);           \
                for (d = n * 8; d < D; ++d) t0 += q0[d] * LDS(kr, kc, d);                                             \
                S[(size_t)m * sj + j] = llmkv__hsum256(a0) + t0;                                                  \
            }                                                                                                     \
        }                                                                                                         \
    }
#define LLMKV__AVX2_PV(SUFFIX, LD, LDS, TY) \
    static LLMKV__T256 void llmkv__pv_avx2_##SUFFIX(const float* P, uint32_t sj, uint32_t M, uint32_t D,        \
                                                    const unsigned char* const* v, size_t voff, const unsigned char* const* vs, size_t vsoff, uint32_t J, float* acc, const unsigned char* const* pf, uint32_t npf) { \
        uint32_t n = D / 8, m = 0, j, c, d;                                                                       \
        llmkv__prefetch_rows(pf, npf, llmkv__vec_data_bytes(TY, D), voff);                                                              \
        for (; m + 4 <= M; m += 4) {                                                                              \
            const float* p0 = P + (size_t)m * sj;                                                                 \
            float* o0 = acc + (size_t)m * D;                                                                      \
            for (c = 0; c + 2 <= n; c += 2) { /* two column blocks: each weight broadcast once for both */       \
                float* o = o0 + c * 8;                                                                            \
                __m256 a0 = _mm256_loadu_ps(o), b0 = _mm256_loadu_ps(o + 8);                                      \
                __m256 a1 = _mm256_loadu_ps(o + D), b1 = _mm256_loadu_ps(o + D + 8);                              \
                __m256 a2 = _mm256_loadu_ps(o + 2 * D), b2 = _mm256_loadu_ps(o + 2 * D + 8);                      \
                __m256 a3 = _mm256_loadu_ps(o + 3 * D), b3 = _mm256_loadu_ps(o + 3 * D + 8);                      \
                for (j = 0; j < J; ++j) {                                                                         \
                    __m256 v0 = LD(v[j] + voff, vs[j] + vsoff, c * 8), v1 = LD(v[j] + voff, vs[j] + vsoff, c * 8 + 8); \
                    __m256 p = _mm256_set1_ps(p0[j]);                                                             \
                    a0 = _mm256_fmadd_ps(p, v0, a0);                                                              \
                    b0 = _mm256_fmadd_ps(p, v1, b0);                                                              \
                    p = _mm256_set1_ps(p0[sj + j]);                                                               \
                    a1 = _mm256_fmadd_ps(p, v0, a1);                                                              \
                    b1 = _mm256_fmadd_ps(p, v1, b1);                                                              \
                    p = _mm256_set1_ps(p0[2 * sj + j]);                                                           \
                    a2 = _mm256_fmadd_ps(p, v0, a2);                                                              \
                    b2 = _mm256_fmadd_ps(p, v1, b2);                                                              \
                    p = _mm256_set1_ps(p0[3 * sj + j]);                                                           \
                    a3 = _mm256_fmadd_ps(p, v0, a3);                                                              \
                    b3 = _mm256_fmadd_ps(p, v1, b3);                                                              \
                }                                                                                                 \
                _mm256_storeu_ps(o, a0);                                                                          \
                _mm256_storeu_ps(o + 8, b0);                                                                      \
                _mm256_storeu_ps(o + D, a1);                                                                      \
                _mm256_storeu_ps(o + D + 8, b1);                                                                  \
                _mm256_storeu_ps(o + 2 * D, a2);                                                                  \
                _mm256_storeu_ps(o + 2 * D + 8, b2);                                                              \
                _mm256_storeu_ps(o + 3 * D, a3);                                                                  \
                _mm256_storeu_ps(o + 3 * D + 8, b3);                                                              \
            }                                                                                                     \
            for (; c < n; ++c) {                                                                                  \
                __m256 a0 = _mm256_loadu_ps(o0 + c * 8), a1 = _mm256_loadu_ps(o0 + D + c * 8);                   \
                __m256 a2 = _mm256_loadu_ps(o0 + 2 * D + c * 8), a3 = _mm256_loadu_ps(o0 + 3 * D + c * 8);       \
                for (j = 0; j < J; ++j) {                                                                         \
                    __m256 vv = LD(v[j] + voff, vs[j] + vsoff, c * 8);                                              \
                    a0 = _mm256_fmadd_ps(_mm256_set1_ps(p0[j]), vv, a0);                                          \
                    a1 = _mm256_fmadd_ps(_mm256_set1_ps(p0[sj + j]), vv, a1);                                     \
                    a2 = _mm256_fmadd_ps(_mm256_set1_ps(p0[2 * sj + j]), vv, a2);                                 \
                    a3 = _mm256_fmadd_ps(_mm256_set1_ps(p0[3 * sj + j]), vv, a3);                                 \
                }                                                                                                 \
                _mm256_storeu_ps(o0 + c * 8, a0);                                                                 \
                _mm256_storeu_ps(o0 + D + c * 8, a1);                                                             \
                _mm256_storeu_ps(o0 + 2 * D + c * 8, a2);                                                         \
                _mm256_storeu_ps(o0 + 3 * D + c * 8, a3);                                                         \
            }                                                                                                     \
        }                                                                                                         \
        for (; m < M; ++m) {                                                                                      \
            const float* p0 = P + (size_t)m * sj;                                                                 \
            float* o0 = acc + (size_t)m * D;                                                                      \
            for (c = 0; c + 4 <= n; c += 4) { /* four column blocks per weight broadcast */                      \
                float* o = o0 + c * 8;                                                                            \
                __m256 a0 = _mm256_loadu_ps(o), a1 = _mm256_loadu_ps(o + 8);                                      \
                __m256 a2 = _mm256_loadu_ps(o + 16), a3 = _mm256_loadu_ps(o + 24);                                \
                for (j = 0; j < J; ++j) {                                                                         \
                    __m256 p = _mm256_set1_ps(p0[j]);                                                             \
                    const unsigned char *vr = v[j] + voff, *vc = vs[j] + vsoff;                                   \
                    a0 = _mm256_fmadd_ps(p, LD(vr, vc, c * 8), a0);                                               \
                    a1 = _mm256_fmadd_ps(p, LD(vr, vc, c * 8 + 8), a1);                                           \
                    a2 = _mm256_fmadd_ps(p, LD(vr, vc, c * 8 + 16), a2);                                          \
                    a3 = _mm256_fmadd_ps(p, LD(vr, vc, c * 8 + 24), a3);                                          \
                }                                                                                                 \
                _mm256_storeu_ps(o, a0);                                                                          \
                _mm256_storeu_ps(o + 8, a1);                                                                      \
                _mm256_storeu_ps(o + 16, a2);                                                                     \
                _mm256_storeu_ps(o + 24, a3);                                                                     \
            }                                                                                                     \
            for (; c < n; ++c) {                                                                                  \
                __m256 a0 = _mm256_loadu_ps(o0 + c * 8);                                                          \
                for (j = 0; j < J; ++j)                                                                           \
                    a0 = _mm256_fmadd_ps(_mm256_set1_ps(p0[j]), LD(v[j] + voff, vs[j] + vsoff, c * 8), a0);         \
                _mm256_storeu_ps(o0 + c * 8, a0);                                                                 \
            }                                                                                                     \
        }                                                                                                         \
        if (n * 8 < D)                                                                                            \
            for (j = 0; j < J; ++j)                                                                               \
                for (d = n * 8; d < D; ++d) {                                                                     \
                    float x = LDS(v[j] + voff, vs[j] + vsoff, d);                                                                 \
                    for (m = 0; m < M; ++m) acc[(size_t)m * D + d] += P[(size_t)m * sj + j] * x;                  \
                }                                                                                                 \
    }
#define LLMKV__AVX2_KERNELS(SUFFIX, LD, LDS, TY) LLMKV__AVX2_QK(SUFFIX, LD, LDS, TY) LLMKV__AVX2_PV(SUFFIX, LD, LDS, TY)
LLMKV__AVX2_KERNELS(f32, llmkv__y_f32, llmkv__ld_f32, LLMKV_DTYPE_F32)
LLMKV__AVX2_KERNELS(f16, llmkv__y_f16, llmkv__ld_f16, LLMKV_DTYPE_F16)
LLMKV__AVX2_KERNELS(bf16, llmkv__y_bf16, llmkv__ld_bf16, LLMKV_DTYPE_BF16)
LLMKV__AVX2_KERNELS(q8, llmkv__y_q8, llmkv__ld_q8, LLMKV_DTYPE_Q8)
LLMKV__AVX2_KERNELS(q4, llmkv__y_q4, llmkv__ld_q4, LLMKV_DTYPE_Q4)
LLMKV__AVX2_KERNELS(fp8, llmkv__y_fp8, llmkv__ld_fp8, LLMKV_DTYPE_FP8)
LLMKV__AVX2_QK(q4c, llmkv__y_code4, llmkv__ld_code4, LLMKV_DTYPE_Q4C)

static LLMKV__T256 __m256 llmkv__exp256(__m256 x) {
    __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    __m256 n, r, p, two_n;
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* x in [-87, 88] keeps n in [-126, 127]: 2^n is the exponent field alone. */
    two_n = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
    p = _mm256_mul_ps(p, two_n);
    return _mm256_andnot_ps(tiny, p);
}

static LLMKV__T256 float llmkv__max_avx2(const float* x, uint32_t n) {
    __m256 m = _mm256_set1_ps(-INFINITY);
    uint32_t i;
    float t[8], r;
    for (i = 0; i + 8 <= n; i += 8) m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    _mm256_storeu_ps(t, m);
    r = t[0];
    for (i = 1; i < 8; ++i) r = t[i] > r ? t[i] : r;
    for (i = n / 8 * 8; i < n; ++i) r = x[i] > r ? x[i] : r;
    return r;
}

static LLMKV__T256 float llmkv__ex_avx2(float* x, uint32_t n, float sub) {
    __m256 s = _mm256_setzero_ps(), b = _mm256_set1_ps(sub);
    uint32_t i;
    float tail = 0.0f;
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 e = llmkv__exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), b));
        _mm256_storeu_ps(x + i, e);
        s = _mm256_add_ps(s, e);
    }
    for (; i < n; ++i) tail += (x[i] = expf(x[i] - sub));
    return llmkv__hsum256(s) + tail;
}
/* --- quantization on put (AVX-512, AVX2) ------------------------------------ */
/* Each step encodes 16 (8) elements of one group, with the operations of
   llmkv__q_arg / llmkv__e4m3 in the same order (vcvtps2dq rounds to
   nearest even like rintf), so the bytes equal the scalar encoder's. */

static LLMKV__T512 __m512 llmkv__z_q_arg(__m512 x, __m512 m, __m512 inv, float lo, float hi) {
    __m512 y;
    x = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), x);
    y = _mm512_mul_ps(_mm512_sub_ps(x, m), inv);
    y = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, y, _CMP_ORD_Q), y);
    return _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(lo)), _mm512_set1_ps(hi));
}

static LLMKV__T512 __m512i llmkv__z_e4m3_code(__m512 y) {
    __m512i u = _mm512_castps_si512(y), sign = _mm512_and_si512(_mm512_srli_epi32(u, 24), _mm512_set1_epi32(0x80));
    __m512i a = _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff));
    __m512i sub = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_castsi512_ps(a), _mm512_set1_ps(512.0f)));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(a, _mm512_set1_epi32(0x7ffff)),
                                 _mm512_and_si512(_mm512_srli_epi32(a, 20), _mm512_set1_epi32(1)));
    __m512i nrm = _mm512_sub_epi32(_mm512_srli_epi32(r, 20), _mm512_set1_epi32(120 << 3));
    __m512i c = _mm512_mask_blend_epi32(_mm512_cmplt_epu32_mask(a, _mm512_set1_epi32(0x3c800000)), nrm, sub);
    return _mm512_or_si512(c, sign);
}

static LLMKV__T512 uint32_t llmkv__encode_avx512(llmkv_dtype t, const float* x, uint32_t n, unsigned char* data,
                                                 const float* inv, const float* mins) {
    uint32_t i;
    for (i = 0; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i);
        uint32_t g = i / LLMKV__QGROUP;
        if (t == LLMKV_DTYPE_Q8) {
            __m512i c = _mm512_cvtps_epi32(llmkv__z_q_arg(v, _mm512_setzero_ps(), _mm512_set1_ps(inv[g]), -127.0f, 127.0f));
            _mm_storeu_si128((__m128i*)(void*)(data + i), _mm512_cvtepi32_epi8(c));
        } else if (t == LLMKV_DTYPE_Q4 || t == LLMKV_DTYPE_Q4C) { /* Q4C: a minimum and scale per element */
            __m512 m = t == LLMKV_DTYPE_Q4C ? _mm512_loadu_ps(mins + i) : _mm512_set1_ps(mins[g]);
            __m512 r = t == LLMKV_DTYPE_Q4C ? _mm512_loadu_ps(inv + i) : _mm512_set1_ps(inv[g]);
            __m512i c = _mm512_cvtps_epi32(llmkv__z_q_arg(v, m, r, 0.0f, 15.0f));
            __m128i b = _mm_maddubs_epi16(_mm512_cvtepi32_epi8(c), _mm_set1_epi16(0x1001));
            _mm_storel_epi64((__m128i*)(void*)(data + i / 2), _mm_packus_epi16(b, b));
        } else {
            __m512i c = llmkv__z_e4m3_code(llmkv__z_q_arg(v, _mm512_setzero_ps(), _mm512_set1_ps(inv[0]), -448.0f, 448.0f));
            _mm_storeu_si128((__m128i*)(void*)(data + i), _mm512_cvtepi32_epi8(c));
        }
    }
    return i;
}

static LLMKV__T512 uint32_t llmkv__group_stats_avx512(const float* x, uint32_t n, float* am, float* lo, float* hi) {
    const __m512i ex = _mm512_set1_epi32(0x7f800000), mag = _mm512_set1_epi32(0x7fffffff);
    const __m512 pinf = _mm512_set1_ps(INFINITY), ninf = _mm512_set1_ps(-INFINITY);
    uint32_t g;
    for (g = 0; (g + 1) * LLMKV__QGROUP <= n; ++g) {
        __m512 a = _mm512_loadu_ps(x + g * LLMKV__QGROUP), b = _mm512_loadu_ps(x + g * LLMKV__QGROUP + 16);
        __mmask16 fa = _mm512_cmpneq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(a), ex), ex);
        __mmask16 fb = _mm512_cmpneq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(b), ex), ex);
        __m512 aa = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(a), mag));
        __m512 ab = _mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(b), mag));
        am[g] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_maskz_mov_ps(fa, aa), _mm512_maskz_mov_ps(fb, ab)));
        lo[g] = _mm512_reduce_min_ps(_mm512_min_ps(_mm512_mask_blend_ps(fa, pinf, a), _mm512_mask_blend_ps(fb, pinf, b)));
        hi[g] = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_mask_blend_ps(fa, ninf, a), _mm512_mask_blend_ps(fb, ninf, b)));
    }
    return g;
}

static LLMKV__T512 uint32_t llmkv__range_update_avx512(const float* x, uint32_t n, float* lo, float* hi) {
    const __m512i ex = _mm512_set1_epi32(0x7f800000);
    uint32_t i;
    for (i = 0; i + 16 <= n; i += 16) {
        __m512 v = _mm512_loadu_ps(x + i), l = _mm512_loadu_ps(lo + i), h = _mm512_loadu_ps(hi + i);
        __mmask16 f = _mm512_cmpneq_epi32_mask(_mm512_and_si512(_mm512_castps_si512(v), ex), ex);
        _mm512_storeu_ps(lo + i, _mm512_mask_blend_ps(f & _mm512_cmp_ps_mask(v, l, _CMP_LT_OQ), l, v));
        _mm512_storeu_ps(hi + i, _mm512_mask_blend_ps(f & _mm512_cmp_ps_mask(v, h, _CMP_GT_OQ), h, v));
    }
    return i;
}

/* The largest and the smallest lane of v. */
static LLMKV__T256 float llmkv__y_max(__m256 v) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_max_ss(a, _mm_shuffle_ps(a, a, 1)));
}
static LLMKV__T256 float llmkv__y_min(__m256 v) {
    __m128 a = _mm_min_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_min_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_min_ss(a, _mm_shuffle_ps(a, a, 1)));
}

static LLMKV__T256 uint32_t llmkv__group_stats_avx2(const float* x, uint32_t n, float* am, float* lo, float* hi) {
    const __m256i ex = _mm256_set1_epi32(0x7f800000);
    const __m256 mag = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 pinf = _mm256_set1_ps(INFINITY), ninf = _mm256_set1_ps(-INFINITY);
    uint32_t g, k;
    for (g = 0; (g + 1) * LLMKV__QGROUP <= n; ++g) {
        __m256 va = _mm256_setzero_ps(), vl = pinf, vh = ninf;
        for (k = 0; k < LLMKV__QGROUP; k += 8) {
            __m256 v = _mm256_loadu_ps(x + g * LLMKV__QGROUP + k);
            __m256 bad = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), ex), ex));
            va = _mm256_max_ps(va, _mm256_andnot_ps(bad, _mm256_and_ps(v, mag)));
            vl = _mm256_min_ps(vl, _mm256_blendv_ps(v, pinf, bad));
            vh = _mm256_max_ps(vh, _mm256_blendv_ps(v, ninf, bad));
        }
        am[g] = llmkv__y_max(va);
        lo[g] = llmkv__y_min(vl);
        hi[g] = llmkv__y_max(vh);
    }
    return g;
}

static LLMKV__T256 uint32_t llmkv__range_update_avx2(const float* x, uint32_t n, float* lo, float* hi) {
    const __m256i ex = _mm256_set1_epi32(0x7f800000);
    uint32_t i;
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i), l = _mm256_loadu_ps(lo + i), h = _mm256_loadu_ps(hi + i);
        __m256 ok = _mm256_castsi256_ps(_mm256_xor_si256(
            _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), ex), ex), _mm256_set1_epi32(-1)));
        _mm256_storeu_ps(lo + i, _mm256_blendv_ps(l, v, _mm256_and_ps(ok, _mm256_cmp_ps(v, l, _CMP_LT_OQ))));
        _mm256_storeu_ps(hi + i, _mm256_blendv_ps(h, v, _mm256_and_ps(ok, _mm256_cmp_ps(v, h, _CMP_GT_OQ))));
    }
    return i;
}

static LLMKV__T256 __m256 llmkv__y_q_arg(__m256 x, __m256 m, __m256 inv, float lo, float hi) {
    __m256 y;
    x = _mm256_and_ps(x, _mm256_cmp_ps(x, x, _CMP_ORD_Q));
    y = _mm256_mul_ps(_mm256_sub_ps(x, m), inv);
    y = _mm256_and_ps(y, _mm256_cmp_ps(y, y, _CMP_ORD_Q));
    return _mm256_min_ps(_mm256_max_ps(y, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
}

/* The low bytes of eight 32-bit lanes, in order, in the low 8 bytes. */
static LLMKV__T256 __m128i llmkv__y_low_bytes(__m256i c) {
    const __m256i pick = _mm256_setr_epi8(0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1,
                                          0, 4, 8, 12, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1);
    c = _mm256_shuffle_epi8(c, pick);
    return _mm_unpacklo_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
}

static LLMKV__T256 uint32_t llmkv__encode_avx2(llmkv_dtype t, const float* x, uint32_t n, unsigned char* data,
                                               const float* inv, const float* mins) {
    uint32_t i;
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(x + i);
        uint32_t g = i / LLMKV__QGROUP;
        if (t == LLMKV_DTYPE_Q8) {
            __m256i c = _mm256_cvtps_epi32(llmkv__y_q_arg(v, _mm256_setzero_ps(), _mm256_set1_ps(inv[g]), -127.0f, 127.0f));
            _mm_storel_epi64((__m128i*)(void*)(data + i), llmkv__y_low_bytes(c));
        } else if (t == LLMKV_DTYPE_Q4 || t == LLMKV_DTYPE_Q4C) { /* Q4C: a minimum and scale per element */
            __m256 m = t == LLMKV_DTYPE_Q4C ? _mm256_loadu_ps(mins + i) : _mm256_set1_ps(mins[g]);
            __m256 r = t == LLMKV_DTYPE_Q4C ? _mm256_loadu_ps(inv + i) : _mm256_set1_ps(inv[g]);
            __m256i c = _mm256_cvtps_epi32(llmkv__y_q_arg(v, m, r, 0.0f, 15.0f));
            __m128i b = _mm_maddubs_epi16(llmkv__y_low_bytes(c), _mm_set1_epi16(0x1001));
            int32_t w = _mm_cvtsi128_si32(_mm_packus_epi16(b, b));
            memcpy(data + i / 2, &w, 4);
        } else {
            __m256 y = llmkv__y_q_arg(v, _mm256_setzero_ps(), _mm256_set1_ps(inv[0]), -448.0f, 448.0f);
            __m256i u = _mm256_castps_si256(y);
            __m256i sign = _mm256_and_si256(_mm256_srli_epi32(u, 24), _mm256_set1_epi32(0x80));
            __m256i a = _mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff));
            __m256i sub = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_castsi256_ps(a), _mm256_set1_ps(512.0f)));
            __m256i r = _mm256_add_epi32(_mm256_add_epi32(a, _mm256_set1_epi32(0x7ffff)),
                                         _mm256_and_si256(_mm256_srli_epi32(a, 20), _mm256_set1_epi32(1)));
            __m256i nrm = _mm256_sub_epi32(_mm256_srli_epi32(r, 20), _mm256_set1_epi32(120 << 3));
            /* a < 2^-6 as signed compare: both are non-negative. */
            __m256i c = _mm256_blendv_epi8(nrm, sub, _mm256_cmpgt_epi32(_mm256_set1_epi32(0x3c800000), a));
            _mm_storel_epi64((__m128i*)(void*)(data + i), llmkv__y_low_bytes(_mm256_or_si256(c, sign)));
        }
    }
    return i;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif
#endif /* LLMKV__X86 */

static uint32_t llmkv__convert_simd(void* dst, llmkv_dtype dt, const void* src, llmkv_dtype st, uint32_t n) {
#ifdef LLMKV__X86
    return llmkv__convert_avx2(dst, dt, src, st, n);
#else
    (void)dst; (void)dt; (void)src; (void)st; (void)n;
    return 0;
#endif
}

#ifdef LLMKV__NEON
/* --- NEON (AArch64) -------------------------------------------------------- */
/* 4 elements per vector; a row's tail past the last full vector is scalar. */

/* Elements [c, c + 4) of a stored vector p with scales sc. */
static float32x4_t llmkv__n_f32(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return vld1q_f32((const float*)(const void*)(p + 4 * (size_t)c));
}
static float32x4_t llmkv__n_f16(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t*)(const void*)(p + 2 * (size_t)c))));
}
static float32x4_t llmkv__n_bf16(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    (void)sc;
    return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16((const uint16_t*)(const void*)(p + 2 * (size_t)c)), 16));
}
static float llmkv__n_f16_scalar(const unsigned char* h) {
    return vgetq_lane_f32(vcvt_f32_f16(vreinterpret_f16_u16(vdup_n_u16(llmkv__ld_u16(h)))), 0);
}
/* Four bytes (or nibbles, `bits` 4) of w, zero-extended to 32-bit lanes. */
static uint32x4_t llmkv__n_fields(uint32_t w, int bits) {
    const int32_t sh8[4] = {0, -8, -16, -24}, sh4[4] = {0, -4, -8, -12};
    return vandq_u32(vshlq_u32(vdupq_n_u32(w), vld1q_s32(bits == 8 ? sh8 : sh4)), vdupq_n_u32(bits == 8 ? 0xffu : 0xfu));
}
static float32x4_t llmkv__n_q8(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    int32_t w;
    int32x4_t x;
    memcpy(&w, p + c, 4);
    x = vmovl_s16(vget_low_s16(vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(w)))));
    return vmulq_n_f32(vcvtq_f32_s32(x), llmkv__n_f16_scalar(sc + 2 * (c / LLMKV__QGROUP)));
}
static float32x4_t llmkv__n_code4(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    uint16_t w;
    (void)sc;
    memcpy(&w, p + c / 2, 2);
    return vcvtq_f32_u32(llmkv__n_fields(w, 4));
}
static float32x4_t llmkv__n_q4(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    const unsigned char* g = sc + 4 * (c / LLMKV__QGROUP);
    return vfmaq_n_f32(vdupq_n_f32(llmkv__n_f16_scalar(g + 2)), llmkv__n_code4(p, sc, c), llmkv__n_f16_scalar(g));
}
/* E4M3 through F16 bit patterns, as llmkv__z_e4m3_f16 explains. */
static float32x4_t llmkv__n_fp8(const unsigned char* p, const unsigned char* sc, uint32_t c) {
    uint32_t w;
    uint16x4_t x, h;
    memcpy(&w, p + c, 4);
    x = vget_low_u16(vmovl_u8(vreinterpret_u8_u32(vdup_n_u32(w))));
    h = vorr_u16(vand_u16(vshl_n_u16(x, 8), vdup_n_u16(0x8000)), vshr_n_u16(vshl_n_u16(x, 9), 2));
    return vmulq_n_f32(vcvt_f32_f16(vreinterpret_f16_u16(h)), 256.0f * llmkv__ld_f32s(sc));
}

#define LLMKV__NEON_QK(SUFFIX, LD, LDS, TY)                                                                  \
    static void llmkv__qk_neon_##SUFFIX(const float* q, uint32_t M, uint32_t D, const unsigned char* const* k, size_t koff, const unsigned char* const* ks, size_t ksoff,           \
                                        uint32_t J, float* S, uint32_t sj, const unsigned char* const* pf, uint32_t npf) {                          \
        uint32_t n = D / 4, m = 0, j, c, d;                                                                       \
        llmkv__prefetch_rows(pf, npf, llmkv__vec_data_bytes(TY, D), koff);                                                              \
        for (; m + 4 <= M; m += 4) {                                                                              \
            const float* q0 = q + (size_t)m * D;                                                                  \
            for (j = 0; j < J; ++j) {                                                                             \
                const unsigned char *kr = k[j] + koff, *kc = ks[j] + ksoff;                                                             \
                float32x4_t a0 = vdupq_n_f32(0), a1 = a0, a2 = a0, a3 = a0;                                       \
                float t0 = 0, t1 = 0, t2 = 0, t3 = 0;                                                             \
                for (c = 0; c < n; ++c) {                                                                         \
                    float32x4_t kv = LD(kr, kc, c * 4);                                                 \
                    a0 = vfmaq_f32(a0, vld1q_f32(q0 + c * 4), kv);                                                \
                    a1 = vfmaq_f32(a1, vld1q_f32(q0 + D + c * 4), kv);                                            \
                    a2 = vfmaq_f32(a2, vld1q_f32(q0 + 2 * D + c * 4), kv);                                        \
                    a3 = vfmaq_f32(a3, vld1q_f32(q0 + 3 * D + c * 4), kv);                                        \
                }                                                                                                 \
                for (d = n * 4; d < D; ++d) {                                                                     \
                    float x = LDS(kr, kc, d);                                                                         \
                    t0 += q0[d] * x; t1 += q0[D + d] * x; t2 += q0[2 * D + d] * x; t3 += q0[3 * D + d] * x;       \
                }                                                                                                 \
                S[(size_t)m * sj + j] = vaddvq_f32(a0) + t0;                                                      \
                S[(size_t)(m + 1) * sj + j] = vaddvq_f32(a1) + t1;                                                \
                S[(size_t)(m + 2) * sj + j] = vaddvq_f32(a2) + t2;                                                \
                S[(size_t)(m + 3) * sj + j] = vaddvq_f32(a3) + t3;                                                \
            }                                                                                                     \
        }                                                                                                         \
        for (; m < M; ++m) {                                                                                      \
            const float* q0 = q + (size_t)m * D;                                                                  \
            for (j = 0; j < J; ++j) {                                                                             \
                const unsigned char *kr = k[j] + koff, *kc = ks[j] + ksoff;                                                             \
                float32x4_t a0 = vdupq_n_f32(0);                                                                  \
                float t0 = 0;                                                                                     \
                for (c = 0; c < n; ++c) a0 = vfmaq_f32(a0, vld1q_f32(q0 + c * 4), LD(kr, kc, c * 4));   \
                for (d = n * 4; d < D; ++d) t0 += q0[d] * LDS(kr, kc, d);                                             \
                S[(size_t)m * sj + j] = vaddvq_f32(a0) + t0;                                                      \
            }                                                                                                     \
        }                                                                                                         \
    }
#define LLMKV__NEON_PV(SUFFIX, LD, LDS, TY) \
    static void llmkv__pv_neon_##SUFFIX(const float* P, uint32_t sj, uint32_t M, uint32_t D,                      \
                                        const unsigned char* const* v, size_t voff, const unsigned char* const* vs, size_t vsoff, uint32_t J, float* acc, const unsigned char* const* pf, uint32_t npf) {             \
        uint32_t n = D / 4, m = 0, j, c, d;                                                                       \
        llmkv__prefetch_rows(pf, npf, llmkv__vec_data_bytes(TY, D), voff);                                                              \
        for (; m + 4 <= M; m += 4) {                                                                              \
            const float* p0 = P + (size_t)m * sj;                                                                 \
            float* o0 = acc + (size_t)m * D;                                                                      \
            for (c = 0; c < n; ++c) {                                                                             \
                float32x4_t a0 = vld1q_f32(o0 + c * 4), a1 = vld1q_f32(o0 + D + c * 4);                           \
                float32x4_t a2 = vld1q_f32(o0 + 2 * D + c * 4), a3 = vld1q_f32(o0 + 3 * D + c * 4);               \
                for (j = 0; j < J; ++j) {                                                                         \
                    float32x4_t vv = LD(v[j] + voff, vs[j] + vsoff, c * 4);                                         \
                    a0 = vfmaq_n_f32(a0, vv, p0[j]);                                                              \
                    a1 = vfmaq_n_f32(a1, vv, p0[sj + j]);                                                         \
                    a2 = vfmaq_n_f32(a2, vv, p0[2 * sj + j]);                                                     \
                    a3 = vfmaq_n_f32(a3, vv, p0[3 * sj + j]);                                                     \
                }                                                                                                 \
                vst1q_f32(o0 + c * 4, a0);                                                                        \
                vst1q_f32(o0 + D + c * 4, a1);                                                                    \
                vst1q_f32(o0 + 2 * D + c * 4, a2);                                                                \
                vst1q_f32(o0 + 3 * D + c * 4, a3);                                                                \
            }                                                                                                     \
        }                                                                                                         \
        for (; m < M; ++m) {                                                                                      \
            const float* p0 = P + (size_t)m * sj;                                                                 \
            float* o0 = acc + (size_t)m * D;                                                                      \
            for (c = 0; c < n; ++c) {                                                                             \
                float32x4_t a0 = vld1q_f32(o0 + c * 4);                                                           \
                for (j = 0; j < J; ++j) a0 = vfmaq_n_f32(a0, LD(v[j] + voff, vs[j] + vsoff, c * 4), p0[j]);         \
                vst1q_f32(o0 + c * 4, a0);                                                                        \
            }                                                                                                     \
        }                                                                                                         \
        if (n * 4 < D)                                                                                            \
            for (j = 0; j < J; ++j)                                                                               \
                for (d = n * 4; d < D; ++d) {                                                                     \
                    float x = LDS(v[j] + voff, vs[j] + vsoff, d);                                                                 \
                    for (m = 0; m < M; ++m) acc[(size_t)m * D + d] += P[(size_t)m * sj + j] * x;                  \
                }                                                                                                 \
    }
#define LLMKV__NEON_KERNELS(SUFFIX, LD, LDS, TY) LLMKV__NEON_QK(SUFFIX, LD, LDS, TY) LLMKV__NEON_PV(SUFFIX, LD, LDS, TY)
LLMKV__NEON_KERNELS(f32, llmkv__n_f32, llmkv__ld_f32, LLMKV_DTYPE_F32)
LLMKV__NEON_KERNELS(f16, llmkv__n_f16, llmkv__ld_f16, LLMKV_DTYPE_F16)
LLMKV__NEON_KERNELS(bf16, llmkv__n_bf16, llmkv__ld_bf16, LLMKV_DTYPE_BF16)
LLMKV__NEON_KERNELS(q8, llmkv__n_q8, llmkv__ld_q8, LLMKV_DTYPE_Q8)
LLMKV__NEON_KERNELS(q4, llmkv__n_q4, llmkv__ld_q4, LLMKV_DTYPE_Q4)
LLMKV__NEON_KERNELS(fp8, llmkv__n_fp8, llmkv__ld_fp8, LLMKV_DTYPE_FP8)
LLMKV__NEON_QK(q4c, llmkv__n_code4, llmkv__ld_code4, LLMKV_DTYPE_Q4C)

static float32x4_t llmkv__expq(float32x4_t x) {
    uint32x4_t tiny = vcltq_f32(x, vdupq_n_f32(-87.0f));
    float32x4_t n, r, p;
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.0f)), vdupq_n_f32(88.0f));
    n = vrndnq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504f)));
    r = vfmsq_f32(x, n, vdupq_n_f32(0.693145752f));
    r = vfmsq_f32(r, n, vdupq_n_f32(1.42860677e-6f));
    p = vdupq_n_f32(1.0f / 720.0f);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 120.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 24.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f / 6.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(0.5f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.0f), p, r);
    p = vmulq_f32(p, vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23)));
    return vreinterpretq_f32_u32(vbicq_u32(vreinterpretq_u32_f32(p), tiny));
}

static float llmkv__max_neon(const float* x, uint32_t n) {
    float32x4_t m = vdupq_n_f32(-INFINITY);
    uint32_t i;
    float r;
    for (i = 0; i + 4 <= n; i += 4) m = vmaxq_f32(m, vld1q_f32(x + i));
    r = vmaxvq_f32(m);
    for (; i < n; ++i) r = x[i] > r ? x[i] : r;
    return r;
}

static float llmkv__ex_neon(float* x, uint32_t n, float sub) {
    float32x4_t s = vdupq_n_f32(0), b = vdupq_n_f32(sub);
    uint32_t i;
    float tail = 0.0f;
    for (i = 0; i + 4 <= n; i += 4) {
        float32x4_t e = llmkv__expq(vsubq_f32(vld1q_f32(x + i), b));
        vst1q_f32(x + i, e);
        s = vaddq_f32(s, e);
    }
    for (; i < n; ++i) tail += (x[i] = expf(x[i] - sub));
    return vaddvq_f32(s) + tail;
}
/* Quantization on put: as llmkv__encode_avx512, four elements a step
   (vcvtnq rounds to nearest even). */
static float32x4_t llmkv__n_q_arg(float32x4_t x, float32x4_t m, float32x4_t inv, float lo, float hi) {
    float32x4_t y;
    x = vbslq_f32(vceqq_f32(x, x), x, vdupq_n_f32(0.0f));
    y = vmulq_f32(vsubq_f32(x, m), inv);
    y = vbslq_f32(vceqq_f32(y, y), y, vdupq_n_f32(0.0f));
    return vminq_f32(vmaxq_f32(y, vdupq_n_f32(lo)), vdupq_n_f32(hi));
}

static uint32_t llmkv__group_stats_neon(const float* x, uint32_t n, float* am, float* lo, float* hi) {
    const uint32x4_t ex = vdupq_n_u32(0x7f800000u);
    const float32x4_t pinf = vdupq_n_f32(INFINITY), ninf = vdupq_n_f32(-INFINITY), zero = vdupq_n_f32(0.0f);
    uint32_t g, k;
    for (g = 0; (g + 1) * LLMKV__QGROUP <= n; ++g) {
        float32x4_t va = zero, vl = pinf, vh = ninf;
        for (k = 0; k < LLMKV__QGROUP; k += 4) {
            float32x4_t v = vld1q_f32(x + g * LLMKV__QGROUP + k);
            uint32x4_t bad = vceqq_u32(vandq_u32(vreinterpretq_u32_f32(v), ex), ex);
            va = vmaxq_f32(va, vbslq_f32(bad, zero, vabsq_f32(v)));
            vl = vminq_f32(vl, vbslq_f32(bad, pinf, v));
            vh = vmaxq_f32(vh, vbslq_f32(bad, ninf, v));
        }
        am[g] = vmaxvq_f32(va);
        lo[g] = vminvq_f32(vl);
        hi[g] = vmaxvq_f32(vh);
    }
    return g;
}

static uint32_t llmkv__range_update_neon(const float* x, uint32_t n, float* lo, float* hi) {
    const uint32x4_t ex = vdupq_n_u32(0x7f800000u);
    uint32_t i;
    for (i = 0; i + 4 <= n; i += 4) {
        float32x4_t v = vld1q_f32(x + i), l = vld1q_f32(lo + i), h = vld1q_f32(hi + i);
        uint32x4_t ok = vmvnq_u32(vceqq_u32(vandq_u32(vreinterpretq_u32_f32(v), ex), ex));
        vst1q_f32(lo + i, vbslq_f32(vandq_u32(ok, vcltq_f32(v, l)), v, l));
        vst1q_f32(hi + i, vbslq_f32(vandq_u32(ok, vcgtq_f32(v, h)), v, h));
    }
    return i;
}

static uint32_t llmkv__encode_neon(llmkv_dtype t, const float* x, uint32_t n, unsigned char* data, const float* inv,
                                   const float* mins) {
    uint32_t i;
    for (i = 0; i + 4 <= n; i += 4) {
        float32x4_t v = vld1q_f32(x + i);
        uint32_t g = i / LLMKV__QGROUP;
        uint32x4_t c;
        if (t == LLMKV_DTYPE_Q8) {
            c = vreinterpretq_u32_s32(vcvtnq_s32_f32(llmkv__n_q_arg(v, vdupq_n_f32(0.0f), vdupq_n_f32(inv[g]), -127.0f, 127.0f)));
        } else if (t == LLMKV_DTYPE_Q4 || t == LLMKV_DTYPE_Q4C) { /* Q4C: a minimum and scale per element */
            float32x4_t m = t == LLMKV_DTYPE_Q4C ? vld1q_f32(mins + i) : vdupq_n_f32(mins[g]);
            float32x4_t r = t == LLMKV_DTYPE_Q4C ? vld1q_f32(inv + i) : vdupq_n_f32(inv[g]);
            c = vreinterpretq_u32_s32(vcvtnq_s32_f32(llmkv__n_q_arg(v, m, r, 0.0f, 15.0f)));
            data[i / 2] = (unsigned char)(vgetq_lane_u32(c, 0) | vgetq_lane_u32(c, 1) << 4);
            data[i / 2 + 1] = (unsigned char)(vgetq_lane_u32(c, 2) | vgetq_lane_u32(c, 3) << 4);
            continue;
        } else {
            float32x4_t y = llmkv__n_q_arg(v, vdupq_n_f32(0.0f), vdupq_n_f32(inv[0]), -448.0f, 448.0f);
            uint32x4_t u = vreinterpretq_u32_f32(y), a = vandq_u32(u, vdupq_n_u32(0x7fffffffu));
            uint32x4_t sub = vreinterpretq_u32_s32(vcvtnq_s32_f32(vmulq_n_f32(vreinterpretq_f32_u32(a), 512.0f)));
            uint32x4_t r = vaddq_u32(vaddq_u32(a, vdupq_n_u32(0x7ffffu)), vandq_u32(vshrq_n_u32(a, 20), vdupq_n_u32(1)));
            uint32x4_t nrm = vsubq_u32(vshrq_n_u32(r, 20), vdupq_n_u32(120u << 3));
            c = vbslq_u32(vcltq_u32(a, vdupq_n_u32(0x3c800000u)), sub, nrm);
            c = vorrq_u32(c, vandq_u32(vshrq_n_u32(u, 24), vdupq_n_u32(0x80)));
        }
        {
            uint8x8_t b = vmovn_u16(vcombine_u16(vmovn_u32(c), vdup_n_u16(0)));
            vst1_lane_u32((uint32_t*)(void*)(data + i), vreinterpret_u32_u8(b), 0);
        }
    }
    return i;
}
#endif /* LLMKV__NEON */

static uint32_t llmkv__encode_simd(llmkv_dtype t, const float* x, uint32_t n, unsigned char* data, const float* inv,
                                   const float* mins, uint32_t paths) {
#ifdef LLMKV__X86
    if (paths >> LLMKV_CPU_PATH_AVX512 & 1u) return llmkv__encode_avx512(t, x, n, data, inv, mins);
    if (paths >> LLMKV_CPU_PATH_AVX2 & 1u) return llmkv__encode_avx2(t, x, n, data, inv, mins);
#endif
#ifdef LLMKV__NEON
    if (paths >> LLMKV_CPU_PATH_NEON & 1u) return llmkv__encode_neon(t, x, n, data, inv, mins);
#endif
    (void)t; (void)x; (void)n; (void)data; (void)inv; (void)mins; (void)paths;
    return 0;
}

static uint32_t llmkv__group_stats_simd(const float* x, uint32_t n, float* am, float* lo, float* hi, uint32_t paths) {
#ifdef LLMKV__X86
    if (paths >> LLMKV_CPU_PATH_AVX512 & 1u) return llmkv__group_stats_avx512(x, n, am, lo, hi);
    if (paths >> LLMKV_CPU_PATH_AVX2 & 1u) return llmkv__group_stats_avx2(x, n, am, lo, hi);
#endif
#ifdef LLMKV__NEON
    if (paths >> LLMKV_CPU_PATH_NEON & 1u) return llmkv__group_stats_neon(x, n, am, lo, hi);
#endif
    (void)x; (void)n; (void)am; (void)lo; (void)hi; (void)paths;
    return 0;
}

static uint32_t llmkv__range_update_simd(const float* x, uint32_t n, float* lo, float* hi, uint32_t paths) {
#ifdef LLMKV__X86
    if (paths >> LLMKV_CPU_PATH_AVX512 & 1u) return llmkv__range_update_avx512(x, n, lo, hi);
    if (paths >> LLMKV_CPU_PATH_AVX2 & 1u) return llmkv__range_update_avx2(x, n, lo, hi);
#endif
#ifdef LLMKV__NEON
    if (paths >> LLMKV_CPU_PATH_NEON & 1u) return llmkv__range_update_neon(x, n, lo, hi);
#endif
    (void)x; (void)n; (void)lo; (void)hi; (void)paths;
    return 0;
}

/* The kernels of a path this machine supports (the caller checked). */
static void llmkv__kernels_for(llmkv_cpu_path path, llmkv__kernels* k) {
    memset(k, 0, sizeof *k);
    switch (path) {
#ifdef LLMKV__X86
    case LLMKV_CPU_PATH_AVX512_BF16:
        llmkv__kernels_for(LLMKV_CPU_PATH_AVX512_VNNI, k);
        k->qk[2] = llmkv__qk_avx512bf_bf16;
        k->pv[2] = llmkv__pv_avx512bf_bf16;
        k->q_bf16[2] = 1;
        return;
    case LLMKV_CPU_PATH_AVX512_VNNI:
        llmkv__kernels_for(LLMKV_CPU_PATH_AVX512, k);
        k->qk_int8[4] = llmkv__qk_vnni_q4;
        return;
    case LLMKV_CPU_PATH_AVX512:
        k->qk[0] = llmkv__qk_avx512_f32; k->qk[1] = llmkv__qk_avx512_f16; k->qk[2] = llmkv__qk_avx512_bf16;
        k->qk[3] = llmkv__qk_avx512_q8g; k->qk[4] = llmkv__qk_avx512_q4t; k->qk[5] = llmkv__qk_avx512_fp8;
        k->qk[6] = llmkv__qk_avx512_code4t;
        k->pv[0] = llmkv__pv_avx512_f32; k->pv[1] = llmkv__pv_avx512_f16; k->pv[2] = llmkv__pv_avx512_bf16;
        k->pv[3] = llmkv__pv_avx512_q8; k->pv[4] = llmkv__pv_avx512_q4t; k->pv[5] = llmkv__pv_avx512_fp8;
        k->ex = llmkv__ex_avx512;
        k->max = llmkv__max_avx512;
        k->tile_qk = llmkv__tile_qk_avx512;
        k->tile_pv = llmkv__tile_pv_avx512;
        k->tile_soft = llmkv__tile_soft_avx512;
        k->tile_in = llmkv__tile_in_avx512;
        k->tile_out = llmkv__tile_out_avx512;
        return;
    case LLMKV_CPU_PATH_AVX2:
        k->qk[0] = llmkv__qk_avx2_f32; k->qk[1] = llmkv__qk_avx2_f16; k->qk[2] = llmkv__qk_avx2_bf16;
        k->qk[3] = llmkv__qk_avx2_q8; k->qk[4] = llmkv__qk_avx2_q4; k->qk[5] = llmkv__qk_avx2_fp8;
        k->qk[6] = llmkv__qk_avx2_q4c;
        k->pv[0] = llmkv__pv_avx2_f32; k->pv[1] = llmkv__pv_avx2_f16; k->pv[2] = llmkv__pv_avx2_bf16;
        k->pv[3] = llmkv__pv_avx2_q8; k->pv[4] = llmkv__pv_avx2_q4; k->pv[5] = llmkv__pv_avx2_fp8;
        k->ex = llmkv__ex_avx2;
        k->max = llmkv__max_avx2;
        return;
#endif
#ifdef LLMKV__NEON
    case LLMKV_CPU_PATH_NEON:
        k->qk[0] = llmkv__qk_neon_f32; k->qk[1] = llmkv__qk_neon_f16; k->qk[2] = llmkv__qk_neon_bf16;
        k->qk[3] = llmkv__qk_neon_q8; k->qk[4] = llmkv__qk_neon_q4; k->qk[5] = llmkv__qk_neon_fp8;
        k->qk[6] = llmkv__qk_neon_q4c;
        k->pv[0] = llmkv__pv_neon_f32; k->pv[1] = llmkv__pv_neon_f16; k->pv[2] = llmkv__pv_neon_bf16;
        k->pv[3] = llmkv__pv_neon_q8; k->pv[4] = llmkv__pv_neon_q4; k->pv[5] = llmkv__pv_neon_fp8;
        k->ex = llmkv__ex_neon;
        k->max = llmkv__max_neon;
        return;
#endif
    default:
        k->qk[0] = llmkv__qk_scalar_f32; k->qk[1] = llmkv__qk_scalar_f16; k->qk[2] = llmkv__qk_scalar_bf16;
        k->qk[3] = llmkv__qk_scalar_q8; k->qk[4] = llmkv__qk_scalar_q4; k->qk[5] = llmkv__qk_scalar_fp8;
        k->qk[6] = llmkv__qk_scalar_q4c;
        k->pv[0] = llmkv__pv_scalar_f32; k->pv[1] = llmkv__pv_scalar_f16; k->pv[2] = llmkv__pv_scalar_bf16;
        k->pv[3] = llmkv__pv_scalar_q8; k->pv[4] = llmkv__pv_scalar_q4; k->pv[5] = llmkv__pv_scalar_fp8;
        k->ex = llmkv__ex_scalar;
        k->max = llmkv__max_scalar;
        return;
    }
}

/* ------------------------------------------------------------------------ */
/* CPU attention: planning and the online-softmax driver                    */
/* ------------------------------------------------------------------------ */

/* A unit of work is (sequence, a sub-group of each KV head's query heads, a
   tile of query positions, a block of adjacent KV heads, a part of the key
   range). The rows of one KV head (positions x its query heads, at most
   HEAD_ROWS) share every K/V vector they load; a block of several KV heads
   reads each page's K and V parts as one contiguous stream, which is what
   decode at memory speed needs. Rows * head_dim is bounded so the
   per-thread state fits on the stack (about 95 KiB with the Q4C table). */

typedef struct llmkv__job {
    const llmkv_cache* kv;
    const llmkv_batch* b;
    const llmkv_attn_desc* d;
    llmkv__kernels kern;
    llmkv__qk_fn qk;
    llmkv__pv_fn pv;
    int q_bf16;                     /* qk reads BF16 query rows */
    int q_int8;                     /* qk reads int8 query rows (llmkv__qint_prepare) */
    uint32_t D, G, HS, QT, unit_rows, nth, splits;
    size_t q_stride, out_stride;    /* in floats */
    float scale, cap;
    const unsigned char* k_base;    /* pool + layer offset + K part */
    const unsigned char* v_base;
    const unsigned char* ks_base;   /* pool + layer offset + K scales */
    const unsigned char* vs_base;
    int scaled;                     /* K or V has scales: the scale rows are filled */
    int channel;                    /* Q4C keys: qk takes raw codes (llmkv__qk_channel), and the
                                       staged page of each sequence is read at F16 by qk_stage */
    llmkv__qk_fn qk_stage;
    int tile;                       /* prefill units may use the tile kernels */
    uint32_t tile_rows, tile_keys;  /* a tile's rows (a multiple of 16) and keys per chunk at most */
} llmkv__job;

typedef struct llmkv__unit {
    uint32_t seq, kvh0, kvh1, h0, h1, t0, t1, k0, k1, split, n_splits;
    int tiled;                      /* computed by llmkv__attend_tile: one KV head, rows in lanes */
    uint64_t ws;                    /* float offset of its partial (split units) */
} llmkv__unit;

typedef struct llmkv__walk {
    llmkv__unit u;
    uint64_t ws_next;
    int started;
} llmkv__walk;

/* Number of query rows of sequence i. */
static uint32_t llmkv__q_len(const llmkv_batch* b, uint32_t i) {
    return (uint32_t)(b->qo_indptr[i + 1] - b->qo_indptr[i]);
}

/* Keys row t (of q_len) of a sequence of length L sees: [lo, hi). */
static void llmkv__row_keys(const llmkv__job* jb, uint32_t L, uint32_t q_len, uint32_t t, uint32_t* lo, uint32_t* hi) {
    uint32_t pos = L - q_len + t;
    if (jb->d->non_causal) { *lo = 0; *hi = L; return; }
    *hi = pos + 1;
    *lo = jb->d->window && pos + 1 > jb->d->window ? pos + 1 - jb->d->window : 0;
}

/* The key range split s of n of sequence i covers (page-aligned cuts of the
   range its rows can see). */
static void llmkv__split_range(const llmkv__job* jb, uint32_t i, uint32_t s, uint32_t n, uint32_t* k0, uint32_t* k1) {
    uint32_t L = (uint32_t)jb->b->seq_lens[i], q = llmkv__q_len(jb->b, i), lo, hi, unused, ps = jb->kv->layout.page_size;
    uint64_t a, z;
    llmkv__row_keys(jb, L, q, 0, &lo, &unused);
    llmkv__row_keys(jb, L, q, q ? q - 1 : 0, &unused, &hi);
    if (q == 0) { *k0 = *k1 = 0; return; }
    a = lo + (uint64_t)(hi - lo) * s / n;
    z = lo + (uint64_t)(hi - lo) * (s + 1) / n;
    if (s) a = a / ps * ps;
    if (s + 1 < n) z = z / ps * ps;
    *k0 = (uint32_t)a;
    *k1 = (uint32_t)(z > a ? z : a);
}

static uint32_t llmkv__n_splits(const llmkv__job* jb, uint32_t i) {
    uint32_t k0, k1, n;
    if (jb->splits <= 1) return 1;
    llmkv__split_range(jb, i, 0, 1, &k0, &k1);
    n = (k1 - k0) / LLMKV__ATTN_MIN_SPLIT;
    return n < 1 ? 1 : n < jb->splits ? n : jb->splits;
}

static uint32_t llmkv__unit_rows(const llmkv__unit* u) {
    return (u->kvh1 - u->kvh0) * (u->t1 - u->t0) * (u->h1 - u->h0);
}

/* Advances to the next unit in the fixed order; 0 at the end. The split
   index is innermost, so a split unit's parts are adjacent and so are their
   partials in the workspace. */
static int llmkv__walk_next(const llmkv__job* jb, llmkv__walk* w) {
    llmkv__unit* u = &w->u;
    const llmkv_batch* b = jb->b;
    if (!w->started) {
        memset(u, 0, sizeof *u);
        w->started = 1;
        w->ws_next = 0;
        u->seq = 0;
        goto seq_start;
    }
    if (u->n_splits > 1) w->ws_next += (uint64_t)llmkv__unit_rows(u) * (jb->D + 2);
    if (++u->split < u->n_splits) goto split_start;
    if (u->tiled) { /* KV head outermost: a thread's successive tiles share their K/V */
        u->t0 = u->t1;
        if (u->t0 < llmkv__q_len(b, u->seq)) goto tile_start;
        u->h0 = u->h1;
        if (u->h0 < jb->G) goto hsub_start;
        u->kvh0 = u->kvh1;
        if (u->kvh0 < jb->kv->layout.n_kv_heads) goto tiled_kvh;
        u->seq++;
        goto seq_start;
    }
    u->kvh0 = u->kvh1;
    if (u->kvh0 < jb->kv->layout.n_kv_heads) goto kvh_start;
    u->t0 = u->t1;
    if (u->t0 < llmkv__q_len(b, u->seq)) goto tile_start;
    u->h0 = u->h1;
    if (u->h0 < jb->G) goto hsub_start;
    u->seq++;
seq_start:
    while (u->seq < b->n_seqs && llmkv__q_len(b, u->seq) == 0) u->seq++;
    if (u->seq >= b->n_seqs) return 0;
    u->n_splits = llmkv__n_splits(jb, u->seq);
    u->tiled = jb->tile && (uint64_t)llmkv__q_len(b, u->seq) * jb->G >= LLMKV__TILE_MIN_ROWS;
    u->kvh0 = 0;
tiled_kvh:
    u->kvh1 = u->kvh0 + 1;
    u->h0 = 0;
hsub_start:
    {
        uint32_t hs = u->tiled ? (jb->G < jb->tile_rows ? jb->G : jb->tile_rows) : jb->HS;
        u->h1 = u->h0 + hs < jb->G ? u->h0 + hs : jb->G;
    }
    u->t0 = 0;
tile_start:
    {
        uint32_t q = llmkv__q_len(b, u->seq), qt = LLMKV__ATTN_HEAD_ROWS / (u->h1 - u->h0);
        if (qt > jb->QT) qt = jb->QT;
        if (u->tiled) qt = jb->tile_rows / (u->h1 - u->h0);
        u->t1 = u->t0 + qt < q ? u->t0 + qt : q;
    }
    if (u->tiled) goto tiled_unit;
    u->kvh0 = 0;
kvh_start:
    {
        uint32_t per_head = (u->t1 - u->t0) * (u->h1 - u->h0), n = jb->unit_rows / per_head;
        if (n < 1) n = 1;
        u->kvh1 = u->kvh0 + n < jb->kv->layout.n_kv_heads ? u->kvh0 + n : jb->kv->layout.n_kv_heads;
    }
tiled_unit:
    u->split = 0;
split_start:
    llmkv__split_range(jb, u->seq, u->split, u->n_splits, &u->k0, &u->k1);
    u->ws = u->n_splits > 1 ? w->ws_next : 0;
    return 1;
}

/* Work estimate of a unit: rows times keys it can visit, plus a fixed cost. */
static uint64_t llmkv__unit_cost(const llmkv__job* jb, const llmkv__unit* u) {
    uint32_t L = (uint32_t)jb->b->seq_lens[u->seq], q = llmkv__q_len(jb->b, u->seq), lo, hi, unused;
    llmkv__row_keys(jb, L, q, u->t0, &lo, &unused);
    llmkv__row_keys(jb, L, q, u->t1 - 1, &unused, &hi);
    if (lo < u->k0) lo = u->k0;
    if (hi > u->k1) hi = u->k1;
    return (uint64_t)llmkv__unit_rows(u) * ((hi > lo ? hi - lo : 0) + 16);
}

/* Row pointers of the keys of a chunk and of the next one (K, V, and
   their scale rows, filled only when a part has scales: the kernels of
   the float types never read them), at the unit's first KV head. */
typedef struct llmkv__chunk_ptrs {
    const unsigned char* k[2 * LLMKV__ATTN_CHUNK];
    const unsigned char* v[2 * LLMKV__ATTN_CHUNK];
    const unsigned char* ks[2 * LLMKV__ATTN_CHUNK];
    const unsigned char* vs[2 * LLMKV__ATTN_CHUNK];
} llmkv__chunk_ptrs;

/* Where a unit's sequence keeps its keys: its pages, and (Q4C) the page
   index held at F16 in `stage` (rows head_dim apart, heads page_size rows
   apart), or LLMKV__NO_SLOT. */
typedef struct llmkv__seq_keys {
    const int32_t* pages;
    uint32_t stage_page;
    const unsigned char* stage;
} llmkv__seq_keys;

/* Row pointers of keys [k, k + J) at KV head kvh: K and V, and their scale
   rows when the job has scales. The K rows of the page that sk stages at
   F16 (Q4C) point into the stage. Page and slot are stepped, not divided. */
static void llmkv__key_rows(const llmkv__job* jb, const llmkv__seq_keys* sk, uint32_t kvh, uint32_t k, uint32_t J,
                            const unsigned char** kp, const unsigned char** vp, const unsigned char** ksp,
                            const unsigned char** vsp) {
    const llmkv_layout* ly = &jb->kv->layout;
    uint32_t page = k / ly->page_size, slot = k % ly->page_size, j;
    size_t kh = (size_t)kvh * ly->k.head_stride, vh = (size_t)kvh * ly->v.head_stride;
    for (j = 0; j < J; ++j) {
        size_t at = (size_t)sk->pages[page] * ly->page_bytes;
        kp[j] = page == sk->stage_page ? sk->stage + ((size_t)kvh * ly->page_size + slot) * ly->head_dim * 2
                                       : jb->k_base + at + kh + slot * ly->k.slot_stride;
        vp[j] = jb->v_base + at + vh + slot * ly->v.slot_stride;
        if (jb->scaled) {
            ksp[j] = jb->ks_base + at + (size_t)kvh * ly->k.scale_head_stride + slot * ly->k.scale_slot_stride;
            vsp[j] = jb->vs_base + at + (size_t)kvh * ly->v.scale_head_stride + slot * ly->v.scale_slot_stride;
        }
        if (++slot == ly->page_size) {
            slot = 0;
            page++;
        }
    }
}

/* Fills entries [at, at + J) of the row pointers with keys [k, min(k +
   CHUNK, kmax)); returns J (0 past the end). */
static uint32_t llmkv__chunk_rows(const llmkv__job* jb, const llmkv__unit* u, const llmkv__seq_keys* sk, uint32_t k,
                                  uint32_t kmax, llmkv__chunk_ptrs* rw, uint32_t at) {
    uint32_t J = k < kmax ? (kmax - k < LLMKV__ATTN_CHUNK ? kmax - k : LLMKV__ATTN_CHUNK) : 0;
    llmkv__key_rows(jb, sk, u->kvh0, k, J, rw->k + at, rw->v + at, rw->ks + at, rw->vs + at);
    return J;
}

/* The part of a chunk (keys k + [0, J)) that starts at s0: up to the end of
   its page; returns its end. *npf: how many of the rows AHEAD keys further
   on (in this chunk or the next, of Jn keys) it prefetches. */
static uint32_t llmkv__part_end(uint32_t page_size, uint32_t k, uint32_t s0, uint32_t J, uint32_t Jn, uint32_t* npf) {
    uint32_t s1 = s0 + page_size - (k + s0) % page_size;
    if (s1 > J) s1 = J;
    *npf = s0 + LLMKV__ATTN_AHEAD < J + Jn ? J + Jn - s0 - LLMKV__ATTN_AHEAD : 0;
    if (*npf > s1 - s0) *npf = s1 - s0;
    return s1;
}

/* Rounds the M query rows of Qs (F32, D apart) to int8 for the VNNI
   kernels, in place: prepared row r takes bytes [r RB, (r + 1) RB), RB =
   llmkv__qint_row_bytes(D) <= 4 D (D >= 32), so converting rows in order
   from a copy never overwrites a row not yet read (Q4 keys, D a multiple
   of 128). A row holds:
     [0, D)   q_int, each 128 elements as their 64 even elements, then
              their 64 odd ones (the low and high nibbles of the codes);
     [D, 2D)  F32 per 4 lanes of a 128-element block: the sum of the
              lane's 32-element group's q_int / 4 (times the group's
              minimum, summed over its four lanes: m * sum q_int);
     [2D]     F32 max|q| / 127, by which every score is multiplied.
   A row with a non-finite element gets scale NaN (NaN scores, as F32
   arithmetic would give). */
static void llmkv__qint_prepare(float* Qs, uint32_t M, uint32_t D) {
    float row[LLMKV__MAX_HEAD_DIM];
    int8_t qi[LLMKV__MAX_HEAD_DIM];
    unsigned char* base = (unsigned char*)(void*)Qs;
    uint32_t RB = llmkv__qint_row_bytes(D), r, c, i;
    for (r = 0; r < M; ++r) {
        unsigned char* o = base + (size_t)r * RB;
        float amax = 0.0f, inv, qscale;
        int finite = 1;
        memcpy(row, Qs + (size_t)r * D, D * sizeof(float));
        for (c = 0; c < D; ++c) {
            if (!llmkv__finite(row[c])) finite = 0;
            else if (fabsf(row[c]) > amax) amax = fabsf(row[c]);
        }
        inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        qscale = finite ? amax / 127.0f : NAN;
        for (c = 0; c < D; ++c) qi[c] = finite ? (int8_t)rintf(llmkv__q_arg(row[c], 0.0f, inv, -127.0f, 127.0f)) : 0;
        for (c = 0; c < D; c += 128) {
            for (i = 0; i < 64; ++i) {
                o[c + i] = (unsigned char)qi[c + 2 * i];
                o[c + 64 + i] = (unsigned char)qi[c + 2 * i + 1];
            }
            for (i = 0; i < 16; ++i) {
                uint32_t g0 = c + 32 * (i / 4), e;
                int32_t sum = 0;
                float v;
                for (e = 0; e < 32; ++e) sum += qi[g0 + e];
                v = (float)sum / 4.0f;
                memcpy(o + D + c / 2 + 4 * i, &v, 4);
            }
        }
        memcpy(o + 2 * (size_t)D, &qscale, 4);
    }
}

/* QK over the Q4C keys of one part (rows of one page and head, so one
   table `tab`): with k_c = s_c code_c + m_c,
   q.k = sum_c (q_c s_c) code_c + sum_c q_c m_c, so the raw-code kernel
   runs on the query scaled by s, and each row adds its q.m (computed by
   the F32 kernel with m as a one-key part). */
static void llmkv__qk_channel(const llmkv__job* jb, const float* q, uint32_t M, uint32_t D,
                              const unsigned char* const* k, size_t koff, const unsigned char* tab, uint32_t J, float* S,
                              uint32_t sj, const unsigned char* const* pf, uint32_t npf) {
    float qs[LLMKV__ATTN_MAX_ELEMS], t[LLMKV__MAX_HEAD_DIM * 2], sc[LLMKV__MAX_HEAD_DIM], mn[LLMKV__MAX_HEAD_DIM];
    float bias[LLMKV__ATTN_MAX_ROWS * 16 + 16];
    const unsigned char* mrow[1];
    uint32_t m, c, j, nb = (D + 15) / 16;
    /* the table (16 scales, then their 16 minimums, per block) to two rows */
    llmkv__convert(t, LLMKV_DTYPE_F32, tab, LLMKV_DTYPE_F16, nb * 32, (int)(jb->kv->cpu_paths >> LLMKV_CPU_PATH_AVX2 & 1u));
    for (c = 0; c < nb; ++c) {
        memcpy(sc + 16 * c, t + 32 * c, 16 * sizeof(float));
        memcpy(mn + 16 * c, t + 32 * c + 16, 16 * sizeof(float));
    }
    for (m = 0; m < M; ++m)
        for (c = 0; c < D; ++c) qs[(size_t)m * D + c] = q[(size_t)m * D + c] * sc[c];
    mrow[0] = (const unsigned char*)mn;
    jb->kern.qk[0](q, M, D, mrow, 0, mrow, 0, 1, bias, 16, NULL, 0);
    jb->qk(qs, M, D, k, koff, k, koff, J, S, sj, pf, npf);
    for (m = 0; m < M; ++m)
        for (j = 0; j < J; ++j) S[(size_t)m * sj + j] += bias[(size_t)m * 16];
}

/* Computes one unit: online softmax over its keys, page by page. Writes the
   normalised rows to out (and lse), or, for a split part, its unnormalised
   accumulator with running max and sum to `partial`. */
LLMKV__NOINLINE void llmkv__attend_unit(const llmkv__job* jb, const llmkv__unit* u, float* partial) {
    /* Qs: the scaled query rows in F32, head_dim apart, or, for a QK kernel
       that reads BF16, each row as BF16 high and low parts (q = hi + lo to
       about 16 bits), 2 Dp values apart, Dp = head_dim rounded up to 32. */
    float Qs[LLMKV__ATTN_MAX_ELEMS + 31 * LLMKV__ATTN_MAX_ROWS], acc[LLMKV__ATTN_MAX_ELEMS];
    float S[LLMKV__ATTN_MAX_ROWS * LLMKV__ATTN_SJ], mx[LLMKV__ATTN_MAX_ROWS], l[LLMKV__ATTN_MAX_ROWS];
    uint32_t lo[LLMKV__ATTN_MAX_ROWS], hi[LLMKV__ATTN_MAX_ROWS];
    const llmkv_layout* ly = &jb->kv->layout;
    const llmkv_batch* b = jb->b;
    uint32_t D = jb->D, HS = u->h1 - u->h0, Mh = (u->t1 - u->t0) * HS, NB = u->kvh1 - u->kvh0, M = NB * Mh, hb;
    uint32_t L = (uint32_t)b->seq_lens[u->seq], q_len = llmkv__q_len(b, u->seq), row0 = (uint32_t)b->qo_indptr[u->seq];
    uint32_t r, t, h, d, kmin = 0xffffffffu, kmax = 0, k, J, Jn, qstride = D;
    llmkv__chunk_ptrs rw; /* this chunk's rows, then the next one's */
    llmkv__seq_keys sk;

    sk.pages = b->kv_indices + b->kv_indptr[u->seq];
    sk.stage_page = LLMKV__NO_SLOT;
    sk.stage = NULL;
    if (jb->channel) {
        uint32_t slot = 0, kf;
        llmkv__lookup(jb->kv, b->seqs[u->seq], &slot); /* live: the batch was checked */
        kf = jb->kv->kfill[(size_t)slot * ly->n_layers + jb->d->layer];
        sk.stage_page = kf == LLMKV__NO_SLOT ? LLMKV__NO_SLOT : kf / ly->page_size;
        sk.stage = (const unsigned char*)llmkv__stage_block(jb->kv, slot, jb->d->layer);
    }

    for (r = 0; r < M; ++r) {
        t = u->t0 + r % Mh / HS;
        h = jb->G * (u->kvh0 + r / Mh) + u->h0 + r % HS;
        {
            const float* qr = jb->d->q + (size_t)(row0 + t) * jb->q_stride + (size_t)h * D;
            for (d = 0; d < D; ++d) Qs[(size_t)r * D + d] = qr[d] * jb->scale;
        }
        llmkv__row_keys(jb, L, q_len, t, &lo[r], &hi[r]);
        if (lo[r] < u->k0) lo[r] = u->k0;
        if (hi[r] > u->k1) hi[r] = u->k1;
        if (lo[r] < kmin) kmin = lo[r];
        if (hi[r] > kmax) kmax = hi[r];
        mx[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(acc, 0, (size_t)M * D * sizeof(float));
    if (jb->q_bf16) { /* in place, last row first: row r's BF16 never starts before its F32 */
        uint32_t Dp = (D + 31) / 32 * 32;
        float row[512];
        uint16_t* qb = (uint16_t*)(void*)Qs;
        for (r = M; r-- > 0;) {
            memcpy(row, Qs + (size_t)r * D, D * sizeof(float));
            for (d = 0; d < Dp; ++d) {
                uint16_t qh = d < D ? llmkv_f32_to_bf16(row[d]) : 0;
                qb[(size_t)r * 2 * Dp + d] = qh;
                qb[(size_t)r * 2 * Dp + Dp + d] = d < D ? llmkv_f32_to_bf16(row[d] - llmkv_bf16_to_f32(qh)) : 0;
            }
        }
        qstride = Dp; /* floats: 2 Dp BF16 values */
    }
    if (jb->q_int8) {
        llmkv__qint_prepare(Qs, M, D);
        qstride = llmkv__qint_row_bytes(D) / 4;
    }

    /* Keys outside [kmin, kmax) are hidden from every row: those pages are
       never touched. kp/vp hold the row pointers of the chunk being scored
       and of the next one. The chunk is walked page by page, and inside a
       page KV head by KV head, so K (then V) is read in address order; after
       each (page, head) part is read, the same part of the next chunk is
       prefetched, which keeps a steady chunk's worth of reads in flight
       (hardware prefetchers stop at every page change). */
    J = llmkv__chunk_rows(jb, u, &sk, kmin, kmax, &rw, 0);
    for (k = kmin; k < kmax; k += J, J = Jn) {
        uint32_t j, s0, s1, npf;
        int whole = 1; /* every row sees every key of the chunk */
        Jn = llmkv__chunk_rows(jb, u, &sk, k + J, kmax, &rw, J);
        for (r = 0; r < M; ++r) whole &= lo[r] <= k && k + J <= hi[r];
        for (s0 = 0; s0 < J; s0 = s1) {
            s1 = llmkv__part_end(ly->page_size, k, s0, J, Jn, &npf);
            for (hb = 0; hb < NB; ++hb) {
                const float* qh = Qs + (size_t)hb * Mh * qstride;
                float* Sh = S + (size_t)hb * Mh * LLMKV__ATTN_SJ + s0;
                if ((k + s0) / ly->page_size == sk.stage_page) /* Q4C keys still at F16 */
                    jb->qk_stage(qh, Mh, D, rw.k + s0, (size_t)hb * ly->page_size * D * 2, rw.k + s0, 0, s1 - s0, Sh,
                                 LLMKV__ATTN_SJ, rw.k + s0 + LLMKV__ATTN_AHEAD, npf);
                else if (jb->channel)
                    llmkv__qk_channel(jb, qh, Mh, D, rw.k + s0, hb * ly->k.head_stride,
                                      rw.ks[s0] + hb * ly->k.scale_head_stride, s1 - s0, Sh, LLMKV__ATTN_SJ,
                                      rw.k + s0 + LLMKV__ATTN_AHEAD, npf);
                else
                    jb->qk(qh, Mh, D, rw.k + s0, hb * ly->k.head_stride, jb->scaled ? rw.ks + s0 : rw.k + s0,
                           hb * ly->k.scale_head_stride, s1 - s0, Sh, LLMKV__ATTN_SJ, rw.k + s0 + LLMKV__ATTN_AHEAD,
                           npf);
            }
        }
        for (r = 0; r < M; ++r) {
            float* s = S + (size_t)r * LLMKV__ATTN_SJ;
            float cmax, newm, alpha;
            if (jb->cap > 0.0f)
                for (j = 0; j < J; ++j) s[j] = jb->cap * tanhf(s[j] / jb->cap);
            if (!whole)
                for (j = 0; j < J; ++j)
                    if (k + j < lo[r] || k + j >= hi[r]) s[j] = -INFINITY;
            cmax = jb->kern.max(s, J);
            if (cmax == -INFINITY) { /* this row sees none of these keys */
                memset(s, 0, J * sizeof(float));
                continue;
            }
            newm = mx[r] > cmax ? mx[r] : cmax;
            alpha = expf(mx[r] - newm);
            l[r] = l[r] * alpha + jb->kern.ex(s, J, newm);
            if (alpha != 1.0f)
                for (d = 0; d < D; ++d) acc[(size_t)r * D + d] *= alpha;
            mx[r] = newm;
        }
        for (s0 = 0; s0 < J; s0 = s1) {
            s1 = llmkv__part_end(ly->page_size, k, s0, J, Jn, &npf);
            for (hb = 0; hb < NB; ++hb)
                jb->pv(S + (size_t)hb * Mh * LLMKV__ATTN_SJ + s0, LLMKV__ATTN_SJ, Mh, D, rw.v + s0, hb * ly->v.head_stride,
                       jb->scaled ? rw.vs + s0 : rw.v + s0, hb * ly->v.scale_head_stride, s1 - s0, acc + (size_t)hb * Mh * D,
                       rw.v + s0 + LLMKV__ATTN_AHEAD, npf);
        }
        memmove(rw.k, rw.k + J, Jn * sizeof rw.k[0]);
        memmove(rw.v, rw.v + J, Jn * sizeof rw.v[0]);
        if (jb->scaled) {
            memmove(rw.ks, rw.ks + J, Jn * sizeof rw.ks[0]);
            memmove(rw.vs, rw.vs + J, Jn * sizeof rw.vs[0]);
        }
    }

    for (r = 0; r < M; ++r) {
        t = u->t0 + r % Mh / HS;
        h = jb->G * (u->kvh0 + r / Mh) + u->h0 + r % HS;
        if (partial) {
            float* p = partial + (size_t)r * (D + 2);
            memcpy(p, acc + (size_t)r * D, D * sizeof(float));
            p[D] = mx[r];
            p[D + 1] = l[r];
        } else {
            float* o = jb->d->out + (size_t)(row0 + t) * jb->out_stride + (size_t)h * D;
            float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
            for (d = 0; d < D; ++d) o[d] = acc[(size_t)r * D + d] * inv;
            if (jb->d->lse)
                jb->d->lse[(size_t)(row0 + t) * (jb->G * ly->n_kv_heads) + h] =
                    l[r] > 0.0f ? mx[r] + logf(l[r]) : -INFINITY;
        }
    }
}

/* p rounded up to a multiple of 64 bytes (p has 16 floats to spare). */
static float* llmkv__align64f(float* p) { return p + ((64u - (uint32_t)((uintptr_t)p % 64u)) % 64u) / 4u; }

/* Row pointers of keys [k, min(k + tile_keys, kmax)) at KV head kvh (as
   llmkv__key_rows); returns their count. */
static uint32_t llmkv__tile_ptrs(const llmkv__job* jb, const llmkv__seq_keys* sk, uint32_t kvh, uint32_t k,
                                 uint32_t kmax, const unsigned char** kp, const unsigned char** vp,
                                 const unsigned char** ksp, const unsigned char** vsp) {
    uint32_t J = k < kmax ? (kmax - k < jb->tile_keys ? kmax - k : jb->tile_keys) : 0;
    llmkv__key_rows(jb, sk, kvh, k, J, kp, vp, ksp, vsp);
    return J;
}

/* Computes one prefill unit with the tile kernels (rows in lanes, see the
   AVX-512 tiles): the same results and outputs as llmkv__attend_unit, for
   units of one KV head whose rows (at most LLMKV__TILE_ROWS) fill vectors
   of sixteen. Per-thread state, on the stack: the query rows and the
   accumulators transposed, one chunk's scores and one chunk of values
   converted to F32 (about 102 KiB). */
LLMKV__NOINLINE void llmkv__attend_tile(const llmkv__job* jb, const llmkv__unit* u, float* partial) {
    float qbuf[LLMKV__TILE_ELEMS + 16], abuf[LLMKV__TILE_ELEMS + 16], sbuf[LLMKV__TILE_SCORES + 16];
    float vbuf[LLMKV__TILE_SCRATCH + 16], kbuf[8 * LLMKV__MAX_TILE_DIM + 16];
    float mbuf[3 * LLMKV__TILE_ROWS + 16];
    uint32_t lo[LLMKV__TILE_ROWS], hi[LLMKV__TILE_ROWS];
    size_t row[LLMKV__TILE_ROWS]; /* float offsets of the query rows, then of the output rows */
    const float* qi[LLMKV__TILE_ROWS] = {0}; /* the query rows */
    float* io[LLMKV__TILE_ROWS];  /* the output rows */
    const unsigned char *kp[2 * LLMKV__TILE_MAX_KEYS], *vp[2 * LLMKV__TILE_MAX_KEYS]; /* this chunk's rows, */
    const unsigned char *ksp[2 * LLMKV__TILE_MAX_KEYS], *vsp[2 * LLMKV__TILE_MAX_KEYS]; /* then the next one's */
    const llmkv_layout* ly = &jb->kv->layout;
    const llmkv_batch* b = jb->b;
    llmkv__seq_keys sk; /* tiles never take Q4C keys: nothing staged */
    uint32_t D = jb->D, HS = u->h1 - u->h0, M = (u->t1 - u->t0) * HS, RB = (M + 15) / 16, Mp = 16 * RB;
    uint32_t L = (uint32_t)b->seq_lens[u->seq], q_len = llmkv__q_len(b, u->seq), row0 = (uint32_t)b->qo_indptr[u->seq];
    uint32_t kvh = u->kvh0, r, j, k, J, Jn, cur = 0, kmin = 0xffffffffu, kmax = 0;
    uint32_t krow_bytes = llmkv__vec_data_bytes(ly->k.dtype, D), vrow_bytes = llmkv__vec_data_bytes(ly->v.dtype, D);
    float *QT = llmkv__align64f(qbuf), *accT = llmkv__align64f(abuf), *ST = llmkv__align64f(sbuf);
    float *VS = llmkv__align64f(vbuf), *KS = llmkv__align64f(kbuf), *mx = llmkv__align64f(mbuf);
    float *l = mx + LLMKV__TILE_ROWS, *alpha = l + LLMKV__TILE_ROWS;
    llmkv_dtype kt = ly->k.dtype, vt = ly->v.dtype;
    float cap2 = jb->cap * LLMKV__LOG2E; /* cap tanh(s / cap), s and cap in base 2 */

    sk.pages = b->kv_indices + b->kv_indptr[u->seq];
    sk.stage_page = LLMKV__NO_SLOT;
    sk.stage = NULL;

    for (r = 0; r < Mp; ++r) { /* rows past M repeat the last one (results unused) */
        uint32_t rr = r < M ? r : M - 1, t = u->t0 + rr / HS, h = jb->G * kvh + u->h0 + rr % HS;
        row[r] = (size_t)(row0 + t) * jb->q_stride + (size_t)h * D;
        llmkv__row_keys(jb, L, q_len, t, &lo[r], &hi[r]);
        if (lo[r] < u->k0) lo[r] = u->k0;
        if (hi[r] > u->k1) hi[r] = u->k1;
        if (r < M && lo[r] < hi[r]) {
            if (lo[r] < kmin) kmin = lo[r];
            if (hi[r] > kmax) kmax = hi[r];
        }
        mx[r] = -INFINITY;
        l[r] = 0.0f;
    }
    for (r = 0; r < Mp; ++r) qi[r] = jb->d->q + row[r];
    jb->kern.tile_in(QT, RB, D, qi, jb->scale * LLMKV__LOG2E); /* scores in base 2 */
    memset(accT, 0, (size_t)D * Mp * sizeof(float));

    J = llmkv__tile_ptrs(jb, &sk, kvh, kmin, kmax, kp, vp, ksp, vsp);
    for (k = kmin; k < kmax; k += J, J = Jn) {
        int whole = 1, rescale;
        uint32_t at = cur ^ LLMKV__TILE_MAX_KEYS; /* the next chunk's rows, prefetched now */
        Jn = llmkv__tile_ptrs(jb, &sk, kvh, k + J, kmax, kp + at, vp + at, ksp + at, vsp + at);
        for (r = 0; r < M; ++r) whole &= lo[r] <= k && k + J <= hi[r];
        /* QK prefetches the next chunk's values, PV its keys (read first) */
        jb->kern.tile_qk(QT, RB, D, kt, kp + cur, 0, jb->scaled ? ksp + cur : NULL, 0, J, ST, KS, vp + at, Jn,
                         vrow_bytes);
        if (cap2 > 0.0f)
            for (j = 0; j < J * Mp; ++j) ST[j] = cap2 * tanhf(ST[j] / cap2);
        rescale = jb->kern.tile_soft(ST, RB, J, k, lo, hi, whole, mx, l, alpha);
        jb->kern.tile_pv(ST, RB, D, vt, vp + cur, 0, jb->scaled ? vsp + cur : NULL, 0, J, accT, alpha, rescale, VS,
                         kp + at, Jn, krow_bytes);
        cur = at;
    }

    for (r = 0; r < M; ++r) { /* where each row goes, and by what it is divided */
        uint32_t t = u->t0 + r / HS, h = jb->G * kvh + u->h0 + r % HS;
        float m = mx[r] * LLMKV__LN2; /* the running maximum, back to base e (-inf stays) */
        if (partial) {
            row[r] = (size_t)r * (D + 2);
            partial[row[r] + D] = m;
            partial[row[r] + D + 1] = l[r];
            alpha[r] = 1.0f;
        } else {
            row[r] = (size_t)(row0 + t) * jb->out_stride + (size_t)h * D;
            alpha[r] = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
            if (jb->d->lse)
                jb->d->lse[(size_t)(row0 + t) * (jb->G * ly->n_kv_heads) + h] = l[r] > 0.0f ? m + logf(l[r]) : -INFINITY;
        }
    }
    for (r = 0; r < M; ++r) io[r] = (partial ? partial : jb->d->out) + row[r];
    jb->kern.tile_out(io, M, accT, RB, D, alpha);
}

/* Merges the n parts of a split unit (first part `u`) by log-sum-exp. */
static void llmkv__merge_unit(const llmkv__job* jb, const llmkv__unit* u, const float* ws) {
    const llmkv_batch* b = jb->b;
    uint32_t D = jb->D, HS = u->h1 - u->h0, Mh = (u->t1 - u->t0) * HS, M = llmkv__unit_rows(u), r, s, d, t, h;
    uint32_t row0 = (uint32_t)b->qo_indptr[u->seq], nq = jb->G * jb->kv->layout.n_kv_heads;
    size_t part = (size_t)M * (D + 2);
    for (r = 0; r < M; ++r) {
        float m = -INFINITY, lsum = 0.0f, inv;
        float* o;
        t = u->t0 + r % Mh / HS;
        h = jb->G * (u->kvh0 + r / Mh) + u->h0 + r % HS;
        o = jb->d->out + (size_t)(row0 + t) * jb->out_stride + (size_t)h * D;
        for (s = 0; s < u->n_splits; ++s) {
            float ms = ws[u->ws + s * part + (size_t)r * (D + 2) + D];
            if (ms > m) m = ms;
        }
        for (d = 0; d < D; ++d) o[d] = 0.0f;
        if (m != -INFINITY) {
            for (s = 0; s < u->n_splits; ++s) {
                const float* p = ws + u->ws + s * part + (size_t)r * (D + 2);
                float w = p[D] == -INFINITY ? 0.0f : expf(p[D] - m);
                lsum += w * p[D + 1];
                for (d = 0; d < D; ++d) o[d] += w * p[d];
            }
        }
        inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
        for (d = 0; d < D; ++d) o[d] *= inv;
        if (jb->d->lse) jb->d->lse[(size_t)(row0 + t) * nq + h] = lsum > 0.0f ? m + logf(lsum) : -INFINITY;
    }
}

/* Validates a call and resolves everything the units need. */
static llmkv_result llmkv__attn_prepare(const llmkv_cache* kv, const llmkv_batch* b, const llmkv_attn_desc* d,
                                        uint32_t nth, llmkv__job* jb) {
    const llmkv_layout* ly;
    llmkv_cpu_path path;
    size_t row_bytes;
    uint64_t units = 0;
    llmkv__walk w;
    llmkv_result r;
    if (!kv || !b || !d || nth == 0) return LLMKV_ERR_INVALID_ARGUMENT;
    if (b->cache != kv) return LLMKV_ERR_INVALID_ARGUMENT;
    ly = &kv->layout;
    if (d->n_q_heads == 0 || d->n_q_heads % ly->n_kv_heads) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!d->q || !d->out) return LLMKV_ERR_INVALID_ARGUMENT;
    if (d->layer >= ly->n_layers) return LLMKV_ERR_OUT_OF_RANGE;
    if (!(d->scale >= 0.0f) || !(d->softcap >= 0.0f)) return LLMKV_ERR_INVALID_ARGUMENT; /* NaN fails too */
    row_bytes = (size_t)d->n_q_heads * ly->head_dim * sizeof(float);
    if ((uintptr_t)d->q % 4 || (uintptr_t)d->out % 4 || (uintptr_t)d->lse % 4 || d->q_stride % 4 ||
        d->out_stride % 4)
        return LLMKV_ERR_MISALIGNED;
    if ((d->q_stride && d->q_stride < row_bytes) || (d->out_stride && d->out_stride < row_bytes))
        return LLMKV_ERR_BUFFER_TOO_SMALL;
    path = d->path == LLMKV_CPU_PATH_AUTO ? kv->cpu_auto : d->path;
    if ((unsigned)path > LLMKV_CPU_PATH_LAST || !(kv->cpu_paths >> path & 1u)) return LLMKV_ERR_UNSUPPORTED;
    r = llmkv_batch_check(b);
    if (r != LLMKV_OK) return r;
    if (!kv->pool) return LLMKV_ERR_NO_PAGE_DATA;

    memset(jb, 0, sizeof *jb);
    jb->kv = kv;
    jb->b = b;
    jb->d = d;
    llmkv__kernels_for(path, &jb->kern);
    jb->qk = jb->kern.qk[ly->k.dtype - LLMKV_DTYPE_F32];
    jb->pv = jb->kern.pv[ly->v.dtype - LLMKV_DTYPE_F32];
    jb->q_bf16 = jb->kern.q_bf16[ly->k.dtype - LLMKV_DTYPE_F32];
    if (jb->kern.qk_int8[ly->k.dtype - LLMKV_DTYPE_F32] && ly->head_dim % 128u == 0) {
        jb->qk = jb->kern.qk_int8[ly->k.dtype - LLMKV_DTYPE_F32];
        jb->q_int8 = 1;
    }
    jb->D = ly->head_dim;
    jb->G = d->n_q_heads / ly->n_kv_heads;
    {
        uint32_t unit_rows = LLMKV__ATTN_MAX_ELEMS / jb->D, head_rows;
        if (unit_rows > LLMKV__ATTN_MAX_ROWS) unit_rows = LLMKV__ATTN_MAX_ROWS;
        if (unit_rows < 1) unit_rows = 1;
        head_rows = unit_rows < LLMKV__ATTN_HEAD_ROWS ? unit_rows : LLMKV__ATTN_HEAD_ROWS;
        jb->unit_rows = unit_rows;
        jb->HS = jb->G < head_rows ? jb->G : head_rows;
        jb->QT = head_rows / jb->HS;
    }
    jb->q_stride = (d->q_stride ? d->q_stride : row_bytes) / sizeof(float);
    jb->out_stride = (d->out_stride ? d->out_stride : row_bytes) / sizeof(float);
    jb->scale = d->scale > 0.0f ? d->scale : 1.0f / sqrtf((float)jb->D);
    jb->cap = d->softcap;
    jb->k_base = kv->pool + (size_t)d->layer * ly->layer_stride + ly->k.offset;
    jb->v_base = kv->pool + (size_t)d->layer * ly->layer_stride + ly->v.offset;
    jb->ks_base = kv->pool + (size_t)d->layer * ly->layer_stride + ly->k.scale_offset;
    jb->vs_base = kv->pool + (size_t)d->layer * ly->layer_stride + ly->v.scale_offset;
    jb->scaled = ly->k.scale_bytes || ly->v.scale_bytes;
    jb->channel = llmkv__dtype_channel(ly->k.dtype);
    jb->qk_stage = jb->kern.qk[LLMKV_DTYPE_F16 - LLMKV_DTYPE_F32];
    jb->tile = jb->kern.tile_qk && !jb->channel && !jb->q_int8 && jb->D % 8 == 0 && jb->D <= LLMKV__MAX_TILE_DIM;
    if (jb->tile) {
        uint32_t rb = LLMKV__TILE_ELEMS / jb->D / 16;
        jb->tile_rows = 16 * (rb > LLMKV__TILE_ROWS / 16 ? LLMKV__TILE_ROWS / 16 : rb);
        jb->tile_keys = LLMKV__TILE_SCRATCH / jb->D;
        if (jb->tile_keys > LLMKV__TILE_MAX_KEYS) jb->tile_keys = LLMKV__TILE_MAX_KEYS;
        if (jb->tile_keys > LLMKV__TILE_SCORES / jb->tile_rows) jb->tile_keys = LLMKV__TILE_SCORES / jb->tile_rows;
        jb->tile_keys -= jb->tile_keys % 8;
    }
    jb->nth = nth;
    /* Split long keys ranges only when the units would not keep every
       thread busy: aim for two units per thread. */
    jb->splits = 1;
    if (nth > 1) {
        memset(&w, 0, sizeof w);
        while (llmkv__walk_next(jb, &w)) units++;
        if (units < 2 * (uint64_t)nth) jb->splits = units ? (uint32_t)((2 * (uint64_t)nth + units - 1) / units) : 1;
    }
    return LLMKV_OK;
}

/* Workspace floats the split parts of this job need. */
static uint64_t llmkv__attn_ws_floats(const llmkv__job* jb) {
    llmkv__walk w;
    uint64_t n = 0;
    memset(&w, 0, sizeof w);
    while (llmkv__walk_next(jb, &w))
        if (w.u.n_splits > 1) n = w.u.ws + (uint64_t)llmkv__unit_rows(&w.u) * (jb->D + 2);
    return n;
}

static void llmkv__run_unit(const llmkv__job* jb, const llmkv__unit* u, float* ws) {
    if (u->tiled) llmkv__attend_tile(jb, u, u->n_splits > 1 ? ws + u->ws : NULL);
    else llmkv__attend_unit(jb, u, u->n_splits > 1 ? ws + u->ws : NULL);
}

/* Thread ith's units, for llmkv_attend_part: contiguous runs of units by
   cumulative cost, thread t taking the units that start in its t-th share. */
static void llmkv__attn_part(const llmkv__job* jb, uint32_t ith, float* ws) {
    llmkv__walk w;
    uint64_t total = 0, before = 0;
    memset(&w, 0, sizeof w);
    while (llmkv__walk_next(jb, &w)) total += llmkv__unit_cost(jb, &w.u);
    memset(&w, 0, sizeof w);
    while (llmkv__walk_next(jb, &w)) {
        uint64_t c = llmkv__unit_cost(jb, &w.u);
        if (before * jb->nth / total == ith) llmkv__run_unit(jb, &w.u, ws);
        before += c;
    }
}

static void llmkv__attn_merge(const llmkv__job* jb, uint32_t ith, const float* ws) {
    llmkv__walk w;
    uint64_t group = 0;
    memset(&w, 0, sizeof w);
    while (llmkv__walk_next(jb, &w)) {
        if (w.u.n_splits <= 1 || w.u.split != 0) continue;
        if (group++ % jb->nth == ith) llmkv__merge_unit(jb, &w.u, ws);
    }
}

LLMKV_API llmkv_result llmkv_attend_workspace_size(const llmkv_cache* cache, const llmkv_batch* batch,
                                                   const llmkv_attn_desc* desc, uint32_t nth, size_t* bytes) {
    llmkv__job jb;
    llmkv_result r;
    if (!bytes) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv__attn_prepare(cache, batch, desc, nth, &jb);
    if (r != LLMKV_OK) return r;
    *bytes = (size_t)(llmkv__attn_ws_floats(&jb) * sizeof(float));
    return LLMKV_OK;
}

static llmkv_result llmkv__attn_external(const llmkv_cache* cache, const llmkv_batch* batch,
                                         const llmkv_attn_desc* desc, uint32_t ith, uint32_t nth, void* workspace,
                                         size_t workspace_size, llmkv__job* jb) {
    llmkv_result r;
    uint64_t need;
    if (ith >= nth) return LLMKV_ERR_INVALID_ARGUMENT;
    r = llmkv__attn_prepare(cache, batch, desc, nth, jb);
    if (r != LLMKV_OK) return r;
    need = llmkv__attn_ws_floats(jb) * sizeof(float);
    if (need > workspace_size) return LLMKV_ERR_BUFFER_TOO_SMALL;
    if (need && (!workspace || (uintptr_t)workspace % 4)) return workspace ? LLMKV_ERR_MISALIGNED : LLMKV_ERR_INVALID_ARGUMENT;
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_attend_part(const llmkv_cache* cache, const llmkv_batch* batch,
                                         const llmkv_attn_desc* desc, uint32_t ith, uint32_t nth, void* workspace,
                                         size_t workspace_size) {
    llmkv__job jb;
    llmkv_result r = llmkv__attn_external(cache, batch, desc, ith, nth, workspace, workspace_size, &jb);
    if (r == LLMKV_OK) llmkv__attn_part(&jb, ith, (float*)workspace);
    return r;
}

LLMKV_API llmkv_result llmkv_attend_merge(const llmkv_cache* cache, const llmkv_batch* batch,
                                          const llmkv_attn_desc* desc, uint32_t ith, uint32_t nth, void* workspace,
                                          size_t workspace_size) {
    llmkv__job jb;
    llmkv_result r = llmkv__attn_external(cache, batch, desc, ith, nth, workspace, workspace_size, &jb);
    if (r == LLMKV_OK) llmkv__attn_merge(&jb, ith, (const float*)workspace);
    return r;
}

/* ------------------------------------------------------------------------ */
/* CPU attention: thread pool and the one-call entry point                  */
/* ------------------------------------------------------------------------ */

#ifndef LLMKV_NO_THREADS
#include <pthread.h>
#endif

typedef void (*llmkv__task_fn)(void* arg, uint32_t ith);

/* Waiting without sleeping: between tasks a worker polls for the next one,
   and the caller polls for the workers to finish, for up to the pool's spin
   window before sleeping on a condition variable. A futex wake-up takes
   tens of microseconds (more on a virtual machine), which is the whole
   cost of a small attention call. Shared fields are read with atomic
   loads while polling, so every access to them is atomic (GCC/Clang
   builtins); other compilers never poll. */
#if !defined(LLMKV_NO_THREADS) && (defined(__GNUC__) || defined(__clang__))
#define LLMKV__POLL 1
#define LLMKV__LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define LLMKV__STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define LLMKV__FETCH_ADD(p, v) __atomic_fetch_add((p), (v), __ATOMIC_ACQ_REL)
#else
#define LLMKV__LOAD(p) (*(p))
#define LLMKV__STORE(p, v) (*(p) = (v))
#endif
#define LLMKV__DEFAULT_SPIN_US 50u
#define LLMKV__POOL_MIN_COST 4096u /* llmkv__unit_cost summed, below which a call runs on the caller
                                      alone: handing work over costs more than it saves */

struct llmkv_threadpool {
    llmkv_allocator alloc;
    uint32_t n;
    void* workspace;        /* split-K partials, grown on demand */
    size_t workspace_size;
    uint32_t next;          /* the next work item of the running task (llmkv__pool_claim) */
    uint64_t spin_ticks;    /* the spin window, in llmkv__ticks */
#ifndef LLMKV_NO_THREADS
    pthread_t* threads;     /* n - 1 handles, then the workers' arguments */
    size_t threads_bytes;
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    uint64_t generation;    /* bumped for every task */
    uint32_t open;          /* workers may still join the task */
    uint32_t active;        /* workers running the task */
    uint32_t stop;
    llmkv__task_fn fn;
    void* arg;
#endif
};

#ifdef LLMKV__POLL
/* A time stamp counter for the spin window, and its ticks per microsecond:
   the x86 TSC, taken to run at 3 GHz (current x86 TSCs run at 2 to 4 GHz,
   so the window is within 0.75x to 1.5x of what was asked); the AArch64
   virtual counter at its stated frequency; elsewhere a count of polls,
   taken as 64 per microsecond. */
#if defined(__x86_64__) || defined(__i386__)
static uint64_t llmkv__ticks(void) { return __builtin_ia32_rdtsc(); }
static uint64_t llmkv__ticks_per_us(void) { return 3000u; }
static void llmkv__relax(void) { __builtin_ia32_pause(); }
#elif defined(__aarch64__)
static uint64_t llmkv__ticks(void) {
    uint64_t t;
    __asm__ __volatile__("mrs %0, cntvct_el0" : "=r"(t));
    return t;
}
static uint64_t llmkv__ticks_per_us(void) {
    uint64_t f;
    __asm__ __volatile__("mrs %0, cntfrq_el0" : "=r"(f));
    return f / 1000000u ? f / 1000000u : 1u;
}
static void llmkv__relax(void) { __asm__ __volatile__("yield" ::: "memory"); }
#else
#define LLMKV__TICKS_ARE_POLLS 1
static uint64_t llmkv__ticks(void) { return 0; }
static uint64_t llmkv__ticks_per_us(void) { return 64u; }
static void llmkv__relax(void) {}
#endif

/* Whether the window of `ticks` that began at t0 has passed; *polls counts
   the calls, the clock where there is no counter. */
static int llmkv__window_over(uint64_t t0, uint64_t* polls, uint64_t ticks) {
#ifdef LLMKV__TICKS_ARE_POLLS
    (void)t0;
    return ++*polls >= ticks;
#else
    (void)polls;
    return llmkv__ticks() - t0 >= ticks;
#endif
}

/* Polls until *word differs from `from` (or *stop is set) or the window of
   `ticks` has passed. */
static void llmkv__poll_change(const uint64_t* word, uint64_t from, const uint32_t* stop, uint64_t ticks) {
    uint64_t t0 = llmkv__ticks(), polls = 0;
    do {
        uint32_t i;
        for (i = 0; i < 16; ++i) {
            if (LLMKV__LOAD(word) != from || LLMKV__LOAD(stop)) return;
            llmkv__relax();
        }
    } while (!llmkv__window_over(t0, &polls, ticks));
}

/* Polls until *count is 0 or the window of `ticks` has passed. */
static void llmkv__poll_zero(const uint32_t* count, uint64_t ticks) {
    uint64_t t0 = llmkv__ticks(), polls = 0;
    do {
        uint32_t i;
        for (i = 0; i < 16; ++i) {
            if (!LLMKV__LOAD(count)) return;
            llmkv__relax();
        }
    } while (!llmkv__window_over(t0, &polls, ticks));
}
#endif

/* The next work item of the running task, for whichever thread asks: the
   task's threads take items in order until the count runs out, so a
   thread that joins late (or never) leaves its share to the others. */
static uint32_t llmkv__pool_claim(llmkv_threadpool* pool) {
#ifdef LLMKV__POLL
    return LLMKV__FETCH_ADD(&pool->next, 1u);
#elif !defined(LLMKV_NO_THREADS)
    uint32_t i;
    pthread_mutex_lock(&pool->mu);
    i = pool->next++;
    pthread_mutex_unlock(&pool->mu);
    return i;
#else
    return pool->next++;
#endif
}

#ifndef LLMKV_NO_THREADS
typedef struct llmkv__worker_arg { llmkv_threadpool* pool; uint32_t ith; } llmkv__worker_arg;

static void* llmkv__worker(void* p) {
    llmkv_threadpool* pool = ((llmkv__worker_arg*)p)->pool;
    uint32_t ith = ((llmkv__worker_arg*)p)->ith;
    uint64_t seen = 0;
    for (;;) {
        llmkv__task_fn fn;
        void* arg;
#ifdef LLMKV__POLL
        if (LLMKV__LOAD(&pool->spin_ticks))
            llmkv__poll_change(&pool->generation, seen, &pool->stop, LLMKV__LOAD(&pool->spin_ticks));
#endif
        pthread_mutex_lock(&pool->mu);
        while (LLMKV__LOAD(&pool->generation) == seen && !LLMKV__LOAD(&pool->stop))
            pthread_cond_wait(&pool->work, &pool->mu);
        if (LLMKV__LOAD(&pool->stop)) {
            pthread_mutex_unlock(&pool->mu);
            return NULL;
        }
        seen = LLMKV__LOAD(&pool->generation);
        if (!LLMKV__LOAD(&pool->open)) { /* the others finished it already */
            pthread_mutex_unlock(&pool->mu);
            continue;
        }
        LLMKV__STORE(&pool->active, LLMKV__LOAD(&pool->active) + 1u);
        fn = pool->fn;
        arg = pool->arg;
        pthread_mutex_unlock(&pool->mu);
        fn(arg, ith);
        pthread_mutex_lock(&pool->mu);
        LLMKV__STORE(&pool->active, LLMKV__LOAD(&pool->active) - 1u);
        if (LLMKV__LOAD(&pool->active) == 0) pthread_cond_signal(&pool->done);
        pthread_mutex_unlock(&pool->mu);
    }
}
#endif

/* Runs fn(arg, ith) on the caller (ith 0) and on every worker that joins
   before the caller's share is done, and returns when all of them are;
   `alone`: on the caller only, no worker woken. fn takes its work items
   through llmkv__pool_claim, so the items, and therefore the results, do
   not depend on who joined. */
static void llmkv__pool_run(llmkv_threadpool* pool, llmkv__task_fn fn, void* arg, int alone) {
    (void)alone; /* unused without threads */
    LLMKV__STORE(&pool->next, 0u);
#ifndef LLMKV_NO_THREADS
    if (pool->n > 1 && !alone) {
        pthread_mutex_lock(&pool->mu);
        pool->fn = fn;
        pool->arg = arg;
        LLMKV__STORE(&pool->open, 1u);
        LLMKV__STORE(&pool->generation, LLMKV__LOAD(&pool->generation) + 1u);
        pthread_cond_broadcast(&pool->work);
        pthread_mutex_unlock(&pool->mu);
        fn(arg, 0); /* returns once every item is taken */
        pthread_mutex_lock(&pool->mu);
        LLMKV__STORE(&pool->open, 0u); /* no one joins from now on */
#ifdef LLMKV__POLL
        if (LLMKV__LOAD(&pool->active) && LLMKV__LOAD(&pool->spin_ticks)) {
            pthread_mutex_unlock(&pool->mu);
            llmkv__poll_zero(&pool->active, LLMKV__LOAD(&pool->spin_ticks));
            pthread_mutex_lock(&pool->mu);
        }
#endif
        while (LLMKV__LOAD(&pool->active)) pthread_cond_wait(&pool->done, &pool->mu);
        pthread_mutex_unlock(&pool->mu);
        return;
    }
#endif
    fn(arg, 0);
}

LLMKV_API llmkv_result llmkv_threadpool_create(uint32_t n_threads, const llmkv_allocator* allocator,
                                               llmkv_threadpool** out) {
    llmkv_allocator a;
    llmkv_threadpool* pool;
    if (!out) return LLMKV_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (n_threads == 0 || n_threads > 256) return LLMKV_ERR_INVALID_ARGUMENT;
    if (allocator && !allocator->alloc != !allocator->free) return LLMKV_ERR_INVALID_ARGUMENT;
    a = llmkv__allocator_or_default(allocator);
#ifdef LLMKV_NO_THREADS
    if (n_threads > 1) return LLMKV_ERR_UNSUPPORTED;
#endif
    pool = (llmkv_threadpool*)a.alloc(sizeof *pool, LLMKV__ALIGN, a.user);
    if (!pool) return LLMKV_ERR_OUT_OF_MEMORY;
    memset(pool, 0, sizeof *pool);
    pool->alloc = a;
    pool->n = n_threads;
#ifdef LLMKV__POLL
    pool->spin_ticks = LLMKV__DEFAULT_SPIN_US * llmkv__ticks_per_us();
#endif
#ifndef LLMKV_NO_THREADS
    if (n_threads > 1) {
        /* One block: the thread handles, then each worker's argument. */
        size_t bytes = (n_threads - 1) * (sizeof(pthread_t) + sizeof(llmkv__worker_arg));
        llmkv__worker_arg* args;
        uint32_t i, started = 0;
        pool->threads = (pthread_t*)a.alloc(bytes, LLMKV__ALIGN, a.user);
        if (!pool->threads) { a.free(pool, sizeof *pool, a.user); return LLMKV_ERR_OUT_OF_MEMORY; }
        pool->threads_bytes = bytes;
        args = (llmkv__worker_arg*)(void*)(pool->threads + (n_threads - 1));
        if (pthread_mutex_init(&pool->mu, NULL) != 0) goto no_sync;
        if (pthread_cond_init(&pool->work, NULL) != 0) { pthread_mutex_destroy(&pool->mu); goto no_sync; }
        if (pthread_cond_init(&pool->done, NULL) != 0) {
            pthread_cond_destroy(&pool->work);
            pthread_mutex_destroy(&pool->mu);
            goto no_sync;
        }
        for (i = 0; i + 1 < n_threads; ++i) {
            args[i].pool = pool;
            args[i].ith = i + 1;
            if (pthread_create(&pool->threads[i], NULL, llmkv__worker, &args[i]) != 0) break;
            started++;
        }
        if (started + 1 < n_threads) {
            pool->n = started + 1;
            llmkv_threadpool_destroy(pool);
            return LLMKV_ERR_OUT_OF_MEMORY;
        }
        goto ok;
    no_sync:
        a.free(pool->threads, bytes, a.user);
        a.free(pool, sizeof *pool, a.user);
        return LLMKV_ERR_OUT_OF_MEMORY;
    }
ok:
#endif
    *out = pool;
    return LLMKV_OK;
}

LLMKV_API void llmkv_threadpool_destroy(llmkv_threadpool* pool) {
    llmkv_allocator a;
    if (!pool) return;
    a = pool->alloc;
#ifndef LLMKV_NO_THREADS
    if (pool->threads) {
        uint32_t i;
        pthread_mutex_lock(&pool->mu);
        LLMKV__STORE(&pool->stop, 1u);
        pthread_cond_broadcast(&pool->work);
        pthread_mutex_unlock(&pool->mu);
        for (i = 0; i + 1 < pool->n; ++i) pthread_join(pool->threads[i], NULL);
        pthread_cond_destroy(&pool->done);
        pthread_cond_destroy(&pool->work);
        pthread_mutex_destroy(&pool->mu);
        a.free(pool->threads, pool->threads_bytes, a.user);
    }
#endif
    if (pool->workspace) a.free(pool->workspace, pool->workspace_size, a.user);
    a.free(pool, sizeof *pool, a.user);
}

LLMKV_API llmkv_result llmkv_threadpool_set_spin(llmkv_threadpool* pool, uint32_t microseconds) {
    if (!pool || microseconds > 1000000u) return LLMKV_ERR_INVALID_ARGUMENT;
#ifdef LLMKV__POLL
    LLMKV__STORE(&pool->spin_ticks, (uint64_t)microseconds * llmkv__ticks_per_us());
#endif
    return LLMKV_OK;
}

typedef struct llmkv__attn_task { const llmkv__job* jb; llmkv_threadpool* pool; float* ws; } llmkv__attn_task;

/* The built-in pool's tasks: units (merge: split groups) in walk order,
   each computed by whichever thread claims its number. A unit's result
   does not depend on the thread that computes it, so the output is the
   same whoever joins. */
static void llmkv__task_claimed(const llmkv__attn_task* t, int merge) {
    llmkv__walk w;
    uint32_t i = 0, want = llmkv__pool_claim(t->pool);
    memset(&w, 0, sizeof w);
    while (llmkv__walk_next(t->jb, &w)) {
        if (merge && (w.u.n_splits <= 1 || w.u.split != 0)) continue;
        if (i++ != want) continue;
        if (merge) llmkv__merge_unit(t->jb, &w.u, t->ws);
        else llmkv__run_unit(t->jb, &w.u, t->ws);
        want = llmkv__pool_claim(t->pool);
    }
}

static void llmkv__task_part(void* arg, uint32_t ith) {
    (void)ith;
    llmkv__task_claimed((const llmkv__attn_task*)arg, 0);
}

static void llmkv__task_merge(void* arg, uint32_t ith) {
    (void)ith;
    llmkv__task_claimed((const llmkv__attn_task*)arg, 1);
}

LLMKV_API llmkv_result llmkv_attend(const llmkv_cache* cache, const llmkv_batch* batch, const llmkv_attn_desc* desc,
                                    llmkv_threadpool* pool) {
    llmkv__job jb;
    llmkv__attn_task task;
    size_t need;
    llmkv_result r = llmkv__attn_prepare(cache, batch, desc, pool ? pool->n : 1, &jb);
    if (r != LLMKV_OK) return r;
    if (!pool) {
        llmkv__attn_part(&jb, 0, NULL); /* one thread never splits */
        return LLMKV_OK;
    }
    need = (size_t)(llmkv__attn_ws_floats(&jb) * sizeof(float));
    if (need > pool->workspace_size) {
        void* ws = pool->alloc.alloc(need, LLMKV__ALIGN, pool->alloc.user);
        if (!ws) return LLMKV_ERR_OUT_OF_MEMORY;
        if (pool->workspace) pool->alloc.free(pool->workspace, pool->workspace_size, pool->alloc.user);
        pool->workspace = ws;
        pool->workspace_size = need;
    }
    task.jb = &jb;
    task.pool = pool;
    task.ws = (float*)pool->workspace;
    {
        llmkv__walk w;
        uint64_t cost = 0;
        int alone;
        memset(&w, 0, sizeof w);
        while (llmkv__walk_next(&jb, &w) && cost < LLMKV__POOL_MIN_COST) cost += llmkv__unit_cost(&jb, &w.u);
        alone = cost < LLMKV__POOL_MIN_COST;
        llmkv__pool_run(pool, llmkv__task_part, &task, alone);
        if (need) llmkv__pool_run(pool, llmkv__task_merge, &task, alone);
    }
    return LLMKV_OK;
}

/* LLMKV_ATTN_DONE */

/* ------------------------------------------------------------------------ */
/* Persistence: save, load, checkpoints, export, import (docs/FORMAT.md)    */
/* ------------------------------------------------------------------------ */

#if !defined(LLMKV_NO_FILE_IO) && (defined(__unix__) || defined(__unix) || defined(__APPLE__))
#define LLMKV__POSIX_FILES 1
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#endif

#define LLMKV__HEADER_BYTES 64u
#define LLMKV__SECTION_HEAD 16u   /* tag, flags, body bytes */
#define LLMKV__SECTION_TAIL 8u    /* CRC-32C, zero */
#define LLMKV__IO_BUFFER ((size_t)1 << 20)
#define LLMKV__FLAG_PAGES 1u      /* header flag: the file holds page bytes */

enum { LLMKV__KIND_CACHE = 1, LLMKV__KIND_INCREMENT = 2, LLMKV__KIND_SEQ = 3 };

/* Section tags: four ASCII characters, the first in the lowest byte. */
#define LLMKV__TAG(a, b, c, d) ((uint32_t)(a) | (uint32_t)(b) << 8 | (uint32_t)(c) << 16 | (uint32_t)(d) << 24)
#define LLMKV__T_CONF LLMKV__TAG('C', 'O', 'N', 'F')
#define LLMKV__T_STAT LLMKV__TAG('S', 'T', 'A', 'T')
#define LLMKV__T_REFC LLMKV__TAG('R', 'E', 'F', 'C')
#define LLMKV__T_FREE LLMKV__TAG('F', 'R', 'E', 'E')
#define LLMKV__T_SEQS LLMKV__TAG('S', 'E', 'Q', 'S')
#define LLMKV__T_TABL LLMKV__TAG('T', 'A', 'B', 'L')
#define LLMKV__T_WRIT LLMKV__TAG('W', 'R', 'I', 'T')
#define LLMKV__T_TOKS LLMKV__TAG('T', 'O', 'K', 'S')
#define LLMKV__T_NODE LLMKV__TAG('N', 'O', 'D', 'E')
#define LLMKV__T_HEAD LLMKV__TAG('H', 'E', 'A', 'D')
#define LLMKV__T_PINS LLMKV__TAG('P', 'I', 'N', 'S')
#define LLMKV__T_KFIL LLMKV__TAG('K', 'F', 'I', 'L')
#define LLMKV__T_STAG LLMKV__TAG('S', 'T', 'A', 'G')
#define LLMKV__T_COPY LLMKV__TAG('C', 'O', 'P', 'Y')
#define LLMKV__T_PIDS LLMKV__TAG('P', 'I', 'D', 'S')
#define LLMKV__T_PDAT LLMKV__TAG('P', 'D', 'A', 'T')
#define LLMKV__T_SEQ1 LLMKV__TAG('S', 'E', 'Q', ' ')
#define LLMKV__T_END LLMKV__TAG('E', 'N', 'D', ' ')

#define LLMKV__CONF_BYTES 72u
#define LLMKV__STAT_BYTES 88u
#define LLMKV__SEQ_RECORD 48u
#define LLMKV__NODE_RECORD 72u
#define LLMKV__PIN_RECORD 16u
#define LLMKV__COPY_RECORD 12u
#define LLMKV__SEQ1_BYTES 24u
#define LLMKV__END_BYTES 24u

static const unsigned char llmkv__magic[8] = {0x89, 'L', 'L', 'M', 'K', 'V', '\r', '\n'};

static int llmkv__little_endian(void) {
    const uint16_t one = 1;
    unsigned char b;
    memcpy(&b, &one, 1);
    return b == 1;
}

static void llmkv__wr32(unsigned char* p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}
static void llmkv__wr64(unsigned char* p, uint64_t v) {
    llmkv__wr32(p, (uint32_t)v);
    llmkv__wr32(p + 4, (uint32_t)(v >> 32));
}
static uint32_t llmkv__rd32(const unsigned char* p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t llmkv__rd64(const unsigned char* p) { return llmkv__rd32(p) | (uint64_t)llmkv__rd32(p + 4) << 32; }

/* --- CRC-32C (Castagnoli): SSE4.2 where the machine has it, else
   slicing-by-8 tables built per call (8 KiB; no global state). The
   register runs uninverted here: a checksum is ~update(~0, data). */

typedef struct llmkv__crc32c {
    uint32_t t[8][256];
    int hw;
} llmkv__crc32c;

#ifdef LLMKV__X86
__attribute__((target("sse4.2"))) static uint32_t llmkv__crc_sse42(uint32_t crc, const unsigned char* p, size_t n) {
    uint64_t c = crc;
    for (; n && ((uintptr_t)p & 7); --n) c = _mm_crc32_u8((uint32_t)c, *p++);
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        c = _mm_crc32_u64(c, w);
    }
    for (; n; --n) c = _mm_crc32_u8((uint32_t)c, *p++);
    return (uint32_t)c;
}
#endif

static void llmkv__crc_init(llmkv__crc32c* c) {
    uint32_t i, j, k;
    c->hw = 0;
#ifdef LLMKV__X86
    {
        unsigned a, b, cx, d;
        c->hw = __get_cpuid(1, &a, &b, &cx, &d) && (cx & (1u << 20)); /* SSE4.2 */
    }
#endif
    if (c->hw) return; /* the tables serve the software path only */
    for (i = 0; i < 256; ++i) {
        uint32_t x = i;
        for (k = 0; k < 8; ++k) x = x & 1 ? (x >> 1) ^ 0x82F63B78u : x >> 1;
        c->t[0][i] = x;
    }
    for (i = 0; i < 256; ++i)
        for (j = 1; j < 8; ++j) c->t[j][i] = (c->t[j - 1][i] >> 8) ^ c->t[0][c->t[j - 1][i] & 0xff];
}

static uint32_t llmkv__crc_update(const llmkv__crc32c* c, uint32_t crc, const void* data, size_t n) {
    const unsigned char* p = (const unsigned char*)data;
#ifdef LLMKV__X86
    if (c->hw) return llmkv__crc_sse42(crc, p, n);
#endif
    for (; n && ((uintptr_t)p & 7); --n) crc = c->t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    for (; n >= 8; n -= 8, p += 8) {
        uint32_t lo = llmkv__rd32(p) ^ crc, hi = llmkv__rd32(p + 4);
        crc = c->t[7][lo & 0xff] ^ c->t[6][(lo >> 8) & 0xff] ^ c->t[5][(lo >> 16) & 0xff] ^ c->t[4][lo >> 24] ^
              c->t[3][hi & 0xff] ^ c->t[2][(hi >> 8) & 0xff] ^ c->t[1][(hi >> 16) & 0xff] ^ c->t[0][hi >> 24];
    }
    for (; n; --n) crc = c->t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

/* A file's identity: its parent's identity folded with every section's
   checksum (never 0). */
static uint64_t llmkv__fold(uint64_t h, uint32_t crc) {
    h ^= crc;
    h *= 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 29);
}
static uint64_t llmkv__identity(uint64_t parent, uint64_t fold) {
    uint64_t h = fold ^ parent * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
    h *= 0x94D049BB133111EBull;
    h ^= h >> 29;
    return h ? h : 1;
}

/* --- POSIX files (the defaults of llmkv_file_ops) ----------------------- */

#ifdef LLMKV__POSIX_FILES
static void* llmkv__px_open(const char* path, int flags) {
    int fd;
#ifdef O_CLOEXEC
    flags |= O_CLOEXEC;
#endif
    do fd = open(path, flags, 0644);
    while (fd < 0 && errno == EINTR);
    return fd < 0 ? NULL : (void*)(intptr_t)(fd + 1);
}
static int llmkv__px_fd(void* f) { return (int)((intptr_t)f - 1); }
static void* llmkv__px_open_write(void* user, const char* path) {
    (void)user;
    return llmkv__px_open(path, O_WRONLY | O_CREAT | O_TRUNC);
}
static void* llmkv__px_open_read(void* user, const char* path) {
    (void)user;
    return llmkv__px_open(path, O_RDONLY);
}
static int llmkv__px_write(void* user, void* f, const void* data, size_t n) {
    const char* p = (const char*)data;
    (void)user;
    while (n) {
        ssize_t w = write(llmkv__px_fd(f), p, n > ((size_t)1 << 30) ? (size_t)1 << 30 : n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}
static int llmkv__px_read(void* user, void* f, void* data, size_t n, size_t* got) {
    char* p = (char*)data;
    (void)user;
    *got = 0;
    while (n) {
        ssize_t r = read(llmkv__px_fd(f), p, n > ((size_t)1 << 30) ? (size_t)1 << 30 : n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) return -1;
        if (r == 0) break;
        p += r;
        n -= (size_t)r;
        *got += (size_t)r;
    }
    return 0;
}
static int llmkv__px_sync(void* user, void* f) {
    (void)user;
    return fsync(llmkv__px_fd(f));
}
static int llmkv__px_close(void* user, void* f) {
    (void)user;
    return close(llmkv__px_fd(f)); /* not retried on EINTR: the descriptor is gone either way */
}
static int llmkv__px_rename(void* user, const char* from, const char* to) {
    (void)user;
    return rename(from, to);
}
static int llmkv__px_remove(void* user, const char* path) {
    (void)user;
    return unlink(path);
}
/* Flushes the directory entry of `path`: its directory, opened read-only.
   File systems that cannot sync a directory (EINVAL) count as done. */
static int llmkv__px_sync_dir(void* user, const char* path) {
    char dir[4096];
    size_t n = strlen(path);
    int fd, r;
    (void)user;
    while (n > 0 && path[n - 1] != '/') --n;
    if (n == 0) {
        dir[0] = '.';
        dir[1] = 0;
    } else {
        if (n >= sizeof dir) return -1;
        memcpy(dir, path, n);
        dir[n] = 0;
    }
    do fd = open(dir, O_RDONLY);
    while (fd < 0 && errno == EINTR);
    if (fd < 0) return -1;
    r = fsync(fd);
    if (r != 0 && (errno == EINVAL || errno == EROFS)) r = 0;
    close(fd);
    return r;
}
#endif

/* The caller's operations, with the POSIX default for every NULL member.
   Returns 0 when a needed member has no default (no POSIX files here). */
static int llmkv__file_ops(const llmkv_file_ops* in, llmkv_file_ops* out) {
    memset(out, 0, sizeof *out);
    if (in) *out = *in;
#ifdef LLMKV__POSIX_FILES
    if (!out->open_write) out->open_write = llmkv__px_open_write;
    if (!out->write) out->write = llmkv__px_write;
    if (!out->sync) out->sync = llmkv__px_sync;
    if (!out->close) out->close = llmkv__px_close;
    if (!out->rename) out->rename = llmkv__px_rename;
    if (!out->sync_dir) out->sync_dir = llmkv__px_sync_dir;
    if (!out->remove) out->remove = llmkv__px_remove;
    if (!out->open_read) out->open_read = llmkv__px_open_read;
    if (!out->read) out->read = llmkv__px_read;
#endif
    return out->open_write && out->write && out->sync && out->close && out->rename && out->sync_dir && out->remove &&
           out->open_read && out->read;
}

/* --- Writing: a sink counts, fills a buffer or writes a file ------------ */

typedef struct llmkv__sink {
    const llmkv__crc32c* crc_t;  /* NULL: only count */
    unsigned char* mem;          /* memory target */
    const llmkv_file_ops* ops;   /* file target */
    void* file;
    unsigned char* buf;          /* file: write buffer */
    size_t buf_len;
    uint64_t pos;                /* bytes emitted */
    uint64_t sec_end;            /* end of the open section's body */
    uint32_t crc;                /* register of the open section */
    uint32_t n_sections;
    uint64_t fold;
    int failed;                  /* a file write failed */
} llmkv__sink;

static void llmkv__sink_flush(llmkv__sink* s) {
    if (s->buf_len && !s->failed && s->ops->write(s->ops->user, s->file, s->buf, s->buf_len) != 0) s->failed = 1;
    s->buf_len = 0;
}

static void llmkv__emit(llmkv__sink* s, const void* p, size_t n) {
    if (s->crc_t) s->crc = llmkv__crc_update(s->crc_t, s->crc, p, n);
    if (s->mem) {
        memcpy(s->mem + s->pos, p, n);
    } else if (s->file && !s->failed) {
        if (s->buf_len + n > LLMKV__IO_BUFFER) llmkv__sink_flush(s);
        if (n >= LLMKV__IO_BUFFER / 2) {
            if (!s->failed && s->ops->write(s->ops->user, s->file, p, n) != 0) s->failed = 1;
        } else {
            memcpy(s->buf + s->buf_len, p, n);
            s->buf_len += n;
        }
    }
    s->pos += n;
}

static void llmkv__emit32(llmkv__sink* s, uint32_t v) {
    unsigned char b[4];
    llmkv__wr32(b, v);
    llmkv__emit(s, b, 4);
}

static void llmkv__sec_begin(llmkv__sink* s, uint32_t tag, uint64_t bytes) {
    unsigned char h[LLMKV__SECTION_HEAD];
    llmkv__wr32(h, tag);
    llmkv__wr32(h + 4, 0);
    llmkv__wr64(h + 8, bytes);
    s->crc = 0xffffffffu;
    llmkv__emit(s, h, sizeof h);
    s->sec_end = s->pos + bytes;
}

static void llmkv__sec_end(llmkv__sink* s) {
    unsigned char t[LLMKV__SECTION_TAIL];
    uint32_t crc = ~s->crc;
    LLMKV_ASSERT(s->pos == s->sec_end);
    llmkv__wr32(t, crc);
    llmkv__wr32(t + 4, 0);
    llmkv__emit(s, t, sizeof t);
    s->fold = llmkv__fold(s->fold, crc);
    s->n_sections++;
}

/* A section whose body is one array already in memory. */
static void llmkv__sec_array(llmkv__sink* s, uint32_t tag, const void* p, uint64_t bytes) {
    llmkv__sec_begin(s, tag, bytes);
    llmkv__emit(s, p, (size_t)bytes);
    llmkv__sec_end(s);
}

static void llmkv__emit_header(llmkv__sink* s, uint32_t kind, uint32_t flags, uint64_t total, uint64_t parent) {
    unsigned char h[LLMKV__HEADER_BYTES];
    const llmkv__crc32c* ct = s->crc_t;
    memset(h, 0, sizeof h);
    memcpy(h, llmkv__magic, 8);
    h[8] = LLMKV_FORMAT_MAJOR;
    h[10] = LLMKV_FORMAT_MINOR;
    llmkv__wr32(h + 12, kind);
    llmkv__wr32(h + 16, LLMKV__HEADER_BYTES);
    llmkv__wr32(h + 20, flags);
    llmkv__wr64(h + 24, total);
    llmkv__wr64(h + 32, parent);
    if (ct) llmkv__wr32(h + 60, ~llmkv__crc_update(ct, 0xffffffffu, h, 60));
    s->crc_t = NULL; /* the header is not part of any section */
    llmkv__emit(s, h, sizeof h);
    s->crc_t = ct;
}

static void llmkv__emit_end(llmkv__sink* s, uint64_t parent, uint64_t* id) {
    unsigned char b[LLMKV__END_BYTES];
    *id = llmkv__identity(parent, s->fold);
    llmkv__wr64(b, *id);
    llmkv__wr64(b + 8, parent);
    llmkv__wr32(b + 16, s->n_sections);
    llmkv__wr32(b + 20, 0);
    llmkv__sec_array(s, LLMKV__T_END, b, sizeof b);
}

static void llmkv__emit_conf(llmkv__sink* s, const llmkv_cache* kv) {
    const llmkv_desc* d = &kv->desc;
    unsigned char b[LLMKV__CONF_BYTES];
    uint32_t v[14], i;
    v[0] = d->n_layers;
    v[1] = d->n_kv_heads;
    v[2] = d->head_dim;
    v[3] = d->page_size;
    v[4] = d->n_pages;
    v[5] = (uint32_t)d->k_dtype;
    v[6] = (uint32_t)d->v_dtype;
    v[7] = (uint32_t)d->storage;
    v[8] = d->max_seqs;
    v[9] = d->max_seq_len;
    v[10] = d->max_pending_copies;
    v[11] = d->prefix_index;
    v[12] = d->max_pins;
    v[13] = d->thread_safe;
    for (i = 0; i < 14; ++i) llmkv__wr32(b + 4 * i, v[i]);
    llmkv__wr64(b + 56, kv->layout.page_bytes);
    llmkv__wr64(b + 64, 0);
    llmkv__sec_array(s, LLMKV__T_CONF, b, sizeof b);
}

/* The staging rows [0, used) a file holds for a page staged from position
   kf (NO_SLOT: none) of a sequence of `length` positions: the keys of the
   page's positions (later rows were never written). */
static uint32_t llmkv__stage_rows(uint32_t kf, uint32_t length, uint32_t page_size) {
    if (kf == LLMKV__NO_SLOT || kf >= length) return 0;
    return length - kf < page_size ? length - kf : page_size;
}
/* Bytes of `rows` staged rows of every head. */
static uint64_t llmkv__stage_rows_bytes(const llmkv_layout* l, uint32_t rows) {
    return (uint64_t)rows * l->n_kv_heads * l->head_dim * 2;
}
static uint32_t llmkv__staged_rows(const llmkv_cache* kv, uint32_t slot, uint32_t layer) {
    return llmkv__stage_rows(kv->kfill[(size_t)slot * kv->layout.n_layers + layer], kv->seqs[slot].length,
                             kv->layout.page_size);
}
static void llmkv__emit_staged(llmkv__sink* s, const llmkv_cache* kv, uint32_t slot, uint32_t layer) {
    const llmkv_layout* l = &kv->layout;
    uint32_t rows = llmkv__staged_rows(kv, slot, layer), h;
    for (h = 0; h < l->n_kv_heads && rows; ++h)
        llmkv__emit(s, llmkv__stage_block(kv, slot, layer) + (size_t)h * l->page_size * l->head_dim,
                    (size_t)rows * l->head_dim * 2);
}

/* Whether page p goes into a save: in use, and changed since the latest
   checkpoint when incremental. */
static int llmkv__page_saved(const llmkv_cache* kv, uint32_t p, int incremental) {
    return kv->refcount[p] && (!incremental || kv->dirty[p]);
}

/* Emits the whole cache (kind CACHE or INCREMENT) after the header. */
static void llmkv__emit_cache(llmkv__sink* s, const llmkv_cache* kv, int incremental, uint64_t parent, uint64_t* id) {
    const llmkv_layout* l = &kv->layout;
    const llmkv_desc* d = &kv->desc;
    uint32_t i, j, n = kv->n_pages, L = l->n_layers;
    uint64_t table_entries = 0, used = 0, staged_bytes = 0, saved = 0;
    unsigned char b[LLMKV__STAT_BYTES];
    for (i = 0; i < d->max_seqs; ++i)
        if (kv->seqs[i].live) {
            table_entries += kv->seqs[i].n_pages;
            for (j = 0; kv->kfill && j < L; ++j)
                staged_bytes += llmkv__stage_rows_bytes(l, llmkv__staged_rows(kv, i, j));
        }
    for (i = 0; i < n; ++i) {
        used += kv->refcount[i] != 0;
        saved += kv->pool && llmkv__page_saved(kv, i, incremental);
    }
    s->fold = 0;
    s->n_sections = 0;
    llmkv__emit_conf(s, kv);
    /* STAT: the cache's scalars */
    memset(b, 0, sizeof b);
    llmkv__wr32(b, kv->n_free);
    llmkv__wr32(b + 4, kv->n_live);
    llmkv__wr32(b + 8, kv->free_head);
    llmkv__wr32(b + 12, kv->free_tail);
    llmkv__wr32(b + 16, kv->lru_head);
    llmkv__wr32(b + 20, kv->lru_tail);
    llmkv__wr32(b + 24, kv->n_evictable);
    llmkv__wr32(b + 28, kv->n_cached);
    llmkv__wr32(b + 32, kv->n_pinned_pages);
    llmkv__wr32(b + 36, kv->pin_free);
    llmkv__wr32(b + 40, kv->n_pins);
    llmkv__wr32(b + 44, kv->copy_count);
    llmkv__wr64(b + 56, kv->epoch);
    llmkv__wr64(b + 64, kv->n_evictions);
    llmkv__wr64(b + 72, kv->tokens_matched);
    llmkv__wr64(b + 80, kv->tokens_missed);
    if (!kv->nodes) { /* the index's list heads mean nothing without it */
        llmkv__wr32(b + 16, LLMKV__NO_SLOT);
        llmkv__wr32(b + 20, LLMKV__NO_SLOT);
        llmkv__wr32(b + 36, LLMKV__NO_SLOT);
    }
    llmkv__sec_array(s, LLMKV__T_STAT, b, sizeof b);
    llmkv__sec_array(s, LLMKV__T_REFC, kv->refcount, (uint64_t)n * 4);
    llmkv__sec_array(s, LLMKV__T_FREE, kv->free_pages, (uint64_t)kv->n_free * 4);
    llmkv__sec_begin(s, LLMKV__T_SEQS, (uint64_t)d->max_seqs * LLMKV__SEQ_RECORD);
    for (i = 0; i < d->max_seqs; ++i) {
        const llmkv__seq* q = &kv->seqs[i];
        unsigned char r[LLMKV__SEQ_RECORD];
        llmkv__wr32(r, q->gen);
        llmkv__wr32(r + 4, q->live);
        llmkv__wr32(r + 8, q->length);
        llmkv__wr32(r + 12, q->n_pages);
        llmkv__wr32(r + 16, q->next_free);
        llmkv__wr32(r + 20, q->n_pub);
        llmkv__wr32(r + 24, q->tok_gap);
        llmkv__wr32(r + 28, 0);
        llmkv__wr64(r + 32, q->epoch);
        llmkv__wr64(r + 40, q->ns);
        llmkv__emit(s, r, sizeof r);
    }
    llmkv__sec_end(s);
    llmkv__sec_begin(s, LLMKV__T_TABL, table_entries * 4);
    for (i = 0; i < d->max_seqs; ++i)
        if (kv->seqs[i].live) llmkv__emit(s, llmkv__table(kv, i), (size_t)kv->seqs[i].n_pages * 4);
    llmkv__sec_end(s);
    if (kv->nodes) {
        llmkv__sec_begin(s, LLMKV__T_WRIT, (uint64_t)kv->n_live * L * 2 * 4);
        for (i = 0; i < d->max_seqs; ++i)
            if (kv->seqs[i].live) llmkv__emit(s, llmkv__written(kv, i), (size_t)L * 2 * 4);
        llmkv__sec_end(s);
        llmkv__sec_begin(s, LLMKV__T_TOKS, used * l->page_size * 4);
        for (i = 0; i < n; ++i)
            if (kv->refcount[i]) llmkv__emit(s, kv->tok + (size_t)i * l->page_size, (size_t)l->page_size * 4);
        llmkv__sec_end(s);
        llmkv__sec_begin(s, LLMKV__T_NODE, (uint64_t)kv->n_cached * LLMKV__NODE_RECORD);
        for (i = 0; i < n; ++i) {
            const llmkv__node* x = &kv->nodes[i];
            const llmkv__key* k = &kv->keys[i];
            unsigned char r[LLMKV__NODE_RECORD];
            if (!x->ntok) continue;
            llmkv__wr32(r, i);
            llmkv__wr32(r + 4, k->parent);
            llmkv__wr32(r + 8, x->ntok);
            llmkv__wr32(r + 12, x->n_children);
            llmkv__wr32(r + 16, x->pins);
            llmkv__wr32(r + 20, k->hash_full);
            llmkv__wr32(r + 24, (uint32_t)k->tok0);
            llmkv__wr32(r + 28, k->full_next);
            llmkv__wr32(r + 32, x->full_prev);
            llmkv__wr32(r + 36, x->first_next);
            llmkv__wr32(r + 40, x->first_prev);
            llmkv__wr32(r + 44, x->lru_next);
            llmkv__wr32(r + 48, x->lru_prev);
            llmkv__wr32(r + 52, 0);
            llmkv__wr64(r + 56, x->ns);
            llmkv__wr64(r + 64, x->chain);
            llmkv__emit(s, r, sizeof r);
        }
        llmkv__sec_end(s);
        llmkv__sec_array(s, LLMKV__T_HEAD, kv->heads, (uint64_t)kv->n_buckets * 2 * 4);
        llmkv__sec_begin(s, LLMKV__T_PINS, (uint64_t)d->max_pins * LLMKV__PIN_RECORD);
        for (i = 0; i < d->max_pins; ++i) {
            unsigned char r[LLMKV__PIN_RECORD];
            llmkv__wr32(r, kv->pins[i].gen);
            llmkv__wr32(r + 4, kv->pins[i].live);
            llmkv__wr32(r + 8, kv->pins[i].node);
            llmkv__wr32(r + 12, kv->pins[i].next_free);
            llmkv__emit(s, r, sizeof r);
        }
        llmkv__sec_end(s);
    }
    if (kv->kfill) {
        llmkv__sec_begin(s, LLMKV__T_KFIL, (uint64_t)kv->n_live * L * 4);
        for (i = 0; i < d->max_seqs; ++i)
            if (kv->seqs[i].live) llmkv__emit(s, kv->kfill + (size_t)i * L, (size_t)L * 4);
        llmkv__sec_end(s);
        llmkv__sec_begin(s, LLMKV__T_STAG, staged_bytes);
        for (i = 0; i < d->max_seqs; ++i)
            for (j = 0; kv->seqs[i].live && j < L; ++j) llmkv__emit_staged(s, kv, i, j);
        llmkv__sec_end(s);
    }
    if (kv->copies) {
        llmkv__sec_begin(s, LLMKV__T_COPY, (uint64_t)kv->copy_count * LLMKV__COPY_RECORD);
        for (i = 0; i < kv->copy_count; ++i) {
            const llmkv_copy_cmd* c = &kv->copies[(kv->copy_head + i) % kv->copy_cap];
            unsigned char r[LLMKV__COPY_RECORD];
            llmkv__wr32(r, c->src_page);
            llmkv__wr32(r + 4, c->dst_page);
            llmkv__wr32(r + 8, c->n_slots);
            llmkv__emit(s, r, sizeof r);
        }
        llmkv__sec_end(s);
    }
    if (kv->pool) {
        llmkv__sec_begin(s, LLMKV__T_PIDS, 4 + saved * 4);
        llmkv__emit32(s, (uint32_t)saved);
        for (i = 0; i < n; ++i)
            if (llmkv__page_saved(kv, i, incremental)) llmkv__emit32(s, i);
        llmkv__sec_end(s);
        llmkv__sec_begin(s, LLMKV__T_PDAT, saved * l->page_bytes);
        for (i = 0; i < n; ++i)
            if (llmkv__page_saved(kv, i, incremental))
                llmkv__emit(s, kv->pool + (size_t)i * l->page_bytes, (size_t)l->page_bytes);
        llmkv__sec_end(s);
    }
    llmkv__emit_end(s, parent, id);
}

/* Emits one sequence (kind SEQ) after the header. */
static void llmkv__emit_seq(llmkv__sink* s, const llmkv_cache* kv, uint32_t slot, uint64_t* id) {
    const llmkv_layout* l = &kv->layout;
    const llmkv__seq* q = &kv->seqs[slot];
    const uint32_t* t = llmkv__table(kv, slot);
    uint32_t j, L = l->n_layers;
    unsigned char b[LLMKV__SEQ1_BYTES];
    s->fold = 0;
    s->n_sections = 0;
    llmkv__emit_conf(s, kv);
    memset(b, 0, sizeof b);
    llmkv__wr32(b, q->length);
    llmkv__wr32(b + 4, q->n_pages);
    llmkv__wr64(b + 16, q->ns);
    llmkv__sec_array(s, LLMKV__T_SEQ1, b, sizeof b);
    if (kv->nodes) {
        llmkv__sec_array(s, LLMKV__T_WRIT, llmkv__written(kv, slot), (uint64_t)L * 2 * 4);
        llmkv__sec_begin(s, LLMKV__T_TOKS, (uint64_t)q->length * 4);
        for (j = 0; j < q->n_pages; ++j) {
            uint32_t n = q->length - j * l->page_size < l->page_size ? q->length - j * l->page_size : l->page_size;
            llmkv__emit(s, kv->tok + (size_t)t[j] * l->page_size, (size_t)n * 4);
        }
        llmkv__sec_end(s);
    }
    if (kv->kfill) {
        uint64_t staged = 0;
        llmkv__sec_array(s, LLMKV__T_KFIL, kv->kfill + (size_t)slot * L, (uint64_t)L * 4);
        for (j = 0; j < L; ++j) staged += llmkv__stage_rows_bytes(l, llmkv__staged_rows(kv, slot, j));
        llmkv__sec_begin(s, LLMKV__T_STAG, staged);
        for (j = 0; j < L; ++j) llmkv__emit_staged(s, kv, slot, j);
        llmkv__sec_end(s);
    }
    llmkv__sec_begin(s, LLMKV__T_PDAT, (uint64_t)q->n_pages * l->page_bytes);
    for (j = 0; j < q->n_pages; ++j) llmkv__emit(s, kv->pool + (size_t)t[j] * l->page_bytes, (size_t)l->page_bytes);
    llmkv__sec_end(s);
    llmkv__emit_end(s, 0, id);
}

/* What one save writes: the whole cache (slot NO_SLOT) or one sequence. */
typedef struct llmkv__save_job {
    const llmkv_cache* kv;
    uint32_t slot;
    int incremental;
    uint64_t parent;
} llmkv__save_job;

static void llmkv__emit_all(llmkv__sink* s, const llmkv__save_job* j, uint64_t total, uint64_t* id) {
    uint32_t kind = j->slot != LLMKV__NO_SLOT ? LLMKV__KIND_SEQ : j->incremental ? LLMKV__KIND_INCREMENT : LLMKV__KIND_CACHE;
    llmkv__emit_header(s, kind, j->kv->pool ? LLMKV__FLAG_PAGES : 0, total, j->parent);
    if (j->slot != LLMKV__NO_SLOT) llmkv__emit_seq(s, j->kv, j->slot, id);
    else llmkv__emit_cache(s, j->kv, j->incremental, j->parent, id);
}

static uint64_t llmkv__save_bytes(const llmkv__save_job* j) {
    llmkv__sink s;
    uint64_t id;
    memset(&s, 0, sizeof s);
    llmkv__emit_all(&s, j, 0, &id);
    return s.pos;
}

/* Validates a save request; fills the job. */
static llmkv_result llmkv__save_prepare(llmkv_cache* kv, uint32_t flags, llmkv__save_job* j) {
    memset(j, 0, sizeof *j);
    j->kv = kv;
    j->slot = LLMKV__NO_SLOT;
    if (flags & ~(uint32_t)(LLMKV_SAVE_CHECKPOINT | LLMKV_SAVE_INCREMENTAL)) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!llmkv__little_endian()) return LLMKV_ERR_UNSUPPORTED;
    j->incremental = (flags & LLMKV_SAVE_INCREMENTAL) != 0;
    if (j->incremental) {
        if (!kv->ckpt_id) {
            llmkv__log(&kv->desc.logger, LLMKV_LOG_ERROR, "llmkv: an incremental save needs an earlier checkpoint save");
            return LLMKV_ERR_INVALID_ARGUMENT;
        }
        j->parent = kv->ckpt_id;
    }
    return LLMKV_OK;
}

/* After a successful save: a checkpoint becomes the base of the next
   increment. */
static void llmkv__save_done(llmkv_cache* kv, uint32_t flags, uint64_t id) {
    if (!(flags & (LLMKV_SAVE_CHECKPOINT | LLMKV_SAVE_INCREMENTAL))) return;
    kv->ckpt_id = id;
    if (kv->dirty) memset(kv->dirty, 0, kv->n_pages);
}

static llmkv_result llmkv__save_mem(const llmkv__save_job* j, void* buffer, size_t size, size_t* written,
                                    uint64_t* id) {
    llmkv__sink s;
    llmkv__crc32c ct;
    uint64_t total = llmkv__save_bytes(j);
    if (total > size) return LLMKV_ERR_BUFFER_TOO_SMALL;
    llmkv__crc_init(&ct);
    memset(&s, 0, sizeof s);
    s.crc_t = &ct;
    s.mem = (unsigned char*)buffer;
    llmkv__emit_all(&s, j, total, id);
    LLMKV_ASSERT(s.pos == total);
    if (written) *written = (size_t)total;
    return LLMKV_OK;
}

/* "<path>.tmp" in memory from the allocator. */
static char* llmkv__tmp_name(const llmkv_allocator* a, const char* path, size_t* bytes) {
    size_t n = strlen(path);
    char* t;
    *bytes = n + 5;
    t = (char*)a->alloc(*bytes, 1, a->user);
    if (!t) return NULL;
    memcpy(t, path, n);
    memcpy(t + n, ".tmp", 5);
    return t;
}

/* Writes the job to `path` crash-safely: a temporary, fsync, rename,
   then the directory. On failure the temporary is removed (when it can
   be) and the file at `path` is untouched. */
static llmkv_result llmkv__save_file(const llmkv__save_job* j, const char* path, const llmkv_file_ops* user_ops,
                                     const llmkv_allocator* a, const llmkv_logger* lg, uint64_t* id) {
    llmkv_file_ops ops;
    llmkv__sink s;
    llmkv__crc32c* ct;
    char* tmp;
    size_t tmp_bytes;
    uint64_t total;
    const char* step = NULL;
    if (!llmkv__file_ops(user_ops, &ops)) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: no file operations in this build (pass llmkv_file_ops)");
        return LLMKV_ERR_UNSUPPORTED;
    }
    total = llmkv__save_bytes(j);
    tmp = llmkv__tmp_name(a, path, &tmp_bytes);
    ct = (llmkv__crc32c*)a->alloc(sizeof *ct, LLMKV__ALIGN, a->user);
    memset(&s, 0, sizeof s);
    s.buf = (unsigned char*)a->alloc(LLMKV__IO_BUFFER, LLMKV__ALIGN, a->user);
    if (!tmp || !ct || !s.buf) {
        if (tmp) a->free(tmp, tmp_bytes, a->user);
        if (ct) a->free(ct, sizeof *ct, a->user);
        if (s.buf) a->free(s.buf, LLMKV__IO_BUFFER, a->user);
        return LLMKV_ERR_OUT_OF_MEMORY;
    }
    llmkv__crc_init(ct);
    s.crc_t = ct;
    s.ops = &ops;
    s.file = ops.open_write(ops.user, tmp);
    if (!s.file) {
        step = "create";
    } else {
        llmkv__emit_all(&s, j, total, id);
        llmkv__sink_flush(&s);
        if (s.failed) step = "write";
        else if (ops.sync(ops.user, s.file) != 0) step = "flush (fsync)";
        if (ops.close(ops.user, s.file) != 0 && !step) step = "close";
        if (!step && ops.rename(ops.user, tmp, path) != 0) step = "rename";
        if (step) ops.remove(ops.user, tmp);
        else if (ops.sync_dir(ops.user, path) != 0) step = "flush the directory of";
    }
    if (step) llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: cannot %s %s", step, step[0] == 'r' || step[0] == 'f' ? path : tmp);
    a->free(tmp, tmp_bytes, a->user);
    a->free(ct, sizeof *ct, a->user);
    a->free(s.buf, LLMKV__IO_BUFFER, a->user);
    return step ? LLMKV_ERR_IO : LLMKV_OK;
}

static llmkv_result llmkv__cache_save_size_unlocked(llmkv_cache* cache, uint32_t flags, uint64_t* bytes) {
    llmkv__save_job j;
    llmkv_result r;
    if (bytes) *bytes = 0;
    if (!cache || !bytes) return LLMKV_ERR_INVALID_ARGUMENT;
    if ((r = llmkv__save_prepare(cache, flags, &j)) != LLMKV_OK) return r;
    *bytes = llmkv__save_bytes(&j);
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_cache_save_size(llmkv_cache* cache, uint32_t flags, uint64_t* bytes) {
    LLMKV__RETURN_LOCKED(cache, llmkv__cache_save_size_unlocked(cache, flags, bytes));
}

static llmkv_result llmkv__cache_save_mem_unlocked(llmkv_cache* cache, uint32_t flags, void* buffer, size_t size,
                                                   size_t* written) {
    llmkv__save_job j;
    llmkv_result r;
    uint64_t id = 0;
    if (written) *written = 0;
    if (!cache || !buffer) return LLMKV_ERR_INVALID_ARGUMENT;
    if ((r = llmkv__save_prepare(cache, flags, &j)) != LLMKV_OK) return r;
    if ((r = llmkv__save_mem(&j, buffer, size, written, &id)) != LLMKV_OK) return r;
    llmkv__save_done(cache, flags, id);
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_cache_save_mem(llmkv_cache* cache, uint32_t flags, void* buffer, size_t size,
                                            size_t* written) {
    LLMKV__RETURN_LOCKED(cache, llmkv__cache_save_mem_unlocked(cache, flags, buffer, size, written));
}

static llmkv_result llmkv__cache_save_file_unlocked(llmkv_cache* cache, uint32_t flags, const char* path,
                                                    const llmkv_file_ops* ops) {
    llmkv__save_job j;
    llmkv_result r;
    uint64_t id = 0;
    if (!cache || !path) return LLMKV_ERR_INVALID_ARGUMENT;
    if ((r = llmkv__save_prepare(cache, flags, &j)) != LLMKV_OK) return r;
    r = llmkv__save_file(&j, path, ops, &cache->alloc, &cache->desc.logger, &id);
    if (r == LLMKV_OK) llmkv__save_done(cache, flags, id);
    return r;
}

LLMKV_API llmkv_result llmkv_cache_save_file(llmkv_cache* cache, uint32_t flags, const char* path,
                                             const llmkv_file_ops* ops) {
    LLMKV__RETURN_LOCKED(cache, llmkv__cache_save_file_unlocked(cache, flags, path, ops));
}

/* Validates an export request; fills the job. */
static llmkv_result llmkv__export_prepare(llmkv_cache* kv, llmkv_seq seq, llmkv__save_job* j) {
    uint32_t slot;
    memset(j, 0, sizeof *j);
    j->kv = kv;
    if (!llmkv__lookup(kv, seq, &slot)) return LLMKV_ERR_STALE_HANDLE;
    if (!kv->pool) return LLMKV_ERR_NO_PAGE_DATA;
    if (!llmkv__little_endian()) return LLMKV_ERR_UNSUPPORTED;
    j->slot = slot;
    return LLMKV_OK;
}

static llmkv_result llmkv__seq_export_size_unlocked(llmkv_cache* cache, llmkv_seq seq, uint64_t* bytes) {
    llmkv__save_job j;
    llmkv_result r;
    if (bytes) *bytes = 0;
    if (!cache || !bytes) return LLMKV_ERR_INVALID_ARGUMENT;
    if ((r = llmkv__export_prepare(cache, seq, &j)) != LLMKV_OK) return r;
    *bytes = llmkv__save_bytes(&j);
    return LLMKV_OK;
}

LLMKV_API llmkv_result llmkv_seq_export_size(llmkv_cache* cache, llmkv_seq seq, uint64_t* bytes) {
    LLMKV__RETURN_LOCKED(cache, llmkv__seq_export_size_unlocked(cache, seq, bytes));
}

static llmkv_result llmkv__seq_export_unlocked(llmkv_cache* cache, llmkv_seq seq, void* buffer, size_t size,
                                               size_t* written) {
    llmkv__save_job j;
    llmkv_result r;
    uint64_t id;
    if (written) *written = 0;
    if (!cache || !buffer) return LLMKV_ERR_INVALID_ARGUMENT;
    if ((r = llmkv__export_prepare(cache, seq, &j)) != LLMKV_OK) return r;
    return llmkv__save_mem(&j, buffer, size, written, &id);
}

LLMKV_API llmkv_result llmkv_seq_export(llmkv_cache* cache, llmkv_seq seq, void* buffer, size_t size,
                                        size_t* written) {
    LLMKV__RETURN_LOCKED(cache, llmkv__seq_export_unlocked(cache, seq, buffer, size, written));
}

static llmkv_result llmkv__seq_export_file_unlocked(llmkv_cache* cache, llmkv_seq seq, const char* path,
                                                    const llmkv_file_ops* ops) {
    llmkv__save_job j;
    llmkv_result r;
    uint64_t id;
    if (!cache || !path) return LLMKV_ERR_INVALID_ARGUMENT;
    if ((r = llmkv__export_prepare(cache, seq, &j)) != LLMKV_OK) return r;
    return llmkv__save_file(&j, path, ops, &cache->alloc, &cache->desc.logger, &id);
}

LLMKV_API llmkv_result llmkv_seq_export_file(llmkv_cache* cache, llmkv_seq seq, const char* path,
                                             const llmkv_file_ops* ops) {
    LLMKV__RETURN_LOCKED(cache, llmkv__seq_export_file_unlocked(cache, seq, path, ops));
}

/* --- Reading: a source is a memory buffer or a file --------------------- */

typedef struct llmkv__src {
    const llmkv__crc32c* crc_t;
    const unsigned char* mem;   /* memory source of `size` bytes */
    uint64_t size;
    const llmkv_file_ops* ops;  /* file source */
    void* file;
    unsigned char* buf;         /* file: read buffer */
    size_t buf_len, buf_pos;
    uint64_t pos, limit;        /* bytes consumed; the header's total */
    uint64_t sec_end;
    uint32_t crc, n_sections;
    int in_sec;
    uint64_t fold;
    llmkv_result err;           /* the first failure */
    const llmkv_logger* lg;
    uint32_t index;             /* which input of a load, for messages */
} llmkv__src;

/* Records the first failure of a read (with a message for the logger) and
   returns 0. */
static int llmkv__bad(llmkv__src* r, llmkv_result code, const char* fmt, ...) {
    char msg[200];
    va_list ap;
    if (r->err != LLMKV_OK) return 0;
    r->err = code;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    llmkv__log(r->lg, LLMKV_LOG_ERROR, "llmkv: input %u: %s", r->index, msg);
    return 0;
}

/* A tag as text, for messages. */
typedef struct llmkv__tagname { char s[5]; } llmkv__tagname;
static llmkv__tagname llmkv__tag_text(uint32_t tag) {
    llmkv__tagname t;
    int i;
    for (i = 0; i < 4; ++i) {
        char c = (char)(tag >> (8 * i) & 0xff);
        t.s[i] = c >= 32 && c < 127 ? c : '?';
    }
    t.s[4] = 0;
    return t;
}

static int llmkv__tag_known(uint32_t tag) {
    static const uint32_t known[] = {LLMKV__T_CONF, LLMKV__T_STAT, LLMKV__T_REFC, LLMKV__T_FREE, LLMKV__T_SEQS,
                                     LLMKV__T_TABL, LLMKV__T_WRIT, LLMKV__T_TOKS, LLMKV__T_NODE, LLMKV__T_HEAD,
                                     LLMKV__T_PINS, LLMKV__T_KFIL, LLMKV__T_STAG, LLMKV__T_COPY, LLMKV__T_PIDS,
                                     LLMKV__T_PDAT, LLMKV__T_SEQ1, LLMKV__T_END};
    size_t i;
    for (i = 0; i < sizeof known / sizeof known[0]; ++i)
        if (known[i] == tag) return 1;
    return 0;
}

/* n bytes of the input into dst, without checksum or bounds (the caller
   checked them). */
static int llmkv__src_raw(llmkv__src* r, void* dst, size_t n) {
    unsigned char* d = (unsigned char*)dst;
    if (r->mem) {
        memcpy(d, r->mem + r->pos, n);
        return 1;
    }
    while (n) {
        size_t take, got = 0;
        if (r->buf_pos == r->buf_len) {
            if (n >= LLMKV__IO_BUFFER) { /* large reads go straight to their destination */
                if (r->ops->read(r->ops->user, r->file, d, n, &got) != 0)
                    return llmkv__bad(r, LLMKV_ERR_IO, "read error at byte %llu", (unsigned long long)r->pos);
                if (got < n) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "the file ends early (truncated)");
                return 1;
            }
            if (r->ops->read(r->ops->user, r->file, r->buf, LLMKV__IO_BUFFER, &got) != 0)
                return llmkv__bad(r, LLMKV_ERR_IO, "read error at byte %llu", (unsigned long long)r->pos);
            if (got == 0) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "the file ends early (truncated)");
            r->buf_len = got;
            r->buf_pos = 0;
        }
        take = r->buf_len - r->buf_pos < n ? r->buf_len - r->buf_pos : n;
        memcpy(d, r->buf + r->buf_pos, take);
        r->buf_pos += take;
        d += take;
        n -= take;
    }
    return 1;
}

/* Reads n bytes into dst, inside the open section (and the input),
   adding them to the section's checksum. */
static int llmkv__rd(llmkv__src* r, void* dst, uint64_t n) {
    if (r->err != LLMKV_OK) return 0;
    if (n > r->limit - r->pos || (r->in_sec && n > r->sec_end - r->pos))
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "a record runs past the end of its section or the input");
    if (!llmkv__src_raw(r, dst, (size_t)n)) return 0;
    r->crc = llmkv__crc_update(r->crc_t, r->crc, dst, (size_t)n);
    r->pos += n;
    return 1;
}

/* Memory sources: n bytes in place (checksummed like llmkv__rd), or NULL. */
static const unsigned char* llmkv__view(llmkv__src* r, uint64_t n) {
    const unsigned char* p;
    if (r->err != LLMKV_OK) return NULL;
    if (n > r->limit - r->pos || (r->in_sec && n > r->sec_end - r->pos)) {
        llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "a record runs past the end of its section or the input");
        return NULL;
    }
    p = r->mem + r->pos;
    r->crc = llmkv__crc_update(r->crc_t, r->crc, p, (size_t)n);
    r->pos += n;
    return p;
}

static int llmkv__sec_close(llmkv__src* r) {
    unsigned char t[LLMKV__SECTION_TAIL];
    uint32_t crc = ~r->crc;
    if (r->err != LLMKV_OK) return 0;
    if (r->pos != r->sec_end) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "a section holds more than its records");
    r->in_sec = 0;
    if (!llmkv__rd(r, t, sizeof t)) return 0;
    if (llmkv__rd32(t) != crc || llmkv__rd32(t + 4) != 0)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "section %u: checksum mismatch (corrupt data)", r->n_sections);
    r->fold = llmkv__fold(r->fold, crc);
    r->n_sections++;
    return 1;
}

/* Opens the next section, which must be `want` (sections of tags this
   version does not know are checked and skipped). bytes: the body size it
   must have, or UINT64_MAX for any (*got receives it when not NULL). */
static int llmkv__sec_open(llmkv__src* r, uint32_t want, uint64_t bytes, uint64_t* got) {
    for (;;) {
        unsigned char h[LLMKV__SECTION_HEAD];
        uint32_t tag;
        uint64_t n;
        r->in_sec = 0;
        r->crc = 0xffffffffu;
        if (!llmkv__rd(r, h, sizeof h)) return 0;
        tag = llmkv__rd32(h);
        n = llmkv__rd64(h + 8);
        if (n > r->limit - r->pos)
            return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "section %s is larger than the input", llmkv__tag_text(tag).s);
        r->in_sec = 1;
        r->sec_end = r->pos + n;
        if (tag == want) {
            if (bytes != UINT64_MAX && n != bytes)
                return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "section %s holds %llu bytes, expected %llu",
                                  llmkv__tag_text(tag).s, (unsigned long long)n, (unsigned long long)bytes);
            if (got) *got = n;
            return 1;
        }
        if (llmkv__tag_known(tag))
            return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "section %s where %s belongs", llmkv__tag_text(tag).s,
                              llmkv__tag_text(want).s);
        while (r->pos < r->sec_end) { /* a section of a later minor version */
            unsigned char skip[256];
            uint64_t k = r->sec_end - r->pos < sizeof skip ? r->sec_end - r->pos : sizeof skip;
            if (!llmkv__rd(r, skip, k)) return 0;
        }
        if (!llmkv__sec_close(r)) return 0;
    }
}

/* A whole fixed-size section into b. */
static int llmkv__sec_read(llmkv__src* r, uint32_t tag, void* b, uint64_t bytes) {
    return llmkv__sec_open(r, tag, bytes, NULL) && llmkv__rd(r, b, bytes) && llmkv__sec_close(r);
}

/* The 64-byte header: magic, version, checksum; *kind, *flags, *parent. */
static int llmkv__rd_header(llmkv__src* r, uint32_t* kind, uint32_t* flags, uint64_t* parent) {
    unsigned char h[LLMKV__HEADER_BYTES];
    uint32_t major, minor;
    uint64_t total;
    r->limit = LLMKV__HEADER_BYTES;
    if (r->mem && r->size < LLMKV__HEADER_BYTES)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "%llu bytes: too short for a header", (unsigned long long)r->size);
    if (!llmkv__rd(r, h, sizeof h)) return 0;
    if (memcmp(h, llmkv__magic, 8) != 0) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "not an llmkv file (bad magic)");
    major = (uint32_t)h[8] | (uint32_t)h[9] << 8;
    minor = (uint32_t)h[10] | (uint32_t)h[11] << 8;
    if (major > LLMKV_FORMAT_MAJOR)
        return llmkv__bad(r, LLMKV_ERR_VERSION, "format %u.%u is newer than this library's %u.%u", major, minor,
                          LLMKV_FORMAT_MAJOR, LLMKV_FORMAT_MINOR);
    if (major == 0) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "format version 0.%u does not exist", minor);
    if (llmkv__rd32(h + 60) != ~llmkv__crc_update(r->crc_t, 0xffffffffu, h, 60))
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "header checksum mismatch (corrupt header)");
    *kind = llmkv__rd32(h + 12);
    *flags = llmkv__rd32(h + 20);
    total = llmkv__rd64(h + 24);
    *parent = llmkv__rd64(h + 32);
    if (llmkv__rd32(h + 16) != LLMKV__HEADER_BYTES || (*flags & ~LLMKV__FLAG_PAGES) || *kind < LLMKV__KIND_CACHE ||
        *kind > LLMKV__KIND_SEQ || total < LLMKV__HEADER_BYTES)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "header fields out of range");
    if (r->mem && total != r->size)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "the input holds %llu bytes, its header says %llu",
                          (unsigned long long)r->size, (unsigned long long)total);
    r->limit = total;
    return 1;
}

/* The END record (identity and section count) and the end of the input.
   *id receives the identity. */
static int llmkv__rd_end(llmkv__src* r, uint64_t parent, uint64_t* id) {
    unsigned char b[LLMKV__END_BYTES];
    if (!llmkv__sec_open(r, LLMKV__T_END, LLMKV__END_BYTES, NULL) || !llmkv__rd(r, b, sizeof b)) return 0;
    *id = llmkv__rd64(b);
    if (*id != llmkv__identity(parent, r->fold) || llmkv__rd64(b + 8) != parent || llmkv__rd32(b + 16) != r->n_sections ||
        llmkv__rd32(b + 20) != 0)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "the end record does not match the sections before it");
    if (!llmkv__sec_close(r)) return 0;
    if (r->pos != r->limit) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "bytes after the end record");
    if (r->file) { /* and nothing after it in the file */
        unsigned char extra;
        size_t got = 0;
        if (r->buf_pos < r->buf_len) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "bytes after the end record");
        if (r->ops->read(r->ops->user, r->file, &extra, 1, &got) != 0)
            return llmkv__bad(r, LLMKV_ERR_IO, "read error at the end of the file");
        if (got) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "bytes after the end record");
    }
    return 1;
}

/* CONF into a descriptor (shape, types, capacities; no callbacks). */
static int llmkv__rd_conf(llmkv__src* r, llmkv_desc* d, uint64_t* page_bytes) {
    unsigned char b[LLMKV__CONF_BYTES];
    uint32_t kt, vt, st;
    if (!llmkv__sec_read(r, LLMKV__T_CONF, b, sizeof b)) return 0;
    kt = llmkv__rd32(b + 20);
    vt = llmkv__rd32(b + 24);
    st = llmkv__rd32(b + 28);
    if (kt < LLMKV_DTYPE_F32 || kt > LLMKV_DTYPE_Q4C || vt < LLMKV_DTYPE_F32 || vt > LLMKV_DTYPE_Q4C ||
        st > LLMKV_STORAGE_METADATA_ONLY)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "unknown storage type or mode (%u, %u, %u)", kt, vt, st);
    memset(d, 0, sizeof *d);
    d->n_layers = llmkv__rd32(b);
    d->n_kv_heads = llmkv__rd32(b + 4);
    d->head_dim = llmkv__rd32(b + 8);
    d->page_size = llmkv__rd32(b + 12);
    d->n_pages = llmkv__rd32(b + 16);
    d->k_dtype = (llmkv_dtype)kt;
    d->v_dtype = (llmkv_dtype)vt;
    d->storage = (llmkv_storage)st;
    d->max_seqs = llmkv__rd32(b + 32);
    d->max_seq_len = llmkv__rd32(b + 36);
    d->max_pending_copies = llmkv__rd32(b + 40);
    d->prefix_index = llmkv__rd32(b + 44);
    d->max_pins = llmkv__rd32(b + 48);
    d->thread_safe = llmkv__rd32(b + 52);
    *page_bytes = llmkv__rd64(b + 56);
    if (d->page_size == 0 || d->n_pages == 0)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "page size %u, %u pages", d->page_size, d->n_pages);
    return 1;
}

/* Same saved configuration (the callbacks aside). */
static int llmkv__same_conf(const llmkv_desc* a, const llmkv_desc* b) {
    return a->n_layers == b->n_layers && a->n_kv_heads == b->n_kv_heads && a->head_dim == b->head_dim &&
           a->page_size == b->page_size && a->n_pages == b->n_pages && a->k_dtype == b->k_dtype &&
           a->v_dtype == b->v_dtype && a->storage == b->storage && a->max_seqs == b->max_seqs &&
           a->max_seq_len == b->max_seq_len && a->max_pending_copies == b->max_pending_copies &&
           a->prefix_index == b->prefix_index && a->max_pins == b->max_pins && a->thread_safe == b->thread_safe;
}

/* Creates the cache a saved configuration describes. */
static int llmkv__load_create(llmkv__src* r, const llmkv_desc* saved, uint64_t page_bytes, uint32_t flags,
                              const llmkv_load_desc* ld, llmkv_cache** out) {
    llmkv_desc d = *saved;
    size_t need = 0;
    llmkv_result e;
    d.allocator = ld->allocator;
    d.logger = ld->logger;
    if (((flags & LLMKV__FLAG_PAGES) != 0) != (d.storage != LLMKV_STORAGE_METADATA_ONLY))
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "the page-data flag contradicts the storage mode");
    e = llmkv_cache_memory_size(&d, &need, NULL);
    if (e == LLMKV_OK && ld->max_bytes && need > ld->max_bytes)
        return llmkv__bad(r, LLMKV_ERR_OUT_OF_MEMORY, "the cache needs %llu bytes, more than max_bytes %llu",
                          (unsigned long long)need, (unsigned long long)ld->max_bytes);
    if (e == LLMKV_OK) e = llmkv_cache_create(&d, out);
    if (e != LLMKV_OK)
        return llmkv__bad(r, e == LLMKV_ERR_INVALID_ARGUMENT ? LLMKV_ERR_BAD_FORMAT : e,
                          "the saved configuration cannot be created: %s", llmkv_result_string(e));
    if (!llmkv__same_conf(&(*out)->desc, saved) || (*out)->layout.page_bytes != page_bytes)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "the saved configuration is not one this library makes");
    return 1;
}

/* The saved F16 rows (llmkv__staged_rows) of every head of the staging of
   (slot, layer), from the input. */
static int llmkv__rd_staged(llmkv__src* r, llmkv_cache* kv, uint32_t slot, uint32_t layer) {
    const llmkv_layout* l = &kv->layout;
    uint32_t rows = llmkv__staged_rows(kv, slot, layer), h;
    for (h = 0; h < l->n_kv_heads && rows; ++h)
        if (!llmkv__rd(r, llmkv__stage_block(kv, slot, layer) + (size_t)h * l->page_size * l->head_dim,
                       (uint64_t)rows * l->head_dim * 2))
            return 0;
    return 1;
}

/* Everything after CONF of a whole cache or an increment, into kv (fresh,
   or holding the previous input of the chain: the metadata is replaced,
   and pages the input holds are overwritten). dirty[p] marks the pages
   whose bytes some input of the chain held. */
static int llmkv__load_body(llmkv__src* r, llmkv_cache* kv, int base, uint64_t parent, uint64_t* id) {
    const llmkv_layout* l = &kv->layout;
    const llmkv_desc* d = &kv->desc;
    uint32_t n = kv->n_pages, L = l->n_layers, ps = l->page_size, i, j, live = 0;
    uint64_t entries = 0, used = 0, bytes, count;
    unsigned char b[LLMKV__STAT_BYTES];
    char msg[160];
    if (!llmkv__sec_read(r, LLMKV__T_STAT, b, sizeof b)) return 0;
    kv->n_free = llmkv__rd32(b);
    kv->n_live = llmkv__rd32(b + 4);
    kv->free_head = llmkv__rd32(b + 8);
    kv->free_tail = llmkv__rd32(b + 12);
    kv->copy_count = llmkv__rd32(b + 44);
    kv->epoch = llmkv__rd64(b + 56);
    if (kv->nodes) {
        kv->lru_head = llmkv__rd32(b + 16);
        kv->lru_tail = llmkv__rd32(b + 20);
        kv->n_evictable = llmkv__rd32(b + 24);
        kv->n_cached = llmkv__rd32(b + 28);
        kv->n_pinned_pages = llmkv__rd32(b + 32);
        kv->pin_free = llmkv__rd32(b + 36);
        kv->n_pins = llmkv__rd32(b + 40);
        kv->n_evictions = llmkv__rd64(b + 64);
        kv->tokens_matched = llmkv__rd64(b + 72);
        kv->tokens_missed = llmkv__rd64(b + 80);
    }
    kv->copy_head = 0;
    kv->mark = 0;
    if (kv->n_free > n || kv->copy_count > kv->copy_cap)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "%u free pages of %u, %u copies queued of %u", kv->n_free, n,
                          kv->copy_count, kv->copy_cap);
    if (!llmkv__sec_read(r, LLMKV__T_REFC, kv->refcount, (uint64_t)n * 4) ||
        !llmkv__sec_read(r, LLMKV__T_FREE, kv->free_pages, (uint64_t)kv->n_free * 4))
        return 0;
    if (!llmkv__sec_open(r, LLMKV__T_SEQS, (uint64_t)d->max_seqs * LLMKV__SEQ_RECORD, NULL)) return 0;
    for (i = 0; i < d->max_seqs; ++i) {
        llmkv__seq* q = &kv->seqs[i];
        unsigned char rec[LLMKV__SEQ_RECORD];
        if (!llmkv__rd(r, rec, sizeof rec)) return 0;
        q->gen = llmkv__rd32(rec);
        q->live = llmkv__rd32(rec + 4);
        q->length = llmkv__rd32(rec + 8);
        q->n_pages = llmkv__rd32(rec + 12);
        q->next_free = llmkv__rd32(rec + 16);
        q->n_pub = llmkv__rd32(rec + 20);
        q->tok_gap = llmkv__rd32(rec + 24);
        q->epoch = llmkv__rd64(rec + 32);
        q->ns = llmkv__rd64(rec + 40);
        q->mark = 0;
        if (q->live > 1 || q->n_pages > kv->max_pages_per_seq)
            return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "sequence slot %u: out of range", i);
        live += q->live;
        if (q->live) entries += q->n_pages;
    }
    if (!llmkv__sec_close(r) || !llmkv__sec_open(r, LLMKV__T_TABL, entries * 4, NULL)) return 0;
    for (i = 0; i < d->max_seqs; ++i)
        if (kv->seqs[i].live && !llmkv__rd(r, llmkv__table(kv, i), (uint64_t)kv->seqs[i].n_pages * 4)) return 0;
    if (!llmkv__sec_close(r)) return 0;
    for (i = 0; i < n; ++i) used += kv->refcount[i] != 0;
    if (kv->nodes) {
        uint64_t e;
        memset(kv->written, 0, (size_t)d->max_seqs * L * 2 * 4);
        if (!llmkv__sec_open(r, LLMKV__T_WRIT, (uint64_t)live * L * 2 * 4, NULL)) return 0;
        for (i = 0; i < d->max_seqs; ++i)
            if (kv->seqs[i].live && !llmkv__rd(r, llmkv__written(kv, i), (uint64_t)L * 2 * 4)) return 0;
        if (!llmkv__sec_close(r)) return 0;
        for (e = 0; e < (uint64_t)n * ps; ++e) kv->tok[e] = -1;
        if (!llmkv__sec_open(r, LLMKV__T_TOKS, used * ps * 4, NULL)) return 0;
        for (i = 0; i < n; ++i)
            if (kv->refcount[i] && !llmkv__rd(r, kv->tok + (size_t)i * ps, (uint64_t)ps * 4)) return 0;
        if (!llmkv__sec_close(r)) return 0;
        for (e = 0; e < (uint64_t)n * ps; ++e)
            if (kv->tok[e] < -1) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "token id %d", (int)kv->tok[e]);
        memset(kv->nodes, 0, (size_t)n * sizeof(llmkv__node));
        memset(kv->keys, 0, (size_t)n * sizeof(llmkv__key));
        if (!llmkv__sec_open(r, LLMKV__T_NODE, UINT64_MAX, &bytes)) return 0;
        count = bytes / LLMKV__NODE_RECORD;
        if (bytes % LLMKV__NODE_RECORD || count > n) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "node section size");
        for (e = 0, j = 0; e < count; ++e) {
            unsigned char rec[LLMKV__NODE_RECORD];
            uint32_t p;
            llmkv__node* x;
            llmkv__key* k;
            if (!llmkv__rd(r, rec, sizeof rec)) return 0;
            p = llmkv__rd32(rec);
            if (p >= n || (e && p <= j) || llmkv__rd32(rec + 8) == 0)
                return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "node record %llu: page %u", (unsigned long long)e, p);
            j = p;
            x = &kv->nodes[p];
            k = &kv->keys[p];
            k->parent = llmkv__rd32(rec + 4);
            x->ntok = llmkv__rd32(rec + 8);
            x->n_children = llmkv__rd32(rec + 12);
            x->pins = llmkv__rd32(rec + 16);
            k->hash_full = llmkv__rd32(rec + 20);
            k->tok0 = (llmkv_token)llmkv__rd32(rec + 24);
            k->full_next = llmkv__rd32(rec + 28);
            x->full_prev = llmkv__rd32(rec + 32);
            x->first_next = llmkv__rd32(rec + 36);
            x->first_prev = llmkv__rd32(rec + 40);
            x->lru_next = llmkv__rd32(rec + 44);
            x->lru_prev = llmkv__rd32(rec + 48);
            x->ns = llmkv__rd64(rec + 56);
            x->chain = llmkv__rd64(rec + 64);
        }
        if (!llmkv__sec_close(r) || !llmkv__sec_read(r, LLMKV__T_HEAD, kv->heads, (uint64_t)kv->n_buckets * 2 * 4))
            return 0;
        if (!llmkv__sec_open(r, LLMKV__T_PINS, (uint64_t)d->max_pins * LLMKV__PIN_RECORD, NULL)) return 0;
        for (i = 0; i < d->max_pins; ++i) {
            unsigned char rec[LLMKV__PIN_RECORD];
            llmkv__pin* pn = &kv->pins[i];
            if (!llmkv__rd(r, rec, sizeof rec)) return 0;
            pn->gen = llmkv__rd32(rec);
            pn->live = llmkv__rd32(rec + 4);
            pn->node = llmkv__rd32(rec + 8);
            pn->next_free = llmkv__rd32(rec + 12);
            if (pn->gen == 0 || pn->gen > kv->pin_ids.gen_max || pn->live > 1)
                return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "pin slot %u: out of range", i);
        }
        if (!llmkv__sec_close(r)) return 0;
    }
    if (kv->kfill) {
        uint64_t e, staged = 0;
        for (e = 0; e < (uint64_t)d->max_seqs * L; ++e) kv->kfill[e] = LLMKV__NO_SLOT;
        if (!llmkv__sec_open(r, LLMKV__T_KFIL, (uint64_t)live * L * 4, NULL)) return 0;
        for (i = 0; i < d->max_seqs; ++i)
            if (kv->seqs[i].live && !llmkv__rd(r, kv->kfill + (size_t)i * L, (uint64_t)L * 4)) return 0;
        if (!llmkv__sec_close(r)) return 0;
        for (i = 0; i < d->max_seqs; ++i)
            for (j = 0; kv->seqs[i].live && j < L; ++j)
                staged += llmkv__stage_rows_bytes(l, llmkv__staged_rows(kv, i, j));
        if (!llmkv__sec_open(r, LLMKV__T_STAG, staged, NULL)) return 0;
        for (i = 0; i < d->max_seqs; ++i)
            for (j = 0; kv->seqs[i].live && j < L; ++j)
                if (!llmkv__rd_staged(r, kv, i, j)) return 0;
        if (!llmkv__sec_close(r)) return 0;
    }
    if (kv->copies) {
        if (!llmkv__sec_open(r, LLMKV__T_COPY, (uint64_t)kv->copy_count * LLMKV__COPY_RECORD, NULL)) return 0;
        for (i = 0; i < kv->copy_count; ++i) {
            unsigned char rec[LLMKV__COPY_RECORD];
            if (!llmkv__rd(r, rec, sizeof rec)) return 0;
            kv->copies[i].src_page = llmkv__rd32(rec);
            kv->copies[i].dst_page = llmkv__rd32(rec + 4);
            kv->copies[i].n_slots = llmkv__rd32(rec + 8);
        }
        if (!llmkv__sec_close(r)) return 0;
    }
    if (kv->pool) { /* page ids (into scratch, cleared after), then their bytes */
        unsigned char c4[4];
        if (!llmkv__sec_open(r, LLMKV__T_PIDS, UINT64_MAX, &bytes) || !llmkv__rd(r, c4, 4)) return 0;
        count = llmkv__rd32(c4);
        if (count > n || bytes != 4 + count * 4 || (base && count != used))
            return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "%llu saved pages (%llu in use)", (unsigned long long)count,
                              (unsigned long long)used);
        if (!llmkv__rd(r, kv->scratch, count * 4) || !llmkv__sec_close(r)) goto fail_pages;
        for (i = 0; i < count; ++i)
            if (kv->scratch[i] >= n || (i && kv->scratch[i] <= kv->scratch[i - 1]) || !kv->refcount[kv->scratch[i]]) {
                llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "saved page %u: id %u out of order or not in use", i,
                           kv->scratch[i]);
                goto fail_pages;
            }
        if (!llmkv__sec_open(r, LLMKV__T_PDAT, count * l->page_bytes, NULL)) goto fail_pages;
        for (i = 0; i < count; ++i) {
            if (!llmkv__rd(r, kv->pool + (size_t)kv->scratch[i] * l->page_bytes, l->page_bytes)) goto fail_pages;
            kv->dirty[kv->scratch[i]] = 1;
        }
        memset(kv->scratch, 0, (size_t)count * 4);
        if (!llmkv__sec_close(r)) return 0;
        for (i = 0; i < n; ++i)
            if (kv->refcount[i] && !kv->dirty[i])
                return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "page %u is in use but no input holds its bytes", i);
    }
    if (!llmkv__rd_end(r, parent, id)) return 0;
    if (llmkv__check(kv, msg, sizeof msg) != LLMKV_OK) {
        memset(kv->scratch, 0, (size_t)n * 4);
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "inconsistent: %s", msg);
    }
    memset(kv->scratch, 0, (size_t)n * 4);
    return 1;
fail_pages:
    memset(kv->scratch, 0, (size_t)n * 4);
    return 0;
}

/* One input of a load: the whole cache (index 0, creating *kv) or an
   increment on top of the previous input, whose identity is *prev. */
static void llmkv__load_one(llmkv__src* r, llmkv_cache** kv, const llmkv_load_desc* ld, uint64_t* prev) {
    uint32_t kind, flags;
    uint64_t parent, page_bytes, id;
    llmkv_desc d;
    if (!llmkv__rd_header(r, &kind, &flags, &parent)) return;
    if (kind != (r->index ? LLMKV__KIND_INCREMENT : LLMKV__KIND_CACHE)) {
        llmkv__bad(r, LLMKV_ERR_MISMATCH, "a %s where %s belongs",
                   kind == LLMKV__KIND_SEQ ? "sequence export" : kind == LLMKV__KIND_CACHE ? "whole cache" : "increment",
                   r->index ? "an increment" : "a whole cache");
        return;
    }
    if (r->index && parent != *prev) {
        llmkv__bad(r, LLMKV_ERR_MISMATCH, "this increment does not build on input %u", r->index - 1);
        return;
    }
    if (!llmkv__rd_conf(r, &d, &page_bytes)) return;
    if (!r->index) {
        if (!llmkv__load_create(r, &d, page_bytes, flags, ld, kv)) return;
    } else if (!llmkv__same_conf(&d, &(*kv)->desc) || page_bytes != (*kv)->layout.page_bytes) {
        llmkv__bad(r, LLMKV_ERR_MISMATCH, "the increment's configuration differs from the cache's");
        return;
    }
    if (!llmkv__load_body(r, *kv, r->index == 0, parent, &id)) return;
    *prev = id;
}

/* The inputs of a load: n buffers, or n files. */
typedef struct llmkv__load_in {
    const void* const* buffers;
    const size_t* sizes;
    const char* const* paths;
    uint32_t n;
} llmkv__load_in;

static llmkv_result llmkv__load(const llmkv__load_in* in, const llmkv_load_desc* ld_in, llmkv_cache** out) {
    llmkv_load_desc ld;
    llmkv_allocator a;
    llmkv_file_ops ops;
    llmkv__crc32c* ct;
    unsigned char* fbuf = NULL;
    llmkv_cache* kv = NULL;
    llmkv_result e = LLMKV_OK;
    uint64_t prev = 0;
    uint32_t i;
    if (out) *out = NULL;
    if (!out || in->n == 0 || (in->paths ? 0 : !in->buffers || !in->sizes)) return LLMKV_ERR_INVALID_ARGUMENT;
    memset(&ld, 0, sizeof ld);
    if (ld_in) ld = *ld_in;
    if (!ld.allocator.alloc != !ld.allocator.free) return LLMKV_ERR_INVALID_ARGUMENT;
    for (i = 0; i < in->n; ++i)
        if (in->paths ? !in->paths[i] : !in->buffers[i]) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!llmkv__little_endian()) return LLMKV_ERR_UNSUPPORTED;
    if (in->paths && !llmkv__file_ops(ld.file_ops, &ops)) {
        llmkv__log(&ld.logger, LLMKV_LOG_ERROR, "llmkv: no file operations in this build (pass llmkv_file_ops)");
        return LLMKV_ERR_UNSUPPORTED;
    }
    a = llmkv__allocator_or_default(&ld.allocator);
    ct = (llmkv__crc32c*)a.alloc(sizeof *ct, LLMKV__ALIGN, a.user);
    if (in->paths && ct) fbuf = (unsigned char*)a.alloc(LLMKV__IO_BUFFER, LLMKV__ALIGN, a.user);
    if (!ct || (in->paths && !fbuf)) {
        if (ct) a.free(ct, sizeof *ct, a.user);
        return LLMKV_ERR_OUT_OF_MEMORY;
    }
    llmkv__crc_init(ct);
    for (i = 0; i < in->n && e == LLMKV_OK; ++i) {
        llmkv__src r;
        memset(&r, 0, sizeof r);
        r.crc_t = ct;
        r.lg = &ld.logger;
        r.index = i;
        if (in->paths) {
            r.ops = &ops;
            r.buf = fbuf;
            r.file = ops.open_read(ops.user, in->paths[i]);
            if (!r.file) {
                llmkv__log(&ld.logger, LLMKV_LOG_ERROR, "llmkv: cannot open %s", in->paths[i]);
                e = LLMKV_ERR_IO;
                break;
            }
        } else {
            r.mem = (const unsigned char*)in->buffers[i];
            r.size = in->sizes[i];
        }
        llmkv__load_one(&r, &kv, &ld, &prev);
        if (r.file) ops.close(ops.user, r.file);
        e = r.err;
    }
    if (e == LLMKV_OK) {
        if (kv->dirty) memset(kv->dirty, 0, kv->n_pages);
        kv->ckpt_id = prev;
        *out = kv;
    } else {
        llmkv_cache_destroy(kv);
    }
    a.free(ct, sizeof *ct, a.user);
    if (fbuf) a.free(fbuf, LLMKV__IO_BUFFER, a.user);
    return e;
}

LLMKV_API llmkv_result llmkv_cache_load_mem(const void* const* buffers, const size_t* sizes, uint32_t n,
                                            const llmkv_load_desc* ld, llmkv_cache** out) {
    llmkv__load_in in;
    memset(&in, 0, sizeof in);
    in.buffers = buffers;
    in.sizes = sizes;
    in.n = n;
    return llmkv__load(&in, ld, out);
}

LLMKV_API llmkv_result llmkv_cache_load_file(const char* const* paths, uint32_t n, const llmkv_load_desc* ld,
                                             llmkv_cache** out) {
    llmkv__load_in in;
    memset(&in, 0, sizeof in);
    in.paths = paths;
    in.n = n;
    if (!paths) {
        if (out) *out = NULL;
        return LLMKV_ERR_INVALID_ARGUMENT;
    }
    return llmkv__load(&in, ld, out);
}

/* --- Sequence import ----------------------------------------------------- */

/* A parsed, fully checked sequence export (views into the caller's buffer). */
typedef struct llmkv__seqfile {
    llmkv_desc desc;
    llmkv_layout layout;
    uint32_t length, n_pages, known; /* known: positions before the first unknown token */
    uint64_t ns;
    const unsigned char *written, *tokens, *kfill, *stage, *pages;
} llmkv__seqfile;

static uint32_t llmkv__file_rows(const llmkv__seqfile* f, uint32_t layer) {
    return llmkv__stage_rows(llmkv__rd32(f->kfill + 4 * layer), f->length, f->layout.page_size);
}

static int llmkv__parse_seq(llmkv__src* r, llmkv__seqfile* f) {
    uint32_t kind, flags, i, ps, L;
    uint64_t parent, page_bytes, id, staged = 0;
    unsigned char b[LLMKV__SEQ1_BYTES];
    llmkv_desc d;
    memset(f, 0, sizeof *f);
    if (!llmkv__rd_header(r, &kind, &flags, &parent)) return 0;
    if (kind != LLMKV__KIND_SEQ)
        return llmkv__bad(r, LLMKV_ERR_MISMATCH, "a whole cache or increment where a sequence export belongs");
    if (!(flags & LLMKV__FLAG_PAGES) || parent != 0 || !llmkv__rd_conf(r, &d, &page_bytes)) {
        if (r->err == LLMKV_OK) llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "header fields out of range");
        return 0;
    }
    d.logger = *r->lg;
    if (d.storage != LLMKV_STORAGE_DEFAULT || llmkv__desc_shape(&d, &f->desc) != LLMKV_OK)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "the exporting cache's configuration is invalid");
    llmkv__layout(&f->desc, &f->layout);
    if (f->layout.page_bytes != page_bytes)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "the saved page size is not one this library makes");
    ps = f->layout.page_size;
    L = f->layout.n_layers;
    if (!llmkv__sec_read(r, LLMKV__T_SEQ1, b, sizeof b)) return 0;
    f->length = llmkv__rd32(b);
    f->n_pages = llmkv__rd32(b + 4);
    f->ns = llmkv__rd64(b + 16);
    if (f->length > LLMKV__MAX_LEN || f->n_pages != llmkv__div_up(f->length, ps) || llmkv__rd64(b + 8) != 0)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "%u positions in %u pages", f->length, f->n_pages);
    if (f->desc.prefix_index) {
        if (!llmkv__sec_open(r, LLMKV__T_WRIT, (uint64_t)L * 2 * 4, NULL) ||
            !(f->written = llmkv__view(r, (uint64_t)L * 2 * 4)) || !llmkv__sec_close(r) ||
            !llmkv__sec_open(r, LLMKV__T_TOKS, (uint64_t)f->length * 4, NULL) ||
            !(f->tokens = llmkv__view(r, (uint64_t)f->length * 4)) || !llmkv__sec_close(r))
            return 0;
        for (i = 0; i < L * 2; ++i)
            if (llmkv__rd32(f->written + 4 * i) > f->length)
                return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "written mark past the length");
        for (f->known = f->length, i = 0; i < f->length; ++i) {
            int32_t t = (int32_t)llmkv__rd32(f->tokens + 4 * i);
            if (t < -1) return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "token id %d", (int)t);
            if (t < 0 && f->known == f->length) f->known = i;
        }
    }
    if (llmkv__dtype_channel(f->desc.k_dtype)) {
        if (!llmkv__sec_open(r, LLMKV__T_KFIL, (uint64_t)L * 4, NULL) || !(f->kfill = llmkv__view(r, (uint64_t)L * 4)) ||
            !llmkv__sec_close(r))
            return 0;
        for (i = 0; i < L; ++i) {
            uint32_t kf = llmkv__rd32(f->kfill + 4 * i);
            if (kf != LLMKV__NO_SLOT && (kf % ps || kf >= f->length))
                return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "staged page at %u of %u positions", kf, f->length);
            staged += llmkv__stage_rows_bytes(&f->layout, llmkv__file_rows(f, i));
        }
        if (!llmkv__sec_open(r, LLMKV__T_STAG, staged, NULL) || !(f->stage = llmkv__view(r, staged)) ||
            !llmkv__sec_close(r))
            return 0;
    }
    if (f->n_pages > (r->limit - r->pos) / page_bytes)
        return llmkv__bad(r, LLMKV_ERR_BAD_FORMAT, "%u pages do not fit the input", f->n_pages);
    if (!llmkv__sec_open(r, LLMKV__T_PDAT, (uint64_t)f->n_pages * page_bytes, NULL) ||
        !(f->pages = llmkv__view(r, (uint64_t)f->n_pages * page_bytes)) || !llmkv__sec_close(r))
        return 0;
    return llmkv__rd_end(r, 0, &id);
}

/* Copies the staged F16 keys of the export into the staging of (slot,
   layer) of kv, which has the export's page size. */
static void llmkv__put_staged(llmkv_cache* kv, uint32_t slot, const llmkv__seqfile* f) {
    const llmkv_layout* l = &kv->layout;
    const unsigned char* src = f->stage;
    uint32_t layer, h;
    for (layer = 0; layer < l->n_layers; ++layer) {
        uint32_t rows = llmkv__file_rows(f, layer);
        kv->kfill[(size_t)slot * l->n_layers + layer] = llmkv__rd32(f->kfill + 4 * layer);
        for (h = 0; h < l->n_kv_heads && rows; ++h) {
            size_t n = (size_t)rows * l->head_dim * 2;
            memcpy(llmkv__stage_block(kv, slot, layer) + (size_t)h * l->page_size * l->head_dim, src, n);
            src += n;
        }
    }
}

/* The conversion path's source: a private cache of the export's
   configuration holding the sequence, read back with llmkv_gather. */
static llmkv_result llmkv__import_source(const llmkv__seqfile* f, const llmkv_allocator* a, llmkv_cache** out,
                                         llmkv_seq* seq) {
    llmkv_desc d;
    llmkv_cache* kv;
    const uint32_t* t;
    uint32_t k, slot = 0;
    llmkv_result e;
    memset(&d, 0, sizeof d);
    d.n_layers = f->desc.n_layers;
    d.n_kv_heads = f->desc.n_kv_heads;
    d.head_dim = f->desc.head_dim;
    d.page_size = f->desc.page_size;
    d.k_dtype = f->desc.k_dtype;
    d.v_dtype = f->desc.v_dtype;
    d.n_pages = f->n_pages ? f->n_pages : 1;
    d.max_seqs = 1;
    d.allocator = *a;
    if ((e = llmkv_cache_create(&d, out)) != LLMKV_OK) return e == LLMKV_ERR_INVALID_ARGUMENT ? LLMKV_ERR_OUT_OF_MEMORY : e;
    kv = *out;
    llmkv__seq_create_unlocked(kv, seq);
    if (llmkv__reserve(kv, seq, &f->length, NULL, 1) != LLMKV_OK) { /* cannot fail: the pages are there */
        llmkv_cache_destroy(kv);
        *out = NULL;
        return LLMKV_ERR_OUT_OF_MEMORY;
    }
    llmkv__lookup(kv, *seq, &slot);
    t = llmkv__table(kv, slot);
    for (k = 0; k < f->n_pages; ++k)
        memcpy(kv->pool + (size_t)t[k] * kv->layout.page_bytes, f->pages + (size_t)k * kv->layout.page_bytes,
               (size_t)kv->layout.page_bytes);
    if (f->kfill) llmkv__put_staged(kv, slot, f);
    return LLMKV_OK;
}

/* Allocations an import may need, freed together. */
typedef struct llmkv__import_tmp {
    const llmkv_allocator* a;
    llmkv__crc32c* ct;
    llmkv_token* tokens;   /* the export's ids, aligned */
    size_t tokens_bytes;
    float* rows;           /* conversion: K then V rows of one target page */
    size_t rows_bytes;
    llmkv_cache* src;      /* conversion: the export as a cache */
    llmkv_seq src_seq;
} llmkv__import_tmp;

static void llmkv__import_tmp_free(llmkv__import_tmp* x) {
    if (x->ct) x->a->free(x->ct, sizeof *x->ct, x->a->user);
    if (x->tokens) x->a->free(x->tokens, x->tokens_bytes, x->a->user);
    if (x->rows) x->a->free(x->rows, x->rows_bytes, x->a->user);
    llmkv_cache_destroy(x->src);
}

static llmkv_result llmkv__seq_import_unlocked(llmkv_cache* kv, const void* data, size_t size, llmkv_seq* out,
                                               uint32_t* n_shared) {
    const llmkv_layout* l;
    llmkv__import_tmp x;
    llmkv__seqfile f;
    llmkv__src r;
    llmkv__seq* s;
    uint32_t ps, n_pages, slot, d = 0, node, cand, lcp, k, held = 0, layer, part;
    uint32_t* t;
    int same;
    llmkv_result e = LLMKV_OK;
    if (out) out->id = 0;
    if (n_shared) *n_shared = 0;
    if (!kv || !data || !out) return LLMKV_ERR_INVALID_ARGUMENT;
    if (!kv->pool) return LLMKV_ERR_NO_PAGE_DATA;
    if (!llmkv__little_endian()) return LLMKV_ERR_UNSUPPORTED;
    l = &kv->layout;
    ps = l->page_size;
    memset(&x, 0, sizeof x);
    x.a = &kv->alloc;
    x.ct = (llmkv__crc32c*)kv->alloc.alloc(sizeof *x.ct, LLMKV__ALIGN, kv->alloc.user);
    if (!x.ct) return LLMKV_ERR_OUT_OF_MEMORY;
    llmkv__crc_init(x.ct);
    memset(&r, 0, sizeof r);
    r.crc_t = x.ct;
    r.lg = &kv->desc.logger;
    r.mem = (const unsigned char*)data;
    r.size = size;
    if (!llmkv__parse_seq(&r, &f)) {
        e = r.err;
        goto done;
    }
    if (f.desc.n_layers != l->n_layers || f.desc.n_kv_heads != l->n_kv_heads || f.desc.head_dim != l->head_dim) {
        llmkv__log(&kv->desc.logger, LLMKV_LOG_ERROR,
                   "llmkv: the sequence has %u layers x %u KV heads x %u dims, the cache %u x %u x %u",
                   f.desc.n_layers, f.desc.n_kv_heads, f.desc.head_dim, l->n_layers, l->n_kv_heads, l->head_dim);
        e = LLMKV_ERR_MISMATCH;
        goto done;
    }
    if (f.length > kv->desc.max_seq_len) {
        e = LLMKV_ERR_SEQUENCE_TOO_LONG;
        goto done;
    }
    if (kv->free_head == LLMKV__NO_SLOT) {
        e = LLMKV_ERR_TOO_MANY_SEQUENCES;
        goto done;
    }
    same = f.layout.page_size == ps && f.desc.k_dtype == kv->desc.k_dtype && f.desc.v_dtype == kv->desc.v_dtype;
    n_pages = llmkv__div_up(f.length, ps);
    slot = kv->free_head;
    t = llmkv__table(kv, slot);
    if (f.tokens && kv->nodes) { /* whole cached pages of the known prefix are shared */
        x.tokens_bytes = (size_t)f.length * sizeof(llmkv_token) + 1;
        x.tokens = (llmkv_token*)kv->alloc.alloc(x.tokens_bytes, LLMKV__ALIGN, kv->alloc.user);
        if (!x.tokens) {
            e = LLMKV_ERR_OUT_OF_MEMORY;
            goto done;
        }
        for (k = 0; k < f.length; ++k) x.tokens[k] = (llmkv_token)llmkv__rd32(f.tokens + 4 * k);
        if (f.known >= ps) llmkv__prefix_walk(kv, f.ns, x.tokens, f.known, t, &d, &node, &cand, &lcp);
        for (k = 0; k < d; ++k) held += (uint32_t)llmkv__evictable(kv, t[k]);
    }
    if ((uint64_t)(n_pages - d) + held > llmkv__avail(kv)) {
        e = LLMKV_ERR_OUT_OF_PAGES;
        goto done;
    }
    if (!same) {
        x.rows_bytes = (size_t)2 * ps * l->n_kv_heads * l->head_dim * sizeof(float);
        x.rows = (float*)kv->alloc.alloc(x.rows_bytes, LLMKV__ALIGN, kv->alloc.user);
        if (!x.rows || (e = llmkv__import_source(&f, &kv->alloc, &x.src, &x.src_seq)) != LLMKV_OK) {
            e = LLMKV_ERR_OUT_OF_MEMORY;
            goto done;
        }
    }
    /* Nothing fails from here on. */
    llmkv__seq_create_unlocked(kv, out);
    s = &kv->seqs[slot];
    s->ns = f.ns;
    for (k = 0; k < d; ++k) llmkv__page_hold(kv, t[k]);
    for (k = d; k < n_pages; ++k) t[k] = llmkv__page_take(kv);
    s->length = f.length;
    s->n_pages = n_pages;
    s->n_pub = d;
    if (kv->tok) {
        for (k = d * ps; k < n_pages * ps; ++k) kv->tok[(size_t)t[k / ps] * ps + k % ps] = x.tokens && k < f.length ? x.tokens[k] : -1;
        if (f.length == 0 || (x.tokens && f.known == f.length)) s->tok_gap = LLMKV__NO_SLOT;
        else s->tok_gap = x.tokens ? f.known : 0;
    }
    if (same) {
        for (k = d; k < n_pages; ++k)
            memcpy(kv->pool + (size_t)t[k] * l->page_bytes, f.pages + (size_t)k * l->page_bytes, (size_t)l->page_bytes);
        if (f.kfill) {
            llmkv__put_staged(kv, slot, &f);
            for (layer = 0; layer < l->n_layers; ++layer) { /* a page the cache shared is quantized already */
                uint32_t* kf = &kv->kfill[(size_t)slot * l->n_layers + layer];
                if (*kf != LLMKV__NO_SLOT && *kf / ps < d) *kf = LLMKV__NO_SLOT;
            }
        }
    } else {
        size_t row = (size_t)l->n_kv_heads * l->head_dim;
        for (layer = 0; layer < l->n_layers; ++layer)
            for (k = d; k < n_pages; ++k) {
                uint32_t lo = k * ps, hi = f.length < lo + ps ? f.length : lo + ps;
                llmkv_gather(x.src, x.src_seq, layer, lo, hi - lo, x.rows, 0, x.rows + (size_t)ps * row, 0,
                             LLMKV_DTYPE_F32);
                llmkv__put_rows(kv, slot, layer, lo, hi, x.rows, row * 4, x.rows + (size_t)ps * row, row * 4,
                                LLMKV_DTYPE_F32);
            }
    }
    if (kv->written)
        for (layer = 0; layer < l->n_layers; ++layer)
            for (part = 0; part < 2; ++part) {
                uint32_t w = f.written ? llmkv__rd32(f.written + 4 * (layer * 2 + part)) : f.length;
                llmkv__written(kv, slot)[layer * 2 + part] = w > d * ps ? w : d * ps;
            }
    s->epoch = ++kv->epoch;
    if (kv->nodes) llmkv__publish(kv, slot, 0);
    if (n_shared) *n_shared = d * ps;
done:
    llmkv__import_tmp_free(&x);
    return e;
}

LLMKV_API llmkv_result llmkv_seq_import(llmkv_cache* cache, const void* data, size_t size, llmkv_seq* out,
                                        uint32_t* n_shared) {
    LLMKV__RETURN_LOCKED(cache, llmkv__seq_import_unlocked(cache, data, size, out, n_shared));
}

/* A whole file into memory from the allocator (its header says how large
   it is). */
static llmkv_result llmkv__read_file(const char* path, const llmkv_file_ops* user_ops, const llmkv_allocator* a,
                                     const llmkv_logger* lg, unsigned char** data, size_t* size) {
    llmkv_file_ops ops;
    unsigned char h[LLMKV__HEADER_BYTES], extra;
    void* f;
    size_t got = 0;
    uint64_t total;
    llmkv_result e = LLMKV_OK;
    *data = NULL;
    *size = 0;
    if (!llmkv__file_ops(user_ops, &ops)) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: no file operations in this build (pass llmkv_file_ops)");
        return LLMKV_ERR_UNSUPPORTED;
    }
    f = ops.open_read(ops.user, path);
    if (!f) {
        llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: cannot open %s", path);
        return LLMKV_ERR_IO;
    }
    if (ops.read(ops.user, f, h, sizeof h, &got) != 0) {
        e = LLMKV_ERR_IO;
    } else if (got < sizeof h || memcmp(h, llmkv__magic, 8) != 0) {
        e = LLMKV_ERR_BAD_FORMAT;
    } else {
        total = llmkv__rd64(h + 24);
        if (total < sizeof h || total > (uint64_t)(size_t)-1 / 2) {
            e = LLMKV_ERR_BAD_FORMAT;
        } else if (!(*data = (unsigned char*)a->alloc((size_t)total, LLMKV__ALIGN, a->user))) {
            e = LLMKV_ERR_OUT_OF_MEMORY;
        } else {
            *size = (size_t)total;
            memcpy(*data, h, sizeof h);
            if (ops.read(ops.user, f, *data + sizeof h, *size - sizeof h, &got) != 0)
                e = LLMKV_ERR_IO;
            else if (got != *size - sizeof h) /* shorter than its header says */
                e = LLMKV_ERR_BAD_FORMAT;
            else if (ops.read(ops.user, f, &extra, 1, &got) != 0)
                e = LLMKV_ERR_IO;
            else if (got != 0) /* longer */
                e = LLMKV_ERR_BAD_FORMAT;
        }
    }
    ops.close(ops.user, f);
    if (e == LLMKV_ERR_IO) llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: cannot read %s", path);
    if (e == LLMKV_ERR_BAD_FORMAT) llmkv__log(lg, LLMKV_LOG_ERROR, "llmkv: %s is not an llmkv file or is truncated", path);
    if (e != LLMKV_OK && *data) {
        a->free(*data, *size, a->user);
        *data = NULL;
    }
    return e;
}

LLMKV_API llmkv_result llmkv_seq_import_file(llmkv_cache* cache, const char* path, const llmkv_file_ops* ops,
                                             llmkv_seq* out, uint32_t* n_shared) {
    unsigned char* data;
    size_t size;
    llmkv_result e;
    if (out) out->id = 0;
    if (n_shared) *n_shared = 0;
    if (!cache || !path || !out) return LLMKV_ERR_INVALID_ARGUMENT;
    e = llmkv__read_file(path, ops, &cache->alloc, &cache->desc.logger, &data, &size);
    if (e != LLMKV_OK) return e;
    e = llmkv_seq_import(cache, data, size, out, n_shared);
    cache->alloc.free(data, size, cache->alloc.user);
    return e;
}

#ifdef __cplusplus
}
#endif

/* LLMKV_IMPLEMENTATION_DONE */
#endif /* LLMKV_IMPLEMENTATION_ONCE */
#endif /* LLMKV_IMPLEMENTATION */

/*
------------------------------------------------------------------------------
This software is available under 2 licenses -- choose whichever you prefer.
------------------------------------------------------------------------------
ALTERNATIVE A - MIT License
Copyright (c) 2026 the llmkv authors
Permission is hereby granted, free of charge, to any person obtaining a copy of
this software and associated documentation files (the "Software"), to deal in
the Software without restriction, including without limitation the rights to
use, copy, modify, merge, publish, distribute, sublicense, and/or sell copies
of the Software, and to permit persons to whom the Software is furnished to do
so, subject to the following conditions:
The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
------------------------------------------------------------------------------
ALTERNATIVE B - Public Domain (www.unlicense.org)
This is free and unencumbered software released into the public domain.
Anyone is free to copy, modify, publish, use, compile, sell, or distribute this
software, either in source code form or as a compiled binary, for any purpose,
commercial or non-commercial, and by any means.
In jurisdictions that recognize copyright laws, the author or authors of this
software dedicate any and all copyright interest in the software to the public
domain. We make this dedication for the benefit of the public at large and to
the detriment of all present and future heirs and successors. We intend this
dedication to be an overt act of relinquishment in perpetuity of all present
and future rights to this software under copyright law.
THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN
ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION
WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE SOFTWARE.
------------------------------------------------------------------------------
*/
