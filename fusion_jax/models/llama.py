"""The Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) in Flax NNX, numerically as transformers.

Parameters of all decoder layers are STACKED along a leading ``layers`` axis (one layout whether or not
``config.scan_layers`` runs the stack under ``jax.lax.scan``); the tree is listed in ``fusion_jax.models``'
docstring. Each
``nnx.Param`` carries its logical axis names as ``out_sharding`` metadata (``out_sharding=`` at
construction, ``eager_sharding=False``), so ``nnx.get_partition_spec(nnx.state(model, nnx.Param))`` gives
logical ``PartitionSpec``s for a rules table to map onto a mesh.

The forward is written as pure functions over a dict of arrays (``_layer``), so the same code runs under
``lax.scan``, a Python loop, ``jax.checkpoint`` (remat) and ``jax.vmap`` over stacked experts.
With ``config.num_experts > 0`` every layer's FFN is the MoE block of ``moe.py`` (stacked and scanned like
the rest); the forward then also returns the routers' balance loss and per-expert load
(``ModelOutput.aux``), and takes ``router_key`` for XFT's noisy gating in training.
Attention uses ``jax.nn.dot_product_attention``: with no padding, packing or cache it runs with
``is_causal``/``local_window_size`` and no mask array at all; otherwise one boolean ``[B, 1, S, T]`` mask.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax.models import moe, rope
from fusion_jax.models.config import ModelConfig

_NO_WINDOW = 2**30


# -- containers ------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Decode cache. Slots are filled left to right; ``length`` slots are in use.

    k, v:     [L, B, T, KV, head_dim]  rotated keys and values, in the cache dtype
    valid:    [B, T] bool              slot holds a real (non-padding) token
    next_pos: [B] int32                position id the next real token of each row gets
    length:   [] int32                 number of slots written so far (same for every row)
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    next_pos: jax.Array
    length: jax.Array

    @property
    def max_len(self) -> int:
        return self.k.shape[2]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
    logits: jax.Array | None   # [B, S, V] float32
    hidden: jax.Array | None   # [B, S, D] final-RMSNorm'ed hidden states (HF last_hidden_state)
    cache: KVCache | None
    aux: moe.MoEAux | None = None   # MoE models: balance loss and expert load (None for dense models)
    layer_inputs: jax.Array | None = None  # [L, B, S, D] residual stream entering each layer, on request
                                           # (HF output_hidden_states' hidden_states[:-1])


# -- params ----------------------------------------------------------------------------------------
def _param(value, axes: tuple[str, ...]) -> nnx.Param:
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class _Node(nnx.Module):
    """A plain namespace of params / sub-nodes (gives the tree its names)."""

    def __init__(self, **children):
        for k, v in children.items():
            setattr(self, k, v)


class CausalLM(nnx.Module):
    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        c = config
        pdt = jnp.dtype(c.param_dtype)
        L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        std = 0.02
        key = rngs.params()
        keys = iter(jax.random.split(key, 16))

        def normal(shape):
            return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(pdt)

        def dense(shape, axes, bias: bool):
            kw = {"kernel": _param(normal(shape), axes)}
            if bias:
                kw["bias"] = _param(jnp.zeros(shape[:1] + shape[2:], pdt), axes[:1] + axes[2:])
            return _Node(**kw)

        def norm(shape, axes):
            return _Node(scale=_param(jnp.ones(shape, pdt), axes))

        self.embed = _Node(embedding=_param(normal((V, D)), ("vocab", "embed")))
        self.layers = _Node(
            attn_norm=norm((L, D), ("layers", "embed")),
            attn=_Node(
                q_proj=dense((L, D, q), ("layers", "embed", "heads"), c.attention_bias),
                k_proj=dense((L, D, kv), ("layers", "embed", "kv_heads"), c.attention_bias),
                v_proj=dense((L, D, kv), ("layers", "embed", "kv_heads"), c.attention_bias),
                o_proj=dense((L, q, D), ("layers", "heads", "embed"), c.o_bias),
            ),
            mlp_norm=norm((L, D), ("layers", "embed")),
            mlp=_moe_node(c, rngs.params(), pdt) if c.is_moe else _Node(
                gate_proj=dense((L, D, F), ("layers", "embed", "mlp"), c.mlp_bias),
                up_proj=dense((L, D, F), ("layers", "embed", "mlp"), c.mlp_bias),
                down_proj=dense((L, F, D), ("layers", "mlp", "embed"), c.mlp_bias),
            ),
        )
        self.final_norm = norm((D,), ("embed",))
        if not c.tie_word_embeddings:
            self.lm_head = _Node(kernel=_param(normal((D, V)), ("embed", "vocab")))

    # -- public -----------------------------------------------------------------------------------
    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        c = self.config
        dt = jnp.dtype(dtype or c.dtype)
        shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
        return KVCache(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                       valid=jnp.zeros((batch, max_len), bool),
                       next_pos=jnp.zeros((batch,), jnp.int32), length=jnp.zeros((), jnp.int32))

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., V] from final-normed hidden states (tied or untied head)."""
        cdt = jnp.dtype(self.config.dtype)
        if self.config.tie_word_embeddings:
            w = self.embed.embedding[...].astype(cdt)
            return jnp.einsum("...d,vd->...v", hidden.astype(cdt), w, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...].astype(cdt)
        return jnp.einsum("...d,dv->...v", hidden.astype(cdt), w, preferred_element_type=jnp.float32)

    def __call__(self, input_ids, attention_mask=None, positions=None, segment_ids=None, cache=None,
                 return_hidden: bool = False, return_logits: bool = True, router_key: jax.Array | None = None,
                 return_layer_inputs: bool = False) -> ModelOutput:
        """Logits (and on request final hidden states, each layer's input, a new cache) of ``input_ids``.

        ``router_key``: MoE training only: the PRNG key of XFT's noisy gating (layer i uses
        ``fold_in(router_key, i)``); None (evaluation) routes on the clean logits. Dense models ignore it.
        """
        c = self.config
        cdt = jnp.dtype(c.dtype)
        input_ids = jnp.asarray(input_ids)
        B, S = input_ids.shape
        amask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")

        # positions: default = running count of real tokens (left padding -> first real token is 0)
        base = cache.next_pos if cache is not None else jnp.zeros((B,), jnp.int32)
        if positions is None:
            if amask is not None:
                positions = base[:, None] + jnp.cumsum(amask, axis=1, dtype=jnp.int32) - 1
                positions = jnp.maximum(positions, 0)
            else:
                positions = base[:, None] + jnp.arange(S, dtype=jnp.int32)[None, :]
        positions = jnp.asarray(positions, jnp.int32)
        cos, sin = rope.cos_sin(c, positions)

        windows = c.layer_windows()
        uniform = len(set(windows)) == 1
        # attention mask: None (fast causal path) or [B, 1, S, T] bool
        if cache is None and amask is None and segment_ids is None and uniform:
            mask = None
            q_idx = k_idx = None
        else:
            if cache is None:
                q_idx = k_idx = jnp.arange(S, dtype=jnp.int32)
                kv_valid = amask if amask is not None else jnp.ones((B, S), bool)
            else:
                T = cache.max_len
                q_idx = cache.length + jnp.arange(S, dtype=jnp.int32)
                k_idx = jnp.arange(T, dtype=jnp.int32)
                new_valid = amask if amask is not None else jnp.ones((B, S), bool)
                kv_valid = jax.lax.dynamic_update_slice(cache.valid, new_valid, (0, cache.length))
            mask = (k_idx[None, :] <= q_idx[:, None])[None] & kv_valid[:, None, :]
            if segment_ids is not None:
                seg = jnp.asarray(segment_ids)
                mask = mask & (seg[:, :, None] == seg[:, None, :])
            mask = mask[:, None]  # [B, 1, S, T]
        win_arr = jnp.asarray([w if w is not None else _NO_WINDOW for w in windows], jnp.int32)
        static_window = windows[0] if uniform else None

        x = jnp.take(self.embed.embedding[...], input_ids, axis=0).astype(cdt)
        params = nnx.to_pure_dict(nnx.state(self.layers, nnx.Param))
        slot = cache.length if cache is not None else None

        def layer(x, p, window, k_c, v_c, key):
            return _layer(c, p, x, cos, sin, mask, q_idx, k_idx, window, static_window, k_c, v_c, slot, key)

        if c.remat != "none":
            layer = jax.checkpoint(layer, policy=_REMAT_POLICIES[c.remat]())

        ck = cache.k if cache is not None else None
        cv = cache.v if cache is not None else None
        keys = None
        if c.is_moe and router_key is not None:
            keys = jax.vmap(lambda i: jax.random.fold_in(router_key, i))(jnp.arange(c.num_layers))
        if c.scan_layers:
            def body(x, xs):
                p, w, k_c, v_c, key = xs
                x_in = x
                x, kv, aux = layer(x, p, w, k_c, v_c, key)
                return x, (kv, aux, x_in if return_layer_inputs else None)
            x, ((nk, nv), aux, layer_inputs) = jax.lax.scan(body, x, (params, win_arr, ck, cv, keys))
        else:
            ks, vs, auxs, ins = [], [], [], []
            for i in range(c.num_layers):
                p = jax.tree.map(lambda a: a[i], params)
                ins.append(x)
                x, (k_i, v_i), aux_i = layer(x, p, win_arr[i], None if ck is None else ck[i],
                                             None if cv is None else cv[i], None if keys is None else keys[i])
                ks.append(k_i)
                vs.append(v_i)
                auxs.append(aux_i)
            nk = jnp.stack(ks) if cache is not None else None
            nv = jnp.stack(vs) if cache is not None else None
            aux = jax.tree.map(lambda *a: jnp.stack(a), *auxs) if c.is_moe else None
            layer_inputs = jnp.stack(ins) if return_layer_inputs else None

        hidden = _rms_norm(x, self.final_norm.scale[...], c.rms_norm_eps)
        logits = self.logits_from_hidden(hidden) if return_logits else None
        new_cache = None
        if cache is not None:
            add = amask.sum(axis=1, dtype=jnp.int32) if amask is not None else jnp.full((B,), S, jnp.int32)
            new_cache = KVCache(k=nk, v=nv, valid=kv_valid, next_pos=cache.next_pos + add,
                                length=cache.length + S)
        moe_aux = None
        if c.is_moe:
            balance, load, agreement = aux
            moe_aux = moe.MoEAux(balance_loss=balance.sum(), layer_balance=balance, expert_load=load,
                                 noise_agreement=agreement)
        return ModelOutput(logits=logits, hidden=hidden if return_hidden else None, cache=new_cache,
                           aux=moe_aux, layer_inputs=layer_inputs)


def _moe_node(c: ModelConfig, key: jax.Array, dtype) -> _Node:
    """The MoE FFN's params as nodes (see moe.py), each with its logical axes."""
    def build(tree):
        if isinstance(tree, tuple):
            return _param(*tree)
        return _Node(**{k: build(v) for k, v in tree.items()})
    return build(moe.param_init(c, key, dtype))


# -- pure layer math -------------------------------------------------------------------------------
_REMAT_POLICIES = {
    "full": lambda: jax.checkpoint_policies.nothing_saveable,
    "minimal": lambda: jax.checkpoint_policies.nothing_saveable,
    "dots": lambda: jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": lambda: jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}

_ACTS = {
    "silu": jax.nn.silu, "swish": jax.nn.silu, "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


def _rms_norm(x, scale, eps):
    """transformers' LlamaRMSNorm: statistics in float32, result cast back, then times the weight."""
    xf = x.astype(jnp.float32)
    var = jnp.mean(xf * xf, axis=-1, keepdims=True)
    y = (xf * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return scale.astype(x.dtype) * y


def _dense(x, p):
    y = jnp.einsum("bsd,df->bsf", x, p["kernel"].astype(x.dtype))
    if "bias" in p:
        y = y + p["bias"].astype(x.dtype)
    return y


def _layer(c: ModelConfig, p: dict, x, cos, sin, mask, q_idx, k_idx, window, static_window, k_cache,
           v_cache, slot, router_key=None) -> tuple[Any, tuple[Any, Any], Any]:
    B, S, _ = x.shape
    hd = c.head_dim
    h = _rms_norm(x, p["attn_norm"]["scale"], c.rms_norm_eps)
    a = p["attn"]
    q = _dense(h, a["q_proj"]).reshape(B, S, c.num_heads, hd)
    k = _dense(h, a["k_proj"]).reshape(B, S, c.num_kv_heads, hd)
    v = _dense(h, a["v_proj"]).reshape(B, S, c.num_kv_heads, hd)
    q = rope.apply_rope(q, cos, sin)
    k = rope.apply_rope(k, cos, sin)
    new_kv = (None, None)
    if k_cache is not None:
        k_all = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, slot, 0, 0))
        v_all = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, slot, 0, 0))
        new_kv = (k_all, v_all)
        k, v = k_all.astype(q.dtype), v_all.astype(q.dtype)
    scale = 1.0 / math.sqrt(hd)
    if mask is None:
        lws = (static_window - 1, 0) if static_window is not None else None
        o = jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=lws)
    else:
        m = mask
        if c.sliding_window is not None:
            m = m & ((q_idx[:, None] - k_idx[None, :]) < window)[None, None]
        o = jax.nn.dot_product_attention(q, k, v, mask=m, scale=scale)
    o = _dense(o.reshape(B, S, c.num_heads * hd), a["o_proj"])
    x = x + o
    h = _rms_norm(x, p["mlp_norm"]["scale"], c.rms_norm_eps)
    m_ = p["mlp"]
    act = _ACTS[c.hidden_act]
    if c.is_moe:
        y, aux = moe.moe_ffn(c, m_, h, act, router_key)
        return x + y, new_kv, aux
    y = _dense(act(_dense(h, m_["gate_proj"])) * _dense(h, m_["up_proj"]), m_["down_proj"])
    return x + y, new_kv, None


# -- abstract model ----------------------------------------------------------------------------------
def abstract_model(config: ModelConfig) -> CausalLM:
    """A CausalLM of ``config`` whose params are ShapeDtypeStructs (no weights are made)."""
    return nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))


def param_logical_axes(config: ModelConfig) -> dict:
    """Pure-dict tree (the structure ``hf.load`` returns) of each param's logical axis names."""
    from fusion_jax.sharding import state_logical_axes
    return state_logical_axes(nnx.state(abstract_model(config), nnx.Param))


def param_shardings(config: ModelConfig, mesh, rules=None) -> dict:
    """Pure-dict tree of each param's NamedSharding on ``mesh`` (dims that do not divide replicate)."""
    from fusion_jax.sharding import logical_to_mesh_sharding
    shapes = nnx.to_pure_dict(nnx.state(abstract_model(config), nnx.Param))
    return logical_to_mesh_sharding(param_logical_axes(config), mesh, rules, shapes=shapes)
