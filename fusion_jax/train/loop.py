"""The Trainer: one training loop reused by every method (UltraFuser, distillation, XFT, LM pretraining).

Construction and run::

    trainer = Trainer(loss_fn, params, OptimizerConfig(...), TrainerConfig(total_steps=..., workdir=...),
                      trainable=("gate/",), mesh=mesh, param_logical_axes=axes)
    result = trainer.run(data)          # resumes from <workdir>/checkpoints automatically
    params = result.params              # full (merged trainable + frozen) params pytree

``loss_fn(params, batch, rng) -> (loss, aux)``
    ``params``: the full params pytree (same structure as given to the Trainer; frozen leaves included).
    ``batch``: dict of global jax.Arrays, leading dim = global batch (a microbatch under accumulation).
    ``rng``: a PRNG key distinct per step and microbatch (``fold_in(fold_in(seed_key, step), micro)``).
    ``loss``: scalar, token-weighted mean over the batch. ``aux``: dict of scalars; ``aux["num_tokens"]``
    (number of target tokens) weights microbatches and gives tokens/s. Helpers: ``train/losses.py``.

Data protocol (what ``run(data)`` accepts)
    Any iterable of batches; ``iter(data)`` is called once. Each batch is a dict (pytree) of numpy arrays
    holding **this process's share** of the global batch (``B / process_count`` rows; see
    ``sharding.process_batch_slice``). For exact resume the iterator should offer
    ``get_state() -> dict | bytes | str`` (JSON-serializable) and ``set_state(state)``: grain's
    ``DatasetIterator`` and ``DataLoaderIterator`` do, and so does
    ``fusion_jax.data.sampler.DomainBalancedSampler`` (state ``{"step": t}``). Without them the trainer
    records how many batches were consumed and on resume skips that many from a fresh iterator (correct
    for any deterministic iterable, at the cost of re-reading). One batch is consumed per optimizer step
    (gradient accumulation splits it into ``grad_accum_steps`` microbatches). Resuming on a different
    number of processes restores the data position only from an iterator with ``state_is_global = True``
    (its state is the same on every process, e.g. ``DomainBalancedSampler``'s step) or a plain one;
    grain's per-process positions refuse with a clear error.

Checkpoints: see ``checkpointing.py`` for the layout. Metrics: ``<workdir>/logs/metrics.jsonl`` and
TensorBoard events there. A non-finite loss or gradient norm raises :class:`TrainingError` naming the
step; that state is never saved, so the latest checkpoint stays the last good one.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fusion_jax import sharding as shd
from fusion_jax.errors import ConfigError, TrainingError
from fusion_jax.train import distributed
from fusion_jax.train.checkpointing import Checkpointer
from fusion_jax.train.metrics import MetricsLogger
from fusion_jax.train.optimizer import OptimizerConfig, build_optimizer, stack_dims
from fusion_jax.train.progress import Progress
from fusion_jax.train.state import ParamSplit, TrainState, TrainableSpec, count_elements
from fusion_jax.train.step import LossFn, make_train_step


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    total_steps: int
    workdir: str | None = None         # checkpoints in <workdir>/checkpoints, logs in <workdir>/logs
    grad_accum_steps: int = 1
    save_every: int = 100              # checkpoint every N steps (and at the end); 0: only at the end
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    save_frozen: bool = True           # False: frozen params are not checkpointed (re-supplied on resume)
    resume: bool = True                # resume from the latest checkpoint in workdir when there is one
    log_every: int = 10
    eval_every: int = 0                # run ``eval_fn`` every N steps (and at step 0 and the end); 0: never
    progress: bool = True
    tensorboard: bool = True
    seed: int = 0
    donate: bool = True

    @classmethod
    def from_config(cls, cfg: Any, **overrides) -> "TrainerConfig":
        if isinstance(cfg, cls):
            return dataclasses.replace(cfg, **overrides)
        if hasattr(cfg, "to_dict"):
            cfg = cfg.to_dict()
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {}
        for k, v in dict(cfg or {}).items():
            if k not in names:
                raise ConfigError(f"trainer.{k}: unknown option (known: {', '.join(sorted(names))})")
            kw[k] = v
        kw.update(overrides)
        if "total_steps" not in kw:
            raise ConfigError("trainer.total_steps: required")
        out = cls(**kw)
        out.validate()
        return out

    def validate(self) -> None:
        if self.total_steps < 1:
            raise ConfigError(f"trainer.total_steps: must be >= 1, got {self.total_steps}")
        if self.grad_accum_steps < 1:
            raise ConfigError(f"trainer.grad_accum_steps: must be >= 1, got {self.grad_accum_steps}")
        if self.save_every < 0:
            raise ConfigError(f"trainer.save_every: must be >= 0, got {self.save_every}")
        if self.eval_every < 0:
            raise ConfigError(f"trainer.eval_every: must be >= 0, got {self.eval_every}")


@dataclasses.dataclass
class TrainResult:
    params: Any                   # full params pytree (trainable merged with frozen)
    state: TrainState
    step: int
    resumed_from: int | None
    history: list[dict]           # one row of host metrics per step run in this call


def _snapshot(it: Any) -> Any:
    s = it.get_state()
    return s if isinstance(s, (bytes, str)) else json.loads(json.dumps(s))


class Trainer:
    def __init__(self, loss_fn: LossFn, params: Any, optimizer: OptimizerConfig | Mapping | Any,
                 config: TrainerConfig, *, trainable: TrainableSpec = None, mesh: Mesh | None = None,
                 param_logical_axes: Any = None, rules: shd.Rules | None = None,
                 batch_logical_axes: Mapping[str, tuple] | None = None,
                 callbacks: Iterable[Callable[[int, dict, "Trainer"], None]] = (),
                 meta: Mapping[str, Any] | None = None,
                 eval_fn: Callable[[Any], Mapping[str, float]] | None = None):
        """
        params: full params pytree (nested dicts / nnx pure dict); arrays or numpy.
        trainable: None (optimizer.trainable or all), regex(es) over "a/b/c" paths, predicate, or bool mask tree.
        mesh: device mesh (default: all devices on fsdp). param_logical_axes: pytree of logical-axis tuples
          matching ``params`` (e.g. ``sharding.state_logical_axes(model)``); None replicates params.
        batch_logical_axes: per batch key, logical names of its dims (default ("batch",) + None...).
        callbacks: ``cb(step, host_metrics, trainer)`` after every step (plots, custom hooks).
        eval_fn: ``eval_fn(params) -> {name: float}`` (held-out losses: the curve that shows whether training
          helps, free of the batch-to-batch noise of the train loss), run every ``config.eval_every`` steps, at
          step 0 and at the end; logged as ``eval/<name>`` rows of the metrics (every process calls it).
        """
        self.config = config
        config.validate()
        self.opt_config = OptimizerConfig.from_config(optimizer)
        self.loss_fn = loss_fn
        self.mesh = mesh if mesh is not None else shd.make_mesh()
        self.rules = rules
        self.batch_logical_axes = dict(batch_logical_axes or {})
        self.callbacks = list(callbacks)
        self.eval_fn = eval_fn
        self.meta = dict(meta or {})
        spec = trainable if trainable is not None else self.opt_config.trainable
        self.split = ParamSplit(params, spec)
        flat_t, flat_f = self.split.split(params)

        axes_flat = self.split.flat(param_logical_axes) if param_logical_axes is not None else None
        repl = NamedSharding(self.mesh, P())

        def sh_for(flat):
            if axes_flat is None:
                return {k: repl for k in flat}
            return {k: NamedSharding(self.mesh, shd.logical_to_spec(axes_flat[k], np.shape(v), self.mesh, rules))
                    for k, v in flat.items()}

        self.tx, self.schedule = build_optimizer(self.opt_config, flat_t, config.total_steps,
                                                 stacked=stack_dims(axes_flat, flat_t))
        p_sh, f_sh = sh_for(flat_t), sh_for(flat_f)
        abstract_params = {k: jax.ShapeDtypeStruct(np.shape(v), jnp.asarray(v).dtype if not hasattr(v, "dtype")
                                                   else v.dtype) for k, v in flat_t.items()}
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        # a state leaf shaped like its param is sharded like it; others (Adafactor's factored row / column
        # statistics) are small and replicated
        opt_sh = optax.tree_map_params(self.tx, lambda st, s, p: s if st.shape == p.shape else repl, abstract_opt,
                                       p_sh, abstract_params, transform_non_params=lambda _: repl)
        self.state_shardings = TrainState(step=repl, params=p_sh, frozen=f_sh, opt_state=opt_sh, rng=repl)

        params_dev = jax.device_put(flat_t, p_sh)
        frozen_dev = jax.device_put(flat_f, f_sh)
        opt_state = jax.jit(self.tx.init, out_shardings=opt_sh)(params_dev)
        rng = jax.device_put(jax.random.key_data(jax.random.key(config.seed)), repl)
        step0 = jax.device_put(jnp.zeros((), jnp.int32), repl)
        self.state = TrainState(step=step0, params=params_dev, frozen=frozen_dev, opt_state=opt_state, rng=rng)

        self._train_step = make_train_step(loss_fn, self.tx, self.split, self.schedule, config.grad_accum_steps)
        self._jitted: dict[Any, Callable] = {}
        self.checkpointer: Checkpointer | None = None
        if config.workdir:
            self.checkpointer = Checkpointer(os.path.join(config.workdir, "checkpoints"),
                                             save_every=config.save_every, keep=config.keep_checkpoints,
                                             async_save=config.async_checkpointing,
                                             save_frozen=config.save_frozen)
        self.num_trainable = count_elements(flat_t)
        self.num_frozen = count_elements(flat_f)

    # ------------------------------------------------------------------------------------------------
    @property
    def params(self) -> Any:
        """The full params pytree (trainable merged with frozen)."""
        return self.split.merge(self.state.params, self.state.frozen)

    @property
    def step(self) -> int:
        return int(jax.device_get(self.state.step))

    def batch_shardings(self, batch: Any) -> Any:
        """NamedShardings of a *global* batch with the shapes of ``batch`` (its leading dim = global B)."""
        def f(path, x):
            name = str(getattr(path[0], "key", "")) if path else ""
            names = self.batch_logical_axes.get(name)
            if names is None:
                names = ("batch",) + (None,) * (np.ndim(x) - 1)
            return NamedSharding(self.mesh, shd.logical_to_spec(tuple(names), np.shape(x), self.mesh, self.rules))
        return jax.tree_util.tree_map_with_path(f, batch)

    def _global_shape_batch(self, local: Any) -> Any:
        n = jax.process_count()
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] * n,) + np.shape(x)[1:],
                                                           np.asarray(x).dtype), local)

    def _compiled(self, batch_sh: Any) -> Callable:
        key = jax.tree_util.tree_structure(batch_sh), tuple(jax.tree.leaves(batch_sh))
        if key not in self._jitted:
            repl = NamedSharding(self.mesh, P())
            self._jitted[key] = jax.jit(
                self._train_step, in_shardings=(self.state_shardings, batch_sh),
                out_shardings=(self.state_shardings, repl),
                donate_argnums=(0,) if self.config.donate else ())
        return self._jitted[key]

    def to_global(self, local_batch: Any) -> tuple[Any, Any]:
        gshape = self._global_shape_batch(local_batch)
        # checked here, before tracing, so that a bad batch is a ConfigError and not a trace-time error
        shapes = {jax.tree_util.keystr(k): x.shape for k, x in jax.tree_util.tree_leaves_with_path(gshape)}
        rows = {s[0] if s else None for s in shapes.values()}
        if len(rows) != 1 or None in rows:
            raise ConfigError(f"batch: every array needs the same leading (batch) dim; global shapes {shapes}")
        n = rows.pop()
        if n % self.config.grad_accum_steps:
            raise ConfigError(f"trainer.grad_accum_steps: the global batch of {n} rows does not split into "
                              f"{self.config.grad_accum_steps} microbatches")
        sh = self.batch_shardings(gshape)
        return distributed.global_batch(local_batch, sh), sh

    def step_fn(self, local_batch: Any) -> dict:
        """Run one optimizer step on a process-local batch (no checks); returns device metrics."""
        gb, sh = self.to_global(local_batch)
        # traced and run with the mesh as the context mesh: what lets a model find its mesh axes inside the
        # step (an MoE block runs its experts expert-parallel over the ``expert`` axis); nothing else changes
        with jax.set_mesh(self.mesh):
            self.state, metrics = self._compiled(sh)(self.state, gb)
        return metrics

    # ------------------------------------------------------------------------------------------------
    def restore_latest(self, global_data_state: bool = False) -> tuple[int | None, Any, dict]:
        """Restore the latest checkpoint into the current shardings; returns (step, data_state, its meta), or
        (None, None, {}) when there is none. ``global_data_state``: see :meth:`Checkpointer.restore`."""
        if self.checkpointer is None:
            return None, None, {}
        latest = self.checkpointer.latest_step()
        if latest is None:
            return None, None, {}
        self.state, data_state, meta = self.checkpointer.restore(latest, self.state, self.state_shardings,
                                                                 global_data_state=global_data_state)
        return latest, data_state, meta

    def run(self, data: Iterable[Any]) -> TrainResult:
        cfg = self.config
        total = cfg.total_steps
        it = iter(data)
        stateful = hasattr(it, "get_state") and hasattr(it, "set_state")
        # A plain iterator is resumed by skipping the steps done (a global count); a stateful one only
        # when it says its state is one global position (``state_is_global``), not a per-process one.
        global_state = not stateful or bool(getattr(it, "state_is_global", False))
        resumed_from, data_state, restored = (self.restore_latest(global_state) if cfg.resume else (None, None, {}))
        start = self.step
        if resumed_from is not None and data_state is not None:
            if stateful and not (isinstance(data_state, dict) and "_skip_batches" in data_state):
                it.set_state(data_state)
            else:
                for _ in range(int(data_state["_skip_batches"])):
                    next(it)

        logger = MetricsLogger(os.path.join(cfg.workdir, "logs") if cfg.workdir else None,
                               tensorboard=cfg.tensorboard)
        if resumed_from is not None:
            logger.truncate_after(resumed_from)
        progress = Progress(total, initial=start, enabled=None if cfg.progress else False)
        if resumed_from is not None:
            progress.write(f"resumed from step {resumed_from} ({self.checkpointer.directory})")
        history: list[dict] = []
        # the steps since the last logged row: saved with each checkpoint, so that a run resumed between
        # two log steps logs the same means over the same steps as an uninterrupted one
        window: list[dict] = list(restored.get("log_window") or []) if cfg.log_every else []
        carried = len(window)    # of those, the steps run before the restart: not in the time since t_last
        t_last = time.perf_counter()

        def fetch(consumed: int):
            try:
                b = next(it)
            except StopIteration:
                return None, None
            ds = _snapshot(it) if stateful else {"_skip_batches": consumed}
            return b, ds

        def evaluate(at: int) -> None:
            if self.eval_fn is None or not cfg.eval_every:
                return
            vals = {f"eval/{k}": float(v) for k, v in self.eval_fn(self.params).items()}
            logger.log(at, vals)
            if history and history[-1]["step"] == at:
                history[-1].update(vals)

        step = start
        if start == 0:
            evaluate(0)
        batch, dstate = (fetch(start + 1) if step < total else (None, None))
        try:
            while step < total and batch is not None:
                metrics = self.step_fn(batch)
                step += 1
                nxt, nxt_state = fetch(step + 1) if step < total else (None, None)  # overlaps the device step
                host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                loss, gn = host["loss"], host["grad_norm"]
                if not (math.isfinite(loss) and math.isfinite(gn)):
                    last = None
                    if self.checkpointer is not None:
                        self.checkpointer.wait()
                        last = self.checkpointer.latest_step()
                    where = (f"; the latest checkpoint is still step {last} in {self.checkpointer.directory}"
                             if last is not None else "; no checkpoint was written")
                    raise TrainingError(f"non-finite {'loss' if not math.isfinite(loss) else 'gradient norm'} "
                                        f"at step {step} (loss={loss}, grad_norm={gn}); training stopped "
                                        f"without saving this state{where}")
                tokens = host.get("num_tokens", float(np.prod(np.shape(jax.tree.leaves(batch)[0])[:1]))
                                  * jax.process_count())
                rate = progress.update(step, loss, tokens)
                host["tokens_per_sec"] = rate
                history.append(dict(host, step=step))
                if cfg.log_every:   # no logging: no window (it would grow in memory and in every checkpoint)
                    window.append(host)
                if cfg.log_every and (step % cfg.log_every == 0 or step == total):
                    now = time.perf_counter()
                    row = {k: float(np.mean([w[k] for w in window if k in w])) for k in window[-1]}
                    row["num_tokens"] = float(sum(w.get("num_tokens", 0.0) for w in window))
                    timed = window[carried:]
                    row["tokens_per_sec"] = (float(sum(w.get("num_tokens", 0.0) for w in timed))
                                             / max(now - t_last, 1e-9))
                    row["step_time_s"] = (now - t_last) / len(timed)
                    logger.log(step, row)
                    window, t_last, carried = [], now, 0
                if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
                    evaluate(step)
                for cb in self.callbacks:
                    cb(step, host, self)
                if self.checkpointer is not None and (
                        self.checkpointer.should_save(step, total) or nxt is None):
                    self.checkpointer.save(step, self.state, dstate, meta=dict(
                        self.meta, trainable=self.split.trainable_paths, frozen=self.split.frozen_paths,
                        process_count=jax.process_count(), log_window=list(window)))
                batch, dstate = nxt, nxt_state
            if step < total:
                progress.write(f"data ran out after {step} of {total} steps")
        finally:
            progress.close()
            logger.close()
            if self.checkpointer is not None:
                self.checkpointer.wait()
        return TrainResult(params=self.params, state=self.state, step=step,
                           resumed_from=resumed_from, history=history)

    def close(self) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()
