// An engine-shaped CUDA program: KV in vLLM's flash NHD layout on the GPU, a pinned host tier,
// and layer-wise pipelining on both sides.
//
// Request 1 "prefills" layer by layer on the compute stream and hands each layer to kvtier as
// soon as it is enqueued (store_layer): the copy of layer l runs on kvtier's transfer stream
// while layer l+1 computes. Request 2 shares the prompt: kvtier loads its KV into other blocks,
// layer by layer (retrieve_layer), and each layer's "attention" waits for its own layer only.
// The program checks that request 2 sees exactly the KV request 1 computed.
#include <kvtier/cuda.cuh>

#include <cstdio>
#include <numeric>
#include <vector>

namespace {

void ok(cudaError_t e) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "CUDA error: %s\n", cudaGetErrorString(e));
    std::exit(1);
  }
}

// Stand-in for a layer's KV projection: writes a value derived from (layer, block, element).
__global__ void prefill_layer(unsigned short* kv, const int* blocks, int nblocks, int block_elems,
                              int plane_elems, int layer) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < 2 * nblocks * block_elems;
       i += gridDim.x * blockDim.x) {
    const int plane = i / (nblocks * block_elems), r = i % (nblocks * block_elems);
    const int b = blocks[r / block_elems], e = r % block_elems;
    kv[plane * plane_elems + b * block_elems + e] =
        static_cast<unsigned short>(layer * 7919 + (r / block_elems) * 131 + e + plane);
  }
}

// Stand-in for attention over a layer's KV: sums it into `sum`.
__global__ void attend_layer(const unsigned short* kv, const int* blocks, int nblocks,
                             int block_elems, int plane_elems, unsigned long long* sum) {
  unsigned long long s = 0;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < 2 * nblocks * block_elems;
       i += gridDim.x * blockDim.x) {
    const int plane = i / (nblocks * block_elems), r = i % (nblocks * block_elems);
    s += kv[plane * plane_elems + blocks[r / block_elems] * block_elems + r % block_elems] *
         static_cast<unsigned long long>(r % 97 + 1);
  }
  atomicAdd(sum, s);
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("cuda_pipeline: no CUDA device here; nothing to run\n");
    return 77;
  }
  // A Llama-3-8B-like shape, shortened to 8 layers: 8 KV heads of 128 bf16, blocks of 16.
  const kvtier::model_shape model{8, 8, 128, 2, 16};
  const std::int64_t num_blocks = 256;
  using cache_t = kvtier::cache<kvtier::opt::chunk_tokens<256>,
                                kvtier::opt::layout<kvtier::layout::vllm_flash_nhd>,
                                kvtier::opt::tiers<kvtier::tier::pinned_host>>;
  cache_t cache(model, {"example/llama-like", "bf16", 0, 1, ""}, {{std::size_t{256} << 20}});

  // The engine's paged KV: one [2, num_blocks, 16, 8, 128] tensor per layer.
  const int block_elems = 16 * 8 * 128, plane_elems = static_cast<int>(num_blocks) * block_elems;
  std::vector<void*> layers(model.layers);
  for (auto& p : layers) ok(cudaMalloc(&p, 2ull * plane_elems * 2));
  const std::int64_t shape[] = {2, num_blocks, 16, 8, 128};
  const kvtier::engine_kv kv{layers, shape};

  const std::size_t prompt = 1024;  // 4 chunks
  std::vector<kvtier::token_id> tokens(prompt);
  std::iota(tokens.begin(), tokens.end(), 100);
  std::vector<std::int32_t> table1(prompt / 16), table2(prompt / 16);
  std::iota(table1.begin(), table1.end(), 0);
  std::iota(table2.begin(), table2.end(), 128);  // request 2 gets other blocks
  int *d_t1, *d_t2;
  ok(cudaMalloc(&d_t1, table1.size() * 4));
  ok(cudaMalloc(&d_t2, table2.size() * 4));
  ok(cudaMemcpy(d_t1, table1.data(), table1.size() * 4, cudaMemcpyHostToDevice));
  ok(cudaMemcpy(d_t2, table2.data(), table2.size() * 4, cudaMemcpyHostToDevice));
  unsigned long long* sums;
  ok(cudaMalloc(&sums, 2 * model.layers * sizeof(unsigned long long)));
  ok(cudaMemset(sums, 0, 2 * model.layers * sizeof(unsigned long long)));

  cudaStream_t compute;
  ok(cudaStreamCreate(&compute));
  const kvtier::gpu::stream_order order{compute};
  const int nb = static_cast<int>(table1.size());

  // Request 1: prefill, storing each layer as soon as it is enqueued.
  {
    auto store = cache.begin_store(tokens, kv, table1, order);
    for (std::uint32_t l = 0; l < model.layers; ++l) {
      prefill_layer<<<256, 256, 0, compute>>>(static_cast<unsigned short*>(layers[l]), d_t1, nb,
                                              block_elems, plane_elems, static_cast<int>(l));
      attend_layer<<<256, 256, 0, compute>>>(static_cast<unsigned short*>(layers[l]), d_t1, nb,
                                             block_elems, plane_elems, sums + l);
      store.store_layer(l);  // copies layer l once the compute stream has produced it
    }
    std::printf("request 1: storing %zu tokens layer by layer\n", store.finish());
  }
  cache.synchronize();  // (a real engine would just go on; lookups see the chunks once copied)

  // Request 2: same prompt; load layer l right before the layer that needs it.
  auto hit = cache.lookup(tokens);
  std::printf("request 2: %zu of %zu tokens cached\n", hit.tokens(), prompt);
  auto load = cache.begin_retrieve(hit, kv, table2, order);
  for (std::uint32_t l = 0; l < model.layers; ++l) {
    load.retrieve_layer(l);  // the compute stream waits for this layer's copy only
    attend_layer<<<256, 256, 0, compute>>>(static_cast<unsigned short*>(layers[l]), d_t2, nb,
                                           block_elems, plane_elems, sums + model.layers + l);
  }
  const std::size_t loaded = load.finish();
  ok(cudaStreamSynchronize(compute));

  std::vector<unsigned long long> h(2 * model.layers);
  ok(cudaMemcpy(h.data(), sums, h.size() * sizeof(h[0]), cudaMemcpyDeviceToHost));
  bool same = loaded == prompt;
  for (std::uint32_t l = 0; l < model.layers; ++l) same = same && h[l] == h[model.layers + l];
  const auto st = cache.stats();
  std::printf("request 2: loaded %zu tokens; attention saw %s KV; pinned tier holds %zu chunks\n",
              loaded, same ? "the same" : "DIFFERENT",
              static_cast<std::size_t>(st.tiers[0].used_chunks));
  for (void* p : layers) cudaFree(p);
  cudaFree(d_t1);
  cudaFree(d_t2);
  cudaFree(sums);
  cudaStreamDestroy(compute);
  return same ? 0 : 1;
}
