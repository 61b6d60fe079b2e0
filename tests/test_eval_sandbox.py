"""The sandbox stops each misbehaviour it promises to stop, scores it as a failure with a reason, cleans
up after itself, and the caller (and the rest of a batch) carries on."""
from __future__ import annotations

import os

import pytest

from fusion_jax.errors import ConfigError
from fusion_jax.eval.sandbox import Limits, run_program, run_programs

FAST = dict(timeout_s=5.0, memory_mb=512, site_packages=False)


def test_ok_program_sees_stdin_and_writes_stdout():
    r = run_program("import sys\nprint(sys.stdin.read().upper(), end='')\nprint(sum(range(10)))",
                    stdin="hello\n", **FAST)
    assert (r.status, r.stdout, r.returncode) == ("ok", "HELLO\n45\n", 0), r
    assert r.ok and r.wall_s > 0 and "rlimits" in r.isolation and "audit_hook" in r.isolation


def test_exception_is_an_error_with_its_last_line():
    r = run_program("def f():\n    raise ValueError('boom')\nf()", **FAST)
    assert r.status == "error" and r.reason == "ValueError: boom" and r.returncode == 1
    assert 'File "main.py", line 2' in r.stderr and 'File "<string>"' not in r.stderr


def test_infinite_loop_times_out():
    r = run_program("while True:\n    pass", **{**FAST, "timeout_s": 1.5})
    assert r.status == "timeout" and 1.4 < r.wall_s < 5, r


def test_cpu_time_limit():
    r = run_program("while True:\n    pass", **{**FAST, "timeout_s": 60, "cpu_s": 1})
    # the kernel's SIGXCPU ends it; the child's accounted CPU time can read a little under the limit
    assert r.status == "timeout" and "CPU" in r.reason and r.cpu_s >= 0.5 and r.wall_s < 30, r


def test_memory_hogs_are_stopped():
    for code in ("x = bytearray(3 * 1024**3)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"):
        r = run_program(code, **{**FAST, "memory_mb": 256})
        assert r.status == "memory", r


def test_fork_bomb_is_blocked_by_the_hook():
    r = run_program("import os\nwhile True:\n    os.fork()", **FAST)
    assert r.status == "blocked" and "os.fork" in r.reason, r
    r = run_program("import subprocess\nsubprocess.run(['true'])", **FAST)
    assert r.status == "blocked" and "subprocess.Popen" in r.reason, r


def test_fork_bomb_is_bounded_by_the_kernel_without_the_hook():
    """The real boundary: RLIMIT_NPROC (non-root) or the pids cgroup (root)."""
    probe = run_program("pass", **FAST)
    if os.geteuid() == 0 and "pids_cgroup" not in probe.isolation:
        pytest.skip("root without a writable pids cgroup: the kernel does not bound root's processes")
    r = run_program("import os\nwhile True:\n    os.fork()", **{**FAST, "audit_hook": False, "max_processes": 8})
    assert r.status == "processes", r
    # forks that swallow the error keep the group alive: the wall timeout kills all of it
    r = run_program("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
                    **{**FAST, "audit_hook": False, "max_processes": 8, "timeout_s": 2})
    assert r.status == "timeout", r


def test_leftover_children_are_killed():
    code = ("import os, time\npid = os.fork()\nif pid == 0:\n    time.sleep(600)\n    os._exit(0)\n"
            "print(pid, flush=True)")
    r = run_program(code, **{**FAST, "audit_hook": False})
    assert r.status == "ok", r
    pid = int(r.stdout)
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        state = "gone"
    assert state in ("gone", "Z", "X"), state


def test_disk_fillers_are_stopped():
    one = run_program("f = open('big', 'wb')\nwhile True:\n    f.write(b'x' * 10**6)", **FAST)
    assert one.status == "disk" and "file size" in one.reason, one
    many = run_program("for i in range(10**4):\n    open(f'f{i}', 'wb').write(b'x' * 4 * 10**6)",
                       **{**FAST, "disk_mb": 32})
    assert many.status == "disk" and "private directory" in many.reason, many


def test_write_outside_the_directory_is_blocked(tmp_path):
    target = tmp_path / "evil.txt"
    for code in (f"open({str(target)!r}, 'w').write('x')",
                 f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
                 f"import os\nos.rename('main.py', {str(target)!r})", "import os\nos.mkdir('/tmp/fusion-evil-dir')"):
        r = run_program(code, **FAST)
        assert r.status == "blocked", (code, r)
    assert not target.exists() and not os.path.exists("/tmp/fusion-evil-dir")
    # inside its own directory the program may write, read and list freely
    r = run_program("open('a.txt', 'w').write('hi')\nimport os\nos.mkdir('d')\nprint(open('a.txt').read(), "
                    "sorted(os.listdir('.')))", **FAST)
    assert r.status == "ok" and r.stdout.strip() == "hi ['a.txt', 'd', 'main.py']", r


def test_reading_the_callers_files_is_blocked(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    for code in (f"print(open({str(secret)!r}).read())", f"import os\nprint(os.listdir({str(tmp_path)!r}))",
                 "import glob\nprint(glob.glob('/etc/*'))", "print(open('/etc/hostname').read())",
                 "import os\nos.symlink('/etc/hostname', 'h')\nprint(open('h').read())"):
        r = run_program(code, **FAST)
        assert r.status == "blocked" and "TOP-SECRET" not in r.stdout, (code, r)


def test_no_network():
    code = "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)"
    r = run_program(code, **FAST)
    assert r.status == "blocked" and "socket" in r.reason, r
    r = run_program("import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)",
                    **{**FAST, "audit_hook": False})
    if "netns" not in r.isolation:
        pytest.skip("no network namespace here (root or unprivileged user namespaces needed)")
    assert r.status == "blocked" and "network" in r.reason, r


def test_private_directory_and_minimal_environment(monkeypatch):
    monkeypatch.setenv("FUSION_SANDBOX_CANARY", "leak")
    r = run_program("import os\nprint(os.getcwd())\nprint(sorted(os.environ))", **FAST)
    cwd, env = r.stdout.splitlines()
    assert not os.path.exists(cwd), "the private directory must be removed"
    assert "CANARY" not in env and "HOME" in env and "TMPDIR" in env


def test_output_is_capped():
    r = run_program("print('x' * 5000)", **{**FAST, "max_output_bytes": 1000})
    assert r.status == "ok" and len(r.stdout) == 1000 and "output cut" in r.reason


def test_batch_runs_on_and_keeps_order():
    programs = ["print(1)", "while True:\n    pass", {"code": "print(input())", "stdin": "abc"},
                "x = bytearray(3 * 1024**3)", "import os\nos.fork()", "raise SystemExit(3)"]
    rs = run_programs(programs, workers=2, **{**FAST, "timeout_s": 1.5})
    assert [r.status for r in rs] == ["ok", "timeout", "ok", "memory", "blocked", "error"]
    assert rs[2].stdout == "abc\n" and rs[5].returncode == 3


def test_bad_limits_are_config_errors():
    with pytest.raises(ConfigError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(ConfigError, match="memory_mb"):
        run_program("pass", memory_mb=-1)
