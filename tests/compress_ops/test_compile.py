"""torch.compile of compressed models: no graph breaks, eager parity, no recompile per batch."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import compress_ops as co

from .models import MLP, Block

FAMILIES = {
    "sparse24": co.Sparse24Config(),
    "int4": co.QuantConfig(bits=4, group_size=32),
    "int8sym": co.QuantConfig(bits=8, group_size=None, symmetric=True),
    "codebook": co.CodebookConfig(bits=3),
    "lowrank": co.LowRankConfig(rank=16),
    "w8a8": co.W8A8Config(),
    "w8a8fp8": co.W8A8Config(dtype="fp8"),
    "hashed": co.HashedConfig(compression=1 / 8),
}


def _compressed(model: torch.nn.Module, family: str = "sparse24") -> torch.nn.Module:
    torch.manual_seed(0)
    return co.compress_(model, FAMILIES[family]).eval()


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("make", [MLP, Block], ids=["mlp", "block"])
def test_fullgraph_aot_eager_matches_eager(op_device, make, family):
    model = _compressed(make(), family).to(op_device)
    x = torch.randn(2, 8, 64, device=op_device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sparse24", "int4", "codebook", "lowrank", "w8a8",
                                    "hashed"])
def test_fullgraph_inductor_matches_eager_with_grad(family):
    model = _compressed(Block(), family)
    x = torch.randn(2, 8, 64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()  # the activation gradient flows through the op's autograd
    g = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_marked_dynamic_batch_compiles_once(family):
    model = _compressed(MLP(), family)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for m in (3, 17, 64):
        x = torch.randn(m, 64)
        torch._dynamo.mark_dynamic(x, 0)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


def test_automatic_dynamic_does_not_recompile_per_batch_size():
    model = _compressed(Block())
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    with torch.no_grad():
        for m in (2, 3, 5, 7):
            compiled(torch.randn(m, 8, 64))
    assert counter.frame_count <= 2  # one static graph, then one dynamic graph for all M


@pytest.mark.parametrize("family", ["int4", "codebook"])
def test_the_traced_op_carries_the_packed_format_version(family):
    """The modules pass the packed-field layout's version to their op, so it is in every traced
    graph and so in torch.compile's cache keys: a graph cached under another layout (whose
    backward decoded the fields differently: AOTAutograd's key does not cover a custom op's
    autograd formula, pytorch/pytorch#144344) is not reused."""
    from compress_ops.kernels.formats.dequant import FORMAT_VERSION
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm

    model = _compressed(MLP(), family)
    torch.compile(model, backend=backend, fullgraph=True)(torch.randn(2, 64))
    name = "dequant_linear" if family == "int4" else "codebook_linear"
    calls = [n for g in graphs for n in g.graph.nodes if name in str(n.target)]
    assert len(calls) == 3
    assert all(list(n.args) + list(n.kwargs.values()) and
               (list(n.args) + list(n.kwargs.values()))[-1] == FORMAT_VERSION for n in calls)


def test_the_ops_refuse_another_packed_format_version_by_name():
    m = _compressed(MLP(), "int4").fc1
    x = torch.randn(2, 64)
    args = (x, m.qweight, m.scales, m.zeros, m.bias, m.bits, m.group_size)
    torch.testing.assert_close(torch.ops.compress_ops.dequant_linear(*args), m(x))
    with pytest.raises(ValueError, match="packed-field format version 1 is not this build's"):
        torch.ops.compress_ops.dequant_linear(*args, 1)
    cb = _compressed(MLP(), "codebook").fc1
    with pytest.raises(ValueError, match="codebook_linear: packed-field format version 4"):
        torch.ops.compress_ops.codebook_linear(x, cb.indices, cb.codebook, cb.bias, cb.bits, 4)
