// The smallest complete use of kvtier: the code quoted in the README.
#include <kvtier/kvtier.hpp>

#include <cstdio>
#include <vector>

int main() {
  // The engine's model and its paged KV: vLLM flash layout, one [2, NB, BS, H, D] tensor a layer.
  const kvtier::model_shape model{
      .layers = 2, .kv_heads = 8, .head_size = 128, .dtype_size = 2, .block_size = 16};
  const std::int64_t blocks = 64;
  std::vector<std::int64_t> shape{2, blocks, 16, 8, 128};
  std::vector<std::vector<std::byte>> layers(2,
                                             std::vector<std::byte>(2 * blocks * 16 * 8 * 128 * 2));
  std::vector<void*> tensors{layers[0].data(), layers[1].data()};
  const kvtier::engine_kv kv{tensors, shape};

  using cache_t = kvtier::cache<kvtier::opt::chunk_tokens<256>,
                                kvtier::opt::layout<kvtier::layout::vllm_flash_nhd>,
                                kvtier::opt::tiers<kvtier::tier::host, kvtier::tier::local_disk>>;
  cache_t cache(model, kvtier::salt{.model_id = "my-model@rev", .kv_dtype = "bf16"},
                {kvtier::tier::host::config{.capacity_bytes = 256 << 20},
                 kvtier::tier::local_disk::config{.path = "/tmp/kvtier-minimal",
                                                  .capacity_bytes = std::size_t{1} << 30}});

  std::vector<kvtier::token_id> prompt(600, 42);  // the request's token ids
  std::vector<std::int32_t> block_table{3,  9,  4,  17, 5,  6,  7,  8,  10, 11,  // its blocks
                                        12, 13, 14, 15, 16, 18, 19, 20, 21, 22, 23, 24, 25, 26,
                                        27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40};
  // After prefill: store the full chunks (512 of the 600 tokens).
  const std::size_t stored = cache.store(prompt, kv, block_table);

  // A later request with the same prefix: find it, load it into that request's blocks.
  auto hit = cache.lookup(prompt);
  const std::size_t loaded = cache.retrieve(hit, kv, block_table);
  std::printf("stored %zu tokens, loaded %zu tokens\n", stored, loaded);
  return loaded == stored ? 0 : 1;
}
