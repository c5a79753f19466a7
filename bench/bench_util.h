/* Helpers shared by the benchmarks: a monotonic clock, a deterministic
   generator for test data, the median of repeated timings, and the checks
   that stop a benchmark on a failed call or an unexpected state. Include
   after llmkv.h. */
#ifndef LLMKV_BENCH_UTIL_H
#define LLMKV_BENCH_UTIL_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static inline void fail_call(llmkv_result r, const char* call, const char* file, int line) {
    fprintf(stderr, "%s:%d: %s failed: %s\n", file, line, call, llmkv_result_string(r));
    exit(1);
}

/* Every llmkv call goes through CHECK, timed ones included: the compare and
   the never-taken branch cost well under a nanosecond. */
#define CHECK(call)                                                               \
    do {                                                                          \
        llmkv_result check_r_ = (call);                                           \
        if (check_r_ != LLMKV_OK) fail_call(check_r_, #call, __FILE__, __LINE__); \
    } while (0)

/* A loop found the cache in a state other than the one it meant to time. */
static inline void expect_u64(uint64_t got, uint64_t want, const char* what, const char* file, int line) {
    if (got != want) {
        fprintf(stderr, "%s:%d: %s is %llu, expected %llu\n", file, line, what, (unsigned long long)got,
                (unsigned long long)want);
        exit(1);
    }
}
#define EXPECT(got, want) expect_u64((uint64_t)(got), (uint64_t)(want), #got, __FILE__, __LINE__)

/* malloc that stops the benchmark on failure and zeroes the block, so every
   page is faulted in before anything is timed. */
static inline void* xmalloc(size_t size) {
    void* p = malloc(size ? size : 1);
    if (!p) {
        fprintf(stderr, "out of memory (%lu bytes)\n", (unsigned long)size);
        exit(1);
    }
    memset(p, 0, size);
    return p;
}

/* The cache's statistics (stopping the benchmark if the call fails). */
static inline llmkv_stats stats_of(llmkv_cache* kv) {
    llmkv_stats st;
    CHECK(llmkv_cache_stats(kv, &st));
    return st;
}

/* Runs the invariant checker; stops the benchmark with its message, naming
   `where`, when it finds an inconsistency. */
static inline void check_cache(llmkv_cache* kv, const char* where) {
    char message[256];
    if (llmkv_cache_check(kv, message, sizeof message) != LLMKV_OK) {
        fprintf(stderr, "%s: invariant violated: %s\n", where, message);
        exit(1);
    }
}

static inline uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* splitmix64. */
static inline uint64_t rng_next(uint64_t* s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline float rng_float(uint64_t* s) { /* uniform in [-1, 1) */
    return (float)((double)(rng_next(s) >> 11) * (2.0 / 9007199254740992.0) - 1.0);
}

static inline int cmp_double(const void* a, const void* b) {
    double x = *(const double*)a, y = *(const double*)b;
    return (x > y) - (x < y);
}

/* Median of v[0, n) (n >= 1); sorts v, so v[0] is then the minimum. */
static inline double median_of(double* v, int n) {
    qsort(v, (size_t)n, sizeof v[0], cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Whether a median meets its target (a target of 0 means none, and counts
   in neither tally); adds the outcome to *n_pass or *n_miss. */
static inline int target_met(double median, double target, int* n_pass, int* n_miss) {
    if (target <= 0) return 0;
    if (median < target) {
        ++*n_pass;
        return 1;
    }
    ++*n_miss;
    return 0;
}

#endif
