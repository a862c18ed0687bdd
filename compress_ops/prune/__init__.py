"""Pruning criteria, mask patterns and schedules (plain PyTorch; CPU or GPU).

Criteria (a saliency per weight: larger means keep):

* :func:`magnitude_scores` -- ``|w|``;
* :func:`wanda_scores` -- Wanda (Sun et al., 2023): ``|w| * ||x_j||_2``, the input feature's
  activation norm over calibration tokens (:func:`activation_norms`);
* :func:`obd_scores` -- Optimal Brain Damage (LeCun et al., 1990) with the diagonal empirical
  Fisher as the Hessian: ``F_jj w^2 / 2``, ``F`` = mean squared gradient over calibration
  batches (:func:`fisher_diagonal`).

Patterns (a boolean keep-mask from scores):

* :func:`unstructured_masks` -- the lowest ``sparsity`` fraction, per layer or over all layers
  at once (global);
* :func:`nm_mask` -- N:M along the input dimension (2:4: two kept in every group of four);
* :func:`structured_mask` -- whole output rows / channels, ranked by their L2 saliency.

Schedule: :func:`cubic_sparsity` (Zhu & Gupta, 2017). Regularizer: :class:`GroupLasso`.

One shot, without training:

* :func:`prune_one_shot_` -- unstructured SparseGPT (Frantar & Alistarh, 2023), Wanda or
  magnitude pruning of every linear layer in place, from calibration data; the layers stay
  dense (for accuracy studies: no kernel reads the mask).

Search (the submodule :mod:`compress_ops.prune.search`, imported by the package root, not here:
it sits one layer above this package because it is seeded from :func:`compress_ops.plan`):

* :func:`compress_ops.prune.search.evolve` -- an evolutionary search over one config (or
  dense) per layer under a byte budget, every individual scored on the real compressed model.
"""

from compress_ops.prune.criteria import (
    activation_norms,
    eval_mode,
    fisher_diagonal,
    magnitude_scores,
    obd_scores,
    wanda_scores,
)
from compress_ops.prune.masks import (
    GroupLasso,
    cubic_sparsity,
    nm_kept,
    nm_mask,
    nm_permutation,
    structured_mask,
    unstructured_masks,
)
from compress_ops.prune.oneshot import prune_one_shot_
from compress_ops.prune.pruner import Pruner

__all__ = ["Pruner", "magnitude_scores", "wanda_scores", "obd_scores", "activation_norms",
           "fisher_diagonal", "unstructured_masks", "nm_mask", "nm_kept", "nm_permutation",
           "structured_mask", "cubic_sparsity", "GroupLasso", "eval_mode", "prune_one_shot_"]
