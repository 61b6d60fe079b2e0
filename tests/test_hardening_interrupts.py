"""Every command interrupted with SIGINT and SIGTERM at several points: exit 130 / 143 with one line
``interrupted by SIG...``, no traceback, nothing at or beside the output (for ``train.py``: no Orbax
temporary, the completed checkpoints kept), inputs untouched, and the same command then completes.

In-process runs send the signal to this process at the N-th call of a chosen function
(``hardening.signal_at``): deterministic, and the real handlers of the entry points run. A few real
subprocesses get the signal from outside while paused at a known point (``tests/signal_runner.py``), as
``kill`` / ``timeout`` / SLURM would send it, and are checked at interpreter exit too.
"""
from __future__ import annotations

import signal
from pathlib import Path

import pytest

import hardening as H
from hf_fixtures import cached_tiny_hf_model

SIGNALS = [signal.SIGINT, signal.SIGTERM]
_HF_ST = "fusion_jax.hf.safetensors_io"
POINTS = {
    # command: [(point id, target, call number, before/after)]
    "hf-to-orbax": [("reading", f"{_HF_ST}:SafetensorsReader.read_rows", 3, "before"),
                    ("orbax-writing", "orbax.checkpoint:StandardCheckpointer.save", 1, "after"),
                    ("finishing", "fusion_jax.hf.orbax_io:copy_passthrough_files", 1, "before")],
    "orbax-to-hf": [("restoring", "orbax.checkpoint:StandardCheckpointer.restore", 1, "before"),
                    ("writing", f"{_HF_ST}:ShardedWriter.write", 5, "before"),
                    ("finishing", "fusion_jax.hf.checkpoint:copy_passthrough_files", 1, "before")],
    "merge": [("planning", f"{_HF_ST}:read_header", 2, "before"),
              ("writing", f"{_HF_ST}:ShardedWriter.write", 5, "before"),
              ("finishing", "fusion_jax.merging.executor:_write_metadata", 1, "before")],
    "dare": [("planning", f"{_HF_ST}:read_header", 1, "before"),
             ("writing", f"{_HF_ST}:ShardedWriter.write", 9, "before"),
             ("finishing", "fusion_jax.merging.executor:_write_metadata", 1, "before")],
}
TRAIN_POINTS = [("stepping", "fusion_jax.train.loop:Trainer.step_fn", 3, "before"),
                ("checkpoint-writing", "fusion_jax.train.checkpointing:Checkpointer.save", 1, "after"),
                ("final-wait", "fusion_jax.train.checkpointing:Checkpointer.wait", 1, "before")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from fusion_jax.cli import main
    root = tmp_path_factory.mktemp("inputs")
    llama = cached_tiny_hf_model(tmp_path_factory, "llama", tokenizer=True)
    ft = cached_tiny_hf_model(tmp_path_factory, "llama", seed=1, tokenizer=True)
    orbax = root / "orbax"
    assert main(["convert", "hf-to-orbax", str(llama), str(orbax)]) == 0
    cfg = root / "merge.yml"
    cfg.write_text(f"merge_method: ties\nbase_model: {llama}\nmodels:\n  - model: {ft}\n"
                   f"    parameters: {{weight: 1.0, density: 0.5}}\n")

    def argv(cmd, out):
        return {"hf-to-orbax": ["convert", "hf-to-orbax", llama, out],
                "orbax-to-hf": ["convert", "orbax-to-hf", orbax, out],
                "merge": ["merge", cfg, out, "--quiet"],
                "dare": ["dare", llama, ft, out, "--drop", "0.5", "--quiet"]}[cmd]

    argv.sources = (llama, ft, orbax, cfg)
    return argv


def _check_interrupted(o: H.Outcome, sig: int, out: Path | None, before: dict) -> None:
    H.assert_clean_error(o, out, status=128 + sig, prefix=f"interrupted by {signal.Signals(sig).name}",
                         inputs=before)


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
@pytest.mark.parametrize("cmd", list(POINTS))
def test_commands(cmd, sig, inputs, tmp_path, capfd):
    before = H.snapshot(*inputs.sources)
    for point, target, n, when in POINTS[cmd]:
        out = tmp_path / f"out-{point}"
        with H.signal_at(target, n, sig, when) as fired:
            o = H.cli(inputs(cmd, out), capfd)
        assert fired, f"{point}: {target} was not called {n} times"
        _check_interrupted(o, sig, out, before)
        if point not in ("reading", "planning", "restoring"):  # the output was begun: say it was not written
            assert f"{out} was not written" in o.lines[0], o.lines
        rerun = H.cli(inputs(cmd, out), capfd)  # the same command now completes
        assert rerun.rc == 0, (point, rerun)
        assert H.litter(out) == [str(out)], H.litter(out)


def _toy(workdir, steps=8):
    return ["--config=configs/toy.py", f"--config.workdir={workdir}", f"--config.trainer.total_steps={steps}",
            "--config.trainer.save_every=4", "--config.trainer.progress=False",
            "--config.trainer.tensorboard=False"]


def _orbax_temporaries(workdir: Path) -> list[str]:
    return [str(p) for p in workdir.rglob("*") if "orbax-checkpoint-tmp" in p.name]


@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_train_py(sig, tmp_path, capfd):
    """One workdir interrupted at each point in turn (each run resumes the last), then completed."""
    from fusion_jax.train.checkpointing import Checkpointer
    w = tmp_path / "run"
    for point, target, n, when in TRAIN_POINTS:
        with H.signal_at(target, n, sig, when) as fired:
            o = H.train(_toy(w), capfd)
        assert fired, f"{point}: {target} was not called {n} times"
        _check_interrupted(o, sig, None, {})
        assert _orbax_temporaries(w) == [], (point, _orbax_temporaries(w))
    ck = Checkpointer(w / "checkpoints", save_every=4)
    steps = ck.all_steps()
    ck.close()
    assert steps and max(steps) >= 4, steps  # the checkpoint being written when interrupted completed
    o = H.train(_toy(w), capfd)
    assert o.rc == 0, o
    assert "Traceback" not in o.err
    ck = Checkpointer(w / "checkpoints", save_every=4)
    assert ck.latest_step() == 8
    ck.close()


# -- real processes, real signals from outside --------------------------------------------------------
@pytest.mark.parametrize("cmd,pause,sig", [
    ("hf-to-orbax", "orbax.checkpoint:StandardCheckpointer.wait_until_finished:1", signal.SIGTERM),
    ("merge", "fusion_jax.merging.executor:_Progress.update:3", signal.SIGINT),
])
def test_real_signal_to_a_command(cmd, pause, sig, inputs, tmp_path):
    """A signal sent from outside while Orbax's writer is busy (convert) or tensors are being merged:
    the writer is awaited, its temporary directory removed, nothing printed after the one line."""
    before = H.snapshot(*inputs.sources)
    out = tmp_path / "out"
    o = H.run_paused(inputs(cmd, out), pause, sig, tmp_path)
    _check_interrupted(o, sig, out, before)


def test_real_sigterm_to_train_py(tmp_path, capfd):
    """``kill`` of a training run (a real ``train.py`` process) while it is about to checkpoint: exit 143,
    no Orbax temporary, the completed checkpoint kept; the same command then resumes and completes."""
    from fusion_jax.train.checkpointing import Checkpointer
    w = tmp_path / "run"
    o = H.run_paused(_toy(w), "fusion_jax.train.checkpointing:Checkpointer.save:2", signal.SIGTERM, tmp_path,
                     train_py=True)
    _check_interrupted(o, signal.SIGTERM, None, {})
    assert _orbax_temporaries(w) == []
    ck = Checkpointer(w / "checkpoints", save_every=4)
    assert ck.all_steps() == [4]
    ck.close()
    o = H.train(_toy(w), capfd)  # (in this process: the resume itself is what is tested)
    assert o.rc == 0 and "Traceback" not in o.err, o
    ck = Checkpointer(w / "checkpoints", save_every=4)
    assert ck.all_steps() == [4, 8]
    ck.close()
