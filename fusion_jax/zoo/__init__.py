"""The demo zoo: tokenizers, bases and specialists trained offline on the demo corpus, cached by content
hash; every method's demo, the tests and the arena build on it. See :mod:`fusion_jax.zoo.build`; the
demo family's configuration is :mod:`fusion_jax.zoo.config`.

The names below are imported on first use, so that configs can import :mod:`fusion_jax.zoo.config`
without loading JAX (``train.py`` reads and validates a config before it starts JAX).
"""
__all__ = ["DEFAULT_CACHE", "CorpusSpec", "Family", "FamilySpec", "LMRun", "build_family", "family_key",
           "model_config", "spec_from_config", "stacked_sft_loss"]


def __getattr__(name: str):
    if name in __all__:
        from fusion_jax.zoo import build
        return getattr(build, name)
    raise AttributeError(f"module 'fusion_jax.zoo' has no attribute {name!r}")
