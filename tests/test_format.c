/* The saved format against its documentation (docs/FORMAT.md), read by an
   independent parser written here from that document alone: a bitwise
   CRC-32C, the header fields, the section order, every section's checksum,
   the END record's identity, and that page bytes are stored as they sit
   in the pool. Then the reader's promises about versions: a newer major
   version is refused with LLMKV_ERR_VERSION, and a section a later minor
   version adds (unknown tag, valid checksum) is skipped. */
#include "test_util.h"

#define OK(t, call) TST_EQ(t, (call), LLMKV_OK)

/* Bit by bit, from the definition (reflected 0x82F63B78, init and final
   xor 0xFFFFFFFF). */
static uint32_t f_crc(const unsigned char* p, size_t n) {
    uint32_t c = 0xffffffffu;
    size_t i;
    int k;
    for (i = 0; i < n; ++i) {
        c ^= p[i];
        for (k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    }
    return ~c;
}

static uint32_t f_u32(const unsigned char* p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}
static uint64_t f_u64(const unsigned char* p) { return f_u32(p) | (uint64_t)f_u32(p + 4) << 32; }
static void f_put32(unsigned char* p, uint32_t v) {
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}
static void f_put64(unsigned char* p, uint64_t v) {
    f_put32(p, (uint32_t)v);
    f_put32(p + 4, (uint32_t)(v >> 32));
}
static uint32_t f_tag(const char* s) {
    return (uint32_t)(unsigned char)s[0] | (uint32_t)(unsigned char)s[1] << 8 | (uint32_t)(unsigned char)s[2] << 16 |
           (uint32_t)(unsigned char)s[3] << 24;
}

/* The identity of FORMAT.md's END record. */
static uint64_t f_identity(uint64_t parent, const uint32_t* crcs, uint32_t n) {
    uint64_t f = 0, h;
    uint32_t i;
    for (i = 0; i < n; ++i) {
        f ^= crcs[i];
        f *= 0x9E3779B97F4A7C15ull;
        f ^= f >> 29;
    }
    h = f ^ parent * 0xBF58476D1CE4E5B9ull;
    h ^= h >> 31;
    h *= 0x94D049BB133111EBull;
    h ^= h >> 29;
    return h ? h : 1;
}

/* A parsed file: its sections' tags, offsets of their bodies, sizes and
   checksums. */
typedef struct f_file {
    uint32_t kind, flags, n;
    uint64_t parent, total;
    uint32_t tags[32], crcs[32];
    size_t body[32];
    uint64_t bytes[32];
    int crc_ok, pads_ok, header_ok;
} f_file;

static int f_parse(const unsigned char* b, size_t size, f_file* f) {
    size_t pos = 64;
    static const unsigned char magic[8] = {0x89, 'L', 'L', 'M', 'K', 'V', '\r', '\n'};
    memset(f, 0, sizeof *f);
    if (size < 64 || memcmp(b, magic, 8) != 0) return 0;
    f->header_ok = b[8] == 1 && b[9] == 0 && b[10] == 0 && b[11] == 0 && f_u32(b + 16) == 64 &&
                   f_u32(b + 60) == f_crc(b, 60);
    {
        int i;
        for (i = 40; i < 60; ++i) f->header_ok &= b[i] == 0;
    }
    f->kind = f_u32(b + 12);
    f->flags = f_u32(b + 20);
    f->total = f_u64(b + 24);
    f->parent = f_u64(b + 32);
    f->crc_ok = f->pads_ok = 1;
    while (pos + 16 <= size && f->n < 32) {
        uint64_t n = f_u64(b + pos + 8);
        if (pos + 16 + n + 8 > size) return 0;
        f->tags[f->n] = f_u32(b + pos);
        f->body[f->n] = pos + 16;
        f->bytes[f->n] = n;
        f->crcs[f->n] = f_u32(b + pos + 16 + n);
        f->crc_ok &= f->crcs[f->n] == f_crc(b + pos, 16 + (size_t)n);
        f->pads_ok &= f_u32(b + pos + 4) == 0 && f_u32(b + pos + 16 + n + 4) == 0;
        pos += 16 + (size_t)n + 8;
        f->n++;
    }
    return pos == size;
}

static int f_tags_are(const f_file* f, const char* const* want, uint32_t n) {
    uint32_t i;
    if (f->n != n) return 0;
    for (i = 0; i < n; ++i)
        if (f->tags[i] != f_tag(want[i])) return 0;
    return 1;
}

/* 2 layers, 2 KV heads, head_dim 8, page 4, F16, the prefix index on; two
   sequences sharing a published prefix, one written into. */
static llmkv_cache* f_cache(tst* t, llmkv_seq* a, llmkv_seq* b) {
    llmkv_desc d = tst_desc(2, 2, 8, 4, 16, LLMKV_DTYPE_F16, LLMKV_DTYPE_F16);
    llmkv_cache* kv = NULL;
    llmkv_token toks[10];
    float kvals[10 * 16];
    uint32_t i, layer, n;
    d.prefix_index = 1;
    d.max_seqs = 4;
    if (llmkv_cache_create(&d, &kv) != LLMKV_OK) return NULL;
    for (i = 0; i < 10; ++i) toks[i] = (llmkv_token)(100 + i);
    for (i = 0; i < 10 * 16; ++i) kvals[i] = (float)((int)(i % 13) - 6) * 0.25f;
    OK(t, llmkv_seq_create(kv, a));
    OK(t, llmkv_reserve_tokens(kv, *a, toks, 10));
    for (layer = 0; layer < 2; ++layer) OK(t, llmkv_put(kv, *a, layer, 10, kvals, 0, kvals, 0, LLMKV_DTYPE_F32));
    OK(t, llmkv_seq_publish(kv, *a, 0));
    OK(t, llmkv_seq_create_prefix(kv, 0, toks, 9, b, &n));
    TST_EQ(t, n, 8);
    return kv;
}

static void test_format_crc32c(tst* t) {
    const char* s = "123456789";
    TST_EQ(t, f_crc((const unsigned char*)s, 9), 0xE3069283u);
}

static void test_format_whole_cache(tst* t) {
    static const char* const want[] = {"CONF", "STAT", "REFC", "FREE", "SEQS", "TABL", "WRIT",
                                       "TOKS", "NODE", "HEAD", "PINS", "PIDS", "PDAT", "END "};
    llmkv_seq a, b;
    llmkv_cache* kv = f_cache(t, &a, &b);
    llmkv_desc d;
    llmkv_layout l;
    llmkv_stats st;
    unsigned char* buf;
    uint64_t size = 0;
    size_t got = 0;
    f_file f;
    void* pool;
    uint64_t pool_bytes;
    uint32_t i, count;
    TST_REQUIRE(t, kv != NULL);
    OK(t, llmkv_cache_desc(kv, &d));
    OK(t, llmkv_cache_layout(kv, &l));
    OK(t, llmkv_cache_stats(kv, &st));
    OK(t, llmkv_cache_pool(kv, &pool, &pool_bytes));
    OK(t, llmkv_cache_save_size(kv, 0, &size));
    buf = (unsigned char*)malloc((size_t)size);
    TST_REQUIRE(t, buf != NULL);
    OK(t, llmkv_cache_save_mem(kv, 0, buf, (size_t)size, &got));
    TST_EQ(t, got, size);
    TST_CHECK(t, f_parse(buf, got, &f));
    TST_CHECK(t, f.header_ok);
    TST_EQ(t, f.kind, 1);
    TST_EQ(t, f.flags, 1);
    TST_EQ(t, f.total, got);
    TST_EQ(t, f.parent, 0);
    TST_CHECK(t, f.crc_ok && f.pads_ok);
    TST_CHECK(t, f_tags_are(&f, want, 14));
    if (f.n == 14) {
        const unsigned char* c = buf + f.body[0];
        const unsigned char* e = buf + f.body[13];
        TST_EQ(t, f.bytes[0], 72);
        TST_EQ(t, f_u32(c), d.n_layers);
        TST_EQ(t, f_u32(c + 4), d.n_kv_heads);
        TST_EQ(t, f_u32(c + 8), d.head_dim);
        TST_EQ(t, f_u32(c + 12), d.page_size);
        TST_EQ(t, f_u32(c + 16), d.n_pages);
        TST_EQ(t, f_u32(c + 20), d.k_dtype);
        TST_EQ(t, f_u32(c + 36), d.max_seq_len);
        TST_EQ(t, f_u32(c + 44), 1);
        TST_EQ(t, f_u64(c + 56), l.page_bytes);
        /* every page in use, once, as it is in the pool */
        count = f_u32(buf + f.body[11]);
        TST_EQ(t, count, st.n_pages_total - st.n_pages_free);
        TST_EQ(t, f.bytes[12], (uint64_t)count * l.page_bytes);
        for (i = 0; i < count && f.bytes[12] == (uint64_t)count * l.page_bytes; ++i) {
            uint32_t id = f_u32(buf + f.body[11] + 4 + 4 * i);
            TST_CHECK(t, memcmp(buf + f.body[12] + (size_t)i * l.page_bytes,
                                (unsigned char*)pool + (size_t)id * l.page_bytes, (size_t)l.page_bytes) == 0);
        }
        TST_EQ(t, f.bytes[13], 24);
        TST_EQ(t, f_u32(e + 16), 13);
        TST_CHECK(t, f_u64(e) == f_identity(0, f.crcs, 13));
    }
    free(buf);
    llmkv_cache_destroy(kv);
}

static void test_format_sequence_and_increment(tst* t) {
    static const char* const want[] = {"CONF", "SEQ ", "WRIT", "TOKS", "PDAT", "END "};
    llmkv_seq a, b;
    llmkv_cache* kv = f_cache(t, &a, &b);
    llmkv_layout l;
    unsigned char *buf, *base, *inc;
    uint64_t size = 0, bsize = 0, isize = 0;
    uint32_t pages[8], n_pages = 0, i;
    f_file f, fb;
    float row[16];
    TST_REQUIRE(t, kv != NULL);
    OK(t, llmkv_cache_layout(kv, &l));
    OK(t, llmkv_seq_export_size(kv, a, &size));
    buf = (unsigned char*)malloc((size_t)size);
    TST_REQUIRE(t, buf != NULL);
    OK(t, llmkv_seq_export(kv, a, buf, (size_t)size, NULL));
    TST_CHECK(t, f_parse(buf, (size_t)size, &f));
    TST_CHECK(t, f.header_ok && f.crc_ok && f.pads_ok);
    TST_EQ(t, f.kind, 3);
    TST_CHECK(t, f_tags_are(&f, want, 6));
    OK(t, llmkv_seq_pages(kv, a, pages, 8, &n_pages));
    if (f.n == 6) {
        void* pool;
        uint64_t pb;
        OK(t, llmkv_cache_pool(kv, &pool, &pb));
        TST_EQ(t, f_u32(buf + f.body[1]), 10);
        TST_EQ(t, f_u32(buf + f.body[1] + 4), n_pages);
        TST_EQ(t, f.bytes[3], 40);
        TST_EQ(t, (int32_t)f_u32(buf + f.body[3] + 4 * 9), 109);
        TST_EQ(t, f.bytes[4], (uint64_t)n_pages * l.page_bytes);
        for (i = 0; i < n_pages && f.bytes[4] == (uint64_t)n_pages * l.page_bytes; ++i)
            TST_CHECK(t, memcmp(buf + f.body[4] + (size_t)i * l.page_bytes,
                                (unsigned char*)pool + (size_t)pages[i] * l.page_bytes, (size_t)l.page_bytes) == 0);
        TST_CHECK(t, f_u64(buf + f.body[5]) == f_identity(0, f.crcs, 5));
    }
    free(buf);
    /* an increment names its base's identity as parent */
    OK(t, llmkv_cache_save_size(kv, LLMKV_SAVE_CHECKPOINT, &bsize));
    base = (unsigned char*)malloc((size_t)bsize);
    TST_REQUIRE(t, base != NULL);
    OK(t, llmkv_cache_save_mem(kv, LLMKV_SAVE_CHECKPOINT, base, (size_t)bsize, NULL));
    for (i = 0; i < 16; ++i) row[i] = 1.5f;
    OK(t, llmkv_reserve(kv, b, 1));
    OK(t, llmkv_put(kv, b, 0, 1, row, 0, row, 0, LLMKV_DTYPE_F32));
    OK(t, llmkv_cache_save_size(kv, LLMKV_SAVE_INCREMENTAL, &isize));
    inc = (unsigned char*)malloc((size_t)isize);
    TST_REQUIRE(t, inc != NULL);
    OK(t, llmkv_cache_save_mem(kv, LLMKV_SAVE_INCREMENTAL, inc, (size_t)isize, NULL));
    TST_CHECK(t, f_parse(base, (size_t)bsize, &fb) && f_parse(inc, (size_t)isize, &f));
    TST_EQ(t, f.kind, 2);
    TST_CHECK(t, f.crc_ok && fb.n == 14 && f.n == 14);
    if (fb.n == 14 && f.n == 14) {
        TST_CHECK(t, f.parent == f_u64(base + fb.body[13]));
        TST_CHECK(t, f_u64(inc + f.body[13] + 8) == f.parent);
        TST_CHECK(t, f_u64(inc + f.body[13]) == f_identity(f.parent, f.crcs, 13));
        TST_EQ(t, f_u32(inc + f.body[11]), 1); /* only the page the put took and wrote */
    }
    free(base);
    free(inc);
    llmkv_cache_destroy(kv);
}

/* Rewrites the header checksum after an edit. */
static void f_reseal(unsigned char* b) { f_put32(b + 60, f_crc(b, 60)); }

static void test_format_versions(tst* t) {
    llmkv_seq a, b;
    llmkv_cache* kv = f_cache(t, &a, &b);
    llmkv_cache* out = NULL;
    unsigned char *buf, *big;
    uint64_t size = 0;
    size_t n, extra = 16 + 8 + 8, bigsize;
    const void* in[1];
    size_t sizes[1];
    f_file f;
    uint32_t crcs[32], i;
    TST_REQUIRE(t, kv != NULL);
    OK(t, llmkv_cache_save_size(kv, 0, &size));
    n = (size_t)size;
    buf = (unsigned char*)malloc(n);
    TST_REQUIRE(t, buf != NULL);
    OK(t, llmkv_cache_save_mem(kv, 0, buf, n, NULL));
    in[0] = buf;
    sizes[0] = n;
    /* major 2, resealed or not: LLMKV_ERR_VERSION (the version is read first) */
    buf[8] = 2;
    TST_EQ(t, llmkv_cache_load_mem(in, sizes, 1, NULL, &out), LLMKV_ERR_VERSION);
    TST_CHECK(t, out == NULL);
    f_reseal(buf);
    TST_EQ(t, llmkv_cache_load_mem(in, sizes, 1, NULL, &out), LLMKV_ERR_VERSION);
    /* minor 7: read */
    buf[8] = 1;
    buf[10] = 7;
    f_reseal(buf);
    OK(t, llmkv_cache_load_mem(in, sizes, 1, NULL, &out));
    llmkv_cache_destroy(out);
    out = NULL;
    buf[10] = 0;
    f_reseal(buf);
    /* a section a later minor version adds, before END: skipped */
    TST_REQUIRE(t, f_parse(buf, n, &f) && f.n == 14);
    bigsize = n + extra;
    big = (unsigned char*)malloc(bigsize);
    TST_REQUIRE(t, big != NULL);
    {
        size_t end_at = f.body[13] - 16, x = end_at;
        memcpy(big, buf, end_at);
        f_put32(big + x, f_tag("XTRA"));
        f_put32(big + x + 4, 0);
        f_put64(big + x + 8, 8);
        f_put64(big + x + 16, 0x0123456789abcdefull);
        f_put32(big + x + 24, f_crc(big + x, 24));
        f_put32(big + x + 28, 0);
        memcpy(big + end_at + extra, buf + end_at, n - end_at);
        f_put64(big + 24, bigsize);
        f_reseal(big);
        for (i = 0; i < 13; ++i) crcs[i] = f.crcs[i];
        crcs[13] = f_u32(big + x + 24);
        {   /* END: 15 sections now, identity over all 14 before it */
            unsigned char* e = big + end_at + extra + 16;
            f_put64(e, f_identity(0, crcs, 14));
            f_put32(e + 16, 14);
            f_put32(e + 24, f_crc(e - 16, 16 + 24));
        }
        in[0] = big;
        sizes[0] = bigsize;
        OK(t, llmkv_cache_load_mem(in, sizes, 1, NULL, &out));
        if (out) {
            char msg[128];
            OK(t, llmkv_cache_check(out, msg, sizeof msg));
            llmkv_cache_destroy(out);
            out = NULL;
        }
        big[x + 20] ^= 1; /* its body corrupt: refused */
        TST_EQ(t, llmkv_cache_load_mem(in, sizes, 1, NULL, &out), LLMKV_ERR_BAD_FORMAT);
        TST_CHECK(t, out == NULL);
    }
    free(big);
    free(buf);
    llmkv_cache_destroy(kv);
}

void suite_format(tst* t) {
    TST_RUN(t, test_format_crc32c);
    TST_RUN(t, test_format_whole_cache);
    TST_RUN(t, test_format_sequence_and_increment);
    TST_RUN(t, test_format_versions);
}
