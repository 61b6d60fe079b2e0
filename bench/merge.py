"""Benchmark: merges of three fine-tunes onto a base (random safetensors), fusion-jax vs mergekit 0.1.5
on the same machine in one run. ``dare_ties`` in bf16 in detail (cold and warm compile cache, medians of
alternating rounds, the I/O floor: read every input byte, write the output, no math, and a bare JAX
process); then ``ties`` and ``della`` with checkpoints and ``dtype`` in bf16 and in fp16, one run of
each tool (mergekit's numbers: fusion-jax's default per-step merge-dtype arithmetic). Peak RSS of each
run is measured in a child process.

    python bench/merge.py --params 0.5e9            # ~0.5B parameters per model
    python bench/merge.py --params 0.1e9 --no-mergekit
    python bench/merge.py --params 0.1e9 --only ties:float16
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _report import machine  # noqa: E402  (bench/ is this script's directory)
from fusion_jax.utils.hashing import stable_hash

HERE = Path(__file__).resolve().parent


def make_models(root: Path, params: float, seed: int = 0, dtype: str = "bfloat16"):
    import ml_dtypes

    from fusion_jax.hf.safetensors_io import ShardedWriter, TensorSpec
    from fusion_jax.merging.testing import llama_config, llama_shapes
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    per_layer = 4 * 1024 * 1024 - 2 * 512 * 1024 + 3 * 1024 * 4096
    layers = max(1, round((params - 2 * 32000 * 1024) / per_layer))
    cfg = llama_config(vocab=32000, hidden=1024, inter=4096, layers=layers, heads=16, kv_heads=8, dtype=dtype)
    shapes = llama_shapes(cfg)
    n = sum(int(np.prod(s)) for s in shapes.values())
    paths = []
    for i, name in enumerate(["base", "ft0", "ft1", "ft2"]):
        p = root / name
        p.mkdir(parents=True)
        (p / "config.json").write_text(json.dumps(cfg))
        specs = [TensorSpec(k, s, np.dtype(np_dtype)) for k, s in shapes.items()]
        with ShardedWriter(p, specs, "2GB") as w:
            for k, s in shapes.items():
                r = np.random.default_rng([seed, i, stable_hash(k, digest_size=4)])
                base = np.random.default_rng([seed, stable_hash(k, digest_size=4)]).standard_normal(s, np.float32) * 0.02
                if i:
                    base += r.standard_normal(s, np.float32) * 0.001
                w.write(k, base.astype(np_dtype))
        paths.append(p)
    return paths, n, layers


#: the one-run comparisons after dare_ties: (method, dtype of the checkpoints and of the merge)
EXTRA = [("ties", "bfloat16"), ("ties", "float16"), ("della", "bfloat16"), ("della", "float16")]


def _config(method: str, paths, dtype: str) -> dict:
    extra = {"epsilon": 0.1} if method == "della" else {}
    return {"merge_method": method, "base_model": str(paths[0]), "dtype": dtype,
            "models": [{"model": str(p), "parameters": {"weight": w, "density": d, **extra}}
                       for p, w, d in zip(paths[1:], (0.5, 0.3, 0.2), (0.3, 0.5, 0.7))]}


def io_floor(paths, out: Path):
    """Read every tensor of every input once and write one output of the same layout: no math."""
    from fusion_jax.hf.safetensors_io import SafetensorsReader, ShardedWriter, TensorSpec
    readers = [SafetensorsReader(p) for p in paths]
    specs = [TensorSpec(n, i.shape, i.dtype) for n, i in readers[0].tensors.items()]
    import concurrent.futures as cf
    with ShardedWriter(out, specs, "5GB") as w:
        def one(name):
            arrs = [r.get(name) for r in readers]
            w.write(name, arrs[0])
        with cf.ThreadPoolExecutor(3) as pool:
            list(pool.map(one, [s.name for s in specs]))


def child(cmd: list[str]) -> tuple[float, float]:
    """Run cmd; return (wall seconds, peak RSS GB of the child)."""
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:  # child: exec and report rusage through wait4
        os.execvp(cmd[0], cmd)
    _, status, ru = os.wait4(pid, 0)
    dt = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{cmd[:3]} failed with {status}")
    return dt, ru.ru_maxrss / 1e6  # KiB -> GB (approx)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=0.5e9, help="parameters per model")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--no-mergekit", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--rounds", type=int, default=3, help="alternating floor / merge rounds (median)")
    ap.add_argument("--only", default=None, help="method:dtype of EXTRA to run alone (skips dare_ties)")
    args = ap.parse_args()
    mach = machine(libs=("jax", "mergekit")) + " at start"
    print(f"machine: {mach}", flush=True)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fj-merge-bench-"))
    results = {}
    if args.only:
        m, d = args.only.split(":")
        try:
            extra = _extra_rows(root, args, [(m, d)])
        finally:
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        _print_extra(extra, 0)
        return
    try:
        t = time.perf_counter()
        paths, n, layers = make_models(root, args.params)
        print(f"models: 4 x {n / 1e6:.0f}M params bf16 ({layers} layers), written in {time.perf_counter() - t:.1f} s",
              flush=True)
        cfg = {"merge_method": "dare_ties", "base_model": str(paths[0]), "dtype": "bfloat16",
               "models": [{"model": str(p), "parameters": {"weight": w, "density": d}}
                          for p, w, d in zip(paths[1:], (0.5, 0.3, 0.2), (0.3, 0.5, 0.7))]}
        import yaml
        (root / "cfg.yml").write_text(yaml.safe_dump(cfg))
        # warm the page cache, then the I/O floor
        io_floor(paths, root / "warm")
        shutil.rmtree(root / "warm")
        py = sys.executable
        floor = [py, "-c", f"import sys; sys.path.insert(0, {str(HERE)!r}); import merge as m; "
                           f"m.io_floor({[str(p) for p in paths]!r}, __import__('pathlib').Path({str(root / 'floor')!r}))"]
        # what any merge process pays before and after its work: start Python, import the executor and
        # JAX, bring up the CPU backend, exit (the fixed part of the fusion-jax wall time below)
        null = [py, "-c", "import fusion_jax.merging.executor, jax; jax.devices('cpu')"]
        fj = [py, "-m", "fusion_jax.cli", "merge", str(root / "cfg.yml"), str(root / "fj"), "--quiet"]
        os.environ["FUSION_JAX_COMPILE_CACHE"] = "0"  # cold: every kernel compiled in the run
        results["fusion_jax_cold"] = child(fj)
        shutil.rmtree(root / "fj")
        os.environ["FUSION_JAX_COMPILE_CACHE"] = str(root / "xla-cache")  # warm: compiled kernels cached
        child(fj)
        shutil.rmtree(root / "fj")
        # the floor and the warm merge alternate, so both see the same machine; medians of the rounds
        runs: dict[str, list] = {"io_floor": [], "jax_process": [], "fusion_jax": []}
        for _ in range(args.rounds):
            runs["io_floor"].append(child(floor))
            shutil.rmtree(root / "floor")
            runs["jax_process"].append(child(null))
            runs["fusion_jax"].append(child(fj))
            shutil.rmtree(root / "fj")
        for k, v in runs.items():
            results[k] = sorted(v)[len(v) // 2]
            print(f"{k}: " + ", ".join(f"{s:.2f}" for s, _ in v) + " s", flush=True)
        if not args.no_mergekit:
            results["mergekit"] = child(["mergekit-yaml", str(root / "cfg.yml"), str(root / "mk"),
                                         "--no-copy-tokenizer", "--quiet"])
            shutil.rmtree(root / "mk")
        extra = _extra_rows(root, args, EXTRA, bf16_paths=paths)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    gb = 5 * n * 2 / 1e9
    print("\n| run | wall s | peak RSS GB | GB/s (4 in + 1 out) |")
    print("|---|---|---|---|")
    for k, (s, rss) in results.items():
        print(f"| {k} | {s:.1f} | {rss:.2f} | {'-' if k == 'jax_process' else f'{gb / s:.2f}'} |")
    for key in ("fusion_jax", "fusion_jax_cold"):
        fj = results[key][0]
        print(f"\n{key}: / I/O floor = {fj / results['io_floor'][0]:.2f}x", end="")
        if "mergekit" in results:
            print(f"; mergekit / {key} = {results['mergekit'][0] / fj:.2f}x", end="")
    fixed = results["jax_process"][0]
    print(f"\nfusion_jax without the fixed JAX process cost ({fixed:.2f} s) / I/O floor = "
          f"{(results['fusion_jax'][0] - fixed) / results['io_floor'][0]:.2f}x")
    _print_extra(extra, n)
    print(json.dumps({"machine": mach, "params": n, **{k: {"s": v[0], "rss_gb": v[1]} for k, v in results.items()},
                      "extra": extra}))


def _extra_rows(root: Path, args, combos, bf16_paths=None) -> list[dict]:
    """One fusion-jax run (warm compile cache) and one mergekit run of each (method, dtype)."""
    import yaml
    py = sys.executable
    os.environ["FUSION_JAX_COMPILE_CACHE"] = str(root / "xla-cache")
    families = {"bfloat16": bf16_paths} if bf16_paths else {}
    rows = []
    for method, dtype in combos:
        if dtype not in families:
            t = time.perf_counter()
            families[dtype], n, layers = make_models(root / dtype, args.params, dtype=dtype)
            print(f"models: 4 x {n / 1e6:.0f}M params {dtype} ({layers} layers), written in "
                  f"{time.perf_counter() - t:.1f} s", flush=True)
        paths = families[dtype]
        cfg = root / f"{method}-{dtype}.yml"
        cfg.write_text(yaml.safe_dump(_config(method, paths, dtype)))
        fj = [py, "-m", "fusion_jax.cli", "merge", str(cfg), str(root / "fj"), "--quiet"]
        child(fj)  # compile into the cache
        shutil.rmtree(root / "fj")
        row = {"method": method, "dtype": dtype, "fusion_jax": child(fj)}
        shutil.rmtree(root / "fj")
        if not args.no_mergekit:
            row["mergekit"] = child(["mergekit-yaml", str(cfg), str(root / "mk"), "--no-copy-tokenizer", "--quiet"])
            shutil.rmtree(root / "mk")
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def _print_extra(rows, n):
    if not rows:
        return
    print("\n| method | dtype | fusion-jax s | fusion-jax peak RSS GB | mergekit s | mergekit peak RSS GB | mergekit / fusion-jax |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        f, m = r["fusion_jax"], r.get("mergekit")
        ratio = f"**{m[0] / f[0]:.1f}x**" if m else "-"
        print(f"| `{r['method']}` | {r['dtype']} | {f[0]:.1f} | {f[1]:.2f} | "
              f"{f'{m[0]:.1f}' if m else '-'} | {f'{m[1]:.2f}' if m else '-'} | {ratio} |")


if __name__ == "__main__":
    main()
