// The first tier must be a memory tier.
#include <kvtier/kvtier.hpp>
#ifdef KVTIER_COMPILE_FAIL
using c = kvtier::cache<kvtier::opt::tiers<kvtier::tier::local_disk, kvtier::tier::host>>;
#else
using c = kvtier::cache<kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::local_disk>>;
#endif
static_assert(c::tier_count == 2);
int main() {}
