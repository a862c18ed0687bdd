"""compress_ops.planner.solver: the multiple-choice knapsack is exact against brute force, the
LP-greedy fallback fits and its bound holds, more capacity never raises the error."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from compress_ops.planner import choose, solve


def _brute(options, capacity):
    best = None
    for combo in itertools.product(*(range(len(o)) for o in options)):
        b = sum(options[i][j][0] for i, j in enumerate(combo))
        e = sum(options[i][j][1] for i, j in enumerate(combo))
        if b <= capacity and (best is None or e < best):
            best = e
    return best


instances = st.lists(
    st.lists(st.tuples(st.integers(0, 40), st.floats(0, 10, allow_nan=False)), min_size=1,
             max_size=4),
    min_size=1, max_size=5)


@given(options=instances, capacity=st.integers(0, 150))
def test_choose_is_exact_against_brute_force(options, capacity):
    best = _brute(options, capacity)
    if best is None:
        with pytest.raises(ValueError, match="no choice fits"):
            choose(options, capacity)
        return
    choice = choose(options, capacity)
    assert len(choice) == len(options)
    assert sum(options[i][j][0] for i, j in enumerate(choice)) <= capacity
    assert sum(options[i][j][1] for i, j in enumerate(choice)) == pytest.approx(best, abs=1e-9)


@given(options=instances, capacity=st.integers(0, 150))
def test_greedy_fallback_fits_and_its_bound_holds(options, capacity):
    best = _brute(options, capacity)
    if best is None:
        return
    sol = solve(options, capacity, max_states=0)  # force the LP greedy
    assert not sol.exact and sol.bytes <= capacity
    assert sol.lower_bound <= best + 1e-9 <= sol.error + 2e-9


@given(options=instances, capacity=st.integers(0, 150), extra=st.integers(0, 60))
def test_more_capacity_never_raises_the_error(options, capacity, extra):
    if _brute(options, capacity) is None:
        return
    tight, loose = solve(options, capacity), solve(options, capacity + extra)
    assert loose.error <= tight.error + 1e-9


def test_solver_on_a_larger_instance_and_bad_options():
    g = torch.Generator().manual_seed(0)
    options = [[(int(b), float(e)) for b, e in zip(torch.randint(1, 10_000, (8,), generator=g),
                                                   torch.rand(8, generator=g), strict=True)]
               for _ in range(60)]
    cap = sum(min(b for b, _ in o) for o in options) + 100_000
    exact = solve(options, cap)
    greedy = solve(options, cap, max_states=0)
    assert exact.exact and exact.bytes <= cap and greedy.bytes <= cap
    assert greedy.lower_bound <= exact.error + 1e-9 <= greedy.error + 2e-9
    with pytest.raises(ValueError, match=r"options\[0\] is empty"):
        choose([[]], 10)
    with pytest.raises(ValueError, match="bytes must be an int"):
        choose([[(1.5, 0.0)]], 10)
    with pytest.raises(ValueError, match="error must be finite"):
        choose([[(1, math.inf)]], 10)
    with pytest.raises(TypeError, match="capacity must be an int"):
        choose([[(1, 0.0)]], 10.0)
