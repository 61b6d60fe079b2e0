"""The teacher store: codec round trips (bit-packed ids, quantized log-prob offsets), the on-disk store
(shards, manifest, memory-mapped reads), its size per token, and refusals (another computation's
directory, an incomplete store, a store made for another corpus)."""
import json

import numpy as np
import pytest

from fusion_jax.distill import store as st
from fusion_jax.errors import DataError


@pytest.mark.parametrize("vocab", [2, 300, 1024, 1025, 32000, 128256, 152064])
def test_ids_pack_round_trip(vocab):
    rng = np.random.default_rng(vocab)
    ids = rng.integers(0, vocab, (257, 10))
    ids[0] = vocab - 1
    bits = st.id_bits(vocab)
    packed = st.pack_ids(ids, bits)
    assert packed.dtype == np.uint8 and packed.shape == (257, -(-10 * bits // 8))
    np.testing.assert_array_equal(st.unpack_ids(packed, 10, bits), ids)


def _topk(rng, n, k, V, scale=3.0):
    ids = np.stack([rng.choice(V, k, replace=False) for _ in range(n)])
    lp = -np.sort(np.abs(rng.normal(size=(n, k))) * scale, axis=1).astype(np.float32) - 0.3
    return ids, lp


def test_codec_round_trip_and_precision():
    rng = np.random.default_rng(0)
    ids, lp = _topk(rng, 500, 10, 1536)
    ce = rng.uniform(0, 9, 500).astype(np.float32)
    c = st.Codec(k=10, vocab_size=1536)
    d = c.decode(c.encode(ids, lp, ce=ce))
    np.testing.assert_array_equal(d.ids, ids)
    np.testing.assert_array_equal(d.count, 10)
    gap_true, gap = lp[:, :1] - lp, d.values[:, :1] - d.values
    ok = gap_true < 254.5 * c.logit_step                                     # below saturation
    assert np.abs(gap - gap_true)[ok].max() <= c.logit_step / 2 + 1e-6      # q8: half a step
    assert (gap[~ok] >= 15.8).all()                                          # saturated: still tiny weight
    np.testing.assert_allclose(d.values[:, 0], lp[:, 0], atol=4e-3)          # top-1 log-prob in float16
    np.testing.assert_allclose(d.ce, ce, rtol=1e-3)
    f16 = st.Codec(k=10, vocab_size=1536, logit_format="f16")
    d16 = f16.decode(f16.encode(ids, lp, ce=ce))
    np.testing.assert_allclose(d16.values, lp, atol=8e-3)
    # 11-bit ids: 14 bytes; top-1 2; nine offsets 9 (q8) or 18 (f16); CE 2
    assert c.bytes_per_token == 14 + 2 + 9 + 2 and f16.bytes_per_token == 14 + 2 + 18 + 2


def test_variable_codec_sorts_valid_entries_first():
    c = st.Codec(k=4, vocab_size=50, variable=True, token_ce=False)
    ids = np.array([[7, 3, 9, 1], [0, 0, 0, 0], [5, 6, 2, 8]])
    vals = np.array([[-1.0, -0.5, -2.0, -3.0], [0, 0, 0, 0], [-0.1, -0.2, -0.3, -0.4]], np.float32)
    valid = np.array([[True, True, False, True], [False] * 4, [False, True, True, False]])
    d = c.decode(c.encode(ids, vals, valid=valid))
    np.testing.assert_array_equal(d.count, [3, 0, 2])
    np.testing.assert_array_equal(d.ids[0, :3], [3, 7, 1])
    np.testing.assert_allclose(d.values[0, :3] - d.values[0, 0], [0, -0.5, -2.5])
    np.testing.assert_array_equal(d.ids[2, :2], [6, 2])
    with pytest.raises(DataError, match="outside"):
        c.encode(np.full((1, 4), 50), np.zeros((1, 4), np.float32), valid=np.ones((1, 4), bool))


def _write_store(path, rng, lengths, k=5, V=700, R=3, fingerprints=None):
    codec = st.Codec(k=k, vocab_size=V)
    plan = {"fingerprints": fingerprints or {"corpus": "c1", "tokenizer": "t1"}, "codec": codec.to_json(),
            "n_sequences": len(lengths), "n_shards": -(-len(lengths) // R), "shard_sequences": R}
    assert st.prepare(path, plan) == []
    seqs = [_topk(rng, n, k, V) + (rng.uniform(0, 5, n).astype(np.float32),) for n in lengths]
    for s in range(plan["n_shards"]):
        part = seqs[s * R:(s + 1) * R]
        fields = codec.encode(np.concatenate([a for a, _, _ in part]), np.concatenate([b for _, b, _ in part]),
                              ce=np.concatenate([c for _, _, c in part]))
        st.write_shard(path / st.shard_name(s), fields, np.r_[0, np.cumsum([len(a) for a, _, _ in part])],
                       np.arange(len(part), dtype=np.float32) + s * R)
    st.finalize(path, plan)
    return plan, seqs


def test_store_round_trip(tmp_path):
    rng = np.random.default_rng(1)
    lengths = [4, 1, 9, 3, 7, 2, 5]
    plan, seqs = _write_store(tmp_path / "s", rng, lengths)
    s = st.Store.open(tmp_path / "s", {"fingerprints.corpus": "c1"})
    assert s.n_sequences == 7 and s.n_tokens == sum(lengths)
    np.testing.assert_array_equal(s.lengths, lengths)
    np.testing.assert_array_equal(s.seq_ce, np.arange(7))
    for i, (ids, lp, ce) in enumerate(seqs):
        d = s.sequence(i)
        np.testing.assert_array_equal(d.ids, ids)
        np.testing.assert_allclose(d.values - d.values[:, :1], lp - lp[:, :1], atol=s.codec.logit_step / 2 + 1e-6)
    b = s.padded([2, 0], 8)
    assert b["ids"].shape == (2, 8, 5)
    np.testing.assert_array_equal(b["count"][1], [5] * 4 + [0] * 4)
    np.testing.assert_array_equal(b["ids"][0], seqs[2][0][:8])
    m = json.loads((tmp_path / "s" / st.MANIFEST).read_text())
    assert m["bytes"] == sum(p.stat().st_size for p in (tmp_path / "s").glob("shard-*"))
    # the shards are memory-mapped, not read
    assert isinstance(s._shards[0]["ids"], np.memmap)


def test_store_refusals(tmp_path):
    rng = np.random.default_rng(2)
    plan, _ = _write_store(tmp_path / "s", rng, [3, 3, 3])
    with pytest.raises(DataError, match="another corpus"):
        st.Store.open(tmp_path / "s", {"fingerprints.corpus": "other"})
    other = dict(plan, fingerprints={"corpus": "c2", "tokenizer": "t1"})
    with pytest.raises(DataError, match="made for another corpus"):
        st.prepare(tmp_path / "s", other)
    with pytest.raises(DataError, match="another computation.*n_sequences"):
        st.prepare(tmp_path / "s", dict(plan, n_sequences=4))
    # an interrupted store: plan and a shard, no manifest
    st.prepare(tmp_path / "p", plan)
    with pytest.raises(DataError, match="incomplete"):
        st.Store.open(tmp_path / "p")
    (tmp_path / "f").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        st.prepare(tmp_path / "f", plan)
