"""The layer registry: what adaprune knows about each kind of module, in one entry per kind.

A :class:`LayerKind` is keyed by a module class (or its qualified name, so an optional library is not
imported) and holds, each optional:

- ``fix(module, old)``: updates the module's size attributes after surgery sliced its tensors
  (``in_features``, ``num_heads``, ``groups`` ...), from the new shapes and ``old``, the module's
  ``__dict__`` from before (under :data:`CUTS`: the positions removed from its own tensors);
- ``role(module, dim)``: whether dim ``dim`` of its ``weight`` indexes its outputs (``"out"``: the
  layer *produces* the channels) or its inputs (``"in"``: it *consumes* them); data-driven criteria
  observe producers' outputs and consumers' inputs;
- ``channel_dim(module, output)``: the dim of its output tensor that holds the channels (default: the
  last);
- ``norm``: a normalisation layer (its output is what the activation sees; the flop counter does not
  count it, so exact cost prediction drops it from its private copy);
- ``refit``: how :func:`adaprune.surgery.reconstruct` refits it as a linear map (a :class:`Refit`);
- ``width(module)``: its output width, for reports.

Every hook is looked up along the module's class hierarchy: the most specific class that registered
*that* hook wins, so a subclass of ``nn.Linear`` that only registers a fixer keeps ``nn.Linear``'s
roles and refit. Registering a hook a class already has raises ``ValueError``.

The built-in kinds live in :mod:`adaprune.layers.torch_nn` (``torch.nn``) and
:mod:`adaprune.layers.known` (transformers, torchvision, by name). ``docs/extending.md`` shows a
custom layer registered in one call.
"""

from __future__ import annotations

from . import known, torch_nn  # noqa: F401  (registers the built-in kinds)
from .registry import (
    CUTS,
    FALLBACK_FIXERS,
    HOOKS,
    LAYERS,
    Fixer,
    LayerKind,
    Refit,
    Role,
    fix_module,
    has_fixer,
    is_norm,
    key_of,
    lookup,
    output_channel_dim,
    output_width,
    refit_of,
    register_fixer,
    register_layer,
    unregister_layer,
    weight_role,
)

__all__ = [
    "CUTS", "FALLBACK_FIXERS", "HOOKS", "LAYERS", "Fixer", "LayerKind", "Refit", "Role", "fix_module", "has_fixer",
    "is_norm", "key_of", "lookup", "output_channel_dim", "output_width", "refit_of", "register_fixer",
    "register_layer", "unregister_layer", "weight_role",
]
