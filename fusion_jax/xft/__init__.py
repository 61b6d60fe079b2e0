"""XFT (ise-uiuc/xft): upcycle a dense model into a shared-expert MoE, fine-tune it, merge it back.

Pure pieces (this package): :func:`upcycle` (dense -> MoE), :func:`merge_back` / :func:`save_merged`
(MoE + learned alpha -> dense), and the MoE checkpoint builder of mergekit-moe's YAML (``moe_yaml``).
The MoE block itself lives in ``fusion_jax.models.moe`` (every decoder family can use it).

The method end to end (``python train.py --config=configs/xft.py``): ``pipeline.run`` (stages upcycle ->
MoE SFT -> alpha training -> export, the dense SFT baseline, the report), ``config`` (schema, presets,
validation), ``training`` (the stages' losses on the common Trainer), ``report``; the fusion arena's entry
is ``arena.xft`` (``pipeline.arena_contestant``).
"""
from fusion_jax.xft.merge import (SHARED_WEIGHT, alpha_shape, init_alpha, merge_back, merge_coefficients,
                                  save_merged)
from fusion_jax.xft.upcycle import init_router, upcycle, upcycle_config

__all__ = ["upcycle", "upcycle_config", "init_router", "merge_back", "merge_coefficients", "init_alpha",
           "alpha_shape", "save_merged", "SHARED_WEIGHT"]
