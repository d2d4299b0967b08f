#!/usr/bin/env bash
# The Optimum virtualenv: Optimum + optimum-onnx + the older transformers they pin + ONNX Runtime (CPU), apart
# from .venv, so that a test can open bundles the way Optimum users do (tests/integration/test_hf_compat.py).
#
# Usage: scripts/optimum-env.sh   -> prints the venv's python on stdout (progress goes to stderr)
#
# Cached: the venv lives in build/optimum-env/KEY, KEY a sha256 of requirements/optimum.txt, this script, the
# torch version and the Python version; a later run with the same KEY only prints the path. A venv is complete
# once .complete exists in it; an interrupted build is removed and redone. Venvs under other KEYs are deleted.
#
# torch comes first and from local disk: `pip install --no-index torch==2.13.0` finds the CPU wheel through
# pip's find-links (this machine's pip config names the directory). Where no such wheel exists, pip falls back
# to the index exactly as the Makefile does; a bare `torch` would pull a multi-GB CUDA build. Then every pin of
# requirements/optimum.txt with --no-deps (no resolver run) and `pip check`.
#
# PYTHON: the interpreter to base the venv on (default python3; a venv's python works, its base is used).
set -euo pipefail

cd "$(dirname "$0")/.."
TORCH_VERSION=2.13.0
REQUIREMENTS=requirements/optimum.txt
PYTHON=${PYTHON:-python3}
ROOT=build/optimum-env

py_version=$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
key=$({ cat "$REQUIREMENTS" "$0"; echo "torch==$TORCH_VERSION python$py_version"; } | sha256sum | cut -c1-16)
env_dir="$ROOT/$key"

if [ -f "$env_dir/.complete" ]; then
  echo "$PWD/$env_dir/bin/python"
  exit 0
fi

mkdir -p "$ROOT"
exec 9>"$ROOT/.lock"
flock 9  # another run may be building the same venv: wait for it, then use its result
if [ ! -f "$env_dir/.complete" ]; then
  started=$(date +%s)
  echo "optimum-env: building $env_dir (python $py_version, torch $TORCH_VERSION, $REQUIREMENTS)" >&2
  rm -rf "$env_dir"
  "$PYTHON" -m venv "$env_dir"
  pip=("$env_dir/bin/python" -m pip --disable-pip-version-check --quiet)
  if ! "${pip[@]}" install --no-deps --no-index "torch==$TORCH_VERSION" >&2 2>/dev/null; then
    echo "optimum-env: no torch $TORCH_VERSION wheel in pip's find-links; installing it from the index" >&2
    "${pip[@]}" install --no-deps "torch==$TORCH_VERSION" >&2
  fi
  "${pip[@]}" install --no-deps -r "$REQUIREMENTS" >&2
  "$env_dir/bin/python" -m pip check >&2
  "$env_dir/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' \
    || { echo "optimum-env: got a CUDA build of torch; expected the CPU wheel" >&2; exit 1; }
  for old in "$ROOT"/*/; do
    [ "${old%/}" = "$env_dir" ] || rm -rf "${old%/}"
  done
  touch "$env_dir/.complete"
  echo "optimum-env: built in $(($(date +%s) - started)) s" >&2
fi
echo "$PWD/$env_dir/bin/python"
