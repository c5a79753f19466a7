# llmkv - build everything CPU-side into build/.
#   make         build the examples, tests and benchmarks
#   make test    build and run the test suite (last line: "N passed, N failed")
#   make demo    build and run build/quickstart
#   make bench   build and run the benchmarks
#   make fuzz    build the libFuzzer targets with clang and run each for
#                FUZZ_SECONDS (default 60) from its corpus in fuzz/corpus/
# GPU (need nvcc; not part of `make` or `make test`):
#   make cuda       build build/test_cuda, build/bench_attn_cuda and the C
#                   example build/cuda_decode
#   make test-cuda  build and run the GPU tests ("no CUDA device" and exit 0
#                   on a machine without one)
#   make bench-cuda build and run the GPU benchmark
#   make hip        compile the same tests and benchmark for AMD GPUs with
#                   hipcc (HIP_ARCHS, default gfx90a and gfx1030)
#   make test-gpu-emu  the GPU tests with every kernel emulated on the CPU
#                   (tests/gpu_emu.h; x86-64 and a C++ compiler, no CUDA)
# Variables: CC, CFLAGS, LDFLAGS, TEST_FLAGS (extra flags for the test binary),
# BUILD (output directory, default build), NVCC, CUDA_ARCHS (default sm_80
# and sm_90), HIPCC, HIP_ARCHS.

CC      ?= cc
BUILD   ?= build
OPT     ?= -O2 -g
WARN    ?= -Wall -Wextra -Wpedantic -Wshadow
CFLAGS  ?= $(OPT) -std=c99 $(WARN)
LDFLAGS ?=
LDLIBS  ?= -lm -pthread

HEADERS   := llmkv.h
TEST_SRCS := tests/test_main.c tests/test_cache.c tests/test_model.c tests/test_fault.c tests/test_attn.c tests/test_quant.c tests/test_q4c.c tests/test_prefix.c tests/test_threads.c tests/test_persist.c \
             tests/test_format.c tests/test_llama.c tests/llmkv_impl.c

.PHONY: all test demo bench fuzz clean cuda test-cuda bench-cuda hip test-gpu-emu

all: $(BUILD)/quickstart $(BUILD)/chat_prefix $(BUILD)/session_restore $(BUILD)/llama $(BUILD)/tests $(BUILD)/bench_cache_ops \
     $(BUILD)/bench_attn_cpu $(BUILD)/bench_prefix $(BUILD)/bench_persist

$(BUILD):
	@mkdir -p $(BUILD)

$(BUILD)/quickstart: examples/quickstart.c $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ examples/quickstart.c $(LDFLAGS) $(LDLIBS)

$(BUILD)/chat_prefix: examples/chat_prefix.c $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ examples/chat_prefix.c $(LDFLAGS) $(LDLIBS)

$(BUILD)/session_restore: examples/session_restore.c $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ examples/session_restore.c $(LDFLAGS) $(LDLIBS)

$(BUILD)/llama: examples/llama.c examples/llama_model.h $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ examples/llama.c $(LDFLAGS) $(LDLIBS)

$(BUILD)/tests: $(TEST_SRCS) tests/test_util.h tests/test_falloc.h examples/llama_model.h $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) $(TEST_FLAGS) -o $@ $(TEST_SRCS) $(LDFLAGS) $(LDLIBS)

$(BUILD)/bench_cache_ops: bench/bench_cache_ops.c bench/bench_util.h $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ bench/bench_cache_ops.c $(LDFLAGS) $(LDLIBS)

$(BUILD)/bench_attn_cpu: bench/bench_attn_cpu.c bench/bench_util.h $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -pthread -o $@ bench/bench_attn_cpu.c $(LDFLAGS) $(LDLIBS) -lpthread

$(BUILD)/bench_prefix: bench/bench_prefix.c bench/bench_util.h $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ bench/bench_prefix.c $(LDFLAGS) $(LDLIBS)

$(BUILD)/bench_persist: bench/bench_persist.c bench/bench_util.h $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ bench/bench_persist.c $(LDFLAGS) $(LDLIBS)

test: $(BUILD)/tests
	$(BUILD)/tests

demo: $(BUILD)/quickstart
	$(BUILD)/quickstart

bench: $(BUILD)/bench_cache_ops $(BUILD)/bench_attn_cpu $(BUILD)/bench_prefix $(BUILD)/bench_persist
	$(BUILD)/bench_cache_ops
	$(BUILD)/bench_attn_cpu
	$(BUILD)/bench_prefix
	$(BUILD)/bench_persist

# GPU backend (llmkv_cuda.cuh; llmkv_hip.h for AMD). One source per program
# holds the implementation of both headers.
NVCC       ?= nvcc
CUDA_ARCHS ?= 80 90
NVCCFLAGS  ?= -std=c++17 -O2 -g -Xcompiler -Wall,-Wextra $(foreach a,$(CUDA_ARCHS),-gencode arch=compute_$(a),code=sm_$(a))
HIPCC      ?= hipcc
HIP_ARCHS  ?= gfx90a gfx1030
HIPFLAGS   ?= -std=c++17 -O2 -Wall -Wextra $(foreach a,$(HIP_ARCHS),--offload-arch=$(a))
GPU_HEADERS := $(HEADERS) llmkv_cuda.cuh llmkv_hip.h
CUDA_HOME  ?= $(abspath $(dir $(shell command -v $(NVCC) 2>/dev/null))..)

# A C99 program that sees only the declarations, linked with the CUDA
# implementation file.
$(BUILD)/cuda_decode: examples/cuda_decode.c examples/llmkv_cuda_impl.cu $(GPU_HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -I. -isystem $(CUDA_HOME)/include -c -o $(BUILD)/cuda_decode.o examples/cuda_decode.c
	$(NVCC) $(NVCCFLAGS) -I. -o $@ $(BUILD)/cuda_decode.o examples/llmkv_cuda_impl.cu

$(BUILD)/test_cuda: tests/test_cuda.cu $(GPU_HEADERS) | $(BUILD)
	$(NVCC) $(NVCCFLAGS) -I. -Itests -o $@ tests/test_cuda.cu

$(BUILD)/bench_attn_cuda: bench/bench_attn_cuda.cu bench/bench_util.h $(GPU_HEADERS) | $(BUILD)
	$(NVCC) $(NVCCFLAGS) -I. -Ibench -o $@ bench/bench_attn_cuda.cu

$(BUILD)/test_hip: tests/test_cuda.cu $(GPU_HEADERS) | $(BUILD)
	$(HIPCC) $(HIPFLAGS) -DLLMKV_TEST_HIP -I. -Itests -x hip -o $@ tests/test_cuda.cu

$(BUILD)/bench_attn_hip: bench/bench_attn_cuda.cu bench/bench_util.h $(GPU_HEADERS) | $(BUILD)
	$(HIPCC) $(HIPFLAGS) -DLLMKV_BENCH_HIP -I. -Ibench -x hip -o $@ bench/bench_attn_cuda.cu

# The GPU tests on the CPU: tests/gpu_emu.h runs every kernel's threads as
# fibers (x86-64, a C++ compiler; no CUDA needed). CI runs it on every change.
# EMU_FLAGS may add sanitizers (CI: ASan + UBSan, device memory included).
CXX ?= c++
EMU_FLAGS ?= -O2 -g
$(BUILD)/test_gpu_emu: tests/test_cuda.cu tests/gpu_emu.h $(GPU_HEADERS) | $(BUILD)
	$(CXX) -std=c++17 $(EMU_FLAGS) -Wall -Wextra -Wno-unknown-pragmas -include tests/gpu_emu.h -I. -Itests -x c++ -o $@ tests/test_cuda.cu

test-gpu-emu: $(BUILD)/test_gpu_emu
	$(BUILD)/test_gpu_emu

cuda: $(BUILD)/test_cuda $(BUILD)/bench_attn_cuda $(BUILD)/cuda_decode

test-cuda: $(BUILD)/test_cuda
	$(BUILD)/test_cuda

bench-cuda: $(BUILD)/bench_attn_cuda
	$(BUILD)/bench_attn_cuda

hip: $(BUILD)/test_hip $(BUILD)/bench_attn_hip

# libFuzzer targets (clang). Each fuzz/fuzz_<name>.c defines
# LLVMFuzzerTestOneInput; fuzz/corpus/<name>/ holds its seed corpus. The
# targets exercise parsing and metadata, so they build the scalar kernels
# only (LLMKV_NO_SIMD: the SIMD kernels triple the sanitized compile time
# and are covered by the attention tests on every path).
FUZZ_TARGETS := load import api llama swap
FUZZ_SECONDS ?= 60
FUZZ_CC      ?= clang
FUZZ_FLAGS   ?= -O1 -g -DLLMKV_NO_SIMD -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all

$(BUILD)/fuzz_%: fuzz/fuzz_%.c fuzz/fuzz_util.h $(HEADERS) | $(BUILD)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< -lm -pthread

$(BUILD)/fuzz_llama: examples/llama_model.h

# The swap-buffer parser of the GPU backend, on the CPU emulator (C++).
FUZZ_CXX ?= clang++
$(BUILD)/fuzz_swap: fuzz/fuzz_swap.cc tests/gpu_emu.h $(GPU_HEADERS) | $(BUILD)
	$(FUZZ_CXX) -std=c++17 -Wno-unknown-pragmas $(FUZZ_FLAGS) -o $@ fuzz/fuzz_swap.cc -lm -pthread

fuzz: $(addprefix $(BUILD)/fuzz_,$(FUZZ_TARGETS))
	@for t in $(FUZZ_TARGETS); do \
	    echo "fuzz_$$t: $(FUZZ_SECONDS) s"; \
	    mkdir -p $(BUILD)/fuzz-corpus/$$t; \
	    $(BUILD)/fuzz_$$t -max_total_time=$(FUZZ_SECONDS) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
	        $(BUILD)/fuzz-corpus/$$t fuzz/corpus/$$t > $(BUILD)/fuzz_$$t.log 2>&1; rc=$$?; \
	    tail -n 12 $(BUILD)/fuzz_$$t.log; [ $$rc = 0 ] || exit 1; \
	done

clean:
	rm -rf $(BUILD)
