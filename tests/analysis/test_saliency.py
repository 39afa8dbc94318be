"""Error-bounded saliency regions."""

from __future__ import annotations

import pytest
import torch

from deformable.analysis import saliency_region
from deformable.analysis.saliency import fill_value

from .helpers import randomise_offsets, stack


def _response(model, image, mask, fill, layer, position, channel):
    masked = torch.where(mask[None], image, fill.expand_as(image))
    with torch.no_grad():
        values = model(masked[None])[0, :, position[0], position[1]]
    return values.sum() if channel is None else values[channel]


def _relative_error(model, image, mask, fill, node):
    reference = _response(model, image, torch.ones_like(mask), fill, *node)
    return float((_response(model, image, mask, fill, *node) - reference).abs() / reference.abs())


@pytest.mark.parametrize(("kind", "fill"), [("v2", "zero"), ("regular", "mean")])
def test_saliency_region_keeps_the_response_within_the_bound_and_no_block_can_go(kind, fill):
    model = randomise_offsets(stack(kind, bias=False))
    image = torch.rand(3, 14, 14, dtype=torch.float64) + 0.5
    node = ("4", (4, 3), 0)
    bound, block = 0.1, 2
    result = saliency_region(model, image, *node, error_bound=bound, fill=fill, block_size=block)
    fill_tensor = fill_value(image, fill)

    assert result.mask.shape == (14, 14) and result.mask.dtype == torch.bool
    assert 0 < result.area_fraction < 1
    assert result.area_fraction == pytest.approx(float(result.mask.double().mean()))
    error = _relative_error(model, image, result.mask, fill_tensor, node)
    assert error <= bound and error == pytest.approx(result.error, rel=1e-9, abs=1e-12)
    # The region lies inside the theoretical receptive field (rows/cols 3..13 around image (8, 6)).
    rows, cols = result.mask.nonzero().unbind(1)
    assert rows.min() >= 2 and rows.max() <= 13 and cols.min() >= 0 and cols.max() <= 11

    # Removing any further block of the search breaks the bound.
    for by, bx in result.blocks.nonzero().tolist():
        smaller = result.mask.clone()
        smaller[by * block : (by + 1) * block, bx * block : (bx + 1) * block] = False
        assert _relative_error(model, image, smaller, fill_tensor, node) > bound


def test_saliency_region_tight_bound_and_loose_bound():
    model = stack("v1", bias=False)
    image = torch.rand(3, 12, 12, dtype=torch.float64) + 0.5
    exact = saliency_region(model, image, "4", (3, 3), error_bound=0.0, fill="zero", block_size=3)
    assert exact.error == 0.0
    rows, cols = exact.mask.nonzero().unbind(1)  # keeps (at least) the receptive field rows/cols 1..11
    assert rows.min() <= 1 and cols.min() <= 1
    loose = saliency_region(model, image, "4", (3, 3), error_bound=1.0, fill="zero", block_size=3)
    assert loose.area_fraction == 0.0 and loose.error == pytest.approx(1.0)  # all masked: response 0


def test_fill_values_and_argument_errors():
    image = torch.arange(2 * 2 * 2, dtype=torch.float64).reshape(2, 2, 2)
    assert fill_value(image, "mean").flatten().tolist() == [1.5, 5.5]
    assert float(fill_value(image, 0.25)) == 0.25
    assert fill_value(image, torch.tensor([1.0, 2.0])).shape == (2, 1, 1)
    with pytest.raises(ValueError, match="fill"):
        fill_value(image, "blur")
    model = stack()
    image = torch.rand(3, 8, 8, dtype=torch.float64)
    for bad in (-1, float("nan"), float("inf")):  # NaN used to pass and return the whole image
        with pytest.raises(ValueError, match="error_bound"):
            saliency_region(model, image, "4", (0, 0), error_bound=bad)
    with pytest.raises(TypeError, match="error_bound"):
        saliency_region(model, image, "4", (0, 0), error_bound="0.1")
    with pytest.raises(ValueError, match="block_size"):
        saliency_region(model, image, "4", (0, 0), block_size=0)


def test_fill_and_erf_must_be_finite_tensors():
    # A NaN/infinite fill or ERF used to give a whole-image (or arbitrary) region silently; a list erf
    # was an AttributeError.
    model, image = stack(), torch.rand(3, 8, 8, dtype=torch.float64)
    for fill in (float("nan"), float("inf"), torch.tensor([float("nan"), 0.0, 0.0])):
        with pytest.raises(ValueError, match="fill must be finite"):
            saliency_region(model, image, "4", (0, 0), fill=fill)
    with pytest.raises(TypeError, match=r"erf must be a torch\.Tensor"):
        saliency_region(model, image, "4", (0, 0), erf=[[1.0] * 8] * 8)
    with pytest.raises(ValueError, match="erf must be finite"):
        saliency_region(model, image, "4", (0, 0), erf=torch.full((8, 8), float("nan")))


def test_channel_none_keeps_the_feature_vector_within_the_bound():
    # With channel=None the response is the node's C-vector, not the channel sum, in which channels can
    # cancel: the region used to keep only the sum within the bound (vector errors of 20% and more).
    model = randomise_offsets(stack("v2"))
    image = torch.rand(3, 14, 14, dtype=torch.float64)
    position, bound, block = (4, 3), 0.1, 2
    result = saliency_region(model, image, "4", position, error_bound=bound, fill="zero", block_size=block)
    fill = fill_value(image, "zero")

    def vector(mask):
        with torch.no_grad():
            return model(torch.where(mask[None], image, fill.expand_as(image))[None])[0, :, 4, 3]

    reference = vector(torch.ones(14, 14, dtype=torch.bool))
    assert result.reference.shape == (2,) and torch.allclose(result.reference, reference)
    assert torch.allclose(result.response, vector(result.mask))

    def error(mask):
        return float((vector(mask) - reference).norm() / reference.norm())

    assert error(result.mask) <= bound and error(result.mask) == pytest.approx(result.error, rel=1e-9)
    for by, bx in result.blocks.nonzero().tolist():  # minimal for the vector criterion
        smaller = result.mask.clone()
        smaller[by * block : (by + 1) * block, bx * block : (bx + 1) * block] = False
        assert error(smaller) > bound


def test_the_search_on_the_block_count_is_binary_with_one_image_per_batch():
    """batch_size=1 (a large detector on a small GPU) tried counts lo, lo + 1, ...: a linear scan."""

    class Mean(torch.nn.Module):  # every pixel counts alike: the region needs nearly every block
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 1, 1, bias=False)
            torch.nn.init.ones_(self.conv.weight)

        def forward(self, x):
            return self.conv(x).mean((2, 3), keepdim=True)

    model = Mean().double()
    image = torch.rand(1, 64, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) + 1
    result = saliency_region(
        model, image, "", (0, 0), error_bound=0.01, fill="zero", batch_size=1, block_size=4
    )
    kept = int(result.blocks.sum())
    assert 200 < kept < 256
    # One greedy pass over the kept blocks (none can go) after log2(256) + 1 counts; was 509 in all.
    assert result.evaluations <= kept + 9
