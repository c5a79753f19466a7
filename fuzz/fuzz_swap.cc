/* fuzz_swap.cc - libFuzzer target for llmkv_cuda_swap_in, the parser of a
   swap buffer (llmkv_cuda.cuh), on the CPU emulator of tests/gpu_emu.h (so
   it needs no GPU; no kernel runs: the swap copies are plain copies there).

   Input: byte 0 picks the configuration (bit 0: prefix index on; bit 1:
   F16 or Q8/Q4 storage); byte 1 bit 0 asks for a valid header to be
   written over the input's first bytes first (length from byte 2, the
   rest of the header from the cache), so that mutations reach the page
   and token checks behind it; the rest is the swap buffer (copied to a
   16-byte aligned one).

   Each input gets a fresh metadata-only cache (1 layer, 2 KV heads,
   head_dim 8, pages of 4 tokens, 24 pages), a device pool, a sequence A of
   10 tokens (token ids with the prefix index) and an empty sequence E.
   Then llmkv_cuda_swap_in(E, input):
     - on failure: E is still empty, A's length, pages and tokens are as
       before, the free pages are as before, llmkv_cache_check passes;
     - on success: E has the length the header says, llmkv_cache_check
       passes, and swapping E out again gives back the input's pages and
       token ids byte for byte (the round trip of a valid buffer is exact);
       then E swaps in once more from that output and is freed.
   Build: make build/fuzz_swap (clang++). Corpus: fuzz/corpus/swap/, made
   by building this file with -DFUZZ_SWAP_MAKE_CORPUS and running it with
   the directory as argument. */
#include "../tests/gpu_emu.h"
#define LLMKV_IMPLEMENTATION
#define LLMKV_CUDA_IMPLEMENTATION
#include "../llmkv_cuda.cuh"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define SW_ASSERT(c, ...)                                                          \
    do {                                                                           \
        if (!(c)) {                                                                \
            fprintf(stderr, "fuzz_swap.cc:%d: %s: ", __LINE__, #c);                \
            fprintf(stderr, __VA_ARGS__);                                          \
            fprintf(stderr, "\n");                                                 \
            abort();                                                               \
        }                                                                          \
    } while (0)

struct sw_env {
    llmkv_cache* kv;
    llmkv_cuda* gpu;
    llmkv_seq a, e;
    int prefix;
};

static llmkv_token sw_tok(uint32_t p) { return (llmkv_token)(p * 5 % 13); }

static void sw_setup(sw_env* s, uint8_t config) {
    llmkv_desc d;
    llmkv_cuda_desc g;
    llmkv_token t[10];
    uint32_t i;
    memset(&d, 0, sizeof d);
    d.n_layers = 1;
    d.n_kv_heads = 2;
    d.head_dim = 8;
    d.page_size = 4;
    d.n_pages = 24;
    d.max_seqs = 4;
    d.storage = LLMKV_STORAGE_METADATA_ONLY;
    d.prefix_index = config & 1u;
    d.k_dtype = config & 2u ? LLMKV_DTYPE_Q8 : LLMKV_DTYPE_F16;
    d.v_dtype = config & 2u ? LLMKV_DTYPE_Q4 : LLMKV_DTYPE_F16;
    s->prefix = (int)(config & 1u);
    SW_ASSERT(llmkv_cache_create(&d, &s->kv) == LLMKV_OK, "cache");
    memset(&g, 0, sizeof g);
    g.split_workspace_bytes = 4; /* no packed swaps: the copies stay copies */
    SW_ASSERT(llmkv_cuda_create(s->kv, &g, &s->gpu) == LLMKV_OK, "llmkv_cuda_create");
    SW_ASSERT(llmkv_seq_create(s->kv, &s->a) == LLMKV_OK, "seq");
    SW_ASSERT(llmkv_seq_create(s->kv, &s->e) == LLMKV_OK, "seq");
    for (i = 0; i < 10; ++i) t[i] = sw_tok(i);
    if (s->prefix) SW_ASSERT(llmkv_reserve_tokens(s->kv, s->a, t, 10) == LLMKV_OK, "reserve");
    else SW_ASSERT(llmkv_reserve(s->kv, s->a, 10) == LLMKV_OK, "reserve");
}

static void sw_free(sw_env* s) {
    llmkv_cuda_destroy(s->gpu);
    llmkv_cache_destroy(s->kv);
}

/* What must not change: A's pages and tokens, the free page count. */
struct sw_snap {
    uint32_t len, n_pages, pages[8], free_pages;
    llmkv_token tok[10];
};

static void sw_take(sw_env* s, sw_snap* n) {
    llmkv_stats st;
    memset(n, 0, sizeof *n);
    SW_ASSERT(llmkv_seq_length(s->kv, s->a, &n->len) == LLMKV_OK, "length");
    SW_ASSERT(llmkv_seq_pages(s->kv, s->a, n->pages, 8, &n->n_pages) == LLMKV_OK, "pages");
    if (s->prefix) SW_ASSERT(llmkv_seq_tokens(s->kv, s->a, 0, n->len, n->tok) == LLMKV_OK, "tokens");
    SW_ASSERT(llmkv_cache_stats(s->kv, &st) == LLMKV_OK, "stats");
    n->free_pages = st.n_pages_free;
}

static void sw_check(sw_env* s) {
    char msg[256];
    llmkv_result r = llmkv_cache_check(s->kv, msg, sizeof msg);
    SW_ASSERT(r == LLMKV_OK, "llmkv_cache_check: %s", msg);
}

/* Swaps E out into a fresh aligned buffer; returns it (its size in *n). */
static unsigned char* sw_out(sw_env* s, size_t* n) {
    uint32_t len = 0;
    unsigned char* b;
    SW_ASSERT(llmkv_seq_length(s->kv, s->e, &len) == LLMKV_OK, "length");
    SW_ASSERT(llmkv_cuda_swap_size(s->gpu, len, n) == LLMKV_OK, "swap size");
    b = (unsigned char*)aligned_alloc(16, (*n + 15) / 16 * 16);
    SW_ASSERT(b != NULL, "alloc");
    memset(b, 0xab, *n);
    SW_ASSERT(llmkv_cuda_swap_out(s->gpu, s->e, b, *n, NULL) == LLMKV_OK, "swap out of a swapped-in sequence");
    return b;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    sw_env s;
    sw_snap before, after;
    unsigned char* buf;
    size_t n;
    uint32_t len = 0;
    llmkv_result r;
    if (size < 2) return 0;
    sw_setup(&s, data[0]);
    n = size - 2;
    buf = (unsigned char*)aligned_alloc(16, (n + 16) / 16 * 16);
    SW_ASSERT(buf != NULL, "alloc");
    if (n) memcpy(buf, data + 2, n);
    if ((data[1] & 1u) && n >= sizeof(llmkv__swap_header)) {
        llmkv__swap_header h;
        memset(&h, 0, sizeof h);
        memcpy(h.magic, "llmkvSW1", 8);
        h.length = n > sizeof h ? buf[sizeof h] % 40u : 0u;
        h.n_pages = (h.length + 3) / 4;
        h.has_tokens = (uint32_t)s.prefix;
        h.page_bytes = s.gpu->layout.page_bytes;
        h.pages_offset = llmkv__swap_pages_offset(s.gpu, h.length);
        memcpy(buf, &h, sizeof h);
    }
    sw_take(&s, &before);
    r = llmkv_cuda_swap_in(s.gpu, s.e, buf, n, NULL);
    sw_check(&s);
    SW_ASSERT(llmkv_seq_length(s.kv, s.e, &len) == LLMKV_OK, "length");
    if (r != LLMKV_OK) {
        SW_ASSERT(len == 0, "a failed swap_in left %u positions", len);
        sw_take(&s, &after);
        SW_ASSERT(memcmp(&before, &after, sizeof before) == 0, "a failed swap_in changed the cache");
    } else {
        llmkv__swap_header h;
        size_t m;
        unsigned char* out;
        memcpy(&h, buf, sizeof h);
        SW_ASSERT(len == h.length, "swap_in restored %u positions of %u", len, h.length);
        out = sw_out(&s, &m);
        SW_ASSERT(m <= n, "the output (%zu bytes) is longer than the input (%zu)", m, n);
        SW_ASSERT(memcmp(out + h.pages_offset, buf + h.pages_offset, (size_t)h.n_pages * h.page_bytes) == 0,
                  "pages differ after a round trip");
        if (h.has_tokens) {
            uint32_t i;
            const llmkv_token* ti = (const llmkv_token*)(buf + sizeof h);
            const llmkv_token* to = (const llmkv_token*)(out + sizeof h);
            for (i = 0; i < h.length; ++i)
                SW_ASSERT(to[i] == (ti[i] < 0 ? -1 : ti[i]), "token %u: %d became %d", i, ti[i], to[i]);
        }
        sw_check(&s);
        SW_ASSERT(llmkv_cuda_swap_in(s.gpu, s.e, out, m, NULL) == LLMKV_OK, "swap_in of swap_out's output");
        sw_check(&s);
        free(out);
    }
    SW_ASSERT(llmkv_seq_free(s.kv, s.e) == LLMKV_OK, "free");
    sw_check(&s);
    free(buf);
    sw_free(&s);
    return 0;
}

#ifdef FUZZ_SWAP_MAKE_CORPUS
/* Writes valid buffers (every configuration; lengths 0, 1, 4, 10, 23) to
   the directory argv[1]: <config>_<length>.bin. */
int main(int argc, char** argv) {
    static const uint32_t lens[] = {0, 1, 4, 10, 23};
    uint8_t config;
    unsigned i;
    if (argc != 2) return 2;
    for (config = 0; config < 4; ++config)
        for (i = 0; i < sizeof lens / sizeof lens[0]; ++i) {
            sw_env s;
            size_t n;
            unsigned char* b;
            char path[512];
            FILE* f;
            llmkv_token t[64];
            uint32_t p;
            sw_setup(&s, config);
            for (p = 0; p < lens[i]; ++p) t[p] = p % 3 == 2 ? -1 : sw_tok(p);
            if (s.prefix) {
                for (p = 0; p < lens[i];) {
                    uint32_t q = p + 1;
                    while (q < lens[i] && (t[q] < 0) == (t[p] < 0)) ++q;
                    SW_ASSERT(llmkv_reserve_tokens(s.kv, s.e, t[p] < 0 ? NULL : t + p, q - p) == LLMKV_OK, "r");
                    p = q;
                }
            } else if (lens[i]) {
                SW_ASSERT(llmkv_reserve(s.kv, s.e, lens[i]) == LLMKV_OK, "reserve");
            }
            b = sw_out(&s, &n);
            /* Recognisable page bytes, so the round trip compares content. */
            {
                llmkv__swap_header h;
                size_t k;
                memcpy(&h, b, sizeof h);
                for (k = 0; k < (size_t)h.n_pages * h.page_bytes; ++k)
                    b[h.pages_offset + k] = (unsigned char)(k * 131u + 7u);
            }
            snprintf(path, sizeof path, "%s/config%u_len%u.bin", argv[1], (unsigned)config, lens[i]);
            f = fopen(path, "wb");
            SW_ASSERT(f != NULL, "open %s", path);
            fputc(config, f);
            fputc(0, f);
            fwrite(b, 1, n, f);
            fclose(f);
            free(b);
            sw_free(&s);
        }
    return 0;
}
#endif
