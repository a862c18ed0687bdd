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

import copy
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
KINDS = ["sparse24", "quant", "codebook", "lowrank", "hashed"]
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
    if kind == "hashed":
        return co.HashedConfig(compression=draw(st.sampled_from([1 / 64, 1 / 8, 0.5])),
                               seed=draw(st.integers(0, 2**32 - 1)),
                               init=draw(st.sampled_from(["dense", "random"])))
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


ACTS = {"relu": nn.ReLU, "relu6": nn.ReLU6, "hardswish": nn.Hardswish, "none": None}


@st.composite
def dwsep_cases(draw, dtype):
    return {
        "dtype": dtype,
        "c": draw(st.integers(2, 12)), "cout": draw(st.integers(1, 12)),  # C = 1: a plain conv
        "hw": (draw(st.integers(1, 9)), draw(st.integers(1, 9))),
        "k": draw(st.sampled_from([3, 5])), "stride": draw(st.sampled_from([1, 2])),
        "acts": (draw(st.sampled_from(list(ACTS))), draw(st.sampled_from(list(ACTS)))),
        "batch": draw(st.integers(0, 2)),
        "poison": draw(st.sampled_from([None, float("nan"), float("inf"), float("-inf")])),
        "seed": draw(st.integers(0, 2**16)),
    }


def _check_dwsep(case: dict) -> None:
    torch.manual_seed(case["seed"])
    c, cout, k = case["c"], case["cout"], case["k"]
    a1, a2 = (ACTS[a]() if ACTS[a] else nn.Identity() for a in case["acts"])
    model = nn.Sequential(nn.Conv2d(c, c, k, case["stride"], k // 2, groups=c),
                          nn.BatchNorm2d(c), a1, nn.Conv2d(c, cout, 1), nn.BatchNorm2d(cout),
                          a2).eval()
    for bn in (model[1], model[4]):  # non-trivial statistics: the fold must be exact
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    ref_model = copy.deepcopy(model).double()
    unfused = copy.deepcopy(model).to(case["dtype"])
    model.to(case["dtype"])
    co.compress_(model, co.DWSepFuseConfig())
    assert isinstance(model[0], co.nn.FusedDWSepConv2d), co.report(model)
    x = torch.randn(case["batch"], c, *case["hw"])
    if case["poison"] is not None and x.numel():
        x[0, torch.randint(c, ()), torch.randint(case["hw"][0], ()),
          torch.randint(case["hw"][1], ())] = case["poison"]
    y = model(x.to(case["dtype"]))
    ref = ref_model(x.double())
    assert y.shape == ref.shape
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(y), finite), "non-finite outputs differ from dense"
    if finite.any():  # as close as the unfused chain in the same dtype, up to rounding
        base = rel_err(unfused(x.to(case["dtype"]))[finite], ref[finite])
        floor = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
        assert rel_err(y[finite], ref[finite]) <= 3 * base + floor[case["dtype"]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_fused_dwsep_is_the_unfused_chain(backend, dtype, monkeypatch):
    """``DWSepFuseConfig`` (a chain config, no ``dense_weight``): the fused model against the
    unfused chain in float64, with folded BatchNorms and every activation pair."""
    monkeypatch.setenv("COMPRESS_OPS_CPU_BACKEND", backend)

    @settings(max_examples=EXAMPLES[backend])
    @given(dwsep_cases(dtype))
    def run(case):
        _check_dwsep(case)

    run()
