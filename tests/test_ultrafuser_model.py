"""The fused model on real CausalLM specialists: a one-hot gate reproduces specialist k exactly."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax.errors import ConfigError
from fusion_jax.models import CausalLM, ModelConfig, generate
from fusion_jax.ultrafuser.model import FusedModel

D = 16
CFG = ModelConfig(architecture="LlamaForCausalLM", vocab_size=61, hidden_size=D, intermediate_size=32,
                  num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)


def _specialists(k_hot=None, scale=10.0):
    models = [CausalLM(CFG, rngs=nnx.Rngs(i)) for i in range(3)]
    if k_hot is not None:
        # specialist k_hot's final norm is 10x: its hidden states have 10x the norm of the others'
        m = models[k_hot]
        m.final_norm.scale[...] = m.final_norm.scale[...] * scale
    return models


def _one_hot_gate():
    """score(h) = 100 * ||h||_1: with the norms above, the softmax is exactly one-hot in float32."""
    eye = jnp.eye(D, dtype=jnp.float32)
    return {"w1": jnp.concatenate([eye, -eye], axis=1), "b1": jnp.zeros((2 * D,)),
            "w2": jnp.full((2 * D,), 100.0), "b2": jnp.zeros(())}


def _batch(rng, B=2, S=9, left_pad=(0, 3)):
    ids = rng.integers(1, CFG.vocab_size, size=(B, S)).astype(np.int32)
    mask = np.ones((B, S), np.int32)
    for b, p in enumerate(left_pad):
        mask[b, :p] = 0
        ids[b, :p] = 0
    return ids, mask


@pytest.mark.parametrize("k", [0, 2])
def test_one_hot_gate_equals_specialist(k):
    models = _specialists(k)
    fm = FusedModel.from_models(models, ["a", "b", "c"], gate=_one_hot_gate())
    ids, mask = _batch(np.random.default_rng(0))
    K = 3
    ids3, mask3 = np.stack([ids] * K), np.stack([mask] * K)
    fused, w = jax.jit(fm.logits)(fm.params, fm.gate, ids3, mask3)
    valid = mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(w)[k][valid], 1.0)
    ref = models[k](jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    np.testing.assert_allclose(np.asarray(fused)[valid], np.asarray(ref)[valid], rtol=1e-5, atol=1e-5)

    # chunked loss on every real token == the specialist's own CE
    labels = np.roll(ids, -1, axis=1)
    lmask = valid.astype(np.float32)
    lmask[:, -1] = 0
    batch = {"input_ids": ids3, "attention_mask": mask3, "labels": labels, "loss_mask": lmask}
    loss, _ = jax.jit(lambda p, g: fm.loss(p, g, batch, chunk=4))(fm.params, fm.gate)
    lp = jax.nn.log_softmax(ref, -1)
    ce = -np.take_along_axis(np.asarray(lp), labels[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(loss), (ce * lmask).sum() / lmask.sum(), rtol=1e-5)

    # greedy decoding with per-specialist KV caches == the specialist's own generate
    from fusion_jax.eval.generation import GenerationConfig
    from fusion_jax.eval.generation import generate as engine_generate
    from fusion_jax.ultrafuser.decoding import fused_decoder
    dec, params = fused_decoder(fm)
    views = [[[int(t) for t in row[m.astype(bool)]]] * K for row, m in zip(ids, mask)]
    toks = [o[0].tokens for o in engine_generate(dec, params, views, GenerationConfig(max_new_tokens=6))]
    ref_toks = generate(models[k], ids, mask, max_new_tokens=6)
    assert toks == np.asarray(ref_toks).tolist()


def test_incompatible_specialists_rejected():
    other = CausalLM(CFG.replace(vocab_size=CFG.vocab_size + 1), rngs=nnx.Rngs(5))
    with pytest.raises(ConfigError, match="vocabularies"):
        FusedModel.from_models(_specialists()[:2] + [other], ["a", "b", "c"])
    other = CausalLM(CFG.replace(num_layers=3), rngs=nnx.Rngs(5))
    with pytest.raises(ConfigError, match="architectures.*num_layers"):
        FusedModel.from_models(_specialists()[:2] + [other], ["a", "b", "c"])
