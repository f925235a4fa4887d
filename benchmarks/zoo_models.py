"""Model families of the zoo sweep beyond torchvision classification and the HF sample.

Each model is named ``<family>:<name>``; :func:`build` makes it (random weights, eval mode) with its
example inputs and the list of prediction-head layers to keep whole. The output-structure check
(:func:`tree` and :func:`compare`) lives here too. Used by ``benchmarks/_zoo_worker.py`` (building)
and ``benchmarks/zoo.py`` (listing, the report's titles).

Families:

- ``tv-det``: ``torchvision.models.detection`` (weights=None, weights_backbone=None; images 320
  with ``min_size=max_size=320``, SSD at its fixed 300/320; score threshold 0, 20 detections per
  image, so random weights still detect); input a list of one (3,H,W) image.
- ``tv-seg``: ``torchvision.models.segmentation`` (FCN/DeepLabV3 with ``aux_loss=True``); 1x3x128x128.
- ``tv-video``: ``torchvision.models.video``; 1x3xTxHxW, the smallest of (4,64), (8,112), (16,224).
- ``tv-flow``: ``torchvision.models.optical_flow`` RAFT; two 1x3x128x128 images, 12 updates.
- ``yolo``: Ultralytics YOLOv8/YOLO11 n and s, detect/segment/pose/classify, from the packaged yaml.
- ``monai``: UNet, SegResNet, SwinUNETR, UNETR in 2-D (1x1x64x64) and 3-D (1x1x32x32x32;
  SwinUNETR 1x1x64x64x64, its bottleneck is 1/32 of the input).
- ``timm``: a fixed 20-model sample across families at the model's default input size.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

FAMILIES: dict[str, str] = {
    "tv-det": "torchvision detection",
    "tv-seg": "torchvision segmentation",
    "tv-video": "torchvision video",
    "tv-flow": "torchvision optical flow",
    "yolo": "Ultralytics YOLO",
    "monai": "MONAI",
    "timm": "timm",
}

YOLO_CFGS = [f"{base}{task}" for base in ("yolov8n", "yolov8s", "yolo11n", "yolo11s")
             for task in ("", "-seg", "-pose", "-cls")]
MONAI_NETS = [f"{net}-{d}d" for net in ("UNet", "SegResNet", "SwinUNETR", "UNETR") for d in (2, 3)]
TIMM_MODELS = [
    "resnet18",                      # ResNet
    "mobilenetv3_small_100",         # MobileNetV3
    "efficientnet_b0",               # EfficientNet
    "regnetx_002",                   # RegNet
    "ghostnet_100",                  # GhostNet
    "dla34",                         # DLA
    "cspresnet50",                   # CSPNet
    "resnest14d",                    # ResNeSt (split attention)
    "hgnetv2_b0",                    # HGNetV2
    "convnext_atto",                 # ConvNeXt
    "repvit_m1",                     # RepViT
    "fastvit_t8",                    # FastViT
    "edgenext_xx_small",             # EdgeNeXt
    "mobilevit_xxs",                 # MobileViT
    "poolformer_s12",                # MetaFormer / PoolFormer
    "levit_128s",                    # LeViT (distilled head)
    "pvt_v2_b0",                     # PVTv2
    "vit_tiny_patch16_224",          # ViT
    "deit_tiny_patch16_224",         # DeiT
    "swin_tiny_patch4_window7_224",  # Swin
]

DETECTIONS = 20  # detections per image kept by the torchvision detectors (score threshold 0)
TV_MODULES = {"tv-det": "detection", "tv-seg": "segmentation", "tv-video": "video", "tv-flow": "optical_flow"}


def new_model_rows() -> list[list[Any]]:
    """[[name, family, 0.0], ...] for zoo.py's listing (imports torchvision for its model lists)."""
    import torchvision

    out: list[list[Any]] = []
    for fam, mod in TV_MODULES.items():
        for name in torchvision.models.list_models(module=getattr(torchvision.models, mod)):
            out.append([f"{fam}:{name}", fam, 0.0])
    for fam, names in (("yolo", YOLO_CFGS), ("monai", MONAI_NETS), ("timm", TIMM_MODELS)):
        out += [[f"{fam}:{n}", fam, 0.0] for n in names]
    return out


def family_of(name: str) -> str | None:
    fam = name.split(":", 1)[0] if ":" in name else None
    return fam if fam in FAMILIES else None


# ------------------------------------------------------------------------------------------ heads

def _is_layer(m: Any) -> bool:
    from torch import nn

    return isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
                          nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d))


def _width(m: Any) -> int:
    return int(getattr(m, "out_features", None) or getattr(m, "out_channels", 0))


def _last_layer(m: Any) -> Any:
    if _is_layer(m):
        return m
    layers = [c for c in m.modules() if _is_layer(c)]
    if not layers:
        raise LookupError(f"no Linear/Conv layer in {type(m).__name__}")
    return layers[-1]


def _layers_with_width(model: Any, width: int) -> list[Any]:
    """Every Linear/Conv layer with ``width`` outputs (class logits, segmentation classifiers, ...)."""
    hits = [m for m in model.modules() if _is_layer(m) and _width(m) == width]
    if not hits:
        raise LookupError(f"no Linear/Conv layer with {width} outputs to keep as the head")
    return hits


def _at(model: Any, path: str) -> Any:
    m = model
    for part in path.split("."):
        m = getattr(m, part, None)
        if m is None:
            return None
    return m


def _prediction_layers(m: Any) -> list[Any]:
    """The layers whose outputs are predictions in a head module: itself if a layer; each entry's
    last layer for a ModuleList (per-level heads); else its direct Linear/Conv children (box
    predictor: cls_score and bbox_pred), or its last layer."""
    from torch import nn

    if _is_layer(m):
        return [m]
    if isinstance(m, nn.ModuleList):
        return [_last_layer(c) for c in m]
    direct = [c for c in m.children() if _is_layer(c)]
    return direct or [_last_layer(m)]


DET_HEADS = (
    "rpn.head.cls_logits", "rpn.head.bbox_pred",                  # RPN objectness / anchor deltas
    "roi_heads.box_predictor",                                    # cls_score, bbox_pred
    "roi_heads.mask_predictor.mask_fcn_logits",                   # Mask R-CNN
    "roi_heads.keypoint_predictor",                               # Keypoint R-CNN kps_score_lowres
    "head.classification_head.cls_logits", "head.regression_head.bbox_reg",  # RetinaNet, FCOS
    "head.regression_head.bbox_ctrness",                          # FCOS
    "head.classification_head.module_list", "head.regression_head.module_list",  # SSD, SSDlite
)


def _heads_from_paths(model: Any, paths: tuple[str, ...]) -> list[Any]:
    heads: list[Any] = []
    for p in paths:
        m = _at(model, p)
        if m is not None:
            heads += [h for h in _prediction_layers(m) if all(h is not k for k in heads)]
    if not heads:
        raise LookupError("none of the known head paths exists in this model")
    return heads


def _yolo_heads(model: Any) -> list[Any]:
    """The last conv of every branch of YOLO's Detect/Segment/Pose (cv2 boxes, cv3 classes, cv4 mask
    coefficients / keypoints, the proto's output conv) or Classify's linear."""
    head = model.model[-1]
    if hasattr(head, "linear"):
        return [head.linear]
    out: list[Any] = []
    for attr in ("cv2", "cv3", "cv4", "one2one_cv2", "one2one_cv3", "one2one_cv4"):
        branches = getattr(head, attr, None)
        if branches is not None:
            out += [_last_layer(b) for b in branches]
    proto = getattr(head, "proto", None)
    if proto is not None:
        out.append(_last_layer(proto))
    return out


# ----------------------------------------------------------------------------------------- builders

def _try_sizes(model: Any, make_inputs: Callable[[Any], Any], sizes: list[Any], rec: dict[str, Any],
               describe: Callable[[Any], Any]) -> Any:
    """The example inputs at the first size the unpruned model runs at."""
    import torch

    errors = []
    for size in sizes:
        inputs = make_inputs(size)
        try:
            with torch.no_grad():
                model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        except Exception as exc:  # noqa: BLE001 - try the next size
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            errors.append(f"{size}: {type(exc).__name__}: {first}")
            continue
        rec["input"] = describe(inputs)
        if errors:
            rec["input_note"] = "; ".join(errors)
        return inputs
    raise RuntimeError("the unpruned model runs at none of the sizes tried: " + " | ".join(errors))


def _shape(t: Any) -> list[int]:
    return list(t.shape)


def _tv(fam: str, name: str, rec: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    import torch
    import torchvision

    g = torch.Generator().manual_seed(0)
    if fam == "tv-det":
        # Random weights score every box below the default thresholds (no detections, and then the
        # mask/keypoint heads run on nothing): keep every box, at most DETECTIONS per image.
        kw: dict[str, Any] = {"weights": None, "weights_backbone": None}
        if "rcnn" in name:
            kw.update(box_score_thresh=0.0, box_detections_per_img=DETECTIONS)
        else:
            kw.update(score_thresh=0.0, detections_per_img=DETECTIONS)
        if name.startswith("ssd300"):
            size = 300
        elif name.startswith("ssdlite"):
            size = 320
        else:
            size = 320
            kw.update(min_size=320, max_size=320)
        model = torchvision.models.get_model(name, **kw).eval()
        inputs = ([torch.rand(3, size, size, generator=g)],)
        rec["input"] = [[3, size, size]]
        rec["input_note"] = "a list of one image; " + ", ".join(f"{k}={v}" for k, v in kw.items()
                                                                  if not k.startswith("weights"))
        return model, inputs, _heads_from_paths(model, DET_HEADS)
    if fam == "tv-seg":
        kw = {"weights": None, "weights_backbone": None}
        if not name.startswith("lraspp"):
            kw["aux_loss"] = True
        model = torchvision.models.get_model(name, **kw).eval()
        x = torch.randn(1, 3, 128, 128, generator=g)
        rec["input"] = _shape(x)
        return model, x, _layers_with_width(model, 21)
    if fam == "tv-video":
        model = torchvision.models.get_model(name, weights=None).eval()
        inputs = _try_sizes(model, lambda s: torch.randn(1, 3, s[0], s[1], s[1], generator=g),
                            [(4, 64), (8, 112), (16, 224)], rec, _shape)
        return model, inputs, _layers_with_width(model, 400)
    if fam == "tv-flow":
        model = torchvision.models.get_model(name, weights=None).eval()
        a, b = (torch.randn(1, 3, 128, 128, generator=g) for _ in range(2))
        rec["input"] = {"image1": _shape(a), "image2": _shape(b)}
        return model, (a, b), _heads_from_paths(model, ("update_block.flow_head.conv2", "mask_predictor.conv"))
    raise KeyError(fam)


def _yolo(name: str, rec: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    import torch
    from ultralytics import YOLO

    model = YOLO(f"{name}.yaml").model.eval()
    size = 224 if name.endswith("-cls") else 320
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    rec["input"] = _shape(x)
    return model, x, _yolo_heads(model)


def _monai(name: str, rec: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    import torch
    from monai.networks import nets

    net, dims = name.rsplit("-", 1)
    d = int(dims[0])
    size = 64 if d == 2 or net == "SwinUNETR" else 32  # SwinUNETR's bottleneck is 1/32 of the input
    common = {"in_channels": 1, "out_channels": 2, "spatial_dims": d}
    if net == "UNet":
        model = nets.UNet(channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, **common)
    elif net == "SegResNet":
        model = nets.SegResNet(init_filters=16, blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), **common)
    elif net == "SwinUNETR":
        model = nets.SwinUNETR(feature_size=24, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), **common)
    elif net == "UNETR":
        model = nets.UNETR(img_size=(size,) * d, feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12,
                           **common)
    else:
        raise KeyError(name)
    model.eval()
    x = torch.randn(1, 1, *(size,) * d, generator=torch.Generator().manual_seed(0))
    rec["input"] = _shape(x)
    return model, x, _layers_with_width(model, 2)


def _timm(name: str, rec: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    import timm
    import torch

    model = timm.create_model(name, pretrained=False).eval()
    size = tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    rec["input"] = _shape(x)
    cls = model.get_classifier()
    heads = list(cls) if isinstance(cls, (tuple, list)) else [cls]
    heads = [_last_layer(h) for h in heads if h is not None and any(_is_layer(c) for c in h.modules())]
    # distillation heads (LeViT, DeiT-distilled) also produce the logits
    for extra in _layers_with_width(model, model.num_classes):
        if all(extra is not h for h in heads):
            heads.append(extra)
    return model, x, heads


def build(name: str, rec: dict[str, Any]) -> tuple[Any, Any, list[Any]]:
    """(model in eval mode, example inputs, head layers) for ``<family>:<name>``; fills rec['input']."""
    import torch

    torch.manual_seed(0)
    fam, base = name.split(":", 1)
    rec["family"] = fam
    if fam in TV_MODULES:
        return _tv(fam, base, rec)
    if fam == "yolo":
        return _yolo(base, rec)
    if fam == "monai":
        return _monai(base, rec)
    if fam == "timm":
        return _timm(base, rec)
    raise KeyError(f"unknown model family {fam!r} in {name!r}")


# ---------------------------------------------------------------------------------- output structure

def tree(out: Any) -> Any:
    """The output as a JSON-able tree of tensor shapes: tensors -> [d0, d1, ...]; sequences ->
    {"type": name, "items": [...]}; mappings (dict, HF ModelOutput) -> {"type": name, "keys": {...}};
    anything else -> {"type": name}."""
    import torch

    if isinstance(out, torch.Tensor):
        return list(out.shape)
    if isinstance(out, dict):
        return {"type": type(out).__name__, "keys": {str(k): tree(v) for k, v in out.items()}}
    if isinstance(out, (tuple, list)):
        return {"type": type(out).__name__, "items": [tree(v) for v in out]}
    return {"type": type(out).__name__}


def compare(before: Any, after: Any, loose_first_dim: bool = False, where: str = "out") -> str:
    """'' when ``after`` has the structure and shapes of ``before``, else where and how it differs.
    With ``loose_first_dim`` (detections: their count depends on the weights) a tensor's first dim
    may change; its number of dims and trailing dims may not."""
    if isinstance(before, list) or isinstance(after, list):
        if not (isinstance(before, list) and isinstance(after, list)):
            return f"{where}: {_short(before)} -> {_short(after)}"
        if loose_first_dim:
            ok = len(before) == len(after) and before[1:] == after[1:]
        else:
            ok = before == after
        return "" if ok else f"{where}: shape {before} -> {after}"
    if before.get("type") != after.get("type"):
        return f"{where}: type {before.get('type')} -> {after.get('type')}"
    if "keys" in before:
        kb, ka = list(before["keys"]), list(after.get("keys", {}))
        if kb != ka:
            return f"{where}: keys {kb} -> {ka}"
        for k in kb:
            diff = compare(before["keys"][k], after["keys"][k], loose_first_dim, f"{where}[{k!r}]")
            if diff:
                return diff
    if "items" in before:
        ib, ia = before["items"], after.get("items", [])
        if len(ib) != len(ia):
            return f"{where}: length {len(ib)} -> {len(ia)}"
        for i, (b, a) in enumerate(zip(ib, ia)):
            diff = compare(b, a, loose_first_dim, f"{where}[{i}]")
            if diff:
                return diff
    return ""


def _short(t: Any) -> str:
    return str(t) if isinstance(t, list) else str(t.get("type"))


def summary(t: Any, limit: int = 600) -> str:
    """A compact one-line text of a tree, e.g. ``tuple(T[1,84,2100], dict(boxes=T[1,64,2100]))``."""

    def go(x: Any) -> str:
        if isinstance(x, list):
            return "T[" + ",".join(map(str, x)) + "]"
        if "keys" in x:
            return f"{x['type']}(" + ", ".join(f"{k}={go(v)}" for k, v in x["keys"].items()) + ")"
        if "items" in x:
            return f"{x['type']}(" + ", ".join(go(v) for v in x["items"]) + ")"
        return str(x["type"])

    text = go(t)
    return text if len(text) <= limit else text[:limit] + "..."


# ------------------------------------------------------------------------------------------- report

METHOD_NEW = (
    (
        "- Families beyond classification (the issue's list), each model named `<family>:<name>`: "
        "`tv-det` every `torchvision.models.detection` model (weights=None, weights_backbone=None, "
        "`min_size=max_size=320`; SSD300/SSDlite at their fixed 300/320; score threshold 0 and 20 "
        "detections per image, so that random weights still detect and the mask/keypoint heads run), "
        "input a list of one 3xHxW image; "
        "`tv-seg` every `torchvision.models.segmentation` model (FCN/DeepLabV3 with `aux_loss=True`), "
        "1x3x128x128; `tv-video` every `torchvision.models.video` model at the smallest of 4x64x64, "
        "8x112x112, 16x224x224 (TxHxW) it runs at; `tv-flow` RAFT small/large on two 1x3x128x128 images "
        "(12 updates); `yolo` Ultralytics YOLOv8/YOLO11 n and s for detect, segment, pose and classify, "
        "`YOLO('<cfg>.yaml').model` (no weights, no module replaced), 1x3x320x320 (classify 224); `monai` "
        "UNet (channels 16..256, strides 2x4, 2 residual units), SegResNet (16 filters), SwinUNETR "
        "(feature size 24), UNETR (ViT-B, feature size 16), in_channels 1, out_channels 2, on 1x1x64x64 "
        "(2-D) and 1x1x32x32x32 (3-D; SwinUNETR 1x1x64x64x64: its bottleneck is 1/32 of the input); `timm` a 20-model sample across families, `pretrained=False`, at "
        "the model's default input size. All in eval mode."
    ),
    (
        "- Heads kept whole (the same list to both tools as `ignore=` / `ignored_layers=`): the layers "
        "whose outputs are the predictions: detection box/class/objectness/centerness predictors, the RPN's "
        "objectness and box convs, mask and keypoint predictors, SSD's per-level convs; segmentation "
        "classifier convs (21 outputs, aux included); video classifiers (400 outputs); RAFT's flow-head "
        "output conv and upsampling-mask conv; the last conv of every YOLO Detect/Segment/Pose branch and "
        "the proto's output conv, Classify's linear; MONAI's 2-channel output convs; timm's classifier "
        "(and distillation head). Records list them under `heads`."
    ),
    (
        "- PASS for these families: forward works after pruning, MACs fell, and the output tree is the "
        "same: types, lengths, dict keys and every tensor's shape (for detection, whose number of "
        "detections depends on the weights: each tensor's number of dims and trailing dims). Ratio 0.5 "
        "only. 'froze' lists what adaprune kept whole and why (reason kind and count); channels kept "
        "because they reach the model's outputs or a kept head are not listed there."
    ),
)


def fmt_input(i: Any) -> str:
    if isinstance(i, list) and all(isinstance(v, int) for v in i):
        return "x".join(map(str, i))
    if isinstance(i, list):
        return "[" + ", ".join(fmt_input(v) for v in i) + "]"
    if isinstance(i, dict):
        return ", ".join(f"{k} {fmt_input(v)}" for k, v in i.items())
    return "?"


def frozen_text(rec: dict[str, Any] | None, limit: int = 160) -> str:
    """'N: reason kind ×count; ...' for a record's frozen groups (short)."""
    if not rec or "frozen" not in rec:
        return "—"
    if not rec["frozen"]:
        return "nothing"
    kinds = rec.get("frozen_reasons") or {}
    text = f"{rec['frozen']}: " + "; ".join(f"{k} ×{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render_new(recs: dict[tuple[str, str, float], dict[str, Any]], order: list[str], names_fam: dict[str, str],
               tools: list[str], ratios: list[float], h: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Summary lines and per-family sections of docs/zoo.md for the families of this module.
    ``h``: zoo.py's helpers ``cell``, ``fmt_count``, ``md_escape``, ``title`` (tool -> title)."""
    cell, fmt_count, esc, title = h["cell"], h["fmt_count"], h["md_escape"], h["title"]
    fams = [f for f in FAMILIES if any(names_fam[n] == f for n in order)]
    if not fams:
        return [], []
    main = 0.5 if 0.5 in ratios else ratios[0]
    summ = ["", f"Families beyond classification (the issue's list), at ratio {main:g}:", "",
            "| family | models | " + " | ".join(title[t] for t in tools) + " |", "|---|---|" + "---|" * len(tools)]
    grand = {t: [0, 0] for t in tools}
    total = 0
    for fam in fams:
        names = [n for n in order if names_fam[n] == fam]
        total += len(names)
        row = [FAMILIES[fam], str(len(names))]
        for t in tools:
            done = [recs[(t, n, main)] for n in names if (t, n, main) in recs]
            ok = sum(1 for r in done if r.get("passed"))
            grand[t][0] += ok
            grand[t][1] += len(done)
            row.append(f"{ok} of {len(names)}" + (f" ({len(names) - len(done)} not run)" if len(done) < len(names) else ""))
        summ.append("| " + " | ".join(row) + " |")
    row = ["**total**", str(total)]
    for t in tools:
        ok, done = grand[t]
        pct = 100.0 * ok / total if total else 0.0
        row.append(f"**{ok} of {total} ({pct:.1f}%)**" + (f" ({total - done} not run)" if done < total else ""))
    summ.append("| " + " | ".join(row) + " |")
    summ.append("")
    for t in tools:
        ok, _ = grand[t]
        summ.append(f"- **{title[t]}** passed {ok} of {total} ({100.0 * ok / total if total else 0:.1f}%) of "
                    f"the issue's models at {main:g}.")
    out: list[str] = []
    for fam in fams:
        names = [n for n in order if names_fam[n] == fam]
        out += [f"## {FAMILIES[fam]}", ""]
        head = ["model", "input", "MACs", "params"]
        for t in tools:
            head += [f"{title[t]} {r:g}" for r in ratios] + [f"{title[t]} s"]
        if "adaprune" in tools:
            head.append("adaprune froze (why)")
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        fails: list[str] = []
        frozen: list[str] = []
        for n in names:
            mine = [r for k, r in recs.items() if k[1] == n]
            ref = next((r for r in mine if "macs_before" in r), None) or (mine[0] if mine else None)
            row = [n.split(":", 1)[1], fmt_input(ref.get("input")) if ref else "—",
                   fmt_count(ref.get("macs_before")) if ref else "—", fmt_count(ref.get("params_before")) if ref else "—"]
            for t in tools:
                row += [cell(recs.get((t, n, r))) for r in ratios]
                rec = recs.get((t, n, main))
                sec = rec.get("seconds") if rec else None
                row.append(f"{sec:.1f}" if isinstance(sec, (int, float)) else "—")
                for r in ratios:
                    rr = recs.get((t, n, r))
                    if rr and not rr.get("passed"):
                        reason = rr.get("reason", "?")
                        reason = reason if len(reason) <= 220 else reason[:217] + "..."
                        fails.append(f"- {title[t]} `{n}` at {r:g}: {esc(reason)}")
            if "adaprune" in tools:
                rec = recs.get(("adaprune", n, main))
                row.append(frozen_text(rec))
                if rec and rec.get("frozen"):
                    first = "; ".join(f"`{esc(e[0])}` / {esc(e[1])}" + (f": {esc(e[2][:140])}" if len(e) > 2 else "")
                                      for e in rec.get("frozen_first", [])[:3])
                    frozen.append(f"- `{n}`: {rec['frozen']} — {first}")
            out.append("| " + " | ".join(esc(c) for c in row) + " |")
        out.append("")
        out += ["Failures:", ""] + (fails or ["None."]) + [""]
        if frozen:
            out += ["adaprune froze (first entries: module / op: reason):", ""] + frozen + [""]
    return summ, out
