#!/usr/bin/env bash
# One GPU run that re-measures everything issue 8 (Triton kernels) and issue 4 (models) report:
#   1. benchmarks/gpu_check.py: correctness at real sizes + per-shape timing (eager, host time, CUDA
#      graph) against cuDNN and torchvision, within BUDGET seconds;
#   2. benchmarks/profile_host.py: host cost per call (the launch-overhead breakdown);
#   3. benchmarks/bench_models.py: Faster R-CNN R50-FPN regular vs DCNv2, fp32 and bf16 autocast.
#
#   OUT=/some/folder bash benchmarks/gpu_suite.sh [BUDGET]      # from the repository root
#
# Every table goes to $OUT (and gpu_check also to benchmarks/results/); a log per step too. About
# BUDGET + 150 seconds on an H100/H200 (BUDGET defaults to 270). Steps run in order of value, so a run
# cut short keeps the most important tables.
set -u
budget=${1:-270}
out=${OUT:?set OUT to a folder for the tables}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$py" - <<'EOF'
import torch, triton, torchvision
print("torch", torch.__version__, "triton", triton.__version__, "torchvision", torchvision.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA")
EOF
status=0
"$py" benchmarks/gpu_check.py --budget "$budget" --out "$out" >"$out/gpu_check.log" 2>&1 || status=1
tail -n 3 "$out/gpu_check.log"
"$py" benchmarks/profile_host.py --out "$out/profile_host.md" >"$out/profile_host.log" 2>&1 || status=1
"$py" benchmarks/bench_models.py --device cuda --repeats 3 --out "$out/models_cuda.md" \
    >"$out/models.log" 2>&1 || status=1
"$py" benchmarks/bench_models.py --device cuda --repeats 3 --amp bf16 --out "$out/models_cuda_bf16.md" \
    >>"$out/models.log" 2>&1 || status=1
ls -l "$out"
exit $status
