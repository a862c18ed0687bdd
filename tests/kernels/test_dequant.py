"""kernels/dequant.py: the Triton affine and codebook kernels against the float64 reference on
the same packed weights (CPU: interpreter)."""

from __future__ import annotations

import contextlib
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from compress_ops.kernels import _launch, launches, tuning
from compress_ops.kernels import dequant as dq
from compress_ops.kernels.formats import dequant as dqf
from compress_ops.kernels.tuning import SPLIT_K_MAX_M, KernelConfig
from compress_ops.reference import codebook_linear_ref, dequant_linear_ref

from .tolerances import rel_err as _rel_err
from .tolerances import tol as _tol

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
LARGE = os.environ.get("HYPOTHESIS_PROFILE") == "gpu"
MS = [1, 2, 3, 4, 5, 16, 17, 40] + ([129, 300, 1000] if LARGE else [])
MAX_N, MAX_K = (600, 1100) if LARGE else (72, 200)
GROUPS = [32, 64, 128, None]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _affine(n: int, k: int, bits: int, group: int | None, sym: bool, dtype: torch.dtype,
            seed: int):
    """A random packed affine weight (random fields, scales and fractional zero points)."""
    g = _gen(seed)
    gs = dqf.effective_group_size(k, group)
    kp = dqf.padded_k(k, gs)
    q = torch.randint(0, 2**bits, (n, kp), generator=g)
    scales = ((torch.rand(n, kp // gs, generator=g) + 0.5) / 2**bits).to(dtype)
    zeros = None if sym else (torch.rand(n, kp // gs, generator=g) * (2**bits - 1)).to(dtype)
    return dqf.pack_bits(q, bits), scales, zeros, gs


def _codebook(n: int, k: int, bits: int, groups: int, dtype: torch.dtype, seed: int):
    g = _gen(seed)
    q = torch.randint(0, 2**bits, (n, dqf.padded_k(k, None)), generator=g)
    cb = torch.randn(groups, 2**bits, generator=g).to(dtype)
    return dqf.pack_bits(q, bits), cb


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

CONFIGS = {
    "gemv_m1": KernelConfig("gemv", 1, 16, 64),
    "gemv_m4_splitk": KernelConfig("gemv", 4, 32, 128, split_k=2),
    "gemm_16": KernelConfig("gemm", 16, 32, 64),
    "gemm_32_splitk": KernelConfig("gemm", 32, 16, 32, split_k=4),
    "gemm_64": KernelConfig("gemm", 64, 32, 64, group_m=2),
    "gemm_64_splitk": KernelConfig("gemm", 64, 32, 32, split_k=4),  # DEQUANT_W + split-K
}


@given(m=st.sampled_from(MS), n=st.integers(1, MAX_N), k=st.integers(1, MAX_K),
       bits=st.sampled_from(dqf.AFFINE_BITS), group=st.sampled_from(GROUPS), sym=st.booleans(),
       dtype=st.sampled_from(DTYPES), cfg=st.sampled_from([None, *CONFIGS]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_dequant_kernel_matches_float64_reference(poison, device, m, n, k, bits, group, sym,
                                                  dtype, cfg, bias, seed):
    qw, s, z, gs = (t.to(device) if isinstance(t, torch.Tensor) else t
                    for t in _affine(n, k, bits, group, sym, dtype, seed))
    x = (torch.randn(m, k, generator=_gen(seed + 1)) + 0.1).to(dtype).to(device)
    b = torch.randn(n, generator=_gen(seed + 2)).to(dtype).to(device) if bias else None
    y = dq.dequant_matmul(x, qw, s, z, b, bits, gs,
                          config=CONFIGS[cfg] if cfg else None)
    ref = dequant_linear_ref(x, qw, s, z, b, bits, gs, dtype=torch.float64)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, ref) < _tol(dtype, k)


@pytest.mark.parametrize("cfg", [None, "gemv_m4_splitk", "gemm_16", "gemm_64_splitk"])
def test_binary_one_bit_kernels_match_float64_reference(poison, device, cfg):
    """1-bit fields (one bit plane: column 32j + i at bit i of word j) with binary weights
    (``quantize_absmean``: the symmetric 1-bit grid, whose zero is 1/2, scales 2 s, so W = ±s;
    and the same weight with its zero points 1/2 stored) on the fields kernels (the GEMV, the
    small tiles, fp16's pairs of adjacent columns from PRMT byte copies with the offsets and
    the zero in the all-ones operand, and the large tiles above 32 rows), ragged K included:
    padding columns hold q = 0 (a weight of -s), masked by x. (The property above draws 1-bit
    fields with any scales and zeros; the large-M route:
    ``test_large_m_route_matches_float64_reference``.)"""
    from compress_ops.quantize import quantize_absmean

    w = torch.randn(20, 83, generator=_gen(11))
    for dtype, group, sym in ((torch.float32, 32, False), (torch.float16, None, True),
                              (torch.float16, 32, True), (torch.float16, 64, False),
                              (torch.bfloat16, 64, False)):
        aw = quantize_absmean(w, "binary", group, dtype=dtype)
        assert aw.bits == 1 and aw.zeros is None
        assert aw.qweight.shape == (20, dqf.padded_k(83, aw.group_size) // 32)
        half = torch.full_like(aw.scales, 0.5)
        dense = dqf.dequantize(aw.qweight, aw.scales, half, 1, aw.group_size, 83)
        assert torch.equal(dense, dqf.dequantize(aw.qweight, aw.scales, None, 1, aw.group_size,
                                                 83))
        z = None if sym else half.to(device)  # symmetric: z = 1/2
        assert torch.equal(dense.abs(), aw.scales.repeat_interleave(aw.group_size, 1)[:, :83] / 2)
        for m in (1, 5, 17) if cfg else (1, 5, 17, 40):  # 40: the default 64-row tile
            x = (torch.randn(m, 83, generator=_gen(m)) + 0.1).to(dtype).to(device)
            qw, s = aw.qweight.to(device), aw.scales.to(device)
            with launches.capture() as got:
                y = dq.dequant_matmul(x, qw, s, z, None, 1, aw.group_size,
                                      config=CONFIGS[cfg] if cfg else None)
            (la,) = [la for la in got if not isinstance(la.kernel, str)]
            assert la.kernel in (dq._fields_gemv_kernel, dq._fields_matmul_kernel)
            if la.kernel is dq._fields_matmul_kernel:
                assert la.kwargs["DEQUANT_W"] is (la.kwargs["BLOCK_M"] > 32)
                assert la.kwargs["BYTE_SHIFT"] is (dtype == torch.float16
                                                   and (sym or la.kwargs["DEQUANT_W"]))
            ref = dequant_linear_ref(x, qw, s, z, None, 1, aw.group_size, dtype=torch.float64)
            assert y.shape == (m, 20) and y.dtype == dtype
            assert _rel_err(y, ref) < _tol(dtype, 83)


@pytest.mark.parametrize(("dtype", "group", "sym"), [(torch.float16, None, True),
                                                     (torch.bfloat16, 256, False)])
def test_one_bit_small_tile_takes_256_columns_a_k_step(poison, device, dtype, group, sym):
    """The shipped 16-row tile of 1-bit fields takes 256 columns a K step where the groups
    allow it (a ragged K of two tiles here; fp16 binary: PRMT byte copies and pairs of
    adjacent columns, the offsets and the zero in the all-ones operand); groups of 128 keep
    128."""
    n, k = 24, 300
    qw, s, z, gs = (t.to(device) if isinstance(t, torch.Tensor) else t
                    for t in _affine(n, k, 1, group, sym, dtype, 5))
    x = (torch.randn(3, k, generator=_gen(6)) + 0.1).to(dtype).to(device)
    with launches.capture() as got:
        y = dq.dequant_matmul(x, qw, s, z, None, 1, gs)
    (la,) = [la for la in got if not isinstance(la.kernel, str)]
    assert la.kernel is dq._fields_matmul_kernel
    # (a GPU narrows BLOCK_N to 32 for so few rows, which keeps 128 columns)
    assert (la.kwargs["BLOCK_M"], la.kwargs["BLOCK_K"]) == (
        16, 256 if la.kwargs["BLOCK_N"] >= 64 else 128)
    assert la.kwargs["BYTE_SHIFT"] is (dtype == torch.float16)
    ref = dequant_linear_ref(x, qw, s, z, None, 1, gs, dtype=torch.float64)
    assert _rel_err(y, ref) < _tol(dtype, k)
    q128, s128, _, _ = _affine(n, k, 1, 128, True, dtype, 5)
    with launches.capture(run=False) as got:
        dq.dequant_matmul(x.cpu(), q128, s128, None, None, 1, 128)
    assert [la.kwargs["BLOCK_K"] for la in got if not isinstance(la.kernel, str)] == [128]


def test_one_bit_fields_pack_as_one_bit_plane():
    """b = 1: plain little-endian (column 32j + i at bit i of word j), the 3-bit layout with a
    single plane; 32 weights per word, round trips, unchanged by repack; no 1-bit codebooks."""
    q = torch.randint(0, 2, (3, 96), generator=_gen(5))
    packed = dqf.pack_bits(q, 1)
    assert packed.shape == (3, 3) and dqf.packed_words(96, 1) == 3 and dqf.packed_k(3, 1) == 96
    for j in range(3):
        word = packed[0, j].item() & 0xFFFFFFFF
        assert [(word >> i) & 1 for i in range(32)] == q[0, 32 * j:32 * j + 32].tolist()
    assert torch.equal(dqf.unpack_bits(packed, 1), q.to(torch.int32))
    assert torch.equal(dqf.unpack_bits(packed, 1, 90), q[:, :90].to(torch.int32))
    assert dqf.repack(packed, 1, 1) is packed
    planes3 = dqf.pack_bits(q * 0b101, 3)  # bit 0 and bit 2 of each 3-bit field: q's plane
    assert torch.equal(planes3[:, 0::3], packed) and torch.equal(planes3[:, 2::3], packed)
    # binary g128 fp16: 1-bit fields (half the 2-bit ones) + one scale per group
    assert dqf.affine_bytes(8, 256, 1, 128, torch.float16, True) == 8 * 256 // 8 + 8 * 2 * 2
    assert dqf.affine_bytes(8, 256, 2, 128, torch.float16, True) == 8 * 256 // 4 + 8 * 2 * 2
    # the symmetric 1-bit grid is binary, (q - 1/2) s; an empty one has zero scales
    assert dqf.symmetric_zero(1) == 0.5 and dqf.symmetric_zero(4) == 8.0
    w = dqf.dequantize(packed, torch.full((3, 3), 4.0), None, 1, 32)
    assert torch.equal(w, (q - 0.5) * 4.0)
    qe, se, ze = dqf.empty_affine(3, 40, 1, 32, True, dtype=torch.float32)
    assert ze is None and (dqf.dequantize(qe, se, None, 1, 32) == 0).all()
    with pytest.raises(ValueError, match="bits must be one of"):
        dqf.check_codebook(packed, torch.zeros(1, 2), 1)


# the interpreter's slowest property (~1.8 s an example): 24 examples keep CI under its budget;
# the GPU profile (HYPOTHESIS_PROFILE=gpu) runs its own count
@settings(max_examples=24 if os.environ.get("TRITON_INTERPRET") == "1"
          else settings().max_examples)
@given(m=st.sampled_from(MS), n_groups=st.integers(1, 12), rows=st.sampled_from([1, 3, 8]),
       k=st.integers(1, MAX_K), bits=st.sampled_from(dqf.BITS), groups=st.sampled_from([1, 2]),
       dtype=st.sampled_from(DTYPES), cfg=st.sampled_from([None, *CONFIGS]),
       seed=st.integers(0, 2**16))
def test_codebook_kernel_matches_float64_reference(poison, device, m, n_groups, rows, k, bits,
                                                   groups, dtype, cfg, seed):
    n = n_groups * rows * groups
    idx, cb = (t.to(device) for t in _codebook(n, k, bits, groups, dtype, seed))
    x = (torch.randn(m, k, generator=_gen(seed + 1)) + 0.1).to(dtype).to(device)
    y = dq.codebook_matmul(x, idx, cb, None, bits, config=CONFIGS[cfg] if cfg else None)
    ref = codebook_linear_ref(x, idx, cb, None, bits, dtype=torch.float64)
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, ref) < _tol(dtype, k)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize(("block_m", "dequant_w", "split_k"),
                         [(16, False, 1), (64, True, 1), (64, True, 2)])
@pytest.mark.parametrize("group", [32, None])
def test_fields_gemm_both_tile_kinds_every_width(poison, device, bits, dtype, sym, block_m,
                                                 dequant_w, split_k, group):
    """The fields GEMM unpacks every word in registers (``_unpack_words``: pairs of fields per
    shift and LOP3, joined into column order): up to BLOCK_M = 32 it scales each tile's dot per
    output element, above it dequantizes every weight (``DEQUANT_W``); codebooks look their
    fields up at every tile size (two row groups of tables over 36 rows here). A wrong field
    order, a wrong half of a pair or an inexact ``q - z`` fails here: ragged N and K,
    fractional zero points, groups smaller than the tile, and M rows past the tile. One group
    per row (``ONE_GROUP``) accumulates every K tile unscaled and scales once after the loop
    (with split-K, each split's partial sum): a scale or zero applied per tile as well, or
    not at all, fails here. Small half-precision tiles take ``offset + q`` as unpacked and
    remove the offset and the zero with the all-ones second dot (``ONES_DOT``)."""
    m, n, k = block_m + 3, 37, 200
    qw, s, z, gs = (t.to(device) if isinstance(t, torch.Tensor) else t
                    for t in _affine(n, k, bits, group, sym, dtype, 7 * bits + block_m))
    x = (torch.randn(m, k, generator=_gen(bits)) + 0.1).to(dtype).to(device)
    cfg = KernelConfig("gemm", block_m, 32, 64, group_m=2, split_k=split_k)
    with launches.capture() as got:
        y = dq.dequant_matmul(x, qw, s, z, None, bits, gs, config=cfg)
    (la,) = [la for la in got if not isinstance(la.kernel, str)]
    assert la.kernel is dq._fields_matmul_kernel and la.kwargs["DEQUANT_W"] is dequant_w
    assert la.kwargs["ONE_GROUP"] is (group is None)
    half = dtype == torch.float16 or (dtype == torch.bfloat16 and bits < 8)
    assert la.kwargs["ONES_DOT"] is (not dequant_w and half)
    ref = dequant_linear_ref(x, qw, s, z, None, bits, gs, dtype=torch.float64)
    assert _rel_err(y, ref) < _tol(dtype, k)
    # codebooks: the same kernel and tiles, fields looked up
    if bits < 8 and not sym and group is not None:
        idx, cb = (t.to(device) for t in _codebook(n - 1, k, bits, 2, dtype, bits + block_m))
        with launches.capture() as got:
            y = dq.codebook_matmul(x, idx, cb, None, bits, config=cfg)
        assert [la.kernel for la in got if not isinstance(la.kernel, str)] == [
            dq._fields_matmul_kernel]
        ref = codebook_linear_ref(x, idx, cb, None, bits, dtype=torch.float64)
        assert _rel_err(y, ref) < _tol(dtype, k)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [32, None])
def test_fields_gemv_full_and_ragged_tiles_every_width(poison, device, bits, dtype, group):
    """The fields GEMV's unmasked tiles take each word's activations from one contiguous load
    split in registers (4 and 8 fields per word); the ragged last tile gathers them per field.
    K = 200 with 64-column tiles runs both (3 full tiles, 1 ragged); a wrong split order or a
    wrong word of a chunk fails against float64. Codebooks share the split."""
    n, k = 37, 200
    qw, s, z, gs = (t.to(device) if isinstance(t, torch.Tensor) else t
                    for t in _affine(n, k, bits, group, False, dtype, bits))
    x = (torch.randn(1, k, generator=_gen(bits + 1)) + 0.1).to(dtype).to(device)
    cfg = KernelConfig("gemv", 1, 16, 64)
    with launches.capture() as got:
        y = dq.dequant_matmul(x, qw, s, z, None, bits, gs, config=cfg)
    assert [la.kernel for la in got] == [dq._fields_gemv_kernel]
    ref = dequant_linear_ref(x, qw, s, z, None, bits, gs, dtype=torch.float64)
    assert _rel_err(y, ref) < _tol(dtype, k)
    if bits < 8:
        idx, cb = (t.to(device) for t in _codebook(n, k, bits, 1, dtype, bits))
        y = dq.codebook_matmul(x, idx, cb, None, bits, config=cfg)
        ref = codebook_linear_ref(x, idx, cb, None, bits, dtype=torch.float64)
        assert _rel_err(y, ref) < _tol(dtype, k)


@pytest.mark.parametrize("m", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_tile_few_rows_unmasked_k(poison, device, m, dtype):
    """M below the 16-row tile with every K tile inside K (``EVEN_K``): x's rows past M are
    masked (``FEW_ROWS``: each real row copied once, not row M - 1 over and over), the K steps
    unmasked; fractional zero points and two groups per row."""
    n, k = 40, 256
    qw, s, z, gs = (t.to(device) if isinstance(t, torch.Tensor) else t
                    for t in _affine(n, k, 4, 128, False, dtype, 11 + m))
    x = (torch.randn(m, k, generator=_gen(m)) + 0.1).to(dtype).to(device)
    with launches.capture() as got:
        y = dq.dequant_matmul(x, qw, s, z, None, 4, gs)
    (la,) = [la for la in got if not isinstance(la.kernel, str)]
    assert la.kernel is dq._fields_matmul_kernel
    assert (la.kwargs["BLOCK_M"], la.kwargs["EVEN_K"], la.kwargs["FEW_ROWS"]) == (16, True, True)
    ref = dequant_linear_ref(x, qw, s, z, None, 4, gs, dtype=torch.float64)
    assert _rel_err(y, ref) < _tol(dtype, k)


def test_fields_kernels_take_the_lop3_asm_on_a_gpu_only():
    """The fields' ``(word & mask) | exponent`` is one PTX ``lop3.b32`` (truth table 0xEA) on a
    GPU, where the audit and the static model compile it (recorded as on an H200); the
    interpreter runs the plain expression, which the float64 tests above check."""
    a, b, c = 0xF0, 0xCC, 0xAA  # PTX's operand tables for lop3's immLut
    assert (a & b) | c == 0xEA
    # M = 1: the GEMV for fp32 x (and bf16 int8), the 16-row tensor-core tile for fp16 x (and
    # bf16 below 8 bits)
    for m, dt, bits, kernel in ((1, torch.float32, 4, dq._fields_gemv_kernel),
                                (1, torch.float32, 1, dq._fields_gemv_kernel),
                                (1, torch.float16, 1, dq._fields_matmul_kernel),
                                (1, torch.bfloat16, 8, dq._fields_gemv_kernel),
                                (1, torch.bfloat16, 4, dq._fields_matmul_kernel),
                                (1, torch.float16, 8, dq._fields_matmul_kernel),
                                (16, torch.float16, 4, dq._fields_matmul_kernel)):
        q, s, z = dqf.empty_affine(64, 256, bits, 128 if bits < 8 else None, False, dtype=dt)
        x = torch.empty(m, 256, dtype=dt)
        gs = 128 if bits < 8 else 256
        with launches.capture(run=False) as got:
            dq.dequant_matmul(x, q, s, z, None, bits, gs)
        assert [(la.kernel, la.kwargs["ASM"]) for la in got] == [(kernel, False)]
        with tuning.simulate_gpu(), launches.capture(run=False) as got:
            dq.dequant_matmul(x, q, s, z, None, bits, gs)
        assert [(la.kernel, la.kwargs["ASM"]) for la in got] == [(kernel, True)]


def _ptx_prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32 d, a, b, c`` (default mode): result byte i is byte ``c[4i+2:4i]`` of the
    8-byte value ``{b, a}`` (a = bytes 0-3), sign-replicated when ``c[4i+3]`` is set."""
    src = (b << 32) | a
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (src >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def test_int8_byte_pairs_prmt_matches_the_interpreter_expression():
    """fp16 int8 fields are unpacked by one ``prmt.b32`` per two bytes on a GPU (selectors
    ``PRMT_PAIR_SEL``): bytes 2j and 2j + 1 of the word in the two halves' mantissas under the
    exponent byte 0x64, i.e. the fp16 pair (1024 + q[2j], 1024 + q[2j + 1]) in column order.
    The interpreter's shifts and masks (which the float64 tests check) must give the same word."""
    gen = torch.Generator().manual_seed(0)
    words = torch.randint(-(2**31), 2**31, (256,), generator=gen, dtype=torch.int64)
    for w in [int(v) & 0xFFFFFFFF for v in words] + [0, 0xFFFFFFFF, 0x80FF7F01]:
        ws = w - (1 << 32) if w >= 1 << 31 else w  # the kernel's int32 (arithmetic shifts)
        interp = ((ws & 0xFF) | ((ws << 8) & 0xFF0000) | 0x64006400,
                  ((ws >> 16) & 0xFF) | ((ws >> 8) & 0xFF0000) | 0x64006400)
        for j, sel in enumerate(dq.PRMT_PAIR_SEL):
            got = _ptx_prmt(w, 0x64646464, sel.value)
            assert got == interp[j] & 0xFFFFFFFF
            halves = torch.tensor([got & 0xFFFF, got >> 16], dtype=torch.int32)
            pair = halves.to(torch.int16).view(torch.float16).double() - 1024
            assert pair.tolist() == [(w >> (16 * j)) & 0xFF, (w >> (16 * j + 8)) & 0xFF]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="interpreter forms")
def test_prmt_portable_form_is_ptx_prmt():
    """The interpreter's ``prmt.b32`` (``_launch.prmt_ref``, which every float64 test of the 4-bit
    codebook's register lookups runs through) against PTX's byte-permute semantics, for
    random words and random selectors (sign-replicate mode included: the 2:4 tiles' selector
    lookup uses it)."""
    import triton
    import triton.language as tl

    @triton.jit
    def prmt_kernel(a_ptr, b_ptr, s_ptr, o_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(o_ptr + i, _launch.prmt_ref(tl.load(a_ptr + i), tl.load(b_ptr + i),
                                         tl.load(s_ptr + i)))

    gen = torch.Generator().manual_seed(1)
    a, b = (torch.randint(-(2**31), 2**31, (512,), generator=gen, dtype=torch.int64)
            .to(torch.int32) for _ in range(2))
    sel = torch.randint(0, 2**16, (512,), generator=gen, dtype=torch.int64).to(torch.int32)
    out = torch.empty_like(a)
    prmt_kernel[(1,)](a, b, sel, out, N=512)
    for ai, bi, si, oi in zip(a.tolist(), b.tolist(), sel.tolist(), out.tolist(), strict=True):
        assert oi & 0xFFFFFFFF == _ptx_prmt(ai & 0xFFFFFFFF, bi & 0xFFFFFFFF, si)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_kernel_column_maps_are_the_format(bits):
    """The kernels' position <-> column maps of format 3 (``_pos_col``, ``_col_pos``), which
    every kernel's K order and masks use, against the format's own (plain torch)
    ``position_columns``: 2- and 4-bit fields permuted within each 32-column block, int8 and
    bit planes not."""
    import triton
    import triton.language as tl

    @triton.jit
    def maps_kernel(pc_ptr, cp_ptr, N: tl.constexpr, BITS: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(pc_ptr + i, dq._pos_col(i, BITS))
        tl.store(cp_ptr + i, dq._col_pos(i, BITS))

    pc = torch.empty(256, dtype=torch.int32)
    cp = torch.empty_like(pc)
    maps_kernel[(1,)](pc, cp, N=256, BITS=bits)
    expect = (dqf.position_columns(bits, 256) if bits in (2, 4, 8) else torch.arange(256)).int()
    assert torch.equal(pc, expect)
    assert torch.equal(cp[expect.long()], torch.arange(256, dtype=torch.int32))
    assert (bits in (2, 4)) == (not torch.equal(expect, torch.arange(256, dtype=torch.int32)))


def test_int8_gemm_takes_the_packed_dequant_on_a_gpu_only():
    """fp16 int8 tiles above 32 rows dequantize each PRMT pair in packed fp16 arithmetic
    (``_dequant_halves``) where the launch is for a GPU (``ASM``); the interpreter runs the
    scalar form that the float64 tests check."""
    q, s, _ = dqf.empty_affine(64, 256, 8, None, True, dtype=torch.float16)
    x = torch.empty(64, 256, dtype=torch.float16)
    for sim, asm in ((False, False), (True, True)):
        ctx = tuning.simulate_gpu() if sim else contextlib.nullcontext()
        with ctx, launches.capture(run=False) as got:
            dq.dequant_matmul(x, q, s, None, None, 8, 256)
        (la,) = got
        assert la.kernel is dq._fields_matmul_kernel
        assert (la.kwargs["ASM"], la.kwargs["DEQUANT_W"], la.kwargs["HALF_MAGIC"]) == (asm, True, 1)


def test_group_shift_arg():
    """The kernels find a column's scale group with a shift: powers of two below the row, 31
    (every column in group 0) for one group per row; anything else is refused by name."""
    assert [dq.group_shift_arg(g, 1024) for g in (32, 64, 128, 256)] == [5, 6, 7, 8]
    assert dq.group_shift_arg(96, 96) == dq.group_shift_arg(4096, 4096) == 31
    with pytest.raises(ValueError, match="group_size must be a power of two"):
        dq.group_shift_arg(96, 192)


def test_kernel_leading_dims_noncontiguous_and_empty(device):
    qw, s, z, gs = _affine(24, 96, 4, 32, False, torch.float32, 0)
    qw, s, z = qw.to(device), s.to(device), z.to(device)
    x = torch.randn(3, 96, 5, device=device).transpose(1, 2)  # [3, 5, 96], non-contiguous
    y = dq.dequant_matmul(x, qw, s, z, None, 4, gs)
    ref = dequant_linear_ref(x, qw, s, z, None, 4, gs, dtype=torch.float64)
    assert y.shape == (3, 5, 24) and _rel_err(y, ref) < 1e-5
    assert dq.dequant_matmul(x[:, :0], qw, s, z, None, 4, gs).shape == (3, 0, 24)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: a.update(bits=5), ValueError, "bits must be one of"),
        (lambda a: a.update(group_size=48), ValueError, "group_size must be one of"),
        (lambda a: a.update(scales=a["scales"][:, :2]), ValueError, "scales shape"),
        (lambda a: a.update(zeros=a["zeros"][:5]), ValueError, "zeros shape"),
        (lambda a: a.update(zeros=a["zeros"].half()), TypeError, "zeros dtype"),
        (lambda a: a.update(x=torch.randn(2, 61)), ValueError, "K=61"),
        (lambda a: a.update(x=torch.randn(2, 97)), ValueError, "K=97"),
        (lambda a: a.update(x=a["x"].half()), TypeError, "scales dtype"),
        (lambda a: a.update(x=a["x"].int()), TypeError, "x must be float16"),
        (lambda a: a.update(qweight=a["qweight"].float()), TypeError, "qweight must be"),
        (lambda a: a.update(qweight=a["qweight"][:, :5]), ValueError, "32-column blocks"),
        (lambda a: a.update(bias=torch.randn(3)), ValueError, "bias shape"),
        (lambda a: a.update(x=a["x"].to("meta")), ValueError, "x on meta"),
    ],
)
def test_dequant_bad_inputs_raise_named_errors(mutate, exc, match):
    qw, s, z, gs = _affine(12, 90, 4, 32, False, torch.float32, 0)  # Kp = 96, 3 groups
    args = {"x": torch.randn(2, 90), "qweight": qw, "scales": s, "zeros": z,
            "bias": torch.randn(12), "bits": 4, "group_size": gs}
    mutate(args)
    with pytest.raises(exc, match=match):
        dq.dequant_matmul(**args)


@pytest.mark.parametrize(
    ("mutate", "exc", "match"),
    [
        (lambda a: a.update(codebook=a["codebook"][:, :8]), ValueError, "codebook shape"),
        (lambda a: a.update(codebook=torch.randn(5, 16)), ValueError, "divide N=12"),
        (lambda a: a.update(codebook=a["codebook"].half()), TypeError, "codebook dtype"),
        (lambda a: a.update(bits=3), ValueError, "32-column blocks"),
    ],
)
def test_codebook_bad_inputs_raise_named_errors(mutate, exc, match):
    idx, cb = _codebook(12, 40, 4, 2, torch.float32, 0)
    args = {"x": torch.randn(2, 40), "indices": idx, "codebook": cb, "bias": None, "bits": 4}
    mutate(args)
    with pytest.raises(exc, match=match):
        dq.codebook_matmul(**args)


DTYPES_ALL = (torch.float32, torch.float16, torch.bfloat16)


def test_select_config_paths_and_autotune_space():
    cpu = torch.device("cpu")
    assert dq.select_config(1, 4096, 4096, cpu).path == "gemv"
    # a half-precision operand (fp16; bf16 below 8 bits): M = 1 on the 16-row tensor-core
    # tile (gemv_max_m_half = 0); not the bit planes
    assert dq.select_config(1, 4096, 4096, cpu, half=True).path == "gemm"
    assert dq.select_config(1, 4096, 4096, cpu, half=True).block_m == 16
    assert dq.select_config(1, 4096, 4096, cpu, lut_gemv=True, half=True).path == "gemv"
    assert [dq.half_operand(b, dt) for b in (2, 4, 8) for dt in DTYPES_ALL] == [
        False, True, True, False, True, True, False, True, False]
    # from M = 2 the fields GEMM's 16-row tensor-core tile (one GEMV program per x row above)
    assert dq.select_config(2, 4096, 4096, cpu).path == "gemm"
    # the bit-plane (3-bit) kernels keep their own table: GEMV up to M = 4
    assert dq.select_config(4, 4096, 4096, cpu, lut_gemv=True, lut_gemm=True).path == "gemv"
    assert dq.select_config(5, 4096, 4096, cpu, lut_gemv=True, lut_gemm=True).path == "gemm"
    assert dq.select_config(3000, 4096, 4096, cpu).block_m >= 64
    for m in (1, 3, 16, 64, 1000):
        cfgs = dq.get_autotune_configs(m)
        assert cfgs and all(isinstance(c, KernelConfig) for c in cfgs)


def test_audit_specs_cover_every_shipped_config():
    specs = dq.audit_specs()
    names = {s["config"].split("/")[0] for s in specs}
    for table in dq.load_tables("dequant").values():
        if not isinstance(table, dict):
            continue
        # the affine GEMV ("gemv") and GEMM ("gemm") are audited as recorded real calls
        # (dq.recorded_specs; tests/perf/test_static_perf.py), their split-K tiles by config;
        # the bit-plane and codebook tables by config
        for path, key in (("gemv", "gemv_lut"), ("gemm", "gemm_lut")):
            for c in table[key].values():
                assert KernelConfig(path, **c).name in names
        for bucket, c in table["gemm"].items():
            if int(bucket) <= SPLIT_K_MAX_M:
                assert KernelConfig("gemm", **c).with_split_k(2).name in names
    variants = {s["config"].split("/", 1)[1] for s in specs}
    assert {"asym4/fp16", "sym8/fp16", "asym2/fp16", "cb4/fp16", "cb3/fp16",
            "asym1/fp16", "sym1/fp16"} <= variants  # 1: binary, one bit plane




def test_gemm_tiles_the_launcher_ships():
    """The tile a real call gets (recorded as on an H200): the 16-row tile takes 12 stages (its
    K steps small, so 44 KB of int4 words are in flight), 64 rows take 7 (int8: 6, its words
    double a stage: 7 would need 176 KB, over sm_80's 163 KB; asymmetric int4 with fewer rows
    than the tile: 6, format 3's tile spilled a register on sm_80 at 7; the audit compiles
    both)."""
    got_cfg = {}
    for bits, m in ((4, 16), (8, 16), (2, 16), (4, 64), (8, 64), (2, 64)):
        q, s, z = dqf.empty_affine(8192, 1024, bits, 128 if bits < 8 else None, False,
                                   dtype=torch.float16)  # 128 column tiles: no split-K
        x = torch.empty(m, 1024, dtype=torch.float16)
        with tuning.simulate_gpu(), launches.capture(run=False) as got:
            dq.dequant_matmul(x, q, s, z, None, bits, 128 if bits < 8 else 1024)
        (la,) = got
        got_cfg[bits, m] = (la.kwargs["BLOCK_M"], la.kwargs["num_stages"], la.kwargs["EVEN_K"])
    assert got_cfg == {(4, 16): (16, 12, True), (8, 16): (16, 12, True), (2, 16): (16, 18, True),
                       (4, 64): (64, 7, True), (8, 64): (64, 6, True), (2, 64): (64, 7, True)}
    # codebooks above 32 rows: 4-bit fields with two-byte entries are looked up in registers
    # and take the affine tile; the 2-bit codebook's gathered tile keeps BLOCK_K 64
    for bits, dt, bk in ((4, torch.float16, 128), (4, torch.bfloat16, 128),
                         (2, torch.float16, 64)):
        idx, _, _ = dqf.empty_affine(8192, 1024, bits, 128, True, dtype=dt)
        with tuning.simulate_gpu(), launches.capture(run=False) as got:
            dq.codebook_matmul(torch.empty(64, 1024, dtype=dt), idx,
                               torch.empty(2, 2**bits, dtype=dt), None, bits)
        (la,) = got
        assert (la.kwargs["BLOCK_K"], la.kwargs["LUT_PRMT"]) == (bk, bits == 4)


def test_small_tile_takes_four_warps_and_narrows_before_split_k():
    """The 16-row tile has 4 warps (2 would issue from 2 of an SM's 4 schedulers); where N / 64
    tiles leave more than a tenth of the 132 SMs idle it halves BLOCK_N (down to 32) before
    split-K adds its two launches; only then is split-K raised. The CPU table (no GPU) keeps
    the shipped tile."""
    def launched(m, n):
        q, s, z = dqf.empty_affine(n, 1024, 4, 128, False, dtype=torch.float16)
        x = torch.empty(m, 1024, dtype=torch.float16)
        with tuning.simulate_gpu(), launches.capture(run=False) as got:
            dq.dequant_matmul(x, q, s, z, None, 4, 128)
        kernels = [la for la in got if not isinstance(la.kernel, str)]
        assert len(kernels) == 1
        return (kernels[0].kwargs["BLOCK_N"], kernels[0].kwargs["num_warps"],
                kernels[0].kwargs["SPLIT_K"], len(got))

    assert launched(16, 8192) == (64, 4, 1, 1)   # 128 tiles: 97% of the SMs
    assert launched(16, 4096) == (32, 4, 1, 1)   # 64 -> 128 tiles by BLOCK_N 32, no split-K
    assert launched(4, 2048) == (32, 4, 2, 3)    # 64 tiles at BLOCK_N 32: then split-K (+2)
    cpu = dq.select_config(16, 4096, 4096, torch.device("cpu"))
    assert (cpu.block_n, cpu.split_k) == (64, 1)
    # codebooks keep BLOCK_N 64 (the 2-bit codebook's 32-column tile spills on sm_80)
    idx, _, _ = dqf.empty_affine(4096, 1024, 2, 128, True, dtype=torch.float16)
    with tuning.simulate_gpu(), launches.capture(run=False) as got:
        dq.codebook_matmul(torch.empty(16, 1024, dtype=torch.float16), idx,
                           torch.empty(2, 4, dtype=torch.float16), None, 2)
    (la,) = [la for la in got if not isinstance(la.kernel, str)]
    assert (la.kwargs["BLOCK_N"], la.kwargs["SPLIT_K"]) == (64, 2)


def test_launch_plan_is_remembered_per_everything_it_reads(monkeypatch):
    """A call's launch (kernel, grid, scalars, constexprs) is derived once per key and then
    looked up (eager decode is host-bound); every input of the derivation is in the key: the
    simulated GPU (above: the PTX flag), the fp32 dot's TF32 flag, the config, the shapes.
    The cache is bounded."""
    q, s, z = dqf.empty_affine(64, 256, 4, 128, False, dtype=torch.float32)

    def launched(m, config=None):
        x = torch.empty(m, 256, dtype=torch.float32)
        with launches.capture(run=False) as got:
            dq.dequant_matmul(x, q, s, z, None, 4, 128, config=config)
        (la,) = got
        return la

    dq._PLANS.clear()
    first, again = launched(16), launched(16)
    assert len(dq._PLANS) == 1
    assert (again.kernel, again.grid, again.args[6:], again.kwargs) == \
        (first.kernel, first.grid, first.args[6:], first.kwargs)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = not tf32
        flipped = launched(16)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert {first.kwargs["DOT_PRECISION"], flipped.kwargs["DOT_PRECISION"]} == {"tf32", "ieee"}
    assert launched(16).kwargs == first.kwargs
    forced = launched(16, KernelConfig("gemm", 16, 32, 128, 4, 2))
    assert (forced.kwargs["BLOCK_N"], forced.kwargs["num_stages"]) == (32, 2)
    monkeypatch.setattr(dq, "_MAX_PLANS", 2)
    for m in (1, 2, 5, 7):
        assert launched(m).args[6] == m  # M, the first scalar after the six pointers
    assert len(dq._PLANS) <= 2


@contextlib.contextmanager
def _dense_min_m(value: str | None):
    """``COMPRESS_OPS_DENSE_MIN_M`` set (or unset) inside the block."""
    old = os.environ.pop("COMPRESS_OPS_DENSE_MIN_M", None)
    if value is not None:
        os.environ["COMPRESS_OPS_DENSE_MIN_M"] = value
    try:
        yield
    finally:
        os.environ.pop("COMPRESS_OPS_DENSE_MIN_M", None)
        if old is not None:
            os.environ["COMPRESS_OPS_DENSE_MIN_M"] = old


def _kinds(got) -> list[str]:
    return [la.kernel if isinstance(la.kernel, str) else la.kernel.__name__ for la in got]


@given(m=st.sampled_from([1, 3, 16, 40]), n=st.integers(1, MAX_N), k=st.integers(1, MAX_K),
       bits=st.sampled_from([1, 2, 4, 8]), group=st.sampled_from(GROUPS), sym=st.booleans(),
       codebook=st.booleans(), dtype=st.sampled_from([torch.float16, torch.bfloat16]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_large_m_route_matches_float64_reference(poison, device, m, n, k, bits, group, sym,
                                                 codebook, dtype, bias, seed):
    """The large-M route (dequantize once + ``F.linear``), forced from M = 1 by
    ``COMPRESS_OPS_DENSE_MIN_M``: every width (1-bit fields: affine only), group, grid and
    codebook, ragged N and K, with and without bias, against float64."""
    x = (torch.randn(m, k, generator=_gen(seed + 1)) + 0.1).to(dtype).to(device)
    b = torch.randn(n, generator=_gen(seed + 2)).to(dtype).to(device) if bias else None
    with _dense_min_m("1"), launches.capture() as got:
        if codebook and bits > 1:
            idx, cb = (t.to(device) for t in _codebook(n, k, bits, 1, dtype, seed))
            y = dq.codebook_matmul(x, idx, cb, b, bits)
            ref = codebook_linear_ref(x, idx, cb, b, bits, dtype=torch.float64)
        else:
            qw, s, z, gs = (t.to(device) if isinstance(t, torch.Tensor) else t
                            for t in _affine(n, k, bits, group, sym, dtype, seed))
            y = dq.dequant_matmul(x, qw, s, z, b, bits, gs)
            ref = dequant_linear_ref(x, qw, s, z, b, bits, gs, dtype=torch.float64)
    assert _kinds(got) == ["_dequant_weight_kernel", "F.linear"]
    assert y.shape == (m, n) and y.dtype == dtype
    assert _rel_err(y, ref) < _tol(dtype, k)


@pytest.mark.parametrize(("bits", "half_magic"),  # bf16 int8 unpacks as fp32 q (0)
                         [(b, h) for b in (1, 2, 4, 8) for h in (1, 2, 0) if (b, h) != (8, 2)])
@pytest.mark.parametrize(("group", "sym", "k"),
                         [(32, False, 200), (128, True, 200), (None, False, 200), (32, True, 256)])
def test_dequant_weight_kernel_is_the_formats_weight(bits, half_magic, group, sym, k):
    """The route's dense weight, stored in fp32, is exactly ``formats.dequantize``'s fp32
    weight (``(q - z) s``, one rounding) for each unpacking (fp16's ``1024 + q``, bf16's
    ``128 + q``, the fp32 ``q``; the interpreter takes the fp32 arithmetic, the GPU's packed
    fp16 is checked by ``perf/gpu_check.sh``); columns past K are not written; codebooks: the
    entries. A program takes up to ``DENSE_TILES`` K tiles (K = 200 in 32-column groups: 7
    tiles, two programs along K, the second ragged; K = 256: every tile whole, ``EVEN_K``)."""
    n = 37
    dtype = {1: torch.float16, 2: torch.bfloat16, 0: torch.float32}[half_magic]
    qw, s, z, gs = _affine(n, k, bits, group, sym, dtype, seed=bits)
    kp = dqf.packed_k(qw.shape[1], bits)
    mode = dq.MODE_SYM if sym else dq.MODE_ASYM
    x2 = torch.empty(1, k, dtype=dtype)

    def weight(mode, s, z, rows_per_group=1):
        plan = dq._dense_plan(mode, x2, bits, kp if mode == dq.MODE_CODEBOOK else gs, kp,
                              (1, n, k, kp, dq.group_shift_arg(
                                  kp if mode == dq.MODE_CODEBOOK else gs, kp),
                               rows_per_group))
        assert plan.meta["HALF_MAGIC"] == (half_magic if mode != dq.MODE_CODEBOOK
                                           else plan.meta["HALF_MAGIC"])
        w = torch.full((n, k + 3), float("nan"))  # fp32, three columns past K
        k_, kp_, shift, rpg = plan.ints
        dq._dequant_weight_kernel[(-(-n // dq.DENSE_BLOCK_N), *plan.grid)](
            qw, s, z if z is not None else s, w, n, k_, kp_, shift, rpg, 0, qw.stride(0),
            s.stride(0), w.stride(0), **plan.meta)
        assert plan.meta["EVEN_K"] == (k == kp and k % plan.meta["BLOCK_K"] == 0)
        k_tiles = math.ceil(kp / plan.meta["BLOCK_K"])
        assert plan.grid == (math.ceil(k_tiles / plan.meta["TILES"]),)
        assert w[:, k:].isnan().all()
        return w[:, :k]

    ref = dqf.dequantize(qw, s, z, bits, gs, k, dtype=torch.float32)
    assert torch.equal(weight(mode, s, z), ref)
    if bits == 1:  # (no 1-bit codebooks)
        return
    cb = torch.randn(n, 2**bits, generator=_gen(3)).to(dtype)  # one table per row
    assert torch.equal(weight(dq.MODE_CODEBOOK, cb, None),
                       dqf.codebook_weight(qw, cb, bits, k, dtype=torch.float32))


def test_large_m_route_threshold_chunks_and_errors(monkeypatch):
    """From ``dense_min_m`` rows (table, or the environment) with fp16/bf16 x and 1/2/4/8-bit
    fields, a call takes the large-M route; fp32 x, 3-bit fields, a forced config and
    ``never`` keep the fused kernels. A weight over ``DENSE_CHUNK_BYTES`` is dequantized in
    row chunks into one buffer (a launch and a GEMM each). Bad settings are named errors."""
    qw, s, z, gs = _affine(70, 96, 4, 32, False, torch.float16, seed=1)

    def kinds(m, dtype=torch.float16, config=None, bits=4):
        q, sc, zz, g = (qw, s, z, gs) if bits == 4 else _affine(70, 96, bits, 32, False,
                                                                dtype, seed=2)
        x = torch.randn(m, 96).to(dtype)
        with launches.capture() as got:
            y = dq.dequant_matmul(x, q, sc.to(dtype), zz.to(dtype), None, bits, g,
                                  config=config)
        ref = dequant_linear_ref(x, q, sc.to(dtype), zz.to(dtype), None, bits, g,
                                 dtype=torch.float64)
        assert _rel_err(y, ref) < _tol(dtype, 96)
        return _kinds(got)

    dense = ["_dequant_weight_kernel", "F.linear"]
    table = dq.dense_min_m(torch.device("cpu"))
    assert table == tuning.load_tables("dequant")["default"]["dense_min_m"] == 1024
    with _dense_min_m(None):
        assert dq.dense_route(1024, 4, torch.float16, torch.device("cpu"))
        assert not dq.dense_route(1023, 4, torch.float16, torch.device("cpu"))
    with _dense_min_m("8"):
        assert kinds(7) == ["_fields_matmul_kernel"]
        assert kinds(8) == dense
        assert kinds(8, torch.bfloat16) == dense
        assert kinds(8, torch.float32) == ["_fields_matmul_kernel"]
        assert kinds(8, bits=3) == ["_dequant_matmul_kernel"]
        assert kinds(8, bits=1) == dense  # 1-bit fields: the fields kernels' route too
        assert kinds(8, config=KernelConfig("gemm", 16, 32, 32)) == ["_fields_matmul_kernel"]
        monkeypatch.setattr(dq, "DENSE_CHUNK_BYTES", 32 * 96 * 2)  # 32 rows a chunk: 3
        dq._PLANS.clear()
        assert kinds(9) == dense * 3
    dq._PLANS.clear()
    with _dense_min_m("never"):
        assert kinds(5000) == ["_fields_matmul_kernel"]
    for bad in ("0", "many"):
        with _dense_min_m(bad), pytest.raises(ValueError, match="COMPRESS_OPS_DENSE_MIN_M"):
            dq.dense_min_m(torch.device("cpu"))


def test_too_many_scales_is_a_named_error():
    """The GEMM indexes scales and zeros with int32 offsets: 2**31 scales (2**17 rows of 2**19
    columns in 32-column groups; stride-0 views, no memory) are refused by name, not wrapped."""
    n, k, gs = 2**17, 2**19, 32
    q = torch.zeros(1, k * 4 // 32, dtype=torch.int32).expand(n, -1)
    s = torch.ones(1, k // gs, dtype=torch.float16).expand(n, -1)
    x = torch.randn(1, k).to(torch.float16)
    with pytest.raises(ValueError, match="fewer than 2\\*\\*31 scales"):
        dq.dequant_matmul(x, q, s, s, None, 4, gs)
