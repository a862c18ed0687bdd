"""What counts as a linear layer: ``nn.Linear``, and Hugging Face's ``Conv1D`` (GPT-2, GPT,
GPT-J's ancestors: ``y = x @ W + b`` with ``W`` stored ``[in, out]``, transposed).

Every place that handles a linear (the transforms, ``report()``, ``plan``, the ``Pruner``,
``prepare_qat``) asks here, so a Conv1D is compressed like the linear it is, never silently
skipped. Nothing here imports ``transformers``: a Conv1D is recognised by its class
(``transformers.pytorch_utils.Conv1D``, or a class of that name with the same layout).
"""

from __future__ import annotations

import torch
from torch import nn

from compress_ops.configs import UnsupportedModule

__all__ = ["HFConv1D", "LINEAR_TYPES", "is_conv1d", "plain_linear", "linear_weight",
           "oriented", "from_oriented", "in_features"]

_CONV1D_MODULES = ("transformers.pytorch_utils", "transformers.modeling_utils")


def _is_conv1d_class(cls: type) -> bool:
    return cls.__name__ == "Conv1D" and cls.__module__ in _CONV1D_MODULES


def is_conv1d(module: object, *, exact: bool = False) -> bool:
    """Whether ``module`` is a Hugging Face ``Conv1D`` (``exact``: of that class itself, not a
    subclass, whose forward may do more)."""
    if exact:
        return _is_conv1d_class(type(module))
    return any(_is_conv1d_class(c) for c in type(module).__mro__)


class _Conv1DMeta(type):
    def __instancecheck__(cls, obj: object) -> bool:
        return is_conv1d(obj)


class HFConv1D(metaclass=_Conv1DMeta):
    """``isinstance(m, HFConv1D)``: ``m`` is a ``transformers`` ``Conv1D`` (without importing
    ``transformers``). Never instantiated; a transform lists it among the types it handles."""

    def __new__(cls, *args: object, **kwargs: object):  # pragma: no cover - a marker only
        raise TypeError("HFConv1D is an isinstance marker, not a module")


#: The layer types compressed as linears.
LINEAR_TYPES: tuple[type, ...] = (nn.Linear, HFConv1D)


def in_features(module: nn.Module) -> int:
    """The input features of a linear layer (``nn.Linear`` or ``Conv1D``)."""
    return module.weight.shape[0] if is_conv1d(module) else module.weight.shape[1]


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a linear layer: ``nn.Linear``'s own, a ``Conv1D``'s
    transposed (a view: in-place changes reach the module)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def oriented(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """A tensor shaped like ``module.weight`` as ``[out, in, ...]`` (``Conv1D``: transposed)."""
    return tensor.t() if is_conv1d(module) else tensor


def from_oriented(module: nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`oriented`: an ``[out, in, ...]`` tensor shaped like
    ``module.weight`` again (contiguous)."""
    return tensor.t().contiguous() if is_conv1d(module) else tensor


def plain_linear(module: nn.Module) -> nn.Linear:
    """The ``nn.Linear`` a transform builds from: ``module`` itself if it is exactly
    ``nn.Linear``; for exactly a ``Conv1D``, an ``nn.Linear`` holding its transposed weight (a
    contiguous copy) and its bias Parameter. ``UnsupportedModule`` for anything else (a
    subclass's forward may do more than the linear)."""
    if type(module) is nn.Linear:
        return module
    if is_conv1d(module, exact=True):
        weight = module.weight
        if weight.dim() != 2 or (module.bias is not None and module.bias.shape
                                 != (weight.shape[1],)):
            raise UnsupportedModule(f"Conv1D with weight {tuple(weight.shape)} is not "
                                    f"[in, out] with a bias of out features")
        linear = nn.Linear(weight.shape[0], weight.shape[1], bias=False, device="meta")
        linear.weight = nn.Parameter(weight.detach().t().contiguous(),
                                     requires_grad=weight.requires_grad)
        linear.bias = module.bias
        linear.train(module.training)
        return linear
    if isinstance(module, HFConv1D):
        raise UnsupportedModule(f"{type(module).__name__} is a Conv1D subclass, not a plain "
                                f"Conv1D (its forward may do more than the linear)")
    raise UnsupportedModule(f"{type(module).__name__} is not a plain nn.Linear")
