"""The cost registry: a cost is one entry that Budget, the run configuration, adapt, the report and the
result summaries all read.

- A cost registered here (an int8 energy estimate) works everywhere with no other edit: ``Budget``
  takes it as a keyword, ``prune`` and ``adapt`` meet it (checked on the pruned model), the command
  line's ``budget:`` section accepts it, adapt's summary, ``PruneResult.summary`` and the report show
  it; once unregistered, every one of them refuses or ignores it again (the report still renders).
- Every registered cost has a label and unit, computes finite values on a small model when static, and
  is accepted by ``Budget`` and the configuration by name.
- The repr of budgets over built-in costs is the one earlier versions wrote (run directories compare
  it on resume), and a budget stays an immutable, hashable value.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Iterator
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch

import adaprune as ap
from adaprune import report
from adaprune.cli.config import CliError, parse_config
from adaprune.cost.energy import EnergyModel
from adaprune.cost.registry import COSTS, CostEntry, register_cost, static_values, unregister_cost
from adaprune.errors import ArgumentTypeError, ConfigError
from adaprune.report import plots
from adaprune.report.render import budget_text, fmt, summary_table, to_markdown
from small_nets import Net

NAME = "int8_energy"


def int8_energy_uj(cost: ap.Cost) -> float:
    """Horowitz's 45 nm figures for 8-bit integers: a multiply 0.2 pJ plus an add 0.03 pJ per MAC, and
    the int8 weights (one byte per parameter) read once from DRAM (640 pJ per 32-bit word)."""
    return EnergyModel(pj_per_mac=0.2 + 0.03).microjoules(cost.macs, cost.params)


ENTRY = CostEntry(NAME, "energy (int8 estimate)", "µJ", compute=int8_energy_uj, headline=True)
CONFIG = {"model": {"factory": "torchvision:resnet18"}, "data": {"kind": "digits"}}


@pytest.fixture
def int8_energy() -> Iterator[CostEntry]:
    entry = register_cost(ENTRY)
    try:
        yield entry
    finally:
        if NAME in COSTS:
            unregister_cost(NAME)


def net_and_inputs() -> tuple[Net, torch.Tensor]:
    torch.manual_seed(0)
    return Net().eval(), torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def budget_section(budget: dict, tmp: Path) -> dict:
    cfg = parse_config({**CONFIG, "budget": budget}, tmp)
    assert cfg.budget is not None
    return cfg.budget.model_dump(exclude_none=True)


# -- (a) a cost registered in a test works everywhere --------------------------------------------------
def test_a_registered_cost_is_a_budget_keyword(int8_energy):
    b = ap.Budget(int8_energy=0.6)
    assert b.int8_energy == 0.6 and b.macs is None and not b.needs_latency
    assert b.bounds == {NAME: 0.6}
    assert repr(b) == ("Budget(macs=None, params=None, bytes=None, energy=None, latency=None, latency_ms=None, "
                       "int8_energy=0.6, backend='torch', threads=1)")
    assert b == ap.Budget(int8_energy=0.6) and hash(b) == hash(ap.Budget(int8_energy=0.6))
    assert pickle.loads(pickle.dumps(b)) == b
    assert b.limits({NAME: 10.0}) == {NAME: 6.0}
    assert ap.Budget(int8_energy=5, macs=0.5).limits({NAME: 10.0, "macs": 100}) == {"macs": 50.0, NAME: 5.0}
    with pytest.raises(ConfigError, match=NAME):
        ap.Budget(int8_energy=-1)


def test_prune_meets_a_registered_cost(int8_energy):
    model, x = net_and_inputs()
    before = int8_energy.value(ap.count(model, x))
    res = ap.prune(model, x, budget=ap.Budget(int8_energy=0.6), ignore=[model.head])
    after = int8_energy.value(ap.count(model, x))
    assert after <= 0.6 * before, f"{after / before:.1%} of the original int8 energy, bound 60%"
    assert after >= 0.4 * before, f"{after / before:.1%}: pruned far past the bound"
    assert static_values(res.after)[NAME] == after
    # headline=True: the one-line summary shows it after MACs and params, in its unit
    assert "energy (int8 estimate) " in res.summary() and " µJ (" in res.summary()
    assert res.summary().startswith(f"MACs {res.before.macs:,} -> {res.after.macs:,} (")


def test_the_run_configuration_accepts_a_registered_cost(int8_energy, tmp_path):
    from adaprune.cli.build import budget as build_budget

    section = budget_section({NAME: 0.6, "threads": 2}, tmp_path)
    assert section == {NAME: 0.6, "backend": "torch", "threads": 2, "batch_size": 1}
    cfg = parse_config({**CONFIG, "budget": {NAME: 0.6}}, tmp_path)
    assert build_budget(cfg) == ap.Budget(int8_energy=0.6)
    with pytest.raises(CliError, match=f"budget.{NAME}: input should be greater than 0"):
        parse_config({**CONFIG, "budget": {NAME: 0}}, tmp_path)
    with pytest.raises(CliError, match=f"allowed: macs, .*, latency_ms, {NAME}, backend"):
        parse_config({**CONFIG, "budget": {"int8_enrgy": 0.6}}, tmp_path)


def test_adapt_and_the_report_show_a_registered_cost(int8_energy, tmp_path):
    model, x = net_and_inputs()
    xs, ys = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    task = ap.ClassificationTask([(xs, ys)], [(xs, ys)])
    budget = ap.Budget(int8_energy=0.7)
    res = ap.adapt(model, x, task, budget, tolerance=0.99, ignore=[model.head], finetune_steps=0,
                   max_iterations=10)
    assert res.budget_met, res.message
    assert res.costs_after[NAME] <= 0.7 * res.costs_before[NAME]
    assert res.costs_after[NAME] == int8_energy.value(ap.count(model, x))  # the model adapt returned
    assert f"\n{NAME}: " in res.summary() and NAME in res.message

    data = report.build(res, budget=budget, tolerance=0.99)
    assert data["budget"] == {NAME: 0.7, "backend": "torch", "threads": 1}
    assert plots._cost_keys(data) == [NAME]  # the step plot draws the bounded cost
    labels = [row[0] for row in summary_table(data)[1]]
    assert "energy (int8 estimate)" in labels
    assert f"{NAME} ≤ 70% of original" in budget_text(data)
    md = to_markdown(data, {})
    assert "energy (int8 estimate)" in md and fmt(NAME, res.costs_after[NAME]) in md

    # the report file loads and renders where the cost is not registered (labelled by its name)
    path = report.save_json(data, tmp_path / "report.json")
    unregister_cost(NAME)
    again = report.load_json(path)
    assert again["costs_before"][NAME] == pytest.approx(res.costs_before[NAME])
    assert NAME in [row[0] for row in summary_table(again)[1]]
    assert f"{NAME} ≤ 70% of original" in budget_text(again)
    assert NAME in to_markdown(again, {})


def test_an_unregistered_cost_is_refused_again(int8_energy, tmp_path):
    model, x = net_and_inputs()
    assert NAME in static_values(ap.count(model, x))
    unregister_cost(NAME)
    assert NAME not in static_values(ap.count(model, x))
    with pytest.raises(ArgumentTypeError, match=f"unknown cost '{NAME}'"):
        ap.Budget(int8_energy=0.6)
    with pytest.raises(CliError, match=f"budget.{NAME}: unknown field in budget"):
        parse_config({**CONFIG, "budget": {NAME: 0.6}}, tmp_path)
    assert budget_section({"macs": 0.5}, tmp_path)["macs"] == 0.5


def test_the_registry_refuses_bad_entries():
    for bad in ("macs", "latency_ms", "backend", "threads", "batch_size", "limits", "met", "_x", "class", "a-b"):
        with pytest.raises(ValueError):
            register_cost(CostEntry(bad, "x", "x", compute=lambda c: 0))
    with pytest.raises(ValueError, match="already registered"):
        register_cost(CostEntry("x_cost", "x", "x", absolute="macs"))
    with pytest.raises(ValueError, match="absolute= must differ"):
        register_cost(CostEntry("x_cost", "x", "x", absolute="x_cost"))
    with pytest.raises(ArgumentTypeError):
        register_cost(CostEntry("x_cost", "x", "x", compute=3))  # type: ignore[arg-type]
    for name in COSTS.builtin:
        with pytest.raises(ValueError, match="built in"):
            unregister_cost(name)
    assert "x_cost" not in COSTS


def test_a_bad_compute_is_named():
    register_cost(CostEntry("broken", "broken", "x", compute=lambda c: float("nan")))
    try:
        model, x = net_and_inputs()
        with pytest.raises(ap.errors.NonFiniteError, match="broken"):
            static_values(ap.count(model, x))
    finally:
        unregister_cost("broken")


# -- (b) every registered cost ------------------------------------------------------------------------
@pytest.mark.parametrize("name", COSTS.names())
def test_every_registered_cost(name, tmp_path):
    entry = COSTS.get(name)
    assert entry.name == name
    assert isinstance(entry.label, str) and entry.label.strip()
    assert isinstance(entry.unit, str) and entry.unit.strip()
    assert fmt(name, 1234.5) == entry.show(1234.5) and entry.show(1234.5).strip()
    model, x = net_and_inputs()
    if entry.static:
        value = entry.value(ap.count(model, x))
        assert math.isfinite(value) and value > 0
        assert static_values(ap.count(model, x))[name] == value
    for kw in entry.keywords:
        b = ap.Budget(**{kw: 0.5})
        assert getattr(b, kw) == 0.5 and b.needs_latency == (name == "latency")
        assert b.needs_disk == (name == "disk_bytes")
        assert set(b.limits({name: 10.0})) == {name}
        if name == "disk_bytes":  # bounded by adaprune.compress, which the run configuration does not run
            with pytest.raises(CliError, match="unknown field"):
                budget_section({kw: 0.5}, tmp_path)
        else:
            assert budget_section({kw: 0.5}, tmp_path)[kw] == 0.5
    assert set(static_values(ap.count(model, x))) == {e.name for e in COSTS.static()}


# -- (c) built-in budgets: the repr run directories compare, and a frozen value ---------------------------
@pytest.mark.parametrize("budget,text", [
    (ap.Budget(macs=0.5),
     "Budget(macs=0.5, params=None, bytes=None, energy=None, latency=None, latency_ms=None, backend='torch', threads=1)"),
    (ap.Budget(latency=0.6, backend="onnxruntime", threads=2),
     ("Budget(macs=None, params=None, bytes=None, energy=None, latency=0.6, latency_ms=None, "
      "backend='onnxruntime', threads=2)")),
    (ap.Budget(latency_ms=3.0, params=1000),
     "Budget(macs=None, params=1000, bytes=None, energy=None, latency=None, latency_ms=3.0, backend='torch', threads=1)"),
])
def test_builtin_repr_is_unchanged(budget, text):
    assert repr(budget) == text


def test_builtin_repr_does_not_depend_on_other_registered_costs(int8_energy):
    assert repr(ap.Budget(macs=0.5)) == (
        "Budget(macs=0.5, params=None, bytes=None, energy=None, latency=None, latency_ms=None, backend='torch', threads=1)"
    )


def test_a_budget_is_a_frozen_value():
    b = ap.Budget(macs=0.5, threads=2)
    with pytest.raises(FrozenInstanceError):
        b.macs = 0.3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        _ = b.nosuch
    assert b == ap.Budget(macs=0.5, threads=2) == copy.deepcopy(b) == pickle.loads(pickle.dumps(b))
    assert b != ap.Budget(macs=0.5) and hash(ap.Budget(macs=1)) == hash(ap.Budget(macs=1.0))
    assert len({b, ap.Budget(macs=0.5, threads=2)}) == 1
    assert ap.Budget(0.5, 0.3) == ap.Budget(macs=0.5, params=0.3)  # positional, in the old field order
    assert ap.Budget(latency=0.5).needs_latency and ap.Budget(latency_ms=2).needs_latency
    with pytest.raises(ConfigError, match="not both"):
        ap.Budget(latency=0.5, latency_ms=2)
    with pytest.raises(ArgumentTypeError, match="did you mean 'macs'"):
        ap.Budget(maccs=0.5)
