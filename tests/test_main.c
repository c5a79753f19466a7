/* Test runner: runs every suite (or those whose test names contain argv[1])
   and ends with the line "N passed, N failed" (", N skipped" when some were). Exit status 0 only when no
   test failed. Set LLMKV_TEST_VERBOSE=1 to print each test's name. */
#include "test_util.h"

int main(int argc, char** argv) {
    tst t;
    memset(&t, 0, sizeof t);
    t.filter = argc > 1 ? argv[1] : NULL;
    t.verbose = getenv("LLMKV_TEST_VERBOSE") != NULL;
    suite_cache(&t);
    suite_model(&t);
    suite_fault(&t);
    suite_attn(&t);
    suite_quant(&t);
    suite_q4c(&t);
    suite_prefix(&t);
    suite_threads(&t);
    suite_persist(&t);
    suite_format(&t);
    suite_llama(&t);
    /* Skipped tests said why on their SKIP lines above. */
    if (t.skipped) printf("%d passed, %d failed, %d skipped\n", t.passed, t.failed, t.skipped);
    else printf("%d passed, %d failed\n", t.passed, t.failed);
    return t.failed ? 1 : 0;
}
