"""Candidate evaluations on Ray: workers (actors) that hold a copy of the model and the measuring function.

The model and the function travel once through Ray's object store; each candidate then travels as its
plan's JSON and comes back as the measured result. A worker keeps the last model and function it loaded
and loads them again only when the caller's model changed (a new token). Each worker runs
:func:`~adaprune.scale.executor.evaluate_masked`, as the local executor does, so the results are the
same numbers.

A worker that dies (killed, out of memory, its node gone) is restarted by Ray and its candidate is run
again, up to ``retries`` times; the restarted worker loads the model and the function from the object
store on its first candidate. Needs the ``ray`` extra: ``pip install 'adaprune[ray]'``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import nn

from .._check import as_int
from ..errors import ConfigError
from ..plan import Plan
from .executor import Executor, attempt, model_token, outcomes, run_job


def _ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("executor='ray' needs Ray: pip install 'adaprune[ray]'") from exc
    return ray


class _Worker:
    """One Ray actor: the model and the function of the latest call, and the candidates' evaluation."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.token: Any = None
        self.model: nn.Module | None = None
        self.fns: dict[Any, Callable[..., Any]] = {}  # the last few functions by key
        self.shared: Any = None
        self.shared_key: Any = None

    def pid(self) -> int:
        return os.getpid()

    def run(self, model_box: list[Any], token: Any, fn_box: list[Any], fn_key: Any, plan_json: str,
            seed: int) -> tuple[bool, Any]:
        import ray

        if self.token != token or self.model is None:
            self.model, self.token = ray.get(model_box[0]), token
        return attempt(self.model, Plan.from_json(plan_json), self.load(fn_box, fn_key), seed)

    def call(self, fn_box: list[Any], fn_key: Any, shared_box: list[Any], shared_key: Any, job: Any) -> tuple[bool, Any]:
        """One job of :meth:`RayExecutor.map_runs`: the function and the shared object (each kept while its key
        holds) on the job."""
        import ray

        if self.shared_key != shared_key:
            self.shared, self.shared_key = ray.get(shared_box[0]), shared_key
        return run_job(self.load(fn_box, fn_key), self.shared, job)

    def load(self, fn_box: list[Any], fn_key: Any) -> Callable[..., Any]:
        """The call's function: kept by its key, the last few (a step's probes and its alternative sizes take
        turns), else from the object store."""
        import ray

        found = self.fns.pop(fn_key, None)
        if found is None:
            found = ray.get(fn_box[0])
        self.fns[fn_key] = found  # (the latest last)
        while len(self.fns) > 4:
            del self.fns[next(iter(self.fns))]
        return found

class RayExecutor(Executor):
    """Candidate evaluations on ``workers`` Ray actors of ``threads`` CPU threads each.

    Args:
        workers: how many actors evaluate at once.
        address: the Ray cluster to connect to (``"auto"``, ``"ray://head:10001"`` ...); ``None`` connects to
            the cluster this process already joined, else starts a local one with enough CPUs for the workers
            (whose workers see this process's ``sys.path``).
        threads: torch threads per worker (and the CPUs each actor reserves).
        retries: how many times a dead worker is restarted and its candidate run again.
        init: further keyword arguments for ``ray.init`` when this executor starts or joins the cluster
            (e.g. ``runtime_env`` for a remote cluster).
    """

    def __init__(self, workers: int = 2, *, address: str | None = None, threads: int = 1, retries: int = 3,
                 init: dict[str, Any] | None = None) -> None:
        self.workers = as_int(workers, "workers", low=1)
        self.threads = as_int(threads, "threads", low=1)
        self.retries = as_int(retries, "retries", low=0)
        self.address, self.init = address, dict(init or {})
        self.actors: list[Any] = []
        self._model: tuple[Any, Any] | None = None  # (token, object ref)
        self._fns: list[tuple[Any, Any]] = []  # (the function itself, its object ref), the latest last

    def __repr__(self) -> str:
        return f"RayExecutor(workers={self.workers}, threads={self.threads}, address={self.address!r})"

    def _start(self) -> Any:
        ray = _ray()
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "logging_level": "WARNING"}
            if self.address is None:
                paths = [p for p in sys.path if p and os.path.isdir(p)]
                options["num_cpus"] = max(os.cpu_count() or 1, self.workers * self.threads)
                options["runtime_env"] = {"env_vars": {"PYTHONPATH": os.pathsep.join(paths)}}
            else:
                options["address"] = self.address
            options.update(self.init)
            ray.init(**options)
        if not self.actors:
            cpus = ray.cluster_resources().get("CPU", 0)
            if cpus < self.workers * self.threads:
                raise ConfigError(
                    f"RayExecutor(workers={self.workers}, threads={self.threads}) needs "
                    f"{self.workers * self.threads} CPUs and the Ray cluster has {cpus:g}: use fewer workers or "
                    "threads, or a larger cluster"
                )
            remote = ray.remote(num_cpus=self.threads, max_restarts=self.retries,
                                max_task_retries=self.retries)(_Worker)
            self.actors = [remote.remote(self.threads) for _ in range(self.workers)]
        return ray

    def prepare(self) -> None:
        """Create the actors now (Ray starts their processes in the background; nothing waits for them)."""
        self._start()

    def pids(self) -> list[int]:
        """The workers' process ids (starting them if needed)."""
        ray = self._start()
        return list(ray.get([a.pid.remote() for a in self.actors]))

    def map(self, model: nn.Module, plans: Sequence[Plan], measure: Callable[[nn.Module], Any], *,
            seed: int = 0, catch: tuple[type[BaseException], ...] = (), token: Hashable | None = None) -> list[Any]:
        if not plans:
            return []
        ray = self._start()
        token = model_token(model) if token is None else token
        if self._model is None or self._model[0] != token:
            self._model = (token, ray.put(model))
        box = [self._model[1]]
        return self._run(measure, [(box, token, p.to_json()) for p in plans], seed, catch)

    def map_models(self, models: Sequence[nn.Module], measure: Callable[[nn.Module], Any], *, seed: int = 0,
                   catch: tuple[type[BaseException], ...] = ()) -> list[Any]:
        """Every model to the object store, then one evaluation per model on the workers at once."""
        if not models:
            return []
        ray, empty = self._start(), Plan().to_json()
        return self._run(measure, [([ray.put(m)], model_token(m), empty) for m in models], seed, catch)

    def _run(self, measure: Callable[[nn.Module], Any], jobs: list[tuple[list[Any], Any, str]], seed: int,
             catch: tuple[type[BaseException], ...]) -> list[Any]:
        """Each job ``([model ref], model token, plan JSON)`` on the next free worker; the results in order."""
        fn_box, fn_key = self._shipped(measure)
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        return outcomes(pool.map(lambda actor, job: actor.run.remote(job[0], job[1], fn_box, fn_key, job[2], seed),
                                 jobs), catch)

    def map_runs(self, shared: Any, jobs: Sequence[Any], run: Callable[[Any, Any], Any], *,
                 catch: tuple[type[BaseException], ...] = ()) -> list[Any]:
        """``shared`` to the object store once, then ``run(shared, job)`` on the workers at once; the results in
        order."""
        if not jobs:
            return []
        ray = self._start()
        fn_box, fn_key = self._shipped(run)
        ref = ray.put(shared)
        from ray.util import ActorPool

        return outcomes(ActorPool(self.actors).map(
            lambda actor, job: actor.call.remote(fn_box, fn_key, [ref], ref.hex(), job), list(jobs)), catch)

    def _shipped(self, fn: Callable[..., Any]) -> tuple[list[Any], str]:
        """``fn`` in the object store (put once while it is one of the last few shipped: a step's probes and
        its alternative sizes take turns), as a box for the workers and the key they keep it by."""
        ray = self._start()
        found = next((ref for f, ref in self._fns if f is fn), None)
        if found is None:
            found = ray.put(fn)
            self._fns = [*self._fns[-3:], (fn, found)]
        return [found], found.hex()

    def close(self) -> None:
        """Stop the workers; the Ray cluster itself stays up (``ray.shutdown()`` ends a local one)."""
        if self.actors:
            ray = _ray()
            for actor in self.actors:
                ray.kill(actor)
        self.actors, self._model, self._fns = [], None, []


__all__ = ["RayExecutor"]
