"""``compress_ops.integrations.export``: torch.export programs and AOTInductor packages of
compressed models, on the CPU; and the fake impls' strides, which an exported graph records."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from compress_ops.integrations import export as ex
from compress_ops.nn import (
    CodebookLinear,
    FusedDWSepConv2d,
    LowRankConv2d,
    LowRankLinear,
    QuantLinear,
    Sparse24Linear,
    W8A8Linear,
)


def _lin(i: int, o: int) -> nn.Linear:
    return nn.Linear(i, o)


#: one module of every kind (the op it calls: its forward's one op), and its input's shape
KINDS = {
    "int4": (lambda: QuantLinear.from_dense(_lin(64, 40), bits=4, group_size=32), (64,)),
    "int3 sym": (lambda: QuantLinear.from_dense(_lin(70, 24), bits=3, group_size=None,
                                                symmetric=True), (70,)),
    "binary": (lambda: QuantLinear.from_dense(_lin(64, 24), bits=1, group_size=32), (64,)),
    "codebook": (lambda: CodebookLinear.from_dense(_lin(48, 40), bits=4), (48,)),
    "2:4": (lambda: Sparse24Linear.from_dense(_lin(64, 24)), (64,)),
    "lowrank": (lambda: LowRankLinear.from_dense(_lin(40, 36), rank=8), (40,)),
    "w8a8 int8": (lambda: W8A8Linear.from_dense(_lin(40, 24)), (40,)),
    "w8a8 fp8": (lambda: W8A8Linear.from_dense(_lin(40, 24), dtype="fp8"), (40,)),
    "dwsep": (lambda: FusedDWSepConv2d(8, 16), (8, 6, 6)),
    "tucker": (lambda: LowRankConv2d.from_dense(nn.Conv2d(8, 12, 3, padding=1), ranks=(4, 4)),
               (8, 6, 6)),
}


def _module(kind: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    build, feat = KINDS[kind]
    return build().eval(), feat


def _inputs(feat: tuple[int, ...]) -> list[torch.Tensor]:
    """Random inputs of a module: 2-D, 3-D (linears), and a non-contiguous view."""
    gen = torch.Generator().manual_seed(1)
    if len(feat) == 1:
        (k,) = feat
        wide = torch.randn(5, 2 * k, generator=gen)
        return [torch.randn(3, k, generator=gen), torch.randn(2, 3, k, generator=gen),
                wide[:, ::2], torch.randn(k, 4, generator=gen).t()]
    big = torch.randn(2, *feat, generator=gen)
    return [big, big.to(memory_format=torch.channels_last)]


@pytest.mark.parametrize("kind", list(KINDS))
def test_fake_impls_give_the_real_outputs_strides(kind):
    """An exported graph records each node's output as its fake impl describes it; the real
    output must have the same shape, dtype and strides (torch 2.13 holds custom ops to exact
    strides), for contiguous, 3-D and non-contiguous inputs."""
    m, feat = _module(kind)
    for x in _inputs(feat):
        with torch.no_grad():
            real = m(x)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fx = mode.from_tensor(x)
            state = {k: mode.from_tensor(v) for k, v in
                     {**dict(m.named_parameters()), **dict(m.named_buffers())}.items()}
            with torch.no_grad():
                fake = torch.func.functional_call(m, state, (fx,))
        assert (fake.shape, fake.dtype, fake.stride()) == (real.shape, real.dtype,
                                                           real.stride()), (kind, x.stride())


@pytest.mark.parametrize("kind", list(KINDS))
def test_export_save_load_runs_as_eager_for_every_batch(kind, tmp_path):
    m, feat = _module(kind)
    x = torch.randn(3, *feat)
    ep = ex.export(m, (x,))
    op_nodes = ex.compress_ops_nodes(ep)
    if kind == "tucker":  # three aten convs, no op of ours
        assert op_nodes == []
    else:
        assert len(op_nodes) == 1, op_nodes
    (ph,) = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "x"]
    assert isinstance(ph.meta["val"].shape[0], torch.SymInt)  # one graph, any batch
    path = tmp_path / "m.pt2"
    ex.save(ep, path)
    loaded = ex.load(path).module()
    for batch in (1, 3, 7):
        xb = torch.randn(batch, *feat)
        with torch.no_grad():
            assert torch.equal(loaded(xb), m(xb)), (kind, batch)


def test_static_batch_and_kwargs_and_named_errors(tmp_path):
    m, _ = _module("int4")
    ep = ex.export(m, torch.randn(2, 64), dynamic_batch=False)
    (ph,) = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "x"]
    assert ph.meta["val"].shape[0] == 2
    kw = ex.export(m, (), {"x": torch.randn(2, 64)})  # keyword inputs get the dynamic batch
    (ph,) = [n for n in kw.graph.nodes if n.op == "placeholder" and n.name == "x"]
    assert isinstance(ph.meta["val"].shape[0], torch.SymInt)
    with pytest.raises(TypeError, match="nn.Module"):
        ex.export(lambda x: x, (torch.randn(2),))
    with pytest.raises(TypeError, match="ExportedProgram"):
        ex.save(m, tmp_path / "m.pt2")
    with pytest.raises(FileNotFoundError, match="no exported program"):
        ex.load(tmp_path / "absent.pt2")
    with pytest.raises(ValueError, match=r"\.pt2"):
        ex.aoti_package(ep, None, tmp_path / "m.so")


def test_a_shared_codebook_stays_one_tensor_of_the_program(tmp_path):
    """Two layers reading one codebook: both op nodes read one graph input, and the program's
    state (exported, then saved and loaded) holds one storage under both names."""
    torch.manual_seed(0)
    a = CodebookLinear.from_dense(_lin(32, 24), bits=4)
    b = CodebookLinear.from_dense(_lin(24, 16), codebook=a.codebook, bits=4)
    model = nn.Sequential(a, nn.ReLU(), b).eval()
    ep = ex.export(model, (torch.randn(3, 32),))
    ex.save(ep, tmp_path / "cb.pt2")
    for prog in (ep, ex.load(tmp_path / "cb.pt2")):
        cb_inputs = [n.args[2] for n in prog.graph.nodes
                     if n.op == "call_function" and "codebook_linear" in str(n.target)]
        assert len(cb_inputs) == 2 and cb_inputs[0] is cb_inputs[1]
        ptrs = {prog.state_dict[k].data_ptr() for k in ("0.codebook", "2.codebook")}
        assert len(ptrs) == 1


def test_load_names_an_op_this_build_lacks(tmp_path):
    """A program calling a compress_ops op this process does not register: MissingOpError
    naming it (torch's loader names no op)."""
    path = tmp_path / "probe.pt2"
    script = textwrap.dedent(f"""
        import sys
        import torch
        from compress_ops.integrations import export as ex

        @torch.library.custom_op("compress_ops::_export_probe", mutates_args=())
        def probe(x: torch.Tensor) -> torch.Tensor:
            return x * 2

        @probe.register_fake
        def _(x):
            return torch.empty_like(x)

        class M(torch.nn.Module):
            def forward(self, x):
                return probe(x) + 1

        ex.save(ex.export(M(), (torch.randn(3, 4),)), {str(path)!r})
    """)
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, timeout=300)
    with pytest.raises(ex.MissingOpError, match="compress_ops::_export_probe"):
        ex.load(path)


@pytest.mark.slow
def test_aoti_package_runs_every_op_on_the_cpu(tmp_path):
    """AOTInductor compiles the aten parts; our ops are called back in this process."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.dw = FusedDWSepConv2d(8, 16)
            self.q = QuantLinear.from_dense(_lin(16, 48), bits=4, group_size=32)
            self.cb = CodebookLinear.from_dense(_lin(48, 64), bits=4)
            self.sp = Sparse24Linear.from_dense(_lin(64, 32))
            self.lr = LowRankLinear.from_dense(_lin(32, 32), rank=8)
            self.w8 = W8A8Linear.from_dense(_lin(32, 16))

        def forward(self, img):
            h = torch.relu(self.dw(img)).mean((2, 3))
            return self.w8(self.lr(self.sp(self.cb(self.q(h)))))

    model = Net().eval()
    pkg = ex.aoti_package(model, (torch.randn(2, 8, 6, 6),), tmp_path / "net.pt2")
    run = ex.aoti_load(pkg)
    for batch in (1, 3):
        img = torch.randn(batch, 8, 6, 6)
        with torch.no_grad():
            torch.testing.assert_close(run(img), model(img), rtol=1e-5, atol=1e-5)
