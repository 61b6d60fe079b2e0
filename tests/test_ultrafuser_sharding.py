"""8 simulated devices (data x fsdp x tensor mesh) give the same fused loss and gradients as one."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from fusion_jax import sharding as shd
    from fusion_jax.models import CausalLM, ModelConfig
    from fusion_jax.ultrafuser.model import FusedModel

    assert jax.device_count() == 8
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)
    fm = FusedModel.from_models([CausalLM(cfg, rngs=nnx.Rngs(i)) for i in range(3)], ["a", "b", "c"],
                                gate_hidden=16, key=jax.random.key(1))
    # a non-trivial gate (the initial one is uniform)
    fm.gate["w2"] = jax.random.normal(jax.random.key(2), fm.gate["w2"].shape)
    rng = np.random.default_rng(0)
    B, K, S = 8, 3, 16
    ids = rng.integers(1, 64, (B, K, S)).astype(np.int32)
    att = np.ones((B, K, S), np.int32)
    att[:, :, :3] = 0                      # left padding
    att[::2, 1, :5] = 0                    # different prompt lengths per template
    lm = np.zeros((B, S), np.int32)
    lm[:, 8:] = 1
    batch = {"input_ids": ids, "attention_mask": att, "loss_mask": lm}
    loss_fn = fm.trainer_loss_fn(chunk=8)
    f = lambda p, b: jax.value_and_grad(lambda q: loss_fn(q, b, None)[0])(p)
    out = {}
    for name, mesh_cfg, devs in (("one", {}, jax.devices()[:1]),
                                 ("eight", {"data": 2, "fsdp": 2, "tensor": 2}, jax.devices())):
        mesh = shd.make_mesh(mesh_cfg or None, devices=devs)
        params = fm.train_params()
        p_sh = shd.logical_to_mesh_sharding(fm.train_logical_axes(), mesh, shapes=params)
        b_sh = {k: NamedSharding(mesh, shd.logical_to_spec(("batch",) + (None,) * (v.ndim - 1), v.shape, mesh))
                for k, v in batch.items()}
        loss, g = jax.jit(f, in_shardings=(p_sh, b_sh))(jax.device_put(params, p_sh), jax.device_put(batch, b_sh))
        sharded = sum(len(set(x.sharding.spec) - {None}) > 0 for x in jax.tree.leaves(jax.device_put(params, p_sh)))
        out[name] = {"loss": float(loss), "grads": [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(g)],
                     "sharded_leaves": sharded}
    print("RESULT" + json.dumps(out))
""")


def test_eight_devices_same_fused_loss_and_grads_as_one():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(next(l for l in r.stdout.splitlines() if l.startswith("RESULT"))[len("RESULT"):])
    one, eight = res["one"], res["eight"]
    assert eight["sharded_leaves"] > 0 and one["sharded_leaves"] == 0
    import numpy as np
    np.testing.assert_allclose(eight["loss"], one["loss"], rtol=1e-5)
    for a, b in zip(one["grads"], eight["grads"]):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
