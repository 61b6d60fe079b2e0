"""``fusion-jax merge CONFIG.yaml OUT_DIR`` (one merge, or a multi-document file of several) and
``fusion-jax dare BASE FINETUNED OUT --drop P``."""
from __future__ import annotations

import argparse
import sys


def _merge(args) -> int:
    from fusion_jax.merging.config import read_documents
    from fusion_jax.merging.executor import merge
    kw = dict(seed=args.seed, device=args.device, out_shard_size=args.out_shard_size, overwrite=args.overwrite,
              quiet=args.quiet, compute_dtype=args.compute_dtype)
    if len(read_documents(args.config)) > 1:
        from fusion_jax.merging.multi import merge_documents
        stats = merge_documents(args.config, args.out_dir, intermediate_dir=args.intermediate_dir, **kw)
    elif args.intermediate_dir is not None:
        from fusion_jax.errors import ConfigError
        raise ConfigError("--intermediate-dir: the config has one document (it is for multi-document files)")
    else:
        stats = merge(args.config, args.out_dir, **kw)
    _report(stats, args.out_dir)
    return 0


def _dare(args) -> int:
    from fusion_jax.merging.executor import merge
    from fusion_jax.errors import ConfigError
    if not 0 <= args.drop < 1:
        raise ConfigError(f"--drop must be in [0, 1), got {args.drop}")
    method = {"inverse": "dare_linear_exact", "l1": "dare_linear", "none": "dare_linear"}[args.rescale]
    params = {"weight": args.weight, "density": 1.0 - args.drop}
    cfg = {"merge_method": method, "base_model": args.base,
           "models": [{"model": args.finetuned, "parameters": params}],
           "parameters": {"rescale": False} if args.rescale == "none" else {}}
    if args.dtype:
        cfg["dtype"] = args.dtype
    stats = merge(cfg, args.out, seed=args.seed, device=args.device, out_shard_size=args.out_shard_size,
                  overwrite=args.overwrite, quiet=args.quiet, compute_dtype=args.compute_dtype)
    _report(stats, args.out)
    return 0


def _report(stats, out):
    print(f"wrote {out}: {stats['tensors']} tensors, {stats['out_bytes'] / 1e9:.3f} GB in "
          f"{stats['seconds']:.2f} s ({(stats['in_bytes'] + stats['out_bytes']) / 1e9 / stats['seconds']:.2f} GB/s "
          "read+written)", file=sys.stderr)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", choices=["cpu", "auto"],
                   help="cpu: XLA:CPU; auto: the default JAX backend, each tensor sharded over all its devices")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-tensor random streams")
    p.add_argument("--out-shard-size", default="5GB", help="largest output shard (e.g. 500MB, 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compute-dtype", choices=["auto", "float32"], default=None,
                   help="auto (default; or the YAML's compute_dtype): each step in the merge dtype, giving "
                        "mergekit's numbers; float32: every step in float32, rounded once to the output dtype")


def register(subparsers) -> None:
    p = subparsers.add_parser("merge", help="merge models per a mergekit-style YAML config",
                              description="Merge models that share an architecture, tensor by tensor.")
    p.add_argument("config", help="mergekit YAML config")
    p.add_argument("out_dir", help="output Hugging Face model directory (written atomically)")
    p.add_argument("--intermediate-dir", default=None,
                   help="multi-document configs: keep each named merge as DIR/<name> (default: discard them)")
    _common(p)
    p.set_defaults(func=_merge)

    d = subparsers.add_parser("dare", help="DARE one fine-tune onto its base (drop and rescale its delta)")
    d.add_argument("base")
    d.add_argument("finetuned")
    d.add_argument("out")
    d.add_argument("--drop", type=float, default=0.9, help="drop probability p (default 0.9)")
    d.add_argument("--rescale", choices=["inverse", "l1", "none"], default="inverse",
                   help="inverse: survivors x 1/(1-p) (the paper); l1: keep the L1 norm (mergekit)")
    d.add_argument("--weight", type=float, default=1.0, help="scale of the kept delta")
    d.add_argument("--dtype", default=None, help="compute/output dtype (default: the inputs')")
    _common(d)
    d.set_defaults(func=_dare)
