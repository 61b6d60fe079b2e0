"""Each merge method against an independent float64 NumPy implementation of its formula, and the
DARE randomness properties (kept fraction, unbiasedness, determinism, order independence)."""
from __future__ import annotations

import numpy as np
import pytest

from fusion_jax.merging import elementwise as E, geometry as G, task_vectors as T
from fusion_jax.merging import rng


def _data(seed=0, n=3, shape=(48, 40)):
    r = np.random.default_rng(seed)
    base = r.standard_normal(shape)
    others = [base + 0.05 * r.standard_normal(shape) for _ in range(n)]
    return base, others


def _f32(x):
    return [np.asarray(a, np.float32) for a in x]


def ref_gta(base, others, w, dens, sparsify, consensus, normalize, lam=1.0, gamma=None, masks=None):
    ds = []
    for i, x in enumerate(others):
        d = x - base
        if sparsify == "magnitude":
            k = max(1, int(dens[i] * d.size))
            m = np.zeros(d.size, bool)
            m[np.argsort(-np.abs(d).ravel(), kind="stable")[:k]] = True
            d = np.where(m.reshape(d.shape), d, 0)
        elif sparsify == "outliers":
            n = d.size
            tgt, top = int(dens[i] * n), int(gamma * n)
            bot = max(0, n - tgt - top)
            m = np.zeros(n, bool)
            m[np.argsort(np.abs(d).ravel(), kind="stable")[bot:bot + tgt]] = True
            d = np.where(m.reshape(d.shape), d, 0)
        elif masks is not None:
            d = np.where(masks[i], d, 0)
        ds.append(d * w[i])
    D = np.stack(ds)
    W = np.asarray(w, np.float64).reshape(-1, *([1] * base.ndim))
    if consensus:
        maj = np.where(D.sum(0) >= 0, 1, -1)
        agree = np.sign(D) == maj
        mixed = (D * agree).sum(0)
        div = (W * agree).sum(0)
        div[div == 0] = 1
    else:
        mixed = D.sum(0)
        div = W.sum(0) if abs(W.sum()) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / div
    return base + lam * mixed


@pytest.mark.parametrize("cfg", [
    ("task_arithmetic", None, None, False), ("ties", "magnitude", "sum", True),
    ("magnitude_prune", "magnitude", None, False), ("breadcrumbs", "outliers", None, False),
    ("breadcrumbs_ties", "outliers", "sum", False)])
def test_task_vector_family(cfg):
    name, sp, cons, norm = cfg
    base, others = _data(1)
    w, dens = [0.5, 0.3, 0.9], [0.4, 0.6, 0.8]
    got = T.task_vector_merge(*_f32([base]), _f32(others), weights=w, densities=dens,
                              sparsification={"outliers": "magnitude_outliers"}.get(sp, sp), consensus=cons,
                              normalize=norm, lambda_=0.8, gammas=[0.02] * 3)
    b32, o32 = np.float32(base).astype(np.float64), [np.float32(o).astype(np.float64) for o in others]
    ref = ref_gta(b32, o32, w, dens, sp, cons, norm, 0.8, 0.02)
    np.testing.assert_allclose(np.asarray(got), ref, atol=2e-6)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_dare(exact, ties):
    base, others = _data(2)
    dens = [0.3, 0.5, 0.9]
    w = [0.5, 0.3, 0.2]
    streams = [rng.tensor_stream(7, "t", j) for j in range(3)]
    got = T.task_vector_merge(np.float32(base), _f32(others), weights=w, densities=dens, sparsification="random",
                              consensus="sum" if ties else None, rescale="inverse" if exact else "l1",
                              streams=streams)
    masks = [rng.keep_mask_np(base.shape, d, s) for d, s in zip(dens, streams)]
    b = np.float32(base).astype(np.float64)
    ds = []
    for x, m, d in zip(others, masks, dens):
        delta = np.float32(x).astype(np.float64) - b
        kept = np.where(m, delta, 0)
        ds.append(kept / d if exact else kept * np.abs(delta).sum() / np.abs(kept).sum())
    ref = ref_gta(b, [b + d for d in ds], w, [1] * 3, None, "sum" if ties else None, False)
    np.testing.assert_allclose(np.asarray(got), ref, atol=3e-6)


def test_keep_mask_jax_matches_numpy():
    import jax.numpy as jnp
    s = rng.tensor_stream(3, "model.layers.0.mlp.up_proj.weight", 1)
    a = np.asarray(rng.keep_mask((1000, 33), jnp.uint32(rng.threshold(0.3)), s, 12345))
    b = rng.keep_mask_np((1000, 33), 0.3, s, 12345)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dare_kept_fraction_and_unbiased(p):
    n = 1 << 20
    s = rng.tensor_stream(0, "w", 0)
    keep = rng.keep_mask_np((n,), 1 - p, s)
    sigma = np.sqrt(n * p * (1 - p))
    assert abs(keep.sum() - n * (1 - p)) < 3 * sigma
    delta = np.random.default_rng(0).standard_normal(n) * 0.01 + 0.003
    d = np.asarray(T.sparsify(np.float32(delta), method="random", density=1 - p, rescale="inverse", stream=s))
    # E[rescaled] = delta: the mean difference is within 3 standard errors
    diff = d - np.float32(delta)
    assert abs(diff.mean()) < 3 * diff.std() / np.sqrt(n)


def test_dare_independent_of_streams_per_tensor_name():
    a = rng.tensor_stream(0, "a", 0)
    assert a == rng.tensor_stream(0, "a", 0)
    assert len({a, rng.tensor_stream(0, "b", 0), rng.tensor_stream(0, "a", 1), rng.tensor_stream(1, "a", 0)}) == 4


def test_slerp_nuslerp_model_stock_linear():
    base, (x0, x1, x2) = _data(3)
    b, a0, a1, a2 = (np.float32(v).astype(np.float64) for v in (base, x0, x1, x2))
    # slerp
    t = 0.3
    u, v = b / np.linalg.norm(b), a0 / np.linalg.norm(a0)
    th = np.arccos(np.clip((u * v).sum(), -1, 1))
    ref = np.sin((1 - t) * th) / np.sin(th) * b + np.sin(t * th) / np.sin(th) * a0
    np.testing.assert_allclose(np.asarray(G.slerp(t, np.float32(base), np.float32(x0))), ref, atol=3e-5)
    # nuslerp with a base, flattened
    d0, d1 = a0 - b, a1 - b
    tt = 0.7 / (0.3 + 0.7)
    th = np.arccos(np.clip((d0 / np.linalg.norm(d0) * d1 / np.linalg.norm(d1)).sum(), -1, 1))
    ref = b + (np.sin((1 - tt) * th) * d0 + np.sin(tt * th) * d1) / np.sin(th)
    got = G.nuslerp([np.float32(x0), np.float32(x1)], [0.3, 0.7], np.float32(base))
    np.testing.assert_allclose(np.asarray(got), ref, atol=3e-5)
    # model stock
    offs = [a - b for a in (a0, a1, a2)]
    cos = np.mean([(offs[i] * offs[j]).sum() / np.linalg.norm(offs[i]) / np.linalg.norm(offs[j])
                   for i in range(3) for j in range(i + 1, 3)])
    tms = 3 * cos / (1 + 2 * cos)
    ref = tms * (a0 + a1 + a2) / 3 + (1 - tms) * b
    got = G.model_stock(np.float32(base), [np.float32(x) for x in (x0, x1, x2)])
    np.testing.assert_allclose(np.asarray(got), ref, atol=3e-5)
    # linear
    got = E.linear([np.float32(x) for x in (x0, x1)], [0.25, 0.5])
    np.testing.assert_allclose(np.asarray(got), (0.25 * a0 + 0.5 * a1) / 0.75, atol=3e-6)


def test_varm_and_sce():
    base, others = _data(4)
    b = np.float32(base).astype(np.float64)
    xs = [np.float32(o).astype(np.float64) for o in others]
    v = np.array([np.mean((x - b) ** 2) for x in xs])
    ref = sum(w * x for w, x in zip(v / v.sum(), xs))
    np.testing.assert_allclose(np.asarray(E.varm(np.float32(base), _f32(others))), ref, atol=3e-6)
    for variant in ("mergekit", "fusechat"):
        k = 0.3
        tv = np.stack([x - b for x in xs])
        var = tv.var(0)
        kk = int(np.count_nonzero(var) * k)
        sel = np.zeros(var.size, bool)
        sel[np.argsort(-var.ravel(), kind="stable")[:kk]] = True
        sel = sel.reshape(var.shape)
        masked = tv * sel
        w = (masked ** 2).reshape(3, -1).mean(1)
        w = w / w.sum()
        use = masked if variant == "mergekit" else tv
        maj = np.where(use.sum(0) >= 0, 1, -1)
        keep = np.sign(use) == maj
        ew = w[:, None, None] * keep
        div = ew.sum(0)
        div = np.maximum(div, 1e-6) if variant == "mergekit" else np.where(div == 0, 1, div)
        ref = b + (use * ew).sum(0) / div
        got = E.sce(np.float32(base), _f32(others), k, variant)
        np.testing.assert_allclose(np.asarray(got), ref, atol=3e-6, err_msg=variant)


def test_della_keep_probabilities():
    base, others = _data(5, 1, (64, 512))
    d = np.float32(others[0] - base)
    p = np.asarray(T.della_probs(d, 0.3, 0.2))
    assert p.min() == pytest.approx(0.3) and p.max() == pytest.approx(0.7)
    # larger magnitude -> larger keep probability, per row
    row = np.abs(d[0])
    assert np.all(np.diff(p[0][np.argsort(row)]) > 0)
    s = rng.tensor_stream(0, "x", 0)
    got = np.asarray(T.sparsify(d, method="della", density=0.5, epsilon=0.2, rescale="inverse", stream=s))
    kept = got != 0
    assert abs(kept.mean() - 0.5) < 0.02
    np.testing.assert_allclose(got[kept], (d / p)[kept], rtol=1e-5)


@pytest.mark.parametrize("n,offset", [(4096, 0), (1 << 16, 3 << 16)])
def test_l1_sums_are_the_fixed_halving_tree(n, offset):
    """The streaming executor's L1 statistics: each partial is the halving tree over ROW elements in a
    fixed order, so float32 NumPy adds in that order give the same bits (and float64 agrees)."""
    import ml_dtypes

    from fusion_jax.merging import kernels
    r = np.random.default_rng(1)
    base = (r.standard_normal(n) * 0.02).astype(ml_dtypes.bfloat16)
    xs = [(base.astype(np.float32) + r.standard_normal(n) * 1e-3).astype(ml_dtypes.bfloat16) for _ in range(2)]
    streams, dens = np.array([11, 12], np.uint32), (0.3, 0.8)
    thr = np.array([rng.threshold(d) for d in dens], np.uint32)
    got = np.asarray(kernels.l1_sums(base, tuple(xs), streams, thr, np.uint32(offset), np.uint32(0xFFFFFFFF),
                                     dtype="bfloat16"))
    blocks, lanes = kernels.layout(n)
    assert got.shape == (2, 2, blocks, lanes)
    totals = kernels.l1_totals([got], n)
    for i, x in enumerate(xs):  # the deltas in the merge dtype (bfloat16), as mergekit computes them
        d = np.abs((x.astype(np.float32) - base.astype(np.float32)).astype(ml_dtypes.bfloat16).astype(np.float32))
        kept = np.where(rng.bits_np(n, int(streams[i]), offset) < thr[i], d, np.float32(0))
        for j, v in enumerate((d, kept)):
            t = v.reshape(blocks, kernels.ROW, lanes)
            while t.shape[1] > 1:
                h = t.shape[1] // 2
                t = t[:, :h] + t[:, h:]
            np.testing.assert_array_equal(got[i, j], t[:, 0])
            np.testing.assert_allclose(totals[i, j], v.astype(np.float64).sum(), rtol=1e-6)
    assert 0.2 < totals[0, 1] / totals[0, 0] < 0.4


def test_l1_totals_do_not_depend_on_the_chunk_size():
    """One device chunks a tensor by 512K, a mesh by 4M: the totals must be the same bits."""
    import ml_dtypes

    from fusion_jax.merging import kernels
    n = (1 << 19) + 3000  # just over one 512K chunk: padded differently by the two chunkings
    r = np.random.default_rng(2)
    base = (r.standard_normal(n) * 0.02).astype(ml_dtypes.bfloat16)
    x = (base.astype(np.float32) + r.standard_normal(n) * 1e-3).astype(ml_dtypes.bfloat16)
    s, t = np.array([5], np.uint32), np.array([rng.threshold(0.4)], np.uint32)

    def parts(size):
        out = []
        for lo in range(0, n, size):
            b, xx = (kernels.pad_chunk(a[lo:lo + size], size) for a in (base, x))
            out.append(kernels.l1_sums(b, (xx,), s, t, np.uint32(lo), np.uint32(0xFFFFFFFF)))
        return out

    assert kernels.chunk_size(n, 1) == 1 << 19 and kernels.chunk_size(n, 8) == 1 << 20
    small, big = parts(1 << 19), parts(1 << 20)
    a, b = kernels.real_partials(small, n), kernels.real_partials(big, n)
    assert a.shape == (1, 2, -(-n // (kernels.ROW * kernels.LANES)) * kernels.LANES) and np.array_equal(a, b)
    ta, tb = kernels.l1_totals(small, n), kernels.l1_totals(big, n)
    assert np.array_equal(ta, tb)
    # and the whole-tensor kernels' fixed-order sum (the pytree path) is the same bits
    from fusion_jax.merging.reduction import fixed_sum
    d = np.abs(x.astype(np.float32) - base.astype(np.float32))
    assert np.float32(fixed_sum(d)) == ta[0, 0]
