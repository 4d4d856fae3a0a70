"""Thin entry point for existing command lines: `tfjax bench sim-vs-live` with the same flags
(the code is tfjax/bench/sim_vs_live.py)."""

import sys

from tfjax.bench.sim_vs_live import main

sys.exit(main())
