#pragma once
// What the Python package's configuration resolves to (kvtier/config.py validates the keys and
// types; module.cpp fills this in), and the menu of compile-time choices the package is built
// with.

#include <kvtier/kvtier.hpp>

#include <optional>
#include <string>

namespace kvtier_py {

inline constexpr const char* chunk_names = "64, 128, 256 or 512";
inline constexpr const char* layout_names = "vllm_cpu or vllm_flash_nhd";

struct settings {
  std::size_t chunk_tokens = 256;
  std::string layout = "vllm_cpu";
  kvtier::model_shape model{};
  kvtier::salt salt{};
  kvtier::cache_config cfg{};
  kvtier::tier::host::config host{};
  std::optional<kvtier::tier::shared_host::config> shared;
  std::optional<kvtier::tier::local_disk::config> disk;
};

}  // namespace kvtier_py
