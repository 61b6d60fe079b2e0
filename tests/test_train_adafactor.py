"""``OptimizerConfig(name="adafactor")`` is transformers' Adafactor as the HF Trainer builds it
(``scale_parameter=False, relative_step=False, warmup_init=False``: XFT's reference optimizer), step by step
on factored (2-D, 3-D) and unfactored (1-D) tensors, lr-coupled weight decay included; params that stack
one tensor per layer (our layout) are updated as transformers updates the separate tensors."""
import numpy as np
import pytest

from fusion_jax.errors import ConfigError
from fusion_jax.train.optimizer import OptimizerConfig, build_optimizer

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

# path -> (shape, leading stacked dims): "s/..." are stacks of L=3 tensors (kernels, alpha-like vectors)
SHAPES = {"a/kernel": ((6, 5), 0), "b/kernel": ((3, 4, 5), 0), "c/scale": ((7,), 0),
          "s/kernel": ((3, 6, 5), 1), "s/alpha": ((3, 7), 1)}


def test_adafactor_matches_transformers():
    import jax.numpy as jnp
    import optax
    from transformers.optimization import Adafactor
    rng = np.random.default_rng(0)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, (s, _) in SHAPES.items()}
    grads = [{k: (rng.standard_normal(s) * (0.1 + i) * np.linspace(0.2, 3, s[0]).reshape((-1,) + (1,) * (len(s) - 1))
                  ).astype(np.float32) for k, (s, _) in SHAPES.items()} for i in range(6)]
    lr, wd = 3e-2, 0.1
    # transformers: every stacked slice its own tensor; weight decay on the matrices (our decay mask leaves
    # 1-D params, norm scales and "alpha" -- not a kernel, 2-D when stacked -- to the mask's rules)
    torch_p = {}
    for k, (s, lead) in SHAPES.items():
        torch_p[k] = ([torch.nn.Parameter(torch.tensor(x)) for x in p0[k]] if lead
                      else [torch.nn.Parameter(torch.tensor(p0[k]))])
    decayed = ("a/kernel", "b/kernel", "s/kernel", "s/alpha")
    opt = Adafactor([{"params": [p for k in decayed for p in torch_p[k]], "weight_decay": wd},
                     {"params": torch_p["c/scale"], "weight_decay": 0.0}],
                    lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
    cfg = OptimizerConfig(name="adafactor", learning_rate=lr, schedule="constant", grad_clip=None, weight_decay=wd,
                          weight_decay_exclude=("scale",))
    tx, _ = build_optimizer(cfg, p0, 100, stacked={k: lead for k, (_, lead) in SHAPES.items()})
    params = {k: jnp.asarray(v) for k, v in p0.items()}
    state = tx.init(params)
    for g in grads:
        for k, (s, lead) in SHAPES.items():
            for j, p in enumerate(torch_p[k]):
                p.grad = torch.tensor(g[k][j] if lead else g[k])
        opt.step()
        updates, state = tx.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
        params = optax.apply_updates(params, updates)
        for k, (s, lead) in SHAPES.items():
            ref = np.stack([p.detach().numpy() for p in torch_p[k]]) if lead else torch_p[k][0].detach().numpy()
            np.testing.assert_allclose(np.asarray(params[k]), ref, rtol=2e-5, atol=1e-6, err_msg=k)
    assert float(jnp.abs(params["s/kernel"] - p0["s/kernel"]).max()) > 0.1


def test_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError, match="optimizer.name"):
        OptimizerConfig.from_config({"name": "sgd"})
