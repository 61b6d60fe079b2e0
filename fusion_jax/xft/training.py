"""XFT's training stages on the common Trainer: the losses, one resumable stage run, held-out evaluation.

* MoE SFT (``moe_sft_loss``): response-token cross-entropy plus the routers' balance loss summed over layers
  (``ModelOutput.aux.balance_loss``; the reference adds it to the CE as is), both logged apart (``ce``,
  ``balance_loss``); the step's PRNG key drives the noisy gating, so every step draws fresh noise, while
  evaluation (no key) routes on the clean logits. ``router_agreement`` (logged): the share of the experts
  chosen under noise that the clean logits choose too, mean over layers: k/n means the noise, not the
  router, does the choosing.
* merge-back training (``merge_loss``): each layer's FFN is ``merge_back(moe, alpha)`` recomputed inside
  the loss (as ``LlamaWeightedMLP`` does every forward); only ``alpha`` is trainable
  (:data:`ALPHA_TRAINABLE`), every other param is frozen: no gradient, no optimizer state, bit-identical.
* the dense SFT baseline: the plain decoder's response-token CE (``train.losses.nnx_causal_lm_loss``).

Every stage is one :class:`~fusion_jax.train.Trainer` run over a :class:`DomainBalancedSampler` (Orbax
checkpoints in its work directory, automatic resume). ``start_step`` starts the sampler at a later batch:
the merge stage trains on the batches after the MoE SFT's, the dense baseline on all of them, so both
arms see the same data. Trainers run under the mesh as the context mesh (the Trainer does it), so the MoE
runs expert-parallel over the mesh's ``expert`` axis; :data:`BATCH_RULES` shards the batch over
``expert`` too (else every device of an expert group would run the same attention).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np

from fusion_jax import sharding as shd
from fusion_jax.train.losses import next_token_ce

ALPHA_TRAINABLE = r"^alpha$"
BATCH_KEYS = ("input_ids", "attention_mask", "loss_mask")
#: the batch axis over (data, fsdp, expert): see the module docstring and BENCHMARKS.md (XFT)
BATCH_RULES = shd.make_rules({"batch": ("data", "fsdp", "expert")})


# -- models ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def graph(config) -> tuple[Any, Any]:
    """``(graphdef, logical axes of the params)`` of a ``CausalLM`` of ``config`` (no weights are made)."""
    from flax import nnx

    from fusion_jax.models import abstract_model
    graphdef, state = nnx.split(abstract_model(config), nnx.Param)
    return graphdef, shd.state_logical_axes(state)


@functools.lru_cache(maxsize=None)
def lm_evaluator(config) -> Callable:
    """One jitted ``make_lm_eval`` per model config: every stage's monitor and the final evaluation of
    models of one shape share its compilations."""
    from fusion_jax.eval.loss import make_lm_eval
    return make_lm_eval(graph(config)[0])


def _merge_model(graphdef, params):
    from flax import nnx
    return nnx.merge(graphdef, nnx.State(params) if not isinstance(params, nnx.State) else params)


def moe_sft_loss(graphdef) -> Callable:
    """``loss_fn(params, batch, rng)``: CE on response tokens + balance loss; noisy gating keyed by ``rng``."""
    def loss_fn(params, batch, rng):
        out = _merge_model(graphdef, params)(batch["input_ids"], attention_mask=batch["attention_mask"],
                                             router_key=rng)
        ce, aux = next_token_ce(out.logits, batch["input_ids"], batch["loss_mask"])
        balance = out.aux.balance_loss
        return ce + balance, {"num_tokens": aux["num_tokens"], "accuracy": aux["accuracy"], "ce": ce,
                              "balance_loss": balance, "router_agreement": out.aux.noise_agreement.mean()}
    return loss_fn


def merged_params(moe_config, params: Mapping[str, Any], shared_weight: float) -> dict:
    """The dense params of ``{"alpha": [L, n], "moe": MoE params}`` (``merge_back``)."""
    from fusion_jax.xft.merge import merge_back
    return merge_back(params["moe"], moe_config, params["alpha"], shared_weight)[1]


def merge_loss(dense_graphdef, moe_config, shared_weight: float) -> Callable:
    """``loss_fn(params, batch, rng)`` over ``{"alpha", "moe"}``: CE of the merged dense model."""
    def loss_fn(params, batch, rng):
        del rng
        model = _merge_model(dense_graphdef, merged_params(moe_config, params, shared_weight))
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return next_token_ce(logits, batch["input_ids"], batch["loss_mask"])
    return loss_fn


# -- one stage -------------------------------------------------------------------------------------------
def train_stage(name: str, loss_fn, params, axes, sets: Mapping[str, Mapping[str, np.ndarray]], *, steps: int,
                batch_per_domain: int, optimizer, workdir: Path, mesh, seed: int, data_seed: int, trainer_cfg,
                start_step: int = 0, trainable=None, eval_fn=None, save_frozen: bool = True,
                log: Callable[[str], None] = print):
    """One resumable Trainer run; returns ``(params, metrics rows, resumed_from)``. ``params`` go in as
    host arrays (the Trainer donates its device buffers); ``sets``: ``{domain: arrays}``, ``batch_per_domain``
    rows of each per step, batches ``start_step ..`` of the sampler seeded ``data_seed``."""
    from fusion_jax.data.sampler import DomainBalancedSampler
    from fusion_jax.train import Trainer, TrainerConfig
    from fusion_jax.train.metrics import read_jsonl

    sampler = DomainBalancedSampler({d: {k: a[k] for k in BATCH_KEYS} for d, a in sets.items()}, batch_per_domain,
                                    seed=data_seed, process_index=jax.process_index(),
                                    process_count=jax.process_count())
    sampler.set_state({"step": int(start_step)})
    t = trainer_cfg
    tc = TrainerConfig(total_steps=int(steps), workdir=str(workdir), seed=int(seed), save_every=int(t.save_every),
                       keep_checkpoints=int(t.keep_checkpoints), log_every=max(1, min(int(t.log_every), int(steps))),
                       eval_every=int(t.eval_every) if eval_fn is not None else 0, progress=bool(t.progress),
                       async_checkpointing=bool(t.async_checkpointing), save_frozen=save_frozen)
    trainer = Trainer(loss_fn, jax.tree.map(np.asarray, params), optimizer, tc, trainable=trainable, mesh=mesh,
                      param_logical_axes=axes, rules=BATCH_RULES, meta={"stage": name}, eval_fn=eval_fn)
    try:
        result = trainer.run(sampler)
    finally:
        trainer.close()
    if result.resumed_from is not None:
        log(f"{name}: resumed from step {result.resumed_from} ({Path(workdir) / 'checkpoints'})")
    f = Path(workdir) / "logs" / "metrics.jsonl"
    return shd.host_tree(result.params), (read_jsonl(f) if f.is_file() else []), result.resumed_from


# -- evaluation -------------------------------------------------------------------------------------------
def heldout_losses(ev, params, sets: Mapping[str, Mapping[str, np.ndarray]], batch_size: int, mesh
                   ) -> dict[str, float]:
    """``{domain: mean response-token CE}`` of one decoder (``ev`` from ``make_lm_eval``) on ``mesh``."""
    from fusion_jax.eval.loss import lm_loss
    return {d: lm_loss(ev, params, {k: a[k] for k in BATCH_KEYS}, batch_size, mesh) for d, a in sets.items()}


def place(params, config, mesh):
    """``params`` on ``mesh`` by the model's logical axes (the rules the stages train with)."""
    from fusion_jax.models import param_logical_axes
    return shd.place_params(params, param_logical_axes(config), mesh, BATCH_RULES)


@functools.lru_cache(maxsize=None)
def _load_fn(config) -> Callable:
    graphdef = graph(config)[0]

    @jax.jit
    def load(params, batch):
        out = _merge_model(graphdef, params)(batch["input_ids"], segment_ids=batch["segment_ids"],
                                             positions=batch["positions"], return_logits=False)
        return out.aux.expert_load
    return load


def expert_load(config, params, packed: Mapping[str, np.ndarray], rows: int, mesh) -> np.ndarray:
    """``[L, n]`` share of the routed assignments that go to each routed expert, over the tokens of
    ``packed`` (rows filled with real tokens, so that no padding routes; the last partial batch is left
    out), in evaluation mode (clean logits). Each row sums to 1."""
    load = _load_fn(config)
    full = np.nonzero(packed["attention_mask"].all(axis=1))[0]
    if not len(full):   # a set shorter than one row
        full = np.arange(len(packed["input_ids"]))
    rows = max(1, min(int(rows), len(full)))
    total = None
    for i in range(0, len(full) - rows + 1, rows):
        b = {k: packed[k][full[i:i + rows]] for k in ("input_ids", "segment_ids", "positions")}
        x = np.asarray(shd.to_host(load(params, shd.put_replicated_batch(b, mesh))), np.float64)
        total = x if total is None else total + x
    return total / total.sum(axis=1, keepdims=True)
