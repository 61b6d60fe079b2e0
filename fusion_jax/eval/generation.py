"""Batched KV-cache generation for plain and fused models: greedy, temperature, top-k, top-p, stop
strings, EOS, several samples per prompt, chat templates; fixed shapes, so a run compiles a handful of
programs whatever its prompts.

**Decoder protocol.** One engine serves every model kind through two pure, jit-able functions of a
hashable decoder object (a static argument of ``jax.jit``) and its params pytree:

    decoder.views: int                                    # 1: ids [B, P]; K > 1: ids [B, K, P]
    decoder.prefill(params, ids, mask, max_len) -> (logits [B, V] float32, cache)
    decoder.step(params, tokens [B] int32, cache) -> (logits [B, V] float32, cache)
    decoder.score(params, ids, mask, labels [B, P], chunk) -> (log p(labels) [B, P], labels == argmax [B, P])

``ids``/``mask`` are LEFT-padded (the last column is every row's last prompt token); ``prefill`` returns
the logits that predict the first new token and a cache with ``max_len`` slots; ``step`` feeds one token
per row. The cache is any pytree. ``score`` (a full forward, logits formed ``chunk`` positions at a
time: :func:`fusion_jax.eval.scoring.token_scores`) serves likelihoods and held-out loss
(:mod:`.scoring`). :class:`CausalLMDecoder` adapts a ``fusion_jax.models.CausalLM``;
``fusion_jax.ultrafuser.decoding.FusedDecoder`` adapts the UltraFuser fused model (K prompt views, one
per specialist template). Both are built on ``fusion_jax.models.generate.prefill`` / ``decode_step``.

**Shapes.** Rows (prompt x sample) are sorted by length (longest first) and cut into batches of
``batch_size``; a batch is padded to the smallest length bucket that holds its longest prompt (powers
of two from ``min_bucket``, or the ``length_buckets`` ladder) and to the smallest batch bucket (powers
of two up to ``batch_size``) that holds its rows. Each (batch, length) bucket compiles two programs:
the prefill (which also samples the first token) and a ``chunk``-step decode (``lax.scan``). Between
chunks the host looks at the new tokens: EOS, the ``max_new_tokens`` budget and stop strings (decoded
text, so a stop string spanning several tokens, or split differently by the tokenizer, is found); the
batch ends when every row has finished. Measured (``tests/test_eval_generation.py``, 1000 prompts of
1..300 tokens, counted with :func:`count_compiles`, ``jax.monitoring``'s backend-compile events): with
the default ladder (16..512) at batch 32, **14 XLA compiles** in all (6 length buckets x 2 programs,
plus 2 for the 8-row remainder at batch bucket 8); with the ladder (64, 320) at batch 64, **4**. On
this 2-core CPU one compile of the tiny test model takes 1-3 s, so compiling per prompt shape (as
``fusion_jax.models.generate`` would, one program per distinct length) would cost ~300 compiles here.

**Randomness.** Sample ``s`` of prompt ``i`` draws step ``t``'s token with
``fold_in(fold_in(fold_in(key(seed), i), s), t)``: results do not depend on batch size, bucketing or
order, and ``num_samples`` samples of a prompt are rows with distinct keys. Filtering follows
transformers' order: temperature, then top-k, then top-p on the top-k-filtered distribution
(:func:`filter_logits`; ties at a threshold are all kept).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Iterator, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.errors import ConfigError, DataError
from fusion_jax.models.generate import decode_step, prefill


# -- the decoder protocol and the CausalLM adapter -----------------------------------------------------
class Decoder(Protocol):
    views: int

    def prefill(self, params, ids, mask, max_len: int) -> tuple[jax.Array, Any]: ...

    def step(self, params, tokens, cache) -> tuple[jax.Array, Any]: ...

    def score(self, params, ids, mask, labels, chunk: int) -> tuple[jax.Array, jax.Array]: ...


@dataclasses.dataclass(frozen=True)
class CausalLMDecoder:
    """A ``fusion_jax.models.CausalLM`` as a :class:`Decoder`; params = ``nnx.split(model)[1]``."""

    graphdef: Any
    views = 1

    def prefill(self, params, ids, mask, max_len):
        model = nnx.merge(self.graphdef, params)
        h, cache = prefill(model, ids, mask, max_len)
        return model.logits_from_hidden(h), cache

    def step(self, params, tokens, cache):
        model = nnx.merge(self.graphdef, params)
        h, cache = decode_step(model, tokens, cache)
        return model.logits_from_hidden(h), cache

    def score(self, params, ids, mask, labels, chunk):
        from fusion_jax.eval.scoring import token_scores
        model = nnx.merge(self.graphdef, params)
        h = model(ids, attention_mask=mask, return_hidden=True, return_logits=False).hidden
        return token_scores(model.logits_from_hidden, h, labels, chunk)


def causal_lm_decoder(model) -> tuple[CausalLMDecoder, Any]:
    """``(decoder, params)`` for a ``CausalLM``."""
    graphdef, state = nnx.split(model)
    return CausalLMDecoder(graphdef), state


# -- sampling (pure, jit-able) -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """``temperature == 0``: greedy (argmax). ``top_k == 0`` / ``top_p == 1``: that filter is off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not float(self.temperature) >= 0.0:
            raise ConfigError(f"sampling.temperature={self.temperature}: must be >= 0 (0 means greedy)")
        if int(self.top_k) < 0:
            raise ConfigError(f"sampling.top_k={self.top_k}: must be >= 0 (0 means off)")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ConfigError(f"sampling.top_p={self.top_p}: must be in (0, 1] (1 means off)")

    @property
    def greedy(self) -> bool:
        return float(self.temperature) == 0.0


def filter_logits(logits: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """Temperature-scaled float32 logits ``[..., V]`` with ``-inf`` where top-k / top-p remove a token.

    top-k keeps the tokens whose logit is >= the k-th largest; top-p then keeps, in descending order,
    every token whose preceding probability mass (of the top-k-renormalised distribution) is < p: the
    smallest set with mass >= p. Same semantics as transformers' TopK/TopP warpers up to exact ties.
    """
    x = logits.astype(jnp.float32) / jnp.float32(sampling.temperature)
    V = x.shape[-1]
    k = int(sampling.top_k) if 0 < int(sampling.top_k) < V else 0
    if not k and float(sampling.top_p) >= 1.0:
        return x
    # descending candidates: top-k's own output, else the whole vocabulary sorted
    vals = jax.lax.top_k(x, k)[0] if k else -jnp.sort(-x, axis=-1)
    thresh = vals[..., -1:]
    if float(sampling.top_p) < 1.0:
        p = jax.nn.softmax(vals, axis=-1)
        before = jnp.cumsum(p, axis=-1) - p               # mass strictly ahead of each candidate
        n_keep = jnp.sum(before < sampling.top_p, axis=-1, keepdims=True)   # >= 1 (before[0] = 0)
        thresh = jnp.take_along_axis(vals, n_keep - 1, axis=-1)
    return jnp.where(x < thresh, -jnp.inf, x)


def sample_tokens(logits: jax.Array, keys: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """One token per row: ``logits [B, V]``, ``keys [B]`` (typed PRNG keys) -> ``[B]`` int32."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = filter_logits(logits, sampling)
    return jax.vmap(jax.random.categorical)(keys, x).astype(jnp.int32)


def row_keys(seed, row_ids: jax.Array) -> jax.Array:
    """Typed keys ``[B]``, one per (prompt index, sample index) row of ``row_ids [B, 2]``."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r: jax.random.fold_in(jax.random.fold_in(base, r[0]), r[1]))(row_ids)


def step_keys(keys: jax.Array, t) -> jax.Array:
    """The keys of decode step ``t`` (0 = the token sampled from the prefill's logits)."""
    return jax.vmap(lambda k: jax.random.fold_in(k, t))(keys)


# -- the two jitted programs ---------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("decoder", "max_len", "sampling"))
def _prefill(decoder, params, ids, mask, row_ids, seed, *, max_len, sampling):
    logits, cache = decoder.prefill(params, ids, mask, max_len)
    keys = row_keys(seed, row_ids)
    tok = sample_tokens(logits, step_keys(keys, 0), sampling)
    return (tok, cache, jnp.int32(1)), keys


@functools.partial(jax.jit, static_argnames=("decoder", "chunk", "sampling"), donate_argnames=("state",))
def _decode_chunk(decoder, params, state, keys, *, chunk, sampling):
    def body(carry, _):
        tok, cache, t = carry
        logits, cache = decoder.step(params, tok, cache)
        nxt = sample_tokens(logits, step_keys(keys, t), sampling)
        return (nxt, cache, t + 1), nxt

    state, toks = jax.lax.scan(body, state, None, length=chunk)
    return state, toks.T


# -- configuration and results -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """One generation run. ``eos_token_ids``/``pad_token_id``: see :func:`token_defaults`.

    ``length_buckets``: an explicit ladder of padded prompt lengths (a longer prompt is a DataError);
    empty: powers of two from ``min_bucket``, as far as the prompts need. ``chunk``: decode steps per
    device call (the host checks EOS and stop strings between chunks).
    """

    max_new_tokens: int = 128
    sampling: SamplingConfig = SamplingConfig()
    num_samples: int = 1
    stop: tuple[str, ...] = ()
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    batch_size: int = 16
    length_buckets: tuple[int, ...] = ()
    min_bucket: int = 16
    chunk: int = 32
    seed: int = 0

    def __post_init__(self):
        for name in ("max_new_tokens", "num_samples", "batch_size", "min_bucket", "chunk"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"generation.{name}={getattr(self, name)}: must be >= 1")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"generation.stop={self.stop!r}: must be a tuple of non-empty strings")
        if list(self.length_buckets) != sorted(set(int(b) for b in self.length_buckets)) or \
                any(int(b) < 1 for b in self.length_buckets):
            raise ConfigError(f"generation.length_buckets={self.length_buckets}: must be increasing and >= 1")


@dataclasses.dataclass
class Completion:
    """One sample. ``tokens``: the new ids, without the EOS and cut after the token that completes a stop
    string; ``text``: their decoding (None without a tokenizer), cut before the stop string;
    ``finish_reason``: "eos", "stop" or "length"."""

    tokens: list[int]
    text: str | None
    finish_reason: str


def token_defaults(tokenizer=None, model_dir: str | Path | None = None) -> dict:
    """``{"eos_token_ids", "pad_token_id"}`` for :class:`GenerationConfig`: every EOS id of the model's
    ``generation_config.json`` (Llama 3 has several) and the tokenizer's; pad = the tokenizer's pad, else
    the first EOS, else 0."""
    eos: list[int] = []
    if model_dir is not None and (Path(model_dir) / "generation_config.json").is_file():
        e = json.loads((Path(model_dir) / "generation_config.json").read_text()).get("eos_token_id")
        eos += [int(x) for x in (e if isinstance(e, list) else [e]) if x is not None]
    if tokenizer is not None and tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(int(tokenizer.eos_token_id))
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = int(pad) if pad is not None else (eos[0] if eos else 0)
    return {"eos_token_ids": tuple(eos), "pad_token_id": pad}


# -- prompts -------------------------------------------------------------------------------------------
def encode(tokenizer, prompts: Sequence[str | Sequence[dict]], template=None) -> list:
    """Token ids of prompts for :func:`generate`.

    ``template``: None (the raw text, with the special tokens the tokenizer adds itself, e.g. Llama's
    BOS), ``"chat"`` (the tokenizer's chat template with the generation prompt), a
    ``fusion_jax.data.templates.PromptTemplate``, or a list of these (one per view of a fused model:
    returns K id lists per prompt). A prompt may be a conversation (a list of ``{"role", "content"}``
    messages) for chat templates.
    """
    from fusion_jax.data.templates import CHAT, PromptTemplate, encode_prompts

    if isinstance(template, (list, tuple)):
        per_view = [encode(tokenizer, prompts, t) for t in template]
        return [list(v) for v in zip(*per_view)]
    texts = [p if isinstance(p, str) else "" for p in prompts]
    contexts = [None if isinstance(p, str) else list(p) for p in prompts]
    if template is None:
        if any(c is not None for c in contexts):
            raise DataError("a conversation prompt needs a chat template (template='chat')")
        return [list(x) for x in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    tmpl = CHAT if template == "chat" else template
    if not isinstance(tmpl, PromptTemplate):
        raise ConfigError(f"template={template!r}: expected None, 'chat' or a PromptTemplate")
    if not tmpl.chat and any(c is not None for c in contexts):
        raise DataError(f"template {tmpl.name!r} is not a chat template; conversation prompts need one")
    return encode_prompts(tokenizer, tmpl, texts, contexts)


def _views(prompt, views: int, index: int) -> list[list[int]]:
    if views == 1:
        out = [[int(t) for t in prompt]]
    else:
        if len(prompt) != views:
            raise DataError(f"prompt {index}: the decoder takes {views} views (one per specialist "
                            f"template), got {len(prompt)}")
        out = [[int(t) for t in v] for v in prompt]
    if any(len(v) == 0 for v in out):
        raise DataError(f"prompt {index} is empty (it needs at least one token, e.g. BOS)")
    return out


def length_bucket(n: int, config: GenerationConfig) -> int:
    if config.length_buckets:
        for b in config.length_buckets:
            if n <= b:
                return int(b)
        raise DataError(f"a prompt of {n} tokens is longer than the largest length bucket "
                        f"{config.length_buckets[-1]} (generation.length_buckets)")
    b = int(config.min_bucket)
    while b < n:
        b *= 2
    return b


def batch_bucket(n: int, batch_size: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, batch_size)


# -- the engine ----------------------------------------------------------------------------------------
def generate(decoder: Decoder, params, prompts: Sequence, config: GenerationConfig, *, tokenizer=None,
             progress: bool = False) -> list[list[Completion]]:
    """Generate ``config.num_samples`` completions of each prompt; returns ``[prompt][sample]``.

    ``prompts``: token id lists (``decoder.views == 1``) or, for a K-view decoder, K id lists each
    (:func:`encode` makes both). ``tokenizer`` decodes texts and is required for stop strings.
    """
    if config.stop and tokenizer is None:
        raise ConfigError("generation.stop needs a tokenizer to decode the generated text")
    views = int(getattr(decoder, "views", 1))
    rows = [(i, s, _views(p, views, i)) for i, p in enumerate(prompts) for s in range(config.num_samples)]
    out: list[list[Completion | None]] = [[None] * config.num_samples for _ in prompts]
    order = sorted(range(len(rows)), key=lambda r: -max(len(v) for v in rows[r][2]))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(rows), desc="generate", unit="sample")
    try:
        for start in range(0, len(order), config.batch_size):
            batch = [rows[r] for r in order[start:start + config.batch_size]]
            for (i, s, _), c in zip(batch, _run_batch(decoder, params, batch, config, views, tokenizer)):
                out[i][s] = c
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return out  # type: ignore[return-value]


def generate_text(decoder: Decoder, params, tokenizer, prompts: Sequence, config: GenerationConfig,
                  template=None, progress: bool = False) -> list[list[Completion]]:
    """:func:`encode` then :func:`generate`."""
    return generate(decoder, params, encode(tokenizer, prompts, template), config, tokenizer=tokenizer,
                    progress=progress)


def _pad_batch(batch, B: int, P: int, views: int, pad_id: int):
    shape = (B, P) if views == 1 else (B, views, P)
    ids = np.full(shape, pad_id, np.int32)
    mask = np.zeros(shape, np.int32)
    row_ids = np.zeros((B, 2), np.int32)
    for b in range(B):
        i, s, vs = batch[min(b, len(batch) - 1)]   # filler rows repeat the last row (results dropped)
        row_ids[b] = (i, s)
        for k, v in enumerate(vs):
            at = (b, slice(P - len(v), P)) if views == 1 else (b, k, slice(P - len(v), P))
            ids[at] = v
            mask[at] = 1
    return ids, mask, row_ids


class _RowState:
    """Host bookkeeping of one row: tokens so far and, once known, the finish."""

    def __init__(self):
        self.tokens: list[int] = []
        self.done: Completion | None = None


def _advance(row: _RowState, new: np.ndarray, config: GenerationConfig, tokenizer) -> None:
    """Append a block of new tokens; finish the row on EOS, the token budget or a stop string."""
    prev = len(row.tokens)
    row.tokens.extend(int(t) for t in new)
    reason = None
    for j in range(prev, len(row.tokens)):
        if row.tokens[j] in config.eos_token_ids:
            del row.tokens[j:]
            reason = "eos"
            break
    if reason is None and len(row.tokens) >= config.max_new_tokens:
        del row.tokens[config.max_new_tokens:]
        reason = "length"
    if config.stop:
        hit = _find_stop(row.tokens, prev, config.stop, tokenizer)
        if hit is not None:
            row.tokens, text = hit
            row.done = Completion(row.tokens, text, "stop")
            return
    if reason is not None:
        text = None if tokenizer is None else _decode(tokenizer, row.tokens)
        row.done = Completion(row.tokens, text, reason)


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)


def _first_stop(text: str, stops) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _find_stop(tokens, prev: int, stops, tokenizer):
    """``(tokens up to the one completing the earliest stop string, text before it)`` or None. The text
    of ``tokens[:prev]`` had no stop string (checked at the previous block)."""
    if _first_stop(_decode(tokenizer, tokens), stops) is None:
        return None
    for t in range(prev + 1, len(tokens) + 1):
        text = _decode(tokenizer, tokens[:t])
        at = _first_stop(text, stops)
        if at is not None:
            return tokens[:t], text[:at]
    raise AssertionError("unreachable: the full text has a stop string")  # pragma: no cover


def _run_batch(decoder, params, batch, config: GenerationConfig, views: int, tokenizer) -> list[Completion]:
    n = len(batch)
    B = batch_bucket(n, config.batch_size)
    P = length_bucket(max(max(len(v) for v in r[2]) for r in batch), config)
    n_chunks = -(-(config.max_new_tokens - 1) // config.chunk)
    ids, mask, row_ids = _pad_batch(batch, B, P, views, config.pad_token_id)
    state, keys = _prefill(decoder, params, ids, mask, row_ids, np.uint32(config.seed),
                           max_len=P + n_chunks * config.chunk, sampling=config.sampling)
    rows = [_RowState() for _ in range(n)]
    new = np.asarray(state[0])[:, None]
    for c in range(n_chunks + 1):
        for r, row in enumerate(rows):
            if row.done is None:
                _advance(row, new[r], config, tokenizer)
        if c == n_chunks or all(row.done is not None for row in rows):
            break
        state, toks = _decode_chunk(decoder, params, state, keys, chunk=config.chunk, sampling=config.sampling)
        new = np.asarray(toks)
    return [row.done for row in rows]


# -- measuring compiles --------------------------------------------------------------------------------
@contextlib.contextmanager
def count_compiles() -> Iterator[list]:
    """``with count_compiles() as c: ...``; afterwards ``len(c)`` is the number of XLA backend compiles
    in the block (in-memory jit cache hits do not count; a persistent-cache hit does not either)."""
    events: list = []

    def listener(name, duration, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
