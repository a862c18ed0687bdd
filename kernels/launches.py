"""What a call launches: :func:`launch` starts a Triton kernel, and :func:`capture` records
every launch of a block (grid, arguments, options; also the torch kernels a launcher adds, as
names) with or without running them. :func:`specialization` computes what Triton's JIT
compiles for a recorded launch on a given GPU architecture. The static performance model and
the GPU audit read real calls through these, so what they compile is what calls run."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Launch", "capture", "launch", "record_torch", "runs", "specialization"]


@dataclass
class Launch:
    """One kernel a call launches: a Triton kernel with its grid, arguments and launch
    options, or a torch kernel (``kernel`` is then its name, e.g. ``"torch.zeros"``)."""

    kernel: object
    grid: tuple = ()
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


@dataclass
class _Capture:
    launches: list[Launch]
    run: bool


_CAPTURE: _Capture | None = None


@contextlib.contextmanager
def capture(run: bool = True) -> Iterator[list[Launch]]:
    """Record every kernel the launchers start inside this block, in order. ``run=False``
    records without launching the Triton kernels (the outputs are then left unwritten): the
    static performance model reads real calls' launches this way on a machine without a GPU."""
    global _CAPTURE
    prev, _CAPTURE = _CAPTURE, _Capture([], run)
    try:
        yield _CAPTURE.launches
    finally:
        _CAPTURE = prev


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """``kernel[grid](*args, **kwargs)``, recorded when :func:`capture` is active."""
    if _CAPTURE is not None:
        _CAPTURE.launches.append(Launch(kernel, tuple(grid), args, kwargs))
        if not _CAPTURE.run:
            return
    kernel[grid](*args, **kwargs)


def runs() -> bool:
    """Whether launches run (not inside ``capture(run=False)``): a launcher that also calls a
    torch kernel on a launch's output skips it when they do not."""
    return _CAPTURE is None or _CAPTURE.run


def record_torch(name: str) -> None:
    if _CAPTURE is not None:
        _CAPTURE.launches.append(Launch(name))


def specialization(kernel, args: tuple, kwargs: dict, arch: int = 90):
    """``(signature, constexprs, attrs, options)`` exactly as Triton's JIT computes them for
    ``kernel[grid](*args, **kwargs)`` on ``sm_<arch>`` (its binder and ``_pack_args``): the
    divisibility-16 attributes of pointers and ints, the ints equal to 1, the constexprs."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec,
                                                              options)
    return signature, constexprs, attrs, options
