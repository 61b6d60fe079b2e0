"""The arena's contestant registry: every model it compares, and how each is made.

:data:`CONTESTANTS` maps a name to ``(family, "module:function", what it is)``. The function is called as
``fn(ctx: Context) -> Entry`` and returns the directory of the model it built (an HF directory or an
UltraFuser fused directory: anything :func:`fusion_jax.eval.models.load_eval_model` reads) and the
template policy it is evaluated under. A method wing takes part by providing that function, e.g.
``fusion_jax.distill.arena:fusellm``: it trains on ``ctx.family`` (the demo zoo's base, specialists,
tokenizer and corpus) within ``ctx.budget`` and writes under ``ctx.work_dir(name)``.

A contestant whose module (or function) is not in this install is reported as **missing**, with the
reason, and never replaced by something else (:func:`resolve`).

**Template policies** (which prompt format a model is evaluated in, per domain):

- ``"base"``: the demo base's pre-training format ``{prompt}\\n`` in every domain;
- ``"own:<specialist>"``: that specialist's own template in every domain (what the UltraFuser report does);
- ``"domain"``: each domain in its own specialist's template (a merged or multi-task model has no single
  template of its own: it is asked each domain's question the way that domain's specialist was trained),
  the mixed set in the first domain's (``text``: the general chat) template;
- ``"fused"``: a fused model's own views: every specialist's template at once.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

#: name -> (family, "module:function(ctx) -> Entry", description)
CONTESTANTS: dict[str, tuple[str, str, str]] = {
    "base": ("reference", "fusion_jax.arena.builtin:base", "the demo base (pre-trained on all domains)"),
    "text": ("specialist", "fusion_jax.arena.builtin:specialist", "the text specialist"),
    "code": ("specialist", "fusion_jax.arena.builtin:specialist", "the code specialist"),
    "math": ("specialist", "fusion_jax.arena.builtin:specialist", "the math specialist"),
    "multitask": ("baseline", "fusion_jax.arena.builtin:multitask",
                  "the base fine-tuned on the union of the domains' data, UltraFuser's step budget"),
    "linear": ("merge", "fusion_jax.arena.builtin:merge", "average of the three specialists"),
    "task_arithmetic": ("merge", "fusion_jax.arena.builtin:merge", "base + weight x sum of task vectors"),
    "ties": ("merge", "fusion_jax.arena.builtin:merge", "TIES: trim, elect sign, disjoint mean"),
    "dare_ties": ("merge", "fusion_jax.arena.builtin:merge", "DARE + TIES, mergekit's L1-norm rescale"),
    "dare_ties_exact": ("merge", "fusion_jax.arena.builtin:merge", "DARE + TIES, the paper's 1/(1-p) rescale"),
    "slerp": ("merge", "fusion_jax.arena.builtin:merge", "spherical interpolation of two specialists"),
    "model_stock": ("merge", "fusion_jax.arena.builtin:merge", "Model Stock"),
    "varm": ("merge", "fusion_jax.arena.builtin:merge", "FuseChat VaRM (variance-ratio weights)"),
    "sce": ("merge", "fusion_jax.arena.builtin:merge", "FuseChat-2.0 SCE (select, calculate, erase)"),
    "ultrafuser": ("fusion", "fusion_jax.arena.builtin:ultrafuser", "UltraFuser gated fusion (two stages)"),
    "fusellm": ("distillation", "fusion_jax.distill.arena:fusellm",
                "FuseLLM: the specialists' distributions distilled into the base"),
    "fusechat": ("distillation", "fusion_jax.distill.arena:fusechat",
                 "FuseChat: pairwise fusion into the base, then merged"),
    "xft": ("upcycling", "fusion_jax.xft.arena:xft", "XFT: upcycle to MoE, train, merge back"),
}


@dataclasses.dataclass(frozen=True)
class Budget:
    """The common budget: ``steps`` optimizer steps of ``batch_per_domain`` examples of each domain
    (UltraFuser's two stages together), over at most ``train_examples`` examples per domain."""

    steps: int
    batch_per_domain: int
    train_examples: int


@dataclasses.dataclass
class Context:
    """What a contestant function gets: the zoo family (``base_dir``, ``specialist_dir(d)``,
    ``tokenizer_dir``, ``corpus()``), the domains and their specialists' prompt formats, sequence sizes,
    the budget, the mesh, the trainer options, the arena's config and its run (for ``work_dir``)."""

    family: Any
    domains: tuple[str, ...]
    formats: dict[str, str]
    seq_len: int
    max_prompt_len: int
    budget: Budget
    mesh: Any
    trainer: Any
    config: Any
    ultrafuser_config: Any
    run: Any
    log: Callable[[str], None] = print
    name: str = ""

    def work_dir(self, name: str | None = None) -> Path:
        d = self.run.work / "contestants" / (name or self.name)
        d.mkdir(parents=True, exist_ok=True)
        return d


@dataclasses.dataclass
class Entry:
    """A built contestant: its model directory and template policy (see the module docstring)."""

    path: str
    template: str = "domain"
    note: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def resolve(name: str) -> tuple[Callable | None, str]:
    """``(function, "")`` or ``(None, why it is missing)``."""
    family, target, _ = CONTESTANTS[name]
    module, fn = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and module.startswith(e.name):
            return None, f"{module} is not in this install (the {family} wing has not landed)"
        raise
    f = getattr(mod, fn, None)
    if f is None:
        return None, f"{module} has no arena entry point {fn}(ctx)"
    return f, ""
