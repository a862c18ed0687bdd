"""End-to-end benchmark: what a whole model gains from each compression, not one kernel.

    python -m compress_ops.perf.bench_e2e [--size tiny|small|1b] [--device auto|cpu|cuda]
        [--out PATH] [--decode-tokens N] [--prompt-tokens P] [--reps R]
        [--configs dense,int4,int8,2:4,lowrank,codebook] [--no-compile | --modes eager,compiled]
        [--parts llama,mobilenet_v2] [--budget-s S] [--size-reason TEXT] [--no-peaks]

Two models, random weights, nothing downloaded:

``llama`` (kernel ``e2e_llama_decode``)
    ``transformers.LlamaForCausalLM`` built from a ``LlamaConfig`` of ``--size`` (:data:`SIZES`:
    ``1b`` is Llama-3.2-1B's shape, ``small`` four layers of width 1024, ``tiny`` a test model)
    in fp16 on CUDA, fp32 on the CPU. Batch-1 greedy decode: ``model.generate`` with a static
    KV cache (``cache_implementation="static"``, ``max_cache_len`` fixed for the run, so every
    call reuses one cache and a compiled step never recompiles), ``do_sample=False`` and
    ``min_new_tokens = max_new_tokens``. Decode time = median time of a generate of ``N + 1``
    new tokens minus the median time of a generate of one (the prefill of the ``P``-token
    prompt and the first token), both medians of ``--reps`` alternating calls: tokens/s =
    ``N / decode time``. One row per config (:data:`CONFIGS`, applied with
    ``compress_ops.compress_``; ``lm_head`` stays dense unless ``--compress-lm-head``, and a
    head tied to the embedding is never compressed) and mode:

    * ``eager`` -- ``generate(..., disable_compile=True)``;
    * ``compiled`` -- transformers' own compiled decode: ``generate`` with a static cache and a
      ``CompileConfig`` compiles the decode step (not the prefill) with ``torch.compile`` of that
      ``mode``: ``reduce-overhead`` (CUDA graphs) on CUDA, ``default`` on the CPU, where
      transformers compiles only when ``CompileConfig._compile_all_devices`` is set (its
      testing hook; CUDA graphs do not exist there). The first call's time, compile included,
      is ``e2e.warmup_s``.

    A static cache is what makes ``reduce-overhead`` work: the cache tensors keep their
    addresses and shapes from step to step (a ``DynamicCache`` grows every step, so every step
    would be a new graph). Both modes use it, so the two differ only in the compile.

``mobilenet_v2`` (kernel ``e2e_mobilenet_v2``)
    :func:`compress_ops.archs.mobilenet_v2` (width 1.0, 1000 classes), eval mode, unfused
    against ``compress_(model, DWSepFuseConfig())`` (every depthwise + project pair one
    ``FusedDWSepConv2d``, BatchNorm folded), eager and ``torch.compile`` (same ``mode``).
    Images/s at batch 32, 224x224, fp16 channels-last on CUDA; fp32 at batch 8 (``tiny``:
    batch 2, 64x64) on the CPU. Timed with :func:`compress_ops.perf.timing.time_fn`.

Every row is a :class:`compress_ops.perf.schema.Row` (``median_us``: microseconds per decoded
token or per batch of images; ``backend``: ``<device>-<mode>``; ``speedup_vs_dense``: against
the ``dense`` / ``unfused`` row of the same model, size and mode; ``max_rel_err``: of the
prompt's logits (all positions) against the dense model, ``max |y - ref| / max |ref|``, or of
the images' logits against the unfused model) plus an ``e2e`` object: model, size, config,
mode, status (``ok`` / ``error`` / ``skipped``, with ``error`` saying why), ``rate`` and
``rate_unit`` (also as ``tokens_per_s`` / ``images_per_s``), ``weight_bytes`` (parameters and
buffers, each tensor once), ``peak_mem_bytes`` (``torch.cuda.max_memory_allocated`` over the
timed calls, the model's own memory included; ``null`` on the CPU, where peak memory is not
measured), ``token_match`` (share of the generated tokens equal to the dense model's eager
ones), compress and warm-up times; decode rows also ``rate_best`` (from the fastest long and
short call: on a shared machine whose load comes and goes, the median can catch a busy spell)
and ``spread`` (slowest / fastest long call). The output checks are sanity numbers: random
weights, and a compression changes the model. A row that fails records its error; the run
goes on.

Order: MobileNetV2 eager, then per Llama config its eager and compiled rows (one model built
and compressed per config), then MobileNetV2 compiled. ``--budget-s``: no row starts after that
many seconds; the rows left are recorded as ``skipped``. The file is rewritten after every row
(``meta.complete`` false until the end), so a run that is killed keeps what it measured.
Without ``transformers`` the Llama part is one ``skipped`` row ("transformers missing") and
MobileNetV2 still runs.

Default output: ``<results dir>/<YYYY-MM-DD>-<device slug>-e2e.json``
(:func:`compress_ops.perf.schema.results_path` with ``-e2e``).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from compress_ops.perf import machine, schema, timing
from compress_ops.perf.compat import import_torchvision
from compress_ops.perf.family import rel_err

LLAMA_KERNEL = "e2e_llama_decode"
MBV2_KERNEL = "e2e_mobilenet_v2"
PARTS = ("llama", "mobilenet_v2")
MODES = ("eager", "compiled")
#: The dense baseline of each model: its ``speedup_vs_dense`` is 1.
BASELINES = {LLAMA_KERNEL: "dense", MBV2_KERNEL: "unfused"}

#: ``LlamaConfig`` fields per ``--size``. ``1b``: Llama-3.2-1B's shape (its RoPE scaling left
#: out: it changes no shape or cost); ``tiny``: the CPU test's model.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                 tie_word_embeddings=False),
    "small": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=4,
                  num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                  tie_word_embeddings=False),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
               tie_word_embeddings=True),
}
_LLAMA_COMMON = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                     eos_token_id=2, pad_token_id=0)

#: ``--configs`` names, in run order (``2:4`` is also accepted for ``sparse24``).
CONFIGS: tuple[str, ...] = ("dense", "int4", "int8", "sparse24", "lowrank", "codebook", "w8a8",
                             "fp8", "ternary", "int2", "hashed")
_ALIASES = {"2:4": "sparse24", "int4-g128": "int4", "int8-row": "int8", "codebook4": "codebook",
            "codebook-4bit": "codebook", "w8a8-int8": "w8a8", "w8a8-fp8": "fp8",
            "int2-g64": "int2", "hashed-1/8": "hashed"}


def make_config(name: str, hidden: int, lowrank_rank: int | None = None) -> tuple[str, Any]:
    """``(row label, compress_ops config or None for dense)`` of a ``--configs`` name.

    int4: ``QuantConfig(bits=4, group_size=128)``; int8: ``QuantConfig(bits=8,
    group_size=None)`` (one scale per row; group sizes are 32, 64, 128, 256 or None);
    ``Sparse24Config()``; ``LowRankConfig(rank=hidden // 4)`` (or ``--lowrank-rank``; a layer
    whose factors would not be smaller stays dense); ``CodebookConfig(bits=4)``; w8a8:
    ``W8A8Config()`` (int8 weights and per-token int8 activations); fp8: ``W8A8Config(
    dtype="fp8")`` (e4m3 weights and activations); ``TernaryConfig()``; int2:
    ``QuantConfig(bits=2, group_size=64)``; hashed: ``HashedConfig(compression=1/8)``.
    """
    import compress_ops as co

    if name == "dense":
        return "dense", None
    if name == "int4":
        return "int4-g128", co.QuantConfig(bits=4, group_size=128)
    if name == "int8":
        return "int8-row", co.QuantConfig(bits=8, group_size=None)
    if name == "sparse24":
        return "2:4", co.Sparse24Config()
    if name == "lowrank":
        r = lowrank_rank or max(1, hidden // 4)
        return f"lowrank-r{r}", co.LowRankConfig(rank=r)
    if name == "codebook":
        return "codebook-4bit", co.CodebookConfig(bits=4)
    if name == "w8a8":
        return "w8a8-int8", co.W8A8Config()
    if name == "fp8":
        return "w8a8-fp8", co.W8A8Config(dtype="fp8")
    if name == "ternary":
        return "ternary", co.TernaryConfig()
    if name == "int2":
        return "int2-g64", co.QuantConfig(bits=2, group_size=64)
    if name == "hashed":
        return "hashed-1/8", co.HashedConfig(compression=0.125)
    raise ValueError(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")


# ---------------------------------------------------------------------------------------------
# Settings, rows, the run
# ---------------------------------------------------------------------------------------------


@dataclass
class Settings:
    """What one run measures (from the command line)."""

    device: torch.device
    size: str = "tiny"
    configs: tuple[str, ...] = CONFIGS
    modes: tuple[str, ...] = MODES
    parts: tuple[str, ...] = PARTS
    prompt_tokens: int = 16
    decode_tokens: int = 32
    reps: int = 5
    compile_mode: str = "default"
    image_batch: int = 32
    image_size: int = 224
    image_seconds: float = 3.0
    budget_s: float | None = None
    compress_lm_head: bool = False
    lowrank_rank: int | None = None
    seed: int = 0

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.device.type == "cuda" else torch.float32


@dataclass
class Run:
    """The rows so far, the file they are written to after every row, and the time budget."""

    settings: Settings
    env: machine.Env
    peaks: schema.Peaks
    out: Path
    argv: list[str]
    meta_e2e: dict[str, Any]
    log: Callable[[str], None] = print
    rows: list[schema.Row] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)
    load_at_start: list[float] | None = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over_budget(self) -> str | None:
        """Why no row may start now (``--budget-s`` spent), else ``None``."""
        b = self.settings.budget_s
        if b is not None and self.elapsed() > b:
            return f"skipped: time budget spent (--budget-s {b:g}; {self.elapsed():.0f} s elapsed)"
        return None

    def add(self, row: schema.Row) -> schema.Row:
        self.rows.append(row)
        fill_speedups(self.rows)
        self.save(complete=False)
        self.log(row_line(row))
        return row

    def save(self, complete: bool, **extra: Any) -> None:
        meta = schema.make_meta(
            self.settings.device, self.env, self.peaks, argv=self.argv, families=["e2e"],
            complete=complete, duration_s=round(self.elapsed(), 1), errors=self.errors,
            load_avg=self.load_at_start, e2e={**self.meta_e2e, **extra})
        schema.write_results(self.out, meta, self.rows)


def make_row(run: Run, *, kernel: str, provider: str, shape: dict[str, int], mode: str,
             e2e: dict[str, Any], median_us: float | None = None, samples: int | None = None,
             note: str | None = None, max_rel_err: float | None = None,
             flops: float | None = None, nbytes: float | None = None) -> schema.Row:
    """One end-to-end row: the schema's fields, derived numbers where the inputs allow
    (``tflops`` from ``flops`` per timed call, ``gbps`` and % of the measured bandwidth from
    ``nbytes`` per timed call), and the ``e2e`` object."""
    s = run.settings
    tflops = gbps = pct = kind = None
    if median_us:
        sec = median_us * 1e-6
        tflops = flops / sec / 1e12 if flops else None
        if nbytes:
            gbps = nbytes / sec / 1e9
            if run.peaks.hbm_gbps:
                pct, kind = 100.0 * gbps / run.peaks.hbm_gbps, "hbm"
    return schema.Row(
        kernel=kernel, provider=provider, shape=dict(shape), dtype=schema.dtype_name(s.dtype),
        median_us=median_us, tflops=tflops, gbps=gbps, pct_peak=pct, peak_kind=kind,
        speedup_vs_dense=None, device=run.env.device, torch=run.env.torch,
        triton=run.env.triton, git_sha=run.env.git_sha, backend=f"{s.device.type}-{mode}",
        samples=samples, note=note, max_rel_err=max_rel_err, e2e=e2e)


def e2e_fields(model: str, size: str, config: str, mode: str, unit: str, **more: Any
               ) -> dict[str, Any]:
    """The ``e2e`` object, ``status`` ``ok`` until :func:`failed` says otherwise."""
    return {"model": model, "size": size, "config": config, "mode": mode, "status": "ok",
            "error": None, "rate": None, "rate_unit": unit, **more}


def failed(e2e: dict[str, Any], why: str, status: str = "error") -> dict[str, Any]:
    """``e2e`` marked as not measured (``status`` error or skipped) with the reason."""
    return {**e2e, "status": status, "error": why, "rate": None}


def error_text(ex: BaseException) -> str:
    return f"error: {type(ex).__name__}: {ex}"[:400]


def fill_speedups(rows: list[schema.Row]) -> None:
    """``speedup_vs_dense`` = dense time / row time, against the baseline row (:data:`BASELINES`)
    of the same kernel, shape, dtype, device and backend (= mode); also ``e2e.speedup_vs_dense``."""
    def key(r: schema.Row) -> tuple:
        return (r.kernel, tuple(sorted(r.shape.items())), r.dtype, r.device, r.backend)

    base = {key(r): r.median_us for r in rows
            if r.provider == BASELINES.get(r.kernel) and r.median_us}
    for r in rows:
        t = base.get(key(r))
        r.speedup_vs_dense = t / r.median_us if (t and r.median_us) else None
        if r.e2e is not None:
            r.e2e["speedup_vs_dense"] = r.speedup_vs_dense


def row_line(r: schema.Row) -> str:
    e = r.e2e or {}
    rate = f"{e['rate']:10.2f} {e.get('rate_unit', '')}" if e.get("rate") else \
        f"{'-':>10} {e.get('rate_unit', '')}"
    sp = f"x{r.speedup_vs_dense:.2f}" if r.speedup_vs_dense else "-"
    err = f"err {r.max_rel_err:.2g}" if r.max_rel_err is not None else ""
    why = f" [{e.get('status')}: {e.get('error')}]" if e.get("status") != "ok" else ""
    return (f"  {e.get('model', r.kernel)} {e.get('size', '')} {r.provider:<14} "
            f"{e.get('mode', ''):<8} {rate} {sp:>7} {err}{why}")


# ---------------------------------------------------------------------------------------------
# Helpers: memory, timing, imports
# ---------------------------------------------------------------------------------------------


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class DecodeTiming:
    """Medians of the long (``N + 1`` new tokens) and short (one new token) generate calls."""

    long_s: float
    short_s: float
    samples: int
    best_decode_s: float  # min(long) - min(short): what the machine gave at its quietest
    spread: float  # max / min of the long calls: how noisy the machine was

    @property
    def decode_s(self) -> float:
        return self.long_s - self.short_s


def time_decode(gen: Callable[[int], object], n: int, reps: int, device: torch.device
                ) -> DecodeTiming:
    """``reps`` alternating calls of ``gen(n + 1)`` and ``gen(1)``, each synchronized.

    Not :func:`~compress_ops.perf.timing.time_fn`: a generate call takes up to seconds, and
    ``time_fn`` takes at least 10 samples on the CPU and 50 (``do_bench``) on CUDA.
    """
    long_t, short_t = [], []
    for _ in range(reps):
        for n_new, acc in ((n + 1, long_t), (1, short_t)):
            _sync(device)
            t0 = time.perf_counter()
            gen(n_new)
            _sync(device)
            acc.append(time.perf_counter() - t0)
    return DecodeTiming(statistics.median(long_t), statistics.median(short_t), reps,
                        min(long_t) - min(short_t), max(long_t) / min(long_t))


def import_transformers() -> tuple[Any, str]:
    """``(transformers module or None, what happened)``: ``"transformers missing (...)"`` when it
    is not installed, ``"transformers import failed: ..."`` when it does not import."""
    try:
        import transformers
    except ImportError as exc:
        return None, f"transformers missing ({exc})"
    try:
        patched = import_torchvision()
        from transformers import LlamaConfig, LlamaForCausalLM  # noqa: F401  (lazy modules)
    except Exception as exc:  # noqa: BLE001 - any failure: the Llama part is skipped
        return None, f"transformers import failed: {type(exc).__name__}: {exc}"[:300]
    transformers.logging.set_verbosity_error()
    note = " (torchvision's compiled ops missing: their schemas defined)" if patched else ""
    return transformers, f"transformers {transformers.__version__}{note}"


# ---------------------------------------------------------------------------------------------
# Llama decode
# ---------------------------------------------------------------------------------------------


def llama_config(transformers: Any, size: str) -> Any:
    """The ``LlamaConfig`` of ``--size``."""
    return transformers.LlamaConfig(**{**_LLAMA_COMMON, **SIZES[size]})


def build_llama(transformers: Any, config: Any, s: Settings) -> nn.Module:
    """A ``LlamaForCausalLM`` with random weights (seed ``s.seed``: every call builds the same
    weights), created on the device, in ``s.dtype``, eval mode."""
    torch.manual_seed(s.seed)
    with torch.device(s.device):
        model = transformers.LlamaForCausalLM(config)
    return model.to(s.dtype).eval()


def _linear_macs(model: nn.Module) -> int:
    """Multiply-adds per token of the model's linear layers (dense equivalent)."""
    return sum(m.in_features * m.out_features for m in model.modules()
               if isinstance(m, nn.Linear))


@dataclass
class Reference:
    """The dense model's eager results: prompt logits and greedy tokens."""

    logits: torch.Tensor
    tokens: torch.Tensor


def _compile_config(transformers: Any, s: Settings) -> Any:
    cc = transformers.CompileConfig(mode=s.compile_mode)
    if s.device.type != "cuda":
        cc._compile_all_devices = True  # transformers compiles on the CPU only when asked
    return cc


def _generator(transformers: Any, model: nn.Module, ids: torch.Tensor, s: Settings,
               compiled: bool) -> Callable[..., Any]:
    mask = torch.ones_like(ids)
    cc = _compile_config(transformers, s) if compiled else None
    # one cache for the long and the short call (an older transformers without max_cache_len
    # reuses the cache of the first, long, call for shorter ones)
    fixed = {"max_cache_len": s.prompt_tokens + s.decode_tokens + 1} \
        if hasattr(transformers.GenerationConfig(), "max_cache_len") else {}

    def gen(n: int, **kw: Any) -> Any:
        with torch.no_grad():
            return model.generate(
                ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                cache_implementation="static", disable_compile=not compiled,
                compile_config=cc, pad_token_id=0, **fixed, **kw)

    return gen


def compress_llama(model: nn.Module, cfg: Any, s: Settings) -> nn.Module:
    """``compress_(model, cfg)``, ``lm_head`` kept dense unless ``--compress-lm-head``."""
    import compress_ops as co

    keep = None if s.compress_lm_head else (lambda module, name: name != "lm_head")
    return co.compress_(model, cfg, filter_fn=keep)


def llama_rows(run: Run, transformers: Any, why_missing: str) -> Iterator[schema.Row]:
    """The Llama rows: per config, its eager and compiled rows (see the module docstring)."""
    s = run.settings
    cfg_llama = None if transformers is None else llama_config(transformers, s.size)
    hidden = SIZES[s.size]["hidden_size"]
    shape = {"batch": 1, "prompt": s.prompt_tokens, "new_tokens": s.decode_tokens,
             "hidden": hidden, "layers": SIZES[s.size]["num_hidden_layers"],
             "vocab": SIZES[s.size]["vocab_size"]}
    common = dict(kernel=LLAMA_KERNEL, shape=shape)
    if transformers is None:
        e2e = e2e_fields("llama", s.size, "all", ",".join(s.modes), "tokens/s")
        yield make_row(run, provider="all", mode="all", note=why_missing,
                       e2e=failed(e2e, why_missing, "skipped"), **common)
        return

    g = torch.Generator().manual_seed(s.seed + 1)
    ids = torch.randint(3, SIZES[s.size]["vocab_size"], (1, s.prompt_tokens), generator=g)
    ids = ids.to(s.device)
    ref: Reference | None = None
    macs: int | None = None
    for name in s.configs:
        try:
            label, cfg = make_config(name, hidden, s.lowrank_rank)
        except ValueError as ex:
            label, cfg = name, ex
        rows_e2e = {mode: e2e_fields("llama", s.size, label, mode, "tokens/s",
                                     config_repr=repr(cfg) if cfg is not None else "dense",
                                     compile_mode=s.compile_mode if mode == "compiled" else None,
                                     prompt_tokens=s.prompt_tokens,
                                     decode_tokens=s.decode_tokens)
                    for mode in s.modes}
        skip = run.over_budget()
        if skip or isinstance(cfg, Exception):
            why = skip or error_text(cfg)
            for mode in s.modes:
                yield make_row(run, provider=label, mode=mode, note=why,
                               e2e=failed(rows_e2e[mode], why, "skipped" if skip else "error"),
                               **common)
            continue
        model = None
        try:
            model = build_llama(transformers, cfg_llama, s)  # the same weights every time
            if ref is None:  # the dense model's eager results, from the first model built
                macs = _linear_macs(model)
                with torch.no_grad():
                    logits = model(ids).logits[0].float()
                tokens = _generator(transformers, model, ids, s, False)(s.decode_tokens + 1)
                ref = Reference(logits, tokens[0, s.prompt_tokens:].clone())
            t0 = time.perf_counter()
            if cfg is not None:
                model = compress_llama(model, cfg, s)
            compress_s = time.perf_counter() - t0
            with torch.no_grad():
                err = rel_err(model(ids).logits[0].float(), ref.logits)
            wbytes = weight_bytes(model)
            untied_embed = 0 if cfg_llama.tie_word_embeddings else \
                model.get_input_embeddings().weight.nbytes
            shared = dict(compress_s=round(compress_s, 3), weight_bytes=wbytes,
                          **_report_bytes(model))
        except Exception as ex:  # noqa: BLE001 - record and go on with the next config
            traceback.print_exc()
            why = error_text(ex)
            run.errors.append(f"llama {label}: {why}")
            for mode in s.modes:
                yield make_row(run, provider=label, mode=mode, note=why,
                               e2e=failed(rows_e2e[mode], why), **common)
            del model
            _free(s.device)
            continue
        for mode in s.modes:
            e2e = {**rows_e2e[mode], **shared}
            skip = run.over_budget()
            if skip:
                yield make_row(run, provider=label, mode=mode, note=skip, max_rel_err=err,
                               e2e=failed(e2e, skip, "skipped"), **common)
                continue
            try:
                yield _decode_row(run, transformers, model, ids, ref, mode, e2e, err,
                                  flops=2.0 * (macs or 0), nbytes=wbytes - untied_embed,
                                  **common)
            except Exception as ex:  # noqa: BLE001
                traceback.print_exc()
                why = error_text(ex)
                run.errors.append(f"llama {label} {mode}: {why}")
                yield make_row(run, provider=label, mode=mode, note=why, max_rel_err=err,
                               e2e=failed(e2e, why), **common)
            if mode == "compiled":
                torch._dynamo.reset()
        del model
        _free(s.device)


def _report_bytes(model: nn.Module) -> dict[str, Any]:
    """Dense and stored bytes of the linear weights (``compress_ops.report``) and how many
    linear layers stayed dense."""
    import compress_ops as co

    rep = co.report(model)
    layers = [r for r in rep if r.compressible]  # (not embeddings and norms)
    return {"linear_dense_bytes": sum(r.dense_bytes for r in layers),
            "linear_stored_bytes": sum(r.stored_bytes for r in layers),
            "dense_linears": sum(r.kind == "dense" for r in layers),
            "compressed_linears": sum(r.kind != "dense" for r in layers),
            "model_dense_bytes": rep.dense_bytes, "model_stored_bytes": rep.stored_bytes}


def _decode_row(run: Run, transformers: Any, model: nn.Module, ids: torch.Tensor,
                ref: Reference, mode: str, e2e: dict[str, Any], err: float, *, flops: float,
                nbytes: float, kernel: str, shape: dict[str, int]) -> schema.Row:
    s = run.settings
    n = s.decode_tokens
    gen = _generator(transformers, model, ids, s, mode == "compiled")
    t0 = time.perf_counter()
    out = gen(n + 1)  # compiles in the compiled mode
    _sync(s.device)
    warmup_s = time.perf_counter() - t0
    gen(n + 1)  # CUDA graphs are recorded on the first calls after the compile
    gen(1)
    tokens = out[0, s.prompt_tokens:]
    match = float((tokens == ref.tokens).float().mean()) if tokens.shape == ref.tokens.shape \
        else 0.0
    if s.device.type == "cuda":
        _free(s.device)
        torch.cuda.reset_peak_memory_stats(s.device)
    t = time_decode(gen, n, s.reps, s.device)
    peak = torch.cuda.max_memory_allocated(s.device) if s.device.type == "cuda" else None
    e2e = {**e2e, "warmup_s": round(warmup_s, 3), "prefill_ms": round(t.short_s * 1e3, 3),
           "generate_ms": round(t.long_s * 1e3, 3), "token_match": match,
           "peak_mem_bytes": peak}
    if peak is None:
        e2e["peak_mem_note"] = "peak memory is not measured on the CPU; see weight_bytes"
    decode_s, how = t.decode_s, "median"
    if not decode_s > 0:  # a busy spell of the machine inverted the medians
        decode_s, how = t.best_decode_s, "fastest calls (the medians were inverted by noise)"
    if not decode_s > 0:
        why = (f"decode time not measurable: generate({n + 1}) {t.long_s * 1e3:.2f} ms <= "
               f"generate(1) {t.short_s * 1e3:.2f} ms")
        return make_row(run, kernel=kernel, shape=shape, provider=e2e["config"], mode=mode,
                        note=why, max_rel_err=err, e2e=failed(e2e, why))
    e2e["timing"] = how
    per_token_us = decode_s / n * 1e6
    e2e["rate"] = e2e["tokens_per_s"] = n / decode_s
    e2e["rate_best"] = n / t.best_decode_s if t.best_decode_s > 0 else None
    e2e["spread"] = round(t.spread, 3)
    note = f"{mode}" + (f" (torch.compile mode={s.compile_mode})" if mode == "compiled" else "")
    return make_row(run, kernel=kernel, shape=shape, provider=e2e["config"], mode=mode,
                    e2e=e2e, median_us=per_token_us, samples=t.samples, note=note,
                    max_rel_err=err, flops=flops, nbytes=nbytes)


# ---------------------------------------------------------------------------------------------
# MobileNetV2
# ---------------------------------------------------------------------------------------------


@dataclass
class Mbv2:
    """The two MobileNetV2 models on the device, their input and the unfused eager output."""

    models: dict[str, nn.Module]
    x: torch.Tensor
    ref: torch.Tensor
    flops: float
    fused_units: int
    compiled: dict[str, Any] = field(default_factory=dict)


def build_mbv2(s: Settings) -> Mbv2:
    """Unfused and fused MobileNetV2 (the fusion runs on the CPU in fp32, in eval mode, as
    ``compress_(model, DWSepFuseConfig())``), then moved to the device (fp16 channels-last on
    CUDA)."""
    import compress_ops as co
    from compress_ops import archs

    torch.manual_seed(s.seed)
    dense = archs.mobilenet_v2(num_classes=1000).eval()
    fused = co.compress_(copy.deepcopy(dense), co.DWSepFuseConfig())
    units = sum(isinstance(m, co.nn.FusedDWSepConv2d) for m in fused.modules())
    g = torch.Generator().manual_seed(s.seed + 2)
    x = torch.randn(s.image_batch, 3, s.image_size, s.image_size, generator=g)
    flops = float(archs.profile(dense, x[:1]).flops) * s.image_batch
    fmt = torch.channels_last if s.device.type == "cuda" else torch.contiguous_format
    models = {k: m.to(device=s.device, dtype=s.dtype, memory_format=fmt)
              for k, m in (("unfused", dense), ("fused", fused))}
    x = x.to(device=s.device, dtype=s.dtype).contiguous(memory_format=fmt)
    with torch.no_grad():
        ref = models["unfused"](x).float()
    return Mbv2(models, x, ref, flops, units)


def mbv2_rows(run: Run, mode: str, state: dict[str, Any]) -> Iterator[schema.Row]:
    """The MobileNetV2 rows of one mode (``state`` keeps the built models between the modes)."""
    s = run.settings
    shape = {"batch": s.image_batch, "H": s.image_size, "W": s.image_size}
    size = f"b{s.image_batch}-{s.image_size}px"
    for prov in ("unfused", "fused"):
        e2e = e2e_fields("mobilenet_v2", size, prov, mode, "images/s",
                         compile_mode=s.compile_mode if mode == "compiled" else None)
        common = dict(kernel=MBV2_KERNEL, shape=shape, provider=prov, mode=mode)
        skip = run.over_budget()
        if skip:
            yield make_row(run, note=skip, e2e=failed(e2e, skip, "skipped"), **common)
            continue
        try:
            if "mb" not in state:
                state["mb"] = build_mbv2(s)
            mb: Mbv2 = state["mb"]
            model = mb.models[prov]
            e2e["weight_bytes"] = weight_bytes(model)
            if prov == "fused":
                e2e["fused_units"] = mb.fused_units
            fn = model
            t0 = time.perf_counter()
            if mode == "compiled":
                fn = torch.compile(model, mode=s.compile_mode)

            def call(fn=fn, x=mb.x) -> torch.Tensor:
                with torch.no_grad():
                    return fn(x)

            y = call().float().clone()
            _sync(s.device)
            e2e["warmup_s"] = round(time.perf_counter() - t0, 3)
            err = rel_err(y, mb.ref)
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(s.device)
            t = timing.time_fn(call, s.device, max_seconds=s.image_seconds)
            peak = torch.cuda.max_memory_allocated(s.device) if s.device.type == "cuda" \
                else None
            e2e["peak_mem_bytes"] = peak
            if peak is None:
                e2e["peak_mem_note"] = "peak memory is not measured on the CPU; see weight_bytes"
            e2e["rate"] = e2e["images_per_s"] = s.image_batch / (t.median_us * 1e-6)
            note = f"{mode}" + (f" (torch.compile mode={s.compile_mode})"
                                if mode == "compiled" else "")
            yield make_row(run, e2e=e2e, median_us=t.median_us, samples=t.samples, note=note,
                           max_rel_err=err, flops=mb.flops, **common)
        except Exception as ex:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            why = error_text(ex)
            run.errors.append(f"mobilenet_v2 {prov} {mode}: {why}")
            yield make_row(run, note=why, e2e=failed(e2e, why), **common)
        finally:
            if mode == "compiled":
                torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _csv(text: str, known: tuple[str, ...], what: str, aliases: dict[str, str] | None = None
         ) -> tuple[str, ...]:
    names = [(aliases or {}).get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise SystemExit(f"bench_e2e: unknown {what} {bad}; known: {', '.join(known)}")
    return tuple(dict.fromkeys(names))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench_e2e", description=__doc__.splitlines()[0])
    p.add_argument("--size", default="tiny", choices=tuple(SIZES))
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default: <results dir>/<date>-<device>-e2e.json)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of {','.join(CONFIGS)} (2:4 = sparse24)")
    p.add_argument("--modes", default=",".join(MODES), help="eager,compiled or one of them")
    p.add_argument("--no-compile", action="store_true", help="eager rows only (--modes eager)")
    p.add_argument("--parts", default=",".join(PARTS), help="llama,mobilenet_v2 or one of them")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--decode-tokens", type=int, default=None,
                   help="N decoded tokens timed per call (default 32; tiny: 16)")
    p.add_argument("--reps", type=int, default=None,
                   help="timed generate pairs per row (default 5; 3 on CUDA)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode (default: reduce-overhead on CUDA, default on CPU)")
    p.add_argument("--image-batch", type=int, default=None,
                   help="MobileNetV2 batch (default 32 on CUDA; CPU: 8, tiny: 2)")
    p.add_argument("--image-size", type=int, default=None,
                   help="MobileNetV2 input height = width (default 224; CPU tiny: 64)")
    p.add_argument("--image-seconds", type=float, default=3.0,
                   help="CPU time budget per MobileNetV2 timing (timing.time_fn max_seconds)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no row after this many seconds (the rest: skipped rows)")
    p.add_argument("--size-reason", default=None, help="why this --size (stored in meta.e2e)")
    p.add_argument("--compress-lm-head", action="store_true",
                   help="compress an untied lm_head too (default: kept dense)")
    p.add_argument("--lowrank-rank", type=int, default=None,
                   help="LowRankConfig rank (default hidden // 4)")
    p.add_argument("--no-peaks", action="store_true",
                   help="do not measure the memory bandwidth (no %% of peak)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads for the run (restored after; default: as is). "
                        "On a shared CPU, 1 thread keeps other processes' load from stalling "
                        "torch's thread pool")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace, device: torch.device) -> Settings:
    cuda, tiny = device.type == "cuda", args.size == "tiny"
    modes = ("eager",) if args.no_compile else _csv(args.modes, MODES, "modes")
    return Settings(
        device=device, size=args.size,
        configs=_csv(args.configs, CONFIGS, "configs", _ALIASES), modes=modes,
        parts=_csv(args.parts, PARTS, "parts"), prompt_tokens=args.prompt_tokens,
        decode_tokens=args.decode_tokens or (16 if tiny else 32),
        reps=args.reps or (3 if cuda else 5),
        compile_mode=args.compile_mode or ("reduce-overhead" if cuda else "default"),
        image_batch=args.image_batch or (32 if cuda else 2 if tiny else 8),
        image_size=args.image_size or (64 if tiny and not cuda else 224),
        image_seconds=args.image_seconds, budget_s=args.budget_s,
        compress_lm_head=args.compress_lm_head, lowrank_rank=args.lowrank_rank, seed=args.seed)


def default_out(device_label: str) -> Path:
    """``<results dir>/<YYYY-MM-DD>-<device slug>-e2e.json``."""
    p = schema.results_path(device_label)
    return p.with_name(p.stem + "-e2e.json")


def main(argv: list[str] | None = None, log: Callable[[str], None] | None = None) -> int:
    """Run the benchmark; 0 when every row ran or was skipped for a stated reason, 1 when a row
    failed or the file has schema problems, 2 for a bad argument, 130 when interrupted."""
    log = log or (lambda text: print(text, flush=True))
    args = parse_args(argv)
    device = machine.resolve_device(args.device, "bench_e2e")
    if device is None:
        return 2
    s = settings_from(args, device)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, s, device, log, argv)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, s: Settings, device: torch.device,
          log: Callable[[str], None], argv: list[str] | None) -> int:
    load_at_start = machine.load_avg()
    env = machine.make_env(device)
    out = args.out or default_out(env.device)
    t0 = time.perf_counter()
    peaks = schema.Peaks(method="not measured (--no-peaks)")
    if not args.no_peaks:
        peaks = schema.Peaks(hbm_gbps=timing.measure_peak_bandwidth(device, nbytes=64 << 20),
                             method="copy / read-only sum of 64 MiB (timing.measure_peak_"
                                    "bandwidth); e2e rows: % of it for Llama decode only")
    transformers, tf_status = (None, "not needed (--parts)")
    if "llama" in s.parts:
        transformers, tf_status = import_transformers()
    meta_e2e = {
        "size": s.size, "size_reason": args.size_reason, "configs": list(s.configs),
        "modes": list(s.modes), "parts": list(s.parts), "prompt_tokens": s.prompt_tokens,
        "decode_tokens": s.decode_tokens, "reps": s.reps, "compile_mode": s.compile_mode,
        "image_batch": s.image_batch, "image_size": s.image_size, "budget_s": s.budget_s,
        "lm_head": "compressed" if s.compress_lm_head else "dense",
        "llama_config": {**_LLAMA_COMMON, **SIZES[s.size]}, "transformers": tf_status,
        "peak_memory": "torch.cuda.max_memory_allocated over the timed calls" if
        device.type == "cuda" else "not measured on the CPU (rows carry weight_bytes)",
    }
    run = Run(settings=s, env=env, peaks=peaks, out=out, argv=list(sys.argv[1:] if argv is None
              else argv), meta_e2e=meta_e2e, log=log, t0=t0, load_at_start=load_at_start)
    log(f"bench_e2e: device={env.device} size={s.size} dtype={schema.dtype_name(s.dtype)} "
        f"modes={','.join(s.modes)} {tf_status} -> {out}")
    run.save(complete=False)
    mb_state: dict[str, Any] = {}
    try:
        if "mobilenet_v2" in s.parts and "eager" in s.modes:
            for row in mbv2_rows(run, "eager", mb_state):
                run.add(row)
        if "llama" in s.parts:
            for row in llama_rows(run, transformers, tf_status):
                run.add(row)
        if "mobilenet_v2" in s.parts and "compiled" in s.modes:
            for row in mbv2_rows(run, "compiled", mb_state):
                run.add(row)
    except KeyboardInterrupt:
        run.errors.append("interrupted")
        run.save(complete=False, interrupted_at_s=round(run.elapsed(), 1))
        log(f"bench_e2e: interrupted; {len(run.rows)} rows in {out}")
        return 130
    run.save(complete=True)
    obj, problems = schema.load_results(out)
    for p in problems:
        print(f"bench_e2e: results problem: {p}", file=sys.stderr)
    log(f"bench_e2e: wrote {len(run.rows)} rows to {out} in {run.elapsed():.1f} s")
    for line in summary_table(run.rows):
        log(line)
    bad = [r for r in run.rows if (r.e2e or {}).get("status") == "error"]
    return 1 if (bad or problems or obj is None) else 0


def summary_table(rows: list[schema.Row]) -> list[str]:
    """A markdown table of the rows: model, size, config, mode, rate, x dense, error, status."""
    out = ["| model | size | config | mode | rate | x dense | max rel err | token match | "
           "weight MB | status |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        e = r.e2e or {}
        rate = f"{e['rate']:.1f} {e['rate_unit']}" if e.get("rate") else "-"
        sp = f"{r.speedup_vs_dense:.2f}" if r.speedup_vs_dense else "-"
        err = f"{r.max_rel_err:.2g}" if r.max_rel_err is not None and \
            math.isfinite(r.max_rel_err) else "-"
        tm = f"{e['token_match']:.2f}" if e.get("token_match") is not None else "-"
        wb = f"{e['weight_bytes'] / 1e6:.2f}" if e.get("weight_bytes") else "-"
        st = e.get("status", "?") + (f": {e['error']}" if e.get("error") else "")
        out.append(f"| {e.get('model')} | {e.get('size')} | {r.provider} | {e.get('mode')} | "
                   f"{rate} | {sp} | {err} | {tm} | {wb} | {st[:120]} |")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
