"""Flax NNX decoder zoo (Llama family) and ``ModelConfig``; the param tree and forward are documented in
:mod:`fusion_jax.models.llama`."""
from fusion_jax.models.config import ModelConfig
from fusion_jax.models.llama import (CausalLM, KVCache, ModelOutput, abstract_model, param_logical_axes,
                                     param_shardings)
from fusion_jax.models.generate import generate

__all__ = ["ModelConfig", "CausalLM", "ModelOutput", "KVCache", "generate", "abstract_model", "param_logical_axes",
           "param_shardings"]
