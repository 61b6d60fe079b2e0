"""UltraFuser data: every example rendered in EVERY specialist's template, the mixed-domain set,
class-balanced training batches and fixed-shape evaluation batches.

Rendering and masks come from :mod:`fusion_jax.data.templates` (one implementation for the whole
package): ``render_dataset`` with K templates gives ``input_ids``/``attention_mask`` ``[N, K, S]`` with
the K prompts left-padded to end at one index, so the response tokens sit at the same positions in all
K rows, and one ``loss_mask [N, S]`` (1 on response tokens). The example axis leads, as the trainer
wants; the fused loss moves the expert axis to the front itself.
"""
from __future__ import annotations

from typing import Iterator, Mapping, Sequence

import numpy as np

from fusion_jax.data.templates import PromptTemplate, render_dataset
from fusion_jax.errors import DataError

# arrays a fused batch carries (rendering also yields positions, example_index, ...: not needed,
# the model derives positions from the attention mask exactly as rendering does)
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")


CHAT_TEMPLATE = "chat"  # a template given as this word renders prompts with the tokenizer's chat template


def templates_from_config(names: Sequence[str], formats: Mapping[str, str], *, bos: bool = True
                          ) -> list[PromptTemplate]:
    """``bos``: prepend the tokenizer's BOS to format-string prompts (pass False for tokenizers that have
    none, e.g. Qwen2's; a chat template writes its own)."""
    return [PromptTemplate(n, chat=True) if str(formats[n]) == CHAT_TEMPLATE
            else PromptTemplate(n, prompt=str(formats[n]), bos=bos) for n in names]


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


def eval_batches(arrays: Mapping[str, np.ndarray], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Consecutive batches of ``batch_size`` rows; the last one is filled with all-padding rows
    (``loss_mask`` 0: they add nothing), so every batch has one shape and compiles once."""
    n = len(arrays["loss_mask"])
    for i in range(0, n, batch_size):
        b = {k: v[i:i + batch_size] for k, v in arrays.items()}
        short = batch_size - len(b["loss_mask"])
        if short:
            b = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
            # a fully masked row would give NaN attention in some kernels: let it attend to itself
            b["attention_mask"][-short:] = 1
        yield b
