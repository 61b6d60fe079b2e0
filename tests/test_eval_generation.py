"""The generation engine (fusion_jax.eval.generation) against references: transformers ``generate`` and
the full-forward argmax path for greedy decoding (plain and fused), a float64 NumPy filtered softmax (chi-square) for sampling; stop strings, EOS, several samples,
chat templates and the number of compiles of a many-prompt run."""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax.errors import ConfigError, DataError
from fusion_jax.eval import generation as g
from fusion_jax.models import CausalLM, ModelConfig

torch = pytest.importorskip("torch")
from hf_fixtures import cached_tiny_hf_model, torch_reference  # noqa: E402

EOS = 2


def _prompts(seed, lengths, vocab=160):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, size=n)] for n in lengths]


def _hf_generate(hf, prompts, n):
    """transformers greedy generate on one left-padded batch; rows cut at their first EOS."""
    P = max(map(len, prompts))
    ids = np.zeros((len(prompts), P), np.int64)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, P - len(p):] = p
        mask[b, P - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=n,
                          do_sample=False, pad_token_id=0, eos_token_id=EOS).numpy()[:, P:]
    rows = []
    for r in out:
        r = list(map(int, r))
        rows.append(r[:r.index(EOS)] if EOS in r else r)
    return rows


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from fusion_jax.hf import load_model
    path = cached_tiny_hf_model(tmp_path_factory, "llama")
    return torch_reference(path), load_model(path), None


@pytest.fixture(scope="module")
def llama_tok(tmp_path_factory):
    """A tiny llama whose vocabulary holds its byte-level BPE tokenizer's ids (259 bytes + merges)."""
    from fusion_jax.hf import load_model
    from transformers import AutoTokenizer
    path = cached_tiny_hf_model(tmp_path_factory, "llama", tokenizer=True, vocab_size=320)
    return None, load_model(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_equals_transformers_generate(arch, tmp_path_factory, llama):
    """The engine's own parts (buckets, left padding, chunks, host loop) on top of the model's cache path,
    which tests/test_models_parity.py checks against transformers for every architecture."""
    from fusion_jax.hf import load_model
    if arch == "llama":
        hf, model, _ = llama
    else:  # mistral: sliding window 8 < the prompts, with more left padding than transformers had
        path = cached_tiny_hf_model(tmp_path_factory, arch)
        hf, model = torch_reference(path), load_model(path)
    prompts = _prompts(1, [5, 13, 9, 3])
    N = 12
    ref = _hf_generate(hf, prompts, N)
    dec, params = g.causal_lm_decoder(model)
    # prompts land in the 16 bucket (more left padding than transformers had); chunk 5 ends mid-row
    cfg = g.GenerationConfig(max_new_tokens=N, eos_token_ids=(EOS,), batch_size=4, chunk=5)
    out = g.generate(dec, params, prompts, cfg)
    assert [o[0].tokens for o in out] == ref
    for o, r in zip(out, ref):
        assert o[0].finish_reason == ("length" if len(r) == N else "eos")


@functools.partial(jax.jit, static_argnames="graphdef")
def _last_argmax(graphdef, state, ids, mask):
    return jnp.argmax(nnx.merge(graphdef, state)(ids, attention_mask=mask).logits[:, -1], axis=-1)


def test_greedy_equals_the_full_forward_argmax_path(llama):
    """No cache at all: each token is the argmax of a full forward over prompt + tokens so far."""
    _, model, _ = llama
    prompts, N = _prompts(2, [4, 11, 1, 16]), 12
    T = max(map(len, prompts)) + N
    graphdef, state = nnx.split(model)
    seqs = [list(p) for p in prompts]
    for _ in range(N):
        ids = np.zeros((len(seqs), T), np.int32)
        mask = np.zeros_like(ids)
        for b, s in enumerate(seqs):
            ids[b, T - len(s):], mask[b, T - len(s):] = s, 1
        nxt = np.asarray(_last_argmax(graphdef, state, ids, mask))
        for s, t in zip(seqs, nxt):
            s.append(int(t))
    dec, params = g.causal_lm_decoder(model)
    # the same shapes as the transformers test above: its compiled programs are reused
    out = g.generate(dec, params, prompts, g.GenerationConfig(max_new_tokens=N, batch_size=4, chunk=5))
    assert [o[0].tokens for o in out] == [s[len(p):] for s, p in zip(seqs, prompts)]


# sampled (a random model's greedy text is one repeated token); the tests on the tokenizer model share
# these shapes, so they share two compiled programs
HOT = g.GenerationConfig(max_new_tokens=16, batch_size=2, chunk=3, length_buckets=(64,),
                         sampling=g.SamplingConfig(temperature=1.5))


def test_stop_strings_spanning_tokens_and_chunks(llama_tok):
    _, model, tok = llama_tok
    dec, params = g.causal_lm_decoder(model)
    prompts = [tok("the quick brown")["input_ids"], tok("def add(a, b)")["input_ids"]]
    free = g.generate(dec, params, prompts, HOT, tokenizer=tok)
    toks = free[0][0].tokens
    pieces = [tok.decode(toks[:t], skip_special_tokens=True) for t in range(len(toks) + 1)]
    # a stop string from the start of token 2's text to one character into token 5's: it spans four
    # tokens and the chunk boundary (the first chunk holds the prefill token and tokens 1..3)
    stop = pieces[-1][len(pieces[2]):len(pieces[5]) + 1]
    assert len(stop) > 1
    at = pieces[-1].find(stop)
    out = g.generate(dec, params, prompts, dataclasses.replace(HOT, stop=(stop, "\x00never")), tokenizer=tok)
    c = out[0][0]
    assert c.finish_reason == "stop" and c.text == pieces[-1][:at]
    # tokens end with the one that completes the stop string, no later
    assert stop in tok.decode(c.tokens) and stop not in tok.decode(c.tokens[:-1])
    assert c.tokens == toks[:len(c.tokens)]
    # the other row, without that string, is untouched
    other = free[1][0]
    if stop not in other.text:
        assert out[1][0].tokens == other.tokens and out[1][0].finish_reason == "length"


def test_several_samples_are_distinct_reproducible_and_batch_independent(llama_tok):
    _, model, _ = llama_tok
    dec, params = g.causal_lm_decoder(model)
    prompts = _prompts(3, [6, 2, 9], vocab=320)
    cfg = dataclasses.replace(HOT, num_samples=4, seed=7)
    a = g.generate(dec, params, prompts, cfg)
    assert [len(x) for x in a] == [4, 4, 4]
    for per_prompt in a:
        assert len({tuple(c.tokens) for c in per_prompt}) > 1      # distinct keys -> distinct samples
    b = g.generate(dec, params, prompts, cfg)
    assert [[c.tokens for c in x] for x in a] == [[c.tokens for c in x] for x in b]
    # other batch size, length ladder and chunk (other padding, batch rows, programs): the same samples
    other = g.GenerationConfig(**{**vars(cfg), "batch_size": 4, "length_buckets": (12, 40), "chunk": 4})
    c = g.generate(dec, params, prompts, other)
    assert [[s.tokens for s in x] for x in a] == [[s.tokens for s in x] for x in c]
    d = g.generate(dec, params, prompts, g.GenerationConfig(**{**vars(cfg), "seed": 8}))
    assert [[c.tokens for c in x] for x in a] != [[c.tokens for c in x] for x in d]


def _ref_probs(logits, T, k, p):
    """float64 NumPy reference of temperature -> top-k -> top-p (transformers' warper order)."""
    x = np.asarray(logits, np.float64) / T
    if k:
        x = np.where(x < np.sort(x)[::-1][k - 1], -np.inf, x)
    if p < 1:
        q = np.exp(x - x.max())
        q /= q.sum()
        order = np.argsort(-x, kind="stable")
        before = np.cumsum(q[order]) - q[order]
        keep = np.zeros(len(x), bool)
        keep[order[before < p]] = True
        x = np.where(keep, x, -np.inf)
    q = np.exp(x - x.max())
    return q / q.sum()


@pytest.mark.parametrize("T,k,p", [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.3, 0, 0.8), (0.9, 6, 0.7)])
def test_sampling_matches_the_filtered_softmax(T, k, p):
    from scipy.stats import chisquare
    V, N = 12, 20000
    logits = np.random.default_rng(0).normal(0, 1.5, V).astype(np.float32)
    sampling = g.SamplingConfig(temperature=T, top_k=k, top_p=p)
    keys = jax.random.split(jax.random.key(11), N)
    draw = jax.jit(lambda ks: g.sample_tokens(jnp.broadcast_to(logits, (N, V)), ks, sampling))
    toks = np.asarray(draw(keys))
    np.testing.assert_array_equal(toks, np.asarray(draw(keys)))            # a fixed key: reproducible
    counts = np.bincount(toks, minlength=V)
    ref = _ref_probs(logits, T, k, p)
    assert counts[ref == 0].sum() == 0                                     # filtered tokens never drawn
    sup = ref > 0
    assert 0 < sup.sum() < V or (k == 0 and p == 1.0)
    stat = chisquare(counts[sup], N * ref[sup])
    assert stat.pvalue > 1e-3, stat
    # the test has power: the unfiltered / unscaled softmax is rejected
    plain = _ref_probs(logits, 1.0, 0, 1.0)
    assert chisquare(counts, N * plain).pvalue < 1e-6


def test_greedy_is_argmax_and_config_errors():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 9)), jnp.float32)
    keys = jax.random.split(jax.random.key(0), 3)
    np.testing.assert_array_equal(g.sample_tokens(logits, keys, g.SamplingConfig()), np.argmax(logits, -1))
    # top_k = 1 is greedy too, at any temperature
    np.testing.assert_array_equal(g.sample_tokens(logits, keys, g.SamplingConfig(2.0, top_k=1)),
                                  np.argmax(logits, -1))
    for bad in (dict(temperature=-1), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ConfigError):
            g.SamplingConfig(**bad)
    with pytest.raises(ConfigError, match="stop"):
        g.GenerationConfig(stop="###")
    with pytest.raises(ConfigError, match="length_buckets"):
        g.GenerationConfig(length_buckets=(64, 32))
    assert g.length_bucket(17, g.GenerationConfig()) == 32 and g.batch_bucket(5, 16) == 8
    with pytest.raises(DataError, match="largest length bucket"):
        g.length_bucket(65, g.GenerationConfig(length_buckets=(32, 64)))


def test_chat_template_prompts(llama_tok):
    _, model, tok = llama_tok
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    conv = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "add 2 and 2"}]
    ids = g.encode(tok, ["the fox", conv], "chat")
    for i, msgs in zip(ids, [[{"role": "user", "content": "the fox"}], conv]):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert i == tok(text, add_special_tokens=False)["input_ids"]
    assert g.encode(tok, ["the fox"]) == [tok("the fox")["input_ids"]]
    with pytest.raises(DataError, match="chat template"):
        g.encode(tok, [conv])
    dec, params = g.causal_lm_decoder(model)
    via_text = g.generate_text(dec, params, tok, ["the fox", conv], HOT, template="chat")
    assert [c[0].tokens for c in via_text] == [c[0].tokens for c in g.generate(dec, params, ids, HOT)]
    assert via_text[0][0].text == tok.decode(via_text[0][0].tokens, skip_special_tokens=True)


def _count_many_prompt_compiles(batch_size, **kw):
    """1000 prompts of 1..300 tokens through a tiny model: the number of XLA compiles, and the number
    expected (2 programs per (batch bucket, length bucket) that occurs: prefill and decode chunk)."""
    cfg_m = ModelConfig(architecture="LlamaForCausalLM", vocab_size=37, hidden_size=16, intermediate_size=16,
                        num_layers=1, num_heads=2, num_kv_heads=1, head_dim=8)   # a graph no other test compiles
    dec, params = g.causal_lm_decoder(CausalLM(cfg_m, rngs=nnx.Rngs(0)))
    lengths = np.random.default_rng(0).integers(1, 301, size=1000)
    prompts = _prompts(4, lengths, vocab=37)
    cfg = g.GenerationConfig(max_new_tokens=3, batch_size=batch_size, chunk=2, eos_token_ids=(EOS,), **kw)
    with g.count_compiles() as compiles:
        out = g.generate(dec, params, prompts, cfg)
    assert len(out) == 1000 and all(len(o[0].tokens) <= 3 for o in out)
    srt = sorted(lengths, reverse=True)
    shapes = {(g.batch_bucket(len(srt[i:i + batch_size]), batch_size), g.length_bucket(max(srt[i:i + batch_size]), cfg))
              for i in range(0, 1000, batch_size)}
    return len(compiles), 2 * len(shapes)


def test_compiles_for_many_mixed_prompts():
    # a coarse ladder keeps the suite fast: 2 length buckets, one batch shape (the 40-row remainder
    # pads to 64) -> 4 programs for 1000 prompts
    assert _count_many_prompt_compiles(64, length_buckets=(64, 320)) == (4, 4)


@pytest.mark.slow
def test_compiles_for_many_mixed_prompts_default_ladder():
    # the figure in the module docstring: ladder 16..512 (6 buckets) at batch 32, the 8-row remainder
    # at batch bucket 8 in the 16 bucket -> 7 shapes, 14 compiles
    assert _count_many_prompt_compiles(32) == (14, 14)


def test_fused_decoder_equals_the_full_forward_path():
    from fusion_jax.ultrafuser.decoding import fused_decoder
    from fusion_jax.ultrafuser.gate import GateConfig, init_gate
    from fusion_jax.ultrafuser.model import FusedModel
    cfg_m = ModelConfig(architecture="LlamaForCausalLM", vocab_size=61, hidden_size=16, intermediate_size=32,
                        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8)
    models = [CausalLM(cfg_m, rngs=nnx.Rngs(i)) for i in range(3)]
    gate = init_gate(jax.random.key(3), GateConfig(input_size=16, hidden_size=8, num_experts=3))
    gate["w2"] = jax.random.normal(jax.random.key(4), (8,))     # a real mixture, not uniform weights
    fm = FusedModel.from_models(models, ["a", "b", "c"], gate=gate)
    # K views of different lengths per prompt, as K templates give
    views = [_prompts(10 + i, [4 + i, 7, 2 + 2 * i], vocab=61) for i in range(2)]
    N, T = 9, 16 + 9

    def left_pad(seqs, width):   # [B][K] lists -> ids/mask [K, B, width]
        ids = np.zeros((3, len(seqs), width), np.int32)
        mask = np.zeros_like(ids)
        for i, vs in enumerate(seqs):
            for k, v in enumerate(vs):
                ids[k, i, width - len(v):], mask[k, i, width - len(v):] = v, 1
        return ids, mask

    dec, params = fused_decoder(fm)
    out = [o[0].tokens for o in g.generate(dec, params, views, g.GenerationConfig(max_new_tokens=N, batch_size=2,
                                                                                 chunk=4))]
    # no cache at all: each token is the argmax of the full fused forward over every view + tokens so far
    step = jax.jit(lambda ids, mask: jnp.argmax(fm.logits(fm.params, fm.gate, ids, mask)[0][:, -1], axis=-1))
    seqs = [[list(v) for v in vs] for vs in views]
    for _ in range(N):
        nxt = np.asarray(step(*left_pad(seqs, T)))
        for vs, t in zip(seqs, nxt):
            for v in vs:
                v.append(int(t))
    assert out == [vs[0][len(views[i][0]):] for i, vs in enumerate(seqs)]
    with pytest.raises(DataError, match="3 views"):
        g.generate(dec, params, [views[0][:2]], g.GenerationConfig())
