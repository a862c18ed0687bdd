"""Peak memory of compressing a Hugging Face checkpoint while it loads
(``from_pretrained(dir, quantization_config=CompressOpsConfig(recipe=...))``) against loading it
dense and compressing after (``compress_(from_pretrained(dir), recipe)``).

Each way runs in its own process; the figure is the process's peak resident set size (RSS,
``ru_maxrss``) above what it held before loading. A Llama-shaped model with random weights
(hidden 1024, 8 layers, intermediate 4096: 541 MB of fp32 weights) is saved first, in
``--shards`` files.

    python -m compress_ops.perf.load_memory [--shards 10] [--no-mmap]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import textwrap

_PRELUDE = """
import resource, sys, torch
from compress_ops.perf.compat import import_torchvision
import_torchvision()
import transformers
import compress_ops as co
"""

_MAKE = _PRELUDE + """
torch.manual_seed(0)
cfg = transformers.LlamaConfig(vocab_size=1024, hidden_size=1024, num_hidden_layers=8,
    num_attention_heads=8, num_key_value_heads=8, intermediate_size=4096,
    tie_word_embeddings=True)
size = sum(p.numel() * 4 for p in transformers.LlamaForCausalLM(cfg).parameters())
shard = size // int(sys.argv[2]) + 1
transformers.LlamaForCausalLM(cfg).save_pretrained(sys.argv[1], max_shard_size=shard)
"""

_LOAD = _PRELUDE + """
from compress_ops.integrations.hf import CompressOpsConfig
path, mode, mmap = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cfg = co.QuantConfig(bits=4, group_size=128)
kw = {} if mmap else {"disable_mmap": True}
if mode == "after":
    m = co.compress_(transformers.LlamaForCausalLM.from_pretrained(path, **kw), cfg)
else:
    m = transformers.LlamaForCausalLM.from_pretrained(
        path, quantization_config=CompressOpsConfig(recipe=cfg), **kw)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rep = [r for r in co.report(m) if r.compressible]  # the linears (not embeddings, norms)
stored, dense = sum(r.stored_bytes for r in rep), sum(r.dense_bytes for r in rep)
print(f"{(peak - base) / 1024:.0f} {stored / 1e6:.1f} {dense / 1e6:.1f}")
"""


def _run(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"the child process failed:\n{out.stderr[-3000:]}")
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--no-mmap", action="store_true")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        _run(_MAKE, d, str(args.shards))
        print(f"| load (int4 g128, {args.shards} shards, mmap {not args.no_mmap}) | peak RSS "
              f"above start, MiB | linears stored MB | linears dense MB |\n|---|---|---|---|")
        for mode in ("after", "stream"):
            rss, stored, dense = _run(_LOAD, d, mode, "0" if args.no_mmap else "1").split()
            label = "dense, then compress_" if mode == "after" else "compressed while loading"
            print(f"| {label} | {rss} | {stored} | {dense} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
