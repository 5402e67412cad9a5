"""Where the package keeps what it computes once: converted models, embeddings, LM statistics."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """Root of every on-disk cache; override with the BDS_CACHE environment variable."""
    return Path(os.environ.get("BDS_CACHE", Path.home() / ".cache" / "bds"))
