"""The layering rules of ARCHITECTURE.md, checked on the source: imports run one way (no cycle,
no edge from a lower layer to a higher one, no private name taken from another module), and the
package imports, compresses and runs on the CPU without Triton."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir mapping)
PACKAGES = {"compress_ops": "compress_ops", "kernels": "compress_ops.kernels",
            "integrations": "compress_ops.integrations", "perf": "compress_ops.perf"}

# Layers, lowest first: a module may import its own layer or lower ones. The first matching
# prefix decides (longest prefixes first within a layer list do not matter: prefixes are
# matched on module-name boundaries and the most specific one wins).
LAYERS: list[tuple[str, ...]] = [
    ("compress_ops._validate", "compress_ops._text"),
    ("compress_ops.kernels.formats", "compress_ops.kernels.tuning"),
    ("compress_ops.kernels",),  # the Triton kernels, their configs and launchers
    ("compress_ops.configs",),
    ("compress_ops.ops", "compress_ops.reference"),
    ("compress_ops.quantize", "compress_ops.factorize", "compress_ops.sparsify",
     "compress_ops.smoothquant"),
    ("compress_ops.nn",),
    ("compress_ops._swap", "compress_ops._linear", "compress_ops.transforms",
     "compress_ops.capture"),
    ("compress_ops.fuse", "compress_ops.share", "compress_ops.structured", "compress_ops.distill",
     "compress_ops.calibrate", "compress_ops.awq"),
    ("compress_ops.api", "compress_ops.prune"),
    ("compress_ops.qat", "compress_ops.planner", "compress_ops.archs",
     "compress_ops.prune.search",  # search-based pruning, seeded from the planner's answer
     "compress_ops.integrations.serialization",  # re-exported as co.save / co.load
     "compress_ops.integrations.hf"),  # installed by import compress_ops
    ("compress_ops", "compress_ops.demo"),  # the package root re-exports the public API
    ("compress_ops.integrations", "compress_ops.perf"),
    ("compress_ops.__main__",),  # the CLI: demo, bench, dashboard
]


def _modules() -> dict[str, Path]:
    """Every project module by dotted name."""
    out = {}
    for folder, package in PACKAGES.items():
        base = ROOT / folder
        if not (base / "__init__.py").is_file():
            continue
        for path in base.rglob("*.py"):
            rel = path.relative_to(base).with_suffix("").parts
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((package, *rel))] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} is in no layer of LAYERS"
    return rank


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """``(target module, imported name or None, line)`` of every import in ``path``, lazy ones
    inside functions included, ``if TYPE_CHECKING:`` blocks excluded."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for t in ast.walk(tree) if _type_checking(t) for n in ast.walk(t)}
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found += [(base, a.name, node.lineno) for a in node.names]
    return found


def _edges() -> list[tuple[str, str, str | None, int]]:
    """Project-internal edges ``(importer, imported module, imported name, line)``."""
    edges = []
    for module, path in MODULES.items():
        for target, name, line in _imports(module, path):
            if name is not None and f"{target}.{name}" in MODULES:
                target = f"{target}.{name}"  # ``from package import submodule``
            while target and target not in MODULES:
                target = target.rpartition(".")[0]  # ``import a.b.c`` names a.b.c
            if target and target != module:
                edges.append((module, target, name, line))
    return edges


def test_the_layer_table_covers_every_module():
    assert len(MODULES) > 30
    for module in MODULES:
        _layer(module)


def test_every_package_is_installed():
    """Every folder with an ``__init__.py`` is in pyproject.toml's ``packages`` (a package left
    out imports from a checkout but is missing from a built wheel)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    packages = {m for m, path in MODULES.items() if path.name == "__init__.py"}
    assert packages <= listed, sorted(packages - listed)


def test_imports_never_go_up_a_layer():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)}), line {line}"
              for a, b, _, line in _edges() if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_imports_have_no_cycle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for a, b, _, _ in _edges():
        graph[a].add(b)
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_private_name_crosses_a_module_boundary():
    """``from x import _name`` only for a private *module* of the importer's own package (e.g.
    ``compress_ops._swap`` inside ``compress_ops``, ``kernels._launch`` inside ``kernels``)."""
    bad = []
    for a, b, name, line in _edges():
        private_module = b.rpartition(".")[2].startswith("_") and not b.endswith("__main__")
        if private_module:
            owner = b.rpartition(".")[0]
            if not (a == owner or a.startswith(owner + ".")):
                bad.append(f"{a}:{line} imports the private module {b}")
        elif name is not None and name.startswith("_") and not name.startswith("__") \
                and f"{b}.{name}" not in MODULES:
            bad.append(f"{a}:{line} imports {b}.{name}")
    assert not bad, "\n".join(bad)


def test_the_package_imports_compresses_and_runs_without_triton():
    """``triton`` blocked in ``sys.modules``: every family compresses and runs on the CPU, and
    matches its dense reference."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch
        import torch.nn.functional as F
        from torch import nn
        import compress_ops as co

        torch.manual_seed(0)
        for cfg in (co.Sparse24Config(), co.QuantConfig(bits=4, group_size=32),
                    co.QuantConfig(bits=8, group_size=None, symmetric=True),
                    co.CodebookConfig(bits=3), co.LowRankConfig(rank=8)):
            model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 16))
            co.compress_(model, cfg)
            x = torch.randn(5, 64)
            ref = F.linear(F.relu(F.linear(x, model[0].dense_weight(), model[0].bias)),
                           model[2].dense_weight(), model[2].bias)
            assert isinstance(model[0], co.nn.CompressedLinear), (cfg, model)
            assert torch.allclose(model(x), ref, atol=1e-5, rtol=1e-4), cfg
        dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8),
                           nn.ReLU6(), nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16)).eval()
        x = torch.randn(2, 8, 10, 10)
        want = dw(x)
        co.compress_(dw, co.DWSepFuseConfig())
        assert isinstance(dw[0], co.nn.FusedDWSepConv2d)
        assert torch.allclose(dw(x), want, atol=1e-5)
        assert "triton" not in {m.split(".")[0] for m, v in sys.modules.items() if v}
        print(co.report(dw))
        print("OK")
    """)
    env = {"PATH": "/usr/bin:/bin", "COMPRESS_OPS_CPU_BACKEND": "reference"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("OK")
