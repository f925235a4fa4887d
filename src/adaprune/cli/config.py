"""The run configuration (YAML), validated up front with strict pydantic models.

Every section forbids unknown keys. A bad file raises :class:`CliError` whose one-line message names
the field (``budget.macs``), what is wrong with its value and what is allowed; the command line prints
it and exits with status 2. Paths in the file are relative to the file's directory.

A complete example::

    model:
      factory: adaprune.examples.digits:DigitsCNN    # or torchvision:resnet18, transformers:BertConfig
      kwargs: {width: 16}
      weights: base.safetensors                      # optional state dict (safetensors)
    data: {kind: digits, batch_size: 64}             # or npz / imagefolder / callable
    budget: {macs: 0.5, backend: torch, threads: 1}
    tolerance: 0.01
    ignore: [fc]
    run_dir: runs/digits
    options: {finetune_steps: 20, importance: l2}
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from .. import fs
from ..adapt import AdaptConfig
from ..errors import AdapruneError, FileFormatError, shown

__all__ = ["CliError", "RunConfig", "load_config", "parse_config"]


class CliError(AdapruneError):
    """A problem the user can fix (config, paths, names); printed as one line, exit status 2."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


Fraction = Annotated[float, Field(gt=0.0, lt=1.0)]
Bound = Annotated[float, Field(gt=0.0, allow_inf_nan=False)]
BOUND_HELP = "a fraction in (0, 1] of the original model's cost, or an absolute amount above 1"
IMPORT_HELP = "an import path 'package.module:name' or 'path/to/file.py:name'"


class ModelSpec(_Strict):
    factory: str = Field(
        description="where the model comes from: 'package.module:factory', 'file.py:factory', "
        "'torchvision:resnet18', or an HF config class such as 'transformers:BertConfig'",
        pattern=r"^[^:\s]+:[A-Za-z_][\w.]*$",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="keyword arguments of the factory (of the config class, for an HF config)",
    )
    weights: str | None = Field(None, description="a .safetensors file holding the model's state dict")
    hf_auto: str = Field(
        "AutoModelForSequenceClassification",
        description="the transformers Auto class that builds a model from an HF config",
    )


class DigitsData(_Strict):
    kind: Literal["digits"] = Field(description="sklearn's 8x8 handwritten digits (no download)")
    seed: int = Field(0, description="seed of the fixed 60/20/20 split")
    batch_size: int = Field(64, gt=0, description="batch size of the loaders")


class NpzData(_Strict):
    kind: Literal["npz"] = Field(description="numpy arrays x_train, y_train, x_val, y_val in one .npz file")
    path: str = Field(description="the .npz file")
    batch_size: int = Field(64, gt=0, description="batch size of the loaders")


class ImageFolderData(_Strict):
    kind: Literal["imagefolder"] = Field(description="torchvision ImageFolder: one folder per class")
    path: str = Field(description="a folder holding the train and val folders")
    train: str = Field("train", description="the training folder, inside path")
    val: str = Field("val", description="the validation folder, inside path")
    image_size: int = Field(224, gt=0, description="images are resized and center-cropped to this size")
    batch_size: int = Field(32, gt=0, description="batch size of the loaders")


class CallableData(_Strict):
    kind: Literal["callable"] = Field(description="a function returning (train_loader, val_loader)")
    factory: str = Field(description=f"the function, {IMPORT_HELP}", pattern=r"^[^:\s]+:[A-Za-z_][\w.]*$")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the function")


DataSpec = Annotated[DigitsData | NpzData | ImageFolderData | CallableData, Field(discriminator="kind")]
DATA_KINDS: dict[str, type[BaseModel]] = {
    "digits": DigitsData,
    "npz": NpzData,
    "imagefolder": ImageFolderData,
    "callable": CallableData,
}


class TaskSpec(_Strict):
    factory: str | None = Field(
        None,
        description=f"a task factory(train_loader, val_loader, **kwargs), "
        f"{IMPORT_HELP}; default: adaprune.ClassificationTask",
        pattern=r"^[^:\s]+:[A-Za-z_][\w.]*$",
    )
    kwargs: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the task factory")
    lr: float = Field(3e-4, gt=0, description="fine-tune learning rate (ClassificationTask)")
    distill: bool = Field(False, description="distil from the unpruned model while fine-tuning")
    temperature: float = Field(4.0, gt=0, description="distillation temperature")
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation loss, in [0, 1]")


class TaskEntry(TaskSpec):
    """One task of the ``tasks`` section (several tasks judged together: :class:`adaprune.MultiTask`)."""

    tolerance: float = Field(ge=0.0, description="the largest acceptable drop of this task's metric (absolute, in "
                                                 "its own direction)")
    weight: float = Field(1.0, gt=0, description="this task's weight in the combined loss and importance")
    head: list[str] = Field(default_factory=list, description="modules only this task uses (scored by it alone)")


class _BudgetChecks(_Strict):
    """The checks of the ``budget`` section; its fields come from the cost registry (:func:`budget_spec`)."""

    @field_validator("backend", check_fields=False)
    @classmethod
    def _registered(cls, backend: str) -> str:
        from ..cost.latency import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {shown(backend)}; use one of {', '.join(BACKENDS.names())}")
        return backend

    @model_validator(mode="after")
    def _one_bound(self) -> _BudgetChecks:
        from ..cost.registry import COSTS

        keywords = COSTS.keywords()
        if all(getattr(self, k, None) is None for k in keywords):
            raise ValueError(
                f"sets no bound; give at least one of {', '.join(keywords)}, e.g. `budget: {{macs: 0.5}}`"
            )
        for entry in COSTS.entries():
            if entry.absolute and getattr(self, entry.name, None) is not None \
                    and getattr(self, entry.absolute, None) is not None:
                raise ValueError(f"give {entry.name} (relative) or {entry.absolute} (absolute), not both")
        return self


_BUDGET_SPECS: dict[tuple[Any, ...], type[_BudgetChecks]] = {}


def budget_spec() -> type[_BudgetChecks]:
    """The ``budget`` section's model: one optional bound per registered cost keyword (built from the
    cost registry, rebuilt when it changes), then backend, threads and batch_size."""
    from ..cost.registry import COSTS

    key = tuple(COSTS.entries())
    if key not in _BUDGET_SPECS:
        fields: dict[str, Any] = {}
        for entry in COSTS.entries():
            if entry.name == "disk_bytes":  # the compressed artifact's size: adaprune.compress bounds it, not adapt
                continue
            for kw in entry.keywords:
                absolute = kw != entry.name or not entry.relative
                help_ = f"an absolute {entry.label} bound in {entry.unit}" if absolute else \
                    f"{entry.label} bound: {BOUND_HELP}"
                fields[kw] = (Bound | None, Field(None, description=help_))
        fields["backend"] = (str, Field(
            "torch", description="where latency is measured: a registered backend (torch, onnxruntime, cuda)"))
        fields["threads"] = (int, Field(1, gt=0, description="threads latency is measured with"))
        fields["batch_size"] = (int, Field(
            1, gt=0, description="batch size of the example inputs costs are measured on"))
        _BUDGET_SPECS[key] = create_model("BudgetSpec", __base__=_BudgetChecks, **fields)
    return _BUDGET_SPECS[key]


if TYPE_CHECKING:
    class BudgetSpec(_BudgetChecks):
        backend: str
        threads: int
        batch_size: int
else:
    BudgetSpec = budget_spec()  # the built-in costs' section; parse_config uses the current one


class SensitivitySpec(_Strict):
    ratios: list[Fraction] = Field(
        [0.25, 0.5, 0.75],
        min_length=1,
        description="fractions of each group's channels masked, each in (0, 1)",
    )
    importance: str = Field("l2", description="importance criterion ranking the channels")
    cluster: bool = Field(True, description="measure isomorphic groups once, as a cluster")


class ReportSpec(_Strict):
    latency: bool = Field(True, description="measure latency before and after (torch, and ONNX Runtime)")
    onnx: bool = Field(True, description="export the pruned model to model.onnx and time it on ONNX Runtime")
    sensitivity: bool = Field(False, description="run a sensitivity analysis of the original model first")
    repeats: int = Field(20, gt=0, description="timed repeats per latency measurement")


class LadderSpec(_Strict):
    rungs: list[dict[str, Bound]] = Field(
        default_factory=lambda: [{"macs": 0.75}, {"macs": 0.5}, {"macs": 0.25}], min_length=1,
        description="one budget per rung below the full model, largest first, e.g. `[{macs: 0.5}, {macs: 0.25}]`",
    )
    finetune_steps: int = Field(0, ge=0, description="optimizer steps of the joint recovery of all rungs")
    checkpoint_every: int = Field(100, ge=0, description="recovery steps between checkpoints in the run "
                                                         "directory (0: only after the last); --resume continues from one")
    compare: bool = Field(True, description="also adapt an independent model at each rung's budget (the report's baseline)")
    compare_steps: int = Field(0, ge=0, description="fine-tuning steps of each independent model after adapt")
    repeats: int = Field(20, gt=0, description="timed repeats per rung's latency")


def _options_model() -> type[BaseModel]:
    """The ``options`` section: every :class:`AdaptConfig` field but tolerance, all optional."""
    hints = typing.get_type_hints(AdaptConfig)
    fields: dict[str, Any] = {
        name: (hints[name] | None, Field(None, description=f"AdaptConfig.{name} (default {f.default!r})"))
        for name, f in AdaptConfig.__dataclass_fields__.items()
        if name != "tolerance"
    }
    return create_model("Options", __config__=ConfigDict(extra="forbid", strict=True, frozen=True), **fields)


Options = _options_model()


class RunConfig(_Strict):
    model: ModelSpec = Field(description="the model to prune")
    data: DataSpec = Field(description="the data: kind digits, npz, imagefolder or callable")
    task: TaskSpec = Field(
        default_factory=lambda: TaskSpec.model_validate({}), description="the task (default: classification)"
    )
    tasks: dict[str, TaskEntry] | None = Field(
        None, description="several tasks judged together, each with its own tolerance (instead of `task`): "
                          "`tasks: {name: {factory: ..., kwargs: ..., tolerance: 0.01}}`; every task's factory "
                          "gets the same loaders"
    )
    budget: BudgetSpec | None = Field(None, description="the cost bounds, e.g. `budget: {macs: 0.5}`")
    tolerance: float = Field(0.01, ge=0.0, description="largest acceptable metric drop, absolute, in the metric's "
                                                        "units (under 1 for a metric measured in [0, 1])")
    ignore: list[str] = Field(default_factory=list, description="names of modules whose output width is kept")
    run_dir: str | None = Field(
        None, description="the run directory (default: runs/<config file name>, under the working directory)"
    )
    title: str | None = Field(None, description="the report's title")
    warm_start: str | None = Field(
        None, description="start from a previous run's plan (its run directory, a directory adaprune.save wrote, or a "
                          "plan JSON file), mapped onto this model: for an updated model, re-pruned in a fraction of "
                          "the time (see adaprune.adapt.warm)"
    )
    options: Options = Field(  # type: ignore[valid-type]
        default_factory=Options, description="adapt options (AdaptConfig fields)"
    )
    sensitivity: SensitivitySpec = Field(
        default_factory=lambda: SensitivitySpec.model_validate({}), description="sensitivity analysis"
    )
    report: ReportSpec = Field(
        default_factory=lambda: ReportSpec.model_validate({}), description="what the report measures"
    )
    ladder: LadderSpec = Field(
        default_factory=lambda: LadderSpec.model_validate({}), description="the rungs of `adaprune ladder`"
    )

    def adapt_options(self) -> dict[str, Any]:
        options: BaseModel = self.options
        return {k: v for k, v in options.model_dump().items() if v is not None}


_RUN_CONFIGS: dict[type[_BudgetChecks], type[RunConfig]] = {}


def run_config() -> type[RunConfig]:
    """The run configuration's model for the costs registered now: :class:`RunConfig`, or (after a cost
    was registered) a subclass whose ``budget`` section has that cost too."""
    spec = budget_spec()
    if spec is BudgetSpec:
        return RunConfig
    if spec not in _RUN_CONFIGS:
        info = RunConfig.model_fields["budget"]
        annotation: Any = spec | None
        _RUN_CONFIGS[spec] = create_model(
            "RunConfig", __base__=RunConfig, budget=(annotation, Field(None, description=info.description))
        )
    return _RUN_CONFIGS[spec]


def _field_info(loc: tuple[Any, ...]) -> tuple[str, str]:
    """The dotted field name of a pydantic error location, and the field's description."""
    model: Any = run_config()
    names: list[str] = []
    description = ""
    parts = list(loc)
    while parts:
        part = parts.pop(0)
        if isinstance(part, int):
            names[-1:] = [f"{names[-1]}[{part}]"] if names else [f"[{part}]"]
            continue
        fields = getattr(model, "model_fields", {}) if isinstance(model, type) else {}
        if part not in fields:
            names.append(_name(part))
            model = None
            continue
        names.append(_name(part))
        info = fields[part]
        description = info.description or ""
        model = info.annotation
        args = [a for a in typing.get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)]
        if part == "data" and parts and parts[0] in DATA_KINDS:
            model = DATA_KINDS[parts.pop(0)]
        elif len(args) == 1:
            model = args[0]
    return ".".join(names) or "config", description


def _format(err: dict[str, Any]) -> str:
    kind, loc, msg = err["type"], tuple(err["loc"]), err["msg"]
    field, help_ = _field_info(loc)
    if kind == "missing":
        return f"{field}: missing; add it: {help_ or 'see the documented example'}"
    if kind == "extra_forbidden":
        parent, _ = _field_info(loc[:-1])
        allowed = _allowed(loc[:-1])
        close = difflib.get_close_matches(str(loc[-1])[:100], allowed, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        where = "" if parent == "config" else f" in {parent}"
        return f"{field}: unknown field{where}; {hint}allowed: {', '.join(allowed)}"
    if kind == "union_tag_invalid":
        tag = (err.get("ctx") or {}).get("tag")
        return f"{field}.kind: unknown kind {shown(tag)}; use one of {', '.join(DATA_KINDS)}"
    if kind == "union_tag_not_found":
        return f"{field}.kind: missing; use one of {', '.join(DATA_KINDS)}"
    if kind == "value_error":
        return f"{field}: {msg.removeprefix('Value error, ')}"
    got = err.get("input")
    value = shown(got) if not isinstance(got, dict) else "a mapping"
    tail = f" ({help_})" if help_ else ""
    if kind == "string_pattern_mismatch":
        return f"{field}: {value} is not of the form 'module:name'{tail}"
    return f"{field}: {msg[0].lower() + msg[1:]}, got {value}{tail}"


def _allowed(loc: tuple[Any, ...]) -> list[str]:
    root: Any = run_config()
    model: Any = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        if part in DATA_KINDS and model is not root:
            model = DATA_KINDS[part]
            continue
        info = model.model_fields.get(part)
        if info is None:
            return []
        model = info.annotation
        if part == "data":
            continue
        args = [a for a in typing.get_args(model) if isinstance(a, type) and issubclass(a, BaseModel)]
        model = args[0] if len(args) == 1 else model if isinstance(model, type) else None
    return list(getattr(model, "model_fields", {}))


def parse_config(raw: Any, base_dir: Path, source: str = "config") -> RunConfig:
    """Validate a mapping (already loaded from YAML); relative paths are resolved against ``base_dir``."""
    if not isinstance(raw, dict):
        raise CliError(
            f"{source}: the file must hold a mapping (model:, data:, budget: ...), got {type(raw).__name__}"
        )
    if expanded_size(raw, MAX_CONFIG_VALUES) > MAX_CONFIG_VALUES:
        raise CliError(
            f"{source}: the configuration expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases "
            "repeating other values?); a run configuration is a few dozen values"
        )
    try:
        cfg = run_config().model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise CliError(f"{source}: {' '.join(_format(dict(errors[0])).split())}{more}") from None
    except RecursionError:
        raise CliError(f"{source}: the configuration is nested too deeply to be a run configuration") from None
    return _resolve_paths(cfg, base_dir, source)


def _name(part: Any) -> str:
    """A field name from an error location, safe to print (a key can be any YAML value)."""
    text = str(part) if isinstance(part, str) else shown(part)
    return text if text.isidentifier() and len(text) <= 40 else shown(text, 40)


def _abs(path: str, base: Path) -> str:
    p = Path(path).expanduser()
    return str(p if p.is_absolute() else (base / p).resolve())


def _abs_ref(ref: str, base: Path) -> str:
    module, _, name = ref.rpartition(":")
    return f"{_abs(module, base)}:{name}" if module.endswith(".py") else ref


def _resolve_paths(cfg: RunConfig, base: Path, source: str) -> RunConfig:
    model = cfg.model.model_copy(
        update={
            "factory": _abs_ref(cfg.model.factory, base),
            "weights": _abs(cfg.model.weights, base) if cfg.model.weights else None,
        }
    )
    data: BaseModel = cfg.data
    if isinstance(data, (NpzData, ImageFolderData)):
        data = data.model_copy(update={"path": _abs(data.path, base)})
    elif isinstance(data, CallableData):
        data = data.model_copy(update={"factory": _abs_ref(data.factory, base)})
    task = cfg.task.model_copy(
        update={"factory": _abs_ref(cfg.task.factory, base) if cfg.task.factory else None}
    )
    # the default run directory is under the working directory, like `make demo`'s runs/demo
    run_dir = _abs(cfg.run_dir, base) if cfg.run_dir else str(Path("runs", Path(source).stem).resolve())
    warm = _abs(cfg.warm_start, base) if cfg.warm_start else None
    return cfg.model_copy(update={"model": model, "data": data, "task": task, "run_dir": run_dir, "warm_start": warm})


def load_config(path: str | Path) -> RunConfig:
    """Read and validate a YAML run configuration; raises :class:`CliError` with a one-line message."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise CliError(f"{p}: no such file; pass the path of a YAML run configuration")
    try:
        text = fs.read_text(p, what="config", limit=MAX_CONFIG_BYTES)
    except FileFormatError as exc:
        raise CliError(f"{p}: {str(exc).split(': ', 1)[-1]}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise CliError(f"{p}: not valid YAML{where}: {shown(problem)}; fix the syntax") from None
    except RecursionError:
        raise CliError(f"{p}: the YAML is nested too deeply to be a run configuration") from None
    except ValueError as exc:  # a value PyYAML cannot construct (an integer of thousands of digits ...)
        raise CliError(f"{p}: a value cannot be read ({shown(str(exc), 100)}); fix it") from None
    return parse_config(raw, p.resolve().parent, str(p))


MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000


def expanded_size(node: Any, limit: int) -> int:
    """How many values ``node`` holds once YAML aliases are expanded (counting stops past ``limit``).

    Aliases make a small file a huge tree (the "billion laughs"); sizes are memoised per object, so
    this takes time proportional to the file, not to the expansion."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(n: Any) -> int:
        if not isinstance(n, (dict, list)):
            return 1
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in on_path:  # a recursive alias: infinitely large
            return limit + 1
        on_path.add(key)
        children = list(n.keys()) + list(n.values()) if isinstance(n, dict) else n
        total = 1
        for c in children:
            total += size(c)
            if total > limit:
                break
        on_path.discard(key)
        sizes[key] = min(total, limit + 1)
        return sizes[key]

    try:
        return size(node)
    except RecursionError:
        return limit + 1


def dump_config(cfg: RunConfig) -> str:
    """The validated configuration (absolute paths, defaults omitted) as YAML."""
    import yaml

    data = cfg.model_dump(mode="json", exclude_defaults=True)
    return str(yaml.safe_dump(data, sort_keys=False))
