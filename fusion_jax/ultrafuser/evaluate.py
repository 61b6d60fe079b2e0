"""Held-out evaluation of the fused model: response-token cross-entropy, the mean gate weights, samples.

Single models are evaluated by :mod:`fusion_jax.eval.loss`; this module adds the fused model's jitted
evaluation (same fixed-shape batches, so it compiles once) on top of it.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from fusion_jax.eval.generation import encode, generate
from fusion_jax.eval.loss import sum_over_batches
from fusion_jax.ultrafuser import fusion
from fusion_jax.ultrafuser.decoding import fused_decoder
from fusion_jax.ultrafuser.model import GATE, SPECIALISTS, FusedModel, to_fused_batch


def make_fused_eval(fm: FusedModel, chunk: int):
    """jitted ``(train_params, batch[N,K,S]) -> (NLL sum, tokens, per-specialist gate-weight sum [K])``."""

    @jax.jit
    def ev(params, batch):
        fb = to_fused_batch(batch)
        hidden = fusion.stacked_hidden(fm.hidden_fn, params[SPECIALISTS], fb["input_ids"], fb["attention_mask"])
        return fusion.fused_ce_chunked(fm.head_fn, params[SPECIALISTS], params[GATE], hidden, fb["labels"],
                                       fb["loss_mask"], chunk)

    return ev


def fused_loss_and_weights(ev, params, arrays: Mapping[str, np.ndarray], batch_size: int, mesh: Mesh,
                           names) -> tuple[float, dict[str, float]]:
    """Mean response-token CE of the fused model and the mean gate weight of each specialist."""
    nll, tokens, wsum = sum_over_batches(ev, params, arrays, batch_size, mesh)
    c = max(float(tokens), 1.0)
    return float(nll / c), {name: float(x / c) for name, x in zip(names, wsum)}


def fused_generate(fm: FusedModel, tokenizer, prompts: Sequence, templates: Sequence, config, *,
                   progress: bool = False) -> list:
    """Completions of the fused model (:func:`fusion_jax.eval.generation.generate`: greedy or sampled,
    stop strings, several samples): each prompt (a string or a conversation) is rendered in every
    specialist's template (``templates``, one per specialist, e.g. ``data.templates_from_config``).
    Returns ``[prompt][sample]`` :class:`~fusion_jax.eval.generation.Completion` objects."""
    dec, params = fused_decoder(fm)
    return generate(dec, params, encode(tokenizer, prompts, list(templates)), config, tokenizer=tokenizer,
                    progress=progress)
