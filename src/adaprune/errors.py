"""Typed exceptions. Each names what was wrong (argument, field, file, module or op) and how to fix it.

Every exception adaprune raises on purpose is an :class:`AdapruneError`. Classes that describe bad
input also subclass the matching builtin (``ValueError``, ``TypeError``, ``KeyError``, ``OSError``)
so callers can catch either. Values quoted in messages go through :func:`shown`, which bounds them
to about 80 characters whatever their size (a config value can be a YAML alias bomb).
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = [
    "AdapruneError",
    "ArgumentTypeError",
    "BudgetUnreachableError",
    "ConfigError",
    "FileFormatError",
    "NonFiniteArgumentError",
    "NonFiniteError",
    "PlanError",
    "PlanMismatchError",
    "RunDirError",
    "RunDirLockedError",
    "StorageError",
    "SurgeryError",
    "TraceError",
    "UnknownNameError",
    "UntrustedCodeError",
    "shown",
]

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = 60
_REPR.maxother = 60
_REPR.maxlong = 40
for _attr in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_REPR, _attr, 4)


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` on one line, bounded in time and length (nested containers and long strings are
    elided; a module's or a tensor's multi-line repr is joined)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # noqa: BLE001  (a broken __repr__ must not hide the real error)
        text = f"<{type(value).__name__}>"
    text = " ".join(text[: 4 * limit].split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AdapruneError(Exception):
    """Base class of every error adaprune raises on purpose. Its message is one line: a line break in
    it (a path or a value quoted as it is) is written as ``\\n``."""

    def __init__(self, *args: object) -> None:
        if args and isinstance(args[0], str) and ("\n" in args[0] or "\r" in args[0]):
            args = (args[0].replace("\r", "\\r").replace("\n", "\\n"), *args[1:])
        super().__init__(*args)


class ConfigError(AdapruneError, ValueError):
    """An argument has a value outside what is allowed (the message names it and the allowed range)."""


class ArgumentTypeError(ConfigError, TypeError):
    """An argument or field has the wrong type (the message names it, the type given and the type wanted)."""


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
            f"the model failed to run on example_inputs ({type(exc).__name__}: {shown(str(exc), 300)}); "
            "check that example_inputs is what model(...) accepts (a dict is passed as keywords, a "
            "tuple as positional arguments)"
        )


class SurgeryError(AdapruneError, RuntimeError):
    """Applying a plan failed; the model was restored to exactly what it was before."""


class PlanError(AdapruneError, ValueError):
    """A plan is malformed (bad JSON, wrong version, negative or duplicate indices)."""


class PlanMismatchError(PlanError):
    """A plan does not fit the model it is applied to (missing tensor, wrong shape)."""


class BudgetUnreachableError(AdapruneError, ValueError):
    """No plan allowed by the per-group limits meets the budget; the message says how close it got."""


class NonFiniteError(AdapruneError, ValueError):
    """A metric, a loss or a weight is NaN or infinite; the message names which."""


class NonFiniteArgumentError(NonFiniteError, ConfigError):
    """An argument is NaN or infinite: both a non-finite value and a bad argument (catch either)."""


class FileFormatError(AdapruneError, ValueError):
    """A file adaprune reads is missing, not a regular file, too large, not UTF-8, or not of its schema.

    The message names the file and, for a schema error, the field."""


class StorageError(AdapruneError, OSError):
    """Writing a file failed (disk full, permissions ...); the file's previous version is unchanged."""


class RunDirError(AdapruneError, ValueError):
    """A run directory cannot be used as asked: it is not adaprune's, it holds another run, or a
    resume does not fit it. Nothing in it was changed."""


class RunDirLockedError(RunDirError):
    """Another process is running in this run directory; the message names the holder."""


class UntrustedCodeError(ConfigError):
    """A file received from elsewhere (a run directory's config) names code to import; adaprune does
    not run it unless the caller passes the factory or trusts the file explicitly."""
