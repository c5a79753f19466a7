/* The one translation unit of the test binary that holds the implementation. */
#define LLMKV_IMPLEMENTATION
#include "../llmkv.h"
