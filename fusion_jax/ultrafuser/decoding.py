"""The UltraFuser fused model as a decoder of :mod:`fusion_jax.eval.generation` (greedy, sampling, stop
strings, bucketed shapes: everything the engine does for a plain model).

K specialists run in one ``jax.vmap`` over their stacked params, each with its own KV cache (the caches
stack on the expert axis). Each step the gate reads every specialist's last hidden state, and the token
comes from the mixed logits ``sum_k w_k o_k`` (:mod:`fusion_jax.ultrafuser.fusion`). A prompt has K
views, the same request rendered in each specialist's template (``generation.encode(tokenizer, prompts,
templates)``); the engine left-pads all K to one length, so ``ids``/``mask`` arrive as ``[B, K, P]``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax.models.generate import decode_step, prefill
from fusion_jax.ultrafuser import fusion
from fusion_jax.ultrafuser.gate import gate_weights
from fusion_jax.ultrafuser.model import GATE, SPECIALISTS, FusedModel


@dataclasses.dataclass(frozen=True)
class FusedDecoder:
    """Decoder protocol of :mod:`fusion_jax.eval.generation`; params = ``FusedModel.train_params()``."""

    graphdef: Any      # one specialist's GraphDef (all share it)
    views: int         # K, the number of specialists

    def _mixed_logits(self, params, hidden):          # hidden [K, B, (c,) D] -> [B, (c,) V]
        def head(p, h):
            return nnx.merge(self.graphdef, p).logits_from_hidden(h)

        w = gate_weights(params[GATE], hidden)
        return fusion.mix_logits(w, jax.vmap(head)(params[SPECIALISTS], hidden))

    def prefill(self, params, ids, mask, max_len):
        def one(p, i, m):
            return prefill(nnx.merge(self.graphdef, p), i, m, max_len)

        h, caches = jax.vmap(one)(params[SPECIALISTS], jnp.swapaxes(ids, 0, 1), jnp.swapaxes(mask, 0, 1))
        return self._mixed_logits(params, h), caches

    def step(self, params, tokens, cache):
        def one(p, c):
            return decode_step(nnx.merge(self.graphdef, p), tokens, c)

        h, cache = jax.vmap(one)(params[SPECIALISTS], cache)
        return self._mixed_logits(params, h), cache

    def score(self, params, ids, mask, labels, chunk):
        from fusion_jax.eval.scoring import token_scores

        def hidden(p, i, m):
            return nnx.merge(self.graphdef, p)(i, attention_mask=m, return_hidden=True, return_logits=False).hidden

        h = jax.vmap(hidden)(params[SPECIALISTS], jnp.swapaxes(ids, 0, 1), jnp.swapaxes(mask, 0, 1))
        return token_scores(lambda hc: self._mixed_logits(params, hc), h, labels, chunk, seq_axis=2)


def fused_decoder(fm: FusedModel) -> tuple[FusedDecoder, dict]:
    """``(decoder, params)`` for :func:`fusion_jax.eval.generation.generate`."""
    return FusedDecoder(fm.graphdef, fm.num_experts), fm.train_params()


def load_eval_model(path, *, dtype: str | None = None):
    """A fused directory (``export.save_fused``) as a ``fusion_jax.eval.models.EvalModel``: the fused
    decoder, the specialists' tokenizer and their own prompt templates (one view each)."""
    from pathlib import Path

    from fusion_jax.eval.models import EvalModel, _tokenizer_or_none
    from fusion_jax.ultrafuser.data import templates_from_config
    from fusion_jax.ultrafuser.export import load_fused
    kw = {"param_dtype": dtype, "dtype": dtype} if dtype else {}
    fm, meta = load_fused(path, **kw)
    tok = _tokenizer_or_none(Path(path) / "specialists" / fm.names[0])
    formats = meta.get("templates") or {}
    templates = ()
    if all(n in formats for n in fm.names):
        bos = tok is None or tok.bos_token_id is not None
        templates = tuple(templates_from_config(list(fm.names), formats, bos=bos))
    dec, params = fused_decoder(fm)
    return EvalModel("ultrafuser", Path(path), dec, params, tok, fm.config, tuple(fm.names), templates)
