"""The state_dict records what padding hides (issue 13, item 7): a state_dict saved from a
module of another ``in_features`` (or bit width, group size) that happens to pad to the same
tensor shapes is refused by name, before anything is copied."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import compress_ops as co


def _quant(k, bits=4, group=32):
    torch.manual_seed(0)
    return co.nn.QuantLinear.from_dense(nn.Linear(k, 16), co.QuantConfig(bits, group))


@pytest.mark.parametrize(("src", "dst", "field"), [
    (lambda: _quant(70), lambda: co.nn.QuantLinear(65, 16, bits=4, group_size=32),
     "in_features=70"),
    # 4-bit K = 64 and 2-bit K = 128 pack to the same words and the same scale count
    (lambda: _quant(64, 4, 32), lambda: co.nn.QuantLinear(128, 16, bits=2, group_size=64),
     "bits=4"),
    (lambda: co.nn.CodebookLinear.from_dense(nn.Linear(70, 16)),
     lambda: co.nn.CodebookLinear(66, 16), "in_features=70"),
    (lambda: co.nn.Sparse24Linear.from_dense(nn.Linear(70, 16)),
     lambda: co.nn.Sparse24Linear(69, 16), "in_features=70"),
])
def test_a_state_dict_of_another_true_shape_is_refused(src, dst, field):
    source, target = src(), dst()
    state = source.state_dict()
    for name, t in target.state_dict().items():  # same tensor shapes: only the record differs
        if name != "_extra_state":
            assert t.shape == state[name].shape, name
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=field):
        target.load_state_dict(state, strict=True)
    for k, v in target.state_dict().items():  # refused before anything was copied
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("build", [lambda: _quant(70),
                                   lambda: co.nn.CodebookLinear.from_dense(nn.Linear(70, 16)),
                                   lambda: co.nn.Sparse24Linear.from_dense(nn.Linear(70, 16))])
def test_the_record_round_trips_through_torch_save_and_into_a_model(build):
    m = build()
    model = nn.Sequential(m)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert state["0._extra_state"].dtype == torch.int64  # a tensor: safetensors can hold it
    fresh = nn.Sequential(type(m)(70, 16, **({"bits": 4, "group_size": 32}
                                             if isinstance(m, co.nn.QuantLinear) else {})))
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(3, 70)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_a_state_dict_without_the_record_loads_only_non_strict():
    state = _quant(70).state_dict()
    del state["_extra_state"]
    target = co.nn.QuantLinear(70, 16, bits=4, group_size=32)
    with pytest.raises(RuntimeError, match="_extra_state"):
        target.load_state_dict(state, strict=True)
    target.load_state_dict(state, strict=False)


def test_meta_device_loads_skip_the_value_check():
    """A state_dict loaded with map_location="meta" has no values to compare."""
    state = {k: v.to("meta") for k, v in _quant(70).state_dict().items()}
    target = co.nn.QuantLinear(70, 16, bits=4, group_size=32)
    target.load_state_dict(state, assign=True)
    assert target.qweight.device.type == "meta"


def _as_version(m, version: int) -> dict:
    """``m``'s state_dict as packed-field format ``version`` wrote it: version 1 with the
    fields in column order within each word and a record without ``format_version``; version
    2 with format 2's words (no block permutation) and 2 in the record."""
    from compress_ops.kernels.formats import dequant as dqf
    state = {k: v.clone() for k, v in m.state_dict().items()}
    name = "qweight" if isinstance(m, co.nn.QuantLinear) else "indices"
    q = dqf.unpack_bits(state[name], m.bits)
    state[name] = dqf.pack_bits(q, m.bits, version=version)
    assert state["_extra_state"][-1].item() == dqf.FORMAT_VERSION == 3
    if version == 1:
        state["_extra_state"] = state["_extra_state"][:-1]
    else:
        state["_extra_state"] = state["_extra_state"].clone()
        state["_extra_state"][-1] = version
    return state


def _as_version_1(m) -> dict:
    return _as_version(m, 1)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(("build", "changed"), [
    (lambda: _quant(70, 4, 32), True),
    (lambda: _quant(70, 2, 32), True),
    (lambda: _quant(70, 8, 32), False),  # int8 fields kept their layout
    (lambda: co.nn.CodebookLinear.from_dense(nn.Linear(70, 16), co.CodebookConfig(bits=2)),
     True),
])
def test_an_older_state_dict_loads_by_repacking(build, changed, version):
    """Packed-field format 2 interleaved the 2- and 4-bit fields of a word, format 3 permutes
    each 32-column block of them: a state_dict saved in format 1 (no ``format_version`` in the
    record) or 2 loads into the same weights."""
    m = build()
    old = _as_version(m, version)
    name = "qweight" if isinstance(m, co.nn.QuantLinear) else "indices"
    assert changed == (not torch.equal(old[name], m.state_dict()[name]))
    fresh = type(m)(70, 16, **({"bits": m.bits, "group_size": 32}
                               if isinstance(m, co.nn.QuantLinear) else {"bits": m.bits}))
    fresh.load_state_dict(old, strict=True)
    for k, v in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    x = torch.randn(3, 70)
    torch.testing.assert_close(fresh(x), m(x), rtol=0, atol=0)


def test_an_unknown_or_mismatched_format_version_is_refused_by_name():
    m = _quant(70)
    newer = m.state_dict()
    newer["_extra_state"] = newer["_extra_state"].clone()
    newer["_extra_state"][-1] = 4
    target = co.nn.QuantLinear(70, 16, bits=4, group_size=32)
    with pytest.raises(ValueError, match="format_version=4"):
        target.load_state_dict(newer)
    old = _as_version_1(m)  # a version-1 record of another bit width: refused before repacking
    target2 = co.nn.QuantLinear(140, 16, bits=2, group_size=32)
    with pytest.raises(ValueError, match="in_features=70, out_features=16, bits=4"):
        target2.load_state_dict(old)
