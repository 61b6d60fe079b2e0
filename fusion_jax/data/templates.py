"""Prompt templates and rendering to fixed-length token arrays with response-only loss masks.

Conventions (the same for every batch this package makes):

* ``input_ids[t]`` is the token at position ``t``; ``attention_mask[t]`` is 1 for real tokens.
* ``loss_mask[t]`` is 1 where ``input_ids[t]`` is a *target*: a response token (or the response's
  closing eos), predicted from positions ``< t``. This is the convention of
  :mod:`fusion_jax.train.losses` (``next_token_ce`` shifts by one itself), so rendered batches go
  straight into ``nnx_causal_lm_loss``; the loss is
  ``sum_t CE(logits[..., t - 1, :], input_ids[t]) * loss_mask[t] / sum(loss_mask)``.
* Prompt and response are tokenized separately and concatenated, so the response's token ids never
  depend on the template in front of it (and match what a model sees when it generates after the
  prompt).

Multi-template rendering (UltraFuser): :func:`render_multi` renders one example under K templates as
``input_ids [K, S]``. The K prompts are **left-padded so that they all end at the same index R**
(``response_start``); the response then occupies ``[R, R + L)`` in every row, identical ids, and a
single ``loss_mask [S]`` serves all K rows: the logits of specialist k at position t
predict ``input_ids[k, t + 1]``, the same token for every k. ``positions [K, S]`` count real tokens only (0 on left padding),
so each specialist sees its prompt at positions 0, 1, ... exactly as without padding. With K = 1 there
is no left padding and this is ordinary right-padded SFT rendering (:func:`render_example`).

Truncation when ``max_k len(prompt_k) + len(response) > seq_len``: ``"truncate"`` (default) fits each
template's prompt into ``max(seq_len - len(response), max_prompt_len)`` tokens by cutting TEXT, never the
template around it (:func:`fit_prompt`): a conversation loses its oldest turns first (a leading system
turn, BOS and the generation prompt always stay), then the start of the last user turn; a format-string
prompt loses the start of the user's text, while BOS and the template's fixed words (the end of a
template, such as ``### Response:``, matters most) stay. Then the response is cut on the right (its eos is
then lost). ``"drop"`` skips the example (:func:`render_dataset` reports how many).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from fusion_jax.errors import DataError

DOMAINS = ("text", "code", "math")


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
    """How one model wants its prompts.

    ``prompt`` contains ``{prompt}`` (substituted by plain replacement, so other braces are literal);
    ``response`` contains ``{response}``. ``bos``/``eos``: prepend the tokenizer's bos to the prompt /
    append its eos to the response. ``chat=True`` ignores ``prompt`` and uses the tokenizer's
    ``chat_template`` with ``add_generation_prompt=True``, over the example's whole conversation before
    the response (its ``messages``: system and earlier turns, from a chat dataset row) or, for a plain
    prompt/response row, one user turn. A format-string template renders only the last user turn (it
    has no turn format to write the earlier ones in).
    """

    name: str
    prompt: str = "{prompt}"
    response: str = "{response}"
    bos: bool = True
    eos: bool = True
    chat: bool = False

    def __post_init__(self):
        if not self.chat and "{prompt}" not in self.prompt:
            raise DataError(f"template {self.name!r}: prompt format {self.prompt!r} has no {{prompt}}")
        if "{response}" not in self.response:
            raise DataError(f"template {self.name!r}: response format {self.response!r} has no {{response}}")


CHAT = PromptTemplate("chat", chat=True)
CHAT_FORMAT = "chat"   # a prompt format given as this word means the tokenizer's chat template


def template_from_format(name: str, fmt: str, *, bos: bool = True) -> PromptTemplate:
    """The template a config's prompt format names: ``"chat"`` (the tokenizer's chat template) or a
    format string with ``{prompt}``. ``bos``: prepend the tokenizer's BOS to format-string prompts (False
    for tokenizers that have none, e.g. Qwen2's; a chat template writes its own)."""
    fmt = str(fmt)
    return PromptTemplate(name, chat=True) if fmt == CHAT_FORMAT else PromptTemplate(name, prompt=fmt, bos=bos)

# One template per demo specialist, in the spirit of the paper's three (UltraLM, CodeLlama-Instruct,
# WizardMath; the math one is WizardMath's without its long preamble, to keep the demo's sequences short).
DEMO_TEMPLATES = {
    "text": PromptTemplate("text", "User: {prompt}\nAssistant:\n"),
    "code": PromptTemplate("code", "[INST] {prompt} [/INST]\n"),
    "math": PromptTemplate("math", "### Instruction:\n{prompt}\n\n### Response: Let's think step by step.\n"),
}


def _ids(x) -> list[int]:
    if hasattr(x, "keys") and "input_ids" in x:  # BatchEncoding from newer apply_chat_template
        x = x["input_ids"]
    return list(x)


def encode_prompts(tokenizer, template: PromptTemplate, prompts: Sequence[str],
                   contexts: Sequence[list | None] | None = None) -> list[list[int]]:
    """Token ids of each prompt rendered in ``template`` (everything before the response).

    ``contexts[j]``: example j's conversation before the response (``messages`` of a chat row), used by
    chat templates instead of a single user turn of ``prompts[j]``; None for a plain row.
    """
    if template.chat:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"template {template.name!r} uses the chat template, but the tokenizer has none")
        contexts = contexts or [None] * len(prompts)
        texts = [tokenizer.apply_chat_template(c or [{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p, c in zip(prompts, contexts)]
        # the chat template writes bos itself (as text); encode without adding another
        return [_ids(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    texts = [template.prompt.replace("{prompt}", p) for p in prompts]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if template.bos:
        if tokenizer.bos_token_id is None:
            raise DataError(f"template {template.name!r} wants bos, but the tokenizer has no bos_token")
        return [[tokenizer.bos_token_id] + list(x) for x in enc]
    return [list(x) for x in enc]


def fit_prompt(tokenizer, template: PromptTemplate, prompt: str, context: list | None, budget: int) -> list[int]:
    """The prompt's ids in ``template``, cut to at most ``budget`` tokens by removing text, not template.

    Chat: drop the oldest turns after any leading system turns (a whole user/assistant exchange at a time)
    while the last user turn remains; then cut the start of the last user turn's content. Format string:
    cut the start of ``prompt``. If even an empty user text does not fit (a template longer than the
    budget), the rendered ids are cut from the left after BOS as a last resort.
    """
    def enc(p, ctx):
        return encode_prompts(tokenizer, template, [p], [ctx])[0]

    ids = enc(prompt, context)
    if len(ids) <= budget:
        return ids
    ctx = list(context) if template.chat and context else None
    if ctx:
        system = 0
        while system < len(ctx) and ctx[system].get("role") == "system":
            system += 1
        last_user = max(j for j, t in enumerate(ctx) if t.get("role") == "user")
        while len(ids) > budget and last_user > system:
            # drop the oldest turn after the system turns, and any assistant turns that then lead
            del ctx[system]
            while system < len(ctx) - 1 and ctx[system].get("role") != "user":
                del ctx[system]
            last_user = max(j for j, t in enumerate(ctx) if t.get("role") == "user")
            ids = enc(prompt, ctx)
        if len(ids) <= budget:
            return ids
        prompt = ctx[last_user]["content"]
    # cut the start of the user's text, re-rendering until it fits (token counts at the cut can shift by one)
    words = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    keep = max(0, len(words) - (len(ids) - budget))
    while True:
        text = tokenizer.decode(words[len(words) - keep:]) if keep else ""
        if ctx:
            ctx[last_user] = dict(ctx[last_user], content=text)
        ids = enc(text, ctx)
        if len(ids) <= budget or keep == 0:
            break
        keep = max(0, keep - max(1, len(ids) - budget))
    if len(ids) > budget:   # the template alone is longer than the budget
        head = ids[:1] if template.bos or (ids and ids[0] == tokenizer.bos_token_id) else []
        ids = head + ids[len(ids) - (budget - len(head)):]
    return ids


def encode_responses(tokenizer, template: PromptTemplate, responses: Sequence[str]) -> list[list[int]]:
    """Token ids of each response (tokenized on its own) plus eos."""
    texts = [template.response.replace("{response}", r) for r in responses]
    enc = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if template.eos:
        if tokenizer.eos_token_id is None:
            raise DataError(f"template {template.name!r} wants eos, but the tokenizer has no eos_token")
        return [list(x) + [tokenizer.eos_token_id] for x in enc]
    return [list(x) for x in enc]


def layout_multi(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[int], seq_len: int,
                 pad_id: int, truncation: str = "truncate", max_prompt_len: int | None = None):
    """Lay out K prompts + one shared response (see the module docstring). Returns a dict of numpy
    arrays (``input_ids``/``attention_mask``/``positions`` [K, S], ``loss_mask`` [S],
    ``response_start`` scalar) or None when ``truncation="drop"`` and it does not fit."""
    if max_prompt_len is None:
        max_prompt_len = seq_len // 2
    if not 0 < max_prompt_len < seq_len:
        raise DataError(f"max_prompt_len={max_prompt_len} must be in (0, seq_len={seq_len})")
    prompts = [list(p) for p in prompt_ids]
    resp = list(response_ids)
    p_max = max(len(p) for p in prompts)
    if p_max + len(resp) > seq_len:
        if truncation == "drop":
            return None
        if truncation != "truncate":
            raise DataError(f"truncation={truncation!r}: expected 'truncate' or 'drop'")
        budget = min(p_max, max(seq_len - len(resp), max_prompt_len))
        prompts = [p[-budget:] if len(p) > budget else p for p in prompts]
        p_max = max(len(p) for p in prompts)
        resp = resp[:seq_len - p_max]
    k = len(prompts)
    ids = np.full((k, seq_len), pad_id, np.int32)
    mask = np.zeros((k, seq_len), np.int32)
    r0, r1 = p_max, p_max + len(resp)
    for i, p in enumerate(prompts):
        ids[i, r0 - len(p):r0] = p
        mask[i, r0 - len(p):r1] = 1
    ids[:, r0:r1] = resp
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32) * mask
    loss_mask = np.zeros(seq_len, np.int32)
    loss_mask[r0:r1] = 1
    return {"input_ids": ids, "attention_mask": mask, "positions": positions,
            "loss_mask": loss_mask, "response_start": np.int32(r0)}


def render_multi(tokenizer, example: dict, templates: Sequence[PromptTemplate], seq_len: int,
                 truncation: str = "truncate", max_prompt_len: int | None = None):
    """One example under K templates; see :func:`layout_multi`. All templates must share the response
    format and eos flag (otherwise the response tokens could not be identical)."""
    _check_shared_response(templates)
    prompts = [encode_prompts(tokenizer, t, [example["prompt"]], [example.get("messages")])[0]
               for t in templates]
    resp = encode_responses(tokenizer, templates[0], [example["response"]])[0]
    if truncation == "truncate":
        prompts = _fit(tokenizer, templates, example, prompts, resp, seq_len, max_prompt_len)
    return layout_multi(prompts, resp, seq_len, _pad_id(tokenizer), truncation, max_prompt_len)


def _fit(tokenizer, templates, example, prompts, resp, seq_len, max_prompt_len):
    """Each prompt that would be cut, re-rendered by :func:`fit_prompt` into the space ``layout_multi``
    gives it (the same budget rule), so that its own left cut never removes BOS or a system turn."""
    mpl = seq_len // 2 if max_prompt_len is None else max_prompt_len
    if max(len(p) for p in prompts) + len(resp) <= seq_len:
        return prompts
    budget = min(max(len(p) for p in prompts), max(seq_len - len(resp), mpl))
    return [p if len(p) <= budget else fit_prompt(tokenizer, t, example["prompt"], example.get("messages"), budget)
            for t, p in zip(templates, prompts)]


def render_example(tokenizer, example: dict, template: PromptTemplate, seq_len: int,
                   truncation: str = "truncate", max_prompt_len: int | None = None):
    """One example in one template, right-padded: arrays of shape [S] (see the module docstring)."""
    out = render_multi(tokenizer, example, [template], seq_len, truncation, max_prompt_len)
    if out is None:
        return None
    return {k: (v[0] if v.ndim == 2 else v) for k, v in out.items()}


def _check_shared_response(templates: Sequence[PromptTemplate]):
    if not templates:
        raise DataError("no templates given")
    first = templates[0]
    for t in templates[1:]:
        if (t.response, t.eos) != (first.response, first.eos):
            raise DataError(f"templates {first.name!r} and {t.name!r} format the response differently; "
                            "multi-template rendering needs one shared response format")


def _pad_id(tokenizer) -> int:
    pid = tokenizer.pad_token_id
    if pid is None:
        pid = tokenizer.eos_token_id
    if pid is None:
        raise DataError("the tokenizer has neither a pad_token nor an eos_token to pad with")
    return int(pid)


def domain_ids(examples: Sequence[dict], domains: Sequence[str] = DOMAINS) -> np.ndarray:
    index = {d: i for i, d in enumerate(domains)}
    out = np.empty(len(examples), np.int32)
    for j, e in enumerate(examples):
        d = e.get("domain")
        if d not in index:
            raise DataError(f"example {j}: domain {d!r} is not one of {list(domains)}")
        out[j] = index[d]
    return out


def render_dataset(tokenizer, examples: Sequence[dict], templates: PromptTemplate | Sequence[PromptTemplate],
                   seq_len: int, domains: Sequence[str] = DOMAINS, truncation: str = "truncate",
                   max_prompt_len: int | None = None) -> dict[str, np.ndarray]:
    """Render many examples (tokenized in batches) into stacked arrays.

    One template: ``input_ids``, ``attention_mask``, ``positions``, ``loss_mask`` [N, S].
    A list of K templates: ``input_ids``, ``attention_mask``, ``positions`` [N, K, S] and ``loss_mask``
    [N, S] (shared, see :func:`layout_multi`): the leading axis is the example, as the trainer wants. Always ``domain`` [N] (index into
    ``domains``), ``response_start`` [N] and ``example_index`` [N] (row in ``examples``; rows dropped by
    ``truncation="drop"`` are skipped).
    """
    single = isinstance(templates, PromptTemplate)
    tmpls = [templates] if single else list(templates)
    _check_shared_response(tmpls)
    if not examples:
        raise DataError("render_dataset: no examples")
    for j, e in enumerate(examples):
        for col in ("prompt", "response"):
            if not isinstance(e.get(col), str):
                raise DataError(f"example {j}: column {col!r} is missing or not a string")
    dom = domain_ids(examples, domains)
    prompts = [encode_prompts(tokenizer, t, [e["prompt"] for e in examples], [e.get("messages") for e in examples])
               for t in tmpls]
    resps = encode_responses(tokenizer, tmpls[0], [e["response"] for e in examples])
    pad = _pad_id(tokenizer)
    rows, keep = [], []
    for j in range(len(examples)):
        pj = [p[j] for p in prompts]
        if truncation == "truncate":
            pj = _fit(tokenizer, tmpls, examples[j], pj, resps[j], seq_len, max_prompt_len)
        r = layout_multi(pj, resps[j], seq_len, pad, truncation, max_prompt_len)
        if r is not None:
            rows.append(r)
            keep.append(j)
    if not rows:
        raise DataError(f"render_dataset: every example is longer than seq_len={seq_len}")
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    if single:
        for k in ("input_ids", "attention_mask", "positions"):
            out[k] = out[k][:, 0]
    out["domain"] = dom[keep]
    out["example_index"] = np.asarray(keep, np.int32)
    return out


def split_by_domain(arrays: dict[str, np.ndarray], domains: Sequence[str] = DOMAINS
                    ) -> dict[str, dict[str, np.ndarray]]:
    """``{domain: arrays restricted to that domain}``; a domain without rows raises DataError."""
    out = {}
    for i, d in enumerate(domains):
        sel = np.nonzero(arrays["domain"] == i)[0]
        if len(sel) == 0:
            raise DataError(f"domain {d!r} has no examples")
        out[d] = {k: v[sel] for k, v in arrays.items()}
    return out
