"""Benchmark: XFT's MoE SFT step on 8 simulated devices with the batch split over the mesh's ``expert`` axis
(the pipeline's rule) or not (the default rule), and the demo's wall time per stage.

Why the rule: the experts are split over ``expert``; with the default rule (batch over data, fsdp) every
device of an expert group holds the whole batch, so attention, norms, embeddings and the loss run on every
one of them (E-fold redundant work on an expert-only mesh). With ``batch -> (data, fsdp, expert)`` each device
runs attention on its own rows and the MoE block all-gathers its group's tokens for the experts (see
``fusion_jax/models/moe.py``). Measured with the pipeline's own step (``Trainer`` + ``moe_sft_loss``,
Adafactor) on the demo's MoE (the zoo base's shape upcycled: d=96, 2 layers, F=256, vocab 1024, 8 experts,
top-5 + shared) and batch (24 x 96), on 8 simulated CPU devices in one process per candidate alternately
(medians; the first, compiling call excluded). Simulated devices share the machine's cores, so redundant
work shows directly as time; on real chips it is wasted FLOPs and memory.

    python bench/xft.py                              # prints the tables
    python bench/xft.py --demo-run runs/xft_demo     # adds the demo's stage timings (its run.json)
    python bench/xft.py --write                      # rewrites BENCHMARKS.md's "XFT" section
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

import numpy as np

from _report import alternate, machine, write_section  # noqa: E402  (bench/ is this script's directory)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTION = "## XFT"
sys.path.insert(0, str(ROOT))
MESHES = ({"expert": 8, "fsdp": 1}, {"expert": 4, "fsdp": 2}, {"expert": 1, "fsdp": 8})


def child(a) -> dict:
    """In an 8-device process: ``{mesh: {rule: [seconds per step]}}``."""
    import jax

    from fusion_jax import sharding as shd
    from fusion_jax.models import CausalLM, ModelConfig
    from fusion_jax.train import OptimizerConfig, Trainer, TrainerConfig
    from fusion_jax.xft import training as xt
    from fusion_jax.xft.upcycle import upcycle
    from flax import nnx
    assert jax.device_count() == 8, jax.devices()
    dense = ModelConfig(architecture="LlamaForCausalLM", vocab_size=a.vocab, hidden_size=a.hidden,
                        intermediate_size=a.inter, num_layers=a.layers, num_heads=2, num_kv_heads=2,
                        head_dim=a.hidden // 2)
    params = nnx.to_pure_dict(nnx.state(CausalLM(dense, rngs=nnx.Rngs(0)), nnx.Param))
    mc, mp = upcycle(params, dense, experts=8, top_k=5, key=jax.random.key(1))
    mp = jax.tree.map(np.asarray, mp)
    gd, axes = xt.graph(mc)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, a.vocab, (a.batch, a.seq)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "loss_mask": np.ones_like(ids)}
    rules = {"batch over (data, fsdp, expert)": xt.BATCH_RULES, "batch over (data, fsdp)": None}
    trainers = {}
    for m in MESHES:
        for name, r in rules.items():
            if m["expert"] == 1 and r is None:
                continue   # the two rules agree without an expert axis
            t = Trainer(xt.moe_sft_loss(gd), mp, OptimizerConfig(name="adafactor"),
                        TrainerConfig(total_steps=10**6, progress=False, tensorboard=False, log_every=0),
                        mesh=shd.make_mesh(m), param_logical_axes=axes, rules=r)
            jax.block_until_ready(t.step_fn(batch))   # compiles
            trainers[(json.dumps(m), name)] = t
    times = alternate({k: (lambda t=t: jax.block_until_ready(t.step_fn(batch))) for k, t in trainers.items()},
                      a.steps, pause_s=0.1)
    out: dict = {}
    for (m, name), v in times.items():
        out.setdefault(m, {})[name] = v
    return out


def demo_rows(run_dir: Path) -> list[str]:
    info = json.loads((run_dir / "run.json").read_text())
    t = info["timings_s"]
    rep = json.loads((run_dir / "report.json").read_text())
    st = rep["steps"]
    names = {"zoo": "zoo (cached: reused)", "render": "render the data", "load": "load the dense base",
             "moe_sft": f"MoE SFT ({st['moe_sft']} steps)", "merge": f"alpha training ({st['merge']} steps)",
             "export": "export the merged dense model", "dense_sft": f"dense SFT baseline ({st['dense_sft']} steps)",
             "eval": "evaluation (5 models x 3 domains, router load)", "total": "total"}
    lines = ["| stage | wall s |", "|---|---|"]
    for k, label in names.items():
        if f"{k}_s" in t:
            lines.append(f"| {label} | {t[f'{k}_s']:.1f} |")
    ev = rep["eval_loss"]
    means = ", ".join(f"{m} {v['mean']:.4f}" for m, v in ev.items())
    lines += ["", f"Held-out loss (mean over text, code, math): {means}. The report's findings:", ""]
    md = (run_dir / "report.md").read_text().splitlines()
    i = md.index("Findings:") + 2
    while i < len(md) and md[i].startswith("- "):
        lines.append(md[i])
        i += 1
    return lines


def table(a, res: dict, demo: Path | None) -> str:
    med = lambda v: float(np.median(v))  # noqa: E731
    tok = a.batch * a.seq
    lines = [SECTION, "",
             f"`python bench/xft.py` — the MoE SFT step of the XFT pipeline (Trainer, Adafactor, noisy gating, "
             f"balance loss) on 8 simulated CPU devices: the demo's MoE (d={a.hidden}, {a.layers} layers, F={a.inter}, "
             f"vocab {a.vocab}, 8 experts: shared + top-5 of 7), batch {a.batch} x {a.seq}; {a.steps} rounds, "
             f"candidates alternated, medians. Machine: {machine()}. Measured "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.", "",
             "| mesh | batch rule | s/step, median (best) | tokens/s | vs batch over expert |", "|---|---|---|---|---|"]
    for m, rules in res.items():
        base = med(rules.get("batch over (data, fsdp, expert)", next(iter(rules.values()))))
        for name, ts in rules.items():
            lines.append(f"| {', '.join(f'{k}={v}' for k, v in json.loads(m).items())} | {name} | {med(ts):.3f} "
                         f"({min(ts):.3f}) | {tok / med(ts):,.0f} | {med(ts) / base:.2f}x |")
    lines += ["", NOTES]
    if demo is not None:
        lines += ["", "The demo (`python train.py --config=configs/xft.py`), wall time per stage on this machine "
                  "(2 cores, shared with other jobs; the zoo cached):", ""] + demo_rows(demo)
        lines += ["", DEMO_NOTES]
    return "\n".join(lines) + "\n"


NOTES = """\
How to read it. With the experts split over `expert`, the default rule (batch over data, fsdp) leaves the
batch whole on every device of an expert group; measured, it costs the same as splitting the batch over
the expert axis too: XLA's sharding propagation carries the MoE block's token sharding (its shard_map
takes tokens split over (data, fsdp, expert)) back through the residual stream, so attention is not
repeated either way. The pipeline still sets the rule (`fusion_jax/xft/training.py` BATCH_RULES): the batch
then arrives in the layout the whole step uses rather than being resliced inside it, and it does not hang
on what the propagation decides for a bigger model. Without an expert axis the rules agree (the last row:
pure data parallelism, each device running all 8 experts on its rows, fastest on simulated CPU devices,
where no device is short of memory). Simulated devices share 2 cores: these rows compare layouts, not
scaling."""

DEMO_NOTES = """\
Why the paper's claim does not hold in the demo (read from the report). XFT's premise is that the MoE
learns more than the dense model (experts specialise under a learned router) and that merging back keeps
most of it. The second part holds: merging back costs nothing measurable (the merged model equals the MoE
to 1e-4), and at the reference's merge lr (1/5 of the SFT lr, Adafactor) alpha moves by < 1e-3, so the
learned merge IS the fixed 0.75 W_0 + 0.25 mean(W_i), as xft.md 4c predicts. The first part never starts:
the router and its noise layer start at N(0, 0.02) (the reference's effective init), so the clean router
logits differ across experts by ~0.01 while the gating noise has sigma ~0.7; the experts chosen in training
agree with the clean router's choice at chance level (0.716 vs 5/7 = 0.714) from the first step to the last,
so every expert sees a random share of the tokens, no expert specialises, and the router gets no signal to
learn from. The MoE then trains like the dense model (held-out loss at equal steps within 0.01 of the dense
model's through step 400 of the 4x run below, where the two lr schedules still nearly agree) and XFT is
dense SFT with 4/5 of the full-weight steps (its merge stage trains 14 numbers). A 4x longer run (1200
examples per domain, MoE SFT 600 + merge 150 vs dense 750 steps, same epochs; 744 s) gives the same
picture: dense SFT 2.6064, MoE 2.6549, XFT 2.6552, fixed merge 2.6552, router agreement 0.716 throughout.
Nothing here is tuned to change that: the demo keeps the reference's initialisation, noise, balance loss,
optimizer, lr ratio and epoch split.

Cold (no zoo cache): add the demo zoo's build, 205 s on this machine (tokenizer 8 s, base pre-training 91 s,
three specialists 105 s; zoo.json `timings_s`), shared with the UltraFuser demo (one family, one cache
entry)."""


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=96)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--seq", type=int, default=96)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--demo-run", default=None, help="a finished demo run directory (its run.json timings)")
    ap.add_argument("--write", action="store_true", help=f"rewrite BENCHMARKS.md's '{SECTION}' section")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        Path(a.child).write_text(json.dumps(child(a)))
        return
    argv = [x for x in sys.argv[1:] if x != "--write"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "res.json"
        subprocess.run([sys.executable, __file__, *argv, "--child", str(f)], env=env, check=True)
        res = json.loads(f.read_text())
    text = table(a, res, Path(a.demo_run) if a.demo_run else None)
    print(text)
    if a.write:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
