"""Order-, thread- and device-independent randomness for merging.

Every random draw of a merge is a pure function of ``(seed, tensor name, model index, element index)``:

    stream = fold_in(fold_in(seed, stable_hash(tensor_name)), model_index)      # 32-bit
    u[i]   = lowbias32(i * 0x9E3779B9 + stream)                                # 32 random bits / element
    keep   = u < floor(density * 2**32)                                         # P(keep) = density +- 2**-32

``stable_hash`` is BLAKE2b (never Python's salted ``hash``), and ``u`` depends only on the element's
flat index, so a tensor merged whole, in chunks, in any order, on any number of threads or devices
(each shard computes its own indices) gets the same mask, bit for bit. One 32-bit integer hash per
element replaces a Bernoulli float draw: it fuses into the merge kernel and costs no memory traffic.
The same hash is written for NumPy (``keep_mask_np``) and JAX (``keep_mask``); tests check they agree.
"""
from __future__ import annotations

import numpy as np

from fusion_jax.utils.hashing import stable_hash as _stable_hash

_GOLDEN = 0x9E3779B9
_M1 = 0x7FEB352D
_M2 = 0x846CA68B
MASK32 = 0xFFFFFFFF


def stable_hash(name: str) -> int:
    """A 32-bit hash of a tensor name that is the same in every process (BLAKE2b, not ``hash``)."""
    return _stable_hash(name, digest_size=4)


def _mix32(x: int) -> int:
    x &= MASK32
    x ^= x >> 16
    x = (x * _M1) & MASK32
    x ^= x >> 15
    x = (x * _M2) & MASK32
    x ^= x >> 16
    return x


def fold_in(key: int, data: int) -> int:
    """Derive a new 32-bit stream key from ``key`` and an integer (like ``jax.random.fold_in``)."""
    return _mix32(_mix32((int(key) & MASK32) ^ 0x5BD1E995) + (int(data) & MASK32) * _GOLDEN)


def tensor_stream(seed: int, tensor_name: str, model_index: int) -> int:
    """The 32-bit stream key for one input model's draws on one tensor."""
    seed = int(seed)
    key = fold_in(seed & MASK32, seed >> 32)
    return fold_in(fold_in(key, stable_hash(tensor_name)), model_index)


def threshold(prob: float) -> int:
    """uint32 threshold t with P(u < t) = prob for uniform 32-bit u (clamped to [0, 2**32-1])."""
    return int(min(max(prob, 0.0), 1.0) * 4294967296.0) if prob < 1.0 else MASK32


# -- NumPy ----------------------------------------------------------------------------------------

def bits_np(n: int, stream: int, offset: int = 0) -> np.ndarray:
    """32 random bits for elements ``offset .. offset+n`` of a flat tensor (uint32)."""
    with np.errstate(over="ignore"):
        x = np.arange(offset, offset + n, dtype=np.uint64).astype(np.uint32)
        x = x * np.uint32(_GOLDEN) + np.uint32(stream)
        x ^= x >> np.uint32(16)
        x *= np.uint32(_M1)
        x ^= x >> np.uint32(15)
        x *= np.uint32(_M2)
        x ^= x >> np.uint32(16)
    return x


def keep_mask_np(shape, density: float, stream: int, offset: int = 0) -> np.ndarray:
    n = int(np.prod(shape))
    return (bits_np(n, stream, offset) < np.uint32(threshold(density))).reshape(shape)


# -- JAX ------------------------------------------------------------------------------------------

def hash_index(index, stream):
    """32 random bits for each uint32 flat element index of a tensor's stream (the JAX side of
    :func:`bits_np`); ``stream`` may be a traced uint32 scalar."""
    import jax.numpy as jnp

    x = index * jnp.uint32(_GOLDEN) + jnp.asarray(stream, jnp.uint32)
    x = x ^ (x >> 16)
    x = x * jnp.uint32(_M1)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(_M2)
    x = x ^ (x >> 16)
    return x


def bits(n: int, stream, offset=0):
    """JAX version of :func:`bits_np` (``stream`` and ``offset`` may be traced uint32 scalars)."""
    import jax.numpy as jnp

    return hash_index(jnp.arange(n, dtype=jnp.uint32) + jnp.asarray(offset, jnp.uint32), stream)


def flat_index(shape, offset=0):
    """uint32 flat (row-major) index of every element of an array of ``shape``, plus ``offset``, built
    from per-axis iotas: no flat temporary to reshape, so a sharded array's indices stay sharded."""
    import jax
    import jax.numpy as jnp

    shape = tuple(shape)
    idx = jnp.asarray(offset, jnp.uint32)
    stride = 1
    for axis in range(len(shape) - 1, -1, -1):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride & MASK32)
        stride *= shape[axis]
    return jnp.broadcast_to(idx, shape)


def bits_nd(shape, stream, offset=0):
    """:func:`bits` laid out in ``shape`` (the element at flat index i gets bits[i])."""
    return hash_index(flat_index(shape, offset), stream)


def keep_mask(shape, thresh, stream, offset=0):
    """Boolean keep mask of ``shape``; ``thresh`` is a uint32 threshold (see :func:`threshold`)."""
    import math

    import jax.numpy as jnp

    n = math.prod(shape)
    return (bits(n, stream, offset) < jnp.asarray(thresh, jnp.uint32)).reshape(shape)
