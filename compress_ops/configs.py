"""What a user asks for: the config dataclasses, the registry that maps a config type to its
transform, and the one exception hierarchy for "this module cannot be compressed".

Configs are frozen dataclasses validated in ``__post_init__`` (named ``TypeError`` /
``ValueError``), hashable, so equal configs group layers (a shared codebook spans the layers of
equal configs). Nothing here builds a module: a family's *transform*
(:mod:`compress_ops.transforms`) reads the config's fields and calls its module's
``from_dense`` with plain values, and registers itself here with :func:`register_transform`.

Exceptions::

    UnsupportedModule            a transform leaves this module dense; the message says why
    +-- UnfusableError           (also a ValueError) a chain the fused dw+pw unit cannot reproduce
    +-- UnsupportedWeight        (also a ValueError) the weight's values cannot be compressed as
                                 asked (non-finite values; not 2:4 under prune=False)

``compress_`` leaves a module dense on ``UnsupportedModule`` and lists the reason in
``report()``, except for ``UnsupportedWeight``, which it raises: the user asked for that
compression explicitly and the weights cannot take it. ``plan()`` treats every
``UnsupportedModule`` as "not an option for this layer".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from compress_ops._validate import check_bool, check_choice, check_int, check_number
from compress_ops.kernels.formats.dequant import BITS, GROUP_SIZES

__all__ = [
    "CompressionConfig",
    "Sparse24Config",
    "QuantConfig",
    "CodebookConfig",
    "LowRankConfig",
    "HashedConfig",
    "SharedFilterConfig",
    "DWSepFuseConfig",
    "TernaryConfig",
    "W8A8Config",
    "UnsupportedModule",
    "UnfusableError",
    "UnsupportedWeight",
    "AlreadyCompressedError",
    "Transform",
    "register_transform",
    "transform_for",
    "per_layer_configs",
    "handled_types",
]


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


class UnsupportedModule(Exception):
    """Raised by a transform for a module it leaves dense; the message says why."""


class AlreadyCompressedError(ValueError):
    """``compress_`` changed nothing because the layers its config applies to are compressed
    already (running two configs in sequence on one model); the message names them."""


class UnfusableError(UnsupportedModule, ValueError):
    """A module chain that the fused unit cannot reproduce exactly; the message says why."""


class UnsupportedWeight(UnsupportedModule, ValueError):
    """The weight's values cannot be compressed as the config asks (the message says why)."""


# --------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompressionConfig:
    """Base of every config. ``per_layer``: the config applies to one layer at a time, so it
    can be a :class:`~compress_ops.Recipe` rule and a ``plan()`` candidate (False for configs
    that match chains of layers)."""

    per_layer: ClassVar[bool] = True

    @property
    def needs_calibration(self) -> bool:
        """Whether compressing with this config reads calibration data (``compress_(...,
        calib=batches)``): the layer's input Hessian for GPTQ."""
        return False


@dataclass(frozen=True)
class Sparse24Config(CompressionConfig):
    """2:4 structured sparsity for ``nn.Linear`` (along ``in_features``).

    ``prune=True`` keeps two weights of every group of four, chosen by ``method``:
    ``"magnitude"`` (the two largest ``|w|``), ``"wanda"`` (the largest ``|w| * ||x||``) or
    ``"sparsegpt"`` (least Optimal-Brain-Surgeon saliency removed, the kept weights updated to
    absorb the error; :func:`compress_ops.sparsify.sparsegpt_2to4`, ``damp`` as GPTQ's). The
    last two read calibration data: ``compress_(model, config, calib=batches)``. With
    ``prune=False`` the weights must already be 2:4 (``ValueError`` otherwise).
    """

    prune: bool = True
    method: str = "magnitude"
    damp: float = 0.01

    def __post_init__(self) -> None:
        check_bool("prune", self.prune)
        check_choice("method", self.method, ("magnitude", "wanda", "sparsegpt"))
        check_number("damp", self.damp, low=0.0, high=1.0, high_open=True)
        if not self.prune and self.method != "magnitude":
            raise ValueError(f"method={self.method!r} chooses which weights to prune; with "
                             f"prune=False the weights are 2:4 already")

    @property
    def needs_calibration(self) -> bool:
        return self.method != "magnitude"


@dataclass(frozen=True)
class QuantConfig(CompressionConfig):
    """Weight-only affine quantization of ``nn.Linear``: ``bits`` in {2, 3, 4, 8}, one scale
    (and, unless ``symmetric``, one zero point) per ``group_size`` input features of a row
    (32, 64, 128, 256, or ``None`` for the whole row). ``search_steps`` > 0 searches a
    shrunk range per group (least squared error); 0 is plain min/max round-to-nearest.

    ``bits=1``: binary weights, ``sign(w) * s`` with ``s`` the group's mean ``|w|``
    (XNOR-Net; :func:`compress_ops.quantize.quantize_absmean`), stored as 1-bit fields, 32 per
    int32 word, with one scale per group (``W = (q - 1/2) 2s``). One bit loses most of a
    trained layer's accuracy without retraining: train it with
    :func:`compress_ops.qat.prepare_qat`. ``symmetric``, ``search_steps`` and ``method`` other
    than ``"rtn"`` do not apply.

    ``method``: ``"rtn"`` rounds every weight to its nearest level; ``"gptq"`` chooses the
    levels with GPTQ's error feedback through the layer's input Hessian
    (:func:`compress_ops.quantize.gptq_affine`: the same grids and packed format, less output
    error), which needs calibration data: ``compress_(model, config, calib=batches)``.
    ``act_order`` (GPTQ: columns in order of decreasing input energy, static groups) and
    ``damp`` (GPTQ: the fraction of the mean Hessian diagonal added to it) tune it.
    ``"awq"`` (:mod:`compress_ops.awq`) scales each layer's input channels by the activation
    magnitudes (searched to least output error), folds the scales exactly into the norm or
    linear before the layer, then rounds to nearest; also from ``calib``. Layers with no exact
    fold are rounded to nearest unscaled, and a warning lists them.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    search_steps: int = 20
    method: str = "rtn"
    act_order: bool = True
    damp: float = 0.01

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, (1, *BITS))
        if self.group_size is not None:
            check_choice("group_size", self.group_size, GROUP_SIZES, hint="or None (whole row)")
        check_bool("symmetric", self.symmetric)
        check_int("search_steps", self.search_steps, min=0)
        check_choice("method", self.method, ("rtn", "gptq", "awq"))
        if self.bits == 1 and self.method != "rtn":
            raise ValueError(f"bits=1 (binary, sign times mean |w|) has no method "
                             f"{self.method!r}; use method='rtn', or QAT (co.qat.prepare_qat)")
        check_bool("act_order", self.act_order)
        check_number("damp", self.damp, low=0.0, high=1.0, high_open=True)

    @property
    def needs_calibration(self) -> bool:
        return self.method in ("gptq", "awq")


@dataclass(frozen=True)
class TernaryConfig(CompressionConfig):
    """Ternary weights for ``nn.Linear`` (BitNet b1.58 / TTQ style): every weight is
    ``-s``, ``0`` or ``+s``, one scale ``s`` per ``group_size`` input features of a row
    (``None``: the row), ``s`` the group's mean ``|w|`` and the threshold ``s / 2``
    ("absmean", :func:`compress_ops.quantize.quantize_absmean`). Stored in the 2-bit format
    (a :class:`~compress_ops.nn.QuantLinear` with a symmetric 2-bit grid), which every low-bit
    kernel reads; 5 trits per byte would take 0.8x the bytes but need a base-3 decode per
    weight. Round-to-nearest on a trained layer loses much of its accuracy: train with
    :func:`compress_ops.qat.prepare_qat` (the scale recomputed every step, as BitNet does)."""

    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.group_size is not None:
            check_choice("group_size", self.group_size, GROUP_SIZES, hint="or None (whole row)")


@dataclass(frozen=True)
class W8A8Config(CompressionConfig):
    """8-bit weights *and* activations for ``nn.Linear``
    (:class:`~compress_ops.nn.W8A8Linear`): on the GPU the tensor cores multiply 8-bit
    operands at twice the fp16 rate, so compute-bound layers (large batches, prefill) run
    faster; weight-only configs (:class:`QuantConfig`) help memory-bound ones.

    ``dtype``: ``"int8"`` (int8 x int8 -> int32 tensor cores, every GPU) or ``"fp8"`` (e4m3,
    sm_89+; emulated elsewhere, and ``report()`` says so). Weights: symmetric, one scale per
    output channel. Activations: ``act_scale="dynamic"`` quantizes each row (token) with its own
    absmax scale inside the op; ``"static"`` uses one scale per layer, the largest ``|x|`` seen
    on calibration data (``compress_(model, config, calib=batches)``): no reduction at run
    time, but inputs beyond the calibrated range clip.

    ``smoothing`` (SmoothQuant, Xiao et al. 2023): ``alpha`` in ``[0, 1]`` moves the
    quantization difficulty of outlier activation channels into the weights, per input channel
    ``s = max|X|^alpha / max|W|^(1 - alpha)`` (from ``calib``), folded exactly into the norm or
    linear before the layer (``x / s``; the weight's columns times ``s``), where the block's
    output provably does not change (:mod:`compress_ops.awq`'s fold search). A layer with no
    exact fold carries its factors in the op (``W8A8Linear``'s ``smooth``: one multiply per
    input element, fused into the activation's quantization), and ``report()`` says which.
    ``smoothing="auto"`` searches ``alpha`` for each group of layers reading one input, among
    :data:`compress_ops.smoothquant.ALPHAS` and no smoothing, by the output error predicted
    from the calibration statistics (:func:`compress_ops.smoothquant.search_alpha`); the
    chosen ``alpha`` is in ``report()``.
    """

    dtype: str = "int8"
    smoothing: float | str | None = None
    act_scale: str = "dynamic"

    def __post_init__(self) -> None:
        check_choice("dtype", self.dtype, ("int8", "fp8"))
        if isinstance(self.smoothing, str):
            check_choice("smoothing", self.smoothing, ("auto",),
                         hint="or a number alpha in [0, 1], or None")
        elif self.smoothing is not None:
            check_number("smoothing", self.smoothing, low=0.0, high=1.0)
        check_choice("act_scale", self.act_scale, ("dynamic", "static"))

    @property
    def needs_calibration(self) -> bool:
        return self.smoothing is not None or self.act_scale == "static"


@dataclass(frozen=True)
class HashedConfig(CompressionConfig):
    """Hashed weights for ``nn.Linear`` (HashedNets, Chen et al. 2015): each layer becomes a
    :class:`~compress_ops.nn.HashedLinear` whose ``out * in`` virtual weights share ``B``
    trainable buckets through a fixed hash of the position; no index is stored.

    ``compression``: ``B = round(compression * out * in)`` (default 1/8; 1/64 is the paper's
    smallest), or ``buckets``: one ``B`` for every layer (a layer with ``out * in <= B`` stays
    dense: no saving). ``seed``: the hash seed, an int in ``[0, 2**32)``. ``init="dense"``
    starts each bucket at the mean of its members' weights (for fine-tuning a trained model);
    ``init="random"`` draws fresh buckets (``nn.Linear``'s distribution: training from
    scratch with the model's architecture).
    """

    compression: float | None = 0.125
    buckets: int | None = None
    seed: int = 0
    init: str = "dense"

    def __post_init__(self) -> None:
        if self.buckets is not None:
            if self.compression is not None and self.compression != 0.125:
                raise ValueError("HashedConfig takes compression or buckets, not both")
            object.__setattr__(self, "compression", None)
            check_int("buckets", self.buckets, min=1)
        else:
            if self.compression is None:
                raise ValueError("HashedConfig needs compression or buckets")
            check_number("compression", self.compression, low=0.0, high=1.0, low_open=True,
                         high_open=True, hint="(buckets / weights)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) \
                or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an int in [0, 2**32), got {self.seed!r}")
        check_choice("init", self.init, ("dense", "random"))


@dataclass(frozen=True)
class CodebookConfig(CompressionConfig):
    """Weight sharing for ``nn.Linear``: every weight becomes one of ``2**bits`` values
    (``bits`` in {2, 3, 4, 8}) found by 1-D k-means.

    ``method="optimal"`` (the default): the least-squares table, exactly, by dynamic programming
    over the sorted weights (:func:`compress_ops.quantize.kmeans_1d_optimal`); a row group with
    more distinct values than the DP's bins (16384 for one table at 2-4 bits, 512 at 8 bits) is
    solved on the bins, polished by at most ``iters`` Lloyd steps and compared with Lloyd from
    two starts (never worse than ``"lloyd"``); 8-bit tables over many row groups, where the DP
    would take seconds, are Lloyd's (:func:`~compress_ops.quantize.fit_codebook`).
    ``method="lloyd"``: Lloyd's steps from two starts until the
    assignment stops changing (at most ``iters`` steps, cheap on sorted values), a local
    optimum; on heavy-tailed weights it can be far from the best table (one 8-bit table of
    Student-t(3) weights: 4x the squared error, 6 dB).

    ``weighted=True`` (activation-aware k-means) weighs each weight's squared error by the
    energy of its input, the diagonal ``H_jj`` of the layer's input Hessian (``2 X^T X / n``),
    so the table spends its levels where the output feels them; it needs calibration data:
    ``compress_(model, config, calib=batches)``. Not with ``shared=True``: a shared table is
    fit over all its layers before any layer is built, where no Hessian is available, and the
    layers' Hessians have no common scale to weigh them against each other.

    ``row_groups`` > 1 fits one table per equal group of output rows. ``shared=True`` fits one
    table over every layer this config compresses in one ``compress_`` call (under a
    ``Recipe``: the layers of every rule with an equal config) and stores it once; the layers
    must share one dtype and device. Compress after moving the model: ``.to()`` converts each
    module's buffers separately, so the layers then hold equal copies instead of one table.
    """

    bits: int = 4
    row_groups: int = 1
    iters: int = 1000
    shared: bool = False
    method: str = "optimal"
    weighted: bool = False

    def __post_init__(self) -> None:
        check_choice("bits", self.bits, BITS)
        check_int("row_groups", self.row_groups, min=1)
        check_int("iters", self.iters, min=0)
        check_bool("shared", self.shared)
        check_choice("method", self.method, ("optimal", "lloyd"))
        check_bool("weighted", self.weighted)
        if self.shared and self.row_groups != 1:
            raise ValueError("a shared codebook has one row group (row_groups=1)")
        if self.shared and self.weighted:
            raise ValueError("weighted=True weighs each layer by its own input Hessian; a shared "
                             "codebook (shared=True) is fit over all its layers before they are "
                             "built, without Hessians: use one of the two")

    @property
    def needs_calibration(self) -> bool:
        return self.weighted


@dataclass(frozen=True)
class LowRankConfig(CompressionConfig):
    """Low-rank factorization of ``nn.Linear`` (truncated SVD, ``W ~ U @ V``) and ``nn.Conv2d``
    (Tucker-2: 1x1 reduce, k x k core, 1x1 restore).

    Exactly one of ``rank`` (Linear: r; Conv2d: ``(r, r)``, both clamped to the layer) and
    ``energy`` (the smallest rank keeping that fraction of ``||W||_F**2``; for convs, per
    channel mode). ``method``: ``"auto"``, ``"exact"`` or ``"randomized"`` SVD of linears (see
    :func:`compress_ops.factorize.svd_factors`); Tucker-2 always takes exact SVDs of the
    (small) channel unfoldings. A layer whose factors would not hold fewer
    parameters than the dense weight stays dense, and ``report()`` says why. A ``residual``
    (keeping a compressed remainder next to the factors) is not implemented; the op already
    takes a dense base weight for it.

    ``patch_embeddings``: a conv with ``stride == kernel_size`` and no padding (a ViT patch
    embedding) stays dense unless True. It is one layer of the model, and code outside the
    project reads its ``.weight`` (Hugging Face ViT reads ``projection.weight.dtype`` in its
    forward), which a ``LowRankConv2d`` does not have.
    """

    rank: int | None = None
    energy: float | None = None
    method: str = "auto"
    patch_embeddings: bool = False

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise ValueError("LowRankConfig needs exactly one of rank and energy")
        if self.rank is not None:
            check_int("rank", self.rank, min=1)
        if self.energy is not None:
            check_number("energy", self.energy, low=0.0, high=1.0, low_open=True)
        check_choice("method", self.method, ("auto", "exact", "randomized"))
        check_bool("patch_embeddings", self.patch_embeddings)


@dataclass(frozen=True)
class SharedFilterConfig(CompressionConfig):
    """Shared filters within a layer for plain ``nn.Conv2d`` (groups 1): each conv's ``C_out``
    filters become ``scale[o] * bank[assign[o]]`` over a bank of ``F`` shared filters
    (:class:`~compress_ops.nn.SharedFilterConv2d`, k-means of the filters up to sign and
    scale). Exactly one of ``filters`` (``F``, an int) and ``fraction`` (``F = max(1,
    round(fraction * C_out))``, in (0, 1)). ``iters``: k-means rounds at most. A conv where
    ``F >= C_out`` or the bank and scales would not hold fewer parameters than the dense
    weight stays dense, and ``report()`` says why.
    """

    filters: int | None = None
    fraction: float | None = None
    iters: int = 20

    def __post_init__(self) -> None:
        if (self.filters is None) == (self.fraction is None):
            raise ValueError("SharedFilterConfig needs exactly one of filters and fraction")
        if self.filters is not None:
            check_int("filters", self.filters, min=1)
        if self.fraction is not None:
            check_number("fraction", self.fraction, low=0.0, high=1.0, low_open=True,
                         high_open=True, hint="(of the output channels)")
        check_int("iters", self.iters, min=1)


@dataclass(frozen=True)
class DWSepFuseConfig(CompressionConfig):
    """Fuse depthwise-separable units: ``[zero pad] -> depthwise conv -> [BatchNorm] -> [act]
    -> 1x1 conv -> [BatchNorm] -> [act]`` chains become one
    :class:`~compress_ops.nn.FusedDWSepConv2d` each (BatchNorm folded with its running
    statistics: fuse models in eval mode). Activations: ReLU, ReLU6, Hardswish, SiLU.

    ``compress_(model, DWSepFuseConfig(), example_inputs=(x,))`` captures the model with
    ``torch.export`` and matches the ops that run, through ``Conv2d`` subclasses, wrappers and
    functional pads (:func:`compress_ops.fuse.fuse_exported`); the fused model is checked
    against the original on ``x``. Without ``example_inputs`` the chains are read from a
    ``torch.fx`` trace, where only plain ``torch.nn`` modules match. ``fix_input_size=True``
    also fuses units whose padding a module computes from the input's size (TF "same"
    padding), for the traced size only: the fused module raises for any other size.
    Depthwise convs left unfused are listed by ``report()`` with the reason. Not usable inside
    a ``Recipe`` (it matches chains, not single layers).
    """

    per_layer: ClassVar[bool] = False
    fix_input_size: bool = False

    def __post_init__(self) -> None:
        check_bool("fix_input_size", self.fix_input_size)


# --------------------------------------------------------------------------------------------
# The registry: config type -> transform
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """How a per-layer config compresses a module.

    ``handles``: the module types it looks at (others are not in its scope). ``build(module,
    config, **extras)``: the new module, or ``UnsupportedModule`` naming why the module stays
    dense; it reads the module and builds a new one, never changing the model. ``prepare``
    (optional): ``prepare(modules, config) -> {id(module): extras}`` for transforms that look
    at every layer of a config at once (a shared codebook); it may raise ``UnsupportedModule``
    for the whole group.
    """

    handles: tuple[type[nn.Module], ...]
    build: Callable[..., nn.Module]
    prepare: Callable[[list[nn.Module], Any], dict[int, dict]] | None = None


_TRANSFORMS: dict[type, Transform] = {}


def register_transform(config_type: type, handles: tuple[type[nn.Module], ...], *,
                       prepare: Callable[[list[nn.Module], Any], dict[int, dict]] | None = None
                       ) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``build`` as the transform of ``config_type`` (a per-layer
    :class:`CompressionConfig` subclass)."""
    if not (isinstance(config_type, type) and issubclass(config_type, CompressionConfig)
            and config_type.per_layer):
        raise TypeError(f"{config_type!r} is not a per-layer CompressionConfig subclass")

    def deco(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _TRANSFORMS[config_type] = Transform(tuple(handles), build, prepare)
        return build

    return deco


def transform_for(config: object) -> Transform:
    """The transform of ``config`` (an instance), or ``TypeError`` naming the known configs."""
    try:
        return _TRANSFORMS[type(config)]
    except KeyError:
        raise TypeError(f"unknown config {config!r}; expected one of "
                        f"{[t.__name__ for t in _TRANSFORMS]}") from None


def per_layer_configs() -> tuple[type, ...]:
    """The config types with a registered transform."""
    return tuple(_TRANSFORMS)


def handled_types() -> tuple[type[nn.Module], ...]:
    """Every module type some registered transform looks at."""
    return tuple(dict.fromkeys(t for tr in _TRANSFORMS.values() for t in tr.handles))
