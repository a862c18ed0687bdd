"""Corrupted 2:4 metadata is refused where it enters a module (issue 13, item 11): on
``load_state_dict`` and on ``Sparse24Linear.from_packed``. Such a group (duplicate or
decreasing positions) makes the CPU and Triton paths disagree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops.kernels.formats.sparse24 import pack_sparse24, prune_2to4


def _corrupt(meta: torch.Tensor) -> torch.Tensor:
    bad = meta.clone()
    word = int(bad[3, 1])
    # group 2 of word 1 (row 3): both positions := 2 (duplicate)
    word = (word & ~(0xF << 8)) | (0b1010 << 8)
    bad[3, 1] = word - (1 << 32) if word >= 1 << 31 else word
    return bad


def test_load_state_dict_refuses_corrupted_meta_before_copying():
    torch.manual_seed(0)
    src = co.nn.Sparse24Linear.from_dense(nn.Linear(70, 16))
    state = src.state_dict()
    state["meta"] = _corrupt(state["meta"])
    target = co.nn.Sparse24Linear(70, 16)
    before = target.meta.clone()
    with pytest.raises(ValueError, match="row 3, group .* duplicate positions"):
        target.load_state_dict(state)
    assert torch.equal(target.meta, before)


def test_from_packed_validates_and_matches_from_dense():
    torch.manual_seed(1)
    lin = nn.Linear(70, 16)
    values, meta = pack_sparse24(prune_2to4(lin.weight.detach()))
    m = co.nn.Sparse24Linear.from_packed(values, meta, 70, lin.bias)
    ref = co.nn.Sparse24Linear.from_dense(lin)
    x = torch.randn(3, 70)
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)
    assert m.values is values  # held by reference
    with pytest.raises(ValueError, match="duplicate positions"):
        co.nn.Sparse24Linear.from_packed(values, _corrupt(meta), 70, lin.bias)
    with pytest.raises(ValueError, match="do not pack"):
        co.nn.Sparse24Linear.from_packed(values[:, :-2], meta, 70)
    wide_values, wide_meta = pack_sparse24(prune_2to4(torch.randn(16, 96)))
    with pytest.raises(ValueError, match="past K=65"):  # packed for K = 96, same word count
        co.nn.Sparse24Linear.from_packed(wide_values, wide_meta, 65)
