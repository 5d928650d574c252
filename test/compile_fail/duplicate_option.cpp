// A duplicated option is rejected with a one-line message.
#include <kvtier/kvtier.hpp>
#ifdef KVTIER_COMPILE_FAIL
using c = kvtier::cache<kvtier::opt::chunk_tokens<16>, kvtier::opt::chunk_tokens<32>>;
#else
using c = kvtier::cache<kvtier::opt::chunk_tokens<16>>;
#endif
static_assert(c::chunk_tokens > 0);
int main() {}
