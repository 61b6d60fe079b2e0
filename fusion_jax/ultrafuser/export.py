"""Specialists and fused models as plain files: load N HF specialists straight onto the mesh, save a
fused model, and reassemble it from its files.

Fused layout (``save_fused``)::

    out/fused.json                 specialist names, templates, sources
    out/gate.safetensors           gate.w1 [D,H], gate.b1 [H], gate.w2 [H], gate.b2 []
    out/gate_config.json           GateConfig (input size, hidden size, experts, names)
    out/specialists/<name>/        one HF checkpoint per fine-tuned specialist (transformers loads it)
    out/config.json, configuration_ultrafuser.py, modeling_ultrafuser.py, tokenizer files
                                   the fused model for PyTorch users: AutoModelForCausalLM.from_pretrained(
                                   out, trust_remote_code=True) (fusion_jax/ultrafuser/remote_code)
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import jax
from flax import nnx

from fusion_jax.errors import CheckpointError, ConfigError
from fusion_jax.ultrafuser import fusion
from fusion_jax.ultrafuser.gate import GateConfig, init_gate, load_gate, save_gate
from fusion_jax.ultrafuser.model import FusedModel, check_compatible
from fusion_jax.utils.atomic import atomic_directory

FUSED_JSON = "fused.json"


def check_specialist_dirs(paths: Sequence[str | Path], names: Sequence[str]):
    """Every directory exists with config.json and weights; one architecture and vocabulary. Reads
    only the config files, so a bad config fails before any weights are loaded or any step is taken."""
    from fusion_jax import hf
    if len(paths) != len(names):
        raise ConfigError(f"specialists.paths: {len(paths)} paths for {len(names)} specialists {list(names)}")
    cfgs = []
    for n, p in zip(names, paths):
        d = Path(p).expanduser()
        if not d.is_dir():
            raise CheckpointError(f"specialist {n!r}: directory {d} does not exist")
        if not (d / "config.json").is_file():
            raise CheckpointError(f"specialist {n!r}: {d / 'config.json'} does not exist")
        if not any(d.glob("*.safetensors")) and not any(d.glob("*.bin")):
            raise CheckpointError(f"specialist {n!r}: {d} has no *.safetensors (or *.bin) weight files")
        cfgs.append(hf.read_config(d))
    check_compatible(cfgs, list(names))
    return cfgs


def load_specialists(paths: Sequence[str | Path], names: Sequence[str], *, mesh=None, gate: dict | None = None,
                     gate_hidden: int = 512, key: jax.Array | None = None, **load_kw) -> FusedModel:
    """Load N HF specialists and stack them on the expert axis.

    With a ``mesh``, each specialist is read straight into its shards (each device reads only its slice)
    and the stack is formed on the mesh, so no single device ever holds a whole specialist.
    ``load_kw``: ``dtype`` / ``param_dtype`` / ModelConfig overrides, as for ``hf.load``.
    """
    from fusion_jax import hf
    from fusion_jax.models import abstract_model, param_shardings
    cfgs = check_specialist_dirs(paths, names)
    one_sh = param_shardings(cfgs[0], mesh) if mesh is not None else None
    loaded = [hf.load(Path(p).expanduser(), shardings=one_sh, **load_kw) for p in paths]
    cfg = loaded[0][0]
    check_compatible([c for c, _ in loaded], list(names))
    graphdef = nnx.split(abstract_model(cfg), nnx.Param)[0]
    gcfg = GateConfig(input_size=cfg.hidden_size, hidden_size=int(gate_hidden), num_experts=len(names),
                      specialist_names=tuple(names))
    if gate is None:
        gate = init_gate(key if key is not None else jax.random.key(0), gcfg)
    fm = FusedModel(graphdef, cfg, None, gate, gcfg, tuple(names))
    trees = [p for _, p in loaded]
    if mesh is None:
        fm.params = fusion.stack_trees(trees)
        return fm
    fm.params = jax.tree.map(lambda x: jax.ShapeDtypeStruct((len(trees),) + x.shape, x.dtype), trees[0])
    p_sh, g_sh = fm.shardings(mesh)
    fm.params = jax.jit(lambda *ts: fusion.stack_trees(ts), out_shardings=p_sh)(*trees)
    fm.gate = jax.device_put(gate, g_sh)
    return fm


def save_fused(fm: FusedModel, out_dir, *, templates: dict | None = None, tokenizer_dir=None,
               extra: dict | None = None, overwrite: bool = True) -> Path:
    """Write ``fm`` as HF specialists + gate files (atomically). Multi-process: every process must
    call it (params are gathered); only process 0 writes."""
    from fusion_jax import hf
    from fusion_jax.sharding import host_tree
    specs = [host_tree(fm.specialist_params(k)) for k in range(fm.num_experts)]
    gate = host_tree(fm.gate)
    if jax.process_index() != 0:
        return Path(out_dir)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for name, p in zip(fm.names, specs):
            hf.save(p, fm.config, tmp / "specialists" / name, source_dir=tokenizer_dir)
        save_gate(gate, fm.gate_config, tmp)
        meta = {"format": "fusion_jax.ultrafuser", "specialists": list(fm.names),
                "templates": dict(templates or {}), **(extra or {})}
        (tmp / FUSED_JSON).write_text(json.dumps(meta, indent=2) + "\n")
        write_remote_code(tmp, fm, tmp / "specialists" / fm.names[0])
    return Path(out_dir)


def load_fused(in_dir, *, mesh=None, **load_kw) -> tuple[FusedModel, dict]:
    """Reassemble the fused model from ``save_fused``'s files; returns (model, fused.json metadata)."""
    d = Path(in_dir)
    if not (d / FUSED_JSON).is_file():
        raise CheckpointError(f"{d / FUSED_JSON} does not exist (not a fused UltraFuser directory)")
    meta = json.loads((d / FUSED_JSON).read_text())
    gate, gcfg = load_gate(d)
    names = list(meta["specialists"])
    if tuple(names) != tuple(gcfg.specialist_names) or len(names) != gcfg.num_experts:
        raise CheckpointError(f"{d}: fused.json names {names} but the gate was trained for "
                              f"{list(gcfg.specialist_names)}")
    fm = load_specialists([d / "specialists" / n for n in names], names, mesh=mesh, gate=gate,
                          gate_hidden=gcfg.hidden_size, **load_kw)
    if fm.config.hidden_size != gcfg.input_size:
        raise CheckpointError(f"{d / 'gate_config.json'}: gate input size {gcfg.input_size} != the "
                              f"specialists' hidden size {fm.config.hidden_size}")
    return fm, meta


def write_remote_code(out: Path, fm: FusedModel, specialist_dir: Path) -> None:
    """The transformers side of a fused export: ``config.json`` with ``auto_map`` pointing at the two
    PyTorch files copied from :mod:`fusion_jax.ultrafuser.remote_code`, and the tokenizer and generation
    config of the first specialist (so ``AutoTokenizer.from_pretrained(out)`` works too)."""
    import shutil

    from fusion_jax.hf.files import GENERATION_CONFIG_NAME, TOKENIZER_FILES
    from fusion_jax.ultrafuser import remote_code
    for f in remote_code.FILES:
        shutil.copy(remote_code.DIR / f, out / f)
    cfg = fm.config
    hf_cfg = {"model_type": "ultrafuser_fused", "architectures": ["UltraFuserForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_ultrafuser.UltraFuserConfig",
                           "AutoModelForCausalLM": "modeling_ultrafuser.UltraFuserForCausalLM"},
              "specialists": list(fm.names), "gate_hidden_size": fm.gate_config.hidden_size,
              "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
              "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id,
              "tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    for f in (GENERATION_CONFIG_NAME,) + TOKENIZER_FILES:
        if (specialist_dir / f).is_file():
            shutil.copy(specialist_dir / f, out / f)
