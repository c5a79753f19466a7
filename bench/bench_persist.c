/* bench_persist.c - how fast llmkv saves and loads a cache, against what the
   machine itself can do.

   Shape: 32 layers, 8 KV heads, head_dim 128, page 16 tokens (Llama-3-8B
   class): an F16 page is 2 MiB, 128 KiB per token.

   1. Whole cache in memory, F16: llmkv_cache_save_mem and
      llmkv_cache_load_mem of a cache with about 1 GiB of pages in use
      (--quick: 64 MiB): eight sequences with the prefix index on, two of
      them forks that share their parents' pages (each shared page is
      saved once). Loads are timed three ways: into fresh memory from
      malloc (the default allocator, what a restarting engine gets: it
      includes the kernel faulting the pool in, 4 KiB at a time); on Linux
      into fresh memory from an allocator that asks for transparent huge
      pages (madvise MADV_HUGEPAGE); and into a pre-faulted arena (the
      library's own work alone). Machine figures: memcpy of the same number
      of bytes (the ceiling of a save), and malloc + memset of fresh memory,
      with and without huge pages (the floor of a load into fresh memory).
      Target: save and load at least 1 GB/s (the load: default allocator).

   2. Files in --dir: llmkv_cache_save_file (temporary file, fsync, rename,
      directory fsync) and llmkv_cache_load_file, against a plain write()
      of the same bytes + fsync and a plain read() of a file of that size.
      Reads run twice: right after the write (the file is in the page
      cache: memory speed, not the disk's), and after
      posix_fadvise(POSIX_FADV_DONTNEED) asks the kernel to drop the file's
      clean pages (no root needed, but only advice: the row says how much
      of the file mincore() still found resident, or that it cannot tell).
      The rows of one repetition run interleaved (the two writers taking
      turns to go first), so a slow spell of a shared disk hits them alike.

   3. Incremental checkpoints: after a checkpoint, ~1% of the pages are
      rewritten (sequence tails truncated to a page boundary and written
      again, the replaced pages evicted); then an LLMKV_SAVE_INCREMENTAL
      save and a full save of the same state are timed. At the end the
      base and every increment are loaded as one chain and compared with
      the live cache.

   4. Part 1 again with Q8 storage and the same page budget in bytes (so
      about twice the tokens). Same target.

   5. One long sequence: llmkv_seq_export and llmkv_seq_import of a
      sequence that fills the same budget (8192 tokens, 1 GiB; --quick 512
      tokens; 32k tokens of this shape would take 4 GiB). Imports go into a
      running cache of the same types (bytes copied as they are), and into
      a Q8 cache (converted; context, no target).

   Correctness is checked outside the timed sections, so a broken save
   cannot produce a fast figure: every saved size equals the predicted
   one, and every loaded or imported cache passes llmkv_cache_check, has
   the source's statistics and returns the same bytes from a gather of
   K, V and token ids at a place that changes with each repetition.

   Timing: one untimed warm-up, then `reps` repetitions; rows report the
   median and the best. GB = 1e9 bytes; GB/s = bytes of the saved buffer
   (or file, or copy) / seconds. The machine is shared and noisy: trust
   the median, read the best as the floor.

   Usage: bench_persist [--json] [--quick] [--reps N] [--dir DIR]
     --json    one JSON object per line and per case, nothing else on stdout
     --quick   64 MiB instead of 1 GiB, 3 repetitions: a smoke test
     --reps N  timed repetitions per row (3..51, default 5)
     --dir D   directory for the file cases (default /tmp); its files
               (llmkv_bench_persist.<pid>.*) are removed at exit

   Exit status 1, with a message on stderr, if an llmkv call or a file
   operation fails or a check finds a difference. Targets are printed
   PASS/MISS and never change the exit status. */
#define _POSIX_C_SOURCE 200809L /* clock_gettime, fsync, posix_fadvise, mmap */
#if defined(__linux__)
#define _DEFAULT_SOURCE /* MAP_ANONYMOUS, madvise, mincore */
#endif
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#define LLMKV_IMPLEMENTATION
#include "../llmkv.h"
#include "bench_util.h"

#define N_LAYERS 32u
#define N_KV_HEADS 8u
#define HEAD_DIM 128u
#define PAGE_SIZE 16u
#define ROW (N_KV_HEADS * HEAD_DIM) /* floats of one token's K (or V) in one layer */
#define MAX_REPS 51
#define N_SEQS 8u      /* whole-cache workload: 6 sequences and 2 forks */
#define CHUNK 128u     /* tokens per reserve + put while filling */
#define PEEK 16u       /* tokens compared by a verifying gather */
#define TARGET_GBPS 1.0
#define IO_CHUNK ((size_t)64 << 20)

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

static void die(const char* what, const char* detail) {
    fprintf(stderr, "bench_persist: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

static double seconds_since(uint64_t t0) { return (double)(now_ns() - t0) * 1e-9; }

static llmkv_desc model_desc(llmkv_dtype dtype, uint32_t n_pages, uint32_t max_seqs, int prefix_index) {
    llmkv_desc d;
    memset(&d, 0, sizeof d);
    d.n_layers = N_LAYERS;
    d.n_kv_heads = N_KV_HEADS;
    d.head_dim = HEAD_DIM;
    d.page_size = PAGE_SIZE;
    d.k_dtype = dtype;
    d.v_dtype = dtype;
    d.n_pages = n_pages;
    d.max_seqs = max_seqs;
    d.prefix_index = prefix_index ? 1u : 0u;
    return d;
}

static uint64_t page_bytes_of(llmkv_dtype dtype) {
    llmkv_desc d = model_desc(dtype, 1, 1, 0);
    llmkv_layout lay;
    CHECK(llmkv_layout_for(&d, &lay));
    return lay.page_bytes;
}

static double mib(uint64_t bytes) { return (double)bytes / (1024.0 * 1024.0); }

/* Random K/V data: puts read windows of this table at random offsets
   (generating 1 GiB of fresh random floats would take longer than the
   benchmark). */
typedef struct source {
    float* table;
    size_t len;
    uint64_t seed;
} source;

static void source_init(source* s, uint64_t seed) {
    size_t i;
    s->len = (size_t)4 << 20;
    s->table = (float*)xmalloc(s->len * sizeof(float));
    s->seed = seed;
    for (i = 0; i < s->len; ++i) s->table[i] = rng_float(&s->seed);
}

static const float* source_window(source* s, uint32_t n_tokens) {
    size_t span = s->len - (size_t)n_tokens * ROW;
    return s->table + (size_t)(rng_next(&s->seed) % span);
}

/* Appends n tokens to seq: reserve (with token ids when the cache has the
   prefix index), then K and V of every layer. */
static void append(llmkv_cache* kv, llmkv_seq seq, uint32_t n, int with_tokens, source* src) {
    llmkv_token ids[CHUNK];
    uint32_t done, c, i, layer;
    for (done = 0; done < n; done += c) {
        c = n - done < CHUNK ? n - done : CHUNK;
        if (with_tokens) {
            for (i = 0; i < c; ++i) ids[i] = (llmkv_token)(rng_next(&src->seed) >> 34);
            CHECK(llmkv_reserve_tokens(kv, seq, ids, c));
        } else {
            CHECK(llmkv_reserve(kv, seq, c));
        }
        for (layer = 0; layer < N_LAYERS; ++layer)
            CHECK(llmkv_put(kv, seq, layer, c, source_window(src, c), 0, source_window(src, c), 0,
                            LLMKV_DTYPE_F32));
    }
}

/* Compares what two caches return for sequence a in `ka` and b in `kb`:
   lengths, then K, V (as gathered: stored bytes for F16, F32 for Q8) and,
   with token ids, the ids of PEEK positions of one layer; `pick` chooses
   the layer and positions. The caller has checked kb's invariants. */
static void compare_seq(const llmkv_cache* ka, llmkv_seq a, const llmkv_cache* kb, llmkv_seq b,
                        uint64_t pick, int with_tokens, const char* where) {
    static float k1[PEEK * ROW], v1[PEEK * ROW], k2[PEEK * ROW], v2[PEEK * ROW];
    llmkv_token t1[PEEK], t2[PEEK];
    uint32_t la, lb, n, pos, layer;
    size_t bytes;
    llmkv_desc d;
    CHECK(llmkv_cache_desc(ka, &d));
    CHECK(llmkv_seq_length(ka, a, &la));
    CHECK(llmkv_seq_length(kb, b, &lb));
    if (la != lb) {
        fprintf(stderr, "bench_persist: %s: length %u, the source has %u\n", where, lb, la);
        exit(1);
    }
    if (la == 0) return;
    n = la < PEEK ? la : PEEK;
    pos = (uint32_t)(pick % (la - n + 1));
    layer = (uint32_t)((pick / 7) % N_LAYERS);
    CHECK(llmkv_gather(ka, a, layer, pos, n, k1, 0, v1, 0, LLMKV_DTYPE_DEFAULT));
    CHECK(llmkv_gather(kb, b, layer, pos, n, k2, 0, v2, 0, LLMKV_DTYPE_DEFAULT));
    /* DEFAULT gathers the stored elements of F16 (2 bytes), a quantized type as F32. */
    bytes = (size_t)n * ROW * (d.k_dtype == LLMKV_DTYPE_F16 ? 2u : 4u);
    if (memcmp(k1, k2, bytes) != 0 || memcmp(v1, v2, bytes) != 0) {
        fprintf(stderr, "bench_persist: %s: layer %u, positions %u..%u differ from the source\n",
                where, layer, pos, pos + n - 1);
        exit(1);
    }
    if (with_tokens) {
        CHECK(llmkv_seq_tokens(ka, a, pos, n, t1));
        CHECK(llmkv_seq_tokens(kb, b, pos, n, t2));
        if (memcmp(t1, t2, sizeof(llmkv_token) * n) != 0) {
            fprintf(stderr, "bench_persist: %s: token ids at %u..%u differ\n", where, pos, pos + n - 1);
            exit(1);
        }
    }
}

/* ------------------------------------------------------------------------ */
/* Timings and output                                                       */
/* ------------------------------------------------------------------------ */

typedef struct timing {
    double s[MAX_REPS]; /* seconds of each timed repetition */
    int n;
} timing;

static void timing_add(timing* t, int rep, double seconds) {
    if (rep >= 0) t->s[t->n++] = seconds; /* rep -1: warm-up */
}

typedef struct bench {
    int json, quick, reps;
    const char* dir;
    uint64_t budget; /* bytes of pages in use */
    int n_pass, n_miss;
} bench;

/* One line: `bytes` per repetition, median and best over t. target_gbps 0:
   no target. `extra`: more JSON fields (",\"k\":v"), `note`: more words. */
static void emit(bench* b, const char* name, const char* label, uint64_t bytes, timing* t,
                 double target_gbps, const char* extra, const char* note) {
    double median = median_of(t->s, t->n), best = t->s[0];
    double gbps = (double)bytes / median / 1e9, gbps_best = (double)bytes / best / 1e9;
    char notes[160];
    int met = 0;
    if (target_gbps > 0) /* target_met compares a cost: seconds per GB against 1 / target */
        met = target_met(median / ((double)bytes / 1e9), 1.0 / target_gbps, &b->n_pass, &b->n_miss);
    if (b->json) {
        printf("{\"bench\":\"persist\",\"case\":\"%s\",\"bytes\":%llu,\"seconds\":%.6f,"
               "\"seconds_min\":%.6f,\"gbps\":%.3f,\"gbps_best\":%.3f,\"reps\":%d",
               name, (unsigned long long)bytes, median, best, gbps, gbps_best, t->n);
        if (target_gbps > 0)
            printf(",\"target_gbps\":%.1f,\"target_met\":%s", target_gbps, met ? "true" : "false");
        printf("%s}\n", extra ? extra : "");
        return;
    }
    notes[0] = '\0';
    if (target_gbps > 0)
        snprintf(notes, sizeof notes, "target >= %.0f GB/s: %s%s", target_gbps, met ? "PASS" : "MISS",
                 note && *note ? "; " : "");
    printf("%-46s %9.1f %9.4f %8.2f %8.2f  %s%s\n", label, mib(bytes), median, gbps, gbps_best, notes,
           note ? note : "");
    fflush(stdout);
}

static void section(const bench* b, const char* title) {
    if (!b->json) printf("\n%s\n", title);
}

/* ------------------------------------------------------------------------ */
/* Machine figures                                                          */
/* ------------------------------------------------------------------------ */

/* memcpy between two buffers already faulted in: the ceiling of a save to
   memory (and of the copy part of a load). */
static void machine_memcpy(bench* b, uint64_t bytes) {
    unsigned char* x = (unsigned char*)xmalloc((size_t)bytes);
    unsigned char* y = (unsigned char*)xmalloc((size_t)bytes);
    timing t;
    int rep;
    memset(&t, 0, sizeof t);
    memset(x, 0x5a, (size_t)bytes);
    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t0 = now_ns();
        memcpy(y, x, (size_t)bytes);
        timing_add(&t, rep, seconds_since(t0));
        x[(size_t)rep & 4095] ^= y[(size_t)bytes - 1]; /* keep the copy alive */
    }
    emit(b, "machine_memcpy", "machine: memcpy, memory faulted in", bytes, &t, 0, NULL,
         "bytes copied / s");
    free(x);
    free(y);
}

/* Fresh memory straight from the kernel (Linux only): an anonymous
   mapping aligned to 2 MiB and, with huge set, madvise(MADV_HUGEPAGE):
   where the system's transparent-huge-page setting allows it, one fault
   maps 2 MiB instead of 4 KiB. NULL on failure. */
#if defined(__linux__)
#define HUGE_BYTES ((size_t)2 << 20)
static size_t huge_round(size_t n) { return (n + HUGE_BYTES - 1) & ~(HUGE_BYTES - 1); }

static void* map_fresh(size_t size, int huge) {
    size_t len = huge_round(size ? size : 1), total = len + HUGE_BYTES, head;
    unsigned char *p, *a;
    p = (unsigned char*)mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    a = (unsigned char*)(((uintptr_t)p + HUGE_BYTES - 1) & ~(uintptr_t)(HUGE_BYTES - 1));
    head = (size_t)(a - p);
    if (head) munmap(p, head);
    if (total - head > len) munmap(a + len, total - head - len);
    if (huge) (void)madvise(a, len, MADV_HUGEPAGE);
    return a;
}

static void unmap_fresh(void* p, size_t size) { munmap(p, huge_round(size ? size : 1)); }

/* An allocator for the loads: blocks of 2 MiB or more (the page pool)
   from map_fresh with huge pages, the rest from posix_memalign. What an
   engine could pass to get a loaded pool faulted in by huge pages. */
static void* huge_alloc(size_t size, size_t align, void* user) {
    void* p = NULL;
    (void)user;
    if (size >= HUGE_BYTES) return map_fresh(size, 1);
    if (posix_memalign(&p, align < sizeof(void*) ? sizeof(void*) : align, size ? size : 1) != 0) return NULL;
    return p;
}

static void huge_free(void* ptr, size_t size, void* user) {
    (void)user;
    if (size >= HUGE_BYTES) unmap_fresh(ptr, size);
    else free(ptr);
}
#endif

static void* volatile g_keep; /* the first-touch loops store here, so the compiler keeps them */

/* Fresh memory written once: what filling a newly allocated pool costs
   (the kernel maps and zeroes every page at its first touch). From malloc,
   then (Linux) from map_fresh with huge pages. */
static void machine_first_touch(bench* b, uint64_t bytes) {
    timing t, th;
    int rep;
    memset(&t, 0, sizeof t);
    memset(&th, 0, sizeof th);
    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t0 = now_ns();
        unsigned char* x = (unsigned char*)malloc((size_t)bytes);
        if (!x) die("out of memory", NULL);
        memset(x, 0x5a, (size_t)bytes);
        g_keep = x;
        timing_add(&t, rep, seconds_since(t0));
        free(x);
    }
    emit(b, "machine_first_touch", "machine: malloc + memset, fresh memory", bytes, &t, 0, NULL,
         "page faults: the floor of a load into malloc");
#if defined(__linux__)
    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t0 = now_ns();
        unsigned char* x = (unsigned char*)map_fresh((size_t)bytes, 1);
        if (!x) die("mmap failed", strerror(errno));
        memset(x, 0x5a, (size_t)bytes);
        g_keep = x;
        timing_add(&th, rep, seconds_since(t0));
        unmap_fresh(x, (size_t)bytes);
    }
    emit(b, "machine_first_touch_hugepage", "machine: mmap + MADV_HUGEPAGE + memset", bytes, &th, 0, NULL,
         "transparent huge pages, where the system allows");
#endif
}

/* Linux's load averages, or "?". */
static const char* load_average(char* buf, size_t size) {
    FILE* f = fopen("/proc/loadavg", "r");
    float a = 0, c = 0, d = 0;
    int n = f ? fscanf(f, "%f %f %f", &a, &c, &d) : 0;
    if (f) fclose(f);
    if (n == 3) snprintf(buf, size, "%.2f %.2f %.2f", (double)a, (double)c, (double)d);
    else snprintf(buf, size, "?");
    return buf;
}

/* ------------------------------------------------------------------------ */
/* Plain file I/O (the disk's own speed) and the page cache                 */
/* ------------------------------------------------------------------------ */

static char path_cache[4096], path_tmp[4096 + 8], path_raw[4096 + 8];

static void remove_files(void) {
    if (path_cache[0]) unlink(path_cache);
    if (path_tmp[0]) unlink(path_tmp);
    if (path_raw[0]) unlink(path_raw);
}

/* write() of bytes to path (created or truncated), fsync, close. */
static double plain_write(const char* path, const void* data, size_t bytes) {
    uint64_t t0 = now_ns();
    const unsigned char* p = (const unsigned char*)data;
    size_t done = 0;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) die(path, strerror(errno));
    while (done < bytes) {
        size_t n = bytes - done < IO_CHUNK ? bytes - done : IO_CHUNK;
        ssize_t w = write(fd, p + done, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) die("write", strerror(errno));
        done += (size_t)w;
    }
    if (fsync(fd) != 0) die("fsync", strerror(errno));
    if (close(fd) != 0) die("close", strerror(errno));
    return seconds_since(t0);
}

/* read() of the whole file into buf (capacity bytes); returns the seconds
   and checks that exactly `bytes` came. */
static double plain_read(const char* path, void* buf, size_t bytes) {
    uint64_t t0 = now_ns();
    unsigned char* p = (unsigned char*)buf;
    size_t done = 0;
    int fd = open(path, O_RDONLY);
    if (fd < 0) die(path, strerror(errno));
    for (;;) {
        size_t n = bytes - done < IO_CHUNK ? bytes - done : IO_CHUNK;
        ssize_t r;
        if (n == 0) break;
        r = read(fd, p + done, n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) die("read", strerror(errno));
        if (r == 0) break;
        done += (size_t)r;
    }
    close(fd);
    if (done != bytes) die("read: the file is shorter than written", path);
    return seconds_since(t0);
}

/* Asks the kernel to drop the file's pages from the page cache (they are
   clean: every writer here fsyncs). Advisory: see resident_fraction. */
static void drop_from_page_cache(const char* path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) die(path, strerror(errno));
    (void)posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    close(fd);
}

/* The fraction of the file's pages in the page cache (mincore), or -1
   where that cannot be asked. */
static double resident_fraction(const char* path) {
#if defined(__linux__)
    struct stat st;
    size_t len, pg = (size_t)sysconf(_SC_PAGESIZE), n, i, resident = 0;
    unsigned char* vec;
    void* map;
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    if (fstat(fd, &st) != 0 || st.st_size <= 0) {
        close(fd);
        return -1;
    }
    len = (size_t)st.st_size;
    map = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (map == MAP_FAILED) return -1;
    n = (len + pg - 1) / pg;
    vec = (unsigned char*)xmalloc(n);
    if (mincore(map, len, vec) != 0) {
        free(vec);
        munmap(map, len);
        return -1;
    }
    for (i = 0; i < n; ++i) resident += vec[i] & 1;
    free(vec);
    munmap(map, len);
    return (double)resident / (double)n;
#else
    (void)path;
    return -1;
#endif
}

static void resident_note(char* buf, size_t size, double worst) {
    if (worst < 0) snprintf(buf, size, "after fadvise DONTNEED; residency unknown");
    else if (worst > 0.05) snprintf(buf, size, "NOT cold: up to %.0f%% still in the page cache", 100 * worst);
    else snprintf(buf, size, "cold: at most %.1f%% in the page cache", 100 * worst);
}

/* ------------------------------------------------------------------------ */
/* A pre-faulted arena allocator (the loads' "library only" figure)         */
/* ------------------------------------------------------------------------ */

typedef struct arena {
    unsigned char* base;
    size_t size, used;
    size_t fallback; /* allocations that did not fit and went to malloc */
} arena;

static void* arena_alloc(size_t size, size_t align, void* user) {
    arena* a = (arena*)user;
    uintptr_t at = ((uintptr_t)(a->base + a->used) + align - 1) & ~(uintptr_t)(align - 1);
    size_t start = (size_t)(at - (uintptr_t)a->base);
    void* p = NULL;
    if (start <= a->size && size <= a->size - start) {
        a->used = start + size;
        return a->base + start;
    }
    a->fallback++;
    if (posix_memalign(&p, align < sizeof(void*) ? sizeof(void*) : align, size ? size : 1) != 0) return NULL;
    return p;
}

static void arena_free(void* ptr, size_t size, void* user) {
    arena* a = (arena*)user;
    (void)size;
    if ((unsigned char*)ptr < a->base || (unsigned char*)ptr >= a->base + a->size) free(ptr);
}

/* ------------------------------------------------------------------------ */
/* 1-4. The whole-cache workload                                            */
/* ------------------------------------------------------------------------ */

typedef struct workload {
    llmkv_dtype dtype;
    llmkv_cache* kv;
    llmkv_seq seqs[N_SEQS];
    uint32_t per_seq_pages; /* pages of each of the 6 base sequences */
    source src;
} workload;

/* Eight sequences over about b->budget bytes of pages: six of 16P - 5
   tokens (the last page partly filled), then forks of the first two, each
   extended by as many tokens (the shared partial page is copied at the
   first write; the full pages stay shared). */
static void workload_build(bench* b, workload* w, llmkv_dtype dtype) {
    uint64_t pages = b->budget / page_bytes_of(dtype);
    llmkv_desc d;
    uint32_t len, i;
    memset(w, 0, sizeof *w);
    w->dtype = dtype;
    w->per_seq_pages = (uint32_t)(pages / N_SEQS);
    if (w->per_seq_pages < 2) w->per_seq_pages = 2;
    d = model_desc(dtype, (uint32_t)pages + 32, N_SEQS + 2, 1);
    CHECK(llmkv_cache_create(&d, &w->kv));
    source_init(&w->src, 1000 + (uint64_t)dtype);
    len = PAGE_SIZE * w->per_seq_pages - 5;
    for (i = 0; i < N_SEQS - 2; ++i) {
        CHECK(llmkv_seq_create(w->kv, &w->seqs[i]));
        append(w->kv, w->seqs[i], len, 1, &w->src);
    }
    for (i = 0; i < 2; ++i) {
        CHECK(llmkv_fork(w->kv, w->seqs[i], &w->seqs[N_SEQS - 2 + i]));
        append(w->kv, w->seqs[N_SEQS - 2 + i], len, 1, &w->src);
    }
    check_cache(w->kv, "workload");
}

static void workload_destroy(workload* w) {
    llmkv_cache_destroy(w->kv);
    free(w->src.table);
    memset(w, 0, sizeof *w);
}

/* A loaded cache must equal the workload: invariants, statistics, and a
   gather of one sequence (which one, and where, changes with `pick`). */
static void verify_loaded(workload* w, llmkv_cache* got, uint64_t pick, const char* where) {
    llmkv_stats a = stats_of(w->kv), c;
    uint32_t i = (uint32_t)(pick % N_SEQS);
    check_cache(got, where);
    c = stats_of(got);
    if (a.n_pages_used != c.n_pages_used || a.n_pages_shared != c.n_pages_shared || a.n_seqs != c.n_seqs ||
        a.n_tokens != c.n_tokens || a.n_pages_cached != c.n_pages_cached ||
        a.n_pages_total != c.n_pages_total) {
        fprintf(stderr, "bench_persist: %s: statistics differ from the source (pages used %u / %u, "
                "shared %u / %u, sequences %u / %u, tokens %llu / %llu, cached %u / %u)\n", where,
                c.n_pages_used, a.n_pages_used, c.n_pages_shared, a.n_pages_shared, c.n_seqs, a.n_seqs,
                (unsigned long long)c.n_tokens, (unsigned long long)a.n_tokens, c.n_pages_cached,
                a.n_pages_cached);
        exit(1);
    }
    compare_seq(w->kv, w->seqs[i], got, w->seqs[i], pick * 2654435761u, 1, where);
}

/* Rewrites about 1% of the pages in use (at least one): tails of
   sequences 2..5 (no fork holds them) are truncated to a page boundary and
   written again with new data, so exactly `target` pages are new (the
   last of each tail partly filled, as before). Returns that count. */
static uint32_t change_pages(workload* w, uint32_t target) {
    uint32_t per[4] = {0, 0, 0, 0}, i, len;
    for (i = 0; i < target; ++i) per[i % 4]++;
    for (i = 0; i < 4; ++i) {
        llmkv_seq s = w->seqs[2 + i];
        if (per[i] == 0) continue;
        if (per[i] > w->per_seq_pages) per[i] = w->per_seq_pages;
        CHECK(llmkv_seq_length(w->kv, s, &len));
        CHECK(llmkv_truncate(w->kv, s, PAGE_SIZE * (w->per_seq_pages - per[i])));
        append(w->kv, s, len - PAGE_SIZE * (w->per_seq_pages - per[i]), 1, &w->src);
    }
    /* The replaced pages stay in the prefix index, held by no sequence:
       evict them, so every full save of this section has the same size. */
    CHECK(llmkv_prefix_evict(w->kv, UINT32_MAX, NULL));
    return per[0] + per[1] + per[2] + per[3];
}

static const char* dtype_label(llmkv_dtype t) { return t == LLMKV_DTYPE_Q8 ? "q8" : "f16"; }

/* 1, 4. save_mem, load_mem (malloc), load_mem (arena). Returns the saved
   image (caller frees) and its size, for the file section. */
static unsigned char* bench_whole_mem(bench* b, workload* w, size_t* image_size) {
    uint64_t size64;
    size_t size, written, arena_bytes, per_page;
    unsigned char* buf;
    llmkv_desc d;
    llmkv_stats st = stats_of(w->kv);
    timing ts, tl, th, ta;
    arena ar;
    llmkv_load_desc ld;
    char name[64], label[96], extra[160], note[96];
    const char* dt = dtype_label(w->dtype);
    int rep;

    CHECK(llmkv_cache_save_size(w->kv, 0, &size64));
    size = (size_t)size64;
    buf = (unsigned char*)xmalloc(size);
    memset(&ts, 0, sizeof ts);
    memset(&tl, 0, sizeof tl);
    memset(&th, 0, sizeof th);
    memset(&ta, 0, sizeof ta);
    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t0 = now_ns();
        CHECK(llmkv_cache_save_mem(w->kv, 0, buf, size, &written));
        timing_add(&ts, rep, seconds_since(t0));
        EXPECT(written, size);
    }
    for (rep = -1; rep < b->reps; ++rep) {
        const void* bufs[1];
        llmkv_cache* got;
        uint64_t t0;
        bufs[0] = buf;
        t0 = now_ns();
        CHECK(llmkv_cache_load_mem(bufs, &size, 1, NULL, &got));
        timing_add(&tl, rep, seconds_since(t0));
        verify_loaded(w, got, (uint64_t)(rep + 1), "load_mem");
        llmkv_cache_destroy(got);
    }

#if defined(__linux__)
    memset(&ld, 0, sizeof ld);
    ld.allocator.alloc = huge_alloc;
    ld.allocator.free = huge_free;
    for (rep = -1; rep < b->reps; ++rep) {
        const void* bufs[1];
        llmkv_cache* got;
        uint64_t t0;
        bufs[0] = buf;
        t0 = now_ns();
        CHECK(llmkv_cache_load_mem(bufs, &size, 1, &ld, &got));
        timing_add(&th, rep, seconds_since(t0));
        verify_loaded(w, got, (uint64_t)(rep + 51), "load_mem (huge pages)");
        llmkv_cache_destroy(got);
    }
#endif

    /* The arena: as large as the cache needs in one buffer, plus slack for
       anything else the load allocates; faulted in before the first load. */
    CHECK(llmkv_cache_desc(w->kv, &d));
    CHECK(llmkv_cache_memory_size(&d, &arena_bytes, &per_page));
    memset(&ar, 0, sizeof ar);
    ar.size = arena_bytes + ((size_t)64 << 20);
    ar.base = (unsigned char*)xmalloc(ar.size);
    memset(&ld, 0, sizeof ld);
    ld.allocator.alloc = arena_alloc;
    ld.allocator.free = arena_free;
    ld.allocator.user = &ar;
    for (rep = -1; rep < b->reps; ++rep) {
        const void* bufs[1];
        llmkv_cache* got;
        uint64_t t0;
        bufs[0] = buf;
        ar.used = 0;
        t0 = now_ns();
        CHECK(llmkv_cache_load_mem(bufs, &size, 1, &ld, &got));
        timing_add(&ta, rep, seconds_since(t0));
        verify_loaded(w, got, (uint64_t)(rep + 101), "load_mem (arena)");
        llmkv_cache_destroy(got);
    }

    snprintf(extra, sizeof extra, ",\"dtype\":\"%s\",\"pages_used\":%u,\"pages_shared\":%u,\"seqs\":%u,"
             "\"tokens\":%llu", dt, st.n_pages_used, st.n_pages_shared, st.n_seqs,
             (unsigned long long)st.n_tokens);
    snprintf(note, sizeof note, "%u pages (%u shared), %u seqs", st.n_pages_used, st.n_pages_shared,
             st.n_seqs);
    snprintf(name, sizeof name, "save_mem_%s", dt);
    snprintf(label, sizeof label, "llmkv_cache_save_mem %s", dt);
    emit(b, name, label, size, &ts, TARGET_GBPS, extra, note);
    snprintf(name, sizeof name, "load_mem_%s", dt);
    snprintf(label, sizeof label, "llmkv_cache_load_mem %s (malloc)", dt);
    emit(b, name, label, size, &tl, TARGET_GBPS, extra, "fresh memory: includes page faults");
    if (th.n) {
        snprintf(name, sizeof name, "load_mem_hugepage_%s", dt);
        snprintf(label, sizeof label, "llmkv_cache_load_mem %s (MADV_HUGEPAGE alloc)", dt);
        emit(b, name, label, size, &th, 0, extra, "fresh memory, pool faulted in by huge pages");
    }
    snprintf(name, sizeof name, "load_mem_arena_%s", dt);
    snprintf(label, sizeof label, "llmkv_cache_load_mem %s (pre-faulted arena)", dt);
    snprintf(note, sizeof note, "the library's own work%s",
             ar.fallback ? " (some allocations fell back to malloc)" : "");
    emit(b, name, label, size, &ta, 0, extra, note);
    free(ar.base);
    *image_size = size;
    return buf;
}

/* 2. Files: save_file / load_file against plain write + fsync / read, the
   rows of one repetition interleaved. */
static void bench_files(bench* b, workload* w, const unsigned char* image, size_t size) {
    timing t_write, t_save, t_read_warm, t_load_warm, t_read_cold, t_load_cold;
    unsigned char* rbuf = (unsigned char*)xmalloc(size);
    double worst_raw = 0, worst_cache = 0, fr;
    const char* paths[1];
    char note[96];
    uint64_t pick = 7;
    int rep;
    memset(&t_write, 0, sizeof t_write);
    memset(&t_save, 0, sizeof t_save);
    memset(&t_read_warm, 0, sizeof t_read_warm);
    memset(&t_load_warm, 0, sizeof t_load_warm);
    memset(&t_read_cold, 0, sizeof t_read_cold);
    memset(&t_load_cold, 0, sizeof t_load_cold);
    paths[0] = path_cache;
    for (rep = -1; rep < b->reps; ++rep) {
        llmkv_cache* got;
        uint64_t t0;
        struct stat st;
        /* The two writers take turns going first. Each replaces its own
           file of the previous repetition (O_TRUNC, or rename over it),
           so both pay for freeing the old blocks. */
        if (rep & 1) timing_add(&t_write, rep, plain_write(path_raw, image, size));
        t0 = now_ns();
        CHECK(llmkv_cache_save_file(w->kv, 0, path_cache, NULL));
        timing_add(&t_save, rep, seconds_since(t0));
        if (!(rep & 1)) timing_add(&t_write, rep, plain_write(path_raw, image, size));
        if (stat(path_cache, &st) != 0) die(path_cache, strerror(errno));
        EXPECT(st.st_size, size);
        if (rep == -1) { /* the file holds the bytes save_mem wrote */
            timing_add(&t_read_warm, rep, plain_read(path_cache, rbuf, size));
            if (memcmp(rbuf, image, size) != 0) {
                /* Not required by the format (a file may carry its own
                   identity), so say it, but go on. */
                if (!b->json) printf("  (note: the file's bytes differ from save_mem's image)\n");
            }
        }
        /* Warm: both files were just written, so they are in the page cache. */
        timing_add(&t_read_warm, rep, plain_read(path_raw, rbuf, size));
        if (memcmp(rbuf, image, size) != 0) die("plain read returned other bytes", path_raw);
        t0 = now_ns();
        CHECK(llmkv_cache_load_file(paths, 1, NULL, &got));
        timing_add(&t_load_warm, rep, seconds_since(t0));
        verify_loaded(w, got, pick++, "load_file");
        llmkv_cache_destroy(got);
        /* Cold: dropped from the page cache first, as far as the kernel agrees. */
        drop_from_page_cache(path_raw);
        fr = resident_fraction(path_raw);
        if (fr < 0 || worst_raw < 0) worst_raw = -1;
        else if (fr > worst_raw) worst_raw = fr;
        timing_add(&t_read_cold, rep, plain_read(path_raw, rbuf, size));
        drop_from_page_cache(path_cache);
        fr = resident_fraction(path_cache);
        if (fr < 0 || worst_cache < 0) worst_cache = -1;
        else if (fr > worst_cache) worst_cache = fr;
        t0 = now_ns();
        CHECK(llmkv_cache_load_file(paths, 1, NULL, &got));
        timing_add(&t_load_cold, rep, seconds_since(t0));
        verify_loaded(w, got, pick++, "load_file (cold)");
        llmkv_cache_destroy(got);
    }
    emit(b, "disk_write_fsync", "disk: write() + fsync, same bytes", size, &t_write, 0, NULL,
         "the disk's own speed");
    emit(b, "save_file_f16", "llmkv_cache_save_file f16", size, &t_save, 0, NULL,
         "tmp file + fsync + rename + dir fsync");
    emit(b, "disk_read_page_cache", "disk: read(), file in the page cache", size, &t_read_warm, 0, NULL,
         "memory speed, not the disk's");
    emit(b, "load_file_page_cache_f16", "llmkv_cache_load_file f16, page cache", size, &t_load_warm, 0,
         NULL, "file just written: in the page cache");
    resident_note(note, sizeof note, worst_raw);
    emit(b, "disk_read_cold", "disk: read(), dropped from the page cache", size, &t_read_cold, 0, NULL,
         note);
    resident_note(note, sizeof note, worst_cache);
    emit(b, "load_file_cold_f16", "llmkv_cache_load_file f16, dropped", size, &t_load_cold, 0, NULL, note);
    free(rbuf);
}

/* 3. Incremental checkpoints. */
static void bench_incremental(bench* b, workload* w) {
    llmkv_stats st = stats_of(w->kv);
    uint32_t target = (st.n_pages_used + 50) / 100, changed = 0;
    unsigned char* bufs[MAX_REPS + 2];
    const void* cbufs[MAX_REPS + 2];
    size_t sizes[MAX_REPS + 2], written, full_size = 0, inc_bytes = 0;
    uint64_t size64;
    unsigned char* full;
    timing ti, tf;
    char extra[160], note[96];
    llmkv_cache* got;
    int rep, n = 0, i;
    uint64_t t0;
    double chain_s;
    if (target == 0) target = 1;
    memset(&ti, 0, sizeof ti);
    memset(&tf, 0, sizeof tf);
    /* The base: a full checkpoint. */
    CHECK(llmkv_cache_save_size(w->kv, LLMKV_SAVE_CHECKPOINT, &size64));
    sizes[n] = (size_t)size64;
    bufs[n] = (unsigned char*)xmalloc(sizes[n]);
    CHECK(llmkv_cache_save_mem(w->kv, LLMKV_SAVE_CHECKPOINT, bufs[n], sizes[n], &written));
    EXPECT(written, sizes[n]);
    n++;
    CHECK(llmkv_cache_save_size(w->kv, 0, &size64));
    full = (unsigned char*)xmalloc((size_t)size64 + ((size_t)16 << 20));
    for (rep = -1; rep < b->reps; ++rep) {
        changed = change_pages(w, target);
        CHECK(llmkv_cache_save_size(w->kv, LLMKV_SAVE_INCREMENTAL, &size64));
        sizes[n] = (size_t)size64;
        bufs[n] = (unsigned char*)xmalloc(sizes[n]);
        t0 = now_ns();
        CHECK(llmkv_cache_save_mem(w->kv, LLMKV_SAVE_INCREMENTAL, bufs[n], sizes[n], &written));
        timing_add(&ti, rep, seconds_since(t0));
        EXPECT(written, sizes[n]);
        inc_bytes = sizes[n];
        n++;
        /* A full save of the same state (flags 0: the chain is not reset). */
        CHECK(llmkv_cache_save_size(w->kv, 0, &size64));
        if (size64 > (uint64_t)sizes[0] + ((uint64_t)16 << 20)) die("full save grew past its buffer", NULL);
        full_size = (size_t)size64;
        t0 = now_ns();
        CHECK(llmkv_cache_save_mem(w->kv, 0, full, full_size, &written));
        timing_add(&tf, rep, seconds_since(t0));
        EXPECT(written, full_size);
    }
    /* The chain: base + every increment must give the live cache. */
    for (i = 0; i < n; ++i) cbufs[i] = bufs[i];
    t0 = now_ns();
    CHECK(llmkv_cache_load_mem(cbufs, sizes, (uint32_t)n, NULL, &got));
    chain_s = seconds_since(t0);
    for (i = 0; i < 4; ++i) { /* the changed sequences, at their tails */
        uint32_t len;
        CHECK(llmkv_seq_length(w->kv, w->seqs[2 + i], &len));
        compare_seq(w->kv, w->seqs[2 + i], got, w->seqs[2 + i], (uint64_t)len, 1, "checkpoint chain");
    }
    verify_loaded(w, got, 3, "checkpoint chain");
    llmkv_cache_destroy(got);

    snprintf(extra, sizeof extra, ",\"dtype\":\"f16\",\"pages_changed\":%u,\"pages_used\":%u,"
             "\"full_bytes\":%llu", changed, st.n_pages_used, (unsigned long long)full_size);
    snprintf(note, sizeof note, "%u of %u pages changed (%.1f%%): %.2f%% of a full save's bytes",
             changed, st.n_pages_used, 100.0 * changed / st.n_pages_used,
             100.0 * (double)inc_bytes / (double)full_size);
    emit(b, "save_incremental_f16", "save_mem INCREMENTAL f16, ~1% pages changed", inc_bytes, &ti, 0,
         extra, note);
    snprintf(extra, sizeof extra, ",\"dtype\":\"f16\"");
    emit(b, "save_full_f16_same_state", "save_mem full f16, the same state", full_size, &tf, 0, extra,
         "for comparison");
    {
        double med_i = median_of(ti.s, ti.n), med_f = median_of(tf.s, tf.n);
        if (b->json)
            printf("{\"bench\":\"persist\",\"case\":\"incremental_vs_full\",\"bytes\":%llu,\"seconds\":%.6f,"
                   "\"gbps\":%.3f,\"full_bytes\":%llu,\"full_seconds\":%.6f,\"time_ratio\":%.4f,"
                   "\"bytes_ratio\":%.4f,\"chain_files\":%d,\"chain_load_seconds\":%.6f}\n",
                   (unsigned long long)inc_bytes, med_i, (double)inc_bytes / med_i / 1e9,
                   (unsigned long long)full_size, med_f, med_i / med_f, (double)inc_bytes / (double)full_size,
                   n, chain_s);
        else
            printf("  increment: %.2f ms and %.1f MiB against a full save's %.1f ms and %.1f MiB "
                   "(%.1f%% of the time, %.2f%% of the bytes);\n"
                   "  loading the base and its %d increments as one chain: %.3f s, checked against the "
                   "live cache\n",
                   med_i * 1e3, mib(inc_bytes), med_f * 1e3, mib(full_size), 100 * med_i / med_f,
                   100.0 * (double)inc_bytes / (double)full_size, n - 1, chain_s);
    }
    for (i = 0; i < n; ++i) free(bufs[i]);
    free(full);
}

/* ------------------------------------------------------------------------ */
/* 5. One long sequence: export and import                                  */
/* ------------------------------------------------------------------------ */

static void bench_sequence(bench* b) {
    uint32_t tokens = (uint32_t)(b->budget / (page_bytes_of(LLMKV_DTYPE_F16) / PAGE_SIZE));
    uint32_t n_pages = tokens / PAGE_SIZE + 2, n_shared;
    llmkv_desc d = model_desc(LLMKV_DTYPE_F16, n_pages, 2, 0);
    llmkv_desc dq = model_desc(LLMKV_DTYPE_Q8, n_pages, 2, 0);
    llmkv_cache *kv, *dst, *dst_q8;
    llmkv_seq s, got;
    source src;
    uint64_t size64;
    size_t size, written;
    unsigned char* buf;
    timing te, ti, tq;
    char extra[96], note[96];
    int rep;
    memset(&te, 0, sizeof te);
    memset(&ti, 0, sizeof ti);
    memset(&tq, 0, sizeof tq);
    CHECK(llmkv_cache_create(&d, &kv));
    CHECK(llmkv_cache_create(&d, &dst));
    CHECK(llmkv_cache_create(&dq, &dst_q8));
    source_init(&src, 77);
    CHECK(llmkv_seq_create(kv, &s));
    append(kv, s, tokens, 0, &src);

    CHECK(llmkv_seq_export_size(kv, s, &size64));
    size = (size_t)size64;
    buf = (unsigned char*)xmalloc(size);
    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t0 = now_ns();
        CHECK(llmkv_seq_export(kv, s, buf, size, &written));
        timing_add(&te, rep, seconds_since(t0));
        EXPECT(written, size);
    }
    for (rep = -1; rep < b->reps; ++rep) {
        uint64_t t0 = now_ns();
        CHECK(llmkv_seq_import(dst, buf, size, &got, &n_shared));
        timing_add(&ti, rep, seconds_since(t0));
        EXPECT(n_shared, 0);
        check_cache(dst, "seq_import");
        compare_seq(kv, s, dst, got, (uint64_t)(rep + 2) * 40503u, 0, "seq_import");
        CHECK(llmkv_seq_free(dst, got));
    }
    for (rep = -1; rep < b->reps; ++rep) {
        static float k1[PEEK * ROW], k2[PEEK * ROW];
        uint32_t len, pos, layer, i;
        uint64_t t0 = now_ns();
        CHECK(llmkv_seq_import(dst_q8, buf, size, &got, &n_shared));
        timing_add(&tq, rep, seconds_since(t0));
        check_cache(dst_q8, "seq_import into q8");
        CHECK(llmkv_seq_length(dst_q8, got, &len));
        EXPECT(len, tokens);
        /* Converted: F16 values in [-1, 1) stored as Q8 are within a
           quantization step (1/127 of the group's largest) of the source. */
        pos = (uint32_t)((uint64_t)(rep + 2) * 40503u % (tokens - PEEK + 1));
        layer = (uint32_t)(rep + 1) % N_LAYERS;
        CHECK(llmkv_gather(kv, s, layer, pos, PEEK, k1, 0, NULL, 0, LLMKV_DTYPE_F32));
        CHECK(llmkv_gather(dst_q8, got, layer, pos, PEEK, k2, 0, NULL, 0, LLMKV_DTYPE_F32));
        for (i = 0; i < PEEK * ROW; ++i)
            if (fabsf(k1[i] - k2[i]) > 0.01f) {
                fprintf(stderr, "bench_persist: seq_import into q8: element %u is %g, the source %g\n", i,
                        (double)k2[i], (double)k1[i]);
                exit(1);
            }
        CHECK(llmkv_seq_free(dst_q8, got));
    }
    snprintf(extra, sizeof extra, ",\"dtype\":\"f16\",\"tokens\":%u", tokens);
    snprintf(note, sizeof note, "one sequence of %u tokens", tokens);
    emit(b, "seq_export_f16", "llmkv_seq_export f16", size, &te, 0, extra, note);
    emit(b, "seq_import_f16", "llmkv_seq_import f16 -> f16", size, &ti, 0, extra,
         "into a running cache: bytes copied as they are");
    emit(b, "seq_import_f16_to_q8", "llmkv_seq_import f16 -> q8", size, &tq, 0, extra,
         "converted (bytes of the export / s)");
    free(buf);
    free(src.table);
    llmkv_cache_destroy(dst_q8);
    llmkv_cache_destroy(dst);
    llmkv_cache_destroy(kv);
}

/* ------------------------------------------------------------------------ */

int main(int argc, char** argv) {
    bench b;
    workload w;
    unsigned char* image;
    size_t image_size;
    uint64_t t_start = now_ns();
    char la[64];
    int i;
    memset(&b, 0, sizeof b);
    b.reps = 5;
    b.dir = "/tmp";
    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--json") == 0) {
            b.json = 1;
        } else if (strcmp(argv[i], "--quick") == 0) {
            b.quick = 1;
            b.reps = 3;
        } else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) {
            b.reps = atoi(argv[++i]);
            if (b.reps < 3 || b.reps > MAX_REPS) {
                fprintf(stderr, "bench_persist: --reps takes 3..%d\n", MAX_REPS);
                return 2;
            }
        } else if (strcmp(argv[i], "--dir") == 0 && i + 1 < argc) {
            b.dir = argv[++i];
        } else {
            fprintf(stderr, "usage: %s [--json] [--quick] [--reps N] [--dir DIR]\n", argv[0]);
            return 2;
        }
    }
    b.budget = b.quick ? (uint64_t)64 << 20 : (uint64_t)1 << 30;
    if (strlen(b.dir) + 64 > sizeof path_cache) die("--dir: path too long", NULL);
    snprintf(path_cache, sizeof path_cache, "%s/llmkv_bench_persist.%ld.bin", b.dir, (long)getpid());
    snprintf(path_tmp, sizeof path_tmp, "%s.tmp", path_cache);
    snprintf(path_raw, sizeof path_raw, "%s.raw", path_cache);
    atexit(remove_files);

    if (!b.json) {
        printf("llmkv %s persistence benchmark: %u layers x %u KV heads x %u dims, page %u tokens, "
               "%.0f MiB of pages%s\n",
               llmkv_version(), N_LAYERS, N_KV_HEADS, HEAD_DIM, PAGE_SIZE, mib(b.budget),
               b.quick ? " (--quick)" : "");
        printf("%d timed repetitions per row after a warm-up; GB = 1e9 bytes; %ld CPUs online, load "
               "average %s; files in %s\n",
               b.reps, sysconf(_SC_NPROCESSORS_ONLN), load_average(la, sizeof la), b.dir);
        printf("GB/s: bytes of the saved image (or file, or copy) / median seconds; best: the same at "
               "the fastest repetition\n");
        printf("\n%-46s %9s %9s %8s %8s  %s\n", "case", "MiB", "median s", "GB/s", "best", "notes");
    }

    section(&b, "-- 1. whole cache in memory, f16");
    workload_build(&b, &w, LLMKV_DTYPE_F16);
    image = bench_whole_mem(&b, &w, &image_size);
    machine_memcpy(&b, image_size);
    machine_first_touch(&b, image_size);

    section(&b, "-- 2. files, f16 (rows interleaved per repetition)");
    bench_files(&b, &w, image, image_size);
    free(image);

    section(&b, "-- 3. incremental checkpoint, f16");
    bench_incremental(&b, &w);
    workload_destroy(&w);

    section(&b, "-- 4. whole cache in memory, q8 (the same page budget)");
    workload_build(&b, &w, LLMKV_DTYPE_Q8);
    image = bench_whole_mem(&b, &w, &image_size);
    free(image);
    workload_destroy(&w);

    section(&b, "-- 5. one long sequence: export and import");
    bench_sequence(&b);

    if (!b.json)
        printf("\ntargets: %d PASS, %d MISS; %.1f s\n", b.n_pass, b.n_miss,
               (double)(now_ns() - t_start) / 1e9);
    return 0;
}
