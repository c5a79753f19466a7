/* A real model end to end: examples/llama_model.h (a llama2.c-format
   Llama whose K/V live in llmkv) against an independent reference.

   The model is stories260K (shared/models/README.md): a real, trained tiny
   Llama, so the K/V that go through the cache are real activations. Its
   path is env LLMKV_MODEL, else ../shared/models/stories260K.bin (relative
   to the repository root, where `make test` runs); when that file cannot
   be opened every test here is skipped, saying so.

   The reference (ref_*) is written from the model's README alone: its own
   matrix products, RMSNorm, RoPE, SwiGLU and attention, with K/V in a
   plain contiguous array per sequence ([layer][pos][kv_dim] floats) and
   attention in double with a plain loop over positions. It shares nothing
   with llama_model.h but the weight arrays (read from llama_model's
   pointers, which are the file's floats) and the generator llama_uniform
   for sampled streams; to simulate a lossy storage type it rounds its own
   K/V with llmkv_quantize / llmkv_dequantize (never llmkv's cache or
   attention). Greedy decoding is deterministic, so the paged
   cache driven by llama_model.h must reproduce the reference's token ids
   exactly: a wrong page table, a stale batch, a copy-on-write that lost a
   write, a truncate that dropped a kept token or a restore that lost a
   position changes the attention of every later step and, within a few
   tokens, the ids.

   A failing greedy comparison prints the first differing step and the
   reference's top-1 minus top-2 logit gap there, so a floating-point
   near-tie (a gap of ~1e-5) can be told from a real bug (a gap of ~1).

   LLMKV_TEST_SCALE < 1 (CI uses 0.1 to 0.2 under valgrind, qemu and
   ThreadSanitizer) shortens every run; the sizes the comments give are
   the full ones.

   The quality test prints its table (storage type, top-1 agreement with
   F32 storage, mean NLL and its increase, agreement with the reference
   rounding K/V the same way) to stderr on every run: it is the measured
   cost of each storage type on real activations. */
#include "test_util.h"
#include "../examples/llama_model.h"

#include <stdint.h>

void suite_llama(tst* t);

/* ------------------------------------------------------------------------ */
/* The reference forward pass                                               */
/* ------------------------------------------------------------------------ */

/* One sequence of the reference: the weights (borrowed), its K/V for
   positions [0, len) and the scratch of one step. */
typedef struct ref_model {
    const llama_model* m;
    int dim, kv_dim, hidden, n_layers, n_heads, n_kv_heads, head_dim, vocab, seq_len;
    int len;             /* positions whose K/V are stored */
    llmkv_dtype k_store, v_store; /* storage to simulate: each new head vector
                                     goes through llmkv_quantize and back
                                     (DEFAULT or F32: exact) */
    float* kc;           /* [n_layers][seq_len][kv_dim] */
    float* vc;           /* [n_layers][seq_len][kv_dim] */
    float *x, *xb, *xb2, *q, *hb, *hb2; /* activations of the current token */
    float* logits;       /* [vocab]: of the last step */
    double* score;       /* [seq_len]: attention weights of one head */
} ref_model;

static void ref_free(ref_model* r) {
    free(r->kc), free(r->vc), free(r->x), free(r->xb), free(r->xb2), free(r->q);
    free(r->hb), free(r->hb2), free(r->logits), free(r->score);
    memset(r, 0, sizeof *r);
}

/* An empty sequence over the model's weights. Returns 0, or -1 (out of
   memory; nothing to free). */
static int ref_init(ref_model* r, const llama_model* m) {
    size_t kv;
    memset(r, 0, sizeof *r);
    r->m = m;
    r->dim = m->c.dim;
    r->hidden = m->c.hidden_dim;
    r->n_layers = m->c.n_layers;
    r->n_heads = m->c.n_heads;
    r->n_kv_heads = m->c.n_kv_heads;
    r->head_dim = m->c.dim / m->c.n_heads;
    r->kv_dim = r->n_kv_heads * r->head_dim;
    r->vocab = m->c.vocab_size;
    r->seq_len = m->c.seq_len;
    kv = (size_t)r->n_layers * (size_t)r->seq_len * (size_t)r->kv_dim;
    r->kc = (float*)calloc(kv, sizeof(float));
    r->vc = (float*)calloc(kv, sizeof(float));
    r->x = (float*)malloc(sizeof(float) * (size_t)r->dim);
    r->xb = (float*)malloc(sizeof(float) * (size_t)r->dim);
    r->xb2 = (float*)malloc(sizeof(float) * (size_t)r->dim);
    r->q = (float*)malloc(sizeof(float) * (size_t)r->dim);
    r->hb = (float*)malloc(sizeof(float) * (size_t)r->hidden);
    r->hb2 = (float*)malloc(sizeof(float) * (size_t)r->hidden);
    r->logits = (float*)malloc(sizeof(float) * (size_t)r->vocab);
    r->score = (double*)malloc(sizeof(double) * (size_t)r->seq_len);
    if (!r->kc || !r->vc || !r->x || !r->xb || !r->xb2 || !r->q || !r->hb || !r->hb2 || !r->logits || !r->score) {
        ref_free(r);
        return -1;
    }
    return 0;
}

/* dst becomes a copy of src's sequence (both from ref_init on one model):
   what a fork is to the paged cache. */
static void ref_copy(ref_model* dst, const ref_model* src) {
    int l;
    size_t layer = (size_t)src->seq_len * (size_t)src->kv_dim;
    size_t used = (size_t)src->len * (size_t)src->kv_dim;
    for (l = 0; l < src->n_layers; ++l) {
        memcpy(dst->kc + (size_t)l * layer, src->kc + (size_t)l * layer, sizeof(float) * used);
        memcpy(dst->vc + (size_t)l * layer, src->vc + (size_t)l * layer, sizeof(float) * used);
    }
    dst->len = src->len;
}

/* y[o] = sum_i w[o][i] x[i], w [n_out][n_in], accumulated in double (four
   partial sums, for speed). */
static void ref_matmul(float* y, const float* x, const float* w, int n_in, int n_out) {
    int o, i;
    for (o = 0; o < n_out; ++o) {
        const float* row = w + (size_t)o * (size_t)n_in;
        double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0;
        for (i = 0; i + 4 <= n_in; i += 4) {
            s0 += (double)row[i] * (double)x[i];
            s1 += (double)row[i + 1] * (double)x[i + 1];
            s2 += (double)row[i + 2] * (double)x[i + 2];
            s3 += (double)row[i + 3] * (double)x[i + 3];
        }
        for (; i < n_in; ++i) s0 += (double)row[i] * (double)x[i];
        y[o] = (float)((s0 + s1) + (s2 + s3));
    }
}

/* out = x / sqrt(mean(x^2) + 1e-5) * w. */
static void ref_rmsnorm(float* out, const float* x, const float* w, int n) {
    double ss = 0.0, inv;
    int i;
    for (i = 0; i < n; ++i) ss += (double)x[i] * (double)x[i];
    inv = 1.0 / sqrt(ss / (double)n + 1e-5);
    for (i = 0; i < n; ++i) out[i] = (float)((double)w[i] * ((double)x[i] * inv));
}

/* Rotary embedding of a vector of `width` (whole heads) at `pos`: pairs
   (i, i + 1) turn by pos / 10000^((i mod head_dim) / head_dim), with the
   angle's cosine and sine in float as llama2.c computes them. */
static void ref_rope(float* v, int width, int head_dim, int pos) {
    int i;
    for (i = 0; i < width; i += 2) {
        float freq = 1.0f / powf(10000.0f, (float)(i % head_dim) / (float)head_dim);
        float angle = (float)pos * freq;
        float c = cosf(angle), s = sinf(angle), a = v[i], b = v[i + 1];
        v[i] = a * c - b * s;
        v[i + 1] = a * s + b * c;
    }
}

/* Rounds each head vector of a new K or V row as storage of type `dt`
   keeps it (llmkv_quantize then llmkv_dequantize: what llmkv_put stores
   and attention reads). */
static void ref_round(float* row, int n_heads, int head_dim, llmkv_dtype dt) {
    unsigned char data[4 * 512], scales[256];
    int h;
    if (dt == LLMKV_DTYPE_DEFAULT || dt == LLMKV_DTYPE_F32) return;
    for (h = 0; h < n_heads; ++h) {
        float* v = row + (size_t)h * (size_t)head_dim;
        if (llmkv_quantize(dt, v, (uint32_t)head_dim, data, scales) != LLMKV_OK ||
            llmkv_dequantize(dt, data, scales, (uint32_t)head_dim, v) != LLMKV_OK) {
            v[0] = NAN; /* poisons the logits: a failing comparison says so */
        }
    }
}

/* Runs `token` at position `pos` (0 <= pos <= len: a smaller pos
   overwrites, like a truncate) and writes the next-token logits to
   `logits` (may be NULL; r->logits always gets them). The sequence then
   holds positions [0, pos]. Returns 0, or -1 for a bad token or position. */
static int ref_step(ref_model* r, int token, int pos, float* logits) {
    const llama_model* m = r->m;
    const int D = r->dim, KVD = r->kv_dim, HD = r->hidden, hd = r->head_dim;
    const int group = r->n_heads / r->n_kv_heads;
    const double scale = 1.0 / sqrt((double)hd);
    const size_t layer_kv = (size_t)r->seq_len * (size_t)KVD;
    int l, h, i, p;
    if (token < 0 || token >= r->vocab || pos < 0 || pos > r->len || pos >= r->seq_len) return -1;
    memcpy(r->x, m->embed + (size_t)token * (size_t)D, sizeof(float) * (size_t)D);
    for (l = 0; l < r->n_layers; ++l) {
        float* kl = r->kc + (size_t)l * layer_kv;
        float* vl = r->vc + (size_t)l * layer_kv;
        float* krow = kl + (size_t)pos * (size_t)KVD;
        float* vrow = vl + (size_t)pos * (size_t)KVD;
        ref_rmsnorm(r->xb, r->x, m->rms_att + (size_t)l * (size_t)D, D);
        ref_matmul(r->q, r->xb, m->wq + (size_t)l * (size_t)D * (size_t)D, D, D);
        ref_matmul(krow, r->xb, m->wk + (size_t)l * (size_t)KVD * (size_t)D, D, KVD);
        ref_matmul(vrow, r->xb, m->wv + (size_t)l * (size_t)KVD * (size_t)D, D, KVD);
        ref_rope(r->q, D, hd, pos);
        ref_rope(krow, KVD, hd, pos);
        ref_round(krow, r->n_kv_heads, hd, r->k_store);
        ref_round(vrow, r->n_kv_heads, hd, r->v_store);
        /* Causal attention over positions 0..pos, in double. */
        for (h = 0; h < r->n_heads; ++h) {
            const float* qh = r->q + (size_t)h * (size_t)hd;
            const size_t koff = (size_t)(h / group) * (size_t)hd;
            double mx = -HUGE_VAL, sum = 0.0;
            for (p = 0; p <= pos; ++p) {
                const float* kp = kl + (size_t)p * (size_t)KVD + koff;
                double s = 0.0;
                for (i = 0; i < hd; ++i) s += (double)qh[i] * (double)kp[i];
                r->score[p] = s * scale;
                if (r->score[p] > mx) mx = r->score[p];
            }
            for (p = 0; p <= pos; ++p) {
                r->score[p] = exp(r->score[p] - mx);
                sum += r->score[p];
            }
            for (i = 0; i < hd; ++i) {
                double acc = 0.0;
                for (p = 0; p <= pos; ++p) acc += r->score[p] * (double)vl[(size_t)p * (size_t)KVD + koff + (size_t)i];
                r->xb[(size_t)h * (size_t)hd + (size_t)i] = (float)(acc / sum);
            }
        }
        ref_matmul(r->xb2, r->xb, m->wo + (size_t)l * (size_t)D * (size_t)D, D, D);
        for (i = 0; i < D; ++i) r->x[i] += r->xb2[i];
        /* SwiGLU feed-forward. */
        ref_rmsnorm(r->xb, r->x, m->rms_ffn + (size_t)l * (size_t)D, D);
        ref_matmul(r->hb, r->xb, m->w1 + (size_t)l * (size_t)HD * (size_t)D, D, HD);
        ref_matmul(r->hb2, r->xb, m->w3 + (size_t)l * (size_t)HD * (size_t)D, D, HD);
        for (i = 0; i < HD; ++i) {
            double g = (double)r->hb[i];
            r->hb[i] = (float)(g / (1.0 + exp(-g)) * (double)r->hb2[i]);
        }
        ref_matmul(r->xb2, r->hb, m->w2 + (size_t)l * (size_t)D * (size_t)HD, HD, D);
        for (i = 0; i < D; ++i) r->x[i] += r->xb2[i];
    }
    ref_rmsnorm(r->xb, r->x, m->rms_final, D);
    ref_matmul(r->logits, r->xb, m->classifier, D, r->vocab);
    if (logits) memcpy(logits, r->logits, sizeof(float) * (size_t)r->vocab);
    r->len = pos + 1;
    return 0;
}

/* Appends tokens[0, n) one at a time; r->logits are the last one's. */
static int ref_feed(ref_model* r, const llmkv_token* tokens, uint32_t n) {
    uint32_t i;
    for (i = 0; i < n; ++i)
        if (ref_step(r, tokens[i], r->len, NULL) != 0) return -1;
    return 0;
}

/* Index of the largest logit, the lowest among equals. */
static int ref_argmax(const float* x, int n) {
    int i, best = 0;
    for (i = 1; i < n; ++i)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Largest logit minus the second largest: how near a tie the argmax was. */
static float ref_top2_gap(const float* x, int n) {
    int i, best = ref_argmax(x, n);
    float second = -HUGE_VALF;
    for (i = 0; i < n; ++i)
        if (i != best && x[i] > second) second = x[i];
    return x[best] - second;
}

/* lp[j] = log softmax(x)[j] in double from float logits, as
   llama_beam_search's doc says its scores are made (llama_logprob):
   x[j] - (max + log(sum exp(x - max))). */
static void ref_log_softmax(double* lp, const float* x, int n) {
    double mx = (double)x[0], sum = 0.0, ls;
    int i;
    for (i = 1; i < n; ++i)
        if ((double)x[i] > mx) mx = (double)x[i];
    for (i = 0; i < n; ++i) sum += exp((double)x[i] - mx);
    ls = mx + log(sum);
    for (i = 0; i < n; ++i) lp[i] = (double)x[i] - ls;
}

/* Continues the sequence with prompt[0, n_prompt) (n_prompt may be 0 when
   the sequence already ends where generation starts: then r->logits must
   hold its last logits) and n_gen greedy tokens into out, each but the
   last fed back. gaps (may be NULL) receives each choice's top-2 gap;
   logits (may be NULL) the [n_gen][vocab] logits each was chosen from. */
static int ref_greedy(ref_model* r, const llmkv_token* prompt, uint32_t n_prompt, uint32_t n_gen, llmkv_token* out,
                      float* gaps, float* logits) {
    uint32_t s;
    if (ref_feed(r, prompt, n_prompt) != 0) return -1;
    for (s = 0; s < n_gen; ++s) {
        if (s > 0 && ref_step(r, out[s - 1], r->len, NULL) != 0) return -1;
        out[s] = ref_argmax(r->logits, r->vocab);
        if (gaps) gaps[s] = ref_top2_gap(r->logits, r->vocab);
        if (logits) memcpy(logits + (size_t)s * (size_t)r->vocab, r->logits, sizeof(float) * (size_t)r->vocab);
    }
    return 0;
}

/* A natural token stream: BOS, then n - 1 tokens sampled from the
   reference at temperature 1 (probabilities in double, one llama_uniform
   draw per token from llama_rng(seed)). The reference's own top-1 and the
   NLL of the next token at each position i < n - 1 go to top1 / nll (may
   be NULL). Uses a fresh sequence of r. */
static int ref_sample_stream(ref_model* r, uint64_t seed, uint32_t n, llmkv_token* out, int32_t* top1, double* nll,
                             double* probs) {
    uint64_t rng = llama_rng(seed);
    uint32_t i;
    int j;
    r->len = 0;
    out[0] = 1;
    for (i = 0; i + 1 < n; ++i) {
        double u, c = 0.0;
        if (ref_step(r, out[i], (int)i, NULL) != 0) return -1;
        ref_log_softmax(probs, r->logits, r->vocab);
        if (top1) top1[i] = ref_argmax(r->logits, r->vocab);
        u = llama_uniform(&rng);
        out[i + 1] = r->vocab - 1;
        for (j = 0; j < r->vocab; ++j) {
            c += exp(probs[j]);
            if (u < c) {
                out[i + 1] = j;
                break;
            }
        }
        if (nll) nll[i] = -probs[out[i + 1]];
    }
    return 0;
}

/* Beam search by the rules llama_beam_search documents, over copies of
   reference sequences instead of forks. */
typedef struct ref_cand {
    double score;
    uint32_t beam;
    int32_t tok;
} ref_cand;

/* Higher score first; equal scores: lower beam, then lower token. */
static int ref_cand_cmp(const void* pa, const void* pb) {
    const ref_cand* a = (const ref_cand*)pa;
    const ref_cand* b = (const ref_cand*)pb;
    if (a->score > b->score) return -1;
    if (a->score < b->score) return 1;
    if (a->beam != b->beam) return a->beam < b->beam ? -1 : 1;
    return a->tok < b->tok ? -1 : a->tok > b->tok ? 1 : 0;
}

/* out: beam 0's n_steps tokens at the end, *score its score, *min_gap the
   smallest score difference between neighbours among the best K + 1
   candidates of any step (how near a tie the ranking came). 0 or -1. */
static int ref_beam_search(const llama_model* m, const llmkv_token* prompt, uint32_t n_prompt, uint32_t K,
                           uint32_t n_steps, llmkv_token* out, double* score, double* min_gap) {
    const int V = m->c.vocab_size;
    ref_model* cur = (ref_model*)calloc(K, sizeof(ref_model));
    ref_model* nxt = (ref_model*)calloc(K, sizeof(ref_model));
    ref_cand* cand = (ref_cand*)malloc(sizeof(ref_cand) * (size_t)V * K);
    llmkv_token* tok = (llmkv_token*)malloc(sizeof(llmkv_token) * K * n_steps);
    llmkv_token* ntok = (llmkv_token*)malloc(sizeof(llmkv_token) * K * n_steps);
    double* sc = (double*)malloc(sizeof(double) * K);
    double* lp = (double*)malloc(sizeof(double) * (size_t)V);
    uint32_t n_live = 1, s, b, j, n_cand, keep, n_init = 0;
    int j2, rc = -1;
    *min_gap = HUGE_VAL;
    if (!cur || !nxt || !cand || !tok || !ntok || !sc || !lp) goto done;
    for (n_init = 0; n_init < K; ++n_init)
        if (ref_init(&cur[n_init], m) != 0 || ref_init(&nxt[n_init], m) != 0) goto done;
    if (ref_feed(&cur[0], prompt, n_prompt) != 0) goto done;
    sc[0] = 0.0;
    for (s = 0; s < n_steps; ++s) {
        for (b = 0; b < n_live; ++b)
            if (s > 0 && ref_step(&cur[b], tok[b * n_steps + s - 1], cur[b].len, NULL) != 0) goto done;
        for (b = 0, n_cand = 0; b < n_live; ++b) {
            ref_log_softmax(lp, cur[b].logits, V);
            for (j2 = 0; j2 < V; ++j2, ++n_cand) {
                cand[n_cand].score = sc[b] + lp[j2];
                cand[n_cand].beam = b;
                cand[n_cand].tok = j2;
            }
        }
        qsort(cand, n_cand, sizeof(ref_cand), ref_cand_cmp);
        keep = n_cand < K ? n_cand : K;
        for (j = 0; j < keep && j + 1 < n_cand; ++j)
            if (cand[j].score - cand[j + 1].score < *min_gap) *min_gap = cand[j].score - cand[j + 1].score;
        for (j = 0; j < keep; ++j) {
            uint32_t p = cand[j].beam;
            ref_copy(&nxt[j], &cur[p]);
            memcpy(ntok + j * n_steps, tok + p * n_steps, sizeof(llmkv_token) * s);
            ntok[j * n_steps + s] = cand[j].tok;
            sc[j] = cand[j].score; /* sc[p] is read only through cand */
        }
        for (j = 0; j < keep; ++j) { /* swap the sequences: nxt becomes current */
            ref_model tmp = cur[j];
            cur[j] = nxt[j];
            nxt[j] = tmp;
        }
        memcpy(tok, ntok, sizeof(llmkv_token) * keep * n_steps);
        n_live = keep;
    }
    memcpy(out, tok, sizeof(llmkv_token) * n_steps);
    *score = sc[0];
    rc = 0;
done:
    for (b = 0; b < n_init && cur && nxt; ++b) ref_free(&cur[b]), ref_free(&nxt[b]);
    if (cur && nxt && n_init < K) ref_free(&cur[n_init]); /* a half-made pair */
    free(cur), free(nxt), free(cand), free(tok), free(ntok), free(sc), free(lp);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* Helpers                                                                  */
/* ------------------------------------------------------------------------ */

static const char* tl_model_path(void) {
    const char* p = getenv("LLMKV_MODEL");
    return p && p[0] ? p : "../shared/models/stories260K.bin";
}

/* 1: the model is loaded into *m. 0: its file cannot be opened (the test
   skips; `why` names the path). -1: it opened but is not a usable
   checkpoint (the test fails; `why` says why). */
static int tl_load(llama_model* m, char* why, size_t why_size) {
    const char* path = tl_model_path();
    char err[400];
    FILE* f = fopen(path, "rb");
    memset(m, 0, sizeof *m);
    if (!f) {
        snprintf(why, why_size, "model %s cannot be opened (set LLMKV_MODEL to stories260K.bin)", path);
        return 0;
    }
    fclose(f);
    if (llama_load(m, path, err, sizeof err) != 0) {
        snprintf(why, why_size, "llama_load: %s", err);
        return -1;
    }
    /* The tests run 512-token streams from BOS (1). */
    if (m->c.seq_len < 512 || m->c.vocab_size < 64) {
        snprintf(why, why_size, "%s: seq_len %d, vocab %d; the tests need at least 512 and 64", path, m->c.seq_len,
                 m->c.vocab_size);
        llama_free(m);
        return -1;
    }
    return 1;
}

/* Loads the model into `m` or ends the test (skip when the file is not
   there, failure when it is there and bad). */
#define TL_LOAD(t, m)                                                             \
    do {                                                                          \
        char tl_why_[600];                                                        \
        int tl_rc_ = tl_load(&(m), tl_why_, sizeof tl_why_);                      \
        if (tl_rc_ == 0) TST_SKIP(t, tl_why_);                                    \
        if (tl_rc_ < 0) fprintf(stderr, "  %s\n", tl_why_);                       \
        TST_REQUIRE(t, tl_rc_ > 0);                                               \
    } while (0)

static llama_opts tl_opts(llmkv_dtype kt, llmkv_dtype vt, uint32_t page_size, uint32_t n_threads,
                          uint32_t max_seqs) {
    llama_opts o;
    memset(&o, 0, sizeof o);
    o.k_dtype = kt;
    o.v_dtype = vt;
    o.page_size = page_size;
    o.n_threads = n_threads;
    o.max_seqs = max_seqs;
    return o;
}

/* The thread counts to test: {1, 2}, or {1} when the build has no threads
   (said once per test). *n receives how many. */
static void tl_thread_counts(tst* t, uint32_t* counts, uint32_t* n) {
    llmkv_threadpool* pool = NULL;
    llmkv_result r = llmkv_threadpool_create(2, NULL, &pool);
    llmkv_threadpool_destroy(pool);
    counts[0] = 1, counts[1] = 2;
    *n = 2;
    if (r == LLMKV_ERR_UNSUPPORTED) {
        fprintf(stderr, "  note: no thread pool in this build (LLMKV_NO_THREADS): 1 thread only\n");
        *n = 1;
    } else {
        TST_EQ(t, r, LLMKV_OK);
        if (r != LLMKV_OK) *n = 1;
    }
}

/* Checks that the cache holds no sequence, no page a sequence holds and
   passes its invariant checker: nothing leaked. */
static void tl_check_empty(tst* t, llmkv_cache* kv, const char* what) {
    llmkv_stats st;
    char msg[256];
    llmkv_result r;
    memset(&st, 0, sizeof st);
    r = llmkv_cache_stats(kv, &st);
    TST_EQ(t, r, LLMKV_OK);
    if (st.n_seqs != 0 || st.n_pages_used != 0 || st.n_tokens != 0) {
        fprintf(stderr, "  FAIL %s: leaked: %u sequences, %u pages, %llu tokens live\n", what, st.n_seqs,
                st.n_pages_used, (unsigned long long)st.n_tokens);
        t->cur_failures++;
    }
    msg[0] = 0;
    r = llmkv_cache_check(kv, msg, sizeof msg);
    if (r != LLMKV_OK) {
        fprintf(stderr, "  FAIL %s: llmkv_cache_check: %s\n", what, msg);
        t->cur_failures++;
    }
}

/* 1 when got[0, n) == want[0, n). Otherwise a failure naming the first
   difference and, with gaps (the reference's top-2 logit gap of each
   step), how near a tie that step was. */
static int tl_same_tokens(tst* t, const char* what, const llmkv_token* got, const llmkv_token* want, uint32_t n,
                          const float* gaps) {
    uint32_t i;
    for (i = 0; i < n; ++i) {
        if (got[i] == want[i]) continue;
        if (gaps)
            fprintf(stderr, "  FAIL %s: token %u is %d, the reference's %d (reference top-2 logit gap there %.3g)\n",
                    what, i, (int)got[i], (int)want[i], (double)gaps[i]);
        else
            fprintf(stderr, "  FAIL %s: token %u is %d, expected %d\n", what, i, (int)got[i], (int)want[i]);
        t->cur_failures++;
        return 0;
    }
    return 1;
}

static double tl_max_abs_diff(const float* a, const float* b, size_t n) {
    double mx = 0.0;
    size_t i;
    for (i = 0; i < n; ++i) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (!(d <= mx)) mx = d; /* NaN wins */
    }
    return mx;
}

/* LLMKV_TEST_SCALE (default 1; CI uses 0.1 to 0.2 under valgrind, qemu
   and ThreadSanitizer) shrinks the runs: base * scale, at least `least`,
   never more than base. */
static uint32_t tl_scaled(uint32_t base, uint32_t least) {
    const char* e = getenv("LLMKV_TEST_SCALE");
    double v = e ? atof(e) : 1.0, n;
    uint32_t k;
    if (!(v > 0.0) || v > 1.0) v = 1.0;
    n = (double)base * v + 0.5;
    k = (uint32_t)n;
    return k < least ? least : k > base ? base : k;
}

/* A failed check's name when an allocation failed: always 0. */
enum { tl_allocated = 0 };

/* Fixed token ids for prompts that are not the model's own text. */
static const llmkv_token tl_ids[24] = {
    300, 17, 411, 92, 256, 5, 499, 128, 63, 350, 211, 44, 480, 9, 377, 150, 29, 268, 402, 77, 333, 190, 11, 458,
};

/* ------------------------------------------------------------------------ */
/* Tests                                                                    */
/* ------------------------------------------------------------------------ */

/* Greedy decoding through the paged cache is the reference's, token for
   token: 256 tokens from BOS with llama_generate, for page sizes 1 (a page
   per token), 16 and 64 (pages far larger than the early sequence) and 1
   and 2 attention threads. And llama_forward's logits, step by step over
   the same 256 positions (fed the reference's tokens), are the
   reference's within 1e-3: the cache returns the K/V that were put, at
   the right positions, and attention over them is right. */
static void test_llama_greedy_matches_reference(tst* t) {
    const uint32_t N = tl_scaled(256, 96); /* past the first 64-token page */
    static const uint32_t pages[3] = {1, 16, 64};
    const llmkv_token bos = 1;
    llama_model m;
    ref_model ref;
    llmkv_token *want, *got;
    float *gaps, *rlog, *lg;
    uint32_t threads[2], n_threads, pi, ti, s, one = 1;
    int V;
    TL_LOAD(t, m);
    V = m.c.vocab_size;
    want = (llmkv_token*)malloc(sizeof(llmkv_token) * N);
    got = (llmkv_token*)malloc(sizeof(llmkv_token) * N);
    gaps = (float*)malloc(sizeof(float) * N);
    rlog = (float*)malloc(sizeof(float) * (size_t)V * N);
    lg = (float*)malloc(sizeof(float) * (size_t)V);
    if (!want || !got || !gaps || !rlog || !lg || ref_init(&ref, &m) != 0) {
        free(want), free(got), free(gaps), free(rlog), free(lg), llama_free(&m);
        TST_REQUIRE(t, tl_allocated);
    }
    TST_CHECK(t, ref_greedy(&ref, &bos, 1, N, want, gaps, rlog) == 0);
    tl_thread_counts(t, threads, &n_threads);
    for (pi = 0; pi < 3; ++pi) {
        for (ti = 0; ti < n_threads; ++ti) {
            llama_opts o = tl_opts(LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, pages[pi], threads[ti], 1);
            llama_engine e;
            llmkv_seq seq;
            char what[80];
            double worst = 0.0;
            llmkv_result r = llama_engine_create(&e, &m, &o);
            TST_EQ(t, r, LLMKV_OK);
            if (r != LLMKV_OK) continue;
            snprintf(what, sizeof what, "greedy, page_size %u, %u thread(s)", pages[pi], threads[ti]);
            TST_EQ(t, llmkv_seq_create(e.kv, &seq), LLMKV_OK);
            memset(got, 0xff, sizeof(llmkv_token) * N);
            TST_EQ(t, llama_generate(&e, seq, &bos, 1, N, 0.0f, NULL, got), LLMKV_OK);
            tl_same_tokens(t, what, got, want, N, gaps);
            TST_EQ(t, llmkv_seq_free(e.kv, seq), LLMKV_OK);
            /* Logits, one llama_forward per step, fed the reference's ids. */
            TST_EQ(t, llmkv_seq_create(e.kv, &seq), LLMKV_OK);
            for (s = 0; s < N; ++s) {
                double d;
                r = llama_forward(&e, &seq, &one, 1, s == 0 ? &bos : &want[s - 1], lg, 0);
                if (r != LLMKV_OK) break;
                d = tl_max_abs_diff(lg, rlog + (size_t)s * (size_t)V, (size_t)V);
                if (!(d <= worst)) worst = d;
            }
            TST_EQ(t, r, LLMKV_OK);
            if (!(worst < 1e-3)) {
                fprintf(stderr, "  FAIL %s: logits differ from the reference by up to %g\n", what, worst);
                t->cur_failures++;
            } else if (t->verbose) {
                fprintf(stderr, "  %s: max |logit - reference| %.2g\n", what, worst);
            }
            TST_EQ(t, llmkv_seq_free(e.kv, seq), LLMKV_OK);
            tl_check_empty(t, e.kv, what);
            llama_engine_destroy(&e);
        }
    }
    ref_free(&ref);
    free(want), free(got), free(gaps), free(rlog), free(lg);
    llama_free(&m);
}

/* A prompt prefilled in one llama_forward call (every row's logits
   returned) gives the same logits as the reference fed one token at a
   time, and the same 64 greedy tokens after it; so does llama_generate
   with the prompt as its feed. Two prompts of BOS + 20 tokens: model text
   (sampled from the reference) and fixed arbitrary ids; page sizes 1, 16
   (the prompt spans two pages) and 64. */
static void test_llama_prompt_prefill_matches_reference(tst* t) {
    enum { NP = 21, NG_MAX = 64 };
    const uint32_t NG = tl_scaled(NG_MAX, 16);
    static const uint32_t pages[3] = {1, 16, 64};
    llama_model m;
    ref_model ref;
    llmkv_token prompt[2][NP], want[NG_MAX], got[NG_MAX];
    float gaps[NG_MAX];
    float *rrows, *lg;
    double* probs;
    uint32_t pi, k, i, n = NP;
    int V;
    TL_LOAD(t, m);
    V = m.c.vocab_size;
    rrows = (float*)malloc(sizeof(float) * (size_t)V * NP);
    lg = (float*)malloc(sizeof(float) * (size_t)V * NP);
    probs = (double*)malloc(sizeof(double) * (size_t)V);
    if (!rrows || !lg || !probs || ref_init(&ref, &m) != 0) {
        free(rrows), free(lg), free(probs), llama_free(&m);
        TST_REQUIRE(t, tl_allocated);
    }
    TST_CHECK(t, ref_sample_stream(&ref, 7, NP, prompt[0], NULL, NULL, probs) == 0);
    prompt[1][0] = 1;
    for (i = 1; i < NP; ++i) prompt[1][i] = tl_ids[i] % V;
    for (k = 0; k < 2; ++k) {
        /* The reference: the prompt token by token, each row's logits. */
        ref.len = 0;
        for (i = 0; i < NP; ++i) TST_CHECK(t, ref_step(&ref, prompt[k][i], (int)i, rrows + (size_t)i * V) == 0);
        TST_CHECK(t, ref_greedy(&ref, NULL, 0, NG, want, gaps, NULL) == 0);
        for (pi = 0; pi < 3; ++pi) {
            llama_opts o = tl_opts(LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, pages[pi], 1, 1);
            llama_engine e;
            llmkv_seq seq;
            char what[96];
            double d;
            llmkv_result r = llama_engine_create(&e, &m, &o);
            TST_EQ(t, r, LLMKV_OK);
            if (r != LLMKV_OK) continue;
            snprintf(what, sizeof what, "prompt %u (%s), page_size %u", k, k ? "fixed ids" : "model text", pages[pi]);
            TST_EQ(t, llmkv_seq_create(e.kv, &seq), LLMKV_OK);
            r = llama_forward(&e, &seq, &n, 1, prompt[k], lg, 1);
            TST_EQ(t, r, LLMKV_OK);
            if (r == LLMKV_OK) {
                d = tl_max_abs_diff(lg, rrows, (size_t)V * NP);
                if (!(d < 1e-3)) {
                    fprintf(stderr, "  FAIL %s: prefill logits differ from the reference by up to %g\n", what, d);
                    t->cur_failures++;
                }
                got[0] = llama_argmax(lg + (size_t)(NP - 1) * V, V);
                TST_EQ(t, llama_generate(&e, seq, &got[0], 1, NG - 1, 0.0f, NULL, got + 1), LLMKV_OK);
                tl_same_tokens(t, what, got, want, NG, gaps);
            }
            TST_EQ(t, llmkv_seq_free(e.kv, seq), LLMKV_OK);
            /* The same through llama_generate's own prefill. */
            TST_EQ(t, llmkv_seq_create(e.kv, &seq), LLMKV_OK);
            memset(got, 0xff, sizeof got);
            TST_EQ(t, llama_generate(&e, seq, prompt[k], NP, NG, 0.0f, NULL, got), LLMKV_OK);
            tl_same_tokens(t, what, got, want, NG, gaps);
            TST_EQ(t, llmkv_seq_free(e.kv, seq), LLMKV_OK);
            tl_check_empty(t, e.kv, what);
            llama_engine_destroy(&e);
        }
    }
    ref_free(&ref);
    free(rrows), free(lg), free(probs);
    llama_free(&m);
}

/* Beam search on forks (shared pages, copy-on-write of a shared partial
   page, beams freed when no one keeps them) finds the same best beam, with
   the same score within 1e-3, as the same search over copied contiguous
   reference K/V: K = 4 and 2, 24 steps after a 6-token prompt, page sizes
   16 and 1. K = 1 is greedy decoding. A model with exact ties (odd tokens
   twins of even ones) checks the tie rules themselves. Afterwards no
   sequence and no page is left held and the cache checks clean. */
static void test_llama_beams_match_reference(tst* t) {
    enum { NP = 6, NS_MAX = 24, N_CASES = 4 };
    const uint32_t NS = tl_scaled(NS_MAX, 12);
    static const uint32_t beams[N_CASES] = {4, 4, 2, 1};
    static const uint32_t pages[N_CASES] = {16, 1, 16, 16};
    llama_model m;
    ref_model ref;
    llmkv_token prompt[NP], want[NS_MAX], got[NS_MAX], greedy[NS_MAX];
    double* probs;
    uint32_t c;
    TL_LOAD(t, m);
    probs = (double*)malloc(sizeof(double) * (size_t)m.c.vocab_size);
    if (!probs || ref_init(&ref, &m) != 0) {
        free(probs), llama_free(&m);
        TST_REQUIRE(t, tl_allocated);
    }
    TST_CHECK(t, ref_sample_stream(&ref, 11, NP, prompt, NULL, NULL, probs) == 0);
    ref.len = 0;
    TST_CHECK(t, ref_greedy(&ref, prompt, NP, NS, greedy, NULL, NULL) == 0);
    for (c = 0; c < N_CASES; ++c) {
        llama_opts o = tl_opts(LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, pages[c], 1, beams[c]);
        llama_engine e;
        char what[64];
        double want_score = 0.0, got_score = 0.0, min_gap = 0.0;
        llmkv_result r;
        snprintf(what, sizeof what, "beam search K=%u, page_size %u", beams[c], pages[c]);
        TST_CHECK(t, ref_beam_search(&m, prompt, NP, beams[c], NS, want, &want_score, &min_gap) == 0);
        if (beams[c] == 1) tl_same_tokens(t, "reference beam search K=1 vs greedy", want, greedy, NS, NULL);
        r = llama_engine_create(&e, &m, &o);
        TST_EQ(t, r, LLMKV_OK);
        if (r != LLMKV_OK) continue;
        memset(got, 0xff, sizeof got);
        TST_EQ(t, llama_beam_search(&e, prompt, NP, beams[c], NS, got, &got_score), LLMKV_OK);
        if (!tl_same_tokens(t, what, got, want, NS, NULL))
            fprintf(stderr, "  (the reference's closest ranking gap in any step: %.3g)\n", min_gap);
        if (!(fabs(got_score - want_score) < 1e-3)) {
            fprintf(stderr, "  FAIL %s: score %.6f, the reference's %.6f\n", what, got_score, want_score);
            t->cur_failures++;
        }
        tl_check_empty(t, e.kv, what);
        llama_engine_destroy(&e);
    }
    /* Exact ties: a copy of the model whose odd tokens embed (and so score)
       exactly as the even token below them. Every continuation then ties
       with its twin forever, so the tie rules alone decide: lower beam,
       then lower token, i.e. the best beam holds even tokens only. */
    {
        llama_model twin = m;
        /* Every weight the forward pass reads ends with rms_final, or with
           a separate classifier. */
        size_t n_floats = m.shared_classifier
                              ? (size_t)(m.rms_final - m.data) + (size_t)m.c.dim
                              : (size_t)(m.classifier - m.data) + (size_t)m.c.vocab_size * (size_t)m.c.dim;
        int v;
        twin.data = (float*)malloc(sizeof(float) * n_floats);
        if (twin.data) {
            llama_opts o = tl_opts(LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, 16, 1, 4);
            llama_engine e;
            double want_score = 0.0, got_score = 0.0, min_gap = 0.0;
            memcpy(twin.data, m.data, sizeof(float) * n_floats);
            twin.embed = twin.data + (m.embed - m.data);
            twin.rms_att = twin.data + (m.rms_att - m.data);
            twin.wq = twin.data + (m.wq - m.data);
            twin.wk = twin.data + (m.wk - m.data);
            twin.wv = twin.data + (m.wv - m.data);
            twin.wo = twin.data + (m.wo - m.data);
            twin.rms_ffn = twin.data + (m.rms_ffn - m.data);
            twin.w1 = twin.data + (m.w1 - m.data);
            twin.w2 = twin.data + (m.w2 - m.data);
            twin.w3 = twin.data + (m.w3 - m.data);
            twin.rms_final = twin.data + (m.rms_final - m.data);
            twin.classifier = twin.data + (m.classifier - m.data);
            for (v = 0; v + 1 < m.c.vocab_size; v += 2) {
                float* emb = twin.data + (m.embed - m.data);
                float* cls = twin.data + (m.classifier - m.data);
                memcpy(emb + (size_t)(v + 1) * m.c.dim, emb + (size_t)v * m.c.dim, sizeof(float) * (size_t)m.c.dim);
                memcpy(cls + (size_t)(v + 1) * m.c.dim, cls + (size_t)v * m.c.dim, sizeof(float) * (size_t)m.c.dim);
            }
            TST_CHECK(t, ref_beam_search(&twin, prompt, NP, 4, NS, want, &want_score, &min_gap) == 0);
            TST_CHECK(t, min_gap == 0.0); /* the ties are real */
            for (c = 0; c < NS; ++c) TST_EQ(t, want[c] % 2, 0);
            if (llama_engine_create(&e, &twin, &o) == LLMKV_OK) {
                memset(got, 0xff, sizeof got);
                TST_EQ(t, llama_beam_search(&e, prompt, NP, 4, NS, got, &got_score), LLMKV_OK);
                tl_same_tokens(t, "beam search K=4 with exact ties", got, want, NS, NULL);
                TST_CHECK(t, fabs(got_score - want_score) < 1e-3);
                tl_check_empty(t, e.kv, "beam search with exact ties");
                llama_engine_destroy(&e);
            } else {
                TST_CHECK(t, tl_allocated);
            }
            free(twin.data);
        } else {
            TST_CHECK(t, tl_allocated);
        }
    }
    ref_free(&ref);
    free(probs);
    llama_free(&m);
}

/* Speculative decoding at temperature 0 (draft proposals verified in one
   target step, both caches rolled back with llmkv_truncate) emits exactly
   the target's greedy tokens: 200 tokens from BOS, n_draft 4, with a Q4
   draft cache of the same model and with a 2-layer draft, equal to
   llama_generate and to the reference. Every round emits its accepted
   drafts plus one token, so accepted + rounds + 1 = 200 and accepted <=
   drafted. At temperature 0.8 (fixed seed) the same bookkeeping holds and
   every token is a valid id. Both caches end with nothing live. */
static void test_llama_speculative_equals_greedy(tst* t) {
    enum { N_MAX = 200 };
    const uint32_t N = tl_scaled(N_MAX, 48);
    const llmkv_token bos = 1;
    llama_model m;
    ref_model ref;
    llama_engine target, gen;
    llmkv_token want[N_MAX], greedy[N_MAX], got[N_MAX];
    float gaps[N_MAX];
    llama_opts o;
    llmkv_result r;
    uint32_t d, i;
    int V;
    TL_LOAD(t, m);
    V = m.c.vocab_size;
    if (ref_init(&ref, &m) != 0) {
        llama_free(&m);
        TST_REQUIRE(t, tl_allocated);
    }
    TST_CHECK(t, ref_greedy(&ref, &bos, 1, N, want, gaps, NULL) == 0);
    ref_free(&ref);
    o = tl_opts(LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, 16, 1, 1);
    r = llama_engine_create(&target, &m, &o);
    if (r != LLMKV_OK) llama_free(&m);
    TST_REQUIRE(t, r == LLMKV_OK);
    /* Plain greedy through the target's configuration. */
    r = llama_engine_create(&gen, &m, &o);
    TST_EQ(t, r, LLMKV_OK);
    if (r == LLMKV_OK) {
        llmkv_seq seq;
        TST_EQ(t, llmkv_seq_create(gen.kv, &seq), LLMKV_OK);
        TST_EQ(t, llama_generate(&gen, seq, &bos, 1, N, 0.0f, NULL, greedy), LLMKV_OK);
        tl_same_tokens(t, "llama_generate vs reference", greedy, want, N, gaps);
        TST_EQ(t, llmkv_seq_free(gen.kv, seq), LLMKV_OK);
        llama_engine_destroy(&gen);
    }
    for (d = 0; d < 2; ++d) {
        llama_engine draft;
        llama_spec_stats st;
        llama_opts od = d == 0 ? tl_opts(LLMKV_DTYPE_Q4, LLMKV_DTYPE_Q4, 16, 1, 1)
                               : tl_opts(LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, 16, 1, 1);
        const char* what = d == 0 ? "speculative, Q4 draft" : "speculative, 2-layer draft";
        uint64_t rng = llama_rng(42);
        if (d == 1) od.n_layers = 2;
        r = llama_engine_create(&draft, &m, &od);
        TST_EQ(t, r, LLMKV_OK);
        if (r != LLMKV_OK) continue;
        /* Greedy. */
        memset(got, 0xff, sizeof got);
        memset(&st, 0, sizeof st);
        TST_EQ(t, llama_speculative(&target, &draft, &bos, 1, N, 4, 0.0f, &rng, got, &st), LLMKV_OK);
        tl_same_tokens(t, what, got, want, N, gaps);
        TST_CHECK(t, st.accepted <= st.drafted);
        TST_CHECK(t, st.drafted <= 4ull * st.rounds);
        TST_EQ(t, st.accepted + st.rounds + 1, N);
        if (d == 0) TST_CHECK(t, st.accepted > 0); /* a Q4 copy of the target agrees with it mostly */
        if (t->verbose)
            fprintf(stderr, "  %s, temp 0: %u rounds, %llu of %llu drafts accepted\n", what, st.rounds,
                    (unsigned long long)st.accepted, (unsigned long long)st.drafted);
        tl_check_empty(t, target.kv, what);
        tl_check_empty(t, draft.kv, what);
        /* Sampled. */
        memset(got, 0xff, sizeof got);
        memset(&st, 0, sizeof st);
        TST_EQ(t, llama_speculative(&target, &draft, &bos, 1, N, 4, 0.8f, &rng, got, &st), LLMKV_OK);
        for (i = 0; i < N; ++i)
            if (got[i] < 0 || got[i] >= V) break;
        TST_EQ(t, i, N);
        TST_CHECK(t, st.accepted <= st.drafted);
        TST_CHECK(t, st.drafted <= 4ull * st.rounds);
        TST_EQ(t, st.accepted + st.rounds + 1, N);
        tl_check_empty(t, target.kv, what);
        tl_check_empty(t, draft.kv, what);
        llama_engine_destroy(&draft);
    }
    llama_engine_destroy(&target);
    llama_free(&m);
}

/* Saving and restoring a cache midway through generation loses nothing: 100
   greedy tokens, the whole cache saved (llmkv_cache_save_mem), the engine
   destroyed, the file loaded into a new cache that a fresh engine adopts;
   the saved sequence handle is valid there with its 100 positions, and
   156 more tokens make the 256 of an uninterrupted run (and of the
   reference). The same through llmkv_seq_export / llmkv_seq_import into a
   fresh engine (a new handle), with the same page size and with another
   (64: the import converts page layouts). */
static void test_llama_save_restore_midway(tst* t) {
    enum { N_MAX = 256 };
    const uint32_t N = tl_scaled(N_MAX, 64), HALF = N * 100 / 256;
    const llmkv_token bos = 1;
    llama_model m;
    ref_model ref;
    llmkv_token want[N_MAX], got[N_MAX];
    float gaps[N_MAX];
    llama_opts o = tl_opts(LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, 16, 1, 1);
    uint32_t way;
    TL_LOAD(t, m);
    if (ref_init(&ref, &m) != 0) {
        llama_free(&m);
        TST_REQUIRE(t, tl_allocated);
    }
    TST_CHECK(t, ref_greedy(&ref, &bos, 1, N, want, gaps, NULL) == 0);
    ref_free(&ref);
    for (way = 0; way < 3; ++way) {
        const char* what = way == 0   ? "save/load whole cache"
                           : way == 1 ? "export/import"
                                      : "export/import, page_size 64";
        llama_engine e, e2;
        llmkv_seq seq, seq2;
        uint64_t bytes = 0;
        size_t written = 0;
        void* buf = NULL;
        uint32_t len = 0;
        llmkv_result r = llama_engine_create(&e, &m, &o);
        TST_EQ(t, r, LLMKV_OK);
        if (r != LLMKV_OK) continue;
        memset(got, 0xff, sizeof got);
        TST_EQ(t, llmkv_seq_create(e.kv, &seq), LLMKV_OK);
        TST_EQ(t, llama_generate(&e, seq, &bos, 1, HALF, 0.0f, NULL, got), LLMKV_OK);
        r = way == 0 ? llmkv_cache_save_size(e.kv, 0, &bytes) : llmkv_seq_export_size(e.kv, seq, &bytes);
        TST_EQ(t, r, LLMKV_OK);
        if (r == LLMKV_OK) buf = malloc((size_t)bytes);
        if (buf) {
            r = way == 0 ? llmkv_cache_save_mem(e.kv, 0, buf, (size_t)bytes, &written)
                         : llmkv_seq_export(e.kv, seq, buf, (size_t)bytes, &written);
            TST_EQ(t, r, LLMKV_OK);
            TST_EQ(t, written, bytes);
        } else {
            TST_CHECK(t, tl_allocated);
        }
        llama_engine_destroy(&e); /* only the bytes in buf are left */
        if (way == 2) o.page_size = 64;
        r = llama_engine_create(&e2, &m, &o);
        o.page_size = 16;
        TST_EQ(t, r, LLMKV_OK);
        if (r != LLMKV_OK || !buf) {
            if (r == LLMKV_OK) llama_engine_destroy(&e2);
            free(buf);
            continue;
        }
        if (way == 0) {
            llmkv_cache* kv = NULL;
            const void* bufs[1];
            size_t sizes[1];
            bufs[0] = buf;
            sizes[0] = written;
            r = llmkv_cache_load_mem(bufs, sizes, 1, NULL, &kv);
            TST_EQ(t, r, LLMKV_OK);
            if (r == LLMKV_OK) {
                r = llama_engine_adopt(&e2, kv);
                TST_EQ(t, r, LLMKV_OK);
                if (r != LLMKV_OK) llmkv_cache_destroy(kv);
            }
            seq2 = seq; /* the saved handle */
        } else {
            seq2.id = 0;
            r = llmkv_seq_import(e2.kv, buf, written, &seq2, NULL);
            TST_EQ(t, r, LLMKV_OK);
        }
        free(buf);
        if (r == LLMKV_OK) {
            char msg[256];
            msg[0] = 0;
            TST_EQ(t, llmkv_seq_length(e2.kv, seq2, &len), LLMKV_OK);
            TST_EQ(t, len, HALF);
            r = llmkv_cache_check(e2.kv, msg, sizeof msg);
            if (r != LLMKV_OK) fprintf(stderr, "  %s: llmkv_cache_check: %s\n", what, msg);
            TST_EQ(t, r, LLMKV_OK);
            TST_EQ(t, llama_generate(&e2, seq2, &got[HALF - 1], 1, N - HALF, 0.0f, NULL, got + HALF), LLMKV_OK);
            tl_same_tokens(t, what, got, want, N, gaps);
            TST_EQ(t, llmkv_seq_free(e2.kv, seq2), LLMKV_OK);
            tl_check_empty(t, e2.kv, what);
        }
        llama_engine_destroy(&e2);
    }
    llama_free(&m);
}

/* Batched serving with a prefix index produces, for every request, what
   the reference produces for that prompt alone: 6 prompts sharing a
   41-token prefix (BOS + 40 tokens of the model's greedy text) with tails
   of 1 to 10 fixed ids, arriving one per step while earlier ones decode
   (ragged batches), 32 greedy tokens each. Later requests find the prefix
   in the cache (prompt_tokens_cached > 0). Page sizes 1, 4 and 16. At
   temperature 0.8 each request equals llama_generate alone with the same
   seed. Nothing is left live afterwards. */
static void test_llama_serve_matches_alone(tst* t) {
    enum { NR = 6, PRE = 41, NS_MAX = 32, MAXP = PRE + 10 };
    const uint32_t NS = tl_scaled(NS_MAX, 8);
    static const uint32_t tails[NR] = {3, 1, 10, 5, 7, 2};
    static const uint32_t pages[3] = {1, 4, 16};
    const llmkv_token bos = 1;
    llama_model m;
    ref_model base, ref;
    llmkv_token prompts[NR][MAXP], want[NR][NS_MAX], got[NR * NS_MAX], alone[NS_MAX];
    const llmkv_token* pp[NR];
    uint32_t np[NR], i, j, pi;
    uint64_t total = 0;
    TL_LOAD(t, m);
    if (ref_init(&base, &m) != 0) {
        llama_free(&m);
        TST_REQUIRE(t, tl_allocated);
    }
    if (ref_init(&ref, &m) != 0) {
        ref_free(&base);
        llama_free(&m);
        TST_REQUIRE(t, tl_allocated);
    }
    /* The shared prefix: BOS and the model's first 40 greedy tokens. */
    prompts[0][0] = bos;
    TST_CHECK(t, ref_greedy(&base, &bos, 1, PRE - 1, &prompts[0][1], NULL, NULL) == 0);
    TST_CHECK(t, ref_feed(&base, &prompts[0][PRE - 1], 1) == 0); /* base holds the whole prefix */
    for (i = 0; i < NR; ++i) {
        memcpy(prompts[i], prompts[0], sizeof(llmkv_token) * PRE);
        for (j = 0; j < tails[i]; ++j) prompts[i][PRE + j] = tl_ids[(i * 5 + j) % 24] % m.c.vocab_size;
        np[i] = PRE + tails[i];
        pp[i] = prompts[i];
        total += np[i];
        /* The reference alone on prompt i: the prefix copied, then the tail. */
        ref_copy(&ref, &base);
        TST_CHECK(t, ref_greedy(&ref, prompts[i] + PRE, tails[i], NS, want[i], NULL, NULL) == 0);
    }
    for (pi = 0; pi < 3; ++pi) {
        llama_opts o = tl_opts(LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, pages[pi], 1, NR);
        llama_engine e;
        llama_serve_stats st;
        char what[80];
        llmkv_result r;
        o.prefix_index = 1;
        r = llama_engine_create(&e, &m, &o);
        TST_EQ(t, r, LLMKV_OK);
        if (r != LLMKV_OK) continue;
        memset(got, 0xff, sizeof got);
        memset(&st, 0, sizeof st);
        TST_EQ(t, llama_serve(&e, pp, np, NR, NS, 0.0f, 1, got, &st), LLMKV_OK);
        for (i = 0; i < NR; ++i) {
            snprintf(what, sizeof what, "serve, page_size %u, request %u", pages[pi], i);
            tl_same_tokens(t, what, got + i * NS, want[i], NS, NULL);
        }
        TST_EQ(t, st.prompt_tokens, total);
        TST_CHECK(t, st.prompt_tokens_cached > 0);
        TST_CHECK(t, st.max_batch > 1); /* requests really shared steps */
        if (t->verbose)
            fprintf(stderr, "  serve page_size %u: %llu of %llu prompt tokens cached, %u steps, batch <= %u\n",
                    pages[pi], (unsigned long long)st.prompt_tokens_cached, (unsigned long long)st.prompt_tokens,
                    st.steps, st.max_batch);
        snprintf(what, sizeof what, "serve, page_size %u", pages[pi]);
        tl_check_empty(t, e.kv, what);
        /* Sampled: each request as llama_generate alone with the seed. */
        if (pi == 2) {
            llama_engine solo;
            llama_opts os = tl_opts(LLMKV_DTYPE_F32, LLMKV_DTYPE_F32, pages[pi], 1, 1);
            memset(got, 0xff, sizeof got);
            TST_EQ(t, llama_serve(&e, pp, np, NR, NS, 0.8f, 99, got, &st), LLMKV_OK);
            TST_CHECK(t, st.prompt_tokens_cached > 0);
            tl_check_empty(t, e.kv, "serve, temperature 0.8");
            r = llama_engine_create(&solo, &m, &os);
            TST_EQ(t, r, LLMKV_OK);
            if (r == LLMKV_OK) {
                for (i = 0; i < NR; ++i) {
                    llmkv_seq seq;
                    uint64_t rng = llama_rng(99);
                    TST_EQ(t, llmkv_seq_create(solo.kv, &seq), LLMKV_OK);
                    TST_EQ(t, llama_generate(&solo, seq, pp[i], np[i], NS, 0.8f, &rng, alone), LLMKV_OK);
                    TST_EQ(t, llmkv_seq_free(solo.kv, seq), LLMKV_OK);
                    snprintf(what, sizeof what, "serve at temperature 0.8, request %u", i);
                    tl_same_tokens(t, what, got + i * NS, alone, NS, NULL);
                }
                llama_engine_destroy(&solo);
            }
        }
        llama_engine_destroy(&e);
    }
    ref_free(&base);
    ref_free(&ref);
    llama_free(&m);
}

/* What each storage type costs on real activations, and proof that the
   cost is the storage's rounding and nothing else.

   Four streams of 512 tokens (BOS + 511 sampled from the reference at
   temperature 1, fixed seeds) are teacher-forced (64-token chunks,
   page_size 32) through caches storing K/V as F32, F16, BF16, Q8, FP8, Q4,
   and Q4C keys with Q4 values.
   - F32 storage picks the reference's top-1 at every position and matches
     its mean NLL within 1e-4.
   - Every per-vector type (all but Q4C) is also run on the first two
     streams by the reference with each new K/V head vector rounded through
     llmkv_quantize / llmkv_dequantize (what the type stores): the cache
     must agree with that reference on all but 1% + 3 of the top-1s
     (measured 99.6% to 100% on every x86 path; BF16 on the AVX512_BF16
     path, whose dot products round the query and softmax weights to BF16
     too, 99.0%: 3% + 3 there) and match its mean NLL within 1e-3 + 0.5 /
     positions (measured 1.1e-4 at most at full size). The match cannot be
     exact: the reference's activations differ from the cache's by float
     rounding (~1e-6), and now and then that moves a value across a
     rounding boundary of its F16 scale or minimum or of its code, so the
     two store a different value there and the difference propagates (a
     logit may move by 0.1 at a few positions). A storage or read bug
     (wrong scale, wrong slot, a page read as another type) would move
     every position, however lossy the type.
   - Against F32 storage: top-1 agreement and mean NLL increase within
     bounds measured on this model with margin (measured: F16 99.7%, BF16
     98.2%, Q8 96.4%, FP8 81.3%, Q4 62.8%, Q4C keys 62.0%; dNLL -0.0002,
     -0.0005, +0.005, +0.084, +0.42, +0.44). The 512-token streams are
     sampled text, where many positions are near ties (174 of 2044 have a
     top-2 logit gap under 0.05) and head vectors are only 8 elements, so
     even Q8 moves some top-1s: the simulated reference loses the same.
   The table goes to stderr on every run. LLMKV_TEST_SCALE < 1 runs fewer
   and shorter streams (at least one of 128 tokens) and checks all but the
   bounds against F32 storage. */
static void test_llama_quality(tst* t) {
    enum { NT = 7 };
    /* Smaller under LLMKV_TEST_SCALE < 1; the bounds against F32 storage
       were measured at full size and are checked only there. */
    const uint32_t NSTREAM = tl_scaled(4, 1), NSIM = tl_scaled(2, 1), N = tl_scaled(512, 128);
    const int full = NSTREAM == 4 && N == 512;
    static const llmkv_dtype kt[NT] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_Q8,
                                       LLMKV_DTYPE_FP8, LLMKV_DTYPE_Q4, LLMKV_DTYPE_Q4C};
    static const llmkv_dtype vt[NT] = {LLMKV_DTYPE_F32, LLMKV_DTYPE_F16, LLMKV_DTYPE_BF16, LLMKV_DTYPE_Q8,
                                       LLMKV_DTYPE_FP8, LLMKV_DTYPE_Q4, LLMKV_DTYPE_Q4};
    /* Against F32 storage: least top-1 agreement, most mean NLL increase
       (nats per token); measured values with a margin. Issue 8 asked for
       Q8 >= 0.99 and FP8 >= 0.97; this model cannot give that to any
       8-bit storage. Its sampled text has many near-ties (about 1 position
       in 12 has a top-2 gap under 0.05), and the number of flipped top-1s
       grows with the storage's rounding error: F16 (11-bit significand)
       flips 0.3%, BF16 (8-bit) 1.8%, Q8 (8 bits shared by 8 values) 3.6%.
       The reference rounding K/V the same way loses exactly as much (the
       sim column), so the loss is the rounding's, not the kernels'. */
    static const double min_agree[NT] = {1.0, 0.99, 0.96, 0.94, 0.75, 0.55, 0.55};
    static const double max_dnll[NT] = {0.0, 0.002, 0.005, 0.012, 0.15, 0.6, 0.6};
    const uint32_t NP = N - 1; /* scored positions per stream */
    llama_model m;
    ref_model ref;
    llmkv_token* tok;
    int32_t *rtop, *top0, *top;
    double *rnll, *nll, *probs;
    double ref_nll = 0.0, nll0 = 0.0;
    uint32_t s, ty, i, agree_ref = 0;
    char lines[NT][112];
    TL_LOAD(t, m);
    tok = (llmkv_token*)malloc(sizeof(llmkv_token) * NSTREAM * N);
    rtop = (int32_t*)malloc(sizeof(int32_t) * NSTREAM * N);
    top0 = (int32_t*)malloc(sizeof(int32_t) * NSTREAM * N);
    top = (int32_t*)malloc(sizeof(int32_t) * NSTREAM * N);
    rnll = (double*)malloc(sizeof(double) * NSTREAM * N);
    nll = (double*)malloc(sizeof(double) * NSTREAM * N);
    probs = (double*)malloc(sizeof(double) * (size_t)m.c.vocab_size);
    if (!tok || !rtop || !top0 || !top || !rnll || !nll || !probs || ref_init(&ref, &m) != 0) {
        free(tok), free(rtop), free(top0), free(top), free(rnll), free(nll), free(probs);
        llama_free(&m);
        TST_REQUIRE(t, tl_allocated);
    }
    memset(top0, 0xff, sizeof(int32_t) * NSTREAM * N);
    for (s = 0; s < NSTREAM; ++s) {
        TST_CHECK(t, ref_sample_stream(&ref, 1000 + s, N, tok + s * N, rtop + s * N, rnll + s * N, probs) == 0);
        for (i = 0; i < NP; ++i) ref_nll += rnll[s * N + i];
    }
    ref_nll /= (double)(NSTREAM * NP);
    for (ty = 0; ty < NT; ++ty) {
        llama_opts o = tl_opts(kt[ty], vt[ty], 32, 1, 1);
        llama_engine e;
        uint32_t agree = 0, agree_sim = 0;
        double sum = 0.0, sum_sim = 0.0, sum_sim_ref = 0.0, frac, mean, dnll;
        char what[64];
        llmkv_result r = llama_engine_create(&e, &m, &o);
        snprintf(what, sizeof what, "%s keys, %s values", llmkv_dtype_name(kt[ty]), llmkv_dtype_name(vt[ty]));
        TST_EQ(t, r, LLMKV_OK);
        if (r != LLMKV_OK) {
            snprintf(lines[ty], sizeof lines[ty], "  %-20s (no engine: %s)", what, llmkv_result_string(r));
            continue;
        }
        memset(top, 0xff, sizeof(int32_t) * NSTREAM * N);
        for (s = 0; s < NSTREAM; ++s) {
            int32_t* tp = (ty == 0 ? top0 : top) + s * N;
            r = llama_teacher_force(&e, tok + s * N, N, 64, tp, nll + s * N);
            TST_EQ(t, r, LLMKV_OK);
            if (r != LLMKV_OK) break;
            for (i = 0; i < NP; ++i) {
                sum += nll[s * N + i];
                if (ty == 0 && tp[i] == rtop[s * N + i]) ++agree_ref;
                else if (ty == 0 && s * NP + i - agree_ref < 5) /* the first few */
                    fprintf(stderr, "  F32 storage: stream %u position %u top-1 %d, the reference's %d\n", s, i,
                            (int)tp[i], (int)rtop[s * N + i]);
                agree += tp[i] == top0[s * N + i];
            }
        }
        tl_check_empty(t, e.kv, what);
        llama_engine_destroy(&e);
        frac = (double)agree / (double)(NSTREAM * NP);
        mean = sum / (double)(NSTREAM * NP);
        if (ty == 0) nll0 = mean;
        dnll = mean - nll0;
        /* The reference with this type's rounding, on the first streams. */
        if (ty > 0 && kt[ty] != LLMKV_DTYPE_Q4C) {
            /* The AVX512_BF16 path reads BF16 K/V with the softmax weights
               and the query rounded to BF16 (llmkv_cpu_path): more than
               the storage's own rounding, so a looser bound there. */
            double sim_min = kt[ty] == LLMKV_DTYPE_BF16 && llmkv_cpu_path_auto() == LLMKV_CPU_PATH_AVX512_BF16 ? 0.97
                                                                                                              : 0.99;
            ref.k_store = kt[ty];
            ref.v_store = vt[ty];
            for (s = 0; s < NSIM; ++s) {
                ref.len = 0;
                for (i = 0; i < NP; ++i) {
                    if (ref_step(&ref, tok[s * N + i], (int)i, NULL) != 0) break;
                    ref_log_softmax(probs, ref.logits, m.c.vocab_size);
                    agree_sim += ref_argmax(ref.logits, m.c.vocab_size) == top[s * N + i];
                    sum_sim_ref += -probs[tok[s * N + i + 1]];
                    sum_sim += nll[s * N + i];
                }
            }
            ref.k_store = ref.v_store = LLMKV_DTYPE_DEFAULT;
            if (!((double)(NSIM * NP - agree_sim) <= (1.0 - sim_min) * (double)(NSIM * NP) + 3.0)) {
                fprintf(stderr,
                        "  FAIL %s: top-1 agrees with the reference of the same rounding at %u of %u positions\n",
                        what, agree_sim, NSIM * NP);
                t->cur_failures++;
            }
            if (t->verbose)
                fprintf(stderr, "  %s: mean NLL %.6f, the reference of the same rounding %.6f\n", what,
                        sum_sim / (double)(NSIM * NP), sum_sim_ref / (double)(NSIM * NP));
            if (!(fabs(sum_sim - sum_sim_ref) / (double)(NSIM * NP) < 1e-3 + 0.5 / (double)(NSIM * NP))) {
                fprintf(stderr, "  FAIL %s: mean NLL %.5f, the reference of the same rounding %.5f\n", what,
                        sum_sim / (double)(NSIM * NP), sum_sim_ref / (double)(NSIM * NP));
                t->cur_failures++;
            }
            snprintf(lines[ty], sizeof lines[ty], "  %-5s %-5s  %7.2f%%  %.4f  %+.5f   %7.2f%%",
                     llmkv_dtype_name(kt[ty]),
                     llmkv_dtype_name(vt[ty]), 100.0 * frac, mean, dnll,
                     100.0 * (double)agree_sim / (double)(NSIM * NP));
        } else {
            snprintf(lines[ty], sizeof lines[ty], "  %-5s %-5s  %7.2f%%  %.4f  %+.5f   %8s", llmkv_dtype_name(kt[ty]),
                     llmkv_dtype_name(vt[ty]), 100.0 * frac, mean, dnll, ty == 0 ? "(below)" : "-");
        }
        if (full && !(frac >= min_agree[ty])) {
            fprintf(stderr, "  FAIL %s: top-1 agreement with F32 storage %.4f < %.4f\n", what, frac, min_agree[ty]);
            t->cur_failures++;
        }
        if (full && ty > 0 && !(dnll <= max_dnll[ty])) {
            fprintf(stderr, "  FAIL %s: mean NLL %.5f above F32 storage's by %.5f > %.5f\n", what, mean, dnll,
                    max_dnll[ty]);
            t->cur_failures++;
        }
    }
    /* F32 storage against the reference: the same argmax everywhere, the
       same likelihood. */
    TST_EQ(t, agree_ref, NSTREAM * NP);
    if (!(fabs(nll0 - ref_nll) < 1e-4)) {
        fprintf(stderr, "  FAIL F32 storage mean NLL %.6f, the reference's %.6f\n", nll0, ref_nll);
        t->cur_failures++;
    }
    fprintf(stderr,
            "  llama KV storage quality, %u streams x %u positions (F32 storage vs reference: top-1 %.2f%%, NLL "
            "%.4f)\n  K     V       agree*    NLL     dNLL     sim**\n",
            (unsigned)NSTREAM, NP, 100.0 * (double)agree_ref / (double)(NSTREAM * NP), ref_nll);
    for (ty = 0; ty < NT; ++ty) fprintf(stderr, "%s\n", lines[ty]);
    fprintf(stderr,
            "  * top-1 agreement with F32 storage; ** with the reference rounding K/V the same way (%u streams)\n",
            (unsigned)NSIM);
    if (!full) fprintf(stderr, "  (LLMKV_TEST_SCALE < 1: bounds against F32 storage not checked)\n");
    ref_free(&ref);
    free(tok), free(rtop), free(top0), free(top), free(rnll), free(nll), free(probs);
    llama_free(&m);
}

void suite_llama(tst* t) {
    TST_RUN(t, test_llama_greedy_matches_reference);
    TST_RUN(t, test_llama_prompt_prefill_matches_reference);
    TST_RUN(t, test_llama_beams_match_reference);
    TST_RUN(t, test_llama_speculative_equals_greedy);
    TST_RUN(t, test_llama_save_restore_midway);
    TST_RUN(t, test_llama_serve_matches_alone);
    TST_RUN(t, test_llama_quality);
}
