"""Device mesh and logical-axis sharding: one rules table maps logical axes to mesh axes.

Mesh axes are ``data``, ``fsdp``, ``tensor`` and ``expert``; their sizes come from a config in which at
most one size is ``-1`` (it takes whatever devices remain). Logical axes (``batch``, ``seq``, ``embed``,
``heads``, ``kv_heads``, ``head_dim``, ``mlp``, ``vocab``, ``expert``, ``layers``) name the dimensions of
params and activations; :data:`DEFAULT_RULES` maps each to mesh axes, overridable per run.

A dimension whose size is not divisible by its mesh axes falls back to replication for that dimension
(axes are dropped from the end of the tuple until it divides), so tiny test models run on any mesh.

How models annotate params (flax 0.12.8): pass the logical names as ``out_sharding`` metadata and
switch eager sharding off, so that a model can be built without a mesh in scope::

    nnx.Param(init(key, (d, f)), out_sharding=("embed", "mlp"), eager_sharding=False)
    # or: kernel_init=nnx.with_partitioning(init, ("embed", "mlp"))  under nnx.use_eager_sharding(False)

The deprecated spellings ``sharding_names=`` and ``sharding=`` are read too (flax renames them to
``out_sharding``). A Variable without metadata is replicated.

Typical use::

    mesh = make_mesh({"fsdp": -1, "tensor": 2})
    shardings = model_state_shardings(model, mesh)        # nnx.State of NamedSharding
    fwd = sharded_forward(model, mesh)                     # jitted, declared in/out shardings
    logits = fwd(input_ids)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fusion_jax.errors import ConfigError
from fusion_jax.utils.configs import as_mapping

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor", "expert")
LOGICAL_AXES: tuple[str, ...] = (
    "batch", "seq", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", "expert", "layers",
)

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

#: The one logical -> mesh table. Override entries with :func:`make_rules`.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("layers", None),
    ("seq", None),
    ("head_dim", None),
)


# --------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 (fills the remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    expert: int = 1

    @classmethod
    def from_any(cls, cfg: Any) -> "MeshConfig":
        """From a MeshConfig, a mapping / ConfigDict with some of the axis names, or None (defaults)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        cfg = as_mapping(cfg, "mesh", MESH_AXES)
        kw = {}
        for k, v in cfg.items():
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ConfigError(f"mesh.{k}: axis size must be an integer, got {v!r}")
            kw[k] = int(v)
        if "fsdp" not in kw and any(v == -1 for v in kw.values()):
            kw["fsdp"] = 1  # the user put the -1 elsewhere
        return cls(**kw)

    def resolve(self, num_devices: int) -> tuple[int, ...]:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        for a, s in sizes.items():
            if s == 0 or s < -1:
                raise ConfigError(f"mesh.{a}: axis size must be a positive integer or -1, got {s}")
        fill = [a for a, s in sizes.items() if s == -1]
        if len(fill) > 1:
            raise ConfigError(f"mesh.{fill[1]}: only one mesh axis may be -1 (also -1: mesh.{fill[0]})")
        known = math.prod(s for s in sizes.values() if s != -1)
        if fill:
            if num_devices % known:
                raise ConfigError(
                    f"mesh.{fill[0]}: cannot fill: {num_devices} devices are not divisible by the product "
                    f"of the other axes ({known})")
            sizes[fill[0]] = num_devices // known
        elif known != num_devices:
            raise ConfigError(
                f"mesh: axis sizes {sizes} use {known} devices but {num_devices} are available "
                "(set one axis, e.g. mesh.fsdp, to -1)")
        return tuple(sizes[a] for a in MESH_AXES)


def make_mesh(config: Any = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A :class:`jax.sharding.Mesh` with axes (data, fsdp, tensor, expert) from ``config``.

    Devices are ordered by (process, id) so that each process's devices are contiguous along the
    leading (data) axes: process-local batches then land on the process's own devices.
    """
    cfg = MeshConfig.from_any(config)
    devs = list(devices) if devices is not None else list(jax.devices())
    shape = cfg.resolve(len(devs))
    if devices is None and jax.process_count() == 1 and jax.default_backend() in ("tpu", "gpu"):
        try:
            # Auto axes (GSPMD), as the plain Mesh below: jax.make_mesh's default is Explicit axes
            return jax.make_mesh(shape, MESH_AXES, devices=devs,
                                 axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))
        except Exception:  # noqa: BLE001 - fall back to a plain reshape on exotic topologies
            pass
    devs = sorted(devs, key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devs, dtype=object).reshape(shape), MESH_AXES)


# --------------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------------


def make_rules(overrides: Mapping[str, MeshAxes] | Iterable[tuple[str, MeshAxes]] | None = None,
               base: Rules = DEFAULT_RULES) -> Rules:
    """``base`` with entries replaced (or added) from ``overrides``; values are None, a mesh axis or a tuple."""
    if overrides is None:
        return tuple(base)
    if hasattr(overrides, "to_dict"):
        overrides = overrides.to_dict()
    items = list(overrides.items()) if isinstance(overrides, Mapping) else list(overrides)
    table = dict(base)
    for logical, axes in items:
        if isinstance(axes, list):
            axes = tuple(axes)
        for a in (axes if isinstance(axes, tuple) else (axes,)):
            if a is not None and a not in MESH_AXES:
                raise ConfigError(f"sharding.rules.{logical}: unknown mesh axis {a!r} (known: {', '.join(MESH_AXES)})")
        table[logical] = axes
    return tuple(table.items())


def _as_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(logical_axes: Sequence[str | None] | None, shape: Sequence[int] | None,
                    mesh: Mesh, rules: Rules | None = None) -> P:
    """PartitionSpec for one array. Indivisible dims (given ``shape``) fall back to replication.

    A mesh axis is used at most once per array; mesh axes of size 1 are left out.
    """
    if logical_axes is None:
        return P()
    table = dict(DEFAULT_RULES if rules is None else rules)
    used: set[str] = set()
    out = []
    for i, name in enumerate(logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ConfigError(f"sharding.rules: no rule for logical axis {name!r} (known: {', '.join(table)})")
        axes = [a for a in _as_tuple(table[name]) if a not in used and mesh.shape.get(a, 1) > 1]
        if shape is not None:
            dim = int(shape[i])
            while axes and dim % math.prod(mesh.shape[a] for a in axes):
                axes.pop()
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _is_axes_leaf(x: Any) -> bool:
    return x is None or isinstance(x, P) or (
        isinstance(x, tuple) and all(e is None or isinstance(e, str) for e in x))


def logical_to_mesh_sharding(logical_axes: Any, mesh: Mesh, rules: Rules | None = None,
                             shapes: Any = None) -> Any:
    """Map a pytree of logical-axis tuples to a pytree of :class:`NamedSharding`.

    ``shapes``: an optional pytree of the same structure whose leaves have ``.shape`` (arrays or
    ShapeDtypeStructs); when given, dims not divisible by their mesh axes are replicated.
    """
    if shapes is None:
        return jax.tree.map(lambda ax: NamedSharding(mesh, logical_to_spec(ax, None, mesh, rules)),
                            logical_axes, is_leaf=_is_axes_leaf)
    return jax.tree.map(
        lambda ax, s: NamedSharding(mesh, logical_to_spec(ax, getattr(s, "shape", None), mesh, rules)),
        logical_axes, shapes, is_leaf=_is_axes_leaf)


# --------------------------------------------------------------------------------------------------
# NNX models
# --------------------------------------------------------------------------------------------------


def variable_logical_axes(var: Any) -> tuple[str | None, ...] | None:
    """Logical axis names stored on an nnx.Variable (``out_sharding``; older names accepted)."""
    meta = var.get_metadata() if hasattr(var, "get_metadata") else {}
    for key in ("out_sharding", "sharding_names", "sharding"):
        names = meta.get(key)
        if names:
            if isinstance(names, P):
                names = tuple(names)
            return tuple(names)
    return None


def _is_variable(x: Any) -> bool:
    from flax import nnx
    return isinstance(x, nnx.Variable)


def state_logical_axes(state: Any) -> Any:
    """nnx.State (or module) -> pure-dict pytree of logical-axis tuples (None where unannotated).

    The structure matches ``nnx.to_pure_dict(state)``, which is how the trainer holds params.
    """
    from flax import nnx
    if isinstance(state, nnx.Module):
        state = nnx.state(state, nnx.Param)

    def f(v):
        ax = variable_logical_axes(v)
        nd = np.ndim(v.get_value()) if hasattr(v, "get_value") else np.ndim(v)
        return tuple(ax) if ax is not None else (None,) * nd

    return nnx.to_pure_dict(jax.tree.map(lambda v: v.replace(f(v)) if _is_variable(v) else v,
                                         state, is_leaf=_is_variable))


def model_state_shardings(model_or_state: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """A tree like ``nnx.state(model)`` (Variables kept) whose values are NamedShardings."""
    from flax import nnx
    state = nnx.state(model_or_state) if isinstance(model_or_state, nnx.Module) else model_or_state

    def f(v):
        if not _is_variable(v):
            return NamedSharding(mesh, P())
        val = v.get_value()
        return v.replace(NamedSharding(mesh, logical_to_spec(variable_logical_axes(v), np.shape(val), mesh, rules)))

    return jax.tree.map(f, state, is_leaf=_is_variable)


def params_shardings(params: Any, logical_axes: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Shardings for a plain params pytree given a matching pytree of logical-axis tuples (or None)."""
    if logical_axes is None:
        return jax.tree.map(lambda _: NamedSharding(mesh, P()), params)
    return logical_to_mesh_sharding(logical_axes, mesh, rules, shapes=params)


def shard_model(model: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Place every Variable of ``model`` on ``mesh`` according to its logical axes (in place)."""
    from flax import nnx
    state = nnx.state(model)
    shardings = model_state_shardings(state, mesh, rules)
    nnx.update(model, jax.device_put(state, shardings))
    return model


def batch_spec(ndim: int, shape: Sequence[int] | None, mesh: Mesh, rules: Rules | None = None,
               extra: Sequence[str | None] = ()) -> P:
    """Spec of an activation with a leading ``batch`` dim (then ``extra`` logical names, else None)."""
    names = ("batch",) + tuple(extra) + (None,) * max(0, ndim - 1 - len(extra))
    return logical_to_spec(names[:ndim], shape, mesh, rules)


def sharded_forward(model: Any, mesh: Mesh, rules: Rules | None = None,
                    fn: Callable[..., Any] | None = None) -> Callable[..., Any]:
    """A jitted forward over ``model`` with declared input and output shardings.

    Returns ``forward(input_ids, attention_mask=None)`` -> float32 logits [B, S, V] sharded as
    (batch, seq, vocab). The model's state is placed on the mesh once; ``fn(model, ids, mask)``
    overrides what is computed (default: ``model(ids, attention_mask=mask).logits``, or the model's
    raw output if it has no ``.logits``). Traced and run with ``mesh`` as the context mesh
    (``jax.set_mesh``), which is how an MoE block finds the ``expert`` axis to run expert-parallel.
    """
    from flax import nnx
    shard_model(model, mesh, rules)
    graphdef, state = nnx.split(model)
    state_sh = model_state_shardings(state, mesh, rules)

    def default_fn(m, ids, mask):
        out = m(ids, attention_mask=mask) if mask is not None else m(ids)
        return getattr(out, "logits", out)

    call = fn or default_fn
    cache: dict[Any, Callable] = {}

    def forward(input_ids, attention_mask=None):
        with jax.set_mesh(mesh):
            return _forward(input_ids, attention_mask)

    def _forward(input_ids, attention_mask=None):
        key = (tuple(input_ids.shape), attention_mask is None)
        if key not in cache:
            b_sh = NamedSharding(mesh, batch_spec(2, input_ids.shape, mesh, rules))
            out_shape = jax.eval_shape(
                lambda s, i, m: call(nnx.merge(graphdef, s), i, m), state, input_ids, attention_mask)
            out_sh = jax.tree.map(
                lambda o: NamedSharding(mesh, logical_to_spec(
                    ("batch", "seq", "vocab")[:o.ndim] + (None,) * max(0, o.ndim - 3), o.shape, mesh, rules)),
                out_shape)
            cache[key] = jax.jit(
                lambda s, i, m: call(nnx.merge(graphdef, s), i, m),
                in_shardings=(state_sh, b_sh, None if attention_mask is None else b_sh),
                out_shardings=out_sh)
        return cache[key](state, input_ids, attention_mask)

    return forward


# --------------------------------------------------------------------------------------------------
# Processes: who loads which rows, and moving arrays between hosts and the mesh
# --------------------------------------------------------------------------------------------------


def process_batch_slice(global_batch_size: int, process_index: int | None = None,
                        process_count: int | None = None) -> slice:
    """The rows of the global batch that this process loads (contiguous, in process order).

    ``process_index`` / ``process_count`` default to JAX's (pass them to compute another process's share,
    e.g. in tests or a data service). Raises :class:`ConfigError` when the batch does not divide.
    """
    n = jax.process_count() if process_count is None else int(process_count)
    p = jax.process_index() if process_index is None else int(process_index)
    if n < 1 or not 0 <= p < n:
        raise ConfigError(f"process_index={p} is not in [0, process_count={n})")
    if global_batch_size % n:
        raise ConfigError(f"batch_size: {global_batch_size} is not divisible by the {n} processes")
    per = global_batch_size // n
    return slice(p * per, (p + 1) * per)


def put_replicated_batch(batch: Mapping[str, Any], mesh: Mesh, rules: Rules | None = None) -> dict:
    """Host arrays that EVERY process holds in full -> global arrays on ``mesh``, the leading (batch)
    axis sharded where it divides. The same call works with one process or many (evaluation batches,
    which every process reads whole)."""
    out = {}
    for k, x in batch.items():
        x = np.asarray(x)
        spec = batch_spec(x.ndim, x.shape, mesh, rules)
        out[k] = jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda idx, x=x: x[idx])
    return out


def to_host(x: Any) -> np.ndarray:
    """A global array (replicated, fully addressable, or sharded across processes) -> numpy on every
    process. Every process must call it for an array sharded across processes (it gathers)."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:   # every process holds all of it
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def host_tree(tree: Any) -> Any:
    """:func:`to_host` over a pytree (e.g. params sharded on a mesh -> numpy, for writing checkpoints)."""
    return jax.tree.map(to_host, tree)


def place_params(params: Any, logical_axes: Any, mesh: Mesh, rules: Rules | None = None) -> Any:
    """Put a params pytree (host or device arrays) on ``mesh`` by its logical axes. Use it before calling a
    jitted function that also takes mesh-sharded inputs: arrays committed to one device (what
    ``hf.load`` without shardings returns) cannot be mixed with arrays on all the mesh's devices."""
    return jax.device_put(params, params_shardings(params, logical_axes, mesh, rules))
