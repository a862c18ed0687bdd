"""Triton kernels, their launchers and configs, and the packed formats (installed as
``compress_ops.kernels``).

* ``formats/<family>.py``: the packed layouts in plain torch (packing, unpacking, checks, byte
  counts). Triton-free: the CPU paths and ``import compress_ops`` use only these.
* ``<family>.py``: the ``@triton.jit`` kernels, their launch configs (``configs/<family>.json``)
  and launchers. Imported only when a kernel is about to run.
* ``tuning.py``: the launch-config record, tuned tables and autotuner (Triton imported lazily);
  ``_launch.py``: the launch pieces the Triton families share.

Nothing here knows about modules, configs or ``torch.library``: see ``compress_ops`` for those.
"""
