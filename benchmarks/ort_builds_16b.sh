#!/usr/bin/env bash
# Build the 16b ONNX Runtime CUDA engines (bf16, then fp8) into $WORK (default /tmp/ort16b), one
# after the other, for benchmarks/onnxruntime_16b.py to reuse. Made to run in the background of
# other device calls on the same warm machine (setsid), on CPU cores the foreground does not use:
#
#   setsid nohup taskset -c 8-15 bash benchmarks/ort_builds_16b.sh > /tmp/ort16b.log 2>&1 < /dev/null &
#
# The build needs no GPU and no onnxruntime-gpu. Each finished engine leaves $WORK/engine-P.done;
# a failed one leaves $WORK/engine-P.failed with the exit code.
set -u
WORK=${WORK:-/tmp/ort16b}
mkdir -p "$WORK"
for precision in ${PRECISIONS:-bf16 fp8}; do
  start=$(date +%s)
  echo "=== $(date +%T) build $precision"
  python3 -m dsv3_export build --preset 16b --backend onnxruntime --device cuda --precision "$precision" \
    --seed 0 --max-batch-size 64 --out "$WORK/engine-$precision" > "$WORK/build-$precision.log" 2>&1
  rc=$?
  echo "=== $(date +%T) build $precision rc=$rc in $(( $(date +%s) - start )) s"
  tail -25 "$WORK/build-$precision.log"
  if [ $rc -eq 0 ]; then touch "$WORK/engine-$precision.done"; else echo $rc > "$WORK/engine-$precision.failed"; fi
done
