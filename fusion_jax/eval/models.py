"""Any model the project makes, ready to generate and score: an HF directory, an Orbax params
checkpoint (``fusion-jax convert hf-to-orbax``), or an UltraFuser fused directory (``save_fused``).
Distilled and XFT models are HF directories.

:func:`load_eval_model` tells the formats apart by their files (:data:`FORMATS`, checked in order) and
returns an :class:`EvalModel`: a decoder of :mod:`fusion_jax.eval.generation` with its params, the
tokenizer, and, for a fused model, the specialists' own prompt templates (one view each).

Formats owned by a method wing are named in :data:`FORMATS` by module path and imported only when such a
directory is loaded, the way ``fusion_jax.cli.COMMANDS`` names command modules: this layer never imports
a wing at import time.
"""
from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Any, Callable

from fusion_jax.errors import CheckpointError, DataError

#: (kind, file or directory that identifies it, "module:loader(path, **kw) -> EvalModel"), checked in order
FORMATS: tuple[tuple[str, str, str], ...] = (
    ("ultrafuser", "fused.json", "fusion_jax.ultrafuser.decoding:load_eval_model"),
    ("orbax", "params", "fusion_jax.eval.models:load_orbax"),
    ("hf", "config.json", "fusion_jax.eval.models:load_hf"),
)


@dataclasses.dataclass
class EvalModel:
    """A loaded model. ``templates``: one ``PromptTemplate`` per view for a fused model (its specialists'
    own formats), empty for a plain one. ``names``: the views' names (specialists), ``("model",)`` for a
    plain model."""

    kind: str
    path: Path
    decoder: Any
    params: Any
    tokenizer: Any
    config: Any
    names: tuple[str, ...] = ("model",)
    templates: tuple = ()

    @property
    def views(self) -> int:
        return int(getattr(self.decoder, "views", 1))

    def require_tokenizer(self):
        if self.tokenizer is None:
            raise DataError(f"{self.path}: no tokenizer files (tokenizer.json / tokenizer_config.json); "
                            "text prompts and tasks need the model's tokenizer")
        return self.tokenizer

    def generation_defaults(self) -> dict:
        """EOS ids (generation_config.json and the tokenizer's) and the pad id."""
        from fusion_jax.eval.generation import token_defaults
        d = token_defaults(self.tokenizer, self.path if self.kind != "ultrafuser" else None)
        if not d["eos_token_ids"] and getattr(self.config, "eos_token_id", None) is not None:
            eos = self.config.eos_token_id
            d["eos_token_ids"] = tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)
        return d


def detect(path: str | Path) -> str:
    """The kind of model directory ``path`` is (see :data:`FORMATS`); CheckpointError if none."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"model {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"model {p} is not a directory (expected an HF directory, an Orbax params "
                              "checkpoint or an UltraFuser fused directory)")
    for kind, marker, _ in FORMATS:
        if (p / marker).exists():
            return kind
    raise CheckpointError(f"{p}: not a model directory: no " + ", ".join(m for _, m, _ in FORMATS)
                          + " (an HF directory has config.json and weights; an Orbax params checkpoint "
                          "config.json and params/; a fused UltraFuser directory fused.json)")


def _loader(target: str) -> Callable:
    module, fn = target.split(":")
    return getattr(importlib.import_module(module), fn)


def load_eval_model(path: str | Path, *, dtype: str | None = None) -> EvalModel:
    """Load ``path`` (any format of :data:`FORMATS`). ``dtype``: compute and param dtype (default: as
    stored)."""
    p = Path(path).expanduser()
    kind = detect(p)
    target = next(t for k, _, t in FORMATS if k == kind)
    return _loader(target)(p, dtype=dtype)


def _tokenizer_or_none(path: Path):
    from fusion_jax.data.tokenizer import load_tokenizer
    if not ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return None
    return load_tokenizer(path)


def _plain(kind: str, path: Path, config, params) -> EvalModel:
    from flax import nnx

    from fusion_jax.eval.generation import causal_lm_decoder
    from fusion_jax.models import CausalLM
    model = nnx.eval_shape(lambda: CausalLM(config, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(model, state)
    dec, p = causal_lm_decoder(model)
    return EvalModel(kind, path, dec, p, _tokenizer_or_none(path), config)


def load_hf(path: Path, *, dtype: str | None = None) -> EvalModel:
    from fusion_jax import hf
    kw = {"param_dtype": dtype, "dtype": dtype} if dtype else {}
    config, params = hf.load(path, **kw)
    return _plain("hf", path, config, params)


def load_orbax(path: Path, *, dtype: str | None = None) -> EvalModel:
    import jax

    from fusion_jax.hf.orbax_io import restore_params
    config, params = restore_params(path)
    if dtype:
        params = jax.tree.map(lambda x: x.astype(dtype), params)
        config = config.replace(param_dtype=dtype, dtype=dtype)
    return _plain("orbax", path, config, params)
