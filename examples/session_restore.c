/* session_restore.c - stop a generation, save it, and carry on later.

   An engine that saves its KV cache can stop at any point (a restart, an
   upgrade, a user who comes back tomorrow) and resume without running the
   model over the history again. llmkv saves two ways:
     - the whole cache (llmkv_cache_save_file, llmkv_cache_load_file): every
       sequence, page and the prefix index; the saved sequence handles stay
       valid in the loaded cache;
     - one sequence (llmkv_seq_export_file, llmkv_seq_import_file): moved
       into another, already running cache, where it gets a new handle.

   The program generates with a tiny made-up transformer (no model file):
   each token passes through 4 layers; a layer projects K, V and Q from the
   token's hidden state, stores K and V in the cache, attends over every
   cached position with llmkv_attend and adds the result to the hidden
   state; the next token is the argmax of the final hidden state's logits.
   Each token's computation reads the whole cache through llmkv_attend, so
   the continuation is computed from the restored K/V, not just compared.

   Four runs, all from the same prompt:
     1. reference: prompt, then N + M tokens without stopping;
     2. session:   prompt, N tokens; save the cache to PATH and export the
                   sequence to PATH.seq; destroy everything;
     3. restored:  load PATH, continue M tokens;
     4. imported:  import PATH.seq into a fresh cache, continue M tokens.
   Runs 3 and 4 must produce exactly run 1's last M tokens ("identical:
   yes"), and the K/V they start from must be bit for bit what run 2
   saved (a checksum of every stored vector); the program exits non-zero
   otherwise, or if any call fails.

   Usage: session_restore [--steps N] [--more M] [PATH]
     PATH defaults to /tmp/llmkv_session.bin; both files are removed at exit.

   Build and run:  cc -std=c99 -O2 examples/session_restore.c -o session_restore -lm -pthread
                   ./session_restore */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LLMKV_IMPLEMENTATION /* in exactly one file of your program */
#include "../llmkv.h"

enum {
    N_LAYERS = 4, N_Q_HEADS = 4, N_KV_HEADS = 2, HEAD_DIM = 16,
    D = N_Q_HEADS * HEAD_DIM,   /* hidden state: 64 floats */
    KV = N_KV_HEADS * HEAD_DIM, /* K (or V) of one token and layer: 32 floats */
    VOCAB = 512, PAGE_SIZE = 16, PROMPT_LEN = 10, MAX_STEPS = 100000
};

/* Every fallible llmkv call returns llmkv_result: stop, saying which call
   failed and why. */
static void check(llmkv_result r, const char* call) {
    if (r != LLMKV_OK) {
        fprintf(stderr, "error: %s failed: %s\n", call, llmkv_result_string(r));
        exit(1);
    }
}
#define CHECK(call) check((call), #call)

/* The result code says what kind of failure; the logger says which file,
   step or field (the library never prints by itself). */
static void log_to_stderr(void* user, llmkv_log_level level, const char* message) {
    (void)user;
    (void)level;
    fprintf(stderr, "%s\n", message); /* "llmkv: ..." */
}

/* ------------------------------------------------------------------------ */
/* The tiny model                                                           */
/* ------------------------------------------------------------------------ */

/* Weights: fixed pseudo-random values, uniform in [-1/8, 1/8) (splitmix64
   from a fixed seed). */
static struct weights {
    float q[N_LAYERS][D][D], k[N_LAYERS][KV][D], v[N_LAYERS][KV][D], o[N_LAYERS][D][D];
    float embed[VOCAB][D], unembed[VOCAB][D];
} model;

static void fill(float* x, size_t n, uint64_t* s) {
    size_t i;
    for (i = 0; i < n; ++i) {
        uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        x[i] = (float)((double)((z ^ (z >> 31)) >> 11) / 36028797018963968.0 - 0.125);
    }
}
#define FILL(a) fill((float*)(a), sizeof(a) / sizeof(float), &seed)

static void init_weights(void) {
    uint64_t seed = 42;
    FILL(model.q); FILL(model.k); FILL(model.v); FILL(model.o); FILL(model.embed); FILL(model.unembed);
}

/* y[r] = sum_c w[r][c] x[c] for `rows` rows of D columns. */
static void matvec(const float* w, const float* x, float* y, int rows) {
    int r, c;
    for (r = 0; r < rows; ++r) {
        float acc = 0.0f;
        for (c = 0; c < D; ++c) acc += w[r * D + c] * x[c];
        y[r] = acc;
    }
}

/* One engine: a cache, the sequence being generated, a batch to describe
   each step for llmkv_attend. */
typedef struct engine {
    llmkv_cache* kv;
    llmkv_seq seq;
    llmkv_batch* batch;
} engine;

/* Runs one token through the model at the end of the sequence: its K and V
   go into the cache; h receives its final hidden state. */
static void feed(engine* e, llmkv_token token, float h[D]) {
    float q[D], k[KV], v[KV], att[D], o[D], norm;
    uint32_t q_len = 1;
    int layer, i;
    llmkv_attn_desc a;
    memcpy(h, model.embed[token], sizeof(float) * D);
    /* Make room for the token in every layer, recording its id (prefix index). */
    CHECK(llmkv_reserve_tokens(e->kv, e->seq, &token, 1));
    CHECK(llmkv_batch_build(e->batch, &e->seq, &q_len, 1)); /* after the reserve */
    for (layer = 0; layer < N_LAYERS; ++layer) {
        matvec(&model.k[layer][0][0], h, k, KV);
        matvec(&model.v[layer][0][0], h, v, KV);
        matvec(&model.q[layer][0][0], h, q, D);
        CHECK(llmkv_put(e->kv, e->seq, (uint32_t)layer, 1, k, 0, v, 0, LLMKV_DTYPE_F32));
        /* Attention of this token over every cached position, itself included. */
        memset(&a, 0, sizeof a);
        a.layer = (uint32_t)layer;
        a.n_q_heads = N_Q_HEADS;
        a.q = q;
        a.out = att;
        a.scale = 4.0f; /* sharper than the usual 1/sqrt(HEAD_DIM) */
        CHECK(llmkv_attend(e->kv, e->batch, &a, NULL));
        matvec(&model.o[layer][0][0], att, o, D);
        norm = 0.0f;
        for (i = 0; i < D; ++i) {
            h[i] += o[i];
            norm += h[i] * h[i];
        }
        norm = 1.0f / sqrtf(norm / (float)D + 1e-6f); /* RMS norm keeps h bounded */
        for (i = 0; i < D; ++i) h[i] *= norm;
    }
}

/* The next token: argmax over the vocabulary of unembed . h. */
static llmkv_token sample(const float h[D]) {
    float logits[VOCAB];
    llmkv_token t, best = 0;
    matvec(&model.unembed[0][0], h, logits, VOCAB);
    for (t = 1; t < VOCAB; ++t)
        if (logits[t] > logits[best]) best = t;
    return best;
}

/* Feeds a prompt; h receives the hidden state of its last token. */
static void prefill(engine* e, const llmkv_token* prompt, int n, float h[D]) {
    int i;
    for (i = 0; i < n; ++i) feed(e, prompt[i], h);
}

/* Generates n tokens into out[] (each is fed, so the cache holds them all). */
static void generate(engine* e, float h[D], llmkv_token* out, int n) {
    int i;
    for (i = 0; i < n; ++i) {
        out[i] = sample(h);
        feed(e, out[i], h);
    }
}

/* After a restore the cache holds the K/V of every token but not the final
   hidden state (the logits) of the last one: roll that token back and run
   it again, one token of compute. Its id is in the saved cache too: the
   prefix index records the token of every slot. */
static void resume(engine* e, float h[D]) {
    uint32_t length;
    llmkv_token last;
    CHECK(llmkv_seq_length(e->kv, e->seq, &length));
    CHECK(llmkv_seq_tokens(e->kv, e->seq, length - 1, 1, &last));
    CHECK(llmkv_truncate(e->kv, e->seq, length - 1));
    feed(e, last, h);
}

/* ------------------------------------------------------------------------ */
/* Engines and files                                                        */
/* ------------------------------------------------------------------------ */

static llmkv_desc cache_desc(int n_tokens) {
    llmkv_desc d;
    memset(&d, 0, sizeof d);
    d.n_layers = N_LAYERS;
    d.n_kv_heads = N_KV_HEADS;
    d.head_dim = HEAD_DIM;
    d.page_size = PAGE_SIZE;
    d.n_pages = (uint32_t)(n_tokens / PAGE_SIZE + 2);
    d.max_seqs = 4;
    d.prefix_index = 1; /* records token ids: the file then holds them too */
    d.logger.fn = log_to_stderr;
    return d;
}

/* A cache that already exists (created, or loaded), and its batch. */
static void engine_attach(engine* e, llmkv_cache* kv, llmkv_seq seq) {
    e->kv = kv;
    e->seq = seq;
    CHECK(llmkv_batch_create(kv, 1, 1, &e->batch));
}

static void engine_new(engine* e, int n_tokens) {
    llmkv_desc d = cache_desc(n_tokens);
    llmkv_cache* kv;
    llmkv_seq seq;
    CHECK(llmkv_cache_create(&d, &kv));
    CHECK(llmkv_seq_create(kv, &seq));
    engine_attach(e, kv, seq);
}

static void engine_check(engine* e, const char* name) {
    char message[256];
    if (llmkv_cache_check(e->kv, message, sizeof message) != LLMKV_OK) {
        fprintf(stderr, "error: %s: invariant violated: %s\n", name, message);
        exit(1);
    }
}

/* FNV-1a over every stored K and V element (F16 as stored: the gather's
   DEFAULT type) of every layer and position: equal checksums mean
   bit-identical caches, as far as this sequence goes. */
static uint64_t kv_checksum(engine* e) {
    static uint16_t k[256 * KV], v[256 * KV];
    uint64_t x = 14695981039346656037ull;
    uint32_t length, layer, pos, n, i;
    CHECK(llmkv_seq_length(e->kv, e->seq, &length));
    for (layer = 0; layer < N_LAYERS; ++layer)
        for (pos = 0; pos < length; pos += n) {
            n = length - pos < 256 ? length - pos : 256;
            CHECK(llmkv_gather(e->kv, e->seq, layer, pos, n, k, 0, v, 0, LLMKV_DTYPE_DEFAULT));
            for (i = 0; i < n * KV; ++i) x = (x ^ k[i] ^ ((uint64_t)v[i] << 16)) * 1099511628211ull;
        }
    return x;
}

static void engine_destroy(engine* e) {
    llmkv_batch_destroy(e->batch); /* batches first, then their cache */
    llmkv_cache_destroy(e->kv);
    memset(e, 0, sizeof *e);
}

static char cache_path[4096], seq_path[4096 + 8];

static void remove_files(void) {
    if (cache_path[0]) remove(cache_path);
    if (seq_path[0]) remove(seq_path);
}

static uint64_t hash_tokens(const llmkv_token* t, int n) { /* FNV-1a over the ids */
    uint64_t x = 14695981039346656037ull;
    int i;
    for (i = 0; i < n; ++i) x = (x ^ (uint64_t)(uint32_t)t[i]) * 1099511628211ull;
    return x;
}

static void show(const char* name, const llmkv_token* t, int n) {
    int i;
    printf("  %-10s hash %016llx:", name, (unsigned long long)hash_tokens(t, n));
    for (i = 0; i < n && i < 8; ++i) printf(" %d", (int)t[i]);
    printf("%s\n", n > 8 ? " ..." : "");
}

static int parse_count(const char* s, const char* opt) {
    char* end;
    long v = strtol(s, &end, 10);
    if (*s == '\0' || *end != '\0' || v < 1 || v > MAX_STEPS) {
        fprintf(stderr, "error: %s takes a number of tokens, 1..%d\n", opt, MAX_STEPS);
        exit(2);
    }
    return (int)v;
}

int main(int argc, char** argv) {
    int n = 200, m = 100, i, same_session, same_restored, same_imported;
    const char* path = "/tmp/llmkv_session.bin";
    llmkv_token prompt[PROMPT_LEN], *reference, *session, *restored, *imported;
    llmkv_seq saved_seq;
    llmkv_cache* kv;
    uint64_t cache_bytes, seq_bytes, sum_saved, sum_loaded, sum_imported;
    uint32_t n_shared;
    float h[D];
    engine e;

    for (i = 1; i < argc; ++i) {
        if (strcmp(argv[i], "--steps") == 0 && i + 1 < argc) n = parse_count(argv[++i], "--steps");
        else if (strcmp(argv[i], "--more") == 0 && i + 1 < argc) m = parse_count(argv[++i], "--more");
        else if (argv[i][0] != '-') path = argv[i];
        else {
            fprintf(stderr, "usage: %s [--steps N] [--more M] [PATH]\n", argv[0]);
            return 2;
        }
    }
    if (strlen(path) >= sizeof cache_path) {
        fprintf(stderr, "error: path too long\n");
        return 2;
    }
    strcpy(cache_path, path);
    snprintf(seq_path, sizeof seq_path, "%s.seq", path);
    atexit(remove_files); /* on success and on every error exit */

    init_weights();
    for (i = 0; i < PROMPT_LEN; ++i) prompt[i] = (llmkv_token)((i * 37 + 11) % VOCAB);
    reference = (llmkv_token*)malloc(sizeof(llmkv_token) * (size_t)(n + m));
    session = (llmkv_token*)malloc(sizeof(llmkv_token) * (size_t)n);
    restored = (llmkv_token*)malloc(sizeof(llmkv_token) * (size_t)m);
    imported = (llmkv_token*)malloc(sizeof(llmkv_token) * (size_t)m);
    if (!reference || !session || !restored || !imported) {
        fprintf(stderr, "error: out of memory\n");
        return 1;
    }
    printf("llmkv %s session_restore: a %d-layer toy model, a %d-token prompt, %d tokens, "
           "then %d more\n\n", llmkv_version(), N_LAYERS, PROMPT_LEN, n, m);

    /* 1. The reference: a run that never stops. */
    engine_new(&e, PROMPT_LEN + n + m);
    prefill(&e, prompt, PROMPT_LEN, h);
    generate(&e, h, reference, n + m);
    engine_destroy(&e);
    printf("1. reference run: prompt + %d tokens without stopping\n", n + m);

    /* 2. The session: N tokens, then save the whole cache and export the
          sequence. Both writes are crash-safe: a temporary file, fsync,
          rename; an interrupted save leaves the previous file intact. */
    engine_new(&e, PROMPT_LEN + n + m);
    prefill(&e, prompt, PROMPT_LEN, h);
    generate(&e, h, session, n);
    engine_check(&e, "session");
    sum_saved = kv_checksum(&e);
    CHECK(llmkv_cache_save_size(e.kv, 0, &cache_bytes));
    CHECK(llmkv_cache_save_file(e.kv, 0, cache_path, NULL));
    CHECK(llmkv_seq_export_size(e.kv, e.seq, &seq_bytes));
    CHECK(llmkv_seq_export_file(e.kv, e.seq, seq_path, NULL));
    /* The engine keeps the sequence handle with its request: a handle is a
       plain 32-bit id, and the loaded cache accepts it as it is. */
    saved_seq = e.seq;
    engine_destroy(&e);
    printf("2. session: prompt + %d tokens, then\n"
           "   llmkv_cache_save_file -> %s (%llu bytes)\n"
           "   llmkv_seq_export_file -> %s (%llu bytes)\n"
           "   and everything destroyed\n", n, cache_path, (unsigned long long)cache_bytes,
           seq_path, (unsigned long long)seq_bytes);

    /* 3. Restore the whole cache; the saved handle is valid in it. */
    {
        const char* paths[1];
        llmkv_load_desc ld;
        memset(&ld, 0, sizeof ld); /* default allocator and POSIX files */
        ld.logger.fn = log_to_stderr;
        paths[0] = cache_path; /* then its increments, if it had any */
        CHECK(llmkv_cache_load_file(paths, 1, &ld, &kv));
    }
    engine_attach(&e, kv, saved_seq);
    engine_check(&e, "loaded cache");
    sum_loaded = kv_checksum(&e);
    resume(&e, h);
    generate(&e, h, restored, m);
    engine_destroy(&e);
    printf("3. llmkv_cache_load_file, then %d more tokens with the saved handle\n", m);

    /* 4. Import the one sequence into a fresh, running cache: it gets a new
          handle (a fresh cache holds no page of it: n_shared is 0; a cache
          holding the same prefix would share those pages instead). */
    engine_new(&e, PROMPT_LEN + n + m);
    CHECK(llmkv_seq_free(e.kv, e.seq)); /* engine_new made an empty one; the import makes its own */
    CHECK(llmkv_seq_import_file(e.kv, seq_path, NULL, &e.seq, &n_shared));
    engine_check(&e, "imported sequence");
    sum_imported = kv_checksum(&e);
    resume(&e, h);
    generate(&e, h, imported, m);
    engine_destroy(&e);
    printf("4. llmkv_seq_import_file into a fresh cache (%u positions shared), then %d more "
           "tokens\n\n", n_shared, m);

    /* 5. Compare. */
    printf("K/V checksum of the sequence: saved %016llx, loaded %016llx, imported %016llx\n",
           (unsigned long long)sum_saved, (unsigned long long)sum_loaded,
           (unsigned long long)sum_imported);
    printf("The %d tokens after the first %d:\n", m, n);
    show("reference", reference + n, m);
    show("restored", restored, m);
    show("imported", imported, m);
    same_session = memcmp(session, reference, sizeof(llmkv_token) * (size_t)n) == 0;
    same_restored = memcmp(restored, reference + n, sizeof(llmkv_token) * (size_t)m) == 0;
    same_imported = memcmp(imported, reference + n, sizeof(llmkv_token) * (size_t)m) == 0;
    same_restored = same_restored && sum_loaded == sum_saved;
    same_imported = same_imported && sum_imported == sum_saved;
    printf("identical: %s\n", same_session && same_restored && same_imported ? "yes" : "NO");
    if (!same_session)
        fprintf(stderr, "error: the session's first %d tokens differ from the reference\n", n);
    if (!same_restored) fprintf(stderr, "error: the restored cache differs or continued differently\n");
    if (!same_imported) fprintf(stderr, "error: the imported sequence differs or continued differently\n");
    free(reference);
    free(session);
    free(restored);
    free(imported);
    return same_session && same_restored && same_imported ? 0 : 1;
}
