"""The demo zoo: tokenizers, bases and specialists trained offline on the demo corpus, cached by content
hash; every method's demo, the tests and the arena build on it. See :mod:`fusion_jax.zoo.build`."""
from fusion_jax.zoo.build import (DEFAULT_CACHE, CorpusSpec, Family, FamilySpec, LMRun, build_family, family_key,
                                  model_config, spec_from_config, stacked_sft_loss)

__all__ = ["DEFAULT_CACHE", "CorpusSpec", "Family", "FamilySpec", "LMRun", "build_family", "family_key",
           "model_config", "spec_from_config", "stacked_sft_loss"]
