"""Tasks for the applications people prune for: segmentation (2-D and 3-D, torchvision and MONAI
models) and detection (torchvision's detectors and those that follow their API)."""

from .detection import DetectionTask
from .segmentation import SegmentationTask

__all__ = ["DetectionTask", "SegmentationTask"]
