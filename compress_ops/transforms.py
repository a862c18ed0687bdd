"""The transforms: how each per-layer config turns a dense module into a compressed one.

Each transform reads the module, checks what its family cannot take (raising
:class:`~compress_ops.configs.UnsupportedModule` with the reason), unpacks the config's fields
into the module's ``from_dense`` and registers itself for its config type
(:func:`~compress_ops.configs.register_transform`). ``compress_``, ``prepare_qat`` and ``plan``
find them through :func:`~compress_ops.configs.transform_for`; importing ``compress_ops``
imports this module.
"""

from __future__ import annotations

import torch
from torch import nn

from compress_ops._linear import LINEAR_TYPES, is_conv1d, plain_linear
from compress_ops.configs import (
    CodebookConfig,
    HashedConfig,
    LowRankConfig,
    QuantConfig,
    SharedFilterConfig,
    Sparse24Config,
    TernaryConfig,
    UnsupportedModule,
    W8A8Config,
    register_transform,
)
from compress_ops.kernels.formats.hashed import buckets_for
from compress_ops.kernels.formats.w8a8 import QDTYPES, QMAX
from compress_ops.nn.base import check_compute_dtype
from compress_ops.nn.dequant import TERNARY_NOTE, CodebookLinear, QuantLinear
from compress_ops.nn.hashed import HashedLinear
from compress_ops.nn.lowrank import LowRankConv2d, LowRankLinear
from compress_ops.nn.shared_conv import SharedFilterConv2d, shared_filter_count
from compress_ops.nn.sparse24 import Sparse24Linear
from compress_ops.nn.w8a8 import W8A8Linear
from compress_ops.quantize import check_hessian, fit_codebook, gptq_affine, quantize_absmean
from compress_ops.sparsify import sparsegpt_2to4, wanda_2to4

__all__ = ["plain_linear", "shared_codebook"]


def shared_codebook(modules: list[nn.Module], config: CodebookConfig) -> dict[int, dict]:
    """Shared codebooks: one k-means table over every layer the config compresses
    (``{id(layer): {"codebook": table}}``; nothing unless ``config.shared``)."""
    if not config.shared:
        return {}
    linears = [plain_linear(m) for m in modules
               if type(m) is nn.Linear or is_conv1d(m, exact=True)]
    kinds = {(m.weight.dtype, m.weight.device) for m in linears}
    if len(kinds) > 1:
        raise UnsupportedModule(f"a shared codebook needs one dtype and device, got {kinds}")
    if not linears:
        return {}
    cb = fit_codebook([m.weight.detach() for m in linears], config.bits, 1, config.iters,
                      method=config.method)
    return {id(m): {"codebook": cb} for m in modules
            if type(m) is nn.Linear or is_conv1d(m, exact=True)}


def _calibration(config: object, hessian: torch.Tensor | None) -> torch.Tensor:
    if hessian is None:
        raise ValueError(f"{config!r} needs calibration data: compress_(model, config, "
                         f"calib=batches) (the layer's input Hessian)")
    return hessian


@register_transform(Sparse24Config, LINEAR_TYPES)
def _sparse24(module: nn.Module, config: Sparse24Config,
              hessian: torch.Tensor | None = None) -> nn.Module:
    linear = plain_linear(module)
    if config.method == "magnitude":
        return Sparse24Linear.from_dense(linear, prune=config.prune)
    hessian = _calibration(config, hessian)
    check_compute_dtype("Sparse24Linear", linear.weight.dtype)
    if config.method == "wanda":
        w = wanda_2to4(linear.weight, hessian)
    else:
        w = sparsegpt_2to4(linear.weight, hessian, damp=config.damp)
    pruned = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
    pruned.weight = nn.Parameter(w, requires_grad=False)
    pruned.bias = linear.bias
    return Sparse24Linear.from_dense(pruned, prune=False)


@register_transform(QuantConfig, LINEAR_TYPES)
def _quant(module: nn.Module, config: QuantConfig, hessian: torch.Tensor | None = None,
           awq_applied: bool = False) -> nn.Module:
    linear = plain_linear(module)
    if config.method == "awq" and not awq_applied:
        raise UnsupportedModule("AWQ folds its scales into the layers before this one: only "
                                "compress_(model, config, calib=batches) applies it")
    if config.method == "gptq":
        hessian = _calibration(config, hessian)
        check_compute_dtype("QuantLinear", linear.weight.dtype)
        qw = gptq_affine(linear.weight.detach(), hessian, config.bits, config.group_size,
                         symmetric=config.symmetric, search_steps=config.search_steps,
                         act_order=config.act_order, damp=config.damp)
        return QuantLinear.from_affine(linear, qw)
    return QuantLinear.from_dense(linear, bits=config.bits,
                                  group_size=config.group_size, symmetric=config.symmetric,
                                  search_steps=config.search_steps)


@register_transform(TernaryConfig, LINEAR_TYPES)
def _ternary(module: nn.Module, config: TernaryConfig) -> nn.Module:
    linear = plain_linear(module)
    check_compute_dtype("QuantLinear", linear.weight.dtype)
    mod = QuantLinear.from_affine(linear, quantize_absmean(linear.weight.detach(), "ternary",
                                                           config.group_size))
    mod.note = TERNARY_NOTE
    return mod


@register_transform(CodebookConfig, LINEAR_TYPES, prepare=shared_codebook)
def _codebook(module: nn.Module, config: CodebookConfig, codebook: object = None,
              hessian: torch.Tensor | None = None) -> nn.Module:
    module = plain_linear(module)
    if config.row_groups > 1 and module.out_features % config.row_groups:
        raise UnsupportedModule(f"out_features={module.out_features} is not divisible by "
                                f"row_groups={config.row_groups}")
    importance = None
    if config.weighted:  # activation-aware: the energy of input j weighs column j's weights
        hessian = _calibration(config, hessian)
        check_hessian(hessian, module.in_features)
        importance = torch.diagonal(hessian.detach())[None, :]
    return CodebookLinear.from_dense(module, codebook=codebook, importance=importance,
                                     bits=config.bits, row_groups=config.row_groups,
                                     iters=config.iters, method=config.method)


@register_transform(W8A8Config, LINEAR_TYPES)
def _w8a8(module: nn.Module, config: W8A8Config, hessian: torch.Tensor | None = None,
          absmax: torch.Tensor | None = None, calibrated: bool = False,
          smooth_scales: torch.Tensor | None = None, note: str = "") -> nn.Module:
    """``absmax``: the largest ``|x|`` per input channel on the calibration data, divided by
    the SmoothQuant scales (folded into an earlier layer, or ``smooth_scales``, carried in the
    op); ``compress_(..., calib=)`` measures and folds, then passes ``calibrated=True``.
    ``note``: what ``report()`` says about the smoothing."""
    linear = plain_linear(module)
    if config.needs_calibration and not calibrated:
        raise UnsupportedModule(f"{config!r} reads calibration data (SmoothQuant's scales, the "
                                f"static activation scale): only compress_(model, config, "
                                f"calib=batches) applies it")
    input_scale = None
    if config.act_scale == "static":
        if absmax is None or absmax.numel() != linear.in_features:
            raise ValueError(f"{config!r}: the static activation scale needs the input's "
                             f"absmax per channel ([{linear.in_features}]) from calibration")
        top = float(absmax.max())
        input_scale = top / QMAX[QDTYPES[config.dtype]] if top > 0 else 1.0
    new = W8A8Linear.from_dense(linear, input_scale=input_scale, smooth_scales=smooth_scales,
                                dtype=config.dtype, act_scale=config.act_scale)
    new.note = note
    return new


def _no_saving(kind: str, factor_params: int, dense_params: int, rank: object) -> None:
    if factor_params >= dense_params:
        raise UnsupportedModule(
            f"{kind} rank {rank}: factors hold {factor_params} parameters >= dense "
            f"{dense_params}; kept dense")


def _tucker2_params(conv: nn.Conv2d, r_out: int, r_in: int) -> int:
    c_out, c_in, kh, kw = conv.weight.shape
    return c_in * r_in + r_out * r_in * kh * kw + r_out * c_out


@register_transform(HashedConfig, LINEAR_TYPES)
def _hashed(module: nn.Module, config: HashedConfig) -> nn.Module:
    module = plain_linear(module)
    n, k = module.out_features, module.in_features
    buckets = config.buckets if config.buckets is not None else buckets_for(n, k,
                                                                            config.compression)
    if buckets >= n * k:
        raise UnsupportedModule(f"{buckets} buckets for {n * k} weights: no saving; kept dense")
    return HashedLinear.from_dense(module, buckets=buckets, seed=config.seed, init=config.init)


@register_transform(LowRankConfig, (*LINEAR_TYPES, nn.Conv2d))
def _lowrank(module: nn.Module, config: LowRankConfig) -> nn.Module:
    if isinstance(module, nn.Conv2d) and type(module) is not nn.Conv2d:
        raise UnsupportedModule(f"{type(module).__name__} is not a plain nn.Conv2d (its forward "
                                f"may do more than the conv)")
    if type(module) is nn.Conv2d:
        if module.groups != 1:
            raise UnsupportedModule(f"Tucker-2 needs groups=1, got groups={module.groups}")
        if (not config.patch_embeddings and module.stride == module.kernel_size
                and module.kernel_size != (1, 1) and module.padding in ((0, 0), "valid")):
            raise UnsupportedModule(
                f"a patch embedding (kernel {module.kernel_size} = stride, no padding): code "
                f"outside reads its .weight (e.g. Hugging Face ViT); "
                f"LowRankConfig(patch_embeddings=True) factorizes it; kept dense")
        c_out, c_in = module.weight.shape[:2]
        ranks = None
        if config.rank is not None:
            ranks = (min(config.rank, c_out), min(config.rank, c_in))
            _no_saving("Tucker-2", _tucker2_params(module, *ranks), module.weight.numel(), ranks)
            ranks = (config.rank, config.rank)
        new = LowRankConv2d.from_dense(module, ranks=ranks, energy=config.energy)
        _no_saving("Tucker-2", _tucker2_params(module, *new.ranks), module.weight.numel(),
                   new.ranks)
        return new
    module = plain_linear(module)
    n, k = module.out_features, module.in_features
    if config.rank is not None:
        r = min(config.rank, n, k)
        _no_saving("SVD", r * (n + k), n * k, r)
    new = LowRankLinear.from_dense(module, rank=config.rank, energy=config.energy,
                                   method=config.method)
    _no_saving("SVD", new.rank * (n + k), n * k, new.rank)
    return new


@register_transform(SharedFilterConfig, (nn.Conv2d,))
def _shared_filter(module: nn.Module, config: SharedFilterConfig) -> nn.Module:
    if type(module) is not nn.Conv2d:
        raise UnsupportedModule(f"{type(module).__name__} is not a plain nn.Conv2d (its forward "
                                f"may do more than the conv)")
    if module.groups != 1:
        raise UnsupportedModule(f"shared filters need groups=1, got groups={module.groups}")
    c_out = module.out_channels
    f = shared_filter_count(c_out, config.filters, config.fraction)
    if f >= c_out:
        raise UnsupportedModule(f"{f} shared filters for {c_out} output channels: no sharing; "
                                f"kept dense")
    dense = module.weight.numel()
    shared = f * dense // c_out + c_out
    if shared >= dense:
        raise UnsupportedModule(f"{f} shared filters + {c_out} scales hold {shared} parameters "
                                f">= dense {dense}; kept dense")
    return SharedFilterConv2d.from_dense(module, filters=f, iters=config.iters)
