"""Where the integration tier finds ../shared/data (or $KVRANK_SHARED_DATA), imported by tests/integration/."""

from __future__ import annotations

import os
from pathlib import Path

SHARED_DATA = Path(
    os.environ.get("KVRANK_SHARED_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data"
)
SCIFACT = SHARED_DATA / "scifact"
