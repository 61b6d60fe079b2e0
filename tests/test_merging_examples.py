"""mergekit's own example configs and 16-bit merges, and the random methods' statistics, through the same
YAML in mergekit 0.1.5 and fusion-jax on tiny models.

- ``examples/ties.yml`` and ``examples/bio-merge.yml`` (``dtype: float16``; their models replaced by a
  tiny family) and bfloat16 checkpoints merged with ``dtype: float32``: equal element for element,
  except ties at the magnitude cut (mergekit's unstable sort keeps an unspecified subset of the
  elements tied at the cut value, fusion-jax the lowest flat indices): every differing element is
  shown to be such a tie.
- ``dare_linear`` / ``dare_ties`` / ``della``: kept fraction, rescale factor and sign agreement are
  compared with those of two mergekit seeds.
"""
from __future__ import annotations

import numpy as np
import pytest
import yaml

pytest.importorskip("mergekit")

from fusion_jax.hf.safetensors_io import SafetensorsReader  # noqa: E402
from fusion_jax.merging import merge  # noqa: E402
from fusion_jax.merging.testing import cut_ties, make_family  # noqa: E402


def _mergekit(cfg: dict, out, seed=None):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    run_merge(MergeConfiguration.model_validate(cfg), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, lazy_unpickle=False,
                           random_seed=seed))


def _load(path):
    with SafetensorsReader(path) as r:
        return {n: r.get(n).astype(np.float32) for n in r.names()}


def _compare_up_to_cut_ties(cfg, tmp_path):
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    _mergekit(yaml.safe_load(path.read_text()), tmp_path / "mk")
    merge(path, tmp_path / "fj", quiet=True)
    ref, got = _load(tmp_path / "mk"), _load(tmp_path / "fj")
    assert set(ref) == set(got)
    differing = 0
    for n in ref:
        diff = got[n] != ref[n]
        if diff.any():
            ties = cut_ties(cfg, n)
            assert not (diff & ~ties).any(), f"{n}: {(diff & ~ties).sum()} differences off the magnitude cut"
            differing += int(diff.sum())
    return differing, sum(v.size for v in ref.values())


@pytest.fixture(scope="module")
def fp32_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("ex32")
    return make_family(root, n_finetunes=3, seed=11, layers=4, tokenizer=False)


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("ex16")
    return make_family(root, n_finetunes=3, seed=12, layers=3, dtype="bfloat16", tokenizer=False)


def test_mergekit_ties_example_float16(fp32_family, tmp_path):
    """examples/ties.yml: density and weight gradients, a filtered weight, int8_mask, dtype float16."""
    base, (a, b, c) = fp32_family
    cfg = {"models": [
        {"model": str(a), "parameters": {"density": [1, 0.7, 0.1], "weight": 1.0}},
        {"model": str(b), "parameters": {"density": 0.5, "weight": [0, 0.3, 0.7, 1]}},
        {"model": str(c), "parameters": {"density": 0.33, "weight": [{"filter": "mlp", "value": 0.5},
                                                                     {"value": 0}]}}],
        "merge_method": "ties", "base_model": str(base),
        "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float16"}
    differing, total = _compare_up_to_cut_ties(cfg, tmp_path)
    assert differing < total * 1e-3


def test_mergekit_bio_merge_example_float16(fp32_family, tmp_path):
    """examples/bio-merge.yml: two models, normalize false, int8_mask, dtype float16."""
    base, (a, b, _) = fp32_family
    cfg = {"models": [{"model": str(a), "parameters": {"density": 0.5, "weight": 0.5}},
                      {"model": str(b), "parameters": {"density": 0.5, "weight": 0.5}}],
           "merge_method": "ties", "base_model": str(base),
           "parameters": {"normalize": False, "int8_mask": True}, "dtype": "float16"}
    differing, total = _compare_up_to_cut_ties(cfg, tmp_path)
    assert differing < total * 1e-3


@pytest.mark.parametrize("method", ["ties", "breadcrumbs"])
def test_bf16_checkpoints_merged_in_float32(bf16_family, tmp_path, method):
    base, fts = bf16_family
    cfg = {"merge_method": method, "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(f), "parameters": {"weight": w, "density": d}}
                      for f, w, d in zip(fts, (0.5, 0.3, 0.4), (0.5, 0.8, 0.7))]}
    _compare_up_to_cut_ties(cfg, tmp_path)


# -- random methods: statistics against two mergekit seeds -------------------------------------------

def _stats(out, base, fts, weights):
    """Pooled over every element of the merged model: the fraction changed from the base, the fraction
    of changed elements whose sign agrees with the summed weighted deltas, and (single-model merges)
    the median rescale of the kept deltas."""
    o, b = _load(out), _load(base)
    f = [_load(p) for p in fts]
    changed = agree = total = 0
    scale = []
    for n in b:
        d = o[n] - b[n]
        ch = d != 0
        ref = sum(w * (x[n] - b[n]) for w, x in zip(weights, f))
        changed += ch.sum()
        agree += (np.sign(d[ch]) == np.sign(ref[ch])).sum()
        total += d.size
        if len(fts) == 1:
            delta = f[0][n] - b[n]
            ok = ch & (np.abs(delta) > 1e-4)
            scale.append(d[ok] / (weights[0] * delta[ok]))
    return changed / total, agree / max(changed, 1), (np.median(np.concatenate(scale)) if scale else 0.0), total


@pytest.mark.parametrize("method,n_models,extra", [
    ("dare_linear", 1, {}), ("dare_ties", 3, {}), ("della", 3, {"epsilon": 0.1}), ("della_linear", 1, {"epsilon": 0.1})])
def test_random_methods_statistics_match_two_mergekit_seeds(fp32_family, tmp_path, method, n_models, extra):
    base, fts = fp32_family
    fts = fts[:n_models]
    weights = [0.6, 0.3, 0.5][:n_models]
    cfg = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
           "models": [{"model": str(f), "parameters": {"weight": w, "density": 0.4, **extra}}
                      for f, w in zip(fts, weights)]}
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    mk = []
    for seed in (1, 2):
        _mergekit(yaml.safe_load(path.read_text()), tmp_path / f"mk{seed}", seed=seed)
        mk.append(_stats(tmp_path / f"mk{seed}", base, fts, weights))
    merge(path, tmp_path / "fj", quiet=True, seed=3)
    ours = _stats(tmp_path / "fj", base, fts, weights)
    n = ours[3]
    for k, label in enumerate(("changed fraction", "sign agreement", "rescale")):
        lo, hi = min(m[k] for m in mk), max(m[k] for m in mk)
        p = min(max((lo + hi) / 2, 0.05), 0.95) if k < 2 else 0.5
        sd = np.sqrt(p * (1 - p) / n)  # a binomial fraction's spread (the rescale: its relative spread)
        tol = (5 * sd + 2 * (hi - lo)) * (max(1.0, abs(hi)) if k == 2 else 1.0)
        assert lo - tol <= ours[k] <= hi + tol, f"{method} {label}: ours {ours[k]:.5f}, mergekit {lo:.5f}..{hi:.5f}"
