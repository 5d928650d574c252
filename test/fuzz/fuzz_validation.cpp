// libFuzzer target: what the cache checks of what an engine passes: model_shape, cache_config,
// and engine tensors (shape and strides) through the layout view. Each check must either accept
// or throw kvtier::error (never another exception, never UB); a tensor the view accepts must
// span at most layout::max_tensor_bytes, computed here independently in 128 bits.
#include <kvtier/kvtier.hpp>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

namespace d = kvtier::detail;
using nhd = kvtier::layout::vllm_flash_nhd;  // per layer [2, NB, BS, H, D]

struct reader {
  const std::uint8_t* p;
  std::size_t n;
  template <class T>
  T get() {
    T v{};
    const std::size_t k = n < sizeof v ? n : sizeof v;
    std::memcpy(&v, p, k);
    p += k, n -= k;
    return v;
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  reader r{data, size};
  kvtier::model_shape m;
  // Small values are more interesting than uniform 32-bit ones: a mode byte picks the range.
  const auto mode = r.get<std::uint8_t>();
  for (std::uint32_t* f : {&m.layers, &m.kv_heads, &m.head_size, &m.dtype_size, &m.block_size}) {
    *f = r.get<std::uint32_t>();
    if (mode & 1) *f %= 17;
  }
  kvtier::cache_config cfg;
  cfg.max_tokens = r.get<std::uint64_t>();
  cfg.max_inflight = r.get<std::uint64_t>();
  cfg.write_queue_depth = r.get<std::uint64_t>();
  cfg.prefetch_queue_depth = r.get<std::uint64_t>();
  cfg.write_hold_percent = r.get<std::uint32_t>();
  try {
    (void)d::checked_config(cfg);
  } catch (const kvtier::error&) {
  }
  try {
    (void)d::checked_model<16, 0, 2>(m);
  } catch (const kvtier::error&) {
    return 0;
  }
  std::vector<std::int64_t> shape(5), strides;
  for (auto& s : shape) s = r.get<std::int64_t>();
  if (mode & 2) {  // the model's own extents, the block count fuzzed: the checks past extents
    const auto want = kvtier::layout::shape_of<nhd>(m, 1);
    for (std::size_t i = 0; i < 5; ++i) {
      if (i != 1) shape[i] = want[i];
    }
  }
  if (mode & 4) {
    strides.resize(5);
    for (auto& s : strides) s = r.get<std::int64_t>();
    if (mode & 8) strides[4] = 1;
  }
  static int dummy;
  std::vector<void*> ptrs(m.layers <= 64 ? m.layers : 1, &dummy);
  const kvtier::engine_kv kv{ptrs, shape, strides};
  try {
    const kvtier::layout::view<nhd> v(m, kv);
    const auto st = strides.empty() ? std::vector<std::int64_t>{} : strides;
    // Accepted: the span, first element to last, fits the limit.
    unsigned __int128 last = 0, dense = 1;
    for (std::size_t i = 5; i-- > 0;) {
      const unsigned __int128 stride = st.empty() ? dense : static_cast<unsigned __int128>(st[i]);
      if (shape[i] <= 0) __builtin_trap();
      last += static_cast<unsigned __int128>(shape[i] - 1) * stride;
      dense *= static_cast<unsigned __int128>(shape[i]);
    }
    if ((last + 1) * m.dtype_size > kvtier::layout::max_tensor_bytes) __builtin_trap();
    std::int32_t table[1] = {0};
    try {
      v.check_block_table(table, 0, m.block_size);
    } catch (const kvtier::error&) {
    }
  } catch (const kvtier::error&) {
  }
  return 0;
}
