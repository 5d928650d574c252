// The caches with tier chain {kvtier::tier::host, kvtier::tier::local_disk}, for every built chunk
// size and layout.
#include "box.hpp"

namespace kvtier_py {

std::shared_ptr<cache_base> make_host_disk(const settings& s) {
  return make_cache<kvtier::tier::host, kvtier::tier::local_disk>(s);
}

}  // namespace kvtier_py
