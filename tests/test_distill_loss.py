"""MinCE / AvgCE and the sparse chunked distillation loss against a dense float64 NumPy reference
(the official collator + trainer written out densely: softmax over the kept top-k, scattered into a
[B, S, V] target, rewards exp(-CE), argmax / softmax over candidates, lambda * CLM + (1 - lambda) * CE)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax.distill import fusion
from fusion_jax.distill.loss import batch_target, distill_sums, make_distill_loss


def _candidates(rng, B, S, C, k, V, empty_frac=0.1):
    ids = np.stack([[[rng.choice(V, k, replace=False) for _ in range(C)] for _ in range(S)] for _ in range(B)])
    values = rng.normal(size=(B, S, C, k)).astype(np.float32) * 2
    count = rng.integers(1, k + 1, (B, S, C))
    count[rng.random((B, S, C)) < empty_frac] = 0
    ce = rng.uniform(0.5, 4.0, (B, C)).astype(np.float32)
    return ids.astype(np.int32), values, count.astype(np.int32), ce


def _dense_reference(Z, input_ids, loss_mask, fusion_mask, ids, values, count, ce, *, lam, method, T=1.0,
                     bf16_rewards=False):
    """float64 NumPy: dense [B,S,V] fused targets, the official formulas."""
    Z = Z.astype(np.float64)
    B, S, V = Z.shape
    C = ids.shape[2]
    if bf16_rewards:
        import ml_dtypes
        r = np.asarray(1.0 / np.exp(ce.astype(ml_dtypes.bfloat16).astype(np.float64)), np.float64)
        r = r.astype(ml_dtypes.bfloat16).astype(np.float64)
    else:
        r = np.exp(-ce.astype(np.float64))
    if method == "mince":
        w = np.eye(C)[np.argmax(r, axis=1)]
    else:
        w = np.exp(r) / np.exp(r).sum(1, keepdims=True)
    target = np.zeros((B, S, V))
    covered = np.zeros((B, S))
    for b in range(B):
        for s in range(S):
            wc = np.array([w[b, c] if count[b, s, c] > 0 else 0.0 for c in range(C)])
            if wc.sum() == 0:
                continue
            wc /= wc.sum()
            covered[b, s] = 1
            for c in range(C):
                n = count[b, s, c]
                if n == 0:
                    continue
                z = values[b, s, c, :n].astype(np.float64) / T
                p = np.exp(z - z.max())
                p /= p.sum()
                for i in range(n):
                    target[b, s, ids[b, s, c, i]] += wc[c] * p[i]
    logq = Z - np.log(np.exp(Z - Z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - Z.max(-1, keepdims=True)
    fm = fusion_mask * covered
    fus = -(target * logq).sum(-1)
    l_fus = (fus * fm).sum() / max(fm.sum(), 1)
    nll = -np.take_along_axis(logq[:, :-1], input_ids[:, 1:, None], -1)[..., 0]
    m = loss_mask[:, 1:]
    l_clm = (nll * m).sum() / max(m.sum(), 1)
    return lam * l_clm + (1 - lam) * l_fus, l_clm, l_fus, w


@pytest.mark.parametrize("method", ["mince", "avgce"])
@pytest.mark.parametrize("chunk", [4, 5, 64])
def test_sparse_loss_matches_dense_float64(method, chunk):
    rng = np.random.default_rng(0)
    B, S, C, k, V, D = 3, 11, 3, 5, 37, 8
    ids, values, count, ce = _candidates(rng, B, S, C, k, V)
    H = rng.normal(size=(B, S, D)).astype(np.float32)
    W = rng.normal(size=(D, V)).astype(np.float32)
    input_ids = rng.integers(0, V, (B, S)).astype(np.int32)
    loss_mask = (rng.random((B, S)) < 0.8).astype(np.int32)
    fusion_mask = (rng.random((B, S)) < 0.9).astype(np.float32)
    batch = {"t_ids": ids, "t_values": values, "t_count": count, "t_ce": ce}
    t_ids, tw, covered, w = batch_target(batch, method=method, temperature=0.7)
    sums = distill_sums(lambda p, h: h @ p, jnp.asarray(W), jnp.asarray(H), jnp.asarray(input_ids),
                        jnp.asarray(loss_mask), jnp.asarray(fusion_mask) * covered, t_ids, tw, chunk)
    from fusion_jax.distill.loss import combine
    loss, aux = combine(sums, 0.9)
    ref, l_clm, l_fus, w_ref = _dense_reference(H.astype(np.float64) @ W.astype(np.float64), input_ids, loss_mask,
                                                fusion_mask, ids, values, count, ce, lam=0.9, method=method, T=0.7)
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(float(aux["clm_loss"]), l_clm, rtol=2e-6)
    np.testing.assert_allclose(float(aux["fusion_loss"]), l_fus, rtol=2e-6)
    np.testing.assert_allclose(float(loss), ref, rtol=2e-6)


def test_gradients_match_dense_jax():
    """Gradients through the chunked, rematerialized scan equal those of the dense formula."""
    rng = np.random.default_rng(1)
    B, S, C, k, V, D = 2, 9, 2, 4, 23, 6
    ids, values, count, ce = _candidates(rng, B, S, C, k, V)
    H = jnp.asarray(rng.normal(size=(B, S, D)), jnp.float32)
    W = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
    input_ids = jnp.asarray(rng.integers(0, V, (B, S)), jnp.int32)
    lm = jnp.ones((B, S), jnp.int32)
    batch = {"t_ids": ids, "t_values": values, "t_count": count, "t_ce": ce}
    t_ids, tw, covered, _ = batch_target(batch, method="avgce")

    def sparse(W):
        from fusion_jax.distill.loss import combine
        return combine(distill_sums(lambda p, h: h @ p, W, H, input_ids, lm, covered, t_ids, tw, chunk=4), 0.5)[0]

    def dense(W):
        logq = jax.nn.log_softmax(H @ W, -1)
        tgt = jnp.zeros((B, S, V)).at[jnp.arange(B)[:, None, None], jnp.arange(S)[None, :, None], t_ids].add(tw)
        fus = (-(tgt * logq).sum(-1) * covered).sum() / covered.sum()
        clm = -jnp.take_along_axis(logq[:, :-1], input_ids[:, 1:, None], -1).mean()
        return 0.5 * clm + 0.5 * fus

    (ls, gs), (ld, gd) = (jax.jit(jax.value_and_grad(f))(W) for f in (sparse, dense))
    np.testing.assert_allclose(float(ls), float(ld), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gs), np.asarray(gd), rtol=1e-4, atol=1e-6)


def test_mince_ties_and_bf16_rewards():
    # CEs 1.0 and 1.001 are one bfloat16 value: the official bf16 rewards tie and the first candidate
    # (the ref model) wins; in float32 the second, smaller CE wins.
    ce = np.array([[1.001, 1.0]], np.float32)
    np.testing.assert_array_equal(np.asarray(fusion.candidate_weights(ce, "mince", "bfloat16")), [[1, 0]])
    np.testing.assert_array_equal(np.asarray(fusion.candidate_weights(ce, "mince")), [[0, 1]])
    w = np.asarray(fusion.candidate_weights(np.array([[0.5, 2.0]], np.float32), "avgce"))
    r = np.exp(-np.array([0.5, 2.0]))
    np.testing.assert_allclose(w[0], np.exp(r) / np.exp(r).sum(), rtol=1e-6)


def test_student_model_loss_matches_dense_reference():
    """make_distill_loss on a real CausalLM (hidden states -> chunked lm_head) against the dense
    reference computed from the model's own full logits; lambda = 1 is exactly the plain CLM loss."""
    from fusion_jax.models import CausalLM, ModelConfig
    from fusion_jax.train.losses import nnx_causal_lm_loss
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=41, hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=2, head_dim=8)
    graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(2)
    B, S, C, k = 2, 10, 2, 4
    ids, values, count, ce = _candidates(rng, B, S, C, k, cfg.vocab_size)
    am = np.ones((B, S), np.int32)
    am[1, 7:] = 0
    batch = {"input_ids": rng.integers(0, 41, (B, S)).astype(np.int32), "attention_mask": am,
             "loss_mask": am.copy(), "fusion_mask": am.astype(np.float32),
             "t_ids": ids, "t_values": values, "t_count": count * am[..., None], "t_ce": ce}
    batch["loss_mask"][:, 0] = 0
    loss, aux = jax.jit(make_distill_loss(graphdef, lam=0.9, method="mince", chunk=3))(params, batch, None)
    Z = np.asarray(jax.jit(lambda p, x, m: nnx.merge(graphdef, nnx.State(p))(x, attention_mask=m).logits)(
        params, batch["input_ids"], am))
    ref = _dense_reference(Z, batch["input_ids"], batch["loss_mask"], batch["fusion_mask"], ids, values,
                           batch["t_count"], ce, lam=0.9, method="mince")[0]
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    clm, _ = jax.jit(make_distill_loss(graphdef, lam=1.0, chunk=4))(params, batch, None)
    plain, _ = jax.jit(nnx_causal_lm_loss(graphdef))(params, batch, None)
    np.testing.assert_allclose(float(clm), float(plain), rtol=1e-6)
