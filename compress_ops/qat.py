"""Quantization-aware training: fake-quant ``nn.Linear`` layers with a straight-through
estimator, then finalize them to the packed :class:`~compress_ops.nn.QuantLinear` /
:class:`~compress_ops.nn.CodebookLinear`.

    model = co.qat.prepare_qat(model, co.QuantConfig(bits=2, group_size=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)   # build it after prepare_qat
    ...                                                     # train as usual
    model = co.qat.finalize_qat(model)                      # packed, the same weights

Design
------
* **What the forward sees.** :class:`FakeQuantLinear` computes ``F.linear(x, Q(w), bias)``
  where ``Q(w)`` is exactly the weight the packed module will hold, dequantized:

  - ``QuantConfig``: :func:`~compress_ops.quantize.quantize_affine` with the config's
    ``bits`` / ``group_size`` / ``symmetric`` / ``search_steps`` (the call
    ``QuantLinear.from_dense`` makes), dequantized with
    :func:`~compress_ops.kernels.formats.dequant.dequantize` (what
    ``QuantLinear.dense_weight`` runs), so ``Q(w)`` is bit-identical to
    ``QuantLinear.from_dense(linear, config).dense_weight()``.
    The range search runs on every forward by default. ``refresh_every=n > 1`` recomputes the
    grid (scales and zero points) only on every n-th training forward and, in between, rounds
    the current weight onto the cached grid (cheap; the grid lags the weight by < n steps).
    Eval-mode forwards, :meth:`FakeQuantLinear.quantized_weight` and
    :meth:`FakeQuantLinear.finalize` always recompute the grid, so they agree with each other
    (a training forward right after a refresh agrees with them too; later ones, and weights
    loaded or edited in between, meet the cached grid until the next refresh).
  - ``TernaryConfig`` and ``QuantConfig(bits=1)``: the absmean grid of
    :func:`~compress_ops.quantize.quantize_absmean` (``s`` = the group's mean ``|w|``,
    recomputed on every forward as BitNet b1.58 does; ternary ``clamp(round(w / s), -1, 1) s``,
    binary ``sign(w) s``), bit-identical to the finalized module's ``dense_weight()``.
  - ``CodebookConfig``: ``Q(w) = codebook[row group, nearest entry of w]`` (nearest entry by
    :func:`~compress_ops.quantize.assign_codebook`, the assignment
    :func:`~compress_ops.quantize.encode_codebook` makes at finalize). The k-means table is fit
    once, by :meth:`FakeQuantLinear.from_linear` (per layer, ``row_groups`` tables) or by
    :func:`prepare_qat` (``shared=True``: one table over every layer the config covers, the
    fit ``compress_`` makes), and is then a trainable ``nn.Parameter``.

* **Straight-through estimator.** ``w_hat = Q(w).detach() + (w - w.detach())``: its value is
  exactly ``Q(w)`` (the textbook ``w + (Q(w) - w).detach()`` is off by a float rounding) and
  the gradient reaching ``w`` is the gradient of ``F.linear`` w.r.t. its weight at ``Q(w)``,
  unchanged (identity STE, no clipping mask: weights outside the grid's range keep learning
  and may widen the range at the next grid refresh).

* **Codebook training** (Deep Compression style). ``Q(w)`` gathers from the table parameter, so
  every centroid receives the sum of the gradients of the weights assigned to it; ``w`` gets
  the same per-weight gradient through the STE, so assignments can change as ``w`` moves. A
  shared table is one ``Parameter`` held by every layer (``model.parameters()`` lists it once;
  ``state_dict`` saves it under every layer). Freeze it with ``codebook.requires_grad_(False)``.

* **Parameters.** ``from_linear`` / ``prepare_qat`` keep the linear's own ``weight`` and
  ``bias`` ``Parameter`` objects (dtype, device and any optimizer state carry over); the
  codebook table is a new parameter, so build the optimizer after ``prepare_qat``.

* **Finalize.** :meth:`FakeQuantLinear.finalize` builds ``QuantLinear.from_dense`` /
  ``CodebookLinear.from_dense(..., codebook=trained table)`` (for ``row_groups > 1``, which
  ``from_dense`` takes only as a fitted table, the same encoding done directly) from the
  trained weight: ``dense_weight()`` equals ``quantized_weight()``. Layers that share a table
  get one frozen copy of it (so ``report`` counts it once), taken at finalize time.

* **Which layers.** :func:`prepare_qat` mirrors :func:`~compress_ops.compress_`: plain
  ``nn.Linear`` layers (and Hugging Face ``Conv1D``: its weight, transposed, becomes a new
  ``[out, in]`` Parameter; build the optimizer after ``prepare_qat``); a ``Recipe`` rule of
  ``None`` keeps a layer dense, rules with other configs (2:4, low rank) are left to
  ``compress_`` after finalizing; ``filter_fn``, layers shared under names with different
  rules, weights tied to another module, and codebook ``row_groups`` not dividing
  ``out_features`` stay dense and ``report`` lists why.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from compress_ops import _swap
from compress_ops._linear import LINEAR_TYPES, linear_weight, plain_linear
from compress_ops._validate import check_int
from compress_ops.api import Recipe, check_config, config_for, index
from compress_ops.configs import CodebookConfig, QuantConfig, TernaryConfig, UnsupportedModule
from compress_ops.kernels.formats.dequant import dequantize, padded_k
from compress_ops.nn.dequant import BINARY_NOTE, TERNARY_NOTE, CodebookLinear, QuantLinear
from compress_ops.quantize import (
    AffineWeight,
    assign_codebook,
    encode_codebook,
    fit_codebook,
    quantize_absmean,
    quantize_affine,
)
from compress_ops.transforms import shared_codebook

__all__ = ["FakeQuantLinear", "prepare_qat", "finalize_qat"]

QATConfig = QuantConfig | CodebookConfig | TernaryConfig
_QAT_CONFIGS = (QuantConfig, CodebookConfig, TernaryConfig)

# trained table Parameter -> the frozen copy finalized modules hold (one per table, so layers
# that share a table in training share one buffer after finalize)
_FROZEN_TABLES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _check_config(config: object) -> None:
    if type(config) not in _QAT_CONFIGS:
        raise TypeError(f"config must be a QuantConfig, CodebookConfig or TernaryConfig, got "
                        f"{config!r}")


def _absmean(config: object) -> str | None:
    """``"binary"`` / ``"ternary"`` for the configs whose grid is the absmean one, else None."""
    if isinstance(config, TernaryConfig):
        return "ternary"
    if isinstance(config, QuantConfig) and config.bits == 1:
        return "binary"
    return None


def _check_refresh(refresh_every: object) -> None:
    check_int("refresh_every", refresh_every, min=1)


def _frozen_table(table: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``table``, the same tensor for every call while its values hold."""
    cached = _FROZEN_TABLES.get(table)
    if (cached is None or cached.dtype != table.dtype or cached.device != table.device
            or not torch.equal(cached, table.detach())):
        cached = table.detach().clone()
        _FROZEN_TABLES[table] = cached
    return cached


def _round_to_grid(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bits: int, group_size: int) -> torch.Tensor:
    """Dequantized round-to-nearest of ``w`` on a given affine grid (the grid's dtype), with
    the arithmetic of ``quantize_affine`` (rounding) and ``dequantize`` (reconstruction)."""
    n, k = w.shape
    kp = padded_k(k, group_size)
    work = torch.float64 if w.dtype == torch.float64 else torch.float32
    wf = F.pad(w.detach().to(work), (0, kp - k)).reshape(n, kp // group_size, group_size)
    half = 2 ** (bits - 1)
    s = scales.to(work)
    z = zeros.to(work) if zeros is not None else torch.full_like(s, half)
    q = torch.clamp(torch.round(wf / s[..., None] + z[..., None]), 0, 2**bits - 1)
    dtype = scales.dtype
    # an end level whose value overflows the grid's dtype is unused (quantize_affine leaves it
    # so for fp16 grids at +-65504): round to its neighbour instead
    top = 2**bits - 1
    low_bad = ~torch.isfinite(((0 - z) * s).to(dtype))[..., None]
    high_bad = ~torch.isfinite(((top - z) * s).to(dtype))[..., None]
    q = torch.where(low_bad, q.clamp_min(1), q)
    q = torch.where(high_bad, q.clamp_max(top - 1), q)
    return ((q - z[..., None]) * s[..., None]).to(dtype).reshape(n, kp)[:, :k]


class FakeQuantLinear(nn.Module):
    """``nn.Linear``-compatible layer whose forward uses the weight as the packed module would
    store it: ``y = F.linear(x, w_hat, bias)``, ``w_hat = Q(w)`` in value with an identity
    (straight-through) gradient to ``w`` (see the module docstring).

    Parameters: ``weight [out, in]``, ``bias [out]`` or None, and for a ``CodebookConfig`` the
    trainable table ``codebook [row_groups, 2**bits]`` (possibly shared with other layers).
    ``refresh_every`` (``QuantConfig`` only) recomputes the affine grid every n-th training
    forward instead of every forward. A freshly constructed module is initialised like
    ``nn.Linear`` (a codebook: the uniform grid over the init range); use :meth:`from_linear`
    or load a state_dict.
    """

    _compress_ops_fake_quant = True  # (co.report lists it as a layer in training)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 config: QATConfig, codebook: torch.Tensor | None = None,
                 refresh_every: int = 1, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self._setup(in_features, out_features, config, refresh_every)
        dtype = dtype or torch.get_default_dtype()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        if isinstance(config, CodebookConfig) and codebook is None:
            bound = 1.0 / in_features**0.5  # nn.Linear's init range
            grid = torch.linspace(-bound, bound, 2**config.bits, device=device, dtype=dtype)
            codebook = grid.repeat(config.row_groups, 1)
        self._set_table(codebook)

    def _setup(self, in_features: int, out_features: int, config: object,
               refresh_every: int) -> None:
        _check_config(config)
        _check_refresh(refresh_every)
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"in_features and out_features must be >= 1, got {in_features}, {out_features}")
        if isinstance(config, CodebookConfig) and out_features % config.row_groups:
            raise ValueError(f"row_groups={config.row_groups} must divide "
                             f"out_features={out_features}")
        if _absmean(config) and refresh_every != 1:
            raise ValueError(f"{config!r}: the absmean scale is recomputed on every forward "
                             f"(it costs one mean per group); refresh_every must be 1")
        self.in_features = in_features
        self.out_features = out_features
        self.config = config
        self.refresh_every = refresh_every
        self._steps = 0  # training forwards (for refresh_every)
        self._grid: tuple[torch.Tensor, torch.Tensor | None, int] | None = None

    def _set_table(self, codebook: torch.Tensor | None) -> None:
        if isinstance(self.config, CodebookConfig):
            self.codebook = self._table(codebook, self.weight)
        elif codebook is not None:
            raise ValueError("codebook is only used with a CodebookConfig")
        else:
            self.register_parameter("codebook", None)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s initialisation of weight and bias."""
        nn.Linear.reset_parameters(self)  # type: ignore[arg-type]

    def _table(self, codebook: torch.Tensor, weight: torch.Tensor) -> nn.Parameter:
        cfg = self.config
        if not isinstance(codebook, torch.Tensor):
            raise TypeError(f"codebook must be a torch.Tensor, got {type(codebook).__name__}")
        shape = (cfg.row_groups, 2**cfg.bits)
        if tuple(codebook.shape) != shape or codebook.dtype != weight.dtype \
                or codebook.device != weight.device:
            raise ValueError(f"codebook must be {list(shape)} {weight.dtype} on {weight.device}, "
                             f"got {list(codebook.shape)} {codebook.dtype} on {codebook.device}")
        if isinstance(codebook, nn.Parameter):
            return codebook  # by reference: a table shared between layers stays one parameter
        return nn.Parameter(codebook.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QATConfig, *,
                    codebook: torch.Tensor | None = None,
                    refresh_every: int = 1) -> FakeQuantLinear:
        """Wrap ``linear`` (its own weight and bias parameters) for QAT under ``config``.

        ``CodebookConfig``: ``codebook`` (``[row_groups, 2**bits]``, the weight's dtype and
        device) is the table to train; an ``nn.Parameter`` is held by reference (share one
        between layers), a plain tensor is copied; None fits one to this weight
        (:func:`~compress_ops.quantize.fit_codebook`).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"expected nn.Linear, got {type(linear).__name__}")
        mod = cls.__new__(cls)  # no fresh parameters: the linear's own are taken over
        nn.Module.__init__(mod)
        mod._setup(linear.in_features, linear.out_features, config, refresh_every)
        mod.weight = linear.weight
        mod.bias = linear.bias
        if isinstance(config, CodebookConfig) and codebook is None:
            codebook = fit_codebook([linear.weight.detach()], config.bits, config.row_groups,
                                    config.iters, method=config.method)
        mod._set_table(codebook)
        return mod

    # -- the quantizer ------------------------------------------------------------------------

    def _packed(self, w: torch.Tensor) -> AffineWeight:
        cfg = self.config
        levels = _absmean(cfg)
        if levels is not None:  # binary / ternary: the scale is the mean |w|, every step
            return quantize_absmean(w, levels, cfg.group_size)
        return quantize_affine(w, cfg.bits, cfg.group_size, symmetric=cfg.symmetric,
                               search_steps=cfg.search_steps)

    def _affine(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                torch.Tensor | None, int]:
        qw = self._packed(w)
        wq = dequantize(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group_size,
                        self.in_features)
        return wq, qw.scales, qw.zeros, qw.group_size

    def _codebook_weight(self, w: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        n = w.shape[0]
        idx = assign_codebook(w.detach(), table.detach())
        rows = torch.arange(n, device=w.device) // (n // table.shape[0])
        return table[rows[:, None], idx]

    def quantized_weight(self) -> torch.Tensor:
        """``Q(w)``: the dense weight :meth:`finalize` stores (its ``dense_weight()``)."""
        with torch.no_grad():
            if self.codebook is not None:
                return self._codebook_weight(self.weight, self.codebook).detach()
            return self._affine(self.weight.detach())[0]

    def _fake_weight(self) -> torch.Tensor:
        w = self.weight
        if self.codebook is not None:
            wq = self._codebook_weight(w, self.codebook)  # differentiable in the table
            return wq + (w - w.detach())
        with torch.no_grad():
            wd = w.detach()
            grid = self._grid
            if self.training and self.refresh_every > 1:
                stale = (grid is None or self._steps % self.refresh_every == 0
                         or grid[0].device != wd.device or grid[0].dtype != wd.dtype)
                self._steps += 1
                if stale:
                    wq, scales, zeros, gs = self._affine(wd)
                    self._grid = (scales, zeros, gs)
                else:
                    scales, zeros, gs = grid
                    wq = _round_to_grid(wd, scales, zeros, self.config.bits, gs)
            else:
                wq = self._affine(wd)[0]
        return wq + (w - w.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: x last dim is {x.shape[-1]}, expected "
                             f"in_features={self.in_features}")
        return F.linear(x, self._fake_weight(), self.bias)

    # -- finalize -----------------------------------------------------------------------------

    def _as_linear(self) -> nn.Linear:
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta", dtype=w.dtype)
        lin.weight = nn.Parameter(w.detach(), requires_grad=False)
        lin.bias = None if self.bias is None else nn.Parameter(self.bias.detach(),
                                                               requires_grad=False)
        return lin

    def finalize(self) -> QuantLinear | CodebookLinear:
        """The packed module for the trained weight: ``QuantLinear`` or ``CodebookLinear``
        whose ``dense_weight()`` equals :meth:`quantized_weight` (and the bias, copied)."""
        lin = self._as_linear()
        cfg = self.config
        with torch.no_grad():
            if self.codebook is None:
                if _absmean(cfg) is None:
                    return QuantLinear.from_dense(lin, cfg)
                mod = QuantLinear.from_affine(lin, self._packed(lin.weight))
                mod.note = BINARY_NOTE if _absmean(cfg) == "binary" else TERNARY_NOTE
                return mod
            table = _frozen_table(self.codebook)
            if table.shape[0] == 1:
                return CodebookLinear.from_dense(lin, cfg, codebook=table)
            # from_dense takes only one-row (shared-style) tables: encode the same way here
            w = lin.weight
            mod = CodebookLinear(self.in_features, self.out_features, bias=self.bias is not None,
                                 bits=cfg.bits, row_groups=table.shape[0], device=w.device,
                                 dtype=w.dtype)
            mod.indices.copy_(encode_codebook(w, table, cfg.bits).indices)
            mod.codebook = table
            if self.bias is not None:
                mod.bias.copy_(self.bias.detach())
            return mod

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"bias={self.bias is not None}, config={self.config!r}")
        if self.codebook is not None:
            s += f", codebook={list(self.codebook.shape)}"
        if self.refresh_every != 1:
            s += f", refresh_every={self.refresh_every}"
        return s + f", dtype={self.weight.dtype}"


def prepare_qat(model: nn.Module, config: QATConfig | Recipe, *,
                filter_fn: Callable[[nn.Module, str], bool] | None = None,
                refresh_every: int = 1) -> nn.Module:
    """Replace, in place, every plain ``nn.Linear`` that ``config`` (a ``QuantConfig``, a
    ``CodebookConfig``, a ``TernaryConfig`` or a :class:`~compress_ops.Recipe` of them) applies
    to with a
    :class:`FakeQuantLinear`; return the model (the new module if ``model`` itself is a
    replaced ``nn.Linear``).

    Layers a ``Recipe`` keeps dense (``None``), excluded by ``filter_fn(module, name)``, or
    that the config cannot handle stay ``nn.Linear`` (``report`` lists why); layers under
    ``Recipe`` rules of other configs are left for ``compress_``. ``CodebookConfig(shared=True)``
    fits one trainable table over every layer it covers (under a ``Recipe``: every rule with an
    equal config), held by all of them.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_config(config, _QAT_CONFIGS)
    _check_refresh(refresh_every)
    rules = config.rules.values() if isinstance(config, Recipe) else [config]
    one_shot = [c for c in rules if getattr(c, "needs_calibration", False)]
    if one_shot:
        raise ValueError(f"prepare_qat trains from the weights alone; {one_shot[0]!r} reads "
                         f"calibration data (a one-shot method): use it with compress_(..., "
                         f"calib=) instead")

    def in_scope(module: nn.Module, decisions: set[tuple[bool, object]]) -> bool:
        if not isinstance(module, LINEAR_TYPES) or not any(matched for matched, _ in decisions):
            return False
        # a single 2:4 / low-rank rule: compress_'s business, not QAT's
        ((_, cfg),) = decisions if len(decisions) == 1 else ((True, None),)
        return cfg is None or type(cfg) in _QAT_CONFIGS

    def shared_table(modules: list[nn.Module], cfg: CodebookConfig) -> dict[int, dict]:
        # one trainable table per equal shared config, held by every layer of it
        extras = shared_codebook(modules, cfg)
        if not extras:
            return {}
        table = nn.Parameter(next(iter(extras.values()))["codebook"])
        return {mid: {"codebook": table} for mid in extras}

    def prepare(cfg: object):
        return shared_table if isinstance(cfg, CodebookConfig) and cfg.shared else None

    def build(module: nn.Module, cfg: object, codebook: torch.Tensor | None = None) -> nn.Module:
        return FakeQuantLinear.from_linear(plain_linear(module), cfg, codebook=codebook,
                                           refresh_every=refresh_every)

    out = _swap.replace_layers(
        model, lambda name: config_for(config, name), idx=index(model, config),
        in_scope=in_scope, prepare=prepare, build=build,
        reason=lambda idx, module, aliases, cfg: _reason(idx, module, aliases, cfg, filter_fn))
    # (a Hugging Face model's save_pretrained then refuses it until finalize_qat, as co.save)
    _swap.after_compress(out)
    return out


def _reason(idx: _swap.Index, module: nn.Module, aliases: list[str], cfg: object,
            filter_fn: Callable[[nn.Module, str], bool] | None) -> str | None:
    """Why ``prepare_qat`` keeps a matched linear dense under ``cfg`` (None: it does not)."""
    if cfg is not None:
        try:
            plain_linear(module)
        except UnsupportedModule as exc:
            return str(exc)
    reason = _swap.dense_reason(idx, module, aliases, cfg, filter_fn)
    if reason is not None:
        return reason
    out_features = linear_weight(module).shape[0]
    if isinstance(cfg, CodebookConfig) and out_features % cfg.row_groups:
        return (f"out_features={out_features} is not divisible by "
                f"row_groups={cfg.row_groups}")
    return None


def finalize_qat(model: nn.Module) -> nn.Module:
    """Replace, in place, every :class:`FakeQuantLinear` of ``model`` with its
    :meth:`~FakeQuantLinear.finalize` (a layer reachable under several names is finalized once);
    return the model (the packed module if ``model`` itself is a ``FakeQuantLinear``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    fakes = list(dict.fromkeys(m for m in model.modules() if isinstance(m, FakeQuantLinear)))
    result = model
    for fake in fakes:  # each finalized once, swapped in at every name
        new = _swap.mark_built_by(fake.finalize(), fake.config)
        if fake is model:
            result = new
        else:
            _swap.replace_everywhere(model, fake, new)
    if result is not model:
        _swap.record_notes(result, _swap.notes(model))
    if fakes:
        _swap.after_compress(result)
    return result
