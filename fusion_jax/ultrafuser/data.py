"""UltraFuser data: every example rendered in EVERY specialist's template, and the mixed-domain set.

Rendering and masks come from :mod:`fusion_jax.data.templates` (one implementation for the whole
package): ``render_dataset`` with K templates gives ``input_ids``/``attention_mask`` ``[N, K, S]`` with
the K prompts left-padded to end at one index, so the response tokens sit at the same positions in all
K rows, and one ``loss_mask [N, S]`` (1 on response tokens). The example axis leads, as the trainer
wants; the fused loss moves the expert axis to the front itself.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from fusion_jax.data.templates import CHAT_FORMAT, PromptTemplate, render_dataset, template_from_format
from fusion_jax.errors import DataError

# arrays a fused batch carries (rendering also yields positions, example_index, ...: not needed,
# the model derives positions from the attention mask exactly as rendering does)
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


CHAT_TEMPLATE = CHAT_FORMAT  # a template given as this word renders prompts with the tokenizer's chat template


def templates_from_config(names: Sequence[str], formats: Mapping[str, str], *, bos: bool = True
                          ) -> list[PromptTemplate]:
    """Each specialist's template (:func:`fusion_jax.data.templates.template_from_format`)."""
    return [template_from_format(n, formats[n], bos=bos) for n in names]


def render_sets(tokenizer, examples: Mapping[str, Sequence[dict]], templates: Sequence[PromptTemplate],
                seq_len: int, max_prompt_len: int) -> dict[str, dict[str, np.ndarray]]:
    """``{domain: {input_ids/attention_mask [N,K,S], loss_mask [N,S]}}`` (see the module docstring)."""
    out = {}
    for d, exs in examples.items():
        if not exs:
            raise DataError(f"domain {d!r} has no examples")
        exs = [dict(e, domain=d) for e in exs]
        r = render_dataset(tokenizer, exs, list(templates), seq_len, domains=(d,),
                           max_prompt_len=max_prompt_len)
        out[d] = {k: r[k] for k in BATCH_KEYS}
    return out


def select(arrays: Mapping[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """Specialist k's own view ``[N, S]`` of multi-template arrays (its template's rows)."""
    return {key: (v[:, k] if v.ndim == 3 else v) for key, v in arrays.items()}


def mixed_examples(per_domain: Mapping[str, Sequence[dict]], tokenizer, n: int, response_tokens: int,
                   seed: int) -> list[dict]:
    """Held-out examples whose ONE response switches domain: a slice of one response of each domain in
    turn (order drawn per example, so no position belongs to one domain), about
    ``response_tokens / n_domains`` tokens each. The prompt joins the parts' prompts."""
    domains = list(per_domain)
    for d in domains:
        if not per_domain[d]:
            raise DataError(f"mixed set: domain {d!r} has no evaluation examples")
    rng = np.random.default_rng(seed)
    part = max(4, response_tokens // len(domains))
    out = []
    for _ in range(n):
        prompts, parts = [], []
        for di in rng.permutation(len(domains)):
            pool = per_domain[domains[di]]
            ex = pool[int(rng.integers(len(pool)))]
            prompts.append(ex["prompt"])
            ids = tokenizer(ex["response"], add_special_tokens=False)["input_ids"][:part]
            parts.append(tokenizer.decode(ids))
        out.append({"domain": "mixed", "prompt": "\n".join(prompts), "response": "\n\n".join(parts)})
    return out
