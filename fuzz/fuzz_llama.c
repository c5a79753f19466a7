/* fuzz_llama.c - libFuzzer target for the real-model example's checkpoint
   parser (examples/llama_model.h), driven through to generation.

   The input is a llama2.c checkpoint: llama_load_mem must either refuse it
   with a message or accept a model whose header passed every check and
   whose size matches it exactly. An accepted model (its weights are
   whatever bytes the input holds: NaN and infinities included) then
   generates up to 8 greedy tokens through llmkv, over a page size and
   storage type picked from the header bytes, and every token must be in
   the vocabulary; the cache must check clean and hold no sequence after.
   Inputs are at most libFuzzer's -max_len (4096 bytes by default), which
   bounds every dimension the header can name. */
#define LLMKV_IMPLEMENTATION
#include "../llmkv.h"
#include "../examples/llama_model.h"

#include <stdint.h>

static void fail(const char* what) {
    fprintf(stderr, "fuzz_llama: %s\n", what);
    abort();
}

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    static const llmkv_dtype types[] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16,
                                        LLMKV_DTYPE_Q8,  LLMKV_DTYPE_Q4,  LLMKV_DTYPE_FP8};
    llama_model m;
    llama_engine e;
    llama_opts o;
    llmkv_seq seq;
    llmkv_stats st;
    llmkv_token prompt, out[8];
    char err[512];
    uint32_t steps, i;
    uint64_t rng = llama_rng(size);
    err[0] = 0;
    if (llama_load_mem(&m, data, size, "input", err, sizeof err) != 0) {
        if (!err[0] || m.data) fail("a refused input without a message, or with weights left");
        return 0;
    }
    if (!m.data || m.head_dim * m.c.n_heads != m.c.dim || m.c.n_heads % m.c.n_kv_heads != 0)
        fail("an accepted model with an inconsistent shape");
    memset(&o, 0, sizeof o);
    o.page_size = 1u + (uint32_t)(data[size - 1] % 8);
    o.k_dtype = types[data[size - 2] % 6];
    o.v_dtype = types[data[size - 3] % 6];
    o.max_rows = 8;
    if (llama_engine_create(&e, &m, &o) == LLMKV_OK) {
        prompt = m.c.vocab_size > 1 ? 1 : 0; /* BOS when the vocabulary has it */
        steps = (uint32_t)m.c.seq_len < 8 ? (uint32_t)m.c.seq_len : 8;
        if (llmkv_seq_create(e.kv, &seq) != LLMKV_OK) fail("no sequence in a fresh cache");
        if (llama_generate(&e, seq, &prompt, 1, steps, 0.0f, &rng, out) != LLMKV_OK) fail("generation failed");
        for (i = 0; i < steps; ++i)
            if (out[i] < 0 || out[i] >= m.c.vocab_size) fail("a token outside the vocabulary");
        if (llmkv_seq_free(e.kv, seq) != LLMKV_OK) fail("free failed");
        if (llmkv_cache_check(e.kv, err, sizeof err) != LLMKV_OK) fail(err);
        if (llmkv_cache_stats(e.kv, &st) != LLMKV_OK || st.n_seqs != 0) fail("a sequence left");
        llama_engine_destroy(&e);
    }
    llama_free(&m);
    return 0;
}
