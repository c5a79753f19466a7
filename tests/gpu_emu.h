/* gpu_emu.h - runs llmkv_cuda.cuh's kernels on the CPU, for testing without
   a GPU. Include it (C++, x86-64, GCC or Clang), then define
   LLMKV_IMPLEMENTATION and LLMKV_CUDA_IMPLEMENTATION and include
   llmkv_cuda.cuh: the same kernel source then compiles as plain C++.

   What it emulates: every GPU thread of a block is a fiber (a small stack
   and a register switch written below), run by a scheduler until it
   reaches __syncthreads (every live thread of the block must get there) or
   a warp shuffle (every live lane of its 32-lane warp must get there; the
   value exchange happens once all have arrived). Blocks run one after
   another, so `__shared__` becomes `static`. Device memory is host memory
   behind a budget (LLMKV_EMU_DEVICE_BYTES) so out-of-memory paths run; copies
   and kernels execute at once, in call order, which is one valid order of
   a single stream. The emulated device reports LLMKV_EMU_SMS
   multiprocessors (default 8), so split-K runs at test sizes.

   What it does not emulate: concurrency between blocks or streams, memory
   ordering races, the exact rounding of the device's expf / tanhf / logf,
   and anything beyond the calls llmkv_cuda.cuh and its tests use. A kernel
   whose lanes disagree about reaching a shuffle or barrier is reported as
   a deadlock (abort), which on a GPU would be undefined behaviour.

   One translation unit per program (it defines functions and globals). */
#ifndef LLMKV_GPU_EMU_H
#define LLMKV_GPU_EMU_H

#if !defined(__x86_64__)
#error "gpu_emu.h switches stacks with x86-64 code"
#endif

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <functional>
#include <vector>

#define LLMKV_GPU_EMULATE 1

#ifndef LLMKV_EMU_SMS
#define LLMKV_EMU_SMS 8
#endif
#ifndef LLMKV_EMU_DEVICE_BYTES
#define LLMKV_EMU_DEVICE_BYTES ((size_t)8 << 30)
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct __half { unsigned short bits; };

static dim3 threadIdx, blockIdx, blockDim, gridDim;

static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline __half __ushort_as_half(unsigned short h) { __half r; r.bits = h; return r; }
static inline float __half2float(__half h) { /* exact, as the hardware */
    unsigned sign = (unsigned)(h.bits & 0x8000u) << 16, e = (h.bits >> 10) & 0x1fu, m = h.bits & 0x3ffu;
    if (e == 0) return (sign ? -1.0f : 1.0f) * (float)m * (1.0f / 16777216.0f);
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13) | (m ? 0x400000u : 0u));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}

/* ---- fibers -------------------------------------------------------------- */

extern "C" void llmkv_emu_switch(void** save_sp, void* load_sp);
extern "C" void llmkv_emu_trampoline(void);
__asm__(".text\n"
        ".globl llmkv_emu_switch\n"
        ".type llmkv_emu_switch,@function\n"
        "llmkv_emu_switch:\n"
        "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
        "  movq %rsp, (%rdi)\n"
        "  movq %rsi, %rsp\n"
        "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
        "  ret\n"
        ".size llmkv_emu_switch, .-llmkv_emu_switch\n"
        ".globl llmkv_emu_trampoline\n"
        ".type llmkv_emu_trampoline,@function\n"
        "llmkv_emu_trampoline:\n"
        "  movq %r12, %rdi\n"
        "  andq $-16, %rsp\n"
        "  callq *%r13\n"
        "  ud2\n"
        ".size llmkv_emu_trampoline, .-llmkv_emu_trampoline\n");

enum { LLMKV_EMU_RUN, LLMKV_EMU_WARP, LLMKV_EMU_BLOCK, LLMKV_EMU_DONE };
enum { LLMKV_EMU_STACK = 64 * 1024, LLMKV_EMU_MAX_THREADS = 1024 };

struct llmkv_emu_fiber {
    void* sp;
    unsigned tid;
    int state;
    unsigned parity; /* which shuffle buffer this lane uses next */
};

struct llmkv_emu_state {
    std::vector<unsigned char> stacks;
    llmkv_emu_fiber fibers[LLMKV_EMU_MAX_THREADS];
    llmkv_emu_fiber* cur;
    void* sched_sp;
    const std::function<void()>* body;
    uint64_t shfl[2][LLMKV_EMU_MAX_THREADS]; /* by parity and thread */
    size_t device_used;
    int error; /* a cudaError_t to report from cudaGetLastError */
};
static llmkv_emu_state llmkv_emu;

extern "C" void llmkv_emu_entry(llmkv_emu_fiber* f) {
    (*llmkv_emu.body)();
    f->state = LLMKV_EMU_DONE;
    llmkv_emu_switch(&f->sp, llmkv_emu.sched_sp);
    abort(); /* never resumed */
}

static void llmkv_emu_yield(int state) {
    llmkv_emu_fiber* f = llmkv_emu.cur;
    f->state = state;
    llmkv_emu_switch(&f->sp, llmkv_emu.sched_sp);
}

/* Runs one block: every thread to completion, honouring barriers. */
static void llmkv_emu_run_block(unsigned n) {
    unsigned i, w, n_warps = (n + 31) / 32;
    if (llmkv_emu.stacks.empty()) llmkv_emu.stacks.resize((size_t)LLMKV_EMU_MAX_THREADS * LLMKV_EMU_STACK);
    for (i = 0; i < n; ++i) {
        llmkv_emu_fiber* f = &llmkv_emu.fibers[i];
        uintptr_t top = (uintptr_t)(&llmkv_emu.stacks[(size_t)(i + 1) * LLMKV_EMU_STACK]) & ~(uintptr_t)15;
        void** sp = (void**)top;
        *--sp = 0;                                  /* alignment slot */
        *--sp = (void*)llmkv_emu_trampoline;        /* return address of the first switch */
        *--sp = 0;                                  /* rbp */
        *--sp = 0;                                  /* rbx */
        *--sp = (void*)f;                           /* r12: the argument */
        *--sp = (void*)llmkv_emu_entry;             /* r13: the entry */
        *--sp = 0;                                  /* r14 */
        *--sp = 0;                                  /* r15 */
        f->sp = sp;
        f->tid = i;
        f->state = LLMKV_EMU_RUN;
        f->parity = 0;
    }
    for (;;) {
        int ran = 0, live = 0, at_block = 0;
        for (i = 0; i < n; ++i) {
            llmkv_emu_fiber* f = &llmkv_emu.fibers[i];
            if (f->state != LLMKV_EMU_RUN) continue;
            threadIdx = dim3(f->tid % blockDim.x, f->tid / blockDim.x % blockDim.y, f->tid / (blockDim.x * blockDim.y));
            llmkv_emu.cur = f;
            llmkv_emu_switch(&llmkv_emu.sched_sp, f->sp);
            ran = 1;
        }
        /* Release warps whose live lanes all wait at a shuffle. */
        for (w = 0; w < n_warps; ++w) {
            unsigned lo = w * 32, hi = lo + 32 < n ? lo + 32 : n, waiting = 0, alive = 0;
            for (i = lo; i < hi; ++i) {
                alive += llmkv_emu.fibers[i].state != LLMKV_EMU_DONE;
                waiting += llmkv_emu.fibers[i].state == LLMKV_EMU_WARP;
            }
            if (alive && waiting == alive) {
                for (i = lo; i < hi; ++i)
                    if (llmkv_emu.fibers[i].state == LLMKV_EMU_WARP) llmkv_emu.fibers[i].state = LLMKV_EMU_RUN;
                ran = 1;
            }
        }
        for (i = 0; i < n; ++i) {
            live += llmkv_emu.fibers[i].state != LLMKV_EMU_DONE;
            at_block += llmkv_emu.fibers[i].state == LLMKV_EMU_BLOCK;
        }
        if (!live) return;
        if (at_block == live) {
            for (i = 0; i < n; ++i)
                if (llmkv_emu.fibers[i].state == LLMKV_EMU_BLOCK) llmkv_emu.fibers[i].state = LLMKV_EMU_RUN;
            continue;
        }
        if (!ran) {
            fprintf(stderr, "gpu_emu: deadlock in block (%u,%u,%u): lanes disagree on a barrier or shuffle\n",
                    blockIdx.x, blockIdx.y, blockIdx.z);
            abort();
        }
    }
}

static void llmkv_emu_launch(dim3 grid, dim3 block, const std::function<void()>& body) {
    unsigned n = block.x * block.y * block.z, x, y, z;
    if (n == 0 || n > LLMKV_EMU_MAX_THREADS || grid.x == 0 || grid.y == 0 || grid.z == 0) {
        llmkv_emu.error = 9; /* cudaErrorInvalidConfiguration */
        return;
    }
    llmkv_emu.body = &body;
    blockDim = block;
    gridDim = grid;
    for (z = 0; z < grid.z; ++z)
        for (y = 0; y < grid.y; ++y)
            for (x = 0; x < grid.x; ++x) {
                blockIdx = dim3(x, y, z);
                llmkv_emu_run_block(n);
            }
}

#define LLMKV__LAUNCH(grid, block, stream, arg, ...)                                      \
    do {                                                                                  \
        (void)(stream);                                                                   \
        llmkv_emu_launch(dim3(grid), dim3(block), [&]() { __VA_ARGS__(arg); });          \
    } while (0)

static inline void __syncthreads(void) { llmkv_emu_yield(LLMKV_EMU_BLOCK); }

/* A shuffle: publish, wait for the warp, read the source lane's value. Two
   buffers by parity, so a lane racing ahead to its next shuffle never
   overwrites a value another lane has yet to read. */
template <class T> static T llmkv_emu_exchange(T v, unsigned src_lane) {
    llmkv_emu_fiber* f = llmkv_emu.cur;
    unsigned p = f->parity, base = f->tid / 32 * 32;
    uint64_t bits = 0, out;
    T r;
    memcpy(&bits, &v, sizeof v);
    llmkv_emu.shfl[p][f->tid] = bits;
    llmkv_emu_yield(LLMKV_EMU_WARP);
    out = llmkv_emu.shfl[p][base + src_lane];
    f->parity ^= 1u;
    memcpy(&r, &out, sizeof r);
    return r;
}
template <class T> static T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    unsigned lane = llmkv_emu.cur->tid % 32, seg = lane & ~(unsigned)(width - 1), src = lane ^ (unsigned)lane_mask;
    (void)mask;
    if (src < seg || src >= seg + (unsigned)width) src = lane;
    return llmkv_emu_exchange(v, src);
}
template <class T> static T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    unsigned lane = llmkv_emu.cur->tid % 32, seg = lane & ~(unsigned)(width - 1);
    (void)mask;
    return llmkv_emu_exchange(v, seg + (unsigned)src_lane % (unsigned)width);
}

/* ---- runtime ------------------------------------------------------------- */

typedef int cudaError_t;
typedef void* cudaStream_t;
typedef struct llmkv_emu_event* cudaEvent_t;
struct llmkv_emu_event { int recorded; };
enum {
    cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2, cudaErrorInsufficientDriver = 35,
    cudaErrorNoDevice = 100, cudaErrorInvalidDevice = 101
};
enum cudaMemcpyKind { cudaMemcpyHostToHost, cudaMemcpyHostToDevice, cudaMemcpyDeviceToHost, cudaMemcpyDeviceToDevice };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };
enum { cudaEventDisableTiming = 2 };
struct cudaDeviceProp {
    char name[256];
    int multiProcessorCount;
    size_t totalGlobalMem;
    int l2CacheSize;
};

static inline cudaError_t cudaGetLastError(void) {
    cudaError_t e = llmkv_emu.error;
    llmkv_emu.error = cudaSuccess;
    return e;
}
static inline const char* cudaGetErrorString(cudaError_t e) { return e ? "emulated CUDA error" : "no error"; }
static inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
static inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
static inline cudaError_t cudaSetDevice(int d) { return d == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
static inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int d) {
    (void)a;
    if (d != 0) return cudaErrorInvalidDevice;
    *v = LLMKV_EMU_SMS;
    return cudaSuccess;
}
static inline cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int d) {
    if (d != 0) return cudaErrorInvalidDevice;
    memset(p, 0, sizeof *p);
    strcpy(p->name, "llmkv CPU emulator");
    p->multiProcessorCount = LLMKV_EMU_SMS;
    p->totalGlobalMem = LLMKV_EMU_DEVICE_BYTES;
    p->l2CacheSize = 1 << 20;
    return cudaSuccess;
}
static inline cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

/* Device allocations carry their size in front, for the budget. */
static inline cudaError_t cudaMalloc(void** p, size_t n) {
    unsigned char* b;
    *p = NULL;
    if (n > LLMKV_EMU_DEVICE_BYTES - llmkv_emu.device_used) return cudaErrorMemoryAllocation;
    b = (unsigned char*)aligned_alloc(256, (n + 256 + 255) / 256 * 256);
    if (!b) return cudaErrorMemoryAllocation;
    memcpy(b, &n, sizeof n);
    llmkv_emu.device_used += n;
    *p = b + 256;
    return cudaSuccess;
}
static inline cudaError_t cudaFree(void* p) {
    size_t n;
    if (!p) return cudaSuccess;
    memcpy(&n, (unsigned char*)p - 256, sizeof n);
    llmkv_emu.device_used -= n;
    free((unsigned char*)p - 256);
    return cudaSuccess;
}
static inline cudaError_t cudaMallocHost(void** p, size_t n) {
    *p = aligned_alloc(4096, (n + 4095) / 4096 * 4096);
    return *p ? cudaSuccess : cudaErrorMemoryAllocation;
}
static inline cudaError_t cudaFreeHost(void* p) { free(p); return cudaSuccess; }
static inline cudaError_t cudaMemset(void* p, int v, size_t n) { memset(p, v, n); return cudaSuccess; }
static inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind k) {
    (void)k;
    if (n) memmove(d, s, n);
    return cudaSuccess;
}
static inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t st) {
    (void)st;
    return cudaMemcpy(d, s, n, k);
}
static inline cudaError_t cudaStreamCreate(cudaStream_t* s) { *s = (cudaStream_t)&llmkv_emu; return cudaSuccess; }
static inline cudaError_t cudaStreamDestroy(cudaStream_t s) { (void)s; return cudaSuccess; }
static inline cudaError_t cudaStreamSynchronize(cudaStream_t s) { (void)s; return cudaSuccess; }
static inline cudaError_t cudaEventCreate(cudaEvent_t* e) {
    *e = (cudaEvent_t)calloc(1, sizeof(llmkv_emu_event));
    return *e ? cudaSuccess : cudaErrorMemoryAllocation;
}
static inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned f) { (void)f; return cudaEventCreate(e); }
static inline cudaError_t cudaEventDestroy(cudaEvent_t e) { free(e); return cudaSuccess; }
static inline cudaError_t cudaEventRecord(cudaEvent_t e, cudaStream_t s) { (void)s; e->recorded = 1; return cudaSuccess; }
static inline cudaError_t cudaEventSynchronize(cudaEvent_t e) { (void)e; return cudaSuccess; }
static inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t a, cudaEvent_t b) {
    (void)a; (void)b;
    *ms = 0.0f;
    return cudaSuccess;
}

#endif /* LLMKV_GPU_EMU_H */
