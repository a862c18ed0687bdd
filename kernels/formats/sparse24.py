"""2:4 structured sparsity: the packed format (Triton-free).

Format
------
A weight ``W[N, K]`` is 2:4 sparse along K when every group of four consecutive weights of a row,
``W[n, 4g : 4g + 4]``, holds at most two nonzeros. It is stored as

* ``values[N, Kp / 2]`` (the weight's dtype): the two kept weights of group ``g`` at
  ``values[n, 2g]`` and ``values[n, 2g + 1]``, in increasing position order. A group with fewer
  than two nonzeros stores zeros at unused positions, so every group holds exactly two entries.
* ``meta[N, Kp / 32]`` (int32): the in-group position (0..3) of every stored value, two bits
  each. The position of ``values[n, j]`` is ``(meta[n, j // 16] >> (2 * (j % 16))) & 3``: one
  32-bit word covers 16 values = 8 groups = 32 dense columns; within a word, bits ``[4i, 4i + 4)``
  describe group ``i`` (low two bits: first value, high two bits: second value). Positions of the
  two values of a group are distinct and increasing: the CPU unpack (a scatter) and the
  kernels (a GEMV summing, a GEMM tile selecting per position) read anything else differently,
  so metadata from outside :func:`pack_sparse24` is checked with :func:`check_meta`.

``Kp`` is K rounded up to a multiple of :data:`K_ALIGN` (32, one metadata word). ``pack_sparse24``
pads with zeros, so the padding is invisible: kernels mask activations at ``k >= K``. A group
entirely past K is stored as positions ``(0, 1)`` with zero values. Stored bytes per weight:
``esize / 2 + 1 / 8`` (fp16: 1.125 B, i.e. 0.5625x of dense). N and K are at least 1: the packers
and the checks refuse an empty weight by name.

Everything here is plain torch (it runs, and traces, on any device): pruning to 2:4, packing,
unpacking, byte counts and the named checks of packed inputs. The kernels reading this format
are in :mod:`compress_ops.kernels.sparse24`.
"""

from __future__ import annotations

import torch

from compress_ops._validate import is_int
from compress_ops.kernels.formats._common import check_activation, check_nonempty

__all__ = [
    "K_ALIGN",
    "padded_k",
    "mask_2to4",
    "prune_2to4",
    "is_2to4",
    "pack_sparse24",
    "unpack_sparse24",
    "empty_sparse24",
    "value_columns",
    "check_compressed",
    "check_meta",
    "check_inputs",
    "sparse24_bytes",
]

K_ALIGN = 32  # dense columns per metadata word; pack pads K up to a multiple of this
_VALUES_PER_WORD = 16
# Metadata of a group holding positions (0, 1): nibble 0b0100, repeated over the 8 groups.
_EMPTY_META_WORD = 0x44444444
_FIRST_POSITIONS = 0x33333333  # the low two bits of every nibble
_ONES = 0x11111111  # 1 in every nibble


def padded_k(k: int) -> int:
    """K rounded up to a multiple of :data:`K_ALIGN` (the packed width ``Kp``)."""
    return -(-k // K_ALIGN) * K_ALIGN


def _check_weight(w: torch.Tensor, name: str = "w") -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(w).__name__}")
    if w.dim() != 2:
        raise ValueError(f"{name} must be 2-D [N, K], got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {w.dtype}")


def _grouped(w: torch.Tensor) -> torch.Tensor:
    """``w[N, K]`` zero-padded to ``[N, Kp / 4, 4]``."""
    n, k = w.shape
    kp = padded_k(k)
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    return w.reshape(n, kp // 4, 4)


def mask_2to4(w: torch.Tensor) -> torch.Tensor:
    """Boolean mask keeping the two largest ``|w|`` of every group of four along K.

    Ties are broken towards the lower index (stable sort), so the mask is deterministic.
    Raises ``ValueError`` on NaN/Inf weights (their magnitude has no order).
    """
    _check_weight(w)
    if not torch.isfinite(w).all():
        raise ValueError("w contains NaN or Inf; 2:4 magnitude pruning needs finite weights")
    n, k = w.shape
    g = _grouped(w.detach()).abs()
    order = torch.sort(g, dim=-1, descending=True, stable=True).indices[..., :2]
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, order, True)
    return mask.reshape(n, -1)[:, :k]


def prune_2to4(w: torch.Tensor) -> torch.Tensor:
    """``w`` with all but the two largest ``|w|`` of every group of four set to zero."""
    return w * mask_2to4(w)


def is_2to4(w: torch.Tensor) -> bool:
    """True when every group of four consecutive weights of a row has at most two nonzeros."""
    _check_weight(w)
    return bool(((_grouped(w) != 0).sum(-1) <= 2).all())


def pack_sparse24(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compress a 2:4-sparse ``w[N, K]`` into ``(values[N, Kp/2], meta[N, Kp/32] int32)``.

    ``w`` must already be 2:4 (use :func:`prune_2to4` first); otherwise ``ValueError`` names the
    first offending row and group. The layout is in the module docstring.
    """
    _check_weight(w)
    n, k = w.shape
    check_nonempty("pack_sparse24", ("N (w.shape[0])", n), ("K (w.shape[1])", k))
    g = _grouped(w)
    nnz = (g != 0).sum(-1)
    bad = (nnz > 2).nonzero()
    if bad.numel():
        r, c = bad[0].tolist()
        raise ValueError(
            f"w is not 2:4 sparse: row {r}, columns {4 * c}..{4 * c + 3} hold {int(nnz[r, c])} "
            "nonzeros (at most 2 allowed); prune it first (prune_2to4) or set prune=True"
        )
    # Positions of the nonzeros first (in increasing order), then zero positions as filler.
    pos = torch.sort((g == 0).to(torch.int8), dim=-1, stable=True).indices[..., :2]
    pos = torch.sort(pos, dim=-1).values  # [N, G, 2], distinct, increasing
    values = torch.gather(g, -1, pos).reshape(n, -1).contiguous()
    fields = pos.reshape(n, -1, _VALUES_PER_WORD).to(torch.int64)
    shifts = 2 * torch.arange(_VALUES_PER_WORD, device=w.device, dtype=torch.int64)
    words = (fields << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32
    return values, words.to(torch.int32).contiguous()


def _positions(meta: torch.Tensor) -> torch.Tensor:
    """In-group position of every stored value: ``[N, Kp / 2]`` int64 in 0..3."""
    shifts = 2 * torch.arange(_VALUES_PER_WORD, device=meta.device, dtype=torch.int32)
    return ((meta.unsqueeze(-1) >> shifts) & 3).reshape(meta.shape[0], -1).to(torch.int64)


def value_columns(meta: torch.Tensor) -> torch.Tensor:
    """Dense column of every stored value: ``[N, Kp / 2]`` int64, ``4 * (j // 2) + position``."""
    pos = _positions(meta)
    j = torch.arange(pos.shape[1], device=meta.device, dtype=torch.int64)
    return pos + 4 * (j // 2)


def unpack_sparse24(
    values: torch.Tensor, meta: torch.Tensor, k: int | None = None
) -> torch.Tensor:
    """Dense ``W[N, K]`` from its compressed form (``K = Kp`` when ``k`` is None).

    Pure torch ops (scatter), so it traces under ``torch.compile`` and runs on any device.
    """
    check_compressed(values, meta, where="unpack_sparse24")
    n, half = values.shape
    kp = 2 * half
    if k is None:
        k = kp
    if not 0 <= kp - k < K_ALIGN:
        raise ValueError(f"k={k} does not match values of padded width {kp}")
    pos = _positions(meta).reshape(n, kp // 4, 2)
    dense = values.new_zeros(n, kp // 4, 4)
    dense.scatter_(-1, pos, values.reshape(n, kp // 4, 2))
    return dense.reshape(n, kp)[:, :k]


def empty_sparse24(n: int, k: int, *, dtype: torch.dtype, device: torch.device | str | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, meta)`` of an all-zero ``[n, k]`` weight (valid metadata: positions 0, 1)."""
    check_nonempty("empty_sparse24", ("N", n), ("K", k))
    kp = padded_k(k)
    values = torch.zeros(n, kp // 2, device=device, dtype=dtype)
    meta = torch.full((n, kp // K_ALIGN), _EMPTY_META_WORD, device=device, dtype=torch.int32)
    return values, meta


def check_compressed(values: torch.Tensor, meta: torch.Tensor, *,
                     where: str = "check_compressed") -> None:
    """Validate a ``(values, meta)`` pair: shapes, dtypes and devices, with named errors; an
    empty weight (N or Kp of 0) is refused naming the dimension, after ``where`` (the caller).
    The positions in ``meta`` are not read: :func:`check_meta` does that."""
    if not isinstance(values, torch.Tensor) or not isinstance(meta, torch.Tensor):
        raise TypeError("values and meta must be torch.Tensors")
    if values.dim() != 2 or not values.is_floating_point():
        raise TypeError(
            f"values must be a 2-D floating tensor [N, Kp/2], got {values.dtype} "
            f"shape {tuple(values.shape)}"
        )
    if meta.dtype != torch.int32 or meta.dim() != 2:
        raise TypeError(
            f"meta must be a 2-D int32 tensor [N, Kp/32], got {meta.dtype} shape "
            f"{tuple(meta.shape)}"
        )
    n, half = values.shape
    check_nonempty(where, ("N (values.shape[0])", n), ("K (values.shape[1] = Kp/2)", half))
    if half % (K_ALIGN // 2) != 0:
        raise ValueError(
            f"values must have Kp/2 columns with Kp a multiple of {K_ALIGN}, got {half}"
        )
    if tuple(meta.shape) != (n, 2 * half // K_ALIGN):
        raise ValueError(
            f"meta shape {tuple(meta.shape)} does not match values {tuple(values.shape)}: "
            f"expected ({n}, {2 * half // K_ALIGN})"
        )
    if meta.device != values.device:
        raise ValueError(f"values on {values.device} but meta on {meta.device}")


def _signed(word: int) -> int:
    """A 32-bit pattern as the int32 value torch stores."""
    return word - 2**32 if word >= 2**31 else word


def check_meta(meta: torch.Tensor, k: int | None = None) -> None:
    """``ValueError`` naming the first bad group (row-major order) of a metadata tensor that
    :func:`pack_sparse24` cannot have written: two positions of a group equal (duplicate) or
    decreasing, and, with the layer's ``k`` given, a group entirely past K (padding) that does
    not hold ``(0, 1)`` (for example metadata packed for a larger K). ``TypeError`` for a
    non-tensor or a meta that is not 2-D int32.

    Metadata that passes gives the same product on every path (CPU unpack, GEMV and GEMM
    kernels). Vectorised over whole words (a few int32 ops per word, no per-group expansion):
    cheap enough for every load, on any device (one host sync). Values are not read.
    """
    if not isinstance(meta, torch.Tensor):
        raise TypeError(f"meta must be a torch.Tensor, got {type(meta).__name__}")
    if meta.dtype != torch.int32 or meta.dim() != 2:
        raise TypeError(f"meta must be a 2-D int32 tensor [N, Kp/32], got {meta.dtype} shape "
                        f"{tuple(meta.shape)}")
    words = meta.shape[1]
    kp = words * K_ALIGN
    if k is not None and (not is_int(k) or not max(1, kp - K_ALIGN + 1) <= k <= kp):
        raise ValueError(f"k={k!r} does not fit meta of {words} words per row: K must be in "
                         f"({kp - K_ALIGN}, {kp}] and at least 1")
    # Per 4-bit group: p1 + 4 - p0 - 1 lies in [0, 6], so no borrow crosses groups, and its
    # bit 2 is set exactly when p1 > p0 (distinct and increasing).
    p0 = meta & _FIRST_POSITIONS
    p1 = (meta >> 2) & _FIRST_POSITIONS  # arithmetic shift: the sign bits are masked off
    bad = ((p1 | _EMPTY_META_WORD) - p0 - _ONES) & _EMPTY_META_WORD != _EMPTY_META_WORD
    first_pad = 8 if k is None else -(-k // 4) - 8 * (words - 1)  # in the last word, 1..8
    if first_pad < 8:  # groups past K: only in the last word, as pack writes them
        pad = _signed((0xFFFFFFFF << 4 * first_pad) & 0xFFFFFFFF)
        bad[:, -1] |= meta[:, -1] & pad != _EMPTY_META_WORD & pad
    if not bool(bad.any()):
        return
    row, word = divmod(int(torch.argmax(bad.flatten().to(torch.uint8))), words)
    value = int(meta[row, word]) & 0xFFFFFFFF
    for lane in range(8):  # the 8 groups of the one reported word
        nibble = value >> 4 * lane & 0xF
        a, b = nibble & 3, nibble >> 2
        g = 8 * word + lane
        where = f"meta row {row}, group {g} (columns {4 * g}..{4 * g + 3})"
        if a >= b:
            what = "duplicate" if a == b else "decreasing"
            raise ValueError(
                f"{where} stores {what} positions ({a}, {b}): the two values of a group must "
                "sit at distinct, increasing positions (as pack_sparse24 writes them); the CPU "
                "unpack and the Triton kernels read such a group differently")
        if word == words - 1 and lane >= first_pad and nibble != 0b0100:
            raise ValueError(
                f"{where} lies past K={k} but stores positions ({a}, {b}); pack_sparse24 "
                "stores padding groups as (0, 1) (was this meta packed for a larger K?)")


def sparse24_bytes(n: int, k: int, dtype: torch.dtype) -> int:
    """Stored bytes of a packed ``[N, K]`` weight (values + metadata, padding included)."""
    kp = padded_k(k)
    esize = torch.empty((), dtype=dtype).element_size()
    return n * (kp // 2) * esize + n * (kp // K_ALIGN) * 4



def check_inputs(x: torch.Tensor, values: torch.Tensor, meta: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
    """Named ``TypeError``/``ValueError`` for every bad input of a 2:4 linear
    (``x[..., K]``, the packed pair, ``bias[N]``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_compressed(values, meta, where="sparse24_linear")
    check_activation(x, values.shape[0], 2 * values.shape[1], K_ALIGN, values, "values", bias,
                     where="sparse24_linear")
