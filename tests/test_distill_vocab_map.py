"""Vocabulary maps against brute force (the official code's loops), sparse pair counts against the
dense count matrix, save/load with fingerprints, the top-k mapping contract under jit, and the
per-position teacher/fallback decision against ports of FuseLLM's and FuseChat-2.0's loops."""
from __future__ import annotations

import random

import jax
import numpy as np
import pytest

import hardening as H
from distill_fixtures import bpe_tok, load_real, prose, unigram_tok  # noqa: F401  (fixtures)
from fusion_jax.distill import (ONE_HOT, OWN, PairCounts, VocabMap, align_tokens, build_vocab_map, exact_map,
                                gather_targets, map_topk, mined_map, statistics_map, teacher_sources, tokenize,
                                vocab_pieces)
from fusion_jax.distill import edit_distance, reference
from fusion_jax.errors import ConfigError, DataError


def _vocab(tok):
    pieces = vocab_pieces(tok)
    index = {}
    for i, p in enumerate(pieces):
        index.setdefault(p, i)
    return pieces, index


def test_nearest_equals_brute_force():
    lev = reference.levenshtein
    for seed in range(6):
        rng = random.Random(seed)
        alph = "abcd▁" if seed % 2 else "ab"
        cands = ["".join(rng.choice(alph) for _ in range(rng.choice([rng.randint(0, 8), rng.randint(30, 40)])))
                 for _ in range(rng.randint(1, 200))]
        queries = ["".join(rng.choice(alph + "xé") for _ in range(rng.randint(0, 12 if seed % 3 else 40)))
                   for _ in range(rng.randint(1, 120))]
        dist, idx = edit_distance.nearest(queries, cands, chunk=32, block=64)
        for q, d, i in zip(queries, dist.tolist(), idx.tolist()):
            ref = min(range(len(cands)), key=lambda j: lev(q, cands[j]))  # first minimum wins
            assert (i, d) == (ref, lev(q, cands[ref])), (seed, q)
    d, i = edit_distance.nearest(["a"], [])
    assert i.tolist() == [-1]


def test_exact_and_mined_maps_equal_brute_force(bpe_tok, unigram_tok):
    for teacher, base in ((bpe_tok, unigram_tok), (unigram_tok, bpe_tok)):
        tp, tv = _vocab(teacher)
        bp, bv = _vocab(base)
        tm, bm = ("Ġ", "▁") if teacher is bpe_tok else ("▁", "Ġ")
        exact = exact_map(tp, bp, teacher_marker=tm, base_marker=bm)
        assert exact.dtype == np.int32 and exact.shape == (len(tp),)
        assert exact.tolist() == [bv.get(p.replace(tm, bm), -1) for p in tp]
        assert (exact >= 0).sum() > 100  # the two vocabularies share many pieces
        mined = mined_map(tp, bp, teacher_marker=tm, base_marker=bm)
        ref = reference.mined_map({p: i for i, p in enumerate(tp)}, {p: i for i, p in enumerate(bp)}, tm, bm)
        assert mined.tolist() == [ref[i] for i in range(len(tp))]


def _dense_counts(pairs, n_base, n_teacher):
    dense = np.zeros((n_base, n_teacher))
    for base_ids, teacher_ids, lists in pairs:
        for j, ts in enumerate(lists):
            dense[base_ids[j], [teacher_ids[t] for t in ts]] += 1  # the original's fancy-index add
    return dense


def test_pair_counts_and_statistics_map_equal_dense_reference(bpe_tok, unigram_tok, tmp_path):
    teacher, base = bpe_tok, unigram_tok
    tp, _ = _vocab(teacher)
    bp, _ = _vocab(base)
    counts = PairCounts(len(bp), len(tp))
    seen = []
    for k in range(3):
        text = prose(1200, 30000 + 5000 * k) + " naïve"
        b, t = tokenize(base, text), tokenize(teacher, text)
        a = align_tokens(b.pieces, t.pieces, base_marker="▁", teacher_marker="Ġ", tie_break="fusechat2")
        part = PairCounts(len(bp), len(tp))
        part.add(b.ids, t.ids, a)
        counts.merge(part)
        seen.append((b.ids.tolist(), t.ids.tolist(), a.lists()))
    dense = _dense_counts(seen, len(bp), len(tp))
    bi, ti, c = counts.pairs()
    assert np.array_equal(dense[bi, ti], c) and len(c) == np.count_nonzero(dense)
    counts.save(tmp_path / "counts.npz")
    again = PairCounts.load(tmp_path / "counts.npz")
    assert np.array_equal(again.keys, counts.keys) and np.array_equal(again.counts, counts.counts)
    specials = [(teacher.bos_token_id, base.bos_token_id), (teacher.eos_token_id, base.eos_token_id)]
    got = statistics_map(counts, tp, bp, teacher_marker="Ġ", base_marker="▁", base_unk_id=base.unk_token_id,
                         special_pairs=specials)
    want = reference.statistics_map(dense, tp, bp, teacher_marker="Ġ", base_marker="▁",
                                    default_id=base.unk_token_id, special_pairs=specials)
    assert got.tolist() == want
    assert (got != base.unk_token_id).sum() > (np.asarray(want) >= 0).sum() // 4
    with pytest.raises(DataError, match="outside the vocabulary"):
        PairCounts(3, 3).add([0, 5], [0], align_tokens(["a", "b"], ["a"], base_marker="▁", teacher_marker="Ġ"))


def test_vocab_map_save_load_and_fingerprints(bpe_tok, unigram_tok, tmp_path):
    m = build_vocab_map(bpe_tok, unigram_tok, "exact")
    path = m.save(tmp_path / "map")
    again = VocabMap.load(path, teacher=bpe_tok, base=unigram_tok)
    assert np.array_equal(again.table, m.table) and again.kind == "exact" and again.base_marker == "▁"
    with pytest.raises(DataError, match="another teacher tokenizer"):
        VocabMap.load(path, teacher=unigram_tok)
    with pytest.raises(DataError, match="not a vocabulary map"):
        VocabMap.load(tmp_path)
    with pytest.raises(ConfigError, match="kind"):
        build_vocab_map(bpe_tok, unigram_tok, "nearest")
    with pytest.raises(ConfigError, match="counts"):
        build_vocab_map(bpe_tok, unigram_tok, "statistics")


def _map_topk_reference(ids, logits, table):
    out_i, out_l = [], []
    for i, l in zip(ids, logits):
        t = int(table[i])
        if t >= 0 and t not in out_i:
            out_i.append(t)
            out_l.append(float(l))
    return out_i, out_l


def test_map_topk_contract_under_jit():
    rng = np.random.default_rng(0)
    table = rng.integers(-1, 12, size=50).astype(np.int32)  # many collisions and misses
    ids = rng.integers(0, 50, size=(6, 7, 10)).astype(np.int32)
    logits = -np.sort(rng.random((6, 7, 10)).astype(np.float32), axis=-1)[..., ::-1] * -1
    logits = np.sort(logits, axis=-1)[..., ::-1].copy()
    got_i, got_l = jax.jit(map_topk)(ids, logits, table)
    got_i, got_l = np.asarray(got_i), np.asarray(got_l)
    assert got_i.shape == ids.shape and got_i.dtype == np.int32
    for pos in np.ndindex(6, 7):
        want_i, want_l = _map_topk_reference(ids[pos], logits[pos], table)
        keep = got_i[pos] >= 0
        assert got_i[pos][keep].tolist() == want_i
        np.testing.assert_array_equal(got_l[pos][keep], np.asarray(want_l, np.float32))
        assert np.all(np.isneginf(got_l[pos][~keep]))


def _compact(ids, logits):
    return [([i for i in r if i >= 0], [float(x) for x, i in zip(lr, r) if i >= 0]) for r, lr in zip(ids, logits)]


def _targets_case(base_tok, teacher_tok, text, k=5, seed=0):
    b, t = tokenize(base_tok, text), tokenize(teacher_tok, text)
    rng = np.random.default_rng(seed)
    vt = len(vocab_pieces(teacher_tok))
    topk_ids = rng.integers(0, vt, size=(len(t), k)).astype(np.int32)
    topk_ids[:, 0] = np.concatenate([t.ids[1:], t.ids[-1:]])  # the teacher's own next token first
    topk_logits = np.sort(rng.normal(size=(len(t), k)).astype(np.float32), axis=1)[:, ::-1].copy()
    return b, t, topk_ids, topk_logits


@pytest.mark.parametrize("soft", [False, True])
def test_fusellm_targets_equal_official_loop(bpe_tok, unigram_tok, soft):
    base_tok, teacher_tok = unigram_tok, bpe_tok
    b, t, topk_ids, topk_logits = _targets_case(base_tok, teacher_tok, prose(700, 45000) + " naïve 日本")
    tp, tv = _vocab(teacher_tok)
    bp, bv = _vocab(base_tok)
    kind = "mined" if soft else "exact"
    table = build_vocab_map(teacher_tok, base_tok, kind).table
    mapping = {p.replace("Ġ", "▁"): bp[table[i]] for i, p in enumerate(tp)} if soft else None
    want = reference.fusellm_step_logits(b.pieces, t.pieces, b.ids, bv, tp, topk_logits.tolist(), topk_ids.tolist(),
                                         base_marker="▁", teacher_marker="Ġ",
                                         vocab_align_type="soft" if soft else "hard", mapping=mapping)
    a = align_tokens(b.pieces, t.pieces, base_marker="▁", teacher_marker="Ġ")
    src = teacher_sources(a, b.pieces, t.pieces, b.ids, t.ids, base_marker="▁", teacher_marker="Ġ",
                          rule="fusellm", table=table if soft else None, fallback="fusellm_current")
    ids, logits = jax.jit(gather_targets)(src.source, src.onehot, topk_ids, topk_logits, table)
    got = _compact(np.asarray(ids), np.asarray(logits))
    for j, ((gi, gl), (wi, wl)) in enumerate(zip(got, want)):
        if src.source[j] == ONE_HOT:  # the original stores logit 1.0 for its one-hot, we store 0.0
            assert gi == wi and len(gi) == 1, j
        else:
            assert (gi, gl) == (wi, [float(np.float32(x)) for x in wl]), j
    assert (src.source >= 0).mean() > 0.2  # teacher targets at many positions, not only fallbacks
    # The default fallback is the NEXT base token; the FuseLLM variant the current one.
    nxt = teacher_sources(a, b.pieces, t.pieces, b.ids, base_marker="▁", teacher_marker="Ġ")
    hot = np.flatnonzero(nxt.source == ONE_HOT)
    assert len(hot) and all(nxt.onehot[j] == b.ids[min(j + 1, len(b) - 1)] for j in hot)


def test_fusechat2_targets_equal_official_loop(bpe_tok, unigram_tok):
    base_tok, teacher_tok = bpe_tok, unigram_tok  # pivot byte-level, source SentencePiece
    text = prose(900, 70000) + "\n\n  naïve café 日本語 12345"
    b, t, topk_ids, topk_logits = _targets_case(base_tok, teacher_tok, text, seed=1)
    tp, _ = _vocab(teacher_tok)
    bp, bv = _vocab(base_tok)
    counts = PairCounts(len(bp), len(tp))
    counts.add(b.ids, t.ids, align_tokens(b.pieces, t.pieces, base_marker="Ġ", teacher_marker="▁",
                                          tie_break="fusechat2"))
    m = build_vocab_map(teacher_tok, base_tok, "statistics", counts=counts)
    # The official loop consults blending_to_base only for pieces the pivot lacks: the same table.
    want = reference.fusechat2_step_logits(b.pieces, t.pieces, bv, bp, tp, topk_logits.tolist(), topk_ids.tolist(),
                                           m.table.tolist(), base_marker="Ġ", teacher_marker="▁")
    a = align_tokens(b.pieces, t.pieces, base_marker="Ġ", teacher_marker="▁", tie_break="fusechat2",
                     cost="fusechat2")
    src = teacher_sources(a, b.pieces, t.pieces, b.ids, base_marker="Ġ", teacher_marker="▁", rule="fusechat2")
    ids, logits = jax.jit(gather_targets)(src.source, src.onehot, topk_ids, topk_logits, m.table)
    got = _compact(np.asarray(ids), np.asarray(logits))
    for j, ((gi, gl), (wi, wl)) in enumerate(zip(got, want)):
        if src.source[j] == ONE_HOT:
            assert gi == wi and len(gi) == 1, j
        elif src.source[j] == OWN:
            assert gi == wi == [], j
        else:
            assert (gi, gl) == (wi, [float(np.float32(x)) for x in wl]), j
    assert (a.count > 1).any()  # the one-to-many branch was exercised


def test_real_mined_map_sample_equals_brute_force():
    teacher, base = load_real("llama3"), load_real("llama2")
    tp, bp = vocab_pieces(teacher), vocab_pieces(base)
    bset = set(bp)
    rng = random.Random(0)
    ids = rng.sample([i for i, p in enumerate(tp) if p.replace("Ġ", "▁") not in bset], 40)
    sub = [tp[i] for i in ids]
    got = mined_map(sub, bp, teacher_marker="Ġ", base_marker="▁")
    lev = reference.levenshtein
    for p, g in zip(sub, got.tolist()):
        q = p.replace("Ġ", "▁")
        assert g == min(range(len(bp)), key=lambda j: lev(q, bp[j])), p


VOCAB_MAP_DAMAGES = ([("manifest", how) for how in ("truncate", "garble", "list")]
                     + [("field", k) for k in ("kind", "teacher_vocab_size", "base_vocab_size", "teacher_marker")]
                     + [("table", how) for how in ("truncate", "garble", "delete", "out-of-range", "float")])


@pytest.mark.parametrize("part,how", VOCAB_MAP_DAMAGES, ids=lambda x: str(x))
def test_damaged_vocab_map_and_pair_counts_are_named_errors(part, how, bpe_tok, unigram_tok, tmp_path):
    """A saved map or pair-count file damaged any way: a DataError naming the file, never a traceback
    of numpy or zipfile, never a table with ids outside the base vocabulary."""
    import json

    path = build_vocab_map(bpe_tok, unigram_tok, "exact").save(tmp_path / "map")
    man, tab = path / "manifest.json", path / "table.npz"
    if part == "manifest":
        if how == "list":
            man.write_text("[1, 2]")
        else:
            H.damage_file(man, "truncate", man.stat().st_size // 2) if how == "truncate" else H.garble(man, 2, 8)
    elif part == "field":
        doc = json.loads(man.read_text())
        doc[how] = [how]
        man.write_text(json.dumps(doc))
    elif how in ("out-of-range", "float"):
        t = np.load(tab)["table"]
        bad = t.astype(np.float32) if how == "float" else np.where(np.arange(len(t)) == 3, 10**6, t)
        np.savez(tab, table=bad)
    elif how == "delete":
        tab.unlink()
    else:
        H.damage_file(tab, "truncate", tab.stat().st_size // 2) if how == "truncate" else \
            H.garble(tab, tab.stat().st_size // 2, 16)
    with pytest.raises(DataError, match=str(path)):
        VocabMap.load(path)

    counts = PairCounts(10, 10)
    counts.save(tmp_path / "counts.npz")
    f = tmp_path / "counts.npz"
    H.damage_file(f, "truncate", f.stat().st_size // 2)
    with pytest.raises(DataError, match="counts.npz"):
        PairCounts.load(f)
