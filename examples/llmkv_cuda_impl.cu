/* The implementation of llmkv and its GPU backend, for C programs that see
   only declarations (examples/cuda_decode.c): compile this file with nvcc
   and link it with them. */
#define LLMKV_IMPLEMENTATION
#define LLMKV_CUDA_IMPLEMENTATION
#include "llmkv_cuda.cuh"
