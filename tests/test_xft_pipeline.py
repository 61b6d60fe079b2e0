"""XFT end to end: the smoke preset (demo zoo -> upcycle -> MoE SFT -> alpha training -> export -> dense
baseline -> eval -> report) on one device (run by colab/xft_tpu.ipynb: see xft_fixtures) and on 8 simulated
devices (experts split over the mesh's ``expert`` axis, ``python train.py``) gives the same report; the
exported dense model gives in transformers the logits it gives here, and the held-out loss the report states
for it; during alpha training only alpha changes; bad config options are errors naming the option, exit 2,
nothing written."""
from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.train.cli import main as train_main
from fusion_jax.xft.config import get_config
from xft_fixtures import MESH8, smoke_runs

REPO = Path(__file__).resolve().parents[1]
MODELS = {"base", "dense_sft", "moe", "xft", "xft_fixed"}
DOMAINS = ["text", "code", "math"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke preset on one device (run by the notebook) and on 8 simulated devices (xft_fixtures)."""
    runs = smoke_runs(tmp_path_factory)
    c = get_config("smoke")
    c.zoo.cache_dir = str(runs["zoo"])
    return dict(runs, config=c)


def test_smoke_report_schema_and_files(smoke):
    out = smoke["out1"]
    report = json.loads((out / "report.json").read_text())
    assert set(report) == {"eval_loss", "expert_load", "experts", "router", "alpha", "steps", "domains"}
    assert 0 < report["router"]["agreement_last"] <= 1 and report["router"]["agreement_random"] == 5 / 7
    assert all(len(v) == 1 and v[0] > 0 for v in report["experts"].values())
    assert set(report["eval_loss"]) == MODELS
    for m in MODELS:
        assert set(report["eval_loss"][m]) == set(DOMAINS) | {"mean"}
        assert all(isinstance(v, float) and 0 < v < 20 for v in report["eval_loss"][m].values())
    assert report["steps"] == {"moe_sft": 4, "merge": 2, "dense_sft": 6}
    for d in DOMAINS:   # [layers][routed experts], each row the share of the routed assignments
        load = np.asarray(report["expert_load"][d])
        assert load.shape == (1, 7) and np.allclose(load.sum(1), 1) and load.max() <= 1 / 5 + 1e-9
    soft = np.asarray(report["alpha"]["softmax"])
    coef = np.asarray(report["alpha"]["coefficients"])
    assert soft.shape == (1, 7) and np.allclose(soft.sum(1), 1)
    np.testing.assert_allclose(coef, np.concatenate([[[0.75]], 0.25 * soft], 1), rtol=1e-6)
    np.testing.assert_allclose(soft, jax.nn.softmax(np.load(out / "alpha.npy"), -1), rtol=1e-6)
    for f in ("report.md", "run.json", "loss_curves.png", "expert_load.png", "router.png", "alpha.png", "eval_loss.png",
              "merged/config.json", "merged/model.safetensors", "merged/tokenizer.json"):
        assert (out / f).is_file(), f
    assert json.loads((out / "merged" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    # the training stages logged the balance loss apart from the CE, and the held-out curve
    rows = [json.loads(x) for x in (out / "work" / "moe_sft" / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert any("balance_loss" in r and "ce" in r and "router_agreement" in r for r in rows)
    assert any("eval/text" in r for r in rows)
    assert "checks: xft_beats_dense_sft=" in smoke["log8"]


def test_exported_dense_model_matches_transformers_and_the_report(smoke):
    torch = pytest.importorskip("torch")
    from flax import nnx

    from fusion_jax import hf
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.eval.loss import lm_loss, make_lm_eval
    from fusion_jax.models import CausalLM
    from fusion_jax.sharding import make_mesh
    from fusion_jax.xft.config import zoo_specs
    from fusion_jax.xft.pipeline import render_sets
    from fusion_jax.zoo import build_family
    from hf_fixtures import torch_reference
    merged = smoke["out1"] / "merged"
    config, params = hf.load(merged)
    ids = np.random.RandomState(0).randint(3, config.vocab_size, (2, 12))
    model = CausalLM(config, rngs=nnx.Rngs(0))
    nnx.update(model, nnx.State(params))
    ours = np.asarray(model(jnp.asarray(ids)).logits)
    with torch.no_grad():
        theirs = torch_reference(merged)(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    # the exported file is the model the report evaluated as "xft"
    c = smoke["config"]
    family = build_family(*zoo_specs(c), cache_dir=str(smoke["zoo"]), trainer_cfg=c.trainer, log=lambda _: None)
    tok = load_tokenizer(merged)
    corpus = family.corpus()
    sets = render_sets(tok, {d: corpus[d]["eval"][:16] for d in DOMAINS}, dict(c.data.templates), 64, 32)
    ev = make_lm_eval(nnx.split(model, nnx.Param)[0])
    report = json.loads((smoke["out1"] / "report.json").read_text())
    for d in DOMAINS:
        got = lm_loss(ev, params, sets[d], 16, make_mesh())
        np.testing.assert_allclose(got, report["eval_loss"]["xft"][d], rtol=1e-5, err_msg=d)


def test_eight_devices_give_the_same_report(smoke):
    a = json.loads((smoke["out1"] / "report.json").read_text())
    b = json.loads((smoke["out8"] / "report.json").read_text())
    assert json.loads((smoke["out8"] / "run.json").read_text())["mesh"] == {"data": 1, "tensor": 1, **MESH8}
    for m, row in a["eval_loss"].items():
        np.testing.assert_allclose([b["eval_loss"][m][d] for d in row], list(row.values()), rtol=2e-5, err_msg=m)
    np.testing.assert_allclose(b["alpha"]["softmax"], a["alpha"]["softmax"], atol=1e-6)
    for d in DOMAINS:   # a near-tie between two experts may flip for a token or two
        np.testing.assert_allclose(b["expert_load"][d], a["expert_load"][d], atol=2e-3, err_msg=d)
    assert a["steps"] == b["steps"]


def test_alpha_training_changes_only_alpha(tmp_path):
    """The merge stage as the pipeline runs it (its loss, trainable regex, Adafactor): alpha moves, every
    other parameter comes back bit-identical, and only alpha has optimizer state."""
    from flax import nnx

    from fusion_jax import sharding as shd
    from fusion_jax.models import CausalLM, ModelConfig, abstract_model
    from fusion_jax.train.optimizer import OptimizerConfig
    from fusion_jax.train.state import ParamSplit
    from fusion_jax.xft import training as xt
    from fusion_jax.xft.merge import init_alpha
    from fusion_jax.xft.upcycle import upcycle
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=16, intermediate_size=24,
                      num_layers=2, num_heads=2, num_kv_heads=2, head_dim=8)
    dense = nnx.to_pure_dict(nnx.state(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    mc, mp = upcycle(dense, cfg, experts=4, top_k=2, key=jax.random.key(1))
    mp = jax.tree.map(np.asarray, mp)
    rng = np.random.default_rng(0)
    for k, w in mp["layers"]["mlp"]["experts"].items():   # trained experts differ (else alpha has no gradient)
        w["kernel"] = (w["kernel"] + 0.1 * rng.standard_normal(w["kernel"].shape)).astype(np.float32)
    params = {"alpha": np.asarray(init_alpha(mc)), "moe": mp}
    axes = {"alpha": ("layers", None), "moe": shd.state_logical_axes(nnx.split(abstract_model(mc), nnx.Param)[1])}
    assert ParamSplit(params, xt.ALPHA_TRAINABLE).trainable_paths == ["alpha"]
    ids = rng.integers(0, 64, (8, 12)).astype(np.int32)
    sets = {"a": {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}}
    gd = nnx.split(abstract_model(mc.dense_config()), nnx.Param)[0]
    trainer_cfg = get_config("tiny").trainer
    out, rows, _ = xt.train_stage("merge", xt.merge_loss(gd, mc, 0.75), params, axes, sets, steps=3,
                                  batch_per_domain=4, optimizer=OptimizerConfig(name="adafactor", learning_rate=0.05,
                                                                                grad_clip=None),
                                  workdir=tmp_path / "merge", mesh=shd.make_mesh(), seed=0, data_seed=0,
                                  trainer_cfg=trainer_cfg, trainable=xt.ALPHA_TRAINABLE, save_frozen=False)
    assert np.abs(out["alpha"] - params["alpha"]).max() > 1e-3
    flat_in = jax.tree_util.tree_leaves_with_path(params["moe"])
    flat_out = dict(jax.tree_util.tree_leaves_with_path(out["moe"]))
    for path, x in flat_in:
        y = flat_out[path]
        assert y.dtype == x.dtype and np.array_equal(np.asarray(y), x), jax.tree_util.keystr(path)
    assert len(rows) and all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


@pytest.mark.parametrize("flags,match", [
    (["--config=configs/xft.py:nope"], "preset"),
    (["--config.upcycle.top_k=8"], "upcycle.top_k"),
    (["--config.upcycle.experts=1"], "upcycle.experts"),
    (["--config.upcycle.routing=hash"], "upcycle.routing"),
    (["--config.sft.optimizer=sgd"], "sft.optimizer"),
    (["--config.sft.steps=0"], "sft.steps"),
    (["--config.merge.shared_weight=1.5"], "merge.shared_weight"),
    (["--config.merge.batch_per_domain=3"], "merge.batch_per_domain"),
    (["--config.model.dtype=float7"], "model.dtype"),
    (["--config.data.templates.code=no placeholder"], "data.templates.code"),
    (["--config.model.path=/nonexistent/dense"], "model.path"),
    (["--config.sft.betas=1"], "--config.sft.betas"),
])
def test_bad_options_are_errors_naming_the_option(tmp_path, capsys, flags, match):
    base = ["--config=configs/xft.py:smoke"] if not flags[0].startswith("--config=") else []
    argv = base + flags + [f"--config.output_dir={tmp_path / 'runs'}", f"--config.zoo.cache_dir={tmp_path / 'zoo'}"]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert train_main(argv) == 2
    finally:
        os.chdir(cwd)
    err = capsys.readouterr().err
    assert "error: " in err and match in err and "Traceback" not in err, err
    assert not any((tmp_path / "runs").glob("*")) and not (tmp_path / "zoo").exists()
