"""``plan()``: choose one compression config per layer under a size budget.

    plan = co.plan(model, calib_batches, budget=0.25)   # prints the table it chose from
    co.compress_(model, plan)                           # a Plan is a Recipe

1. **Scope.** The layers in scope are the modules of the types the candidates handle
   (``nn.Linear``; ``nn.Conv2d`` too when a :class:`~compress_ops.configs.LowRankConfig` is a
   candidate), optionally narrowed by ``layers=``. The budget counts the *weight* bytes of
   exactly these layers (biases, norms, embeddings and layers out of scope are not counted).
2. **Options.** Every candidate is built for every layer it applies to with the same transform
   ``compress_`` uses (:func:`~compress_ops.configs.transform_for`; the transforms read
   ``module.weight`` and build a new module, the model is not modified). A candidate the
   transform refuses (``UnsupportedModule``, including ``UnsupportedWeight`` for weight values
   it cannot take) is not an option for that layer and the table says why. Keeping the layer
   dense is always an option (error 0, the dense bytes). Layers whose weight is tied to another
   module, modules reachable under several names, layers with hooks and layers that never ran
   on the calibration data stay dense and count at their dense size.
3. **Sensitivity.** One pass of the calibration data through the (unmodified) model; a hook on
   every layer keeps its input ``x`` and output ``y``, and each option runs on that ``x``.
   ``metric="output"`` (default) scores an option by its predicted share of the end-to-end
   error ``sum ||f_c(x) - f(x)||**2 / sum ||f(x)||**2`` of the model output: ``sum g**2 *
   (y_c - y)**2`` over the calibration data, ``g**2`` the mean over ``planning.PROBES`` (4)
   random probes ``v`` of ``(J^T v)**2`` (``J``: the Jacobian of the model output with
   respect to ``y``; back-propagated, activations only), an unbiased estimate of
   ``diag(J^T J)``: the second-order term of the output error, additive over layers.
   ``metric="relative_mse"`` scores ``sum ||y_c - y||**2 / sum ||y||**2`` (the layer's own
   output), ``"mse"`` ``sum ||y_c - y||**2 / numel``; one pass without gradients.
4. **Choice.** :func:`choose` solves the multiple-choice knapsack "least total error with total
   stored bytes <= ``budget`` x dense bytes": exact (a Pareto-frontier dynamic program) unless
   the frontier outgrows ``MAX_STATES``, then a greedy on the LP relaxation plus an improvement
   pass, whose gap to the optimum is bounded by the LP bound it reports (``Plan.lower_bound``).
5. **Check** (``verify=True``, default). The choice and every uniform candidate that fits the
   same budget run end to end on the calibration data (the replacements swapped into the
   model and put back; choices with calibrated options on a copy, through ``compress_``); the
   best measured is returned (``Plan.chosen``, ``Plan.end_to_end``), so a plan is never worse
   there than the best uniform candidate that fits.
"""

from compress_ops.planner.planning import (
    DEFAULT_CANDIDATES,
    Plan,
    PlanRow,
    model_output,
    plan,
)
from compress_ops.planner.solver import MAX_STATES, Solution, choose, solve

__all__ = ["DEFAULT_CANDIDATES", "MAX_STATES", "Plan", "PlanRow", "Solution", "choose",
           "model_output", "plan", "solve"]
