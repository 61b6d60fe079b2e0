"""The aligned store (a teacher's store moved to the student's positions and vocabulary, a shard at a time)
against the alignment layer applied to one sequence at a time, for FuseLLM's and FuseChat-2.0's options;
and the candidate batches (the ref model's entries where a teacher has none, as FuseLLM's collator does)."""
import numpy as np
import pytest

import distill_models as fx
from fusion_jax.data.tokenizer import load_tokenizer
from fusion_jax.distill import data as dd
from fusion_jax.distill.aligned import AlignOptions, Candidates, align_teacher, vocab_table
from fusion_jax.distill.teacher_pass import run_teacher_pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("aligned")
    t = fx.make_model(root / "teacher", kind="unigram", vocab=420, arch="Qwen2ForCausalLM", seed=2)
    s = fx.make_model(root / "student", kind="bpe", vocab=300, seed=1)
    ttok, stok = load_tokenizer(t), load_tokenizer(s)
    corpus = dd.fit(dd.Corpus(tuple({"domain": "x", "text": x} for x in fx.texts(12)), "document"), [stok, ttok], 48)
    S, T = dd.tokenize(stok, corpus), dd.tokenize(ttok, corpus)
    kw = dict(k=6, batch_per_device=4, shard_sequences=7, pad_multiple=48, progress=False, log=lambda m: None)
    tstore = run_teacher_pass(t, ttok, T, root / "tstore", fingerprints={"corpus": "c", "tokenizer": "t"}, **kw)
    rstore = run_teacher_pass(s, stok, S, root / "rstore", fingerprints={"corpus": "c", "tokenizer": "s"}, **kw)
    return root, stok, ttok, S, T, tstore, rstore


@pytest.mark.parametrize("opts", [AlignOptions(), AlignOptions("fusechat2", "fusechat2", "statistics", "next"),
                                  AlignOptions("fusellm", "fusellm", "exact", "fusellm_current")],
                         ids=["fusellm", "fusechat2", "exact"])
def test_aligned_store_equals_per_sequence_alignment(setup, opts):
    import jax

    from fusion_jax.distill import align_tokens, detect_marker, gather_targets, teacher_sources
    root, stok, ttok, S, T, tstore, _ = setup
    a = align_teacher(stok, ttok, S, T, tstore, root / f"al_{opts.rule}_{opts.vocab_map}", opts,
                      fingerprints={"corpus": "c"}, student_vocab_size=len(stok), log=lambda m: None)
    table = vocab_table(stok, ttok, S, T, opts, tstore.codec.vocab_size)
    sm, tm = detect_marker(stok), detect_marker(ttok)
    np.testing.assert_array_equal(a.seq_ce, tstore.seq_ce)
    for i in range(len(S)):
        sp, tp = stok.convert_ids_to_tokens(S.ids[i].tolist()), ttok.convert_ids_to_tokens(T.ids[i].tolist())
        al = align_tokens(sp, tp, base_marker=sm, teacher_marker=tm, tie_break=opts.tie_break)
        src = teacher_sources(al, sp, tp, S.ids[i], T.ids[i], base_marker=sm, teacher_marker=tm, rule=opts.rule,
                              table=table if opts.rule == "fusellm" and opts.vocab_map != "exact" else None,
                              fallback=opts.fallback)
        d = tstore.sequence(i)
        ids, vals = (np.asarray(x) for x in jax.jit(gather_targets)(src.source, src.onehot, d.ids, d.values, table))
        got = a.sequence(i)
        want_count = (ids >= 0).sum(1)
        np.testing.assert_array_equal(got.count, want_count)
        for j in range(len(ids)):   # the kept entries, in descending order of value
            keep = ids[j] >= 0
            if not keep.any():
                continue
            order = np.argsort(-vals[j][keep], kind="stable")
            np.testing.assert_array_equal(got.ids[j, :want_count[j]], ids[j][keep][order])
            v = vals[j][keep][order]
            np.testing.assert_allclose(got.values[j, :want_count[j]] - got.values[j, 0], v - v[0], atol=1e-6)


def test_candidates_batch_takes_the_ref_where_a_teacher_has_nothing(setup):
    root, stok, ttok, S, T, tstore, rstore = setup
    a = align_teacher(stok, ttok, S, T, tstore, root / "al_exact_own", AlignOptions(vocab_map="exact"),
                      fingerprints={"corpus": "c"}, student_vocab_size=len(stok), log=lambda m: None)
    rows = np.arange(len(S))
    raw = a.padded(rows, 48)
    ref = rstore.padded(rows, 48)
    out = Candidates([rstore, a], 48).batch_fn({"row": rows, "input_ids": np.zeros((len(rows), 48))})
    assert out["t_ids"].shape == (len(rows), 48, 2, 6) and "row" not in out
    empty = (raw["count"] == 0) & (ref["count"] > 0)
    assert empty.any()   # the exact map drops teacher pieces the student's vocabulary lacks
    np.testing.assert_array_equal(out["t_count"][..., 1][empty], ref["count"][empty])
    np.testing.assert_array_equal(out["t_ids"][..., 1, :][empty], ref["ids"][empty])
    np.testing.assert_array_equal(out["t_count"][..., 1][~empty], raw["count"][~empty])
    np.testing.assert_array_equal(out["t_ce"], np.stack([rstore.seq_ce, tstore.seq_ce], 1))
    # without a ref model the empty positions stay empty (the fusion gives their weight to the others)
    bare = Candidates([None, a], 48).arrays(rows)
    np.testing.assert_array_equal(bare["t_count"][..., 0], raw["count"])
