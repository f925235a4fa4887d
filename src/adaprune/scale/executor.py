"""Executors: where the independent candidate evaluations of one call run.

A *candidate* is the model with one plan's channels masked (a sensitivity probe, an adapt probe): its
evaluation needs nothing from the others, so a call hands all of them to an executor at once and
gets their results back in order. :class:`LocalExecutor` runs them one after another in this process;
:class:`adaprune.scale.ray.RayExecutor` spreads them over Ray workers that hold a copy of the model
and of the measuring function.

Both give the same numbers: every candidate is evaluated with the random number generator forked and
seeded from the call's ``seed`` (so an evaluation that draws random numbers, e.g. a DataLoader's base
seed, draws the same ones wherever it runs, and none of the caller's draws), the masks are undone after
each, and a failure inside an evaluation comes back as that candidate's result when its type is one the
caller expects (``catch``), else it is raised here, as the type it was raised as.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import Self

from ..plan import Plan
from ..surgery.mask import mask


class Failed:
    """A candidate whose evaluation raised an exception of a type the caller expects."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __repr__(self) -> str:
        return f"Failed({self.error!r})"


def evaluate_masked(model: nn.Module, plan: Plan, measure: Callable[[nn.Module], Any], seed: int) -> Any:
    """``measure(model)`` with ``plan``'s channels masked (undone after), under a forked generator seeded
    with ``seed``, without gradients. Every executor evaluates a candidate through this one function."""
    handle = None if plan.is_empty else mask(model, plan)
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            return measure(model)
    finally:
        if handle is not None:
            handle.undo()


def model_token(model: nn.Module) -> str:
    """SHA-256 over every tensor's name, shape, dtype and bytes (order-independent): a name for the model's
    structure and weights, for executors that ship the model only when it changed, and the key of the
    sensitivity cache (:func:`adaprune.sensitivity.fingerprint`)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def attempt(model: nn.Module, plan: Plan, measure: Callable[[nn.Module], Any], seed: int) -> tuple[bool, Any]:
    """:func:`evaluate_masked` as ``(True, result)``, or ``(False, the exception)``: how a worker sends a
    candidate's outcome back for :func:`outcomes` to sort out where the call was made."""
    try:
        return True, evaluate_masked(model, plan, measure, seed)
    except Exception as exc:  # noqa: BLE001 - sent back: raised (or returned as Failed) by outcomes()
        return False, exc


def run_job(run: Callable[[Any, Any], Any], shared: Any, job: Any) -> tuple[bool, Any]:
    """``run(shared, job)`` as ``(True, result)`` or ``(False, the exception)``, gradients on, under a forked
    generator (the job seeds it; the caller's draws are untouched): how every executor runs
    :meth:`Executor.map_runs`."""
    try:
        with torch.random.fork_rng(devices=[]), torch.enable_grad():
            return True, run(shared, job)
    except Exception as exc:  # noqa: BLE001 - sent back: raised (or returned as Failed) by outcomes()
        return False, exc


def outcomes(answers: Iterable[tuple[bool, Any]], catch: tuple[type[BaseException], ...]) -> list[Any]:
    """The results of :func:`attempt` in order: an exception of a ``catch`` type as :class:`Failed`, any other
    raised here, as the type it was raised as."""
    out: list[Any] = []
    for ok, value in answers:
        if ok:
            out.append(value)
        elif isinstance(value, catch):
            out.append(Failed(value))
        else:
            raise value
    return out


class Executor(ABC):
    """Runs a call's candidate evaluations (see the module's docstring); ``workers`` say how many at once."""

    workers: int = 1

    @abstractmethod
    def map(self, model: nn.Module, plans: Sequence[Plan], measure: Callable[[nn.Module], Any], *,
            seed: int = 0, catch: tuple[type[BaseException], ...] = (), token: Hashable | None = None) -> list[Any]:
        """``measure`` of ``model`` with each plan's channels masked, in the order of ``plans``.

        Args:
            model: the model; left as it was.
            plans: one per candidate (an empty plan: the model itself).
            measure: ``measure(model) -> result``; it must not change the model's weights.
            seed: every candidate's evaluation starts from ``torch.manual_seed(seed)``.
            catch: exception types returned as :class:`Failed` instead of raised.
            token: names the model's current weights and structure, if the caller knows one (executors
                that keep a copy of the model ship it again when the token changes; without one they
                compute :func:`model_token`).
        """

    def map_models(self, models: Sequence[nn.Module], measure: Callable[[nn.Module], Any], *, seed: int = 0,
                   catch: tuple[type[BaseException], ...] = ()) -> list[Any]:
        """``measure`` of each of several whole models (e.g. a ladder's rungs, each exported with its own
        normalisation statistics), in order, each as :func:`evaluate_masked` evaluates a candidate (no plan).

        This default evaluates them one after another through :meth:`map`; executors with several workers
        override it to evaluate them at once (each model then travels to the worker that evaluates it)."""
        return [self.map(m, [Plan()], measure, seed=seed, catch=catch)[0] for m in models]

    def map_runs(self, shared: Any, jobs: Sequence[Any], run: Callable[[Any, Any], Any], *,
                 catch: tuple[type[BaseException], ...] = ()) -> list[Any]:
        """``run(shared, job)`` for each job, in order: work that may train what it builds from ``shared`` (an
        adapt step's alternative sizes, each cut from the working model, recovered and measured:
        :mod:`adaprune.adapt.alternatives`), so gradients are on; ``run`` seeds the generator itself (it is
        forked around each job). ``shared`` travels to each worker once per call, ``run`` once while it is the
        same object, the jobs and results each once; ``run`` must leave ``shared`` as it was. ``catch`` as
        in :meth:`map`.

        This default runs them here, one after another; executors with several workers run them at once."""
        return outcomes((run_job(run, shared, job) for job in jobs), catch)

    def prepare(self) -> None:
        """Start the workers without waiting for them (a call does this first, so that they start while it
        traces and scores the model); a no-op for the local executor."""

    def close(self) -> None:
        """Release the workers (a no-op for the local executor)."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Every candidate in this process, one after another (the default)."""

    workers = 1

    def map(self, model: nn.Module, plans: Sequence[Plan], measure: Callable[[nn.Module], Any], *,
            seed: int = 0, catch: tuple[type[BaseException], ...] = (), token: Hashable | None = None) -> list[Any]:
        out: list[Any] = []
        for plan in plans:
            try:
                out.append(evaluate_masked(model, plan, measure, seed))
            except catch as exc:
                out.append(Failed(exc))
        return out

    def __repr__(self) -> str:
        return "LocalExecutor()"


__all__ = ["Executor", "Failed", "LocalExecutor", "attempt", "evaluate_masked", "model_token", "outcomes", "run_job"]
