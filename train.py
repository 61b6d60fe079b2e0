"""Train entry point: ``python train.py --config=configs/<method>.py[:preset] [--config.a.b=value ...]``.

The config (ml_collections, parsed with absl flags and ``config_flags``; default
``configs/ultrafuser.py`` beside this file) names the job in ``config.method``;
:func:`fusion_jax.train.cli.run_from_config` runs it. A :class:`fusion_jax.errors.FusionError` (bad
config, missing file, no data, ...) prints ``error: <message>`` on stderr and exits with status 2.
"""
from __future__ import annotations

import os
import sys

from fusion_jax.train.cli import main

# The default resolves beside this file, so `python path/to/train.py` works from any directory;
# a --config given on the command line is relative to the working directory as usual.
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "ultrafuser.py")

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default=DEFAULT_CONFIG, prog="train.py"))
