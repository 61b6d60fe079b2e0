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

_ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _cmd(workdir, out, *extra):
    return [sys.executable, "-m", "fusion_jax.train.toy", "--workdir", str(workdir), "--steps", "16",
            "--save-every", "4", "--out", str(out), *extra]


def _result(stdout: str) -> dict:
    return json.loads([l for l in stdout.splitlines() if l.startswith("RESULT")][-1][6:])


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    ref = subprocess.run(_cmd(tmp_path / "ref", tmp_path / "ref.npz"), capture_output=True, text=True,
                         env=_ENV, timeout=300)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_res = _result(ref.stdout)

    work = tmp_path / "run"
    p = subprocess.Popen(_cmd(work, tmp_path / "run.npz", "--sleep", "0.3"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=_ENV)
    ckpt = work / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = [d for d in (os.listdir(ckpt) if ckpt.exists() else []) if d.isdigit()
                and (ckpt / d / "commit_success.txt").exists()]
        if any(int(d) >= 8 for d in done) or p.poll() is not None:
            break
        time.sleep(0.1)
    assert p.poll() is None, "the run finished before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "run.npz").exists()

    again = subprocess.run(_cmd(work, tmp_path / "run.npz"), capture_output=True, text=True, env=_ENV, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    res = _result(again.stdout)
    assert res["resumed_from"] is not None and 8 <= res["resumed_from"] < 16, res
    k = res["resumed_from"]
    # the resumed run sees exactly the batches the uninterrupted run saw: same losses step by step
    np.testing.assert_allclose(res["losses"], ref_res["losses"][k:], rtol=1e-6)
    a, b = _load(tmp_path / "ref.npz"), _load(tmp_path / "run.npz")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_allclose(b[name], a[name], rtol=1e-6, atol=1e-7, err_msg=name)
    # the metrics file has each step once
    rows = [json.loads(l) for l in open(work / "logs" / "metrics.jsonl")]
    assert [r["step"] for r in rows] == list(range(1, 17))
