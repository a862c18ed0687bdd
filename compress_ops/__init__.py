"""compress_ops: Triton kernels for compressed neural networks as PyTorch custom ops.

    import compress_ops as co
    co.compress_(model, co.Sparse24Config())
    print(co.report(model))
"""

import compress_ops.prune.search  # noqa: F401  (co.prune.search: one layer above prune/)
from compress_ops import capture, distill, nn, ops, prune, qat, share, structured  # noqa: F401  (ops registers torch.ops.compress_ops.*)
from compress_ops.api import Recipe, Report, ReportRow, compress_, report
from compress_ops.configs import (
    AlreadyCompressedError,
    CodebookConfig,
    DWSepFuseConfig,
    HashedConfig,
    LowRankConfig,
    QuantConfig,
    SharedFilterConfig,
    Sparse24Config,
    TernaryConfig,
    UnfusableError,
    UnsupportedModule,
    UnsupportedWeight,
    W8A8Config,
)
from compress_ops.integrations import hf as _hf
from compress_ops.integrations.serialization import CheckpointError, load, save
from compress_ops.planner import Plan, plan

_hf.install()  # Hugging Face: quant_method="compress_ops" (transformers is not imported here)

__version__ = "0.1.0"

__all__ = [
    "AlreadyCompressedError",
    "CheckpointError",
    "CodebookConfig",
    "DWSepFuseConfig",
    "HashedConfig",
    "LowRankConfig",
    "QuantConfig",
    "Recipe",
    "Report",
    "ReportRow",
    "SharedFilterConfig",
    "Sparse24Config",
    "TernaryConfig",
    "W8A8Config",
    "UnsupportedModule",
    "UnfusableError",
    "UnsupportedWeight",
    "Plan",
    "compress_",
    "load",
    "plan",
    "report",
    "save",
    "capture",
    "distill",
    "nn",
    "ops",
    "prune",
    "qat",
    "share",
    "structured",
]
