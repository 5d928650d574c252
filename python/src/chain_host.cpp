// The caches with tier chain {kvtier::tier::host}, for every built chunk size and layout.
#include "box.hpp"

namespace kvtier_py {

std::shared_ptr<cache_base> make_host(const settings& s) {
  return make_cache<kvtier::tier::host>(s);
}

}  // namespace kvtier_py
