"""compress_ops/configs.py: the exception hierarchy, the transform registry, and modules that take
a config or the same plain values."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops import configs
from compress_ops._linear import HFConv1D
from compress_ops.nn.dequant import CODEBOOK_DEFAULTS, QUANT_DEFAULTS
from compress_ops.nn.hashed import HASHED_DEFAULTS
from compress_ops.nn.sparse24 import SPARSE24_DEFAULTS
from compress_ops.nn.w8a8 import W8A8_DEFAULTS


def test_one_exception_hierarchy():
    assert issubclass(co.UnfusableError, co.UnsupportedModule)
    assert issubclass(co.UnsupportedWeight, co.UnsupportedModule)
    for exc in (co.UnfusableError, co.UnsupportedWeight):  # still the ValueErrors they were
        assert issubclass(exc, ValueError)


@pytest.mark.parametrize(("config", "defaults"), [
    (co.QuantConfig(), QUANT_DEFAULTS), (co.CodebookConfig(), CODEBOOK_DEFAULTS),
    (co.Sparse24Config(), SPARSE24_DEFAULTS), (co.W8A8Config(), W8A8_DEFAULTS),
    (co.HashedConfig(), HASHED_DEFAULTS)])
def test_module_defaults_are_the_config_defaults(config, defaults):
    assert {k: getattr(config, k) for k in defaults} == defaults


@pytest.mark.parametrize(("module", "config", "values"), [
    (co.nn.QuantLinear, co.QuantConfig(bits=8, group_size=32, symmetric=True),
     {"bits": 8, "group_size": 32, "symmetric": True, "search_steps": 20}),
    (co.nn.CodebookLinear, co.CodebookConfig(bits=3, row_groups=2, iters=5),
     {"bits": 3, "row_groups": 2, "iters": 5}),
    (co.nn.Sparse24Linear, co.Sparse24Config(), {"prune": True}),
    (co.nn.LowRankLinear, co.LowRankConfig(rank=5), {"rank": 5}),
    (co.nn.HashedLinear, co.HashedConfig(compression=0.25, seed=3),
     {"compression": 0.25, "seed": 3})])
def test_from_dense_takes_a_config_or_its_plain_values(module, config, values):
    torch.manual_seed(0)
    lin = nn.Linear(70, 12)
    a = module.from_dense(lin, config)
    b = module.from_dense(lin, **values)
    assert torch.equal(a.dense_weight(), b.dense_weight())
    with pytest.raises(ValueError, match="not both"):
        module.from_dense(lin, config, **values)


def test_from_dense_names_unknown_keywords():
    with pytest.raises(TypeError, match="unknown keyword"):
        co.nn.QuantLinear.from_dense(nn.Linear(32, 4), bitz=4)


def test_registry_names_unknown_configs_and_takes_per_layer_configs_only():
    with pytest.raises(TypeError, match="unknown config"):
        configs.transform_for(object())
    assert configs.transform_for(co.QuantConfig()).handles == (nn.Linear, HFConv1D)
    assert set(configs.per_layer_configs()) == {co.Sparse24Config, co.QuantConfig,
                                                co.CodebookConfig, co.LowRankConfig,
                                                co.TernaryConfig, co.W8A8Config,
                                                co.HashedConfig, co.SharedFilterConfig}
    with pytest.raises(TypeError, match="per-layer"):
        configs.register_transform(co.DWSepFuseConfig, (nn.Conv2d,))
    with pytest.raises(TypeError, match="matches chains of layers"):
        co.Recipe({"a": co.DWSepFuseConfig()})


def test_a_weight_that_cannot_be_compressed_as_asked_raises_from_compress_():
    model = nn.Sequential(nn.Linear(32, 8))  # dense weights are not 2:4
    with pytest.raises(co.UnsupportedWeight, match="not 2:4"):
        co.compress_(model, co.Sparse24Config(prune=False))
    assert type(model[0]) is nn.Linear  # nothing swapped in


@pytest.mark.parametrize(("make", "match"), [
    (lambda: co.QuantConfig(group_size=128.0), "group_size must be one of"),
    (lambda: co.QuantConfig(bits=True), "bits must be one of"),
    (lambda: co.CodebookConfig(iters=2.5), "iters must be an int >= 0"),
    (lambda: co.LowRankConfig(energy=float("nan")), "energy must be a number in"),
    (lambda: co.LowRankConfig(rank=4, method="svd"), "method must be one of")])
def test_config_values_of_the_wrong_kind_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()
