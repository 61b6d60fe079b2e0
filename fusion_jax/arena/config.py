"""Arena configuration: one ConfigDict schema, two presets, validation before any work.

``configs/arena.py`` is the user-facing file. The zoo, the data and UltraFuser's schedule are those of
``configs/ultrafuser.py`` at ``ultrafuser.preset`` (so the arena shares the main job's zoo cache and can
reuse its finished run); the arena adds what it compares and how.

``demo``  (default) the embedded demo zoo, every method, the full evaluation; <= 15 min on 2 cores with
          the zoo cached.
``smoke`` the UltraFuser smoke zoo, every method at toy size, a few evaluation items (a test runs it).
"""
from __future__ import annotations

import ml_collections as mlc

from fusion_jax.errors import ConfigError

DEFAULT_CONTESTANTS = (
    "base", "text", "code", "math", "multitask",
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_ties_exact", "slerp", "model_stock", "varm", "sce",
    "ultrafuser", "fusellm", "fusechat", "xft",
)


def _merges() -> mlc.ConfigDict:
    """Each merge method's parameters (mergekit's names). ``weight``/``density`` apply to every
    specialist; SLERP interpolates between the two specialists of ``slerp.pair``."""
    return mlc.ConfigDict({
        "linear": {"weight": 1.0},                               # the plain average of the specialists
        "task_arithmetic": {"weight": 0.5},                      # base + 0.5 * sum of task vectors
        "ties": {"weight": 1.0, "density": 0.5},
        "dare_ties": {"weight": 1.0, "density": 0.5},            # mergekit's L1-norm rescale
        "dare_ties_exact": {"weight": 1.0, "density": 0.5},      # the paper's exact 1/(1-p) rescale
        "slerp": {"t": 0.5, "pair": ("code", "math")},
        "model_stock": {},
        "varm": {},
        "sce": {"select_topk": 0.5},
    })


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.method = "arena"
    c.preset = "demo"
    c.name = "arena"
    c.output_dir = "runs"
    c.seed = 0
    c.contestants = DEFAULT_CONTESTANTS
    # the UltraFuser configuration the zoo, data and UltraFuser's run come from (configs/ultrafuser.py)
    c.ultrafuser = mlc.ConfigDict({"preset": "demo",
                                   # a finished main job (python train.py --config=configs/ultrafuser.py)
                                   # with the same training fingerprint is reused, not retrained
                                   "reuse_dir": "runs/ultrafuser_demo"})
    c.zoo_cache_dir = ""                  # "" = the UltraFuser config's (~/.cache/fusion_jax/zoo)
    c.merges = _merges()
    c.merge_seed = 0
    # the multi-task baseline: the base fine-tuned on every domain's data (each example in its domain's
    # specialist template, domain-balanced batches) for UltraFuser's two stages' steps and batch
    c.multitask = mlc.ConfigDict({"learning_rate": 1e-3, "warmup_steps": 8})
    c.eval = mlc.ConfigDict({
        "loss_examples": 96,              # per domain (the UltraFuser report's held-out sets: the first N)
        "mixed_examples": 96,
        "math_problems": 48,              # demo math eval problems, greedy answer accuracy
        "math_max_new_tokens": 96,
        "code_tasks": 24,                 # generated function + test tasks, pass@1 in the sandbox
        "code_max_new_tokens": 72,
        "batch_size": 48,
    })
    c.trainer = mlc.ConfigDict({"save_every": 50, "keep_checkpoints": 1, "log_every": 10, "progress": True,
                                "async_checkpointing": False})
    return c


def _demo(c):
    del c


def _smoke(c):
    c.name = "arena_smoke"
    c.ultrafuser.preset = "smoke"
    c.ultrafuser.reuse_dir = ""
    c.eval.loss_examples = 8
    c.eval.mixed_examples = 4
    c.eval.math_problems = 3
    c.eval.math_max_new_tokens = 8
    c.eval.code_tasks = 3
    c.eval.code_max_new_tokens = 8
    c.eval.batch_size = 8
    c.trainer.save_every = 0
    c.trainer.progress = False


PRESETS = {"demo": _demo, "smoke": _smoke}


def get_config(preset: str | None = None) -> mlc.ConfigDict:
    c = base_config()
    c.preset = preset or "demo"
    if c.preset in PRESETS:
        PRESETS[c.preset](c)
    return c


def validate(config) -> mlc.ConfigDict:
    """Check a user config (no I/O); returns a private copy. Raises ConfigError naming the option."""
    from fusion_jax.arena.contestants import CONTESTANTS
    c = mlc.ConfigDict(config.to_dict() if hasattr(config, "to_dict") else dict(config))
    if c.get("preset", "demo") not in PRESETS:
        raise ConfigError(f"preset: {c.preset!r} is unknown (known: {', '.join(PRESETS)})")
    schema = base_config().to_dict()
    for k, v in c.to_dict().items():
        if k not in schema:
            raise ConfigError(f"{k}: unknown option (known: {', '.join(sorted(schema))})")
        if isinstance(schema[k], dict) and k != "merges":
            for kk in v:
                if kk not in schema[k]:
                    raise ConfigError(f"{k}.{kk}: unknown option (known: {', '.join(sorted(schema[k]))})")
    if c.method != "arena":
        raise ConfigError(f"method: {c.method!r}; this config is for 'arena'")
    names = list(c.contestants)
    if not names:
        raise ConfigError("contestants: empty (known: " + ", ".join(CONTESTANTS) + ")")
    for n in names:
        if n not in CONTESTANTS:
            raise ConfigError(f"contestants: {n!r} is unknown (known: {', '.join(CONTESTANTS)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"contestants: duplicates in {names}")
    from fusion_jax.ultrafuser.config import PRESETS as UPRESETS
    if c.ultrafuser.preset not in UPRESETS or c.ultrafuser.preset == "paper":
        raise ConfigError(f"ultrafuser.preset: {c.ultrafuser.preset!r}; the arena runs on the demo zoo "
                          "(demo, smoke or tiny)")
    for m in c.merges:
        if m not in _merges():
            raise ConfigError(f"merges.{m}: unknown merge contestant (known: {', '.join(_merges())})")
    pair = tuple(c.merges.slerp.pair)
    if len(pair) != 2 or pair[0] == pair[1] or any(p not in ("text", "code", "math") for p in pair):
        raise ConfigError(f"merges.slerp.pair: two different specialists of text, code, math; got {pair}")
    for k in ("loss_examples", "mixed_examples", "batch_size", "math_max_new_tokens", "code_max_new_tokens"):
        if int(c.eval[k]) < 1:
            raise ConfigError(f"eval.{k}: must be >= 1, got {c.eval[k]}")
    for k in ("math_problems", "code_tasks"):
        if int(c.eval[k]) < 0:
            raise ConfigError(f"eval.{k}: must be >= 0 (0: skip that metric), got {c.eval[k]}")
    if not float(c.multitask.learning_rate) > 0:
        raise ConfigError(f"multitask.learning_rate: must be > 0, got {c.multitask.learning_rate}")
    return c


def ultrafuser_config(c: mlc.ConfigDict) -> mlc.ConfigDict:
    """The UltraFuser config the arena's zoo, data and UltraFuser run come from."""
    from fusion_jax.ultrafuser import config as ucfg
    u = ucfg.get_config(str(c.ultrafuser.preset))
    if str(c.zoo_cache_dir):
        u.zoo.cache_dir = str(c.zoo_cache_dir)
    u.trainer.progress = bool(c.trainer.progress)
    return ucfg.validate(u)


def fingerprint(c: mlc.ConfigDict) -> str:
    """What the arena's trained and merged models depend on (not the evaluation sizes)."""
    from fusion_jax.train.run import config_fingerprint
    from fusion_jax.ultrafuser.config import training_fingerprint
    u = ultrafuser_config(c)
    d = {"uf": training_fingerprint(u), **{k: c.to_dict()[k] for k in ("seed", "merges", "merge_seed", "multitask")}}
    return config_fingerprint(d, tuple(d))
