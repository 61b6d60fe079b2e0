"""Benchmark: the MoE FFN block and a whole MoE train step, fusion-jax against the dense model at equal
active parameters, a dense-one-hot dispatch, and the same upcycled MoE written plainly in PyTorch.

The MoE is XFT's (ise-uiuc/xft): E experts, expert 0 shared and always on, router Linear(D -> E-1) ->
Tanh -> Linear, noisy gating (training), top-k of the other E-1, weights 1 - p_(1) and p_(1) *
softmax(p_(1..k)), balance loss 0.01 (cv^2(importance) + cv^2(load)). Every token runs k+1 experts of
width F, so the dense model of EQUAL ACTIVE PARAMETERS has an FFN of width (k+1) F.

Candidates (the same math; the parent checks that the torch and JAX layers agree on outputs, balance
loss and gradients, with noise off, before timing anything):

* ``fusion-jax``: ``fusion_jax.models.moe.moe_ffn`` (sort by expert, gather, block grouped matmul,
  scatter-add; no capacity, no one-hot), and ``CausalLM`` with it for the train step (AdamW, optax).
* ``dense (k+1)F``: the same JAX code path with a dense FFN of width (k+1) F (the cost floor to reach).
* ``one-hot``: GShard-style dispatch/combine einsums through a [tokens, experts, capacity] one-hot, with
  capacity = tokens so that nothing is dropped (what XFT's no-drop policy costs in that formulation).
* ``PyTorch``: the reference's routing and UniversalCalculator (sort tokens by expert, one matmul per
  expert, index_add), plainly in torch; for the train step inside ``transformers.LlamaForCausalLM``
  (sdpa attention), ``torch.optim.AdamW(foreach=True)``.

Each thread setting runs in its own child process that times all candidates alternately (the order
rotates every round) so that they see the same load on a shared machine: 'all' = each framework's
default threads, '1' = one thread each (XLA:CPU without its Eigen pool, ``torch.set_num_threads(1)``):
per-core efficiency, stable under load. Peak memory of the dispatch: XLA's compiled temporary bytes of
the layer's forward + backward (``memory_analysis``), ours against the one-hot formulation, at several
token counts (compile only: nothing runs).

    python bench/moe.py              # prints the table
    python bench/moe.py --write      # also rewrites BENCHMARKS.md's "MoE" section
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import alternate, machine, time_call, write_section  # noqa: E402  (bench/ is this script's directory)

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTION = "## MoE"
sys.path.insert(0, str(ROOT))
ONE_THREAD_ENV = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                  "FJ_BENCH_THREADS": "1"}
PAUSE_S = 0.2


# -- JAX side ----------------------------------------------------------------------------------------
def moe_config(a, layers: int | None = None):
    from fusion_jax.models import ModelConfig
    return ModelConfig(architecture="FusionMoeForCausalLM", base_architecture="LlamaForCausalLM",
                       vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                       num_layers=layers or a.layers, num_heads=a.heads, num_kv_heads=a.heads,
                       head_dim=a.hidden // a.heads, num_experts=a.experts, num_experts_per_tok=a.top_k,
                       router="xft", router_noise=True, rms_norm_eps=1e-5)


def layer_params(a) -> dict:
    """One layer's MoE params (numpy, our layout), N(0, 0.02) router, experts N(0, 0.05)."""
    rng = np.random.default_rng(a.seed)
    D, F, E, n = a.hidden, a.inter, a.experts, a.experts - 1
    f = lambda *s, std=0.05: (std * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    return {"router": {"w1": f(D, n, std=0.02), "w2": f(n, n, std=0.02), "noise": f(D, n, std=0.02)},
            "experts": {"gate_proj": {"kernel": f(E, D, F)}, "up_proj": {"kernel": f(E, D, F)},
                        "down_proj": {"kernel": f(E, F, D)}}}


def jax_layer_fns(a):
    """``{name: (loss(params, x, key) jitted value_and_grad, params)}`` of the layer workloads."""
    import jax
    import jax.numpy as jnp

    from fusion_jax.models import moe
    c = moe_config(a, layers=1)
    p = jax.tree.map(jnp.asarray, layer_params(a))
    D, Fd = a.hidden, (a.top_k + 1) * a.inter

    def ours(p, x, key):
        y, (b, *_) = moe.moe_ffn(c, p, x, jax.nn.silu, key)
        return jnp.mean(y * y) + b

    def onehot(p, x, key):
        return onehot_moe(c, p, x, key)

    rng = np.random.default_rng(a.seed + 1)
    pd = {k: jnp.asarray(0.05 * rng.standard_normal(s), jnp.float32)
          for k, s in (("g", (D, Fd)), ("u", (D, Fd)), ("d", (Fd, D)))}

    def dense(p, x, key):
        y = (jax.nn.silu(x @ p["g"]) * (x @ p["u"])) @ p["d"]
        return jnp.mean(y * y)

    fns = {"fusion-jax": (ours, p), "dense (k+1)F": (dense, pd), "one-hot": (onehot, p)}
    return {k: (jax.jit(jax.value_and_grad(f)), q) for k, (f, q) in fns.items()}, {k: f for k, (f, _) in fns.items()}


def onehot_moe(c, p, x, key):
    """GShard's dispatch: [N, E, C] one-hot dispatch and combine tensors, capacity C = N (no drops)."""
    import jax
    import jax.numpy as jnp

    from fusion_jax.models import moe
    B, S, D = x.shape
    N, E = B * S, c.num_experts
    xx = x.reshape(N, D)
    r = moe.route(c, p, xx, key)
    oh = jax.nn.one_hot(r.experts, E)                                  # [N, A, E]
    slot = (jnp.cumsum(oh.reshape(-1, E), 0).reshape(oh.shape) * oh).sum(-1) - 1    # position in its expert
    dispatch = jnp.einsum("nae,nac->nec", oh, jax.nn.one_hot(slot, N))  # [N, E, C]
    combine = jnp.einsum("nae,nac,na->nec", oh, jax.nn.one_hot(slot, N), r.weights)
    pe = p["experts"]
    xe = jnp.einsum("nec,nd->ecd", dispatch, xx)
    h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xe, pe["gate_proj"]["kernel"])) * \
        jnp.einsum("ecd,edf->ecf", xe, pe["up_proj"]["kernel"])
    y = jnp.einsum("nec,ecd->nd", combine, jnp.einsum("ecf,efd->ecd", h, pe["down_proj"]["kernel"]))
    return jnp.mean(y * y) + r.balance


def jax_train_steps(a):
    """``{name: step()}``: our MoE CausalLM and the dense one at equal active params, AdamW, donated."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from fusion_jax.models import CausalLM
    from fusion_jax.train.losses import next_token_ce
    ids = jnp.asarray(np.random.default_rng(a.seed).integers(0, a.vocab, (a.batch, a.seq)), jnp.int32)
    steps = {}
    for name, cfg in (("fusion-jax", moe_config(a)),
                      ("dense (k+1)F", moe_config(a).dense_config().replace(
                          intermediate_size=(a.top_k + 1) * a.inter))):
        graphdef, params = nnx.split(CausalLM(cfg, rngs=nnx.Rngs(a.seed)), nnx.Param)
        params = nnx.to_pure_dict(params)
        tx = optax.adamw(1e-4)

        def loss_fn(params, key, graphdef=graphdef):
            out = nnx.merge(graphdef, nnx.State(params))(ids, router_key=key)
            ce = next_token_ce(out.logits, ids)[0]
            return ce + (out.aux.balance_loss if out.aux is not None else 0.0)

        @jax.jit
        def step(params, opt, key, tx=tx, loss_fn=loss_fn):
            key, sub = jax.random.split(key)
            loss, g = jax.value_and_grad(loss_fn)(params, sub)
            upd, opt = tx.update(g, opt, params)
            return optax.apply_updates(params, upd), opt, key, loss

        state = [params, tx.init(params), jax.random.key(a.seed)]

        def run(step=step, state=state):
            state[0], state[1], state[2], loss = step(*state)
            jax.block_until_ready(loss)
        steps[name] = run
    return steps


def dispatch_memory(a) -> list[dict]:
    """Compiled temporary bytes of the layer's forward + backward, ours vs the one-hot, per token count."""
    import jax
    import jax.numpy as jnp
    _, raw = jax_layer_fns(a)
    p = jax.tree.map(jnp.asarray, layer_params(a))
    key = jax.random.key(0)
    rows = []
    for n in a.mem_tokens:
        x = jax.ShapeDtypeStruct((1, n, a.hidden), jnp.float32)
        row = {"tokens": n}
        for name in ("fusion-jax", "one-hot", "dense (k+1)F"):
            f = jax.value_and_grad(raw[name])
            q = p if name != "dense (k+1)F" else jax_layer_fns(a)[0][name][1]
            m = jax.jit(f).lower(q, x, key).compile().memory_analysis()
            row[name] = m.temp_size_in_bytes
        rows.append(row)
    return rows


# -- PyTorch side ------------------------------------------------------------------------------------
def torch_moe_class():
    import torch
    import torch.nn.functional as F

    class TorchXFTMoE(torch.nn.Module):
        """The reference's gate (TopKUniversalBalancedNoisyGate) and UniversalCalculator, plainly."""

        def __init__(self, D, Fe, E, k, eps=0.01):
            super().__init__()
            n = E - 1
            self.k, self.E, self.eps = k, E, eps
            self.w1 = torch.nn.Parameter(torch.empty(D, n))
            self.w2 = torch.nn.Parameter(torch.empty(n, n))
            self.noise = torch.nn.Parameter(torch.empty(D, n))
            self.gate = torch.nn.Parameter(torch.empty(E, D, Fe))
            self.up = torch.nn.Parameter(torch.empty(E, D, Fe))
            self.down = torch.nn.Parameter(torch.empty(E, Fe, D))
            self.balance = None

        @staticmethod
        def cv2(v):
            return v.var() / (v.mean() ** 2 + 1e-10)

        def forward(self, x, noise: bool | None = None):
            shape = x.shape
            h = x.reshape(-1, shape[-1])
            k = self.k
            clean = torch.tanh(h @ self.w1) @ self.w2
            noisy = self.training if noise is None else noise
            if noisy:
                sigma = F.softplus(h @ self.noise) + self.eps
                noise_term = torch.randn_like(clean) * sigma
                logits = clean + noise_term
            else:
                logits = clean
            p = torch.softmax(logits.float(), dim=-1)
            top_p, top_i = p.topk(k, dim=-1)
            p1 = top_p[:, :1]
            weights = torch.cat([1 - p1, p1 * torch.softmax(top_p, dim=-1)], dim=1)
            experts = torch.cat([torch.zeros_like(top_i[:, :1]), top_i + 1], dim=1)
            # UniversalCalculator: sort (token, expert) pairs by expert, one matmul per expert, index_add
            flat = experts.reshape(-1)
            order = flat.argsort(stable=True)
            tok = order // (k + 1)
            counts = torch.bincount(flat, minlength=self.E).tolist()
            xs = h[tok]
            outs, start = [], 0
            for e, c in enumerate(counts):
                seg = xs[start:start + c]
                outs.append((F.silu(seg @ self.gate[e]) * (seg @ self.up[e])) @ self.down[e])
                start += c
            y = torch.cat(outs) * weights.reshape(-1)[order, None].to(h.dtype)
            out = torch.zeros_like(h).index_add_(0, tok, y)
            n = self.E - 1
            importance = torch.zeros(n).scatter_add(0, top_i.reshape(-1), top_p.reshape(-1))
            if noisy and k < n:
                top = logits.topk(k + 1, dim=-1).values
                t_in, t_out = top[:, k:k + 1], top[:, k - 1:k]
                normal = torch.distributions.Normal(0.0, 1.0)
                prob = torch.where(noise_term > t_in, normal.cdf((clean - t_in) / sigma),
                                   normal.cdf((clean - t_out) / sigma))
                load = prob.sum(0)
            else:
                load = torch.zeros(n).scatter_add(0, top_i.reshape(-1), torch.ones(top_i.numel()))
            self.balance = 0.01 * (self.cv2(importance) + self.cv2(load))
            return out.reshape(shape)

    return TorchXFTMoE


def torch_layer(a):
    import torch
    torch.manual_seed(a.seed)
    m = torch_moe_class()(a.hidden, a.inter, a.experts, a.top_k)
    p = layer_params(a)
    with torch.no_grad():
        for name, arr in (("w1", p["router"]["w1"]), ("w2", p["router"]["w2"]), ("noise", p["router"]["noise"]),
                          ("gate", p["experts"]["gate_proj"]["kernel"]), ("up", p["experts"]["up_proj"]["kernel"]),
                          ("down", p["experts"]["down_proj"]["kernel"])):
            getattr(m, name).copy_(torch.from_numpy(arr))
    return m


def torch_train_step(a):
    import torch
    import transformers
    torch.manual_seed(a.seed)
    cfg = transformers.LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.inter,
                                   num_hidden_layers=a.layers, num_attention_heads=a.heads,
                                   num_key_value_heads=a.heads, rms_norm_eps=1e-5, max_position_embeddings=a.seq)
    model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
    cls = torch_moe_class()
    for layer in model.model.layers:
        layer.mlp = cls(a.hidden, a.inter, a.experts, a.top_k)
        with torch.no_grad():
            for prm in layer.mlp.parameters():
                prm.normal_(0.0, 0.02)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)
    ids = torch.from_numpy(np.random.default_rng(a.seed).integers(0, a.vocab, (a.batch, a.seq)))

    def step():
        out = model(input_ids=ids, labels=ids)
        loss = out.loss + sum(layer.mlp.balance for layer in model.model.layers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


# -- check ---------------------------------------------------------------------------------------------
def check(a) -> dict:
    """The torch and JAX layers on the same weights and tokens, noise off: output, balance loss and
    gradients must agree to float32 tolerance (else the timings would compare different things)."""
    import jax
    import jax.numpy as jnp
    import torch

    from fusion_jax.models import moe
    c = moe_config(a, layers=1)
    x = np.random.default_rng(a.seed + 7).standard_normal((1, a.check_tokens, a.hidden)).astype(np.float32)
    p = jax.tree.map(jnp.asarray, layer_params(a))

    def f(p, x):
        y, (b, *_) = moe.moe_ffn(c, p, x, jax.nn.silu, None)
        return jnp.mean(y * y) + b, (y, b)
    (loss_j, (y_j, b_j)), g_j = jax.value_and_grad(f, has_aux=True)(p, jnp.asarray(x))
    m = torch_layer(a)
    xt = torch.from_numpy(x)
    y_t = m(xt, noise=False)
    loss_t = (y_t * y_t).mean() + m.balance
    loss_t.backward()
    pairs = {"output": (np.asarray(y_j), y_t.detach().numpy()), "balance": (np.asarray(b_j), m.balance.item()),
             "d gate": (np.asarray(g_j["experts"]["gate_proj"]["kernel"]), m.gate.grad.numpy()),
             "d down": (np.asarray(g_j["experts"]["down_proj"]["kernel"]), m.down.grad.numpy()),
             "d router w1": (np.asarray(g_j["router"]["w1"]), m.w1.grad.numpy())}
    out = {}
    for k, (u, v) in pairs.items():
        err = float(np.max(np.abs(np.asarray(u) - np.asarray(v))) / (np.max(np.abs(v)) + 1e-30))
        out[k] = err
    if max(out.values()) > 1e-4:
        raise SystemExit(f"torch and JAX layers disagree (relative errors {out}): not timing different math")
    return out


# -- children -------------------------------------------------------------------------------------------
def child(a) -> dict:
    import jax
    import torch
    torch.set_num_threads(int(os.environ.get("FJ_BENCH_THREADS", 0)) or os.cpu_count() or 1)
    res = {}
    # layer: forward + backward of the FFN block on N tokens
    x_np = np.random.default_rng(a.seed + 3).standard_normal((1, a.layer_tokens, a.hidden)).astype(np.float32)
    fns, _ = jax_layer_fns(a)
    xj = jax.numpy.asarray(x_np)
    key = jax.random.key(a.seed)
    layer = {name: (lambda f=f, q=q: jax.block_until_ready(f(q, xj, key))) for name, (f, q) in fns.items()
             if name != "one-hot" or not a.skip_onehot}
    tm = torch_layer(a)
    xt = torch.from_numpy(x_np)

    def torch_layer_step():
        tm.zero_grad(set_to_none=True)
        y = tm(xt, noise=True)
        ((y * y).mean() + tm.balance).backward()
    layer["PyTorch"] = torch_layer_step
    res["layer"] = _alternate(layer, a.warmup, a.steps, "layer")
    # whole train step
    steps = jax_train_steps(a)
    steps["PyTorch"] = torch_train_step(a)
    res["step"] = _alternate(steps, a.warmup, a.steps, "step")
    return res


def _alternate(fns: dict, warmup: int, n: int, what: str) -> dict:
    names = list(fns)
    first = {k: time_call(fns[k]) for k in names}       # compile / first call
    for _ in range(warmup - 1):
        for k in names:
            fns[k]()

    def progress(i, times):
        print(f"  {what} round {i + 1}/{n}: " + ", ".join(f"{k} {times[k][-1]:.3f}s" for k in names), flush=True)
    return {"first_s": first, "s": alternate(fns, n, pause_s=PAUSE_S, after_round=progress)}


def run_child(a, argv, env, out: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", str(out)]
    p = subprocess.run(cmd, env={**os.environ, **(env or {})})
    if p.returncode:
        raise SystemExit(f"child failed ({p.returncode})")
    return json.loads(out.read_text())


# -- report -------------------------------------------------------------------------------------------------
def table(a, results: dict, mem: list[dict], errs: dict) -> str:
    med = lambda v: float(np.median(v))  # noqa: E731
    tok_layer, tok_step = a.layer_tokens, a.batch * a.seq
    lines = [SECTION, "",
             f"`python bench/moe.py` — XFT's MoE (E={a.experts} experts, expert 0 shared, top-{a.top_k} of the "
             f"other {a.experts - 1}, noisy gating on, balance loss), d={a.hidden}, expert width F={a.inter}, "
             f"float32. Dense at equal active parameters: one FFN of width (k+1)F = {(a.top_k + 1) * a.inter}. "
             f"Layer: the FFN block's forward + backward on {tok_layer} tokens. Train step: {a.layers} layers, "
             f"{a.heads} heads, vocab {a.vocab}, batch {a.batch} x {a.seq}, AdamW. Candidates timed alternately "
             f"in one process per thread setting ({a.steps} rounds, medians; the first call, which compiles, "
             f"excluded). Machine: {machine(libs=('jax', 'torch'))}. "
             f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             "", "Check before timing (torch vs fusion-jax layer, same weights, noise off; max relative error): "
             + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + ".", "",
             "| workload | threads | candidate | s, median (best) | tokens/s | fusion-jax speed vs it |",
             "|---|---|---|---|---|---|"]
    for work, tok in (("layer", tok_layer), ("step", tok_step)):
        for threads, res in results.items():
            r = res[work]["s"]
            ours = med(r["fusion-jax"])
            for name, ts in r.items():
                ratio = "-" if name == "fusion-jax" else f"{med(ts) / ours:.2f}x"
                lines.append(f"| {work} | {threads} | {name} | {med(ts):.3f} ({min(ts):.3f}) | "
                             f"{tok / med(ts):,.0f} | {ratio} |")
    lines += ["", "Peak temporary memory of the layer's forward + backward (XLA `memory_analysis`, compile only):",
              "", "| tokens | fusion-jax dispatch | one-hot [N, E, N] dispatch | one-hot / ours | dense (k+1)F |",
              "|---|---|---|---|---|"]
    for r in mem:
        lines.append(f"| {r['tokens']} | {r['fusion-jax'] / 1e6:,.0f} MB | {r['one-hot'] / 1e6:,.0f} MB | "
                     f"{r['one-hot'] / r['fusion-jax']:.1f}x | {r['dense (k+1)F'] / 1e6:,.0f} MB |")
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


NOTES = """\
How to read it. 'dense (k+1)F' is SLOWER than the MoE on XLA:CPU although both do the same FLOPs: the
dense layer's [N, (k+1)F] intermediates (25 MB each at 2048 tokens) stream through memory, while the
block dispatch multiplies 128-row blocks whose [128, F] intermediates stay in cache (measured alone on
one core: a [2048, 192] x [192, 3072] matmul runs at ~30 GFLOP/s, a [128, 192] x [192, 512] block at
~80). So on this CPU the MoE costs no more than its dense equivalent; the issue's accelerator goal (the
MoE step within 1.3x of the dense step's time per active parameter, with `jax.lax.ragged_dot` in place
of the block scan) still needs a lent GPU. Against PyTorch, the 'all' rows swing with the machine's load
(torch's OpenMP pool suffers most when the 2 cores are oversubscribed); the '1' rows (one thread each)
measure per-core efficiency: the MoE layer is at parity with the reference's calculator, and the whole
step's gap is the dense decoder's own (DESIGN.md: a plain JAX train step of a dense d=192 Llama runs
2.6k tokens/s on this CPU, transformers 4.5k), not the MoE block's. Memory: the one-hot formulation with
no capacity limit holds [N, E, N] dispatch and combine tensors, quadratic in the tokens (41 GB of
temporaries at 16k tokens); the sorted dispatch grows linearly (0.8 GB), below the dense layer's."""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--inter", type=int, default=512, help="expert width F")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layer-tokens", type=int, default=2048)
    ap.add_argument("--check-tokens", type=int, default=256)
    ap.add_argument("--mem-tokens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--skip-onehot", action="store_true", help="leave the (slow) one-hot out of the timings")
    ap.add_argument("--threads", default="all,1")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--write", action="store_true", help=f"rewrite BENCHMARKS.md's '{SECTION}' section")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        Path(a.child).write_text(json.dumps(child(a)))
        return
    argv = [x for x in sys.argv[1:] if x != "--write"]
    errs = check(a)
    print("check (relative errors):", errs, flush=True)
    mem = dispatch_memory(a)
    print("memory:", mem, flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in a.threads.split(","):
            print(f"timing, threads={threads}", flush=True)
            results[threads] = run_child(a, argv, ONE_THREAD_ENV if threads == "1" else None,
                                         Path(tmp) / f"{threads}.json")
    text = table(a, results, mem, errs)
    print(text)
    if a.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
