"""The MoE block of the model zoo (fusion_jax.models.moe): routing, balance loss and dispatch against a
float64 NumPy reference of the routing, the grouped matmul's gradients, memory linear in the tokens (no
[tokens, experts, capacity] one-hot), and the decoder's MoE forward (scan / loop / remat, aux outputs)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax.errors import ConfigError
from fusion_jax.models import CausalLM, ModelConfig, moe

D, F = 16, 24
FAST = {"xla_backend_optimization_level": 0}   # tiny models: compile time is the cost
BASE = dict(vocab_size=40, hidden_size=D, intermediate_size=F, num_layers=2, num_heads=2, num_kv_heads=1,
            head_dim=8)
XFT = dict(architecture="FusionMoeForCausalLM", base_architecture="LlamaForCausalLM", num_experts=6,
           num_experts_per_tok=3, router="xft", router_noise=True)
CONFIGS = {
    "xft": XFT,
    "mixtral": dict(architecture="MixtralForCausalLM", num_experts=5, num_experts_per_tok=2),
    "qwen2_moe": dict(architecture="Qwen2MoeForCausalLM", num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=12, shared_expert_intermediate_size=20, attention_bias=True,
                      norm_topk_prob=False),
}


def _config(name, **kw):
    return ModelConfig(**BASE, **{**CONFIGS[name], **kw})


def _layer_params(c: ModelConfig, seed=0) -> dict:
    """One layer's MoE params, larger than init so routing probabilities are far from uniform."""
    tree = moe.param_init(c.replace(num_layers=1), jax.random.key(seed), jnp.float32, std=0.3)
    return jax.tree.map(lambda t: t[0][0], tree, is_leaf=lambda t: isinstance(t, tuple))


# -- float64 NumPy reference of the routing --------------------------------------------------------
def _silu(v):
    return v / (1.0 + np.exp(-v))


def _ffn(x, g, u, d):
    return (_silu(x @ g) * (x @ u)) @ d


def _softmax(v):
    e = np.exp(v - v.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _cv2(v):
    return 0.0 if len(v) < 2 else np.var(v, ddof=1) / (np.mean(v) ** 2 + 1e-10)


def _phi(v):
    return 0.5 * (1.0 + np.vectorize(math.erf)(v / math.sqrt(2.0)))


def reference(c: ModelConfig, p: dict, x: np.ndarray, noise: np.ndarray | None):
    """(y, balance, load fraction) of the MoE block for tokens x [N, D], in float64, written from the
    reference's description (xft.md §2-3; Mixtral / Qwen2-MoE's routers)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    x = x.astype(np.float64)
    N, k, n = x.shape[0], c.num_experts_per_tok, c.num_routed_experts
    r, ex = p["router"], p["experts"]
    if c.router == "xft":
        clean = np.tanh(x @ r["w1"]) @ r["w2"]
        logits = clean
        if noise is not None:
            sigma = np.log1p(np.exp(x @ r["noise"])) + c.router_noise_eps
            noise_term = noise * sigma
            logits = clean + noise_term
    else:
        logits = x @ r["kernel"]
    probs = _softmax(logits)
    top_i = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
    top_p = np.take_along_axis(probs, top_i, -1)
    if c.router == "xft":
        experts = np.concatenate([np.zeros((N, 1), int), top_i + 1], 1)
        weights = np.concatenate([1 - top_p[:, :1], top_p[:, :1] * _softmax(top_p)], 1)
    else:
        experts, weights = top_i, (top_p / top_p.sum(-1, keepdims=True) if c.norm_topk_prob else top_p)
    y = np.zeros_like(x)
    for t in range(N):
        for e, w in zip(experts[t], weights[t]):
            y[t] += w * _ffn(x[t], ex["gate_proj"]["kernel"][e], ex["up_proj"]["kernel"][e],
                             ex["down_proj"]["kernel"][e])
    if c.has_shared_expert:
        s = p["shared_expert"]
        gate = 1.0 / (1.0 + np.exp(-(x @ p["shared_expert_gate"]["kernel"])))
        y += gate * _ffn(x, s["gate_proj"]["kernel"], s["up_proj"]["kernel"], s["down_proj"]["kernel"])
    counts = np.zeros(n)
    importance = np.zeros(n)
    for t in range(N):
        counts[top_i[t]] += 1
        importance[top_i[t]] += top_p[t]
    load = counts
    if c.router == "xft" and noise is not None and k < n:
        top = -np.sort(-logits, axis=-1)[:, :k + 1]
        t_in, t_out = top[:, k:k + 1], top[:, k - 1:k]
        load = np.where(noise_term > t_in, _phi((clean - t_in) / sigma), _phi((clean - t_out) / sigma)).sum(0)
    balance = c.balance_loss_coef * (_cv2(importance) + _cv2(load))
    return y, balance, counts / N


@pytest.mark.parametrize("name,noisy,extra", [
    ("xft", True, {}), ("xft", False, {}), ("xft", False, dict(router_noise=False)),
    ("mixtral", False, {}), ("qwen2_moe", False, {}),
    ("qwen2_moe", False, dict(norm_topk_prob=True)),
])
def test_routing_and_dispatch_match_a_float64_numpy_reference(name, noisy, extra):
    c = _config(name, **extra)
    p = _layer_params(c)
    N = 48
    x = np.random.default_rng(1).standard_normal((N, D)).astype(np.float32)
    key = jax.random.key(7) if noisy else None
    y, (balance, load, _) = jax.jit(lambda p, x: moe.moe_ffn(c, p, x[None], jax.nn.silu, key),
                                 compiler_options=FAST)(p, x)
    noise = np.asarray(jax.random.normal(key, (N, c.num_routed_experts), jnp.float32)) if noisy else None
    y_ref, b_ref, load_ref = reference(c, p, x, noise)
    np.testing.assert_allclose(np.asarray(y[0]), y_ref, rtol=0, atol=2e-5 * np.abs(y_ref).max())
    np.testing.assert_allclose(float(balance), b_ref, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(load), load_ref, rtol=0, atol=1e-7)
    assert b_ref > 1e-4  # the statistics are not degenerate


def test_noise_agreement_is_the_share_of_noisy_choices_the_clean_logits_make():
    """MoEAux.noise_agreement (a training diagnostic): with noisy gating, the mean over tokens of
    |noisy top-k ∩ clean top-k| / k (NumPy); 1 in evaluation; k/n in expectation when noise dominates."""
    c = _config("xft")
    p = _layer_params(c)
    x = np.random.default_rng(2).standard_normal((64, D)).astype(np.float32)
    key = jax.random.key(3)
    route = jax.jit(lambda p, x, key: moe.route(c, p, jnp.asarray(x), key).agreement)
    clean = np.tanh(x.astype(np.float64) @ np.asarray(p["router"]["w1"], np.float64)) @ np.asarray(p["router"]["w2"])
    sigma = np.log1p(np.exp(x @ np.asarray(p["router"]["noise"], np.float64))) + c.router_noise_eps
    noisy = clean + np.asarray(jax.random.normal(key, clean.shape, jnp.float32)) * sigma
    k = c.num_experts_per_tok
    ci, ni = np.argsort(-clean, 1)[:, :k], np.argsort(-noisy, 1)[:, :k]
    want = np.mean([len(set(a) & set(b)) / k for a, b in zip(ci, ni)])
    np.testing.assert_allclose(float(route(p, x, key)), want, rtol=1e-6)
    assert 0 < want < 1 and float(route(p, x, None)) == 1.0


@pytest.mark.parametrize("impl", ["blocks", "ragged_dot"])
def test_grouped_matmul_values_and_gradients_equal_dense_autodiff(impl):
    """Every assignment (expert indices >= G: another device's, skipped) against the dense formula; the
    block matmul's hand-written backward against autodiff of the dense one."""
    rng = np.random.default_rng(0)
    N, G, A = 37, 5, 3
    x = jnp.asarray(rng.standard_normal((N, D)), jnp.float32)
    ws = [jnp.asarray(0.3 * rng.standard_normal(s), jnp.float32) for s in ((G, D, F), (G, D, F), (G, F, D))]
    ex = np.stack([rng.choice(G + 1, A, replace=False) for _ in range(N)]).astype(np.int32)  # G: not ours
    w = jnp.asarray(rng.random((N, A)), jnp.float32)

    def dense(x, w, g, u, d):
        comb = (jax.nn.one_hot(ex, G) * w[..., None]).sum(1)          # [N, G]; index G -> zero row
        h = jax.nn.silu(jnp.einsum("nd,gdf->ngf", x, g)) * jnp.einsum("nd,gdf->ngf", x, u)
        return jnp.einsum("ng,ngd->nd", comb, jnp.einsum("ngf,gfd->ngd", h, d))

    def ours(x, w, g, u, d):
        return moe.grouped_ffn(x, ex, w, g, u, d, jax.nn.silu, block=8, impl=impl)

    np.testing.assert_allclose(np.asarray(jax.jit(ours, compiler_options=FAST)(x, w, *ws)),
                               np.asarray(dense(x, w, *ws)), atol=2e-5)
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3, 4)),
                     compiler_options=FAST)(x, w, *ws) for f in (ours, dense)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5 * float(jnp.abs(b).max()))


def test_dispatch_memory_grows_linearly_with_tokens():
    """No [tokens, experts, capacity] tensor: 4x the tokens costs ~4x the temporaries, not 16x."""
    c = _config("xft")
    p = _layer_params(c)

    def temp(n):
        x = jax.ShapeDtypeStruct((1, n, D), jnp.float32)
        f = jax.value_and_grad(lambda p, x: jnp.sum(moe.moe_ffn(c, p, x, jax.nn.silu, jax.random.key(0))[0]))
        return jax.jit(f).lower(p, x).compile().memory_analysis().temp_size_in_bytes

    small, big = temp(512), temp(2048)
    assert big / small < 5.0, (small, big)


def _forward(c, params, ids, **kw):
    model = nnx.eval_shape(lambda: CausalLM(c, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    return model(ids, **kw)


def test_moe_decoder_scan_loop_remat_aux_and_keys():
    c = _config("xft")
    params = nnx.to_pure_dict(nnx.state(CausalLM(c, rngs=nnx.Rngs(0)), nnx.Param))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 40, (2, 9)), jnp.int32)
    key = jax.random.key(3)
    scan, loop = (jax.jit(lambda p, cc=cc: _forward(cc, p, ids, router_key=key), compiler_options=FAST)(params)
                  for cc in (c, c.replace(scan_layers=False)))
    np.testing.assert_allclose(np.asarray(loop.logits), np.asarray(scan.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(loop.aux.layer_balance), np.asarray(scan.aux.layer_balance), rtol=1e-5)
    aux = scan.aux
    assert aux.layer_balance.shape == (2,) and aux.expert_load.shape == (2, 5)
    np.testing.assert_allclose(float(aux.balance_loss), float(aux.layer_balance.sum()), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(aux.expert_load.sum(-1)), [3.0, 3.0], rtol=1e-6)
    # evaluation (no key): clean logits, deterministic; the noise of training changes the routing
    clean = jax.jit(lambda p: _forward(c, p, ids, return_layer_inputs=True), compiler_options=FAST)(params)
    assert float(jnp.abs(clean.logits - scan.logits).max()) > 1e-6
    assert clean.layer_inputs.shape == (2, 2, 9, D)
    # the balance loss trains the noise layer through XFT's smooth load estimate (remat on)
    g = jax.jit(jax.grad(lambda p: _forward(c.replace(remat="full"), p, ids, router_key=key).aux.balance_loss),
                compiler_options=FAST)(params)
    assert float(jnp.abs(g["layers"]["mlp"]["router"]["noise"]).max()) > 0
    dense = c.dense_config()
    dparams = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: CausalLM(dense, rngs=nnx.Rngs(0))), nnx.Param))
    assert jax.eval_shape(lambda p: _forward(dense, p, ids, router_key=key), dparams).aux is None


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_and_param_counts(name):
    c = _config(name)
    assert ModelConfig.from_hf(c.to_hf()) == c
    hash(c)
    params = nnx.state(nnx.eval_shape(lambda: CausalLM(c, rngs=nnx.Rngs(0))), nnx.Param)
    assert c.num_params() == sum(x.size for x in jax.tree.leaves(params))
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    assert tuple(specs["layers"]["mlp"]["experts"]["down_proj"]["kernel"]) == ("layers", "expert", "mlp", "embed")
    dense = c.dense_config()
    assert not dense.is_moe and dense.architecture in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
    if name == "xft":  # one token runs the shared expert and k routed ones
        ffn = 3 * D * F * BASE["num_layers"]
        assert c.num_params(active=True) == c.num_params() - (c.num_experts - 1 - c.num_experts_per_tok) * ffn


@pytest.mark.parametrize("kw,match", [
    (dict(num_experts_per_tok=6), "num_experts_per_tok=6"),            # > E-1 routed experts of XFT
    (dict(num_experts_per_tok=0), "num_experts_per_tok=0"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(router="softmax", router_noise=True), "router_noise"),
    (dict(router="bogus"), "router 'bogus'"),
    (dict(shared_expert_intermediate_size=8), "shared_expert_intermediate_size"),
    (dict(base_architecture="GPT2LMHeadModel"), "base_architecture"),
    (dict(architecture="LlamaForCausalLM", base_architecture=None), "dense architecture"),
])
def test_bad_moe_configs_are_clear_errors(kw, match):
    with pytest.raises(ConfigError, match=match):
        _config("xft", **kw)


def test_qwen2_moe_with_dense_layers_is_refused():
    hf = _config("qwen2_moe").to_hf()
    ModelConfig.from_hf(hf)
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        ModelConfig.from_hf({**hf, "mlp_only_layers": [1]}, source="q/config.json")
    with pytest.raises(ConfigError, match="decoder_sparse_step"):
        ModelConfig.from_hf({**hf, "decoder_sparse_step": 2})
