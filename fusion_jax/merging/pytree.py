"""Merging models held as JAX pytrees (an ``nnx.State``, nested dicts of arrays, a flat ``{name: array}``
map): the same per-tensor kernels as the file executor, mapped over the leaves, each leaf under ``jit``.

- **Shardings are kept**: every leaf's merge is jitted with the base leaf's sharding as its output
  sharding, and the kernels use only element-wise ops and global reductions (counts, sums), so a leaf
  sharded over a mesh is merged where it lies (no gather to one device).
- **Randomness is keyed by the tensor name** (see :mod:`.rng`): a leaf's name is given by ``names``;
  by default :func:`path_name`, the keys of its tree path joined by ``"."`` (dict keys and attribute
  names as they are, sequence indices as numbers), so a nested dict built from HF names by splitting
  them on ``"."`` (or a flat ``{hf_name: array}`` map) gives each leaf its HF tensor name, and the
  same bytes as ``fusion-jax merge`` on the same checkpoints (same seed, same parameters).
- For a :class:`fusion_jax.models.CausalLM`'s params (layers stacked ``[L, ...]``, kernels transposed
  from HF's layout), :func:`merge_causal_lm` merges each layer's slice in HF layout under its HF name
  (from :mod:`fusion_jax.hf.mapping`), so it too gives the file executor's bytes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.errors import ConfigError
from fusion_jax.merging import rng
from fusion_jax.merging.methods import METHODS, REQUIRED, check_group, merge_group
from fusion_jax.merging.precision import COMPUTE_DTYPES, NP_DTYPES, dtype_name, fma_guard, guard_ones, promote


def path_name(path) -> str:
    """A leaf's tensor name: its tree path's keys joined by "." (``{"model": {"norm": {"weight": x}}}``
    -> "model.norm.weight"; list index 3 -> "3"; attribute ``w`` -> "w")."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts)


def _value(v, name: str):
    return v(name) if callable(v) else v


def _resolve(spec, n_inputs: int, base_index: int | None, params: dict, name: str):
    """Shared and per-input parameters of one leaf from the user's keyword arguments: a scalar (every
    model), a list (one per non-base model, or per input for ``linear``-style parameters), or a
    callable of the tensor name returning either."""
    known = {p.name for p in spec.params}
    unknown = set(params) - known
    if unknown:
        raise ConfigError(f"{spec.name}: unknown parameter(s) {', '.join(sorted(unknown))} "
                          f"(known: {', '.join(sorted(known)) or 'none'})")
    nb = [i for i in range(n_inputs) if i != base_index]
    shared, per_input = {}, [{} for _ in range(n_inputs)]
    for p in spec.params:
        v = _value(params.get(p.name, p.default), name)
        if p.scope == "shared":
            if isinstance(v, (list, tuple)):
                raise ConfigError(f"{spec.name}: parameter {p.name!r} is shared: give one value, not {v!r}")
            if v is REQUIRED:
                raise ConfigError(f"{spec.name}: missing required parameter {p.name!r}")
            shared[p.name] = v
            continue
        targets = nb if p.scope == "non_base" else list(range(n_inputs))
        vals = list(v) if isinstance(v, (list, tuple)) else [v] * len(targets)
        if len(vals) != len(targets):
            raise ConfigError(f"{spec.name}: parameter {p.name!r} needs {len(targets)} values (one per "
                              f"{'non-base ' if p.scope == 'non_base' else ''}model), got {len(vals)}")
        for i, x in zip(targets, vals):
            if x is REQUIRED:
                raise ConfigError(f"{spec.name}: missing required parameter {p.name!r}")
            per_input[i][p.name] = x
    return shared, per_input


def _freeze(d: dict):
    return tuple(sorted((k, v if not isinstance(v, list) else tuple(v)) for k, v in d.items()))


@functools.lru_cache(maxsize=512)
def _leaf_fn(method: str, base_index, shared, per_input, dtype: str, out_dtype, sharding):
    spec = METHODS[method]
    sh, pin = dict(shared), [dict(p) for p in per_input]

    def fn(arrays, streams, ones):
        with fma_guard(ones):
            out = merge_group(spec, arrays, base_index, sh, pin, streams, dtype=dtype, host=False)
        return out.astype(out_dtype)

    return jax.jit(fn, out_shardings=sharding)


def merge_pytrees(method: str, trees: Sequence, base=None, *, seed: int = 0, dtype=None,
                  compute_dtype: str = "auto", out_dtype=None, names: Callable | None = None, **params):
    """Merge pytrees of one structure with ``method`` (a :data:`.methods.METHODS` name).

    ``trees`` are the models besides the base (all inputs for methods without a base, such as
    ``linear``); ``base`` the base model's pytree. ``params`` are the method's parameters (see the
    method table): a scalar for every model, a list with one value per model in ``trees`` (for
    ``linear``-style per-input parameters, per input), or a callable of the tensor name returning
    either. ``dtype``: the merge dtype (default: each leaf's inputs' promoted dtype, mergekit's rule);
    ``compute_dtype``: "auto" (every step in the merge dtype, mergekit's numbers) or "float32";
    ``out_dtype``: the result's dtype (default the merge dtype). ``names(path) -> str`` names each leaf
    for its randomness (default :func:`path_name`). Returns a pytree shaped like the inputs.
    """
    if method not in METHODS:
        raise ConfigError(f"unknown merge method {method!r} (available: {', '.join(sorted(METHODS))})")
    spec = METHODS[method]
    if compute_dtype not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {compute_dtype!r}")
    trees = list(trees)
    if base is not None and spec.base == "ignored":
        raise ConfigError(f"{method} takes no base model: pass every input in trees")
    if base is None and spec.base == "required":
        raise ConfigError(f"{method} needs a base model (base=...)")
    inputs = ([base] if base is not None else []) + trees
    base_index = 0 if base is not None else None
    n = len(inputs)
    nb = n - (base is not None)
    if n < spec.min_inputs or (spec.max_inputs is not None and n > spec.max_inputs) or (
            spec.min_non_base is not None and nb < spec.min_non_base) or (
            spec.max_non_base is not None and nb > spec.max_non_base):
        raise ConfigError(f"{method}: wrong number of models ({nb} besides the base{'' if base is not None else ''})")
    leaves0, treedef = jax.tree_util.tree_flatten_with_path(inputs[0])
    flat = []
    for i, t in enumerate(inputs):
        leaves, td = jax.tree_util.tree_flatten(t)
        if td != treedef:
            raise ConfigError(f"{method}: model {i} has a different tree structure than model 0")
        flat.append(leaves)
    name_of = names or path_name
    labels = (["base"] if base is not None else []) + [f"model {i}" for i in range(len(trees))]
    out = []
    for j, (path, leaf) in enumerate(leaves0):
        name = name_of(path)
        arrays = [f[j] for f in flat]
        shapes = {tuple(np.shape(a)) for a in arrays}
        if len(shapes) > 1:
            raise ConfigError(f"{method}: tensor {name!r} has different shapes: {sorted(shapes)}")
        shared, per_input = _resolve(spec, n, base_index, params, name)
        check_group(spec, shared, per_input, labels, base_index, name)
        in_dtypes = [np.dtype(a.dtype) for a in arrays]
        merge_dt = dtype_name(dtype) if dtype is not None else promote(in_dtypes).name
        result = "float32" if spec.result == "float32" and compute_dtype == "auto" else merge_dt
        od = np.dtype(NP_DTYPES[dtype_name(out_dtype)] if out_dtype is not None else NP_DTYPES[result])
        streams = np.asarray([rng.tensor_stream(seed, name, k) for k in range(nb)], np.uint32)
        sharding = getattr(arrays[base_index or 0], "sharding", None)
        fn = _leaf_fn(method, base_index, _freeze(shared), tuple(_freeze(p) for p in per_input),
                      merge_dt if compute_dtype == "auto" else "float32", od,
                      sharding if isinstance(arrays[base_index or 0], jax.Array) else None)
        out.append(fn(tuple(arrays), streams, guard_ones()))
    return jax.tree_util.tree_unflatten(treedef, out)


# -- fusion_jax.models.CausalLM params ---------------------------------------------------------------

def hf_view(params: Any, config) -> dict:
    """A CausalLM params tree (``nnx.State`` or its pure dict) as ``{hf_name: array in HF layout}``:
    each stacked ``[L, ...]`` param split into its L layers, transposed kernels transposed back."""
    from fusion_jax.hf.mapping import get_path, hf_tensors
    tree = _pure(params)
    out = {}
    for name, row, index in hf_tensors(config):   # index: () or (layer,) or (layer, expert)
        x = get_path(tree, row.path)[index]
        out[name] = jnp.swapaxes(x, -1, -2) if row.transpose else x
    return out


def from_hf_view(flat: dict, config, like: Any) -> dict:
    """The inverse of :func:`hf_view`: a pure params dict laid out (and sharded) like ``like``."""
    from fusion_jax.hf.mapping import get_path, hf_tensors, set_path
    ref = _pure(like)
    parts: dict = {}
    for name, row, index in hf_tensors(config):   # index: () or (layer,) or (layer, expert)
        x = flat[name]
        x = jnp.swapaxes(x, -1, -2) if row.transpose else x
        parts.setdefault(row.path, {})[index] = x
    out: dict = {}
    for path, by_index in parts.items():
        x = _stack_indexed(by_index)
        target = get_path(ref, path)
        if isinstance(target, jax.Array):
            x = jax.device_put(x, target.sharding)
        set_path(out, path, x)
    return out


def _stack_indexed(by_index: dict):
    """``{(i, j, ...): array}`` over a full grid of indices -> one array stacked on leading axes i, j, ..."""
    if () in by_index:
        return by_index[()]
    firsts = sorted({k[0] for k in by_index})
    return jnp.stack([_stack_indexed({k[1:]: v for k, v in by_index.items() if k[0] == i}) for i in firsts])


def _pure(params):
    try:
        from flax import nnx
        if isinstance(params, nnx.State):
            return nnx.to_pure_dict(params)
    except ImportError:  # pragma: no cover
        pass
    return params


def merge_causal_lm(method: str, trees: Sequence, base=None, *, config, **kw) -> dict:
    """:func:`merge_pytrees` for :class:`fusion_jax.models.CausalLM` params trees, each tensor under its
    HF name and in HF layout (so the bytes equal ``fusion-jax merge`` on the saved checkpoints).
    Returns a pure params dict (``nnx.replace_by_pure_dict`` puts it into a model's state)."""
    views = [hf_view(t, config) for t in trees]
    bview = hf_view(base, config) if base is not None else None
    merged = merge_pytrees(method, views, bview, **kw)
    return from_hf_view(merged, config, base if base is not None else trees[0])
