"""Packing with segment ids: layout, loss masks, and a packed batch's loss equal to the unpacked one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax.data.packing import pack_rendered, pack_sequences
from fusion_jax.errors import DataError
from fusion_jax.models import CausalLM, ModelConfig
from fusion_jax.train.losses import nnx_causal_lm_loss

SEQS = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]


def test_greedy_layout():
    p = pack_sequences(SEQS, 6, pad_id=0)
    np.testing.assert_array_equal(p["input_ids"], [[5, 6, 7, 8, 9, 0], [10, 11, 12, 13, 14, 0]])
    np.testing.assert_array_equal(p["segment_ids"], [[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 2, 0]])
    np.testing.assert_array_equal(p["positions"], [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 0]])
    np.testing.assert_array_equal(p["attention_mask"], p["segment_ids"] > 0)
    # a token is a target iff its predecessor is in the same segment (never a segment's first token)
    np.testing.assert_array_equal(p["loss_mask"], [[0, 1, 1, 0, 1, 0], [0, 1, 1, 1, 0, 0]])


def test_concat_fills_rows_and_cuts():
    p = pack_sequences(SEQS, 4, mode="concat")
    np.testing.assert_array_equal(p["input_ids"], [[5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 0, 0]])
    np.testing.assert_array_equal(p["segment_ids"], [[1, 1, 1, 2], [1, 2, 2, 2], [1, 2, 0, 0]])
    assert p["loss_mask"].sum() == sum(len(s) for s in SEQS) - 6  # one start per segment piece (6 pieces)


def test_token_masks_and_pack_rendered():
    rendered = {"input_ids": np.array([[1, 2, 3, 4, 0], [1, 5, 6, 0, 0]]),
                "attention_mask": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]),
                "loss_mask": np.array([[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]])}
    p = pack_rendered(rendered, 8)
    np.testing.assert_array_equal(p["input_ids"], [[1, 2, 3, 4, 1, 5, 6, 0]])
    np.testing.assert_array_equal(p["loss_mask"], [[0, 0, 1, 1, 0, 0, 1, 0]])
    with pytest.raises(DataError, match="mode"):
        pack_sequences(SEQS, 4, mode="nope")
    with pytest.raises(DataError, match="token_masks"):
        pack_sequences(SEQS, 4, token_masks=[[1]])


def test_packed_loss_equals_unpacked_loss():
    """Segment ids keep attention inside a sequence and positions restart: the packed batch's summed
    loss equals the sum over the sequences run one by one."""
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=16, intermediate_size=32,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)
    g, st = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    params = nnx.to_pure_dict(st)
    loss_fn = jax.jit(nnx_causal_lm_loss(g))
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 32, n).tolist() for n in (5, 3, 7, 2, 6)]
    p = pack_sequences(seqs, 12, pad_id=0)
    _, aux = loss_fn(params, {k: jnp.asarray(v) for k, v in p.items()}, None)
    # the same sequences one per row, right-padded (one compile for all)
    ids = np.zeros((len(seqs), 12), np.int32)
    mask = np.zeros((len(seqs), 12), np.int32)
    for i, s in enumerate(seqs):
        ids[i, :len(s)], mask[i, :len(s)] = s, 1
    _, a = loss_fn(params, {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}, None)
    total, count = float(a["loss_sum"]), float(a["num_tokens"])
    assert float(aux["num_tokens"]) == count == sum(len(s) - 1 for s in seqs)
    np.testing.assert_allclose(float(aux["loss_sum"]), total, rtol=1e-5)
