// A lower tier written outside kvtier that lacks a member the cache calls is refused where the
// cache is instantiated, and the first error line names the member.
#include <kvtier/kvtier.hpp>

#include <cstddef>
#include <span>

struct user_store {
  static constexpr const char* name = "user_store";
  static constexpr bool is_memory = false;
  struct config {};
  template <class Eviction>
  class impl {
   public:
    impl(const config&, const kvtier::tier::context&) {}
    std::size_t probe(std::span<const kvtier::chunk_key>) { return 0; }
    void read_batch(std::span<kvtier::tier::read_job> jobs) {
      for (auto& j : jobs) j.status = kvtier::tier::read_status::missing;
    }
#ifndef KVTIER_COMPILE_FAIL
    void write_batch(std::span<kvtier::tier::write_job> jobs) {
      for (auto& j : jobs) j.ok = false;
    }
#endif
    std::size_t remove(std::span<const kvtier::chunk_key>) { return 0; }
    std::size_t remove_all() { return 0; }
  };
};

using c = kvtier::cache<kvtier::opt::tiers<kvtier::tier::host, user_store>>;
static_assert(c::tier_count == 2);
int main() {}
