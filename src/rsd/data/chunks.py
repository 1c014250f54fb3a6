"""Action chunks: 8 consecutive steps of one demonstration, the unit the tokenizer encodes."""

from __future__ import annotations

import numpy as np

from rsd.tokenizer.layout import CHUNK_LEN


def action_chunks(actions: np.ndarray, chunk_len: int = CHUNK_LEN) -> np.ndarray:
    """``[T, 7]`` -> ``[T, chunk_len, 7]``: the chunk starting at every step of the episode.

    Near the end of an episode there are fewer than ``chunk_len`` steps left. Those chunks are padded
    explicitly with *hold* actions: zero arm motion and the episode's last gripper command, which is
    what a robot does after finishing (repeating the last delta would keep moving the arm).
    """
    actions = np.asarray(actions, dtype=np.float32)
    if actions.ndim != 2 or actions.shape[0] == 0:
        raise ValueError(f"expected actions [T, A] with T >= 1, got {actions.shape}")
    hold = np.zeros((chunk_len - 1, actions.shape[1]), dtype=np.float32)
    hold[:, -1] = actions[-1, -1]
    padded = np.concatenate([actions, hold], axis=0)
    idx = np.arange(actions.shape[0])[:, None] + np.arange(chunk_len)[None, :]
    return padded[idx]
