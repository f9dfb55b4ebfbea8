"""Seeds: every random choice of a run gets its own seed, derived from the replicate seed and what it is for."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts) -> int:
    """Independent, reproducible seeds for each random choice (data order, controls, pruning, ...)."""
    digest = hashlib.sha256("/".join(map(str, (seed, *parts))).encode()).hexdigest()
    return int(digest[:15], 16)
