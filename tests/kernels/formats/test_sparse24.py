"""kernels/formats/sparse24.py: 2:4 masks, packing, the documented bit layout, byte counts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compress_ops.kernels.formats import sparse24 as spf

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rand(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) + 0.1).to(dtype)  # never all-zero, no exact zeros


@given(n=st.integers(1, 24), k=st.integers(1, 100), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_mask_keeps_two_largest_of_every_group(n, k, dtype, seed):
    w = _rand(n, k, dtype=dtype, seed=seed)
    mask = spf.mask_2to4(w)
    assert mask.shape == w.shape and mask.dtype == torch.bool
    kp = -(-k // 4) * 4
    m4 = torch.nn.functional.pad(mask, (0, kp - k)).reshape(n, -1, 4)
    a4 = torch.nn.functional.pad(w.float().abs(), (0, kp - k), value=-1.0).reshape(n, -1, 4)
    real = torch.nn.functional.pad(torch.ones(n, k, dtype=torch.bool), (0, kp - k)).reshape(
        n, -1, 4)
    # at most two kept per group, exactly min(2, real columns) kept
    assert torch.equal(m4.sum(-1), real.sum(-1).clamp(max=2))
    # every kept magnitude >= every dropped magnitude of the same group
    kept_min = torch.where(m4, a4, torch.inf).amin(-1)
    dropped_max = torch.where(~m4 & real, a4, -torch.inf).amax(-1)
    assert (kept_min >= dropped_max).all()
    assert spf.is_2to4(spf.prune_2to4(w))


def test_mask_ties_are_deterministic_lowest_index():
    w = torch.ones(3, 8)
    mask = spf.mask_2to4(w)
    assert mask.tolist() == [[True, True, False, False] * 2] * 3
    w = torch.tensor([[1.0, -2.0, 2.0, 0.5]])
    assert spf.mask_2to4(w).tolist() == [[False, True, True, False]]


def test_mask_rejects_nonfinite():
    w = torch.randn(2, 8)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        spf.mask_2to4(w)


@given(n=st.integers(1, 24), k=st.integers(1, 130), dtype=st.sampled_from(DTYPES),
       seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, k, dtype, seed):
    w = spf.prune_2to4(_rand(n, k, dtype=dtype, seed=seed))
    values, meta = spf.pack_sparse24(w)
    kp = -(-k // spf.K_ALIGN) * spf.K_ALIGN
    assert values.shape == (n, kp // 2) and values.dtype == dtype
    assert meta.shape == (n, kp // 32) and meta.dtype == torch.int32
    assert torch.equal(spf.unpack_sparse24(values, meta, k), w)
    # positions within a group are distinct and increasing
    pos = spf._positions(meta).reshape(n, -1, 2)
    assert (pos[..., 0] < pos[..., 1]).all()
    # value_columns points every stored value at its dense column
    dense = torch.nn.functional.pad(w, (0, kp - k))
    assert torch.equal(torch.gather(dense, 1, spf.value_columns(meta)), values)


def test_pack_handles_groups_with_fewer_than_two_nonzeros():
    w = torch.zeros(2, 32)
    w[0, 2] = 5.0  # one nonzero in group 0
    w[1, 7] = -1.0  # one nonzero in group 1
    values, meta = spf.pack_sparse24(w)
    assert torch.equal(spf.unpack_sparse24(values, meta), w)
    assert values[0, :2].tolist() == [0.0, 5.0] or values[0, :2].tolist() == [5.0, 0.0]


def test_meta_bit_layout_is_documented_layout():
    # group 0 keeps positions (1, 3), group 1 keeps (0, 2), the other groups all-zero -> (0, 1)
    w = torch.zeros(1, 32)
    w[0, 1], w[0, 3], w[0, 4], w[0, 6] = 1.0, 2.0, 3.0, 4.0
    values, meta = spf.pack_sparse24(w)
    assert values[0, :4].tolist() == [1.0, 2.0, 3.0, 4.0]
    nibbles = [(1 | 3 << 2), (0 | 2 << 2)] + [(0 | 1 << 2)] * 6
    word = sum(nib << (4 * i) for i, nib in enumerate(nibbles))
    word = word - 2**32 if word >= 2**31 else word
    assert meta.tolist() == [[word]]


def test_pack_rejects_dense_weight_naming_the_group():
    w = torch.ones(2, 8)
    with pytest.raises(ValueError, match=r"row 0, columns 0\.\.3 hold 4 nonzeros"):
        spf.pack_sparse24(w)


@pytest.mark.parametrize(
    ("values", "meta", "exc", "match"),
    [
        (torch.zeros(4, 16), torch.zeros(4, 2, dtype=torch.int32), ValueError, "meta shape"),
        (torch.zeros(4, 16), torch.zeros(4, 1, dtype=torch.int64), TypeError, "int32"),
        (torch.zeros(4, 10), torch.zeros(4, 1, dtype=torch.int32), ValueError, "multiple of"),
        (torch.zeros(4, 16, dtype=torch.int32), torch.zeros(4, 1, dtype=torch.int32),
         TypeError, "values"),
    ],
)
def test_unpack_rejects_inconsistent_pairs(values, meta, exc, match):
    with pytest.raises(exc, match=match):
        spf.unpack_sparse24(values, meta)


def test_stored_bytes_ratio_fp16():
    # values + metadata = 1/2 + 1/16 of dense fp16
    assert spf.sparse24_bytes(4096, 4096, torch.float16) / (4096 * 4096 * 2) == 0.5625
