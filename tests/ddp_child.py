"""Run by tests/test_distributed.py, alone or under torchrun: fine-tune or adapt the digits CNN and write what
each process ended with to OUT/rank{rank}.json.

    python ddp_child.py finetune OUT cnn|mlp [sync]     # (the MLP has no BatchNorm; sync: SyncBatchNorm)
    python -m torch.distributed.run --standalone --nproc_per_node 2 ddp_child.py finetune OUT cnn
    ... ddp_child.py adapt OUT RUN_DIR [resume] [slow] [alternatives]

Fine-tuning also saves the weights (OUT/rank{rank}.safetensors).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import adaprune as ap
from adaprune.examples.digits import DigitsCNN, load_digits_data
from adaprune.scale import distributed


def digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    distributed.join(sync_batch_norm="sync" in sys.argv[3:])
    rank, size = distributed.world()
    data = load_digits_data(0)
    torch.manual_seed(0)
    mlp = mode == "finetune" and sys.argv[3] == "mlp"
    model = (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
             if mlp else DigitsCNN(8))
    task = ap.ClassificationTask(data.loader("train", shuffle=True), data.loader("val"), lr=0.01)
    record: dict = {"rank": rank, "world": size}
    if mode == "finetune":
        torch.manual_seed(1)
        t0 = time.perf_counter()
        task.finetune(model, 150)
        record["seconds"] = time.perf_counter() - t0
        record.update(task.evaluate(model))
        if not mlp:  # BatchNorm statistics re-estimated on the calibration batches, as adapt's recovery does
            from adaprune.task import recalibrate_bn

            check = {k: v.clone() for k, v in model.state_dict().items()}
            recalibrate_bn(model, task.calibration())
            record["recalibrated_accuracy"] = task.evaluate(model)["accuracy"]
            model.load_state_dict(check)
        from safetensors.torch import save_file

        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / f"rank{rank}.safetensors"))
    else:
        run_dir, flags = sys.argv[3], sys.argv[4:]
        if "slow" in flags:
            finetune = task.finetune

            def slowed(m: torch.nn.Module, steps: int) -> None:
                time.sleep(0.4)
                finetune(m, steps)

            task.finetune = slowed  # type: ignore[method-assign]
        model.eval()
        base = task.evaluate(model)
        torch.manual_seed(1)
        task.finetune(model, 150)  # (a model worth pruning; the same on every process)
        res = ap.adapt(model, data.x_val[:1], task, ap.Budget(macs=0.5), tolerance=0.05, ignore=[model.fc],
                       run_dir=run_dir, resume="resume" in flags, seed=3, finetune_steps=10, max_iterations=4,
                       alternatives=2 if "alternatives" in flags else 1)
        record.update(plan=res.plan.to_json(), accepted=[h.accepted for h in res.history], after=res.after,
                      base=base, evaluations=res.evaluations, steps=[h.step for h in res.history],
                      optimizer_steps=res.optimizer_steps)
    record["digest"] = digest(model)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
