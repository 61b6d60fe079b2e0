"""FuseLLM / FuseChat configuration: one ConfigDict schema for both methods, named presets, validation
before any work.

``configs/fusellm.py`` and ``configs/fusechat.py`` are the user-facing files (``get_config(preset)``).
Presets:

``demo``   (default) the embedded demonstration on the demo zoo: a Llama/BPE student and two teachers
           of other architectures and tokenizers (Qwen2 with a SentencePiece-style unigram vocabulary,
           Mistral with sliding-window attention and a smaller BPE), <= 10 min on a 2-core CPU from an
           empty cache.
``smoke``  the same pipeline at toy size, end to end in well under a minute (no quality claims).
``paper``  the published hyperparameters (reference file section 6) for real checkpoints: give
           ``student.path``, ``teachers.paths`` and ``data.train_files``.

Every field can be overridden as ``--config.a.b=value``; :func:`validate` rejects unknown presets,
unknown options and inconsistent values with a :class:`~fusion_jax.errors.ConfigError` naming the option.
"""
from __future__ import annotations

import ml_collections as mlc

from fusion_jax.errors import ConfigError
from fusion_jax.utils.configs import check_keys
from fusion_jax.zoo.config import lm_run

METHODS = ("fusellm", "fusechat")
DOMAINS = ("text", "code", "math")
MERGE_METHODS = ("varm", "sce", "sce_fusechat", "linear")


def _family(tokenizer: str, vocab: int, arch: str, d: int, f: int, layers: int, heads: int, kv: int, window: int,
            pretrain: mlc.ConfigDict) -> mlc.ConfigDict:
    return mlc.ConfigDict({"tokenizer": tokenizer, "vocab_size": vocab, "architecture": arch, "hidden_size": d,
                           "intermediate_size": f, "num_layers": layers, "num_heads": heads, "num_kv_heads": kv,
                           "sliding_window": window, "pretrain": pretrain})


def base_config(method: str = "fusellm") -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.method = method
    c.preset = "demo"
    c.name = f"{method}_demo"
    c.output_dir = "runs"
    c.seed = 0

    # the student (FuseChat: the pivot): an HF directory, or "" for the demo zoo's student family
    c.student = mlc.ConfigDict({"path": "", "tokenizer": "", "dtype": "float32", "param_dtype": ""})
    # the teachers (FuseChat: the sources): names, HF directories (any architecture fusion_jax.hf loads)
    # and tokenizers (default: each model's directory); no paths -> the demo zoo's teacher families
    c.teachers = mlc.ConfigDict({"names": ("qwen2", "mistral"), "paths": (), "tokenizers": ()})

    c.data = mlc.ConfigDict()
    c.data.domains = DOMAINS
    # per domain a local .json/.jsonl/.parquet file or directory (or a Hub dataset name) with prompt and
    # response fields (FuseLLM's documents are prompt + "\n" + response, or a `text` field); all empty ->
    # the demo corpus
    c.data.train_files = mlc.ConfigDict({d: "" for d in DOMAINS})
    c.data.eval_files = mlc.ConfigDict({d: "" for d in DOMAINS})
    c.data.prompt_field = "prompt"
    c.data.response_field = "response"
    c.data.template = "{prompt}\n"        # FuseChat: ONE prompt format for every model (and the evaluation)
    c.data.seq_len = 128                  # training sequences, in every tokenizer
    c.data.eval_seq_len = 160             # evaluation: prompt + response (cut to fit every tokenizer)
    c.data.max_train_examples = 240       # per domain; 0 = all
    c.data.max_eval_examples = 48         # per domain; 0 = all
    c.data.seed = 0                       # demo corpus
    c.data.n_train = 1500                 # demo corpus: examples per domain
    c.data.n_eval = 100

    c.zoo = mlc.ConfigDict()
    c.zoo.cache_dir = "~/.cache/fusion_jax/zoo"
    c.zoo.seed = 0
    c.zoo.student = _family("bpe", 1024, "LlamaForCausalLM", 96, 256, 2, 2, 2, 0, lm_run(90, 16, 3e-3, 10))
    c.zoo.teachers = mlc.ConfigDict({
        "qwen2": _family("unigram", 1536, "Qwen2ForCausalLM", 128, 352, 3, 4, 2, 0, lm_run(300, 16, 3e-3, 15)),
        "mistral": _family("bpe", 768, "MistralForCausalLM", 128, 352, 3, 4, 4, 48, lm_run(300, 16, 3e-3, 15)),
    })

    c.teacher_pass = mlc.ConfigDict({
        "store_dir": "",                  # "" = <run>/work/stores; a shared directory reuses finished stores
        "top_k": 10,
        "batch_per_device": 8,            # rows per device per step (the same on any device count)
        "shard_sequences": 256,           # sequences per store shard (the unit of resume)
        "pad_multiple": 64,               # rows are padded to their own length rounded up to this
        "logit_format": "q8",             # "q8": log-prob offsets in 1/16 nat (1 byte); "f16": float16
        "logit_chunk": 512,               # positions per top-k chunk ([B, chunk, V] logits live at once)
        "dtype": "float32",               # teacher compute dtype (bfloat16 on TPU/GPU)
        "shard_params": False,            # True: FSDP-shard big teachers (bytes may then depend on the mesh)
    })
    if method == "fusellm":
        c.align = mlc.ConfigDict({"tie_break": "fusellm", "rule": "fusellm", "vocab_map": "mined",
                                  "fallback": "next"})
    else:
        c.align = mlc.ConfigDict({"tie_break": "fusechat2", "rule": "fusechat2", "vocab_map": "statistics",
                                  "fallback": "next"})
    c.distill = mlc.ConfigDict({
        "fusion": "mince",                # "mince" | "avgce"
        "lam": 0.9,                       # loss = lam * CLM + (1 - lam) * CE(student, fused target)
        "temperature": 1.0,
        "reward_precision": "float32",    # "bfloat16": the official trainers' rounding (ties go to the ref)
        "with_ref_model": True,           # the student's own pre-trained distribution is a candidate
        "loss_chunk": 128,                # sequence chunk of the loss ([B, chunk, V] student logits at once)
    })
    c.train = mlc.ConfigDict({"steps": 40, "batch": 8, "learning_rate": 1e-3, "warmup_steps": 8,
                              "warmup_ratio": 0.0, "schedule": "cosine", "end_lr_ratio": 0.1,
                              "weight_decay": 0.0, "grad_clip": 1.0, "b2": 0.999})
    c.baseline = True                     # also train the student without the fusion term (same data, steps)
    c.merge = mlc.ConfigDict({"method": "varm", "select_topk": 1.0, "dtype": "float32"})   # FuseChat

    c.trainer = mlc.ConfigDict({"save_every": 50, "keep_checkpoints": 2, "log_every": 5, "progress": True,
                                "async_checkpointing": True})
    c.mesh = mlc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.distributed = mlc.ConfigDict({"coordinator_address": "", "num_processes": 0, "process_id": -1})
    c.eval = mlc.ConfigDict({"batch_size": 48})
    return c


def _demo(c: mlc.ConfigDict) -> None:
    del c


def _smoke(c: mlc.ConfigDict) -> None:
    """End to end in well under a minute: tiny families, a few steps of everything."""
    c.name = f"{c.method}_smoke"
    c.data.n_train = 60
    c.data.n_eval = 8
    c.data.seq_len = 128
    c.data.eval_seq_len = 128
    c.data.max_train_examples = 12
    c.data.max_eval_examples = 4
    c.zoo.student = _family("bpe", 320, "LlamaForCausalLM", 32, 64, 1, 2, 2, 0, lm_run(4, 8, 3e-3, 1))
    c.zoo.teachers = mlc.ConfigDict({
        "qwen2": _family("unigram", 420, "Qwen2ForCausalLM", 32, 64, 1, 2, 1, 0, lm_run(4, 8, 3e-3, 1)),
        "mistral": _family("bpe", 290, "MistralForCausalLM", 32, 64, 1, 2, 2, 16, lm_run(4, 8, 3e-3, 1)),
    })
    c.teacher_pass.batch_per_device = 4
    c.teacher_pass.shard_sequences = 32
    c.teacher_pass.pad_multiple = 128      # one padded shape per model (fewer compiles)
    c.train.steps = 3
    c.train.batch = 2
    c.train.warmup_steps = 1
    c.distill.loss_chunk = 16
    c.trainer.save_every = 0
    c.trainer.log_every = 1
    c.eval.batch_size = 12


def _paper(c: mlc.ConfigDict) -> None:
    """Reference file section 6. FuseLLM: Llama-2-7B student, OpenLLaMA-7B-v2 and MPT-7B teachers,
    MiniPile, top-10, MinED ("soft") map, MinCE with the ref model, lambda 0.9, T 1.0, 2048 tokens,
    128 sequences per step, 1 epoch, lr 1e-5 cosine, warmup 0.8%, AdamW (0.9, 0.95), wd 0.1, clip 1.0
    (the README's optimizer; its DeepSpeed JSON would override the schedule). FuseChat: OpenChat-3.5
    pivot, pairwise MinCE with the pivot on response tokens, 3 epochs, lr 5e-6 cosine, warmup 3%, wd 0,
    AdamW (0.9, 0.999), 128 x 2048; merge SCE (top 10%) or VaRM."""
    c.name = f"{c.method}_paper"
    c.student.dtype = "bfloat16"
    c.student.param_dtype = "float32"
    c.teacher_pass.dtype = "bfloat16"
    c.teacher_pass.shard_sequences = 4096
    c.teacher_pass.pad_multiple = 256
    c.teacher_pass.batch_per_device = 8
    c.data.seq_len = 2048
    c.data.eval_seq_len = 2048
    c.data.max_train_examples = 0
    c.data.max_eval_examples = 500
    c.distill.loss_chunk = 256
    c.train.steps = 0                     # 0 = one epoch over the corpus (FuseLLM), see train.epochs
    c.train.batch = 128                   # sequences per step; per domain when several domains are given
    c.train.warmup_steps = 0
    c.train.end_lr_ratio = 0.0
    c.train.grad_clip = 1.0
    c.trainer.save_every = 200
    c.trainer.keep_checkpoints = 3
    c.eval.batch_size = 8
    if c.method == "fusellm":
        c.train.learning_rate = 1e-5
        c.train.warmup_ratio = 0.008
        c.train.weight_decay = 0.1
        c.train.b2 = 0.95
        c.data.domains = ("text",)
        c.data.train_files = mlc.ConfigDict({"text": ""})
        c.data.eval_files = mlc.ConfigDict({"text": ""})
    else:
        c.train.learning_rate = 5e-6
        c.train.warmup_ratio = 0.03
        c.train.weight_decay = 0.0
        c.train.b2 = 0.999
        c.merge.method = "sce"
        c.merge.select_topk = 0.1
        c.merge.dtype = "bfloat16"


PRESETS = {"demo": _demo, "smoke": _smoke, "paper": _paper}


def get_config(method: str, preset: str | None = None) -> mlc.ConfigDict:
    """The base config of ``method`` with ``preset`` applied (an unknown preset is rejected by
    :func:`validate`, so that train.py reports it as a ConfigError, exit 2)."""
    c = base_config(method)
    preset = preset or "demo"
    c.preset = preset
    if preset in PRESETS:
        PRESETS[preset](c)
    return c


def _choice(value, known, option):
    if value not in known:
        raise ConfigError(f"{option}: {value!r} is unknown (known: {', '.join(known)})")


def validate(config) -> mlc.ConfigDict:
    """Check a user config (no I/O); returns a private, unlocked copy. Raises ConfigError."""
    c = mlc.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    method = c.get("method")
    _choice(method, METHODS, "method")
    preset = c.get("preset", "demo")
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is unknown (known: {', '.join(PRESETS)})")
    # data.train_files / eval_files are keyed by domain; zoo.teachers by teacher name, each a model family
    check_keys(c.to_dict(), base_config(method).to_dict(), free=("data.train_files", "data.eval_files"),
               each=("zoo.teachers",))
    names = [str(n) for n in c.teachers.names]
    what = "teachers" if method == "fusellm" else "sources"
    if len(names) < 1 or (method == "fusellm" and len(names) < 1):
        raise ConfigError(f"teachers.names: at least one of the {what} is needed")
    if len(set(names)) != len(names) or "student" in names or "ref" in names:
        raise ConfigError(f"teachers.names: names must be distinct and not 'student' or 'ref', got {names}")
    paths = list(c.teachers.paths)
    if paths and len(paths) != len(names):
        raise ConfigError(f"teachers.paths: {len(paths)} paths for {len(names)} {what} {names}")
    toks = list(c.teachers.tokenizers)
    if toks and len(toks) != len(names):
        raise ConfigError(f"teachers.tokenizers: {len(toks)} tokenizers for {len(names)} {what} {names}")
    if bool(paths) != bool(str(c.student.path)):
        raise ConfigError("student.path and teachers.paths go together: give both (your models) or neither "
                          "(the demo zoo)")
    if not paths:
        missing = [n for n in names if n not in c.zoo.teachers]
        if missing:
            raise ConfigError(f"zoo.teachers.{missing[0]}: no demo-zoo family for teacher {missing[0]!r} "
                              f"(known: {', '.join(c.zoo.teachers)}); give teachers.paths for your own models")
        if set(c.data.domains) - set(DOMAINS):
            raise ConfigError(f"data.domains: the demo corpus has domains {', '.join(DOMAINS)}")
    domains = list(c.data.domains)
    if not domains or len(set(domains)) != len(domains):
        raise ConfigError(f"data.domains: distinct domain names needed, got {domains}")
    has_files = any(str(c.data.train_files.get(d, "")) for d in domains)
    if paths and not has_files:
        raise ConfigError("data.train_files: your own models need your data (a file for every domain in "
                          "data.domains); the demo corpus goes with the demo zoo")
    if preset == "paper" and not paths:
        raise ConfigError("student.path / teachers.paths: the paper preset distils real checkpoints; give them "
                          f"(see configs/{method}.py)")
    tp = c.teacher_pass
    _choice(str(tp.logit_format), ("q8", "f16"), "teacher_pass.logit_format")
    for key, lo in (("top_k", 1), ("batch_per_device", 1), ("shard_sequences", 1), ("pad_multiple", 1),
                    ("logit_chunk", 1)):
        if int(tp[key]) < lo:
            raise ConfigError(f"teacher_pass.{key}: must be >= {lo}, got {tp[key]}")
    if int(tp.top_k) > 255:
        raise ConfigError(f"teacher_pass.top_k: at most 255, got {tp.top_k}")
    from fusion_jax.distill.aligned import AlignOptions
    AlignOptions(**c.align.to_dict())
    d = c.distill
    from fusion_jax.distill.fusion import METHODS as FUSIONS, REWARD_PRECISIONS
    _choice(str(d.fusion), FUSIONS, "distill.fusion")
    _choice(str(d.reward_precision), REWARD_PRECISIONS, "distill.reward_precision")
    if not 0.0 <= float(d.lam) <= 1.0:
        raise ConfigError(f"distill.lam: must be in [0, 1], got {d.lam}")
    if not float(d.temperature) > 0:
        raise ConfigError(f"distill.temperature: must be > 0, got {d.temperature}")
    if int(d.loss_chunk) < 1:
        raise ConfigError(f"distill.loss_chunk: must be >= 1, got {d.loss_chunk}")
    if method == "fusechat" and not bool(d.with_ref_model):
        raise ConfigError("distill.with_ref_model: FuseChat's pairwise fusion is between the pivot's own "
                          "distribution and one source's; it cannot be False")
    t = c.train
    if int(t.steps) < 0 or int(t.batch) < 1 or not float(t.learning_rate) > 0:
        raise ConfigError(f"train: steps >= 0, batch >= 1 and learning_rate > 0 needed, got steps={t.steps}, "
                          f"batch={t.batch}, learning_rate={t.learning_rate}")
    if not 0.0 <= float(t.warmup_ratio) < 1.0:
        raise ConfigError(f"train.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    from fusion_jax.train.optimizer import OptimizerConfig
    try:
        OptimizerConfig(learning_rate=float(t.learning_rate), schedule=str(t.schedule),
                        warmup_steps=int(t.warmup_steps), end_lr_ratio=float(t.end_lr_ratio),
                        weight_decay=float(t.weight_decay), grad_clip=float(t.grad_clip), b2=float(t.b2)).validate()
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"train: {e}") from None
    if method == "fusechat":
        _choice(str(c.merge.method), MERGE_METHODS, "merge.method")
        if not 0.0 < float(c.merge.select_topk) <= 1.0:
            raise ConfigError(f"merge.select_topk: must be in (0, 1], got {c.merge.select_topk}")
    if int(c.data.seq_len) < 16 or int(c.data.eval_seq_len) < 16:
        raise ConfigError(f"data.seq_len / data.eval_seq_len: must be at least 16, got {c.data.seq_len} / "
                          f"{c.data.eval_seq_len}")
    if int(c.eval.batch_size) < 1:
        raise ConfigError(f"eval.batch_size: must be >= 1, got {c.eval.batch_size}")
    if "{prompt}" not in str(c.data.template):
        raise ConfigError(f"data.template: must contain '{{prompt}}', got {c.data.template!r}")
    return c


def fingerprint(c: mlc.ConfigDict) -> str:
    """Hash of everything that determines the trained params (not evaluation or logging options, not
    the mesh): a run directory resumes only a run with the same fingerprint."""
    from fusion_jax.train.run import config_fingerprint
    return config_fingerprint(c, ("method", "seed", "student", "teachers", "data", "zoo", "teacher_pass", "align",
                                  "distill", "train", "baseline", "merge"),
                              drop={"data": ("max_eval_examples", "eval_seq_len", "eval_files"),
                                    "teacher_pass": ("store_dir", "batch_per_device", "logit_chunk")})
