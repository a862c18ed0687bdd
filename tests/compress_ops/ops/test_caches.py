"""Every CPU cache serves only what the weights give now (issue 13, item 1).

The cached routes: the native int4 packing (bf16 activations up to the crossover M; fp32 under
``COMPRESS_OPS_CPU_FP32_VIA_BF16=1``; int2 and int3 weights too) and the opt-in dense copy
(``COMPRESS_OPS_CPU_DENSE_CACHE=1``) of every family. Each edit pattern users have must reach
the output on the next call: in-place ops through ``.data`` (which do not bump the
version counter), ``copy_``, ``set_``, ``.data =`` swaps, optimizer steps and
``load_state_dict``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.ops import dequant_cpu_route, routing


def _quant(dtype, bits=4, group=128, sym=False):
    torch.manual_seed(0)
    return co.nn.QuantLinear.from_dense(nn.Linear(256, 64).to(dtype),
                                        co.QuantConfig(bits, group, sym))


def _codebook(dtype):
    torch.manual_seed(1)
    return co.nn.CodebookLinear.from_dense(nn.Linear(96, 32).to(dtype), co.CodebookConfig(4))


def _sparse(dtype):
    torch.manual_seed(2)
    return co.nn.Sparse24Linear.from_dense(nn.Linear(96, 32).to(dtype))


# (name, builder, dtype, dense cache on, the tensor the edits change)
CASES = [
    ("native-int4 bf16", lambda: _quant(torch.bfloat16), False, "scales"),
    ("native-int4 bf16 qweight", lambda: _quant(torch.bfloat16), False, "qweight"),
    ("native-int4 bf16 zeros", lambda: _quant(torch.bfloat16), False, "zeros"),
    ("native-int4-via-bf16 fp32 M=1", lambda: _quant(torch.float32), False, "scales"),
    ("native-int4 bf16 int2 qweight", lambda: _quant(torch.bfloat16, 2), False, "qweight"),
    ("native-int8 bf16", lambda: _quant(torch.bfloat16, 8, None, True), False, "scales"),
    ("dense-cache quant", lambda: _quant(torch.float32), True, "scales"),
    ("dense-cache codebook", lambda: _codebook(torch.float32), True, "codebook"),
    ("dense-cache 2:4 values", lambda: _sparse(torch.float32), True, "values"),
]


def _edit(m: nn.Module, name: str, how: str) -> None:
    t = getattr(m, name)
    if t.dtype == torch.int32:  # packed words: a different valid pattern, same shape
        new = torch.roll(t, 1, 0)
    else:
        new = t * 1.5 + 0.25 if name != "scales" else t * 1.5
    if how == "data-op":
        t.data.mul_(0).add_(new)
    elif how == "data-copy":
        t.data.copy_(new)
    elif how == "copy":
        with torch.no_grad():
            t.copy_(new)
    elif how == "set":
        with torch.no_grad():
            t.set_(new.clone())
    elif how == "data-swap":
        t.data = new.clone()
    elif how == "load_state_dict":
        state = copy.deepcopy(m.state_dict())
        state[name] = new
        m.load_state_dict(state)
    else:
        raise AssertionError(how)


def _out(m, x):
    return m(x).double()


def _ref(m, x):
    return F.linear(x.double(), m.dense_weight().double(),
                    None if m.bias is None else m.bias.double())


@pytest.mark.parametrize("how", ["data-op", "data-copy", "copy", "set", "data-swap",
                                 "load_state_dict"])
@pytest.mark.parametrize(("case", "build", "cache", "name"), CASES, ids=[c[0] for c in CASES])
def test_no_edit_leaves_a_stale_cache(monkeypatch, case, build, cache, name, how):
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "reference")
    monkeypatch.setenv("COMPRESS_OPS_CPU_DENSE_CACHE", "1" if cache else "0")
    monkeypatch.setenv("COMPRESS_OPS_CPU_FP32_VIA_BF16", "1" if "via-bf16" in case else "0")
    m = build()
    dtype = m.bias.dtype
    x = torch.randn(1, m.in_features).to(dtype)
    if case.startswith("native"):
        assert dequant_cpu_route(x, m.qweight, m.zeros, m.bits, m.group_size) == case.split()[0]
    tol = 2e-2 if dtype == torch.bfloat16 or "via-bf16" in case else 1e-5
    before = _out(m, x)  # builds the cache (where the route has one)
    _edit(m, name, how)
    after, ref = _out(m, x), _ref(m, x)
    assert not torch.allclose(after, before), "the edit changed nothing: the test is void"
    assert ((after - ref).norm() / ref.norm()).item() < tol


def test_optimizer_step_reaches_a_cached_parameter(monkeypatch):
    """A codebook trained as a Parameter (fine-tuning the shared values) with the dense cache."""
    monkeypatch.setenv("COMPRESS_OPS_CPU_DENSE_CACHE", "1")
    m = _codebook(torch.float32)
    cb = m.codebook
    del m.codebook
    m.codebook = nn.Parameter(cb.clone())
    x = torch.randn(4, m.in_features)
    opt = torch.optim.SGD([m.codebook], lr=0.5)
    before = m(x).detach()
    m(x).square().sum().backward()
    opt.step()
    after = m(x).detach()
    ref = F.linear(x, m.dense_weight().detach(), m.bias.detach())
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)


def test_cache_hit_serves_the_same_object(monkeypatch):
    """The check must not defeat the cache: unchanged weights reuse the derived object."""
    m = _quant(torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    m(x)
    key = ("native-int4", id(m.qweight))
    first = routing.DERIVED[key][3]
    m(x)
    assert routing.DERIVED[key][3] is first


def test_nan_weights_do_not_rebuild_forever(monkeypatch):
    """The snapshot compares bits, so a NaN scale still hits (NaN != NaN as floats)."""
    m = _quant(torch.bfloat16)
    m.scales.data[0, 0] = float("nan")
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    y = m(x)
    first = routing.DERIVED[("native-int4", id(m.qweight))][3]
    m(x)
    assert routing.DERIVED[("native-int4", id(m.qweight))][3] is first
    assert y[0, 0].isnan() and y[0, 1:].isfinite().all()
