"""Structured pruning: physically remove output channels / neurons (a smaller dense model).

Removing output channel ``c`` of a ``nn.Linear`` / ``nn.Conv2d`` also removes input column(s)
``c`` of every layer that reads it, and channel ``c`` of every BatchNorm and depthwise conv in
between. Which layers are coupled this way is read from a capture of the model on example
inputs (``torch.export`` by default, through module classes; ``torch.fx`` plus shape
propagation as the fallback, see :func:`channel_groups`); the result is a list of
:class:`ChannelGroup`\\ s, sets of channels that are kept or removed together:

* ``producers``: the ``nn.Linear`` / ``nn.Conv2d`` (``groups=1``) whose output rows define the
  channels. Several when their outputs are added (residual blocks: ``conv2`` and the shortcut
  conv, and, through identity shortcuts, the producers of the blocks before and after).
* ``consumers``: the ``nn.Linear`` / ``nn.Conv2d`` whose input columns / channels read them.
* ``norms`` (``BatchNorm1d/2d``) and ``depthwise`` convs (``groups == in == out``) on the way,
  sliced channel by channel.

Between producers and consumers the analysis understands: activation modules and functions
(ReLU, ReLU6, GELU, SiLU, Hardswish, Hardsigmoid, LeakyReLU, ELU, Mish, Softplus, Hardtanh,
Tanh, Sigmoid), Identity / Dropout, BatchNorm, depthwise convs, MaxPool2d / AvgPool2d /
adaptive pooling (modules and ``F.*`` functions), ``mean`` over non-channel dims, ``+`` / ``-``
of two channel tensors of the same shape (residual adds) and ``+ - * /`` with a Python number,
``contiguous`` / ``clone`` / ``detach``, ``torch.flatten`` / ``x.flatten(1)`` / ``nn.Flatten``
/ ``x.view(x.size(0), -1)`` starting at the channel dim (channel ``c`` of ``[B, C, H, W]`` then
is columns ``c*H*W .. (c+1)*H*W - 1`` of the consumer Linear), and ``x.size(d)`` /
``x.shape[d]`` for a non-channel ``d``, zero padding, and the product of two channel tensors
with the same channel layout (gated MLPs, squeeze-excite gates), which couples them. Attention
heads are groups of their own (``unit="head"``, :mod:`compress_ops.structured.heads`), also
with one fused q/k/v projection split into q, k and v (GPT-2's ``c_attn``: ``chunks`` gives
each chunk's rows per head, and the attention's ``split_size`` / head counts are rescaled).
Anything else reached by the channels (``torch.cat``, a ``view`` of other semantics, a sum
over channels, LayerNorm, a grouped conv, an add with the model input, the model output, ...)
makes the whole group unprovable: its producers are listed in ``skipped`` with the reason, and
stay untouched. So is every layer that is called more than once, has hooks, shares a
parameter, or has its weight read directly in the forward (with the fx capture: or is a
subclass). A model neither capture can read gives no group (every layer
listed); ``prune_channels`` and the channel ``Pruner`` then raise
:class:`UncapturableModel` rather than prune nothing.

Exact removal of dead channels (``prune_channels(..., zero_only=True)``): a channel whose weight
rows are zero in every producer carries a constant (the sum of the producers' biases there,
then pushed through the path: BatchNorm with its running statistics, activations, pooling).
Its per-channel constant at each consumer is computed exactly; the channel is removed when for
every consumer that constant is 0, or it can be folded into the consumer's bias exactly:
always for a Linear (``bias += W[:, cols] @ c``), for a Conv2d only when it does not pad with
zeros (``padding == 0`` or a non-``"zeros"`` padding mode; with zero padding a constant input
is not constant at the borders). Otherwise the dead channel is kept. Constants are those of
inference: BatchNorm uses its running statistics and dropout is the identity, so outputs are
unchanged in eval mode (the mode one prunes a trained model in). The constants are computed in
float64 and added to the consumer's bias in its dtype: exact up to that dtype's rounding (in
bfloat16, one rounding of the bias).

The pruned model keeps its class: modules are replaced (at every name they are registered
under) by smaller copies of themselves (the same class, children, dtype, device,
hyper-parameters, ``training`` flag and ``requires_grad``). Optimizers built on the old
parameters must be rebuilt.
"""

from compress_ops.structured.channels import StructuredReport, prune_channels
from compress_ops.structured.graph import ChannelGroup, UncapturableModel, channel_groups
from compress_ops.structured.surgery import select_channels

__all__ = ["ChannelGroup", "StructuredReport", "UncapturableModel", "channel_groups",
           "select_channels", "prune_channels"]
