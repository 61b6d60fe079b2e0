"""Flax NNX decoder zoo (Llama family) and ``ModelConfig``; see ``.notes/MODEL_API.md``."""
from fusion_jax.models.config import ModelConfig
from fusion_jax.models.llama import CausalLM, KVCache, ModelOutput
from fusion_jax.models.moe import MoEAux
from fusion_jax.models.generate import generate

__all__ = ["ModelConfig", "CausalLM", "ModelOutput", "MoEAux", "KVCache", "generate"]
