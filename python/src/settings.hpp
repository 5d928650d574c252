#pragma once
// What the Python package's configuration resolves to (kvtier/config.py validates the keys and
// types; module.cpp fills this in), and the menu of compile-time choices the package is built
// with.

#include <kvtier/kvtier.hpp>

#include <array>
#include <optional>
#include <string>
#include <type_traits>

namespace kvtier_py {

/// The chunk sizes the package is built for (box.hpp's with_chunk instantiates each; the module
/// exports them as kvtier.chunk_sizes).
inline constexpr std::array<std::size_t, 4> chunk_sizes{64, 128, 256, 512};
/// The layouts it is built for, by name (box.hpp's with_layout maps each to its type).
inline constexpr std::array<const char*, 2> layout_names{"vllm_cpu", "vllm_flash_nhd"};

/// "a, b or c" of a list, for error messages.
template <class T, std::size_t N>
std::string listed(const std::array<T, N>& xs) {
  std::string out;
  for (std::size_t i = 0; i < N; ++i) {
    if (i) out += i + 1 == N ? " or " : ", ";
    if constexpr (std::is_arithmetic_v<T>) {
      out += std::to_string(xs[i]);
    } else {
      out += xs[i];
    }
  }
  return out;
}

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
