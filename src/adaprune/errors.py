"""Typed exceptions. Each names what was wrong (argument, module, op) and how to fix it.

Error classes that describe bad input also subclass the matching builtin (``ValueError``,
``TypeError``, ``KeyError``) so callers can catch either.
"""

from __future__ import annotations

__all__ = [
    "AdapruneError",
    "ConfigError",
    "PlanError",
    "PlanMismatchError",
    "SurgeryError",
    "TraceError",
    "UnknownNameError",
]


class AdapruneError(Exception):
    """Base class of every error adaprune raises on purpose."""


class ConfigError(AdapruneError, ValueError):
    """An argument has a value outside what is allowed (the message names it and the allowed range)."""


class UnknownNameError(AdapruneError, KeyError):
    """A registry lookup failed; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable.
        return str(self.args[0]) if self.args else ""


class TraceError(AdapruneError, RuntimeError):
    """The model could not be run on the example inputs while building the graph."""

    @classmethod
    def model_failed(cls, exc: BaseException) -> TraceError:
        """The error for a model that raised ``exc`` when called on the example inputs."""
        return cls(
            f"the model failed to run on example_inputs ({type(exc).__name__}: {exc}); check that "
            "example_inputs is what model(...) accepts (a dict is passed as keywords, a tuple as "
            "positional arguments)"
        )


class SurgeryError(AdapruneError, RuntimeError):
    """Applying a plan failed; the model was restored to exactly what it was before."""


class PlanError(AdapruneError, ValueError):
    """A plan is malformed (bad JSON, wrong version, negative or duplicate indices)."""


class PlanMismatchError(PlanError):
    """A plan does not fit the model it is applied to (missing tensor, wrong shape)."""


class BudgetUnreachableError(AdapruneError, ValueError):
    """No plan allowed by the per-group limits meets the budget; the message says how close it got."""
