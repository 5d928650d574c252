#pragma once
// xxHash, inlined (XXH_INLINE_ALL) so a header-only kvtier links nothing; safe next to an engine
// that includes xxhash.h itself (the header supports both modes in one translation unit).

#ifndef XXH_INLINE_ALL
#define XXH_INLINE_ALL
#define KVTIER_DEFINED_XXH_INLINE_ALL
#endif
#include <xxhash.h>
#ifdef KVTIER_DEFINED_XXH_INLINE_ALL
#undef XXH_INLINE_ALL
#undef KVTIER_DEFINED_XXH_INLINE_ALL
#endif
