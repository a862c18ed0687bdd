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
    w4 = dqf.pack_bits(q, 4)
    # column c -> word c // 8, bits 4 (c % 8): word 0 = 0x76543210
    assert w4[0, 0].item() == 0x76543210
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
