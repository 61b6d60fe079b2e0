"""Optimizer from a config: AdamW (or Adafactor) with a weight-decay mask, warmup + decay schedule,
global-norm clipping.

``name="adafactor"`` is transformers' ``Adafactor`` as the HF Trainer builds it (``scale_parameter=False,
relative_step=False, warmup_init=False``; what XFT's reference trains with): no momentum, second moments
factored over the last two dims of every tensor of >= 2 dims, decay 1 - t^-0.8, eps 1e-30, each tensor's
update RMS-clipped at 1.0, weight decay lr-coupled (``p -= lr * wd * p``); ``b1``, ``b2`` and ``eps`` are
AdamW's and unused. "Tensor" is transformers' one: our params stack layers (and experts) on leading axes,
so ``stack_dims`` (from the logical axes, :func:`stack_dims`) makes each slice one tensor: a stacked norm
scale ``[L, D]`` is L vectors (not factored), a stacked kernel ``[L, E, D, F]`` is L*E matrices, each
clipped on its own.

The optimizer acts on the trainer's flat dict of *trainable* params only (see ``state.ParamSplit``):
frozen params get neither gradients nor optimizer state. ``lr_multipliers`` gives regex-selected groups
their own learning-rate scale (a per-param scale of AdamW's final update, i.e. AdamW at lr * s).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fusion_jax.errors import ConfigError
from fusion_jax.utils.configs import as_mapping

_SCHEDULES = ("cosine", "linear", "constant")
_OPTIMIZERS = ("adamw", "adafactor")
#: logical axes that stack separate tensors (one per layer, one per expert) in one param
STACK_AXES = ("layers", "expert")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"                    # adamw | adafactor (see the module docstring)
    learning_rate: float = 1e-3
    schedule: str = "cosine"               # cosine | linear | constant (after warmup)
    warmup_steps: int = 0
    decay_steps: int | None = None         # horizon of the decay; None: the run's total steps
    end_lr_ratio: float = 0.0              # final lr = learning_rate * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    # params whose path matches any of these get no weight decay (norm scales, biases, 1-D params)
    weight_decay_exclude: tuple[str, ...] = (r"norm", r"(^|/)bias$", r"(^|/)scale$")
    grad_clip: float | None = 1.0          # global-norm clipping; None or <= 0 disables
    trainable: tuple[str, ...] | None = None   # regexes on "a/b/c" param paths; None: all params
    lr_multipliers: tuple[tuple[str, float], ...] = ()  # (regex, scale); first match wins

    @classmethod
    def from_config(cls, cfg: Any) -> "OptimizerConfig":
        """From an OptimizerConfig, a mapping or an ml_collections ConfigDict (unknown keys are errors)."""
        if cfg is None:
            return cls()
        if isinstance(cfg, cls):
            return cfg
        cfg = as_mapping(cfg, "optimizer", (f.name for f in dataclasses.fields(cls)))
        kw = {}
        for k, v in cfg.items():
            if k in ("weight_decay_exclude", "trainable") and v is not None:
                v = (v,) if isinstance(v, str) else tuple(v)
            if k == "lr_multipliers":
                v = tuple((str(a), float(b)) for a, b in (v.items() if isinstance(v, Mapping) else v))
            kw[k] = v
        out = cls(**kw)
        out.validate()
        return out

    def validate(self) -> None:
        if self.name not in _OPTIMIZERS:
            raise ConfigError(f"optimizer.name: {self.name!r} is not one of {', '.join(_OPTIMIZERS)}")
        if self.schedule not in _SCHEDULES:
            raise ConfigError(f"optimizer.schedule: {self.schedule!r} is not one of {', '.join(_SCHEDULES)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"optimizer.learning_rate: must be > 0, got {self.learning_rate}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optimizer.warmup_steps: must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.end_lr_ratio <= 1:
            raise ConfigError(f"optimizer.end_lr_ratio: must be in [0, 1], got {self.end_lr_ratio}")
        for pat in tuple(self.weight_decay_exclude) + tuple(self.trainable or ()) + tuple(
                p for p, _ in self.lr_multipliers):
            try:
                re.compile(pat)
            except re.error as e:
                raise ConfigError(f"optimizer: bad regex {pat!r}: {e}") from e


def build_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    cfg.validate()
    lr = float(cfg.learning_rate)
    warm = int(cfg.warmup_steps)
    horizon = int(cfg.decay_steps if cfg.decay_steps is not None else total_steps)
    decay = max(1, horizon - warm)
    end = lr * float(cfg.end_lr_ratio)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, decay, alpha=cfg.end_lr_ratio)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(lr, end, decay)
    else:
        after = optax.constant_schedule(lr)
    if warm == 0:
        return after
    # warmup reaches lr at step ``warm``; step 0 uses lr / (warm + 1) so that no step has lr 0
    warmup = optax.linear_schedule(lr / (warm + 1), lr, warm)
    return optax.join_schedules([warmup, after], [warm])


def decay_mask(cfg: OptimizerConfig, flat_params: Mapping[str, Any]) -> dict[str, bool]:
    pats = [re.compile(p) for p in cfg.weight_decay_exclude]
    return {k: (getattr(v, "ndim", 2) >= 2 and not any(r.search(k) for r in pats))
            for k, v in flat_params.items()}


def stack_dims(axes_flat: Mapping[str, Any] | None, flat_params: Mapping[str, Any]) -> dict[str, int]:
    """``{path: number of leading stacking axes}`` (``STACK_AXES``) from each param's logical axes."""
    out = {}
    for k in flat_params:
        n = 0
        for a in (axes_flat or {}).get(k) or ():
            if a not in STACK_AXES:
                break
            n += 1
        out[k] = n
    return out


def build_optimizer(cfg: OptimizerConfig, flat_params: Mapping[str, Any], total_steps: int,
                    stacked: Mapping[str, int] | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW or Adafactor (+ clipping, + per-group lr scale) over a flat dict of trainable params.
    ``stacked``: leading stacking dims per param (:func:`stack_dims`; Adafactor's tensors).

    Returns ``(tx, schedule)``; ``schedule(step)`` is the base learning rate (for logging).
    """
    sched = build_schedule(cfg, total_steps)
    if cfg.name == "adafactor":
        inner = optax.chain(
            scale_by_hf_adafactor({k: int((stacked or {}).get(k, 0)) for k in flat_params}),
            optax.add_decayed_weights(cfg.weight_decay, decay_mask(cfg, flat_params)) if cfg.weight_decay
            else optax.identity(),
            optax.scale_by_learning_rate(sched))
    else:
        inner = optax.adamw(sched, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                            mask=decay_mask(cfg, flat_params) if cfg.weight_decay else None)
    chain = []
    if cfg.grad_clip is not None and cfg.grad_clip > 0:
        chain.append(optax.clip_by_global_norm(float(cfg.grad_clip)))
    chain.append(inner)
    if cfg.lr_multipliers:
        # AdamW's (and Adafactor's) update, weight decay included, is linear in the learning rate, so
        # scaling the final update of a param by s is the optimizer at lr * s. One optimizer state for all params
        # (unlike
        # optax.multi_transform, whose masked per-group states cannot carry shardings).
        pats = [(re.compile(p), float(s)) for p, s in cfg.lr_multipliers]
        chain.append(_scale_updates({k: next((s for r, s in pats if r.search(k)), 1.0) for k in flat_params}))
    return optax.chain(*chain), sched


def _scale_updates(scales: Mapping[str, float]) -> optax.GradientTransformation:
    """Multiply the update of each param (a flat dict keyed like ``scales``) by a constant."""
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return {k: u if scales[k] == 1.0 else u * scales[k] for k, u in updates.items()}, state

    return optax.GradientTransformation(init, update)


class _HFAdafactorState(NamedTuple):
    count: Any
    v_row: dict      # factored tensors: mean of g^2 over the last dim; others: a (1,) placeholder
    v_col: dict      # factored tensors: mean over the second-to-last dim
    v: dict          # tensors of < 2 dims (per slice): the full second moment


def scale_by_hf_adafactor(lead: Mapping[str, int], decay_rate: float = 0.8, eps: float = 1e-30,
                          clip_threshold: float = 1.0) -> optax.GradientTransformation:
    """transformers' ``Adafactor`` update before the learning rate (``scale_parameter=False``, no momentum),
    over a flat dict of params whose first ``lead[path]`` dims stack separate tensors: each slice is
    factored when it has >= 2 dims and RMS-clipped on its own. (optax.adafactor factors only dims >= 128,
    picks the two largest, clips whole arrays and adds weight decay after the lr: not the reference's.)"""
    def per_param(shape_fn):
        # tree_map (not a dict comprehension): optax.tree_map_params inits with a placeholder for the params
        def f(path, p):
            return jnp.zeros(shape_fn(p.shape, p.ndim - lead[path[0].key] >= 2), jnp.float32)
        return lambda params: jax.tree_util.tree_map_with_path(f, params)

    row = per_param(lambda s, fac: s[:-1] if fac else (1,))
    col = per_param(lambda s, fac: s[:-2] + s[-1:] if fac else (1,))
    full = per_param(lambda s, fac: (1,) if fac else s)

    def init(params):
        return _HFAdafactorState(jnp.zeros((), jnp.int32), row(params), col(params), full(params))

    def update(updates, state, params=None):
        del params
        t = state.count + 1
        beta = 1.0 - jnp.power(t.astype(jnp.float32), -decay_rate)
        row, col, v, out = {}, {}, {}, {}
        for k, g in updates.items():
            g = g.astype(jnp.float32)
            g2 = g * g + eps
            if g.ndim - lead[k] >= 2:
                row[k] = beta * state.v_row[k] + (1 - beta) * g2.mean(-1)
                col[k] = beta * state.v_col[k] + (1 - beta) * g2.mean(-2)
                r = jax.lax.rsqrt(row[k] / row[k].mean(-1, keepdims=True))
                u = g * r[..., None] * jax.lax.rsqrt(col[k])[..., None, :]
                v[k] = state.v[k]
            else:
                v[k] = beta * state.v[k] + (1 - beta) * g2
                u = g * jax.lax.rsqrt(v[k])
                row[k], col[k] = state.v_row[k], state.v_col[k]
            axes = tuple(range(lead[k], g.ndim))
            rms = jnp.sqrt(jnp.mean(u * u, axis=axes, keepdims=True)) if axes else jnp.abs(u)
            out[k] = (u / jnp.maximum(1.0, rms / clip_threshold)).astype(updates[k].dtype)
        return out, _HFAdafactorState(t, row, col, v)

    return optax.GradientTransformation(init, update)
