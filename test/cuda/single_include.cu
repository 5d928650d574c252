// The generated GPU single header is self-contained: one include, one cache type with a GPU tier.
#include <kvtier/kvtier_cuda.cuh>
using C = kvtier::cache<kvtier::opt::tiers<kvtier::tier::pinned_host>>;
int main() { return sizeof(C) > 0 ? 0 : 1; }
