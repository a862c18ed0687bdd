"""Accuracy evidence on real data: every compression family of compress_ops on scikit-learn's
``load_digits`` (1,797 real 8x8 handwritten digits, shipped inside the package; no download).

A small MLP (64-256-256-10) and a small CNN (conv 32 - conv 64 - pool - fc 128 - fc 10, with
BatchNorm) are trained on a fixed stratified 70/30 split; every row reports held-out accuracy
and the stored weight bytes of the compressed model relative to the dense one (every
Linear/Conv2d weight counted; biases and BatchNorm excluded), and the fraction of weights that
are nonzero (what unstructured pruning changes: it keeps the dense storage). Rows:

* dense;
* 2:4 one-shot (magnitude, :class:`~compress_ops.Sparse24Config`) and after retraining
  (:class:`~compress_ops.prune.Pruner` ``pattern="2:4"`` with ASP-style input permutations,
  retrained with distillation from the dense model, finalized to ``Sparse24Linear``);
* unstructured 50% / 90% (gradual cubic schedule over retraining, magnitude);
* structured 50% / 90% of channels / neurons (gradual schedule, then the masked channels are
  removed: a physically smaller dense model);
* int4 / int2 / ternary / binary / 2-bit codebook PTQ, and QAT (fake-quant with a
  straight-through estimator, then finalized to the packed modules; ternary and binary
  recompute their absmean scale every step);
* low-rank (SVD / Tucker-2 at 90% energy) one-shot and after retraining the factors;
* a half-width student trained on the labels alone vs distilled from the dense model (mean over
  ``--seeds`` seeds, same initialisations, batches and steps), on the training batches and on
  randomly shifted digits (one-pixel shifts: the teacher's soft labels on images it has not
  seen are where distillation carries more than the labels);
* the automatic plan (:func:`compress_ops.plan`) at budgets 0.5 and 0.25, one-shot;
* ``share``: weight sharing carried out BEFORE training (the comparison of HashedNets, Chen et
  al. 2015), a table of its own (:func:`share_rows`): every model trained from scratch on the
  labels for ``--share-steps`` steps (default 500: fewer than ``--steps``, for time), mean and
  std of the held-out accuracy over ``--seeds`` seeds (initialisation and hash seed), the
  weights stored (every Linear/Conv2d weight counted once, hashed layers as their buckets,
  shared-filter convs as bank + per-channel scales; the "params" column adds biases and
  BatchNorm, each tied tensor once) and the training wall time per seed. MLP: hashed at 1/8
  and 1/64 (every layer, :class:`~compress_ops.HashedConfig` ``init="random"``) against the
  dense 64-256-256-10 and a narrower dense 64-h-h-10 of the same weight count; an ALBERT-style
  deep residual MLP 64-256-[256x256]x10-10 untied, with its 10 hidden layers tied
  (:func:`compress_ops.share.tie_`: 1/8) and tied + hashed at 1/8 (1/64), each against the
  dense 64-h-h-10 of the same count. CNN: hashed fc layers + shared-filter convs
  (:class:`~compress_ops.nn.shared_conv.SharedFilterConv2d`) at 1/8 and 1/64 against a
  narrower dense CNN of about the same count. The section trains single-threaded (restored
  after), the hashed layers through the package's op (its CPU path keeps the virtual index
  between calls: ``COMPRESS_OPS_HASH_CACHE_MB``); a model listed in two groups
  (the equal-count dense MLPs of the deep group) is trained once. About 3 minutes.

Retraining uses :func:`compress_ops.distill.fit` (AdamW, ``--retrain`` steps, distillation
from the dense model with T = 4, alpha = 0.5). Wall time on the 2-core CI machine: a few
minutes.

    python -m compress_ops.perf.digits [--markdown] [--models mlp,cnn] [--steps 1500]
                                       [--retrain 600] [--sections quant,...]
                                       [--share-steps 500]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import compress_ops as co
from compress_ops import distill, prune, qat
from compress_ops._text import format_table, markdown_table
from compress_ops.nn import LowRankConv2d, LowRankLinear
from compress_ops.nn.base import CompressedLinear

BATCH = 64
#: The row groups of the table (``--sections``), in order.
SECTIONS = ("sparse", "quant", "lowrank", "distill", "plan", "share")


def load(seed: int = 0) -> tuple[torch.Tensor, ...]:
    """``(x_train, y_train, x_test, y_test)``: pixels scaled to [0, 1], a stratified 70/30
    split (fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(d.data / 16.0, d.target, test_size=0.3,
                                              stratify=d.target, random_state=seed)
    f = torch.float32
    return (torch.tensor(x_tr, dtype=f), torch.tensor(y_tr), torch.tensor(x_te, dtype=f),
            torch.tensor(y_te))


class MLP(nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 16, 4 * width)
        self.head = nn.Linear(4 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], 1, 8, 8)
        x = self.pool(F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))))
        return self.head(F.relu(self.fc1(torch.flatten(x, 1))))


MODELS: dict[str, Callable[[int], nn.Module]] = {
    "mlp": lambda scale: MLP(256 // scale),
    "cnn": lambda scale: CNN(32 // scale),
}


def batches(x: torch.Tensor, y: torch.Tensor, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """One epoch of shuffled mini-batches (``fit`` cycles them)."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    return [(x[order[i:i + BATCH]], y[order[i:i + BATCH]]) for i in range(0, len(x), BATCH)]


def shifted_batches(x: torch.Tensor, y: torch.Tensor, count: int,
                    seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` random mini-batches whose digits are shifted by up to one pixel in each
    direction (zero fill): augmentation, so that a teacher's soft labels carry information the
    hard labels do not (the student sees images the teacher was not trained on)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        idx = torch.randint(0, len(x), (BATCH,), generator=gen)
        padded = F.pad(x[idx].view(-1, 8, 8), (1, 1, 1, 1))
        dy, dx = torch.randint(0, 3, (2, BATCH), generator=gen)
        rows = (dy[:, None] + torch.arange(8))[:, :, None]
        cols = (dx[:, None] + torch.arange(8))[:, None, :]
        imgs = padded[torch.arange(BATCH)[:, None, None], rows, cols]
        out.append((imgs.reshape(BATCH, 64), y[idx]))
    return out


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def weight_bytes(model: nn.Module) -> int:
    """Stored bytes of every weight: compressed modules as stored, dense layers in full."""
    total = 0
    for m in model.modules():
        if isinstance(m, (CompressedLinear, LowRankConv2d)):
            total += m.stored_weight_bytes()
        elif type(m) in (nn.Linear, nn.Conv2d):
            total += m.weight.numel() * m.weight.element_size()
    return total


def nonzero_weights(model: nn.Module) -> int:
    """Nonzero weight values: of the factors for low-rank layers, else of the (dense value of
    the) weight."""
    total = 0
    for m in model.modules():
        if isinstance(m, LowRankLinear):
            total += int(m.u.count_nonzero()) + int(m.v.count_nonzero())
        elif isinstance(m, CompressedLinear):
            total += int(m.dense_weight().count_nonzero())
        elif isinstance(m, LowRankConv2d):
            total += sum(int(p.count_nonzero()) for p in (m.reduce_weight, m.core,
                                                            m.restore_weight))
        elif type(m) in (nn.Linear, nn.Conv2d):
            total += int(m.weight.count_nonzero())
    return total


def train(model: nn.Module, data: list, steps: int, teacher: nn.Module | None = None,
          lr: float = 2e-3, on_step: Callable | None = None) -> nn.Module:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    loss = distill.DistillationLoss(temperature=4.0, alpha=0.5 if teacher is not None else 0.0)
    distill.fit(model, teacher, data, steps, opt, loss, progress=False, on_step=on_step)
    return model.eval()


def run_model(kind: str, args: argparse.Namespace,
              split: tuple) -> list[tuple[str, float, float, float]]:
    x_tr, y_tr, x_te, y_te = split
    data = batches(x_tr, y_tr, seed=1)
    calib = [(x,) for x, _ in data[:4]]
    example = (x_tr[:2],)
    torch.manual_seed(0)
    dense = train(MODELS[kind](1), data, args.steps)
    dense_bytes, dense_nnz = weight_bytes(dense), nonzero_weights(dense)
    rows: list[tuple[str, float, float, float]] = []

    def add(name: str, model: nn.Module) -> None:
        rows.append((name, accuracy(model, x_te, y_te), weight_bytes(model) / dense_bytes,
                     nonzero_weights(model) / dense_nnz))
        print(f"  {kind:4s} {name:32s} {rows[-1][1]:6.2f}%  size {rows[-1][2]:.3f}  "
              f"nonzero {rows[-1][3]:.3f}", file=sys.stderr)

    def copy_dense() -> nn.Module:
        return copy.deepcopy(dense).eval()

    def retrain(model: nn.Module, on_step: Callable | None = None) -> nn.Module:
        torch.manual_seed(1)
        return train(model, data, args.retrain, teacher=dense, lr=5e-4, on_step=on_step)

    add("dense", dense)
    want = set(args.sections.split(","))
    if "sparse" in want:
        add("2:4 one-shot", co.compress_(copy_dense(), co.Sparse24Config()))
        m = copy_dense()
        linears = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
        pruner = prune.Pruner(m, None, pattern="2:4", layers=linears, example_inputs=example,
                              permute=True)
        retrain(m, pruner.step)
        add("2:4 retrained (permuted)", pruner.finalize())
        for s in (0.5, 0.9):
            m = copy_dense()
            pruner = prune.Pruner(m, s, schedule=(0, args.retrain // 2), update_every=10)
            retrain(m, pruner.step)
            add(f"unstructured {s:.0%} retrained", pruner.finalize())
        for s in (0.5, 0.9):
            m = copy_dense()
            pruner = prune.Pruner(m, s, pattern="channel", example_inputs=example,
                                  schedule=(0, args.retrain // 2), update_every=10)
            retrain(m, pruner.step)
            add(f"structured {s:.0%} retrained", pruner.finalize())
    if "quant" in want:
        for label, cfg in (("int4 g32", co.QuantConfig(bits=4, group_size=32)),
                           ("int2 g32", co.QuantConfig(bits=2, group_size=32)),
                           ("ternary (per row)", co.TernaryConfig()),
                           ("ternary g32", co.TernaryConfig(group_size=32)),
                           ("binary (per row)", co.QuantConfig(bits=1, group_size=None)),
                           ("binary g32", co.QuantConfig(bits=1, group_size=32)),
                           ("codebook 2-bit", co.CodebookConfig(bits=2))):
            add(f"{label} PTQ", co.compress_(copy_dense(), cfg))
            m = qat.prepare_qat(copy_dense(), cfg)
            retrain(m)
            add(f"{label} QAT", qat.finalize_qat(m))
    if "lowrank" in want:
        lowrank = co.LowRankConfig(energy=0.9)
        add("low-rank e=0.9 one-shot", co.compress_(copy_dense(), lowrank))
        add("low-rank e=0.9 retrained", retrain(co.compress_(copy_dense(), lowrank)))
    if "distill" in want:
        _students(kind, args, dense, data, x_tr, y_tr, x_te, y_te, dense_bytes, dense_nnz,
                  rows)
    if "plan" in want:
        for budget in (0.5, 0.25):
            recipe = co.plan(copy_dense(), calib, budget, verbose=args.verbose)
            add(f"plan budget {budget}", co.compress_(copy_dense(), recipe))
    return rows


def _students(kind: str, args: argparse.Namespace, dense: nn.Module, data: list,
              x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor,
              dense_bytes: int, dense_nnz: int, rows: list) -> None:
    """The half-width student rows: trained alone vs distilled, mean over seeds."""
    half = MODELS[kind](2)
    size = (weight_bytes(half) / dense_bytes, nonzero_weights(half) / dense_nnz)
    for label, student_data in (("", data),
                                (", shifted", shifted_batches(x_tr, y_tr, args.steps, 2))):
        alone, distilled = [], []
        for seed in range(args.seeds):
            torch.manual_seed(100 + seed)
            student = MODELS[kind](2)
            init = copy.deepcopy(student)
            alone.append(accuracy(train(student, student_data, args.steps), x_te, y_te))
            distilled.append(accuracy(train(init, student_data, args.steps, teacher=dense),
                                      x_te, y_te))
        for name, accs in (("alone", alone), ("distilled", distilled)):
            rows.append((f"half-width student {name} ({args.seeds} seeds{label})",
                         sum(accs) / len(accs), *size))
            print(f"  {kind:4s} {rows[-1][0]:32s} {rows[-1][1]:6.2f}%  per seed "
                  f"{[round(a, 2) for a in accs]}", file=sys.stderr)


class DeepMLP(nn.Module):
    """64-w-[w x w] x layers-10 with residual hidden layers (``h = h + relu(W h + b)``): the
    ALBERT-style stack whose ``hidden`` layers :func:`compress_ops.share.tie_` ties."""

    def __init__(self, layers: int = 10, width: int = 256) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, width)
        self.hidden = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))
        self.head = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        for layer in self.hidden:
            h = h + F.relu(layer(h))
        return self.head(h)


#: hidden layers of the deep MLP of the ``share`` section (tied: ~1/8 of the untied weights)
DEEP_LAYERS = 10


def share_weights(model: nn.Module) -> int:
    """Stored weight values: every Linear/Conv2d weight once (a tied weight once), a hashed
    layer's buckets, a shared-filter conv's bank + per-channel scales (its fixed ``assign``
    index and every bias excluded)."""
    from compress_ops.nn import HashedLinear

    seen: set[int] = set()
    total = 0
    for m in model.modules():
        if isinstance(m, HashedLinear):
            tensors = [m.w]
        elif type(m).__name__ == "SharedFilterConv2d":
            tensors = [m.bank, m.scale]
        elif type(m) in (nn.Linear, nn.Conv2d):
            tensors = [m.weight]
        else:
            continue
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel()
    return total


def all_params(model: nn.Module) -> int:
    """Every trainable value, each tensor once: weights + biases + BatchNorm affine."""
    return sum(p.numel() for p in model.parameters())


def _dense_width(target: int, weights: Callable[[int], int]) -> int:
    """The width whose dense weight count ``weights(width)`` is closest to ``target``."""
    return min(range(1, 513), key=lambda w: abs(weights(w) - target))


def _mlp_weights(h: int) -> int:
    return 64 * h + h * h + 10 * h


def _cnn_weights(w: int) -> int:
    """Weights of ``CNN(w)``: convs 1-w-2w (3x3), fc 32w-4w, head 4w-10."""
    return 9 * w + 18 * w * w + 128 * w * w + 40 * w


def _shared_filter_cnn(model: CNN, fraction: float, seed: int) -> CNN:
    """``model`` with both convs replaced by fresh shared-filter convs: ``F = max(1,
    round(fraction * C_out))`` bank filters (training from scratch)."""
    from compress_ops.nn.shared_conv import SharedFilterConv2d

    for name in ("conv1", "conv2"):
        c = getattr(model, name)
        setattr(model, name, SharedFilterConv2d(
            c.in_channels, c.out_channels, c.kernel_size, max(1, round(fraction * c.out_channels)),
            padding=c.padding, seed=seed))
    return model


def share_rows(kind: str, args: argparse.Namespace, split: tuple) -> list[tuple]:
    """The ``share`` section for ``kind``: rows ``(method, weights, fraction, params, mean acc,
    std acc, train s per seed)``; ``fraction`` is of the group's reference (the first row of
    each group: the dense 64-256-256-10 MLP, the untied deep MLP, the dense CNN). Every model
    is trained from scratch on the labels (``args.share_steps`` steps, ``args.seeds`` seeds);
    a model that appears in two groups is trained once."""
    x_tr, y_tr, x_te, y_te = split
    data = batches(x_tr, y_tr, seed=1)
    fractions = (1 / 8, 1 / 64)
    try:
        import compress_ops.nn.shared_conv  # noqa: F401
        have_sf = True
    except ImportError:
        have_sf = False
        print("  SharedFilterConv2d is not importable: CNN rows hash the fc layers only",
              file=sys.stderr)

    def hashed_config(c: float, seed: int) -> co.HashedConfig:
        return co.HashedConfig(compression=c, init="random", seed=seed)

    builders: dict[str, Callable[[int], nn.Module]] = {}
    groups: list[list[str]] = []
    if kind == "mlp":
        small = {c: _dense_width(round(c * _mlp_weights(256)), _mlp_weights) for c in fractions}

        def dense_name(h: int) -> str:
            return "dense 64-256-256-10" if h == 256 else f"dense 64-{h}-{h}-10 (equal count)"

        deep_tied = _mlp_weights(256)  # the tied deep MLP stores one 256x256 hidden weight
        deep_hashed = round(deep_tied / 8)
        builders["dense 64-256-256-10"] = lambda s: MLP(256)
        group = ["dense 64-256-256-10"]
        for c, label in zip(fractions, ("1/8", "1/64"), strict=True):
            name = f"hashed {label} (every layer)"
            builders[name] = lambda s, c=c: co.compress_(MLP(256), hashed_config(c, s))
            h = small[c]
            builders[dense_name(h)] = lambda s, h=h: MLP(h)
            group += [name, dense_name(h)]
        groups.append(group)
        hidden = [f"hidden.{i}" for i in range(DEEP_LAYERS)]

        def tied(s: int) -> nn.Module:
            m = DeepMLP(DEEP_LAYERS)
            co.share.tie_(m, hidden)
            return m

        deep = f"deep 64-256-[256x256]x{DEEP_LAYERS}-10 untied"
        builders[deep] = lambda s: DeepMLP(DEEP_LAYERS)
        builders[f"deep tied ({DEEP_LAYERS} hidden layers, one weight)"] = tied
        builders["deep tied + hashed 1/8 (every layer)"] = \
            lambda s: co.compress_(tied(s), hashed_config(1 / 8, s))
        h1 = _dense_width(deep_tied, _mlp_weights)
        h2 = _dense_width(deep_hashed, _mlp_weights)
        builders.setdefault(dense_name(h1), lambda s: MLP(h1))
        builders.setdefault(dense_name(h2), lambda s: MLP(h2))
        groups.append([deep, f"deep tied ({DEEP_LAYERS} hidden layers, one weight)",
                       dense_name(h1), "deep tied + hashed 1/8 (every layer)", dense_name(h2)])
    else:
        builders["dense CNN width 32"] = lambda s: CNN(32)
        group = ["dense CNN width 32"]
        for c, label in zip(fractions, ("1/8", "1/64"), strict=True):
            name = f"hashed fc {label}" + (f" + shared-filter convs {label}" if have_sf
                                           else " (dense convs)")

            def build(s: int, c: float = c) -> nn.Module:
                m = co.compress_(CNN(32), hashed_config(c, s))
                return _shared_filter_cnn(m, c, s) if have_sf else m

            w = _dense_width(share_weights(build(0)), _cnn_weights)
            builders[name] = build
            builders[f"dense CNN width {w} (~equal count)"] = lambda s, w=w: CNN(w)
            group += [name, f"dense CNN width {w} (~equal count)"]
        groups.append(group)

    results: dict[str, tuple] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models: on a shared 2-core machine threads cost more
    try:
        for name, build in builders.items():
            results[name] = _train_seeds(kind, name, build, args, data, x_te, y_te)
    finally:
        torch.set_num_threads(threads)
    rows = []
    for group in groups:
        ref = results[group[0]][0]
        for name in group:
            w, p, mean, std, secs = results[name]
            rows.append((name, w, w / ref, p, mean, std, secs))
    return rows


def _train_seeds(kind: str, name: str, build: Callable[[int], nn.Module],
                 args: argparse.Namespace, data: list, x_te: torch.Tensor,
                 y_te: torch.Tensor) -> tuple:
    """``(weights, params, mean acc, std acc, train s per seed)`` of ``build(seed)`` trained
    from scratch for each seed."""
    accs, times = [], []
    for seed in range(args.seeds):
        torch.manual_seed(100 + seed)
        model = build(seed)
        start = time.perf_counter()
        train(model, data, args.share_steps)
        times.append(time.perf_counter() - start)
        accs.append(accuracy(model, x_te, y_te))
    a = torch.tensor(accs)
    out = (share_weights(model), all_params(model), a.mean().item(),
           a.std().item() if len(accs) > 1 else 0.0, sum(times) / len(times))
    print(f"  {kind:4s} {name:44s} {out[2]:6.2f}% +- {out[3]:.2f}  weights {out[0]}  "
          f"{out[4]:.1f} s/seed  per seed {[round(x, 2) for x in accs]}", file=sys.stderr)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--steps", type=int, default=1500, help="dense / student training steps")
    ap.add_argument("--retrain", type=int, default=600, help="retraining steps")
    ap.add_argument("--seeds", type=int, default=3,
                    help="seeds of the student comparison and of the share section")
    ap.add_argument("--share-steps", type=int, default=500,
                    help="training steps of every model of the share section (from scratch)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="print the plans' tables")
    ap.add_argument("--sections", default=",".join(SECTIONS),
                    help=f"comma-separated row groups to run, of {','.join(SECTIONS)}")
    args = ap.parse_args(argv)
    kinds = args.models.split(",")
    unknown = [k for k in kinds if k not in MODELS]
    if unknown:
        ap.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    bad = sorted(set(args.sections.split(",")) - set(SECTIONS))
    if bad:
        ap.error(f"unknown sections {bad}; choose from {list(SECTIONS)}")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    split = load()
    start = time.perf_counter()
    table = markdown_table if args.markdown else format_table
    if set(args.sections.split(",")) - {"share"}:
        results = {k: run_model(k, args, split) for k in kinds}
        names = [r[0] for r in results[kinds[0]]]
        head = ["method"] + [h for k in kinds for h in (f"{k} acc %", f"{k} size",
                                                         f"{k} nonzero")]
        rows = [[name] + [v for k in kinds for v in (f"{results[k][i][1]:.2f}",
                                                     f"{results[k][i][2]:.3f}",
                                                     f"{results[k][i][3]:.3f}")]
                for i, name in enumerate(names)]
        print(table(head, rows))
    if "share" in args.sections.split(","):
        head = ["model", "weight sharing before training", "weights", "fraction", "params",
                f"acc % (mean +- std, {args.seeds} seeds)", "train s / seed"]
        rows = [[k, name, str(w), f"{frac:.4f}", str(p), f"{mean:.2f} +- {std:.2f}",
                 f"{secs:.1f}"]
                for k in kinds for name, w, frac, p, mean, std, secs in share_rows(k, args, split)]
        print(("\n" if set(args.sections.split(",")) - {"share"} else "") + table(head, rows))
    print(f"\n{len(split[2])} held-out digits (1 digit = {100 / len(split[2]):.2f} points); "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
