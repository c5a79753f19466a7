/* A counting, failing, leak-tracking allocator for the tests that inject
   allocation faults (test_fault.c, test_q4c.c): fail_at fails the k-th
   call, fail_all every call; every block is filled with 0xCD (no zeroed
   memory for free), and frees are checked against what was returned. */
#ifndef LLMKV_TEST_FALLOC_H
#define LLMKV_TEST_FALLOC_H

#include "test_util.h"

#include <stdint.h>


typedef struct fblock {
    unsigned char* ptr;   /* what alloc returned */
    void* raw;            /* what malloc returned */
    size_t size;
} fblock;

typedef struct falloc {
    long calls;           /* alloc calls so far */
    long fail_at;         /* fail the call with this number (1-based); 0: none */
    int fail_all;         /* fail every call */
    long frees;
    int errors;           /* bad alignment requests, unknown or mismatched frees */
    fblock* blocks;       /* outstanding blocks */
    size_t n_blocks, cap;
} falloc;

static inline void* f_alloc(size_t size, size_t align, void* user) {
    falloc* a = (falloc*)user;
    unsigned char* raw;
    unsigned char* p;
    a->calls++;
    if (align == 0 || (align & (align - 1)) != 0 || align > 4096) {
        fprintf(stderr, "  allocator: bad alignment request %lu\n", (unsigned long)align);
        a->errors++;
        align = 64;
    }
    if (a->fail_all || a->calls == a->fail_at) return NULL;
    if (a->n_blocks == a->cap) {
        size_t nc = a->cap ? a->cap * 2 : 16;
        fblock* nb = (fblock*)realloc(a->blocks, nc * sizeof(fblock));
        if (!nb) return NULL;
        a->blocks = nb;
        a->cap = nc;
    }
    raw = (unsigned char*)malloc(size + align);
    if (!raw) return NULL;
    p = raw + (align - (size_t)((uintptr_t)raw % align)) % align;
    memset(p, 0xCD, size); /* no zeroed memory for free */
    a->blocks[a->n_blocks].ptr = p;
    a->blocks[a->n_blocks].raw = raw;
    a->blocks[a->n_blocks].size = size;
    a->n_blocks++;
    return p;
}

static inline void f_free(void* ptr, size_t size, void* user) {
    falloc* a = (falloc*)user;
    size_t i;
    a->frees++;
    for (i = 0; i < a->n_blocks; ++i)
        if (a->blocks[i].ptr == (unsigned char*)ptr) {
            if (a->blocks[i].size != size) {
                fprintf(stderr, "  allocator: free with size %lu of a %lu-byte block\n", (unsigned long)size,
                        (unsigned long)a->blocks[i].size);
                a->errors++;
            }
            free(a->blocks[i].raw);
            a->blocks[i] = a->blocks[--a->n_blocks];
            return;
        }
    fprintf(stderr, "  allocator: free of a pointer it never returned (or freed twice)\n");
    a->errors++;
}

static inline void f_init(falloc* a) { memset(a, 0, sizeof *a); }

static inline void f_done(falloc* a) {
    size_t i;
    for (i = 0; i < a->n_blocks; ++i) free(a->blocks[i].raw);
    free(a->blocks);
    memset(a, 0, sizeof *a);
}

static inline llmkv_allocator f_allocator(falloc* a) {
    llmkv_allocator r;
    r.alloc = f_alloc;
    r.free = f_free;
    r.user = a;
    return r;
}

#endif /* LLMKV_TEST_FALLOC_H */
