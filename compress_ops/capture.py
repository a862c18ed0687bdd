"""The ``torch.fx`` capture that fusion (:mod:`compress_ops.fuse`) and the structured channel
analysis (:mod:`compress_ops.structured`) share.

Every module this package builds (:class:`~compress_ops.nn.base.CompressedModule`) is a leaf of
the trace: its ``forward`` calls one op after input checks that branch on shapes and dtypes,
which ``fx.symbolic_trace`` cannot follow (``symbolically traced variables cannot be used as
inputs to control flow``). As a leaf it is one ``call_module`` node, so a model compressed in
one step (``compress_(model, QuantConfig())``) can still be fused or analysed in the next. The
analyses treat a leaf they do not understand as opaque: fusion never matches it, and the channel
analysis stops a channel group at it, with the reason.
"""

from __future__ import annotations

from torch import fx, nn

from compress_ops.nn.base import CompressedModule

__all__ = ["Tracer", "trace"]


class Tracer(fx.Tracer):
    """``fx.Tracer`` whose leaves are torch's own (``torch.nn`` modules) plus every
    :class:`~compress_ops.nn.base.CompressedModule`."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, CompressedModule) or super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace(module)`` with :class:`Tracer`: raises what tracing raises."""
    tracer = Tracer()
    graph = tracer.trace(module)
    return fx.GraphModule(tracer.root, graph, type(module).__name__)
