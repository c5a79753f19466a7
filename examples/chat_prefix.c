/* chat_prefix.c - prefix caching for a chat server, in one small program.

   A chat server sees the same tokens again and again: every conversation
   starts with one of a few system prompts, and every turn of a
   conversation resends its whole history. With the prefix index
   (desc.prefix_index) the cache remembers the K/V pages of finished
   requests under their token ids, and a new request starts from the
   longest cached prefix of its prompt: only the tokens after it are
   computed.

   The program plays such a server for a tiny made-up model:
     - the system prompts are computed once and pinned (llmkv_prefix_pin),
       so eviction never takes them;
     - conversations arrive a few per round, each stays for TURNS turns; a
       turn re-creates the conversation's sequence from its whole history
       (llmkv_seq_create_prefix), computes only the tokens the cache missed,
       generates a short reply, and frees the sequence, which publishes its
       pages for the next turn;
     - the pool is smaller than all the histories together, so the least
       recently used pages (mostly those of finished conversations) are
       evicted to make room.
   Per round it prints the hit rate, the tokens computed against what an
   engine without prefix sharing computes, the pages live sequences hold
   against what they would hold without sharing, evictions and pinned pages.

   The "model" is fake but honest about one thing: the K/V of position p
   depends on every token up to p (a hash chain), as in a transformer, so a
   cached page is only valid after exactly the same prefix. Each matched
   prefix is read back and compared with what the model produces: the
   program exits non-zero if a single value differs (it doubles as a test).

   Build and run:  cc -std=c99 -O2 examples/chat_prefix.c -o chat_prefix && ./chat_prefix */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LLMKV_IMPLEMENTATION /* in exactly one file of your program */
#include "../llmkv.h"

enum {
    N_LAYERS = 4, N_KV_HEADS = 2, HEAD_DIM = 16, ROW = N_KV_HEADS * HEAD_DIM,
    PAGE_SIZE = 16,
    N_PAGES = 320,      /* about half of what the histories would need */
    N_SYSTEM = 2,       /* system prompts */
    N_CONVS = 48,       /* conversations in all */
    NEW_PER_ROUND = 8,  /* conversations that arrive each round */
    TURNS = 5,          /* turns per conversation */
    N_ROUNDS = N_CONVS / NEW_PER_ROUND + TURNS - 1,
    BATCH = 4,          /* requests served at once (decoded in lockstep) */
    MAX_TOKENS = 1024,  /* history of one conversation, at most */
    VOCAB = 32000
};

static const uint32_t system_len[N_SYSTEM] = {150, 230}; /* not whole pages, on purpose */

/* Every fallible llmkv call returns llmkv_result: stop, saying which call
   failed and why. */
static void check(llmkv_result r, const char* call) {
    if (r != LLMKV_OK) {
        fprintf(stderr, "error: %s failed: %s\n", call, llmkv_result_string(r));
        exit(1);
    }
}
#define CHECK(call) check((call), #call)

/* splitmix64: the program's only source of "randomness", fixed seed. */
static uint64_t mix64(uint64_t z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static uint64_t rng_state = 2024;
static uint32_t rnd(uint32_t n) { /* uniform in [0, n) */
    rng_state += 0x9E3779B97F4A7C15ull;
    return (uint32_t)(mix64(rng_state) % n);
}

/* A token stream and, for each position, the model's state after it. */
typedef struct history {
    llmkv_token tokens[MAX_TOKENS];
    uint64_t state[MAX_TOKENS]; /* hash of tokens[0..p]: all that K/V at p depend on */
    uint32_t n;
} history;

static void push(history* h, llmkv_token t) {
    if (h->n == MAX_TOKENS) {
        fprintf(stderr, "error: a history passed %d tokens\n", MAX_TOKENS);
        exit(1);
    }
    h->state[h->n] = mix64((h->n ? h->state[h->n - 1] : 0) ^ (uint64_t)t);
    h->tokens[h->n++] = t;
}

/* ------------------------------------------------------------------------ */
/* The fake model                                                           */
/* ------------------------------------------------------------------------ */

/* Element i of the K (is_v 0) or V row of a layer at a position whose
   state is `state`. Values are multiples of 1/512 in [-1, 1): exact in F16,
   so what the cache returns must equal them exactly. */
static float fake_kv(uint64_t state, uint32_t layer, uint32_t i, int is_v) {
    uint64_t x = mix64(state ^ (((uint64_t)layer * ROW + i) * 2 + (uint64_t)is_v));
    return (float)(x & 1023) / 512.0f - 1.0f;
}

/* The next token the model "samples" after position p. */
static llmkv_token fake_sample(const history* h) {
    return (llmkv_token)(mix64(h->state[h->n - 1] ^ 0xABCDull) % VOCAB);
}

/* A forward pass over positions [from, h->n) of `seq` (which holds exactly
   h->n positions, the newest of them just reserved): computes their K and
   V in every layer and stores them. */
static float kbuf[MAX_TOKENS * ROW], vbuf[MAX_TOKENS * ROW];
static void forward(llmkv_cache* kv, llmkv_seq seq, const history* h, uint32_t from) {
    uint32_t layer, p, i, n = h->n - from;
    if (n == 0) return;
    for (layer = 0; layer < N_LAYERS; ++layer) {
        for (p = from; p < h->n; ++p)
            for (i = 0; i < ROW; ++i) {
                kbuf[(p - from) * ROW + i] = fake_kv(h->state[p], layer, i, 0);
                vbuf[(p - from) * ROW + i] = fake_kv(h->state[p], layer, i, 1);
            }
        /* put writes the newest n positions, F32 in, F16 stored. */
        CHECK(llmkv_put(kv, seq, layer, n, kbuf, 0, vbuf, 0, LLMKV_DTYPE_F32));
    }
}

/* The cached prefix [0, n) a new sequence starts from must hold what the
   model would have computed for this history: reads K of every layer back
   (F32) and compares exactly. */
static void verify_prefix(const llmkv_cache* kv, llmkv_seq seq, const history* h, uint32_t n) {
    uint32_t layer, p, i;
    if (n == 0) return;
    for (layer = 0; layer < N_LAYERS; ++layer) {
        CHECK(llmkv_gather(kv, seq, layer, 0, n, kbuf, 0, NULL, 0, LLMKV_DTYPE_F32));
        for (p = 0; p < n; ++p)
            for (i = 0; i < ROW; ++i)
                if (kbuf[p * ROW + i] != fake_kv(h->state[p], layer, i, 0)) {
                    fprintf(stderr, "error: cached K of layer %u, position %u, element %u is %g, "
                            "the model computes %g\n", layer, p, i, (double)kbuf[p * ROW + i],
                            (double)fake_kv(h->state[p], layer, i, 0));
                    exit(1);
                }
    }
}

/* ------------------------------------------------------------------------ */
/* The server                                                               */
/* ------------------------------------------------------------------------ */

typedef struct conversation {
    history h;        /* everything said so far */
    llmkv_seq seq;    /* its sequence, during a turn */
    uint32_t reply;   /* tokens the model still has to say this turn */
} conversation;

typedef struct counters {
    uint64_t prompt_tokens;   /* prompts received */
    uint64_t computed;        /* tokens run through the model, with llmkv */
    uint64_t computed_noshare;/* ... by an engine that recomputes every prompt */
    uint32_t peak_pages;      /* pages held by live sequences, at the peak */
    uint32_t peak_pages_noshare; /* ... by the same sequences, nothing shared */
} counters;

static history system_prompt[N_SYSTEM];
static conversation convs[N_CONVS];

static llmkv_stats stats_of(llmkv_cache* kv) {
    llmkv_stats st;
    CHECK(llmkv_cache_stats(kv, &st));
    return st;
}

/* Turn start: the user's message arrives. The new sequence starts from the
   longest cached prefix of the whole prompt; only the rest is computed. */
static void start_turn(llmkv_cache* kv, conversation* c, counters* cnt) {
    uint32_t n_user = 10 + rnd(40), cached, i;
    for (i = 0; i < n_user; ++i) push(&c->h, (llmkv_token)rnd(VOCAB));
    CHECK(llmkv_seq_create_prefix(kv, 0, c->h.tokens, c->h.n, &c->seq, &cached));
    verify_prefix(kv, c->seq, &c->h, cached);
    /* Reserve the missed positions with their token ids, then compute them. */
    CHECK(llmkv_reserve_tokens(kv, c->seq, c->h.tokens + cached, c->h.n - cached));
    forward(kv, c->seq, &c->h, cached);
    c->reply = 8 + rnd(24);
    cnt->prompt_tokens += c->h.n;
    cnt->computed += c->h.n - cached;
    cnt->computed_noshare += c->h.n;
}

/* One decode step: sample a token, reserve its slot, compute its K/V. */
static void decode_step(llmkv_cache* kv, conversation* c, counters* cnt) {
    llmkv_token t = fake_sample(&c->h);
    push(&c->h, t);
    CHECK(llmkv_reserve_tokens(kv, c->seq, &t, 1));
    forward(kv, c->seq, &c->h, c->h.n - 1);
    c->reply--;
    cnt->computed++;
    cnt->computed_noshare++;
}

/* Turn end: publish the pages, the partly filled last one too, so the next
   turn matches every token of this one; then free the sequence. Its pages
   stay cached (evictable) until the pool needs them. */
static void end_turn(llmkv_cache* kv, conversation* c) {
    CHECK(llmkv_seq_publish(kv, c->seq, 1));
    CHECK(llmkv_seq_free(kv, c->seq));
    c->seq.id = 0;
}

/* Serves a batch of requests together: prefill each, decode in lockstep. */
static void serve_batch(llmkv_cache* kv, conversation** batch, uint32_t n, counters* cnt) {
    uint32_t i, live, noshare = 0;
    llmkv_stats st;
    for (i = 0; i < n; ++i) start_turn(kv, batch[i], cnt);
    do {
        live = 0;
        for (i = 0; i < n; ++i)
            if (batch[i]->reply) {
                decode_step(kv, batch[i], cnt);
                live++;
            }
    } while (live);
    /* Peak memory of the batch: now, when every reply is complete. */
    st = stats_of(kv);
    for (i = 0; i < n; ++i) noshare += (batch[i]->h.n + PAGE_SIZE - 1) / PAGE_SIZE;
    if (st.n_pages_used > cnt->peak_pages) cnt->peak_pages = st.n_pages_used;
    if (noshare > cnt->peak_pages_noshare) cnt->peak_pages_noshare = noshare;
    for (i = 0; i < n; ++i) end_turn(kv, batch[i]);
}

int main(void) {
    llmkv_desc desc;
    llmkv_cache* kv;
    llmkv_pin pins[N_SYSTEM];
    llmkv_stats st, prev;
    counters total;
    char message[256];
    uint32_t s, i, round, n_pinned, n_evicted;

    /* A cache with the prefix index on; everything else as in quickstart. */
    memset(&desc, 0, sizeof desc);
    desc.n_layers = N_LAYERS;
    desc.n_kv_heads = N_KV_HEADS;
    desc.head_dim = HEAD_DIM;
    desc.page_size = PAGE_SIZE;
    desc.n_pages = N_PAGES;
    desc.max_seqs = BATCH;
    desc.max_seq_len = MAX_TOKENS;
    desc.prefix_index = 1;
    desc.max_pins = N_SYSTEM;
    CHECK(llmkv_cache_create(&desc, &kv));
    printf("llmkv %s chat_prefix: %d conversations of %d turns, %d system prompts,\n"
           "a pool of %d pages of %d tokens, %d requests served at once\n\n",
           llmkv_version(), N_CONVS, TURNS, N_SYSTEM, N_PAGES, PAGE_SIZE, BATCH);

    /* 1. The system prompts: computed once at start-up, published (the last,
          partly filled page too) and pinned, so no conversation ever
          recomputes them and eviction never takes them. */
    for (s = 0; s < N_SYSTEM; ++s) {
        llmkv_seq seq;
        uint32_t cached;
        for (i = 0; i < system_len[s]; ++i) push(&system_prompt[s], (llmkv_token)rnd(VOCAB));
        CHECK(llmkv_seq_create_prefix(kv, 0, system_prompt[s].tokens, system_prompt[s].n, &seq,
                                      &cached));
        CHECK(llmkv_reserve_tokens(kv, seq, system_prompt[s].tokens + cached,
                                   system_prompt[s].n - cached));
        forward(kv, seq, &system_prompt[s], cached);
        CHECK(llmkv_seq_publish(kv, seq, 1));
        CHECK(llmkv_seq_free(kv, seq));
        CHECK(llmkv_prefix_pin(kv, 0, system_prompt[s].tokens, system_prompt[s].n, &pins[s],
                               &n_pinned));
        if (n_pinned != system_prompt[s].n) {
            fprintf(stderr, "error: pinned %u tokens of a %u-token system prompt\n", n_pinned,
                    system_prompt[s].n);
            return 1;
        }
    }
    for (i = 0; i < N_CONVS; ++i) convs[i].h = system_prompt[i % N_SYSTEM];
    st = stats_of(kv);
    printf("System prompts of %u and %u tokens computed once and pinned: %u pages.\n\n",
           system_len[0], system_len[1], st.n_pages_pinned);

    /* 2. The rounds. Conversation c arrives in round c / NEW_PER_ROUND and
          takes one turn per round until it has had TURNS; the order within
          a round is random. */
    printf("Per round: the turns served; hit%%, the prompt tokens found cached; the tokens\n"
           "run through the model with llmkv / by an engine that recomputes every prompt;\n"
           "the pages the requests in flight held at the peak with llmkv / without sharing;\n"
           "then pages cached, evicted so far and pinned (llmkv_cache_stats).\n\n");
    printf("%5s %6s %6s %15s %17s %10s %9s %7s\n", "round", "turns", "hit%",
           "computed/noshr", "live pages/noshr", "cached pg", "evicted", "pinned");
    memset(&total, 0, sizeof total);
    prev = stats_of(kv);
    for (round = 0; round < N_ROUNDS; ++round) {
        conversation* active[N_CONVS];
        uint32_t n_active = 0, first, end;
        counters cnt;
        double hit;
        memset(&cnt, 0, sizeof cnt);
        end = (round + 1) * NEW_PER_ROUND;
        first = round + 1 > TURNS ? (round + 1 - TURNS) * NEW_PER_ROUND : 0;
        for (i = first; i < end && i < N_CONVS; ++i) active[n_active++] = &convs[i];
        for (i = n_active; i > 1; --i) { /* shuffle */
            uint32_t j = rnd(i);
            conversation* t = active[i - 1];
            active[i - 1] = active[j];
            active[j] = t;
        }
        for (i = 0; i < n_active; i += BATCH)
            serve_batch(kv, active + i, n_active - i < BATCH ? n_active - i : (uint32_t)BATCH, &cnt);

        st = stats_of(kv);
        hit = (double)(st.prompt_tokens_matched - prev.prompt_tokens_matched) /
              (double)(st.prompt_tokens_matched + st.prompt_tokens_missed -
                       prev.prompt_tokens_matched - prev.prompt_tokens_missed);
        printf("%5u %6u %5.1f%% %7llu/%-7llu %8u/%-8u %10u %9llu %7u\n", round, n_active,
               100.0 * hit, (unsigned long long)cnt.computed,
               (unsigned long long)cnt.computed_noshare, cnt.peak_pages, cnt.peak_pages_noshare,
               st.n_pages_cached, (unsigned long long)st.n_evictions, st.n_pages_pinned);
        total.prompt_tokens += cnt.prompt_tokens;
        total.computed += cnt.computed;
        total.computed_noshare += cnt.computed_noshare;
        if (cnt.peak_pages > total.peak_pages) total.peak_pages = cnt.peak_pages;
        if (cnt.peak_pages_noshare > total.peak_pages_noshare)
            total.peak_pages_noshare = cnt.peak_pages_noshare;
        prev = st;
    }

    /* 3. Totals. */
    st = stats_of(kv);
    printf("\nPrompt tokens: %llu, of which %llu found cached: hit rate %.1f%%\n",
           (unsigned long long)total.prompt_tokens, (unsigned long long)st.prompt_tokens_matched,
           100.0 * st.hit_rate);
    printf("Tokens computed (prompts + replies): %llu with llmkv, %llu without prefix sharing "
           "(%.1fx fewer)\n", (unsigned long long)total.computed,
           (unsigned long long)total.computed_noshare,
           (double)total.computed_noshare / (double)total.computed);
    printf("Pages held by live requests at the peak: %u with llmkv, %u without sharing "
           "(%u saved)\n", total.peak_pages, total.peak_pages_noshare,
           total.peak_pages_noshare - total.peak_pages);
    printf("Pages evicted: %llu; pages pinned: %u; cached now: %u of %u\n",
           (unsigned long long)st.n_evictions, st.n_pages_pinned, st.n_pages_cached,
           st.n_pages_total);
    if (total.computed >= total.computed_noshare || st.n_evictions == 0) {
        fprintf(stderr, "error: expected prefix hits and evictions\n");
        return 1;
    }

    /* 4. The invariant checker, then shut down: unpin, evict everything,
          and every page is free again. */
    if (llmkv_cache_check(kv, message, sizeof message) != LLMKV_OK) {
        fprintf(stderr, "error: invariant violated: %s\n", message);
        return 1;
    }
    for (s = 0; s < N_SYSTEM; ++s) CHECK(llmkv_prefix_unpin(kv, pins[s]));
    CHECK(llmkv_prefix_evict(kv, UINT32_MAX, &n_evicted));
    st = stats_of(kv);
    printf("Unpinned and evicted %u pages: %u of %u pages free.\n", n_evicted, st.n_pages_free,
           st.n_pages_total);
    if (st.n_pages_free != st.n_pages_total || st.n_pages_cached != 0) {
        fprintf(stderr, "error: pages left after evicting everything\n");
        return 1;
    }
    llmkv_cache_destroy(kv);
    printf("Done.\n");
    return 0;
}
