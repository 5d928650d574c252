#!/usr/bin/env bash
# Builds and runs the quick-start example (installs missing Debian packages first).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
build=${KVTIER_BUILD_DIR:-build}
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" --target kvtier_quickstart -j "$(nproc)"
"$build/examples/kvtier_quickstart"
