"""Runtime adaptation: one set of weights at a ladder of nested widths.

:func:`ladder` builds it (:mod:`.build`), :class:`NestedWidths` switches between widths in place
(:mod:`.nested`), :mod:`.recovery` trains all rungs at once, :class:`Governor` picks the rung that
meets a deadline as load changes (:mod:`.governor`).
"""

from __future__ import annotations

from .build import DEFAULT_RUNGS, Ladder, Rung, ladder
from .governor import Governor, GovernorStats
from .io import load_ladder, save_ladder
from .nested import NestedWidths, nested_widths, order_channels, orderable

__all__ = [
    "DEFAULT_RUNGS",
    "Governor",
    "GovernorStats",
    "Ladder",
    "NestedWidths",
    "Rung",
    "ladder",
    "load_ladder",
    "nested_widths",
    "order_channels",
    "orderable",
    "save_ladder",
]
