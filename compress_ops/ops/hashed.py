"""Hashed linear layers (HashedNets): ``compress_ops::hashed_linear`` and the two ops its
backward calls, ``hashed_linear_t`` (``g @ W``: the input gradient) and ``hashed_grad_w`` (the
bucket gradient, a scatter-add of ``g^T x`` by bucket).

The weight is virtual (:mod:`compress_ops.kernels.formats.hashed`): ``W[n, k] = sign(n, k) *
w[bucket(n, k)]``, recomputed from the position wherever it is used; only ``w`` and the seed
are stored. Routes: the Triton kernels on CUDA (and on CPU tensors under
``COMPRESS_OPS_CPU_BACKEND=triton``), which compute the hash in registers and gather from
``w``; elsewhere the CPU path builds the virtual weight in row chunks of at most
``formats.hashed.CHUNK_ELEMENTS`` elements and multiplies each (``F.linear``), so it never
holds the whole dense weight of a large layer.

Every op takes the hash version last and refuses another (as the low-bit ops take their
layout version): a traced graph names the hash it was built for.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict

import torch
import torch.nn.functional as F

from compress_ops.kernels.formats import hashed as _h
from compress_ops.ops import routing

__all__ = ["hashed_linear", "hashed_linear_t", "hashed_grad_w", "check_hash_version",
           "index_cache_bytes", "INDEX_CACHE"]


def check_hash_version(version: int) -> None:
    """``ValueError`` unless ``version`` is the hash these ops compute
    (:data:`~compress_ops.kernels.formats.hashed.HASH_VERSION`)."""
    if version != _h.HASH_VERSION:
        raise ValueError(f"hash version {version} is not supported: this build computes hash "
                         f"version {_h.HASH_VERSION} (the weights were trained for another "
                         f"hash; they cannot be read with this one)")


#: ``(n, k, buckets, seed, rows, device) -> (bucket int32, negative bool)``: the CPU path's
#: virtual indices, least recently used last; at most :func:`index_cache_bytes` in all.
INDEX_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()


def index_cache_bytes() -> int:
    """Bytes of virtual indices the CPU path keeps between calls
    (``COMPRESS_OPS_HASH_CACHE_MB``, default 64; 0 keeps none). An index is 5 bytes per
    weight and depends only on the shape, the buckets and the seed (never stale); a training
    step reads it three times (forward, input gradient, bucket gradient)."""
    mb = os.environ.get("COMPRESS_OPS_HASH_CACHE_MB", "64")
    try:
        value = float(mb)
    except ValueError:
        raise ValueError(f"COMPRESS_OPS_HASH_CACHE_MB must be a number, got {mb!r}") from None
    return max(0, int(value * (1 << 20)))


def _index(n: int, k: int, buckets: int, seed: int, rows: tuple[int, int],
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    key = (n, k, buckets, seed, rows, str(device))
    hit = INDEX_CACHE.get(key)
    if hit is not None:
        INDEX_CACHE.move_to_end(key)
        return hit
    bucket, neg = _h.virtual_index(n, k, buckets, seed, rows=rows, device=device)
    bucket = bucket.to(torch.int32)  # buckets < 2**31
    limit = index_cache_bytes()
    size = bucket.numel() * 5
    if size <= limit:
        INDEX_CACHE[key] = (bucket, neg)
        total = sum(b.numel() * 5 for b, _ in INDEX_CACHE.values())
        while total > limit:
            old, _ = INDEX_CACHE.popitem(last=False)[1]
            total -= old.numel() * 5
    return bucket, neg


def _weight(w: torch.Tensor, n: int, k: int, seed: int, rows: tuple[int, int],
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """Rows ``rows`` of the virtual weight (``formats.hashed.hashed_weight``, from the cached
    index)."""
    bucket, neg = _index(n, k, w.numel(), seed, rows, w.device)
    v = w.to(dtype or w.dtype)[bucket]
    return torch.where(neg, -v, v)


def _chunks(n: int, k: int):
    step = _h.row_chunk(n, k)
    for start in range(0, n, step):
        yield start, min(n, start + step)


def _cpu_forward(x2: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n: int, k: int,
                 seed: int) -> torch.Tensor:
    if _h.row_chunk(n, k) >= n:
        return F.linear(x2, _weight(w, n, k, seed, (0, n)), bias)
    out = x2.new_empty(x2.shape[0], n)
    for s, e in _chunks(n, k):
        out[:, s:e] = F.linear(x2, _weight(w, n, k, seed, (s, e)),
                               None if bias is None else bias[s:e])
    return out


def _cpu_transposed(g2: torch.Tensor, w: torch.Tensor, n: int, k: int, seed: int) -> torch.Tensor:
    acc = None
    for s, e in _chunks(n, k):
        part = g2[:, s:e] @ _weight(w, n, k, seed, (s, e), g2.dtype)
        acc = part if acc is None else acc + part
    return acc


def _cpu_grad_w(g2: torch.Tensor, x2: torch.Tensor, buckets: int, n: int, k: int,
                seed: int) -> torch.Tensor:
    out = torch.zeros(buckets, dtype=torch.float32, device=g2.device)
    xf = x2.float()
    for s, e in _chunks(n, k):
        gm = g2[:, s:e].float().t() @ xf  # [rows, K], the dense weight's gradient rows
        bucket, neg = _index(n, k, buckets, seed, (s, e), g2.device)
        out.index_add_(0, bucket.flatten(), torch.where(neg, -gm, gm).flatten())
    return out


@torch.library.custom_op("compress_ops::hashed_linear", mutates_args=())
def hashed_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None,
                  out_features: int, in_features: int, seed: int,
                  hash_version: int) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ W^T (+ bias)``, ``W[n, k] = sign(n, k) w[bucket(n, k)]`` the
    virtual weight of ``w [B]`` under ``seed`` (N = ``out_features``, K = ``in_features``)."""
    _h.check_inputs(x, w, bias, out_features, in_features, seed)
    check_hash_version(hash_version)
    if routing.use_triton(x):
        return routing.kernels("hashed").hashed_matmul(x, w, bias, out_features, in_features,
                                                       seed, checked=True)
    x2 = x.reshape(-1, in_features)
    y = _cpu_forward(x2, w, bias, out_features, in_features, seed)
    return y.reshape(*x.shape[:-1], out_features)


@hashed_linear.register_fake
def _(x, w, bias, out_features, in_features, seed, hash_version):
    _h.check_inputs(x, w, bias, out_features, in_features, seed)
    check_hash_version(hash_version)
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("compress_ops::hashed_linear_t", mutates_args=())
def hashed_linear_t(g: torch.Tensor, w: torch.Tensor, out_features: int, in_features: int,
                    seed: int, hash_version: int) -> torch.Tensor:
    """``y[..., K] = g[..., N] @ W`` (the input gradient of :func:`hashed_linear`)."""
    _check_t(g, w, out_features, in_features, seed, hash_version)
    if routing.use_triton(g):
        return routing.kernels("hashed").hashed_matmul(g, w, None, out_features, in_features,
                                                       seed, transpose=True, checked=True)
    g2 = g.reshape(-1, out_features)
    return _cpu_transposed(g2, w, out_features, in_features, seed).reshape(
        *g.shape[:-1], in_features)


@hashed_linear_t.register_fake
def _(g, w, out_features, in_features, seed, hash_version):
    _check_t(g, w, out_features, in_features, seed, hash_version)
    return g.new_empty(*g.shape[:-1], in_features)


def _check_t(g: torch.Tensor, w: torch.Tensor, n: int, k: int, seed: int, version: int) -> None:
    """The checks of :func:`hashed_linear` for ``g [..., N]`` in place of ``x [..., K]``."""
    if not isinstance(g, torch.Tensor) or g.dim() < 1 or g.shape[-1] != n:
        shape = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
        raise ValueError(f"g must be [..., N={n}], got {shape}")
    # w, the sizes and the seed, checked against an empty [0, K] stand-in for x
    _h.check_inputs(g.new_empty(0, k), w, None, n, k, seed)
    check_hash_version(version)


@torch.library.custom_op("compress_ops::hashed_grad_w", mutates_args=())
def hashed_grad_w(g: torch.Tensor, x: torch.Tensor, buckets: int, out_features: int,
                  in_features: int, seed: int, hash_version: int) -> torch.Tensor:
    """``grad_w[b] = sum over (n, k) in bucket b of sign(n, k) (g^T x)[n, k]`` in float32
    ``[buckets]``: the gradient of :func:`hashed_linear` with respect to ``w``, for ``g
    [..., N]`` and ``x [..., K]`` of the same leading shape."""
    check_hash_version(hash_version)
    if g.dtype != x.dtype or g.device != x.device:
        raise TypeError(f"g ({g.dtype}, {g.device}) and x ({x.dtype}, {x.device}) must share "
                        f"a dtype and device")
    if g.shape[:-1] != x.shape[:-1] or g.shape[-1] != out_features \
            or x.shape[-1] != in_features:
        raise ValueError(f"g [..., N={out_features}] and x [..., K={in_features}] must share "
                         f"their leading shape, got {tuple(g.shape)} and {tuple(x.shape)}")
    if routing.use_triton(g):
        return routing.kernels("hashed").hashed_grad_w(
            g.reshape(-1, out_features), x.reshape(-1, in_features), buckets, out_features,
            in_features, seed)
    return _cpu_grad_w(g.reshape(-1, out_features), x.reshape(-1, in_features), buckets,
                       out_features, in_features, seed)


@hashed_grad_w.register_fake
def _(g, x, buckets, out_features, in_features, seed, hash_version):
    check_hash_version(hash_version)
    return g.new_empty(buckets, dtype=torch.float32)


def _setup_context(ctx, inputs, output) -> None:
    x, w, bias, n, k, seed, version = inputs
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w)
    ctx.args = (n, k, seed, version)
    ctx.has_bias = bias is not None


def _backward(ctx, grad):
    x, w = ctx.saved_tensors
    n, k, seed, version = ctx.args
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    grad_x = grad_w = grad_b = None
    if need_x:
        grad_x = torch.ops.compress_ops.hashed_linear_t(grad, w, n, k, seed, version)
    if need_w:
        grad_w = torch.ops.compress_ops.hashed_grad_w(grad, x, w.numel(), n, k, seed,
                                                      version).to(w.dtype)
    if ctx.has_bias and need_b:
        grad_b = grad.reshape(math.prod(grad.shape[:-1]), n).sum(0)
    return grad_x, grad_w, grad_b, None, None, None, None


hashed_linear.register_autograd(_backward, setup_context=_setup_context)
