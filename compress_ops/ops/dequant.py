"""``compress_ops::dequant_linear`` (affine int8/int4/int3/int2/int1 weights) and
``compress_ops::codebook_linear`` (k-means weight sharing): the low-bit family's ops, over the
packed formats of :mod:`compress_ops.kernels.formats.dequant`, with fake impls and autograd.

Routes (:mod:`.routing`): CUDA runs the Triton kernels. On the CPU, affine weights take torch's
native weight-only kernels where measured faster (:func:`dequant_cpu_route`, crossovers in
``kernels/configs/cpu.json``; int8 with one group per row folds an asymmetric zero point into a
row-sum correction, int2/int3 run as int4), else int8 rows converted in chunks or dequantized
in row chunks + ``F.linear`` (1-bit fields, binary weights, always the latter); codebooks gather
one row chunk at a time (a table lookup per packed byte) + ``F.linear``. No route keeps a dense
copy unless asked (``COMPRESS_OPS_CPU_DENSE_CACHE=1``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from compress_ops.kernels.formats import dequant as _dq
from compress_ops.ops import routing

__all__ = ["dequant_linear", "codebook_linear", "dequant_cpu_route", "native_int8_weight",
           "native_int4_weight", "native_int4_group"]

#: Group sizes torch's int4 CPU kernel takes; a whole-row group is served as one of these, its
#: scale and zero point repeated (:func:`native_int4_group`).
NATIVE_INT4_GROUPS = (32, 64, 128, 256)


def _native_route(bits: int, group_size: int, kp: int, n: int, m: int,
                  dtype: torch.dtype) -> str | None:
    max_m = routing.NATIVE_MAX_M.get((bits, dtype))  # absent: never
    if max_m is None or m > max_m or bits == 1:  # 1 bit: no native route (its zero is 1/2)
        return None
    if bits == 8:
        return "native-int8" if group_size == kp else None
    if (group_size in NATIVE_INT4_GROUPS or group_size == kp) and n % 16 == 0:
        return "native-int4"
    return None


def dequant_cpu_route(x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor | None,
                      bits: int, group_size: int) -> str:
    """Which CPU path :func:`dequant_linear` takes.

    * ``"dense-cache"``: opt-in (``COMPRESS_OPS_CPU_DENSE_CACHE=1``), a dense copy per weight.
    * ``"native-int8"``: ``torch._weight_int8pack_mm`` for int8 with one group per row,
      symmetric or not: the zero point folds into one row-sum correction,
      ``y = s * (x @ (q - 128)^T) + s * (128 - z) * sum(x)``, computed in fp32 and rounded once.
    * ``"native-int4"``: ``torch._weight_int4pack_mm_for_cpu`` for int2/int3/int4 (their fields
      fit torch's int4 packing) with groups of 32..256 or one per row, and N % 16 == 0.
    * ``"int8-convert"``: int8 with one group per row, converted to the activation dtype one
      row chunk at a time (fp16: to fp32) + ``F.linear`` + the same scale and row-sum fold.
    * ``"dequant"``: dequantize in row chunks + ``F.linear``.

    The native routes are taken up to the M where they were measured faster
    (``kernels/configs/cpu.json``, :data:`routing.NATIVE_MAX_M`). With
    ``COMPRESS_OPS_CPU_FP32_VIA_BF16=1`` fp32 activations take the bf16 native routes
    (``"native-int8-via-bf16"``, ``"native-int4-via-bf16"``) up to the bf16 crossovers.

    Precision, norm-relative against float64 ``F.linear`` on the module's ``dense_weight()``
    (the op's bf16 tolerance is 1.6e-2): the native int4 kernel with bf16 activations computes
    with the unrounded ``(q - 8) * s + zero'``, the reference with weights rounded to bf16, and
    few grid levels make that difference the same for many weights of a group: at most 4e-3
    with zero-mean activations (measured 2.0e-3..2.5e-3, 1.0-1.4x dense bf16's error), up to
    ~7e-3 with activations of mean twice their spread (asymmetric int4 / int3 / int2 g128:
    4.3e-3..5.3e-3 / 5.9e-3..6.8e-3 / 6.6e-3..6.8e-3 over seeds; symmetric grids stay at
    1.0-1.5x dense; tested against 8e-3). A single output that cancels to near zero can be off
    by a few percent of its own size. The folded int8 rows stay within 3x dense's error in bf16
    and fp16 (measured up to 2.7x on the routes the shipped table takes, medians 1.0-1.5x,
    :func:`_int8_cpu`) and far inside the fp32 tolerance. The via-bf16 opt-in is outside the
    fp32 tolerance (:func:`routing.cpu_fp32_via_bf16`)."""
    if routing.cpu_dense_cache():
        return "dense-cache"
    n, kp = qweight.shape[0], _dq.packed_k(qweight.shape[1], bits)
    m = x.numel() // max(x.shape[-1], 1)
    if x.dtype == torch.float32 and routing.cpu_fp32_via_bf16():
        route = _native_route(bits, group_size, kp, n, m, torch.bfloat16)
        if route is not None:
            return route + "-via-bf16"
    route = _native_route(bits, group_size, kp, n, m, x.dtype)
    if route is not None:
        return route
    if bits == 8 and group_size == kp:
        return "int8-convert"
    return "dequant"


def native_int8_weight(qweight: torch.Tensor) -> torch.Tensor:
    """``q - 128`` as int8: offset binary -> two's complement, the top bit of every byte flipped
    (int8 fields are the bytes of ``qweight``)."""
    return torch.bitwise_xor(qweight.view(torch.uint8), 0x80).view(torch.int8)


def native_int4_group(group_size: int, kp: int) -> int:
    """The group size torch's int4 kernel runs a weight with: ``group_size`` itself, or for one
    group per row, the largest of :data:`NATIVE_INT4_GROUPS` dividing the packed row ``kp``."""
    if group_size in NATIVE_INT4_GROUPS:
        return group_size
    return next(g for g in reversed(NATIVE_INT4_GROUPS) if kp % g == 0)


def _int4_scales_zeros(scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                       kp: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """float32 ``s`` and ``zero' = (2**(b - 1) - z) * s`` per group of torch's int4 kernel (a
    whole-row group repeated), and that group size."""
    gs = kp // scales.shape[1]
    group = native_int4_group(gs, kp)
    s = scales.float()
    zp = (2.0 ** (bits - 1) - zeros.float()) * s if zeros is not None else torch.zeros_like(s)
    rep = gs // group
    if rep > 1:
        s, zp = s.repeat_interleave(rep, 1), zp.repeat_interleave(rep, 1)
    return s, zp, group


def native_int4_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       dtype: torch.dtype, bits: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """torch's int4 CPU packing of a b-bit affine weight (b <= 4: the fields are int4 values)
    and its scales-and-zeros tensor in ``dtype``, with groups of :func:`native_int4_group` (a
    whole-row group's scale and zero point repeated).

    torch's form is ``W = (q4 - 8) * s + zero'``. The fields go in shifted by
    ``8 - 2**(b - 1)`` (int2: +6, int3: +4), so ``zero' = (2**(b - 1) - z) * s`` is small (zero
    for a symmetric grid): unshifted, the int2 grid's ``zero' = (8 - z) * s ~ 6.5 s`` rounded to
    bf16 moved every weight of a group alike by ~1% of ``s``. What rounding ``zero'`` to
    ``dtype`` still moves is put back by :func:`_dequant_linear_cpu` (one small matmul of the
    activations' group sums)."""
    shift = 8 - 2 ** (bits - 1)
    q = _dq.unpack_bits(qweight, bits)
    if shift:
        q = q + shift
    packed = torch._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
    s, zp, _ = _int4_scales_zeros(scales, zeros, bits, q.shape[1])
    sz = torch.stack([s, zp], dim=-1).transpose(0, 1).contiguous().to(dtype)
    return packed, sz


def _native_int4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 dtype: torch.dtype, bits: int
                 ) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None]:
    """The cached form of the native int4 route: packing, scales-and-zeros, group size, and the
    rounding error of ``zero'`` in ``dtype`` (``[groups, N]`` float32; None where it is exact,
    as for symmetric grids). A group's ``zero'`` multiplies the sum of its activations, so with
    activations of non-zero mean its rounding error adds up over the group (int4 g128, mean-2
    activations: 6.6e-3 norm-relative error uncorrected, 4.2e-3 corrected)."""
    packed, sz = native_int4_weight(qweight, scales, zeros, dtype, bits)
    kp = _dq.packed_k(qweight.shape[1], bits)
    _, zp, group = _int4_scales_zeros(scales, zeros, bits, kp)
    residual = (zp - zp.to(dtype).float()).t().contiguous()
    return packed, sz, group, residual if bool(residual.any()) else None


# --------------------------------------------------------------------------------------------
# CPU paths
# --------------------------------------------------------------------------------------------


def _byte_bits() -> torch.Tensor:
    """``[256]`` int64 whose 8 bytes are the bits of the index (byte ``i`` = bit ``i``)."""
    b = torch.arange(256)
    return ((b[:, None] >> torch.arange(8)) & 1).to(torch.uint8).view(torch.int64).view(256)


_BYTE_BITS = _byte_bits()


def _fields_u8(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """The unsigned fields ``q[r, Kp]`` of packed rows as uint8 (the values of
    ``_dq.unpack_bits``), by byte ops: 4-16x fewer bytes touched than unpacking int32 words."""
    r = qweight.shape[0]
    b = qweight.contiguous().view(torch.uint8)  # little-endian: byte j of word w = bits 8j..
    if bits == 8:
        return b
    if bits == 1:  # one bit plane: byte t of word j holds columns 32j + 8t + (0..7)
        return _BYTE_BITS.index_select(0, b.reshape(-1).int()).view(torch.uint8).view(r, -1)
    if bits == 3:  # bit planes: byte t of word 3j + p holds bit p of columns 32j + 8t + (0..7)
        planes = _BYTE_BITS.index_select(0, b.reshape(-1).int()).view(r, -1, 3, 4)
        q = planes[:, :, 0] | (planes[:, :, 1] << 1) | (planes[:, :, 2] << 2)  # 8 fields a word
        return q.view(torch.uint8).view(r, -1)
    mask = 2**bits - 1
    fields = [b & mask] + [(b >> (bits * i)) & mask for i in range(1, 8 // bits - 1)]
    fields.append(b >> (8 - bits))
    byte_order = torch.stack(fields, dim=-1).view(r, -1)  # field i of byte j at P j + i
    q = torch.empty_like(byte_order)
    q[:, _byte_field_columns(bits, byte_order.shape[1]).view(-1)] = byte_order
    return q


def _row_step(n: int, kp: int) -> int:
    return min(n, max(64, routing.CPU_CHUNK_ELEMS // kp))


def _parts(bits: int) -> int:
    """Fields per byte read as separate column blocks by the dequantize route (bits 2 and 4)."""
    return 8 // bits if bits in (2, 4) else 1


@functools.lru_cache(maxsize=64)
def _byte_field_columns(bits: int, kp: int) -> torch.Tensor:
    """``[Kp / P, P]`` int64: the column of field ``i`` (low bits first) of packed byte ``j``
    of a row (``P = 8 / bits`` fields per byte; formats 2 and 3 interleave 2- and 4-bit
    fields within a word and format 3 permutes each 32-column block, so a byte's fields are
    not adjacent columns)."""
    p, per = 8 // bits, 32 // bits
    word_col = torch.tensor(_dq.field_columns(bits))  # field position -> column in its word
    j = torch.arange(kp // p)
    pos = (j % 4)[:, None] * p + torch.arange(p)[None, :]  # the field's position in its word
    # its position in the row (version 2's order), then format 3's block permutation
    return _dq.position_columns(bits, kp)[(j // 4)[:, None] * per + word_col[pos]]


def _part_major(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``x[..., Kp]``'s columns in the order :func:`_dequant_rows` writes a row: the column of
    field ``i`` of byte ``j`` (``P`` fields per byte) at ``i * Kp / P + j``."""
    if _parts(bits) == 1:
        return x
    return x.index_select(-1, _byte_field_columns(bits, x.shape[-1]).t().reshape(-1))


def _dequant_rows(buf: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                  zeros: torch.Tensor | None, bits: int, group_size: int,
                  fold_zero: bool = False) -> torch.Tensor:
    """``(q - z) * s`` of the packed rows in float32, written into ``buf[:rows]`` with the same
    float32 operations as ``_dq.dequantize`` (so the same values), its columns in
    :func:`_part_major` order: at bits 2 and 4 every field of a byte goes to its own block of
    columns, one masked shift per field straight into the float buffer, with no pass that
    interleaves them (2x faster than unpacking in column order).

    ``fold_zero``: ``(q - 2**(b - 1)) * s`` instead, the grid's midpoint taken off in the bytes
    (int8) rather than in a float pass; what is left of the zero point, ``z - 2**(b - 1)`` (0
    for symmetric grids of 2+ bits; not used for the symmetric 1-bit grid, whose zero is 1/2),
    is the caller's."""
    r, kp = qweight.shape[0], buf.shape[1]
    p, groups = _parts(bits), kp // group_size
    w = buf[:r].view(r, p, groups, group_size // p)
    mid = 2 ** (bits - 1)
    sym_zero = _dq.symmetric_zero(bits)  # mid, or 1/2 for the binary 1-bit grid
    if p == 1:
        f = _fields_u8(qweight, bits).view(r, groups, group_size)
        if fold_zero:  # q - mid in int8: the top bit flipped (int8) or mid taken off (int3)
            f = (torch.bitwise_xor(f, 0x80) if bits == 8 else f - mid).view(torch.int8)
        w[:, 0].copy_(f)
    else:
        b = qweight.contiguous().view(torch.uint8).view(r, groups, group_size // p)
        mask = 2**bits - 1
        for i in range(p):
            f = b & mask if i == 0 else (b >> (bits * i)) & mask
            w[:, i].copy_(f.view(torch.int8).sub_(mid) if fold_zero else f)
    if not fold_zero:
        w.sub_(sym_zero if zeros is None else zeros.float()[:, None, :, None])
    w.mul_(scales.float()[:, None, :, None])
    return buf[:r]


def _dequant_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                 group_size: int) -> torch.Tensor:
    """Dequantize one row chunk at a time into reused buffers (the dense weight never exists
    whole) + ``F.linear`` per chunk, on ``x`` padded to ``Kp`` and its columns reordered to
    match the chunk's (padding columns hold finite weights of zero activations).

    fp32 activations skip one float pass over every chunk: the chunk holds
    ``(q - 2**(b - 1)) * s`` (the midpoint taken off in int8) and the rest of the zero point
    comes off after, ``y -= sum over groups of (z - 2**(b - 1)) * s * (the group's sum of x)``
    (one small matmul; nothing for symmetric grids; 1.3x faster at 4096 x 4096, M = 1, with
    rounding errors like dequantizing's). Narrower activations get the rounded
    ``(q - z) * s`` of ``dense_weight()`` itself."""
    k = x.shape[-1]
    n, kp = qweight.shape[0], _dq.packed_k(qweight.shape[1], bits)
    step = _row_step(n, kp)
    xp = x if kp == k else F.pad(x, (0, kp - k))
    xp = _part_major(xp, bits)
    # (not the symmetric 1-bit grid: its zero point 1/2 is not the midpoint taken off in int8)
    fold = x.dtype == torch.float32 and not (zeros is None and bits == 1)
    buf = torch.empty(step, kp, dtype=torch.float32)
    cast = None if fold else torch.empty(step, kp, dtype=x.dtype)
    outs = []
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        w = _dequant_rows(buf, qweight[r0:r1], scales[r0:r1],
                          None if zeros is None else zeros[r0:r1], bits, group_size, fold)
        if cast is not None:
            w = cast[:r1 - r0].copy_(w)
        outs.append(F.linear(xp, w, None if bias is None else bias[r0:r1]))
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
    if fold and zeros is not None:
        groups = kp // group_size
        xsum = xp.reshape(-1, _parts(bits), groups, group_size // _parts(bits)).sum((1, 3))
        zs = (zeros.float() - 2.0 ** (bits - 1)) * scales.float()
        y = y - (xsum @ zs.t()).reshape(y.shape)
    return y


def _int8_matmul(xw: torch.Tensor, qweight: torch.Tensor, s_k: torch.Tensor | None, k: int,
                 row_sums: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``xw @ (q - 128)^T`` (times ``s_k``, by ``torch._weight_int8pack_mm``; ``s_k`` None:
    ``F.linear`` on ``q - 128`` converted to ``xw``'s dtype), one row chunk of the weight at a
    time converted into a reused buffer, still in cache when it is read; with ``row_sums`` also
    ``Q``, the sum of ``q - 128`` over the first ``k`` columns of every row, exact (int32)."""
    n, kp = qweight.shape[0], _dq.packed_k(qweight.shape[1], 8)
    native = s_k is not None
    step = min(n, max(16, routing.INT8_CHUNK_BYTES // kp)) if native else _row_step(n, kp)
    buf = torch.empty(step, kp // 4, dtype=torch.int32)
    wbuf = None if native else torch.empty(step, kp, dtype=xw.dtype)
    ones = None
    if row_sums:
        ones = torch.zeros(1, kp, dtype=torch.int8)
        ones[0, :k] = 1
    accs, sums = [], []
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        # two's complement of 4 fields at a time: each int32 word XOR 0x80808080
        w8 = torch.bitwise_xor(qweight[r0:r1], -0x7F7F7F80, out=buf[:r1 - r0]).view(torch.int8)
        if native:
            accs.append(torch._weight_int8pack_mm(xw, w8, s_k[r0:r1]))
        else:
            accs.append(F.linear(xw, wbuf[:r1 - r0].copy_(w8)[:, :k]))
        if ones is not None:
            sums.append(torch._int_mm(ones, w8.t())[0])
    acc = accs[0] if len(accs) == 1 else torch.cat(accs, dim=-1)
    if ones is None:
        return acc, None
    return acc, sums[0] if len(sums) == 1 else torch.cat(sums)


#: The fold's 16-bit matmul output may be at most this many times the result (row norms)
#: before the call is redone with centred activations (:func:`_int8_cpu`).
INT8_FOLD_MAX_GROWTH = 2.0


def _int8_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
              zeros: torch.Tensor | None, bias: torch.Tensor | None, route: str
              ) -> torch.Tensor:
    """int8 with one group per row: ``"native-int8"`` (``torch._weight_int8pack_mm``, in bf16
    for ``-via-bf16``) or ``"int8-convert"`` (``q - 128`` converted to the activation dtype,
    fp16 to fp32, + ``F.linear``), the weight converted to two's complement (``q - 128``: the
    top bit of every byte flipped) one row chunk at a time (:func:`_int8_matmul`): nothing is
    held between calls.

    The zero point of an asymmetric row folds into a row-sum correction, exact algebra since
    ``(q - z) * s = (q - 128) * s + (128 - z) * s``::

        y = s * (x @ (q - 128)^T) + s * (128 - z) * sum(x) + bias

    summed in float32 and rounded to the activation dtype once. Where the matmul's output is
    16-bit (the bf16 kernel, bf16 ``F.linear``), it rounds ``s * (x @ (q - 128)^T)``, which
    holds the term ``s * (z - 128) * sum(x)``: with activations of non-zero mean that term
    dwarfs ``y``, and so does its rounding error (measured 9x dense bf16's error, 1.4e-2 at
    K = 4096, mean-1 activations). So where that output's row norm exceeds
    :data:`INT8_FOLD_MAX_GROWTH` times the result's, the call is redone with ``x`` centred,
    ``x = mean + xc``::

        y = s * (xc @ (q - 128)^T) + s * (128 - z) * sum(xc) + mean * s * (Q + (128 - z) * K)

    with ``Q`` the sum of ``q - 128`` over the K columns, exact (``torch._int_mm`` of a row of
    ones, on the chunk already in cache). ``xc`` goes to the matmul as two rows, its bf16
    rounding and the remainder: rounding ``xc`` alone would lose the mean wherever it is below
    half an ulp of ``x``, the same error on every column (measured 24x dense's, 3.9e-2, on
    all-positive weights). A centred call costs about 1.4x an uncentred one. What is left: the
    16-bit product may still be up to :data:`INT8_FOLD_MAX_GROWTH` times the result, so the
    error stays within 3x that of dense ``F.linear`` in the same dtype (measured at most 2.7x
    in bf16, with zero-mean activations; ``tests/compress_ops/ops/test_cpu_lowbit.py``). A NaN
    or Inf in a row of ``x`` makes that whole output row non-finite, as in dense
    ``F.linear``."""
    k = x.shape[-1]
    n, kp = qweight.shape[0], _dq.packed_k(qweight.shape[1], 8)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    native = route.startswith("native-int8")
    if native:
        work = torch.bfloat16 if route.endswith("-via-bf16") else x.dtype
    else:  # fp16 runs in fp32: an fp16 product x @ (q - 128)^T could overflow where y does not
        work = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
    scaled = native and scales.dtype == work
    s_k = None
    if native:
        s_k = scales[:, 0].contiguous() if scaled else torch.ones(n, dtype=work)

    def matmul(xw: torch.Tensor, row_sums: bool = False):
        if native and kp != k:  # the kernel takes the padded width (it crashes on K = 70)
            xw = F.pad(xw, (0, kp - k))
        return _int8_matmul(xw.contiguous(), qweight, s_k, k, row_sums)

    xw = x2.to(work)
    acc, _ = matmul(xw)
    if scaled and zeros is None and bias is None and work == x.dtype:
        return acc.reshape(*lead, n)
    s = scales[:, 0].float()
    y = acc.float() if acc.dtype != torch.float32 else acc
    if not scaled:
        y.mul_(s)
    if zeros is not None:
        sc = s * (128.0 - zeros[:, 0].float())
        grown = y.norm(dim=-1) if work != torch.float32 else None
        y.addcmul_(xw.float().sum(-1, keepdim=True), sc)
        if grown is not None and not bool((grown <= INT8_FOLD_MAX_GROWTH
                                           * y.norm(dim=-1)).all()):
            xc = x2.double()
            mean = xc.mean(-1, keepdim=True)
            xc = xc - mean
            hi = xc.to(work)
            xw = torch.cat([hi, (xc - hi).to(work)])  # [2M, K]: xc to ~16 bits
            acc, q_sum = matmul(xw, row_sums=True)
            m = x2.shape[0]
            y = acc[:m].float().add_(acc[m:])
            if not scaled:
                y.mul_(s)
            xsum = xw.float().sum(-1, keepdim=True)
            y.addcmul_(xsum[:m] + xsum[m:], sc)
            y.addcmul_(mean.float(), s * q_sum.float() + sc * k)
    if bias is not None:
        y.add_(bias)
    return y.to(x.dtype).reshape(*lead, n)


def _dequant_linear_cpu(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                        group_size: int) -> torch.Tensor:
    k = x.shape[-1]
    n, kp = qweight.shape[0], _dq.packed_k(qweight.shape[1], bits)
    route = dequant_cpu_route(x, qweight, zeros, bits, group_size)
    if route == "dense-cache":
        w = routing.derived("dense", (qweight, scales, zeros), (bits, group_size, k),
                            lambda: _dq.dequantize(qweight, scales, zeros, bits, group_size, k))
        return F.linear(x, w, bias)
    if route == "dequant":
        return _dequant_cpu(x, qweight, scales, zeros, bias, bits, group_size)
    if route == "int8-convert" or route.startswith("native-int8"):
        return _int8_cpu(x, qweight, scales, zeros, bias, route)
    lead = x.shape[:-1]
    kdtype = torch.bfloat16 if route.endswith("-via-bf16") else x.dtype
    x2 = x.reshape(-1, k).to(kdtype).contiguous()
    if kp != k:  # the kernel takes the padded width
        x2 = F.pad(x2, (0, kp - k))
    # torch's int4 CPU packing costs ~170x the matmul to build (4096^2: 84 ms against
    # 0.5 ms), so it is cached: about the size of qweight (twice an int2 one), plus the
    # snapshot the cache checks the inputs against on every call (routing.derived).
    packed, sz, group, residual = routing.derived(
        "native-int4", (qweight, scales, zeros), (kdtype, bits, group_size),
        lambda: _native_int4(qweight, scales, zeros, kdtype, bits))
    y = torch._weight_int4pack_mm_for_cpu(x2, packed, group, sz)
    if residual is None and kdtype == x.dtype:
        return (y if bias is None else y + bias).reshape(*lead, n)
    y = y.float()
    if residual is not None:  # the rounding of zero' to kdtype, times each group's sum of x
        xs = x.reshape(-1, k).float()
        if kp != k:
            xs = F.pad(xs, (0, kp - k))
        y.add_(xs.view(-1, kp // group, group).sum(-1) @ residual)
    if bias is not None:
        y.add_(bias.float())
    return y.to(x.dtype).reshape(*lead, n)


def check_format_version(format_version: int, where: str) -> None:
    """The ops read the packed fields of this build's layout only
    (:data:`~compress_ops.kernels.formats.dequant.FORMAT_VERSION`): another version is refused
    by name (``formats.dequant.repack`` converts versions 1 and 2).

    The modules pass their version explicitly, so it is part of every traced graph: a
    ``torch.compile`` cache entry made with another layout's backward (AOTAutograd's cache key
    does not see a custom op's autograd formula, pytorch/pytorch#144344) is not reused."""
    if format_version != _dq.FORMAT_VERSION:
        raise ValueError(f"{where}: packed-field format version {format_version} is not this "
                         f"build's ({_dq.FORMAT_VERSION}); repack the fields "
                         f"(compress_ops.kernels.formats.dequant.repack)")


@torch.library.custom_op("compress_ops::dequant_linear", mutates_args=())
def dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                   zeros: torch.Tensor | None, bias: torch.Tensor | None, bits: int,
                   group_size: int, format_version: int = _dq.FORMAT_VERSION) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ ((q - z) * s)^T + bias``, ``q`` b-bit packed
    (``compress_ops.kernels.dequant``); ``zeros=None`` is the symmetric grid;
    ``format_version``: the packed-field layout (:func:`check_format_version`)."""
    check_format_version(format_version, "dequant_linear")
    _dq.check_affine_inputs(x, qweight, scales, zeros, bias, bits, group_size)
    if routing.use_triton(x):
        return routing.kernels("dequant").dequant_matmul(x, qweight, scales, zeros, bias, bits,
                                                          group_size, checked=True)
    return _dequant_linear_cpu(x, qweight, scales, zeros, bias, bits, group_size)


@dequant_linear.register_fake
def _(x, qweight, scales, zeros, bias, bits, group_size, format_version=_dq.FORMAT_VERSION):
    check_format_version(format_version, "dequant_linear")
    _dq.check_affine_inputs(x, qweight, scales, zeros, bias, bits, group_size)
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _dequant_setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, bias, bits, group_size, _format_version = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.meta = (bits, group_size, x.shape[-1], bias is not None)


def _dequant_backward(ctx, grad):
    qweight, scales, zeros = ctx.saved_tensors
    bits, group_size, k, has_bias = ctx.meta
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ _dq.dequantize(qweight, scales, zeros, bits, group_size, k,
                                       dtype=grad.dtype)
    if has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, None, None, grad_bias, None, None, None


dequant_linear.register_autograd(_dequant_backward, setup_context=_dequant_setup_context)


_INT_OF_SIZE = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _codebook_lut(codebook: torch.Tensor, bits: int, dtype: torch.dtype
                  ) -> tuple[torch.Tensor, int, int]:
    """``(lut, entries, per)``: the values one packed byte (bits 2, 4, 8: ``8 / bits`` columns,
    in column order) or one field (bits 3) stands for, per row group: ``lut[g * entries + i]``
    is ``per`` values, viewed as one integer where they fill 2, 4 or 8 bytes (one gather each)."""
    table = codebook.to(dtype)
    if bits == 3:
        lut, entries, per = table.reshape(-1, 1), 8, 1
    else:
        per = 8 // bits
        byte = torch.arange(256, device=codebook.device)
        fields = torch.stack([(byte >> (bits * i)) & (2**bits - 1) for i in range(per)], -1)
        lut, entries = table[:, fields].reshape(-1, per), 256
    size = per * lut.element_size()
    if size in _INT_OF_SIZE:
        lut = lut.contiguous().view(_INT_OF_SIZE[size]).view(-1)
    return lut, entries, per


def _codebook_linear_cpu(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor,
                         bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Gather one row chunk of the weight at a time into a reused buffer in ``x``'s dtype (a
    table lookup per packed byte: 2 columns at 4 bits, 4 at 2 bits) + ``F.linear`` per chunk.
    Or the opt-in dense copy."""
    k = x.shape[-1]
    n, kp = indices.shape[0], _dq.packed_k(indices.shape[1], bits)
    if routing.cpu_dense_cache():
        w = routing.derived("dense", (indices, codebook), (bits, k),
                            lambda: _dq.codebook_weight(indices, codebook, bits, k))
        return F.linear(x, w, bias)
    lut, entries, per = _codebook_lut(codebook, bits, x.dtype)
    rpg = n // codebook.shape[0]
    step = _row_step(n, kp)
    pad = None
    if bits in (2, 4):  # byte-ordered columns (format 2 interleaves a word's fields): x to match
        cols = _byte_field_columns(bits, kp).reshape(-1)
        x = (x if kp == k else F.pad(x, (0, kp - k))).index_select(-1, cols)
        pad = (cols >= k).nonzero().view(-1) if kp > k else None  # entries of padding: not read
        k = kp
    buf = torch.empty(step * kp, dtype=x.dtype)
    dst = buf.view(lut.dtype) if lut.dim() == 1 else buf.view(-1, per)
    outs = []
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        rows = indices[r0:r1]
        idx = (_fields_u8(rows, 3) if bits == 3 else rows.view(torch.uint8)).int()
        if rpg < n:  # several tables: offset each row's indices to its group's
            idx += (torch.arange(r0, r1, dtype=torch.int32) // rpg * entries)[:, None]
        torch.index_select(lut, 0, idx.view(-1), out=dst[:idx.numel()])
        w = buf[:(r1 - r0) * kp].view(r1 - r0, kp)
        if pad is not None:  # 0, not the looked-up entry (0 * a NaN entry would be NaN)
            w.index_fill_(1, pad, 0)
        outs.append(F.linear(x, w[:, :k], None if bias is None else bias[r0:r1]))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@torch.library.custom_op("compress_ops::codebook_linear", mutates_args=())
def codebook_linear(x: torch.Tensor, indices: torch.Tensor, codebook: torch.Tensor,
                    bias: torch.Tensor | None, bits: int,
                    format_version: int = _dq.FORMAT_VERSION) -> torch.Tensor:
    """``y[..., N] = x[..., K] @ codebook[n // (N / R), q]^T + bias``, ``q`` b-bit packed;
    ``format_version``: the packed-field layout (:func:`check_format_version`)."""
    check_format_version(format_version, "codebook_linear")
    _dq.check_codebook_inputs(x, indices, codebook, bias, bits)
    if routing.use_triton(x):
        return routing.kernels("dequant").codebook_matmul(x, indices, codebook, bias, bits,
                                                           checked=True)
    return _codebook_linear_cpu(x, indices, codebook, bias, bits)


@codebook_linear.register_fake
def _(x, indices, codebook, bias, bits, format_version=_dq.FORMAT_VERSION):
    check_format_version(format_version, "codebook_linear")
    _dq.check_codebook_inputs(x, indices, codebook, bias, bits)
    return x.new_empty(*x.shape[:-1], indices.shape[0])


def _codebook_setup_context(ctx, inputs, output) -> None:
    x, indices, codebook, bias, bits, _format_version = inputs
    # x is needed only for the codebook gradient (fine-tuning the shared values).
    ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, indices, codebook)
    ctx.meta = (bits, x.shape[-1], bias is not None)


def _codebook_backward(ctx, grad):
    x, indices, codebook = ctx.saved_tensors
    bits, k, has_bias = ctx.meta
    grad_x = grad_codebook = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad @ _dq.codebook_weight(indices, codebook, bits, k, dtype=grad.dtype)
    if ctx.needs_input_grad[2]:
        # dL/dcodebook[r, c] = sum of dL/dW[n, k] over the weights of row group r that use c
        n = indices.shape[0]
        r = codebook.shape[0]
        g = grad.reshape(-1, n).t().float() @ x.reshape(-1, k).float()  # dL/dW [N, K]
        q = _dq.unpack_bits(indices, bits, k).to(torch.int64)
        flat = q + (torch.arange(n, device=q.device) // (n // r))[:, None] * 2**bits
        grad_codebook = torch.zeros(r * 2**bits, device=g.device, dtype=torch.float32)
        grad_codebook.index_add_(0, flat.reshape(-1), g.reshape(-1))
        grad_codebook = grad_codebook.reshape(r, 2**bits).to(codebook.dtype)
    if has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
    return grad_x, None, grad_codebook, grad_bias, None, None


codebook_linear.register_autograd(_codebook_backward, setup_context=_codebook_setup_context)
