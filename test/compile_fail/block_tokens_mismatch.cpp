// A chunk size that is not a multiple of a compile-time block size does not compile.
#include <kvtier/kvtier.hpp>
#ifdef KVTIER_COMPILE_FAIL
using c = kvtier::cache<kvtier::opt::chunk_tokens<64>, kvtier::opt::block_tokens<48>>;
#else
using c = kvtier::cache<kvtier::opt::chunk_tokens<96>, kvtier::opt::block_tokens<48>>;
#endif
static_assert(c::block_tokens == 48);
int main() {}
