"""The demo zoo's tokenizers (byte-level BPE "Ġ" and SentencePiece-style unigram "▁"): lossless round
trips, deterministic training, HF loading."""
from __future__ import annotations

import inspect
import json
import textwrap

import pytest

from fusion_jax.data.tokenizer import BOS, EOS, IM_START, PAD, load_tokenizer, train_tokenizer
from fusion_jax.errors import DataError

# a little prose and the source of this test module's imports: code with indentation, quotes, unicode
TEXTS = ([textwrap.dedent(inspect.getsource(train_tokenizer)), textwrap.dedent(inspect.getsource(load_tokenizer))]
         + ["The quick brown fox jumps over the lazy dog. Über naïve café, 東京 and Ελληνικά."] * 20
         + [f"Q: what is {a} + {b}?\nA: {a + b}\n#### {a + b}" for a in range(20) for b in range(5)])

SAMPLES = [
    "",
    " ",
    "  two leading spaces and two trailing  ",
    "tabs\tand\nnewlines\r\nand a form feed\x0c and NUL \x00",
    "def f(x: int) -> int:\n    return {'a': [x ** 2, \"s\\n\"]}  # comment\n",
    "Emoji 🦙🔥👩‍👩‍👧 flags 🇫🇷, combining é (e\u0301), zero-width \u200b\u200d, RTL שלום مرحبا",
    "CJK 漢字かなカナ한국어, math ∀x∈ℝ: x²≥0, ½ ≠ 0.5",
    "\ud7ff\ue000\U0001f600\U0010fffd rare code points",
    "unseen: ǅǆǇ ꙮ 𓀀 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module", params=["bpe", "unigram"])
def tok_dir(tmp_path_factory, request):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(TEXTS, out, vocab_size=400, min_frequency=2, kind=request.param)
    return out


def test_round_trip_is_lossless(tok_dir):
    tok = load_tokenizer(tok_dir)
    unigram = tok.unk_token_id is not None
    for s in SAMPLES + TEXTS[:2]:
        ids = tok.encode(s)
        assert ids[:1] == [tok.bos_token_id]
        # SentencePiece drops one space at the very start of a text (its dummy prefix), as Llama-2's does
        want = s[1:] if unigram and s.startswith(" ") else s
        assert tok.decode(ids, skip_special_tokens=True) == want, repr(s)
        assert tok.decode(tok.encode(s, add_special_tokens=False)) == want, repr(s)
    if unigram:   # every word starts with the marker; characters outside the vocabulary fall back to bytes
        pieces = tok.convert_ids_to_tokens(tok.encode("the lazy dog 𓀀", add_special_tokens=False))
        assert pieces[0].startswith("▁") and "<0xF0>" in pieces
    # pieces learned from the corpus shorten it (not just bytes or characters)
    assert len(tok.encode(TEXTS[2], add_special_tokens=False)) < 0.6 * len(TEXTS[2].encode())


def test_training_is_deterministic(tok_dir, tmp_path):
    kind = "unigram" if load_tokenizer(tok_dir).unk_token_id is not None else "bpe"
    again = train_tokenizer(TEXTS, tmp_path / "again", vocab_size=400, min_frequency=2, kind=kind)
    assert (tmp_path / "again" / "tokenizer.json").read_bytes() == (tok_dir / "tokenizer.json").read_bytes()
    assert len(again) == 400
    # different data -> a different vocabulary (the comparison above can fail)
    other = train_tokenizer(TEXTS[2:], tmp_path / "other", vocab_size=400, min_frequency=2, kind=kind)
    assert (tmp_path / "other" / "tokenizer.json").read_bytes() != (tok_dir / "tokenizer.json").read_bytes()
    assert len(other) <= 400


def test_autotokenizer_loads_special_tokens_and_chat_template(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tok.convert_ids_to_tokens([0, 1, 2, 3]) == [PAD, BOS, EOS, IM_START]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    text = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<s><|im_start|>user\nAdd 2 and 3.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                  tokenize=True)
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    assert ids[0] == 1 and ids.count(3) == 2 and ids.count(2) == 2  # one bos, two turns, each closed by eos
    batch = tok(["a", "abc def"], padding=True)
    assert batch["input_ids"][0][-1] == 0 and batch["attention_mask"][0][-1] == 0  # right padding with <pad>


def test_errors(tmp_path):
    with pytest.raises(DataError, match="vocab_size=100"):
        train_tokenizer(TEXTS, tmp_path / "t", vocab_size=100)
    with pytest.raises(DataError, match="no texts"):
        train_tokenizer([], tmp_path / "t")
    assert not (tmp_path / "t").exists()
    (tmp_path / "notatok").mkdir()
    with pytest.raises(DataError, match="notatok: not a tokenizer directory"):
        load_tokenizer(tmp_path / "notatok")
