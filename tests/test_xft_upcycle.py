"""XFT upcycling and merge-back: a fresh upcycle computes its dense model's function under both routings;
merging identical experts returns the dense weights; the merge formula against NumPy, differentiable in
alpha; the merged model written as an HF checkpoint gives in transformers the logits our merged model
gives; ``fusion-jax upcycle`` writes what ``upcycle`` computes; bad input is a clear error, exit 2,
nothing written."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")

from fusion_jax.cli import main as cli_main  # noqa: E402
from fusion_jax.errors import ConfigError  # noqa: E402
from fusion_jax.hf import load  # noqa: E402
from fusion_jax.hf.safetensors_io import SafetensorsReader, save_tensors  # noqa: E402
from fusion_jax.models import CausalLM  # noqa: E402
from fusion_jax.xft import init_alpha, merge_back, merge_coefficients, save_merged, upcycle  # noqa: E402
from hf_fixtures import cached_tiny_hf_model, torch_reference  # noqa: E402

IDS = np.random.RandomState(1).randint(3, 160, (2, 10))
FAST = {"xla_backend_optimization_level": 0}


def _logits(config, params, key=None):
    def f(params):
        model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
        state = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state, params)
        nnx.update(model, state)
        return model(jnp.asarray(IDS), router_key=key).logits
    return np.asarray(jax.jit(f, compiler_options=FAST)(params))


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    path = cached_tiny_hf_model(tmp_path_factory, "llama", tokenizer=True)
    config, params = load(path)
    return path, config, params, _logits(config, params)


@pytest.mark.parametrize("routing,key", [("xft", None), ("xft", 5), ("topk", None)])
def test_fresh_upcycle_computes_the_dense_function(dense, routing, key):
    # Identical experts: the MoE output is (sum of the token's routing weights) x FFN(x). XFT's weights
    # are 1 - p_(1) for the shared expert plus p_(1) * softmax(p_(1..k)), which sums to p_(1): 1 in all,
    # whatever the (even noisy) logits; top-k softmax renormalises its k probabilities to 1.
    _, config, params, ref = dense
    mc, mp = upcycle(params, config, experts=6, top_k=3, routing=routing, key=jax.random.key(2))
    assert mc.architecture == ("MixtralForCausalLM" if routing == "topk" else "FusionMoeForCausalLM")
    out = _logits(mc, mp, None if key is None else jax.random.key(key))
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-5 * np.abs(ref).max())
    router = mp["layers"]["mlp"]["router"]
    assert set(router) == ({"w1", "w2", "noise"} if routing == "xft" else {"kernel"})
    w = np.asarray(router["w1" if routing == "xft" else "kernel"])
    assert abs(w.std() - 0.02) < 0.004 and abs(w.mean()) < 0.004        # N(0, 0.02) as the reference


def test_merge_back_identical_experts_returns_the_dense_weights(dense):
    _, config, params, _ = dense
    for routing in ("xft", "topk"):
        mc, mp = upcycle(params, config, experts=8, top_k=5, routing=routing)
        dc, dp = merge_back(mp, mc)
        assert dc.dense_config() == dc and not dc.is_moe
        for a, b in zip(jax.tree.leaves(dp), jax.tree.leaves(params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=0)
    c = merge_coefficients(mc.replace(router="xft", norm_topk_prob=True, architecture="FusionMoeForCausalLM",
                                      base_architecture="LlamaForCausalLM"), np.ones((2, 7)))
    np.testing.assert_allclose(np.asarray(c), np.tile([0.75] + [0.25 / 7] * 7, (2, 1)), rtol=1e-6)


def test_learned_merge_matches_numpy_is_differentiable_and_transformers_agrees(dense, tmp_path):
    """Perturbed experts and a random alpha: W = 0.75 W_0 + 0.25 sum_i softmax(alpha)_i W_i per layer for
    gate, up and down (float64 NumPy); the gradient reaches alpha; the exported dense checkpoint gives in
    transformers the logits our merged params give."""
    src, config, params, _ = dense
    mc, mp = upcycle(params, config, experts=4, top_k=2, routing="xft")
    rng = np.random.default_rng(0)
    ex = mp["layers"]["mlp"]["experts"]
    for k in ex:
        w = np.asarray(ex[k]["kernel"])
        ex[k]["kernel"] = jnp.asarray(w + 0.05 * rng.standard_normal(w.shape).astype(np.float32))
    alpha = jnp.asarray(rng.standard_normal((2, 3)), jnp.float32)
    dc, dp = merge_back(mp, mc, alpha)
    a = np.asarray(alpha, np.float64)
    sm = np.exp(a) / np.exp(a).sum(-1, keepdims=True)
    coef = np.concatenate([np.full((2, 1), 0.75), 0.25 * sm], -1)
    for k in ("gate_proj", "up_proj", "down_proj"):
        want = np.einsum("le,le...->l...", coef, np.asarray(ex[k]["kernel"], np.float64))
        np.testing.assert_allclose(np.asarray(dp["layers"]["mlp"][k]["kernel"]), want, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda al: sum(jnp.sum(merge_back(mp, mc, al)[1]["layers"]["mlp"][k]["kernel"] ** 2)
                                for k in ("gate_proj", "down_proj")))(alpha)
    assert g.shape == (2, 3) and float(jnp.abs(g).max()) > 0
    out = save_merged(mp, mc, tmp_path / "dense", alpha, source_dir=src)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    with torch.no_grad():
        hf = torch_reference(out)(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(hf, _logits(dc, dp), atol=1e-4, rtol=0)
    assert (out / "tokenizer.json").is_file()


def test_cli_upcycle_writes_what_upcycle_computes_and_transformers_loads_topk(dense, tmp_path):
    src, config, params, ref = dense
    assert cli_main(["upcycle", str(src), str(tmp_path / "xft"), "--experts", "4", "--top-k", "2",
                     "--seed", "3"]) == 0
    mc, mp = upcycle(params, config, experts=4, top_k=2, key=jax.random.key(3))
    c2, p2 = load(tmp_path / "xft")
    assert c2 == mc
    for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(mp)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (tmp_path / "xft" / "tokenizer.json").is_file()
    # top-k routing over a Llama is a plain Mixtral: transformers runs it, and it is the dense function
    assert cli_main(["upcycle", str(src), str(tmp_path / "mix"), "--experts", "4", "--top-k", "2",
                     "--routing", "topk"]) == 0
    assert json.loads((tmp_path / "mix" / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    with torch.no_grad():
        hf = torch_reference(tmp_path / "mix")(torch.tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(hf, ref, atol=1e-4, rtol=0)


def _no_ffn_checkpoint(src, out):
    with SafetensorsReader(src) as r:
        t = {n: r.get(n) for n in r.names() if ".mlp." not in n}
    save_tensors(out, t)
    (out / "config.json").write_bytes((src / "config.json").read_bytes())
    return out


@pytest.mark.parametrize("case", ["top_k_ge_experts", "top_k_zero", "no_ffn", "already_moe", "one_expert"])
def test_bad_upcycle_input_is_a_clear_error_exit_2_nothing_written(dense, tmp_path, tmp_path_factory, case, capsys):
    src = dense[0]
    args, match = {
        "top_k_ge_experts": ([str(src), "--experts", "8", "--top-k", "8"], "--top-k 8"),
        "top_k_zero": ([str(src), "--top-k", "0"], "--top-k 0"),
        "no_ffn": ([str(_no_ffn_checkpoint(src, tmp_path / "noffn"))], "no FFN to upcycle"),
        "already_moe": ([str(cached_tiny_hf_model(tmp_path_factory, "mixtral"))], "already a mixture of experts"),
        "one_expert": ([str(src), "--experts", "1", "--top-k", "1"], "--experts 1"),
    }[case]
    out = tmp_path / "out"
    assert cli_main(["upcycle", args[0], str(out), *args[1:]]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and match in err and "Traceback" not in err
    assert not out.exists()


def test_upcycle_and_merge_errors_in_the_api(dense):
    _, config, params, _ = dense
    with pytest.raises(ConfigError, match="no FFN to upcycle"):
        upcycle({k: v for k, v in params.items() if k != "layers"} | {"layers": {}}, config)
    mc, mp = upcycle(params, config, experts=4, top_k=2)
    with pytest.raises(ConfigError, match="already a mixture"):
        upcycle(mp, mc)
    with pytest.raises(Exception, match=r"alpha has shape \[2, 4\]"):
        merge_back(mp, mc, jnp.ones((2, 4)))
    with pytest.raises(ConfigError, match="not a mixture"):
        merge_back(params, config)
    assert init_alpha(mc).shape == (2, 3)
