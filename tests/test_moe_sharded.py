"""Expert parallelism on 8 simulated devices equals one device: an XFT MoE's loss, logits, balance loss
and every gradient (noisy gating on), with the experts split over the mesh's ``expert`` axis (8, and
4 x fsdp 2); the expert matmuls really run under shard_map (a reduce-scatter over ``expert`` appears)."""
from __future__ import annotations

import textwrap

from test_sharding import _run_8dev

_SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from fusion_jax import sharding as sh
    from fusion_jax.models import CausalLM, ModelConfig
    assert jax.device_count() == 8
    cfg = ModelConfig(architecture="FusionMoeForCausalLM", base_architecture="LlamaForCausalLM", vocab_size=48,
                      hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      num_experts=8, num_experts_per_tok=5, router="xft", router_noise=True)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 48, (8, 12)), jnp.int32)
    graphdef, state = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    key = jax.random.key(5)

    def loss(state, ids):
        out = nnx.merge(graphdef, state)(ids, router_key=key)
        return jnp.mean(out.logits ** 2) + out.aux.balance_loss, (out.logits, out.aux.balance_loss)

    step = jax.value_and_grad(loss, has_aux=True)
    (l0, (lg0, b0)), g0 = jax.jit(step)(state, ids)
    res = {}
    for shape in ({"expert": 8, "fsdp": 1}, {"expert": 4, "fsdp": 2}):
        mesh = sh.make_mesh(shape)
        st = jax.device_put(state, sh.model_state_shardings(state, mesh))
        x = jax.device_put(ids, jax.sharding.NamedSharding(mesh, sh.batch_spec(2, ids.shape, mesh)))
        with jax.set_mesh(mesh):
            f = jax.jit(step)
            hlo = f.lower(st, x).as_text()
            (l, (lg, b)), g = f(st, x)
        res[json.dumps(shape)] = dict(
            loss=abs(float(l - l0)), logits=float(jnp.abs(lg - lg0).max()), balance=abs(float(b - b0)),
            grads=max(float(jnp.abs(a - c).max() / (jnp.abs(c).max() + 1e-30))
                      for a, c in zip(jax.tree.leaves(g), jax.tree.leaves(g0))),
            reduce_scatter="reduce_scatter" in hlo,
            balance_value=float(b0))
    print("RESULT" + json.dumps(res))
""")


def test_expert_parallel_on_8_devices_equals_one_device():
    res = _run_8dev(_SCRIPT, timeout=600)
    for shape, r in res.items():
        assert r["loss"] < 1e-6 and r["logits"] < 1e-5 and r["balance"] < 1e-7, (shape, r)
        assert r["grads"] < 1e-4, (shape, r)
        assert r["reduce_scatter"], (shape, r)       # the experts' shard_map path, not a gather of all
        assert r["balance_value"] > 0
