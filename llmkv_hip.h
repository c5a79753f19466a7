/* llmkv_hip.h - v0.1.0 - llmkv's GPU backend for AMD GPUs (HIP) - MIT or public domain

   The same kernel source as llmkv_cuda.cuh, compiled by hipcc: this header
   maps the CUDA runtime names that source uses to HIP's and includes it.
   The API keeps its llmkv_cuda_ names (a program links one backend).

       #define LLMKV_IMPLEMENTATION
       #define LLMKV_CUDA_IMPLEMENTATION
       #include "llmkv_hip.h"          // in one file compiled with hipcc

   Wavefronts. CDNA GPUs run 64 lanes per wavefront, RDNA 32 (or 64). The
   kernels use a *logical* warp of 32 lanes: every shuffle names width 32,
   and no kernel votes or ballots across a whole wavefront, so one source is
   correct for both widths (a 32-thread block runs as half a wavefront).

   LICENSE: see llmkv.h.
*/
#ifndef LLMKV_HIP_H
#define LLMKV_HIP_H

#ifndef LLMKV_CUDA_DECLARATIONS_ONLY
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>

#define LLMKV_GPU_HIP 1

#define cudaStream_t hipStream_t
#define cudaEvent_t hipEvent_t
#define cudaError_t hipError_t
#define cudaSuccess hipSuccess
#define cudaErrorMemoryAllocation hipErrorOutOfMemory
#define cudaErrorNoDevice hipErrorNoDevice
#define cudaErrorInsufficientDriver hipErrorInsufficientDriver
#define cudaErrorInvalidDevice hipErrorInvalidDevice
#define cudaGetLastError hipGetLastError
#define cudaGetDeviceCount hipGetDeviceCount
#define cudaGetDevice hipGetDevice
#define cudaSetDevice hipSetDevice
#define cudaDeviceGetAttribute hipDeviceGetAttribute
#define cudaDevAttrMultiProcessorCount hipDeviceAttributeMultiprocessorCount
#define cudaDeviceSynchronize hipDeviceSynchronize
#define cudaMalloc hipMalloc
#define cudaFree hipFree
#define cudaMallocHost hipHostMalloc
#define cudaFreeHost hipHostFree
#define cudaMemset hipMemset
#define cudaMemcpyAsync hipMemcpyAsync
#define cudaMemcpyKind hipMemcpyKind
#define cudaMemcpyHostToDevice hipMemcpyHostToDevice
#define cudaMemcpyDeviceToHost hipMemcpyDeviceToHost
#define cudaEventCreateWithFlags hipEventCreateWithFlags
#define cudaEventDisableTiming hipEventDisableTiming
#define cudaEventRecord hipEventRecord
#define cudaEventSynchronize hipEventSynchronize
#define cudaEventDestroy hipEventDestroy
/* Used by the tests and benchmarks, not by the library. */
#define cudaMemcpy hipMemcpy
#define cudaMemcpyDeviceToDevice hipMemcpyDeviceToDevice
#define cudaStreamCreate hipStreamCreate
#define cudaStreamDestroy hipStreamDestroy
#define cudaStreamSynchronize hipStreamSynchronize
#define cudaEventCreate hipEventCreate
#define cudaEventElapsedTime hipEventElapsedTime
#define cudaGetDeviceProperties hipGetDeviceProperties
#define cudaDeviceProp hipDeviceProp_t
#define cudaGetErrorString hipGetErrorString
#endif

#include "llmkv_cuda.cuh"

#endif /* LLMKV_HIP_H */
