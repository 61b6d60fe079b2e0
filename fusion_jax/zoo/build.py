"""The demo zoo: small models trained offline from nothing, for every method's demo, tests and the arena.

A **family** is one tokenizer and one architecture: a base pre-trained on the three-domain demo corpus
(plain ``prompt\\nresponse`` documents, packed with segment ids) and, optionally, one specialist per
domain fine-tuned from it on ONE domain in its OWN prompt template (as UltraLM, CodeLlama and WizardMath
differ), with the loss on response tokens only. Families differ in tokenizer (byte-level BPE "Ġ" or
SentencePiece-style unigram "▁", any vocabulary size: :mod:`fusion_jax.data.tokenizer`) and architecture
(Llama, Mistral, Qwen2: :mod:`fusion_jax.models`), which is what cross-tokenizer distillation needs;
UltraFuser fuses one family's specialists.

Every training run goes through :class:`fusion_jax.train.Trainer`, so a killed build resumes from its
Orbax checkpoints (``<cache>/<key>.work/``). The finished family is one directory ``<cache>/<key>/`` (key =
hash of everything that shapes it), moved into place atomically and reused by later runs:

    corpus.json        {domain: {"train": [...], "eval": [...]}} prompt/response examples
    tokenizer/         transformers tokenizer directory
    base/, <domain>/   HF checkpoints (transformers loads them)
    zoo.json           spec, loss curves, timings, model config
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
from flax import nnx

from fusion_jax import sharding as shd
from fusion_jax.errors import ConfigError, DataError
from fusion_jax.train.report import curve
from fusion_jax.train.run import barrier, is_main, train_on_arrays
from fusion_jax.utils.atomic import atomic_directory

ZOO_FORMAT = 3
ZOO_JSON = "zoo.json"
DEFAULT_CACHE = "~/.cache/fusion_jax/zoo"


@dataclasses.dataclass(frozen=True)
class LMRun:
    """One training run's schedule: ``steps`` of ``batch`` rows (per domain when balanced), AdamW with
    ``warmup_steps`` of linear warmup then cosine decay to 10% of ``learning_rate``."""

    steps: int
    batch: int
    learning_rate: float
    warmup_steps: int = 0

    @classmethod
    def from_config(cls, c: Any) -> "LMRun":
        d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
        return cls(int(d["steps"]), int(d["batch"]), float(d["learning_rate"]), int(d.get("warmup_steps", 0)))


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
    """The demo corpus (:func:`fusion_jax.data.demo_corpus.build_demo_corpus`)."""

    seed: int = 0
    n_train: int = 1500
    n_eval: int = 100
    domains: tuple[str, ...] = ("text", "code", "math")


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """Everything that shapes one family of the zoo (its cache key is a hash of this and the corpus)."""

    pretrain: LMRun
    tokenizer: str = "bpe"                   # "bpe" | "unigram"
    vocab_size: int = 1024
    architecture: str = "LlamaForCausalLM"   # any of fusion_jax.models.config.ARCHITECTURES
    hidden_size: int = 96
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 2
    sliding_window: int | None = None        # Mistral: a window shorter than seq_len makes it matter
    tie_word_embeddings: bool = False
    seq_len: int = 96
    max_prompt_len: int = 40
    seed: int = 0
    # one specialist per (domain, prompt format) pair, fine-tuned from the base; () = the base only
    specialists: tuple[tuple[str, str], ...] = ()
    finetune: LMRun | None = None

    def __post_init__(self):
        from fusion_jax.data.tokenizer import KINDS
        from fusion_jax.models.config import ARCHITECTURES
        if self.tokenizer not in KINDS:
            raise ConfigError(f"zoo tokenizer {self.tokenizer!r} is unknown (known: {', '.join(KINDS)})")
        if self.architecture not in ARCHITECTURES:
            raise ConfigError(f"zoo architecture {self.architecture!r} is unknown "
                              f"(known: {', '.join(ARCHITECTURES)})")
        if self.specialists and self.finetune is None:
            raise ConfigError("zoo: specialists need a finetune run")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError(f"zoo: hidden_size {self.hidden_size}, num_heads {self.num_heads} and num_kv_heads "
                              f"{self.num_kv_heads} must divide evenly")

    @property
    def domains(self) -> tuple[str, ...]:
        return tuple(d for d, _ in self.specialists)


def family_key(spec: FamilySpec, corpus: CorpusSpec) -> str:
    blob = json.dumps({"format": ZOO_FORMAT, "family": dataclasses.asdict(spec),
                       "corpus": dataclasses.asdict(corpus)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Family:
    """A built family on disk (see the module docstring for the layout)."""

    root: Path

    @property
    def tokenizer_dir(self) -> Path:
        return self.root / "tokenizer"

    @property
    def base_dir(self) -> Path:
        return self.root / "base"

    def specialist_dir(self, domain: str) -> Path:
        return self.root / domain

    def corpus(self) -> dict:
        return json.loads((self.root / "corpus.json").read_text())

    def meta(self) -> dict:
        return json.loads((self.root / ZOO_JSON).read_text())

    def curves(self) -> dict[str, list]:
        return self.meta().get("curves", {})


def model_config(spec: FamilySpec, tok):
    from fusion_jax.models import ModelConfig
    d, h = spec.hidden_size, spec.num_heads
    return ModelConfig(
        architecture=spec.architecture, vocab_size=len(tok), hidden_size=d,
        intermediate_size=spec.intermediate_size, num_layers=spec.num_layers, num_heads=h,
        num_kv_heads=spec.num_kv_heads, head_dim=d // h, max_position_embeddings=max(256, spec.seq_len),
        rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=spec.tie_word_embeddings,
        attention_bias=spec.architecture == "Qwen2ForCausalLM",
        sliding_window=spec.sliding_window if spec.architecture != "LlamaForCausalLM" else None)


def stacked_sft_loss(loss_fn, names):
    """Loss of K models stacked on a leading axis, model k on the rows of domain ``names[k]``.

    Batches come from a DomainBalancedSampler: row i belongs to domain ``sorted(names)[i % K]``."""
    import jax.numpy as jnp
    K = len(names)
    order = [sorted(names).index(n) for n in names]   # model k <- sorted-domain slot order[k]

    def f(params, batch, rng):
        b = {k: v for k, v in batch.items() if k != "domain_id"}
        b = {k: jnp.swapaxes(v.reshape((-1, K) + v.shape[1:]), 0, 1)[jnp.asarray(order)] for k, v in b.items()}
        losses, aux = jax.vmap(lambda p, x: loss_fn(p, x, rng))(params, b)
        out = {"num_tokens": aux["num_tokens"].sum()}
        out.update({f"loss/{n}": losses[k] for k, n in enumerate(names)})
        return losses.sum(), out

    return f


def _tokenizer(spec: FamilySpec, corpus: dict, work: Path, log):
    """Train the tokenizer once (process 0), reuse it on resume; every process loads it."""
    from fusion_jax.data.templates import CHAT_FORMAT
    from fusion_jax.data.tokenizer import load_tokenizer, train_tokenizer
    tdir = work / "tokenizer"
    if is_main() and not (tdir / "tokenizer.json").is_file():
        t = time.perf_counter()
        texts = [s for dom in corpus.values() for ex in dom["train"] for s in (ex["prompt"], ex["response"])]
        # the templates' fixed words, so that they become single tokens as in a real model's vocabulary
        extra = [fmt.replace("{prompt}", " ") for _, fmt in spec.specialists if fmt != CHAT_FORMAT] * 50
        train_tokenizer(texts, tdir, vocab_size=spec.vocab_size, extra_texts=extra, kind=spec.tokenizer)
        log(f"  tokenizer: {spec.tokenizer}, vocab {spec.vocab_size} ({time.perf_counter() - t:.1f}s)")
    barrier("zoo-tokenizer")
    return load_tokenizer(tdir)


def build_family(spec: FamilySpec, corpus_spec: CorpusSpec, *, cache_dir: str | Path = DEFAULT_CACHE, mesh=None,
                 trainer_cfg: Any, log: Callable[[str], None] = print, name: str = "demo zoo") -> Family:
    """Build (or reuse) one family of the zoo; returns it. ``trainer_cfg``: the runs' checkpoint/logging
    options (``save_every``, ``keep_checkpoints``, ``log_every``, ``progress``, ``async_checkpointing``)."""
    from fusion_jax import hf
    from fusion_jax.data.demo_corpus import build_demo_corpus
    from fusion_jax.data.packing import encode_documents, pack_sequences
    from fusion_jax.data.templates import render_dataset, template_from_format
    from fusion_jax.models import CausalLM
    from fusion_jax.train.losses import nnx_causal_lm_loss

    out = Path(str(cache_dir)).expanduser() / family_key(spec, corpus_spec)
    if (out / ZOO_JSON).is_file():
        log(f"{name}: reusing {out}")
        return Family(out)
    mesh = mesh if mesh is not None else shd.make_mesh()
    work = out.parent / f"{out.name}.work"
    log(f"{name}: building {out} (resumable work in {work}; cached for later runs)")
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    corpus = build_demo_corpus(seed=corpus_spec.seed, n_train=corpus_spec.n_train, n_eval=corpus_spec.n_eval,
                               domains=tuple(corpus_spec.domains))
    timings["corpus_s"] = time.perf_counter() - t0
    log("  corpus: " + ", ".join(f"{d} {len(v['train'])}/{len(v['eval'])}" for d, v in corpus.items())
        + " train/eval examples")
    t = time.perf_counter()
    tok = _tokenizer(spec, corpus, work, log)
    timings["tokenizer_s"] = time.perf_counter() - t
    cfg = model_config(spec, tok)
    S, seed = spec.seq_len, spec.seed

    # -- pre-train the base on the mixture (plain documents, packed) ----------------------------------
    t = time.perf_counter()
    docs = [ex["prompt"] + "\n" + ex["response"] for d in corpus for ex in corpus[d]["train"]]
    docs = [docs[i] for i in np.random.default_rng(seed).permutation(len(docs))]
    packed = pack_sequences(encode_documents(tok, docs), S, tok.pad_token_id, mode="concat")
    if len(packed["input_ids"]) < spec.pretrain.batch:
        raise DataError(f"{name}: {len(packed['input_ids'])} packed rows, fewer than the pre-training batch "
                        f"{spec.pretrain.batch}")
    model = CausalLM(cfg, rngs=nnx.Rngs(seed))
    graphdef, state = nnx.split(model, nnx.Param)
    axes = shd.state_logical_axes(state)
    loss_fn = nnx_causal_lm_loss(graphdef)
    base, base_rows = train_on_arrays(loss_fn, nnx.to_pure_dict(state), axes, packed, spec.pretrain,
                                      work / "base", mesh, seed, trainer_cfg, "pre-train base")
    timings["pretrain_s"] = time.perf_counter() - t
    log(f"  base: {cfg.architecture} {cfg.num_params() / 1e6:.2f}M params, {len(packed['input_ids'])} packed "
        f"rows of {S} tokens ({timings['pretrain_s']:.0f}s)")

    # -- one specialist per domain, fine-tuned in its own template ------------------------------------
    # The fine-tunes are independent runs of one shape; they train side by side as ONE vmapped Trainer
    # run over params stacked on the expert axis (one compile, bigger matmuls on a small CPU): the
    # balanced sampler gives every step `batch` rows of each domain and specialist k sees only its
    # domain's rows. The loss is the SUM of the per-specialist means, so each specialist's gradient is
    # exactly its own; AdamW is per parameter; clipping is off (a global norm would couple them).
    curves = {"base": curve(base_rows)}
    base = shd.host_tree(base)
    specialists = {}
    if spec.specialists:
        t = time.perf_counter()
        names = list(spec.domains)
        rows = {}
        for d, fmt in spec.specialists:
            if d not in corpus:
                raise ConfigError(f"zoo: specialist domain {d!r} is not in the corpus ({', '.join(corpus)})")
            r = render_dataset(tok, corpus[d]["train"], template_from_format(d, fmt), S, domains=(d,),
                               max_prompt_len=spec.max_prompt_len)
            rows[d] = {k: r[k] for k in ("input_ids", "attention_mask", "loss_mask")}
        stacked0 = jax.tree.map(lambda x: np.stack([x] * len(names)), base)
        stacked_axes = jax.tree.map(lambda ax: ("expert",) + tuple(ax), axes, is_leaf=lambda x: isinstance(x, tuple))
        stacked, ft_rows = train_on_arrays(stacked_sft_loss(loss_fn, names), stacked0, stacked_axes, rows,
                                           spec.finetune, work / "finetune", mesh, seed + 1, trainer_cfg,
                                           "fine-tune specialists", grad_clip=None)
        stacked = shd.host_tree(stacked)
        specialists = {d: jax.tree.map(lambda x, k=k: x[k], stacked) for k, d in enumerate(names)}
        for d in names:
            curves[d] = curve(ft_rows, f"loss/{d}")
        timings["finetune_s"] = time.perf_counter() - t

    # -- write the family (process 0), atomically -------------------------------------------------------
    if is_main():
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "corpus.json").write_text(json.dumps(corpus))
            shutil.copytree(work / "tokenizer", tmp / "tokenizer")
            hf.save(base, cfg, tmp / "base", source_dir=work / "tokenizer")
            for d, p in specialists.items():
                hf.save(p, cfg, tmp / d, source_dir=work / "tokenizer")
            timings["total_s"] = time.perf_counter() - t0
            (tmp / ZOO_JSON).write_text(json.dumps(
                {"key": out.name, "spec": dataclasses.asdict(spec), "corpus": dataclasses.asdict(corpus_spec),
                 "timings_s": timings, "curves": curves, "model_config": cfg.to_hf(),
                 "num_params": cfg.num_params()}, indent=2, default=str))
        shutil.rmtree(work, ignore_errors=True)
    barrier("zoo-written")
    log(f"{name}: built in {time.perf_counter() - t0:.0f}s")
    return Family(out)


def spec_from_config(z: Mapping[str, Any] | Any, *, seq_len: int, max_prompt_len: int,
                     specialists: tuple[tuple[str, str], ...] = ()) -> FamilySpec:
    """A FamilySpec from a config group with the zoo's model fields (``vocab_size``, ``hidden_size``, ...,
    ``pretrain`` and optionally ``finetune`` runs, ``tokenizer``, ``architecture``)."""
    d = z.to_dict() if hasattr(z, "to_dict") else dict(z)
    fields = {f.name for f in dataclasses.fields(FamilySpec)}
    kw = {k: v for k, v in d.items() if k in fields and k not in ("pretrain", "finetune", "specialists")}
    if "sliding_window" in kw and not kw["sliding_window"]:
        kw["sliding_window"] = None
    return FamilySpec(pretrain=LMRun.from_config(d["pretrain"]),
                      finetune=LMRun.from_config(d["finetune"]) if d.get("finetune") else None,
                      seq_len=int(seq_len), max_prompt_len=int(max_prompt_len), specialists=tuple(specialists),
                      **kw)
