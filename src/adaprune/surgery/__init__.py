"""Surgery: apply a plan, physically (``remove``) or softly (``mask``)."""

from ..layers import register_fixer
from .mask import Masking, mask
from .reconstruct import Reconstruction, reconstruct
from .remove import remove
from .sparse import NM, SparseResult, sparsify, to_semi_structured

__all__ = [
    "NM", "Masking", "Reconstruction", "SparseResult", "mask", "reconstruct", "register_fixer", "remove", "sparsify",
    "to_semi_structured",
]
