"""``torch.compile(model, backend="compress_ops")``, ``explain`` and ``install``
(compress_ops/integrations/compile.py), on the CPU with ``options={"cpu": True}``."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch
import torch._dynamo
from torch import nn
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch._inductor.utils import run_and_get_code

import compress_ops.integrations.compile as cc

from ..compress_ops.models import random_bn
from ..compress_ops.test_real_models import MODELS

CPU = {"cpu": True}


class _Net(nn.Module):
    """Two chains (one behind a ZeroPad2d, stride 2), a residual, a chain with a functional
    activation it cannot hold, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.pad = nn.ZeroPad2d((0, 1, 0, 1))
        self.dw1, self.bn1 = nn.Conv2d(8, 8, 3, 2, groups=8), nn.BatchNorm2d(8)
        self.act1, self.pw1, self.bn2 = nn.Hardswish(), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)
        self.dw2, self.pw2 = nn.Conv2d(16, 16, 5, padding=2, groups=16), nn.Conv2d(16, 16, 1)
        self.act2 = nn.ReLU6()
        self.dw3, self.pw3 = nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        x = self.bn2(self.pw1(self.act1(self.bn1(self.dw1(self.pad(x))))))
        x = x + self.act2(self.pw2(self.dw2(x)))
        x = self.pw3(torch.sigmoid(self.dw3(x)))
        return self.head(x.mean((2, 3)))


def _net() -> nn.Module:
    torch.manual_seed(0)
    return random_bn(_Net()).eval()


def _ran_fused_op(code: list[str]) -> bool:
    return any("compress_ops.dwsep_conv2d" in c for c in code)


def test_registered_on_import_and_through_the_entry_point():
    assert cc.BACKEND in torch._dynamo.list_backends()
    eps = entry_points(group="torch_dynamo_backends")
    assert eps[cc.BACKEND].value == "compress_ops.integrations.compile:compress_ops_backend"
    # a fresh interpreter that never imports the module: Dynamo loads it from the entry point
    code = ("import torch._dynamo as d; f = d.lookup_backend('compress_ops'); "
            "print(f.__module__, f.__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["compress_ops.integrations.compile", "compress_ops_backend"]


def test_backend_fuses_on_request_matches_eager_with_one_compile_for_any_batch():
    model = _net()
    x = torch.randn(2, 8, 11, 11)
    with torch.no_grad():
        ref = model(x)
        calls = []

        def counting(gm, example_inputs):
            calls.append(1)
            return cc.compress_ops_backend(gm, example_inputs, options=CPU)

        torch._dynamo.reset()
        compiled = torch.compile(model, backend=counting, fullgraph=True)
        x_dyn = x.clone()
        torch._dynamo.mark_dynamic(x_dyn, 0)
        y, code = run_and_get_code(compiled, x_dyn)
        assert _ran_fused_op(code)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
        x3 = torch.randn(3, 8, 11, 11)
        torch.testing.assert_close(compiled(x3), model(x3), rtol=1e-4, atol=1e-5)
        assert len(calls) == 1  # one graph for every batch size


def test_mode_and_options_go_to_inductor_and_bad_options_are_named(monkeypatch):
    import torch._inductor.compile_fx as compile_fx_module

    seen = {}

    def fake_compile_fx(gm, example_inputs, config_patches=None):
        seen.update(config_patches)
        return gm.forward

    monkeypatch.setattr(compile_fx_module, "compile_fx", fake_compile_fx)
    model, x = _net(), torch.randn(1, 8, 11, 11)
    torch._dynamo.reset()
    torch.compile(model, backend="compress_ops", mode="reduce-overhead")(x)
    assert seen["triton.cudagraphs"] is True  # what mode="reduce-overhead" means to Inductor
    assert isinstance(seen["pre_grad_custom_pass"], cc.CompressOpsPass)
    assert seen["pre_grad_custom_pass"].cpu is False
    seen.clear()
    torch._dynamo.reset()
    torch.compile(model, backend="compress_ops", options={"cpu": True, "max_autotune": True})(x)
    assert seen["max_autotune"] is True and "cpu" not in seen
    assert seen["pre_grad_custom_pass"].cpu is True
    for bad, match in (({"cpu": "yes"}, "must be a bool"), (["cpu"], "must be a dict")):
        torch._dynamo.reset()
        with pytest.raises(Exception, match=match):
            torch.compile(model, backend="compress_ops", options=bad)(x)


def test_explain_lists_what_is_rewritten_and_why_the_rest_is_left():
    model = _net()
    x = torch.randn(1, 8, 11, 11)
    e = cc.explain(model, x, options=CPU)
    assert [r.split(":")[0] for r in e.rewritten] == ["dw1", "dw2"]
    assert "3x3 depthwise (stride 2) + hardswish + 1x1 -> 16 + none" in e.rewritten[0]
    assert "5x5 depthwise (stride 1) + none + 1x1 -> 16 + relu6" in e.rewritten[1]
    assert len(e.left) == 1 and e.left[0].startswith("dw3: no 1x1 conv reads its output")
    assert "sigmoid" in e.left[0]
    assert "2 rewritten, 1 left, 1 graph(s)" in str(e)
    e = cc.explain(model, x)  # the CPU without the option: nothing, with the reason
    assert e.rewritten == [] and all("options={'cpu': True}" in r for r in e.left[:2])
    assert isinstance(model.dw1, nn.Conv2d)  # the model itself is never changed


class _Recording(CustomGraphPass):
    def __init__(self, uuid="prev-1") -> None:
        self.calls, self._uuid = 0, uuid

    def __call__(self, graph) -> None:
        self.calls += 1

    def uuid(self):
        return self._uuid


def test_install_chains_a_previous_pass_with_a_stable_uuid():
    model = _net()
    x = torch.randn(2, 8, 11, 11)
    prev = _Recording()
    with inductor_config.patch(pre_grad_custom_pass=prev), torch.no_grad():
        p = cc.install(cpu=True)
        assert inductor_config.pre_grad_custom_pass is p and p.previous is prev
        assert cc.install(cpu=True).previous is prev  # installing twice: one pass
        torch._dynamo.reset()
        y, code = run_and_get_code(torch.compile(model), x)  # backend="inductor"
        assert _ran_fused_op(code) and prev.calls == 1
        torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5)
        cc.uninstall(inductor_config.pre_grad_custom_pass)
        assert inductor_config.pre_grad_custom_pass is prev
    a, b = cc.CompressOpsPass(True, prev), cc.CompressOpsPass(True, _Recording())
    assert a.uuid() == b.uuid() and len(a.uuid()) == 64
    assert a.uuid() != cc.CompressOpsPass(False, prev).uuid()
    assert a.uuid() != cc.CompressOpsPass(True, _Recording("prev-2")).uuid()
    assert cc.CompressOpsPass(True, lambda g: None).uuid() is None  # cannot be cached


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_real_models_rewrite_every_exact_chain_and_match_eager(name):
    """The rewritten Dynamo graphs run eagerly (Inductor's CPU compile of a whole convnet is
    too slow for CI; the small model above goes through Inductor): every chain fusable on the
    traced shapes is rewritten, SE chains are left with the reason, outputs equal eager."""
    build, n_dw, _, n_fixed, _ = MODELS[name]
    torch.manual_seed(0)
    model = random_bn(build()).eval()
    x = torch.randn(2, 3, 64, 64)
    seen = {"rewritten": [], "left": []}

    def backend(gm, example_inputs):
        rewritten, left = cc.rewrite(gm.graph, cpu=True)
        gm.recompile()
        seen["rewritten"] += rewritten
        seen["left"] += left
        return gm.forward

    with torch.no_grad():
        ref = model(x)
        torch._dynamo.reset()
        y = torch.compile(model, backend=backend)(x)
    # Dynamo specializes the TF "same" padding on the traced shape and guards it, so every
    # chain export fuses with fix_input_size=True is rewritten here by default
    assert len(seen["rewritten"]) == n_fixed, seen
    assert len(seen["rewritten"]) + len(seen["left"]) == n_dw
    assert all("squeeze-excite" in r for r in seen["left"]), seen["left"]
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-5


class _QKV(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(64, 64) for _ in range(4))

    def forward(self, x):
        return self.o(self.q(x) * self.k(x) + self.v(x))


def test_low_bit_linears_sharing_an_input_run_as_one_launch_where_weights_are_frozen():
    import compress_ops as co

    torch.manual_seed(0)
    model = _QKV().eval()
    co.compress_(model, co.QuantConfig(bits=4, group_size=32))
    x = torch.randn(2, 5, 64)
    e = cc.explain(model, x)  # weights are graph inputs: a merge would copy them every call
    assert e.rewritten == [] and len(e.left) == 1 and "freezing = True" in e.left[0]
    assert e.left[0].startswith("q, k, v: 3 dequant_linear calls on one input")
    with torch.no_grad(), inductor_config.patch(freezing=True):
        ref = model(x)
        e = cc.explain(model, x)
        assert e.rewritten == ["q, k, v: 3 dequant_linear calls (int4, g32) on one input -> "
                               "one call, N = 192"]
        torch._dynamo.reset()
        y, code = run_and_get_code(torch.compile(model, backend="compress_ops"), x)
    calls = sum(c.count("compress_ops.dequant_linear.default(") for c in code)
    assert calls == 2  # q/k/v merged, and o
    assert not any("cpp_fused_cat" in c for c in code)  # the concatenation was folded once
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


def test_batchnorm_fold_runs_per_call_unless_weights_are_frozen():
    """The fold is in the graph (a later load_state_dict is never served stale weights); with
    Inductor's freezing the weights are constants and the fold is computed once."""
    model, x = _net(), torch.randn(2, 8, 11, 11)
    kernels = {}
    for freezing in (False, True):
        with torch.no_grad(), inductor_config.patch(freezing=freezing):
            torch._dynamo.reset()
            y, code = run_and_get_code(
                torch.compile(model, backend="compress_ops", options=CPU), x)
            torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-5)
        src = "\n".join(code)
        kernels[freezing] = src[src.index("def call("):].count("rsqrt")
    assert kernels[False] > 0 and kernels[True] == 0


def test_a_padding_computed_from_dynamic_sizes_stays_in_front_and_dynamic_true_is_named():
    """TF "same" padding computed per call (efficientnet-pytorch's dynamic conv) with dynamic
    H and W: one graph, the pad stays a symbolic op before the fused unit, equal to eager at
    every size. torch.compile(dynamic=True) also makes BatchNorm's eps a graph input: that
    chain is left, with the reason."""
    from ..compress_ops.test_fuse_export import Conv2dDynamicSamePadding, MBConv

    torch.manual_seed(0)
    model = random_bn(MBConv(Conv2dDynamicSamePadding, stride=2))
    seen: list = []

    def backend(gm, example_inputs):
        seen.append(cc.rewrite(gm.graph, cpu=True))
        gm.recompile()
        return gm.forward

    with torch.no_grad():
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        for hw in (12, 13, 16, 15):
            x = torch.randn(2, 8, hw, hw)
            torch._dynamo.mark_dynamic(x, 2)
            torch._dynamo.mark_dynamic(x, 3)
            torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        assert len(seen) == 1 and len(seen[0][0]) == 1 and seen[0][1] == []
        seen.clear()
        torch._dynamo.reset()
        torch.compile(model, backend=backend, dynamic=True)(torch.randn(2, 8, 12, 12))
    assert seen[0][0] == [] and "eps of batch_norm" in seen[0][1][0]
    assert "not a constant in this graph" in seen[0][1][0]
