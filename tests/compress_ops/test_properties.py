"""Property test of the whole promise (README, "Guarantees"): for every per-layer config,
activation dtype and CPU backend, ``compress_`` then forward equals ``F.linear(x,
m.dense_weight(), m.bias)`` within the dtype's tolerance, and a NaN or Inf in ``x`` gives
non-finite outputs exactly where that dense reference has them (NaN where it has NaN, for a
NaN input).

Bounded for CI (hypothesis profile ``ci``, ``derandomize=True``; the ``triton`` backend runs
the kernels under the interpreter and draws fewer examples). ``HYPOTHESIS_PROFILE`` and
``COMPRESS_OPS_PROPERTY_EXAMPLES`` raise the counts for a longer fuzz.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compress_ops as co
from tests.kernels.tolerances import rel_err, tol

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["sparse24", "quant", "codebook", "lowrank"]
EXAMPLES = {"reference": int(os.environ.get("COMPRESS_OPS_PROPERTY_EXAMPLES", 25)),
            "triton": int(os.environ.get("COMPRESS_OPS_PROPERTY_EXAMPLES", 8))}


@st.composite
def configs(draw, kind):
    if kind == "sparse24":
        return co.Sparse24Config()
    if kind == "quant":
        return co.QuantConfig(bits=draw(st.sampled_from([8, 4, 3, 2])),
                              group_size=draw(st.sampled_from([32, 64, 128, None])),
                              symmetric=draw(st.booleans()), search_steps=4)
    if kind == "codebook":
        return co.CodebookConfig(bits=draw(st.sampled_from([2, 4])), iters=4)
    return co.LowRankConfig(rank=draw(st.integers(1, 8)))


@st.composite
def cases(draw, kind, dtype):
    return {
        "cfg": draw(configs(kind)),
        "dtype": dtype,
        "k": draw(st.integers(1, 80)),
        "n": draw(st.integers(1, 40)),
        "lead": draw(st.lists(st.integers(0, 3), min_size=1, max_size=2)),
        "bias": draw(st.booleans()),
        "poison": draw(st.sampled_from([None, float("nan"), float("inf"), float("-inf")])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _check(case: dict) -> None:
    torch.manual_seed(case["seed"])
    dtype, k, n = case["dtype"], case["k"], case["n"]
    model = nn.Sequential(nn.Linear(k, n, bias=case["bias"])).to(dtype)
    co.compress_(model, case["cfg"])
    m = model[0]
    if not isinstance(m, co.nn.CompressedModule):  # kept dense: the note says why
        note = {r.name: r.note for r in co.report(model)}["0"]
        assert note, "a layer kept dense without a reason"
        return
    x = torch.randn(*case["lead"], k).to(dtype)
    if case["poison"] is not None and x.numel():
        flat = x.view(-1, k)
        flat[torch.randint(flat.shape[0], ()), torch.randint(k, ())] = case["poison"]
    y = model(x)
    assert y.shape == (*case["lead"], n) and y.dtype == dtype
    w = m.dense_weight().double()
    ref = F.linear(x.double(), w, None if m.bias is None else m.bias.double())
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(y), finite), "non-finite outputs differ from dense"
    if case["poison"] is not None and case["poison"] != case["poison"]:  # a NaN stays NaN
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), "NaN outputs differ from dense"
    # (an Inf may come out as NaN where dense gives ±Inf: a factorization adds ±Inf terms)
    if finite.any():
        assert rel_err(y[finite], ref[finite]) <= tol(dtype, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", ["reference", "triton", "dense-cache"])
def test_compress_then_forward_is_the_dense_reference(backend, kind, dtype, monkeypatch):
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", "triton" if backend == "triton"
                       else "reference")
    monkeypatch.setenv("COMPRESS_OPS_CPU_DENSE_CACHE", "1" if backend == "dense-cache" else "0")

    @settings(max_examples=EXAMPLES["triton" if backend != "reference" else "reference"])
    @given(cases(kind, dtype))
    def run(case):
        _check(case)

    run()
