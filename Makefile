# llmkv - build everything CPU-side into build/.
#   make         build the examples, tests and benchmarks
#   make test    build and run the test suite (last line: "N passed, N failed")
#   make demo    build and run build/quickstart
#   make bench   build and run the benchmarks
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
TEST_SRCS := tests/test_main.c tests/test_cache.c tests/test_model.c tests/test_fault.c tests/test_attn.c tests/test_quant.c tests/test_q4c.c tests/test_prefix.c tests/test_threads.c tests/llmkv_impl.c

.PHONY: all test demo bench clean

all: $(BUILD)/quickstart $(BUILD)/chat_prefix $(BUILD)/tests $(BUILD)/bench_cache_ops $(BUILD)/bench_attn_cpu \
     $(BUILD)/bench_prefix

$(BUILD):
	@mkdir -p $(BUILD)

$(BUILD)/quickstart: examples/quickstart.c $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ examples/quickstart.c $(LDFLAGS) $(LDLIBS)

$(BUILD)/chat_prefix: examples/chat_prefix.c $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ examples/chat_prefix.c $(LDFLAGS) $(LDLIBS)

$(BUILD)/tests: $(TEST_SRCS) tests/test_util.h tests/test_falloc.h $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) $(TEST_FLAGS) -o $@ $(TEST_SRCS) $(LDFLAGS) $(LDLIBS)

$(BUILD)/bench_cache_ops: bench/bench_cache_ops.c bench/bench_util.h $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ bench/bench_cache_ops.c $(LDFLAGS) $(LDLIBS)

$(BUILD)/bench_attn_cpu: bench/bench_attn_cpu.c bench/bench_util.h $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -pthread -o $@ bench/bench_attn_cpu.c $(LDFLAGS) $(LDLIBS) -lpthread

$(BUILD)/bench_prefix: bench/bench_prefix.c bench/bench_util.h $(HEADERS) | $(BUILD)
	$(CC) $(CFLAGS) -o $@ bench/bench_prefix.c $(LDFLAGS) $(LDLIBS)

test: $(BUILD)/tests
	$(BUILD)/tests

demo: $(BUILD)/quickstart
	$(BUILD)/quickstart

bench: $(BUILD)/bench_cache_ops $(BUILD)/bench_attn_cpu $(BUILD)/bench_prefix
	$(BUILD)/bench_cache_ops
	$(BUILD)/bench_attn_cpu
	$(BUILD)/bench_prefix

clean:
	rm -rf $(BUILD)
