"""``OptimizerConfig(name="adafactor")`` is transformers' Adafactor as the HF Trainer builds it
(``scale_parameter=False, relative_step=False, warmup_init=False``: XFT's reference optimizer), step by step
on factored (2-D, 3-D) and unfactored (1-D) params, lr-coupled weight decay included."""
import numpy as np
import pytest

from fusion_jax.errors import ConfigError
from fusion_jax.train.optimizer import OptimizerConfig, build_optimizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SHAPES = {"a/kernel": (6, 5), "b/kernel": (3, 4, 5), "c/scale": (7,)}


def test_adafactor_matches_transformers():
    import jax
    import jax.numpy as jnp
    import optax
    from transformers.optimization import Adafactor
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    grads = [{k: (rng.standard_normal(s) * (0.1 + i)).astype(np.float32) for k, s in SHAPES.items()} for i in range(6)]
    lr, wd = 3e-2, 0.1
    # weight decay on the matrices only (our decay mask leaves 1-D params and norm scales alone)
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in p0.items()}
    opt = Adafactor([{"params": [tp["a/kernel"], tp["b/kernel"]], "weight_decay": wd},
                     {"params": [tp["c/scale"]], "weight_decay": 0.0}],
                    lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    tx, _ = build_optimizer(OptimizerConfig(name="adafactor", learning_rate=lr, schedule="constant",
                                            grad_clip=None, weight_decay=wd), p0, 100)
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state = tx.init(params)
    for g in grads:
        for k, p in tp.items():
            p.grad = torch.tensor(g[k])
        opt.step()
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k in SHAPES:
            np.testing.assert_allclose(np.asarray(params[k]), tp[k].detach().numpy(), rtol=2e-5, atol=1e-6,
                                       err_msg=k)
    assert float(jnp.abs(params["a/kernel"] - p0["a/kernel"]).max()) > 0.1
    del jax


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer.name"):
        OptimizerConfig.from_config({"name": "sgd"})
