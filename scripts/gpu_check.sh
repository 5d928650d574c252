#!/usr/bin/env bash
# The GPU check, one command for a GPU machine (docs/gpu.md): builds only the GPU programs
# (test_gpu, kvtier_cuda_pipeline, kvtier-gpu-bench) as Release with CUDA on, runs
# `ctest -L gpu` and `kvtier-gpu-bench --shape all`, and ends with a summary in which every
# figure is a ratio to the limit the bench measured in the same run. Installs and downloads
# nothing. Every step has a time limit, and all steps together stay inside --budget seconds
# (default 450, under 8 minutes).
#
#   bash scripts/gpu_check.sh [--build-only] [--no-cmake] [--build-dir DIR] [--budget SECONDS]
#
#   --build-only  build, run nothing (works without a GPU)
#   --no-cmake    build with nvcc directly, without CMake or ctest (also the fallback when
#                 cmake 3.21 or newer, or doctest, is missing, or the CMake configure fails)
#
# Environment: KVTIER_CUDA_ARCH (default: the GPU's own, else 90), CUDAHOSTCXX (nvcc's host
# compiler), KVTIER_JOBS (build jobs, default nproc), CPATH (extra header directories, e.g. for
# copied Boost or xxhash headers on a machine without them).
#
# Exit status: 0 everything built and ran, and every byte was checked; 1 a build, test or bench
# failed or ran out of time; 2 something the build needs is missing (nothing built); 77 no GPU
# here (nothing ran; --build-only builds without one).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

build_only=0
use_cmake=1
build="build-gpu"
budget=450
while [ $# -gt 0 ]; do
  case "$1" in
    --build-only) build_only=1 ;;
    --no-cmake) use_cmake=0 ;;
    --build-dir) build=${2:?--build-dir needs a directory}; shift ;;
    --budget) budget=${2:?--budget needs seconds}; shift ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

start=$SECONDS
logs=$build/gpu-check
summary=()
note() { summary+=("$*"); echo "gpu_check: $*"; }
missing() {
  echo "gpu_check: cannot build: $*" >&2
  echo "gpu_check: nothing was built or run (exit 2)" >&2
  exit 2
}

# step NAME LIMIT COMMAND...: runs COMMAND with its output in $logs/NAME.log, under the smaller
# of LIMIT (0: no limit of its own) and what is left of the budget; returns its status (124 when
# it ran out of time).
step() {
  local name=$1 limit=$2 left rc t0=$SECONDS
  shift 2
  left=$((budget - (SECONDS - start)))
  if [ "$left" -lt 10 ]; then
    echo "gpu_check: $name not started: the ${budget}s budget is spent" | tee "$logs/$name.log"
    return 124
  fi
  [ "$limit" -gt 0 ] && [ "$limit" -le "$left" ] || limit=$left
  echo "gpu_check: $name (limit ${limit}s, log $logs/$name.log)"
  timeout --kill-after=5 "$limit" "$@" >"$logs/$name.log" 2>&1
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    echo "gpu_check: $name ran out of time after ${limit}s; its log ends:"
    rc=124
  elif [ "$rc" -ne 0 ]; then
    echo "gpu_check: $name failed (exit $rc) after $((SECONDS - t0))s; its log ends:"
  else
    echo "gpu_check: $name done in $((SECONDS - t0))s"
    return 0
  fi
  tail -n 25 "$logs/$name.log" | sed 's/^/  | /'
  return "$rc"
}

# ---- what is here --------------------------------------------------------------------------
gpu_list=""
if command -v nvidia-smi >/dev/null 2>&1; then
  gpu_list=$(nvidia-smi -L 2>/dev/null | grep '^GPU ' || true)
elif compgen -G "/dev/nvidia[0-9]*" >/dev/null; then
  gpu_list="a device node $(compgen -G '/dev/nvidia[0-9]*' | head -1) (no nvidia-smi)"
fi
if [ -z "$gpu_list" ] && [ "$build_only" -eq 0 ]; then
  echo "gpu_check: no GPU on this machine (nvidia-smi lists none, or no /dev/nvidia*):" \
       "nothing to test or measure. 'bash scripts/gpu_check.sh --build-only' builds the GPU" \
       "programs without running them." >&2
  exit 77
fi

mkdir -p "$logs" || exit 2
nvcc=${CUDACXX:-$(command -v nvcc || true)}
[ -n "$nvcc" ] || [ ! -x /usr/local/cuda/bin/nvcc ] || nvcc=/usr/local/cuda/bin/nvcc
[ -n "$nvcc" ] || missing "nvcc not found (PATH, CUDACXX, /usr/local/cuda/bin): the CUDA Toolkit"
host_cxx=${CUDAHOSTCXX:-$(command -v g++ || command -v clang++ || true)}
[ -n "$host_cxx" ] || missing "no host C++ compiler for nvcc (g++, clang++ or CUDAHOSTCXX)"
# kvtier itself needs Boost.Intrusive and xxhash.h: without them nothing can be built.
for h in "boost/intrusive/list.hpp|Boost.Intrusive (Debian: libboost-dev)" \
         "xxhash.h|xxhash (Debian: libxxhash-dev)"; do
  if ! echo "#include <${h%%|*}>" | "$host_cxx" -x c++ -std=c++20 -fsyntax-only - 2>/dev/null; then
    missing "<${h%%|*}> not found: ${h#*|}, or copy the headers here and name them in CPATH"
  fi
done

cmake_why=""
if [ "$use_cmake" -eq 0 ]; then
  cmake_why="--no-cmake"
elif ! command -v cmake >/dev/null 2>&1 || ! command -v ctest >/dev/null 2>&1; then
  cmake_why="cmake/ctest not found"
else
  cmake_version=$(cmake --version | head -1 | grep -oE '[0-9]+\.[0-9]+' | head -1)
  if [ "$(printf '%s\n' 3.21 "$cmake_version" | sort -V | head -1)" != 3.21 ]; then
    cmake_why="cmake $cmake_version is older than 3.21"
  # test/CMakeLists.txt needs doctest for the host tests, though no GPU program uses it.
  elif ! echo "#include <doctest/doctest.h>" | "$host_cxx" -x c++ -fsyntax-only - 2>/dev/null; then
    cmake_why="doctest not found (test/CMakeLists.txt needs it; the GPU programs do not)"
  fi
fi
[ -z "$cmake_why" ] || use_cmake=0

arch=${KVTIER_CUDA_ARCH:-}
if [ -z "$arch" ]; then
  cap=""
  if [ -n "$gpu_list" ] && command -v nvidia-smi >/dev/null 2>&1; then
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 |
          tr -d ' .')
  fi
  case "$cap" in
    [1-9][0-9]|[1-9][0-9][0-9]) arch=$cap ;;
    *) arch=90 ;;  # Hopper (H100/H200), kvtier's default
  esac
fi
jobs=${KVTIER_JOBS:-$(nproc)}
# Line-buffered output, so that a program stopped at its time limit still leaves what it printed.
linebuf=()
! command -v stdbuf >/dev/null 2>&1 || linebuf=(stdbuf -oL)
# The build leaves time for the runs, unless it is all there is to do.
build_limit=300
[ "$build_only" -eq 0 ] || build_limit=0

echo "gpu_check: GPU: ${gpu_list:-none (build only)}"
nvcc_version=$("$nvcc" --version | grep -oE "release [0-9.]+, V[0-9.]+")
echo "gpu_check: nvcc $nvcc_version, host compiler $host_cxx, sm_$arch, $jobs jobs"
if command -v nvidia-smi >/dev/null 2>&1 && [ -n "$gpu_list" ]; then
  echo "gpu_check: driver $(nvidia-smi --query-gpu=driver_version --format=csv,noheader | head -1)"
fi

# ---- build ---------------------------------------------------------------------------------
failed=0
bin_test="" bin_example="" bin_bench=""
if [ "$use_cmake" -eq 1 ]; then
  if step configure 150 cmake -S . -B "$build" -DCMAKE_BUILD_TYPE=Release \
      -DKVTIER_ENABLE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCMAKE_CUDA_COMPILER="$nvcc" \
      -DCMAKE_CUDA_HOST_COMPILER="$host_cxx" -DKVTIER_BUILD_TESTS=ON -DKVTIER_BUILD_EXAMPLES=ON \
      -DKVTIER_BUILD_BENCH=ON; then
    # kvtier_gpu_programs: test_gpu, kvtier_cuda_pipeline and kvtier-gpu-bench, in parallel.
    if step build "$build_limit" cmake --build "$build" -j "$jobs" --target kvtier_gpu_programs &&
        [ -x "$build/test/test_gpu" ] && [ -x "$build/examples/kvtier_cuda_pipeline" ] &&
        [ -x "$build/bench/kvtier-gpu-bench" ]; then
      bin_test=$build/test/test_gpu
      bin_example=$build/examples/kvtier_cuda_pipeline
      bin_bench=$build/bench/kvtier-gpu-bench
      note "built with CMake (Release, sm_$arch): test_gpu, kvtier_cuda_pipeline, kvtier-gpu-bench"
    else
      failed=1
    fi
  else
    cmake_why="the CMake configure failed (log $logs/configure.log)"
    use_cmake=0
  fi
fi
if [ "$use_cmake" -eq 0 ] && [ "$failed" -eq 0 ]; then
  note "building with nvcc directly, without CMake or ctest: $cmake_why"
  direct=$build/direct
  mkdir -p "$direct"
  # What kvtier::cuda and kvtier_dev_cuda give the CMake build: C++20, -O3, the project's
  # warnings as errors. The disk tier uses its thread-pool backend here (no liburing).
  # shellcheck disable=SC2054  # -Xcompiler takes one comma-separated argument
  nv=("$nvcc" -std=c++20 -O3 -DNDEBUG -ccbin "$host_cxx" -arch="sm_$arch" -Iinclude
      -Xcompiler=-Wall,-Wextra,-Werror,-Wno-missing-field-initializers --Werror=all-warnings)
  # The three compiles, $jobs at a time, as a script (timeout runs programs, not functions).
  {
    echo "set -u; rc=0; running=0"
    for src_bin in test/cuda/test_gpu.cu:test_gpu \
        examples/cuda_pipeline/main.cu:kvtier_cuda_pipeline bench/gpu_bench.cu:kvtier-gpu-bench; do
      printf '%q ' "${nv[@]}" "${src_bin%%:*}" -o "$direct/${src_bin#*:}" -lpthread
      echo "& running=\$((running + 1))"
      echo "[ \"\$running\" -lt $jobs ] || { wait -n || rc=1; running=\$((running - 1)); }"
    done
    # shellcheck disable=SC2016  # expanded by build.sh
    echo 'while [ "$running" -gt 0 ]; do wait -n || rc=1; running=$((running - 1)); done; exit "$rc"'
  } >"$direct/build.sh"
  if step build "$build_limit" bash "$direct/build.sh" && [ -x "$direct/test_gpu" ] &&
      [ -x "$direct/kvtier_cuda_pipeline" ] && [ -x "$direct/kvtier-gpu-bench" ]; then
    bin_test=$direct/test_gpu
    bin_example=$direct/kvtier_cuda_pipeline
    bin_bench=$direct/kvtier-gpu-bench
    note "built with nvcc (-O3, sm_$arch): test_gpu, kvtier_cuda_pipeline, kvtier-gpu-bench"
  else
    failed=1
  fi
fi

if [ "$build_only" -eq 1 ]; then
  if [ "$failed" -eq 0 ]; then
    echo "gpu_check: built in $((SECONDS - start))s; --build-only: nothing run"
    exit 0
  fi
  echo "gpu_check: build FAILED ($((SECONDS - start))s)"
  exit 1
fi

# ---- run -----------------------------------------------------------------------------------
no_device=0
if [ "$failed" -eq 0 ]; then
  if [ "$use_cmake" -eq 1 ]; then
    # gpu.tiers, gpu.fault, example.cuda_pipeline and bench.gpu (a short bench run); one GPU,
    # one at a time.
    step ctest 180 ctest --test-dir "$build" -L gpu --output-on-failure --timeout 170
    rc=$?
    result=$(grep -E "tests passed, [0-9]+ tests? failed out of" "$logs/ctest.log" | tail -1)
    note "ctest -L gpu: ${result:-no summary (exit $rc)}"
    while read -r l; do
      note "  $l"
    done < <(grep -E "^ *[0-9]+/[0-9]+ Test +#" "$logs/ctest.log")
    [ "$rc" -eq 0 ] || failed=1
    grep -qE "\(Skipped\)|GPU tests skipped" "$logs/ctest.log" && no_device=1
  else
    # What ctest -L gpu runs, without ctest: exit 77 means the program found no device.
    for prog in test fault "example|attention saw the same KV"; do
      args=()
      if [ "$prog" = test ]; then name=gpu.tiers bin=$bin_test want=""
      elif [ "$prog" = fault ]; then name=gpu.fault bin=$bin_test want="" args=(--fault)
      else name=example.cuda_pipeline bin=$bin_example want=${prog#*|}; fi
      step "$name" 180 "${linebuf[@]}" "$bin" ${args[@]+"${args[@]}"}
      rc=$?
      if [ "$rc" -eq 77 ]; then
        no_device=1
        note "$name: skipped, no CUDA device"
      elif [ "$rc" -ne 0 ] || { [ -n "$want" ] && ! grep -q "$want" "$logs/$name.log"; }; then
        failed=1
        note "$name: FAILED (exit $rc, log $logs/$name.log)"
      else
        note "$name: passed"
      fi
    done
  fi
fi

# The bench checks its own bytes; it runs even after a failed test (GPU time is scarce).
if [ -n "$bin_bench" ] && [ "$no_device" -eq 0 ]; then
  step bench 240 "${linebuf[@]}" "$bin_bench" --shape all
  rc=$?
  [ "$rc" -ne 77 ] || no_device=1
  [ "$rc" -eq 0 ] || [ "$rc" -eq 77 ] || failed=1
  [ "$rc" -ne 124 ] || note "kvtier-gpu-bench ran out of time: below are the figures it printed"
  # Every figure as a ratio to its limit, measured in the same run; targets from DESIGN.md
  # (gather/scatter at least 0.85 of device memcpy, pinned copies at least 0.9 of the pinned
  # cudaMemcpyAsync of the same direction). Below target is reported, not failed.
  if [ -s "$logs/bench.log" ]; then
    while IFS= read -r l; do summary+=("$l"); done < <(awk '
      /^device / { print "bench: " $0; next }
      / limits: / { print "  " $0 "  (what the ratios below are of)"; next }
      $5 == "gather" {
        pinned = ($3 == "pinned_host")
        target = pinned ? 0.90 : 0.85
        glim = pinned ? "pinned D2H" : "device memcpy"
        slim = pinned ? "pinned H2D" : "device memcpy"
        # gather <GB/s> GB/s <ratio>x  scatter <GB/s> GB/s <ratio>x  bytes exact
        g = $8; s = $12; sub(/x$/, "", g); sub(/x$/, "", s)
        mark = ""
        if (g + 0 < target || s + 0 < target) { mark = "  below " target; below++ }
        printf "  %-5s %-4s %-11s %-12s gather %s of %-13s (%s GB/s)  scatter %s of %-13s " \
               "(%s GB/s)  %s %s%s\n", $1, $2, $3, $4, g, glim, $6, s, slim, $10, $13, $14, mark
        figures++
        next
      }
      / overlap / {
        match($0, /overlap [0-9.-]+ of the ideal/)
        printf "  %-5s layer-wise %s\n", $1, substr($0, RSTART, RLENGTH)
        next
      }
      END {
        if (figures) printf "  %d cases, %d with a ratio below its target\n", figures, below + 0
      }' "$logs/bench.log")
  fi
fi

echo
echo "==== gpu_check summary ($((SECONDS - start))s; logs in $logs)"
for l in "${summary[@]}"; do echo "$l"; done
if [ "$no_device" -eq 1 ]; then
  echo "gpu_check: the CUDA runtime found no device, though this machine lists one"
  echo "gpu_check: (${gpu_list:-?}). Is the driver older than CUDA $nvcc_version needs?"
  echo "gpu_check: nothing was measured"
  exit 77
fi
if [ "$failed" -ne 0 ]; then
  echo "gpu_check: FAILED"
  exit 1
fi
echo "gpu_check: ok"
