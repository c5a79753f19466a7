/* fuzz_load.c - libFuzzer target for llmkv_cache_load_mem / _load_file.

   Each input is loaded these ways:
     1. the whole input as one buffer (llmkv_cache_load_mem);
     2. the same bytes through llmkv_cache_load_file with in-memory file
        ops: it must agree with (1) on success or failure, and give the
        same stats; a read error at each of the first reads gives
        LLMKV_ERR_IO;
     3. when (1) succeeds, again with the k-th allocation of the load
        failing, for every allocation it makes (at most 8): the load must
        fail and release everything it took;
     4. the whole input with its checksums fixed (fz_fix_checksums: the
        header's size and CRC, every section's CRC-32C, the END record),
        when that changes it, so that mutations reach the checks behind
        the checksums;
     5. split into a chain of two buffers (a base and an increment): the
        first two bytes (little-endian) give the length of the first
        buffer (bits 0-14) and whether to fix the checksums of both (bit
        15; the increment's parent then becomes the base's identity); the first
        buffer starts at byte 2, the second takes the rest. The two copies
        are misaligned by 1 and 3 bytes (the API takes any alignment).
   Every successful load must give a cache that passes llmkv_cache_check,
   whose live sequences (found by probing handle ids, counted against
   llmkv_cache_stats) can be read (length, pages, tokens, gather, a batch
   and an attention call), that saves (exact size, BUFFER_TOO_SMALL one
   byte short) into a buffer that loads again with equal stats, that
   saves an increment which loads on top of the input, and that serves new
   work: a new sequence (create, reserve, put, gather with the values
   checked), then on each loaded sequence prefix matches, a prefix
   sequence and a pin from its own token ids, publish, a fork written past
   its end, truncate and reserve; every pin released, every evictable page
   evicted, every sequence freed, llmkv_cache_check after each step.
   Nothing may stay allocated after an input. Build: make build/fuzz_load. */
#include "fuzz_util.h"

#define PROBE_MAX 4096u
#define GATHER_MAX_BYTES ((size_t)1 << 20)

/* ------------------------------------------------------------------------ */
/* In-memory file ops for llmkv_cache_load_file                             */
/* ------------------------------------------------------------------------ */

typedef struct mem_file {
    const unsigned char* data;
    size_t size, pos;
    int open;
} mem_file;

typedef struct mem_fs {
    mem_file files[4];
    uint32_t n;
    long fail_read_in; /* > 0: that read (counted from 1) fails */
} mem_fs;

static void* mem_open_read(void* user, const char* path) {
    mem_fs* fs = (mem_fs*)user;
    unsigned i = (unsigned)(path[0] - '0');
    if (path[0] < '0' || i >= fs->n || path[1] != 0 || fs->files[i].open) return NULL;
    fs->files[i].pos = 0;
    fs->files[i].open = 1;
    return &fs->files[i];
}
static int mem_read(void* user, void* file, void* data, size_t n, size_t* got) {
    mem_fs* fs = (mem_fs*)user;
    mem_file* f = (mem_file*)file;
    size_t k;
    FZ_ASSERT(f->open);
    *got = 0;
    if (fs->fail_read_in > 0 && --fs->fail_read_in == 0) return 1;
    k = f->size - f->pos < n ? f->size - f->pos : n;
    if (k) memcpy(data, f->data + f->pos, k);
    f->pos += k;
    *got = k;
    return 0;
}
static int mem_close(void* user, void* file) {
    mem_file* f = (mem_file*)file;
    (void)user;
    FZ_ASSERT(f->open);
    f->open = 0;
    return 0;
}
static void* mem_open_write(void* user, const char* path) {
    (void)user;
    (void)path;
    return NULL;
}

static llmkv_result load_files(const unsigned char* const* bufs, const size_t* sizes, uint32_t n, long fail_read_in,
                               llmkv_cache** out) {
    static const char* names[4] = {"0", "1", "2", "3"};
    llmkv_file_ops ops;
    mem_fs fs;
    llmkv_load_desc ld = fz_load_desc();
    llmkv_result r;
    uint32_t i;
    memset(&ops, 0, sizeof ops);
    memset(&fs, 0, sizeof fs);
    for (i = 0; i < n; ++i) {
        fs.files[i].data = bufs[i];
        fs.files[i].size = sizes[i];
    }
    fs.n = n;
    fs.fail_read_in = fail_read_in;
    ops.open_read = mem_open_read;
    ops.read = mem_read;
    ops.close = mem_close;
    ops.open_write = mem_open_write;
    ops.user = &fs;
    ld.file_ops = &ops;
    r = llmkv_cache_load_file(names, n, &ld, out);
    for (i = 0; i < n; ++i) FZ_ASSERT(!fs.files[i].open); /* every opened file closed */
    return r;
}

/* ------------------------------------------------------------------------ */
/* Exercising a loaded cache                                                */
/* ------------------------------------------------------------------------ */

/* Live sequence handles, found by probing ids gen << bits | slot (the
   packing llmkv_seq documents: a slot index and a generation). */
static uint32_t probe_seqs(llmkv_cache* c, const llmkv_desc* d, uint32_t want, llmkv_seq* out, uint32_t cap) {
    uint32_t bits, gen, slot, n = 0, probes = 0, slots = d->max_seqs < 256 ? d->max_seqs : 256;
    for (bits = 1; ((uint32_t)1 << bits) < d->max_seqs; ++bits) {}
    for (gen = 1; gen < 64 && n < want && n < cap && probes < PROBE_MAX; ++gen)
        for (slot = 0; slot < slots && n < want && n < cap && probes < PROBE_MAX; ++slot, ++probes) {
            llmkv_seq s;
            uint32_t len;
            if (bits < 32 && gen > (0xffffffffu >> bits)) break;
            s.id = gen << bits | slot;
            if (llmkv_seq_length(c, s, &len) == LLMKV_OK) out[n++] = s;
        }
    return n;
}

/* Reads everything of one sequence that the read-only API offers. */
static void read_seq(llmkv_cache* c, const llmkv_desc* d, llmkv_seq s) {
    uint32_t len, n_pages = 0, layer, row = d->n_kv_heads * d->head_dim, chunk;
    uint32_t* pages;
    float *kb, *vb;
    llmkv_result r;
    FZ_OK(llmkv_seq_length(c, s, &len));
    r = llmkv_seq_pages(c, s, NULL, 0, &n_pages);
    FZ_ASSERT(r == (n_pages ? LLMKV_ERR_BUFFER_TOO_SMALL : LLMKV_OK));
    FZ_ASSERT((uint64_t)n_pages * d->page_size >= len && (uint64_t)n_pages * d->page_size < (uint64_t)len + d->page_size);
    pages = (uint32_t*)malloc(((size_t)n_pages + 1) * 4);
    FZ_ASSERT(pages != NULL);
    FZ_OK(llmkv_seq_pages(c, s, pages, n_pages, &n_pages));
    for (layer = 0; layer < n_pages; ++layer) FZ_ASSERT(pages[layer] < d->n_pages);
    free(pages);
    if (d->prefix_index && len) {
        uint32_t n = len < 256 ? len : 256, i;
        llmkv_token t[256];
        FZ_OK(llmkv_seq_tokens(c, s, len - n, n, t));
        for (i = 0; i < n; ++i) FZ_ASSERT(t[i] >= -1);
    }
    if (!len || d->storage == LLMKV_STORAGE_METADATA_ONLY) return;
    chunk = (uint32_t)(GATHER_MAX_BYTES / ((size_t)row * 4));
    if (chunk == 0) return;
    if (chunk > len) chunk = len;
    if (chunk > 64) chunk = 64;
    kb = (float*)malloc((size_t)chunk * row * 4);
    vb = (float*)malloc((size_t)chunk * row * 4);
    FZ_ASSERT(kb && vb);
    for (layer = 0; layer < d->n_layers && layer < 4; ++layer) {
        FZ_OK(llmkv_gather(c, s, layer, 0, chunk, kb, 0, vb, 0, LLMKV_DTYPE_F32));
        FZ_OK(llmkv_gather(c, s, layer, len - chunk, chunk, kb, 0, vb, 0, LLMKV_DTYPE_DEFAULT));
    }
    FZ_ASSERT(llmkv_gather(c, s, d->n_layers, 0, 1, kb, 0, vb, 0, LLMKV_DTYPE_F32) == LLMKV_ERR_OUT_OF_RANGE);
    FZ_ASSERT(llmkv_gather(c, s, 0, len, 1, kb, 0, vb, 0, LLMKV_DTYPE_F32) == LLMKV_ERR_OUT_OF_RANGE);
    free(kb);
    free(vb);
}

/* One batch over (up to 4 of) the sequences and an attention call on the
   first layer, when the shape is small enough to be cheap. */
static void attend_seqs(llmkv_cache* c, const llmkv_desc* d, const llmkv_seq* seqs, uint32_t n) {
    llmkv_batch* b = NULL;
    uint32_t q_lens[4], i, row = d->n_kv_heads * d->head_dim, tokens = 0;
    llmkv_attn_desc a;
    float *q, *out;
    llmkv_result r;
    if (n > 4) n = 4;
    if (n == 0 || row > 1024 || d->storage == LLMKV_STORAGE_METADATA_ONLY) return;
    for (i = 0; i < n; ++i) {
        uint32_t len;
        FZ_OK(llmkv_seq_length(c, seqs[i], &len));
        q_lens[i] = len < 2 ? len : 2;
        tokens += q_lens[i];
    }
    r = llmkv_batch_create(c, n, 8, &b);
    if (r == LLMKV_ERR_OUT_OF_MEMORY) return;
    FZ_OK(r);
    FZ_OK(llmkv_batch_build(b, seqs, q_lens, n));
    q = (float*)calloc((size_t)(tokens ? tokens : 1) * row, 4);
    out = (float*)calloc((size_t)(tokens ? tokens : 1) * row, 4);
    FZ_ASSERT(q && out);
    for (i = 0; i < tokens * row; ++i) q[i] = fz_value(i, 0, 0, 7);
    memset(&a, 0, sizeof a);
    a.layer = 0;
    a.n_q_heads = d->n_kv_heads;
    a.q = q;
    a.out = out;
    FZ_OK(llmkv_attend(c, b, &a, NULL));
    free(q);
    free(out);
    llmkv_batch_destroy(b);
}

/* New work in the loaded cache: one sequence written and read back. */
static void use_cache(llmkv_cache* c, const llmkv_desc* d) {
    llmkv_seq s;
    llmkv_result r;
    uint32_t n, layer, row = d->n_kv_heads * d->head_dim, pos, part;
    float *kb, *vb, *want;
    if (row > 4096) return;
    r = llmkv_seq_create(c, &s);
    if (r == LLMKV_ERR_TOO_MANY_SEQUENCES) return;
    FZ_OK(r);
    fz_check(c, "seq_create on a loaded cache");
    n = d->max_seq_len < 5 ? d->max_seq_len : 5;
    r = llmkv_reserve(c, s, n);
    FZ_ASSERT(r == LLMKV_OK || r == LLMKV_ERR_OUT_OF_PAGES || r == LLMKV_ERR_COPY_QUEUE_FULL);
    if (r != LLMKV_OK) n = 0;
    fz_check(c, "reserve on a loaded cache");
    kb = (float*)malloc(((size_t)n + 1) * row * 4);
    vb = (float*)malloc(((size_t)n + 1) * row * 4);
    want = (float*)malloc((size_t)row * 4);
    FZ_ASSERT(kb && vb && want);
    for (layer = 0; n && layer < d->n_layers && layer < 4; ++layer) {
        fz_fill(kb, 0, 0, n, layer, 0, row, LLMKV_DTYPE_F32);
        fz_fill(vb, 0, 0, n, layer, 1, row, LLMKV_DTYPE_F32);
        r = llmkv_put(c, s, layer, n, kb, 0, vb, 0, LLMKV_DTYPE_F32);
        if (d->storage == LLMKV_STORAGE_METADATA_ONLY) {
            FZ_ASSERT(r == LLMKV_ERR_NO_PAGE_DATA);
            continue;
        }
        FZ_OK(r);
        FZ_OK(llmkv_gather(c, s, layer, 0, n, kb, 0, vb, 0, LLMKV_DTYPE_F32));
        for (pos = 0; pos < n; ++pos)
            for (part = 0; part < 2; ++part) {
                llmkv_dtype t = part ? d->v_dtype : d->k_dtype;
                const float* got = (part ? vb : kb) + (size_t)pos * row;
                if (t == LLMKV_DTYPE_Q4C && pos / d->page_size * d->page_size + d->page_size <= n) continue;
                if (t == LLMKV_DTYPE_Q4C) t = LLMKV_DTYPE_F16; /* staged keys: F16 */
                fz_expect(want, t, pos, layer, part, d->n_kv_heads, d->head_dim);
                FZ_ASSERT(memcmp(want, got, (size_t)row * 4) == 0);
            }
    }
    free(kb);
    free(vb);
    free(want);
    fz_check(c, "put on a loaded cache");
    if (d->prefix_index) {
        llmkv_token t[4] = {0, 1, 2, 3};
        uint32_t m;
        FZ_OK(llmkv_prefix_match(c, 0, t, 4, &m));
        FZ_ASSERT(m <= 4);
    }
    FZ_OK(llmkv_seq_free(c, s));
    fz_check(c, "seq_free on a loaded cache");
}

/* Saves `c` and loads the result; the stats must agree. Then an increment
   on top of what c was loaded from (bufs[0 .. n)) must load too. */
static void save_reload(llmkv_cache* c, const unsigned char* const* bufs, const size_t* sizes, uint32_t n) {
    uint64_t bytes = 0;
    size_t written = 0;
    unsigned char* buf;
    llmkv_cache* c2 = NULL;
    llmkv_load_desc ld = fz_load_desc();
    llmkv_stats st = fz_stats(c), st2;
    const void* chain[5];
    size_t chain_sizes[5];
    uint32_t i;
    llmkv_result r;

    r = llmkv_cache_save_size(c, 0, &bytes);
    FZ_OK(r);
    FZ_ASSERT(bytes > 0 && bytes < ((uint64_t)1 << 31));
    buf = (unsigned char*)malloc((size_t)bytes);
    FZ_ASSERT(buf != NULL);
    FZ_ASSERT(llmkv_cache_save_mem(c, 0, buf, (size_t)bytes - 1, &written) == LLMKV_ERR_BUFFER_TOO_SMALL);
    FZ_OK(llmkv_cache_save_mem(c, 0, buf, (size_t)bytes, &written));
    FZ_ASSERT(written == bytes);
    fz_check(c, "save_mem");
    chain[0] = buf;
    chain_sizes[0] = written;
    r = llmkv_cache_load_mem(chain, chain_sizes, 1, &ld, &c2);
    if (r != LLMKV_OK) fprintf(stderr, "reloading a saved loaded cache: %s\n", llmkv_result_string(r));
    FZ_OK(r);
    fz_check(c2, "load of a save of a loaded cache");
    st2 = fz_stats(c2);
    FZ_ASSERT(fz_stats_equal(&st, &st2, 1, "save of a loaded cache, loaded again"));
    llmkv_cache_destroy(c2);
    free(buf);

    /* The loaded cache remembers its last buffer as its latest checkpoint. */
    r = llmkv_cache_save_size(c, LLMKV_SAVE_INCREMENTAL, &bytes);
    FZ_OK(r);
    buf = (unsigned char*)malloc((size_t)bytes);
    FZ_ASSERT(buf != NULL);
    FZ_OK(llmkv_cache_save_mem(c, LLMKV_SAVE_INCREMENTAL, buf, (size_t)bytes, &written));
    FZ_ASSERT(written == bytes);
    fz_check(c, "incremental save_mem");
    for (i = 0; i < n; ++i) {
        chain[i] = bufs[i];
        chain_sizes[i] = sizes[i];
    }
    chain[n] = buf;
    chain_sizes[n] = written;
    r = llmkv_cache_load_mem(chain, chain_sizes, n + 1, &ld, &c2);
    if (r != LLMKV_OK) fprintf(stderr, "loading input + increment: %s\n", llmkv_result_string(r));
    FZ_OK(r);
    fz_check(c2, "load of input + increment");
    st2 = fz_stats(c2);
    FZ_ASSERT(fz_stats_equal(&st, &st2, 1, "input + increment"));
    llmkv_cache_destroy(c2);
    free(buf);
}

/* Work on a loaded sequence that walks the loaded index and page tables:
   lookups with its own token ids, a prefix sequence from them, a pin, a
   publish, a fork written past its end (copy-on-write of a shared tail),
   a truncation and a reserve. Any result but a crash or a failed check is
   acceptable (a crafted cache may be full), except where noted. */
static void work_on_seq(llmkv_cache* c, const llmkv_desc* d, llmkv_seq s) {
    static llmkv_token t[257];
    uint32_t len, n, m = 0, cached = 0, pinned = 0, row = d->n_kv_heads * d->head_dim;
    llmkv_seq p, f;
    llmkv_pin pin;
    llmkv_result r;
    FZ_OK(llmkv_seq_length(c, s, &len));
    n = len < 256 ? len : 256;
    if (d->prefix_index) {
        uint64_t ns;
        FZ_OK(llmkv_seq_tokens(c, s, 0, n, t));
        for (m = 0; m < n && t[m] >= 0; ++m) {}
        t[m] = 1; /* one more token after the known ones */
        for (ns = 0; ns < 2; ++ns) {
            FZ_OK(llmkv_prefix_match(c, ns, t, m, &cached));
            FZ_ASSERT(cached <= m);
        }
        r = llmkv_seq_create_prefix(c, 0, t, m + 1 <= d->max_seq_len ? m + 1 : m, &p, &cached);
        if (r == LLMKV_OK) {
            fz_check(c, "seq_create_prefix on a loaded cache");
            FZ_OK(llmkv_seq_free(c, p));
        }
        r = llmkv_prefix_pin(c, 0, t, m, &pin, &pinned);
        if (r == LLMKV_OK) {
            fz_check(c, "prefix_pin on a loaded cache");
            FZ_OK(llmkv_prefix_unpin(c, pin));
        }
        FZ_OK(llmkv_seq_publish(c, s, 1));
        fz_check(c, "seq_publish on a loaded cache");
    }
    r = llmkv_fork(c, s, &f);
    if (r == LLMKV_OK) {
        fz_check(c, "fork on a loaded cache");
        if (len < d->max_seq_len && llmkv_reserve(c, f, 1) == LLMKV_OK && row <= 4096 &&
            d->storage != LLMKV_STORAGE_METADATA_ONLY) {
            float* kv = (float*)calloc(row, 4);
            FZ_ASSERT(kv != NULL);
            r = llmkv_put(c, f, 0, 1, kv, 0, kv, 0, LLMKV_DTYPE_F32);
            FZ_ASSERT(r == LLMKV_OK || r == LLMKV_ERR_OUT_OF_PAGES);
            free(kv);
        }
        fz_check(c, "writing a fork on a loaded cache");
        FZ_OK(llmkv_seq_free(c, f));
    }
    FZ_OK(llmkv_truncate(c, s, len / 2));
    fz_check(c, "truncate on a loaded cache");
    r = llmkv_reserve(c, s, 1);
    FZ_ASSERT(r == LLMKV_OK || r == LLMKV_ERR_OUT_OF_PAGES || r == LLMKV_ERR_COPY_QUEUE_FULL ||
              r == LLMKV_ERR_SEQUENCE_TOO_LONG);
    fz_check(c, "reserve on a loaded cache");
}

/* Releases every pin a loaded cache may hold (ids probed as for
   sequences). */
static void unpin_all(llmkv_cache* c, const llmkv_desc* d) {
    uint32_t bits, gen, slot, slots = d->max_pins < 64 ? d->max_pins : 64;
    if (!d->prefix_index) return;
    for (bits = 1; ((uint32_t)1 << bits) < d->max_pins; ++bits) {}
    for (gen = 1; gen < 8; ++gen)
        for (slot = 0; slot < slots; ++slot) {
            llmkv_pin p;
            p.id = gen << bits | slot;
            if (llmkv_prefix_unpin(c, p) == LLMKV_OK) fz_check(c, "unpin on a loaded cache");
        }
}

static void exercise(llmkv_cache* c, const unsigned char* const* bufs, const size_t* sizes, uint32_t n) {
    llmkv_desc d;
    llmkv_stats st;
    llmkv_seq seqs[64];
    uint32_t n_found, i;
    uint32_t n_evicted = 0;
    fz_check(c, "load");
    FZ_OK(llmkv_cache_desc(c, &d));
    st = fz_stats(c);
    FZ_ASSERT(st.n_seqs <= d.max_seqs && st.n_pages_free <= st.n_pages_total && st.n_pages_total == d.n_pages);
    n_found = probe_seqs(c, &d, st.n_seqs, seqs, 64);
    for (i = 0; i < n_found; ++i) read_seq(c, &d, seqs[i]);
    attend_seqs(c, &d, seqs, n_found);
    fz_check(c, "reads of a loaded cache");
    save_reload(c, bufs, sizes, n);
    use_cache(c, &d);
    for (i = 0; i < n_found; ++i) work_on_seq(c, &d, seqs[i]);
    unpin_all(c, &d);
    if (d.prefix_index) {
        FZ_OK(llmkv_prefix_evict(c, UINT32_MAX, &n_evicted));
        fz_check(c, "prefix_evict on a loaded cache");
    }
    for (i = 0; i < n_found; ++i) FZ_OK(llmkv_seq_free(c, seqs[i]));
    fz_check(c, "freeing the loaded sequences");
    st = fz_stats(c);
    if (st.n_seqs == 0) FZ_ASSERT(st.n_pages_used == 0 && st.n_tokens == 0);
}

/* Loads bufs[0 .. n); on success exercises and destroys the cache.
   Returns the load's result and, in *allocs, the allocations it made. */
static llmkv_result load_and_use(const unsigned char* const* bufs, const size_t* sizes, uint32_t n,
                                 unsigned long* allocs, llmkv_stats* st_out) {
    llmkv_cache* c = NULL;
    llmkv_load_desc ld = fz_load_desc();
    unsigned long live = fz_alloc_st.live;
    llmkv_result r;
    fz_alloc_reset();
    r = llmkv_cache_load_mem((const void* const*)bufs, sizes, n, &ld, &c);
    if (allocs) *allocs = fz_alloc_st.count;
    if (r != LLMKV_OK) {
        FZ_ASSERT(c == NULL);
        FZ_ASSERT(fz_alloc_st.live == live); /* nothing kept */
        return r;
    }
    FZ_ASSERT(c != NULL);
    if (st_out) *st_out = fz_stats(c);
    exercise(c, bufs, sizes, n);
    llmkv_cache_destroy(c);
    FZ_ASSERT(fz_alloc_st.live == live);
    return r;
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    void *blk0, *blk1;
    const unsigned char* bufs[2];
    size_t sizes[2];
    unsigned long allocs = 0, k;
    llmkv_stats st_mem, st_file;
    llmkv_result r, rf;
    llmkv_cache* c = NULL;
    FZ_ASSERT(fz_alloc_st.live == 0);

    /* 1: the whole input, in its own block (reads past it are caught). */
    bufs[0] = fz_buf_copy(data, size, 0, &blk0);
    sizes[0] = size;
    r = load_and_use(bufs, sizes, 1, &allocs, &st_mem);

    /* 2: the same bytes through load_file: the same outcome. */
    fz_alloc_reset();
    rf = load_files(bufs, sizes, 1, 0, &c);
    if ((rf == LLMKV_OK) != (r == LLMKV_OK))
        fprintf(stderr, "load_mem: %s, load_file: %s\n", llmkv_result_string(r), llmkv_result_string(rf));
    FZ_ASSERT((rf == LLMKV_OK) == (r == LLMKV_OK));
    if (rf == LLMKV_OK) {
        fz_check(c, "load_file");
        st_file = fz_stats(c);
        FZ_ASSERT(fz_stats_equal(&st_mem, &st_file, 1, "load_mem vs load_file"));
        llmkv_cache_destroy(c);
        c = NULL;
        /* A read error at each of the first reads: LLMKV_ERR_IO, nothing kept. */
        for (k = 1; k <= 4; ++k) {
            rf = load_files(bufs, sizes, 1, (long)k, &c);
            if (rf == LLMKV_OK) {
                llmkv_cache_destroy(c);
                c = NULL;
                break; /* fewer reads than k */
            }
            FZ_ASSERT(rf == LLMKV_ERR_IO && c == NULL);
        }
    } else {
        FZ_ASSERT(c == NULL);
    }
    FZ_ASSERT(fz_alloc_st.live == 0);

    /* 3: each allocation of a successful load failing in turn. */
    if (r == LLMKV_OK) {
        for (k = 1; k <= allocs && k <= 8; ++k) {
            llmkv_load_desc ld = fz_load_desc();
            fz_alloc_reset();
            fz_alloc_fail_in((long)k);
            rf = llmkv_cache_load_mem((const void* const*)bufs, sizes, 1, &ld, &c);
            fz_alloc_reset();
            if (rf == LLMKV_OK) { /* the failing allocation was one the load could do without */
                fz_check(c, "load with a failed allocation");
                llmkv_cache_destroy(c);
                c = NULL;
            } else {
                FZ_ASSERT(rf == LLMKV_ERR_OUT_OF_MEMORY && c == NULL);
            }
            FZ_ASSERT(fz_alloc_st.live == 0);
        }
    }
    free(blk0);

    /* 4: checksums fixed. */
    if (size >= LLMKV__HEADER_BYTES) {
        unsigned char* fixed = fz_buf_copy(data, size, 0, &blk0);
        fz_fix_checksums(fixed, size, NULL, NULL);
        if (memcmp(fixed, data, size) != 0) {
            bufs[0] = fixed;
            sizes[0] = size;
            load_and_use(bufs, sizes, 1, NULL, NULL);
        }
        free(blk0);
    }

    /* 5: a chain of two buffers. */
    if (size >= 2) {
        size_t split = (size_t)data[0] | (size_t)(data[1] & 0x7f) << 8, rest = size - 2;
        unsigned char *b0, *b1;
        if (split > rest) split = rest;
        b0 = fz_buf_copy(data + 2, split, 1, &blk0);
        b1 = fz_buf_copy(data + 2 + split, rest - split, 3, &blk1);
        sizes[0] = split;
        sizes[1] = rest - split;
        if (data[1] & 0x80) {
            uint64_t id0 = 0;
            fz_fix_checksums(b0, sizes[0], NULL, &id0);
            fz_fix_checksums(b1, sizes[1], &id0, NULL);
        }
        bufs[0] = b0;
        bufs[1] = b1;
        load_and_use(bufs, sizes, 2, NULL, NULL);
        free(blk0);
        free(blk1);
    }
    FZ_ASSERT(fz_alloc_st.live == 0);
    return 0;
}
