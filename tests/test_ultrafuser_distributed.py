"""Two local processes under jax.distributed (each loading only its share of every balanced batch) train
the tiny UltraFuser config to the same result as one process."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from ultrafuser_fixtures import fixture_flags, make_fixture

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    from safetensors.numpy import load_file

    fx = make_fixture(tmp_path / "fx")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    one, two = tmp_path / "one", tmp_path / "two"
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "train.py"] + fixture_flags(fx, one), cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    for i in range(2):
        procs.append(subprocess.Popen(
            [sys.executable, "train.py"] + fixture_flags(fx, two) + [
                f"--config.distributed.coordinator_address=localhost:{port}",
                "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        log = p.communicate(timeout=400)[0]
        assert p.returncode == 0, log[-3000:]

    a = json.loads((one / "ultrafuser_tiny" / "report.json").read_text())
    b = json.loads((two / "ultrafuser_tiny" / "report.json").read_text())
    for m in a["eval_loss"]:
        for d in a["eval_loss"][m]:
            np.testing.assert_allclose(b["eval_loss"][m][d], a["eval_loss"][m][d], rtol=1e-5, err_msg=f"{m}/{d}")
    for d in a["gate_weights"]:
        for n in a["gate_weights"][d]:
            np.testing.assert_allclose(b["gate_weights"][d][n], a["gate_weights"][d][n], atol=1e-5)
    # the trained specialists agree too (the gate's shared bias b2 has an exactly-zero gradient under the
    # softmax, so Adam turns rounding noise into an arbitrary, harmless shift: compare the rest)
    for f in sorted((one / "ultrafuser_tiny" / "fused").rglob("*.safetensors")):
        ta, tb = load_file(str(f)), load_file(str(two / f.relative_to(one)))
        for k in ta:
            if k != "gate.b2":
                np.testing.assert_allclose(tb[k], ta[k], rtol=1e-4, atol=1e-5, err_msg=f"{f.name}:{k}")
