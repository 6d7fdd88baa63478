#!/usr/bin/env bash
# Download into .whl/ (ignored by git) the wheels a GPU machine without network lacks, for
# benchmarks/gpu_suite.sh. The machine has Python 3.12 with torch 2.11 (CUDA 13), numpy,
# scipy, matplotlib, pytest, absl-py, etils, imageio, cloudpickle, packaging and
# typing-extensions; torch and the nvidia packages are never carried.
#
#   bash benchmarks/gpu_wheels.sh                        # Python 3.12, manylinux x86-64
#   PY_VERSION=3.11 WHEEL_DIR=/tmp/whl311 bash benchmarks/gpu_wheels.sh   # same set for a dry run here
#
# torchrl/tensordict for torch 2.11: every torchrl wheel declares only `torch>=2.1.0`, but
# its compiled extension (torchrl._torchrl, needed only by the prioritized buffer) is built
# against one torch. Candidates, tried with torch 2.11.0+cu130 (CPU run, Python 3.11):
#   torchrl 0.14.1 / 0.14.0 + tensordict 0.14.3 (tensordict<0.15,>=0.14.3): the extension
#       fails (undefined symbol torch::autograd::_wrap_outputs); everything else works.
#   torchrl 0.13.3 + tensordict 0.13.0, 0.12.0 + 0.12.4, 0.11.1 + 0.11.0: the extension
#       loads, but this package needs torchrl 0.14 (torchrl.objectives.sac.compute_rsample_log_prob,
#       the 0.13+ collector names, torchrl.checkpoint).
# So torchrl 0.14.1 travels, and gpu_suite.sh probes the extension on the machine: the
# prioritized buffer when it loads, else the stratified one (the reference's own sampler).
# Only one version of each package may be in .whl (two stop the install).
#
# omegaconf 2.4 vendors its parser runtime (antlr4), so it needs only PyYAML beside it.
# Left out although declared: pyopengl (mujoco rendering only), orjson (tensordict's optional
# JSON backend), importlib_metadata (a fallback of tensordict for old Pythons).
# Meta-World's wheel is slimmed (benchmarks/slim_wheel.py: images no model file names are
# dropped, 35 -> 12 MiB) so that the wheels and a D2R MT10 run directory (~30 MiB
# checkpoint) travel together under the 64 MiB limit of one call.
set -euo pipefail
cd "$(dirname "$0")/.."

PY_VERSION=${PY_VERSION:-3.12}
WHEEL_DIR=${WHEEL_DIR:-.whl}
LIMIT_MIB=${LIMIT_MIB:-55}
PINS=(
  torchrl==0.14.1
  tensordict==0.14.3
  pyvers==0.2.3
  hoptorch==0.1.4
  metaworld==3.1.1
  gymnasium==1.4.0
  farama-notifications==0.0.6
  mujoco==3.3.0
  glfw==2.11.0
  omegaconf==2.4.0
  pyyaml==6.0.4
)

mkdir -p "$WHEEL_DIR"
rm -f "$WHEEL_DIR"/*.whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -q -d "$WHEEL_DIR" "${PINS[@]}"
python3 benchmarks/slim_wheel.py "$WHEEL_DIR"/metaworld-*.whl

ls -l "$WHEEL_DIR"
total=$(du -cb "$WHEEL_DIR"/*.whl | tail -1 | cut -f1)
echo "total: $((total / 1048576)) MiB in $(ls "$WHEEL_DIR"/*.whl | wc -l) wheels (limit ${LIMIT_MIB} MiB)"
if (( total > LIMIT_MIB * 1048576 )); then
  echo "error: the wheels exceed ${LIMIT_MIB} MiB; with the repository and the run directory they would not travel (64 MiB per call)." >&2
  exit 1
fi
