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


def check_keys(given: Mapping, schema: Mapping, where: str = "", *, free: Iterable[str] = (),
               each: Iterable[str] = ()) -> None:
    """Every key of ``given`` (nested plain dicts) is an option of ``schema`` (the preset's own config as a
    dict): an unknown one is a ConfigError naming its dotted path and the known ones. Groups are named by
    key (any depth) or by dotted path (``"data.train_files"``). A group in ``free`` holds the user's keys
    (domains, templates) and is not checked inside; a group in ``each`` holds user-named entries that are
    each a group of the options of the schema's first entry (e.g. one model per teacher name)."""
    free, each = tuple(free), tuple(each)
    for k, v in given.items():
        path = f"{where}.{k}" if where else k
        if k not in schema:
            raise ConfigError(f"{path}: unknown option (known: {', '.join(sorted(schema))})")
        if isinstance(schema[k], Mapping):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{path}: expected a group of options, got {v!r}")
            if k in each or path in each:
                entry = next(iter(schema[k].values()), None)
                for name, sub in v.items():
                    if not isinstance(sub, Mapping):
                        raise ConfigError(f"{path}.{name}: expected a group of options, got {sub!r}")
                    if isinstance(entry, Mapping):
                        check_keys(sub, entry, f"{path}.{name}", free=free, each=each)
            elif k not in free and path not in free:
                check_keys(v, schema[k], path, free=free, each=each)
