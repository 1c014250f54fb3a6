"""Episode-level train/validation splits, shared by the tokenizer and the feature cache.

Splitting frames at random leaks neighbouring frames of one episode into validation; here a whole
episode goes to one side, chosen by a stable hash of its key so every stage agrees.
"""

from __future__ import annotations

import hashlib


def is_validation_episode(episode_key: str, val_fraction: float = 0.1, seed: int = 0) -> bool:
    """``episode_key`` like ``"libero_spatial/3/demo_7"``; deterministic across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{episode_key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction
