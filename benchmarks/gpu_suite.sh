#!/usr/bin/env bash
# The GPU run: CUDA tests, speed on CUDA and a resumable D2R MT10 training run, on a machine
# without network that has Python 3.12 and torch 2.11 (CUDA 13) but none of the other
# dependencies, where one command may run 10 minutes and 64 MiB travel per call.
#
#   bash benchmarks/gpu_suite.sh STEP [STEP ...]
#
# Steps on the GPU machine (each ends well inside 10 minutes; results go to $OUT):
#   tests   the CUDA-marked tests (pytest -m cuda)                                -> tests.log
#   speed   bench_update.py on CUDA (eager, then each COMPILED_UPDATE_ARGS entry),
#           then speed_suite.py (env, CPU and CUDA updates, end-to-end MT10 recipe)
#                                            -> update_cuda_*.json, speed.json, speed.md
#   train   D2R MT10, random goals, reference settings otherwise; resumes .gpu/d2r_mt10
#           when it holds a checkpoint. SIGINT after TRAIN_SECONDS (default 420): the
#           trainer finishes its update, saves and returns; SIGKILL STOP_GRACE (90) s
#           later. The run directory comes back packed as run.tar.part-* (15 MiB pieces),
#           then the report below                                -> train.log, run.tar.part-*
#   report  learning_curve.png and learning.json from the run's CSV logs
#           (benchmarks/gpu_learning_curve.py; needs no GPU, runs here too)
# Every GPU step first installs the carried wheels into /tmp/site (skipped while a warm
# machine still has them), puts /tmp/site and the repository on PYTHONPATH (the package is
# imported from the source tree, never pip-installed: pyproject pins torch 2.15), writes
# the GPU model and the torch/CUDA/torchrl versions to environment.txt, and probes
# torchrl's compiled extension: buffer.kind=stratified_prioritized (the default) if it loads,
# else stratified.
# Steps here, without a GPU:
#   unpack DIR   restore .gpu/d2r_mt10 from the run.tar.part-* files a train call returned
#   size         what the next call would carry (repository, .whl, .gpu) against 64 MiB
#
# Device-tool calls, in order (the persistence of the run directory: it lives in .gpu/,
# ignored by git; `carry` sends it to the machine and the train step sends it back packed
# under $OUT, because a machine keeps nothing once it has been idle 30 s):
#   here:  bash benchmarks/gpu_wheels.sh            (once: .whl/, 23 MiB)
#   1. run(command="bash benchmarks/gpu_suite.sh tests speed", carry=[".whl"], timeout_s=600)
#   2. run(command="bash benchmarks/gpu_suite.sh train", carry=[".whl", ".gpu"], timeout_s=600)
#      here:  bash benchmarks/gpu_suite.sh unpack FILES_AT && bash benchmarks/gpu_suite.sh size
#   3. as 2, as long as device time is left; for a shorter last call put the budget in the
#      command: run(command="TRAIN_SECONDS=240 bash benchmarks/gpu_suite.sh train", ...)
#   here:  bash benchmarks/gpu_suite.sh report   (or take learning_curve.png from the last call)
# FILES_AT is the folder the reply names for the returned files.
#
# Limits, worked out for D2R MT10 (reference networks):
#   - The checkpoint (actor, twin critics and their targets, Adam moments, temperatures)
#     is 29 MiB once updates have run, 13 MiB before; the wheels 23 MiB after slimming
#     Meta-World; the repository < 1 MiB: 53 MiB of the 64 MiB a call may carry (`size`
#     checks it). With Meta-World's full wheel (35 MiB instead of 12) they would not fit.
#     The packed run directory comes back in 2 pieces of at most 15 MiB (16 MiB per file).
#   - The replay buffer is not saved (buffer.in_checkpoint=false): 1M transitions are
#     ~0.5 GB, far beyond 64 MiB, and any capacity small enough to travel would change the
#     algorithm. Each resumed call refills it: the 20 warm-up rounds (40,000 frames with
#     the current policy) run again before updates restart, a fixed cost per call.
#   - Evaluation every 10 rounds (10 episodes per task) and a checkpoint every 10 rounds,
#     so that a short call still adds points to the curve and a kill loses little;
#     evaluation settings change no training setting.
# Settings for a dry run on a machine without a GPU: REQUIRE_CUDA=0, WHEEL_DIR, SITE,
# STATE, OUT and the time limits and overrides below.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

WHEEL_DIR=${WHEEL_DIR:-.whl}
SITE=${SITE:-/tmp/site}
STATE=${STATE:-.gpu}
RUN_NAME=d2r_mt10
RUN_DIR=$STATE/$RUN_NAME
OUT=${OUT:-$ROOT/benchmarks/out/gpu}
REQUIRE_CUDA=${REQUIRE_CUDA:-1}
TRAIN_SECONDS=${TRAIN_SECONDS:-420}
STOP_GRACE=${STOP_GRACE:-90}
# Time limits of the other parts: tests + speed fit one call (150 + 90 + 300 s + set-up);
# each compiled variant adds up to BENCH_SECONDS, so with them run speed in its own call.
TESTS_SECONDS=${TESTS_SECONDS:-150}
BENCH_SECONDS=${BENCH_SECONDS:-90}
SUITE_SECONDS=${SUITE_SECONDS:-300}
PART_SIZE=15M
LIMIT_BYTES=$((64 * 1048576))
# Extra bench_update.py arguments, one string per compiled variant of the update (eager
# runs first without any; each variant's table repeats the eager rows next to its own).
COMPILED_UPDATE_ARGS=("--compile --cudagraphs" "--compile --compile-mode reduce-overhead")
# More overrides for the end-to-end recipe runs of speed_suite.py, space-separated, e.g.
# SPEED_EXTRA="collector.kind=multi_sync collector.num_workers=5" to compare collectors.
read -r -a SPEED_EXTRA <<< "${SPEED_EXTRA:-}"
# Overrides for a new training run (a resumed run keeps its saved configuration).
TRAIN_OVERRIDES=(
  env.goals=random
  eval.interval_rounds=10
  eval.episodes_per_task=10
  log.checkpoint_interval_rounds=10
  log.progress_bar=false
)
# More overrides for a new run, space-separated, e.g. the collector chosen by the speed
# step: TRAIN_EXTRA="collector.kind=multi_sync collector.num_workers=5".
read -r -a TRAIN_EXTRA <<< "${TRAIN_EXTRA:-}"

die() { echo "error: $*" >&2; exit 1; }

python_path() {
  [[ :${PYTHONPATH:-}: == *:$SITE:$ROOT:* ]] || export PYTHONPATH=$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}
  export PYTHONUNBUFFERED=1
}

setup() {
  mkdir -p "$OUT"
  if [[ ! -f $SITE/.installed ]]; then
    compgen -G "$WHEEL_DIR/*.whl" >/dev/null || die "no wheels in $WHEEL_DIR: run benchmarks/gpu_wheels.sh here and carry .whl"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHEEL_DIR"/*.whl \
      || die "installing the carried wheels failed"
    touch "$SITE/.installed"
  fi
  python_path
  BUFFER_KIND=$(python3 -c "from d2r_torchrl._extension import require_torchrl_extension as r; r()" 2>/dev/null \
    && echo stratified_prioritized || echo stratified)
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
    python3 - <<'EOF'
import os, platform
from importlib.metadata import version
import torch
names = ("torchrl", "tensordict", "mujoco", "gymnasium", "metaworld")
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      + ", ".join(f"{name} {version(name)}" for name in names))
print("cuda device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", f"| cpu cores: {os.cpu_count()}")
EOF
    echo "torchrl extension: buffer.kind=$BUFFER_KIND"
  } 2>&1 | tee "$OUT/environment.txt"
  if [[ $REQUIRE_CUDA == 1 ]]; then
    python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())" || die "CUDA is not available here"
  fi
}

step_tests() {
  timeout "$TESTS_SECONDS" python3 -m pytest -m cuda -rs -p no:cacheprovider tests 2>&1 | tee "$OUT/tests.log"
}

step_speed() {
  local i
  timeout "$BENCH_SECONDS" python3 benchmarks/bench_update.py --device cuda --repeats 20 --json "$OUT/update_cuda_eager.json" 2>&1 | tee "$OUT/speed.log"
  for i in "${!COMPILED_UPDATE_ARGS[@]}"; do
    # shellcheck disable=SC2086  # each entry is a list of arguments
    timeout "$BENCH_SECONDS" python3 benchmarks/bench_update.py --device cuda --repeats 20 ${COMPILED_UPDATE_ARGS[$i]} \
      --json "$OUT/update_cuda_compiled$i.json" 2>&1 | tee -a "$OUT/speed.log"
  done
  rm -rf /tmp/speed
  timeout "$SUITE_SECONDS" python3 benchmarks/speed_suite.py --out /tmp/speed --no-kernel-count --set "buffer.kind=$BUFFER_KIND" "${SPEED_EXTRA[@]}" 2>&1 | tee -a "$OUT/speed.log"
  cp /tmp/speed/speed.json /tmp/speed/speed.md "$OUT/" 2>/dev/null || echo "speed_suite.py did not finish: see speed.log"
}

step_train() {
  local args started began code
  mkdir -p "$STATE"
  if [[ -f $RUN_DIR/checkpoint ]]; then
    args=(--resume "$RUN_DIR")
  else
    rm -rf "$RUN_DIR"
    args=("${TRAIN_OVERRIDES[@]}" "buffer.kind=$BUFFER_KIND" "${TRAIN_EXTRA[@]}" "log.root=$STATE" "log.name=$RUN_NAME")
  fi
  echo "python3 recipes/d2r_mt10.py ${args[*]}  (SIGINT after ${TRAIN_SECONDS} s)" | tee "$OUT/train.log"
  started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  began=$(date +%s)
  timeout --signal=INT --kill-after="$STOP_GRACE" "$TRAIN_SECONDS" python3 recipes/d2r_mt10.py "${args[@]}" 2>&1 | tee -a "$OUT/train.log"
  code=${PIPESTATUS[0]}
  [[ -d $RUN_DIR ]] || die "the recipe created no run directory (exit code $code): see train.log"
  echo "$started,$(( $(date +%s) - began )),$code" >> "$RUN_DIR/segments.csv"
  tar -cf - --exclude=buffer -C "$STATE" "$RUN_NAME" | split -b "$PART_SIZE" - "$OUT/run.tar.part-"
  ls -l "$OUT"/run.tar.part-*
  step_report
}

step_report() {
  python_path
  mkdir -p "$OUT"
  python3 benchmarks/gpu_learning_curve.py "$RUN_DIR" --out "$OUT"
}

step_unpack() {
  local from=${1:?usage: gpu_suite.sh unpack DIR (the folder holding run.tar.part-*)}
  compgen -G "$from/run.tar.part-*" >/dev/null || die "no run.tar.part-* in $from"
  mkdir -p "$STATE"
  rm -rf "$RUN_DIR"
  cat "$from"/run.tar.part-* | tar -xf - -C "$STATE" || die "unpacking into $STATE failed"
  echo "restored $RUN_DIR ($(du -sh "$RUN_DIR" | cut -f1))"
}

step_size() {
  local tree wheels state total
  tree=$(git ls-files -z -co --exclude-standard | xargs -0 -r du -cb 2>/dev/null | awk 'END {print $1}')
  wheels=$(du -sb "$WHEEL_DIR" 2>/dev/null | cut -f1)
  state=$(du -sb "$STATE" 2>/dev/null | cut -f1)
  total=$(( ${tree:-0} + ${wheels:-0} + ${state:-0} ))
  printf 'repository %d KiB, %s %d KiB, %s %d KiB: %d of %d MiB\n' \
    $(( ${tree:-0} / 1024 )) "$WHEEL_DIR" $(( ${wheels:-0} / 1024 )) "$STATE" $(( ${state:-0} / 1024 )) \
    $(( total / 1048576 )) $(( LIMIT_BYTES / 1048576 ))
  (( total <= LIMIT_BYTES )) || die "a call carrying these would exceed 64 MiB"
}

[[ $# -ge 1 ]] || die "usage: gpu_suite.sh STEP [STEP ...] with STEP in tests, speed, train, report, unpack DIR, size"
case $1 in
  unpack) step_unpack "${2:-}"; exit ;;
  size) step_size; exit ;;
  report) step_report; exit ;;
esac
for step in "$@"; do
  case $step in tests|speed|train) ;; *) die "unknown step '$step'; accepted: tests, speed, train, report, unpack DIR, size" ;; esac
done
setup
for step in "$@"; do
  echo "=== $step"
  "step_$step"
done
