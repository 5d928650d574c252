#!/usr/bin/env bash
# Builds one libFuzzer target of test/fuzz with clang++ (-fsanitize=fuzzer,address,undefined)
# and runs it for a bounded time over a copy of its seed corpus (test/fuzz/corpus/<name>), so
# the corpus in the repository is never changed. Exit 77 (ctest: skipped) when clang++ or its
# libFuzzer runtime is missing.
#
#   scripts/fuzz.sh NAME OUT_DIR CLANGXX [compiler flags...]
#   KVTIER_FUZZ_SECONDS (default 20): how long the run lasts; KVTIER_FUZZ_LIBS: extra link flags
set -u
name=$1 out=$2 cxx=$3
shift 3
root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "$cxx" ] || ! command -v "$cxx" >/dev/null 2>&1; then
  echo "fuzz.$name: no clang++ found (Debian: clang)"
  exit 77
fi
mkdir -p "$out"
probe=$out/probe.cpp
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' >"$probe"
if ! "$cxx" -fsanitize=fuzzer "$probe" -o "$out/probe" 2>/dev/null; then
  echo "fuzz.$name: $cxx lacks -fsanitize=fuzzer (libFuzzer runtime missing)"
  exit 77
fi
bin=$out/fuzz_$name
# shellcheck disable=SC2086
if ! "$cxx" -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  "$@" "$root/test/fuzz/fuzz_$name.cpp" -o "$bin" -lpthread ${KVTIER_FUZZ_LIBS:-}; then
  echo "fuzz.$name: build failed"
  exit 1
fi
work=$out/corpus_$name
rm -rf "$work"
mkdir -p "$work"
cp "$root/test/fuzz/corpus/$name"/* "$work"/
secs=${KVTIER_FUZZ_SECONDS:-20}
"$bin" -max_total_time="$secs" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
  -print_final_stats=1 "$work" 2>&1 | tail -n 25
status=${PIPESTATUS[0]}
echo "fuzz.$name: exit $status after ${secs} s"
exit "$status"
