"""``python -m compress_ops demo``: compress a built-in model every supported way, check, time.

Builds a small transformer-style model (its own data, no downloads), applies each compression
family that has landed, checks every compressed layer against the float64 dense reference of
its own effective weight (``F.linear(x, m.dense_weight(), m.bias)``), and prints a table: layer,
dense bytes, stored bytes, ratio, max relative error, eager time, compiled time, device.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops._text import format_table
from compress_ops.nn.base import CompressedLinear


class DemoBlock(nn.Module):
    """Pre-norm transformer block with explicit q/k/v/o projections and a GELU MLP."""

    def __init__(self, d: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm2 = nn.LayerNorm(d)
        self.up = nn.Linear(d, ffn)
        self.down = nn.Linear(ffn, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        h = self.norm1(x)

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        a = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)),
                                           is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class DemoModel(nn.Module):
    def __init__(self, d: int = 256, heads: int = 4, ffn: int = 1024, layers: int = 2,
                 vocab: int = 512) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(DemoBlock(d, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for blk in self.blocks:
            x = blk(x)
        return self.lm_head(self.norm(x))


@dataclass
class Row:
    family: str
    layer: str
    dense_bytes: int
    stored_bytes: int
    max_rel_err: float
    eager_us: float
    compiled_us: float | None
    device: str


def _time_us(fn: Callable[[], object], device: torch.device, reps: int = 20) -> float:
    """Median wall time of ``fn`` in microseconds (synchronising on CUDA)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return 1e6 * times[len(times) // 2]


def _layer_inputs(model: nn.Module, inputs: torch.Tensor,
                  types: tuple[type, ...] = (CompressedLinear,)) -> dict[str, torch.Tensor]:
    """The input every module of ``types`` sees in one forward pass."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.__setitem__(
        name, args[0].detach())) for name, m in model.named_modules()
        if isinstance(m, types)]
    with torch.no_grad():
        model(inputs)
    for h in hooks:
        h.remove()
    return seen


# The families the demo applies: (name, config). Later families add their entries here.
FAMILIES: list[tuple[str, object]] = [
    ("sparse24", co.Sparse24Config()),
    ("int8", co.QuantConfig(bits=8, group_size=None, symmetric=True)),
    ("int4-g128", co.QuantConfig(bits=4, group_size=128)),
    ("int2-g32", co.QuantConfig(bits=2, group_size=32)),
    ("codebook4", co.CodebookConfig(bits=4)),
    ("lowrank-r64", co.LowRankConfig(rank=64)),
    # one 3-bit k-means table shared by every FFN layer of the model, int4 for the rest
    ("cb3-shared-ffn", co.Recipe({
        r"blocks\.\d+\.(up|down)": co.CodebookConfig(bits=3, shared=True),
        r".*": co.QuantConfig(bits=4, group_size=128)})),
]


def run(device: torch.device, dtype: torch.dtype, compile_backend: str | None,
        batch: int, seq: int) -> list[Row]:
    torch.manual_seed(0)
    dense = DemoModel().to(device=device, dtype=dtype).eval()
    tokens = torch.randint(0, 512, (batch, seq), device=device)
    rows: list[Row] = []
    dense_us = _time_us(lambda: dense(tokens), device, reps=5)
    rows.append(Row("dense", "<model>", sum(r.dense_bytes for r in co.report(dense)),
                    sum(r.stored_bytes for r in co.report(dense)), 0.0, dense_us, None,
                    str(device)))
    for family, config in FAMILIES:
        model = co.compress_(copy.deepcopy(dense), config)
        inputs = _layer_inputs(model, tokens)
        modules = dict(model.named_modules())
        for rep_row in co.report(model):
            mod = modules[rep_row.name]
            if not isinstance(mod, CompressedLinear):
                continue
            x = inputs[rep_row.name]
            with torch.no_grad():
                y = mod(x).double()
                b = None if mod.bias is None else mod.bias.double()
                ref = F.linear(x.double(), mod.dense_weight().double(), b)
            err = ((y - ref).abs().max() / ref.abs().max()).item()
            with torch.no_grad():
                us = _time_us(lambda mod=mod, x=x: mod(x), device)
            rows.append(Row(family, rep_row.name, rep_row.dense_bytes, rep_row.stored_bytes,
                            err, us, None, str(device)))
        rep = co.report(model)
        with torch.no_grad():
            eager_us = _time_us(lambda model=model: model(tokens), device, reps=5)
            compiled_us = None
            if compile_backend:
                compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
                out_c, out_e = compiled(tokens), model(tokens)
                if not torch.allclose(out_c.float(), out_e.float(), rtol=1e-2, atol=1e-2):
                    raise RuntimeError(f"{family}: compiled output differs from eager")
                compiled_us = _time_us(lambda c=compiled: c(tokens), device, reps=5)
        rows.append(Row(family, "<model>", rep.dense_bytes, rep.stored_bytes,
                        max((r.max_rel_err for r in rows if r.family == family), default=0.0),
                        eager_us, compiled_us, str(device)))
    rows += run_mobilenet(device, dtype, compile_backend, batch)
    return rows


def run_mobilenet(device: torch.device, dtype: torch.dtype, compile_backend: str | None,
                  batch: int, size: int = 64) -> list[Row]:
    """A MobileNetV2-style network (width 0.35, its first 4 stages, random weights and
    BatchNorm statistics, eval mode) with every depthwise + pointwise pair fused
    (``DWSepFuseConfig``): each fused unit against the float64 reference of its own folded
    weights, the whole model against the unfused one."""
    from compress_ops import archs
    from compress_ops.nn import FusedDWSepConv2d
    from compress_ops.reference import dwsep_conv2d_ref

    torch.manual_seed(0)
    dense = archs.mobilenet_v2(num_classes=100, width=0.35, stages=4)
    for m in dense.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    dense = dense.to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    model = co.compress_(copy.deepcopy(dense), co.DWSepFuseConfig())
    family = "dwsep-mbv2"
    seen = _layer_inputs(model, x, (FusedDWSepConv2d,))
    rows: list[Row] = []
    modules = dict(model.named_modules())
    for name, inp in seen.items():
        mod = modules[name]
        with torch.no_grad():
            y = mod(inp).double()
            ref = dwsep_conv2d_ref(inp, mod.dw_weight, mod.dw_bias, mod.pw_weight, mod.pw_bias,
                                   None, mod.stride, list(mod.padding), mod.act1, mod.act2,
                                   dtype=torch.float64)
            us = _time_us(lambda mod=mod, inp=inp: mod(inp), device)
        err = ((y - ref).abs().max() / ref.abs().max()).item()
        nbytes = mod.stored_weight_bytes()
        rows.append(Row(family, name, nbytes, nbytes, err, us, None, str(device)))
    with torch.no_grad():
        out, ref = model(x).double(), dense(x).double()
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        eager_us = _time_us(lambda: model(x), device, reps=5)
        compiled_us = None
        if compile_backend:
            compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
            if not torch.allclose(compiled(x).float(), model(x).float(), rtol=1e-2, atol=1e-2):
                raise RuntimeError(f"{family}: compiled output differs from eager")
            compiled_us = _time_us(lambda: compiled(x), device, reps=5)
        dense_us = _time_us(lambda: dense(x), device, reps=5)
    nbytes = sum(r.stored_bytes for r in rows)
    rows.append(Row(family, "<unfused model>", nbytes, nbytes, 0.0, dense_us, None,
                    str(device)))
    rows.append(Row(family, "<model vs unfused>", nbytes, nbytes, err, eager_us, compiled_us,
                    str(device)))
    return rows


def format_rows(rows: list[Row]) -> str:
    head = ("family", "layer", "dense B", "stored B", "ratio", "max rel err", "eager us",
            "compiled us", "device")
    body = [(r.family, r.layer, str(r.dense_bytes), str(r.stored_bytes),
             f"{r.stored_bytes / r.dense_bytes:.4f}", f"{r.max_rel_err:.2e}",
             f"{r.eager_us:.1f}", "-" if r.compiled_us is None else f"{r.compiled_us:.1f}",
             r.device) for r in rows]
    return format_table(head, body)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m compress_ops demo", description=__doc__)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="default: float16 on CUDA, float32 on CPU")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend for the compiled column ('none' to skip)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=32)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = _DTYPES[args.dtype] if args.dtype else (
        torch.float16 if device.type == "cuda" else torch.float32)
    backend = None if args.compile_backend == "none" else args.compile_backend
    rows = run(device, dtype, backend, args.batch, args.seq)
    print(f"compress_ops demo: DemoModel(d=256, ffn=1024, 2 blocks) on {device}, {dtype}, "
          f"tokens [{args.batch}, {args.seq}]; errors vs float64 F.linear of each layer's "
          "effective weight; bytes are weights only. dwsep-mbv2: a MobileNetV2-style net "
          f"(width 0.35, 4 stages, input [{args.batch}, 3, 64, 64]) with every depthwise + "
          "pointwise pair fused: each unit vs the float64 reference of its folded weights, "
          "the model vs the unfused model")
    print(format_rows(rows))
    worst = max(r.max_rel_err for r in rows)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    if worst > tol:
        print(f"FAILED: max relative error {worst:.2e} > {tol:.0e}")
        return 1
    print(f"OK: every compressed layer within {tol:.0e} of its float64 reference")
    return 0
