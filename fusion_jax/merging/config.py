"""mergekit-compatible YAML merge configurations, validated strictly.

Accepted (same meaning as mergekit 0.1.5): ``merge_method``, ``models`` (``model``, ``parameters``),
``slices`` (``sources`` of ``model`` + ``layer_range`` + ``parameters``; per-slice ``base_model`` and
``parameters``), ``base_model``, ``parameters``, ``dtype``, ``out_dtype``, ``tokenizer_source``
(``base`` | ``union`` | a model), the ``tokenizer`` block (``source``, ``tokens`` with ``source`` and
``force``, ``pad_to_multiple_of``), ``chat_template`` (``auto``, a template name or a Jinja string), and
``name`` in a multi-document file (mergekit-multi: later documents use earlier outputs by name). Plus
fusion-jax's ``compute_dtype`` (``auto``: each step in the merge dtype, as mergekit; ``float32``). A parameter value is a scalar, a list of scalars (a gradient,
interpolated over the layers of a slice: t = i / (n - 1)), a ``{value, filter}`` entry or a list of
them (the first whose ``filter`` is a substring of the tensor name, or ``*``, wins). Precedence, as
in mergekit: the model's own parameters, then the slice's, then the top-level ones, then the default.
Any other key is an error that names it (mergekit would silently ignore some of them).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import yaml

from fusion_jax.errors import ConfigError
from fusion_jax.merging.methods import METHODS, REQUIRED, MethodSpec, Param
from fusion_jax.merging.precision import COMPUTE_DTYPES, DTYPES

_TOP_KEYS = {"merge_method", "models", "slices", "base_model", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "compute_dtype"}
_UNSUPPORTED = {"modules": "per-module configs", "residual_weight": "residual_weight"}
_DTYPES = DTYPES


@dataclasses.dataclass
class Source:
    model: str
    layer_range: tuple[int, int] | None = None
    parameters: dict | None = None


@dataclasses.dataclass
class OutSlice:
    sources: list[Source]
    base_model: str | None = None
    parameters: dict | None = None


@dataclasses.dataclass(frozen=True)
class TokenSpec:
    """Where one token's embedding comes from (mergekit ``TokenEmbeddingConfig``): ``kind`` "model"
    (that model's row for the token), "model_token" (a given token or id of ``model``), "zero", or None
    (the default rule); ``force`` uses it even where the model has the token."""

    kind: str | None = None
    model: str | None = None
    token_id: int | None = None
    token: str | None = None
    force: bool = False


@dataclasses.dataclass(frozen=True)
class TokenizerSpec:
    source: str = "union"  # "union" | "base" | a model
    tokens: dict = dataclasses.field(default_factory=dict)  # token -> TokenSpec
    pad_to_multiple_of: int | None = None


@dataclasses.dataclass
class MergeConfig:
    merge_method: str
    spec: MethodSpec
    base_model: str | None
    models: list[Source] | None
    slices: list[OutSlice] | None
    parameters: dict | None
    dtype: str | None
    out_dtype: str | None
    tokenizer_source: str | None
    root: Path  # directory that relative model paths are also looked up in (the YAML's)
    raw: dict = dataclasses.field(default_factory=dict)
    compute_dtype: str | None = None  # fusion-jax's key: "auto" (mergekit's per-step dtype) | "float32"
    tokenizer: TokenizerSpec | None = None
    chat_template: str | None = None

    @property
    def vocab_source(self) -> str | None:
        """The output vocabulary's source ("union" | "base" | a model), from either key, or None."""
        return self.tokenizer.source if self.tokenizer else self.tokenizer_source

    def referenced_models(self) -> list[str]:
        out: list[str] = []
        if self.base_model:
            out.append(self.base_model)
        for s in (self.models or []):
            out.append(s.model)
        for sl in (self.slices or []):
            if sl.base_model:
                out.append(sl.base_model)
            out.extend(src.model for src in sl.sources)
        return list(dict.fromkeys(out))

    def resolve_path(self, model: str) -> Path:
        p = Path(os.path.expanduser(model))
        if p.is_absolute() or p.exists():
            return p.absolute()
        q = self.root / p
        return q.absolute() if q.exists() else p.absolute()


def _check_keys(d: dict, allowed: set, where: str) -> None:
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    for k in d:
        if k in _UNSUPPORTED and k not in allowed:
            raise ConfigError(f"{where}: key {k!r} ({_UNSUPPORTED[k]}) is not supported by fusion-jax")
        if k not in allowed:
            raise ConfigError(f"{where}: unknown key {k!r} (allowed: {', '.join(sorted(allowed))})")


def _model_name(v, where: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{where}: model must be a path string, got {v!r}")
    if "+" in v:
        raise ConfigError(f"{where}: LoRA references ('{v}') are not supported by fusion-jax")
    return v


def _check_setting(value, where: str):
    scalar = (bool, int, float, str)
    if isinstance(value, scalar):
        return
    if isinstance(value, dict):
        _check_keys(value, {"value", "filter"}, where)
        if "value" not in value:
            raise ConfigError(f"{where}: conditional parameter needs a 'value'")
        _check_setting(value["value"], where)
        return
    if isinstance(value, list) and value:
        if all(isinstance(e, scalar) for e in value):
            return
        for e in value:
            if not isinstance(e, dict):
                raise ConfigError(f"{where}: a list mixes scalars and conditional entries")
            _check_setting(e, where)
        return
    raise ConfigError(f"{where}: invalid parameter value {value!r}")


def _params(d, spec: MethodSpec, where: str, allowed_scopes=("shared", "input", "non_base")) -> dict | None:
    if d is None:
        return None
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: parameters must be a mapping")
    names = {p.name for p in spec.params}
    for k, v in d.items():
        if k not in names:
            raise ConfigError(f"{where}: unknown parameter {k!r} for merge method {spec.name!r} "
                              f"(known: {', '.join(sorted(names)) or 'none'})")
        _check_setting(v, f"{where}.{k}")
    return dict(d)


def _dtype(v, key):
    if v is None:
        return None
    if not isinstance(v, str) or v not in _DTYPES:
        raise ConfigError(f"{key}: unsupported dtype {v!r} (use one of {', '.join(sorted(_DTYPES))})")
    return _DTYPES[v]


def read_documents(path: str | os.PathLike) -> list:
    """The YAML documents of a merge config file (mergekit-multi files hold several)."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from e
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file (is it the merge YAML?)") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e


def _token_spec(tok: str, v, where: str) -> TokenSpec:
    if v is None:
        return TokenSpec()
    _check_keys(v, {"source", "force"}, where)
    force = v.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"{where}.force: expected true or false, got {force!r}")
    src = v.get("source")
    if src is None:
        return TokenSpec(force=force)
    if isinstance(src, str):
        return TokenSpec("model", _model_name(src, f"{where}.source"), force=force)
    _check_keys(src, {"kind", "model", "token_id", "token"}, f"{where}.source")
    kind = src.get("kind")
    if kind == "zero":
        if set(src) != {"kind"}:
            raise ConfigError(f"{where}.source: a 'zero' source takes no other keys")
        return TokenSpec("zero", force=force)
    if kind != "model_token":
        raise ConfigError(f"{where}.source.kind: expected 'model_token' or 'zero', got {kind!r}")
    tid, name = src.get("token_id"), src.get("token")
    if (tid is None) == (name is None):
        raise ConfigError(f"{where}.source: give exactly one of 'token_id' or 'token'")
    if tid is not None and (isinstance(tid, bool) or not isinstance(tid, int) or tid < 0):
        raise ConfigError(f"{where}.source.token_id: expected a token id (integer >= 0), got {tid!r}")
    if name is not None and not isinstance(name, str):
        raise ConfigError(f"{where}.source.token: expected a string, got {name!r}")
    return TokenSpec("model_token", _model_name(src.get("model"), f"{where}.source.model"), tid, name, force)


def _tokenizer_spec(v) -> TokenizerSpec:
    _check_keys(v, {"source", "tokens", "pad_to_multiple_of"}, "tokenizer")
    src = v.get("source", "union")
    if not isinstance(src, str) or not src:
        raise ConfigError(f"tokenizer.source: expected 'union', 'base' or a model path, got {src!r}")
    tokens = v.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ConfigError("tokenizer.tokens: expected a mapping of token -> {source, force}")
    specs = {}
    for tok, tv in tokens.items():
        if not isinstance(tok, str) or not tok:
            raise ConfigError(f"tokenizer.tokens: a token must be a non-empty string, got {tok!r}")
        specs[tok] = _token_spec(tok, tv, f"tokenizer.tokens[{tok!r}]")
    pad = v.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise ConfigError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    return TokenizerSpec(src, specs, pad)


def load_config(source: str | os.PathLike | dict, root: str | os.PathLike | None = None) -> MergeConfig:
    """Read and validate a mergekit YAML file with one document (or an already parsed dict, whose
    relative model paths are looked up in ``root``, default the working directory)."""
    if isinstance(source, dict):
        raw, root = source, Path(root or Path.cwd()).absolute()
    else:
        path = Path(source)
        docs = read_documents(path)
        if len(docs) != 1:
            raise ConfigError(f"{path}: expected one merge document, found {len(docs)} "
                              "(several documents are a multi-merge: run them with `fusion-jax merge`)")
        raw = docs[0]
        root = path.absolute().parent
    if not isinstance(raw, dict):
        where = "merge config" if isinstance(source, dict) else str(source)
        raise ConfigError(f"{where}: expected a mapping at the top level, got {type(raw).__name__}")
    _check_keys(raw, _TOP_KEYS, "merge config")
    method = raw.get("merge_method")
    if not isinstance(method, str) or method not in METHODS:
        raise ConfigError(f"merge_method: unknown merge method {method!r} "
                          f"(available: {', '.join(sorted(METHODS))})")
    spec = METHODS[method]
    base = _model_name(raw["base_model"], "base_model") if raw.get("base_model") is not None else None
    models = slices = None
    if ("models" in raw) == ("slices" in raw):
        raise ConfigError("merge config: exactly one of 'models' or 'slices' must be present")
    if "models" in raw:
        if not isinstance(raw["models"], list) or not raw["models"]:
            raise ConfigError("models: expected a non-empty list")
        models = []
        for i, m in enumerate(raw["models"]):
            w = f"models[{i}]"
            _check_keys(m, {"model", "parameters"}, w)
            models.append(Source(_model_name(m.get("model"), w),
                                 parameters=_params(m.get("parameters"), spec, f"{w}.parameters")))
    else:
        if not isinstance(raw["slices"], list) or not raw["slices"]:
            raise ConfigError("slices: expected a non-empty list")
        slices = []
        for i, s in enumerate(raw["slices"]):
            w = f"slices[{i}]"
            _check_keys(s, {"sources", "base_model", "parameters"}, w)
            srcs = []
            for j, src in enumerate(s.get("sources") or []):
                ws = f"{w}.sources[{j}]"
                _check_keys(src, {"model", "layer_range", "parameters"}, ws)
                lr = src.get("layer_range")
                if (not isinstance(lr, (list, tuple)) or len(lr) != 2
                        or not all(isinstance(x, int) for x in lr) or lr[0] < 0 or lr[1] < lr[0]):
                    raise ConfigError(f"{ws}.layer_range: expected [start, end) integers, got {lr!r}")
                srcs.append(Source(_model_name(src.get("model"), ws), tuple(lr),
                                   _params(src.get("parameters"), spec, f"{ws}.parameters")))
            if not srcs:
                raise ConfigError(f"{w}: a slice needs at least one source")
            if len({b - a for a, b in (x.layer_range for x in srcs)}) != 1:
                raise ConfigError(f"{w}: all sources of a slice must cover the same number of layers")
            sb = _model_name(s["base_model"], f"{w}.base_model") if s.get("base_model") else None
            slices.append(OutSlice(srcs, sb, _params(s.get("parameters"), spec, f"{w}.parameters")))
    ts = raw.get("tokenizer_source")
    if ts is not None and not isinstance(ts, str):
        raise ConfigError(f"tokenizer_source: expected 'base', 'union' or a model path, got {ts!r}")
    cd = raw.get("compute_dtype")
    if cd is not None and cd not in COMPUTE_DTYPES:
        raise ConfigError(f"compute_dtype: expected one of {', '.join(COMPUTE_DTYPES)}, got {cd!r}")
    tok = _tokenizer_spec(raw["tokenizer"]) if raw.get("tokenizer") is not None else None
    if tok is not None and ts is not None:
        raise ConfigError("merge config: give either 'tokenizer_source' or a 'tokenizer' block, not both")
    ct = raw.get("chat_template")
    if ct is not None and (not isinstance(ct, str) or not ct.strip()):
        raise ConfigError(f"chat_template: expected 'auto', a template name or a Jinja template, got {ct!r}")
    cfg = MergeConfig(method, spec, base, models, slices, _params(raw.get("parameters"), spec, "parameters"),
                      _dtype(raw.get("dtype"), "dtype"), _dtype(raw.get("out_dtype"), "out_dtype"), ts, root, raw,
                      compute_dtype=cd, tokenizer=tok, chat_template=ct)
    return cfg


# -- parameter resolution (mergekit config.evaluate_setting + parameter_resolver) --------------------

def _validate(p: Param, v):
    if v is None:
        return None
    if p.type is float:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise ConfigError(f"parameter {p.name}: expected a number, got {v!r}")
        try:
            return float(v)
        except ValueError:
            raise ConfigError(f"parameter {p.name}: expected a number, got {v!r}") from None
    if p.type is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, (int, float)) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
            return v.lower() in ("true", "yes", "1")
        raise ConfigError(f"parameter {p.name}: expected true/false, got {v!r}")
    if p.type is int:
        try:
            f = None if isinstance(v, bool) else float(v)
        except ValueError:
            f = None
        if f is None or not math.isfinite(f) or f != int(f):
            raise ConfigError(f"parameter {p.name}: expected an integer, got {v!r}")
        return int(f)
    return v


def evaluate_setting(tensor_name: str, setting, t: float, p: Param):
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return _validate(p, setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            vals = [_validate(p, e) for e in setting]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                return vals[int(t * (len(vals) - 1))]
            scaled = t * (len(vals) - 1)
            i0 = int(scaled)
            i1 = min(len(vals) - 1, i0 + 1)
            frac = scaled - i0
            return _validate(p, (1 - frac) * vals[i0] + frac * vals[i1])
        for cond in setting:
            f = cond.get("filter")
            if f is None or f == "*" or (tensor_name and f in tensor_name):
                return evaluate_setting(tensor_name, cond["value"], t, p)
    return None


def resolve_parameter(p: Param, scopes, tensor_name: str, t: float, where: str):
    for scope in scopes:
        if scope is not None and p.name in scope:
            v = evaluate_setting(tensor_name, scope[p.name], t, p)
            if v is not None:
                return v
    if p.default is REQUIRED:
        raise ConfigError(f"missing required parameter {p.name!r} for {where}")
    return p.default
