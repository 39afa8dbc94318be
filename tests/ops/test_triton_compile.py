"""Every Triton kernel compiles for sm_90 (H100/H200) without a GPU: Triton's compiler and its bundled
ptxas need no driver. Catches what the interpreter cannot: type errors the compiler rejects, compiler
crashes, register spills (the interpreter runs code that would not compile)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow
@pytest.mark.triton
def test_every_kernel_compiles_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        # --fast: a third less time (no second ptxas, SASS only where checked below); --defaults-only:
        # the configurations the heuristic picks; --quick: every mode at one shape, fp16 and TF32 at
        # all. The full report (`python -m deformable.ops._triton.compile_check`) also flags
        # serialised wgmma and compiles every mode everywhere and the autotuner's variant candidates.
        [
            sys.executable, "-m", "deformable.ops._triton.compile_check", "--max-spill-bytes", "16", "--fast",
            "--defaults-only", "--quick",
        ],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "roi-backward" in result.stdout and "0 failed" in result.stdout
    assert result.stdout.count(" transpose ") == 8, result.stdout[-4000:]  # the layout copies
    # The backward kernels load grad_out as 16-byte vectors at every anchor shape, whatever Ho*Wo:
    # loaded one element at a time (an NCHW grad_out whose rows start mid-vector) it was 64-70
    # narrow loads per iteration; what remains are the per-pixel offset and mask loads.
    narrow = re.compile(r"^(\S+)\s+(data|weight)\s+(fp16|bf16)\s.*'loop_narrow_loads': (\d+)", re.M)
    found = narrow.findall(result.stdout)
    assert len(found) >= 8, result.stdout[-4000:]
    for shape, kernel, dtype, count in found:
        assert int(count) <= 8, f"{shape} {kernel} {dtype}: {count} narrow loads in the main loop"
