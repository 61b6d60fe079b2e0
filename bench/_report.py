"""What every benchmark script shares: its section of BENCHMARKS.md, replaced in place.

    from _report import write_section      # bench/ is the script's own directory, so it is on sys.path
    write_section("## My benchmark", text)
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"


def write_section(section: str, text: str, path: Path = BENCHMARKS) -> None:
    """Replace the section that starts with the heading line ``section`` (up to the next ``## `` heading)
    with ``text``, or append ``text`` when there is none; every other section stays as it is. Written
    atomically (a killed benchmark never leaves half a file)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from fusion_jax.utils.atomic import atomic_file
    old = path.read_text() if path.exists() else ""
    body = text.rstrip("\n") + "\n"
    pat = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pat.search(old):
        new = pat.sub(lambda _: body + "\n", old, count=1).rstrip("\n") + "\n"
    else:
        new = old.rstrip("\n") + ("\n\n" if old else "") + body
    with atomic_file(path) as f:
        f.write(new)
