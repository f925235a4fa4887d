"""Surgery: apply a plan, physically (``remove``) or softly (``mask``)."""

from .fixers import register_fixer
from .mask import Masking, mask
from .remove import remove
from .sparse import NM, SparseResult, sparsify, to_semi_structured

__all__ = ["NM", "Masking", "SparseResult", "mask", "register_fixer", "remove", "sparsify", "to_semi_structured"]
