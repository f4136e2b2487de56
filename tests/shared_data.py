"""Where the tests find local copies of the benchmark files (SST-2, WSC, WinoGrande): the folder
in $HYBRIDFT_DATA_DIR, else a ``shared/data`` folder beside the repository (or beside its
parent, for a git worktree). Tests that need them are skipped, with the reason, when absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CANDIDATES = [Path(os.environ["HYBRIDFT_DATA_DIR"])] if os.environ.get("HYBRIDFT_DATA_DIR") else []
CANDIDATES += [ROOT.parent / "shared" / "data", ROOT.parent.parent / "shared" / "data"]
DATA = next((p for p in CANDIDATES if (p / "sst2").is_dir()), CANDIDATES[0])

needs_data = pytest.mark.skipif(
    not (DATA / "sst2").is_dir(),
    reason="benchmark files not found: set HYBRIDFT_DATA_DIR to a folder with sst2/, wsc/ and winogrande/ (see README)",
)
