"""Small tokenizers for the demo zoo, trained with Hugging Face ``tokenizers``, in two families:

``kind="bpe"``      byte-level BPE (GPT-2 / Llama-3 / Qwen style: spaces are "Ġ", every byte is a symbol);
``kind="unigram"``  SentencePiece-style unigram (Llama-2 / Gemma style: words start with "▁", characters
                    the vocabulary lacks fall back to byte pieces ``<0x0A>`` ...).

Two families with different vocabularies are what cross-tokenizer distillation (FuseLLM) must align.

:func:`train_tokenizer` saves a transformers ``PreTrainedTokenizerFast`` directory (``tokenizer.json``,
``tokenizer_config.json`` naming that class, the chat template) that
``transformers.AutoTokenizer.from_pretrained(dir)`` loads; :func:`load_tokenizer` loads it (or any HF
tokenizer) back. The directory is written atomically. Special tokens, in this id order:

    0 <pad>         padding                     (pad_token)
    1 <s>           beginning of a sequence     (bos_token; prepended when add_special_tokens)
    2 <|im_end|>    end of a turn / sequence    (eos_token; every rendered response ends with it)
    3 <|im_start|>  opens a chat turn

The chat template is ChatML-like: ``<s><|im_start|>user\\n...<|im_end|>\\n<|im_start|>assistant\\n``;
an assistant turn ends with ``<|im_end|>`` (= eos, so generation stops there).

Byte-level BPE without normalization round-trips every string:
``decode(encode(s), skip_special_tokens=True) == s`` (unless ``s`` spells a special token itself); the
unigram family round-trips too (byte fallback), except that it drops one space at the start of a text,
as SentencePiece does.
Training is deterministic: the same texts give the same ``tokenizer.json``, byte for byte.

Command line: ``python -m fusion_jax.data.tokenizer --corpus DIR --out DIR [--vocab-size 4096]``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterable

from fusion_jax.errors import DataError
from fusion_jax.utils.atomic import atomic_directory

PAD, BOS, EOS, IM_START = "<pad>", "<s>", "<|im_end|>", "<|im_start|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, IM_START]
UNK = "<unk>"                      # the unigram family's unknown piece (after the specials)
KINDS = ("bpe", "unigram")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus_texts(corpus_dir: str | os.PathLike, splits=("train",)) -> Iterable[str]:
    """Prompt and response strings of every ``<domain>/<split>.jsonl`` under a demo corpus directory."""
    root = Path(corpus_dir)
    files = sorted(p for s in splits for p in root.glob(f"*/{s}.jsonl") if p.parent.name != "mixed")
    if not files:
        raise DataError(f"{root}: no <domain>/{'|'.join(splits)}.jsonl files to train a tokenizer on")
    for p in files:
        with open(p, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    yield row["prompt"]
                    yield row["response"]


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 4096,
                    min_frequency: int = 2, extra_texts: Iterable[str] = (), model_max_length: int = 2048,
                    kind: str = "bpe"):
    """Train a ``kind`` tokenizer (see the module docstring) on ``texts`` (+ ``extra_texts``) and save a
    transformers tokenizer directory at ``out_dir`` (replaced atomically if it exists); returns the
    ``PreTrainedTokenizerFast``.

    ``vocab_size`` includes the special tokens and the 256 byte symbols (BPE) or byte-fallback pieces
    (unigram; at most that many: a corpus too small for it gives fewer). BPE pairs seen fewer than
    ``min_frequency`` times are not merged. Both kinds train deterministically: the same texts give the
    same ``tokenizer.json``, byte for byte.
    """
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    if kind not in KINDS:
        raise DataError(f"tokenizer kind {kind!r} is unknown (known: {', '.join(KINDS)})")
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise DataError(f"vocab_size={vocab_size}: a tokenizer with byte symbols needs more than "
                        f"{256 + len(SPECIAL_TOKENS)} entries")
    texts = list(texts) + list(extra_texts)
    if not texts:
        raise DataError("train_tokenizer: no texts to train on")
    tok: Tokenizer = (_train_bpe if kind == "bpe" else _train_unigram)(texts, vocab_size, min_frequency)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    extra = {"unk_token": UNK} if kind == "unigram" else {}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START], model_max_length=model_max_length,
        clean_up_tokenization_spaces=False, padding_side="right", **extra)
    fast.chat_template = CHAT_TEMPLATE
    with atomic_directory(out_dir, overwrite=True) as tmp:
        fast.save_pretrained(str(tmp))
        # Name the class every transformers version knows (v5 writes its alias "TokenizersBackend").
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return fast


def _train_bpe(texts: list[str], vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def _train_unigram(texts: list[str], vocab_size: int, min_frequency: int):
    """SentencePiece-style: text is split at spaces, each space becoming a "▁" that starts the next piece
    (one is prepended to the first word too), a unigram model over the pieces, and the 256 ``<0xNN>``
    byte pieces for byte fallback (the Llama-2 decoder chain turns them back into bytes).

    The pieces and their scores come from SentencePiece's own trainer, single-threaded: the same texts
    give the same vocabulary, byte for byte (the ``tokenizers`` unigram trainer sums in hash-map order,
    so near-tied pieces swap ids from run to run). Identity normalization keeps every character as is."""
    import io

    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    del min_frequency  # unigram pruning is by likelihood, not pair counts
    specials = SPECIAL_TOKENS + [UNK]
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=model, model_type="unigram",
            vocab_size=vocab_size - len(SPECIAL_TOKENS), byte_fallback=True, num_threads=1,
            normalization_rule_name="identity", add_dummy_prefix=True, split_by_whitespace=True,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=False, max_sentence_length=1 << 20,
            shuffle_input_sentence=False, character_coverage=1.0, split_digits=False,
            hard_vocab_limit=False,   # a small corpus gives fewer pieces rather than an error
            unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, minloglevel=2)
    except RuntimeError as e:
        raise DataError(f"vocab_size={vocab_size}: SentencePiece cannot train a unigram tokenizer of that size "
                        f"on these texts: {e}") from None
    proto = pb.ModelProto()
    proto.ParseFromString(model.getvalue())
    normal = [(p.piece, p.score) for p in proto.pieces if p.type == pb.ModelProto.SentencePiece.NORMAL]
    # byte pieces only serve the fallback: scored far below any path of real pieces (even one through
    # unknown characters, which cost min - 10 each), so that a text spelling "<0x41>" is not read as "A"
    floor = min(score for _, score in normal) - 1000.0
    vocab = [(t, 0.0) for t in specials] + normal + [(f"<0x{b:02X}>", floor) for b in range(256)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=specials.index(UNK), byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    return tok


def train_tokenizer_from_corpus(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike,
                                vocab_size: int = 4096, templates=None):
    """Train on a demo corpus's train split (plus the specialists' template strings, so that their
    fixed words become single tokens)."""
    extra = []
    if templates:
        extra = [t.prompt.replace("{prompt}", "") for t in templates] * 50
    return train_tokenizer(corpus_texts(corpus_dir), out_dir, vocab_size, extra_texts=extra)


def load_tokenizer(path: str | os.PathLike):
    """``AutoTokenizer.from_pretrained(path)`` with a :class:`DataError` naming the path on failure."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.exists() and not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        raise DataError(f"{p}: not a tokenizer directory (no tokenizer.json / tokenizer_config.json)")
    try:
        # A tokenizer saved as a plain PreTrainedTokenizerFast (the zoo's) next to a config.json: transformers
        # 5 would pick the class of the config's model_type (Qwen2Tokenizer for a Qwen2 checkpoint), whose
        # constructor replaces the saved pre-tokenizer with its own, so load the class the files name.
        cls = AutoTokenizer
        cfg = p / "tokenizer_config.json"
        if cfg.is_file() and json.loads(cfg.read_text(encoding="utf-8")).get("tokenizer_class") == \
                "PreTrainedTokenizerFast":
            cls = PreTrainedTokenizerFast
        tok = cls.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: cannot load a tokenizer: {e}") from e
    if tok.pad_token_id is None:  # many base-model tokenizers have none; padding needs one
        tok.pad_token = tok.eos_token
    return tok


def main(argv=None) -> int:
    from fusion_jax.data.templates import DEMO_TEMPLATES

    ap = argparse.ArgumentParser(description="Train the demo zoo's byte-level BPE tokenizer.")
    ap.add_argument("--corpus", required=True, help="a demo corpus directory (write_demo_corpus)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab-size", type=int, default=4096)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    tok = train_tokenizer_from_corpus(a.corpus, a.out, a.vocab_size, templates=DEMO_TEMPLATES.values())
    print(f"trained {len(tok)} tokens in {time.perf_counter() - t0:.2f}s -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
