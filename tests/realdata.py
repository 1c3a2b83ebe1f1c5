"""Where the real chest X-rays are, for the slow tests and the benchmarks alike: the folder in
XRAYLIB_REAL_DATA, else ../shared/data/chest_xray/train beside the checkout."""

from __future__ import annotations

import os
from pathlib import Path

REAL_DATA = Path(os.environ.get("XRAYLIB_REAL_DATA")
                 or Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray" / "train")
NOT_FOUND = f"real chest X-rays not found at {REAL_DATA}: set XRAYLIB_REAL_DATA to the train/ folder"
