"""fusion-jax: fuse large language models in JAX/Flax.

Four method families (weight merging, gated expert fusion, distribution-fusion distillation,
upcycle-and-merge-back) over one model zoo, one checkpoint I/O layer and one trainer.
"""
from fusion_jax.errors import FusionError

__version__ = "0.1.0"
__all__ = ["FusionError", "__version__"]
