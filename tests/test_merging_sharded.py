"""`--device auto` on a mesh of 8 simulated devices writes the same bytes as one CPU device.

Each tensor's rows are sharded over the mesh (the accelerator path); the per-tensor randomness is keyed
by the tensor's name, not by device or shard, so DARE's keep-masks must not change either.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import yaml

from fusion_jax.merging.testing import make_family

_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    from fusion_jax.merging import merge
    from fusion_jax.merging.executor import _Runner
    assert len(jax.devices()) == int(sys.argv[3]), jax.devices()
    spread = []  # how many devices each placed chunk lives on
    put = _Runner.put
    _Runner.put = lambda self, a: spread.append(len((x := put(self, a)).sharding.device_set)) or x
    merge(sys.argv[1], sys.argv[2], device=sys.argv[4], seed=7, quiet=True)
    print("MAX_SPREAD", max(spread))
""")


def _digest(d: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.glob("*.safetensors"))}


def test_dare_ties_on_8_devices_matches_one(tmp_path):
    # MLP tensors of 64 x 8256 = 528384 elements: over one 512K chunk on one device (so the last chunk is
    # padded, and padded differently from the mesh's single 1M chunk), and sharded 8 ways on the mesh
    base, fts = make_family(tmp_path, n_finetunes=3, seed=5, layers=2, inter=8256)
    cfg = {"merge_method": "dare_ties", "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(f), "parameters": {"weight": w, "density": d}}
                      for f, w, d in zip(fts, (0.5, 0.3, 0.2), (0.3, 0.5, [0.2, 0.9]))]}
    path = tmp_path / "dare.yml"
    path.write_text(yaml.safe_dump(cfg))
    digests = []
    for n, device in ((1, "cpu"), (8, "auto")):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        out = tmp_path / f"out{n}"
        r = subprocess.run([sys.executable, "-c", _SCRIPT, str(path), str(out), str(n), device],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"MAX_SPREAD {n}" in r.stdout  # the mesh run really sharded its large chunks
        digests.append(_digest(out))
    assert digests[0] and digests[0] == digests[1]
