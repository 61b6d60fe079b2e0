"""The Trainer's held-out evaluation hook (``eval_fn`` every ``eval_every`` steps, at step 0 and at the end,
logged as ``eval/<name>`` rows that survive a resume), and the UltraFuser checks read from it."""
from __future__ import annotations

import numpy as np
from flax import nnx

from fusion_jax import sharding as shd
from fusion_jax.data.sampler import DomainBalancedSampler
from fusion_jax.train import OptimizerConfig, Trainer, TrainerConfig
from fusion_jax.train.losses import nnx_causal_lm_loss
from fusion_jax.train.metrics import read_jsonl
from fusion_jax.train.toy import ToyLM, toy_batches
from fusion_jax.ultrafuser.report import heldout_curve, rising


def _run(workdir, total, calls):
    m = ToyLM(vocab=32, dim=8, hidden=12, layers=1, rngs=nnx.Rngs(0))
    g, p = nnx.split(m, nnx.Param)
    loss_fn = nnx_causal_lm_loss(g)
    held = toy_batches(1, 4, 12, seed=9)[0]

    def eval_fn(params):
        calls.append(1)
        return {"held": float(loss_fn(params, held, None)[0])}

    t = Trainer(loss_fn, nnx.to_pure_dict(p), OptimizerConfig(learning_rate=3e-2, warmup_steps=1),
                TrainerConfig(total_steps=total, workdir=str(workdir), save_every=3, log_every=1, eval_every=3,
                              progress=False, async_checkpointing=False),
                param_logical_axes=shd.state_logical_axes(p), eval_fn=eval_fn)
    try:
        t.run(DomainBalancedSampler({"a": toy_batches(1, 8, 12, seed=1)[0]}, 2, seed=0, process_index=0,
                                    process_count=1))
    finally:
        t.close()


def test_eval_rows_at_start_every_n_and_end_and_after_resume(tmp_path):
    calls: list = []
    _run(tmp_path, 7, calls)
    rows = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    steps = [r["step"] for r in rows if "eval/held" in r]
    assert steps == [0, 3, 6, 7] and len(calls) == 4
    first, last = (next(r["eval/held"] for r in rows if r["step"] == s and "eval/held" in r) for s in (0, 7))
    assert last < first   # the toy pattern is learnable: held-out loss goes down
    # resume past the end: nothing new runs, no duplicate rows
    _run(tmp_path, 7, calls)
    assert [r["step"] for r in read_jsonl(tmp_path / "logs" / "metrics.jsonl") if "eval/held" in r] == steps


def test_heldout_curve_and_rising():
    rows = [{"step": 0, "eval/a": 2.0, "eval/b": 4.0}, {"step": 5, "loss": 1.0},
            {"step": 8, "eval/a": 1.0, "eval/b": 3.0}, {"step": 16, "eval/a": 1.0, "eval/b": 3.1}]
    cv = heldout_curve(rows, ["a", "b"])
    assert cv == [(0, 3.0), (8, 2.0), (16, 2.05)]
    assert rising(cv)[0]                           # ends 2.5% above its best point
    assert not rising([(0, 3.0), (8, 2.0), (16, 2.005)])[0]
    assert rising([(0, 2.0), (8, 1.9), (16, 2.1)])[0]   # ends above where it started
    assert not np.isfinite(rising([(0, 1.0)])[1])
