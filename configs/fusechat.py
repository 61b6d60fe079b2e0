"""FuseChat (arXiv 2402.16107, 2408.07990): pairwise fusion of each source into the pivot, then the
pairwise targets merged (VaRM or SCE).

Run:  python train.py --config=configs/fusechat.py             # the demo (builds/reuses the demo zoo)
      python train.py --config=configs/fusechat.py:smoke       # tiny end-to-end check (< 1 min)
      fusion-jax teacher-pass configs/fusechat.py              # only the stores of the pivot and the sources
      python train.py --config=configs/fusechat.py:paper \\
          --config.student.path=/ckpt/openchat_3.5 \\
          --config.teachers.names="('internlm2','qwen15')" \\
          --config.teachers.paths="('/ckpt/internlm2-chat-20b','/ckpt/Qwen1.5-72B-Chat')" \\
          --config.data.train_files.text=fusechat_mixture.jsonl ...

Any field can be overridden as --config.a.b=value; unknown options and presets are errors (exit 2).

The method (reference/fusellm_fusechat.md): every example in ONE prompt format (data.template) for all
models; for each source, the pivot is trained with lambda * SFT + (1 - lambda) * CE(pivot, target), the
target per sequence the MinCE choice between the pivot's own pre-trained distribution and the source's
aligned one, on positions whose next token is a response token; FuseChat-2.0's alignment (its DP
tie-break and per-position rule) and statistics-based vocabulary map from the aligned pairs' counts.
The pairwise targets are then merged with merge.method: "varm" (the paper's per-matrix weights from the
mean squared deltas against the pivot), "sce" (mergekit's SCE), "sce_fusechat" (the released fork) or
"linear". Paper preset: 3 epochs, lr 5e-6 cosine, warmup 3%, 128 x 2048, SCE with select_topk 0.1.
"""
from fusion_jax.distill.config import get_config as _get_config


def get_config(preset: str | None = None):
    return _get_config("fusechat", preset)
