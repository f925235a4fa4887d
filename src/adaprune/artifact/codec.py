"""Encode a (pruned, shared, int8) model's tensors for the compressed artifact, and decode them.

The encoded form is one safetensors blob, entropy-coded with zstandard:

- a shared weight (:class:`~adaprune.share.SharedWeight`) is stored as ``<name>.codebook`` (its
  codebooks, in the weight's dtype) and ``<name>.indices`` (its indices, bit-packed at ``bits`` bits
  into uint8);
- an int8 weight (:class:`~adaprune.quantize.weights.Int8Weight`) as ``<name>.q`` (int8) and
  ``<name>.scale``;
- any other parametrized tensor (a sparsity mask ...) as the value the model computes with, and every
  plain tensor as it is.

The blob's safetensors metadata holds, as JSON, each encoded tensor's kind, shape and bits, and the
plan; so the blob alone is what the model needs beside its architecture, and its size is the model's
``disk_bytes``. Decoding reverses each step and checks every shape, size and dtype against the
metadata, so a corrupted blob is a :class:`~adaprune.io.LoadError`, never a wrong model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import ConfigError, FileFormatError
from ..quantize.weights import Int8Weight
from ..share.result import SharedWeight

FORMAT = "adaprune-compressed"
VERSION = 1
#: the most bytes a compressed blob may decompress to (guards a corrupted header against a zip bomb)
MAX_RAW = 1 << 36


class CodecError(FileFormatError):
    """A compressed blob is corrupted or does not describe its tensors consistently."""


def zstd() -> Any:
    try:
        import zstandard
    except ImportError as exc:  # a core dependency; a broken install says so plainly
        raise ConfigError("the compressed artifact needs zstandard: pip install zstandard") from exc
    return zstandard


# -- bit packing ---------------------------------------------------------------------------------
def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``values`` (integers in [0, 2**bits)) packed at ``bits`` bits each, little-endian, into uint8."""
    flat = values.detach().reshape(-1).to("cpu", torch.uint8).numpy()
    if bits == 8:
        return torch.from_numpy(flat.copy())
    planes = np.unpackbits(flat.reshape(-1, 1), axis=1, bitorder="little")[:, :bits]
    return torch.from_numpy(np.packbits(planes.reshape(-1), bitorder="little"))


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The ``count`` values :func:`pack_bits` packed, as uint8."""
    raw = packed.reshape(-1).to("cpu", torch.uint8).numpy()
    if raw.size != -(-count * bits // 8):
        raise CodecError(f"packed indices: {raw.size} bytes, expected {-(-count * bits // 8)} for {count} values "
                         f"of {bits} bits")
    if bits == 8:
        return torch.from_numpy(raw.copy())
    planes = np.unpackbits(raw, bitorder="little")[: count * bits].reshape(count, bits)
    out = np.packbits(np.pad(planes, ((0, 0), (0, 8 - bits))), axis=1, bitorder="little").reshape(-1)
    return torch.from_numpy(out)


# -- encoding ------------------------------------------------------------------------------------
@dataclass
class Encoded:
    """The tensors to store (name -> tensor) and, per parametrized weight, how it is encoded."""

    tensors: dict[str, torch.Tensor]
    specs: dict[str, dict[str, Any]]
    aliases: dict[str, str]  # a tied tensor's other names -> the name it is stored under


def _parametrized(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``"<module>.<attr>" -> (module, attr)`` for every parametrized tensor of ``model``."""
    out = {}
    for mod_name, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            lists = mod.parametrizations
            assert isinstance(lists, nn.ModuleDict)
            for attr in lists:
                out[f"{mod_name}.{attr}" if mod_name else attr] = (mod, attr)
    return out


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state dict as a plain model's: each parametrized tensor under its own name, as the
    value the model computes with (tied tensors stay the same objects)."""
    parametrized = _parametrized(model)
    out: dict[str, torch.Tensor] = {}
    skip = _skip_prefixes(parametrized)
    for key, t in model.state_dict().items():
        if not key.startswith(skip):
            out[key] = t
    for name, (mod, attr) in parametrized.items():
        out[name] = getattr(mod, attr).detach()
    return out


def _skip_prefixes(parametrized: dict[str, tuple[nn.Module, str]]) -> tuple[str, ...]:
    """State-dict prefixes of the parametrizations (their originals, codebooks, masks ...)."""
    return tuple(
        (f"{name.rpartition('.')[0]}.parametrizations.{attr}." if "." in name else f"parametrizations.{attr}.")
        for name, (_, attr) in parametrized.items()
    )


def encode(model: nn.Module) -> Encoded:
    """The tensors and specs that store ``model``: every state-dict entry once, shared and int8 weights
    in their compact form."""
    parametrized = _parametrized(model)
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, dict[str, Any]] = {}
    skip_prefixes = _skip_prefixes(parametrized)
    for name, (mod, attr) in parametrized.items():
        plist = mod.parametrizations[attr]  # type: ignore[index]
        chain = list(plist)
        value = getattr(mod, attr).detach()
        if attr == "weight" and len(chain) == 1 and isinstance(chain[0], SharedWeight):
            part = chain[0]
            bits = max(1, int(part.codebook.shape[1] - 1).bit_length())
            tensors[f"{name}.codebook"] = part.codebook.detach().contiguous()
            tensors[f"{name}.indices"] = pack_bits(part.indices, bits)
            specs[name] = {"kind": "shared", "bits": bits, "shape": list(part.indices.shape),
                           "groups": int(part.codebook.shape[0]), "dtype": str(value.dtype).removeprefix("torch.")}
        elif attr == "weight" and len(chain) == 1 and isinstance(chain[0], Int8Weight):
            q8 = chain[0]
            tensors[f"{name}.q"] = q8.q.detach().contiguous()
            tensors[f"{name}.scale"] = q8.scale.detach().contiguous()
            specs[name] = {"kind": "int8", "shape": list(q8.q.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        else:  # a mask or anything else: the value the model computes with
            tensors[name] = value.contiguous()
            specs[name] = {"kind": "value", "shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    aliases: dict[str, str] = {}
    first: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if key.startswith(skip_prefixes):
            continue
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in first:
            aliases[key] = first[ident]  # a tied tensor: stored once, restored under every name
            continue
        first[ident] = key
        tensors[key] = t.contiguous()
    return Encoded(tensors, specs, aliases)


def to_blob(encoded: Encoded, plan_json: str, level: int) -> tuple[bytes, int]:
    """The zstd-compressed safetensors blob of ``encoded`` (plan and specs in its metadata), and the
    size of the blob before compression."""
    from safetensors.torch import save

    meta = {"format": FORMAT, "version": str(VERSION), "specs": json.dumps(encoded.specs, sort_keys=True),
            "aliases": json.dumps(encoded.aliases, sort_keys=True),
            "plan": plan_json}
    # one metadata entry: safetensors writes its metadata map in no fixed order, and the blob (its size
    # is disk_bytes) must be the same bytes every time
    raw = save({k: v.cpu() for k, v in encoded.tensors.items()}, metadata={FORMAT: json.dumps(meta, sort_keys=True)})
    # the content checksum: a corrupted blob whose hash was rewritten still fails, never loads wrong weights
    z = zstd().ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    return z.compress(raw), len(raw)


def from_blob(blob: bytes, raw_bytes: int) -> tuple[Encoded, str]:
    """The encoded tensors and the plan JSON of a blob :func:`to_blob` wrote; ``raw_bytes`` is the size
    recorded at saving (the decompressed size must match it)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    z = zstd()
    if raw_bytes > MAX_RAW:
        raise CodecError(f"the recorded size {raw_bytes:,} is more than adaprune decompresses")
    try:
        raw = z.ZstdDecompressor().decompress(blob, max_output_size=raw_bytes)
    except z.ZstdError as exc:
        raise CodecError(f"the compressed weights do not decompress ({exc}): the file is truncated or corrupted") from None
    if len(raw) != raw_bytes:
        raise CodecError(f"the weights decompress to {len(raw):,} bytes, {raw_bytes:,} were saved: the file is corrupted")
    try:
        tensors = load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise CodecError(f"the decompressed weights are not a safetensors file ({exc})") from None
    try:
        meta = json.loads((header.get("__metadata__") or {})[FORMAT])
    except (KeyError, TypeError, ValueError, AttributeError):
        meta = None
    if not isinstance(meta, dict):
        raise CodecError(f"the blob is not an {FORMAT} v{VERSION} blob (no {FORMAT} metadata)")
    if meta.get("format") != FORMAT or meta.get("version") != str(VERSION):
        raise CodecError(f"the blob is not an {FORMAT} v{VERSION} blob (metadata {sorted(meta)})")
    try:
        specs = json.loads(meta["specs"])
        aliases = json.loads(meta.get("aliases", "{}"))
        plan_json = meta["plan"]
    except (KeyError, ValueError) as exc:
        raise CodecError(f"the blob's metadata lacks its specs or plan ({exc})") from None
    if not isinstance(specs, dict) or not isinstance(plan_json, str):
        raise CodecError("the blob's specs are not a JSON object")
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise CodecError("the blob's aliases are not an object of names")
    return Encoded(tensors, specs, aliases), plan_json


# -- decoding ------------------------------------------------------------------------------------
def _dtype(name: str, spec: dict[str, Any]) -> torch.dtype:
    dt = getattr(torch, str(spec.get("dtype", "")), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise CodecError(f"{name}: dtype {spec.get('dtype')!r} is not a floating-point dtype")
    return dt


def _take(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise CodecError(f"{key} is missing from the blob")
    return tensors.pop(key)


def decode(encoded: Encoded) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """The plain state dict (every encoded weight decoded to its value, tied names restored) and, per
    shared or int8 weight, the parametrization that computes it."""
    tensors, specs = dict(encoded.tensors), encoded.specs
    values: dict[str, torch.Tensor] = {}
    parts: dict[str, nn.Module] = {}
    for name, spec in specs.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("shape"), list):
            raise CodecError(f"{name}: its spec is not an object with a shape")
        shape = tuple(int(s) for s in spec["shape"])
        count = int(np.prod(shape)) if shape else 1
        kind = spec.get("kind")
        dtype = _dtype(name, spec)
        part: nn.Module
        if kind in ("shared", "int8") and name != "weight" and not name.endswith(".weight"):  # "weight": the model's own
            raise CodecError(f"{name}: only a module's weight is stored {kind}")
        if kind == "shared":
            bits, groups = int(spec.get("bits", 0)), int(spec.get("groups", 0))
            codebook = _take(tensors, f"{name}.codebook")
            if not 1 <= bits <= 8 or groups < 1 or tuple(codebook.shape) != (groups, 2**bits) or codebook.dtype != dtype:
                raise CodecError(f"{name}: codebook {tuple(codebook.shape)} {codebook.dtype} does not fit {groups} "
                                 f"groups of {bits} bits in {dtype}")
            if count % groups:
                raise CodecError(f"{name}: {count} values do not split into {groups} groups")
            indices = unpack_bits(_take(tensors, f"{name}.indices"), bits, count).reshape(shape)
            if indices.numel() and int(indices.max()) >= 2**bits:
                raise CodecError(f"{name}: an index is out of its codebook")
            part = SharedWeight(codebook, indices)
        elif kind == "int8":
            q, scale = _take(tensors, f"{name}.q"), _take(tensors, f"{name}.scale")
            if tuple(q.shape) != shape or q.dtype != torch.int8 or tuple(scale.shape) != shape[:1] or scale.dtype != dtype:
                raise CodecError(f"{name}: int8 tensor {tuple(q.shape)} {q.dtype} / scale {tuple(scale.shape)} "
                                 f"{scale.dtype} do not fit {shape} {dtype}")
            part = Int8Weight(q, scale)
        elif kind == "value":
            v = _take(tensors, name)
            if tuple(v.shape) != shape:
                raise CodecError(f"{name}: shape {tuple(v.shape)}, the spec says {shape}")
            values[name] = v
            continue
        else:
            raise CodecError(f"{name}: unknown encoding {kind!r}")
        with torch.no_grad():
            values[name] = part(torch.empty(0)).to(dtype)
        parts[name] = part
    values.update(tensors)
    for alias, key in encoded.aliases.items():
        if key not in values:
            raise CodecError(f"{alias} is tied to {key}, which is missing from the blob")
        values[alias] = values[key]
    return values, parts


__all__ = ["FORMAT", "VERSION", "CodecError", "Encoded", "decode", "encode", "from_blob", "pack_bits",
           "to_blob", "unpack_bits"]
