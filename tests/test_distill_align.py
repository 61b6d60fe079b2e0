"""Token alignment: the fast DP equals a line-by-line port of the official FuseLLM/FuseChat DTW
(random sequences with many ties, real text in trained and real tokenizers of different families);
offsets alignment; markers; edit distances against the ``editdistance`` definition."""
from __future__ import annotations

import random

import jax
import numpy as np
import pytest

from distill_fixtures import bpe_tok, load_real, prose, unigram_tok  # noqa: F401  (fixtures)
from fusion_jax.distill import (BYTE_LEVEL, SENTENCEPIECE, Alignment, align_by_offsets, align_offsets,
                                align_tokens, check_marker, check_same_text, detect_marker, dtw_path,
                                gather_aligned, piece_bytes, spelled_text, tokenize)
from fusion_jax.distill import edit_distance, reference
from fusion_jax.errors import ConfigError, DataError

G, S = BYTE_LEVEL, SENTENCEPIECE


def _random_pieces(rng, n, alphabet):
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 4))) for _ in range(n)]


@pytest.mark.parametrize("tie_break,cost", [("fusellm", "stripped"), ("fusechat2", "stripped"),
                                            ("fusechat2", "fusechat2")])
def test_dp_equals_official_port_on_random_sequences(tie_break, cost):
    # Tiny alphabets and markers inside pieces: many equal costs, so many backtrack ties.
    for seed in range(150):
        rng = random.Random(seed)
        alphabet = rng.choice(["ab", "abc", "a" + G + S, "xyzw", "a"])
        base = _random_pieces(rng, rng.randint(1, 25), alphabet)
        teacher = _random_pieces(rng, rng.randint(1, 25), alphabet)
        got = align_tokens(base, teacher, base_marker=S, teacher_marker=G, tie_break=tie_break, cost=cost)
        ref = reference.align_tokens(base, teacher, base_marker=S, teacher_marker=G, tie_break=tie_break, cost=cost)
        assert got.lists() == ref, (seed, base, teacher)


def test_the_two_tie_breaks_differ_and_dtw_path_on_integer_matrices():
    differ = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        n1, n2 = rng.integers(1, 14, size=2)
        cost = rng.integers(0, 3, size=(n1, n2)).astype(np.int32)
        per_tb = {}
        for tb in ("fusellm", "fusechat2"):
            pi, pj = dtw_path(cost, np.arange(n1), np.arange(n2), tb)
            matches, *_ = reference.dtw(range(n1), range(n2), lambda a, b: cost[a, b], tie_break=tb)
            assert list(zip(pi.tolist(), pj.tolist())) == matches, (seed, tb)
            per_tb[tb] = matches
        differ += per_tb["fusellm"] != per_tb["fusechat2"]
    assert differ > 0  # the tie-break order matters on these ties


def test_empty_and_single_sequences():
    assert align_tokens([], ["a"], base_marker=S, teacher_marker=G).lists() == []
    a = align_tokens(["a", "b"], [], base_marker=S, teacher_marker=G)
    assert a.lists() == [[], []] and a.padded(1).tolist() == [[-1], [-1]]
    assert align_tokens(["x"], ["y"], base_marker=S, teacher_marker=G).lists() == [[0]]
    assert align_tokens([""], ["", ""], base_marker=S, teacher_marker=G).lists() == [[0, 1]]


def test_alignment_forms_agree_and_gather_in_jit():
    rng = random.Random(3)
    base, teacher = _random_pieces(rng, 30, "abc"), _random_pieces(rng, 40, "abc")
    a = align_tokens(base, teacher, base_marker=S, teacher_marker=G)
    lists = a.lists()
    offsets, indices = a.csr()
    assert [indices[offsets[j]:offsets[j + 1]].tolist() for j in range(a.n_base)] == lists
    table = a.padded()
    assert table.dtype == np.int32 and table.shape == (30, a.max_count)
    assert [[t for t in row if t >= 0] for row in table.tolist()] == lists
    with pytest.raises(ConfigError, match="width"):
        a.padded(a.max_count - 1) if a.max_count > 1 else a.padded(0)
    values = np.arange(40 * 2, dtype=np.float32).reshape(40, 2)
    got = np.asarray(jax.jit(gather_aligned)(values, table))
    want = np.where((table >= 0)[..., None], values[np.maximum(table, 0)], 0)
    np.testing.assert_array_equal(got, want)


def test_edit_distances_match_editdistance():
    lev = reference.levenshtein
    rng = random.Random(0)
    for trial in range(12):
        alph = "ab" if trial % 2 else "abé日" + G
        lengths = [0, 1, 2, 5, 31, 32, 33, 63, 64, 65, 70]
        a = ["".join(rng.choice(alph) for _ in range(rng.choice(lengths) if trial % 3 == 0 else rng.randint(0, 9)))
             for _ in range(rng.randint(0, 12))]
        b = ["".join(rng.choice(alph) for _ in range(rng.choice(lengths) if trial % 3 == 1 else rng.randint(0, 9)))
             for _ in range(rng.randint(0, 12))]
        d = edit_distance.pairwise(a, b)
        assert d.shape == (len(a), len(b))
        assert d.tolist() == [[lev(x, y) for y in b] for x in a], trial
        pa = [rng.choice(a) for _ in range(20)] if a else []
        pb = [rng.choice(b) for _ in range(20)] if a and b else []
        if pa and pb:
            assert edit_distance.paired(pa, pb).tolist() == [lev(x, y) for x, y in zip(pa, pb)]
    assert edit_distance.pairwise(["kitten"], ["sitting"]).tolist() == [[3]]


def _check_real(base_tok, teacher_tok, text):
    b, t = tokenize(base_tok, text), tokenize(teacher_tok, text)
    for tb, cost in (("fusellm", "stripped"), ("fusechat2", "fusechat2")):
        got = align_tokens(b.pieces, t.pieces, base_marker=b.marker, teacher_marker=t.marker, tie_break=tb, cost=cost)
        ref = reference.align_tokens(b.pieces, t.pieces, base_marker=b.marker, teacher_marker=t.marker,
                                     tie_break=tb, cost=cost)
        assert got.lists() == ref, tb
    off = align_by_offsets(b, t)  # both spell the text (NFC, prefix spaces), so no DataError
    for j, ts in enumerate(off.lists()):  # exactly the overlapping teacher tokens (brute force)
        s, e = b.offsets[j]
        assert ts == [i for i, (x, y) in enumerate(t.offsets.tolist()) if x < e and y > s], j
    return b, t


def test_dp_equals_official_port_on_real_text_trained_tokenizers(bpe_tok, unigram_tok):
    assert detect_marker(bpe_tok) == G and detect_marker(unigram_tok) == S
    text = prose(1000, 120000) + "\nnaïve café, 日本語 — €5\ttab"
    _check_real(unigram_tok, bpe_tok, text)
    _check_real(bpe_tok, unigram_tok, text)


@pytest.mark.parametrize("base,teacher", [("llama2", "llama3"), ("qwen3", "gemma3"), ("gemma3", "llama2")])
def test_dp_equals_official_port_on_real_tokenizers(base, teacher):
    base_tok, teacher_tok = load_real(base), load_real(teacher)
    text = prose(900, 60000) + "\n\n    indented  code()\nnaïve café, 日本語 — 12345 €\ttab 𝔘"
    b, t = _check_real(base_tok, teacher_tok, text)
    assert {base: b.marker, teacher: t.marker} == {k: v for k, v in
                                                   {"llama2": S, "llama3": G, "qwen3": G, "gemma3": S}.items()
                                                   if k in (base, teacher)}


def test_offsets_alignment_overlaps_and_refuses_other_texts(bpe_tok, unigram_tok):
    text = prose(2500, 90000) + "\nnaïve café 日本語"
    b, t = tokenize(unigram_tok, text), tokenize(bpe_tok, text)
    a = align_by_offsets(b, t)
    assert isinstance(a, Alignment) and a.n_base == len(b) and a.n_teacher == len(t)
    for j, ts in enumerate(a.lists()):  # exactly the overlapping teacher tokens (brute force)
        s, e = b.offsets[j]
        want = [i for i, (ts_, te_) in enumerate(t.offsets.tolist()) if ts_ < e and te_ > s] if e > s else []
        assert ts == want, j
    assert (a.count > 0).mean() > 0.99
    dp = align_tokens(b.pieces, t.pieces, base_marker=b.marker, teacher_marker=t.marker)
    same = np.mean([x == y for x, y in zip(dp.lists(), a.lists())])
    assert 0.5 < same <= 1.0  # mostly equal, not necessarily everywhere (see the module docstring)
    other = tokenize(bpe_tok, text.replace("café", "cafe"))
    with pytest.raises(DataError, match="different texts"):
        align_by_offsets(b, other)
    with pytest.raises(DataError, match="part at character"):
        check_same_text(b.pieces, other.pieces, b.marker, other.marker)
    assert align_offsets(np.zeros((0, 2)), t.offsets).lists() == []


def test_markers_and_piece_bytes(bpe_tok, unigram_tok):
    with pytest.raises(ConfigError, match="unknown word-start marker"):
        check_marker("#")
    with pytest.raises(ConfigError, match="unknown word-start marker"):
        align_tokens(["a"], ["a"], base_marker="_", teacher_marker=G)
    with pytest.raises(ConfigError, match="tie_break"):
        align_tokens(["a"], ["a"], base_marker=S, teacher_marker=G, tie_break="dtw")
    assert piece_bytes("<0x0A>", S) == b"\n" and piece_bytes(S + "the", S) == b" the"
    assert piece_bytes("ĠcafÃ©", G) == " café".encode() and piece_bytes("Ċ", G) == b"\n"
    text = "Über naïve café\n\tx  y 日本語"
    assert spelled_text(tokenize(bpe_tok, text).pieces, G) == text
    assert spelled_text(tokenize(unigram_tok, text).pieces, S).strip(" ") == text.strip(" ")
    from tokenizers import Tokenizer, models, pre_tokenizers
    plain = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    plain.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(ConfigError, match="cannot tell its word-start marker"):
        detect_marker(plain)
