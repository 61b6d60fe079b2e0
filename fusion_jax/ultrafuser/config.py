"""UltraFuser configuration: one ConfigDict schema, named presets, and validation before any training.

``configs/ultrafuser.py`` is the user-facing file (``get_config(preset)``); presets:

``demo``   (default) the embedded demonstration: builds (or reuses) the demo zoo and fuses it; <= 10 min
           on a 2-core CPU from an empty cache.
``smoke``  the same pipeline at toy size, end to end in well under a minute (no quality claims).
``tiny``   the smallest honest run for tests (resume, multi-process): the smoke zoo, a handful of steps,
           no generation; give ``specialists.paths`` to fuse fixture checkpoints instead of the zoo.
``paper``  the paper's schedule (arXiv 2403.08281) for three real HF specialists on a TPU/GPU mesh.

Every field can be overridden as ``--config.a.b=value``. :func:`validate` rejects unknown presets,
unknown options and inconsistent values with a :class:`~fusion_jax.errors.ConfigError` naming the
option, before any file is read or any step is taken.
"""
from __future__ import annotations

import ml_collections as mlc

from fusion_jax.data.templates import DEMO_TEMPLATES as _DEMO
from fusion_jax.errors import ConfigError
from fusion_jax.utils.configs import check_keys
from fusion_jax.zoo.config import family_and_corpus, set_demo_family, set_smoke_family
from fusion_jax.ultrafuser.data import CHAT_TEMPLATE

# Each specialist's own prompt format ("{prompt}" marks the user turn): the demo zoo's, one per domain
# (fusion_jax.data.templates.DEMO_TEMPLATES); each specialist is fine-tuned in its own.
DEMO_TEMPLATES = {name: t.prompt for name, t in _DEMO.items()}
DOMAINS = ("text", "code", "math")


def _stage(steps: int, bpd: int, lr: float, warmup: int) -> mlc.ConfigDict:
    return mlc.ConfigDict({
        "steps": steps,
        "batch_per_domain": bpd,      # class-balanced: this many examples of EACH domain per step
        "learning_rate": lr,
        "schedule": "cosine",
        "warmup_steps": warmup,
        "end_lr_ratio": 0.0,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
    })


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.method = "ultrafuser"
    c.preset = "demo"
    c.name = "ultrafuser_demo"
    c.output_dir = "runs"
    c.seed = 0

    # specialists: names (one per domain, same order as data.domains) and HF checkpoint directories;
    # no paths -> the demo zoo is built (or reused from its cache) and fused
    c.specialists = mlc.ConfigDict()
    c.specialists.names = DOMAINS
    c.specialists.paths = ()
    c.specialists.templates = mlc.ConfigDict(dict(DEMO_TEMPLATES))
    c.specialists.tokenizer = ""          # default: the first specialist's directory
    c.specialists.dtype = "float32"       # compute dtype (bfloat16 on TPU/GPU)
    c.specialists.param_dtype = ""        # "" = as stored

    c.data = mlc.ConfigDict()
    c.data.domains = DOMAINS
    # per domain: a local .json/.jsonl/.parquet file or directory (or a Hub dataset name) with
    # prompt/response columns; all empty -> the demo corpus
    c.data.train_files = mlc.ConfigDict({d: "" for d in DOMAINS})
    c.data.eval_files = mlc.ConfigDict({d: "" for d in DOMAINS})
    c.data.prompt_field = "prompt"
    c.data.response_field = "response"
    c.data.max_train_examples = 600       # per domain for the fusion stages; 0 = all
    c.data.max_eval_examples = 96         # per domain; 0 = all
    c.data.mixed_eval_examples = 96       # held-out responses that switch domain mid-answer
    # data.{seq_len, max_prompt_len, seed, n_train, n_eval} and zoo: the demo family (fusion_jax.zoo.config)
    set_demo_family(c)

    c.gate_hidden = 512
    c.loss_chunk = 32                     # sequence chunk of the fused loss ([K,B,chunk,V] live at once)
    c.stage1 = _stage(60, 8, 1e-2, 5)     # gate only
    # all weights. Stage 2 keeps fine-tuning specialists that are already fine-tuned (the zoo's lr 1e-3):
    # at 3e-4 with 4 examples per domain it sharpened each specialist on its own domain and lost the
    # mixed set (fused 3.93 vs the base's 3.93, against 3.83 after stage 1 alone), and its train loss
    # followed how hard each small batch was (the same up-and-down at 3e-4 and 1e-4). A 10x smaller
    # step than the specialists' own and twice the examples per step keep what stage 1 gained on mixed
    # text while stage 2 still sharpens the gate on each domain.
    c.stage2 = _stage(32, 8, 1e-4, 2)

    # eval_every: the held-out loss of the fused model on eval.monitor_examples of every evaluation set
    # (mixed too), every N steps of each stage: the curves in loss_curves.png and the stage-2 check
    c.trainer = mlc.ConfigDict({"save_every": 50, "keep_checkpoints": 2, "log_every": 10, "eval_every": 8,
                                "progress": True, "async_checkpointing": True})
    c.mesh = mlc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    # multi-process: coordinator_address / num_processes / process_id (or FUSION_* environment variables);
    # coordinator_address="auto": JAX's own cluster detection (TPU pods, SLURM, Open MPI)
    c.distributed = mlc.ConfigDict({"coordinator_address": "", "num_processes": 0, "process_id": -1})
    c.eval = mlc.ConfigDict({"batch_size": 50, "generate_examples": 1, "max_new_tokens": 40,
                             "monitor_examples": 24})
    return c


def _demo(c: mlc.ConfigDict) -> None:
    del c


def _smoke(c: mlc.ConfigDict) -> None:
    """End to end in well under a minute: a tiny zoo, a few steps of everything."""
    c.name = "ultrafuser_smoke"
    set_smoke_family(c)
    c.data.max_eval_examples = 16
    c.data.mixed_eval_examples = 16
    c.gate_hidden = 32
    c.loss_chunk = 16
    c.stage1 = _stage(4, 2, 1e-3, 1)
    c.stage2 = _stage(3, 2, 1e-4, 1)
    c.data.max_train_examples = 0
    c.trainer.save_every = 0              # at the end of each run only
    c.trainer.log_every = 2
    c.eval.batch_size = 16
    c.eval.generate_examples = 1
    c.eval.max_new_tokens = 4


def _tiny(c: mlc.ConfigDict) -> None:
    """The smoke zoo, even fewer steps, no sampling: for resume and multi-process tests."""
    _smoke(c)
    c.name = "ultrafuser_tiny"
    c.data.max_eval_examples = 8
    c.data.mixed_eval_examples = 8
    c.stage1 = _stage(6, 2, 1e-2, 1)
    c.stage2 = _stage(4, 2, 1e-3, 1)
    c.trainer.save_every = 2
    c.trainer.log_every = 1
    c.trainer.progress = False
    c.trainer.async_checkpointing = False
    c.eval.batch_size = 8
    c.eval.generate_examples = 0


def _paper(c: mlc.ConfigDict) -> None:
    """arXiv 2403.08281: stage 1 gate only, 400 steps x 64 per domain; stage 2 all weights, 32 per
    domain; AdamW lr 2e-5 cosine. ``specialists.paths`` and ``data.*_files`` must be given."""
    c.name = "ultrafuser_paper"
    c.specialists.dtype = "bfloat16"
    # fp32 master weights: AdamW steps of lr 2e-5 on bf16 params round to no change for most weights
    c.specialists.param_dtype = "float32"
    c.specialists.templates = mlc.ConfigDict({
        "text": "User: {prompt}\nAssistant: ",                                   # UltraLM
        "code": "[INST] {prompt} [/INST]",                                        # CodeLlama-Instruct
        "math": ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{prompt}\n\n### Response: Let's think step "
                 "by step."),                                                     # WizardMath
    })
    c.data.seq_len = 2048
    c.data.max_prompt_len = 512
    c.data.max_train_examples = 0
    c.data.max_eval_examples = 500
    c.data.mixed_eval_examples = 200
    c.loss_chunk = 256
    c.gate_hidden = 512
    c.stage1 = _stage(400, 64, 2e-5, 0)
    c.stage2 = _stage(400, 32, 2e-5, 0)
    c.trainer.save_every = 50
    c.trainer.eval_every = 50
    c.trainer.keep_checkpoints = 3
    c.eval.batch_size = 8


PRESETS = {"demo": _demo, "smoke": _smoke, "tiny": _tiny, "paper": _paper}


def get_config(preset: str | None = None) -> mlc.ConfigDict:
    """The base config with ``preset`` applied. An unknown preset is recorded and rejected by
    :func:`validate` (so that ``train.py`` reports it as a ConfigError, exit 2, not a flag traceback)."""
    c = base_config()
    preset = preset or "demo"
    c.preset = preset
    if preset in PRESETS:
        PRESETS[preset](c)
    return c


_FREE_GROUPS = ("templates", "train_files", "eval_files")   # keyed by domain


def validate(config) -> mlc.ConfigDict:
    """Check a user config (no I/O); returns a private, unlocked copy. Raises ConfigError."""
    c = mlc.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    preset = c.get("preset", "demo")
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is unknown (known: {', '.join(PRESETS)})")
    check_keys(c.to_dict(), base_config().to_dict(), free=_FREE_GROUPS)
    if c.method != "ultrafuser":
        raise ConfigError(f"method: {c.method!r}; this config is for 'ultrafuser'")
    names, domains = list(c.specialists.names), list(c.data.domains)
    if len(names) < 2:
        raise ConfigError(f"specialists.names: UltraFuser needs at least two specialists, got {names}")
    if len(set(names)) != len(names):
        raise ConfigError(f"specialists.names: duplicate names in {names}")
    if len(domains) != len(names) or len(set(domains)) != len(domains):
        raise ConfigError(f"data.domains {domains} must pair one distinct domain with each of "
                          f"specialists.names {names}")
    if "mixed" in domains:
        raise ConfigError("data.domains: 'mixed' is reserved for the mixed-domain evaluation set")
    for n in names:
        t = c.specialists.templates.get(n)
        if t is None:
            raise ConfigError(f"specialists.templates.{n}: no prompt template for specialist {n!r}")
        if str(t) != CHAT_TEMPLATE and str(t).count("{prompt}") != 1:
            raise ConfigError(f"specialists.templates.{n}: must contain '{{prompt}}' exactly once (or be "
                              f"{CHAT_TEMPLATE!r}: the tokenizer's chat template), got {t!r}")
    paths = list(c.specialists.paths)
    if paths and len(paths) != len(names):
        raise ConfigError(f"specialists.paths: {len(paths)} paths for {len(names)} specialists {names}")
    for split in ("train_files", "eval_files"):
        extra = sorted(set(c.data[split].keys()) - set(domains))
        if extra and any(str(c.data[split][d]) for d in extra):
            raise ConfigError(f"data.{split}.{extra[0]}: {extra[0]!r} is not one of data.domains {domains}")
    if preset == "paper" and not paths:
        raise ConfigError("specialists.paths: the paper preset fuses real specialists; give their three HF "
                          "directories (see configs/ultrafuser.py)")
    if paths and not any(str(c.data.train_files.get(d, "")) for d in domains):
        raise ConfigError("specialists.paths is set but data.train_files is not: the demo corpus only "
                          "goes with the demo zoo; give data.train_files/eval_files for every domain")
    for st in ("stage1", "stage2"):
        s = c[st]
        if int(s.steps) < 0:
            raise ConfigError(f"{st}.steps: must be >= 0, got {s.steps}")
        if int(s.batch_per_domain) < 1:
            raise ConfigError(f"{st}.batch_per_domain: must be >= 1, got {s.batch_per_domain}")
        if not float(s.learning_rate) > 0:
            raise ConfigError(f"{st}.learning_rate: must be > 0, got {s.learning_rate}")
        # the rest of the stage's optimizer options, checked now rather than after the zoo and evals
        from fusion_jax.train.optimizer import OptimizerConfig
        try:
            OptimizerConfig(learning_rate=float(s.learning_rate), schedule=str(s.schedule),
                            warmup_steps=int(s.warmup_steps), end_lr_ratio=float(s.end_lr_ratio),
                            weight_decay=float(s.weight_decay), grad_clip=float(s.grad_clip)).validate()
        except ConfigError as e:
            raise ConfigError(f"{st}: {e}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{st}: {e}") from None
    from fusion_jax.models.config import canonical_dtype
    canonical_dtype(str(c.specialists.dtype), where="specialists.dtype")
    if str(c.specialists.param_dtype):
        canonical_dtype(str(c.specialists.param_dtype), where="specialists.param_dtype")
    if int(c.loss_chunk) < 1:
        raise ConfigError(f"loss_chunk: must be >= 1 (positions per fused-loss chunk), got {c.loss_chunk}")
    if int(c.eval.generate_examples) > 0 and int(c.eval.max_new_tokens) < 1:
        raise ConfigError(f"eval.max_new_tokens: must be >= 1 when eval.generate_examples > 0, "
                          f"got {c.eval.max_new_tokens}")
    if int(c.data.seq_len) < 8:
        raise ConfigError(f"data.seq_len: must be at least 8, got {c.data.seq_len}")
    if not 0 < int(c.data.max_prompt_len) < int(c.data.seq_len):
        raise ConfigError(f"data.max_prompt_len: must be in (0, data.seq_len={c.data.seq_len}), "
                          f"got {c.data.max_prompt_len}")
    if int(c.gate_hidden) < 1:
        raise ConfigError(f"gate_hidden: must be >= 1, got {c.gate_hidden}")
    if int(c.trainer.eval_every) < 0:
        raise ConfigError(f"trainer.eval_every: must be >= 0 (0: no held-out curve), got {c.trainer.eval_every}")
    if int(c.eval.monitor_examples) < 0:
        raise ConfigError(f"eval.monitor_examples: must be >= 0, got {c.eval.monitor_examples}")
    if int(c.eval.batch_size) < 1:
        raise ConfigError(f"eval.batch_size: must be >= 1, got {c.eval.batch_size}")
    return c


def training_fingerprint(c: mlc.ConfigDict) -> str:
    """Hash of everything that determines the trained params (not eval/logging options, not the mesh:
    results do not depend on the device count): a run directory resumes only a run with the same
    fingerprint."""
    from fusion_jax.train.run import config_fingerprint
    return config_fingerprint(c, ("seed", "specialists", "data", "zoo", "gate_hidden", "loss_chunk", "stage1",
                                  "stage2"), drop={"data": ("max_eval_examples", "mixed_eval_examples")})


def zoo_specs(c: mlc.ConfigDict):
    """The demo zoo family (a base and one specialist per domain, each in its own template) and its corpus."""
    return family_and_corpus(c, tuple((n, str(c.specialists.templates[n])) for n in c.specialists.names))
