"""The model-updates section of docs/benchmarks.md, from benchmarks/results/updates.json (see updates.py)."""

from __future__ import annotations

import statistics
from typing import Any


def _pm(values: list[float], digits: int) -> str:
    m = statistics.fmean(values)
    if len(values) < 2:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(values) / len(values) ** 0.5:.{digits}f}"


def updates_section(payload: dict[str, Any], name: str = "updates") -> list[str]:
    a, rows = payload["args"], payload["rows"]
    seeds = sorted({r["seed"] for r in rows})
    warm_steps = a.get("warm_finetune_steps")
    lines = [(f"## Model updates at {a['budget']} of the MACs: warm start against adapt from scratch "
             f"(`benchmarks/updates.py`, `{name}.json`)"), "",
             (f"{a['dataset']}, CNN of width {a['width']}: trained on classes 0-5 ({a['epochs']} epochs), adapted to "
              f"{a['budget']} of its MACs (tolerance {a['tolerance']}, {a['finetune_steps']} fine-tuning steps per "
              f"adapt step, Adam lr {a['lr']} on the update's training data): the deployed model. Each update fine-tunes "
              f"the dense model ({a['update_epochs']} epochs, cosine from lr {a['update_lr']}): v1 adds classes 6-7 "
              "(head grown to 8 outputs), v2 classes 8-9, v3 brings new data of the same kind ("
              + ("5,000 fresh MNIST-1D samples from its generator, another seed" if a["dataset"] == "mnist1d" else
                 "another split of the digits") + "), v4 shifts the data ("
              + (f"MNIST-1D generated again with more noise: correlated {a['corr_noise']}, iid {a['iid_noise']}, against "
                 "0.25 and 0.02" if a["dataset"] == "mnist1d" else
                 f"every image moved one pixel right and down, plus noise of {a['noise']} standard deviations") + ")"
              + ". Per update, on copies of the updated dense model with the same "
              "task, budget and tolerance: `adapt(..., warm_start=deployed)` (the previous update's warm-started "
              "result) and `adapt` from scratch. The warm step's recovery: "
              + (f"{warm_steps} optimizer steps" if warm_steps is not None else
                 "adapt's default, `finetune_steps` for each of the fewest ordinary steps that could cut as much")
              + f". Mean ± standard error over seeds {seeds}; accuracy on the update's held-out test split; "
              "wall time of the adapt call alone (one thread)."), "",
             ("| update | budget met (warm / scratch) | test acc. scratch | test acc. warm | warm − scratch | "
             "wall s scratch | wall s warm | warm / scratch wall | steps (warm / scratch) | evaluations (warm / scratch) "
             "| optimizer steps (warm / scratch) | warm outcome | plan overlap |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for k in sorted({r["update"] for r in rows if "warm" in r}):
        at = [r for r in rows if r["update"] == k and "warm" in r]
        w, s = [r["warm"] for r in at], [r["scratch"] for r in at]
        outcomes: dict[str, int] = {}
        for r in w:
            outcomes[r["warm"]["outcome"]] = outcomes.get(r["warm"]["outcome"], 0) + 1
        lines.append(
            f"| v{k}: {at[0]['stage']} | {sum(x['budget_met'] for x in w)}/{len(w)} / {sum(x['budget_met'] for x in s)}/{len(s)} "
            f"| {_pm([x['test_acc'] for x in s], 2)} | {_pm([x['test_acc'] for x in w], 2)} "
            f"| {_pm([x['test_acc'] - y['test_acc'] for x, y in zip(w, s)], 2)} "
            f"| {_pm([x['wall_s'] for x in s], 1)} | {_pm([x['wall_s'] for x in w], 1)} "
            f"| {_pm([x['wall_s'] / y['wall_s'] for x, y in zip(w, s)], 3)} "
            f"| {_pm([x['steps'] for x in w], 1)} / {_pm([x['steps'] for x in s], 1)} "
            f"| {_pm([x['evaluations'] for x in w], 1)} / {_pm([x['evaluations'] for x in s], 1)} "
            f"| {_pm([x['optimizer_steps'] for x in w], 0)} / {_pm([x['optimizer_steps'] for x in s], 0)} "
            f"| {', '.join(f'{n} {c}' for c, n in sorted(outcomes.items()))} | {_pm([r['overlap'] for r in at], 2)} |")
    base = [r for r in rows if r["update"] == 0]
    lines += ["", ("v0 (the first deployed model, adapted from scratch): test accuracy "
                   f"{_pm([r['scratch']['test_acc'] for r in base], 2)} (dense {_pm([r['dense_test_acc'] for r in base], 2)}), "
                   f"{_pm([r['scratch']['wall_s'] for r in base], 1)} s. Plan overlap: channel-weighted Jaccard of the "
                   "channels the warm and the from-scratch plans keep. 'Warm outcome': kept (the previous plan held), "
                   "grown back (it held with groups grown back), abandoned (adapted from full width after 3 tries)."), ""]
    return lines


__all__ = ["updates_section"]
