#pragma once
// tier::shared_host: holding chunks for reads in place that span calls (a layer-wise retrieve),
// and the held record's accessors. Included by shared_host.hpp.

#include "kvtier/tier/shared_host.hpp"

namespace kvtier::tier {

template <class KeyOf, class TokensOf>
shared_host::held shared_host::handle::hold(std::size_t n, KeyOf&& key_of, TokensOf&& tokens_of,
                                            std::size_t* corrupt) {
  check_process();
  maybe_reap();
  held h;
  if (n == 0 || !lock()) return h;
  std::uint32_t l = ix_.lease_take(me_);
  if (l == detail_shared::nil) {
    unlock();
    reap_now();
    if (!lock()) return h;
    l = ix_.lease_take(me_);
    if (l == detail_shared::nil) {
      unlock();
      return h;
    }
  }
  auto& c = ix_.hdr().counters;
  const std::size_t cap = std::min<std::size_t>(n, ix_.lease_capacity());
  std::uint32_t k = 0;
  for (; k < cap; ++k) {
    const std::uint32_t i = ix_.find_ready(key_of(k));
    if (i == detail_shared::nil) {
      ++c.misses;
      break;
    }
    const std::size_t tokens = tokens_of(k);
    if (ix_.at(i).tokens != tokens || ctx_.format.bytes(tokens) > seg_.hdr().slot_bytes) {
      ++c.corrupt;  // a record of this key that is not this chunk
      if (corrupt != nullptr) ++*corrupt;
      break;
    }
    ix_.lease_add(l, i);
    ++c.hits;
  }
  if (k == 0) {
    (void)ix_.lease_drop(l);
    unlock();
    return h;
  }
  h.h_ = this;
  h.rec_ = l;
  h.id_ = ix_.lease(l).id;
  h.chunks_ = k;
  unlock();
  if (!cfg_.verify) return h;
  for (std::uint32_t j = 0; j < k; ++j) {
    // The entry's checksum and bytes are fixed while the lease references it.
    const std::uint32_t slot = ix_.lease_slots(l)[j];
    const chunk_key key = key_of(j);
    if (kvtier::detail::payload_checksum(key, seg_.data(slot), ctx_.format.bytes(tokens_of(j))) ==
        ix_.at(slot).checksum) {
      continue;
    }
    h.chunks_ = j;
    if (corrupt != nullptr) ++*corrupt;
    if (lock()) {
      ix_.remove(slot);
      ++c.corrupt;
      unlock();
    }
    break;
  }
  return h;
}

inline const std::byte* shared_host::held::data(std::uint32_t k) const noexcept {
  return h_->seg_.data(h_->ix_.lease_slots(rec_)[k]);
}

inline void shared_host::held::reset() noexcept {
  if (h_ != nullptr) (void)h_->drop_record(rec_, id_);
  h_ = nullptr;
  chunks_ = 0;
}

}  // namespace kvtier::tier
