// Every group of a group_cache uses one chunk size.
#include <kvtier/kvtier.hpp>
using a = kvtier::cache<kvtier::opt::chunk_tokens<64>>;
#ifdef KVTIER_COMPILE_FAIL
using b = kvtier::cache<kvtier::opt::chunk_tokens<32>>;
#else
using b = kvtier::cache<kvtier::opt::chunk_tokens<64>>;
#endif
using g = kvtier::group_cache<a, b>;
static_assert(g::group_count == 2);
int main() {}
