/* cuda_decode.c - a C program driving the GPU backend: a metadata-only cache,
   its device pool, and a few decode steps checked against the CPU kernels.

   The GPU implementation lives in one CUDA file (examples/llmkv_cuda_impl.cu
   defines LLMKV_IMPLEMENTATION and LLMKV_CUDA_IMPLEMENTATION); this file is
   plain C99 and sees only declarations. `make cuda` builds it:
       gcc -std=c99 -I. -I$(CUDA)/include -c examples/cuda_decode.c
       nvcc -o build/cuda_decode cuda_decode.o examples/llmkv_cuda_impl.cu
   Without a CUDA device it says so and exits 0.

   Each step, every sequence gains one token: the manager reserves it, the
   batch is uploaded, the new K/V are put (scattered into the pages on the
   device) and attention runs over the pages. A host cache receives the
   same operations, so the CPU's llmkv_attend checks every output. */
#define LLMKV_CUDA_DECLARATIONS_ONLY
#include "llmkv_cuda.cuh"

#include <cuda_runtime_api.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { N_SEQS = 4, N_KV = 8, N_Q = 32, D = 128, PROMPT = 300, STEPS = 8 };

static uint32_t rng = 12345u;
static float frand(void) {
    rng ^= rng << 13;
    rng ^= rng >> 17;
    rng ^= rng << 5;
    return (float)(rng >> 8) / 8388608.0f - 1.0f;
}

static int check(llmkv_result r, const char* what) {
    if (r == LLMKV_OK) return 0;
    fprintf(stderr, "%s: %s\n", what, llmkv_result_string(r));
    return 1;
}

int main(void) {
    llmkv_desc d;
    llmkv_cache *gpu_kv = NULL, *cpu_kv = NULL;
    llmkv_cuda* gpu = NULL;
    llmkv_batch *gb = NULL, *cb = NULL;
    llmkv_seq gs[N_SEQS], cs[N_SEQS];
    uint32_t q_lens[N_SEQS], i, step, n_rows;
    size_t kv_elems = (size_t)N_SEQS * PROMPT * N_KV * D, q_elems = (size_t)N_SEQS * N_Q * D;
    float *k = NULL, *v = NULL, *q = NULL, *out_gpu = NULL, *out_cpu = NULL;
    void *dk = NULL, *dv = NULL, *dq = NULL, *dout = NULL;
    double worst = 0.0;
    int fail = 0;

    if (llmkv_cuda_device_count() == 0) {
        printf("no CUDA device: nothing to run\n");
        return 0;
    }
    memset(&d, 0, sizeof d);
    d.n_layers = 1;
    d.n_kv_heads = N_KV;
    d.head_dim = D;
    d.n_pages = 256;
    d.k_dtype = d.v_dtype = LLMKV_DTYPE_F16;
    fail |= check(llmkv_cache_create(&d, &cpu_kv), "host cache");
    d.storage = LLMKV_STORAGE_METADATA_ONLY;
    fail |= check(llmkv_cache_create(&d, &gpu_kv), "metadata-only cache");
    if (fail) return 1;
    fail |= check(llmkv_cuda_create(gpu_kv, NULL, &gpu), "llmkv_cuda_create");
    fail |= check(llmkv_batch_create(gpu_kv, N_SEQS, N_SEQS * PROMPT, &gb), "batch");
    fail |= check(llmkv_batch_create(cpu_kv, N_SEQS, N_SEQS * PROMPT, &cb), "batch");
    k = (float*)malloc(kv_elems * 4);
    v = (float*)malloc(kv_elems * 4);
    q = (float*)malloc(q_elems * 4);
    out_gpu = (float*)malloc(q_elems * 4);
    out_cpu = (float*)malloc(q_elems * 4);
    if (fail || !k || !v || !q || !out_gpu || !out_cpu) goto done;
    if (cudaMalloc(&dk, kv_elems * 4) != cudaSuccess || cudaMalloc(&dv, kv_elems * 4) != cudaSuccess ||
        cudaMalloc(&dq, q_elems * 4) != cudaSuccess || cudaMalloc(&dout, q_elems * 4) != cudaSuccess) {
        fprintf(stderr, "cudaMalloc failed\n");
        fail = 1;
        goto done;
    }
    for (i = 0; i < N_SEQS; ++i) {
        fail |= check(llmkv_seq_create(gpu_kv, &gs[i]), "seq");
        fail |= check(llmkv_seq_create(cpu_kv, &cs[i]), "seq");
    }

    /* Step 0 is the prompt (a different length per sequence); then decode. */
    for (step = 0; step <= STEPS && !fail; ++step) {
        llmkv_attn_desc a;
        n_rows = 0;
        for (i = 0; i < N_SEQS; ++i) {
            q_lens[i] = step == 0 ? PROMPT - 40 * i : 1;
            n_rows += q_lens[i];
            fail |= check(llmkv_reserve(gpu_kv, gs[i], q_lens[i]), "reserve");
            fail |= check(llmkv_reserve(cpu_kv, cs[i], q_lens[i]), "reserve");
        }
        if (fail) break;
        fail |= check(llmkv_batch_build(gb, gs, q_lens, N_SEQS), "batch build");
        fail |= check(llmkv_batch_build(cb, cs, q_lens, N_SEQS), "batch build");
        for (i = 0; i < n_rows * N_KV * D; ++i) {
            k[i] = frand();
            v[i] = frand();
        }
        /* Host side: the same K/V, row by row of the batch. */
        {
            uint32_t row = 0;
            for (i = 0; i < N_SEQS; ++i) {
                fail |= check(llmkv_put(cpu_kv, cs[i], 0, q_lens[i], k + (size_t)row * N_KV * D, 0,
                                        v + (size_t)row * N_KV * D, 0, LLMKV_DTYPE_F32), "put");
                row += q_lens[i];
            }
        }
        cudaMemcpy(dk, k, (size_t)n_rows * N_KV * D * 4, cudaMemcpyHostToDevice);
        cudaMemcpy(dv, v, (size_t)n_rows * N_KV * D * 4, cudaMemcpyHostToDevice);
        fail |= check(llmkv_cuda_upload(gpu, gb, NULL), "upload");
        fail |= check(llmkv_cuda_put(gpu, 0, dk, 0, dv, 0, LLMKV_DTYPE_F32, NULL), "cuda put");
        if (step == 0) continue; /* the prompt's attention is prefill's business */

        for (i = 0; i < q_elems; ++i) q[i] = frand();
        cudaMemcpy(dq, q, q_elems * 4, cudaMemcpyHostToDevice);
        memset(&a, 0, sizeof a);
        a.n_q_heads = N_Q;
        a.q = (const float*)dq;
        a.out = (float*)dout;
        fail |= check(llmkv_cuda_decode(gpu, &a, NULL), "cuda decode");
        if (cudaDeviceSynchronize() != cudaSuccess) fail = 1;
        cudaMemcpy(out_gpu, dout, q_elems * 4, cudaMemcpyDeviceToHost);
        a.q = q;
        a.out = out_cpu;
        fail |= check(llmkv_attend(cpu_kv, cb, &a, NULL), "cpu attend");
        for (i = 0; i < q_elems; ++i) {
            double e = fabs((double)out_gpu[i] - (double)out_cpu[i]);
            worst = e > worst ? e : worst;
        }
    }
    if (!fail) {
        printf("%d sequences, %d decode steps, %d query heads over %d KV heads, head_dim %d, F16 pages\n", N_SEQS,
               STEPS, N_Q, N_KV, D);
        printf("largest |GPU - CPU| difference: %.3g\n", worst);
        if (worst > 1e-3) {
            fprintf(stderr, "GPU and CPU disagree\n");
            fail = 1;
        }
    }
done:
    cudaFree(dk);
    cudaFree(dv);
    cudaFree(dq);
    cudaFree(dout);
    free(k);
    free(v);
    free(q);
    free(out_gpu);
    free(out_cpu);
    llmkv_batch_destroy(gb);
    llmkv_batch_destroy(cb);
    llmkv_cuda_destroy(gpu);
    llmkv_cache_destroy(gpu_kv);
    llmkv_cache_destroy(cpu_kv);
    return fail;
}
