"""FuseLLM (arXiv 2401.10491): several teachers of any architecture and tokenizer distilled into one student.

Run:  python train.py --config=configs/fusellm.py              # the demo (builds/reuses the demo zoo)
      python train.py --config=configs/fusellm.py:smoke        # tiny end-to-end check (< 1 min)
      fusion-jax teacher-pass configs/fusellm.py               # only the teacher stores (a stage of the above)
      python train.py --config=configs/fusellm.py:paper \\
          --config.student.path=/ckpt/Llama-2-7b-hf \\
          --config.teachers.names="('openllama','mpt')" \\
          --config.teachers.paths="('/ckpt/open_llama_7b_v2','/ckpt/mpt-7b')" \\
          --config.data.train_files.text=minipile_train.jsonl --config.data.eval_files.text=minipile_eval.jsonl

Any field can be overridden as --config.a.b=value; unknown options and presets are errors (exit 2).
A run writes runs/<name>/ and resumes from runs/<name>/work/ when the same command is run again.

What the `paper` preset sets (reference/fusellm_fusechat.md section 6):
  teacher_pass   top-10 per token, bf16 teachers; stores of ~26-36 bytes per token per teacher.
  align          official DP alignment (FuseLLM tie-break), FuseLLM's per-position rule, MinED ("soft")
                 vocabulary map; fallback "next" (the papers' one-hot on the label; FuseLLM's code used the
                 current token: align.fallback="fusellm_current").
  distill        MinCE over [the student's own distribution, teacher 1, teacher 2], lambda 0.9, T 1.0,
                 fusion on every real position, CLM on every real token.
  train          2048 tokens, 128 sequences per step, one epoch (train.steps=0), AdamW lr 1e-5 cosine,
                 warmup 0.8%, betas (0.9, 0.95), weight decay 0.1, clip 1.0.
Teachers must be architectures fusion_jax.hf loads (Llama, Mistral, Qwen2, ...): MPT is not one of them; use
another teacher of a different tokenizer (e.g. a Qwen2 or Mistral checkpoint) in its place.
"""
from fusion_jax.distill.config import get_config as _get_config


def get_config(preset: str | None = None):
    return _get_config("fusellm", preset)
