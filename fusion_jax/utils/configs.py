"""Reading the mapping-like configs users pass in (dicts, ml_collections ConfigDicts) with named errors."""
from __future__ import annotations

from typing import Any, Iterable, Mapping

from fusion_jax.errors import ConfigError


def as_mapping(cfg: Any, where: str, known: Iterable[str]) -> dict:
    """``cfg`` (a Mapping or a ConfigDict) as a plain dict whose keys are all in ``known``.

    Raises ConfigError naming ``where`` (the option's dotted path) for a non-mapping or an unknown key.
    """
    if hasattr(cfg, "to_dict"):
        cfg = cfg.to_dict()
    known = tuple(known)
    if not isinstance(cfg, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(known)}, got {type(cfg).__name__}")
    unknown = sorted(set(cfg) - set(known))
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]}: unknown option (known: {', '.join(sorted(known))})")
    return dict(cfg)
