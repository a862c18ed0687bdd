"""Evidence for ``co.prune.search.evolve``: the evolutionary search against ``co.plan``'s choice
and the uniform candidates at the same byte budget, on real data.

1. digits (``compress_ops.perf.digits``: the MLP and the CNN trained on scikit-learn's
   ``load_digits``, 70/30 split) at 0.15 and 0.25 of the fp32 weight bytes, ``co.plan``'s
   default candidates, 4 training batches (256 digits) as calibration data. Rows: the plan
   (``verify=True``), the search with the default fitness (relative end-to-end output error on
   the calibration data), the search with a user fitness (cross-entropy on the calibration
   digits' labels), and every uniform candidate that fits. Columns: held-out accuracy (541
   digits), the calibration fitness (relative output error), stored / dense fp32 bytes, seconds.
2. all-MiniLM-L6-v2 (``compress_ops.perf.one_shot_bert``: the pip package's checkpoint, the
   standard-library docstring sentences) at 0.20 of the fp16 bytes of its 36 linears (0.10 of
   fp32; 0.15 x fp16 is below int2 g128, the smallest candidate here), RTN int8/4/3/2
   (g128) and int2 g64 candidates; 32 calibration sentences, 128 held out.
   Columns: mean cosine to the dense embeddings on the held-out sentences, the calibration
   fitness, stored / dense fp32 bytes, seconds.

    PYTHONPATH=/work/main .venv/bin/python perf/experiments/2026-12-01-search.py \
        [--out perf/experiments/2026-12-01-search.txt] [--skip-bert]
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops._text import format_table
from compress_ops.perf import digits
from compress_ops.perf.machine import cpu_model, git_sha
from compress_ops.prune.search import evolve


def rel_error(dense: nn.Module, model: nn.Module, calib: list, forward=None) -> float:
    """sum ||f_c - f||^2 / sum ||f||^2 over the calibration batches (the default fitness)."""
    num = den = 0.0
    with torch.no_grad():
        for b in calib:
            f = (forward(dense, b) if forward else dense(b[0])).double()
            fc = (forward(model, b) if forward else model(b[0])).double()
            num += float((fc - f).pow(2).sum())
            den += float(f.pow(2).sum())
    return num / den


def uniform_models(dense: nn.Module, result) -> dict[str, nn.Module]:
    """Every uniform candidate that fit the budget, applied with compress_ (the config of the
    plan's table rows with that label)."""
    out = {}
    for label in result.uniform_fitness:
        cfg = next(r.config for r in result.plan.table if r.candidate == label)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out[label] = co.compress_(copy.deepcopy(dense), cfg)
    return out


def digits_part(kind: str, budgets: list[float], steps: int, population: int,
                generations: int, log: list[str]) -> list[tuple]:
    x_tr, y_tr, x_te, y_te = digits.load()
    data = digits.batches(x_tr, y_tr, seed=1)
    calib = [(x,) for x, _ in data[:4]]
    calib_y = [y for _, y in data[:4]]
    torch.manual_seed(0)
    dense = digits.train(digits.MODELS[kind](1), data, steps)
    dense_bytes = digits.weight_bytes(dense)
    rows = [(kind, "-", "dense", f"{digits.accuracy(dense, x_te, y_te):.2f}", "0", "1.000", "-")]

    def ce(model: nn.Module) -> float:
        return float(sum(F.cross_entropy(model(x), y) for (x,), y in zip(calib, calib_y,
                                                                          strict=True)))

    for budget in budgets:
        t0 = time.perf_counter()
        plan = co.plan(dense, calib, budget, verbose=False)
        t_plan = time.perf_counter() - t0
        res = evolve(dense, calib, budget, plan=plan, population=population,
                     generations=generations, seed=0, verbose=False)
        res_ce = evolve(dense, calib, budget, plan=plan, population=population,
                        generations=generations, seed=0, fitness=ce, verbose=False)
        log.append(f"--- {kind} budget {budget}: search (output error)\n{res}")
        log.append(f"--- {kind} budget {budget}: search (cross-entropy)\n{res_ce}")

        def row(label: str, model: nn.Module, seconds: str, budget: float = budget) -> tuple:
            return (kind, f"{budget:g}", label, f"{digits.accuracy(model, x_te, y_te):.2f}",
                    f"{rel_error(dense, model, calib):.5f}",
                    f"{digits.weight_bytes(model) / dense_bytes:.3f}", seconds)

        rows.append(row(f"co.plan ({plan.chosen})", co.compress_(copy.deepcopy(dense), plan),
                        f"{t_plan:.1f}"))
        rows.append(row(f"search, output error ({res.evaluations} evals)",
                        co.compress_(copy.deepcopy(dense), res),
                        f"+{res.seconds - res.plan_seconds:.1f}"))
        rows.append(row(f"search, calib CE ({res_ce.evaluations} evals)",
                        co.compress_(copy.deepcopy(dense), res_ce),
                        f"+{res_ce.seconds - res_ce.plan_seconds:.1f}"))
        for label, m in uniform_models(dense, res).items():
            rows.append(row(f"uniform {label}", m, "-"))
        print(f"  {kind} {budget}: done", file=sys.stderr, flush=True)
    return rows


def bert_part(budget_fp16: float, n_calib: int, n_held: int, population: int,
              generations: int, log: list[str]) -> tuple[list[tuple], str]:
    from compress_ops.perf import one_shot_bert as ob

    model, tok = ob.load_minilm()
    sentences = ob.corpus()
    calib = ob.tokenize(tok, sentences[:n_calib], 16)
    held = ob.tokenize(tok, sentences[n_calib:n_calib + n_held], 32)
    ref = ob.embed(model, held)
    cands = [co.QuantConfig(bits=b, group_size=128) for b in (8, 4, 3, 2)] \
        + [co.QuantConfig(bits=2, group_size=64)]
    budget = budget_fp16 / 2
    t0 = time.perf_counter()
    plan = co.plan(model, calib, budget, candidates=cands, forward=ob.forward, verbose=False)
    t_plan = time.perf_counter() - t0
    res = evolve(model, calib, budget, plan=plan, forward=ob.forward, population=population,
                 generations=generations, seed=0, verbose=False)
    log.append(f"--- MiniLM budget {budget_fp16} x fp16: search (output error)\n{res}")
    dense_bytes = sum(m.weight.numel() * 4 for m in model.modules() if isinstance(m, nn.Linear))

    def row(label: str, m: nn.Module, seconds: str) -> tuple:
        e = ob.embed(m, held)
        return (label, f"{float((e * ref).sum(-1).mean()):.4f}",
                f"{rel_error(model, m, calib, ob.forward):.5f}",
                f"{sum(r.stored_bytes for r in co.report(m) if r.compressible) / dense_bytes:.4f}",
                seconds)

    rows = [row(f"co.plan ({plan.chosen})", co.compress_(copy.deepcopy(model), plan),
                f"{t_plan:.1f}"),
            row(f"search, output error ({res.evaluations} evals)",
                co.compress_(copy.deepcopy(model), res), f"+{res.seconds - res.plan_seconds:.1f}")]
    for label, m in uniform_models(model, res).items():
        rows.append(row(f"uniform {label}", m, "-"))
    tokens = [int(sum(b["attention_mask"].sum() for b in bs)) for bs in (calib, held)]
    note = (f"all-MiniLM-L6-v2, 36 linears; budget {budget_fp16} x fp16 = {budget} x fp32 of "
            f"the linears' bytes; {n_calib} calibration sentences ({tokens[0]} tokens), "
            f"{n_held} held out ({tokens[1]} tokens); population {population}, generations "
            f"{generations}")
    return rows, note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="perf/experiments/2026-12-01-search.txt")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--budgets", default="0.15,0.25")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--population", type=int, default=16)
    ap.add_argument("--generations", type=int, default=15)
    ap.add_argument("--skip-bert", action="store_true")
    ap.add_argument("--bert-population", type=int, default=12)
    ap.add_argument("--bert-generations", type=int, default=10)
    ap.add_argument("--bert-calib", type=int, default=32)
    ap.add_argument("--bert-heldout", type=int, default=128)
    args = ap.parse_args(argv)
    start = time.perf_counter()
    log: list[str] = []
    out = [f"command: PYTHONPATH=/work/main .venv/bin/python "
           f"perf/experiments/2026-12-01-search.py {' '.join(sys.argv[1:])}".rstrip(),
           f"machine: {cpu_model()}, {torch.get_num_threads()} torch threads (2 cores shared "
           f"with other jobs); python {platform.python_version()}, torch {torch.__version__}; "
           f"git {git_sha()}", ""]
    budgets = [float(b) for b in args.budgets.split(",")]
    rows = []
    for kind in filter(None, args.models.split(",")):
        rows += digits_part(kind, budgets, args.steps, args.population, args.generations, log)
    out.append(f"1. digits: held-out accuracy (541 digits), calibration fitness (relative "
               f"output error on 256 training digits), stored / dense fp32 weight bytes, "
               f"seconds (plan; '+' = the search after it). Search: population "
               f"{args.population}, {args.generations} generations, seed 0.")
    out.append(format_table(("model", "budget", "method", "acc %", "calib rel err",
                             "bytes / fp32", "seconds"), rows))
    if not args.skip_bert:
        brows, note = bert_part(0.20, args.bert_calib, args.bert_heldout, args.bert_population,
                                args.bert_generations, log)
        out += ["", f"2. {note}. Cosine: mean over held-out sentences, vs dense.",
                format_table(("method", "cosine", "calib rel err", "bytes / fp32", "seconds"),
                             brows)]
    out += ["", f"total {time.perf_counter() - start:.0f} s", "", "search details:", *log]
    text = "\n".join(out) + "\n"
    print(text)
    with open(args.out, "w") as fh:
        fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
