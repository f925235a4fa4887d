"""What :func:`adaprune.compress` did: the compressed model, every step, and what each bought."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..cost.registry import si_bytes
from ..plan import Plan


@dataclass
class CompressStep:
    """One step of the hybrid controller.

    ``method``: ``"prune"`` (structured pruning by :func:`adaprune.adapt`), ``"quantize"`` (layers to
    int8), ``"share"`` (layers to fewer shared bits), ``"quantize+share"``, or ``"recover"`` (the last
    recovery of the final model); ``layers``: per layer
    moved, ``[level before, level after]``; ``metric``: the task's primary metric after the step's
    recovery; ``disk_bytes``: the artifact's size after it (the size before for a step rolled back);
    ``harm_per_kb``: the move's rank, how much worse it makes the model per kB saved (the rise of the
    loss the task reports beside its metric where it reports one, else the metric's drop): as the
    probes predicted it for level moves, as measured after recovery for prune steps;
    ``note``: why it was rolled back, what pruning cut, or that a restart undid it (then ``accepted``
    is False)."""

    index: int
    method: str
    layers: dict[str, list[str]]
    accepted: bool
    metric: float
    disk_bytes: int
    params: int
    optimizer_steps: int
    evaluations: int
    seconds: float
    harm_per_kb: float | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompressResult:
    """The compressed model and how it got there.

    ``model`` carries its shared and int8 weights as parametrizations (:mod:`adaprune.compress.levels`);
    ``plan`` is the structured pruning from the original model; ``spec`` each layer's level.
    ``disk_bytes_before`` is the original model's plain safetensors file (float32 for a float32 model),
    ``disk_bytes_after`` the compressed artifact (:func:`adaprune.save` with ``compress=True`` and the
    default level writes exactly this many bytes of weights). ``optimizer_steps`` counts every recovery step (the controller's and adapt's),
    ``evaluations`` every evaluation of the task.
    """

    model: nn.Module
    plan: Plan
    spec: dict[str, str]
    history: list[CompressStep]
    budget_met: bool
    message: str
    metric: str
    before: dict[str, float]
    after: dict[str, float]
    disk_bytes_before: int
    disk_bytes_after: int
    params_before: int
    params_after: int
    limit: int
    tolerance: float
    methods: tuple[str, ...]
    optimizer_steps: int
    evaluations: int
    seconds: float
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """Compressed size over the float32 file (0.05 is 20x smaller)."""
        return self.disk_bytes_after / max(self.disk_bytes_before, 1)

    def methods_used(self) -> dict[str, int]:
        """Accepted steps per method."""
        out: dict[str, int] = {}
        for s in self.history:
            if s.accepted:
                out[s.method] = out.get(s.method, 0) + 1
        return out

    def levels(self) -> dict[str, int]:
        """How many layers ended at each level."""
        out: dict[str, int] = {}
        for level in self.spec.values():
            out[level] = out.get(level, 0) + 1
        return out

    def plain_model(self) -> nn.Module:
        """A plain copy of :attr:`model` (every shared and int8 weight written in as floats, no
        parametrizations): what it computes, as an ordinary module to export or run. (Do not
        ``deepcopy`` the model and remove its parametrizations: the copy shares torch's parametrized
        class with the original, and removing them breaks the original.)"""
        from .levels import plain_copy

        return plain_copy(self.model)

    def markdown(self) -> str:
        """The report as Markdown: the outcome, one row per step (what it moved, what it bought), the levels."""
        from .report import markdown

        return markdown(self)

    def write_report(self, directory: Any) -> Any:
        """Write ``report.md``, ``report.html`` and the steps plot (with matplotlib) to ``directory``."""
        from .report import write_report

        return write_report(self, directory)

    def summary(self) -> str:
        m = self.metric
        kept = sum(s.accepted for s in self.history)
        lines = [
            (f"compress: {si_bytes(self.disk_bytes_before)} -> {si_bytes(self.disk_bytes_after)} on disk "
             f"({1 / max(self.ratio, 1e-12):.1f}x smaller, bound {si_bytes(self.limit)}; "
             f"budget {'met' if self.budget_met else 'NOT met'})"),
            (f"  {m}: {self.before[m]:.4f} -> {self.after[m]:.4f} (tolerance {self.tolerance:g}); params "
             f"{self.params_before:,} -> {self.params_after:,}"),
            (f"  {len(self.history)} steps ({kept} kept), {self.optimizer_steps} optimizer steps, "
             f"{self.evaluations} evaluations, {self.seconds:.1f} s"),
            "  layers: " + ", ".join(f"{n} {lv}" for lv, n in sorted(self.levels().items())),
        ]
        for s in self.history:
            moved = "; ".join(f"{k} {a}->{b}" for k, (a, b) in list(s.layers.items())[:4])
            more = f" (+{len(s.layers) - 4})" if len(s.layers) > 4 else ""
            lines.append(
                f"  {s.index:>3} {s.method:<14} {'kept' if s.accepted else 'undone':<6} {m} {s.metric:.4f} "
                f"{si_bytes(s.disk_bytes):>10}  {moved}{more}{'  ' + s.note if s.note else ''}"
            )
        lines.append(f"  {self.message}")
        return "\n".join(lines)


__all__ = ["CompressResult", "CompressStep"]
