#pragma once
// What the cache calls on a tier. A tier is a tag (name, is_memory, config, impl<Eviction>); its
// impl is one of three kinds below, checked where the cache is instantiated, member by member,
// so a tier that lacks a member fails with one line naming it.
//
//  - memory_tier: the first tier of a chain. It owns slots of chunk_format::chunk_bytes() bytes
//    and an index over them; the cache copies engine blocks into and out of the slots itself.
//  - indexed_lower_tier: a lower tier that knows what it holds (local disk): the cache keeps its
//    index in memory and hands it slots to write and read.
//  - remote_lower_tier: a lower tier that is asked by key (Redis, an object store): no index in
//    this process; the tier answers probe() itself.
//
// Shared rules for lower tiers (both kinds):
//  - They are constructed as impl(const config&, const tier::context&) and throw a
//    kvtier::error subclass naming the bad value when the config or the storage is unusable.
//  - write_batch and read_batch are called from several threads at once (engine threads that
//    promote, the prefetch thread, `config::writers` writer threads), never with the cache's
//    lock held, each call with its own jobs. They may block for I/O, but every wait is bounded
//    (a tier's timeout); a job still unanswered at the timeout fails (ok = false, or
//    read_status::io_error) and the call returns.
//  - A job's result is set by the time the call returns, and never after: the cache reuses the
//    job array and the slot buffers as soon as the call returns.
//  - write_batch: job.ok = true only once the whole record is stored such that a later read in
//    any process will find it (under the tier's durability setting); a tier that already holds
//    the key may answer ok without writing. A failed write leaves no record that could pass a
//    read's verification under that key.
//  - read_batch: copy the record's payload into job.dst and set job.status = ok only after
//    proving it is the bytes stored under job.key: the record's key, salt (context::salt),
//    format fingerprint, token count and length match the job, and the payload checksum matches
//    the bytes now in job.dst (tier/record.hpp has the header kvtier's tiers use). Otherwise:
//    missing (no record under the key: a plain miss), corrupt (a record failed verification: the
//    cache counts an error and drops or deletes it) or io_error (the read failed or was late).
//    Whatever the status, only an ok job's bytes are ever used.
//  - config may have `std::uint32_t admit_after_hits` (admission, 0..255) and `unsigned writers`
//    (writer threads, 1..64); without them: 0 and 1.

#include "kvtier/detail/chunk_index.hpp"
#include "kvtier/key/chunk_key.hpp"
#include "kvtier/tier/context.hpp"

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <span>

namespace kvtier::tier {

namespace detail_concepts {
template <class T>
inline constexpr bool is_index_ref = false;
template <class E>
inline constexpr bool is_index_ref<::kvtier::detail::chunk_index<E>&> = true;
template <class I>
concept has_index = requires(I& t) {
  requires is_index_ref<decltype(t.index())>;
};
template <class I>
concept has_index_any = requires(I& t) {
  t.index();
};
template <class I>
concept has_data = requires(const I& t, std::uint32_t slot) {
  { t.data(slot) } -> std::same_as<std::byte*>;
};
template <class I>
concept has_read_batch = requires(I& t, std::span<read_job> jobs) {
  t.read_batch(jobs);
};
template <class I>
concept has_write_batch = requires(I& t, std::span<write_job> jobs) {
  t.write_batch(jobs);
};
template <class I>
concept has_probe = requires(I& t, std::span<const chunk_key> keys) {
  { t.probe(keys) } -> std::convertible_to<std::size_t>;
};
template <class I>
concept has_remove = requires(I& t, std::span<const chunk_key> keys) {
  { t.remove(keys) } -> std::convertible_to<std::size_t>;
};
template <class I>
concept has_remove_all = requires(I& t) {
  { t.remove_all() } -> std::convertible_to<std::size_t>;
};
}  // namespace detail_concepts

/// The impl of a first tier. Members:
///  - `chunk_index<Eviction>& index()` (Eviction: the impl's template argument): the tier's
///    index, one entry per slot. The cache calls
///    it only under its lock; the tier never touches it after construction.
///  - `std::byte* data(std::uint32_t slot) const`: slot `slot`'s bytes, chunk_bytes() long,
///    4 KiB aligned, valid for the tier's lifetime. The cache reads and writes a slot only while
///    it holds a reference to its entry; lower tiers read and write slots in place (zero copy),
///    unless the tier says `static constexpr bool host_visible = false` (device memory).
/// A first tier whose copies run asynchronously (the GPU tiers) also has
/// `static constexpr bool async_copies`, `transfers_type` and `transfers()`; see docs/gpu.md.
template <class I>
concept memory_tier = detail_concepts::has_index<I> && detail_concepts::has_data<I>;

/// The impl of a lower tier with an index in this process. Members: `index()`
/// (as memory_tier; read_job::slot and write_job::slot are entries of it), `read_batch`,
/// `write_batch` (see the rules above). Optional: `std::size_t recovered() const` and
/// `std::size_t dropped_at_open() const`, records found intact and dropped when the index was
/// rebuilt from storage at construction (reported in stats), and
/// `void invalidate(std::span<const std::uint32_t> slots) noexcept` for a tier whose records
/// outlive the process: called (no lock held, from the tier's writer threads) with the slots of
/// cleared chunks before they are reused, it must make their records unrecoverable.
template <class I>
concept indexed_lower_tier = detail_concepts::has_index<I> && detail_concepts::has_read_batch<I> &&
    detail_concepts::has_write_batch<I>;

/// The impl of a lower tier asked by key. Members: `read_batch`, `write_batch`
/// (job slots are 0 and ignored), and
///  - `std::size_t probe(std::span<const chunk_key> keys)`: the length of the leading run of
///    `keys` the tier holds; 0 when it is down or late (bounded by its timeout). Thread-safe.
///  - `std::size_t remove(std::span<const chunk_key> keys)`: deletes those records; returns how
///    many it held. Thread-safe. Also called to delete a record that failed verification.
///  - `std::size_t remove_all()`: deletes every record under this context's salt.
template <class I>
concept remote_lower_tier =
    !detail_concepts::has_index_any<I> && detail_concepts::has_read_batch<I> &&
    detail_concepts::has_write_batch<I> && detail_concepts::has_probe<I> &&
    detail_concepts::has_remove<I> && detail_concepts::has_remove_all<I>;

/// Any lower tier.
template <class I>
concept lower_tier = indexed_lower_tier<I> || remote_lower_tier<I>;

/// Fails compilation with one line naming the first missing member of a first tier's impl.
template <class I>
consteval bool check_memory_tier() {
  using namespace detail_concepts;
  static_assert(has_index<I>, "kvtier: a memory tier lacks `chunk_index<Eviction>& index()`");
  static_assert(has_data<I>, "kvtier: a memory tier lacks `std::byte* data(std::uint32_t) const`");
  return true;
}

/// Fails compilation with one line naming the first missing member of a lower tier's impl.
template <class I>
consteval bool check_lower_tier() {
  using namespace detail_concepts;
  static_assert(has_read_batch<I>,
                "kvtier: a lower tier lacks `read_batch(std::span<tier::read_job>)`");
  static_assert(has_write_batch<I>,
                "kvtier: a lower tier lacks `write_batch(std::span<tier::write_job>)`");
  if constexpr (!has_index_any<I>) {
    static_assert(has_probe<I>,
                  "kvtier: a lower tier without index() lacks `std::size_t "
                  "probe(std::span<const chunk_key>)`");
    static_assert(has_remove<I>,
                  "kvtier: a lower tier without index() lacks `std::size_t "
                  "remove(std::span<const chunk_key>)`");
    static_assert(has_remove_all<I>,
                  "kvtier: a lower tier without index() lacks `std::size_t remove_all()`");
  } else {
    static_assert(has_index<I>,
                  "kvtier: a lower tier's index() must return chunk_index<Eviction>&");
  }
  return true;
}

}  // namespace kvtier::tier
