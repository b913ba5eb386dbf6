#!/usr/bin/env bash
# A device session's GPU work as ONE background chain on one warm machine, fed and read by short
# device calls. Why: the machine is held for 30 minutes at most, /tmp lives only while it stays warm
# (~30 s after a call), a call carries at most 64 MiB (onnxruntime-gpu needs 4 calls) and returns at
# most 8 files; the 16b engine builds (CPU, 5-8 min each) and the GPU runs overlap only if something
# keeps running between calls.
#
#   bash benchmarks/device_chain.sh start [STEPS [STEPS_GPU1]]
#                                                  # call 1: install the package, start the chain, return
#   bash benchmarks/device_chain.sh chunk FILE     # calls 2..: hand over one onnxruntime-gpu chunk
#                                                  #   (benchmarks/pack_onnxruntime_gpu.sh; the last one
#                                                  #   is named with `chunk FILE last`)
#   bash benchmarks/device_chain.sh setenv TAG "NAME=VALUE ..."
#                                                  # later calls: more environment for torch16b:...:TAG steps
#                                                  #   not yet started (switches picked by an earlier step)
#   bash benchmarks/device_chain.sh wait SECONDS   # later calls: wait until the chain ends or SECONDS
#                                                  #   pass, then pack everything into $OUT/chain.tgz
#
# Every call prints the chain's log and packs its results, so a machine lost mid-way still leaves
# what was measured up to the previous call. STEPS: comma-separated, run in that order (default:
# session 3's "builds,probe,ort,profile,trace,torch16b"). STEPS_GPU1, on a machine of 2+ GPUs: a
# second lane run at the same time on GPU 1 and the upper half of the cores (lane 0 then takes GPU 0
# and the lower half); on one GPU it runs after STEPS. Each lane's processes see only their GPU
# (CUDA_VISIBLE_DEVICES), so the timings of one lane are not shared with the other's kernels.
#   builds     in the background (cores 8-15): benchmarks/ort_builds_16b.sh, the 16b ONNX Runtime CUDA
#              engines ($PRECISIONS, default "bf16 fp8"); the next steps run on cores 0-7 and the GPU
#   probe      benchmarks/torch_load_probe.py (tiny torch engine on CUDA: which load/run stage dies)
#   tinytorch  benchmarks/torch_tiny_cuda.py (tiny torch engine on CUDA: build, accuracy, generate)
#   torch16b   benchmarks/torch_16b.py ($TORCH16B_PRECISIONS, default "fp8,bf16"), with the time left
#              until minute 28; `torch16b:PREC[:END]` runs precision PREC with the time left until
#              minute END (its results in torch16b-PREC/); `torch16b:PREC:END:TAG` adds the arguments
#              in $TORCH16B_ARGS_<TAG> (e.g. "--n-layers 4 --moe-align kernel"), results in torch16b-PREC-TAG/,
#              and runs it with the NAME=VALUE pairs of $TORCH16B_ENV_<TAG> in its environment (switches read at
#              import, e.g. "DSV3_TRITON_GDC=1": one process per setting, several tags per arm for an A/B across builds)
#   kernels    benchmarks/kernels.py ($KERNELS_ARGS)
#   ort        benchmarks/onnxruntime_16b.py --wait-builds: eager reference first, then each engine as
#              soon as its build is done, generate included (one process: one run); needs onnxruntime-gpu
#   profile    dsv3-export profile of the 16b engines (--batch 1,8,64 --prompt-len 128,1024
#              --decode-steps 64): the numbers of benchmarks/RESULTS.md
#   trace      dsv3-export profile --trace of the bf16 engine at batch 1 (ONNX Runtime's per-op times)
# A step starts only if the minutes since `start` are below its start limit (the machine goes back
# 30 minutes after it was taken, with whatever is running).
set -u
CHAIN=${CHAIN_DIR:-/tmp/chain}
ORT_SITE=/tmp/site
ORT_CHUNKS=/tmp/ortxz
ENGINES=/tmp/ort16b
SRC=/tmp/chain-src  # the chain's own copy of the working tree (see `start`)

log() { echo "=== $(date +%T) $*" >> "$CHAIN/chain.log"; }
minutes() { echo $(( ($(date +%s) - $(cat "$CHAIN/t0")) / 60 )); }

CORES=${CHAIN_CORES:-0-7}  # this lane's CPU cores (taskset); the background builds take 8-15

# step NAME START_LIMIT_MIN CMD...: run CMD (output in NAME.log) unless the chain is START_LIMIT_MIN old
step() {
  local name=$1 limit=$2; shift 2
  if [ "$(minutes)" -ge "$limit" ]; then log "$name skipped: $(minutes) min >= $limit"; return; fi
  log "$name start"
  local t=$(date +%s)
  "$@" > "$CHAIN/$name.log" 2>&1
  log "$name rc=$? in $(( $(date +%s) - t )) s"
}

# The waits end at the waiting step's start limit ($1), so a missing chunk or a build never started
# makes that step log "skipped" and the chain go on instead of blocking every later step.
wait_for_onnxruntime() {
  while [ ! -f "$ORT_SITE/.unpacked" ] && [ "$(minutes)" -lt "$1" ]; do sleep 2; done
}

wait_for_engine() {  # the background build of engine-$2 finished (done or failed), or $1 minutes passed
  while [ ! -f "$ENGINES/engine-$2.done" ] && [ ! -f "$ENGINES/engine-$2.failed" ] && [ "$(minutes)" -lt "$1" ]; do
    sleep 2
  done
}

run_step() {
  local prec end
  case $1 in
    torch16b:*) prec=$(echo "$1" | cut -d: -f2); end=$(echo "$1" | cut -d: -f3); end=${end:-28}
                tag=$(echo "$1" | cut -d: -f4); extra=""; [ -n "$tag" ] && extra=$(printenv "TORCH16B_ARGS_$tag")
                procenv=""; [ -n "$tag" ] && procenv=$(printenv "TORCH16B_ENV_$tag")
                # pairs set after the start (`setenv TAG ...`, e.g. configs picked by an earlier step)
                [ -n "$tag" ] && [ -f "$CHAIN/env-$tag" ] && procenv="$procenv $(cat "$CHAIN/env-$tag")"
                step "torch16b-$prec${tag:+-$tag}" $(( end - 8 )) env $procenv taskset -c $CORES python3 benchmarks/torch_16b.py \
                  --precisions "$prec" --budget-s $(( (end - $(minutes)) * 60 )) $extra \
                  --out "$CHAIN/torch16b-$prec${tag:+-$tag}" ;;
    builds) taskset -c 8-15 env WORK=$ENGINES bash benchmarks/ort_builds_16b.sh > "$CHAIN/ort_builds.log" 2>&1 &
            log "builds started in the background" ;;
    probe) step probe 12 taskset -c $CORES timeout 480 python3 benchmarks/torch_load_probe.py --timeout 300 \
             --out "$CHAIN/probe" ;;
    tinytorch) step tinytorch 20 taskset -c $CORES timeout 540 python3 benchmarks/torch_tiny_cuda.py --out "$CHAIN/tinytorch" ;;
    torch16b) step torch16b 20 taskset -c $CORES python3 benchmarks/torch_16b.py --precisions "${TORCH16B_PRECISIONS:-fp8,bf16}" \
                --budget-s $(( (28 - $(minutes)) * 60 )) --out "$CHAIN/torch16b" ;;
    kernels) mkdir -p "$CHAIN/kernels"
             step kernels 24 env OUT="$CHAIN/kernels" taskset -c $CORES timeout ${KERNELS_TIMEOUT:-480} \
               python3 benchmarks/kernels.py ${KERNELS_ARGS:-} ;;
    ort) wait_for_onnxruntime 14
         step ort 14 env PYTHONPATH=$ORT_SITE taskset -c $CORES python3 benchmarks/onnxruntime_16b.py \
           --precisions "$(echo ${PRECISIONS:-bf16 fp8} | tr ' ' ,)" --wait-builds 900 --budget-s 1500 --out "$CHAIN/ort" ;;
    profile) wait_for_onnxruntime 21
             step profile 21 env PYTHONPATH=$ORT_SITE taskset -c $CORES python3 -m dsv3_export profile \
               "$ENGINES/engine-bf16" --compare "$ENGINES/engine-fp8" --batch 1,8,64 --prompt-len 128,1024 \
               --decode-steps 64 --out "$CHAIN/profile" ;;
    trace) wait_for_onnxruntime 24; wait_for_engine 24 bf16
           step trace 24 env PYTHONPATH=$ORT_SITE taskset -c $CORES python3 -m dsv3_export profile "$ENGINES/engine-bf16" \
             --batch 1 --prompt-len 128 --decode-steps 8 --repeats 1 --trace --out "$CHAIN/trace" ;;
    *) log "unknown step $1" ;;
  esac
}

lane() {  # lane STEPS: run the steps in order
  for name in $(echo "$1" | tr , ' '); do run_step "$name"; done
}

chain() {  # chain STEPS [STEPS_GPU1]
  export PYTHONUNBUFFERED=1 TORCH_DISABLE_ADDR2LINE=1  # symbolizing every C++ exception slowed builds 3x
  local steps=${1:-builds,probe,ort,profile,trace,torch16b} steps1=${2:-}
  local gpus cores
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  cores=$(nproc)
  if [ -n "$steps1" ] && [ "${gpus:-0}" -ge 2 ]; then
    log "two lanes: GPU 0 on cores 0-$(( cores / 2 - 1 )), GPU 1 on cores $(( cores / 2 ))-$(( cores - 1 ))"
    (CORES=$(( cores / 2 ))-$(( cores - 1 )) CUDA_VISIBLE_DEVICES=1 lane "$steps1"; log "lane GPU 1 done") &
    CORES=0-$(( cores / 2 - 1 )) CUDA_VISIBLE_DEVICES=0 lane "$steps"
    log "lane GPU 0 done"
    wait
  else
    lane "$steps${steps1:+,$steps1}"
  fi
  log "chain done"
  touch "$CHAIN/chain.done"
}

report() {
  echo "--- chain.log ($(minutes) min since start)"; cat "$CHAIN/chain.log"
  echo "--- ort_builds.log (tail)"; tail -n 8 "$CHAIN/ort_builds.log" 2>/dev/null
  for f in "$CHAIN"/*.log; do
    case $f in */chain.log|*/ort_builds.log) continue ;; esac
    echo "--- $(basename "$f") (tail)"; tail -n 25 "$f"
  done
  # one file back (a call returns files of 16 MiB at most): logs, JSON, Markdown and plots; not the
  # probe's engine, nor any file over 8 MiB (a raw ORT trace: its per-op table is in report.md)
  if [ -n "${OUT:-}" ]; then
    (cd "$CHAIN" && find . -type f -size +8M) > "$CHAIN/.too_big"
    [ -s "$CHAIN/.too_big" ] && echo "left out of chain.tgz (over 8 MiB):" && cat "$CHAIN/.too_big"
    tar czf "$OUT/chain.tgz" -C "$CHAIN" --exclude=engine --exclude='*.pt2' --exclude-from="$CHAIN/.too_big" . \
      && ls -l "$OUT/chain.tgz"
  fi
  [ -n "${OUT:-}" ] && cp "$ENGINES"/build-*.log "$OUT/" 2>/dev/null
  true
}

case ${1:-} in
  start)
    mkdir -p "$CHAIN" "$ORT_CHUNKS"
    date +%s > "$CHAIN/t0"
    if [ -z "${CHAIN_NO_INSTALL:-}" ]; then  # set it where the package is installed already
      # The chain runs from its own copy of the tree: each device call re-sends the working tree
      # and replaces carried folders, which pulled the ground from under a running chain (its
      # working directory vanished mid-build: "getcwd() failed").
      rm -rf "$SRC" && mkdir -p "$SRC" && cp -a . "$SRC/" && cd "$SRC" || exit 1
      python3 -m pip install -q --no-deps --no-build-isolation -e . > "$CHAIN/install.log" 2>&1 \
        || { cat "$CHAIN/install.log"; exit 1; }
    fi
    log "installed; chain starting"
    setsid nohup bash "$(pwd)/benchmarks/device_chain.sh" _chain "${2:-}" "${3:-}" < /dev/null > "$CHAIN/chain.out" 2>&1 &
    sleep 5
    report
    ;;
  chunk)
    mkdir -p "$ORT_CHUNKS"
    cp "$2" "$ORT_CHUNKS/" && log "chunk $(basename "$2") copied"
    if [ "${3:-}" = last ]; then
      mkdir -p "$ORT_SITE"
      cat "$ORT_CHUNKS"/ortxz.* | xz -d | tar x -C "$ORT_SITE" && touch "$ORT_SITE/.unpacked" \
        && log "onnxruntime-gpu unpacked into $ORT_SITE" || log "onnxruntime-gpu unpack FAILED"
    fi
    report
    ;;
  wait)
    end=$(( $(date +%s) + ${2:-60} ))
    while [ ! -f "$CHAIN/chain.done" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
    report
    ;;
  setenv)  # setenv TAG "NAME=VALUE ...": added to torch16b:...:TAG's environment if that step has not started
    # written whole, then renamed: a step starting meanwhile reads the old file or the new one, never half of it
    mkdir -p "$CHAIN" && echo "${3:-}" > "$CHAIN/.env-$2" && mv "$CHAIN/.env-$2" "$CHAIN/env-$2" && log "env-$2: ${3:-}"
    report
    ;;
  _chain) chain "${2:-}" "${3:-}" ;;
  *) echo "usage: $0 start [STEPS [STEPS_GPU1]] | chunk FILE [last] | setenv TAG PAIRS | wait SECONDS" >&2; exit 2 ;;
esac
