"""XFT as a user starts it (``python train.py --config=configs/xft.py:smoke``): SIGKILL in the middle of the
MoE SFT, rerun the same command: it resumes from the Orbax checkpoints and ends with exactly the
uninterrupted run's merged model, alpha and report, bit for bit (the uninterrupted run: the session's
1-device smoke run, see xft_fixtures; checkpoint frequency and synchronous saves do not change results)."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from xft_fixtures import REPO, fast_env, smoke_flags, smoke_runs

SFT_STEPS = 4   # the smoke preset's
SAVE = ["--config.trainer.save_every=1", "--config.trainer.async_checkpointing=False"]


def _tensors(run_dir: Path) -> dict:
    from safetensors.numpy import load_file
    out = {}
    for f in sorted((run_dir / "merged").glob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    out["alpha"] = np.load(run_dir / "alpha.npy")
    return out


def test_sigkill_during_moe_sft_then_rerun_gives_the_uninterrupted_result(tmp_path_factory):
    runs = smoke_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("xft_resume")
    cmd = [sys.executable, "train.py", *smoke_flags(runs["zoo"], out, *SAVE)]
    victim = subprocess.Popen(cmd, cwd=REPO, env=fast_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = out / "xft_smoke" / "work" / "moe_sft" / "checkpoints"
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        steps = [int(p.name) for p in ckpts.iterdir() if p.name.isdigit()] if ckpts.is_dir() else []
        if steps:
            victim.send_signal(signal.SIGKILL)
            killed_at = max(steps)
            break
        time.sleep(0.01)
    victim.wait(60)
    assert killed_at is not None and killed_at < SFT_STEPS, "the MoE SFT ended before it could be killed"
    assert not (out / "xft_smoke" / "report.json").exists() and not (out / "xft_smoke" / "merged").exists()

    r = subprocess.run(cmd, cwd=REPO, env=fast_env(), capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "moe_sft: resumed from step" in r.stdout, r.stdout[-2000:]
    a, b = _tensors(runs["out1"]), _tensors(out / "xft_smoke")
    assert set(a) == set(b) and len(a) > 5
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (out / "xft_smoke" / "report.json").read_text() == (runs["out1"] / "report.json").read_text()
