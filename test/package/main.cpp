// Builds a cache through kvtier::kvtier as a consumer project would, and round-trips a chunk.
#include <kvtier/kvtier.hpp>

#include <cstdio>
#include <vector>

int main() {
  const kvtier::model_shape m{1, 1, 8, 2, 4};
  kvtier::cache<kvtier::opt::chunk_tokens<8>> cache(m, {"consumer", "bf16", 0, 1, ""}, {{1 << 16}});
  std::vector<std::int64_t> shape{2, 4, 4, 1, 8};
  std::vector<std::byte> layer(2 * 4 * 4 * 8 * 2);
  for (std::size_t i = 0; i < layer.size(); ++i) layer[i] = std::byte(i);
  std::vector<void*> ptrs{layer.data()};
  std::vector<kvtier::token_id> toks(8, 1);
  std::vector<std::int32_t> bt{2, 0};
  const auto stored = cache.store(toks, {ptrs, shape}, bt);
  auto lease = cache.lookup(toks);
  const auto want = layer;
  std::fill(layer.begin(), layer.end(), std::byte{0});
  const auto loaded = cache.retrieve(lease, {ptrs, shape}, bt);
  // Only blocks 2 and 0 were loaded; compare those.
  bool ok = stored == 8 && loaded == 8;
  for (int kv = 0; kv < 2; ++kv)
    for (int b : {0, 2})
      for (int i = 0; i < 4 * 8 * 2; ++i) {
        const std::size_t off = static_cast<std::size_t>((kv * 4 + b) * 4 * 8 * 2 + i);
        ok &= layer[off] == want[off];
      }
  std::printf("consumer: %s\n", ok ? "ok" : "FAILED");
  return ok ? 0 : 1;
}
