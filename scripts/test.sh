#!/usr/bin/env bash
# Builds and runs kvtier's tests (installs missing Debian packages first); ends with ctest's
# summary. KVTIER_SANITIZE=address,undefined (or thread) builds a sanitized copy in its own
# directory; KVTIER_BUILD_TYPE=Release (default RelWithDebInfo) builds at -O3, in build-release
# unless KVTIER_BUILD_DIR names another; KVTIER_CMAKE_ARGS adds configure options; extra
# arguments go to ctest (e.g. -L host).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
san=${KVTIER_SANITIZE:-}
type=${KVTIER_BUILD_TYPE:-RelWithDebInfo}
# Each build type and sanitizer set has its own directory, so that switching never rebuilds.
suffix=${san:+-${san//,/-}}
[ "$type" = RelWithDebInfo ] || suffix="$suffix-${type,,}"
build=${KVTIER_BUILD_DIR:-build$suffix}
# KVTIER_CMAKE_ARGS: more configure options (CI's Release run: -DKVTIER_ENABLE_CUDA=OFF).
# shellcheck disable=SC2086
# The Python package and vLLM's CPU build (labels python, vllm) live in a venv under the build
# directory, made (or reused, then only the package reinstalled) when the tests asked for
# include them: not for sanitized builds, nor for a -L selection that names neither.
case " $* " in
  *" -L "* | *" --label-regex "*) [[ "$*" =~ vllm|python ]] && want_py=1 || want_py= ;;
  *) want_py=1 ;;
esac
[ -n "$san" ] && want_py=
mkdir -p "$build"
if [ -n "$want_py" ]; then
  KVTIER_VLLM_VENV="$(pwd)/$build/venv-vllm" bash scripts/vllm_env.sh >/dev/null
fi
cmake -S . -B "$build" -DCMAKE_BUILD_TYPE="$type" -DKVTIER_SANITIZE="$san" ${KVTIER_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j "$(nproc)"
# ctest lists skipped tests (the gpu label, without a GPU) after its summary: the summary line is
# printed again last, so the result is the last line whatever ran.
set +e
ctest --test-dir "$build" --output-on-failure -j "$(nproc)" "$@" 2>&1 | tee "$build/ctest.log"
rc=${PIPESTATUS[0]}
grep -E "tests passed, [0-9]+ tests? failed out of" "$build/ctest.log" | tail -1
exit "$rc"
