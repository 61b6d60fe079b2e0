"""Merge methods as pure functions of one tensor group (all inputs' versions of one tensor).

Every function takes float arrays (NumPy or JAX), computes in float32 with ``jax.numpy`` and returns a
float32 JAX array of the same shape; the caller casts to the output dtype. Semantics follow mergekit
0.1.5 (``merge_methods/*.py``, ``sparsify.py``) except where a function's docstring says otherwise, plus
FuseChat's VaRM and SCE, and the DARE paper's exact rescale.

The task-vector family is ONE function, :func:`task_vector_merge`, parameterised by
(sparsification, sign consensus, normalize, rescale); the method table :data:`METHODS` names its
points the way mergekit's registry does.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp

from fusion_jax.merging import rng

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
    name: str
    type: type
    scope: str  # "shared" | "input" (every input) | "non_base" (every non-base input)
    default: Any = REQUIRED


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """How a merge method is called: its parameters, what inputs it needs, and its kernel."""

    name: str
    params: tuple[Param, ...]
    base: str  # "required" | "optional" | "ignored"
    min_inputs: int = 1
    max_inputs: int | None = None
    min_non_base: int | None = None
    max_non_base: int | None = None
    family: str = "other"  # "task_vector" | "linear" | "other"
    sparsify: str | None = None  # task-vector family: None|"magnitude"|"random"|"magnitude_outliers"|"della"
    consensus: str | None = None  # None | "sum" | "count"
    random: bool = False
    doc: str = ""

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# -- sparsification (one model's delta) ------------------------------------------------------------

def _rescale(delta, masked, mode, eps=1e-7):
    """mergekit's ``rescaled_masked_tensor`` for the L1 norm; ``None`` returns the masked delta."""
    if mode != "l1":
        return masked
    before = jnp.abs(delta).sum()
    after = jnp.abs(masked).sum()
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, masked * jnp.where(ok, before / jnp.where(ok, after, 1.0), 1.0), masked)


def magnitude_mask(delta, density: float):
    """Keep the top ``max(1, int(density * n))`` entries by |delta| (mergekit ``magnitude``)."""
    n = delta.size
    k = max(1, int(density * n))
    order = jnp.argsort(-jnp.abs(delta).reshape(-1), stable=True)
    return jnp.zeros((n,), bool).at[order[:k]].set(True).reshape(delta.shape)


def outlier_mask(delta, density: float, gamma: float):
    """Model Breadcrumbs: drop the ``gamma`` largest, then the smallest, keeping ``int(density*n)``.

    mergekit ``magnitude_outliers``: ascending stable-by-value ranking, keep ranks [n_bot, n_bot+target).
    """
    n = delta.size
    target = int(density * n)
    n_top = int(gamma * n)
    n_bot = max(0, n - target - n_top)
    order = jnp.argsort(jnp.abs(delta).reshape(-1), stable=True)
    return jnp.zeros((n,), bool).at[order[n_bot:n_bot + target]].set(True).reshape(delta.shape)


def della_probs(delta, density: float, epsilon: float):
    """DELLA keep probabilities: rank of |delta| within each row mapped to [d - eps, d + eps]."""
    x = delta if delta.ndim >= 2 else delta.reshape(1, -1)
    ranks = jnp.argsort(jnp.argsort(jnp.abs(x), axis=1, stable=True), axis=1, stable=True).astype(jnp.float32)
    n = x.shape[1]
    rank_norm = ranks / (n - 1) if n > 1 else jnp.zeros_like(ranks)
    return ((density - epsilon) + rank_norm * 2 * epsilon).reshape(delta.shape)


def sparsify(delta, *, method, density, rescale=None, stream=0, gamma=0.01, epsilon=0.15):
    """Sparsify one delta. ``rescale``: None, "l1" (mergekit: match the L1 norm) or "inverse"
    (the DARE/DELLA papers: divide each survivor by its keep probability)."""
    if method is None or density >= 1:
        return delta
    if method == "magnitude":
        if density <= 0:
            return jnp.zeros_like(delta)
        return _rescale(delta, jnp.where(magnitude_mask(delta, density), delta, 0), rescale)
    if method == "magnitude_outliers":
        return _rescale(delta, jnp.where(outlier_mask(delta, density, gamma), delta, 0), rescale)
    if method == "random":
        keep = rng.keep_mask(delta.shape, rng.threshold(density), stream)
        masked = jnp.where(keep, delta, 0)
        if rescale == "inverse":
            return masked / density if density > 0 else masked
        return _rescale(delta, masked, rescale)
    if method == "della":
        if density <= 0:
            return jnp.zeros_like(delta)
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise ValueError("della: epsilon must be chosen so that density +/- epsilon is in (0, 1)")
        p = della_probs(delta, density, epsilon)
        u = rng.bits(delta.size, stream).reshape(delta.shape)
        keep = u < jnp.clip(p * 4294967296.0, 0, 4294967295.0).astype(jnp.uint32)
        masked = jnp.where(keep, delta, 0)
        if rescale == "inverse":
            return masked / p
        return _rescale(delta, masked, rescale)
    raise ValueError(f"unknown sparsification {method!r}")


def consensus_mask(deltas, method: str):
    """TIES sign election: keep entries whose sign equals the majority sign (sum: of the weighted
    deltas; count: of the signs). Zero entries have sign 0 and are never kept (as in mergekit)."""
    sign = jnp.sign(deltas)
    total = deltas.sum(0) if method == "sum" else sign.sum(0)
    majority = jnp.where(total >= 0, 1.0, -1.0)
    return sign == majority


# -- the task-vector family ------------------------------------------------------------------------

def task_vector_merge(base, others: Sequence, *, weights, densities=None, sparsification=None,
                      consensus=None, normalize=False, rescale=None, lambda_=1.0, streams=None,
                      gammas=None, epsilons=None):
    """base + lambda * combine_i(w_i * sparsify(x_i - base)), mergekit's GeneralizedTaskArithmetic.

    consensus None: mixed = sum; divisor = sum(w) (1 if |sum(w)| < 1e-8).
    consensus "sum"/"count": mixed = sum over agreeing entries; divisor = sum of agreeing weights (0 -> 1).
    normalize divides mixed by the divisor.
    """
    base = jnp.asarray(base, jnp.float32)
    m = len(others)
    if m == 0:
        return base
    densities = densities or [1.0] * m
    streams = streams or [0] * m
    gammas = gammas or [0.01] * m
    epsilons = epsilons or [0.15] * m
    ds = []
    for i, x in enumerate(others):
        d = jnp.asarray(x, jnp.float32) - base
        if sparsification:
            d = sparsify(d, method=sparsification, density=densities[i], rescale=rescale,
                         stream=streams[i], gamma=gammas[i], epsilon=epsilons[i])
        ds.append(d)
    deltas = jnp.stack(ds)
    w = jnp.asarray(weights, jnp.float32).reshape((m,) + (1,) * base.ndim)
    deltas = deltas * w
    if consensus:
        mask = consensus_mask(deltas, consensus)
        mixed = jnp.where(mask, deltas, 0).sum(0)
        divisor = jnp.where(mask, w, 0).sum(0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = deltas.sum(0)
        divisor = w.sum(0)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


# -- other methods ---------------------------------------------------------------------------------

def linear(tensors, weights, normalize=True):
    """sum_i w_i x_i (/ sum_i w_i when normalize; mergekit does not guard a zero sum)."""
    acc = sum(jnp.asarray(x, jnp.float32) * jnp.float32(w) for x, w in zip(tensors, weights))
    return acc / jnp.float32(sum(weights)) if normalize else acc


def slerp(t, v0, v1, dot_threshold=0.9995, eps=1e-8):
    """mergekit ``slerp``: angle between the whole flattened tensors; near-collinear -> lerp.
    The coefficients apply to the unnormalised inputs."""
    a = jnp.asarray(v0, jnp.float32)
    b = jnp.asarray(v1, jnp.float32)
    na = jnp.linalg.norm(a.reshape(-1))
    nb = jnp.linalg.norm(b.reshape(-1))
    na = jnp.where(na > eps, na, 1.0)
    nb = jnp.where(nb > eps, nb, 1.0)
    dot = jnp.clip(jnp.sum((a / na) * (b / nb)), -1, 1)
    lin = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(lin, 0.0, dot))
    s = jnp.sin(theta)
    ca = jnp.where(lin, 1 - t, jnp.sin((1 - t) * theta) / jnp.where(lin, 1.0, s))
    cb = jnp.where(lin, t, jnp.sin(t * theta) / jnp.where(lin, 1.0, s))
    return ca * a + cb * b


def _nuslerp_core(t, v0, v1, row_wise=False, flatten=True, eps=1e-8):
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)

    def unit(x):
        return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-7)

    cos = jnp.clip(jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1, 1)
    colinear = (1 - cos * cos) <= eps ** 2
    theta = jnp.arccos(jnp.where(colinear, 0.0, cos))
    s = jnp.sin(theta)
    res = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / jnp.where(colinear, 1.0, s)
    res = jnp.where(colinear, (1 - t) * v0 + t * v1, res)
    if row_wise and not flatten:
        res = jnp.swapaxes(res, 0, -1)
    return res.reshape(shape)


def nuslerp(tensors, weights, base=None, row_wise=False, flatten=True):
    """mergekit ``nuslerp``: t = w1 / (w0 + w1) (0.5 if the sum is ~0); with a base, interpolate the
    task vectors and add them back; ``row_wise`` interpolates each row, ``flatten`` the whole tensor."""
    total = sum(weights)
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    x0, x1 = (jnp.asarray(x, jnp.float32) for x in tensors)
    if base is not None:
        b = jnp.asarray(base, jnp.float32)
        return b + _nuslerp_core(t, x0 - b, x1 - b, row_wise, flatten)
    return _nuslerp_core(t, x0, x1, row_wise, flatten)


def model_stock(base, others, filter_wise=False):
    """Model Stock: t = N cos / (1 + (N-1) cos) with cos the mean pairwise cosine of the task vectors;
    result t * mean(x) + (1 - t) * base (base kept where the denominator is ~0)."""
    w0 = jnp.asarray(base, jnp.float32)
    ws = [jnp.asarray(x, jnp.float32) for x in others]
    shape = w0.shape
    if filter_wise:
        if w0.ndim == 1:
            w0, ws = w0[None], [w[None] for w in ws]
    else:
        w0, ws = w0.reshape(-1), [w.reshape(-1) for w in ws]
    offs = [w - w0 for w in ws]
    coss = []
    for i, a in enumerate(offs):
        for b in offs[i + 1:]:
            den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
            coss.append(jnp.clip((a * b).sum(-1) / jnp.maximum(den, 1e-6), -1, 1))
    cos = jnp.stack(coss).mean(0)[..., None]
    n = len(ws)
    den = 1 + (n - 1) * cos
    singular = jnp.abs(den) < 1e-6
    t = jnp.where(singular, 0.0, n * cos / jnp.where(singular, 1.0, den))
    avg = sum(ws) / n
    return (t * avg + (1 - t) * w0).reshape(shape)


def varm(base, others):
    """FuseChat VaRM (paper form): w_j = mean((x_j - base)^2) / sum_k mean((x_k - base)^2) for this
    parameter matrix; result sum_j w_j x_j (uniform weights if every delta is zero)."""
    b = jnp.asarray(base, jnp.float32)
    xs = [jnp.asarray(x, jnp.float32) for x in others]
    v = jnp.stack([jnp.mean((x - b) ** 2) for x in xs])
    tot = v.sum()
    w = jnp.where(tot > 0, v / jnp.where(tot > 0, tot, 1.0), 1.0 / len(xs))
    return sum(w[i] * x for i, x in enumerate(xs))


def _sce_select(tvs, topk):
    if topk <= 0:
        return jnp.zeros(tvs.shape[1:], bool)
    if topk >= 1:
        return jnp.ones(tvs.shape[1:], bool)
    var = jnp.var(tvs, axis=0)
    k = int(int(jnp.count_nonzero(var)) * topk)
    if k == 0:
        return jnp.zeros(var.shape, bool)
    order = jnp.argsort(-jnp.abs(var).reshape(-1), stable=True)
    return jnp.zeros((var.size,), bool).at[order[:k]].set(True).reshape(var.shape)


def sce(base, others, select_topk=1.0, variant="mergekit"):
    """SCE (FuseChat-2.0): Select by variance, Calculate weights from mean squared (selected) deltas,
    Erase minority signs, merge. ``variant="mergekit"``: the selection masks the deltas themselves
    (mergekit's ``sce``; divisor clamped at 1e-6; uniform weights when their sum < 1e-6).
    ``variant="fusechat"``: the selection only shapes the weights, erase and merge use the full deltas
    (FuseChat's released fork; divisor 0 -> 1; uniform weights when their sum is 0)."""
    b = jnp.asarray(base, jnp.float32)
    if not others:
        return b
    tvs = jnp.stack([jnp.asarray(x, jnp.float32) - b for x in others])
    m = len(others)
    sel = _sce_select(tvs, select_topk) if select_topk < 1 else None
    masked = tvs if sel is None else jnp.where(sel[None], tvs, 0)
    wv = (masked ** 2).reshape(m, -1).mean(1)
    tot = wv.sum()
    if variant == "mergekit":
        w = jnp.where(jnp.abs(tot) < 1e-6, 1.0 / m, wv / jnp.where(jnp.abs(tot) < 1e-6, 1.0, tot))
        tvs = masked
    else:
        w = jnp.where(tot == 0, 1.0 / m, wv / jnp.where(tot == 0, 1.0, tot))
    w = w.reshape((m,) + (1,) * b.ndim)
    keep = consensus_mask(tvs, "sum")
    ew = jnp.where(keep, w, 0)
    merged = (tvs * ew).sum(0)
    if variant == "mergekit":
        return b + merged / jnp.maximum(ew.sum(0), 1e-6)
    div = ew.sum(0)
    return b + merged / jnp.where(div == 0, 1.0, div)


# -- the method table ------------------------------------------------------------------------------

def _gta(name, sparsify_, consensus, normalize, rescale, doc, extra=()):
    params = (Param("int8_mask", bool, "shared", False), Param("normalize", bool, "shared", normalize),
              Param("rescale", object, "shared", rescale), Param("lambda", float, "shared", 1.0),
              Param("weight", float, "non_base"), Param("density", float, "non_base", 1.0)) + tuple(extra)
    return MethodSpec(name, params, base="required", family="task_vector", sparsify=sparsify_,
                      consensus=consensus, random=sparsify_ in ("random", "della"), doc=doc)


_GAMMA = (Param("gamma", float, "non_base", 0.01),)
_EPS = (Param("epsilon", float, "non_base", 0.15),)

METHODS: dict[str, MethodSpec] = {m.name: m for m in [
    _gta("task_arithmetic", None, None, False, False, "base + sum w_i (x_i - base)"),
    _gta("ties", "magnitude", "sum", True, False, "TIES: top-density |delta|, sign election, disjoint mean"),
    _gta("magnitude_prune", "magnitude", None, False, False,
         "task arithmetic on top-density |delta| (magnitude pruning, no sign election)"),
    _gta("dare_linear", "random", None, False, True,
         "DARE, mergekit form: random drop, survivors rescaled to keep the L1 norm"),
    _gta("dare_ties", "random", "sum", False, True,
         "DARE + TIES sign election, mergekit form (L1-norm rescale)"),
    _gta("dare_linear_exact", "random", None, False, "inverse",
         "DARE, paper form: Bernoulli(1-p) keep, survivors times 1/(1-p)"),
    _gta("dare_ties_exact", "random", "sum", False, "inverse",
         "DARE paper form followed by TIES sign election"),
    _gta("breadcrumbs", "magnitude_outliers", None, False, False, "Model Breadcrumbs", _GAMMA),
    _gta("breadcrumbs_ties", "magnitude_outliers", "sum", False, False, "Breadcrumbs + TIES", _GAMMA),
    _gta("della", "della", "sum", True, True, "DELLA (MagPrune) + TIES, mergekit form", _EPS),
    _gta("della_linear", "della", None, False, True, "DELLA (MagPrune), mergekit form", _EPS),
    MethodSpec("linear", (Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
               base="ignored", family="linear", doc="weighted average"),
    MethodSpec("slerp", (Param("t", float, "shared"),), base="required", min_inputs=2, max_inputs=2,
               doc="spherical interpolation from the base (t=0) to the other model (t=1)"),
    MethodSpec("nuslerp", (Param("weight", float, "non_base"), Param("nuslerp_row_wise", bool, "shared", False),
                           Param("nuslerp_flatten", bool, "shared", True)),
               base="optional", min_non_base=2, max_non_base=2, doc="SLERP of two models (or task vectors)"),
    MethodSpec("model_stock", (Param("filter_wise", bool, "shared", False),), base="required", min_inputs=3,
               doc="Model Stock"),
    MethodSpec("passthrough", (Param("scale", float, "input", None),), base="ignored", max_inputs=1,
               doc="copy one model's tensor (optionally scaled)"),
    MethodSpec("varm", (), base="required", min_non_base=1,
               doc="FuseChat VaRM: per-matrix weights from mean squared deltas vs the pivot (base)"),
    MethodSpec("sce", (Param("int8_mask", bool, "shared", False), Param("select_topk", float, "shared", 1.0)),
               base="required", doc="SCE, mergekit form (selection masks the deltas)"),
    MethodSpec("sce_fusechat", (Param("int8_mask", bool, "shared", False),
                                Param("select_topk", float, "shared", 1.0)),
               base="required", doc="SCE, FuseChat's released form (selection shapes only the weights)"),
]}


def rescale_mode(value) -> str | None:
    """mergekit's boolean ``rescale`` (True -> L1) or an explicit "l1" | "inverse" | "none"."""
    if value is True:
        return "l1"
    if value in (False, None, "none", "false"):
        return None
    if value in ("l1", "inverse"):
        return value
    raise ValueError(f"rescale must be true/false, 'l1', 'inverse' or 'none', not {value!r}")


def merge_group(spec: MethodSpec, tensors: Sequence, base_index: int | None, shared: dict,
                per_input: Sequence[dict], streams: Sequence[int] | None = None):
    """Merge one tensor group. ``tensors`` are the inputs in order, ``base_index`` the base's position
    (or None), ``shared`` the resolved shared parameters, ``per_input[i]`` input i's parameters.
    ``streams`` are the random stream keys of the non-base inputs (see :mod:`.rng`)."""
    tensors = list(tensors)
    nb = [i for i in range(len(tensors)) if i != base_index]
    others = [tensors[i] for i in nb]
    base = tensors[base_index] if base_index is not None else None
    name = spec.name
    if spec.family == "task_vector":
        g = lambda k, d=None: [per_input[i].get(k, d) for i in nb]  # noqa: E731
        return task_vector_merge(
            base, others, weights=g("weight"), densities=g("density", 1.0),
            sparsification=spec.sparsify, consensus=spec.consensus, normalize=bool(shared["normalize"]),
            rescale=rescale_mode(shared["rescale"]), lambda_=float(shared["lambda"]),
            streams=list(streams) if streams is not None else None,
            gammas=g("gamma", 0.01), epsilons=g("epsilon", 0.15))
    if name == "linear":
        return linear(tensors, [p["weight"] for p in per_input], shared["normalize"])
    if name == "slerp":
        return slerp(shared["t"], base, others[0])
    if name == "nuslerp":
        return nuslerp(others, [per_input[i]["weight"] for i in nb], base,
                       shared["nuslerp_row_wise"], shared["nuslerp_flatten"])
    if name == "model_stock":
        return model_stock(base, others, shared["filter_wise"])
    if name == "passthrough":
        s = per_input[0].get("scale")
        x = jnp.asarray(tensors[0], jnp.float32)
        return x if s is None else x * s
    if name == "varm":
        return varm(base, others)
    if name in ("sce", "sce_fusechat"):
        return sce(base, others, shared["select_topk"], "mergekit" if name == "sce" else "fusechat")
    raise ValueError(f"unknown merge method {name!r}")


def available_methods() -> list[str]:
    return sorted(METHODS)
