"""Chunked, jitted kernels for the element-wise merges (task arithmetic, DARE, DARE-TIES, linear).

A tensor is processed in fixed-size chunks of its flat view (the last chunk zero-padded), so ONE
compilation serves every tensor of every shape, memory stays bounded by a chunk, and randomness comes
from the element's global index (see :mod:`.rng`). mergekit's L1 rescale needs two per-model sums over
the whole tensor; those are a first pass (``l1_sums``) before the apply pass, summed in the fixed order
of :mod:`.reduction`, so the result is the whole-tensor kernels' (:mod:`.task_vectors`) bit for bit.
The arithmetic is theirs too (:func:`.task_vectors.combine`, :mod:`.precision`'s rounding).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.hf.safetensors_io import aligned_empty
from fusion_jax.merging import rng
from fusion_jax.merging.elementwise import linear_body
from fusion_jax.merging.precision import fma_guard, rounder, sparsify_dtype
from fusion_jax.merging.reduction import LANES, ROW, halve_rows, layout, tree_total  # noqa: F401 (LANES: kernels.LANES)
from fusion_jax.merging.task_vectors import combine, l1_ratio

# Elements per chunk: powers of two, so chunks never straddle 2**32 index boundaries. On one device a
# 512K chunk keeps the kernels' inputs and temporaries in cache (measured on 2 cores: 0.5 s less for a
# 4 x 0.5B dare_ties than 4M chunks); on a mesh a 4M chunk gives each device 4M / devices elements and
# is shardable over up to 128 devices.
CHUNK = 1 << 19
CHUNK_MESH = 1 << 22


# The L1 sums come back as partial sums of ROW elements each, LANES partials side by side ([blocks, LANES]),
# in the order of :mod:`.reduction` (each partial a fixed halving tree of element-wise adds), so every
# partial is identical whatever the mesh or chunking; ``l1_totals`` then adds them up in its fixed order.
# How the tree is split into fusions is a measured XLA:CPU choice (2 cores, 4M elements, 3 fine-tunes):
# the first _LEAF_LEVELS levels are computed straight from the inputs (4 leaves per output, each leaf
# converting, subtracting and hashing its own slice), so one loop fusion reads the bf16 inputs once and
# writes a quarter-size f32 array; an optimization barrier then keeps the rest of the tree in a separate
# fusion over that array. Letting XLA fuse the whole tree, or a reduce, into the hashing code runs 3-10x
# slower (the hash is not vectorised inside a reduction loop, and shared converts get materialised);
# 8 leaves is again slower than 4. Result: 7.4 ms for both sums of 3 fine-tunes per 4M elements, out of
# cache (separate single-output reductions, as before: ~22 ms).
_LEAF_LEVELS = 2


def shardable(n: int, num_devices: int) -> bool:
    """Whether a chunk of ``n`` elements splits over ``num_devices`` without splitting a block of partials."""
    blocks, lanes = layout(n)
    return n == blocks * ROW * lanes and blocks % num_devices == 0


def _halve(parts: list):
    """The halving tree over a list: (p0 + p[h]) ... pairs, as ``v[:h] + v[h:]`` on a stacked axis."""
    while len(parts) > 1:
        h = len(parts) // 2
        parts = [parts[k] + parts[k + h] for k in range(h)]
    return parts[0]


@functools.partial(jax.jit, static_argnames=("dtype",))
def l1_sums(base, xs, streams, thresholds, offset, ones, dtype="float32"):
    """mergekit's L1-rescale statistics of one chunk, for each fine-tune i in ``xs``:
    partials of sum|x_i - base| and of sum over kept elements (``rng.bits(..) < thresholds[i]``),
    the deltas in the merge ``dtype``.

    Returns float32 [len(xs), 2, blocks, lanes]; :func:`l1_totals` adds up a tensor's chunks.
    """
    n = base.size
    blocks, lanes = layout(n)
    leaves = 1 << _LEAF_LEVELS
    rows = ROW // leaves
    shape = (blocks, rows, lanes)
    idx = (jax.lax.broadcasted_iota(jnp.uint32, shape, 0) * jnp.uint32(ROW * lanes)
           + jax.lax.broadcasted_iota(jnp.uint32, shape, 1) * jnp.uint32(lanes)
           + jax.lax.broadcasted_iota(jnp.uint32, shape, 2) + jnp.asarray(offset, jnp.uint32))
    with fma_guard(ones):
        R = rounder(dtype)
        b3 = base.reshape(blocks, ROW, lanes)
        out = []
        for i, x in enumerate(xs):
            x3 = x.reshape(blocks, ROW, lanes)
            absd, kept = [], []
            for k in range(leaves):
                sl = slice(k * rows, (k + 1) * rows)
                d = jnp.abs(R(R(x3[:, sl]) - R(b3[:, sl])))
                keep = rng.hash_index(idx + jnp.uint32(k * rows * lanes), streams[i]) < thresholds[i]
                absd.append(d)
                kept.append(jnp.where(keep, d, 0.0))
            top = jax.lax.optimization_barrier(jnp.stack([_halve(absd), _halve(kept)]))
            out.append(halve_rows(top))
        return jnp.stack(out)


def real_partials(parts, n: int) -> np.ndarray:
    """The ``l1_sums`` partials of an ``n``-element tensor's chunks as [inputs, 2, partials], in flat
    order, without the last chunk's padding blocks: the same array whatever the chunk size (one device
    and a mesh chunk a tensor differently, see ``chunk_size``), and :func:`.reduction.block_partials`'s."""
    p = np.stack([np.asarray(c) for c in parts], axis=2)  # [inputs, 2, chunks, blocks, lanes]
    lanes = p.shape[-1]
    return p.reshape(p.shape[0], 2, -1)[:, :, : -(-n // (ROW * lanes)) * lanes]


def l1_totals(parts, n: int) -> np.ndarray:
    """float32 totals [inputs, 2] of :func:`real_partials`, in :func:`.reduction.tree_total`'s order."""
    return np.asarray(tree_total(real_partials(parts, n)))


def l1_scales(totals: np.ndarray, dtype: str) -> np.ndarray:
    """Each input's L1 rescale factor from its totals [inputs, 2], rounded as mergekit rounds it in
    the sparsification dtype (:func:`.task_vectors.l1_ratio`)."""
    W = rounder(sparsify_dtype(dtype))
    return np.asarray(l1_ratio(totals[:, 0], totals[:, 1], W), np.float32)


@functools.partial(jax.jit, static_argnames=("random", "full", "consensus", "normalize", "rescale", "dtype",
                                             "out_dtype"))
def task_vector_chunk(base, xs, streams, thresholds, scales, weights, lam, offset, ones, *, random, full,
                      consensus, normalize, rescale, dtype, out_dtype):
    """One chunk of the task-vector family with random (DARE) or no sparsification.

    ``full[i]`` marks inputs with density >= 1 (no drop). ``scales`` are the rescale factors (L1 ratio
    or 1/density; used when ``rescale`` is "l1" or "inverse"). The same arithmetic as
    :func:`fusion_jax.merging.task_vectors.task_vector_merge`, element for element.
    """
    n = base.size
    with fma_guard(ones):
        R = rounder(dtype)
        W = rounder(sparsify_dtype(dtype))
        b = R(base)
        ds = []
        for i, x in enumerate(xs):
            d = R(R(x) - b)
            if random and not full[i]:
                keep = rng.bits(n, streams[i], offset) < thresholds[i]
                d = jnp.where(keep, d, 0.0)
                if rescale in ("l1", "inverse"):
                    d = W(d * scales[i])
                d = R(d)
            ds.append(d)
        w = [R(weights[i]) for i in range(len(xs))]
        return combine(b, ds, w, lam, consensus=consensus, normalize=normalize, R=R).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("normalize", "dtype", "out_dtype"))
def linear_chunk(xs, weights, ones, *, normalize, dtype, out_dtype):
    return linear_body(xs, weights, ones, normalize=normalize, dtype=dtype).astype(out_dtype)


def chunk_size(n: int, num_devices: int = 1) -> int:
    """Chunk length for a tensor of ``n`` elements: the next power of two (>= 4096), capped at CHUNK
    (CHUNK_MESH on several devices), so small tensors are not padded to a full chunk and only a handful
    of shapes are ever compiled."""
    cap = CHUNK if num_devices == 1 else CHUNK_MESH
    return min(cap, max(4096, 1 << max(0, (n - 1).bit_length())))


def pad_chunk(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` zero-padded to ``size`` elements (zeros add nothing to a sum or a merged delta)."""
    if a.size == size:
        return a
    out = aligned_empty((size,), a.dtype)
    out[:a.size] = a
    out[a.size:] = 0
    return out
