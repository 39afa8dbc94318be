"""Launch Triton kernels with less of ``JITFunction``'s per-call host time.

``kernel[grid](*args, **kwargs)`` re-derives Triton's specialisation of every argument (dtype,
16-byte alignment, integer divisibility), builds a cache key from it and looks the compiled kernel
up on every call (``JITFunction.run`` took about 120 us per call under cProfile on the H200 host,
``benchmarks/results/profile_host_h200.md``), where the kernels themselves often run for less.
:func:`launch` keys its own cache by the arguments themselves instead: tensors by dtype and 16-byte
alignment, integers and constexprs by value, plus device, warps and stages. Equal keys therefore
mean an equal Triton specialisation, so a hit can launch the ``CompiledKernel`` directly through its
own launcher (``compiled[grid](*all_arguments)``), the convention Triton's ``JITFunction.run``
itself uses (identical in Triton 3.6 and 3.8).

A miss launches through ``JITFunction`` as usual (compiling if needed) and caches the kernel it
returns only after checking, once per kernel, that the positional argument list built here is
exactly the one Triton's own binder produces. Anything unexpected (a Triton without these
internals, a pre-run hook, ``DEFORMABLE_TRITON_FAST_LAUNCH=0`` (read at import), CPU tensors under
``TRITON_INTERPRET=1``) takes the ordinary path, so the fast path can only ever skip work, never change
what runs; launch hooks (profilers) still run, as the compiled kernel's launcher calls them.
``benchmarks/bench_launch.py`` compares the two lookups on a CPU.

:func:`launch_planned` goes one step further for launch plans: a repeat calls the compiled kernel's
launcher itself with the current stream (what ``compiled[grid]``'s runner does, checked once against
its source), and through ``compiled[grid]`` whenever a launch hook is set.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

try:  # the interpreter and exotic builds may lack these internals: then every launch is ordinary
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover
    JITFunction = None
try:
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover
    OutOfResources = ()  # catches nothing

FAST_LAUNCH_ENV = "DEFORMABLE_TRITON_FAST_LAUNCH"
# Read once: an environment lookup would cost a tenth of the launch it saves.
ENABLED = JITFunction is not None and os.environ.get(FAST_LAUNCH_ENV, "1") != "0"

__all__ = ["ENABLED", "FAST_LAUNCH_ENV", "clear_cache", "launch", "launch_planned"]

_MAX_ENTRIES = 4096  # shapes x configurations; detectors with varying image sizes keep adding keys

_compiled: dict[tuple, Any] = {}  # key -> Triton's CompiledKernel
# id(kernel) -> (names of the parameters after the positional ones, their defaults); None = never
# fast. Keyed by id: the kernels are module globals, and JITFunction.__hash__ is a Python call.
_tails: dict[int, tuple[tuple[str, ...], tuple] | None] = {}


# Part of every launch_planned key: clear_cache() moves it on, so that the plans' own entries (held in
# the callers' plan caches, out of reach here) are forgotten too.
_generation = 0


def clear_cache() -> None:
    """Forget every cached kernel and check (tests; a changed Triton configuration)."""
    global _generation
    _compiled.clear()
    _tails.clear()
    _stage_caps.clear()
    _generation += 1


def launch(kernel, grid: tuple[int, ...], *args, num_warps: int, num_stages: int = 2, **constexprs):
    """``kernel[grid](*args, num_warps=..., num_stages=..., **constexprs)``, faster when repeated.

    Args:
        kernel: a ``triton.jit`` function; ``args`` its leading runtime arguments in order (the
            first a tensor), ``constexprs`` the remaining parameters by name.
        grid: one to three program counts.

    Returns:
        The compiled kernel when later launches with arguments specialised the same way may call it
        directly (its launcher takes ``(*args, *tail)``, :func:`launch_planned`), else None.
    """
    device = _cuda_device(args[0]) if ENABLED else None
    if device is None or _tails.get(id(kernel), ()) is None or getattr(kernel, "pre_run_hooks", None):
        _launch_within_resources(kernel, grid, args, constexprs, num_warps, num_stages)
        return None
    key = _key(kernel, device, args, constexprs, num_warps, num_stages)
    compiled = _compiled.get(key)
    if compiled is not None:
        compiled[_full_grid(grid)](*args, *_tail_values(kernel, constexprs))
        return compiled
    compiled = _launch_within_resources(kernel, grid, args, constexprs, num_warps, num_stages)
    if compiled is not None and _binder_agrees(kernel, device, args, constexprs, num_warps, num_stages):
        if len(_compiled) >= _MAX_ENTRIES:
            _compiled.clear()
        _compiled[key] = compiled
        return compiled
    return None


def launch_planned(
    kernel, bound: dict, grid: tuple[int, ...], tensors: tuple[Tensor, ...], scalars: tuple, kwargs: dict
) -> None:
    """:func:`launch` ``(kernel, grid, *tensors, *scalars, **kwargs)`` for a launch plan, whose grid,
    non-tensor arguments and keyword arguments (constexprs, ``num_warps``, ``num_stages``) never
    change: only the tensors do.

    What Triton specialises a tensor on is its dtype and 16-byte alignment. A plan fixes its tensors'
    dtypes (the caller's plan key holds them: the kernels' operands all derive from the input's dtype),
    so the compiled kernel, the full grid and the constexpr tail are remembered in the plan's own
    ``bound`` dict under the device and each tensor's address modulo 16. A repeat then costs that key
    and the launcher call, not :func:`launch`'s key over every argument (at det-c4 about 4 us of a
    CPU's time per launch, ``benchmarks/bench_launch.py``). A miss takes :func:`launch` and remembers
    what it returns. A kernel with pre-run hooks always launches through :func:`launch`, and
    :func:`clear_cache` forgets these entries as well. As for ``kernel[grid]``, the tensors' device
    must be the current one (a repeat launches on that device's current stream).
    """
    device = _cuda_device(tensors[0]) if ENABLED and not getattr(kernel, "pre_run_hooks", None) else None
    if device is not None:
        key = (_generation, device, *[t.data_ptr() & 15 for t in tensors])
        entry = bound.get(key)
        if entry is not None:
            launcher, function, metadata, compiled, full_grid, tail = entry
            if launcher is not None and _no_launch_hooks():
                launcher(*full_grid, _current_stream(device), function, metadata, None, None, None,
                         *tensors, *scalars, *tail)  # fmt: skip
            else:
                compiled[full_grid](*tensors, *scalars, *tail)
            return
    compiled = launch(kernel, grid, *tensors, *scalars, **kwargs)
    if compiled is not None and device is not None:
        if len(bound) >= 64:  # alignments vary with views: a plan keeps a few
            bound.clear()
        bound[key] = (*_launcher_of(compiled), compiled, _full_grid(grid), _tail_values(kernel, kwargs))


def _launcher_of(compiled) -> tuple:
    """(launcher, function handle, packed metadata) of a ``CompiledKernel`` that has launched once, for
    calling its launcher directly: what ``compiled[grid](*args)`` does (Triton 3.6-3.8: the current
    stream, the launch metadata and hooks, then ``compiled.run(...)``) less the closure it makes, the
    device and stream lookups through Triton's driver proxy, and the metadata it builds for launch
    hooks. (None, None, None) unless the class's ``__getitem__`` makes exactly that call (read once
    per class): then ``compiled[grid]`` runs."""
    parts = tuple(getattr(compiled, name, None) for name in ("run", "function", "packed_metadata"))
    if any(part is None for part in parts) or _HOOKS is None or not _runner_calls_run(type(compiled)):
        return (None, None, None)
    return parts


_RUNNER_CALL = (
    "self.run(grid[0],grid[1],grid[2],stream,self.function,self.packed_metadata,launch_metadata,"
    "knobs.runtime.launch_enter_hook,knobs.runtime.launch_exit_hook,*args)"
)


_RUNNER_CHECKED: dict[Any, bool] = {}


def _runner_calls_run(cls: Any) -> bool:
    """Whether ``cls.__getitem__``'s runner calls ``self.run`` with the arguments the direct call passes."""
    known = _RUNNER_CHECKED.get(cls)
    if known is None:
        try:
            source = "".join(inspect.getsource(cls.__getitem__).split())
        except (AttributeError, OSError, TypeError):
            source = ""
        known = _RUNNER_CHECKED[cls] = _RUNNER_CALL in source
    return known


def _hook_holder() -> Any:
    """Where Triton keeps its launch hooks (``triton.knobs.runtime``, 3.4+); None elsewhere."""
    try:
        from triton import knobs
    except ImportError:  # pragma: no cover
        return None
    return getattr(knobs, "runtime", None)


_HOOKS: Any = _hook_holder()


def _no_launch_hooks() -> bool:
    """Whether no launch hook (a profiler's) is set: then the launcher is called without them. A hook
    is None, or a chain of hooks (Triton 3.7+) that may be empty."""
    for hook in (_HOOKS.launch_enter_hook, _HOOKS.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return False
    return True


def _current_stream(device: int) -> int:
    """The raw handle of ``device``'s current CUDA stream (what Triton's launches use)."""
    return torch._C._cuda_getCurrentRawStream(device)


# What a launch asks for (kernel, device, warps, stages, constexprs, tensor dtypes: everything its
# shared memory depends on) -> the most pipeline stages that fit that GPU.
_stage_caps: dict[tuple, int] = {}


def _resource_key(kernel, args: Sequence, constexprs: dict, num_warps: int, num_stages: int) -> tuple:
    tensors = [a for a in args if isinstance(a, Tensor)]
    device = tensors[0].device if tensors else None
    return (id(kernel), device, num_warps, num_stages, *constexprs.items(), *(t.dtype for t in tensors))


def _launch_within_resources(kernel, grid, args: Sequence, constexprs: dict, num_warps: int, num_stages: int):
    """``kernel[grid](...)``, retried with fewer pipeline stages while it needs more shared memory than
    the GPU has (the heuristics are tuned on Hopper's 227 KiB; consumer cards have about 100 KiB).

    Returns what the launch returns (the compiled kernel on CUDA).
    """
    key = _resource_key(kernel, args, constexprs, num_warps, num_stages) if _stage_caps else None
    stages = _stage_caps.get(key, num_stages) if key is not None else num_stages
    while True:
        try:
            return kernel[grid](*args, num_warps=num_warps, num_stages=stages, **constexprs)
        except OutOfResources as e:
            # Only shared memory depends on the stages; too many threads or registers do not.
            if stages <= 1 or getattr(e, "name", None) != "shared memory":
                raise
            if not _stage_caps:
                warnings.warn(
                    f"deformable: {getattr(kernel, '__name__', kernel)} needs more shared memory than "
                    f"this GPU has with {stages} pipeline stages ({e}); retrying with fewer (warned once)",
                    RuntimeWarning,
                    stacklevel=3,
                )
            stages -= 1
            key = key or _resource_key(kernel, args, constexprs, num_warps, num_stages)
            _stage_caps[key] = stages


def on_current_device(t: Tensor) -> bool:
    """Whether launches for ``t`` go to its device without a device guard: a CPU tensor (the
    interpreter), or a CUDA tensor on the current device (Triton launches on the current device)."""
    return not t.is_cuda or t.device.index == torch.cuda.current_device()


def device_guard(t: Tensor) -> contextlib.AbstractContextManager:
    """A context in which launches for ``t`` go to its device: ``torch.cuda.device`` where that is
    not the current one, else nothing to do."""
    return contextlib.nullcontext() if on_current_device(t) else torch.cuda.device(t.device)


def _cuda_device(first) -> int | None:
    """Index of the CUDA device of ``first``; None unless it is a CUDA tensor."""
    if not isinstance(first, Tensor) or first.device.type != "cuda":
        return None
    return first.device.index if first.device.index is not None else torch.cuda.current_device()


def _key(kernel, device: int, args: Sequence, constexprs: dict, num_warps: int, num_stages: int) -> tuple:
    """Everything Triton could specialise a launch on, and more (integers by value), flat."""
    parts: list = [id(kernel), device, num_warps, num_stages]
    append = parts.append
    for a in args:
        kind = type(a)
        if kind is int:
            append(a)
        elif kind is float:
            append(float)  # Triton never specialises floats; keying by value would only miss
        elif isinstance(a, Tensor):
            append(a.dtype)
            append(a.data_ptr() % 16 == 0)
        else:
            append(kind)
            append(a)
    parts.extend(constexprs)
    parts.extend(constexprs.values())
    return tuple(parts)


def _tail_values(kernel, constexprs: dict) -> tuple:
    tail = _tails[id(kernel)]
    assert tail is not None  # only kernels with a tail spec reach the cached path
    names, defaults = tail
    return tuple(constexprs.get(name, default) for name, default in zip(names, defaults, strict=True))


def _full_grid(grid: tuple[int, ...]) -> tuple[int, int, int]:
    return (grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1)


def _tail_spec(kernel, num_positional: int) -> tuple[tuple[str, ...], tuple]:
    """Names and defaults of the parameters after the first ``num_positional`` ones."""
    params = kernel.params[num_positional:]
    names = tuple(p.name for p in params)
    defaults = tuple(p.default for p in params)
    return names, defaults


def _binder_agrees(
    kernel, device: int, args: Sequence, constexprs: dict, num_warps: int, num_stages: int
) -> bool:
    """Whether the argument list :func:`launch` would pass equals Triton's own, checked once per kernel.

    Also rejects calls that name a parameter not in the kernel's signature.
    """
    if id(kernel) in _tails:
        known = _tails[id(kernel)]
        return known is not None and known[0] == tuple(p.name for p in kernel.params[len(args) :])
    if JITFunction is None or not isinstance(kernel, JITFunction):  # e.g. interpreted: nothing to skip
        _tails[id(kernel)] = None
        return False
    try:
        tail = _tail_spec(kernel, len(args))
        if set(constexprs) - set(tail[0]):
            raise TypeError(f"unknown parameters {sorted(set(constexprs) - set(tail[0]))}")
        _tails[id(kernel)] = tail
        binder = kernel.device_caches[device][4]
        bound, _, _ = binder(*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
        ours = (*args, *_tail_values(kernel, constexprs))
        theirs = tuple(bound.values())
        if len(ours) != len(theirs) or not all(map(_same, ours, theirs)):
            raise RuntimeError("argument lists differ")
    except Exception as e:  # any surprise: this kernel always launches through JITFunction
        _tails[id(kernel)] = None
        warnings.warn(
            f"deformable: fast Triton launches disabled for {getattr(kernel, '__name__', kernel)} "
            f"({type(e).__name__}: {e}); launches stay correct, with Triton's usual host overhead",
            RuntimeWarning,
            stacklevel=3,
        )
        return False
    return True


def _same(a, b) -> bool:
    if a is b:
        return True
    return not isinstance(a, Tensor) and not isinstance(b, Tensor) and type(a) is type(b) and a == b
