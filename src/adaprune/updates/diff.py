"""Compare two plans for one model: per group, the channels both keep and those only one keeps, and what
they cost.

Both plans are mapped onto ``model`` (the dense model they were made for, or an update of it) with
:func:`~adaprune.updates.map_plan` on one trace; what does not map is listed in ``PlanDiff.dropped``.
Per group that either plan cuts: its size, the channels kept by both, kept only by A, kept only by B,
the Jaccard overlap of the kept sets, and the cost of each set in MACs and parameters:

- only A: what keeping those channels costs in A's model, ``cost(A) - cost(A with them also removed)``
  (one :class:`~adaprune.cost.predict.CostPredictor` on ``model``, so exact); only B likewise in B's
  model; kept by both: in A's model.
- A plan cannot remove a whole group, so when a set is everything its plan keeps in the group (kept by
  both, when A keeps nothing B does not), it is costed in that plan with one channel the plan removes
  there put back: exact where the group's channels cost independently of each other (no layer maps
  the group onto itself, as an unignored square projection of the residual stream would).
- A weight between two cut groups counts in both groups' costs, so the groups' costs do not add up.
  The total row is of all groups at once instead: "both" is the cost of the model of the channels both
  plans keep (A with its only-A channels removed, which is B with its only-B ones removed), "only A" is
  A's cost less that, "only B" B's cost less that; so cost(A) = both + only A, cost(B) = both + only B.
  (Where the plans keep no channel of a group in common, that model keeps one of A's there.)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from .._check import check_inputs, check_module
from ..adapt.previous import plan_of
from ..errors import ArgumentTypeError, ConfigError, PlanMismatchError, shown
from ..graph import Graph, Group, trace
from ..mapping import MappedPlan, map_plan
from ..plan import plan_from_choice

KEYS = ("macs", "params")
"""The costs a diff reports (per group and in total)."""


def _zero() -> dict[str, int]:
    return dict.fromkeys(KEYS, 0)


@dataclass
class GroupDiff:
    """One group's channels: how many both plans keep, how many only A or only B keeps, the Jaccard
    overlap of the kept sets (1.0: the same channels), and the cost of each set (module doc; the total row
    of a :class:`PlanDiff` holds the costs of all groups at once)."""

    group: str
    size: int
    both: int
    only_a: int
    only_b: int
    jaccard: float
    cost_both: dict[str, int] = field(default_factory=_zero)  # in A's model
    cost_only_a: dict[str, int] = field(default_factory=_zero)  # in A's model
    cost_only_b: dict[str, int] = field(default_factory=_zero)  # in B's model


@dataclass
class PlanDiff:
    """Two plans compared on one model (the module doc). ``names`` label the plans; ``costs`` holds the
    cost of the model before pruning (``"original"``), of each plan (``"a"``, ``"b"``) and of the model of
    the channels both keep (``"both"``); ``total`` sums the groups' counts (its costs: the module doc)."""

    names: tuple[str, str]
    groups: list[GroupDiff]
    total: GroupDiff
    costs: dict[str, dict[str, int]]
    dropped: list[str] = field(default_factory=list)  # what of either plan did not map, "<name>: ..."
    extended: list[str] = field(default_factory=list)  # slots cut with a mapped group the plan did not name

    @property
    def same(self) -> bool:
        """Whether both plans keep the same channels everywhere (and everything mapped)."""
        return not (self.total.only_a or self.total.only_b or self.dropped)

    def summary(self) -> str:
        """The diff in one line."""
        a, b = self.names
        t, c = self.total, self.costs
        if not self.groups:
            head = f"neither {a} nor {b} cuts any group"
        elif not (t.only_a or t.only_b):
            head = f"{a} and {b} keep the same channels in all {len(self.groups)} groups either cuts"
        else:
            differ = sum(1 for g in self.groups if g.only_a or g.only_b)
            head = (f"{a} and {b} differ in {differ} of {len(self.groups)} groups either cuts: {t.only_a:,} "
                    f"channels kept only by {a} ({_costs(t.cost_only_a)} in {a}), {t.only_b:,} only by {b} "
                    f"({_costs(t.cost_only_b)} in {b}), {t.both:,} by both (Jaccard {t.jaccard:.2f})")
        tail = (f"; MACs {a} {c['a']['macs']:,}, {b} {c['b']['macs']:,}; params {a} {c['a']['params']:,}, "
                f"{b} {c['b']['params']:,} (original {c['original']['macs']:,} MACs, {c['original']['params']:,} params)")
        more = (f"; {len(self.dropped)} part{'s' if len(self.dropped) > 1 else ''} of the plans did not map" if self.dropped else "")
        return head + tail + more

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "names": list(self.names), "summary": self.summary()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PlanDiff:
        """The diff :meth:`to_dict` wrote (after a JSON round trip)."""
        try:
            a, b = (str(n) for n in data["names"])
            return cls((a, b), [GroupDiff(**g) for g in data["groups"]], GroupDiff(**data["total"]), dict(data["costs"]),
                       list(data["dropped"]), list(data["extended"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"PlanDiff.from_dict: not a diff written by PlanDiff.to_dict ({shown(str(exc))})") from None

    def _tables(self) -> tuple[tuple[list[str], list[list[str]]], tuple[list[str], list[list[str]]]]:
        from ..report.render import diff_tables

        return diff_tables(self.to_dict())

    def _legend(self) -> str:
        a, b = self.names
        return (f"A group's costs are what its channels cost in that plan's model (a weight between two cut groups "
                f"counts in both). The last row is of all groups at once: \"both\" is the cost of the model of the "
                f"channels both plans keep; the cost of {a} is that plus \"only {a}\", of {b} that plus \"only {b}\".")

    def _notes(self) -> list[str]:
        return [f"not mapped: {d}" for d in self.dropped] + [f"also cut: {e}" for e in self.extended]

    def markdown(self) -> str:
        """The diff as Markdown: the summary, the costs, one table row per group (``|`` in names escaped)."""
        from ..report.render import _md_table

        costs, groups = self._tables()
        a, b = (n.replace("\n", " ") for n in self.names)
        lines = [f"# Plan diff: {a} against {b}", "", self.summary().replace("\n", " "), "", _md_table(costs), "",
                 _md_table(groups), "", " ".join(self._legend().split())]
        notes = self._notes()
        if notes:
            lines += ["", "## Notes", "", *(f"- {' '.join(n.split())}" for n in notes)]
        return "\n".join(lines) + "\n"

    def html(self) -> str:
        """The diff as a standalone HTML page (every name escaped)."""
        import html

        from ..report.render import CSS, _html_table

        e = html.escape
        costs, groups = self._tables()
        title = f"Plan diff: {self.names[0]} against {self.names[1]}"
        notes = "".join(f"<li>{e(n)}</li>" for n in self._notes())
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{e(title)}</title><style>{CSS}</style></head><body>\n<h1>{e(title)}</h1>\n"
                f"<p class=\"status\">{e(self.summary())}</p>\n{_html_table(costs)}\n{_html_table(groups)}\n"
                f"<p class=\"muted\">{e(self._legend())}</p>\n"
                + (f"<h2>Notes</h2><ul>{notes}</ul>\n" if notes else "") + "</body></html>\n")


def _costs(cost: Mapping[str, int]) -> str:
    return f"{cost['macs']:,} MACs, {cost['params']:,} params"


def _names(names: Any) -> tuple[str, str]:
    if isinstance(names, str) or not isinstance(names, (tuple, list)) or len(names) != 2 \
            or not all(isinstance(n, str) and n.strip() for n in names):
        raise ArgumentTypeError(f"diff: names={shown(names)}; expected two non-empty strings, e.g. names=('old', 'new')")
    if names[0] == names[1]:
        raise ConfigError(f"diff: names={shown(names)} are the same; give the two plans different names")
    return names[0], names[1]


def _mapped(plan: Any, what: str, name: str, model: nn.Module, graph: Graph) -> MappedPlan:
    try:
        return map_plan(plan_of(plan, what), model, graph=graph)
    except PlanMismatchError as exc:
        raise PlanMismatchError(f"diff: {what} ({name!r}): {exc}; pass the dense model both plans were made "
                                "for (or an update of it)") from None


def diff(plan_a: Any, plan_b: Any, model: nn.Module, example_inputs: Any, *, ignore: Iterable[Any] | None = None,
         names: tuple[str, str] = ("a", "b")) -> PlanDiff:
    """Compare ``plan_a`` and ``plan_b`` on ``model`` (the module doc).

    Args:
        plan_a, plan_b: each a :class:`~adaprune.Plan`, an ``AdaptResult`` or ``PruneResult``, a run
            directory, a directory written by :func:`adaprune.save`, or a plan's JSON file.
        model: the dense (unpruned) model both plans were made for, or an updated one; left unchanged.
        example_inputs: the inputs costs are counted on (and the model traced with).
        ignore: modules (or names) whose outputs keep their width, as for the runs that made the plans.
        names: how the report names the two plans.

    Raises:
        PlanMismatchError: a plan names none of the model's tensors (it was made for another model).
        ArgumentTypeError, ConfigError: a bad argument (named).
    """
    from ..cost.predict import CostPredictor

    check_module(model)
    check_inputs(example_inputs)
    labels = _names(names)
    graph = trace(model, example_inputs, ignore=ignore)
    ma = _mapped(plan_a, "plan_a", labels[0], model, graph)
    mb = _mapped(plan_b, "plan_b", labels[1], model, graph)
    predict = CostPredictor(model, example_inputs)

    def values(removed: Mapping[str, Iterable[int]]) -> dict[str, int]:
        cost = predict(plan_from_choice(graph, {g: tuple(sorted(c)) for g, c in removed.items()}))
        return {"macs": int(cost.macs), "params": int(cost.params)}

    def cost_of(removed: Mapping[str, tuple[int, ...]], group: Group, channels: set[int]) -> dict[str, int]:
        """What keeping ``channels`` of ``group`` costs in the plan removing ``removed``."""
        if not channels:
            return _zero()
        base: dict[str, Iterable[int]] = dict(removed)
        cut = set(removed.get(group.name, ()))
        if len(cut) + len(channels) >= group.size:
            # ``channels`` is all the plan keeps there; it removes some channel of the group (else the other
            # plan would keep none, or neither cut it): cost them with that channel kept
            cut.discard(min(cut))
            base[group.name] = cut
        kept, without = values(base), values({**base, group.name: cut | channels})
        return {k: kept[k] - without[k] for k in KEYS}

    rows = []
    shared: dict[str, set[int]] = {}  # the model of the channels both keep: what it removes
    for g in graph.groups:
        if g.name not in ma.removed and g.name not in mb.removed:
            continue
        everything = set(range(g.size))
        ka, kb = everything - set(ma.removed.get(g.name, ())), everything - set(mb.removed.get(g.name, ()))
        both, only_a, only_b = ka & kb, ka - kb, kb - ka
        shared[g.name] = everything - (both or {min(ka)})  # no channel in common: one of A's is kept
        rows.append(GroupDiff(g.name, g.size, len(both), len(only_a), len(only_b), len(both) / len(ka | kb),
                              cost_of(ma.removed, g, both), cost_of(ma.removed, g, only_a),
                              cost_of(mb.removed, g, only_b)))
    costs = {"original": {"macs": int(predict.original.macs), "params": int(predict.original.params)},
             "a": values(ma.removed), "b": values(mb.removed), "both": values(shared)}
    union = sum(r.both + r.only_a + r.only_b for r in rows)
    total = GroupDiff(f"all {len(rows)} groups", sum(r.size for r in rows), sum(r.both for r in rows),
                      sum(r.only_a for r in rows), sum(r.only_b for r in rows),
                      sum(r.both for r in rows) / union if union else 1.0, costs["both"],
                      {k: costs["a"][k] - costs["both"][k] for k in KEYS},
                      {k: costs["b"][k] - costs["both"][k] for k in KEYS})
    dropped = [f"{n}: {d}" for n, m in zip(labels, (ma, mb)) for d in m.dropped]
    extended = [f"{n}: {e}" for n, m in zip(labels, (ma, mb)) for e in m.extended]
    return PlanDiff(labels, rows, total, costs, dropped, extended)


__all__ = ["GroupDiff", "PlanDiff", "diff"]
