"""lm-evaluation-harness adapter: every fusion-jax model (HF, Orbax, UltraFuser fused) as the harness's
``fusion-jax`` model, scored and decoded by fusion-jax's JAX engine.

Install the extra (``pip install 'fusion-jax[lm-eval]'``). lm-eval 0.4 finds models only in its own
registry, so register ours by importing this module first; ``python -m fusion_jax.eval.harness`` does
that and then runs lm-eval's own command line with the same arguments::

    python -m fusion_jax.eval.harness --model fusion-jax --model_args pretrained=DIR,batch_size=16 \\
        --tasks hellaswag,gsm8k

    import fusion_jax.eval.harness, lm_eval
    lm_eval.simple_evaluate(model="fusion-jax", model_args="pretrained=DIR", tasks=[...])

``model_args``: ``pretrained`` (any model directory :func:`fusion_jax.eval.models.load_eval_model`
reads), ``batch_size`` (default 16), ``max_length`` (context window, default the model's
``max_position_embeddings``), ``dtype``. The harness writes its own prompts, so every view of a fused
model reads the same raw text (as its PyTorch export does).

- ``loglikelihood``: :func:`fusion_jax.eval.scoring.score_continuations` (lm-eval's own context /
  continuation split, ``TemplateLM._encode_pair``);
- ``loglikelihood_rolling``: lm-eval's rolling windows (``get_rolling_token_windows``), each scored the
  same way, summed;
- ``generate_until``: :func:`fusion_jax.eval.generation.generate` with the request's ``until`` as stop
  strings, ``max_gen_toks``, and ``temperature``/``top_k``/``top_p`` when ``do_sample``.
"""
from __future__ import annotations

import sys

import lm_eval.models  # noqa: F401  (lm-eval's own models register lazily only into an empty registry)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model


@register_model("fusion-jax", "fusion_jax")
class FusionJaxLM(TemplateLM):
    def __init__(self, pretrained: str, batch_size: int | str = 16, max_length: int | None = None,
                 dtype: str | None = None, max_gen_toks: int = 256, seed: int = 0, **kwargs):
        super().__init__()
        from fusion_jax.eval.models import load_eval_model
        self.model = load_eval_model(pretrained, dtype=dtype)
        self.tokenizer = self.model.require_tokenizer()
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16
        cfg_len = getattr(self.model.config, "max_position_embeddings", None) or 2048
        self.max_length = int(max_length or cfg_len)
        self.max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        self.defaults = self.model.generation_defaults()

    # -- tokens ---------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.defaults["eos_token_ids"]
        return int(eos[0]) if eos else int(self.defaults["pad_token_id"])

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos) if bos is not None else self.eot_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return list(self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"])

    def tok_decode(self, tokens) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _views(self, ids: list[int]):
        return ids if self.model.views == 1 else [ids] * self.model.views

    # -- scoring --------------------------------------------------------------------------------------
    def _score(self, contexts, continuations):
        from fusion_jax.eval.scoring import score_continuations
        return score_continuations(self.model.decoder, self.model.params, [self._views(c) for c in contexts],
                                   continuations, batch_size=self.batch_size, max_len=self.max_length,
                                   pad_id=int(self.defaults["pad_token_id"]))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        out = self._score([list(c) for _, c, _ in requests], [list(x) for _, _, x in requests])
        for (key, _, _), r in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, r)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
        contexts, conts, owner = [], [], []
        for i, req in enumerate(requests):
            (text,) = req.args[:1]
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                contexts.append(list(ctx))
                conts.append(list(cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        if contexts:
            for i, (lp, _) in zip(owner, self._score(contexts, conts)):
                totals[i] += lp
        for req, t in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), t)
        return totals

    # -- generation -----------------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        import json

        from fusion_jax.eval.generation import GenerationConfig, SamplingConfig, generate
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for key, idx in groups.items():
            kw = dict(requests[idx[0]].args[1])
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            sampling = SamplingConfig()
            if kw.get("do_sample") and float(kw.get("temperature", 1.0)) > 0:
                sampling = SamplingConfig(float(kw.get("temperature", 1.0)), int(kw.get("top_k", 0) or 0),
                                          float(kw.get("top_p", 1.0) or 1.0))
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            cfg = GenerationConfig(max_new_tokens=max_new, sampling=sampling, stop=tuple(s for s in until if s),
                                   batch_size=self.batch_size, seed=self.seed, **self.defaults)
            budget = max(1, self.max_length - max_new)
            prompts = [self._views(self.tok_encode(requests[i].args[0], add_special_tokens=True)[-budget:])
                       for i in idx]
            comps = generate(self.model.decoder, self.model.params, prompts, cfg, tokenizer=self.tokenizer)
            for i, c in zip(idx, comps):
                out[i] = c[0].text or ""
                self.cache_hook.add_partial("generate_until", (requests[i].args[0], requests[i].args[1]), out[i])
        return out


def main(argv=None) -> int:
    """lm-eval's command line with the ``fusion-jax`` model registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.argv = ["lm-eval", *(sys.argv[1:] if argv is None else argv)]
    return cli_evaluate() or 0


if __name__ == "__main__":
    sys.exit(main())
