"""Mesh config validation, the rules table, divisibility fallback, and the zoo decoder's forward on 8
simulated devices (fsdp x tensor, and data x fsdp x tensor) against one device."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from jax.sharding import PartitionSpec as P

from fusion_jax import sharding as sh
from fusion_jax.errors import ConfigError


def test_mesh_config_resolve():
    assert sh.MeshConfig().resolve(8) == (1, 8, 1, 1)
    assert sh.MeshConfig.from_any({"fsdp": 2, "tensor": -1}).resolve(8) == (1, 2, 4, 1)
    assert sh.MeshConfig.from_any({"data": -1, "tensor": 2}).resolve(8) == (4, 1, 2, 1)


@pytest.mark.parametrize("cfg,n,option", [
    ({"fsdp": -1, "tensor": -1}, 8, "mesh.tensor"),
    ({"tensor": 3}, 8, "mesh.fsdp"),
    ({"fsdp": 2, "tensor": 2}, 8, "mesh"),
    ({"fsdp": 0}, 8, "mesh.fsdp"),
    ({"bogus": 2}, 8, "mesh.bogus"),
    ({"fsdp": "2"}, 8, "mesh.fsdp"),
])
def test_mesh_config_errors(cfg, n, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        sh.MeshConfig.from_any(cfg).resolve(n)


class _FakeMesh:
    def __init__(self, **shape):
        self.shape = shape


def test_logical_to_spec_and_fallback():
    mesh = _FakeMesh(data=1, fsdp=2, tensor=4, expert=1)
    assert sh.logical_to_spec(("embed", "mlp"), (8, 16), mesh) == P("fsdp", "tensor")
    # 6 is not divisible by tensor=4: replicated on that dim
    assert sh.logical_to_spec(("embed", "mlp"), (8, 6), mesh) == P("fsdp")
    assert sh.logical_to_spec(("layers", "embed", "heads"), (2, 8, 8), mesh) == P(None, "fsdp", "tensor")
    # batch -> (data, fsdp); data has size 1 and is left out
    assert sh.logical_to_spec(("batch", "seq"), (4, 8), mesh) == P("fsdp")
    mesh2 = _FakeMesh(data=2, fsdp=4, tensor=1, expert=1)
    assert sh.logical_to_spec(("batch",), (8,), mesh2) == P(("data", "fsdp"))
    assert sh.logical_to_spec(("batch",), (2,), mesh2) == P("data")  # drops fsdp, keeps data
    # a mesh axis is used once per array
    rules = sh.make_rules({"vocab": "fsdp"})
    assert sh.logical_to_spec(("vocab", "embed"), (8, 8), mesh, rules) == P("fsdp")
    with pytest.raises(ConfigError, match="sharding.rules.vocab"):
        sh.make_rules({"vocab": "model"})
    with pytest.raises(ConfigError, match="no rule for logical axis 'bogus'"):
        sh.logical_to_spec(("bogus",), (8,), mesh)


_PARITY_SCRIPT = textwrap.dedent("""
    import os, json, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from fusion_jax import sharding as sh
    from fusion_jax.models import CausalLM, ModelConfig
    assert jax.device_count() == 8
    # the zoo's decoder; dims chosen so that most divide the mesh axes and some fall back
    # (intermediate 42 on tensor=4)
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=48, hidden_size=32, intermediate_size=42,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, sliding_window=None)
    rng = np.random.RandomState(0)
    ids = jnp.asarray(rng.randint(0, 48, (8, 12)), jnp.int32)
    mask = np.ones((8, 12), np.int32); mask[::2, :5] = 0        # left padding on half the rows
    mask = jnp.asarray(mask)
    def build():
        return CausalLM(cfg, rngs=nnx.Rngs(0))
    ref = build()
    ref_plain = np.asarray(ref(ids).logits)
    ref_masked = np.asarray(ref(ids, attention_mask=mask).logits)
    out = {}
    for shape in [{"fsdp": 2, "tensor": 4}, {"data": 2, "fsdp": 2, "tensor": 2}]:
        mesh = sh.make_mesh(shape)
        model = build()
        fwd = sh.sharded_forward(model, mesh)
        got, got_m = fwd(ids), fwd(ids, mask)
        real = np.asarray(mask, bool)
        specs = {k: str(v[...].sharding.spec) for k, v in
                 [("up", model.layers.mlp.up_proj.kernel), ("q", model.layers.attn.q_proj.kernel),
                  ("embedding", model.embed.embedding)]}
        out[json.dumps(shape)] = dict(
            err=float(np.max(np.abs(np.asarray(got) - ref_plain))),
            err_masked=float(np.max(np.abs(np.asarray(got_m) - ref_masked)[real])),
            n_shards=len(got.sharding.device_set), out_spec=str(got.sharding.spec), **specs)
    print("RESULT" + json.dumps(out))
""")


def _run_8dev(script: str, timeout=300) -> dict:
    # 8 simulated devices; XLA:CPU backend optimisation off: tiny models, compile time is the whole cost
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
    assert p.returncode == 0, p.stderr[-4000:]
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_forward_on_8_devices_matches_one():
    res = _run_8dev(_PARITY_SCRIPT)
    for shape, r in res.items():
        assert r["err"] < 2e-5 and r["err_masked"] < 2e-5, (shape, r)
        assert r["n_shards"] == 8, r
    r = res[json.dumps({"fsdp": 2, "tensor": 4})]
    assert r["up"] == str(P(None, "fsdp")), r                # intermediate 42 not divisible by tensor=4
    assert r["q"] == str(P(None, "fsdp", "tensor")), r
    assert r["embedding"] == str(P("tensor", "fsdp")), r     # vocab 48 / 4, embed 32 / 2
    assert "tensor" in r["out_spec"] and "fsdp" in r["out_spec"], r
    r = res[json.dumps({"data": 2, "fsdp": 2, "tensor": 2})]
    assert r["up"] == str(P(None, "fsdp", "tensor")), r       # 42 / 2 divides
