#!/usr/bin/env bash
# One GPU run that re-measures everything issue 8 (Triton kernels) and issue 4 (models) report:
#   1. benchmarks/gpu_check.py: correctness at real sizes + per-shape timing (eager, host time, CUDA
#      graph) against cuDNN and torchvision, within BUDGET seconds (SWEEP=0 skips its config sweep);
#   2. benchmarks/profile_host.py: host cost per call (the launch-overhead breakdown), with our fast
#      Triton launches and again with DEFORMABLE_TRITON_FAST_LAUNCH=0 (Triton's own dispatcher);
#   3. benchmarks/bench_models.py: Faster R-CNN R50-FPN regular vs DCNv2, fp32 (and bf16 autocast
#      unless MODELS_BF16=0).
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh [BUDGET]      # from the repository root
#
# Tables go to $OUT (gpu_check's also to benchmarks/results/), the logs into $OUT/logs.tgz: at most
# seven files, as the device tool returns eight. About BUDGET + 150 seconds on an H100/H200 (BUDGET
# defaults to 270); every step has its own time limit, and steps run in order of value, so a run cut
# short keeps the most important tables.
set -u
budget=${1:-270}
out=${OUT:?set OUT to a folder for the tables}
mkdir -p "$out"
logs=$(mktemp -d)
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" - <<'PY'
import torch, triton, torchvision
print("torch", torch.__version__, "triton", triton.__version__, "torchvision", torchvision.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
PY
status=0
step() {  # step SECONDS LOG COMMAND...: run with a time limit, output to LOG, failures counted
    local limit=$1 log=$2
    shift 2
    timeout "$limit" "$@" >>"$logs/$log" 2>&1 || { echo "step failed ($?): $*"; status=1; }
}
sweep=()
[ "${SWEEP:-1}" = 0 ] && sweep=(--skip-sweep)
step $((budget + 90)) gpu_check.log "$py" benchmarks/gpu_check.py --budget "$budget" --out "$out" "${sweep[@]}"
tail -n 3 "$logs/gpu_check.log"
step 120 profile_host.log "$py" benchmarks/profile_host.py --out "$out/profile_host.md"
step 120 profile_host.log env DEFORMABLE_TRITON_FAST_LAUNCH=0 \
    "$py" benchmarks/profile_host.py --out "$out/profile_host_ordinary_launch.md"
step 180 models.log "$py" benchmarks/bench_models.py --device cuda --repeats 3 --out "$out/models_cuda.md"
if [ "${MODELS_BF16:-1}" != 0 ]; then
    step 180 models.log "$py" benchmarks/bench_models.py --device cuda --repeats 3 --amp bf16 \
        --out "$out/models_cuda_bf16.md"
fi
tar czf "$out/logs.tgz" -C "$logs" .
ls -l "$out"
exit $status
