"""Makes the dashboard screenshot tools in scripts/ importable as top-level modules, as
`dashboard_shot.py` imports `headless_chromium.py` by its bare name."""

from __future__ import annotations

import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))
