"""Domain-balanced batches: exactly ``per_domain`` examples of every domain in every global batch.

:class:`DomainBalancedSampler` is the data iterator of the UltraFuser stages (and of any method that
mixes domains). It follows the Trainer's data protocol (``fusion_jax.train.loop``): an infinite iterator
of **process-local** numpy batches with O(1) ``get_state()`` / ``set_state()`` for exact resume.

Layout of global batch ``t`` (``B = per_domain * D`` rows, ``D`` domains sorted by name)::

    row i  ->  domain  i % D,  its example number  t * per_domain + i // D   (in that domain's stream)

Rows are interleaved domain by domain, so a process share whose size is a multiple of ``D`` holds the
same number of examples of every domain. A domain's stream walks its examples without replacement: the
k-th draw is ``perm(seed, domain, epoch = k // n)[k % n]``, a permutation seeded by
``(seed, stable_hash(domain name), epoch)``; adding, removing or reordering *other* domains never
changes a domain's stream. Batch ``t`` is therefore a pure function of ``(seed, t)`` and the data; the
iterator's whole state is ``{"step": t}``.

Each process computes (and gathers) only the rows of its share, ``process_batch_slice(B)`` of
:mod:`fusion_jax.sharding`.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from fusion_jax.errors import ConfigError, DataError
from fusion_jax.utils.hashing import stable_hash

DOMAIN_ID = "domain_id"


def epoch_permutation(n: int, seed: int, domain: str, epoch: int) -> np.ndarray:
    """The order in which ``domain``'s ``n`` examples are drawn in ``epoch`` (a pure function)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, stable_hash(domain, digest_size=4), int(epoch)])
    return rng.permutation(n)


class DomainBalancedSampler:
    """Infinite iterator of domain-balanced batches; see the module docstring for the exact layout.

    ``arrays_by_domain``: ``{domain: {array name: np.ndarray}}``; within a domain every array has the same
    leading length (the number of examples); across domains the names, dtypes and trailing shapes agree.
    ``per_domain``: examples of each domain per *global* batch. ``process_index`` / ``process_count``
    default to JAX's (``jax`` is imported only then).

    Each batch is ``{name: array[rows, ...]}`` for this process's rows plus ``"domain_id"`` (int32, the
    index of the row's domain in :attr:`domains`). Attributes: ``domains`` (sorted names),
    ``global_batch_size``, ``local_batch_size``, ``rows`` (this process's slice of the global batch).
    """

    def __init__(self, arrays_by_domain: Mapping[str, Mapping[str, np.ndarray]], per_domain: int, *,
                 seed: int = 0, process_index: int | None = None, process_count: int | None = None):
        if not arrays_by_domain:
            raise DataError("DomainBalancedSampler: no domains given")
        if int(per_domain) < 1:
            raise ConfigError(f"per_domain: must be >= 1, got {per_domain}")
        self.per_domain = int(per_domain)
        self.seed = int(seed)
        # Sorted, so that the layout does not depend on the mapping's order.
        self.domains = tuple(sorted(str(d) for d in arrays_by_domain))
        self._arrays = {d: {k: np.asarray(v) for k, v in arrays_by_domain[d].items()} for d in self.domains}
        self._sizes = {d: self._check_domain(d) for d in self.domains}
        self._check_consistent()
        self.global_batch_size = self.per_domain * len(self.domains)
        if process_index is None or process_count is None:
            import jax  # only when the caller leaves the process layout to JAX
            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        if self.global_batch_size % int(process_count):
            raise ConfigError(
                f"per_domain: {self.per_domain} examples x {len(self.domains)} domains = "
                f"{self.global_batch_size} rows per global batch, not divisible by the {process_count} processes")
        from fusion_jax.sharding import process_batch_slice
        self.rows = process_batch_slice(self.global_batch_size, process_index, process_count)
        self.local_batch_size = self.rows.stop - self.rows.start
        self._step = 0
        self._perm_cache: dict[tuple[str, int], np.ndarray] = {}

    # ------------------------------------------------------------------------------------- checks ----
    def _check_domain(self, d: str) -> int:
        arrs = self._arrays[d]
        if not arrs:
            raise DataError(f"domain {d!r}: no arrays")
        if DOMAIN_ID in arrs:
            raise DataError(f"domain {d!r}: array name {DOMAIN_ID!r} is reserved (the sampler adds it)")
        lengths = {k: (v.shape[0] if v.ndim else None) for k, v in arrs.items()}
        first = next(iter(lengths))
        for k, n in lengths.items():
            if n is None:
                raise DataError(f"domain {d!r}: array {k!r} is a scalar; every array needs a leading "
                                "example axis")
            if n != lengths[first]:
                raise DataError(f"domain {d!r}: array {k!r} has {n} rows but {first!r} has "
                                f"{lengths[first]} (arrays of one domain share the leading length)")
        if lengths[first] == 0:
            raise DataError(f"domain {d!r}: no examples")
        return int(lengths[first])

    def _check_consistent(self) -> None:
        ref_d = self.domains[0]
        ref = self._arrays[ref_d]
        for d in self.domains[1:]:
            arrs = self._arrays[d]
            if set(arrs) != set(ref):
                raise DataError(f"domain {d!r}: arrays {sorted(arrs)} differ from domain {ref_d!r}'s "
                                f"{sorted(ref)}")
            for k, v in arrs.items():
                if v.shape[1:] != ref[k].shape[1:] or v.dtype != ref[k].dtype:
                    raise DataError(f"domain {d!r}: array {k!r} is {v.dtype}{list(v.shape[1:])} per example "
                                    f"but {ref[k].dtype}{list(ref[k].shape[1:])} in domain {ref_d!r}")

    # ----------------------------------------------------------------------------------- sampling ----
    @property
    def num_examples(self) -> dict[str, int]:
        """``{domain: number of examples}``."""
        return dict(self._sizes)

    def _perm(self, d: str, epoch: int) -> np.ndarray:
        key = (d, epoch)
        p = self._perm_cache.get(key)
        if p is None:
            # A batch touches at most a few epochs of a domain; older ones are never needed again
            # when iterating forward, so keep the cache small.
            if len(self._perm_cache) >= 4 * len(self.domains):
                self._perm_cache.clear()
            p = self._perm_cache[key] = epoch_permutation(self._sizes[d], self.seed, d, epoch)
        return p

    def indices(self, step: int, domain: str, draws: np.ndarray) -> np.ndarray:
        """Example indices of ``domain`` for its draw numbers ``draws`` within batch ``step``."""
        n = self._sizes[domain]
        k = int(step) * self.per_domain + np.asarray(draws, np.int64)
        epochs, pos = np.divmod(k, n)
        out = np.empty(k.shape, np.int64)
        for e in np.unique(epochs):
            sel = epochs == e
            out[sel] = self._perm(domain, int(e))[pos[sel]]
        return out

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of global batch ``step`` (a pure function of seed, step and the data)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        D = len(self.domains)
        rows = np.arange(self.rows.start, self.rows.stop)
        dom, draw = rows % D, rows // D
        out: dict[str, np.ndarray] = {}
        for j, d in enumerate(self.domains):
            sel = np.nonzero(dom == j)[0]
            if not len(sel):
                continue
            idx = self.indices(step, d, draw[sel])
            for name, arr in self._arrays[d].items():
                if name not in out:
                    out[name] = np.empty((len(rows),) + arr.shape[1:], arr.dtype)
                out[name][sel] = arr[idx]
        out[DOMAIN_ID] = dom.astype(np.int32)
        return out

    # ---------------------------------------------------------------- iterator + Trainer protocol ----
    def __iter__(self) -> "DomainBalancedSampler":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        b = self.batch(self._step)
        self._step += 1
        return b

    # ``{"step": t}`` is the global batch index, the same on every process (each turns it into its own
    # rows), so a checkpoint can be resumed on any number of processes (see ``train.loop``)
    state_is_global = True

    def get_state(self) -> dict[str, Any]:
        """``{"step": t}``: the next batch to be returned is batch ``t``."""
        return {"step": self._step}

    def set_state(self, state: Mapping[str, Any]) -> None:
        try:
            step = int(state["step"])
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"DomainBalancedSampler.set_state: expected {{'step': int}}, got {state!r}") from e
        if step < 0:
            raise DataError(f"DomainBalancedSampler.set_state: step must be >= 0, got {step}")
        self._step = step
