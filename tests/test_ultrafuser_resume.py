"""SIGKILL an UltraFuser run in the middle of stage 2, rerun the same command: it resumes from the
Orbax checkpoints and ends with exactly the params of an uninterrupted run (exported gate and
specialists compared bit for bit)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ultrafuser_fixtures import NAMES, fixture_flags, make_fixture

REPO = Path(__file__).resolve().parents[1]
STAGE2_STEPS = 12   # the kill lands mid-stage (checkpoints every 2 steps; a tiny step takes milliseconds)


def _cmd(fx, out):
    return [sys.executable, "train.py"] + fixture_flags(fx, out, **{"stage2.steps": STAGE2_STEPS})


def _tensors(run_dir: Path) -> dict:
    from safetensors.numpy import load_file
    out = {}
    for f in sorted((run_dir / "fused").rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(run_dir)}:{k}"] = v
    return out


def test_sigkill_then_rerun_resumes_to_the_same_params(tmp_path):
    fx = make_fixture(tmp_path / "fx")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ref_out, out = tmp_path / "ref", tmp_path / "run"
    # the uninterrupted reference runs beside the interrupted one (2 cores)
    ref = subprocess.Popen(_cmd(fx, ref_out), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
    victim = subprocess.Popen(_cmd(fx, out), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    ckpts = out / "ultrafuser_tiny" / "work" / "stage2" / "checkpoints"
    deadline = time.time() + 240
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
        if steps and max(steps) >= 4:
            victim.send_signal(signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.02)
    victim.wait(60)
    assert killed_at is not None and killed_at < STAGE2_STEPS, "the run ended before it could be killed"
    assert not (out / "ultrafuser_tiny" / "report.json").exists()

    r = subprocess.run(_cmd(fx, out), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "stage 2: resumed from step" in r.stdout, r.stdout[-2000:]
    ref_log = ref.communicate(timeout=300)[0]
    assert ref.returncode == 0, ref_log[-3000:]

    a, b = _tensors(ref_out / "ultrafuser_tiny"), _tensors(out / "ultrafuser_tiny")
    assert set(a) == set(b) and any("gate.safetensors" in k for k in a)
    assert len([k for k in a if "/specialists/" in k]) >= len(NAMES)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (out / "ultrafuser_tiny" / "report.json").read_text() == (ref_out / "ultrafuser_tiny" / "report.json").read_text()
