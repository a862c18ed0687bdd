"""The multiple-choice knapsack behind ``plan()``: one ``(bytes, error)`` option per layer, least
total error under a byte capacity (:func:`solve`, :func:`choose`). Pure: plain numbers in, plain
numbers out; it knows nothing of models or configs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compress_ops._validate import check_int, is_int

__all__ = ["MAX_STATES", "Solution", "solve", "choose"]

#: The exact solver gives up (and the LP-greedy takes over) when its Pareto frontier of partial
#: plans would hold more states than this after some layer, or when it would have kept more
#: than ``MAX_STATES * 200`` back pointers in all (6 bytes each: ~120 MB).
MAX_STATES = 100_000


@dataclass(frozen=True)
class Solution:
    """What :func:`solve` found: ``choice[i]`` indexes layer ``i``'s options.

    ``exact`` says ``error`` is the optimum; otherwise ``lower_bound`` (the LP relaxation's
    optimum) is at most the optimum, so ``error - lower_bound`` bounds the gap.
    """

    choice: list[int]
    bytes: int
    error: float
    exact: bool
    lower_bound: float


def _check_options(options: Sequence[Sequence[tuple[int, float]]], capacity: int) -> None:
    if not is_int(capacity):
        raise TypeError(f"capacity must be an int (bytes), got {type(capacity).__name__}")
    for i, opts in enumerate(options):
        if len(opts) == 0:
            raise ValueError(f"options[{i}] is empty: every layer needs at least one option")
        for j, (b, e) in enumerate(opts):
            check_int(f"options[{i}][{j}] bytes", b, min=0)
            if not math.isfinite(e):
                raise ValueError(f"options[{i}][{j}] error must be finite, got {e!r}")


def _pareto(opts: Sequence[tuple[int, float]]) -> list[int]:
    """Indices of the options no other option beats (fewer or equal bytes and lower or equal
    error), by increasing bytes (so by strictly decreasing error)."""
    keep: list[int] = []
    for j in sorted(range(len(opts)), key=lambda j: (opts[j][0], opts[j][1], j)):
        if not keep or opts[j][1] < opts[keep[-1]][1]:
            keep.append(j)
    return keep


def _frontier_dp(front: list[list[tuple[int, float]]], capacity: int,
                 max_states: int) -> list[int] | None:
    """Exact: the Pareto frontier of (bytes, error) over the first ``i`` layers, grown layer by
    layer; a partial plan that no longer fits (with the remaining layers at their smallest) or
    that another beats is dropped. ``None`` when the frontier outgrows ``max_states``."""
    n = len(front)
    rest = [0] * (n + 1)  # smallest bytes of layers i..n-1
    for i in range(n - 1, -1, -1):
        rest[i] = rest[i + 1] + front[i][0][0]
    states_b = np.zeros(1, dtype=np.int64)
    states_e = np.zeros(1, dtype=np.float64)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    kept = 0
    for i, opts in enumerate(front):
        ob = np.array([b for b, _ in opts], dtype=np.int64)
        oe = np.array([e for _, e in opts], dtype=np.float64)
        nb = (states_b[:, None] + ob[None, :]).reshape(-1)
        ne = (states_e[:, None] + oe[None, :]).reshape(-1)
        idx = np.flatnonzero(nb <= capacity - rest[i + 1])
        # by bytes, ties by error: then a state is kept iff its error is below every earlier one
        idx = idx[np.argsort(ne[idx], kind="stable")]
        idx = idx[np.argsort(nb[idx], kind="stable")]
        e_sorted = ne[idx]
        best_before = np.full_like(e_sorted, math.inf)
        best_before[1:] = np.minimum.accumulate(e_sorted)[:-1]
        idx = idx[e_sorted < best_before]
        kept += idx.size
        if idx.size > max_states or kept > 200 * max_states:
            return None
        states_b, states_e = nb[idx], ne[idx]
        back.append(((idx // len(opts)).astype(np.int32), (idx % len(opts)).astype(np.int16)))
    # the frontier is sorted by bytes with strictly decreasing error: the last state is best
    state = states_b.size - 1
    choice = [0] * n
    for i in range(n - 1, -1, -1):
        parent, opt = back[i]
        choice[i] = int(opt[state])
        state = int(parent[state])
    return choice


def _hull(opts: list[tuple[int, float]]) -> list[int]:
    """Indices (into the Pareto list ``opts``) of its lower convex hull, from the smallest: the
    error drop per extra byte strictly decreases along it."""
    hull: list[int] = []
    for j, (b, e) in enumerate(opts):
        while len(hull) >= 2:
            (b1, e1), (b2, e2) = opts[hull[-2]], opts[hull[-1]]
            # drop the middle point unless it lies strictly below the chord (b1,e1)-(b,e)
            if (e2 - e1) * (b - b1) >= (e - e1) * (b2 - b1):
                hull.pop()
            else:
                break
        hull.append(j)
    return hull


def _lp_greedy(front: list[list[tuple[int, float]]],
               capacity: int) -> tuple[list[int], float]:
    """Greedy on the LP relaxation: start every layer at its smallest option, take the hull
    upgrades by decreasing error drop per byte while they fit, then improve single layers while
    any change fits and lowers the error. Returns ``(choice, LP lower bound)``."""
    n = len(front)
    choice = [0] * n
    left = capacity - sum(opts[0][0] for opts in front)
    error = sum(opts[0][1] for opts in front)
    steps = []  # (-drop per byte, layer, from, to)
    for i, opts in enumerate(front):
        h = _hull(opts)
        for a, b in zip(h, h[1:], strict=False):
            db, de = opts[b][0] - opts[a][0], opts[a][1] - opts[b][1]
            steps.append((-de / db, i, a, b))
    steps.sort()
    bound = None
    for neg_rate, i, a, b in steps:
        db = front[i][b][0] - front[i][a][0]
        if choice[i] != a:
            continue  # an earlier upgrade of this layer did not fit
        if db <= left:
            choice[i] = b
            left -= db
            error -= front[i][a][1] - front[i][b][1]
        elif bound is None:  # the LP optimum takes this upgrade fractionally
            bound = error + neg_rate * left
    lower_bound = error if bound is None else bound
    while True:  # improvement: the single-layer change with the largest error drop that fits
        best = None
        for i, opts in enumerate(front):
            cb, ce = opts[choice[i]]
            for j, (b, e) in enumerate(opts):
                if e < ce and b - cb <= left and (best is None or ce - e > best[0]):
                    best = (ce - e, i, j)
        if best is None:
            break
        _, i, j = best
        left -= front[i][j][0] - front[i][choice[i]][0]
        choice[i] = j
    return choice, lower_bound


def solve(options: Sequence[Sequence[tuple[int, float]]], capacity: int, *,
          max_states: int = MAX_STATES) -> Solution:
    """Multiple-choice knapsack: one option ``(bytes, error)`` per layer, least total error with
    total bytes ``<= capacity``.

    Dominated options are dropped, then a dynamic program over the Pareto frontier of partial
    plans finds the optimum (ties: fewer bytes). If that frontier would hold more than
    ``max_states`` states, a greedy on the LP relaxation plus an improvement pass answers
    instead (``exact=False``; ``lower_bound`` certifies the gap). The result always fits.
    ``ValueError`` when even the smallest option of every layer does not fit.
    """
    _check_options(options, capacity)
    keep = [_pareto(opts) for opts in options]
    front = [[(int(options[i][j][0]), float(options[i][j][1])) for j in k]
             for i, k in enumerate(keep)]
    smallest = sum(opts[0][0] for opts in front)
    if smallest > capacity:
        raise ValueError(f"no choice fits: the smallest options take {smallest} bytes > "
                         f"capacity {capacity}")
    local = _frontier_dp(front, capacity, max_states) if front else []
    exact = local is not None
    if local is None:
        local, lower_bound = _lp_greedy(front, capacity)
    choice = [keep[i][j] for i, j in enumerate(local)]
    total_b = sum(options[i][j][0] for i, j in enumerate(choice))
    total_e = math.fsum(options[i][j][1] for i, j in enumerate(choice))
    if total_b > capacity:  # cannot happen; never hand back a plan over budget
        raise AssertionError(f"solver bug: {total_b} bytes > capacity {capacity}")
    return Solution(choice, total_b, total_e, exact, total_e if exact else min(lower_bound,
                                                                                total_e))


def choose(options: Sequence[Sequence[tuple[int, float]]], capacity: int) -> list[int]:
    """``options[i]``: layer ``i``'s ``(bytes, error)`` options; returns the index of the option
    chosen per layer (least total error with total bytes ``<= capacity``). See :func:`solve`."""
    return solve(options, capacity).choice
