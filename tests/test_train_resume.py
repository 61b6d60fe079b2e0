"""Kill -9 in the middle of a run, rerun the same command: it resumes and ends bitwise where an
uninterrupted run ends (train state and the grain data-iterator position both restored)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

# XLA's LLVM backend at -O0: faster compiles, and the reference and the resumed run share the flag
_ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
            XLA_FLAGS="--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true")


def _cmd(workdir, out, *extra):
    return [sys.executable, "-m", "fusion_jax.train.toy", "--workdir", str(workdir), "--steps", "12",
            "--save-every", "3", "--out", str(out), "--no-tensorboard", *extra]


def _result(stdout: str) -> dict:
    return json.loads([l for l in stdout.splitlines() if l.startswith("RESULT")][-1][6:])


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    # the uninterrupted reference runs beside the run that gets killed
    ref = subprocess.Popen(_cmd(tmp_path / "ref", tmp_path / "ref.npz"), stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=_ENV)
    work = tmp_path / "run"
    p = subprocess.Popen(_cmd(work, tmp_path / "run.npz", "--sleep", "0.3"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_ENV)
    ckpt = work / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [d for d in (os.listdir(ckpt) if ckpt.exists() else []) if d.isdigit()
                and (ckpt / d / "commit_success.txt").exists()]
        if any(int(d) >= 6 for d in done) or p.poll() is not None:
            break
        time.sleep(0.1)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "run.npz").exists()
    ref_out, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]
    ref_res = _result(ref_out)

    again = subprocess.run(_cmd(work, tmp_path / "run.npz"), capture_output=True, text=True, env=_ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    res = _result(again.stdout)
    assert res["resumed_from"] is not None and 6 <= res["resumed_from"] < 12, res
    k = res["resumed_from"]
    # the resumed run sees exactly the batches the uninterrupted run saw: same losses step by step
    np.testing.assert_allclose(res["losses"], ref_res["losses"][k:], rtol=1e-6)
    a, b = _load(tmp_path / "ref.npz"), _load(tmp_path / "run.npz")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # the metrics file has each step once
    rows = [json.loads(l) for l in open(work / "logs" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_data_state_resumes_on_another_process_count_only_when_it_is_global(tmp_path, monkeypatch):
    """A data state written by 2 processes: restored by 1 (or 4) processes only for an iterator whose
    state is global (``global_state``, and every process saved the same one); otherwise a clear error."""
    import jax
    import pytest
    from etils import epath

    from fusion_jax.data.sampler import DomainBalancedSampler
    from fusion_jax.errors import CheckpointError
    from fusion_jax.train.checkpointing import DataStateHandler, DataStateRestore, DataStateSave

    assert DomainBalancedSampler.state_is_global

    def as_process(i, n):
        monkeypatch.setattr(jax, "process_index", lambda: i)
        monkeypatch.setattr(jax, "process_count", lambda: n)

    h, glob, local = DataStateHandler(), DataStateRestore(global_state=True), DataStateRestore()
    shared, split = epath.Path(tmp_path / "shared"), epath.Path(tmp_path / "split")
    for d in (shared, split):
        d.mkdir()
    for i in range(2):
        as_process(i, 2)
        h.save(shared, DataStateSave({"step": 7}))
        h.save(split, DataStateSave({"step": 7, "shard": i}))
    as_process(1, 2)
    assert h.restore(split, local) == {"step": 7, "shard": 1}  # same process count: its own file
    for i, n in ((0, 1), (3, 4)):
        as_process(i, n)
        assert h.restore(shared, glob) == {"step": 7}
        with pytest.raises(CheckpointError, match="position is per process; resume with the same number"):
            h.restore(shared, local)  # e.g. grain: equal-looking per-process positions are not global
        with pytest.raises(CheckpointError, match="saved different data-iterator states"):
            h.restore(split, glob)
    (shared / "process_1-of-2.json").unlink()                  # incomplete: no full set to take it from
    with pytest.raises(CheckpointError, match="no complete set of data-iterator states"):
        h.restore(shared, glob)
