"""UltraFuser (arXiv 2403.08281): gated fusion of specialists of one architecture and tokenizer.

Run:  python train.py --config=configs/ultrafuser.py              # the demo (builds/reuses the demo zoo)
      python train.py --config=configs/ultrafuser.py:smoke        # tiny end-to-end check (< 1 min)
      python train.py --config=configs/ultrafuser.py:tiny         # smallest run (tests: resume, 2 processes)
      python train.py --config=configs/ultrafuser.py:paper \\
          --config.specialists.paths="('/ckpt/UltraLM-13b','/ckpt/CodeLlama-13b-Instruct-hf','/ckpt/WizardMath-13B-V1.0')" \\
          --config.data.train_files.text=ultrachat_train.jsonl --config.data.eval_files.text=ultrachat_eval.jsonl \\
          ... (code, math likewise)

Any field can be overridden as --config.a.b=value; unknown options and presets are errors (exit 2).
A run writes runs/<name>/ and resumes from runs/<name>/work/ when the same command is run again.

The real run (what the `paper` preset sets; give the paths and data):
  specialists.names      ("text", "code", "math"), paired with data.domains in order.
  specialists.paths      three HF directories with ONE tokenizer and ONE architecture, e.g. UltraLM-13B
                         (text), CodeLlama-13B-Instruct (code), WizardMath-13B (math): Llama-2-13B shaped,
                         32000-token Llama-2 vocabulary. Checked (files, architecture, vocabulary) before
                         any weight is read.
  specialists.templates  each specialist's own prompt format, "{prompt}" marks the user turn, or "chat"
                         for the (shared) tokenizer's chat template (the paper
                         renders every example in every specialist's template; responses line up).
  data.train_files.<d>   per domain a local .json/.jsonl/.parquet (or a Hub dataset name) with
                         prompt/response columns: UltraChat (text), Code-Alpaca/Magicoder (code),
                         MetaMathQA/GSM8K-train (math). data.eval_files.<d>: held-out sets.
  mesh                   {"data": 1, "fsdp": -1, "tensor": 1, "expert": 1}: FSDP over all chips (stacked
                         specialist params sharded on their embed axis); on a 3n-chip slice expert=3 puts
                         one specialist on each group of n chips. Multi-host: set distributed.* (or the
                         FUSION_COORDINATOR_ADDRESS / FUSION_NUM_PROCESSES / FUSION_PROCESS_ID variables).
  stage1                 400 steps, 64 examples PER DOMAIN per batch, gate only, AdamW lr 2e-5 cosine.
  stage2                 400 steps, 32 examples per domain, all weights, AdamW lr 2e-5 cosine.
  specialists.dtype      "bfloat16" compute (params as stored); loss_chunk 256 tokens; seq_len 2048.
"""
from fusion_jax.ultrafuser.config import get_config as _get_config


def get_config(preset: str | None = None):
    return _get_config(preset)
