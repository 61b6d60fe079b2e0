"""UltraFuser runs as a user starts them (``python train.py --config=configs/ultrafuser.py:tiny ...`` on
tiny fixture specialists), compared with one uninterrupted single-process run of the same command:

* SIGKILL in the middle of stage 2, rerun the same command: it resumes from the Orbax checkpoints and
  ends with exactly the reference's params (exported gate and specialists, bit for bit) and report;
* two local processes under ``jax.distributed`` (each loading only its share of every balanced batch)
  end with the reference's params and eval losses (to float32 rounding).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ultrafuser_fixtures import NAMES, fixture_flags, make_fixture

REPO = Path(__file__).resolve().parents[1]
STAGE2_STEPS = 12   # the kill lands mid-stage (checkpoints every 2 steps; a tiny step takes milliseconds)
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}


def _cmd(fx, out, *extra):
    return [sys.executable, "train.py"] + fixture_flags(fx, out, **{"stage2.steps": STAGE2_STEPS}) + list(extra)


def _tensors(run_dir: Path) -> dict:
    from safetensors.numpy import load_file
    out = {}
    for f in sorted((run_dir / "fused").rglob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            out[f"{f.relative_to(run_dir)}:{k}"] = v
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The fixture and the uninterrupted reference run, started in the background (it runs beside the
    interrupted one)."""
    root = tmp_path_factory.mktemp("uf_runs")
    fx = make_fixture(root / "fx")
    ref = subprocess.Popen(_cmd(fx, root / "ref"), cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    state = {"fx": fx, "root": root, "ref": ref}
    yield state
    if ref.poll() is None:
        ref.kill()


def _reference(runs) -> Path:
    ref = runs["ref"]
    log = ref.communicate(timeout=400)[0] if ref.returncode is None else ""
    assert ref.returncode == 0, log[-3000:]
    return runs["root"] / "ref" / "ultrafuser_tiny"


def test_sigkill_then_rerun_resumes_to_the_same_params(runs):
    fx, out = runs["fx"], runs["root"] / "run"
    victim = subprocess.Popen(_cmd(fx, out), cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    ckpts = out / "ultrafuser_tiny" / "work" / "stage2" / "checkpoints"
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
    assert killed_at is not None and killed_at < STAGE2_STEPS, "the run ended before it could be killed"
    assert not (out / "ultrafuser_tiny" / "report.json").exists()

    r = subprocess.run(_cmd(fx, out), cwd=REPO, env=ENV, capture_output=True, text=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "stage 2: resumed from step" in r.stdout, r.stdout[-2000:]

    ref = _reference(runs)
    a, b = _tensors(ref), _tensors(out / "ultrafuser_tiny")
    assert set(a) == set(b) and any("gate.safetensors" in k for k in a)
    assert len({k.split(":")[0] for k in a if "specialists/" in k}) >= len(NAMES)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert (out / "ultrafuser_tiny" / "report.json").read_text() == (ref / "report.json").read_text()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(runs):
    fx, out = runs["fx"], runs["root"] / "two"
    port = _free_port()
    procs = [subprocess.Popen(_cmd(fx, out, f"--config.distributed.coordinator_address=localhost:{port}",
                                   "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"),
                              cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    for p in procs:
        log = p.communicate(timeout=400)[0]
        assert p.returncode == 0, log[-3000:]
    ref = _reference(runs)
    a = json.loads((ref / "report.json").read_text())
    b = json.loads((out / "ultrafuser_tiny" / "report.json").read_text())
    for m in a["eval_loss"]:
        for d in a["eval_loss"][m]:
            np.testing.assert_allclose(b["eval_loss"][m][d], a["eval_loss"][m][d], rtol=1e-5, err_msg=f"{m}/{d}")
    for d in a["gate_weights"]:
        for n in a["gate_weights"][d]:
            np.testing.assert_allclose(b["gate_weights"][d][n], a["gate_weights"][d][n], atol=1e-5)
    # the trained params agree too (the gate's softmax-invariant b2 is never trained: see pipeline.py)
    ta, tb = _tensors(ref), _tensors(out / "ultrafuser_tiny")
    assert set(ta) == set(tb)
    for k in ta:
        np.testing.assert_allclose(tb[k], ta[k], rtol=1e-4, atol=1e-5, err_msg=k)
