"""The streaming executor end to end: determinism, chunking, vocabularies, CLI errors."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusion_jax.cli import main
from fusion_jax.errors import ConfigError, ShapeMismatchError
from fusion_jax.hf.safetensors_io import SafetensorsReader
from fusion_jax.merging import execute, load_config, merge, plan_merge
from fusion_jax.hf.files import TOKENIZER_FILES
from fusion_jax.merging.testing import llama_config, make_family, random_weights, write_checkpoint


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("exfam")
    base, fts = make_family(root, 3, seed=1, dtype="bfloat16", max_shard_size="40KB")  # sharded inputs
    return root, base, fts


def _dare_cfg(base, fts, method="dare_ties"):
    return {"merge_method": method, "base_model": str(base),
            "models": [{"model": str(f), "parameters": {"weight": w, "density": d}}
                       for f, w, d in zip(fts, (0.5, 0.3, 0.2), (0.3, 0.5, 0.7))]}


def _digest(path: Path) -> str:
    with SafetensorsReader(path) as r:
        h = hashlib.sha256()
        for n in sorted(r.names()):
            h.update(n.encode() + r.get(n).tobytes())
    return h.hexdigest()


def test_dare_same_seed_same_bytes_any_order_any_chunking(fam, tmp_path):
    root, base, fts = fam
    cfg = _dare_cfg(base, fts)
    merge(cfg, tmp_path / "a", seed=5, quiet=True)
    plan = plan_merge(load_config(cfg), seed=5)
    plan.jobs.reverse()
    execute(plan, tmp_path / "b", quiet=True, workers=1, memory_budget=1000)  # chunked reads, other order
    merge(cfg, tmp_path / "c", seed=6, quiet=True)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_output_loads_in_transformers(fam, tmp_path):
    transformers = pytest.importorskip("transformers")
    root, base, fts = fam
    merge(_dare_cfg(base, fts), tmp_path / "o", quiet=True, out_shard_size="100KB")
    out = tmp_path / "o"
    assert (out / "model.safetensors.index.json").is_file()
    m = transformers.AutoModelForCausalLM.from_pretrained(out)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert m.config.vocab_size == 160 and tok("fox")["input_ids"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_executor_matches_in_memory_api(fam, tmp_path):
    from fusion_jax.merging import merge_tensors
    root, base, fts = fam
    cfg = _dare_cfg(base, fts, "dare_linear_exact")
    merge(cfg, tmp_path / "o", seed=3, quiet=True, memory_budget=1)
    maps = []
    for p in [*fts, base]:
        with SafetensorsReader(p) as r:
            maps.append({n: r.get(n) for n in r.names()})
    got = merge_tensors("dare_linear_exact", maps, base_index=3, seed=3,
                        per_input=[{"weight": w, "density": d} for w, d in zip((0.5, 0.3, 0.2), (0.3, 0.5, 0.7))]
                        + [{}])
    with SafetensorsReader(tmp_path / "o") as r:
        for n in r.names():
            np.testing.assert_allclose(r.get(n).astype(np.float32), got[n], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("source", ["base", "union"])
def test_vocab_mismatch_permutes_rows(tmp_path, source):
    cfg_a = llama_config(vocab=300)
    wa = random_weights(cfg_a, 0)
    a = write_checkpoint(tmp_path / "a", cfg_a, wa)
    cfg_b = llama_config(vocab=330)
    wb = random_weights(cfg_b, 1)
    b = write_checkpoint(tmp_path / "b", cfg_b, wb, tokenizer_words=("zebra xylophone quokka",) * 3)
    cfg = {"merge_method": "linear", "tokenizer_source": source,
           "models": [{"model": str(a), "parameters": {"weight": 1.0}},
                      {"model": str(b), "parameters": {"weight": 1.0}}], "base_model": str(a)}
    # without tokenizer_source: a clear shape error naming the embedding, and no output directory
    with pytest.raises(ShapeMismatchError, match="embed_tokens"):
        merge({k: v for k, v in cfg.items() if k != "tokenizer_source"}, tmp_path / "x", quiet=True)
    assert not (tmp_path / "x").exists()
    merge(cfg, tmp_path / "o", quiet=True)
    import transformers
    ta = transformers.AutoTokenizer.from_pretrained(a).get_vocab()
    tb = transformers.AutoTokenizer.from_pretrained(b).get_vocab()
    to = transformers.AutoTokenizer.from_pretrained(tmp_path / "o").get_vocab()
    with SafetensorsReader(tmp_path / "o") as r:
        emb = r.get("model.embed_tokens.weight")
    assert emb.shape[0] == json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == len(to)
    ea, eb = wa["model.embed_tokens.weight"], wb["model.embed_tokens.weight"]
    for tok, i in list(to.items())[:400]:
        if tok in ta and tok in tb:
            np.testing.assert_allclose(emb[i], (ea[ta[tok]] + eb[tb[tok]]) / 2, atol=1e-6)
        elif tok in ta:  # only the base has it: both inputs use the base's row
            np.testing.assert_allclose(emb[i], ea[ta[tok]], atol=1e-6)
        elif tok in tb:
            np.testing.assert_allclose(emb[i], eb[tb[tok]], atol=1e-6)
    if source == "union":
        assert set(tb) <= set(to)


def _cli(args):
    return main([str(a) for a in args])


def test_bad_inputs_exit_2_and_leave_nothing(fam, tmp_path, capsys):
    root, base, fts = fam
    out = tmp_path / "out"

    def run(cfg, expect):
        p = tmp_path / "c.yml"
        p.write_text(yaml.safe_dump(cfg))
        assert _cli(["merge", p, out, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert expect in err, err
        assert not out.exists()
        assert not [q for q in tmp_path.iterdir() if q.name.startswith(".out")]

    good = _dare_cfg(base, fts)
    run({**good, "merge_metod": "x"}, "unknown key 'merge_metod'")
    run({**good, "merge_method": "frobnicate"}, "unknown merge method 'frobnicate'")
    run({**good, "parameters": {"densty": 0.5}}, "unknown parameter 'densty'")
    run({k: v for k, v in good.items() if k != "base_model"}, "needs a base_model")
    # different architecture
    other = tmp_path / "mistral"
    cfg = llama_config()
    cfg["architectures"] = ["MistralForCausalLM"]
    write_checkpoint(other, cfg, random_weights(llama_config(), 0), tokenizer=False)
    run({**good, "models": good["models"][:2] + [{"model": str(other), "parameters": {"weight": 1}}]},
        "different architectures")
    # missing tensor
    w = random_weights(llama_config(), 0)
    del w["model.layers.1.mlp.up_proj.weight"]
    write_checkpoint(tmp_path / "missing", llama_config(), w, tokenizer=False)
    run({**good, "models": good["models"][:2] + [{"model": str(tmp_path / "missing"), "parameters": {"weight": 1}}]},
        "no tensor 'model.layers.1.mlp.up_proj.weight'")
    # mismatched shapes
    write_checkpoint(tmp_path / "wide", llama_config(inter=128), random_weights(llama_config(inter=128), 0),
                     tokenizer=False)
    run({**good, "models": good["models"][:2] + [{"model": str(tmp_path / "wide"), "parameters": {"weight": 1}}]},
        "mismatched shapes")
    # unwritable output
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(good))
    try:
        import os
        if os.geteuid() != 0:
            assert _cli(["merge", p, ro / "sub" / "out", "--quiet"]) == 2
        (tmp_path / "file").write_text("x")
        assert _cli(["merge", p, tmp_path / "file" / "out", "--quiet"]) == 2
        assert "cannot write output directory" in capsys.readouterr().err
    finally:
        ro.chmod(0o700)


def test_dare_cli(fam, tmp_path):
    root, base, fts = fam
    assert _cli(["dare", base, fts[0], tmp_path / "d", "--drop", "0.9", "--quiet", "--seed", "1"]) == 0
    with SafetensorsReader(base) as rb, SafetensorsReader(fts[0]) as rf, SafetensorsReader(tmp_path / "d") as ro:
        n = "model.layers.0.mlp.up_proj.weight"
        b, f, o = (r.get(n).astype(np.float32) for r in (rb, rf, ro))
        changed = np.abs(o - b) > 1e-6
        assert 0.05 < changed.mean() < 0.15
        assert _cli(["dare", base, fts[0], tmp_path / "d", "--drop", "1.5"]) == 2


def test_finetune_without_tokenizer_shares_the_base_tokenizer(tmp_path):
    """mergekit's rule: a fine-tune saved without tokenizer files is taken to use the base's vocabulary."""
    base, fts = make_family(tmp_path, n_finetunes=1, seed=4)
    for f in TOKENIZER_FILES:
        (fts[0] / f).unlink(missing_ok=True)
    cfg = {"merge_method": "linear", "tokenizer_source": "base", "base_model": str(base),
           "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                      {"model": str(fts[0]), "parameters": {"weight": 0.5}}]}
    with pytest.warns(UserWarning, match="no tokenizer files"):
        merge(cfg, tmp_path / "o", quiet=True)
    assert (tmp_path / "o" / "tokenizer.json").is_file()
    merge({k: v for k, v in cfg.items() if k != "tokenizer_source"}, tmp_path / "p", quiet=True)
    with SafetensorsReader(tmp_path / "o") as a, SafetensorsReader(tmp_path / "p") as b:
        for n in a.names():
            assert a.get(n).tobytes() == b.get(n).tobytes(), n


def test_bad_sizes_and_parameter_values_are_config_errors(tmp_path):
    base, fts = make_family(tmp_path, n_finetunes=1, seed=6)
    cfg = {"merge_method": "della", "base_model": str(base),
           "models": [{"model": str(fts[0]), "parameters": {"weight": 1.0, "density": 0.95, "epsilon": 0.15}}]}
    with pytest.raises(ConfigError, match="--out-shard-size"):
        merge(cfg, tmp_path / "a", out_shard_size="5 gigs", quiet=True)
    # density + epsilon > 1: refused naming the tensor, and nothing is left at the output path
    with pytest.raises(ConfigError, match="tensor '"):
        merge(cfg, tmp_path / "b", quiet=True)
    assert not (tmp_path / "b").exists()


def test_directory_without_index_reads_model_safetensors_only(tmp_path):
    """Like transformers: an index-less directory means model.safetensors, whatever else lies beside it
    (Mistral's consolidated.safetensors, an adapter_model.safetensors)."""
    from safetensors.numpy import save_file
    base, fts = make_family(tmp_path, n_finetunes=1, seed=7)
    save_file({"layers.0.attention.wq.weight": np.zeros((4, 4), np.float32)},
              str(base / "consolidated.safetensors"))
    with SafetensorsReader(base) as r:
        names = set(r.names())
    assert "layers.0.attention.wq.weight" not in names
    merge({"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 0.5}},
                                               {"model": str(fts[0]), "parameters": {"weight": 0.5}}]},
          tmp_path / "o", quiet=True)
    with SafetensorsReader(tmp_path / "o") as r:
        assert set(r.names()) == names


def test_frankenmerge_rebuilds_per_layer_config_lists(tmp_path):
    base, fts = make_family(tmp_path, n_finetunes=1, seed=8, layers=3)
    for d in (base, fts[0]):
        c = json.loads((d / "config.json").read_text())
        c["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
        (d / "config.json").write_text(json.dumps(c))
    merge({"merge_method": "passthrough", "slices": [{"sources": [{"model": str(base), "layer_range": [0, 2]}]},
                                                     {"sources": [{"model": str(fts[0]), "layer_range": [1, 3]}]}]},
          tmp_path / "o", quiet=True)
    out = json.loads((tmp_path / "o" / "config.json").read_text())
    assert out["num_hidden_layers"] == 4
    assert out["layer_types"] == ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]


def test_chunk_offsets_wrap_like_the_numpy_hash():
    """A chunk starting at or past 2**32 elements gets its index mod 2**32 (as ``rng.bits_np``), not an
    OverflowError."""
    from fusion_jax.merging import rng
    from fusion_jax.merging.executor import _index32
    assert _index32(5) == 5 and _index32((1 << 32) + 5) == 5 and _index32(1 << 32) == 0
    np.testing.assert_array_equal(rng.bits_np(4, 9, (1 << 32) + 5), rng.bits_np(4, 9, 5))
