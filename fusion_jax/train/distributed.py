"""Multi-process setup (``jax.distributed``) and assembling global batches from process-local data.

Configuration (first found wins): explicit arguments / a config with ``coordinator_address``,
``num_processes``, ``process_id`` (``local_device_ids`` optional); else the environment variables
``FUSION_COORDINATOR_ADDRESS``, ``FUSION_NUM_PROCESSES``, ``FUSION_PROCESS_ID``; else nothing (single
process). ``coordinator_address="auto"`` (or ``auto=True``) leaves everything to JAX's own cluster
detection (``jax.distributed.initialize()`` with no arguments: Cloud TPU pods, SLURM, Open MPI, ...).

Data: each process loads only its share (``sharding.process_batch_slice``): process ``p`` of ``n`` yields a
local batch of ``B / n`` rows; :func:`global_batch` assembles the global ``[B, ...]`` array with
``jax.make_array_from_process_local_data`` (rows of process p are rows ``p*B/n .. (p+1)*B/n`` on a mesh
built by ``sharding.make_mesh``).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from fusion_jax.errors import ConfigError

_initialized = False


def _get(cfg: Any, name: str):
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(name)
    return getattr(cfg, name, None)


def initialize(config: Any = None, *, auto: bool = False) -> bool:
    """Call ``jax.distributed.initialize`` once if a multi-process setup is configured.

    Returns True when running multi-process. On CPU, cross-process collectives use gloo.
    """
    global _initialized
    if _initialized:
        return jax.process_count() > 1
    addr = _get(config, "coordinator_address") or os.environ.get("FUSION_COORDINATOR_ADDRESS")
    nproc = _get(config, "num_processes") or os.environ.get("FUSION_NUM_PROCESSES")
    pid = _get(config, "process_id")
    if pid is None:
        pid = os.environ.get("FUSION_PROCESS_ID")
    local_ids = _get(config, "local_device_ids")
    if str(addr or "").strip().lower() == "auto":
        addr, auto = None, True
    if not addr and not auto:
        return False
    if addr:
        if nproc is None or pid is None:
            raise ConfigError("distributed.coordinator_address is set but distributed.num_processes / "
                              "distributed.process_id are not (nor FUSION_NUM_PROCESSES / FUSION_PROCESS_ID)")
        nproc, pid = int(nproc), int(pid)
        if not 0 <= pid < nproc:
            raise ConfigError(f"distributed.process_id: {pid} is not in [0, {nproc})")
    try:  # CPU collectives across processes (the default in recent JAX, explicit for older ones)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except Exception:  # noqa: BLE001
        pass
    kw = {}
    if local_ids is not None:
        kw["local_device_ids"] = list(local_ids)
    if addr:
        jax.distributed.initialize(coordinator_address=str(addr), num_processes=nproc, process_id=pid, **kw)
    else:
        jax.distributed.initialize(**kw)
    _initialized = True
    return jax.process_count() > 1


def global_batch(local_batch: Any, shardings: Any) -> Any:
    """Process-local numpy batch (pytree) -> global jax.Arrays with the given NamedShardings."""
    if jax.process_count() == 1:
        return jax.device_put(local_batch, shardings)
    # global_shape: without it a dim that the sharding does not split across processes (a batch that
    # fell back to replication) would be taken to be this process's rows alone, and hosts would hold
    # different data in a "replicated" array.
    n = jax.process_count()
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(
        s, np.asarray(x), (np.shape(x)[0] * n,) + np.shape(x)[1:]), local_batch, shardings)
