"""Runtime adaptation: one set of weights, a ladder of nested widths (:mod:`.nested`)."""

from __future__ import annotations

from .nested import Rungs, nested_widths, order_channels, orderable

__all__ = ["Rungs", "nested_widths", "order_channels", "orderable"]
