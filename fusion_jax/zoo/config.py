"""The demo family's configuration, one copy for every method that builds on it.

UltraFuser and XFT (and the arena, through UltraFuser's config) train on the same demo family: a base
and one specialist per domain. The family's cache key is a hash of these fields and of the corpus fields
of ``data`` (``seq_len``, ``max_prompt_len``, ``seed``, ``n_train``, ``n_eval``) and the templates, so
the methods share one cached zoo only while their values agree: they are set here, not in each
method's config.
"""
from __future__ import annotations

import ml_collections as mlc


def lm_run(steps: int, batch: int, lr: float, warmup: int) -> mlc.ConfigDict:
    """One zoo training run (pre-training or a specialist's fine-tuning): AdamW, cosine schedule."""
    return mlc.ConfigDict({"steps": steps, "batch": batch, "learning_rate": lr, "warmup_steps": warmup})


def set_demo_family(c: mlc.ConfigDict) -> None:
    """``c.zoo`` and the corpus fields of ``c.data`` (a group that exists) for the demo family: a 2-layer
    d=96 Llama on a 1024-token byte-level BPE, pre-trained on all domains, then one specialist per domain;
    ~3.5 min to build on 2 CPU cores, cached under ``zoo.cache_dir``."""
    c.data.seq_len = 96                   # prompt (in the longest template) + response, in tokens
    c.data.max_prompt_len = 40            # prompts are cut (from the left) to this when space is short
    c.data.seed = 0                       # the demo corpus (and UltraFuser's mixed set)
    c.data.n_train = 1500                 # demo corpus: examples per domain
    c.data.n_eval = 100
    c.zoo = mlc.ConfigDict()
    c.zoo.cache_dir = "~/.cache/fusion_jax/zoo"
    c.zoo.seed = 0
    c.zoo.vocab_size = 1024
    c.zoo.hidden_size = 96
    c.zoo.intermediate_size = 256
    c.zoo.num_layers = 2
    c.zoo.num_heads = 2
    c.zoo.num_kv_heads = 2
    c.zoo.pretrain = lm_run(150, 16, 3e-3, 15)
    c.zoo.finetune = lm_run(80, 8, 1e-3, 8)      # batch: rows of each domain (the specialists train side by side)


def set_smoke_family(c: mlc.ConfigDict) -> None:
    """The same family at toy size (a 1-layer d=32 model, a few steps): the smoke presets, seconds to build."""
    c.data.n_train = 120
    c.data.n_eval = 16
    c.data.seq_len = 64
    c.data.max_prompt_len = 32
    c.zoo.vocab_size = 320
    c.zoo.hidden_size = 32
    c.zoo.intermediate_size = 64
    c.zoo.num_layers = 1
    c.zoo.pretrain = lm_run(6, 8, 3e-3, 1)
    c.zoo.finetune = lm_run(3, 4, 1e-3, 1)


def family_and_corpus(c: mlc.ConfigDict, specialists: tuple[tuple[str, str], ...]):
    """The FamilySpec (``c.zoo`` with the ``c.data`` sequence lengths; ``specialists``: (name, prompt
    template) pairs, one per domain) and the CorpusSpec of its demo corpus, one domain per specialist."""
    from fusion_jax.zoo.build import CorpusSpec, spec_from_config
    spec = spec_from_config(c.zoo, seq_len=int(c.data.seq_len), max_prompt_len=int(c.data.max_prompt_len),
                            specialists=tuple(specialists))
    corpus = CorpusSpec(seed=int(c.data.seed), n_train=int(c.data.n_train), n_eval=int(c.data.n_eval),
                        domains=tuple(n for n, _ in specialists))
    return spec, corpus
