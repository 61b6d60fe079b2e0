"""Every deterministic mergekit method, kernel against kernel, in float32, bfloat16 and float16: the
same tensors through ``mergekit.merge_methods.api.merge_tensors`` (mergekit 0.1.5, torch on the CPU)
and through fusion-jax's ``merge_group`` in the merge dtype.

In 16-bit dtypes fusion-jax rounds after each step as torch does, so the results are equal element for
element; the only allowed differences are (a) ties at a magnitude cut, where mergekit's unstable torch
sort keeps an unspecified subset and fusion-jax the lowest flat indices (checked: every differing
element is such a tie), and (b) karcher, whose float32 norms torch sums in an order of its own: one
unit in the last place. In float32 the methods without whole-tensor sums are exact too; those with
sums agree to float32 rounding (torch's summation order is not reproducible).
"""
from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("mergekit")

from fusion_jax.merging.methods import METHODS, merge_group  # noqa: E402
from fusion_jax.merging.precision import rounder  # noqa: E402
from fusion_jax.merging.task_vectors import magnitude_k, outlier_window, seq_sum  # noqa: E402

TD = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ND = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
DTYPES = ("float32", "bfloat16", "float16")


def _data(dt, n=3, shape=(64, 96), seed=0):
    r = np.random.default_rng(seed)
    base = (r.standard_normal(shape) * 0.05).astype(np.float32)
    xs = [base + 0.01 * r.standard_normal(shape).astype(np.float32) for _ in range(n)]
    return [a.astype(ND[dt]) for a in [base] + xs]


def _run(method, arrays, base_index, dt, shared=None, non_base=None, per_input=None):
    """(fusion-jax, mergekit) results as float32 arrays of dtype-``dt`` values."""
    from mergekit.merge_methods.api import merge_tensors
    spec = METHODS[method]
    shared, non_base = dict(shared or {}), list(non_base or [])
    nb = [i for i in range(len(arrays)) if i != base_index]
    params = dict(shared)
    for p in spec.params:
        if p.scope == "non_base" and any(p.name in d for d in non_base):
            params[p.name] = [d.get(p.name, p.default) for d in non_base]
        if p.scope == "input" and per_input:
            params[p.name] = [d[p.name] for d in per_input]
    tens = [torch.from_numpy(a.astype(np.float32)).to(TD[dt]) for a in arrays]
    ref = merge_tensors(tens, method, parameters=params, base_index=base_index, dtype=TD[dt])
    ref = ref.to(TD[dt]).float().numpy()
    sh = {p.name: shared.get(p.name, p.default) for p in spec.params if p.scope == "shared"}
    pin = [dict(per_input[i]) if per_input else {} for i in range(len(arrays))]
    for j, i in enumerate(nb):
        for p in spec.params:
            if p.scope == "non_base":
                pin[i][p.name] = (non_base[j] if j < len(non_base) else {}).get(p.name, p.default)
    got = np.asarray(merge_group(spec, arrays, base_index, sh, pin, dtype=dt)).astype(ND[dt]).astype(np.float32)
    return got, ref


def _cut_ties(arrays, dt, densities, gammas=None):
    """Elements where some model's |delta| equals a value at its magnitude cut (the ties mergekit's
    unstable sort resolves its own way)."""
    R = rounder(dt)
    b = R(jnp.asarray(arrays[0].astype(np.float32)))
    out = np.zeros(arrays[0].shape, bool)
    for j, x in enumerate(arrays[1:]):
        d = np.abs(np.asarray(R(R(jnp.asarray(x.astype(np.float32))) - b)))
        desc = np.sort(d.reshape(-1))[::-1]
        if gammas is None:
            pos = [magnitude_k(densities[j], d.size) - 1]
        else:
            bot, tgt = outlier_window(densities[j], gammas[j], d.size)
            pos = [d.size - 1 - p for p in (bot - 1, bot, bot + tgt - 1, bot + tgt)]
        for p in pos:
            if 0 <= p < d.size:
                out |= d == desc[p]
    return out


ELEMENTWISE = {  # no whole-tensor sums: exact in every dtype
    "task_arithmetic": dict(shared={"lambda": 0.9}, non_base=[{"weight": 0.7}, {"weight": 0.3}, {"weight": -0.2}]),
    "linear": dict(per_input=[{"weight": w} for w in (0.2, 0.5, 0.3, 1.0)]),
    "nearswap": dict(shared={"t": 0.001}, n=1),
    "ram": dict(shared={"epsilon": 0.005}),
    "ramplus_tl": dict(shared={"epsilon": 0.005, "r": 0.3, "alpha": 0.5}),
    "passthrough": dict(per_input=[{"scale": 0.7}], n=0, base=None),
}
REDUCING = {  # whole-tensor or row sums: exact in 16-bit, float32 rounding in float32
    "slerp": dict(shared={"t": 0.3}, n=1),
    "nuslerp": dict(non_base=[{"weight": 0.3}, {"weight": 0.7}], n=2),
    "nuslerp_rows": dict(method="nuslerp", shared={"nuslerp_flatten": False, "nuslerp_row_wise": True},
                         non_base=[{"weight": 0.3}, {"weight": 0.7}], n=2, base=None),
    "multislerp": dict(non_base=[{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]),
    "multislerp_nobase": dict(method="multislerp", non_base=[{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}],
                              base=None),
    "model_stock": dict(),
    "sce": dict(),
    "arcee_fusion": dict(n=1),
}


def _case(name, spec, dt):
    n = spec.get("n", 3)
    arrays = _data(dt)[: n + 1]
    base = spec.get("base", 0)
    if base is None and name != "passthrough":
        arrays = arrays[1:]
    if name == "linear":
        base = None
    if name == "passthrough":
        arrays = arrays[:1]
    return _run(spec.get("method", name), arrays, base, dt, spec.get("shared"), spec.get("non_base"),
                spec.get("per_input"))


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("name", sorted(ELEMENTWISE))
def test_elementwise_methods_are_exact(name, dt):
    got, ref = _case(name, ELEMENTWISE[name], dt)
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("name,dt", [(n, d) for n in sorted(REDUCING) for d in ("bfloat16", "float16")]
                         + [("slerp", "float32"), ("multislerp", "float32"), ("arcee_fusion", "float32")])
def test_reducing_methods(name, dt):
    got, ref = _case(name, REDUCING[name], dt)
    if dt == "float32" and name == "arcee_fusion":
        # a float32 difference in the KL sums may move an element across the outlier threshold
        assert (got != ref).mean() < 1e-3
    elif dt == "float32":
        np.testing.assert_allclose(got, ref, rtol=3e-6, atol=2e-7)
    else:
        ulp = np.spacing(np.abs(ref).astype(ND[dt])).astype(np.float32)
        assert (np.abs(got - ref) <= ulp).all(), name
        assert (got != ref).sum() <= 2, f"{name}: {(got != ref).sum()} elements differ"  # slerp: float32 norms


_CUTS = [("ties", {}), ("ties", {"normalize": False, "lambda": 0.8}), ("ties", {"rescale": True}),
         ("breadcrumbs", {}), ("breadcrumbs_ties", {"rescale": True})]


@pytest.mark.parametrize("method,extra,dt", [(m, e, d) for m, e in _CUTS for d in ("bfloat16", "float16")]
                         + [("ties", {}, "float32"), ("ties", {"rescale": True}, "float32")])
def test_magnitude_cut_differences_are_ties(method, extra, dt):
    dens = [0.5, 0.3, 0.7] if method == "ties" else [0.8, 0.9, 0.7]
    gam = None if method == "ties" else [0.05, 0.01, 0.02]
    nb = [{"weight": w, "density": d, **({"gamma": g} if gam else {})}
          for w, d, g in zip((0.5, 0.3, 0.4), dens, gam or [0] * 3)]
    arrays = _data(dt)
    got, ref = _run(method, arrays, 0, dt, extra, nb)
    ties = _cut_ties(arrays, dt, dens, gam)
    if dt == "float32" and extra.get("rescale"):  # the L1 ratio is a float32 sum in our order, not torch's
        np.testing.assert_allclose(got[~ties], ref[~ties], rtol=1e-6, atol=2e-8)
        return
    assert not ((got != ref) & ~ties).any(), f"{((got != ref) & ~ties).sum()} differences off the cut"


@pytest.mark.parametrize("dt", ["bfloat16"])
def test_sce_differs_only_by_the_tied_elements_its_selection_keeps(dt, monkeypatch):
    """SCE's top-k by variance ties in 16 bits too: mergekit's torch.topk keeps its own subset of the
    tied elements, fusion-jax the lowest indices; the selection changes the weights, so the whole
    tensor moves. Shown here: the two selections differ only at the cut, and with mergekit's selection
    fusion-jax's SCE is mergekit's element for element."""
    from mergekit.merge_methods.sce import sce_mask

    from fusion_jax.merging import elementwise
    arrays = _data(dt)
    R = rounder(dt)
    b = R(jnp.asarray(arrays[0].astype(np.float32)))
    tvs = [R(R(jnp.asarray(x.astype(np.float32))) - b) for x in arrays[1:]]
    mean = seq_sum(tvs) / 3
    var = np.abs(np.asarray(R(seq_sum([(t - mean) ** 2 for t in tvs]) / 3)))
    k = int(np.float32(np.count_nonzero(var)) * np.float32(0.5))
    cut = np.sort(var.reshape(-1))[::-1][k - 1]
    tb = torch.from_numpy(arrays[0].astype(np.float32)).to(TD[dt])
    tv = torch.stack([torch.from_numpy(x.astype(np.float32)).to(TD[dt]) - tb for x in arrays[1:]])
    theirs = sce_mask(tv, 0.5, TD[dt]).float().numpy() != 0
    ours = np.asarray(elementwise._sce_select(tvs, 0.5, R, False))
    assert theirs.sum() == ours.sum() and (var[theirs != ours] == cut).all()
    monkeypatch.setattr(elementwise, "_sce_select", lambda *a, **k: jnp.asarray(theirs))
    got, ref = _run("sce", arrays, 0, dt, {"select_topk": 0.5})
    np.testing.assert_array_equal(got, ref)


def _ulp_at(x: float, dt: str) -> float:
    mant = {"float32": 23, "bfloat16": 7, "float16": 10}[dt]
    return 2.0 ** (np.floor(np.log2(x)) - mant)


@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_karcher_within_one_unit_of_the_tensor_scale(dt):
    """mergekit's Karcher iteration does not converge below its tolerance in 16 bits (the tangent norm
    stays ~1e-3), so both results carry noise of one unit in the last place of the tensor's scale; the
    float32 norms are summed in different orders, which changes which way that noise goes."""
    got, ref = _run("karcher", _data(dt), None, dt)
    assert np.abs(got - ref).max() <= (2 if dt == "float32" else 1) * _ulp_at(np.abs(ref).max(), dt)


def test_rounders_match_numpy_casts_inside_jit():
    """16-bit rounding survives XLA:CPU's fusion (float16 subnormals included), and a float32
    multiply-add under fma_guard rounds twice like torch instead of fusing."""
    import jax

    from fusion_jax.merging.precision import barrier, fma_guard, guard_ones
    x = np.concatenate([np.random.default_rng(0).standard_normal(4096).astype(np.float32) * s
                        for s in (1e-6, 1e-4, 1e-2, 1.0, 7e4)])
    for dt, nd in (("float16", np.float16), ("bfloat16", ml_dtypes.bfloat16)):
        R = rounder(dt)
        got = np.asarray(jax.jit(lambda a, b: R(R(a * b) + a))(x, x[::-1].copy()))
        with np.errstate(over="ignore"):
            want = ((x * x[::-1]).astype(nd).astype(np.float32) + x).astype(nd).astype(np.float32)
        np.testing.assert_array_equal(got, want)

    def f(b, m, ones):
        with fma_guard(ones):
            return b + barrier(m * jnp.float32(0.9))

    b, m = np.random.default_rng(1).standard_normal((2, 1 << 14)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(b, m, guard_ones())), b + m * np.float32(0.9))


def test_compute_dtype_float32_is_the_exact_merge():
    """compute_dtype float32 (every step in float32, one rounding) is closer to the float64 formula
    than mergekit's per-step float16 arithmetic."""
    arrays = _data("float16")
    spec = METHODS["task_arithmetic"]
    pin = [{}] + [{"weight": w} for w in (0.7, 0.3, -0.2)]
    sh = {"int8_mask": False, "normalize": False, "rescale": False, "lambda": 0.9}
    exact = np.asarray(merge_group(spec, arrays, 0, sh, pin, dtype="float32"))
    stepwise = np.asarray(merge_group(spec, arrays, 0, sh, pin, dtype="float16"))
    x = [a.astype(np.float64) for a in arrays]
    ref = x[0] + 0.9 * sum(w * (xi - x[0]) for w, xi in zip((0.7, 0.3, -0.2), x[1:]))
    err_exact = np.abs(exact.astype(np.float16).astype(np.float64) - ref).mean()
    err_step = np.abs(stepwise.astype(np.float64) - ref).mean()
    assert err_exact < err_step
