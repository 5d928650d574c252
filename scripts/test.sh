#!/usr/bin/env bash
# Builds and runs kvtier's tests (installs missing Debian packages first); ends with ctest's
# summary. KVTIER_SANITIZE=address,undefined (or thread) builds a sanitized copy in its own
# directory; extra arguments go to ctest (e.g. -L host).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
san=${KVTIER_SANITIZE:-}
build=${KVTIER_BUILD_DIR:-build${san:+-${san//,/-}}}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DKVTIER_SANITIZE="$san" >/dev/null
cmake --build "$build" -j "$(nproc)"
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" "$@"
