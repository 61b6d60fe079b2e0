"""Every shipped config under configs/merges parses; the DARE-TIES example runs on a tiny family."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fusion_jax.merging import load_config, merge
from fusion_jax.merging.testing import make_family

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "merges").glob("*.yml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses(path):
    from fusion_jax.merging.config import read_documents
    from fusion_jax.merging.multi import validate
    if len(read_documents(path)) > 1:
        validate(path)
    else:
        load_config(path)


def test_three_specialists_example_runs(tmp_path):
    base, fts = make_family(tmp_path / "models", 3, dtype="bfloat16")
    for src, dst in zip(fts, ("chat", "code", "math")):
        src.rename(tmp_path / "models" / dst)
    cfg = yaml.safe_load((CONFIGS[0].parent / "dare_ties_three_specialists.yml").read_text())
    p = tmp_path / "cfg.yml"
    p.write_text(yaml.safe_dump(cfg))
    merge(p, tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "model.safetensors").is_file()
