"""XFT configuration: one ConfigDict schema, named presets, and validation before any training.

``configs/xft.py`` is the user-facing file (``get_config(preset)``); presets:

``demo``   (default) the embedded demonstration on the demo zoo's base (the UltraFuser demo family, so the
           zoo cache is shared): dense SFT against XFT (upcycle -> MoE SFT -> learned merge-back) with
           the same data and steps, the fixed merge as an ablation. <= 10 min on 2 CPU cores, zoo cached.
``smoke``  the same pipeline at toy size (the UltraFuser smoke zoo), end to end in well under a minute.
``tiny``   the smallest honest run, for tests (resume, devices): give ``model.path`` and data files.
``paper``  ise-uiuc/xft's hyperparameters for deepseek-coder-1.3b-base on Evol-Instruct-110K (give the
           checkpoint and the data file), on a TPU/GPU mesh.

The step budget is shared by construction: the dense SFT baseline runs ``sft.steps + merge.steps`` steps
(warmup ``sft.warmup_steps + merge.warmup_steps``) with the MoE SFT's optimizer, on the same batches
(the MoE SFT sees batches 0..sft.steps-1, the merge stage the next merge.steps): the reference's dense
baseline trains 5 epochs, its MoE 4 epochs plus 1 epoch of merge training.

Every field can be overridden as ``--config.a.b=value``. :func:`validate` rejects unknown presets,
unknown options and inconsistent values with a :class:`~fusion_jax.errors.ConfigError` naming the
option, before any file is read or any step is taken.
"""
from __future__ import annotations

import ml_collections as mlc

from fusion_jax.data.templates import CHAT_FORMAT, DEMO_TEMPLATES as _DEMO
from fusion_jax.errors import ConfigError
from fusion_jax.utils.configs import check_keys
from fusion_jax.zoo.config import family_and_corpus, set_demo_family, set_smoke_family

DEMO_TEMPLATES = {name: t.prompt for name, t in _DEMO.items()}
DOMAINS = ("text", "code", "math")
OPTIMIZERS = ("adafactor", "adamw")
# Magicoder's training prompt (ise-uiuc/magicoder src/magicoder/prompt_template.py, which XFT forks): the
# prompt of the paper preset's Evol-Instruct data
MAGICODER_TEMPLATE = ("You are an exceptionally intelligent coding assistant that consistently delivers "
                      "accurate and reliable responses to user instructions.\n\n@@ Instruction\n{prompt}\n\n"
                      "@@ Response\n")


def _stage(steps: int, bpd: int, lr: float, warmup: int) -> mlc.ConfigDict:
    # the reference (train_moe.sh, train_weighted.sh): Adafactor as the HF Trainer builds it, linear decay
    # to 0 after a linear warmup, no gradient clipping (max_grad_norm -1)
    return mlc.ConfigDict({
        "steps": steps,
        "batch_per_domain": bpd,      # class-balanced: this many examples of EACH domain per step
        "optimizer": "adafactor",     # adafactor | adamw
        "learning_rate": lr,
        "schedule": "linear",
        "warmup_steps": warmup,
        "end_lr_ratio": 0.0,
        "weight_decay": 0.0,
        "grad_clip": 0.0,             # global-norm clipping; 0 = none (the reference's max_grad_norm -1)
    })


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.method = "xft"
    c.preset = "demo"
    c.name = "xft_demo"
    c.output_dir = "runs"
    c.seed = 0

    # the dense model to upcycle: an HF directory, or "" for the demo zoo's base
    c.model = mlc.ConfigDict()
    c.model.path = ""                     # its tokenizer files too (copied into the merged checkpoint)
    c.model.dtype = "float32"             # compute dtype (bfloat16 on TPU/GPU)
    c.model.param_dtype = ""              # "" = as stored (the paper preset: bfloat16, as the reference)

    c.data = mlc.ConfigDict()
    c.data.domains = DOMAINS
    # per domain: the prompt format ("{prompt}" marks the user's text; "chat" = the tokenizer's chat
    # template); the demo renders each domain as its zoo specialist was fine-tuned
    c.data.templates = mlc.ConfigDict(dict(DEMO_TEMPLATES))
    # per domain: a local .json/.jsonl/.parquet file or directory (or a Hub dataset name) with
    # prompt/response columns; all empty -> the demo corpus
    c.data.train_files = mlc.ConfigDict({d: "" for d in DOMAINS})
    c.data.eval_files = mlc.ConfigDict({d: "" for d in DOMAINS})
    c.data.prompt_field = "prompt"
    c.data.response_field = "response"
    # per domain. 300 examples at 8 per domain and step make the reference's schedule in epochs: MoE SFT
    # 4 epochs (150 steps), merge 1 epoch (38), dense SFT 5 (188)
    c.data.max_train_examples = 300
    c.data.max_eval_examples = 0          # per domain; 0 = all (the demo corpus holds 100)

    # data.{seq_len, max_prompt_len, seed, n_train, n_eval} and zoo: the demo family (fusion_jax.zoo.config),
    # the UltraFuser demo's with the same templates, so both methods share one cached base + specialists
    set_demo_family(c)

    # XFT's upcycling (convert_dense_to_moe.py): 8 experts, expert 0 shared and always on, top-5 of the
    # other 7 (6 active), router and noise layers N(0, 0.02), noisy gating in training
    c.upcycle = mlc.ConfigDict({"experts": 8, "top_k": 5, "routing": "xft", "noise": True, "router_std": 0.02,
                                "noise_eps": 0.01, "balance_loss_coef": 0.01})

    # MoE SFT (all weights). The demo's lr: the zoo's own fine-tuning lr (1e-3, AdamW there); the
    # reference's 5e-5 is for a 1.3B model
    c.sft = _stage(150, 8, 1e-3, 11)
    # merge-back training: only alpha trains; lambda (shared_weight) is fixed. lr = the reference's ratio to
    # the SFT lr (1e-5 / 5e-5); at that lr Adafactor moves each alpha by about lr per step, so the learned
    # merge stays close to the fixed 0.75 W_0 + 0.25 mean(W_i) (xft.md 4c): the report shows both
    c.merge = _stage(38, 8, 2e-4, 3)
    c.merge.shared_weight = 0.75
    # the dense SFT baseline: the MoE SFT's optimizer and lr, sft.steps + merge.steps steps
    c.baseline = mlc.ConfigDict({"enabled": True})

    c.export = mlc.ConfigDict({"dtype": ""})   # the merged dense checkpoint's dtype ("" = the model's)

    # eval_every: held-out loss on eval.monitor_examples of every domain, every N steps of each stage
    c.trainer = mlc.ConfigDict({"save_every": 50, "keep_checkpoints": 2, "log_every": 10, "eval_every": 25,
                                "progress": True, "async_checkpointing": True})
    # expert: the mesh axis the experts are split over (expert parallelism); the batch is split over
    # (data, fsdp, expert) so that attention is not repeated on every device of an expert group
    c.mesh = mlc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 1})
    c.distributed = mlc.ConfigDict({"coordinator_address": "", "num_processes": 0, "process_id": -1})
    c.eval = mlc.ConfigDict({"batch_size": 50, "monitor_examples": 32})
    return c


def _demo(c: mlc.ConfigDict) -> None:
    del c


def _smoke(c: mlc.ConfigDict) -> None:
    """End to end in well under a minute: the UltraFuser smoke zoo, a few steps of everything."""
    c.name = "xft_smoke"
    set_smoke_family(c)
    c.data.max_train_examples = 0
    c.data.max_eval_examples = 16
    c.sft = _stage(4, 2, 1e-3, 1)
    c.merge = _stage(2, 2, 2e-4, 1)
    c.merge.shared_weight = 0.75
    c.trainer.save_every = 0              # at the end of each run only
    c.trainer.log_every = 2
    c.trainer.eval_every = 2
    c.eval.batch_size = 16
    c.eval.monitor_examples = 8


def _tiny(c: mlc.ConfigDict) -> None:
    """The smoke sizes with frequent synchronous checkpoints and no progress bars: for tests (give
    ``model.path`` and data files, or keep the smoke zoo)."""
    _smoke(c)
    c.name = "xft_tiny"
    c.sft = _stage(12, 2, 1e-3, 1)
    c.merge = _stage(4, 2, 2e-4, 1)
    c.merge.shared_weight = 0.75
    c.trainer.save_every = 2
    c.trainer.log_every = 1
    c.trainer.eval_every = 4
    c.trainer.progress = False
    c.trainer.async_checkpointing = False
    c.eval.batch_size = 8
    c.eval.monitor_examples = 4


def _paper(c: mlc.ConfigDict) -> None:
    """ise-uiuc/xft for deepseek-coder-1.3b-base (xft.md 5, 4c): Evol-Instruct-110K in Magicoder's prompt,
    sequence length 1024, batch 64, Adafactor, linear decay; MoE SFT 4 epochs (1719 steps each) at 5e-5 with
    500 warmup steps in pure bf16; merge 1 epoch at 1e-5 with 125 warmup; the dense baseline (5 epochs,
    625 warmup) runs when ``baseline.enabled``. Give ``model.path`` and ``data.train_files.code`` (and an
    eval file)."""
    c.name = "xft_paper"
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"      # the reference trains pure bf16 weights (from_pretrained bf16)
    c.data.domains = ("code",)
    c.data.templates = mlc.ConfigDict({"code": MAGICODER_TEMPLATE})
    c.data.train_files = mlc.ConfigDict({"code": ""})
    c.data.eval_files = mlc.ConfigDict({"code": ""})
    c.data.prompt_field = "instruction"
    c.data.seq_len = 1024
    c.data.max_prompt_len = 512
    c.data.max_train_examples = 0
    c.data.max_eval_examples = 500
    c.sft = _stage(4 * 1719, 64, 5e-5, 500)
    c.merge = _stage(1719, 64, 1e-5, 125)
    c.merge.shared_weight = 0.75
    c.baseline.enabled = False            # 8.6K more steps; enable to reproduce the SFT_dense row
    c.trainer.save_every = 500
    c.trainer.eval_every = 500
    c.trainer.keep_checkpoints = 2
    c.mesh = mlc.ConfigDict({"data": 1, "fsdp": -1, "tensor": 1, "expert": 8})
    c.eval.batch_size = 16
    c.eval.monitor_examples = 64


PRESETS = {"demo": _demo, "smoke": _smoke, "tiny": _tiny, "paper": _paper}


def get_config(preset: str | None = None) -> mlc.ConfigDict:
    """The base config with ``preset`` applied. An unknown preset is recorded and rejected by
    :func:`validate` (a ConfigError, exit 2, not a flag traceback)."""
    c = base_config()
    preset = preset or "demo"
    c.preset = preset
    if preset in PRESETS:
        PRESETS[preset](c)
    return c


_FREE_GROUPS = ("templates", "train_files", "eval_files")   # keyed by domain


def _int(c, path: str, lo: int | None = None) -> int:
    node = c
    for p in path.split("."):
        node = node[p]
    if isinstance(node, bool) or not isinstance(node, int):
        raise ConfigError(f"{path}: expected an integer, got {node!r}")
    if lo is not None and node < lo:
        raise ConfigError(f"{path}: must be >= {lo}, got {node}")
    return node


def _check_stage(c, st: str) -> None:
    s = c[st]
    _int(c, f"{st}.steps", 1)
    _int(c, f"{st}.batch_per_domain", 1)
    _int(c, f"{st}.warmup_steps", 0)
    if str(s.optimizer) not in OPTIMIZERS:
        raise ConfigError(f"{st}.optimizer: {s.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    try:
        if not float(s.learning_rate) > 0:
            raise ConfigError(f"{st}.learning_rate: must be > 0, got {s.learning_rate}")
        if float(s.grad_clip) < 0:
            raise ConfigError(f"{st}.grad_clip: must be >= 0 (0: no clipping), got {s.grad_clip}")
        if float(s.weight_decay) < 0:
            raise ConfigError(f"{st}.weight_decay: must be >= 0, got {s.weight_decay}")
        stage_optimizer(s).validate()
    except ConfigError as e:
        msg = str(e)
        raise ConfigError(msg if msg.startswith(f"{st}.") else f"{st}: {msg}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{st}: {e}") from None


def stage_optimizer(s, *, warmup_extra: int = 0):
    """The :class:`~fusion_jax.train.optimizer.OptimizerConfig` of a stage group (``sft``, ``merge``);
    ``warmup_extra``: more warmup steps (the dense baseline's: the merge stage's too)."""
    from fusion_jax.train.optimizer import OptimizerConfig
    clip = float(s.grad_clip)
    return OptimizerConfig(name=str(s.optimizer), learning_rate=float(s.learning_rate), schedule=str(s.schedule),
                           warmup_steps=int(s.warmup_steps) + warmup_extra, end_lr_ratio=float(s.end_lr_ratio),
                           weight_decay=float(s.weight_decay), grad_clip=clip if clip > 0 else None)


def validate(config) -> mlc.ConfigDict:
    """Check a user config (no I/O); returns a private, unlocked copy. Raises ConfigError naming the option."""
    c = mlc.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    preset = c.get("preset", "demo")
    if preset not in PRESETS:
        raise ConfigError(f"preset: {preset!r} is unknown (known: {', '.join(PRESETS)})")
    check_keys(c.to_dict(), base_config().to_dict(), free=_FREE_GROUPS)
    if c.method != "xft":
        raise ConfigError(f"method: {c.method!r}; this config is for 'xft'")
    domains = list(c.data.domains)
    if not domains or len(set(domains)) != len(domains):
        raise ConfigError(f"data.domains: expected distinct domain names, got {domains}")
    for d in domains:
        t = c.data.templates.get(d)
        if t is None:
            raise ConfigError(f"data.templates.{d}: no prompt template for domain {d!r}")
        if str(t) != CHAT_FORMAT and str(t).count("{prompt}") != 1:
            raise ConfigError(f"data.templates.{d}: must contain '{{prompt}}' exactly once (or be "
                              f"{CHAT_FORMAT!r}: the tokenizer's chat template), got {t!r}")
    for split in ("train_files", "eval_files"):
        extra = sorted(set(c.data[split].keys()) - set(domains))
        if extra and any(str(c.data[split][d]) for d in extra):
            raise ConfigError(f"data.{split}.{extra[0]}: {extra[0]!r} is not one of data.domains {domains}")
    path = str(c.model.path)
    files = any(str(c.data.train_files.get(d, "")) for d in domains)
    if path and not files:
        raise ConfigError("model.path is set but data.train_files is not: the demo corpus only goes with the "
                          "demo zoo; give data.train_files (and data.eval_files) for every domain")
    if files and not path:
        raise ConfigError("data.train_files is set but model.path is not: give the dense model to upcycle "
                          "(model.path), or leave both empty for the demo zoo")
    if not path and set(domains) - set(DOMAINS):
        raise ConfigError(f"data.domains: the demo corpus has domains {', '.join(DOMAINS)}, got {domains}")
    if preset == "paper" and not path:
        raise ConfigError("model.path: the paper preset upcycles a real model (deepseek-coder-1.3b-base); give "
                          "its HF directory and data.train_files.code (see configs/xft.py)")
    u = c.upcycle
    experts, top_k = _int(c, "upcycle.experts", 2), _int(c, "upcycle.top_k", 1)
    if str(u.routing) not in ("xft", "topk"):
        raise ConfigError(f"upcycle.routing: {u.routing!r} is not one of xft, topk")
    routed = experts - 1 if str(u.routing) == "xft" else experts
    if top_k > routed or (str(u.routing) == "topk" and top_k >= experts):
        raise ConfigError(f"upcycle.top_k: {top_k} must be smaller than upcycle.experts {experts}"
                          + (" minus the shared expert 0" if str(u.routing) == "xft" else ""))
    if not isinstance(u.noise, bool):
        raise ConfigError(f"upcycle.noise: expected true or false, got {u.noise!r}")
    for f in ("router_std", "noise_eps", "balance_loss_coef"):
        if not float(u[f]) >= 0:
            raise ConfigError(f"upcycle.{f}: must be >= 0, got {u[f]}")
    for st in ("sft", "merge"):
        _check_stage(c, st)
    if c.baseline.enabled is True and int(c.merge.batch_per_domain) != int(c.sft.batch_per_domain):
        raise ConfigError(f"merge.batch_per_domain: {c.merge.batch_per_domain} must equal sft.batch_per_domain "
                          f"{c.sft.batch_per_domain} when baseline.enabled (the dense baseline trains on the same "
                          "batches as the MoE SFT and the merge stage together)")
    if not 0.0 <= float(c.merge.shared_weight) <= 1.0:
        raise ConfigError(f"merge.shared_weight: lambda must be in [0, 1], got {c.merge.shared_weight}")
    if not isinstance(c.baseline.enabled, bool):
        raise ConfigError(f"baseline.enabled: expected true or false, got {c.baseline.enabled!r}")
    from fusion_jax.models.config import canonical_dtype
    canonical_dtype(str(c.model.dtype), where="model.dtype")
    if str(c.model.param_dtype):
        canonical_dtype(str(c.model.param_dtype), where="model.param_dtype")
    if str(c.export.dtype):
        canonical_dtype(str(c.export.dtype), where="export.dtype")
    if _int(c, "data.seq_len") < 8:
        raise ConfigError(f"data.seq_len: must be at least 8, got {c.data.seq_len}")
    if not 0 < _int(c, "data.max_prompt_len") < int(c.data.seq_len):
        raise ConfigError(f"data.max_prompt_len: must be in (0, data.seq_len={c.data.seq_len}), "
                          f"got {c.data.max_prompt_len}")
    _int(c, "data.max_train_examples", 0)
    _int(c, "data.max_eval_examples", 0)
    _int(c, "trainer.eval_every", 0)
    _int(c, "trainer.save_every", 0)
    _int(c, "trainer.log_every", 1)
    _int(c, "eval.monitor_examples", 0)
    _int(c, "eval.batch_size", 1)
    return c


def training_fingerprint(c: mlc.ConfigDict) -> str:
    """Hash of everything that determines the trained params (not eval/logging options, not the mesh:
    results do not depend on the device count): a run directory resumes only a run with the same one."""
    from fusion_jax.train.run import config_fingerprint
    return config_fingerprint(c, ("seed", "model", "data", "zoo", "upcycle", "sft", "merge", "baseline"),
                              drop={"data": ("max_eval_examples",)})


def zoo_specs(c: mlc.ConfigDict):
    """The demo zoo family whose base XFT upcycles (a base and one specialist per domain, each in its
    domain's template: for the demo preset the UltraFuser demo's family, one cache entry) and its corpus."""
    return family_and_corpus(c, tuple((d, str(c.data.templates[d])) for d in c.data.domains))
