"""Benchmark: one UltraFuser train step, fusion-jax vs the same computation in PyTorch + transformers.

Three specialists of one Llama config plus the gate (two-layer ReLU MLP on each specialist's last hidden
state, softmax over specialists per token, fused logits = weighted sum, mean CE on response tokens), an
AdamW step with global-norm clipping. Stage 1 trains the gate only, stage 2 every weight.

* fusion-jax: the pipeline's own step (``fusion_jax.train.Trainer``: jit, donated state, on
  ``FusedModel.trainer_loss_fn``, the chunked fused CE) on specialists loaded with
  ``fusion_jax.hf.load_model`` and the gate with ``load_gate``, i.e. the files the torch side reads.
* PyTorch: three ``transformers.LlamaForCausalLM`` (sdpa attention) + the same gate as ``nn.Sequential``,
  ``torch.optim.AdamW(foreach=True)`` + ``clip_grad_norm_``. Stage 1 runs the frozen specialists under
  ``torch.no_grad()`` (what a torch user would write).

The parent writes the weights (random, seeded) as HF checkpoints and one batch laid out like the
pipeline's (each example in each specialist's template: left-padded prompt, response at the same
positions, trailing padding). Per stage, each framework first runs alone in its own process: it computes
the loss and every gradient on the initial weights (the parent checks that both agree to float32
tolerance -- a benchmark of different computations would be worthless -- and stops otherwise), then its
warm-up steps; peak RSS and compile time come from there. Then one process holds both and times their
steps alternately (a pause between steps lets the other's thread pool go idle), so that both see the
same load on a shared machine: once with each framework's default threads (what a user gets), once
with one thread each (XLA:CPU single-threaded, ``torch.set_num_threads(1)``): per-core efficiency, which
does not depend on how busy the machine is. PyTorch's OpenMP pool slows down far more than
proportionally when the cores are oversubscribed (measured here: the same stage-1 step 0.75 s at load
3.5 and 4-9 s at load 7-8), so on a shared machine only the one-thread ratio is stable.

tokens/s counts positions of the fused batch (B x S; each position runs through all K specialists).

    python bench/ultrafuser_step.py                      # sizes of BENCHMARKS.md, prints a table
    python bench/ultrafuser_step.py --write              # also rewrites BENCHMARKS.md's section
    python bench/ultrafuser_step.py --peak-tflops 989 --dtype bfloat16 --hidden 960 ...   # on a GPU: MFU
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import alternate, machine, time_call, write_section  # noqa: E402  (bench/ is this script's directory)

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
NAMES = ("text", "code", "math")
SECTION = "## UltraFuser train step"
sys.path.insert(0, str(ROOT))  # the checkout's fusion_jax, whether or not it is pip-installed


# -- sizes and FLOPs ---------------------------------------------------------------------------------
def hf_config(a) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": a.vocab,
        "hidden_size": a.hidden, "intermediate_size": a.inter, "num_hidden_layers": a.layers,
        "num_attention_heads": a.heads, "num_key_value_heads": a.kv_heads, "head_dim": a.hidden // a.heads,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "max_position_embeddings": max(2048, a.seq),
        "tie_word_embeddings": False, "rope_theta": 10000.0, "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "dtype": "float32",
    }


def flops_per_token(a, stage: int) -> dict:
    """Model FLOPs per position of the fused batch (recomputation not counted, as MFU defines it).

    Per specialist: N = L*(D*q + 2*D*kv + q*D + 3*D*F) + D*V matmul params (lm_head included, the
    embedding lookup not); attention 4*L*S*q per position forward (QK^T and AV, PaLM's counting);
    gate G = D*Hg + Hg. Mixture of K logit rows: 2*K*V forward.
      stage 2 (all weights):  K*(6*N + 12*L*S*q + 6*G) + 6*K*V
      stage 1 (gate only):    K*(2*N + 4*L*S*q + 4*G) + 4*K*V   (specialists forward only; gate weight grads)
    """
    D, F, L, V, S, K, Hg = a.hidden, a.inter, a.layers, a.vocab, a.seq, len(NAMES), a.gate_hidden
    hd = D // a.heads
    q, kv = a.heads * hd, a.kv_heads * hd
    N = L * (D * q + 2 * D * kv + q * D + 3 * D * F) + D * V
    G = D * Hg + Hg
    if stage == 2:
        total = K * (6 * N + 12 * L * S * q + 6 * G) + 6 * K * V
    else:
        total = K * (2 * N + 4 * L * S * q + 4 * G) + 4 * K * V
    return {"N_matmul_per_specialist": N, "flops_per_token": total}


# -- inputs ------------------------------------------------------------------------------------------
def make_inputs(root: Path, a) -> None:
    """Three random HF Llama checkpoints (torch init, seeded), a random gate, one pipeline-shaped batch."""
    import torch
    import transformers

    from fusion_jax.ultrafuser.gate import GateConfig, save_gate

    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(a).items() if k not in ("architectures", "dtype")})
    for k, name in enumerate(NAMES):
        torch.manual_seed(a.seed + k)
        m = transformers.LlamaForCausalLM(cfg).to(torch.float32)
        m.save_pretrained(root / name, safe_serialization=True)
        del m
    rng = np.random.default_rng(a.seed)
    D, H = a.hidden, a.gate_hidden
    # a non-zero second layer, so that the check exercises non-uniform mixture weights
    gate = {"w1": rng.standard_normal((D, H), np.float32) * np.sqrt(2.0 / D),
            "b1": rng.standard_normal((H,), np.float32) * 0.1,
            "w2": rng.standard_normal((H,), np.float32) * np.sqrt(1.0 / H),
            "b2": np.zeros((), np.float32)}
    save_gate(gate, GateConfig(input_size=D, hidden_size=H, num_experts=len(NAMES), specialist_names=NAMES),
              root / "gate")
    # batch, laid out as fusion_jax.data.templates.layout_multi lays out: [pad | prompt_k | response EOS | pad]
    K, B, S, P = len(NAMES), a.bpd * len(NAMES), a.seq, a.prompt_len
    ids = np.zeros((K, B, S), np.int32)
    att = np.zeros((K, B, S), np.int32)
    labels = np.zeros((B, S), np.int32)
    lmask = np.zeros((B, S), np.float32)
    for n in range(B):
        r_len = int(rng.integers((S - P) // 2, S - P + 1))
        resp = rng.integers(3, a.vocab, r_len)
        resp[-1] = 2  # EOS
        for k in range(K):
            p_len = int(rng.integers(P // 4, P + 1))
            ids[k, n, P - p_len:P] = rng.integers(3, a.vocab, p_len)
            ids[k, n, P:P + r_len] = resp
            att[k, n, P - p_len:P + r_len] = 1
        labels[n, P - 1:P - 1 + r_len] = resp
        lmask[n, P - 1:P - 1 + r_len] = 1.0
    np.savez(root / "batch.npz", input_ids=ids, attention_mask=att, labels=labels, loss_mask=lmask)


def load_batch(root: Path) -> dict:
    with np.load(root / "batch.npz") as z:
        return {k: z[k] for k in z.files}


# -- the two implementations ---------------------------------------------------------------------------
def trainer_batch(fused: dict) -> dict:
    """The fused layout (ids/mask [K,B,S], labels/loss_mask [B,S] on predicting positions) in the layout
    the trainer's loss takes (``FusedModel.trainer_loss_fn``: ids/mask [B,K,S], loss_mask on the
    response tokens themselves)."""
    lm = np.zeros_like(fused["loss_mask"])
    lm[:, 1:] = fused["loss_mask"][:, :-1]
    return {"input_ids": np.swapaxes(fused["input_ids"], 0, 1), "attention_mask":
            np.swapaxes(fused["attention_mask"], 0, 1), "loss_mask": lm}


def setup_jax(root: Path, a, stage: int, check: bool):
    """Returns (step, info): ``step()`` runs one optimizer step to completion. With ``check``, writes the
    loss and every gradient at the initial weights to grads_jax_s<stage>.npz first."""
    import jax

    from fusion_jax import hf
    from fusion_jax.hf import mapping
    from fusion_jax.train import OptimizerConfig, Trainer, TrainerConfig
    from fusion_jax.ultrafuser.gate import load_gate
    from fusion_jax.ultrafuser.model import GATE, SPECIALISTS, FusedModel

    kw = {"dtype": a.dtype, "param_dtype": "float32"}
    if not a.scan_layers:
        kw["scan_layers"] = False
    models = [hf.load_model(root / n, **kw) for n in NAMES]
    gate, gcfg = load_gate(root / "gate")
    fm = FusedModel.from_models(models, NAMES, gate=gate, gate_hidden=gcfg.hidden_size)
    del models
    batch = trainer_batch(load_batch(root))
    loss_fn = fm.trainer_loss_fn(a.chunk)
    params = fm.train_params()
    info = {"device": str(jax.devices()[0]), "platform": jax.devices()[0].platform,
            "version": f"jax {jax.__version__}"}
    if check:  # loss and every gradient of what the stage trains, at the initial weights (not timed)
        if stage == 1:
            frozen = params[SPECIALISTS]
            loss, gg = jax.jit(jax.value_and_grad(
                lambda gt: loss_fn({SPECIALISTS: frozen, GATE: gt}, batch, None)[0]))(params[GATE])
            g = {GATE: gg}
        else:
            loss, g = jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch, None)[0]))(params)
        grads = {f"gate.{k}": np.asarray(v) for k, v in g[GATE].items()}
        if stage == 2:
            for k, n in enumerate(NAMES):
                gk = jax.tree.map(lambda x: np.asarray(x[k]), g[SPECIALISTS])
                grads.update({f"{n}.{name}": t for name, t in mapping.params_to_hf(gk, fm.config)})
        np.savez(root / f"grads_jax_s{stage}.npz", **grads)
        info["loss"] = float(loss)
        del grads, g

    # the pipeline's step: fusion_jax.train.Trainer's jitted step (donated state) on trainer_loss_fn
    opt = OptimizerConfig(learning_rate=a.lr, schedule="cosine", weight_decay=0.0, grad_clip=1.0)
    tc = TrainerConfig(total_steps=a.warmup + a.steps, workdir=None, progress=False, tensorboard=False)
    trainer = Trainer(loss_fn, params, opt, tc, trainable=r"^gate/" if stage == 1 else None,
                      param_logical_axes=fm.train_logical_axes())
    del params, fm
    return (lambda: jax.block_until_ready(trainer.step_fn(batch)["loss"])), info


def setup_torch(root: Path, a, stage: int, check: bool):
    """The same computation in PyTorch + transformers; same contract as :func:`setup_jax`."""
    import torch
    import transformers
    from safetensors.numpy import load_file

    torch.set_num_threads(int(os.environ.get("FJ_BENCH_THREADS", 0)) or os.cpu_count() or 1)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    models = [transformers.LlamaForCausalLM.from_pretrained(root / n, dtype=torch.float32,
                                                             attn_implementation="sdpa").to(dev) for n in NAMES]
    g = load_file(str(root / "gate" / "gate.safetensors"))
    D, H = g["gate.w1"].shape
    gate = torch.nn.Sequential(torch.nn.Linear(D, H), torch.nn.ReLU(), torch.nn.Linear(H, 1)).to(dev)
    with torch.no_grad():
        gate[0].weight.copy_(torch.from_numpy(g["gate.w1"].T.copy()))
        gate[0].bias.copy_(torch.from_numpy(g["gate.b1"]))
        gate[2].weight.copy_(torch.from_numpy(g["gate.w2"][None, :].copy()))
        gate[2].bias.copy_(torch.from_numpy(g["gate.b2"].reshape(1)))
    b = {k: torch.from_numpy(v).to(dev) for k, v in load_batch(root).items()}
    b["input_ids"] = b["input_ids"].long()
    b["labels"] = b["labels"].long()
    # positions = running count of real tokens (left padding), as fusion_jax's CausalLM derives them
    pos = (b["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)
    for m in models:
        m.train(stage == 2)
        m.requires_grad_(stage == 2)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=a.dtype == "bfloat16")

    def specialists():
        hs = [m.model(input_ids=b["input_ids"][k], attention_mask=b["attention_mask"][k],
                      position_ids=pos[k]).last_hidden_state for k, m in enumerate(models)]
        logits = [m.lm_head(h).float() for m, h in zip(models, hs)]
        return torch.stack(hs), torch.stack(logits)                  # [K,B,S,D], [K,B,S,V]

    def loss_fn():
        with autocast:
            if stage == 1:
                with torch.no_grad():
                    h, logits = specialists()
            else:
                h, logits = specialists()
            w = torch.softmax(gate(h.float()).squeeze(-1), dim=0)       # [K,B,S]
            fused = torch.einsum("kbs,kbsv->bsv", w, logits)
            nll = torch.logsumexp(fused, -1) - fused.gather(-1, b["labels"][..., None])[..., 0]
            m = b["loss_mask"]
            return (nll * m).sum() / m.sum().clamp(min=1.0)

    params = list(gate.parameters()) + ([p for m in models for p in m.parameters()] if stage == 2 else [])
    info = {"device": str(dev), "platform": dev.type,
            "version": f"torch {torch.__version__}, transformers {transformers.__version__}"}
    if check:
        loss = loss_fn()
        loss.backward()
        grads = {"gate.w1": gate[0].weight.grad.T.numpy(force=True),
                 "gate.b1": gate[0].bias.grad.numpy(force=True),
                 "gate.w2": gate[2].weight.grad[0].numpy(force=True),
                 "gate.b2": gate[2].bias.grad[0].numpy(force=True)}
        if stage == 2:
            for n, m in zip(NAMES, models):
                grads.update({f"{n}.{k}": p.grad.numpy(force=True) for k, p in m.named_parameters()})
        np.savez(root / f"grads_torch_s{stage}.npz", **grads)
        info["loss"] = float(loss.detach())
        del grads, loss
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, foreach=True)
    opt.zero_grad(set_to_none=True)

    def step():
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, info


SETUP = {"jax": setup_jax, "torch": setup_torch}
PAUSE_S = 0.5
# one thread each: XLA:CPU without its Eigen pool and one intra-op thread; torch through FJ_BENCH_THREADS
ONE_THREAD_ENV = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1",
                  "FJ_BENCH_THREADS": "1", "OMP_NUM_THREADS": "1"}


def child_isolated(root: Path, a, fw: str, stage: int) -> dict:
    """One framework alone: the check values, compile/first-step time, then the warm-up steps (so that
    peak RSS covers training)."""
    step, info = SETUP[fw](root, a, stage, check=True)
    info["first_step_s"] = time_call(step)
    for _ in range(max(a.warmup - 1, 0)):
        step()
    return info


def child_paired(root: Path, a, stage: int) -> dict:
    """Both frameworks in one process, timed step by step in alternation (which one goes first flips each
    step), so that both see the same load on a shared machine; warm-up steps excluded. A pause between
    steps lets the other framework's spinning pool threads go to sleep before the next timed step."""
    steps = {fw: SETUP[fw](root, a, stage, check=False)[0] for fw in ("jax", "torch")}
    for _ in range(a.warmup):
        for fw in steps:
            steps[fw]()

    def progress(i, times):
        print(f"  stage {stage} timed step {i + 1}/{a.steps}: jax {times['jax'][-1]:.2f} s, "
              f"torch {times['torch'][-1]:.2f} s", flush=True)
    return {"step_s": alternate(steps, a.steps, pause_s=PAUSE_S, after_round=progress)}


def run_child(mode: str, stage: int, root: Path, argv: list[str], env: dict | None = None) -> dict:
    """Run one child (``jax`` / ``torch`` isolated, or ``paired``) in a fresh process; returns its result
    with wall time and peak RSS."""
    out = root / f"result_{mode}_s{stage}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", mode, "--stage", str(stage),
           "--workdir", str(root)]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    _, status, ru = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child {mode} stage {stage} failed (status {status})")
    res = json.loads(out.read_text())
    res["wall_s"] = time.perf_counter() - t
    res["peak_rss_gb"] = ru.ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB on Linux
    return res


# -- comparison ---------------------------------------------------------------------------------------
def compare(root: Path, stage: int, res_j: dict, res_t: dict) -> dict:
    gj = np.load(root / f"grads_jax_s{stage}.npz")
    gt = np.load(root / f"grads_torch_s{stage}.npz")
    if set(gj.files) != set(gt.files):
        raise SystemExit(f"stage {stage}: gradient sets differ: {sorted(set(gj.files) ^ set(gt.files))[:5]}")
    worst, worst_name = 0.0, ""
    # a tensor whose true gradient is ~0 (the gate's output bias: softmax ignores a shared shift) is
    # compared against a small fraction of the global gradient norm instead of its own
    floor = 1e-4 * np.sqrt(sum(np.sum(gt[k].astype(np.float64) ** 2) for k in gt.files))
    for k in gj.files:
        a, b = gj[k].astype(np.float64), gt[k].astype(np.float64)
        if a.shape != b.shape:
            raise SystemExit(f"stage {stage}: gradient {k} has shape {a.shape} (jax) vs {b.shape} (torch)")
        rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), floor, 1e-30)
        if rel > worst:
            worst, worst_name = float(rel), k
    dloss = abs(res_j["loss"] - res_t["loss"])
    return {"loss_jax": res_j["loss"], "loss_torch": res_t["loss"], "loss_abs_diff": dloss,
            "grad_max_rel_err": worst, "grad_worst_tensor": worst_name, "n_grad_tensors": len(gj.files)}


# -- report -------------------------------------------------------------------------------------------
def table(a, iso: dict, paired: dict, checks: dict) -> list[str]:
    B, S = a.bpd * len(NAMES), a.seq
    labels = {"torch": "PyTorch + transformers", "jax": "fusion-jax", "jax_unrolled": "fusion-jax, scan_layers=False"}
    lines = ["| stage | threads | framework | step s, median (best) | tokens/s, median (best) | "
             "fusion-jax / PyTorch, median (best) |", "|---|---|---|---|---|---|"]
    for (stage, threads), pr in sorted(paired.items(), key=lambda kv: (kv[0][0], kv[0][1] != "all")):
        t = pr["step_s"]
        tt, bt = float(np.median(t["torch"])), float(np.min(t["torch"]))
        for fw in ("torch", "jax", "jax_unrolled"):
            if fw not in t:
                continue
            med, best = float(np.median(t[fw])), float(np.min(t[fw]))
            ratio = "" if fw == "torch" else f"**{tt / med:.2f}x** ({bt / best:.2f}x)"
            lines.append(f"| {stage} | {threads} | {labels[fw]} | {med:.2f} ({best:.2f}) | "
                         f"{B * S / med:,.0f} ({B * S / best:,.0f}) | {ratio} |")
    lines += ["", "| stage | framework | peak RSS GB | first step s (JAX: + compile) |", "|---|---|---|---|"]
    for (fw, stage), r in sorted(iso.items(), key=lambda kv: (kv[0][1], kv[0][0] != "jax")):
        lines.append(f"| {stage} | {labels[fw]} | {r['peak_rss_gb']:.2f} | {r['first_step_s']:.1f} |")
    lines.append("")
    for stage, c in sorted(checks.items()):
        lines.append(f"- stage {stage} parity: loss {c['loss_jax']:.6f} (fusion-jax) vs {c['loss_torch']:.6f} "
                     f"(PyTorch), |diff| {c['loss_abs_diff']:.1e}; {c['n_grad_tensors']} gradient tensors agree "
                     f"to a max relative error of {c['grad_max_rel_err']:.1e} ({c['grad_worst_tensor']})")
    return lines


NOTES = """\
How to read it. On a shared 2-core machine the 'all' rows depend on how busy the machine is: PyTorch's
OpenMP pool slows down far more than proportionally when the cores are oversubscribed (a descheduled
thread holds up every barrier), XLA's pool much less, so that ratio swings with the load; compare the
median with the best step. The '1' rows (one thread each) measure per-core efficiency and are stable.
What fusion-jax does that PyTorch does not: it never holds the [K, B, S, V] logits beyond one sequence
chunk, so the backward recomputes each chunk's K lm_head matmuls (3 x 2DV FLOPs per position, not in the
model FLOPs below); in stage 1 PyTorch instead runs the frozen specialists under `no_grad` and keeps all
K logits for the gate's backward. Memory bounded by the chunk, paid for in compute."""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--bpd", type=int, default=2, help="examples per domain per batch (B = 3 x bpd)")
    ap.add_argument("--gate-hidden", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=128, help="sequence chunk of the fused loss (JAX)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per framework (the first compiles)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per framework (median reported)")
    ap.add_argument("--stages", default="1,2")
    ap.add_argument("--unrolled", action="store_true",
                    help="also time fusion-jax with scan_layers=False (default threads)")
    ap.add_argument("--threads", default="all,1",
                    help="thread settings to time: 'all' (each framework's default) and/or '1'")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="accelerator peak (dense, compute dtype): MFU")
    ap.add_argument("--write", action="store_true", help=f"rewrite BENCHMARKS.md's '{SECTION}' section")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true", help="keep the workdir (inputs, gradients, results)")
    ap.add_argument("--child", choices=("jax", "torch", "paired"), help=argparse.SUPPRESS)
    ap.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--scan-layers", type=int, default=1, help=argparse.SUPPRESS)
    a = ap.parse_args()

    if a.child:
        root = Path(a.workdir)
        res = child_paired(root, a, a.stage) if a.child == "paired" else child_isolated(root, a, a.child, a.stage)
        (root / f"result_{a.child}_s{a.stage}.json").write_text(json.dumps(res))
        return

    argv = [x for x in sys.argv[1:] if x not in ("--write", "--keep")]
    argv = [x for i, x in enumerate(argv) if x != "--workdir" and (i == 0 or argv[i - 1] != "--workdir")]
    root = Path(a.workdir or tempfile.mkdtemp(prefix="fj-uf-bench-"))
    mach = machine(libs=("jax", "torch", "transformers")) + " at the start of the run"
    stages = [int(s) for s in a.stages.split(",")]
    B, S, K = a.bpd * len(NAMES), a.seq, len(NAMES)
    iso, paired, checks = {}, {}, {}
    try:
        t = time.perf_counter()
        make_inputs(root, a)
        print(f"inputs: {K} x Llama d={a.hidden} ff={a.inter} L={a.layers} heads={a.heads}/{a.kv_heads} "
              f"V={a.vocab}, batch {B} x {S} ({time.perf_counter() - t:.1f} s)", flush=True)
        for stage in stages:
            # 1. each framework alone: parity values, first step (compile), peak RSS
            for fw in ("torch", "jax"):
                r = iso[(fw, stage)] = run_child(fw, stage, root, argv)
                print(f"stage {stage} {fw:5s} alone: loss {r['loss']:.6f}, first step {r['first_step_s']:.1f} s, "
                      f"peak RSS {r['peak_rss_gb']:.2f} GB", flush=True)
            checks[stage] = c = compare(root, stage, iso[("jax", stage)], iso[("torch", stage)])
            tol = 1e-4 if a.dtype == "float32" else 5e-2
            ok = c["loss_abs_diff"] <= tol * max(1.0, abs(c["loss_torch"])) and c["grad_max_rel_err"] <= 10 * tol
            print(f"stage {stage} parity: loss {c['loss_jax']:.6f} (jax) vs {c['loss_torch']:.6f} (torch); "
                  f"max grad rel err {c['grad_max_rel_err']:.2e} ({c['grad_worst_tensor']}) -> "
                  f"{'OK' if ok else 'MISMATCH'}", flush=True)
            if not ok:
                raise SystemExit(f"stage {stage}: the two frameworks do not compute the same loss/gradients")
            # 2. timing: both in one process, steps alternating; default threads, then one thread each
            for threads in a.threads.split(","):
                env = ONE_THREAD_ENV if threads == "1" else None
                pr = paired[(stage, threads)] = run_child("paired", stage, root, argv, env)
                if a.unrolled and threads == "all":
                    un = run_child("paired", stage, root, argv + ["--scan-layers", "0"])
                    pr["step_s"]["jax_unrolled"] = un["step_s"]["jax"]
                    pr["step_s"]["torch_during_unrolled"] = un["step_s"]["torch"]
                med = {fw: float(np.median(v)) for fw, v in pr["step_s"].items()}
                print(f"stage {stage} timed, threads {threads}: "
                      + ", ".join(f"{fw} {B * S / m:,.0f} tok/s" for fw, m in med.items()), flush=True)
    finally:
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)

    rj, rt = iso[("jax", stages[-1])], iso[("torch", stages[-1])]
    fl = {s: flops_per_token(a, s) for s in stages}
    print(f"\nmachine: {mach}\n{rj['version']} on {rj['device']}; {rt['version']}\n")
    lines = table(a, iso, paired, checks)
    print("\n".join(lines))
    print("\nModel FLOPs per fused-batch token: stage 2 K(6N + 12 L S q + 6G) + 6KV, stage 1 K(2N + 4 L S q + 4G) "
          "+ 4KV (N: matmul params per specialist incl. lm_head, G: gate params; see flops_per_token)")
    for s in stages:
        print(f"  stage {s}: {fl[s]['flops_per_token'] / 1e6:.1f} MFLOP/token "
              f"(N = {fl[s]['N_matmul_per_specialist'] / 1e6:.2f}M matmul params per specialist)")
    mfu = {}
    if rj["platform"] in ("gpu", "cuda", "tpu") and a.peak_tflops > 0 and all((s, "all") in paired for s in stages):
        for s in stages:
            for fw in ("jax", "torch"):
                tok_s = B * S / float(np.median(paired[(s, "all")]["step_s"][fw]))
                mfu[(fw, s)] = tok_s * fl[s]["flops_per_token"] / (a.peak_tflops * 1e12)
                print(f"  MFU stage {s} {fw}: {100 * mfu[(fw, s)]:.1f}% of {a.peak_tflops:g} TFLOP/s")
    elif rj["platform"] in ("gpu", "cuda", "tpu"):
        print("  (pass --peak-tflops for MFU)")
    print(json.dumps({"machine": mach, "args": {k: v for k, v in vars(a).items() if k not in ("child", "stage")},
                      "isolated": {f"{fw}_s{s}": r for (fw, s), r in iso.items()},
                      "paired": {f"s{s}_threads_{t}": r for (s, t), r in paired.items()}, "checks": checks,
                      "flops_per_token": {s: f["flops_per_token"] for s, f in fl.items()},
                      "mfu": {f"{fw}_s{s}": v for (fw, s), v in mfu.items()}}))

    if a.write:
        hd = a.hidden // a.heads
        n_spec = a.layers * (a.hidden * hd * (a.heads + 2 * a.kv_heads) + hd * a.heads * a.hidden
                             + 3 * a.hidden * a.inter + 2 * a.hidden) + 2 * a.vocab * a.hidden + a.hidden
        n_gate = a.hidden * a.gate_hidden + 2 * a.gate_hidden + 1
        cmd = " ".join(["python bench/ultrafuser_step.py", *argv, "--write"])
        text = "\n".join([
            SECTION, "",
            f"`{cmd}` — one UltraFuser train step (AdamW, global-norm clip 1.0): stage 1 trains the gate only, "
            f"stage 2 every weight. {K} specialists of one Llama config (d={a.hidden}, ff={a.inter}, {a.layers} "
            f"layers, {a.heads} heads of {hd}, vocab {a.vocab}: {n_spec / 1e6:.2f}M params each) + the gate "
            f"(hidden {a.gate_hidden}, {n_gate / 1e3:.0f}k params); batch {a.bpd} per domain x {K} domains = {B} "
            f"examples x {S} tokens, each example in each specialist's row (prompt up to {a.prompt_len} tokens, "
            f"left-padded; response after it, CE on response tokens only), {a.dtype}.", "",
            "- fusion-jax: the pipeline's step, i.e. `fusion_jax.train.Trainer` (jit, donated state) on "
            f"`FusedModel.trainer_loss_fn` (vmapped specialists, fused CE chunked by {a.chunk} positions); "
            "specialists loaded with `fusion_jax.hf.load_model` from the torch checkpoints.",
            "- PyTorch: three `transformers.LlamaForCausalLM` (sdpa attention) + the gate as `nn.Sequential`, "
            "softmax-weighted logits, `AdamW(foreach=True)` + `clip_grad_norm_`; stage 1 runs the specialists "
            "under `no_grad`.",
            "- Parity first: each framework alone, in its own process, computes the loss and every gradient on "
            "the same weights and batch (the run stops on a mismatch beyond float32 tolerance), then runs its "
            "warm-up steps: peak RSS and the first step (compile for JAX) come from that process.",
            f"- Timing: both frameworks in one process, steps alternating with a {PAUSE_S} s pause (so both see "
            f"the same load), {a.warmup} warm-up steps each excluded, median (and best) of {a.steps} timed steps; "
            "threads 'all' = each framework's default (2 here), '1' = one thread each (XLA:CPU without its "
            "Eigen pool, `torch.set_num_threads(1)`). tokens/s = B x S positions of the fused batch per second "
            "(each position runs through all three specialists).", "",
            f"Machine: {mach}; the 2 cores were shared with other jobs (3 other sessions' tests and runs) during "
            f"the run, so absolute numbers move from run to run. {rj['version']}; {rt['version']}. "
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
            *lines, "",
            NOTES, "",
            "No GPU or TPU was lent to this task, so MFU of stage 2 on an accelerator is not measured here. "
            "The script prints MFU when JAX runs on a GPU/TPU and `--peak-tflops` is given, from the model FLOPs "
            "per fused-batch token (K specialists, S sequence length, q = heads x head_dim, kv = kv_heads x "
            "head_dim, V vocabulary; recomputation not counted):", "",
            "- per specialist N = L(Dq + 2D kv + qD + 3DF) + DV matmul params (lm_head in, embedding lookup out); "
            "gate G = D Hg + Hg",
            "- stage 2: K(6N + 12 L S q + 6G) + 6KV; stage 1: K(2N + 4 L S q + 4G) + 4KV",
            "- at these sizes: " + "; ".join(f"stage {s} {fl[s]['flops_per_token'] / 1e6:.1f} MFLOP/token"
                                             for s in stages),
            "",
        ])
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
