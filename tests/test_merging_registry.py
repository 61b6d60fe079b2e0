"""The method table against mergekit's own registry, every shipped config through both tools, and the
README's method table against the one rendered from the method table.

``test_every_mergekit_method_has_a_counterpart`` reads the registry of the installed mergekit, so when
mergekit grows a method the suite fails until fusion-jax has it (or says why not). The configs under
``configs/merges/`` run on a tiny family whose directories carry the names they use (``models/base``,
``models/chat``, ...), through ``mergekit-yaml``'s ``run_merge`` (mergekit-multi's rule for the
multi-document one) and ``fusion-jax merge``: deterministic methods element for element (up to the
documented exceptions: magnitude-cut ties, and one unit in the last place where a float32 whole-tensor
sum feeds a 16-bit rounding), random ones tensor by tensor in names, shapes and dtypes (their
statistics are compared in test_merging_examples.py).
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from fusion_jax.hf.safetensors_io import SafetensorsReader
from fusion_jax.merging import METHODS, merge
from fusion_jax.merging.methods import render_method_table
from fusion_jax.merging.testing import cut_ties, llama_config, random_weights, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "merges").glob("*.yml"))


def test_every_mergekit_method_has_a_counterpart():
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    theirs = {m.spec.name for m in registry.registered_methods()}
    ours = {m.mergekit for m in METHODS.values() if m.mergekit}
    assert theirs - ours == set(), f"mergekit methods without a fusion-jax counterpart: {sorted(theirs - ours)}"
    assert ours - theirs == set(), f"table rows naming a method mergekit does not have: {sorted(ours - theirs)}"
    for m in registry.registered_methods():  # and the parameters are the same, by name and scope
        spec = next(s for s in METHODS.values() if s.mergekit == m.spec.name)
        theirs_p = {(p.name, p.scope.value) for p in m.spec.parameters}
        ours_p = {(p.name, p.scope) for p in spec.params}
        assert theirs_p <= ours_p, f"{spec.name}: parameters {sorted(theirs_p - ours_p)} missing"


def test_readme_method_table_is_generated():
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- methods table begin -->\n(.*?)<!-- methods table end -->", readme, re.S)
    assert m, "README.md has no generated methods table (markers missing)"
    assert m.group(1) == render_method_table(), (
        "README's method table is stale: paste fusion_jax.merging.methods.render_method_table()")


# -- every config in configs/merges through both tools -----------------------------------------------

_NAMES = {"base": 0, "pivot": 0, "chat": 1, "target_a": 1, "code": 2, "target_b": 2, "math": 3, "target_c": 3}


def _family(root, layers, hidden):
    """root/models/<name> for every name the shipped configs use: a bf16 base and three fine-tunes."""
    cfg = llama_config(vocab=160, hidden=hidden, inter=48, layers=layers, heads=4, kv_heads=2)
    base = random_weights(cfg, 0)
    dirs = []
    for i in range(4):
        r = np.random.default_rng(100 + i)
        w = base if i == 0 else {k: v + 0.01 * r.standard_normal(v.shape).astype(np.float32)
                                 for k, v in base.items()}
        dirs.append(write_checkpoint(root / "family" / str(i), cfg, w, "bfloat16"))
    (root / "models").mkdir()
    for name, i in _NAMES.items():
        (root / "models" / name).symlink_to(dirs[i], target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return _family(tmp_path_factory.mktemp("cfgs"), layers=2, hidden=32)


@pytest.fixture(scope="module")
def deep_models_dir(tmp_path_factory):  # the frankenmerge's layer ranges go up to 24
    return _family(tmp_path_factory.mktemp("deep"), layers=24, hidden=16)


def _load(path):
    with SafetensorsReader(path) as r:
        return {n: r.get(n) for n in r.names()}


def _mergekit_documents(docs, out, workdir, models_dir):
    """mergekit-yaml for one document; mergekit-multi's rule for several (named outputs used by name).
    Model paths are made absolute: mergekit caches loaded models by their path string for the process."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    opts = MergeOptions(copy_tokenizer=True, write_model_card=False, quiet=True, lazy_unpickle=False)
    paths = {}
    for d in docs:
        d = dict(d)
        name = d.pop("name", None)
        text = re.sub(r"\bmodels/", f"{models_dir}/models/", yaml.safe_dump(d))
        for n, p in paths.items():
            text = re.sub(rf"(model: |base_model: ){re.escape(n)}\b", rf"\g<1>{p}", text)
        target = workdir / name if name else out
        run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), str(target), opts)
        if name:
            paths[name] = str(target)


def _assert_matches(name, cfg_path, ref, got, spec):
    assert set(ref) == set(got), f"{name}: tensor names differ"
    for n in ref:
        assert ref[n].shape == got[n].shape and ref[n].dtype == got[n].dtype, n
        if spec.random:
            continue
        r, g = ref[n].astype(np.float32), got[n].astype(np.float32)
        diff = r != g
        if not diff.any():
            continue
        if spec.sparsify in ("magnitude", "magnitude_outliers"):
            assert not (diff & ~cut_ties(cfg_path, n)).any(), f"{name}: {n} differs off the magnitude cut"
            continue
        if spec.name == "sce":  # which tied elements the selection keeps moves the weights (see
            scale = np.abs(r).max()  # test_merging_precision.py): close, not equal
            assert np.abs(r - g).max() <= 0.25 * scale and diff.mean() < 0.5, f"{name}: {n}"
            continue
        # a float32 whole-tensor sum (norm, dot, mean) feeding a 16-bit rounding: a unit, rarely
        step = np.spacing(np.abs(ref[n].astype(np.float32)).max().astype(ref[n].dtype)).astype(np.float32)
        units = 2 if spec.parity == "scale" else 1
        assert np.abs(r - g).max() <= units * step, f"{name}: {n}: more than {units} unit(s) of the tensor's scale"
        if spec.parity not in ("scale", "threshold"):
            assert diff.mean() <= 1e-2, f"{name}: {n}: {diff.mean():.2%} of the elements differ"


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_through_both_tools(path, request, tmp_path, monkeypatch):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    deep = any(s.get("layer_range", [0, 0])[1] > 2 for d in docs for sl in d.get("slices") or []
               for s in sl["sources"])
    models_dir = request.getfixturevalue("deep_models_dir" if deep else "models_dir")
    spec = METHODS[docs[-1]["merge_method"]]
    cfg_path = models_dir / path.name  # relative model paths resolve next to the YAML, as with mergekit
    cfg_path.write_text(path.read_text())
    monkeypatch.chdir(models_dir)
    merge(cfg_path, tmp_path / "fj", quiet=True)
    if any(METHODS[d["merge_method"]].mergekit is None for d in docs):
        return  # fusion-jax's own method (the paper's DARE, VaRM, FuseChat's SCE, magnitude pruning)
    pytest.importorskip("mergekit")
    _mergekit_documents(docs, tmp_path / "mk", tmp_path, models_dir)
    ref, got = _load(tmp_path / "mk"), _load(tmp_path / "fj")
    if spec.name == "linear" and "tokenizer" in docs[-1]:  # the union vocabulary: compare row by token
        import transformers
        vm = transformers.AutoTokenizer.from_pretrained(tmp_path / "mk").get_vocab()
        vf = transformers.AutoTokenizer.from_pretrained(tmp_path / "fj").get_vocab()
        assert set(vm) == set(vf)
        for n in ("model.embed_tokens.weight", "lm_head.weight"):
            assert ref[n].shape == got[n].shape
            ids_m, ids_f = [vm[t] for t in sorted(vm)], [vf[t] for t in sorted(vm)]
            np.testing.assert_array_equal(got[n][ids_f].astype(np.float32), ref[n][ids_m].astype(np.float32))
            ref.pop(n), got.pop(n)
        assert (tmp_path / "fj" / "chat_template.jinja").read_text() == (
            tmp_path / "mk" / "chat_template.jinja").read_text()
    _assert_matches(path.stem, cfg_path, ref, got, spec)
