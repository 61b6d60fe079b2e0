"""Every output, written where it cannot be: a full disk (a small tmpfs where this machine may mount
one, else ENOSPC simulated in-process), a read-only filesystem, a file in the way; and written through
a symlink to a directory not created yet, on another filesystem. Also: modes honour the umask, stale
temporaries of killed runs are removed (and nobody else's), ``--overwrite`` never deletes an input.

Commands (in-process): ``convert hf-to-orbax``, ``convert orbax-to-hf``, ``merge``, ``dare`` and
``train.py --config=configs/toy.py`` (whose output is its workdir).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import hardening as H
from hf_fixtures import cached_tiny_hf_model

COMMANDS = ["hf-to-orbax", "orbax-to-hf", "merge", "dare", "train"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Input checkpoints of every command, and a builder of each command's argv for an output path."""
    from fusion_jax.cli import main
    root = tmp_path_factory.mktemp("inputs")
    llama = cached_tiny_hf_model(tmp_path_factory, "llama", tokenizer=True)
    ft = cached_tiny_hf_model(tmp_path_factory, "llama", seed=1, tokenizer=True)
    orbax = root / "orbax"
    assert main(["convert", "hf-to-orbax", str(llama), str(orbax)]) == 0
    cfg = root / "merge.yml"
    cfg.write_text(f"merge_method: linear\nmodels:\n  - model: {llama}\n    parameters: {{weight: 0.5}}\n"
                   f"  - model: {ft}\n    parameters: {{weight: 0.5}}\n")

    def argv(cmd: str, out: Path, *extra) -> list:
        return {
            "hf-to-orbax": ["convert", "hf-to-orbax", llama, out],
            "orbax-to-hf": ["convert", "orbax-to-hf", orbax, out],
            "merge": ["merge", cfg, out, "--quiet"],
            "dare": ["dare", llama, ft, out, "--drop", "0.5", "--quiet"],
            "train": ["--config=configs/toy.py", f"--config.workdir={out}", "--config.trainer.total_steps=8",
                      "--config.trainer.save_every=4", "--config.trainer.progress=False",
                      "--config.trainer.tensorboard=False"],
        }[cmd] + list(extra)

    argv.sources = (llama, ft, orbax, cfg)
    return argv


def _run(cmd, argv, capfd) -> H.Outcome:
    return (H.train if cmd == "train" else H.cli)(argv, capfd)


def _done(cmd: str, out: Path) -> None:
    """The output of a successful run is complete."""
    name = {"hf-to-orbax": "params", "orbax-to-hf": "model.safetensors", "merge": "model.safetensors",
            "dare": "model.safetensors", "train": "checkpoints/8"}[cmd]
    assert (out / name).exists(), sorted(p.name for p in out.iterdir())


# -- full disk -------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", COMMANDS)
def test_full_disk(cmd, inputs, tmp_path, capfd):
    """ENOSPC mid-write: exit 2, one message naming the output and the full disk, nothing left on the
    filesystem (for training: the checkpoints completed before stay, no Orbax temporary)."""
    before = H.snapshot(*inputs.sources)
    if H.can_mount():
        with H.tmpfs(tmp_path / "fs", "200k" if cmd == "train" else "96k") as fs:
            out = fs / "out"
            o = _run(cmd, inputs(cmd, out), capfd)
            left = sorted(p.name for p in fs.iterdir())
            orbax_tmp = [str(p) for p in fs.rglob("*orbax-checkpoint-tmp*")]
    else:
        out = tmp_path / "out"
        with H.simulated_enospc():
            o = _run(cmd, inputs(cmd, out), capfd)
        left = [p.name for p in tmp_path.iterdir() if p.name.startswith((".out", "out"))]
        orbax_tmp = [str(p) for p in tmp_path.rglob("*orbax-checkpoint-tmp*")]
    if cmd == "train":
        msg = H.assert_clean_error(o, None, names=[out / "checkpoints"], inputs=before)
        assert orbax_tmp == [], orbax_tmp
    else:
        msg = H.assert_clean_error(o, None, names=[out], inputs=before)
        assert left == [], left
    assert "No space left on device" in msg, msg


# -- symlinked outputs ------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd", COMMANDS)
def test_symlink_to_a_directory_not_yet_created(cmd, inputs, tmp_path, capfd):
    """The output path is a symlink to a directory that does not exist yet, on another filesystem:
    the data is written beside the target (so the final rename is not across filesystems), the link is
    kept, and nothing is left beside either."""
    import contextlib
    ctx = H.tmpfs(tmp_path / "fs", "16m") if H.can_mount() else contextlib.nullcontext(tmp_path / "fs")
    with ctx as fs:
        target = fs / "deep" / "target"
        link = tmp_path / "link"
        link.symlink_to(target)
        o = _run(cmd, inputs(cmd, link), capfd)
        assert o.rc == 0, o
        assert link.is_symlink() and os.readlink(link) == str(target)
        _done(cmd, target)
        assert H.litter(link) == [str(target)] or H.litter(link) == [], H.litter(link)
        assert [p.name for p in target.parent.iterdir()] == ["target"]
        assert [p.name for p in tmp_path.iterdir() if p.name != "fs"] == ["link"]


@pytest.mark.parametrize("cmd", ["hf-to-orbax", "orbax-to-hf", "merge", "dare"])
def test_symlink_to_an_existing_output(cmd, inputs, tmp_path, capfd):
    """Without --overwrite: exit 2, the existing output untouched; with it: replaced through the link."""
    target = tmp_path / "target"
    target.mkdir()
    (target / "old.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(target)
    before = H.snapshot(target)
    o = _run(cmd, inputs(cmd, link), capfd)
    H.assert_clean_error(o, None, names=[link, "already exists"])
    assert H.snapshot(target) == before
    o = _run(cmd, inputs(cmd, link, "--overwrite"), capfd)
    assert o.rc == 0, o
    assert link.is_symlink() and not (target / "old.txt").exists()
    _done(cmd, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "target"]


# -- read-only filesystem, a file in the way ---------------------------------------------------------
@pytest.mark.parametrize("cmd", COMMANDS)
def test_read_only_filesystem(cmd, inputs, tmp_path, capfd):
    if H.can_mount():
        import contextlib
        ctx = H.tmpfs(tmp_path / "ro", "1m", readonly=True)
    elif os.geteuid() != 0:
        (tmp_path / "ro").mkdir()
        os.chmod(tmp_path / "ro", 0o555)
        import contextlib
        ctx = contextlib.nullcontext(tmp_path / "ro")
    else:
        pytest.skip("root without mount: no way to make a directory unwritable here")
    before = H.snapshot(*inputs.sources)
    with ctx as ro:
        out = ro / "out"
        o = _run(cmd, inputs(cmd, out), capfd)
        msg = H.assert_clean_error(o, None, names=[out], inputs=before)
        assert "read-only" in msg.lower() or "permission" in msg.lower(), msg


@pytest.mark.parametrize("cmd", COMMANDS)
@pytest.mark.parametrize("where", ["is_a_file", "under_a_file"])
def test_a_file_in_the_way(cmd, where, inputs, tmp_path, capfd):
    f = tmp_path / "file"
    f.write_text("not a directory")
    out = f if where == "is_a_file" else f / "sub"
    extra = ("--overwrite",) if cmd != "train" and where == "is_a_file" else ()
    o = _run(cmd, inputs(cmd, out, *extra), capfd)
    H.assert_clean_error(o, None, names=[f])
    assert f.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


# -- modes ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cmd,mask", [(c, m) for c in ("hf-to-orbax", "orbax-to-hf") for m in (0o022, 0o027)]
                         + [("merge", 0o022), ("merge", 0o027)])
def test_modes_follow_the_umask(cmd, mask, inputs, tmp_path, capfd):
    out = tmp_path / "out"
    with H.umask(mask):
        o = _run(cmd, inputs(cmd, out), capfd)
    assert o.rc == 0, o
    bad = []
    for p in [out, *out.rglob("*")]:
        m = stat.S_IMODE(p.stat().st_mode)
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        # files may be more private than new files (0644 for shards), never more open, never 0700 dirs
        if p.is_dir() and m != want or not p.is_dir() and (m & ~want or not m & 0o400):
            bad.append(f"{p.relative_to(tmp_path)}: {m:o} (want {want:o})")
    assert not bad, bad


# -- stale temporaries -------------------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_killed_runs_are_removed_and_no_one_elses(inputs, tmp_path, capfd):
    from fusion_jax.utils.atomic import MARKER, _process_start
    out = tmp_path / "out"
    me = {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid())}
    dirs = {
        "dead": dict(me, pid=_dead_pid(), start="1"),          # removed
        "alive": me,                                           # a live run: kept
        "reused": dict(me, start="0"),                         # our pid, another process start: removed
        "other_host": dict(me, pid=_dead_pid(), host="elsewhere"),  # cannot tell: kept
        "no_marker": None,                                     # not ours: kept
        "bad_marker": "{not json",                            # kept
    }
    for name, marker in dirs.items():
        d = tmp_path / f".out.tmp-{name}"
        d.mkdir()
        (d / "data.bin").write_bytes(b"x" * 100)
        if marker is not None:
            (d / MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    (tmp_path / ".other.tmp-dead").mkdir()   # another output's temporary: not looked at
    (tmp_path / ".other.tmp-dead" / MARKER).write_text(json.dumps(dirs["dead"]))
    o = H.cli(inputs("orbax-to-hf", out), capfd)
    assert o.rc == 0, o
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(["out", ".other.tmp-dead"] + [f".out.tmp-{n}" for n in
                                                         ("alive", "other_host", "no_marker", "bad_marker")]), left


# -- inputs are never the victims of --overwrite -------------------------------------------------------
def test_overwrite_never_deletes_an_input(inputs, tmp_path, capfd):
    llama, _, orbax, _ = inputs.sources
    models = tmp_path / "models"
    shutil.copytree(llama, models / "m")
    before = H.snapshot(models)
    o = H.cli(["convert", "hf-to-orbax", models / "m", models, "--overwrite"], capfd)
    H.assert_clean_error(o, None, names=[models / "m"], inputs=before)
    o = H.cli(["convert", "hf-to-orbax", models / "m", models / "m", "--overwrite"], capfd)
    H.assert_clean_error(o, None, names=[models / "m"], inputs=before)
    o = H.cli(["convert", "orbax-to-hf", orbax, models, "--overwrite", "--source-dir", models / "m"], capfd)
    H.assert_clean_error(o, None, names=[models / "m"], inputs=before)


# -- options named in errors -------------------------------------------------------------------------
def test_dtype_errors_name_the_option(inputs, tmp_path, capfd):
    from fusion_jax.errors import ConfigError
    from fusion_jax.models.config import canonical_dtype
    with pytest.raises(ConfigError, match=r"^specialists\.dtype: unsupported dtype 'float8'") as e:
        canonical_dtype("float8", "specialists.dtype")
    assert e.value.option == "specialists.dtype"
    o = H.cli(inputs("hf-to-orbax", tmp_path / "out", "--dtype", "float8"), capfd)
    H.assert_clean_error(o, tmp_path / "out", names=["--dtype", "float8"])


def test_ultrafuser_dtype_option_is_named_before_any_work():
    from fusion_jax.errors import ConfigError
    from fusion_jax.ultrafuser import config as ucfg
    c = ucfg.get_config("smoke") if hasattr(ucfg, "get_config") else ucfg.base_config()
    c.specialists.dtype = "float8"
    with pytest.raises(ConfigError, match=r"specialists\.dtype"):
        ucfg.validate(c)


def test_ultrafuser_output_dir_a_file(tmp_path, capfd):
    """The main job's ``output_dir`` is checked before any work (no zoo, no training)."""
    f = tmp_path / "file"
    f.write_text("x")
    o = H.train(["--config=configs/ultrafuser.py:smoke", f"--config.output_dir={f}"], capfd)
    H.assert_clean_error(o, None, names=["config.output_dir", f])


def test_nested_atomic_directories(tmp_path):
    """A writer that itself writes its output atomically into the temporary directory it was given (the
    demo zoo's tokenizer does): the result is complete, with no marker or temporary left."""
    from fusion_jax.utils.atomic import MARKER, atomic_directory
    out = tmp_path / "out"
    with atomic_directory(out, overwrite=True) as tmp:
        with atomic_directory(tmp, overwrite=True) as inner:
            (inner / "a.txt").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"] and not (out / MARKER).exists()
