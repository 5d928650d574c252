// A layout policy must model kvtier::layout_policy where the option is written.
#include <kvtier/kvtier.hpp>
struct not_a_layout {
  static constexpr const char* name = "nope";
};
#ifdef KVTIER_COMPILE_FAIL
using c = kvtier::cache<kvtier::opt::layout<not_a_layout>>;
#else
using c = kvtier::cache<kvtier::opt::layout<kvtier::layout::trtllm_packed>>;
#endif
static_assert(c::tier_count == 1);
int main() {}
