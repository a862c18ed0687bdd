"""Benchmark of the fused depthwise + pointwise conv against two separate convolutions.

Kernel name ``dwsep_conv2d``; shape ``{"M": B*Ho*Wo, "N": Cout, "K": C, "B", "H", "W", "k",
"stride"}`` (``M, N, K``: the pointwise GEMM the unit ends in). Every provider is checked
against the unfused result before it is timed.

CUDA (fp16, channels-last, batch 32, the depthwise + project pairs of MobileNetV2 at 224x224:
(H, C, Cout, stride) = (112, 32, 16, 1), (112, 96, 24, 2), (56, 144, 24, 1), (56, 144, 32, 2),
(28, 192, 64, 2), (14, 384, 64, 1), (14, 576, 96, 1), (14, 576, 160, 2), (7, 960, 320, 1)):

* ``cudnn-unfused`` -- ``F.conv2d`` depthwise + bias + ReLU6, then ``F.conv2d`` 1x1 + bias
  (cuDNN, channels-last): the speedup baseline,
* ``compiled-unfused`` -- the same under ``torch.compile`` (inductor may fuse the epilogues),
* ``ours`` -- the op (one fused Triton launch).

Plus one whole-model row each (``kernel = "mobilenet_v2"``): the MobileNetV2-style network of
``compress_ops.archs`` (width 1.0, batch 32, 224x224), compiled, unfused vs fused.

CPU (fp32, batch 1, small shapes): ``unfused`` (two ``F.conv2d``) and ``ours`` (the op, whose
CPU path is the same two convolutions): what the CPU path costs, nothing more.

Roofline: ``2 B Ho Wo C (k^2 + Cout)`` FLOPs; minimum bytes ``e (B H W C + B Ho Wo Cout)``
fused, ``+ 2 e B Ho Wo C`` unfused (``kernels.dwsep_conv.dwsep_bytes``).

    python -m compress_ops.perf.bench_dwsep_conv [--quick] [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from compress_ops.perf import family
from compress_ops.perf.family import logged, time_provider
from compress_ops.perf.machine import Env
from compress_ops.perf.schema import Peaks, Row
from compress_ops.perf.timing import Timer

KERNEL = "dwsep_conv2d"
BASELINES = ("cudnn-unfused", "unfused")

# (H = W of the input, C, Cout, stride), k = 3: MobileNetV2's depthwise + project pairs
MBV2_PAIRS = ((112, 32, 16, 1), (112, 96, 24, 2), (56, 144, 24, 1), (56, 144, 32, 2),
              (28, 192, 64, 2), (14, 384, 64, 1), (14, 576, 96, 1), (14, 576, 160, 2),
              (7, 960, 320, 1))


def cases(device: torch.device, quick: bool) -> tuple[int, torch.dtype, tuple]:
    if device.type == "cuda":
        return 32, torch.float16, MBV2_PAIRS[:3] if quick else MBV2_PAIRS
    return 1, torch.float32, ((16, 32, 16, 1), (16, 48, 24, 2)) if quick else \
        ((56, 144, 24, 1), (28, 192, 64, 2))


def dtypes(device: torch.device, quick: bool = False) -> list[torch.dtype]:
    return [cases(device, quick)[1]]


def run(device: torch.device, env: Env, peaks: Peaks, *, quick: bool = False,
        log: Callable[[str], None] = print) -> Iterator[Row]:
    import compress_ops  # noqa: F401  (registers the ops)
    from compress_ops.kernels.formats.dwsep_conv import dwsep_bytes, output_size

    cuda = device.type == "cuda"
    time_it = Timer.for_run(device, quick)
    batch, dtype, pairs = cases(device, quick)
    e = family.element_size(dtype)
    op = torch.ops.compress_ops.dwsep_conv2d
    gen = torch.Generator(device=device).manual_seed(0)
    cl = torch.channels_last
    for h, c, cout, stride in pairs:
        x = torch.randn(batch, c, h, h, device=device, generator=gen).to(dtype) \
            .contiguous(memory_format=cl)
        dw = (torch.randn(c, 3, 3, device=device, generator=gen) / 3).to(dtype)
        pw = (torch.randn(cout, c, device=device, generator=gen) * c**-0.5).to(dtype)
        dwb = torch.randn(c, device=device, generator=gen).to(dtype)
        pwb = torch.randn(cout, device=device, generator=gen).to(dtype)
        ho, wo = output_size(h, h, 3, stride, (1, 1, 1, 1))

        def unfused(x=x, dw=dw, dwb=dwb, pw=pw, pwb=pwb, stride=stride):
            t = F.relu6(F.conv2d(x, dw[:, None], dwb, stride, 1, groups=x.shape[1]))
            return F.conv2d(t, pw[:, :, None, None], pwb)

        ref = unfused()
        common = dict(kernel=KERNEL, dtype=dtype, env=env, peaks=peaks,
                      shape={"M": batch * ho * wo, "N": cout, "K": c, "B": batch, "H": h,
                             "W": h, "k": 3, "stride": stride},
                      flops=2.0 * batch * ho * wo * c * (9 + cout))
        fused_bytes = dwsep_bytes(batch, h, h, c, cout, 3, stride, (1, 1, 1, 1), e)
        unfused_bytes = dwsep_bytes(batch, h, h, c, cout, 3, stride, (1, 1, 1, 1), e,
                                    fused=False)
        base = "cudnn-unfused" if cuda else "unfused"
        yield logged(log, time_provider(
            unfused, x, ref, time_it, provider=base, min_bytes=unfused_bytes,
            backend="cuda" if cuda else "cpu", note="two convs, channels-last", **common))
        if cuda:
            compiled = torch.compile(unfused)
            yield logged(log, time_provider(
                compiled, x, ref, time_it, provider="compiled-unfused",
                min_bytes=unfused_bytes, backend="cuda", note="torch.compile of the two convs",
                **common))
        yield logged(log, time_provider(
            lambda x=x, dw=dw, dwb=dwb, pw=pw, pwb=pwb, stride=stride: op(
                x, dw, dwb, pw, pwb, None, stride, [1, 1, 1, 1], "relu6", "none"),
            x, ref, time_it, provider="ours", min_bytes=fused_bytes,
            backend="cuda" if cuda else "cpu", note="one launch" if cuda else "CPU path",
            **common))
        del x
    if cuda and not quick:
        yield from _whole_model(device, env, peaks, time_it, log)


def _whole_model(device: torch.device, env: Env, peaks: Peaks, time_it: Timer,
                 log: Callable[[str], None]) -> Iterator[Row]:
    import compress_ops as co
    from compress_ops import archs

    torch.manual_seed(0)
    dense = archs.mobilenet_v2(num_classes=1000).eval()
    fused = co.compress_(copy.deepcopy(dense), co.DWSepFuseConfig())
    cl = torch.channels_last
    dense = dense.to(device=device, dtype=torch.float16, memory_format=cl)
    fused = fused.to(device=device, dtype=torch.float16, memory_format=cl)
    x = torch.randn(32, 3, 224, 224, device=device, dtype=torch.float16) \
        .contiguous(memory_format=torch.channels_last)
    common = dict(kernel="mobilenet_v2", dtype=torch.float16, env=env, peaks=peaks,
                  shape={"M": 32, "N": 1000, "K": 224}, flops=0.0)
    with torch.no_grad():
        c_dense, c_fused = torch.compile(dense), torch.compile(fused)
        ref = c_dense(x)
        yield logged(log, time_provider(
            lambda: c_dense(x), x, ref, time_it, provider="cudnn-unfused", min_bytes=1.0,
            backend="cuda", note="torch.compile, unfused", **common))
        yield logged(log, time_provider(
            lambda: c_fused(x), x, ref, time_it, provider="ours", min_bytes=1.0,
            backend="cuda", note="torch.compile, every dw+pw pair fused", **common))


def main(argv: list[str] | None = None) -> int:
    """Run only this family through :mod:`compress_ops.perf.bench` (same options)."""
    return family.run_alone("dwsep_conv", argv)


if __name__ == "__main__":
    raise SystemExit(main())
