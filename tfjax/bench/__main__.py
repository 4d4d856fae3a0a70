"""`python -m tfjax.bench COMMAND ...`: `tfjax bench` without importing the server's modules
(`scripts/gpu_check.sh` runs the GPU check this way on a bare CUDA image)."""

import sys

from tfjax.bench.cli import main

sys.exit(main())
