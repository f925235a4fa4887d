"""The controller's knobs (:class:`AdaptConfig`): every field checked on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .._check import as_bool, as_float, as_int, check_instance, check_name
from ..errors import ConfigError
from ..importance import IMPORTANCE


@dataclass(frozen=True)
class AdaptConfig:
    """Knobs of the controller (all have working defaults).

    ``min_width``: no group is cut below this fraction of its original width (a thin layer is the one
    that short fine-tuning recovers worst). ``reconstruct``: after each removal, try refitting the layers
    that lost inputs by least squares on the task's calibration batches (:func:`adaprune.surgery.reconstruct`;
    ridge ``reconstruct_ridge``, by default chosen per layer by cross-validation) before fine-tuning, and
    keep the refit only when the task's metric says it helps; None (the default) tries it on models with
    BatchNorm and not on others (docs/benchmarks.md has the measurements behind this default).

    ``confidence``: a step is accepted when the upper end of the two-sided ``confidence`` interval of
    its metric drop is within ``tolerance``, if the task returns per-example values
    (:mod:`adaprune.adapt.noise`; 0 judges the point drop alone). ``probe_budget``: at most this many
    measured sensitivity probes in the first step; with more groups, a first-order estimate ranks them and
    the rest are estimated (:mod:`adaprune.adapt.probing`). ``reprobe``: measured probes in each later
    step, once every measured unit's first-order estimate is calibrated by its own measured ratio.
    ``uniform_layers``: groups built alike (every layer's heads, every layer's FFN neurons) are probed,
    allocated, blamed and filled as one unit, so they keep equal widths: a pruned Hugging Face model
    then states its sizes in its config and saves with ``save_pretrained`` (per-layer widths need
    :func:`adaprune.save`). ``probe_data``: the fraction of the validation data probes (and blame) are measured on; below 1 the
    task must implement :meth:`~adaprune.Task.evaluate_part`, and every probe's harm is measured against
    the current model on that same part (steps are still judged on all of it). Where an evaluation is
    the run's cost (a transformer on a few hundred texts), 0.5 halves what probing costs.
    ``time_limit`` (seconds) and ``max_evaluations`` (calls of the task's evaluation) end the run with
    the last accepted model; both are checked before every step (a step under way completes) and are not
    settings a resumed run must share. ``alternatives``: how many step sizes each step tries at once (its size,
    then each ``shrink`` times the one before, not below ``min_step``), each cut, recovered and measured on its
    own, side by side on an executor's workers; the largest within tolerance is kept
    (:mod:`adaprune.adapt.alternatives`; every size's recovery is counted in ``optimizer_steps``).

    Every field is checked for type and range on construction (NumPy scalars are converted to Python
    numbers); a bad one raises :class:`~adaprune.errors.ArgumentTypeError`, ``ConfigError`` or, for
    NaN/inf, a ``NonFiniteError``, naming the field.
    """

    tolerance: float = 0.01
    importance: str = "l2"
    step: float = 0.25
    min_step: float = 0.01
    max_step: float = 0.6
    grow: float = 1.5
    shrink: float = 0.5
    probe_ratio: float = 0.5
    max_group_ratio: float = 0.6
    finetune_steps: int = 50
    max_iterations: int = 40
    latency_repeats: int = 25
    seed: int = 0
    min_channels: int = 1
    round_to: int = 1
    min_width: float = 0.15
    reconstruct: bool | None = None
    reconstruct_ridge: float | None = None
    confidence: float = 0.9
    probe_budget: int = 24
    reprobe: int = 4
    probe_data: float = 1.0
    uniform_layers: bool = False
    time_limit: float | None = None
    max_evaluations: int | None = None
    warm_finetune_steps: int | None = None
    alternatives: int = 1

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)  # frozen: the checked, converted value

        put("probe_data", as_float(self.probe_data, "probe_data", low=0.0, high=1.0, low_open=True,
                                   hint="the fraction of the validation data probes measure on (1: all of it)"))
        put("tolerance", as_float(self.tolerance, "tolerance", low=0.0,
                                  hint="the largest acceptable drop of the metric, in its units, e.g. 0.01"))
        for name in ("step", "min_step", "max_step", "probe_ratio", "max_group_ratio"):
            put(name, as_float(getattr(self, name), name, low=0.0, high=1.0, low_open=True, high_open=True,
                               hint="a fraction of the binding cost or of a group's channels"))
        put("grow", as_float(self.grow, "grow", low=1.0, hint="the factor the step grows by after an easy step"))
        put("shrink", as_float(self.shrink, "shrink", low=0.0, high=1.0, low_open=True, high_open=True,
                               hint="the factor the step shrinks by after a roll back"))
        put("min_width", as_float(self.min_width, "min_width", low=0.0, high=1.0, high_open=True,
                                  hint="a fraction of a group's original width"))
        if self.reconstruct_ridge is not None:
            put("reconstruct_ridge", as_float(self.reconstruct_ridge, "reconstruct_ridge", low=0.0,
                                              hint="None chooses the ridge per layer"))
        put("confidence", as_float(self.confidence, "confidence", low=0.0, high=1.0, high_open=True,
                                   hint="the two-sided confidence of a step's interval, e.g. 0.9 (0: the point drop)"))
        if self.time_limit is not None:
            put("time_limit", as_float(self.time_limit, "time_limit", low=0.0, low_open=True,
                                       hint="seconds of wall time, checked before every step"))
        if self.max_evaluations is not None:
            put("max_evaluations", as_int(self.max_evaluations, "max_evaluations", low=1))
        if self.warm_finetune_steps is not None:
            put("warm_finetune_steps", as_int(self.warm_finetune_steps, "warm_finetune_steps", low=0))
        for name, low in (("finetune_steps", 0), ("max_iterations", 1), ("latency_repeats", 1),
                          ("min_channels", 1), ("round_to", 1), ("probe_budget", 1), ("reprobe", 1), ("alternatives", 1)):
            put(name, as_int(getattr(self, name), name, low=low))
        put("seed", as_int(self.seed, "seed", low=0, high=2**32 - 1))
        if self.reconstruct is not None:
            put("reconstruct", as_bool(self.reconstruct, "reconstruct"))
        put("uniform_layers", as_bool(self.uniform_layers, "uniform_layers"))
        check_instance(self.importance, str, "importance", "the name of a registered criterion such as 'l2'",
                       "the run's settings are saved as JSON: register a custom criterion with "
                       "adaprune.importance.IMPORTANCE.register(name)")
        check_name(self.importance, IMPORTANCE.names(), "importance", "importance criterion")
        if not self.min_step <= self.step <= self.max_step:
            raise ConfigError(
                f"min_step={self.min_step}, step={self.step}, max_step={self.max_step}: "
                "need min_step <= step <= max_step"
            )


__all__ = ["AdaptConfig"]
