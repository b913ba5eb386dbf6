#!/usr/bin/env bash
# Pack triton 3.9 (torch 2.13's; the H200 image has 3.6, whose Gluon cannot multicast TMA loads) for one device call:
# the wheel's tree without what a sm_90 Gluon build does not use (the AMD codegen library, proton, the CUDA 13
# ptxas, nvdisasm, cupti), libtriton.so stripped, as .t39/t39.tar.xz (~42 MB; a call carries 64 MiB with the working
# tree). The AMD backend's Python files travel apart (.t39/amd.tar.xz, ~0.5 MB): triton discovers its backends through
# the image's installed entry points, which name amd too.
#
#   benchmarks/pack_triton39.sh [WHEEL]      # default: download triton==3.9.0 (cp312-abi3)
#
# A device call then starts with (benchmarks/fp8_cluster_probe.py, session 33):
#   P36=$(python3 -c "import triton,os;print(os.path.dirname(triton.__file__))"); mkdir -p /tmp/t39 &&
#   tar xJf .t39/t39.tar.xz -C /tmp/t39 && tar xJf .t39/amd.tar.xz -C /tmp/t39 &&
#   export PYTHONPATH=/tmp/t39 TRITON_PTXAS_BLACKWELL_PATH=$P36/backends/nvidia/bin/ptxas-blackwell
# with carry [".t39"]. Triton 3.9 assembles sm_90 with its ptxas-blackwell (CUDA 13, PTX 9.x); pointed at the
# image's CUDA 12.9 one it emits PTX 8.8, which that ptxas takes.
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
exclude=$(git rev-parse --git-path info/exclude); mkdir -p "$(dirname "$exclude")"
grep -qx '/.t39/' "$exclude" 2>/dev/null || echo '/.t39/' >> "$exclude"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
wheel=${1:-}
if [ -z "$wheel" ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$work/dl" triton==3.9.0
  wheel=$(ls "$work"/dl/*.whl)
fi
mkdir -p "$work/tree" .t39
( cd "$work/tree" && python3 -m zipfile -e "$wheel" . )
t="$work/tree/triton"
rm -rf "$t/backends/amd/lib/libtriton_amd_codegen.so" "$t/_C/libproton.so" "$t/profiler" "$t/instrumentation" \
  "$t/backends/nvidia/bin/ptxas-blackwell" "$t/backends/nvidia/bin/ptxas" "$t/backends/nvidia/bin/nvdisasm" \
  "$t"/backends/nvidia/lib/cupti*
strip --strip-unneeded "$t/_C/libtriton.so"
( cd "$work/tree" && tar cf - --exclude=triton/backends/amd triton | xz -T0 -6 > "$root/.t39/t39.tar.xz" )
( cd "$work/tree" && tar cf - triton/backends/amd | xz -T0 -6 > "$root/.t39/amd.tar.xz" )
ls -l .t39/
