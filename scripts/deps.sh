#!/usr/bin/env bash
# Installs what kvtier's build, tests and examples need, from Debian packages, when missing.
set -euo pipefail
need=()
# clang: the headers tests compile kvtier's public headers with clang++ as well as g++;
# libclang-rt-dev: its sanitizer and libFuzzer runtimes, for the fuzz tests (only recommended
# by clang, so --no-install-recommends would leave them out).
for pkg in cmake make g++ clang libclang-rt-dev python3 doctest-dev libboost-dev libxxhash-dev \
    gnuplot-nox liburing-dev libhiredis-dev redis-server libzstd-dev liblz4-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
# A toolchain already on PATH (e.g. a newer cmake or python3 from elsewhere) is fine too.
filtered=()
for pkg in "${need[@]}"; do
  case "$pkg" in
    cmake|make|g++|python3) command -v "$pkg" >/dev/null 2>&1 || filtered+=("$pkg") ;;
    clang) command -v clang++ >/dev/null 2>&1 || filtered+=("$pkg") ;;
    *) filtered+=("$pkg") ;;
  esac
done
if [ ${#filtered[@]} -gt 0 ]; then
  echo "kvtier: installing ${filtered[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${filtered[@]}" >/dev/null
fi
