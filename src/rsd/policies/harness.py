"""Policies without learned models, for checking the evaluation harness: hold still, replay, expert."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from rsd.envs.expert import ExpertConfig, make_expert
from rsd.envs.libero_env import TaskSpec


class NoopPolicy:
    """Holds still with the gripper open: never succeeds; measures the harness itself."""

    needs_images = False

    def __init__(self, chunk_len: int = 8) -> None:
        self.chunk_len = int(chunk_len)

    def reset(self, task: TaskSpec, mode: str, trial: int = 0) -> None:
        pass

    def act(self, obs: dict, instruction: str) -> tuple[np.ndarray, dict]:
        actions = np.zeros((self.chunk_len, 7))
        actions[:, -1] = -1.0
        return actions, {}


class ReplayPolicy:
    """Replays recorded action sequences chunk by chunk (open loop).

    ``actions`` is one ``[T, 7]`` sequence for every episode, or ``{task_id: [T, 7]}`` / a ``.npy``/``.npz``
    path. After the sequence ends it holds still with the last gripper command.
    """

    needs_images = False

    def __init__(self, actions: Any, chunk_len: int = 8) -> None:
        self.chunk_len = int(chunk_len)
        self._sequences = _load_actions(actions)
        self._seq = np.zeros((0, 7))
        self._t = 0

    def reset(self, task: TaskSpec, mode: str, trial: int = 0) -> None:
        seqs = self._sequences
        if isinstance(seqs, dict):
            key = task.task_id if task.task_id in seqs else str(task.task_id)
            if key not in seqs:
                raise KeyError(f"ReplayPolicy has no actions for task {task.task_id}")
            seqs = seqs[key]
        self._seq = np.asarray(seqs, dtype=np.float64).reshape(-1, 7)
        self._t = 0

    def act(self, obs: dict, instruction: str) -> tuple[np.ndarray, dict]:
        chunk = self._seq[self._t: self._t + self.chunk_len]
        self._t += self.chunk_len
        if len(chunk) < self.chunk_len:
            hold = np.zeros((self.chunk_len - len(chunk), 7))
            hold[:, -1] = self._seq[-1, -1] if len(self._seq) else -1.0
            chunk = np.concatenate([chunk, hold]) if len(chunk) else hold
        return chunk, {}


def _load_actions(actions: Any) -> Any:
    if isinstance(actions, str):
        data = np.load(actions, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            return {k: data[k] for k in data.files}
        return data
    if isinstance(actions, Mapping):
        return {k: np.asarray(v, dtype=np.float64) for k, v in actions.items()}
    return np.asarray(actions, dtype=np.float64)


class ExpertPolicy:
    """The scripted privileged-state expert (``rsd.envs.expert``) as a chunk policy.

    The expert reads ``env.sim``, so the rollout hands it the env (:meth:`bind_env`); it is built at the
    first ``act`` of an episode, i.e. after ``reset``/``set_init_state`` and the warm-up, as the expert
    expects. It is closed loop: with ``chunk_len=1`` (the default) this *is* the expert; with a longer
    chunk its current action is held for the whole chunk (open loop, degrades it).
    """

    needs_images = False

    def __init__(self, chunk_len: int = 1, **config: Any) -> None:
        self.chunk_len = int(chunk_len)
        self.config = config
        self._env = None
        self._task: TaskSpec | None = None
        self._expert = None

    def bind_env(self, env: Any) -> None:
        self._env = env

    def reset(self, task: TaskSpec, mode: str, trial: int = 0) -> None:
        self._task = task
        self._expert = None

    def act(self, obs: dict, instruction: str) -> tuple[np.ndarray, dict]:
        if self._expert is None:
            if self._env is None or self._task is None:
                raise RuntimeError("ExpertPolicy needs bind_env(env) and reset(task) before act")
            self._expert = make_expert(self._env, self._task, ExpertConfig(**self.config))
        action = np.asarray(self._expert.act(obs), dtype=np.float64).reshape(1, 7)
        return np.repeat(action, self.chunk_len, axis=0), {}
