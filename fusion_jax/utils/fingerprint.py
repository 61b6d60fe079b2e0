"""A 32-bit fingerprint of an array's exact bits, computed where the array lives (device, sharded).

Orbax stores arrays zstd-compressed with no checksum: a flipped byte in a data file can decompress
into other numbers without any error (the hardening suite finds exactly that). Checkpoints therefore
record each array's fingerprint when saved and compare it after restoring.

The fingerprint is ``sum_i bits_i * w_i mod 2**32`` over the array's elements viewed as unsigned
integers, with an odd pseudo-random weight ``w_i`` per flat position: any single changed element
changes it (an odd weight is invertible mod 2**32), and several changes cancel with probability about
2**-32. It is one fused reduction per array, so it runs on the accelerator at memory speed, on a
sharded array without gathering it (the positions come from an iota per axis, not a reshape), and
gives the same number whatever the sharding or the number of processes: a checkpoint written on one
layout is checked when restored on another.
"""
from __future__ import annotations

from typing import Any

_W1, _W2 = 0x9E3779B1, 0x85EBCA77  # golden-ratio and murmur3 constants: well-mixed odd multipliers


def _one(x):
    import jax.numpy as jnp
    from jax import lax
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = x.dtype.itemsize * 8
    if width == 64:  # -> [..., 2] uint32 words
        bits = lax.bitcast_convert_type(x, jnp.uint32)
    else:
        bits = lax.bitcast_convert_type(x, getattr(jnp, f"uint{width}")).astype(jnp.uint32)
    if bits.ndim == 0:
        return bits * jnp.uint32(_W1 | 1)
    lin = jnp.zeros((), jnp.uint32)
    for axis, n in enumerate(bits.shape):  # the flat position, built without reshaping (stays sharded)
        lin = lin * jnp.uint32(n) + lax.broadcasted_iota(jnp.uint32, bits.shape, axis)
    w = (lin * jnp.uint32(_W1)) ^ ((lin >> 15) * jnp.uint32(_W2))
    return jnp.sum(bits * (w | jnp.uint32(1)), dtype=jnp.uint32)


_JITTED = []


def fingerprints(tree: Any) -> Any:
    """The same tree with each array replaced by its fingerprint (a Python int)."""
    import jax
    if not _JITTED:
        _JITTED.append(jax.jit(lambda t: jax.tree.map(_one, t)))
    return jax.tree.map(int, jax.device_get(_JITTED[0](tree)))


def flat_fingerprints(tree: Any) -> dict[str, str]:
    """``{"a/b/c": "1a2b3c4d"}`` for every leaf of a nested dict (keys joined with "/"), as hex."""
    import jax
    fps = fingerprints(tree)
    out = {}
    for path, v in jax.tree_util.tree_leaves_with_path(fps):
        key = "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)
        out[key] = f"{v:08x}"
    return out


def check_fingerprints(tree: Any, expected: dict[str, str], where: str, source: str) -> None:
    """CheckpointError naming ``where`` unless every leaf of ``tree`` listed in ``expected`` (read from
    ``source``) has that fingerprint."""
    from fusion_jax.errors import CheckpointError
    got = flat_fingerprints(tree)
    bad = sorted(k for k in expected if got.get(k) != expected[k])
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise CheckpointError(f"{where}: {bad[0]!r}{more} does not match the fingerprint recorded in {source}: "
                              "the checkpoint's data files are damaged")
