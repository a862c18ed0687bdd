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
