"""The mixture-of-experts FFN block of the decoder zoo: routers, drop-free dispatch, expert parallelism.

Every decoder family in ``llama.py`` swaps its dense FFN for this block when ``config.num_experts > 0``.
Params of one layer (stacked ``[L, ...]`` like the rest of the decoder; see ``hf/mapping.py``)::

    experts/{gate,up,down}_proj/kernel   [E, D, F], [E, D, F], [E, F, D]   logical (expert, embed, mlp)
    router/kernel                        [D, E]           router="softmax" (Mixtral, Qwen2-MoE)
    router/w1, router/w2                 [D, E-1], [E-1, E-1]   router="xft"
    router/noise                         [D, E-1]         router="xft" with router_noise
    shared_expert/{gate,up,down}_proj/kernel, shared_expert_gate/kernel [D, 1]   Qwen2-MoE's shared expert

Routers (``route``), for tokens ``x`` (the post-attention RMSNorm output, padding tokens included):

* ``softmax`` (Mixtral, Qwen2-MoE): p = softmax(x W) in float32, the top-k experts, weights p_(1..k)
  (renormalised to sum to 1 when ``norm_topk_prob``). Qwen2-MoE adds ``sigmoid(x w_g) * shared(x)``.
* ``xft`` (ise-uiuc/xft, TopKUniversalBalancedNoisyGate): expert 0 is shared and always on; logits =
  W2 tanh(W1 x) over the other E-1; in training (a key is given and ``router_noise``) logits += eps *
  (softplus(x W_noise) + noise_eps), eps ~ N(0, 1) per token and expert, and the noisy logits drive both
  the choice and the weights. p = softmax(logits) (float32), top-k p_(1) >= ... >= p_(k); routed weights
  p_(1) * softmax(p_(1..k)) (a softmax over PROBABILITIES, as the reference), shared weight 1 - p_(1).

Both give weights that sum to 1 per token, so a freshly upcycled MoE (identical experts) computes exactly
its dense model's function.

Balance loss (every router), per layer: ``coef * (cv^2(importance) + cv^2(load))`` over the routed
experts, cv^2(v) = var(v, ddof=1) / (mean(v)^2 + 1e-10); importance = per-expert sum of the raw top-k
probabilities; load = the hard selection counts, or in noisy training XFT's smooth estimate (Shazeer et
al.'s Normal-CDF load with the reference's quirk: ``is_in`` compares the NOISE TERM alone, not the noisy
logit, with the threshold). Statistics run over all tokens of the (global) batch, so the value does not
depend on the device count (the reference computes it per device and micro-batch).

Dispatch (``grouped_ffn``) never builds a [tokens, experts, capacity] one-hot and drops no token (no
capacity limit, as XFT's UniversalCalculator): the N*A (token, expert) assignments are sorted by expert,
each expert's group is padded to a multiple of a block of rows, the tokens are gathered into that padded
order, and each block runs its expert's whole FFN (``_ffn_blocks``: one scan over the blocks that skips
the padding blocks; its backward is one more scan, written out so that the weight gradients accumulate in
place in their expert's slot), then outputs are scaled by their weights and scatter-added to their tokens. Memory
is O(N*A*(D+F)), compute that of the chosen experts plus at most one block of padding per expert. On GPU /
TPU ``jax.lax.ragged_dot`` (native grouped GEMM) replaces the block scan; on CPU ragged_dot's fallback
expands to a dense [E, rows, D] product, which is exactly what we avoid.

Expert parallelism: when a mesh with an ``expert`` axis is set (``jax.set_mesh(mesh)`` around the jitted
call) the expert matmuls run under ``shard_map``: experts are split over ``expert`` (their F dim over
``tensor``), tokens over (data, fsdp, expert); each device all-gathers its expert group's tokens, runs its
own experts on the assignments that are theirs, and a reduce-scatter returns each token's sum. (XFT sends
every token to k+1 of E experts, so one all-gather + reduce-scatter of [N, D] moves less than the
all-to-all of [N*(k+1), D] of a capacity-based dispatch.) Routing and the balance loss stay outside, on
the global batch. Without a mesh the same code runs on one device (or under plain GSPMD).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from fusion_jax.models.config import ModelConfig

#: rows per block of the CPU grouped matmul (each expert's group is padded to a multiple of it)
BLOCK_ROWS = 128
_TOKEN_AXES = ("data", "fsdp", "expert")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoEAux:
    """Router outputs of a forward pass through an MoE model (``ModelOutput.aux``).

    balance_loss: []        float32, the balance loss summed over layers (coefficient applied): add it
                            to the training loss as the reference does
    layer_balance: [L]      float32, each layer's term
    expert_load:   [L, n]   float32, fraction of tokens that chose each ROUTED expert (n = E-1 for XFT,
                            whose shared expert 0 every token uses; each row sums to num_experts_per_tok)
    noise_agreement: [L]    float32, noisy gating (training): the share of a token's chosen experts that
                            its clean logits would also choose (k/n when the noise drowns the router, 1
                            when it does not matter); 1 without noise
    """

    balance_loss: jax.Array
    layer_balance: jax.Array
    expert_load: jax.Array
    noise_agreement: jax.Array


@dataclasses.dataclass
class Routing:
    """One layer's routing of N tokens: A assignments per token into the expert stack."""

    experts: jax.Array      # [N, A] int32, index into the stacked experts
    weights: jax.Array      # [N, A] float32
    balance: jax.Array      # [] float32 (coefficient applied)
    load: jax.Array         # [n] float32 fraction of tokens per routed expert
    agreement: jax.Array    # [] float32 share of the noisy choices the clean logits make too (1: no noise)


# -- routing ---------------------------------------------------------------------------------------
def _cv_squared(v: jax.Array) -> jax.Array:
    """var(v, ddof=1) / (mean(v)^2 + 1e-10), as torch's unbiased ``.var()`` in the reference; 0 for n=1."""
    if v.shape[-1] < 2:
        return jnp.zeros((), jnp.float32)
    return jnp.var(v, ddof=1) / (jnp.mean(v) ** 2 + 1e-10)


def _smooth_load(clean, noisy, noise_term, sigma, k: int) -> jax.Array:
    """XFT's differentiable load estimate (k < n): for each token and expert, the probability under the
    noise that the expert stays in the top k, Phi((clean - threshold) / sigma), with threshold the
    (k+1)-th largest noisy logit if the expert is "in", else the k-th. The reference decides "in" by
    comparing the noise term alone (not the noisy logit) with the threshold; kept as it is."""
    top = jax.lax.top_k(noisy, k + 1)[0]
    t_in, t_out = top[:, k:k + 1], top[:, k - 1:k]
    is_in = noise_term > t_in
    prob = jnp.where(is_in, jax.scipy.stats.norm.cdf((clean - t_in) / sigma),
                     jax.scipy.stats.norm.cdf((clean - t_out) / sigma))
    return prob.sum(0)


def route(c: ModelConfig, p: dict, x: jax.Array, key: jax.Array | None) -> Routing:
    """Route tokens ``x`` [N, D] (compute dtype). ``key``: noise for XFT's noisy gating (training);
    None = evaluation (clean logits)."""
    k, n = c.num_experts_per_tok, c.num_routed_experts
    r = p["router"]
    f32 = jnp.float32
    noisy_training = noisy = False
    if c.router == "xft":
        clean = jnp.tanh(x @ r["w1"].astype(x.dtype)) @ r["w2"].astype(x.dtype)
        clean = clean.astype(f32)
        logits = clean
        if key is not None and c.router_noise:
            sigma = jax.nn.softplus((x @ r["noise"].astype(x.dtype)).astype(f32)) + c.router_noise_eps
            noise_term = jax.random.normal(key, clean.shape, f32) * sigma
            logits = clean + noise_term
            noisy, noisy_training = True, k < n
    else:
        logits = (x @ r["kernel"].astype(x.dtype)).astype(f32)
    probs = jax.nn.softmax(logits, axis=-1)
    top_p, top_i = jax.lax.top_k(probs, k)
    N = x.shape[0]
    if c.router == "xft":
        p1 = top_p[:, :1]
        routed_w = p1 * jax.nn.softmax(top_p, axis=-1)
        experts = jnp.concatenate([jnp.zeros((N, 1), jnp.int32), top_i.astype(jnp.int32) + 1], axis=1)
        weights = jnp.concatenate([1.0 - p1, routed_w], axis=1)
    else:
        experts = top_i.astype(jnp.int32)
        weights = top_p / top_p.sum(-1, keepdims=True) if c.norm_topk_prob else top_p
    counts = jnp.zeros((n,), f32).at[top_i.reshape(-1)].add(1.0)
    importance = jnp.zeros((n,), f32).at[top_i.reshape(-1)].add(top_p.reshape(-1))
    if noisy_training:
        load = _smooth_load(clean, logits, noise_term, sigma, k)
    else:
        load = counts
    balance = c.balance_loss_coef * (_cv_squared(importance) + _cv_squared(load))
    agreement = jnp.ones((), f32)
    if noisy:   # a diagnostic (no gradient): does the learned router or the noise choose the experts?
        clean_i = jax.lax.top_k(jax.lax.stop_gradient(clean), k)[1]
        agreement = (top_i[:, :, None] == clean_i[:, None, :]).any(-1).astype(f32).mean()
    return Routing(experts=experts, weights=weights, balance=balance, load=counts / N, agreement=agreement)


# -- the experts' FFN over padded expert blocks (CPU) --------------------------------------------------
def _zeros_like_block(x, width):
    return jnp.zeros((x.shape[0], width), x.dtype)


def _ffn_blocks_scan(act, xb, wg, wu, wd, block_expert, active):
    """For each active block j (rows of one expert e = block_expert[j]): y = (act(x Wg[e]) * x Wu[e]) Wd[e];
    skipped (zeros) for the padding blocks. Returns y and the pre-activations g, u (the backward's)."""
    F, D = wd.shape[1], wd.shape[2]

    def body(_, inp):
        x, e, a = inp

        def run():
            g, u = x @ wg[e], x @ wu[e]
            return (act(g) * u) @ wd[e], g, u

        def skip():
            return _zeros_like_block(x, D), _zeros_like_block(x, F), _zeros_like_block(x, F)
        return None, jax.lax.cond(a, run, skip)

    return jax.lax.scan(body, None, (xb, block_expert, active))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ffn_blocks(act, xb, wg, wu, wd, block_expert, active):
    return _ffn_blocks_scan(act, xb, wg, wu, wd, block_expert, active)[0]


def _ffn_blocks_fwd(act, xb, wg, wu, wd, block_expert, active):
    y, g, u = _ffn_blocks_scan(act, xb, wg, wu, wd, block_expert, active)
    return y, (xb, wg, wu, wd, block_expert, active, g, u)


def _ffn_blocks_bwd(act, res, dy):
    """One scan over the blocks: each block's input and weight gradients, the weight gradients summed
    in place into their expert's slot (at least float32), padding blocks skipped."""
    xb, wg, wu, wd, block_expert, active, g, u = res
    acc = jnp.promote_types(wg.dtype, jnp.float32)
    mm = functools.partial(jnp.einsum, preferred_element_type=acc)

    def body(dws, inp):
        x, gb, ub, dyb, e, a = inp

        def run(dws):
            dwg, dwu, dwd = dws
            h, h_vjp = jax.vjp(lambda g_, u_: act(g_) * u_, gb, ub)
            dh = jnp.einsum("bd,fd->bf", dyb, wd[e])
            dg, du = h_vjp(dh)
            dx = jnp.einsum("bf,df->bd", dg, wg[e]) + jnp.einsum("bf,df->bd", du, wu[e])
            return (dwg.at[e].add(mm("bd,bf->df", x, dg)), dwu.at[e].add(mm("bd,bf->df", x, du)),
                    dwd.at[e].add(mm("bf,bd->fd", h, dyb))), dx

        def skip(dws):
            return dws, jnp.zeros_like(x)
        return jax.lax.cond(a, run, skip, dws)

    zeros = tuple(jnp.zeros(w.shape, acc) for w in (wg, wu, wd))
    (dwg, dwu, dwd), dx = jax.lax.scan(body, zeros, (xb, g, u, dy, block_expert, active))
    float0 = lambda a: np.zeros(a.shape, jax.dtypes.float0)  # noqa: E731 - integer / bool inputs
    return (dx, dwg.astype(wg.dtype), dwu.astype(wu.dtype), dwd.astype(wd.dtype), float0(block_expert),
            float0(active))


_ffn_blocks.defvjp(_ffn_blocks_fwd, _ffn_blocks_bwd)


@dataclasses.dataclass
class _Plan:
    """Where each assignment goes in the padded, expert-sorted row layout."""

    row_token: jax.Array     # [P] token of each padded row (N = padding)
    row_weight: jax.Array    # [P] its routing weight (0 for padding)
    group_sizes: jax.Array   # [G] padded rows per expert (sum <= P)
    block_expert: jax.Array  # [P // b] expert of each block (clipped)
    active: jax.Array        # [P // b] block holds rows
    block: int


def _plan(experts: jax.Array, weights: jax.Array, num_groups: int, block: int) -> _Plan:
    """Sort the [N, A] assignments by expert; ``experts`` values >= ``num_groups`` are not ours (dropped)."""
    N, A = experts.shape
    M = N * A
    G = num_groups
    # a block no taller than the average group (rounded up to 8 rows) keeps small batches from paying
    # for big, mostly empty blocks
    avg = -(-M // G)
    b = int(min(block, max(8, (avg + 7) // 8 * 8)))
    P_rows = -(-(M + G * (b - 1)) // b) * b          # every group padded to b rows still fits
    flat = jnp.minimum(experts.reshape(M), G)         # G = "not on this device"
    sizes = jnp.zeros((G + 1,), jnp.int32).at[flat].add(1)
    padded = (sizes[:G] + b - 1) // b * b
    pend = jnp.cumsum(padded)
    pstart = jnp.concatenate([jnp.zeros((1,), jnp.int32), pend[:-1]])
    ustart = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(sizes)[:-1]])
    order = jnp.argsort(flat, stable=True)
    sorted_e = flat[order]
    rank = jnp.arange(M, dtype=jnp.int32) - ustart[sorted_e]
    dest = jnp.where(sorted_e < G, jnp.concatenate([pstart, jnp.zeros((1,), jnp.int32)])[sorted_e] + rank,
                     P_rows)
    row_src = jnp.full((P_rows,), M, jnp.int32).at[dest].set(order.astype(jnp.int32), mode="drop")
    row_token = jnp.where(row_src < M, row_src // A, N)
    w_ext = jnp.concatenate([weights.reshape(M), jnp.zeros((1,), weights.dtype)])
    row_weight = w_ext[row_src]
    starts = jnp.arange(P_rows // b, dtype=jnp.int32) * b
    block_expert = jnp.searchsorted(pend, starts, side="right").astype(jnp.int32)
    active = block_expert < G
    return _Plan(row_token, row_weight, padded, jnp.minimum(block_expert, G - 1), active, b)


def default_impl() -> str:
    """``ragged_dot`` where XLA has a grouped GEMM (GPU, TPU), else the block scan."""
    return "ragged_dot" if jax.default_backend() in ("gpu", "tpu") else "blocks"


def grouped_ffn(x, experts, weights, wg, wu, wd, act: Callable, *, block: int = BLOCK_ROWS,
                impl: str | None = None) -> jax.Array:
    """``y[t] = sum_a weights[t, a] * FFN_{experts[t, a]}(x[t])`` without a dense one-hot and without
    dropping any assignment. x [N, D]; experts, weights [N, A] (an expert index >= G = wg.shape[0] is
    skipped: another device's expert); wg, wu [G, D, F], wd [G, F, D]. FFN(x) = down(act(gate x) * up x)."""
    impl = impl or default_impl()
    x, experts, weights, wg, wu, wd = map(jnp.asarray, (x, experts, weights, wg, wu, wd))
    N, D = x.shape
    plan = _plan(experts, weights, wg.shape[0], block)
    xs = jnp.take(x, plan.row_token, axis=0, mode="fill", fill_value=0)
    if impl == "ragged_dot":
        h = act(jax.lax.ragged_dot(xs, wg, plan.group_sizes)) * jax.lax.ragged_dot(xs, wu, plan.group_sizes)
        ys = jax.lax.ragged_dot(h, wd, plan.group_sizes)
    else:
        nb = xs.shape[0] // plan.block
        ys = _ffn_blocks(act, xs.reshape(nb, plan.block, D), wg, wu, wd, plan.block_expert, plan.active)
        ys = ys.reshape(xs.shape[0], D)
    ys = ys * plan.row_weight[:, None].astype(x.dtype)
    return jnp.zeros((N, D), x.dtype).at[plan.row_token].add(ys, mode="drop")


# -- expert parallelism ------------------------------------------------------------------------------
def _context_mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty or math.prod(mesh.shape.values()) == 1 else mesh


def expert_ffn(c: ModelConfig, pe: dict, x: jax.Array, experts: jax.Array, weights: jax.Array,
               act: Callable, impl: str | None = None) -> jax.Array:
    """The routed experts' output for tokens ``x`` [N, D]; expert-parallel under a context mesh."""
    wg, wu, wd = (pe[k]["kernel"].astype(x.dtype) for k in ("gate_proj", "up_proj", "down_proj"))
    mesh = _context_mesh()
    if mesh is None:
        return grouped_ffn(x, experts, weights, wg, wu, wd, act, impl=impl)
    size = dict(mesh.shape)
    N = x.shape[0]
    tok = [a for a in _TOKEN_AXES if size.get(a, 1) > 1]
    while tok and N % math.prod(size[a] for a in tok):
        tok.pop()
    ep = "expert" if size.get("expert", 1) > 1 and c.num_experts % size["expert"] == 0 else None
    tp = "tensor" if size.get("tensor", 1) > 1 and wg.shape[2] % size["tensor"] == 0 else None
    gather = ep is not None and ep in tok
    tok_spec = P(tuple(tok) if tok else None)
    local_experts = c.num_experts // size[ep] if ep else c.num_experts

    def local(x, experts, weights, wg, wu, wd):
        if gather:  # this device's expert group sees all tokens of its (data, fsdp) slice
            x, experts, weights = (jax.lax.all_gather(a, ep, axis=0, tiled=True) for a in (x, experts, weights))
        if ep:
            experts = experts - jax.lax.axis_index(ep) * local_experts
            experts = jnp.where((experts >= 0) & (experts < local_experts), experts, local_experts)
        y = grouped_ffn(x, experts, weights, wg, wu, wd, act, impl=impl)
        if tp:
            y = jax.lax.psum(y, tp)
        if gather:
            y = jax.lax.psum_scatter(y, ep, scatter_dimension=0, tiled=True)
        elif ep:
            y = jax.lax.psum(y, ep)
        return y

    w_spec, d_spec = P(ep, None, tp), P(ep, tp, None)
    return jax.shard_map(local, mesh=mesh, in_specs=(tok_spec, tok_spec, tok_spec, w_spec, w_spec, d_spec),
                         out_specs=tok_spec, check_vma=False)(x, experts, weights, wg, wu, wd)


# -- the block -------------------------------------------------------------------------------------
def moe_ffn(c: ModelConfig, p: dict, h: jax.Array, act: Callable, key: jax.Array | None = None,
            impl: str | None = None) -> tuple[jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """The MoE FFN of one layer: ``h`` [B, S, D] -> (y [B, S, D], (balance [], load [n], agreement []))."""
    B, S, D = h.shape
    x = h.reshape(B * S, D)
    r = route(c, p, x, key)
    y = expert_ffn(c, p["experts"], x, r.experts, r.weights, act, impl)
    if c.has_shared_expert:  # Qwen2-MoE: a dense shared expert scaled by sigmoid(x . w_g)
        s = p["shared_expert"]
        g = act(x @ s["gate_proj"]["kernel"].astype(x.dtype)) * (x @ s["up_proj"]["kernel"].astype(x.dtype))
        shared = g @ s["down_proj"]["kernel"].astype(x.dtype)
        y = y + jax.nn.sigmoid(x @ p["shared_expert_gate"]["kernel"].astype(x.dtype)) * shared
    return y.reshape(B, S, D), (r.balance, r.load, r.agreement)


def param_init(c: ModelConfig, key: jax.Array, dtype, std: float = 0.02) -> dict[str, Any]:
    """``(value, logical axes)`` per MoE param of all layers, N(0, std) (the reference's initializer)."""
    L, D, E, F, n = c.num_layers, c.hidden_size, c.num_experts, c.expert_intermediate_size, c.num_routed_experts
    keys = iter(jax.random.split(key, 16))

    def normal(shape):
        return (std * jax.random.normal(next(keys), shape, jnp.float32)).astype(dtype)

    ex = ("layers", "expert", "embed", "mlp")
    out: dict[str, Any] = {"experts": {
        "gate_proj": {"kernel": (normal((L, E, D, F)), ex)},
        "up_proj": {"kernel": (normal((L, E, D, F)), ex)},
        "down_proj": {"kernel": (normal((L, E, F, D)), ("layers", "expert", "mlp", "embed"))},
    }}
    if c.router == "xft":
        out["router"] = {"w1": (normal((L, D, n)), ("layers", "embed", None)),
                         "w2": (normal((L, n, n)), ("layers", None, None))}
        if c.router_noise:
            out["router"]["noise"] = (normal((L, D, n)), ("layers", "embed", None))
    else:
        out["router"] = {"kernel": (normal((L, D, n)), ("layers", "embed", None))}
    if c.has_shared_expert:
        Fs = c.shared_expert_intermediate_size
        out["shared_expert"] = {
            "gate_proj": {"kernel": (normal((L, D, Fs)), ("layers", "embed", "mlp"))},
            "up_proj": {"kernel": (normal((L, D, Fs)), ("layers", "embed", "mlp"))},
            "down_proj": {"kernel": (normal((L, Fs, D)), ("layers", "mlp", "embed"))},
        }
        out["shared_expert_gate"] = {"kernel": (normal((L, D, 1)), ("layers", "embed", None))}
    return out
