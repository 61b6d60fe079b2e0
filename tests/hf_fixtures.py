"""Tiny random transformers checkpoints for tests (importable by every test module).

    from hf_fixtures import make_tiny_hf_model
    path = make_tiny_hf_model(tmp_path / "m", arch="qwen2", seed=0)

The torch model is built in float32 with ``torch.manual_seed(seed)``; every weight (norm scales and
biases too) is randomised so that a wrong mapping cannot hide behind ones/zeros. ``dtype="bfloat16"``
saves a bf16 checkpoint; ``max_shard_size`` forces sharded files; ``tokenizer=True`` adds a tiny
byte-level BPE tokenizer (tokenizer.json etc.); any other keyword overrides the HF config field.
"""
from __future__ import annotations

from pathlib import Path

ARCHS = {
    # Llama 2 style
    "llama": ("LlamaConfig", dict(bos_token_id=1, eos_token_id=2)),
    # Llama 3.1 style rope scaling
    "llama3": ("LlamaConfig", dict(rope_theta=500000.0, bos_token_id=1, eos_token_id=2,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 16})),
    # sliding window shorter than the test sequences
    "mistral": ("MistralConfig", dict(sliding_window=8, bos_token_id=1, eos_token_id=2)),
    # qkv bias, tied embeddings
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)),
    # MoE: softmax top-2 of 4 experts (transformers 5 holds them fused, saves them one by one)
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2)),
    # MoE with a sigmoid-gated shared expert of another width, top-k weights not renormalised
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48,
                                         shared_expert_intermediate_size=80, norm_topk_prob=False,
                                         bos_token_id=1, eos_token_id=2)),
}

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


def tiny_hf_config(arch: str = "llama", **overrides):
    import transformers
    cls_name, extra = ARCHS[arch]
    import copy
    kw = copy.deepcopy({**TINY, **extra, **overrides})
    cfg = getattr(transformers, cls_name)(**kw)
    return cfg


def make_tiny_hf_model(tmp_dir, arch: str = "llama", seed: int = 0, *, dtype: str = "float32",
                       max_shard_size: str | int | None = None, tokenizer: bool = False, **overrides) -> Path:
    """Write a tiny random ``arch`` checkpoint (save_pretrained, safetensors) to ``tmp_dir``; return it."""
    import torch
    import transformers
    path = Path(tmp_dir)
    cfg = tiny_hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.1)
    model = model.to(getattr(torch, dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, **kw)
    if tokenizer:
        make_tiny_tokenizer(path, vocab_size=cfg.vocab_size)
    return path


def make_tiny_tokenizer(path, vocab_size: int = 160) -> Path:
    """A byte-level BPE tokenizer trained on a few sentences, saved with transformers' files."""
    from fusion_jax.merging.testing import make_tokenizer
    make_tokenizer(path, vocab_size)
    return Path(path)


_CACHE: dict = {}


def cached_tiny_hf_model(tmp_path_factory, arch: str = "llama", seed: int = 0, **kw) -> Path:
    """``make_tiny_hf_model`` once per session for each (arch, seed, kw) (pass pytest's tmp_path_factory)."""
    key = (arch, seed, repr(sorted(kw.items())))
    if key not in _CACHE:
        _CACHE[key] = make_tiny_hf_model(tmp_path_factory.mktemp(f"hf-{arch}") / "model", arch, seed, **kw)
    return _CACHE[key]


def torch_reference(path):
    """transformers model (float32, eager attention, eval mode) for ``path``."""
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()
