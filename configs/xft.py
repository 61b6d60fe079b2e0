"""XFT (ise-uiuc/xft): upcycle a dense model into a shared-expert MoE, fine-tune it, merge it back to dense.

Run:  python train.py --config=configs/xft.py              # the demo (builds/reuses the demo zoo; <= 10 min)
      python train.py --config=configs/xft.py:smoke        # tiny end-to-end check (< 1 min)
      python train.py --config=configs/xft.py:tiny --config.model.path=DIR --config.data.train_files.text=...
      python train.py --config=configs/xft.py:paper --config.model.path=/ckpt/deepseek-coder-1.3b-base \\
          --config.data.train_files.code=data-evol_instruct-decontaminated.jsonl \\
          --config.data.eval_files.code=heldout.jsonl

Any field can be overridden as --config.a.b=value; unknown options and presets are errors (exit 2).
A run writes runs/<name>/ (merged/ is the dense HF model) and resumes from runs/<name>/work/.

The stages (fusion_jax/xft/pipeline.py), as the reference runs them:
  upcycle    every FFN -> 8 identical experts, expert 0 shared and always on, router Linear(d->7) -> Tanh ->
             Linear(7->7) and noise Linear(d->7) drawn N(0, 0.02), top-5 of the 7 (upcycle.*).
  moe_sft    all weights, CE on response tokens + 0.01 (cv^2(importance) + cv^2(load)) summed over layers,
             noisy gating on (off at eval), Adafactor, linear decay (sft.*).
  merge      per layer alpha in R^7 (init ones): W = 0.75 W_0 + 0.25 sum_i softmax(alpha)_i W_i for gate, up and
             down; only alpha trains (merge.*).
  export     the merged dense model as an HF checkpoint of the base architecture (merged/).
  dense_sft  the baseline: the dense model on the same batches for sft.steps + merge.steps (baseline.enabled).
  eval       held-out loss per domain: base, dense SFT, MoE, XFT (learned alpha), XFT with alpha fixed.

The real run (the `paper` preset): deepseek-coder-1.3b-base, Evol-Instruct-110K in Magicoder's prompt
(data.prompt_field "instruction", response_field "response"), sequence length 1024, batch 64, MoE SFT 4 epochs
(6876 steps) at 5e-5 with 500 warmup steps in bf16, merge 1 epoch (1719 steps) at 1e-5 with 125 warmup,
Adafactor without clipping; mesh expert=8 (the experts split over 8 devices, the batch over all of them).
"""
from fusion_jax.xft.config import get_config as _get_config


def get_config(preset: str | None = None):
    return _get_config(preset)
