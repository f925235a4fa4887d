"""Surgery: apply a plan, physically (``remove``) or softly (``mask``)."""

from .fixers import register_fixer
from .mask import Masking, mask
from .remove import remove

__all__ = ["Masking", "mask", "register_fixer", "remove"]
