#!/usr/bin/env bash
# The prepared GPU check: run it first whenever a GPU machine is lent (see README, "The GPU check").
#
#   bash bench/gpu-check.sh --prepare [3.12]  # here, with network: the wheels the GPU image lacks, for its Python
#   bash bench/gpu-check.sh [--dry-run] # there: tests on CUDA, compute-sanitizer, bench; everything into $OUT
#
# The GPU image brings its own torch and triton and cannot fetch anything, and nanfuse is not installed
# there: this script lays the package out as it installs (kernels/ as nanfuse/kernels) in a scratch folder,
# puts the carried pure-Python wheels (Liger-Kernel, hypothesis) beside it, and runs `nanfuse gpu-check`
# from there. Writes to $OUT when set (the device tool fetches that folder), else to ./gpu-check.
set -uo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
wheels="$repo/.gpu-wheels"

if [ "${1:-}" = "--prepare" ]; then
  rm -rf "$wheels" && mkdir -p "$wheels"
  # wheels for the GPU image's Python (3.12 there so far); --no-deps: torch and triton are the image's own
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "${2:-3.12}" \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d "$wheels" \
    liger-kernel hypothesis attrs sortedcontainers
  ls -la "$wheels"
  exit 0
fi

out="${OUT:-$repo/gpu-check}"
mkdir -p "$out"
stage=$(mktemp -d)
mkdir -p "$stage/pkg" "$stage/site"
cp -r "$repo/nanfuse" "$stage/pkg/nanfuse"
rm -rf "$stage/pkg/nanfuse/kernels"
cp -r "$repo/kernels" "$stage/pkg/nanfuse/kernels"
for wheel in "$wheels"/*.whl; do
  [ -e "$wheel" ] || continue
  python3 -m pip install --quiet --no-deps --no-index --target "$stage/site" "$wheel" >>"$out/wheels.log" 2>&1 \
    || echo "could not install $wheel" >>"$out/wheels.log"
done
# the staged package first, then the carried wheels, then whatever the image has
export PYTHONPATH="$stage/pkg:$stage/site${PYTHONPATH:+:$PYTHONPATH}"
cd "$stage/pkg" || exit 1
python3 -m nanfuse gpu-check --repo "$repo" --out "$out" "$@"
status=$?
rm -rf "$stage"
exit $status
