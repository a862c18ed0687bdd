"""``compress_ops.integrations.onnx``: every compressed kind exported with
``torch.onnx.export(dynamo=True)`` and our translation table, run in ONNX Runtime (CPU) against
eager, with a dynamic batch; MatMulNBits for 2/4/8-bit affine weights (their bytes: as stored
for int8, repacked for int2/int4); the warning naming decompressed layers; sizes; named errors.

Few exports (each costs about a second): the kinds run as branches of one model, each branch's
output compared on its own."""

from __future__ import annotations

import os
import warnings

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
import torch  # noqa: E402
from onnx import numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

import compress_ops as co  # noqa: E402
from compress_ops.integrations import onnx as ox  # noqa: E402
from compress_ops.kernels.formats import dequant as dq  # noqa: E402
from compress_ops.nn import (  # noqa: E402
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


class _Residual(nn.Module):
    """A fused unit with its residual input (``forward(x, residual)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.unit = FusedDWSepConv2d(8, 8, 3, 1, 1, act1="hardswish", act2="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(x, x)


def _quant(k: int, n: int, bits: int, group_size: int | None, symmetric: bool,
           seed: int = 0) -> QuantLinear:
    """A QuantLinear holding random fields, scales and fractional zero points (built directly:
    the range search of ``from_dense`` is slow on large layers)."""
    gen = torch.Generator().manual_seed(seed)
    mod = QuantLinear(k, n, bits=bits, group_size=group_size, symmetric=symmetric).eval()
    kp = dq.packed_k(mod.qweight.shape[1], bits)
    q = torch.randint(0, 2**bits, (n, kp), generator=gen, dtype=torch.int32)
    with torch.no_grad():
        mod.qweight.copy_(dq.pack_bits(q, bits))
        mod.scales.copy_(torch.rand(mod.scales.shape, generator=gen) * 0.02 / 2**bits + 1e-4)
        if mod.zeros is not None:
            mod.zeros.copy_(torch.rand(mod.zeros.shape, generator=gen) * (2**bits - 1))
        mod.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return mod


#: linear kinds -> (module builder, in features, what the layer becomes, decompressed?)
LINEAR_KINDS = {
    "int4 g32 K=40": (lambda: QuantLinear.from_dense(_lin(40, 24), bits=4, group_size=32),
                      40, "MatMulNBits", False),
    "int4 whole row K=70": (lambda: QuantLinear.from_dense(_lin(70, 24), bits=4,
                                                           group_size=None),
                            70, "MatMulNBits", False),
    "int8 g128 asym K=300": (lambda: _quant(300, 24, 8, 128, False), 300, "MatMulNBits", False),
    "int2 whole row K=600": (lambda: _quant(600, 16, 2, None, False), 600, "MatMulNBits",
                             False),
    "int3 sym": (lambda: QuantLinear.from_dense(_lin(70, 24), bits=3, group_size=None,
                                                symmetric=True), 70, "MatMul", True),
    "binary": (lambda: QuantLinear.from_dense(_lin(64, 24), bits=1, group_size=32), 64,
               "MatMul", True),
    "codebook": (lambda: CodebookLinear.from_dense(_lin(48, 40), bits=4), 48, "MatMul", True),
    "2:4": (lambda: Sparse24Linear.from_dense(_lin(64, 24)), 64, "MatMul", True),
    "lowrank": (lambda: LowRankLinear.from_dense(_lin(40, 36), rank=8), 40, "MatMul x2",
                False),
    "w8a8 int8": (lambda: W8A8Linear.from_dense(_lin(40, 24)), 40, "MatMulInteger", False),
    "w8a8 int8 static smooth": (
        lambda: W8A8Linear.from_dense(_lin(40, 24), act_scale="static", input_scale=0.03,
                                      smooth_scales=torch.linspace(0.5, 2.0, 40)),
        40, "MatMulInteger", False),
}


class _Residual(nn.Module):
    """A fused unit with its residual input (``forward(x, residual)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.unit = FusedDWSepConv2d(8, 8, 3, 1, 1, act1="hardswish", act2="silu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unit(x, x)


#: conv kinds (input [B, 8, 9, 9]) -> (module builder, what the layer becomes)
CONV_KINDS = {
    "dwsep": (lambda: FusedDWSepConv2d(8, 16), "Conv x2"),
    "dwsep s2 asym pad": (lambda: FusedDWSepConv2d(8, 12, 5, 2, (1, 2, 2, 1), act1="relu",
                                                   act2="relu6"), "Conv x2"),
    "dwsep residual": (_Residual, "Conv x2"),
    "tucker": (lambda: LowRankConv2d.from_dense(nn.Conv2d(8, 12, 3, padding=1), ranks=(4, 4)),
               None),
}


class _Parallel(nn.Module):
    """Every branch on (a slice of) one input, outputs flattened and concatenated: one export
    for many kinds, each branch's output still compared on its own."""

    def __init__(self, branches: dict[str, nn.Module], widths: dict[str, int] | None) -> None:
        super().__init__()
        self.names = list(branches)
        self.branches = nn.ModuleList(branches.values())
        self.widths = [widths[n] for n in self.names] if widths else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = []
        for i, branch in enumerate(self.branches):
            xi = x[..., :self.widths[i]] if self.widths else x
            outs.append(branch(xi).flatten(1))
        return torch.cat(outs, dim=1)

    def split(self, y: torch.Tensor, x: torch.Tensor) -> dict[str, tuple]:
        """Each branch's part of ``y`` and its eager output on ``x``."""
        parts, at = {}, 0
        for i, (name, branch) in enumerate(zip(self.names, self.branches, strict=True)):
            xi = x[..., :self.widths[i]] if self.widths else x
            want = branch(xi).flatten(1)
            parts[name] = (y[:, at:at + want.shape[1]], want)
            at += want.shape[1]
        return parts


def _run(path: str, x: torch.Tensor) -> torch.Tensor:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])


def _export(model: nn.Module, x: torch.Tensor, path: str) -> tuple[ox.OnnxExport, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rec = ox.to_onnx(model, (x,), path)
    return rec, [w for w in caught if issubclass(w.category, UserWarning)
                 and "to_onnx wrote" in str(w.message)]


def _close(got: torch.Tensor, want: torch.Tensor, msg: str = "") -> None:
    want = want.detach().contiguous()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()) + 1e-6,
                               msg=lambda m: f"{msg}: {m}")


def _check_kinds(model: _Parallel, rec: ox.OnnxExport, path: str, shape: tuple[int, ...],
                 becomes: dict[str, str | None]) -> None:
    for batch in (1, 5):  # not the example's batch: the dimension is dynamic
        x = torch.randn(batch, *shape)
        with torch.no_grad():
            for name, (got, want) in model.split(_run(path, x), x).items():
                _close(got, want, name)
    for i, name in enumerate(model.names):
        if becomes[name] is not None:  # the branch, or its submodule (branches.2.unit)
            (what,) = [v for k, v in rec.layers.items()
                       if k == f"branches.{i}" or k.startswith(f"branches.{i}.")]
            assert what.startswith(becomes[name]), name


def test_linear_kinds_match_eager_with_dynamic_batch(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Parallel({n: v[0]() for n, v in LINEAR_KINDS.items()},
                      {n: v[1] for n, v in LINEAR_KINDS.items()}).eval()
    path = str(tmp_path / "linear.onnx")
    rec, warned = _export(model, torch.randn(3, 600), path)
    _check_kinds(model, rec, path, (600,), {n: v[2] for n, v in LINEAR_KINDS.items()})
    want = [f"branches.{i}" for i, v in enumerate(LINEAR_KINDS.values()) if v[3]]
    assert rec.decompressed == want
    (warning,) = warned  # one warning naming every decompressed layer and what it became
    assert "no size gain" in str(warning.message)
    for name in want:
        assert f"{name} ({rec.layers[name]})" in str(warning.message)
    assert {rec.layers[n] for n in want} == {
        "MatMul (decompressed: 3-bit fields)", "MatMul (decompressed: 1-bit fields)",
        "MatMul (decompressed: codebook)", "MatMul (decompressed: 2:4)"}
    assert rec.path == path


def test_conv_kinds_match_eager_with_dynamic_batch(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Parallel({n: v[0]() for n, v in CONV_KINDS.items()}, None).eval()
    path = str(tmp_path / "conv.onnx")
    rec, warned = _export(model, torch.randn(3, 8, 9, 9), path)
    _check_kinds(model, rec, path, (8, 9, 9), {n: v[1] for n, v in CONV_KINDS.items()})
    assert not warned and not rec.decompressed
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert {"Conv", "HardSwish", "Sigmoid", "Clip", "Relu"} <= set(ops)


def test_fp8_w8a8_is_decompressed_with_float_activations(tmp_path) -> None:
    torch.manual_seed(0)
    model = W8A8Linear.from_dense(_lin(40, 24), dtype="fp8").eval()
    path = str(tmp_path / "fp8.onnx")
    rec, warned = _export(model, torch.randn(3, 40), path)
    assert rec.decompressed == ["<root>"] and warned
    x = torch.randn(4, 40)
    dense = x @ model.dense_weight().float().t() + model.bias
    _close(_run(path, x), dense)  # the dense weight, without the activation's e4m3 rounding


def test_fp16_model(tmp_path) -> None:
    torch.manual_seed(0)
    branches = {"int4": QuantLinear.from_dense(_lin(64, 40).half(), bits=4, group_size=32),
                "int8 asym": QuantLinear.from_dense(_lin(64, 24).half(), bits=8, group_size=32),
                "w8a8": W8A8Linear.from_dense(_lin(64, 24).half())}
    model = _Parallel(branches, {n: 64 for n in branches}).eval()
    path = str(tmp_path / "fp16.onnx")
    _export(model, torch.randn(2, 64, dtype=torch.float16), path)
    x = torch.randn(3, 64, dtype=torch.float16)
    with torch.no_grad():
        for name, (got, want) in model.split(_run(path, x), x).items():
            assert got.dtype == torch.float16
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-3,
                                       atol=2e-3 * float(want.float().abs().max()), msg=name)


def _grid_model() -> tuple[nn.Module, list[tuple[int, int, bool]]]:
    """12 QuantLinear layers: bits 2/4/8 x groups 32..256, alternately asymmetric/symmetric,
    with in-features that are not multiples of the group (padded rows)."""
    layers, spec, k = [], [], 300
    for i, (bits, gs) in enumerate((b, g) for b in (2, 4, 8) for g in (32, 64, 128, 256)):
        n = 272 if i % 2 else 264
        layers.append(_quant(k, n, bits, gs, bool(i % 2), seed=i))
        spec.append((bits, gs, bool(i % 2)))
        k = n
    return nn.Sequential(*layers).eval(), spec


def test_matmul_nbits_for_int2_int4_int8_groups_32_to_256(tmp_path) -> None:
    torch.manual_seed(0)
    model, spec = _grid_model()
    path = str(tmp_path / "grid.onnx")
    rec, warned = _export(model, torch.randn(2, 3, 300), path)  # 3-D: [batch, tokens, K]
    assert not warned and not rec.decompressed
    nodes = [n for n in onnx.load(path).graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == len(spec)
    for node, (bits, gs, sym), layer in zip(nodes, spec, model, strict=True):
        attrs = {a.name: a.i for a in node.attribute}
        assert node.domain == "com.microsoft"
        assert (attrs["bits"], attrs["block_size"]) == (bits, gs)
        assert (attrs["K"], attrs["N"]) == (layer.in_features, layer.out_features)
        has_zp = len(node.input) > 3 and node.input[3] != ""
        assert has_zp == (not sym)
    assert set(rec.layers.values()) == {"MatMulNBits"}
    for batch in (1, 6):
        x = torch.randn(batch, 3, 300)
        with torch.no_grad():
            _close(_run(path, x), model(x))


def test_int8_is_written_byte_for_byte_and_int2_int4_are_repacked(tmp_path) -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 96)
    for bits in (2, 4, 8):
        q = torch.randint(0, 2**bits, (16, 128), dtype=torch.int32)
        qweight = dq.pack_bits(q, bits)
        b, same = ox.matmul_nbits_b(qweight, bits, 32)
        assert b.shape == (16, 4, 32 * bits // 8) and b.dtype == torch.uint8
        assert same == (bits == 8)
        per = 8 // bits
        fields = (b.reshape(16, -1, 1).to(torch.int32) >> (bits * torch.arange(per))) & (
            2**bits - 1)
        assert torch.equal(fields.reshape(16, 128), q)  # low-first, K order
        raw = qweight.view(torch.uint8).reshape(b.shape)
        assert torch.equal(raw, b) == (bits == 8)  # format v3 words differ at 2 and 4 bits
    # the int8 initializer in a file is the buffer's bytes
    lin = nn.Linear(96, 16)
    with torch.no_grad():
        lin.weight.copy_(w)
    model = QuantLinear.from_dense(lin, bits=8, group_size=32, symmetric=True).eval()
    path = str(tmp_path / "int8.onnx")
    _export(model, torch.randn(2, 96), path)
    graph = onnx.load(path).graph
    node = next(n for n in graph.node if n.op_type == "MatMulNBits")
    init = {i.name: i for i in graph.initializer}[node.input[1]]
    assert numpy_helper.to_array(init).tobytes() == model.qweight.numpy().tobytes()


def _initializer_bytes(path: str) -> int:
    model = onnx.load(path)
    return sum(numpy_helper.to_array(i).nbytes for i in model.graph.initializer)


def test_file_size_is_the_reported_stored_bytes(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(_quant(512, 512, 4, 128, False), nn.ReLU(),
                          _quant(512, 256, 2, 64, True), nn.ReLU(),
                          _quant(256, 128, 8, 32, True)).eval()
    path = str(tmp_path / "size.onnx")
    _export(model, torch.randn(2, 512), path)
    stored = sum(row.stored_bytes for row in co.report(model))
    biases = sum(m.bias.numel() * 4 for m in model if isinstance(m, QuantLinear))
    # the initializers are exactly the stored tensors (B, scales, zeros) and the biases
    assert _initializer_bytes(path) == stored + biases
    size = os.path.getsize(path)
    assert stored + biases <= size <= stored + biases + 16 * 1024  # graph, names, metadata
    dense = sum(row.dense_bytes for row in co.report(model))
    assert size < 0.25 * dense


def test_int8_fractional_zero_points_stay_exact(tmp_path) -> None:
    torch.manual_seed(0)
    model = _quant(100, 24, 8, 32, False)
    assert not bool((model.zeros == model.zeros.round()).all())  # fractional zero points
    path = str(tmp_path / "zp.onnx")
    _export(model, torch.randn(2, 100), path)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert "MatMulNBits" in ops and "ReduceSum" in ops  # uint8 zero points + the correction
    x = torch.randn(3, 100)
    _close(_run(path, x), model(x))


def test_named_errors(tmp_path) -> None:
    model = QuantLinear.from_dense(_lin(64, 40), bits=4, group_size=32)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match="nn.Module"):
        ox.to_onnx(lambda t: t, (x,), str(tmp_path / "a.onnx"))
    with pytest.raises(ValueError, match=r"\.onnx"):
        ox.to_onnx(model, (x,), str(tmp_path / "a.pt2"))
    with pytest.raises(TypeError, match="path"):
        ox.to_onnx(model, (x,), 3)
    with pytest.raises(FileNotFoundError, match="folder"):
        ox.to_onnx(model, (x,), str(tmp_path / "missing" / "a.onnx"))
    with pytest.raises(TypeError, match="args"):
        ox.to_onnx(model, "x", str(tmp_path / "a.onnx"))
    with pytest.raises(ValueError, match="accuracy_level"):
        ox.to_onnx(model, (x,), str(tmp_path / "a.onnx"), accuracy_level=7)
    assert not os.path.exists(tmp_path / "a.onnx")


def test_hashed_layers_are_written_as_their_virtual_weight(tmp_path) -> None:
    torch.manual_seed(0)
    model = co.nn.HashedLinear.from_dense(_lin(40, 24), compression=1 / 8, seed=77).eval()
    path = str(tmp_path / "hashed.onnx")
    rec, warned = _export(model, torch.randn(3, 40), path)
    assert rec.decompressed == ["<root>"] and warned
    assert rec.layers["<root>"] == "MatMul (decompressed: hashed)"
    x = torch.randn(5, 40)
    _close(_run(path, x), model(x))
