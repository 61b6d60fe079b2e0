"""Chunked, jitted kernels for the element-wise merges (task arithmetic, DARE, DARE-TIES, linear).

A tensor is processed in fixed-size chunks of its flat view (the last chunk zero-padded), so ONE
compilation serves every tensor of every shape, memory stays bounded by a chunk, and randomness comes
from the element's global index (see :mod:`.rng`). mergekit's L1 rescale needs two per-model sums over
the whole tensor; those are a first pass of separate single-output reductions (XLA:CPU runs a lone
fused reduction ~20x faster than a multi-output one, measured).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.merging import rng

CHUNK = 1 << 22  # elements per chunk; a power of two so chunks never straddle 2**32 boundaries


def _f32(x, in_dtype):
    if in_dtype is not None and x.dtype != jnp.dtype(in_dtype):
        x = x.astype(in_dtype)
    return x.astype(jnp.float32)


# The L1 sums are returned as one partial sum per row of ROW elements, and the host adds the partials in
# float64. A whole-chunk ``.sum()`` would be reduced in a different order on 1 and on 8 devices (local sums,
# then an all-reduce) and change the merged bytes; a row never straddles devices (see ``shardable_rows``)
# and is summed by ``_row_sums`` in a fixed order, so each partial is identical whatever the mesh.
ROW = 256


def shardable_rows(n: int, num_devices: int) -> bool:
    """Whether a chunk of ``n`` elements can be split over ``num_devices`` without splitting a ROW."""
    return n % ROW == 0 and (n // ROW) % num_devices == 0


def _row_sums(v):
    """Per-ROW sums by a fixed pairwise tree of element-wise adds. XLA's own reduce picks its
    association order from the local shape (measured: [16, 256] and [2, 256] rows sum differently), so it
    would differ between meshes; element-wise adds are exact IEEE operations in a fixed order."""
    v = v.reshape(-1, ROW)
    while v.shape[1] > 1:
        h = v.shape[1] // 2
        v = v[:, :h] + v[:, h:]
    return v[:, 0]


@functools.partial(jax.jit, static_argnames=("in_dtype",))
def abs_delta_sum(base, x, in_dtype=None):
    return _row_sums(jnp.abs(_f32(x, in_dtype) - _f32(base, in_dtype)))


@functools.partial(jax.jit, static_argnames=("in_dtype",))
def kept_abs_delta_sum(base, x, stream, thresh, offset, in_dtype=None):
    keep = rng.bits(base.size, stream, offset) < thresh
    return _row_sums(jnp.where(keep, jnp.abs(_f32(x, in_dtype) - _f32(base, in_dtype)), 0.0))


def host_sum(partials) -> float:
    """Deterministic float64 total of the per-row partial sums."""
    return float(np.asarray(partials, np.float64).sum())


@functools.partial(jax.jit, static_argnames=("random", "full", "consensus", "normalize", "in_dtype",
                                             "out_dtype"))
def task_vector_chunk(base, xs, streams, thresholds, scales, weights, lam, offset, *, random, full,
                      consensus, normalize, in_dtype, out_dtype):
    """One chunk of the task-vector family with random (DARE) or no sparsification.

    ``full[i]`` marks inputs with density >= 1 (no drop). ``scales`` are the rescale factors (L1 ratio,
    1/density, or 1). Mirrors :func:`fusion_jax.merging.methods.task_vector_merge`.
    """
    b = _f32(base, in_dtype)
    n = b.size
    ds = []
    for i, x in enumerate(xs):
        d = _f32(x, in_dtype) - b
        if random and not full[i]:
            keep = rng.bits(n, streams[i], offset) < thresholds[i]
            d = jnp.where(keep, d * scales[i], 0.0)
        ds.append(d * weights[i])
    if consensus:
        if consensus == "sum":
            maj = jnp.where(sum(ds) >= 0, 1.0, -1.0)
        else:
            maj = jnp.where(sum(jnp.sign(d) for d in ds) >= 0, 1.0, -1.0)
        agree = [jnp.sign(d) == maj for d in ds]
        mixed = sum(jnp.where(a, d, 0.0) for a, d in zip(agree, ds))
        if normalize:
            div = sum(jnp.where(a, weights[i], 0.0) for i, a in enumerate(agree))
            mixed = mixed / jnp.where(div == 0, 1.0, div)
    else:
        mixed = sum(ds)
        if normalize:
            div = sum(weights[i] for i in range(len(ds)))
            mixed = mixed / jnp.where(jnp.abs(div) < 1e-8, 1.0, div)
    return (b + mixed * lam).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("normalize", "in_dtype", "out_dtype"))
def linear_chunk(xs, weights, *, normalize, in_dtype, out_dtype):
    acc = sum(_f32(x, in_dtype) * weights[i] for i, x in enumerate(xs))
    if normalize:
        acc = acc / sum(weights[i] for i in range(len(xs)))
    return acc.astype(out_dtype)


def chunk_size(n: int) -> int:
    """Chunk length for a tensor of ``n`` elements: the next power of two (>= 4096), capped at CHUNK,
    so small tensors are not padded to a full chunk and only a handful of shapes are ever compiled."""
    return min(CHUNK, max(4096, 1 << max(0, (n - 1).bit_length())))


def pad_chunk(a: np.ndarray, size: int = CHUNK) -> np.ndarray:
    if a.size == size:
        return a
    out = np.zeros(size, a.dtype)
    out[:a.size] = a
    return out
