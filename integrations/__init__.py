"""Glue to the rest of the ecosystem (installed as ``compress_ops.integrations``)."""
