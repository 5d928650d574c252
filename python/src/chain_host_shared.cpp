// The caches with tier chain {kvtier::tier::host, kvtier::tier::shared_host}, for every built chunk
// size and layout.
#include "box.hpp"

namespace kvtier_py {

std::shared_ptr<cache_base> make_host_shared(const settings& s) {
  return make_cache<kvtier::tier::host, kvtier::tier::shared_host>(s);
}

std::shared_ptr<lookup_base> make_shared_lookup(const settings& s) {
  return with_chunk(s.chunk_tokens, [&]<std::size_t N>() {
    return with_layout(s.layout, [&]<class L>() -> std::shared_ptr<lookup_base> {
      using C = kvtier::cache<kvtier::opt::chunk_tokens<N>, kvtier::opt::layout<L>,
                              kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::shared_host>>;
      return std::make_shared<lookup_box<C>>(s);
    });
  });
}

}  // namespace kvtier_py
