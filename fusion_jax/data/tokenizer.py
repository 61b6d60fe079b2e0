"""A small byte-level BPE tokenizer for the demo zoo, trained with Hugging Face ``tokenizers``.

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

Byte-level without normalization means every string round-trips:
``decode(encode(s), skip_special_tokens=True) == s`` (unless ``s`` spells a special token itself).
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
                    min_frequency: int = 2, extra_texts: Iterable[str] = (), model_max_length: int = 2048):
    """Train byte-level BPE on ``texts`` (+ ``extra_texts``) and save a transformers tokenizer directory
    at ``out_dir`` (replaced atomically if it exists); returns the ``PreTrainedTokenizerFast``.

    ``vocab_size`` includes the 256 byte symbols and the 4 special tokens; pairs seen fewer than
    ``min_frequency`` times are not merged.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise DataError(f"vocab_size={vocab_size}: a byte-level tokenizer needs at least "
                        f"{256 + len(SPECIAL_TOKENS)} entries")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    texts = list(texts) + list(extra_texts)
    if not texts:
        raise DataError("train_tokenizer: no texts to train on")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        additional_special_tokens=[IM_START], model_max_length=model_max_length,
        clean_up_tokenization_spaces=False, padding_side="right")
    fast.chat_template = CHAT_TEMPLATE
    with atomic_directory(out_dir, overwrite=True) as tmp:
        fast.save_pretrained(str(tmp))
        # Name the class every transformers version knows (v5 writes its alias "TokenizersBackend").
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return fast


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
    from transformers import AutoTokenizer

    p = Path(path)
    if p.exists() and not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        raise DataError(f"{p}: not a tokenizer directory (no tokenizer.json / tokenizer_config.json)")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
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
