"""Fixed-order float32 sums, so a tensor's sum is the same bits however it is chunked or sharded.

mergekit's L1 rescale divides two whole-tensor sums; the ratio is then rounded to the working dtype,
so one bit of difference in a sum can change every element of the merged tensor. XLA's own reduce
picks its association order from the local shape (measured: [16, 256] and [2, 256] rows sum
differently), so a sum on 1 device, on a mesh, in chunks (the file executor) and whole (the pytree
path) would disagree. Here the order is fixed by the tensor's size alone:

    blocks of ROW x lanes consecutive elements (flat order, zero padded), each reduced over its ROW
    rows by a halving tree (v[:h] + v[h:]) to ``lanes`` partials;
    all partials of the tensor, in order, zero padded to a power of two, reduced by the same tree.

Adding a zero is exact, so padding never changes a value; every step is one IEEE float32 add in a
fixed order. ``lanes`` depends only on the size (see :func:`lanes_for`), never on the chunking.
"""
from __future__ import annotations

import jax.numpy as jnp

ROW = 256
LANES = 128
MIN_CHUNK = 4096


def layout(n: int) -> tuple[int, int]:
    """(blocks, lanes) of a chunk of ``n`` elements (a power of two >= ROW): partials are [blocks, lanes]."""
    lanes = min(LANES, n // ROW)
    return n // (ROW * lanes), lanes


def lanes_for(numel: int) -> int:
    """The lanes of every chunk of a tensor of ``numel`` elements: 128, or fewer for a tensor smaller
    than 32768 elements (whose single chunk is the next power of two >= 4096)."""
    small = max(MIN_CHUNK, 1 << max(0, (numel - 1).bit_length()))
    return layout(min(small, ROW * LANES))[1]


def halve_rows(v):
    """Halving tree over axis -2 of [..., R, lanes] -> [..., lanes] (R a power of two)."""
    while v.shape[-2] > 1:
        h = v.shape[-2] // 2
        v = v[..., :h, :] + v[..., h:, :]
    return v[..., 0, :]


def block_partials(v):
    """The partials of a whole flat float32 tensor: [ceil(n / (ROW * lanes)) * lanes]."""
    v = jnp.asarray(v, jnp.float32).reshape(-1)
    n = v.size
    lanes = lanes_for(n)
    per = ROW * lanes
    blocks = -(-n // per)
    if blocks * per != n:
        v = jnp.concatenate([v, jnp.zeros(blocks * per - n, jnp.float32)])
    return halve_rows(v.reshape(blocks, ROW, lanes)).reshape(-1)


def tree_total(partials):
    """Sum of a tensor's partials ([..., P]): zero padded to a power of two, then the halving tree."""
    p = jnp.asarray(partials, jnp.float32)
    size = p.shape[-1]
    full = 1 << max(0, (size - 1).bit_length())
    if full != size:
        p = jnp.concatenate([p, jnp.zeros(p.shape[:-1] + (full - size,), jnp.float32)], axis=-1)
    while p.shape[-1] > 1:
        h = p.shape[-1] // 2
        p = p[..., :h] + p[..., h:]
    return p[..., 0]


def fixed_sum(v):
    """The fixed-order float32 sum of a whole tensor (:func:`block_partials` then :func:`tree_total`)."""
    return tree_total(block_partials(v))


def row_sum(v, keepdims: bool = False):
    """Fixed-order float32 sum over the last axis (halving tree over the axis, zero padded to a
    power of two): the same bits eager or jitted, whole or in a bigger fusion."""
    v = jnp.asarray(v, jnp.float32)
    out = tree_total(v)
    return out[..., None] if keepdims else out
