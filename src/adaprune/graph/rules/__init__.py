"""Coupling rules, one module per family of ops; importing this package registers them all."""

from . import attention, elementwise, layers, recurrent, shape  # noqa: F401
