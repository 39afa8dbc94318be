#!/usr/bin/env bash
# One GPU run that re-measures everything issue 8 (Triton kernels) and issue 4 (models) report:
#   1. benchmarks/gpu_check.py: correctness at real sizes, per-shape timing (eager, host time, CUDA
#      graph) against cuDNN and torchvision, a kernel cost breakdown, and (SWEEP=0 skips it) a
#      configuration sweep, within BUDGET seconds;
#   2. tests/ops/test_triton_cuda.py (pytest -m cuda): the test suite's CUDA tests;
#   3. benchmarks/profile_host.py: host cost per call (the launch-overhead breakdown), with our fast
#      Triton launches and again with DEFORMABLE_TRITON_FAST_LAUNCH=0 (Triton's own dispatcher;
#      PROFILE_ORDINARY=0 skips the second, PROFILE=0 both);
#   4. benchmarks/bench_models.py: Faster R-CNN R50-FPN regular vs DCNv2, fp32 (and bf16 autocast
#      unless MODELS_BF16=0);
#   5. benchmarks/triton_traffic.py: the kernels' modelled traffic beside this run's kernel times.
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh [BUDGET]      # from the repository root
#
# Within a 15-minute device lease this leaves room for one focused second run after fixing what the
# first showed (2026-11-27: about 280 s with the machine's start). The timing table takes most of a
# 270 s budget, so the sweep gets little time here; a sweep-only run took 171 s for 14 kernels:
#   python3 benchmarks/gpu_check.py --budget 330 --out "$OUT" --skip-correctness --skip-timing \
#       --skip-breakdown
# and a check of changed defaults (147 s with pytest -m cuda after it), for example
#   python3 benchmarks/gpu_check.py --budget 125 --out "$OUT" --problems det-c4,cls-c5 \
#       --timing-shapes det-c3,cls-c3 --skip-breakdown --sweep-plan cls-c3/fp16/weight
# or
#   python3 benchmarks/gpu_check.py --budget 240 --out "$OUT" --problems cls-c5,det-c4 \
#       --skip-breakdown --sweep-plan det-c5/fp32/forward,cls-c5/fp32/weight
# then pytest -m cuda tests/ops/test_triton_cuda.py (pytest from .whl/ as below).
#
# Tables go to $OUT (gpu_check's also to benchmarks/results/), the logs into $OUT/logs.tgz, refreshed
# after every step: at most eight files, as many as the device tool returns. About BUDGET + 150 seconds
# on an H100/H200 (BUDGET defaults to 270). The whole suite stops within TOTAL seconds (default 570,
# under the device tool's 600 s per command): each step's time limit is cut to what is left, steps
# run in order of value, and a step with under 20 s left is skipped, so a run cut short keeps the
# most important tables and every log.
set -u
budget=${1:-270}
budget=${budget%.*}  # whole seconds: shell arithmetic below
out=${OUT:?set OUT to a folder for the tables}
mkdir -p "$out"
logs=$(mktemp -d)
py=${PYTHON:-python3}
deadline=$(( $(date +%s) + ${TOTAL:-570} ))
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" - <<'PY'
import torch, triton, torchvision
print("torch", torch.__version__, "triton", triton.__version__, "torchvision", torchvision.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
PY
status=0
step() {  # step SECONDS LOG COMMAND...: run within SECONDS and the deadline, output to LOG
    local limit=$1 log=$2 left
    shift 2
    left=$(( deadline - $(date +%s) ))
    if [ "$left" -lt 20 ]; then
        echo "skipped for time: $*" | tee -a "$logs/$log"
        status=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout "$limit" "$@" >>"$logs/$log" 2>&1 || { echo "step failed ($?): $*"; status=1; }
    tar czf "$out/logs.tgz" -C "$logs" .
}
sweep=()
[ "${SWEEP:-1}" = 0 ] && sweep=(--skip-sweep)
# GPU_CHECK_ARGS: more gpu_check arguments, split on spaces (e.g. "--problems det-c4").
read -r -a extra <<<"${GPU_CHECK_ARGS:-}"
step $((budget + 90)) gpu_check.log "$py" benchmarks/gpu_check.py --budget "$budget" --out "$out" \
    ${sweep[@]+"${sweep[@]}"} ${extra[@]+"${extra[@]}"}
tail -n 3 "$logs/gpu_check.log"
# The CUDA tests of the test suite (real sizes, every dtype, torchvision parity, autocast); pytest from
# the wheels in .whl/ when the machine lacks it (carry .whl).
if ! "$py" -c "import pytest" 2>/dev/null && ls .whl/pytest-*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --target "$logs/site" \
        .whl/pytest-*.whl .whl/pluggy-*.whl .whl/iniconfig-*.whl .whl/packaging-*.whl .whl/pygments-*.whl \
        && export PYTHONPATH="$PYTHONPATH:$logs/site"
fi
step 120 pytest_cuda.log "$py" -m pytest -q -p no:cacheprovider -m cuda tests/ops/test_triton_cuda.py
tail -n 2 "$logs/pytest_cuda.log"
[ "${PROFILE:-1}" != 0 ] && step 90 profile_host.log "$py" benchmarks/profile_host.py --out "$out/profile_host.md"
if [ "${PROFILE:-1}" != 0 ] && [ "${PROFILE_ORDINARY:-1}" != 0 ]; then
    step 90 profile_host.log env DEFORMABLE_TRITON_FAST_LAUNCH=0 \
        "$py" benchmarks/profile_host.py --out "$out/profile_host_ordinary_launch.md"
fi
# MODELS=0 skips both model benchmarks, MODELS_BF16=0 the bf16 one.
[ "${MODELS:-1}" != 0 ] && step 150 models.log "$py" benchmarks/bench_models.py --device cuda --repeats 3 \
    --out "$out/models_cuda.md"
if [ "${MODELS:-1}" != 0 ] && [ "${MODELS_BF16:-1}" != 0 ]; then
    step 150 models.log "$py" benchmarks/bench_models.py --device cuda --repeats 3 --amp bf16 \
        --out "$out/models_cuda_bf16.md"
fi
# The traffic model beside this run's kernel times (CPU arithmetic, seconds).
report=$(ls "$out"/gpu_*.md 2>/dev/null | head -n 1)
[ -n "$report" ] && step 30 traffic.log "$py" benchmarks/triton_traffic.py --measured "$report" \
    --out "$out/triton_traffic.md"
tar czf "$out/logs.tgz" -C "$logs" .
ls -l "$out"
exit $status
