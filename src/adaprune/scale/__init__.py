"""Scale-out: where candidate evaluations run (this process, Ray workers, the processes of a torchrun job).

``executor=`` in :func:`adaprune.sensitivity`, :func:`adaprune.adapt` and :func:`adaprune.ladder` takes
``None``/``"local"``, ``"ray"`` or an :class:`Executor` (e.g. ``RayExecutor(workers=4, address=...)``).
:class:`RayExecutor` imports Ray only when it starts its workers.
"""

from __future__ import annotations

from typing import Any

from ..errors import ArgumentTypeError, ConfigError, shown
from .distributed import DistributedExecutor, active
from .executor import Executor, Failed, LocalExecutor, evaluate_masked, model_token
from .ray import RayExecutor


def get_executor(spec: Any) -> tuple[Executor, bool]:
    """The executor ``spec`` names, and whether the caller made it (and so closes it when done). Callers
    start it (:meth:`Executor.prepare`) once their arguments are checked, before their own preparation.

    ``None``: :class:`LocalExecutor`, or under ``torchrun`` (a process group of several) a
    :class:`~adaprune.scale.distributed.DistributedExecutor` that shares the candidates out between the
    processes; ``"local"``: :class:`LocalExecutor`; ``"ray"``: a :class:`~adaprune.scale.ray.RayExecutor`
    on the Ray cluster this process is connected to (or a local one); an :class:`Executor`: itself."""
    if spec is None and active():
        return DistributedExecutor(), True
    if spec is None or spec == "local":
        return LocalExecutor(), True
    if isinstance(spec, Executor):
        return spec, False
    if spec == "ray":
        return RayExecutor(), True
    if isinstance(spec, str):
        raise ConfigError(f"executor={shown(spec)} is not one of 'local', 'ray'; or pass an adaprune.Executor "
                          "(e.g. adaprune.RayExecutor(workers=4, address='ray://head:10001'))")
    raise ArgumentTypeError(f"executor={shown(spec)} is {type(spec).__name__}; expected None, 'local', 'ray' or "
                            "an adaprune.Executor")


__all__ = ["DistributedExecutor", "Executor", "Failed", "LocalExecutor", "RayExecutor", "evaluate_masked", "get_executor", "model_token"]
