#!/usr/bin/env bash
# Pack onnxruntime-gpu for the GPU machine in 4 device calls instead of the 5 that
# ../shared/tools/device-wheels needs: the wheel's installed tree (without the TensorRT provider,
# which the machine cannot use) as one xz tarball, split into 60 MiB chunks. Measured for
# onnxruntime-gpu 1.31.1: 255.6 MB wheel -> 204.1 MB tar.xz -> 4 chunks (a call carries at most
# 64 MiB with the working tree).
#
#   benchmarks/pack_onnxruntime_gpu.sh [WHEEL]      # default: download onnxruntime-gpu==1.31.1 (cp312)
#
# Writes .devwheels/ortxz.00, .devwheels/ortxz.01, ... (git-ignored) and prints the device calls.
# The GPU machine keeps /tmp only while it stays warm (~30 s after a call): make them back to back.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
grep -qx '/.devwheels/' .git/info/exclude 2>/dev/null || echo '/.devwheels/' >> .git/info/exclude
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
wheel=${1:-}
if [ -z "$wheel" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$work/dl" onnxruntime-gpu==1.31.1
  wheel=$(ls "$work"/dl/*.whl)
fi
mkdir -p "$work/tree" .devwheels
( cd "$work/tree" && python3 -m zipfile -e "$wheel" . )
rm -f .devwheels/ortxz.*
( cd "$work/tree" && tar cf - --exclude='onnxruntime/capi/libonnxruntime_providers_tensorrt.so' . \
    | xz -T0 -6 | split -b 60M -d - "$root/.devwheels/ortxz." )
ls -l .devwheels/ortxz.*
echo "Device calls, back to back (each carries one chunk; add it to the call's own work):"
for f in .devwheels/ortxz.*; do
  echo "  carry [\"$f\"]  command prefix: mkdir -p /tmp/ortxz && cp $f /tmp/ortxz/;"
done
echo "After the last chunk, in the same warm machine, start each command with:"
echo "  [ -d /tmp/site/onnxruntime ] || (mkdir -p /tmp/site && cat /tmp/ortxz/ortxz.* | xz -d | tar x -C /tmp/site); export PYTHONPATH=/tmp/site;"
