"""co.save / co.load: one safetensors file; the dense model built again becomes exactly the
saved model (outputs bit for bit, report(), ties, aliases), and every misfit is a named error."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import compress_ops as co
from compress_ops import archs
from compress_ops.integrations import serialization as ser
from tests.compress_ops.models import random_bn

safetensors = pytest.importorskip("safetensors.torch")


class Net(nn.Module):
    """Ragged sizes, a tied embedding / head, a frozen layer and a module under two names."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 72)
        self.fc1 = nn.Linear(72, 136)
        self.fc2 = nn.Linear(136, 72)
        self.fc3 = nn.Linear(72, 72)
        self.alias = self.fc3  # the same module under a second name
        self.head = nn.Linear(72, 50, bias=False)
        self.head.weight = self.emb.weight  # tied

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids)
        h = h + self.fc2(torch.relu(self.fc1(h)))
        return self.head(self.fc3(h))


def build() -> Net:
    torch.manual_seed(0)
    net = Net().eval()
    net.fc2.weight.requires_grad_(False)
    return net


IDS = torch.randint(0, 50, (3, 7), generator=torch.Generator().manual_seed(1))
CONFIGS = [co.QuantConfig(bits=4, group_size=32), co.QuantConfig(bits=3, group_size=None),
           co.Sparse24Config(), co.LowRankConfig(energy=0.7), co.CodebookConfig(bits=4),
           co.CodebookConfig(bits=2, shared=True),
           co.Recipe({"fc1": co.QuantConfig(bits=8, group_size=None), "fc2": None,
                      "fc3": co.LowRankConfig(rank=8)})]


def roundtrip(model: nn.Module, tmp_path, factory=build) -> nn.Module:
    path = tmp_path / "model.safetensors"
    co.save(model, path)
    return co.load(factory, path)


@pytest.mark.parametrize("config", CONFIGS, ids=repr)
def test_roundtrip_is_exact(config, tmp_path):
    model = co.compress_(build(), config)
    with torch.no_grad():
        ref = model(IDS)
    loaded = roundtrip(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), ref)
    assert str(co.report(loaded)) == str(co.report(model))
    for (ka, a), (kb, b) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                strict=True):
        assert ka == kb and a.dtype == b.dtype and torch.equal(a, b)
    assert loaded.head.weight is loaded.emb.weight  # the tie is one Parameter again
    assert loaded.alias is loaded.fc3
    assert not loaded.fc2.weight.requires_grad if isinstance(loaded.fc2, nn.Linear) else True
    man = ser.read_manifest(tmp_path / "model.safetensors")
    assert ser.config_from_json(man["configs"][0]).__class__ is config.__class__
    assert man["configs"][0] == ser.config_to_json(config)


def test_energy_ranks_come_from_the_file_not_the_weights(tmp_path):
    model = co.compress_(build(), co.LowRankConfig(energy=0.7))
    ranks = {model.fc1.rank, model.fc2.rank}
    loaded = roundtrip(model, tmp_path)
    assert {loaded.fc1.rank, loaded.fc2.rank} == ranks


def test_shared_codebook_and_ties_are_stored_once(tmp_path):
    model = co.compress_(build(), co.CodebookConfig(bits=2, shared=True))
    man, tensors = ser.manifest(model)
    assert [k for k in tensors if k.endswith("codebook")] == ["fc1.codebook"]
    assert man["aliases"]["head.weight"] == "emb.weight"
    loaded = roundtrip(model, tmp_path)
    assert loaded.fc1.codebook is loaded.fc2.codebook is loaded.fc3.codebook


def test_fused_mobilenet_roundtrip(tmp_path):
    def mobilenet():
        torch.manual_seed(0)
        return random_bn(archs.mobilenet_v2(num_classes=10, width=0.25)).eval()

    model = co.compress_(mobilenet(), co.DWSepFuseConfig())
    assert any(isinstance(m, co.nn.FusedDWSepConv2d) for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    loaded = roundtrip(model, tmp_path, mobilenet)
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert str(co.report(loaded)) == str(co.report(model))
    fused = [m for m in loaded.modules() if isinstance(m, co.nn.FusedDWSepConv2d)]
    assert all(m.dw_weight.stride()[0] == 1 for m in fused)  # the kernel's tap-major layout


def test_a_dense_model_roundtrips_too(tmp_path):
    model = build()
    loaded = roundtrip(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def _rewrite(path, out, edit_manifest=None, edit_tensors=None):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    man = json.loads(meta[ser.METADATA_KEY])
    if edit_manifest:
        edit_manifest(man)
    if edit_tensors:
        edit_tensors(tensors)
    safetensors.save_file(tensors, str(out), metadata={ser.METADATA_KEY: json.dumps(man)})
    return out


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "model.safetensors"
    co.save(co.compress_(build(), co.QuantConfig(bits=4, group_size=32)), path)
    return path


def test_unknown_format_version(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "v.safetensors",
                   edit_manifest=lambda m: m.update(format_version=99))
    with pytest.raises(co.CheckpointError, match="format_version 99"):
        co.load(build(), bad)


def test_missing_and_unexpected_tensors_are_named(saved, tmp_path):
    bad = _rewrite(saved, tmp_path / "m.safetensors",
                   edit_tensors=lambda t: t.pop("fc1.scales"))
    with pytest.raises(co.CheckpointError, match=r"missing \['fc1.scales'\]"):
        co.load(build(), bad)
    bad = _rewrite(saved, tmp_path / "u.safetensors",
                   edit_tensors=lambda t: t.update(extra=torch.ones(2)))
    with pytest.raises(co.CheckpointError, match=r"unexpected \['extra'\]"):
        co.load(build(), bad)


def test_wrong_shape_is_named(saved, tmp_path):
    def grow(t):
        t["fc1.bias"] = torch.zeros(137)

    bad = _rewrite(saved, tmp_path / "s.safetensors", edit_tensors=grow)
    with pytest.raises(co.CheckpointError, match=r"fc1.bias: the checkpoint holds \(137,\)"):
        co.load(build(), bad)


def test_wrong_dtype_and_bad_format_record_are_named(saved, tmp_path):
    def half(t):
        t["fc1.scales"] = t["fc1.scales"].half()

    bad = _rewrite(saved, tmp_path / "d.safetensors", edit_tensors=half)
    with pytest.raises(co.CheckpointError, match=r"fc1.scales: the checkpoint holds "
                                                 r"torch.float16, the compressed module "
                                                 r"torch.float32"):
        co.load(build(), bad)

    def widen(t):
        t["fc1.zeros"] = t["fc1.zeros"].to(torch.int32)

    bad = _rewrite(saved, tmp_path / "z.safetensors", edit_tensors=widen)
    with pytest.raises(co.CheckpointError, match=r"fc1.zeros: the checkpoint holds torch.int32"):
        co.load(build(), bad)

    def corrupt(t):
        t["fc1._extra_state"] = -t["fc1._extra_state"]

    bad = _rewrite(saved, tmp_path / "e.safetensors", edit_tensors=corrupt)
    with pytest.raises(co.CheckpointError, match="does not fit the model.*QuantLinear"):
        co.load(build(), bad)


def test_a_model_that_does_not_fit_the_manifest(saved):
    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)

    with pytest.raises(co.CheckpointError, match="fc1 has a weight of"):
        co.load(Other(), saved)
    with pytest.raises(co.CheckpointError, match="which the model does not have"):
        co.load(nn.Sequential(), saved)


def test_not_a_compress_ops_file_and_bad_arguments(tmp_path):
    plain = tmp_path / "plain.safetensors"
    safetensors.save_file({"w": torch.ones(2)}, str(plain))
    with pytest.raises(co.CheckpointError, match="no compress_ops manifest"):
        co.load(build(), plain)
    with pytest.raises(TypeError, match="factory"):
        co.load(42, plain)
    with pytest.raises(TypeError, match="nn.Module"):
        co.save(42, plain)


def test_qat_models_are_refused_until_finalized(tmp_path):
    model = co.qat.prepare_qat(build(), co.QuantConfig(bits=4, group_size=32))
    with pytest.raises(co.CheckpointError, match="finalize_qat"):
        co.save(model, tmp_path / "q.safetensors")


def test_structured_pruning_then_compression_roundtrips(tmp_path):
    def convnet():
        torch.manual_seed(0)
        return random_bn(nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(24, 64), nn.ReLU(),
            nn.Linear(64, 10))).eval()

    x = torch.randn(2, 3, 8, 8)
    model = convnet()
    co.structured.prune_channels(model, (x,), sparsity=0.5)
    assert model[0].out_channels == 8 and model[8].out_features == 32
    co.compress_(model, co.QuantConfig(bits=8, group_size=None))
    with torch.no_grad():
        ref = model(x)
    man, _ = ser.manifest(model)
    assert set(man["resized"]) == {"0", "1", "3", "4"}  # 8 and 10 are compressed now
    loaded = roundtrip(model, tmp_path, convnet)
    assert loaded[0].out_channels == 8 and loaded[1].num_features == 8
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    assert str(co.report(loaded)) == str(co.report(model))


def test_a_model_a_pruner_is_still_masking_is_refused_until_finalized(tmp_path):
    """A Pruner's masks are parametrizations (state_dict keys ``parametrizations.weight.*``)
    that co.load would not rebuild: co.save refuses by name; after ``finalize()`` the masks are
    the weights' zeros and the model round-trips."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    pruner = co.prune.Pruner(model, 0.5)
    path = tmp_path / "m.safetensors"
    with pytest.raises(co.CheckpointError, match=r"0 carries parametrizations.*finalize\(\)"):
        co.save(model, path)
    assert not path.exists()
    pruner.finalize()
    co.save(model, path)
    fresh = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    co.load(fresh, path)
    x = torch.randn(4, 16)
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)
    assert float((fresh[0].weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
