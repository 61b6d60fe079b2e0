"""The fused export loads in transformers (``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)``) and computes what fusion-jax computes: the same fused logits on a left-padded
batch and the same greedy tokens as our fused decoder."""
from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from fusion_jax.eval import generation as g
from fusion_jax.models import CausalLM, ModelConfig
from fusion_jax.ultrafuser.decoding import fused_decoder
from fusion_jax.ultrafuser.export import save_fused
from fusion_jax.ultrafuser.gate import GateConfig, init_gate
from fusion_jax.ultrafuser.model import FusedModel

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Qwen2ForCausalLM"])
def test_trust_remote_code_export_equals_ours(tmp_path, arch):
    cfg = ModelConfig(architecture=arch, vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2,
                      num_heads=4, num_kv_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      attention_bias=arch == "Qwen2ForCausalLM", tie_word_embeddings=arch == "Qwen2ForCausalLM")
    models = [CausalLM(cfg, rngs=nnx.Rngs(i)) for i in range(3)]
    gate = init_gate(jax.random.key(3), GateConfig(input_size=32, hidden_size=16, num_experts=3))
    gate["w2"] = jax.random.normal(jax.random.key(4), (16,))      # a real mixture, not uniform weights
    fm = FusedModel.from_models(models, ["text", "code", "math"], gate=gate, gate_hidden=16)
    out = save_fused(fm, tmp_path / "fused")

    pt = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    assert type(pt).__name__ == "UltraFuserForCausalLM" and len(pt.specialists) == 3

    rng = np.random.default_rng(0)
    lengths = [9, 5, 12]
    P = max(lengths)
    ids = np.zeros((3, P), np.int64)
    mask = np.zeros_like(ids)
    for b, n in enumerate(lengths):                     # left-padded, as generate wants
        ids[b, P - n:] = rng.integers(3, 97, size=n)
        mask[b, P - n:] = 1
    with torch.no_grad():
        ref = pt(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    ours, _ = jax.jit(fm.logits)(fm.params, fm.gate, np.stack([ids] * 3).astype(np.int32),
                                 np.stack([mask] * 3).astype(np.int32))
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[valid], ref[valid], rtol=2e-4, atol=2e-4)

    N = 8
    with torch.no_grad():
        hf_tokens = pt.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=N,
                                do_sample=False, pad_token_id=0, eos_token_id=None).numpy()[:, P:]
    dec, params = fused_decoder(fm)
    views = [[[int(t) for t in row[m.astype(bool)]]] * 3 for row, m in zip(ids, mask)]
    got = g.generate(dec, params, views, g.GenerationConfig(max_new_tokens=N, batch_size=4, chunk=4))
    assert [c[0].tokens for c in got] == hf_tokens.tolist()
