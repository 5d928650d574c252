#!/usr/bin/env bash
# run.sh PYTHON ARGS...: runs the Python tests with the venv's interpreter, or skips (exit 77,
# ctest's SKIP_RETURN_CODE) when the venv has not been made (bash scripts/vllm_env.sh).
py=$1
shift
if [ ! -x "$py" ]; then
  echo "skipped: $py is missing; make it with: bash scripts/vllm_env.sh" >&2
  exit 77
fi
exec "$py" "$@"
