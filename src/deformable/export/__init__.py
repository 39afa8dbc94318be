"""ONNX export: ``deform_conv2d`` as the standard ``DeformConv`` op (opset 19+), RoI pooling as ``RoiAlign``.

Importing this module registers the ONNX translations of the library's custom ops with both PyTorch
exporters, so that ``torch.onnx.export(model, ...)`` works on models using them with no extra step:

* the dynamo exporter (``torch.onnx.export(dynamo=True)``, PyTorch's default and recommendation), in
  ONNX Script's op registry, which the exporter consults on every export (needs ``onnxscript``);
* the legacy TorchScript exporter (``dynamo=False``), with ``torch.onnx.register_custom_op_symbolic``.

:func:`export_onnx` does not depend on the global registration: it hands its translation table to the
exporter, checks the model for deformable ops that cannot be exported, makes the batch axis dynamic
and writes the file atomically.

``deformable::deform_conv2d`` becomes one ``DeformConv`` node (offsets, mask, groups, offset groups,
strides, pads as ``[top, left, bottom, right]``, dilations, kernel shape, bias). ONNX's offset layout
``[N, offset_group*kH*kW*2, oH, oW]`` with (y, x) pairs, its mask layout and its bilinear rule
(samples outside the map read 0) are this library's, so nothing is permuted.

``deformable::deform_roi_pool`` becomes one ``RoiAlign`` (1x1 output, opset 16+) over one box per
(RoI, bin): each bin of a deformable pooling is roi_align of the bin-sized box at the bin's moved
corner, so roi_align's bilinear rule, sample grid and average carry over (both exporters).

Any other ``deformable::`` op raises :class:`UnsupportedOperatorError` naming it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ._cli import add_cli
from ._common import MIN_OPSET, NAMESPACE, UnsupportedOperatorError

__all__ = [
    "MIN_OPSET",
    "UnsupportedOperatorError",
    "add_cli",
    "export_onnx",
    "register",
    "supported_ops",
    "translation_table",
]

#: The library's custom ops that export (qualified names); backward ops never appear in an export.
_SUPPORTED = ("deformable::deform_conv2d", "deformable::deform_roi_pool")
_INSTALL_HINT = "install the export extra: pip install 'deformable[export]'"
# The largest model written as a single file: protobuf's limit is 2 GiB.
_SINGLE_FILE_BYTES = 1_900_000_000


def supported_ops() -> tuple[str, ...]:
    """Qualified names of the library's custom ops that :func:`export_onnx` translates."""
    return _SUPPORTED


def _load_op_modules() -> None:
    """Import the modules defining the custom ops, so that ``torch.ops.deformable.*`` resolve."""
    for name in ("deformable.ops.deform_conv", "deformable.ops.deform_roi_pool"):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)


def _onnxscript_available() -> bool:
    return importlib.util.find_spec("onnxscript") is not None


def translation_table() -> dict[Callable, Callable]:
    """``{torch op overload: ONNX Script function}`` for ``torch.onnx.export(custom_translation_table=...)``.

    Only ops that are defined in this installation are listed. Needs ``onnxscript``.
    """
    try:
        from . import _onnxscript
    except ImportError as error:
        raise ImportError(
            f"ONNX export with the dynamo exporter needs onnxscript: {_INSTALL_HINT}"
        ) from error
    _load_op_modules()
    table = {}
    for name, function in _onnxscript.TRANSLATIONS.items():
        packet = getattr(getattr(torch.ops, NAMESPACE), name.split("::")[1], None)
        if packet is not None:
            table[packet.default] = _onnxscript.traced(function)
    return table


_registered: dict[str, bool] = {}


def register() -> dict[str, bool]:
    """Register the translations with PyTorch's exporters (idempotent; done on import).

    Returns ``{"dynamo": bool, "torchscript": bool}``: which exporters now know the ops. The dynamo
    exporter needs ``onnxscript`` installed; the TorchScript one ``torch.onnx.register_custom_op_symbolic``.
    """
    if not _registered:
        try:
            from . import _torchscript
        except ImportError:  # a PyTorch without the TorchScript exporter
            _registered["torchscript"] = False
        else:
            _registered["torchscript"] = _torchscript.register()
        _registered["dynamo"] = _register_dynamo()
    return dict(_registered)


def _register_dynamo() -> bool:
    if not _onnxscript_available():
        return False
    try:
        from onnxscript.function_libs.torch_lib import registration

        from . import _onnxscript
    except ImportError:  # an onnxscript without the torch_lib registry: export_onnx still works
        return False
    for name, function in _onnxscript.TRANSLATIONS.items():
        if name not in registration.default_registry:
            registration.torch_op(name, trace_only=True)(function)
    return True


# --------------------------------------------------------------------------------------------------
# export_onnx


def _as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(
        f"example_inputs must be a Tensor or a tuple of the model's positional inputs, "
        f"got {type(example_inputs).__name__}"
    )


def _batch_size(args: tuple) -> int:
    sizes = {tuple(a.shape[:1]) for a in args if isinstance(a, Tensor)}
    if not sizes:
        raise ValueError("dynamic_batch=True needs at least one Tensor in example_inputs")
    if len(sizes) != 1 or () in sizes:
        shapes = [tuple(a.shape) for a in args if isinstance(a, Tensor)]
        raise ValueError(
            "dynamic_batch=True makes axis 0 of every tensor input the batch axis, so they must share "
            f"its size; got input shapes {shapes} (pass dynamic_batch=False)"
        )
    return next(iter(sizes))[0]


def _names(names, count: int, default: str, what: str) -> list[str]:
    if names is None:
        return [default] if count == 1 else [f"{default}_{i}" for i in range(count)]
    if (
        isinstance(names, str)
        or not isinstance(names, Sequence)
        or not all(isinstance(n, str) for n in names)
    ):
        raise TypeError(f"{what} must be a sequence of str, got {names!r}")
    names = list(names)
    if len(names) != count:
        raise ValueError(f"{what} must name the model's {count} {what.split('_')[0]}s, got {names}")
    return names


def _count_tensors(value) -> int:
    if isinstance(value, Tensor):
        return 1
    if isinstance(value, (tuple, list)):
        return sum(_count_tensors(v) for v in value)
    if isinstance(value, dict):
        return sum(_count_tensors(v) for v in value.values())
    return 0


def _check_supported(exported: torch.export.ExportedProgram, table: dict) -> None:
    """Raise UnsupportedOperatorError for a ``deformable::`` op that has no ONNX translation."""
    known = {op.name() for op in table}
    for node in exported.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        if target.namespace == NAMESPACE and target.name() not in known:
            raise UnsupportedOperatorError(
                f"the model uses {target.name()}, which has no ONNX translation: it cannot be exported "
                f"to standard ONNX (exportable deformable ops: {', '.join(sorted(known))})"
            )


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)


def _model_bytes(model: nn.Module) -> int:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _check_written(path: Path) -> None:
    with contextlib.suppress(ImportError):
        import onnx

        onnx.checker.check_model(str(path))


def export_onnx(
    model: nn.Module,
    example_inputs,
    path: str | os.PathLike,
    opset: int = MIN_OPSET,
    dynamic_batch: bool = True,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamo: bool | None = None,
) -> Path:
    """Export ``model`` to an ONNX file with ``deform_conv2d`` as the standard ``DeformConv`` op.

    Args:
        model: any ``nn.Module`` (layers, backbones, ...) using this library's ops. It is exported in
            eval mode (its modes are restored afterwards).
        example_inputs: a Tensor or a tuple of the model's positional inputs, used for tracing.
        path: the ``.onnx`` file to write (parent folders are created); written to a temporary file
            and renamed, so an existing file is replaced only by a complete export.
        opset: the ai.onnx opset, >= 19 (DeformConv's first opset). The TorchScript exporter stops at 20.
        dynamic_batch: make axis 0 of every tensor input (and so of the outputs) a dynamic ``batch``
            axis. The inputs must share their axis-0 size; a batch of 1 is traced as a batch of 2
            (torch.export fixes axes of size 1).
        input_names, output_names: graph input/output names; default ``input``/``output`` (or
            ``input_0``, ``input_1``, ... when there are several).
        dynamo: True = ``torch.onnx.export(dynamo=True)`` (PyTorch's recommended exporter; needs
            onnxscript), False = the legacy TorchScript exporter, None = dynamo when onnxscript is
            installed, else TorchScript.

    Returns:
        The path written.

    Raises:
        TypeError, ValueError: an argument is invalid (the message names it).
        UnsupportedOperatorError: the model uses a deformable op without an ONNX translation.
        ImportError: the exporter's packages are missing (``pip install 'deformable[export]'``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    args = _as_args(example_inputs)
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise TypeError(f"opset must be an int, got {opset!r}")
    if opset < MIN_OPSET:
        raise ValueError(f"opset must be >= {MIN_OPSET} (ONNX DeformConv appeared in opset 19), got {opset}")
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"dynamic_batch must be a bool, got {dynamic_batch!r}")
    if dynamo is None:
        dynamo = _onnxscript_available() or not hasattr(torch.onnx, "register_custom_op_symbolic")
    elif not isinstance(dynamo, bool):
        raise TypeError(f"dynamo must be True, False or None, got {dynamo!r}")
    if importlib.util.find_spec("onnx") is None:
        raise ImportError(f"ONNX export needs the onnx package: {_INSTALL_HINT}")
    if dynamo and not _onnxscript_available():
        raise ImportError(f"the dynamo ONNX exporter needs onnxscript: {_INSTALL_HINT}")
    from torch.onnx import _constants

    top = (
        getattr(_constants, "ONNX_MAX_OPSET", None)
        if dynamo
        else getattr(_constants, "ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET", 20)
    )
    if top is not None and opset > top:
        exporter = "the dynamo exporter" if dynamo else "the TorchScript exporter (dynamo=False)"
        raise ValueError(f"opset must be <= {top} with {exporter} of this PyTorch, got {opset}")
    if Path(path).is_dir():
        raise ValueError(f"path must be a file to write the model to, got the folder {path}")
    for parent in Path(path).parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"path {path}: {parent} is a file, not a folder to write the model into")
    if dynamic_batch and _batch_size(args) == 0:
        raise ValueError(
            "example_inputs have a batch of 0: give at least one example (the batch axis stays dynamic)"
        )
    if dynamic_batch and _batch_size(args) == 1:
        args = tuple(torch.cat([a, a]) if isinstance(a, Tensor) else a for a in args)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    single_file = _model_bytes(model) < _SINGLE_FILE_BYTES
    target = temporary if single_file else path  # external data files are named after the model file
    register()
    try:
        in_names = _names(input_names, sum(isinstance(a, Tensor) for a in args), "input", "input_names")
        with _eval_mode(model), torch.no_grad():
            if dynamo:
                _export_dynamo(model, args, target, opset, dynamic_batch, in_names, output_names, single_file)
            else:
                out_names = _names(output_names, _count_tensors(model(*args)), "output", "output_names")
                _export_torchscript(model, args, target, opset, dynamic_batch, in_names, out_names)
        _check_written(target)
        if single_file:
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    return path


def _export_dynamo(model, args, path, opset, dynamic_batch, input_names, output_names, single_file) -> None:
    table = translation_table()
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} if isinstance(a, Tensor) else None for a in args)
    exported = torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=False)
    _check_supported(exported, table)
    output_names = _names(output_names, len(exported.graph_signature.user_outputs), "output", "output_names")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        program = torch.onnx.export(
            exported,
            args,
            dynamo=True,
            opset_version=opset,
            input_names=input_names,
            output_names=output_names,
            custom_translation_table=table,
            verbose=False,
        )
    assert program is not None  # the dynamo exporter returns an ONNXProgram
    if dynamic_batch and program.model.graph.inputs and hasattr(program, "rename_axes"):
        shape = program.model.graph.inputs[0].shape
        symbol = None if shape is None else shape[0]
        if symbol is not None and not isinstance(symbol, int):
            program.rename_axes({symbol: "batch"})
    program.save(str(path), external_data=not single_file)


def _export_torchscript(model, args, path, opset, dynamic_batch, input_names, output_names) -> None:
    dynamic_axes = None
    if dynamic_batch:
        dynamic_axes = {name: {0: "batch"} for name in [*input_names, *output_names]}
    with warnings.catch_warnings():
        for category in (DeprecationWarning, FutureWarning, torch.jit.TracerWarning):
            warnings.simplefilter("ignore", category)
        try:
            torch.onnx.export(
                model,
                args,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=dynamic_axes,
            )
        except torch.onnx.errors.UnsupportedOperatorError as error:
            raise UnsupportedOperatorError(str(error)) from error


register()
