"""compress_ops.perf.one_shot_bert's code path without the model package (not installed in CI):
``evaluate`` on a tiny random BertModel with a calibrated config row, a plan row and its
uniform rows (one over budget), and an n/a row; the sentence corpus from the standard
library's docstrings."""

from __future__ import annotations

import pytest
import torch

import compress_ops as co
from compress_ops.perf import one_shot_bert as ob

transformers = pytest.importorskip("transformers")


def _batches(seed: int, n: int = 2) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 64, (4, 8), generator=g)
        mask = torch.ones(4, 8, dtype=torch.long)
        mask[1, 5:] = 0  # padded rows: mean pooling must skip them
        mask[3, 3:] = 0
        out.append(dict(input_ids=ids * mask, token_type_ids=torch.zeros_like(ids),
                        attention_mask=mask))
    return out


def test_evaluate_rows_on_a_tiny_bert():
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=16), add_pooling_layer=False).eval()
    candidates = {"int8 g32 RTN": co.QuantConfig(bits=8, group_size=32),
                  "int4 g32 RTN": co.QuantConfig(bits=4, group_size=32)}
    rows = [ob.config_row("q", "int4 g32 GPTQ",
                          lambda: co.QuantConfig(bits=4, group_size=32, method="gptq")),
            ob.config_row("q", "not built", lambda: co.QuantConfig(method="no-such-method")),
            ob.plan_row("budget", 0.2, candidates)]
    for label, cfg in candidates.items():
        row = ob.config_row("budget", label, lambda c=cfg: c)
        row.budget = 0.2
        rows.append(row)
    res = ob.evaluate(model, _batches(0), _batches(1), rows, log=False)
    by = {(r["section"], r["label"]): r for r in res}
    assert len(res) == 1 + len(rows)
    dense = by["dense", "dense"]
    assert (dense["cosine"], dense["nn_same"], dense["fp32_fraction"]) == (1.0, 1.0, 1.0)
    assert dense["dense_linears"] == 12  # 2 layers x (q, k, v, o, up, down)
    gptq = by["q", "int4 g32 GPTQ"]
    assert gptq["status"] == "ok", gptq["note"]
    assert 0.5 < gptq["cosine"] <= 1.0 + 1e-6 and 0.0 <= gptq["nn_same"] <= 1.0
    assert gptq["dense_linears"] == 0 and gptq["fp32_fraction"] < 0.25
    assert by["q", "not built"]["status"] == "n/a"
    assert by["q", "not built"]["note"].startswith(ob.NA_NOT_BUILT)
    plan = by["budget", "plan"]
    assert plan["status"] == "ok", plan["note"]
    assert plan["fp32_fraction"] <= 0.2 and plan["note"].startswith("chose ")
    assert by["budget", "int8 g32 RTN"]["status"] == "over budget"  # 0.3125 of fp32
    assert by["budget", "int4 g32 RTN"]["status"] == "ok"
    meta = dict(model="tiny", linears=12, linear_params=0, params=0, calib=8, heldout=8,
                python="3", threads=1, seconds=1.0)
    table = ob.render(meta, res).splitlines()
    assert len(table) == 2 + len(res) + 2  # head, rule, rows (n/a included), blank, footnote
    assert "uniform, over budget" in table[-3] and "int8 g32 RTN 0.625" in table[-3]


def test_corpus_is_deterministic_and_clean():
    a = ob.corpus()  # (the order is the files', the trees' and random.Random(0)'s)
    assert len(a) > 1000
    assert len({s.lower() for s in a}) == len(a)
    assert all(6 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith(".") for s in a)
