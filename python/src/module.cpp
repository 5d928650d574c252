// kvtier._kvtier: the nanobind module behind the Python package. Tensors arrive as DLPack
// (torch tensors, numpy arrays) and are described to kvtier in place, never copied; every call
// that moves bytes or waits releases the GIL. The configuration arrives as the dict that
// kvtier/config.py has checked.
#include "box.hpp"

#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/unique_ptr.h>
#include <nanobind/stl/vector.h>

#include <chrono>

namespace nb = nanobind;
using namespace nb::literals;

namespace kvtier_py {
namespace {

// ---- configuration ---------------------------------------------------------------------------

template <class T>
T get(const nb::dict& d, const char* key, T fallback) {
  return d.contains(key) ? nb::cast<T>(d[key]) : fallback;
}
nb::dict section(const nb::dict& d, const char* key) {
  return d.contains(key) ? nb::cast<nb::dict>(d[key]) : nb::dict();
}

settings from_dict(const nb::dict& d) {
  settings s;
  s.chunk_tokens = get<std::size_t>(d, "chunk_tokens", 256);
  s.layout = get<std::string>(d, "layout", "vllm_cpu");
  const nb::dict m = section(d, "model");
  s.model.layers = get<std::uint32_t>(m, "layers", 0);
  s.model.kv_heads = get<std::uint32_t>(m, "kv_heads", 0);
  s.model.head_size = get<std::uint32_t>(m, "head_size", 0);
  s.model.dtype_size = get<std::uint32_t>(m, "dtype_size", 0);
  s.model.block_size = get<std::uint32_t>(m, "block_size", 0);
  const nb::dict k = section(d, "salt");
  s.salt.model_id = get<std::string>(k, "model_id", "");
  s.salt.kv_dtype = get<std::string>(k, "kv_dtype", "");
  s.salt.tp_rank = get<std::uint32_t>(k, "tp_rank", 0);
  s.salt.tp_size = get<std::uint32_t>(k, "tp_size", 1);
  s.salt.tenant = get<std::string>(k, "tenant", "");
  s.cfg.max_tokens = get<std::size_t>(d, "max_tokens", s.cfg.max_tokens);
  s.cfg.max_inflight = get<std::size_t>(d, "max_inflight", s.cfg.max_inflight);
  s.cfg.max_pins = get<std::size_t>(d, "max_pins", s.cfg.max_pins);
  s.cfg.write_queue_depth = get<std::size_t>(d, "write_queue_depth", s.cfg.write_queue_depth);
  s.cfg.store_partial_tail = get<bool>(d, "store_partial_tail", false);
  const std::string mode = get<std::string>(d, "write_mode", "write_through");
  s.cfg.mode =
      mode == "write_back" ? kvtier::write_mode::write_back : kvtier::write_mode::write_through;
  const nb::dict h = section(d, "host");
  s.host.capacity_bytes = get<std::size_t>(h, "capacity_bytes", s.host.capacity_bytes);
  s.host.prefault = get<bool>(h, "prefault", s.host.prefault);
  if (d.contains("shared_host")) {
    const nb::dict x = section(d, "shared_host");
    kvtier::tier::shared_host::config c;
    c.name = get<std::string>(x, "name", "");
    c.capacity_bytes = get<std::size_t>(x, "capacity_bytes", c.capacity_bytes);
    c.processes = get<std::size_t>(x, "processes", c.processes);
    c.create = get<bool>(x, "create", c.create);
    c.verify = get<bool>(x, "verify", c.verify);
    c.timeout = std::chrono::milliseconds(get<std::int64_t>(x, "timeout_ms", 1000));
    c.writers = get<unsigned>(x, "writers", c.writers);
    s.shared = c;
  }
  if (d.contains("local_disk")) {
    const nb::dict x = section(d, "local_disk");
    kvtier::tier::local_disk::config c;
    c.path = get<std::string>(x, "path", "");
    c.capacity_bytes = get<std::size_t>(x, "capacity_bytes", c.capacity_bytes);
    c.direct_io = get<bool>(x, "direct_io", c.direct_io);
    c.use_io_uring = get<bool>(x, "use_io_uring", c.use_io_uring);
    c.writers = get<unsigned>(x, "writers", c.writers);
    c.preallocate = get<bool>(x, "preallocate", c.preallocate);
    c.sync = get<bool>(x, "sync_each_batch", false) ? kvtier::tier::durability::each_batch
                                                    : kvtier::tier::durability::none;
    s.disk = c;
  }
  return s;
}

std::shared_ptr<cache_base> make(const nb::dict& d) {
  const settings s = from_dict(d);
  nb::gil_scoped_release unlocked;  // construction reserves and prefaults memory, opens files
  if (s.shared && s.disk) return make_host_shared_disk(s);
  if (s.shared) return make_host_shared(s);
  if (s.disk) return make_host_disk(s);
  return make_host(s);
}

std::shared_ptr<lookup_base> make_lookup(const nb::dict& d) {
  const settings s = from_dict(d);
  if (!s.shared) {
    throw kvtier::invalid_argument("kvtier: SharedLookup needs a 'shared_host' section");
  }
  nb::gil_scoped_release unlocked;
  return make_shared_lookup(s);
}

// ---- tensors -----------------------------------------------------------------------------------

using any_array = nb::ndarray<nb::ro>;

/// The engine's KV tensors as kvtier describes them: base pointers, and the shape and strides
/// every tensor must share (checked here, then against the layout by kvtier).
using kv_arg = kv_owned;  // the table is left empty where a call takes it separately

kv_arg describe(const std::vector<any_array>& ts, std::uint32_t dtype_size) {
  kv_arg k;
  if (ts.empty()) throw kvtier::invalid_argument("kvtier: kv_caches is empty");
  for (std::size_t i = 0; i < ts.size(); ++i) {
    const any_array& t = ts[i];
    if (t.device_type() != nb::device::cpu::value) {
      throw kvtier::invalid_argument("kvtier: kv_caches[" + std::to_string(i) +
                                     "] is not in host memory (DLPack device type " +
                                     std::to_string(t.device_type()) +
                                     "); this package moves host tensors only");
    }
    const std::size_t bytes = (t.dtype().bits * t.dtype().lanes + 7) / 8;
    if (bytes != dtype_size) {
      throw kvtier::invalid_argument(
          "kvtier: kv_caches[" + std::to_string(i) + "] has " + std::to_string(bytes) +
          "-byte elements, model dtype_size is " + std::to_string(dtype_size));
    }
    std::vector<std::int64_t> shape(t.ndim()), strides(t.ndim());
    for (std::size_t d = 0; d < t.ndim(); ++d) {
      shape[d] = static_cast<std::int64_t>(t.shape(d));
      strides[d] = t.stride(d);
    }
    if (i == 0) {
      k.shape = shape;
      k.strides = strides;
    } else if (shape != k.shape || strides != k.strides) {
      throw kvtier::invalid_argument("kvtier: kv_caches[" + std::to_string(i) +
                                     "] has another shape or strides than kv_caches[0]");
    }
    k.ptrs.push_back(const_cast<void*>(t.data()));
  }
  return k;
}

nb::dict tier_dict(const kvtier::tier_stats& t) {
  nb::dict d;
  d["name"] = t.name;
  d["hits"] = t.hits;
  d["misses"] = t.misses;
  d["writes"] = t.writes;
  d["bytes_written"] = t.bytes_written;
  d["bytes_read"] = t.bytes_read;
  d["evictions"] = t.evictions;
  d["errors"] = t.errors;
  d["dropped_writes"] = t.dropped_writes;
  d["write_backs"] = t.write_backs;
  d["promotions"] = t.promotions;
  d["recovered"] = t.recovered;
  d["used_chunks"] = t.used_chunks;
  d["capacity_chunks"] = t.capacity_chunks;
  return d;
}

nb::dict stats_dict(const stats_out& s) {
  nb::dict d;
  d["lookups"] = s.cache.lookups;
  d["lookup_tokens"] = s.cache.lookup_tokens;
  d["hit_tokens"] = s.cache.hit_tokens;
  d["stored_tokens"] = s.cache.stored_tokens;
  d["retrieved_tokens"] = s.cache.retrieved_tokens;
  d["bytes_from_engine"] = s.cache.bytes_from_engine;
  d["bytes_to_engine"] = s.cache.bytes_to_engine;
  d["store_partial"] = s.cache.store_partial;
  d["busy"] = s.cache.busy;
  d["prefetched"] = s.cache.prefetched;
  d["writes_dropped_for_room"] = s.cache.writes_dropped_for_room;
  nb::list tiers;
  for (const auto& t : s.tiers) tiers.append(tier_dict(t));
  d["tiers"] = tiers;
  return d;
}

}  // namespace
}  // namespace kvtier_py

NB_MODULE(_kvtier, m) {
  using namespace kvtier_py;
  nb::set_leak_warnings(false);  // vLLM keeps connectors alive until the interpreter exits
  m.doc() = "kvtier's KV-cache tiers (see the kvtier package)";
  static nb::exception<kvtier::error> error(m, "Error", PyExc_RuntimeError);
  static nb::exception<kvtier::invalid_argument> invalid(m, "InvalidArgument", PyExc_ValueError);
  nb::list sizes, names;
  for (std::size_t n : chunk_sizes) sizes.append(n);
  for (const char* n : layout_names) names.append(n);
  m.attr("chunk_sizes") = nb::tuple(sizes);
  m.attr("layouts") = nb::tuple(names);

  nb::class_<lease_base>(m, "Lease")
      .def_prop_ro("tokens", &lease_base::tokens)
      .def_prop_ro("first_token", &lease_base::first_token)
      .def_prop_ro("end_token", &lease_base::end_token)
      .def_prop_ro("chunks", &lease_base::chunks)
      .def_prop_ro("live", &lease_base::live)
      .def("hits_in", &lease_base::hits_in, "tier"_a)
      .def("release", &lease_base::release);

  const auto release = nb::call_guard<nb::gil_scoped_release>();
  nb::class_<pipeline_base>(m, "Pipeline")
      .def_prop_ro("tokens", &pipeline_base::tokens)
      .def("layer", &pipeline_base::layer, "layer"_a, release)
      .def("finish", &pipeline_base::finish, release);

  nb::class_<cache_base>(m, "_Cache")
      .def(nb::new_(&make), "config"_a)
      .def(
          "store",
          [](cache_base& c, const std::vector<token_id>& tokens, const std::vector<any_array>& kv,
             const std::vector<std::int32_t>& table, std::size_t first, std::uint32_t dt) {
            const kv_arg k = describe(kv, dt);
            nb::gil_scoped_release unlocked;
            return c.store(tokens, k.view(), table, first);
          },
          "tokens"_a, "kv_caches"_a, "block_table"_a, "first_token"_a, "dtype_size"_a)
      .def(
          "lookup",
          [](cache_base& c, const std::vector<token_id>& t, std::size_t first_chunk) {
            return c.lookup(t, first_chunk);
          },
          "tokens"_a, "first_chunk"_a = 0, release, nb::keep_alive<0, 1>())
      .def(
          "retrieve",
          [](cache_base& c, lease_base& l, const std::vector<any_array>& kv,
             const std::vector<std::int32_t>& table, std::size_t end, std::uint32_t dt) {
            const kv_arg k = describe(kv, dt);
            nb::gil_scoped_release unlocked;
            return c.retrieve(l, k.view(), table, end);
          },
          "lease"_a, "kv_caches"_a, "block_table"_a, "end_token"_a, "dtype_size"_a)
      .def(
          "begin_store",
          [](cache_base& c, const std::vector<token_id>& tokens, const std::vector<any_array>& kv,
             std::vector<std::int32_t> table, std::size_t first, std::uint32_t dt) {
            kv_arg k = describe(kv, dt);
            k.table = std::move(table);
            nb::gil_scoped_release unlocked;
            return c.begin_store(tokens, std::move(k), first);
          },
          "tokens"_a, "kv_caches"_a, "block_table"_a, "first_token"_a, "dtype_size"_a,
          nb::keep_alive<0, 1>())
      .def(
          "begin_retrieve",
          [](cache_base& c, lease_base& l, const std::vector<any_array>& kv,
             std::vector<std::int32_t> table, std::size_t end, std::uint32_t dt) {
            kv_arg k = describe(kv, dt);
            k.table = std::move(table);
            nb::gil_scoped_release unlocked;  // promotes lower-tier chunks, verifies in place
            return c.begin_retrieve(l, std::move(k), end);
          },
          "lease"_a, "kv_caches"_a, "block_table"_a, "end_token"_a, "dtype_size"_a,
          nb::keep_alive<0, 1>())
      .def(
          "prefetch", [](cache_base& c, const std::vector<token_id>& t) { return c.prefetch(t); },
          "tokens"_a, release)
      .def(
          "clear", [](cache_base& c, const std::vector<token_id>& t) { return c.clear(t); },
          "tokens"_a, release)
      .def("clear_all", &cache_base::clear_all, release)
      .def("flush", &cache_base::flush, release)
      .def("stats", [](const cache_base& c) { return stats_dict(c.stats()); })
      .def_prop_ro("chunk_tokens", &cache_base::chunk_tokens)
      .def_prop_ro("tier_names", &cache_base::tier_names)
      .def_prop_ro("format_fingerprint", &cache_base::format_fingerprint);

  nb::class_<lookup_base>(m, "_SharedLookup")
      .def(nb::new_(&make_lookup), "config"_a)
      .def(
          "cached_tokens",
          [](lookup_base& v, const std::vector<token_id>& t) { return v.cached_tokens(t); },
          "tokens"_a, release);
}
