"""Property tests of every registered allocator (picked up from ``ALLOCATORS.names()``).

Groups are built directly (one slot, identity channel map) with random sizes and scores, and random
:class:`Limits`. For every allocator:

- removed indices are valid channel indices, unique, and plain ints;
- each group keeps at least ``limits.min_kept(size)`` channels (so at least ``min_channels``, or the
  whole group when it is smaller, and at most ``max_ratio`` of it is removed);
- the kept width is a multiple of ``round_to`` unless the group is kept whole;
- within each group the removed channels are the lowest-scored;
- ratio 0 removes nothing, and a larger ratio removes a superset (what a budget bisection needs).

Per allocator: ``uniform`` removes ``ratio * size`` from every group (within one channel, before
caps and rounding); ``global`` and ``lamp`` remove at most ``floor(ratio * total)`` channels overall.
"""

from __future__ import annotations

import os

os.environ["ADAPRUNE_STRICT_TRACE"] = "1"

import math

import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from adaprune.allocate import ALLOCATORS, Limits, get_allocator
from adaprune.errors import ConfigError, UnknownNameError
from adaprune.graph import Group
from adaprune.graph.groups import Slot

torch.set_num_threads(1)

PROPS = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

NAMES = ALLOCATORS.names()
GLOBAL_RANK = {"global", "lamp"}  # ratio = fraction of all channels


def make_group(i: int, size: int) -> Group:
    return Group(
        f"g{i}",
        slots=(Slot(f"g{i}.weight", 0, size, True),),
        channel_of=(torch.arange(size),),
        size=size,
        exact=True,
    )


# Scores as importance criteria produce them: non-negative, ties possible, zeros possible.
score_values = st.one_of(
    st.integers(0, 5).map(float),  # many ties
    st.just(0.0),
    st.floats(1e-6, 1e3, allow_nan=False, allow_infinity=False),
)


@st.composite
def problems(draw: st.DrawFn) -> tuple[list[Group], dict[str, torch.Tensor]]:
    sizes = draw(st.lists(st.integers(1, 48), min_size=1, max_size=6))
    groups = [make_group(i, s) for i, s in enumerate(sizes)]
    scores = {
        g.name: torch.tensor(draw(st.lists(score_values, min_size=g.size, max_size=g.size)),
                             dtype=torch.float64)
        for g in groups
    }
    return groups, scores


limits_st = st.builds(
    Limits,
    max_ratio=st.one_of(st.just(1.0), st.floats(0.05, 1.0)),
    min_channels=st.integers(1, 8),
    round_to=st.sampled_from([1, 1, 2, 3, 4, 8]),
)
ratios = st.floats(0.0, 0.99, allow_nan=False)
allocators = pytest.mark.parametrize("name", NAMES)


def allocate(name: str, groups, scores, limits: Limits, ratio: float) -> dict[str, list[int]]:
    out = get_allocator(name)(groups, scores, limits, ratio=ratio)
    assert isinstance(out, dict)
    assert set(out) <= {g.name for g in groups}, "the allocator invented groups"
    return {g.name: list(out.get(g.name, [])) for g in groups}


def test_registry_has_the_documented_allocators() -> None:
    assert set(NAMES) >= {"uniform", "global", "lamp"}


@allocators
@PROPS
@given(problem=problems(), limits=limits_st, ratio=ratios)
def test_result_respects_the_limits(name: str, problem, limits: Limits, ratio: float) -> None:
    groups, scores = problem
    removed = allocate(name, groups, scores, limits, ratio)
    note(f"removed={removed}")
    for g in groups:
        r = removed[g.name]
        assert all(isinstance(c, int) and not isinstance(c, bool) for c in r), r
        assert all(0 <= c < g.size for c in r), f"{g.name}: index out of range {r} (size {g.size})"
        assert len(set(r)) == len(r), f"{g.name}: duplicate indices {r}"
        kept = g.size - len(r)
        assert kept >= limits.min_kept(g.size), (g.name, g.size, kept, limits)
        assert kept >= min(limits.min_channels, g.size), (g.name, g.size, kept, limits)
        assert kept >= 1
        assert len(r) <= math.floor(limits.max_ratio * g.size + 1e-9), (g.name, g.size, len(r), limits)
        assert kept == g.size or kept % limits.round_to == 0, (g.name, g.size, kept, limits)


@allocators
@PROPS
@given(problem=problems(), limits=limits_st, ratio=ratios)
def test_removed_channels_are_the_lowest_scored(name: str, problem, limits: Limits, ratio: float) -> None:
    groups, scores = problem
    removed = allocate(name, groups, scores, limits, ratio)
    for g in groups:
        r = removed[g.name]
        if not r or len(r) == g.size:
            continue
        kept = [c for c in range(g.size) if c not in set(r)]
        s = scores[g.name]
        assert float(s[r].max()) <= float(s[kept].min()), (
            f"{g.name}: removed {r} with scores {s[r].tolist()} but kept a channel scoring {float(s[kept].min())}"
        )


@allocators
@PROPS
@given(problem=problems(), limits=limits_st, r1=ratios, r2=ratios)
def test_more_ratio_removes_a_superset(name: str, problem, limits: Limits, r1: float, r2: float) -> None:
    groups, scores = problem
    lo, hi = sorted((r1, r2))
    a = allocate(name, groups, scores, limits, lo)
    b = allocate(name, groups, scores, limits, hi)
    for g in groups:
        assert set(a[g.name]) <= set(b[g.name]), (g.name, lo, a[g.name], hi, b[g.name])


@allocators
@PROPS
@given(problem=problems(), limits=limits_st)
def test_ratio_zero_removes_nothing(name: str, problem, limits: Limits) -> None:
    groups, scores = problem
    removed = allocate(name, groups, scores, limits, 0.0)
    assert all(r == [] for r in removed.values()), removed


@allocators
@PROPS
@given(problem=problems(), limits=limits_st, ratio=ratios)
def test_scores_are_not_modified(name: str, problem, limits: Limits, ratio: float) -> None:
    groups, scores = problem
    copies = {k: v.clone() for k, v in scores.items()}
    allocate(name, groups, scores, limits, ratio)
    assert all(torch.equal(scores[k], copies[k]) for k in scores)


# ---------------------------------------------------------------------------------------------
# per allocator: how much is removed
# ---------------------------------------------------------------------------------------------
@PROPS
@given(problem=problems(), ratio=ratios)
def test_uniform_removes_ratio_of_every_group(problem, ratio: float) -> None:
    """Without caps or rounding: ratio * size removed from every group, within one channel (only the
    last channel of a group is protected by min_channels=1)."""
    groups, scores = problem
    removed = allocate("uniform", groups, scores, Limits(), ratio)
    for g in groups:
        want = min(ratio * g.size, g.size - 1)
        assert abs(len(removed[g.name]) - want) <= 1, (g.name, g.size, ratio, len(removed[g.name]))


@PROPS
@given(problem=problems(), limits=limits_st, ratio=ratios)
def test_uniform_with_limits_is_as_close_as_the_limits_allow(problem, limits: Limits, ratio: float) -> None:
    """With caps and rounding: never more than ratio * size (+1), never more than the cap allows, and
    short of min(ratio * size, cap) only by the rounding (less than round_to) plus one."""
    groups, scores = problem
    removed = allocate("uniform", groups, scores, limits, ratio)
    for g in groups:
        n = len(removed[g.name])
        allowed = g.size - limits.min_kept(g.size)
        target = min(ratio * g.size, allowed)
        assert n <= ratio * g.size + 1, (g.name, g.size, n, ratio)
        assert n <= allowed
        assert n >= target - 1 - (limits.round_to - 1), (g.name, g.size, n, target, limits)


@pytest.mark.parametrize("name", sorted(GLOBAL_RANK & set(NAMES)))
@PROPS
@given(problem=problems(), limits=limits_st, ratio=ratios)
def test_global_rank_removes_at_most_ratio_of_all_channels(name: str, problem, limits: Limits,
                                                           ratio: float) -> None:
    groups, scores = problem
    removed = allocate(name, groups, scores, limits, ratio)
    total = sum(g.size for g in groups)
    assert sum(map(len, removed.values())) <= math.floor(ratio * total + 1e-9)


@pytest.mark.parametrize("name", sorted(GLOBAL_RANK & set(NAMES)))
@PROPS
@given(problem=problems(), ratio=ratios)
def test_global_rank_meets_the_ratio_when_no_limit_binds(name: str, problem, ratio: float) -> None:
    """Default limits only keep one channel per group: at most one channel per group short of the target."""
    groups, scores = problem
    removed = allocate(name, groups, scores, Limits(), ratio)
    total = sum(g.size for g in groups)
    target = math.floor(ratio * total + 1e-9)
    assert sum(map(len, removed.values())) >= target - len(groups), (target, removed)


@pytest.mark.parametrize("name", sorted(GLOBAL_RANK & set(NAMES)))
def test_global_rank_prunes_the_weak_group_more(name: str) -> None:
    """One group with uniformly tiny scores, one with a spread: ranking across groups must not simply
    prune the same fraction from each."""
    groups = [make_group(0, 20), make_group(1, 20)]
    scores = {
        "g0": torch.cat([torch.full((10,), 1.0), torch.full((10,), 100.0)]).double(),
        "g1": torch.full((20,), 50.0).double() + torch.arange(20).double() * 1e-3,
    }
    removed = allocate(name, groups, scores, Limits(), 0.25)
    assert sum(map(len, removed.values())) == 10
    assert len(removed["g0"]) != len(removed["g1"]), removed


# ---------------------------------------------------------------------------------------------
# Limits and lookups
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [{"max_ratio": 0.0}, {"max_ratio": 1.5}, {"max_ratio": -0.1}, {"min_channels": 0},
     {"min_channels": 1.5}, {"min_channels": True}, {"round_to": 0}, {"round_to": 2.0}],
)
def test_invalid_limits_raise_config_error(kwargs) -> None:
    with pytest.raises(ConfigError):
        Limits(**kwargs)


@PROPS
@given(size=st.integers(1, 200), limits=limits_st)
def test_min_kept_is_within_the_group(size: int, limits: Limits) -> None:
    k = limits.min_kept(size)
    assert 1 <= k <= size
    assert k >= min(limits.min_channels, size)
    assert size - k <= limits.max_ratio * size + 1e-9


def test_unknown_allocator_lists_the_registered_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        get_allocator("nope")
    for n in NAMES:
        assert n in str(info.value)


def test_duplicate_allocator_registration_raises() -> None:
    original = ALLOCATORS.get("uniform")
    with pytest.raises(ValueError, match="uniform"):
        ALLOCATORS.register("uniform")(object)
    assert ALLOCATORS.get("uniform") is original
