"""A detection dataset that ships offline: sklearn's handwritten digits placed on canvases, with boxes.

Each image is a ``(3, size, size)`` canvas of faint noise and a random tint, holding 1 to
``max_objects`` digit glyphs (8x8, from scikit-learn's 1,797 digits, scaled to 12-24 pixels),
placed without overlapping. The target of an image is torchvision's: ``"boxes"`` (``(K, 4)`` float
``xyxy`` pixels, tight around the glyph's ink) and ``"labels"`` (``(K,)`` int64, the digit + 1, as
class 0 is the detectors' background). Splits draw from disjoint glyphs; the same seed gives the
same images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .._check import as_int
from ..errors import ConfigError


@dataclass
class Canvases:
    """Images and torchvision detection targets; ``batches(n)`` cuts them into ``(images, targets)`` pairs."""

    images: list[torch.Tensor]
    targets: list[dict[str, torch.Tensor]]

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int) -> list[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
        b = as_int(batch_size, "batch_size", low=1)
        return [(self.images[i:i + b], self.targets[i:i + b]) for i in range(0, len(self.images), b)]


def _glyphs(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - the examples extra brings it
        raise ConfigError("the canvas dataset needs scikit-learn: pip install adaprune[examples]") from exc
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    cut = {"train": (0, 1200), "val": (1200, 1500), "test": (1500, len(y))}[split]
    return x[cut[0]:cut[1]], y[cut[0]:cut[1]]


def make_canvases(n: int, split: str = "train", *, size: int = 96, max_objects: int = 3, seed: int = 0) -> Canvases:
    """``n`` canvases of ``size`` pixels from the glyphs of ``split`` (``train``/``val``/``test``)."""
    n = as_int(n, "n", low=1)
    size = as_int(size, "size", low=32)
    max_objects = as_int(max_objects, "max_objects", low=1, high=8)
    if split not in ("train", "val", "test"):
        raise ConfigError(f"make_canvases: split={split!r}; choose 'train', 'val' or 'test'")
    glyphs, digits = _glyphs(split)
    g = torch.Generator().manual_seed(as_int(seed, "seed", low=0) * 1000 + ("train", "val", "test").index(split))
    images, targets = [], []
    for _ in range(n):
        tint = 0.3 + 0.7 * torch.rand(3, 1, 1, generator=g)
        img = 0.1 * torch.rand(3, size, size, generator=g)
        boxes: list[list[float]] = []
        labels: list[int] = []
        for _ in range(int(torch.randint(1, max_objects + 1, (1,), generator=g))):
            k = int(torch.randint(len(digits), (1,), generator=g))
            side = int(torch.randint(12, 25, (1,), generator=g))
            glyph = torch.nn.functional.interpolate(glyphs[k][None, None], size=(side, side), mode="bilinear",
                                                    align_corners=False)[0, 0].clamp(0, 1)
            for _try in range(20):
                x0 = int(torch.randint(0, size - side + 1, (1,), generator=g))
                y0 = int(torch.randint(0, size - side + 1, (1,), generator=g))
                if all(x0 + side <= b[0] - 2 or b[2] + 2 <= x0 or y0 + side <= b[1] - 2 or b[3] + 2 <= y0
                       for b in boxes):
                    break
            else:
                continue
            ink = (glyph > 0.2).nonzero()
            if not len(ink):
                continue
            img[:, y0:y0 + side, x0:x0 + side] = torch.maximum(img[:, y0:y0 + side, x0:x0 + side], glyph * tint)
            (r0, c0), (r1, c1) = ink.min(0).values.tolist(), ink.max(0).values.tolist()
            boxes.append([x0 + c0, y0 + r0, x0 + c1 + 1, y0 + r1 + 1])
            labels.append(int(digits[k]) + 1)
        images.append(img)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.long)})
    return Canvases(images, targets)


def write_yolo_dataset(root: str | Path, *, train: int = 200, val: int = 60, size: int = 96, max_objects: int = 3,
                       seed: int = 0) -> Path:
    """Write canvases as an Ultralytics (YOLO-format) detection dataset under ``root`` and return the
    path of its ``data.yaml``: ``images/{train,val}/*.png`` and ``labels/{train,val}/*.txt`` with one
    ``class x_center y_center width height`` line (normalised to [0, 1]) per glyph, classes 0-9 the
    digits. Existing files under ``root`` are overwritten; the same arguments write the same files."""
    from PIL import Image

    root = Path(root)
    lines = [f"path: {root.resolve()}", "train: images/train", "val: images/val", "names:"]
    lines += [f"  {d}: '{d}'" for d in range(10)]
    for split, n in (("train", train), ("val", val)):
        data = make_canvases(n, split, size=size, max_objects=max_objects, seed=seed)
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "labels" / split).mkdir(parents=True, exist_ok=True)
        for i, (img, target) in enumerate(zip(data.images, data.targets)):
            pixels = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(pixels).save(root / "images" / split / f"{i:05d}.png")
            rows = []
            for (x0, y0, x1, y1), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
                cx, cy, w, h = (x0 + x1) / 2 / size, (y0 + y1) / 2 / size, (x1 - x0) / size, (y1 - y0) / size
                rows.append(f"{label - 1} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(rows) + "\n")
    yaml = root / "data.yaml"
    yaml.write_text("\n".join(lines) + "\n")
    return yaml
