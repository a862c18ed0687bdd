"""What every compressed module has in common."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from compress_ops.configs import UnsupportedModule
from compress_ops.kernels.formats import ACT_DTYPES

__all__ = ["CompressedModule", "CompressedLinear", "FormatRecord", "check_compute_dtype",
           "conv_padding", "from_dense_values", "init_bias"]


class CompressedModule(nn.Module):
    """Base of every module the package builds (linear and conv).

    A subclass calls exactly one op (or, for exact factorizations, plain ATen calls) in
    ``forward``, holds its compressed weight as plain tensors (so ``state_dict``, ``.to()`` and
    ``deepcopy`` just work) and reports its size: :meth:`stored_weight_bytes` (every weight
    tensor as stored, biases excluded) against :meth:`dense_weight_bytes` (the weight it
    replaces, in the module's compute dtype). ``kind`` names the family in ``report()``.
    """

    kind: str = "compressed"

    def dense_weight(self) -> torch.Tensor:
        """The effective dense weight, shaped as the weight of the module it replaced."""
        raise NotImplementedError

    @property
    def weight(self) -> torch.Tensor:
        """A decompressed copy of the weight (:meth:`dense_weight`), for code that reads
        ``.weight`` of the layer it replaced: its shape, dtype and device, or its values
        (Hugging Face ViT reads ``projection.weight.dtype``; initialisers and tie checks look
        at ``.weight``). It is computed on every access (a full dense tensor: never on a hot
        path), writing into it changes nothing, and assigning ``.weight`` is an
        ``AttributeError``: the stored tensors are the module's state."""
        return self.dense_weight()

    #: what ``report()`` adds about this layer (set by a transform, e.g. why a layer became
    #: weight-only); a subclass may compute it in :meth:`report_note`
    note: str = ""

    def report_note(self) -> str:
        """The note ``report()`` shows for this layer (:attr:`note` unless overridden)."""
        return self.note

    #: plain attributes outside the constructor that a checkpoint keeps (co.save / co.load),
    #: the report note among them
    saved_attrs: tuple[str, ...] = ("note",)

    def init_args(self) -> dict[str, Any]:
        """The constructor's arguments (JSON values; device and dtype excepted) that rebuild
        this module's structure: ``type(m)(**m.init_args(), device=..., dtype=...)`` holds
        tensors of the shapes ``m.state_dict()`` has (what ``co.load`` builds on the meta
        device before the tensors are assigned)."""
        raise NotImplementedError

    def stored_weight_bytes(self) -> int:
        """Bytes of the compressed weight as stored (every weight tensor but the bias)."""
        raise NotImplementedError

    def dense_weight_bytes(self) -> int:
        """Bytes the dense weight it replaces would take in the module's compute dtype."""
        raise NotImplementedError

    @property
    def weight_dtype(self) -> torch.dtype:
        raise NotImplementedError


class CompressedLinear(CompressedModule):
    """Base of drop-in ``nn.Linear`` replacements.

    Subclasses hold their compressed weight as plain tensor buffers, call exactly one op in
    ``forward`` and implement :meth:`dense_weight` (the effective ``[out, in]`` weight, so
    ``F.linear(x, m.dense_weight(), m.bias)`` is the module's reference) and
    :meth:`stored_weight_bytes`.
    """

    in_features: int
    out_features: int

    #: the layout of :attr:`weight`: ``"out_in"`` (``nn.Linear``'s), or ``"in_out"`` for a
    #: module that replaced a Hugging Face ``Conv1D`` (set when it is swapped in, kept by
    #: checkpoints), so code reading ``.weight`` of GPT-2's ``c_attn`` sees ``[in, out]``.
    #: :meth:`dense_weight` is ``[out, in]`` either way.
    weight_layout: str = "out_in"
    saved_attrs: tuple[str, ...] = ("note", "weight_layout")

    @property
    def weight(self) -> torch.Tensor:
        """A decompressed copy of the weight, in the layout of the layer it replaced
        (:attr:`weight_layout`; see :attr:`CompressedModule.weight`)."""
        w = self.dense_weight()
        return w.t() if self.weight_layout == "in_out" else w

    def dense_weight_bytes(self) -> int:
        return self.out_features * self.in_features * self.weight_dtype.itemsize

    def _check_in_features(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{type(self).__name__}: x last dim is {x.shape[-1]}, expected "
                f"in_features={self.in_features}"
            )


class FormatRecord(nn.Module):
    """Mixin of compressed modules whose tensor shapes do not fix how they are read.

    ``format_fields`` names the plain int attributes that do (true sizes that padding hides,
    bit widths, group sizes). They go in the ``state_dict`` as ``_extra_state``, an int64
    tensor (so ``safetensors`` can hold it too), and a ``load_state_dict`` whose record differs
    is refused by name before anything is copied. :meth:`_check_state` lets a subclass refuse
    invalid stored values the same way.
    """

    format_fields: tuple[str, ...] = ()

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor([int(getattr(self, f)) for f in self.format_fields],
                            dtype=torch.int64, device="cpu")

    def set_extra_state(self, state: Any) -> None:
        self._check_format(state)

    def _check_format(self, state: Any) -> None:
        if isinstance(state, torch.Tensor) and state.device.type == "meta":
            return  # no values to compare (a meta-device load)
        mine = self.get_extra_state()
        if isinstance(state, torch.Tensor) and state.shape == mine.shape \
                and torch.equal(state.cpu().to(torch.int64), mine):
            return
        if isinstance(state, torch.Tensor) and state.shape == mine.shape:
            theirs = ", ".join(f"{f}={int(v)}" for f, v in zip(self.format_fields, state,
                                                                strict=True))
        else:
            theirs = f"an unknown format record {state!r}"
        here = ", ".join(f"{f}={getattr(self, f)}" for f in self.format_fields)
        raise ValueError(f"{type(self).__name__}: the state_dict was saved with {theirs}, but "
                         f"this module has {here}; its tensors would be read wrongly")

    def _check_state(self, state_dict: dict[str, Any], prefix: str) -> None:
        """Named errors for stored tensors whose values are invalid (before any copy)."""

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        key = prefix + "_extra_state"
        if key in state_dict:
            self._check_format(state_dict[key])
        self._check_state(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def check_compute_dtype(owner: str, dtype: torch.dtype,
                        error: type[UnsupportedModule] = UnsupportedModule) -> None:
    """``error`` (an :class:`~compress_ops.configs.UnsupportedModule`: ``compress_`` keeps the
    layer dense with this reason) unless the ops can compute in ``dtype``: float16, bfloat16
    or float32. A float64 layer stays float64 and dense rather than become one that cannot run.
    """
    if dtype not in ACT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in ACT_DTYPES)
        raise error(f"{owner}: {str(dtype).removeprefix('torch.')} weights; the compressed ops "
                    f"compute in {names} (convert the layer, e.g. .float(), to compress it)")


def init_bias(module: nn.Module, bias: bool, n: int, device: torch.device | str | None,
              dtype: torch.dtype) -> None:
    """A zero ``bias`` parameter of ``n`` features, or a registered ``None``, as nn.Linear."""
    if bias:
        module.bias = nn.Parameter(torch.zeros(n, device=device, dtype=dtype))
    else:
        module.register_parameter("bias", None)


def from_dense_values(config: object | None, values: dict[str, Any],
                      defaults: dict[str, Any]) -> dict[str, Any]:
    """The plain values a ``from_dense`` builds with: the fields of ``config`` (any object with
    those attributes, e.g. the family's config dataclass) when one is given, else the keyword
    ``values`` over ``defaults``. Both at once is a ``ValueError``; an unknown keyword a
    ``TypeError``.

    Modules depend on these plain values, never on the config classes: the transform (or a
    user) passes either a config or the keywords.
    """
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise TypeError(f"unknown keyword(s) {unknown}; expected some of {sorted(defaults)}")
    if config is None:
        return {**defaults, **values}
    if values:
        raise ValueError(f"give a config or the keyword values {sorted(values)}, not both")
    missing = [k for k in defaults if not hasattr(config, k)]
    if missing:
        raise TypeError(f"config {config!r} has no field(s) {missing}")
    return {k: getattr(config, k) for k in defaults}


def conv_padding(padding: str | tuple[int, int], kernel_size: tuple[int, int],
                 dilation: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` amounts of a Conv2d's ``padding`` as its forward applies
    them (``'same'``: the extra pixel of an even total goes right / bottom, as nn.Conv2d)."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        out: list[int] = []
        for d, k in zip(reversed(dilation), reversed(kernel_size), strict=True):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return tuple(out)
    return (padding[1], padding[1], padding[0], padding[0])
