"""Inputs that used to merge silently into a wrong result, and parameter ranges: each must stop before
anything is written, through the Python API (a ``ConfigError``/``CheckpointError`` naming the parameter,
model and tensor) and through the CLI (exit 2, one ``error:`` line, no traceback, nothing at the output,
inputs untouched)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusion_jax.cli import main
from fusion_jax.errors import CheckpointError, ConfigError, FusionError
from fusion_jax.hf.safetensors_io import SafetensorsReader, save_tensors
from fusion_jax.merging import merge
from fusion_jax.merging.methods import METHODS, Param
from fusion_jax.merging.pytree import merge_pytrees
from fusion_jax.merging.testing import make_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("val")
    base, fts = make_family(root / "models", n_finetunes=2, seed=9, tokenizer=False)
    return root, base, fts


def _tree_digest(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode() + p.read_bytes())
    return h.hexdigest()


def _cli_fails(cfg, out, capsys, tmp_path, expect, *extra):
    p = tmp_path / "c.yml"
    p.write_text(yaml.safe_dump(cfg) if isinstance(cfg, dict) else cfg)
    assert main(["merge", str(p), str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for e in expect:
        assert e in lines[0], lines[0]
    return lines[0]


def _gta(method, base, fts, params, shared=None):
    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(f), "parameters": dict(p)} for f, p in zip(fts, params)]}
    if shared:
        cfg["parameters"] = shared
    return cfg


@pytest.mark.parametrize("method,params,shared,expect", [
    ("ties", [{"weight": 1, "density": -0.5}, {"weight": 1}], None, ["'density' = -0.5", "in [0, 1]"]),
    ("dare_ties", [{"weight": 1, "density": 1.5}, {"weight": 1}], None, ["'density' = 1.5"]),
    ("dare_linear", [{"weight": 1, "density": [0.5, 1.2]}, {"weight": 1}], None, ["'density'", "layers.1"]),
    ("della", [{"weight": 1, "density": 0.9, "epsilon": 0.2}, {"weight": 1}], None, ["'epsilon'", "(0, 1)"]),
    ("ties", [{"weight": ".nan", "density": 0.5}, {"weight": 1}], None, ["'weight'", "finite"]),
    ("task_arithmetic", [{"weight": 1}, {"weight": 1}], {"lambda": ".inf"}, ["'lambda'", "finite"]),
    ("breadcrumbs", [{"weight": 1, "gamma": 2}, {"weight": 1}], None, ["'gamma' = 2"]),
])
def test_parameter_ranges_by_name(fam, tmp_path, capsys, method, params, shared, expect):
    root, base, fts = fam
    cfg = _gta(method, base, fts, params, shared)
    text = yaml.safe_dump(cfg).replace("'.nan'", ".nan").replace("'.inf'", ".inf")
    line = _cli_fails(text, tmp_path / "out", capsys, tmp_path, expect)
    if "lambda" not in line:
        assert "model '" in line and "tensor '" in line  # names the model and the tensor
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError):
        merge(yaml.safe_load(text), tmp_path / "out2", quiet=True)
    assert not (tmp_path / "out2").exists()


@pytest.mark.parametrize("cfg_fn,expect", [
    (lambda b, f: {"merge_method": "slerp", "base_model": str(b), "parameters": {"t": 1.5},
                   "models": [{"model": str(b)}, {"model": str(f[0])}]}, ["'t' = 1.5", "[0, 1]"]),
    (lambda b, f: {"merge_method": "nearswap", "base_model": str(b), "parameters": {"t": -1},
                   "models": [{"model": str(b)}, {"model": str(f[0])}]}, ["'t' = -1", ">= 0"]),
    (lambda b, f: {"merge_method": "karcher", "parameters": {"max_iter": 0},
                   "models": [{"model": str(b)}, {"model": str(f[0])}]}, ["'max_iter' = 0"]),
    (lambda b, f: {"merge_method": "ramplus_tl", "base_model": str(b), "parameters": {"epsilon": 0},
                   "models": [{"model": str(f[0])}]}, ["'epsilon' = 0.0", "> 0"]),
    (lambda b, f: {"merge_method": "linear", "models": [{"model": str(b), "parameters": {"weight": 1}},
                                                        {"model": str(f[0]), "parameters": {"weight": -1}}]},
     ["sum to 0"]),
    (lambda b, f: {"merge_method": "sce", "base_model": str(b), "parameters": {"select_topk": 1.5},
                   "models": [{"model": str(f[0])}]}, ["'select_topk' = 1.5"]),
])
def test_other_methods_parameter_ranges(fam, tmp_path, capsys, cfg_fn, expect):
    root, base, fts = fam
    _cli_fails(cfg_fn(base, fts), tmp_path / "out", capsys, tmp_path, expect)
    assert not (tmp_path / "out").exists()


def test_pytree_api_validates_by_name(fam):
    root, base, fts = fam
    tree = {"w": np.zeros((4, 4), np.float32)}
    with pytest.raises(ConfigError, match="'density' = 1.5 for model 'model 0' at tensor 'w'"):
        merge_pytrees("dare_ties", [tree, tree], base=tree, weight=1.0, density=[1.5, 0.5])
    with pytest.raises(ConfigError, match="'t' = -0.1"):
        merge_pytrees("slerp", [tree], base=tree, t=-0.1)


def test_every_numeric_parameter_has_a_range():
    """A new float/int parameter without bounds must be finite at least; bounded ones are checked here."""
    for spec in METHODS.values():
        for p in spec.params:
            if p.type in (float, int):
                assert isinstance(p, Param) and p.check(float("nan")) is not None, (spec.name, p.name)
    assert METHODS["ties"].param("density").check(1.0001) and METHODS["ties"].param("density").check(0.5) is None


# -- silent wrong results (issue 14) -----------------------------------------------------------------

def _with_int_tensor(src: Path, dst: Path, values) -> Path:
    import shutil
    shutil.copytree(src, dst)
    with SafetensorsReader(dst) as r:
        tensors = {n: r.get(n) for n in r.names()}
    for f in dst.glob("*.safetensors*"):
        f.unlink()
    tensors["model.rotary_emb.position_ids"] = np.asarray(values, np.int32)
    save_tensors(dst, tensors)
    return dst


def test_integer_tensors_are_copied_when_models_agree(fam, tmp_path, capsys):
    root, base, fts = fam
    a = _with_int_tensor(base, tmp_path / "a", np.arange(8))
    b = _with_int_tensor(fts[0], tmp_path / "b", np.arange(8))
    cfg = {"merge_method": "ties", "base_model": str(a),
           "models": [{"model": str(b), "parameters": {"weight": 0.5, "density": 0.5}}]}
    merge(cfg, tmp_path / "out", quiet=True)
    with SafetensorsReader(tmp_path / "out") as r:
        ids = r.get("model.rotary_emb.position_ids")
    assert ids.dtype == np.int32 and np.array_equal(ids, np.arange(8))
    c = _with_int_tensor(fts[1], tmp_path / "c", np.arange(8)[::-1])
    cfg["models"].append({"model": str(c), "parameters": {"weight": 0.5, "density": 0.5}})
    _cli_fails(cfg, tmp_path / "out2", capsys, tmp_path, ["position_ids", "differs"])
    assert not (tmp_path / "out2").exists()


def test_output_inside_or_holding_the_inputs_is_refused(fam, tmp_path, capsys):
    root, base, fts = fam
    models = base.parent
    before = _tree_digest(models)
    cfg = {"merge_method": "linear", "models": [{"model": str(base), "parameters": {"weight": 1}},
                                                {"model": str(fts[0]), "parameters": {"weight": 1}}]}
    for out, what in ((models, "contains"), (base, "is the input"), (base / "sub", "is inside")):
        _cli_fails(cfg, out, capsys, tmp_path, [what], "--overwrite")
    link = tmp_path / "link"
    link.symlink_to(models, target_is_directory=True)
    _cli_fails(cfg, link, capsys, tmp_path, ["contains"], "--overwrite")
    assert _tree_digest(models) == before


def test_config_without_num_hidden_layers_is_an_error(fam, tmp_path, capsys):
    import shutil
    root, base, fts = fam
    broken = tmp_path / "nolayers"
    shutil.copytree(base, broken)
    c = json.loads((broken / "config.json").read_text())
    del c["num_hidden_layers"]
    (broken / "config.json").write_text(json.dumps(c))
    cfg = {"merge_method": "linear", "models": [{"model": str(broken), "parameters": {"weight": 1}},
                                                {"model": str(fts[0]), "parameters": {"weight": 1}}]}
    _cli_fails(cfg, tmp_path / "out", capsys, tmp_path, [str(broken / "config.json"), "num_hidden_layers"])
    c["num_hidden_layers"] = 1  # fewer than the tensors hold: the merge would drop a layer
    (broken / "config.json").write_text(json.dumps(c))
    _cli_fails(cfg, tmp_path / "out", capsys, tmp_path, ["num_hidden_layers = 1", "layer 1"])
    with pytest.raises(CheckpointError):
        merge(cfg, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_unreadable_config_files(fam, tmp_path, capsys):
    root, base, fts = fam
    p = tmp_path / "c.yml"
    p.write_bytes("merge_method: linear\n# \xff\n".encode("utf-16"))
    assert main(["merge", str(p), str(tmp_path / "o"), "--quiet"]) == 2
    assert "UTF-8" in capsys.readouterr().err
    weights = next(base.glob("*.safetensors"))
    assert main(["merge", str(weights), str(tmp_path / "o"), "--quiet"]) == 2
    assert "error:" in capsys.readouterr().err
    with pytest.raises(FusionError):
        merge(weights, tmp_path / "o", quiet=True)
