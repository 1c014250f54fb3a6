"""Policies the evaluation tests load by name (``policy.factory=harness_policies:make_...``), not a test
module: no-op actions plus the faults (exceptions, crashes, Ctrl-C) and engine statistics the tests need.
Each factory names its training data (none), as rsd.policies.registry requires of every factory."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from rsd.policies.harness import ExpertPolicy, NoopPolicy
from rsd.policies.lineage import no_training_data


class FaultyPolicy(NoopPolicy):
    """A no-op policy that raises, kills its process, or interrupts the evaluation on chosen trials."""

    def __init__(self, spec: dict) -> None:
        super().__init__(chunk_len=spec.get("chunk_len", 8))
        self.raise_on = set(spec.get("raise_on") or [])
        self.exit_on = set(spec.get("exit_on") or [])
        self.interrupt_on = set(spec.get("interrupt_on") or [])
        self.flag = spec.get("interrupt_flag")
        self.wait_for = spec.get("wait_for")
        self.trial = None

    def reset(self, task, mode, trial=0):
        self.trial = trial

    def act(self, obs, instruction):
        if self.trial in self.raise_on:
            raise RuntimeError(f"policy failure on trial {self.trial}")
        if self.trial in self.exit_on:
            os._exit(3)  # a crash that takes the whole worker process down
        if self.trial in self.interrupt_on and self.flag and not Path(self.flag).exists():
            Path(self.flag).write_text("interrupted once")
            log = Path(self.wait_for)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # let the other worker's episode be recorded first
                if log.exists() and log.read_text().endswith("\n"):
                    break
                time.sleep(0.2)
            os.kill(os.getppid(), signal.SIGINT)  # Ctrl-C of the evaluation (main process)
            time.sleep(120)
        return super().act(obs, instruction)


def make_faulty_policy(spec: dict) -> FaultyPolicy:
    return FaultyPolicy(spec)


make_faulty_policy.training_data = lambda spec: no_training_data("a test harness policy")


class FlakyPolicy(NoopPolicy):
    """A no-op policy that raises on the trials in ``raise_on`` while the file ``flag`` exists."""

    def __init__(self, spec: dict) -> None:
        super().__init__(chunk_len=spec.get("chunk_len", 8))
        self.raise_on = set(spec.get("raise_on") or [])
        self.flag = Path(spec["flag"])
        self.trial = None

    def reset(self, task, mode, trial=0):
        self.trial = trial

    def act(self, obs, instruction):
        if self.trial in self.raise_on and self.flag.exists():
            raise RuntimeError(f"flaky failure on trial {self.trial}")
        return super().act(obs, instruction)


def make_flaky_policy(spec: dict) -> FlakyPolicy:
    return FlakyPolicy(spec)


make_flaky_policy.training_data = lambda spec: no_training_data("a test harness policy")


class StatsPolicy(NoopPolicy):
    """No-op actions with engine statistics that depend only on (task, trial, mode, step)."""

    def __init__(self, spec: dict) -> None:
        super().__init__(chunk_len=spec.get("chunk_len", 8))

    def reset(self, task, mode, trial=0):
        self.mode, self.trial = mode, trial

    def act(self, obs, instruction):
        actions, _ = super().act(obs, instruction)
        if self.mode == "speculative":
            acc = min((self.trial + int(obs["timestep"])) % 4, 3)
            return actions, {"drafted_layers": 3, "accepted_layers": acc, "main_steps": 8 - acc,
                             "accepted_per_layer": [int(acc > k) for k in range(3)], "drafted_per_layer": [1, 1, 1]}
        return actions, {"main_steps": 8}


def make_stats_policy(spec: dict) -> StatsPolicy:
    return StatsPolicy(spec)


make_stats_policy.training_data = lambda spec: no_training_data("a test harness policy")  # learned nothing


class ModeSplitPolicy(ExpertPolicy):
    """The scripted expert in the speculative mode; in the baseline it raises at its first action (a failed
    episode): every pair is discordant in the speculative mode's favour (the sequential test's decision)."""

    def reset(self, task, mode, trial=0):
        super().reset(task, mode, trial)
        self.mode = mode

    def act(self, obs, instruction):
        if self.mode == "baseline":
            raise RuntimeError("the harness's baseline fails at once")
        return super().act(obs, instruction)


def make_mode_split_policy(spec: dict) -> ModeSplitPolicy:
    return ModeSplitPolicy()


make_mode_split_policy.training_data = lambda spec: no_training_data("a test harness policy")
