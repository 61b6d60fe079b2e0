"""HF checkpoint I/O: streaming safetensors, the name/layout tables, ``load``/``save``, Orbax convert.

``load``/``save``/``load_model`` are imported lazily so that ``fusion_jax.hf.safetensors_io`` stays
importable without JAX.
"""
from __future__ import annotations

__all__ = ["load", "load_model", "save", "read_config", "open_checkpoint", "write_checkpoint"]


def __getattr__(name):
    if name in __all__:
        from fusion_jax.hf import checkpoint
        return getattr(checkpoint, name)
    raise AttributeError(name)
