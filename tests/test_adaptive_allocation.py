"""The adaptive allocation (:func:`adaprune.allocate.adaptive.allocate_adaptive`) as a pure function.

Property tests over random probe sets (no model): each cluster has a width, a cost per channel, a
probe harm and caps; the ``evaluate`` callback is a cost model over whole channels (the ratio of
each cluster rounded down to channels, as the controller's plans are), so the candidates are
discrete like real plans. What they check:

- (a) a cluster that saves more cost per metric lost is never cut less than one that saves less,
  all else equal, and is cut strictly more unless the other one is at its cap;
- (b) caps and width caps are never exceeded, and below them every cluster's ratio is its weighted
  share: ``scale * sqrt(cost per harm / geometric mean)``;
- (c) a target reachable at the top scale is met by the least cut that meets it (within the
  bisection's ``2**-STEPS``), an unreachable one gets the top scale: every cluster that may be cut
  at its cap, so a cluster with a small share still gives way once the others are at their caps;
- (d) zero harm, zero saving, NaN and inf harm do not crash; a cluster whose probe broke the metric
  or that saves nothing is not cut.

Then on a real model (sklearn digits): a layer made artificially sensitive (the task's loss rises
with the fraction of its channels gone) is cut less by ``ap.adapt`` than uniform pruning cuts it at
the same budget.

Every test here fails when the allocation is made uniform (``SOFTEN = 0``, or every cluster the same
share).
"""

from __future__ import annotations

import copy
import math
import statistics
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

import adaprune as ap
from adaprune.allocate import AdaptiveAllocation, ClusterProbe, allocate_adaptive
from adaprune.allocate.adaptive import STEPS, cost_per_harm, probe_field, ratios_at, shares
from sensitive_task import SensitiveLayer

PROPS = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

PROBE = 0.3  # the fraction of a cluster the probe masks (the controller's probe_ratio; any fraction serves here)
FIXED = 50.0  # cost of what no cluster can cut (the classifier, the stem ...)
TOL = 2.0**-STEPS


@dataclass(frozen=True)
class Cluster:
    """One cluster: its width, the cost of one channel per field, its probe's harm, its caps."""

    size: int
    per_channel: dict[str, float]
    harm: float
    cap: float = 1.0
    width_cap: float = 1.0


@dataclass(frozen=True)
class Case:
    clusters: dict[str, Cluster]
    field: str

    @property
    def key(self) -> str:
        return probe_field(self.field)

    def probes(self) -> dict[str, ClusterProbe]:
        return {c: ClusterProbe({f: v * int(PROBE * k.size) for f, v in k.per_channel.items()}, k.harm)
                for c, k in self.clusters.items()}

    def limit(self) -> dict[str, float]:
        return {c: min(k.cap, k.width_cap) for c, k in self.clusters.items()}

    def total(self) -> float:
        return FIXED + sum(k.per_channel[self.key] * k.size for k in self.clusters.values())

    def evaluate(self, ratios: dict[str, float]) -> tuple[dict[str, int], float]:
        """The candidate (channels cut per cluster, rounded down like the controller's plans) and its cost."""
        cut = {c: int(ratios[c] * k.size) for c, k in self.clusters.items()}
        return cut, self.total() - sum(k.per_channel[self.key] * cut[c] for c, k in self.clusters.items())

    def allocate(self, target: float) -> AdaptiveAllocation[dict[str, int]]:
        return allocate_adaptive(
            self.probes(), self.field, target, self.evaluate,
            caps={c: k.cap for c, k in self.clusters.items()},
            width_caps={c: k.width_cap for c, k in self.clusters.items()},
        )

    def full(self) -> AdaptiveAllocation[dict[str, int]]:
        """The allocation at the top scale (no target is below the fixed cost)."""
        return self.allocate(-1.0)


def weighted(case: Case, scale: float) -> dict[str, float]:
    """The documented weighting, computed here independently of the module's own ``shares``:
    ``min(cap, width cap, scale * sqrt(cost per harm / geometric mean of the positive ones))``."""
    raw = cost_per_harm(case.probes(), case.field)
    positive = [v for v in raw.values() if v > 0]
    if not positive:
        return {c: 0.0 for c in raw}
    mean = math.exp(statistics.fmean(math.log(v) for v in positive))
    limit = case.limit()
    return {c: max(0.0, min(limit[c], scale * math.sqrt(v / mean))) for c, v in raw.items()}


def assert_weighted(case: Case, found: AdaptiveAllocation[dict[str, int]]) -> None:
    expected = weighted(case, found.scale)
    note(f"scale={found.scale} ratios={found.ratios} expected={expected}")
    assert found.ratios == pytest.approx(expected, rel=1e-9, abs=1e-12)


per_channel = st.one_of(st.just(0.0), st.floats(1e-3, 100.0))
harm = st.one_of(st.just(0.0), st.floats(1e-4, 5.0))
cap = st.one_of(st.just(1.0), st.floats(0.05, 1.0))


@st.composite
def clusters(draw: st.DrawFn, harms: st.SearchStrategy[float] = harm, savings: st.SearchStrategy[float] = per_channel,
             caps: bool = True) -> Cluster:
    size = draw(st.integers(4, 64))
    costs = {"macs": draw(savings), "params": draw(savings)}
    return Cluster(size, costs, draw(harms), draw(cap) if caps else 1.0, draw(cap) if caps else 1.0)


@st.composite
def cases(draw: st.DrawFn, min_clusters: int = 2, **kw: object) -> Case:
    n = draw(st.integers(min_clusters, 6))
    field = draw(st.sampled_from(["macs", "params", "latency"]))
    return Case({f"c{i}": draw(clusters(**kw)) for i in range(n)}, field)  # type: ignore[arg-type]


def reachable_target(draw: st.DrawFn, case: Case) -> float:
    """A target between the full-scale cost and the uncut cost."""
    low = case.full().value
    return low + draw(st.floats(0.0, 1.0)) * (case.total() - low)


# -- (a) monotonicity --------------------------------------------------------------------------

@PROPS
@given(st.data())
def test_more_cost_per_harm_is_never_cut_less(data: st.DataObject) -> None:
    case = data.draw(cases(min_clusters=0))
    a = data.draw(clusters(harms=st.floats(1e-4, 5.0), savings=st.floats(1e-3, 100.0)))
    k = data.draw(st.floats(1.1, 10.0))
    if data.draw(st.booleans()):  # b saves k times more for the same harm
        b = Cluster(a.size, {f: v * k for f, v in a.per_channel.items()}, a.harm, a.cap, a.width_cap)
    else:  # b saves the same for k times less harm
        b = Cluster(a.size, dict(a.per_channel), a.harm / k, a.cap, a.width_cap)
    case = Case({**case.clusters, "a": a, "b": b}, case.field)
    low = case.full().value
    found = case.allocate(low + data.draw(st.floats(-0.2, 1.0)) * (case.total() - low))
    note(f"ratios={found.ratios}")
    assert found.ratios["b"] >= found.ratios["a"]
    assert found.candidate["b"] >= found.candidate["a"]
    if found.ratios["a"] < min(a.cap, a.width_cap):  # a is not at its cap: b is strictly cut more
        assert found.ratios["b"] > found.ratios["a"]


# -- (b) caps and width caps ------------------------------------------------------------------

@PROPS
@given(st.data())
def test_caps_and_width_caps_are_never_exceeded_and_shares_are_weighted(data: st.DataObject) -> None:
    case = data.draw(cases())
    found = case.allocate(reachable_target(data.draw, case) - data.draw(st.floats(0.0, 20.0)))
    limit = case.limit()
    for c, k in case.clusters.items():
        assert 0.0 <= found.ratios[c] <= limit[c]
        assert found.candidate[c] <= int(limit[c] * k.size)
    assert_weighted(case, found)


# -- (c) the target --------------------------------------------------------------------------

@PROPS
@given(st.data())
def test_reachable_target_is_met_by_the_least_cut(data: st.DataObject) -> None:
    case = data.draw(cases())
    target = reachable_target(data.draw, case)
    found = case.allocate(target)
    assert found.value <= target
    assert found.value == case.evaluate(found.ratios)[1]
    assert_weighted(case, found)
    # one bisection tolerance less cut misses the target (or the least scale searched was taken)
    if found.scale > TOL:
        share = shares(cost_per_harm(case.probes(), case.field))
        assert case.evaluate(ratios_at(found.scale - TOL, share, case.limit()))[1] > target


@PROPS
@given(st.data())
def test_unreachable_target_gets_the_most_the_weighting_allows(data: st.DataObject) -> None:
    case = data.draw(cases())
    full = case.full()
    target = full.value - data.draw(st.floats(1e-6, 100.0))
    found = case.allocate(target)
    assert found.scale >= 1.0
    assert found.ratios == full.ratios and found.value == full.value > target
    assert_weighted(case, found)
    # every cluster that may be cut at all is at its limit: nothing more could be taken
    raw, limit = cost_per_harm(case.probes(), case.field), case.limit()
    assert found.ratios == pytest.approx({c: limit[c] if raw[c] > 0 else 0.0 for c in raw}, rel=1e-9, abs=1e-12)


def test_a_small_share_gives_way_once_the_cheap_clusters_are_at_their_caps() -> None:
    """Cluster a costs little per metric lost, b a lot: b's share is about a quarter of a's. With
    both capped at 80% of their width, a target that needs both at their caps is met (the scale rises past
    1 until b reaches its cap); a bisection over a scale of at most 1 stops b at its share and
    misses it."""
    case = Case({"a": Cluster(40, {"macs": 10.0, "params": 1.0}, 0.001, cap=0.8),
                 "b": Cluster(40, {"macs": 10.0, "params": 1.0}, 0.036, cap=0.8)}, "macs")
    share = shares(cost_per_harm(case.probes(), case.field))
    assert share["b"] < 0.8 < share["a"]
    target = case.total() - 630.0  # 63 of the 64 channels the caps allow
    found = case.allocate(target)
    assert found.value <= target, found
    assert found.ratios["a"] == 0.8 and found.ratios["b"] > share["b"]
    assert found.candidate["b"] >= 31


def test_worked_example_cost_per_harm_with_noise_floor() -> None:
    """Two clusters saving the same cost, one hurt four times as much: harms 0.01 and 0.04, noise
    floor 5% of the median harm (0.04) + 1e-6, so the cheaper one is cut sqrt(0.042001 / 0.012001)
    times as much."""
    case = Case({"a": Cluster(40, {"macs": 10.0, "params": 1.0}, 0.01),
                 "b": Cluster(40, {"macs": 10.0, "params": 1.0}, 0.04)}, "macs")
    found = case.allocate(case.total() - 200.0)
    assert found.ratios["a"] / found.ratios["b"] == pytest.approx(math.sqrt(0.042001 / 0.012001), rel=1e-9)
    assert found.candidate["a"] > found.candidate["b"]
    assert found.value <= case.total() - 200.0


# -- (d) edge cases --------------------------------------------------------------------------

@PROPS
@given(st.data())
def test_broken_and_useless_clusters_are_not_cut(data: st.DataObject) -> None:
    case = data.draw(cases(min_clusters=1, harms=st.floats(1e-4, 5.0), savings=st.floats(1e-3, 100.0)))
    broken = data.draw(st.lists(st.sampled_from([math.nan, math.inf]), min_size=1, max_size=3))
    useless = data.draw(st.integers(0, 2))
    extra = {f"nan{i}": Cluster(16, {"macs": 5.0, "params": 5.0}, h) for i, h in enumerate(broken)}
    extra.update({f"zero{i}": Cluster(16, {"macs": 0.0, "params": 0.0}, 0.1) for i in range(useless)})
    case = Case({**case.clusters, **extra}, case.field)
    found = case.allocate(reachable_target(data.draw, case))
    for c in extra:
        assert found.ratios[c] == 0.0 and found.candidate[c] == 0
    assert any(r > 0 for r in found.ratios.values())
    assert_weighted(case, found)
    # with only such clusters (or none at all) nothing is cut, and nothing crashes
    only = Case(extra, case.field)
    for target in (only.total() - 1.0, only.total()):
        alone = only.allocate(target)
        assert alone.ratios == {c: 0.0 for c in extra} and alone.value == only.total()
    assert Case({}, case.field).allocate(0.0).ratios == {}


@PROPS
@given(st.data())
def test_zero_harm_everywhere_weighs_by_saving_alone(data: st.DataObject) -> None:
    case = data.draw(cases(harms=st.just(0.0)))
    found = case.allocate(reachable_target(data.draw, case))
    assert all(math.isfinite(r) for r in found.ratios.values())
    assert_weighted(case, found)
    raw = cost_per_harm(case.probes(), case.field)
    saving = {c: p.saved[case.key] for c, p in case.probes().items()}
    assert raw == pytest.approx({c: s / 1e-6 for c, s in saving.items()})


# -- on a real model ---------------------------------------------------------------------------

@pytest.mark.usefixtures("one_thread")
def test_adapt_cuts_a_sensitive_layer_less_than_uniform_pruning() -> None:
    from adaprune.examples.digits import DigitsCNN, load_digits_data, train

    torch.manual_seed(0)
    data = load_digits_data(0)
    base = DigitsCNN(8)
    train(base, data, epochs=3, seed=0)
    x, layer, budget = data.x_val[:1], "features.10", ap.Budget(macs=0.5)
    width = base.get_submodule(layer).out_channels
    task = SensitiveLayer(ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val")), layer, width)

    adapted = copy.deepcopy(base)
    res = ap.adapt(adapted, x, task, budget, tolerance=0.05, ignore=[adapted.fc], finetune_steps=10)
    uniform = copy.deepcopy(base)
    ap.prune(uniform, x, budget=budget, ignore=[uniform.fc], allocation="uniform")

    assert res.budget_met, res.message
    kept, kept_uniform = adapted.get_submodule(layer).out_channels, uniform.get_submodule(layer).out_channels
    assert kept_uniform < width  # uniform pruning at this budget does cut it
    assert kept >= kept_uniform + 3, f"{layer}: adapt keeps {kept}, uniform keeps {kept_uniform} of {width}"
    # and the other layers pay for it: some other conv is cut more than uniform pruning cuts it
    convs = [n for n, m in base.named_modules() if isinstance(m, torch.nn.Conv2d) and n != layer]
    assert any(adapted.get_submodule(n).out_channels < uniform.get_submodule(n).out_channels for n in convs)
