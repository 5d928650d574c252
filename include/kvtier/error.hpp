#pragma once
// The kvtier::error family. Expected outcomes (a miss, a full tier) are return values; these are
// for programmer errors (bad input) and environment errors (an unwritable directory).

#include <stdexcept>
#include <string>

namespace kvtier {

/// Base of every exception kvtier throws. The message names the offending value.
class error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// An argument is out of range or contradicts the cache's model shape or layout.
class invalid_argument : public error {
 public:
  using error::error;
};

/// A tier could not be set up or used (a directory that cannot be written, mlock refused).
class tier_error : public error {
 public:
  using error::error;
};

}  // namespace kvtier
