"""Flax NNX decoder zoo (Llama family) and ``ModelConfig``.

Build and call::

    config = ModelConfig.from_hf(json.load(open("config.json")))     # or fusion_jax.hf.read_config(dir)
    model = CausalLM(config, rngs=nnx.Rngs(0))                        # or fusion_jax.hf.load_model(dir)
    out = model(input_ids, attention_mask=None, positions=None, segment_ids=None, cache=None,
                return_hidden=False, return_logits=True)
    out.logits   # [B, S, V] float32      out.hidden  # [B, S, D] after the final RMSNorm (on request)
    out.cache    # KVCache when one was passed (model.init_cache(batch, max_len)); see generate()

``attention_mask`` [B, S] marks real tokens (left padding: positions count real tokens only);
``segment_ids`` [B, S] keep packed sequences apart; ``positions`` override the position ids.

The param tree (``nnx.to_pure_dict(nnx.state(model, nnx.Param))``, what ``fusion_jax.hf.load`` returns):
every decoder layer's params are STACKED on a leading ``L`` axis; kernels are ``[in, out]`` (HF's
``Linear.weight`` transposed), heads flattened as HF does (``H*hd``)::

    embed/embedding                 [V, D]
    layers/attn_norm/scale          [L, D]
    layers/attn/q_proj/kernel       [L, D, H*hd]     (+ bias [L, H*hd] when attention_bias)
    layers/attn/k_proj/kernel       [L, D, KV*hd]    (+ bias)
    layers/attn/v_proj/kernel       [L, D, KV*hd]    (+ bias)
    layers/attn/o_proj/kernel       [L, H*hd, D]     (+ bias [L, D] for Llama's attention_bias)
    layers/mlp_norm/scale           [L, D]
    layers/mlp/gate_proj/kernel     [L, D, F]        (+ biases when mlp_bias)
    layers/mlp/up_proj/kernel       [L, D, F]
    layers/mlp/down_proj/kernel     [L, F, D]
    final_norm/scale                [D]
    lm_head/kernel                  [D, V]           (absent with tie_word_embeddings)

An MoE config (``config.is_moe``: :mod:`fusion_jax.models.moe`) replaces ``layers/mlp/*`` by stacked experts
``layers/mlp/experts/{gate,up,down}_proj/kernel`` [L, E, D, F] / [L, E, F, D] and a router
(``layers/mlp/router/...``); its forward adds ``out.aux`` (:class:`MoEAux`: balance loss, expert load).

``fusion_jax.hf.mapping`` is the table from each path to its HF tensor name. Every ``nnx.Param`` carries
its logical axis names (``vocab, embed, layers, heads, kv_heads, mlp``) for ``fusion_jax.sharding``;
``param_logical_axes(config)`` / ``param_shardings(config, mesh)`` give them (and the mesh placement) for a
config without building weights (``abstract_model``).
"""
from fusion_jax.models.config import ModelConfig
from fusion_jax.models.llama import (CausalLM, KVCache, ModelOutput, abstract_model, param_logical_axes,
                                     param_shardings)
from fusion_jax.models.moe import MoEAux
from fusion_jax.models.generate import generate

__all__ = ["ModelConfig", "CausalLM", "ModelOutput", "MoEAux", "KVCache", "generate", "abstract_model",
           "param_logical_axes", "param_shardings"]
