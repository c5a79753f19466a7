/* llama_model.h - a Llama (llama2.c checkpoint format) whose K/V lives in
   llmkv: the model, its forward pass over a ragged batch, and the ways to
   generate with it (greedy or sampled, batched serving, beam search with
   fork, speculative decoding with truncate, teacher-forced scoring).

   Used by examples/llama.c (the command-line program) and
   tests/test_llama.c (which checks it against an independent contiguous
   reference). Include llmkv.h before this file; define
   LLMKV_IMPLEMENTATION in one file of the program as usual. Everything
   here is `static inline` (a program that uses part of it gets no
   unused-function warnings), so it may be included in several files.

   The forward pass is the standard Llama one, as the checkpoint's
   README (shared/models/README.md) describes: RMSNorm (eps 1e-5); q, k, v
   projections; rotary embedding on adjacent pairs (i, i+1) with frequency
   1 / 10000^((i mod head_dim) / head_dim); attention with scale
   1 / sqrt(head_dim), query head h reading KV head h / (n_heads /
   n_kv_heads); output projection and residual; RMSNorm; SwiGLU FFN
   w2(silu(w1 x) * w3 x) and residual; final RMSNorm; logits = classifier
   . x. llmkv does all the K/V work: llmkv_reserve* makes room, llmkv_put
   stores each layer's K and V, llmkv_attend reads them from the pages.
   Matrix products are plain C on the calling thread; the engine's thread
   count goes to llmkv's attention pool.

   Errors: the model loader returns 0 or -1 with a message; everything else
   returns llmkv_result and, on failure, leaves every sequence as it was
   (llama_forward rolls a failed step back with llmkv_truncate). */
#ifndef LLAMA_MODEL_H
#define LLAMA_MODEL_H

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* The model                                                                */
/* ------------------------------------------------------------------------ */

/* The checkpoint header: seven int32. vocab_size < 0 in the file means a
   separate classifier follows; here vocab_size is always positive and
   shared_classifier says which. */
typedef struct llama_config {
    int dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len;
} llama_config;

typedef struct llama_model {
    llama_config c;
    int head_dim;           /* dim / n_heads */
    int kv_dim;             /* n_kv_heads * head_dim */
    int shared_classifier;  /* 1: logits use the token embedding */
    float* data;            /* every weight, one allocation (owned) */
    const float *embed;     /* [vocab][dim] */
    const float *rms_att;   /* [layer][dim] */
    const float *wq;        /* [layer][dim][dim] */
    const float *wk, *wv;   /* [layer][kv_dim][dim] */
    const float *wo;        /* [layer][dim][dim] */
    const float *rms_ffn;   /* [layer][dim] */
    const float *w1, *w3;   /* [layer][hidden][dim] */
    const float *w2;        /* [layer][dim][hidden] */
    const float *rms_final; /* [dim] */
    const float *classifier;/* [vocab][dim] */
} llama_model;

static inline void llama__err(char* err, size_t err_size, const char* fmt, const char* a, long long b) {
    if (err && err_size) snprintf(err, err_size, fmt, a, b);
}

/* Reads the seven-int32 header from h and checks it (every field positive
   and sane, dim a multiple of n_heads, n_heads of n_kv_heads, an even
   head_dim of at most 512); *n_floats receives the weight count it
   implies. Returns 0, or -1 with a reason in `err` ("name: ..."). */
static inline int llama__parse_header(llama_model* m, const int32_t h[7], const char* name, long long* n_floats,
                                      char* err, size_t err_size) {
    long long V, D, H, L, KVD, T;
    memset(m, 0, sizeof *m);
    m->c.dim = h[0];
    m->c.hidden_dim = h[1];
    m->c.n_layers = h[2];
    m->c.n_heads = h[3];
    m->c.n_kv_heads = h[4];
    m->shared_classifier = h[5] > 0;
    m->c.vocab_size = h[5] > 0 ? h[5] : (h[5] == INT32_MIN ? 0 : -h[5]);
    m->c.seq_len = h[6];
    if (h[0] <= 0 || h[0] > 65536 || h[1] <= 0 || h[1] > 262144 || h[2] <= 0 || h[2] > 1024 || h[3] <= 0 ||
        h[4] <= 0 || m->c.vocab_size <= 0 || m->c.vocab_size > 1048576 || h[6] <= 0 || h[6] > 1048576 ||
        h[0] % h[3] != 0 || h[3] % h[4] != 0 || (h[0] / h[3]) % 2 != 0 || h[0] / h[3] > 512) {
        if (err && err_size)
            snprintf(err, err_size,
                     "%s: not a llama2.c checkpoint (header dim %d, hidden_dim %d, n_layers %d, n_heads %d, "
                     "n_kv_heads %d, vocab_size %d, seq_len %d)",
                     name, (int)h[0], (int)h[1], (int)h[2], (int)h[3], (int)h[4], (int)h[5], (int)h[6]);
        memset(m, 0, sizeof *m);
        return -1;
    }
    m->head_dim = m->c.dim / m->c.n_heads;
    m->kv_dim = m->c.n_kv_heads * m->head_dim;
    V = m->c.vocab_size, D = m->c.dim, H = m->c.hidden_dim, L = m->c.n_layers, KVD = m->kv_dim;
    T = m->c.seq_len;
    *n_floats = V * D + L * D + L * D * D + 2 * L * KVD * D + L * D * D + L * D + 3 * L * H * D + D +
                T * (m->head_dim / 2) * 2 + (m->shared_classifier ? 0 : V * D);
    return 0;
}

/* Points the weight arrays into m->data, in the file's order. */
static inline void llama__assign(llama_model* m) {
    const long long V = m->c.vocab_size, D = m->c.dim, H = m->c.hidden_dim, L = m->c.n_layers, KVD = m->kv_dim;
    const float* p = m->data;
    m->embed = p, p += V * D;
    m->rms_att = p, p += L * D;
    m->wq = p, p += L * D * D;
    m->wk = p, p += L * KVD * D;
    m->wv = p, p += L * KVD * D;
    m->wo = p, p += L * D * D;
    m->rms_ffn = p, p += L * D;
    m->w1 = p, p += L * H * D;
    m->w2 = p, p += L * D * H;
    m->w3 = p, p += L * H * D;
    m->rms_final = p, p += D;
    p += (long long)m->c.seq_len * (m->head_dim / 2) * 2; /* the two unused RoPE tables */
    m->classifier = m->shared_classifier ? m->embed : p;
}

/* The steps both loaders share once they hold the header h and know the
   input's size: the header checks, the size it implies, and the weight
   array (*n_floats of them, uninitialised). Returns 0, or -1 with a
   reason in `err` and m cleared. */
static inline int llama__prepare(llama_model* m, const int32_t h[7], long long size, const char* name,
                                 long long* n_floats, char* err, size_t err_size) {
    long long want;
    if (llama__parse_header(m, h, name, n_floats, err, err_size) != 0) return -1;
    want = (long long)(7 * sizeof(int32_t)) + 4 * *n_floats;
    if (size != want) {
        memset(m, 0, sizeof *m);
        llama__err(err, err_size, "%s: wrong size for its header (expected %lld bytes)", name, want);
        return -1;
    }
    m->data = (float*)malloc((size_t)(*n_floats * 4));
    if (!m->data) {
        memset(m, 0, sizeof *m);
        llama__err(err, err_size, "%s: out of memory (%lld floats)", name, *n_floats);
        return -1;
    }
    return 0;
}

/* Loads a llama2.c "legacy" checkpoint from a file: the header must pass
   llama__parse_header and the file must hold exactly the weights it
   implies. Returns 0, or -1 with a one-line reason in `err` (nothing to
   free then). */
static inline int llama_load(llama_model* m, const char* path, char* err, size_t err_size) {
    FILE* f;
    int32_t h[7];
    long long size, n_floats = 0;
    memset(m, 0, sizeof *m);
    f = fopen(path, "rb");
    if (!f) {
        llama__err(err, err_size, "cannot open %s%.0lld", path, 0);
        return -1;
    }
    if (fseek(f, 0, SEEK_END) != 0 || (size = (long long)ftell(f)) < 0 || fseek(f, 0, SEEK_SET) != 0) {
        fclose(f);
        llama__err(err, err_size, "cannot read %s%.0lld", path, 0);
        return -1;
    }
    if (size < (long long)sizeof h || fread(h, sizeof h, 1, f) != 1) {
        fclose(f);
        llama__err(err, err_size, "%s: too short for a checkpoint header (%lld bytes)", path, size);
        return -1;
    }
    if (llama__prepare(m, h, size, path, &n_floats, err, err_size) != 0) {
        fclose(f);
        return -1;
    }
    if (fread(m->data, 4, (size_t)n_floats, f) != (size_t)n_floats) {
        free(m->data);
        fclose(f);
        memset(m, 0, sizeof *m);
        llama__err(err, err_size, "%s: read error (%lld floats)", path, n_floats);
        return -1;
    }
    fclose(f);
    llama__assign(m);
    return 0;
}

/* llama_load from `size` bytes at `data` (copied; any alignment); `name`
   only labels the messages. */
static inline int llama_load_mem(llama_model* m, const void* data, size_t size, const char* name, char* err,
                                 size_t err_size) {
    int32_t h[7];
    long long n_floats = 0;
    memset(m, 0, sizeof *m);
    if (!data || size < sizeof h) {
        llama__err(err, err_size, "%s: too short for a checkpoint header (%lld bytes)", name, (long long)size);
        return -1;
    }
    memcpy(h, data, sizeof h);
    if (llama__prepare(m, h, (long long)size, name, &n_floats, err, err_size) != 0) return -1;
    memcpy(m->data, (const char*)data + sizeof h, (size_t)(n_floats * 4));
    llama__assign(m);
    return 0;
}

/* Frees the weights. */
static inline void llama_free(llama_model* m) {
    free(m->data);
    memset(m, 0, sizeof *m);
}

/* ------------------------------------------------------------------------ */
/* The engine: a cache and the scratch of one forward step                  */
/* ------------------------------------------------------------------------ */

/* Zero-initialise; zero fields take the stated defaults. */
typedef struct llama_opts {
    llmkv_dtype k_dtype, v_dtype; /* storage types; DEFAULT: F32 */
    uint32_t page_size;           /* token slots per page; 0: 16 */
    uint32_t n_threads;           /* attention threads (llmkv's pool); 0: 1 */
    uint32_t max_seqs;            /* live sequences; 0: 1 */
    uint32_t max_rows;            /* tokens per forward step, all sequences together; 0: seq_len */
    uint32_t n_layers;            /* run the first n layers only (a cheaper draft); 0: all */
    uint32_t n_pages;             /* cache capacity; 0: max_seqs full-length sequences */
    int prefix_index;             /* nonzero: record token ids and share prefixes */
    llmkv_cpu_path path;          /* attention code path; AUTO by default */
} llama_opts;

typedef struct llama_engine {
    const llama_model* m;
    llama_opts o;                 /* with the defaults filled in */
    llmkv_cache* kv;
    llmkv_batch* batch;
    llmkv_threadpool* pool;       /* NULL for one thread */
    float *x, *xb, *q, *k, *v, *att, *hb, *hb2; /* [max_rows][...] */
    float* rope;                  /* [seq_len][head_dim / 2][2]: cos, sin */
    uint32_t* old_len;            /* [max_seqs]: lengths before a step (rollback) */
    const llmkv_token** row_tokens; /* [max_seqs]: reserve_many_tokens argument */
} llama_engine;

static inline void llama_engine_destroy(llama_engine* e);

/* Creates the engine's cache (n_layers, n_kv_heads, head_dim of the model;
   max_seq_len = seq_len), batch, thread pool and scratch. Returns the
   llmkv error of whatever failed (LLMKV_ERR_OUT_OF_MEMORY for scratch),
   with nothing to destroy then. */
static inline llmkv_result llama_engine_create(llama_engine* e, const llama_model* m, const llama_opts* opts) {
    llmkv_desc d;
    llmkv_result r;
    uint32_t rows, per_seq, i, j, half;
    memset(e, 0, sizeof *e);
    e->m = m;
    if (opts) e->o = *opts;
    if (e->o.k_dtype == LLMKV_DTYPE_DEFAULT) e->o.k_dtype = LLMKV_DTYPE_F32;
    if (e->o.v_dtype == LLMKV_DTYPE_DEFAULT) e->o.v_dtype = LLMKV_DTYPE_F32;
    if (!e->o.page_size) e->o.page_size = 16;
    if (!e->o.n_threads) e->o.n_threads = 1;
    if (!e->o.max_seqs) e->o.max_seqs = 1;
    if (!e->o.max_rows) e->o.max_rows = (uint32_t)m->c.seq_len;
    if (!e->o.n_layers || e->o.n_layers > (uint32_t)m->c.n_layers) e->o.n_layers = (uint32_t)m->c.n_layers;
    per_seq = ((uint32_t)m->c.seq_len + e->o.page_size - 1) / e->o.page_size;
    if (!e->o.n_pages) e->o.n_pages = e->o.max_seqs * per_seq;
    memset(&d, 0, sizeof d);
    d.n_layers = e->o.n_layers;
    d.n_kv_heads = (uint32_t)m->c.n_kv_heads;
    d.head_dim = (uint32_t)m->head_dim;
    d.page_size = e->o.page_size;
    d.n_pages = e->o.n_pages;
    d.k_dtype = e->o.k_dtype;
    d.v_dtype = e->o.v_dtype;
    d.max_seqs = e->o.max_seqs;
    d.max_seq_len = (uint32_t)m->c.seq_len;
    d.prefix_index = e->o.prefix_index ? 1u : 0u;
    r = llmkv_cache_create(&d, &e->kv);
    if (r == LLMKV_OK) r = llmkv_batch_create(e->kv, e->o.max_seqs, e->o.max_rows, &e->batch);
    if (r == LLMKV_OK && e->o.n_threads > 1) r = llmkv_threadpool_create(e->o.n_threads, NULL, &e->pool);
    if (r != LLMKV_OK) {
        llama_engine_destroy(e);
        return r;
    }
    rows = e->o.max_rows;
    e->x = (float*)malloc(sizeof(float) * rows * (size_t)m->c.dim);
    e->xb = (float*)malloc(sizeof(float) * rows * (size_t)m->c.dim);
    e->q = (float*)malloc(sizeof(float) * rows * (size_t)m->c.dim);
    e->att = (float*)malloc(sizeof(float) * rows * (size_t)m->c.dim);
    e->k = (float*)malloc(sizeof(float) * rows * (size_t)m->kv_dim);
    e->v = (float*)malloc(sizeof(float) * rows * (size_t)m->kv_dim);
    e->hb = (float*)malloc(sizeof(float) * rows * (size_t)m->c.hidden_dim);
    e->hb2 = (float*)malloc(sizeof(float) * rows * (size_t)m->c.hidden_dim);
    half = (uint32_t)m->head_dim / 2;
    e->rope = (float*)malloc(sizeof(float) * (size_t)m->c.seq_len * half * 2);
    e->old_len = (uint32_t*)malloc(sizeof(uint32_t) * e->o.max_seqs);
    e->row_tokens = (const llmkv_token**)malloc(sizeof(llmkv_token*) * e->o.max_seqs);
    if (!e->x || !e->xb || !e->q || !e->att || !e->k || !e->v || !e->hb || !e->hb2 || !e->rope ||
        !e->old_len || !e->row_tokens) {
        llama_engine_destroy(e);
        return LLMKV_ERR_OUT_OF_MEMORY;
    }
    /* Rotary table, as llama2.c computes it (in float). */
    for (i = 0; i < (uint32_t)m->c.seq_len; ++i) {
        for (j = 0; j < half; ++j) {
            float freq = 1.0f / powf(10000.0f, (float)(2 * j) / (float)m->head_dim);
            float val = (float)i * freq;
            e->rope[(i * half + j) * 2] = cosf(val);
            e->rope[(i * half + j) * 2 + 1] = sinf(val);
        }
    }
    return LLMKV_OK;
}

/* Releases everything the engine owns (not the model). Safe on a
   zero-initialised or half-created engine. */
static inline void llama_engine_destroy(llama_engine* e) {
    llmkv_threadpool_destroy(e->pool);
    llmkv_batch_destroy(e->batch);
    llmkv_cache_destroy(e->kv);
    free(e->x), free(e->xb), free(e->q), free(e->att), free(e->k), free(e->v);
    free(e->hb), free(e->hb2), free(e->rope), free(e->old_len), free((void*)e->row_tokens);
    memset(e, 0, sizeof *e);
}

/* Replaces the engine's cache with `kv` (for example one loaded from a
   file), which must have the same shape; the old cache is destroyed and
   the batch rebuilt for the new one. */
static inline llmkv_result llama_engine_adopt(llama_engine* e, llmkv_cache* kv) {
    llmkv_batch* b = NULL;
    llmkv_desc d;
    llmkv_result r = llmkv_cache_desc(kv, &d);
    if (r != LLMKV_OK) return r;
    if (d.n_layers != e->o.n_layers || d.n_kv_heads != (uint32_t)e->m->c.n_kv_heads ||
        d.head_dim != (uint32_t)e->m->head_dim || d.max_seqs < e->o.max_seqs)
        return LLMKV_ERR_MISMATCH;
    r = llmkv_batch_create(kv, e->o.max_seqs, e->o.max_rows, &b);
    if (r != LLMKV_OK) return r;
    llmkv_batch_destroy(e->batch);
    llmkv_cache_destroy(e->kv);
    e->batch = b;
    e->kv = kv;
    return LLMKV_OK;
}

/* y[r][o] = sum_i w[o][i] x[r][i] for n rows: w is [n_out][n_in]. Four
   partial sums per dot product. */
static inline void llama__matmul(float* y, const float* x, const float* w, uint32_t n, size_t n_in, size_t n_out) {
    uint32_t r;
    size_t o, i;
    for (r = 0; r < n; ++r) {
        const float* xr = x + (size_t)r * n_in;
        float* yr = y + (size_t)r * n_out;
        for (o = 0; o < n_out; ++o) {
            const float* wo = w + (size_t)o * n_in;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            for (i = 0; i + 4 <= n_in; i += 4) {
                s0 += wo[i] * xr[i];
                s1 += wo[i + 1] * xr[i + 1];
                s2 += wo[i + 2] * xr[i + 2];
                s3 += wo[i + 3] * xr[i + 3];
            }
            for (; i < n_in; ++i) s0 += wo[i] * xr[i];
            yr[o] = (s0 + s1) + (s2 + s3);
        }
    }
}

/* out = x / rms(x) * w, for n rows of `dim`. */
static inline void llama__rmsnorm(float* out, const float* x, const float* w, uint32_t n, size_t dim) {
    uint32_t r;
    size_t i;
    for (r = 0; r < n; ++r) {
        const float* xr = x + (size_t)r * dim;
        float* orow = out + (size_t)r * dim;
        float ss = 0.0f;
        for (i = 0; i < dim; ++i) ss += xr[i] * xr[i];
        ss = 1.0f / sqrtf(ss / (float)dim + 1e-5f);
        for (i = 0; i < dim; ++i) orow[i] = w[i] * (ss * xr[i]);
    }
}

/* Rotates adjacent pairs of each head of one row at `pos`. */
static inline void llama__rope(const llama_engine* e, float* x, int width, int32_t pos) {
    int half = e->m->head_dim / 2, i;
    const float* cs = e->rope + (size_t)pos * (size_t)half * 2;
    for (i = 0; i < width; i += 2) {
        int j = (i % e->m->head_dim) / 2;
        float c = cs[2 * j], s = cs[2 * j + 1], a = x[i], b = x[i + 1];
        x[i] = a * c - b * s;
        x[i + 1] = a * s + b * c;
    }
}

/* Runs one step: sequence seqs[i] receives n_new[i] >= 1 new tokens
   (`tokens` holds them one sequence after the other), appended at its
   end. `logits` (may be NULL) receives [vocab] floats for every new token
   when all_rows is nonzero, otherwise for the last new token of each
   sequence only ([n_seqs][vocab]). With a prefix index the token ids are
   recorded, so the sequences' pages publish as they fill.
   Fails with LLMKV_ERR_BATCH_FULL beyond max_seqs sequences or max_rows
   tokens, LLMKV_ERR_SEQUENCE_TOO_LONG past seq_len, LLMKV_ERR_OUT_OF_PAGES
   when the cache is full; every sequence then keeps its old length. */
static inline llmkv_result llama_forward(llama_engine* e, const llmkv_seq* seqs, const uint32_t* n_new, uint32_t n_seqs,
                                  const llmkv_token* tokens, float* logits, int all_rows) {
    const llama_model* m = e->m;
    const size_t D = (size_t)m->c.dim, KVD = (size_t)m->kv_dim, HD = (size_t)m->c.hidden_dim;
    const size_t V = (size_t)m->c.vocab_size;
    llmkv_batch_info info;
    llmkv_attn_desc a;
    llmkv_result r;
    uint32_t i, rows = 0, row, l;
    if (!seqs || !n_new || !tokens || n_seqs == 0) return LLMKV_ERR_INVALID_ARGUMENT;
    if (n_seqs > e->o.max_seqs) return LLMKV_ERR_BATCH_FULL;
    for (i = 0; i < n_seqs; ++i) {
        if (n_new[i] == 0) return LLMKV_ERR_INVALID_ARGUMENT;
        if (n_new[i] > e->o.max_rows - rows) return LLMKV_ERR_BATCH_FULL;
        rows += n_new[i];
    }
    for (i = 0; i < rows; ++i)
        if (tokens[i] < 0 || (size_t)tokens[i] >= V) return LLMKV_ERR_INVALID_ARGUMENT;
    for (i = 0; i < n_seqs; ++i) {
        r = llmkv_seq_length(e->kv, seqs[i], &e->old_len[i]);
        if (r != LLMKV_OK) return r;
    }
    /* Room for the new tokens in every layer, all sequences or none. */
    if (e->o.prefix_index) {
        for (i = 0, row = 0; i < n_seqs; row += n_new[i], ++i) e->row_tokens[i] = tokens + row;
        r = llmkv_reserve_many_tokens(e->kv, seqs, n_new, e->row_tokens, n_seqs);
    } else {
        r = llmkv_reserve_many(e->kv, seqs, n_new, n_seqs);
    }
    if (r != LLMKV_OK) return r;
    r = llmkv_batch_build(e->batch, seqs, n_new, n_seqs);
    if (r == LLMKV_OK) r = llmkv_batch_get(e->batch, &info);
    for (row = 0; row < rows; ++row) memcpy(e->x + (size_t)row * D, m->embed + (size_t)tokens[row] * D, sizeof(float) * D);
    for (l = 0; l < e->o.n_layers && r == LLMKV_OK; ++l) {
        llama__rmsnorm(e->xb, e->x, m->rms_att + (size_t)l * D, rows, D);
        llama__matmul(e->q, e->xb, m->wq + (size_t)l * D * D, rows, D, D);
        llama__matmul(e->k, e->xb, m->wk + (size_t)l * KVD * D, rows, D, KVD);
        llama__matmul(e->v, e->xb, m->wv + (size_t)l * KVD * D, rows, D, KVD);
        for (row = 0; row < rows; ++row) {
            llama__rope(e, e->q + (size_t)row * D, (int)D, info.positions[row]);
            llama__rope(e, e->k + (size_t)row * KVD, (int)KVD, info.positions[row]);
        }
        /* Store this layer's K and V of the new tokens... */
        for (i = 0, row = 0; i < n_seqs && r == LLMKV_OK; row += n_new[i], ++i)
            r = llmkv_put(e->kv, seqs[i], l, n_new[i], e->k + (size_t)row * KVD, 0, e->v + (size_t)row * KVD, 0,
                          LLMKV_DTYPE_F32);
        if (r != LLMKV_OK) break;
        /* ...and attend over everything cached, straight from the pages. A
           put that copied a shared page changed a page table: rebuild. */
        if (llmkv_batch_check(e->batch) != LLMKV_OK) {
            r = llmkv_batch_build(e->batch, seqs, n_new, n_seqs);
            if (r == LLMKV_OK) r = llmkv_batch_get(e->batch, &info);
            if (r != LLMKV_OK) break;
        }
        memset(&a, 0, sizeof a);
        a.layer = l;
        a.n_q_heads = (uint32_t)m->c.n_heads;
        a.q = e->q;
        a.out = e->att;
        a.path = e->o.path;
        r = llmkv_attend(e->kv, e->batch, &a, e->pool);
        if (r != LLMKV_OK) break;
        llama__matmul(e->xb, e->att, m->wo + (size_t)l * D * D, rows, D, D);
        for (row = 0; row < rows * (uint32_t)D; ++row) e->x[row] += e->xb[row];
        llama__rmsnorm(e->xb, e->x, m->rms_ffn + (size_t)l * D, rows, D);
        llama__matmul(e->hb, e->xb, m->w1 + (size_t)l * HD * D, rows, D, HD);
        llama__matmul(e->hb2, e->xb, m->w3 + (size_t)l * HD * D, rows, D, HD);
        for (row = 0; row < rows * (uint32_t)HD; ++row) {
            float h = e->hb[row];
            e->hb[row] = h / (1.0f + expf(-h)) * e->hb2[row];
        }
        llama__matmul(e->xb, e->hb, m->w2 + (size_t)l * D * HD, rows, HD, D);
        for (row = 0; row < rows * (uint32_t)D; ++row) e->x[row] += e->xb[row];
    }
    if (r != LLMKV_OK) {
        /* Roll the step back: the sequences get their old lengths. */
        for (i = 0; i < n_seqs; ++i) (void)llmkv_truncate(e->kv, seqs[i], e->old_len[i]);
        return r;
    }
    if (logits) {
        llama__rmsnorm(e->xb, e->x, m->rms_final, rows, D);
        if (all_rows) {
            llama__matmul(logits, e->xb, m->classifier, rows, D, V);
        } else {
            for (i = 0, row = 0; i < n_seqs; ++i) {
                row += n_new[i];
                llama__matmul(logits + (size_t)i * (size_t)V, e->xb + (size_t)(row - 1) * D, m->classifier, 1, D, V);
            }
        }
    }
    return LLMKV_OK;
}

/* ------------------------------------------------------------------------ */
/* Sampling                                                                 */
/* ------------------------------------------------------------------------ */

/* The index of the largest logit (the lowest index among equals). */
static inline int llama_argmax(const float* logits, int n) {
    int i, best = 0;
    for (i = 1; i < n; ++i)
        if (logits[i] > logits[best]) best = i;
    return best;
}

/* log(sum(exp(logits))), in double: log softmax(logits)[i] is
   logits[i] minus this. */
static inline double llama_logsumexp(const float* logits, int n) {
    double mx = logits[0], sum = 0.0;
    int i;
    for (i = 1; i < n; ++i)
        if (logits[i] > mx) mx = logits[i];
    for (i = 0; i < n; ++i) sum += exp((double)logits[i] - mx);
    return mx + log(sum);
}

/* log softmax(logits)[tok], in double. */
static inline double llama_logprob(const float* logits, int n, int tok) {
    return (double)logits[tok] - llama_logsumexp(logits, n);
}

/* A uniform double in [0, 1) from a xorshift64* state (never 0). */
static inline double llama_uniform(uint64_t* rng) {
    uint64_t x = *rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *rng = x;
    return (double)((x * 0x2545F4914F6CDD1Dull) >> 11) / 9007199254740992.0;
}

/* A generator state from a seed. */
static inline uint64_t llama_rng(uint64_t seed) { return (seed * 0x9E3779B97F4A7C15ull + 0x2545F4914F6CDD1Dull) | 1u; }

/* probs = softmax(logits / temp), in double. */
static inline void llama__softmax(double* probs, const float* logits, int n, float temp) {
    double mx = logits[0], sum = 0.0;
    int i;
    for (i = 1; i < n; ++i)
        if (logits[i] > mx) mx = logits[i];
    for (i = 0; i < n; ++i) sum += probs[i] = exp(((double)logits[i] - mx) / temp);
    for (i = 0; i < n; ++i) probs[i] /= sum;
}

/* Draws an index from probs (which sum to 1) with one uniform number. */
static inline int llama__draw(const double* probs, int n, uint64_t* rng) {
    double u = llama_uniform(rng), c = 0.0;
    int i;
    for (i = 0; i < n; ++i) {
        c += probs[i];
        if (u < c) return i;
    }
    for (i = n - 1; i > 0 && probs[i] <= 0.0; --i) continue;
    return i; /* rounding left u above the total: the last possible index */
}

/* The next token: argmax for temp <= 0, else a draw from
   softmax(logits / temp). `probs` is scratch of n doubles. */
static inline int llama_sample(const float* logits, int n, float temp, uint64_t* rng, double* probs) {
    if (temp <= 0.0f) return llama_argmax(logits, n);
    llama__softmax(probs, logits, n, temp);
    return llama__draw(probs, n, rng);
}

/* ------------------------------------------------------------------------ */
/* Generation                                                               */
/* ------------------------------------------------------------------------ */

/* Feeds `feed` (n_feed >= 1 tokens, one forward step) to `seq`, then
   samples n_steps tokens into out[], feeding each but the last back in.
   To continue later, call again with feed = the last token of out.
   *rng is the sampler's state (ignored for temp <= 0). */
static inline llmkv_result llama_generate(llama_engine* e, llmkv_seq seq, const llmkv_token* feed, uint32_t n_feed,
                                   uint32_t n_steps, float temp, uint64_t* rng, llmkv_token* out) {
    const int V = e->m->c.vocab_size;
    float* logits = (float*)malloc(sizeof(float) * (size_t)V);
    double* probs = (double*)malloc(sizeof(double) * (size_t)V);
    llmkv_result r = logits && probs ? LLMKV_OK : LLMKV_ERR_OUT_OF_MEMORY;
    uint32_t s;
    for (s = 0; s < n_steps && r == LLMKV_OK; ++s) {
        r = llama_forward(e, &seq, &n_feed, 1, feed, logits, 0);
        if (r != LLMKV_OK) break;
        out[s] = llama_sample(logits, V, temp, rng, probs);
        feed = &out[s];
        n_feed = 1;
    }
    free(logits);
    free(probs);
    return r;
}

/* ------------------------------------------------------------------------ */
/* Batched serving                                                          */
/* ------------------------------------------------------------------------ */

typedef struct llama_serve_stats {
    uint32_t steps;               /* forward steps */
    uint64_t prompt_tokens;       /* prompt tokens of every request */
    uint64_t prompt_tokens_cached;/* ... found in the prefix index (not computed) */
    uint64_t rows;                /* token rows computed, all steps */
    uint32_t max_batch;           /* most sequences in one step */
    uint32_t peak_pages;          /* most pages in use at once */
} llama_serve_stats;

/* One request of llama_serve. */
typedef struct llama__request {
    llmkv_seq seq;
    uint32_t done;                /* tokens sampled so far */
    uint32_t n_pending;           /* tokens to feed at the next step */
    const llmkv_token* pending;
    uint64_t rng;
} llama__request;

/* Serves n_req requests the way a server does: request i arrives before
   step i, starts from the longest prefix the cache already holds (with a
   prefix index), and from then on every live request advances in the same
   forward step: newcomers prefill the rest of their prompt while the
   others decode one token, a ragged batch. Each request samples n_steps
   tokens into out[i * n_steps ...] with its own generator seeded `seed`, so
   it produces what llama_generate produces for it alone. A finished
   request frees its sequence, leaving its pages in the prefix index for
   later ones. Needs max_seqs >= n_req in the worst case (every request
   live at once) and max_rows >= the longest prompt plus n_req. */
static inline llmkv_result llama_serve(llama_engine* e, const llmkv_token* const* prompts, const uint32_t* n_prompt,
                                uint32_t n_req, uint32_t n_steps, float temp, uint64_t seed, llmkv_token* out,
                                llama_serve_stats* st) {
    const int V = e->m->c.vocab_size;
    llama__request* q = (llama__request*)calloc(n_req ? n_req : 1, sizeof(llama__request));
    llmkv_seq* seqs = (llmkv_seq*)malloc(sizeof(llmkv_seq) * (n_req ? n_req : 1));
    uint32_t* n_new = (uint32_t*)malloc(sizeof(uint32_t) * (n_req ? n_req : 1));
    uint32_t* who = (uint32_t*)malloc(sizeof(uint32_t) * (n_req ? n_req : 1));
    llmkv_token* toks = (llmkv_token*)malloc(sizeof(llmkv_token) * e->o.max_rows);
    float* logits = (float*)malloc(sizeof(float) * (size_t)V * (n_req ? n_req : 1));
    double* probs = (double*)malloc(sizeof(double) * (size_t)V);
    llmkv_result r = q && seqs && n_new && who && toks && logits && probs ? LLMKV_OK : LLMKV_ERR_OUT_OF_MEMORY;
    uint32_t admitted = 0, finished = 0, i, b, rows;
    llmkv_stats ks;
    if (st) memset(st, 0, sizeof *st);
    while (r == LLMKV_OK && n_steps > 0 && finished < n_req) {
        /* One arrival per step. */
        if (admitted < n_req) {
            llama__request* nq = &q[admitted];
            uint32_t cached = 0;
            if (n_prompt[admitted] == 0) {
                r = LLMKV_ERR_INVALID_ARGUMENT;
                break;
            }
            if (e->o.prefix_index)
                r = llmkv_seq_create_prefix(e->kv, 0, prompts[admitted], n_prompt[admitted], &nq->seq, &cached);
            else
                r = llmkv_seq_create(e->kv, &nq->seq);
            if (r != LLMKV_OK) break;
            nq->pending = prompts[admitted] + cached;
            nq->n_pending = n_prompt[admitted] - cached;
            nq->rng = llama_rng(seed);
            if (st) {
                st->prompt_tokens += n_prompt[admitted];
                st->prompt_tokens_cached += cached;
            }
            ++admitted;
        }
        /* The step's batch: every live request with its pending tokens. */
        for (i = 0, b = 0, rows = 0; i < admitted; ++i) {
            if (q[i].done == n_steps) continue;
            if (q[i].n_pending > e->o.max_rows - rows) {
                r = LLMKV_ERR_BATCH_FULL;
                break;
            }
            memcpy(toks + rows, q[i].pending, sizeof(llmkv_token) * q[i].n_pending);
            rows += q[i].n_pending;
            seqs[b] = q[i].seq;
            n_new[b] = q[i].n_pending;
            who[b++] = i;
        }
        if (r != LLMKV_OK) break;
        r = llama_forward(e, seqs, n_new, b, toks, logits, 0);
        if (r != LLMKV_OK) break;
        if (st) {
            st->steps++;
            st->rows += rows;
            if (b > st->max_batch) st->max_batch = b;
            if (llmkv_cache_stats(e->kv, &ks) == LLMKV_OK && ks.n_pages_used > st->peak_pages)
                st->peak_pages = ks.n_pages_used;
        }
        /* Full pages become matchable for the next arrivals now (a
           reserve would publish them only at the sequence's next step). */
        for (i = 0; i < b && r == LLMKV_OK && e->o.prefix_index; ++i) r = llmkv_seq_publish(e->kv, seqs[i], 0);
        for (i = 0; i < b && r == LLMKV_OK; ++i) {
            llama__request* cq = &q[who[i]];
            llmkv_token* next = &out[(size_t)who[i] * n_steps + cq->done];
            *next = llama_sample(logits + (size_t)i * (size_t)V, V, temp, &cq->rng, probs);
            cq->pending = next;
            cq->n_pending = 1;
            if (++cq->done == n_steps) {
                r = llmkv_seq_free(e->kv, cq->seq); /* its pages stay cached */
                ++finished;
                if (r != LLMKV_OK) break;
            }
        }
    }
    for (i = 0; i < admitted; ++i)
        if (q && q[i].done < n_steps) (void)llmkv_seq_free(e->kv, q[i].seq);
    free(q), free(seqs), free(n_new), free(who), free(toks), free(logits), free(probs);
    return r;
}

/* ------------------------------------------------------------------------ */
/* Beam search                                                              */
/* ------------------------------------------------------------------------ */

/* Beam search with K = n_beams beams over n_steps tokens after `prompt`.
   A beam's score is the sum of the log-probabilities (llama_logprob) of
   its tokens. Each step runs every beam's newest token through one batch,
   ranks all (beam, token) continuations by score (higher first; equal
   scores: lower beam index, then lower token id) and keeps the best K: a
   beam kept once continues in its own sequence, a beam kept m > 1 times
   is forked m - 1 times (its pages shared, not copied), a beam not kept is
   freed. The new beams are numbered in rank order. The first step ranks
   the prompt's continuations alone. out receives the best final beam's
   n_steps tokens and *score its score. Needs max_seqs >= n_beams. */
static inline llmkv_result llama_beam_search(llama_engine* e, const llmkv_token* prompt, uint32_t n_prompt,
                                      uint32_t n_beams, uint32_t n_steps, llmkv_token* out, double* score) {
    const int V = e->m->c.vocab_size;
    const uint32_t K = n_beams;
    const size_t nk = K ? K : 1, ns = n_steps ? n_steps : 1; /* allocation sizes (0 is refused below) */
    llmkv_seq* seq = (llmkv_seq*)calloc(nk, sizeof(llmkv_seq));
    llmkv_seq* nseq = (llmkv_seq*)calloc(nk, sizeof(llmkv_seq));
    llmkv_token* tok = (llmkv_token*)malloc(sizeof(llmkv_token) * nk * ns);
    llmkv_token* ntok = (llmkv_token*)malloc(sizeof(llmkv_token) * nk * ns);
    double* sc = (double*)malloc(sizeof(double) * nk);
    double* nsc = (double*)malloc(sizeof(double) * nk);
    double* lp = (double*)malloc(sizeof(double) * (size_t)V * nk);
    float* logits = (float*)malloc(sizeof(float) * (size_t)V * nk);
    uint32_t* ones = (uint32_t*)malloc(sizeof(uint32_t) * nk);
    uint32_t* par = (uint32_t*)malloc(sizeof(uint32_t) * nk);
    int32_t* ctok = (int32_t*)malloc(sizeof(int32_t) * nk);
    uint32_t* kids = (uint32_t*)malloc(sizeof(uint32_t) * nk);
    uint32_t* used = (uint32_t*)malloc(sizeof(uint32_t) * nk);
    llmkv_token* feed = (llmkv_token*)malloc(sizeof(llmkv_token) * nk);
    llmkv_result r = LLMKV_OK;
    uint32_t n_live = 0, s, b, c, j;
    if (!seq || !nseq || !tok || !ntok || !sc || !nsc || !lp || !logits || !ones || !par || !ctok || !kids || !used || !feed)
        r = LLMKV_ERR_OUT_OF_MEMORY;
    else if (K == 0 || n_steps == 0 || n_prompt == 0 || K > e->o.max_seqs || K > (uint32_t)V)
        r = LLMKV_ERR_INVALID_ARGUMENT;
    if (r == LLMKV_OK) r = llmkv_seq_create(e->kv, &seq[0]);
    if (r == LLMKV_OK) {
        n_live = 1;
        sc[0] = 0.0;
        r = llama_forward(e, &seq[0], &n_prompt, 1, prompt, logits, 0);
    }
    for (s = 0; s < n_steps && r == LLMKV_OK; ++s) {
        if (s > 0) {
            for (b = 0; b < n_live; ++b) {
                ones[b] = 1;
                feed[b] = tok[b * n_steps + s - 1];
            }
            r = llama_forward(e, seq, ones, n_live, feed, logits, 0);
            if (r != LLMKV_OK) break;
        }
        for (b = 0; b < n_live; ++b) {
            const float* row = logits + (size_t)b * (size_t)V;
            double norm = llama_logsumexp(row, V);
            for (j = 0; j < (uint32_t)V; ++j) lp[(size_t)b * (size_t)V + j] = sc[b] + ((double)row[j] - norm);
        }
        /* The K best (beam, token) pairs, in rank order. */
        for (c = 0; c < K; ++c) {
            int have = 0;
            uint32_t bb = 0, bt = 0;
            for (b = 0; b < n_live; ++b) {
                for (j = 0; j < (uint32_t)V; ++j) {
                    double v = lp[(size_t)b * (size_t)V + j];
                    if (have && !(v > lp[(size_t)bb * (size_t)V + bt])) continue;
                    have = 1, bb = b, bt = j;
                }
            }
            par[c] = bb;
            ctok[c] = (int32_t)bt;
            nsc[c] = lp[(size_t)bb * (size_t)V + bt];
            lp[(size_t)bb * (size_t)V + bt] = -HUGE_VAL; /* taken */
            if (nsc[c] == -HUGE_VAL) break;
        }
        /* New beams: a kept beam's first child takes its sequence, later
           children fork it; beams kept by no one are freed. */
        for (b = 0; b < n_live; ++b) kids[b] = 0;
        for (j = 0; j < c; ++j) kids[par[j]]++;
        for (b = 0; b < n_live; ++b) {
            used[b] = 0;
            if (kids[b] == 0) (void)llmkv_seq_free(e->kv, seq[b]);
        }
        for (j = 0; j < c; ++j) {
            if (used[par[j]]++ == 0) nseq[j] = seq[par[j]];
            else r = llmkv_fork(e->kv, seq[par[j]], &nseq[j]);
            if (r != LLMKV_OK) break;
            memcpy(ntok + j * n_steps, tok + par[j] * n_steps, sizeof(llmkv_token) * s);
            ntok[j * n_steps + s] = ctok[j];
        }
        if (r != LLMKV_OK) {
            /* Free what exists: the new beams made so far and the kept
               parents none of them took over yet. */
            uint32_t made = j;
            for (b = 0; b < made; ++b) (void)llmkv_seq_free(e->kv, nseq[b]);
            for (b = 0; b < n_live; ++b)
                if (kids[b] != 0 && used[b] == 0) (void)llmkv_seq_free(e->kv, seq[b]);
            n_live = 0;
            break;
        }
        n_live = c;
        memcpy(seq, nseq, sizeof(llmkv_seq) * c);
        memcpy(tok, ntok, sizeof(llmkv_token) * c * n_steps);
        memcpy(sc, nsc, sizeof(double) * c);
    }
    if (r == LLMKV_OK) {
        memcpy(out, tok, sizeof(llmkv_token) * n_steps); /* beam 0 ranks first */
        if (score) *score = sc[0];
    }
    for (b = 0; b < n_live; ++b) (void)llmkv_seq_free(e->kv, seq[b]);
    free(seq), free(nseq), free(tok), free(ntok), free(sc), free(nsc), free(lp), free(logits);
    free(ones), free(par), free(ctok), free(kids), free(used), free(feed);
    return r;
}

/* ------------------------------------------------------------------------ */
/* Speculative decoding                                                     */
/* ------------------------------------------------------------------------ */

typedef struct llama_spec_stats {
    uint32_t rounds;      /* verification steps of the target */
    uint64_t drafted;     /* tokens the draft proposed */
    uint64_t accepted;    /* ... that the target kept */
} llama_spec_stats;

/* Speculative decoding: a cheap draft engine (another cache: the same
   model with fewer bytes per token, or fewer layers) proposes up to
   n_draft tokens one at a time; the target engine verifies them all in one
   forward step over [last token, proposals] and keeps the longest run it
   agrees with, plus one token of its own; both caches are then rolled back
   to what was kept with llmkv_truncate. For temp <= 0 agreement means the
   target's argmax, so the output is the target's greedy output token for
   token. For temp > 0 a proposal d drawn from the draft's q is kept with
   probability min(1, p(d) / q(d)), and on rejection the token is drawn from
   max(0, p - q) normalised (the standard speculative sampling rule: the
   output is distributed as the target's). Writes n_steps tokens to out. */
static inline llmkv_result llama_speculative(llama_engine* target, llama_engine* draft, const llmkv_token* prompt,
                                      uint32_t n_prompt, uint32_t n_steps, uint32_t n_draft, float temp,
                                      uint64_t* rng, llmkv_token* out, llama_spec_stats* st) {
    const int V = target->m->c.vocab_size;
    const uint32_t hist_cap = n_prompt + n_steps;
    llmkv_token* hist = (llmkv_token*)malloc(sizeof(llmkv_token) * (hist_cap ? hist_cap : 1));
    float* tl = (float*)malloc(sizeof(float) * (size_t)V * (n_draft + 1));
    float* dl = (float*)malloc(sizeof(float) * (size_t)V);
    double* q = (double*)malloc(sizeof(double) * (size_t)V * (n_draft ? n_draft : 1));
    double* p = (double*)malloc(sizeof(double) * (size_t)V);
    llmkv_seq ts = {0}, ds = {0};
    llmkv_result r = hist && tl && dl && q && p ? LLMKV_OK : LLMKV_ERR_OUT_OF_MEMORY;
    uint32_t n_hist = n_prompt, n_out = 0, t_len = 0, d_len = 0, n, i, a, rows;
    if (st) memset(st, 0, sizeof *st);
    if (r == LLMKV_OK && (n_prompt == 0 || n_draft == 0 || target->m->c.vocab_size != draft->m->c.vocab_size ||
                          n_draft + 1 > target->o.max_rows))
        r = LLMKV_ERR_INVALID_ARGUMENT;
    if (r == LLMKV_OK) r = llmkv_seq_create(target->kv, &ts);
    if (r == LLMKV_OK) r = llmkv_seq_create(draft->kv, &ds);
    if (r == LLMKV_OK) memcpy(hist, prompt, sizeof(llmkv_token) * n_prompt);
    /* Invariant: the target's cache holds hist[0, n_hist - 1); the draft's
       hist[0, d_len), d_len <= n_hist - 1 (it catches up in its next step). */
    if (r == LLMKV_OK && n_steps > 0) {
        r = llama_forward(target, &ts, &n_prompt, 1, prompt, tl, 0);
        if (r == LLMKV_OK) {
            out[n_out++] = hist[n_hist++] = llama_sample(tl, V, temp, rng, p);
            t_len = n_prompt;
        }
    }
    while (r == LLMKV_OK && n_out < n_steps) {
        /* Proposals: the draft feeds what it lacks, then its own picks. */
        n = n_steps - n_out - 1 < n_draft ? n_steps - n_out - 1 : n_draft;
        for (i = 0; i < n && r == LLMKV_OK; ++i) {
            rows = n_hist - d_len;
            r = llama_forward(draft, &ds, &rows, 1, hist + d_len, dl, 0);
            if (r != LLMKV_OK) break;
            d_len = n_hist;
            if (temp <= 0.0f) {
                hist[n_hist] = llama_argmax(dl, V);
            } else {
                llama__softmax(q + (size_t)i * (size_t)V, dl, V, temp);
                hist[n_hist] = llama__draw(q + (size_t)i * (size_t)V, V, rng);
            }
            ++n_hist; /* tentatively */
        }
        if (r != LLMKV_OK) break;
        /* Verify: the target runs [last, proposals] in one step. */
        rows = n + 1;
        r = llama_forward(target, &ts, &rows, 1, hist + t_len, tl, 1);
        if (r != LLMKV_OK) break;
        n_hist -= n; /* hist[n_hist, n_hist + n) are the proposals */
        for (a = 0; a < n; ++a) {
            llmkv_token d = hist[n_hist + a];
            const float* row = tl + (size_t)a * (size_t)V;
            if (temp <= 0.0f) {
                if (llama_argmax(row, V) != d) break;
            } else {
                double pd, qd;
                llama__softmax(p, row, V, temp);
                pd = p[d];
                qd = q[(size_t)a * (size_t)V + (size_t)d];
                if (!(llama_uniform(rng) < (qd > 0.0 ? pd / qd : 1.0))) break;
            }
        }
        /* The target's own token after the kept run: a correction or,
           when everything was kept, one more. */
        {
            const float* row = tl + (size_t)a * (size_t)V;
            llmkv_token t;
            if (temp <= 0.0f) {
                t = llama_argmax(row, V);
            } else if (a < n) {
                double sum = 0.0;
                int k2;
                llama__softmax(p, row, V, temp);
                for (k2 = 0; k2 < V; ++k2) {
                    double dd = p[k2] - q[(size_t)a * (size_t)V + (size_t)k2];
                    p[k2] = dd > 0.0 ? dd : 0.0;
                    sum += p[k2];
                }
                if (sum > 0.0) {
                    for (k2 = 0; k2 < V; ++k2) p[k2] /= sum;
                } else {
                    llama__softmax(p, row, V, temp);
                }
                t = llama__draw(p, V, rng);
            } else {
                t = llama_sample(row, V, temp, rng, p);
            }
            for (i = 0; i < a; ++i) out[n_out++] = hist[n_hist + i];
            n_hist += a;
            out[n_out++] = hist[n_hist++] = t;
        }
        /* Roll both caches back to what was kept. */
        t_len = n_hist - 1;
        r = llmkv_truncate(target->kv, ts, t_len);
        if (r == LLMKV_OK && d_len > t_len) {
            d_len = t_len;
            r = llmkv_truncate(draft->kv, ds, d_len);
        }
        if (st) {
            st->rounds++;
            st->drafted += n;
            st->accepted += a;
        }
    }
    if (ts.id) (void)llmkv_seq_free(target->kv, ts);
    if (ds.id) (void)llmkv_seq_free(draft->kv, ds);
    free(hist), free(tl), free(dl), free(q), free(p);
    return r;
}

/* ------------------------------------------------------------------------ */
/* Teacher-forced scoring                                                   */
/* ------------------------------------------------------------------------ */

/* Runs tokens[0, n) through a fresh sequence, `chunk` tokens per forward
   step (0: 1), and for every position i < n - 1 records the model's top
   token top1[i] and the negative log-likelihood nll[i] of tokens[i + 1].
   Either output may be NULL. The sequence is freed at the end. */
static inline llmkv_result llama_teacher_force(llama_engine* e, const llmkv_token* tokens, uint32_t n, uint32_t chunk,
                                        int32_t* top1, double* nll) {
    const int V = e->m->c.vocab_size;
    llmkv_seq seq;
    float* logits;
    llmkv_result r;
    uint32_t pos = 0, i, c;
    if (!chunk) chunk = 1;
    if (chunk > e->o.max_rows) chunk = e->o.max_rows;
    logits = (float*)malloc(sizeof(float) * (size_t)V * chunk);
    if (!logits) return LLMKV_ERR_OUT_OF_MEMORY;
    r = llmkv_seq_create(e->kv, &seq);
    if (r != LLMKV_OK) {
        free(logits);
        return r;
    }
    while (pos < n && r == LLMKV_OK) {
        c = n - pos < chunk ? n - pos : chunk;
        r = llama_forward(e, &seq, &c, 1, tokens + pos, logits, 1);
        for (i = 0; i < c && r == LLMKV_OK; ++i) {
            if (pos + i + 1 >= n) break;
            if (top1) top1[pos + i] = llama_argmax(logits + (size_t)i * (size_t)V, V);
            if (nll) nll[pos + i] = -llama_logprob(logits + (size_t)i * (size_t)V, V, tokens[pos + i + 1]);
        }
        pos += c;
    }
    (void)llmkv_seq_free(e->kv, seq);
    free(logits);
    return r;
}

#endif /* LLAMA_MODEL_H */
