"""Tiny random Llama checkpoints for tests, the notebook and the benchmark (NumPy only, no torch).

``make_family(root, n_finetunes=3)`` writes ``root/base`` and ``root/ft{i}`` (= base + N(0, delta_std)
deltas, as a fine-tune's are small), each a Hugging Face directory that transformers loads.
"""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np

from fusion_jax.hf.safetensors_io import save_tensors

_DT = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def llama_config(vocab=160, hidden=64, inter=112, layers=2, heads=4, kv_heads=2, dtype="float32", tie=False):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
            "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "tie_word_embeddings": tie, "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": dtype,
            "attention_bias": False, "mlp_bias": False}


def llama_shapes(cfg) -> dict[str, tuple[int, ...]]:
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    out = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out.update({p + "input_layernorm.weight": (d,), p + "self_attn.q_proj.weight": (d, d),
                    p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.v_proj.weight": (kv, d),
                    p + "self_attn.o_proj.weight": (d, d), p + "post_attention_layernorm.weight": (d,),
                    p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                    p + "mlp.down_proj.weight": (d, f)})
    out["model.norm.weight"] = (d,)
    if not cfg.get("tie_word_embeddings"):
        out["lm_head.weight"] = (v, d)
    return out


def random_weights(cfg, seed=0, std=0.05) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for n, s in llama_shapes(cfg).items():
        if n.endswith("norm.weight"):
            out[n] = (1.0 + 0.1 * rng.standard_normal(s)).astype(np.float32)
        else:
            out[n] = (std * rng.standard_normal(s)).astype(np.float32)
    return out


def make_tokenizer(path, vocab_size=160, extra_words=()):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["the quick brown fox jumps over the lazy dog", "fusion of language models in jax",
            "def add(a, b): return a + b", "2 + 2 = 4", *extra_words] * 20
    tok.train_from_iterator(text, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")
    fast.save_pretrained(str(path))
    return fast


def write_checkpoint(path, cfg, tensors, dtype="float32", tokenizer=True, max_shard_size="5GB",
                     tokenizer_words=()):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = dict(cfg, torch_dtype=dtype)
    save_tensors(path, {k: np.asarray(v).astype(_DT[dtype]) for k, v in tensors.items()}, max_shard_size)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    if tokenizer:
        make_tokenizer(path, cfg["vocab_size"], tokenizer_words)
    return path


def make_family(root, n_finetunes=3, seed=0, dtype="float32", delta_std=0.01, tokenizer=True,
                max_shard_size="5GB", **cfg_kw):
    """Write a base and ``n_finetunes`` fine-tunes (base + small random deltas). Returns (base, [fts])."""
    root = Path(root)
    cfg = llama_config(dtype=dtype, **cfg_kw)
    base = random_weights(cfg, seed)
    bp = write_checkpoint(root / "base", cfg, base, dtype, tokenizer, max_shard_size)
    fts = []
    for i in range(n_finetunes):
        r = np.random.default_rng(seed * 1000 + i + 1)
        t = {k: v + delta_std * r.standard_normal(v.shape).astype(np.float32) for k, v in base.items()}
        fts.append(write_checkpoint(root / f"ft{i}", cfg, t, dtype, tokenizer, max_shard_size))
    return bp, fts


def cut_ties(config, tensor: str) -> np.ndarray:
    """Boolean mask of the elements of output ``tensor`` where some input's |delta| equals the value
    at its magnitude cut (TIES / magnitude top-k, Breadcrumbs' two cuts, SCE's variance selection) in
    the merge's arithmetic:
    the only elements where mergekit's unstable sort may keep a different subset than fusion-jax's
    lowest-index rule (see :mod:`fusion_jax.merging.select`). ``config``: a merge YAML path or dict."""
    import jax.numpy as jnp

    from fusion_jax.merging import load_config, plan_merge
    from fusion_jax.merging.precision import rounder
    from fusion_jax.merging.task_vectors import magnitude_k, outlier_window
    plan = plan_merge(load_config(config))
    try:
        job = next(j for j in plan.jobs if j.name == tensor)
        arrays = [plan.models[m].reader.get(n).astype(np.float32) for m, n in job.inputs]
    finally:
        for m in plan.models:
            m.reader.close()
    out = np.zeros(job.shape, bool)
    R = rounder(job.dtype)
    if plan.config.spec.name == "sce" and job.shared.get("select_topk", 1.0) < 1:  # the variance selection
        b = R(jnp.asarray(arrays[job.base_pos]))
        tvs = [R(R(jnp.asarray(x)) - b) for i, x in enumerate(arrays) if i != job.base_pos]
        mean = sum(tvs[1:], tvs[0]) / len(tvs)
        var = np.abs(np.asarray(R(sum(((t - mean) ** 2 for t in tvs[1:]), (tvs[0] - mean) ** 2) / len(tvs))))
        k = int(np.float32(np.count_nonzero(var)) * np.float32(job.shared["select_topk"]))
        return var == np.sort(var.reshape(-1))[::-1][k - 1] if k > 0 else out
    if job.base_pos is None or plan.config.spec.sparsify not in ("magnitude", "magnitude_outliers"):
        return out
    b = R(jnp.asarray(arrays[job.base_pos]))
    for i, x in enumerate(arrays):
        if i == job.base_pos or job.per_input[i].get("density", 1.0) >= 1:
            continue
        d = np.abs(np.asarray(R(R(jnp.asarray(x)) - b)))
        desc = np.sort(d.reshape(-1))[::-1]
        dens = job.per_input[i]["density"]
        if plan.config.spec.sparsify == "magnitude_outliers":
            bot, tgt = outlier_window(dens, job.per_input[i].get("gamma", 0.01), d.size)
            pos = [d.size - 1 - p for p in (bot - 1, bot, bot + tgt - 1, bot + tgt)]
        else:
            pos = [magnitude_k(dens, d.size) - 1]
        for p in pos:
            if 0 <= p < d.size:
                out |= d == desc[p]
    return out
