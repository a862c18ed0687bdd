"""Triton kernels, their launchers and packing formats (installed as ``compress_ops.kernels``).

Nothing here knows about modules, configs or ``torch.library``: see ``compress_ops`` for those.
"""
