"""torch.compile of compressed models: no graph breaks, eager parity, no recompile per batch."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import compress_ops as co

from .models import MLP, Block


def _compressed(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    return co.compress_(model, co.Sparse24Config()).eval()


@pytest.fixture(autouse=True)
def _reset_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("make", [MLP, Block], ids=["mlp", "block"])
def test_fullgraph_aot_eager_matches_eager(op_device, make):
    model = _compressed(make()).to(op_device)
    x = torch.randn(2, 8, 64, device=op_device)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_fullgraph_inductor_matches_eager_with_grad():
    model = _compressed(Block())
    x = torch.randn(2, 8, 64, requires_grad=True)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()  # the activation gradient flows through the op's autograd
    g = x.grad.clone()
    x.grad = None
    model(x).sum().backward()
    torch.testing.assert_close(g, x.grad, rtol=1e-4, atol=1e-4)


def test_marked_dynamic_batch_compiles_once():
    model = _compressed(MLP())
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
