"""Hashed weights (HashedNets, Chen et al. 2015): the virtual weight, byte counts and input
checks (Triton-free).

A hashed linear of ``N`` outputs and ``K`` inputs stores one vector ``w [B]`` of ``B`` buckets
(the activation dtype) and a 32-bit ``seed``; no index. Its virtual weight is

    W[n, k] = sign(n, k) * w[bucket(n, k)]

computed from the position alone (hash version :data:`HASH_VERSION`), in unsigned 32-bit
arithmetic (every product and sum wraps modulo 2**32):

    i = n * K + k                                   (mod 2**32)
    h = i ^ seed
    h = ((h >> 16) ^ h) * MIX                       (MIX = 0x045D9F3B)
    h = ((h >> 16) ^ h) * MIX
    h = (h >> 16) ^ h
    bucket = (h * B) >> 32                          (the high word of a 32 x 32-bit product)
    sign   = -1 if h & 1 else +1

The bucket takes ``h``'s high bits by one multiply-high (Lemire's range reduction: no
division, any ``B``), the sign its lowest bit, so one hash gives both (the paper's ``h`` and
``xi``). ``MIX`` is below 2**31, so CPU code computes every step exactly in int64 (a 32-bit
value times ``MIX`` or ``B < 2**31`` stays below 2**63). The kernels compute the same bits in
registers (:mod:`compress_ops.kernels.hashed`). A change of any constant or step is a new
hash version: a module records the version it was trained with and refuses another.

Stored bytes: ``B * itemsize`` (the seed and shapes are metadata). ``B`` is at least 1 and
below 2**31.
"""

from __future__ import annotations

import torch

from compress_ops.kernels.formats._common import check_activation, check_nonempty

__all__ = ["HASH_VERSION", "MIX", "MAX_BUCKETS", "MAX_SEED", "hash_bits", "virtual_index",
           "hashed_weight", "hashed_bytes", "buckets_for", "check_inputs", "check_seed",
           "bucket_means", "row_chunk"]

HASH_VERSION = 1
MIX = 0x045D9F3B
MAX_BUCKETS = (1 << 31) - 1
MAX_SEED = (1 << 32) - 1
_M32 = 0xFFFFFFFF
_OP = "hashed_linear"
#: Virtual weights built at once by the CPU paths (one row chunk): 4M elements.
CHUNK_ELEMENTS = 1 << 22


def hash_bits(idx: torch.Tensor, seed: int) -> torch.Tensor:
    """The 32-bit hash ``h`` of positions ``idx`` (int64 holding values in ``[0, 2**32)``),
    as int64 in ``[0, 2**32)``. Works in place on a copy of ``idx`` (two buffers, no
    temporaries per step)."""
    h = idx ^ seed
    t = torch.empty_like(h)
    for _ in range(2):
        h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=t)).mul_(MIX).bitwise_and_(_M32)
    return h.bitwise_xor_(torch.bitwise_right_shift(h, 16, out=t))


def virtual_index(n: int, k: int, buckets: int, seed: int, *, rows: tuple[int, int] | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bucket, negative)`` of the virtual weight's rows ``rows = (start, stop)`` (default
    all ``n``): ``bucket`` int64 ``[stop - start, k]`` in ``[0, buckets)``, ``negative`` bool
    (the sign is -1)."""
    start, stop = rows if rows is not None else (0, n)
    r = torch.arange(start, stop, dtype=torch.int64, device=device)
    c = torch.arange(k, dtype=torch.int64, device=device)
    idx = torch.add(r[:, None] * k, c[None, :]).bitwise_and_(_M32)
    h = hash_bits(idx, seed)
    neg = (h & 1).bool()
    return h.mul_(buckets).bitwise_right_shift_(32), neg


def hashed_weight(w: torch.Tensor, n: int, k: int, seed: int, *,
                  rows: tuple[int, int] | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The virtual weight's rows ``rows`` (default all) ``[rows, k]`` in ``dtype`` (default
    ``w.dtype``): ``sign * w[bucket]``, exact in any dtype (a gather and a sign flip)."""
    bucket, neg = virtual_index(n, k, w.numel(), seed, rows=rows, device=w.device)
    v = w.to(dtype or w.dtype)[bucket]
    return torch.where(neg, -v, v)


def row_chunk(n: int, k: int) -> int:
    """Rows per chunk of the CPU paths: at most :data:`CHUNK_ELEMENTS` virtual weights."""
    return max(1, min(n, CHUNK_ELEMENTS // max(k, 1)))


def bucket_means(weight: torch.Tensor, buckets: int, seed: int) -> torch.Tensor:
    """Buckets that reproduce a dense ``weight [N, K]`` best in least squares: each bucket the
    mean of ``sign * W`` over its members (float64 sums, returned in ``weight.dtype``); a
    bucket no position maps to is 0."""
    n, k = weight.shape
    total = torch.zeros(buckets, dtype=torch.float64, device=weight.device)
    count = torch.zeros(buckets, dtype=torch.float64, device=weight.device)
    step = row_chunk(n, k)
    for start in range(0, n, step):
        stop = min(n, start + step)
        bucket, neg = virtual_index(n, k, buckets, seed, rows=(start, stop), device=weight.device)
        v = weight[start:stop].to(torch.float64)
        v = torch.where(neg, -v, v)
        total.index_add_(0, bucket.flatten(), v.flatten())
        count.index_add_(0, bucket.flatten(), torch.ones_like(v).flatten())
    return (total / count.clamp_min(1)).to(weight.dtype)


def hashed_bytes(buckets: int, dtype: torch.dtype) -> int:
    """Stored bytes of a hashed weight: ``buckets * itemsize``."""
    return buckets * dtype.itemsize


def buckets_for(n: int, k: int, compression: float) -> int:
    """``B = round(compression * N * K)``, at least 1 and at most :data:`MAX_BUCKETS`."""
    return int(min(MAX_BUCKETS, max(1, round(compression * n * k))))


def check_seed(seed: object) -> int:
    """The seed as an int in ``[0, 2**32)``; named ``TypeError``/``ValueError`` otherwise."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int in [0, 2**32), got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    return seed


def check_inputs(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, n: int, k: int,
                 seed: int) -> None:
    """Named ``TypeError``/``ValueError`` for every bad input of a hashed linear: ``w`` a 1-D
    float tensor of ``1 <= B <= MAX_BUCKETS`` buckets, ``N, K >= 1``, ``x[..., K]`` of ``w``'s
    dtype and device, ``bias[N]``, a seed in ``[0, 2**32)``."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor [B], got {type(w).__name__}")
    if w.dim() != 1:
        raise ValueError(f"w must be 1-D [B], got shape {tuple(w.shape)}")
    for name, v in (("out_features", n), ("in_features", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    check_nonempty(_OP, ("out_features", n), ("in_features", k), ("buckets (w.numel())", w.numel()))
    if w.numel() > MAX_BUCKETS:
        raise ValueError(f"w must have at most {MAX_BUCKETS} buckets, got {w.numel()}")
    check_seed(seed)
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != k:
        raise ValueError(f"x last dim (K={x.shape[-1]}) must equal in_features (K={k})")
    if isinstance(x, torch.Tensor) and x.device != w.device:
        raise ValueError(f"x on {x.device} but w on {w.device}")
    check_activation(x, n, k, 1, w, "w", bias, where=_OP)
