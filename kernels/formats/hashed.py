"""Hashed weights (HashedNets, Chen et al. 2015): the virtual weight, byte counts and input
checks (Triton-free).

A hashed linear of ``N`` outputs and ``K`` inputs stores one vector ``w [B]`` of ``B`` buckets
(the activation dtype) and a 32-bit ``seed``; no index. Its virtual weight is

    W[n, k] = sign(n, k) * w[bucket(n, k)]

computed from the position alone (hash version :data:`HASH_VERSION`), in unsigned 32-bit
arithmetic (every product and sum wraps modulo 2**32), from one hash per row and one per
column:

    fmix(v) = v ^ (v >> 16); v *= MIX; v ^= v >> 16; v *= MIX; v ^= v >> 16
    R(n) = fmix(n ^ seed)                           (MIX = 0x045D9F3B; one per row)
    C(k) = k * GOLD                                 (GOLD = 0x9E3779B1; one per column)
    h = (R(n) ^ C(k)) * MIX                         (per weight: a xor and a multiply)
    sign   = -1 if h >> 31 else +1                  (h's top bit)
    bucket = ((h << 1 mod 2**32) * B) >> 32         (the high word of a 32 x 32-bit product)

for positions ``0 <= n, k < 2**31``. The bucket takes the low 31 bits of ``h`` (shifted to the
top, so the sign bit is not part of it) by one multiply-high (Lemire's range reduction: no
division, any ``B``), the sign ``h``'s top bit, so one hash gives both (the paper's ``h`` and
``xi``) and the sign does not depend on the bucket. The row hash is a full avalanche of ``n``
and the seed, so rows' sign vectors are uncorrelated; the final multiply mixes the column's
Weyl value into it. ``R`` is made once per row and ``C`` once per column (``C(8a + j) = C(8a)
+ j GOLD``), so a kernel spends a xor and a multiply per weight on the hash. CPU code computes
every step exactly in int64: ``k GOLD < 2**63`` for ``k < 2**31``, a 32-bit value times
``MIX < 2**27`` or ``B < 2**31`` stays below 2**63. The kernels compute the same bits in
registers (:mod:`compress_ops.kernels.hashed`). A change of any constant or step is a new
hash version: a module records the version it was trained with and refuses another.

Stored bytes: ``B * itemsize`` (the seed and shapes are metadata). ``B`` is at least 1 and
below 2**31.
"""

from __future__ import annotations

import torch

from compress_ops.kernels.formats._common import check_activation, check_nonempty

__all__ = ["HASH_VERSION", "MIX", "GOLD", "MAX_BUCKETS", "MAX_SEED", "MAX_DIM", "hash_bits",
           "row_hash", "col_hash", "virtual_index",
           "hashed_weight", "hashed_bytes", "buckets_for", "check_inputs", "check_seed",
           "bucket_means", "row_chunk"]

HASH_VERSION = 1
MIX = 0x045D9F3B
GOLD = 0x9E3779B1
MAX_BUCKETS = (1 << 31) - 1
MAX_SEED = (1 << 32) - 1
#: The largest N and K: positions (n, k) are below 2**31.
MAX_DIM = (1 << 31) - 1
_M32 = 0xFFFFFFFF
_OP = "hashed_linear"
#: Virtual weights built at once by the CPU paths (one row chunk): 4M elements.
CHUNK_ELEMENTS = 1 << 22


def _fmix_(h: torch.Tensor) -> torch.Tensor:
    """``fmix`` of int64 ``h`` (values in ``[0, 2**32)``), in place."""
    for _ in range(2):
        h.bitwise_xor_(h >> 16).mul_(MIX).bitwise_and_(_M32)
    return h.bitwise_xor_(h >> 16)


def row_hash(n: torch.Tensor, seed: int) -> torch.Tensor:
    """``R(n) = fmix(n ^ seed)`` of rows ``n`` (int64 in ``[0, 2**31)``), int64 in ``[0,
    2**32)``."""
    return _fmix_(n ^ seed)


def col_hash(k: torch.Tensor) -> torch.Tensor:
    """``C(k) = k GOLD mod 2**32`` of columns ``k`` (int64 in ``[0, 2**31)``), int64."""
    return (k * GOLD).bitwise_and_(_M32)


def hash_bits(n: torch.Tensor, k: torch.Tensor, seed: int) -> torch.Tensor:
    """The 32-bit hash ``h = (R(n) ^ C(k)) MIX mod 2**32`` of positions ``(n, k)`` (int64
    tensors in ``[0, 2**31)``, broadcast against each other), int64 in ``[0, 2**32)``. The
    row and column hashes are made on ``n`` and ``k`` before they broadcast; one buffer of the
    broadcast shape, updated in place."""
    return torch.bitwise_xor(row_hash(n, seed), col_hash(k)).mul_(MIX).bitwise_and_(_M32)


def virtual_index(n: int, k: int, buckets: int, seed: int, *, rows: tuple[int, int] | None = None,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bucket, negative)`` of the virtual weight's rows ``rows = (start, stop)`` (default
    all ``n``): ``bucket`` int64 ``[stop - start, k]`` in ``[0, buckets)``, ``negative`` bool
    (the sign is -1, ``h``'s top bit)."""
    start, stop = rows if rows is not None else (0, n)
    r = torch.arange(start, stop, dtype=torch.int64, device=device)
    c = torch.arange(k, dtype=torch.int64, device=device)
    h = hash_bits(r[:, None], c[None, :], seed)
    neg = h >= 1 << 31
    # (h << 1) mod 2**32: the low 31 bits at the top; times B < 2**31 stays below 2**63
    h.bitwise_and_(0x7FFFFFFF).bitwise_left_shift_(1)
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
    float tensor of ``1 <= B <= MAX_BUCKETS`` buckets, ``1 <= N, K <= MAX_DIM``, ``x[..., K]``
    of ``w``'s dtype and device, ``bias[N]``, a seed in ``[0, 2**32)``."""
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"w must be a torch.Tensor [B], got {type(w).__name__}")
    if w.dim() != 1:
        raise ValueError(f"w must be 1-D [B], got shape {tuple(w.shape)}")
    for name, v in (("out_features", n), ("in_features", k)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    check_nonempty(_OP, ("out_features", n), ("in_features", k), ("buckets (w.numel())", w.numel()))
    for name, v in (("out_features", n), ("in_features", k)):
        if v > MAX_DIM:
            raise ValueError(f"{name} must be below 2**31 (the hash's positions), got {v}")
    if w.numel() > MAX_BUCKETS:
        raise ValueError(f"w must have at most {MAX_BUCKETS} buckets, got {w.numel()}")
    check_seed(seed)
    if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] != k:
        raise ValueError(f"x last dim (K={x.shape[-1]}) must equal in_features (K={k})")
    if isinstance(x, torch.Tensor) and x.device != w.device:
        raise ValueError(f"x on {x.device} but w on {w.device}")
    check_activation(x, n, k, 1, w, "w", bias, where=_OP)
