"""compress_ops.prune.masks: mask patterns (promised sparsity and pattern), the cubic schedule
(targets at the right steps), the group lasso and the N:M permutation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from compress_ops import prune


@given(shape=st.sampled_from([(8, 16), (5, 12, 3, 3), (1, 4)]),
       sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 2**16))
def test_unstructured_layer_masks_have_the_promised_sparsity(shape, sparsity, seed):
    s = torch.rand(shape, generator=torch.Generator().manual_seed(seed))
    keep = prune.unstructured_masks({"w": s}, sparsity)["w"]
    assert keep.shape == s.shape
    assert (~keep).sum().item() == round(sparsity * s.numel())
    if (~keep).any() and keep.any():  # everything removed scores at most what is kept
        assert s[~keep].max() <= s[keep].min()


def test_global_scope_prunes_low_scoring_layers_more():
    scores = {"small": torch.rand(100) * 0.1, "large": torch.rand(100) + 1.0}
    keep = prune.unstructured_masks(scores, 0.5, scope="global")
    assert (~keep["small"]).sum() == 100 and keep["large"].all()
    layer = prune.unstructured_masks(scores, 0.5, scope="layer")
    assert (~layer["small"]).sum() == (~layer["large"]).sum() == 50


@given(rows=st.integers(1, 6), groups=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_2_4_mask_keeps_the_two_largest_of_every_group(rows, groups, seed):
    s = torch.rand(rows, 4 * groups, generator=torch.Generator().manual_seed(seed))
    keep = prune.nm_mask(s, 2, 4)
    g = keep.reshape(rows, groups, 4)
    assert (g.sum(-1) == 2).all()
    sg = s.reshape(rows, groups, 4)
    assert (sg.masked_fill(~g, float("inf")).min(-1).values
            >= sg.masked_fill(g, -float("inf")).max(-1).values).all()


def test_nm_mask_on_conv_weights_and_errors():
    s = torch.rand(6, 8, 3, 3)
    keep = prune.nm_mask(s, 1, 4)
    assert (keep.movedim(1, -1).reshape(6, 3, 3, 2, 4).sum(-1) == 1).all()
    with pytest.raises(ValueError, match="multiple of m=4"):
        prune.nm_mask(torch.rand(2, 6))
    with pytest.raises(ValueError, match="0 < n < m"):
        prune.nm_mask(torch.rand(2, 8), 4, 4)


def test_structured_mask_removes_whole_rows_by_l2():
    s = torch.ones(6, 5)
    s[[1, 4]] = 0.01
    keep = prune.structured_mask(s, 1 / 3)
    assert keep[[1, 4]].any(dim=1).logical_not().all() and keep[[0, 2, 3, 5]].all()
    assert prune.structured_mask(torch.rand(3, 2, 3, 3), 0.99).any()  # one channel stays


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, True])
def test_sparsity_outside_0_1_raises(bad):
    with pytest.raises(ValueError, match="sparsity"):
        prune.unstructured_masks({"w": torch.rand(4)}, bad)
    with pytest.raises(ValueError, match="sparsity"):
        prune.structured_mask(torch.rand(4, 2), bad)


def test_cubic_schedule_hits_its_targets_at_the_right_steps():
    f = lambda t: prune.cubic_sparsity(t, 100, 1100, 0.9)  # noqa: E731
    assert f(0) == f(100) == 0.0 and f(1100) == f(5000) == 0.9
    assert abs(f(600) - 0.9 * (1 - 0.5**3)) < 1e-12
    values = [f(t) for t in range(100, 1101, 50)]
    assert values == sorted(values)
    steps = [b - a for a, b in zip(values, values[1:], strict=False)]
    assert steps == sorted(steps, reverse=True)  # fast first, slow at the end
    with pytest.raises(ValueError, match="end_step"):
        prune.cubic_sparsity(5, 10, 10, 0.5)


def test_group_lasso_penalty_formula_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Conv2d(4, 6, 3))
    lin, conv = model[0].weight, model[2].weight
    gl = prune.GroupLasso(model, "channel", lam=0.1)
    expected = 0.1 * (lin.norm(dim=1).sum() + conv.reshape(6, -1).norm(dim=1).sum())
    torch.testing.assert_close(gl.penalty(), expected)
    gl = prune.GroupLasso(model, "input", lam=1.0, layers=["0"])
    torch.testing.assert_close(gl(), lin.norm(dim=0).sum())
    gl = prune.GroupLasso(model, "2:4", lam=1.0, layers=["0"])
    g = lin.detach().reshape(-1, 4)
    two_smallest = g.abs().sort(dim=1).values[:, :2]
    torch.testing.assert_close(gl(), two_smallest.norm(dim=1).sum())
    for kw, match in (({"groups": "rows"}, "groups must be"), ({"groups": "4:2"}, "groups"),
                      ({"lam": -1.0}, "lam"), ({"layers": ["nope"]}, "unknown layers")):
        with pytest.raises(ValueError, match=match):
            prune.GroupLasso(model, **kw)


def test_group_lasso_drives_the_2_4_losers_towards_zero():
    torch.manual_seed(0)
    lin = nn.Linear(16, 8)
    gl = prune.GroupLasso(lin, "2:4", lam=0.05)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    before = gl.group_norms(lin.weight).sum().item()
    for _ in range(50):
        opt.zero_grad()
        gl.penalty().backward()
        opt.step()
    after = gl.group_norms(lin.weight).sum().item()
    assert after < 0.2 * before
    keep = prune.nm_mask(lin.weight.abs())
    assert lin.weight.detach()[~keep].abs().max() < lin.weight.detach()[keep].abs().median()


def _swap_kept(s: torch.Tensor, perm: torch.Tensor, x: int, y: int) -> float:
    p = perm.clone()
    p[[x, y]] = p[[y, x]]
    return float(prune.nm_kept(s[:, p]).sum())


def test_nm_permutation_pairs_strong_inputs_with_weak_ones():
    s = torch.tensor([[10.0, 10, 10, 10, 1, 1, 1, 1]])
    perm = prune.nm_permutation(s)
    assert float(prune.nm_kept(s).sum()) == 22.0
    assert float(prune.nm_kept(s[:, perm]).sum()) == 40.0  # two 10s kept in each group


@given(rows=st.integers(1, 5), groups=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_nm_permutation_is_a_permutation_never_worse_and_swap_optimal(rows, groups, seed):
    s = torch.rand(rows, 4 * groups, generator=torch.Generator().manual_seed(seed)) ** 3
    perm = prune.nm_permutation(s)
    assert sorted(perm.tolist()) == list(range(4 * groups))
    kept = float(prune.nm_kept(s[:, perm]).sum())
    assert kept >= float(prune.nm_kept(s).sum()) - 1e-12
    # local optimum: no single swap of two columns in different groups keeps more
    best_swap = max(_swap_kept(s, perm, x, y) for x in range(4 * groups)
                    for y in range(x + 1, 4 * groups) if x // 4 != y // 4)
    assert best_swap <= kept + 1e-9


def test_nm_permutation_rejects_bad_scores():
    for bad in (torch.rand(2, 4, 3, 3), torch.rand(0, 8), torch.tensor([[1.0, float("nan"),
                                                                           0.0, 1.0]])):
        with pytest.raises(ValueError):
            prune.nm_permutation(bad)
    with pytest.raises(ValueError, match="multiple"):
        prune.nm_permutation(torch.rand(2, 6))
