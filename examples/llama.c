/* llama.c - run a real Llama with llmkv doing all the K/V work.

   Loads a llama2.c-format checkpoint (shared/models/stories260K.bin, or
   Karpathy's stories15M.bin / stories110M.bin) and generates token ids.
   Every token's K and V go into llmkv's paged cache (llmkv_put) and every
   attention reads them from the pages (llmkv_attend); the model code is in
   examples/llama_model.h.

   Usage: llama CHECKPOINT [options]
     --steps N          tokens to generate (default 256)
     --temp T           sampling temperature; 0 is greedy argmax (default 1.0)
     --seed S           sampler seed (default 42)
     --prompt-ids "1 ..." the prompt as token ids (default "1", BOS). Give it
                        several times to serve several prompts at once.
     --ids              print only the generated ids (not the prompt),
                        space-separated, one line per prompt
     --tokenizer FILE   a llama2.c tokenizer.bin, to print text instead of ids
     --kv TYPE          K and V storage: f32 f16 bf16 q8 q4 fp8 (default f32)
     --kv-k TYPE        K storage alone (also q4c: 4-bit per channel keys)
     --kv-v TYPE        V storage alone
     --page N           tokens per page (default 16)
     --threads N        attention threads (default 1)
     --beams K          beam search with K beams (forks share pages)
     --draft N          speculative decoding: a draft proposes N tokens per
                        step, the model verifies them in one step
     --draft-kv TYPE    the draft's K/V storage (default q4)
     --draft-layers L   the draft runs the first L layers (default: all)
   Several --prompt-ids run as a server would: one request arrives per step,
   picks up the longest cached prefix of its prompt from llmkv's prefix
   index, and every live request advances in the same batch. Each produces
   what it produces alone.

   Output: the generated ids (or text) on stdout; the configuration and a
   summary line with tokens/s on stderr. Exit status 0, or 1 with one
   "error: ..." line.

   Build: make (build/llama), or
     cc -std=c99 -O2 examples/llama.c -o llama -lm -pthread */
#ifndef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200112L /* clock_gettime under -std=c99 */
#endif
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define LLMKV_IMPLEMENTATION
#include "../llmkv.h"
#include "llama_model.h"

#define MAX_PROMPTS 64

typedef struct options {
    const char* checkpoint;
    const char* tokenizer;
    uint32_t steps, seed, page_size, threads, beams, draft, draft_layers;
    float temp;
    int ids_only;
    llmkv_dtype k_dtype, v_dtype, draft_dtype;
    const char* prompt_text[MAX_PROMPTS];
    uint32_t n_prompts;
} options;

static void die(const char* what, const char* detail) {
    fprintf(stderr, "error: %s%s%s\n", what, detail ? ": " : "", detail ? detail : "");
    exit(1);
}

static void check(llmkv_result r, const char* what) {
    if (r != LLMKV_OK) die(what, llmkv_result_string(r));
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* A whole decimal number in [lo, hi], or exit with an error naming `opt`. */
static uint32_t parse_uint(const char* opt, const char* s, uint32_t lo, uint32_t hi) {
    char* end;
    unsigned long v;
    errno = 0;
    v = strtoul(s, &end, 10);
    if (!*s || *end || errno || s[0] == '-' || v < lo || v > hi) {
        fprintf(stderr, "error: %s needs a whole number from %u to %u (got \"%s\")\n", opt, lo, hi, s);
        exit(1);
    }
    return (uint32_t)v;
}

static llmkv_dtype parse_dtype(const char* opt, const char* s, int allow_q4c) {
    static const struct { const char* name; llmkv_dtype t; } names[] = {
        {"f32", LLMKV_DTYPE_F32}, {"f16", LLMKV_DTYPE_F16}, {"bf16", LLMKV_DTYPE_BF16}, {"q8", LLMKV_DTYPE_Q8},
        {"q4", LLMKV_DTYPE_Q4},   {"fp8", LLMKV_DTYPE_FP8}, {"q4c", LLMKV_DTYPE_Q4C}};
    size_t i;
    for (i = 0; i < sizeof names / sizeof names[0]; ++i)
        if (strcmp(s, names[i].name) == 0 && (allow_q4c || names[i].t != LLMKV_DTYPE_Q4C)) return names[i].t;
    fprintf(stderr, "error: %s takes f32, f16, bf16, q8, q4, fp8%s (got \"%s\")\n", opt,
            allow_q4c ? " or q4c" : "", s);
    exit(1);
}

/* Token ids separated by spaces; each in [0, vocab). Returns the count. */
static uint32_t parse_ids(const char* s, llmkv_token* out, uint32_t cap, int vocab) {
    uint32_t n = 0;
    while (*s) {
        char* end;
        long v;
        while (*s == ' ' || *s == '\t' || *s == ',') ++s;
        if (!*s) break;
        errno = 0;
        v = strtol(s, &end, 10);
        if (end == s || errno || v < 0 || v >= vocab) {
            fprintf(stderr, "error: --prompt-ids: \"%s\" is not a token id from 0 to %d\n", s, vocab - 1);
            exit(1);
        }
        if (n == cap) {
            fprintf(stderr, "error: --prompt-ids: more than %u tokens\n", cap);
            exit(1);
        }
        out[n++] = (llmkv_token)v;
        s = end;
        if (*s && *s != ' ' && *s != '\t' && *s != ',') {
            fprintf(stderr, "error: --prompt-ids: unexpected \"%s\"\n", s);
            exit(1);
        }
    }
    if (n == 0) die("--prompt-ids", "no token ids");
    return n;
}

/* 1 when argument `a` is option `name`, which takes a value: exits with an
   error when the command line ends before the value. */
static int is_opt(const char* a, const char* name, const char* val) {
    if (strcmp(a, name) != 0) return 0;
    if (!val) die("missing value after", a);
    return 1;
}

static options parse_args(int argc, char** argv) {
    options o;
    int i;
    memset(&o, 0, sizeof o);
    o.steps = 256;
    o.temp = 1.0f;
    o.seed = 42;
    o.page_size = 16;
    o.threads = 1;
    o.k_dtype = o.v_dtype = LLMKV_DTYPE_F32;
    o.draft_dtype = LLMKV_DTYPE_Q4;
    for (i = 1; i < argc; ++i) {
        const char* a = argv[i];
        const char* val = i + 1 < argc ? argv[i + 1] : NULL;
        if (a[0] != '-') {
            if (o.checkpoint) die("more than one checkpoint path", a);
            o.checkpoint = a;
            continue;
        }
        if (strcmp(a, "--ids") == 0) {
            o.ids_only = 1;
            continue;
        }
        if (strcmp(a, "--help") == 0 || strcmp(a, "-h") == 0) {
            fprintf(stderr, "usage: llama CHECKPOINT [--steps N] [--temp T] [--seed S] [--prompt-ids \"1 ...\"]... [--ids]\n"
                            "       [--tokenizer FILE] [--kv TYPE] [--kv-k TYPE] [--kv-v TYPE] [--page N] [--threads N]\n"
                            "       [--beams K] [--draft N [--draft-kv TYPE] [--draft-layers L]]\n"
                            "TYPE: f32 f16 bf16 q8 q4 fp8 (keys also q4c). See the top of examples/llama.c.\n");
            exit(0);
        }
        if (is_opt(a, "--steps", val)) o.steps = parse_uint(a, val, 1, 1u << 20);
        else if (is_opt(a, "--temp", val)) {
            char* end;
            double t = strtod(val, &end);
            if (!*val || *end || !(t >= 0.0 && t <= 100.0)) die("--temp needs a number from 0 to 100, got", val);
            o.temp = (float)t;
        } else if (is_opt(a, "--seed", val)) o.seed = parse_uint(a, val, 0, 0xFFFFFFFFu);
        else if (is_opt(a, "--prompt-ids", val)) {
            if (o.n_prompts == MAX_PROMPTS) die("too many --prompt-ids (at most 64)", NULL);
            o.prompt_text[o.n_prompts++] = val;
        } else if (is_opt(a, "--tokenizer", val)) o.tokenizer = val;
        else if (is_opt(a, "--kv", val)) o.k_dtype = o.v_dtype = parse_dtype(a, val, 0);
        else if (is_opt(a, "--kv-k", val)) o.k_dtype = parse_dtype(a, val, 1);
        else if (is_opt(a, "--kv-v", val)) o.v_dtype = parse_dtype(a, val, 0);
        else if (is_opt(a, "--page", val)) o.page_size = parse_uint(a, val, 1, 1024);
        else if (is_opt(a, "--threads", val)) o.threads = parse_uint(a, val, 1, 256);
        else if (is_opt(a, "--beams", val)) o.beams = parse_uint(a, val, 1, 64);
        else if (is_opt(a, "--draft", val)) o.draft = parse_uint(a, val, 1, 64);
        else if (is_opt(a, "--draft-kv", val)) o.draft_dtype = parse_dtype(a, val, 0);
        else if (is_opt(a, "--draft-layers", val)) o.draft_layers = parse_uint(a, val, 1, 1024);
        else die("unknown option", a);
        ++i; /* the value */
    }
    if (!o.checkpoint) die("no checkpoint given (usage: llama CHECKPOINT [options]; --help)", NULL);
    if (o.beams && o.draft) die("--beams and --draft cannot be combined", NULL);
    if (o.n_prompts > 1 && (o.beams || o.draft)) die("several --prompt-ids serve greedy/sampled requests only (no --beams or --draft)", NULL);
    return o;
}

/* ------------------------------------------------------------------------ */
/* Optional text output: a llama2.c tokenizer.bin (decoding only)           */
/* ------------------------------------------------------------------------ */

typedef struct vocab {
    char** piece;
    int n;
} vocab;

/* tokenizer.bin: int32 max_token_length, then per token: float score,
   int32 length, that many bytes. */
static void load_vocab(vocab* v, const char* path, int n) {
    FILE* f = fopen(path, "rb");
    int32_t max_len, len;
    float score;
    int i;
    if (!f) die("cannot open tokenizer", path);
    v->n = n;
    v->piece = (char**)calloc((size_t)n, sizeof(char*));
    if (!v->piece) die("out of memory", NULL);
    if (fread(&max_len, 4, 1, f) != 1) die("not a tokenizer file (too short)", path);
    for (i = 0; i < n; ++i) {
        if (fread(&score, 4, 1, f) != 1 || fread(&len, 4, 1, f) != 1 || len < 0 || len > 4096)
            die("not a tokenizer for this model (truncated or bad entry)", path);
        v->piece[i] = (char*)malloc((size_t)len + 1);
        if (!v->piece[i]) die("out of memory", NULL);
        if (fread(v->piece[i], 1, (size_t)len, f) != (size_t)len) die("tokenizer truncated", path);
        v->piece[i][len] = 0;
    }
    fclose(f);
}

static void free_vocab(vocab* v) {
    int i;
    for (i = 0; v->piece && i < v->n; ++i) free(v->piece[i]);
    free(v->piece);
}

/* Prints one token's text: "<0xAB>" pieces are raw bytes; the space a
   piece starts with is dropped right after BOS (as llama2.c does). */
static void print_piece(const vocab* v, llmkv_token prev, llmkv_token tok) {
    const char* p = v->piece[tok];
    unsigned byte;
    if (prev == 1 && p[0] == ' ') ++p;
    if (sscanf(p, "<0x%02X>", &byte) == 1 && strlen(p) == 6) {
        if (byte >= 32 || byte == '\n' || byte == '\t') putchar((int)byte);
        return;
    }
    fputs(p, stdout);
}

static void print_result(const options* o, const vocab* v, const llmkv_token* prompt, uint32_t n_prompt,
                         const llmkv_token* out, uint32_t n) {
    uint32_t i;
    if (v->piece && !o->ids_only) {
        llmkv_token prev = -1;
        for (i = 0; i < n_prompt; ++i) {
            if (prompt[i] != 1) print_piece(v, prev, prompt[i]);
            prev = prompt[i];
        }
        for (i = 0; i < n; ++i) {
            print_piece(v, prev, out[i]);
            prev = out[i];
        }
        putchar('\n');
        return;
    }
    for (i = 0; i < n; ++i) printf(i ? " %d" : "%d", out[i]);
    putchar('\n');
}

/* ------------------------------------------------------------------------ */

int main(int argc, char** argv) {
    options o = parse_args(argc, argv);
    llama_model m;
    llama_engine e, de;
    llama_opts eo;
    vocab voc;
    char err[512];
    llmkv_token* prompts[MAX_PROMPTS];
    uint32_t n_prompt[MAX_PROMPTS], i, max_prompt = 0, total_rows;
    llmkv_token* out;
    llmkv_stats ks;
    double t0, t1;
    uint64_t rng = llama_rng(o.seed);

    if (llama_load(&m, o.checkpoint, err, sizeof err) != 0) die(err, NULL);
    memset(&voc, 0, sizeof voc);
    if (o.tokenizer) load_vocab(&voc, o.tokenizer, m.c.vocab_size);
    if (o.n_prompts == 0) o.prompt_text[o.n_prompts++] = "1";
    for (i = 0; i < o.n_prompts; ++i) {
        prompts[i] = (llmkv_token*)malloc(sizeof(llmkv_token) * (size_t)m.c.seq_len);
        if (!prompts[i]) die("out of memory", NULL);
        n_prompt[i] = parse_ids(o.prompt_text[i], prompts[i], (uint32_t)m.c.seq_len, m.c.vocab_size);
        if (n_prompt[i] > max_prompt) max_prompt = n_prompt[i];
    }
    /* The last generated token is never fed, so a sequence holds at most
       prompt + steps - 1 positions. */
    if ((uint64_t)max_prompt + o.steps - 1 > (uint64_t)m.c.seq_len) {
        fprintf(stderr, "error: prompt (%u tokens) + --steps %u passes the model's context of %d tokens\n", max_prompt,
                o.steps, m.c.seq_len);
        return 1;
    }
    if (o.beams > (uint32_t)m.c.vocab_size) die("--beams is larger than the vocabulary", NULL);
    if (o.k_dtype == LLMKV_DTYPE_Q4C && o.page_size < 2) die("--kv-k q4c needs --page 2 or more (32 or more is sensible)", NULL);

    memset(&eo, 0, sizeof eo);
    eo.k_dtype = o.k_dtype;
    eo.v_dtype = o.v_dtype;
    eo.page_size = o.page_size;
    eo.n_threads = o.threads;
    eo.max_seqs = o.beams ? o.beams : o.n_prompts;
    eo.max_rows = (uint32_t)m.c.seq_len + o.n_prompts;
    eo.prefix_index = o.n_prompts > 1;
    check(llama_engine_create(&e, &m, &eo), "creating the cache");
    memset(&de, 0, sizeof de);
    if (o.draft) {
        llama_opts dopt = eo;
        dopt.k_dtype = dopt.v_dtype = o.draft_dtype;
        dopt.n_layers = o.draft_layers;
        check(llama_engine_create(&de, &m, &dopt), "creating the draft's cache");
    }
    fprintf(stderr, "model: dim %d, %d layers, %d heads (%d KV), vocab %d, context %d; kv %s/%s, page %u, %u thread%s, path %s\n",
            m.c.dim, m.c.n_layers, m.c.n_heads, m.c.n_kv_heads, m.c.vocab_size, m.c.seq_len,
            llmkv_dtype_name(o.k_dtype), llmkv_dtype_name(o.v_dtype), o.page_size, o.threads, o.threads > 1 ? "s" : "",
            llmkv_cpu_path_name(llmkv_cpu_path_auto()));

    out = (llmkv_token*)malloc(sizeof(llmkv_token) * o.steps * o.n_prompts);
    if (!out) die("out of memory", NULL);
    t0 = now();
    if (o.n_prompts > 1) {
        llama_serve_stats st;
        check(llama_serve(&e, (const llmkv_token* const*)prompts, n_prompt, o.n_prompts, o.steps, o.temp, rng, out, &st),
              "serving");
        t1 = now();
        for (i = 0; i < o.n_prompts; ++i) print_result(&o, &voc, prompts[i], n_prompt[i], out + (size_t)i * o.steps, o.steps);
        check(llmkv_cache_stats(e.kv, &ks), "stats");
        total_rows = (uint32_t)st.rows;
        fprintf(stderr,
                "served %u requests x %u tokens in %u steps (up to %u per step): %.1f tokens/s generated, %.1f rows/s computed; "
                "prompt tokens from the prefix index %llu of %llu; peak pages %u of %u\n",
                o.n_prompts, o.steps, st.steps, st.max_batch, (double)o.n_prompts * o.steps / (t1 - t0),
                (double)total_rows / (t1 - t0), (unsigned long long)st.prompt_tokens_cached,
                (unsigned long long)st.prompt_tokens, st.peak_pages, ks.n_pages_total);
    } else if (o.beams) {
        double score = 0.0;
        check(llama_beam_search(&e, prompts[0], n_prompt[0], o.beams, o.steps, out, &score), "beam search");
        t1 = now();
        print_result(&o, &voc, prompts[0], n_prompt[0], out, o.steps);
        fprintf(stderr, "beam search, %u beams, %u steps: %.1f tokens/s (all beams: %.1f), best log-probability %.4f\n",
                o.beams, o.steps, o.steps / (t1 - t0), (double)o.steps * o.beams / (t1 - t0), score);
    } else if (o.draft) {
        llama_spec_stats st;
        check(llama_speculative(&e, &de, prompts[0], n_prompt[0], o.steps, o.draft, o.temp, &rng, out, &st),
              "speculative decoding");
        t1 = now();
        print_result(&o, &voc, prompts[0], n_prompt[0], out, o.steps);
        fprintf(stderr, "speculative (draft %s, %u layers, %u per step): %u tokens in %u target steps, %.1f tokens/s; "
                        "accepted %llu of %llu drafted (%.1f%%)\n",
                llmkv_dtype_name(o.draft_dtype), de.o.n_layers, o.draft, o.steps, st.rounds + 1, o.steps / (t1 - t0),
                (unsigned long long)st.accepted, (unsigned long long)st.drafted,
                st.drafted ? 100.0 * (double)st.accepted / (double)st.drafted : 0.0);
    } else {
        llmkv_seq seq;
        double tp;
        check(llmkv_seq_create(e.kv, &seq), "creating a sequence");
        /* Prefill the prompt in one step (timed apart), then decode. */
        check(llama_generate(&e, seq, prompts[0], n_prompt[0], 1, o.temp, &rng, out), "prefill");
        tp = now();
        if (o.steps > 1) check(llama_generate(&e, seq, out, 1, o.steps - 1, o.temp, &rng, out + 1), "generating");
        t1 = now();
        print_result(&o, &voc, prompts[0], n_prompt[0], out, o.steps);
        check(llmkv_cache_stats(e.kv, &ks), "stats");
        fprintf(stderr, "generated %u tokens: %.1f tokens/s (prompt %u tokens in %.2f ms, then %.1f tokens/s); "
                        "cache %u pages of %llu bytes, %.0f bytes per token\n",
                o.steps, o.steps / (t1 - t0), n_prompt[0], (tp - t0) * 1e3,
                o.steps > 1 ? (o.steps - 1) / (t1 - tp) : 0.0, ks.n_pages_used, (unsigned long long)ks.page_bytes,
                (double)ks.used_bytes / (double)(n_prompt[0] + o.steps - 1));
        check(llmkv_seq_free(e.kv, seq), "freeing the sequence");
    }
    free(out);
    for (i = 0; i < o.n_prompts; ++i) free(prompts[i]);
    free_vocab(&voc);
    llama_engine_destroy(&de);
    llama_engine_destroy(&e);
    llama_free(&m);
    return 0;
}
