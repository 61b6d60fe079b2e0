"""Orbax checkpoints of the train state and the data iterator position, with automatic resume.

Layout (one Orbax ``CheckpointManager`` directory; step folders appear only once complete)::

    <workdir>/checkpoints/<step>/
        state/     Orbax PyTree: {step, params (trainable, flat), opt_state, rng}
        frozen/    Orbax PyTree: frozen params (flat); only with save_frozen=True
        data/      process_<i>-of-<n>.json: each process's data-iterator state (like grain's handler)
        meta/      JSON: {step, trainable paths, frozen paths, process_count, ...}

Only Orbax writes checkpoint files (every process takes part, as Orbax requires on multi-host). Restores
go straight into the target shardings (abstract ShapeDtypeStructs carry them).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from fusion_jax.errors import CheckpointError


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
        if not f.exists():
            found = sorted(p.name for p in epath.Path(directory).iterdir())
            raise CheckpointError(f"{f}: no data-iterator state for this process (found {found}); "
                                  "was the checkpoint written with a different number of processes?")
        payload = json.loads(f.read_text())
        return payload["state"].encode() if payload["kind"] == "bytes" else payload["state"]

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
    pass


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
        self.directory = os.path.abspath(os.fspath(directory))
        self.save_every = int(save_every)
        self.save_frozen = save_frozen
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, save_interval_steps=1, enable_async_checkpointing=async_save,
            create=True, cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def should_save(self, step: int, last_step: int) -> bool:
        return step == last_step or (self.save_every > 0 and step % self.save_every == 0)

    def save(self, step: int, state: Any, data_state: Any = None, meta: dict | None = None) -> None:
        items = {
            "state": ocp.args.StandardSave({"step": state.step, "params": state.params,
                                            "opt_state": state.opt_state, "rng": state.rng}),
            "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step))),
        }
        if self.save_frozen and state.frozen:
            items["frozen"] = ocp.args.StandardSave(state.frozen)
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        self.manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore(self, step: int, target_state: Any, target_shardings: Any = None) -> tuple[Any, Any, dict]:
        """Restore ``step`` into the structure/shardings of ``target_state`` (a TrainState).

        Returns ``(state, data_state or None, meta)``. Frozen params come from the checkpoint when it has
        them, else from ``target_state`` unchanged.
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
        items = {"state": ocp.args.StandardRestore(abstract), "meta": ocp.args.JsonRestore()}
        if "frozen" in present and target_state.frozen:
            items["frozen"] = ocp.args.StandardRestore(
                abstract_like(target_state.frozen, None if sh is None else sh.frozen))
        if "data" in present:
            items["data"] = DataStateRestore()
        try:
            r = self.manager.restore(int(step), args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{step_dir}: cannot restore into the current train state "
                                  f"(different model, trainable set or optimizer?): {e}") from e
        s = r["state"]
        frozen = r["frozen"] if "frozen" in items else target_state.frozen
        state = target_state.replace(step=s["step"], params=s["params"], opt_state=s["opt_state"],
                                     rng=s["rng"], frozen=frozen)
        return state, (r["data"] if "data" in items else None), dict(r["meta"] or {})

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
