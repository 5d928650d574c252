#pragma once
// kvtier::opt::* tags, their defaults, and the order-free resolution of an option pack.

#include "kvtier/concepts.hpp"
#include "kvtier/eviction/lru.hpp"
#include "kvtier/key/xxh3_hasher.hpp"
#include "kvtier/layout/vllm_flash_nhd.hpp"
#include "kvtier/tier/host.hpp"

#include <cstddef>
#include <tuple>
#include <type_traits>

namespace kvtier {

namespace detail {
struct chunk_tokens_kind {};
struct block_tokens_kind {};
struct layout_kind {};
struct eviction_kind {};
struct tiers_kind {};
struct hasher_kind {};
}  // namespace detail

namespace opt {

/// Tokens per chunk, the unit stored and looked up. Default 256.
template <std::size_t N>
struct chunk_tokens {
  static_assert(N > 0, "kvtier::opt::chunk_tokens<N>: N must be > 0");
  static_assert(N <= 65536, "kvtier::opt::chunk_tokens<N>: N must be <= 65536");
  using kvtier_option_kind = detail::chunk_tokens_kind;
  static constexpr std::size_t value = N;
};

/// The engine's block size, when it is known at compile time: chunk_tokens must then be a
/// multiple of it (a compile error otherwise), and model_shape.block_size must equal it.
/// Default 0: the block size is only known at run time and checked at construction.
template <std::size_t N>
struct block_tokens {
  using kvtier_option_kind = detail::block_tokens_kind;
  static constexpr std::size_t value = N;
};

/// The engine's KV layout. Default layout::vllm_flash_nhd.
template <layout_policy L>
struct layout {
  static_assert(kvtier::layout::traits<L>::rank > 0);  // instantiates the description's checks
  using kvtier_option_kind = detail::layout_kind;
  using type = L;
};

/// The eviction policy of every tier. Default eviction::lru.
template <eviction_policy E>
struct eviction {
  using kvtier_option_kind = detail::eviction_kind;
  using type = E;
};

/// The tier chain, first tier first. The first must be a memory tier. Default tiers<tier::host>.
template <tier_policy First, tier_policy... Lower>
struct tiers {
  static_assert(First::is_memory,
                "kvtier::opt::tiers<...>: the first tier must be a memory tier (tier::host)");
  static_assert((!Lower::is_memory && ...),
                "kvtier::opt::tiers<...>: only the first tier may be a memory tier");
  using kvtier_option_kind = detail::tiers_kind;
  using type = std::tuple<First, Lower...>;
};

/// The chunk-key hasher. Default key::xxh3_hasher.
template <key_hasher H>
struct hasher {
  using kvtier_option_kind = detail::hasher_kind;
  using type = H;
};

}  // namespace opt

/// Anything accepted in kvtier::cache<...>'s option list.
template <class T>
concept option = requires {
  typename T::kvtier_option_kind;
};

namespace detail {

template <class Kind, class... Opts>
inline constexpr std::size_t count_kind = (std::size_t{0} + ... +
                                           std::is_same_v<typename Opts::kvtier_option_kind, Kind>);

template <class Kind, class Default, class... Opts>
struct find_option {
  using type = Default;
};
template <class Kind, class Default, class First, class... Rest>
struct find_option<Kind, Default, First, Rest...> {
  using type = std::conditional_t<std::is_same_v<typename First::kvtier_option_kind, Kind>, First,
                                  typename find_option<Kind, Default, Rest...>::type>;
};

/// Resolves an order-free option pack into named policies, defaults filled in.
template <option... Opts>
struct resolve_options {
  static_assert(count_kind<chunk_tokens_kind, Opts...> <= 1,
                "kvtier::cache: option chunk_tokens given more than once");
  static_assert(count_kind<block_tokens_kind, Opts...> <= 1,
                "kvtier::cache: option block_tokens given more than once");
  static_assert(count_kind<layout_kind, Opts...> <= 1,
                "kvtier::cache: option layout given more than once");
  static_assert(count_kind<eviction_kind, Opts...> <= 1,
                "kvtier::cache: option eviction given more than once");
  static_assert(count_kind<tiers_kind, Opts...> <= 1,
                "kvtier::cache: option tiers given more than once");
  static_assert(count_kind<hasher_kind, Opts...> <= 1,
                "kvtier::cache: option hasher given more than once");

  static constexpr std::size_t chunk_tokens =
      find_option<chunk_tokens_kind, opt::chunk_tokens<256>, Opts...>::type::value;
  static constexpr std::size_t block_tokens =
      find_option<block_tokens_kind, opt::block_tokens<0>, Opts...>::type::value;
  static_assert(block_tokens == 0 || chunk_tokens % (block_tokens ? block_tokens : 1) == 0,
                "kvtier::cache: chunk_tokens must be a multiple of block_tokens");
  using layout =
      typename find_option<layout_kind, opt::layout<layout::vllm_flash_nhd>, Opts...>::type::type;
  using eviction =
      typename find_option<eviction_kind, opt::eviction<eviction::lru>, Opts...>::type::type;
  using tiers = typename find_option<tiers_kind, opt::tiers<tier::host>, Opts...>::type::type;
  using hasher =
      typename find_option<hasher_kind, opt::hasher<key::xxh3_hasher>, Opts...>::type::type;
};

}  // namespace detail
}  // namespace kvtier
