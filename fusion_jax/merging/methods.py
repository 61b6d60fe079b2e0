"""The method table: every merge method's parameters (with their valid ranges), input contract,
mergekit name and kernel, and :func:`merge_group`, which merges one tensor group with it.

Semantics follow mergekit 0.1.5 (``merge_methods/*.py``, ``sparsify.py``) except where a kernel's
docstring says otherwise, plus FuseChat's VaRM and SCE and the DARE paper's exact rescale. The
task-vector family is ONE kernel (:mod:`.task_vectors`) parameterised by (sparsification, sign
consensus, normalize, rescale); its table rows name the points of that family the way mergekit's
registry does. Kernels take float arrays and return float32 arrays holding values of the merge dtype
(see :mod:`.precision`); the caller casts to the output dtype.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

import jax
import numpy as np

from fusion_jax.errors import ConfigError
from fusion_jax.merging import elementwise, geometry
from fusion_jax.merging.precision import dtype_name, fma_guard, guard_ones
from fusion_jax.merging.task_vectors import task_vector_merge

REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Param:
    """One parameter: its type, scope ("shared" | "input": every input | "non_base": every non-base
    input), default, and valid range (``lo``/``hi`` bounds, open or closed; numbers must be finite)."""

    name: str
    type: type
    scope: str
    default: Any = REQUIRED
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def range_text(self) -> str:
        if self.type is bool:
            return "true or false"
        if self.type is object:
            return "true, false, 'l1', 'inverse' or 'none'"
        kind = "an integer" if self.type is int else "a finite number"
        if self.lo is not None and self.hi is not None:
            return f"{kind} in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {self.lo:g}"
        return kind

    def check(self, value) -> str | None:
        """None if ``value`` is valid, else what is wrong with it."""
        if value is None:
            return None if self.default is None else "a value is required"
        if self.type is bool:
            return None if isinstance(value, bool) else f"must be {self.range_text()}"
        if self.type is object:
            return None if value in (True, False, "l1", "inverse", "none", "false") else f"must be {self.range_text()}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be {self.range_text()}"
        if not math.isfinite(value) or (self.type is int and value != int(value)):
            return f"must be {self.range_text()}"
        lo_bad = self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo)
        hi_bad = self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi)
        return f"must be {self.range_text()}" if lo_bad or hi_bad else None


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
    mergekit: str | None = None  # mergekit 0.1.5's name for the method (None: fusion-jax only)
    # how it matches mergekit: "exact" | "statistics" | "scale" (1 unit in the last place of the tensor's
    # scale) | "threshold" (exact but for elements within a rounding of a data-dependent threshold)
    # | "selection" (exact up to the tie choice of a top-k that also sets the weights) | ""
    parity: str = ""
    # mergekit's result dtype: "merge" (the merge dtype) or "float32" (its torch code promotes to float32,
    # and with no out_dtype mergekit writes float32 tensors; fusion-jax does the same)
    result: str = "merge"

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# -- the method table ------------------------------------------------------------------------------

_WEIGHT = Param("weight", float, "non_base")
_DENSITY = Param("density", float, "non_base", 1.0, 0.0, 1.0)


def _gta(name, sparsify_, consensus, normalize, rescale, doc, extra=(), mergekit=True):
    params = (Param("int8_mask", bool, "shared", False), Param("normalize", bool, "shared", normalize),
              Param("rescale", object, "shared", rescale), Param("lambda", float, "shared", 1.0),
              _WEIGHT, _DENSITY) + tuple(extra)
    random = sparsify_ in ("random", "della")
    return MethodSpec(name, params, base="required", family="task_vector", sparsify=sparsify_,
                      consensus=consensus, random=random, doc=doc, mergekit=name if mergekit else None,
                      parity=("statistics" if random else "exact") if mergekit else "")


_GAMMA = (Param("gamma", float, "non_base", 0.01, 0.0, 1.0),)
_EPS = (Param("epsilon", float, "non_base", 0.15, 0.0, 0.5, hi_open=True),)
_TOPK = Param("select_topk", float, "shared", 1.0, 0.0, 1.0)

METHODS: dict[str, MethodSpec] = {m.name: m for m in [
    _gta("task_arithmetic", None, None, False, False, "base + sum w_i (x_i - base)"),
    _gta("ties", "magnitude", "sum", True, False, "TIES: top-density |delta|, sign election, disjoint mean"),
    _gta("magnitude_prune", "magnitude", None, False, False,
         "task arithmetic on top-density |delta| (magnitude pruning, no sign election)", mergekit=False),
    _gta("dare_linear", "random", None, False, True,
         "DARE, mergekit form: random drop, survivors rescaled to keep the L1 norm"),
    _gta("dare_ties", "random", "sum", False, True,
         "DARE + TIES sign election, mergekit form (L1-norm rescale)"),
    _gta("dare_linear_exact", "random", None, False, "inverse",
         "DARE, paper form: Bernoulli(1-p) keep, survivors times 1/(1-p)", mergekit=False),
    _gta("dare_ties_exact", "random", "sum", False, "inverse",
         "DARE paper form followed by TIES sign election", mergekit=False),
    _gta("breadcrumbs", "magnitude_outliers", None, False, False, "Model Breadcrumbs", _GAMMA),
    _gta("breadcrumbs_ties", "magnitude_outliers", "sum", False, False, "Breadcrumbs + TIES", _GAMMA),
    _gta("della", "della", "sum", True, True, "DELLA (MagPrune) + TIES, mergekit form", _EPS),
    _gta("della_linear", "della", None, False, True, "DELLA (MagPrune), mergekit form", _EPS),
    MethodSpec("linear", (Param("weight", float, "input"), Param("normalize", bool, "shared", True)),
               base="ignored", family="linear", doc="weighted average", mergekit="linear", parity="exact"),
    MethodSpec("slerp", (Param("t", float, "shared", REQUIRED, 0.0, 1.0),), base="required", min_inputs=2,
               max_inputs=2, doc="spherical interpolation from the base (t=0) to the other model (t=1)",
               mergekit="slerp", parity="exact"),
    MethodSpec("nuslerp", (_WEIGHT, Param("nuslerp_row_wise", bool, "shared", False),
                           Param("nuslerp_flatten", bool, "shared", True)),
               base="optional", min_non_base=2, max_non_base=2, doc="SLERP of two models (or task vectors)",
               mergekit="nuslerp", parity="exact"),
    MethodSpec("multislerp", (_WEIGHT, Param("normalize_weights", bool, "shared", True),
                              Param("eps", float, "shared", 1e-8, 0.0, lo_open=True)),
               base="optional", min_non_base=1,
               doc="barycentric SLERP of any number of models (or task vectors) on the hypersphere",
               mergekit="multislerp", parity="exact"),
    MethodSpec("karcher", (Param("max_iter", int, "shared", 10, 1.0), Param("tol", float, "shared", 1e-5, 0.0,
                                                                            lo_open=True)),
               base="ignored", doc="Karcher (Riemannian) mean of the models' directions, scaled by the mean norm",
               mergekit="karcher", parity="scale"),
    MethodSpec("model_stock", (Param("filter_wise", bool, "shared", False),), base="required", min_inputs=3,
               doc="Model Stock", mergekit="model_stock", parity="exact"),
    MethodSpec("nearswap", (Param("t", float, "shared", REQUIRED, 0.0),), base="required", min_inputs=2,
               max_inputs=2, doc="base moved towards the other model by min(1, t / |difference|) per element",
               mergekit="nearswap", parity="exact"),
    MethodSpec("arcee_fusion", (), base="required", min_inputs=2, max_inputs=2,
               doc="the other model's values where |delta| x row KL divergence is an outlier (median + 1.5 IQR)",
               mergekit="arcee_fusion", parity="threshold", result="float32"),
    MethodSpec("ram", (Param("epsilon", float, "shared", 1e-5, 0.0),), base="required",
               doc="RAM: entries changed by one model keep its delta, shared ones average",
               mergekit="ram", parity="exact"),
    MethodSpec("ramplus_tl", (Param("r", float, "shared", 0.1, 0.0), Param("alpha", float, "shared", 0.2, 0.0),
                              Param("epsilon", float, "shared", 1e-5, 0.0, lo_open=True)),
               base="required", doc="RAM+ (tensor-local): unique entries scaled by the model's overlap ratio",
               mergekit="ramplus_tl", parity="exact", result="float32"),
    MethodSpec("passthrough", (Param("scale", float, "input", None),), base="ignored", max_inputs=1,
               doc="copy one model's tensor (optionally scaled)", mergekit="passthrough", parity="exact"),
    MethodSpec("varm", (), base="required", min_non_base=1,
               doc="FuseChat VaRM: per-matrix weights from mean squared deltas vs the pivot (base)"),
    MethodSpec("sce", (Param("int8_mask", bool, "shared", False), _TOPK),
               base="required", doc="SCE, mergekit form (selection masks the deltas)", mergekit="sce",
               parity="selection"),
    MethodSpec("sce_fusechat", (Param("int8_mask", bool, "shared", False), _TOPK),
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


# -- validation ------------------------------------------------------------------------------------

def check_group(spec: MethodSpec, shared: dict, per_input: Sequence[dict], labels: Sequence[str],
                base_index: int | None, tensor: str) -> None:
    """Every resolved parameter of one tensor group against its valid range, by name, and the
    constraints between parameters. ``labels[i]`` names input i (its model); errors name the parameter,
    its value, the model and the tensor. Raises :class:`ConfigError`."""
    at = f" at tensor {tensor!r}" if tensor else ""
    for p in spec.params:
        if p.scope == "shared" and p.name in shared:
            bad = p.check(shared[p.name])
            if bad:
                raise ConfigError(f"{spec.name}: parameter {p.name!r} = {shared[p.name]!r}{at}: {bad}")
    for i, d in enumerate(per_input):
        for p in spec.params:
            if p.scope != "shared" and p.name in d:
                bad = p.check(d[p.name])
                if bad:
                    raise ConfigError(f"{spec.name}: parameter {p.name!r} = {d[p.name]!r} for model "
                                      f"{labels[i]!r}{at}: {bad}")
    nb = [i for i in range(len(per_input)) if i != base_index]
    if spec.sparsify == "della":
        for i in nb:
            d, e = per_input[i].get("density", 1.0), per_input[i].get("epsilon", 0.15)
            if 0 < d < 1 and not (0 < d - e and d + e < 1):
                raise ConfigError(f"{spec.name}: parameters 'density' = {d!r} and 'epsilon' = {e!r} for model "
                                  f"{labels[i]!r}{at}: density - epsilon and density + epsilon must be in (0, 1)")
    total_of = None
    if spec.name == "linear" and shared.get("normalize"):
        total_of = [d["weight"] for d in per_input]
    elif spec.name == "multislerp" and shared.get("normalize_weights"):
        total_of = [per_input[i]["weight"] for i in nb]
    if total_of is not None and len(total_of) > 1 and sum(total_of) == 0:
        raise ConfigError(f"{spec.name}: the weights {total_of}{at} sum to 0, so they cannot be normalized "
                          "(set normalize: false or change a weight)")


# -- one tensor group ------------------------------------------------------------------------------

def merge_group(spec: MethodSpec, tensors: Sequence, base_index: int | None, shared: dict,
                per_input: Sequence[dict], streams: Sequence[int] | None = None, dtype="float32",
                host: bool = False):
    """Merge one tensor group. ``tensors`` are the inputs in order, ``base_index`` the base's position
    (or None), ``shared`` the resolved shared parameters, ``per_input[i]`` input i's parameters.
    ``streams`` are the random stream keys of the non-base inputs (see :mod:`.rng`); ``dtype`` the
    dtype every step rounds to; ``host`` lets order statistics run in NumPy (host-resident inputs)."""
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
            streams=streams,
            gammas=g("gamma", 0.01), epsilons=g("epsilon", 0.15), dtype=dtype, host=host)
    nums, static = _split_params(spec, shared, per_input, nb)
    return _other_kernel(tuple(tensors), nums, guard_ones(), name=name, base_index=base_index, static=static,
                         dtype=dtype_name(dtype), host=host)


def _split_params(spec: MethodSpec, shared: dict, per_input: Sequence[dict], nb: list[int]):
    """Host side of :func:`merge_group` for the methods outside the task-vector family: numbers that only
    enter arithmetic become float32 arrays (traced: one compilation serves every value of a gradient);
    what steers the code (flags, counts, nuslerp's t from the weights) stays static."""
    nums: dict = {}
    static = {k: v for k, v in shared.items() if isinstance(v, bool) or (isinstance(v, int) and k == "max_iter")}
    for k, v in shared.items():
        if k not in static and isinstance(v, (int, float)) and not isinstance(v, bool):
            nums[k] = np.float32(v)
    if spec.name == "sce" or spec.name == "sce_fusechat":
        static["select_topk"] = float(shared["select_topk"])
        nums.pop("select_topk", None)
    if spec.name == "linear":
        nums["weight"] = np.asarray([p["weight"] for p in per_input], np.float32)
    elif spec.name == "multislerp":
        nums["weight"] = np.asarray([per_input[i]["weight"] for i in nb], np.float32)
    elif spec.name == "nuslerp":  # mergekit: t = w1 / (w0 + w1) in Python floats, 1 - t likewise
        w = [per_input[i]["weight"] for i in nb]
        total = sum(w)
        t = 0.5 if abs(total) < 1e-6 else w[1] / total
        nums["t"], nums["1-t"] = np.float32(t), np.float32(1 - t)
    elif spec.name == "passthrough":
        scale = per_input[0].get("scale")
        static["scaled"] = scale is not None
        nums["scale"] = np.float32(scale if scale is not None else 1.0)
    return nums, tuple(sorted(static.items()))


@functools.partial(jax.jit, static_argnames=("name", "base_index", "static", "dtype", "host"))
def _other_kernel(tensors, nums, ones, *, name, base_index, static, dtype, host):
    """Every method outside the task-vector family, jitted (the same code on the file executor and
    the pytree path, so the same bits)."""
    st = dict(static)
    nb = [i for i in range(len(tensors)) if i != base_index]
    others = [tensors[i] for i in nb]
    base = tensors[base_index] if base_index is not None else None
    with fma_guard(ones):
        if name == "linear":
            return elementwise.linear_body(tensors, nums["weight"], ones, normalize=st["normalize"], dtype=dtype)
        if name == "slerp":
            return geometry.slerp(nums["t"], base, others[0], dtype=dtype)
        if name == "nuslerp":
            return geometry.nuslerp(others, None, base, st["nuslerp_row_wise"], st["nuslerp_flatten"], dtype,
                                    t=(nums["1-t"], nums["t"]))
        if name == "multislerp":
            return geometry.multislerp(others, [nums["weight"][i] for i in range(len(others))], base,
                                       st["normalize_weights"], nums["eps"], dtype)
        if name == "karcher":
            return geometry.karcher(tensors, int(st["max_iter"]), nums["tol"], dtype)
        if name == "model_stock":
            return geometry.model_stock(base, others, st["filter_wise"], dtype)
        if name == "nearswap":
            return elementwise.nearswap(base, others[0], nums["t"], dtype)
        if name == "arcee_fusion":
            return elementwise.arcee_fusion(base, others[0], dtype, host)
        if name == "ram":
            return elementwise.ram(base, others, nums["epsilon"], dtype)
        if name == "ramplus_tl":
            return elementwise.ramplus_tl(base, others, nums["r"], nums["alpha"], nums["epsilon"], dtype)
        if name == "passthrough":
            return elementwise.passthrough(tensors[0], nums["scale"] if st["scaled"] else None, dtype)
        if name == "varm":
            return elementwise.varm(base, others, dtype)
        if name in ("sce", "sce_fusechat"):
            return elementwise.sce(base, others, st["select_topk"], "mergekit" if name == "sce" else "fusechat",
                                   dtype, host)
    raise ValueError(f"unknown merge method {name!r}")


def available_methods() -> list[str]:
    return sorted(METHODS)


# -- the README's method table ---------------------------------------------------------------------

def _param_text(p: Param) -> str:
    if p.type is bool or p.type is object:
        rng = ""
    elif p.lo is not None and p.hi is not None:
        rng = f" {'(' if p.lo_open else '['}{p.lo:g}, {p.hi:g}{')' if p.hi_open else ']'}"
    elif p.lo is not None:
        rng = f" {'>' if p.lo_open else '>='} {p.lo:g}"
    else:
        rng = ""
    default = "" if p.default is REQUIRED else f" = {str(p.default).lower() if isinstance(p.default, bool) else p.default}"
    scope = {"shared": "", "input": " (per model)", "non_base": " (per model)"}[p.scope]
    return f"`{p.name}`{scope}{rng}{default}"


def render_method_table() -> str:
    """The Markdown table of every method (README's "Methods"), generated from :data:`METHODS`."""
    rows = ["| method | mergekit name | parameters | matches mergekit |", "|---|---|---|---|"]
    for m in METHODS.values():
        params = ", ".join(_param_text(p) for p in m.params if p.name != "int8_mask") or "-"
        match = {"exact": "exact (element for element)",
                 "statistics": "statistics (kept fraction, rescale, signs)",
                 "scale": "to 1-2 units in the last place of the tensor's scale",
                 "threshold": "exact, but for elements within a rounding of the outlier threshold",
                 "selection": "exact with select_topk 1; below, up to which elements tied at the cut are "
                              "selected (the weights follow)"
                 }.get(m.parity, "- (fusion-jax only)")
        rows.append(f"| `{m.name}` | {f'`{m.mergekit}`' if m.mergekit else '-'} | {params} | {match} |")
    return "\n".join(rows) + "\n"
