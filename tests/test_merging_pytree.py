"""``merge_pytrees`` / ``merge_causal_lm``: the file executor's per-tensor kernels over in-memory pytrees
give the bytes ``fusion-jax merge`` writes for the same checkpoints (randomness keyed by the tensor
name), on one device and on 8 simulated devices with every leaf sharded (the shardings are kept, no
leaf is gathered to one device)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fusion_jax.hf.safetensors_io import SafetensorsReader
from fusion_jax.merging import merge
from fusion_jax.merging.pytree import merge_causal_lm, merge_pytrees, path_name
from fusion_jax.merging.testing import make_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    root = tmp_path_factory.mktemp("pt")
    base, fts = make_family(root, n_finetunes=2, seed=2, dtype="bfloat16", tokenizer=False)
    return root, base, fts


def _load(p):
    with SafetensorsReader(p) as r:
        return {n: r.get(n) for n in r.names()}


CASES = [
    ("dare_ties", {"weight": [0.6, 0.4], "density": [0.3, 0.7]}),
    ("ties", {"weight": [0.6, 0.4], "density": [0.3, 0.7]}),
    ("della", {"weight": [0.6, 0.4], "density": [0.5, 0.6], "epsilon": 0.1}),
    ("slerp", {"t": 0.3}),
    ("multislerp", {"weight": [0.6, 0.4]}),
    ("sce", {"select_topk": 0.5}),
]


def _yaml(method, base, fts, params, **extra):
    shared = {k: v for k, v in params.items() if k in ("t", "select_topk", "epsilon")}
    per = {k: v for k, v in params.items() if k not in shared}
    models = [{"model": str(f), "parameters": {k: v[i] for k, v in per.items()}} for i, f in enumerate(fts)]
    cfg = {"merge_method": method, "base_model": str(base), "models": models, **extra}
    if shared:
        cfg["parameters"] = shared
    return cfg


@pytest.mark.parametrize("method,params", CASES, ids=[c[0] for c in CASES])
def test_flat_and_nested_maps_give_the_executors_bytes(fam, tmp_path, method, params):
    root, base, fts = fam
    fts = fts[:1] if method == "slerp" else fts
    merge(_yaml(method, base, fts, params), tmp_path / "out", seed=5, quiet=True)
    want = _load(tmp_path / "out")
    B, F = _load(base), [_load(f) for f in fts]
    got = merge_pytrees(method, F, base=B, seed=5, **params)
    assert set(got) == set(want)
    for n in want:
        assert np.asarray(got[n]).tobytes() == want[n].tobytes(), n

    def nest(flat):  # {"model": {"layers": {"0": {...}}}}: the path's keys joined by "." are the HF names
        out = {}
        for k, v in flat.items():
            d = out
            *head, last = k.split(".")
            for h in head:
                d = d.setdefault(h, {})
            d[last] = v
        return out

    nested = merge_pytrees(method, [nest(f) for f in F], base=nest(B), seed=5, **params)
    import jax
    for path, leaf in jax.tree_util.tree_flatten_with_path(nested)[0]:
        assert np.asarray(leaf).tobytes() == want[path_name(path)].tobytes()


def test_float32_dare_ties_and_compute_dtype(tmp_path):
    """float32 inputs (the L1 sums in float32, where one bit of the sums would show) and compute_dtype."""
    base, fts = make_family(tmp_path / "m", n_finetunes=2, seed=6, tokenizer=False)
    params = {"weight": [0.5, 0.5], "density": [0.4, 0.6]}
    for cd in ("auto", "float32"):
        merge(_yaml("dare_ties", base, fts, params, dtype="bfloat16"), tmp_path / cd, seed=1, quiet=True,
              compute_dtype=cd)
        got = merge_pytrees("dare_ties", [_load(f) for f in fts], base=_load(base), seed=1, dtype="bfloat16",
                            compute_dtype=cd, **params)
        want = _load(tmp_path / cd)
        for n in want:
            assert np.asarray(got[n]).tobytes() == want[n].tobytes(), (cd, n)
    assert _load(tmp_path / "auto")["lm_head.weight"].tobytes() != _load(tmp_path / "float32")["lm_head.weight"].tobytes()


def test_causal_lm_params_give_the_executors_bytes(fam, tmp_path):
    from fusion_jax import hf
    from fusion_jax.hf.mapping import get_path, hf_tensors
    from fusion_jax.merging.pytree import hf_view
    root, base, fts = fam
    params = {"weight": [0.6, 0.4], "density": [0.3, 0.7]}
    merge(_yaml("dare_ties", base, fts, params), tmp_path / "out", seed=8, quiet=True)
    config, pb = hf.load(base)
    pf = [hf.load(f)[1] for f in fts]
    merged = merge_causal_lm("dare_ties", pf, base=pb, config=config, seed=8, **params)
    want = _load(tmp_path / "out")
    view = hf_view(merged, config)
    for name, row, layer in hf_tensors(config):
        assert np.asarray(view[name]).tobytes() == want[name].tobytes(), name
        ref = get_path(pb, row.path)
        out = get_path(merged, row.path)
        assert out.shape == ref.shape and out.dtype == ref.dtype


_SCRIPT = textwrap.dedent("""
    import sys, hashlib, json
    import numpy as np, jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from fusion_jax.hf.safetensors_io import SafetensorsReader
    from fusion_jax.merging.pytree import merge_pytrees
    n = len(jax.devices())
    mesh = Mesh(np.array(jax.devices()), ("x",))
    def load(p):
        with SafetensorsReader(p) as r:
            out = {}
            for k in r.names():
                a = r.get(k)
                spec = P("x") if a.shape[0] % n == 0 else P()
                out[k] = jax.device_put(a, NamedSharding(mesh, spec))
            return out
    base, fts = sys.argv[1], sys.argv[2:]
    B, F = load(base), [load(f) for f in fts]
    res = {}
    for method, params in [("dare_ties", dict(weight=[0.6, 0.4], density=[0.3, 0.7])),
                           ("ties", dict(weight=[0.6, 0.4], density=[0.3, 0.7]))]:
        out = merge_pytrees(method, F, base=B, seed=9, **params)
        kept = all(out[k].sharding.is_equivalent_to(B[k].sharding, B[k].ndim) for k in out)
        spread = max(len(out[k].sharding.device_set) for k in out)
        h = hashlib.sha256(b"".join(np.asarray(out[k]).tobytes() for k in sorted(out))).hexdigest()
        res[method] = [h, kept, spread]
    print("RESULT", json.dumps(res))
""")


def test_eight_devices_keep_shardings_and_bytes(fam):
    root, base, fts = fam
    outs = []
    for n in (1, 8):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        r = subprocess.run([sys.executable, "-c", _SCRIPT, str(base), *map(str, fts)], env=env,
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        import json
        outs.append(json.loads(r.stdout.split("RESULT", 1)[1]))
    one, eight = outs
    for method in one:
        assert eight[method][1], f"{method}: an output leaf lost its input's sharding"
        assert eight[method][2] == 8, f"{method}: nothing was sharded over the 8 devices"
        assert one[method][0] == eight[method][0], f"{method}: 8 devices changed the bytes"
