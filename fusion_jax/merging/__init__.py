"""Weight merging over flat ``{hf_tensor_name: array}`` maps, one tensor at a time.

- :mod:`.methods`: the method table (parameters with valid ranges, contracts, mergekit names) and
  :func:`merge_group`; kernels in :mod:`.task_vectors` (the task-vector family as one parameterised
  function), :mod:`.geometry` (slerp, nuslerp, multislerp, karcher, model_stock) and
  :mod:`.elementwise` (linear, nearswap, RAM, Arcee Fusion, SCE, VaRM, passthrough).
- :mod:`.precision`: each step in the merge dtype, as mergekit's torch arithmetic (or float32);
  :mod:`.select` (order statistics with one tie rule), :mod:`.reduction` (fixed-order sums).
- :mod:`.vocab`: output vocabularies (``tokenizer_source`` / ``tokenizer:``) and chat templates.
- :mod:`.multi`: multi-document (mergekit-multi) configs.
- :mod:`.pytree`: :func:`merge_pytrees` / :func:`merge_causal_lm`, the same kernels over in-memory pytrees.
- :mod:`.config`: mergekit-compatible YAML, validated strictly.
- :mod:`.executor`: streaming out-of-core executor writing a Hugging Face model directory atomically.
- :mod:`.rng`: order/thread/device-independent per-tensor randomness.
"""
from fusion_jax.merging.config import MergeConfig, load_config
from fusion_jax.merging.executor import execute, merge, plan_merge
from fusion_jax.merging.elementwise import arcee_fusion, linear, nearswap, ram, ramplus_tl, sce, varm
from fusion_jax.merging.geometry import karcher, model_stock, multislerp, nuslerp, slerp
from fusion_jax.merging.methods import METHODS, merge_group
from fusion_jax.merging.pytree import merge_causal_lm, merge_pytrees, path_name
from fusion_jax.merging.task_vectors import sparsify, task_vector_merge
from fusion_jax.merging.rng import stable_hash, tensor_stream

__all__ = ["METHODS", "MergeConfig", "arcee_fusion", "execute", "karcher", "linear", "load_config", "merge",
           "merge_causal_lm", "merge_group", "merge_pytrees", "merge_tensors", "model_stock", "multislerp",
           "nearswap", "nuslerp", "path_name", "plan_merge", "ram", "ramplus_tl", "sce", "slerp", "sparsify",
           "stable_hash", "task_vector_merge", "tensor_stream", "varm"]


def merge_tensors(method: str, models: list[dict], *, base_index: int | None = None, shared=None,
                  per_input=None, seed: int = 0) -> dict:
    """Merge in-memory flat maps ``[{name: array}, ...]`` (same names and shapes) with ``method``,
    computing in float32 (for mergekit's per-step dtypes, shardings and parameter lists use
    :func:`merge_pytrees`).

    ``shared``/``per_input`` are already-resolved parameters (defaults filled in from the method).
    Returns ``{name: float32 numpy array}``.
    """
    import numpy as np

    from fusion_jax.merging.methods import REQUIRED
    spec = METHODS[method]
    shared = dict(shared or {})
    for p in spec.params:
        if p.scope == "shared" and p.name not in shared:
            if p.default is REQUIRED:
                raise ValueError(f"{method}: missing shared parameter {p.name!r}")
            shared[p.name] = p.default
    per_input = [dict(d) for d in (per_input or [{} for _ in models])]
    for i, d in enumerate(per_input):
        for p in spec.params:
            if (p.scope == "input" or (p.scope == "non_base" and i != base_index)) and p.name not in d:
                if p.default is REQUIRED:
                    raise ValueError(f"{method}: missing parameter {p.name!r} for input {i}")
                d[p.name] = p.default
    out = {}
    for name in models[0]:
        nb = len(models) - (base_index is not None)
        streams = [tensor_stream(seed, name, j) for j in range(nb)]
        out[name] = np.asarray(merge_group(spec, [m[name] for m in models], base_index, shared, per_input,
                                           streams))
    return out
