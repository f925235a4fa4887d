"""After a committed removal, a transformers model's config states the new sizes, or refuses to be saved.

transformers rebuilds a model from its config alone (``from_pretrained``), so a pruned model whose
config still gives the original sizes saves a checkpoint that either fails to load or, with
``ignore_mismatched_sizes=True``, reloads random weights at the original sizes. :func:`update_configs`
runs once per committed :func:`~adaprune.surgery.remove.removal`; for every ``PretrainedConfig`` held
as ``.config`` by a module of the model whose subtree the plan cut, it

1. rebuilds the module that owns the config (the outermost ``PreTrainedModel`` holding it) on the
   meta device from the config as it stands (a reference: no weights, no compute);
2. reads the per-layer sizes (heads, KV heads, head size, FFN width, residual width) of the pruned
   model and of the reference, and proposes new values for the config fields that state them
   (``intermediate_size``, ``n_inner``, ``num_attention_heads``, ``num_key_value_heads``,
   ``hidden_size`` ...) where a size is the same in every layer;
3. checks a proposal the way transformers would use it: the changed config goes through its JSON
   round trip and its validators, the owner is rebuilt from it on the meta device, and every
   parameter and buffer shape, and every numeric module attribute that surgery changed (``num_heads``,
   ``all_head_size`` ...), must equal the pruned model's. Only a proposal that passes is written;
4. when no proposal reproduces the model (sizes differ per layer; BERT derives the head size from
   ``hidden_size / num_attention_heads``; ...), the config keeps what it can state and its class
   becomes a subclass of its own class (:class:`UnsaveableConfig`) whose ``save_pretrained`` raises
   :class:`UnsaveableConfigError` saying why and how to save instead; a
   :class:`UnsaveableConfigWarning` says so at prune time.

The check (3) is why this needs no table per architecture: a field that a model derives differently
(head size, rotary width) shows up as a shape or attribute that does not match, and the proposal is
rejected rather than trusted. Nothing is imported from transformers unless it is already imported
(a model holding a config implies it is), and a dry run or a rollback never gets here.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import itertools
import json
import math
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, SupportsIndex

import torch
from torch import nn

from ..errors import ConfigError, shown
from .hf_describe import Entry, describe, entries, listing

if TYPE_CHECKING:
    from ..plan import Plan

__all__ = [
    "UnsaveableConfig",
    "UnsaveableConfigError",
    "UnsaveableConfigWarning",
    "configs_unchecked",
    "describe",
    "module_sizes",
    "propose",
    "update_configs",
]


class UnsaveableConfigError(ConfigError):
    """A pruned model's transformers config cannot state its sizes, so ``save_pretrained`` refuses to write a
    checkpoint that would reload with random weights. The message says why and how to save instead."""


class UnsaveableConfigWarning(UserWarning):
    """A removal left a transformers config that cannot state the model's new sizes (saving through
    ``save_pretrained`` will raise :class:`UnsaveableConfigError`)."""


# -- reading sizes from the modules (pure) ----------------------------------------------------------------

KINDS = ("hidden", "heads", "kv_heads", "head_dim", "ffn")
FIELDS: Mapping[str, tuple[str, ...]] = {
    "hidden": ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "hidden_dim", "word_embed_proj_dim",
               "embedding_size"),
    "heads": ("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
              "decoder_attention_heads"),
    "kv_heads": ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "multi_query_group_num"),
    "head_dim": ("head_dim", "d_kv", "kv_channels"),
    "ffn": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
            "ffn_hidden_size", "mlp_dim", "hidden_dim"),
}
"""Config fields that may state each kind of size. A field is proposed for a kind only when its value
equals that size in the reference model (``hidden_dim`` is DistilBERT's FFN width, others' residual
width) or is ``None`` (GPT-2's ``n_inner``: 4 x ``n_embd``)."""
GROUPS = {"hidden": "hidden", "heads": "attention", "kv_heads": "attention", "head_dim": "attention",
          "ffn": "ffn"}
"""Fields of one group are changed together or not at all (heads and KV heads fix the GQA ratio)."""

_Q = ("q_proj", "query", "q", "q_lin", "q_attn")
_K = ("k_proj", "key", "k", "k_lin")
_QKV = ("qkv_proj", "query_key_value", "Wqkv", "qkv", "in_proj")
_HEAD_SIZE = ("head_dim", "attention_head_size", "head_size", "key_value_proj_dim")
_FFN = (("up_proj", "down_proj"), ("gate_proj", "down_proj"), ("gate_up_proj", "down_proj"), ("fc1", "fc2"),
        ("c_fc", "c_proj"),
        ("wi", "wo"), ("wi_0", "wo"), ("lin1", "lin2"), ("dense_h_to_4h", "dense_4h_to_h"), ("w1", "w2"),
        ("fc_in", "fc_out"), ("intermediate.dense", "output.dense"))


def widths(mod: Any) -> tuple[int, int] | None:
    """``(in, out)`` width of a projection: ``nn.Linear`` or transformers' ``Conv1D`` (``nx``, ``nf``)."""
    if isinstance(mod, nn.Linear):
        return int(mod.weight.shape[1]), int(mod.weight.shape[0])
    attrs = vars(mod) if isinstance(mod, nn.Module) else {}
    nx, nf = attrs.get("nx"), attrs.get("nf")
    return (nx, nf) if isinstance(nx, int) and isinstance(nf, int) else None


def _child(mod: nn.Module, path: str) -> tuple[int, int] | None:
    """Widths of the submodule at ``path`` (``"intermediate.dense"``), if it is a projection."""
    found: nn.Module | None = mod
    for part in path.split("."):
        found = found._modules.get(part) if found is not None else None
    return widths(found) if found is not None else None


def _int_attr(mod: nn.Module, names: Iterable[str]) -> int | None:
    for n in names:
        v = mod.__dict__.get(n)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def _attention(mod: nn.Module) -> dict[str, int] | None:
    head = _int_attr(mod, _HEAD_SIZE)
    q = next((w for n in _Q if (w := _child(mod, n)) is not None), None)
    k = next((w for n in _K if (w := _child(mod, n)) is not None), None)
    if q is None and (fused := _child(mod, "c_attn")) is not None and fused[1] % 3 == 0:  # GPT-2's qkv
        q = k = (fused[0], fused[1] // 3)
    if head is not None and q is None:  # another fused projection: heads and KV heads are not separable
        qkv = next((w for n in _QKV if (w := _child(mod, n)) is not None), None)
        return None if qkv is None else {"hidden": qkv[0], "head_dim": head}
    if head is None or q is None:
        return None
    kv = k[1] if k is not None else q[1]
    return {"hidden": q[0], "heads": q[1] // head, "kv_heads": kv // head, "head_dim": head}


def _ffn(mod: nn.Module) -> tuple[int, int] | None:
    """``(FFN width, residual width)``: the down projection's input and output widths."""
    for up, down in _FFN:
        if _child(mod, up) is not None and (d := _child(mod, down)) is not None:
            return d
    return None


def module_sizes(root: nn.Module) -> dict[str, dict[str, int]]:
    """The sizes a config would have to state, per attention / FFN module of ``root`` (by module name).

    Attention modules give ``hidden`` (their input width), ``heads``, ``kv_heads`` and ``head_dim``;
    FFN modules (an up and a down projection, or BERT's ``intermediate``/``output``) give ``ffn`` and
    ``hidden`` (the down projection's output width).
    """
    out: dict[str, dict[str, int]] = {}
    for name, mod in root.named_modules():
        sizes = _attention(mod) or {}
        if (w := _ffn(mod)) is not None:
            sizes["ffn"], sizes["hidden"] = w
        if sizes:
            out[name] = sizes
    return out


def values_of(sizes: Mapping[str, Mapping[str, int]], kind: str) -> list[int]:
    """The distinct values of ``kind`` over all modules, in first-seen order."""
    return list(dict.fromkeys(s[kind] for s in sizes.values() if kind in s))


# -- what to change (pure) --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Proposal:
    """New config values per group (``hidden``, ``attention``, ``ffn``), an optional explicit
    ``head_dim`` for configs that derive it (``extra``), and the kinds that differ per layer."""

    groups: dict[str, dict[str, int]] = field(default_factory=dict)
    extra: dict[str, int] = field(default_factory=dict)
    differs: dict[str, list[Entry]] = field(default_factory=dict)


def config_fields(config: Any) -> dict[str, Any]:
    """The size fields ``config`` stores (names as stored: GPT-2's ``hidden_size`` is ``n_embd``)."""
    alias = getattr(type(config), "attribute_map", {}) or {}
    stored = vars(config)
    names = (alias.get(n, n) for kind in KINDS for n in FIELDS[kind])
    return {n: stored[n] for n in dict.fromkeys(names) if n in stored}


def propose(fields: Mapping[str, Any], before: Mapping[str, Mapping[str, int]],
            after: Mapping[str, Mapping[str, int]]) -> Proposal:
    """What to write into a config whose fields are ``fields``.

    Args:
        fields: the config's size fields (:func:`config_fields`).
        before: :func:`module_sizes` of the model rebuilt from the config as it is.
        after: :func:`module_sizes` of the pruned model.
    """
    out = Proposal()
    claimed: set[str] = set()
    for kind in KINDS:
        old, new = values_of(before, kind), values_of(after, kind)
        if len(old) != 1:
            continue
        for name in FIELDS[kind]:
            if name in fields and name not in claimed and (fields[name] == old[0] or fields[name] is None):
                claimed.add(name)
                if old != new and len(new) == 1:
                    out.groups.setdefault(GROUPS[kind], {})[name] = new[0]
        if old != new and len(new) > 1 and not (kind == "kv_heads" and _mha(after)):
            out.differs[kind] = entries(after, kind)
    heads = values_of(after, "head_dim")
    stated = any(fields.get(n) is not None for n in FIELDS["head_dim"])
    if len(heads) == 1 and not stated and {"attention", "hidden"} & out.groups.keys():
        out.extra["head_dim"] = heads[0]  # Qwen2 reads config.head_dim if present, else derives it
    return out


def _mha(sizes: Mapping[str, Mapping[str, int]]) -> bool:
    """Every attention module has as many KV heads as heads (no GQA: KV heads say nothing more)."""
    return all(s["kv_heads"] == s["heads"] for s in sizes.values() if "kv_heads" in s)


def candidates(p: Proposal) -> Iterator[dict[str, int]]:
    """Field sets to try, most complete first: all groups, then all groups with ``extra``, then every
    smaller subset (without, then with ``extra``). The empty set is the config as it is, not yielded."""
    names = list(p.groups)
    extras = [{}, p.extra] if p.extra else [{}]
    seen: list[dict[str, int]] = []
    for r in range(len(names), -1, -1):
        for subset in itertools.combinations(names, r):
            for extra in extras:
                fields = {k: v for g in subset for k, v in p.groups[g].items()} | extra
                if fields and fields not in seen:
                    seen.append(fields)
                    yield fields


# -- checking a config against the model: rebuild it on the meta device and compare ----------------------


@dataclass(frozen=True)
class Mismatch:
    """One way the model rebuilt from a config differs from the pruned model."""

    name: str
    """Tensor or module name, relative to the config's owner."""
    what: str
    """``"shape"``, ``"module"``, ``"build"`` (the config or the model could not be built) or an attribute."""
    config_value: Any
    model_value: Any

    def __str__(self) -> str:
        cfg, mod = shown(self.config_value, 40), shown(self.model_value, 40)
        if self.what == "build":
            return str(self.model_value)
        if self.what == "shape":
            if self.config_value is None:
                return f"{self.name} would be missing"
            return f"{self.name} would have shape {cfg}, the pruned model's has {mod}"
        if self.what == "module":
            return f"module {self.name or '(root)'} would be a {cfg}, the pruned model's is a {mod}"
        return f"{self.name + '.' if self.name else ''}{self.what} would be {cfg}, the pruned model's is {mod}"


def plain_class(config: Any) -> type:
    """The config's own transformers class (the one an :class:`UnsaveableConfig` was made from)."""
    return config._adaprune_base if isinstance(config, UnsaveableConfig) else type(config)  # type: ignore[no-any-return]


def with_fields(config: Any, fields: Mapping[str, Any]) -> Any:
    """A copy of ``config``, of its own class, with ``fields`` set (through its validators)."""
    new = copy.deepcopy(config)
    new.__class__ = plain_class(config)
    for name, value in fields.items():
        setattr(new, name, value)
    return new


def rebuild(owner: nn.Module, config: Any) -> nn.Module:
    """``type(owner)`` built on the meta device from ``config`` as ``save_pretrained`` + ``from_pretrained``
    would see it: validated, through its JSON round trip. Raises what the config or the model raises."""
    if callable(getattr(config, "validate", None)):
        config.validate()
    cls: Any = plain_class(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = cls.from_dict(json.loads(config.to_json_string(use_diff=True)))
        with torch.device("meta"), torch.random.fork_rng(devices=[]), _no_init_weights():
            return type(owner)(loaded)


def _no_init_weights() -> Any:
    """transformers' switch that skips weight initialisation (nothing to initialise on meta: only the
    shapes are compared), or nothing on a version without it."""
    for where in ("transformers.initialization", "transformers.modeling_utils"):
        module = sys.modules.get(where)
        if module is not None and callable(getattr(module, "no_init_weights", None)):
            return module.no_init_weights()
    return contextlib.nullcontext()


def _shapes(mod: nn.Module) -> dict[str, tuple[int, ...]]:
    tensors = itertools.chain(mod.named_parameters(remove_duplicate=False), mod.named_buffers(remove_duplicate=False))
    return {n: tuple(t.shape) for n, t in tensors}


def _numeric(v: Any) -> bool:
    if isinstance(v, (tuple, list)):
        return bool(v) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same(a: Any, b: Any) -> bool:
    return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))


def mismatches(owner: nn.Module, rebuilt: nn.Module, reference: nn.Module | None = None) -> dict[tuple[str, str], Mismatch]:
    """Every parameter/buffer shape and numeric module attribute of ``owner`` that ``rebuilt`` lacks or has
    differently (what ``rebuilt`` has on top, such as a pooler the owner was built without, is ignored).

    With ``reference`` (the owner's model rebuilt from the config as it was), an integer attribute counts
    only if surgery changed it (``owner``'s value differs from the reference's): one it left at its old
    value (``LlamaMLP.intermediate_size``, ``GPT2Model.embed_dim``) is a mirror that the pruned model does
    not use for its sizes (its forward pass was checked with it), which a rebuilt model recomputes. A
    float attribute always counts: it is a factor the forward pass uses (Gemma's embedding scale,
    ``sqrt(hidden_size)`` at build time, stays at the original width's value in the pruned model).
    """
    out: dict[tuple[str, str], Mismatch] = {}
    theirs = _shapes(rebuilt)
    for name, shape in _shapes(owner).items():
        if theirs.get(name) != shape:
            out[(name, "shape")] = Mismatch(name, "shape", theirs.get(name), shape)
    mods = dict(rebuilt.named_modules(remove_duplicate=False))
    refs = dict((reference or rebuilt).named_modules(remove_duplicate=False))
    for name, mod in owner.named_modules(remove_duplicate=False):
        other, ref = mods.get(name), refs.get(name)
        if type(other) is not type(mod):
            kind = None if other is None else type(other).__name__
            out[(name, "module")] = Mismatch(name, "module", kind, type(mod).__name__)
            continue
        attrs, old = vars(other), vars(ref) if ref is not None else {}
        for k, v in vars(mod).items():
            if k.startswith("_") or not _numeric(v) or k not in attrs or _same(attrs[k], v):
                continue
            if k not in old or not _same(old[k], v) or isinstance(v, float):
                out[(name, k)] = Mismatch(name, k, attrs[k], v)
    return out


def _failure(exc: BaseException, limit: int = 160) -> str:
    """``"ValueError: message"`` on one line, at most about ``limit`` characters."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text if len(text) <= limit else text[: limit - 3] + '...'}"


def _cut(key: tuple[str, str], cut: set[str]) -> bool:
    """Whether the removal cut the tensor ``key`` names, or a tensor inside the module it names."""
    name, what = key
    if what == "shape":
        return name in cut
    return not name or any(t.startswith(name + ".") for t in cut)


@dataclass(frozen=True)
class Decision:
    """What to write into a config (``fields``), and why it still cannot state the model (``reason``,
    ``None`` when it can)."""

    fields: dict[str, int]
    reason: str | None


def decide(owner: nn.Module, config: Any, cut: set[str], marked: bool = False) -> Decision:
    """The most complete set of config changes that reproduces ``owner``, checked by rebuilding it.

    Args:
        owner: the pruned module built from ``config`` (usually the whole ``PreTrainedModel``).
        config: its config, as it stands (not changed here).
        cut: names of the tensors the removal cut, relative to ``owner``.
        marked: the config already could not state an earlier removal: every difference counts.
            Otherwise differences the config had before, in parts this removal did not cut (a head the
            user swapped for another size), are not this removal's to judge and are ignored.
    """
    reference = rebuild(owner, with_fields(config, {}))
    base = mismatches(owner, reference)
    ignored = set() if marked else {k for k in base if not _cut(k, cut)}
    if not set(base) - ignored:
        return Decision({}, None)
    prop = propose(config_fields(config), module_sizes(reference), module_sizes(owner))
    best: tuple[dict[str, int], list[Mismatch]] = ({}, [m for k, m in base.items() if k not in ignored])
    tried: tuple[dict[str, int], Mismatch] | None = None
    for fields in candidates(prop):
        try:
            found = mismatches(owner, rebuild(owner, with_fields(config, fields)), reference)
        except Exception as exc:  # noqa: BLE001  (a config validator or a model's own size check refused it)
            found = {("", "build"): Mismatch("", "build", None, _failure(exc))}
        left = [m for k, m in found.items() if k not in ignored]
        if not left:
            return Decision(fields, None)
        if tried is None:  # the most complete proposal, and the first thing it gets wrong that was right
            tried = (fields, next((m for k, m in found.items() if k not in base and k not in ignored), left[0]))
        if set(found) <= set(base) and len(left) < len(best[1]):  # fixes some, breaks nothing
            best = (fields, left)
    return Decision(best[0], why(prop, best[1], tried))


def why(prop: Proposal, left: list[Mismatch], tried: tuple[dict[str, int], Mismatch] | None) -> str:
    """One short line: which sizes differ per layer (a few layers named, then how many more), or what the
    config gets wrong with the changes that were tried and as it is."""
    if prop.differs:
        return "sizes differ per layer: " + listing([p for ps in prop.differs.values() for p in ps], REASON - 24)
    parts = []
    if tried is not None:
        setting = ", ".join(f"{k}={v}" for k, v in tried[0].items())
        parts.append(f"with {setting}: {tried[1]}")
    if left and (tried is None or left[0] != tried[1]):
        parts.append(f"{'as it is' if parts else 'rebuilt from it'}: {left[0]}")
    text = "; ".join(parts)
    return text if len(text) <= REASON else text[: REASON - 3] + "..."


REASON = 100
"""Characters of the reason in :func:`message` (the whole message is one line of about 300 at most)."""


def message(config: Any, owner: nn.Module, reason: str) -> str:
    """The one-line error: what cannot be stated, why, and how to save instead."""
    return (
        f"{plain_class(config).__name__} cannot state this pruned {type(owner).__name__} ({reason}); its "
        "save_pretrained checkpoint would not reload. Use adaprune.save(model, dir, plan=plan) and "
        "adaprune.load(dir, factory)"
    )


# -- marking a config that cannot state its model ----------------------------------------------------------


class UnsaveableConfig:
    """Mixed into a subclass of a config's own class when the config cannot state its pruned model's sizes.

    ``isinstance(config, LlamaConfig)`` still holds; ``save_pretrained`` (hence ``model.save_pretrained``
    and ``push_to_hub``, which save the config before any weights) raises :class:`UnsaveableConfigError`.
    ``copy.deepcopy``, ``pickle`` and ``torch.save`` of the config or the model keep the mark. Nothing of
    transformers is patched: only this config object changes class.
    """

    _adaprune_base: type = object
    _adaprune_reason: str = ""

    def save_pretrained(self, *args: Any, **kwargs: Any) -> None:
        """Refuse: the checkpoint would not reload as the pruned model."""
        raise UnsaveableConfigError(self._adaprune_reason)

    def __reduce_ex__(self, protocol: SupportsIndex) -> tuple[Any, ...]:
        return (_unpickle, (self._adaprune_base, self._adaprune_reason), dict(self.__dict__))


@functools.lru_cache(maxsize=256)
def unsaveable_class(base: type, reason: str) -> type:
    """The subclass of ``base`` whose ``save_pretrained`` raises with ``reason`` (one per base and reason)."""
    name = f"Unsaveable{base.__name__}"
    namespace = {"__module__": __name__, "__qualname__": name, "__doc__": UnsaveableConfig.__doc__,
                 "_adaprune_base": base, "_adaprune_reason": reason}
    return type(name, (UnsaveableConfig, base), namespace)


def _unpickle(base: type, reason: str) -> Any:
    return object.__new__(unsaveable_class(base, reason))


def mark(config: Any, reason: str) -> None:
    """Make ``config.save_pretrained`` raise :class:`UnsaveableConfigError` with ``reason``."""
    config.__class__ = unsaveable_class(plain_class(config), reason)


def unmark(config: Any) -> None:
    """Undo :func:`mark` (the config states its model again)."""
    config.__class__ = plain_class(config)


# -- the hook -----------------------------------------------------------------------------------------------


def _depth(name: str) -> int:
    return name.count(".") + 1 if name else 0


def configs(model: nn.Module) -> list[tuple[str, nn.Module, Any]]:
    """``(owner name, owner, config)`` for every transformers config held as ``.config`` by a module of
    ``model``, deepest owner first (sub-configs before the composite configs that hold them). The owner is
    the outermost ``PreTrainedModel`` holding the config, else the outermost module holding it."""
    # only what is already imported: no config instance can exist before its module is, and looking an
    # attribute up on the lazy ``transformers`` module would import it
    loaded = sys.modules.get("transformers.configuration_utils")
    config_cls = getattr(loaded, "PreTrainedConfig", None) or getattr(loaded, "PretrainedConfig", None)
    if config_cls is None:
        return []
    model_cls = getattr(sys.modules.get("transformers.modeling_utils"), "PreTrainedModel", ())
    holders: dict[int, list[tuple[str, nn.Module]]] = {}
    found: dict[int, Any] = {}
    for name, mod in model.named_modules():
        cfg = mod.__dict__.get("config")
        if isinstance(cfg, config_cls):
            holders.setdefault(id(cfg), []).append((name, mod))
            found[id(cfg)] = cfg
    out = []
    for key, mods in holders.items():
        name, owner = min([h for h in mods if isinstance(h[1], model_cls)] or mods, key=lambda h: _depth(h[0]))
        out.append((name, owner, found[key]))
    return sorted(out, key=lambda t: -_depth(t[0]))


def _caller_level() -> int:
    """The ``stacklevel`` that points a warning raised by this module's caller at the first frame outside
    adaprune (and ``contextlib``, which runs the removal's commit): the user's ``prune(...)`` line."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and (
        os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep)
        or frame.f_code.co_filename == contextlib.__file__
    ):
        frame, level = frame.f_back, level + 1
    return level


def _weightless(mod: nn.Module) -> bool:
    tensors = list(itertools.chain(mod.parameters(), mod.buffers()))
    return bool(tensors) and all(t.is_meta for t in tensors)


def update_config(owner: nn.Module, config: Any, cut: set[str]) -> None:
    """Write what ``config`` can state of ``owner``'s sizes; mark it (and warn) if that is not all.

    Never raises: the removal it follows is already committed, so a failure to check marks the config.
    """
    marked = isinstance(config, UnsaveableConfig)
    try:
        decision = decide(owner, config, cut, marked)
        for name, value in decision.fields.items():
            setattr(config, name, value)
        reason = decision.reason
    except Exception as exc:  # noqa: BLE001  (see the docstring: refuse the save rather than fail the cut)
        reason = f"adaprune could not check it: {_failure(exc, REASON - 29)}"
    if reason is None:
        if marked:
            unmark(config)
        return
    text = message(config, owner, reason)
    try:
        mark(config, text)
    except Exception as exc:  # noqa: BLE001  (a config class that cannot be subclassed: say so, loudly)
        text = f"{text}; adaprune could not make save_pretrained refuse it ({_failure(exc)}): do not use it"
        marked = False
    if not marked and not _weightless(owner):  # meta copies (cost prediction) have nothing to save
        warnings.warn(f"save_pretrained will refuse this model: {text}", UnsaveableConfigWarning,
                      stacklevel=_caller_level())


_UNCHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("adaprune_configs_unchecked", default=False)


@contextlib.contextmanager
def configs_unchecked() -> Iterator[None]:
    """Within this context, removals do not check or update transformers configs: for private copies
    that are thrown away (the cost predictor's), where the check would cost more than the removal."""
    token = _UNCHECKED.set(True)
    try:
        yield
    finally:
        _UNCHECKED.reset(token)


def update_configs(model: nn.Module, plan: Plan) -> None:
    """After ``plan`` was committed on ``model``: every transformers config of the model whose subtree the
    plan cut states the new sizes, or its ``save_pretrained`` raises :class:`UnsaveableConfigError`.

    Does nothing when transformers is not imported (no model can then hold a config) or the model holds
    no config. Called once, at the commit point of :func:`~adaprune.surgery.remove.removal`.
    """
    if "transformers" not in sys.modules or not plan.removals or _UNCHECKED.get():
        return
    if all(p.is_meta for p in model.parameters()):  # a weightless copy: nothing to save
        return
    for prefix, owner, config in configs(model):
        cut = {t[len(prefix) + 1:] if prefix else t for t in plan.removals if not prefix or t.startswith(prefix + ".")}
        if cut:
            update_config(owner, config, cut)
