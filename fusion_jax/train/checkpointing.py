"""Orbax checkpoints of the train state and the data iterator position, with automatic resume.

Layout (one Orbax ``CheckpointManager`` directory; step folders appear only once complete)::

    <workdir>/checkpoints/<step>/
        state/     Orbax PyTree: {step, params (trainable, flat), opt_state, rng}
        frozen/    Orbax PyTree: frozen params (flat); only with save_frozen=True
        data/      process_<i>-of-<n>.json: each process's data-iterator state (like grain's handler)
        meta/      JSON: {step, trainable paths, frozen paths, process_count, fingerprints, ...}

Only Orbax writes checkpoint files (every process takes part, as Orbax requires on multi-host). Restores
go straight into the target shardings (abstract ShapeDtypeStructs carry them).

Every Orbax / TensorStore failure is caught where Orbax is called and becomes a :class:`CheckpointError`
(an ``OutputError`` for a full disk or a read-only filesystem) naming the checkpoint directory, in one
line. Orbax stores arrays without a checksum (a flipped byte in a data file can restore as other numbers,
silently), so ``meta`` records a fingerprint of every saved array (:mod:`fusion_jax.utils.fingerprint`,
computed on device, whatever the sharding) and a restore checks them. Handing a step to Orbax's
background writer, waiting for it and closing the manager run with SIGINT/SIGTERM held
(:func:`fusion_jax.utils.interrupt.deferred`): an interrupted run finishes the checkpoint in progress,
so the same command resumes from it, and no writer outlives the process.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from fusion_jax.errors import CheckpointError, FusionError, OutputError
from fusion_jax.utils import interrupt, oserrors
from fusion_jax.utils.fingerprint import check_fingerprints, flat_fingerprints
from fusion_jax.utils.orbax_errors import quiet_orbax_noise, summarize


# ---------------------------------------------------------------- per-process data-iterator state ----

class DataStateHandler(ocp.CheckpointHandler):
    """Writes one JSON file per process (the iterator's ``get_state()``), as grain's handler does.

    Unlike grain's, it saves a *snapshot* taken when the step's batch was drawn, so that prefetching the
    next batch before saving does not shift the resumed position.
    """

    def save(self, directory: epath.Path, args: "DataStateSave"):
        state = args.state
        if isinstance(state, bytes):
            payload = {"kind": "bytes", "state": state.decode()}
        else:
            payload = {"kind": "json", "state": state}
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        (epath.Path(directory) / name).write_text(json.dumps(payload))

    def restore(self, directory: epath.Path, args: "DataStateRestore" = None):
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        f = epath.Path(directory) / name
        if f.exists():
            text = f.read_text()
        elif args is not None and args.global_state:
            text = self._global_state(epath.Path(directory), f)
        else:
            found = sorted(p.name for p in epath.Path(directory).iterdir())
            raise CheckpointError(f"{f}: no data-iterator state for this process (found {found}): the "
                                  "checkpoint was written by another number of processes, and this data "
                                  "iterator's position is per process; resume with the same number")
        try:
            payload = json.loads(text)
            return payload["state"].encode() if payload["kind"] == "bytes" else payload["state"]
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{f}: damaged data-iterator state ({type(e).__name__}: {e})") from None

    @staticmethod
    def _global_state(directory: epath.Path, wanted: epath.Path) -> str:
        """The state of a checkpoint written by another number of processes, for an iterator whose state is
        a global position (the same on every process, each turning it into its own share): every process
        of one complete set must have saved the same state."""
        found = sorted(p.name for p in directory.iterdir())
        saved: dict[int, dict[int, str]] = {}
        for name in found:
            m = re.fullmatch(r"process_(\d+)-of-(\d+)\.json", name)
            if m:
                saved.setdefault(int(m.group(2)), {})[int(m.group(1))] = name
        complete = [n for n, files in saved.items() if sorted(files) == list(range(n))]
        if len(complete) != 1:
            raise CheckpointError(f"{wanted}: no complete set of data-iterator states to resume from "
                                  f"(found {found})")
        texts = {(directory / name).read_text() for name in saved[complete[0]].values()}
        if len(texts) != 1:
            raise CheckpointError(f"{wanted}: the {complete[0]} processes that wrote the checkpoint saved "
                                  "different data-iterator states, so they are not one global position")
        return texts.pop()

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    # the iterator's state is a global position (``state_is_global``), so a checkpoint written by another
    # number of processes can be resumed from
    global_state: bool = False


# ------------------------------------------------------------------------------------ manager ----

def abstract_like(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs (with target shardings) for restoring ``tree``."""
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                            tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
    """Thin wrapper over ``ocp.CheckpointManager``: save every N steps, keep K, resume from the latest."""

    def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3,
                 async_save: bool = True, save_frozen: bool = True):
        quiet_orbax_noise()
        # the real location: Orbax cannot create a directory below a symlink to one not made yet
        self.directory = os.path.realpath(os.path.abspath(os.fspath(directory)))
        self.save_every = int(save_every)
        self.save_frozen = save_frozen
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True)
        with self._errors("cannot open the checkpoint directory"):
            self.manager = ocp.CheckpointManager(self.directory, options=options)

    def _errors(self, what: str, step: int | None = None):
        return _OrbaxErrors(self, what, step)

    def latest_step(self) -> int | None:
        with self._errors("cannot list the checkpoints"):
            return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        with self._errors("cannot list the checkpoints"):
            return list(self.manager.all_steps())

    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.save_every > 0 and step % self.save_every == 0)

    def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None) -> None:
        tree = {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
        frozen = state.frozen if self.save_frozen and state.frozen else None
        fps = {"state": flat_fingerprints(tree)}
        if frozen is not None:
            fps["frozen"] = flat_fingerprints(frozen)
        items = {
            "state": ocp.args.StandardSave(tree),
            "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step), fingerprints=fps)),
        }
        if frozen is not None:
            items["frozen"] = ocp.args.StandardSave(frozen)
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        # held signals: once Orbax has the arrays, its background writer must finish (or be awaited)
        with interrupt.deferred(), self._errors("cannot write checkpoint", step):
            self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, target_state: Any, target_shardings: Any = None, *,
                global_data_state: bool = False) -> tuple[Any, Any, dict]:
        """Restore ``step`` into the structure/shardings of ``target_state`` (a TrainState).

        Returns ``(state, data_state or None, meta)``. Frozen params come from the checkpoint when it has
        them, else from ``target_state`` unchanged. ``global_data_state``: the data iterator's state is the
        same on every process, so it may come from a checkpoint written by another number of processes.
        """
        sh = target_shardings
        abstract = {
            "step": abstract_like(target_state.step, None if sh is None else sh.step),
            "params": abstract_like(target_state.params, None if sh is None else sh.params),
            "opt_state": abstract_like(target_state.opt_state, None if sh is None else sh.opt_state),
            "rng": abstract_like(target_state.rng, None if sh is None else sh.rng),
        }
        step_dir = epath.Path(self.directory) / str(step)
        present = {p.name for p in step_dir.iterdir()} if step_dir.exists() else set()
        if "state" not in present or "meta" not in present:
            raise CheckpointError(f"{step_dir}: damaged checkpoint: its "
                                  f"{' and '.join(x for x in ('state', 'meta') if x not in present)} "
                                  "directory is missing (delete this step directory to resume from an "
                                  "earlier one)")
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        if "frozen" in present and target_state.frozen:
            items["frozen"] = ocp.args.StandardRestore(
                abstract_like(target_state.frozen, None if sh is None else sh.frozen))
        if "data" in present:
            items["data"] = DataStateRestore(global_state=global_data_state)
        try:
            r = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        except FusionError:
            raise
        except Exception as e:  # noqa: BLE001 - Orbax/TensorStore raise ValueError, KeyError, Exception...
            raise CheckpointError(f"{step_dir}: cannot restore into the current train state: the checkpoint "
                                  "is damaged (delete this step directory to resume from an earlier one), "
                                  "or was written for a different model, trainable set or optimizer "
                                  f"({summarize(e)})") from e
        s = r["state"]
        frozen = r["frozen"] if "frozen" in items else target_state.frozen
        state = target_state.replace(step=s["step"], params=s["params"], opt_state=s["opt_state"],
                                     rng=s["rng"], frozen=frozen)
        meta = r["meta"]
        if meta is not None and not isinstance(meta, dict):
            raise CheckpointError(f"{step_dir / 'meta'}: damaged checkpoint metadata (not a JSON object)")
        fps = (meta or {}).get("fingerprints") or {}
        if not isinstance(fps, dict):
            raise CheckpointError(f"{step_dir / 'meta'}: damaged checkpoint metadata (fingerprints)")
        for item, restored in (("state", s), ("frozen", r["frozen"] if "frozen" in items else None)):
            if restored is not None and isinstance(fps.get(item), dict):
                check_fingerprints(restored, fps[item], f"{step_dir / item}", f"{step_dir / 'meta'}")
        return state, (r["data"] if "data" in items else None), dict(meta or {})

    def wait(self) -> None:
        with interrupt.deferred(), self._errors("cannot write checkpoint"):
            self.manager.wait_until_finished()

    def close(self) -> None:
        with interrupt.deferred(), self._errors("cannot write checkpoint"):
            try:
                self.manager.wait_until_finished()
            finally:
                self.manager.close()

    def remove_unfinished(self) -> list[str]:
        """Remove Orbax's temporary step directories (a save that failed): never a complete checkpoint."""
        removed = []
        try:
            names = os.listdir(self.directory)
        except OSError:
            return removed
        for name in names:
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
                removed.append(name)
        return removed


class _OrbaxErrors:
    """``with``: an exception from Orbax becomes a CheckpointError / OutputError naming the directory
    (and step); the temporary directory of a failed save is removed."""

    def __init__(self, ckpt: Checkpointer, what: str, step: int | None):
        self.ckpt, self.what, self.step = ckpt, what, step

    def __enter__(self):
        return self

    def __exit__(self, exc_type, e, tb):
        if e is None or not isinstance(e, Exception) or isinstance(e, FusionError):
            return False
        where = self.ckpt.directory + (f" (step {self.step})" if self.step is not None else "")
        if self.what.startswith("cannot write"):
            self.ckpt.remove_unfinished()
        if oserrors.is_environment_error(e):
            raise OutputError(f"{self.what} {where}: {oserrors.describe(e, path='')}") from e
        raise CheckpointError(f"{self.what} {where}: {summarize(e)}") from e
