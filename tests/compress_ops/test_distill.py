"""compress_ops.distill: the distillation loss formula, feature matching and the fit loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.distill import DistillationLoss, fit


def test_loss_matches_its_formula():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.randint(0, 5, (8,), generator=g)
    T, alpha = 3.0, 0.7
    p_t, log_p_s = F.softmax(t / T, -1), F.log_softmax(s / T, -1)
    kl = (p_t * (p_t.log() - log_p_s)).sum(-1).mean()
    expected = alpha * T * T * kl + (1 - alpha) * F.cross_entropy(s, y)
    torch.testing.assert_close(DistillationLoss(T, alpha)(s, t, y), expected)
    # alpha = 0 or no teacher: the hard loss; identical logits: only the hard part remains
    torch.testing.assert_close(DistillationLoss(T, 0.0)(s, t, y), F.cross_entropy(s, y))
    torch.testing.assert_close(DistillationLoss(T, alpha)(s, None, y), F.cross_entropy(s, y))
    torch.testing.assert_close(DistillationLoss(T, alpha)(s, s, y),
                               (1 - alpha) * F.cross_entropy(s, y))


def test_feature_matching_and_errors():
    s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    fs, ft = {"a": torch.ones(4, 6)}, {"b": torch.zeros(4, 6)}
    loss = DistillationLoss(2.0, 1.0, {"a": "b"}, feature_weight=0.5)
    torch.testing.assert_close(loss(s, s, y, fs, ft), torch.tensor(0.5))
    with pytest.raises(ValueError, match="feature shapes differ"):
        loss(s, s, y, fs, {"b": torch.zeros(4, 5)})
    with pytest.raises(ValueError, match="not captured"):
        loss(s, s, y, {}, ft)
    for kw, match in (({"temperature": 0}, "temperature"), ({"alpha": 1.5}, "alpha"),
                      ({"feature_weight": -1.0}, "feature_weight")):
        with pytest.raises(ValueError, match=match):
            DistillationLoss(**kw)


def _task(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, 4, generator=g)
    return x, (x @ w).argmax(-1)


def test_fit_trains_a_student_towards_the_teacher_and_restores_modes():
    torch.manual_seed(0)
    x, y = _task(512, 0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    fit(teacher, None, [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)], 300,
        torch.optim.Adam(teacher.parameters(), 1e-2), progress=False)
    teacher.train()
    student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    batches = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 512, 64)]
    seen = []
    hist = fit(student, teacher, batches, 200, torch.optim.Adam(student.parameters(), 1e-2),
               DistillationLoss(2.0, 0.5), progress=True,
               on_step=lambda step, value: seen.append(step))
    assert len(hist) == 200 and seen == list(range(200))
    assert sum(hist[-20:]) / 20 < 0.6 * sum(hist[:20]) / 20
    assert teacher.training  # the teacher's mode is restored, its weights untouched
    with torch.no_grad():
        agree = (student(x).argmax(-1) == teacher.eval()(x).argmax(-1)).float().mean()
    assert agree > 0.8


def test_fit_with_feature_matching_and_bad_arguments():
    torch.manual_seed(0)
    x, y = _task(64, 1)
    teacher = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    loss = DistillationLoss(2.0, 0.5, {"0": "0"})
    hist = fit(student, teacher, [(x, y)], 50, torch.optim.SGD(student.parameters(), 0.1), loss,
               progress=False)
    assert hist[-1] < hist[0]
    assert not student[0]._forward_hooks and not teacher[0]._forward_hooks  # hooks removed
    with pytest.raises(ValueError, match="steps"):
        fit(student, teacher, [(x, y)], 0, torch.optim.SGD(student.parameters(), 0.1))
    with pytest.raises(ValueError, match="no module named 'nope'"):
        fit(student, teacher, [(x, y)], 1, torch.optim.SGD(student.parameters(), 0.1),
            DistillationLoss(feature_layers={"nope": "0"}))
    with pytest.raises(ValueError, match="needs a teacher"):
        fit(student, None, [(x, y)], 1, torch.optim.SGD(student.parameters(), 0.1), loss)


def test_distilling_through_a_compressed_frozen_base():
    """A low-rank student's factors train through the op's autograd."""
    torch.manual_seed(0)
    x, y = _task(256, 2)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    student = co.compress_(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)),
                           co.LowRankConfig(rank=4))
    before = student[0].u.detach().clone()
    fit(student, teacher, [(x, y)], 20, torch.optim.Adam(student.parameters(), 1e-2),
        progress=False)
    assert not torch.equal(before, student[0].u)
