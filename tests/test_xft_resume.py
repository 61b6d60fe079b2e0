"""XFT as a user starts it (``python train.py --config=configs/xft.py:tiny ...`` on a tiny fixture model):
SIGKILL in the middle of the MoE SFT, rerun the same command: it resumes from the Orbax checkpoints and ends
with exactly the uninterrupted run's merged model, alpha and report (bit for bit)."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from xft_fixtures import fast_env, fixture_flags, make_fixture

REPO = Path(__file__).resolve().parents[1]
SFT_STEPS = 12   # the kill lands mid-stage (checkpoints every 2 steps; a tiny step takes milliseconds)
ENV = fast_env()


def _cmd(fx, out):
    # the stages after the MoE SFT run too (their inputs come from the resumed stage); the dense baseline
    # and the held-out monitor add compilations, not resume paths
    return [sys.executable, "train.py"] + fixture_flags(fx, out, **{"sft.steps": SFT_STEPS, "baseline.enabled": False,
                                                                     "trainer.eval_every": 0})


def _tensors(run_dir: Path) -> dict:
    from safetensors.numpy import load_file
    out = {}
    for f in sorted((run_dir / "merged").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    out["alpha"] = np.load(run_dir / "alpha.npy")
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("xft_runs")
    fx = make_fixture(root / "fx")
    ref = subprocess.Popen(_cmd(fx, root / "ref"), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    yield {"fx": fx, "root": root, "ref": ref}
    if ref.poll() is None:
        ref.kill()


def test_sigkill_during_moe_sft_then_rerun_gives_the_uninterrupted_result(runs):
    fx, out = runs["fx"], runs["root"] / "run"
    victim = subprocess.Popen(_cmd(fx, out), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "xft_tiny" / "work" / "moe_sft" / "checkpoints"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
        if steps and max(steps) >= 4:
            victim.send_signal(signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.02)
    victim.wait(60)
    assert killed_at is not None and killed_at < SFT_STEPS, "the run ended before it could be killed"
    assert not (out / "xft_tiny" / "report.json").exists() and not (out / "xft_tiny" / "merged").exists()

    r = subprocess.run(_cmd(fx, out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "moe_sft: resumed from step" in r.stdout, r.stdout[-2000:]

    ref = runs["ref"]
    log = ref.communicate(timeout=400)[0]
    assert ref.returncode == 0, log[-3000:]
    a, b = _tensors(runs["root"] / "ref" / "xft_tiny"), _tensors(out / "xft_tiny")
    assert set(a) == set(b) and len(a) > 5
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (out / "xft_tiny" / "report.json").read_text() == (runs["root"] / "ref" / "xft_tiny" / "report.json").read_text()
