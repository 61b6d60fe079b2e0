"""Optimizer masking, schedules, gradient accumulation, loss decrease and the NaN guard (fast, CPU)."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from fusion_jax import sharding as shd
from fusion_jax.errors import ConfigError, TrainingError
from fusion_jax.train import OptimizerConfig, ParamSplit, Trainer, TrainerConfig, build_optimizer, build_schedule
from fusion_jax.train.losses import next_token_ce, nnx_causal_lm_loss
from fusion_jax.train.metrics import read_jsonl
from fusion_jax.train.step import make_train_step
from fusion_jax.train.state import TrainState
from fusion_jax.train.toy import ToyLM, toy_batches


def _toy(seed=0, **kw):
    m = ToyLM(rngs=nnx.Rngs(seed), **kw)
    g, p = nnx.split(m, nnx.Param)
    return g, nnx.to_pure_dict(p), shd.state_logical_axes(p)


def test_frozen_params_bit_identical_and_stateless(tmp_path):
    g, params, axes = _toy()
    before = jax.tree.map(np.array, params)
    tr = Trainer(nnx_causal_lm_loss(g), params,
                 OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, trainable=("^layers/up/",)),
                 TrainerConfig(total_steps=3, progress=False), param_logical_axes=axes)
    assert tr.split.trainable_paths == ["layers/up/bias", "layers/up/kernel"]
    # optimizer state exists only for the trainable leaves
    opt_elems = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tr.state.opt_state))
    n_train = sum(int(np.prod(np.shape(v))) for v in tr.state.params.values())
    assert opt_elems <= 2 * n_train + 8, (opt_elems, n_train)
    for leaf in jax.tree.leaves(tr.state.opt_state):
        assert leaf.ndim == 0 or leaf.shape in {v.shape for v in tr.state.params.values()}
    r = tr.run(toy_batches(3, 4, 8))
    after = jax.tree.map(np.array, r.params)
    for path in tr.split.frozen_paths:
        a, b = tr.split.flat(before)[path], tr.split.flat(after)[path]
        assert a.tobytes() == b.tobytes(), path
    assert not np.array_equal(tr.split.flat(before)["layers/up/kernel"], tr.split.flat(after)["layers/up/kernel"])


def test_no_gradient_for_frozen():
    """The loss is differentiated only w.r.t. the trainable dict: a frozen leaf never enters grad."""
    def loss_fn(params, batch, rng):
        return jnp.sum(params["a"] ** 2) + jnp.sum(params["b"]), {}

    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    split = ParamSplit(params, "^a$")
    tx = optax.sgd(0.1)
    t, f = split.split(params)
    st = TrainState(step=jnp.int32(0), params=t, frozen=f, opt_state=tx.init(t), rng=jax.random.PRNGKey(0))
    step = make_train_step(loss_fn, tx, split)
    new, m = step(st, {})
    assert set(new.params) == {"a"} and set(new.frozen) == {"b"}
    np.testing.assert_allclose(new.params["a"], 0.8 * np.ones(3))
    np.testing.assert_array_equal(new.frozen["b"], np.ones(2))
    np.testing.assert_allclose(float(m["grad_norm"]), np.sqrt(12.0), rtol=1e-6)  # |d/da| only


def test_weight_decay_mask_and_schedule():
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=4, schedule="cosine", end_lr_ratio=0.1, weight_decay=0.1)
    from fusion_jax.train.optimizer import decay_mask
    flat = {"layers/attn_norm/scale": np.zeros((2, 4)), "layers/q_proj/kernel": np.zeros((2, 4, 4)),
            "layers/q_proj/bias": np.zeros((2, 4)), "embed/embedding": np.zeros((8, 4)), "x": np.zeros(3)}
    assert decay_mask(cfg, flat) == {"layers/attn_norm/scale": False, "layers/q_proj/kernel": True,
                                     "layers/q_proj/bias": False, "embed/embedding": True, "x": False}
    s = build_schedule(cfg, 14)
    assert float(s(0)) == pytest.approx(0.2)
    assert float(s(4)) == pytest.approx(1.0)
    assert float(s(14)) == pytest.approx(0.1)
    lin = build_schedule(OptimizerConfig(learning_rate=1.0, schedule="linear"), 10)
    assert float(lin(5)) == pytest.approx(0.5)
    const = build_schedule(OptimizerConfig(learning_rate=0.3, schedule="constant", warmup_steps=2), 10)
    assert float(const(7)) == pytest.approx(0.3)
    with pytest.raises(ConfigError, match="optimizer.schedule"):
        OptimizerConfig.from_config({"schedule": "step"})
    with pytest.raises(ConfigError, match="optimizer.lr"):
        OptimizerConfig.from_config({"lr": 1.0})
    with pytest.raises(ConfigError, match="optimizer.trainable"):
        ParamSplit({"a": 1.0}, "^nothing$")
    c = OptimizerConfig.from_config({"learning_rate": 2e-5, "trainable": "gate", "lr_multipliers": {"gate": 10.0}})
    assert c.trainable == ("gate",) and c.lr_multipliers == (("gate", 10.0),)
    tx, _ = build_optimizer(c, {"gate/w": jnp.ones(2), "x/w": jnp.ones(2)}, 10)
    assert tx.init({"gate/w": jnp.ones(2), "x/w": jnp.ones(2)}) is not None


def test_grad_accumulation_equals_big_batch():
    g, params, _ = _toy(dim=8, hidden=12)
    loss_fn = nnx_causal_lm_loss(g)
    batch = toy_batches(1, 8, 12, seed=3)[0]
    # uneven token counts per row, so that weighting microbatches by num_tokens matters
    batch["loss_mask"][:, :] = 0
    for i in range(8):
        batch["loss_mask"][i, 12 - (i + 2):] = 1
    split = ParamSplit(params)
    t, f = split.split(params)
    tx = optax.sgd(1.0)
    st = TrainState(step=jnp.int32(0), params=t, frozen=f, opt_state=tx.init(t), rng=jax.random.PRNGKey(0))
    big, mb = jax.jit(make_train_step(loss_fn, tx, split, None, 1))(st, batch)
    acc, ma = jax.jit(make_train_step(loss_fn, tx, split, None, 4))(st, batch)
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-6)
    assert float(ma["num_tokens"]) == float(mb["num_tokens"]) == float(batch["loss_mask"][:, 1:].sum())
    for k in big.params:
        np.testing.assert_allclose(acc.params[k], big.params[k], atol=1e-6, rtol=1e-5, err_msg=k)


def test_loss_decreases_and_logs(tmp_path):
    g, params, axes = _toy()
    tr = Trainer(nnx_causal_lm_loss(g), params, OptimizerConfig(learning_rate=3e-2, warmup_steps=3),
                 TrainerConfig(total_steps=30, workdir=str(tmp_path), save_every=0, log_every=10, progress=True),
                 param_logical_axes=axes)
    r = tr.run(toy_batches(30, 8, 16))
    first, last = np.mean([h["loss"] for h in r.history[:3]]), np.mean([h["loss"] for h in r.history[-3:]])
    assert last < 0.6 * first, (first, last)
    rows = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_sec", "accuracy"} <= set(rows[0])
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "logs"))
    assert tr.checkpointer.all_steps() == [30]


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    g, params, axes = _toy()
    base = nnx_causal_lm_loss(g)

    def loss_fn(p, batch, rng):
        loss, aux = base(p, batch, rng)
        return jnp.where(batch["poison"][0] > 0, jnp.nan, loss), aux

    batches = toy_batches(12, 4, 8)
    for i, b in enumerate(batches):
        b["poison"] = np.full((4,), 1 if i == 7 else 0, np.int32)  # the 8th batch -> step 8
    tr = Trainer(loss_fn, params, OptimizerConfig(learning_rate=1e-2),
                 TrainerConfig(total_steps=12, workdir=str(tmp_path), save_every=3, progress=False))
    with pytest.raises(TrainingError, match=r"non-finite loss at step 8.*latest checkpoint is still step 6"):
        tr.run(batches)
    assert tr.checkpointer.latest_step() == 6
    assert 8 not in tr.checkpointer.all_steps()


def test_next_token_ce_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    ids = rng.integers(0, 7, size=(2, 5))
    mask = np.array([[0, 0, 1, 1, 1], [0, 1, 1, 0, 1]])
    loss, aux = next_token_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask))
    lp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    tot, n = 0.0, 0
    for b in range(2):
        for t in range(1, 5):
            if mask[b, t]:
                tot -= lp[b, t - 1, ids[b, t]]
                n += 1
    assert float(aux["num_tokens"]) == n
    np.testing.assert_allclose(float(loss), tot / n, rtol=1e-5)
    seg = np.array([[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]])
    _, aux2 = next_token_ce(jnp.asarray(logits), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(seg))
    assert float(aux2["num_tokens"]) == n - 1


def test_bad_batches_are_config_errors():
    def loss_fn(params, batch, rng):
        return jnp.sum(params["w"] ** 2) * jnp.mean(batch["x"]), {}

    tr = Trainer(loss_fn, {"w": np.ones(3, np.float32)}, OptimizerConfig(),
                 TrainerConfig(total_steps=2, grad_accum_steps=4, progress=False))
    with pytest.raises(ConfigError, match=r"trainer.grad_accum_steps: the global batch of 6 rows does not split "
                                          r"into 4 microbatches"):
        tr.run([{"x": np.ones((6, 2), np.float32)}])
    with pytest.raises(ConfigError, match=r"batch: every array needs the same leading \(batch\) dim"):
        tr.run([{"x": np.ones((4, 2), np.float32), "y": np.ones((3,), np.float32)}])


def test_lr_multipliers_equal_adamw_at_scaled_lr():
    """A param group with lr multiplier s takes exactly AdamW's step at lr * s (weight decay included),
    and the Trainer builds (and shards) the optimizer state with multipliers set."""
    flat = {"gate/w": jnp.ones((4, 3)), "body/w": jnp.full((4, 3), 2.0)}
    grads = {"gate/w": jnp.full((4, 3), 0.5), "body/w": jnp.full((4, 3), -0.25)}
    cfg = OptimizerConfig(learning_rate=1e-2, weight_decay=0.1, warmup_steps=0, schedule="constant",
                          grad_clip=None, lr_multipliers=(("^gate/", 10.0),))
    tx, _ = build_optimizer(cfg, flat, total_steps=10)
    upd, _ = tx.update(grads, tx.init(flat), flat)
    for name, lr in (("gate/w", 1e-1), ("body/w", 1e-2)):
        ref = optax.adamw(lr, weight_decay=0.1, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        r, _ = ref.update({name: grads[name]}, ref.init({name: flat[name]}), {name: flat[name]})
        np.testing.assert_allclose(upd[name], r[name], rtol=1e-6)
    g, params, axes = _toy()
    tr = Trainer(nnx_causal_lm_loss(g), params, dict(learning_rate=1e-2, lr_multipliers={"up": 3.0}),
                 TrainerConfig(total_steps=1, progress=False), param_logical_axes=axes)
    assert np.isfinite(tr.step_fn(next(iter(toy_batches(1, 4, 8))))["loss"])
