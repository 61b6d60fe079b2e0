"""Tiny teachers and students for the distillation tests: real tokenizers of both kinds (byte-level
BPE "Ġ", SentencePiece-style unigram "▁") trained on a few hundred demo-corpus texts, and random
decoders of several architectures saved as HF checkpoints next to their tokenizer."""
from __future__ import annotations

from pathlib import Path

TEXTS = None


def texts(n: int = 300) -> list[str]:
    global TEXTS
    if TEXTS is None:
        from fusion_jax.data.demo_corpus import build_demo_corpus
        c = build_demo_corpus(seed=0, n_train=60, n_eval=4)
        TEXTS = [e["prompt"] + "\n" + e["response"] for d in c for e in c[d]["train"]]
    return TEXTS[:n]


def make_model(out: Path, *, kind: str = "bpe", vocab: int = 300, arch: str = "LlamaForCausalLM", seed: int = 0,
               hidden: int = 16, layers: int = 1, tokenizer_dir: Path | None = None) -> Path:
    """An HF checkpoint directory with its own tokenizer (trained here unless ``tokenizer_dir``)."""
    from flax import nnx

    from fusion_jax import hf
    from fusion_jax.data.tokenizer import load_tokenizer, train_tokenizer
    from fusion_jax.models import CausalLM, ModelConfig
    out = Path(out)
    tdir = tokenizer_dir or out.parent / f"{out.name}.tok"
    if not (tdir / "tokenizer.json").is_file():
        train_tokenizer(texts(), tdir, vocab_size=vocab, kind=kind)
    tok = load_tokenizer(tdir)
    cfg = ModelConfig(architecture=arch, vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_layers=layers, num_heads=2, num_kv_heads=1, head_dim=hidden // 2,
                      attention_bias=arch == "Qwen2ForCausalLM", bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      sliding_window=8 if arch == "MistralForCausalLM" else None)
    hf.save(CausalLM(cfg, rngs=nnx.Rngs(seed)), cfg, out, source_dir=tdir, overwrite=True)
    return out


def lowercase_tokenizer(out: Path, vocab: int = 300) -> Path:
    """A byte-level BPE tokenizer that lower-cases its input (its pieces spell another text)."""
    from tokenizers import normalizers

    from fusion_jax.data.tokenizer import load_tokenizer, train_tokenizer
    tok = train_tokenizer(texts(), out, vocab_size=vocab, kind="bpe")
    tok.backend_tokenizer.normalizer = normalizers.Lowercase()
    tok.save_pretrained(str(out))
    return out if load_tokenizer(out) is not None else out


def wordpiece_tokenizer(out: Path, vocab: int = 300) -> Path:
    """A BERT-style WordPiece tokenizer: no word-start marker a distillation alignment knows."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts(), trainers.WordPieceTrainer(vocab_size=vocab, special_tokens=["[PAD]", "[UNK]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(str(out))
    return out
