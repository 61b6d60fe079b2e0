"""``fusion-jax moe CONFIG.yml OUT`` against ``mergekit-moe`` 0.1.5 on the same YAML and tiny Llamas:
the same output config and tensors, router weights as mergekit computes them (hidden states through the
base model: bf16 rounding apart; cheap_embed: exact), Qwen2-MoE with a shared expert, and transformers
runs our output with our logits. Bad YAML is a clear error, exit 2, nothing written."""
from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
import yaml

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")

from fusion_jax.cli import main as cli_main  # noqa: E402
from fusion_jax.hf import load, load_model  # noqa: E402
from fusion_jax.hf.safetensors_io import SafetensorsReader  # noqa: E402
from fusion_jax.merging.testing import make_family  # noqa: E402
from fusion_jax.xft.moe_yaml import build_moe  # noqa: E402
from hf_fixtures import torch_reference  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("moefam")
    base, fts = make_family(root, n_finetunes=3, seed=1, delta_std=0.05, vocab=320)
    return root, base, fts


def _yaml(base, fts, **kw) -> dict:
    return {"base_model": str(base), "gate_mode": "hidden", "dtype": "float32", "experts_per_token": 2,
            "experts": [
                {"source_model": str(fts[0]), "positive_prompts": ["def add(a, b): return a + b", "fusion in jax"]},
                {"source_model": str(fts[1]), "positive_prompts": ["the quick brown fox"],
                 "negative_prompts": ["2 + 2 = 4"]},
                {"source_model": str(fts[2]), "positive_prompts": ["2 + 2 = 4", "lazy dog"]}], **kw}


def _mergekit_moe(cfg: dict, out):
    from mergekit.merge import MergeOptions
    from mergekit.moe.config import MoEMergeConfig
    from mergekit.scripts.moe import build
    build(MoEMergeConfig.model_validate(cfg), str(out), MergeOptions(device="cpu", quiet=True), device="cpu")


def _tensors(path):
    with SafetensorsReader(path) as r:
        return {n: r.get(n) for n in r.names()}


def _both(family, tmp_path, cfg):
    root, _, _ = family
    (tmp_path / "moe.yml").write_text(yaml.safe_dump(cfg))
    _mergekit_moe(cfg, tmp_path / "mk")
    ours = build_moe(tmp_path / "moe.yml", tmp_path / "ours")
    return load(tmp_path / "mk"), load(ours), ours


def _same_but_gates(mk, ours, gate_paths, atol):
    (c1, p1), (c2, p2) = mk, ours
    assert dataclasses.replace(c1, extra_hf=None) == dataclasses.replace(c2, extra_hf=None)
    flat1 = dict(jax.tree_util.tree_leaves_with_path(p1))
    flat2 = dict(jax.tree_util.tree_leaves_with_path(p2))
    assert flat1.keys() == flat2.keys()
    for k in flat1:
        a, b = np.asarray(flat1[k]), np.asarray(flat2[k])
        if any(g in jax.tree_util.keystr(k) for g in gate_paths):
            np.testing.assert_allclose(b, a, atol=atol, rtol=0, err_msg=jax.tree_util.keystr(k))
            cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)   # per layer, per expert
            assert cos.min() > 1 - 1e-4, cos
        else:
            np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(k))


def _transformers_agrees(path):
    ids = np.random.RandomState(0).randint(3, 300, (2, 9))
    with torch.no_grad():
        ref = torch_reference(path)(torch.tensor(ids)).logits.numpy()
    model = load_model(path)
    np.testing.assert_allclose(np.asarray(model(ids).logits), ref, atol=1e-4, rtol=0)


def test_hidden_gates_and_mixtral_output_match_mergekit(family, tmp_path):
    mk, ours, path = _both(family, tmp_path, _yaml(family[1], family[2]))
    assert ours[0].architecture == "MixtralForCausalLM"
    # mergekit runs the base model in bfloat16: its gate vectors carry bf16 rounding (~2^-8 relative)
    _same_but_gates(mk, ours, ["'router'"], atol=1e-2)
    _transformers_agrees(path)
    assert (path / "tokenizer.json").is_file()


def test_cheap_embed_qwen2_moe_with_a_shared_expert_matches_mergekit(family, tmp_path):
    _, base, fts = family
    cfg = _yaml(base, fts, gate_mode="cheap_embed", architecture="qwen",
                shared_experts=[{"source_model": str(base), "positive_prompts": ["anything at all"]}])
    mk, ours, path = _both(family, tmp_path, cfg)
    c = ours[0]
    assert c.architecture == "Qwen2MoeForCausalLM" and c.shared_expert_intermediate_size == c.intermediate_size
    _same_but_gates(mk, ours, ["'router'", "'shared_expert_gate'"], atol=1e-6)
    assert not np.asarray(ours[1]["layers"]["attn"]["q_proj"]["bias"]).any()   # a Llama base: zero q/k/v bias
    _transformers_agrees(path)


def test_random_gates_are_seeded(family, tmp_path):
    _, base, fts = family
    (tmp_path / "r.yml").write_text(yaml.safe_dump(_yaml(base, fts, gate_mode="random")))
    gates = []
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        build_moe(tmp_path / "r.yml", tmp_path / name, seed=seed)
        gates.append(_tensors(tmp_path / name)["model.layers.1.block_sparse_moe.gate.weight"])
    np.testing.assert_array_equal(gates[0], gates[1])
    assert not np.array_equal(gates[0], gates[2]) and gates[0].shape == (3, 64)
    assert 0.8 < gates[0].std() < 1.2        # N(0, 1) as mergekit's torch.randn


@pytest.mark.parametrize("case,match", [
    ("unknown_key", "gate: unknown option"),
    ("no_prompts", "experts[1].positive_prompts"),
    ("same_prompts", "same prompts"),
    ("all_same_model", "every expert is the same model"),
    ("bad_mode", "gate_mode: 'hidden_avg'"),
    ("too_few", "experts_per_token=4"),
    ("missing_model", "experts[2].source_model"),
    ("mixtral_shared", "architecture: mixtral has no shared experts"),
    ("bad_dtype", "dtype: 'float8'"),
])
def test_bad_yaml_is_a_clear_error_exit_2_nothing_written(family, tmp_path, case, match, capsys):
    _, base, fts = family
    cfg = _yaml(base, fts)
    if case == "unknown_key":
        cfg["gate"] = "x"
    elif case == "no_prompts":
        del cfg["experts"][1]["positive_prompts"]
    elif case == "same_prompts":
        for e in cfg["experts"]:
            e["positive_prompts"], e["negative_prompts"] = ["same"], []
    elif case == "all_same_model":
        for e in cfg["experts"]:
            e["source_model"] = str(fts[0])
    elif case == "bad_mode":
        cfg["gate_mode"] = "hidden_avg"
    elif case == "too_few":
        cfg["experts_per_token"] = 4
    elif case == "missing_model":
        cfg["experts"][2]["source_model"] = str(tmp_path / "nope")
    elif case == "mixtral_shared":
        cfg.update(architecture="mixtral", shared_experts=[{"source_model": str(base), "positive_prompts": ["x"]}])
    elif case == "bad_dtype":
        cfg["dtype"] = "float8"
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["moe", str(tmp_path / "c.yml"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and match in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_all_same_model_is_allowed_on_request(family, tmp_path):
    _, base, fts = family
    cfg = _yaml(base, fts, gate_mode="cheap_embed")
    for e in cfg["experts"]:
        e["source_model"] = str(fts[0])
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    assert cli_main(["moe", str(tmp_path / "c.yml"), str(tmp_path / "out"), "--allow-all-same"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_local_experts"] == 3
