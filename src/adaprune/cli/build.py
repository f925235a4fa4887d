"""From a validated :class:`RunConfig` to objects: the model factory, the loaders, the task, example inputs.

References are resolved first (:func:`resolve`), before anything heavy runs, so an unknown model, a
missing file or a misspelt import path fails at once with a one-line :class:`CliError`.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

import adaprune as ap

from .. import fs
from ..errors import AdapruneError, UntrustedCodeError, shown
from .config import CallableData, CliError, DigitsData, ImageFolderData, NpzData, RunConfig

Loaders = tuple[Iterable[tuple[Any, Any]], Iterable[tuple[Any, Any]]]


def import_ref(ref: str, field: str) -> Any:
    """The object named by ``'package.module:name'`` or ``'/path/file.py:name'`` (dotted names allowed)."""
    module_name, _, attr = ref.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise CliError(f"{field}: file {path} does not exist; give {IMPORT_FIX}")
            key = f"_adaprune_cli_{abs(hash(str(path)))}"
            module = sys.modules.get(key)
            if module is None:
                spec = importlib.util.spec_from_file_location(key, path)
                assert spec is not None and spec.loader is not None
                module = importlib.util.module_from_spec(spec)
                sys.modules[key] = module
                spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except CliError:
        raise
    except ImportError as exc:
        raise CliError(
            f"{field}: cannot import {module_name!r} ({exc}); check the spelling and that "
            "the package is installed"
        ) from None
    except Exception as exc:  # noqa: BLE001  (the user's module failed to import: one line, not a traceback)
        raise CliError(
            f"{field}: importing {module_name!r} failed: {type(exc).__name__}: {shown(str(exc), 200)}"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CliError(f"{field}: {module_name!r} has no attribute {attr!r}{hint}")
        obj = getattr(obj, part)
    return obj


IMPORT_FIX = "'package.module:name' or 'path/to/file.py:name'"


def _is_hf_config(obj: Any) -> bool:
    try:
        from transformers import PretrainedConfig
    except ImportError:
        return False
    return isinstance(obj, type) and issubclass(obj, PretrainedConfig)


def names_code(cfg: RunConfig) -> bool:
    """Whether building the config's model would import or call code named in the config.

    A torchvision model name (checked against ``torchvision.models.list_models()``) and a transformers
    config class built through an Auto class name no code of their own: everything else does (a
    module path, a ``.py`` file)."""
    module, _, name = cfg.model.factory.rpartition(":")
    if module == "torchvision" or module.startswith(f"{EXAMPLES}."):
        return False  # (an example is built only if it is an nn.Module class: see model_factory)
    return not (module == "transformers" and name.endswith("Config") and "." not in name)


EXAMPLES = "adaprune.examples"


def model_factory(cfg: RunConfig, *, trusted: bool = True) -> Callable[[], nn.Module]:
    """A zero-argument function building the (unpruned, untrained) architecture the config names.

    With ``trusted=False`` (a config read from a run directory received from elsewhere) only
    factories that name no code are built (:func:`names_code`); anything else raises
    :class:`UntrustedCodeError`.
    """
    spec = cfg.model
    module, _, name = spec.factory.rpartition(":")
    kwargs = dict(spec.kwargs)
    if not trusted and names_code(cfg):
        raise UntrustedCodeError(
            f"model.factory: the run directory's config names code ({shown(spec.factory)}); adaprune does "
            "not import code named in a run directory: pass --factory 'module:function' (your own "
            "factory of the unpruned model), or --trust-config if you trust this run directory"
        )
    if not trusted:
        _check_untrusted_kwargs(spec.factory, kwargs)
    if module == "torchvision":
        try:
            import torchvision
        except ImportError:
            raise CliError(
                "model.factory: torchvision is not installed: pip install 'adaprune[vision]'"
            ) from None
        names = torchvision.models.list_models()
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = (
                f"; did you mean {', '.join(close)}?" if close else "; see torchvision.models.list_models()"
            )
            raise CliError(f"model.factory: torchvision has no model {name!r}{hint}")
        return lambda: torchvision.models.get_model(name, **kwargs)
    obj = import_ref(spec.factory, "model.factory")
    example_model = isinstance(obj, type) and issubclass(obj, nn.Module) and module.startswith(f"{EXAMPLES}.")
    if not trusted and not (_is_hf_config(obj) or example_model):
        raise UntrustedCodeError(
            f"model.factory: {shown(spec.factory)} is neither a transformers config class nor an adaprune "
            "example model; pass --factory or --trust-config"
        )
    if _is_hf_config(obj):
        import transformers

        auto = getattr(transformers, spec.hf_auto, None)
        if not trusted and not spec.hf_auto.startswith("Auto"):
            auto = None
        if auto is None or not hasattr(auto, "from_config"):
            raise CliError(
                f"model.hf_auto: transformers has no Auto class {spec.hf_auto!r}; "
                "use e.g. AutoModelForSequenceClassification or AutoModelForImageClassification"
            )
        if trusted:
            return lambda: auto.from_config(obj(**kwargs))
        return lambda: auto.from_config(_builtin_config(obj, kwargs), trust_remote_code=False)
    if not callable(obj):
        raise CliError(
            f"model.factory: {spec.factory!r} is a {type(obj).__name__}, not a class or function "
            "returning an nn.Module"
        )
    return lambda: obj(**kwargs)


def _check_untrusted_kwargs(factory: str, kwargs: dict[str, Any]) -> None:
    """An untrusted config's keyword arguments may not fetch or point at code or weights: a torchvision
    ``weights=`` downloads and unpickles a checkpoint, a transformers ``auto_map`` names remote code."""
    risky = sorted(k for k in kwargs if "weights" in k or k in ("auto_map", "trust_remote_code", "name_or_path",
                                                                 "_name_or_path", "pretrained", "checkpoint"))
    if risky:
        raise UntrustedCodeError(
            f"model.kwargs: the run directory's config passes {', '.join(shown(k, 40) for k in risky[:3])} to "
            f"{shown(factory)}, which can load weights or code from elsewhere; pass --factory or --trust-config"
        )


def _builtin_config(cls: Any, kwargs: dict[str, Any]) -> Any:
    """``cls(**kwargs)`` for an untrusted config: only a transformers architecture that ships with the library
    (no ``auto_map`` pointing at code outside it)."""
    from transformers import CONFIG_MAPPING

    if cls not in set(CONFIG_MAPPING.values()):
        raise UntrustedCodeError(
            f"model.factory: {cls.__name__} is not a configuration of an architecture built into transformers; "
            "pass --factory or --trust-config"
        )
    config = cls(**kwargs)
    if getattr(config, "auto_map", None):
        raise UntrustedCodeError("model.kwargs: the config names remote code (auto_map); pass --factory or --trust-config")
    return config


def build_model(
    cfg: RunConfig, factory: Callable[[], nn.Module], weights: bool = True, label: str | None = None
) -> nn.Module:
    """``factory()`` checked (``label``: the factory's name in messages; default the config's)."""
    label = label or cfg.model.factory
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001  (the user's factory or its kwargs are wrong)
        raise CliError(
            f"model: {label}(**{shown(cfg.model.kwargs)}) failed: "
            f"{type(exc).__name__}: {shown(str(exc), 200)}; check model.kwargs"
        ) from None
    if not isinstance(model, nn.Module):
        raise CliError(f"model.factory: {label} returned a {type(model).__name__}, not an nn.Module")
    if weights and cfg.model.weights:
        from safetensors.torch import load_file

        path = Path(cfg.model.weights)
        try:
            fs.check_regular(path, what="model.weights")
        except AdapruneError as exc:
            raise CliError(f"{exc}; give a .safetensors state dict") from None
        try:
            model.load_state_dict(load_file(str(path)), strict=True)
        except Exception as exc:  # noqa: BLE001  (corrupt file or shapes that do not fit)
            detail = " ".join(str(exc).split()).replace("Error(s) in loading state_dict for", "for")
            raise CliError(
                f"model.weights: {path} does not fit the model ({shown(detail, 240)}); check model.kwargs"
            ) from None
    return model


def check_ignore(cfg: RunConfig, model: nn.Module) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for n in cfg.ignore:
        if n not in names:
            close = difflib.get_close_matches(n, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CliError(f"ignore: the model has no module named {n!r}{hint}")


def _tensor_loaders(x_train: Any, y_train: Any, x_val: Any, y_val: Any, batch_size: int) -> Loaders:
    def loader(x: Any, y: Any, shuffle: bool) -> torch.utils.data.DataLoader:
        ds = torch.utils.data.TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
        return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle)

    return loader(x_train, y_train, True), loader(x_val, y_val, False)


def _npz(spec: NpzData) -> Loaders:
    import numpy as np

    path = Path(spec.path)
    try:
        fs.check_regular(path, what="data.path")
    except AdapruneError as exc:
        raise CliError(f"{exc}; give an .npz file with x_train, y_train, x_val, y_val") from None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # noqa: BLE001  (not an npz, truncated, pickled objects)
        raise CliError(f"data.path: {path} is not a readable .npz file ({exc})") from None
    missing = [k for k in ("x_train", "y_train", "x_val", "y_val") if k not in arrays]
    if missing:
        raise CliError(
            f"data.path: {path} lacks {', '.join(missing)}; it holds {', '.join(arrays) or 'nothing'}"
        )
    xs = [
        arrays[k].astype(np.float32) if arrays[k].dtype.kind == "f" else arrays[k]
        for k in ("x_train", "x_val")
    ]
    ys = [arrays[k].astype(np.int64) for k in ("y_train", "y_val")]
    return _tensor_loaders(xs[0], ys[0], xs[1], ys[1], spec.batch_size)


def _imagefolder(spec: ImageFolderData) -> Loaders:
    try:
        from torchvision import datasets, transforms
    except ImportError:
        raise CliError("data: kind imagefolder needs torchvision: pip install 'adaprune[vision]'") from None
    root = Path(spec.path)
    for sub in (spec.train, spec.val):
        if not (root / sub).is_dir():
            raise CliError(
                f"data.path: {root / sub} is not a folder; the data folder needs {spec.train}/ and "
                f"{spec.val}/ with one sub-folder per class"
            )
    tf = transforms.Compose(
        [
            transforms.Resize(spec.image_size),
            transforms.CenterCrop(spec.image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    train = datasets.ImageFolder(str(root / spec.train), transform=tf)
    val = datasets.ImageFolder(str(root / spec.val), transform=tf)
    return (
        torch.utils.data.DataLoader(train, batch_size=spec.batch_size, shuffle=True),
        torch.utils.data.DataLoader(val, batch_size=spec.batch_size),
    )


def loaders(cfg: RunConfig) -> Loaders:
    """``(train_loader, val_loader)`` from the config's data adapter."""
    spec = cfg.data
    if isinstance(spec, DigitsData):
        from ..examples.digits import load_digits_data

        d = load_digits_data(spec.seed)
        return d.loader("train", spec.batch_size, shuffle=True), d.loader("val", spec.batch_size)
    if isinstance(spec, NpzData):
        return _npz(spec)
    if isinstance(spec, ImageFolderData):
        return _imagefolder(spec)
    assert isinstance(spec, CallableData)
    fn = import_ref(spec.factory, "data.factory")
    try:
        out = fn(**spec.kwargs)
    except Exception as exc:  # noqa: BLE001  (the user's data function failed)
        raise CliError(
            f"data.factory: {spec.factory}(**{shown(spec.kwargs)}) failed: {type(exc).__name__}: "
            f"{shown(str(exc), 200)}"
        ) from None
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise CliError(
            f"data.factory: {spec.factory} must return (train_loader, val_loader), got {type(out).__name__}"
        )
    return out[0], out[1]


def make_task(cfg: RunConfig, train: Iterable[Any], val: Iterable[Any]) -> Any:
    if cfg.tasks is not None:
        if cfg.task != type(cfg.task).model_validate({}):
            raise CliError("give either task: (one task) or tasks: (several, each with its tolerance), not both")
        if not cfg.tasks:
            raise CliError("tasks: is empty; name at least one task, e.g. tasks: {digit: {tolerance: 0.01}}")
        made = {name: _one_task(entry, train, val, f"tasks.{name}") for name, entry in cfg.tasks.items()}
        try:
            return ap.MultiTask(made, {n: e.tolerance for n, e in cfg.tasks.items()},
                                {n: e.weight for n, e in cfg.tasks.items()},
                                heads={n: e.head for n, e in cfg.tasks.items() if e.head})
        except AdapruneError as exc:
            raise CliError(f"tasks: {exc}") from None
    return _one_task(cfg.task, train, val, "task")


def _one_task(t: Any, train: Iterable[Any], val: Iterable[Any], where: str) -> Any:
    if t.factory is None:
        return ap.ClassificationTask(
            train, val, lr=t.lr, distill=t.distill, temperature=t.temperature, alpha=t.alpha
        )
    fn = import_ref(t.factory, f"{where}.factory")
    try:
        return fn(train, val, **t.kwargs)
    except Exception as exc:  # noqa: BLE001  (the user's task factory failed)
        raise CliError(f"{where}.factory: {t.factory}(...) failed: {type(exc).__name__}: {shown(str(exc), 200)}") from None


def example_inputs(val: Iterable[tuple[Any, Any]], batch_size: int) -> Any:
    """The first ``batch_size`` inputs of the validation loader (costs and latency are measured on them)."""
    try:
        x, _ = next(iter(val))
    except StopIteration:
        raise CliError("data: the validation loader yields no batches") from None
    except (TypeError, ValueError):
        raise CliError("data: the validation loader must yield (inputs, targets) pairs") from None
    return tree_map(lambda t: t[:batch_size] if isinstance(t, torch.Tensor) and t.dim() > 0 else t, x)


def budget(cfg: RunConfig) -> ap.Budget:
    if cfg.budget is None:
        raise CliError("budget: missing; add e.g. `budget: {macs: 0.5}` (a fraction of the original MACs)")
    fields = cfg.budget.model_dump(exclude={"batch_size"})
    try:
        return ap.Budget(**fields)
    except ap.errors.AdapruneError as exc:
        raise CliError(f"budget: {exc}") from None


def check_options(cfg: RunConfig) -> None:
    """Cross-field checks of the adapt options (AdaptConfig) and the importance name, before any work."""
    from ..adapt import AdaptConfig
    from ..importance import get_importance

    opts = cfg.adapt_options()
    for field, name in (
        ("options.importance", opts.get("importance")),
        ("sensitivity.importance", cfg.sensitivity.importance),
    ):
        if name is not None:
            try:
                get_importance(name)
            except ap.errors.AdapruneError as exc:
                raise CliError(f"{field}: {exc}") from None
    try:
        AdaptConfig(tolerance=cfg.tolerance, **opts)
    except ap.errors.AdapruneError as exc:
        message = str(exc)
        named = next((f for f in AdaptConfig.__dataclass_fields__ if message.startswith(f"{f}=")), None)
        where = "tolerance" if named == "tolerance" else f"options.{named}" if named else "options"
        raise CliError(f"{where}: {message}") from None


@dataclass
class Job:
    """Everything a command needs, built from a config."""

    cfg: RunConfig
    factory: Callable[[], nn.Module]
    model: nn.Module
    task: Any
    x: Any
    run_dir: Path


def build_job(cfg: RunConfig, need_budget: bool = True) -> Job:
    """Resolve and build in order of cost, so cheap mistakes are reported before expensive work."""
    if need_budget:
        budget(cfg)
    check_options(cfg)
    factory = model_factory(cfg)
    train, val = loaders(cfg)
    model = build_model(cfg, factory)
    check_ignore(cfg, model)
    task = make_task(cfg, train, val)
    x = example_inputs(val, cfg.budget.batch_size if cfg.budget else 1)
    assert cfg.run_dir is not None
    return Job(cfg, factory, model, task, x, Path(cfg.run_dir))
