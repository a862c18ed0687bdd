"""The sequential calibration pipeline (``compress_(..., calib=)``): each block of a model's
stack calibrated on the outputs of the already-compressed blocks before it, checked against
compressing the model one block at a time by hand; the chain check and its fallback; Hugging
Face models built from configs."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops.calibrate import find_blocks, sequential_build

GPTQ = co.QuantConfig(bits=3, group_size=32, method="gptq")


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        h = self.down(F.gelu(self.up(self.norm(x))))
        return x + (h if scale is None else h * scale)


class Stack(nn.Module):
    """An input projection, a stack of residual blocks (given a keyword argument each), and
    a head: the shape of a transformer."""

    def __init__(self, n: int = 3, d: int = 64, order: str = "forward") -> None:
        super().__init__()
        self.inp = nn.Linear(40, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 24)
        self.order = order
        if order == "between":
            self.mid = nn.Linear(d, d)  # a layer run between two blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        scale = torch.full((h.shape[-1],), 0.5)
        blocks = list(self.blocks)[::-1] if self.order == "reverse" else list(self.blocks)
        for b in blocks:
            h = b(h, scale=scale)
            if self.order == "between":
                h = h + 0.1 * self.mid(h)
        return self.head(h)


def data(seed: int = 0, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(40, 40, generator=g) * 0.3
    return [torch.randn(2, 12, 40, generator=g) @ mix + torch.randn(2, 12, 40, generator=g)
            for _ in range(n)]


def model(**kw) -> nn.Module:
    torch.manual_seed(0)
    return Stack(**kw).eval()


def by_hand(m: nn.Module, calib: list, prefixes: list[str], config=GPTQ) -> nn.Module:
    """Compress ``m`` one group of layers at a time, each calibrated on the current (partly
    compressed) model: what the pipeline must equal."""
    for p in prefixes:
        co.compress_(m, co.Recipe({p: config}), calib=calib, sequential=False)
    return m


@torch.no_grad()
def test_block_by_block_equals_compressing_one_block_at_a_time_by_hand():
    calib = data()
    seq = co.compress_(model(), GPTQ, calib=calib)
    ref = by_hand(model(), calib, ["inp"] + [f"blocks[.]{i}[.].*" for i in range(3)] + ["head"])
    flat = co.compress_(model(), GPTQ, calib=calib, sequential=False)
    x = data(seed=9, n=1)[0]
    torch.testing.assert_close(seq(x), ref(x), rtol=1e-5, atol=1e-5)
    for name in ("inp", "blocks.1.up", "blocks.2.down", "head"):
        a, b = seq.get_submodule(name), ref.get_submodule(name)
        assert type(a).__name__ == "QuantLinear"
        assert (a.qweight == b.qweight).float().mean() > 0.995, name
    # calibrated on the compressed model's inputs, the later layers differ from the
    # layer-by-layer-from-dense result
    assert not torch.equal(seq.blocks[2].down.qweight, flat.blocks[2].down.qweight)
    assert torch.equal(seq.inp.qweight, flat.inp.qweight)  # (nothing before it)


@torch.no_grad()
def test_one_block_is_the_direct_result_and_the_dense_model_is_untouched():
    calib = data()
    one = model(n=1)
    dense = copy.deepcopy(one)
    layers = {"blocks.0.up": one.blocks[0].up, "blocks.0.down": one.blocks[0].down}
    seen = []

    def build(name, module, h):
        seen.append(name)
        return nn.Identity() if name.endswith("up") else ValueError("kept dense")

    out = sequential_build(one, layers, calib, None, build)
    assert seen == ["blocks.0.up", "blocks.0.down"]
    assert isinstance(out["blocks.0.down"], ValueError)
    for (n, p), q in zip(one.state_dict().items(), dense.state_dict().values(), strict=True):
        assert torch.equal(p, q), n
    assert not one.blocks[0].up._forward_hooks and not one._forward_pre_hooks
    a = co.compress_(model(n=1), GPTQ, calib=calib)
    b = co.compress_(model(n=1), GPTQ, calib=calib, sequential=False)
    for name in ("inp", "blocks.0.up", "blocks.0.down", "head"):
        assert torch.equal(a.get_submodule(name).qweight, b.get_submodule(name).qweight)


def test_find_blocks():
    m = model()
    layers = {n: x for n, x in m.named_modules() if isinstance(x, nn.Linear)}
    chain = find_blocks(m, layers)
    assert chain.container == "blocks" and chain.blocks == list(m.blocks)
    seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    chain = find_blocks(seq, {"0": seq[0], "2": seq[2]})
    assert chain.container == "" and len(chain.blocks) == 3
    assert find_blocks(nn.Linear(4, 4), {"": nn.Linear(4, 4)}) is None


@pytest.mark.parametrize("order,why", [("reverse", "order"), ("between", "between")])
def test_a_stack_that_is_not_a_chain_falls_back_with_a_warning(order, why):
    calib = data()
    with pytest.warns(UserWarning, match=f"layer by layer.*{why}"):
        a = co.compress_(model(order=order), GPTQ, calib=calib)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = co.compress_(model(order=order), GPTQ, calib=calib, sequential=False)
    for name in ("blocks.0.up", "head"):
        assert torch.equal(a.get_submodule(name).qweight, b.get_submodule(name).qweight)


class CacheLike:
    def update(self, *a):  # a key/value cache every block call appends to
        return a


class Stateful(Stack):
    def forward(self, x):
        h, cache = self.inp(x), CacheLike()
        for b in self.blocks:
            h = b(h, scale=torch.ones(()) if cache else None)
            b.cache = cache
        return self.head(h)


def test_a_stateful_block_argument_falls_back():
    class WithCache(Block):
        def forward(self, x, cache=None):
            return super().forward(x)

    m = model()
    m.blocks = nn.ModuleList(WithCache(64) for _ in range(3))

    def fwd(mm, x):
        h, cache = mm.inp(x), CacheLike()
        for b in mm.blocks:
            h = b(h, cache=cache)
        return mm.head(h)

    with pytest.warns(UserWarning, match="CacheLike"):
        co.compress_(m, GPTQ, calib=data(), forward=fwd)
    assert type(m.blocks[2].down).__name__ == "QuantLinear"


def test_progress_bar_and_errors(capsys):
    co.compress_(model(), GPTQ, calib=data(n=2), progress=True)
    assert "calibrating blocks" in capsys.readouterr().err
    co.compress_(model(), GPTQ, calib=data(n=2), progress=False)
    assert "calibrating" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least one batch"):
        co.compress_(model(), GPTQ, calib=[])
    bad = data(n=2)
    bad[1][0, 0, 0] = float("nan")
    m = model()
    with pytest.raises(ValueError, match="NaN or Inf"):
        co.compress_(m, GPTQ, calib=bad)
    assert isinstance(m.blocks[0].up, nn.Linear) and not m.blocks[0].up._forward_hooks
    gen = (b for b in data(n=2))  # a generator is read once
    assert type(co.compress_(model(), GPTQ, calib=gen).head).__name__ == "QuantLinear"


@torch.no_grad()
def test_mixed_recipe_builds_uncalibrated_layers_in_their_block():
    """A Recipe of calibrated (GPTQ) and data-free (2:4 magnitude) layers: the data-free ones
    are built in the walk too, so each GPTQ layer is calibrated on the model with every
    earlier layer compressed, 2:4 ones included: equal to doing it by hand, in order."""
    calib = data()
    two4 = co.Sparse24Config()
    rec = co.Recipe({"blocks[.].*[.]up": GPTQ, "blocks[.].*[.]down": two4, "head": None})
    m = co.compress_(model(), rec, calib=calib)
    assert type(m.blocks[1].up).__name__ == "QuantLinear"
    assert type(m.blocks[1].down).__name__ == "Sparse24Linear"
    assert isinstance(m.head, nn.Linear) and isinstance(m.inp, nn.Linear)
    ref = model()
    for i in range(3):
        by_hand(ref, calib, [f"blocks[.]{i}[.]up"])
        co.compress_(ref, co.Recipe({f"blocks[.]{i}[.]down": two4}))
    x = data(seed=9, n=1)[0]
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(m.blocks[2].up.qweight, ref.blocks[2].up.qweight)
    # not what calibrating on the dense down projections gives (the old order)
    old = model()
    by_hand(old, calib, ["blocks[.].*[.]up"])
    co.compress_(old, co.Recipe({"blocks[.].*[.]down": two4}))
    assert not torch.equal(m.blocks[2].up.qweight, old.blocks[2].up.qweight)
    # a shared codebook is fitted over all its layers: after the walk, as before
    shared = co.Recipe({"blocks[.].*[.]up": GPTQ,
                        "blocks[.].*[.]down": co.CodebookConfig(bits=3, shared=True)})
    s = co.compress_(model(), shared, calib=calib)
    assert s.blocks[0].down.codebook is s.blocks[2].down.codebook


# -- Hugging Face models built from configs --------------------------------------------------


def _llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=96, bos_token_id=0, eos_token_id=0,
                                   pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, intermediate_size=96,
                                  max_position_embeddings=32)
    return transformers.BertModel(cfg).eval()


@pytest.mark.parametrize("make,stack", [(_llama, "model.layers"), (_bert, "encoder.layer")])
@torch.no_grad()
def test_hugging_face_models_run_block_by_block(make, stack):
    g = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(1, 96, (2, 10), generator=g),
              "attention_mask": torch.ones(2, 10, dtype=torch.long)} for _ in range(3)]
    calib[0]["attention_mask"][1, 7:] = 0  # padding
    dense = make()
    use_cache = getattr(dense.config, "use_cache", None)
    layers = {n: x for n, x in dense.named_modules() if isinstance(x, nn.Linear)
              and n.startswith(stack)}
    assert find_blocks(dense, layers).container == stack
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback
        seq = co.compress_(make(), co.Recipe({f"{stack}[.].*": GPTQ}), calib=calib)
    assert seq.config.use_cache == use_cache
    n = len(getattr(dense, "model", dense).layers if stack == "model.layers" else
            dense.encoder.layer)
    ref = by_hand(make(), calib, [f"{stack}[.]{i}[.].*" for i in range(n)])
    x = {"input_ids": torch.randint(1, 96, (1, 10), generator=g)}
    out = [m(**x)[0] for m in (seq, ref, dense)]
    torch.testing.assert_close(out[0], out[1], rtol=1e-4, atol=1e-4)
    assert not torch.equal(out[0], out[2])


@torch.no_grad()
def test_one_shot_pruning_runs_block_by_block_too():
    calib = data()
    seq, flat = model(), model()
    co.prune.prune_one_shot_(seq, 0.5, calib=calib, block_size=16)
    co.prune.prune_one_shot_(flat, 0.5, calib=calib, block_size=16, sequential=False)
    assert torch.equal(seq.inp.weight, flat.inp.weight)  # (nothing before it)
    assert not torch.equal(seq.blocks[2].down.weight, flat.blocks[2].down.weight)
    assert float((seq.blocks[2].down.weight == 0).float().mean()) == 0.5
