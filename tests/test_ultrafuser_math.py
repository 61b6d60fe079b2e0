"""Gate and fusion math against a NumPy float64 reference; chunked loss against the unchunked one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.ultrafuser import fusion
from fusion_jax.ultrafuser.gate import GateConfig, gate_weights, init_gate, load_gate, save_gate

K, B, S, D, V, H = 3, 2, 13, 8, 17, 6


def _toy(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "emb": rng.normal(size=(K, V, D)).astype(np.float32),
        "w": (rng.normal(size=(K, D, D)) / np.sqrt(D)).astype(np.float32),
        "out": (rng.normal(size=(K, D, V)) / np.sqrt(D)).astype(np.float32),
    }
    gate = {
        "w1": rng.normal(size=(D, H)).astype(np.float32),
        "b1": rng.normal(size=(H,)).astype(np.float32),
        "w2": rng.normal(size=(H,)).astype(np.float32),
        "b2": np.float32(0.3),
    }
    ids = rng.integers(0, V, size=(K, B, S)).astype(np.int32)
    labels = rng.integers(0, V, size=(B, S)).astype(np.int32)
    mask = (rng.random((B, S)) < 0.7).astype(np.float32)
    return params, gate, ids, labels, mask


def hidden_fn(p, ids, attn):
    return jnp.tanh(p["emb"][ids] @ p["w"])


def head_fn(p, h):
    return (h @ p["out"]).astype(jnp.float32)


def _reference(params, gate, ids, labels, mask):
    p = {k: v.astype(np.float64) for k, v in params.items()}
    g = {k: np.asarray(v, np.float64) for k, v in gate.items()}
    nll_sum, wsum = 0.0, np.zeros(K)
    for b in range(B):
        for s in range(S):
            hs = [np.tanh(p["emb"][k][ids[k, b, s]] @ p["w"][k]) for k in range(K)]
            scores = np.array([np.maximum(h @ g["w1"] + g["b1"], 0) @ g["w2"] + g["b2"] for h in hs])
            w = np.exp(scores - scores.max()); w /= w.sum()
            logits = sum(w[k] * (hs[k] @ p["out"][k]) for k in range(K))
            lse = np.log(np.exp(logits - logits.max()).sum()) + logits.max()
            nll_sum += mask[b, s] * (lse - logits[labels[b, s]])
            wsum += mask[b, s] * w
    return nll_sum / mask.sum(), wsum


@pytest.mark.parametrize("chunk", [0, 1, 4, 5, 13, 64])
def test_fused_loss_matches_float64_reference(chunk):
    params, gate, ids, labels, mask = _toy()
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels, "loss_mask": mask}
    loss, aux = jax.jit(lambda p, g, b: fusion.fused_loss(hidden_fn, head_fn, p, g, b, chunk=chunk))(
        params, gate, batch)
    ref_loss, ref_w = _reference(params, gate, ids, labels, mask)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(aux["gate_weight_sum"]), ref_w, rtol=2e-5, atol=1e-5)
    assert float(aux["tokens"]) == mask.sum()


def test_chunked_gradients_match_unchunked():
    params, gate, ids, labels, mask = _toy(1)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "labels": labels, "loss_mask": mask}

    def f(chunk):
        return jax.jit(jax.grad(lambda p, g: fusion.fused_loss(hidden_fn, head_fn, p, g, batch, chunk)[0],
                                argnums=(0, 1)))(params, gate)

    ga, gb = f(0), f(4)
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_gate_weights_softmax_over_experts():
    gate = init_gate(jax.random.key(0), GateConfig(input_size=D, hidden_size=H, num_experts=K))
    h = jax.random.normal(jax.random.key(1), (K, B, S, D))
    w = gate_weights(gate, h)
    assert w.shape == (K, B, S)
    np.testing.assert_allclose(np.asarray(w.sum(0)), 1.0, rtol=1e-6)
    # zero-initialised output layer: training starts from the uniform mixture
    np.testing.assert_allclose(np.asarray(w), 1.0 / K, rtol=1e-6)


def test_one_hot_gate_reproduces_specialist_logits():
    params, gate, ids, labels, mask = _toy(2)
    hidden = fusion.stacked_hidden(hidden_fn, params, ids, np.ones_like(ids))
    all_logits = fusion.stacked_logits(head_fn, params, hidden)
    for k in range(K):
        w = jax.nn.one_hot(jnp.full((B, S), k), K, axis=0)
        mixed = fusion.mix_logits(w, all_logits)
        np.testing.assert_array_equal(np.asarray(mixed), np.asarray(all_logits[k]))


def test_gate_save_load_roundtrip(tmp_path):
    cfg = GateConfig(input_size=D, hidden_size=H, num_experts=K, specialist_names=("a", "b", "c"))
    gate = init_gate(jax.random.key(3), cfg)
    gate["w2"] = jnp.arange(H, dtype=jnp.float32)
    save_gate(gate, cfg, tmp_path)
    g2, cfg2 = load_gate(tmp_path)
    assert cfg2 == cfg
    for k in gate:
        np.testing.assert_array_equal(np.asarray(gate[k]), np.asarray(g2[k]))
