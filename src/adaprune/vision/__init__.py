"""Tasks for the applications people prune for: segmentation (2-D and 3-D, torchvision and MONAI
models), detection (torchvision's detectors and those that follow their API) and Ultralytics YOLO
models on their own data, loss and validator."""

from .detection import DetectionTask
from .segmentation import SegmentationTask
from .yolo import YOLOTask, ultralytics_trainer

__all__ = ["DetectionTask", "SegmentationTask", "YOLOTask", "ultralytics_trainer"]
