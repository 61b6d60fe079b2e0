"""Interpolation on spheres and averages: slerp, nuslerp, multislerp, karcher, model_stock.

Each follows mergekit 0.1.5's ``merge_methods/<name>.py`` step by step, in float32 with ``R`` (a
:func:`.precision.rounder`) applied where mergekit's torch arithmetic rounds to the merge dtype: slerp
works in float32 and rounds once (as mergekit does); nuslerp, multislerp and model_stock work in the
merge dtype; karcher keeps its norms in float32 and its vectors in the merge dtype. Data-dependent
branches (mergekit's ``if x.item() < tol``) are ``jnp.where``s, so every kernel also runs under ``jit``.
"""
from __future__ import annotations

import jax.numpy as jnp

from fusion_jax.merging.precision import barrier, rounder
from fusion_jax.merging.reduction import fixed_sum, row_sum
from fusion_jax.merging.task_vectors import seq_sum


def _sum(x, axis=None, keepdims=False):
    """Whole-tensor (``axis=None``) or last-axis sum in a fixed order (:mod:`.reduction`), so a kernel
    gives the same bits eager, jitted or sharded (torch's own order is not reproducible; its 16-bit
    results are, since each sum is then rounded)."""
    if axis is None:
        return fixed_sum(x)
    assert axis == -1
    return row_sum(x, keepdims)


def _norm(x, axis=None, keepdims=False):
    return jnp.sqrt(_sum(barrier(x * x), axis, keepdims))


def slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8, dtype="float32"):
    """mergekit ``slerp``: angle between the whole flattened tensors (float32); near-collinear ->
    lerp. The coefficients apply to the unnormalised inputs; the result is rounded once."""
    R = rounder(dtype)
    a, b = R(v0), R(v1)
    na, nb = _norm(a), _norm(b)
    na = jnp.where(na > eps, na, 1.0)
    nb = jnp.where(nb > eps, nb, 1.0)
    dot = jnp.clip(_sum(barrier((a / na) * (b / nb))), -1, 1)
    lin = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(lin, 0.0, dot))
    s = jnp.sin(theta)
    t = jnp.float32(t)
    ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / jnp.where(lin, 1.0, s))
    cb = jnp.where(lin, t, jnp.sin(t * theta) / jnp.where(lin, 1.0, s))
    return R(barrier(ca * a) + barrier(cb * b))  # torch: two products, then the sum (no FMA)


def _nuslerp_core(t, v0, v1, row_wise, flatten, R, eps=1e-8):
    """``t`` is the pair (1 - t, t) as float32 values (mergekit computes both in Python floats)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)

    def unit(x):
        return R(x / jnp.maximum(R(_norm(x, axis=-1, keepdims=True)), 1e-7))

    cos = jnp.clip(R(_sum(R(unit(v0) * unit(v1)), axis=-1, keepdims=True)), -1, 1)
    colinear = R(1 - R(cos * cos)) <= eps ** 2
    theta = R(jnp.arccos(jnp.where(colinear, 0.0, cos)))
    s = R(jnp.sin(theta))
    a, b = (jnp.asarray(x, jnp.float32) for x in t)
    res = R(R(R(R(jnp.sin(R(a * theta))) * v0) + R(R(jnp.sin(R(b * theta))) * v1)) / jnp.where(colinear, 1.0, s))
    res = jnp.where(colinear, R(R(a * v0) + R(b * v1)), res)
    if row_wise and not flatten:
        res = jnp.swapaxes(res, 0, -1)
    return res.reshape(shape)


def nuslerp(tensors, weights, base=None, row_wise=False, flatten=True, dtype="float32", t=None):
    """mergekit ``nuslerp``: t = w1 / (w0 + w1) (0.5 if the sum is ~0); with a base, interpolate the
    task vectors and add them back; ``row_wise`` interpolates each row, ``flatten`` the whole tensor.
    ``t``: the pair (1 - t, t) already computed (else from ``weights``)."""
    R = rounder(dtype)
    if t is None:
        total = sum(weights)
        tt = 0.5 if abs(total) < 1e-6 else weights[1] / total
        t = (1 - tt, tt)
    x0, x1 = (R(x) for x in tensors)
    if base is not None:
        b = R(base)
        return R(b + _nuslerp_core(t, R(x0 - b), R(x1 - b), row_wise, flatten, R))
    return _nuslerp_core(t, x0, x1, row_wise, flatten, R)


def multislerp(tensors, weights, base=None, normalize_weights=True, eps=1e-8, dtype="float32"):
    """mergekit ``multislerp``: barycentric interpolation on the hypersphere (project onto the tangent
    space at the weighted mean direction, interpolate there, map back), scaled by the weighted mean
    norm; with a base, of the task vectors. One input is returned as is (base or not).

    Where mergekit raises (more than two inputs whose weighted directions cancel exactly), this
    returns their weighted linear combination instead, as mergekit does for two."""
    R = rounder(dtype)
    xs = [R(x) for x in tensors]
    if len(xs) == 1:
        return xs[0]
    b = R(base) if base is not None else None
    if b is not None:
        xs = [R(x - b) for x in xs]
    shape = xs[0].shape
    flat = [x.reshape(-1) for x in xs]
    w = [R(jnp.float32(v)) for v in weights]
    if normalize_weights:
        total = R(seq_sum(w))
        w = [R(v / total) for v in w]
    norms = [R(_norm(x)) for x in flat]
    units = [R(x / R(nv + eps)) for x, nv in zip(flat, norms)]
    mean = R(seq_sum([R(u * wi) for u, wi in zip(units, w)]))
    mean_norm = R(_norm(mean))
    degenerate = mean_norm < eps
    mean = R(mean / jnp.where(degenerate, 1.0, mean_norm))
    tangents = [R(u - R(R(_sum(R(u * mean))) * mean)) for u in units]
    tangent = R(seq_sum([R(tv * wi) for tv, wi in zip(tangents, w)]))
    tn = R(R(_norm(tangent)) + eps)
    res = R(R(mean * R(jnp.cos(tn))) + R(tangent * R(R(jnp.sin(tn)) / tn)))
    avg_norm = R(seq_sum([R(nv * wi) for nv, wi in zip(norms, w)]))
    res = R(res * avg_norm)
    linear = R(seq_sum([R(x * wi) for x, wi in zip(flat, w)]))
    res = jnp.where(degenerate, linear, res).reshape(shape)
    return R(res + b) if b is not None else res


def karcher(tensors, max_iter=10, tol=1e-5, dtype="float32"):
    """mergekit ``karcher``: the Riemannian (Karcher) mean of the inputs' directions on the unit sphere
    (uniform weights, up to ``max_iter`` gradient steps until the tangent norm < ``tol``), scaled by
    the mean norm. Norms in float32, vectors in the merge dtype, as mergekit."""
    R = rounder(dtype)
    xs = [R(x) for x in tensors]
    n = len(xs)
    if n == 1:
        return xs[0]
    shape = xs[0].shape
    xs = [x.reshape(-1) for x in xs]
    alpha = 1.0 / n
    norms = [_norm(x) for x in xs]
    units = [jnp.where(nv == 0, 0.0, R(x / jnp.where(nv == 0, 1.0, nv))) for x, nv in zip(xs, norms)]
    valid = [nv > tol for nv in norms]
    any_valid = _any(valid)
    # normalised weights of the valid inputs: exactly 1/n when all are valid (mergekit: Python floats)
    count = seq_sum([v.astype(jnp.float32) for v in valid])
    a_norm = jnp.where(count == n, jnp.float32(alpha / (alpha * n)), 1.0 / jnp.maximum(count, 1.0))
    mean = jnp.zeros_like(units[0])
    for u, v in zip(units, valid):
        mean = jnp.where(v, R(mean + R(a_norm * u)), mean)
    mn = _norm(mean)
    first = units[0]
    for u, v in reversed(list(zip(units, valid))):  # the first valid unit
        first = jnp.where(v, u, first)
    mean = jnp.where(mn < tol, first, R(mean / jnp.where(mn < tol, 1.0, mn)))
    done = jnp.bool_(False)
    for _ in range(int(max_iter)):
        tangent = jnp.zeros_like(mean)
        for u, v in zip(units, valid):
            dot = jnp.clip(R(_sum(barrier(mean * u))), -1.0, 1.0)
            theta = R(jnp.arccos(dot))
            coef = R(a_norm * R(theta / R(jnp.sin(theta))))
            step = R(tangent + R(coef * R(u - R(dot * mean))))
            tangent = jnp.where(v & (theta >= tol), step, tangent)
        tnorm = _norm(tangent)
        stop = tnorm < tol
        safe = jnp.where(stop, 1.0, tnorm)
        new = R(R(jnp.cos(tnorm) * mean) + R(jnp.sin(tnorm) * R(tangent / safe)))
        un = _norm(new)
        new = jnp.where(un > tol, R(new / jnp.where(un > tol, un, 1.0)), new)
        mean = jnp.where(done | stop, mean, new)
        done = done | stop
    scale = seq_sum([barrier(jnp.float32(alpha) * nv) for nv in norms])
    res = R(scale * mean)
    return jnp.where(any_valid, res, 0.0).reshape(shape)


def _any(flags):
    out = flags[0]
    for f in flags[1:]:
        out = out | f
    return out


def model_stock(base, others, filter_wise=False, dtype="float32"):
    """Model Stock: t = N cos / (1 + (N-1) cos) with cos the mean pairwise cosine of the task vectors;
    result t * mean(x) + (1 - t) * base (base kept where the denominator is ~0). In the merge dtype."""
    R = rounder(dtype)
    w0 = R(base)
    ws = [R(x) for x in others]
    shape = w0.shape
    if filter_wise:
        if w0.ndim == 1:
            w0, ws = w0[None], [w[None] for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offs = [R(w - w0) for w in ws]
    coss = []
    for i, a in enumerate(offs):
        for b in offs[i + 1:]:
            den = R(R(_norm(a, axis=-1)) * R(_norm(b, axis=-1)))
            coss.append(jnp.clip(R(R(_sum(R(a * b), axis=-1)) / jnp.maximum(den, 1e-6)), -1, 1))
    cos = R(seq_sum(coss) / len(coss))[..., None]
    n = len(ws)
    den = R(1 + R((n - 1) * cos))
    singular = jnp.abs(den) < 1e-6
    t = jnp.where(singular, 0.0, R(R(n * cos) / jnp.where(singular, 1.0, den)))
    avg = R(_rsum(ws, R) / n)
    return R(R(t * avg) + R(R(1 - t) * w0)).reshape(shape)


def _rsum(xs, R):
    """Python's ``sum`` of tensors in the merge dtype: every partial sum rounded."""
    acc = xs[0]
    for x in xs[1:]:
        acc = R(acc + x)
    return acc
