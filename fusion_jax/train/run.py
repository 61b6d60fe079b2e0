"""Run scaffolding shared by every method's pipeline: process roles, distributed setup, the run
directory with its configuration fingerprint, stage-by-stage resume, and one-call Trainer runs.

A pipeline (``python train.py --config=configs/<method>.py``) is a short list of stages::

    c = validate(config)
    run = Run.open(c, fingerprint=config_fingerprint(c, ("seed", "model", "data", ...)))
    a = run.stage("teacher_pass", lambda: ...)      # a JSON-able result, computed once
    params, curve = train_on_arrays(loss_fn, params, axes, arrays, c.train, run.work / "sft", mesh, ...)

``Run.open`` makes ``<output_dir>/<name>/`` and its ``work/`` directory (Orbax checkpoints, metrics, stage
results) and refuses a work directory that holds the progress of a run with another configuration. A
rerun of the same command resumes: finished stages return their saved results, and each Trainer run
restores its latest checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np

from fusion_jax.errors import ConfigError, FusionError, OutputError
from fusion_jax.utils.atomic import atomic_file, check_writable_dir

FINGERPRINT = "fingerprint.json"
STAGES_DIR = "stages"


# -- processes ---------------------------------------------------------------------------------------
def is_main() -> bool:
    """Process 0 writes shared outputs (reports, caches); every process computes."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait for every process (a no-op with one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def log(msg: str) -> None:
    """Print on process 0 only (the progress bars and metrics files carry the details)."""
    if is_main():
        print(msg, flush=True)


def init_distributed(d: Any) -> None:
    """``jax.distributed`` from a config group ``{coordinator_address, num_processes, process_id}``.

    The group's "unset" values (no address, 0 processes, id -1) fall back to the FUSION_* environment
    variables, so one config serves every host; ``coordinator_address="auto"`` defers to JAX's cluster
    detection (TPU pods, SLURM, Open MPI)."""
    from fusion_jax.train import distributed
    if d is not None and str(d.coordinator_address):
        distributed.initialize({"coordinator_address": str(d.coordinator_address),
                                "num_processes": int(d.num_processes) if int(d.num_processes) > 0 else None,
                                "process_id": int(d.process_id) if int(d.process_id) >= 0 else None})
    else:
        distributed.initialize(None)


def quiet_orbax() -> None:
    """Orbax logs every save/restore step at INFO through absl; the progress bars and the metrics files
    say what a user needs."""
    from absl import logging as absl_logging
    if absl_logging.get_verbosity() > absl_logging.WARNING:
        absl_logging.set_verbosity(absl_logging.WARNING)


# -- fingerprints ---------------------------------------------------------------------------------------
def config_fingerprint(c: Any, keys: Iterable[str], drop: Mapping[str, Iterable[str]] | None = None) -> str:
    """Hash of the config groups ``keys`` (what determines the trained params: not eval or logging options,
    not the mesh, since results do not depend on the device count), less ``drop[group]`` fields."""
    d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
    keep = {k: d[k] for k in keys if k in d}
    for group, fields in (drop or {}).items():
        if isinstance(keep.get(group), dict):
            for f in fields:
                keep[group].pop(f, None)
    blob = json.dumps(keep, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def has_progress(work: Path) -> bool:
    """Whether ``work`` holds anything a rerun would resume from: a finished stage or a checkpoint step."""
    work = Path(work)
    if not work.is_dir():
        return False
    if any((work / STAGES_DIR).glob("*.json")):
        return True
    return any(p.name.isdigit() and p.is_dir() for ck in work.rglob("checkpoints") if ck.is_dir()
               for p in ck.iterdir())


# -- the run directory ------------------------------------------------------------------------------------
class Run:
    """``<output_dir>/<name>/`` (the outputs a user reads) and its ``work/`` (checkpoints, metrics, stage
    results). Use :meth:`open`."""

    def __init__(self, out_dir: Path, fingerprint: str):
        self.out_dir = Path(out_dir)
        self.work = self.out_dir / "work"
        self.fingerprint = fingerprint
        self.timings: dict[str, float] = {}
        self._t0 = time.perf_counter()

    @classmethod
    def open(cls, c: Any, *, fingerprint: str) -> "Run":
        """Create (or reopen) ``c.output_dir / c.name`` for a run with this ``fingerprint``.

        Raises OutputError naming ``output_dir`` when it cannot hold a run directory (a file, read-only),
        and ConfigError when ``work/`` holds checkpoints or finished stages of a run with another configuration. A
        work directory of another configuration WITHOUT progress (a run rejected before its first
        checkpoint) is cleared, so that the corrected command is not refused."""
        out_dir = Path(str(c.output_dir)).expanduser() / str(c.name)
        run = cls(out_dir, fingerprint)
        if is_main():
            run._prepare()
        barrier("run-open")
        return run

    def _prepare(self) -> None:
        check_writable_dir(self.work, "output_dir")
        try:
            self.work.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"output_dir: cannot create the run directory {self.out_dir}: "
                              f"{e.strerror or e}") from None
        f = self.work / FINGERPRINT
        old = _read_fingerprint(f)
        if old == self.fingerprint:
            return
        if old is not None and has_progress(self.work):
            raise ConfigError(f"{self.work} holds checkpoints of a run with a different configuration "
                              f"(fingerprint {old}, now {self.fingerprint}); delete it or choose another "
                              "--config.name")
        if old is not None:   # a different run that never got anywhere: its leftovers are not ours
            for child in self.work.iterdir():
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        with atomic_file(f) as fh:
            json.dump({"fingerprint": self.fingerprint}, fh)

    # -- stages ---------------------------------------------------------------------------------------
    def stage(self, name: str, fn: Callable[[], Any], *, log_done: bool = True) -> Any:
        """``fn()``'s JSON-able result, computed once: a rerun returns the saved result of a finished
        stage without calling ``fn``. Its wall time goes into :attr:`timings` as ``<name>_s``."""
        f = self.work / STAGES_DIR / f"{name}.json"
        if f.is_file():
            try:
                saved = json.loads(f.read_text())
                self.timings[f"{name}_s"] = float(saved.get("seconds", 0.0))
                if log_done:
                    log(f"{name}: done in an earlier run ({f})")
                return saved["result"]
            except (OSError, ValueError, KeyError):
                pass   # a damaged stage file: compute the stage again
        t = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t
        self.timings[f"{name}_s"] = dt
        if is_main():
            with atomic_file(f) as fh:
                json.dump({"result": result, "seconds": dt}, fh, default=_json_default)
        barrier(f"stage-{name}")
        return result

    def timed(self, name: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` with its wall time recorded as ``<name>_s`` (work that is cheap to redo on resume)."""
        t = time.perf_counter()
        out = fn()
        self.timings[f"{name}_s"] = time.perf_counter() - t
        return out

    def total_seconds(self) -> float:
        return time.perf_counter() - self._t0


def _options(cfg: Any) -> dict:
    """A config group given as a ConfigDict, a mapping or a dataclass, as a plain dict."""
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    return dict(cfg)


def _read_fingerprint(f: Path) -> str | None:
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return "<unreadable>"


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON-serializable: {type(x).__name__}")


# -- one Trainer run over in-memory arrays ------------------------------------------------------------------
def train_on_arrays(loss_fn, params, axes, arrays: Mapping[str, Any], run_cfg, workdir: Path, mesh, seed: int,
                    trainer_cfg, desc: str, *, grad_clip: float | None = 1.0, trainable=None,
                    schedule: str = "cosine", end_lr_ratio: float = 0.1, weight_decay: float = 0.0,
                    meta: Mapping[str, Any] | None = None, batch_fn: Callable[[dict], dict] | None = None,
                    betas: tuple[float, float] = (0.9, 0.999)):
    """One :class:`~fusion_jax.train.Trainer` run; returns ``(params, metrics rows)``.

    ``arrays``: ``{name: [N, ...]}`` rows drawn uniformly (seeded, resumable), ``run_cfg.batch`` per step;
    or ``{domain: {name: [N, ...]}}``: ``run_cfg.batch`` rows of EACH domain per step (balanced sampler).
    ``run_cfg``: ``steps``, ``batch``, ``learning_rate``, ``warmup_steps``. ``trainer_cfg``: ``save_every``,
    ``keep_checkpoints``, ``log_every``, ``progress``, ``async_checkpointing``. Rerunning resumes from
    ``workdir``'s latest checkpoint (a finished run returns at once). ``batch_fn``: maps each sampled host
    batch to the batch the loss sees (e.g. adds features read from memory-mapped files for the sampled
    rows); the data position saved for resume is the sampler's.
    """
    from fusion_jax.data.sampler import DomainBalancedSampler
    from fusion_jax.train import OptimizerConfig, Trainer, TrainerConfig
    from fusion_jax.train.metrics import read_jsonl

    if not arrays:
        raise FusionError(f"{desc}: no training data")
    by_domain = arrays if isinstance(next(iter(arrays.values())), Mapping) else {desc: arrays}
    r, t = _options(run_cfg), _options(trainer_cfg)
    steps, batch = int(r["steps"]), int(r["batch"])
    log(f"  {desc}: {steps} steps x {batch} rows" + (" per domain" if len(by_domain) > 1 else ""))
    sampler = DomainBalancedSampler({k: dict(v) for k, v in by_domain.items()}, batch, seed=seed,
                                    process_index=jax.process_index(), process_count=jax.process_count())
    opt = OptimizerConfig(learning_rate=float(r["learning_rate"]), warmup_steps=int(r.get("warmup_steps", 0)),
                          schedule=schedule, end_lr_ratio=end_lr_ratio, weight_decay=weight_decay,
                          grad_clip=grad_clip, b1=float(betas[0]), b2=float(betas[1]))
    tc = TrainerConfig(total_steps=steps, workdir=str(workdir), seed=seed, save_every=int(t["save_every"]),
                       keep_checkpoints=int(t["keep_checkpoints"]), log_every=max(1, min(int(t["log_every"]), steps)),
                       progress=bool(t["progress"]), async_checkpointing=bool(t["async_checkpointing"]))
    trainer = Trainer(loss_fn, params, opt, tc, mesh=mesh, param_logical_axes=axes, trainable=trainable,
                      meta=meta)
    try:
        result = trainer.run(sampler if batch_fn is None else MappedBatches(sampler, batch_fn))
    finally:
        trainer.close()
    f = Path(workdir) / "logs" / "metrics.jsonl"
    return result.params, (read_jsonl(f) if f.is_file() else [])


class MappedBatches:
    """An iterator's batches through ``fn``, keeping its resume protocol (``get_state`` / ``set_state`` /
    ``state_is_global``) for the Trainer."""

    def __init__(self, it, fn: Callable[[dict], dict]):
        self._it, self._fn = it, fn
        self.state_is_global = bool(getattr(it, "state_is_global", False))

    def __iter__(self) -> "MappedBatches":
        self._it = iter(self._it)
        return self

    def __next__(self) -> dict:
        return self._fn(next(self._it))

    def get_state(self):
        return self._it.get_state()

    def set_state(self, state) -> None:
        self._it.set_state(state)
