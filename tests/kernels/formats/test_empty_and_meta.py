"""kernels/formats: empty weight dimensions are refused by name (packers and packed-pair checks),
and ``check_meta`` validates 2:4 metadata (issue 13, items 9 and 11)."""

from __future__ import annotations

import re

import pytest
import torch

from compress_ops.kernels.formats import dequant as dqf
from compress_ops.kernels.formats import sparse24 as spf

# --------------------------------------------------------------------------------------------
# Item 9: the packers refuse an empty weight dimension, naming it
# --------------------------------------------------------------------------------------------


def _named(where: str, dim: str) -> str:
    return re.escape(f"{where}: {dim} must be >= 1, got 0")


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: spf.pack_sparse24(torch.zeros(0, 40)), _named("pack_sparse24", "N (w.shape[0])")),
        (lambda: spf.pack_sparse24(torch.zeros(4, 0)), _named("pack_sparse24", "K (w.shape[1])")),
        (lambda: spf.empty_sparse24(0, 40, dtype=torch.float16), _named("empty_sparse24", "N")),
        (lambda: spf.empty_sparse24(4, 0, dtype=torch.float16), _named("empty_sparse24", "K")),
        (lambda: spf.unpack_sparse24(torch.zeros(0, 16), torch.zeros(0, 1, dtype=torch.int32)),
         _named("unpack_sparse24", "N (values.shape[0])")),
        (lambda: spf.unpack_sparse24(torch.zeros(3, 0), torch.zeros(3, 0, dtype=torch.int32)),
         _named("unpack_sparse24", "K (values.shape[1] = Kp/2)")),
        (lambda: dqf.pack_bits(torch.zeros(0, 32, dtype=torch.int64), 4),
         _named("pack_bits", "N (q.shape[0])")),
        (lambda: dqf.pack_bits(torch.zeros(3, 0, dtype=torch.int64), 4),
         _named("pack_bits", "Kp (q.shape[1])")),
        (lambda: dqf.empty_affine(0, 40, 4, 32, False, dtype=torch.float16),
         _named("empty_affine", "N")),
        (lambda: dqf.empty_affine(4, 0, 4, 32, False, dtype=torch.float16),
         _named("empty_affine", "K")),
        (lambda: dqf.unpack_bits(torch.zeros(0, 4, dtype=torch.int32), 4),
         _named("unpack_bits", "N (qweight.shape[0])")),
        (lambda: dqf.unpack_bits(torch.zeros(3, 0, dtype=torch.int32), 4),
         _named("unpack_bits", "K (qweight.shape[1] = Kp*bits/32)")),
    ],
)
def test_packers_refuse_empty_dimensions_by_name(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_packers_still_take_the_smallest_real_weights():
    values, meta = spf.pack_sparse24(torch.tensor([[1.5]]))
    assert values.shape == (1, 16) and meta.shape == (1, 1)
    assert torch.equal(spf.unpack_sparse24(values, meta, 1), torch.tensor([[1.5]]))
    assert dqf.pack_bits(torch.ones(1, 32, dtype=torch.int64), 2).shape == (1, 2)
    qweight, scales, zeros = dqf.empty_affine(1, 1, 4, 32, False, dtype=torch.float16)
    assert qweight.shape == (1, 4) and scales.shape == (1, 1) and zeros.shape == (1, 1)


# --------------------------------------------------------------------------------------------
# Item 11: check_meta
# --------------------------------------------------------------------------------------------


def _packed(n: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return spf.pack_sparse24(spf.prune_2to4(torch.randn(n, k, generator=g) + 0.05))


def _set_group(meta: torch.Tensor, row: int, group: int, p0: int, p1: int) -> torch.Tensor:
    """A copy of ``meta`` with the positions of ``group`` of ``row`` set to ``(p0, p1)``."""
    meta = meta.clone()
    word, shift = group // 8, 4 * (group % 8)
    w = meta[row, word].item() & 0xFFFFFFFF
    w = (w & ~(0xF << shift)) | ((p0 | p1 << 2) << shift)
    meta[row, word] = w - 2**32 if w >= 2**31 else w
    return meta


def test_check_meta_is_exported():
    assert "check_meta" in spf.__all__


@pytest.mark.parametrize(("n", "k"), [(6, 70), (3, 32), (5, 100), (1, 1)])
def test_check_meta_passes_what_pack_writes(n, k):
    _, meta = _packed(n, k)
    spf.check_meta(meta)
    spf.check_meta(meta, k)
    spf.check_meta(spf.empty_sparse24(n, k, dtype=torch.float16)[1], k)


def test_check_meta_passes_groups_with_fewer_than_two_nonzeros():
    w = torch.zeros(3, 70)
    w[0, 3] = 1.0  # one nonzero at the last position: stored as (0, 3) with a zero filler
    w[1, 69] = 2.0  # in the group straddling K
    w[2, 68] = 3.0
    spf.check_meta(spf.pack_sparse24(w)[1], 70)


@pytest.mark.parametrize(("pos", "what"), [((2, 2), "duplicate"), ((0, 0), "duplicate"),
                                           ((3, 1), "decreasing"), ((1, 0), "decreasing")])
def test_check_meta_names_the_first_bad_row_and_group(pos, what):
    _, meta = _packed(6, 70)
    bad = _set_group(meta, 3, 13, *pos)  # group 13: columns 52..55, word 1
    later = _set_group(bad, 5, 2, 1, 1)  # a later bad group is not the one reported
    for m in (bad, later):
        with pytest.raises(ValueError, match=r"row 3, group 13 \(columns 52\.\.55\)") as info:
            spf.check_meta(m)
        assert what in str(info.value) and f"({pos[0]}, {pos[1]})" in str(info.value)


def test_check_meta_catches_every_group_slot_of_a_word():
    # the top nibble of a word is where int32 sign handling could hide a bad group
    _, meta = _packed(2, 64)
    for group in range(16):
        with pytest.raises(ValueError, match=rf"row 1, group {group} "):
            spf.check_meta(_set_group(meta, 1, group, 3, 3))


def test_check_meta_with_k_requires_padding_groups_as_pack_writes_them():
    g = torch.Generator().manual_seed(2)
    w = spf.prune_2to4(torch.randn(4, 96, generator=g) + 0.05)
    w[:, 72:76] = torch.tensor([0.0, 0.0, 1.0, 2.0])  # group 18 keeps positions (2, 3)
    meta96 = spf.pack_sparse24(w)[1]
    spf.check_meta(meta96, 96)
    with pytest.raises(ValueError, match=r"row 0, group 18 \(columns 72\.\.75\).*K=70"):
        spf.check_meta(meta96, 70)  # packed for a larger K than the layer's
    _, meta = _packed(4, 70)
    bad = _set_group(meta, 2, 23, 2, 3)  # fully padded group with positions (2, 3)
    spf.check_meta(bad)  # no K: padding cannot be told from real columns
    with pytest.raises(ValueError, match=r"row 2, group 23 \(columns 92\.\.95\).*\(0, 1\)"):
        spf.check_meta(bad, 70)


@pytest.mark.parametrize("k", [0, 64, 97, -1])
def test_check_meta_refuses_a_k_that_does_not_fit(k):
    _, meta = _packed(2, 96)
    with pytest.raises(ValueError, match=rf"k={k}"):
        spf.check_meta(meta, k)


def test_check_meta_type_errors():
    with pytest.raises(TypeError, match="int32"):
        spf.check_meta(torch.zeros(2, 1, dtype=torch.int64))
    with pytest.raises(TypeError, match="meta must be"):
        spf.check_meta([[0x44444444]])
    with pytest.raises(TypeError, match="2-D"):
        spf.check_meta(torch.zeros(3, dtype=torch.int32))


def test_bad_meta_makes_the_cpu_and_triton_paths_disagree(monkeypatch):
    """Why check_meta exists: with duplicate positions the CPU unpack (a scatter: one of the
    two values survives) and the Triton kernel (the GEMV sums both values into the column)
    compute different products, silently."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter or a GPU")
    import compress_ops  # noqa: F401  (registers the ops)

    op = torch.ops.compress_ops.sparse24_linear
    values, meta = _packed(4, 32, seed=5)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 32)

    def run(meta: torch.Tensor, backend: str) -> torch.Tensor:
        monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", backend)
        dev = "cpu" if backend == "reference" else device
        return op(x.to(dev), values.to(dev), meta.to(dev), None).cpu()

    torch.testing.assert_close(run(meta, "reference"), run(meta, "triton"))
    bad = _set_group(meta, 0, 0, 1, 1)
    dense = spf.unpack_sparse24(values, bad)
    assert dense[0, :4].count_nonzero() == 1  # the unpack keeps one of the two values
    assert not torch.allclose(run(bad, "reference")[0, 0], run(bad, "triton")[0, 0])
    with pytest.raises(ValueError, match="duplicate"):
        spf.check_meta(bad)
