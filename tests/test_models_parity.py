"""Parity of fusion_jax.models.CausalLM with transformers (torch, float32, eager attention).

Each case is a tiny random checkpoint written by transformers' ``save_pretrained`` and read back with
``fusion_jax.hf.load_model``. Per case: logits and last hidden state on random tokens, a left-padded batch
with an attention mask, prefill + one-token KV-cache steps against the full forward, and 16 greedy tokens
against ``transformers.generate``.

Speed: the models are tiny, so XLA compile time is nearly all of the cost. Every call goes through one
jitted entry point per kind of call (same shapes across tests of a case, so it compiles once) with the
XLA:CPU backend optimisation level at 0: the same HLO, compiled ~2x faster, numerically the same ops.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from flax import nnx  # noqa: E402

from fusion_jax.hf import load_model, read_config  # noqa: E402
from fusion_jax.models import CausalLM, ModelConfig, generate  # noqa: E402
from hf_fixtures import cached_tiny_hf_model, torch_reference  # noqa: E402

CASES = {
    "llama2": ("llama", {}),
    "llama3.1": ("llama3", {}),                       # rope_scaling type llama3
    "mistral_sliding": ("mistral", {}),               # sliding_window=8 < every test sequence
    # qkv bias + tied embeddings, and Qwen2's per-layer sliding window (layer 0 full, layer 1 slides)
    "qwen2_tied_bias": ("qwen2", dict(use_sliding_window=True, sliding_window=6, max_window_layers=1)),
    # head_dim (24) != hidden / heads (16), linear rope scaling, Llama's attention_bias (also o_proj) + mlp_bias
    "headdim_linear_bias": ("llama", dict(head_dim=24, rope_scaling={"rope_type": "linear", "factor": 2.0},
                                          attention_bias=True, mlp_bias=True)),
    # dynamic NTK: every test sequence is longer than max_position_embeddings, so the base really grows
    "dynamic_ntk": ("llama", dict(max_position_embeddings=16,
                                  rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
}
V = 160
TOL = 1e-4
S = 24            # sequence length of every full forward of a case (dynamic NTK: transformers keeps the
                  # longest length it has seen as state, so one length keeps its reference stateless)
PAD = (0, 7)      # left padding per row of the padded batch
FAST = {"xla_backend_optimization_level": 0}


@functools.partial(jax.jit, static_argnames=("graphdef", "return_hidden", "return_logits"),
                   compiler_options=FAST)
def _fwd(graphdef, state, ids, attention_mask, positions, segment_ids, cache, return_hidden, return_logits):
    return nnx.merge(graphdef, state)(ids, attention_mask=attention_mask, positions=positions,
                                      segment_ids=segment_ids, cache=cache, return_hidden=return_hidden,
                                      return_logits=return_logits)


def fwd(model, ids, attention_mask=None, positions=None, segment_ids=None, cache=None,
        return_hidden=False, return_logits=True):
    graphdef, state = nnx.split(model)
    as_arr = lambda x: None if x is None else jnp.asarray(x)  # noqa: E731
    return _fwd(graphdef, state, jnp.asarray(ids), as_arr(attention_mask), as_arr(positions),
                as_arr(segment_ids), cache, return_hidden, return_logits)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens"), compiler_options=FAST)
def _generate(graphdef, state, ids, mask, max_new_tokens):
    # the library's jitted generate, inlined into this jit (so it compiles with FAST too)
    return generate(nnx.merge(graphdef, state), ids, mask, max_new_tokens=max_new_tokens, eos_token_id=2,
                    pad_token_id=0)


def _ids(seed, shape):
    return np.random.RandomState(seed).randint(3, V, shape).astype(np.int32)


def _padded_batch(seed=1):
    ids = _ids(seed, (2, S))
    mask = np.ones((2, S), np.int32)
    for b, p in enumerate(PAD):
        ids[b, :p] = 0
        mask[b, :p] = 0
    return ids, mask


def _hf(hf, ids, **kw):
    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids)), **{k: torch.tensor(np.asarray(v)) for k, v in kw.items()})


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    arch, kw = CASES[request.param]
    path = cached_tiny_hf_model(tmp_path_factory, arch, **kw)
    return request.param, torch_reference(path), load_model(path)


def test_logits_and_hidden_match_transformers(case):
    name, hf, model = case
    ids = _ids(0, (2, S))
    out = fwd(model, ids, return_hidden=True)
    with torch.no_grad():
        ref_hidden = hf.model(torch.tensor(ids)).last_hidden_state.numpy()
    ref = _hf(hf, ids).logits.numpy()
    assert out.logits.dtype == jnp.float32 and out.hidden.shape == (2, S, model.config.hidden_size)
    np.testing.assert_allclose(np.asarray(out.logits), ref, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(out.hidden), ref_hidden, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model.logits_from_hidden(out.hidden)), ref, atol=TOL, rtol=0)


def test_padded_batch_with_attention_mask(case):
    name, hf, model = case
    ids, mask = _padded_batch()
    out = np.asarray(fwd(model, ids, attention_mask=mask).logits)
    # transformers on the same padded batch, told the position ids we derive from the mask
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = _hf(hf, ids, attention_mask=mask, position_ids=pos).logits.numpy()
    for b, p in enumerate(PAD):
        np.testing.assert_allclose(out[b, p:], ref[b, p:], atol=TOL, rtol=0)
    if name == "dynamic_ntk":
        return  # the rope base depends on the batch's longest row, so rows are not independent
    # padding is invisible: each row equals that row alone, unpadded
    for b, p in enumerate(PAD):
        np.testing.assert_allclose(out[b, p:], _hf(hf, ids[b:b + 1, p:]).logits.numpy()[0], atol=TOL, rtol=0)


def test_kv_cache_prefill_and_steps_equal_full_forward(case):
    name, hf, model = case
    if name == "dynamic_ntk":
        pytest.skip("dynamic NTK: the rope base depends on the length of each call, so a prefix's "
                    "keys differ from the full forward's (transformers' cache behaves the same way)")
    ids, mask = _padded_batch()
    full = np.asarray(fwd(model, ids, attention_mask=mask).logits)
    P = 14
    out = fwd(model, ids[:, :P], attention_mask=mask[:, :P], cache=model.init_cache(2, S + 3))
    got, cache = [np.asarray(out.logits)], out.cache
    for t in range(P, S):
        o = fwd(model, ids[:, t:t + 1], attention_mask=np.ones((2, 1), np.int32), cache=cache)
        got.append(np.asarray(o.logits))
        cache = o.cache
    got = np.concatenate(got, axis=1)
    for b, p in enumerate(PAD):
        np.testing.assert_allclose(got[b, p:], full[b, p:], atol=TOL, rtol=0)
    assert int(cache.length) == S
    assert list(np.asarray(cache.next_pos)) == [S - p for p in PAD]


def test_greedy_generate_matches_transformers(case):
    name, hf, model = case
    B, P, N = 2, 10, 16
    ids = _ids(4, (B, P))
    mask = np.ones((B, P), np.int32)
    ids[0, :3] = 0
    mask[0, :3] = 0
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=N,
                          do_sample=False, pad_token_id=0, eos_token_id=2).numpy()[:, P:]
    graphdef, state = nnx.split(model)
    ours = np.asarray(_generate(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), N))
    assert ours.shape == (B, N)
    # transformers stops once every row has emitted EOS; after that our rows hold pad_token_id
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    assert (ours[:, ref.shape[1]:] == 0).all()


def _with(model, **kw):
    """Same params, different static config (scan / remat / dtype)."""
    m = nnx.eval_shape(lambda: CausalLM(model.config.replace(**kw), rngs=nnx.Rngs(0)))
    nnx.update(m, nnx.state(model))
    return m


def test_scan_vs_loop_and_remat(tmp_path_factory):
    # Qwen2 case: per-layer windows differ, so the scanned window array really varies across layers
    arch, kw = CASES["qwen2_tied_bias"]
    model = load_model(cached_tiny_hf_model(tmp_path_factory, arch, **kw))
    assert model.config.scan_layers
    ids, mask = _padded_batch()
    ref = fwd(model, ids, attention_mask=mask).logits
    loop = _with(model, scan_layers=False)
    np.testing.assert_allclose(fwd(loop, ids, attention_mask=mask).logits, ref, atol=1e-5, rtol=0)

    @functools.partial(jax.jit, static_argnames="graphdef", compiler_options=FAST)
    def grad(graphdef, state):
        def loss(s):
            return jnp.mean(nnx.merge(graphdef, s)(ids, attention_mask=mask).logits ** 2)
        return jax.grad(loss)(state)

    g_ref = grad(*nnx.split(model, nnx.Param))
    for remat in ("full", "dots"):
        g = grad(*nnx.split(_with(model, remat=remat), nnx.Param))
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-4)


def test_packed_segments_equal_separate_sequences(tmp_path_factory):
    model = load_model(cached_tiny_hf_model(tmp_path_factory, "mistral"))
    half = S // 2
    a = _ids(6, (2, half))
    packed = a.reshape(1, S)
    seg = np.r_[np.ones(half), 2 * np.ones(half)][None].astype(np.int32)
    pos = np.r_[np.arange(half), np.arange(half)][None].astype(np.int32)
    out = np.asarray(fwd(model, packed, positions=pos, segment_ids=seg).logits)
    sep = np.asarray(fwd(model, a).logits)
    np.testing.assert_allclose(out.reshape(2, half, V), sep, atol=1e-5, rtol=0)


def test_bf16_params_and_compute_run_and_are_close(tmp_path_factory):
    path = cached_tiny_hf_model(tmp_path_factory, "llama3")
    ids, mask = _padded_batch()
    ref = np.asarray(fwd(load_model(path), ids, attention_mask=mask).logits)
    real = mask.astype(bool)
    for kw in (dict(param_dtype="bfloat16"), dict(dtype="bfloat16")):  # bf16 params+compute; fp32 params
        m = load_model(path, **kw)
        assert m.config.dtype == "bfloat16"
        leaf = m.layers.attn.q_proj.kernel[...]
        assert leaf.dtype == (jnp.bfloat16 if "param_dtype" in kw else jnp.float32)
        out = np.asarray(fwd(m, ids, attention_mask=mask).logits)
        assert out.dtype == np.float32 and np.isfinite(out).all()
        err = np.abs(out - ref)[real]
        assert err.mean() < 0.03 * np.abs(ref[real]).mean(), err.mean()
        assert (out.argmax(-1) == ref.argmax(-1))[real].mean() > 0.9
    graphdef, state = nnx.split(m)
    toks = np.asarray(_generate(graphdef, state, jnp.asarray(ids[:, :10]), jnp.asarray(mask[:, :10]), 16))
    assert toks.shape == (2, 16) and ((toks >= 0) & (toks < V)).all()


def test_config_roundtrip_and_param_tree(tmp_path_factory):
    for arch, kw in CASES.values():
        c = read_config(cached_tiny_hf_model(tmp_path_factory, arch, **kw))
        assert ModelConfig.from_hf(c.to_hf()) == c
        hash(c)
    arch, kw = CASES["qwen2_tied_bias"]
    c = read_config(cached_tiny_hf_model(tmp_path_factory, arch, **kw))
    assert c.attention_bias and not c.o_bias and c.tie_word_embeddings
    assert c.layer_windows() == (None, 6)
    c = c.replace(num_layers=3, sliding_layers=(False, True, True))
    model = nnx.eval_shape(lambda: CausalLM(c, rngs=nnx.Rngs(0)))
    params = nnx.state(model, nnx.Param)
    shapes = jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(params))
    assert "lm_head" not in shapes
    assert shapes["layers"]["attn"]["q_proj"]["kernel"] == (3, 64, 64)
    assert shapes["layers"]["attn"]["k_proj"]["bias"] == (3, 32)
    assert "bias" not in shapes["layers"]["attn"]["o_proj"]
    specs = nnx.to_pure_dict(nnx.get_partition_spec(params))
    assert tuple(specs["layers"]["mlp"]["down_proj"]["kernel"]) == ("layers", "mlp", "embed")
    assert tuple(specs["embed"]["embedding"]) == ("vocab", "embed")
    sizes = jax.tree.leaves(jax.tree.map(lambda x: x.size, nnx.to_pure_dict(params)))
    assert c.num_params() == sum(sizes)
