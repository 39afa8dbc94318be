"""The fast Triton launch path (``ops/_triton/_launch.py``).

Without a GPU no compiled kernel can run, so these tests check the protocol: what is cached, when
the ordinary ``JITFunction`` path is taken, and that the argument list handed to a compiled kernel is
the one Triton's binder builds (``inspect.signature(...).bind`` with defaults, for every real kernel
call that the forward and backward make). ``benchmarks/gpu_check.py`` checks the launched results
on a GPU: every call after a shape's first goes through the fast path there.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import warnings

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

from deformable.benchmark import deterministic_algorithms
from deformable.ops import deform_conv2d, deform_roi_pool
from deformable.ops._triton import _launch
from deformable.ops._triton import deform_conv as tdc
from deformable.ops._triton import deform_roi_pool as troi

pytestmark = pytest.mark.triton


def _toy(x_ptr, out_ptr, n, scale, BLOCK: tl.constexpr, FLAG: tl.constexpr = False):
    pass


class _Compiled:
    """Stands in for a ``CompiledKernel``: records ``compiled[grid](*args)``."""

    def __init__(self, log):
        self.log = log

    def __getitem__(self, grid):
        return lambda *args: self.log.append(("fast", grid, args))


@pytest.fixture
def toy(monkeypatch):
    """A real JITFunction whose compile-and-launch (``run``) and binder are recorded, on "device 0"."""
    _launch.clear_cache()
    monkeypatch.setattr(_launch, "_cuda_device", lambda first: 0)
    monkeypatch.setattr(_launch, "ENABLED", True)
    kernel = JITFunction(_toy)
    log: list = []
    compiled = _Compiled(log)

    def run(*args, grid, warmup, **kwargs):
        log.append(("jit", grid, args, kwargs))
        return compiled

    def binder(*args, **kwargs):
        options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages")}
        bound = inspect.signature(_toy).bind(*args, **kwargs)
        bound.apply_defaults()
        return dict(bound.arguments), [], options

    kernel.run = run
    kernel.device_caches = {0: (None, None, None, None, binder)}
    yield kernel, log
    _launch.clear_cache()


def _call(kernel, x, out, n=64, scale=0.5, **constexprs):
    _launch.launch(kernel, (3,), x, out, n, scale, num_warps=4, num_stages=2, BLOCK=32, **constexprs)


def test_second_call_launches_the_compiled_kernel_with_every_argument_in_order(toy):
    kernel, log = toy
    x, out = torch.zeros(8), torch.zeros(8)
    _call(kernel, x, out)
    _call(kernel, x, out, scale=2.0)  # floats are never specialised: still a hit
    assert [entry[0] for entry in log] == ["jit", "fast"]
    assert log[1][1] == (3, 1, 1)
    assert log[1][2] == (x, out, 64, 2.0, 32, False)  # FLAG's default filled in, as the binder does


@pytest.mark.parametrize(
    "change",
    ["alignment", "integer", "dtype", "constexpr", "warps"],
)
def test_anything_triton_could_specialise_on_is_a_miss(toy, change):
    kernel, log = toy
    base = torch.zeros(9)
    x, out = base[:8], torch.zeros(8)
    _call(kernel, x, out)
    if change == "alignment":
        _call(kernel, base[1:], out)  # 4 bytes off a 16-byte boundary
    elif change == "integer":
        _call(kernel, x, out, n=48)
    elif change == "dtype":
        _call(kernel, x.double(), out)
    elif change == "constexpr":
        _call(kernel, x, out, FLAG=True)
    else:
        _launch.launch(kernel, (3,), x, out, 64, 0.5, num_warps=8, num_stages=2, BLOCK=32)
    assert [entry[0] for entry in log] == ["jit", "jit"]


def _planned(kernel, bound, x, out, **constexprs):
    kwargs = {"num_warps": 4, "num_stages": 2, "BLOCK": 32, **constexprs}
    _launch.launch_planned(kernel, bound, (3,), (x, out), (64, 0.5), kwargs)


def test_a_planned_launch_repeats_through_its_own_entry(toy):
    kernel, log = toy
    bound: dict = {}
    x, out = torch.zeros(8), torch.zeros(8)
    _planned(kernel, bound, x, out)
    _planned(kernel, bound, torch.ones(8), torch.ones(8))  # other tensors alike: a hit
    assert [entry[0] for entry in log] == ["jit", "fast"]
    assert log[1][1] == (3, 1, 1)
    assert log[1][2][2:] == (64, 0.5, 32, False)  # the plan's scalars, then the constexpr tail
    assert len(bound) == 1 and len(_launch._compiled) == 1  # launch's cache filled as well


@pytest.mark.parametrize("change", ["alignment", "device"])
def test_a_planned_launch_misses_on_what_can_change_under_a_plan(toy, monkeypatch, change):
    """A plan fixes every argument but the tensors, and their dtypes (its key holds them): their
    alignment can change, and the device for plans shared by devices (the layout copies')."""
    kernel, log = toy
    bound: dict = {}
    base = torch.zeros(9)
    x, out = base[:8], torch.zeros(8)
    _planned(kernel, bound, x, out)
    other = x
    if change == "alignment":
        other = base[1:]  # 4 bytes off a 16-byte boundary
    else:
        monkeypatch.setattr(_launch, "_cuda_device", lambda first: 1)
        kernel.device_caches[1] = kernel.device_caches[0]
    _planned(kernel, bound, other, out)
    _planned(kernel, bound, other, out)
    assert [entry[0] for entry in log] == ["jit", "jit", "fast"]
    assert len(bound) == 2


def test_a_planned_launch_honours_pre_run_hooks_and_clear_cache(toy):
    """A bound entry skipped a pre-run hook added later (launch() checks on every call) and outlived
    clear_cache(), whose purpose is a changed Triton configuration."""
    kernel, log = toy
    bound: dict = {}
    x, out = torch.zeros(8), torch.zeros(8)
    _planned(kernel, bound, x, out)
    _planned(kernel, bound, x, out)
    _launch.clear_cache()
    _planned(kernel, bound, x, out)  # launched ordinarily again, and bound anew
    _planned(kernel, bound, x, out)
    kernel.pre_run_hooks.append(lambda *a, **k: None)
    _planned(kernel, bound, x, out)
    assert [entry[0] for entry in log] == ["jit", "fast", "jit", "fast", "jit"]


def test_a_planned_launch_without_the_fast_path_launches_ordinarily(toy, monkeypatch):
    kernel, log = toy
    bound: dict = {}
    monkeypatch.setattr(_launch, "ENABLED", False)
    x, out = torch.zeros(8), torch.zeros(8)
    _planned(kernel, bound, x, out)
    _planned(kernel, bound, x, out)
    assert [entry[0] for entry in log] == ["jit", "jit"] and bound == {}


def test_a_binder_that_disagrees_disables_the_fast_path_for_that_kernel(toy):
    kernel, log = toy
    _, _, _, _, binder = kernel.device_caches[0]

    def reordered(*args, **kwargs):
        bound, spec, options = binder(*args, **kwargs)
        return dict(reversed(list(bound.items()))), spec, options

    kernel.device_caches = {0: (None, None, None, None, reordered)}
    x, out = torch.zeros(8), torch.zeros(8)
    with pytest.warns(RuntimeWarning, match="fast Triton launches disabled for _toy"):
        _call(kernel, x, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        _call(kernel, x, out)
        _call(kernel, x, out)
    assert [entry[0] for entry in log] == ["jit", "jit", "jit"]


def test_environment_switch_and_pre_run_hooks_keep_the_ordinary_path(toy, monkeypatch):
    kernel, log = toy
    x, out = torch.zeros(8), torch.zeros(8)
    monkeypatch.setattr(_launch, "ENABLED", False)  # what DEFORMABLE_TRITON_FAST_LAUNCH=0 sets at import
    _call(kernel, x, out)
    _call(kernel, x, out)
    monkeypatch.setattr(_launch, "ENABLED", True)
    kernel.pre_run_hooks.append(lambda *a, **k: None)
    _call(kernel, x, out)
    _call(kernel, x, out)
    assert [entry[0] for entry in log] == ["jit"] * 4


def test_cpu_tensors_and_interpreted_kernels_take_the_ordinary_path():
    assert _launch._cuda_device(torch.zeros(2)) is None
    assert _launch._cuda_device(torch.zeros(2, device="meta")) is None
    interpreted = tdc._k.deform_conv_fwd_kernel  # conftest sets TRITON_INTERPRET=1 without CUDA
    if not isinstance(interpreted, JITFunction):
        assert not _launch._binder_agrees(interpreted, 0, (), {}, 4, 2)
        _launch.clear_cache()


@pytest.mark.parametrize("value, enabled", [("0", "False"), ("1", "True")])
def test_environment_switch_is_read_at_import(value, enabled):
    code = "from deformable.ops._triton import _launch; print(_launch.ENABLED)"
    env = {**os.environ, _launch.FAST_LAUNCH_ENV: value}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == enabled


def _record_launches(monkeypatch) -> list:
    """Replace ``launch`` by a recorder that still launches: in ``_launch`` (where the planned launches
    of deform_conv2d and the layout copies end) and where the Triton modules call it by name."""
    calls: list = []
    real = _launch.launch

    def recorder(kernel, grid, *args, num_warps, num_stages=2, **constexprs):
        calls.append((kernel, args, constexprs))
        return real(kernel, grid, *args, num_warps=num_warps, num_stages=num_stages, **constexprs)

    monkeypatch.setattr(_launch, "launch", recorder)
    monkeypatch.setattr(tdc, "launch", recorder)
    monkeypatch.setattr(troi, "launch", recorder)
    return calls


@pytest.mark.parametrize("deterministic", [False, True])
def test_real_kernel_calls_map_onto_their_signatures(monkeypatch, deterministic):
    """For every kernel the ops launch: positional args + constexprs in signature order, with
    defaults, is exactly what ``inspect.signature.bind`` (Triton's binder semantics) gives."""
    calls = _record_launches(monkeypatch)
    x = torch.randn(1, 4, 5, 6, requires_grad=True)
    weight = torch.randn(6, 4, 3, 3, requires_grad=True)
    offset = torch.randn(1, 18, 5, 6, requires_grad=True)
    mask = torch.rand(1, 9, 5, 6, requires_grad=True)
    rois = torch.tensor([[0.0, 0.5, 0.5, 4.0, 3.5]])
    roi_offset = torch.randn(1, 2, 2, 2, requires_grad=True)
    with deterministic_algorithms(deterministic):
        out = deform_conv2d(x, offset, weight, mask=mask, padding=1, backend="triton")
        roi_backend = "aten" if deterministic else "triton"  # Triton RoI pooling has no deterministic mode
        pooled = deform_roi_pool(x, rois, roi_offset, output_size=2, backend=roi_backend)
        (out.sum() + pooled.sum()).backward()
    kernels = {kernel.fn.__name__ for kernel, _, _ in calls}
    expected = {"deform_conv_fwd_kernel", "deform_conv_bwd_data_kernel", "deform_conv_bwd_weight_kernel"}
    if deterministic:
        expected |= {"deform_conv_cell_sums_kernel", "deform_conv_gather_input_grad_kernel"}
    else:
        expected |= {"deform_roi_pool_fwd_kernel", "deform_roi_pool_bwd_kernel"}
    assert expected <= kernels
    for kernel, args, constexprs in calls:
        jit = JITFunction(kernel.fn)
        names, defaults = _launch._tail_spec(jit, len(args))
        ours = (*args, *(constexprs.get(n, d) for n, d in zip(names, defaults, strict=True)))
        bound = inspect.signature(kernel.fn).bind(*args, **constexprs)
        bound.apply_defaults()
        theirs = tuple(bound.arguments.values())
        assert len(ours) == len(theirs), kernel.fn.__name__
        assert all(map(_launch._same, ours, theirs)), kernel.fn.__name__


@pytest.fixture
def small_gpu(toy):
    """The toy kernel on a GPU whose shared memory holds one pipeline stage of BLOCK=64 (any number of
    BLOCK=32; none at all with ``resource["never_fits"]``), short of ``resource["name"]``; every
    attempt is logged, failed ones included."""
    from triton.runtime.errors import OutOfResources

    kernel, log = toy
    ordinary = kernel.run
    attempts: list[tuple[int, int]] = []
    resource = {"name": "shared memory", "never_fits": False}

    def run(*args, grid, warmup, **kwargs):
        attempts.append((kwargs["BLOCK"], kwargs["num_stages"]))
        if resource["never_fits"] or (kwargs["BLOCK"] == 64 and kwargs["num_stages"] > 1):
            raise OutOfResources(200_000, 101_376, resource["name"])
        return ordinary(*args, grid=grid, warmup=warmup, **kwargs)

    kernel.run = run
    return kernel, log, attempts, resource


def _launch_toy(kernel, n=64, block=64, stages=3):
    x, out = torch.zeros(8), torch.zeros(8)
    _launch.launch(kernel, (3,), x, out, n, 0.5, num_warps=4, num_stages=stages, BLOCK=block)


def test_a_launch_beyond_shared_memory_retries_with_fewer_stages_and_remembers(small_gpu):
    kernel, log, attempts, _ = small_gpu
    with pytest.warns(RuntimeWarning, match="shared memory"):
        _launch_toy(kernel)
    assert attempts == [(64, 3), (64, 2), (64, 1)]
    assert [(entry[0], entry[3]["num_stages"]) for entry in log] == [("jit", 1)]
    _launch_toy(kernel)  # the same launch again: the cached compiled kernel, no attempt at all
    assert len(attempts) == 3 and [entry[0] for entry in log] == ["jit", "fast"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per process
        _launch_toy(kernel, n=65)  # a new specialisation (misses the compiled-kernel cache) ...
    assert attempts[3:] == [(64, 1)]  # ... goes straight to the stages that fit


def test_a_stage_cap_applies_only_to_the_launch_configuration_that_needed_it(small_gpu):
    kernel, _, attempts, _ = small_gpu
    with pytest.warns(RuntimeWarning):
        _launch_toy(kernel, block=64)
    _launch_toy(kernel, block=32)
    assert attempts == [(64, 3), (64, 2), (64, 1), (32, 3)]


def test_a_launch_that_does_not_fit_even_in_one_stage_raises(small_gpu):
    from triton.runtime.errors import OutOfResources

    kernel, _, attempts, resource = small_gpu
    resource["never_fits"] = True
    with pytest.warns(RuntimeWarning), pytest.raises(OutOfResources, match="shared memory"):
        _launch_toy(kernel, stages=2)
    assert attempts == [(64, 2), (64, 1)]


def test_other_resources_are_not_retried(small_gpu):
    from triton.runtime.errors import OutOfResources

    kernel, _, attempts, resource = small_gpu
    resource["name"] = "threads"  # fewer stages cannot help
    with pytest.raises(OutOfResources, match="threads"):
        _launch_toy(kernel)
    assert attempts == [(64, 3)]
