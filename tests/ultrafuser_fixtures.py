"""Tiny UltraFuser inputs for tests: three random specialists of one architecture saved as HF
checkpoints (plus a different-vocabulary and a different-architecture one), their tokenizer, and
prompt/response JSONL files per domain.

    fx = make_fixture(tmp_path)                  # paths
    c = fixture_config(fx, tmp_path / "runs")     # configs/ultrafuser.py:tiny pointed at them
    flags = fixture_flags(fx, out_dir)            # the same as train.py --config.* flags
"""
from __future__ import annotations

import json
from pathlib import Path

from hf_fixtures import make_tiny_tokenizer

NAMES = ("text", "code", "math")
TEMPLATES = {"text": "User: {prompt}\nA: ", "code": "[INST] {prompt} [/INST]", "math": "Q: {prompt}\nA: "}
_TEXT = {
    "text": [("the quick brown fox", "jumps over the lazy dog"), ("fusion of models", "the lazy dog sleeps")],
    "code": [("def add(a, b):", "return a + b"), ("def sub(a, b):", "return a - b")],
    "math": [("2 + 2", "= 4 #### 4"), ("3 + 4", "= 7 #### 7")],
}


def model_config(**kw):
    from fusion_jax.models import ModelConfig
    base = dict(architecture="LlamaForCausalLM", vocab_size=288, hidden_size=32, intermediate_size=64,
                num_layers=1, num_heads=2, num_kv_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2,
                pad_token_id=2)
    base.update(kw)
    return ModelConfig(**base)


def _save_model(cfg, seed: int, out: Path, tok_dir: Path) -> Path:
    from flax import nnx

    from fusion_jax import hf
    from fusion_jax.models import CausalLM
    hf.save(CausalLM(cfg, rngs=nnx.Rngs(seed)), cfg, out, source_dir=tok_dir)
    return out


def make_fixture(root: Path) -> dict:
    root = Path(root)
    tok = make_tiny_tokenizer(root / "tokenizer")
    cfg = model_config()
    fx = {"root": root, "tokenizer": tok,
          "paths": [str(_save_model(cfg, i, root / n, tok)) for i, n in enumerate(NAMES)],
          "odd_vocab": str(_save_model(model_config(vocab_size=320), 7, root / "odd_vocab", tok)),
          "odd_arch": str(_save_model(model_config(num_layers=2), 8, root / "odd_arch", tok)),
          "train": {}, "eval": {}}
    for d in NAMES:
        for split, n in (("train", 12), ("eval", 4)):
            f = root / "data" / f"{d}_{split}.jsonl"
            f.parent.mkdir(parents=True, exist_ok=True)
            rows = [{"prompt": f"{p} {i}", "response": f"{r} {i}"} for i in range(n) for p, r in _TEXT[d]][:n]
            f.write_text("".join(json.dumps(r) + "\n" for r in rows))
            fx[split][d] = str(f)
    return fx


def overrides(fx: dict, out_dir: Path) -> dict:
    """Dotted config overrides that point the ``tiny`` preset at the fixture."""
    o = {"output_dir": str(out_dir), "specialists.paths": tuple(fx["paths"]),
         "data.seq_len": 48, "data.max_prompt_len": 24, "gate_hidden": 16, "loss_chunk": 16,
         "data.mixed_eval_examples": 4}
    for n, t in TEMPLATES.items():
        o[f"specialists.templates.{n}"] = t
    for d in NAMES:
        o[f"data.train_files.{d}"] = fx["train"][d]
        o[f"data.eval_files.{d}"] = fx["eval"][d]
    return o


def fixture_config(fx: dict, out_dir: Path, **extra):
    from fusion_jax.ultrafuser.config import get_config
    c = get_config("tiny")
    for k, v in {**overrides(fx, out_dir), **extra}.items():
        node = c
        *parents, leaf = k.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = v
    return c


def fixture_flags(fx: dict, out_dir: Path, **extra) -> list[str]:
    """``train.py`` flags equal to :func:`fixture_config`."""
    flags = ["--config=configs/ultrafuser.py:tiny"]
    for k, v in {**overrides(fx, out_dir), **extra}.items():
        flags.append(f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}")
    return flags
