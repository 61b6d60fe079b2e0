"""``fusion-jax convert``: HF checkpoint <-> Orbax params checkpoint.

    fusion-jax convert hf-to-orbax HF_DIR OUT_DIR [--dtype bf16]
    fusion-jax convert orbax-to-hf ORBAX_DIR OUT_DIR [--source-dir HF_DIR] [--max-shard-size 5GB] [--dtype bf16]
"""
from __future__ import annotations

import argparse

from fusion_jax.errors import ConfigError


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert checkpoints between HF safetensors and Orbax",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    a = sub.add_parser("hf-to-orbax", help="HF checkpoint directory -> Orbax params checkpoint")
    a.add_argument("hf_dir")
    a.add_argument("out_dir")
    a.add_argument("--dtype", default=None, help="param dtype to store (default: as in the HF files)")
    a.add_argument("--overwrite", action="store_true")
    a.set_defaults(func=_hf_to_orbax)
    b = sub.add_parser("orbax-to-hf", help="Orbax params checkpoint -> HF checkpoint directory")
    b.add_argument("orbax_dir")
    b.add_argument("out_dir")
    b.add_argument("--source-dir", default=None,
                   help="HF directory to copy tokenizer files and generation_config.json from")
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--dtype", default=None, help="dtype of the written tensors (default: as stored)")
    b.add_argument("--overwrite", action="store_true")
    b.set_defaults(func=_orbax_to_hf)


def _check_out(out_dir: str, overwrite: bool, inputs=()) -> None:
    """Refuse early (before any heavy work) an output that exists, is a file, or would delete an input."""
    from fusion_jax.utils.atomic import resolve_output
    out = resolve_output(out_dir)
    if out.exists() and not overwrite:
        raise ConfigError(f"output path {out_dir} already exists (pass --overwrite to replace it)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output path {out_dir} is a file, not a directory")
    for inp in inputs:
        if inp is not None:
            r = resolve_output(inp)
            if r == out or out in r.parents:
                raise ConfigError(f"output {out_dir} holds the input {inp}: writing it would replace the "
                                  "input (choose another output directory)")


def _check_dtype(dtype) -> None:
    if dtype is not None:
        from fusion_jax.models.config import canonical_dtype
        canonical_dtype(dtype, "--dtype")


def _hf_to_orbax(args) -> int:
    from fusion_jax.hf.checkpoint import load
    from fusion_jax.hf.orbax_io import save_params
    _check_out(args.out_dir, args.overwrite, [args.hf_dir])
    _check_dtype(args.dtype)
    config, params = load(args.hf_dir, param_dtype=args.dtype)
    save_params(args.out_dir, params, config, source_dir=args.hf_dir, overwrite=args.overwrite)
    print(f"wrote {args.out_dir} ({config.architecture}, {config.num_params() / 1e6:.1f}M params, "
          f"{config.param_dtype})")
    return 0


def _orbax_to_hf(args) -> int:
    from fusion_jax.hf.checkpoint import save
    from fusion_jax.hf.orbax_io import restore_params
    from fusion_jax.hf.safetensors_io import parse_size
    _check_out(args.out_dir, args.overwrite, [args.orbax_dir, args.source_dir])
    _check_dtype(args.dtype)
    try:
        if parse_size(args.max_shard_size) <= 0:
            raise ValueError(f"size must be > 0, got {args.max_shard_size!r}")
    except ValueError as e:
        raise ConfigError(f"--max-shard-size: {e}") from None
    config, params = restore_params(args.orbax_dir)
    source = args.source_dir if args.source_dir is not None else args.orbax_dir
    save(params, config, args.out_dir, max_shard_size=args.max_shard_size, source_dir=source,
         dtype=args.dtype, overwrite=args.overwrite, inputs=[args.orbax_dir])
    print(f"wrote {args.out_dir} ({config.architecture})")
    return 0
