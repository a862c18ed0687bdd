"""Low-bit weights (affine int8/int4/int3/int2/int1 and codebook): the packed formats (Triton-free).

Packed fields
-------------
A weight ``W[N, K]`` is stored as unsigned b-bit integers ``q[N, Kp]`` (``b`` in {1, 2, 3, 4, 8}:
:data:`AFFINE_BITS`; codebooks {2, 3, 4, 8}: :data:`BITS`),
``Kp`` = K rounded up to the group size (whole-row groups: to 32). Padding columns hold ``q`` of
a zero weight; kernels also mask activations at ``k >= K``. ``q`` is packed along K into
``qweight[N, Kp * b / 32]`` int32: every 32 dense columns of a row take exactly ``b`` words.

* ``b`` in {2, 4, 8} (contiguous fields): word ``u`` holds ``F = 32 / b`` fields (field ``p``
  at bits ``[p b, p b + b)``). In format version 2 word ``u`` holds the columns
  ``u F .. u F + F - 1``, interleaved for ``b`` in {2, 4}: column ``u F + c`` is field
  ``c // 2 + (c % 2) F / 2`` (int4: the fields hold columns ``0 2 4 6 1 3 5 7``), so one shift
  and one mask, ``(word >> p b) & (2**b - 1) * 0x10001``, give a pair of columns in the two
  16-bit halves: a GPU makes a pair of fp16 values with one LOP3. int8 is not interleaved
  (column ``c`` is field ``c % 4``: the bytes of ``qweight.view(torch.uint8)`` are ``q``
  itself; one PRMT pairs bytes). Version 1 (before 2026-11-30) had column ``c`` in field
  ``c % F`` at every width.
  Format version 3 (``FORMAT_VERSION``, 2026-11-30) keeps version 2's words and permutes the
  columns of every 32-column block for ``b`` in {2, 4} (:func:`block_columns`): the block's
  16 pairs, in version 2's order (pair slot ``s``: word ``s // (16 / b)``, pair ``s % (16 / b)``
  of it), hold columns ``16 j + 8 c + 2 t + e`` for ``s = 4 t + 2 j + c`` (``e``: the pair's low
  or high half). That is a tensor-core fragment's order (``mma.m16n8k16`` and ``wgmma``:
  thread ``t`` of a quad holds columns ``2t, 2t + 1, 2t + 8, 2t + 9`` of each 16): an int4
  word is exactly one thread's share of a 32-column block, so the unpacked fields feed the
  dot from registers with nothing moved through shared memory. int8 keeps version 2's order.
  :func:`repack` converts versions 1 and 2 (the modules do so when loading an older
  state_dict). :func:`field_columns` gives each field's column within version 2's words.
* ``b`` = 3 (bit planes): the 32 columns of block ``j`` use words ``3j, 3j + 1, 3j + 2``; word
  ``3j + p`` holds bit ``p`` of column ``32j + i`` at bit ``i``. Exactly 3 bits per weight, and
  every tile of 32 columns stays word aligned.
* ``b`` = 1 (affine only): one bit plane, word ``j`` holds column ``32j + i`` at bit ``i`` (plain
  little-endian, which is also the 3-bit layout with a single plane, so the CPU paths read it
  as they read bit planes; format versions do not change it, :func:`repack` returns it as is).
  The GPU reads it with the contiguous-field kernels (32 one-bit fields per word): a byte
  copied into a register's four bytes by one PRMT gives two adjacent columns per LOP3 under
  per-column exponents (fp16), or a shift and a mask gives columns ``p`` and ``p + 16``, put
  back in K order by a reshape.

Affine format (int-b quantization)
----------------------------------
``W[n, c] = (q[n, c] - z[n, g]) * s[n, g]`` with ``g = c // group_size``: ``scales[N, Kp / gs]``
and, for asymmetric grids, ``zeros[N, Kp / gs]`` (both in the activation dtype; a zero point may
be fractional). Symmetric grids store no zeros: ``z`` is :func:`symmetric_zero`, ``2**(b - 1)``
for ``b >= 2`` (offset binary, so ``q`` in ``[0, 2**b)`` covers ``[-2**(b-1), 2**(b-1) - 1]``)
and ``1/2`` for ``b = 1``: the symmetric 1-bit grid is binary, ``W = (q - 1/2) s = ±s / 2``.
Binary weights ``W = ±a`` (``a`` the group's mean ``|w|``) are ``q`` in {0, 1} with
``scales = 2 a`` and ``z = 1/2``: exact in every dtype (``q - 1/2 = ±1/2``, and ``2 a`` is ``a``
with its exponent raised). :func:`compress_ops.quantize.quantize_absmean` returns the symmetric
1-bit grid (no zeros stored: ``1 / 8 + e / group_size`` bytes per weight, fp16 g128 0.1406x of
fp16, against 0.2656 for the 2-bit fields binary used before); an asymmetric 1-bit grid with
``zeros = 0.5`` stored is the same weight (0.1563). The kernels take the symmetric zero as a
constexpr and the CPU paths from :func:`symmetric_zero`. The binary grid
has no zero level: 1-bit padding columns hold ``q = 0`` (a finite weight), which every path
multiplies by zero activations, and an all-zero 1-bit symmetric weight has zero scales.
``group_size`` is 32, 64, 128, 256 or the whole (padded) row, ``Kp``. Bytes per weight:
``b / 8 + (1 or 2) * e / group_size`` (int4, group 128, fp16 scales and zeros: 0.5 + 0.03125 =
0.2656x of fp16).

Codebook format (weight sharing)
--------------------------------
``W[n, c] = codebook[n // rows_per_group, q[n, c]]``: ``codebook[R, 2**b]`` in the activation
dtype, ``R`` row groups (``R`` divides N; ``R = 1``: one table for the layer), ``q`` packed as
above (``b`` in {2, 3, 4, 8}: no 1-bit codebooks).

N, K and R are at least 1: the packers and the checks refuse an empty weight by name.

Everything here is plain torch: packing, unpacking, dequantizing, byte counts and the named
checks of packed inputs. The kernels reading these formats are in
:mod:`compress_ops.kernels.dequant`; the algorithms that choose grids and codebooks are in
:mod:`compress_ops.quantize`.
"""

from __future__ import annotations

import torch

from compress_ops._validate import check_choice, is_int
from compress_ops.kernels.formats._common import (
    check_activation,
    check_companion,
    check_nonempty,
)

__all__ = [
    "FORMAT_VERSION",
    "OLDER_VERSIONS",
    "field_columns",
    "block_columns",
    "position_columns",
    "repack",
    "BITS",
    "AFFINE_BITS",
    "symmetric_zero",
    "GROUP_SIZES",
    "WORD_COLS",
    "packed_k",
    "packed_words",
    "padded_k",
    "effective_group_size",
    "pack_bits",
    "unpack_bits",
    "dequantize",
    "codebook_weight",
    "empty_affine",
    "check_affine",
    "check_codebook",
    "check_affine_inputs",
    "check_codebook_inputs",
    "affine_bytes",
    "codebook_bytes",
]

BITS = (2, 3, 4, 8)  # codebook widths (and those of CodebookConfig / QuantConfig's grids)
#: Affine field widths: :data:`BITS` and 1 (one bit plane; binary weights, see the docstring).
AFFINE_BITS = (1, 2, 3, 4, 8)
_PLANE_BITS = (1, 3)  # bit-plane layouts (one plane per bit of a field)
GROUP_SIZES = (32, 64, 128, 256)  # or the whole (padded) row
WORD_COLS = 32  # dense columns per b words (the packing unit)
#: Version of the packed-field layout written by :func:`pack_bits` (see the module docstring).
FORMAT_VERSION = 3
#: The older layouts this build reads (:func:`repack` converts them).
OLDER_VERSIONS = (1, 2)
_VERSIONS = (*OLDER_VERSIONS, FORMAT_VERSION)


def _check_version(version: int) -> None:
    if version not in _VERSIONS:
        raise ValueError(f"unknown packed-field format version {version} (this build reads "
                         f"{', '.join(map(str, _VERSIONS[:-1]))} and {FORMAT_VERSION})")


def field_columns(bits: int, version: int = FORMAT_VERSION) -> tuple[int, ...]:
    """Column (within its word, version 2's word order) of each field ``p = 0 .. 32 / b - 1``
    of a contiguous-field word (``bits`` in {2, 4, 8}): versions 2 and 3 interleave 2- and
    4-bit fields (``(2p) % F + 2p // F``: int4 ``0 2 4 6 1 3 5 7``); otherwise field ``p`` is
    column ``p``. Version 3 then permutes each 32-column block (:func:`block_columns`)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"field_columns: contiguous fields have 2, 4 or 8 bits, got {bits}")
    _check_version(version)
    per = 32 // bits
    if bits == 8 or version == 1:
        return tuple(range(per))
    return tuple((2 * p) % per + (2 * p) // per for p in range(per))


def block_columns(bits: int, version: int = FORMAT_VERSION) -> tuple[int, ...]:
    """Column (within its 32-column block) held at each position ``P = 0 .. 31`` of the block
    in version 2's order (``P = F * (word in block) + field column``): version 3 with ``bits``
    in {2, 4}, pair slot ``s = P // 2 = 4 t + 2 j + c`` and half ``e = P % 2`` hold column
    ``16 j + 8 c + 2 t + e``; the identity otherwise."""
    _check_version(version)
    if not _permuted(bits, version):
        return tuple(range(32))
    cols = []
    for pos in range(32):
        slot, e = pos >> 1, pos & 1
        t, j, c = slot >> 2, (slot >> 1) & 1, slot & 1
        cols.append(16 * j + 8 * c + 2 * t + e)
    return tuple(cols)


def position_columns(bits: int, kp: int, version: int = FORMAT_VERSION,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """``[Kp]`` int64: the column held at each position of a packed row in version 2's order
    (word ``u``, field column ``c``: position ``u F + c``), by :func:`block_columns`."""
    blk = torch.tensor(block_columns(bits, version), dtype=torch.int64, device=device)
    base = torch.arange(0, kp, 32, dtype=torch.int64, device=device)
    return (base[:, None] + blk[None, :]).reshape(-1)


def _permuted(bits: int, version: int) -> bool:
    return version >= 3 and bits in (2, 4)


def _field_shifts(bits: int, version: int, device: torch.device) -> torch.Tensor:
    """Bit offset of each column (within its word, version 2's order) of a contiguous-field
    word: the inverse of :func:`field_columns`, column ``c`` in field ``c // 2 + (c % 2) F / 2``
    when interleaved."""
    field_columns(bits, version)  # the named errors
    c = torch.arange(32 // bits, device=device, dtype=torch.int64)
    if bits == 8 or version == 1:
        return bits * c
    return bits * (c // 2 + (c % 2) * (16 // bits))


def symmetric_zero(bits: int) -> float:
    """The zero point ``z`` of a symmetric ``bits``-bit grid (one that stores no zeros):
    ``2**(bits - 1)``, or ``0.5`` at one bit (the binary grid ``±s / 2``)."""
    return 0.5 if bits == 1 else float(2 ** (bits - 1))


def _check_bits(bits: int, allowed: tuple[int, ...] = AFFINE_BITS) -> None:
    check_choice("bits", bits, allowed)


def packed_k(words: int, bits: int) -> int:
    """Dense columns ``Kp`` held by ``words`` int32 words per row of ``bits``-bit fields."""
    return words * WORD_COLS // bits


def packed_words(kp: int, bits: int) -> int:
    """int32 words per row for ``kp`` dense columns of ``bits``-bit fields."""
    return kp * bits // WORD_COLS


def padded_k(k: int, group_size: int | None) -> int:
    """Packed width of a K-column row: K rounded up to ``group_size`` (None: to 32)."""
    unit = WORD_COLS if group_size is None else max(group_size, WORD_COLS)
    return -(-k // unit) * unit


def effective_group_size(k: int, group_size: int | None) -> int:
    """The group size actually stored: ``group_size``, or the padded row when the row fits in
    one group (``None``, or ``group_size >= K``), so one group never spans padding alone.
    The padded row width itself is accepted (an effective size given back)."""
    if group_size is not None and group_size != padded_k(k, None):
        check_choice("group_size", group_size, GROUP_SIZES, hint="or None (whole row)")
        if padded_k(k, None) > group_size:
            return group_size
    return padded_k(k, None)


def pack_bits(q: torch.Tensor, bits: int, *, version: int = FORMAT_VERSION) -> torch.Tensor:
    """Pack unsigned b-bit integers ``q[N, Kp]`` (``Kp % 32 == 0``) into int32 ``[N, Kp b / 32]``
    (the field layout of format ``version``; the current one by default).

    ``ValueError`` if any value is outside ``[0, 2**bits)``.
    """
    _check_bits(bits)
    if q.dim() != 2 or q.is_floating_point() or q.dtype == torch.bool:
        raise TypeError(f"q must be a 2-D integer tensor, got {q.dtype} {tuple(q.shape)}")
    n, kp = q.shape
    check_nonempty("pack_bits", ("N (q.shape[0])", n), ("Kp (q.shape[1])", kp))
    if kp % WORD_COLS:
        raise ValueError(f"q must have a multiple of {WORD_COLS} columns, got {kp}")
    if q.numel() and (q.min() < 0 or q.max() >= 2**bits):
        raise ValueError(f"q values must lie in [0, {2**bits}) for bits={bits}")
    q = q.to(torch.int64)
    if bits in _PLANE_BITS:
        blocks = q.reshape(n, kp // 32, 1, 32)
        planes = (blocks >> torch.arange(bits, device=q.device)[:, None]) & 1  # [N, B, b, 32]
        words = (planes << torch.arange(32, device=q.device)).sum(-1)  # [N, B, b]
    else:
        per = 32 // bits
        shifts = _field_shifts(bits, version, q.device)
        if _permuted(bits, version):  # position P holds column position_columns[P]
            q = q.index_select(1, position_columns(bits, kp, version, q.device))
        words = (q.reshape(n, kp // per, per) << shifts).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as int32
    return words.reshape(n, -1).to(torch.int32).contiguous()


def unpack_bits(qweight: torch.Tensor, bits: int, k: int | None = None, *,
                version: int = FORMAT_VERSION) -> torch.Tensor:
    """Unsigned fields ``q[N, K]`` (int32) of ``qweight`` (``K = Kp`` when ``k`` is None), read
    with the field layout of format ``version`` (the current one by default)."""
    _check_bits(bits)
    _check_qweight(qweight, bits, where="unpack_bits")
    n, w = qweight.shape
    kp = packed_k(w, bits)
    k = kp if k is None else k
    if not 0 <= kp - k < kp or k < 1:
        raise ValueError(f"k={k} does not fit a packed row of {kp} columns")
    if bits in _PLANE_BITS:
        words = qweight.reshape(n, kp // 32, bits, 1)
        bit = (words >> torch.arange(32, device=qweight.device, dtype=torch.int32)) & 1
        q = (bit << torch.arange(bits, device=qweight.device, dtype=torch.int32)[:, None]).sum(2)
        q = q.to(torch.int32)
    else:
        shifts = _field_shifts(bits, version, qweight.device).to(torch.int32)
        q = ((qweight.unsqueeze(-1) >> shifts) & (2**bits - 1)).reshape(n, kp)
        if _permuted(bits, version):
            cols = position_columns(bits, kp, version, qweight.device)
            q = torch.empty_like(q).index_copy_(1, cols, q)
    return q.reshape(n, kp)[:, :k]


def repack(qweight: torch.Tensor, bits: int, from_version: int) -> torch.Tensor:
    """``qweight`` packed in format ``from_version``, in the current format: the same tensor
    where the layouts agree (1-, 3- and 8-bit fields, or already current), else the fields
    unpacked and packed again. ``ValueError`` for a version this build does not know."""
    _check_version(from_version)
    if from_version == FORMAT_VERSION or bits not in (2, 4):
        return qweight
    return pack_bits(unpack_bits(qweight, bits, version=from_version), bits)


def _check_qweight(qweight: torch.Tensor, bits: int, name: str = "qweight", *,
                   where: str) -> None:
    if not isinstance(qweight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(qweight).__name__}")
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise TypeError(f"{name} must be a 2-D int32 tensor [N, Kp*bits/32], got "
                        f"{qweight.dtype} shape {tuple(qweight.shape)}")
    check_nonempty(where, (f"N ({name}.shape[0])", qweight.shape[0]),
                   (f"K ({name}.shape[1] = Kp*bits/32)", qweight.shape[1]))
    if qweight.shape[1] % bits:
        raise ValueError(f"{name} has {qweight.shape[1]} words per row: not a whole number of "
                         f"32-column blocks of {bits}-bit fields ({bits} words each)")


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               bits: int, group_size: int, k: int | None = None, *,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``W[N, K] = (q - z) * s`` of the affine format, in ``dtype`` (default: scales').

    Computed in float32 (float64 for a float64 ``dtype``) and rounded to ``dtype`` once, as the
    kernels do: a fractional zero point makes ``q - z`` inexact in fp16/bf16."""
    check_affine(qweight, scales, zeros, bits, group_size, where="dequantize")
    dtype = dtype or scales.dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    n = qweight.shape[0]
    q = unpack_bits(qweight, bits).to(work).reshape(n, scales.shape[1], -1)
    s = scales.to(work)[:, :, None]
    z = zeros.to(work)[:, :, None] if zeros is not None else symmetric_zero(bits)
    w = ((q - z) * s).to(dtype).reshape(n, -1)
    return w if k is None else w[:, :k]


def codebook_weight(indices: torch.Tensor, codebook: torch.Tensor, bits: int,
                    k: int | None = None, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dense ``W[N, K] = codebook[n // rows_per_group, q]`` in ``dtype`` (default: codebook's)."""
    check_codebook(indices, codebook, bits, where="codebook_weight")
    n = indices.shape[0]
    q = unpack_bits(indices, bits, k).to(torch.int64)
    table = codebook.to(dtype or codebook.dtype)
    rows = torch.arange(n, device=indices.device) // (n // codebook.shape[0])
    return table[rows[:, None], q]


def empty_affine(n: int, k: int, bits: int, group_size: int | None, symmetric: bool, *,
                 dtype: torch.dtype, device: torch.device | str | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(qweight, scales, zeros)`` of an all-zero ``[n, k]`` weight: every field holds
    ``2**(bits - 1)``, the grid's zero, and scales are one (``zeros`` is None when
    ``symmetric``; the symmetric 1-bit grid, ``±s / 2``, has no zero level: its scales are 0)."""
    check_nonempty("empty_affine", ("N", n), ("K", k))
    gs = effective_group_size(k, group_size)
    kp = padded_k(k, gs)
    zero_q = 2 ** (bits - 1)  # offset binary: q = 2**(b-1) is a zero weight
    # packed on the CPU (one unit: 32 fields), so a meta-device module can be built too
    unit = pack_bits(torch.full((1, WORD_COLS), zero_q, dtype=torch.int32, device="cpu"),
                     bits).to(device)
    qweight = unit.repeat(n, kp // WORD_COLS)  # one packing unit of zeros, tiled
    no_zero_level = symmetric and symmetric_zero(bits) != zero_q
    scales = (torch.zeros if no_zero_level else torch.ones)(n, kp // gs, device=device,
                                                             dtype=dtype)
    zeros = None if symmetric else torch.full_like(scales, float(zero_q))
    return qweight, scales, zeros


def check_affine(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 bits: int, group_size: int, *, where: str = "check_affine") -> None:
    """Validate an affine packed weight (shapes, dtypes, devices), with named errors; an empty
    weight is refused naming the dimension, after ``where`` (the caller)."""
    _check_bits(bits)
    _check_qweight(qweight, bits, where=where)
    n, w = qweight.shape
    kp = packed_k(w, bits)
    if not is_int(group_size):
        raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
    if group_size not in GROUP_SIZES and group_size != kp:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} or the packed row width "
                         f"{kp} (one group per row), got {group_size}")
    if kp % group_size:
        raise ValueError(f"packed row width {kp} is not a multiple of group_size {group_size}; "
                         "pack with the group size (K is padded to it)")
    if not isinstance(scales, torch.Tensor) or not scales.is_floating_point():
        raise TypeError("scales must be a floating-point torch.Tensor")
    if tuple(scales.shape) != (n, kp // group_size):
        raise ValueError(f"scales shape {tuple(scales.shape)} must be (N, Kp/group_size) = "
                         f"({n}, {kp // group_size})")
    if scales.device != qweight.device:
        raise ValueError(f"scales on {scales.device} but qweight on {qweight.device}")
    if zeros is not None:
        check_companion(zeros, "zeros", tuple(scales.shape), scales, "scales")


def check_codebook(indices: torch.Tensor, codebook: torch.Tensor, bits: int, *,
                   where: str = "check_codebook") -> None:
    """Validate a codebook packed weight (shapes, dtypes, devices), with named errors; an empty
    weight (no rows, columns or row groups) is refused naming the dimension, after ``where``."""
    _check_bits(bits, BITS)
    _check_qweight(indices, bits, "indices", where=where)
    n = indices.shape[0]
    if not isinstance(codebook, torch.Tensor) or not codebook.is_floating_point():
        raise TypeError("codebook must be a floating-point torch.Tensor")
    if codebook.dim() != 2 or codebook.shape[1] != 2**bits:
        raise ValueError(f"codebook shape {tuple(codebook.shape)} must be (R, 2**bits) = "
                         f"(R, {2**bits})")
    r = codebook.shape[0]
    check_nonempty(where, ("R (codebook.shape[0], row groups)", r))
    if n % r:
        raise ValueError(f"codebook has {r} row groups, which must divide N={n}")
    if codebook.device != indices.device:
        raise ValueError(f"codebook on {codebook.device} but indices on {indices.device}")


def affine_bytes(n: int, k: int, bits: int, group_size: int | None, dtype: torch.dtype,
                 symmetric: bool = False) -> int:
    """Stored bytes of an affine weight: packed fields + scales (+ zeros)."""
    gs = effective_group_size(k, group_size)
    kp = padded_k(k, gs)
    per_group = (1 if symmetric else 2) * dtype.itemsize
    return n * kp * bits // 8 + n * (kp // gs) * per_group


def codebook_bytes(n: int, k: int, bits: int, row_groups: int, dtype: torch.dtype) -> int:
    """Stored bytes of a codebook weight: packed indices + the table(s)."""
    return n * padded_k(k, None) * bits // 8 + row_groups * 2**bits * dtype.itemsize



def check_affine_inputs(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                        group_size: int) -> None:
    """Named ``TypeError``/``ValueError`` for every bad input of an affine linear
    (``x[..., K]``, the packed weight, ``bias[N]``)."""
    check_affine(qweight, scales, zeros, bits, group_size, where="dequant_linear")
    kp = packed_k(qweight.shape[1], bits)
    unit = WORD_COLS if group_size == kp else group_size
    check_activation(x, qweight.shape[0], kp, unit, scales, "scales", bias,
                     where="dequant_linear")


def check_codebook_inputs(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor,
                          bias: torch.Tensor | None, bits: int) -> None:
    """Named ``TypeError``/``ValueError`` for every bad input of a codebook linear."""
    check_codebook(indices, codebook, bits, where="codebook_linear")
    kp = packed_k(indices.shape[1], bits)
    check_activation(x, indices.shape[0], kp, WORD_COLS, codebook, "codebook", bias,
                     where="codebook_linear")
