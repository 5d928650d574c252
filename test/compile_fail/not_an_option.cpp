// Only kvtier::opt tags are accepted in the option list.
#include <kvtier/kvtier.hpp>
#ifdef KVTIER_COMPILE_FAIL
using c = kvtier::cache<int>;
#else
using c = kvtier::cache<kvtier::opt::hasher<kvtier::key::xxh3_hasher>>;
#endif
static_assert(c::tier_count == 1);
int main() {}
