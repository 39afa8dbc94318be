"""Datasets: COCO-format detection, the embedded "deformed fashion" demo data, and augmentation.

- :class:`CocoDetection` reads any COCO instances json (boxes, labels, masks) and checks it;
  :func:`collate_detection` batches its samples for torchvision-style detectors.
- :func:`train_transforms` / :func:`eval_transforms` build torchvision.transforms.v2 pipelines.
- :mod:`deformable.data.deformed_fashion` generates the demo dataset from the shipped Fashion-MNIST
  subset (``generate``, ``load``) and its classification variant (:func:`deformed_fashion_classification`).
- :func:`image_folder_datasets` reads ImageFolder classification trees (ImageNet's layout) with
  :func:`classification_transforms`.
"""

from . import deformed_fashion, fashion_mnist
from .coco import AnnotationError, CocoDetection, check_coco_annotations, collate_detection, load_coco_json
from .deformed_fashion import DeformedFashionClassification, deformed_fashion_classification
from .fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from .image_folder import classification_transforms, image_folder_datasets
from .transforms import eval_transforms, train_transforms

__all__ = [
    "FASHION_MNIST_CLASSES",
    "AnnotationError",
    "CocoDetection",
    "DeformedFashionClassification",
    "check_coco_annotations",
    "classification_transforms",
    "collate_detection",
    "deformed_fashion",
    "deformed_fashion_classification",
    "eval_transforms",
    "fashion_mnist",
    "image_folder_datasets",
    "load_coco_json",
    "train_transforms",
]
