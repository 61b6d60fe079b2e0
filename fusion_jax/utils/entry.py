"""What every command-line entry point does around its job (``fusion-jax ...``, ``python train.py``).

* a :class:`~fusion_jax.errors.FusionError` prints ``error: <message>`` on stderr and exits 2;
* an operating-system error of the user's environment (disk full, read-only filesystem, a file where a
  directory belongs, no permission) does the same, naming the path: it is not a bug of ours;
* SIGINT and SIGTERM interrupt the job like Ctrl-C (``finally`` blocks remove temporary outputs, Orbax
  writers are awaited) and exit ``128 + signal``: 130 for SIGINT, 143 for SIGTERM;
* anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Callable

from fusion_jax.errors import FusionError
from fusion_jax.utils import interrupt, oserrors


def run(job: Callable[[], int | None]) -> int:
    """Run ``job()`` under the rules above; returns the exit status."""
    with interrupt.signals_as_interrupts():
        try:
            status = job()
            return status if isinstance(status, int) and not isinstance(status, bool) else 0
        except FusionError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return e.exit_code
        except KeyboardInterrupt as e:
            print(interrupt.describe(e), file=sys.stderr, flush=True)
            return interrupt.exit_code(e)
        except OSError as e:
            if not oserrors.is_environment_error(e):
                raise
            print(f"error: {oserrors.describe(e)}", file=sys.stderr, flush=True)
            return 2
