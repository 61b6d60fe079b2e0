"""MoE checkpoints in Hugging Face layouts: a tiny random Mixtral and Qwen2-MoE made by transformers ->
our load -> logits equal (fp32) -> our save -> transformers reloads -> the same logits, byte-identical
tensors; transformers 5's fused expert tensors (what mergekit 0.1.5 writes) read as well; our own
FusionMoe layout (XFT router) round-trips; a missing expert is a clear error."""
from __future__ import annotations

import json

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fusion_jax.cli import main as cli_main  # noqa: E402
from fusion_jax.errors import MissingTensorError  # noqa: E402
from fusion_jax.hf import load, load_model, save  # noqa: E402
from fusion_jax.hf.safetensors_io import SafetensorsReader, save_tensors  # noqa: E402
from fusion_jax.models import ModelConfig  # noqa: E402
from fusion_jax.xft import upcycle  # noqa: E402
from hf_fixtures import cached_tiny_hf_model, torch_reference  # noqa: E402

IDS = np.random.RandomState(0).randint(3, 160, (2, 11))
TOL = 1e-4


def _tensors(path) -> dict[str, np.ndarray]:
    with SafetensorsReader(path) as r:
        return {n: r.get(n) for n in r.names()}


def _hf_logits(path) -> np.ndarray:
    with torch.no_grad():
        return torch_reference(path)(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_transformers_moe_load_logits_save_reload(arch, tmp_path_factory, tmp_path):
    src = cached_tiny_hf_model(tmp_path_factory, arch)
    ref = _hf_logits(src)
    model = load_model(src)
    assert model.config.architecture == {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}[arch]
    ours = np.asarray(jax.jit(lambda ids: model(ids).logits)(IDS))
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)
    config, params = load(src)
    out = save(params, config, tmp_path / "out")
    np.testing.assert_allclose(_hf_logits(out), ref, atol=TOL, rtol=0)
    a, b = _tensors(src), _tensors(out)
    assert sorted(a) == sorted(b)
    assert all(a[n].tobytes() == b[n].tobytes() for n in a)
    assert ModelConfig.from_hf(json.loads((out / "config.json").read_text())) == config


def test_fused_expert_layout_reads_like_the_per_expert_one(tmp_path_factory, tmp_path):
    """transformers 5 holds Mixtral's experts as mlp.experts.gate_up_proj [E, 2F, D] / down_proj
    [E, D, F] and the router as mlp.gate.weight; mergekit 0.1.5 writes exactly that to disk."""
    src = cached_tiny_hf_model(tmp_path_factory, "mixtral")
    t = _tensors(src)
    fused, E = {}, 4
    for name, arr in t.items():
        if ".block_sparse_moe.experts." in name:
            continue
        fused[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = arr
    for i in range(2):
        p = f"model.layers.{i}.block_sparse_moe.experts."
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.stack(
            [np.concatenate([t[p + f"{e}.w1.weight"], t[p + f"{e}.w3.weight"]]) for e in range(E)])
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack([t[p + f"{e}.w2.weight"] for e in range(E)])
    out = tmp_path / "fused"
    save_tensors(out, fused)
    (out / "config.json").write_bytes((src / "config.json").read_bytes())
    np.testing.assert_allclose(_hf_logits(out), _hf_logits(src), atol=1e-6)   # transformers agrees
    a, b = load(src)[1], load(out)[1]
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_fusion_moe_layout_round_trips(tmp_path_factory, tmp_path):
    """Our layout (no transformers class): config.json fields and tensor names documented in
    hf/mapping.py; XFT's router with its noise layer; byte-identical after load -> save."""
    src = cached_tiny_hf_model(tmp_path_factory, "qwen2")
    config, dense = load(src)
    mc, mp = upcycle(dense, config, experts=4, top_k=2, routing="xft", key=jax.random.key(1))
    out = save(mp, mc, tmp_path / "moe", source_dir=src)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["FusionMoeForCausalLM"] and cfg["base_architecture"] == "Qwen2ForCausalLM"
    assert (cfg["router"], cfg["num_experts"], cfg["num_experts_per_tok"], cfg["router_noise"]) == ("xft", 4, 2, True)
    names = set(_tensors(out))
    for n in ("model.layers.1.mlp.gate.gate_network.0.weight", "model.layers.1.mlp.gate.gate_network.2.weight",
              "model.layers.1.mlp.gate.weight_noise.weight", "model.layers.1.mlp.experts.3.down_proj.weight",
              "model.layers.0.self_attn.q_proj.bias"):
        assert n in names, n
    c2, p2 = load(out)
    assert c2 == mc
    for x, y in zip(jax.tree.leaves(p2), jax.tree.leaves(mp)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    again = save(p2, c2, tmp_path / "again")
    a, b = _tensors(out), _tensors(again)
    assert all(a[n].tobytes() == b[n].tobytes() for n in a) and sorted(a) == sorted(b)


def test_missing_expert_is_a_clear_error_and_exit_2(tmp_path_factory, tmp_path, capsys):
    src = cached_tiny_hf_model(tmp_path_factory, "mixtral")
    bad = tmp_path / "bad"
    t = _tensors(src)
    del t["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_tensors(bad, t)
    (bad / "config.json").write_bytes((src / "config.json").read_bytes())
    with pytest.raises(MissingTensorError, match=r"experts\.2\.w3\.weight.*MixtralForCausalLM"):
        load(bad)
    assert cli_main(["merge-back", str(bad), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "experts.2.w3.weight" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
