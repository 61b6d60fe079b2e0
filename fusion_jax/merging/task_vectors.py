"""The task-vector family (mergekit's GeneralizedTaskArithmetic) as ONE function of one tensor group.

    merged = base + lambda * combine_i(w_i * sparsify(x_i - base))

parameterised by (sparsification, sign consensus, normalize, rescale); :data:`.methods.METHODS` names
its points the way mergekit's registry does. Every step is computed in float32 and rounded to the merge
dtype where mergekit's torch code rounds (see :mod:`.precision`), so a 16-bit merge gives mergekit's
16-bit numbers; ties at a magnitude cut follow :mod:`.select`'s rule.

The numeric parameters (weights, densities turned into counts and thresholds, lambda) enter the jitted
core as arrays, so one compilation serves every layer of a gradient; only the structure is static.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.merging import rng, select
from fusion_jax.merging.reduction import fixed_sum
from fusion_jax.merging.precision import dtype_name, fma_guard, guard_ones, rounder, sparsify_dtype


def seq_sum(xs):
    """x0 + x1 + ... in float32, left to right (torch's dim-0 sum of a few stacked tensors)."""
    return functools.reduce(lambda a, b: a + b, xs)


def l1_ratio(before, after, R, eps=1e-7):
    """mergekit's L1 rescale factor sum|delta| / sum|masked| from the two sums, each rounded by ``R``
    as torch rounds them; 1 where either sum is below ``eps`` (mergekit then leaves the delta alone)."""
    before, after = R(before), R(after)
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, R(before / jnp.where(ok, after, 1.0)), 1.0)


def l1_rescale(delta, masked, R, eps=1e-7):
    """mergekit ``rescaled_masked_tensor`` (L1): masked * (sum|delta| / sum|masked|), the sums in the
    fixed order of :mod:`.reduction` (the file executor's chunks give the same bits)."""
    ratio = l1_ratio(fixed_sum(jnp.abs(delta)), fixed_sum(jnp.abs(masked)), R, eps)
    return R(masked * ratio)


def magnitude_k(density: float, n: int) -> int:
    """How many entries mergekit's ``magnitude`` keeps: max(1, int(density * n)) (0 if density <= 0)."""
    return 0 if density <= 0 or n == 0 else max(1, int(density * n))


def outlier_window(density: float, gamma: float, n: int) -> tuple[int, int]:
    """Model Breadcrumbs' kept ranks [n_bot, n_bot + target) in ascending |delta| (mergekit)."""
    target = int(density * n)
    return max(0, n - target - int(gamma * n)), target


def della_probs(delta, low, epsilon, dtype="float32", host=False, values=None):
    """DELLA keep probabilities: the rank of |delta| within its row mapped linearly onto
    [low, low + 2 epsilon] (low = density - epsilon), in mergekit's arithmetic: its ranks are floats
    of the sparsification dtype, so in bfloat16 they are rounded. ``values``: the 16-bit dtype the
    deltas are exact in (faster host ranks)."""
    R = rounder(dtype)
    x = delta.reshape(1, -1) if delta.ndim < 2 else delta.reshape(delta.shape[0], -1)
    ranks = R(R(select.row_ranks(jnp.abs(x), host, values).astype(jnp.float32)) + 1.0)  # torch: .to(dtype) + 1
    lo, hi = ranks.min(axis=1, keepdims=True), ranks.max(axis=1, keepdims=True)
    span = R(hi - lo)
    norm = jnp.clip(R(R(ranks - lo) / jnp.where(span == 0, 1.0, span)), 0.0, 1.0)
    norm = jnp.where(span == 0, 0.0, norm)  # one-element rows (mergekit: 0/0)
    probs = R(jnp.asarray(low, jnp.float32) + R(R(norm * 2.0) * jnp.asarray(epsilon, jnp.float32)))
    return probs.reshape(delta.shape)


def _sparsify(delta, i, a, *, method, rescale, dtype, host):
    """Input ``i``'s delta sparsified with the prepared arrays ``a`` (see :func:`prepare`)."""
    R = rounder(dtype)
    if method in ("magnitude", "magnitude_outliers"):
        if method == "magnitude":
            keep = select.first_k(select.magnitude_key(delta, True), a["k"][i], host)
        else:
            key = select.magnitude_key(delta, False)
            keep = (select.first_k(key, a["k_bot"][i] + a["k"][i], host)
                    & ~select.first_k(key, a["k_bot"][i], host))
        masked = jnp.where(keep, delta, 0.0)
        return l1_rescale(delta, masked, R) if rescale == "l1" else masked
    work = sparsify_dtype(dtype)
    W = rounder(work)
    if method == "random":
        keep = rng.bits_nd(delta.shape, a["stream"][i]) < a["threshold"][i]
        masked = jnp.where(keep, delta, 0.0)
        if rescale == "inverse":
            masked = W(masked * a["inv_density"][i])
    elif method == "della":
        p = della_probs(delta, a["low"][i], a["epsilon"][i], work, host,
                        dtype if dtype in ("bfloat16", "float16") else None)
        u = rng.bits_nd(delta.shape, a["stream"][i])
        keep = u < jnp.clip(p * 4294967296.0, 0, 4294967295.0).astype(jnp.uint32)
        masked = jnp.where(keep, delta, 0.0)
        if rescale == "inverse":
            masked = W(masked / p)
    else:
        raise ValueError(f"unknown sparsification {method!r}")
    if rescale == "l1":
        masked = l1_rescale(delta, masked, W)
    return R(masked)


@functools.partial(jax.jit, static_argnames=("modes", "method", "consensus", "normalize", "rescale", "dtype",
                                             "host"))
def _merge_core(base, others, a, *, modes, method, consensus, normalize, rescale, dtype, host):
    with fma_guard(a["ones"]):
        return _merge_body(base, others, a, modes=modes, method=method, consensus=consensus,
                           normalize=normalize, rescale=rescale, dtype=dtype, host=host)


def _merge_body(base, others, a, *, modes, method, consensus, normalize, rescale, dtype, host):
    R = rounder(dtype)
    b = R(base)
    w = [R(a["weight"][i]) for i in range(len(others))]
    ds = []
    for i, x in enumerate(others):
        d = R(R(x) - b)
        if method and modes[i] == "zero":
            d = jnp.zeros_like(d)
        elif method and modes[i] == "sparse":
            d = _sparsify(d, i, a, method=method, rescale=rescale, dtype=dtype, host=host)
        ds.append(d)
    return combine(b, ds, w, a["lambda"], consensus=consensus, normalize=normalize, R=R)


def combine(b, ds, w, lam, *, consensus, normalize, R):
    """base + lambda * (the weighted deltas ``ds`` (already sparsified, in the merge dtype) combined
    with or without sign consensus, normalized or not); ``w`` the weights rounded to the merge dtype."""
    ds = [R(d * wi) for d, wi in zip(ds, w)]
    if consensus:
        agree = consensus_mask(ds, consensus, R)
        mixed = R(seq_sum([jnp.where(g, d, 0.0) for g, d in zip(agree, ds)]))
        divisor = R(seq_sum([jnp.where(g, wi, 0.0) for g, wi in zip(agree, w)]))
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = R(seq_sum(ds))
        divisor = R(seq_sum(w))
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = R(mixed / divisor)
    mixed = R(mixed * lam)  # lambda == 1 leaves the rounded value unchanged (mergekit skips it)
    return R(b + mixed)


def consensus_mask(deltas: Sequence, method: str, R=None):
    """TIES sign election over the weighted deltas: keep entries whose sign equals the majority sign
    (sum: of the deltas, rounded by ``R``; count: of the signs). Zero entries have sign 0 and are never
    kept (as in mergekit)."""
    R = R or rounder("float32")
    signs = [jnp.sign(d) for d in deltas]
    total = R(seq_sum(deltas)) if method == "sum" else seq_sum(signs)
    majority = jnp.where(total >= 0, 1.0, -1.0)
    return [s == majority for s in signs]


def prepare(method, n: int, weights, densities, gammas, epsilons, streams, lambda_, rescale):
    """Host-side: the per-input parameters as the arrays the jitted core takes, and each input's mode
    ("full": no sparsification, density >= 1; "zero": nothing kept; "sparse")."""
    m = len(weights)
    modes = []
    k, k_bot = np.zeros(m, np.int32), np.zeros(m, np.int32)
    for i, d in enumerate(densities):
        if d >= 1:
            modes.append("full")
        elif method in ("magnitude", "della") and d <= 0:
            modes.append("zero")
        else:
            modes.append("sparse")
        if method == "magnitude":
            k[i] = magnitude_k(d, n)
        elif method == "magnitude_outliers":
            k_bot[i], k[i] = outlier_window(d, gammas[i], n)
    arrays = {
        "weight": np.asarray(weights, np.float32), "lambda": np.float32(lambda_), "k": k, "k_bot": k_bot,
        "stream": jnp.asarray(streams, jnp.uint32),  # may be traced (the pytree path)
        "threshold": np.asarray([rng.threshold(d) for d in densities], np.uint32),
        "inv_density": np.asarray([1.0 / d if 0 < d < 1 else 1.0 for d in densities], np.float32),
        "low": np.asarray([d - e for d, e in zip(densities, epsilons)], np.float32),
        "epsilon": np.asarray(epsilons, np.float32), "ones": guard_ones()}
    if method == "della":
        for d, e in zip(densities, epsilons):
            if 0 < d < 1 and (d + e >= 1 or d - e <= 0):
                raise ValueError("della: epsilon must be chosen so that density +/- epsilon is in (0, 1)")
    return arrays, tuple(modes if method else ["full"] * m)


def task_vector_merge(base, others: Sequence, *, weights, densities=None, sparsification=None,
                      consensus=None, normalize=False, rescale=None, lambda_=1.0, streams=None,
                      gammas=None, epsilons=None, dtype="float32", host=False):
    """base + lambda * combine_i(w_i * sparsify(x_i - base)), mergekit's GeneralizedTaskArithmetic.

    consensus None: mixed = sum; divisor = sum(w) (1 if |sum(w)| < 1e-8).
    consensus "sum"/"count": mixed = sum over agreeing entries; divisor = sum of agreeing weights (0 -> 1).
    normalize divides mixed by the divisor. ``rescale``: None, "l1" (mergekit: match the L1 norm) or
    "inverse" (the papers: divide each survivor by its keep probability). ``dtype`` is the dtype every
    step rounds to (mergekit's merge dtype; "float32" for the exact merge); the result is float32
    holding values of that dtype. ``host``: order statistics through NumPy (tensors on the host CPU).
    """
    base = jnp.asarray(base, jnp.float32) if not hasattr(base, "dtype") else base
    m = len(others)
    if m == 0:
        return rounder(dtype)(base)
    n = int(np.prod(base.shape))
    arrays, modes = prepare(sparsification, n, list(weights), list(densities or [1.0] * m),
                            list(gammas or [0.01] * m), list(epsilons or [0.15] * m),
                            streams if streams is not None else [0] * m, lambda_, rescale)
    return _merge_core(base, tuple(others), arrays, modes=modes, method=sparsification, consensus=consensus,
                       normalize=bool(normalize), rescale=rescale, dtype=dtype_name(dtype), host=host)


def sparsify(delta, *, method, density, rescale=None, stream=0, gamma=0.01, epsilon=0.15, dtype="float32",
             host=False):
    """One delta (already in the merge dtype) sparsified alone, as inside :func:`task_vector_merge`."""
    delta = jnp.asarray(delta, jnp.float32)
    arrays, modes = prepare(method, delta.size, [1.0], [density], [gamma], [epsilon], [stream], 1.0, rescale)
    if method is None or modes[0] == "full":
        return delta
    if modes[0] == "zero":
        return jnp.zeros_like(delta)
    return _sparsify(delta, 0, arrays, method=method, rescale=rescale, dtype=dtype_name(dtype), host=host)
