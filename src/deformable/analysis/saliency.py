"""Error-bounded saliency regions: the smallest image region that keeps a node's response.

The search (our choice; the DCNv2 paper describes it only as "progressively masking the image"):

1. The image is cut into square blocks of ``block_size`` pixels (default: about 16 blocks along the
   longer side). Blocks are ranked by their effective-receptive-field mass (sum of the ERF over the block,
   :func:`~.receptive_field.effective_receptive_field`), largest first.
2. *Binary search* on the number ``k`` of top-ranked blocks kept (the rest replaced by ``fill``): the
   smallest ``k`` found whose masked image gives a response within the bound (batched as a k-ary search,
   ``batch_size`` candidates per forward pass; the response need not be monotone in ``k``, so the result
   is the smallest ``k`` the search met that satisfies the bound).
3. *Greedy removal*: every kept block, least ERF mass first, is tentatively removed; the removal stays
   when the bound still holds. Passes repeat until a whole pass removes nothing, so on return removing
   any single remaining block breaks the bound.

The response of a layer node is its feature vector at the position (all ``C`` channels with
``channel=None``, so channels cannot cancel each other; one value for one channel); that of a RoI node the
2fc output vector. The relative error is ``||r(masked) - r(image)||_2 / ||r(image)||_2`` (the absolute
norm when the reference response is exactly 0). The ERF that ranks the blocks is the gradient of the
node's scalar (the channel, the sum over channels, or a RoI node's class score). Masked pixels take the
``fill`` value: the image's per-channel mean by default (``"mean"``), or ``"zero"``, a number, or a tensor
broadcastable to ``[C, H, W]``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._core import (
    Node,
    analysis_mode,
    evaluate_node,
    gradients_enabled,
    make_node,
    prepare_image,
    resolve_node,
)
from .receptive_field import node_gradient

__all__ = ["SaliencyResult", "fill_value", "saliency_region"]


@dataclass
class SaliencyResult:
    """An error-bounded saliency region.

    Attributes:
        mask: ``[H, W]`` bool, True where the image is kept.
        area_fraction: kept pixels / all pixels.
        error: relative error of the node's response with only ``mask`` kept.
        block_size: side of the search's square blocks (pixels; edge blocks may be smaller).
        blocks: ``[nby, nbx]`` bool, the kept blocks.
        reference: the node's response on the full image ``[D]``.
        response: the response on the masked image ``[D]``.
        evaluations: forward evaluations (images) the search used.
        node: the node (with a RoI node's class resolved).
    """

    mask: Tensor
    area_fraction: float
    error: float
    block_size: int
    blocks: Tensor
    reference: Tensor
    response: Tensor
    evaluations: int
    node: Node


def fill_value(image: Tensor, fill) -> Tensor:
    """The fill for masked pixels of ``image`` [C, H, W], broadcastable to it."""
    if isinstance(fill, str):
        if fill == "mean":
            return image.mean(dim=(1, 2), keepdim=True)
        if fill == "zero":
            return image.new_zeros((1, 1, 1))
        raise ValueError(f"fill must be 'mean', 'zero', a number or a tensor, got {fill!r}")
    if isinstance(fill, int | float) and not isinstance(fill, bool):
        if not math.isfinite(fill):
            raise ValueError(f"fill must be finite, got {fill!r}")
        return image.new_full((1, 1, 1), float(fill))
    if isinstance(fill, Tensor):
        fill = fill.to(device=image.device, dtype=image.dtype)
        if not bool(torch.isfinite(fill).all()):
            raise ValueError("fill must be finite (the tensor holds NaN or infinite values)")
        if fill.dim() == 1:
            fill = fill[:, None, None]
        try:
            torch.broadcast_shapes(fill.shape, image.shape)
        except RuntimeError:
            raise ValueError(
                f"fill must broadcast to the image {list(image.shape)}, got {list(fill.shape)}"
            ) from None
        return fill
    raise TypeError(f"fill must be 'mean', 'zero', a number or a tensor, got {type(fill).__name__}")


class _Search:
    """Evaluates block masks in batches and counts the evaluations."""

    def __init__(self, model, image, node, fill, block_size, error_bound, batch_size):
        self.model, self.image, self.node = model, image, node
        self.fill = fill_value(image, fill)
        self.block_size, self.error_bound, self.batch_size = block_size, error_bound, batch_size
        height, width = image.shape[-2:]
        self.grid = (math.ceil(height / block_size), math.ceil(width / block_size))
        self.evaluations = 0
        with torch.no_grad():
            self.reference = evaluate_node(model, image[None], node).response[0]
        norm = float(self.reference.norm())
        self.scale = norm if norm > 0 else 1.0

    def pixels(self, blocks: Tensor) -> Tensor:
        """Block masks ``[B, nby, nbx]`` -> pixel masks ``[B, H, W]``."""
        height, width = self.image.shape[-2:]
        size = self.block_size
        up = blocks.repeat_interleave(size, 1).repeat_interleave(size, 2)
        return up[:, :height, :width]

    def errors(self, blocks: Tensor) -> tuple[Tensor, Tensor]:
        """Relative errors ``[B]`` and responses ``[B, D]`` for block masks ``[B, nby, nbx]``."""
        errors, responses = [], []
        for start in range(0, blocks.shape[0], self.batch_size):
            chunk = self.pixels(blocks[start : start + self.batch_size])[:, None]
            images = torch.where(chunk, self.image[None], self.fill[None].expand_as(self.image[None]))
            with torch.no_grad():
                response = evaluate_node(self.model, images, self.node).response
            responses.append(response)
            errors.append((response - self.reference[None]).norm(dim=1) / self.scale)
            self.evaluations += chunk.shape[0]
        return torch.cat(errors), torch.cat(responses)

    def ok(self, error: Tensor) -> Tensor:
        return error <= self.error_bound


def _block_scores(erf: Tensor, block_size: int, grid: tuple[int, int]) -> Tensor:
    height, width = erf.shape
    padded = F.pad(erf, (0, grid[1] * block_size - width, 0, grid[0] * block_size - height))
    return padded.reshape(grid[0], block_size, grid[1], block_size).sum(dim=(1, 3))


def _top_k_masks(order: Tensor, ks: list[int], grid) -> Tensor:
    masks = torch.zeros((len(ks), grid[0] * grid[1]), dtype=torch.bool, device=order.device)
    for row, k in enumerate(ks):
        masks[row, order[:k]] = True
    return masks.reshape(len(ks), *grid)


def saliency_region(
    model: nn.Module,
    image: Tensor,
    layer: str,
    position,
    channel: int | None = None,
    error_bound: float = 0.1,
    fill="mean",
    *,
    block_size: int | None = None,
    batch_size: int = 16,
    erf: Tensor | None = None,
) -> SaliencyResult:
    """The smallest region found whose keeping reproduces the node's response within ``error_bound``.

    See the module docstring for the search, the response, the error and the fill. Works inside
    ``torch.no_grad()`` and ``torch.inference_mode()`` too (the ERF ranking needs gradients).

    Args:
        model, image, layer, position, channel: the node (see :mod:`deformable.analysis`).
        error_bound: the relative error allowed (0.1 = 10%, the paper's value).
        fill: value of the masked pixels: ``"mean"`` (per-channel image mean), ``"zero"``, a number or a
            tensor broadcastable to ``[C, H, W]``.
        block_size: side of the search's blocks in pixels (None: ``ceil(max(H, W) / 16)``).
        batch_size: masked images per forward pass.
        erf: a precomputed effective receptive field ``[H, W]`` for the ranking (None: computed).

    Returns:
        A :class:`SaliencyResult` with ``mask`` ``[H, W]`` bool.
    """
    if not isinstance(error_bound, int | float) or isinstance(error_bound, bool):
        raise TypeError(f"error_bound must be a finite non-negative number, got {error_bound!r}")
    if not (math.isfinite(error_bound) and error_bound >= 0):
        raise ValueError(f"error_bound must be a finite non-negative number, got {error_bound!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    node = make_node(layer, position, channel)
    with analysis_mode(model), gradients_enabled():
        x = prepare_image(image, model)
        height, width = x.shape[-2:]
        if block_size is None:
            block_size = max(1, math.ceil(max(height, width) / 16))
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        node = resolve_node(model, x, node)
        if erf is None:
            erf = node_gradient(model, x, node).abs().sum(0)
        elif not isinstance(erf, Tensor):
            raise TypeError(f"erf must be a torch.Tensor [H, W] or None, got {type(erf).__name__}")
        elif tuple(erf.shape) != (height, width):
            raise ValueError(f"erf must have shape {[height, width]}, got {list(erf.shape)}")
        elif not bool(torch.isfinite(erf).all()):
            raise ValueError("erf must be finite (it holds NaN or infinite values)")
        search = _Search(model, x, node, fill, block_size, float(error_bound), batch_size)
        grid = search.grid
        scores = _block_scores(erf.detach().to(x.device, x.dtype), block_size, grid).flatten()
        order = torch.argsort(scores, descending=True, stable=True)
        count = grid[0] * grid[1]

        # 2. k-ary (batched binary) search on the number of top-ranked blocks kept.
        best = torch.ones(grid, dtype=torch.bool, device=x.device)
        best_error, best_response = 0.0, search.reference
        lo, hi = 0, count  # keeping all `hi` blocks satisfies the bound
        while lo < hi:
            # Up to batch_size counts that cut [lo, hi) into equal parts (one: its middle), so each
            # round shrinks the range batch_size + 1 times (it started at lo: a linear scan at one).
            span = hi - lo
            if span <= batch_size:
                ks = list(range(lo, hi))
            else:
                ks = [lo + i * span // (batch_size + 1) for i in range(1, batch_size + 1)]
            errors, responses = search.errors(_top_k_masks(order, ks, grid))
            passing = [i for i, ok in enumerate(search.ok(errors).tolist()) if ok]
            if passing:
                first = passing[0]
                hi = ks[first]
                best = _top_k_masks(order, [hi], grid)[0]
                best_error, best_response = float(errors[first]), responses[first]
                lo = ks[first - 1] + 1 if first > 0 else lo
            else:
                lo = ks[-1] + 1

        # 3. Greedy removal, least ERF mass first, until a whole pass removes nothing.
        ascending = order.flip(0)
        changed = True
        while changed:
            changed = False
            candidates = [int(b) for b in ascending if bool(best.flatten()[b])]
            index = 0
            while index < len(candidates):
                chunk = candidates[index : index + batch_size]
                trial = best.flatten()[None].repeat(len(chunk), 1)
                trial[torch.arange(len(chunk)), torch.tensor(chunk, device=trial.device)] = False
                errors, responses = search.errors(trial.reshape(len(chunk), *grid))
                passing = [i for i, ok in enumerate(search.ok(errors).tolist()) if ok]
                if not passing:
                    index += len(chunk)
                    continue
                first = passing[0]
                best = trial[first].reshape(grid)
                best_error, best_response = float(errors[first]), responses[first]
                changed = True
                index += first + 1

    mask = search.pixels(best[None])[0]
    return SaliencyResult(
        mask=mask.cpu(),
        area_fraction=float(mask.float().mean()),
        error=best_error,
        block_size=block_size,
        blocks=best.cpu(),
        reference=search.reference.detach().cpu(),
        response=best_response.detach().cpu(),
        evaluations=search.evaluations,
        node=node,
    )
