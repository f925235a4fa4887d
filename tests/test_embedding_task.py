"""EmbeddingTask: a label-free distillation task for encoders. Its metric is the similarity of the model's
embeddings to the unpruned model's (exactly 1.0 for a copy, lower for a changed model); fine-tuning pulls a
changed model back; mean pooling reads the attention mask; calibration targets work with loss=task.loss_fn;
adapt runs end to end on a tiny BERT."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import adaprune as ap
from adaprune.embedding import TeacherTargets, default_embed
from adaprune.errors import ArgumentTypeError, ConfigError, NonFiniteError
from adaprune.task import as_task

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: one thread is fastest, and steady under load


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16)).eval()


def mlp_batches(count: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 6, generator=g) for _ in range(count)]


def perturbed(model: nn.Module, scale: float = 0.5) -> nn.Module:
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        first = next(m for m in out.modules() if isinstance(m, nn.Linear))
        first.weight.add_(scale * torch.randn(first.weight.shape, generator=g))
    return out


def bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)
    return BertModel(cfg).eval()


def token_batch(n: int, t: int, seed: int, pad: int = 0) -> dict[str, torch.Tensor]:
    """Token ids with padding of varying length (every row keeps at least 2 tokens); ``pad`` fills the rest."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (n, t), generator=g)
    lengths = torch.randint(2, t + 1, (n,), generator=g)
    lengths[0] = 2  # at least one row is mostly padding
    mask = (torch.arange(t)[None] < lengths[:, None]).long()
    return {"input_ids": torch.where(mask.bool(), ids, torch.full_like(ids, pad)), "attention_mask": mask}


def mlp_task(**kw) -> tuple[nn.Module, ap.EmbeddingTask]:
    model = mlp()
    task = ap.EmbeddingTask(mlp_batches(4, 0), mlp_batches(3, 100), **kw)
    task.set_teacher(model)
    return model, task


# -- the metric ---------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["cosine", "mse"])
def test_a_copy_of_the_teacher_scores_exactly_the_best(score):
    model, task = mlp_task(score=score)
    metrics, per = task.evaluate_examples(copy.deepcopy(model))
    best = 1.0 if score == "cosine" else 0.0
    assert per.dtype == torch.float64 and per.shape == (24,)  # 3 val batches of 8
    assert bool((per == best).all()) and metrics["similarity"] == best and metrics["loss"] == 0.0


@pytest.mark.parametrize("score", ["cosine", "mse"])
def test_a_changed_model_scores_lower_and_the_mean_is_the_metric(score):
    model, task = mlp_task(score=score)
    metrics, per = task.evaluate_examples(perturbed(model))
    best = 1.0 if score == "cosine" else 0.0
    assert metrics["similarity"] < best - 1e-3 and bool((per <= best).all()) and bool((per < best).any())
    assert metrics["similarity"] == float(per.mean())  # the same float computation: equal, not close
    assert metrics["loss"] == (1.0 - metrics["similarity"] if score == "cosine" else -metrics["similarity"])
    assert task.evaluate(perturbed(model)) == metrics
    worse = task.evaluate(perturbed(model, scale=2.0))["similarity"]
    assert worse < metrics["similarity"]


def test_evaluation_runs_in_eval_mode_and_restores_the_flags():
    model, task = mlp_task()
    student = perturbed(model).train()
    student[0].eval()
    seen = []
    student.register_forward_hook(lambda m, a, o: seen.append(m.training))
    task.evaluate(student)
    assert seen == [False, False, False] and student.training and not student[0].training


# -- fine-tuning --------------------------------------------------------------------------------
@pytest.mark.parametrize("score", ["cosine", "mse"])
def test_finetune_pulls_a_changed_model_back(score):
    model, task = mlp_task(score=score, lr=1e-2)
    student = perturbed(model)
    before = task.evaluate(student)["similarity"]
    task.finetune(student, 30)
    after = task.evaluate(student)["similarity"]
    margin = 0.05 if score == "cosine" else 0.05 * abs(before)
    assert after > before + margin, (before, after)
    assert not student.training and all(p.grad is None for p in student.parameters())


def test_finetune_zero_steps_changes_nothing_and_steps_are_checked():
    model, task = mlp_task()
    student = perturbed(model)
    state = copy.deepcopy(student.state_dict())
    task.finetune(student, 0)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ArgumentTypeError, match="steps"):
        task.finetune(student, 2.0)


def test_a_nan_loss_names_the_step_and_puts_the_buffers_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 8)).eval()
    bad = torch.randn(8, 6)
    bad[0, 0] = float("nan")
    task = ap.EmbeddingTask([bad], mlp_batches(1, 100))
    task.set_teacher(model)
    student = copy.deepcopy(model)
    buffers = {n: b.clone() for n, b in student.named_buffers()}
    with pytest.raises(NonFiniteError, match="finetune step 0 .train_loader batch 0"):
        task.finetune(student, 3)
    assert all(torch.equal(b, buffers[n]) for n, b in student.named_buffers())


# -- calibration and the loss -------------------------------------------------------------------
def test_calibration_gives_teacher_targets_that_loss_fn_reads():
    model, task = mlp_task(calibration_batches=2)
    batches = task.calibration()
    assert len(batches) == 2 and all(isinstance(y, TeacherTargets) and y.inputs is x for x, y in batches)
    x, y = batches[0]
    assert torch.equal(y.embedding, model(x))
    assert float(task.loss_fn(model(x), y).detach()) < 1e-6
    student = perturbed(model)
    value = task.loss_fn(student(x), y)
    assert value.dim() == 0 and float(value.detach()) > 1e-3 and value.requires_grad
    assert torch.allclose(task.loss(student, x, y), value)
    assert torch.allclose(task.loss(student, x, None), value)  # the teacher is run on x
    assert torch.allclose(task.loss_fn(student(x), y.embedding), value)
    with pytest.raises(ConfigError, match="TeacherTargets"):
        task.loss_fn(student(x), [1, 2])


def test_the_task_is_a_task():
    _, task = mlp_task()
    assert isinstance(task, ap.Task) and as_task(task) is task and task.fine_tunes
    assert task.metric == "similarity" and task.higher_is_better


def test_set_teacher_again_with_the_same_weights_recomputes_nothing():
    model, task = mlp_task()
    cached = task._val
    task.set_teacher(copy.deepcopy(model))
    assert task._val is cached
    task.set_teacher(perturbed(model))  # another reference: measured against it from now on
    assert task._val is not cached and task.evaluate(perturbed(model))["similarity"] == 1.0


# -- embeddings ---------------------------------------------------------------------------------
def test_mean_pooling_averages_the_kept_tokens_only():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, -100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert torch.equal(default_embed(hidden, {"attention_mask": mask}), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(default_embed(hidden, None), hidden.mean(1))
    assert torch.equal(default_embed(hidden[:, 0], None), hidden[:, 0])  # (N, D) as it is
    with pytest.raises(ConfigError, match="attention_mask"):
        default_embed(hidden, {"attention_mask": mask[:, :2]})


def test_padding_tokens_do_not_change_a_bert_embedding():
    model = bert()
    a, b = token_batch(6, 10, 0, pad=0), token_batch(6, 10, 0, pad=57)
    assert not torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    with torch.no_grad():
        out_a, out_b = model(**a), model(**b)
    assert torch.allclose(default_embed(out_a, a), default_embed(out_b, b), atol=1e-6)
    # without the mask the padding counts: the test above can fail
    assert not torch.allclose(out_a.last_hidden_state.mean(1), out_b.last_hidden_state.mean(1), atol=1e-3)


def test_a_bert_copy_scores_one_and_a_changed_one_lower():
    model = bert()
    task = ap.EmbeddingTask([token_batch(4, 10, s) for s in range(2)], [token_batch(5, 10, 50 + s) for s in range(2)])
    task.set_teacher(model)
    metrics, per = task.evaluate_examples(copy.deepcopy(model))
    assert per.shape == (10,) and bool((per == 1.0).all()) and metrics["similarity"] == 1.0
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.encoder.layer[1].output.dense.weight.add_(0.5 * torch.randn(32, 64))
    assert task.evaluate(changed)["similarity"] < 0.99


def test_a_custom_embed_reads_any_output():
    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 8)

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"vector": self.fc(x)}

    torch.manual_seed(0)
    model = Encoder()
    task = ap.EmbeddingTask(mlp_batches(2, 0), mlp_batches(2, 100))
    with pytest.raises(ConfigError, match="embed="):
        task.set_teacher(model)
    task = ap.EmbeddingTask(mlp_batches(2, 0), mlp_batches(2, 100), embed=lambda out, batch: out["vector"])
    task.set_teacher(model)
    assert task.evaluate(copy.deepcopy(model))["similarity"] == 1.0
    narrower = Encoder()
    narrower.fc = nn.Linear(6, 5)
    with pytest.raises(ConfigError, match=r"shape \(8, 5\); expected a \(8, 8\) like the teacher's"):
        task.evaluate(narrower)


# -- errors -------------------------------------------------------------------------------------
def test_nothing_is_measured_before_set_teacher():
    task = ap.EmbeddingTask(mlp_batches(2, 0), mlp_batches(2, 100))
    for call in (lambda: task.evaluate(mlp()), lambda: task.finetune(mlp(), 2), task.calibration):
        with pytest.raises(ConfigError, match=r"set_teacher\(model\)"):
            call()


def test_arguments_are_checked_on_construction():
    ok = mlp_batches(1, 0)
    with pytest.raises(ConfigError, match="score='dot' is not one of 'cosine', 'mse'"):
        ap.EmbeddingTask(ok, ok, score="dot")
    with pytest.raises(ArgumentTypeError, match="score"):
        ap.EmbeddingTask(ok, ok, score=1)
    with pytest.raises(ArgumentTypeError, match="embed"):
        ap.EmbeddingTask(ok, ok, embed="mean")
    with pytest.raises(ConfigError, match="lr"):
        ap.EmbeddingTask(ok, ok, lr=0.0)
    with pytest.raises(ConfigError, match="calibration_batches"):
        ap.EmbeddingTask(ok, ok, calibration_batches=0)
    with pytest.raises(ArgumentTypeError, match="train_loader.*read more than once"):
        ap.EmbeddingTask((b for b in ok), ok)
    with pytest.raises(ArgumentTypeError, match="val_loader"):
        ap.EmbeddingTask(ok, "text")


def test_empty_loaders_are_named():
    with pytest.raises(ConfigError, match="val_loader yielded no batches"):
        ap.EmbeddingTask(mlp_batches(1, 0), []).set_teacher(mlp())
    task = ap.EmbeddingTask([], mlp_batches(1, 0))
    task.set_teacher(mlp())
    for call in (lambda: task.finetune(mlp(), 1), task.calibration):
        with pytest.raises(ConfigError, match="train_loader yielded no batches"):
            call()


def test_a_model_that_cannot_run_a_batch_names_it():
    _, task = mlp_task()
    with pytest.raises(ConfigError, match="val_loader batch 0"):
        task.evaluate(nn.Linear(5, 16))


# -- adapt --------------------------------------------------------------------------------------
def bert_task() -> tuple[nn.Module, ap.EmbeddingTask, dict[str, torch.Tensor]]:
    model = bert()
    train = [token_batch(8, 12, s) for s in range(4)]
    val = [token_batch(8, 12, 100 + s) for s in range(2)]
    task = ap.EmbeddingTask(train, val, lr=1e-3)
    task.set_teacher(model)  # adapt measures the original model before it calls set_teacher
    return model, task, val[0]


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_adapt_prunes_a_bert_encoder_within_tolerance(importance):
    model, task, x = bert_task()
    macs = ap.count(model, x).macs
    loss = task.loss_fn if importance == "taylor" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ap.adapt(model, x, task, ap.Budget(macs=0.7), tolerance=0.05, finetune_steps=5, max_iterations=3,
                       importance=importance, loss=loss)
    assert res.before["similarity"] == 1.0
    assert 0.95 <= res.after["similarity"] < 1.0
    assert ap.count(model, x).macs < macs and res.costs_after["macs"] < res.costs_before["macs"]
    assert res.optimizer_steps > 0


def test_adapt_alone_sets_the_teacher_before_measuring():
    model = bert()
    task = ap.EmbeddingTask([token_batch(8, 12, 0)], [token_batch(8, 12, 100)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = ap.adapt(model, token_batch(8, 12, 100), task, ap.Budget(macs=0.9), tolerance=0.05, max_iterations=1)
    assert res.before["similarity"] == 1.0  # measured against the teacher adapt set first
