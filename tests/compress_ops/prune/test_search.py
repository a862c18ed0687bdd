"""compress_ops.prune.search (evolve): the budget, determinism, the elite, the plan seed, the
Recipe it returns, bad input."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.configs import transform_for
from compress_ops.nn.base import CompressedModule
from compress_ops.planner import plan as make_plan
from compress_ops.prune.search import SearchResult, evolve

# cheap to build: no range search, no k-means
CANDS = (co.QuantConfig(bits=8, search_steps=0), co.QuantConfig(bits=4, search_steps=0),
         co.QuantConfig(bits=2, search_steps=0), co.LowRankConfig(rank=8))
BUDGET = 0.12


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


@pytest.fixture(scope="module")
def data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 64, generator=g) for _ in range(3)]


@pytest.fixture(scope="module")
def seed_plan(data):
    return make_plan(mlp(), data, BUDGET, candidates=CANDS, verbose=False)


def relative_error(model: nn.Module, compressed: nn.Module, data) -> float:
    with torch.no_grad():
        num = sum(float((compressed(x).double() - model(x).double()).pow(2).sum())
                  for x in data)
        den = sum(float(model(x).double().pow(2).sum()) for x in data)
    return num / den


def stored_bytes(model: nn.Module) -> int:
    return sum(m.stored_weight_bytes() if isinstance(m, CompressedModule)
               else m.weight.numel() * m.weight.element_size()
               for m in model.modules() if isinstance(m, (nn.Linear, CompressedModule)))


def test_result_is_a_recipe_whose_fitness_compress_reproduces(data, seed_plan):
    model = mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    children = list(model)
    r = evolve(model, data, BUDGET, plan=seed_plan, population=8, generations=4,
               verbose=False)
    assert isinstance(r, SearchResult) and isinstance(r, co.Recipe)
    # the model is left as it was
    assert list(model) == children
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    compressed = co.compress_(copy.deepcopy(model), r)
    assert math.isclose(relative_error(model, compressed, data), r.fitness, rel_tol=1e-9)
    assert stored_bytes(compressed) == r.stored_bytes <= math.floor(BUDGET * r.dense_bytes)
    assert r.ratio == r.stored_bytes / r.dense_bytes
    assert co.report(compressed).stored_bytes == r.stored_bytes
    assert len(r.table) == 4 and r.evaluations >= 8 and r.seconds > 0
    assert "relative end-to-end error" in str(r)


def test_plan_fitness_is_the_plans_verified_error(data, seed_plan):
    r = evolve(mlp(), data, BUDGET, plan=seed_plan, population=4, generations=1,
               verbose=False)
    label = seed_plan.chosen.removeprefix("uniform ")
    assert math.isclose(r.plan_fitness, seed_plan.end_to_end[label], rel_tol=1e-9)
    assert r.fitness <= r.plan_fitness
    # every uniform candidate the plan measured (those that fit) was measured again
    for k, v in r.uniform_fitness.items():
        assert math.isclose(v, seed_plan.end_to_end[k], rel_tol=1e-9)
    assert r.uniform_fitness and r.fitness <= min(r.uniform_fitness.values())
    # a population too small to hold every uniform candidate still keeps the best measured
    small = evolve(mlp(), data, BUDGET, plan=seed_plan, population=2, generations=1,
                   verbose=False)
    assert small.fitness <= min([small.plan_fitness, *small.uniform_fitness.values()])


def test_every_evaluated_individual_fits_the_budget(data, seed_plan):
    capacity = math.floor(BUDGET * seed_plan.dense_bytes)
    seen = []

    def fitness(m: nn.Module) -> float:
        seen.append(stored_bytes(m))
        return float(sum(F.mse_loss(m(x), torch.zeros(16, 10)) for x in data))

    r = evolve(mlp(), data, BUDGET, plan=seed_plan, population=10, generations=5,
               fitness=fitness, verbose=False)
    assert len(seen) == r.evaluations > 10  # cached genomes are not evaluated again
    assert max(seen) <= capacity and r.stored_bytes <= capacity


def test_deterministic_with_a_seed_and_the_elite_never_gets_worse(data, seed_plan):
    runs = [evolve(mlp(), data, BUDGET, plan=seed_plan, population=6, generations=4, seed=3,
                   verbose=False) for _ in range(2)]
    a, b = runs
    assert a.genome == b.genome and a.history == b.history and a.rules == b.rules
    assert a.evaluations == b.evaluations
    assert len(a.history) == 5
    assert all(x >= y for x, y in itertools.pairwise(a.history))
    assert a.history[0] <= a.plan_fitness and a.history[-1] == a.fitness
    model = mlp()  # (seeds the global RNG itself)
    state = torch.random.get_rng_state()
    evolve(model, data, BUDGET, plan=seed_plan, population=4, generations=1, verbose=False)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG touched


def test_finds_the_exhaustive_optimum_on_a_small_space(data):
    """3 layers x (int8, int4, int2, dense): 64 genomes; the search reaches the best one that
    fits, under a user fitness (cross entropy to the dense model's labels) the plan's
    predicted error does not know."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 96), nn.ReLU(),
                          nn.Linear(96, 10))
    cands = CANDS[:3]
    with torch.no_grad():
        labels = [model(x).argmax(1) for x in data]

    def fitness(m: nn.Module) -> float:
        return float(sum(F.cross_entropy(m(x), y) for x, y in zip(data, labels,
                                                                     strict=True)))

    p = make_plan(model, data, 0.2, candidates=cands, verbose=False)
    r = evolve(model, data, 0.2, plan=p, population=8, generations=8, fitness=fitness,
               verbose=False)
    best = math.inf
    capacity = math.floor(0.2 * p.dense_bytes)
    built = {(i, c): transform_for(c).build(model[i], c) for i in (0, 2, 4) for c in cands}
    for choice in itertools.product([*cands, None], repeat=3):
        m = copy.deepcopy(model)
        for i, c in zip((0, 2, 4), choice, strict=True):
            if c is not None:
                m[i] = built[i, c]
        if stored_bytes(m) <= capacity:
            with torch.no_grad():
                best = min(best, fitness(m.eval()))
    assert math.isclose(r.fitness, best, rel_tol=1e-9)
    assert r.fitness <= r.plan_fitness
    assert not r.default_fitness and "fitness: search" in str(r)


def test_calls_plan_itself_and_applies_calibrated_options(data):
    model = mlp()
    cands = (co.QuantConfig(bits=4, search_steps=0, method="gptq"),
             co.QuantConfig(bits=2, search_steps=0))
    r = evolve(model, data, 0.1, candidates=cands, population=4, generations=1,
               verbose=False)
    assert r.plan.budget == 0.1
    compressed = co.compress_(copy.deepcopy(model), r, calib=data)
    assert math.isclose(relative_error(model, compressed, data), r.fitness, rel_tol=1e-6)


def test_progress_line_without_tqdm(data, seed_plan, capsys, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "tqdm", None)
    evolve(mlp(), data, BUDGET, plan=seed_plan, population=4, generations=2, verbose=True)
    err = capsys.readouterr().err
    assert "generation 2/2" in err and "search" in err


def test_bad_input(data, seed_plan):
    model = mlp()
    kw = dict(plan=seed_plan, verbose=False)
    with pytest.raises(TypeError, match="model"):
        evolve("not a model", data, BUDGET, **kw)
    with pytest.raises(ValueError, match="budget 0.001 cannot be met.*at least"):
        evolve(model, data, 0.001, **kw)
    with pytest.raises(ValueError, match="budget"):
        evolve(model, data, 0.0, **kw)
    with pytest.raises(ValueError, match="budget 0.001 cannot be met"):
        evolve(model, data, 0.001, candidates=CANDS, verbose=False)  # co.plan says it
    with pytest.raises(ValueError, match="population"):
        evolve(model, data, BUDGET, population=0, **kw)
    with pytest.raises(ValueError, match="population"):
        evolve(model, data, BUDGET, population=1, **kw)
    with pytest.raises(ValueError, match="generations"):
        evolve(model, data, BUDGET, generations=0, **kw)
    with pytest.raises(ValueError, match="calib_data"):
        evolve(model, [], BUDGET, **kw)
    with pytest.raises(ValueError, match="calib_data"):
        evolve(model, iter([]), BUDGET, **kw)
    with pytest.raises(TypeError, match="calib_data"):
        evolve(model, data[0], BUDGET, **kw)
    with pytest.raises(TypeError, match="fitness"):
        evolve(model, data, BUDGET, fitness=3, **kw)
    with pytest.raises(TypeError, match="plan"):
        evolve(model, data, BUDGET, plan="plan", verbose=False)
    with pytest.raises(ValueError, match="candidates"):
        evolve(model, data, BUDGET, candidates=CANDS, **kw)
    with pytest.raises(ValueError, match="plan was made for budget"):
        evolve(model, data, 0.09, **kw)  # the plan's choice (for 0.12) does not fit 0.09
    other = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    with pytest.raises(ValueError, match="plan was not made for this model"):
        evolve(other, data, BUDGET, **kw)
