// A layout description whose rows are not contiguous is rejected with a one-line message.
#include <kvtier/kvtier.hpp>
struct rows_not_last {
  static constexpr const char* name = "rows_not_last";
  static constexpr kvtier::layout::tensors scope = kvtier::layout::tensors::per_layer;
#ifdef KVTIER_COMPILE_FAIL
  static constexpr std::array dims{kvtier::layout::dim::kv, kvtier::layout::dim::block,
                                   kvtier::layout::dim::elem, kvtier::layout::dim::slot,
                                   kvtier::layout::dim::head};
#else
  static constexpr std::array dims{kvtier::layout::dim::kv, kvtier::layout::dim::block,
                                   kvtier::layout::dim::slot, kvtier::layout::dim::head,
                                   kvtier::layout::dim::elem};
#endif
};
using c = kvtier::cache<kvtier::opt::layout<rows_not_last>>;
static_assert(c::tier_count == 1);
int main() {}
