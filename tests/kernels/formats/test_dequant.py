"""kernels/formats/dequant.py: b-bit packing, the documented bit layout, group-size padding."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compress_ops.kernels.formats import dequant as dqf


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@given(n=st.integers(1, 9), blocks=st.integers(1, 5), bits=st.sampled_from(dqf.BITS),
       seed=st.integers(0, 2**16))
def test_pack_unpack_round_trip(n, blocks, bits, seed):
    q = torch.randint(0, 2**bits, (n, 32 * blocks), generator=_gen(seed))
    packed = dqf.pack_bits(q, bits)
    assert packed.shape == (n, blocks * bits) and packed.dtype == torch.int32
    assert torch.equal(dqf.unpack_bits(packed, bits), q.to(torch.int32))
    k = 32 * blocks - 5
    assert torch.equal(dqf.unpack_bits(packed, bits, k), q[:, :k].to(torch.int32))


def test_bit_layout_is_the_documented_layout():
    q = torch.arange(32).reshape(1, 32) % 16
    # format 2: word u holds columns 8u + (0 2 4 6 1 3 5 7) in fields 0..7: word 0 = 0x75316420,
    # so (word >> 4p) & 0x000F000F is columns 2p, 2p + 1 in the two 16-bit halves
    w4v2 = dqf.pack_bits(q, 4, version=2)
    assert w4v2[0, 0].item() == 0x75316420
    for p in range(4):
        pair = (w4v2[0, 0].item() >> (4 * p)) & 0x000F000F
        assert (pair & 0xFFFF, pair >> 16) == (2 * p, 2 * p + 1)
    assert dqf.field_columns(2) == (0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)
    assert dqf.field_columns(4, version=1) == tuple(range(8))
    # format 3: version 2's words, each 32-column block permuted: pair slot s = 4t + 2j + c
    # (word s // (16 / b), pair s % (16 / b)) holds columns 16j + 8c + 2t (+ 1): int4 word t of
    # a block is the columns thread t of an mma quad holds (2t, 2t+1, 2t+8, 2t+9, +16 ...)
    assert dqf.FORMAT_VERSION == 3 and dqf.OLDER_VERSIONS == (1, 2)
    assert dqf.block_columns(4)[:8] == (0, 1, 8, 9, 16, 17, 24, 25)
    assert dqf.block_columns(2) == dqf.block_columns(4)
    assert dqf.block_columns(8) == tuple(range(32)) == dqf.block_columns(4, version=2)
    w4 = dqf.pack_bits(q, 4)
    for t in range(4):
        for p in range(4):
            pair = (w4[0, t].item() >> (4 * p)) & 0x000F000F
            col = 16 * (p >> 1) + 8 * (p & 1) + 2 * t
            assert (pair & 0xFFFF, pair >> 16) == (col % 16, (col + 1) % 16)
    q2 = torch.arange(32).reshape(1, 32) % 4
    w2 = dqf.pack_bits(q2, 2)
    for word in range(2):
        for p in range(8):
            slot = 8 * word + p
            col = 16 * ((slot >> 1) & 1) + 8 * (slot & 1) + 2 * (slot >> 2)
            pair = (w2[0, word].item() >> (2 * p)) & 0x00030003
            assert (pair & 0xFFFF, pair >> 16) == (col % 4, (col + 1) % 4)
    # version 1 (column c in field c % 8): word 0 = 0x76543210; repack converts 1 and 2
    w4v1 = dqf.pack_bits(q, 4, version=1)
    assert w4v1[0, 0].item() == 0x76543210
    assert torch.equal(dqf.unpack_bits(w4v1, 4, version=1), q.int())
    assert torch.equal(dqf.unpack_bits(w4v2, 4, version=2), q.int())
    assert torch.equal(dqf.repack(w4v1, 4, 1), w4)
    assert torch.equal(dqf.repack(w4v2, 4, 2), w4)
    assert dqf.repack(w4, 4, 3) is w4
    w8 = dqf.pack_bits(torch.arange(32).reshape(1, 32) + 200, 8)
    assert dqf.repack(w8, 8, 1) is w8  # int8 and 3-bit layouts did not change
    assert dqf.repack(w8, 8, 2) is w8
    with pytest.raises(ValueError, match="unknown packed-field format version 4"):
        dqf.repack(w4, 4, 4)
    q8 = torch.arange(32).reshape(1, 32) + 200
    assert torch.equal(dqf.pack_bits(q8, 8).view(torch.uint8)[0], q8[0].to(torch.uint8))
    q3 = torch.zeros(1, 32, dtype=torch.int64)
    q3[0, 5] = 0b101
    q3[0, 31] = 0b010
    w3 = dqf.pack_bits(q3, 3)[0].tolist()  # planes: bit p of column i at word p, bit i
    assert w3 == [1 << 5, -(2**31), 1 << 5]


def test_pack_rejects_out_of_range_and_bad_bits():
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        dqf.pack_bits(torch.full((2, 32), 16), 4)
    with pytest.raises(ValueError, match="multiple of 32"):
        dqf.pack_bits(torch.zeros(2, 40, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match="bits must be one of"):
        dqf.pack_bits(torch.zeros(2, 32, dtype=torch.int64), 5)


def test_group_size_padding_rules():
    assert dqf.effective_group_size(100, None) == 128 and dqf.padded_k(100, None) == 128
    assert dqf.effective_group_size(100, 128) == 128  # one group: the padded row
    assert dqf.effective_group_size(300, 128) == 128 and dqf.padded_k(300, 128) == 384
    assert dqf.effective_group_size(70, 32) == 32 and dqf.padded_k(70, 32) == 96
    with pytest.raises(ValueError, match="group_size must be one of"):
        dqf.effective_group_size(300, 48)
    # int4 g128 with fp16 scales and zeros: <= 0.27 of fp16
    assert dqf.affine_bytes(4096, 4096, 4, 128, torch.float16) <= 0.27 * 4096 * 4096 * 2
