"""compress_ops.planner.planning (co.plan): per-layer sensitivity, the budget, the Plan recipe."""

from __future__ import annotations

import copy
import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.configs import per_layer_configs, transform_for
from compress_ops.nn import LowRankLinear
from compress_ops.planner import DEFAULT_CANDIDATES, Plan, plan

# cheaper to build than DEFAULT_CANDIDATES (fewer range-search steps and k-means iterations)
FAST = (co.Sparse24Config(), co.QuantConfig(bits=8, search_steps=0),
        co.QuantConfig(bits=4, search_steps=4), co.QuantConfig(bits=2, search_steps=4),
        co.CodebookConfig(bits=2, iters=5), co.LowRankConfig(energy=0.6))


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 10))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1)
        self.dw = nn.Conv2d(32, 32, 3, padding=1, groups=32)  # no candidate applies
        self.fc = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dw(F.relu(self.conv2(F.relu(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def data() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(16, 64, generator=g) for _ in range(3)]


def _rows_of(model: nn.Module, names: set[str]):
    return [r for r in co.report(model) if r.name in names]


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.15])
def test_compressed_model_fits_the_budget(budget, data):
    model = mlp()
    cands = DEFAULT_CANDIDATES if budget == 0.25 else FAST
    p = plan(model, data, budget, candidates=cands, verbose=False)
    assert p.stored_bytes <= budget * p.dense_bytes and p.exact
    out = co.compress_(model, p)
    rows = _rows_of(out, {"0", "2", "4"})
    assert len(rows) == 3 and sum(r.dense_bytes for r in rows) == p.dense_bytes
    assert sum(r.stored_bytes for r in rows) == p.stored_bytes
    assert sum(r.stored_bytes for r in rows) <= budget * p.dense_bytes
    assert {r.kind for r in rows} != {"dense"}
    assert torch.isfinite(out(data[0])).all()


def test_measured_error_matches_a_hand_computation(data):
    model = mlp()
    cfg = co.QuantConfig(bits=4)
    p = plan(model, data, 1.0, candidates=(cfg, co.Sparse24Config()), metric="relative_mse",
             verbose=False)
    inputs = []
    h = model[2].register_forward_hook(lambda m, a, o: inputs.append(a[0].double()))
    with torch.no_grad():
        for x in data:
            model(x)
    h.remove()
    for c in (cfg, co.Sparse24Config()):
        q = transform_for(c).build(model[2], c)
        w, b = model[2].weight.detach().double(), model[2].bias.detach().double()
        err = sum(F.linear(x, q.dense_weight().double(), b).sub(F.linear(x, w, b)).pow(2).sum()
                  for x in inputs)
        ref = sum(F.linear(x, w, b).pow(2).sum() for x in inputs)
        (row,) = [r for r in p.table if r.layer == "2" and r.config == c]
        assert row.stored_bytes == q.stored_weight_bytes()
        assert row.error == pytest.approx(float(err / ref), rel=1e-4)
    # budget 1: everything can stay dense at zero error
    assert p.total_error == 0 and all(v is None for v in p.rules.values())


def test_mse_metric(data):
    model = mlp()
    cfg = co.QuantConfig(bits=2)
    p = plan(model, data[:1], 1.0, candidates=(cfg,), metric="mse", verbose=False)
    q = transform_for(cfg).build(model[0], cfg)
    with torch.no_grad():
        expect = (q(data[0]).double() - model[0](data[0]).double()).pow(2).mean()
    (row,) = [r for r in p.table if r.layer == "0" and r.config == cfg]
    assert row.error == pytest.approx(float(expect), rel=1e-6)


def test_plan_does_not_modify_the_model(data):
    model = mlp()
    layers = list(model)
    before = copy.deepcopy(model.state_dict())
    plan(model, data, 0.2, candidates=FAST, verbose=False)
    assert all(a is b for a, b in zip(model, layers, strict=True))  # verify put them back
    assert all(type(m) is nn.Linear for m in (model[0], model[2], model[4]))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_tighter_budget_never_gives_lower_error(data):
    model = mlp()
    errors = [plan(model, data, b, candidates=FAST, verify=False, verbose=False).total_error
              for b in (1.0, 0.4, 0.2, 0.09)]
    assert errors[0] == 0
    assert all(a <= b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] > 0


def test_plan_is_a_printable_recipe(data, capsys):
    model = mlp()
    p = plan(model, data, 0.25, candidates=FAST)
    printed = capsys.readouterr().out
    assert isinstance(p, co.Recipe) and isinstance(p, Plan)
    assert printed.strip() == str(p)
    assert "TOTAL" in printed and "optimal" in printed and "budget 0.25" in printed
    assert "measured end-to-end error" in printed and "chosen: solved" in printed
    assert p.chosen == "solved" and "solved" in p.end_to_end and len(p.end_to_end) > 1
    chosen = [r for r in p.table if r.chosen]
    assert sorted(r.layer for r in chosen) == ["0", "2", "4"]
    assert sum(r.stored_bytes for r in chosen) == p.stored_bytes
    assert math.isclose(sum(r.error for r in chosen), p.total_error)
    # one exact rule per layer: "0" must not match "0.x" or "10"
    assert set(p.rules) == {re.escape(n) for n in ("0", "2", "4")}
    assert p.config_for("0")[0] and not p.config_for("10")[0]
    assert repr(p).startswith("Plan(")


def test_conv_model_and_layers_that_stay_dense():
    torch.manual_seed(0)
    model = ConvNet().eval()
    batches = [(torch.randn(4, 3, 8, 8), torch.zeros(4)) for _ in range(2)]  # tuple batches
    p = plan(model, batches, 0.6, candidates=FAST, verbose=False)
    layers = {r.layer for r in p.table}
    assert layers == {"conv1", "conv2", "dw", "fc"}
    (dw,) = [r for r in p.table if r.layer == "dw" and r.candidate == "dense"]
    assert dw.chosen and "no candidate applies" in dw.note
    assert any(r.layer == "dw" and "groups=1" in r.note for r in p.table)
    assert any(r.layer == "conv2" and r.candidate.startswith("lowrank") and r.error is not None
               for r in p.table)
    assert p.rules[re.escape("dw")] is None
    co.compress_(model, p)
    rows = _rows_of(model, layers)
    assert sum(r.stored_bytes for r in rows) == p.stored_bytes <= 0.6 * p.dense_bytes
    assert sum(r.dense_bytes for r in rows) == p.dense_bytes


def test_report_lists_the_convs_a_plan_keeps_dense():
    torch.manual_seed(0)
    model = ConvNet().eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(2)]
    # only the linear can be compressed (quantization): every conv stays dense
    p = plan(model, batches, 0.97, candidates=(co.QuantConfig(bits=4, search_steps=0),
                                               co.LowRankConfig(rank=30)), verbose=False)
    co.compress_(model, p)
    rows = co.report(model)
    assert {r.name for r in rows} == {"conv1", "conv2", "dw", "fc"}
    assert rows.dense_bytes == p.dense_bytes and rows.stored_bytes == p.stored_bytes


def test_energy_lowrank_is_pinned_to_the_measured_rank(data):
    model = mlp()
    # ~0.49 of dense with every layer factorized; keeping any one dense would not fit
    p = plan(model, data, 0.5, candidates=(co.LowRankConfig(energy=0.6),), verbose=False)
    chosen = {r.layer: r for r in p.table if r.chosen}
    assert all(r.candidate == "lowrank(energy=0.6)" for r in chosen.values())
    for name in ("0", "2", "4"):
        cfg = p.rules[name]
        assert cfg.rank is not None and cfg.energy is None
        assert chosen[name].note == f"rank {cfg.rank}"
    co.compress_(model, p)
    assert isinstance(model[2], LowRankLinear)
    assert sum(r.stored_bytes for r in _rows_of(model, {"0", "2", "4"})) == p.stored_bytes


def test_tied_and_aliased_layers_stay_dense(data):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(64, 64)
            self.alias = self.a  # the same module under two names
            self.b = nn.Linear(64, 64)
            self.c = nn.Linear(64, 64)
            self.c.weight = self.b.weight  # a tied weight
            self.d = nn.Linear(64, 32)
            self.unused = nn.Linear(64, 64)

        def forward(self, x):
            return self.d(self.c(self.b(self.alias(self.a(x)))))

    torch.manual_seed(0)
    model = Tied()
    p = plan(model, data, 0.9, candidates=FAST, verbose=False)
    notes = {r.layer: r.note for r in p.table if r.candidate == "dense"}
    assert "2 names" in notes["a"] and "tied" in notes["b"] and "tied" in notes["c"]
    assert "never ran" in notes["unused"]
    assert all(p.rules[re.escape(n)] is None for n in ("a", "alias", "b", "c", "unused"))
    assert p.rules["d"] is not None
    co.compress_(model, p)
    assert type(model.a) is nn.Linear and model.alias is model.a
    assert model.c.weight is model.b.weight and type(model.d) is not nn.Linear


def test_layers_narrows_the_scope(data):
    model = mlp()
    p = plan(model, data, 0.3, candidates=FAST, layers=["2"], forward=lambda m, x: m(x),
             verbose=False)
    assert set(p.rules) == {"2"} and p.dense_bytes == 128 * 128 * 4
    assert p.stored_bytes <= 0.3 * p.dense_bytes
    with pytest.raises(ValueError, match=r"layers \['nope'\]"):
        plan(model, data, 0.3, candidates=FAST, layers=["nope"], verbose=False)


def test_bad_inputs(data):
    model = mlp()
    with pytest.raises(ValueError, match=r"budget 0.01 cannot be met.*0\.0[0-9]+ of dense"):
        plan(model, data, 0.01, candidates=FAST, verbose=False)
    for bad in (0, 0.0, -0.5, 1.5, True, "0.5", math.nan):
        with pytest.raises(ValueError, match="budget must be a number in"):
            plan(model, data, bad, verbose=False)
    with pytest.raises(ValueError, match="no batches"):
        plan(model, [], 0.5, candidates=FAST, verbose=False)
    with pytest.raises(ValueError, match="no batches"):
        plan(model, iter(()), 0.5, candidates=FAST, verbose=False)
    with pytest.raises(TypeError, match="iterable of batches"):
        plan(model, data[0], 0.5, verbose=False)
    with pytest.raises(ValueError, match="shared codebook"):
        plan(model, data, 0.5, candidates=(co.CodebookConfig(shared=True),), verbose=False)
    with pytest.raises(TypeError, match="not a per-layer config"):
        plan(model, data, 0.5, candidates=(co.DWSepFuseConfig(),), verbose=False)
    with pytest.raises(ValueError, match="candidates is empty"):
        plan(model, data, 0.5, candidates=(), verbose=False)
    with pytest.raises(ValueError, match="metric must be one of"):
        plan(model, data, 0.5, metric="l1", verbose=False)
    convs = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(ValueError, match="no layer of the model can be compressed"):
        plan(convs, [torch.randn(1, 3, 5, 5)], 0.5, candidates=FAST[:2], verbose=False)
    with pytest.raises(ValueError, match="no layer of the model can be compressed.*rank 8"):
        plan(nn.Linear(8, 8), [torch.randn(2, 8)], 0.5, candidates=(co.LowRankConfig(rank=8),),
             verbose=False)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        plan(lambda x: x, data, 0.5, verbose=False)


def test_default_candidates_are_valid_per_layer_configs():
    assert len(set(DEFAULT_CANDIDATES)) == len(DEFAULT_CANDIDATES)
    assert all(type(c) in per_layer_configs() and not getattr(c, "shared", False)
               for c in DEFAULT_CANDIDATES)


@pytest.mark.parametrize(("data", "bias", "why"), [
    ([torch.full((4, 64), float("nan"))], True, "non-finite output on the calibration data"),
    ([torch.zeros(4, 64)], False, "output is all zero on the calibration data"),
])
def test_unusable_calibration_names_every_layer_and_its_reason(data, bias, why):
    model = nn.Sequential(nn.Linear(64, 64, bias=bias), nn.ReLU(), nn.Linear(64, 32, bias=bias))
    with pytest.raises(ValueError, match="no layer in scope has a usable candidate") as exc:
        co.plan(model, data, 0.5, verbose=False)
    lines = str(exc.value).splitlines()[1:]
    assert [line.split(":")[0].strip() for line in lines] == ["0", "2"]
    assert all(why in line for line in lines)


class _TiedKwargsLM(nn.Module):
    """A Hugging Face-shaped LM: called with keyword inputs, its head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc = nn.Embedding(64, 32), nn.Linear(32, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, input_ids, attention_mask=None):
        h = self.embed(input_ids)
        if attention_mask is not None:
            h = h * attention_mask[..., None]
        return self.head(F.gelu(self.fc(h)))


def test_dict_batches_and_a_tied_head_outside_the_budget():
    torch.manual_seed(0)
    model = _TiedKwargsLM()
    batches = [{"input_ids": torch.randint(0, 64, (2, 5)),
                "attention_mask": torch.ones(2, 5)} for _ in range(2)]
    p = plan(model, batches, 0.5, candidates=(co.QuantConfig(bits=4, group_size=32),),
             verbose=False)
    assert p.dense_bytes == model.fc.weight.numel() * 4  # the tied head is not counted
    head = [r for r in p.table if r.layer == "head"]
    assert len(head) == 1 and "outside the budget" in head[0].note
    assert p.stored_bytes <= 0.5 * p.dense_bytes


# -- the end-to-end objective (metric="output") and the uniform check (verify=True) ------------


class Uneven(nn.Module):
    """Two equal layers of very different importance: ``quiet``'s output reaches the head scaled
    by 0.01, so its relative error matters 10**4 times less end to end than ``loud``'s."""

    def __init__(self, quiet_scale: float = 0.01) -> None:
        super().__init__()
        self.loud, self.quiet = nn.Linear(64, 128), nn.Linear(64, 128)
        self.head = nn.Linear(128, 16)
        self.quiet_scale = quiet_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.loud(x)) + self.quiet_scale * torch.tanh(self.quiet(x)))


# int2 / int4 / int8 with 32-wide groups: 0.125 / 0.1875 / 0.3125 of the fp32 bytes
UNEVEN_CANDS = tuple(co.QuantConfig(bits=b, group_size=32, search_steps=0) for b in (2, 4, 8))


@pytest.fixture(scope="module")
def uneven() -> tuple[nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    return Uneven().eval(), [torch.randn(32, 64, generator=g) for _ in range(4)]


@torch.no_grad()
def _end_to_end(model: nn.Module, recipe: object, batches: list, **kw) -> tuple[float, float]:
    """(relative squared output error, stored / dense bytes) of ``compress_(copy, recipe)``."""
    m = co.compress_(copy.deepcopy(model), recipe, **kw)
    err = sum(float((m(x) - model(x)).pow(2).sum()) for x in batches)
    ref = sum(float(model(x).pow(2).sum()) for x in batches)
    rows = co.report(m)
    return err / ref, rows.stored_bytes / rows.dense_bytes


def _labels(p: Plan) -> dict[object, str]:
    return {r.config: r.candidate for r in p.table if r.config is not None}


@pytest.mark.parametrize("budget", [0.13, 0.19, 0.25, 0.3])
def test_plan_is_never_worse_end_to_end_than_a_uniform_candidate_that_fits(budget, uneven):
    model, batches = uneven
    p = plan(model, batches, budget, candidates=UNEVEN_CANDS, verbose=False)
    got, size = _end_to_end(model, p, batches)
    assert size <= budget
    # what plan measured is what compress_ gives
    assert p.end_to_end[p.chosen.removeprefix("uniform ")] == pytest.approx(got, rel=1e-6)
    labels, fitting = _labels(p), 0
    for cfg in UNEVEN_CANDS:
        err, size = _end_to_end(model, cfg, batches)
        if size <= budget:
            fitting += 1
            assert got <= err * (1 + 1e-9), (cfg, got, err)
            assert p.end_to_end[labels[cfg]] == pytest.approx(err, rel=1e-6)
        else:
            assert labels[cfg] not in p.end_to_end
    assert fitting and len(p.end_to_end) == fitting + 1


def test_verify_data_is_where_the_plan_is_never_worse(uneven):
    """With ``verify_data`` the end-to-end check measures every choice on those batches (the
    options still built from ``calib_data``): what plan measured is what compress_ gives there,
    and no uniform candidate that fits does better on them."""
    model, batches = uneven
    g = torch.Generator().manual_seed(7)
    held = [torch.randn(32, 64, generator=g) for _ in range(3)]
    p = plan(model, batches, 0.25, candidates=UNEVEN_CANDS, verbose=False, verify_data=held)
    q = plan(model, batches, 0.25, candidates=UNEVEN_CANDS, verbose=False)
    assert p.end_to_end.keys() == q.end_to_end.keys()
    assert p.end_to_end != q.end_to_end  # measured on other batches
    got, _ = _end_to_end(model, p, held)
    assert p.end_to_end[p.chosen.removeprefix("uniform ")] == pytest.approx(got, rel=1e-6)
    labels = _labels(p)
    for cfg in UNEVEN_CANDS:
        if labels[cfg] in p.end_to_end:
            err, _ = _end_to_end(model, cfg, held)
            assert p.end_to_end[labels[cfg]] == pytest.approx(err, rel=1e-6)
            assert got <= err * (1 + 1e-9)
    with pytest.raises(ValueError, match="verify=True"):
        plan(model, batches, 0.25, candidates=UNEVEN_CANDS, verify=False, verify_data=held,
             verbose=False)
    with pytest.raises(ValueError, match="verify_data is empty"):
        plan(model, batches, 0.25, candidates=UNEVEN_CANDS, verify_data=[], verbose=False)
    with pytest.raises(TypeError, match="verify_data must be an iterable"):
        plan(model, batches, 0.25, candidates=UNEVEN_CANDS, verify_data=held[0], verbose=False)


def test_output_metric_beats_the_layer_metric_where_sensitivity_is_uneven(uneven):
    """Without the uniform check, the end-to-end metric alone gives the quiet layer the few
    bits and the loud one the many; the layer-local metric sees two equal layers."""
    model, batches = uneven
    err = {}
    for metric in ("relative_mse", "output"):
        for budget in (0.19, 0.25):
            p = plan(model, batches, budget, candidates=UNEVEN_CANDS, metric=metric,
                     verify=False, verbose=False)
            err[metric, budget], _ = _end_to_end(model, p, batches)
            assert p.end_to_end == {} and p.chosen == "solved"
            if metric == "output":  # the second-order prediction is close to the measurement
                assert p.total_error == pytest.approx(err[metric, budget], rel=0.2)
                assert p.config_for("quiet")[1].bits == 2  # the cheapest: it barely matters
    assert err["output", 0.19] < 0.7 * err["relative_mse", 0.19]
    assert err["output", 0.25] < 0.05 * err["relative_mse", 0.25]


def test_output_metric_matches_an_exact_jacobian(uneven, monkeypatch):
    """With many probes, an option's error is sum diag(J^T J) * dy**2 / sum ||f||**2, the
    Jacobian J of the model output with respect to the layer's output computed exactly."""
    monkeypatch.setattr(co.planner.planning, "PROBES", 256)
    model, batches = uneven
    cfg = UNEVEN_CANDS[0]
    p = plan(model, batches[:2], 1.0, candidates=(cfg,), verify=False, verbose=False)
    q = transform_for(cfg).build(model.loud, cfg)
    num = ref = 0.0
    for x in batches[:2]:
        y = model.loud(x).detach().requires_grad_(True)
        f = model.head(torch.tanh(y) + 0.01 * torch.tanh(model.quiet(x)))
        diag = sum(torch.autograd.grad(f[:, k].sum(), y, retain_graph=True)[0].pow(2)
                   for k in range(f.shape[1]))
        with torch.no_grad():
            num += float((diag * (q(x) - y).pow(2)).sum())
            ref += float(f.pow(2).sum())
    (row,) = [r for r in p.table if r.layer == "loud" and r.config == cfg]
    assert row.error == pytest.approx(num / ref, rel=0.05)


def test_a_uniform_candidate_wins_when_it_measures_better(uneven):
    """``metric="mse"`` (absolute, per element) is fooled by a layer with large outputs that
    the model scales down: the solver spends its bytes there. Measured end to end, uniform
    int4 is better, and verify returns it."""
    _, batches = uneven
    torch.manual_seed(0)
    model = Uneven(quiet_scale=1e-4).eval()
    with torch.no_grad():
        model.quiet.weight.mul_(100)
    # 0.22: room for int8 on one layer and int2 on another, or int4 on all
    p = plan(model, batches, 0.22, candidates=UNEVEN_CANDS, metric="mse", verbose=False)
    int4 = _labels(p)[UNEVEN_CANDS[1]]
    assert p.chosen == f"uniform {int4}"
    assert p.end_to_end[int4] < p.end_to_end["solved"]
    assert all(cfg == UNEVEN_CANDS[1] for cfg in p.rules.values())
    chosen = [r for r in p.table if r.chosen]
    assert [r.candidate for r in chosen] == [int4] * 3
    assert p.stored_bytes == sum(r.stored_bytes for r in chosen) <= 0.22 * p.dense_bytes
    assert p.total_error == pytest.approx(sum(r.error for r in chosen))
    assert f"chosen: uniform {int4}" in str(p)
    assert _end_to_end(model, p, batches)[0] == pytest.approx(p.end_to_end[int4], rel=1e-6)


def test_calibrated_candidates_gptq_int3_against_rtn_int4(uneven):
    model, batches = uneven
    gptq3 = co.QuantConfig(bits=3, group_size=32, method="gptq")
    rtn4 = co.QuantConfig(bits=4, group_size=32)
    cands = (gptq3, rtn4, co.QuantConfig(bits=3, group_size=32))
    p = plan(model, iter(batches), 0.17, candidates=cands, verbose=False)
    for layer in ("loud", "quiet", "head"):
        err = {r.config: r.error for r in p.table if r.layer == layer and r.config}
        assert err[gptq3] < err[cands[2]]  # GPTQ beats round-to-nearest at int3
    assert set(p.rules.values()) <= {gptq3, rtn4}  # RTN int3 is never worth its bytes here
    got, size = _end_to_end(model, p, batches, calib=batches)
    assert size <= 0.17
    assert p.end_to_end[p.chosen.removeprefix("uniform ")] == pytest.approx(got, rel=1e-6)
    labels = _labels(p)
    assert set(p.end_to_end) == {"solved", labels[gptq3], labels[cands[2]]}  # int4 won't fit
    assert got <= min(p.end_to_end.values())


def test_model_output_picks_the_tensor_compared():
    from collections import OrderedDict

    from compress_ops.planner import model_output

    t, u = torch.randn(2, 3), torch.randn(2, 5)
    assert model_output(t) is t
    assert model_output((t, u)) is t and model_output([None, u, t]) is u
    assert model_output(OrderedDict(last_hidden_state=t, logits=u)) is u  # logits first
    assert model_output({"pooler_output": u, "last_hidden_state": t}) is t
    assert model_output({"a": None, "b": u}) is u
    assert model_output((t, u), lambda out: out[1]) is u
    with pytest.raises(TypeError, match="holds no tensor"):
        model_output({"a": 1})
    with pytest.raises(TypeError, match="floating-point"):
        model_output(t.argmax(1))
    with pytest.raises(TypeError, match="must return a tensor"):
        model_output(t, lambda out: out.tolist())


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body, self.main, self.aux = nn.Linear(64, 64), nn.Linear(64, 8), nn.Linear(64, 8)

    def forward(self, x):
        h = F.relu(self.body(x), inplace=True)
        return {"logits": self.main(h), "aux": self.aux(h)}


def test_the_output_compared_decides_what_counts(data):
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    cands = UNEVEN_CANDS[:2]
    p = plan(model, data, 0.3, candidates=cands, verbose=False)  # compares "logits"
    aux = {r.candidate: r for r in p.table if r.layer == "aux"}
    assert "no gradient from the model output reaches it" in aux["dense"].note
    assert all(r.error == 0 for r in aux.values())
    assert p.config_for("aux")[1] == cands[0]  # the fewest bytes: its errors are not seen
    q = plan(model, data, 0.3, candidates=cands, output=lambda out: out["aux"], verbose=False)
    main = [r for r in q.table if r.layer == "main"]
    assert all(r.error == 0 for r in main) and q.config_for("main")[1] == cands[0]
    assert q.end_to_end != p.end_to_end
    # an in-place ReLU after a layer changes neither its output nor its gradient as measured
    ref = copy.deepcopy(model)
    ref.forward = lambda x: {"logits": ref.main(F.relu(ref.body(x)))}
    r = plan(ref, data, 0.3, candidates=cands, verbose=False)
    assert [x.error for x in r.table if x.layer == "body"] == \
        [x.error for x in p.table if x.layer == "body"]


def test_output_metric_needs_a_differentiable_output(data):
    model = mlp()
    with pytest.raises(ValueError, match="differentiable"):
        plan(model, data, 0.3, candidates=UNEVEN_CANDS, forward=lambda m, x: m(x).detach(),
             verbose=False)
    p = plan(model, data, 0.3, candidates=UNEVEN_CANDS, forward=lambda m, x: m(x).detach(),
             metric="relative_mse", verbose=False)  # verify needs no gradient
    assert p.end_to_end["solved"] <= min(p.end_to_end.values())


def test_verify_puts_the_layers_back_on_an_error(data):
    model = mlp()
    layers, runs = list(model), []

    def forward(m, x):
        runs.append(x)
        if len(runs) == 3 + 5:  # the measuring pass ran: fail in the middle of the check
            raise RuntimeError("boom")
        return m(x)

    with pytest.raises(RuntimeError, match="boom"):
        plan(model, data, 0.3, candidates=UNEVEN_CANDS, forward=forward, verbose=False)
    assert all(a is b for a, b in zip(model, layers, strict=True))


def test_a_single_linear_and_hooked_layers(data):
    lin = nn.Linear(64, 32)
    p = plan(lin, data, 0.2, candidates=UNEVEN_CANDS, verbose=False)  # the root is the layer
    assert p.rules[""] is not None and set(p.end_to_end) >= {"solved"}
    model = mlp()
    model[2].register_forward_hook(lambda m, a, o: None)
    p = plan(model, data, 0.75, candidates=UNEVEN_CANDS, verbose=False)
    (row,) = [r for r in p.table if r.layer == "2"]
    assert "hooks" in row.note and row.chosen and p.rules["2"] is None
