"""SVD / energy table: what the energy rule keeps, and what it costs, on weights we generate.

Three weight distributions (no downloads; everything is built here, seeded):

* ``gaussian`` -- a freshly initialised ``nn.Linear(512, 512)`` weight: a flat spectrum, the
  worst case for low rank;
* ``trained`` -- the hidden layer of an MLP 256-512-512-10 trained (AdamW, decoupled weight
  decay 0.5, 1500 steps) on a 10-class task whose inputs lie near a 24-dimensional subspace
  of R^256 plus noise; weight decay shrinks the random initialisation, so the learned
  low-rank structure dominates the spectrum, as in trained networks;
* ``power-law`` -- a 512 x 512 matrix with singular values ``i**-1`` in random orthogonal bases.

For each and each energy target: the rank the rule keeps, the parameter ratio
``r (N + K) / (N K)``, the relative weight error ``||W - U V||_F / ||W||_F`` (which equals
``sqrt(1 - kept energy)`` for the exact SVD), and, for the trained MLP, test accuracy with its
hidden layer factorized.

    python -m compress_ops.perf.lowrank_energy [--markdown] [--steps 1500]
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

from compress_ops._text import format_table, markdown_table
from compress_ops.factorize import svd_factors
from compress_ops.nn import LowRankLinear

ENERGIES = (0.5, 0.8, 0.9, 0.95, 0.99)


def _task(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    basis = torch.linalg.qr(torch.randn(256, 24, generator=gen))[0]
    centers = torch.randn(10, 24, generator=gen) * 0.8

    def sample(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.randint(0, 10, (count,), generator=gen)
        z = centers[y] + torch.randn(count, 24, generator=gen)
        return z @ basis.t() * 2 + 0.3 * torch.randn(count, 256, generator=gen), y

    return sample(n), sample(2000)


def trained_mlp(steps: int, seed: int = 0) -> tuple[nn.Sequential, tuple, float]:
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    (x, y), test = _task(8192, gen)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.5)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), test, accuracy(model, test)


@torch.no_grad()
def accuracy(model: nn.Module, test: tuple[torch.Tensor, torch.Tensor]) -> float:
    x, y = test
    return (model(x).argmax(-1) == y).float().mean().item() * 100


def power_law(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q1 = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    q2 = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    return (q1 / torch.arange(1, n + 1)) @ q2.t()


def rows(steps: int) -> tuple[list[tuple], float]:
    torch.manual_seed(0)
    model, test, dense_acc = trained_mlp(steps)
    weights = {"gaussian": nn.Linear(512, 512).weight.detach(),
               "trained": model[2].weight.detach(),
               "power-law": power_law(512, 1)}
    out = []
    for name, w in weights.items():
        n, k = w.shape
        for e in ENERGIES:
            f = svd_factors(w, energy=e, method="exact")
            err = ((w - f.u @ f.v).norm() / w.norm()).item()
            acc = "-"
            if name == "trained":
                m2 = nn.Sequential(*model)
                lin = model[2]
                m2[2] = LowRankLinear.from_dense(lin, rank=f.rank)
                acc = f"{accuracy(m2, test):.2f}"
            out.append((name, f"{e:.2f}", str(f.rank), f"{f.rank * (n + k) / (n * k):.3f}",
                        f"{err:.3f}", acc))
    return out, dense_acc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", action="store_true")
    p.add_argument("--steps", type=int, default=1500)
    args = p.parse_args(argv)
    table, dense_acc = rows(args.steps)
    head = ("weights", "energy", "rank", "params vs dense", "rel. weight error",
            "test acc % (hidden layer factorized)")
    print(f"trained MLP: dense test accuracy {dense_acc:.2f}% (2000 held-out samples)")
    print((markdown_table if args.markdown else format_table)(head, table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
