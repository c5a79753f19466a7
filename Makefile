# llmkv - build everything CPU-side into build/.
#   make         build the examples, tests and benchmarks
#   make test    build and run the test suite (last line: "N passed, N failed")
#   make demo    build and run build/quickstart
#   make bench   build and run the benchmarks
#   make fuzz    build the libFuzzer targets with clang and run each for
#                FUZZ_SECONDS (default 60) from its corpus in fuzz/corpus/
# Variables: CC, CFLAGS, LDFLAGS, TEST_FLAGS (extra flags for the test binary),
# BUILD (output directory, default build).

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

.PHONY: all test demo bench fuzz clean

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

# libFuzzer targets (clang). Each fuzz/fuzz_<name>.c defines
# LLVMFuzzerTestOneInput; fuzz/corpus/<name>/ holds its seed corpus. The
# targets exercise parsing and metadata, so they build the scalar kernels
# only (LLMKV_NO_SIMD: the SIMD kernels triple the sanitized compile time
# and are covered by the attention tests on every path).
FUZZ_TARGETS := load import api llama
FUZZ_SECONDS ?= 60
FUZZ_CC      ?= clang
FUZZ_FLAGS   ?= -O1 -g -DLLMKV_NO_SIMD -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all

$(BUILD)/fuzz_%: fuzz/fuzz_%.c fuzz/fuzz_util.h $(HEADERS) | $(BUILD)
	$(FUZZ_CC) $(FUZZ_FLAGS) -o $@ $< -lm -pthread

$(BUILD)/fuzz_llama: examples/llama_model.h

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
