/* quickstart.c - a tour of llmkv in one small program.

   It plays the part of an inference engine for a tiny model (4 layers,
   2 KV heads of 64 dims): it stores two prompts, forks one for beam search,
   rolls one back as speculative decoding does, reads the cache back, and
   builds the page table a kernel would consume. The K/V values are made up
   but deterministic, so the program can check what it reads.

   Build and run:  make demo
   or:             cc -std=c99 -O2 examples/quickstart.c -o quickstart && ./quickstart */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LLMKV_IMPLEMENTATION /* in exactly one file of your program */
#include "../llmkv.h"

enum { N_LAYERS = 4, N_KV_HEADS = 2, HEAD_DIM = 64, ROW = N_KV_HEADS * HEAD_DIM, MAX_TOKENS = 64 };

/* Every fallible llmkv call returns llmkv_result: stop, saying which call
   failed and why. */
static void check(llmkv_result r, const char* call) {
    if (r != LLMKV_OK) {
        fprintf(stderr, "error: %s failed: %s\n", call, llmkv_result_string(r));
        exit(1);
    }
}
#define CHECK(call) check((call), #call)

/* One request: its sequence handle and the token ids it holds (kept here
   only to check what the cache returns; the cache stores vectors, not ids). */
typedef struct request {
    const char* name;
    llmkv_seq seq;
    int tokens[MAX_TOKENS];
    uint32_t length;
} request;

/* What the model's K or V projection "produces" for element i of a token. */
static float fake_kv(int token, uint32_t pos, uint32_t layer, uint32_t i, int is_v) {
    int x = (token * 131 + (int)pos * 31 + (int)layer * 17 + (int)i * 7 + is_v * 1000) % 2001;
    return (float)x / 1000.0f - 1.0f;
}

/* Appends tokens the way an engine's forward pass does: reserve their slots
   in every layer at once, then store each layer's K and V as it is computed. */
static void append(llmkv_cache* kv, request* r, const int* tokens, uint32_t n) {
    float k[MAX_TOKENS * ROW], v[MAX_TOKENS * ROW];
    uint32_t layer, t, i;
    CHECK(llmkv_reserve(kv, r->seq, n));
    memcpy(r->tokens + r->length, tokens, n * sizeof(int));
    for (layer = 0; layer < N_LAYERS; ++layer) {
        for (t = 0; t < n; ++t)
            for (i = 0; i < ROW; ++i) {
                k[t * ROW + i] = fake_kv(tokens[t], r->length + t, layer, i, 0);
                v[t * ROW + i] = fake_kv(tokens[t], r->length + t, layer, i, 1);
            }
        /* put writes the newest n positions; F32 in, F16 stored. */
        CHECK(llmkv_put(kv, r->seq, layer, n, k, 0, v, 0, LLMKV_DTYPE_F32));
    }
    r->length += n;
}

/* Reads every layer of a sequence back as F32; returns the largest
   difference from the values that were put. */
static float verify(const llmkv_cache* kv, const request* r) {
    float k[MAX_TOKENS * ROW], v[MAX_TOKENS * ROW], err = 0.0f;
    uint32_t layer, t, i, length;
    CHECK(llmkv_seq_length(kv, r->seq, &length));
    if (length != r->length) {
        fprintf(stderr, "error: %s holds %u tokens, expected %u\n", r->name, length, r->length);
        exit(1);
    }
    for (layer = 0; layer < N_LAYERS; ++layer) {
        CHECK(llmkv_gather(kv, r->seq, layer, 0, length, k, 0, v, 0, LLMKV_DTYPE_F32));
        for (t = 0; t < length; ++t)
            for (i = 0; i < ROW; ++i) {
                float ek = k[t * ROW + i] - fake_kv(r->tokens[t], t, layer, i, 0);
                float ev = v[t * ROW + i] - fake_kv(r->tokens[t], t, layer, i, 1);
                if (ek < 0) ek = -ek;
                if (ev < 0) ev = -ev;
                if (ek > err) err = ek;
                if (ev > err) err = ev;
            }
    }
    return err;
}

static void show_stats(llmkv_cache* kv) {
    llmkv_stats st;
    CHECK(llmkv_cache_stats(kv, &st));
    printf("   -> %u sequences, %llu tokens, %u of %u pages used, %u of them shared\n", st.n_seqs,
           (unsigned long long)st.n_tokens, st.n_pages_used, st.n_pages_total, st.n_pages_shared);
}

static void print_array(const char* name, const int32_t* a, uint32_t n) {
    uint32_t i;
    printf("   %-16s [", name);
    for (i = 0; i < n; ++i) printf(i ? ", %d" : "%d", (int)a[i]);
    printf("]\n");
}

int main(void) {
    llmkv_desc desc;
    llmkv_layout layout;
    llmkv_cache* kv;
    llmkv_batch* batch;
    llmkv_batch_info info;
    request a, beam, b, *all[3];
    llmkv_seq step[3];
    uint32_t q_lens[3] = {1, 1, 1};
    int prompt_a[40], prompt_b[9], drafts[5] = {501, 502, 503, 504, 505}, tok;
    float max_err = 0.0f;
    char message[256];
    llmkv_result result;
    uint32_t i;

    /* 1. A cache: zero the descriptor, set the model's shape; zero = default. */
    memset(&desc, 0, sizeof desc);
    desc.n_layers = N_LAYERS;
    desc.n_kv_heads = N_KV_HEADS;
    desc.head_dim = HEAD_DIM;
    desc.page_size = 16;          /* tokens per page */
    desc.k_dtype = LLMKV_DTYPE_F16;
    desc.v_dtype = LLMKV_DTYPE_F16;
    desc.n_pages = 64;            /* or capacity_bytes: a memory budget */
    desc.max_seqs = 8;
    CHECK(llmkv_cache_create(&desc, &kv));
    CHECK(llmkv_cache_layout(kv, &layout));
    printf("llmkv %s quickstart\n\n", llmkv_version());
    printf("1. A cache for %d layers x %d KV heads x %d dims, F16, %u tokens per page:\n"
           "   %u pages of %llu bytes, all allocated now; nothing is allocated later.\n",
           N_LAYERS, N_KV_HEADS, HEAD_DIM, layout.page_size, desc.n_pages,
           (unsigned long long)layout.page_bytes);

    /* 2. Two requests arrive; store their prompts' K/V. */
    memset(&a, 0, sizeof a);
    memset(&b, 0, sizeof b);
    a.name = "A";
    b.name = "B";
    for (i = 0; i < 40; ++i) prompt_a[i] = (int)(i * 7 + 3) % 1000;
    for (i = 0; i < 9; ++i) prompt_b[i] = (int)(i * 11 + 5) % 1000;
    CHECK(llmkv_seq_create(kv, &a.seq));
    CHECK(llmkv_seq_create(kv, &b.seq));
    append(kv, &a, prompt_a, 40);
    append(kv, &b, prompt_b, 9);
    printf("\n2. Request A brings a 40-token prompt, B a 9-token one. Pages are taken\n"
           "   as tokens arrive, never for a maximum length:\n");
    show_stats(kv);

    /* 3. Beam search: fork A. Only reference counts change; no data moves. */
    beam = a;
    beam.name = "A'";
    CHECK(llmkv_fork(kv, a.seq, &beam.seq));
    printf("\n3. Beam search forks A into A'. They share all of A's pages:\n");
    show_stats(kv);
    tok = 900;
    append(kv, &a, &tok, 1);
    tok = 901;
    append(kv, &beam, &tok, 1);
    printf("   Each beam appends its own token. Their last page was shared, so the\n"
           "   first write got a private copy (copy-on-write); the two full prefix\n"
           "   pages are still stored once:\n");
    show_stats(kv);

    /* 4. Speculative decoding: B drafts 5 tokens, the verifier keeps 2. */
    append(kv, &b, drafts, 5);
    printf("\n4. Speculative decoding: B drafts 5 tokens (length %u); the verifier\n"
           "   accepts 2, so B is truncated back to %u tokens.\n", b.length, b.length - 3);
    b.length -= 3;
    CHECK(llmkv_truncate(kv, b.seq, b.length));
    show_stats(kv);

    /* 5. Read everything back and compare with what was put. */
    all[0] = &a;
    all[1] = &beam;
    all[2] = &b;
    for (i = 0; i < 3; ++i) {
        float err = verify(kv, all[i]);
        if (err > max_err) max_err = err;
        step[i] = all[i]->seq; /* for step 6 */
    }
    printf("\n5. Gathering every layer of A, A' and B back as F32: max abs error %.6f\n"
           "   against the F32 values put (F16 rounding; values lie in [-1, 1]).\n", max_err);
    if (max_err > 1e-3f) {
        fprintf(stderr, "error: the cache returned values it was not given\n");
        return 1;
    }

    /* 6. One decode step over all three: each has one new query token. */
    CHECK(llmkv_batch_create(kv, 3, 3, &batch));
    CHECK(llmkv_batch_build(batch, step, q_lens, 3));
    CHECK(llmkv_batch_get(batch, &info));
    printf("\n6. A batch for one decode step over A, A', B. Its CSR page table (the\n"
           "   FlashInfer layout; a padded block table is there too). A and A' share\n"
           "   their first two pages:\n");
    print_array("seq_lens", info.seq_lens, info.n_seqs);
    print_array("kv_indptr", info.kv_indptr, info.n_seqs + 1);
    print_array("kv_indices", info.kv_indices, (uint32_t)info.kv_indptr[info.n_seqs]);
    print_array("kv_last_page_len", info.kv_last_page_len, info.n_seqs);
    llmkv_batch_destroy(batch);

    /* 7. The invariant checker: what the tests run after every operation. */
    result = llmkv_cache_check(kv, message, sizeof message);
    if (result != LLMKV_OK) fprintf(stderr, "invariant violated: %s\n", message);
    check(result, "llmkv_cache_check");
    printf("\n7. Invariant check: OK (reference counts, free list, page tables).\n");

    /* 8. Requests finish: their pages go back to the pool. */
    for (i = 0; i < 3; ++i) CHECK(llmkv_seq_free(kv, step[i]));
    printf("\n8. All three sequences freed:\n");
    show_stats(kv);
    llmkv_cache_destroy(kv);
    printf("\nDone.\n");
    return 0;
}
