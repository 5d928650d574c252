#!/usr/bin/env bash
# kvtier next to LMCache on the bytes path, same machine, same storage, same object sizes, same
# bytes per round, interleaved and repeated. A developer command, not run by CI: it installs
# LMCache from PyPI (network) and takes minutes. See docs/performance.md, "Side by side with
# LMCache".
#
#   bench/compare/lmcache.sh [--rounds 3] [--sizes-kib 256,32768] [--bytes-mib 512]
#                            [--out build/compare-lmcache] [--dir DIR] [--build build]
#                            [--kvtier-batch-mib 64] [--only disk|redis] [--summarize OUTDIR]
#
# Each round runs, for each object size: LMCache's `lmcache bench l2` with the fs_native adapter
# (O_DIRECT) and with the resp adapter, kvtier-bench's whole tier stack (`tier --stack disk|redis`,
# gather from paged blocks, checksum, scatter) and its tier alone (`lower`, contiguous objects),
# all on DIR (same filesystem) and on one redis-server this script starts on loopback. The swept
# raw limits (`kvtier-bench limits`) are measured once per size in the first round and, inside
# each `tier` run, every round. Then prints kvtier / LMCache ratios (min / median / max over the
# rounds), each side's MB/s and kvtier's ratios to the limits, and plots them (gnuplot).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

rounds=3
sizes=256,32768
bytes_mib=512
build=$repo/build
out=""
dir=""
batch_mib=64
only=""
summarize=""
lmcache_version=0.5.6
die() { echo "lmcache.sh: $*" >&2; exit 1; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --sizes-kib) sizes=$2; shift 2 ;;
    --bytes-mib) bytes_mib=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --dir) dir=$2; shift 2 ;;
    --build) build=$2; shift 2 ;;
    --kvtier-batch-mib) batch_mib=$2; shift 2 ;;
    --only) only=$2; shift 2 ;;
    --summarize) summarize=$2; shift 2 ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $1 (see --help)" ;;
  esac
done
[[ $rounds =~ ^[1-9][0-9]*$ ]] || die "--rounds takes a positive number, not '$rounds'"
[[ $bytes_mib =~ ^[1-9][0-9]*$ ]] || die "--bytes-mib takes a positive number, not '$bytes_mib'"
[[ $batch_mib =~ ^[1-9][0-9]*$ ]] || die "--kvtier-batch-mib takes a positive number"
case "$only" in ""|disk|redis) ;; *) die "--only takes disk or redis, not '$only'" ;; esac

# --summarize: only parse the saved outputs of an earlier run (the ctest smoke check).
if [ -n "$summarize" ]; then
  exec python3 "$here/summarize.py" "$summarize"
fi

bench=$build/bench/kvtier-bench
[ -x "$bench" ] || die "$bench is missing: cmake --build $build --target kvtier-bench"
command -v redis-server >/dev/null || die "redis-server is missing (bash scripts/deps.sh)"
command -v gnuplot >/dev/null || die "gnuplot is missing (bash scripts/deps.sh)"
out=${out:-$build/compare-lmcache}
dir=${dir:-$build/compare-lmcache-data}
mkdir -p "$out/raw" "$dir"

# ---- LMCache in a virtual environment under the build directory (reused) ----------------------
venv=$build/venv-lmcache
if ! "$venv/bin/python" -c "import lmcache, sys; sys.exit(0)" 2>/dev/null ||
   [ "$("$venv/bin/python" -c 'from importlib.metadata import version; print(version("lmcache"))')" != "$lmcache_version" ]; then
  echo "lmcache.sh: installing LMCache $lmcache_version into $venv (PyPI; torch and CUDA wheels, a few GB)"
  t0=$(date +%s)
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q "lmcache==$lmcache_version" || die "pip install lmcache==$lmcache_version failed"
  echo "lmcache.sh: installed in $(( $(date +%s) - t0 )) s"
fi
lmcache=$venv/bin/lmcache
[ -x "$lmcache" ] || die "$lmcache is missing after the install"

# ---- a redis-server of our own on loopback ----------------------------------------------------
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
rdir=$(mktemp -d)
redis-server --bind 127.0.0.1 --port "$port" --save "" --appendonly no --dir "$rdir" \
  --daemonize no --logfile "$rdir/redis.log" &
rpid=$!
cleanup() {
  kill "$rpid" 2>/dev/null || true
  wait "$rpid" 2>/dev/null || true
  rm -rf "$rdir" "$dir"/lmcache-fs "$dir"/lower-* "$dir"/run-* 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM
for _ in $(seq 50); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis-cli -p "$port" ping >/dev/null 2>&1 || die "redis-server did not start (see $rdir/redis.log)"
address=127.0.0.1:$port
flush() { redis-cli -p "$port" flushall >/dev/null; }

# ---- the runs ---------------------------------------------------------------------------------
# Object size KiB -> kvtier model shape with that chunk size: 32 layers x 8 heads x 128 x bf16
# at 256 tokens is 32 MiB (Llama-3-8B); other sizes scale layers and chunk tokens.
shape_of() {  # KiB -> "--layers L --chunk N"
  local kib=$1 bytes=$(( $1 * 1024 )) per_tok=$(( 2 * 8 * 128 * 2 ))  # per layer and token
  for n in 256 128 64 512; do
    local per_layer=$(( per_tok * n ))
    if (( bytes % per_layer == 0 && bytes / per_layer >= 1 )); then
      echo "--layers $(( bytes / per_layer )) --chunk $n"
      return
    fi
  done
  die "object size $kib KiB is not a whole number of 8-head, 128-wide bf16 layers at 64-512 tokens"
}
log() { echo "[$(date -u +%H:%M:%S)] $*" >&2; }
run_lmcache() {  # round kib medium
  local r=$1 kib=$2 medium=$3 keys=$(( bytes_mib * 1024 / $2 )) spec
  if [ "$medium" = disk ]; then
    rm -rf "$dir/lmcache-fs"
    mkdir -p "$dir/lmcache-fs"
    spec="{\"type\":\"fs_native\",\"base_path\":\"$dir/lmcache-fs\",\"use_odirect\":true}"
  else
    flush
    spec="{\"type\":\"resp\",\"host\":\"127.0.0.1\",\"port\":$port}"
  fi
  log "round $r: LMCache $medium ${kib} KiB x $keys"
  "$lmcache" bench l2 --l2-adapter "$spec" --num-keys "$keys" --data-size-kb "$kib" \
    --l1-align-bytes 4096 --no-skip-verify --warmup-rounds 1 --rounds 2 --format json \
    --output "$out/raw/r$r-lmcache-$medium-$kib.json" -q \
    > "$out/raw/r$r-lmcache-$medium-$kib.log" 2>&1 ||
    die "lmcache bench l2 ($medium, $kib KiB) failed: see $out/raw/r$r-lmcache-$medium-$kib.log"
  rm -rf "$dir/lmcache-fs"
  [ "$medium" = disk ] || flush
}
run_kvtier() {  # round kib medium
  local r=$1 kib=$2 medium=$3 keys=$(( bytes_mib * 1024 / $2 ))
  local batch=$(( batch_mib * 1024 / kib )) f
  (( batch >= 1 )) || batch=1
  (( batch <= keys )) || batch=$keys
  local redis_arg=()
  [ "$medium" = disk ] || redis_arg=(--redis "$address")
  log "round $r: kvtier $medium ${kib} KiB x $keys, $batch per call (stack, then tier alone)"
  f=$out/raw/r$r-kvtier-$medium-$kib.json
  # shellcheck disable=SC2046
  "$bench" tier --stack "$medium" $(shape_of "$kib") --keys "$keys" --batch "$batch" --iters 3 \
    --dir "$dir" "${redis_arg[@]}" --json > "$f" 2> "$f.err" ||
    die "kvtier-bench tier ($medium, $kib KiB) failed: see $f.err"
  f=$out/raw/r$r-kvtier-alone-$medium-$kib.json
  "$bench" lower --stack "$medium" --object-kib "$kib" --objects "$keys" --batch "$batch" \
    --iters 3 --no-limits --dir "$dir" "${redis_arg[@]}" --json > "$f" 2> "$f.err" ||
    die "kvtier-bench lower ($medium, $kib KiB) failed: see $f.err"
}
media=(disk redis)
[ -z "$only" ] || media=("$only")
IFS=, read -r -a kibs <<< "$sizes"
for kib in "${kibs[@]}"; do
  if ! [[ $kib =~ ^[1-9][0-9]*$ ]] || (( kib % 4 != 0 )); then
    die "--sizes-kib: '$kib' is not a positive multiple of 4"
  fi
  shape_of "$kib" >/dev/null
  (( bytes_mib * 1024 / kib >= 1 )) || die "--bytes-mib $bytes_mib holds no object of $kib KiB"
done
t_start=$(date +%s)
for r in $(seq 1 "$rounds"); do
  for kib in "${kibs[@]}"; do
    keys=$(( bytes_mib * 1024 / kib ))
    if [ "$r" = 1 ]; then
      log "limits ${kib} KiB: swept raw limits and the older baselines"
      "$bench" limits --object-kib "$kib" --objects "$keys" --dir "$dir" --redis "$address" \
        --json > "$out/raw/limits-$kib.json" 2> "$out/raw/limits-$kib.err" ||
        die "kvtier-bench limits failed: see $out/raw/limits-$kib.err"
      flush
    fi
    for medium in "${media[@]}"; do
      # Alternate which side goes first, so that a drift of the machine hits both alike.
      if (( r % 2 )); then
        run_lmcache "$r" "$kib" "$medium"
        run_kvtier "$r" "$kib" "$medium"
      else
        run_kvtier "$r" "$kib" "$medium"
        run_lmcache "$r" "$kib" "$medium"
      fi
    done
  done
done
log "done in $(( $(date +%s) - t_start )) s; load average: $(cut -d' ' -f1-3 /proc/loadavg)"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "rounds: $rounds; sizes KiB: $sizes; bytes per round: $bytes_mib MiB; kvtier per call: $batch_mib MiB"
  echo "lmcache: $lmcache_version; redis: $(redis-server --version | cut -d' ' -f3); dir: $dir ($(df -T "$dir" | awk 'NR==2{print $2}'))"
  echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg); cores: $(nproc)"
} > "$out/raw/machine.txt"
python3 "$here/summarize.py" "$out"
