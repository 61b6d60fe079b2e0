"""Deterministic methods agree with mergekit 0.1.5 through the same YAML file (float32 tiny Llamas)."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

mergekit = pytest.importorskip("mergekit")

from fusion_jax.hf.safetensors_io import SafetensorsReader  # noqa: E402
from fusion_jax.merging import merge  # noqa: E402
from fusion_jax.merging.testing import make_family  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("mkfam")
    base, fts = make_family(root, n_finetunes=3, seed=3, layers=3)
    return root, base, fts


def _mergekit(cfg: dict, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False))


def _load(path):
    with SafetensorsReader(path) as r:
        return {n: r.get(n).astype(np.float32) for n in r.names()}


def _configs(base, fts):
    b, f0, f1, f2 = str(base), str(fts[0]), str(fts[1]), str(fts[2])
    three = lambda p0, p1, p2: [{"model": f0, "parameters": p0}, {"model": f1, "parameters": p1},  # noqa: E731
                                {"model": f2, "parameters": p2}]
    return {
        "linear": {"merge_method": "linear", "models": three({"weight": 0.5}, {"weight": [0.1, 0.9]},
                                                             {"weight": [{"filter": "mlp", "value": 2.0},
                                                                         {"value": 1.0}]})},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b,
                            "models": three({"weight": 0.7}, {"weight": 0.3}, {"weight": -0.2}),
                            "parameters": {"lambda": 0.9}},
        "ties": {"merge_method": "ties", "base_model": b,
                 "models": three({"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": [0.2, 0.8]},
                                 {"weight": 0.4, "density": 0.7})},
        "ties_count_nonorm": {"merge_method": "ties", "base_model": b, "parameters": {"normalize": False},
                              "models": three({"weight": 1.0, "density": 0.3}, {"weight": 1.0, "density": 0.3},
                                              {"weight": 1.0, "density": 0.3})},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b,
                        "models": three({"weight": 0.5, "density": 0.8, "gamma": 0.05},
                                        {"weight": 0.5, "density": 0.9}, {"weight": 0.3, "density": 0.7})},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b,
                             "models": three({"weight": 0.5, "density": 0.8}, {"weight": 0.5, "density": 0.9},
                                             {"weight": 0.3, "density": 0.7})},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": f0}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 0.5, 1.0]}, {"value": 0.3}]}},
        "model_stock": {"merge_method": "model_stock", "base_model": b,
                        "models": [{"model": f0}, {"model": f1}, {"model": f2}]},
        "nuslerp": {"merge_method": "nuslerp", "base_model": b,
                    "models": [{"model": f0, "parameters": {"weight": 0.3}},
                               {"model": f1, "parameters": {"weight": 0.7}}]},
        "sce": {"merge_method": "sce", "base_model": b, "parameters": {"select_topk": 1.0},
                "models": [{"model": f0}, {"model": f1}, {"model": f2}]},
        "slices_passthrough": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": f0, "layer_range": [0, 2]}]},
            {"sources": [{"model": f1, "layer_range": [1, 3]}]}]},
    }


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "ties_count_nonorm", "breadcrumbs",
                                  "breadcrumbs_ties", "slerp", "model_stock", "nuslerp", "sce",
                                  "slices_passthrough"])
def test_matches_mergekit(family, tmp_path, name):
    root, base, fts = family
    cfg = _configs(base, fts)[name]
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    _mergekit(yaml.safe_load(path.read_text()), tmp_path / "mk")
    merge(path, tmp_path / "fj", quiet=True)
    ref, got = _load(tmp_path / "mk"), _load(tmp_path / "fj")
    assert set(ref) == set(got)
    for n in ref:
        assert ref[n].shape == got[n].shape, n
        np.testing.assert_allclose(got[n], ref[n], rtol=2e-6, atol=2e-6, err_msg=f"{name}: {n}")
