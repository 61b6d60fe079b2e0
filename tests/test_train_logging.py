"""Trainer outputs a person looks at, and an interrupted run resumed in the same process:

progress bar (loss, tokens/s, ETA), metrics.jsonl, TensorBoard events, async keep-K checkpoints holding
the data position, resume from the latest with the DomainBalancedSampler picking up at the exact batch.
"""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from flax import nnx

from fusion_jax import sharding as shd
from fusion_jax.data.sampler import DomainBalancedSampler
from fusion_jax.train import OptimizerConfig, Trainer, TrainerConfig
from fusion_jax.train.losses import nnx_causal_lm_loss
from fusion_jax.train.metrics import read_jsonl, read_tensorboard_scalars
from fusion_jax.train.toy import ToyLM, toy_batches


class _Crash(Exception):
    pass


def _arrays():
    # two "domains" of toy sequences (different seeds), 5 and 7 examples
    return {d: toy_batches(1, n, 12, seed=s)[0] for d, n, s in (("even", 5, 1), ("odd", 7, 2))}


def _trainer(workdir, callbacks=(), total_steps=6, log_every=2):
    m = ToyLM(vocab=32, dim=8, hidden=12, layers=1, rngs=nnx.Rngs(0))
    g, p = nnx.split(m, nnx.Param)
    return Trainer(nnx_causal_lm_loss(g), nnx.to_pure_dict(p), OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
                   TrainerConfig(total_steps=total_steps, workdir=str(workdir), save_every=2, keep_checkpoints=2,
                                 async_checkpointing=True, log_every=log_every, progress=True),
                   param_logical_axes=shd.state_logical_axes(p), callbacks=callbacks)


def test_logs_progress_and_resume_with_sampler(tmp_path, capsys):
    seen: dict[int, float] = {}

    def record_then_crash(step, metrics, tr):
        seen[step] = metrics["loss"]
        if step == 5:  # after step 5 ran, before its (not due) checkpoint: like a kill
            raise _Crash

    a = _trainer(tmp_path, [record_then_crash])
    assert a.checkpointer.manager._options.enable_async_checkpointing  # saves overlap the next steps
    with pytest.raises(_Crash):
        a.run(DomainBalancedSampler(_arrays(), 2, seed=0, process_index=0, process_count=1))
    a.close()
    err = capsys.readouterr().err
    # the bar: step count, loss, tokens/s and elapsed<remaining (ETA)
    assert re.search(r"\d+/6 \[\d\d:\d\d<\d\d:\d\d", err), err[-500:]
    assert re.search(r"loss=\d+\.\d{4}", err) and re.search(r"tok_s=[\d,]+", err), err[-500:]

    # keep-2 of the saves at steps 2 and 4; the data position saved with step 4 is the sampler's O(1) state
    assert a.checkpointer.all_steps() == [2, 4]
    data_state = json.loads((tmp_path / "checkpoints" / "4" / "data" / "process_0-of-1.json").read_text())
    assert data_state == {"kind": "json", "state": {"step": 4}}

    b = _trainer(tmp_path)
    r = b.run(DomainBalancedSampler(_arrays(), 2, seed=0, process_index=0, process_count=1))
    assert r.resumed_from == 4 and r.step == 6
    assert "resumed from step 4" in capsys.readouterr().err
    # step 5 after the resume saw the same state and batch as step 5 before the crash
    assert r.history[0]["step"] == 5
    np.testing.assert_allclose(r.history[0]["loss"], seen[5], rtol=1e-6)
    assert b.checkpointer.all_steps() == [4, 6]
    b.close()

    rows = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [2, 4, 6]
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_sec", "num_tokens", "step_time_s"} <= set(rows[0])
    np.testing.assert_allclose(rows[1]["loss"], np.mean([seen[3], seen[4]]), rtol=1e-6)
    tb = read_tensorboard_scalars(tmp_path / "logs")
    assert {"loss", "grad_norm", "learning_rate", "tokens_per_sec"} <= set(tb)
    steps = sorted({s for s, _ in tb["loss"]})
    assert steps == [2, 4, 6]
    assert dict(tb["loss"])[6] == pytest.approx(rows[2]["loss"], rel=1e-6)


def test_a_log_window_cut_by_the_resume_gives_the_uninterrupted_rows(tmp_path):
    """log_every 3, checkpoints every 2: the run resumes from step 4, inside the window of steps 4-6; the
    step-6 row must still be the mean over steps 4, 5 and 6 (step 4's metrics come from its checkpoint)."""
    def crash_at_5(step, metrics, tr):
        if step == 5:
            raise _Crash

    def sampler():
        return DomainBalancedSampler(_arrays(), 2, seed=0, process_index=0, process_count=1)

    ref = _trainer(tmp_path / "whole", log_every=3)
    ref.run(sampler())
    ref.close()
    a = _trainer(tmp_path / "cut", [crash_at_5], log_every=3)
    with pytest.raises(_Crash):
        a.run(sampler())
    a.close()
    b = _trainer(tmp_path / "cut", log_every=3)
    assert b.run(sampler()).resumed_from == 4
    b.close()
    want, got = (read_jsonl(d / "logs" / "metrics.jsonl") for d in (tmp_path / "whole", tmp_path / "cut"))
    assert [r["step"] for r in got] == [r["step"] for r in want] == [3, 6]
    for w, g in zip(want, got):
        for k in ("loss", "grad_norm", "learning_rate", "num_tokens"):
            assert g[k] == pytest.approx(w[k], rel=1e-6), (g["step"], k)


def test_the_row_after_a_resume_times_only_the_steps_run_since(tmp_path, monkeypatch):
    """The window carried over from the checkpoint (step 4) ran before the restart: the step-6 row's
    tokens/s and step time are over steps 5 and 6 (run in the time measured), not 4-6 in that time."""
    import types

    import fusion_jax.train.loop as loop

    def crash_at_5(step, metrics, tr):
        if step == 5:
            raise _Crash

    def sampler():
        return DomainBalancedSampler(_arrays(), 2, seed=0, process_index=0, process_count=1)

    a = _trainer(tmp_path, [crash_at_5], log_every=3)
    with pytest.raises(_Crash):
        a.run(sampler())
    a.close()
    ticks = iter(range(1000))   # the trainer's clock: one second per reading
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=lambda: float(next(ticks))))
    b = _trainer(tmp_path, log_every=3)
    res = b.run(sampler())
    b.close()
    assert res.resumed_from == 4 and [h["step"] for h in res.history] == [5, 6]
    row = read_jsonl(tmp_path / "logs" / "metrics.jsonl")[-1]
    assert row["step"] == 6
    assert row["step_time_s"] == pytest.approx(1.0 / 2)
    assert row["tokens_per_sec"] == pytest.approx(sum(h["num_tokens"] for h in res.history) / 1.0)


def test_checkpoints_without_logging_carry_no_log_window(tmp_path):
    """log_every 0 logs nothing: no step's metrics pile up in memory or in every checkpoint's meta."""
    t = _trainer(tmp_path, log_every=0)
    t.run(DomainBalancedSampler(_arrays(), 2, seed=0, process_index=0, process_count=1))
    t.close()
    metas = [json.loads(f.read_text()) for f in sorted((tmp_path / "checkpoints").glob("*/meta/metadata"))]
    assert len(metas) == 2 and all(m["log_window"] == [] for m in metas), [len(m["log_window"]) for m in metas]


def test_a_resumed_run_in_the_same_second_keeps_the_earlier_events(tmp_path):
    """tensorboardX names event files by the second: a second writer must not overwrite the first's."""
    from fusion_jax.train.metrics import MetricsLogger
    a = MetricsLogger(tmp_path, enabled=True)
    a.log(2, {"loss": 1.0})
    a.close()
    b = MetricsLogger(tmp_path, enabled=True)
    b.log(4, {"loss": 2.0})
    b.close()
    assert sorted(read_tensorboard_scalars(tmp_path)["loss"]) == [(2, 1.0), (4, 2.0)]


class _PerProcessIterator:
    """A stateful iterator that does not declare its state global (as grain's per-process positions)."""

    def __init__(self, inner):
        self.inner = inner

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.inner)

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, s):
        self.inner.set_state(s)


def test_resume_on_another_process_count_takes_only_a_global_data_position(tmp_path):
    from fusion_jax.errors import CheckpointError
    sampler = lambda: DomainBalancedSampler(_arrays(), 2, seed=0, process_index=0, process_count=1)  # noqa: E731
    a = _trainer(tmp_path, total_steps=4)
    a.run(sampler())
    a.close()
    # make step 4's data state look written by 2 processes (both at global step 4, as the sampler saves)
    data = tmp_path / "checkpoints" / "4" / "data"
    text = (data / "process_0-of-1.json").read_text()
    (data / "process_0-of-1.json").unlink()
    for i in range(2):
        (data / f"process_{i}-of-2.json").write_text(text)
    c = _trainer(tmp_path)
    with pytest.raises(CheckpointError, match="per process; resume with the same number"):
        c.run(_PerProcessIterator(sampler()))
    c.close()
    b = _trainer(tmp_path)
    s = sampler()
    r = b.run(s)
    b.close()
    assert r.resumed_from == 4 and r.step == 6 and s.get_state() == {"step": 6}
