"""The CLI shell: lazy command families, FusionError -> exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_PROBE = """
import json, sys
import fusion_jax.cli as cli
p = cli.build_parser()
names = sorted(r[0] for r in cli.available_commands())
assert p.parse_args(["merge", "cfg.yaml", "out"]).command == "merge"   # a placeholder parses too
cli.build_parser("convert")   # hf.cli registers without importing JAX either
heavy = sorted(m for m in ("jax", "flax", "torch", "orbax", "orbax.checkpoint", "transformers",
                           "fusion_jax.train", "fusion_jax.merging") if m in sys.modules)
print("RESULT" + json.dumps(dict(names=names, heavy=heavy)))
"""


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_building_the_parser_imports_no_command_family_and_no_jax():
    p = _run("-c", _PROBE)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout.split("RESULT")[-1])
    assert res["heavy"] == [], res
    assert {"convert", "merge", "dare"} <= set(res["names"])


def test_only_the_chosen_family_is_imported():
    code = ("import sys, fusion_jax.cli as cli\n"
            "cli.build_parser('merge').parse_args(['merge', 'a.yaml', 'out'])\n"
            "print('RESULT', 'fusion_jax.merging' in sys.modules, 'fusion_jax.train' in sys.modules,"
            " 'orbax.checkpoint' in sys.modules)")
    p = _run("-c", code)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split("RESULT")[-1].split() == ["True", "False", "False"]


def test_help_lists_every_family_and_errors_exit_2(tmp_path):
    p = _run("-m", "fusion_jax.cli", "--help")
    assert p.returncode == 0 and "convert" in p.stdout and "merge" in p.stdout
    p = _run("-m", "fusion_jax.cli", "convert", "hf-to-orbax", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert p.returncode == 2 and "nope" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "out").exists()
