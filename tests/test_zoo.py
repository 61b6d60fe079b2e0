"""The demo zoo's families: any tokenizer kind and architecture, cached by content hash, loadable by
transformers with our logits (what the distillation demo's teachers and student are)."""
import numpy as np
import pytest
import torch

from fusion_jax import hf
from fusion_jax.data.tokenizer import load_tokenizer
from fusion_jax.errors import ConfigError
from fusion_jax.zoo import CorpusSpec, FamilySpec, LMRun, build_family, family_key

TRAINER = {"save_every": 0, "keep_checkpoints": 1, "log_every": 1, "progress": False, "async_checkpointing": False}
CORPUS = CorpusSpec(seed=0, n_train=30, n_eval=4)


def _spec(**kw):
    base = dict(pretrain=LMRun(2, 4, 3e-3, 1), vocab_size=300, hidden_size=32, intermediate_size=48, num_layers=1,
                num_heads=2, num_kv_heads=1, seq_len=48, max_prompt_len=24)
    return FamilySpec(**(base | kw))


@pytest.mark.parametrize("arch,kind,marker", [("Qwen2ForCausalLM", "unigram", "▁"),
                                              ("MistralForCausalLM", "bpe", "Ġ")])
def test_family_of_any_architecture_and_tokenizer(tmp_path, arch, kind, marker):
    from transformers import AutoModelForCausalLM
    spec = _spec(architecture=arch, tokenizer=kind, vocab_size=420 if kind == "unigram" else 300,
                 sliding_window=16 if arch == "MistralForCausalLM" else None)
    fam = build_family(spec, CORPUS, cache_dir=tmp_path, trainer_cfg=TRAINER, log=lambda m: None)
    assert fam.root.name == family_key(spec, CORPUS)
    tok = load_tokenizer(fam.tokenizer_dir)
    pieces = tok.convert_ids_to_tokens(tok("import os and more", add_special_tokens=False)["input_ids"])
    assert any(p.startswith(marker) for p in pieces), pieces
    cfg, params = hf.load(fam.base_dir)
    assert cfg.architecture == arch and cfg.vocab_size == len(tok)
    ref = AutoModelForCausalLM.from_pretrained(fam.base_dir, dtype=torch.float32).eval()
    ids = np.asarray(tok("def f(x): return x", add_special_tokens=True)["input_ids"])[None]
    ours = np.asarray(hf.load_model(fam.base_dir)(ids).logits)
    with torch.no_grad():
        theirs = ref(torch.as_tensor(ids)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # cached: a second build returns the same directory without training
    assert build_family(spec, CORPUS, cache_dir=tmp_path, trainer_cfg=TRAINER, log=lambda m: None).root == fam.root
    assert not list(tmp_path.glob("*.work"))


def test_bad_family_specs_name_the_field():
    with pytest.raises(ConfigError, match="tokenizer 'wordpiece'"):
        _spec(tokenizer="wordpiece")
    with pytest.raises(ConfigError, match="architecture 'GPT2LMHeadModel'"):
        _spec(architecture="GPT2LMHeadModel")
    with pytest.raises(ConfigError, match="finetune"):
        _spec(specialists=(("text", "{prompt}"),))
