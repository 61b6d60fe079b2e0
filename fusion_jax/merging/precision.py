"""The dtype each step of a merge is computed in, and rounding to it.

mergekit (torch) casts every input of a tensor group to the merge dtype (``dtype:``, else the inputs'
promoted dtype) and does each step in that dtype: on the CPU a 16-bit op computes in float32 and rounds
its result once to 16 bits, and a 16-bit reduction accumulates in float32 and rounds once. To give
mergekit's numbers, the kernels here compute in float32 and call :func:`rounder` after every step that
torch rounds; with ``compute_dtype: float32`` the rounder is the identity and only the result is cast.

In float32 there is nothing to round, but XLA:CPU contracts a multiply feeding an add into one fused
multiply-add (measured: ``b + m * 0.9`` under ``jit`` equals the float64 result rounded once, not
torch's two roundings), which no XLA flag turns off per computation. Inside :func:`fma_guard` the
float32 "rounder" ANDs the bits with an all-ones mask that is a runtime argument of the jitted
function: LLVM cannot see through it, so each rounding point stays a rounding point. Eager code needs
no guard (each op is its own computation).

Rounding must survive the compiler: XLA:CPU hands float16 to LLVM, which keeps float16 arithmetic in
float32 on x86 and folds ``f32 -> f16 -> f32`` chains away (measured: ``x.astype(f16).astype(f32)``
inside a fused expression does not round). ``lax.reduce_precision`` is integer bit arithmetic that no
pass removes; it flushes float16 subnormals, so values below 2**-14 are rounded on the 2**-24 grid
explicitly (deltas of fine-tunes often are that small).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

#: dtype names a merge may run in, as mergekit spells them (plus the aliases its configs use)
DTYPES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16", "float64": "float64"}
NP_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16),
             "bfloat16": np.dtype(ml_dtypes.bfloat16), "float64": np.dtype(np.float64)}
#: ``compute_dtype`` values: "auto" = mergekit's rule (each step in the merge dtype), "float32" = the
#: more exact merge (every step in float32, one rounding at the end)
COMPUTE_DTYPES = ("auto", "float32")

_F16_MIN_NORMAL = 2.0 ** -14
_F16_SUBNORMAL_STEP = 2.0 ** -24


def _round_f16(x):
    x = jnp.asarray(x, jnp.float32)
    normal = jax.lax.reduce_precision(x, exponent_bits=5, mantissa_bits=10)
    sub = jnp.round(x * (1.0 / _F16_SUBNORMAL_STEP)) * _F16_SUBNORMAL_STEP  # exact scalings; round half even
    return jnp.where(jnp.abs(x) < _F16_MIN_NORMAL, sub, normal)


def _round_bf16(x):
    return jax.lax.reduce_precision(jnp.asarray(x, jnp.float32), exponent_bits=8, mantissa_bits=7)


_GUARD = threading.local()


@contextlib.contextmanager
def fma_guard(ones):
    """While tracing a jitted function, make float32 rounding points opaque to FMA contraction.
    ``ones`` must be a traced uint32 scalar equal to 0xFFFFFFFF (an argument of the function)."""
    prev = getattr(_GUARD, "ones", None)
    _GUARD.ones = ones
    try:
        yield
    finally:
        _GUARD.ones = prev


def guard_ones():
    """The value to pass as :func:`fma_guard`'s runtime argument: the active guard's (a tracer of the
    enclosing jitted function, when called while tracing one), else a fresh all-ones uint32."""
    ones = getattr(_GUARD, "ones", None)
    return ones if ones is not None else np.uint32(0xFFFFFFFF)


def barrier(x):
    """``x`` (float32) made opaque to FMA contraction inside :func:`fma_guard` (identity outside)."""
    x = jnp.asarray(x, jnp.float32)
    ones = getattr(_GUARD, "ones", None)
    if ones is None:
        return x
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, jnp.uint32) & ones, jnp.float32)


_identity = barrier


def dtype_name(dtype) -> str:
    """Canonical name ("float32", "bfloat16", ...) of a dtype given by name, alias or NumPy dtype."""
    if dtype is None:
        return "float32"
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    return DTYPES.get(name, name)


def rounder(dtype) -> Callable:
    """float32 -> float32 function rounding to ``dtype`` (a name or NumPy dtype; None = float32).
    float64 merges compute in float32 (JAX runs without x64 here), so they round nowhere."""
    name = dtype_name(dtype)
    if name == "float16":
        return _round_f16
    if name == "bfloat16":
        return _round_bf16
    if name in ("float32", "float64"):
        return _identity
    raise ValueError(f"no rounding rule for dtype {dtype!r}")


def promote(dtypes) -> np.dtype:
    """torch.promote_types over ``dtypes`` (mergekit's merge dtype when the config names none):
    equal dtypes stay, float16 with bfloat16 gives float32, anything with float32 gives float32."""
    out = np.dtype(dtypes[0])
    for d in dtypes[1:]:
        d = np.dtype(d)
        if d == out:
            continue
        if {d, out} == {NP_DTYPES["float16"], NP_DTYPES["bfloat16"]}:
            out = np.dtype(np.float32)
        elif ml_dtypes.bfloat16 in (d, out):
            other = out if d == NP_DTYPES["bfloat16"] else d
            out = np.promote_types(other, np.float32) if other.itemsize >= 4 else np.dtype(np.float32)
        else:
            out = np.promote_types(out, d)
    return out


def sparsify_dtype(dtype: str) -> str:
    """The dtype mergekit's random and DELLA sparsification run in on the CPU: bfloat16 stays,
    float16 and float32 use float32 (torch has no float16 Bernoulli on the CPU)."""
    return "bfloat16" if dtype == "bfloat16" else "float32"
