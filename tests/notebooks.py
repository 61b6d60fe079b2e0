"""Running the Colab notebooks (colab/*.ipynb) in tests: the committed-clean check and a top-to-bottom run
with parameters injected after the cell tagged ``parameters`` (as papermill does). The kernel imports this
checkout's fusion_jax (PYTHONPATH), whatever is pip-installed, and runs in its own working directory."""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Mapping

REPO = Path(__file__).resolve().parents[1]


def parameters_index(nb) -> int:
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def check_committed_clean(path: Path, parameters: tuple[str, ...] = (), runs: str | None = None,
                          config: str | None = None) -> None:
    """Valid, no outputs or execution counts; the ``parameters`` cell defines every name in ``parameters``;
    the code imports ``runs`` (what train.py runs) and reads ``configs/<config>`` (the file train.py reads)."""
    import nbformat
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for c in nb.cells:
        if c.cell_type == "code":
            assert c.get("outputs") == [] and c.get("execution_count") is None, path.name
    if parameters:
        src = nb.cells[parameters_index(nb)].source
        for name in parameters:
            assert f"{name} =" in src, (path.name, name)
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    if runs:
        assert f"from {runs.rsplit('.', 1)[0]} import {runs.rsplit('.', 1)[1]}" in code, (path.name, runs)
    if config:
        assert f'"configs" / "{config}"' in code, (path.name, config)


@dataclasses.dataclass
class Executed:
    nb: object
    seconds: float
    stdout: str           # every cell's printed text
    images: int           # PNG outputs displayed


def execute(path: Path, params: Mapping[str, object], work: Path, *, env: Mapping[str, str] | None = None,
            timeout: int = 600) -> Executed:
    """Run the notebook top to bottom with ``params`` injected, the kernel's cwd ``work`` (created), in this
    process's environment plus ``env``, JAX on the CPU, PYTHONPATH = this checkout, matplotlib's cache
    beside ``work`` (the environment is restored afterwards)."""
    import nbclient
    import nbformat
    nb = nbformat.read(path, as_version=4)
    nb.cells.insert(parameters_index(nb) + 1, nbformat.v4.new_code_cell(
        "\n".join(f"{k} = {v!r}" for k, v in params.items()), metadata={"tags": ["injected-parameters"]}))
    work.mkdir(parents=True, exist_ok=True)
    full = {"JAX_PLATFORMS": "cpu", **(env or {}),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "MPLCONFIGDIR": str(work.parent / "mpl")}
    old = {k: os.environ.get(k) for k in full}
    os.environ.update(full)   # the kernel inherits this process's environment
    try:
        t = time.perf_counter()
        nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                                resources={"metadata": {"path": str(work)}}).execute()
        took = time.perf_counter() - t
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    outputs = [o for c in nb.cells for o in c.get("outputs", [])]
    return Executed(nb=nb, seconds=took, stdout="".join(o.get("text", "") for o in outputs if o.get("name") == "stdout"),
                    images=sum("image/png" in o.get("data", {}) for o in outputs))
