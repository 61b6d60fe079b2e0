"""``fusion-jax upcycle DENSE_DIR OUT``, ``fusion-jax moe CONFIG.yml OUT`` and
``fusion-jax merge-back MOE_DIR OUT``: the XFT wing's checkpoint commands."""
from __future__ import annotations

import argparse
import sys


def _upcycle(args) -> int:
    import jax
    import numpy as np

    from fusion_jax.hf.checkpoint import read_config
    from fusion_jax.hf.files import CONFIG_NAME
    from fusion_jax.xft.assemble import ExpertSource, write_moe
    from fusion_jax.xft.upcycle import init_router, upcycle_config
    config = read_config(args.dense_dir)
    moe_config = upcycle_config(config, experts=args.experts, top_k=args.top_k, routing=args.routing,
                                noise=not args.no_noise, layout=args.layout)
    _check_has_ffn(args.dense_dir, config)
    router = init_router(moe_config, jax.random.key(args.seed), args.router_std, dtype="float32")
    computed = {("layers", "mlp", "router", k): np.asarray(v) for k, v in router.items()}
    out = write_moe(args.out, moe_config, args.dense_dir, [ExpertSource(args.dense_dir)] * args.experts,
                    computed, dtype=args.dtype, max_shard_size=args.out_shard_size, overwrite=args.overwrite)
    print(f"wrote {out}: {moe_config.architecture} with {args.experts} experts "
          f"({'expert 0 shared, ' if moe_config.router == 'xft' else ''}top-{args.top_k} routed), "
          f"config in {out / CONFIG_NAME}", file=sys.stderr)
    return 0


def _check_has_ffn(path, config) -> None:
    """A dense checkpoint must hold its FFN matrices: say so plainly rather than 'tensor missing'."""
    from pathlib import Path

    from fusion_jax.errors import ConfigError
    from fusion_jax.hf import checkpoint, mapping
    reader = checkpoint._open_reader(Path(path))
    try:
        ffn = [r.hf_name(0) for r in mapping.table(config) if r.path[:2] == ("layers", "mlp")]
        if not any(n in reader for n in ffn):
            raise ConfigError(f"{path}: the model has no FFN to upcycle (no {', '.join(ffn)} tensors)")
    finally:
        reader.close()


def _moe(args) -> int:
    from fusion_jax.xft.moe_yaml import build_moe
    out = build_moe(args.config, args.out, seed=args.seed, allow_all_same=args.allow_all_same,
                    hidden_dtype=args.hidden_dtype, overwrite=args.overwrite)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _merge_back(args) -> int:
    import numpy as np

    from fusion_jax.errors import ConfigError
    from fusion_jax.hf import load
    from fusion_jax.xft.merge import save_merged
    if not 0.0 <= args.shared_weight <= 1.0:
        raise ConfigError(f"--shared-weight must be in [0, 1], got {args.shared_weight}")
    alpha = None
    if args.alpha:
        try:
            alpha = np.load(args.alpha, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise ConfigError(f"--alpha {args.alpha}: cannot read a .npy array ({e})") from e
    config, params = load(args.moe_dir)
    out = save_merged(params, config, args.out, alpha, shared_weight=args.shared_weight,
                      source_dir=args.moe_dir, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}: dense {config.dense_config().architecture}", file=sys.stderr)
    return 0


def _positive_int(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None


def register(subparsers) -> None:
    u = subparsers.add_parser(
        "upcycle", help="upcycle a dense model into an MoE (XFT: E copies of each FFN, expert 0 shared)",
        description="Every FFN becomes E identical experts and a new router (N(0, 0.02)); the MoE computes the "
                    "dense model's function until it is trained.")
    u.add_argument("dense_dir", help="dense Hugging Face model directory")
    u.add_argument("out", help="output MoE directory (written atomically)")
    u.add_argument("--experts", type=_positive_int, default=8, help="experts per layer, shared one included (8)")
    u.add_argument("--top-k", type=_positive_int, default=5,
                   help="routed experts per token (XFT: among the experts-1 non-shared; default 5)")
    u.add_argument("--routing", choices=["xft", "topk"], default="xft",
                   help="xft: shared expert 0 + MLP router, normalized weights; topk: Mixtral softmax top-k")
    u.add_argument("--no-noise", action="store_true", help="xft: no noisy gating in training")
    u.add_argument("--layout", choices=["auto", "mixtral", "fusion"], default="auto",
                   help="auto: Mixtral for topk routing when transformers can hold it, else FusionMoe (ours)")
    u.add_argument("--router-std", type=float, default=0.02, help="router init std (0.02)")
    u.add_argument("--seed", type=int, default=0, help="router init seed")
    u.add_argument("--dtype", default=None, help="output dtype (default: the dense model's)")
    u.add_argument("--out-shard-size", default="5GB", help="largest output shard")
    u.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    u.set_defaults(func=_upcycle)

    m = subparsers.add_parser("moe", help="build an MoE from specialists per a mergekit-moe YAML",
                              description="mergekit-moe's YAML (base_model, experts with prompts, gate_mode, "
                                          "shared_experts, dtype) -> a Mixtral or Qwen2-MoE checkpoint.")
    m.add_argument("config", help="mergekit-moe YAML config")
    m.add_argument("out", help="output MoE directory (written atomically)")
    m.add_argument("--seed", type=int, default=0, help="seed of random gates and expert noise")
    m.add_argument("--allow-all-same", action="store_true",
                   help="allow every expert to be the same model (mergekit's "
                        "--i-understand-this-is-not-useful-without-training)")
    m.add_argument("--hidden-dtype", default="bfloat16",
                   help="dtype of the base model's forward for gate_mode hidden (mergekit: bfloat16)")
    m.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    m.set_defaults(func=_moe)

    b = subparsers.add_parser(
        "merge-back", help="merge an MoE's experts back into a dense model (XFT: 0.75 W_0 + 0.25 sum softmax(a) W_i)",
        description="Per layer W = lambda W_0 + (1 - lambda) sum_i softmax(alpha)_i W_i for gate, up and down.")
    b.add_argument("moe_dir", help="MoE Hugging Face model directory")
    b.add_argument("out", help="output dense directory (written atomically)")
    b.add_argument("--shared-weight", type=float, default=0.75, help="lambda, the shared expert's weight (0.75)")
    b.add_argument("--alpha", default=None, help=".npy of alpha [layers, experts-1] (default: ones = uniform)")
    b.add_argument("--dtype", default=None, help="output dtype (default: the MoE's)")
    b.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (atomically)")
    b.set_defaults(func=_merge_back)
