"""R-CNN feature mimicking (DCNv2 paper, section 3.3), training only.

For each training image, up to ``rois_per_image`` sampled RoIs (foreground by default: proposals
matched with IoU >= the box head's foreground threshold, 0.5) are cropped from the image, resized to
``patch_size`` x ``patch_size`` and run through the *shared* backbone; the shared RoI pooling over the
whole patch and the shared 2fc box head give ``f_RCNN(b)``. The detector's own box-head feature of the
same RoI is ``f_FRCNN(b)``. Losses:

- ``loss_mimic = mimic_weight * reduce_b (1 - cos(f_RCNN(b), f_FRCNN(b)))``
- ``loss_rcnn_cls = cls_weight * cross_entropy(classifier(f_RCNN(b)), label(b))`` with an unshared
  (C+1)-way classifier.

The paper sums over RoIs; ``reduction="mean"`` (default) averages instead, which keeps the term
commensurate with torchvision's mean-reduced detection losses whatever the number of RoIs. Nothing
of this runs in eval mode: a model built with mimicking predicts exactly what it would without it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, TypedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import roi_align

Selection = Literal["foreground", "all", "background"]


class _Recorded(TypedDict, total=False):
    """What :meth:`FeatureMimicking.record` keeps of the detector's training pass."""

    #: ``RoIHeads.select_training_samples``'s (proposals, matched_idxs, labels, regression_targets).
    samples: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]]
    #: The box head's output for the sampled RoIs.
    box_features: Tensor


@dataclass
class MimicOptions:
    """Settings of R-CNN feature mimicking.

    The paper's: 32 foreground RoIs per image, 224 x 224 patches, both loss weights 0.1, the losses
    summed over the RoIs (``reduction="sum"``). The default ``reduction="mean"`` averages them
    instead, so that the loss scale does not depend on how many RoIs an image has.
    """

    rois_per_image: int = 32
    patch_size: int = 224
    select: Selection = "foreground"
    mimic_weight: float = 0.1
    cls_weight: float = 0.1
    reduction: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        if self.select not in ("foreground", "all", "background"):
            raise ValueError(f"select must be 'foreground', 'all' or 'background', got {self.select!r}")
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {self.reduction!r}")
        for name in ("rois_per_image", "patch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("mimic_weight", "cls_weight"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not math.isfinite(value)
                or value < 0
            ):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


class FeatureMimicking(nn.Module):
    """The mimicking branch of a torchvision R-CNN: the unshared classifier and the loss computation.

    Args:
        representation_size: width of the box head's output (1024 for the 2fc head).
        num_classes: classes including background (the detector's ``num_classes``).
        options: :class:`MimicOptions`.
    """

    def __init__(
        self, representation_size: int, num_classes: int, options: MimicOptions | None = None
    ) -> None:
        super().__init__()
        if options is not None and not isinstance(options, MimicOptions):
            raise TypeError(f"options must be a MimicOptions or None, got {type(options).__name__}")
        self.options = options or MimicOptions()
        self.classifier = nn.Linear(representation_size, num_classes)
        self._recorded: _Recorded = {}

    @contextlib.contextmanager
    def record(self, roi_heads: RoIHeads) -> Iterator[None]:
        """While active, keep the RoIs ``roi_heads`` samples for training and their box-head features."""
        self._recorded = {}
        original = roi_heads.select_training_samples

        def select_and_keep(proposals, targets):
            result = original(proposals, targets)
            self._recorded["samples"] = result
            return result

        def keep_features(module, args, output):
            self._recorded.setdefault("box_features", output)  # the first call is the box branch

        roi_heads.select_training_samples = select_and_keep
        handle = roi_heads.box_head.register_forward_hook(keep_features)
        try:
            yield
        except BaseException:
            self._recorded = {}  # no losses() will take it
            raise
        finally:
            del roi_heads.select_training_samples  # the class's method shows through again
            handle.remove()

    def _choose(self, labels: list[Tensor]) -> list[Tensor]:
        """Indices (within each image's sampled RoIs) of the RoIs to mimic."""
        chosen = []
        for image_labels in labels:
            if self.options.select == "foreground":
                candidates = torch.nonzero(image_labels > 0).flatten()
            elif self.options.select == "background":
                candidates = torch.nonzero(image_labels == 0).flatten()
            else:
                candidates = torch.arange(image_labels.numel(), device=image_labels.device)
            order = torch.randperm(candidates.numel(), device=candidates.device)
            chosen.append(candidates[order[: self.options.rois_per_image]])
        return chosen

    def losses(self, detector: GeneralizedRCNN, image_tensors: Tensor) -> dict[str, Tensor]:
        """The two mimicking losses for the RoIs recorded during the detector's last training pass.

        Args:
            detector: the torchvision R-CNN (its ``backbone`` and ``roi_heads`` are shared).
            image_tensors: the transformed batch [N, 3, H, W] the proposals refer to.
        """
        # Taken, not read: kept, the box features would tie the detector's autograd graph to this module
        # until the next step (holding its memory, and breaking copy.deepcopy / AveragedModel).
        recorded, self._recorded = self._recorded, {}
        proposals, _, labels, _ = recorded["samples"]
        box_features = recorded["box_features"]
        chosen = self._choose(labels)
        starts = torch.tensor([0] + [p.shape[0] for p in proposals[:-1]], device=box_features.device).cumsum(
            0
        )
        flat = torch.cat([index + start for index, start in zip(chosen, starts, strict=True)])
        if flat.numel() == 0:
            zero = box_features.sum() * 0.0 + sum(p.sum() for p in self.classifier.parameters()) * 0.0
            return {"loss_mimic": zero, "loss_rcnn_cls": zero.clone()}
        boxes = [p[index] for p, index in zip(proposals, chosen, strict=True)]
        size = self.options.patch_size
        patches = roi_align(
            image_tensors, boxes, output_size=size, spatial_scale=1.0, sampling_ratio=2, aligned=True
        )
        with _running_statistics_kept(detector.backbone):
            patch_features = detector.backbone(patches)
        if isinstance(patch_features, Tensor):
            patch_features = {"0": patch_features}
        whole = patches.new_tensor([[0.0, 0.0, size, size]])
        pooled = detector.roi_heads.box_roi_pool(
            patch_features, [whole] * patches.shape[0], [(size, size)] * patches.shape[0]
        )
        rcnn_features = detector.roi_heads.box_head(pooled)
        detector_features = box_features[flat]
        dissimilarity = 1.0 - F.cosine_similarity(rcnn_features, detector_features, dim=1)
        target = torch.cat([label[index] for label, index in zip(labels, chosen, strict=True)])
        cls = F.cross_entropy(self.classifier(rcnn_features), target, reduction=self.options.reduction)
        mimic = dissimilarity.mean() if self.options.reduction == "mean" else dissimilarity.sum()
        return {
            "loss_mimic": self.options.mimic_weight * mimic,
            "loss_rcnn_cls": self.options.cls_weight * cls,
        }


@contextlib.contextmanager
def _running_statistics_kept(module: nn.Module) -> Iterator[None]:
    """Batch norms in ``module`` normalise with their batch's statistics as in training, but leave their
    running statistics as they are: the mimicking patches are RoIs magnified to ``patch_size``, not
    images of the training distribution, and must not move the statistics evaluation uses (a momentum
    of 0 keeps the running averages; the batch counter is put back)."""
    saved = [
        (
            norm,
            norm.momentum,
            norm.num_batches_tracked.clone() if norm.num_batches_tracked is not None else None,
        )
        for norm in module.modules()
        if isinstance(norm, nn.modules.batchnorm._BatchNorm) and norm.training and norm.track_running_stats
    ]
    for norm, _, _ in saved:
        norm.momentum = 0.0
    try:
        yield
    finally:
        for norm, momentum, count in saved:
            norm.momentum = momentum
            if count is not None:
                assert norm.num_batches_tracked is not None
                norm.num_batches_tracked.copy_(count)
