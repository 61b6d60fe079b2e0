"""Upcycling (XFT step 1): every dense FFN becomes E exact copies plus a freshly initialised router.

``routing="xft"`` (the reference, ise-uiuc/xft ``convert_dense_to_moe.py``): expert 0 is the shared expert,
always on; the router Linear(D -> E-1) -> Tanh -> Linear(E-1 -> E-1) (no biases) and the noise layer
Linear(D -> E-1) start N(0, 0.02) (what transformers 4.37's ``from_pretrained`` gave the reference's gate);
``top_k`` of the E-1 others are routed. ``routing="topk"``: a Mixtral-style softmax router over all E
experts, top-k renormalised, also N(0, 0.02).

Why a fresh upcycle computes its dense model's function: the experts are identical, so the MoE output is
(sum of the token's routing weights) x FFN(x), and both routers' weights sum to 1 per token (XFT: shared
1 - p_(1) plus p_(1) * softmax(...) summing to p_(1); top-k: renormalised probabilities).

The result is a ``(ModelConfig, params)`` pair like ``fusion_jax.hf.load`` returns; ``hf.save`` writes it
(as ``FusionMoeForCausalLM``, or as a plain ``MixtralForCausalLM`` for top-k routing over a Llama / Mistral
without biases, which transformers then loads by itself).
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

from fusion_jax.errors import ConfigError
from fusion_jax.models.config import ModelConfig
from fusion_jax.utils.hashing import stable_hash

ROUTINGS = ("xft", "topk")
ROUTER_STD = 0.02
_FFN = ("gate_proj", "up_proj", "down_proj")


def upcycle_config(config: ModelConfig, *, experts: int = 8, top_k: int = 5, routing: str = "xft",
                   noise: bool = True, layout: str = "auto") -> ModelConfig:
    """The MoE config of ``config`` upcycled to ``experts`` experts (XFT: including the shared expert 0),
    each token routed to ``top_k`` of them (XFT: of the E-1 non-shared ones). ``noise``: XFT's noisy gating
    in training. ``layout``: "auto" (Mixtral when transformers can hold it, else ours), "mixtral", "fusion"."""
    if config.is_moe:
        raise ConfigError(f"the model ({config.architecture}) is already a mixture of experts: nothing to upcycle")
    if config.mlp_bias:
        raise ConfigError("the model's FFN has biases (mlp_bias=True); the upcycled experts have none")
    if routing not in ROUTINGS:
        raise ConfigError(f"--routing {routing!r}: expected one of {', '.join(ROUTINGS)}")
    if isinstance(experts, bool) or not isinstance(experts, int) or experts < 2:
        raise ConfigError(f"--experts {experts!r}: an MoE needs at least 2 experts")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k < experts:
        extra = " (expert 0 is the shared one; top-k picks among the other experts-1)" if routing == "xft" else ""
        raise ConfigError(f"--top-k {top_k!r} must be at least 1 and smaller than --experts {experts}{extra}")
    mixtral_ok = (config.attention_family in ("LlamaForCausalLM", "MistralForCausalLM")
                  and not config.attention_bias and not config.o_bias and config.sliding_layers is None)
    if layout not in ("auto", "mixtral", "fusion"):
        raise ConfigError(f"--layout {layout!r}: expected auto, mixtral or fusion")
    if layout == "mixtral" and (routing != "topk" or not mixtral_ok):
        raise ConfigError("--layout mixtral holds top-k routing over a Llama / Mistral without attention biases "
                          f"only (here routing={routing}, base {config.architecture})")
    use_mixtral = routing == "topk" and mixtral_ok and layout != "fusion"
    moe = dict(num_experts=experts, num_experts_per_tok=top_k,
               router="xft" if routing == "xft" else "softmax", norm_topk_prob=True,
               router_noise=bool(noise) and routing == "xft")
    if use_mixtral:
        return config.replace(architecture="MixtralForCausalLM", **moe)
    return config.replace(architecture="FusionMoeForCausalLM", base_architecture=config.architecture, **moe)


def init_router(moe_config: ModelConfig, key: jax.Array, std: float = ROUTER_STD, dtype=None) -> dict:
    """Router params of every layer (``params["layers"]["mlp"]["router"]``), each tensor N(0, std) drawn
    from ``fold_in(key, stable_hash(its param path))`` (order- and device-independent)."""
    c = moe_config
    L, D, n = c.num_layers, c.hidden_size, c.num_routed_experts
    dt = jnp.dtype(dtype or c.param_dtype)
    shapes = ({"w1": (L, D, n), "w2": (L, n, n), **({"noise": (L, D, n)} if c.router_noise else {})}
              if c.router == "xft" else {"kernel": (L, D, n)})
    out = {}
    for name, shape in shapes.items():
        k = jax.random.fold_in(key, stable_hash(f"layers/mlp/router/{name}", digest_size=4))
        out[name] = (std * jax.random.normal(k, shape, jnp.float32)).astype(dt)
    return out


def upcycle(dense_params: Mapping[str, Any], config: ModelConfig, *, experts: int = 8, top_k: int = 5,
            routing: str = "xft", key: jax.Array | None = None, noise: bool = True,
            router_std: float = ROUTER_STD, layout: str = "auto") -> tuple[ModelConfig, dict]:
    """``(moe_config, moe_params)``: ``dense_params`` (as ``hf.load`` returns) with every FFN copied into
    ``experts`` identical experts and a new router (``key``, default ``jax.random.key(0)``). Every other
    param is shared (not copied)."""
    moe_config = upcycle_config(config, experts=experts, top_k=top_k, routing=routing, noise=noise, layout=layout)
    try:
        mlp = dense_params["layers"]["mlp"]
        ffn = {k: jnp.asarray(mlp[k]["kernel"]) for k in _FFN}
    except (KeyError, TypeError):
        raise ConfigError("the dense params have no FFN to upcycle (expected layers/mlp/{gate_proj,up_proj,"
                          "down_proj}/kernel)") from None
    key = jax.random.key(0) if key is None else key
    layers = {k: v for k, v in dense_params["layers"].items() if k != "mlp"}
    layers["mlp"] = {
        "experts": {k: {"kernel": jnp.broadcast_to(w[:, None], (w.shape[0], experts) + w.shape[1:])}
                    for k, w in ffn.items()},
        "router": init_router(moe_config, key, router_std, dtype=ffn["gate_proj"].dtype),
    }
    params = {k: v for k, v in dense_params.items() if k != "layers"}
    params["layers"] = layers
    return moe_config, params
