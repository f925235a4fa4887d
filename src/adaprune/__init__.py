"""adaprune: structured pruning that adapts to the task and the target.

The curated public API::

    import adaprune as ap
    res = ap.prune(model, x, ratio=0.5, importance="l2", allocation="uniform", ignore=[model.fc])
    ap.count(model, x)            # Cost(macs, params, bytes)
    graph = ap.trace(model, x)    # groups of coupled channels
    lad = ap.ladder(model, x, task, [ap.Budget(macs=0.5)])  # nested widths over one set of weights
    sh = ap.share(model, bits=4)  # k-means weight sharing (sh.undo() / sh.bake())
    q = ap.quantize(model, x)     # int8 through ONNX Runtime; q(x) runs it, q.bytes its size
"""

from __future__ import annotations

from . import errors
from ._version import __version__
from .adapt import AdaptResult, adapt
from .api import prune
from .compress import CompressResult, compress
from .cost import Cost, count
from .cost.budget import Budget
from .embedding import EmbeddingTask
from .graph import Graph, Group, trace
from .io import load, save
from .ladder import Governor, Ladder, ladder, load_ladder, save_ladder
from .language import LanguageModelingTask
from .multitask import MultiTask
from .onnx_export import export_onnx
from .plan import GroupCut, Plan
from .quantize import Quantized, quantize
from .quantize.ao import torchao_quantize
from .quantize.weights import quantize_weights
from .result import PruneResult
from .scale import Executor, LocalExecutor, RayExecutor
from .search import SearchResult, allocate_from_sensitivity, search
from .sensitivity import Sensitivity, sensitivity
from .share import ShareResult, share
from .specialize import Specialized, specialize
from .surgery import NM, mask, reconstruct, remove, sparsify
from .surgery.check import apply_plan
from .task import ClassificationTask, Task
from .updates import check, diff
from .vision import DetectionTask, SegmentationTask, YOLOTask

__all__ = [
    "NM",
    "AdaptResult",
    "Budget",
    "ClassificationTask",
    "CompressResult",
    "Cost",
    "DetectionTask",
    "EmbeddingTask",
    "Executor",
    "Governor",
    "Graph",
    "Group",
    "GroupCut",
    "Ladder",
    "LanguageModelingTask",
    "LocalExecutor",
    "MultiTask",
    "Plan",
    "PruneResult",
    "Quantized",
    "RayExecutor",
    "SearchResult",
    "SegmentationTask",
    "Sensitivity",
    "ShareResult",
    "Specialized",
    "Task",
    "YOLOTask",
    "__version__",
    "adapt",
    "allocate_from_sensitivity",
    "apply_plan",
    "check",
    "compress",
    "count",
    "diff",
    "errors",
    "export_onnx",
    "ladder",
    "load",
    "load_ladder",
    "mask",
    "prune",
    "quantize",
    "quantize_weights",
    "reconstruct",
    "remove",
    "save",
    "save_ladder",
    "search",
    "sensitivity",
    "share",
    "sparsify",
    "specialize",
    "torchao_quantize",
    "trace",
]
