"""Deterministic methods agree with mergekit 0.1.5 through the same YAML file (tiny Llamas): float32
within float32 rounding (torch sums in its own order), and the methods mergekit 0.1.5 added (arcee_fusion,
multislerp, karcher, nearswap, ram, ramplus_tl) also through ``dtype: bfloat16``, element for element
(karcher: to one unit of the tensor's scale, see test_merging_precision.py; arcee_fusion: but for elements
at its data-dependent threshold)."""
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
        # mergekit's examples/arcee_fusion.yml with its two models replaced
        "arcee_fusion": {"models": [{"model": b}, {"model": f0}], "merge_method": "arcee_fusion", "base_model": b,
                         "dtype": "bfloat16"},
        "multislerp": {"merge_method": "multislerp", "base_model": b,
                       "models": three({"weight": 0.5}, {"weight": [0.2, 0.6]}, {"weight": 0.3})},
        "multislerp_nobase": {"merge_method": "multislerp", "parameters": {"normalize_weights": False},
                              "models": three({"weight": 0.4}, {"weight": 0.3}, {"weight": 0.3})},
        "karcher": {"merge_method": "karcher", "models": [{"model": b}, {"model": f0}, {"model": f1}],
                    "parameters": {"max_iter": 20}},
        "nearswap": {"merge_method": "nearswap", "base_model": b, "models": [{"model": b}, {"model": f0}],
                     "parameters": {"t": [0.001, 0.02]}},
        "ram": {"merge_method": "ram", "base_model": b, "models": [{"model": f0}, {"model": f1}, {"model": f2}],
                "parameters": {"epsilon": 0.005}},
        "ramplus_tl": {"merge_method": "ramplus_tl", "base_model": b, "models": [{"model": f0}, {"model": f1}],
                       "parameters": {"epsilon": 0.008, "r": 0.5, "alpha": 0.4}},
    }


NEW_METHODS = ["arcee_fusion", "multislerp", "multislerp_nobase", "karcher", "nearswap", "ram", "ramplus_tl"]


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "ties_count_nonorm", "breadcrumbs",
                                  "breadcrumbs_ties", "slerp", "model_stock", "nuslerp", "sce",
                                  "slices_passthrough", *NEW_METHODS])
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
        if name == "arcee_fusion":  # softmax/log's float32 last bits (XLA's vs torch's) can move an element
            assert (got[n] != ref[n]).mean() < 2e-3, n  # whose importance is at the outlier threshold
        elif cfg.get("dtype") == "bfloat16":
            np.testing.assert_array_equal(got[n], ref[n], err_msg=f"{name}: {n}")
        elif name == "karcher":  # the Karcher iteration amplifies float32 summation-order differences
            np.testing.assert_allclose(got[n], ref[n], rtol=0, atol=2e-6 * np.abs(ref[n]).max(), err_msg=n)
        else:
            np.testing.assert_allclose(got[n], ref[n], rtol=2e-6, atol=2e-6, err_msg=f"{name}: {n}")


@pytest.mark.parametrize("name", ["multislerp", "nearswap", "ram", "ramplus_tl"])
def test_new_methods_match_mergekit_in_bfloat16(family, tmp_path, name):
    root, base, fts = family
    cfg = dict(_configs(base, fts)[name], dtype="bfloat16")
    _mergekit(cfg, tmp_path / "mk")
    merge(cfg, tmp_path / "fj", quiet=True)
    ref, got = _load(tmp_path / "mk"), _load(tmp_path / "fj")
    for n in ref:
        np.testing.assert_array_equal(got[n], ref[n].astype(np.float32), err_msg=f"{name}: {n}")
