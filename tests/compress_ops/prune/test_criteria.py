"""compress_ops.prune.criteria: Wanda / OBD scores from their calibration statistics, and
calibration that leaves the model's mode, statistics and gradients alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress_ops import prune


def test_wanda_and_obd_scores_from_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    x = torch.randn(32, 6)
    x[:, 2] *= 10.0  # a loud input feature: Wanda keeps its weights
    batches = [(x[:16], torch.randint(0, 3, (16,))), (x[16:], torch.randint(0, 3, (16,)))]
    norms = prune.activation_norms(model, batches, {"0": model[0]})
    torch.testing.assert_close(norms["0"], x.pow(2).sum(0).sqrt())
    w = model[0].weight
    scores = prune.wanda_scores(w, norms["0"])
    torch.testing.assert_close(scores, w.detach().abs() * norms["0"])
    assert prune.unstructured_masks({"0": scores}, 0.5)["0"][:, 2].all()
    model[0].weight.grad = torch.full_like(w, 7.0)
    fisher = prune.fisher_diagonal(model, batches, F.cross_entropy, {"0": w})
    assert torch.equal(model[0].weight.grad, torch.full_like(w, 7.0))  # grads restored
    grads = []
    for xb, yb in batches:
        model.zero_grad()
        F.cross_entropy(model(xb), yb).backward()
        grads.append(model[0].weight.grad.clone())
    torch.testing.assert_close(fisher["0"], torch.stack(grads).pow(2).mean(0))
    torch.testing.assert_close(prune.obd_scores(w, fisher["0"]),
                               0.5 * fisher["0"] * w.detach().pow(2))
    with pytest.raises(ValueError, match="one norm per input feature"):
        prune.wanda_scores(w, torch.ones(5))
    with pytest.raises(ValueError, match="never ran"):
        prune.activation_norms(model, [], {"0": model[0]})


def test_calibration_runs_in_eval_mode_and_leaves_gradients_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()
    stats = model[1].running_mean.clone()
    batches = [(torch.randn(5, 6), torch.randint(0, 3, (5,))) for _ in range(2)]
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads[n].clone()
    prune.activation_norms(model, batches, {"0": model[0]})
    prune.fisher_diagonal(model, batches, F.cross_entropy, {"0": model[0].weight})
    assert torch.equal(model[1].running_mean, stats) and model.training and model[1].training
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n])


class _Keywords(nn.Module):
    """A forward taking keyword inputs (as a Hugging Face model does): batches are dicts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, features: torch.Tensor, scale: float = 1.0,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.b(torch.relu(self.a(features * scale)))


def _fisher_by_hand(model: nn.Module, losses) -> dict[str, torch.Tensor]:
    grads = {"a": [], "b": []}
    for loss in losses:
        model.zero_grad()
        loss().backward()
        for n in grads:
            grads[n].append(getattr(model, n).weight.grad.clone())
    model.zero_grad(set_to_none=True)
    return {n: torch.stack(g).pow(2).mean(0) for n, g in grads.items()}


def test_fisher_takes_dict_tensor_and_tuple_batches_and_the_forward_hook():
    """Issue 17: OBD calibration runs batches as Wanda's does (run_batch: model(**batch) for a
    mapping, model(batch[0]) for a tuple, else model(batch); or forward(model, batch)); the
    loss gets batch[1] of a tuple, else the batch itself (a dict's labels)."""
    model = _Keywords()
    g = torch.Generator().manual_seed(1)
    dicts = [{"features": torch.randn(5, 6, generator=g),
              "labels": torch.randint(0, 3, (5,), generator=g)} for _ in range(3)]
    params = {"a": model.a.weight, "b": model.b.weight}

    def dict_loss(out, batch):
        return F.cross_entropy(out, batch["labels"])

    fisher = prune.fisher_diagonal(model, dicts, dict_loss, params)
    want = _fisher_by_hand(model, [lambda d=d: dict_loss(model(**d), d) for d in dicts])
    for n in params:
        torch.testing.assert_close(fisher[n], want[n])
    # the forward hook is honoured, on dicts and on (inputs, targets) tuples
    fisher = prune.fisher_diagonal(model, dicts, dict_loss, params,
                                   forward=lambda m, d: m(d["features"], scale=2.0))
    want = _fisher_by_hand(model, [lambda d=d: dict_loss(model(d["features"], scale=2.0), d)
                                   for d in dicts])
    for n in params:
        torch.testing.assert_close(fisher[n], want[n])
    tuples = [(d["features"], d["labels"]) for d in dicts]
    fisher = prune.fisher_diagonal(model, tuples, F.cross_entropy, params,
                                   forward=lambda m, b: m(features=b[0], scale=0.5))
    want = _fisher_by_hand(model, [lambda t=t: F.cross_entropy(model(t[0], scale=0.5), t[1])
                                   for t in tuples])
    for n in params:
        torch.testing.assert_close(fisher[n], want[n])
    # a bare tensor batch: the loss gets the batch itself (here: a reconstruction-like loss)
    xs = [d["features"] for d in dicts]

    def tensor_loss(out, x):
        return (out - x[:, :3]).pow(2).mean()

    fisher = prune.fisher_diagonal(model, xs, tensor_loss, params)
    want = _fisher_by_hand(model, [lambda x=x: tensor_loss(model(x), x) for x in xs])
    for n in params:
        torch.testing.assert_close(fisher[n], want[n])
    assert all(p.grad is None for p in model.parameters())  # gradients left as they were
    with pytest.raises(ValueError, match="scalar tensor"):
        prune.fisher_diagonal(model, dicts, lambda out, batch: out, params)


def test_pruner_obd_on_dict_batches():
    model = _Keywords()
    g = torch.Generator().manual_seed(2)
    dicts = [{"features": torch.randn(8, 6, generator=g),
              "labels": torch.randint(0, 3, (8,), generator=g)} for _ in range(2)]

    def loss_fn(out, batch):
        return F.cross_entropy(out, batch["labels"])

    weights = {"a": model.a.weight.detach().clone(), "b": model.b.weight.detach().clone()}
    fisher = prune.fisher_diagonal(model, dicts, loss_fn,
                                   {"a": model.a.weight, "b": model.b.weight})
    pruner = prune.Pruner(model, 0.5, criterion="obd", calib=dicts, loss_fn=loss_fn)
    assert pruner.sparsity() == pytest.approx(0.5, abs=1e-2)
    want = prune.unstructured_masks({n: prune.obd_scores(w, fisher[n])
                                     for n, w in weights.items()}, 0.5)
    for n in weights:
        assert torch.equal(pruner.masks[(n, "weight")], want[n])


def test_pruner_obd_passes_its_forward_to_the_criterion():
    """``Pruner(criterion="obd", forward=fn)`` runs the Fisher batches through ``fn`` too."""
    base = _Keywords()
    g = torch.Generator().manual_seed(3)
    batches = [{"x": torch.randn(8, 6, generator=g),
                "labels": torch.randint(0, 3, (8,), generator=g)} for _ in range(2)]

    def fwd(m, b):
        return m(features=b["x"])

    def loss_fn(out, batch):
        return F.cross_entropy(out, batch["labels"])

    fisher = prune.fisher_diagonal(base, batches, loss_fn,
                                   {"a": base.a.weight, "b": base.b.weight}, forward=fwd)
    weights = {"a": base.a.weight.detach().clone(), "b": base.b.weight.detach().clone()}
    pruner = prune.Pruner(base, 0.5, criterion="obd", calib=batches, loss_fn=loss_fn,
                          forward=fwd)
    want = prune.unstructured_masks({n: prune.obd_scores(w, fisher[n])
                                     for n, w in weights.items()}, 0.5)
    for n in weights:
        assert torch.equal(pruner.masks[(n, "weight")], want[n])
