"""Train state pytree and the split of params into a trainable and a frozen part.

The trainer holds params as two flat ``{"a/b/c": array}`` dicts: ``params`` (trainable: differentiated,
optimized, with optimizer state) and ``frozen`` (no gradient, no optimizer state). :class:`ParamSplit`
remembers the original pytree structure so that ``merge(params, frozen)`` gives back the full tree that
the method's ``loss_fn`` sees.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.struct
import jax
import numpy as np

from fusion_jax.errors import ConfigError


@flax.struct.dataclass
class TrainState:
    step: jax.Array            # int32 scalar: optimizer steps taken
    params: dict               # trainable params, flat {path: array}
    frozen: dict               # frozen params, flat {path: array}
    opt_state: Any             # optax state of ``params`` only
    rng: jax.Array             # uint32[2] base key; the step's key is fold_in(rng, step)


def key_to_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path: Sequence[Any]) -> str:
    """``(DictKey('layers'), DictKey('attn'), ...)`` -> ``"layers/attn/..."``."""
    return "/".join(key_to_str(k) for k in path)


def flatten_with_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [path_str(p) for p, _ in leaves_with_path]
    if len(set(paths)) != len(paths):
        raise ConfigError("params: two leaves have the same path; use a dict/nnx.State pytree")
    return paths, [leaf for _, leaf in leaves_with_path], treedef


TrainableSpec = None | str | Sequence[str] | Callable[[str], bool] | Any


def trainable_predicate(spec: TrainableSpec) -> Callable[[str], bool] | None:
    """None -> everything trains; a regex or list of regexes (``re.search`` on "a/b/c"); a callable."""
    if spec is None:
        return lambda _: True
    if callable(spec):
        return spec
    if isinstance(spec, str):
        spec = (spec,)
    if isinstance(spec, (list, tuple)) and all(isinstance(s, str) for s in spec):
        try:
            pats = [re.compile(s) for s in spec]
        except re.error as e:
            raise ConfigError(f"optimizer.trainable: bad regex: {e}") from e
        return lambda p: any(r.search(p) for r in pats)
    return None  # a mask pytree


class ParamSplit:
    """Static description of how a params pytree splits into trainable / frozen flat dicts."""

    def __init__(self, params: Any, trainable: TrainableSpec = None):
        self.paths, leaves, self.treedef = flatten_with_paths(params)
        pred = trainable_predicate(trainable)
        if pred is not None:
            self.mask = [bool(pred(p)) for p in self.paths]
        else:  # a pytree of bools matching params
            self.mask = [bool(m) for m in self.treedef.flatten_up_to(trainable)]
        if not any(self.mask):
            raise ConfigError(f"optimizer.trainable: {trainable!r} matches no parameter "
                              f"(first paths: {', '.join(self.paths[:5])})")
        self.trainable_paths = [p for p, m in zip(self.paths, self.mask) if m]
        self.frozen_paths = [p for p, m in zip(self.paths, self.mask) if not m]

    def split(self, params: Any) -> tuple[dict, dict]:
        leaves = self.treedef.flatten_up_to(params)
        t = {p: x for p, x, m in zip(self.paths, leaves, self.mask) if m}
        f = {p: x for p, x, m in zip(self.paths, leaves, self.mask) if not m}
        return t, f

    def merge(self, trainable: dict, frozen: dict) -> Any:
        return self.treedef.unflatten([trainable[p] if m else frozen[p] for p, m in zip(self.paths, self.mask)])

    def flat(self, tree: Any) -> dict:
        return dict(zip(self.paths, self.treedef.flatten_up_to(tree)))

    def num_params(self) -> tuple[int, int]:
        return len(self.trainable_paths), len(self.frozen_paths)


def count_elements(flat: dict) -> int:
    return int(sum(np.prod(np.shape(x)) for x in flat.values()))
